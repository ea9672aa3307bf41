//! `cargo xtask test`: check formatting and clippy ([`crate::lint`]), build the binaries the
//! integration tests drive, run every test one at a time, and count what ran (and how much of it
//! ran on the kernel); then run every fuzz target of `fuzz/` for `LB_FUZZ_SECONDS` (20) seconds.

use crate::util::{self, display};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::process::Stdio;

/// Test-name prefixes (last path segment) of tests that run on the real kernel.
const KERNEL_PREFIXES: &[&str] = &["kernel_", "lab_"];

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Passing tests named `kernel_*` / `lab_*`.
    pub kernel: u64,
}

impl Summary {
    /// Feeds one line of `cargo test` stdout.
    pub fn line(&mut self, line: &str) {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("test result: ") {
            // `ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`
            let counts = rest.split_once(". ").map_or(rest, |(_, c)| c);
            for part in counts.split(';') {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("test ") {
            // `test lab::lab_clusterip_tcp ... ok`
            if let Some((name, outcome)) = rest.split_once(" ... ") {
                if outcome == "ok" && is_kernel_test(name) {
                    self.kernel += 1;
                }
            }
        }
    }

    #[cfg(test)]
    pub fn parse(output: &str) -> Self {
        let mut s = Self::default();
        output.lines().for_each(|l| s.line(l));
        s
    }
}

fn is_kernel_test(name: &str) -> bool {
    if name.contains(" - ") {
        return false; // doc-test: `path/to/file.rs - item (line N)`
    }
    let last = name.rsplit("::").next().unwrap_or(name);
    KERNEL_PREFIXES.iter().any(|p| last.starts_with(p))
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Returns the process exit code.
pub fn test(harness_args: &[String]) -> Result<i32> {
    if ci() && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        // A CI clone is built once: incremental caches would only take disk (about 1.5 GB).
        std::env::set_var("CARGO_INCREMENTAL", "0");
    }
    if let Some(why) = crate::setup::setup_needed() {
        println!("xtask: {why}; running setup first");
        crate::setup::setup()?;
    }
    if has_name_filter(harness_args) {
        println!("xtask test: lint: skipped (a test name filter was given)");
    } else {
        crate::lint::lint()?;
        println!("xtask test: lint: cargo fmt --check and clippy -D warnings (host, kernel) clean");
    }
    crate::build_bins()?;
    let bin_dir = util::target_dir()?.join("debug");

    let mut cmd = util::cargo_workspace("test");
    cmd.arg("--").arg("--test-threads=1").args(harness_args);
    cmd.env("LB_BIN_DIR", &bin_dir);
    cmd.stdout(Stdio::piped());
    eprintln!("+ {}", display(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", display(&cmd)))?;

    // Forward stdout as it arrives (partial lines too, e.g. `test foo ... ` of a slow test) and
    // parse it line by line. cargo's own messages go to the inherited stderr.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut summary = Summary::default();
    let mut pending = Vec::new();
    let mut buf = [0u8; 8192];
    let stdout = std::io::stdout();
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading cargo test output"),
        };
        {
            let mut lock = stdout.lock();
            let _ = lock.write_all(&buf[..n]);
            let _ = lock.flush();
        }
        pending.extend_from_slice(&buf[..n]);
        while let Some(i) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            summary.line(&String::from_utf8_lossy(&line));
        }
    }
    if !pending.is_empty() {
        summary.line(&String::from_utf8_lossy(&pending));
    }
    let status = child.wait().context("waiting for cargo test")?;

    println!(
        "xtask test: {} passed, {} failed, {} ignored (kernel tests: {})",
        summary.passed, summary.failed, summary.ignored, summary.kernel
    );
    if !status.success() {
        eprintln!("xtask test: cargo test failed ({status})");
        return Ok(util::exit_code(status).max(1));
    }
    if ci() && summary.kernel == 0 {
        bail!("CI=true but no kernel tests (kernel_*/lab_*) passed: BPF tests must run in CI");
    }
    fuzz_briefly(harness_args)
}

/// Seconds per fuzz target in `cargo xtask test` unless `LB_FUZZ_SECONDS` says otherwise.
const FUZZ_SECONDS: u64 = 20;

/// True when the harness arguments hold a test-name filter (an argument that is not an option
/// or an option's value): the caller wants some tests, not the whole suite.
fn has_name_filter(harness_args: &[String]) -> bool {
    const WITH_VALUE: &[&str] = &[
        "--skip",
        "--test-threads",
        "--format",
        "--color",
        "-Z",
        "--logfile",
        "--report-time",
    ];
    let mut it = harness_args.iter();
    while let Some(a) = it.next() {
        if WITH_VALUE.contains(&a.as_str()) {
            it.next();
        } else if !a.starts_with('-') {
            return true;
        }
    }
    false
}

/// Every fuzz target for a short while, after the cargo tests passed: prints
/// `xtask test: fuzz: manifests 20 s (12345 runs), objects 20 s (23456 runs)`; a finding fails.
fn fuzz_briefly(harness_args: &[String]) -> Result<i32> {
    let seconds = crate::fuzz::test_seconds(
        std::env::var("LB_FUZZ_SECONDS").ok().as_deref(),
        FUZZ_SECONDS,
    )?;
    if seconds == 0 {
        println!("xtask test: fuzz: skipped (LB_FUZZ_SECONDS=0)");
        return Ok(0);
    }
    if has_name_filter(harness_args) {
        println!("xtask test: fuzz: skipped (a test name filter was given)");
        return Ok(0);
    }
    let outcomes = crate::fuzz::run_all(crate::fuzz::TARGETS, seconds, &[])?;
    println!("xtask test: {}", crate::fuzz::summary(&outcomes));
    if outcomes.iter().all(crate::fuzz::Outcome::passed) {
        return Ok(0);
    }
    eprintln!("xtask test: a fuzz target failed; replay with `cargo xtask fuzz TARGET INPUT`");
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
running 3 tests
test plan::tests::categorise_ready ... ok
test sync::tests::kernel_looking_but_nested_ok ... ok
test source::tests::slow ... ignored
test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.02s


running 4 tests
test kernel_xdp_pass_non_ip ... ok
test kernel_xdp_truncated ... FAILED
test lab::lab_clusterip_tcp ... ok
test lab_needs_root ... ignored, needs root
failures:

---- kernel_xdp_truncated stdout ----
thread 'kernel_xdp_truncated' panicked at tests/src/xdp.rs:10:5
test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.50s

running 0 tests

test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

   Doc-tests lb_common

running 1 test
test lb-common/src/lib.rs - map_name (line 12) ... ok
test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s
";

    #[test]
    fn sums_results_and_counts_kernel_tests() {
        let s = Summary::parse(OUTPUT);
        assert_eq!(
            s,
            Summary {
                passed: 5,
                failed: 1,
                ignored: 2,
                kernel: 3
            }
        );
    }

    #[test]
    fn classifies_test_names() {
        assert!(is_kernel_test("kernel_xdp_pass"));
        assert!(is_kernel_test("lab::lab_nodeport"));
        assert!(is_kernel_test("harness::tests::kernel_fixture"));
        assert!(!is_kernel_test("kernel::tests::parse"));
        assert!(!is_kernel_test("my_lab_test"));
        assert!(!is_kernel_test("src/lib.rs - lab_ (line 3)"));
    }

    #[test]
    fn name_filters() {
        let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(!has_name_filter(&[]));
        assert!(!has_name_filter(&v(&["--nocapture", "--include-ignored"])));
        assert!(!has_name_filter(&v(&[
            "--skip",
            "lab_",
            "--test-threads",
            "1"
        ])));
        assert!(has_name_filter(&v(&["lab_smoke"])));
        assert!(has_name_filter(&v(&["--nocapture", "kernel_", "--exact"])));
    }

    #[test]
    fn empty_and_partial_output() {
        assert_eq!(Summary::parse(""), Summary::default());
        // Compilation failure: no result lines at all.
        assert_eq!(
            Summary::parse("error[E0425]: cannot find value `x`\n"),
            Summary::default()
        );
        // Line fed in pieces is only counted once complete; CRLF tolerated.
        let mut s = Summary::default();
        s.line("test kernel_a ... ok\r\n");
        s.line("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\r\n");
        assert_eq!(
            s,
            Summary {
                passed: 1,
                failed: 0,
                ignored: 0,
                kernel: 1
            }
        );
    }
}
