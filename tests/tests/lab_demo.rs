//! `cargo xtask demo` (lb-demo) on the embedded example: it builds the dual-stack lab, runs the
//! agents and prints a row per frontend and backend, IPv6 ones included (the dual-stack
//! Service's IPv6 ClusterIP, answered by each of its four IPv6 endpoints).
use std::process::Command;

use lb_tests::lab::bin_path;

#[test]
fn lab_demo_prints_ipv6_rows_served_by_ipv6_endpoints() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let out = Command::new(bin_path("lb-demo").unwrap())
        .args(["--requests", "40"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = text
        .lines()
        .find(|l| l.starts_with("SERVICE"))
        .unwrap_or_else(|| panic!("no table: {text}"));
    assert!(header.contains("FAMILY"), "{header}");
    for proto in ["tcp/TCP", "udp/UDP"] {
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("dual-stack/echo")
                    && l.contains(proto)
                    && l.contains(" IPv6 ")
                    && l.contains("[fd00:96::110]:80")
            })
            .collect();
        let backends: Vec<&str> = rows
            .iter()
            // SERVICE PORT FAMILY KIND FRONTEND "pod a1" BACKEND REQUESTS
            .filter_map(|l| l.split_whitespace().nth(7))
            .collect();
        let mut sorted = backends.clone();
        sorted.sort();
        assert_eq!(sorted, ["a1", "a2", "b1", "b2"], "{proto}: {text}");
    }
    assert!(!text.contains("failed: TimedOut"), "{text}");
}
