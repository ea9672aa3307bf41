//! ICMP errors about translated flows (destination unreachable, including fragmentation needed,
//! and time exceeded), translated for the other side of the translation so that path MTU
//! discovery and fast failures work through the load balancer.
//!
//! The quoted packet S->D belongs to a flow whose opposite direction D->S has a conntrack entry
//! rewriting it to (nat_s -> nat_d); so the quoted packet is rewritten to nat_d -> nat_s and the
//! error is sent to nat_d.
use lb_common::{ct_flags, proto, CtKey};
use network_types::{icmp::Icmpv4Hdr, ip::Ipv4Hdr};

use crate::{
    csum, ct,
    hook::Hook,
    parse::{ptr_at, Ipv4},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;

/// The first 8 bytes of the quoted L4 header, all that an ICMP error must quote: the ports,
/// where TCP and UDP both keep them, and (UDP only) the length and checksum.
#[repr(C)]
#[derive(Clone, Copy)]
struct QuotedL4 {
    source: [u8; 2],
    dest: [u8; 2],
    udp_len: [u8; 2],
    udp_check: [u8; 2],
}

/// Translates an ICMP error about a translated flow and forwards it; `None` when the message is
/// not such an error (the caller passes it untouched).
#[inline(always)]
pub fn translate_error<H: Hook>(ctx: &H, l3: &Ipv4) -> Option<u32> {
    let ip = l3.ip;
    let icmp = ptr_at::<Icmpv4Hdr, H>(ctx, l3.l4_off)?;
    // SAFETY: bounds checked.
    let icmp_type = unsafe { (*icmp).type_ };
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner_off = l3.l4_off + Icmpv4Hdr::LEN;
    let inner = ptr_at::<Ipv4Hdr, H>(ctx, inner_off)?;
    // SAFETY: bounds checked.
    let (ivihl, iproto, isrc, idst) = unsafe {
        (
            (*inner).vihl,
            (*inner).proto,
            u32::from_ne_bytes((*inner).src_addr),
            u32::from_ne_bytes((*inner).dst_addr),
        )
    };
    // Quoted headers with options are rare enough to leave to the stack.
    if ivihl != 0x45 || (iproto != proto::TCP && iproto != proto::UDP) {
        return None;
    }
    let quoted = ptr_at::<QuotedL4, H>(ctx, inner_off + Ipv4Hdr::LEN)?;
    // SAFETY: bounds checked.
    let q = unsafe { *quoted };
    let (isport, idport) = (u16::from_ne_bytes(q.source), u16::from_ne_bytes(q.dest));
    let key = CtKey {
        saddr_be: idst,
        daddr_be: isrc,
        sport_be: idport,
        dport_be: isport,
        proto: iproto,
        _pad: [0; 3],
    };
    let (e, _) = ct::lookup(&key)?;
    let (nsrc, nsport, ndst, ndport) = (
        e.nat_daddr_be,
        e.nat_dport_be,
        e.nat_saddr_be,
        e.nat_sport_be,
    );
    // SAFETY: `ip` was bounds checked by the parse stage, the others above.
    unsafe {
        // Outer header: the error now goes to the quoted packet's new source.
        let odst = u32::from_ne_bytes((*ip).dst_addr);
        (*ip).check = csum::replace4(u16::from_ne_bytes((*ip).check), odst, nsrc).to_ne_bytes();
        (*ip).dst_addr = nsrc.to_ne_bytes();
        // Quoted IPv4 header.
        let old_icheck = u16::from_ne_bytes((*inner).check);
        let mut icheck = csum::replace4(old_icheck, isrc, nsrc);
        icheck = csum::replace4(icheck, idst, ndst);
        (*inner).check = icheck.to_ne_bytes();
        (*inner).src_addr = nsrc.to_ne_bytes();
        (*inner).dst_addr = ndst.to_ne_bytes();
        // Quoted ports, and the quoted UDP checksum when there is one (a TCP checksum lies
        // beyond the 8 quoted bytes).
        let mut nq = q;
        nq.source = nsport.to_ne_bytes();
        nq.dest = ndport.to_ne_bytes();
        let old_ucheck = u16::from_ne_bytes(q.udp_check);
        let mut ucheck = old_ucheck;
        if iproto == proto::UDP && old_ucheck != 0 {
            ucheck = csum::replace4(ucheck, isrc, nsrc);
            ucheck = csum::replace4(ucheck, idst, ndst);
            ucheck = csum::replace2(ucheck, isport, nsport);
            ucheck = csum::replace2(ucheck, idport, ndport);
            if ucheck == 0 {
                ucheck = 0xffff;
            }
            nq.udp_check = ucheck.to_ne_bytes();
        }
        *quoted = nq;
        // The ICMP checksum covers everything quoted.
        let mut c = u16::from_ne_bytes((*icmp).check);
        c = csum::replace4(c, isrc, nsrc);
        c = csum::replace4(c, idst, ndst);
        c = csum::replace2(c, old_icheck, icheck);
        c = csum::replace2(c, isport, nsport);
        c = csum::replace2(c, idport, ndport);
        c = csum::replace2(c, old_ucheck, ucheck);
        (*icmp).check = c.to_ne_bytes();
    }
    // Towards a local backend the stack delivers it; otherwise route it.
    let to_local = e.flags & ct_flags::REPLY == 0 && e.flags & ct_flags::LOCAL_BACKEND != 0;
    Some(ctx.forward(l3, to_local))
}
