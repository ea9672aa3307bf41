//! The reference lab: a small cluster in network namespaces (shared/LAB.md).
//!
//! ```text
//!             ┌──────────── fabric: bridge br0, 192.168.100.0/24 ─────────┐
//!    client .100                node1 .1 (zone-a)                 node2 .2 (zone-b)
//!                               eth0, cni0 10.244.1.1/24          eth0, cni0 10.244.2.1/24
//!                                ├─ a1 10.244.1.10                 ├─ b1 10.244.2.10
//!                                └─ a2 10.244.1.11                 └─ b2 10.244.2.11
//! ```
//!
//! Every name the lab creates (network namespaces, cgroup and bpffs directories, the temp dir)
//! starts with a prefix unique to the lab (`lb<pid>x<n>`), so several labs can coexist.
//! Dropping the [`Lab`] removes all of it, also when a test panics.
//!
//! Names of lab places (`"client"`, `"fabric"`, `"node1"`, `"a1"`, ...) are the short names
//! below; accessors that take such a name ([`Lab::node`], [`Lab::pod`], [`Lab::pod_command`],
//! ...) panic with a clear message on an unknown name, as that is a bug in the test. Everything
//! that does I/O returns a `Result`.
use std::{
    collections::HashSet,
    env,
    ffi::OsStr,
    fs::{self, File},
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::netns::{self, ip, ManagedProcess};

/// The client's address on the fabric.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 100);
/// Ports every pod's echo server listens on, for TCP and UDP.
pub const ECHO_PORTS: [u16; 2] = [8080, 9090];
/// The cluster's pod network (both nodes' pod CIDRs).
pub const CLUSTER_POD_CIDR: &str = "10.244.0.0/16";
/// The device the agents attach to on each node (its fabric interface).
pub const NODE_DEVICE: &str = "eth0";

/// How long [`Lab::new`] waits for an echo server to say `ready`.
const ECHO_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `<agent> uninstall` may run during cleanup.
const UNINSTALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time a held connection's client gets beyond its own I/O timeout.
const HOLD_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

struct NodeSpec {
    name: &'static str,
    addr: Ipv4Addr,
    zone: &'static str,
    /// N in 10.244.N.0/24.
    subnet: u8,
}

const NODE_SPECS: [NodeSpec; 2] = [
    NodeSpec {
        name: "node1",
        addr: Ipv4Addr::new(192, 168, 100, 1),
        zone: "zone-a",
        subnet: 1,
    },
    NodeSpec {
        name: "node2",
        addr: Ipv4Addr::new(192, 168, 100, 2),
        zone: "zone-b",
        subnet: 2,
    },
];

const POD_SPECS: [(&str, &str, Ipv4Addr); 4] = [
    ("a1", "node1", Ipv4Addr::new(10, 244, 1, 10)),
    ("a2", "node1", Ipv4Addr::new(10, 244, 1, 11)),
    ("b1", "node2", Ipv4Addr::new(10, 244, 2, 10)),
    ("b2", "node2", Ipv4Addr::new(10, 244, 2, 11)),
];

/// A node of the lab.
#[derive(Debug, Clone)]
pub struct Node {
    /// `node1`, `node2`.
    pub name: String,
    /// Full network namespace name (under /run/netns).
    pub netns: String,
    /// Fabric (InternalIP) address, on `eth0`.
    pub addr: Ipv4Addr,
    /// `topology.kubernetes.io/zone`.
    pub zone: String,
    /// The node's cgroup v2 directory: its pods' and host processes run here, its agent
    /// attaches the socket-level programs here.
    pub cgroup: PathBuf,
    /// The node's pin directory on the bpf filesystem.
    pub bpffs: PathBuf,
    /// `10.244.N.0/24`.
    pub pod_cidr: String,
    /// `10.244.N.1`, the node's address on `cni0` and its pods' default gateway.
    pub gateway: Ipv4Addr,
}

/// A pod of the lab: a network namespace behind its node's `cni0` running `lab-echo`.
#[derive(Debug, Clone)]
pub struct Pod {
    /// `a1`, `a2`, `b1`, `b2`; also what its echo server answers.
    pub name: String,
    /// Name of its node.
    pub node: String,
    /// Full network namespace name.
    pub netns: String,
    pub addr: Ipv4Addr,
}

/// One exchange of `lab-client`, as printed on one JSON line. Addresses are kept as the text
/// `IP:PORT`; [`Exchange::seen_addr`], [`Exchange::seen_ip`] and [`Exchange::peer_addr`] parse them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    pub ok: bool,
    /// Name of the echo server that answered.
    #[serde(default)]
    pub backend: Option<String>,
    /// The client address and port the echo server saw (`accept()` / `recvfrom()` peer).
    #[serde(default)]
    pub seen_peer: Option<String>,
    /// TCP: `getpeername()` of the client socket; UDP: the source of the reply.
    #[serde(default)]
    pub peer: Option<String>,
    /// When `ok` is false: the error kind, its text and the step (`TimedOut: ... (connect)`).
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub elapsed_ms: u64,
}

impl Exchange {
    /// The client address and port the echo server saw.
    pub fn seen_addr(&self) -> Option<SocketAddr> {
        self.seen_peer.as_deref()?.parse().ok()
    }

    /// The client IP address the echo server saw.
    pub fn seen_ip(&self) -> Option<IpAddr> {
        self.seen_addr().map(|p| p.ip())
    }

    /// `getpeername()` (TCP) or the reply's source (UDP).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.as_deref()?.parse().ok()
    }

    /// Parses `lab-client` output: one JSON object per non-empty line.
    pub fn parse_lines(text: &str) -> Result<Vec<Exchange>> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad lab-client line: {l}")))
            .collect()
    }
}

/// Locates a binary of the workspace: `$LB_BIN_DIR/NAME` when LB_BIN_DIR is set, else next to
/// the running executable or in its parent directory (integration tests run from
/// `target/debug/deps/`, binaries live in `target/debug/`).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    if let Some(dir) = env::var_os("LB_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "{} does not exist (LB_BIN_DIR is set): build the workspace binaries with \
             `cargo build --bins`",
            p.display()
        );
    }
    let exe = env::current_exe().context("cannot find the running executable")?;
    let dirs: Vec<&Path> = exe.ancestors().skip(1).take(2).collect();
    for dir in &dirs {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "cannot find the `{name}` binary (looked in {}): build the workspace binaries first with \
         `cargo build --bins`, or set LB_BIN_DIR",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The running lab. See the module documentation.
pub struct Lab {
    /// Unique name prefix (`lb<pid>x<n>`): every namespace, cgroup and bpffs directory name
    /// starts with `<prefix>-`. Changing these fields does not change what cleanup removes.
    pub prefix: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Full namespace name of the client.
    pub client_netns: String,
    tmp: PathBuf,
    /// What was actually created, for cleanup (a half-built lab cleans up too).
    created_netns: Vec<String>,
    created_cgroups: Vec<PathBuf>,
    created_bpffs: Vec<PathBuf>,
    echo: Vec<ManagedProcess>,
    /// XDP_PASS programs on the nodes' fabric ports, attached while these are open.
    xdp_links: Vec<std::os::fd::OwnedFd>,
    agents: Mutex<Vec<AgentRecord>>,
    seq: AtomicU32,
}

struct AgentRecord {
    node: String,
    bin: PathBuf,
    process: Arc<Mutex<ManagedProcess>>,
    log_path: PathBuf,
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock must not stop the cleanup.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lab {
    /// Builds the whole topology, starts every pod's echo server and waits until they listen.
    pub fn new() -> Result<Lab> {
        let echo_bin = bin_path("lab-echo")?;
        let cgroup_root = netns::mount_point("cgroup2")
            .context("no cgroup2 filesystem is mounted (see /proc/mounts)")?;
        let bpffs_root = netns::ensure_bpffs()?;

        // Unique prefix: pid + counter, skipping names left behind by an earlier process that
        // had the same pid and was killed before it could clean up.
        let prefix = loop {
            let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = format!("lb{}x{n}", std::process::id());
            let dash = format!("{p}-");
            let taken = netns::netns_list().iter().any(|ns| ns.starts_with(&dash))
                || NODE_SPECS.iter().any(|s| {
                    cgroup_root.join(format!("{p}-{}", s.name)).exists()
                        || bpffs_root.join(format!("{p}-{}", s.name)).exists()
                })
                || env::temp_dir().join(&p).exists();
            if !taken {
                break p;
            }
        };
        let tmp = env::temp_dir().join(&prefix);
        fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;

        let nodes = NODE_SPECS
            .iter()
            .map(|s| Node {
                name: s.name.into(),
                netns: format!("{prefix}-{}", s.name),
                addr: s.addr,
                zone: s.zone.into(),
                cgroup: cgroup_root.join(format!("{prefix}-{}", s.name)),
                bpffs: bpffs_root.join(format!("{prefix}-{}", s.name)),
                pod_cidr: format!("10.244.{}.0/24", s.subnet),
                gateway: Ipv4Addr::new(10, 244, s.subnet, 1),
            })
            .collect();
        let pods = POD_SPECS
            .iter()
            .map(|(name, node, addr)| Pod {
                name: (*name).into(),
                node: (*node).into(),
                netns: format!("{prefix}-{name}"),
                addr: *addr,
            })
            .collect();

        let mut lab = Lab {
            client_netns: format!("{prefix}-client"),
            prefix,
            tmp,
            nodes,
            pods,
            created_netns: Vec::new(),
            created_cgroups: Vec::new(),
            created_bpffs: Vec::new(),
            echo: Vec::new(),
            xdp_links: Vec::new(),
            agents: Mutex::new(Vec::new()),
            seq: AtomicU32::new(0),
        };
        // On error `lab` is dropped here, which removes whatever was already created.
        lab.build(&echo_bin)
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&mut self, echo_bin: &Path) -> Result<()> {
        let fabric = self.netns("fabric");
        let client = self.netns("client");
        let nodes = self.nodes.clone();
        let pods = self.pods.clone();

        let all: Vec<String> = [fabric.clone(), client.clone()]
            .into_iter()
            .chain(nodes.iter().map(|n| n.netns.clone()))
            .chain(pods.iter().map(|p| p.netns.clone()))
            .collect();
        for ns in &all {
            netns::run("ip", &["netns", "add", ns])?;
            self.created_netns.push(ns.clone());
            // Set before any interface exists so that every interface inherits `default`.
            // IPv6 is off to keep the wire quiet (no router solicitations, ND, MLD), so packet
            // and counter assertions only see the test's own traffic.
            sysctl(
                ns,
                &[
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
            ip(ns, &["link", "set", "lo", "up"])?;
        }

        // Fabric: one bridge; client and nodes hang off it with eth0. Multicast snooping off: the
        // bridge would otherwise send IGMP reports (224.0.0.106) into the nodes' XDP programs.
        ip(
            &fabric,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        )?;
        ip(&fabric, &["link", "set", "br0", "up"])?;
        let mut fabric_hosts = vec![("client", client.clone(), CLIENT_ADDR)];
        fabric_hosts.extend(
            nodes
                .iter()
                .map(|n| (n.name.as_str(), n.netns.clone(), n.addr)),
        );
        for (port, ns, addr) in &fabric_hosts {
            veth(ns, "eth0", &fabric, port)?;
            ip(&fabric, &["link", "set", port, "master", "br0", "up"])?;
            ethtool(&fabric, port, &["tx", "off"])?;
            ethtool(ns, "eth0", &["tx", "off"])?;
            ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(ns, &["link", "set", "eth0", "up"])?;
        }
        // Permanent neighbour entries between the fabric hosts: the datapath's bpf_fib_lookup()
        // only finds neighbours the kernel already resolved (it never sends ARP itself), so
        // without them the first packets of a test, or any after an entry expired, would take
        // another path than the rest.
        // Static FDB entries on the bridge for the same MACs: with no ARP, the bridge would never
        // learn a node's MAC before that node sends something, and would flood traffic for it to
        // every port, where another node's XDP program would see (and might translate) a copy.
        let mut macs = Vec::new();
        for (port, ns, addr) in &fabric_hosts {
            let mac = mac_of(ns, "eth0")?;
            netns::run(
                "bridge",
                &[
                    "-n", &fabric, "fdb", "replace", &mac, "dev", port, "master", "static",
                ],
            )?;
            macs.push((ns.clone(), *addr, mac));
        }
        for (ns, _, _) in &macs {
            for (_, addr, mac) in macs.iter().filter(|(o, _, _)| o != ns) {
                ip(
                    ns,
                    &[
                        "neigh",
                        "replace",
                        &addr.to_string(),
                        "lladdr",
                        mac,
                        "dev",
                        "eth0",
                        "nud",
                        "permanent",
                    ],
                )?;
            }
        }
        // A node's XDP_TX out of eth0 lands on its fabric port, which only drains XDP frames
        // promptly when it has an XDP program itself (see crate::xdp).
        for node in &nodes {
            self.xdp_links
                .push(crate::xdp::attach_pass(&fabric, &node.name)?);
        }
        // A client that accepted ICMP redirects would bypass the node a test routes it through.
        sysctl(
            &client,
            &[
                "net.ipv4.conf.all.accept_redirects=0",
                "net.ipv4.conf.eth0.accept_redirects=0",
            ],
        )?;

        for node in &nodes {
            let ns = &node.netns;
            sysctl(
                ns,
                &[
                    "net.ipv4.ip_forward=1",
                    // Forwarding client -> node1 -> node2 leaves by the interface it came in on;
                    // no redirects, so the path a test chose stays the path.
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.default.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0",
                    "net.ipv4.conf.eth0.rp_filter=0",
                ],
            )?;
            ip(
                ns,
                &[
                    "link",
                    "add",
                    "cni0",
                    "type",
                    "bridge",
                    "mcast_snooping",
                    "0",
                ],
            )?;
            ip(
                ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", node.gateway),
                    "dev",
                    "cni0",
                ],
            )?;
            ip(ns, &["link", "set", "cni0", "up"])?;
            for pod in pods.iter().filter(|p| p.node == node.name) {
                let port = format!("veth-{}", pod.name);
                veth(&pod.netns, "eth0", ns, &port)?;
                ip(ns, &["link", "set", &port, "master", "cni0", "up"])?;
                ethtool(ns, &port, &["tx", "off"])?;
                ethtool(&pod.netns, "eth0", &["tx", "off"])?;
                ip(
                    &pod.netns,
                    &["addr", "add", &format!("{}/24", pod.addr), "dev", "eth0"],
                )?;
                ip(&pod.netns, &["link", "set", "eth0", "up"])?;
                ip(
                    &pod.netns,
                    &["route", "add", "default", "via", &node.gateway.to_string()],
                )?;
            }
            for other in nodes.iter().filter(|o| o.name != node.name) {
                ip(
                    ns,
                    &[
                        "route",
                        "add",
                        &other.pod_cidr,
                        "via",
                        &other.addr.to_string(),
                        "dev",
                        "eth0",
                    ],
                )?;
            }
            fs::create_dir(&node.cgroup)
                .with_context(|| format!("cannot create cgroup {}", node.cgroup.display()))?;
            self.created_cgroups.push(node.cgroup.clone());
            fs::create_dir(&node.bpffs)
                .with_context(|| format!("cannot create bpffs dir {}", node.bpffs.display()))?;
            self.created_bpffs.push(node.bpffs.clone());
        }

        // Echo servers: start all, then wait for each.
        let mut waiting = Vec::new();
        for pod in &pods {
            let node = self.node(&pod.node);
            let log_path = self.tmp.join(format!("echo-{}.log", pod.name));
            let log = File::create(&log_path)
                .with_context(|| format!("cannot create {}", log_path.display()))?;
            let mut args = vec!["--name".to_string(), pod.name.clone()];
            for p in ECHO_PORTS {
                args.extend(["--port".to_string(), p.to_string()]);
            }
            let mut cmd = netns::command_in(&pod.netns, Some(&node.cgroup), echo_bin);
            cmd.args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(log);
            let mut proc = ManagedProcess::spawn(format!("lab-echo in {}", pod.name), cmd)?;
            let stdout = proc.child_mut().stdout.take().context("echo stdout")?;
            let ready = first_line(stdout);
            self.echo.push(proc);
            waiting.push((pod.name.clone(), log_path, ready));
        }
        for (i, (pod, log_path, ready)) in waiting.into_iter().enumerate() {
            match ready.recv_timeout(ECHO_READY_TIMEOUT) {
                Ok(line) if line.trim() == "ready" => {}
                other => {
                    let status = self.echo[i].try_wait().map(netns::status_text);
                    bail!(
                        "echo server of {pod} did not become ready (got {other:?}, exited: {status:?}): {}",
                        fs::read_to_string(&log_path).unwrap_or_default().trim()
                    );
                }
            }
        }
        Ok(())
    }

    /// A per-lab temporary directory (logs, manifests), removed with the lab.
    pub fn tmpdir(&self) -> &Path {
        &self.tmp
    }

    /// The node called `name` (`node1`, `node2`). Panics on an unknown name.
    pub fn node(&self, name: &str) -> &Node {
        self.find_node(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The pod called `name` (`a1`, `a2`, `b1`, `b2`). Panics on an unknown name.
    pub fn pod(&self, name: &str) -> &Pod {
        self.find_pod(name).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn find_node(&self, name: &str) -> Result<&Node> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            anyhow!(
                "lab has no node `{name}` (nodes: {})",
                names(self.nodes.iter().map(|n| &n.name))
            )
        })
    }

    pub fn find_pod(&self, name: &str) -> Result<&Pod> {
        self.pods.iter().find(|p| p.name == name).ok_or_else(|| {
            anyhow!(
                "lab has no pod `{name}` (pods: {})",
                names(self.pods.iter().map(|p| &p.name))
            )
        })
    }

    /// A pod's address. Panics on an unknown pod.
    pub fn pod_addr(&self, pod: &str) -> Ipv4Addr {
        self.pod(pod).addr
    }

    /// The pods running on `node`. Panics on an unknown node.
    pub fn pods_of(&self, node: &str) -> Vec<&Pod> {
        let node = &self.node(node).name;
        self.pods.iter().filter(|p| &p.node == node).collect()
    }

    pub fn client_addr(&self) -> Ipv4Addr {
        CLIENT_ADDR
    }

    /// Full network namespace name of a lab place (`client`, `fabric`, a node or a pod); any
    /// other string is returned unchanged (taken as a full namespace name).
    pub fn netns(&self, place: &str) -> String {
        match place {
            "client" | "fabric" => format!("{}-{place}", self.prefix),
            _ => self
                .nodes
                .iter()
                .map(|n| (&n.name, &n.netns))
                .chain(self.pods.iter().map(|p| (&p.name, &p.netns)))
                .find(|(name, _)| *name == place)
                .map_or_else(|| place.to_string(), |(_, ns)| ns.clone()),
        }
    }

    /// The cgroup processes at `place` run in: the node's for a node or its pods, none for the
    /// client and the fabric.
    fn place_cgroup(&self, place: &str) -> Result<Option<&Path>> {
        match place {
            "client" | "fabric" => Ok(None),
            _ => {
                if let Ok(node) = self.find_node(place) {
                    return Ok(Some(&node.cgroup));
                }
                let pod = self.find_pod(place).map_err(|_| {
                    anyhow!("unknown lab place `{place}` (client, fabric, a node or a pod)")
                })?;
                Ok(Some(&self.node(&pod.node).cgroup))
            }
        }
    }

    /// `program args...` to run in network namespace `ns` (a lab place such as `a1`, or a full
    /// namespace name) and, when given, in `cgroup`, without `ip netns exec` (mounts stay
    /// visible). See [`netns::command_in`].
    pub fn command_in<I, S>(
        &self,
        ns: &str,
        cgroup: Option<&Path>,
        program: impl AsRef<OsStr>,
        args: I,
    ) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = netns::command_in(&self.netns(ns), cgroup, program);
        cmd.args(args);
        cmd
    }

    /// `program args...` at a lab place: a pod (its netns, its node's cgroup), a node (its netns
    /// and cgroup, as a host process of that node), `client` or `fabric` (no cgroup).
    pub fn command_at<I, S>(
        &self,
        place: &str,
        program: impl AsRef<OsStr>,
        args: I,
    ) -> Result<Command>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let cgroup = self.place_cgroup(place)?;
        Ok(self.command_in(place, cgroup, program, args))
    }

    /// `program args...` in the client namespace.
    pub fn client_command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command_in("client", None, program, args)
    }

    /// `program args...` in a pod's namespace and its node's cgroup. Panics on an unknown pod.
    pub fn pod_command<I, S>(&self, pod: &str, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let pod = self.pod(pod);
        self.command_in(
            &pod.netns,
            Some(&self.node(&pod.node).cgroup),
            program,
            args,
        )
    }

    /// `program args...` in a node's namespace and cgroup (a host process of that node).
    /// Panics on an unknown node.
    pub fn node_command<I, S>(&self, node: &str, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let node = self.node(node);
        self.command_in(&node.netns, Some(&node.cgroup), program, args)
    }

    /// Routes `dest` (a CIDR or a single address) from the client via `node`'s fabric address,
    /// replacing an existing route to `dest` — as a cloud load balancer picks a node.
    pub fn client_route(&self, dest: &str, node: &str) -> Result<()> {
        let via = self.find_node(node)?.addr.to_string();
        ip(
            &self.netns("client"),
            &["route", "replace", dest, "via", &via, "dev", "eth0"],
        )
        .with_context(|| format!("client route {dest} via {node}"))?;
        Ok(())
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
            .args(["--device", NODE_DEVICE])
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

    /// Runs `lab-client ARGS...` at a lab place (see [`Lab::command_at`]) and parses its output.
    pub fn run_client(&self, place: &str, args: &[&str]) -> Result<Vec<Exchange>> {
        let bin = bin_path("lab-client")?;
        let mut cmd = self.command_at(place, &bin, args)?;
        let desc = format!("lab-client {} at {place}", args.join(" "));
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {desc}"))?;
        if !out.status.success() {
            bail!(
                "{desc} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Exchange::parse_lines(&String::from_utf8_lossy(&out.stdout)).with_context(|| desc)
    }

    /// `count` TCP exchanges from `place` to `target` (`IP:PORT`), each on a new connection.
    pub fn tcp(&self, place: &str, target: &str, count: u32) -> Result<Vec<Exchange>> {
        self.run_client(place, &["tcp", target, "--count", &count.to_string()])
    }

    /// `count` UDP exchanges from `place` to `target`, each from a new socket.
    pub fn udp(&self, place: &str, target: &str, count: u32) -> Result<Vec<Exchange>> {
        self.run_client(place, &["udp", target, "--count", &count.to_string()])
    }

    /// Opens one TCP connection from `place` to `target` and does a first exchange on it
    /// (`lab-client hold`); more exchanges on the same connection with
    /// [`HeldConnection::exchange`].
    pub fn hold(&self, place: &str, target: &str) -> Result<HeldConnection> {
        let bin = bin_path("lab-client")?;
        let mut cmd = self.command_at(place, &bin, ["hold", target])?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut process =
            ManagedProcess::spawn(format!("lab-client hold {target} at {place}"), cmd)?;
        let stdin = process
            .child_mut()
            .stdin
            .take()
            .context("lab-client stdin")?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .context("lab-client stdout")?;
        let lines = all_lines(stdout);
        let mut held = HeldConnection {
            process,
            stdin: Some(stdin),
            lines,
            first: None,
        };
        held.first = Some(held.next_exchange()?);
        Ok(held)
    }

    /// Runs `<agent> uninstall --bpffs DIR` inside the node's namespace, bounded in time.
    fn uninstall(&self, node: &str, bin: &Path) -> Result<()> {
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

/// One TCP connection kept open by `lab-client hold` (see [`Lab::hold`]). The client process
/// is stopped on drop.
pub struct HeldConnection {
    process: ManagedProcess,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// The exchange made right after connecting (always set by [`Lab::hold`]).
    pub first: Option<Exchange>,
}

impl HeldConnection {
    /// One more exchange on the same connection.
    pub fn exchange(&mut self) -> Result<Exchange> {
        let stdin = self.stdin.as_mut().context("held connection is closed")?;
        stdin
            .write_all(b"next\n")
            .and_then(|_| stdin.flush())
            .with_context(|| format!("{} has exited", self.process.name()))?;
        self.next_exchange()
    }

    fn next_exchange(&mut self) -> Result<Exchange> {
        let line = self.lines.recv_timeout(HOLD_REPLY_TIMEOUT).map_err(|e| {
            let status = self.process.try_wait().map(netns::status_text);
            anyhow!(
                "{}: no reply line ({e}; exited: {status:?})",
                self.process.name()
            )
        })?;
        serde_json::from_str(&line).with_context(|| format!("bad lab-client line: {line}"))
    }

    /// Closes stdin (the client exits) and stops the process.
    pub fn close(mut self) -> Result<()> {
        self.stdin.take();
        self.process.stop_with_grace(Duration::from_secs(1))?;
        Ok(())
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        self.stdin.take();
        // ManagedProcess's own drop stops the client.
    }
}

fn veth(ns: &str, name: &str, peer_ns: &str, peer_name: &str) -> Result<()> {
    ip(
        ns,
        &[
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", peer_ns,
        ],
    )?;
    Ok(())
}

fn ethtool(ns: &str, dev: &str, features: &[&str]) -> Result<()> {
    let mut args = vec!["-K", dev];
    args.extend_from_slice(features);
    netns::exec_in(ns, "ethtool", &args)?;
    Ok(())
}

fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["-q", "-w"];
    args.extend_from_slice(settings);
    netns::exec_in(ns, "sysctl", &args)?;
    Ok(())
}

/// The MAC address of `dev` in namespace `ns`.
fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = ip(ns, &["-o", "link", "show", "dev", dev])?;
    let mut words = out.split_whitespace();
    words
        .find(|w| *w == "link/ether")
        .and_then(|_| words.next())
        .map(str::to_string)
        .with_context(|| format!("no MAC address for {dev} in {ns}: {out}"))
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    it.map(String::as_str).collect::<Vec<_>>().join(", ")
}

/// The first line a reader produces, delivered on a channel; the rest is drained so the writer
/// never blocks or gets SIGPIPE.
fn first_line(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(r).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    rx
}

/// Every line a reader produces, delivered on a channel.
fn all_lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_lines_parse() {
        let out = r#"{"ok":true,"backend":"a1","seen_peer":"10.244.1.10:40000","peer":"10.96.0.10:80","error":null,"elapsed_ms":3}
{"ok":false,"error":"TimedOut: connection timed out (connect)","elapsed_ms":2000}
"#;
        let ex = Exchange::parse_lines(out).expect("parse");
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].backend.as_deref(), Some("a1"));
        assert_eq!(
            ex[0].seen_ip(),
            Some(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10)))
        );
        assert_eq!(ex[0].peer_addr(), Some("10.96.0.10:80".parse().unwrap()));
        assert!(!ex[1].ok);
        assert_eq!(ex[1].elapsed_ms, 2000);
        assert!(ex[1].backend.is_none());
    }

    #[test]
    fn bin_path_names_the_fix() {
        let e = bin_path("no-such-binary-here").unwrap_err().to_string();
        assert!(e.contains("cargo build --bins"), "{e}");
    }
}
