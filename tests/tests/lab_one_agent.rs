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
