//! What the fuzz targets check: the pipeline source → model → plan → desired maps and the
//! `lb-agent render` JSON never panics, and its results hang together:
//!
//! - a parse error names the file and a document number ≥ 1 (and not past the last document);
//! - objects are defaulted as the API server would (a non-empty namespace, port protocols,
//!   target ports);
//! - every rejected object names its kind, namespace and name (those of an input object; a
//!   nameless object's reason says so) and a reason, and the plan and render carry the same;
//! - accepted Services are named input Services; their ports are unique by (name, protocol) and
//!   their endpoints sorted and unique by address and port;
//! - every planned endpoint is an endpoint of its Service port; local ones are on this node;
//! - every desired frontend belongs to a planned frontend, has unique backends of its own
//!   protocol and its flags say what the plan says;
//! - the render JSON has the documented shape;
//! - the Service ports that fit in small maps (`capacity::fit`) need no more than the maps
//!   hold, and every other one is rejected, naming the map.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use lb_userspace::{
    control::{
        desired::{self, Desired},
        model::{self, IpFamily, Model, Protocol, TrafficPolicy},
        plan::{self, FrontendKind, Plan, PlannedEndpoint},
        source::{Objects, SourceError},
    },
    dataplane::capacity::{self, MapSizes},
};

/// Always planned for, besides the names the objects mention.
pub const NODE: &str = "node-a";
/// At most this many node names are planned for per input (each one is a full model + plan).
const MAX_NODES: usize = 4;

/// The path handed to `source::parse_into`.
pub const PATH: &str = "fuzz.yaml";

/// An upper bound of the documents in a YAML text: one, plus one per line that starts with a
/// document marker (`---` or `...`).
pub fn max_documents(text: &str) -> usize {
    1 + text
        .lines()
        .filter(|l| l.starts_with("---") || l.starts_with("..."))
        .count()
}

/// `source::parse_into` may only fail with a parse error naming the file and a document ≥ 1, and
/// not beyond the text's documents: at most one more, for content after a finished document that
/// does not start a new one with `---` (`did not find expected <document start>`).
pub fn check_parse_error(err: &SourceError, text: &str) {
    let documents = max_documents(text);
    match err {
        SourceError::Parse {
            path,
            document,
            message,
        } => {
            assert_eq!(path.to_str(), Some(PATH));
            assert!(*document >= 1, "document numbers start at 1: {err}");
            assert!(
                *document <= documents + 1,
                "document {document} of at most {documents}: {err}"
            );
            assert!(!message.is_empty(), "{err:?}");
            let text = err.to_string();
            assert!(
                text.starts_with(&format!("{PATH}: document {document}: ")),
                "{text}"
            );
        }
        SourceError::Io { .. } => panic!("parse_into returned an I/O error: {err}"),
    }
}

/// Node names to plan for: [`NODE`], then the names of Nodes and of endpoints' `nodeName`, so
/// local endpoints and NodePorts are exercised without the fuzzer having to guess a name.
pub fn node_names(objects: &Objects) -> Vec<String> {
    let mut names = vec![NODE.to_string()];
    let from_nodes = objects.nodes.iter().filter_map(|n| n.metadata.name.clone());
    let from_endpoints = objects
        .endpoint_slices
        .iter()
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter_map(|e| e.node_name.clone());
    for n in from_nodes.chain(from_endpoints) {
        if names.len() >= MAX_NODES {
            break;
        }
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

/// The whole pipeline for every node name, with every invariant.
pub fn check_pipeline(objects: &Objects) {
    check_defaulted(objects);
    for node in node_names(objects) {
        let m = model::build(objects, &node);
        check_model(objects, &node, &m);
        let p = plan::plan(&m, &node);
        check_plan(&m, &node, &p);
        check_desired(&p, &desired::desired(&p));
        check_render(&p);
        check_fit(&p);
    }
}

/// Small maps: what `capacity::fit` keeps fits in them, counted independently of its code.
fn check_fit(p: &Plan) {
    use lb_common::service_flags::{EXTERNAL_IP, LOAD_BALANCER, NODE_PORT};
    let sizes = MapSizes {
        frontend_slots: 24,
        backends: 16,
        rev_nat: 16,
        service_ports: 16,
        maglev_chunks: 8,
        ..MapSizes::default()
    };
    let mut kept = p.clone();
    let rejected = capacity::fit(&mut kept, &sizes);
    // Both families' Service ports are weighed together.
    assert_eq!(
        kept.services.len() + kept.services_ipv6.len() + rejected.len(),
        p.services.len() + p.services_ipv6.len()
    );
    for r in &rejected {
        assert!(capacity::rejected_map(r).is_some(), "{r:?}");
        assert!(kept.rejected.contains(r));
    }
    let d = desired::desired(&kept);
    let mut slots = 0u64;
    let mut members = 0u64;
    let mut backends = BTreeSet::new();
    let mut rev_nat = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut tables = BTreeSet::new();
    for (fe, v) in &d {
        let set: BTreeSet<_> = v.backends.iter().map(|(k, _)| *k).collect();
        slots += 1 + set.len() as u64;
        members += set.len() as u64;
        rev_nat.insert(fe.addr);
        names.insert(v.service_port.clone());
        if fe.scope == lb_common::scope::EXTERNAL
            && set.len() >= 2
            && v.flags & (NODE_PORT | LOAD_BALANCER | EXTERNAL_IP) != 0
        {
            tables.insert(set.iter().copied().collect::<Vec<_>>());
        }
        backends.extend(set);
    }
    let chunks: u64 = tables.iter().map(|t| capacity::table_chunks(t.len())).sum();
    assert!(slots <= sizes.frontend_slots as u64, "{slots} slots");
    assert!(members <= sizes.frontend_slots as u64, "{members} members");
    assert!(backends.len() <= sizes.backends as usize);
    assert!(rev_nat.len() <= sizes.rev_nat as usize);
    assert!(names.len() <= sizes.service_ports as usize);
    assert!(
        chunks <= sizes.maglev_chunks as u64,
        "{chunks} Maglev chunks"
    );
}

/// Two snapshots of the same objects (from the API and from a file) plan the same everywhere.
pub fn check_same_plans(api: &Objects, file: &Objects) {
    for node in node_names(api) {
        let a = plan::plan(&model::build(api, &node), &node);
        let b = plan::plan(&model::build(file, &node), &node);
        assert_eq!(
            a, b,
            "the API objects and the same objects as a file plan differently for {node}"
        );
    }
}

/// What `source::default_service` / `default_endpoint_slice` guarantee.
fn check_defaulted(objects: &Objects) {
    for svc in &objects.services {
        let ns = svc.metadata.namespace.as_deref();
        assert!(
            ns.is_some_and(|n| !n.is_empty()),
            "Service namespace after defaulting: {ns:?}"
        );
        let Some(spec) = &svc.spec else { continue };
        assert!(spec.type_.is_some());
        assert!(spec.session_affinity.is_some());
        for p in spec.ports.iter().flatten() {
            assert!(p.protocol.is_some() && p.target_port.is_some(), "{p:?}");
        }
    }
    for slice in &objects.endpoint_slices {
        let ns = slice.metadata.namespace.as_deref();
        assert!(
            ns.is_some_and(|n| !n.is_empty()),
            "EndpointSlice namespace after defaulting: {ns:?}"
        );
        for p in slice.ports.iter().flatten() {
            assert!(p.name.is_some() && p.protocol.is_some(), "{p:?}");
        }
    }
}

fn ns_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn check_model(objects: &Objects, node: &str, m: &Model) {
    let services: BTreeSet<_> = objects
        .services
        .iter()
        .map(|s| ns_name(&s.metadata))
        .collect();
    let slices: BTreeSet<_> = objects
        .endpoint_slices
        .iter()
        .map(|s| ns_name(&s.metadata))
        .collect();
    for r in &m.rejected {
        assert!(
            !r.reason.trim().is_empty(),
            "rejection without a reason: {r:?}"
        );
        assert!(
            !r.namespace.is_empty(),
            "rejection without a namespace: {r:?}"
        );
        assert!(
            !r.name.is_empty() || r.reason == model::MISSING_NAME,
            "rejection without a name that does not say so: {r:?}"
        );
        let key = (r.namespace.clone(), r.name.clone());
        match r.kind.as_str() {
            "Service" => assert!(
                services.contains(&key),
                "rejected Service not in input: {r:?}"
            ),
            "EndpointSlice" => {
                assert!(
                    slices.contains(&key),
                    "rejected EndpointSlice not in input: {r:?}"
                )
            }
            other => panic!("rejection of unknown kind {other:?}: {r:?}"),
        }
    }
    assert!(
        m.rejected.windows(2).all(|w| w[0] <= w[1]),
        "rejections are sorted"
    );
    if let Some(n) = &m.node {
        assert_eq!(n.name, node);
        let unique: BTreeSet<_> = n.addresses.iter().collect();
        assert_eq!(
            unique.len(),
            n.addresses.len(),
            "node addresses repeat: {n:?}"
        );
    }
    for s in &m.services {
        assert!(
            !s.name.is_empty(),
            "a Service without a name was accepted in {}",
            s.namespace
        );
        assert!(
            services.contains(&(s.namespace.clone(), s.name.clone())),
            "accepted Service not in input: {}/{}",
            s.namespace,
            s.name
        );
        let ports: BTreeSet<_> = s.ports.iter().map(|p| (&p.name, p.protocol)).collect();
        assert_eq!(
            ports.len(),
            s.ports.len(),
            "duplicate ports accepted in {}/{}",
            s.namespace,
            s.name
        );
        for p in &s.ports {
            assert_ne!(p.port, 0);
            assert!(p.node_port.is_none() || s.type_ != "ClusterIP");
            assert!(p.node_port != Some(0));
        }
        for (key, eps) in s.endpoints.iter() {
            assert!(
                eps.windows(2)
                    .all(|w| (w[0].addr, w[0].port) < (w[1].addr, w[1].port)),
                "endpoints of {}/{} {key:?} not sorted and unique",
                s.namespace,
                s.name
            );
            assert!(eps.iter().all(|e| e.port != 0));
        }
        if s.health_check_node_port.is_some() {
            assert_eq!(s.type_, "LoadBalancer");
            assert_eq!(s.external_traffic_policy, Some(TrafficPolicy::Local));
        }
        if let Some(t) = s.session_affinity_timeout_seconds {
            assert!((1..=86400).contains(&t));
        }
    }
    assert!(
        m.services
            .windows(2)
            .all(|w| (&w[0].namespace, &w[0].name) <= (&w[1].namespace, &w[1].name)),
        "services are sorted"
    );
}

fn unique(eps: &[PlannedEndpoint]) -> bool {
    eps.iter().map(|e| e.addr).collect::<BTreeSet<_>>().len() == eps.len()
}

fn check_plan(m: &Model, node: &str, p: &Plan) {
    assert_eq!(p.node.name, node);
    assert_eq!(p.rejected, m.rejected);
    // One plan per Service port per family the Service is served in (kube-proxy's proxier per
    // family): the IPv4 family's in `services`, the IPv6 family's in `services_ipv6`.
    let ports = |f: IpFamily| -> usize {
        m.services
            .iter()
            .filter(|s| s.serves(f))
            .map(|s| s.ports.len())
            .sum()
    };
    assert_eq!(p.services.len(), ports(IpFamily::IPv4));
    assert_eq!(p.services_ipv6.len(), ports(IpFamily::IPv6));
    check_ipv6_plan(m, node, p);
    // No frontend belongs to two Services (model::resolve_collisions gives it to the older):
    // address frontends among themselves, NodePorts among themselves. (An external IP that is
    // a node address on another Service's nodePort is not resolved yet.)
    let mut owner = std::collections::BTreeMap::new();
    for sp in &p.services {
        for f in &sp.frontends {
            let me = (&sp.namespace, &sp.name);
            let class = f.kind == lb_userspace::control::plan::FrontendKind::NodePort;
            let prev = owner.insert((class, f.address, sp.protocol), me);
            assert!(
                prev.is_none_or(|o| o == me),
                "frontend {} {:?} of two Services: {prev:?} and {me:?}",
                f.address,
                sp.protocol
            );
        }
    }
    let mut by_port = p.services.iter();
    for s in m.services.iter().filter(|s| s.serves(IpFamily::IPv4)) {
        for port in &s.ports {
            let sp = by_port.next().expect("one plan per Service port");
            assert_eq!(
                (&sp.namespace, &sp.name, &sp.port_name, sp.protocol),
                (&s.namespace, &s.name, &port.name, port.protocol)
            );
            let empty = Vec::new();
            let eps = s
                .endpoints
                .get(&(port.name.clone(), port.protocol))
                .unwrap_or(&empty);
            let known = |e: &PlannedEndpoint| {
                eps.iter().any(|x| {
                    SocketAddr::new(x.addr, x.port) == SocketAddr::V4(e.addr)
                        && x.terminating == e.terminating
                        && (x.node_name.as_deref() == Some(node)) == e.local
                })
            };
            for (what, set) in [
                ("cluster", &sp.cluster_endpoints),
                ("local", &sp.local_endpoints),
            ] {
                let Some(set) = set else { continue };
                assert!(unique(set), "{what} endpoints repeat: {sp:?}");
                assert!(
                    set.iter().all(known),
                    "{what} endpoint not in the model: {sp:?}"
                );
            }
            assert!(
                sp.local_endpoints.iter().flatten().all(|e| e.local),
                "{sp:?}"
            );
            // The category a policy selects is always computed.
            if sp.internal_traffic_policy == TrafficPolicy::Local {
                assert!(sp.local_endpoints.is_some());
            } else {
                assert!(sp.cluster_endpoints.is_some());
            }
            // Reachable from outside: cluster endpoints too, for pods short-circuited to the
            // NodePort or LoadBalancer IP (kube-proxy's UsesClusterEndpoints).
            match sp.external_traffic_policy {
                Some(TrafficPolicy::Local) => {
                    assert!(sp.local_endpoints.is_some() && sp.cluster_endpoints.is_some())
                }
                Some(TrafficPolicy::Cluster) => assert!(sp.cluster_endpoints.is_some()),
                None => {}
            }
            for fe in &sp.frontends {
                match fe.kind {
                    FrontendKind::ClusterIP => {
                        assert!(s.cluster_ips.contains(&IpAddr::V4(*fe.address.ip())));
                        assert_eq!(fe.address.port(), port.port);
                    }
                    FrontendKind::NodePort => {
                        assert_eq!(Some(fe.address.port()), port.node_port);
                        assert!(p.node.addresses.contains(fe.address.ip()));
                    }
                    FrontendKind::LoadBalancer => {
                        assert!(s.load_balancer_ips.contains(&IpAddr::V4(*fe.address.ip())))
                    }
                    FrontendKind::ExternalIP => {
                        assert!(s.external_ips.contains(&IpAddr::V4(*fe.address.ip())))
                    }
                }
            }
        }
    }
    assert!(by_port.next().is_none());
}

/// The IPv6 family's plans: one per Service port of the Services served in IPv6, each holding
/// only IPv6 frontends and endpoints the model has.
fn check_ipv6_plan(m: &Model, node: &str, p: &Plan) {
    let mut by_port = p.services_ipv6.iter();
    for s in m.services.iter().filter(|s| s.serves(IpFamily::IPv6)) {
        for port in &s.ports {
            let sp = by_port.next().expect("one IPv6 plan per Service port");
            assert_eq!(
                (
                    &sp.namespace,
                    &sp.name,
                    &sp.port_name,
                    sp.protocol,
                    sp.family
                ),
                (
                    &s.namespace,
                    &s.name,
                    &port.name,
                    port.protocol,
                    IpFamily::IPv6
                )
            );
            let eps = s.endpoints_of::<std::net::Ipv6Addr>(&port.name, port.protocol);
            assert!(eps.iter().all(|e| e.addr.is_ipv6()), "{eps:?}");
            for e in sp
                .cluster_endpoints
                .iter()
                .chain(&sp.local_endpoints)
                .flatten()
            {
                assert!(
                    eps.iter().any(|x| x.addr == IpAddr::V6(*e.addr.ip())
                        && x.port == e.addr.port()
                        && (x.node_name.as_deref() == Some(node)) == e.local),
                    "IPv6 endpoint not in the model: {sp:?}"
                );
            }
            for fe in &sp.frontends {
                let a = IpAddr::V6(*fe.address.ip());
                let known = match fe.kind {
                    FrontendKind::ClusterIP => s.cluster_ips.contains(&a),
                    FrontendKind::NodePort => p.node.ipv6_addresses.contains(fe.address.ip()),
                    FrontendKind::LoadBalancer => s.load_balancer_ips.contains(&a),
                    FrontendKind::ExternalIP => s.external_ips.contains(&a),
                };
                assert!(known, "{fe:?} of {sp:?}");
            }
        }
    }
    assert!(by_port.next().is_none());
}

fn check_desired(p: &Plan, d: &Desired) {
    use lb_common::{backend_flags, scope, service_flags};
    // Every planned frontend, by (address, protocol number): its kinds and affinity timeouts.
    let mut planned: BTreeMap<_, Vec<(FrontendKind, Option<u32>)>> = BTreeMap::new();
    for sp in &p.services {
        for fe in &sp.frontends {
            planned
                .entry((std::net::SocketAddr::from(fe.address), sp.protocol.number()))
                .or_default()
                .push((fe.kind, sp.session_affinity_timeout_seconds));
        }
    }
    for sp in &p.services_ipv6 {
        for fe in &sp.frontends {
            planned
                .entry((std::net::SocketAddr::from(fe.address), sp.protocol.number()))
                .or_default()
                .push((fe.kind, sp.session_affinity_timeout_seconds));
        }
    }
    for (key, fe) in d {
        let kinds = planned
            .get(&(key.addr, key.proto))
            .unwrap_or_else(|| panic!("desired frontend {key:?} is not in the plan"));
        assert!(
            key.scope == scope::INTERNAL || key.scope == scope::EXTERNAL,
            "{key:?}"
        );
        if key.scope == scope::EXTERNAL {
            assert!(
                kinds.iter().any(|(k, _)| *k != FrontendKind::ClusterIP),
                "external scope for a ClusterIP only: {key:?}"
            );
        }
        let backends: BTreeSet<_> = fe.backends.iter().map(|(b, _)| *b).collect();
        assert_eq!(
            backends.len(),
            fe.backends.len(),
            "backends repeat for {key:?}: {fe:?}"
        );
        for (b, flags) in &fe.backends {
            assert_eq!(b.proto, key.proto, "{key:?}: {fe:?}");
            // Each family's frontends get that family's endpoints only.
            assert_eq!(b.addr.is_ipv4(), key.addr.is_ipv4(), "{key:?}: {fe:?}");
            assert_ne!(b.addr.port(), 0);
            assert_eq!(
                flags & !(backend_flags::LOCAL | backend_flags::TERMINATING),
                0
            );
        }
        let kind_flags = service_flags::CLUSTER_IP
            | service_flags::NODE_PORT
            | service_flags::LOAD_BALANCER
            | service_flags::EXTERNAL_IP;
        assert_eq!(
            (fe.flags & kind_flags).count_ones(),
            1,
            "one kind flag: {key:?} {fe:?}"
        );
        assert_eq!(
            fe.flags
                & !(kind_flags
                    | service_flags::SESSION_AFFINITY
                    | service_flags::EXTERNAL_POLICY_LOCAL
                    | service_flags::NO_ENDPOINTS
                    | service_flags::SOURCE_RANGES
                    | service_flags::ALLOW_FROM_NODE),
            0
        );
        // loadBalancerSourceRanges fence LoadBalancer IPs only, with their set, and nothing
        // admits every source by accident (no /0: it means no ranges).
        assert_eq!(
            fe.flags & service_flags::SOURCE_RANGES != 0,
            fe.source_ranges.is_some(),
            "{key:?}: {fe:?}"
        );
        assert!(
            fe.flags & service_flags::SOURCE_RANGES == 0
                || fe.flags & service_flags::LOAD_BALANCER != 0,
            "{key:?}: {fe:?}"
        );
        assert!(
            fe.flags & service_flags::ALLOW_FROM_NODE == 0
                || fe.flags & service_flags::SOURCE_RANGES != 0,
            "{key:?}: {fe:?}"
        );
        if let Some(r) = &fe.source_ranges {
            assert!(
                r.iter().all(|(net, len)| {
                    net.is_ipv4() == key.addr.is_ipv4()
                        && (1..=if net.is_ipv4() { 32 } else { 128 }).contains(len)
                }),
                "{key:?}: {fe:?}"
            );
        }
        // externalTrafficPolicy Local marks external-scope entries only.
        assert!(
            fe.flags & service_flags::EXTERNAL_POLICY_LOCAL == 0 || key.scope == scope::EXTERNAL,
            "{key:?}: {fe:?}"
        );
        assert_eq!(
            fe.flags & service_flags::SESSION_AFFINITY != 0,
            fe.affinity_timeout_s != 0,
            "affinity flag and timeout disagree: {key:?} {fe:?}"
        );
        // No usable endpoint anywhere: every endpoint set of the Service port is empty.
        assert!(
            fe.flags & service_flags::NO_ENDPOINTS == 0 || fe.backends.is_empty(),
            "{key:?}: {fe:?}"
        );
        assert!(
            kinds
                .iter()
                .any(|(_, t)| t.unwrap_or(0) == fe.affinity_timeout_s),
            "{key:?}: {fe:?}"
        );
        let proto = match key.proto {
            lb_common::proto::TCP => Protocol::TCP,
            lb_common::proto::UDP => Protocol::UDP,
            other => panic!("protocol {other} in {key:?}"),
        };
        // `ns/name:port/PROTO`, with `/IPv6` after it for the IPv6 family's Service ports.
        let family_free = match fe.service_port.strip_suffix(desired::IPV6_SUFFIX) {
            Some(rest) => {
                assert!(key.addr.is_ipv6(), "{key:?}: {fe:?}");
                rest
            }
            None => {
                assert!(key.addr.is_ipv4(), "{key:?}: {fe:?}");
                fe.service_port.as_str()
            }
        };
        assert!(family_free.ends_with(&format!("/{proto:?}")), "{fe:?}");
    }
}

fn check_render(p: &Plan) {
    let json = serde_json::to_string(p).expect("the plan serializes");
    let v: serde_json::Value = serde_json::from_str(&json).expect("render is JSON");
    assert_eq!(v["node"]["name"], p.node.name.as_str());
    let services = v["services"].as_array().expect("services array");
    assert_eq!(services.len(), p.services.len() + p.services_ipv6.len());
    for (i, s) in services.iter().enumerate() {
        let family = if i < p.services.len() { "IPv4" } else { "IPv6" };
        assert_eq!(s["family"], family, "{s}");
        assert!(s["frontends"]
            .as_array()
            .is_some_and(|f| f.iter().all(|f| f["family"] == family)));
        for f in [
            "namespace",
            "name",
            "port_name",
            "protocol",
            "internal_traffic_policy",
        ] {
            assert!(s[f].is_string(), "{f} in {s}");
        }
        assert!(s["frontends"]
            .as_array()
            .is_some_and(|f| f.iter().all(|f| f["address"].is_string())));
        assert!(
            s["source_ranges"].is_null()
                || s["source_ranges"]
                    .as_array()
                    .is_some_and(|r| r.iter().all(|r| r.is_string())),
            "source_ranges in {s}"
        );
    }
    let rejected = v["rejected"].as_array().expect("rejected array");
    assert_eq!(rejected.len(), p.rejected.len());
    for r in rejected {
        for f in ["kind", "namespace", "name", "reason"] {
            assert!(r[f].is_string(), "{f} in {r}");
        }
    }
}
