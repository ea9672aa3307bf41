//! IPv6 twins of the north-south lab tests (lab_northsouth.rs): the external client
//! (fd00:100::100) reaches NodePorts on the nodes' IPv6 addresses, IPv6 LoadBalancer IPs and
//! IPv6 external IPs through the north-south program on the nodes' eth0 (`lb_xdp6` on the XDP
//! variant, `lb_tc_ingress6` on the plain one), with both externalTrafficPolicy modes, session
//! affinity, and a dual-stack Service served on both families at once. The Services are
//! appended to the example manifests ([`with_ipv6_services`]). Every test runs on both lab
//! variants (`_plain`, `_xdp`).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    thread,
};

use lb_tests::{
    lab::{all_ok, by_backend, Exchange, CLIENT_ADDR, CLIENT_ADDR6},
    on_both_variants,
    scenario::{
        start_example_on, start_example_on_with,
        with_ipv6_north_south_services as with_ipv6_services, Running,
    },
    Variant,
};

/// `web-local6`'s IPv6 LoadBalancer IP (externalTrafficPolicy Local, served by a1).
const LB6_LOCAL: &str = "[fd00:203::10]:80";
/// `web-local6`'s IPv4 LoadBalancer IP (the same dual-stack Service).
const LB4_LOCAL: &str = "203.0.113.30:80";
/// `web-local6`'s NodePort on node1, per family.
const NP6_LOCAL: &str = "[fd00:100::1]:30180";
const NP4_LOCAL: &str = "192.168.100.1:30180";
/// `web-cluster6` (IPv6 only, externalTrafficPolicy Cluster, served by b1 on node2).
const LB6_CLUSTER: &str = "[fd00:203::11]:80";
const NP6_CLUSTER: &str = "[fd00:100::1]:30190";
/// `ext6`'s IPv6 external IP (a2 and b2, port 9090).
const EXT6: &str = "[fd00:198::50]:80";
/// `sticky6`'s NodePort on node1 (ClientIP affinity, 2 s, over a1, a2 and b1).
const NP6_STICKY: &str = "[fd00:100::1]:30200";

/// The lab of variant `v` with agents on the example manifests, then on [`with_ipv6_services`]
/// (generation 2).
fn setup(v: Variant) -> Option<Running> {
    let mut s = start_example_on(v)?;
    s.apply(&with_ipv6_services(), 2);
    Some(s)
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Counter deltas of `node` between `before` and now.
fn delta(s: &Running, node: &str, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    s.stats(node)
        .into_iter()
        .map(|(k, v)| {
            let b = before.get(&k).copied().unwrap_or(0);
            (k, v - b)
        })
        .collect()
}

/// Every exchange answered by `backend`, which saw the client address `seen`, and the reply
/// came from `target` (the frontend the client asked).
fn answered(ex: &[Exchange], what: &str, backend: &str, seen: &str, target: &str) {
    all_ok(ex, what);
    for e in ex {
        assert_eq!(e.backend.as_deref(), Some(backend), "{what}: {e:?}");
        assert_eq!(
            e.seen_ip().map(|a| a.to_string()).as_deref(),
            Some(seen),
            "{what}: {e:?}"
        );
        assert_eq!(e.peer_addr(), Some(addr(target)), "{what}: {e:?}");
    }
}

fn http_get(ns: &str, addr: &str) -> (u16, BTreeMap<String, String>, serde_json::Value) {
    let (code, headers, body) = lb_tests::scenario::http_get(ns, addr, "/healthz");
    (code, headers, serde_json::from_str(&body).unwrap())
}

fn local_policy_keeps_the_client_address6(v: Variant) {
    let Some(s) = setup(v) else { return };
    s.lab.client_route("fd00:203::10/128", "node1").unwrap();
    let before = s.stats("node1");
    let client = CLIENT_ADDR6.to_string();
    for (proto, target) in [
        ("tcp", LB6_LOCAL),
        ("udp", LB6_LOCAL),
        ("tcp", NP6_LOCAL),
        ("udp", NP6_LOCAL),
    ] {
        let ex = s
            .lab
            .run_client("client", &[proto, target, "--count", "30"])
            .unwrap();
        // a1 saw the client's own IPv6 address, and its reply came back from the frontend
        // (translated on its way out by the north-south program on cni0).
        answered(&ex, &format!("{proto} {target}"), "a1", &client, target);
    }
    let st = delta(&s, "node1", &before);
    assert!(st["xdp_ipv6"] >= 120, "{st:?}");
    // Every TCP connection is a new flow; a UDP socket that happens to get the source port of
    // an earlier one continues that flow's entries.
    assert!(
        st["xdp_new_flow"] >= 60 && st["xdp_new_flow"] + st["xdp_established"] >= 120,
        "{st:?}"
    );
    assert!(st["xdp_translated_pass"] >= 120, "{st:?}");
    assert!(st["tc_reply"] + st["xdp_reply"] >= 120, "{st:?}");
    assert_eq!(st["xdp_no_config6"], 0, "{st:?}");
    eprintln!("node1 counters during the exchanges: {st:?}");
}
on_both_variants!(local_policy_keeps_the_client_address6: lab_ns6_local_policy_keeps_the_client_address_plain, lab_ns6_local_policy_keeps_the_client_address_xdp);

fn cluster_policy_translates_the_source_to_the_node6(v: Variant) {
    let Some(s) = setup(v) else { return };
    s.lab.client_route("fd00:203::11/128", "node1").unwrap();
    let before = s.stats("node1");
    let node1 = s.lab.node("node1").addr6.to_string();
    assert_eq!(node1, "fd00:100::1");
    for (proto, target) in [
        ("tcp", LB6_CLUSTER),
        ("udp", LB6_CLUSTER),
        ("tcp", NP6_CLUSTER),
    ] {
        let ex = s
            .lab
            .run_client("client", &[proto, target, "--count", "30"])
            .unwrap();
        // The only backend runs on node2; it sees node1's IPv6 address, not the client's.
        answered(&ex, &format!("{proto} {target}"), "b1", &node1, target);
    }
    let st = delta(&s, "node1", &before);
    assert!(st["xdp_ipv6"] >= 180, "{st:?}");
    assert!(
        st["xdp_new_flow"] >= 60
            && st["xdp_new_flow"] + st["xdp_established"] >= 90
            && st["xdp_reply"] >= 90,
        "{st:?}"
    );
    eprintln!("node1 counters during the exchanges: {st:?}");
    match v {
        Variant::Xdp => assert!(
            st["xdp_tx"] >= 90,
            "translated packets left through XDP_TX: {st:?}"
        ),
        Variant::Plain => assert!(
            st["xdp_redirect"] >= 90 && st["xdp_tx"] == 0,
            "translated packets left through bpf_redirect_neigh: {st:?}"
        ),
    }
}
on_both_variants!(cluster_policy_translates_the_source_to_the_node6: lab_ns6_cluster_policy_translates_the_source_to_the_node_plain, lab_ns6_cluster_policy_translates_the_source_to_the_node_xdp);

fn local_policy_without_local_endpoint_drops_and_health_says_so6(v: Variant) {
    let Some(s) = setup(v) else { return };
    // The cloud load balancer sends to node2, which runs no web-local6 pod.
    s.lab.client_route("fd00:203::10/128", "node2").unwrap();
    let before = s.stats("node2");
    let ex = s
        .lab
        .run_client(
            "client",
            &["tcp", LB6_LOCAL, "--count", "3", "--timeout-ms", "500"],
        )
        .unwrap();
    assert!(
        ex.iter().all(|e| !e.ok),
        "no connection may succeed: {ex:?}"
    );
    let st = delta(&s, "node2", &before);
    assert!(st["xdp_drop_no_backend"] >= 3, "{st:?}");
    // Health checks over IPv6, of the IPv6 family's endpoints: node1 has one, node2 none.
    let (code, headers, body) = http_get(&s.lab.client_netns, "[fd00:100::1]:32081");
    assert_eq!(code, 200);
    assert_eq!(headers["X-Load-Balancing-Endpoint-Weight"], "1");
    assert_eq!(
        body,
        serde_json::json!({"service": {"namespace": "default", "name": "web-local6"}, "localEndpoints": 1, "serviceProxyHealthy": true})
    );
    let (code, headers, body) = http_get(&s.lab.client_netns, "[fd00:100::2]:32081");
    assert_eq!(code, 503);
    assert_eq!(headers["X-Load-Balancing-Endpoint-Weight"], "0");
    assert_eq!(body["localEndpoints"], 0);
}
on_both_variants!(local_policy_without_local_endpoint_drops_and_health_says_so6: lab_ns6_local_policy_without_local_endpoint_drops_and_health_says_so_plain, lab_ns6_local_policy_without_local_endpoint_drops_and_health_says_so_xdp);

/// One dual-stack Service from outside, both families at once: its NodePort on node1's IPv4
/// and IPv6 addresses and its two LoadBalancer IPs, each answered by a1 through the endpoint of
/// its own family, each backend seeing the client's address of that family.
fn a_dual_stack_service_is_served_on_both_families_at_once(v: Variant) {
    let Some(s) = setup(v) else { return };
    s.lab.client_route("fd00:203::10/128", "node1").unwrap();
    s.lab.client_route("203.0.113.30/32", "node1").unwrap();
    let (c4, c6) = (CLIENT_ADDR.to_string(), CLIENT_ADDR6.to_string());
    let lab = &s.lab;
    for (proto, t4, t6) in [
        ("tcp", NP4_LOCAL, NP6_LOCAL),
        ("udp", NP4_LOCAL, NP6_LOCAL),
        ("tcp", LB4_LOCAL, LB6_LOCAL),
    ] {
        let (ex4, ex6) = thread::scope(|sc| {
            let h4 = sc.spawn(|| lab.run_client("client", &[proto, t4, "--count", "100"]));
            let h6 = sc.spawn(|| lab.run_client("client", &[proto, t6, "--count", "100"]));
            (h4.join().unwrap().unwrap(), h6.join().unwrap().unwrap())
        });
        answered(&ex4, &format!("{proto} {t4}"), "a1", &c4, t4);
        answered(&ex6, &format!("{proto} {t6}"), "a1", &c6, t6);
    }
    // lbctl shows the NodePort frontends of both families on node1.
    let v = s.lbctl_json("node1", "services");
    let fams: BTreeSet<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["service"]
                .as_str()
                .is_some_and(|n| n.starts_with("default/web-local6:tcp/TCP"))
        })
        .map(|f| {
            (
                f["family"].as_str().unwrap().to_string(),
                f["frontend"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("IPv4", NP4_LOCAL),
        ("IPv6", NP6_LOCAL),
        ("IPv4", LB4_LOCAL),
        ("IPv6", LB6_LOCAL),
    ] {
        assert!(
            fams.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} not in {fams:?}"
        );
    }
}
on_both_variants!(a_dual_stack_service_is_served_on_both_families_at_once: lab_ns6_a_dual_stack_service_is_served_on_both_families_at_once_plain, lab_ns6_a_dual_stack_service_is_served_on_both_families_at_once_xdp);

/// ClientIP affinity on an IPv6 NodePort, keyed on the client's IPv6 address: every connection
/// lands on one backend until the record expires (2 s idle), then the client may choose again.
fn affinity_pins_an_ipv6_client6(v: Variant) {
    let Some(s) = setup(v) else { return };
    let ex = s
        .lab
        .run_client("client", &["tcp", NP6_STICKY, "--count", "30"])
        .unwrap();
    all_ok(&ex, "sticky6");
    let pinned = by_backend(&ex);
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        thread::sleep(std::time::Duration::from_millis(2600));
        let ex = s
            .lab
            .run_client("client", &["tcp", NP6_STICKY, "--count", "1"])
            .unwrap();
        all_ok(&ex, "sticky6 after the timeout");
        seen.extend(by_backend(&ex).into_keys());
        if seen.len() > 1 {
            break;
        }
    }
    assert!(seen.len() > 1, "the record never expired: {seen:?}");
    let aff = s.lbctl_json("node1", "affinity");
    assert!(
        aff.as_array().unwrap().iter().any(|r| r["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with("[fd00:244:"))),
        "{aff}"
    );
}
on_both_variants!(affinity_pins_an_ipv6_client6: lab_ns6_affinity_pins_an_ipv6_client_plain, lab_ns6_affinity_pins_an_ipv6_client_xdp);

fn long_lived_north_south_connection_survives_backend_leaving6(v: Variant) {
    let Some(mut s) = setup(v) else { return };
    s.lab.client_route("fd00:198::50/128", "node1").unwrap();
    let mut held = s.lab.hold("client", EXT6).unwrap();
    let first = held.first.clone().unwrap();
    assert!(first.ok, "{first:?}");
    let pinned = first.backend.clone().unwrap();
    let addr6 = s.lab.pod(&pinned).addr6.to_string();
    // Remove the backend from the ext6 Service's slice only.
    let text = with_ipv6_services();
    let (head, tail) = text.split_at(text.find("name: ext6-1").unwrap());
    let tail = tail.replacen(&format!("- {{addresses: [\"{addr6}\"]"), "# removed: ", 1);
    assert_ne!(format!("{head}{tail}"), text);
    s.apply(&format!("{head}{tail}"), 3);
    let ex = s
        .lab
        .run_client("client", &["tcp", EXT6, "--count", "30"])
        .unwrap();
    all_ok(&ex, "new connections");
    assert!(
        ex.iter()
            .all(|e| e.backend.is_some() && e.backend.as_deref() != Some(pinned.as_str())),
        "{ex:?}"
    );
    for _ in 0..3 {
        let e = held.exchange().unwrap();
        assert!(e.ok, "{e:?}");
        assert_eq!(e.backend.as_deref(), Some(pinned.as_str()));
    }
}
on_both_variants!(long_lived_north_south_connection_survives_backend_leaving6: lab_ns6_long_lived_north_south_connection_survives_backend_leaving_plain, lab_ns6_long_lived_north_south_connection_survives_backend_leaving_xdp);

/// The north-south IPv6 path survives the agent's SIGKILL and restart: a held connection to the
/// IPv6 LoadBalancer IP of the Cluster Service (SNAT to node1's IPv6 address) and new ones keep
/// working while the agent is down and after it adopted the pinned state without a write.
fn agent_sigkill_and_restart_lose_nothing6(v: Variant) {
    let Some(mut s) = setup(v) else { return };
    s.lab.client_route("fd00:203::11/128", "node1").unwrap();
    let node1 = s.lab.node("node1").addr6.to_string();
    let mut held = s.lab.hold("client", LB6_CLUSTER).unwrap();
    let first = held.first.clone().unwrap();
    assert!(
        first.ok && first.backend.as_deref() == Some("b1"),
        "{first:?}"
    );
    let check = |s: &Running, held: &mut lb_tests::HeldConnection, when: &str| {
        for _ in 0..3 {
            let e = held.exchange().unwrap();
            assert!(e.ok && e.backend.as_deref() == Some("b1"), "{when}: {e:?}");
        }
        let ex = s
            .lab
            .run_client("client", &["tcp", LB6_CLUSTER, "--count", "20"])
            .unwrap();
        answered(&ex, when, "b1", &node1, LB6_CLUSTER);
    };
    let status = s.agents[0].stop_with(libc::SIGKILL).unwrap();
    assert!(!status.success(), "killed");
    check(&s, &mut held, "while the agent is down");
    let mut again = s
        .lab
        .spawn_agent(
            "node1",
            &lb_tests::bin_path("lb-agent").unwrap(),
            &s.manifests,
            &[],
        )
        .unwrap();
    again
        .wait_for_log("sync generation 1:", std::time::Duration::from_secs(20))
        .unwrap();
    let log = again.log();
    let line = log
        .lines()
        .find(|l| l.contains("sync generation 1:"))
        .unwrap();
    assert!(
        line.contains(" 0 map writes"),
        "adoption rewrote state: {line}"
    );
    check(&s, &mut held, "after the restart");
    s.agents.push(again);
}
on_both_variants!(agent_sigkill_and_restart_lose_nothing6: lab_ns6_agent_sigkill_and_restart_lose_nothing_plain, lab_ns6_agent_sigkill_and_restart_lose_nothing_xdp);

/// Pods reach the IPv6 LoadBalancer and external IPs at socket level, served by the cluster
/// endpoint set: from a pod on node2, the Local Service's IPv6 LB IP reaches a1 on node1.
fn pods_reach_ipv6_load_balancer_ips_through_cluster_endpoints6(v: Variant) {
    let Some(s) = setup(v) else { return };
    let ex = s
        .lab
        .run_client("b2", &["tcp", LB6_LOCAL, "--count", "10"])
        .unwrap();
    all_ok(&ex, "pod to IPv6 LB IP");
    assert!(
        ex.iter()
            .all(|e| e.backend.as_deref() == Some("a1") && e.peer_addr() == Some(addr(LB6_LOCAL))),
        "{ex:?}"
    );
    let ex = s
        .lab
        .run_client("a1", &["tcp", EXT6, "--count", "10"])
        .unwrap();
    all_ok(&ex, "pod to IPv6 external IP");
    assert!(
        ex.iter()
            .all(|e| matches!(e.backend.as_deref(), Some("a2" | "b2"))),
        "{ex:?}"
    );
}
on_both_variants!(pods_reach_ipv6_load_balancer_ips_through_cluster_endpoints6: lab_ns6_pods_reach_ipv6_load_balancer_ips_through_cluster_endpoints_plain, lab_ns6_pods_reach_ipv6_load_balancer_ips_through_cluster_endpoints_xdp);

/// With the node's other interfaces left alone (`--other-interfaces none`: no program on the pod
/// bridge), a local backend's IPv6 replies leave by eth0 and are translated back to the
/// frontend there by tc egress (`lb_tc_egress6`, tail-called by `lb_tc_egress`).
fn local_replies_are_translated_on_egress6(v: Variant) {
    let Some(mut s) = start_example_on_with(v, &["--other-interfaces", "none"]) else {
        return;
    };
    s.apply(&with_ipv6_services(), 2);
    s.lab.client_route("fd00:203::10/128", "node1").unwrap();
    let before = s.stats("node1");
    let client = CLIENT_ADDR6.to_string();
    for (proto, target) in [("tcp", LB6_LOCAL), ("udp", LB6_LOCAL)] {
        let ex = s
            .lab
            .run_client("client", &[proto, target, "--count", "10"])
            .unwrap();
        answered(&ex, &format!("{proto} {target}"), "a1", &client, target);
    }
    let st = delta(&s, "node1", &before);
    // No north-south program on cni0: every reply was tc egress's on eth0.
    assert!(st["tc_reply"] >= 20, "{st:?}");
    assert_eq!(st["xdp_reply"], 0, "{st:?}");
    eprintln!("node1 counters during the exchanges: {st:?}");
}
on_both_variants!(local_replies_are_translated_on_egress6: lab_ns6_local_replies_are_translated_on_egress_plain, lab_ns6_local_replies_are_translated_on_egress_xdp);

/// [`with_ipv6_services`] plus two IPv6-only LoadBalancer Services for the firewall and REJECT
/// twins (lab_source_ranges.rs, lab_e2e_services.rs):
/// - `gone6`: ingress IP fd00:203::13, NodePort 30210, TCP and UDP, no endpoint anywhere;
/// - `fenced6`: ingress IP fd00:203::12, NodePort 30211, TCP and UDP, served by a1, with
///   loadBalancerSourceRanges `ranges` (a YAML list).
fn with_fenced_and_empty6(ranges: &str) -> String {
    format!(
        "{}\n---
apiVersion: v1
kind: Service
metadata: {{name: gone6, namespace: default}}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6]
  clusterIPs: [\"fd00:96::170\"]
  selector: {{app: gone6}}
  ports:
  - {{name: tcp, port: 80, targetPort: 8080, nodePort: 30210}}
  - {{name: udp, port: 80, targetPort: 8080, nodePort: 30210, protocol: UDP}}
status:
  loadBalancer: {{ingress: [{{ip: \"fd00:203::13\"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: fenced6, namespace: default}}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6]
  clusterIPs: [\"fd00:96::171\"]
  loadBalancerSourceRanges: {ranges}
  selector: {{app: fenced6}}
  ports:
  - {{name: tcp, port: 80, targetPort: 8080, nodePort: 30211}}
  - {{name: udp, port: 80, targetPort: 8080, nodePort: 30211, protocol: UDP}}
status:
  loadBalancer: {{ingress: [{{ip: \"fd00:203::12\"}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: fenced6-1, namespace: default, labels: {{kubernetes.io/service-name: fenced6}}}}
addressType: IPv6
ports:
- {{name: tcp, port: 8080}}
- {{name: udp, port: 8080, protocol: UDP}}
endpoints:
- {{addresses: [\"fd00:244:1::10\"], nodeName: node1}}
",
        with_ipv6_services().trim_end()
    )
}

/// The IPv6 twins of kube-proxy's REJECT and firewall from outside: a Service without any
/// endpoint answers the external client's TCP and UDP at once with an ICMPv6 port unreachable
/// (ECONNREFUSED, not a timeout) at its LoadBalancer IP and its NodePort; a LoadBalancer IP
/// fenced by loadBalancerSourceRanges serves a client inside the ranges and drops (counted) one
/// outside them, while its NodePort stays open.
fn rejects_and_source_ranges6(v: Variant) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    s.apply(&with_fenced_and_empty6("[\"fd00:100::100/128\"]"), 2);
    s.lab.client_route("fd00:203::12/128", "node1").unwrap();
    s.lab.client_route("fd00:203::13/128", "node1").unwrap();
    let client = |s: &Running, proto: &str, target: &str| {
        s.lab
            .run_client(
                "client",
                &[proto, target, "--count", "5", "--timeout-ms", "2000"],
            )
            .unwrap()
    };
    let served = |ex: &[Exchange], what: &str| {
        all_ok(ex, what);
        assert!(
            ex.iter().all(|e| e.backend.as_deref() == Some("a1")),
            "{what}: {ex:?}"
        );
    };
    let before = s.stats("node1");
    for proto in ["tcp", "udp"] {
        // A connected UDP socket, so that the ICMPv6 error reaches the application.
        let mode = if proto == "udp" {
            "udp-connected"
        } else {
            proto
        };
        for target in ["[fd00:203::13]:80", "[fd00:100::1]:30210"] {
            let ex = client(&s, mode, target);
            assert!(
                !ex.is_empty()
                    && ex.iter().all(|e| e
                        .error
                        .as_deref()
                        .is_some_and(|m| m.starts_with("ConnectionRefused"))),
                "{proto} {target}: refused by an ICMPv6 port unreachable: {ex:?}"
            );
        }
        served(
            &client(&s, proto, "[fd00:203::12]:80"),
            &format!("{proto} client inside the ranges"),
        );
    }
    let st = delta(&s, "node1", &before);
    assert!(st["reject_sent"] >= 20, "{st:?}");
    assert_eq!(st["source_range_denied"], 0, "{st:?}");

    // The ranges move away from the client: its SYNs and datagrams to the LoadBalancer IP are
    // dropped on the north-south path; the NodePort is not fenced.
    s.apply(&with_fenced_and_empty6("[\"fd00:244::/32\"]"), 3);
    let before = s.stats("node1");
    for proto in ["tcp", "udp"] {
        let ex = s
            .lab
            .run_client(
                "client",
                &[
                    proto,
                    "[fd00:203::12]:80",
                    "--count",
                    "3",
                    "--timeout-ms",
                    "500",
                ],
            )
            .unwrap();
        assert!(
            !ex.is_empty() && ex.iter().all(|e| !e.ok),
            "{proto} outside the ranges: {ex:?}"
        );
        served(
            &client(&s, proto, "[fd00:100::1]:30211"),
            &format!("{proto} NodePort, outside the ranges"),
        );
    }
    let st = delta(&s, "node1", &before);
    assert!(st["source_range_denied"] >= 6, "{st:?}");
    eprintln!("node1 counters: {st:?}");
}
on_both_variants!(rejects_and_source_ranges6: lab_ns6_rejects_and_source_ranges_plain, lab_ns6_rejects_and_source_ranges_xdp);

/// The IPv6 twin of `lab_interfaces`' off-node client: IPv6 ClusterIPs routed to node1 are
/// served by its north-south program from outside a local socket, with the internal endpoint
/// set, masqueraded to node1's IPv6 address whether the backend is remote (`web-cluster6`, b1
/// on node2) or local (`web-local6`, a1), the client being no local pod; node1's config carries
/// its IPv6 pod CIDR (`lbctl config`).
fn off_node_client_reaches_an_ipv6_cluster_ip6(v: Variant) {
    let Some(s) = setup(v) else { return };
    let c = s.lbctl_json("node1", "config");
    let c = c.as_array().map_or(c.clone(), |a| a[0].clone());
    assert_eq!(c["pod_cidr6"], "fd00:244:1::/64", "{c}");
    let node1 = s.lab.node("node1").addr6.to_string();
    for (target, backend) in [("[fd00:96::141]:80", "b1"), ("[fd00:96::140]:80", "a1")] {
        let ip = addr(target).ip();
        s.lab.client_route(&format!("{ip}/128"), "node1").unwrap();
        for proto in ["tcp", "udp"] {
            let ex = s
                .lab
                .run_client("client", &[proto, target, "--count", "10"])
                .unwrap();
            answered(
                &ex,
                &format!("{proto} {target} from the client"),
                backend,
                &node1,
                target,
            );
        }
    }
}
on_both_variants!(off_node_client_reaches_an_ipv6_cluster_ip6: lab_ns6_off_node_client_reaches_an_ipv6_cluster_ip_plain, lab_ns6_off_node_client_reaches_an_ipv6_cluster_ip_xdp);
