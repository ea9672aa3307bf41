//! Consistent backend choice and flood resilience on the real kernel (BPF_PROG_TEST_RUN):
//! - Maglev: two "nodes" (two loaded programs whose maps were programmed in a different order, so
//!   their backend ids differ) send the same flows to the same backends; removing a backend moves
//!   almost only its own flows;
//! - a flood of new flows churns only the new-flow conntrack: confirmed flows keep their entries;
//! - a flow whose entries were evicted is rebuilt identically (same backend, same SNAT port).
use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
};

use etherparse::{InternetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::{Config, CtKey};
use lb_tests::harness::XdpHarness;
use lb_userspace::control::desired::{BackendKey, Desired, DesiredFrontend, FrontendKey};

const XDP_PASS: u32 = 2;
const NODE: [u8; 4] = [192, 168, 100, 1];
const LB_IP: [u8; 4] = [203, 0, 113, 9];
const TCP: u8 = 6;

fn sa(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

fn backend(i: u8) -> BackendKey {
    BackendKey {
        addr: std::net::SocketAddr::V4(sa([10, 244, 2, 10 + i], 8080)),
        proto: TCP,
    }
}

fn frontend() -> FrontendKey {
    FrontendKey {
        addr: std::net::SocketAddr::V4(sa(LB_IP, 80)),
        proto: TCP,
        scope: lb_common::scope::EXTERNAL,
    }
}

/// The client of flow `i`: distinct addresses and ports.
fn client(i: u32) -> ([u8; 4], u16) {
    let a = 0x0a00_0000u32 + (i.wrapping_mul(2_654_435_761) >> 8);
    (a.to_be_bytes(), 1024 + (i % 60000) as u16)
}

fn tcp(syn: bool, src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let ip =
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src.0, dst.0, 64);
    let mut v = Vec::new();
    if syn {
        ip.tcp(src.1, dst.1, 1000, 64000)
            .syn()
            .write(&mut v, &[])
            .unwrap();
    } else {
        ip.tcp(src.1, dst.1, 1001, 64000)
            .ack(5000)
            .write(&mut v, b"x")
            .unwrap();
    }
    v
}

/// The backend's SYN-ACK to a [`tcp`] SYN (sequence 4999, acknowledging 1001), from `be` to
/// the address the translated SYN came from.
fn syn_ack(be: SocketAddrV4, to: SocketAddrV4) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1]).ipv4(
        be.ip().octets(),
        to.ip().octets(),
        64,
    );
    let mut v = Vec::new();
    ip.tcp(be.port(), to.port(), 4999, 64000)
        .syn()
        .ack(1001)
        .write(&mut v, &[])
        .unwrap();
    v
}

/// A spoofer's ACK after its SYN (sequence 1001): it never saw the SYN-ACK, so it acknowledges
/// a guess.
fn blind_ack(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let ip =
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src.0, dst.0, 64);
    let mut v = Vec::new();
    ip.tcp(src.1, dst.1, 1001, 64000)
        .ack(0x1234_5678)
        .write(&mut v, &[])
        .unwrap();
    v
}

/// A reset from `src` to `dst` with sequence `seq`.
fn rst(src: ([u8; 4], u16), dst: ([u8; 4], u16), seq: u32) -> Vec<u8> {
    let ip =
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src.0, dst.0, 64);
    let mut v = Vec::new();
    ip.tcp(src.1, dst.1, seq, 0)
        .rst()
        .write(&mut v, &[])
        .unwrap();
    v
}

/// (source, destination) of an output frame.
fn addrs(frame: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let p = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(InternetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4")
    };
    let Some(TransportSlice::Tcp(t)) = p.transport else {
        panic!("not TCP")
    };
    (
        SocketAddrV4::new(ip.header().source_addr(), t.source_port()),
        SocketAddrV4::new(ip.header().destination_addr(), t.destination_port()),
    )
}

fn harness(sizes: &[(&str, u32)]) -> XdpHarness {
    let mut h = XdpHarness::with_map_sizes(sizes).expect("loading the XDP program into the kernel");
    h.set_config(&Config {
        node_addr_be: u32::from_ne_bytes(NODE),
        snat_port_min: 32768,
        snat_port_max: 60999,
        ready: 1,
        ..Default::default()
    })
    .unwrap();
    h
}

fn service(backends: &[BackendKey]) -> DesiredFrontend {
    DesiredFrontend {
        service_port: "default/web:http/TCP".into(),
        flags: lb_common::service_flags::LOAD_BALANCER,
        affinity_timeout_s: 0,
        source_ranges: None,
        backends: backends.iter().map(|b| (*b, 0)).collect(),
    }
}

fn counter(h: &XdpHarness, name: &str) -> u64 {
    h.counters().unwrap()[name].packets
}

#[test]
fn kernel_maglev_nodes_choose_alike_and_a_removal_moves_few_flows() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let all: Vec<BackendKey> = (0..10).map(backend).collect();
    // Node A programs the Service directly; node B first programs another Service with other
    // backends, and lists ours in reverse, so its backend ids are different.
    let mut a = harness(&[]);
    a.program(&Desired::from([(frontend(), service(&all))]))
        .unwrap();
    let mut b = harness(&[]);
    let other = FrontendKey {
        addr: std::net::SocketAddr::V4(sa(LB_IP, 81)),
        ..frontend()
    };
    let decoys: Vec<BackendKey> = (0..7)
        .map(|i| BackendKey {
            addr: std::net::SocketAddr::V4(sa([10, 244, 9, i], 80)),
            proto: TCP,
        })
        .collect();
    b.program(&Desired::from([(other, service(&decoys))]))
        .unwrap();
    let mut reversed = all.clone();
    reversed.reverse();
    b.program(&Desired::from([
        (other, service(&decoys)),
        (frontend(), service(&reversed)),
    ]))
    .unwrap();

    const FLOWS: u32 = 3000;
    let choose = |h: &XdpHarness, i: u32| -> SocketAddrV4 {
        let r = h.run(&tcp(true, client(i), (LB_IP, 80))).unwrap();
        assert_eq!(
            r.verdict, XDP_PASS,
            "no route inside a test run: translated frames go to the stack"
        );
        addrs(&r.output).1
    };
    let on_a: Vec<SocketAddrV4> = (0..FLOWS).map(|i| choose(&a, i)).collect();
    let on_b: Vec<SocketAddrV4> = (0..FLOWS).map(|i| choose(&b, i)).collect();
    assert_eq!(
        counter(&a, "xdp_maglev"),
        FLOWS as u64,
        "every new flow used the table"
    );
    let differ = on_a.iter().zip(&on_b).filter(|(x, y)| x != y).count();
    assert_eq!(
        differ, 0,
        "two nodes chose differently for {differ} of {FLOWS} flows"
    );

    // lbctl's lookup predicts the table's choice for flows not seen yet.
    for i in 100_000..100_050u32 {
        let (addr, port) = client(i);
        let l = lb_userspace::inspect::lookup(
            a.pin_dir(),
            sa(LB_IP, 80),
            TCP,
            Ipv4Addr::from(addr),
            Some(port),
        )
        .unwrap();
        assert_eq!(l.reason, "maglev");
        assert_eq!(l.backend, Some(choose(&a, i).to_string()));
    }

    // Spread: each backend gets its share (300 expected) within a wide margin.
    let mut per: BTreeMap<SocketAddrV4, u32> = BTreeMap::new();
    for d in &on_a {
        *per.entry(*d).or_default() += 1;
    }
    assert_eq!(per.len(), 10);
    assert!(per.values().all(|n| (200..=400).contains(n)), "{per:?}");

    // Remove one backend: its flows move, the others stay (fresh SYNs on the same tuples choose
    // again through the table).
    let gone = match backend(4).addr {
        std::net::SocketAddr::V4(a) => a,
        std::net::SocketAddr::V6(_) => unreachable!("IPv4 backends"),
    };
    let rest: Vec<BackendKey> = all
        .iter()
        .copied()
        .filter(|k| k.addr != std::net::SocketAddr::V4(gone))
        .collect();
    a.program(&Desired::from([(frontend(), service(&rest))]))
        .unwrap();
    let after: Vec<SocketAddrV4> = (0..FLOWS).map(|i| choose(&a, i)).collect();
    assert!(
        after.iter().all(|d| *d != gone),
        "a flow went to the removed backend"
    );
    let stayed_candidates = on_a.iter().filter(|d| **d != gone).count();
    let moved = on_a
        .iter()
        .zip(&after)
        .filter(|(x, y)| **x != gone && x != y)
        .count();
    println!("removal: {moved} of {stayed_candidates} flows of the remaining backends moved");
    assert!(
        (moved as f64) < 0.04 * stayed_candidates as f64,
        "{moved} of {stayed_candidates} moved"
    );
    // Adding it back restores every choice.
    a.program(&Desired::from([(frontend(), service(&all))]))
        .unwrap();
    let back: Vec<SocketAddrV4> = (0..FLOWS).map(|i| choose(&a, i)).collect();
    assert_eq!(back, on_a);
}

#[test]
fn kernel_ct_flood_of_new_flows_leaves_established_flows_alone() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let all: Vec<BackendKey> = (0..4).map(backend).collect();
    let mut h = harness(&[
        (lb_common::map_name::CONNTRACK_NEW, 1024),
        (lb_common::map_name::CONNTRACK, 8192),
    ]);
    h.program(&Desired::from([(frontend(), service(&all))]))
        .unwrap();

    // 200 confirmed flows (SYN, the backend's SYN-ACK, the client's ACK of it).
    let mut translated = HashMap::new();
    for i in 0..200 {
        let syn = h.run(&tcp(true, client(i), (LB_IP, 80))).unwrap();
        let (snat, be) = addrs(&syn.output);
        h.run(&syn_ack(be, snat)).unwrap();
        let ack = h.run(&tcp(false, client(i), (LB_IP, 80))).unwrap();
        assert_eq!(addrs(&syn.output), addrs(&ack.output));
        translated.insert(i, addrs(&ack.output));
    }
    assert_eq!(counter(&h, "ct_confirmed"), 200);
    let (est, new) = h.conntrack_tiers().unwrap();
    assert_eq!((est.len(), new.len()), (400, 0));

    // A flow that only sent its SYN before the flood.
    let victim = 1_000_000;
    let victim_syn = addrs(
        &h.run(&tcp(true, client(victim), (LB_IP, 80)))
            .unwrap()
            .output,
    );

    // The flood: 100,000 spoofed clients, far more than the new-flow map holds, each sending
    // a SYN and then a blind ACK. The backend answers every SYN (backends do); the spoofer
    // never sees the SYN-ACK, so its ACK cannot acknowledge it, and no flow is confirmed.
    let base_new = counter(&h, "xdp_new_flow");
    let base_confirmed = counter(&h, "ct_confirmed");
    for i in 0..100_000u32 {
        let c = client(2_000_000 + i);
        let syn = h.run(&tcp(true, c, (LB_IP, 80))).unwrap();
        let (snat, be) = addrs(&syn.output);
        h.run(&syn_ack(be, snat)).unwrap();
        h.run(&blind_ack(c, (LB_IP, 80))).unwrap();
    }
    assert_eq!(
        counter(&h, "xdp_new_flow") - base_new,
        100_000,
        "every flood packet was still served"
    );
    assert_eq!(
        counter(&h, "ct_confirmed"),
        base_confirmed,
        "a blind ACK confirmed a spoofed flow"
    );
    let (est, new) = h.conntrack_tiers().unwrap();
    assert_eq!(est.len(), 400, "the flood evicted established entries");
    assert!(new.len() <= 1024);

    // Every established flow still follows its entry, in both directions.
    let before = (
        counter(&h, "xdp_established"),
        counter(&h, "xdp_new_flow"),
        counter(&h, "xdp_reply"),
    );
    for i in 0..200 {
        let r = h.run(&tcp(false, client(i), (LB_IP, 80))).unwrap();
        assert_eq!(
            addrs(&r.output),
            translated[&i],
            "flow {i} changed translation"
        );
        let (snat, be) = translated[&i];
        let reply = h
            .run(&tcp(
                false,
                (be.ip().octets(), be.port()),
                (snat.ip().octets(), snat.port()),
            ))
            .unwrap();
        let (src, dst) = addrs(&reply.output);
        assert_eq!(
            (src, dst),
            (sa(LB_IP, 80), sa(client(i).0, client(i).1)),
            "reply of flow {i}"
        );
    }
    let after = (
        counter(&h, "xdp_established"),
        counter(&h, "xdp_new_flow"),
        counter(&h, "xdp_reply"),
    );
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        (200, 0, 200)
    );

    // The victim's entries were flooded out of the new-flow map; its ACK rebuilds the very same
    // translation (same backend, same SNAT port), so the flow survives.
    let victim_key = CtKey {
        saddr_be: u32::from_ne_bytes(client(victim).0),
        daddr_be: u32::from_ne_bytes(LB_IP),
        sport_be: client(victim).1.to_be(),
        dport_be: 80u16.to_be(),
        proto: TCP,
        _pad: [0; 3],
    };
    assert!(
        !h.conntrack_entries()
            .unwrap()
            .iter()
            .any(|(k, _)| *k == victim_key),
        "the flood should have evicted the victim"
    );
    let victim_ack = addrs(
        &h.run(&tcp(false, client(victim), (LB_IP, 80)))
            .unwrap()
            .output,
    );
    assert_eq!(victim_ack, victim_syn);
}

#[test]
fn kernel_ct_evicted_half_of_a_flow_is_rebuilt_identically() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let all: Vec<BackendKey> = (0..3).map(backend).collect();
    let mut h = harness(&[]);
    h.program(&Desired::from([(frontend(), service(&all))]))
        .unwrap();
    let c = client(7);
    h.run(&tcp(true, c, (LB_IP, 80))).unwrap();
    let first = addrs(&h.run(&tcp(false, c, (LB_IP, 80))).unwrap().output);
    // Evict the original-direction entry only: the reply entry still holds the SNAT port.
    let key = CtKey {
        saddr_be: u32::from_ne_bytes(c.0),
        daddr_be: u32::from_ne_bytes(LB_IP),
        sport_be: c.1.to_be(),
        dport_be: 80u16.to_be(),
        proto: TCP,
        _pad: [0; 3],
    };
    h.conntrack_remove(&key).unwrap();
    let collisions = counter(&h, "xdp_snat_collision");
    let again = addrs(&h.run(&tcp(false, c, (LB_IP, 80))).unwrap().output);
    assert_eq!(
        again, first,
        "the rebuilt flow must keep its backend and SNAT port"
    );
    assert_eq!(
        counter(&h, "xdp_snat_collision"),
        collisions,
        "its own reply entry is not a collision"
    );
}

#[test]
fn kernel_ct_fresh_syn_on_a_confirmed_tuple_starts_a_new_unconfirmed_flow() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let mut h = harness(&[]);
    h.program(&Desired::from([(
        frontend(),
        service(&(0..3).map(backend).collect::<Vec<_>>()),
    )]))
    .unwrap();
    let c = client(11);
    for round in 1..=3u64 {
        let out = h.run(&tcp(true, c, (LB_IP, 80))).unwrap();
        let (est, new) = h.conntrack_tiers().unwrap();
        assert_eq!(
            (est.len(), new.len()),
            (0, 2),
            "round {round}: the old flow's entries are gone, the new one is unconfirmed"
        );
        let (snat, be) = addrs(&out.output);
        h.run(&syn_ack(be, snat)).unwrap();
        h.run(&tcp(false, c, (LB_IP, 80))).unwrap();
        assert_eq!(
            counter(&h, "ct_confirmed"),
            round,
            "round {round}: the client's ACK of the SYN-ACK confirms the new flow"
        );
        // The flow ends with resets (in window: the client's next sequence number is 1002),
        // so the next round's SYN starts a new flow rather than joining an open one.
        h.run(&rst(c, (LB_IP, 80), 1002)).unwrap();
    }
}
