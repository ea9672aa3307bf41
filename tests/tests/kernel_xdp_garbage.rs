//! Garbage in: random and mutated frames through the XDP program and the tc ingress program
//! (BPF_PROG_TEST_RUN, the real kernel), with invariants checked on every one:
//! - a frame is only rewritten when it is addressed to a frontend or belongs to a tracked flow
//!   (or is an ICMP error quoting one);
//! - checksums that were valid on input are valid on output;
//! - the verdict is PASS, DROP or TX, and the counters add up at the end.
//!
//! IPv4 and IPv6 alike: IPv6 frames (random, valid, mutated, of tracked flows) go through the
//! tail call into the IPv6 path (`lb_xdp6`, `lb_tc_ingress6`) with the same invariants.
//!
//! `LB_GARBAGE_FRAMES` (default 1,000,000) and `LB_GARBAGE_SEED` run it longer or replay a run.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
};

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use lb_common::{backend_flags, service_flags, Config};
use lb_tests::{fixture::TcProgram, harness::XdpHarness};

struct Ran {
    verdict: u32,
    output: Vec<u8>,
}
use lb_userspace::control::desired::{BackendKey, Desired, DesiredFrontend, FrontendKey};

const NODE: [u8; 4] = [192, 168, 100, 1];
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

/// Frontends programmed for the run: (address, port, protocol).
fn frontends() -> Vec<(SocketAddrV4, u8)> {
    vec![
        (SocketAddrV4::new(Ipv4Addr::from(NODE), 30080), 6),
        (SocketAddrV4::new(Ipv4Addr::from(NODE), 30081), 17),
        (SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 80), 6),
        (SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 8), 53), 17),
    ]
}

fn desired() -> Desired {
    let be = |last: u8, port: u16, proto: u8, flags: u8| {
        (
            BackendKey {
                addr: std::net::SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(10, 244, 1 + last % 2, last),
                    port,
                )),
                proto,
            },
            flags,
        )
    };
    let be6 = |last: u16, port: u16, proto: u8, flags: u8| {
        (
            BackendKey {
                addr: SocketAddr::new(
                    Ipv6Addr::new(0xfd00, 0x244, 1 + last % 2, 0, 0, 0, 0, last).into(),
                    port,
                ),
                proto,
            },
            flags,
        )
    };
    let v6 = frontends6()
        .into_iter()
        .enumerate()
        .map(move |(i, (addr, proto))| {
            (
                FrontendKey {
                    addr,
                    proto,
                    scope: lb_common::scope::EXTERNAL,
                },
                DesiredFrontend {
                    service_port: format!("ns/v6s{i}:p/{proto}/IPv6"),
                    flags: service_flags::NODE_PORT
                        | if i == 0 {
                            service_flags::SESSION_AFFINITY
                        } else {
                            0
                        },
                    affinity_timeout_s: 30,
                    source_ranges: None,
                    backends: vec![
                        be6(0x10, 8080, proto, backend_flags::LOCAL),
                        be6(0x11, 8080, proto, 0),
                        be6(0x12, 9090, proto, 0),
                    ],
                },
            )
        });
    frontends()
        .into_iter()
        .enumerate()
        .map(|(i, (addr, proto))| {
            let backends = vec![
                be(10, 8080, proto, backend_flags::LOCAL),
                be(11, 8080, proto, 0),
                be(12, 9090, proto, 0),
            ];
            let flags = service_flags::NODE_PORT
                | if i == 0 {
                    service_flags::SESSION_AFFINITY
                } else {
                    0
                };
            (
                FrontendKey {
                    addr: std::net::SocketAddr::V4(addr),
                    proto,
                    scope: lb_common::scope::EXTERNAL,
                },
                DesiredFrontend {
                    service_port: format!("ns/s{i}:p/{proto}"),
                    flags,
                    affinity_timeout_s: 30,
                    source_ranges: None,
                    backends,
                },
            )
        })
        .chain(v6)
        .collect()
}

/// IPv6 frontends programmed for the run.
fn frontends6() -> Vec<(SocketAddr, u8)> {
    vec![
        (SocketAddr::new(NODE6.into(), 30080), 6),
        (SocketAddr::new(NODE6.into(), 30081), 17),
        (
            SocketAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7).into(), 80),
            6,
        ),
    ]
}

/// A well-formed IPv6 frame, sometimes to a frontend, sometimes not.
fn valid_frame6(r: &mut Rng) -> Vec<u8> {
    let fes = frontends6();
    let (dst, port, proto) = if r.below(3) > 0 {
        let (a, p) = r.pick(&fes);
        let IpAddr::V6(ip) = a.ip() else {
            unreachable!()
        };
        (ip.octets(), a.port(), p)
    } else {
        (
            Ipv6Addr::new(
                0xfd00,
                0x244,
                r.below(4) as u16,
                0,
                0,
                0,
                0,
                r.below(250) as u16,
            )
            .octets(),
            r.below(65535) as u16 + 1,
            if r.below(2) == 0 { 6 } else { 17 },
        )
    };
    let src = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x100 + r.below(4) as u16).octets();
    let sport = 1024 + r.below(200) as u16;
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv6(src, dst, 64);
    let payload: Vec<u8> = (0..r.below(40)).map(|_| r.next() as u8).collect();
    let mut v = Vec::new();
    match (proto, r.below(3)) {
        (6, 0) => b
            .tcp(sport, port, r.next() as u32, 1000)
            .syn()
            .write(&mut v, &payload)
            .unwrap(),
        (6, _) => b
            .tcp(sport, port, r.next() as u32, 1000)
            .ack(1)
            .write(&mut v, &payload)
            .unwrap(),
        _ => b.udp(sport, port).write(&mut v, &payload).unwrap(),
    }
    v
}

/// A frame of a tracked IPv6 flow (either direction).
fn tracked_frame6(r: &mut Rng, k: &lb_common::CtKey6) -> Vec<u8> {
    let o = |a: lb_common::Addr6| lb_userspace::dataplane::addr6_from_words(&a).octets();
    let (src, dst) = (o(k.saddr_be), o(k.daddr_be));
    let (sp, dp) = (u16::from_be(k.sport_be), u16::from_be(k.dport_be));
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv6(src, dst, 64);
    let payload: Vec<u8> = (0..r.below(30)).map(|_| r.next() as u8).collect();
    let mut v = Vec::new();
    if k.proto == 6 {
        b.tcp(sp, dp, r.next() as u32, 1000)
            .ack(1)
            .write(&mut v, &payload)
            .unwrap();
    } else {
        b.udp(sp, dp).write(&mut v, &payload).unwrap();
    }
    v
}

/// Flips one to three bits past the Ethernet header, and sometimes cuts the frame short.
fn mutate(r: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + r.below(3) {
        let i = 14 + r.below(v.len() as u64 - 14) as usize;
        v[i] ^= 1 << r.below(8);
    }
    if r.below(4) == 0 {
        let keep = 14 + r.below(v.len() as u64 - 13) as usize;
        v.truncate(keep);
    }
    v
}

/// A well-formed frame, sometimes to a frontend, sometimes not.
fn valid_frame(r: &mut Rng) -> Vec<u8> {
    let fes = frontends();
    let (dst, port, proto) = if r.below(3) > 0 {
        let (a, p) = r.pick(&fes);
        (a.ip().octets(), a.port(), p)
    } else {
        (
            [10, r.below(4) as u8, 0, r.below(250) as u8],
            r.below(65535) as u16 + 1,
            if r.below(2) == 0 { 6 } else { 17 },
        )
    };
    let src = [192, 168, 100, 100 + r.below(4) as u8];
    let sport = 1024 + r.below(200) as u16;
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ipv4(src, dst, 64);
    let payload: Vec<u8> = (0..r.below(40)).map(|_| r.next() as u8).collect();
    let mut v = Vec::new();
    match (proto, r.below(3)) {
        (6, 0) => b
            .tcp(sport, port, r.next() as u32, 1000)
            .syn()
            .write(&mut v, &payload)
            .unwrap(),
        (6, _) => b
            .tcp(sport, port, r.next() as u32, 1000)
            .ack(1)
            .write(&mut v, &payload)
            .unwrap(),
        _ => b.udp(sport, port).write(&mut v, &payload).unwrap(),
    }
    v
}

/// A frame of a tracked flow (either direction), or an ICMP error quoting one.
fn tracked_frame(r: &mut Rng, k: &lb_common::CtKey) -> Vec<u8> {
    let (src, dst) = (k.saddr_be.to_ne_bytes(), k.daddr_be.to_ne_bytes());
    let (sp, dp) = (u16::from_be(k.sport_be), u16::from_be(k.dport_be));
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let mut v = Vec::new();
    if r.below(4) == 0 {
        // An ICMP error from a router, quoting a packet of the flow's other direction.
        let mut q = Vec::new();
        let qb = PacketBuilder::ipv4(dst, src, 64);
        if k.proto == 6 {
            qb.tcp(dp, sp, 1, 1000).ack(1).write(&mut q, &[]).unwrap();
        } else {
            qb.udp(dp, sp).write(&mut q, b"x").unwrap();
        }
        q.truncate(28);
        let kind = etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        );
        b.ipv4([10, 9, 9, 9], dst, 64)
            .icmpv4(kind)
            .write(&mut v, &q)
            .unwrap();
        return v;
    }
    let b = b.ipv4(src, dst, 64);
    let payload: Vec<u8> = (0..r.below(30)).map(|_| r.next() as u8).collect();
    if k.proto == 6 {
        b.tcp(sp, dp, r.next() as u32, 1000)
            .ack(1)
            .write(&mut v, &payload)
            .unwrap();
    } else {
        b.udp(sp, dp).write(&mut v, &payload).unwrap();
    }
    v
}

fn frame(r: &mut Rng, known: &[lb_common::CtKey], known6: &[lb_common::CtKey6]) -> Vec<u8> {
    if !known6.is_empty() && r.below(8) == 0 {
        let k = known6[r.below(known6.len() as u64) as usize];
        let mut v = tracked_frame6(r, &k);
        if r.below(3) == 0 {
            let i = 14 + r.below(v.len() as u64 - 14) as usize;
            v[i] ^= 1 << r.below(8);
        }
        return v;
    }
    if !known.is_empty() && r.below(4) == 0 {
        let k = known[r.below(known.len() as u64) as usize];
        let mut v = tracked_frame(r, &k);
        if r.below(3) == 0 {
            let i = 14 + r.below(v.len() as u64 - 14) as usize;
            v[i] ^= 1 << r.below(8);
        }
        return v;
    }
    match r.below(16) {
        // Random bytes (at least an Ethernet header, which the kernel's test run requires).
        0 => (0..14 + r.below(120)).map(|_| r.next() as u8).collect(),
        // Random bytes behind an IPv4 EtherType.
        1 => {
            let mut v = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
            v.extend((0..r.below(100)).map(|_| r.next() as u8));
            v
        }
        // Random bytes behind an IPv6 EtherType, mostly with version 6 and a next header of
        // interest (ICMPv6, hop-by-hop, routing, fragment, destination options, TCP, UDP).
        2 => {
            let mut v = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
            v.extend((0..r.below(100)).map(|_| r.next() as u8));
            if v.len() > 20 && r.below(8) > 0 {
                v[14] = 0x60 | (v[14] & 0x0f);
                v[20] = r.pick(&[58, 0, 43, 44, 60, 6, 17]);
            }
            v
        }
        // Valid frames, untouched.
        3..=5 => valid_frame(r),
        6..=7 => valid_frame6(r),
        // Valid frames with a few bytes flipped past the Ethernet header, or cut short.
        8..=11 => {
            let v = valid_frame(r);
            mutate(r, v)
        }
        _ => {
            let v = valid_frame6(r);
            mutate(r, v)
        }
    }
}

/// (destination, port, protocol) of an IPv4 or IPv6 TCP/UDP frame, when it parses as one.
fn dest(f: &[u8]) -> Option<(SocketAddr, u8)> {
    let p = SlicedPacket::from_ethernet(f).ok()?;
    let dst: IpAddr = match p.net? {
        etherparse::NetSlice::Ipv4(ip) => ip.header().destination_addr().into(),
        etherparse::NetSlice::Ipv6(ip) => ip.header().destination_addr().into(),
        _ => return None,
    };
    match p.transport? {
        TransportSlice::Tcp(t) => Some((SocketAddr::new(dst, t.destination_port()), 6)),
        TransportSlice::Udp(u) => Some((SocketAddr::new(dst, u.destination_port()), 17)),
        _ => None,
    }
}

/// (source, destination, source port, destination port) of a TCP/UDP frame `dest` parsed.
fn four_tuple(f: &[u8]) -> (IpAddr, IpAddr, u16, u16) {
    let p = SlicedPacket::from_ethernet(f).unwrap();
    let (s, d): (IpAddr, IpAddr) = match p.net.unwrap() {
        etherparse::NetSlice::Ipv4(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        etherparse::NetSlice::Ipv6(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => unreachable!(),
    };
    let (sp, dp) = match p.transport.unwrap() {
        TransportSlice::Tcp(t) => (t.source_port(), t.destination_port()),
        TransportSlice::Udp(u) => (u.source_port(), u.destination_port()),
        _ => unreachable!(),
    };
    (s, d, sp, dp)
}

/// Whether the IPv4 header checksum and the TCP/UDP checksum (over a complete segment) hold.
/// `None` when the frame is not a complete IPv4 TCP/UDP packet.
fn checksums_ok(f: &[u8]) -> Option<bool> {
    let p = SlicedPacket::from_ethernet(f).ok()?;
    let ip = match p.net? {
        etherparse::NetSlice::Ipv4(ip) => ip,
        etherparse::NetSlice::Ipv6(ip) => {
            // No header checksum; the L4 one over the IPv6 pseudo-header (a complete
            // segment: the payload length covers it, no extension headers).
            let h = ip.header().to_header();
            if !ip.extensions().is_empty() {
                return None;
            }
            return Some(match p.transport? {
                TransportSlice::Tcp(t) => {
                    t.to_header().calc_checksum_ipv6(&h, t.payload()).ok()? == t.checksum()
                }
                TransportSlice::Udp(u) => {
                    u.to_header().calc_checksum_ipv6(&h, u.payload()).ok()? == u.checksum()
                }
                _ => return None,
            });
        }
        _ => return None,
    };
    let h = ip.header().to_header();
    if h.header_checksum != h.calc_header_checksum() {
        return Some(false);
    }
    let payload = ip.payload().payload;
    Some(
        match p.transport? {
            TransportSlice::Tcp(t) => {
                t.to_header().calc_checksum_ipv4(&h, t.payload()).ok()? == t.checksum()
            }
            TransportSlice::Udp(u) => {
                u.checksum() == 0
                    || u.to_header().calc_checksum_ipv4(&h, u.payload()).ok()? == u.checksum()
            }
            _ => return None,
        } && payload.len() >= 8,
    )
}

#[test]
fn kernel_xdp_garbage_in_never_mistranslated() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    garbage_in(false, 1_000_000);
}

/// The same on the tc ingress program (the north-south stages where XDP cannot deliver), with
/// its own verdicts; fewer frames (the XDP run covers the shared stages at length).
#[test]
fn kernel_tc_ingress_garbage_in_never_mistranslated() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    garbage_in(true, 200_000);
}

fn garbage_in(on_tc: bool, default_frames: u64) {
    let mut h = XdpHarness::new().unwrap();
    h.set_config(&Config {
        node_addr_be: u32::from_ne_bytes(NODE),
        snat_port_min: 61000,
        snat_port_max: 65535,
        ready: 1,
        ..Default::default()
    })
    .unwrap();
    h.set_config6(&lb_common::Config6 {
        node_addr: lb_userspace::dataplane::addr6_words(NODE6),
        ready: 1,
        _pad: 0,
        ..Default::default()
    })
    .unwrap();
    h.program(&desired()).unwrap();
    let frames: u64 = std::env::var("LB_GARBAGE_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_frames);
    let seed: u64 = std::env::var("LB_GARBAGE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5e_ed1b);
    eprintln!("{frames} frames, seed {seed} (LB_GARBAGE_SEED to replay)");
    let fes: BTreeSet<(SocketAddr, u8)> = frontends()
        .into_iter()
        .map(|(a, p)| (SocketAddr::V4(a), p))
        .chain(frontends6())
        .collect();
    let mut r = Rng(seed | 1);
    let (mut rewritten, mut dropped, mut ran) = (0u64, 0u64, 0u64);
    // (saddr, daddr, sport, dport, proto) of the flows the program is tracking.
    type Tuple = (IpAddr, IpAddr, u16, u16, u8);
    let mut tracked: Option<BTreeSet<Tuple>> = None;
    let read_tracked = |h: &XdpHarness| -> BTreeSet<Tuple> {
        let v4 = h.conntrack_entries().unwrap().into_iter().map(|(k, _)| {
            (
                IpAddr::from(k.saddr_be.to_ne_bytes()),
                IpAddr::from(k.daddr_be.to_ne_bytes()),
                u16::from_be(k.sport_be),
                u16::from_be(k.dport_be),
                k.proto,
            )
        });
        let v6 = h.conntrack6_entries().unwrap().into_iter().map(|(k, _)| {
            (
                IpAddr::from(lb_userspace::dataplane::addr6_from_words(&k.saddr_be)),
                IpAddr::from(lb_userspace::dataplane::addr6_from_words(&k.daddr_be)),
                u16::from_be(k.sport_be),
                u16::from_be(k.dport_be),
                k.proto,
            )
        });
        v4.chain(v6).collect()
    };
    let mut known: Vec<lb_common::CtKey> = Vec::new();
    let mut known6: Vec<lb_common::CtKey6> = Vec::new();
    let tc = on_tc.then(|| {
        TcProgram::load_named(h.pin_dir(), &[], lb_common::program_name::TC_INGRESS).unwrap()
    });
    // Verdicts: (drop, the ones allowed).
    let (drop, allowed): (u32, &[u32]) = if on_tc {
        (2, &[0, 2, 7]) // TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT
    } else {
        (1, &[1, 2, 3]) // XDP_DROP, XDP_PASS, XDP_TX
    };
    for n in 0..frames {
        if n % 5000 == 1000 {
            known = h
                .conntrack_entries()
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .take(2000)
                .collect();
            known6 = h
                .conntrack6_entries()
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .take(2000)
                .collect();
        }
        let input = frame(&mut r, &known, &known6);
        let (verdict, output) = match &tc {
            Some(tc) => match tc.run(&input) {
                Ok(r) => r,
                // BPF_PROG_TEST_RUN builds no socket buffer from a frame too short for the
                // header its EtherType names (IPv4: 20 bytes, IPv6: 40): such a frame never
                // reaches the program here.
                Err(_)
                    if input.len()
                        < 14 + if input[12..14] == [0x86, 0xdd] {
                            40
                        } else {
                            20
                        } =>
                {
                    continue
                }
                Err(e) => panic!("frame {n}: {e:#}"),
            },
            None => {
                let res = h.run(&input).unwrap();
                (res.verdict, res.output)
            }
        };
        ran += 1;
        let res = Ran { verdict, output };
        assert!(
            allowed.contains(&res.verdict),
            "frame {n}: verdict {}",
            res.verdict
        );
        if res.verdict == drop {
            dropped += 1;
        }
        if res.output == input {
            continue;
        }
        rewritten += 1;
        // Rewritten: addressed to a frontend, or part of a tracked flow, or an ICMP error.
        if let Some(d) = dest(&input) {
            if !fes.contains(&d) {
                let (src, dst, sp, dp) = four_tuple(&input);
                // Consult conntrack as it was (re-read lazily, it only grows here).
                let key = (src, dst, sp, dp, d.1);
                if !tracked.as_ref().is_some_and(|t| t.contains(&key)) {
                    tracked = Some(read_tracked(&h));
                }
                assert!(
                    tracked.as_ref().unwrap().contains(&key),
                    "frame {n}: rewrote a packet of no frontend and no flow: {input:02x?}"
                );
            }
        }
        if checksums_ok(&input) == Some(true) {
            assert_eq!(
                checksums_ok(&res.output),
                Some(true),
                "frame {n}: valid checksums broken: {input:02x?} -> {:02x?}",
                res.output
            );
        }
    }
    let c = h.counters().unwrap();
    assert_eq!(c["xdp_rx"].packets, ran, "every frame counted once");
    assert_eq!(
        c["xdp_verdict_pass"].packets
            + c["xdp_verdict_drop"].packets
            + c["xdp_tx"].packets
            + c["xdp_redirect"].packets,
        ran,
        "verdict counters add up"
    );
    assert_eq!(c["xdp_verdict_drop"].packets, dropped);
    assert!(
        rewritten > ran / 20,
        "the run exercised translation ({rewritten} rewritten)"
    );
    for path in [
        "xdp_new_flow",
        "xdp_established",
        "xdp_reply",
        "xdp_icmp_error_xlate",
        "xdp_ipv6",
        "xdp_icmpv6_pass",
        "xdp_ipv6_ext_hdr",
    ] {
        assert!(c[path].packets > 0, "the run exercised {path}");
    }
    eprintln!("{rewritten} rewritten, {dropped} dropped, counters: {c:?}");
}
