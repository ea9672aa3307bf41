//! Building the lab: the namespaces, the fabric bridge and each node's `cni0` bridge, veth
//! pairs, addresses, neighbour entries and routes, the nodes' cgroups and bpffs directories, and
//! every pod's echo server.
use std::{
    env,
    fs::{self, File},
    io::{BufRead, BufReader},
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Stdio,
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Mutex,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::{bin_path, Lab, Node, Pod, Variant, CLIENT_ADDR, CLIENT_ADDR6, ECHO_PORTS};
use crate::netns::{self, ip, ManagedProcess};

/// How long [`Lab::new`] waits for an echo server to say `ready`.
const ECHO_READY_TIMEOUT: Duration = Duration::from_secs(10);

struct NodeSpec {
    name: &'static str,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
    zone: &'static str,
    /// N in 10.244.N.0/24 and fd00:244:N::/64.
    subnet: u8,
}

const NODE_SPECS: [NodeSpec; 2] = [
    NodeSpec {
        name: "node1",
        addr: Ipv4Addr::new(192, 168, 100, 1),
        addr6: Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1),
        zone: "zone-a",
        subnet: 1,
    },
    NodeSpec {
        name: "node2",
        addr: Ipv4Addr::new(192, 168, 100, 2),
        addr6: Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2),
        zone: "zone-b",
        subnet: 2,
    },
];

const POD_SPECS: [(&str, &str, Ipv4Addr, Ipv6Addr); 4] = [
    ("a1", "node1", Ipv4Addr::new(10, 244, 1, 10), pod6(1, 0x10)),
    ("a2", "node1", Ipv4Addr::new(10, 244, 1, 11), pod6(1, 0x11)),
    ("b1", "node2", Ipv4Addr::new(10, 244, 2, 10), pod6(2, 0x10)),
    ("b2", "node2", Ipv4Addr::new(10, 244, 2, 11), pod6(2, 0x11)),
];

/// `fd00:244:N::HOST`, an address in node N's IPv6 pod subnet (`HOST` in hex digits, as the
/// IPv4 address's last byte in decimal: `fd00:244:1::10` is the IPv6 twin of 10.244.1.10).
const fn pod6(subnet: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, subnet as u16, 0, 0, 0, 0, host)
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// The XDP variant ([`Variant::Xdp`]) of the lab, see [`Lab::new_variant`].
    pub fn new() -> Result<Lab> {
        Lab::new_variant(Variant::Xdp)
    }

    /// Builds the whole topology of `variant`, starts every pod's echo server and waits until
    /// they listen.
    pub fn new_variant(variant: Variant) -> Result<Lab> {
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
                addr6: s.addr6,
                zone: s.zone.into(),
                cgroup: cgroup_root.join(format!("{prefix}-{}", s.name)),
                bpffs: bpffs_root.join(format!("{prefix}-{}", s.name)),
                pod_cidr: format!("10.244.{}.0/24", s.subnet),
                gateway: Ipv4Addr::new(10, 244, s.subnet, 1),
                pod_cidr6: format!("fd00:244:{}::/64", s.subnet),
                gateway6: pod6(s.subnet, 1),
            })
            .collect();
        let pods = POD_SPECS
            .iter()
            .map(|(name, node, addr, addr6)| Pod {
                name: (*name).into(),
                node: (*node).into(),
                netns: format!("{prefix}-{name}"),
                addr: *addr,
                addr6: *addr6,
            })
            .collect();

        let mut lab = Lab {
            variant,
            client_netns: format!("{prefix}-client"),
            prefix,
            tmp,
            nodes,
            pods,
            created_netns: Vec::new(),
            guests: Vec::new(),
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
            // IPv6 is off except on the interfaces that carry the lab's IPv6 addresses
            // (`enable_ipv6`), to keep the wire quiet, so packet and counter assertions only see
            // the test's own traffic. Where it is on, addresses work at once (no duplicate
            // address detection) and no host solicits or accepts router advertisements.
            sysctl(
                ns,
                &[
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv6.conf.all.router_solicitations=0",
                    "net.ipv6.conf.default.router_solicitations=0",
                    "net.ipv6.conf.all.accept_ra=0",
                    "net.ipv6.conf.default.accept_ra=0",
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
        let mut fabric_hosts = vec![("client", client.clone(), CLIENT_ADDR, CLIENT_ADDR6)];
        fabric_hosts.extend(
            nodes
                .iter()
                .map(|n| (n.name.as_str(), n.netns.clone(), n.addr, n.addr6)),
        );
        for (port, ns, addr, addr6) in &fabric_hosts {
            veth(ns, "eth0", &fabric, port)?;
            ip(&fabric, &["link", "set", port, "master", "br0", "up"])?;
            ethtool(&fabric, port, &["tx", "off"])?;
            ethtool(ns, "eth0", &["tx", "off"])?;
            ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            enable_ipv6(ns, "eth0", &format!("{addr6}/64"))?;
            ip(ns, &["link", "set", "eth0", "up"])?;
        }
        // Permanent neighbour entries between the fabric hosts: the datapath's bpf_fib_lookup()
        // only finds neighbours the kernel already resolved (it never sends ARP itself), so
        // without them the first packets of a test, or any after an entry expired, would take
        // another path than the rest.
        // Static FDB entries on the bridge for the same MACs: with no ARP, the bridge would never
        // learn a node's MAC before that node sends something, and would flood traffic for it to
        // every port, where another node's XDP program would see (and might translate) a copy.
        // The same for IPv6 (neighbour discovery instead of ARP).
        let mut macs = Vec::new();
        for (port, ns, addr, addr6) in &fabric_hosts {
            let mac = mac_of(ns, "eth0")?;
            netns::run(
                "bridge",
                &[
                    "-n", &fabric, "fdb", "replace", &mac, "dev", port, "master", "static",
                ],
            )?;
            macs.push((ns.clone(), *addr, *addr6, mac));
        }
        for (ns, _, _, _) in &macs {
            for (_, addr, addr6, mac) in macs.iter().filter(|(o, _, _, _)| o != ns) {
                for a in [addr.to_string(), addr6.to_string()] {
                    ip(
                        ns,
                        &[
                            "neigh",
                            "replace",
                            &a,
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
        }
        // XDP variant: a node's XDP_TX out of eth0 lands on its fabric port, which only drains
        // XDP frames promptly when it has an XDP program itself (see crate::xdp), as a NIC with
        // native XDP would. The plain variant leaves the fabric side bare (kind, k3d).
        if self.variant == Variant::Xdp {
            for node in &nodes {
                self.xdp_links
                    .push(crate::xdp::attach_pass(&fabric, &node.name)?);
            }
        }
        // A client that accepted ICMP redirects would bypass the node a test routes it through.
        sysctl(
            &client,
            &[
                "net.ipv4.conf.all.accept_redirects=0",
                "net.ipv4.conf.eth0.accept_redirects=0",
                "net.ipv6.conf.all.accept_redirects=0",
                "net.ipv6.conf.eth0.accept_redirects=0",
            ],
        )?;

        for node in &nodes {
            let ns = &node.netns;
            sysctl(
                ns,
                &[
                    "net.ipv4.ip_forward=1",
                    // IPv6 has no send_redirects switch: the client ignores them instead.
                    "net.ipv6.conf.all.forwarding=1",
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
            enable_ipv6(ns, "cni0", &format!("{}/64", node.gateway6))?;
            ip(ns, &["link", "set", "cni0", "up"])?;
            for pod in pods.iter().filter(|p| p.node == node.name) {
                let port = format!("veth-{}", pod.name);
                veth(&pod.netns, "eth0", ns, &port)?;
                ip(ns, &["link", "set", &port, "master", "cni0", "up"])?;
                ethtool(ns, &port, &["tx", "off"])?;
                ethtool(&pod.netns, "eth0", &["tx", "off"])?;
                behind_bridge(&pod.netns, node, pod.addr, pod.addr6)?;
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
                ip(
                    ns,
                    &[
                        "-6",
                        "route",
                        "add",
                        &other.pod_cidr6,
                        "via",
                        &other.addr6.to_string(),
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

    /// Adds a guest behind `node`: a network namespace on the node's `cni0` bridge with addresses
    /// `addr` and `addr6` (in the node's pod CIDRs) and default routes via the node, outside the node's
    /// cgroup, so that no socket-level program of the node sees its sockets, as a VM or a
    /// nested namespace behind the node. Its name is a lab place (`command_at`, `tcp`, `udp`)
    /// without a cgroup; it is removed with the lab.
    pub fn add_guest(
        &mut self,
        node: &str,
        name: &str,
        addr: Ipv4Addr,
        addr6: Ipv6Addr,
    ) -> Result<()> {
        let node = self.find_node(node)?.clone();
        let ns = format!("{}-{name}", self.prefix);
        netns::run("ip", &["netns", "add", &ns])?;
        self.created_netns.push(ns.clone());
        sysctl(
            &ns,
            &[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        let port = format!("veth-{name}");
        veth(&ns, "eth0", &node.netns, &port)?;
        ip(&node.netns, &["link", "set", &port, "master", "cni0", "up"])?;
        ethtool(&node.netns, &port, &["tx", "off"])?;
        ethtool(&ns, "eth0", &["tx", "off"])?;
        ip(&ns, &["link", "set", "lo", "up"])?;
        behind_bridge(&ns, &node, addr, addr6)?;
        self.guests.push((name.to_string(), ns));
        Ok(())
    }

    /// Routes `dest` (a CIDR or a single address) from the client via `node`'s fabric address
    /// (its IPv6 one for an IPv6 `dest`), replacing an existing route to `dest` — as a cloud
    /// load balancer picks a node.
    pub fn client_route(&self, dest: &str, node: &str) -> Result<()> {
        let node = self.find_node(node)?;
        let via = if dest.contains(':') {
            node.addr6.to_string()
        } else {
            node.addr.to_string()
        };
        ip(
            &self.netns("client"),
            &["route", "replace", dest, "via", &via, "dev", "eth0"],
        )
        .with_context(|| format!("client route {dest} via {}", node.name))?;
        Ok(())
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

/// Gives `ns`'s `eth0` (a port of `node`'s `cni0`) its two addresses, brings it up and routes
/// both families by default via the bridge: a pod's setup, and a guest's.
fn behind_bridge(ns: &str, node: &Node, addr: Ipv4Addr, addr6: Ipv6Addr) -> Result<()> {
    ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    enable_ipv6(ns, "eth0", &format!("{addr6}/64"))?;
    ip(ns, &["link", "set", "eth0", "up"])?;
    ip(
        ns,
        &["route", "add", "default", "via", &node.gateway.to_string()],
    )?;
    let gw6 = node.gateway6.to_string();
    ip(
        ns,
        &["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"],
    )?;
    Ok(())
}

/// Turns IPv6 on for `dev` and `lo` in `ns` (off by default in the lab's namespaces; local
/// delivery of IPv6 goes through `lo`) and adds `cidr` to `dev` without duplicate address
/// detection, so it is usable at once.
fn enable_ipv6(ns: &str, dev: &str, cidr: &str) -> Result<()> {
    sysctl(
        ns,
        &[
            "net.ipv6.conf.lo.disable_ipv6=0",
            &format!("net.ipv6.conf.{dev}.disable_ipv6=0"),
        ],
    )?;
    ip(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"])?;
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
