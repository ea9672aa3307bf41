//! Every alert in deploy/monitoring/prometheusrule.yaml watches something a test makes move, so
//! that no alert is written against a series that never changes.
//!
//! - Datapath counters (`lb_datapath_events_total{counter="..."}`): some row of the packet-fixture
//!   tables (tests/src/fixture) expects the counter to move; the kernel tests run those rows
//!   (kernel_xdp_fixtures, kernel_tc_fixtures). Counters of the socket-level programs, which
//!   BPF_PROG_TEST_RUN cannot run, need an assertion on the series in a lab test instead (an
//!   `assert!`/`assert_eq!`/`assert_ne!` in tests/tests/lab_*.rs naming the series).
//! - The agent's own metrics (sync, watch, map occupancy, local endpoints): the kernel test below
//!   drives the real metrics code over real pinned maps through what the agent's loop does (a
//!   sync, a flow through XDP, a packet XDP drops for a Local Service port without a local
//!   endpoint, the plan's topology hints, a conntrack sweep and a failed one, a failed sync,
//!   watch restarts, health entries) and requires every
//!   series an alert selects to move between two scrapes.
//! - `up` is Prometheus' own: 1 while the agent's /metrics answers, which the same test checks.
//!
//! An alert on a counter without such evidence fails the test (a unit test below checks that the
//! check does fail).
use std::collections::BTreeMap;

use lb_tests::monitoring::{samples, selectors, Selector};
use serde_json::Value;

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/monitoring/prometheusrule.yaml"
);
const DATAPATH_EVENTS: &str = "lb_datapath_events_total";

// ---- the alerts and what their expressions select ----

/// One alert: its name and the series selectors of its expression.
struct Alert {
    name: String,
    selectors: Vec<Selector>,
}

fn alerts() -> Vec<Alert> {
    let text = std::fs::read_to_string(RULES).unwrap_or_else(|e| panic!("{RULES}: {e}"));
    alerts_in(&text, RULES)
}

/// The alerts of a PrometheusRule document (`source` names it in failures).
fn alerts_in(text: &str, source: &str) -> Vec<Alert> {
    let rule: Value = serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{source}: {e}"));
    let mut out = Vec::new();
    for g in rule["spec"]["groups"].as_array().expect("spec.groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"].as_str().expect("alert").to_string();
            let expr = r["expr"].as_str().unwrap_or_else(|| panic!("{name}: expr"));
            out.push(Alert {
                selectors: selectors(expr),
                name,
            });
        }
    }
    assert!(!out.is_empty(), "{source}: no alerts");
    out
}

// ---- datapath counters: fixture rows ----

/// The assertions of the lab tests on `lb_datapath_events_total{counter="<counter>"}`:
/// `assert!`, `assert_eq!` and `assert_ne!` statements (up to the `;` that ends them, however
/// rustfmt wraps them) that name the series; as `file:line`.
fn lab_assertions(counter: &str) -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
    let needle = format!(r#"{DATAPATH_EVENTS}{{counter="{counter}"}}"#);
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("lab_") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for line in assertions_naming(&text, &needle) {
            out.push(format!("tests/tests/{name}:{line}"));
        }
    }
    out
}

/// The lines where the assertion statements of `text` that contain `needle` start.
fn assertions_naming(text: &str, needle: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices("assert") {
        let rest = &text[at..];
        let macro_call = ["assert!(", "assert_eq!(", "assert_ne!("]
            .iter()
            .any(|m| rest.starts_with(m));
        let word_start = text[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if !(macro_call && word_start) {
            continue;
        }
        let statement = &rest[..rest.find(';').unwrap_or(rest.len())];
        if statement.contains(needle) {
            out.push(text[..at].matches('\n').count() + 1);
        }
    }
    out
}

#[test]
fn lab_assertions_are_found_however_wrapped() {
    let needle = r#"lb_datapath_events_total{counter="x"}"#;
    let text = r##"
    let v = get(r#"lb_datapath_events_total{counter="x"}"#); // not in an assert statement
    assert!(get(r#"lb_datapath_events_total{counter="x"}"#) >= 1.0);
    assert!(
        get(r#"lb_datapath_events_total{counter="x"}"#) >= before + 4.0,
        "{body}"
    );
    debug_assert!(get(r#"lb_datapath_events_total{counter="x"}"#) >= 1.0);
    assert_eq!(get(r#"lb_datapath_events_total{counter="y"}"#), 0.0);
"##;
    assert_eq!(assertions_naming(text, needle), [3, 4]);
}

/// For every datapath counter the alerts name, the evidence that something moves it: the
/// fixture rows that expect it to move (`moved`), or for a socket-level counter the lab
/// assertions on its series (`lab`). Returns the evidence found and the alerts' counters
/// without any.
fn datapath_evidence(
    alerts: &[Alert],
    moved: &BTreeMap<&'static str, Vec<String>>,
    lab: impl Fn(&str) -> Vec<String>,
) -> (Vec<String>, Vec<String>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for a in alerts {
        for s in a.selectors.iter().filter(|s| s.metric == DATAPATH_EVENTS) {
            let counters = s
                .labels
                .get("counter")
                .unwrap_or_else(|| panic!("{}: {DATAPATH_EVENTS} without a counter", a.name));
            for c in counters {
                assert!(
                    lb_common::counter::NAMES.contains(&c.as_str()) || c == "affinity_evictions",
                    "{}: no counter {c}",
                    a.name
                );
                // Socket-level counters: only the lab runs their programs.
                let evidence = match moved.get(c.as_str()) {
                    Some(rows) => rows.clone(),
                    None if c.starts_with("sock_") => lab(c),
                    None => Vec::new(),
                };
                if evidence.is_empty() {
                    missing.push(format!(
                        "{}: no fixture row expects {c} to move (add a row to tests/src/fixture/*_table.rs{})",
                        a.name,
                        if c.starts_with("sock_") { ", or for a socket-level counter an assertion in a lab test" } else { "" }
                    ));
                } else {
                    found.push(format!("{}: {c}: {}", a.name, evidence.join("; ")));
                }
            }
        }
    }
    (found, missing)
}

#[test]
fn alerted_datapath_counters_are_moved_by_fixture_rows() {
    let moved = lb_tests::fixture::counters_moved_by_rows();
    let (found, missing) = datapath_evidence(&alerts(), &moved, lab_assertions);
    for f in &found {
        println!("{f}");
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// The check above fails for an alert on a counter nothing moves, on the real evidence: the
/// fixture tables and the lab tests as they are.
#[test]
fn an_alert_on_a_counter_nothing_moves_fails_the_check() {
    // xdp_frontend_pass is retired (always 0); no lab test asserts on sock_backend_missing
    // (should one ever do, name another socket-level counter here).
    let rules = r#"
spec:
  groups:
    - name: test
      rules:
        - alert: Moved
          expr: lb_datapath_events_total{counter=~"xdp_drop_ct_full|sock_no_backend"} > 0
        - alert: NeverMoved
          expr: lb_datapath_events_total{counter=~"xdp_frontend_pass|sock_backend_missing"} > 0
"#;
    let moved = lb_tests::fixture::counters_moved_by_rows();
    let (found, missing) =
        datapath_evidence(&alerts_in(rules, "test rules"), &moved, lab_assertions);
    let counters = |v: &[String]| -> Vec<String> {
        v.iter()
            .map(|l| l.split(": ").take(2).collect::<Vec<_>>().join(": "))
            .collect()
    };
    assert_eq!(
        counters(&found),
        ["Moved: xdp_drop_ct_full", "Moved: sock_no_backend"],
        "{found:?}"
    );
    assert_eq!(missing.len(), 2, "{missing:?}");
    assert!(missing[0].starts_with("NeverMoved: no fixture row expects xdp_frontend_pass"));
    assert!(missing[1].starts_with("NeverMoved: no fixture row expects sock_backend_missing"));
    assert!(missing[1].contains("an assertion in a lab test"));
}

// ---- the agent's metrics: moved by the real metrics code ----

#[test]
fn kernel_alerted_agent_metrics_move() {
    use lb_tests::fixture::{frames::*, xdp_table::north_south_setup};
    use lb_tests::harness::XdpHarness;
    use lb_userspace::agent::{health_check::HealthEntry, metrics::Ops};

    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let mut h = XdpHarness::new().expect("loading the XDP program into the kernel");
    // Two scrapes around the changes below: read the maps for each (the agent reads them at
    // most once per MAP_READ_INTERVAL).
    let ops = Ops::new(h.pin_dir().to_path_buf()).with_map_read_interval(std::time::Duration::ZERO);
    let before = samples(&ops.metrics().body);

    // What the agent's loop does: a sync (config, frontends, backends) ...
    let mut setup = north_south_setup((61000, 65535));
    // The Local Service port without a local endpoint, named as the plan names Service ports
    // (the per-Service metrics' labels).
    let no_local = lb_userspace::control::desired::FrontendKey {
        addr: std::net::SocketAddr::V4(std::net::SocketAddrV4::new(LB_IP.into(), 81)),
        proto: lb_common::proto::TCP,
        scope: lb_common::scope::EXTERNAL,
    };
    setup
        .desired
        .get_mut(&no_local)
        .expect("the setup's Local frontend without endpoints")
        .service_port = "default/web-local:http/TCP".into();
    h.set_config(setup.config.as_ref().unwrap()).unwrap();
    let writes = h.program(&setup.desired).unwrap();
    ops.synced(std::time::Duration::from_millis(3), writes);
    ops.service_ports(h.syncer.service_ports());
    // The plan's topology hints: a Service port whose hints this node cannot use.
    let hinted = lb_userspace::control::plan::ServicePortPlan {
        namespace: "default".into(),
        name: "web-hinted".into(),
        port_name: "http".into(),
        protocol: lb_userspace::control::model::Protocol::TCP,
        family: lb_userspace::control::model::IpFamily::IPv4,
        frontends: Vec::new(),
        internal_traffic_policy: lb_userspace::control::model::TrafficPolicy::Cluster,
        external_traffic_policy: None,
        cluster_endpoints: Some(Vec::new()),
        local_endpoints: None,
        session_affinity_timeout_seconds: None,
        health_check_node_port: None,
        has_endpoints: true,
        topology_hints: lb_userspace::control::plan::TopologyHints::Unusable,
        source_ranges: None,
        source_ranges_allow_node: false,
        created: None,
    };
    ops.topology_hints(&[hinted]);
    // ... traffic: a flow to a remote backend, confirmed (established conntrack entries): the
    // client's SYN, the backend's SYN-ACK to the SNAT port, the client's ACK of it ...
    let syn = h
        .run(&frame(Kind::Syn, (CLIENT, 40000), (NODE, 30081)))
        .unwrap();
    assert_eq!(syn.verdict, lb_tests::fixture::action::XDP_PASS);
    let port = u16::from_be_bytes([syn.output[14 + 20], syn.output[14 + 21]]);
    for f in [
        frame(Kind::SynAck, (REMOTE_POD, 8080), (NODE, port)),
        frame(Kind::Ack, (CLIENT, 40000), (NODE, 30081)),
    ] {
        let r = h.run(&f).unwrap();
        assert_eq!(r.verdict, lb_tests::fixture::action::XDP_PASS);
    }
    // ... external traffic to the Local Service port this node has no endpoint for (dropped) ...
    let r = h
        .run(&frame(Kind::Syn, (CLIENT, 40001), (LB_IP, 81)))
        .unwrap();
    assert_eq!(r.verdict, lb_tests::fixture::action::XDP_DROP);
    // ... the conntrack sweep thread: started, one sweep over the real maps, one that failed ...
    ops.ct_gc_started(std::time::Duration::from_secs(5));
    let tiers = lb_userspace::dataplane::pinned::open_conntrack(h.pin_dir()).unwrap();
    let swept = lb_userspace::dataplane::ct_gc::sweep(
        &tiers,
        lb_userspace::dataplane::read::boot_seconds(),
    )
    .unwrap();
    assert!(
        swept.examined >= 2,
        "the flow's entries were read: {swept:?}"
    );
    ops.ct_swept(&swept);
    ops.ct_gc_failed();
    // ... a sync that failed, watches that re-listed, this node's health ports.
    ops.sync_failed();
    ops.watch_restarts(3);
    let health = [(
        32000,
        HealthEntry {
            namespace: "default".into(),
            name: "web-local".into(),
            local_endpoints: 0,
        },
    )]
    .into();
    ops.local_endpoints(&health);

    let scrape = ops.metrics();
    // Prometheus' `up` is 1 while the scrape succeeds.
    assert_eq!(scrape.status, "200 OK", "{}", scrape.body);
    let after = samples(&scrape.body);
    // LbLocalServiceTrafficWithoutLocalEndpoint joins the drops of a Service with its local
    // endpoints on (namespace, name): the real series carry the same pair.
    let web_local = |metric: &str| -> Vec<f64> {
        after
            .iter()
            .filter(|((name, l), _)| {
                name == metric
                    && l.get("namespace").map(String::as_str) == Some("default")
                    && l.get("name").map(String::as_str) == Some("web-local")
                    && l.get("reason").is_none_or(|r| r == "no_backend")
            })
            .map(|(_, v)| *v)
            .collect()
    };
    assert_eq!(
        web_local("lb_service_drops_total"),
        [1.0],
        "{}",
        scrape.body
    );
    assert_eq!(
        web_local("lb_service_local_endpoints"),
        [0.0],
        "{}",
        scrape.body
    );
    let mut failures = Vec::new();
    for a in alerts() {
        for s in &a.selectors {
            if s.metric == "up" {
                continue; // the scrape above
            }
            // Every combination of the selected label values is a series the alert watches.
            let mut wanted: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
            for (label, values) in &s.labels {
                if label == "job" || label == "node" {
                    continue; // target labels Prometheus adds
                }
                wanted = wanted
                    .into_iter()
                    .flat_map(|w| {
                        values.iter().map(move |v| {
                            let mut w = w.clone();
                            w.insert(label.clone(), v.clone());
                            w
                        })
                    })
                    .collect();
            }
            for w in wanted {
                let matching: Vec<_> = after
                    .iter()
                    .filter(|((name, labels), _)| {
                        *name == s.metric && w.iter().all(|(k, v)| labels.get(k) == Some(v))
                    })
                    .collect();
                let what = format!("{}: {}{w:?}", a.name, s.metric);
                if matching.is_empty() {
                    failures.push(format!("{what}: not exported"));
                    continue;
                }
                if s.metric == DATAPATH_EVENTS {
                    // Exported from the stats map; the fixture tables move it (test above).
                    continue;
                }
                if s.metric == "lb_map_capacity" {
                    // A constant: exported, and not zero.
                    if matching.iter().any(|(_, v)| **v <= 0.0) {
                        failures.push(format!("{what}: capacity {matching:?}"));
                    }
                    continue;
                }
                let moved = matching.iter().any(|(k, v)| before.get(*k) != Some(*v));
                if moved {
                    println!(
                        "{what}: moved: {:?}",
                        matching
                            .iter()
                            .map(|(k, v)| (&k.1, before.get(*k), **v))
                            .collect::<Vec<_>>()
                    );
                } else {
                    failures.push(format!("{what}: did not move ({matching:?})"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
