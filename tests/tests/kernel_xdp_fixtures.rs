//! Packet fixtures for the XDP program, run on the real kernel with BPF_PROG_TEST_RUN: for each
//! frame, the verdict, the exact output bytes and the exact counter deltas.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use etherparse::{IpNumber, Ipv4Header, PacketBuilder};
use lb_common::Counter;
use lb_tests::harness::XdpHarness;
use lb_userspace::control::desired::{BackendKey, Desired, DesiredFrontend, FrontendKey};

const XDP_PASS: u32 = 2;
const CLIENT: [u8; 4] = [192, 168, 100, 100];
const NODE: [u8; 4] = [192, 168, 100, 1];

fn harness() -> Option<XdpHarness> {
    lb_tests::require_privileges()?;
    Some(XdpHarness::new().expect("loading the XDP program into the kernel"))
}

fn tcp_frame(dst: [u8; 4], dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(CLIENT, dst, 64)
        .tcp(40000, dport, 1, 64000)
        .syn();
    let payload = [];
    let mut v = Vec::with_capacity(b.size(0));
    b.write(&mut v, &payload).unwrap();
    v
}

fn udp_frame(dst: [u8; 4], dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(CLIENT, dst, 64)
        .udp(40000, dport);
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

/// Ethernet header + the given IPv4 header + payload.
fn ipv4_frame(ip: &Ipv4Header, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    ip.write(&mut v).unwrap();
    v.extend_from_slice(payload);
    v
}

fn ip_header(proto: IpNumber, payload_len: u16) -> Ipv4Header {
    Ipv4Header::new(payload_len, 64, proto, CLIENT, NODE).unwrap()
}

/// Runs `frame`, checks verdict PASS, output == input, and that exactly `expected` counters moved
/// (by one packet and, for per-frame counters, by the frame's length in bytes).
fn check(h: &XdpHarness, name: &str, frame: &[u8], expected: &[&str]) {
    let before = h.counters().unwrap();
    let r = h.run(frame).unwrap();
    assert_eq!(r.verdict, XDP_PASS, "{name}: verdict");
    assert_eq!(r.output, frame, "{name}: output bytes must be the input, unmodified");
    let after = h.counters().unwrap();
    let moved: BTreeMap<&str, Counter> = after
        .iter()
        .filter_map(|(k, a)| {
            let b = before[k];
            let d = Counter { packets: a.packets - b.packets, bytes: a.bytes - b.bytes };
            (d != Counter::default()).then_some((*k, d))
        })
        .collect();
    let mut want: BTreeMap<&str, Counter> = BTreeMap::new();
    let len = frame.len() as u64;
    want.insert("xdp_rx", Counter { packets: 1, bytes: len });
    want.insert("xdp_verdict_pass", Counter { packets: 1, bytes: 0 });
    for c in expected {
        // Informational counters count packets only; reason counters count bytes too.
        let bytes = if *c == "xdp_ipv4_options" { 0 } else { len };
        want.insert(c, Counter { packets: 1, bytes });
    }
    assert_eq!(moved, want, "{name}: counter deltas");
}

#[test]
fn kernel_xdp_non_ip_frames_pass() {
    let Some(h) = harness() else { return };
    // ARP request.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 192, 168, 100, 100]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[192, 168, 100, 1]);
    check(&h, "arp", &arp, &["xdp_non_ipv4"]);
    // IPv6 (EtherType 0x86dd).
    let mut v6 = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
    v6.extend_from_slice(&[0x60; 40]);
    check(&h, "ipv6", &v6, &["xdp_non_ipv4"]);
    // VLAN-tagged frame: not parsed (passed to the stack as non-IPv4).
    let mut vlan = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x81, 0x00, 0, 5, 0x08, 0x00];
    vlan.extend_from_slice(&[0x45; 20]);
    check(&h, "vlan", &vlan, &["xdp_non_ipv4"]);
}

#[test]
fn kernel_xdp_truncated_headers_pass() {
    let Some(h) = harness() else { return };
    // Ethernet header cut short: the kernel's test run refuses frames below 14 bytes (as no
    // driver delivers them), so the shortest frame we can feed is exactly one Ethernet header.
    assert!(h.run(&[0u8; 10]).is_err(), "the kernel refuses a 10-byte test frame");
    let eth_only = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    check(&h, "ethernet only", &eth_only, &["xdp_truncated_ipv4"]);
    // IPv4 header cut at 12 bytes.
    let full = tcp_frame(NODE, 80);
    check(&h, "ipv4 cut", &full[..14 + 12], &["xdp_truncated_ipv4"]);
    // IHL claims 60 bytes of header but the frame ends after 40.
    let mut ihl15 = full[..14 + 40].to_vec();
    ihl15[14] = 0x4f;
    check(&h, "ihl beyond frame", &ihl15, &["xdp_truncated_ipv4"]);
    // TCP header cut after 10 bytes.
    let tcp = tcp_frame(NODE, 80);
    check(&h, "tcp cut", &tcp[..14 + 20 + 10], &["xdp_truncated_l4"]);
    // UDP header cut after 4 bytes.
    let udp = udp_frame(NODE, 53, b"");
    check(&h, "udp cut", &udp[..14 + 20 + 4], &["xdp_truncated_l4"]);
}

#[test]
fn kernel_xdp_malformed_ipv4_passes() {
    let Some(h) = harness() else { return };
    let mut v6in4 = tcp_frame(NODE, 80);
    v6in4[14] = 0x65; // version 6 inside an IPv4 EtherType
    check(&h, "bad version", &v6in4, &["xdp_bad_ipv4"]);
    let mut ihl4 = tcp_frame(NODE, 80);
    ihl4[14] = 0x44; // IHL 4 (< 5)
    check(&h, "ihl below 5", &ihl4, &["xdp_bad_ipv4"]);
}

#[test]
fn kernel_xdp_ipv4_options_are_parsed_past() {
    let Some(h) = harness() else { return };
    let mut ip = ip_header(IpNumber::UDP, 8 + 4);
    ip.options = [1, 1, 1, 1, 1, 1, 1, 0].as_slice().try_into().unwrap(); // NOPs + EOL
    let udp = etherparse::UdpHeader::with_ipv4_checksum(40000, 9999, &ip, b"ping").unwrap();
    let mut payload = udp.to_bytes().to_vec();
    payload.extend_from_slice(b"ping");
    let frame = ipv4_frame(&ip, &payload);
    assert_eq!(frame[14] & 0x0f, 7, "header with 8 bytes of options");
    check(&h, "options, unknown frontend", &frame, &["xdp_ipv4_options", "xdp_no_frontend"]);
    // Options and then a cut L4 header: the parser honours the IHL offset.
    check(&h, "options, cut l4", &frame[..14 + 28 + 4], &["xdp_ipv4_options", "xdp_truncated_l4"]);
}

#[test]
fn kernel_xdp_fragments_pass() {
    let Some(h) = harness() else { return };
    let mut first = ip_header(IpNumber::UDP, 8 + 16);
    first.more_fragments = true;
    let frame = ipv4_frame(&first, &[0u8; 24]);
    check(&h, "first fragment", &frame, &["xdp_fragment"]);
    let mut later = ip_header(IpNumber::UDP, 16);
    later.fragment_offset = 3u16.try_into().unwrap();
    let frame = ipv4_frame(&later, &[0u8; 16]);
    check(&h, "later fragment", &frame, &["xdp_fragment"]);
}

#[test]
fn kernel_xdp_other_protocols_and_unknown_frontends_pass() {
    let Some(h) = harness() else { return };
    let icmp = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(CLIENT, NODE, 64)
        .icmpv4_echo_request(1, 1);
    let mut frame = Vec::new();
    icmp.write(&mut frame, b"hello").unwrap();
    check(&h, "icmp echo", &frame, &["xdp_not_tcp_udp"]);
    check(&h, "tcp unknown", &tcp_frame(NODE, 80), &["xdp_no_frontend"]);
    check(&h, "udp unknown", &udp_frame(NODE, 53, b"q"), &["xdp_no_frontend"]);
}

#[test]
fn kernel_xdp_scopes_are_separate() {
    let Some(mut h) = harness() else { return };
    let be = BackendKey { addr: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 10), 8080), proto: 6 };
    let fe = |scope| FrontendKey { addr: SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80), proto: 6, scope };
    let d = |scope| -> Desired {
        [(fe(scope), DesiredFrontend { service_port: "default/echo:/TCP".into(), flags: 1, affinity_timeout_s: 0, backends: vec![(be, 0)] })].into()
    };
    // A ClusterIP frontend is internal (socket-level): XDP does not see it as a frontend.
    h.program(&d(lb_common::scope::INTERNAL)).unwrap();
    check(&h, "internal frontend", &tcp_frame([10, 96, 0, 10], 80), &["xdp_no_frontend"]);
    // An external frontend is found by XDP; before the agent wrote the datapath config (node
    // address, SNAT ports) it is passed untranslated.
    h.program(&d(lb_common::scope::EXTERNAL)).unwrap();
    check(&h, "external frontend, no config", &tcp_frame([10, 96, 0, 10], 80), &["xdp_no_config"]);
    // A different protocol on the same address and port is another frontend.
    check(&h, "udp same port", &udp_frame([10, 96, 0, 10], 80, b"x"), &["xdp_no_frontend"]);
}
