//! The program a north-south packet runs in: XDP where the device delivers XDP_TX and redirects,
//! tc (TCX) ingress elsewhere (a veth whose peer runs no XDP program drops such frames). The
//! stages (north_south.rs and the modules it runs) are written once against [`Hook`]; only
//! three things differ between the two programs:
//! - the verdicts (XDP actions, tc actions);
//! - writing a translated packet: XDP rewrites in place with incremental checksums; tc goes
//!   through the kernel's checksum helpers, which also keep the socket buffer's checksum state
//!   right (a veth hands over packets whose L4 checksum is only partial, or with a checksum of
//!   the whole packet that in-place writes would leave stale);
//! - forwarding: XDP_TX or a redirect to the FIB's next hop (forward.rs); tc redirects with
//!   `bpf_redirect_neigh`, which resolves the next hop's address itself.
//!
//! Packet pointers: tc's helpers invalidate every packet pointer, so after `rewrite` the tc side
//! reads the packet again through `bpf_skb_load_bytes` and never through a parsed pointer.
use core::mem::offset_of;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_MARK_MANGLED_0,
        BPF_F_PSEUDO_HDR, TC_ACT_OK,
    },
    helpers::{
        bpf_fib_lookup, bpf_redirect_neigh, bpf_skb_change_tail, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::{counter, proto, CtEntry};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    bounds::Bounds,
    flow::NhSlot,
    forward, maps, nat,
    parse::{ptr_at, Ipv4, Packet},
};

/// Bytes an ICMP error adds in front of the packet it quotes (reject.rs): a 20-byte IPv4 header
/// and the 8-byte ICMP header.
pub const ICMP_ROOM: usize = Ipv4Hdr::LEN + ICMP_HDR_LEN;
pub const ICMP_HDR_LEN: usize = 8;

/// A helper refused a write: the packet may be half written and must not leave as it is.
pub struct WriteFailed;

/// What the north-south stages need from the program they run in, beyond the packet's bounds
/// and verdicts ([`Bounds`]).
pub trait Hook: Bounds {
    /// Writes `e`'s addresses and ports into `p`, with every checksum.
    fn rewrite(&self, p: &Packet, e: &CtEntry) -> Result<(), WriteFailed>;
    /// Sends a translated packet on (the stack for local backends and unknown routes);
    /// returns the verdict. `l3`'s pointers may be stale on tc (see the module doc).
    fn forward(&self, l3: &Ipv4, to_local_backend: bool) -> u32;
    /// `forward` for a packet of a confirmed flow, with the flow's next-hop slot (forward.rs).
    /// tc has no use for it: `bpf_redirect_neigh` resolves the next hop itself.
    fn forward_flow(&self, l3: &Ipv4, to_local_backend: bool, slot: NhSlot) -> u32 {
        let _ = slot;
        self.forward(l3, to_local_backend)
    }
    /// Reshapes the frame for an ICMP error quoting the first `quote` bytes of its IP packet:
    /// the Ethernet header, `room` bytes to write (the new IP and ICMP headers: [`ICMP_ROOM`]
    /// for IPv4, `reject::ICMP6_ROOM` for IPv6), the quote, nothing after it; all of it
    /// directly writable. `Err`: the frame may be cut and must not leave.
    fn icmp_room(&self, room: usize, quote: usize) -> Result<(), WriteFailed>;
}

impl Hook for XdpContext {
    #[inline(always)]
    fn rewrite(&self, p: &Packet, e: &CtEntry) -> Result<(), WriteFailed> {
        nat::rewrite(p, e);
        Ok(())
    }

    #[inline(always)]
    fn forward(&self, l3: &Ipv4, to_local_backend: bool) -> u32 {
        forward::forward(self, l3, to_local_backend, NhSlot::NONE)
    }

    #[inline(always)]
    fn forward_flow(&self, l3: &Ipv4, to_local_backend: bool, slot: NhSlot) -> u32 {
        forward::forward(self, l3, to_local_backend, slot)
    }

    #[inline(always)]
    fn icmp_room(&self, room: usize, quote: usize) -> Result<(), WriteFailed> {
        let len = (self.data_end() - self.data()) as i32;
        let want = (EthHdr::LEN + quote) as i32;
        // SAFETY (both helpers): valid context; they move the packet's bounds only.
        if len > want && unsafe { bpf_xdp_adjust_tail(self.ctx, want - len) } != 0 {
            return Err(WriteFailed);
        }
        if unsafe { bpf_xdp_adjust_head(self.ctx, -(room as i32)) } != 0 {
            return Err(WriteFailed);
        }
        // The Ethernet header moves to the new front.
        let from = ptr_at::<[u8; EthHdr::LEN], Self>(self, room).ok_or(WriteFailed)?;
        let to = ptr_at::<[u8; EthHdr::LEN], Self>(self, 0).ok_or(WriteFailed)?;
        // SAFETY: both bounds checked; the ranges do not overlap.
        unsafe { *to = *from };
        Ok(())
    }
}

const IP_OFF: usize = EthHdr::LEN;
const IP_CHECK_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, check);
const IP_SRC_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, src_addr);
const IP_DST_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, dst_addr);
const IP_TTL_OFF: usize = IP_OFF + offset_of!(Ipv4Hdr, ttl);
const AF_INET: u8 = 2;

impl Hook for TcContext {
    #[inline(always)]
    fn rewrite(&self, p: &Packet, e: &CtEntry) -> Result<(), WriteFailed> {
        let l4 = p.l3.l4_off;
        let (check_off, mangled) = if p.proto == proto::TCP {
            (l4 + offset_of!(TcpHdr, check), 0)
        } else {
            // A UDP checksum of 0 means "none" and stays; a computed 0 is sent as 0xffff.
            (l4 + offset_of!(UdpHdr, check), BPF_F_MARK_MANGLED_0 as u64)
        };
        let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled;
        let w = |r: Result<(), i64>| r.map_err(|_| WriteFailed);
        // The L4 checksum: the pseudo-header's addresses, then the ports.
        w(self.l4_csum_replace(check_off, p.saddr as u64, e.nat_saddr_be as u64, pseudo | 4))?;
        w(self.l4_csum_replace(check_off, p.daddr as u64, e.nat_daddr_be as u64, pseudo | 4))?;
        w(self.l4_csum_replace(
            check_off,
            p.sport as u64,
            e.nat_sport_be as u64,
            mangled | 2,
        ))?;
        w(self.l4_csum_replace(
            check_off,
            p.dport as u64,
            e.nat_dport_be as u64,
            mangled | 2,
        ))?;
        w(self.l3_csum_replace(IP_CHECK_OFF, p.saddr as u64, e.nat_saddr_be as u64, 4))?;
        w(self.l3_csum_replace(IP_CHECK_OFF, p.daddr as u64, e.nat_daddr_be as u64, 4))?;
        w(self.store(IP_SRC_OFF, &e.nat_saddr_be, 0))?;
        w(self.store(IP_DST_OFF, &e.nat_daddr_be, 0))?;
        // Source and destination ports: the first four bytes of TCP and UDP headers alike.
        w(self.store(l4, &e.nat_sport_be, 0))?;
        w(self.store(l4 + 2, &e.nat_dport_be, 0))?;
        Ok(())
    }

    #[inline(always)]
    fn icmp_room(&self, room: usize, quote: usize) -> Result<(), WriteFailed> {
        let want = (EthHdr::LEN + quote) as u32;
        // SAFETY: valid context; the helper trims the socket buffer.
        if self.len() > want && unsafe { bpf_skb_change_tail(self.skb.skb, want, 0) } != 0 {
            return Err(WriteFailed);
        }
        // Room between the Ethernet and the IP header.
        self.adjust_room(room as i32, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|_| WriteFailed)?;
        self.pull_data(want + room as u32).map_err(|_| WriteFailed)
    }

    #[inline(always)]
    fn forward(&self, _l3: &Ipv4, to_local_backend: bool) -> u32 {
        if to_local_backend {
            maps::count(counter::XDP_TRANSLATED_PASS, 0);
            return TC_ACT_OK as u32;
        }
        tc_forward(self).unwrap_or_else(|()| {
            maps::count(counter::XDP_TRANSLATED_PASS, 0);
            TC_ACT_OK as u32
        })
    }
}

/// tc: the FIB names the device towards the (translated) destination; the packet goes out
/// there with its TTL decremented, and `bpf_redirect_neigh` fills in the next hop's address
/// (resolving it when it is not known yet). `Err`: the stack routes it (no route, TTL
/// running out, or a read or write the kernel refused).
#[inline(always)]
fn tc_forward(ctx: &TcContext) -> Result<u32, ()> {
    let ip: Ipv4Hdr = ctx.load(IP_OFF).map_err(|_| ())?;
    if ip.ttl <= 1 {
        return Err(()); // the stack answers with Time Exceeded
    }
    // SAFETY: zeroed plain-data struct; the union fields written are the IPv4 members.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    unsafe {
        fib.family = AF_INET;
        fib.__bindgen_anon_1.tot_len = u16::from_be_bytes(ip.tot_len);
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
        fib.l4_protocol = ip.proto;
        // SAFETY: the context's socket buffer, valid for the program's run.
        fib.ifindex = (*ctx.skb.skb).ingress_ifindex;
    }
    // SAFETY: valid context and params.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Err(());
    }
    // TTL and protocol share one 16-bit word of the header checksum.
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    let new = u16::from_ne_bytes([ip.ttl - 1, ip.proto]);
    ctx.l3_csum_replace(IP_CHECK_OFF, old as u64, new as u64, 2)
        .map_err(|_| ())?;
    ctx.store(IP_TTL_OFF, &(ip.ttl - 1), 0).map_err(|_| ())?;
    maps::count(counter::XDP_REDIRECT, 0);
    // SAFETY: helper without preconditions; no next-hop parameters (the kernel looks it up).
    Ok(unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as u32)
}
