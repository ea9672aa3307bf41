//! The agents a test runs on the lab's nodes ([`Lab::spawn_agent`]), and their `uninstall`
//! when the lab goes.
use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{atomic::Ordering, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{lock, AgentRecord, Lab, NODE_DEVICE};
use crate::netns::{self, ManagedProcess};

/// How long `<agent> uninstall` may run during cleanup.
const UNINSTALL_TIMEOUT: Duration = Duration::from_secs(10);

impl Lab {
    /// Runs `lb-agent uninstall --bpffs <node's dir>` in the node's namespace, as an operator
    /// would; panics unless it succeeds. Returns what it printed (a `removed PATH` line each).
    pub fn uninstall_printing(&self, node: &str) -> String {
        let n = self.node(node);
        let out = self
            .command_in(
                &n.netns,
                None,
                super::bin_path("lb-agent").unwrap(),
                ["uninstall", "--bpffs"],
            )
            .arg(&n.bpffs)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `AGENT run --node NODE --manifests PATH --cgroup <node cgroup> --bpffs <node dir>
    /// --device eth0 [extra...]` inside the node's namespace (not inside its cgroup), with
    /// stdout and stderr going to a log file in [`Lab::tmpdir`]. The lab runs
    /// `AGENT uninstall --bpffs DIR` for that node when it is dropped.
    pub fn spawn_agent(
        &self,
        node: &str,
        agent_bin: &Path,
        manifests: &Path,
        extra_args: &[&str],
    ) -> Result<AgentProcess> {
        let n = self.find_node(node)?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let log_path = self.tmp.join(format!("agent-{node}-{seq}.log"));
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut cmd = netns::command_in(&n.netns, None, agent_bin);
        cmd.args(["run", "--node", node, "--manifests"])
            .arg(manifests)
            .arg("--cgroup")
            .arg(&n.cgroup)
            .arg("--bpffs")
            .arg(&n.bpffs)
            // `--device eth0` unless the caller names devices itself (`--device auto`, ...).
            .args(if extra_args.contains(&"--device") {
                &[][..]
            } else {
                &["--device", NODE_DEVICE][..]
            })
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file")?)
            .stderr(log);
        let process = Arc::new(Mutex::new(ManagedProcess::spawn(
            format!("agent on {node}"),
            cmd,
        )?));
        lock(&self.agents).push(AgentRecord {
            node: node.into(),
            bin: agent_bin.into(),
            process: process.clone(),
            log_path: log_path.clone(),
        });
        Ok(AgentProcess {
            node: node.into(),
            log: log_path,
            process,
        })
    }

    /// Runs `<agent> uninstall --bpffs DIR` inside the node's namespace, bounded in time.
    pub(super) fn uninstall(&self, node: &str, bin: &Path) -> Result<()> {
        let n = self.find_node(node)?;
        let log_path = self.tmp.join(format!("uninstall-{node}.log"));
        let log = File::create(&log_path)?;
        let mut cmd = netns::command_in(&n.netns, None, bin);
        cmd.args(["uninstall", "--bpffs"])
            .arg(&n.bpffs)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut p = ManagedProcess::spawn(format!("uninstall on {node}"), cmd)?;
        let deadline = Instant::now() + UNINSTALL_TIMEOUT;
        let status = loop {
            if let Some(s) = p.try_wait() {
                break s;
            }
            if Instant::now() > deadline {
                p.stop()?;
                bail!("timed out after {UNINSTALL_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            bail!(
                "{}: {}",
                netns::status_text(status),
                fs::read_to_string(&log_path).unwrap_or_default().trim()
            );
        }
        Ok(())
    }
}

/// An agent started by [`Lab::spawn_agent`]. Stopped (SIGTERM, SIGKILL after 3 s) on
/// [`AgentProcess::stop`] or drop; the lab also stops it if it is dropped first.
pub struct AgentProcess {
    node: String,
    /// The log file (stdout and stderr).
    pub log: PathBuf,
    process: Arc<Mutex<ManagedProcess>>,
}

impl AgentProcess {
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The agent's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        let mut p = lock(&self.process);
        p.is_running().then(|| p.pid())
    }

    /// Everything the agent wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        lock(&self.process).is_running()
    }

    /// The exit status once the agent has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        lock(&self.process).try_wait()
    }

    /// Sends a signal to the agent (e.g. `libc::SIGKILL` to simulate a crash).
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        let mut p = lock(&self.process);
        if !p.is_running() {
            bail!("agent on {} is not running", self.node);
        }
        netns::signal(p.pid() as i32, sig)
            .with_context(|| format!("signal {sig} to agent on {}", self.node))
    }

    /// Stops the agent: SIGTERM, then SIGKILL after 3 s. Idempotent.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        lock(&self.process).stop()
    }

    /// Stops the agent with `signal` instead of SIGTERM (SIGKILL after 3 s all the same), e.g.
    /// `libc::SIGKILL` to simulate a crash that leaves the pins behind.
    pub fn stop_with(&mut self, signal: i32) -> Result<ExitStatus> {
        lock(&self.process).stop_with_signal(signal, netns::STOP_GRACE)
    }

    /// Waits until the log contains `needle`; fails early if the agent exits, with its log.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.exit_status() {
                // It may have written the line just before exiting.
                if self.log().contains(needle) {
                    return Ok(());
                }
                bail!(
                    "agent on {} exited ({}) before logging `{needle}`:\n{}",
                    self.node,
                    netns::status_text(status),
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent on {} did not log `{needle}` within {timeout:?}:\n{}",
                    self.node,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Err(e) = lock(&self.process).stop() {
            eprintln!("lab: stopping agent on {}: {e:#}", self.node);
        }
    }
}
