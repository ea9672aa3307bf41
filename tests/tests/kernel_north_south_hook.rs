//! The agent's `--north-south auto` choice on the real kernel: on a veth whose peer runs no XDP
//! program it picks tc (XDP_TX would be dropped there), and XDP once the peer runs a native XDP
//! program; the peer is found through IFLA_LINK / IFLA_LINK_NETNSID and asked about over
//! rtnetlink with IFLA_TARGET_NETNSID, in another namespace and in the same one. Only namespaces
//! and devices the test creates; no traffic.
use std::{fs::File, os::fd::AsRawFd, path::Path, sync::atomic::AtomicU32};

use lb_tests::{netns, xdp};
use lb_userspace::agent::hook::{choose, get_link, Choice, Hook, LinkQuery, NorthSouth};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Network namespaces removed on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new(n: usize) -> Namespaces {
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let names: Vec<String> = (0..n)
            .map(|i| format!("lbhook{}x{seq}-{i}", std::process::id()))
            .collect();
        let mut ns = Namespaces(Vec::new());
        for name in names {
            netns::run("ip", &["netns", "add", &name]).unwrap();
            ns.0.push(name);
        }
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = netns::run("ip", &["netns", "del", n]);
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = Path::new(netns::NETNS_RUN_DIR).join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let f_ns = File::open(&path).unwrap();
            // SAFETY: setns on a valid namespace descriptor; affects this thread only.
            assert_eq!(
                unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns {ns}: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap()
    })
}

fn auto(ns: &str, dev: &str) -> Choice {
    in_netns(ns, || {
        choose(dev, NorthSouth::Auto, |d| {
            panic!("a veth ({d}) is decided by its peer, never probed")
        })
    })
}

#[test]
fn kernel_auto_hook_follows_the_veth_peer_in_another_namespace() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let ns = Namespaces::new(2);
    let (node, fabric) = (&ns.0[0], &ns.0[1]);
    netns::ip(
        node,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "uplink", "netns", fabric,
        ],
    )
    .unwrap();
    netns::ip(node, &["link", "set", "eth0", "up"]).unwrap();
    netns::ip(fabric, &["link", "set", "uplink", "up"]).unwrap();

    // The device says where its peer is: another namespace, by id.
    let dev = in_netns(node, || get_link(&LinkQuery::Name("eth0")).unwrap());
    assert_eq!(dev.kind.as_deref(), Some("veth"), "{dev:?}");
    assert!(dev.link_netnsid.is_some(), "peer in another netns: {dev:?}");

    let c = auto(node, "eth0");
    assert_eq!(c.hook, Hook::Tc, "{c:?}");
    assert!(
        c.reason.contains("uplink") && c.reason.contains("runs no XDP program"),
        "{c:?}"
    );

    let link = xdp::attach_pass(fabric, "uplink").unwrap();
    let c = auto(node, "eth0");
    assert_eq!(c.hook, Hook::Xdp, "{c:?}");
    assert!(c.reason.contains("runs native XDP program"), "{c:?}");

    // Detached again: back to tc.
    drop(link);
    assert_eq!(auto(node, "eth0").hook, Hook::Tc);

    // The explicit modes do not look.
    let c = in_netns(node, || {
        choose("eth0", NorthSouth::Xdp, |_| panic!("not probed"))
    });
    assert_eq!(c.hook, Hook::Xdp);
}

#[test]
fn kernel_auto_hook_follows_the_veth_peer_in_the_same_namespace() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let ns = Namespaces::new(1);
    let node = &ns.0[0];
    netns::ip(
        node,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ],
    )
    .unwrap();
    let dev = in_netns(node, || get_link(&LinkQuery::Name("eth0")).unwrap());
    assert_eq!(dev.link_netnsid, None, "{dev:?}");
    assert_eq!(auto(node, "eth0").hook, Hook::Tc);
    let _link = xdp::attach_pass(node, "peer0").unwrap();
    assert_eq!(auto(node, "eth0").hook, Hook::Xdp);
    // The peer's own peer (eth0) runs nothing.
    assert_eq!(auto(node, "peer0").hook, Hook::Tc);
}

#[test]
fn kernel_auto_hook_on_a_device_that_is_not_a_veth_follows_the_probe() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let ns = Namespaces::new(1);
    let node = &ns.0[0];
    // A bridge: not a veth, so the native-XDP probe decides.
    netns::ip(node, &["link", "add", "dummy0", "type", "bridge"]).unwrap();
    let c = in_netns(node, || {
        choose("dummy0", NorthSouth::Auto, |_| {
            anyhow::bail!("driver-mode attach refused")
        })
    });
    assert_eq!(c.hook, Hook::Tc, "{c:?}");
    assert!(c.reason.contains("driver-mode attach refused"), "{c:?}");
    let c = in_netns(node, || choose("dummy0", NorthSouth::Auto, |_| Ok(())));
    assert_eq!(c.hook, Hook::Xdp, "{c:?}");
    // A device that does not exist is tc, with the reason.
    let c = in_netns(node, || {
        choose("nosuch0", NorthSouth::Auto, |_| panic!("not probed"))
    });
    assert_eq!(c.hook, Hook::Tc);
    assert!(c.reason.contains("cannot inspect"), "{c:?}");
}
