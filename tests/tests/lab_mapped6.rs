//! IPv4-mapped IPv6 ClusterIPs in the reference lab: real agents (default flags, the example
//! manifests), real dual-stack AF_INET6 sockets (IPV6_V6ONLY off) in a pod of node1 that
//! connect or send to `::ffff:<ClusterIP>`, as Java does on hosts with IPv6. The cgroup
//! programs translate them to `::ffff:<backend>` and back (connect6, sendmsg4 after the
//! kernel's hand-over of a mapped datagram, recvmsg6, getpeername6: see lb-ebpf's sock.rs).
use std::collections::{BTreeMap, BTreeSet};

use lb_tests::lab::{all_ok, socket_level_spread, Exchange};
use lb_tests::scenario::{fenced_manifests, start_example as setup, Running};

const ECHO: &str = "[::ffff:10.96.0.10]:80";
/// A Service without any endpoint.
const EMPTY: &str = "[::ffff:10.96.0.30]:80";
/// ClientIP affinity, 2 s.
const STICKY: &str = "[::ffff:10.96.0.60]:80";
const STICKY_V4: &str = "10.96.0.60:80";

/// How much each socket-level counter of node1 moved while `f` ran.
fn deltas(s: &Running, f: impl FnOnce()) -> BTreeMap<String, u64> {
    let before = s.stats("node1");
    f();
    let after = s.stats("node1");
    after
        .iter()
        .filter(|(name, _)| name.starts_with("sock_"))
        .map(|(name, n)| (name.clone(), n - before.get(name).copied().unwrap_or(0)))
        .collect()
}

#[test]
fn lab_mapped6_tcp_and_udp_to_a_mapped_clusterip_reach_backends_and_show_the_clusterip() {
    let Some(s) = setup() else { return };
    let mut spreads = Vec::new();
    let d = deltas(&s, || {
        // TCP (connect6 + getpeername6) and unconnected UDP (sendto + recvfrom), each exchange on
        // a new AF_INET6 socket.
        for proto in ["tcp", "udp"] {
            let ex = s
                .lab
                .run_client("a1", &[proto, ECHO, "--count", "100"])
                .unwrap();
            assert_eq!(ex.len(), 100);
            // getpeername() (TCP) and the datagram's source (recvfrom) show the mapped
            // ClusterIP, not the backend; the backend sees the pod's own IPv4 address.
            let spread = socket_level_spread(&ex, proto, ECHO);
            spreads.push((proto, spread));
        }
        // Connected UDP (connect6, then send/recv): one backend for the socket's life, and
        // getpeername() shows the ClusterIP.
        let mut held = s.lab.hold_udp("a1", ECHO).unwrap();
        let first = held.first.clone().unwrap();
        assert!(first.ok, "{first:?}");
        assert_eq!(first.peer.as_deref(), Some(ECHO), "{first:?}");
        for _ in 0..3 {
            let e = held.exchange().unwrap();
            assert!(e.ok, "{e:?}");
            assert_eq!(e.peer.as_deref(), Some(ECHO), "{e:?}");
            assert_eq!(e.backend, first.backend, "{e:?}");
        }
        held.close().unwrap();
    });
    eprintln!("spreads: {spreads:?}; counters: {d:?}");
    // 100 TCP connects and the connected UDP socket; getpeername of both.
    assert!(d["sock_connect_xlate"] >= 101, "{d:?}");
    assert!(d["sock_getpeername_revnat"] >= 104, "{d:?}");
    // 100 unconnected datagrams out and their replies in.
    assert!(d["sock_sendmsg_xlate"] >= 100, "{d:?}");
    assert!(d["sock_recvmsg_revnat"] >= 100, "{d:?}");
}

#[test]
fn lab_mapped6_service_without_endpoints_is_refused_and_other_ipv6_is_untouched() {
    let Some(s) = setup() else { return };
    let d = deltas(&s, || {
        for proto in ["tcp", "udp"] {
            for e in s.lab.all_fail("a1", proto, EMPTY, 5, 3000) {
                // Rejected as kube-proxy does (ECONNREFUSED), not dropped, and at once.
                assert!(
                    e.error.as_deref().unwrap().starts_with("ConnectionRefused"),
                    "{proto}: {e:?}"
                );
                assert!(e.elapsed_ms < 500, "{proto}: {e:?}");
            }
        }
    });
    // 5 connects and 5 datagrams.
    assert_eq!(d["sock_no_backend"], 10, "{d:?}");
    assert_eq!(
        d["sock_connect_xlate"] + d["sock_sendmsg_xlate"],
        0,
        "{d:?}"
    );

    // IPv6 addresses that are not IPv4-mapped are left alone, even when their last 32 bits
    // are a ClusterIP (IPv4-compatible `::10.96.0.10`, NAT64 `64:ff9b::10.96.0.10`): the pod has
    // no IPv6 route, so they fail, and no socket-level counter moves.
    let d = deltas(&s, || {
        for target in ["[::a60:a]:80", "[64:ff9b::a60:a]:80", "[::a60:1e]:80"] {
            for proto in ["tcp", "udp"] {
                for e in s.lab.all_fail("a1", proto, target, 2, 1000) {
                    assert!(
                        !e.error.as_deref().unwrap().starts_with("ConnectionRefused"),
                        "{proto} {target}: {e:?}"
                    );
                }
            }
        }
    });
    assert!(d.values().all(|n| *n == 0), "{d:?}");
}

/// Session affinity keys on the pod's network namespace whichever family its sockets use: a
/// pod's IPv4 and IPv4-mapped IPv6 sockets to a ClientIP-affinity Service port share one
/// backend (TCP and UDP are two Service ports, with a record each).
#[test]
fn lab_mapped6_affinity_is_shared_with_the_pods_ipv4_sockets() {
    let Some(s) = setup() else { return };
    for proto in ["tcp", "udp"] {
        let mut seen = BTreeSet::new();
        for target in [STICKY_V4, STICKY, STICKY_V4, STICKY] {
            let ex = s
                .lab
                .run_client("a1", &[proto, target, "--count", "10"])
                .unwrap();
            all_ok(&ex, &format!("{proto} {target}"));
            seen.extend(ex.iter().map(|e| e.backend.clone().unwrap()));
        }
        assert_eq!(seen.len(), 1, "{proto}: {seen:?}");
    }
}

/// A connected AF_INET6 UDP socket to a mapped ClusterIP is translated once, at connect6; when
/// its backend leaves the Service, the agent terminates it (the socket iterator matches the
/// IPv4 peer the kernel keeps for a mapped connect), as it does AF_INET sockets.
#[test]
fn lab_mapped6_connected_udp_socket_to_a_removed_backend_is_terminated() {
    let Some(mut s) = setup() else { return };
    let again = s.connected_udp_socket_to_a_removed_backend_is_terminated(ECHO);
    assert_eq!(again.peer.as_deref(), Some(ECHO), "{again:?}");
}

/// loadBalancerSourceRanges for AF_INET6 sockets: one bound to the pod's address as
/// `::ffff:10.244.1.11` is judged by 10.244.1.11 (connect6 reads the socket's bound source,
/// sendmsg4 the datagram's), an unbound one as the node's own clients (README): refused while
/// no node address is in the ranges.
#[test]
fn lab_mapped6_source_ranges_judge_the_mapped_bound_source() {
    const FENCED: &str = "[::ffff:203.0.113.20]:80";
    let Some(mut s) = setup() else { return };
    let from_a2 = |s: &Running, proto: &str, bind: Option<&str>| {
        let mut args = vec![proto, FENCED, "--count", "3", "--timeout-ms", "1000"];
        args.extend(bind.iter().flat_map(|b| ["--bind", b]));
        s.lab.run_client("a2", &args).unwrap()
    };
    let refused = |ex: &[Exchange], what: &str| {
        assert!(
            !ex.is_empty()
                && ex.iter().all(|e| e
                    .error
                    .as_deref()
                    .is_some_and(|m| m.starts_with("PermissionDenied"))),
            "{what}: {ex:?}"
        );
    };
    // a2's own address is the range.
    s.apply(&fenced_manifests("[10.244.1.11/32]"), 2);
    for proto in ["tcp", "udp"] {
        let ex = from_a2(&s, proto, Some("::ffff:10.244.1.11"));
        all_ok(&ex, &format!("{proto} bound, in range"));
        assert!(
            ex.iter()
                .all(|e| e.backend.as_deref() == Some("a1") && e.peer.as_deref() == Some(FENCED)),
            "{ex:?}"
        );
        refused(&from_a2(&s, proto, None), &format!("{proto} unbound"));
    }
    // The range moves away from a2: its bound sockets are refused too, and counted.
    s.apply(&fenced_manifests("[192.168.100.100/32]"), 3);
    let before = s.stats("node1")["source_range_denied"];
    for proto in ["tcp", "udp"] {
        refused(
            &from_a2(&s, proto, Some("::ffff:10.244.1.11")),
            &format!("{proto} bound, outside"),
        );
    }
    assert_eq!(s.stats("node1")["source_range_denied"] - before, 6);
}

/// The links an agent of the previous version did not pin.
const NEW_LINKS: [&str; 4] = ["connect6", "sendmsg6", "recvmsg6", "getpeername6"];

/// An agent started over the pins of an agent that attached only the IPv4 hooks (the previous
/// version) attaches and pins the IPv6 ones; `lb-agent uninstall` removes them.
#[test]
fn lab_mapped6_agent_over_older_pins_attaches_the_new_hooks_and_uninstall_removes_them() {
    let Some(mut s) = setup() else { return };
    let node = s.lab.node("node1").clone();
    let links = node.bpffs.join("links");
    s.agents[0].stop().unwrap();
    // What the previous version left: the IPv4 hooks only (removing a pin detaches its link).
    for name in NEW_LINKS {
        std::fs::remove_file(links.join(name)).unwrap();
    }
    let d = deltas(&s, || {
        let _ = s
            .lab
            .run_client("a1", &["tcp", ECHO, "--count", "3", "--timeout-ms", "1000"])
            .unwrap();
    });
    assert_eq!(d["sock_connect_xlate"], 0, "IPv4 hooks only: {d:?}");

    let agent = lb_tests::lab::bin_path("lb-agent").unwrap();
    let mut again = s
        .lab
        .spawn_agent("node1", &agent, &s.manifests, &[])
        .unwrap();
    again
        .wait_for_log("attached to cgroup", std::time::Duration::from_secs(20))
        .unwrap();
    for name in NEW_LINKS {
        assert!(links.join(name).exists(), "links/{name} not pinned");
    }
    let d = deltas(&s, || {
        let ex = s
            .lab
            .run_client("a1", &["tcp", ECHO, "--count", "20"])
            .unwrap();
        all_ok(&ex, ECHO);
        assert!(ex.iter().all(|e| e.peer.as_deref() == Some(ECHO)), "{ex:?}");
    });
    assert!(d["sock_connect_xlate"] >= 20, "{d:?}");

    again.stop().unwrap();
    let removed = s.lab.uninstall_printing("node1");
    for name in NEW_LINKS {
        assert!(removed.contains(&format!("links/{name}")), "{removed}");
    }
    assert!(!links.exists(), "{removed}");
}

/// Which hook the kernel (6.18) runs for a dual-stack socket and a mapped peer, as lb-ebpf's
/// sock.rs documents it. With the agent stopped (its links stay attached), one link at a time
/// is removed, and what the remaining hooks still translate is measured: the counters, and the
/// peer the application reads.
#[test]
fn lab_mapped6_hooks_the_kernel_runs_for_mapped_addresses() {
    let Some(mut s) = setup() else { return };
    let links = s.lab.node("node1").bpffs.join("links");
    s.agents[0].stop().unwrap();
    // 10 exchanges of `proto` from a1 to the mapped ClusterIP, and the counter deltas.
    let run = |what: &str, proto: &str| -> (BTreeMap<String, u64>, Vec<Exchange>) {
        let mut ex = Vec::new();
        let d = deltas(&s, || {
            ex = s
                .lab
                .run_client(
                    "a1",
                    &[proto, ECHO, "--count", "10", "--timeout-ms", "2000"],
                )
                .unwrap();
        });
        eprintln!("{what}, {proto}: {d:?}, first {:?}", ex.first());
        (d, ex)
    };
    // Whether every exchange was served and read the ClusterIP as its peer (true) or every one
    // a backend (false).
    let reads_frontend = |ex: &[Exchange]| {
        all_ok(ex, "mapped");
        let frontend = ex.iter().all(|e| e.peer.as_deref() == Some(ECHO));
        let backend = ex
            .iter()
            .all(|e| e.peer.as_deref().unwrap().starts_with("[::ffff:10.244."));
        assert!(frontend || backend, "{ex:?}");
        frontend
    };
    let unlink = |name: &str| {
        std::fs::remove_file(links.join(name)).unwrap();
        // The kernel releases an unpinned link after an RCU grace period.
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let (d, ex) = run("every hook", "udp");
    assert_eq!(
        (d["sock_sendmsg_xlate"], d["sock_recvmsg_revnat"]),
        (10, 10)
    );
    assert!(reads_frontend(&ex));
    let (d, ex) = run("every hook", "tcp");
    assert_eq!(
        (d["sock_connect_xlate"], d["sock_getpeername_revnat"]),
        (10, 10)
    );
    assert!(reads_frontend(&ex));

    // recvfrom on an AF_INET6 socket runs recvmsg6 (with the mapped source), never recvmsg4.
    unlink("recvmsg6");
    let (d, ex) = run("without recvmsg6", "udp");
    assert_eq!((d["sock_sendmsg_xlate"], d["sock_recvmsg_revnat"]), (10, 0));
    assert!(!reads_frontend(&ex));
    // getpeername runs getpeername6, never getpeername4.
    unlink("getpeername6");
    let (d, ex) = run("without getpeername6", "tcp");
    assert_eq!(
        (d["sock_connect_xlate"], d["sock_getpeername_revnat"]),
        (10, 0)
    );
    assert!(!reads_frontend(&ex));
    // Once the connect or send hook is gone, the pod's packets to the ClusterIP meet the node's
    // tc program on cni0 instead; whether that serves them is not this test's business.
    // sendto a mapped destination runs sendmsg4 (the kernel hands the datagram to the IPv4
    // path first): with sendmsg6 still attached, nothing translates it at socket level.
    unlink("sendmsg4");
    let (d, _) = run("without sendmsg4", "udp");
    assert_eq!(d["sock_sendmsg_xlate"], 0, "{d:?}");
    // TCP connect runs connect6, never connect4.
    unlink("connect6");
    let (d, _) = run("without connect6", "tcp");
    assert_eq!(d["sock_connect_xlate"], 0, "{d:?}");
}
