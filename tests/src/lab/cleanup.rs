//! Removing the lab, also when a test panics: the agents and the echo servers stop, each node's
//! agent uninstalls its pins, whatever a test leaked in the lab's cgroups and namespaces is
//! killed, then the namespaces, cgroups, bpffs directories and the temp dir are deleted.
use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use super::{lock, Lab};
use crate::netns;

impl Lab {
    fn cleanup(&mut self) {
        let warn = |what: String| eprintln!("lab {}: cleanup: {what}", self.prefix);
        let agents = std::mem::take(&mut *lock(&self.agents));
        for a in &agents {
            if let Err(e) = lock(&a.process).stop() {
                warn(format!("agent on {}: {e:#}", a.node));
            }
        }
        if thread::panicking() {
            // The logs are about to be deleted with the temp dir: show them with the failure.
            for a in &agents {
                let log = fs::read_to_string(&a.log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!(
                    "---- agent on {} ({}), last lines:",
                    a.node,
                    a.log_path.display()
                );
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for mut e in self.echo.drain(..) {
            if let Err(err) = e.stop() {
                warn(format!("{}: {err:#}", e.name()));
            }
        }
        let mut uninstalled = HashSet::new();
        for a in &agents {
            if uninstalled.insert((a.node.clone(), a.bin.clone())) {
                if let Err(e) = self.uninstall(&a.node, &a.bin) {
                    warn(format!(
                        "`{} uninstall` on {}: {e:#}",
                        a.bin.display(),
                        a.node
                    ));
                }
            }
        }
        drop(agents);

        // Whatever a test started and leaked: processes in the cgroups and in the namespaces.
        for cg in &self.created_cgroups {
            kill_cgroup(cg);
        }
        let me = std::process::id() as i32;
        for ns in &self.created_netns {
            for pid in netns::netns_pids(ns).into_iter().filter(|&p| p != me) {
                let _ = netns::signal(pid, libc::SIGKILL);
            }
        }
        self.xdp_links.clear();
        for ns in self.created_netns.iter().rev() {
            if let Err(e) = netns::run("ip", &["netns", "del", ns]) {
                warn(format!("{e:#}"));
            }
        }
        for cg in &self.created_cgroups {
            if let Err(e) = remove_cgroup(cg) {
                warn(format!("cgroup {}: {e:#}", cg.display()));
            }
        }
        for dir in &self.created_bpffs {
            if let Err(e) = fs::remove_dir_all(dir) {
                if dir.exists() {
                    warn(format!("bpffs dir {}: {e}", dir.display()));
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.tmp) {
            if self.tmp.exists() {
                warn(format!("temp dir {}: {e}", self.tmp.display()));
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Kills every process in a cgroup tree (cgroup.kill, and one by one for older kernels).
fn kill_cgroup(cg: &Path) {
    let _ = netns::write_path(&cg.join("cgroup.kill"), "1");
    for pid in cgroup_pids(cg) {
        let _ = netns::signal(pid, libc::SIGKILL);
    }
}

fn cgroup_pids(cg: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subdirs(cg) {
        pids.extend(cgroup_pids(&sub));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes a cgroup directory and any child cgroups, depth first, retrying while the last
/// processes finish exiting.
fn remove_cgroup(cg: &Path) -> Result<()> {
    if !cg.exists() {
        return Ok(());
    }
    for sub in subdirs(cg) {
        remove_cgroup(&sub)?;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match fs::remove_dir(cg) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while the last processes are still exiting.
            Err(_) if Instant::now() < deadline => {
                kill_cgroup(cg);
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => bail!("rmdir: {e} (processes left: {:?})", cgroup_pids(cg)),
        }
    }
}
