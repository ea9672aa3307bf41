//! The reference lab without any load balancer: plain routing works, the echo servers report the
//! true peer, processes land in the right namespace and cgroup, agents are started and
//! uninstalled as promised, and dropping the lab leaves nothing behind.
use std::{
    fs,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use lb_tests::{Exchange, Lab};

fn assert_all_from(ex: &[Exchange], backend: &str, seen: IpAddr, peer: &str) {
    assert!(!ex.is_empty());
    for e in ex {
        assert!(e.ok, "exchange failed: {e:?}");
        assert_eq!(e.backend.as_deref(), Some(backend), "{e:?}");
        assert_eq!(
            e.seen_ip(),
            Some(seen),
            "source address changed on the way: {e:?}"
        );
        assert_eq!(e.peer.as_deref(), Some(peer), "{e:?}");
    }
}

/// Stand-in for lb-agent: reports where it runs, pins a directory, waits; `uninstall` leaves a
/// marker outside the lab so the test can see it ran.
fn write_fake_agent(dir: &Path, marker: &Path) -> PathBuf {
    let script = dir.join("fake-agent");
    let body = format!(
        r#"#!/bin/sh
cmd="$1"; shift
while [ $# -gt 0 ]; do
  case "$1" in
    --bpffs) bpffs="$2"; shift ;;
    --cgroup) cgroup="$2"; shift ;;
  esac
  shift
done
case "$cmd" in
  run)
    echo "fake agent running"
    ip -4 -o addr show dev eth0
    [ -d "$cgroup" ] && echo "cgroup visible"
    mkdir "$bpffs/links" && echo "pinned"
    while :; do sleep 1; done ;;
  uninstall)
    rm -rf "$bpffs"/* && echo "uninstalled $bpffs" >> '{marker}' ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
"#,
        marker = marker.display()
    );
    fs::write(&script, body).expect("write fake agent");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod fake agent");
    script
}

#[test]
fn lab_smoke() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let marker = std::env::temp_dir().join(format!("lab-smoke-uninstall-{}", std::process::id()));
    let _ = fs::remove_file(&marker);

    let lab = Lab::new().expect("building the lab");
    let prefix = lab.prefix.clone();
    let tmp = lab.tmpdir().to_path_buf();
    let node1 = lab.node("node1").clone();
    let node2 = lab.node("node2").clone();
    assert_eq!(node1.zone, "zone-a");
    assert_eq!(node2.zone, "zone-b");
    assert_eq!(lab.pods_of("node1").len(), 2);
    for ns in [&node1.netns, &node2.netns] {
        assert!(ns.starts_with(&format!("{prefix}-")), "{ns}");
    }

    // The nodes' fabric ports carry the XDP_PASS program that lets a node's XDP_TX through.
    for port in ["node1", "node2"] {
        let link = lb_tests::netns::ip(&lab.netns("fabric"), &["link", "show", "dev", port])
            .expect("ip link");
        assert!(link.contains("prog/xdp"), "{link}");
    }

    // Pod to pod across nodes, TCP and UDP on both ports: the backend sees a1's own address.
    let a1: IpAddr = lab.pod_addr("a1").into();
    for port in lb_tests::lab::ECHO_PORTS {
        let target = format!("10.244.2.10:{port}");
        assert_all_from(
            &lab.tcp("a1", &target, 3).expect("tcp a1 -> b1"),
            "b1",
            a1,
            &target,
        );
        assert_all_from(
            &lab.udp("a1", &target, 3).expect("udp a1 -> b1"),
            "b1",
            a1,
            &target,
        );
    }
    // Same node, through cni0.
    assert_all_from(
        &lab.tcp("a1", "10.244.1.11:8080", 1).expect("tcp a1 -> a2"),
        "a2",
        a1,
        "10.244.1.11:8080",
    );

    // The client has no route to the pods until a test gives it one.
    let before = lab
        .tcp("client", "10.244.1.11:8080", 1)
        .expect("tcp client -> a2");
    assert!(
        !before[0].ok,
        "client reached a pod without a route: {:?}",
        before[0]
    );
    lab.client_route(lb_tests::lab::CLUSTER_POD_CIDR, "node1")
        .expect("client route");
    let client: IpAddr = lab.client_addr().into();
    assert_all_from(
        &lab.tcp("client", "10.244.1.11:8080", 2)
            .expect("client -> a2"),
        "a2",
        client,
        "10.244.1.11:8080",
    );
    // Through node1, then node1 -> node2 over the fabric.
    assert_all_from(
        &lab.udp("client", "10.244.2.11:9090", 2)
            .expect("client -> b2"),
        "b2",
        client,
        "10.244.2.11:9090",
    );
    lab.client_route("10.244.2.11", "node2")
        .expect("replace-able host route");
    assert_all_from(
        &lab.tcp("client", "10.244.2.11:9090", 1)
            .expect("client -> b2"),
        "b2",
        client,
        "10.244.2.11:9090",
    );

    // A held connection keeps working.
    let mut held = lab.hold("b1", "10.244.1.10:8080").expect("hold b1 -> a1");
    let first = held.first.clone().expect("first exchange");
    assert!(first.ok, "{first:?}");
    assert_eq!(first.backend.as_deref(), Some("a1"));
    let again = held.exchange().expect("second exchange");
    assert!(again.ok, "{again:?}");
    assert_eq!(
        again.seen_peer, first.seen_peer,
        "same connection, same source port"
    );
    held.close().expect("close held connection");

    // Pod processes run in the pod's namespace and in the node's cgroup, with host mounts visible.
    let out = lab
        .pod_command(
            "b2",
            "sh",
            ["-c", "cat /proc/self/cgroup; ip -4 -o addr show dev eth0"],
        )
        .output()
        .expect("sh in b2");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains(&format!("0::/{prefix}-node2\n")), "{text}");
    assert!(text.contains("10.244.2.11/24"), "{text}");
    // The echo servers live in their node's cgroup.
    let procs = fs::read_to_string(node1.cgroup.join("cgroup.procs")).expect("cgroup.procs");
    assert_eq!(
        procs.lines().count(),
        2,
        "node1 runs a1's and a2's echo servers: {procs}"
    );

    // An agent (stand-in) runs in the node's namespace with the node's cgroup and bpffs dir.
    let fake = write_fake_agent(lab.tmpdir(), &marker);
    let manifests = lab.tmpdir().join("manifests.yaml");
    fs::write(&manifests, "").expect("manifests");
    let mut agent = lab
        .spawn_agent("node1", &fake, &manifests, &["--extra"])
        .expect("spawn agent");
    agent
        .wait_for_log("pinned", Duration::from_secs(5))
        .expect("agent starts");
    let log = agent.log();
    assert!(log.contains("192.168.100.1/24"), "{log}");
    assert!(log.contains("cgroup visible"), "{log}");
    assert!(node1.bpffs.join("links").is_dir());
    assert!(agent.is_running());
    let status = agent.stop().expect("stop agent");
    assert!(!status.success(), "killed by a signal: {status:?}");
    assert!(!agent.is_running());
    // Started again, and left running: the lab must stop it.
    let mut agent = lab
        .spawn_agent("node1", &fake, &manifests, &[])
        .expect("respawn agent");
    agent
        .wait_for_log("fake agent running", Duration::from_secs(5))
        .expect("agent restarts");
    std::mem::forget(agent);

    drop(lab);

    let uninstalled = fs::read_to_string(&marker).unwrap_or_default();
    let _ = fs::remove_file(&marker);
    assert_eq!(
        uninstalled.lines().collect::<Vec<_>>(),
        [format!("uninstalled {}", node1.bpffs.display())],
        "uninstall runs once for node1 only"
    );
    let netns = lb_tests::netns::run("ip", &["netns", "list"]).expect("ip netns list");
    assert!(
        !netns.contains(&format!("{prefix}-")),
        "namespaces left: {netns}"
    );
    for n in [&node1, &node2] {
        assert!(!n.cgroup.exists(), "{} left", n.cgroup.display());
        assert!(!n.bpffs.exists(), "{} left", n.bpffs.display());
    }
    assert!(!tmp.exists(), "{} left", tmp.display());
}
