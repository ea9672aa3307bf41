//! `lbctl` against the maps pinned by a real agent in the lab, read while the agent is down.
use std::process::Command;

use lb_tests::{lab::bin_path, scenario::start_example};
use serde_json::Value;

fn lbctl(bpffs: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("lbctl").unwrap())
        .arg("--bpffs")
        .arg(bpffs)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn json(bpffs: &std::path::Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let (code, out, err) = lbctl(bpffs, &a);
    assert_eq!(code, 0, "lbctl {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn lab_lbctl_reads_the_live_maps_with_the_agent_down() {
    let Some(mut s) = start_example() else { return };
    s.lab.client_route("203.0.113.10/32", "node1").unwrap();
    let held = s.lab.hold("client", "203.0.113.10:80").unwrap();
    let first = held.first.clone().unwrap();
    assert!(first.ok, "{first:?}");
    let client = first.seen_peer.clone().unwrap(); // Local policy: the backend saw the client itself
    let sticky = s
        .lab
        .run_client("client", &["tcp", "192.168.100.1:30100", "--count", "5"])
        .unwrap();
    let sticky_backend = s
        .lab
        .pod(sticky[0].backend.as_deref().unwrap())
        .addr
        .to_string()
        + ":8080";

    // The agent stops; its programs and maps stay pinned.
    s.agents[0].stop_with(libc::SIGTERM).unwrap();
    let bpffs = s.lab.node("node1").bpffs.clone();

    let services = json(&bpffs, &["services", "--frontend", "203.0.113.10:80"]);
    let ext: Vec<&Value> = services
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["scope"] == "external" && f["protocol"] == "TCP")
        .collect();
    assert_eq!(ext.len(), 1, "{services}");
    assert_eq!(ext[0]["backends"], serde_json::json!(["10.244.1.10:8080"]));

    // Filter by Service: every frontend of web-local (ClusterIP, NodePorts, LB IP; both scopes).
    let web = json(&bpffs, &["services", "--service", "default/web-local"]);
    let web = web.as_array().unwrap();
    assert!(
        web.iter().all(|f| f["service"]
            .as_str()
            .unwrap()
            .starts_with("default/web-local:")),
        "{web:?}"
    );
    let fronts: std::collections::BTreeSet<&str> = web
        .iter()
        .map(|f| f["frontend"].as_str().unwrap())
        .collect();
    assert_eq!(
        fronts,
        ["10.96.0.40:80", "192.168.100.1:30080", "203.0.113.10:80"]
            .into_iter()
            .collect(),
        "{web:?}"
    );
    let tcp_only = json(&bpffs, &["services", "--service", "default/web-local:tcp"]);
    assert!(tcp_only
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["protocol"] == "TCP"));
    assert_eq!(tcp_only.as_array().unwrap().len(), web.len() / 2);

    let ct = json(&bpffs, &["conntrack", "--filter", &client]);
    let dirs: Vec<&str> = ct
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["direction"].as_str().unwrap())
        .collect();
    assert!(
        dirs.contains(&"original") && dirs.contains(&"reply"),
        "{ct}"
    );
    // An IPv4 client's flow, in the IPv4 tiers.
    assert!(
        ct.as_array().unwrap().iter().all(|e| e["family"] == "IPv4"),
        "{ct}"
    );

    let cfg = json(&bpffs, &["config"]);
    assert_eq!(cfg[0]["node_address"], "192.168.100.1");
    assert_eq!(cfg[0]["ready"], true);
    // The IPv6 address field is there (null on a node without one).
    assert!(cfg[0].get("node_address6").is_some(), "{cfg}");

    let aff = json(&bpffs, &["affinity"]);
    let rec = aff
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client"] == "192.168.100.100")
        .expect("client record");
    assert_eq!(rec["backend"], sticky_backend.as_str());

    let l = json(
        &bpffs,
        &[
            "lookup",
            "--frontend",
            "203.0.113.10:80/TCP",
            "--client",
            &client,
        ],
    );
    assert_eq!(
        (l["reason"].as_str(), l["backend"].as_str()),
        (Some("conntrack"), Some("10.244.1.10:8080")),
        "{l}"
    );
    let l = json(
        &bpffs,
        &[
            "lookup",
            "--frontend",
            "192.168.100.1:30100/TCP",
            "--client",
            "192.168.100.100",
        ],
    );
    assert_eq!(
        (l["reason"].as_str(), l["backend"].as_str()),
        (Some("affinity"), Some(sticky_backend.as_str())),
        "{l}"
    );
    let l = json(
        &bpffs,
        &[
            "lookup",
            "--frontend",
            "192.168.100.1:30100/TCP",
            "--client",
            "192.168.100.250",
        ],
    );
    assert_eq!(l["reason"], "fresh choice");
    assert_eq!(l["candidates"].as_array().unwrap().len(), 3);
    let l = json(
        &bpffs,
        &[
            "lookup",
            "--frontend",
            "10.96.0.30:80/TCP",
            "--client",
            "10.244.1.10",
        ],
    );
    assert_eq!(l["reason"], "no backend");
    let l = json(
        &bpffs,
        &[
            "lookup",
            "--frontend",
            "10.1.2.3:80/TCP",
            "--client",
            "10.244.1.10",
        ],
    );
    assert_eq!(l["reason"], "not a frontend");

    // The default output is an aligned table.
    let (code, out, _) = lbctl(&bpffs, &["conntrack"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().next().unwrap().starts_with("BACKEND_ID"),
        "{out}"
    );
    let (_, out, _) = lbctl(&bpffs, &["stats"]);
    assert!(out.contains("affinity_evictions"));

    // A map of another layout version is named as such.
    let other = bpffs.with_file_name(format!(
        "{}-old",
        bpffs.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&other).unwrap();
    std::fs::hard_link(
        bpffs.join(lb_common::map_name::FRONTENDS),
        other.join("lb_svc_v1"),
    )
    .unwrap();
    let (code, _, err) = lbctl(&other, &["services"]);
    std::fs::remove_dir_all(&other).unwrap();
    assert_eq!(code, 2);
    let want = format!(
        "map {} not found, but lb_svc_v1 is: pinned by an agent of another layout version",
        lb_common::map_name::FRONTENDS
    );
    assert!(err.contains(&want), "{err}");
}

/// `lbctl status` against a running agent (its lock held, /healthz answering, counters moving
/// under traffic), then with the agent down; `-o yaml` is the JSON's content; `-o wide` adds
/// columns.
#[test]
fn lab_lbctl_status_yaml_and_wide() {
    let Some(mut s) = lb_tests::scenario::start_example_with(&["--health-addr", "0.0.0.0:10256"])
    else {
        return;
    };
    let bpffs = s.lab.node("node1").bpffs.clone();
    // Traffic during the status's interval, so that rates move; /healthz of the agent asked
    // from node1's namespace, where lbctl runs.
    let netns = s.lab.node("node1").netns.clone();
    // The traffic runs until the status is taken: a fixed count finished before the interval
    // began on a fast machine, and no rate moved.
    let done = std::sync::atomic::AtomicBool::new(false);
    let st = std::thread::scope(|sc| {
        let traffic = sc.spawn(|| {
            let mut all = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                all.extend(
                    s.lab
                        .run_client("a1", &["tcp", "10.96.0.10:80", "--count", "100"])
                        .unwrap(),
                );
            }
            all
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        let b = bpffs.clone();
        let st = lb_tests::scenario::in_netns(&netns, move || {
            json(
                &b,
                &[
                    "status",
                    "--health-addr",
                    "192.168.100.1:10256",
                    "--interval-ms",
                    "1000",
                ],
            )
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        lb_tests::lab::all_ok(&traffic.join().unwrap(), "traffic during lbctl status");
        st
    });
    assert_eq!(st["agent_running"], true, "{st}");
    assert_eq!(st["health"]["status"], 200, "{st}");
    assert!(st["health"]["body"]["lastUpdated"].is_u64(), "{st}");
    assert!(st["map_memory_bytes"].as_u64().unwrap() > 0);
    let services = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == "services")
        .unwrap()
        .clone();
    assert!(services["entries"].as_u64().unwrap() > 0, "{st}");
    let moving: Vec<&str> = st["rates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["packets_per_second"].as_f64().unwrap() > 0.0)
        .map(|r| r["counter"].as_str().unwrap())
        .collect();
    assert!(moving.contains(&"sock_connect_xlate"), "{st}");
    // The one screen.
    let (code, text, err) = lbctl(
        &bpffs,
        &["status", "--health-addr", "none", "--interval-ms", "10"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        text.starts_with("agent:      running (holds the pin directory)"),
        "{text}"
    );
    assert!(text.contains("MAP") && text.contains("FILL"), "{text}");
    // YAML is the JSON's content.
    let (code, yaml, err) = lbctl(&bpffs, &["services", "-o", "yaml"]);
    assert_eq!(code, 0, "{err}");
    let from_yaml: Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(from_yaml, json(&bpffs, &["services"]));
    let (_, wide, _) = lbctl(&bpffs, &["services", "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("REV_NAT"), "{wide}");
    let (_, narrow, _) = lbctl(&bpffs, &["services"]);
    assert!(
        !narrow.lines().next().unwrap().contains("REV_NAT"),
        "{narrow}"
    );
    // With the agent gone.
    s.agents[0].stop_with(libc::SIGTERM).unwrap();
    let st = json(
        &bpffs,
        &["status", "--health-addr", "none", "--interval-ms", "10"],
    );
    assert_eq!(st["agent_running"], false, "{st}");
}
