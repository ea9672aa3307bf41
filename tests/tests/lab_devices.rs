//! `--device auto` in the lab (the plain variant, as on kind): each agent finds its node's
//! `eth0` (it carries the Node's InternalIP; the lab's nodes have no default route), attaches
//! there with its default hook choice, and NodePorts are served, local and remote backends alike.
//! `--device none` attaches to no device: the NodePort is not translated.
use lb_tests::{
    lab::Exchange,
    scenario::{start_example_on_with, Running},
    Variant,
};

fn nodeports(s: &Running) -> Vec<Exchange> {
    let mut all = Vec::new();
    // 30080: externalTrafficPolicy Local (backend a1 on node1); 30090: Cluster (remote too).
    for target in ["192.168.100.1:30080", "192.168.100.1:30090"] {
        all.extend(
            s.lab
                .run_client(
                    "client",
                    &["tcp", target, "--count", "10", "--timeout-ms", "1500"],
                )
                .unwrap(),
        );
    }
    all
}

#[test]
fn lab_device_auto_finds_the_node_device() {
    let Some(mut s) = start_example_on_with(Variant::Plain, &["--device", "auto"]) else {
        return;
    };
    for (i, node, addr) in [(0, "node1", "192.168.100.1"), (1, "node2", "192.168.100.2")] {
        s.agents[i]
            .wait_for_log(
                &format!("--device auto: eth0 (carries the node address {addr})"),
                std::time::Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("{node}: {e:#}"));
    }
    let ex = nodeports(&s);
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
    assert_eq!(ex.len(), 20);
}

#[test]
fn lab_device_none_attaches_to_no_device() {
    let Some(mut s) =
        start_example_on_with(Variant::Plain, &["--device", "none", "--north-south", "tc"])
    else {
        return;
    };
    s.agents[0]
        .wait_for_log(
            "--device none: no north-south device",
            std::time::Duration::from_secs(5),
        )
        .unwrap();
    let ex = nodeports(&s);
    assert!(ex.iter().all(|e| !e.ok), "{ex:?}");
    assert_eq!(s.stats("node1")["xdp_rx"], 0);
}
