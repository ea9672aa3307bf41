//! Parse stage of the IPv6 north-south path (`north_south6.rs`): the Ethernet and fixed IPv6
//! headers, then TCP or UDP, bounds checked once as in parse.rs. A packet whose next header is
//! an extension header (hop-by-hop, routing, fragment, destination options, ...) is passed
//! untranslated and counted; ICMPv6 (neighbour discovery above all) is passed untouched.
use lb_common::{counter, proto, Addr6};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv6Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    bounds::Bounds,
    flow::{Packet6, Seg},
    parse::ptr_at,
    pktmem,
    verdict::Stop,
};

/// ICMPv6's next-header number.
pub const ICMPV6: u8 = 58;

/// Whether a next-header value names an IPv6 extension header (RFC 8200 and the IANA
/// registry's list), rather than an upper-layer protocol.
#[inline(always)]
fn extension_header(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// Reads an address field of an IPv6 header copied out of the packet (tc egress) as the maps
/// hold addresses.
#[inline(always)]
pub fn addr(field: &[u8; 16]) -> Addr6 {
    // SAFETY: a reference to sixteen bytes; read without alignment.
    unsafe { core::ptr::read_unaligned(field as *const [u8; 16] as *const Addr6) }
}

/// Reads an address field of a bounds-checked IPv6 header in the packet (the packet's own, or
/// one an ICMPv6 error quotes) as the maps hold addresses: four 32-bit loads (pktmem.rs).
#[inline(always)]
pub fn load_addr(field: *const [u8; 16]) -> Addr6 {
    let p = field as *const u8;
    // SAFETY: the callers pass a field inside a bounds-checked header of the packet.
    unsafe {
        [
            pktmem::load32(p),
            pktmem::load32(p.add(4)),
            pktmem::load32(p.add(8)),
            pktmem::load32(p.add(12)),
        ]
    }
}

/// Writes an address field of a bounds-checked IPv6 header in the packet: four 32-bit stores
/// (pktmem.rs).
#[inline(always)]
pub fn set_addr(field: *mut [u8; 16], a: &Addr6) {
    let p = field as *mut u8;
    // SAFETY: as for [`load_addr`].
    unsafe {
        pktmem::store32(p, a[0]);
        pktmem::store32(p.add(4), a[1]);
        pktmem::store32(p.add(8), a[2]);
        pktmem::store32(p.add(12), a[3]);
    }
}

/// Offset of the L4 header (no extension headers).
pub const L4_OFF: usize = EthHdr::LEN + Ipv6Hdr::LEN;

/// The Ethernet and IPv6 headers of a packet [`packet`] parsed, bounds checked again (the
/// check cannot fail: the packet's length has not changed since). The L4 header is checked
/// where it is written, in the branch of its protocol (a pointer whose type depends on a value
/// read twice from the scratch map is one the verifier cannot follow).
#[inline(always)]
pub fn headers<H: Bounds>(ctx: &H) -> Option<(*mut EthHdr, *mut Ipv6Hdr)> {
    let eth = ptr_at::<EthHdr, H>(ctx, 0)?;
    let ip = ptr_at::<Ipv6Hdr, H>(ctx, EthHdr::LEN)?;
    Some((eth, ip))
}

/// Parses an IPv6 frame down to its TCP or UDP header into `p`; the error says why it is
/// passed untouched.
#[inline(always)]
pub fn packet<H: Bounds>(ctx: &H, p: &mut Packet6) -> Result<(), Stop> {
    let eth = ptr_at::<EthHdr, H>(ctx, 0).ok_or(Stop::Pass(counter::XDP_TRUNCATED_ETH))?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv6 as u16 {
        return Err(Stop::Pass(counter::XDP_NON_IPV4));
    }
    let ip = ptr_at::<Ipv6Hdr, H>(ctx, EthHdr::LEN).ok_or(Stop::Pass(counter::XDP_BAD_IPV6))?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &*ip };
    if hdr.version() != 6 {
        return Err(Stop::Pass(counter::XDP_BAD_IPV6));
    }
    let next = hdr.next_hdr;
    let payload_len = u16::from_be_bytes(hdr.payload_len);
    let off = EthHdr::LEN + Ipv6Hdr::LEN;
    // SAFETY: `ip` is bounds checked; only field addresses are taken.
    let (saddr, daddr) = unsafe {
        (
            load_addr(core::ptr::addr_of!((*ip).src_addr)),
            load_addr(core::ptr::addr_of!((*ip).dst_addr)),
        )
    };
    p.proto = next;
    p.saddr = saddr;
    p.daddr = daddr;
    p.syn_only = false;
    match next {
        proto::TCP => {
            let tcp = ptr_at::<TcpHdr, H>(ctx, off).ok_or(Stop::Pass(counter::XDP_TRUNCATED_L4))?;
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*tcp };
            p.sport = u16::from_ne_bytes(h.source);
            p.dport = u16::from_ne_bytes(h.dest);
            p.syn_only = h.syn() != 0 && h.ack() == 0;
            // The IPv4 arithmetic with a 40-byte header: the payload is what the payload
            // length leaves after the TCP header.
            p.seg = Seg::of(
                h,
                payload_len.wrapping_add(Ipv6Hdr::LEN as u16),
                Ipv6Hdr::LEN as u16,
            );
        }
        proto::UDP => {
            let udp = ptr_at::<UdpHdr, H>(ctx, off).ok_or(Stop::Pass(counter::XDP_TRUNCATED_L4))?;
            // SAFETY: bounds checked by ptr_at.
            let h = unsafe { &*udp };
            p.sport = u16::from_ne_bytes(h.src);
            p.dport = u16::from_ne_bytes(h.dst);
            // (Set here, not before the match: zeroing it is a call to `memset`, which TCP
            // would pay for a value it overwrites.)
            p.seg = Seg::default();
        }
        ICMPV6 => return Err(Stop::Pass(counter::XDP_ICMPV6_PASS)),
        n if extension_header(n) => return Err(Stop::Pass(counter::XDP_IPV6_EXT_HDR)),
        _ => return Err(Stop::Pass(counter::XDP_NOT_TCP_UDP)),
    }
    Ok(())
}
