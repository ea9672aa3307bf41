//! Loading the kernel programs and attaching them (cgroup socket hooks; on the devices XDP or tc
//! ingress for north-south traffic, as [`super::hook`] chooses, and tc egress) through links
//! pinned under `--bpffs DIR/links`, so they stay attached while the agent is down and a new
//! agent replaces them without a gap; and `lb-agent uninstall`.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::ProgramArray;
use aya::programs::{
    links::{FdLink, PinnedLink},
    CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use lb_common::{map_name, program_name};

use super::{
    config::RunConfig,
    hook::{self, Choice, Hook},
};
use crate::{
    dataplane::{
        capacity::MapSizes,
        links::{iface_pins, is_ours, tc_egress_pin, tc_ingress_pin, xdp_pin, CGROUP_LINKS},
        migrate,
        pinned::{other_versions, AyaDataplane, OtherVersion},
        sync::Syncer,
    },
    error::UsageError,
};

/// Loads the object, reusing maps pinned under `bpffs` (pinning them on first start, of the
/// sizes `sizes` gives).
pub fn load(bpffs: &Path, sizes: &MapSizes) -> Result<aya::Ebpf> {
    fs::create_dir_all(bpffs.join("links"))
        .with_context(|| format!("cannot create {}", bpffs.join("links").display()))?;
    let mut loader = aya::EbpfLoader::new();
    loader.default_map_pin_directory(bpffs);
    for (name, entries) in sizes.per_map() {
        loader.map_max_entries(name, entries);
    }
    let ebpf = loader
        .load(crate::EBPF_OBJECT)
        .context("loading the eBPF object (a map pinned by another version? run `lb-agent uninstall --bpffs DIR`)")?;
    Ok(ebpf)
}

const CGROUP_HOOKS: [(&str, &str); 8] = [
    (program_name::CONNECT4, CGROUP_LINKS[0]),
    (program_name::SENDMSG4, CGROUP_LINKS[1]),
    (program_name::RECVMSG4, CGROUP_LINKS[2]),
    (program_name::GETPEERNAME4, CGROUP_LINKS[3]),
    (program_name::CONNECT6, CGROUP_LINKS[4]),
    (program_name::SENDMSG6, CGROUP_LINKS[5]),
    (program_name::RECVMSG6, CGROUP_LINKS[6]),
    (program_name::GETPEERNAME6, CGROUP_LINKS[7]),
];

/// Attaches the socket-level programs (every hook of [`CGROUP_LINKS`]) to `cgroup` and pins their
/// links. A link pinned by an earlier agent is replaced only after the new one is attached, so
/// there is no gap; a hook an earlier agent did not attach (an older version) is attached anew.
pub fn attach_cgroup(ebpf: &mut aya::Ebpf, cgroup: &Path, bpffs: &Path) -> Result<()> {
    let cg = fs::File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
    for (prog, hook) in CGROUP_HOOKS {
        let p: &mut CgroupSockAddr = ebpf
            .program_mut(prog)
            .ok_or_else(|| anyhow!("program {prog} missing from the object"))?
            .try_into()?;
        if p.fd().is_err() {
            p.load()
                .with_context(|| format!("loading {prog} (verifier)"))?;
        }
        let id = p
            .attach(&cg, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {prog} to {}", cgroup.display()))?;
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
    link.pin(&tmp)
        .with_context(|| format!("pinning {}", tmp.display()))?;
    fs::rename(&tmp, pin)
        .with_context(|| format!("renaming {} to {}", tmp.display(), pin.display()))?;
    Ok(())
}

/// Attaches the tc egress program (reverse translation of local backends' replies) to `device`
/// through a TCX link.
pub fn attach_tc_egress(ebpf: &mut aya::Ebpf, device: &str, bpffs: &Path) -> Result<()> {
    attach_tcx(
        ebpf,
        program_name::TC_EGRESS,
        TcAttachType::Egress,
        device,
        &bpffs.join("links").join(tc_egress_pin(device)),
    )
}

/// Attaches the tc ingress program (north-south translation where XDP cannot deliver) to
/// `device` through a TCX link pinned as `links/tc_ingress_<device>`, replacing a link pinned
/// there by an earlier agent only once the new one is attached.
pub fn attach_tc_ingress(ebpf: &mut aya::Ebpf, device: &str, bpffs: &Path) -> Result<()> {
    attach_tcx(
        ebpf,
        program_name::TC_INGRESS,
        TcAttachType::Ingress,
        device,
        &bpffs.join("links").join(tc_ingress_pin(device)),
    )
}

/// Attaches the tc ingress (north-south translation) and tc egress (replies of local backends)
/// programs to one of the node's other interfaces (see [`super::interfaces`]), pinned as
/// `links/iface_in_<iface>` and `links/iface_out_<iface>`.
pub fn attach_other_interface(ebpf: &mut aya::Ebpf, iface: &str, bpffs: &Path) -> Result<()> {
    // Not fatal here: only the stack fallback (unresolved next hop) of this interface suffers.
    if let Err(e) = ensure_accept_local(Path::new(PROC_SYS), iface) {
        log::warn!("interface {iface}: {e:#}");
    }
    let [pin_in, pin_out] = iface_pins(iface);
    let links = bpffs.join("links");
    attach_tcx(
        ebpf,
        program_name::TC_INGRESS,
        TcAttachType::Ingress,
        iface,
        &links.join(pin_in),
    )?;
    attach_tcx(
        ebpf,
        program_name::TC_EGRESS,
        TcAttachType::Egress,
        iface,
        &links.join(pin_out),
    )
}

/// Removes an other interface's links (detaching its programs); missing pins are no error.
pub fn detach_other_interface(iface: &str, bpffs: &Path) -> Result<()> {
    for pin in iface_pins(iface) {
        let path = bpffs.join("links").join(pin);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    Ok(())
}

/// Attaches the tc program `name` to `device` (`kind`: ingress or egress) through a TCX link,
/// pinned at `pin` once attached (replacing an earlier agent's link there).
fn attach_tcx(
    ebpf: &mut aya::Ebpf,
    name: &str,
    kind: TcAttachType,
    device: &str,
    pin: &Path,
) -> Result<()> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()?;
    if p.fd().is_err() {
        p.load()
            .with_context(|| format!("loading {name} (verifier)"))?;
    }
    let id = p
        .attach(device, kind)
        .with_context(|| format!("attaching {name} to {device} ({kind:?})"))?;
    let link: FdLink = p
        .take_link(id)?
        .try_into()
        .map_err(|_| anyhow!("tc on {device} is not a TCX link (kernel older than 6.6)"))?;
    pin_replacing(link, pin)
}

/// Whether a native (driver-mode) XDP attach works on `device`: attaches the XDP program in
/// driver mode and detaches it at once.
fn probe_native_xdp(ebpf: &mut aya::Ebpf, device: &str) -> Result<()> {
    let p: &mut Xdp = ebpf
        .program_mut(program_name::XDP)
        .ok_or_else(|| anyhow!("program {} missing from the object", program_name::XDP))?
        .try_into()?;
    if p.fd().is_err() {
        p.load().context("loading the XDP program (verifier)")?;
    }
    let id = p.attach(device, XdpMode::Driver)?;
    p.detach(id)?;
    Ok(())
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
    let pin = bpffs.join("links").join(xdp_pin(device));
    if pin.exists() {
        match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let fd: FdLink = pinned.into();
                let xdp_link = fd
                    .try_into()
                    .context("pinned XDP link is of another type")?;
                let id = p
                    .attach_to_link(xdp_link)
                    .context("replacing the program of the pinned XDP link")?;
                // The pin keeps the link; dropping our handle must not detach it.
                let _ = p.take_link(id)?;
                return Ok(());
            }
            Err(e) => {
                log::warn!(
                    "stale XDP link pin {}: {e}; attaching afresh",
                    pin.display()
                );
                let _ = fs::remove_file(&pin);
            }
        }
    }
    let id = p.attach(device, XdpMode::default()).with_context(|| {
        format!("attaching XDP to {device} (another XDP program attached? `ip link show {device}`)")
    })?;
    let link: FdLink = p
        .take_link(id)?
        .try_into()
        .map_err(|_| anyhow!("XDP on {device} is not a bpf_link (kernel too old)"))?;
    link.pin(&pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// Where the kernel's sysctls are.
pub const PROC_SYS: &str = "/proc/sys";

/// Lets the stack forward what XDP translated but could not send itself (next hop's neighbour
/// not resolved yet): such a packet carries this node's address as its source, which the stack
/// drops as martian unless `accept_local` is in effect on the device. Once the neighbour is
/// resolved, XDP sends directly.
///
/// The kernel ORs `net.ipv4.conf.all.accept_local` with the device's own value
/// (`IN_DEV_ACCEPT_LOCAL` is `IN_DEV_ORCONF`), so either being 1 is enough, and nothing is
/// written then: the DaemonSet's init container (`lb-agent prepare-node`) sets `all`, and the
/// agent runs with a read-only `/proc/sys`. Otherwise the device's value is written; when that
/// fails the error is one line naming the fix.
pub fn ensure_accept_local(proc_sys: &Path, dev: &str) -> Result<()> {
    let conf = proc_sys.join("net/ipv4/conf");
    let on = |name: &str| -> Result<bool> {
        let p = conf.join(name).join("accept_local");
        let v = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(v.trim() == "1")
    };
    if on("all")? || on(dev)? {
        return Ok(());
    }
    let p = conf.join(dev).join("accept_local");
    fs::write(&p, "1").map_err(|e| {
        anyhow!(
            "net.ipv4.conf.{dev}.accept_local and net.ipv4.conf.all.accept_local are 0 and \
             {} cannot be written ({e}): set net.ipv4.conf.all.accept_local=1 on the node \
             (`lb-agent prepare-node`, the DaemonSet's init container, or `sysctl -w \
             net.ipv4.conf.all.accept_local=1`)",
            p.display()
        )
    })
}

/// `lb-agent prepare-node`: sets what the agent needs of the node's sysctls before it starts,
/// so the agent itself can run with a read-only `/proc/sys`: `net.ipv4.conf.all.accept_local=1`
/// (see [`ensure_accept_local`]). Returns the settings it changed (none when already set).
pub fn prepare_node(proc_sys: &Path) -> Result<Vec<String>> {
    let p = proc_sys.join("net/ipv4/conf/all/accept_local");
    let v = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    if v.trim() == "1" {
        return Ok(Vec::new());
    }
    fs::write(&p, "1").with_context(|| {
        format!(
            "writing {} (the container needs a writable /proc/sys: privileged)",
            p.display()
        )
    })?;
    Ok(vec![format!(
        "net.ipv4.conf.all.accept_local = 1 (was {})",
        v.trim()
    )])
}

/// Loads every program into the kernel (the verifier runs here).
pub(super) fn load_programs(ebpf: &mut aya::Ebpf) -> Result<()> {
    for (prog, _) in CGROUP_HOOKS {
        let p: &mut CgroupSockAddr = ebpf
            .program_mut(prog)
            .ok_or_else(|| anyhow!("program {prog} missing from the object"))?
            .try_into()?;
        p.load()
            .with_context(|| format!("loading {prog} (verifier)"))?;
    }
    let p: &mut Xdp = ebpf
        .program_mut(program_name::XDP)
        .ok_or_else(|| anyhow!("program {} missing", program_name::XDP))?
        .try_into()?;
    p.load().context("loading the XDP program (verifier)")?;
    for (name, what) in [
        (program_name::TC_EGRESS, "tc egress"),
        (program_name::TC_INGRESS, "tc ingress"),
    ] {
        let p: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?;
        p.load()
            .with_context(|| format!("loading the {what} program (verifier)"))?;
    }
    // Verified now; handed IPv6 frames at attach (see `install_ipv6_north_south`).
    load_ipv6_programs(ebpf).map(drop)
}

/// Loads the IPv6 programs (`lb_xdp6`, `lb_tc_ingress6`, `lb_tc_egress6`) when not loaded yet,
/// and returns a descriptor of each, in the order of their program arrays ([`IPV6_ARRAYS`]).
fn load_ipv6_programs(ebpf: &mut aya::Ebpf) -> Result<[aya::programs::ProgramFd; 3]> {
    let xdp6 = {
        let p: &mut Xdp = ebpf
            .program_mut(program_name::XDP6)
            .ok_or_else(|| anyhow!("program {} missing", program_name::XDP6))?
            .try_into()?;
        if p.fd().is_err() {
            p.load()
                .context("loading the IPv6 XDP program (verifier)")?;
        }
        p.fd()?.try_clone()?
    };
    let tc6 = load_classifier(ebpf, program_name::TC_INGRESS6)?;
    let tce6 = load_classifier(ebpf, program_name::TC_EGRESS6)?;
    Ok([xdp6, tc6, tce6])
}

/// The program arrays through which `lb_xdp`, `lb_tc_ingress` and `lb_tc_egress` tail-call the
/// IPv6 programs for IPv6 frames.
const IPV6_ARRAYS: [&str; 3] = [map_name::XDP6_PROG, map_name::TC6_PROG, map_name::TCE6_PROG];

/// Puts the IPv6 programs (`lb_xdp6`, `lb_tc_ingress6`, `lb_tc_egress6`; loaded here when not
/// yet) in the program arrays through which `lb_xdp`, `lb_tc_ingress` and `lb_tc_egress`
/// tail-call them for IPv6 frames ([`IPV6_ARRAYS`]; pinned, so the programs stay in place while
/// the agent is down, and a new agent's replace the old ones in one write).
///
/// The arrays are shared with the programs already attached: from this write on, their IPv6
/// frames run the new programs, on this agent's maps. So the agent writes them when it attaches
/// (its maps hold the first sync), not when it loads: after an upgrade that renamed a map
/// (`lb_svc_v2` -> `lb_svc_v3`), the old `lb_xdp` would otherwise hand IPv6 frames to an
/// `lb_xdp6` whose frontends map is still empty until the first sync.
pub fn install_ipv6_north_south(ebpf: &mut aya::Ebpf) -> Result<()> {
    let fds = load_ipv6_programs(ebpf)?;
    for (map, fd) in IPV6_ARRAYS.into_iter().zip(&fds) {
        let mut array: ProgramArray<_> = ebpf
            .map_mut(map)
            .ok_or_else(|| anyhow!("map {map} missing from the object"))?
            .try_into()?;
        array
            .set(0, fd, 0)
            .with_context(|| format!("setting the IPv6 program in {map}"))?;
    }
    Ok(())
}

/// Loads the tc program `name` (when not loaded yet) and returns a descriptor of it.
fn load_classifier(ebpf: &mut aya::Ebpf, name: &str) -> Result<aya::programs::ProgramFd> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing"))?
        .try_into()?;
    if p.fd().is_err() {
        p.load()
            .with_context(|| format!("loading {name} (verifier)"))?;
    }
    Ok(p.fd()?.try_clone()?)
}

/// Picks the north-south hook of every `--device` (see [`hook`]) and logs each choice with its
/// reason.
pub(super) fn choose_hooks(ebpf: &mut aya::Ebpf, cfg: &RunConfig) -> Vec<(String, Choice)> {
    cfg.devices
        .iter()
        .map(|dev| {
            let c = hook::choose(dev, cfg.north_south, |d| probe_native_xdp(ebpf, d));
            log::info!(
                "device {dev}: north-south hook {} (--north-south {}: {})",
                c.hook,
                cfg.north_south,
                c.reason
            );
            (dev.clone(), c)
        })
        .collect()
}

/// Attaches `hook` to `device`, then removes the link of the other kind a previous agent pinned
/// there (the choice changed across a restart): the new hook is in place before the old one
/// goes, so there is no gap.
fn attach_north_south(ebpf: &mut aya::Ebpf, device: &str, hook: Hook, bpffs: &Path) -> Result<()> {
    match hook {
        Hook::Xdp => attach_xdp(ebpf, device, bpffs)?,
        Hook::Tc => attach_tc_ingress(ebpf, device, bpffs)?,
    }
    let old = bpffs.join("links").join(hook.other().pin_name(device));
    if old.exists() {
        fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        log::info!(
            "device {device}: {} replaced the {} link of an earlier agent",
            hook,
            hook.other()
        );
    }
    Ok(())
}

/// Attaches the programs once their maps hold the first sync, converting the state of maps of
/// an older layout before and after the swap (see [`migrate`]), then drops those maps.
pub(super) fn attach_all(
    ebpf: &mut aya::Ebpf,
    cfg: &RunConfig,
    syncer: &Syncer<AyaDataplane>,
    old: &[OtherVersion],
    hooks: &[(String, Choice)],
) -> Result<()> {
    let rev_nat = syncer.svc_port_by_rev_nat();
    let mut seen = std::collections::HashMap::new();
    let before = migrate::copy_state(&cfg.bpffs, old, &rev_nat, &mut seen)?;
    // The IPv6 programs first: the old north-south programs hand them IPv6 frames from now on.
    install_ipv6_north_south(ebpf)?;
    attach_cgroup(ebpf, &cfg.cgroup, &cfg.bpffs)?;
    for (dev, choice) in hooks {
        ensure_accept_local(Path::new(PROC_SYS), dev)?;
        attach_north_south(ebpf, dev, choice.hook, &cfg.bpffs)?;
        attach_tc_egress(ebpf, dev, &cfg.bpffs)?;
    }
    let after = migrate::copy_state(&cfg.bpffs, old, &rev_nat, &mut seen)?;
    for (b, a) in before.iter().zip(&after) {
        log::info!(
            "migrated {} entries of {} into {} ({} more after the program swap)",
            b.copied,
            b.from,
            b.to,
            a.copied
        );
    }
    migrate::remove(old)?;
    log::info!(
        "attached to cgroup {} and devices {:?}; maps pinned under {}",
        cfg.cgroup.display(),
        hooks
            .iter()
            .map(|(d, c)| format!("{d} ({})", c.hook))
            .collect::<Vec<_>>(),
        cfg.bpffs.display()
    );
    Ok(())
}

/// `lb-agent uninstall`: removes every link an agent pins under `bpffs` (detaching the programs:
/// cgroup hooks, XDP and tc ingress links of either kind, tc egress) and every map of ours (the
/// names of `lb_common::map_name`, at this layout version or another). Other pins in the
/// directory stay, and so does the directory when they do.
pub fn uninstall(bpffs: &Path) -> Result<Vec<PathBuf>> {
    if !bpffs.exists() {
        bail!(UsageError(format!(
            "--bpffs {}: nothing pinned there",
            bpffs.display()
        )));
    }
    let mut removed = Vec::new();
    let links = bpffs.join("links");
    if links.is_dir() {
        // Only the links an agent pins (names it knows); anything else stays, with the
        // directory.
        for e in fs::read_dir(&links)? {
            let e = e?;
            let name = e.file_name();
            if !name.to_str().is_some_and(is_ours) {
                continue;
            }
            let p = e.path();
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(p);
        }
        let _ = fs::remove_dir(&links);
    }
    let others = other_versions(bpffs).into_iter().map(|o| o.path);
    for p in lb_common::map_name::ALL
        .iter()
        .map(|n| bpffs.join(n))
        .chain(others)
    {
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(p);
        }
    }
    // Remove the directory itself when nothing else lives there.
    let _ = fs::remove_dir(bpffs);
    Ok(removed)
}
