//! The north-south NAT targets of issue 12, measured through the reference lab with the agent's
//! DEFAULT flags: used at full size by `cargo xtask bench` ([`nat_bench`]) and in shorter
//! variants by tests/tests/lab_nat.rs.
//!
//! The setup ([`NatLab`]): a fresh [`Lab`]; Services of `type: NodePort` with
//! `externalTrafficPolicy: Cluster` (the default) whose endpoints are the pods of node2, so
//! node1 translates both addresses (DNAT to the backend, SNAT to its own address and a port of
//! the default `--snat-ports` range). They are single-stack, of the lab's [`Family`]: IPv4
//! (ClusterIPs 10.96.1.N, reached at node1's 192.168.100.1) or IPv6 (ClusterIPs fd00:96::1:N,
//! reached at node1's fd00:100::1), with the same names and NodePorts:
//! - `nat/tcp` on NodePort [`NODE_PORT_TCP`] -> b1, b2 port 8080;
//! - `nat/udp-one` on NodePort [`NODE_PORT_UDP_ONE`] -> b1 only (the UDP flows target: every
//!   flow needs its own SNAT port towards the same backend address and port);
//! - `nat/udp` on NodePort [`NODE_PORT_UDP`] -> b1, b2 (the removal target).
//!
//! The no-LB path is the same path without any Service: the client connects to b1 and b2
//! directly, routed via node1 (the client routes node2's pod CIDR via node1, and node2 routes
//! the client's address via node1, so both directions cross node1 as they do through the
//! NodePort), with node1 forwarding through its stack and no agent running. It is measured first,
//! in the same lab, before the agent starts. Both routes are of the lab's family.
//!
//! [`nat_bench`] runs all of it (IPv4) on the XDP variant of the lab, then the TCP comparison
//! alone again on a fresh plain-variant lab ([`plain_tcp`]: nothing on the fabric side of
//! `eth0`, so the agent translates at tc ingress; issue 13's target is >= 0.8 of the no-LB path
//! there). tests/tests/lab_nat.rs runs shorter variants in both families.
//!
//! All traffic comes from the lab's client namespace: `lab-load` (src/bin/lab-load.rs) for the
//! TCP runs, the UDP flows and the spoofed SYNs (raw socket, IPv4 or IPv6), `lab-client hold`
//! for the established connections, and a thread of this process that entered the client
//! namespace for the UDP flow with a fixed source port.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use super::{
    gen::BenchService,
    labbench::{agent_manifests, LoadReport},
};
use crate::{
    lab::{bin_path, AgentProcess, Family, Lab},
    netns,
};

/// NodePort of `nat/tcp` (b1, b2).
pub const NODE_PORT_TCP: u16 = 31280;
/// NodePort of `nat/udp-one` (b1 only).
pub const NODE_PORT_UDP_ONE: u16 = 31281;
/// NodePort of `nat/udp` (b1, b2).
pub const NODE_PORT_UDP: u16 = 31282;
/// The pods' echo port the Services target.
pub const TARGET_PORT: u16 = 8080;
/// Concurrent TCP clients (each one connection at a time), for both paths.
pub const TCP_WORKERS: usize = 4;
/// A TCP request failing to complete within this counts as an error.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(2);
/// Source ports of the UDP flows start here (inside the client's ephemeral range, outside the
/// default SNAT range: the datapath folds them into its range).
pub const UDP_FIRST_PORT: u16 = 40_000;
/// The fixed source port of the flow that must leave a removed backend.
pub const UDP_STICKY_PORT: u16 = 39_000;
/// How long the agent may take for its first sync.
const AGENT_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// `nat/tcp`, `nat/udp-one` and `nat/udp` (see the module documentation) of `family` with
/// `endpoints` (the pods of node2: b1 first; addresses of `family`).
pub fn nat_services(family: Family, endpoints: &[(IpAddr, String)]) -> Vec<BenchService<IpAddr>> {
    let cluster_ip = |host: u8| -> IpAddr {
        match family {
            Family::V4 => Ipv4Addr::new(10, 96, 1, host).into(),
            Family::V6 => Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 1, host.into()).into(),
        }
    };
    let service =
        |name: &str, protocol, node_port, host, endpoints: &[(IpAddr, String)]| BenchService {
            namespace: "nat".into(),
            name: name.into(),
            cluster_ip: cluster_ip(host),
            port: 80,
            protocol,
            node_port: Some(node_port),
            target_port: TARGET_PORT,
            endpoints: endpoints.to_vec(),
        };
    vec![
        service("tcp", "TCP", NODE_PORT_TCP, 1, endpoints),
        service("udp-one", "UDP", NODE_PORT_UDP_ONE, 2, &endpoints[..1]),
        service("udp", "UDP", NODE_PORT_UDP, 3, endpoints),
    ]
}

/// A lab set up for the NAT targets; see the module documentation.
pub struct NatLab {
    pub lab: Lab,
    pub agent: Option<AgentProcess>,
    /// The family of the Services and of all traffic.
    pub family: Family,
    manifests: PathBuf,
    services: Vec<BenchService<IpAddr>>,
    generation: u32,
}

/// New TCP connections through the NodePort against the no-LB path.
#[derive(Debug, Clone, Serialize)]
pub struct TcpComparison {
    pub seconds: f64,
    /// Requests per second (each a new connection) straight to b1 and b2.
    pub direct_rps: f64,
    /// Requests per second through node1's NodePort.
    pub nodeport_rps: f64,
    /// `nodeport_rps / direct_rps`.
    pub ratio: f64,
    pub nodeport_requests: u64,
    pub nodeport_errors: u64,
    /// `nodeport_errors / nodeport_requests`.
    pub error_rate: f64,
    pub direct_errors: u64,
    pub nodeport_backends: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
}

/// Distinct UDP flows to one backend.
#[derive(Debug, Clone, Serialize)]
pub struct UdpFlows {
    pub flows: usize,
    /// Flows that got their reply.
    pub answered: u64,
    pub unanswered: u64,
    /// Datagrams sent (retries included).
    pub datagrams: u64,
    pub seconds: f64,
    pub backends: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
}

/// A UDP flow with a fixed source port whose backend leaves the EndpointSlice.
#[derive(Debug, Clone, Serialize)]
pub struct UdpFailover {
    /// The backend the flow had before.
    pub removed: String,
    /// The backend that answered first after the removal, if any did within the limit.
    pub moved_to: Option<String>,
    /// From writing the new manifests until the first reply from another backend.
    pub moved_after_ms: Option<u64>,
    /// Replies from the removed backend after the manifests were written.
    pub replies_from_removed: u64,
    /// Datagrams without a reply (within 100 ms) after the manifests were written.
    pub unanswered: u64,
}

/// Established connections through a flood of spoofed SYNs.
#[derive(Debug, Clone, Serialize)]
pub struct SynFlood {
    pub connections: usize,
    /// Spoofed SYNs sent (each followed by a spoofed bare ACK of the same four-tuple).
    pub syns: u64,
    pub packets: u64,
    pub send_errors: u64,
    pub seconds: f64,
    /// Growth of node1's `xdp_new_flow` during the flood: spoofed SYNs node1 translated.
    pub new_flows_seen: u64,
    /// Growth of `ct_confirmed` during the flood (spoofed flows confirmed: should be 0).
    pub confirmed: u64,
    /// Connections that carried a request and its reply from the same backend afterwards.
    pub survivors: usize,
    /// Connections whose original-direction conntrack entry is still established afterwards.
    pub still_tracked: usize,
    pub failures: Vec<String>,
}

impl NatLab {
    /// A fresh lab (XDP variant) with the Services' manifests written, the routes of the no-LB
    /// path, and no agent yet.
    pub fn new() -> Result<NatLab> {
        NatLab::new_variant(crate::lab::Variant::Xdp)
    }

    /// [`NatLab::new`] on the lab variant `variant` (plain: the agent picks tc ingress).
    pub fn new_variant(variant: crate::lab::Variant) -> Result<NatLab> {
        NatLab::new_family(variant, Family::V4)
    }

    /// [`NatLab::new_variant`] with the Services, the no-LB path's routes and all traffic of
    /// `family`.
    pub fn new_family(variant: crate::lab::Variant, family: Family) -> Result<NatLab> {
        let lab = Lab::new_variant(variant)?;
        // TIME_WAIT sockets of the client must not run it out of source ports (both paths; the
        // setting covers IPv6 too).
        netns::exec_in(
            &lab.client_netns,
            "sysctl",
            &["-q", "-w", "net.ipv4.tcp_tw_reuse=1"],
        )?;
        let node2 = lab.node("node2").clone();
        lab.client_route(family.pod_cidr(&node2), "node1")?;
        let client = family.client_addr();
        netns::ip(
            &node2.netns,
            &[
                "route",
                "add",
                &format!("{client}/{}", if client.is_ipv6() { 128 } else { 32 }),
                "via",
                &family.node_addr(lab.node("node1")).to_string(),
                "dev",
                crate::lab::NODE_DEVICE,
            ],
        )?;
        let pods: Vec<(IpAddr, String)> = lab
            .pods_of("node2")
            .iter()
            .map(|p| (family.pod_addr(p), p.node.clone()))
            .collect();
        let services = nat_services(family, &pods);
        let manifests = lab.tmpdir().join("nat-manifests.yaml");
        fs::write(&manifests, agent_manifests(&services))?;
        Ok(NatLab {
            lab,
            agent: None,
            family,
            manifests,
            services,
            generation: 0,
        })
    }

    /// `node1:PORT` (`[node1]:PORT` for IPv6).
    pub fn nodeport(&self, port: u16) -> String {
        SocketAddr::new(self.family.node_addr(self.lab.node("node1")), port).to_string()
    }

    /// Starts the agent on node1 with its default flags and waits for its first sync; then
    /// checks that every Service answers.
    pub fn start_agent(&mut self) -> Result<()> {
        ensure!(self.agent.is_none(), "the agent already runs");
        let mut a = self
            .lab
            .spawn_agent("node1", &bin_path("lb-agent")?, &self.manifests, &[])?;
        a.wait_for_log("sync generation 1:", AGENT_SYNC_TIMEOUT)?;
        self.generation = 1;
        self.agent = Some(a);
        for (proto, port) in [
            ("tcp", NODE_PORT_TCP),
            ("udp", NODE_PORT_UDP_ONE),
            ("udp", NODE_PORT_UDP),
        ] {
            let target = self.nodeport(port);
            let ex = self
                .lab
                .run_client("client", &[proto, &target, "--count", "4"])?;
            if !ex.iter().any(|e| e.ok) {
                bail!("no answer from {proto} {target}: {ex:?}");
            }
        }
        Ok(())
    }

    /// `lab-load tcp` for `duration` against `targets` (comma-separated `IP:PORT`s).
    fn tcp_load(&self, targets: &str, duration: Duration) -> Result<LoadReport> {
        self.load(&[
            "tcp",
            targets,
            "--duration-ms",
            &duration.as_millis().to_string(),
            "--workers",
            &TCP_WORKERS.to_string(),
            "--timeout-ms",
            &TCP_TIMEOUT.as_millis().to_string(),
        ])
    }

    /// Runs `lab-load ARGS` in the client namespace and parses its report.
    fn load(&self, args: &[&str]) -> Result<LoadReport> {
        let mut cmd = self.lab.client_command(bin_path("lab-load")?, args);
        let desc = netns::describe(&cmd);
        let text = netns::run_command(&mut cmd)?;
        serde_json::from_str(text.trim()).with_context(|| format!("bad output of {desc}: {text}"))
    }

    /// New TCP connections for `duration` straight to b1 and b2 (no agent may run yet).
    pub fn direct_tcp(&self, duration: Duration) -> Result<LoadReport> {
        ensure!(
            self.agent.is_none(),
            "the no-LB path is measured before the agent starts"
        );
        let targets: Vec<String> = self
            .lab
            .pods_of("node2")
            .iter()
            .map(|p| SocketAddr::new(self.family.pod_addr(p), TARGET_PORT).to_string())
            .collect();
        self.tcp_load(&targets.join(","), duration)
    }

    /// New TCP connections for `duration` through the NodePort.
    pub fn nodeport_tcp(&self, duration: Duration) -> Result<LoadReport> {
        self.tcp_load(&self.nodeport(NODE_PORT_TCP), duration)
    }

    /// The whole TCP comparison: the no-LB path (no agent may run yet), then the agent starts,
    /// then the NodePort; `duration` each.
    pub fn compare_tcp(&mut self, duration: Duration) -> Result<TcpComparison> {
        let direct = self.direct_tcp(duration)?;
        self.start_agent()?;
        let nodeport = self.nodeport_tcp(duration)?;
        Ok(TcpComparison::of(&direct, &nodeport))
    }

    /// `flows` UDP flows (source ports [`UDP_FIRST_PORT`]...) to `nat/udp-one`.
    pub fn udp_flows(&self, flows: usize) -> Result<UdpFlows> {
        let r = self.load(&[
            "udp-flows",
            &self.nodeport(NODE_PORT_UDP_ONE),
            "--flows",
            &flows.to_string(),
            "--first-port",
            &UDP_FIRST_PORT.to_string(),
            "--window",
            "256",
            "--timeout-ms",
            "500",
            "--tries",
            "3",
        ])?;
        Ok(UdpFlows {
            flows,
            answered: r.ok,
            unanswered: r.errors,
            datagrams: r.sent,
            seconds: r.elapsed_s,
            backends: r.backends,
            error_samples: r.error_samples,
        })
    }

    /// node1's datapath counters (`lbctl stats`), by name.
    pub fn stats(&self) -> Result<BTreeMap<String, u64>> {
        let mut cmd = std::process::Command::new(bin_path("lbctl")?);
        cmd.arg("--bpffs")
            .arg(&self.lab.node("node1").bpffs)
            .args(["stats", "-o", "json"]);
        let out = netns::run_command(&mut cmd)?;
        let v: Vec<serde_json::Value> = serde_json::from_str(&out).context("lbctl stats")?;
        Ok(v.iter()
            .filter_map(|c| Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?)))
            .collect())
    }

    /// node1's conntrack rows that mention the client's address (`lbctl conntrack`).
    pub fn client_conntrack(&self) -> Result<Vec<serde_json::Value>> {
        let mut cmd = std::process::Command::new(bin_path("lbctl")?);
        cmd.arg("--bpffs")
            .arg(&self.lab.node("node1").bpffs)
            .args(["-o", "json", "conntrack", "--filter"])
            .arg(self.family.client_addr().to_string());
        let out = netns::run_command(&mut cmd)?;
        serde_json::from_str(&out).context("lbctl conntrack")
    }

    /// Writes the manifests with `pod` removed from `nat/udp`'s EndpointSlice and waits until
    /// the agent synced them.
    fn remove_udp_endpoint(&mut self, pod: &str) -> Result<()> {
        let addr = self.family.pod_addr(self.lab.pod(pod));
        for s in &mut self.services {
            if s.name == "udp" {
                s.endpoints.retain(|(a, _)| *a != addr);
            }
        }
        fs::write(&self.manifests, agent_manifests(&self.services))?;
        self.generation += 1;
        Ok(())
    }

    /// A UDP flow from the fixed source port [`UDP_STICKY_PORT`] to `nat/udp`, one datagram
    /// every 50 ms: after a few exchanges its backend is removed from the EndpointSlice, and the
    /// flow goes on until another backend answers or `limit` passed.
    pub fn udp_failover(&mut self, limit: Duration) -> Result<UdpFailover> {
        ensure!(self.agent.is_some(), "the agent must run");
        let target: SocketAddr = self.nodeport(NODE_PORT_UDP).parse()?;
        let any = self.family.unspecified();
        let sock = in_netns(&self.lab.client_netns, move || -> Result<UdpSocket> {
            let s = UdpSocket::bind((any, UDP_STICKY_PORT))?;
            s.connect(target)?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        })??;
        let mut buf = [0u8; 512];
        let mut exchange = || -> Option<String> {
            // Drain late replies of earlier datagrams first.
            sock.set_nonblocking(true).ok()?;
            while sock.recv(&mut buf).is_ok() {}
            sock.set_nonblocking(false).ok()?;
            sock.send(b"x\n").ok()?;
            let n = sock.recv(&mut buf).ok()?;
            let text = std::str::from_utf8(&buf[..n]).ok()?;
            text.split_whitespace().next().map(str::to_string)
        };
        let mut before = Vec::new();
        for _ in 0..5 {
            if let Some(b) = exchange() {
                before.push(b);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let removed = before
            .first()
            .cloned()
            .context("the UDP flow got no reply before the removal")?;
        ensure!(
            before.iter().all(|b| *b == removed),
            "the flow changed backends on its own: {before:?}"
        );
        self.remove_udp_endpoint(&removed)?;
        let written = Instant::now();
        let mut out = UdpFailover {
            removed: removed.clone(),
            moved_to: None,
            moved_after_ms: None,
            replies_from_removed: 0,
            unanswered: 0,
        };
        while written.elapsed() < limit {
            match exchange() {
                Some(b) if b == removed => out.replies_from_removed += 1,
                Some(b) => {
                    out.moved_after_ms = Some(written.elapsed().as_millis() as u64);
                    out.moved_to = Some(b);
                    break;
                }
                None => out.unanswered += 1,
            }
            thread::sleep(Duration::from_millis(50));
        }
        let generation = self.generation;
        if let Some(a) = self.agent.as_mut() {
            a.wait_for_log(
                &format!("sync generation {generation}:"),
                Duration::from_secs(20),
            )?;
        }
        Ok(out)
    }

    /// `connections` connections held open to `nat/tcp`, then `syns` spoofed SYNs (each with a
    /// spoofed bare ACK) from the client namespace to the same NodePort at up to `pps` packets
    /// per second (0: as fast as the socket takes them); then one more request on every
    /// connection, and node1's conntrack checked for each.
    pub fn syn_flood(&self, connections: usize, syns: u64, pps: u64) -> Result<SynFlood> {
        ensure!(self.agent.is_some(), "the agent must run");
        let target = self.nodeport(NODE_PORT_TCP);
        let mut held = Vec::new();
        for i in 0..connections {
            let h = self.lab.hold("client", &target)?;
            let first = h.first.clone().context("held connection")?;
            ensure!(first.ok, "held connection {i}: {first:?}");
            let backend = first.backend.clone().context("backend")?;
            let snat = first.seen_peer.clone().context("seen peer")?;
            held.push((h, backend, snat));
        }
        let before = self.stats()?;
        let r = self.load(&[
            "syn-flood",
            &target,
            "--count",
            &syns.to_string(),
            "--ack",
            "--pps",
            &pps.to_string(),
        ])?;
        let after = self.stats()?;
        let delta = |k: &str| {
            after
                .get(k)
                .copied()
                .unwrap_or(0)
                .saturating_sub(before.get(k).copied().unwrap_or(0))
        };
        let mut out = SynFlood {
            connections,
            syns: r.ok,
            packets: r.sent,
            send_errors: r.errors,
            seconds: r.elapsed_s,
            new_flows_seen: delta("xdp_new_flow"),
            confirmed: delta("ct_confirmed"),
            survivors: 0,
            still_tracked: 0,
            failures: r.error_samples,
        };
        // Conntrack first: the requests below would re-create lost entries (pickup).
        let rows = self.client_conntrack()?;
        for (_, _, snat) in &held {
            let tracked = rows.iter().any(|row| {
                // `state` is the tier ("established": confirmed) or, with the tier in its own
                // field, the flow's state ("established" too).
                row["direction"] == "original"
                    && row["protocol"] == "TCP"
                    && row["state"] == "established"
                    && row.get("tier").is_none_or(|t| t == "established")
                    && row["translated"]
                        .as_str()
                        .is_some_and(|t| t.starts_with(&format!("{snat} ->")))
            });
            if tracked {
                out.still_tracked += 1;
            } else if out.failures.len() < 10 {
                out.failures
                    .push(format!("{snat}: no established conntrack entry"));
            }
        }
        for (h, backend, snat) in &mut held {
            match h.exchange() {
                Ok(e) if e.ok && e.backend.as_deref() == Some(backend.as_str()) => {
                    out.survivors += 1
                }
                other => {
                    if out.failures.len() < 10 {
                        out.failures
                            .push(format!("{snat} (backend {backend}): {other:?}"));
                    }
                }
            }
        }
        for (h, _, _) in held {
            h.close()?;
        }
        Ok(out)
    }
}

impl TcpComparison {
    pub fn of(direct: &LoadReport, nodeport: &LoadReport) -> TcpComparison {
        let rate = |r: &LoadReport| {
            if r.elapsed_s > 0.0 {
                r.ok as f64 / r.elapsed_s
            } else {
                0.0
            }
        };
        let (d, n) = (rate(direct), rate(nodeport));
        let mut error_samples = nodeport.error_samples.clone();
        error_samples.extend(direct.error_samples.iter().map(|e| format!("direct: {e}")));
        TcpComparison {
            seconds: nodeport.elapsed_s,
            direct_rps: d,
            nodeport_rps: n,
            ratio: if d > 0.0 { n / d } else { 0.0 },
            nodeport_requests: nodeport.sent,
            nodeport_errors: nodeport.errors,
            error_rate: if nodeport.sent > 0 {
                nodeport.errors as f64 / nodeport.sent as f64
            } else {
                1.0
            },
            direct_errors: direct.errors,
            nodeport_backends: nodeport.backends.clone(),
            error_samples,
        }
    }
}

/// Runs `f` on a thread that entered network namespace `ns` (sockets it makes live there).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("{}/{ns}", netns::NETNS_RUN_DIR);
    thread::spawn(move || -> Result<T> {
        let file = fs::File::open(&path).with_context(|| format!("open {path}"))?;
        // SAFETY: setns on this thread only; the thread ends after `f`.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
}

/// Everything [`nat_bench`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct NatBench {
    pub tcp: Result<TcpComparison, String>,
    pub udp_flows: Result<UdpFlows, String>,
    pub udp_failover: Result<UdpFailover, String>,
    pub syn_flood: Result<SynFlood, String>,
    /// node1's non-zero datapath counters at the end.
    pub counters: BTreeMap<String, u64>,
    /// The same TCP comparison as `tcp` (same duration, agent with default flags) on the plain
    /// lab (nothing on the fabric side of `eth0`: the agent picks tc ingress), in a lab of its
    /// own built after the XDP one is gone (issue 13: ≥ 0.8 of the no-LB path).
    pub tcp_plain: Result<TcpComparison, String>,
    /// node1's non-zero datapath counters at the end of the plain lab's comparison.
    pub plain_counters: BTreeMap<String, u64>,
}

/// Sizes of [`nat_bench`]: the targets at full size, or a quick smoke run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct NatSizes {
    pub tcp_seconds: u64,
    pub udp_flows: usize,
    pub connections: usize,
    pub syns: u64,
    /// Packets per second of the flood (SYNs and ACKs); 0: unpaced.
    pub flood_pps: u64,
}

impl NatSizes {
    pub const FULL: NatSizes = NatSizes {
        tcp_seconds: 30,
        udp_flows: 20_000,
        connections: 200,
        syns: 100_000,
        flood_pps: 0,
    };
    pub const QUICK: NatSizes = NatSizes {
        tcp_seconds: 5,
        udp_flows: 5_000,
        connections: 20,
        syns: 10_000,
        flood_pps: 0,
    };
}

/// One XDP-variant lab, in this order: the TCP comparison, the UDP flows, the spoofed SYN flood,
/// the UDP flow whose backend is removed (last, as it changes the Services); then, once that lab
/// is gone, a plain-variant lab for the TCP comparison alone ([`plain_tcp`]). A part that fails
/// is reported as such; an XDP lab that cannot be built or whose agent cannot start fails the
/// whole.
pub fn nat_bench(sizes: NatSizes) -> Result<NatBench> {
    let xdp = xdp_nat_bench(sizes)?;
    let (tcp_plain, plain_counters) = match plain_tcp(Duration::from_secs(sizes.tcp_seconds)) {
        Ok((t, c)) => (t, c),
        Err(e) => (Err(format!("{e:#}")), BTreeMap::new()),
    };
    Ok(NatBench {
        tcp_plain,
        plain_counters,
        ..xdp
    })
}

/// The TCP comparison ([`NatLab::compare_tcp`]) on a fresh plain-variant lab, and node1's
/// non-zero counters afterwards. Fails only if the lab cannot be built.
pub fn plain_tcp(
    duration: Duration,
) -> Result<(Result<TcpComparison, String>, BTreeMap<String, u64>)> {
    let mut nat = NatLab::new_variant(crate::lab::Variant::Plain)?;
    let tcp = nat.compare_tcp(duration).map_err(|e| format!("{e:#}"));
    let counters = if nat.agent.is_some() {
        nat.stats()
            .map(|s| s.into_iter().filter(|(_, v)| *v > 0).collect())
            .unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    Ok((tcp, counters))
}

/// The XDP-variant part of [`nat_bench`] (its `tcp_plain` not run yet).
fn xdp_nat_bench(sizes: NatSizes) -> Result<NatBench> {
    let err = |e: anyhow::Error| format!("{e:#}");
    let mut nat = NatLab::new()?;
    let tcp = nat
        .compare_tcp(Duration::from_secs(sizes.tcp_seconds))
        .map_err(err);
    if nat.agent.is_none() {
        return Err(anyhow::anyhow!(
            "the agent did not start: {}",
            tcp.err().unwrap_or_default()
        ));
    }
    let udp_flows = nat.udp_flows(sizes.udp_flows).map_err(err);
    let syn_flood = nat
        .syn_flood(sizes.connections, sizes.syns, sizes.flood_pps)
        .map_err(err);
    let udp_failover = nat.udp_failover(Duration::from_secs(10)).map_err(err);
    let counters = nat
        .stats()
        .map(|s| s.into_iter().filter(|(_, v)| *v > 0).collect())
        .unwrap_or_default();
    Ok(NatBench {
        tcp,
        udp_flows,
        udp_failover,
        syn_flood,
        counters,
        tcp_plain: Err("not run yet".into()),
        plain_counters: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_divides_rates_and_counts_errors() {
        let direct = LoadReport {
            ok: 1000,
            sent: 1000,
            elapsed_s: 1.0,
            ..Default::default()
        };
        let nodeport = LoadReport {
            ok: 900,
            sent: 1000,
            errors: 100,
            elapsed_s: 1.0,
            ..Default::default()
        };
        let c = TcpComparison::of(&direct, &nodeport);
        assert!((c.ratio - 0.9).abs() < 1e-9, "{c:?}");
        assert!((c.error_rate - 0.1).abs() < 1e-9, "{c:?}");
        let c = TcpComparison::of(&LoadReport::default(), &LoadReport::default());
        assert_eq!((c.ratio, c.error_rate), (0.0, 1.0));
    }

    #[test]
    fn the_services_parse() {
        for (family, b1, b2) in [
            (Family::V4, "10.244.2.10", "10.244.2.11"),
            (Family::V6, "fd00:244:2::10", "fd00:244:2::11"),
        ] {
            let svcs = nat_services(
                family,
                &[
                    (b1.parse().unwrap(), "node2".into()),
                    (b2.parse().unwrap(), "node2".into()),
                ],
            );
            let mut objects = lb_userspace::control::source::Objects::default();
            lb_userspace::control::source::parse_into(
                std::path::Path::new("nat.yaml"),
                &super::super::gen::to_manifests(&svcs),
                &mut objects,
            )
            .unwrap();
            let m = lb_userspace::control::model::build(&objects, "node1");
            assert!(m.rejected.is_empty(), "{family:?}: {:?}", m.rejected);
            assert_eq!(m.services.len(), 3, "{family:?}");
            // Single-stack of the family, with its endpoints (b1 and b2; b1 for udp-one).
            let endpoints: usize = m
                .services
                .iter()
                .flat_map(|s| {
                    assert_eq!(s.cluster_ips.len(), 1, "{s:?}");
                    assert_eq!(s.cluster_ips[0].is_ipv6(), family == Family::V6, "{s:?}");
                    s.endpoints.values().flatten()
                })
                .filter(|e| e.addr.is_ipv6() == (family == Family::V6))
                .count();
            assert_eq!(endpoints, 5, "{family:?}");
        }
    }
}
