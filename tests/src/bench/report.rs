//! The benchmark report: bench/results.json (everything measured, and the targets), bench/results.md
//! (the targets table first: each target of the issue with its measured value and met, not met
//! or not measured; then every table) and bench/chart.svg (requests/s and UDP against Services
//! with each mode's spread, per-packet costs against the floor, the control plane on a log
//! scale, each with its targets drawn).
use std::{collections::BTreeMap, fmt::Write, path::Path};

use serde::Serialize;

use super::{
    control::{AgentMemory, ControlBench},
    ctgc::CtGcBench,
    kubeproxy::RestoreBench,
    labbench::{LabPoint, Spread},
    nat::NatBench,
    testrun::TestRunBench,
};

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub date: String,
}

impl Machine {
    pub fn read() -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let date = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        Self {
            kernel,
            cpu,
            cpus,
            memory_gib: (kib / 1048576.0 * 10.0).round() / 10.0,
            date,
        }
    }
}

/// Every part; a part that could not run carries its error instead.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub machine: Machine,
    pub quick: bool,
    pub testrun: Result<TestRunBench, String>,
    pub lab: Result<Vec<LabPoint>, String>,
    /// The north-south NAT targets of issue 12 (agent with default flags).
    pub nat: Result<NatBench, String>,
    pub control: Result<ControlBench, String>,
    pub kube_proxy_restore: Result<RestoreBench, String>,
    pub agent_memory: Result<AgentMemory, String>,
    pub ct_gc: Result<CtGcBench, String>,
}

fn f1(x: f64) -> String {
    format!("{x:.1}")
}

fn thousands(x: f64) -> String {
    let s = format!("{:.0}", x);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// The lab point for a mode and Service count.
fn point<'a>(lab: &'a [LabPoint], mode: &str, services: usize) -> Option<&'a LabPoint> {
    lab.iter()
        .find(|p| p.mode == mode && p.services == services)
}

/// Issue 16's per-packet targets: (path, at most this many times the floor).
pub const PATH_TARGETS: [(&str, f64); 4] = [
    ("established", super::testrun::ESTABLISHED_RATIO_TARGET),
    ("reply", 5.0),
    ("unknown_frontend", 3.0),
    ("new_flow", 15.0),
];

/// Katran's figures for the same paths, measured elsewhere (its tester, the same
/// BPF_PROG_TEST_RUN method, on this machine type): (path, ns per packet, how it compares with
/// its floor). Shown beside ours for scale; never measured by this bench.
pub const KATRAN: [(&str, f64, &str); 3] = [
    ("established", 160.0, "5.7–6.2 × its floor"),
    ("unknown_frontend", 83.0, "3.2 × its floor (no VIP)"),
    ("new_flow", 388.0, "about 15 × its floor (LRU insert)"),
];

/// The Service count at which the lab targets hold.
pub const LAB_TARGET_SERVICES: usize = 10_000;
/// Our NodePort new TCP connections/s at least this share of the no-LB path's...
pub const NO_LB_RATIO_TARGET: f64 = 0.95;
/// ... and at least this many times iptables'.
pub const IPTABLES_RATIO_TARGET: f64 = 2.0;
/// One endpoint change, the whole agent cycle (model, plan, map update), under this many ms at
/// each of these Service counts.
pub const CYCLE_TARGET_MS: f64 = 5.0;
pub const CYCLE_TARGET_SERVICES: [usize; 2] = [10_000, 100_000];
/// Programming (Services, endpoints each) from empty maps in under this many seconds.
pub const FROM_SCRATCH_TARGET: (usize, usize, f64) = (100_000, 10, 10.0);
/// The agent's resident memory with (Services, endpoints each) at most this many MiB.
pub const AGENT_RSS_TARGET: (usize, usize, f64) = (10_000, 10, 100.0);

/// Every row of the targets table, by id, in the order the table lists them. Each appears
/// whether or not this run measured it.
pub const TARGET_IDS: [&str; 16] = [
    "per_packet_established",
    "per_packet_reply",
    "per_packet_unknown_frontend",
    "per_packet_new_flow",
    "per_packet_established_ipv6",
    "nodeport_tcp_vs_no_lb",
    "nodeport_tcp_vs_iptables",
    "endpoint_change_cycle_10000",
    "endpoint_change_cycle_100000",
    "program_from_scratch_100000x10",
    "agent_memory_10000x10",
    "nat_tcp_vs_no_lb",
    "nat_tcp_plain_vs_no_lb",
    "nat_udp_flows",
    "nat_udp_failover",
    "nat_syn_flood",
];

/// One row of the targets table.
#[derive(Debug, Clone, Serialize)]
pub struct TargetRow {
    /// One of [`TARGET_IDS`].
    pub id: &'static str,
    pub target: String,
    pub measured: String,
    /// `None`: not measured in this run.
    pub met: Option<bool>,
}

impl TargetRow {
    fn new(id: &'static str, target: impl Into<String>) -> Self {
        Self {
            id,
            target: target.into(),
            measured: "not measured".into(),
            met: None,
        }
    }

    fn measured(mut self, measured: impl Into<String>, met: bool) -> Self {
        self.measured = measured.into();
        self.met = Some(met);
        self
    }

    fn not_measured(mut self, why: impl std::fmt::Display) -> Self {
        self.measured = format!("not measured: {why}");
        self.met = None;
        self
    }

    fn status(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "not measured",
        }
    }
}

/// The control-plane figures the targets read, by Service count. A figure no run measured is
/// absent, and its target shows as not measured. This is the one place that knows where they
/// come from in [`ControlBench`].
#[derive(Debug, Default)]
struct ControlFigures {
    /// The slowest whole agent cycle (model + plan + map update) of the endpoint changes, ms.
    cycle_ms: BTreeMap<usize, f64>,
    /// The slowest map update alone of the same changes, ms.
    sync_ms: BTreeMap<usize, f64>,
    /// Programming from empty maps, ms, by (Services, endpoints per Service).
    from_scratch_ms: BTreeMap<(usize, usize), f64>,
}

fn control_figures(r: &Results) -> ControlFigures {
    let mut f = ControlFigures::default();
    if let Ok(c) = &r.control {
        f.add(
            c.services,
            c.endpoints_per_service,
            c.program_from_scratch_ms,
            &c.changes,
        );
        // The larger clusters measured the same way (100,000 Services in a full run).
        for p in &c.at_scale {
            f.add(
                p.services,
                p.endpoints_per_service,
                p.program_from_scratch_ms,
                &p.changes,
            );
        }
    }
    f
}

impl ControlFigures {
    /// One cluster size's figures: the slowest change's cycle and map update, and programming
    /// from scratch.
    fn add(
        &mut self,
        services: usize,
        endpoints: usize,
        from_scratch_ms: f64,
        changes: &[super::control::Change],
    ) {
        let worst = |v: fn(&super::control::Change) -> f64| {
            changes
                .iter()
                .map(v)
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
        };
        if let Some(ms) = worst(|ch| ch.cycle_ms) {
            self.cycle_ms.insert(services, ms);
        }
        if let Some(ms) = worst(|ch| ch.sync_ms) {
            self.sync_ms.insert(services, ms);
        }
        self.from_scratch_ms
            .insert((services, endpoints), from_scratch_ms);
    }
}

/// The ratio `a / b` (infinite when `b` is 0).
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::INFINITY
    }
}

/// `median (min–max)` of a spread.
fn spread_text(s: &Spread) -> String {
    format!(
        "{} ({}–{})",
        thousands(s.median),
        thousands(s.min),
        thousands(s.max)
    )
}

/// Every target of the issue with what this run measured (see [`TARGET_IDS`]).
pub fn targets(r: &Results) -> Vec<TargetRow> {
    let mut rows = Vec::new();
    for (path, target) in PATH_TARGETS {
        let id = match path {
            "established" => "per_packet_established",
            "reply" => "per_packet_reply",
            "unknown_frontend" => "per_packet_unknown_frontend",
            _ => "per_packet_new_flow",
        };
        let row = TargetRow::new(id, format!("{path} ≤ {target} × floor (per packet)"));
        rows.push(match &r.testrun {
            Ok(t) => match t.paths.iter().find(|p| p.path == path) {
                Some(p) => row.measured(
                    format!(
                        "{} ns = {:.1} × the {} ns floor",
                        f1(p.ns_per_packet),
                        p.ratio_to_floor,
                        f1(t.floor_ns)
                    ),
                    p.ratio_to_floor <= target,
                ),
                None => row.not_measured("the path is missing from the run"),
            },
            Err(e) => row.not_measured(e),
        });
    }
    // IPv6: relative to the IPv4 established packet of the same run.
    let want = super::testrun::IPV6_ESTABLISHED_RATIO_TARGET;
    let row = TargetRow::new(
        "per_packet_established_ipv6",
        format!("established_ipv6 ≤ {want} × established (IPv4, same run; per packet)"),
    );
    rows.push(match &r.testrun {
        Ok(t) => {
            let ns = |name: &str| {
                t.paths
                    .iter()
                    .find(|p| p.path == name)
                    .map(|p| p.ns_per_packet)
            };
            match (ns("established_ipv6"), ns("established")) {
                (Some(v6), Some(v4)) => row.measured(
                    format!(
                        "{} ns = {:.2} × the IPv4 {} ns",
                        f1(v6),
                        ratio(v6, v4),
                        f1(v4)
                    ),
                    ratio(v6, v4) <= want,
                ),
                _ => row.not_measured("the path is missing from the run"),
            }
        }
        Err(e) => row.not_measured(e),
    });
    let n = LAB_TARGET_SERVICES;
    for (id, reference, want) in [
        ("nodeport_tcp_vs_no_lb", "no-lb", NO_LB_RATIO_TARGET),
        (
            "nodeport_tcp_vs_iptables",
            "iptables",
            IPTABLES_RATIO_TARGET,
        ),
    ] {
        let name = if reference == "no-lb" {
            "the no-LB path"
        } else {
            "iptables"
        };
        let row = TargetRow::new(
            id,
            format!(
                "NodePort new TCP connections/s at {} Services ≥ {want} × {name}",
                thousands(n as f64)
            ),
        );
        rows.push(match &r.lab {
            Ok(lab) => match (point(lab, "xdp", n), point(lab, reference, n)) {
                (Some(x), Some(o)) => {
                    let q = ratio(x.rps, o.rps);
                    row.measured(
                        format!(
                            "{} vs {} = {q:.2} × (medians of {} runs, min–max)",
                            spread_text(&x.rps_spread),
                            spread_text(&o.rps_spread),
                            x.repeats
                        ),
                        q >= want,
                    )
                }
                _ => {
                    let largest = lab.iter().map(|p| p.services).max().unwrap_or(0);
                    let hint = match (point(lab, "xdp", largest), point(lab, reference, largest)) {
                        (Some(x), Some(o)) => format!(
                            " (at {} Services: {:.2} ×)",
                            thousands(largest as f64),
                            ratio(x.rps, o.rps)
                        ),
                        _ => String::new(),
                    };
                    row.not_measured(format!(
                        "no xdp and {reference} points at {} Services in this run{hint}",
                        thousands(n as f64)
                    ))
                }
            },
            Err(e) => row.not_measured(e),
        });
    }
    let cf = control_figures(r);
    for (id, n) in [
        ("endpoint_change_cycle_10000", CYCLE_TARGET_SERVICES[0]),
        ("endpoint_change_cycle_100000", CYCLE_TARGET_SERVICES[1]),
    ] {
        let row = TargetRow::new(
            id,
            format!(
                "one endpoint change, whole agent cycle < {CYCLE_TARGET_MS} ms at {} Services",
                thousands(n as f64)
            ),
        );
        rows.push(match cf.cycle_ms.get(&n) {
            Some(ms) => row.measured(
                format!(
                    "{ms} ms, the slowest of the changes measured (map update alone {} ms)",
                    cf.sync_ms.get(&n).map_or("?".into(), |s| s.to_string())
                ),
                *ms < CYCLE_TARGET_MS,
            ),
            None => row.not_measured(match &r.control {
                Ok(c) => format!(
                    "this run measured {} Services",
                    thousands(c.services as f64)
                ),
                Err(e) => e.clone(),
            }),
        });
    }
    let (n, e, secs) = FROM_SCRATCH_TARGET;
    let row = TargetRow::new(
        "program_from_scratch_100000x10",
        format!(
            "{} Services × {e} endpoints programmed from scratch < {secs} s",
            thousands(n as f64)
        ),
    );
    rows.push(match cf.from_scratch_ms.get(&(n, e)) {
        Some(ms) => row.measured(format!("{} s", f1(ms / 1000.0)), ms / 1000.0 < secs),
        None => row.not_measured(match &r.control {
            Ok(c) => format!(
                "this run measured {} Services × {}",
                thousands(c.services as f64),
                c.endpoints_per_service
            ),
            Err(e) => e.clone(),
        }),
    });
    let (n, e, mib) = AGENT_RSS_TARGET;
    let row = TargetRow::new(
        "agent_memory_10000x10",
        format!(
            "agent resident memory ≤ {mib} MiB at {} Services × {e} endpoints",
            thousands(n as f64)
        ),
    );
    rows.push(match &r.agent_memory {
        Ok(a) if a.services == n && a.endpoints_per_service == e => {
            let got = a.rss_kib as f64 / 1024.0;
            row.measured(
                format!(
                    "{} MiB (peak {} MiB)",
                    f1(got),
                    f1(a.peak_rss_kib as f64 / 1024.0)
                ),
                got <= mib,
            )
        }
        Ok(a) => row.not_measured(format!(
            "this run measured {} Services × {}: {} MiB",
            thousands(a.services as f64),
            a.endpoints_per_service,
            f1(a.rss_kib as f64 / 1024.0)
        )),
        Err(e) => row.not_measured(e),
    });
    nat_target_rows(&mut rows, &r.nat);
    rows
}

pub fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "# Benchmark results\n");
    let _ = writeln!(
        md,
        "Machine: {} ({} CPUs), {} GiB, kernel {}; {}{}.\n",
        m.cpu,
        m.cpus,
        m.memory_gib,
        m.kernel,
        m.date,
        if r.quick {
            "; **quick run** (fewer repeats and Services: a smoke run, not the figures to quote)"
        } else {
            ""
        }
    );
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| Target | Measured | |\n|---|---|---|");
    for t in targets(r) {
        let _ = writeln!(md, "| {} | {} | {} |", t.target, t.measured, t.status());
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "## Per packet (BPF_PROG_TEST_RUN)\n");
    match &r.testrun {
        Ok(t) => {
            let _ = writeln!(
                md,
                "{} repeats per run ({} for new flows, each call from an empty conntrack: no flow expires inside a test run, so more would time a node whose SNAT ports are nearly all held), median of {} runs; the frame-restore wrapper's own cost ({} ns, {} ns with a fresh source address and port) is subtracted.\n",
                thousands(t.repeats as f64),
                thousands(t.new_flow_repeats as f64),
                t.runs,
                f1(t.restore_ns),
                f1(t.restore_new_source_ns)
            );
            let _ = writeln!(
                md,
                "| Path | ns/packet | runs min–max | × floor | target | Katran (measured elsewhere) | verdict | what |\n|---|---:|---:|---:|---|---|---|---|"
            );
            for p in &t.paths {
                let lo = p.runs_ns.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = p.runs_ns.iter().copied().fold(0.0, f64::max);
                let target = PATH_TARGETS
                    .iter()
                    .find(|(path, _)| *path == p.path)
                    .map_or(String::new(), |(_, x)| {
                        format!(
                            "≤ {x} ×: {}",
                            if p.ratio_to_floor <= *x {
                                "met"
                            } else {
                                "**not met**"
                            }
                        )
                    });
                let katran = KATRAN
                    .iter()
                    .find(|(path, _, _)| *path == p.path)
                    .map_or(String::new(), |(_, ns, how)| {
                        format!("{} ns, {how}", f1(*ns))
                    });
                let _ = writeln!(
                    md,
                    "| {} | {} | {}–{} | {:.1} | {} | {} | {} | {} |",
                    p.path,
                    f1(p.ns_per_packet),
                    f1(lo),
                    f1(hi),
                    p.ratio_to_floor,
                    target,
                    katran,
                    p.verdict,
                    p.what
                );
            }
            let _ = writeln!(
                md,
                "\nKatran's figures were measured elsewhere (its own tester, the same BPF_PROG_TEST_RUN method, on this machine type), not by this run: they are there for scale."
            );
        }
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}");
        }
    }
    let _ = writeln!(
        md,
        "\n## Through the lab: NodePort without a load balancer, through XDP and through kube-proxy's rules\n"
    );
    match &r.lab {
        Ok(lab) => {
            let _ = writeln!(
                md,
                "`no-lb`: the client straight to the pods through node1's stack, nothing translated; `xdp`: our agent with its default flags; `iptables`, `nftables`: kube-proxy's rules. Each figure is the median of the point's runs, with the slowest and fastest run and the standard deviation.\n"
            );
            let _ = writeln!(md, "| Services | mode | requests/s (new TCP connection each): median (min–max) ± sd | × no-LB | UDP replies/s: median (min–max) ± sd | runs | errors |\n|---:|---|---:|---:|---:|---:|---:|");
            for p in lab {
                let vs = point(lab, "no-lb", p.services)
                    .map_or(String::new(), |o| format!("{:.2}", ratio(p.rps, o.rps)));
                let _ = writeln!(
                    md,
                    "| {} | {} | {} ± {} | {} | {} ± {} | {} | {} |",
                    thousands(p.services as f64),
                    p.mode,
                    spread_text(&p.rps_spread),
                    thousands(p.rps_spread.stddev),
                    vs,
                    spread_text(&p.pps_spread),
                    thousands(p.pps_spread.stddev),
                    p.repeats,
                    p.errors
                );
            }
        }
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}");
        }
    }
    let _ = writeln!(
        md,
        "\n## North-south NAT: NodePort, externalTrafficPolicy Cluster, agent with default flags\n"
    );
    match &r.nat {
        Ok(n) => nat_section(&mut md, n),
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}");
        }
    }
    let _ = writeln!(md, "\n## Control plane\n");
    match &r.control {
        Ok(c) => {
            let _ = writeln!(
                md,
                "{} Services × {} endpoints into real maps: parse {} ms, program from scratch {} ms ({} map writes).\n",
                thousands(c.services as f64),
                c.endpoints_per_service,
                c.parse_ms,
                c.program_from_scratch_ms,
                thousands(c.program_from_scratch_writes as f64)
            );
            let _ = writeln!(md, "| Change | map update ms | writes | whole cycle ms (model + plan + update) |\n|---|---:|---:|---:|");
            for ch in &c.changes {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    ch.what, ch.sync_ms, ch.writes, ch.cycle_ms
                );
            }
            for p in &c.at_scale {
                let _ = writeln!(
                    md,
                    "\n{} Services × {} endpoints (maps sized by the size flags): parse {} ms, program from scratch {} ms ({} map writes; target {} s).\n",
                    thousands(p.services as f64),
                    p.endpoints_per_service,
                    p.parse_ms,
                    p.program_from_scratch_ms,
                    thousands(p.program_from_scratch_writes as f64),
                    c.program_from_scratch_target_s
                );
                let _ = writeln!(md, "| Change | map update ms | writes | whole cycle ms (model + plan + update) |\n|---|---:|---:|---:|");
                for ch in &p.changes {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} |",
                        ch.what, ch.sync_ms, ch.writes, ch.cycle_ms
                    );
                }
            }
        }
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}");
        }
    }
    match &r.kube_proxy_restore {
        Ok(k) => {
            let _ = writeln!(
                md,
                "\nkube-proxy's rules for the same Services ({}; {}):\n",
                k.iptables_version, k.nft_version
            );
            let _ = writeln!(
                md,
                "| | full ms | lines | one change ms | lines |\n|---|---:|---:|---:|---:|"
            );
            let _ = writeln!(
                md,
                "| iptables-restore | {} | {} | {} | {} |",
                f1(k.iptables_full_ms),
                thousands(k.iptables_full_lines as f64),
                f1(k.iptables_partial_ms),
                thousands(k.iptables_partial_lines as f64)
            );
            let _ = writeln!(
                md,
                "| nft -f | {} | {} | {} | {} |",
                f1(k.nft_full_ms),
                thousands(k.nft_full_lines as f64),
                f1(k.nft_partial_ms),
                thousands(k.nft_partial_lines as f64)
            );
            if let Some(ms) = k.iptables_full_noflush_ms {
                let _ = writeln!(
                    md,
                    "\nkube-proxy's own full load (`iptables-restore --noflush`): {} ms.",
                    f1(ms)
                );
            } else {
                let _ = writeln!(
                    md,
                    "\nkube-proxy's own full load (`iptables-restore --noflush`) did not finish within {} s ({} bytes of the ruleset read); the table shows the plain `iptables-restore`.",
                    f1(k.iptables_full_noflush_limit_ms / 1000.0),
                    thousands(k.iptables_full_noflush_read_bytes_at_limit.unwrap_or(0) as f64)
                );
            }
            let _ = writeln!(md, "\nThe change: {}", k.change);
        }
        Err(e) => {
            let _ = writeln!(md, "\nkube-proxy rules not measured: {e}");
        }
    }
    let _ = writeln!(md, "\n## Conntrack sweep\n");
    match &r.ct_gc {
        Ok(g) => {
            let _ = writeln!(
                md,
                "Both tiers full ({} entries): a sweep with nothing expired took {} ms, {} entries/s read with BPF_MAP_LOOKUP_BATCH (aya's per-key iteration: {} ms, {} entries/s). A sweep finding half of the flows expired removed {} entries in {} ms ({} entries/s).",
                thousands(g.entries as f64),
                f1(g.sweep_idle_s * 1000.0),
                thousands(g.sweep_entries_per_s),
                f1(g.aya_iter_s * 1000.0),
                thousands(g.aya_iter_entries_per_s),
                thousands(g.removed as f64),
                f1(g.sweep_half_expired_s * 1000.0),
                thousands(g.removed_per_s)
            );
        }
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}");
        }
    }
    let _ = writeln!(md, "\n## Memory\n");
    if let Ok(c) = &r.control {
        let _ = writeln!(
            md,
            "Per ClusterIP Service port: {} bytes; per backend: {} bytes; a NodePort/LoadBalancer Service's Maglev table adds {} bytes (M = {} for {} backends). All maps together: {} MiB, most of it preallocated whatever the cluster's size.\n",
            thousands(c.bytes_per_service),
            thousands(c.bytes_per_backend),
            thousands(c.bytes_per_maglev_table),
            thousands(lb_userspace::dataplane::maglev::table_size(c.endpoints_per_service) as f64),
            c.endpoints_per_service,
            f1(c.maps_total_bytes as f64 / 1048576.0)
        );
        let _ = writeln!(
            md,
            "| map | entries | capacity | kernel bytes | kernel bytes per entry of capacity |\n|---|---:|---:|---:|---:|"
        );
        for mm in &c.maps {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                mm.map,
                thousands(mm.entries as f64),
                thousands(mm.capacity as f64),
                thousands(mm.kernel_bytes as f64),
                f1(mm.kernel_bytes as f64 / mm.capacity.max(1) as f64)
            );
        }
        let _ = writeln!(
            md,
            "\nThe maps allocated on use (`{}`, `{}`) cost what they hold, not their capacity; every other map is preallocated. `{}` holds its values once per CPU ({} here).",
            lb_common::map_name::MAGLEV,
            lb_common::map_name::SOURCE_RANGES,
            lb_common::map_name::SERVICE_STATS,
            r.machine.cpus
        );
    }
    match &r.agent_memory {
        Ok(a) => {
            let _ = writeln!(
                md,
                "\nlb-agent with {} Services × {} endpoints: resident {} MiB (peak {} MiB); first sync after {:.1} s ({}).",
                thousands(a.services as f64),
                a.endpoints_per_service,
                f1(a.rss_kib as f64 / 1024.0),
                f1(a.peak_rss_kib as f64 / 1024.0),
                a.first_sync_s,
                a.first_sync_line
            );
        }
        Err(e) => {
            let _ = writeln!(md, "\nAgent memory not measured: {e}");
        }
    }
    md
}

/// Issue 13: NodePort new TCP connections/s on the plain-veth lab against the no-LB path.
pub const PLAIN_TCP_TARGET: f64 = 0.8;

/// The issue-12 rows of the targets table (and issue 13's plain-lab row).
fn nat_target_rows(rows: &mut Vec<TargetRow>, nat: &Result<NatBench, String>) {
    let tcp = TargetRow::new(
        "nat_tcp_vs_no_lb",
        "NAT lab: new TCP connections for 30 s ≥ 0.9 × the no-LB path, errors ≤ 0.1 %",
    );
    let plain = TargetRow::new(
        "nat_tcp_plain_vs_no_lb",
        format!("plain-veth lab (tc ingress): new TCP connections ≥ {PLAIN_TCP_TARGET} × the no-LB path"),
    );
    let flows = TargetRow::new(
        "nat_udp_flows",
        "20,000 UDP flows from distinct client ports to one backend all answered",
    );
    let failover = TargetRow::new(
        "nat_udp_failover",
        "a UDP flow moves off a removed backend within 3 s",
    );
    let flood = TargetRow::new(
        "nat_syn_flood",
        "100,000 spoofed SYNs leave every established flow working",
    );
    let n = match nat {
        Ok(n) => n,
        Err(e) => {
            rows.extend([tcp, plain, flows, failover, flood].map(|r| r.not_measured(e)));
            return;
        }
    };
    let comparison = |row: TargetRow,
                      t: &Result<super::nat::TcpComparison, String>,
                      ok: &dyn Fn(&super::nat::TcpComparison) -> bool| match t
    {
        Ok(t) => row.measured(
            format!(
                "{} vs {} requests/s = {:.2} × for {:.0} s; {} errors of {} ({:.3} %)",
                thousands(t.nodeport_rps),
                thousands(t.direct_rps),
                t.ratio,
                t.seconds,
                t.nodeport_errors,
                thousands(t.nodeport_requests as f64),
                t.error_rate * 100.0
            ),
            ok(t),
        ),
        Err(e) => row.not_measured(e),
    };
    rows.push(comparison(tcp, &n.tcp, &|t| {
        t.ratio >= 0.9 && t.error_rate <= 0.001 && t.seconds >= 29.0
    }));
    rows.push(comparison(plain, &n.tcp_plain, &|t| {
        t.ratio >= PLAIN_TCP_TARGET
    }));
    rows.push(match &n.udp_flows {
        Ok(u) => flows.measured(
            format!(
                "{} of {} answered",
                thousands(u.answered as f64),
                thousands(u.flows as f64)
            ),
            u.flows >= 20_000 && u.answered == u.flows as u64,
        ),
        Err(e) => flows.not_measured(e),
    });
    rows.push(match &n.udp_failover {
        Ok(f) => failover.measured(
            f.moved_after_ms.map_or_else(
                || format!("still on {} after 10 s", f.removed),
                |ms| {
                    format!(
                        "{} ms ({} -> {})",
                        ms,
                        f.removed,
                        f.moved_to.as_deref().unwrap_or("?")
                    )
                },
            ),
            f.moved_after_ms.is_some_and(|ms| ms <= 3_000),
        ),
        Err(e) => failover.not_measured(e),
    });
    rows.push(match &n.syn_flood {
        Ok(s) => flood.measured(
            format!(
                "{} SYNs (+ as many bare ACKs): {} of {} connections work, {} still tracked",
                thousands(s.syns as f64),
                s.survivors,
                s.connections,
                s.still_tracked
            ),
            s.syns >= 100_000 && s.survivors == s.connections && s.still_tracked == s.connections,
        ),
        Err(e) => flood.not_measured(e),
    });
}

/// The section with everything the NAT part measured.
fn nat_section(md: &mut String, n: &NatBench) {
    let _ = writeln!(
        md,
        "One lab; node1 translates (DNAT to b1/b2 on node2, SNAT to its own address). The no-LB path is the client connecting to b1 and b2 directly through node1's stack, measured first in the same lab.\n"
    );
    match &n.tcp {
        Ok(t) => {
            let _ = writeln!(
                md,
                "| new TCP connections ({:.0} s, {} clients) | requests/s | errors |\n|---|---:|---:|",
                t.seconds,
                super::nat::TCP_WORKERS
            );
            let _ = writeln!(
                md,
                "| no load balancer | {} | {} |",
                thousands(t.direct_rps),
                t.direct_errors
            );
            let _ = writeln!(
                md,
                "| NodePort (XDP) | {} | {} of {} |",
                thousands(t.nodeport_rps),
                t.nodeport_errors,
                thousands(t.nodeport_requests as f64)
            );
            if !t.error_samples.is_empty() {
                let _ = writeln!(md, "\nErrors: {}", t.error_samples.join("; "));
            }
        }
        Err(e) => {
            let _ = writeln!(md, "New TCP connections not measured: {e}");
        }
    }
    match &n.tcp_plain {
        Ok(t) => {
            let _ = writeln!(
                md,
                "\nPlain-veth lab (nothing on the fabric side of node1's `eth0`, so the agent translates at tc ingress), a lab of its own, same {:.0} s and {} clients: no load balancer {} requests/s ({} errors), NodePort (tc) {} requests/s ({} errors of {}): **{:.2} ×** the no-LB path (target ≥ {}).",
                t.seconds,
                super::nat::TCP_WORKERS,
                thousands(t.direct_rps),
                t.direct_errors,
                thousands(t.nodeport_rps),
                t.nodeport_errors,
                thousands(t.nodeport_requests as f64),
                t.ratio,
                PLAIN_TCP_TARGET
            );
            if !t.error_samples.is_empty() {
                let _ = writeln!(md, "\nErrors (plain lab): {}", t.error_samples.join("; "));
            }
        }
        Err(e) => {
            let _ = writeln!(
                md,
                "\nPlain-veth lab: new TCP connections not measured: {e}"
            );
        }
    }
    if let Ok(u) = &n.udp_flows {
        let _ = writeln!(
            md,
            "\nUDP flows to one backend: {} of {} answered in {:.1} s ({} datagrams).",
            thousands(u.answered as f64),
            thousands(u.flows as f64),
            u.seconds,
            thousands(u.datagrams as f64)
        );
    }
    if let Ok(s) = &n.syn_flood {
        let _ = writeln!(
            md,
            "\nSpoofed SYN flood: {} SYNs and as many bare ACKs in {:.1} s ({} send errors); node1 translated {} new flows and confirmed {}; afterwards {} of {} held connections answered and {} kept their established entry.",
            thousands(s.syns as f64),
            s.seconds,
            s.send_errors,
            thousands(s.new_flows_seen as f64),
            s.confirmed,
            s.survivors,
            s.connections,
            s.still_tracked
        );
    }
    let _ = writeln!(md, "\nnode1's counters: {}", counter_list(&n.counters));
    if !n.plain_counters.is_empty() {
        let _ = writeln!(
            md,
            "\nnode1's counters in the plain lab: {}",
            counter_list(&n.plain_counters)
        );
    }
}

/// `name 1,234, name 5` for a lab's counters.
fn counter_list<'a>(counters: impl IntoIterator<Item = (&'a String, &'a u64)>) -> String {
    counters
        .into_iter()
        .map(|(k, v)| format!("{k} {}", thousands(*v as f64)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Colours of the lab modes and of the chart's other marks.
fn mode_colour(mode: &str) -> &'static str {
    match mode {
        "no-lb" => "#555",
        "xdp" => "#2a7",
        "iptables" => "#c54",
        "nftables" => "#d93",
        _ => "#36c",
    }
}

const CHART_W: f64 = 1000.0;
/// Left edge and width of every panel's plot area.
const PLOT_X: f64 = 300.0;
const PLOT_W: f64 = 400.0;

/// One series of a line chart: (Service count, spread of the figure) per point.
type Series<'a> = (&'a str, Vec<(usize, &'a Spread)>);

/// A time given in milliseconds, as `0.4 ms`, `12 ms`, `3.1 s` (no trailing zeros).
fn ms_text(ms: f64) -> String {
    let short = |v: String| v.trim_end_matches('0').trim_end_matches('.').to_string();
    if ms >= 1000.0 {
        format!("{} s", short(format!("{:.1}", ms / 1000.0)))
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{} ms", short(format!("{ms:.2}")))
    }
}

fn title(s: &mut String, y: f64, text: &str) {
    let _ = writeln!(
        s,
        r#"<text x="10" y="{:.1}" font-weight="bold" font-size="15">{}</text>"#,
        y,
        esc(text)
    );
}

fn note(s: &mut String, x: f64, y: f64, anchor: &str, colour: &str, text: &str) {
    let _ = writeln!(
        s,
        r#"<text x="{x:.1}" y="{y:.1}" text-anchor="{anchor}" fill="{colour}">{}</text>"#,
        esc(text)
    );
}

/// Figures against Services on a log x axis: each mode's medians joined, its min–max band
/// shaded, an error bar per point; `targets` are (label, value, colour) marks drawn at the
/// largest Service count. Returns the y below the panel.
fn line_panel(
    s: &mut String,
    y0: f64,
    heading: &str,
    unit: &str,
    series: &[Series<'_>],
    targets: &[(String, f64, &'static str)],
) -> f64 {
    title(s, y0 + 18.0, heading);
    let (top, h) = (y0 + 46.0, 220.0);
    let counts: Vec<usize> = {
        let mut c: Vec<usize> = series
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|(n, _)| *n))
            .collect();
        c.sort();
        c.dedup();
        c
    };
    if counts.is_empty() {
        note(
            s,
            PLOT_X,
            top + 20.0,
            "start",
            "#000",
            "not measured in this run",
        );
        return top + 40.0;
    }
    let lg = |n: usize| (n.max(1) as f64).log10();
    let (mut lo, mut hi) = (lg(counts[0]), lg(counts[counts.len() - 1]));
    if hi - lo < 1e-9 {
        lo -= 0.5;
        hi += 0.5;
    }
    let x_of = |n: usize| PLOT_X + 20.0 + (lg(n) - lo) / (hi - lo) * (PLOT_W - 40.0);
    let ymax = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|(_, sp)| sp.max))
        .chain(targets.iter().map(|t| t.1))
        .fold(1.0f64, f64::max)
        * 1.1;
    let y_of = |v: f64| top + h - v / ymax * h;
    // Axes, y grid and labels.
    for i in 0..=4 {
        let v = ymax / 4.0 * i as f64;
        let y = y_of(v);
        let _ = writeln!(
            s,
            r##"<line x1="{PLOT_X}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            PLOT_X + PLOT_W
        );
        note(s, PLOT_X - 6.0, y + 4.0, "end", "#444", &thousands(v));
    }
    note(s, PLOT_X - 6.0, top - 12.0, "end", "#444", unit);
    for &n in &counts {
        let x = x_of(n);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            top,
            top + h
        );
        note(s, x, top + h + 16.0, "middle", "#444", &thousands(n as f64));
    }
    note(
        s,
        PLOT_X + PLOT_W / 2.0,
        top + h + 32.0,
        "middle",
        "#444",
        "Services (log scale)",
    );
    for (mode, pts) in series {
        let colour = mode_colour(mode);
        if pts.is_empty() {
            continue;
        }
        let band: Vec<String> = pts
            .iter()
            .map(|(n, sp)| format!("{:.1},{:.1}", x_of(*n), y_of(sp.max)))
            .chain(
                pts.iter()
                    .rev()
                    .map(|(n, sp)| format!("{:.1},{:.1}", x_of(*n), y_of(sp.min))),
            )
            .collect();
        let _ = writeln!(
            s,
            r#"<polygon points="{}" fill="{colour}" fill-opacity="0.18" stroke="none"/>"#,
            band.join(" ")
        );
        let line: Vec<String> = pts
            .iter()
            .map(|(n, sp)| format!("{:.1},{:.1}", x_of(*n), y_of(sp.median)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            line.join(" ")
        );
        for (n, sp) in pts {
            let x = x_of(*n);
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{colour}"/>"#,
                y_of(sp.min),
                y_of(sp.max)
            );
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                y_of(sp.median)
            );
        }
    }
    // Targets at the largest count.
    let xt = x_of(counts[counts.len() - 1]);
    // Labels top to bottom, each at least a line below the one above (two targets can land
    // on nearly the same value).
    let mut order: Vec<&(String, f64, &'static str)> = targets.iter().collect();
    order.sort_by(|a, b| y_of(a.1).total_cmp(&y_of(b.1)));
    let mut last_label_y = f64::NEG_INFINITY;
    for (label, v, colour) in order {
        let y = y_of(*v);
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="2" stroke-dasharray="5,3"/>"#,
            xt - 30.0,
            xt + 30.0
        );
        let label_y = (y + 4.0).max(last_label_y + 14.0);
        last_label_y = label_y;
        note(s, PLOT_X + PLOT_W + 10.0, label_y, "start", colour, label);
    }
    // Legend, left of the plot.
    for (i, (mode, _)) in series.iter().enumerate() {
        let y = top + 14.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="20" y="{:.1}" width="14" height="10" fill="{}"/>"#,
            y - 9.0,
            mode_colour(mode)
        );
        let label = match *mode {
            "no-lb" => "no load balancer",
            "xdp" => "ours (XDP)",
            "iptables" => "kube-proxy iptables",
            "nftables" => "kube-proxy nftables",
            m => m,
        };
        note(s, 40.0, y, "start", "#000", label);
    }
    note(
        s,
        20.0,
        top + 14.0 + series.len() as f64 * 18.0 + 6.0,
        "start",
        "#666",
        "line: median; band and bars: min–max",
    );
    top + h + 48.0
}

/// Horizontal bars: (label, value, colour, note at the right edge with the value of a dashed
/// target mark, if any). Linear or log scale; `footnote` goes under the bars. Returns the y
/// below the panel.
#[allow(clippy::type_complexity)]
fn bar_panel(
    s: &mut String,
    y0: f64,
    heading: &str,
    bars: &[(String, f64, &'static str, Option<(Option<f64>, String)>)],
    log: bool,
    fmt: &dyn Fn(f64) -> String,
    footnote: Option<&str>,
) -> f64 {
    title(s, y0 + 18.0, heading);
    let mut y = y0 + 30.0;
    if bars.is_empty() {
        note(
            s,
            PLOT_X,
            y + 14.0,
            "start",
            "#000",
            "not measured in this run",
        );
        return y + 30.0;
    }
    let values = bars
        .iter()
        .flat_map(|b| [Some(b.1), b.3.as_ref().and_then(|t| t.0)])
        .flatten()
        .filter(|v| *v > 0.0);
    let (vmin, vmax) = values.fold((f64::INFINITY, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if log {
        let lo = vmin.log10().floor();
        let hi = vmax.log10().ceil().max(lo + 1.0);
        (lo, hi)
    } else {
        (0.0, vmax.max(1e-9) * 1.05)
    };
    let x_of = |v: f64| {
        let f = if log {
            (v.max(10f64.powf(lo)).log10() - lo) / (hi - lo)
        } else {
            v / hi
        };
        PLOT_X + f * PLOT_W
    };
    let row_h = 22.0;
    let plot_top = y;
    let plot_bottom = y + bars.len() as f64 * row_h;
    if log {
        let mut d = lo;
        while d <= hi + 1e-9 {
            let x = x_of(10f64.powf(d));
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{plot_top:.1}" x2="{x:.1}" y2="{plot_bottom:.1}" stroke="#ddd"/>"##
            );
            note(
                s,
                x,
                plot_bottom + 14.0,
                "middle",
                "#444",
                &fmt(10f64.powf(d)),
            );
            d += 1.0;
        }
    }
    for (label, v, colour, target) in bars {
        note(s, PLOT_X - 8.0, y + 14.0, "end", "#000", label);
        let len = (x_of(*v) - PLOT_X).max(1.0);
        let _ = writeln!(
            s,
            r#"<rect x="{PLOT_X}" y="{y:.1}" width="{len:.1}" height="{}" fill="{colour}"/>"#,
            row_h - 6.0
        );
        note(s, PLOT_X + len + 6.0, y + 14.0, "start", "#000", &fmt(*v));
        if let Some((t, tl)) = target {
            if let Some(t) = t {
                let x = x_of(*t);
                let _ = writeln!(
                    s,
                    r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#000" stroke-width="2" stroke-dasharray="3,2"/>"##,
                    y - 2.0,
                    y + row_h - 4.0
                );
            }
            note(s, CHART_W - 10.0, y + 14.0, "end", "#000", tl);
        }
        y += row_h;
    }
    if log {
        y += 20.0;
    }
    if let Some(f) = footnote {
        note(s, 20.0, y + 14.0, "start", "#666", f);
        y += 20.0;
    }
    y + 10.0
}

/// The chart: requests/s against Services, per-packet costs against the floor, the control
/// plane and UDP, each with its targets, as one SVG.
pub fn svg(r: &Results) -> String {
    let mut body = String::new();
    let mut y = 0.0;
    let lab: &[LabPoint] = r.lab.as_deref().unwrap_or(&[]);
    let modes: Vec<&str> = super::labbench::MODES
        .iter()
        .copied()
        .filter(|m| lab.iter().any(|p| p.mode == *m))
        .collect();
    let series = |udp: bool| -> Vec<Series<'_>> {
        modes
            .iter()
            .map(|m| {
                let mut pts: Vec<(usize, &Spread)> = lab
                    .iter()
                    .filter(|p| p.mode == *m)
                    .map(|p| (p.services, if udp { &p.pps_spread } else { &p.rps_spread }))
                    .collect();
                pts.sort_by_key(|p| p.0);
                (*m, pts)
            })
            .collect()
    };
    let largest = lab.iter().map(|p| p.services).max().unwrap_or(0);
    let mut lab_targets = Vec::new();
    if let Some(o) = point(lab, "no-lb", largest) {
        lab_targets.push((
            format!("target ≥ {NO_LB_RATIO_TARGET} × no LB"),
            o.rps * NO_LB_RATIO_TARGET,
            mode_colour("no-lb"),
        ));
    }
    if let Some(i) = point(lab, "iptables", largest) {
        lab_targets.push((
            format!("target ≥ {IPTABLES_RATIO_TARGET} × iptables"),
            i.rps * IPTABLES_RATIO_TARGET,
            mode_colour("iptables"),
        ));
    }
    let at = if largest == LAB_TARGET_SERVICES || largest == 0 {
        format!(
            "targets at {} Services",
            thousands(LAB_TARGET_SERVICES as f64)
        )
    } else {
        format!(
            "targets at {} Services, drawn at {}",
            thousands(LAB_TARGET_SERVICES as f64),
            thousands(largest as f64)
        )
    };
    y = line_panel(
        &mut body,
        y,
        &format!("NodePort: new TCP connections per second ({at})"),
        "requests/s",
        &series(false),
        &lab_targets,
    );

    let mut bars = Vec::new();
    if let Ok(t) = &r.testrun {
        for p in &t.paths {
            let target = PATH_TARGETS
                .iter()
                .find(|(path, _)| *path == p.path)
                .map(|(_, x)| {
                    (
                        Some(x * t.floor_ns),
                        format!("target ≤ {x} × floor (dashed)"),
                    )
                });
            bars.push((
                format!("{} ({:.1} × floor)", p.path, p.ratio_to_floor),
                p.ns_per_packet,
                if p.path == "floor" { "#888" } else { "#2a7" },
                target,
            ));
        }
    }
    for (path, ns, how) in KATRAN {
        bars.push((
            format!("Katran {path} *"),
            ns,
            "#9ab",
            Some((None, how.to_string())),
        ));
    }
    y = bar_panel(
        &mut body,
        y,
        "ns per packet (BPF_PROG_TEST_RUN), against the floor",
        &bars,
        false,
        &|v| format!("{v:.0} ns"),
        Some("* Katran: measured elsewhere (its own tester, the same BPF_PROG_TEST_RUN method, on this machine type), not by this run"),
    );

    let mut bars = Vec::new();
    if r.control.is_ok() {
        // Every cluster size measured (10,000 Services; 100,000 too in a full run), each with
        // its own bars; the from-scratch target sits on the bar of the size it names.
        let cf = control_figures(r);
        let (tn, te, ts) = FROM_SCRATCH_TARGET;
        let sizes: Vec<(usize, usize)> = cf.from_scratch_ms.keys().copied().collect();
        for (n, e) in sizes {
            let at = format!("at {}", thousands(n as f64));
            let change_target = Some((
                Some(CYCLE_TARGET_MS),
                format!("target < {CYCLE_TARGET_MS} ms (dashed)"),
            ));
            if let Some(ms) = cf.sync_ms.get(&n) {
                bars.push((
                    format!("endpoint change {at}: map update"),
                    *ms,
                    "#2a7",
                    change_target.clone(),
                ));
            }
            if let Some(ms) = cf.cycle_ms.get(&n) {
                bars.push((
                    format!("endpoint change {at}: agent cycle"),
                    *ms,
                    "#6b9",
                    change_target,
                ));
            }
            let scratch_target = ((n, e) == (tn, te))
                .then(|| (Some(ts * 1000.0), format!("target < {ts} s (dashed)")));
            bars.push((
                format!("program from scratch {at} (ours)"),
                cf.from_scratch_ms[&(n, e)],
                "#2a7",
                scratch_target,
            ));
        }
    }
    if let Ok(k) = &r.kube_proxy_restore {
        bars.push((
            "iptables-restore: one change".into(),
            k.iptables_partial_ms,
            "#c54",
            None,
        ));
        bars.push((
            "iptables-restore: everything".into(),
            k.iptables_full_ms,
            "#c54",
            None,
        ));
        bars.push(("nft -f: one change".into(), k.nft_partial_ms, "#d93", None));
        bars.push(("nft -f: everything".into(), k.nft_full_ms, "#d93", None));
    }
    let heading = match (&r.control, &r.kube_proxy_restore) {
        (Ok(c), Ok(_)) => format!(
            "Control plane, Services × {} endpoints (log scale; kube-proxy's rules at {} Services)",
            c.endpoints_per_service,
            thousands(c.services as f64)
        ),
        (Ok(c), Err(_)) => format!(
            "Control plane, Services × {} endpoints (log scale)",
            c.endpoints_per_service
        ),
        (Err(_), _) => "Control plane (log scale)".to_string(),
    };
    y = bar_panel(&mut body, y, &heading, &bars, true, &ms_text, None);

    y = line_panel(
        &mut body,
        y,
        "NodePort: UDP replies per second (each a datagram there and back)",
        "replies/s",
        &series(true),
        &[],
    );

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{:.0}" font-family="sans-serif" font-size="12">"#,
        y + 10.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    s.push_str(&body);
    s.push_str("</svg>\n");
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes DIR/results.json (every figure, and the targets table as `targets`),
/// DIR/results.md and DIR/chart.svg.
pub fn write(out: &Path, r: &Results) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json(r)).expect("serializable") + "\n",
    )?;
    std::fs::write(out.join("results.md"), markdown(r))?;
    std::fs::write(out.join("chart.svg"), svg(r))?;
    Ok(())
}

/// results.json: [`Results`] with the targets table added as `targets`.
pub fn json(r: &Results) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("serializable");
    v["targets"] = serde_json::to_value(targets(r)).expect("serializable");
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(-1000.0), "-1,000");
    }

    fn nothing_measured() -> Results {
        Results {
            machine: Machine::read(),
            quick: true,
            testrun: Err("no BPF".into()),
            lab: Err("no lab".into()),
            nat: Err("no lab".into()),
            control: Err("no maps".into()),
            kube_proxy_restore: Err("no iptables".into()),
            agent_memory: Err("no agent".into()),
            ct_gc: Err("no maps".into()),
        }
    }

    /// A lab point whose TCP runs are `rps` and UDP runs ten times those.
    fn lab_point(mode: &str, services: usize, rps: &[f64]) -> LabPoint {
        let rps_spread = Spread::of(rps.to_vec());
        let pps_spread = Spread::of(rps.iter().map(|x| x * 10.0).collect());
        LabPoint {
            mode: mode.into(),
            services,
            rps: rps_spread.median,
            pps: pps_spread.median,
            repeats: rps.len(),
            rps_spread,
            pps_spread,
            errors: 0,
            tcp_requests: 0,
            tcp_errors: 0,
            tcp_backends: Default::default(),
            udp_replies: 0,
            udp_sent: 0,
            udp_errors: 0,
            udp_backends: Default::default(),
            tcp_seconds: 0.0,
            udp_seconds: 0.0,
            program_ms: 0.0,
            rule_lines: 0,
            error_samples: Vec::new(),
            xdp_counters: Default::default(),
        }
    }

    #[test]
    fn spread_holds_median_extremes_and_deviation() {
        let s = Spread::of(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!((s.stddev - 1.25f64.sqrt()).abs() < 1e-12, "{s:?}");
        assert_eq!(s.runs, [4.0, 1.0, 3.0, 2.0], "runs kept in order");
        let one = Spread::of(vec![7.0]);
        assert_eq!(
            (one.median, one.min, one.max, one.stddev),
            (7.0, 7.0, 7.0, 0.0)
        );
    }

    #[test]
    fn every_target_is_listed_even_when_nothing_was_measured() {
        let r = nothing_measured();
        let rows = targets(&r);
        assert_eq!(rows.iter().map(|t| t.id).collect::<Vec<_>>(), TARGET_IDS);
        assert!(rows.iter().all(|t| t.met.is_none()), "{rows:#?}");
        let md = markdown(&r);
        for t in &rows {
            assert!(
                md.contains(&format!("| {} | {} | not measured |", t.target, t.measured)),
                "{} missing:\n{md}",
                t.id
            );
        }
        let json = json(&r);
        assert_eq!(json["targets"].as_array().unwrap().len(), TARGET_IDS.len());
        assert!(json["targets"][0]["met"].is_null());
    }

    #[test]
    fn lab_targets_compare_medians_at_ten_thousand_services() {
        let mut r = nothing_measured();
        let mut lab = Vec::new();
        for n in [1, 1_000, LAB_TARGET_SERVICES] {
            lab.push(lab_point("no-lb", n, &[6_000.0, 6_200.0, 6_400.0]));
            lab.push(lab_point("xdp", n, &[6_100.0, 5_900.0, 6_000.0]));
            lab.push(lab_point("iptables", n, &[3_000.0, 3_500.0, 3_200.0]));
            lab.push(lab_point("nftables", n, &[5_000.0, 5_100.0, 5_200.0]));
        }
        r.lab = Ok(lab);
        let rows = targets(&r);
        let row = |id: &str| rows.iter().find(|t| t.id == id).unwrap();
        // 6,000 / 6,200 = 0.97 of the no-LB path; 6,000 / 3,200 = 1.88 × iptables.
        assert_eq!(row("nodeport_tcp_vs_no_lb").met, Some(true), "{rows:#?}");
        assert!(row("nodeport_tcp_vs_no_lb")
            .measured
            .starts_with("6,000 (5,900–6,100) vs 6,200 (6,000–6,400) = 0.97 ×"));
        assert_eq!(row("nodeport_tcp_vs_iptables").met, Some(false));
        let md = markdown(&r);
        assert!(
            md.contains("| 10,000 | iptables | 3,200 (3,000–3,500) ± 205 | 0.52 | 32,000 (30,000–35,000) ± 2,055 | 3 | 0 |"),
            "{md}"
        );
        let chart = svg(&r);
        let doc = roxmltree::Document::parse(&chart).expect("the chart is XML");
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
        for want in [
            "target ≥ 0.95 × no LB",
            "target ≥ 2 × iptables",
            "Katran established *",
            "Services (log scale)",
        ] {
            assert!(texts.contains(&want), "{want} missing from {texts:?}");
        }
        // A band per mode in each of the two lab panels.
        let bands = doc
            .descendants()
            .filter(|n| n.has_tag_name("polygon"))
            .count();
        assert_eq!(bands, 2 * 4);
    }

    #[test]
    fn the_lab_targets_are_not_measured_below_ten_thousand_services() {
        let mut r = nothing_measured();
        r.lab = Ok(vec![
            lab_point("no-lb", 100, &[10.0]),
            lab_point("xdp", 100, &[9.0]),
            lab_point("iptables", 100, &[3.0]),
        ]);
        let rows = targets(&r);
        let row = rows
            .iter()
            .find(|t| t.id == "nodeport_tcp_vs_iptables")
            .unwrap();
        assert_eq!(row.met, None);
        assert!(
            row.measured.contains("(at 100 Services: 3.00 ×)"),
            "{row:?}"
        );
    }

    #[test]
    fn a_report_without_measurements_says_so() {
        let r = Results {
            machine: Machine::read(),
            quick: true,
            testrun: Err("no BPF".into()),
            lab: Err("no lab".into()),
            nat: Err("no lab".into()),
            control: Err("no maps".into()),
            kube_proxy_restore: Err("no iptables".into()),
            agent_memory: Err("no agent".into()),
            ct_gc: Err("no maps".into()),
        };
        let md = markdown(&r);
        assert!(md.contains("Not measured: no BPF") && md.contains("Not measured: no lab"));
        assert!(svg(&r).starts_with("<svg"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["testrun"]["Err"], "no BPF");
    }

    #[test]
    fn the_plain_lab_comparison_is_reported_beside_the_xdp_one() {
        use super::super::{labbench::LoadReport, nat::TcpComparison};
        let report = |ok: u64, elapsed_s: f64| LoadReport {
            ok,
            sent: ok,
            elapsed_s,
            ..Default::default()
        };
        let xdp = TcpComparison::of(&report(4_800, 1.0), &report(4_400, 1.0));
        let plain = TcpComparison::of(&report(5_000, 1.0), &report(3_000, 1.0));
        let n = NatBench {
            tcp: Ok(xdp),
            udp_flows: Err("not run".into()),
            udp_failover: Err("not run".into()),
            syn_flood: Err("not run".into()),
            counters: Default::default(),
            tcp_plain: Ok(plain),
            plain_counters: [("tc_new_flow".to_string(), 7)].into_iter().collect(),
        };
        let r = Results {
            machine: Machine::read(),
            quick: true,
            testrun: Err("no BPF".into()),
            lab: Err("no lab".into()),
            nat: Ok(n),
            control: Err("no maps".into()),
            kube_proxy_restore: Err("no iptables".into()),
            agent_memory: Err("no agent".into()),
            ct_gc: Err("no maps".into()),
        };
        let md = markdown(&r);
        assert!(
            md.contains("≥ 0.9 × the no-LB path, errors ≤ 0.1 % | 4,400 vs 4,800"),
            "{md}"
        );
        assert!(
            md.contains("plain-veth lab (tc ingress): new TCP connections ≥ 0.8 × the no-LB path | 3,000 vs 5,000 requests/s = 0.60 × for 1 s")
                && md.contains("**0.60 ×** the no-LB path (target ≥ 0.8)")
                && md.contains("in the plain lab: tc_new_flow 7"),
            "{md}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["nat"]["Ok"]["tcp"]["Ok"]["nodeport_rps"], 4400.0);
        assert_eq!(json["nat"]["Ok"]["tcp_plain"]["Ok"]["direct_rps"], 5000.0);
        assert_eq!(json["nat"]["Ok"]["tcp_plain"]["Ok"]["ratio"], 0.6);
    }
}
