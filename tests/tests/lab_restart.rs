//! Restart without loss: programs stay attached through pinned links while the agent is down
//! (SIGKILL included); established and new connections keep working; the restarted agent adopts
//! the pinned state without rewriting it (and the same north-south hook), IPv6 frontends and
//! their interned addresses included. Runs on both lab variants (`_plain`: tc ingress, `_xdp`:
//! XDP).
use std::time::Duration;

use lb_tests::{lab::bin_path, on_both_variants, scenario::start_example_on, Variant};

fn agent_sigkill_and_restart_lose_nothing(v: Variant) {
    let Some(mut s) = start_example_on(v) else {
        return;
    };
    s.lab.client_route("203.0.113.11/32", "node1").unwrap();
    // Held connections on both paths: north-south through XDP with SNAT, ClusterIP from a pod.
    let mut ns = s.lab.hold("client", "203.0.113.11:80").unwrap();
    let mut ew = s.lab.hold("a1", "10.96.0.10:80").unwrap();
    // And its IPv6 twin: a pod's connection to the dual-stack Service's IPv6 ClusterIP.
    let mut ew6 = s.lab.hold("a1", "[fd00:96::110]:80").unwrap();
    assert!(ns.first.as_ref().unwrap().ok && ew.first.as_ref().unwrap().ok);
    assert!(ew6.first.as_ref().unwrap().ok, "{:?}", ew6.first);

    let status = s.agents[0].stop_with(libc::SIGKILL).unwrap();
    assert!(!status.success(), "killed");
    for _ in 0..3 {
        assert!(ns.exchange().unwrap().ok);
        assert!(ew.exchange().unwrap().ok);
        assert!(ew6.exchange().unwrap().ok);
    }
    for (at, target) in [
        ("client", "203.0.113.11:80"),
        ("a1", "10.96.0.10:80"),
        ("a1", "[fd00:96::110]:80"),
    ] {
        let ex = s
            .lab
            .run_client(at, &["tcp", target, "--count", "20"])
            .unwrap();
        assert!(
            ex.iter().all(|e| e.ok),
            "new connections while the agent is down ({target}): {ex:?}"
        );
    }

    // The agent comes back on the same pins and finds nothing to rewrite.
    let mut again = s
        .lab
        .spawn_agent("node1", &bin_path("lb-agent").unwrap(), &s.manifests, &[])
        .unwrap();
    again
        .wait_for_log("sync generation 1:", Duration::from_secs(20))
        .unwrap();
    let log = again.log();
    let line = log
        .lines()
        .find(|l| l.contains("sync generation 1:"))
        .unwrap();
    assert!(
        line.contains(" 0 map writes"),
        "adoption rewrote state: {line}"
    );
    assert!(
        log.contains(&format!(
            "device eth0: north-south hook {} ",
            v.expected_hook()
        )) && !log.contains("replaced the"),
        "the restarted agent must keep the hook: {log}"
    );
    for _ in 0..3 {
        assert!(ns.exchange().unwrap().ok);
        assert!(ew.exchange().unwrap().ok);
        assert!(ew6.exchange().unwrap().ok);
    }
    for (at, target) in [
        ("client", "203.0.113.11:80"),
        ("a1", "10.96.0.10:80"),
        ("a1", "[fd00:96::110]:80"),
    ] {
        let ex = s
            .lab
            .run_client(at, &["tcp", target, "--count", "20"])
            .unwrap();
        assert!(ex.iter().all(|e| e.ok), "after restart ({target}): {ex:?}");
    }
    // And it still applies changes.
    let text = lb_tests::scenario::example_manifests()
        .replace(
            "- {addresses: [10.244.2.11], nodeName: node2, zone: zone-b}\n",
            "",
        )
        .replace(
            "- {addresses: [\"fd00:244:2::11\"], nodeName: node2, zone: zone-b}\n",
            "",
        );
    std::fs::write(&s.manifests, text).unwrap();
    again
        .wait_for_log("sync generation 2:", Duration::from_secs(20))
        .unwrap();
    // The IPv6 endpoint's removal reached the maps the restarted agent adopted.
    let ex = s
        .lab
        .run_client("a1", &["tcp", "[fd00:96::110]:80", "--count", "40"])
        .unwrap();
    assert!(
        ex.iter()
            .all(|e| e.ok && e.backend.as_deref() != Some("b2")),
        "{ex:?}"
    );
    s.agents.push(again);
}
on_both_variants!(
    agent_sigkill_and_restart_lose_nothing:
    lab_agent_sigkill_and_restart_lose_nothing_plain,
    lab_agent_sigkill_and_restart_lose_nothing_xdp
);
