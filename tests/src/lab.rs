//! The reference lab of shared/LAB.md: a client, two nodes in two zones and four pods, each a
//! network namespace; a fabric bridge in its own namespace; one cgroup and one bpffs directory per
//! node; an echo server in every pod. Names carry a unique prefix, and dropping the lab removes
//! everything it created, also when a test fails.
use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::netns::{self, command_in, exec, ip, run};

/// Ports every pod's echo server listens on (TCP and UDP).
pub const ECHO_PORTS: [u16; 2] = [8080, 9090];

pub struct Node {
    pub name: String,
    pub zone: String,
    pub addr: Ipv4Addr,
    pub netns: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
}

pub struct Pod {
    pub name: String,
    pub node: String,
    pub addr: Ipv4Addr,
    pub netns: String,
}

/// One exchange reported by `lab-client`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Exchange {
    pub ok: bool,
    pub backend: Option<String>,
    pub seen_peer: Option<String>,
    pub peer: Option<String>,
    pub error: Option<String>,
    pub elapsed_ms: u64,
}

pub struct Lab {
    pub prefix: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub client_netns: String,
    fabric_netns: String,
    tmp: PathBuf,
    children: Mutex<Vec<Child>>,
    agent_bin: Mutex<Option<PathBuf>>,
    namespaces: Vec<String>,
}

/// Locates a workspace binary: `$LB_BIN_DIR/NAME`, else next to the running executable or in its
/// parent directory (integration tests run from target/debug/deps).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("LB_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("binary {name} not found next to {} (build it: cargo build --workspace --exclude lb-ebpf --bins)", exe.display())
}

static LABS: AtomicU32 = AtomicU32::new(0);

impl Lab {
    pub fn new() -> Result<Self> {
        let prefix = format!("lb{}x{}", std::process::id() % 100_000, LABS.fetch_add(1, Ordering::Relaxed));
        let cg_root = netns::mount_point("cgroup2").ok_or_else(|| anyhow!("no cgroup2 mount in /proc/mounts"))?;
        let bpf_root = match netns::mount_point("bpf") {
            Some(p) => p,
            None => {
                run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
                PathBuf::from("/sys/fs/bpf")
            }
        };
        let tmp = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&tmp)?;
        let ns = |n: &str| format!("{prefix}-{n}");
        let nodes = [("node1", "zone-a", 1u8), ("node2", "zone-b", 2u8)]
            .iter()
            .map(|(name, zone, i)| Node {
                name: name.to_string(),
                zone: zone.to_string(),
                addr: Ipv4Addr::new(192, 168, 100, *i),
                netns: ns(name),
                cgroup: cg_root.join(format!("{prefix}-{name}")),
                bpffs: bpf_root.join(format!("{prefix}-{name}")),
            })
            .collect::<Vec<_>>();
        let pods = [("a1", "node1", 1u8, 10u8), ("a2", "node1", 1, 11), ("b1", "node2", 2, 10), ("b2", "node2", 2, 11)]
            .iter()
            .map(|(name, node, n, h)| Pod {
                name: name.to_string(),
                node: node.to_string(),
                addr: Ipv4Addr::new(10, 244, *n, *h),
                netns: ns(name),
            })
            .collect::<Vec<_>>();
        let mut lab = Lab {
            client_netns: ns("client"),
            fabric_netns: ns("fabric"),
            namespaces: Vec::new(),
            prefix,
            nodes,
            pods,
            tmp,
            children: Mutex::new(Vec::new()),
            agent_bin: Mutex::new(None),
        };
        // From here on, Drop cleans up whatever was created.
        lab.build().context("building the lab")?;
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        run("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(name, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let fabric = self.fabric_netns.clone();
        let client = self.client_netns.clone();
        self.add_netns(&fabric)?;
        ip(&fabric, &["link", "add", "br0", "type", "bridge"])?;
        ip(&fabric, &["link", "set", "br0", "up"])?;
        exec(&fabric, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;

        // Hosts on the fabric: client and nodes, each with eth0 and a port on br0.
        let mut hosts = vec![(client.clone(), Ipv4Addr::new(192, 168, 100, 100), "c0".to_string())];
        for (i, n) in self.nodes.iter().enumerate() {
            hosts.push((n.netns.clone(), n.addr, format!("n{}", i + 1)));
        }
        for (host, addr, port) in &hosts {
            self.add_netns(host)?;
            ip(host, &["link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", &fabric])?;
            ip(&fabric, &["link", "set", port, "master", "br0", "up"])?;
            ip(host, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(host, &["link", "set", "eth0", "up"])?;
            // Real checksums on the wire, so the kernel validates what the datapath writes.
            exec(host, &["ethtool", "-K", "eth0", "tx", "off"])?;
            exec(&fabric, &["ethtool", "-K", port, "tx", "off"])?;
            // XDP_TX from a node's eth0 lands on this port: it must take XDP frames (GRO on).
            exec(&fabric, &["ethtool", "-K", port, "gro", "on"])?;
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let idx = i as u8 + 1;
            let other = if idx == 1 { 2 } else { 1 };
            for s in [
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.eth0.send_redirects=0",
            ] {
                exec(&n.netns, &["sysctl", "-qw", s])?;
            }
            ip(&n.netns, &["link", "add", "cni0", "type", "bridge"])?;
            ip(&n.netns, &["addr", "add", &format!("10.244.{idx}.1/24"), "dev", "cni0"])?;
            ip(&n.netns, &["link", "set", "cni0", "up"])?;
            ip(&n.netns, &["route", "add", &format!("10.244.{other}.0/24"), "via", &format!("192.168.100.{other}")])?;
            std::fs::create_dir_all(&n.cgroup).with_context(|| format!("mkdir {}", n.cgroup.display()))?;
        }
        let pods: Vec<(String, String, Ipv4Addr, String)> = self
            .pods
            .iter()
            .map(|p| (p.netns.clone(), p.name.clone(), p.addr, self.node(&p.node).netns.clone()))
            .collect();
        for (pns, name, addr, nns) in &pods {
            self.add_netns(pns)?;
            let host_if = format!("veth{name}");
            ip(pns, &["link", "add", "eth0", "type", "veth", "peer", "name", &host_if, "netns", nns])?;
            ip(nns, &["link", "set", &host_if, "master", "cni0", "up"])?;
            ip(pns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(pns, &["link", "set", "eth0", "up"])?;
            let gw = Ipv4Addr::new(10, 244, addr.octets()[2], 1);
            ip(pns, &["route", "add", "default", "via", &gw.to_string()])?;
            exec(pns, &["ethtool", "-K", "eth0", "tx", "off"])?;
            exec(nns, &["ethtool", "-K", &host_if, "tx", "off"])?;
        }
        // Echo servers, inside their pod's netns and their node's cgroup.
        let echo = crate::lab::bin_path("lab-echo")?;
        for p in &self.pods {
            let cg = self.node(&p.node).cgroup.clone();
            let mut cmd = command_in(&p.netns, Some(&cg), &echo);
            cmd.args(["--name", &p.name]);
            for port in ECHO_PORTS {
                cmd.args(["--port", &port.to_string()]);
            }
            let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().context("spawning lab-echo")?;
            let out = child.stdout.take().expect("piped");
            self.children.lock().unwrap().push(child);
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line)?;
            if line.trim() != "ready" {
                bail!("lab-echo in {} did not start", p.name);
            }
        }
        // Resolve the fabric's neighbours up front, so the datapath's FIB lookups find them.
        for (host, _, _) in &hosts {
            for (_, addr, _) in &hosts {
                let _ = exec(host, &["ping", "-c1", "-W1", &addr.to_string()]);
            }
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn tmpdir(&self) -> &Path {
        &self.tmp
    }

    /// Adds (or replaces) a route on the client towards `dest` through `node`, as a cloud load
    /// balancer would pick a node.
    pub fn client_route(&self, dest: &str, node: &str) -> Result<()> {
        let via = self.node(node).addr.to_string();
        ip(&self.client_netns, &["route", "replace", dest, "via", &via])?;
        Ok(())
    }

    /// Where a process runs: a pod (its netns and its node's cgroup), a node's host namespace
    /// (and cgroup), or "client".
    fn place(&self, at: &str) -> (String, Option<PathBuf>) {
        if at == "client" {
            return (self.client_netns.clone(), None);
        }
        if let Some(p) = self.pods.iter().find(|p| p.name == at) {
            return (p.netns.clone(), Some(self.node(&p.node).cgroup.clone()));
        }
        let n = self.node(at);
        (n.netns.clone(), Some(n.cgroup.clone()))
    }

    /// Runs `lab-client ARGS` at `at` and parses its exchanges.
    pub fn run_client(&self, at: &str, args: &[&str]) -> Result<Vec<Exchange>> {
        let (ns, cg) = self.place(at);
        let out = command_in(&ns, cg.as_deref(), &bin_path("lab-client")?)
            .args(args)
            .output()
            .context("running lab-client")?;
        if !out.status.success() {
            bail!("lab-client failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("lab-client line {l:?}")))
            .collect()
    }

    /// Opens one long-lived TCP connection from `at` to `target`.
    pub fn hold(&self, at: &str, target: &str) -> Result<HeldConnection> {
        let (ns, cg) = self.place(at);
        let mut child = command_in(&ns, cg.as_deref(), &bin_path("lab-client")?)
            .args(["hold", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut held = HeldConnection { child, stdin, stdout, first: None };
        held.first = Some(held.read()?);
        Ok(held)
    }

    /// Starts an agent for `node` in the node's netns with its cgroup, bpffs directory and eth0.
    pub fn spawn_agent(&self, node: &str, agent_bin: &Path, manifests: &Path, extra: &[&str]) -> Result<AgentProcess> {
        let n = self.node(node);
        *self.agent_bin.lock().unwrap() = Some(agent_bin.to_path_buf());
        let log = self.tmp.join(format!("agent-{node}-{}.log", Instant::now().elapsed().as_nanos()));
        let file = std::fs::File::create(&log)?;
        let child = command_in(&n.netns, None, agent_bin)
            .args(["run", "--node", node, "--manifests"])
            .arg(manifests)
            .arg("--cgroup")
            .arg(&n.cgroup)
            .arg("--bpffs")
            .arg(&n.bpffs)
            .args(["--device", "eth0", "--poll-interval-ms", "50"])
            .args(extra)
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("spawning lb-agent")?;
        Ok(AgentProcess { child: Some(child), log })
    }
}

/// A running `lb-agent`; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct AgentProcess {
    child: Option<Child>,
    pub log: PathBuf,
}

impl AgentProcess {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent logged `needle` (e.g. a sync generation) or exited.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("agent exited ({status}): {}", self.log());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("agent did not log {needle:?} within {timeout:?}: {}", self.log())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends a signal and waits for the exit.
    pub fn stop_with(&mut self, signal: i32) -> Result<std::process::ExitStatus> {
        let mut c = self.child.take().ok_or_else(|| anyhow!("already stopped"))?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return Ok(c.wait()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop_with(libc::SIGTERM);
        }
    }
}

/// A long-lived TCP connection held by `lab-client hold`.
pub struct HeldConnection {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub first: Option<Exchange>,
}

impl HeldConnection {
    fn read(&mut self) -> Result<Exchange> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("lab-client hold said {line:?}"))
    }

    /// One more exchange on the same connection.
    pub fn exchange(&mut self) -> Result<Exchange> {
        writeln!(self.stdin, "again")?;
        self.stdin.flush()?;
        self.read()
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.children.lock().unwrap().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let agent = self.agent_bin.lock().unwrap().clone();
        for n in &self.nodes {
            if n.bpffs.exists() {
                if let Some(bin) = &agent {
                    let _ = Command::new(bin).args(["uninstall", "--bpffs"]).arg(&n.bpffs).output();
                }
                let _ = std::fs::remove_dir_all(&n.bpffs);
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run("ip", &["netns", "del", ns]);
        }
        for n in &self.nodes {
            for _ in 0..50 {
                if !n.cgroup.exists() || std::fs::remove_dir(&n.cgroup).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}
