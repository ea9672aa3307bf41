//! Upstream's Service e2e scenarios (kubernetes test/e2e/network: service.go, conntrack.go,
//! loadbalancer.go) that a node proxy decides, ported to the lab (issue 15 point 7). Each test
//! names the upstream scenarios it ports; the README's "Upstream Service e2e scenarios" table
//! maps every one to its test here or elsewhere, with its status.
//!
//! Every test starts the example lab (one agent per node; the tests of north-south paths on both
//! lab variants, `_plain` and `_xdp`, the others on the XDP one) and then drives its own
//! Services and EndpointSlices through the manifests source, appended to the example's objects:
//! a "pod deleted" is its endpoint leaving the slice, a "pod terminating" its endpoint's
//! conditions, as the EndpointSlice controller would write them.
//!
//! Every test has an IPv6 twin (`…6`): the same body on IPv6-only Services (IPv6 ClusterIPs
//! `fd00:96::1:N` for `10.96.1.N`, IPv6 EndpointSlices of the pods' IPv6 addresses, load
//! balancer addresses `fd00:203::N` for `203.0.113.N`), reached at the nodes' and the client's
//! IPv6 addresses ([`Family`]).
use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use lb_tests::{
    lab::{all_ok, Exchange},
    on_both_variants,
    scenario::{example_manifests, http_get, in_netns, start_example, start_example_on, Running},
    Variant,
};

/// The IP family of a test's Services, endpoints and addresses: IPv4, or IPv6-only Services
/// reached over IPv6.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// `addr:port`, an IPv6 address in brackets.
    fn at(self, addr: &str, port: u16) -> String {
        match self {
            Family::V4 => format!("{addr}:{port}"),
            Family::V6 => format!("[{addr}]:{port}"),
        }
    }

    /// This file's ClusterIP `n`: 10.96.1.n or fd00:96::1:n.
    fn cluster_ip(self, n: u8) -> String {
        match self {
            Family::V4 => format!("10.96.1.{n}"),
            Family::V6 => format!("fd00:96::1:{n}"),
        }
    }

    /// The Service spec fields that give it ClusterIP `n` (and only this family).
    fn cluster_ip_spec(self, n: u8) -> String {
        match self {
            Family::V4 => format!("clusterIP: {}", self.cluster_ip(n)),
            Family::V6 => format!(
                "ipFamilies: [IPv6], clusterIPs: [\"{}\"]",
                self.cluster_ip(n)
            ),
        }
    }

    /// ClusterIP `n`, port `port`.
    fn service(self, n: u8, port: u16) -> String {
        self.at(&self.cluster_ip(n), port)
    }

    /// Load balancer address `n`: 203.0.113.n or fd00:203::n.
    fn lb_ip(self, n: u8) -> String {
        match self {
            Family::V4 => format!("203.0.113.{n}"),
            Family::V6 => format!("fd00:203::{n}"),
        }
    }

    /// A Service status with load balancer address `n`.
    fn lb_status(self, n: u8) -> String {
        format!(
            "status: {{loadBalancer: {{ingress: [{{ip: {}}}]}}}}\n",
            self.yaml(&self.lb_ip(n))
        )
    }

    /// Load balancer address `n`, port `port`.
    fn lb(self, n: u8, port: u16) -> String {
        self.at(&self.lb_ip(n), port)
    }

    /// Routes load balancer address `n` from the client to node1, as a cloud load balancer
    /// would pick it.
    fn route_lb_to_node1(self, s: &Running, n: u8) {
        let len = if self == Family::V4 { 32 } else { 128 };
        s.lab
            .client_route(&format!("{}/{len}", self.lb_ip(n)), "node1")
            .unwrap();
    }

    /// Node `n`'s fabric address.
    fn node(self, n: u8) -> String {
        match self {
            Family::V4 => format!("192.168.100.{n}"),
            Family::V6 => format!("fd00:100::{n}"),
        }
    }

    /// Node `n`'s address, port `port`.
    fn node_port(self, n: u8, port: u16) -> String {
        self.at(&self.node(n), port)
    }

    /// The external client's address.
    fn client(self) -> String {
        match self {
            Family::V4 => "192.168.100.100".into(),
            Family::V6 => "fd00:100::100".into(),
        }
    }

    /// Lab pod `pod`'s address.
    fn pod_ip(self, s: &Running, pod: &str) -> String {
        match self {
            Family::V4 => s.lab.pod_addr(pod).to_string(),
            Family::V6 => s.lab.pod_addr6(pod).to_string(),
        }
    }

    /// `addr` as a YAML scalar (an IPv6 address quoted).
    fn yaml(self, addr: &str) -> String {
        match self {
            Family::V4 => addr.into(),
            Family::V6 => format!("\"{addr}\""),
        }
    }
}

/// The example manifests plus `docs` (YAML documents separated by `---`).
fn with(docs: &[String]) -> String {
    let mut text = example_manifests();
    for d in docs {
        text.push_str("\n---\n");
        text.push_str(d);
    }
    text
}

/// A Service in namespace default; `labels` and `spec` are the inside of YAML flow mappings,
/// `status` a whole `status:` line or empty.
fn service(name: &str, labels: &str, spec: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\n\
         metadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}\n\
         spec: {{{spec}}}\n{status}"
    )
}

/// The EndpointSlice (of family `f`) of Service `name` (ports `tcp` and `udp` on 8080), with
/// extra `labels` (starting with `, `) and the given endpoints.
fn slice(f: Family, name: &str, labels: &str, endpoints: &[String]) -> String {
    let address_type = match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}{labels}}}}}\n\
         addressType: {address_type}\n\
         ports: [{{name: tcp, port: 8080}}, {{name: udp, port: 8080, protocol: UDP}}]\n\
         endpoints: [{}]\n",
        endpoints.join(", ")
    )
}

/// Endpoint conditions as the EndpointSlice controller writes them.
const READY: &str = "";
/// A pod being deleted that still serves (preStop hook running).
const TERMINATING_SERVING: &str = ", conditions: {ready: false, serving: true, terminating: true}";
/// A pod being deleted that no longer serves.
const TERMINATING_GONE: &str = ", conditions: {ready: false, serving: false, terminating: true}";
/// A pod that is not ready (yet).
const NOT_READY: &str = ", conditions: {ready: false, serving: false, terminating: false}";

/// The endpoint (of family `f`) of lab pod `pod` with `conditions`.
fn ep(f: Family, pod: &str, conditions: &str) -> String {
    let (node, host, zone) = match pod {
        "a1" => (1, 10, "zone-a"),
        "a2" => (1, 11, "zone-a"),
        "b1" => (2, 10, "zone-b"),
        "b2" => (2, 11, "zone-b"),
        _ => panic!("no lab pod {pod}"),
    };
    let addr = match f {
        Family::V4 => format!("10.244.{node}.{host}"),
        Family::V6 => format!("\"fd00:244:{node}::{host}\""),
    };
    format!("{{addresses: [{addr}], nodeName: node{node}, zone: {zone}{conditions}}}")
}

/// Ports `tcp` and `udp` on `port`, to 8080, with `extra` (e.g. `, nodePort: 30200`) on both.
fn tcp_udp(port: u16, extra: &str) -> String {
    format!(
        "ports: [{{name: tcp, port: {port}, targetPort: 8080{extra}}}, \
         {{name: udp, port: {port}, targetPort: 8080, protocol: UDP{extra}}}]"
    )
}

/// `count` exchanges from `at`, which must all succeed.
fn ok(s: &Running, at: &str, proto: &str, target: &str, count: u32) -> Vec<Exchange> {
    let ex = s
        .lab
        .run_client(at, &[proto, target, "--count", &count.to_string()])
        .unwrap();
    assert_eq!(ex.len(), count as usize);
    all_ok(&ex, &format!("{proto} {target} from {at}"));
    ex
}

/// Two exchanges from `at` (700 ms each at most), which must both fail; returns them.
fn fails(s: &Running, at: &str, proto: &str, target: &str) -> Vec<Exchange> {
    s.lab.all_fail(at, proto, target, 2, 700)
}

fn backends(ex: &[Exchange]) -> BTreeSet<String> {
    ex.iter().filter_map(|e| e.backend.clone()).collect()
}

fn seen_ip(e: &Exchange) -> String {
    e.seen_ip().unwrap().to_string()
}

/// Whether a TCP connection to `addr` from the client namespace is refused (a port nobody
/// listens on).
fn refused_from_client(s: &Running, addr: String) -> bool {
    in_netns(&s.lab.client_netns, move || {
        std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))
            .map_err(|e| e.kind())
            .err()
            == Some(std::io::ErrorKind::ConnectionRefused)
    })
}

/// service.go "should preserve source pod IP for traffic thru service cluster IP" and "should
/// allow pods to hairpin back to themselves thru services": one backend (a1 on node1); clients
/// on the same node (a2) and on the other node (b2) are seen with their own pod address, over
/// TCP and UDP; a1 reaches itself through the Service.
fn source_pod_ip_is_preserved_through_a_cluster_ip(f: Family) {
    let Some(mut s) = start_example() else { return };
    s.apply(
        &with(&[
            service(
                "sourceip",
                "",
                &format!(
                    "{}, selector: {{app: sourceip}}, {}",
                    f.cluster_ip_spec(1),
                    tcp_udp(80, "")
                ),
                "",
            ),
            slice(f, "sourceip", "", &[ep(f, "a1", READY)]),
        ]),
        2,
    );
    let target = f.service(1, 80);
    // service.go "should allow pods to hairpin back to themselves thru services".
    for proto in ["tcp", "udp"] {
        let ex = ok(&s, "a1", proto, &target, 5);
        assert!(
            ex.iter().all(|e| e.backend.as_deref() == Some("a1")),
            "{ex:?}"
        );
    }
    for client in ["a2", "b2"] {
        let want = f.pod_ip(&s, client);
        for proto in ["tcp", "udp"] {
            for e in ok(&s, client, proto, &target, 5) {
                assert_eq!(e.backend.as_deref(), Some("a1"), "{e:?}");
                assert_eq!(seen_ip(&e), want, "{proto} from {client}: {e:?}");
            }
        }
    }
}
#[test]
fn lab_e2e_source_pod_ip_is_preserved_through_a_cluster_ip() {
    source_pod_ip_is_preserved_through_a_cluster_ip(Family::V4);
}
#[test]
fn lab_e2e_source_pod_ip_is_preserved_through_a_cluster_ip6() {
    source_pod_ip_is_preserved_through_a_cluster_ip(Family::V6);
}

/// service.go "should be able to switch session affinity for service with type clusterIP" and
/// "... for NodePort service", loadbalancer.go "should be able to switch session affinity for
/// LoadBalancer service with ESIPP off" and "... with ESIPP on": three backends, ClientIP
/// affinity on (15 requests in a row reach one backend), off (requests spread), on again; from
/// a pod to the ClusterIP, from the external client to the NodePort and to the load balancer's
/// address of a Cluster and of a Local Service.
fn session_affinity_can_be_switched_off_and_on(v: Variant, f: Family) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    f.route_lb_to_node1(&s, 40);
    f.route_lb_to_node1(&s, 41);
    let text = |affinity: &str| {
        let mut docs = Vec::new();
        for (name, ip, policy, node_port, lb) in [
            ("affinity", 2, "Cluster", 30201, 40),
            (
                "affinity-local",
                3,
                "Local, healthCheckNodePort: 32095",
                30202,
                41,
            ),
        ] {
            docs.push(service(
                name,
                "",
                &format!(
                    "type: LoadBalancer, {}, selector: {{app: {name}}}, \
                     externalTrafficPolicy: {policy}, sessionAffinity: {affinity}, {}",
                    f.cluster_ip_spec(ip),
                    tcp_udp(80, &format!(", nodePort: {node_port}"))
                ),
                &f.lb_status(lb),
            ));
            docs.push(slice(
                f,
                name,
                "",
                &[ep(f, "a1", READY), ep(f, "a2", READY), ep(f, "b1", READY)],
            ));
        }
        with(&docs)
    };
    // Three backends for the first three paths; the Local Service's load balancer reaches the
    // two on node1.
    let paths = [
        ("a1", f.service(2, 80)),
        ("client", f.node_port(1, 30201)),
        ("client", f.lb(40, 80)),
        ("client", f.lb(41, 80)),
    ];
    let check = |s: &Running, holds: bool| {
        for (at, target) in &paths {
            let n = if holds { 15 } else { 30 };
            let b = backends(&ok(s, at, "tcp", target, n));
            if holds {
                assert_eq!(
                    b.len(),
                    1,
                    "affinity must hold for {target} from {at}: {b:?}"
                );
            } else {
                // Two or three backends, 30 independent choices: all on one is 2 in 2^30 at
                // most.
                assert!(
                    b.len() > 1,
                    "affinity must be off for {target} from {at}: {b:?}"
                );
            }
        }
    };
    s.apply(&text("ClientIP"), 2);
    check(&s, true);
    s.apply(&text("None"), 3);
    check(&s, false);
    s.apply(&text("ClientIP"), 4);
    check(&s, true);
}
fn session_affinity_can_be_switched_off_and_on4(v: Variant) {
    session_affinity_can_be_switched_off_and_on(v, Family::V4);
}
on_both_variants!(session_affinity_can_be_switched_off_and_on4: lab_e2e_session_affinity_can_be_switched_off_and_on_plain, lab_e2e_session_affinity_can_be_switched_off_and_on_xdp);
fn session_affinity_can_be_switched_off_and_on6(v: Variant) {
    session_affinity_can_be_switched_off_and_on(v, Family::V6);
}
on_both_variants!(session_affinity_can_be_switched_off_and_on6: lab_e2e_session_affinity_can_be_switched_off_and_on6_plain, lab_e2e_session_affinity_can_be_switched_off_and_on6_xdp);

/// service.go "should implement service.kubernetes.io/service-proxy-name" and "should implement
/// service.kubernetes.io/headless": for each label, one Service always carries it (never
/// served) and one has it toggled (served, not served once labelled, served again once the
/// label is gone). The labels are on the Service and its slice, as the EndpointSlice controller
/// copies them; the agents run without `--service-proxy-name`, as kube-proxy by default.
fn service_proxy_name_and_headless_labels_exclude_a_service(f: Family) {
    let Some(mut s) = start_example() else { return };
    const PROXY: &str = "service.kubernetes.io/service-proxy-name: foo-bar";
    const HEADLESS: &str = "service.kubernetes.io/headless: \"\"";
    let text = |toggled: bool| {
        let mut docs = Vec::new();
        for (name, ip, label) in [
            ("toggled-proxy", 10, if toggled { PROXY } else { "" }),
            ("disabled-proxy", 11, PROXY),
            ("toggled-headless", 12, if toggled { HEADLESS } else { "" }),
            ("disabled-headless", 13, HEADLESS),
        ] {
            let spec = format!(
                "{}, selector: {{app: {name}}}, {}",
                f.cluster_ip_spec(ip),
                tcp_udp(80, "")
            );
            docs.push(service(name, label, &spec, ""));
            let slice_label = if label.is_empty() {
                String::new()
            } else {
                format!(", {label}")
            };
            docs.push(slice(
                f,
                name,
                &slice_label,
                &[ep(f, "a2", READY), ep(f, "b2", READY)],
            ));
        }
        with(&docs)
    };
    let check = |s: &Running, toggled: bool| {
        for at in ["a1", "b1"] {
            for target in [f.service(10, 80), f.service(12, 80)] {
                if toggled {
                    fails(s, at, "tcp", &target);
                } else {
                    ok(s, at, "tcp", &target, 5);
                }
            }
            fails(s, at, "tcp", &f.service(11, 80));
            fails(s, at, "tcp", &f.service(13, 80));
        }
        // Another proxy's Service is not programmed at all.
        let services = s.lbctl_json("node1", "services").to_string();
        assert!(!services.contains(&f.cluster_ip(11)), "{services}");
        assert_eq!(services.contains(&f.cluster_ip(10)), !toggled, "{services}");
    };
    s.apply(&text(false), 2);
    check(&s, false);
    s.apply(&text(true), 3);
    check(&s, true);
    s.apply(&text(false), 4);
    check(&s, false);
}
#[test]
fn lab_e2e_service_proxy_name_and_headless_labels_exclude_a_service() {
    service_proxy_name_and_headless_labels_exclude_a_service(Family::V4);
}
#[test]
fn lab_e2e_service_proxy_name_and_headless_labels_exclude_a_service6() {
    service_proxy_name_and_headless_labels_exclude_a_service(Family::V6);
}

/// service.go "should be rejected when no endpoints exist" and "should be rejected for evicted
/// pods (no endpoints exist)": a Service without any EndpointSlice, and one whose slice is empty
/// (its only pod was evicted); a client pod's TCP connect and UDP send are refused
/// (ECONNREFUSED, kube-proxy's REJECT), from both nodes.
fn service_without_endpoints_is_rejected(f: Family) {
    let Some(mut s) = start_example() else { return };
    s.apply(
        &with(&[
            service(
                "no-endpoints",
                "",
                &format!(
                    "{}, selector: {{app: none}}, {}",
                    f.cluster_ip_spec(20),
                    tcp_udp(80, "")
                ),
                "",
            ),
            service(
                "evicted",
                "",
                &format!(
                    "{}, selector: {{app: evicted}}, {}",
                    f.cluster_ip_spec(21),
                    tcp_udp(80, "")
                ),
                "",
            ),
            // Its only pod was evicted: the slice is empty.
            slice(f, "evicted", "", &[]),
        ]),
        2,
    );
    for at in ["a1", "b2"] {
        for target in [f.service(20, 80), f.service(21, 80)] {
            for proto in ["tcp", "udp"] {
                for e in fails(&s, at, proto, &target) {
                    let err = e.error.clone().unwrap_or_default();
                    assert!(
                        err.starts_with("ConnectionRefused"),
                        "{proto} {target} from {at}: rejected, not dropped: {e:?}"
                    );
                }
            }
        }
    }
}
#[test]
fn lab_e2e_service_without_endpoints_is_rejected() {
    service_without_endpoints_is_rejected(Family::V4);
}
#[test]
fn lab_e2e_service_without_endpoints_is_rejected6() {
    service_without_endpoints_is_rejected(Family::V6);
}

/// The same scenarios for a client outside the cluster (kube-proxy's REJECT rules cover
/// NodePorts too): a NodePort Service without endpoints answers TCP and UDP with an ICMP port
/// unreachable that the datapath builds, so the client's connect or read fails at once with
/// ECONNREFUSED, on both nodes; with externalTrafficPolicy Local and its only endpoint on
/// node2, node1 drops (the client times out, as kube-proxy's DROP) and node2 serves.
fn service_without_endpoints_is_rejected_from_outside(v: Variant, f: Family) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    s.apply(
        &with(&[
            service(
                "np-no-endpoints",
                "",
                &format!(
                    "type: NodePort, {}, selector: {{app: none}}, {}",
                    f.cluster_ip_spec(22),
                    tcp_udp(80, ", nodePort: 30240")
                ),
                "",
            ),
            service(
                "np-local-elsewhere",
                "",
                &format!(
                    "type: NodePort, externalTrafficPolicy: Local, {}, \
                     selector: {{app: elsewhere}}, {}",
                    f.cluster_ip_spec(23),
                    tcp_udp(80, ", nodePort: 30241")
                ),
                "",
            ),
            slice(f, "np-local-elsewhere", "", &[ep(f, "b1", READY)]),
        ]),
        2,
    );
    // UDP on a connected socket: an unconnected one is never told about ICMP errors. 1.5 s
    // each: the client's IPv6 TCP reports the ICMPv6 error that answers its first SYN only at
    // the SYN's retransmission (1 s later; the error arrives while connect() still holds the
    // socket, TcpExtLockDroppedIcmps), where IPv4's reports it at once.
    for node in [1, 2] {
        let target = f.node_port(node, 30240);
        for proto in ["tcp", "udp-connected"] {
            for e in s.lab.all_fail("client", proto, &target, 2, 1500) {
                let err = e.error.clone().unwrap_or_default();
                assert!(
                    err.starts_with("ConnectionRefused"),
                    "{proto} {target} from outside: rejected, not dropped: {e:?}"
                );
            }
        }
    }
    let target = f.node_port(1, 30241);
    for proto in ["tcp", "udp-connected"] {
        for e in fails(&s, "client", proto, &target) {
            let err = e.error.clone().unwrap_or_default();
            assert!(
                !err.starts_with("ConnectionRefused"),
                "{proto} {target} (Local, endpoint on node2): dropped, not rejected: {e:?}"
            );
        }
        ok(&s, "client", proto, &f.node_port(2, 30241), 2);
    }
}
fn service_without_endpoints_is_rejected_from_outside4(v: Variant) {
    service_without_endpoints_is_rejected_from_outside(v, Family::V4);
}
on_both_variants!(service_without_endpoints_is_rejected_from_outside4: lab_e2e_service_without_endpoints_is_rejected_from_outside_plain, lab_e2e_service_without_endpoints_is_rejected_from_outside_xdp);
fn service_without_endpoints_is_rejected_from_outside6(v: Variant) {
    service_without_endpoints_is_rejected_from_outside(v, Family::V6);
}
on_both_variants!(service_without_endpoints_is_rejected_from_outside6: lab_e2e_service_without_endpoints_is_rejected_from_outside6_plain, lab_e2e_service_without_endpoints_is_rejected_from_outside6_xdp);

/// service.go "should be able to update service type to NodePort listening on same port number
/// but different protocols": a TCP ClusterIP Service on port 53 becomes a NodePort Service with
/// TCP and UDP on port 53 and one nodePort; both protocols answer on the ClusterIP and on each
/// node's NodePort.
fn nodeport_serves_tcp_and_udp_on_the_same_port_number(v: Variant, f: Family) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    let eps = [ep(f, "a1", READY), ep(f, "b1", READY)];
    s.apply(
        &with(&[
            service(
                "dns",
                "",
                &format!(
                    "{}, selector: {{app: dns}}, \
                     ports: [{{name: tcp, port: 53, targetPort: 8080}}]",
                    f.cluster_ip_spec(30)
                ),
                "",
            ),
            slice(f, "dns", "", &eps),
        ]),
        2,
    );
    let cluster_ip = f.service(30, 53);
    ok(&s, "a2", "tcp", &cluster_ip, 5);
    // UDP is not a port of the Service yet.
    fails(&s, "a2", "udp", &cluster_ip);
    s.apply(
        &with(&[
            service(
                "dns",
                "",
                &format!(
                    "type: NodePort, {}, selector: {{app: dns}}, {}",
                    f.cluster_ip_spec(30),
                    tcp_udp(53, ", nodePort: 30053")
                ),
                "",
            ),
            slice(f, "dns", "", &eps),
        ]),
        3,
    );
    for proto in ["tcp", "udp"] {
        for (at, target) in [
            ("a2", cluster_ip.clone()),
            ("b2", cluster_ip.clone()),
            ("client", f.node_port(1, 30053)),
            ("client", f.node_port(2, 30053)),
        ] {
            let ex = ok(&s, at, proto, &target, 10);
            assert!(
                ex.iter().all(|e| e.peer.as_deref() == Some(&*target)),
                "{proto} {target} from {at}: replies from the frontend: {ex:?}"
            );
        }
    }
}
fn nodeport_serves_tcp_and_udp_on_the_same_port_number4(v: Variant) {
    nodeport_serves_tcp_and_udp_on_the_same_port_number(v, Family::V4);
}
on_both_variants!(nodeport_serves_tcp_and_udp_on_the_same_port_number4: lab_e2e_nodeport_serves_tcp_and_udp_on_the_same_port_number_plain, lab_e2e_nodeport_serves_tcp_and_udp_on_the_same_port_number_xdp);
fn nodeport_serves_tcp_and_udp_on_the_same_port_number6(v: Variant) {
    nodeport_serves_tcp_and_udp_on_the_same_port_number(v, Family::V6);
}
on_both_variants!(nodeport_serves_tcp_and_udp_on_the_same_port_number6: lab_e2e_nodeport_serves_tcp_and_udp_on_the_same_port_number6_plain, lab_e2e_nodeport_serves_tcp_and_udp_on_the_same_port_number6_xdp);

/// service.go "should be able to up and down services" and "should work after the service has
/// been recreated": two Services up; one deleted (down, the other still up); it is created again
/// with the same ClusterIP, and a third one beside it: all up.
fn services_go_down_and_come_back_when_recreated(f: Family) {
    let Some(mut s) = start_example() else { return };
    let svc = |name: &str, ip: u8| {
        [
            service(
                name,
                "",
                &format!(
                    "{}, selector: {{app: {name}}}, {}",
                    f.cluster_ip_spec(ip),
                    tcp_udp(80, "")
                ),
                "",
            ),
            slice(f, name, "", &[ep(f, "a2", READY), ep(f, "b2", READY)]),
        ]
    };
    let up = |s: &Running, ip: u8| {
        let target = f.service(ip, 80);
        for at in ["a1", "b1"] {
            let b = backends(&ok(s, at, "tcp", &target, 20));
            assert_eq!(
                b,
                BTreeSet::from(["a2".into(), "b2".into()]),
                "{target} from {at}"
            );
            ok(s, at, "udp", &target, 5);
        }
    };
    let one = svc("service1", 40);
    let two = svc("service2", 41);
    let three = svc("service3", 42);
    s.apply(&with(&[one.clone(), two.clone()].concat()), 2);
    up(&s, 40);
    up(&s, 41);
    s.apply(&with(&two), 3);
    for at in ["a1", "b1"] {
        fails(&s, at, "tcp", &f.service(40, 80));
    }
    assert!(!s
        .lbctl_json("node1", "services")
        .to_string()
        .contains(&f.cluster_ip(40)));
    up(&s, 41);
    s.apply(&with(&[one, two, three].concat()), 4);
    up(&s, 40);
    up(&s, 41);
    up(&s, 42);
}
#[test]
fn lab_e2e_services_go_down_and_come_back_when_recreated() {
    services_go_down_and_come_back_when_recreated(Family::V4);
}
#[test]
fn lab_e2e_services_go_down_and_come_back_when_recreated6() {
    services_go_down_and_come_back_when_recreated(Family::V6);
}

/// loadbalancer.go "should be able to change the type and ports of a TCP service" and "... of a
/// UDP service" (without a cloud: the load balancer's address is written into the status, the
/// client routes it to node1), and service.go "should be able to change the type from
/// ClusterIP to ExternalName", "from ExternalName to NodePort", "from NodePort to ExternalName"
/// and "from ExternalName to ClusterIP": ClusterIP -> NodePort -> LoadBalancer -> new nodePort
/// -> new port -> ClusterIP -> ExternalName -> NodePort -> ExternalName -> ClusterIP (a new
/// address, as the API server allocates one); each step serves what the new type and ports say
/// and stops serving what they no longer say.
fn service_type_and_ports_change_and_back(v: Variant, f: Family) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    f.route_lb_to_node1(&s, 20);
    let eps = [ep(f, "a2", READY), ep(f, "b2", READY)];
    let mut generation = 1;
    let mut step = |s: &mut Running, spec: String, status: &str| {
        generation += 1;
        s.apply(
            &with(&[
                service("mutable", "", &spec, status),
                slice(f, "mutable", "", &eps),
            ]),
            generation,
        );
    };
    let lb_status = f.lb_status(20);
    let both = |s: &Running, at: &str, target: &str| {
        ok(s, at, "tcp", target, 6);
        ok(s, at, "udp", target, 6);
    };
    let cluster_ip = |ip: u8, port: u16| {
        format!(
            "{}, selector: {{app: m}}, {}",
            f.cluster_ip_spec(ip),
            tcp_udp(port, "")
        )
    };
    // ClusterIP.
    step(&mut s, cluster_ip(50, 80), "");
    both(&s, "a1", &f.service(50, 80));
    assert!(refused_from_client(&s, f.node_port(1, 30210)));
    // NodePort.
    let np = |port: u16, node_port: u16, ty: &str| {
        format!(
            "type: {ty}, {}, selector: {{app: m}}, {}",
            f.cluster_ip_spec(50),
            tcp_udp(port, &format!(", nodePort: {node_port}"))
        )
    };
    step(&mut s, np(80, 30210, "NodePort"), "");
    both(&s, "a1", &f.service(50, 80));
    both(&s, "client", &f.node_port(1, 30210));
    both(&s, "client", &f.node_port(2, 30210));
    fails(&s, "client", "tcp", &f.lb(20, 80));
    // LoadBalancer.
    step(&mut s, np(80, 30210, "LoadBalancer"), &lb_status);
    both(&s, "client", &f.lb(20, 80));
    both(&s, "client", &f.node_port(1, 30210));
    // A new nodePort: the old one closes.
    step(&mut s, np(80, 30211, "LoadBalancer"), &lb_status);
    both(&s, "client", &f.node_port(2, 30211));
    assert!(refused_from_client(&s, f.node_port(2, 30210)));
    both(&s, "client", &f.lb(20, 80));
    // A new port: the old one stops on the load balancer's address and the ClusterIP.
    step(&mut s, np(81, 30211, "LoadBalancer"), &lb_status);
    both(&s, "client", &f.lb(20, 81));
    both(&s, "a1", &f.service(50, 81));
    fails(&s, "client", "tcp", &f.lb(20, 80));
    fails(&s, "a1", "tcp", &f.service(50, 80));
    // Back to ClusterIP: no nodePort, no load balancer.
    step(&mut s, cluster_ip(50, 81), "");
    both(&s, "a1", &f.service(50, 81));
    assert!(refused_from_client(&s, f.node_port(1, 30211)));
    fails(&s, "client", "tcp", &f.lb(20, 81));
    // ExternalName (the API server clears the clusterIP): nothing left to proxy.
    step(
        &mut s,
        "type: ExternalName, externalName: m.example.com".into(),
        "",
    );
    fails(&s, "a1", "tcp", &f.service(50, 81));
    // And from ExternalName to NodePort.
    step(&mut s, np(80, 30212, "NodePort"), "");
    both(&s, "client", &f.node_port(1, 30212));
    both(&s, "a1", &f.service(50, 80));
    // From NodePort to ExternalName, and from ExternalName to ClusterIP.
    step(
        &mut s,
        "type: ExternalName, externalName: m.example.com".into(),
        "",
    );
    assert!(refused_from_client(&s, f.node_port(1, 30212)));
    fails(&s, "a1", "tcp", &f.service(50, 80));
    step(&mut s, cluster_ip(51, 80), "");
    both(&s, "a1", &f.service(51, 80));
    both(&s, "b1", &f.service(51, 80));
}
fn service_type_and_ports_change_and_back4(v: Variant) {
    service_type_and_ports_change_and_back(v, Family::V4);
}
on_both_variants!(service_type_and_ports_change_and_back4: lab_e2e_service_type_and_ports_change_and_back_plain, lab_e2e_service_type_and_ports_change_and_back_xdp);
fn service_type_and_ports_change_and_back6(v: Variant) {
    service_type_and_ports_change_and_back(v, Family::V6);
}
on_both_variants!(service_type_and_ports_change_and_back6: lab_e2e_service_type_and_ports_change_and_back6_plain, lab_e2e_service_type_and_ports_change_and_back6_xdp);

/// loadbalancer.go (ESIPP) "should work for type=LoadBalancer", "should work for type=NodePort",
/// "should only target nodes with endpoints" and "should handle updates to ExternalTrafficPolicy
/// field": externalTrafficPolicy Local keeps the client's address through the load balancer's
/// address and the NodePort of the node with the endpoint, the node without one serves nothing
/// and its healthCheckNodePort says 503; switched to Cluster the other node serves too (source
/// translated to it) and the health check port closes; back to Local, asking for the same
/// healthCheckNodePort again, as before. Upstream also expects the client address lost through
/// the load balancer under Cluster; here traffic the load balancer sends to the endpoint's own
/// node keeps it (a deliberate difference, README "Differences from kube-proxy"), so that
/// step is checked through the node without the endpoint only.
fn external_traffic_policy_local_with_health_checks_and_updates(v: Variant, f: Family) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    f.route_lb_to_node1(&s, 30);
    let text = |policy: &str| {
        with(&[
            service(
                "esipp",
                "",
                &format!(
                    "type: LoadBalancer, {}, selector: {{app: esipp}}, {policy}, {}",
                    f.cluster_ip_spec(60),
                    tcp_udp(80, ", nodePort: 30220")
                ),
                &f.lb_status(30),
            ),
            slice(f, "esipp", "", &[ep(f, "a1", READY)]),
        ])
    };
    let local = |s: &Running, hc: u16| {
        for proto in ["tcp", "udp"] {
            for target in [f.lb(30, 80), f.node_port(1, 30220)] {
                for e in ok(s, "client", proto, &target, 5) {
                    assert_eq!(e.backend.as_deref(), Some("a1"), "{e:?}");
                    assert_eq!(seen_ip(&e), f.client(), "{proto} {target}: {e:?}");
                }
            }
        }
        fails(s, "client", "tcp", &f.node_port(2, 30220));
        let (code, _, body) = http_get(&s.lab.client_netns, &f.node_port(1, hc), "/healthz");
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["localEndpoints"], 1, "{body}");
        let (code, _, body) = http_get(&s.lab.client_netns, &f.node_port(2, hc), "/healthz");
        assert_eq!(code, 503, "{body}");
    };
    s.apply(
        &text("externalTrafficPolicy: Local, healthCheckNodePort: 32090"),
        2,
    );
    local(&s, 32090);
    s.apply(&text("externalTrafficPolicy: Cluster"), 3);
    for proto in ["tcp", "udp"] {
        for e in ok(&s, "client", proto, &f.node_port(2, 30220), 5) {
            assert_eq!(e.backend.as_deref(), Some("a1"), "{e:?}");
            assert_eq!(
                seen_ip(&e),
                f.node(2),
                "translated to node2's address: {e:?}"
            );
        }
    }
    assert!(refused_from_client(&s, f.node_port(1, 32090)));
    s.apply(
        &text("externalTrafficPolicy: Local, healthCheckNodePort: 32090"),
        4,
    );
    local(&s, 32090);
}
fn external_traffic_policy_local_with_health_checks_and_updates4(v: Variant) {
    external_traffic_policy_local_with_health_checks_and_updates(v, Family::V4);
}
on_both_variants!(external_traffic_policy_local_with_health_checks_and_updates4: lab_e2e_external_traffic_policy_local_with_health_checks_and_updates_plain, lab_e2e_external_traffic_policy_local_with_health_checks_and_updates_xdp);
fn external_traffic_policy_local_with_health_checks_and_updates6(v: Variant) {
    external_traffic_policy_local_with_health_checks_and_updates(v, Family::V6);
}
on_both_variants!(external_traffic_policy_local_with_health_checks_and_updates6: lab_e2e_external_traffic_policy_local_with_health_checks_and_updates6_plain, lab_e2e_external_traffic_policy_local_with_health_checks_and_updates6_xdp);

/// service.go "should respect internalTrafficPolicy=Local Pod to Pod" (and from a host
/// process), "should fallback to terminating endpoints when there are no ready endpoints with
/// internalTrafficPolicy=Cluster", "should fallback to local terminating endpoints when there
/// are no ready endpoints with internalTrafficPolicy=Local", "... with
/// externallTrafficPolicy=Cluster" and "should fallback to local terminating endpoints when
/// there are no ready endpoints with externalTrafficPolicy=Local": the only endpoint (a1, on
/// node1) is terminating but still serving. Cluster policies use it from everywhere, Local ones
/// only on node1; once it stops serving, nothing does; published as ready (publishNotReadyAddresses),
/// it serves again.
fn traffic_policies_and_fallback_to_terminating_endpoints(v: Variant, f: Family) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    let text = |conditions: &str| {
        let mut docs = Vec::new();
        for (name, ip, spec) in [
            ("itp-cluster", 70, "internalTrafficPolicy: Cluster, "),
            ("itp-local", 71, "internalTrafficPolicy: Local, "),
            (
                "etp-cluster",
                72,
                "type: NodePort, externalTrafficPolicy: Cluster, ",
            ),
            (
                "etp-local",
                73,
                "type: NodePort, externalTrafficPolicy: Local, ",
            ),
        ] {
            let node_port = match name {
                "etp-cluster" => ", nodePort: 30230",
                "etp-local" => ", nodePort: 30231",
                _ => "",
            };
            docs.push(service(
                name,
                "",
                &format!(
                    "{spec}{}, selector: {{app: {name}}}, {}",
                    f.cluster_ip_spec(ip),
                    tcp_udp(80, node_port)
                ),
                "",
            ));
            docs.push(slice(f, name, "", &[ep(f, "a1", conditions)]));
        }
        with(&docs)
    };
    let served_by_a1 = |ex: Vec<Exchange>| {
        assert!(
            ex.iter().all(|e| e.backend.as_deref() == Some("a1")),
            "{ex:?}"
        );
    };
    let (itp_cluster, itp_local) = (f.service(70, 80), f.service(71, 80));
    // The pod is ready (service.go "should respect internalTrafficPolicy=Local Pod to Pod" and
    // "... Pod (hostNetwork: true) to Pod"): internalTrafficPolicy Local serves pods and host
    // processes of node1 only.
    s.apply(&text(READY), 2);
    for at in ["a2", "node1"] {
        served_by_a1(ok(&s, at, "tcp", &itp_local, 5));
    }
    for at in ["b2", "node2"] {
        // No endpoint for node2 though the Service has one: refused at once with EPERM
        // (kube-proxy drops, so its clients time out; README "Differences from kube-proxy").
        for e in fails(&s, at, "tcp", &itp_local) {
            let err = e.error.clone().unwrap_or_default();
            assert!(err.starts_with("PermissionDenied"), "from {at}: {e:?}");
        }
    }
    // The pod is being deleted and still serves.
    s.apply(&text(TERMINATING_SERVING), 3);
    for proto in ["tcp", "udp"] {
        // internalTrafficPolicy Cluster: from the other node too.
        served_by_a1(ok(&s, "b2", proto, &itp_cluster, 5));
        served_by_a1(ok(&s, "a2", proto, &itp_cluster, 5));
        // internalTrafficPolicy Local: the node with the terminating endpoint only.
        served_by_a1(ok(&s, "a2", proto, &itp_local, 5));
        fails(&s, "b2", proto, &itp_local);
        // externalTrafficPolicy Cluster: through either node.
        served_by_a1(ok(&s, "client", proto, &f.node_port(2, 30230), 5));
        served_by_a1(ok(&s, "client", proto, &f.node_port(1, 30230), 5));
        // externalTrafficPolicy Local: the node with the endpoint, client address kept.
        let ex = ok(&s, "client", proto, &f.node_port(1, 30231), 5);
        assert!(ex.iter().all(|e| seen_ip(e) == f.client()), "{ex:?}");
        served_by_a1(ex);
        fails(&s, "client", proto, &f.node_port(2, 30231));
    }
    // The pod stops serving (service.go "should not be able to connect to terminating and
    // unready endpoints if PublishNotReadyAddresses is false"): no endpoint is usable for any
    // policy.
    s.apply(&text(TERMINATING_GONE), 4);
    let everywhere = [
        ("b2", itp_cluster),
        ("a2", itp_local),
        ("client", f.node_port(1, 30230)),
        ("client", f.node_port(2, 30230)),
        ("client", f.node_port(1, 30231)),
    ];
    for (at, target) in &everywhere {
        fails(&s, at, "tcp", target);
    }
    // "should be able to connect to terminating and unready endpoints if
    // PublishNotReadyAddresses is true": the EndpointSlice controller then writes the unready
    // terminating pod as ready, and it serves again.
    s.apply(
        &text(", conditions: {ready: true, serving: false, terminating: true}"),
        5,
    );
    for (at, target) in &everywhere {
        served_by_a1(ok(&s, at, "tcp", target, 3));
    }
}
fn traffic_policies_and_fallback_to_terminating_endpoints4(v: Variant) {
    traffic_policies_and_fallback_to_terminating_endpoints(v, Family::V4);
}
on_both_variants!(traffic_policies_and_fallback_to_terminating_endpoints4: lab_e2e_traffic_policies_and_fallback_to_terminating_endpoints_plain, lab_e2e_traffic_policies_and_fallback_to_terminating_endpoints_xdp);
fn traffic_policies_and_fallback_to_terminating_endpoints6(v: Variant) {
    traffic_policies_and_fallback_to_terminating_endpoints(v, Family::V6);
}
on_both_variants!(traffic_policies_and_fallback_to_terminating_endpoints6: lab_e2e_traffic_policies_and_fallback_to_terminating_endpoints6_plain, lab_e2e_traffic_policies_and_fallback_to_terminating_endpoints6_xdp);

/// Found by the rolling-update port: one client port to two frontends that keep the client's
/// address and share a backend (the load balancer address of a Local Service and its NodePort
/// on node1, both to a1). The second connection would meet the first's four-tuple at a1, which
/// would reset it; the node remaps its source port, as Linux NAT (kube-proxy) does on such a
/// clash, and both connections work, each answered as its own frontend.
fn one_client_port_to_two_frontends_of_one_backend(v: Variant, f: Family) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    const PORT: u16 = 45000;
    s.apply(
        &with(&[
            service(
                "clash",
                "",
                &format!(
                    "type: LoadBalancer, {}, selector: {{app: clash}}, \
                     externalTrafficPolicy: Local, healthCheckNodePort: 32097, {}",
                    f.cluster_ip_spec(100),
                    tcp_udp(80, ", nodePort: 30260")
                ),
                &f.lb_status(100),
            ),
            slice(f, "clash", "", &[ep(f, "a1", READY)]),
        ]),
        2,
    );
    f.route_lb_to_node1(&s, 100);
    let (lb, node_port) = (f.lb(100, 80), f.node_port(1, 30260));
    let mut first = s.lab.hold_from("client", &lb, PORT).unwrap();
    let seen = |e: &Exchange, what: &str| {
        assert!(e.ok, "{what}: {e:?}");
        assert_eq!(e.backend.as_deref(), Some("a1"), "{what}: {e:?}");
        assert_eq!(
            seen_ip(e),
            f.client(),
            "{what}: the client's address is kept"
        );
        e.seen_addr().unwrap().port()
    };
    let first_ex = first.first.clone().unwrap();
    assert_eq!(seen(&first_ex, "the first connection"), PORT);
    assert_eq!(first_ex.peer.as_deref(), Some(&*lb));
    let second = s
        .lab
        .run_client(
            "client",
            &["tcp", &node_port, "--source-port", &PORT.to_string()],
        )
        .unwrap();
    assert_eq!(second.len(), 1);
    for e in &second {
        assert_ne!(
            seen(e, "the second connection"),
            PORT,
            "remapped at the backend"
        );
        assert_eq!(e.peer.as_deref(), Some(&*node_port));
    }
    // The first connection is untouched and still answered as the load balancer address.
    let again = first.exchange().unwrap();
    assert_eq!(seen(&again, "the first connection again"), PORT);
    assert_eq!(again.peer.as_deref(), Some(&*lb));
    first.close().unwrap();
    assert!(
        s.stats("node1")["xdp_port_remap"] >= 1,
        "counted as xdp_port_remap"
    );
}
fn one_client_port_to_two_frontends_of_one_backend4(v: Variant) {
    one_client_port_to_two_frontends_of_one_backend(v, Family::V4);
}
on_both_variants!(one_client_port_to_two_frontends_of_one_backend4: lab_e2e_one_client_port_to_two_frontends_of_one_backend_plain, lab_e2e_one_client_port_to_two_frontends_of_one_backend_xdp);
fn one_client_port_to_two_frontends_of_one_backend6(v: Variant) {
    one_client_port_to_two_frontends_of_one_backend(v, Family::V6);
}
on_both_variants!(one_client_port_to_two_frontends_of_one_backend6: lab_e2e_one_client_port_to_two_frontends_of_one_backend6_plain, lab_e2e_one_client_port_to_two_frontends_of_one_backend6_xdp);

/// One UDP exchange from `at` to `target` from source port 12345, on a new socket (as
/// upstream's `nc -u -p`), given at most 500 ms.
fn udp_from_port_12345(s: &Running, at: &str, target: &str) -> Exchange {
    let args = [
        "udp",
        target,
        "--source-port",
        "12345",
        "--timeout-ms",
        "500",
    ];
    s.lab.run_client(at, &args).unwrap().remove(0)
}

/// Sends one UDP exchange per 200 ms from `at` to `target`, always from source port 12345 (a
/// new socket each time, as upstream's `nc -u -p`), until `backend` answers; fails after 15 s.
/// Returns the backends that answered on the way.
fn udp_until(s: &Running, at: &str, target: &str, backend: &str) -> Vec<String> {
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    loop {
        let b = udp_from_port_12345(s, at, target)
            .backend
            .unwrap_or_else(|| "-".into());
        if b == backend {
            return seen;
        }
        seen.push(b);
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{target} from {at} (source port 12345): never answered by {backend}, got {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// conntrack.go "should be able to preserve UDP traffic when server pod cycles for a NodePort
/// service", "... for a ClusterIP service", "... for a ClusterIP service and client is
/// hostNetwork" and "should be able to preserve UDP traffic when initial unready endpoints get
/// ready". Clients on node1 keep sending from one source port to Services whose server pods run
/// on node2: first there is no server (the flows start into nothing), then server b1, then b1
/// and b2, then b2 alone. Each flow must reach b1, then b2 — though b1 still answers anyone
/// sent to it, so a stale translation would show. A NodePort flow from the external client
/// runs beside the pod's. A flow to a Service whose only endpoint (a1) is unready is answered
/// once it gets ready. And conntrack.go "... for a ClusterIP service with InternalTrafficPolicy
/// set to Local", with a host process of node1 as the client.
fn udp_traffic_survives_server_pod_cycles(v: Variant, f: Family) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    let udp = |extra: &str| {
        format!("ports: [{{name: udp, port: 80, targetPort: 8080, protocol: UDP{extra}}}]")
    };
    let text = |servers: &[&str], unready: &str, local: &[&str]| {
        let eps: Vec<String> = servers.iter().map(|p| ep(f, p, READY)).collect();
        let local: Vec<String> = local.iter().map(|p| ep(f, p, READY)).collect();
        with(&[
            service(
                "udp-itp-local",
                "",
                &format!(
                    "{}, selector: {{app: w}}, internalTrafficPolicy: Local, {}",
                    f.cluster_ip_spec(83),
                    udp("")
                ),
                "",
            ),
            slice(f, "udp-itp-local", "", &local),
            service(
                "udp-nodeport",
                "",
                &format!(
                    "type: NodePort, {}, selector: {{app: u}}, {}",
                    f.cluster_ip_spec(80),
                    udp(", nodePort: 30240")
                ),
                "",
            ),
            slice(f, "udp-nodeport", "", &eps),
            service(
                "udp-clusterip",
                "",
                &format!(
                    "{}, selector: {{app: u}}, {}",
                    f.cluster_ip_spec(81),
                    udp("")
                ),
                "",
            ),
            slice(f, "udp-clusterip", "", &eps),
            service(
                "udp-unready",
                "",
                &format!(
                    "{}, selector: {{app: v}}, {}",
                    f.cluster_ip_spec(82),
                    udp("")
                ),
                "",
            ),
            slice(f, "udp-unready", "", &[ep(f, "a1", unready)]),
        ])
    };
    let unready = f.service(82, 80);
    let flows = [
        ("a2", f.node_port(2, 30240)),
        ("client", f.node_port(2, 30240)),
        ("a2", f.service(81, 80)),
        ("node1", f.service(81, 80)),
        ("b2", unready.clone()),
    ];
    // The clients start before any server exists.
    s.apply(&text(&[], NOT_READY, &[]), 2);
    for (at, target) in &flows {
        let e = udp_from_port_12345(&s, at, target);
        assert!(!e.ok, "{target} from {at} answered with no server: {e:?}");
    }
    s.apply(&text(&["b1"], NOT_READY, &[]), 3);
    for (at, target) in &flows[..4] {
        udp_until(&s, at, target, "b1");
    }
    let e = udp_from_port_12345(&s, "b2", &unready);
    assert!(!e.ok, "answered while unready: {e:?}");
    s.apply(&text(&["b1", "b2"], NOT_READY, &[]), 4);
    s.apply(&text(&["b2"], READY, &[]), 5);
    for (at, target) in &flows {
        let want = if *target == unready { "a1" } else { "b2" };
        let on_the_way = udp_until(&s, at, target, want);
        eprintln!("{target} from {at}: before {want} answered: {on_the_way:?}");
    }
    // internalTrafficPolicy Local (upstream's regression test for issue 126934; the client is
    // a host process of node1, whose two pods serve): the local server a1, then a1 and a remote
    // b1, then b1 alone (no local endpoint: the flow goes nowhere for a while), then a new
    // local server a2 beside b1, which the flow must reach.
    let local = |s: &mut Running, servers: &[&str], generation| {
        s.apply(&text(&["b2"], READY, servers), generation);
    };
    let target = f.service(83, 80);
    local(&mut s, &["a1"], 6);
    udp_until(&s, "node1", &target, "a1");
    local(&mut s, &["a1", "b1"], 7);
    local(&mut s, &["b1"], 8);
    for _ in 0..3 {
        let e = udp_from_port_12345(&s, "node1", &target);
        assert!(!e.ok, "answered without a local endpoint: {e:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    local(&mut s, &["b1", "a2"], 9);
    let on_the_way = udp_until(&s, "node1", &target, "a2");
    eprintln!("{target} from node1: before a2 answered: {on_the_way:?}");
}
fn udp_traffic_survives_server_pod_cycles4(v: Variant) {
    udp_traffic_survives_server_pod_cycles(v, Family::V4);
}
on_both_variants!(udp_traffic_survives_server_pod_cycles4: lab_e2e_udp_traffic_survives_server_pod_cycles_plain, lab_e2e_udp_traffic_survives_server_pod_cycles_xdp);
fn udp_traffic_survives_server_pod_cycles6(v: Variant) {
    udp_traffic_survives_server_pod_cycles(v, Family::V6);
}
on_both_variants!(udp_traffic_survives_server_pod_cycles6: lab_e2e_udp_traffic_survives_server_pod_cycles6_plain, lab_e2e_udp_traffic_survives_server_pod_cycles6_xdp);

/// loadbalancer.go "should not have connectivity disruption during rolling update with
/// externalTrafficPolicy=Cluster" and "... =Local": a DaemonSet-like Service (one pod per node)
/// behind a load balancer (its address routed to node1), rolled three times, node by node: the
/// new pod becomes ready while the old one terminates and still serves, then the old one goes.
/// Clients keep connecting through the load balancer all along; upstream accepts 95 % success,
/// and so does this test (it prints what it saw).
fn no_disruption_during_rolling_updates(v: Variant, f: Family) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    f.route_lb_to_node1(&s, 50);
    f.route_lb_to_node1(&s, 51);
    // Per node: the pod of the current version and, while rolling, the old one terminating.
    let text = |pods: &[(&str, &str)]| {
        let eps: Vec<String> = pods.iter().map(|(p, c)| ep(f, p, c)).collect();
        let mut docs = Vec::new();
        for (name, ip, policy, node_port, lb) in [
            ("rolling-cluster", 90, "Cluster", 30250, 50),
            (
                "rolling-local",
                91,
                "Local, healthCheckNodePort: 32096",
                30251,
                51,
            ),
        ] {
            docs.push(service(
                name,
                "",
                &format!(
                    "type: LoadBalancer, {}, selector: {{app: rolling}}, \
                     externalTrafficPolicy: {policy}, {}",
                    f.cluster_ip_spec(ip),
                    tcp_udp(80, &format!(", nodePort: {node_port}"))
                ),
                &f.lb_status(lb),
            ));
            docs.push(slice(f, name, "", &eps));
        }
        with(&docs)
    };
    s.apply(&text(&[("a1", READY), ("b1", READY)]), 2);
    let targets = [f.lb(50, 80), f.lb(51, 80)];
    for t in &targets {
        ok(&s, "client", "tcp", t, 5);
    }
    let stop = AtomicBool::new(false);
    let Running {
        lab,
        manifests,
        agents,
    } = &mut s;
    let (lab, stop) = (&*lab, &stop);
    let (results, one): (Vec<Vec<Exchange>>, &str) = std::thread::scope(|scope| {
        let traffic: Vec<_> = targets
            .iter()
            .map(|target| {
                scope.spawn(move || {
                    let mut all = Vec::new();
                    // Until the rolls are done, and 300 connections at least (a rate needs
                    // a count on a slow machine).
                    while !stop.load(Ordering::SeqCst) || all.len() < 300 {
                        all.extend(
                            lab.run_client("client", &["tcp", target.as_str(), "--count", "10"])
                                .unwrap(),
                        );
                    }
                    all
                })
            })
            .collect();
        // Three rolls, node1's pod first, then node2's: (old, new) pairs per roll.
        let mut generation = 2;
        let mut apply = |pods: &[(&str, &str)]| {
            generation += 1;
            std::fs::write(&*manifests, text(pods)).unwrap();
            for a in agents.iter_mut() {
                a.wait_for_log(
                    &format!("sync generation {generation}:"),
                    Duration::from_secs(20),
                )
                .unwrap();
            }
        };
        let (mut one, mut two) = ("a1", "b1");
        for _ in 0..3 {
            let (new_one, new_two) = if one == "a1" {
                ("a2", "b2")
            } else {
                ("a1", "b1")
            };
            apply(&[(one, TERMINATING_SERVING), (new_one, READY), (two, READY)]);
            apply(&[(new_one, READY), (two, READY)]);
            apply(&[
                (new_one, READY),
                (two, TERMINATING_SERVING),
                (new_two, READY),
            ]);
            apply(&[(new_one, READY), (new_two, READY)]);
            (one, two) = (new_one, new_two);
        }
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        let results = traffic.into_iter().map(|t| t.join().unwrap()).collect();
        (results, one)
    });
    for (target, ex) in targets.iter().zip(&results) {
        let failures: Vec<&Exchange> = ex.iter().filter(|e| !e.ok).collect();
        let failed = failures.len();
        for failure in failures.iter().take(5) {
            eprintln!(
                "{target}: failed: {:?} after {} ms",
                failure.error, failure.elapsed_ms
            );
        }
        let served = backends(ex);
        eprintln!(
            "{target}: {} connections through 12 changes, {failed} failed, served by {served:?}",
            ex.len()
        );
        assert!(
            failed * 20 <= ex.len(),
            "{target}: {failed} of {} failed (more than 5 %), first {:?}",
            ex.len(),
            ex.iter().find(|e| !e.ok)
        );
    }
    // Afterwards the load balancer reaches the last version's pods only (the old ones still
    // answer whoever is sent to them). Reachable, as upstream checks: connections reset under
    // churn (see the README) may hit these too.
    let last = if one == "a1" {
        ["a1", "b1"]
    } else {
        ["a2", "b2"]
    };
    for t in &targets {
        let ex = s
            .lab
            .run_client("client", &["tcp", t, "--count", "10"])
            .unwrap();
        let served = backends(&ex);
        assert!(
            !served.is_empty(),
            "{t} unreachable after the rolls: {ex:?}"
        );
        assert!(
            served.iter().all(|b| last.contains(&b.as_str())),
            "{t}: served by {served:?}, the last version is {last:?}"
        );
    }
}
fn no_disruption_during_rolling_updates4(v: Variant) {
    no_disruption_during_rolling_updates(v, Family::V4);
}
on_both_variants!(no_disruption_during_rolling_updates4: lab_e2e_no_disruption_during_rolling_updates_plain, lab_e2e_no_disruption_during_rolling_updates_xdp);
fn no_disruption_during_rolling_updates6(v: Variant) {
    no_disruption_during_rolling_updates(v, Family::V6);
}
on_both_variants!(no_disruption_during_rolling_updates6: lab_e2e_no_disruption_during_rolling_updates6_plain, lab_e2e_no_disruption_during_rolling_updates6_xdp);
