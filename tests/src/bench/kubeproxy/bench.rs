//! The control-plane benchmark: how long the kernel tools take to load kube-proxy's rules, from
//! scratch and for one endpoint change.
use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    iptables_full_restore, iptables_partial_restore, nft_full_transaction, nft_partial_transaction,
    tools::{
        iptables_replace_in, iptables_restore_in, ms, nft_apply_in, run_limited, tool_version, Run,
    },
};
use crate::{
    bench::gen::{self, BenchService},
    netns,
};

/// Time to load kube-proxy's rules for `services` Services of `endpoints_per_service` endpoints,
/// from scratch and for one endpoint change. All times are wall clock of the tool's run
/// (process start to exit), as kube-proxy experiences them.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreBench {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// `iptables -V`, e.g. `iptables v1.8.9 (nf_tables)`.
    pub iptables_version: String,
    /// The backend `iptables -V` names: `nf_tables` or `legacy`.
    pub iptables_backend: String,
    /// Plain `iptables-restore` (tables replaced) of the full ruleset into an empty namespace:
    /// the same ruleset kube-proxy's first sync writes, loaded the fastest way the tool offers.
    pub iptables_full_ms: f64,
    /// `iptables-restore --noflush` (kube-proxy's own call) of the same input into another empty
    /// namespace; `None` when it did not finish within `iptables_full_noflush_limit_ms` and was
    /// killed (see [`IPTABLES_NOFLUSH_LIMIT`]).
    pub iptables_full_noflush_ms: Option<f64>,
    pub iptables_full_noflush_limit_ms: f64,
    /// When killed at the limit: the bytes it had read by then (its input is
    /// `iptables_full_bytes`; a few KB are other files), to tell how far it got.
    pub iptables_full_noflush_read_bytes_at_limit: Option<u64>,
    pub iptables_full_lines: usize,
    pub iptables_full_bytes: usize,
    /// `iptables-restore --noflush` of the partial sync after one endpoint changed (see
    /// [`iptables_partial_restore`]), applied to the ruleset of `iptables_full_ms`.
    pub iptables_partial_ms: f64,
    pub iptables_partial_lines: usize,
    pub iptables_partial_bytes: usize,
    /// `nft -v`.
    pub nft_version: String,
    /// `nft -f -` of the full transaction into an empty namespace.
    pub nft_full_ms: f64,
    pub nft_full_lines: usize,
    pub nft_full_bytes: usize,
    /// `nft -f -` of the partial transaction after one endpoint changed (see
    /// [`nft_partial_transaction`]).
    pub nft_partial_ms: f64,
    pub nft_partial_lines: usize,
    pub nft_partial_bytes: usize,
    /// `nft --json list chains ip` after the full load: the listing kube-proxy's nftables mode
    /// runs on every sync to find stale chains, in addition to `nft_partial_ms`.
    pub nft_list_chains_ms: f64,
    /// What changed: `namespace/name`, removed endpoint, added endpoint.
    pub change: String,
}

/// How long [`restore_bench`] lets `iptables-restore --noflush` run on the full ruleset. With
/// the nf_tables backend of iptables 1.8.9 its cost grows with (rules x chains): every command
/// inserts its chain and jump target into a sorted linked list of chain names (a `strcmp` walk,
/// most of the CPU time), so 2,000 Services of 10 endpoints take ~40 s and 10,000 take hours.
pub const IPTABLES_NOFLUSH_LIMIT: Duration = Duration::from_secs(180);

/// The Services of [`restore_bench`]: `services` fillers ([`gen::filler`], ClusterIP, TCP) with
/// `endpoints` endpoints each, and the same after one endpoint change: the middle Service's
/// first endpoint is replaced by a new address (a pod replaced by another).
pub fn restore_bench_services(
    services: usize,
    endpoints: usize,
) -> (Vec<BenchService>, Vec<BenchService>, String) {
    let before = gen::filler(services, endpoints, "node2");
    let mut after = before.clone();
    let mut change = String::from("nothing (no Service with endpoints)");
    if let Some(s) = after.get_mut(services / 2) {
        if let Some(first) = s.endpoints.first_mut() {
            let old = first.0;
            let new = Ipv4Addr::new(
                10,
                251,
                (services / 2 / 256) as u8,
                (services / 2 % 256) as u8,
            );
            first.0 = new;
            change = format!(
                "{}/{}: endpoint {old} replaced by {new}",
                s.namespace, s.name
            );
        }
    }
    (before, after, change)
}

/// Times kube-proxy's rule loads for `services` ClusterIP Services of `endpoints` endpoints each
/// (see [`restore_bench_services`]), each in fresh network namespaces deleted afterwards; see
/// [`restore_bench_with_limit`]. `iptables-restore --noflush` of the full ruleset is stopped
/// after [`IPTABLES_NOFLUSH_LIMIT`].
pub fn restore_bench(services: usize, endpoints: usize) -> Result<RestoreBench> {
    restore_bench_with_limit(services, endpoints, IPTABLES_NOFLUSH_LIMIT)
}

/// [`restore_bench`] with another limit for the full `iptables-restore --noflush`:
/// - iptables: plain `iptables-restore` of [`iptables_full_restore`] into an empty namespace, and
///   `iptables-restore --noflush` (kube-proxy's first sync exactly; killed after `noflush_limit`)
///   of the same input into another; on the former `iptables-restore --noflush` of
///   [`iptables_partial_restore`] for one endpoint change. This mimics kube-proxy's iptables
///   mode since 1.28 (`MinimizeIPTablesRestore` on by default): the partial sync rewrites the
///   top-level chains in full (KUBE-SERVICES has one rule per Service port, so this input still
///   grows with the cluster) and only the chains of the Service that changed.
/// - nftables: `nft -f -` of [`nft_full_transaction`], then of [`nft_partial_transaction`] (the
///   changed Service's chains re-created and flushed and refilled, the stale endpoint chain
///   flushed; unchanged map elements not written), plus the `nft list chains` kube-proxy runs on
///   each sync, timed on its own.
pub fn restore_bench_with_limit(
    services: usize,
    endpoints: usize,
    noflush_limit: Duration,
) -> Result<RestoreBench> {
    let (before, after, change) = restore_bench_services(services, endpoints);
    let iptables_version = tool_version("iptables", &["-V"])?;
    let iptables_backend = iptables_version
        .rsplit_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(b, _)| b.to_string())
        .unwrap_or_else(|| "legacy".into());
    let nft_version = tool_version("nft", &["-v"])?;

    let full_input = iptables_full_restore(&before);
    let (ipt_flush, ipt_partial) = {
        let ns = PrivateNetns::new("ipt")?;
        let full = iptables_replace_in(&ns.name, &full_input).context("iptables full restore")?;
        let partial = iptables_restore_in(&ns.name, &iptables_partial_restore(&before, &after))
            .context("iptables partial restore")?;
        (full, partial)
    };
    let ipt_noflush = {
        let ns = PrivateNetns::new("iptnf")?;
        run_limited(
            &ns.name,
            "iptables-restore",
            &["--noflush"],
            &full_input,
            Some(noflush_limit),
        )
        .context("iptables full restore --noflush")?
    };
    let (nft_full, nft_partial, list_ms) = {
        let ns = PrivateNetns::new("nft")?;
        let full = nft_apply_in(&ns.name, &nft_full_transaction(&before))
            .context("nft full transaction")?;
        let started = Instant::now();
        netns::exec_in(&ns.name, "nft", &["--json", "list", "chains", "ip"])
            .context("nft list chains")?;
        let list_ms = ms(started.elapsed());
        let partial = nft_apply_in(&ns.name, &nft_partial_transaction(&before, &after))
            .context("nft partial transaction")?;
        (full, partial, list_ms)
    };
    let (iptables_full_noflush_ms, iptables_full_noflush_read_bytes_at_limit) = match ipt_noflush {
        Run::Done(a) => (Some(a.ms), None),
        Run::TimedOut { read_bytes } => (None, Some(read_bytes)),
    };
    Ok(RestoreBench {
        services,
        endpoints_per_service: endpoints,
        iptables_version,
        iptables_backend,
        iptables_full_ms: ipt_flush.ms,
        iptables_full_noflush_ms,
        iptables_full_noflush_limit_ms: ms(noflush_limit),
        iptables_full_noflush_read_bytes_at_limit,
        iptables_full_lines: ipt_flush.lines,
        iptables_full_bytes: ipt_flush.bytes,
        iptables_partial_ms: ipt_partial.ms,
        iptables_partial_lines: ipt_partial.lines,
        iptables_partial_bytes: ipt_partial.bytes,
        nft_version,
        nft_full_ms: nft_full.ms,
        nft_full_lines: nft_full.lines,
        nft_full_bytes: nft_full.bytes,
        nft_partial_ms: nft_partial.ms,
        nft_partial_lines: nft_partial.lines,
        nft_partial_bytes: nft_partial.bytes,
        nft_list_chains_ms: list_ms,
        change,
    })
}

/// A network namespace of our own (`lbkp<pid>x<n>-<what>`), deleted on drop.
struct PrivateNetns {
    name: String,
}

static NETNS_COUNTER: AtomicU32 = AtomicU32::new(0);

impl PrivateNetns {
    fn new(what: &str) -> Result<Self> {
        let name = format!(
            "lbkp{}x{}-{what}",
            std::process::id(),
            NETNS_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        netns::run("ip", &["netns", "add", &name])?;
        let ns = PrivateNetns { name };
        netns::ip(&ns.name, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for PrivateNetns {
    fn drop(&mut self) {
        if let Err(e) = netns::run("ip", &["netns", "del", &self.name]) {
            eprintln!("restore bench: removing netns {}: {e:#}", self.name);
        }
    }
}
