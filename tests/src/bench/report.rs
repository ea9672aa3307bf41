//! The benchmark report: bench/results.json (everything measured), bench/results.md (tables,
//! targets met or missed) and bench/chart.svg.
use std::fmt::Write;

use serde::Serialize;

use super::{
    control::{AgentMemory, ControlBench},
    ctgc::CtGcBench,
    kubeproxy::RestoreBench,
    labbench::LabPoint,
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

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

/// The lab point for a mode and Service count.
fn point<'a>(lab: &'a [LabPoint], mode: &str, services: usize) -> Option<&'a LabPoint> {
    lab.iter()
        .find(|p| p.mode == mode && p.services == services)
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
    if let Ok(t) = &r.testrun {
        let est = t.paths.iter().find(|p| p.path == "established");
        if let Some(e) = est {
            let _ = writeln!(
                md,
                "| established flow ≤ 2.5 × floor | {} ns = {:.1} × {} ns | {} |",
                f1(e.ns_per_packet),
                e.ratio_to_floor,
                f1(t.floor_ns),
                met(t.established_ratio_met)
            );
        }
    }
    if let Ok(lab) = &r.lab {
        let max = lab.iter().map(|p| p.services).max().unwrap_or(0);
        if let (Some(x), Some(i)) = (point(lab, "xdp", max), point(lab, "iptables", max)) {
            let ratio = if i.rps > 0.0 {
                x.rps / i.rps
            } else {
                f64::INFINITY
            };
            let _ = writeln!(
                md,
                "| ≥ 2 × iptables requests/s at {} Services | {} vs {} = {:.2} × | {} |",
                thousands(max as f64),
                thousands(x.rps),
                thousands(i.rps),
                ratio,
                met(ratio >= 2.0)
            );
        }
    }
    if let Ok(n) = &r.nat {
        nat_targets(&mut md, n);
    }
    if let Ok(c) = &r.control {
        for ch in &c.changes {
            let _ = writeln!(
                md,
                "| endpoint change < 5 ms, constant writes ({}) | map update {} ms, {} writes; whole agent cycle {} ms | {} |",
                ch.what,
                ch.sync_ms,
                ch.writes,
                ch.cycle_ms,
                if ch.sync_ms < 5.0 && ch.cycle_ms < 5.0 { "met" } else if ch.sync_ms < 5.0 { "map update met, **whole cycle not met**" } else { "**not met**" }
            );
        }
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "## Per packet (BPF_PROG_TEST_RUN)\n");
    match &r.testrun {
        Ok(t) => {
            let _ = writeln!(
                md,
                "{} repeats per run, median of {} runs; the frame-restore wrapper's own cost ({} ns, {} ns with a fresh source address) is subtracted.\n",
                thousands(t.repeats as f64),
                t.runs,
                f1(t.restore_ns),
                f1(t.restore_new_source_ns)
            );
            let _ = writeln!(
                md,
                "| Path | ns/packet | × floor | verdict | what |\n|---|---:|---:|---|---|"
            );
            for p in &t.paths {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} | {} | {} |",
                    p.path,
                    f1(p.ns_per_packet),
                    p.ratio_to_floor,
                    p.verdict,
                    p.what
                );
            }
        }
        Err(e) => {
            let _ = writeln!(md, "Not measured: {e}");
        }
    }
    let _ = writeln!(
        md,
        "\n## Through the lab: NodePort, XDP against kube-proxy's rules\n"
    );
    match &r.lab {
        Ok(lab) => {
            let _ = writeln!(md, "| Services | mode | requests/s (new TCP connection each) | UDP packets/s | errors |\n|---:|---|---:|---:|---:|");
            for p in lab {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    thousands(p.services as f64),
                    p.mode,
                    thousands(p.rps),
                    thousands(p.pps),
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
            "| map | entries | capacity | kernel bytes |\n|---|---:|---:|---:|"
        );
        for mm in &c.maps {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                mm.map,
                thousands(mm.entries as f64),
                thousands(mm.capacity as f64),
                thousands(mm.kernel_bytes as f64)
            );
        }
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
fn nat_targets(md: &mut String, n: &NatBench) {
    match &n.tcp {
        Ok(t) => {
            let _ = writeln!(
                md,
                "| new TCP connections for {:.0} s ≥ 0.9 × the no-LB path, errors ≤ 0.1 % | {} vs {} requests/s = {:.2} ×; {} errors of {} ({:.3} %) | {} |",
                t.seconds,
                thousands(t.nodeport_rps),
                thousands(t.direct_rps),
                t.ratio,
                t.nodeport_errors,
                thousands(t.nodeport_requests as f64),
                t.error_rate * 100.0,
                met(t.ratio >= 0.9 && t.error_rate <= 0.001 && t.seconds >= 29.0)
            );
        }
        Err(e) => {
            let _ = writeln!(
                md,
                "| new TCP connections ≥ 0.9 × the no-LB path | not measured: {e} | **not met** |"
            );
        }
    }
    match &n.tcp_plain {
        Ok(t) => {
            let _ = writeln!(
                md,
                "| plain-veth lab (tc ingress): new TCP connections for {:.0} s ≥ 0.8 × the no-LB path | {} vs {} requests/s = {:.2} ×; {} errors of {} ({:.3} %) | {} |",
                t.seconds,
                thousands(t.nodeport_rps),
                thousands(t.direct_rps),
                t.ratio,
                t.nodeport_errors,
                thousands(t.nodeport_requests as f64),
                t.error_rate * 100.0,
                met(t.ratio >= PLAIN_TCP_TARGET)
            );
        }
        Err(e) => {
            let _ = writeln!(
                md,
                "| plain-veth lab (tc ingress): new TCP connections ≥ 0.8 × the no-LB path | not measured: {e} | **not met** |"
            );
        }
    }
    match &n.udp_flows {
        Ok(u) => {
            let _ = writeln!(
                md,
                "| 20,000 UDP flows from distinct client ports to one backend all answered | {} of {} answered | {} |",
                thousands(u.answered as f64),
                thousands(u.flows as f64),
                met(u.flows >= 20_000 && u.answered == u.flows as u64)
            );
        }
        Err(e) => {
            let _ = writeln!(
                md,
                "| 20,000 UDP flows all answered | not measured: {e} | **not met** |"
            );
        }
    }
    match &n.udp_failover {
        Ok(f) => {
            let _ = writeln!(
                md,
                "| a UDP flow moves off a removed backend within 3 s | {} | {} |",
                f.moved_after_ms.map_or_else(
                    || format!("still on {} after 10 s", f.removed),
                    |ms| format!(
                        "{} ms ({} -> {})",
                        ms,
                        f.removed,
                        f.moved_to.as_deref().unwrap_or("?")
                    )
                ),
                met(f.moved_after_ms.is_some_and(|ms| ms <= 3_000))
            );
        }
        Err(e) => {
            let _ = writeln!(md, "| a UDP flow moves off a removed backend within 3 s | not measured: {e} | **not met** |");
        }
    }
    match &n.syn_flood {
        Ok(s) => {
            let _ = writeln!(
                md,
                "| 100,000 spoofed SYNs leave every established flow working | {} SYNs (+ as many bare ACKs): {} of {} connections work, {} still tracked | {} |",
                thousands(s.syns as f64),
                s.survivors,
                s.connections,
                s.still_tracked,
                met(s.syns >= 100_000 && s.survivors == s.connections && s.still_tracked == s.connections)
            );
        }
        Err(e) => {
            let _ = writeln!(md, "| 100,000 spoofed SYNs leave every established flow working | not measured: {e} | **not met** |");
        }
    }
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

/// A horizontal bar chart per section, as SVG.
pub fn svg(r: &Results) -> String {
    // (section title, [(bar label, value, unit)])
    type Section = (String, Vec<(String, f64, &'static str)>);
    let mut rows: Vec<Section> = Vec::new();
    if let Ok(t) = &r.testrun {
        rows.push((
            "ns per packet (BPF_PROG_TEST_RUN)".into(),
            t.paths
                .iter()
                .map(|p| {
                    (
                        format!("{} ({:.1}×)", p.path, p.ratio_to_floor),
                        p.ns_per_packet,
                        if p.path == "floor" { "#888" } else { "#2a7" },
                    )
                })
                .collect(),
        ));
    }
    if let Ok(lab) = &r.lab {
        let mut counts: Vec<usize> = lab.iter().map(|p| p.services).collect();
        counts.sort();
        counts.dedup();
        for n in counts {
            let bars = ["xdp", "iptables", "nftables"]
                .iter()
                .filter_map(|m| {
                    point(lab, m, n).map(|p| {
                        (
                            m.to_string(),
                            p.rps,
                            if *m == "xdp" {
                                "#2a7"
                            } else if *m == "iptables" {
                                "#c54"
                            } else {
                                "#d93"
                            },
                        )
                    })
                })
                .collect();
            rows.push((
                format!("NodePort requests/s, {} Services", thousands(n as f64)),
                bars,
            ));
        }
    }
    if let (Ok(c), Ok(k)) = (&r.control, &r.kube_proxy_restore) {
        let ours = c.changes.first().map_or(0.0, |ch| ch.sync_ms);
        let cycle = c.changes.first().map_or(0.0, |ch| ch.cycle_ms);
        rows.push((
            format!(
                "one endpoint change, ms ({} Services)",
                thousands(c.services as f64)
            ),
            vec![
                ("map update (ours)".into(), ours, "#2a7"),
                ("agent cycle (ours)".into(), cycle, "#6b9"),
                ("iptables-restore".into(), k.iptables_partial_ms, "#c54"),
                ("nft -f".into(), k.nft_partial_ms, "#d93"),
            ],
        ));
    }
    let (w, label_w, bar_w, row_h) = (900.0, 260.0, 520.0, 22.0);
    let height: f64 = rows
        .iter()
        .map(|(_, b)| 34.0 + b.len() as f64 * row_h)
        .sum::<f64>()
        + 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let mut y = 10.0;
    for (title, bars) in &rows {
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}" font-weight="bold">{}</text>"#,
            y + 16.0,
            esc(title)
        );
        y += 28.0;
        let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9);
        for (label, v, color) in bars {
            let len = (v / max * bar_w).max(1.0);
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                label_w - 8.0,
                y + 14.0,
                esc(label)
            );
            let _ = writeln!(
                s,
                r#"<rect x="{label_w}" y="{y}" width="{len:.1}" height="{}" fill="{color}"/>"#,
                row_h - 6.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}">{}</text>"#,
                label_w + len + 6.0,
                y + 14.0,
                if *v >= 100.0 {
                    thousands(*v)
                } else {
                    format!("{v:.1}")
                }
            );
            y += row_h;
        }
        y += 6.0;
    }
    s.push_str("</svg>\n");
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
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
            md.contains("plain-veth lab (tc ingress): new TCP connections for 1 s ≥ 0.8 × the no-LB path | 3,000 vs 5,000 requests/s = 0.60 ×")
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
