//! Operations end to end: a real scrape of the agent's /metrics after real traffic, node health
//! on /healthz and /livez (each on its own address), and JSON logs.
use std::collections::BTreeMap;

use lb_tests::scenario::{http_get, start_example_with};
use lb_userspace::agent::metrics::MAP_READ_INTERVAL;

/// Parses Prometheus/OpenMetrics text into `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

#[test]
fn lab_metrics_move_with_real_traffic_and_health_follows_the_dataplane() {
    let Some(s) = start_example_with(&[
        "--metrics-addr",
        "0.0.0.0:9464",
        "--health-addr",
        "0.0.0.0:10256",
        "--log-format",
        "json",
    ]) else {
        return;
    };
    s.lab.client_route("203.0.113.10/32", "node1").unwrap();
    let ex = s
        .lab
        .run_client("client", &["tcp", "203.0.113.10:80", "--count", "25"])
        .unwrap();
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
    let ex = s
        .lab
        .run_client("a1", &["tcp", "10.96.0.10:80", "--count", "25"])
        .unwrap();
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
    // The socket-level refusals before the connects to the unready Service (a ClusterIP without
    // ready endpoints: connect4 refuses each connect from a1, on node1, whose agent is scraped).
    let (_, _, body) = http_get(&s.lab.client_netns, "192.168.100.1:9464", "/metrics");
    let refused_before = *samples(&body)
        .get(r#"lb_datapath_events_total{counter="sock_no_backend"}"#)
        .unwrap_or_else(|| panic!("no sock_no_backend sample in\n{body}"));
    let ex = s
        .lab
        .run_client(
            "a1",
            &[
                "tcp",
                "10.96.0.30:80",
                "--count",
                "4",
                "--timeout-ms",
                "500",
            ],
        )
        .unwrap();
    assert!(ex.iter().all(|e| !e.ok), "{ex:?}");

    // The agent reads its maps for /metrics at most once per MAP_READ_INTERVAL: scrapes closer
    // together repeat the last reading.
    std::thread::sleep(MAP_READ_INTERVAL);
    let (code, headers, body) = http_get(&s.lab.client_netns, "192.168.100.1:9464", "/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(headers["Content-Type"].contains("text"), "{headers:?}");
    let m = samples(&body);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample {k} in\n{body}"))
    };
    assert!(get(r#"lb_datapath_events_total{counter="xdp_new_flow"}"#) >= 25.0);
    // The local backend's replies, translated by tc ingress on cni0 (node1 hooks its pod
    // bridge) or tc egress on eth0.
    assert!(
        get(r#"lb_datapath_events_total{counter="tc_reply"}"#)
            + get(r#"lb_datapath_events_total{counter="xdp_reply"}"#)
            >= 25.0
    );
    assert_eq!(get(r#"lb_interface_hooked{interface="cni0"}"#), 1.0);
    assert_eq!(get("lb_masquerade_local_backends"), 0.0);
    assert!(get(r#"lb_datapath_events_total{counter="sock_connect_xlate"}"#) >= 25.0);
    assert!(get(r#"lb_map_entries{map="conntrack"}"#) >= 2.0);
    assert_eq!(get(r#"lb_map_capacity{map="conntrack"}"#), 262144.0);
    assert!(get(r#"lb_map_entries{map="services"}"#) > 0.0);
    assert!(get("lb_sync_duration_seconds_count") >= 1.0);
    assert!(get("lb_map_writes_total") > 0.0);
    assert_eq!(get("lb_sync_errors_total"), 0.0);
    assert_eq!(
        get(r#"lb_service_local_endpoints{namespace="default",name="web-local"}"#),
        1.0
    );
    assert!(get("lb_last_sync_timestamp_seconds") > 1.0e9);
    // Per Service port: XDP flows with their packets and bytes, socket-level connections, drops.
    let web = r#"namespace="default",name="web-local",port="tcp",protocol="TCP""#;
    assert!(
        get(&format!("lb_service_new_connections_total{{{web}}}")) >= 25.0,
        "{body}"
    );
    // Each exchange: SYN, ACK, data, FIN, ACK at least, all through XDP.
    assert!(
        get(&format!("lb_service_packets_total{{{web}}}")) >= 100.0,
        "{body}"
    );
    assert!(
        get(&format!("lb_service_bytes_total{{{web}}}")) >= 100.0 * 54.0,
        "{body}"
    );
    let echo = r#"namespace="default",name="echo",port="tcp",protocol="TCP""#;
    assert!(
        get(&format!("lb_service_new_connections_total{{{echo}}}")) >= 25.0,
        "{body}"
    );
    let unready = r#"namespace="default",name="unready",port="tcp",protocol="TCP""#;
    assert_eq!(
        get(&format!(
            r#"lb_service_drops_total{{{unready},reason="no_backend"}}"#
        )),
        4.0,
        "{body}"
    );
    // connect4 counted each of the 4 refused connects (LbClusterIPNoBackend watches this).
    assert!(
        get(r#"lb_datapath_events_total{counter="sock_no_backend"}"#) >= refused_before + 4.0,
        "{refused_before} before the connects\n{body}"
    );
    // A second scrape after more traffic shows the counters moved.
    s.lab
        .run_client("client", &["tcp", "203.0.113.10:80", "--count", "5"])
        .unwrap();
    std::thread::sleep(MAP_READ_INTERVAL);
    let (_, _, body2) = http_get(&s.lab.client_netns, "192.168.100.1:9464", "/metrics");
    let m2 = samples(&body2);
    assert!(
        m2[r#"lb_datapath_events_total{counter="xdp_new_flow"}"#]
            >= get(r#"lb_datapath_events_total{counter="xdp_new_flow"}"#) + 5.0
    );

    for path in ["/healthz", "/livez"] {
        let (code, _, body) = http_get(&s.lab.client_netns, "192.168.100.2:10256", path);
        assert_eq!(code, 200, "{path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["healthy"], true);
    }
    // /metrics is on --metrics-addr only, /healthz and /livez on --health-addr only.
    let (code, _, _) = http_get(&s.lab.client_netns, "192.168.100.2:10256", "/metrics");
    assert_eq!(code, 404);
    let (code, _, _) = http_get(&s.lab.client_netns, "192.168.100.2:9464", "/healthz");
    assert_eq!(code, 404);
    // Logs are JSON objects, one per line.
    let log = s.agents[0].log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{l}"
        );
    }
}
