//! loadBalancerSourceRanges in the lab, as kube-proxy's firewall: a LoadBalancer Service whose
//! ranges admit the external client is served to it; once they no longer do, its SYNs and
//! datagrams to the LoadBalancer IP are dropped on node1's north-south path (XDP or tc ingress,
//! by lab variant) and counted (`source_range_denied`, `lb_datapath_events_total`, the Service
//! port's `lb_service_drops_total{reason="source_range"}`), while its NodePort keeps working.
//! In-node clients (node1's host, unbound sockets, so a node address will be their source) are
//! refused at connect/sendmsg while no node address is in the ranges and served once one is
//! (kube-proxy's allowFromNode); the NodePort is never filtered for them either. A pod's socket
//! bound to its own address is judged by that address.
use lb_tests::{
    lab::{all_ok, Exchange},
    on_both_variants,
    scenario::{fenced_manifests, http_get, start_example_on_with},
    Variant,
};

const LB: &str = "203.0.113.20:80";
const NODE_PORT: &str = "192.168.100.1:30110";

fn served(ex: &[Exchange], what: &str) {
    all_ok(ex, what);
    assert!(
        ex.iter().all(|e| e.backend.as_deref() == Some("a1")),
        "{what}: {ex:?}"
    );
}

fn none_served(ex: &[Exchange], what: &str) {
    assert!(!ex.is_empty() && ex.iter().all(|e| !e.ok), "{what}: {ex:?}");
}

fn source_ranges_fence_the_load_balancer_ip(v: Variant) {
    let Some(mut s) = start_example_on_with(v, &["--metrics-addr", "0.0.0.0:9464"]) else {
        return;
    };
    s.lab.client_route("203.0.113.20/32", "node1").unwrap();
    let client = |s: &lb_tests::scenario::Running, proto: &str, target: &str, n: &str| {
        s.lab
            .run_client(
                "client",
                &[proto, target, "--count", n, "--timeout-ms", "1000"],
            )
            .unwrap()
    };
    let host = |s: &lb_tests::scenario::Running, proto: &str, target: &str| {
        s.lab
            .run_client(
                "node1",
                &[proto, target, "--count", "3", "--timeout-ms", "1000"],
            )
            .unwrap()
    };

    // The client's own address is the range; node1's is not.
    s.apply(&fenced_manifests("[192.168.100.100/32]"), 2);
    for proto in ["tcp", "udp"] {
        served(
            &client(&s, proto, LB, "10"),
            &format!("{proto} client in range"),
        );
        served(
            &client(&s, proto, NODE_PORT, "5"),
            &format!("{proto} NodePort"),
        );
        let refused = host(&s, proto, LB);
        none_served(
            &refused,
            &format!("{proto} node1 host, no node address in range"),
        );
        assert!(
            refused.iter().all(|e| e
                .error
                .as_deref()
                .is_some_and(|m| m.contains("PermissionDenied"))),
            "refused at once by the socket-level program: {refused:?}"
        );
        served(
            &host(&s, proto, NODE_PORT),
            &format!("{proto} node1 host NodePort"),
        );
    }
    // A pod whose socket is bound to its own address is judged by it (sendmsg4's source):
    // outside the range here, inside 10.0.0.0/8 below.
    let bound = |s: &lb_tests::scenario::Running| {
        s.lab
            .run_client(
                "a2",
                &[
                    "udp",
                    LB,
                    "--count",
                    "3",
                    "--timeout-ms",
                    "1000",
                    "--bind",
                    "10.244.1.11",
                ],
            )
            .unwrap()
    };
    none_served(&bound(&s), "udp a2 bound to its address, outside");
    let before = s.stats("node1")["source_range_denied"];
    assert!(before >= 9, "the six host and three pod refusals: {before}");

    // The ranges move away from the client: dropped on the north-south path, counted.
    s.apply(&fenced_manifests("[10.0.0.0/8, not-a-cidr]"), 3);
    for proto in ["tcp", "udp"] {
        none_served(
            &client(&s, proto, LB, "3"),
            &format!("{proto} client outside"),
        );
        served(
            &client(&s, proto, NODE_PORT, "5"),
            &format!("{proto} NodePort, outside"),
        );
    }
    let denied = s.stats("node1")["source_range_denied"] - before;
    assert!(denied >= 6, "3 SYNs and 3 datagrams at least: {denied}");
    served(&bound(&s), "udp a2 bound to its address, in 10.0.0.0/8");
    // The same pod unbound: its source would be its address too, but the socket-level program
    // cannot know it at send time and judges it as the node's own clients (README).
    none_served(
        &s.lab
            .run_client("a2", &["udp", LB, "--count", "1", "--timeout-ms", "1000"])
            .unwrap(),
        "udp a2 unbound, no node address in range",
    );
    // lbctl predicts it.
    let lookup = |client: &str| -> serde_json::Value {
        let out = std::process::Command::new(lb_tests::lab::bin_path("lbctl").unwrap())
            .arg("--bpffs")
            .arg(&s.lab.node("node1").bpffs)
            .args([
                "lookup",
                "--frontend",
                "203.0.113.20:80/TCP",
                "--client",
                client,
                "-o",
                "json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(lookup("192.168.100.100")["reason"], "source range denied");
    assert_eq!(lookup("10.1.2.3")["reason"], "fresh choice");
    let (_, _, body) = http_get(&s.lab.client_netns, "192.168.100.1:9464", "/metrics");
    let metric = |prefix: &str, has: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(has))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert!(
        metric(
            "lb_datapath_events_total{",
            "counter=\"source_range_denied\""
        ) >= (before + denied) as f64,
        "{body}"
    );
    // One prefix (the unparsable entry admits nothing and takes no entry) for each of the two
    // Service ports.
    assert_eq!(
        metric("lb_map_entries{", "map=\"source_ranges\""),
        2.0,
        "{body}"
    );
    // Per Service port: the fenced Service's TCP and UDP ports together.
    let per_service = metric("lb_service_drops_total{", "reason=\"source_range\"");
    assert!(
        per_service >= (before + 6 + 1) as f64,
        "{per_service}\n{body}"
    );
    assert!(
        body.lines()
            .filter(|l| l.starts_with("lb_service_drops_total{")
                && l.contains("reason=\"source_range\"")
                && !l.ends_with(" 0"))
            .all(|l| l.contains("name=\"fenced\"")),
        "only the fenced Service drops by source range:\n{body}"
    );

    // node1's address in the ranges (kube-proxy's allowFromNode): the host is served.
    s.apply(&fenced_manifests("[192.168.100.0/24]"), 4);
    for proto in ["tcp", "udp"] {
        served(
            &host(&s, proto, LB),
            &format!("{proto} node1 host, node in range"),
        );
        served(
            &client(&s, proto, LB, "5"),
            &format!("{proto} client in the /24"),
        );
    }
}
on_both_variants!(source_ranges_fence_the_load_balancer_ip: lab_source_ranges_fence_the_load_balancer_ip_plain, lab_source_ranges_fence_the_load_balancer_ip_xdp);
