//! Checks of the environment before `lb-agent run` touches anything (privileges, the cgroup v2
//! directory, the bpf filesystem, the devices, the paths it was given), each failure one line
//! naming the fix; and where a filesystem type is mounted.
use std::{
    ffi::CString,
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::Result;

use super::config::RunConfig;
use crate::error::usage;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const PROC_SUPER_MAGIC: i64 = 0x9fa0;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// The filesystem type (`f_type`) of the filesystem `path` is on.
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

/// This process's effective capabilities (a bit per capability).
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
    let ephemeral = fs::read_to_string(EPHEMERAL_PORTS)
        .ok()
        .and_then(|t| parse_port_range(&t));
    if let Some(line) = snat_ports_problem(cfg.snat_ports, ephemeral, cfg.nodeport_range) {
        return Err(usage(line));
    }
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    // Loading needs CAP_BPF (or CAP_SYS_ADMIN); attaching to cgroups and devices CAP_NET_ADMIN.
    if !((has(CAP_BPF) || has(CAP_SYS_ADMIN)) && has(CAP_NET_ADMIN)) {
        return Err(usage(
            "missing privileges: run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN",
        ));
    }
    if let Some(m) = cfg.manifests.as_ref().filter(|m| !m.exists()) {
        return Err(usage(format!(
            "--manifests {}: no such file or directory",
            m.display()
        )));
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
            return Err(usage(format!(
                "--cgroup {}: {e} (create it, or point at the cgroup v2 mount)",
                cfg.cgroup.display()
            )))
        }
    }
    if statfs_magic(&cfg.proc).ok() != Some(PROC_SUPER_MAGIC) {
        return Err(usage(format!(
            "--proc {}: not a proc filesystem (mount the node's /proc there, or use --proc=/proc)",
            cfg.proc.display()
        )));
    }
    let parent = if cfg.bpffs.exists() {
        cfg.bpffs.clone()
    } else {
        cfg.bpffs
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
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
    if cfg.devices.iter().any(|d| d == super::devices::NONE) && cfg.devices.len() > 1 {
        return Err(usage(
            "--device none: given with other devices (none means no north-south device)",
        ));
    }
    for dev in cfg
        .devices
        .iter()
        .filter(|d| *d != super::devices::AUTO && *d != super::devices::NONE)
    {
        let c = CString::new(dev.as_str())
            .map_err(|_| usage(format!("--device {dev:?}: invalid name")))?;
        // SAFETY: plain libc call on a valid C string.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
            return Err(usage(format!(
                "--device {dev}: no such interface in this network namespace (see `ip link`)"
            )));
        }
        // Before anything is loaded: a read-only /proc/sys without accept_local in effect is
        // one line naming the fix, not a failure after the first sync.
        super::attach::ensure_accept_local(Path::new(super::attach::PROC_SYS), dev)
            .map_err(|e| usage(format!("--device {dev}: {e:#}")))?;
    }
    Ok(())
}

/// One agent per pin directory: creates `bpffs` if needed and takes an exclusive lock on it
/// (`flock`), held by the returned fd. A second agent on the same directory gets one line and
/// exit code 2 before it touches anything; the first keeps serving.
pub fn lock_pin_dir(bpffs: &Path) -> Result<fs::File> {
    fs::create_dir_all(bpffs).map_err(|e| usage(format!("--bpffs {}: {e}", bpffs.display())))?;
    let dir =
        fs::File::open(bpffs).map_err(|e| usage(format!("--bpffs {}: {e}", bpffs.display())))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(usage(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            format!(
                "--bpffs {}: another lb-agent is running on this pin directory (one agent per directory: stop it, or give this one its own --bpffs)",
                bpffs.display()
            )
        } else {
            format!("--bpffs {}: cannot lock it: {e}", bpffs.display())
        }));
    }
    Ok(dir)
}

/// Why the pin directory no longer holds what this agent pinned there (`lock` is the directory
/// as [`lock_pin_dir`] opened it); `None` while it does. Removed pins detach the programs (the
/// pinned links were their only holders), so this is checked every few seconds.
pub fn pins_missing(bpffs: &Path, lock: &fs::File) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let now = match fs::metadata(bpffs) {
        Ok(m) => m,
        Err(e) => return Some(format!("the pin directory is gone ({e})")),
    };
    if let Ok(held) = lock.metadata() {
        if (now.dev(), now.ino()) != (held.dev(), held.ino()) {
            return Some("the pin directory was removed and created again".into());
        }
    }
    for name in lb_common::map_name::ALL {
        if !bpffs.join(name).exists() {
            return Some(format!("the map pin {name} is gone"));
        }
    }
    for name in crate::dataplane::links::CGROUP_LINKS {
        if !bpffs.join("links").join(name).exists() {
            return Some(format!("the link pin links/{name} is gone"));
        }
    }
    None
}

/// The node's ephemeral ports (of this network namespace; the agent runs in the host's).
const EPHEMERAL_PORTS: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// `ip_local_port_range`'s text ("32768\t60999\n") as a range.
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut f = text.split_whitespace();
    let lo = f.next()?.parse().ok()?;
    let hi = f.next()?.parse().ok()?;
    (f.next().is_none() && lo <= hi).then_some((lo, hi))
}

fn overlaps(a: (u16, u16), b: (u16, u16)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// The one line refusing `--snat-ports` when it overlaps the node's ephemeral ports (a SNAT
/// flow would take a port a local socket may use, and replies to either would be mistaken for
/// the other) or the NodePort range (the datapath would take replies for NodePort traffic). The
/// suggested range is the default, unless that overlaps too.
pub fn snat_ports_problem(
    snat: (u16, u16),
    ephemeral: Option<(u16, u16)>,
    nodeports: (u16, u16),
) -> Option<String> {
    let fmt = |r: (u16, u16)| format!("{}-{}", r.0, r.1);
    let default = (1024, 29999);
    let suggestion =
        if ephemeral.is_none_or(|e| !overlaps(default, e)) && !overlaps(default, nodeports) {
            format!(", e.g. --snat-ports {}", fmt(default))
        } else {
            String::new()
        };
    if let Some(e) = ephemeral.filter(|e| overlaps(snat, *e)) {
        return Some(format!(
            "--snat-ports {} overlaps the node's ephemeral ports {} (net.ipv4.ip_local_port_range): pick a range outside it{suggestion}",
            fmt(snat),
            fmt(e)
        ));
    }
    if overlaps(snat, nodeports) {
        return Some(format!(
            "--snat-ports {} overlaps the NodePort range {} (--nodeport-range): pick a range outside it{suggestion}",
            fmt(snat),
            fmt(nodeports)
        ));
    }
    None
}

/// The first mount point of a filesystem type in /proc/mounts (`bpf`, `cgroup2`, ...).
pub fn mount_point(fstype: &str) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == fstype).then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts writes space, tab, newline and backslash in paths as octal escapes (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::{parse_port_range, snat_ports_problem, unescape_mount_path};

    #[test]
    fn ephemeral_port_range_is_parsed() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("a b"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
    }

    #[test]
    fn snat_ports_must_avoid_ephemeral_and_nodeport_ranges() {
        let linux = Some((32768, 60999));
        let np = (30000, 32767);
        // The default fits Linux's default ranges and Kubernetes'.
        assert_eq!(snat_ports_problem((1024, 29999), linux, np), None);
        assert_eq!(snat_ports_problem((61000, 65535), linux, np), None);
        assert_eq!(
            snat_ports_problem((61000, 65535), Some((32768, 65000)), np).unwrap(),
            "--snat-ports 61000-65535 overlaps the node's ephemeral ports 32768-65000 \
             (net.ipv4.ip_local_port_range): pick a range outside it, e.g. --snat-ports 1024-29999"
        );
        assert_eq!(
            snat_ports_problem((20000, 30000), linux, np).unwrap(),
            "--snat-ports 20000-30000 overlaps the NodePort range 30000-32767 (--nodeport-range): \
             pick a range outside it, e.g. --snat-ports 1024-29999"
        );
        // Edges: touching is not overlapping.
        assert_eq!(
            snat_ports_problem((1024, 29999), Some((30000, 60999)), np),
            None
        );
        assert!(snat_ports_problem((1024, 32768), linux, (40000, 40001)).is_some());
        // No suggestion when the default itself would not fit.
        let line = snat_ports_problem((2000, 3000), Some((1024, 65535)), np).unwrap();
        assert!(line.ends_with("pick a range outside it"), "{line}");
        // Unknown ephemeral range (no /proc): only the NodePort range is checked.
        assert_eq!(snat_ports_problem((40000, 50000), None, np), None);
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/sys/fs/bpf"), "/sys/fs/bpf");
        assert_eq!(unescape_mount_path(r"/x\\"), r"/x\\");
    }
}
