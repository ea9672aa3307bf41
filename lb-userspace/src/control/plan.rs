//! The plan: a pure function from the model and this node to the desired state. For each Service
//! port it decides, exactly as kube-proxy's endpoint categorisation does, which endpoints serve
//! traffic that originates inside the node (internal scope) and outside it (external scope).
//! `lb-agent render` prints [`Plan`]; `control::desired` turns it into map contents.
//!
//! As kube-proxy runs one proxier per IP family, the plan is made once per family, generic over
//! the family's address type ([`FamilyAddr`]): a family's frontends get only that family's
//! endpoints (from the slices of that `addressType`), NodePorts sit on the node's addresses of
//! that family. [`Plan::services`] is the IPv4 family's, the only one the maps get;
//! [`Plan::services_ipv6`] is planned and rendered, not programmed (issue 17).
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{ser::SerializeStruct, Serialize};

use super::model::{
    Endpoint, FamilyAddr, IpFamily, Model, NodeInfo, Protocol, Rejected, ServiceModel,
    TrafficPolicy,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalIP,
}

/// A frontend of family `A` (rendered with its `family`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend<A: FamilyAddr = Ipv4Addr> {
    pub kind: FrontendKind,
    pub address: A::Sock,
}

impl<A: FamilyAddr> Serialize for Frontend<A> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Frontend", 3)?;
        st.serialize_field("kind", &self.kind)?;
        st.serialize_field("address", &self.address.to_string())?;
        st.serialize_field("family", &A::FAMILY)?;
        st.end()
    }
}

/// The plan of one Service port in one IP family (the `render` JSON element): every frontend
/// and endpoint in it is of family `A`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePortPlan<A: FamilyAddr = Ipv4Addr> {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: Protocol,
    /// The family of the frontends and endpoints (always `A::FAMILY`).
    pub family: IpFamily,
    pub frontends: Vec<Frontend<A>>,
    pub internal_traffic_policy: TrafficPolicy,
    pub external_traffic_policy: Option<TrafficPolicy>,
    #[serde(serialize_with = "ser_endpoints")]
    pub cluster_endpoints: Option<Vec<PlannedEndpoint<A>>>,
    #[serde(serialize_with = "ser_endpoints")]
    pub local_endpoints: Option<Vec<PlannedEndpoint<A>>>,
    pub session_affinity_timeout_seconds: Option<u32>,
    pub health_check_node_port: Option<u16>,
    /// Whether the Service port has a usable endpoint anywhere in the cluster (ready, or serving
    /// and terminating), whatever the traffic policies: kube-proxy's `hasEndpoints`. Without
    /// one, connections to it are rejected rather than dropped.
    pub has_endpoints: bool,
    /// Whether topology hints decided the cluster endpoint set on this node (`render` shows it
    /// only when the ready endpoints carry hints; `lb_service_topology_hints_unusable`).
    #[serde(skip_serializing_if = "TopologyHints::is_absent")]
    pub topology_hints: TopologyHints,
    /// loadBalancerSourceRanges (prefixes of the family, `a.b.c.d/len`) that the Service
    /// port's LoadBalancer frontends admit, kube-proxy's firewall: `null` when they admit every
    /// source (no ranges, `0.0.0.0/0`, or no LoadBalancer frontend); an empty list admits
    /// none. NodePorts, ClusterIPs and external IPs are never filtered.
    #[serde(serialize_with = "ser_prefixes")]
    pub source_ranges: Option<Vec<(A, u8)>>,
    /// With `source_ranges`: a node address lies in them (kube-proxy's `allowFromNode`), so
    /// in-node clients whose source is a node address, and packets from the LoadBalancer IPs
    /// themselves, are admitted.
    #[serde(skip)]
    pub source_ranges_allow_node: bool,
    /// The Service's creation time (Unix seconds): the older Service port keeps its place when
    /// the maps cannot hold every one.
    #[serde(skip)]
    pub created: Option<i64>,
}

/// An endpoint chosen by the plan, with the facts the datapath keeps about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlannedEndpoint<A: FamilyAddr = Ipv4Addr> {
    pub addr: A::Sock,
    pub local: bool,
    pub terminating: bool,
}

/// The plan for this node, one list per IP family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub node: NodeInfo,
    /// The IPv4 family's Service ports: what the maps get (`control::desired`, capacity).
    pub services: Vec<ServicePortPlan<Ipv4Addr>>,
    /// The IPv6 family's Service ports: planned and rendered, not programmed (the maps and
    /// the datapath are IPv4 only for now).
    pub services_ipv6: Vec<ServicePortPlan<Ipv6Addr>>,
    pub rejected: Vec<Rejected>,
}

/// `render`'s JSON: `{"node", "services", "rejected"}`, where `services` lists the IPv4
/// family's Service ports, then the IPv6 family's, each with its `family`.
impl Serialize for Plan {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Entry<'a> {
            V4(&'a ServicePortPlan<Ipv4Addr>),
            V6(&'a ServicePortPlan<Ipv6Addr>),
        }
        struct Entries<'a>(&'a Plan);
        impl Serialize for Entries<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_seq(
                    self.0
                        .services
                        .iter()
                        .map(Entry::V4)
                        .chain(self.0.services_ipv6.iter().map(Entry::V6)),
                )
            }
        }
        let mut st = s.serialize_struct("Plan", 3)?;
        st.serialize_field("node", &self.node)?;
        st.serialize_field("services", &Entries(self))?;
        st.serialize_field("rejected", &self.rejected)?;
        st.end()
    }
}

impl Plan {
    /// Every ClusterIP of the plan (repeated per port).
    pub fn cluster_ips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.services
            .iter()
            .flat_map(|sp| &sp.frontends)
            .filter(|f| f.kind == FrontendKind::ClusterIP)
            .map(|f| *f.address.ip())
    }
}

fn ser_prefixes<A: FamilyAddr, S: serde::Serializer>(
    p: &Option<Vec<(A, u8)>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match p {
        None => s.serialize_none(),
        Some(v) => s.collect_seq(v.iter().map(|(a, l)| format!("{a}/{l}"))),
    }
}

fn ser_endpoints<A: FamilyAddr, S: serde::Serializer>(
    eps: &Option<Vec<PlannedEndpoint<A>>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match eps {
        None => s.serialize_none(),
        Some(v) => s.collect_seq(v.iter().map(|e| e.addr.to_string())),
    }
}

impl<A: FamilyAddr> ServicePortPlan<A> {
    /// The endpoints that serve traffic from inside the node.
    pub fn internal_endpoints(&self) -> &[PlannedEndpoint<A>] {
        let eps = match self.internal_traffic_policy {
            TrafficPolicy::Cluster => &self.cluster_endpoints,
            TrafficPolicy::Local => &self.local_endpoints,
        };
        eps.as_deref().unwrap_or(&[])
    }

    /// The endpoints that serve traffic arriving from outside the node.
    pub fn external_endpoints(&self) -> &[PlannedEndpoint<A>] {
        let eps = match self.external_traffic_policy {
            Some(TrafficPolicy::Local) => &self.local_endpoints,
            _ => &self.cluster_endpoints,
        };
        eps.as_deref().unwrap_or(&[])
    }
}

/// What topology hints did for a Service port's cluster endpoints on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TopologyHints {
    /// No ready endpoint carries a hint, or the Service port uses no cluster endpoints.
    #[default]
    Absent,
    /// The cluster endpoints are those hinted for this node or its zone.
    Used,
    /// Ready endpoints carry hints but kube-proxy's rules ignore them here (hints on only some
    /// endpoints, none for this node or zone, or a node without a zone label): the whole
    /// cluster's endpoints serve, and the traffic crosses zones the hints meant to keep it in.
    Unusable,
}

impl TopologyHints {
    pub fn is_absent(&self) -> bool {
        *self == TopologyHints::Absent
    }
}

/// [`TopologyHints`] of the endpoints for this node (used only for cluster endpoints).
fn topology_hints(endpoints: &[Endpoint], node: &str, zone: Option<&str>) -> TopologyHints {
    let hinted = endpoints
        .iter()
        .any(|e| e.ready && !(e.node_hints.is_empty() && e.zone_hints.is_empty()));
    if !hinted {
        TopologyHints::Absent
    } else if topology_mode(endpoints, node, zone) == TopologyMode::None {
        TopologyHints::Unusable
    } else {
        TopologyHints::Used
    }
}

/// Which endpoints topology hints restrict cluster traffic to (kube-proxy's topology mode).
#[derive(Debug, PartialEq, Eq)]
enum TopologyMode {
    None,
    Node,
    Zone,
}

fn topology_mode(endpoints: &[Endpoint], node: &str, zone: Option<&str>) -> TopologyMode {
    let mut all_node_hints = true;
    let mut for_node = false;
    let mut all_zone_hints = true;
    let mut for_zone = false;
    for ep in endpoints.iter().filter(|e| e.ready) {
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.contains(node) {
            for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| ep.zone_hints.contains(z)) {
            for_zone = true;
        }
    }
    if all_node_hints && for_node {
        TopologyMode::Node
    } else if all_zone_hints && for_zone {
        TopologyMode::Zone
    } else {
        TopologyMode::None
    }
}

/// A family's (cluster, local) endpoint sets, each `None` when the Service port never uses that
/// category.
type Categories<A> = (
    Option<Vec<PlannedEndpoint<A>>>,
    Option<Vec<PlannedEndpoint<A>>>,
);

/// kube-proxy's CategorizeEndpoints for the endpoints of one family `A` (its proxier of that
/// family): (cluster endpoints, local endpoints), each `None` when the Service port never uses
/// that category. Endpoints of the other family are no part of the result (the caller passes
/// one family's: [`ServiceModel::endpoints_of`]).
pub fn categorize<A: FamilyAddr>(
    endpoints: &[Endpoint],
    itp: TrafficPolicy,
    etp: Option<TrafficPolicy>,
    node: &str,
    zone: Option<&str>,
) -> Categories<A> {
    let is_local = |e: &Endpoint| e.node_name.as_deref() == Some(node);
    let planned = |e: &Endpoint| {
        A::from_ip(e.addr).map(|a| PlannedEndpoint {
            addr: a.sock(e.port),
            local: is_local(e),
            terminating: e.terminating,
        })
    };
    // kube-proxy's UsesClusterEndpoints: internalTrafficPolicy Cluster, or reachable from outside
    // at all (`etp` is set only then): with both policies Local, a pod on a node without a local
    // endpoint that reaches the NodePort or LoadBalancer IP is short-circuited to a cluster one.
    let uses_cluster = itp == TrafficPolicy::Cluster || etp.is_some();
    let uses_local = itp == TrafficPolicy::Local || etp == Some(TrafficPolicy::Local);

    let cluster = uses_cluster.then(|| {
        let mode = topology_mode(endpoints, node, zone);
        let fits = |e: &Endpoint| match mode {
            TopologyMode::None => true,
            TopologyMode::Node => e.node_hints.contains(node),
            TopologyMode::Zone => zone.is_some_and(|z| e.zone_hints.contains(z)),
        };
        let ready: Vec<_> = endpoints
            .iter()
            .filter(|e| e.ready && fits(e))
            .filter_map(planned)
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        endpoints
            .iter()
            .filter(|e| e.serving && e.terminating)
            .filter_map(planned)
            .collect()
    });
    let local = uses_local.then(|| {
        let ready: Vec<_> = endpoints
            .iter()
            .filter(|e| is_local(e) && e.ready)
            .filter_map(planned)
            .collect();
        if !ready.is_empty() {
            return ready;
        }
        endpoints
            .iter()
            .filter(|e| is_local(e) && e.serving && e.terminating)
            .filter_map(planned)
            .collect()
    });
    (cluster, local)
}

/// The plans of a Service's ports in family `A` (the Service is served in it).
pub fn port_plans<A: FamilyAddr>(svc: &ServiceModel, node: &NodeInfo) -> Vec<ServicePortPlan<A>> {
    let mine = |ips: &[std::net::IpAddr]| -> Vec<A> {
        ips.iter().filter_map(|a| A::from_ip(*a)).collect()
    };
    let cluster_ips = mine(&svc.cluster_ips);
    let load_balancer_ips = mine(&svc.load_balancer_ips);
    let external_ips = mine(&svc.external_ips);
    // kube-proxy's ExternallyAccessible, per family: a NodePort, or an external or
    // load-balancer IP of this family.
    let external_traffic_policy = svc.external_traffic_policy.filter(|_| {
        svc.type_ == "NodePort"
            || svc.type_ == "LoadBalancer"
            || !external_ips.is_empty()
            || !load_balancer_ips.is_empty()
    });
    // Exactly one plan per port: the memo keeps these, and the room pushing leaves (four for
    // one) was 6 MB resident at 10,000 Services.
    let mut out = Vec::with_capacity(svc.ports.len());
    for port in &svc.ports {
        let mut frontends = Vec::new();
        let mut add = |kind, ips: &[A], p: u16| {
            for ip in ips {
                if kind != FrontendKind::NodePort
                    && svc
                        .lost_frontends
                        .contains(&((*ip).into(), p, port.protocol))
                {
                    continue; // an older Service has it (model::resolve_collisions)
                }
                frontends.push(Frontend {
                    kind,
                    address: ip.sock(p),
                });
            }
        };
        add(FrontendKind::ClusterIP, &cluster_ips, port.port);
        if let Some(np) = port.node_port {
            add(FrontendKind::NodePort, A::node_ports(node), np);
        }
        add(FrontendKind::LoadBalancer, &load_balancer_ips, port.port);
        add(FrontendKind::ExternalIP, &external_ips, port.port);
        let has_lb = frontends
            .iter()
            .any(|f| f.kind == FrontendKind::LoadBalancer);
        let source_ranges = A::source_ranges(svc).clone().filter(|_| has_lb);
        let source_ranges_allow_node = source_ranges.as_ref().is_some_and(|r| {
            A::node_addresses(node)
                .iter()
                .any(|a| r.iter().any(|(net, len)| a.in_prefix(*net, *len)))
        });
        let eps = svc.endpoints_of::<A>(&port.name, port.protocol);
        let (cluster, local) = categorize::<A>(
            eps,
            svc.internal_traffic_policy,
            external_traffic_policy,
            &node.name,
            node.zone.as_deref(),
        );
        let topology_hints = match cluster {
            Some(_) => topology_hints(eps, &node.name, node.zone.as_deref()),
            None => TopologyHints::Absent,
        };
        out.push(ServicePortPlan {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            port_name: port.name.clone(),
            protocol: port.protocol,
            family: A::FAMILY,
            frontends,
            internal_traffic_policy: svc.internal_traffic_policy,
            external_traffic_policy,
            cluster_endpoints: cluster,
            local_endpoints: local,
            session_affinity_timeout_seconds: svc.session_affinity_timeout_seconds,
            health_check_node_port: svc.health_check_node_port,
            has_endpoints: eps.iter().any(|e| e.ready || (e.serving && e.terminating)),
            topology_hints,
            source_ranges,
            source_ranges_allow_node,
            created: svc.created,
        });
    }
    out
}

/// Whether `a` lies in `net/len`.
pub fn in_prefix(a: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    a.in_prefix(net, len)
}

/// The plan for `node_name`. Without a Node object of that name the node has no zone and no
/// addresses (so no NodePort frontends), as a proxy on an unregistered node would see it.
pub fn plan(model: &Model, node_name: &str) -> Plan {
    let node = plan_node(model.node.as_ref(), node_name);
    let services = family_plans::<Ipv4Addr>(model, &node);
    let services_ipv6 = family_plans::<Ipv6Addr>(model, &node);
    Plan {
        node,
        services,
        services_ipv6,
        rejected: model.rejected.clone(),
    }
}

/// The node the plan is made for: the model's, else one of that name that has no zone and no
/// addresses.
pub fn plan_node(node: Option<&NodeInfo>, node_name: &str) -> NodeInfo {
    node.cloned().unwrap_or_else(|| NodeInfo {
        name: node_name.into(),
        zone: None,
        addresses: Vec::new(),
        ipv6_addresses: Vec::new(),
        pod_cidr: None,
        pod_cidr6: None,
        node_port_addresses: None,
        ipv6_node_port_addresses: None,
    })
}

/// The plans of family `A`: kube-proxy's proxier of that family, which sees only the Services
/// with a clusterIP of it (an IPv6-only Service gets no IPv4 frontend, not even a NodePort).
fn family_plans<A: FamilyAddr>(model: &Model, node: &NodeInfo) -> Vec<ServicePortPlan<A>> {
    model
        .services
        .iter()
        .filter(|s| s.serves(A::FAMILY))
        .flat_map(|s| port_plans::<A>(s, node))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::model::{Endpoint, TrafficPolicy::*};

    fn ep(last: u8, node: &str) -> Endpoint {
        Endpoint {
            addr: Ipv4Addr::new(10, 244, 0, last).into(),
            port: 8080,
            ready: true,
            serving: true,
            terminating: false,
            node_name: Some(node.into()),
            zone: None,
            zone_hints: Default::default(),
            node_hints: Default::default(),
        }
    }
    fn terminating(mut e: Endpoint, serving: bool) -> Endpoint {
        e.ready = false;
        e.serving = serving;
        e.terminating = true;
        e
    }
    fn zones(mut e: Endpoint, z: &[&str]) -> Endpoint {
        e.zone_hints = z.iter().map(|s| s.to_string()).collect();
        e
    }
    fn nodes(mut e: Endpoint, n: &[&str]) -> Endpoint {
        e.node_hints = n.iter().map(|s| s.to_string()).collect();
        e
    }
    fn lasts(v: &Option<Vec<PlannedEndpoint>>) -> Option<Vec<u8>> {
        v.as_ref()
            .map(|v| v.iter().map(|e| e.addr.ip().octets()[3]).collect())
    }
    fn cat(
        eps: &[Endpoint],
        itp: TrafficPolicy,
        etp: Option<TrafficPolicy>,
    ) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let (c, l) = categorize(eps, itp, etp, "n1", Some("za"));
        (lasts(&c), lasts(&l))
    }

    fn dualstack(node: &str) -> Plan {
        let mut o = crate::control::source::Objects::default();
        crate::control::source::parse_into(
            std::path::Path::new("dualstack.yaml"),
            include_str!("../../tests/golden/dualstack.yaml"),
            &mut o,
        )
        .unwrap();
        plan(&crate::control::model::build(&o, node), node)
    }

    fn texts<T: std::fmt::Display>(v: impl IntoIterator<Item = T>) -> Vec<String> {
        v.into_iter().map(|x| x.to_string()).collect()
    }

    /// kube-proxy's proxier per family: a dual-stack Service's IPv4 frontends get only the
    /// IPv4 slices' endpoints and its IPv6 frontends only the IPv6 slices', each family
    /// categorised on its own (local fallback, policies, hints, has_endpoints); NodePorts on
    /// the node's addresses of the family.
    #[test]
    fn each_family_gets_its_own_endpoints_and_categories() {
        let p = dualstack("node-a");
        let v4 = |name: &str| p.services.iter().find(|s| s.name == name).unwrap();
        let v6 = |name: &str| p.services_ipv6.iter().find(|s| s.name == name).unwrap();
        let eps =
            |e: &Option<Vec<PlannedEndpoint<Ipv4Addr>>>| texts(e.iter().flatten().map(|e| e.addr));
        let eps6 =
            |e: &Option<Vec<PlannedEndpoint<Ipv6Addr>>>| texts(e.iter().flatten().map(|e| e.addr));
        // web: externalTrafficPolicy Local in both families; node-a's IPv6 local endpoint is
        // terminating but serving (the fallback), its IPv4 one ready.
        let (a, b) = (v4("web"), v6("web"));
        assert_eq!((a.family, b.family), (IpFamily::IPv4, IpFamily::IPv6));
        assert_eq!(
            texts(a.frontends.iter().map(|f| f.address)),
            ["10.96.20.1:80", "192.168.1.10:30080", "203.0.113.10:30080"]
        );
        assert_eq!(
            texts(b.frontends.iter().map(|f| f.address)),
            [
                "[fd00:96::1]:80",
                "[fd00:1::10]:30080",
                "[2001:db8:1::10]:30080"
            ]
        );
        assert_eq!(eps(&a.local_endpoints), ["10.244.1.5:8080"]);
        assert_eq!(
            eps(&a.cluster_endpoints),
            ["10.244.1.5:8080", "10.244.2.5:8080"]
        );
        assert_eq!(eps6(&b.local_endpoints), ["[fd00:244:1::6]:8080"]);
        assert_eq!(eps6(&b.cluster_endpoints), ["[fd00:244:2::5]:8080"]);
        // api: an IPv6 external IP only, so only the IPv6 family is reachable from outside;
        // hints on the IPv6 endpoints only.
        let (a, b) = (v4("api"), v6("api"));
        assert_eq!(a.external_traffic_policy, None);
        assert_eq!(b.external_traffic_policy, Some(Cluster));
        assert_eq!(
            (a.topology_hints, b.topology_hints),
            (TopologyHints::Absent, TopologyHints::Used)
        );
        assert_eq!(eps(&a.cluster_endpoints).len(), 2);
        assert_eq!(eps6(&b.cluster_endpoints), ["[fd00:244:1::20]:9090"]);
        // v6only: no IPv4 entry at all (no NodePort either); its IPv6 source range admits the
        // node's IPv6 ExternalIP.
        assert!(p.services.iter().all(|s| s.name != "v6only"));
        let c = v6("v6only");
        assert_eq!(
            texts(
                c.frontends
                    .iter()
                    .map(|f| (f.kind, f.address))
                    .map(|(k, a)| format!("{k:?} {a}"))
            ),
            [
                "ClusterIP [fd00:96::3]:443",
                "NodePort [fd00:1::10]:30443",
                "NodePort [2001:db8:1::10]:30443",
                "LoadBalancer [2001:db8:ff::3]:443"
            ]
        );
        assert_eq!(
            c.source_ranges,
            Some(vec![("2001:db8:1::".parse().unwrap(), 48)])
        );
        assert!(c.source_ranges_allow_node);
        // v4only: no IPv6 entry, although an IPv6 slice names it.
        assert!(p.services_ipv6.iter().all(|s| s.name != "v4only"));
        assert_eq!(eps(&v4("v4only").cluster_endpoints), ["10.244.2.40:8080"]);
        // has_endpoints per family.
        let bare = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns}\nspec: {ipFamilyPolicy: PreferDualStack, clusterIPs: [10.96.0.1, \"fd00::1\"], ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: ns, labels: {kubernetes.io/service-name: s}}\naddressType: IPv6\nports: [{port: 8080}]\nendpoints: [{addresses: [\"fd00::5\"]}]\n";
        let mut o = crate::control::source::Objects::default();
        crate::control::source::parse_into(std::path::Path::new("t.yaml"), bare, &mut o).unwrap();
        let p = plan(&crate::control::model::build(&o, "n1"), "n1");
        assert!(!p.services[0].has_endpoints);
        assert!(p.services_ipv6[0].has_endpoints);
    }

    #[test]
    fn categorisation_table() {
        let a = ep(1, "n1");
        let b = ep(2, "n2");
        // (name, endpoints, external policy, internal policy, cluster set, local set)
        type Case = (
            &'static str,
            Vec<Endpoint>,
            TrafficPolicy,
            Option<TrafficPolicy>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
        );
        let cases: Vec<Case> = vec![
            (
                "cluster only",
                vec![a.clone(), b.clone()],
                Cluster,
                None,
                Some(vec![1, 2]),
                None,
            ),
            (
                "itp local",
                vec![a.clone(), b.clone()],
                Local,
                None,
                None,
                Some(vec![1]),
            ),
            (
                "etp local uses both",
                vec![a.clone(), b.clone()],
                Cluster,
                Some(Local),
                Some(vec![1, 2]),
                Some(vec![1]),
            ),
            (
                "etp cluster",
                vec![a.clone(), b.clone()],
                Cluster,
                Some(Cluster),
                Some(vec![1, 2]),
                None,
            ),
            (
                "both policies local: cluster endpoints for short-circuit",
                vec![b.clone()],
                Local,
                Some(Local),
                Some(vec![2]),
                Some(vec![]),
            ),
            (
                "unready ignored",
                vec![
                    Endpoint {
                        ready: false,
                        ..a.clone()
                    },
                    b.clone(),
                ],
                Cluster,
                None,
                Some(vec![2]),
                None,
            ),
            (
                "serving-terminating fallback",
                vec![terminating(a.clone(), true), terminating(b.clone(), false)],
                Cluster,
                None,
                Some(vec![1]),
                None,
            ),
            (
                "fallback only without ready",
                vec![terminating(a.clone(), true), b.clone()],
                Cluster,
                None,
                Some(vec![2]),
                None,
            ),
            (
                "local serving-terminating fallback",
                vec![terminating(a.clone(), true), b.clone()],
                Local,
                None,
                None,
                Some(vec![1]),
            ),
            (
                "local prefers ready",
                vec![terminating(a.clone(), true), ep(3, "n1")],
                Local,
                None,
                None,
                Some(vec![3]),
            ),
            (
                "nothing at all",
                vec![],
                Cluster,
                Some(Local),
                Some(vec![]),
                Some(vec![]),
            ),
        ];
        for (name, eps, itp, etp, want_c, want_l) in cases {
            assert_eq!(cat(&eps, itp, etp), (want_c, want_l), "{name}");
        }
    }

    #[test]
    fn topology_hints_table() {
        let za1 = zones(ep(1, "n1"), &["za"]);
        let zb2 = zones(ep(2, "n2"), &["zb"]);
        let zb3 = zones(ep(3, "n3"), &["zb"]);
        let cases: Vec<(&str, Vec<Endpoint>, Vec<u8>)> = vec![
            ("zone hints used", vec![za1.clone(), zb2.clone()], vec![1]),
            (
                "one endpoint without hint: ignored",
                vec![za1.clone(), ep(2, "n2")],
                vec![1, 2],
            ),
            (
                "no endpoint for my zone: ignored",
                vec![zb2.clone(), zb3.clone()],
                vec![2, 3],
            ),
            (
                "unready endpoints' hints do not count",
                vec![
                    za1.clone(),
                    zb2.clone(),
                    Endpoint {
                        ready: false,
                        ..ep(4, "n4")
                    },
                ],
                vec![1],
            ),
            (
                "node hints win",
                vec![nodes(za1.clone(), &["n2"]), nodes(zb2.clone(), &["n1"])],
                vec![2],
            ),
            (
                "node hints not for me: zone hints",
                vec![nodes(za1.clone(), &["n9"]), nodes(zb2.clone(), &["n9"])],
                vec![1],
            ),
            (
                "partial node hints: zone hints",
                vec![nodes(za1.clone(), &["n1"]), zb2.clone()],
                vec![1],
            ),
        ];
        for (name, eps, want) in &cases {
            assert_eq!(cat(eps, Cluster, None).0, Some(want.clone()), "{name}");
        }
        // What the plan reports (lb_service_topology_hints_unusable): hints that decided the set
        // are used; hints that kube-proxy's rules ignore here are unusable.
        let reported: Vec<_> = cases
            .iter()
            .map(|(name, eps, _)| (*name, topology_hints(eps, "n1", Some("za"))))
            .collect();
        use TopologyHints::*;
        assert_eq!(
            reported,
            [
                ("zone hints used", Used),
                ("one endpoint without hint: ignored", Unusable),
                ("no endpoint for my zone: ignored", Unusable),
                ("unready endpoints' hints do not count", Used),
                ("node hints win", Used),
                ("node hints not for me: zone hints", Used),
                ("partial node hints: zone hints", Used),
            ]
        );
        assert_eq!(
            topology_hints(&[ep(1, "n1"), ep(2, "n2")], "n1", Some("za")),
            Absent
        );
        // Hints only on an endpoint that is not ready: none present.
        let unready = Endpoint {
            ready: false,
            ..zones(ep(3, "n3"), &["za"])
        };
        assert_eq!(
            topology_hints(&[ep(1, "n1"), unready], "n1", Some("za")),
            Absent
        );
        assert_eq!(
            topology_hints(&[zones(ep(1, "n1"), &["za"])], "n1", None),
            Unusable,
            "a node without a zone label"
        );
        // Local endpoints are never filtered by topology.
        let eps = vec![
            zones(ep(1, "n1"), &["zb"]),
            zb2.clone(),
            zones(ep(5, "n5"), &["za"]),
        ];
        assert_eq!(cat(&eps, Local, None).1, Some(vec![1]));
        // A node without a zone ignores zone hints.
        let (c, _) = categorize(&[za1, zb2], Cluster, None, "n1", None);
        assert_eq!(lasts(&c), Some(vec![1, 2]));
    }
}
