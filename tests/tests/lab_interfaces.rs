//! Traffic that arrives on an interface of the node that is not its `--device` (issue 13, points
//! 4 to 6), in the reference lab on both variants: a guest behind node1's `cni0` (a namespace
//! on the pod bridge, outside the node's cgroup, so no socket-level program sees its sockets: a
//! VM or nested namespace) reaches NodePorts, LoadBalancer IPs, external IPs and ClusterIPs
//! through the tc programs the agent attaches to `cni0`; the off-node client reaches a ClusterIP
//! routed to node1, masqueraded; and externalTrafficPolicy Cluster traffic to a local backend
//! keeps the client's address only while every interface with a route runs our programs.
use std::time::{Duration, Instant};

use lb_tests::{
    lab::{all_ok, Exchange},
    netns, on_both_variants,
    scenario::{start_example_on as setup, with_ipv6_north_south_services, Running},
    Variant,
};

const GUEST: &str = "vm1";
const GUEST_ADDR: &str = "10.244.1.50";
const GUEST_ADDR6: &str = "fd00:244:1::50";
const NODE1: &str = "192.168.100.1";
const CLIENT: &str = "192.168.100.100";

fn seen_ip(e: &Exchange) -> String {
    e.seen_ip().expect("the echo server's view").to_string()
}

/// `lbctl config -o json` of node1's agent.
fn config(s: &Running) -> serde_json::Value {
    let v = s.lbctl_json("node1", "config");
    v.as_array().map_or(v.clone(), |a| a[0].clone())
}

/// Waits until node1's config says `masquerade_local_backends == want` (the agent rescans its
/// interfaces every 2 s).
fn wait_masquerade(s: &Running, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let c = config(s);
        if c["masquerade_local_backends"] == serde_json::Value::Bool(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "masquerade_local_backends never became {want}: {c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the guest asks for and what the backends should see, per family: the example
/// manifests' Services for IPv4, [`with_ipv6_north_south_services`] for IPv6.
struct GuestFrontends {
    /// The guest's address (in node1's pod CIDR) and node1's (the masquerade source).
    guest: &'static str,
    node: &'static str,
    /// web-cluster(6) (externalTrafficPolicy Cluster, its only backend b1 on node2): NodePort
    /// over TCP and UDP, LoadBalancer IP over TCP.
    cluster: [(&'static str, &'static str); 3],
    /// web-local(6)'s NodePort (externalTrafficPolicy Local, backend a1 on node1).
    local_node_port: &'static str,
    /// The external IP (a2 on node1, b2 on node2).
    external_ip: &'static str,
    /// The ClusterIPs of web-cluster(6) (remote backend b1) and web-local(6) (local backend a1).
    cluster_ip_remote: &'static str,
    cluster_ip_local: &'static str,
}

const GUEST4: GuestFrontends = GuestFrontends {
    guest: GUEST_ADDR,
    node: NODE1,
    cluster: [
        ("tcp", "192.168.100.1:30090"),
        ("udp", "192.168.100.1:30090"),
        ("tcp", "203.0.113.11:80"),
    ],
    local_node_port: "192.168.100.1:30080",
    external_ip: "198.51.100.50:80",
    cluster_ip_remote: "10.96.0.41:80",
    cluster_ip_local: "10.96.0.40:80",
};

const GUEST6: GuestFrontends = GuestFrontends {
    guest: GUEST_ADDR6,
    node: "fd00:100::1",
    cluster: [
        ("tcp", "[fd00:100::1]:30190"),
        ("udp", "[fd00:100::1]:30190"),
        ("tcp", "[fd00:203::11]:80"),
    ],
    local_node_port: "[fd00:100::1]:30180",
    external_ip: "[fd00:198::50]:80",
    cluster_ip_remote: "[fd00:96::141]:80",
    cluster_ip_local: "[fd00:96::140]:80",
};

/// The guest behind node1's cni0 reaches every kind of frontend of one family (`f`) through the
/// programs on cni0.
fn guest_reaches_every_frontend_of(v: Variant, f: &GuestFrontends) {
    let Some(mut s) = setup(v) else { return };
    s.agents[0]
        .wait_for_log(
            "interface cni0: tc ingress and egress attached",
            Duration::from_secs(10),
        )
        .unwrap();
    let c = config(&s);
    assert_eq!(c["interfaces"], serde_json::json!(["cni0"]), "{c}");
    assert_eq!(c["pod_cidr"], "10.244.1.0/24", "{c}");
    assert_eq!(c["masquerade_local_backends"], false, "{c}");
    if f.guest.contains(':') {
        s.apply(&with_ipv6_north_south_services(), 2);
    }
    s.lab
        .add_guest(
            "node1",
            GUEST,
            GUEST_ADDR.parse().unwrap(),
            GUEST_ADDR6.parse().unwrap(),
        )
        .unwrap();

    // NodePort, LoadBalancer IP and external IP arriving on cni0 (not a --device).
    // web-cluster (externalTrafficPolicy Cluster, its only backend b1 on node2): masqueraded.
    for (proto, target) in f.cluster {
        let ex = s
            .lab
            .run_client(GUEST, &[proto, target, "--count", "10"])
            .unwrap();
        all_ok(&ex, &format!("{proto} {target} from the guest"));
        for e in &ex {
            assert_eq!(e.backend.as_deref(), Some("b1"), "{e:?}");
            assert_eq!(seen_ip(e), f.node, "{e:?}");
            assert_eq!(e.peer_addr().unwrap().to_string(), target, "{e:?}");
        }
    }
    // web-local (externalTrafficPolicy Local, backend a1 on node1): the guest and a1 share
    // the pod bridge, so a1's reply would go straight back over it, past every program: a
    // source in the pod CIDR going to a local backend is masqueraded whatever the policy.
    let ex = s.lab.tcp(GUEST, f.local_node_port, 10).unwrap();
    all_ok(&ex, "NodePort of web-local from the guest");
    for e in &ex {
        assert_eq!(e.backend.as_deref(), Some("a1"), "{e:?}");
        assert_eq!(seen_ip(e), f.node, "{e:?}");
        assert_eq!(
            e.peer_addr().unwrap().to_string(),
            f.local_node_port,
            "{e:?}"
        );
    }
    // The external IP (a2 on node1, b2 on node2), both backends reached.
    let ex = s.lab.tcp(GUEST, f.external_ip, 30).unwrap();
    all_ok(&ex, "external IP from the guest");
    assert!(
        ex.iter().any(|e| e.backend.as_deref() == Some("a2")),
        "{ex:?}"
    );
    assert!(
        ex.iter().any(|e| e.backend.as_deref() == Some("b2")),
        "{ex:?}"
    );

    // ClusterIPs from a source in node1's pod CIDR: a remote backend sees the guest (its
    // replies come back through node1's eth0)...
    for proto in ["tcp", "udp"] {
        let ex = s
            .lab
            .run_client(GUEST, &[proto, f.cluster_ip_remote, "--count", "10"])
            .unwrap();
        all_ok(
            &ex,
            &format!("{proto} ClusterIP of web-cluster from the guest"),
        );
        for e in &ex {
            assert_eq!(e.backend.as_deref(), Some("b1"), "{e:?}");
            assert_eq!(seen_ip(e), f.guest, "{e:?}");
            assert_eq!(
                e.peer_addr().unwrap().to_string(),
                f.cluster_ip_remote,
                "{e:?}"
            );
        }
    }
    // ...a local backend sees node1 (the reply would otherwise cross the bridge past us).
    for proto in ["tcp", "udp"] {
        let ex = s
            .lab
            .run_client(GUEST, &[proto, f.cluster_ip_local, "--count", "10"])
            .unwrap();
        all_ok(
            &ex,
            &format!("{proto} ClusterIP of web-local from the guest"),
        );
        for e in &ex {
            assert_eq!(e.backend.as_deref(), Some("a1"), "{e:?}");
            assert_eq!(seen_ip(e), f.node, "{e:?}");
            assert_eq!(
                e.peer_addr().unwrap().to_string(),
                f.cluster_ip_local,
                "{e:?}"
            );
        }
    }
    // The program on cni0 did it: the north-south counters of node1 saw new flows.
    assert!(s.stats("node1")["xdp_new_flow"] > 0);
}

fn guest_reaches_every_frontend(v: Variant) {
    guest_reaches_every_frontend_of(v, &GUEST4)
}
on_both_variants!(guest_reaches_every_frontend: lab_guest_behind_the_node_reaches_every_frontend_plain, lab_guest_behind_the_node_reaches_every_frontend_xdp);

fn guest_reaches_every_frontend6(v: Variant) {
    guest_reaches_every_frontend_of(v, &GUEST6)
}
on_both_variants!(guest_reaches_every_frontend6: lab_guest_behind_the_node_reaches_every_frontend6_plain, lab_guest_behind_the_node_reaches_every_frontend6_xdp);

fn off_node_client_reaches_a_cluster_ip(v: Variant) {
    let Some(s) = setup(v) else { return };
    s.lab.client_route("10.96.0.0/24", "node1").unwrap();
    // A remote backend (b1 on node2) and a local one (a1 on node1): both see node1, the client
    // being no local pod.
    for (target, backend) in [("10.96.0.41:80", "b1"), ("10.96.0.40:80", "a1")] {
        for proto in ["tcp", "udp"] {
            let ex = s
                .lab
                .run_client("client", &[proto, target, "--count", "10"])
                .unwrap();
            all_ok(&ex, &format!("{proto} {target} from the client"));
            for e in &ex {
                assert_eq!(e.backend.as_deref(), Some(backend), "{e:?}");
                assert_eq!(seen_ip(e), NODE1, "{e:?}");
                assert_eq!(e.peer_addr().unwrap().to_string(), target, "{e:?}");
            }
        }
    }
}
on_both_variants!(off_node_client_reaches_a_cluster_ip: lab_off_node_client_reaches_a_cluster_ip_plain, lab_off_node_client_reaches_a_cluster_ip_xdp);

/// A NodePort Service (externalTrafficPolicy Cluster) whose only backend, a1, runs on node1.
const NP_A1: &str = "
---
apiVersion: v1
kind: Service
metadata: {name: np-a1, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.70
  selector: {app: np-a1}
  ports:
  - {name: tcp, port: 80, targetPort: 8080, nodePort: 30110}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: np-a1-1
  namespace: default
  labels: {kubernetes.io/service-name: np-a1}
addressType: IPv4
ports:
- {name: tcp, port: 8080}
endpoints:
- {addresses: [10.244.1.10], nodeName: node1}
";

/// The IPv6 twin of [`NP_A1`]: an IPv6-only NodePort Service (externalTrafficPolicy Cluster)
/// whose only backend, a1, runs on node1.
const NP_A1_6: &str = "
---
apiVersion: v1
kind: Service
metadata: {name: np-a1-6, namespace: default}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIPs: [\"fd00:96::70\"]
  selector: {app: np-a1-6}
  ports:
  - {name: tcp, port: 80, targetPort: 8080, nodePort: 30110}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: np-a1-6-1
  namespace: default
  labels: {kubernetes.io/service-name: np-a1-6}
addressType: IPv6
ports:
- {name: tcp, port: 8080}
endpoints:
- {addresses: [\"fd00:244:1::10\"], nodeName: node1}
";

/// The reply rule's test, per family: the Service, its NodePort on node1, the client's and
/// node1's addresses, and a route and an address for the test interface.
struct ReplyRule {
    manifest: &'static str,
    node_port: &'static str,
    client: &'static str,
    node: &'static str,
    route: &'static str,
    addr: &'static str,
}

const REPLY_RULE4: ReplyRule = ReplyRule {
    manifest: NP_A1,
    node_port: "192.168.100.1:30110",
    client: CLIENT,
    node: NODE1,
    route: "198.18.0.0/24",
    addr: "198.18.0.1/24",
};

const REPLY_RULE6: ReplyRule = ReplyRule {
    manifest: NP_A1_6,
    node_port: "[fd00:100::1]:30110",
    client: "fd00:100::100",
    node: "fd00:100::1",
    route: "fd00:198:18::/64",
    addr: "fd00:198:18::1/64",
};

fn cluster_policy_local_backend_reply_rule_of(v: Variant, f: &ReplyRule) {
    let Some(mut s) = setup(v) else { return };
    let text = format!("{}{}", lb_tests::scenario::example_manifests(), f.manifest);
    s.apply(&text, 2);
    let ask = |s: &Running| {
        let ex = s.lab.tcp("client", f.node_port, 10).unwrap();
        all_ok(&ex, "NodePort of np-a1");
        assert!(
            ex.iter().all(|e| e.backend.as_deref() == Some("a1")),
            "{ex:?}"
        );
        let mut seen: Vec<String> = ex.iter().map(seen_ip).collect();
        seen.dedup();
        seen
    };
    // Every interface with a route (eth0, cni0) runs our programs: the client's address.
    wait_masquerade(&s, false);
    assert_eq!(ask(&s), [f.client]);
    // An interface with a route but no address (so not hooked): replies leaving by it would
    // not be translated, so local backends get the masquerade.
    let ns = s.lab.node("node1").netns.clone();
    // (A veth pair inside node1: this kernel may lack the dummy driver.)
    netns::ip(
        &ns,
        &[
            "link", "add", "lbtest0", "type", "veth", "peer", "name", "lbtest1",
        ],
    )
    .unwrap();
    if f.route.contains(':') {
        // IPv6 is off on the lab's new interfaces; on, lbtest0 gets a link-local address and
        // its fe80::/64 route, which count for nothing.
        netns::exec_in(
            &ns,
            "sysctl",
            &["-q", "-w", "net.ipv6.conf.lbtest0.disable_ipv6=0"],
        )
        .unwrap();
    }
    netns::ip(&ns, &["link", "set", "lbtest0", "up"]).unwrap();
    netns::ip(&ns, &["link", "set", "lbtest1", "up"]).unwrap();
    netns::ip(&ns, &["route", "add", f.route, "dev", "lbtest0"]).unwrap();
    wait_masquerade(&s, true);
    assert_eq!(ask(&s), [f.node]);
    // Given an address, it is hooked like cni0, and the guarantee is back.
    let mut add = vec!["addr", "add", f.addr, "dev", "lbtest0"];
    if f.addr.contains(':') {
        add.push("nodad"); // usable at once
    }
    netns::ip(&ns, &add).unwrap();
    wait_masquerade(&s, false);
    let c = config(&s);
    assert_eq!(
        c["interfaces"],
        serde_json::json!(["cni0", "lbtest0"]),
        "{c}"
    );
    assert_eq!(ask(&s), [f.client]);
    // Gone: unhooked, its pins removed.
    netns::ip(&ns, &["link", "del", "lbtest0"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while config(&s)["interfaces"] != serde_json::json!(["cni0"]) {
        assert!(
            Instant::now() < deadline,
            "lbtest0 still hooked: {}",
            config(&s)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ask(&s), [f.client]);
}

fn cluster_policy_local_backend_reply_rule(v: Variant) {
    cluster_policy_local_backend_reply_rule_of(v, &REPLY_RULE4)
}
on_both_variants!(cluster_policy_local_backend_reply_rule: lab_cluster_policy_local_backend_reply_rule_plain, lab_cluster_policy_local_backend_reply_rule_xdp);

fn cluster_policy_local_backend_reply_rule6(v: Variant) {
    cluster_policy_local_backend_reply_rule_of(v, &REPLY_RULE6)
}
on_both_variants!(cluster_policy_local_backend_reply_rule6: lab_cluster_policy_local_backend_reply_rule6_plain, lab_cluster_policy_local_backend_reply_rule6_xdp);
