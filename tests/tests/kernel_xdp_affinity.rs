//! Session affinity packet fixtures on the XDP path (BPF_PROG_TEST_RUN on the real kernel).
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use etherparse::PacketBuilder;
use lb_common::{backend_flags, service_flags, AffinityValue, Config};
use lb_tests::harness::XdpHarness;
use lb_userspace::control::desired::{BackendKey, Desired, DesiredFrontend, FrontendKey};

const NODE: [u8; 4] = [192, 168, 100, 1];

fn syn(client: [u8; 4], sport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(client, NODE, 64)
        .tcp(sport, 30100, 1, 64000)
        .syn();
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    v
}

fn backend_of(out: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(out[30], out[31], out[32], out[33])
}

fn pods(n: u8) -> Vec<(BackendKey, u8)> {
    (1..=n)
        .map(|i| (BackendKey { addr: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, i), 8080), proto: 6 }, backend_flags::LOCAL))
        .collect()
}

fn desired(backends: Vec<(BackendKey, u8)>) -> Desired {
    let fe = FrontendKey { addr: SocketAddrV4::new(Ipv4Addr::from(NODE), 30100), proto: 6, scope: lb_common::scope::EXTERNAL };
    [(fe, DesiredFrontend {
        service_port: "default/sticky:/TCP".into(),
        flags: service_flags::NODE_PORT | service_flags::SESSION_AFFINITY,
        affinity_timeout_s: 60,
        backends,
    })]
    .into()
}

fn harness() -> Option<XdpHarness> {
    lb_tests::require_privileges()?;
    let mut h = XdpHarness::new().expect("loading the XDP program");
    h.set_config(&Config { node_addr_be: u32::from_ne_bytes(NODE), snat_port_min: 61000, snat_port_max: 65535, ready: 1, _pad: 0 }).unwrap();
    h.program(&desired(pods(3))).unwrap();
    Some(h)
}

fn count(h: &XdpHarness, name: &str) -> u64 {
    h.counters().unwrap()[name].packets
}

#[test]
fn kernel_affinity_pins_reuses_and_is_per_client() {
    let Some(h) = harness() else { return };
    let client = [192, 168, 100, 100];
    let first = backend_of(&h.run(&syn(client, 40000)).unwrap().output);
    assert_eq!(count(&h, "affinity_new"), 1);
    let recs = h.affinity_entries().unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].0.client, u32::from_ne_bytes(client) as u64);
    // 50 more connections from the same client, each a new flow: all on the pinned backend.
    for port in 40001..40051 {
        assert_eq!(backend_of(&h.run(&syn(client, port)).unwrap().output), first);
    }
    assert_eq!(count(&h, "affinity_hit"), 50);
    // 20 other clients choose independently: they do not all share one backend.
    let chosen: BTreeSet<Ipv4Addr> =
        (1..=20u8).map(|i| backend_of(&h.run(&syn([192, 168, 7, i], 5000)).unwrap().output)).collect();
    assert!(chosen.len() > 1, "{chosen:?}");
    assert_eq!(h.affinity_entries().unwrap().len(), 21);
}

#[test]
fn kernel_affinity_expires_and_ignores_stale_backends() {
    let Some(mut h) = harness() else { return };
    let client = [192, 168, 100, 100];
    h.run(&syn(client, 40000)).unwrap();
    // Age the record beyond the 60 s timeout: the next connection is balanced afresh and the
    // record is refreshed.
    let (k, v) = h.affinity_entries().unwrap()[0];
    h.affinity_set(&k, &AffinityValue { last_used_s: v.last_used_s.wrapping_sub(61), ..v }).unwrap();
    h.run(&syn(client, 40001)).unwrap();
    assert_eq!(count(&h, "affinity_expired"), 1);
    let refreshed = h.affinity_entries().unwrap()[0].1;
    assert!(refreshed.last_used_s >= v.last_used_s);
    let pinned = backend_of(&h.run(&syn(client, 40002)).unwrap().output);
    assert_eq!(count(&h, "affinity_hit"), 1);
    // The pinned backend leaves the Service: the record is ignored and the client re-pinned.
    let remaining: Vec<_> = pods(3).into_iter().filter(|(b, _)| *b.addr.ip() != pinned).collect();
    h.program(&desired(remaining)).unwrap();
    let moved = backend_of(&h.run(&syn(client, 40003)).unwrap().output);
    assert_ne!(moved, pinned);
    assert_eq!(count(&h, "affinity_stale"), 1);
    for port in 40004..40014 {
        assert_eq!(backend_of(&h.run(&syn(client, port)).unwrap().output), moved, "re-pinned");
    }
}

#[test]
fn kernel_affinity_lru_evicts_the_oldest_under_pressure_and_counts_it() {
    let Some(()) = lb_tests::require_privileges() else { return };
    let mut h = XdpHarness::with_map_sizes(&[(lb_common::map_name::AFFINITY, 256)]).unwrap();
    h.set_config(&Config { node_addr_be: u32::from_ne_bytes(NODE), snat_port_min: 61000, snat_port_max: 65535, ready: 1, _pad: 0 }).unwrap();
    h.program(&desired(pods(3))).unwrap();
    // 2,000 distinct clients against room for 256 records.
    let client = |i: u32| [172, 16, (i >> 8) as u8, i as u8];
    for i in 0..2000u32 {
        h.run(&syn(client(i), 5000)).unwrap();
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
        .map(|(n, c)| lb_userspace::dataplane::read::CounterView { name: n, packets: c.packets, bytes: c.bytes })
        .collect();
    let evicted = lb_userspace::dataplane::read::affinity_evictions(&views, recs.len() as u64);
    assert_eq!(evicted.packets, 2000 - recs.len() as u64);
    assert!(evicted.packets >= 1744);
}
