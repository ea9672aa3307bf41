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
use lb_common::{counter, limits};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    clock,
    hook::{Hook, ICMP_HDR_LEN, ICMP_ROOM},
    maps::{self, ServiceEvent, REJECT_RATE},
    parse::{self, ptr_at, Packet},
    verdict::Stop,
};

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
    ctx.icmp_room(quote).map_err(|_| unanswered)?;
    write(ctx, client, frontend, quote).ok_or(unanswered)?;
    let l3 = parse::ipv4(ctx).map_err(|_| unanswered)?;
    maps::count(counter::REJECT_SENT, len);
    maps::count_service(svc_port_id, ServiceEvent::DropNoBackend);
    Ok(ctx.forward(&l3, false))
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
    let check = fold(s).to_ne_bytes();
    // SAFETY: bounds checked above.
    unsafe {
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    Some(())
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
