//! The plan as map contents: what the service maps should hold, keyed by frontend
//! ([`Desired`]), how its keys and values are spelled in the ABI of lb-common, and the datapath
//! config for this node. Pure: the dataplane's sync writes it, `lbctl` and tests compare with it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
};

use lb_common::{Backend, FrontendSlotKey};

use super::{
    model::{prefix_mask, FamilyAddr, IpFamily, NodeInfo, TrafficPolicy},
    plan::{FrontendKind, Plan, PlannedEndpoint, ServicePortPlan},
};

/// A frontend as the maps key it: address, port, protocol, scope (`scope::INTERNAL` or
/// `scope::EXTERNAL`; an IPv6 frontend's map keys add `scope::IPV6` and hold its address's
/// handle, see `dataplane::addr6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: SocketAddr,
    pub proto: u8,
    pub scope: u8,
}

/// A backend as the maps key it (one id per distinct address, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub addr: SocketAddr,
    pub proto: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// The Service port the frontend belongs to (`namespace/name:port/PROTO`); its frontends
    /// share one id, and with it their session affinity records.
    pub service_port: String,
    pub flags: u16,
    pub affinity_timeout_s: u32,
    /// Backends in plan order, each with its backend flags.
    pub backends: Vec<(BackendKey, u8)>,
    /// The source prefixes the Service port admits (a LoadBalancer frontend of a Service with
    /// loadBalancerSourceRanges, flag `SOURCE_RANGES`): the ranges, plus each LoadBalancer IP
    /// of the port as a /32 when a node address lies in them (kube-proxy's `allowFromNode`).
    /// Every frontend of a Service port that has them holds the same set; the maps hold it
    /// once, under the Service-port id.
    pub source_ranges: Option<BTreeSet<(IpAddr, u8)>>,
}

/// The desired contents of the maps, keyed by frontend.
pub type Desired = BTreeMap<FrontendKey, DesiredFrontend>;

fn kind_flag(kind: FrontendKind) -> u16 {
    use lb_common::service_flags as f;
    match kind {
        FrontendKind::ClusterIP => f::CLUSTER_IP,
        FrontendKind::NodePort => f::NODE_PORT,
        FrontendKind::LoadBalancer => f::LOAD_BALANCER,
        FrontendKind::ExternalIP => f::EXTERNAL_IP,
    }
}

/// Turns a plan into map contents: the IPv4 family's Service ports (`plan.services`), then the
/// IPv6 family's (`plan.services_ipv6`), each family's frontends with that family's backends.
/// - Internal scope (socket-level path, traffic from this node's pods and processes): ClusterIPs
///   use the internal endpoint set (internalTrafficPolicy); NodePorts, LoadBalancer IPs and
///   external IPs reached from inside use the cluster endpoints, as kube-proxy short-circuits them.
/// - External scope (XDP on the devices): NodePorts, LoadBalancer IPs and external IPs use the
///   external endpoint set (externalTrafficPolicy).
pub fn desired(plan: &Plan) -> Desired {
    let mut out = Desired::new();
    for sp in &plan.services {
        out.extend(service_port_frontends(sp));
    }
    for sp in &plan.services_ipv6 {
        out.extend(service_port_frontends(sp));
    }
    out
}

/// The identity of a Service port of a family in the maps (`DesiredFrontend::service_port`):
/// `namespace/name:port/PROTO` for IPv4, with `/IPv6` added for IPv6: kube-proxy's proxier per
/// family keeps each family's session affinity and counters apart, and so do the maps.
pub fn service_port_name<A: FamilyAddr>(sp: &ServicePortPlan<A>) -> String {
    let base = format!(
        "{}/{}:{}/{:?}",
        sp.namespace, sp.name, sp.port_name, sp.protocol
    );
    match A::FAMILY {
        IpFamily::IPv4 => base,
        IpFamily::IPv6 => base + IPV6_SUFFIX,
    }
}

/// The suffix of an IPv6 Service port's identity ([`service_port_name`]).
pub const IPV6_SUFFIX: &str = "/IPv6";

/// The frontends of one Service port, as [`desired`] puts them in the maps.
pub fn service_port_frontends<A: FamilyAddr>(
    sp: &ServicePortPlan<A>,
) -> Vec<(FrontendKey, DesiredFrontend)> {
    let mut out = Vec::new();
    let proto = sp.protocol.number();
    let mut flags = 0;
    if sp.session_affinity_timeout_seconds.is_some() {
        flags |= lb_common::service_flags::SESSION_AFFINITY;
    }
    if !sp.has_endpoints {
        flags |= lb_common::service_flags::NO_ENDPOINTS;
    }
    let backends = |eps: &[PlannedEndpoint<A>]| {
        eps.iter()
            .map(|e| {
                let mut bf = 0;
                if e.local {
                    bf |= lb_common::backend_flags::LOCAL;
                }
                if e.terminating {
                    bf |= lb_common::backend_flags::TERMINATING;
                }
                (
                    BackendKey {
                        addr: e.addr.into(),
                        proto,
                    },
                    bf,
                )
            })
            .collect::<Vec<_>>()
    };
    // kube-proxy's firewall: for LoadBalancer IPs only, the same set for each of them.
    let source_ranges = sp.source_ranges.as_ref().map(|r| {
        let mut set: BTreeSet<(IpAddr, u8)> = r.iter().map(|(a, l)| ((*a).into(), *l)).collect();
        if sp.source_ranges_allow_node {
            // A request from this node to a LoadBalancer IP that is a local address of it
            // loops back with that IP as its source (kube-proxy admits it the same way).
            set.extend(
                sp.frontends
                    .iter()
                    .filter(|f| f.kind == FrontendKind::LoadBalancer)
                    .map(|f| {
                        let ip = Into::<SocketAddr>::into(f.address).ip();
                        (ip, if ip.is_ipv4() { 32 } else { 128 })
                    }),
            );
        }
        set
    });
    let from_inside = sp
        .cluster_endpoints
        .as_deref()
        .or(sp.local_endpoints.as_deref())
        .unwrap_or(&[]);
    let service_port = service_port_name(sp);
    for fe in &sp.frontends {
        let entry = |eps: &[PlannedEndpoint<A>]| DesiredFrontend {
            service_port: service_port.clone(),
            flags: flags | kind_flag(fe.kind),
            affinity_timeout_s: sp.session_affinity_timeout_seconds.unwrap_or(0),
            backends: backends(eps),
            source_ranges: None,
        };
        let key = |scope| FrontendKey {
            addr: fe.address.into(),
            proto,
            scope,
        };
        if fe.kind == FrontendKind::ClusterIP {
            out.push((
                key(lb_common::scope::INTERNAL),
                entry(sp.internal_endpoints()),
            ));
        } else {
            let fence = |mut d: DesiredFrontend| {
                if fe.kind == FrontendKind::LoadBalancer {
                    if let Some(r) = &source_ranges {
                        d.flags |= lb_common::service_flags::SOURCE_RANGES;
                        if sp.source_ranges_allow_node {
                            d.flags |= lb_common::service_flags::ALLOW_FROM_NODE;
                        }
                        d.source_ranges = Some(r.clone());
                    }
                }
                d
            };
            out.push((key(lb_common::scope::INTERNAL), fence(entry(from_inside))));
            let mut external = fence(entry(sp.external_endpoints()));
            if sp.external_traffic_policy == Some(TrafficPolicy::Local) {
                external.flags |= lb_common::service_flags::EXTERNAL_POLICY_LOCAL;
            }
            out.push((key(lb_common::scope::EXTERNAL), external));
        }
    }
    // The memo keeps these: without the room pushing left.
    out.shrink_to_fit();
    out
}

/// An IPv4 address and port as the maps hold them (network order).
pub(crate) fn be_addr(a: SocketAddrV4) -> (u32, u16) {
    (u32::from_ne_bytes(a.ip().octets()), a.port().to_be())
}

/// An IPv4 address and port the maps hold (network order) as a socket address.
#[cfg(test)]
pub(crate) fn sock_addr(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr_be.to_ne_bytes()), u16::from_be(port_be))
}

/// How the maps spell an address: an IPv4 one as itself, an IPv6 one as its handle
/// (`dataplane::addr6::Addr6Table`; `None` when it has none).
pub trait MapAddrs {
    fn map_sock(&self, a: SocketAddr) -> Option<(u32, u16)>;
}

/// The spelling of IPv4 addresses (IPv6 ones have none).
pub struct Ipv4Only;

impl MapAddrs for Ipv4Only {
    fn map_sock(&self, a: SocketAddr) -> Option<(u32, u16)> {
        match a {
            SocketAddr::V4(a) => Some(be_addr(a)),
            SocketAddr::V6(_) => None,
        }
    }
}

/// The services-map key of slot `slot` of a frontend (slot 0: its master entry), as `addrs`
/// spells its address. Panics when its IPv6 address has no handle (the sync interns an
/// address before it writes anything that names it).
pub fn service_key_in(fe: &FrontendKey, slot: u16, addrs: &impl MapAddrs) -> FrontendSlotKey {
    let (addr_be, port_be) = addrs
        .map_sock(fe.addr)
        .unwrap_or_else(|| panic!("{} has no handle", fe.addr));
    let family = if fe.addr.is_ipv6() {
        lb_common::scope::IPV6
    } else {
        0
    };
    FrontendSlotKey {
        addr_be,
        port_be,
        proto: fe.proto,
        scope: fe.scope | family,
        slot,
        _pad: 0,
    }
}

/// [`service_key_in`] of an IPv4 frontend.
pub fn service_key(fe: &FrontendKey, slot: u16) -> FrontendSlotKey {
    service_key_in(fe, slot, &Ipv4Only)
}

/// The backends-map value of a backend with its flags, as `addrs` spells its address.
pub(crate) fn backend_value(k: &BackendKey, flags: u8, addrs: &impl MapAddrs) -> Backend {
    let (addr_be, port_be) = addrs
        .map_sock(k.addr)
        .unwrap_or_else(|| panic!("{} has no handle", k.addr));
    let family = if k.addr.is_ipv6() {
        lb_common::backend_flags::IPV6
    } else {
        0
    };
    Backend {
        addr_be,
        port_be,
        proto: k.proto,
        flags: flags | family,
        zone: 0,
        _pad: [0; 3],
    }
}

/// The datapath config for this node: its first address as the SNAT source, its pod CIDR (the
/// sources of ClusterIP packets that keep their address), and whether externalTrafficPolicy
/// Cluster flows to local backends are masqueraded too (`masquerade_local`: the agent found an
/// interface whose replies no program of ours would translate), and the devices that run the
/// XDP program (redirect targets; the first `limits::XDP_DEVICES`), and the prefix covering
/// the ClusterIPs (`cluster_ips`). Without a Node object (so
/// without an address) the north-south path stays off (`xdp_no_config`).
pub fn datapath_config(
    node: &NodeInfo,
    snat_ports: (u16, u16),
    masquerade_local: bool,
    xdp_ifindexes: &[u32],
    cluster_ips: impl IntoIterator<Item = Ipv4Addr>,
) -> lb_common::Config {
    let cip = covering_prefix(cluster_ips);
    let addr = node
        .addresses
        .first()
        .map(|a| u32::from_ne_bytes(a.octets()));
    // (`parse_ipv4_cidr` gave the network already masked.)
    let (pod_net_be, pod_mask_be) = match node.pod_cidr {
        Some((net, len)) => (u32::from(net).to_be(), prefix_mask(len.into()).to_be()),
        None => (0, 0),
    };
    let mut c = lb_common::Config {
        node_addr_be: addr.unwrap_or(0),
        snat_port_min: snat_ports.0,
        snat_port_max: snat_ports.1,
        ready: addr.is_some() as u32,
        flags: if cip.is_some() {
            lb_common::config_flags::CLUSTER_IPS
        } else {
            0
        },
        pod_net_be,
        pod_mask_be,
        xdp_ifindexes: [0; lb_common::limits::XDP_DEVICES],
        cluster_ip_net_be: cip.map_or(0, |(net, _)| net.to_be()),
        cluster_ip_mask_be: cip.map_or(0, |(_, mask)| mask.to_be()),
    };
    set_masquerade_local(&mut c, masquerade_local);
    set_xdp_devices(&mut c, xdp_ifindexes);
    c
}

/// An IPv6 address as the maps hold it ([`lb_common::Addr6`]): four words whose bytes are the
/// address's, in order.
pub fn addr6_words(a: std::net::Ipv6Addr) -> lb_common::Addr6 {
    let o = a.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The IPv6 half of the datapath config: the node's first IPv6 address as the SNAT source of
/// IPv6 flows, and its IPv6 pod CIDR (who is masqueraded, as `pod_cidr` for IPv4). Without an
/// address the IPv6 path translates no flow that needs it (`xdp_no_config6`).
pub fn datapath_config6(node: &NodeInfo) -> lb_common::Config6 {
    // (`parse_ipv6_cidr` gave the network already masked.)
    let (pod_net, pod_mask) = match node.pod_cidr6 {
        Some((net, len)) => (
            addr6_words(net),
            addr6_words(std::net::Ipv6Addr::from(
                u128::MAX << (128 - u32::from(len)),
            )),
        ),
        None => Default::default(),
    };
    match node.ipv6_addresses.first() {
        Some(a) => lb_common::Config6 {
            node_addr: addr6_words(*a),
            ready: 1,
            _pad: 0,
            pod_net,
            pod_mask,
        },
        None => lb_common::Config6::default(),
    }
}

/// Sets or clears `config_flags::MASQUERADE_LOCAL` (what the agent's interface scan decides).
pub fn set_masquerade_local(c: &mut lb_common::Config, on: bool) {
    if on {
        c.flags |= lb_common::config_flags::MASQUERADE_LOCAL;
    } else {
        c.flags &= !lb_common::config_flags::MASQUERADE_LOCAL;
    }
}

/// Lists the devices that run the XDP program (the first `limits::XDP_DEVICES`; the rest 0).
pub fn set_xdp_devices(c: &mut lb_common::Config, ifindexes: &[u32]) {
    c.xdp_ifindexes = [0; lb_common::limits::XDP_DEVICES];
    for (slot, i) in c.xdp_ifindexes.iter_mut().zip(ifindexes) {
        *slot = *i;
    }
}

/// The smallest prefix (network, mask; host order) that covers every address; `None` for none.
pub fn covering_prefix(addrs: impl IntoIterator<Item = Ipv4Addr>) -> Option<(u32, u32)> {
    let mut it = addrs.into_iter().map(u32::from);
    let first = it.next()?;
    let differ = it.fold(0, |acc, a| acc | (a ^ first));
    let mask = prefix_mask(differ.leading_zeros());
    Some((first & mask, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Node's IPv6 pod CIDR (from `spec.podCIDRs`, masked, a malformed one skipped) reaches
    /// the IPv6 datapath config as network and mask; the IPv4 one stays the IPv4 config's.
    #[test]
    fn ipv6_pod_cidr_reaches_the_ipv6_config() {
        let node = |cidrs: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\nspec: {{podCIDRs: {cidrs}}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.1.10}}, {{type: InternalIP, address: 'fd00:1::10'}}]}}\n"
            );
            let mut o = crate::control::source::Objects::default();
            crate::control::source::parse_into(std::path::Path::new("t.yaml"), &yaml, &mut o)
                .unwrap();
            crate::control::model::build(&o, "n1").node.unwrap()
        };
        let n = node("[10.244.1.0/24, 'fd00:244:1::7/64']");
        assert_eq!(n.pod_cidr6, Some(("fd00:244:1::".parse().unwrap(), 64)));
        assert_eq!(n.pod_cidr, Some(("10.244.1.0".parse().unwrap(), 24)));
        let c = datapath_config6(&n);
        let words = |a: &str| addr6_words(a.parse().unwrap());
        assert_eq!(c.pod_net, words("fd00:244:1::"));
        assert_eq!(c.pod_mask, words("ffff:ffff:ffff:ffff::"));
        assert!(c.from_local_pod(&words("fd00:244:1::10")));
        assert!(!c.from_local_pod(&words("fd00:244:2::10")));
        assert_eq!(c.node_addr, words("fd00:1::10"));
        // Malformed or absent: no pod CIDR, every source outside.
        for cidrs in [
            "['fd00:244:1::/129']",
            "['fd00:244:1::']",
            "[10.244.1.0/24]",
        ] {
            let c = datapath_config6(&node(cidrs));
            assert_eq!(c.pod_mask, [0; 4], "{cidrs}");
            assert!(!c.from_local_pod(&words("fd00:244:1::10")), "{cidrs}");
        }
    }

    /// kube-proxy's firewall: only the LoadBalancer frontends (both scopes) of a Service with
    /// source ranges are flagged, all with the same set; the NodePort, ClusterIP and external
    /// IP are not. A node address in the ranges admits in-node sockets and the LB IPs
    /// themselves (kube-proxy's allowFromNode).
    #[test]
    fn source_ranges_fence_load_balancer_frontends_only() {
        let fenced = |ranges: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: n1}}\nstatus: {{addresses: [{{type: InternalIP, address: 192.168.1.10}}]}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.1, externalIPs: [5.5.5.5], loadBalancerSourceRanges: {ranges}, ports: [{{port: 80, nodePort: 30080}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 1.2.3.4}}, {{ip: 1.2.3.5}}]}}}}\n"
            );
            let mut o = crate::control::source::Objects::default();
            crate::control::source::parse_into(std::path::Path::new("t.yaml"), &yaml, &mut o)
                .unwrap();
            let p = crate::control::plan::plan(&crate::control::model::build(&o, "n1"), "n1");
            desired(&p)
                .into_iter()
                .map(|(k, v)| (k.addr.to_string(), k.scope, v.flags, v.source_ranges))
                .collect::<Vec<_>>()
        };
        use lb_common::service_flags::{ALLOW_FROM_NODE, SOURCE_RANGES};
        let set = |v: &[(&str, u8)]| {
            Some(
                v.iter()
                    .map(|(a, l)| (IpAddr::V4(a.parse::<Ipv4Addr>().unwrap()), *l))
                    .collect::<BTreeSet<_>>(),
            )
        };
        let d = fenced("[10.0.0.0/8]");
        assert_eq!(d.len(), 1 + 2 + 2 * 2 + 2, "{d:?}");
        for (addr, _, flags, ranges) in &d {
            if addr.starts_with("1.2.3.") {
                assert_eq!(flags & (SOURCE_RANGES | ALLOW_FROM_NODE), SOURCE_RANGES);
                assert_eq!(*ranges, set(&[("10.0.0.0", 8)]));
            } else {
                assert_eq!(flags & (SOURCE_RANGES | ALLOW_FROM_NODE), 0, "{addr}");
                assert_eq!(*ranges, None, "{addr}");
            }
        }
        // The node's address is in a range: the LB IPs join the set, in-node sockets pass.
        let d = fenced("[192.168.0.0/16]");
        for (addr, _, flags, ranges) in &d {
            if addr.starts_with("1.2.3.") {
                assert_eq!(
                    flags & (SOURCE_RANGES | ALLOW_FROM_NODE),
                    SOURCE_RANGES | ALLOW_FROM_NODE
                );
                assert_eq!(
                    *ranges,
                    set(&[("1.2.3.4", 32), ("1.2.3.5", 32), ("192.168.0.0", 16)])
                );
            }
        }
        // No ranges, or 0.0.0.0/0: nothing is fenced.
        for r in ["[]", "[0.0.0.0/0, 10.0.0.0/8]"] {
            assert!(fenced(r)
                .iter()
                .all(|(_, _, f, r)| f & SOURCE_RANGES == 0 && r.is_none()));
        }
    }

    /// kube-proxy's REJECT: only a Service port with no usable endpoint anywhere is flagged;
    /// one whose endpoints all live elsewhere (internalTrafficPolicy Local) is not (dropped,
    /// not rejected); a terminating but serving endpoint counts as usable.
    #[test]
    fn no_endpoints_anywhere_is_flagged_for_rejection() {
        let flagged = |spec: &str, endpoints: &str| -> bool {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec: {spec}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1, namespace: ns, labels: {{kubernetes.io/service-name: s}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: {endpoints}\n"
            );
            let mut o = crate::control::source::Objects::default();
            crate::control::source::parse_into(std::path::Path::new("t.yaml"), &yaml, &mut o)
                .unwrap();
            let p = crate::control::plan::plan(&crate::control::model::build(&o, "n1"), "n1");
            let d = desired(&p);
            assert!(!d.is_empty());
            let f: Vec<bool> = d
                .values()
                .map(|v| v.flags & lb_common::service_flags::NO_ENDPOINTS != 0)
                .collect();
            assert!(f.iter().all(|x| *x == f[0]), "one verdict per Service port");
            assert_eq!(f[0], !p.services[0].has_endpoints);
            f[0]
        };
        let cip = "{clusterIP: 10.96.0.1, ports: [{port: 80}]}";
        let local = "{clusterIP: 10.96.0.1, internalTrafficPolicy: Local, ports: [{port: 80}]}";
        let np = "{type: NodePort, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}";
        assert!(flagged(cip, "[]"));
        assert!(flagged(
            cip,
            "[{addresses: [10.0.0.1], conditions: {ready: false}}]"
        ));
        assert!(!flagged(cip, "[{addresses: [10.0.0.1]}]"));
        assert!(!flagged(
            cip,
            "[{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}]"
        ));
        assert!(!flagged(local, "[{addresses: [10.0.0.1], nodeName: n2}]"));
        assert!(!flagged(np, "[{addresses: [10.0.0.1], nodeName: n2}]"));
        assert!(flagged(np, "[]"));
    }

    /// Each family's frontends reach the maps with that family's backends only, under a
    /// Service-port identity of their own: a dual-stack Service's IPv4 half is exactly what the
    /// IPv4-only Service gives, and its IPv6 half (ClusterIP, external IP, NodePorts on the
    /// node's IPv6 address) and an IPv6-only Service (no IPv4 NodePort) add only IPv6 entries.
    #[test]
    fn each_family_reaches_the_maps_with_its_own_backends() {
        let build = |yaml: &str| {
            let mut o = crate::control::source::Objects::default();
            crate::control::source::parse_into(std::path::Path::new("t.yaml"), yaml, &mut o)
                .unwrap();
            crate::control::plan::plan(&crate::control::model::build(&o, "n1"), "n1")
        };
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: 192.168.1.10}, {type: InternalIP, address: \"fd00::10\"}]}\n";
        let slice = |family: &str, addr: &str| {
            format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-{family}, namespace: ns, labels: {{kubernetes.io/service-name: s}}}}\naddressType: {family}\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [\"{addr}\"], nodeName: n1}}]\n")
        };
        let v4 = format!(
            "{node}---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec: {{type: NodePort, clusterIP: 10.96.0.1, externalTrafficPolicy: Local, ports: [{{port: 80, nodePort: 30080}}]}}\n{}",
            slice("IPv4", "10.244.0.5")
        );
        let dual = format!(
            "{node}---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns}}\nspec: {{type: NodePort, ipFamilyPolicy: PreferDualStack, clusterIPs: [10.96.0.1, \"fd00:96::1\"], externalIPs: [\"2001:db8::1\"], externalTrafficPolicy: Local, ports: [{{port: 80, nodePort: 30080}}]}}\n{}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: only6, namespace: ns}}\nspec: {{type: NodePort, ipFamilies: [IPv6], clusterIPs: [\"fd00:96::2\"], ports: [{{port: 80, nodePort: 30081}}]}}\n",
            slice("IPv4", "10.244.0.5"),
            slice("IPv6", "fd00:244::5")
        );
        let (p4, pd) = (build(&v4), build(&dual));
        assert!(pd.rejected.is_empty(), "{:?}", pd.rejected);
        assert_eq!(pd.services_ipv6.len(), 2, "the IPv6 family is planned");
        assert!(p4.services_ipv6.is_empty());
        let (d4, dd) = (desired(&p4), desired(&pd));
        let half4: Desired = dd
            .iter()
            .filter(|(k, _)| k.addr.is_ipv4())
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        assert_eq!(half4, d4);
        assert!(
            dd.keys()
                .all(|k| k.addr.is_ipv6() || k.addr.port() != 30081),
            "no IPv4 NodePort for only6"
        );
        let half6: Vec<_> = dd.iter().filter(|(k, _)| k.addr.is_ipv6()).collect();
        let addrs: BTreeSet<String> = half6
            .iter()
            .map(|(k, _)| format!("{}/{}", k.addr, k.scope))
            .collect();
        let want: BTreeSet<String> = [
            "[fd00:96::1]:80/0",
            "[2001:db8::1]:80/0",
            "[2001:db8::1]:80/1",
            "[fd00::10]:30080/0",
            "[fd00::10]:30080/1",
            "[fd00:96::2]:80/0",
            "[fd00::10]:30081/0",
            "[fd00::10]:30081/1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(addrs, want);
        for (k, v) in &half6 {
            assert!(
                v.service_port.ends_with(IPV6_SUFFIX),
                "{k:?}: {}",
                v.service_port
            );
            assert!(v.backends.iter().all(|(b, _)| b.addr.is_ipv6()), "{k:?}");
        }
        let s6 = &dd[&FrontendKey {
            addr: "[fd00:96::1]:80".parse().unwrap(),
            proto: 6,
            scope: 0,
        }];
        assert_eq!(s6.service_port, "ns/s:/TCP/IPv6");
        assert_eq!(
            s6.backends
                .iter()
                .map(|(b, _)| b.addr.to_string())
                .collect::<Vec<_>>(),
            ["[fd00:244::5]:8080"]
        );
        // No endpoints in its family: rejected as kube-proxy does.
        let only6 = &dd[&FrontendKey {
            addr: "[fd00:96::2]:80".parse().unwrap(),
            proto: 6,
            scope: 0,
        }];
        assert!(only6.backends.is_empty());
        assert_ne!(only6.flags & lb_common::service_flags::NO_ENDPOINTS, 0);
    }

    #[test]
    fn the_cluster_ip_prefix_covers_every_cluster_ip_and_little_more() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(covering_prefix([]), None);
        assert_eq!(
            covering_prefix([ip("10.96.0.10")]),
            Some((u32::from(ip("10.96.0.10")), u32::MAX))
        );
        let both = [ip("10.96.0.10"), ip("10.96.3.1")];
        let (net, mask) = covering_prefix(both).unwrap();
        assert_eq!(
            (Ipv4Addr::from(net), mask.leading_ones()),
            (ip("10.96.0.0"), 22)
        );
        for a in both {
            assert_eq!(u32::from(a) & mask, net);
        }
        // Addresses that share no leading bit: the whole space (still correct, no filter).
        assert_eq!(
            covering_prefix([ip("10.96.0.10"), ip("192.168.0.1")]),
            Some((0, 0))
        );
    }
}
