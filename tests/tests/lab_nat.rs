//! North-south NAT under real traffic (issue 12), with the agent's DEFAULT flags on node1, a
//! NodePort with externalTrafficPolicy Cluster and its backends on node2 (see
//! `lb_tests::bench::nat`). Shorter variants of the targets `cargo xtask bench` measures at full
//! size (bench/results.md, "North-south NAT"):
//! - new TCP connections keep pace with the no-LB path (here 5 s and >= 0.5 of it, a threshold
//!   a loaded 2-core machine holds; the target of >= 0.9 over 30 s is checked by the
//!   bench), errors <= 0.1 %;
//! - 20,000 distinct UDP flows to one backend, more than the old default range (61000-65535,
//!   4,536 ports) could hold, all answered;
//! - a UDP flow with a fixed source port leaves a backend removed from the EndpointSlice within
//!   3 s;
//! - established connections survive a flood of spoofed SYNs (each with a spoofed bare ACK).
//!
//! Every test runs on both lab variants (`_plain`: tc ingress, `_xdp`: XDP), and has an IPv6
//! twin (`…6`): the same Services IPv6-only, reached at node1's IPv6 address, the no-LB path
//! routed over IPv6, the spoofed SYNs from IPv6 sources (`lb_xdp6`, `lb_tc_ingress6`).
use std::time::Duration;

use lb_tests::{bench::nat::NatLab, on_both_variants, Family, Variant};

/// The old default SNAT range (61000-65535) held this many ports per backend.
const OLD_RANGE_PORTS: usize = 4_536;

fn nat_lab(v: Variant, f: Family) -> Option<NatLab> {
    lb_tests::require_privileges()?;
    Some(NatLab::new_family(v, f).expect("lab"))
}

fn nat_new_connections_keep_pace_with_the_direct_path(v: Variant, f: Family) {
    let Some(mut nat) = nat_lab(v, f) else { return };
    let c = nat.compare_tcp(Duration::from_secs(5)).unwrap();
    eprintln!(
        "new TCP connections ({}): NodePort {:.0}/s, direct {:.0}/s, ratio {:.2}, errors {} of {}",
        f.name(),
        c.nodeport_rps,
        c.direct_rps,
        c.ratio,
        c.nodeport_errors,
        c.nodeport_requests
    );
    // The no-LB path is the reference, not what is tested: at ~10,000 new connections a second
    // it drew a rare reset of its own once in CI (1 of ~48,000, on read). Held to the same
    // 0.1 % as the NodePort path.
    let direct_requests = c.direct_rps * c.seconds;
    assert!(
        c.direct_rps > 0.0 && c.direct_errors as f64 <= 0.001 * direct_requests,
        "no-LB path: {c:?}"
    );
    // 0.5, not the 0.9: CI machines are small and shared, and both paths compete with
    // whatever else runs. The bench checks 0.9 at full length (30 s). With the old default
    // range, or SNAT ports held after a close as before, a few seconds of new connections
    // exhaust the ports and this falls far below 0.5 with timeouts.
    assert!(c.ratio >= 0.5, "NodePort below half the no-LB path: {c:?}");
    assert!(c.error_rate <= 0.001, "more than 0.1 % errors: {c:?}");
    // Both backends served.
    assert_eq!(c.nodeport_backends.len(), 2, "{c:?}");
    let st = nat.stats().unwrap();
    assert_eq!(st["xdp_drop_snat_exhausted"], 0, "{st:?}");
}
fn nat_new_connections_keep_pace_with_the_direct_path4(v: Variant) {
    nat_new_connections_keep_pace_with_the_direct_path(v, Family::V4);
}
on_both_variants!(nat_new_connections_keep_pace_with_the_direct_path4: lab_nat_new_connections_keep_pace_with_the_direct_path_plain, lab_nat_new_connections_keep_pace_with_the_direct_path_xdp);
fn nat_new_connections_keep_pace_with_the_direct_path6(v: Variant) {
    nat_new_connections_keep_pace_with_the_direct_path(v, Family::V6);
}
on_both_variants!(nat_new_connections_keep_pace_with_the_direct_path6: lab_nat_new_connections_keep_pace_with_the_direct_path6_plain, lab_nat_new_connections_keep_pace_with_the_direct_path6_xdp);

fn nat_udp_flows_beyond_the_old_range_are_all_answered(v: Variant, f: Family) {
    let Some(mut nat) = nat_lab(v, f) else { return };
    nat.start_agent().unwrap();
    // The full 20,000 (a second or two): more than four times what the old default
    // range held for one backend, whose flows were dropped for good after the 4,536th (UDP
    // SNAT ports were never freed).
    let flows = 20_000;
    assert!(flows > OLD_RANGE_PORTS);
    let u = nat.udp_flows(flows).unwrap();
    eprintln!(
        "UDP flows ({}): {} of {} answered in {:.1} s ({} datagrams)",
        f.name(),
        u.answered,
        u.flows,
        u.seconds,
        u.datagrams
    );
    assert_eq!(u.answered, flows as u64, "{u:?}");
    assert_eq!(u.unanswered, 0, "{u:?}");
    assert_eq!(u.backends.keys().collect::<Vec<_>>(), ["b1"], "{u:?}");
    let st = nat.stats().unwrap();
    assert_eq!(st["xdp_drop_snat_exhausted"], 0, "{st:?}");
    // Each flow is its own translated flow.
    assert!(st["xdp_new_flow"] >= flows as u64, "{st:?}");
}
fn nat_udp_flows_beyond_the_old_range_are_all_answered4(v: Variant) {
    nat_udp_flows_beyond_the_old_range_are_all_answered(v, Family::V4);
}
on_both_variants!(nat_udp_flows_beyond_the_old_range_are_all_answered4: lab_nat_udp_flows_beyond_the_old_range_are_all_answered_plain, lab_nat_udp_flows_beyond_the_old_range_are_all_answered_xdp);
fn nat_udp_flows_beyond_the_old_range_are_all_answered6(v: Variant) {
    nat_udp_flows_beyond_the_old_range_are_all_answered(v, Family::V6);
}
on_both_variants!(nat_udp_flows_beyond_the_old_range_are_all_answered6: lab_nat_udp_flows_beyond_the_old_range_are_all_answered6_plain, lab_nat_udp_flows_beyond_the_old_range_are_all_answered6_xdp);

fn nat_udp_flow_leaves_a_removed_backend(v: Variant, f: Family) {
    let Some(mut nat) = nat_lab(v, f) else { return };
    nat.start_agent().unwrap();
    let o = nat.udp_failover(Duration::from_secs(10)).unwrap();
    eprintln!(
        "UDP flow ({}) with a fixed source port after its backend left: {o:?}",
        f.name()
    );
    // Without the flush of a removed endpoint's UDP conntrack entries, the flow keeps going to
    // the removed pod (it still runs and answers) and never moves.
    let moved = o
        .moved_after_ms
        .unwrap_or_else(|| panic!("the flow never left {}: {o:?}", o.removed));
    assert!(moved <= 3_000, "moved only after {moved} ms: {o:?}");
    assert_ne!(o.moved_to.as_deref(), Some(o.removed.as_str()));
}
fn nat_udp_flow_leaves_a_removed_backend4(v: Variant) {
    nat_udp_flow_leaves_a_removed_backend(v, Family::V4);
}
on_both_variants!(nat_udp_flow_leaves_a_removed_backend4: lab_nat_udp_flow_leaves_a_removed_backend_plain, lab_nat_udp_flow_leaves_a_removed_backend_xdp);
fn nat_udp_flow_leaves_a_removed_backend6(v: Variant) {
    nat_udp_flow_leaves_a_removed_backend(v, Family::V6);
}
on_both_variants!(nat_udp_flow_leaves_a_removed_backend6: lab_nat_udp_flow_leaves_a_removed_backend6_plain, lab_nat_udp_flow_leaves_a_removed_backend6_xdp);

fn nat_established_flows_survive_a_spoofed_syn_flood(v: Variant, f: Family) {
    let Some(mut nat) = nat_lab(v, f) else { return };
    nat.start_agent().unwrap();
    let (connections, syns) = (40, 100_000);
    let s = nat.syn_flood(connections, syns, 0).unwrap();
    eprintln!("spoofed SYN flood ({}): {s:?}", f.name());
    assert_eq!(s.syns, syns, "the flood was not sent whole: {s:?}");
    // The flood reached the datapath (most of it: a veth may drop some under the burst)...
    assert!(s.new_flows_seen >= syns / 2, "{s:?}");
    // ...confirmed none of its flows (a bare ACK confirms nothing)...
    assert_eq!(s.confirmed, 0, "{s:?}");
    // ...and every established connection kept its entry and still works.
    assert_eq!(s.still_tracked, connections, "{s:?}");
    assert_eq!(s.survivors, connections, "{s:?}");
}
fn nat_established_flows_survive_a_spoofed_syn_flood4(v: Variant) {
    nat_established_flows_survive_a_spoofed_syn_flood(v, Family::V4);
}
on_both_variants!(nat_established_flows_survive_a_spoofed_syn_flood4: lab_nat_established_flows_survive_a_spoofed_syn_flood_plain, lab_nat_established_flows_survive_a_spoofed_syn_flood_xdp);
fn nat_established_flows_survive_a_spoofed_syn_flood6(v: Variant) {
    nat_established_flows_survive_a_spoofed_syn_flood(v, Family::V6);
}
on_both_variants!(nat_established_flows_survive_a_spoofed_syn_flood6: lab_nat_established_flows_survive_a_spoofed_syn_flood6_plain, lab_nat_established_flows_survive_a_spoofed_syn_flood6_xdp);
