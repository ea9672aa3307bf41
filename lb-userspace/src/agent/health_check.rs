//! The `healthCheckNodePort` servers: one per LoadBalancer Service with
//! `externalTrafficPolicy: Local`, on this node's addresses, answering any path as kube-proxy
//! does: 200 when the node has at least one ready local endpoint of the Service (and the proxy is
//! healthy), else 503, with kube-proxy's JSON body and headers. Ports open and close as Services
//! come and go, served by the agent's HTTP runtime ([`http::Server`]): opening and closing a port
//! from the agent's loop never waits for a client (see [`http`] for the limits).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    sync::{Arc, RwLock},
};

use super::http::{self, Response, Work};
use crate::control::model::{IpFamily, ServiceModel, TrafficPolicy};

/// What one health port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEntry {
    pub namespace: String,
    pub name: String,
    /// Distinct IPs of this node's ready endpoints, over all ports of the Service.
    pub local_endpoints: usize,
}

/// The health ports a model asks for on `node`, with what each reports.
pub fn ports<'a>(
    services: impl IntoIterator<Item = &'a ServiceModel>,
    node: &str,
) -> BTreeMap<u16, HealthEntry> {
    let mut out = BTreeMap::new();
    for s in services {
        let Some(port) = s.health_check_node_port else {
            continue;
        };
        // The IPv4 family's health server (kube-proxy runs one per family, on the node's
        // addresses of that family, counting that family's endpoints); IPv6 is not served yet.
        if s.external_traffic_policy != Some(TrafficPolicy::Local) || !s.serves(IpFamily::IPv4) {
            continue;
        }
        let ips: BTreeSet<IpAddr> = s
            .endpoints
            .values()
            .flatten()
            .filter(|e| e.ready && e.addr.is_ipv4() && e.node_name.as_deref() == Some(node))
            .map(|e| e.addr)
            .collect();
        out.insert(
            port,
            HealthEntry {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                local_endpoints: ips.len(),
            },
        );
    }
    out
}

/// kube-proxy's taint on nodes the cluster autoscaler is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether this node may receive load-balanced traffic, as kube-proxy's `/healthz` decides
/// (`nodeEligible`): not when its Node is being deleted or carries [`TO_BE_DELETED_TAINT`]. A
/// node not seen (yet) is eligible, as kube-proxy assumes while it starts.
pub fn node_eligible(objects: &crate::control::source::Objects, node: &str) -> bool {
    let Some(n) = objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node))
    else {
        return true;
    };
    n.metadata.deletion_timestamp.is_none()
        && !n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

/// The HTTP response for `entry`.
pub fn response(entry: &HealthEntry, proxy_healthy: bool) -> Response {
    let n = entry.local_endpoints;
    let status = if n > 0 && proxy_healthy {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    let body = serde_json::json!({
        "service": {"namespace": entry.namespace, "name": entry.name},
        "localEndpoints": n,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string();
    Response {
        status,
        headers: vec![
            ("Content-Type", "application/json".into()),
            ("X-Content-Type-Options", "nosniff".into()),
            ("X-Load-Balancing-Endpoint-Weight", n.to_string()),
        ],
        body,
    }
}

/// Whether the proxy itself is healthy (kube-proxy's `serviceProxyHealthy`), asked at each answer.
pub type ProxyHealthy = Arc<dyn Fn() -> bool + Send + Sync>;

/// The running health servers.
pub struct HealthServers {
    server: http::Server,
    entries: Arc<RwLock<BTreeMap<u16, HealthEntry>>>,
    listeners: BTreeMap<u16, Vec<http::Serving>>,
    proxy_healthy: ProxyHealthy,
}

impl HealthServers {
    pub fn new(server: http::Server, proxy_healthy: ProxyHealthy) -> Self {
        Self {
            server,
            entries: Default::default(),
            listeners: BTreeMap::new(),
            proxy_healthy,
        }
    }

    /// Opens the ports of `want` that are not open yet on `addresses` (all addresses when empty),
    /// closes the ports no longer wanted, and updates what every port reports. Returns the ports
    /// that could not be opened on some address, with the reason: one taken port does not stop
    /// the others, and one address that cannot be bound does not stop the port on the others.
    /// Never waits for a client: closing a port stops accepting and aborts its connections.
    pub fn update(
        &mut self,
        want: &BTreeMap<u16, HealthEntry>,
        addresses: &[Ipv4Addr],
    ) -> Vec<(u16, String)> {
        *self.entries.write().expect("health entries lock") = want.clone();
        let gone: Vec<u16> = self
            .listeners
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            for l in self.listeners.remove(&port).into_iter().flatten() {
                if !l.close() {
                    log::warn!(
                        "healthCheckNodePort {port}: the listener was not closed within {:?}",
                        http::CLOSE_WAIT
                    );
                }
            }
        }
        let mut failed = Vec::new();
        for port in want.keys() {
            if self.listeners.contains_key(port) {
                continue;
            }
            match self.open(*port, addresses, &mut failed) {
                Ok(l) => {
                    self.listeners.insert(*port, l);
                }
                Err(e) => failed.push((*port, e)),
            }
        }
        failed
    }

    fn open(
        &self,
        port: u16,
        addresses: &[Ipv4Addr],
        failed: &mut Vec<(u16, String)>,
    ) -> Result<Vec<http::Serving>, String> {
        let addrs: Vec<IpAddr> = if addresses.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
        } else {
            addresses.iter().map(|a| IpAddr::V4(*a)).collect()
        };
        // Every address that can be bound is: an address of the Node object that is not on
        // this host (a cloud's ExternalIP: EADDRNOTAVAIL) or taken there is reported, and the
        // port is served on the others. It fails only where no address could be bound.
        let mut sockets = Vec::new();
        let mut errors = Vec::new();
        for a in addrs {
            match TcpListener::bind(SocketAddr::new(a, port)) {
                Ok(l) => sockets.push(l),
                Err(e) => errors.push(format!("{a}:{port}: {e}")),
            }
        }
        if sockets.is_empty() {
            return Err(errors.join("; "));
        }
        for e in errors {
            failed.push((port, format!("{e} (served on the node's other addresses)")));
        }
        let entries = self.entries.clone();
        let healthy = self.proxy_healthy.clone();
        let handler: http::Handler = Arc::new(move |_path: &str| {
            // Any path answers, as kube-proxy's health check server does.
            let entry = entries
                .read()
                .expect("health entries lock")
                .get(&port)
                .cloned()?;
            Some(response(&entry, healthy()))
        });
        sockets
            .into_iter()
            .map(|l| {
                self.server
                    .serve(l, Work::Inline, handler.clone())
                    .map_err(|e| format!("port {port}: {e}"))
            })
            .collect()
    }

    /// The ports currently open.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        let _ = self.update(&BTreeMap::new(), &[]);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::TcpStream,
        sync::atomic::{AtomicBool, Ordering},
        time::{Duration, Instant},
    };

    use super::*;
    use crate::agent::http::tests::{hogs, Hogs};

    fn get(port: u16, path: &str) -> std::io::Result<String> {
        http::tests::get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), path).map(|r| r.1)
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Health servers whose proxy health is the returned flag.
    fn servers() -> (HealthServers, Arc<AtomicBool>) {
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        (
            HealthServers::new(
                http::Server::start().unwrap(),
                Arc::new(move || h.load(Ordering::Relaxed)),
            ),
            healthy,
        )
    }

    fn entry(n: usize) -> HealthEntry {
        HealthEntry {
            namespace: "prod".into(),
            name: "web".into(),
            local_endpoints: n,
        }
    }

    #[test]
    fn answers_like_kube_proxy_and_follows_changes() {
        let port = free_port();
        let lo = [Ipv4Addr::LOCALHOST];
        let (mut hs, healthy) = servers();
        assert!(hs.update(&[(port, entry(2))].into(), &lo).is_empty());
        let r = get(port, "/any/path").unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("\r\nContent-Type: application/json\r\n"), "{r}");
        assert!(r.contains("\r\nX-Content-Type-Options: nosniff\r\n"));
        assert!(r.contains("\r\nX-Load-Balancing-Endpoint-Weight: 2\r\n"));
        let body: serde_json::Value =
            serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "prod", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        // No local endpoint: 503.
        hs.update(&[(port, entry(0))].into(), &lo);
        let r = get(port, "/").unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("X-Load-Balancing-Endpoint-Weight: 0\r\n"));
        // Proxy unhealthy: 503 even with endpoints.
        hs.update(&[(port, entry(1))].into(), &lo);
        healthy.store(false, Ordering::Relaxed);
        let r = get(port, "/healthz").unwrap();
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("\"serviceProxyHealthy\":false"));
        // Service gone: the port closes.
        hs.update(&BTreeMap::new(), &lo);
        assert_eq!(
            get(port, "/").unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        // And opens again when the Service comes back.
        assert!(hs.update(&[(port, entry(1))].into(), &lo).is_empty());
        assert!(get(port, "/").unwrap().starts_with("HTTP/1.1 503"));
    }

    /// A Node address that is not on this host (a cloud's ExternalIP; 192.0.2.1 is a
    /// documentation address, only bound, never sent to) is reported, and the port is served on
    /// the node's other addresses, as kube-proxy would need it to be for the load balancer.
    #[test]
    fn an_address_not_on_the_host_does_not_take_the_port_down() {
        let port = free_port();
        let (mut hs, _) = servers();
        let failed = hs.update(
            &[(port, entry(1))].into(),
            &[Ipv4Addr::LOCALHOST, Ipv4Addr::new(192, 0, 2, 1)],
        );
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, port);
        assert!(
            failed[0].1.contains("192.0.2.1")
                && failed[0].1.contains("served on the node's other addresses"),
            "{failed:?}"
        );
        assert!(get(port, "/").unwrap().starts_with("HTTP/1.1 200"));
        assert_eq!(hs.ports(), vec![port]);
    }

    #[test]
    fn a_taken_port_is_reported_and_others_still_open() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        let free = free_port();
        let e = HealthEntry {
            namespace: "a".into(),
            name: "b".into(),
            local_endpoints: 1,
        };
        let (mut hs, _) = servers();
        let failed = hs.update(
            &[(busy, e.clone()), (free, e)].into(),
            &[Ipv4Addr::LOCALHOST],
        );
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, busy);
        assert!(get(free, "/").unwrap().starts_with("HTTP/1.1 200"));
    }

    fn hog(port: u16) -> Hogs {
        // Every path answers on a health check port: the non-reading client asks for one too
        // (a small answer: it fits the socket buffers, the header timeout ends that one).
        hogs(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), 100, "/")
    }

    #[test]
    fn a_port_answers_while_idle_and_slow_clients_hold_connections() {
        let (port, other) = (free_port(), free_port());
        let lo = [Ipv4Addr::LOCALHOST];
        let (mut hs, _) = servers();
        assert!(hs
            .update(&[(port, entry(1)), (other, entry(1))].into(), &lo)
            .is_empty());
        let _a = hog(port);
        let _b = hog(other);
        for p in [port, other] {
            let started = Instant::now();
            let r = get(p, "/").unwrap();
            let took = started.elapsed();
            println!("healthCheckNodePort with 100 idle and 1 slow-writing connections: {took:?}");
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            assert!(took < Duration::from_secs(5), "{took:?}");
        }
    }

    #[test]
    fn closing_a_port_with_a_slow_client_attached_returns() {
        let port = free_port();
        let lo = [Ipv4Addr::LOCALHOST];
        let (mut hs, _) = servers();
        assert!(hs.update(&[(port, entry(1))].into(), &lo).is_empty());
        let hogs = hog(port);
        // Structural: the slow client never finishes its request head (it sends a byte a second
        // until dropped below), so an update that waited for it would never return.
        let started = Instant::now();
        hs.update(&BTreeMap::new(), &lo);
        println!(
            "closing a port with 101 clients attached: {:?}",
            started.elapsed()
        );
        assert!(hs.ports().is_empty());
        assert_eq!(
            TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        drop(hogs);
    }

    #[test]
    fn a_node_being_deleted_or_tainted_for_deletion_is_not_eligible() {
        use crate::control::source::Objects;
        let objects = |yaml: &str| Objects {
            nodes: vec![serde_saphyr::from_str(yaml).unwrap()],
            ..Default::default()
        };
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n";
        assert!(node_eligible(&Objects::default(), "node-a"), "not seen yet");
        assert!(node_eligible(&objects(node), "node-a"));
        let other_taint = format!(
            "{node}spec: {{taints: [{{key: node.kubernetes.io/unschedulable, effect: NoSchedule}}]}}"
        );
        assert!(node_eligible(&objects(&other_taint), "node-a"));
        let tainted = format!(
            "{node}spec: {{taints: [{{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}}]}}"
        );
        assert!(!node_eligible(&objects(&tainted), "node-a"));
        assert!(
            node_eligible(&objects(&tainted), "node-b"),
            "another node's taint"
        );
        let deleting = "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, deletionTimestamp: \"2026-01-01T00:00:00Z\"}\n";
        assert!(!node_eligible(&objects(deleting), "node-a"));
    }

    #[test]
    fn counts_distinct_ready_local_ips_over_all_ports() {
        let objects = crate::control::source::read_manifests(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/seed.yaml"
        )))
        .unwrap();
        let m = crate::control::model::build(&objects, "node-b");
        let d = ports(&m.services, "node-b");
        // web-preserve-source-ip: 10.244.2.5 and .6 serve both http and https: 2, not 4.
        assert_eq!(d[&32000].local_endpoints, 2);
        assert_eq!(d[&32001].local_endpoints, 1);
        let m = crate::control::model::build(&objects, "node-a");
        let d = ports(&m.services, "node-a");
        assert_eq!(d[&32000].local_endpoints, 1);
        assert_eq!(
            d[&32001].local_endpoints, 0,
            "game-server has no pod on node-a"
        );
    }
}
