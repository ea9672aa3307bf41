//! End-to-end north-south traffic in the reference lab: the external client reaches NodePorts,
//! LoadBalancer IPs and external IPs through the north-south program on the nodes' eth0 (XDP on
//! the XDP variant of the lab, tc ingress on the plain one, as the agent's default
//! `--north-south auto` picks; tc egress for replies of local backends), with both
//! externalTrafficPolicy modes, and asks the healthCheckNodePort servers as a cloud load balancer
//! would. Every test runs on both lab variants (`_plain`, `_xdp`).
use std::collections::BTreeMap;

use lb_tests::{
    lab::{all_ok, Exchange},
    on_both_variants, Variant,
};

const LB_LOCAL: &str = "203.0.113.10:80";
const LB_CLUSTER: &str = "203.0.113.11:80";
const EXT_IP: &str = "198.51.100.50:80";

use lb_tests::scenario::{example_manifests as examples, start_example_on as setup};

fn seen_ip(e: &Exchange) -> String {
    e.seen_peer
        .as_deref()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .0
        .to_string()
}

fn http_get(ns: &str, addr: &str) -> (u16, BTreeMap<String, String>, serde_json::Value) {
    let (code, headers, body) = lb_tests::scenario::http_get(ns, addr, "/healthz");
    (code, headers, serde_json::from_str(&body).unwrap())
}

fn local_policy_keeps_the_client_address(v: Variant) {
    let Some(s) = setup(v) else { return };
    s.lab.client_route("203.0.113.10/32", "node1").unwrap();
    for (proto, target) in [
        ("tcp", LB_LOCAL),
        ("udp", LB_LOCAL),
        ("tcp", "192.168.100.1:30080"),
        ("udp", "192.168.100.1:30080"),
    ] {
        let ex = s
            .lab
            .run_client("client", &[proto, target, "--count", "30"])
            .unwrap();
        all_ok(&ex, &format!("{proto} {target}"));
        for e in &ex {
            assert_eq!(e.backend.as_deref(), Some("a1"), "{e:?}");
            // The backend saw the client's own address...
            assert_eq!(seen_ip(e), "192.168.100.100", "{e:?}");
            // ...and its reply came back from the frontend (translated on its way out).
            assert_eq!(e.peer.as_deref(), Some(target), "{e:?}");
        }
    }
    // The north-south stages count alike as XDP and as tc ingress (`xdp_*` counters).
    let st = s.stats("node1");
    // Every TCP connection is a new flow; a UDP socket that happens to get the source port of an
    // earlier one continues that flow's entries (the same four-tuple), so UDP counts at most 60.
    assert!(
        st["xdp_new_flow"] >= 60 && st["xdp_new_flow"] + st["xdp_established"] >= 120,
        "{st:?}"
    );
    assert!(st["xdp_translated_pass"] >= 120, "{st:?}");
    // The replies are translated on their way: by the tc ingress program on cni0 (the pod
    // bridge, one of the node's other interfaces: `xdp_reply`) once the agent hooked it, else
    // by tc egress on eth0 (`tc_reply`).
    assert!(st["tc_reply"] + st["xdp_reply"] >= 120, "{st:?}");
}
on_both_variants!(local_policy_keeps_the_client_address: lab_local_policy_keeps_the_client_address_plain, lab_local_policy_keeps_the_client_address_xdp);

fn cluster_policy_translates_the_source_to_the_node(v: Variant) {
    let Some(s) = setup(v) else { return };
    s.lab.client_route("203.0.113.11/32", "node1").unwrap();
    for (proto, target) in [
        ("tcp", LB_CLUSTER),
        ("udp", LB_CLUSTER),
        ("tcp", "192.168.100.1:30090"),
    ] {
        let ex = s
            .lab
            .run_client("client", &[proto, target, "--count", "30"])
            .unwrap();
        all_ok(&ex, &format!("{proto} {target}"));
        for e in &ex {
            // The only backend runs on node2; it sees node1's address, not the client's.
            assert_eq!(e.backend.as_deref(), Some("b1"), "{e:?}");
            assert_eq!(seen_ip(e), "192.168.100.1", "{e:?}");
            assert_eq!(e.peer.as_deref(), Some(target), "{e:?}");
        }
    }
    let st = s.stats("node1");
    // 60 TCP connections are new flows; a UDP socket may reuse an earlier one's source port.
    assert!(
        st["xdp_new_flow"] >= 60
            && st["xdp_new_flow"] + st["xdp_established"] >= 90
            && st["xdp_reply"] >= 90,
        "{st:?}"
    );
    match v {
        Variant::Xdp => assert!(
            st["xdp_tx"] >= 90,
            "translated packets left through XDP_TX: {st:?}"
        ),
        // tc ingress forwards with bpf_redirect_neigh (counted as a redirect), never XDP_TX.
        Variant::Plain => assert!(
            st["xdp_redirect"] >= 90 && st["xdp_tx"] == 0,
            "translated packets left through bpf_redirect_neigh: {st:?}"
        ),
    }
}
on_both_variants!(cluster_policy_translates_the_source_to_the_node: lab_cluster_policy_translates_the_source_to_the_node_plain, lab_cluster_policy_translates_the_source_to_the_node_xdp);

fn local_policy_without_local_endpoint_drops_and_health_says_so(v: Variant) {
    let Some(s) = setup(v) else { return };
    // The cloud load balancer sends to node2, which runs no web-local pod.
    s.lab.client_route("203.0.113.10/32", "node2").unwrap();
    let ex = s
        .lab
        .run_client(
            "client",
            &["tcp", LB_LOCAL, "--count", "3", "--timeout-ms", "500"],
        )
        .unwrap();
    assert!(
        ex.iter().all(|e| !e.ok),
        "no connection may succeed: {ex:?}"
    );
    let st = s.stats("node2");
    assert!(st["xdp_drop_no_backend"] >= 3, "{st:?}");
    // Health checks: node1 has one ready local endpoint, node2 none.
    let (code, headers, body) = http_get(&s.lab.client_netns, "192.168.100.1:32080");
    assert_eq!(code, 200);
    assert_eq!(headers["Content-Type"], "application/json");
    assert_eq!(headers["X-Content-Type-Options"], "nosniff");
    assert_eq!(headers["X-Load-Balancing-Endpoint-Weight"], "1");
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "default", "name": "web-local"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    let (code, headers, body) = http_get(&s.lab.client_netns, "192.168.100.2:32080");
    assert_eq!(code, 503);
    assert_eq!(headers["X-Load-Balancing-Endpoint-Weight"], "0");
    assert_eq!(body["localEndpoints"], 0);
}
on_both_variants!(local_policy_without_local_endpoint_drops_and_health_says_so: lab_local_policy_without_local_endpoint_drops_and_health_says_so_plain, lab_local_policy_without_local_endpoint_drops_and_health_says_so_xdp);

fn pods_reach_load_balancer_ips_through_cluster_endpoints(v: Variant) {
    let Some(s) = setup(v) else { return };
    // From a pod on node2, the Local Service's LB IP is served by the cluster set (a1 on node1).
    let ex = s
        .lab
        .run_client("b2", &["tcp", LB_LOCAL, "--count", "10"])
        .unwrap();
    all_ok(&ex, "pod to LB IP");
    assert!(
        ex.iter()
            .all(|e| e.backend.as_deref() == Some("a1") && e.peer.as_deref() == Some(LB_LOCAL)),
        "{ex:?}"
    );
    let ex = s
        .lab
        .run_client("a1", &["tcp", EXT_IP, "--count", "10"])
        .unwrap();
    all_ok(&ex, "pod to external IP");
}
on_both_variants!(pods_reach_load_balancer_ips_through_cluster_endpoints: lab_pods_reach_load_balancer_ips_through_cluster_endpoints_plain, lab_pods_reach_load_balancer_ips_through_cluster_endpoints_xdp);

fn long_lived_north_south_connection_survives_backend_leaving(v: Variant) {
    let Some(mut s) = setup(v) else { return };
    s.lab.client_route("198.51.100.50/32", "node1").unwrap();
    let mut held = s.lab.hold("client", EXT_IP).unwrap();
    let first = held.first.clone().unwrap();
    assert!(first.ok, "{first:?}");
    let pinned = first.backend.clone().unwrap();
    let addr = s.lab.pod(&pinned).addr.to_string();
    // Remove the backend from the ext Service's slice only.
    let text = examples();
    let (head, tail) = text.split_at(text.find("name: ext-1").unwrap());
    let tail = tail.replace(&format!("- {{addresses: [{addr}]"), "# removed: ");
    s.apply(&format!("{head}{tail}"), 2);
    let ex = s
        .lab
        .run_client("client", &["tcp", EXT_IP, "--count", "30"])
        .unwrap();
    all_ok(&ex, "new connections");
    assert!(
        ex.iter()
            .all(|e| e.backend.as_deref() != Some(pinned.as_str())),
        "{ex:?}"
    );
    for _ in 0..3 {
        let e = held.exchange().unwrap();
        assert!(e.ok, "{e:?}");
        assert_eq!(e.backend.as_deref(), Some(pinned.as_str()));
    }
}
on_both_variants!(long_lived_north_south_connection_survives_backend_leaving: lab_long_lived_north_south_connection_survives_backend_leaving_plain, lab_long_lived_north_south_connection_survives_backend_leaving_xdp);
