//! The `healthCheckNodePort` servers: one per LoadBalancer Service with
//! `externalTrafficPolicy: Local` and IP family it serves, on this node's addresses of that
//! family, answering any path as kube-proxy does: 200 when the node has at least one ready local
//! endpoint of the Service in that family (and the proxy is healthy), else 503, with
//! kube-proxy's JSON body and headers. As kube-proxy runs one health server per IP family, a
//! dual-stack Service gets its port on the node's IPv4 addresses, counting its IPv4 endpoints,
//! and on the node's IPv6 addresses, counting its IPv6 endpoints; an IPv6-only one only the
//! latter. One [`HealthServers`] per family; the IPv6 family's sockets are IPV6_V6ONLY, so they
//! never clash with (or answer for) the IPv4 family's listener on the same port, also where both
//! bind the unspecified address. Ports open and close as Services come and go, served by the
//! agent's HTTP runtime ([`http::Server`]): opening and closing a port from the agent's loop
//! never waits for a client (see [`http`] for the limits).
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
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

/// The health ports a model asks for on `node` in IP family `family` (kube-proxy's health
/// server of that family's proxier), with what each reports: the Services of that family with
/// `externalTrafficPolicy: Local` and a `healthCheckNodePort`, counting their ready local
/// endpoints of that family.
pub fn ports<'a>(
    services: impl IntoIterator<Item = &'a ServiceModel>,
    node: &str,
    family: IpFamily,
) -> BTreeMap<u16, HealthEntry> {
    let mut out = BTreeMap::new();
    for s in services {
        let Some(port) = s.health_check_node_port else {
            continue;
        };
        if s.external_traffic_policy != Some(TrafficPolicy::Local) || !s.serves(family) {
            continue;
        }
        let ips: BTreeSet<IpAddr> = s
            .endpoints
            .values()
            .flatten()
            .filter(|e| {
                e.ready
                    && e.addr.is_ipv4() == (family == IpFamily::IPv4)
                    && e.node_name.as_deref() == Some(node)
            })
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

/// A TCP listener on `at` that takes IPv6 peers only (IPV6_V6ONLY, whatever
/// `net.ipv6.bindv6only` says), with SO_REUSEADDR and the backlog std's `TcpListener::bind`
/// uses. std cannot set a socket option between socket() and bind().
fn listen_v6_only(at: SocketAddrV6) -> io::Result<TcpListener> {
    fn check(r: libc::c_int) -> io::Result<()> {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    fn set_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: a valid descriptor, and a pointer to an int with its size.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
    }
    // SAFETY: plain system call; the descriptor is owned right after.
    let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(raw)?;
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?;
    set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR)?;
    let sa = libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: at.port().to_be(),
        sin6_flowinfo: at.flowinfo(),
        sin6_addr: libc::in6_addr {
            s6_addr: at.ip().octets(),
        },
        sin6_scope_id: at.scope_id(),
    };
    // SAFETY: a valid descriptor and a sockaddr_in6 with its size.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    })?;
    // SAFETY: a valid, bound descriptor.
    check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
    Ok(TcpListener::from(fd))
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

/// The running health servers of one IP family.
pub struct HealthServers {
    family: IpFamily,
    server: http::Server,
    entries: Arc<RwLock<BTreeMap<u16, HealthEntry>>>,
    listeners: BTreeMap<u16, Vec<http::Serving>>,
    proxy_healthy: ProxyHealthy,
}

impl HealthServers {
    /// The health servers of `family`: they listen on that family's addresses only (IPv6 ones
    /// with IPV6_V6ONLY).
    pub fn new(server: http::Server, proxy_healthy: ProxyHealthy, family: IpFamily) -> Self {
        Self {
            family,
            server,
            entries: Default::default(),
            listeners: BTreeMap::new(),
            proxy_healthy,
        }
    }

    /// Opens the ports of `want` that are not open yet on `addresses` (all addresses of the
    /// family, `0.0.0.0` or `[::]`, when empty; an address of the other family is reported and
    /// skipped), closes the ports no longer wanted, and updates what every port reports. Returns
    /// the ports
    /// that could not be opened on some address, with the reason: one taken port does not stop
    /// the others, and one address that cannot be bound does not stop the port on the others.
    /// Never waits for a client: closing a port stops accepting and aborts its connections.
    pub fn update(
        &mut self,
        want: &BTreeMap<u16, HealthEntry>,
        addresses: &[IpAddr],
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
        addresses: &[IpAddr],
        failed: &mut Vec<(u16, String)>,
    ) -> Result<Vec<http::Serving>, String> {
        let addrs: Vec<IpAddr> = if addresses.is_empty() {
            vec![match self.family {
                IpFamily::IPv4 => Ipv4Addr::UNSPECIFIED.into(),
                IpFamily::IPv6 => Ipv6Addr::UNSPECIFIED.into(),
            }]
        } else {
            addresses.to_vec()
        };
        // Every address that can be bound is: an address of the Node object that is not on
        // this host (a cloud's ExternalIP: EADDRNOTAVAIL) or taken there is reported, and the
        // port is served on the others. It fails only where no address could be bound.
        let mut sockets = Vec::new();
        let mut errors = Vec::new();
        for a in addrs {
            let at = SocketAddr::new(a, port);
            let bound = match (self.family, at) {
                (IpFamily::IPv4, SocketAddr::V4(_)) => TcpListener::bind(at),
                (IpFamily::IPv6, SocketAddr::V6(at6)) => listen_v6_only(at6),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("not an {:?} address", self.family),
                )),
            };
            match bound {
                Ok(l) => sockets.push(l),
                Err(e) => errors.push(format!("{at}: {e}")),
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

    /// IPv4 health servers whose proxy health is the returned flag.
    fn servers() -> (HealthServers, Arc<AtomicBool>) {
        servers_of(IpFamily::IPv4)
    }

    /// Health servers of `family` whose proxy health is the returned flag.
    fn servers_of(family: IpFamily) -> (HealthServers, Arc<AtomicBool>) {
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        (
            HealthServers::new(
                http::Server::start().unwrap(),
                Arc::new(move || h.load(Ordering::Relaxed)),
                family,
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
        let lo = [IpAddr::from(Ipv4Addr::LOCALHOST)];
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
            &[
                Ipv4Addr::LOCALHOST.into(),
                Ipv4Addr::new(192, 0, 2, 1).into(),
            ],
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
            &[Ipv4Addr::LOCALHOST.into()],
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
        let lo = [IpAddr::from(Ipv4Addr::LOCALHOST)];
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
        let lo = [IpAddr::from(Ipv4Addr::LOCALHOST)];
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
        let d = ports(&m.services, "node-b", IpFamily::IPv4);
        // web-preserve-source-ip: 10.244.2.5 and .6 serve both http and https: 2, not 4.
        assert_eq!(d[&32000].local_endpoints, 2);
        assert_eq!(d[&32001].local_endpoints, 1);
        let m = crate::control::model::build(&objects, "node-a");
        let d = ports(&m.services, "node-a", IpFamily::IPv4);
        assert_eq!(d[&32000].local_endpoints, 1);
        assert_eq!(
            d[&32001].local_endpoints, 0,
            "game-server has no pod on node-a"
        );
    }

    /// `GET path` on `at`: the status line and the parsed JSON body.
    fn get_json(at: SocketAddr, path: &str) -> std::io::Result<(String, serde_json::Value)> {
        let r = http::tests::get(at, path)?.1;
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        let status = head.lines().next().unwrap().to_string();
        Ok((status, serde_json::from_str(body).unwrap()))
    }

    /// The IPv6 family on ::1: kube-proxy's answers with that family's count, next to the IPv4
    /// family's server on 127.0.0.1 at the same port with its own count; 503 without a local
    /// IPv6 endpoint; closing one family's port leaves the other's open.
    #[test]
    fn the_ipv6_family_answers_on_ipv6_with_its_own_count() {
        let port = free_port();
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let (mut hs4, _) = servers_of(IpFamily::IPv4);
        let (mut hs6, _) = servers_of(IpFamily::IPv6);
        assert!(hs4
            .update(&[(port, entry(2))].into(), &[v4.ip()])
            .is_empty());
        assert!(hs6
            .update(&[(port, entry(1))].into(), &[v6.ip()])
            .is_empty());
        let (status, body) = get_json(v6, "/").unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(
            body,
            serde_json::json!({"service": {"namespace": "prod", "name": "web"}, "localEndpoints": 1, "serviceProxyHealthy": true})
        );
        assert_eq!(get_json(v4, "/").unwrap().1["localEndpoints"], 2);
        let r = http::tests::get(v6, "/").unwrap().1;
        assert!(
            r.contains("\r\nX-Load-Balancing-Endpoint-Weight: 1\r\n"),
            "{r}"
        );
        // No ready local IPv6 endpoint: 503 on IPv6, the IPv4 family unchanged.
        hs6.update(&[(port, entry(0))].into(), &[v6.ip()]);
        let (status, body) = get_json(v6, "/healthz").unwrap();
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(body["localEndpoints"], 0);
        assert!(get_json(v4, "/").unwrap().0.starts_with("HTTP/1.1 200"));
        // The IPv6 family stops serving the Service (it became IPv4-only): only its port closes.
        hs6.update(&BTreeMap::new(), &[v6.ip()]);
        assert_eq!(
            get(port, "/").map(|r| r.starts_with("HTTP/1.1 200")).ok(),
            Some(true)
        );
        assert_eq!(
            TcpStream::connect(v6).unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        // An address of the other family is reported, not bound.
        let failed = hs6.update(&[(port, entry(1))].into(), &[v4.ip()]);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].1.contains("not an IPv6 address"), "{failed:?}");
        assert!(hs6.ports().is_empty());
    }

    /// Without node addresses both families bind the unspecified address at the same port:
    /// `[::]` with IPV6_V6ONLY does not clash with `0.0.0.0` (without it the second bind fails
    /// with EADDRINUSE), and each family answers only its own peers, with its own count. In a
    /// network namespace of its own (root only; skipped otherwise), so that nothing listens on
    /// the host's addresses.
    #[test]
    fn without_node_addresses_each_family_binds_its_unspecified_address() {
        std::thread::spawn(|| {
            // SAFETY: plain system call; it moves only this thread to a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "skipped: cannot create a network namespace: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(up.success());
            let port = free_port();
            let (mut hs4, _) = servers_of(IpFamily::IPv4);
            let (mut hs6, _) = servers_of(IpFamily::IPv6);
            assert!(hs4.update(&[(port, entry(2))].into(), &[]).is_empty());
            let failed = hs6.update(&[(port, entry(1))].into(), &[]);
            assert!(failed.is_empty(), "{failed:?}");
            let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            assert_eq!(get_json(v4, "/").unwrap().1["localEndpoints"], 2);
            assert_eq!(get_json(v6, "/").unwrap().1["localEndpoints"], 1);
            // An IPv4 peer reaching the IPv6 socket would show as ::ffff:127.0.0.1; with the
            // IPv4 family's port closed it is refused instead.
            hs4.update(&BTreeMap::new(), &[]);
            assert_eq!(
                TcpStream::connect(v4).unwrap_err().kind(),
                std::io::ErrorKind::ConnectionRefused
            );
            assert_eq!(get_json(v6, "/").unwrap().1["localEndpoints"], 1);
        })
        .join()
        .unwrap();
    }

    /// One health server per family, as kube-proxy runs: a dual-stack Service is in both, each
    /// counting its own family's ready local endpoints; an IPv6-only one only in the IPv6
    /// family, an IPv4-only one only in the IPv4 family.
    #[test]
    fn each_family_counts_its_own_ready_local_endpoints() {
        const YAML: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: prod}
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.30.1
  clusterIPs: [10.96.30.1, "fd00:96::30:1"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32100
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30100}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-v4, namespace: prod, labels: {kubernetes.io/service-name: dual}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-a}
- {addresses: [10.244.1.6], nodeName: node-a}
- {addresses: [10.244.2.5], nodeName: node-b}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dual-v6, namespace: prod, labels: {kubernetes.io/service-name: dual}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: ["fd00:244:1::5"], nodeName: node-a}
- {addresses: ["fd00:244:1::6"], nodeName: node-a, conditions: {ready: false}}
- {addresses: ["fd00:244:2::5"], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: v6only, namespace: prod}
spec:
  type: LoadBalancer
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  clusterIP: "fd00:96::30:2"
  clusterIPs: ["fd00:96::30:2"]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32101
  ports: [{port: 80, targetPort: 8080, nodePort: 30101}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v6only-1, namespace: prod, labels: {kubernetes.io/service-name: v6only}}
addressType: IPv6
ports: [{port: 8080}]
endpoints:
- {addresses: ["fd00:244:2::7"], nodeName: node-b}
---
apiVersion: v1
kind: Service
metadata: {name: v4only, namespace: prod}
spec:
  type: LoadBalancer
  clusterIP: 10.96.30.3
  externalTrafficPolicy: Local
  healthCheckNodePort: 32102
  ports: [{port: 80, targetPort: 8080, nodePort: 30102}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: v4only-1, namespace: prod, labels: {kubernetes.io/service-name: v4only}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.8], nodeName: node-a}
"#;
        let mut o = crate::control::source::Objects::default();
        crate::control::source::parse_into(std::path::Path::new("families.yaml"), YAML, &mut o)
            .unwrap();
        let counts = |node: &str, family| {
            let m = crate::control::model::build(&o, node);
            assert!(m.rejected.is_empty(), "{:?}", m.rejected);
            ports(&m.services, node, family)
                .into_iter()
                .map(|(p, e)| (p, (e.name, e.local_endpoints)))
                .collect::<Vec<_>>()
        };
        let n = |s: &str, c| (s.to_string(), c);
        assert_eq!(
            counts("node-a", IpFamily::IPv4),
            [(32100, n("dual", 2)), (32102, n("v4only", 1))]
        );
        assert_eq!(
            counts("node-a", IpFamily::IPv6),
            [(32100, n("dual", 1)), (32101, n("v6only", 0))]
        );
        assert_eq!(
            counts("node-b", IpFamily::IPv4),
            [(32100, n("dual", 1)), (32102, n("v4only", 0))]
        );
        assert_eq!(
            counts("node-b", IpFamily::IPv6),
            [(32100, n("dual", 1)), (32101, n("v6only", 1))]
        );
    }
}
