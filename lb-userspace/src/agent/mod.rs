//! The node agent: checks its environment, loads the kernel programs, pins maps and links under
//! `--bpffs`, and keeps the maps in sync with the manifests.
//!
//! Pinned layout under `--bpffs DIR`:
//! - `DIR/<map name>`: every map (names in `lb_common::map_name`), reused by a restarted agent;
//! - `DIR/links/<hook>`: the cgroup links (`connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`,
//!   and `connect6`, `sendmsg6`, `recvmsg6`, `getpeername6` for IPv4-mapped IPv6 addresses;
//!   every agent attaches all eight, also over the pins of an older one that lacks some),
//!   per device the north-south link `DIR/links/xdp_<device>` or `DIR/links/tc_ingress_<device>`
//!   (see [`hook`]) and `DIR/links/tc_egress_<device>`; programs stay attached while the agent is
//!   down.
//!
//! The loop lives here; [`mod@preflight`] checks the environment, [`attach`] loads and attaches the
//! programs, [`metrics`] and [`health_check`] answer over [`http`].
pub mod attach;
pub mod changes;
pub mod config;
pub mod devices;
pub mod health_check;
pub mod hook;
pub mod http;
pub mod interfaces;
pub mod kube_proxy;
pub mod lost;
pub mod metrics;
pub mod preflight;
pub mod routes;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    control::{
        desired::{self, datapath_config},
        kube_source::{KubeConfigChoice, KubeSource},
        model::{self, IpFamily},
        source::{ManifestsSource, Source},
    },
    dataplane::{
        bpf_sys, capacity,
        ct_gc::{self, CtTiers},
        cycle::ControlPlane,
        pinned::{other_versions, AyaDataplane},
        read::{boot_seconds, pinned_sizes},
        sock_term::{self, Serving, SockTerminator},
        sync::Syncer,
    },
    error::usage,
};
use attach::{attach_all, choose_hooks, load, load_programs};
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
    // Synced again without a new snapshot after a failed sync, or when a sync freed room.
    let mut retry = false;
    // One agent per pin directory, taken before anything is loaded or pinned (and after the
    // checks above, so that an agent that cannot start creates nothing). Held until the agent
    // exits: the kernel releases it then, even on SIGKILL.
    let one_agent = preflight::lock_pin_dir(&cfg.bpffs)?;
    // The listeners after the lock: a second agent for the same pin directory is told about
    // the first (above), not about the port the first one holds.
    // Every HTTP listener (these two, the healthCheckNodePorts) on one runtime of its own: no
    // client can hold the loop or another client's answer (see `http`).
    let http_server = http::Server::start()?;
    let mut ops_listeners = Vec::new();
    for (flag, addr) in [
        ("--metrics-addr", cfg.metrics_addr),
        ("--health-addr", cfg.health_addr),
    ] {
        let Some(addr) = addr else { continue };
        let l =
            std::net::TcpListener::bind(addr).map_err(|e| usage(format!("{flag} {addr}: {e}")))?;
        let o = ops.clone();
        let (work, handler): (http::Work, http::Handler) = if flag == "--metrics-addr" {
            // Reading the maps may take a while: off the runtime's thread.
            (
                http::Work::Blocking,
                Arc::new(move |path: &str| o.metrics_route(path)),
            )
        } else {
            (
                http::Work::Inline,
                Arc::new(move |path: &str| o.health_route(path)),
            )
        };
        ops_listeners.push(http_server.serve(l, work, handler)?);
    }
    let mut ebpf = load(&cfg.bpffs, &cfg.map_sizes)?;
    // The sizes the maps really have: a map pinned earlier keeps its size.
    let sizes = pinned_sizes(&cfg.bpffs)?;
    for ((name, want), (_, have)) in cfg.map_sizes.per_map().iter().zip(sizes.per_map()) {
        if *want != have {
            log::warn!(
                "map {name} is pinned with {have} entries, not the {want} of its size flag: \
                 the new size takes effect once `lb-agent uninstall` (or a reboot) removed it"
            );
        }
    }
    // Rare kernel events (aya-log), forwarded to this log at their level (warn: a connection
    // refused because a slot points at a missing backend).
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
    syncer.set_sizes(sizes);
    // The model, plan and map contents of every Service, kept between snapshots: a cycle
    // recomputes and syncs what the snapshot changed.
    let mut control = ControlPlane::new(
        &cfg.node,
        model::Checks {
            node_port_range: cfg.nodeport_range,
            service_proxy_name: cfg.service_proxy_name.clone(),
            node_port_addresses: cfg.nodeport_addresses.clone(),
        },
        sizes,
    );
    let mut have_snapshot = false;
    // The version of the Service-port names last handed to the metrics.
    let mut names_seen: Option<u64> = None;
    // What was rejected at the last sync (logged when a verdict changes, not on every sync).
    let mut rejected_before: BTreeSet<model::Rejected> = BTreeSet::new();
    // Services and EndpointSlices changed since the last snapshot (kube-proxy's change metrics),
    // and the trigger times of slice changes not in the maps yet.
    let mut changes = changes::ChangeTracker::default();
    let mut pending_triggers: Vec<std::time::SystemTime> = Vec::new();
    let mut deferred_before: Vec<String> = Vec::new();
    // Cached next hops of the XDP path go stale with every routing change (routes.rs).
    let route_gen = routes::RouteGen::open(&cfg.bpffs)?;
    routes::spawn(route_gen.clone(), stop.clone())?;
    spawn_ct_gc(
        CtTiers::from_ebpf(&ebpf)?,
        CtTiers::from_ebpf(&ebpf)?,
        cfg.ct_gc_interval,
        ops.clone(),
        stop.clone(),
    );
    let protos: BTreeSet<u8> = if cfg.terminate_tcp_sockets {
        [lb_common::proto::TCP, lb_common::proto::UDP].into()
    } else {
        [lb_common::proto::UDP].into()
    };
    let sock_term = match SockTerminator::new() {
        Ok(t) => {
            ops.socket_termination_supported(true);
            Some(spawn_sock_term(
                t,
                bpf_sys::object_map_fd(&ebpf, lb_common::map_name::SOCK_REV_NAT)?,
                bpf_sys::object_map_fd(&ebpf, lb_common::map_name::SOCK_REV_NAT6)?,
                protos.clone(),
                cfg.proc.clone(),
                ops.clone(),
                stop.clone(),
            ))
        }
        Err(e) => {
            ops.socket_termination_supported(false);
            log::warn!(
                "sockets connected to removed backends will not be terminated: {e} \
                 (connected UDP sockets keep their backend until the application reconnects)"
            );
            None
        }
    };
    // The frontend/backend pairs the socket-level path served at the last sync.
    let mut served: Option<Arc<Serving>> = None;
    // kube-proxy's healthCheckNodePort servers, one set per IP family.
    let proxy_healthy: health_check::ProxyHealthy = {
        let ops = ops.clone();
        Arc::new(move || ops.proxy_healthy())
    };
    let mut health_checks =
        HealthServers::new(http_server.clone(), proxy_healthy.clone(), IpFamily::IPv4);
    let mut health_checks6 = HealthServers::new(http_server.clone(), proxy_healthy, IpFamily::IPv6);
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
    // The devices `--device` resolved to (at the first attach), and the other interfaces.
    let mut attached_devices: Vec<String> = Vec::new();
    let mut ifaces = interfaces::OtherInterfaces::default();
    let mut next_scan = Instant::now();
    let mut scanned = false;
    let mut pins_lost = false;
    let mut dp_config: Option<lb_common::Config> = None;
    // The devices that run the XDP program: redirect targets of the XDP path.
    let mut xdp_ifindexes: Vec<u32> = Vec::new();
    let mut generation = 0u64;
    let mut lost_traffic = lost::LostTraffic::default();
    while !stop.load(Ordering::Relaxed) {
        ops.heartbeat();
        let now = Instant::now();
        if lost_traffic.due(now) {
            match crate::dataplane::read::counter_packets(&cfg.bpffs) {
                Ok(p) => {
                    for l in lost_traffic.observe(now, &p) {
                        tracing::warn!(
                            counter = l.counter,
                            packets = l.packets,
                            "datapath: {} {} in the last {}s ({})",
                            l.packets,
                            l.meaning,
                            lost::EVERY.as_secs(),
                            l.counter
                        );
                    }
                }
                Err(e) => log::debug!("datapath counters unreadable: {e:#}"),
            }
        }
        if let Some(l) = kernel_log.as_mut() {
            l.flush();
        }
        ops.watch_restarts(source.watch_restarts());
        let fresh = match source.poll() {
            Ok(o) => o,
            Err(e) => {
                log::error!("reading objects: {e}; keeping the last good state");
                None
            }
        };
        let again = retry && have_snapshot && fresh.is_none();
        retry = false;
        if fresh.is_some() || again {
            generation += 1;
            let started;
            if let Some(objects) = fresh {
                let seen = changes.observe(&objects);
                ops.changes_seen(seen.services, seen.endpoint_slices);
                pending_triggers.extend(seen.trigger_times);
                ops.node_eligible(health_check::node_eligible(&objects, &cfg.node));
                ops.queued();
                started = Instant::now();
                let replaced = control.update(objects);
                // Freeing a snapshot of 100,000 Services takes tens of milliseconds: not on
                // the loop's thread.
                if let Err(e) = std::thread::Builder::new()
                    .name("free-snapshot".into())
                    .spawn(move || drop(replaced))
                {
                    log::debug!("freeing the last snapshot on this thread: {e}");
                }
                have_snapshot = true;
            } else {
                ops.queued();
                started = Instant::now();
            }
            let node = control.node().clone();
            ops.topology_hints(control.port_plans());
            // Service ports the maps have no room for (oldest Services first).
            let not_fitting = control.not_fitting().to_vec();
            ops.not_fitting(&not_fitting);
            log_verdicts(
                &mut rejected_before,
                control.memo().rejected().chain(&not_fitting),
            );
            let config = datapath_config(
                &node,
                cfg.snat_ports,
                ifaces.masquerade_local,
                &xdp_ifindexes,
                control.cluster_ips(),
            );
            dp_config = Some(config);
            let synced = syncer
                .set_config(&config)
                .and_then(|_| syncer.set_config6(&desired::datapath_config6(&node)))
                .and_then(|_| control.sync(&mut syncer));
            let desired = control.desired();
            let health_ports =
                health_check::ports(control.memo().services(), &cfg.node, IpFamily::IPv4);
            let health_ports6 =
                health_check::ports(control.memo().services(), &cfg.node, IpFamily::IPv6);
            // The metric has one series per Service: the IPv4 family's count, the IPv6
            // family's for an IPv6-only Service.
            let mut local = health_ports6.clone();
            local.extend(health_ports.clone());
            ops.local_endpoints(&local);
            // Each family on its addresses NodePorts are served on (`--nodeport-addresses`);
            // when they leave none, nowhere (an empty list would mean every address of the
            // family).
            let node_ports6 = node
                .ipv6_node_port_addresses
                .as_deref()
                .unwrap_or(&node.ipv6_addresses);
            let none = Default::default();
            for (family, servers, want, addrs, narrowed) in [
                (
                    IpFamily::IPv4,
                    &mut health_checks,
                    &health_ports,
                    node.node_ports().iter().map(|a| IpAddr::V4(*a)).collect(),
                    node.node_port_addresses.is_some(),
                ),
                (
                    IpFamily::IPv6,
                    &mut health_checks6,
                    &health_ports6,
                    node_ports6
                        .iter()
                        .map(|a| IpAddr::V6(*a))
                        .collect::<Vec<_>>(),
                    node.ipv6_node_port_addresses.is_some(),
                ),
            ] {
                let serve = if addrs.is_empty() && narrowed {
                    &none
                } else {
                    want
                };
                for (port, err) in servers.update(serve, &addrs) {
                    log::warn!("healthCheckNodePort {port} ({family:?}): cannot listen: {err}");
                }
            }
            // (Copied only when they changed: at 100,000 Service ports, a copy per cycle
            // costs more than the rest of the cycle.)
            if names_seen != Some(syncer.names_version()) {
                ops.service_ports(syncer.service_ports());
                names_seen = Some(syncer.names_version());
            }
            if let (Ok(_), Some(tx)) = (&synced, &sock_term) {
                let now = Arc::new(sock_term::serving(desired));
                // A pair that left (or the first sync: backends may have left while the
                // agent was down) sends the socket walk off.
                let left = served.as_ref().is_none_or(|before| {
                    before
                        .iter()
                        .any(|p| protos.contains(&p.1) && !now.contains(p))
                });
                if left {
                    // The walker keeps only the newest; a closed channel means it stopped.
                    let _ = tx.send(now.clone());
                }
                served = Some(now);
            }
            match &synced {
                Ok(st) => {
                    ops.synced(started.elapsed(), st.writes);
                    ops.changes_applied(
                        std::time::SystemTime::now(),
                        &std::mem::take(&mut pending_triggers),
                    );
                    ops.udp_flows_flushed(st.udp_flows_flushed);
                    ops.deferred(st.deferred.len());
                    let now: Vec<String> = st
                        .deferred
                        .iter()
                        .map(|(fe, port, why)| format!("{port} frontend {}: {why}", fe.addr))
                        .collect();
                    if now != deferred_before {
                        for d in now.iter().filter(|d| !deferred_before.contains(d)) {
                            log::warn!("not programmed yet, the maps have no room: {d}");
                        }
                        deferred_before = now;
                    }
                    // Entries freed by this sync may make room: try again at once.
                    if !st.deferred.is_empty() && st.writes > 0 {
                        retry = true;
                    }
                }
                Err(_) => ops.sync_failed(),
            }
            if synced.is_ok() && !attached {
                // `--device auto` (or no --device): resolved once, now that the node's
                // addresses are known.
                let cfg = &devices::resolve(cfg, &node.addresses);
                let hooks = choose_hooks(&mut ebpf, cfg);
                attach_all(&mut ebpf, cfg, &syncer, &old_versions, &hooks)?;
                attached_devices = cfg.devices.clone();
                xdp_ifindexes = hooks
                    .iter()
                    .filter(|(_, c)| c.hook == crate::dataplane::links::Hook::Xdp)
                    .filter_map(|(d, _)| interfaces::ifindex(d))
                    .collect();
                if let Some(c) = dp_config.as_mut() {
                    desired::set_xdp_devices(c, &xdp_ifindexes);
                    syncer.set_config(c)?;
                    // Redirect targets changed: cached next hops are looked up again.
                    route_gen.bump()?;
                }
                ops.device_hooks(hooks.iter().map(|(d, c)| (d.as_str(), c.hook)));
                attached = true;
                ops.attached();
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
                    log::error!("sync generation {generation} failed: {e:#}; re-reading the maps");
                    syncer = Syncer::adopt(AyaDataplane::from_pins(&cfg.bpffs)?)?;
                    syncer.set_sizes(sizes);
                    names_seen = None;
                    retry = true;
                }
            }
        }
        if attached && Instant::now() >= next_scan {
            let first = !scanned;
            scanned = true;
            next_scan = Instant::now() + interfaces::RESCAN;
            // Other interfaces only beside north-south devices (`--device none`: socket level
            // only), and unless `--other-interfaces none`.
            let changed = if cfg.other_interfaces && !attached_devices.is_empty() {
                ifaces.refresh(&mut ebpf, &attached_devices, &cfg.bpffs)
            } else {
                false
            };
            if first {
                ifaces.remove_stale_pins(&cfg.bpffs);
            }
            if !pins_lost {
                if let Some(why) = preflight::pins_missing(&cfg.bpffs, &one_agent) {
                    log::error!(
                        "--bpffs {}: {why}: the programs are detached; /healthz and /livez \
                         answer 503 until the agent restarts (it pins everything afresh)",
                        cfg.bpffs.display()
                    );
                    ops.pins_lost();
                    pins_lost = true;
                }
            }
            ops.other_interfaces(ifaces.hooked(), ifaces.masquerade_local);
            if let (true, Some(c)) = (changed, dp_config.as_mut()) {
                desired::set_masquerade_local(c, ifaces.masquerade_local);
                if let Err(e) = syncer.set_config(c) {
                    log::error!("writing the datapath config: {e:#}");
                }
            }
        }
        std::thread::sleep(cfg.poll_interval);
    }
    log::info!("stopping; programs stay attached through their pinned links (lb-agent uninstall removes them)");
    Ok(())
}

/// Logs each rejection once, when it appears (warn, with the object's kind, namespace, name and
/// the reason as fields), and once more when it is gone (info), instead of on every sync.
fn log_verdicts<'a>(
    before: &mut BTreeSet<model::Rejected>,
    now: impl Iterator<Item = &'a model::Rejected>,
) {
    let (appeared, gone) = verdict_changes(before, now.cloned().collect());
    for r in &appeared {
        tracing::warn!(
            kind = %r.kind,
            namespace = %r.namespace,
            name = %r.name,
            reason = %r.reason,
            "rejected {} {}/{}: {}",
            r.kind,
            r.namespace,
            r.name,
            r.reason
        );
    }
    for r in &gone {
        let again = if capacity::rejected_map(r).is_some() {
            "fits in the maps again and is served".to_string()
        } else {
            format!("is no longer rejected (was: {})", r.reason)
        };
        tracing::info!(
            kind = %r.kind,
            namespace = %r.namespace,
            name = %r.name,
            "{} {}/{} {again}",
            r.kind,
            r.namespace,
            r.name
        );
    }
}

/// Rejections in `now` that were not in `before`, and those gone since; `before` becomes `now`.
fn verdict_changes(
    before: &mut BTreeSet<model::Rejected>,
    now: BTreeSet<model::Rejected>,
) -> (Vec<model::Rejected>, Vec<model::Rejected>) {
    let appeared = now.difference(before).cloned().collect();
    let gone = before.difference(&now).cloned().collect();
    *before = now;
    (appeared, gone)
}

/// Terminates sockets connected to removed backends on a thread of its own, one pass per
/// change sent (the newest when several queued), so that walking the node's namespaces never
/// delays a sync.
fn spawn_sock_term(
    term: SockTerminator,
    rev_nat: std::os::fd::OwnedFd,
    rev_nat6: std::os::fd::OwnedFd,
    protos: BTreeSet<u8>,
    proc: std::path::PathBuf,
    ops: Arc<Ops>,
    stop: Arc<AtomicBool>,
) -> mpsc::Sender<Arc<Serving>> {
    let (tx, rx) = mpsc::channel::<Arc<Serving>>();
    std::thread::Builder::new()
        .name("socket-termination".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut serving) = rx.recv_timeout(Duration::from_millis(200)) else {
                    continue;
                };
                while let Ok(newer) = rx.try_recv() {
                    serving = newer;
                }
                match term.terminate_stale(
                    rev_nat.as_fd(),
                    rev_nat6.as_fd(),
                    &serving,
                    &protos,
                    &proc,
                ) {
                    Ok(None) => {}
                    Ok(Some(out)) => {
                        ops.sockets_terminated(&out);
                        let level = if out.terminated + out.failed > 0 {
                            log::Level::Info
                        } else {
                            log::Level::Debug
                        };
                        log::log!(
                            level,
                            "sockets connected to removed backends: {} terminated, {} gone, \
                             {} refused; {} namespaces walked ({} unreachable) in {:?}",
                            out.terminated,
                            out.gone,
                            out.failed,
                            out.namespaces,
                            out.unreachable,
                            out.duration
                        );
                    }
                    Err(e) => {
                        ops.socket_termination_failed();
                        log::warn!("terminating sockets of removed backends failed: {e:#}");
                    }
                }
            }
        })
        .expect("spawning the socket termination thread");
    tx
}

/// Runs a conntrack sweep every `interval` on a thread of its own, so that a long sweep never
/// delays a sync or the metrics and health answers. A sweep that takes longer than the interval
/// is followed by the next one at once (`lb_conntrack_gc_last_duration_seconds` above
/// `lb_conntrack_gc_interval_seconds` says so). Each sweep covers both families' tiers (IPv4,
/// then IPv6); the metrics count them together.
fn spawn_ct_gc(
    tiers: CtTiers,
    tiers6: CtTiers<lb_common::Addr6>,
    interval: Duration,
    ops: Arc<Ops>,
    stop: Arc<AtomicBool>,
) {
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
                let now_s = boot_seconds();
                let swept = ct_gc::sweep(&tiers, now_s)
                    .and_then(|st| Ok(st.and(ct_gc::sweep(&tiers6, now_s)?)));
                match swept {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A rejection is reported when it appears and when it goes, never again in between.
    #[test]
    fn rejections_are_logged_when_the_verdict_changes() {
        let r = |name: &str, reason: &str| model::Rejected {
            kind: "Service".into(),
            namespace: "ns".into(),
            name: name.into(),
            reason: reason.into(),
        };
        let mut before = BTreeSet::new();
        let (new, gone) = verdict_changes(&mut before, [r("a", "x")].into());
        assert_eq!((new, gone), (vec![r("a", "x")], vec![]));
        for _ in 0..3 {
            let (new, gone) = verdict_changes(&mut before, [r("a", "x")].into());
            assert!(new.is_empty() && gone.is_empty());
        }
        // Another reason is another verdict.
        let (new, gone) = verdict_changes(&mut before, [r("a", "y"), r("b", "x")].into());
        assert_eq!(new, vec![r("a", "y"), r("b", "x")]);
        assert_eq!(gone, vec![r("a", "x")]);
        let (new, gone) = verdict_changes(&mut before, BTreeSet::new());
        assert!(new.is_empty());
        assert_eq!(gone.len(), 2);
    }
}
