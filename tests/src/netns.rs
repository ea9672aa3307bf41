//! Low-level helpers: run setup commands, spawn processes inside a network namespace and a cgroup,
//! find mounts, find and kill the processes of a namespace.
//!
//! Long-lived processes are never started with `ip netns exec`: it unshares the mount namespace
//! and remounts /sys for the new network namespace, which hides /sys/fs/bpf and the cgroup
//! mounts from the child. [`command_in`] instead enters the namespace with `setns()` between
//! fork and exec, so the child keeps the host's mounts. A consequence to keep in mind: such a
//! child sees the *host's* /sys/class/net; use netlink / ioctls (`if_nametoindex`) for interface
//! lookups, which follow the network namespace.
use std::{
    ffi::{CString, OsStr},
    io::{self, Write},
    os::unix::{
        fs::MetadataExt,
        process::{CommandExt, ExitStatusExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Where `ip netns add NAME` bind-mounts a namespace.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Runs a command to completion (stdin closed); fails with its stderr. Returns its stdout.
pub fn run_command(cmd: &mut Command) -> Result<String> {
    let desc = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{desc}`"))?;
    if !out.status.success() {
        bail!(
            "`{desc}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args...` on the host; fails with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    run_command(Command::new(program).args(args))
}

/// A network namespace a kernel test creates for itself (`ip netns add`, loopback up), deleted
/// when dropped. Its file is `/run/netns/NAME`.
pub struct ScratchNetns {
    pub name: String,
}

impl ScratchNetns {
    /// `prefix` + this process's id (unique among concurrent test binaries).
    pub fn new(prefix: &str) -> Result<Self> {
        let name = format!("{prefix}{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ip(&ns.name, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `ip -n NS ARGS...`
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.arg("-n").arg(ns).args(args);
    run_command(&mut cmd)
}

/// Runs a one-shot command (sysctl, ethtool, ...) inside network namespace `ns`, to completion.
pub fn exec_in(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = command_in(ns, None, program);
    cmd.args(args);
    run_command(&mut cmd)
}

/// `exec(ns, ["sysctl", "-qw", ...])`: [`exec_in`] with the program as the first argument.
pub fn exec(ns: &str, argv: &[&str]) -> Result<String> {
    let (program, args) = argv.split_first().context("exec: empty command")?;
    exec_in(ns, program, args)
}

/// `program` prepared to run inside network namespace `ns` (a name under /run/netns) and, when
/// given, inside cgroup v2 directory `cgroup`; add arguments with `.args()`. Nothing else about
/// the child changes: it keeps the caller's mount namespace, so /sys/fs/bpf and the cgroup
/// mounts stay visible.
pub fn command_in(ns: &str, cgroup: Option<&Path>, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    // Everything the child needs is allocated here, before fork: after fork in a multi-threaded
    // process only async-signal-safe calls are allowed (no malloc).
    let netns = c_path(&Path::new(NETNS_RUN_DIR).join(ns));
    let procs = cgroup.map(|c| c_path(&c.join("cgroup.procs")));
    // SAFETY: the closure only calls open/setns/write/close, all async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" moves the writing process itself.
                write_file(procs.as_ref().map_err(clone_err)?, b"0")?;
            }
            enter_netns(netns.as_ref().map_err(clone_err)?)
        });
    }
    cmd
}

/// A readable one-line rendering of a command for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn clone_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::from(io::ErrorKind::InvalidInput),
    }
}

fn enter_netns(path: &CString) -> io::Result<()> {
    // SAFETY: plain syscalls on a NUL-terminated path.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = libc::setns(fd, libc::CLONE_NEWNET);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(err);
        }
    }
    Ok(())
}

fn write_file(path: &CString, data: &[u8]) -> io::Result<()> {
    // SAFETY: plain syscalls on a NUL-terminated path and a valid buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = libc::write(fd, data.as_ptr().cast(), data.len());
        let err = io::Error::last_os_error();
        libc::close(fd);
        if r != data.len() as isize {
            return Err(err);
        }
    }
    Ok(())
}

/// The first mount point of a filesystem type in /proc/mounts (one implementation, shared with
/// the harness and the agent's tests).
pub use lb_userspace::agent::preflight::mount_point;

/// The bpf filesystem's mount point; mounts one at /sys/fs/bpf when there is none.
pub fn ensure_bpffs() -> Result<PathBuf> {
    if let Some(p) = mount_point("bpf") {
        return Ok(p);
    }
    let target = Path::new("/sys/fs/bpf");
    std::fs::create_dir_all(target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .context("no bpf filesystem is mounted and mounting one at /sys/fs/bpf failed")?;
    Ok(target.to_path_buf())
}

/// Pids of the processes whose network namespace is `ns` (like `ip netns pids`).
pub fn netns_pids(ns: &str) -> Vec<i32> {
    let Ok(target) = std::fs::metadata(Path::new(NETNS_RUN_DIR).join(ns)) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // stat() follows the magic link to the namespace's nsfs inode.
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino())
        })
        .collect()
}

/// Names of the existing network namespaces (entries of /run/netns).
pub fn netns_list() -> Vec<String> {
    std::fs::read_dir(NETNS_RUN_DIR)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `sig` to a process (or to a process group when `pid` is negative); ESRCH is not an error.
pub fn signal(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

/// A child process in its own process group that is stopped with SIGTERM, then SIGKILL after a
/// grace period, on [`ManagedProcess::stop`] or on drop. Signals go to the whole group, so the
/// children of a shell script die with it.
pub struct ManagedProcess {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

/// How long a process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

impl ManagedProcess {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> Result<Self> {
        let name = name.into();
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name}: `{}`", describe(&cmd)))?;
        Ok(Self {
            name,
            child,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The underlying child, e.g. to take its stdio handles.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Stops the process group: SIGTERM, then SIGKILL after [`STOP_GRACE`]. Idempotent.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.stop_with_grace(STOP_GRACE)
    }

    pub fn stop_with_grace(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.stop_with_signal(libc::SIGTERM, grace)
    }

    /// Sends `sig` to the process group, waits up to `grace` for the leader to exit, then
    /// SIGKILLs what is left of the group and reaps the leader. Idempotent.
    pub fn stop_with_signal(&mut self, sig: i32, grace: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let pgid = -(self.child.id() as i32);
        // The leader is not reaped until the end, so its pid (= the group id) cannot be reused
        // while we signal the group.
        signal(pgid, sig).with_context(|| format!("signal {sig} to {}", self.name))?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.leader_exited() {
            thread::sleep(Duration::from_millis(10));
        }
        // Also reaches members of the group that outlived the leader.
        signal(pgid, libc::SIGKILL).with_context(|| format!("SIGKILL to {}", self.name))?;
        let status = self
            .child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }

    /// True when the leader has exited, without reaping it (waitid with WNOWAIT).
    fn leader_exited(&self) -> bool {
        // SAFETY: siginfo_t is plain data; waitid writes into it.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            r != 0 || info.si_pid() != 0
        }
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("lab: stopping {}: {e:#}", self.name);
        }
    }
}

/// A short description of an exit status (`exit 1`, `signal 9`).
pub fn status_text(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => s.to_string(),
    }
}

/// Writes `data` to a (pseudo-)file such as `cgroup.kill`.
pub fn write_path(path: &Path, data: &str) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(data.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_escalates_to_sigkill_and_reaches_the_group() {
        // The shell ignores SIGTERM; its `sleep` child is in the same group and dies with it.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; sleep 30 & wait; sleep 30"]);
        let mut p = ManagedProcess::spawn("stubborn", cmd).expect("spawn sh");
        thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let status = p.stop_with_grace(Duration::from_millis(300)).expect("stop");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        // Nothing of the group survives (the orphaned `sleep` may stay a zombie until init
        // reaps it, which is fine: zombies run nothing and hold no namespace).
        let pgid = p.pid() as i32;
        let deadline = Instant::now() + Duration::from_secs(2);
        while !live_group_members(pgid).is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            live_group_members(pgid),
            Vec::<i32>::new(),
            "group {pgid} still runs"
        );
    }

    /// Pids of the non-zombie processes in process group `pgid`.
    fn live_group_members(pgid: i32) -> Vec<i32> {
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid pgrp ...`; comm may contain spaces, so split after `)`.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z" {
                pids.push(pid);
            }
        }
        pids
    }

    #[test]
    fn stop_is_quick_for_a_cooperative_process() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = ManagedProcess::spawn("sleep", cmd).expect("spawn sleep");
        let t = Instant::now();
        let status = p.stop().expect("stop");
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert_eq!(p.stop().expect("again").signal(), Some(libc::SIGTERM));
    }
}
