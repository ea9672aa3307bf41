//! Synthetic clusters for the benchmarks: N Services of E endpoints each, as Kubernetes manifests
//! (for the agent) and as plain data (for the kube-proxy rule generators), so both sides program
//! exactly the same Services.
use std::{
    fmt::Write,
    net::{IpAddr, Ipv4Addr},
};

/// One Service port with its ready endpoints. Addresses are IPv4 ones (`A = Ipv4Addr`, as the
/// kube-proxy rule generators take them) or either family's (`A = IpAddr`: a Service is
/// single-stack, of its ClusterIP's family, and its endpoints must be of the same).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchService<A = Ipv4Addr> {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: A,
    pub port: u16,
    /// "TCP" or "UDP".
    pub protocol: &'static str,
    /// Set for `type: NodePort` Services.
    pub node_port: Option<u16>,
    pub target_port: u16,
    /// Ready endpoints: (address, node name).
    pub endpoints: Vec<(A, String)>,
}

/// Address `base + offset` (wrapping inside the /8 of `base`).
fn nth(base: Ipv4Addr, offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(offset))
}

/// `n` ClusterIP Services (`bench/fill-<i>`, 10.96.128.0 + i, TCP port 80 -> 8080), each with
/// `endpoints` ready endpoints in 10.250.0.0/16 on node `endpoint_node`. Nothing answers on those
/// addresses: these Services exist to make the tables as large as a real cluster's.
pub fn filler(n: usize, endpoints: usize, endpoint_node: &str) -> Vec<BenchService> {
    (0..n)
        .map(|i| BenchService {
            namespace: "bench".into(),
            name: format!("fill-{i}"),
            cluster_ip: nth(Ipv4Addr::new(10, 96, 128, 0), i as u32),
            port: 80,
            protocol: "TCP",
            node_port: None,
            target_port: 8080,
            endpoints: (0..endpoints)
                .map(|e| {
                    (
                        nth(Ipv4Addr::new(10, 250, 0, 0), (i * endpoints + e) as u32 + 1),
                        endpoint_node.to_string(),
                    )
                })
                .collect(),
        })
        .collect()
}

/// The Services as `Service` + `EndpointSlice` YAML documents (separated by `---`); an IPv6
/// Service is IPv6-only (`ipFamilies: [IPv6]`) with an IPv6 EndpointSlice.
pub fn to_manifests<A: Copy + Into<IpAddr>>(services: &[BenchService<A>]) -> String {
    let mut out = String::new();
    for s in services {
        let cluster_ip: IpAddr = s.cluster_ip.into();
        // IPv6 addresses quoted, as the example manifests write them.
        let (cluster_ip, address_type, quote) = match cluster_ip {
            IpAddr::V4(ip) => (format!("clusterIP: {ip}"), "IPv4", ""),
            IpAddr::V6(ip) => (
                format!("ipFamilies: [IPv6]\n  clusterIPs: [\"{ip}\"]"),
                "IPv6",
                "\"",
            ),
        };
        let ty = if s.node_port.is_some() {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let np = s
            .node_port
            .map(|p| format!(", nodePort: {p}"))
            .unwrap_or_default();
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  type: {ty}\n  {cluster_ip}\n  selector: {{app: {name}}}\n  ports:\n  - {{name: p, port: {port}, targetPort: {tp}, protocol: {proto}{np}}}\n",
            name = s.name,
            ns = s.namespace,
            port = s.port,
            tp = s.target_port,
            proto = s.protocol,
        );
        let _ = write!(
            out,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-x\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {address_type}\nports:\n- {{name: p, port: {tp}, protocol: {proto}}}\nendpoints:\n",
            name = s.name,
            ns = s.namespace,
            tp = s.target_port,
            proto = s.protocol,
        );
        for (addr, node) in &s.endpoints {
            let addr: IpAddr = (*addr).into();
            let _ = writeln!(
                out,
                "- {{addresses: [{quote}{addr}{quote}], nodeName: {node}, conditions: {{ready: true}}}}"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_is_distinct_and_parses() {
        let f = filler(300, 3, "node2");
        let ips: std::collections::HashSet<_> = f.iter().map(|s| s.cluster_ip).collect();
        assert_eq!(ips.len(), 300);
        let eps: std::collections::HashSet<_> = f
            .iter()
            .flat_map(|s| s.endpoints.iter().map(|e| e.0))
            .collect();
        assert_eq!(eps.len(), 900);
        let mut objects = lb_userspace::control::source::Objects::default();
        lb_userspace::control::source::parse_into(
            std::path::Path::new("gen.yaml"),
            &to_manifests(&f),
            &mut objects,
        )
        .unwrap();
        let m = lb_userspace::control::model::build(&objects, "node1");
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        assert_eq!(m.services.len(), 300);
    }
}
