//! `accept_local` without writing `/proc/sys` (issue 18 point 7): the DaemonSet's init container
//! runs `lb-agent prepare-node` (net.ipv4.conf.all.accept_local=1) and the agent, whose
//! `/proc/sys` is read-only, accepts `all` or the device's own value being 1 (the kernel ORs
//! them: `IN_DEV_ACCEPT_LOCAL` is `IN_DEV_ORCONF`) and otherwise refuses to start with one line
//! naming the fix. On the real `/proc/sys` of a network namespace the test creates, and on a
//! read-only bind mount.
use std::{os::fd::AsRawFd, path::Path, time::Duration};

use lb_tests::netns::{self, ScratchNetns};
use lb_userspace::agent::attach::{ensure_accept_local, PROC_SYS};

fn sysctl(ns: &str, key: &str) -> String {
    netns::exec_in(ns, "sysctl", &["-n", key])
        .unwrap()
        .trim()
        .to_string()
}

fn set(ns: &str, key: &str, v: &str) {
    netns::exec_in(ns, "sysctl", &["-qw", &format!("{key}={v}")]).unwrap();
}

/// `f` on a thread inside network namespace `ns` (its `/proc/sys/net` is the namespace's).
fn in_netns<T: Send + 'static>(ns: &ScratchNetns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: setns with a valid namespace fd moves this thread only.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
    .join()
    .unwrap()
}

fn scratch_with_device() -> ScratchNetns {
    let ns = ScratchNetns::new("lbacclocal").unwrap();
    netns::ip(
        &ns.name,
        &["link", "add", "up0", "type", "veth", "peer", "name", "up0p"],
    )
    .unwrap();
    ns
}

#[test]
fn kernel_accept_local_all_is_enough_and_the_device_is_written_only_otherwise() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let ns = scratch_with_device();
    let n = ns.name.clone();
    // all=1: nothing is written, the device keeps 0.
    set(&n, "net.ipv4.conf.all.accept_local", "1");
    set(&n, "net.ipv4.conf.up0.accept_local", "0");
    in_netns(&ns, || {
        ensure_accept_local(Path::new(PROC_SYS), "up0").unwrap()
    });
    assert_eq!(sysctl(&n, "net.ipv4.conf.up0.accept_local"), "0");
    // all=0 and a writable /proc/sys: the device's value is set.
    set(&n, "net.ipv4.conf.all.accept_local", "0");
    in_netns(&ns, || {
        ensure_accept_local(Path::new(PROC_SYS), "up0").unwrap()
    });
    assert_eq!(sysctl(&n, "net.ipv4.conf.up0.accept_local"), "1");
}

#[test]
fn kernel_prepare_node_sets_all_accept_local_in_its_network_namespace_only() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let host_before = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/accept_local").unwrap();
    let ns = scratch_with_device();
    let n = ns.name.as_str();
    set(n, "net.ipv4.conf.all.accept_local", "0");
    let bin = lb_tests::bin_path("lb-agent").unwrap();
    let run = || {
        let mut cmd = netns::command_in(n, None, &bin);
        cmd.arg("prepare-node");
        netns::run_command(&mut cmd).unwrap()
    };
    assert_eq!(run(), "set net.ipv4.conf.all.accept_local = 1 (was 0)\n");
    assert_eq!(sysctl(n, "net.ipv4.conf.all.accept_local"), "1");
    assert_eq!(
        run(),
        "nothing to set: net.ipv4.conf.all.accept_local is 1\n"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/accept_local").unwrap(),
        host_before,
        "the host's value is untouched"
    );
}

/// The agent on a lab node, started as the DaemonSet starts it: in a mount namespace of its own
/// where `/proc/sys` is read-only (what a container that is not privileged gets) and its
/// `--bpffs` directory is a bind mount of a subdirectory of the node's bpffs (the DaemonSet
/// mounts only the pin directory). With net.ipv4.conf.all.accept_local=1 (what `prepare-node`
/// sets) and the device's own value 0 it starts, attaches and serves, and writes nothing; its
/// pins are where the node sees them. With both 0 it stops in preflight: exit 2, one line
/// naming the fix.
#[test]
fn lab_agent_with_read_only_proc_sys_and_a_bind_mounted_pin_directory() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let lab = lb_tests::Lab::new().expect("lab");
    let node = lab.node("node1");
    let n = node.netns.clone();
    let bpffs = node.bpffs.clone();
    let manifests = lab.tmpdir().join("m.yaml");
    std::fs::write(&manifests, lb_tests::scenario::example_manifests()).unwrap();
    let wrapper = lab.tmpdir().join("agent-in-pod");
    let agent = lb_tests::bin_path("lb-agent").unwrap();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec unshare -m --propagation private sh -c 'set -e; \
             mkdir -p {b}; mount --bind {b} {b}; \
             mount --bind /proc/sys /proc/sys; mount -o remount,bind,ro /proc/sys; \
             exec \"$0\" \"$@\"' {a} \"$@\"\n",
            b = bpffs.display(),
            a = agent.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    set(&n, "net.ipv4.conf.all.accept_local", "1");
    set(&n, "net.ipv4.conf.eth0.accept_local", "0");
    let mut a = lab.spawn_agent("node1", &wrapper, &manifests, &[]).unwrap();
    a.wait_for_log("attached to cgroup", Duration::from_secs(30))
        .unwrap();
    assert!(
        !a.log().contains("accept_local"),
        "nothing to say about accept_local: {}",
        a.log()
    );
    assert_eq!(sysctl(&n, "net.ipv4.conf.eth0.accept_local"), "0");
    // The agent really had a read-only /proc/sys and a bind mount (its own mount namespace).
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", a.pid().unwrap())).unwrap();
    let mountinfo_line = |point: &str| {
        mounts
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(point))
            .unwrap_or_else(|| panic!("no mount at {point}:\n{mounts}"))
            .to_string()
    };
    assert!(
        mountinfo_line("/proc/sys")
            .split(' ')
            .nth(5)
            .unwrap()
            .starts_with("ro"),
        "{mounts}"
    );
    let pin_mount = mountinfo_line(&bpffs.display().to_string());
    assert!(pin_mount.contains(" - bpf "), "{pin_mount}");
    // The pins are where the node (this test, outside the agent's mount namespace) sees them,
    // and the agent serves: a client pod reaches a ClusterIP through node1's programs.
    assert!(bpffs.join("links").is_dir());
    let ex = lab
        .run_client("a1", &["tcp", "10.96.0.10:80", "--count", "10"])
        .unwrap();
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
    assert!(a.stop().unwrap().success(), "{}", a.log());

    // Neither value set: refused before anything, one line naming the fix.
    set(&n, "net.ipv4.conf.all.accept_local", "0");
    let b = lab.spawn_agent("node1", &wrapper, &manifests, &[]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = b.exit_status() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "{}", b.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = b.log();
    assert_eq!(status.code(), Some(2), "{log}");
    assert_eq!(log.trim().lines().count(), 1, "{log}");
    for part in [
        "--device eth0",
        "net.ipv4.conf.eth0.accept_local and net.ipv4.conf.all.accept_local are 0",
        "Read-only file system",
        "set net.ipv4.conf.all.accept_local=1 on the node",
        "lb-agent prepare-node",
    ] {
        assert!(log.contains(part), "{part:?} missing: {log}");
    }
    assert_eq!(sysctl(&n, "net.ipv4.conf.eth0.accept_local"), "0");
}
