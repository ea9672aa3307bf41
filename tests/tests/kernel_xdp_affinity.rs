//! Session affinity under load on the XDP path (BPF_PROG_TEST_RUN on the real kernel): 2,000
//! clients against an affinity map with room for 256 records. The single-frame affinity cases are
//! rows of the `lb_xdp` fixture table (tests/src/fixture/xdp_table.rs).
use std::collections::BTreeSet;

use lb_tests::fixture::{
    frames::{config, frame, Kind, NODE},
    xdp_table::{pods, sticky, STICKY_PORT},
};
use lb_tests::harness::XdpHarness;

#[test]
fn kernel_affinity_lru_evicts_the_oldest_under_pressure_and_counts_it() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let mut h = XdpHarness::with_map_sizes(&[(lb_common::map_name::AFFINITY, 256)]).unwrap();
    h.set_config(&config(61000, 65535)).unwrap();
    h.program(&sticky(pods(3))).unwrap();
    // 2,000 distinct clients against room for 256 records.
    let client = |i: u32| [172, 16, (i >> 8) as u8, i as u8];
    for i in 0..2000u32 {
        h.run(&frame(Kind::Syn, (client(i), 5000), (NODE, STICKY_PORT)))
            .unwrap();
    }
    let recs = h.affinity_entries().unwrap();
    assert!(recs.len() <= 256, "{} records", recs.len());
    let alive: BTreeSet<u64> = recs.iter().map(|(k, _)| k.client).collect();
    let key = |i: u32| u32::from_ne_bytes(client(i)) as u64;
    assert!(!alive.contains(&key(0)), "the oldest record was evicted");
    assert!(alive.contains(&key(1999)), "the newest record is kept");
    let counters = h.counters().unwrap();
    assert_eq!(counters["affinity_new"].packets, 2000);
    let views: Vec<_> = counters
        .iter()
        .map(|(n, c)| lb_userspace::dataplane::read::CounterView {
            name: n,
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    let evicted = lb_userspace::dataplane::read::affinity_evictions(&views, recs.len() as u64);
    assert_eq!(evicted.packets, 2000 - recs.len() as u64);
    assert!(evicted.packets >= 1744);
}
