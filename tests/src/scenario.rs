//! The common start of the end-to-end tests: a lab with one agent per node running the example
//! manifests (deploy/examples/lab.yaml) from a file the test may rewrite.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use crate::lab::{bin_path, AgentProcess, Exchange, HeldConnection, Lab, Variant, NODE_DEVICE};

/// The example manifests as shipped.
pub fn example_manifests() -> String {
    include_str!("../../deploy/examples/lab.yaml").to_string()
}

/// The example manifests without the endpoint at `addr`, an IPv4 or IPv6 address (both ports
/// of every slice that lists it).
pub fn without_endpoint(addr: &str) -> String {
    let without: String = example_manifests()
        .lines()
        .filter(|l| {
            !(l.contains(&format!("addresses: [{addr}]"))
                || l.contains(&format!("addresses: [\"{addr}\"]")))
                || l.contains("legacy")
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(without, example_manifests());
    without
}

/// The example manifests plus `fenced`, a LoadBalancer Service (ClusterIP 10.96.0.70,
/// ingress IP 203.0.113.20, NodePort 30110, TCP and UDP port 80, externalTrafficPolicy Local)
/// with `loadBalancerSourceRanges: RANGES` (YAML, e.g. `[10.0.0.0/8]`), served by a1.
pub fn fenced_manifests(ranges: &str) -> String {
    format!(
        "{}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: fenced, namespace: default}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.70\n  externalTrafficPolicy: Local\n  loadBalancerSourceRanges: {ranges}\n  selector: {{app: fenced}}\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, nodePort: 30110}}\n  - {{name: udp, port: 80, targetPort: 8080, nodePort: 30110, protocol: UDP}}\nstatus:\n  loadBalancer: {{ingress: [{{ip: 203.0.113.20}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: fenced-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: fenced}}\naddressType: IPv4\nports:\n- {{name: tcp, port: 8080}}\n- {{name: udp, port: 8080, protocol: UDP}}\nendpoints:\n- {{addresses: [10.244.1.10], nodeName: node1, zone: zone-a}}\n",
        example_manifests().trim_end()
    )
}

/// The example manifests plus the IPv6 north-south Services (lab_northsouth6, lab_interfaces):
/// - `web-local6`: dual-stack LoadBalancer, externalTrafficPolicy Local, healthCheckNodePort
///   32081, NodePort 30180, ingress IPs 203.0.113.30 and fd00:203::10, TCP and UDP port 80;
///   one endpoint per family, both a1 (on node1).
/// - `web-cluster6`: IPv6-only LoadBalancer, externalTrafficPolicy Cluster, NodePort 30190,
///   ingress IP fd00:203::11; its only endpoint is b1 (on node2).
/// - `ext6`: IPv6-only, external IP fd00:198::50 port 80 to 9090, endpoints a2 and b2.
/// - `sticky6`: IPv6-only NodePort 30200, ClientIP affinity (2 s) over a1, a2 and b1.
pub fn with_ipv6_north_south_services() -> String {
    format!(
        "{}\n---
apiVersion: v1
kind: Service
metadata: {{name: web-local6, namespace: default}}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.0.140, \"fd00:96::140\"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32081
  selector: {{app: web-local6}}
  ports:
  - {{name: tcp, port: 80, targetPort: 8080, nodePort: 30180}}
  - {{name: udp, port: 80, targetPort: 8080, nodePort: 30180, protocol: UDP}}
status:
  loadBalancer: {{ingress: [{{ip: 203.0.113.30}}, {{ip: \"fd00:203::10\"}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-local6-v4, namespace: default, labels: {{kubernetes.io/service-name: web-local6}}}}
addressType: IPv4
ports:
- {{name: tcp, port: 8080}}
- {{name: udp, port: 8080, protocol: UDP}}
endpoints:
- {{addresses: [10.244.1.10], nodeName: node1, zone: zone-a}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-local6-v6, namespace: default, labels: {{kubernetes.io/service-name: web-local6}}}}
addressType: IPv6
ports:
- {{name: tcp, port: 8080}}
- {{name: udp, port: 8080, protocol: UDP}}
endpoints:
- {{addresses: [\"fd00:244:1::10\"], nodeName: node1, zone: zone-a}}
---
apiVersion: v1
kind: Service
metadata: {{name: web-cluster6, namespace: default}}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6]
  clusterIPs: [\"fd00:96::141\"]
  externalTrafficPolicy: Cluster
  selector: {{app: web-cluster6}}
  ports:
  - {{name: tcp, port: 80, targetPort: 8080, nodePort: 30190}}
  - {{name: udp, port: 80, targetPort: 8080, nodePort: 30190, protocol: UDP}}
status:
  loadBalancer: {{ingress: [{{ip: \"fd00:203::11\"}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-cluster6-1, namespace: default, labels: {{kubernetes.io/service-name: web-cluster6}}}}
addressType: IPv6
ports:
- {{name: tcp, port: 8080}}
- {{name: udp, port: 8080, protocol: UDP}}
endpoints:
- {{addresses: [\"fd00:244:2::10\"], nodeName: node2, zone: zone-b}}
---
apiVersion: v1
kind: Service
metadata: {{name: ext6, namespace: default}}
spec:
  ipFamilies: [IPv6]
  clusterIPs: [\"fd00:96::142\"]
  externalIPs: [\"fd00:198::50\"]
  selector: {{app: ext6}}
  ports:
  - {{port: 80, targetPort: 9090}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: ext6-1, namespace: default, labels: {{kubernetes.io/service-name: ext6}}}}
addressType: IPv6
ports:
- {{port: 9090}}
endpoints:
- {{addresses: [\"fd00:244:1::11\"], nodeName: node1}}
- {{addresses: [\"fd00:244:2::11\"], nodeName: node2}}
---
apiVersion: v1
kind: Service
metadata: {{name: sticky6, namespace: default}}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIPs: [\"fd00:96::160\"]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 2}}}}
  selector: {{app: sticky6}}
  ports:
  - {{name: tcp, port: 80, targetPort: 8080, nodePort: 30200}}
  - {{name: udp, port: 80, targetPort: 8080, nodePort: 30200, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: sticky6-1, namespace: default, labels: {{kubernetes.io/service-name: sticky6}}}}
addressType: IPv6
ports:
- {{name: tcp, port: 8080}}
- {{name: udp, port: 8080, protocol: UDP}}
endpoints:
- {{addresses: [\"fd00:244:1::10\"], nodeName: node1}}
- {{addresses: [\"fd00:244:1::11\"], nodeName: node1}}
- {{addresses: [\"fd00:244:2::10\"], nodeName: node2}}
",
        example_manifests().trim_end()
    )
}

pub struct Running {
    pub lab: Lab,
    /// The manifests file the agents watch.
    pub manifests: PathBuf,
    pub agents: Vec<AgentProcess>,
}

impl Running {
    /// Replaces the manifests and waits until every agent applied them as `generation`.
    pub fn apply(&mut self, text: &str, generation: u32) {
        std::fs::write(&self.manifests, text).unwrap();
        for a in &mut self.agents {
            a.wait_for_log(
                &format!("sync generation {generation}:"),
                Duration::from_secs(20),
            )
            .unwrap();
        }
    }

    /// The lab's variant (plain or XDP).
    pub fn variant(&self) -> Variant {
        self.lab.variant
    }

    /// Removes `pinned`'s endpoint from the Service (as generation 2), then exchanges on
    /// `held` every 100 ms until one fails; every exchange before that still reaches `pinned`,
    /// and the failure comes within 3 s. Returns the failed exchange and when it came after the
    /// removal. The endpoint removed is `pinned`'s address of the family `held` talks to: its
    /// IPv6 address where the peer is an IPv6 ClusterIP, else its IPv4 address (an IPv4 or
    /// IPv4-mapped peer).
    pub fn remove_and_wait_for_failure(
        &mut self,
        held: &mut HeldConnection,
        pinned: &str,
    ) -> (Exchange, Duration) {
        let pod = self.lab.pod(pinned);
        let peer = held.first.as_ref().and_then(|e| e.peer_addr());
        let addr = match peer.map(|p| p.ip()) {
            Some(std::net::IpAddr::V6(a)) if a.to_ipv4_mapped().is_none() => pod.addr6.to_string(),
            _ => pod.addr.to_string(),
        };
        self.apply(&without_endpoint(&addr), 2);
        let removed = std::time::Instant::now();
        loop {
            let e = held.exchange().unwrap();
            if !e.ok {
                return (e, removed.elapsed());
            }
            assert_eq!(e.backend.as_deref(), Some(pinned), "{e:?}");
            assert!(
                removed.elapsed() < Duration::from_secs(3),
                "the socket still talks to removed backend {pinned} after 3 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A connected UDP socket (`held`, pinned to `pinned`) whose backend is removed: it fails
    /// within 3 s ([`Running::remove_and_wait_for_failure`]) with ECONNABORTED (os error 103)
    /// when the abort is read, or no destination any more (EDESTADDRREQ, os error 89) when it
    /// was idle; the application's next exchange connects again and lands on a live backend,
    /// which it returns.
    pub fn udp_socket_terminated_then_reconnects(
        &mut self,
        held: &mut HeldConnection,
        pinned: &str,
    ) -> Exchange {
        let (failed, after) = self.remove_and_wait_for_failure(held, pinned);
        let err = failed.error.clone().unwrap_or_default();
        assert!(
            err.contains("os error 103") || err.contains("os error 89"),
            "{failed:?}"
        );
        eprintln!("terminated {after:?} after removal: {err}");
        let again = held.exchange().unwrap();
        assert!(again.ok, "{again:?}");
        assert_ne!(again.backend.as_deref(), Some(pinned), "{again:?}");
        again
    }

    /// A connected UDP socket from a1 to `target` (a ClusterIP of the example manifests) keeps
    /// its backend; when that backend leaves the Service, node1's agent terminates the socket
    /// and the application's next exchange connects again, to a live backend and through the
    /// same frontend (`target` is the reply's source). Returns that exchange.
    pub fn connected_udp_socket_to_a_removed_backend_is_terminated(
        &mut self,
        target: &str,
    ) -> Exchange {
        let mut held = self.lab.hold_udp("a1", target).unwrap();
        let first = held.first.clone().unwrap();
        assert!(first.ok, "{first:?}");
        let pinned = first.backend.clone().unwrap();
        // One connected socket keeps its backend.
        for _ in 0..3 {
            let e = held.exchange().unwrap();
            assert!(e.ok, "{e:?}");
            assert_eq!(e.backend.as_deref(), Some(pinned.as_str()), "{e:?}");
        }
        let again = self.udp_socket_terminated_then_reconnects(&mut held, &pinned);
        assert_eq!(again.peer_addr(), first.peer_addr(), "{again:?}");
        self.agents[0]
            .wait_for_log("1 terminated", Duration::from_secs(5))
            .unwrap();
        again
    }

    /// With agents run with `--terminate-tcp-sockets`: a TCP connection from a1 to `target`
    /// (a ClusterIP of the example manifests) whose backend leaves the Service is terminated
    /// by node1's agent, and the application reads ECONNABORTED (os error 103).
    pub fn tcp_connection_to_a_removed_backend_is_terminated(&mut self, target: &str) {
        let mut held = self.lab.hold("a1", target).unwrap();
        let first = held.first.clone().unwrap();
        assert!(first.ok, "{first:?}");
        let pinned = first.backend.clone().unwrap();
        let (failed, _) = self.remove_and_wait_for_failure(&mut held, &pinned);
        let err = failed.error.clone().unwrap_or_default();
        assert!(err.contains("os error 103"), "{failed:?}");
        self.agents[0]
            .wait_for_log("1 terminated", Duration::from_secs(5))
            .unwrap();
    }

    /// `lbctl --bpffs <node's> COMMAND -o json`, parsed.
    pub fn lbctl_json(&self, node: &str, command: &str) -> serde_json::Value {
        let out = std::process::Command::new(bin_path("lbctl").unwrap())
            .arg("--bpffs")
            .arg(&self.lab.node(node).bpffs)
            .args([command, "-o", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `lbctl stats` of a node's agent: counter name -> packets.
    pub fn stats(&self, node: &str) -> BTreeMap<String, u64> {
        let v = self.lbctl_json(node, "stats");
        v.as_array()
            .expect("a list of counters")
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["packets"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

/// A lab (XDP variant) with agents on both nodes running the example manifests; `None` where
/// kernel tests cannot run (see `require_privileges`).
pub fn start_example() -> Option<Running> {
    start_example_with(&[])
}

/// Like `start_example`, with extra `lb-agent run` arguments for both agents.
pub fn start_example_with(extra: &[&str]) -> Option<Running> {
    start_example_on_with(Variant::Xdp, extra)
}

/// [`start_example`] on the lab variant `variant`.
pub fn start_example_on(variant: Variant) -> Option<Running> {
    start_example_on_with(variant, &[])
}

/// [`start_example_with`] on the lab variant `variant`. With the default `--north-south`
/// (auto), each agent must have chosen the variant's hook for `eth0`
/// ([`Variant::expected_hook`]): tc on the plain lab, XDP on the XDP one.
pub fn start_example_on_with(variant: Variant, extra: &[&str]) -> Option<Running> {
    crate::require_privileges()?;
    let lab = Lab::new_variant(variant).expect("lab");
    let manifests = lab.tmpdir().join("manifests.yaml");
    std::fs::write(&manifests, example_manifests()).unwrap();
    let agent = bin_path("lb-agent").unwrap();
    let mut agents = Vec::new();
    for node in ["node1", "node2"] {
        let mut a = lab.spawn_agent(node, &agent, &manifests, extra).unwrap();
        a.wait_for_log("sync generation 1:", Duration::from_secs(20))
            .unwrap();
        if !extra.contains(&"--north-south") {
            a.wait_for_log(
                &format!(
                    "device {NODE_DEVICE}: north-south hook {} ",
                    variant.expected_hook()
                ),
                Duration::from_secs(5),
            )
            .unwrap();
        }
        // The hook is chosen (and logged) before it is attached: traffic sent in between would
        // meet a half-attached node. Wait for the attach, and for the node's pod bridge to get
        // its tc programs (the interface scan right after).
        a.wait_for_log("attached to cgroup", Duration::from_secs(10))
            .unwrap();
        if !extra.contains(&"--device") && !extra.contains(&"--other-interfaces") {
            a.wait_for_log(
                "interface cni0: tc ingress and egress attached",
                Duration::from_secs(10),
            )
            .unwrap();
        }
        agents.push(a);
    }
    Some(Running {
        lab,
        manifests,
        agents,
    })
}

/// `GET path` on `addr` from inside network namespace `ns` (a thread that entered it), as a
/// health checker or Prometheus would: (status, headers, body).
pub fn http_get(ns: &str, addr: &str, path: &str) -> (u16, BTreeMap<String, String>, String) {
    use std::io::{Read, Write};
    let (addr, path) = (addr.to_string(), path.to_string());
    in_netns(ns, move || {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // One request: the agent's servers keep connections alive otherwise (until their
        // header timeout), and this reads to the end.
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        (status, headers, body.to_string())
    })
}

/// Runs `f` on a thread that entered network namespace `ns` (sockets it opens stay there).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread only.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .unwrap()
}
