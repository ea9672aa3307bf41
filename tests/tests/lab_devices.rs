//! `--device auto` in the lab (the plain variant, as on kind): each agent finds its node's
//! `eth0` (it carries the Node's InternalIP; the lab's nodes have no default route), attaches
//! there with its default hook choice, and NodePorts are served, local and remote backends alike,
//! on the node's IPv4 and IPv6 addresses. `--device none` attaches to no device: the NodePort is
//! not translated.
use lb_tests::{
    lab::Exchange,
    scenario::{start_example_on_with, with_ipv6_north_south_services, Running},
    Variant,
};

fn nodeports(s: &Running, targets: &[&str]) -> Vec<Exchange> {
    let mut all = Vec::new();
    for target in targets {
        all.extend(
            s.lab
                .run_client(
                    "client",
                    &["tcp", *target, "--count", "10", "--timeout-ms", "1500"],
                )
                .unwrap(),
        );
    }
    all
}

/// 30080: externalTrafficPolicy Local (backend a1 on node1); 30090: Cluster (remote too).
const IPV4: [&str; 2] = ["192.168.100.1:30080", "192.168.100.1:30090"];
/// The IPv6 twins (`with_ipv6_north_south_services`): 30180 Local (a1), 30190 Cluster (b1 on
/// node2), at node1's IPv6 address.
const IPV6: [&str; 2] = ["[fd00:100::1]:30180", "[fd00:100::1]:30190"];

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
    let ex = nodeports(&s, &IPV4);
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
    assert_eq!(ex.len(), 20);
    // The device found by its IPv4 address serves the IPv6 NodePorts on it too.
    s.apply(&with_ipv6_north_south_services(), 2);
    let ex = nodeports(&s, &IPV6);
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
    let ex = nodeports(&s, &IPV4);
    assert!(ex.iter().all(|e| !e.ok), "{ex:?}");
    assert_eq!(s.stats("node1")["xdp_rx"], 0);
}
