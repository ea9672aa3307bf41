//! Parse stage of the north-south path, and the one bounds-checked header access of the kernel side.
//!
//! Headers are read through typed views (network-types) and checked once, here; the pointers
//! travel with the parsed packet, so the stages that write (NAT, forward, ICMP errors) need no
//! second check that could fail.
use lb_common::counter;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{bounds::Bounds, flow::Seg, maps, verdict::Stop};

/// The more-fragments bit of `Ipv4Hdr::frag_flags`.
const IP_MF: u8 = 0b001;

/// A pointer to a `T` at `offset` bytes into the packet, or `None` when the packet is too short.
#[inline(always)]
pub fn ptr_at<T, H: Bounds>(ctx: &H, offset: usize) -> Option<*mut T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Where an IPv4 packet sits in its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// A whole datagram.
    No,
    /// The first fragment (offset 0, more fragments follow): it carries the L4 header.
    First,
    /// A later fragment: no L4 header, only payload.
    Later,
}

/// An IPv4 frame: its Ethernet and IPv4 headers, bounds checked (options included).
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Offset of the L4 header in the frame (past the IPv4 options).
    pub l4_off: usize,
    pub proto: u8,
    pub frag: Frag,
    /// The IPv4 header's length (options included) and total length, in bytes.
    pub hdr_len: u16,
    pub tot_len: u16,
}

/// The L4 header of a TCP or UDP packet: where NAT writes ports and the checksum.
#[derive(Clone, Copy)]
pub enum L4 {
    Tcp(*mut TcpHdr),
    Udp(*mut UdpHdr),
}

/// A TCP or UDP packet over IPv4: what the stages read (addresses and ports in network order,
/// as on the wire) and the checked headers they write.
#[derive(Clone, Copy)]
pub struct Packet {
    pub l3: Ipv4,
    pub l4: L4,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// A TCP SYN without ACK: the start of a new connection.
    pub syn_only: bool,
    /// TCP: the segment's numbers and flags (all zero for UDP).
    pub seg: Seg,
}

/// Parses the Ethernet and IPv4 headers; the error says why the frame is passed untouched.
/// Counts IPv4 options (informational).
#[inline(always)]
pub fn ipv4<H: Bounds>(ctx: &H) -> Result<Ipv4, Stop> {
    let eth = ptr_at::<EthHdr, H>(ctx, 0).ok_or(Stop::Pass(counter::XDP_TRUNCATED_ETH))?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Err(Stop::Pass(counter::XDP_NON_IPV4));
    }
    let ip =
        ptr_at::<Ipv4Hdr, H>(ctx, EthHdr::LEN).ok_or(Stop::Pass(counter::XDP_TRUNCATED_IPV4))?;
    // SAFETY: bounds checked by ptr_at.
    let hdr = unsafe { &*ip };
    let hdr_len = hdr.ihl() as usize;
    if hdr.version() != 4 || hdr_len < Ipv4Hdr::LEN {
        return Err(Stop::Pass(counter::XDP_BAD_IPV4));
    }
    if hdr_len > Ipv4Hdr::LEN {
        if ptr_at::<u8, H>(ctx, EthHdr::LEN + hdr_len - 1).is_none() {
            return Err(Stop::Pass(counter::XDP_TRUNCATED_IPV4));
        }
        maps::count(counter::XDP_IPV4_OPTIONS, 0);
    }
    let frag = if hdr.frag_offset() != 0 {
        Frag::Later
    } else if hdr.frag_flags() & IP_MF != 0 {
        Frag::First
    } else {
        Frag::No
    };
    if frag != Frag::No {
        maps::count(counter::XDP_FRAGMENT, ctx.frame_len());
    }
    Ok(Ipv4 {
        eth,
        ip,
        l4_off: EthHdr::LEN + hdr_len,
        proto: hdr.proto,
        frag,
        hdr_len: hdr_len as u16,
        tot_len: u16::from_be_bytes(hdr.tot_len),
    })
}

/// Parses the TCP header of an IPv4 frame whose protocol is TCP.
#[inline(always)]
pub fn tcp<H: Bounds>(ctx: &H, l3: Ipv4) -> Result<Packet, Stop> {
    let tcp = ptr_at::<TcpHdr, H>(ctx, l3.l4_off).ok_or(Stop::Pass(counter::XDP_TRUNCATED_L4))?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*tcp };
    // A first fragment's payload goes on in later fragments, which its length does not see:
    // that matters only to the window checks of FIN and RST, and TCP is not fragmented in
    // practice.
    let seg = Seg::of(h, l3.tot_len, l3.hdr_len);
    let mut p = packet(
        l3,
        L4::Tcp(tcp),
        h.source,
        h.dest,
        h.syn() != 0 && h.ack() == 0,
    );
    p.seg = seg;
    Ok(p)
}

/// Parses the UDP header of an IPv4 frame whose protocol is UDP.
#[inline(always)]
pub fn udp<H: Bounds>(ctx: &H, l3: Ipv4) -> Result<Packet, Stop> {
    let udp = ptr_at::<UdpHdr, H>(ctx, l3.l4_off).ok_or(Stop::Pass(counter::XDP_TRUNCATED_L4))?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { &*udp };
    Ok(packet(l3, L4::Udp(udp), h.src, h.dst, false))
}

#[inline(always)]
fn packet(l3: Ipv4, l4: L4, sport: [u8; 2], dport: [u8; 2], syn_only: bool) -> Packet {
    // SAFETY: `l3.ip` was bounds checked by `ipv4`.
    let (saddr, daddr) = unsafe { ((*l3.ip).src_addr, (*l3.ip).dst_addr) };
    Packet {
        l3,
        l4,
        proto: l3.proto,
        saddr: u32::from_ne_bytes(saddr),
        daddr: u32::from_ne_bytes(daddr),
        sport: u16::from_ne_bytes(sport),
        dport: u16::from_ne_bytes(dport),
        syn_only,
        seg: Seg::default(),
    }
}
