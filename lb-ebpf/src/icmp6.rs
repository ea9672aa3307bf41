//! ICMPv6 errors about translated IPv6 flows (destination unreachable, packet too big, time
//! exceeded), translated for the other side of the translation as icmp.rs does for IPv4, so
//! that path MTU discovery (Packet Too Big above all: IPv6 routers never fragment) and fast
//! failures work through the load balancer.
//!
//! The quoted packet S->D belongs to a flow whose opposite direction D->S has a conntrack entry
//! rewriting it to (nat_s -> nat_d): the quoted packet becomes nat_d -> nat_s and the error goes
//! to nat_d. IPv6 has no header checksum; the ICMPv6 checksum covers the pseudo-header (the
//! outer addresses) and everything quoted.
use lb_common::{ct_flags, proto, CtKey6};
use network_types::{eth::EthHdr, ip::Ipv6Hdr};

use crate::{
    csum::{self, replace16},
    ct,
    hook6::Hook6,
    maps,
    parse::ptr_at,
    parse6::{load_addr, set_addr, ICMPV6},
};

const DEST_UNREACH: u8 = 1;
const PACKET_TOO_BIG: u8 = 2;
const TIME_EXCEEDED: u8 = 3;

/// The ICMPv6 header: type, code, checksum, and the 4 bytes that depend on the type (the MTU
/// of a Packet Too Big).
#[repr(C)]
#[derive(Clone, Copy)]
struct Icmp6Hdr {
    type_: u8,
    code: u8,
    check: [u8; 2],
    rest: [u8; 4],
}

/// The first 8 bytes of the quoted L4 header (see icmp.rs).
#[repr(C)]
#[derive(Clone, Copy)]
struct QuotedL4 {
    source: [u8; 2],
    dest: [u8; 2],
    udp_len: [u8; 2],
    udp_check: [u8; 2],
}

const ICMP_OFF: usize = EthHdr::LEN + Ipv6Hdr::LEN;
const INNER_OFF: usize = ICMP_OFF + core::mem::size_of::<Icmp6Hdr>();
const QUOTED_L4_OFF: usize = INNER_OFF + Ipv6Hdr::LEN;

/// Translates an ICMPv6 error about a translated flow and forwards it; `None` when the message
/// is not such an error (the caller passes it untouched: neighbour discovery among others).
/// A BPF function of its own: its frame comes on top of the IPv6 program's only.
#[inline(never)]
pub fn translate_error<H: Hook6>(ctx: &H) -> Option<u32> {
    let ip = ptr_at::<Ipv6Hdr, H>(ctx, EthHdr::LEN)?;
    let icmp = ptr_at::<Icmp6Hdr, H>(ctx, ICMP_OFF)?;
    let inner = ptr_at::<Ipv6Hdr, H>(ctx, INNER_OFF)?;
    let quoted = ptr_at::<QuotedL4, H>(ctx, QUOTED_L4_OFF)?;
    // SAFETY: all four bounds checked above.
    unsafe {
        if (*ip).next_hdr != ICMPV6 {
            return None;
        }
        let t = (*icmp).type_;
        if t != DEST_UNREACH && t != PACKET_TOO_BIG && t != TIME_EXCEEDED {
            return None;
        }
        let iproto = (*inner).next_hdr;
        // A quoted packet with extension headers is left to the stack.
        if (*inner).version() != 6 || (iproto != proto::TCP && iproto != proto::UDP) {
            return None;
        }
    }
    // The key in the per-CPU scratch (the stack is full).
    let s = maps::PACKET6.get_ptr_mut(0)?;
    // SAFETY: per-CPU value, no concurrent user on this CPU.
    let s = unsafe { &mut *s };
    // SAFETY: bounds checked above.
    let q = unsafe { *quoted };
    let (isport, idport) = (u16::from_ne_bytes(q.source), u16::from_ne_bytes(q.dest));
    // SAFETY: as above.
    unsafe {
        s.key = CtKey6 {
            saddr_be: load_addr(core::ptr::addr_of!((*inner).dst_addr)),
            daddr_be: load_addr(core::ptr::addr_of!((*inner).src_addr)),
            sport_be: idport,
            dport_be: isport,
            proto: (*inner).next_hdr,
            _pad: [0; 3],
        };
    }
    let (e, _) = ct::lookup(&s.key)?;
    // The quoted packet's new source is the entry's destination, and the other way round.
    let (nsport, ndport) = (e.nat_dport_be, e.nat_sport_be);
    // SAFETY: every pointer was bounds checked above.
    unsafe {
        let mut c = u16::from_ne_bytes((*icmp).check);
        // The outer destination (in the pseudo-header): the quoted packet's new source.
        let odst = load_addr(core::ptr::addr_of!((*ip).dst_addr));
        c = replace16(c, &odst, &e.nat_daddr_be);
        set_addr(core::ptr::addr_of_mut!((*ip).dst_addr), &e.nat_daddr_be);
        // The quoted addresses: the key's, swapped.
        c = replace16(c, &s.key.daddr_be, &e.nat_daddr_be);
        c = replace16(c, &s.key.saddr_be, &e.nat_saddr_be);
        set_addr(core::ptr::addr_of_mut!((*inner).src_addr), &e.nat_daddr_be);
        set_addr(core::ptr::addr_of_mut!((*inner).dst_addr), &e.nat_saddr_be);
        // Quoted ports, and the quoted UDP checksum when there is one (a TCP checksum lies
        // beyond the 8 quoted bytes).
        let mut nq = q;
        nq.source = nsport.to_ne_bytes();
        nq.dest = ndport.to_ne_bytes();
        let old_ucheck = u16::from_ne_bytes(q.udp_check);
        let mut ucheck = old_ucheck;
        if s.key.proto == proto::UDP && old_ucheck != 0 {
            ucheck = replace16(ucheck, &s.key.daddr_be, &e.nat_daddr_be);
            ucheck = replace16(ucheck, &s.key.saddr_be, &e.nat_saddr_be);
            ucheck = csum::replace2(ucheck, isport, nsport);
            ucheck = csum::replace2(ucheck, idport, ndport);
            if ucheck == 0 {
                ucheck = 0xffff;
            }
            nq.udp_check = ucheck.to_ne_bytes();
        }
        *quoted = nq;
        c = csum::replace2(c, isport, nsport);
        c = csum::replace2(c, idport, ndport);
        c = csum::replace2(c, old_ucheck, ucheck);
        (*icmp).check = c.to_ne_bytes();
    }
    // Towards a local backend the stack delivers it; otherwise route it.
    let to_local = e.flags & ct_flags::REPLY == 0 && e.flags & ct_flags::LOCAL_BACKEND != 0;
    maps::count(lb_common::counter::XDP_ICMP_ERROR_XLATE, ctx.frame_len());
    Some(ctx.forward6(to_local, crate::flow::NhSlot::NONE))
}
