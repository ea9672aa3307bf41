//! The node agent: checks its environment, loads the kernel programs, pins maps and links under
//! `--bpffs`, and keeps the maps in sync with the manifests.
//!
//! Pinned layout under `--bpffs DIR`:
//! - `DIR/<map name>`: every map (names in `lb_common::map_name`), reused by a restarted agent;
//! - `DIR/links/<hook>`: the cgroup links (`connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`)
//!   and `DIR/links/xdp_<device>`; programs stay attached while the agent is down.
//!
//! The loop lives here; [`mod@preflight`] checks the environment, [`attach`] loads and attaches the
//! programs, [`metrics`] and [`health_check`] answer over [`http`].
pub mod attach;
pub mod config;
pub mod health_check;
pub mod http;
pub mod metrics;
pub mod preflight;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    control::{
        desired::{self, datapath_config},
        kube_source::{KubeConfigChoice, KubeSource},
        model, plan,
        source::{ManifestsSource, Objects, Source},
    },
    dataplane::{
        ct_gc::{self, CtTiers},
        pinned::{other_versions, AyaDataplane},
        read::boot_seconds,
        sync::Syncer,
    },
    error::usage,
};
use attach::{attach_all, load, load_programs};
use config::RunConfig;
use health_check::HealthServers;
use metrics::Ops;
use preflight::preflight;

/// `lb-agent run`.
pub fn run(cfg: &RunConfig, stop: Arc<AtomicBool>) -> Result<()> {
    preflight(cfg)?;
    let mut source: Box<dyn Source> = match (&cfg.manifests, &cfg.kubeconfig) {
        (Some(m), _) => Box::new(ManifestsSource::new(m)),
        (None, Some(k)) => Box::new(
            KubeSource::new(KubeConfigChoice::Kubeconfig(k.clone()), &cfg.node)
                .map_err(|e| usage(format!("{e:#}")))?,
        ),
        (None, None) => Box::new(
            KubeSource::new(KubeConfigChoice::InCluster, &cfg.node)
                .map_err(|e| usage(format!("{e:#}")))?,
        ),
    };
    let ops = Arc::new(Ops::new(cfg.bpffs.clone()));
    for (flag, addr) in [
        ("--metrics-addr", cfg.metrics_addr),
        ("--health-addr", cfg.health_addr),
    ] {
        let Some(addr) = addr else { continue };
        let l =
            std::net::TcpListener::bind(addr).map_err(|e| usage(format!("{flag} {addr}: {e}")))?;
        let (ops, stop) = (ops.clone(), stop.clone());
        std::thread::spawn(move || http::serve(l, stop, |path| ops.route(path)));
    }
    // The last snapshot, re-planned after a failed sync.
    let mut last: Option<Objects> = None;
    let mut retry = false;
    let mut ebpf = load(&cfg.bpffs)?;
    // Rare kernel events (aya-log), forwarded to this log at their (debug) level.
    let mut kernel_log = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("kernel log unavailable: {e}");
            None
        }
    };
    // Verify every program now (fail fast), attach only after the first sync.
    load_programs(&mut ebpf)?;
    let dp = AyaDataplane::from_ebpf(&mut ebpf)?;
    let mut syncer = Syncer::adopt(dp)?;
    spawn_ct_gc(
        CtTiers::from_ebpf(&ebpf)?,
        cfg.ct_gc_interval,
        ops.clone(),
        stop.clone(),
    );
    let mut health_checks = HealthServers::new();
    // Maps of another layout version (an upgrade): replaced once the new ones are filled.
    let old_versions = other_versions(&cfg.bpffs);
    for o in &old_versions {
        log::info!(
            "{} was pinned by an agent of another layout version: {} replaces it",
            o.name,
            o.current
        );
    }
    let mut attached = false;
    let mut generation = 0u64;
    while !stop.load(Ordering::Relaxed) {
        ops.heartbeat();
        if let Some(l) = kernel_log.as_mut() {
            l.flush();
        }
        ops.watch_restarts(source.watch_restarts());
        let polled = match source.poll() {
            Ok(Some(o)) => Ok(Some(o)),
            Ok(None) if retry => Ok(last.clone()),
            other => other,
        };
        retry = false;
        match polled {
            Ok(Some(objects)) => {
                last = Some(objects.clone());
                generation += 1;
                let started = Instant::now();
                let m = model::build(&objects, &cfg.node);
                for r in &m.rejected {
                    log::warn!(
                        "rejected {} {}/{}: {}",
                        r.kind,
                        r.namespace,
                        r.name,
                        r.reason
                    );
                }
                let p = plan::plan(&m, &cfg.node);
                let desired = desired::desired(&p);
                let dp_config = datapath_config(&p.node, cfg.snat_ports);
                let synced = syncer
                    .set_config(&dp_config)
                    .and_then(|_| syncer.sync(&desired));
                health_checks
                    .proxy_healthy
                    .store(synced.is_ok(), Ordering::Relaxed);
                let health_ports = health_check::ports(&m, &cfg.node);
                ops.local_endpoints(&health_ports);
                for (port, err) in health_checks.update(&health_ports, &p.node.addresses) {
                    log::error!("healthCheckNodePort {port}: cannot listen: {err}");
                }
                ops.service_ports(syncer.service_ports());
                match &synced {
                    Ok(st) => {
                        ops.synced(started.elapsed(), st.writes);
                        ops.udp_flows_flushed(st.udp_flows_flushed);
                    }
                    Err(_) => ops.sync_failed(),
                }
                if synced.is_ok() && !attached {
                    attach_all(&mut ebpf, cfg, &syncer, &old_versions)?;
                    attached = true;
                }
                match synced {
                    Ok(st) => log::info!(
                        "sync generation {generation}: {} frontends, {} map writes{} in {:?}",
                        desired.len(),
                        st.writes,
                        if st.udp_flows_flushed > 0 {
                            format!(
                                ", {} UDP conntrack entries of removed backends flushed",
                                st.udp_flows_flushed
                            )
                        } else {
                            String::new()
                        },
                        started.elapsed()
                    ),
                    Err(e) => {
                        log::error!(
                            "sync generation {generation} failed: {e:#}; re-reading the maps"
                        );
                        syncer = Syncer::adopt(AyaDataplane::from_pins(&cfg.bpffs)?)?;
                        retry = true;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => log::error!("reading objects: {e}; keeping the last good state"),
        }
        std::thread::sleep(cfg.poll_interval);
    }
    log::info!("stopping; programs stay attached through their pinned links (lb-agent uninstall removes them)");
    Ok(())
}

/// Runs a conntrack sweep every `interval` on a thread of its own, so that a long sweep never
/// delays a sync or the metrics and health answers. A sweep that takes longer than the interval
/// is followed by the next one at once (`lb_conntrack_gc_last_duration_seconds` above
/// `lb_conntrack_gc_interval_seconds` says so).
fn spawn_ct_gc(tiers: CtTiers, interval: Duration, ops: Arc<Ops>, stop: Arc<AtomicBool>) {
    ops.ct_gc_started(interval);
    std::thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(move || {
            let mut next = Instant::now() + interval;
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now < next {
                    std::thread::sleep((next - now).min(Duration::from_millis(200)));
                    continue;
                }
                next = now + interval;
                match ct_gc::sweep(&tiers, boot_seconds()) {
                    Ok(st) => {
                        ops.ct_swept(&st);
                        if st.removed > 0 {
                            log::debug!(
                                "conntrack sweep: {} of {} entries expired, removed in {:?}",
                                st.removed,
                                st.examined,
                                st.duration
                            );
                        }
                    }
                    Err(e) => {
                        ops.ct_gc_failed();
                        log::warn!("conntrack sweep failed: {e:#}");
                    }
                }
            }
        })
        .expect("spawning the conntrack sweep thread");
}
