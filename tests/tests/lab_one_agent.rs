//! One agent per pin directory: a second `lb-agent run` on a node's `--bpffs` while the first
//! runs exits with code 2 and one line naming the fix, before touching anything; the first keeps
//! serving. A restart after the first is gone (even killed) takes the directory over.
use std::time::{Duration, Instant};

use lb_tests::{lab::bin_path, scenario::start_example};

#[test]
fn lab_a_second_agent_on_the_same_pin_directory_is_refused() {
    let Some(mut s) = start_example() else { return };
    let second = s
        .lab
        .spawn_agent("node1", &bin_path("lb-agent").unwrap(), &s.manifests, &[])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = second.exit_status() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the second agent still runs:\n{}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(2), "{}", second.log());
    let log = second.log();
    assert_eq!(log.trim().lines().count(), 1, "{log}");
    assert!(
        log.contains("another lb-agent is running on this pin directory"),
        "{log}"
    );
    // The first agent still serves.
    assert!(s.agents[0].is_running());
    let ex = s
        .lab
        .run_client("a1", &["tcp", "10.96.0.10:80", "--count", "20"])
        .unwrap();
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
    // Once the first is gone (killed: the kernel drops its lock), a new agent takes over.
    assert!(!s.agents[0].stop_with(libc::SIGKILL).unwrap().success());
    let mut third = s
        .lab
        .spawn_agent("node1", &bin_path("lb-agent").unwrap(), &s.manifests, &[])
        .unwrap();
    third
        .wait_for_log("sync generation 1:", Duration::from_secs(20))
        .unwrap();
}

/// A pin directory removed under a running agent (its links were the programs' only holders, so
/// the dataplane is detached): noticed within seconds, one error line, /healthz and /livez turn
/// 503 (the DaemonSet's liveness probe then restarts the agent); a restarted agent pins
/// everything afresh and serves again.
#[test]
fn lab_a_vanished_pin_directory_is_noticed() {
    let Some(mut s) = lb_tests::scenario::start_example_with(&["--health-addr", "0.0.0.0:10256"])
    else {
        return;
    };
    let health = |s: &lb_tests::scenario::Running, path| {
        lb_tests::scenario::http_get(&s.lab.client_netns, "192.168.100.1:10256", path).0
    };
    // (The agent attaches after its first sync; its first interface scan follows at once.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&s, "/healthz") != 200 {
        assert!(
            Instant::now() < deadline,
            "never healthy:\n{}",
            s.agents[0].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let bpffs = s.lab.node("node1").bpffs.clone();
    std::fs::remove_dir_all(&bpffs).unwrap();
    s.agents[0]
        .wait_for_log("the pin directory is gone", Duration::from_secs(10))
        .unwrap();
    assert_eq!(health(&s, "/healthz"), 503);
    assert_eq!(health(&s, "/livez"), 503);
    assert!(s.agents[0].is_running());
    // What the liveness probe would do: a restart.
    s.agents[0].stop().unwrap();
    let mut again = s
        .lab
        .spawn_agent("node1", &bin_path("lb-agent").unwrap(), &s.manifests, &[])
        .unwrap();
    again
        .wait_for_log("sync generation 1:", Duration::from_secs(20))
        .unwrap();
    again
        .wait_for_log("attached to cgroup", Duration::from_secs(20))
        .unwrap();
    let ex = s
        .lab
        .run_client("a1", &["tcp", "10.96.0.10:80", "--count", "20"])
        .unwrap();
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
}
