//! kube-proxy's REJECT for clients outside the node: a new flow to a Service port without any
//! endpoint in the cluster is answered with an ICMP port unreachable that the datapath builds
//! from the packet itself, so the client's connect() fails at once with ECONNREFUSED (TCP and
//! connected UDP alike) instead of timing out. (In-node clients get the same answer from the
//! socket programs, sock.rs.) A Service port that has endpoints, none of them usable for this
//! traffic (externalTrafficPolicy Local without a local one), is dropped, as kube-proxy does.
//!
//! The frame becomes: its Ethernet header (left for the forward stage, which writes the next
//! hop's addresses, or for the stack, which the frame still addresses), a new IPv4 header from
//! the frontend to the client, the ICMP header, and the quote: the packet's IPv4 header and the
//! first 8 bytes of its L4 header, as RFC 792 asks and as the kernel's own errors quote at
//! least. It is then forwarded like a translated packet. Answers are limited per CPU and second
//! (`limits::REJECTS_PER_SECOND`), and never go to a source RFC 1122 forbids (0.0.0.0/8,
//! loopback, multicast, broadcast); such flows are dropped unanswered (`REJECT_SUPPRESSED`).
//!
//! IPv6 ([`port_unreachable6`]) is the same with an ICMPv6 port unreachable (type 1, code 4)
//! in a new IPv6 header, never to the unspecified address, loopback or a multicast group
//! (RFC 4443 2.4), from the same budget. Its quote is the fixed IPv6 header and the first 8
//! bytes of L4, as for IPv4; the kernel quotes as much as fits in 1280 bytes. Both are
//! enough for the client's TCP and UDP to find the socket the error is about.
use lb_common::{counter, limits, Addr6};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    clock,
    flow::{NhSlot, Packet6},
    hook::{Hook, ICMP_HDR_LEN, ICMP_ROOM},
    hook6::Hook6,
    maps::{self, ServiceEvent, REJECT_RATE},
    parse::{self, ptr_at, Packet},
    parse6::{set_addr, ICMPV6},
    verdict::Stop,
};

/// Bytes an ICMPv6 error adds in front of the packet it quotes: a 40-byte IPv6 header and the
/// 8-byte ICMPv6 header.
pub const ICMP6_ROOM: usize = Ipv6Hdr::LEN + ICMP_HDR_LEN;
/// The IPv6 quote: the fixed header and 8 bytes of L4 (packets with extension headers never
/// reach a frontend lookup).
const QUOTE6: usize = Ipv6Hdr::LEN + 8;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;

/// Longest quote: an IPv4 header with 40 bytes of options and 8 bytes of L4.
const MAX_QUOTE: usize = 60 + 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// IPTOS_PREC_INTERNETCONTROL, the type of service the kernel gives its ICMP errors.
const TOS_INTERNETCONTROL: u8 = 0xc0;
const TTL: u8 = 64;
const PROTO_ICMP: u8 = 1;

/// Answers a new flow to a Service port without endpoints (see the module doc). `len` is the
/// frame's length as it came in, for the counters. `Ok`: the answer's forwarding verdict.
#[inline(always)]
pub fn port_unreachable<H: Hook>(
    ctx: &H,
    p: &Packet,
    svc_port_id: u32,
    len: u64,
) -> Result<u32, Stop> {
    let unanswered = Stop::Drop {
        reason: counter::REJECT_SUPPRESSED,
        svc_port_id,
        event: ServiceEvent::DropNoBackend,
    };
    if !may_answer(p.saddr) || !within_rate() {
        return Err(unanswered);
    }
    let (client, frontend) = (p.saddr, p.daddr);
    let quote = p.l3.hdr_len as usize + 8;
    // From here on the frame may be cut: whatever fails, it must not leave as it is.
    ctx.icmp_room(ICMP_ROOM, quote).map_err(|_| unanswered)?;
    write(ctx, client, frontend, quote).ok_or(unanswered)?;
    let l3 = parse::ipv4(ctx).map_err(|_| unanswered)?;
    maps::count(counter::REJECT_SENT, len);
    maps::count_service(svc_port_id, ServiceEvent::DropNoBackend);
    Ok(ctx.forward(&l3, false))
}

/// The IPv6 REJECT (see the module doc): answers a new flow to a Service port without
/// endpoints; `len` is the frame's length as it came in, for the counters. A BPF function of
/// its own (the IPv6 path's stack is full). The verdict, its reason counted.
#[inline(never)]
pub fn port_unreachable6<H: Hook6>(ctx: &H, p: &Packet6, svc_port_id: u32, len: u64) -> u32 {
    let unanswered = Stop::Drop {
        reason: counter::REJECT_SUPPRESSED,
        svc_port_id,
        event: ServiceEvent::DropNoBackend,
    };
    if !may_answer6(&p.saddr) || !within_rate() {
        return unanswered.act(ctx);
    }
    // `p` lives in a per-CPU scratch value: reshaping the frame leaves it as it is.
    if ctx.icmp_room(ICMP6_ROOM, QUOTE6).is_err() || write6(ctx, &p.saddr, &p.daddr).is_none() {
        return unanswered.act(ctx);
    }
    maps::count(counter::REJECT_SENT, len);
    maps::count_service(svc_port_id, ServiceEvent::DropNoBackend);
    ctx.forward6(false, NhSlot::NONE)
}

/// Whether an ICMPv6 error may go to `saddr` (RFC 4443 2.4 (e): not to the unspecified
/// address or a multicast group; nor to loopback, which no wire carries).
#[inline(always)]
fn may_answer6(saddr: &Addr6) -> bool {
    let first = u32::from_be(saddr[0]);
    let zero_to_96 = saddr[0] == 0 && saddr[1] == 0 && saddr[2] == 0;
    let last = u32::from_be(saddr[3]);
    first >> 24 != 0xff && !(zero_to_96 && last <= 1)
}

/// Writes the new IPv6 and ICMPv6 headers in front of the quote (`icmp_room` made the room),
/// with the ICMPv6 checksum (pseudo-header, header, quote). `None`: the frame is shorter than
/// it must be now.
#[inline(always)]
fn write6<H: Hook6>(ctx: &H, client: &Addr6, frontend: &Addr6) -> Option<()> {
    let ip = ptr_at::<Ipv6Hdr, H>(ctx, EthHdr::LEN)?;
    let icmp = ptr_at::<[u8; ICMP_HDR_LEN], H>(ctx, EthHdr::LEN + Ipv6Hdr::LEN)?;
    let quote = ptr_at::<[u8; QUOTE6], H>(ctx, EthHdr::LEN + ICMP6_ROOM)?;
    let payload_len = (ICMP_HDR_LEN + QUOTE6) as u16;
    // SAFETY: all three bounds checked above.
    unsafe {
        // Version 6, traffic class 0, no flow label.
        (*ip).vcf = [0x60, 0, 0, 0];
        (*ip).payload_len = payload_len.to_be_bytes();
        (*ip).next_hdr = ICMPV6;
        (*ip).hop_limit = TTL;
        set_addr(core::ptr::addr_of_mut!((*ip).src_addr), frontend);
        set_addr(core::ptr::addr_of_mut!((*ip).dst_addr), client);
        *icmp = [ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    }
    // The pseudo-header: both addresses, the 32-bit upper-layer length, three zero bytes and
    // the next header; words summed as they sit in memory (as everywhere here).
    let mut s = 0u32;
    let mut i = 0;
    while i < 4 {
        s += (frontend[i] & 0xffff) + (frontend[i] >> 16);
        s += (client[i] & 0xffff) + (client[i] >> 16);
        i += 1;
    }
    s += u16::from_ne_bytes(payload_len.to_be_bytes()) as u32;
    s += u16::from_ne_bytes([0, ICMPV6]) as u32;
    s += u16::from_ne_bytes([ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH]) as u32;
    // SAFETY: bounds checked above.
    let q = unsafe { &*quote };
    let mut i = 0;
    while i < QUOTE6 {
        s += u16::from_ne_bytes([q[i], q[i + 1]]) as u32;
        i += 2;
    }
    set_check(icmp, s);
    Some(())
}

/// Whether an ICMP error may go to `saddr_be` (RFC 1122 3.2.2: never to a source that does not
/// name one host).
#[inline(always)]
fn may_answer(saddr_be: u32) -> bool {
    let first = u32::from_be(saddr_be) >> 24;
    first != 0 && first != 127 && first < 224
}

/// Takes one answer from this CPU's budget for the current second.
#[inline(always)]
fn within_rate() -> bool {
    let Some(w) = REJECT_RATE.get_ptr_mut(0) else {
        return false;
    };
    let now = clock::now_s();
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        if (*w).second != now {
            (*w).second = now;
            (*w).sent = 0;
        }
        if (*w).sent >= limits::REJECTS_PER_SECOND {
            return false;
        }
        (*w).sent += 1;
    }
    true
}

/// Writes the new IPv4 and ICMP headers in front of the quote (`icmp_room` made the room),
/// with both checksums. `None`: the frame is shorter than it must be now.
#[inline(always)]
fn write<H: Hook>(ctx: &H, client: u32, frontend: u32, quote: usize) -> Option<()> {
    let ip_off = EthHdr::LEN;
    let icmp_off = ip_off + Ipv4Hdr::LEN;
    let ip = ptr_at::<[u8; Ipv4Hdr::LEN], H>(ctx, ip_off)?;
    let icmp = ptr_at::<[u8; ICMP_HDR_LEN], H>(ctx, icmp_off)?;
    let tot_len = ((ICMP_ROOM + quote) as u16).to_be_bytes();
    let (src, dst) = (frontend.to_ne_bytes(), client.to_ne_bytes());
    let mut h = [
        0x45,
        TOS_INTERNETCONTROL,
        tot_len[0],
        tot_len[1],
        0,
        0,
        0,
        0,
        TTL,
        PROTO_ICMP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
    ];
    let check = fold(sum(&h)).to_ne_bytes();
    h[10] = check[0];
    h[11] = check[1];
    // SAFETY: both bounds checked above.
    unsafe {
        *ip = h;
        *icmp = [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    }
    // The ICMP checksum covers its header and the quote.
    let mut s = (u16::from_ne_bytes([ICMP_DEST_UNREACH, ICMP_PORT_UNREACH])) as u32;
    let quote_off = icmp_off + ICMP_HDR_LEN;
    let mut i = 0;
    while i < MAX_QUOTE {
        if i >= quote {
            break;
        }
        let w = ptr_at::<[u8; 2], H>(ctx, quote_off + i)?;
        // SAFETY: bounds checked.
        s += u16::from_ne_bytes(unsafe { *w }) as u32;
        i += 2;
    }
    set_check(icmp, s);
    Some(())
}

/// Writes the checksum of the word sum `s` into a bounds-checked ICMP or ICMPv6 header.
#[inline(always)]
fn set_check(icmp: *mut [u8; ICMP_HDR_LEN], s: u32) {
    let check = fold(s).to_ne_bytes();
    // SAFETY: the callers bounds checked the header.
    unsafe {
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
}

/// The sum of a header's 16-bit words as they sit in memory.
#[inline(always)]
fn sum(h: &[u8; Ipv4Hdr::LEN]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i < Ipv4Hdr::LEN {
        s += u16::from_ne_bytes([h[i], h[i + 1]]) as u32;
        i += 2;
    }
    s
}

/// The Internet checksum of a sum of 16-bit words.
#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
