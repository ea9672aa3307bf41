//! `cargo xtask bench`: the measurements behind README's performance section. Each part returns
//! plain data; `lb-bench` (src/bin/lb-bench.rs) runs them and writes bench/results.json,
//! bench/results.md and bench/chart.svg.
pub mod control;
pub mod ctgc;
pub mod gen;
pub mod kubeproxy;
pub mod labbench;
pub mod nat;
pub mod report;
pub mod testrun;
