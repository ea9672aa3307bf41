//! End-to-end ClusterIP load balancing in the reference lab: real agents, real sockets, real
//! kernels. Socket-level translation for pods on a node (cgroup connect4/sendmsg4/recvmsg4/
//! getpeername4), from deploy/examples/lab.yaml.
use lb_tests::lab::{by_backend, socket_level_spread};

const ECHO: &str = "10.96.0.10:80";

use lb_tests::scenario::{start_example as setup, without_endpoint};

#[test]
fn lab_clusterip_spreads_tcp_and_udp_over_four_backends() {
    let Some(s) = setup() else { return };
    for proto in ["tcp", "udp"] {
        let ex = s
            .lab
            .run_client("a1", &[proto, ECHO, "--count", "300"])
            .unwrap();
        assert_eq!(ex.len(), 300);
        let spread = socket_level_spread(&ex, proto, ECHO);
        for (b, n) in &spread {
            assert!(
                *n >= 45,
                "{proto}: backend {b} served {n} of 300 (< 15%): {spread:?}"
            );
        }
        eprintln!("{proto} spread over 300: {spread:?}");
    }
    // The counters show the socket-level path did it.
    let st = s.stats("node1");
    assert!(st["sock_connect_xlate"] >= 300, "{st:?}");
    assert!(st["sock_getpeername_revnat"] >= 300, "{st:?}");
    assert!(st["sock_sendmsg_xlate"] >= 300, "{st:?}");
    assert!(st["sock_recvmsg_revnat"] >= 300, "{st:?}");
    // node2's agent serves its own pods.
    let ex = s
        .lab
        .run_client("b2", &["tcp", ECHO, "--count", "20"])
        .unwrap();
    assert!(
        ex.iter().all(|e| e.ok && e.peer.as_deref() == Some(ECHO)),
        "{ex:?}"
    );
}

#[test]
fn lab_clusterip_without_endpoints_is_refused_fast_and_selectorless_service_works() {
    let Some(s) = setup() else { return };
    for proto in ["tcp", "udp"] {
        let ex = s
            .lab
            .run_client(
                "a1",
                &[
                    proto,
                    "10.96.0.30:80",
                    "--count",
                    "5",
                    "--timeout-ms",
                    "3000",
                ],
            )
            .unwrap();
        for e in &ex {
            assert!(
                !e.ok,
                "{proto}: a Service without ready endpoints must fail: {e:?}"
            );
            // No endpoint anywhere: rejected as kube-proxy does (ECONNREFUSED), not dropped.
            assert!(
                e.error.as_deref().unwrap().starts_with("ConnectionRefused"),
                "{e:?}"
            );
            assert!(
                e.elapsed_ms < 500,
                "{proto}: failed after {} ms, not fast",
                e.elapsed_ms
            );
        }
    }
    // A Service without a selector, served from a hand-written EndpointSlice.
    let ex = s
        .lab
        .run_client("a1", &["tcp", "10.96.0.20:5432", "--count", "40"])
        .unwrap();
    assert!(
        ex.iter()
            .all(|e| e.ok && e.peer.as_deref() == Some("10.96.0.20:5432")),
        "{ex:?}"
    );
    let spread = by_backend(&ex);
    assert_eq!(
        spread.keys().cloned().collect::<Vec<_>>(),
        ["a2", "b2"],
        "{spread:?}"
    );
}

#[test]
fn lab_clusterip_backend_removal_keeps_established_connection() {
    let Some(mut s) = setup() else { return };
    let mut held = s.lab.hold("a1", ECHO).unwrap();
    let first = held.first.clone().unwrap();
    assert!(first.ok, "{first:?}");
    let pinned = first.backend.clone().unwrap();
    let addr = s.lab.pod(&pinned).addr.to_string();

    // Remove the held connection's backend from the Service (both ports of the slice).
    let without = without_endpoint(&addr);
    s.apply(&without, 2);

    // New connections and datagrams never reach the removed backend.
    for proto in ["tcp", "udp"] {
        let ex = s
            .lab
            .run_client("a1", &[proto, ECHO, "--count", "100"])
            .unwrap();
        assert!(ex.iter().all(|e| e.ok), "{proto}: {ex:?}");
        let spread = by_backend(&ex);
        assert!(
            !spread.contains_key(&pinned),
            "{proto}: removed backend {pinned} still chosen: {spread:?}"
        );
        assert_eq!(spread.len(), 3, "{spread:?}");
    }
    // The established connection keeps exchanging data with its backend.
    for _ in 0..3 {
        let e = held.exchange().unwrap();
        assert!(e.ok, "{e:?}");
        assert_eq!(e.backend.as_deref(), Some(pinned.as_str()));
    }
}

/// A connected UDP socket is translated once, at connect: flushing conntrack cannot move it.
/// When its backend leaves the Service, the agent terminates it (bpf_sock_destroy in the pod's
/// namespace), the application sees the error and connects again, to a live backend.
#[test]
fn lab_clusterip_connected_udp_socket_to_a_removed_backend_is_terminated() {
    let Some(mut s) = setup() else { return };
    s.connected_udp_socket_to_a_removed_backend_is_terminated(ECHO);
}

/// With `--terminate-tcp-sockets`, an established TCP connection to a backend that left the
/// Service is terminated too (by default it may finish, as the test above shows).
#[test]
fn lab_clusterip_tcp_connection_to_a_removed_backend_is_terminated_on_request() {
    let Some(mut s) = lb_tests::scenario::start_example_with(&["--terminate-tcp-sockets"]) else {
        return;
    };
    s.tcp_connection_to_a_removed_backend_is_terminated(ECHO);
}
