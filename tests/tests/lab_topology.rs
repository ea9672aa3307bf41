//! Topology-aware routing end to end: EndpointSlice zone hints keep node1's clients in zone-a;
//! when zone-a's endpoints go away the fallback sends them to zone-b, without a failed connection.
//! The same for an IPv6 Service (IPv6 EndpointSlice, IPv6 ClusterIP), the IPv6 twin.
//!
//! And the lab's IPv6 side (tests/src/lab/mod.rs): pods, nodes and the client reach each other
//! over IPv6 through the same routes as over IPv4, without agents and with agents on both nodes,
//! whose north-south and pod-bridge programs must pass IPv6 (and its neighbour discovery)
//! untouched. On both lab variants.
use std::{collections::BTreeMap, net::Ipv6Addr, time::Duration};

use lb_tests::{
    lab::{all_ok, bin_path, Exchange, Lab, CLIENT_ADDR6},
    netns::ip,
    on_both_variants, Variant,
};

/// The IP family of the zoned Service.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The Service's ClusterIP and port.
    fn target(self) -> &'static str {
        match self {
            Family::V4 => "10.96.0.50:80",
            Family::V6 => "[fd00:96::50]:80",
        }
    }

    /// The pod `a1`/`a2` (node1) or `b1`/`b2` (node2) address of this family.
    fn pod(self, node: u8, i: u8) -> String {
        match self {
            Family::V4 => format!("10.244.{node}.{}", 10 + i),
            Family::V6 => format!("\"fd00:244:{node}::{}\"", 10 + i),
        }
    }
}

fn manifests(family: Family, with_zone_a: bool) -> String {
    let nodes = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/lab.yaml"
    ))
    .unwrap();
    // Keep only the two Node objects of the example.
    let nodes: Vec<&str> = nodes
        .split("\n---\n")
        .filter(|d| d.contains("kind: Node"))
        .collect();
    let endpoint = |node: u8, i: u8| {
        let zone = if node == 1 { "zone-a" } else { "zone-b" };
        format!(
            "- {{addresses: [{}], nodeName: node{node}, zone: {zone}, hints: {{forZones: [{{name: {zone}}}]}}}}\n",
            family.pod(node, i)
        )
    };
    let zone_a = if with_zone_a {
        endpoint(1, 0) + &endpoint(1, 1)
    } else {
        String::new()
    };
    let (cluster_ip, address_type) = match family {
        Family::V4 => ("clusterIP: 10.96.0.50", "IPv4"),
        Family::V6 => ("ipFamilies: [IPv6], clusterIPs: [\"fd00:96::50\"]", "IPv6"),
    };
    format!(
        "{}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {{name: zoned, namespace: default, annotations: {{service.kubernetes.io/topology-mode: Auto}}}}\n\
spec: {{{cluster_ip}, selector: {{app: zoned}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {{name: zoned-1, namespace: default, labels: {{kubernetes.io/service-name: zoned}}}}\n\
addressType: {address_type}\nports: [{{port: 8080}}]\nendpoints:\n{zone_a}{}{}",
        nodes.join("\n---\n"),
        endpoint(2, 0),
        endpoint(2, 1),
    )
}

fn spread(ex: &[Exchange]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in ex {
        *m.entry(e.backend.clone().unwrap_or_else(|| "failed".into()))
            .or_default() += 1;
    }
    m
}

#[test]
fn lab_zone_hints_keep_traffic_in_zone_and_fall_back_without_failures() {
    zone_hints(Family::V4);
}

#[test]
fn lab_zone_hints_keep_traffic_in_zone_and_fall_back_without_failures6() {
    zone_hints(Family::V6);
}

fn zone_hints(family: Family) {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let zoned = family.target();
    let lab = Lab::new().unwrap();
    let path = lab.tmpdir().join("zoned.yaml");
    std::fs::write(&path, manifests(family, true)).unwrap();
    let mut agent = lab
        .spawn_agent("node1", &bin_path("lb-agent").unwrap(), &path, &[])
        .unwrap();
    agent
        .wait_for_log("sync generation 1:", Duration::from_secs(20))
        .unwrap();

    // node1 is in zone-a: only zone-a's endpoints serve it.
    let ex = lab
        .run_client("a1", &["tcp", zoned, "--count", "100"])
        .unwrap();
    let s = spread(&ex);
    assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["a1", "a2"], "{s:?}");

    // zone-a's endpoints go away while a client keeps connecting.
    // Rounds of 50 connections run before, during and after the change, until three rounds
    // after the agent applied it.
    let applied = std::sync::atomic::AtomicBool::new(false);
    let all = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut all = Vec::new();
            let mut after = 0;
            while after < 3 {
                if applied.load(std::sync::atomic::Ordering::SeqCst) {
                    after += 1;
                }
                all.extend(
                    lab.run_client("a2", &["tcp", zoned, "--count", "50"])
                        .unwrap(),
                );
            }
            all
        });
        std::thread::sleep(Duration::from_millis(200));
        std::fs::write(&path, manifests(family, false)).unwrap();
        agent
            .wait_for_log("sync generation 2:", Duration::from_secs(20))
            .unwrap();
        applied.store(true, std::sync::atomic::Ordering::SeqCst);
        traffic.join().unwrap()
    });
    eprintln!(
        "{} connections across the change: {:?}",
        all.len(),
        spread(&all)
    );
    let failed: Vec<_> = all.iter().filter(|e| !e.ok).collect();
    assert!(
        failed.is_empty(),
        "{} connections failed during the change: {:?}",
        failed.len(),
        failed.first()
    );
    let s = spread(&all);
    assert!(
        s.contains_key("b1") || s.contains_key("b2"),
        "traffic moved to zone-b during the run: {s:?}"
    );

    // Afterwards: no zone-a endpoint has a hint for zone-a, so hints are ignored: zone-b serves.
    let ex = lab
        .run_client("a1", &["tcp", zoned, "--count", "100"])
        .unwrap();
    let s = spread(&ex);
    assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["b1", "b2"], "{s:?}");
}

/// `[addr]:port`.
fn at(addr: Ipv6Addr, port: u16) -> String {
    std::net::SocketAddr::from((addr, port)).to_string()
}

/// `count` exchanges of `proto` from `place` to `target`: all answered by `backend`, which saw
/// the source `seen` (no translation on the way), the reply coming from `target`.
fn echo6(lab: &Lab, place: &str, proto: &str, target: &str, backend: &str, seen: Ipv6Addr) {
    let ex = lab
        .run_client(place, &[proto, target, "--count", "5"])
        .unwrap();
    assert_eq!(ex.len(), 5);
    let what = format!("{proto} {place} -> {target}");
    all_ok(&ex, &what);
    for e in &ex {
        assert_eq!(e.backend.as_deref(), Some(backend), "{what}: {e:?}");
        assert_eq!(e.seen_ip(), Some(seen.into()), "{what}: {e:?}");
        assert_eq!(e.peer.as_deref(), Some(target), "{what}: {e:?}");
    }
}

/// Every IPv6 path of the lab: pod to pod on one node and across nodes, node to a pod of the
/// other node, the client to a node (a closed port answers with a reset, a closed UDP port with
/// an ICMPv6 port unreachable: the node is reached) and the client to pods of both nodes through
/// routes via node1 (for node2's pods: client -> node1 -> node2 -> pod, the reply straight back
/// from node2), over TCP and UDP on both echo ports. IPv4 keeps working next to it.
fn check_ipv6(lab: &Lab) {
    let a1 = lab.pod_addr6("a1");
    for port in lb_tests::lab::ECHO_PORTS {
        for proto in ["tcp", "udp"] {
            echo6(lab, "a1", proto, &at(lab.pod_addr6("b1"), port), "b1", a1);
            echo6(lab, "a1", proto, &at(lab.pod_addr6("a2"), port), "a2", a1);
            echo6(lab, "b2", proto, &at(a1, port), "a1", lab.pod_addr6("b2"));
            echo6(
                lab,
                "node1",
                proto,
                &at(lab.pod_addr6("b2"), port),
                "b2",
                lab.node("node1").addr6,
            );
        }
    }
    // The client reaches the nodes: refused, not timed out.
    for node in ["node1", "node2"] {
        let target = at(lab.node(node).addr6, 7);
        for proto in ["tcp", "udp-connected"] {
            let ex = lab.all_fail("client", proto, &target, 1, 2000);
            let err = ex[0].error.as_deref().unwrap_or_default();
            assert!(
                err.starts_with("ConnectionRefused"),
                "{proto} {target}: {ex:?}"
            );
        }
    }
    // And the pods, through routes via node1.
    lab.client_route(&lab.node("node1").pod_cidr6, "node1")
        .unwrap();
    lab.client_route(&lab.node("node2").pod_cidr6, "node1")
        .unwrap();
    for pod in ["a1", "b1"] {
        for proto in ["tcp", "udp"] {
            let target = at(lab.pod_addr6(pod), 9090);
            echo6(lab, "client", proto, &target, pod, CLIENT_ADDR6);
        }
    }
    // IPv4 next to it: the echo servers' IPv4 sockets still see IPv4 peers.
    let ex = lab.tcp("a1", "10.244.2.10:8080", 3).unwrap();
    all_ok(&ex, "tcp a1 -> b1 over IPv4");
    assert!(
        ex.iter()
            .all(|e| e.seen_peer.as_deref().unwrap().starts_with("10.244.1.10:")),
        "{ex:?}"
    );
}

fn ipv6_paths(v: Variant) {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let lab = Lab::new_variant(v).unwrap();
    check_ipv6(&lab);
}
on_both_variants!(ipv6_paths: lab_ipv6_paths_plain, lab_ipv6_paths_xdp);

/// `ip -6 neigh show ADDR dev DEV` in `ns`: (MAC, state), `None` without an entry.
fn neighbour(ns: &str, addr: Ipv6Addr, dev: &str) -> Option<(String, String)> {
    let out = ip(ns, &["-6", "neigh", "show", &addr.to_string(), "dev", dev]).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    let mac = words
        .iter()
        .position(|w| *w == "lladdr")
        .and_then(|i| words.get(i + 1))?;
    Some((mac.to_string(), words.last()?.to_string()))
}

fn mac(ns: &str, dev: &str) -> String {
    let out = ip(ns, &["-o", "link", "show", "dev", dev]).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "link/ether").unwrap();
    words[i + 1].to_string()
}

/// With agents on both nodes (north-south program on eth0: tc on the plain lab, XDP on the XDP
/// one; tc on cni0), IPv6 still flows on every path, and neighbour discovery through node1's
/// eth0 and cni0 works: the lab's permanent IPv6 neighbour entries between the client and node1
/// and the dynamic ones between node1 and a1 are removed, then traffic from the client to a1
/// must resolve them again. The programs saw the IPv6 frames (the IPv6 path's `xdp_ipv6` counter
/// grows by at least as many as the exchanges need) and passed them: none is a frontend's.
fn ipv6_passes_through_agents(v: Variant) {
    let Some(s) = lb_tests::scenario::start_example_on(v) else {
        return;
    };
    let lab = &s.lab;
    check_ipv6(lab);

    let client = lab.netns("client");
    let node1 = lab.node("node1");
    let a1 = lab.pod("a1");
    ip(
        &client,
        &[
            "-6",
            "neigh",
            "del",
            &node1.addr6.to_string(),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    ip(
        &node1.netns,
        &[
            "-6",
            "neigh",
            "del",
            &CLIENT_ADDR6.to_string(),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    ip(&node1.netns, &["-6", "neigh", "flush", "dev", "cni0"]).unwrap();
    ip(&a1.netns, &["-6", "neigh", "flush", "dev", "eth0"]).unwrap();
    assert_eq!(neighbour(&client, node1.addr6, "eth0"), None);
    assert_eq!(neighbour(&a1.netns, node1.gateway6, "eth0"), None);

    let before = s.stats("node1");
    let target = at(a1.addr6, 8080);
    echo6(lab, "client", "tcp", &target, "a1", CLIENT_ADDR6);
    echo6(lab, "client", "udp", &target, "a1", CLIENT_ADDR6);
    let after = s.stats("node1");

    let resolved = [
        (&client, node1.addr6, "eth0", mac(&node1.netns, "eth0")),
        (&node1.netns, CLIENT_ADDR6, "eth0", mac(&client, "eth0")),
        (&node1.netns, a1.addr6, "cni0", mac(&a1.netns, "eth0")),
        (&a1.netns, node1.gateway6, "eth0", mac(&node1.netns, "cni0")),
    ];
    for (ns, addr, dev, want) in resolved {
        let (got, state) = neighbour(ns, addr, dev)
            .unwrap_or_else(|| panic!("{ns}: no neighbour entry for {addr} on {dev}"));
        assert_eq!(got, want, "{ns}: {addr} on {dev} ({state})");
        assert!(
            ["REACHABLE", "STALE", "DELAY", "PROBE"].contains(&state.as_str()),
            "{ns}: {addr} on {dev}: {state}"
        );
    }
    // 5 TCP connections (at least SYN, ACK, data, FIN, ACK in each direction through eth0:
    // the client's half comes in on eth0) and 5 UDP requests, plus the neighbour solicitations
    // and advertisements, all went through node1's programs' IPv6 path and passed.
    let passed = after["xdp_ipv6"] - before["xdp_ipv6"];
    eprintln!("{}: node1 passed {passed} IPv6 frames", v.name());
    assert!(passed >= 5 * 4 + 5, "{passed}: {before:?} {after:?}");
    // None of them was translated: the IPv4 translation counters stayed where they were.
    for c in [
        "xdp_new_flow",
        "xdp_translated_pass",
        "xdp_reply",
        "tc_reply",
    ] {
        assert_eq!(before.get(c), after.get(c), "{c}");
    }
}
on_both_variants!(ipv6_passes_through_agents: lab_ipv6_passes_through_agents_plain, lab_ipv6_passes_through_agents_xdp);
