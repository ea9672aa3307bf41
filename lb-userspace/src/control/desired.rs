//! The plan as map contents: what the service maps should hold, keyed by frontend
//! ([`Desired`]), how its keys and values are spelled in the ABI of lb-common, and the datapath
//! config for this node. Pure: the dataplane's sync writes it, `lbctl` and tests compare with it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{Backend, FrontendSlotKey};

use super::{
    model::{prefix_mask, NodeInfo, TrafficPolicy},
    plan::{FrontendKind, Plan, PlannedEndpoint, ServicePortPlan},
};

/// A frontend as the maps key it: address, port, protocol, scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: SocketAddrV4,
    pub proto: u8,
    pub scope: u8,
}

/// A backend as the maps key it (one id per distinct address, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub addr: SocketAddrV4,
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
    pub source_ranges: Option<BTreeSet<(Ipv4Addr, u8)>>,
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

/// Turns a plan into map contents: the IPv4 family's plan (`plan.services`, IPv4 by type)
/// only; `plan.services_ipv6` is never read, the maps are IPv4 only for now (issue 17).
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
    out
}

/// The frontends of one Service port, as [`desired`] puts them in the maps.
pub fn service_port_frontends(sp: &ServicePortPlan) -> Vec<(FrontendKey, DesiredFrontend)> {
    let mut out = Vec::new();
    let proto = sp.protocol.number();
    let mut flags = 0;
    if sp.session_affinity_timeout_seconds.is_some() {
        flags |= lb_common::service_flags::SESSION_AFFINITY;
    }
    if !sp.has_endpoints {
        flags |= lb_common::service_flags::NO_ENDPOINTS;
    }
    let backends = |eps: &[PlannedEndpoint]| {
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
                        addr: e.addr,
                        proto,
                    },
                    bf,
                )
            })
            .collect::<Vec<_>>()
    };
    // kube-proxy's firewall: for LoadBalancer IPs only, the same set for each of them.
    let source_ranges = sp.source_ranges.as_ref().map(|r| {
        let mut set: BTreeSet<(Ipv4Addr, u8)> = r.iter().copied().collect();
        if sp.source_ranges_allow_node {
            // A request from this node to a LoadBalancer IP that is a local address of it
            // loops back with that IP as its source (kube-proxy admits it the same way).
            set.extend(
                sp.frontends
                    .iter()
                    .filter(|f| f.kind == FrontendKind::LoadBalancer)
                    .map(|f| (*f.address.ip(), 32)),
            );
        }
        set
    });
    let from_inside = sp
        .cluster_endpoints
        .as_deref()
        .or(sp.local_endpoints.as_deref())
        .unwrap_or(&[]);
    for fe in &sp.frontends {
        let entry = |eps: &[PlannedEndpoint]| DesiredFrontend {
            service_port: format!(
                "{}/{}:{}/{:?}",
                sp.namespace, sp.name, sp.port_name, sp.protocol
            ),
            flags: flags | kind_flag(fe.kind),
            affinity_timeout_s: sp.session_affinity_timeout_seconds.unwrap_or(0),
            backends: backends(eps),
            source_ranges: None,
        };
        let key = |scope| FrontendKey {
            addr: fe.address,
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

/// An address and port as the maps hold them (network order).
pub(crate) fn be_addr(a: SocketAddrV4) -> (u32, u16) {
    (u32::from_ne_bytes(a.ip().octets()), a.port().to_be())
}

/// An address and port the maps hold (network order) as a socket address.
pub(crate) fn sock_addr(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr_be.to_ne_bytes()), u16::from_be(port_be))
}

/// The services-map key of slot `slot` of a frontend (slot 0: its master entry).
pub fn service_key(fe: &FrontendKey, slot: u16) -> FrontendSlotKey {
    let (addr_be, port_be) = be_addr(fe.addr);
    FrontendSlotKey {
        addr_be,
        port_be,
        proto: fe.proto,
        scope: fe.scope,
        slot,
        _pad: 0,
    }
}

/// The backends-map value of a backend with its flags.
pub(crate) fn backend_value(k: &BackendKey, flags: u8) -> Backend {
    let (addr_be, port_be) = be_addr(k.addr);
    Backend {
        addr_be,
        port_be,
        proto: k.proto,
        flags,
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
                    .map(|(a, l)| (a.parse::<Ipv4Addr>().unwrap(), *l))
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

    /// The maps get the IPv4 family's plan only: a dual-stack Service with IPv6 slices, and an
    /// IPv6-only Service, leave exactly the map contents of the IPv4 half alone.
    #[test]
    fn the_ipv6_family_never_reaches_the_maps() {
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
        assert_eq!(desired(&pd), desired(&p4));
        assert!(
            desired(&pd).keys().all(|k| k.addr.port() != 30081),
            "no IPv4 NodePort for only6"
        );
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
