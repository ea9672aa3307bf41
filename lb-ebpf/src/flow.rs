//! The plain data the stages of both north-south paths pass each other, with no dependency on
//! any stage (so that maps.rs can hold it in its scratch values and every stage can import it
//! without a circle): a TCP segment's numbers, an IPv6 packet as the IPv6 path holds it, the
//! socket lookup's IPv6 tuple, and a confirmed flow's next-hop slot.
use lb_common::{Addr6, NextHop};
use network_types::tcp::TcpHdr;

/// What the TCP header says about a segment, for the conntrack's state and windows.
#[derive(Clone, Copy, Default)]
pub struct Seg {
    /// Sequence and acknowledgment numbers, host order.
    pub seq: u32,
    pub ack: u32,
    /// `seg_flags` bits.
    pub flags: u8,
    /// Payload bytes (the IPv4 total length less both headers).
    pub len: u32,
}

/// Bits of `Seg::flags`.
pub mod seg_flags {
    pub const SYN: u8 = 1;
    pub const ACK: u8 = 2;
    pub const FIN: u8 = 4;
    pub const RST: u8 = 8;
}

impl Seg {
    /// A TCP header's segment in an IPv4 packet of `tot_len` bytes with a `hdr_len`-byte IPv4
    /// header (the payload is what the total length leaves after both headers).
    #[inline(always)]
    pub fn of(h: &TcpHdr, tot_len: u16, hdr_len: u16) -> Seg {
        let flags = (h.syn() as u8 * seg_flags::SYN)
            | (h.ack() as u8 * seg_flags::ACK)
            | (h.fin() as u8 * seg_flags::FIN)
            | (h.rst() as u8 * seg_flags::RST);
        let hdrs = hdr_len as u32 + h.doff() as u32 * 4;
        Seg {
            seq: u32::from_be_bytes(h.seq),
            ack: u32::from_be_bytes(h.ack_seq),
            flags,
            len: (tot_len as u32).saturating_sub(hdrs),
        }
    }

    #[inline(always)]
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    /// The sequence number after this segment (a SYN and a FIN count one).
    #[inline(always)]
    pub fn end(&self) -> u32 {
        self.seq
            .wrapping_add(self.len)
            .wrapping_add(self.has(seg_flags::SYN) as u32)
            .wrapping_add(self.has(seg_flags::FIN) as u32)
    }
}

/// A TCP or UDP packet over IPv6 without extension headers: what the stages read (addresses
/// and ports as on the wire). It holds no packet pointer: it lives in a per-CPU scratch value
/// (`maps::PACKET6`; 128-bit addresses do not fit the program's stack beside the rest), and
/// the stages that write find the headers again at their fixed offsets ([`headers`]).
#[derive(Clone, Copy)]
pub struct Packet6 {
    pub proto: u8,
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub sport: u16,
    pub dport: u16,
    /// A TCP SYN without ACK: the start of a new connection.
    pub syn_only: bool,
    /// TCP: the segment's numbers and flags (all zero for UDP).
    pub seg: Seg,
}

/// The `ipv6` member of `struct bpf_sock_tuple`.
#[repr(C)]
pub struct Tuple6 {
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub sport: u16,
    pub dport: u16,
}

/// Where a confirmed flow's direction keeps its next hop (its conntrack value's `nh`; null:
/// nowhere, the flow is not confirmed), and the packet's time (seconds, as the entry's). A
/// null pointer rather than an `Option`: `None` would leave `now` undefined, and LLVM may spill
/// an undefined register, which the verifier refuses to read.
pub struct NhSlot {
    pub nh: *mut NextHop,
    pub now: u32,
}

impl NhSlot {
    /// No slot.
    pub const NONE: NhSlot = NhSlot {
        nh: core::ptr::null_mut(),
        now: 0,
    };
}
