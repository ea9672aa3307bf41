//! `cargo xtask bench [-- --quick] [-- --out DIR] [-- --skip-lab]`: builds the release binaries
//! and runs `lb-bench` (tests/src/bin/lb-bench.rs), which writes bench/results.json,
//! bench/results.md and bench/chart.svg.
use anyhow::{Context, Result};

use crate::{setup, util};

pub fn bench(args: &[String]) -> Result<i32> {
    if let Some(why) = setup::setup_needed() {
        println!("xtask: {why}; running setup first");
        setup::setup()?;
    }
    util::run(util::cargo_workspace("build").args(["--release", "--bins"]))?;
    let bin_dir = util::target_dir()?.join("release");
    let exe = bin_dir.join("lb-bench");
    let status = util::run_status(
        std::process::Command::new(&exe)
            .args(args)
            .env("LB_BIN_DIR", &bin_dir)
            .current_dir(util::workspace_root()),
    )
    .with_context(|| format!("running {}", exe.display()))?;
    Ok(util::exit_code(status))
}
