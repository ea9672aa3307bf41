//! The Grafana dashboard (deploy/monitoring/dashboard.json) against a real agent: the lab's
//! agents on deploy/examples/lab.yaml, real traffic (north-south to a Local and a Cluster
//! Service, ClusterIP connections, connections refused for want of endpoints), one scrape of
//! node1's /metrics, and every query of every panel and variable (Grafana's variables
//! substituted) must parse (`promtool check rules` on one recording rule per query) and find
//! what it selects in the scrape: each metric, each label value it matches, each label it
//! groups by (`lb_tests::monitoring::query_problems`). The same queries with a metric misspelled
//! must each fail the check, so the check is not satisfied by anything.
use lb_tests::monitoring::{
    dashboard_queries, dashboard_variables, promtool, promtool_parses, query_problems, samples,
    selectors, substitute, DASHBOARD,
};
use lb_tests::scenario::{http_get, start_example_with};
use lb_userspace::agent::metrics::MAP_READ_INTERVAL;

#[test]
fn lab_dashboard_queries_find_their_series_in_a_real_scrape() {
    let text = std::fs::read_to_string(DASHBOARD).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    let dashboard: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    let variables = dashboard_variables(&dashboard);
    let queries: Vec<(String, String)> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|q| {
            let expr = substitute(&q.expr, &variables)
                .unwrap_or_else(|e| panic!("{}: {e}: {}", q.place, q.expr));
            (q.place, expr)
        })
        .collect();
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let Some(promtool) = promtool() else { return };
    promtool_parses(&promtool, &queries).unwrap_or_else(|e| panic!("{e}"));

    let Some(s) = start_example_with(&["--metrics-addr", "0.0.0.0:9464", "--ct-gc-interval", "1s"])
    else {
        return;
    };
    // North-south through node1: the Local Service (local backend) and the Cluster one (remote
    // backend, SNAT); ClusterIP connections from a pod; connections to a Service without ready
    // endpoints, refused.
    s.lab.client_route("203.0.113.10/32", "node1").unwrap();
    s.lab.client_route("203.0.113.11/32", "node1").unwrap();
    for (place, to) in [
        ("client", "203.0.113.10:80"),
        ("client", "203.0.113.11:80"),
        ("a1", "10.96.0.10:80"),
    ] {
        let ex = s
            .lab
            .run_client(place, &["tcp", to, "--count", "10"])
            .unwrap();
        assert!(ex.iter().all(|e| e.ok), "{place} -> {to}: {ex:?}");
    }
    s.lab.all_fail("a1", "tcp", "10.96.0.30:80", 2, 500);
    // The maps are read for /metrics at most once per MAP_READ_INTERVAL; a conntrack sweep a
    // second.
    std::thread::sleep(MAP_READ_INTERVAL);
    let (code, _, body) = http_get(&s.lab.client_netns, "192.168.100.1:9464", "/metrics");
    assert_eq!(code, 200, "{body}");
    let scrape = samples(&body);
    println!(
        "scrape: {} series of {} metrics",
        scrape.len(),
        scrape
            .keys()
            .map(|(n, _)| n)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );

    let mut failures = Vec::new();
    for (place, expr) in &queries {
        let problems = query_problems(expr, &scrape);
        if problems.is_empty() {
            println!("ok: {place}: {expr}");
        } else {
            failures.push(format!("{place}: {expr}\n  {}", problems.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries that find nothing in the scrape:\n{}\n\nscrape:\n{body}",
        failures.join("\n")
    );

    // Each query with its first metric misspelled finds nothing.
    for (place, expr) in &queries {
        let metric = &selectors(expr)[0].metric;
        let typo = expr.replacen(metric.as_str(), &format!("{metric}_typo"), 1);
        assert!(
            !query_problems(&typo, &scrape).is_empty(),
            "{place}: the misspelled {typo} passes the check"
        );
    }
}
