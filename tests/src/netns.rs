//! Small helpers to run commands and processes inside network namespaces and cgroups without
//! `ip netns exec` (which remounts /sys and would hide /sys/fs/bpf and the cgroup mounts).
use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// Runs a command to completion; fails with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n NS ARGS...`
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    run("ip", &a)
}

/// Runs a one-shot setup command inside a namespace (`ip netns exec` is fine for these).
pub fn exec(ns: &str, args: &[&str]) -> Result<String> {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    run("ip", &a)
}

/// A command that will run inside network namespace `ns` and, when given, cgroup `cgroup`.
pub fn command_in(ns: &str, cgroup: Option<&Path>, program: &Path) -> Command {
    let netns_path = PathBuf::from("/run/netns").join(ns);
    let procs = cgroup.map(|c| c.join("cgroup.procs"));
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe calls (open, setns, write, close) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                join_cgroup(procs)?;
            }
            enter_netns(&netns_path)
        });
    }
    cmd
}

fn c_path(p: &Path) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

fn enter_netns(path: &Path) -> std::io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: plain syscalls on a valid path.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let r = libc::setns(fd, libc::CLONE_NEWNET);
        libc::close(fd);
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn join_cgroup(procs: &Path) -> std::io::Result<()> {
    let c = c_path(procs)?;
    // SAFETY: plain syscalls on a valid path; "0" moves the calling process.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let r = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        if r != 1 {
            return Err(std::io::Error::last_os_error());
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
        (ty == fstype).then(|| PathBuf::from(dir))
    })
}
