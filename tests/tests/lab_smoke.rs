//! The lab itself: pods reach each other across nodes without any agent, the client reaches a pod
//! through a node, and dropping the lab leaves nothing behind.
use lb_tests::{lab::Lab, netns::run};

#[test]
fn lab_builds_routes_and_cleans_up() {
    let Some(()) = lb_tests::require_privileges() else { return };
    let lab = Lab::new().expect("lab");
    let prefix = lab.prefix.clone();
    let cgroups: Vec<_> = lab.nodes.iter().map(|n| n.cgroup.clone()).collect();

    // Pod to pod across nodes: no translation, the echo sees a1's own address.
    for proto in ["tcp", "udp"] {
        let ex = lab.run_client("a1", &[proto, "10.244.2.10:8080", "--count", "3"]).unwrap();
        assert_eq!(ex.len(), 3);
        for e in &ex {
            assert!(e.ok, "{proto}: {e:?}");
            assert_eq!(e.backend.as_deref(), Some("b1"));
            assert!(e.seen_peer.as_deref().unwrap().starts_with("10.244.1.10:"), "{e:?}");
            assert_eq!(e.peer.as_deref(), Some("10.244.2.10:8080"));
        }
    }
    // The client reaches a pod when routed through a node.
    lab.client_route("10.244.0.0/16", "node1").unwrap();
    let ex = lab.run_client("client", &["tcp", "10.244.1.11:9090"]).unwrap();
    assert!(ex[0].ok, "{:?}", ex[0]);
    assert_eq!(ex[0].backend.as_deref(), Some("a2"));
    assert!(ex[0].seen_peer.as_deref().unwrap().starts_with("192.168.100.100:"));

    drop(lab);
    let netns = run("ip", &["netns", "list"]).unwrap();
    assert!(!netns.contains(&prefix), "namespaces left: {netns}");
    for c in cgroups {
        assert!(!c.exists(), "cgroup left: {}", c.display());
    }
    let tmp = std::env::temp_dir().join(&prefix);
    assert!(!tmp.exists());
}
