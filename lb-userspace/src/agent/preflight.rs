//! Checks of the environment before `lb-agent run` touches anything (privileges, the cgroup v2
//! directory, the bpf filesystem, the devices, the paths it was given), each failure one line
//! naming the fix; and where a filesystem type is mounted.
use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

use anyhow::Result;

use super::config::RunConfig;
use crate::error::usage;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
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
    for dev in &cfg.devices {
        let c = CString::new(dev.as_str())
            .map_err(|_| usage(format!("--device {dev:?}: invalid name")))?;
        // SAFETY: plain libc call on a valid C string.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
            return Err(usage(format!(
                "--device {dev}: no such interface in this network namespace (see `ip link`)"
            )));
        }
    }
    Ok(())
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
    use super::unescape_mount_path;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/sys/fs/bpf"), "/sys/fs/bpf");
        assert_eq!(unescape_mount_path(r"/x\\"), r"/x\\");
    }
}
