//! North-south throughput through the reference lab: the external client sends to node1's
//! NodePort, whose backends are the pods b1 and b2 on node2, with the Service implemented by our
//! XDP path or by the iptables or nftables rules kube-proxy would write ([`super::kubeproxy`]).
//!
//! Each (Service count, mode) point gets a fresh [`Lab`], so nothing of one mode (agent, pinned
//! maps, rules, conntrack entries) is present while another is measured:
//! - `no-lb`: the reference without a load balancer: no agent and no rules; the client sends
//!   straight to the pods b1 and b2 (port [`TARGET_PORT`]), routed through node1's stack both
//!   ways (the routes of [`super::nat`]'s no-LB path), as every other mode's packets go, so the
//!   only difference is the Service translation. The Service count
//!   does not change this path; it is measured at every count all the same, which shows how much
//!   the machine itself drifts during a run.
//! - `xdp`: `lb-agent run` on node1 only, with `--device eth0` (as [`Lab::spawn_agent`] starts
//!   it) and [`XDP_AGENT_ARGS`], on manifests holding the lab's Node objects, the measured
//!   Service and the fillers.
//!   Translated packets (DNAT + SNAT to node1) leave through XDP_TX back out of eth0; replies are
//!   translated back by XDP as well. Afterwards the agent is stopped and `lb-agent uninstall`
//!   removes its programs and maps.
//! - `iptables` / `nftables`: no agent; [`kubeproxy::iptables_full_restore`] /
//!   [`kubeproxy::nft_full_transaction`] of the same Services loaded into node1's namespace
//!   (`iptables-restore` replacing the empty tables, `nft -f`), which DNATs, masquerades and
//!   forwards through its own stack. Afterwards the rules are flushed.
//!
//! The measured Service is a NodePort with `externalTrafficPolicy: Cluster`, written as two
//! single-port Services (`bench/echo-tcp` on NodePort [`NODE_PORT_TCP`], `bench/echo-udp` on
//! [`NODE_PORT_UDP`], both to port 8080 of b1 and b2); "`n` Services" means this Service plus
//! `n - 1` ClusterIP fillers of 10 endpoints each ([`gen::filler`]), so the tables hold `n + 1`
//! Service ports.
//!
//! The load comes from `lab-load` (src/bin/lab-load.rs) in the client namespace; see
//! [`LabPoint::rps`] and [`LabPoint::pps`] for exactly what is counted. Each point runs the TCP
//! and the UDP load `repeats` times, alternating, on the same programmed lab; the point's figure
//! is the median of the runs, and [`Spread`] keeps every run with the minimum, maximum and
//! standard deviation. The client namespace gets
//! `net.ipv4.tcp_tw_reuse=1` so that its TIME_WAIT sockets do not run it out of source ports.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, Ipv4Addr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{
    gen::{self, BenchService},
    kubeproxy,
};
use crate::{
    lab::{bin_path, AgentProcess, Lab},
    netns,
};

/// NodePort of the measured Service's TCP port.
pub const NODE_PORT_TCP: u16 = 31080;
/// NodePort of the measured Service's UDP port.
pub const NODE_PORT_UDP: u16 = 31081;
/// The port of the pods' echo servers the measured Service targets.
pub const TARGET_PORT: u16 = 8080;
/// Concurrent TCP clients (each one connection at a time).
pub const TCP_WORKERS: usize = 4;
/// UDP client threads, and sockets (source ports, i.e. flows) per thread, each with one datagram
/// in flight.
pub const UDP_WORKERS: usize = 2;
pub const UDP_FLOWS_PER_WORKER: usize = 32;
/// A TCP request (connect, send, reply) failing to complete within this counts as an error.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(2);
/// A UDP datagram without a reply within this counts as lost (and is sent again).
pub const UDP_TIMEOUT: Duration = Duration::from_millis(300);
/// Extra `lb-agent run` arguments for the `xdp` mode: none, the agent runs with its default
/// flags (its default `--snat-ports` is 1024-29999, below the NodePort range and the node's
/// ephemeral ports).
pub const XDP_AGENT_ARGS: &[&str] = &[];
/// How long the agent may take for its first sync (10,000 Services included).
const AGENT_SYNC_TIMEOUT: Duration = Duration::from_secs(600);

/// The runs of one figure and how far apart they are.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    /// Every run's figure, in the order they ran.
    pub runs: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Population standard deviation of the runs (0 for a single run).
    pub stddev: f64,
}

impl Spread {
    pub fn of(runs: Vec<f64>) -> Self {
        if runs.is_empty() {
            return Self::default();
        }
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let var = sorted.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            stddev: var.sqrt(),
            runs,
        }
    }
}

/// One measurement: one mode, one Service count.
#[derive(Debug, Clone, Serialize)]
pub struct LabPoint {
    /// `no-lb`, `xdp`, `iptables` or `nftables`.
    pub mode: String,
    /// Services present: the measured one and `services - 1` fillers.
    pub services: usize,
    /// Completed TCP requests per second: each request is a NEW connection from the client to
    /// node1's NodePort (connect, send one line, read the echo's one-line reply naming b1 or b2,
    /// close), by [`TCP_WORKERS`] concurrent clients. Only requests whose reply arrived count;
    /// divided by the measured wall time of the run. The median of [`LabPoint::rps_spread`].
    pub rps: f64,
    /// UDP replies received per second through the NodePort: [`UDP_WORKERS`] x
    /// [`UDP_FLOWS_PER_WORKER`] connected sockets (distinct source ports), each sending its next
    /// datagram as soon as the reply to the previous one arrived. Each reply is a datagram that
    /// went client -> node1 -> b1/b2 and back; node1 forwards twice this many packets. The
    /// median of [`LabPoint::pps_spread`].
    pub pps: f64,
    /// TCP and UDP runs of this point.
    pub repeats: usize,
    /// Requests/s of each TCP run.
    pub rps_spread: Spread,
    /// Replies/s of each UDP run.
    pub pps_spread: Spread,
    /// `tcp_errors + udp_errors` (all runs).
    pub errors: u64,
    pub tcp_requests: u64,
    /// TCP requests that failed (connect refused or timed out, reset, no or bad reply).
    pub tcp_errors: u64,
    /// TCP replies per backend name (both pods of node2 should appear).
    pub tcp_backends: BTreeMap<String, u64>,
    pub udp_replies: u64,
    pub udp_sent: u64,
    /// UDP datagrams without a reply within [`UDP_TIMEOUT`], plus socket errors.
    pub udp_errors: u64,
    pub udp_backends: BTreeMap<String, u64>,
    /// Measured wall time of the TCP and of the UDP runs (all runs together).
    pub tcp_seconds: f64,
    pub udp_seconds: f64,
    /// Time to program the Services: agent start until its first sync is logged (`xdp`), or the
    /// `iptables-restore` / `nft -f` run.
    pub program_ms: f64,
    /// Lines of rules loaded (0 for `xdp`).
    pub rule_lines: usize,
    /// Up to 5 distinct error messages of the load generator.
    pub error_samples: Vec<String>,
    /// `xdp` only: node1's non-zero datapath counters (`lbctl stats`) after the runs.
    pub xdp_counters: BTreeMap<String, u64>,
}

/// What `lab-load` prints (one JSON line) for one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// `tcp` or `udp`.
    pub proto: String,
    pub workers: usize,
    /// UDP sockets in total (0 for TCP).
    pub flows: usize,
    /// Wall time from the start of the run until every worker stopped.
    pub elapsed_s: f64,
    /// TCP: requests completed with a valid reply; UDP: valid replies received.
    pub ok: u64,
    /// TCP: requests started; UDP: datagrams sent.
    pub sent: u64,
    /// TCP: failed requests; UDP: datagrams unanswered within the timeout, and socket errors.
    pub errors: u64,
    /// Valid replies per backend name.
    pub backends: BTreeMap<String, u64>,
    /// Up to 5 distinct error messages.
    pub error_samples: Vec<String>,
}

impl LoadReport {
    /// Adds another worker's counts.
    pub fn merge(&mut self, other: LoadReport) {
        self.ok += other.ok;
        self.sent += other.sent;
        self.errors += other.errors;
        for (k, v) in other.backends {
            *self.backends.entry(k).or_default() += v;
        }
        for e in other.error_samples {
            self.note_error(e);
        }
    }

    /// Keeps `e` as a sample when it is new and there are fewer than 5.
    pub fn note_error(&mut self, e: String) {
        if self.error_samples.len() < 5 && !self.error_samples.contains(&e) {
            self.error_samples.push(e);
        }
    }
}

/// The measured NodePort Service, as two single-port Services (TCP and UDP) whose endpoints are
/// the pods of node2 (b1, b2), port [`TARGET_PORT`].
pub fn measured_services(lab: &Lab) -> Vec<BenchService> {
    let endpoints: Vec<(Ipv4Addr, String)> = lab
        .pods_of("node2")
        .iter()
        .map(|p| (p.addr, p.node.clone()))
        .collect();
    [
        ("echo-tcp", "TCP", NODE_PORT_TCP, 100),
        ("echo-udp", "UDP", NODE_PORT_UDP, 101),
    ]
    .into_iter()
    .map(|(name, protocol, node_port, host)| BenchService {
        namespace: "bench".into(),
        name: name.into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, host),
        port: 80,
        protocol,
        node_port: Some(node_port),
        target_port: TARGET_PORT,
        endpoints: endpoints.clone(),
    })
    .collect()
}

/// The Services of a point with `services` Services: the measured Service and
/// `services - 1` ClusterIP fillers with 10 endpoints each on node2.
pub fn bench_services(lab: &Lab, services: usize) -> Vec<BenchService> {
    let mut v = measured_services(lab);
    v.extend(gen::filler(services.saturating_sub(1), 10, "node2"));
    v
}

/// Manifests for the agent: the Node objects of deploy/examples/lab.yaml and the Services.
pub fn agent_manifests<A: Copy + Into<IpAddr>>(services: &[BenchService<A>]) -> String {
    let example = include_str!("../../../deploy/examples/lab.yaml");
    let nodes: Vec<&str> = example
        .split("\n---\n")
        .filter(|d| d.contains("kind: Node\n"))
        .collect();
    format!("{}\n{}", nodes.join("\n---\n"), gen::to_manifests(services))
}

/// The modes [`lab_bench`] measures, in order: the no-load-balancer reference, ours, and
/// kube-proxy's two rule sets.
pub const MODES: [&str; 4] = ["no-lb", "xdp", "iptables", "nftables"];

/// For each count in `services` and each mode of [`MODES`]: a fresh lab, the Services
/// programmed, `repeats` TCP and UDP runs of `duration` each (see [`LabPoint`]), everything
/// removed again. Points come out in that order. Request errors do not fail the run (they are
/// counted); a mode that cannot be set up, or whose Service answers none of a few first
/// requests, does.
pub fn lab_bench(services: &[usize], duration: Duration, repeats: usize) -> Result<Vec<LabPoint>> {
    let mut points = Vec::new();
    for &n in services {
        for mode in MODES {
            let p = lab_point(mode, n, duration, repeats)
                .with_context(|| format!("lab bench: {mode} with {n} Services"))?;
            points.push(p);
        }
    }
    Ok(points)
}

/// One point of [`lab_bench`].
pub fn lab_point(
    mode: &str,
    services: usize,
    duration: Duration,
    repeats: usize,
) -> Result<LabPoint> {
    if !MODES.contains(&mode) {
        bail!("unknown mode {mode} (one of {MODES:?})");
    }
    let repeats = repeats.max(1);
    let lab = Lab::new()?;
    netns::exec_in(
        &lab.client_netns,
        "sysctl",
        &["-q", "-w", "net.ipv4.tcp_tw_reuse=1"],
    )?;
    let svcs = bench_services(&lab, services);
    let node1 = lab.node("node1").clone();

    let started = Instant::now();
    let mut rule_lines = 0;
    let mut agent = None;
    match mode {
        "no-lb" => {
            // Both directions routed through node1, as the NAT bench's no-LB path is.
            let node2 = lab.node("node2").clone();
            lab.client_route(&node2.pod_cidr, "node1")?;
            netns::ip(
                &node2.netns,
                &[
                    "route",
                    "add",
                    &format!("{}/32", crate::lab::CLIENT_ADDR),
                    "via",
                    &node1.addr.to_string(),
                    "dev",
                    crate::lab::NODE_DEVICE,
                ],
            )?;
        }
        "xdp" => {
            let manifests = lab.tmpdir().join("bench-manifests.yaml");
            fs::write(&manifests, agent_manifests(&svcs))?;
            let mut a =
                lab.spawn_agent("node1", &bin_path("lb-agent")?, &manifests, XDP_AGENT_ARGS)?;
            wait_first_sync(&mut a)?;
            agent = Some(a);
        }
        "iptables" => {
            // kube-proxy sets this for NodePorts on localhost (its default).
            netns::exec_in(
                &node1.netns,
                "sysctl",
                &["-q", "-w", "net.ipv4.conf.all.route_localnet=1"],
            )?;
            rule_lines = kubeproxy::iptables_replace_in(
                &node1.netns,
                &kubeproxy::iptables_full_restore(&svcs),
            )?
            .lines;
        }
        "nftables" => {
            rule_lines =
                kubeproxy::nft_apply_in(&node1.netns, &kubeproxy::nft_full_transaction(&svcs))?
                    .lines;
        }
        other => bail!("mode {other} has no setup"),
    }
    let program_ms = started.elapsed().as_secs_f64() * 1000.0;

    let (tcp_target, udp_target) = if mode == "no-lb" {
        // Straight to the pods: one target per worker, in turn (lab-load).
        let pods: Vec<String> = lab
            .pods_of("node2")
            .iter()
            .map(|p| format!("{}:{TARGET_PORT}", p.addr))
            .collect();
        (pods.join(","), pods.join(","))
    } else {
        (
            format!("{}:{NODE_PORT_TCP}", node1.addr),
            format!("{}:{NODE_PORT_UDP}", node1.addr),
        )
    };
    // The Service (or the pods) must answer before it is measured.
    for (proto, targets) in [("tcp", &tcp_target), ("udp", &udp_target)] {
        for target in targets.split(',') {
            let ex = lab.run_client("client", &[proto, target, "--count", "4"])?;
            if !ex.iter().any(|e| e.ok) {
                bail!("{mode}: no answer from {proto} {target} before the run: {ex:?}");
            }
        }
    }
    let (mut tcp, mut udp) = (LoadReport::default(), LoadReport::default());
    let (mut rps_runs, mut pps_runs) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let t = run_load(&lab, "tcp", &tcp_target, duration)?;
        rps_runs.push(rate(t.ok, t.elapsed_s));
        tcp.elapsed_s += t.elapsed_s;
        tcp.merge(t);
        let u = run_load(&lab, "udp", &udp_target, duration)?;
        pps_runs.push(rate(u.ok, u.elapsed_s));
        udp.elapsed_s += u.elapsed_s;
        udp.merge(u);
    }
    let (rps_spread, pps_spread) = (Spread::of(rps_runs), Spread::of(pps_runs));

    let mut xdp_counters = BTreeMap::new();
    if let Some(mut a) = agent {
        xdp_counters = lbctl_stats(&lab, "node1")
            .unwrap_or_else(|e| BTreeMap::from([(format!("lbctl failed: {e:#}"), 0)]));
        a.stop()?;
        uninstall_agent(&lab, "node1")?;
    } else if mode == "iptables" {
        kubeproxy::iptables_flush_in(&node1.netns)?;
    } else if mode == "nftables" {
        kubeproxy::nft_flush_in(&node1.netns)?;
    }
    drop(lab);

    let mut error_samples = tcp.error_samples.clone();
    for e in &udp.error_samples {
        if error_samples.len() < 5 {
            error_samples.push(e.clone());
        }
    }
    Ok(LabPoint {
        mode: mode.into(),
        services,
        rps: rps_spread.median,
        pps: pps_spread.median,
        repeats,
        rps_spread,
        pps_spread,
        errors: tcp.errors + udp.errors,
        tcp_requests: tcp.sent,
        tcp_errors: tcp.errors,
        tcp_backends: tcp.backends,
        udp_replies: udp.ok,
        udp_sent: udp.sent,
        udp_errors: udp.errors,
        udp_backends: udp.backends,
        tcp_seconds: tcp.elapsed_s,
        udp_seconds: udp.elapsed_s,
        program_ms,
        rule_lines,
        error_samples,
        xdp_counters,
    })
}

fn rate(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

/// Waits for the agent's first sync; fails with its log if it failed or exited.
fn wait_first_sync(a: &mut AgentProcess) -> Result<()> {
    let deadline = Instant::now() + AGENT_SYNC_TIMEOUT;
    loop {
        let log = a.log();
        if log.contains("sync generation 1:") {
            return Ok(());
        }
        if log.contains("sync generation 1 failed") || !a.is_running() {
            bail!("agent on node1 did not sync its first generation:\n{log}");
        }
        if Instant::now() > deadline {
            bail!("agent on node1 did not sync within {AGENT_SYNC_TIMEOUT:?}:\n{log}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `lb-agent uninstall --bpffs <node dir>` in the node's namespace. The lab created the pin
/// directory and removes it (and runs uninstall again) when it is dropped, so the empty
/// directory is put back.
fn uninstall_agent(lab: &Lab, node: &str) -> Result<()> {
    let n = lab.node(node);
    let mut cmd = netns::command_in(&n.netns, None, bin_path("lb-agent")?);
    cmd.arg("uninstall").arg("--bpffs").arg(&n.bpffs);
    netns::run_command(&mut cmd).context("lb-agent uninstall")?;
    fs::create_dir_all(&n.bpffs)?;
    Ok(())
}

/// node1's non-zero datapath counters, by name.
fn lbctl_stats(lab: &Lab, node: &str) -> Result<BTreeMap<String, u64>> {
    let mut cmd = std::process::Command::new(bin_path("lbctl")?);
    cmd.arg("--bpffs")
        .arg(&lab.node(node).bpffs)
        .args(["stats", "-o", "json"]);
    let out = netns::run_command(&mut cmd)?;
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).context("lbctl stats output")?;
    Ok(v.iter()
        .filter_map(|c| Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?)))
        .filter(|(_, n)| *n > 0)
        .collect())
}

/// Runs `lab-load PROTO TARGET` in the client namespace for `duration`.
fn run_load(lab: &Lab, proto: &str, target: &str, duration: Duration) -> Result<LoadReport> {
    let mut args = vec![
        proto.to_string(),
        target.to_string(),
        "--duration-ms".into(),
        duration.as_millis().to_string(),
    ];
    if proto == "tcp" {
        args.extend([
            "--workers".into(),
            TCP_WORKERS.to_string(),
            "--timeout-ms".into(),
            TCP_TIMEOUT.as_millis().to_string(),
        ]);
    } else {
        args.extend([
            "--workers".into(),
            UDP_WORKERS.to_string(),
            "--flows".into(),
            UDP_FLOWS_PER_WORKER.to_string(),
            "--timeout-ms".into(),
            UDP_TIMEOUT.as_millis().to_string(),
        ]);
    }
    let mut cmd = lab.client_command(bin_path("lab-load")?, &args);
    let desc = netns::describe(&cmd);
    let text = netns::run_command(&mut cmd)?;
    serde_json::from_str(text.trim()).with_context(|| format!("bad output of {desc}: {text}"))
}
