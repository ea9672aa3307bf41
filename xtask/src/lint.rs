//! `cargo xtask lint` (and the first step of `cargo xtask test`): formatting and clippy with every
//! warning an error, on the host workspace, the kernel crate (built for the BPF target by
//! nightly clippy) and the fuzz workspace (formatted and type-checked).

use crate::util;
use anyhow::{Context, Result};
use std::process::Command;

/// The checks, in the order they run: cheap formatting first, then clippy.
pub fn lint() -> Result<()> {
    let root = util::workspace_root();
    let fuzz_manifest = root.join("fuzz").join("Cargo.toml");

    // rustfmt needs no build: the whole workspace (lb-ebpf included) and the fuzz workspace.
    check(util::cargo().args(["fmt", "--all", "--check"]))?;
    check(
        util::cargo()
            .args(["fmt", "--all", "--check", "--manifest-path"])
            .arg(&fuzz_manifest),
    )?;

    // Host crates: every target (lib, bins, tests, benches, examples).
    check(util::cargo_workspace("clippy").args(["--all-targets", "--", "-D", "warnings"]))?;

    // The kernel crate: nightly clippy for the BPF target, as aya-build builds it (core only).
    check(&mut kernel_clippy())?;

    // The fuzz workspace: type-checked (nightly, as cargo-fuzz builds it), so that a change of
    // the crates it calls breaks here in a minute, not after the whole test run.
    check(&mut fuzz_check())?;
    Ok(())
}

/// `cargo +nightly check` of the fuzz workspace, in fuzz/ (its own target directory).
fn fuzz_check() -> Command {
    let mut cmd = nightly_cargo("fuzz");
    cmd.args(["check", "--all-targets"]);
    cmd
}

/// `rustup run nightly cargo` in `dir` (relative to the workspace root), without the variables
/// of the outer `cargo run` (stable), which must not leak into the nightly cargo.
fn nightly_cargo(dir: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(util::workspace_root().join(dir))
        .args(["run", "nightly", "cargo"]);
    for var in [
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// `cargo +nightly clippy` for lb-ebpf on `bpfel-unknown-none` with `-Z build-std=core`, run in
/// lb-ebpf/ (not `--all-targets`: a `no_std` BPF crate has no test harness) with its own target
/// directory so that it never invalidates the host build.
fn kernel_clippy() -> Command {
    let root = util::workspace_root();
    let mut cmd = nightly_cargo("lb-ebpf");
    cmd.arg("clippy")
        .args(["--package", "lb-ebpf", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target").join("clippy-bpf"))
        .args(["--", "-D", "warnings"]);
    cmd
}

fn check(cmd: &mut Command) -> Result<()> {
    util::run(cmd).context(
        "lint failed: `cargo fmt --all` fixes formatting, clippy's messages above name each warning",
    )
}
