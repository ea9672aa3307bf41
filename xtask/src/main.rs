//! `cargo xtask <setup|test|demo|bench>` — it only runs things.

mod bench;
mod fuzz;
mod lint;
mod setup;
mod test;
mod util;

use anyhow::{Context, Result};

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup                 install/check what building and testing need (root; idempotent)
  lint                  cargo fmt --check and clippy -D warnings: host crates (all targets), the
                        kernel crate (nightly clippy for the BPF target), fuzz/ formatting
  test [-- TEST_ARGS]   lint (skipped when a name filter is given), build the binaries, run every
                        test one at a time (args go to the test harness, e.g. a name filter or
                        --nocapture), print how many ran and how many ran on the kernel
                        (kernel_*/lab_*); with CI=true, zero kernel tests is a failure; then fuzz
                        each target briefly
  demo [-- ARGS]        build everything and run lb-demo (the reference lab with real traffic)
  bench [-- ARGS]       build release binaries and run lb-bench: TestRun per-packet costs, lab
                        requests/s and packets/s against kube-proxy's iptables/nftables rules,
                        control plane against iptables-restore, memory; writes bench/results.json,
                        bench/results.md, bench/chart.svg (ARGS: --quick, --out DIR, --skip-lab)
  fuzz [TARGET] [--seconds N] [INPUT]
                        run the cargo-fuzz targets (manifests, objects) N s each (300), or
                        replay a saved INPUT; findings land in fuzz/artifacts/TARGET/

test and demo run setup first when something is missing.";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match dispatch(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// Arguments after the subcommand, without a leading `--` separator.
fn rest(args: &[String]) -> &[String] {
    match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    }
}

fn wants_help(args: &[String]) -> bool {
    matches!(
        args.first().map(String::as_str),
        Some("-h" | "--help" | "help")
    )
}

fn dispatch(args: &[String]) -> Result<i32> {
    let (cmd, args) = match args.split_first() {
        Some((c, a)) => (c.as_str(), a),
        None => {
            eprintln!("{USAGE}");
            return Ok(2);
        }
    };
    match cmd {
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(0)
        }
        _ if wants_help(args) => {
            println!("{USAGE}");
            Ok(0)
        }
        "setup" => {
            if !args.is_empty() {
                eprintln!("xtask setup takes no arguments\n\n{USAGE}");
                return Ok(2);
            }
            setup::setup()?;
            Ok(0)
        }
        "lint" => {
            lint::lint()?;
            Ok(0)
        }
        "test" => test::test(rest(args)),
        "demo" => demo(rest(args)),
        "fuzz" => fuzz::fuzz(rest(args)),
        "bench" => bench::bench(rest(args)),
        other => {
            eprintln!("xtask: unknown command `{other}`\n\n{USAGE}");
            Ok(2)
        }
    }
}

/// `cargo build --workspace --bins` (minus crates that only build for BPF), so lb-agent, lbctl,
/// lb-demo and the lab binaries exist for the integration tests and the demo.
pub fn build_bins() -> Result<()> {
    util::run(util::cargo_workspace("build").arg("--bins"))
}

fn demo(args: &[String]) -> Result<i32> {
    if let Some(why) = setup::setup_needed() {
        println!("xtask: {why}; running setup first");
        setup::setup()?;
    }
    build_bins()?;
    let bin_dir = util::target_dir()?.join("debug");
    let demo = bin_dir.join("lb-demo");
    if !demo.is_file() {
        anyhow::bail!(
            "{} was not built: the lb-demo binary (tests crate) does not exist yet",
            demo.display()
        );
    }
    let status = util::run_status(
        std::process::Command::new(&demo)
            .args(args)
            .env("LB_BIN_DIR", &bin_dir)
            .current_dir(util::workspace_root()),
    )
    .with_context(|| format!("running {}", demo.display()))?;
    Ok(util::exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn rest_strips_one_separator() {
        assert_eq!(
            rest(&s(&["--", "kernel_", "--nocapture"])),
            s(&["kernel_", "--nocapture"])
        );
        assert_eq!(rest(&s(&["kernel_"])), s(&["kernel_"]));
        assert_eq!(rest(&s(&["--", "--"])), s(&["--"]));
        assert!(rest(&[]).is_empty());
    }

    #[test]
    fn unknown_commands_and_help() {
        assert_eq!(dispatch(&s(&["nope"])).unwrap(), 2);
        assert_eq!(dispatch(&s(&["--help"])).unwrap(), 0);
        assert!(USAGE.contains("bench [-- ARGS]"));
    }
}
