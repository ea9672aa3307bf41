//! IPv6 Services at socket level on the real kernel: the real agent (`--device none`, its
//! default flags otherwise) programs a dual-stack and an IPv6-only Service from real manifests
//! into real maps, and its cgroup programs translate real AF_INET6 sockets of a process in its
//! cgroup: connect6 to an IPv6 ClusterIP reaches every backend, getpeername6 and recvmsg6 show
//! the ClusterIP, sendmsg6 balances unconnected UDP, ClientIP affinity pins a client, a Service
//! without endpoints is refused with ECONNREFUSED, and the same Service's IPv4 ClusterIP still
//! works. `lbctl` shows the IPv6 frontends and backends. A connected UDP socket to an IPv6
//! ClusterIP whose backend leaves the Service is terminated (ECONNABORTED) by the agent's
//! socket walk, and connects again to a live backend. Everything lives in a network namespace
//! the test creates (backends on its loopback), in a cgroup and bpffs directory of its own.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::ChildStdin,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{bin_path, Exchange},
    netns::{self, ManagedProcess, ScratchNetns},
};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses:
  - {type: InternalIP, address: 192.168.200.1}
  - {type: InternalIP, address: "fd00:200::1"}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: ClusterIP
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports:
  - {name: tcp, port: 80, targetPort: 8080, protocol: TCP}
  - {name: udp, port: 80, targetPort: 8080, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports:
- {name: tcp, port: 8080, protocol: TCP}
- {name: udp, port: 8080, protocol: UDP}
endpoints:
- {addresses: ["fd00:244::1"], nodeName: n1}
- {addresses: ["fd00:244::2"], nodeName: n1}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v4, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: tcp, port: 8080, protocol: TCP}
- {name: udp, port: 8080, protocol: UDP}
endpoints:
- {addresses: [10.244.0.1], nodeName: n1}
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  type: ClusterIP
  ipFamilies: [IPv6]
  clusterIPs: ["fd00:96::60"]
  sessionAffinity: ClientIP
  ports: [{name: tcp, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-v6, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv6
ports: [{name: tcp, port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["fd00:244::1"], nodeName: n1}
- {addresses: ["fd00:244::2"], nodeName: n1}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  type: ClusterIP
  ipFamilies: [IPv6]
  clusterIPs: ["fd00:96::30"]
  ports: [{name: tcp, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: fenced, namespace: default}
spec:
  type: LoadBalancer
  ipFamilies: [IPv6]
  clusterIPs: ["fd00:96::70"]
  loadBalancerSourceRanges: ["fd00:244::1/128"]
  ports: [{name: tcp, port: 80, targetPort: 8080, nodePort: 30110, protocol: TCP}]
status:
  loadBalancer: {ingress: [{ip: "2001:db8::70"}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: fenced-v6, namespace: default, labels: {kubernetes.io/service-name: fenced}}
addressType: IPv6
ports: [{name: tcp, port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["fd00:244::2"], nodeName: n1}
"#;

/// Backends: (name, address) on the namespace's loopback.
const BACKENDS: [(&str, &str); 3] = [
    ("b1", "fd00:244::1"),
    ("b2", "fd00:244::2"),
    ("v4", "10.244.0.1"),
];

/// Enters `ns` on the calling thread only (setns acts per thread).
fn enter(ns: &Path) {
    let f = fs::File::open(ns).unwrap();
    // SAFETY: setns with a valid namespace fd.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
}

/// TCP and UDP echo servers answering `NAME PEER\n` (as lab-echo does), bound in `ns`.
fn start_echo(ns: &Path, name: &'static str, addr: &str) {
    let at: SocketAddr = SocketAddr::new(addr.parse().unwrap(), 8080);
    let (tx, rx) = std::sync::mpsc::channel();
    let ns_tcp = ns.to_path_buf();
    let tx2 = tx.clone();
    thread::spawn(move || {
        enter(&ns_tcp);
        let l = TcpListener::bind(at).unwrap();
        tx2.send(()).unwrap();
        for c in l.incoming().flatten() {
            thread::spawn(move || {
                let peer = c.peer_addr().unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut w = c;
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if w.write_all(format!("{name} {peer}\n").as_bytes()).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    let ns_udp = ns.to_path_buf();
    thread::spawn(move || {
        enter(&ns_udp);
        let u = UdpSocket::bind(at).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((_, from)) = u.recv_from(&mut buf) {
            let _ = u.send_to(format!("{name} {from}\n").as_bytes(), from);
        }
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

struct Setup {
    ns: ScratchNetns,
    cgroup: PathBuf,
    bpffs: PathBuf,
    agent: ManagedProcess,
    log: PathBuf,
    manifests: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.agent.stop();
        if let Ok(bin) = bin_path("lb-agent") {
            let _ = Command::new(bin)
                .args(["uninstall", "--bpffs"])
                .arg(&self.bpffs)
                .output();
        }
        let _ = fs::remove_dir(&self.cgroup);
        let _ = fs::remove_dir_all(&self.bpffs);
        let _ = fs::remove_file(&self.log);
        let _ = fs::remove_file(&self.manifests);
        if let Some(dir) = self.manifests.parent() {
            let _ = fs::remove_dir(dir);
        }
    }
}

impl Setup {
    fn lbctl(&self, args: &[&str]) -> String {
        let out = Command::new(bin_path("lbctl").unwrap())
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lbctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `lab-client ARGS` in the namespace and the agent's cgroup.
    fn client(&self, args: &[&str]) -> Vec<Exchange> {
        let mut cmd = netns::command_in(
            &self.ns.name,
            Some(&self.cgroup),
            bin_path("lab-client").unwrap(),
        );
        cmd.args(args).stdin(Stdio::null());
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "lab-client {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Exchange::parse_lines(&String::from_utf8_lossy(&out.stdout)).unwrap()
    }

    fn agent_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The scratch namespace, cgroup, bpffs and files of one test are named `lbs6TAG` + the
/// process id: tests of this file run in parallel threads of one process.
fn setup(tag: &str) -> Option<Setup> {
    lb_tests::require_privileges()?;
    let name = format!("lbs6{tag}");
    let ns = ScratchNetns::new(&name).unwrap();
    for (_, a) in BACKENDS {
        let len = if a.contains(':') { "128" } else { "32" };
        netns::ip(
            &ns.name,
            &["addr", "add", &format!("{a}/{len}"), "dev", "lo", "nodad"],
        )
        .or_else(|_| {
            netns::ip(
                &ns.name,
                &["addr", "add", &format!("{a}/{len}"), "dev", "lo"],
            )
        })
        .unwrap();
    }
    for (name, a) in BACKENDS {
        start_echo(&ns.path(), name, a);
    }
    let root = netns::mount_point("cgroup2").expect("a cgroup2 mount (see /proc/mounts)");
    let cgroup = root.join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&cgroup).unwrap();
    let bpffs = netns::ensure_bpffs()
        .unwrap()
        .join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&bpffs).unwrap();
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let manifests = dir.join("cluster.yaml");
    fs::write(&manifests, MANIFESTS).unwrap();
    let log = dir.join("agent.log");
    let mut cmd = netns::command_in(&ns.name, None, bin_path("lb-agent").unwrap());
    cmd.args(["run", "--node", "n1", "--manifests"])
        .arg(&manifests)
        .arg("--cgroup")
        .arg(&cgroup)
        .arg("--bpffs")
        .arg(&bpffs)
        .args(["--device", "none"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(fs::File::create(&log).unwrap());
    let agent = ManagedProcess::spawn("agent", cmd).unwrap();
    let mut s = Setup {
        ns,
        cgroup,
        bpffs,
        agent,
        log,
        manifests,
    };
    // Programmed: every IPv6 frontend in the maps (as lbctl reads them).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = s.bpffs.join(lb_common::map_name::ADDR6).exists() && {
            let out = Command::new(bin_path("lbctl").unwrap())
                .arg("--bpffs")
                .arg(&s.bpffs)
                .args(["services", "-o", "json"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            [
                "[fd00:96::10]:80",
                "[fd00:96::60]:80",
                "[fd00:96::30]:80",
                "[2001:db8::70]:80",
            ]
            .iter()
            .all(|f| text.contains(f))
        };
        if ok {
            break;
        }
        assert!(
            s.agent.is_running() && Instant::now() < deadline,
            "the agent did not program the IPv6 frontends: {}",
            s.agent_log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    Some(s)
}

fn counts(ex: &[Exchange]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in ex {
        *m.entry(e.backend.clone().unwrap_or_default()).or_default() += 1;
    }
    m
}

#[test]
fn kernel_sock6_ipv6_cluster_ips_are_translated_both_ways_at_socket_level() {
    let Some(s) = setup("") else { return };
    let cip = "[fd00:96::10]:80";
    for proto in ["tcp", "udp"] {
        let ex = s.client(&[proto, cip, "--count", "60"]);
        assert_eq!(ex.len(), 60);
        for e in &ex {
            assert!(e.ok, "{proto}: {e:?}\n{}", s.agent_log());
            // getpeername6 (TCP) and recvmsg6 (UDP) show the ClusterIP, not the backend.
            assert_eq!(e.peer.as_deref(), Some(cip), "{proto}: {e:?}");
            // The backend sees the client's own IPv6 address: no SNAT at socket level.
            assert!(e.seen_addr().is_some_and(|a| a.is_ipv6()), "{proto}: {e:?}");
        }
        let by = counts(&ex);
        assert_eq!(
            by.keys().cloned().collect::<BTreeSet<_>>(),
            ["b1".to_string(), "b2".to_string()].into(),
            "{proto}: both IPv6 backends and only them: {by:?}"
        );
    }
    // A connected UDP socket (connect6) keeps its backend and reads the ClusterIP as its peer.
    let ex = s.client(&["udp-connected", cip, "--count", "20"]);
    assert!(
        ex.iter().all(|e| e.ok && e.peer.as_deref() == Some(cip)),
        "{ex:?}"
    );
    // The dual-stack Service's IPv4 ClusterIP goes to its IPv4 endpoint only.
    let ex = s.client(&["tcp", "10.96.0.10:80", "--count", "10"]);
    assert!(
        ex.iter()
            .all(|e| e.ok && e.backend.as_deref() == Some("v4")),
        "{ex:?}"
    );
    // ClientIP affinity: every new connection of this client goes to one backend.
    let ex = s.client(&["tcp", "[fd00:96::60]:80", "--count", "30"]);
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
    assert_eq!(counts(&ex).len(), 1, "pinned: {:?}", counts(&ex));
    // No endpoint: refused as kube-proxy's REJECT does, at once.
    let ex = s.client(&[
        "tcp",
        "[fd00:96::30]:80",
        "--count",
        "3",
        "--timeout-ms",
        "3000",
    ]);
    for e in &ex {
        assert!(
            e.error
                .as_deref()
                .is_some_and(|m| m.starts_with("ConnectionRefused")),
            "{e:?}"
        );
    }
    // loadBalancerSourceRanges on an IPv6 LoadBalancer IP (one LPM lookup in the IPv6 trie): a
    // socket bound to a source inside the ranges is admitted; an unbound one (its source will
    // be a node address, none of which is in the ranges) and one bound outside are refused.
    let lb = "[2001:db8::70]:80";
    let ex = s.client(&["tcp", lb, "--count", "3", "--bind", "fd00:244::1"]);
    assert!(
        ex.iter()
            .all(|e| e.ok && e.backend.as_deref() == Some("b2")),
        "{ex:?}"
    );
    for bind in [None, Some("fd00:244::2")] {
        let mut args = vec!["tcp", lb, "--count", "2", "--timeout-ms", "2000"];
        if let Some(b) = bind {
            args.extend(["--bind", b]);
        }
        let ex = s.client(&args);
        assert!(
            ex.iter().all(|e| !e.ok
                && e.error
                    .as_deref()
                    .is_some_and(|m| m.starts_with("PermissionDenied"))),
            "{bind:?}: {ex:?}"
        );
    }
    // Another IPv6 address is left alone (a backend reached directly).
    let ex = s.client(&["tcp", "[fd00:244::2]:8080", "--count", "3"]);
    assert!(
        ex.iter().all(|e| e.ok
            && e.backend.as_deref() == Some("b2")
            && e.peer.as_deref() == Some("[fd00:244::2]:8080")),
        "{ex:?}"
    );
    // lbctl shows the IPv6 frontends with their family, resolved backends and the Service port's
    // own identity; the backends list the IPv6 ones.
    let services = s.lbctl(&["services", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&services).unwrap();
    let fe = v
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["frontend"] == cip && f["protocol"] == "TCP")
        .unwrap_or_else(|| panic!("{services}"));
    assert_eq!(fe["family"], "IPv6", "{fe}");
    assert_eq!(fe["scope"], "internal", "{fe}");
    assert_eq!(fe["service"], "default/web:tcp/TCP/IPv6", "{fe}");
    let mut b: Vec<&str> = fe["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    b.sort();
    assert_eq!(b, ["[fd00:244::1]:8080", "[fd00:244::2]:8080"], "{fe}");
    let table = s.lbctl(&["services", "--service", "default/web"]);
    assert!(
        table.contains(cip) && table.contains("10.96.0.10:80"),
        "{table}"
    );
    let backends = s.lbctl(&["backends"]);
    assert!(backends.contains("[fd00:244::1]:8080"), "{backends}");
    let aff = s.lbctl(&["affinity"]);
    assert!(
        aff.contains("[fd00:244::"),
        "the pinned IPv6 backend: {aff}"
    );
}

/// One connected UDP socket kept by `lab-client hold-udp` in the namespace and the agent's
/// cgroup: one exchange at start, one more per [`Held::exchange`]; after a failed exchange the
/// next one connects a new socket (as an application does after ECONNABORTED).
struct Held {
    _process: ManagedProcess,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Held {
    fn open(s: &Setup, target: &str) -> (Self, Exchange) {
        let mut cmd =
            netns::command_in(&s.ns.name, Some(&s.cgroup), bin_path("lab-client").unwrap());
        cmd.args(["hold-udp", target, "--timeout-ms", "1000"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut process = ManagedProcess::spawn(format!("hold-udp {target}"), cmd).unwrap();
        let stdin = process.child_mut().stdin.take().unwrap();
        let stdout = process.child_mut().stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut h = Held {
            _process: process,
            stdin,
            lines,
        };
        let first = h.next();
        (h, first)
    }

    fn next(&mut self) -> Exchange {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .expect("a lab-client line");
        Exchange::parse_lines(&line).unwrap().remove(0)
    }

    fn exchange(&mut self) -> Exchange {
        self.stdin.write_all(b"next\n").unwrap();
        self.stdin.flush().unwrap();
        self.next()
    }
}

/// The manifests without endpoint `addr` in EndpointSlice `slice`.
fn without_endpoint(manifests: &str, slice: &str, addr: &str) -> String {
    let docs: Vec<String> = manifests
        .split("\n---\n")
        .map(|d| {
            if d.contains(&format!("metadata: {{name: {slice},")) {
                let line = format!("- {{addresses: [\"{addr}\"], nodeName: n1}}");
                assert!(d.contains(&line), "{d}");
                d.lines()
                    .filter(|l| *l != line)
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                d.to_string()
            }
        })
        .collect();
    docs.join("\n---\n")
}

#[test]
fn kernel_sock6_connected_udp_socket_to_a_removed_ipv6_backend_is_terminated() {
    let Some(s) = setup("t") else { return };
    let cip = "[fd00:96::10]:80";
    // Connected UDP sockets to the IPv6 ClusterIP until both backends hold one (connect6
    // picks at random), and one to the IPv4 ClusterIP of the same Service.
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    for _ in 0..40 {
        let (h, first) = Held::open(&s, cip);
        assert!(first.ok, "{first:?}\n{}", s.agent_log());
        assert_eq!(first.peer.as_deref(), Some(cip), "{first:?}");
        held.entry(first.backend.unwrap()).or_insert(h);
        if held.len() == 2 {
            break;
        }
    }
    assert_eq!(held.len(), 2, "both backends: {:?}", held.keys());
    let (mut v4, first) = Held::open(&s, "10.96.0.10:80");
    assert!(
        first.ok && first.backend.as_deref() == Some("v4"),
        "{first:?}"
    );
    let mut doomed = held.remove("b1").unwrap();
    let mut stays = held.remove("b2").unwrap();
    // Each socket keeps its backend while the Service does not change.
    for (h, b) in [(&mut doomed, "b1"), (&mut stays, "b2"), (&mut v4, "v4")] {
        let e = h.exchange();
        assert!(e.ok && e.backend.as_deref() == Some(b), "{e:?}");
    }

    // fd00:244::1 leaves the Service (its echo server still answers: a socket still connected
    // to it would go on working).
    let tmp = s.manifests.with_extension("new");
    fs::write(&tmp, without_endpoint(MANIFESTS, "web-v6", "fd00:244::1")).unwrap();
    fs::rename(&tmp, &s.manifests).unwrap();
    let removed = Instant::now();
    let failed = loop {
        let e = doomed.exchange();
        if !e.ok {
            break e;
        }
        assert_eq!(e.backend.as_deref(), Some("b1"), "{e:?}");
        assert!(
            removed.elapsed() < Duration::from_secs(5),
            "the socket to the removed backend was not terminated: {}",
            s.agent_log()
        );
        thread::sleep(Duration::from_millis(50));
    };
    // ECONNABORTED (os error 103) when the abort is read; EDESTADDRREQ (os error 89) when
    // the socket was idle and lost its peer.
    let err = failed.error.clone().unwrap_or_default();
    assert!(
        err.contains("os error 103") || err.contains("os error 89"),
        "{failed:?}"
    );
    eprintln!(
        "terminated {:?} after the removal: {err}",
        removed.elapsed()
    );
    // The application connects again, to the live backend, still through the ClusterIP.
    let again = doomed.exchange();
    assert!(
        again.ok && again.backend.as_deref() == Some("b2") && again.peer.as_deref() == Some(cip),
        "{again:?}"
    );
    // The socket on the other IPv6 backend and the IPv4 one are left alone.
    for (h, b) in [(&mut stays, "b2"), (&mut v4, "v4")] {
        let e = h.exchange();
        assert!(e.ok && e.backend.as_deref() == Some(b), "{e:?}");
    }
    let log = s.agent_log();
    assert!(
        log.contains("sockets connected to removed backends: 1 terminated"),
        "{log}"
    );
}
