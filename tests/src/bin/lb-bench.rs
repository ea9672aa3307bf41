//! `lb-bench [--quick] [--out DIR] [--skip-lab] [--only PART] [--lab-services N,N] [--lab-modes M,M] [--lab-repeats N]`: runs every
//! benchmark of issue 7 and the NAT targets of issue 12 (or one PART: testrun, control, restore,
//! agent, lab; `lab` includes the NAT targets) and writes
//! DIR/results.json, DIR/results.md and DIR/chart.svg (DIR defaults to `bench`). `cargo xtask
//! bench` builds the release binaries and runs it. A part that fails is reported as such; the
//! others still run. Needs root (BPF, network namespaces).
use std::{path::PathBuf, time::Duration};

use lb_tests::bench::{control, kubeproxy, labbench, nat, report, testrun};

fn main() {
    let mut quick = false;
    let mut skip_lab = false;
    let mut out = PathBuf::from("bench");
    let mut only: Option<String> = None;
    let mut lab_override: Option<Vec<usize>> = None;
    let mut lab_modes: Option<Vec<String>> = None;
    let mut lab_repeats = LAB_REPEATS;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--skip-lab" => skip_lab = true,
            "--out" => {
                out = PathBuf::from(
                    args.next()
                        .unwrap_or_else(|| usage("--out needs a directory")),
                )
            }
            "--only" => {
                let p = args.next().unwrap_or_else(|| usage("--only needs a part"));
                if !["testrun", "control", "restore", "agent", "lab", "ctgc"].contains(&p.as_str())
                {
                    usage(&format!(
                        "--only {p}: one of testrun, control, restore, agent, lab, ctgc"
                    ));
                }
                only = Some(p);
            }
            "--lab-modes" => {
                let v = args
                    .next()
                    .unwrap_or_else(|| usage("--lab-modes needs no-lb,xdp,iptables,nftables"));
                lab_modes = Some(v.split(',').map(str::to_string).collect());
            }
            "--lab-repeats" => {
                let v = args
                    .next()
                    .unwrap_or_else(|| usage("--lab-repeats needs a number"));
                lab_repeats =
                    v.parse().ok().filter(|n| *n > 0).unwrap_or_else(|| {
                        usage(&format!("--lab-repeats {v}: not a positive number"))
                    });
            }
            "--lab-services" => {
                let v = args
                    .next()
                    .unwrap_or_else(|| usage("--lab-services needs N,N,..."));
                let parsed: Result<Vec<usize>, _> = v.split(',').map(str::parse).collect();
                lab_override = Some(parsed.unwrap_or_else(|_| {
                    usage(&format!("--lab-services {v}: not a list of numbers"))
                }));
            }
            "-h" | "--help" => {
                println!("usage: lb-bench [--quick] [--out DIR] [--skip-lab] [--only testrun|control|restore|agent|lab|ctgc] [--lab-services N,N] [--lab-modes no-lb,xdp,iptables,nftables] [--lab-repeats N (default {LAB_REPEATS})]");
                return;
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    if let Some(why) = lb_tests::privilege_problem() {
        eprintln!("lb-bench: error: {why} (the benchmarks load BPF programs and build network namespaces: run as root)");
        std::process::exit(2);
    }
    let (repeats, runs, services, lab_services, lab_secs) = if quick {
        (100_000, 3, 1_000, vec![1, 100], 2)
    } else {
        (1_000_000, 5, 10_000, vec![1, 1_000, 10_000], 10)
    };
    let lab_services = lab_override.unwrap_or(lab_services);
    let wants = |part: &str| only.as_deref().is_none_or(|o| o == part);
    fn skipped<T>() -> Result<T, String> {
        Err("not run (--only)".to_string())
    }
    let err = |e: anyhow::Error| format!("{e:#}");
    let step = |name: &str| eprintln!("lb-bench: {name}...");

    let testrun = if wants("testrun") {
        step("BPF_PROG_TEST_RUN per-packet costs");
        testrun::testrun_bench(repeats, runs).map_err(err)
    } else {
        skipped()
    };
    let control = if wants("control") {
        step("control plane and map memory");
        // The full run also programs 100,000 Services (maps sized for them).
        let larger: &[usize] = if quick { &[] } else { &[100_000] };
        control::control_bench(services, 10, if quick { 5 } else { 21 }, larger).map_err(err)
    } else {
        skipped()
    };
    let kube_proxy_restore = if wants("restore") {
        step("kube-proxy rules: iptables-restore and nft");
        kubeproxy::restore_bench(services, 10).map_err(err)
    } else {
        skipped()
    };
    let ct_gc = if wants("ctgc") {
        step("conntrack sweep on full maps");
        lb_tests::bench::ctgc::ct_gc_bench(if quick { 0.1 } else { 1.0 }).map_err(err)
    } else {
        skipped()
    };
    let agent_memory = if wants("agent") {
        step("agent memory");
        lb_tests::lab::bin_path("lb-agent")
            .map_err(err)
            .and_then(|bin| control::agent_memory(&bin, services, 10).map_err(err))
    } else {
        skipped()
    };
    let lab = if skip_lab {
        Err("skipped (--skip-lab)".to_string())
    } else if !wants("lab") {
        skipped()
    } else {
        step("lab: NodePort without a load balancer, through XDP, iptables and nftables");
        let duration = Duration::from_secs(lab_secs);
        match &lab_modes {
            None => labbench::lab_bench(&lab_services, duration, lab_repeats).map_err(err),
            Some(modes) => {
                let mut points = Vec::new();
                let mut failure = None;
                for n in &lab_services {
                    for m in modes {
                        match labbench::lab_point(m, *n, duration, lab_repeats) {
                            Ok(p) => points.push(p),
                            Err(e) => failure = Some(err(e)),
                        }
                    }
                }
                failure.map_or(Ok(points), Err)
            }
        }
    };
    // The NAT targets are part of `lab` (--only lab, --skip-lab).
    let nat = if skip_lab {
        Err("skipped (--skip-lab)".to_string())
    } else if !wants("lab") {
        skipped()
    } else {
        step("lab: north-south NAT targets (agent with default flags; TCP also on the plain lab)");
        nat::nat_bench(if quick {
            nat::NatSizes::QUICK
        } else {
            nat::NatSizes::FULL
        })
        .map_err(err)
    };
    let results = report::Results {
        machine: report::Machine::read(),
        quick,
        testrun,
        lab,
        nat,
        control,
        kube_proxy_restore,
        agent_memory,
        ct_gc,
    };
    if let Err(e) = report::write(&out, &results) {
        eprintln!("lb-bench: error: writing {}: {e}", out.display());
        std::process::exit(1);
    }
    let md = report::markdown(&results);
    println!("{md}");
    eprintln!(
        "lb-bench: wrote {0}/results.json, {0}/results.md, {0}/chart.svg",
        out.display()
    );
    let failed = [
        results.nat.is_err() && !skip_lab && wants("lab"),
        results.testrun.is_err() && wants("testrun"),
        results.control.is_err() && wants("control"),
        results.kube_proxy_restore.is_err() && wants("restore"),
        results.agent_memory.is_err() && wants("agent"),
        results.ct_gc.is_err() && wants("ctgc"),
        results.lab.is_err() && !skip_lab && wants("lab"),
    ];
    if failed.iter().any(|f| *f) {
        eprintln!("lb-bench: some parts could not run (see the report)");
        std::process::exit(1);
    }
}

/// TCP and UDP runs per lab point (each point's spread comes from these).
const LAB_REPEATS: usize = 3;

fn usage(msg: &str) -> ! {
    eprintln!("lb-bench: error: {msg}\nusage: lb-bench [--quick] [--out DIR] [--skip-lab] [--only PART] [--lab-services N,N] [--lab-modes M,M] [--lab-repeats N]");
    std::process::exit(2);
}
