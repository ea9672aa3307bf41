//! The healthCheckNodePort servers over IPv6 in the (dual-stack) reference lab: real agents on
//! both nodes whose Node objects carry an IPv4 and an IPv6 InternalIP, asked from the client over
//! the fabric as a cloud load balancer would. kube-proxy runs one health server per IP family:
//! a dual-stack Service with externalTrafficPolicy Local answers on the node's IPv6 address with
//! its ready local IPv6 endpoints and on its IPv4 address with its IPv4 ones; an IPv6-only
//! Service only on IPv6. The agent's own `/healthz` on `--health-addr [::]:10256` answers both
//! families. On both lab variants (the requests pass the nodes' north-south programs).
use std::{collections::BTreeMap, time::Duration};

use lb_tests::{
    lab::{bin_path, Lab},
    on_both_variants,
    scenario::{http_get, in_netns},
    Variant,
};

const NODES: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {topology.kubernetes.io/zone: zone-a}}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, \"fd00:244:1::/64\"]}
status:
  addresses: [{type: InternalIP, address: 192.168.100.1}, {type: InternalIP, address: \"fd00:100::1\"}, {type: Hostname, address: node1}]
---
apiVersion: v1
kind: Node
metadata: {name: node2, labels: {topology.kubernetes.io/zone: zone-b}}
spec: {podCIDR: 10.244.2.0/24, podCIDRs: [10.244.2.0/24, \"fd00:244:2::/64\"]}
status:
  addresses: [{type: InternalIP, address: 192.168.100.2}, {type: InternalIP, address: \"fd00:100::2\"}, {type: Hostname, address: node2}]
";

/// Dual-stack `dual` (health port 32180): IPv4 endpoints a1, a2 (node1) and b1 (node2); IPv6
/// endpoints a1 and b1, and a2 with `a2_ready`. IPv6-only `v6only` (health port 32181): b2 only.
fn manifests(a2_ready: bool) -> String {
    format!(
        "{NODES}---
apiVersion: v1
kind: Service
metadata: {{name: dual, namespace: default}}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.80
  clusterIPs: [10.96.0.80, \"fd00:96::80\"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32180
  selector: {{app: dual}}
  ports: [{{port: 80, targetPort: 8080, nodePort: 30180}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dual-v4, namespace: default, labels: {{kubernetes.io/service-name: dual}}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [10.244.1.10], nodeName: node1}}
- {{addresses: [10.244.1.11], nodeName: node1}}
- {{addresses: [10.244.2.10], nodeName: node2}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dual-v6, namespace: default, labels: {{kubernetes.io/service-name: dual}}}}
addressType: IPv6
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [\"fd00:244:1::10\"], nodeName: node1}}
- {{addresses: [\"fd00:244:1::11\"], nodeName: node1, conditions: {{ready: {a2_ready}}}}}
- {{addresses: [\"fd00:244:2::10\"], nodeName: node2}}
---
apiVersion: v1
kind: Service
metadata: {{name: v6only, namespace: default}}
spec:
  type: LoadBalancer
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  clusterIP: \"fd00:96::81\"
  clusterIPs: [\"fd00:96::81\"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32181
  selector: {{app: v6only}}
  ports: [{{port: 80, targetPort: 8080, nodePort: 30181}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: v6only-1, namespace: default, labels: {{kubernetes.io/service-name: v6only}}}}
addressType: IPv6
ports: [{{port: 8080}}]
endpoints:
- {{addresses: [\"fd00:244:2::11\"], nodeName: node2}}
"
    )
}

/// `GET /` on `addr` from the client: status, headers, JSON body.
fn ask(lab: &Lab, addr: &str) -> (u16, BTreeMap<String, String>, serde_json::Value) {
    let (code, headers, body) = http_get(&lab.netns("client"), addr, "/");
    let body = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{addr}: {e}: {body}"));
    (code, headers, body)
}

/// Asserts the health answer at `addr`: `code`, the Service's name and `local` endpoints (in the
/// body and the weight header).
fn expect(lab: &Lab, addr: &str, code: u16, service: &str, local: u64) {
    let (got, headers, body) = ask(lab, addr);
    assert_eq!(got, code, "{addr}: {body}");
    assert_eq!(body["service"]["name"], service, "{addr}: {body}");
    assert_eq!(body["localEndpoints"], local, "{addr}: {body}");
    assert_eq!(body["serviceProxyHealthy"], true, "{addr}: {body}");
    assert_eq!(
        headers.get("X-Load-Balancing-Endpoint-Weight"),
        Some(&local.to_string()),
        "{addr}"
    );
}

/// A TCP connection from the client to `addr` is refused: nothing listens there.
fn refused(lab: &Lab, addr: &str) {
    let a = addr.to_string();
    let err = in_netns(&lab.netns("client"), move || {
        std::net::TcpStream::connect_timeout(&a.parse().unwrap(), Duration::from_secs(3))
            .err()
            .map(|e| e.kind())
    });
    assert_eq!(
        err,
        Some(std::io::ErrorKind::ConnectionRefused),
        "{addr}: nothing listens"
    );
}

fn health_ports_on_ipv6(v: Variant) {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let lab = Lab::new_variant(v).unwrap();
    let path = lab.tmpdir().join("health6.yaml");
    std::fs::write(&path, manifests(true)).unwrap();
    let bin = bin_path("lb-agent").unwrap();
    let mut agents: Vec<_> = ["node1", "node2"]
        .iter()
        .map(|n| {
            lab.spawn_agent(n, &bin, &path, &["--health-addr", "[::]:10256"])
                .unwrap()
        })
        .collect();
    for a in &mut agents {
        a.wait_for_log("sync generation 1:", Duration::from_secs(20))
            .unwrap();
        a.wait_for_log("attached to cgroup", Duration::from_secs(10))
            .unwrap();
    }

    // node1: a1 and a2 are its ready local endpoints, in both families.
    expect(&lab, "[fd00:100::1]:32180", 200, "dual", 2);
    expect(&lab, "192.168.100.1:32180", 200, "dual", 2);
    // The IPv6-only Service: no local endpoint on node1, and no IPv4 port at all.
    expect(&lab, "[fd00:100::1]:32181", 503, "v6only", 0);
    refused(&lab, "192.168.100.1:32181");
    // node2: b1 in both families; b2 serves the IPv6-only Service.
    expect(&lab, "[fd00:100::2]:32180", 200, "dual", 1);
    expect(&lab, "192.168.100.2:32180", 200, "dual", 1);
    expect(&lab, "[fd00:100::2]:32181", 200, "v6only", 1);
    refused(&lab, "192.168.100.2:32181");
    // Only on the node's addresses: not on its pod bridge's IPv6 address.
    lab.client_route("fd00:244:1::/64", "node1").unwrap();
    refused(&lab, "[fd00:244:1::1]:32180");

    // a2's IPv6 endpoint stops being ready: node1's IPv6 count drops, its IPv4 count stays.
    std::fs::write(&path, manifests(false)).unwrap();
    for a in &mut agents {
        a.wait_for_log("sync generation 2:", Duration::from_secs(20))
            .unwrap();
    }
    expect(&lab, "[fd00:100::1]:32180", 200, "dual", 1);
    expect(&lab, "192.168.100.1:32180", 200, "dual", 2);

    // The agent's own /healthz on [::]:10256 answers both families.
    for addr in ["[fd00:100::1]:10256", "192.168.100.1:10256"] {
        let (code, _, body) = http_get(&lab.netns("client"), addr, "/healthz");
        assert_eq!(code, 200, "{addr}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["healthy"], true, "{addr}: {body}");
    }
}
on_both_variants!(health_ports_on_ipv6: lab_health_ports_on_ipv6_plain, lab_health_ports_on_ipv6_xdp);
