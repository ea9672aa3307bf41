//! `lb-bench [--quick] [--out DIR] [--skip-lab]`: runs every benchmark of issue 7 and writes
//! DIR/results.json, DIR/results.md and DIR/chart.svg (DIR defaults to `bench`). `cargo xtask
//! bench` builds the release binaries and runs it. A part that fails is reported as such; the
//! others still run. Needs root (BPF, network namespaces).
use std::{path::PathBuf, time::Duration};

use lb_tests::bench::{control, kubeproxy, labbench, report, testrun};

fn main() {
    let mut quick = false;
    let mut skip_lab = false;
    let mut out = PathBuf::from("bench");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--skip-lab" => skip_lab = true,
            "--out" => out = PathBuf::from(args.next().unwrap_or_else(|| usage("--out needs a directory"))),
            "-h" | "--help" => {
                println!("usage: lb-bench [--quick] [--out DIR] [--skip-lab]");
                return;
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    if let Some(why) = lb_tests::privilege_problem() {
        eprintln!("lb-bench: error: {why} (the benchmarks load BPF programs and build network namespaces: run as root)");
        std::process::exit(2);
    }
    let (repeats, runs, services, lab_services, lab_secs) =
        if quick { (100_000, 3, 1_000, vec![1, 100], 2) } else { (1_000_000, 5, 10_000, vec![1, 1_000, 10_000], 10) };
    let err = |e: anyhow::Error| format!("{e:#}");
    let step = |name: &str| eprintln!("lb-bench: {name}...");

    step("BPF_PROG_TEST_RUN per-packet costs");
    let testrun = testrun::testrun_bench(repeats, runs).map_err(err);
    step("control plane and map memory");
    let control = control::control_bench(services, 10, if quick { 5 } else { 21 }).map_err(err);
    step("kube-proxy rules: iptables-restore and nft");
    let kube_proxy_restore = kubeproxy::restore_bench(services, 10).map_err(err);
    step("agent memory");
    let agent_memory = lb_tests::lab::bin_path("lb-agent").map_err(err).and_then(|bin| control::agent_memory(&bin, services, 10).map_err(err));
    let lab = if skip_lab {
        Err("skipped (--skip-lab)".to_string())
    } else {
        step("lab: NodePort through XDP, iptables and nftables");
        labbench::lab_bench(&lab_services, Duration::from_secs(lab_secs)).map_err(err)
    };
    let results = report::Results { machine: report::Machine::read(), quick, testrun, lab, control, kube_proxy_restore, agent_memory };
    if let Err(e) = write(&out, &results) {
        eprintln!("lb-bench: error: writing {}: {e}", out.display());
        std::process::exit(1);
    }
    let md = report::markdown(&results);
    println!("{md}");
    eprintln!("lb-bench: wrote {0}/results.json, {0}/results.md, {0}/chart.svg", out.display());
    let failed = [results.testrun.is_err(), results.control.is_err(), results.kube_proxy_restore.is_err(), results.agent_memory.is_err(), results.lab.is_err() && !skip_lab];
    if failed.iter().any(|f| *f) {
        eprintln!("lb-bench: some parts could not run (see the report)");
        std::process::exit(1);
    }
}

fn write(out: &std::path::Path, r: &report::Results) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(r).expect("serializable") + "\n")?;
    std::fs::write(out.join("results.md"), report::markdown(r))?;
    std::fs::write(out.join("chart.svg"), report::svg(r))?;
    Ok(())
}

fn usage(msg: &str) -> ! {
    eprintln!("lb-bench: error: {msg}\nusage: lb-bench [--quick] [--out DIR] [--skip-lab]");
    std::process::exit(2);
}
