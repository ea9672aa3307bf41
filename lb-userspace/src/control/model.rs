//! The validated, typed view of the objects: Service ports with their frontends and endpoints,
//! this node's name, zone and addresses. Invalid objects are rejected here with their kind,
//! namespace/name and reason, and never reach the plan or the maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Serialize;

use super::source::Objects;

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    TCP,
    UDP,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::TCP => lb_common::proto::TCP,
            Protocol::UDP => lb_common::proto::UDP,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum TrafficPolicy {
    Cluster,
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    pub addresses: Vec<Ipv4Addr>,
}

/// An object that was not accepted, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord)]
pub struct Rejected {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

/// One endpoint of a Service port, as kube-proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones` names; empty when absent.
    pub zone_hints: BTreeSet<String>,
    /// `hints.forNodes` names; empty when absent.
    pub node_hints: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceModel {
    pub namespace: String,
    pub name: String,
    pub type_: String,
    pub cluster_ips: Vec<Ipv4Addr>,
    pub external_ips: Vec<Ipv4Addr>,
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    pub internal_traffic_policy: TrafficPolicy,
    /// `None` when the Service is not reachable from outside (no NodePort/LB/external IP).
    pub external_traffic_policy: Option<TrafficPolicy>,
    pub session_affinity_timeout_seconds: Option<u32>,
    pub health_check_node_port: Option<u16>,
    /// Endpoints per (port name, protocol), merged across slices, deduplicated.
    pub endpoints: BTreeMap<(String, Protocol), Vec<Endpoint>>,
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    pub node: Option<NodeInfo>,
    pub services: Vec<ServiceModel>,
    pub rejected: Vec<Rejected>,
}

fn reject(kind: &str, namespace: &str, name: &str, reason: impl Into<String>) -> Rejected {
    Rejected {
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
        reason: reason.into(),
    }
}

fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse::<Ipv4Addr>()
        .map_err(|_| format!("unparsable IPv4 address {s:?}"))
}

fn parse_port(what: &str, p: i32) -> Result<u16, String> {
    if (1..=65535).contains(&p) {
        Ok(p as u16)
    } else {
        Err(format!("{what} {p} out of range 1..65535"))
    }
}

fn parse_protocol(p: Option<&str>) -> Result<Protocol, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::TCP),
        "UDP" => Ok(Protocol::UDP),
        other => Err(format!("unsupported protocol {other:?}")),
    }
}

fn parse_policy(what: &str, p: Option<&str>) -> Result<TrafficPolicy, String> {
    match p.unwrap_or("Cluster") {
        "Cluster" => Ok(TrafficPolicy::Cluster),
        "Local" => Ok(TrafficPolicy::Local),
        other => Err(format!("{what} {other:?} is neither Cluster nor Local")),
    }
}

pub fn node_info(node: &Node) -> NodeInfo {
    let name = node.metadata.name.clone().unwrap_or_default();
    let zone = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_ZONE))
        .cloned();
    let mut addresses = Vec::new();
    let all = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    // InternalIP first, then ExternalIP, as NodePorts listen on both.
    for wanted in ["InternalIP", "ExternalIP"] {
        for a in all.into_iter().flatten().filter(|a| a.type_ == wanted) {
            if let Ok(ip) = a.address.parse::<Ipv4Addr>() {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
    }
    NodeInfo {
        name,
        zone,
        addresses,
    }
}

/// Why an object without `metadata.name` is rejected (the API server never stores one).
pub const MISSING_NAME: &str = "missing metadata.name";

/// Builds the model for node `node_name`.
pub fn build(objects: &Objects, node_name: &str) -> Model {
    let mut model = Model {
        node: objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node_name))
            .map(node_info),
        ..Model::default()
    };

    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in &objects.endpoint_slices {
        let ns = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = slice.metadata.name.clone().unwrap_or_default();
        let labels = slice.metadata.labels.clone().unwrap_or_default();
        if labels.contains_key(LABEL_SERVICE_PROXY_NAME) || labels.contains_key(LABEL_HEADLESS) {
            continue;
        }
        if name.is_empty() {
            model
                .rejected
                .push(reject("EndpointSlice", &ns, &name, MISSING_NAME));
            continue;
        }
        let Some(svc) = labels.get(LABEL_SERVICE_NAME) else {
            model.rejected.push(reject(
                "EndpointSlice",
                &ns,
                &name,
                format!("missing label {LABEL_SERVICE_NAME}"),
            ));
            continue;
        };
        if slice.address_type != "IPv4" {
            continue; // IPv6 and FQDN slices are not served by this IPv4 dataplane
        }
        if let Err(reason) = validate_slice(slice) {
            model
                .rejected
                .push(reject("EndpointSlice", &ns, &name, reason));
            continue;
        }
        by_service.entry((ns, svc.clone())).or_default().push(slice);
    }

    for svc in &objects.services {
        let ns = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = svc.metadata.name.clone().unwrap_or_default();
        let labels = svc.metadata.labels.clone().unwrap_or_default();
        if labels.contains_key(LABEL_SERVICE_PROXY_NAME) {
            continue;
        }
        if name.is_empty() {
            model
                .rejected
                .push(reject("Service", &ns, &name, MISSING_NAME));
            continue;
        }
        match service_model(svc, &ns, &name) {
            Ok(Some(mut m)) => {
                let slices = by_service.get(&(ns.clone(), name.clone()));
                m.endpoints = merge_endpoints(slices.map(|v| v.as_slice()).unwrap_or(&[]));
                model.services.push(m);
            }
            Ok(None) => {}
            Err(reason) => model.rejected.push(reject("Service", &ns, &name, reason)),
        }
    }
    model
        .services
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    model.rejected.sort();
    model
}

fn validate_slice(slice: &EndpointSlice) -> Result<(), String> {
    for p in slice.ports.iter().flatten() {
        parse_protocol(p.protocol.as_deref())?;
        if let Some(port) = p.port {
            parse_port("port", port)?;
        }
    }
    for ep in slice.endpoints.iter().flatten() {
        let Some(first) = ep.addresses.first() else {
            return Err("endpoint without addresses".into());
        };
        parse_ipv4(first)?;
    }
    Ok(())
}

/// `Ok(None)` for Services kube-proxy does not proxy (headless, ExternalName).
fn service_model(svc: &Service, ns: &str, name: &str) -> Result<Option<ServiceModel>, String> {
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    let type_ = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    if type_ == "ExternalName" {
        return Ok(None);
    }
    let ips = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|i| vec![i]));
    let ips = ips.unwrap_or_default();
    if ips.iter().any(|i| i == "None") {
        return Ok(None); // headless
    }
    if !["ClusterIP", "NodePort", "LoadBalancer"].contains(&type_.as_str()) {
        return Err(format!("unknown type {type_:?}"));
    }
    let mut cluster_ips = Vec::new();
    for ip in &ips {
        // Dual-stack Services: the IPv6 family is not served by this dataplane.
        if ip.contains(':') {
            continue;
        }
        cluster_ips.push(parse_ipv4(ip)?);
    }
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .filter(|i| !i.contains(':'))
        .map(|i| parse_ipv4(i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut load_balancer_ips = Vec::new();
    if type_ == "LoadBalancer" {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref());
        for ing in ingress
            .and_then(|l| l.ingress.as_ref())
            .into_iter()
            .flatten()
        {
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue; // the cloud LB proxies: traffic arrives for the node, not the VIP
            }
            if let Some(ip) = ing.ip.as_deref().filter(|i| !i.contains(':')) {
                load_balancer_ips.push(parse_ipv4(ip)?);
            }
        }
    }
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for p in spec.ports.iter().flatten() {
        let protocol = parse_protocol(p.protocol.as_deref())?;
        let port = parse_port("port", p.port)?;
        let node_port = match p.node_port {
            Some(np) if type_ != "ClusterIP" => Some(parse_port("nodePort", np)?),
            _ => None,
        };
        let pname = p.name.clone().unwrap_or_default();
        if !seen.insert((pname.clone(), protocol)) {
            return Err(format!("duplicate port name {pname:?} for {protocol:?}"));
        }
        ports.push(ServicePort {
            name: pname,
            protocol,
            port,
            node_port,
        });
    }
    let internal_traffic_policy = parse_policy(
        "internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
    )?;
    let externally_reachable = type_ == "NodePort"
        || type_ == "LoadBalancer"
        || !external_ips.is_empty()
        || !load_balancer_ips.is_empty();
    let external_traffic_policy = if externally_reachable {
        Some(parse_policy(
            "externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        )?)
    } else {
        None
    };
    let session_affinity_timeout_seconds = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10800);
            if !(1..=86400).contains(&t) {
                return Err(format!(
                    "sessionAffinityConfig.clientIP.timeoutSeconds {t} outside 1..86400"
                ));
            }
            Some(t as u32)
        }
        Some(other) => return Err(format!("unknown sessionAffinity {other:?}")),
    };
    let health_check_node_port = match spec.health_check_node_port {
        None => None,
        Some(p) => {
            if type_ != "LoadBalancer" || external_traffic_policy != Some(TrafficPolicy::Local) {
                return Err(
                    "healthCheckNodePort is only valid for type LoadBalancer with externalTrafficPolicy Local"
                        .into(),
                );
            }
            Some(parse_port("healthCheckNodePort", p)?)
        }
    };
    Ok(Some(ServiceModel {
        namespace: ns.into(),
        name: name.into(),
        type_,
        cluster_ips,
        external_ips,
        load_balancer_ips,
        ports,
        internal_traffic_policy,
        external_traffic_policy,
        session_affinity_timeout_seconds,
        health_check_node_port,
        endpoints: BTreeMap::new(),
    }))
}

/// Merges the endpoints of a Service's slices per (port name, protocol), as kube-proxy does: the
/// first address of an endpoint is used; missing `ready`/`serving` count as true and a missing
/// `terminating` as false; the same endpoint in two slices keeps the non-terminating copy.
fn merge_endpoints(slices: &[&EndpointSlice]) -> BTreeMap<(String, Protocol), Vec<Endpoint>> {
    let mut out: BTreeMap<(String, Protocol), Vec<Endpoint>> = BTreeMap::new();
    for slice in slices {
        for sp in slice.ports.iter().flatten() {
            let Some(port) = sp.port else { continue };
            let (Ok(protocol), Ok(port)) = (
                parse_protocol(sp.protocol.as_deref()),
                parse_port("port", port),
            ) else {
                continue;
            };
            let key = (sp.name.clone().unwrap_or_default(), protocol);
            let list = out.entry(key).or_default();
            for ep in slice.endpoints.iter().flatten() {
                let Some(Ok(addr)) = ep.addresses.first().map(|a| parse_ipv4(a)) else {
                    continue;
                };
                let c = ep.conditions.clone().unwrap_or_default();
                let hints = ep.hints.clone().unwrap_or_default();
                let new = Endpoint {
                    addr,
                    port,
                    ready: c.ready.unwrap_or(true),
                    serving: c.serving.unwrap_or(true),
                    terminating: c.terminating.unwrap_or(false),
                    node_name: ep.node_name.clone(),
                    zone: ep.zone.clone(),
                    zone_hints: hints
                        .for_zones
                        .iter()
                        .flatten()
                        .map(|z| z.name.clone())
                        .collect(),
                    node_hints: hints
                        .for_nodes
                        .iter()
                        .flatten()
                        .map(|n| n.name.clone())
                        .collect(),
                };
                match list.iter_mut().find(|e| e.addr == addr && e.port == port) {
                    Some(existing) => {
                        if existing.terminating && !new.terminating {
                            *existing = new;
                        }
                    }
                    None => list.push(new),
                }
            }
        }
    }
    for list in out.values_mut() {
        list.sort_by_key(|e| (e.addr, e.port));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(yaml: &str) -> Model {
        let mut o = Objects::default();
        crate::control::source::parse_into(std::path::Path::new("t.yaml"), yaml, &mut o).unwrap();
        build(&o, "n1")
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{name: web, port: 80}, {name: dns, port: 53, protocol: UDP}]\n";

    fn slice(name: &str, labels: &str, ports: &str, endpoints: &str) -> String {
        format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: ns, labels: {{{labels}}}}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n")
    }

    fn eps(m: &Model, port: &str, proto: Protocol) -> Vec<(String, bool, bool, bool)> {
        m.services[0]
            .endpoints
            .get(&(port.to_string(), proto))
            .map(|v| {
                v.iter()
                    .map(|e| (e.addr.to_string(), e.ready, e.serving, e.terminating))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn endpoint_slice_ingestion_table() {
        let label = "kubernetes.io/service-name: s";
        // Ports are matched by name and protocol.
        let m = model(&format!("{SVC}{}", slice("a", label, "[{name: web, port: 8080}, {name: web, port: 9999, protocol: UDP}, {name: dns, port: 5353, protocol: UDP}]", "[{addresses: [10.0.0.1, 10.0.0.99]}]")));
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        let web = &m.services[0].endpoints[&("web".into(), Protocol::TCP)];
        assert_eq!(
            (web[0].addr.to_string(), web[0].port),
            ("10.0.0.1".into(), 8080),
            "first address, TCP port"
        );
        assert_eq!(
            m.services[0].endpoints[&("dns".into(), Protocol::UDP)][0].port,
            5353
        );
        // Missing conditions: ready and serving, not terminating.
        assert_eq!(
            eps(&m, "web", Protocol::TCP),
            vec![("10.0.0.1".into(), true, true, false)]
        );
        // Without the service-name label: rejected with the reason; the Service keeps working.
        let m = model(&format!(
            "{SVC}{}",
            slice(
                "nolabel",
                "app: x",
                "[{name: web, port: 8080}]",
                "[{addresses: [10.0.0.1]}]"
            )
        ));
        assert_eq!(m.rejected.len(), 1);
        assert_eq!(
            (
                m.rejected[0].kind.as_str(),
                m.rejected[0].namespace.as_str(),
                m.rejected[0].name.as_str()
            ),
            ("EndpointSlice", "ns", "nolabel")
        );
        assert!(m.rejected[0].reason.contains("kubernetes.io/service-name"));
        assert_eq!(m.services.len(), 1);
        // Another proxy's slices and headless slices are ignored (not rejected).
        for extra in [
            "service.kubernetes.io/service-proxy-name: other",
            "service.kubernetes.io/headless: \"\"",
        ] {
            let m = model(&format!(
                "{SVC}{}",
                slice(
                    "x",
                    &format!("{label}, {extra}"),
                    "[{name: web, port: 8080}]",
                    "[{addresses: [10.0.0.1]}]"
                )
            ));
            assert!(
                m.rejected.is_empty() && eps(&m, "web", Protocol::TCP).is_empty(),
                "{extra}"
            );
        }
        // The same endpoint in two slices keeps the non-terminating copy, whatever the order.
        for (first, second) in [("t", "r"), ("r", "t")] {
            let cond = |k| {
                if k == "t" {
                    "{ready: false, serving: true, terminating: true}"
                } else {
                    "{ready: true}"
                }
            };
            let yaml = format!(
                "{SVC}{}{}",
                slice(
                    "one",
                    label,
                    "[{name: web, port: 8080}]",
                    &format!("[{{addresses: [10.0.0.1], conditions: {}}}]", cond(first))
                ),
                slice(
                    "two",
                    label,
                    "[{name: web, port: 8080}]",
                    &format!("[{{addresses: [10.0.0.1], conditions: {}}}]", cond(second))
                )
            );
            assert_eq!(
                eps(&model(&yaml), "web", Protocol::TCP),
                vec![("10.0.0.1".into(), true, true, false)]
            );
        }
    }

    #[test]
    fn validation_table() {
        let svc = |spec: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: ns}}\nspec: {spec}\n---\n{SVC}")
        };
        let cases = [
            ("{clusterIP: 10.96.0.2, ports: [{port: 0}]}", "port 0 out of range"),
            ("{clusterIP: 10.96.0.2, ports: [{port: 70000}]}", "port 70000 out of range"),
            ("{clusterIP: 10.96.0.999, ports: [{port: 80}]}", "unparsable IPv4 address \"10.96.0.999\""),
            ("{clusterIP: 10.96.0.2, externalIPs: [nope], ports: [{port: 80}]}", "unparsable IPv4 address \"nope\""),
            ("{clusterIP: 10.96.0.2, ports: [{port: 80, protocol: SCTP}]}", "unsupported protocol \"SCTP\""),
            ("{type: NodePort, clusterIP: 10.96.0.2, ports: [{port: 80, nodePort: 99999}]}", "nodePort 99999 out of range"),
            ("{clusterIP: 10.96.0.2, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}", "timeoutSeconds 0 outside 1..86400"),
            ("{clusterIP: 10.96.0.2, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}, ports: [{port: 80}]}", "timeoutSeconds 86401 outside 1..86400"),
            ("{clusterIP: 10.96.0.2, healthCheckNodePort: 32000, ports: [{port: 80}]}", "healthCheckNodePort is only valid"),
            ("{type: LoadBalancer, externalTrafficPolicy: Cluster, clusterIP: 10.96.0.2, healthCheckNodePort: 32000, ports: [{port: 80}]}", "healthCheckNodePort is only valid"),
            ("{clusterIP: 10.96.0.2, internalTrafficPolicy: Sometimes, ports: [{port: 80}]}", "internalTrafficPolicy \"Sometimes\""),
            ("{clusterIP: 10.96.0.2, ports: [{name: a, port: 80}, {name: a, port: 81}]}", "duplicate port name"),
        ];
        for (spec, reason) in cases {
            let m = model(&svc(spec));
            assert_eq!(m.rejected.len(), 1, "{spec}");
            let r = &m.rejected[0];
            assert_eq!(
                (r.kind.as_str(), r.namespace.as_str(), r.name.as_str()),
                ("Service", "ns", "bad")
            );
            assert!(r.reason.contains(reason), "{spec}: {}", r.reason);
            // Everything else keeps working.
            assert_eq!(
                m.services
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>(),
                ["s"],
                "{spec}"
            );
        }
        // Defaults and limits that are valid.
        let m = model(&svc(
            "{clusterIP: 10.96.0.2, sessionAffinity: ClientIP, ports: [{port: 80}]}",
        ));
        assert!(m.rejected.is_empty());
        assert_eq!(
            m.services
                .iter()
                .find(|s| s.name == "bad")
                .unwrap()
                .session_affinity_timeout_seconds,
            Some(10800)
        );
        // Bad EndpointSlice contents are rejected with the slice's name.
        let m = model(&format!(
            "{SVC}{}",
            slice(
                "badaddr",
                "kubernetes.io/service-name: s",
                "[{name: web, port: 8080}]",
                "[{addresses: [300.1.1.1]}]"
            )
        ));
        assert_eq!(m.rejected[0].name, "badaddr");
        assert!(m.rejected[0].reason.contains("300.1.1.1"));
    }

    #[test]
    fn objects_without_a_name_are_rejected() {
        // Found by the fuzz target `manifests` (fuzz/): a nameless Service was programmed as
        // `ns/:port/TCP`, and a nameless slice was rejected under the name "".
        let m = model(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{namespace: ns}}\nspec: {{clusterIP: 10.96.0.2, ports: [{{port: 80}}]}}\n---\n{SVC}{}",
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {namespace: ns, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nports: [{name: web, port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}]\n"
        ));
        let rejected: Vec<_> = m
            .rejected
            .iter()
            .map(|r| {
                (
                    r.kind.as_str(),
                    r.namespace.as_str(),
                    r.name.as_str(),
                    r.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            rejected,
            [
                ("EndpointSlice", "ns", "", MISSING_NAME),
                ("Service", "ns", "", MISSING_NAME)
            ]
        );
        assert_eq!(
            m.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["s"]
        );
        assert!(
            eps(&m, "web", Protocol::TCP).is_empty(),
            "the nameless slice is not used"
        );
    }

    #[test]
    fn frontends_skip_proxy_mode_ingress_and_headless_services() {
        let m = model("apiVersion: v1\nkind: Service\nmetadata: {name: h, namespace: ns}\nspec: {clusterIP: None, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: ns}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.3, ports: [{port: 80, nodePort: 30001}]}\nstatus: {loadBalancer: {ingress: [{ip: 1.2.3.4}, {ip: 5.6.7.8, ipMode: Proxy}, {hostname: lb.example}]}}\n");
        assert_eq!(m.services.len(), 1, "headless Services are not proxied");
        assert_eq!(
            m.services[0].load_balancer_ips,
            vec![Ipv4Addr::new(1, 2, 3, 4)]
        );
        assert_eq!(
            m.services[0].external_traffic_policy,
            Some(TrafficPolicy::Cluster)
        );
    }
}
