//! IPv6 twins of the ClusterIP and affinity lab tests, in the dual-stack reference lab: real
//! agents (default flags) on deploy/examples/lab.yaml, whose `dual-stack/echo` Service has an
//! IPv4 ClusterIP (10.96.0.110, endpoints a1 and b1) and an IPv6 one (fd00:96::110, endpoints
//! a1, a2, b1 and b2 by their IPv6 addresses). Pods reach the IPv6 ClusterIP through the
//! socket-level programs (connect6, sendmsg6, recvmsg6, getpeername6) and both families of the
//! one Service are served at the same time, each by its own endpoints.
use std::{collections::BTreeSet, thread};

use lb_tests::{
    lab::{by_backend, socket_level_spread, Exchange},
    scenario::{example_manifests, start_example as setup, without_endpoint},
};

const ECHO6: &str = "[fd00:96::110]:80";
const ECHO4: &str = "10.96.0.110:80";

/// Extra IPv6-only Services: `sticky6` (ClientIP affinity, 2 s, over a1, a2 and b1), `empty6`
/// (no endpoints) and `legacy-db6` (no selector: a hand-written EndpointSlice of a2's and b2's
/// second port, as the example's `legacy-db`).
fn with_ipv6_services() -> String {
    format!(
        "{}\n---
apiVersion: v1
kind: Service
metadata: {{name: sticky6, namespace: dual-stack}}
spec:
  ipFamilies: [IPv6]
  clusterIPs: [\"fd00:96::160\"]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 2}}}}
  ports: [{{name: tcp, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: sticky6-1, namespace: dual-stack, labels: {{kubernetes.io/service-name: sticky6}}}}
addressType: IPv6
ports: [{{name: tcp, port: 8080}}]
endpoints:
- {{addresses: [\"fd00:244:1::10\"], nodeName: node1}}
- {{addresses: [\"fd00:244:1::11\"], nodeName: node1}}
- {{addresses: [\"fd00:244:2::10\"], nodeName: node2}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty6, namespace: dual-stack}}
spec:
  ipFamilies: [IPv6]
  clusterIPs: [\"fd00:96::130\"]
  selector: {{app: nothing}}
  ports:
  - {{name: tcp, port: 80, targetPort: 8080}}
  - {{name: udp, port: 80, targetPort: 8080, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata: {{name: legacy-db6, namespace: dual-stack}}
spec:
  ipFamilies: [IPv6]
  clusterIPs: [\"fd00:96::125\"]
  ports: [{{port: 5432, targetPort: 9090}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: legacy-db6-manual, namespace: dual-stack, labels: {{kubernetes.io/service-name: legacy-db6}}}}
addressType: IPv6
ports: [{{port: 9090}}]
endpoints:
- {{addresses: [\"fd00:244:1::11\"], nodeName: node1}}
- {{addresses: [\"fd00:244:2::11\"], nodeName: node2}}
",
        example_manifests().trim_end()
    )
}

/// Every exchange answered, and the backend saw the pod's own IPv6 address (no SNAT at socket
/// level).
fn answered_from(ex: &[Exchange], pod_addr6: &str, what: &str) {
    for e in ex {
        assert!(e.ok, "{what}: {e:?}");
        assert_eq!(
            e.seen_ip().map(|a| a.to_string()).as_deref(),
            Some(pod_addr6),
            "{what}: {e:?}"
        );
    }
}

#[test]
fn lab_clusterip6_spreads_tcp_and_udp_over_four_ipv6_backends() {
    let Some(s) = setup() else { return };
    let a1 = s.lab.pod("a1").addr6.to_string();
    for proto in ["tcp", "udp"] {
        let ex = s
            .lab
            .run_client("a1", &[proto, ECHO6, "--count", "300"])
            .unwrap();
        assert_eq!(ex.len(), 300);
        answered_from(&ex, &a1, proto);
        // getpeername6 / the datagram's source read the IPv6 ClusterIP.
        let spread = socket_level_spread(&ex, proto, ECHO6);
        assert_eq!(spread.len(), 4, "{proto}: {spread:?}");
        for (b, n) in &spread {
            assert!(
                *n >= 45,
                "{proto}: backend {b} served {n} of 300 (< 15%): {spread:?}"
            );
        }
        eprintln!("{proto} spread over 300: {spread:?}");
    }
    let st = s.stats("node1");
    assert!(st["sock_connect_xlate"] >= 300, "{st:?}");
    assert!(st["sock_getpeername_revnat"] >= 300, "{st:?}");
    assert!(st["sock_sendmsg_xlate"] >= 300, "{st:?}");
    assert!(st["sock_recvmsg_revnat"] >= 300, "{st:?}");
    // node2's agent serves its own pods, over IPv6 too; a connected UDP socket keeps its backend.
    let ex = s
        .lab
        .run_client("b2", &["tcp", ECHO6, "--count", "20"])
        .unwrap();
    assert!(
        ex.iter().all(|e| e.ok && e.peer.as_deref() == Some(ECHO6)),
        "{ex:?}"
    );
    let mut held = s.lab.hold_udp("a1", ECHO6).unwrap();
    let first = held.first.clone().unwrap();
    assert!(
        first.ok && first.peer.as_deref() == Some(ECHO6),
        "{first:?}"
    );
    for _ in 0..3 {
        let e = held.exchange().unwrap();
        assert!(e.ok && e.backend == first.backend, "{e:?}");
    }
    held.close().unwrap();
}

/// One dual-stack Service, both families at once from one pod: the IPv4 ClusterIP reaches only
/// the IPv4 endpoints (a1, b1) with the pod's IPv4 address, the IPv6 one all four IPv6
/// endpoints with its IPv6 address; lbctl shows both families' frontends of the Service.
#[test]
fn lab_clusterip6_a_dual_stack_service_is_served_on_both_families_at_once() {
    let Some(s) = setup() else { return };
    let (a1_4, a1_6) = (
        s.lab.pod("a1").addr.to_string(),
        s.lab.pod("a1").addr6.to_string(),
    );
    let lab = &s.lab;
    let (ex4, ex6) = thread::scope(|sc| {
        let h4 = sc.spawn(|| lab.run_client("a1", &["tcp", ECHO4, "--count", "200"]));
        let h6 = sc.spawn(|| lab.run_client("a1", &["tcp", ECHO6, "--count", "200"]));
        (h4.join().unwrap().unwrap(), h6.join().unwrap().unwrap())
    });
    answered_from(&ex4, &a1_4, "IPv4");
    answered_from(&ex6, &a1_6, "IPv6");
    assert_eq!(
        by_backend(&ex4).keys().cloned().collect::<BTreeSet<_>>(),
        ["a1".to_string(), "b1".to_string()].into(),
        "{:?}",
        by_backend(&ex4)
    );
    assert_eq!(by_backend(&ex6).len(), 4, "{:?}", by_backend(&ex6));
    assert!(ex4.iter().all(|e| e.peer.as_deref() == Some(ECHO4)));
    assert!(ex6.iter().all(|e| e.peer.as_deref() == Some(ECHO6)));
    let v = s.lbctl_json("node1", "services");
    let mine: Vec<&serde_json::Value> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["service"]
                .as_str()
                .is_some_and(|n| n.starts_with("dual-stack/echo:tcp/TCP"))
        })
        .collect();
    let fams: BTreeSet<(String, String)> = mine
        .iter()
        .map(|f| {
            (
                f["family"].as_str().unwrap().to_string(),
                f["frontend"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        fams,
        [
            ("IPv4".to_string(), ECHO4.to_string()),
            ("IPv6".to_string(), ECHO6.to_string())
        ]
        .into(),
        "{v}"
    );
}

#[test]
fn lab_clusterip6_without_endpoints_is_refused_fast_selectorless_service_works_and_affinity_pins_a_pod(
) {
    let Some(mut s) = setup() else { return };
    s.apply(&with_ipv6_services(), 2);
    for proto in ["tcp", "udp"] {
        let ex = s
            .lab
            .run_client(
                "a1",
                &[
                    proto,
                    "[fd00:96::130]:80",
                    "--count",
                    "5",
                    "--timeout-ms",
                    "3000",
                ],
            )
            .unwrap();
        for e in &ex {
            assert!(
                e.error
                    .as_deref()
                    .is_some_and(|m| m.starts_with("ConnectionRefused")),
                "{proto}: {e:?}"
            );
            assert!(e.elapsed_ms < 500, "{proto}: not fast: {e:?}");
        }
    }
    // A Service without a selector, served from a hand-written IPv6 EndpointSlice.
    let ex = s
        .lab
        .run_client("a1", &["tcp", "[fd00:96::125]:5432", "--count", "40"])
        .unwrap();
    assert!(
        ex.iter()
            .all(|e| e.ok && e.peer.as_deref() == Some("[fd00:96::125]:5432")),
        "{ex:?}"
    );
    let spread = by_backend(&ex);
    assert_eq!(
        spread.keys().cloned().collect::<Vec<_>>(),
        ["a2", "b2"],
        "{spread:?}"
    );
    // ClientIP affinity at socket level (keyed on the pod's network namespace): every new
    // connection of a1 goes to one backend; the IPv4 Services' records are apart.
    let ex = s
        .lab
        .run_client("a1", &["tcp", "[fd00:96::160]:80", "--count", "30"])
        .unwrap();
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
    let pinned = by_backend(&ex);
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    // After the idle timeout (2 s) the pod chooses again (over 10 rounds, more than one
    // backend appears).
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(2600));
        let ex = s
            .lab
            .run_client("a1", &["tcp", "[fd00:96::160]:80", "--count", "1"])
            .unwrap();
        assert!(ex.iter().all(|e| e.ok), "{ex:?}");
        seen.extend(by_backend(&ex).into_keys());
        if seen.len() > 1 {
            break;
        }
    }
    assert!(seen.len() > 1, "the record never expired: {seen:?}");
    let aff = s.lbctl_json("node1", "affinity");
    assert!(
        aff.as_array().unwrap().iter().any(|r| r["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with("[fd00:244:"))),
        "{aff}"
    );
}

#[test]
fn lab_clusterip6_backend_removal_keeps_established_connection() {
    let Some(mut s) = setup() else { return };
    let mut held = s.lab.hold("a1", ECHO6).unwrap();
    let first = held.first.clone().unwrap();
    assert!(first.ok, "{first:?}");
    let pinned = first.backend.clone().unwrap();
    let addr6 = s.lab.pod(&pinned).addr6.to_string();
    s.apply(&without_endpoint(&addr6), 2);
    for proto in ["tcp", "udp"] {
        let ex = s
            .lab
            .run_client("a1", &[proto, ECHO6, "--count", "100"])
            .unwrap();
        assert!(ex.iter().all(|e| e.ok), "{proto}: {ex:?}");
        let spread = by_backend(&ex);
        assert!(
            !spread.contains_key(&pinned),
            "{proto}: removed backend {pinned} still chosen: {spread:?}"
        );
        assert_eq!(spread.len(), 3, "{spread:?}");
    }
    for _ in 0..3 {
        let e = held.exchange().unwrap();
        assert!(e.ok, "{e:?}");
        assert_eq!(e.backend.as_deref(), Some(pinned.as_str()));
    }
}

/// An AF_INET6 UDP socket connected to the IPv6 ClusterIP is translated once, at connect6; when
/// its backend leaves the Service (its IPv6 endpoint), the agent terminates it (the socket
/// iterator matches the socket's IPv6 peer, the backend's address), the application sees the
/// error and connects again, to a live IPv6 backend, and still reads the ClusterIP as the
/// reply's source.
#[test]
fn lab_clusterip6_connected_udp_socket_to_a_removed_backend_is_terminated() {
    let Some(mut s) = setup() else { return };
    let again = s.connected_udp_socket_to_a_removed_backend_is_terminated(ECHO6);
    assert_eq!(again.peer.as_deref(), Some(ECHO6), "{again:?}");
}

/// With `--terminate-tcp-sockets`, an established TCP connection to the IPv6 ClusterIP whose
/// backend's IPv6 endpoint left the Service is terminated too (ECONNABORTED).
#[test]
fn lab_clusterip6_tcp_connection_to_a_removed_backend_is_terminated_on_request() {
    let Some(mut s) = lb_tests::scenario::start_example_with(&["--terminate-tcp-sockets"]) else {
        return;
    };
    s.tcp_connection_to_a_removed_backend_is_terminated(ECHO6);
}
