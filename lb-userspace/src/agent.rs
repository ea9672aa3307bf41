//! The node agent: checks its environment, loads the kernel programs, pins maps and links under
//! `--bpffs`, and keeps the maps in sync with the manifests.
//!
//! Pinned layout under `--bpffs DIR`:
//! - `DIR/<map name>`: every map (names in `lb_common::map_name`), reused by a restarted agent;
//! - `DIR/links/<hook>`: the cgroup links (`connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`)
//!   and `DIR/links/xdp_<device>`; programs stay attached while the agent is down.
use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{
    links::{FdLink, PinnedLink},
    CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use lb_common::program_name;

use crate::{
    control::{
        desired::{self, datapath_config},
        kube_source::{KubeConfigChoice, KubeSource},
        model, plan,
        source::{ManifestsSource, Objects, Source},
    },
    dataplane::{
        migrate,
        pinned::{other_versions, AyaDataplane, OtherVersion},
        sync::Syncer,
    },
    error::{usage, UsageError},
};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub node: String,
    /// Where objects come from: a manifests file or directory, else the Kubernetes API.
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API (default: the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub devices: Vec<String>,
    pub poll_interval: Duration,
    /// SNAT port range (inclusive) for externalTrafficPolicy Cluster flows to remote backends.
    pub snat_ports: (u16, u16),
    /// Where to serve Prometheus metrics (`/metrics`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where to serve node health (`/healthz`, `/livez`).
    pub health_addr: Option<std::net::SocketAddr>,
}

fn statfs_magic(path: &Path) -> std::io::Result<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

fn effective_caps() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// Checks what `run` needs before touching anything; each failure is one line naming the fix.
pub fn preflight(cfg: &RunConfig) -> Result<()> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    // Loading needs CAP_BPF (or CAP_SYS_ADMIN); attaching to cgroups and devices CAP_NET_ADMIN.
    if !((has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN)) {
        return Err(usage(
            "missing privileges: run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN",
        ));
    }
    if let Some(m) = cfg.manifests.as_ref().filter(|m| !m.exists()) {
        return Err(usage(format!("--manifests {}: no such file or directory", m.display())));
    }
    if let Some(k) = cfg.kubeconfig.as_ref().filter(|k| !k.exists()) {
        return Err(usage(format!("--kubeconfig {}: no such file", k.display())));
    }
    match statfs_magic(&cfg.cgroup) {
        Ok(CGROUP2_SUPER_MAGIC) => {}
        Ok(_) => {
            return Err(usage(format!(
                "--cgroup {}: not a cgroup v2 directory (find the cgroup2 mount in /proc/mounts)",
                cfg.cgroup.display()
            )))
        }
        Err(e) => {
            return Err(usage(format!("--cgroup {}: {e} (create it, or point at the cgroup v2 mount)", cfg.cgroup.display())))
        }
    }
    let parent = if cfg.bpffs.exists() {
        cfg.bpffs.clone()
    } else {
        cfg.bpffs.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    match statfs_magic(&parent) {
        Ok(BPF_FS_MAGIC) => {}
        _ => {
            return Err(usage(format!(
                "--bpffs {}: not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)",
                cfg.bpffs.display()
            )))
        }
    }
    for dev in &cfg.devices {
        let c = CString::new(dev.as_str()).map_err(|_| usage(format!("--device {dev:?}: invalid name")))?;
        // SAFETY: plain libc call on a valid C string.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
            return Err(usage(format!(
                "--device {dev}: no such interface in this network namespace (see `ip link`)"
            )));
        }
    }
    Ok(())
}

/// Loads the object, reusing maps pinned under `bpffs` (pinning them on first start).
pub fn load(bpffs: &Path) -> Result<aya::Ebpf> {
    fs::create_dir_all(bpffs.join("links"))
        .with_context(|| format!("cannot create {}", bpffs.join("links").display()))?;
    let ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(bpffs)
        .load(crate::EBPF_OBJECT)
        .context("loading the eBPF object (a map pinned by another version? run `lb-agent uninstall --bpffs DIR`)")?;
    Ok(ebpf)
}

const CGROUP_HOOKS: [(&str, &str); 4] = [
    (program_name::CONNECT4, "connect4"),
    (program_name::SENDMSG4, "sendmsg4"),
    (program_name::RECVMSG4, "recvmsg4"),
    (program_name::GETPEERNAME4, "getpeername4"),
];

/// Attaches the socket-level programs to `cgroup` and pins their links. A link pinned by an
/// earlier agent is replaced only after the new one is attached, so there is no gap.
pub fn attach_cgroup(ebpf: &mut aya::Ebpf, cgroup: &Path, bpffs: &Path) -> Result<()> {
    let cg = fs::File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
    for (prog, hook) in CGROUP_HOOKS {
        let p: &mut CgroupSockAddr = ebpf
            .program_mut(prog)
            .ok_or_else(|| anyhow!("program {prog} missing from the object"))?
            .try_into()?;
        if p.fd().is_err() {
            p.load().with_context(|| format!("loading {prog} (verifier)"))?;
        }
        let id = p.attach(&cg, CgroupAttachMode::Single).with_context(|| format!("attaching {prog} to {}", cgroup.display()))?;
        let link: FdLink = p.take_link(id)?.try_into()?;
        let pin = bpffs.join("links").join(hook);
        // bpffs refuses names containing a dot.
        pin_replacing(link, &pin)?;
    }
    Ok(())
}

/// Pins `link` at `pin`, replacing (and so detaching) a link pinned there by an earlier agent
/// only once the new one is in place.
fn pin_replacing(link: FdLink, pin: &Path) -> Result<()> {
    // bpffs refuses names containing a dot.
    let name = pin.file_name().and_then(|n| n.to_str()).unwrap_or("link");
    let tmp = pin.with_file_name(format!("{name}_new"));
    let _ = fs::remove_file(&tmp);
    link.pin(&tmp).with_context(|| format!("pinning {}", tmp.display()))?;
    fs::rename(&tmp, pin).with_context(|| format!("renaming {} to {}", tmp.display(), pin.display()))?;
    Ok(())
}

/// Attaches the tc egress program (reverse translation of local backends' replies) to `device`
/// through a TCX link.
pub fn attach_tc_egress(ebpf: &mut aya::Ebpf, device: &str, bpffs: &Path) -> Result<()> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(program_name::TC_EGRESS)
        .ok_or_else(|| anyhow!("program {} missing from the object", program_name::TC_EGRESS))?
        .try_into()?;
    if p.fd().is_err() {
        p.load().context("loading the tc egress program (verifier)")?;
    }
    let id = p
        .attach(device, TcAttachType::Egress)
        .with_context(|| format!("attaching tc egress to {device}"))?;
    let link: FdLink = p
        .take_link(id)?
        .try_into()
        .map_err(|_| anyhow!("tc on {device} is not a TCX link (kernel older than 6.6)"))?;
    pin_replacing(link, &bpffs.join("links").join(format!("tc_egress_{device}")))
}

/// Attaches the XDP program to `device`, atomically replacing the program of a link pinned by an
/// earlier agent when there is one.
pub fn attach_xdp(ebpf: &mut aya::Ebpf, device: &str, bpffs: &Path) -> Result<()> {
    let p: &mut Xdp = ebpf
        .program_mut(program_name::XDP)
        .ok_or_else(|| anyhow!("program {} missing from the object", program_name::XDP))?
        .try_into()?;
    if p.fd().is_err() {
        p.load().context("loading the XDP program (verifier)")?;
    }
    let pin = bpffs.join("links").join(format!("xdp_{device}"));
    if pin.exists() {
        match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let fd: FdLink = pinned.into();
                let xdp_link = fd.try_into().context("pinned XDP link is of another type")?;
                let id = p.attach_to_link(xdp_link).context("replacing the program of the pinned XDP link")?;
                // The pin keeps the link; dropping our handle must not detach it.
                let _ = p.take_link(id)?;
                return Ok(());
            }
            Err(e) => {
                log::warn!("stale XDP link pin {}: {e}; attaching afresh", pin.display());
                let _ = fs::remove_file(&pin);
            }
        }
    }
    let id = p
        .attach(device, XdpMode::default())
        .with_context(|| format!("attaching XDP to {device} (another XDP program attached? `ip link show {device}`)"))?;
    let link: FdLink = p.take_link(id)?.try_into().map_err(|_| anyhow!("XDP on {device} is not a bpf_link (kernel too old)"))?;
    link.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// Lets the stack forward what XDP translated but could not send itself (next hop's neighbour
/// not resolved yet): such a packet carries this node's address as its source, which the stack
/// drops as martian unless `accept_local` is set. Once the neighbour is resolved, XDP sends
/// directly.
fn prepare_device(dev: &str) -> Result<()> {
    let p = format!("/proc/sys/net/ipv4/conf/{dev}/accept_local");
    if fs::read_to_string(&p).map(|v| v.trim() == "1").unwrap_or(false) {
        return Ok(());
    }
    if let Err(e) = fs::write(&p, "1") {
        // Not fatal: only the stack fallback (unresolved next hop) is affected; XDP_TX works.
        log::warn!(
            "cannot set {p} ({e}): translated packets handed to the stack before the next hop's neighbour is resolved will be dropped as martians; set it on the host"
        );
    }
    Ok(())
}

/// Loads every program into the kernel (the verifier runs here).
fn load_programs(ebpf: &mut aya::Ebpf) -> Result<()> {
    for (prog, _) in CGROUP_HOOKS {
        let p: &mut CgroupSockAddr = ebpf.program_mut(prog).ok_or_else(|| anyhow!("program {prog} missing from the object"))?.try_into()?;
        p.load().with_context(|| format!("loading {prog} (verifier)"))?;
    }
    let p: &mut Xdp = ebpf.program_mut(program_name::XDP).ok_or_else(|| anyhow!("program {} missing", program_name::XDP))?.try_into()?;
    p.load().context("loading the XDP program (verifier)")?;
    let p: &mut SchedClassifier =
        ebpf.program_mut(program_name::TC_EGRESS).ok_or_else(|| anyhow!("program {} missing", program_name::TC_EGRESS))?.try_into()?;
    p.load().context("loading the tc egress program (verifier)")?;
    Ok(())
}

/// Attaches the programs once their maps hold the first sync, converting the state of maps of
/// an older layout before and after the swap (see [`migrate`]), then drops those maps.
fn attach_all(ebpf: &mut aya::Ebpf, cfg: &RunConfig, syncer: &Syncer<AyaDataplane>, old: &[OtherVersion]) -> Result<()> {
    let rev_nat = syncer.svc_port_by_rev_nat();
    let mut seen = std::collections::HashMap::new();
    let before = migrate::copy_state(&cfg.bpffs, old, &rev_nat, &mut seen)?;
    attach_cgroup(ebpf, &cfg.cgroup, &cfg.bpffs)?;
    for dev in &cfg.devices {
        prepare_device(dev)?;
        attach_xdp(ebpf, dev, &cfg.bpffs)?;
        attach_tc_egress(ebpf, dev, &cfg.bpffs)?;
    }
    let after = migrate::copy_state(&cfg.bpffs, old, &rev_nat, &mut seen)?;
    for (b, a) in before.iter().zip(&after) {
        log::info!("migrated {} entries of {} into {} ({} more after the program swap)", b.copied, b.from, b.to, a.copied);
    }
    migrate::remove(old)?;
    log::info!(
        "attached to cgroup {} and devices {:?}; maps pinned under {}",
        cfg.cgroup.display(),
        cfg.devices,
        cfg.bpffs.display()
    );
    Ok(())
}

/// `lb-agent run`.
pub fn run(cfg: &RunConfig, stop: Arc<AtomicBool>) -> Result<()> {
    preflight(cfg)?;
    let mut source: Box<dyn Source> = match (&cfg.manifests, &cfg.kubeconfig) {
        (Some(m), _) => Box::new(ManifestsSource::new(m)),
        (None, Some(k)) => Box::new(KubeSource::new(KubeConfigChoice::Kubeconfig(k.clone()), &cfg.node).map_err(|e| usage(format!("{e:#}")))?),
        (None, None) => Box::new(KubeSource::new(KubeConfigChoice::InCluster, &cfg.node).map_err(|e| usage(format!("{e:#}")))?),
    };
    let ops = Arc::new(crate::ops::Ops::new(cfg.bpffs.clone()));
    for (flag, addr) in [("--metrics-addr", cfg.metrics_addr), ("--health-addr", cfg.health_addr)] {
        let Some(addr) = addr else { continue };
        let l = std::net::TcpListener::bind(addr).map_err(|e| usage(format!("{flag} {addr}: {e}")))?;
        let (ops, stop) = (ops.clone(), stop.clone());
        std::thread::spawn(move || crate::http::serve(l, stop, |path| ops.route(path)));
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
    let mut health = crate::health::HealthServers::new();
    // Maps of another layout version (an upgrade): replaced once the new ones are filled.
    let old_versions = other_versions(&cfg.bpffs);
    for o in &old_versions {
        log::info!("{} was pinned by an agent of another layout version: {} replaces it", o.name, o.current);
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
                    log::warn!("rejected {} {}/{}: {}", r.kind, r.namespace, r.name, r.reason);
                }
                let p = plan::plan(&m, &cfg.node);
                let desired = desired::desired(&p);
                let dp_config = datapath_config(&p.node, cfg.snat_ports);
                let synced = syncer.set_config(&dp_config).and_then(|_| syncer.sync(&desired));
                health.proxy_healthy.store(synced.is_ok(), Ordering::Relaxed);
                let health_ports = crate::health::desired(&m, &cfg.node);
                ops.local_endpoints(&health_ports);
                for (port, err) in health.update(&health_ports, &p.node.addresses) {
                    log::error!("healthCheckNodePort {port}: cannot listen: {err}");
                }
                ops.service_ports(syncer.service_ports());
                match &synced {
                    Ok(st) => ops.synced(started.elapsed(), st.writes),
                    Err(_) => ops.sync_failed(),
                }
                if synced.is_ok() && !attached {
                    attach_all(&mut ebpf, cfg, &syncer, &old_versions)?;
                    attached = true;
                }
                match synced {
                    Ok(st) => log::info!(
                        "sync generation {generation}: {} frontends, {} map writes in {:?}",
                        desired.len(),
                        st.writes,
                        started.elapsed()
                    ),
                    Err(e) => {
                        log::error!("sync generation {generation} failed: {e:#}; re-reading the maps");
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

/// `lb-agent uninstall`: removes every link (detaching the programs) and map pinned under `bpffs`.
pub fn uninstall(bpffs: &Path) -> Result<Vec<PathBuf>> {
    if !bpffs.exists() {
        bail!(UsageError(format!("--bpffs {}: nothing pinned there", bpffs.display())));
    }
    let mut removed = Vec::new();
    let links = bpffs.join("links");
    if links.is_dir() {
        for e in fs::read_dir(&links)? {
            let p = e?.path();
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(p);
        }
        fs::remove_dir(&links)?;
    }
    let others = other_versions(bpffs).into_iter().map(|o| o.path);
    for p in lb_common::map_name::ALL.iter().map(|n| bpffs.join(n)).chain(others) {
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(p);
        }
    }
    // Remove the directory itself when nothing else lives there.
    let _ = fs::remove_dir(bpffs);
    Ok(removed)
}
