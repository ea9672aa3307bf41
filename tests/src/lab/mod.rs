//! The reference lab: a small cluster in network namespaces (shared/LAB.md).
//!
//! ```text
//!             ┌──────────── fabric: bridge br0, 192.168.100.0/24, fd00:100::/64 ──────────────┐
//!    client .100, ::100          node1 .1, ::1 (zone-a)               node2 .2, ::2 (zone-b)
//!                                eth0                                 eth0
//!                                cni0 10.244.1.1/24                   cni0 10.244.2.1/24
//!                                     fd00:244:1::1/64                     fd00:244:2::1/64
//!                                 ├─ a1 10.244.1.10, fd00:244:1::10    ├─ b1 10.244.2.10, fd00:244:2::10
//!                                 └─ a2 10.244.1.11, fd00:244:1::11    └─ b2 10.244.2.11, fd00:244:2::11
//! ```
//!
//! The lab is dual-stack: every fabric host, node bridge and pod has an IPv6 address next to
//! its IPv4 one ([`CLIENT_ADDR6`], [`Node::addr6`], [`Node::gateway6`], [`Pod::addr6`];
//! [`Family`] picks one family's for a test written once for both). The IPv6 side mirrors the
//! IPv4 one: the nodes forward IPv6 and route each other's pod subnet
//! (`fd00:244:N::/64`) via the other's fabric address, the fabric hosts have permanent
//! neighbour entries for each other's IPv6 addresses (as for IPv4), pods resolve their gateway
//! by neighbour discovery, the client reaches pod subnets through [`Lab::client_route`], and
//! every echo server answers on IPv6 too (separate IPV6_V6ONLY sockets, so IPv4 peers still
//! show as IPv4). Addresses are added without duplicate address detection, and DAD, router
//! solicitations and router advertisements are off, so an address works as soon as it is
//! added. IPv6 is enabled only on the interfaces that carry it (the fabric bridge, its ports
//! and the `cni0` ports stay without), which keeps the wire's own IPv6 traffic to the multicast
//! listener reports of interface setup; the datapath programs pass IPv6 untouched.
//!
//! Every name the lab creates (network namespaces, cgroup and bpffs directories, the temp dir)
//! starts with a prefix unique to the lab (`lb<pid>x<n>`), so several labs can coexist.
//! Dropping the [`Lab`] removes all of it, also when a test panics.
//!
//! Names of lab places (`"client"`, `"fabric"`, `"node1"`, `"a1"`, ...) are the short names
//! below; accessors that take such a name ([`Lab::node`], [`Lab::pod`], [`Lab::pod_command`],
//! ...) panic with a clear message on an unknown name, as that is a bug in the test. Everything
//! that does I/O returns a `Result`.
//!
//! The parts: `topology.rs` builds the namespaces, bridges, routes and echo servers,
//! `agents.rs` runs the agents on the nodes, `traffic.rs` runs `lab-client` at a place and
//! `cleanup.rs` removes everything again.
use std::{
    env,
    ffi::OsStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::{atomic::AtomicU32, Arc, Mutex, MutexGuard},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::{self, ManagedProcess};

mod agents;
mod cleanup;
mod topology;
mod traffic;

pub use agents::AgentProcess;
pub use traffic::{all_ok, by_backend, socket_level_spread, Exchange, HeldConnection};

/// The client's address on the fabric.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 100);
/// The client's IPv6 address on the fabric (`fd00:100::/64`).
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x100);
/// Ports every pod's echo server listens on, for TCP and UDP.
pub const ECHO_PORTS: [u16; 2] = [8080, 9090];
/// The cluster's pod network (both nodes' pod CIDRs).
pub const CLUSTER_POD_CIDR: &str = "10.244.0.0/16";
/// The cluster's IPv6 pod network (both nodes' `fd00:244:N::/64`).
pub const CLUSTER_POD_CIDR6: &str = "fd00:244::/32";
/// The device the agents attach to on each node (its fabric interface).
pub const NODE_DEVICE: &str = "eth0";

/// The two shapes of the lab (shared/LAB.md); tests that depend on the datapath's forwarding
/// run on both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// The topology as written: nothing runs on the fabric side of the nodes' `eth0` veths (as
    /// on kind, k3d or any node that is a container), so XDP_TX out of `eth0` would be dropped;
    /// the agent's `--north-south auto` picks tc ingress there.
    Plain,
    /// An XDP_PASS program on the fabric side of each node's `eth0`, so XDP_TX delivers (as a
    /// NIC driver with native XDP does); `--north-south auto` picks XDP.
    Xdp,
}

impl Variant {
    pub const ALL: [Variant; 2] = [Variant::Plain, Variant::Xdp];

    /// `plain` or `xdp` (the suffix of the tests' names).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Xdp => "xdp",
        }
    }

    /// The north-south hook the agents choose on the nodes' `eth0` with default flags.
    pub fn expected_hook(self) -> &'static str {
        match self {
            Variant::Plain => "tc",
            Variant::Xdp => "xdp",
        }
    }
}

/// The address family a test uses on the dual-stack lab: which of each host's two addresses
/// (and each node's two pod CIDRs) it picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// `ipv4` or `ipv6`.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The address a socket of this family binds to for "any".
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    /// The client's fabric address ([`CLIENT_ADDR`], [`CLIENT_ADDR6`]).
    pub fn client_addr(self) -> IpAddr {
        match self {
            Family::V4 => CLIENT_ADDR.into(),
            Family::V6 => CLIENT_ADDR6.into(),
        }
    }

    /// A node's fabric address ([`Node::addr`], [`Node::addr6`]).
    pub fn node_addr(self, node: &Node) -> IpAddr {
        match self {
            Family::V4 => node.addr.into(),
            Family::V6 => node.addr6.into(),
        }
    }

    /// A node's pod CIDR ([`Node::pod_cidr`], [`Node::pod_cidr6`]).
    pub fn pod_cidr(self, node: &Node) -> &str {
        match self {
            Family::V4 => &node.pod_cidr,
            Family::V6 => &node.pod_cidr6,
        }
    }

    /// A pod's address ([`Pod::addr`], [`Pod::addr6`]).
    pub fn pod_addr(self, pod: &Pod) -> IpAddr {
        match self {
            Family::V4 => pod.addr.into(),
            Family::V6 => pod.addr6.into(),
        }
    }
}

/// A node of the lab.
#[derive(Debug, Clone)]
pub struct Node {
    /// `node1`, `node2`.
    pub name: String,
    /// Full network namespace name (under /run/netns).
    pub netns: String,
    /// Fabric (InternalIP) address, on `eth0`.
    pub addr: Ipv4Addr,
    /// Fabric IPv6 address (`fd00:100::N`), on `eth0`.
    pub addr6: Ipv6Addr,
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
    /// `fd00:244:N::/64`.
    pub pod_cidr6: String,
    /// `fd00:244:N::1`, the node's IPv6 address on `cni0` and its pods' IPv6 default gateway.
    pub gateway6: Ipv6Addr,
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
    /// The pod's IPv6 address (`fd00:244:N::10`, `::11`).
    pub addr6: Ipv6Addr,
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
    /// Plain or XDP (what runs on the fabric side of the nodes' `eth0`).
    pub variant: Variant,
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
    /// Guests (`add_guest`): place name and full namespace name.
    guests: Vec<(String, String)>,
    created_cgroups: Vec<PathBuf>,
    created_bpffs: Vec<PathBuf>,
    echo: Vec<ManagedProcess>,
    /// XDP_PASS programs on the nodes' fabric ports (XDP variant), attached while these are
    /// open.
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock must not stop the cleanup.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lab {
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

    /// A pod's IPv6 address. Panics on an unknown pod.
    pub fn pod_addr6(&self, pod: &str) -> Ipv6Addr {
        self.pod(pod).addr6
    }

    pub fn client_addr(&self) -> Ipv4Addr {
        CLIENT_ADDR
    }

    pub fn client_addr6(&self) -> Ipv6Addr {
        CLIENT_ADDR6
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
                .chain(self.guests.iter().map(|(n, ns)| (n, ns)))
                .find(|(name, _)| *name == place)
                .map_or_else(|| place.to_string(), |(_, ns)| ns.clone()),
        }
    }

    /// The cgroup processes at `place` run in: the node's for a node or its pods, none for the
    /// client and the fabric.
    fn place_cgroup(&self, place: &str) -> Result<Option<&Path>> {
        match place {
            "client" | "fabric" => Ok(None),
            _ if self.guests.iter().any(|(n, _)| n == place) => Ok(None),
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
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    it.map(String::as_str).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_path_names_the_fix() {
        let e = bin_path("no-such-binary-here").unwrap_err().to_string();
        assert!(e.contains("cargo build --bins"), "{e}");
    }
}
