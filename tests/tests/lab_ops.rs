//! Operations end to end: a real scrape of the agent's /metrics after real traffic, node health
//! on /healthz and /livez (each on its own address), and JSON logs.
use std::collections::BTreeMap;

use std::{
    io::Write,
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_tests::scenario::{example_manifests, http_get, in_netns, start_example_with};
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
    s.lab.all_fail("a1", "tcp", "10.96.0.30:80", 4, 500);

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
    // A preallocated map costs its entries from the start: at least key + value per entry.
    assert!(get(r#"lb_map_memory_bytes{map="lb_svc_v3"}"#) >= 262144.0 * 44.0);
    assert_eq!(get("lb_frontends_deferred"), 0.0);
    // kube-proxy's change and programming metrics, build info, process metrics.
    assert!(get("lb_sync_proxy_rules_endpoint_changes_total") >= 1.0);
    assert!(get("lb_sync_proxy_rules_service_changes_total") >= 1.0);
    assert!(get("lb_network_programming_duration_seconds_count") >= 1.0);
    assert!(get("process_resident_memory_bytes") > 0.0);
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
    let web = r#"namespace="default",name="web-local",port="tcp",protocol="TCP",ip_family="IPv4""#;
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
    let echo = r#"namespace="default",name="echo",port="tcp",protocol="TCP",ip_family="IPv4""#;
    assert!(
        get(&format!("lb_service_new_connections_total{{{echo}}}")) >= 25.0,
        "{body}"
    );
    let unready =
        r#"namespace="default",name="unready",port="tcp",protocol="TCP",ip_family="IPv4""#;
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

/// Connections that a one-at-a-time server would serve forever, opened from the client's
/// namespace on `addr`: 100 idle ones, one that asks for `path` and never reads the answer, and
/// one that sends a request head a byte a second and never finishes it (until `stop`).
fn hog(ns: &str, addr: &'static str, path: &'static str, stop: Arc<AtomicBool>) -> Vec<TcpStream> {
    let (idle, mut slow) = in_netns(ns, move || {
        let mut idle: Vec<TcpStream> = (0..100)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let mut unread = TcpStream::connect(addr).unwrap();
        write!(unread, "GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").unwrap();
        idle.push(unread);
        (idle, TcpStream::connect(addr).unwrap())
    });
    std::thread::spawn(move || {
        for b in b"GET /healthz HTTP/1.1\r\nHost: a-slow-client\r\n"
            .iter()
            .cycle()
        {
            if stop.load(Ordering::Relaxed) || slow.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    idle
}

/// The review's failure: slow and idle clients on every HTTP port of the agent (health, metrics,
/// a healthCheckNodePort) held /livez, and closing the healthCheckNodePort froze the agent's
/// loop. Now /healthz, /livez and the health check answer while they are connected, and the
/// Service's removal (its port closes under the clients) is synced at once.
#[test]
fn lab_health_answers_and_the_loop_syncs_while_clients_hog_every_http_port() {
    let Some(mut s) = start_example_with(&[
        "--metrics-addr",
        "0.0.0.0:9464",
        "--health-addr",
        "0.0.0.0:10256",
    ]) else {
        return;
    };
    let ns = s.lab.client_netns.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&ns, "192.168.100.1:10256", "/healthz").0 != 200 {
        assert!(Instant::now() < deadline, "never healthy");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _held: Vec<_> = [
        ("192.168.100.1:10256", "/healthz"),
        ("192.168.100.1:9464", "/metrics"),
        ("192.168.100.1:32080", "/"),
    ]
    .into_iter()
    .flat_map(|(addr, path)| hog(&ns, addr, path, stop.clone()))
    .collect();
    for (addr, path, want) in [
        ("192.168.100.1:10256", "/healthz", 200),
        ("192.168.100.1:10256", "/livez", 200),
        ("192.168.100.1:32080", "/", 200),
        ("192.168.100.1:9464", "/metrics", 200),
    ] {
        let started = Instant::now();
        let (code, _, body) = http_get(&ns, addr, path);
        let took = started.elapsed();
        println!(
            "{addr}{path} with 100 idle, 1 slow, 1 non-reading connections on each port: {took:?}"
        );
        assert_eq!(code, want, "{addr}{path}: {body}");
    }
    // The Service with the healthCheckNodePort goes: its port closes with the clients attached
    // (the slow one still sending), and the loop goes on.
    let text: Vec<String> = example_manifests()
        .split("\n---\n")
        .filter(|d| !(d.contains("kind: Service\n") && d.contains("name: web-local,")))
        .map(str::to_string)
        .collect();
    assert_eq!(text.len() + 1, example_manifests().split("\n---\n").count());
    s.apply(&text.join("\n---\n"), 2);
    let refused = in_netns(&ns, || {
        TcpStream::connect("192.168.100.1:32080").map(|_| ())
    });
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    assert_eq!(http_get(&ns, "192.168.100.1:10256", "/healthz").0, 200);
    stop.store(true, Ordering::Relaxed);
}
