//! North-south packet fixtures: XDP translation of NodePort/LoadBalancer/external-IP flows, run on
//! the real kernel with BPF_PROG_TEST_RUN. Output frames are compared byte for byte with frames
//! etherparse builds from scratch, so every incremental checksum update is checked.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use etherparse::PacketBuilder;
use lb_common::{backend_flags, ct_flags, Config, Counter, CtEntry, CtKey};
use lb_tests::harness::XdpHarness;
use lb_userspace::control::desired::{BackendKey, Desired, DesiredFrontend, FrontendKey};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const CLIENT: [u8; 4] = [192, 168, 100, 100];
const NODE: [u8; 4] = [192, 168, 100, 1];
const LOCAL_POD: [u8; 4] = [10, 244, 1, 10];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 10];
const LB_IP: [u8; 4] = [203, 0, 113, 7];
const TCP: u8 = 6;
const UDP: u8 = 17;

#[derive(Clone, Copy)]
enum Kind {
    Syn,
    Ack,
    Udp,
    UdpNoChecksum,
}

fn frame(kind: Kind, src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src.0, dst.0, 64);
    let payload = b"hello";
    let mut v = Vec::new();
    match kind {
        Kind::Syn => ip.tcp(src.1, dst.1, 1000, 64000).syn().write(&mut v, &[]).unwrap(),
        Kind::Ack => ip.tcp(src.1, dst.1, 1001, 64000).ack(5000).write(&mut v, payload).unwrap(),
        Kind::Udp | Kind::UdpNoChecksum => ip.udp(src.1, dst.1).write(&mut v, payload).unwrap(),
    }
    if let Kind::UdpNoChecksum = kind {
        v[14 + 20 + 6] = 0;
        v[14 + 20 + 7] = 0;
    }
    v
}

fn sa(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

struct Fixture {
    h: XdpHarness,
}

impl Fixture {
    fn new(snat: (u16, u16)) -> Option<Self> {
        lb_tests::require_privileges()?;
        let mut h = XdpHarness::new().expect("loading the XDP program into the kernel");
        h.set_config(&Config {
            node_addr_be: u32::from_ne_bytes(NODE),
            snat_port_min: snat.0,
            snat_port_max: snat.1,
            ready: 1,
            _pad: 0,
        })
        .unwrap();
        let fe = |ip, port, proto| FrontendKey { addr: sa(ip, port), proto, scope: lb_common::scope::EXTERNAL };
        let be = |ip, port, proto, flags| (BackendKey { addr: sa(ip, port), proto }, flags);
        let entry = |backends: Vec<(BackendKey, u8)>| DesiredFrontend {
            service_port: format!("default/{:?}", backends.first().map(|b| b.0)),
            flags: lb_common::service_flags::NODE_PORT,
            affinity_timeout_s: 0,
            backends,
        };
        let d: Desired = [
            // externalTrafficPolicy Local: the one local endpoint.
            (fe(NODE, 30080, TCP), entry(vec![be(LOCAL_POD, 8080, TCP, backend_flags::LOCAL)])),
            // externalTrafficPolicy Cluster with a remote endpoint.
            (fe(NODE, 30081, TCP), entry(vec![be(REMOTE_POD, 8080, TCP, 0)])),
            (fe(NODE, 30053, UDP), entry(vec![be(REMOTE_POD, 9090, UDP, 0)])),
            (fe(LB_IP, 80, TCP), entry(vec![be(LOCAL_POD, 8080, TCP, backend_flags::LOCAL)])),
            // Local policy on a node without local endpoints.
            (fe(LB_IP, 81, TCP), entry(vec![])),
        ]
        .into();
        h.program(&d).unwrap();
        Some(Self { h })
    }

    /// Runs a frame and returns (verdict, output, counters that moved by name -> packets).
    fn run(&self, input: &[u8]) -> (u32, Vec<u8>, BTreeMap<&'static str, u64>) {
        let before = self.h.counters().unwrap();
        let r = self.h.run(input).unwrap();
        let after = self.h.counters().unwrap();
        let moved = after
            .iter()
            .filter_map(|(k, a): (&&str, &Counter)| {
                let d = a.packets - before[k].packets;
                (d != 0).then_some((*k, d))
            })
            .collect();
        (r.verdict, r.output, moved)
    }

    fn ct(&self, key: &CtKey) -> Option<CtEntry> {
        self.h.conntrack_entries().unwrap().into_iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

fn key(src: ([u8; 4], u16), dst: ([u8; 4], u16), proto: u8) -> CtKey {
    CtKey {
        saddr_be: u32::from_ne_bytes(src.0),
        daddr_be: u32::from_ne_bytes(dst.0),
        sport_be: src.1.to_be(),
        dport_be: dst.1.to_be(),
        proto,
        _pad: [0; 3],
    }
}

fn counts(names: &[&'static str]) -> BTreeMap<&'static str, u64> {
    names.iter().map(|n| (*n, 1)).collect()
}

#[test]
fn kernel_xdp_nat_new_flow_to_local_backend_keeps_client_address() {
    let Some(f) = Fixture::new((61000, 65535)) else { return };
    let input = frame(Kind::Syn, (CLIENT, 40000), (NODE, 30080));
    let (verdict, out, moved) = f.run(&input);
    assert_eq!(verdict, XDP_PASS, "local backends are reached through the stack (cni0)");
    assert_eq!(out, frame(Kind::Syn, (CLIENT, 40000), (LOCAL_POD, 8080)), "DNAT only, valid checksums");
    assert_eq!(moved, counts(&["xdp_rx", "xdp_new_flow", "xdp_translated_pass", "xdp_verdict_pass"]));
    // Both directions are tracked; the reply entry maps the backend back to the frontend.
    let rev = f.ct(&key((LOCAL_POD, 8080), (CLIENT, 40000), TCP)).expect("reply entry");
    assert_eq!(rev.flags, ct_flags::REPLY | ct_flags::LOCAL_BACKEND);
    assert_eq!((rev.nat_saddr_be, u16::from_be(rev.nat_sport_be)), (u32::from_ne_bytes(NODE), 30080));
    assert!(f.ct(&key((CLIENT, 40000), (NODE, 30080), TCP)).is_some(), "original entry");
    // Unconfirmed until the client's next packet: both entries in the new-flow tier.
    let (est, new) = f.h.conntrack_tiers().unwrap();
    assert_eq!((est.len(), new.len()), (0, 2));

    // The next segment of the flow follows the entry and confirms the flow.
    let (verdict, out, moved) = f.run(&frame(Kind::Ack, (CLIENT, 40000), (NODE, 30080)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, frame(Kind::Ack, (CLIENT, 40000), (LOCAL_POD, 8080)));
    assert_eq!(moved, counts(&["xdp_rx", "xdp_established", "ct_confirmed", "xdp_translated_pass", "xdp_verdict_pass"]));
    let (est, new) = f.h.conntrack_tiers().unwrap();
    assert_eq!((est.len(), new.len()), (2, 0), "both directions moved to the established tier");
    let moved_rev = f.ct(&key((LOCAL_POD, 8080), (CLIENT, 40000), TCP)).expect("reply entry");
    assert_eq!(CtEntry { last_seen_s: rev.last_seen_s, ..moved_rev }, rev, "the reply entry moved unchanged");

    // A LoadBalancer IP frontend behaves the same.
    let (_, out, _) = f.run(&frame(Kind::Syn, (CLIENT, 40001), (LB_IP, 80)));
    assert_eq!(out, frame(Kind::Syn, (CLIENT, 40001), (LOCAL_POD, 8080)));
}

#[test]
fn kernel_xdp_nat_remote_backend_gets_snat_and_reply_is_translated_back() {
    let Some(f) = Fixture::new((61000, 65535)) else { return };
    let (verdict, out, moved) = f.run(&frame(Kind::Syn, (CLIENT, 40000), (NODE, 30081)));
    // No route is known inside the test run (ifindex 0), so the stack gets the translated frame.
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(moved, counts(&["xdp_rx", "xdp_new_flow", "xdp_translated_pass", "xdp_verdict_pass"]));
    let port = u16::from_be_bytes([out[34], out[35]]);
    assert!((61000..=65535).contains(&port), "SNAT port {port} inside the range");
    assert_eq!(out, frame(Kind::Syn, (NODE, port), (REMOTE_POD, 8080)), "DNAT + SNAT, valid checksums");
    let rev = f.ct(&key((REMOTE_POD, 8080), (NODE, port), TCP)).expect("reply entry keyed on the SNAT port");
    assert_eq!(rev.flags, ct_flags::REPLY | ct_flags::SNAT);

    // The backend's answer comes back to node:port and leaves as frontend -> client.
    let (verdict, out, moved) = f.run(&frame(Kind::Ack, (REMOTE_POD, 8080), (NODE, port)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, frame(Kind::Ack, (NODE, 30081), (CLIENT, 40000)));
    assert_eq!(moved, counts(&["xdp_rx", "xdp_reply", "xdp_translated_pass", "xdp_verdict_pass"]));

    // The client's next segment reuses the same SNAT port.
    let (_, out, moved) = f.run(&frame(Kind::Ack, (CLIENT, 40000), (NODE, 30081)));
    assert_eq!(out, frame(Kind::Ack, (NODE, port), (REMOTE_POD, 8080)));
    assert_eq!(moved["xdp_established"], 1);
}

#[test]
fn kernel_xdp_nat_udp_checksums() {
    let Some(f) = Fixture::new((61000, 65535)) else { return };
    let (_, out, _) = f.run(&frame(Kind::Udp, (CLIENT, 5353), (NODE, 30053)));
    let port = u16::from_be_bytes([out[34], out[35]]);
    assert_eq!(out, frame(Kind::Udp, (NODE, port), (REMOTE_POD, 9090)));
    let (_, out, _) = f.run(&frame(Kind::Udp, (REMOTE_POD, 9090), (NODE, port)));
    assert_eq!(out, frame(Kind::Udp, (NODE, 30053), (CLIENT, 5353)));
    // A datagram without checksum stays without one.
    let (_, out, _) = f.run(&frame(Kind::UdpNoChecksum, (CLIENT, 5354), (NODE, 30053)));
    let port = u16::from_be_bytes([out[34], out[35]]);
    assert_eq!(out, frame(Kind::UdpNoChecksum, (NODE, port), (REMOTE_POD, 9090)));
}

#[test]
fn kernel_xdp_nat_snat_port_collision_then_exhaustion() {
    let Some(mut f) = Fixture::new((61000, 61001)) else { return };
    // Another flow already holds 61000 towards the same backend.
    let taken = key((REMOTE_POD, 8080), (NODE, 61000), TCP);
    let other = CtEntry {
        nat_saddr_be: u32::from_ne_bytes(NODE),
        nat_daddr_be: u32::from_ne_bytes([192, 168, 100, 200]),
        nat_sport_be: 30081u16.to_be(),
        nat_dport_be: 1234u16.to_be(),
        svc_port_id: 1,
        backend_id: 1,
        last_seen_s: 0,
        flags: ct_flags::REPLY | ct_flags::SNAT,
        _pad: 0,
    };
    f.h.conntrack_insert(&taken, &other).unwrap();
    let (verdict, out, moved) = f.run(&frame(Kind::Syn, (CLIENT, 40000), (NODE, 30081)));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, frame(Kind::Syn, (NODE, 61001), (REMOTE_POD, 8080)), "the free port is chosen");
    assert!(moved.get("xdp_snat_collision").copied().unwrap_or(0) <= 1);
    assert_eq!(f.ct(&taken), Some(other), "the existing flow's entry is untouched");
    // Now both ports are taken: the next new flow is dropped after every try.
    let (verdict, _, moved) = f.run(&frame(Kind::Syn, (CLIENT, 40001), (NODE, 30081)));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(moved["xdp_snat_collision"], lb_common::limits::SNAT_TRIES as u64);
    assert_eq!(moved["xdp_drop_snat_exhausted"], 1);
    assert_eq!(moved["xdp_verdict_drop"], 1);
    // The rare event reaches userspace through aya-log, at debug level.
    let logs = f.h.take_logs();
    assert!(
        logs.iter().any(|(l, m)| *l == log::Level::Debug && m.contains("SNAT ports exhausted towards 10.244.2.10:8080")),
        "{logs:?}"
    );
}

#[test]
fn kernel_xdp_nat_no_local_endpoint_drops() {
    let Some(f) = Fixture::new((61000, 65535)) else { return };
    let input = frame(Kind::Syn, (CLIENT, 40000), (LB_IP, 81));
    let (verdict, _, moved) = f.run(&input);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(moved, counts(&["xdp_rx", "xdp_drop_no_backend", "xdp_verdict_drop"]));
    assert!(f.h.conntrack_entries().unwrap().is_empty(), "nothing tracked for a dropped flow");
}

#[test]
fn kernel_xdp_nat_fresh_syn_on_old_tuple_chooses_again() {
    let Some(f) = Fixture::new((61000, 65535)) else { return };
    f.run(&frame(Kind::Syn, (CLIENT, 40000), (NODE, 30080)));
    let (_, _, moved) = f.run(&frame(Kind::Syn, (CLIENT, 40000), (NODE, 30080)));
    assert_eq!(moved["xdp_new_flow"], 1);
    assert!(!moved.contains_key("xdp_established"));
}

/// An ICMP error quoting `quoted` (IPv4 + first 8 bytes), sent from `from` to `to`.
fn icmp_error(from: [u8; 4], to: [u8; 4], kind: etherparse::Icmpv4Type, quoted: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(from, to, 64).icmpv4(kind);
    let mut v = Vec::new();
    b.write(&mut v, quoted).unwrap();
    v
}

/// The IPv4 header and first 8 bytes of L4 of a frame built by `frame`.
fn quote(f: &[u8]) -> Vec<u8> {
    f[14..14 + 28].to_vec()
}

fn frag_needed() -> etherparse::Icmpv4Type {
    etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: 1400,
    })
}

#[test]
fn kernel_xdp_nat_icmp_errors_are_translated_both_ways() {
    let Some(f) = Fixture::new((61000, 65535)) else { return };
    // A Cluster flow through SNAT.
    let (_, out, _) = f.run(&frame(Kind::Udp, (CLIENT, 5353), (NODE, 30053)));
    let port = u16::from_be_bytes([out[34], out[35]]);
    // A router towards the backend says "fragmentation needed" about the translated packet, to
    // the node: it must reach the client, quoting the packet the client sent.
    let router = [10, 0, 0, 254];
    let err = icmp_error(router, NODE, frag_needed(), &quote(&frame(Kind::Udp, (NODE, port), (REMOTE_POD, 9090))));
    let (verdict, got, moved) = f.run(&err);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(moved["xdp_icmp_error_xlate"], 1);
    let want = icmp_error(router, CLIENT, frag_needed(), &quote(&frame(Kind::Udp, (CLIENT, 5353), (NODE, 30053))));
    assert_eq!(got, want, "outer destination, quoted header, quoted UDP checksum and ICMP checksum");

    // A router on the client's side says "unreachable" about a reply the frontend sent: it must
    // reach the backend, quoting the packet the backend sent.
    let unreach = etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Host);
    let err = icmp_error(router, NODE, unreach.clone(), &quote(&frame(Kind::Udp, (NODE, 30053), (CLIENT, 5353))));
    let (_, got, moved) = f.run(&err);
    assert_eq!(moved["xdp_icmp_error_xlate"], 1);
    let want = icmp_error(router, REMOTE_POD, unreach, &quote(&frame(Kind::Udp, (REMOTE_POD, 9090), (NODE, port))));
    assert_eq!(got, want);

    // TCP, Local policy: time exceeded about a packet to the local backend goes to the client.
    f.run(&frame(Kind::Syn, (CLIENT, 40000), (NODE, 30080)));
    let ttl = etherparse::Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit);
    let err = icmp_error(router, CLIENT, ttl.clone(), &quote(&frame(Kind::Syn, (CLIENT, 40000), (LOCAL_POD, 8080))));
    let (_, got, _) = f.run(&err);
    // The quoted packet names the client as its source already; the destination goes back to
    // the frontend, and the error still goes to the client.
    let want = icmp_error(router, CLIENT, ttl, &quote(&frame(Kind::Syn, (CLIENT, 40000), (NODE, 30080))));
    assert_eq!(got, want);

    // Errors about flows we never translated, and ICMP that is not an error, pass untouched.
    let stranger = icmp_error(router, NODE, frag_needed(), &quote(&frame(Kind::Udp, (NODE, 1111), (REMOTE_POD, 2222))));
    let (verdict, got, moved) = f.run(&stranger);
    assert_eq!((verdict, got.as_slice()), (XDP_PASS, stranger.as_slice()));
    assert_eq!(moved["xdp_not_tcp_udp"], 1);
    assert!(!moved.contains_key("xdp_icmp_error_xlate"));
}
