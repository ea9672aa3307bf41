//! NAT stage of the north-south path under XDP (tc writes through helpers, hook.rs): writes a conntrack entry's addresses and ports into the packet
//! (DNAT to the backend, SNAT to the node, or back to the frontend for replies) and updates the
//! IPv4 and L4 checksums incrementally.
use lb_common::CtEntry;

use crate::{
    csum,
    parse::{Ipv4, Packet, L4},
};

/// Rewrites only the addresses of an IPv4 packet (a fragment after the first, which has no
/// ports) from (`saddr`, `daddr`) to `e`'s, with the IPv4 checksum.
#[inline(always)]
pub fn rewrite_addrs(l3: &Ipv4, saddr: u32, daddr: u32, e: &CtEntry) {
    let ip = l3.ip;
    // SAFETY: `ip` was bounds checked by the parse stage.
    unsafe {
        let mut ipc = u16::from_ne_bytes((*ip).check);
        ipc = csum::replace4(ipc, saddr, e.nat_saddr_be);
        ipc = csum::replace4(ipc, daddr, e.nat_daddr_be);
        (*ip).check = ipc.to_ne_bytes();
        (*ip).src_addr = e.nat_saddr_be.to_ne_bytes();
        (*ip).dst_addr = e.nat_daddr_be.to_ne_bytes();
    }
}

/// Rewrites `p` to `e`'s addresses and ports. Cannot fail: every header it writes was bounds
/// checked by the parse stage.
#[inline(always)]
pub fn rewrite(p: &Packet, e: &CtEntry) {
    let ip = p.l3.ip;
    // SAFETY: `ip` and the L4 header were bounds checked by the parse stage, and nothing since
    // changed the packet's length.
    unsafe {
        let mut ipc = u16::from_ne_bytes((*ip).check);
        ipc = csum::replace4(ipc, p.saddr, e.nat_saddr_be);
        ipc = csum::replace4(ipc, p.daddr, e.nat_daddr_be);
        (*ip).check = ipc.to_ne_bytes();
        (*ip).src_addr = e.nat_saddr_be.to_ne_bytes();
        (*ip).dst_addr = e.nat_daddr_be.to_ne_bytes();

        let sport = e.nat_sport_be.to_ne_bytes();
        let dport = e.nat_dport_be.to_ne_bytes();
        match p.l4 {
            L4::Tcp(tcp) => {
                (*tcp).check = l4_check(u16::from_ne_bytes((*tcp).check), p, e).to_ne_bytes();
                (*tcp).source = sport;
                (*tcp).dest = dport;
            }
            L4::Udp(udp) => {
                let old = u16::from_ne_bytes((*udp).check);
                // A UDP checksum of 0 means "none": leave it so; a computed 0 is sent as 0xffff.
                if old != 0 {
                    let c = l4_check(old, p, e);
                    (*udp).check = if c == 0 { 0xffff } else { c }.to_ne_bytes();
                }
                (*udp).src = sport;
                (*udp).dst = dport;
            }
        }
    }
}

/// The L4 checksum after the rewrite: the pseudo-header's addresses and the ports change.
#[inline(always)]
fn l4_check(old: u16, p: &Packet, e: &CtEntry) -> u16 {
    let mut c = csum::replace4(old, p.saddr, e.nat_saddr_be);
    c = csum::replace4(c, p.daddr, e.nat_daddr_be);
    c = csum::replace2(c, p.sport, e.nat_sport_be);
    csum::replace2(c, p.dport, e.nat_dport_be)
}
