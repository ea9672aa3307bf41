//! `--device auto` on a real network namespace (created by the test): the devices that carry
//! the node's address and those of IPv4 default routes, nothing else (loopback, a device with
//! another address, a device with no route).
use std::{net::Ipv4Addr, os::fd::AsRawFd};

use lb_tests::netns::{self, ScratchNetns};
use lb_userspace::agent::devices::{self, Reason};

#[test]
fn device_auto_finds_the_node_address_and_default_route_devices() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let ns = ScratchNetns::new("lbdev").unwrap();
    let n = ns.name.as_str();
    let ip = |args: &[&str]| {
        netns::ip(n, args).unwrap();
    };
    for (dev, addr) in [
        ("uplink0", "192.168.50.2/24"),
        ("uplink1", "10.20.0.2/24"),
        ("other0", "172.31.0.2/24"),
    ] {
        // veth pairs (no dummy driver everywhere); the peers have no address and no route.
        let peer = format!("{dev}p");
        ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "up"]);
        ip(&["addr", "add", addr, "dev", dev]);
        ip(&["link", "set", dev, "up"]);
    }
    ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.20.0.1",
        "dev",
        "uplink1",
    ]);
    let path = ns.path();
    let found = std::thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: setns with a valid namespace fd moves this thread only.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        devices::detect(&[Ipv4Addr::new(192, 168, 50, 2), Ipv4Addr::LOCALHOST]).unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(
        found,
        vec![
            (
                "uplink0".to_string(),
                Reason::NodeAddress(Ipv4Addr::new(192, 168, 50, 2))
            ),
            ("uplink1".to_string(), Reason::DefaultRoute),
        ]
    );
    assert_eq!(devices::names(&found), ["uplink0", "uplink1"]);
}
