//! What the IPv6 north-south path (north_south6.rs) needs from the program it runs in: writing a
//! translated packet and forwarding it, for XDP and for tc (the IPv4 twins are in hook.rs and
//! forward.rs; the differences between the two programs are the same).
//!
//! IPv6 has no header checksum: a translation changes the L4 checksum only, through its
//! pseudo-header (both 128-bit addresses) and the ports. Forwarding decrements the hop limit.
use core::mem::offset_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::{counter, proto, Addr6, CtEntry6, NextHop};
use network_types::{eth::EthHdr, ip::Ipv6Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    csum,
    flow::{NhSlot, Packet6},
    hook::{Hook, WriteFailed},
    maps,
    parse::ptr_at,
    parse6, pktmem,
};

const AF_INET6: u8 = 10;
const IP_OFF: usize = EthHdr::LEN;
const IP_SRC_OFF: usize = IP_OFF + offset_of!(Ipv6Hdr, src_addr);
const IP_DST_OFF: usize = IP_OFF + offset_of!(Ipv6Hdr, dst_addr);
const IP_HOP_OFF: usize = IP_OFF + offset_of!(Ipv6Hdr, hop_limit);
const L4_OFF: usize = parse6::L4_OFF;

/// The IPv6 path's writes and forwarding in the program it runs in.
pub trait Hook6: Hook {
    /// Writes `e`'s addresses and ports into `p`, with the L4 checksum.
    fn rewrite6(&self, p: &Packet6, e: &CtEntry6) -> Result<(), WriteFailed>;
    /// Sends a translated packet on (the stack for local backends and routes this program
    /// cannot act on); returns the verdict. The headers are found again at their fixed offsets
    /// (a rewrite on tc invalidated every packet pointer). With a slot
    /// (a confirmed flow, XDP), its cached next hop is used when fresh and a new answer is
    /// kept in it, as the IPv4 path does (forward.rs).
    fn forward6(&self, to_local_backend: bool, slot: NhSlot) -> u32;
}

/// An address as the 16 bytes of the header.
#[inline(always)]
pub fn bytes(a: &Addr6) -> [u8; 16] {
    // SAFETY: four `u32` are sixteen bytes, in memory order (the wire's).
    unsafe { core::mem::transmute::<Addr6, [u8; 16]>(*a) }
}

/// The L4 checksum after the rewrite: the pseudo-header's addresses and the ports change.
#[inline(always)]
fn l4_check(old: u16, p: &Packet6, e: &CtEntry6) -> u16 {
    csum::Update::of(old)
        .words(&p.saddr, &e.nat_saddr_be)
        .words(&p.daddr, &e.nat_daddr_be)
        .half(p.sport, e.nat_sport_be)
        .half(p.dport, e.nat_dport_be)
        .check()
}

/// Looks the route of an IPv6 packet up: the FIB's parameters are built in a per-CPU scratch
/// value (`maps::FIB6`; the IPv6 path's stack is full) from the packet's addresses as they are
/// now (translated), which `ip6` points at. The answer (`None`: no scratch) and the helper's
/// return code.
#[inline(always)]
fn fib_lookup6(
    ctx: &impl EbpfContext,
    ip6: *const Ipv6Hdr,
    ifindex: u32,
) -> Option<(&'static mut FibParams, i64)> {
    let fib = maps::FIB6.get_ptr_mut(0)?;
    // SAFETY: per-CPU value, no concurrent user on this CPU.
    let fib = unsafe { &mut *fib };
    // SAFETY: zeroed plain-data struct.
    *fib = unsafe { core::mem::zeroed() };
    fib.family = AF_INET6;
    fib.ifindex = ifindex;
    // SAFETY: `ip6` is a bounds-checked header in the packet (both programs); the union
    // fields written are the IPv6 members.
    unsafe {
        fib.l4_protocol = (*ip6).next_hdr;
        fib.__bindgen_anon_1.tot_len =
            u16::from_be_bytes((*ip6).payload_len).wrapping_add(Ipv6Hdr::LEN as u16);
        fib.__bindgen_anon_3.ipv6_src = parse6::load_addr(core::ptr::addr_of!((*ip6).src_addr));
        fib.__bindgen_anon_4.ipv6_dst = parse6::load_addr(core::ptr::addr_of!((*ip6).dst_addr));
    }
    // SAFETY: valid context and params.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            fib as *mut FibParams,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    Some((fib, rc))
}

/// Writes a cached next hop's MAC addresses into the Ethernet header: the cache keeps them in
/// the header's order (destination, then source) at offsets where they read as two 16-bit and
/// two 32-bit aligned words, written with one store each (pktmem.rs) instead of twelve byte
/// copies.
///
/// # Safety
/// `eth` is a bounds-checked Ethernet header in the packet; `nh` points to a `NextHop` in a map
/// value.
#[inline(always)]
unsafe fn copy_macs(eth: *mut EthHdr, nh: *const NextHop) {
    const D: usize = offset_of!(NextHop, dmac);
    const _: () = assert!(D % 4 == 2 && offset_of!(NextHop, smac) == D + 6);
    let n = nh as *const u8;
    let e = eth as *mut u8;
    // SAFETY: the caller's; the loads are aligned (`NextHop` is 4-aligned, `D` is 2 modulo 4).
    unsafe {
        pktmem::store16(e, *(n.add(D) as *const u16));
        pktmem::store32(e.add(2), *(n.add(D + 2) as *const u32));
        pktmem::store32(e.add(6), *(n.add(D + 6) as *const u32));
        pktmem::store16(e.add(10), *(n.add(D + 10) as *const u16));
    }
}

impl Hook6 for XdpContext {
    #[inline(always)]
    fn rewrite6(&self, p: &Packet6, e: &CtEntry6) -> Result<(), WriteFailed> {
        let (_, ip) = parse6::headers(self).ok_or(WriteFailed)?;
        // Read once (see `parse6::headers`).
        // SAFETY: a plain read of the scratch value.
        let l4_proto = unsafe { core::ptr::read_volatile(&p.proto) };
        let sport = e.nat_sport_be.to_ne_bytes();
        let dport = e.nat_dport_be.to_ne_bytes();
        // Each protocol's header is checked and written in its own branch, the addresses after
        // both: with the address stores first, LLVM merged the two bounds checks into UDP's
        // shorter one and the verifier refused the TCP checksum's access.
        if l4_proto == proto::TCP {
            let tcp = ptr_at::<TcpHdr, Self>(self, L4_OFF).ok_or(WriteFailed)?;
            // SAFETY: bounds checked just above.
            unsafe {
                (*tcp).check = l4_check(u16::from_ne_bytes((*tcp).check), p, e).to_ne_bytes();
                (*tcp).source = sport;
                (*tcp).dest = dport;
            }
        } else {
            let udp = ptr_at::<UdpHdr, Self>(self, L4_OFF).ok_or(WriteFailed)?;
            // SAFETY: bounds checked just above.
            unsafe {
                let old = u16::from_ne_bytes((*udp).check);
                // 0 (no checksum) is left so; a computed 0 is sent as 0xffff.
                if old != 0 {
                    let c = l4_check(old, p, e);
                    (*udp).check = if c == 0 { 0xffff } else { c }.to_ne_bytes();
                }
                (*udp).src = sport;
                (*udp).dst = dport;
            }
        }
        // SAFETY: `ip` was bounds checked by `headers`.
        unsafe {
            parse6::set_addr(core::ptr::addr_of_mut!((*ip).src_addr), &e.nat_saddr_be);
            parse6::set_addr(core::ptr::addr_of_mut!((*ip).dst_addr), &e.nat_daddr_be);
        }
        Ok(())
    }

    #[inline(always)]
    fn forward6(&self, to_local_backend: bool, slot: NhSlot) -> u32 {
        if to_local_backend {
            maps::count(counter::XDP_TRANSLATED_PASS, 0);
            return xdp_action::XDP_PASS;
        }
        let Some((eth, ip)) = parse6::headers(self) else {
            maps::count(counter::XDP_TRANSLATED_PASS, 0);
            return xdp_action::XDP_PASS;
        };
        // SAFETY: `ip` was bounds checked by `headers` (the rewrite wrote in place).
        let (hop, tot_len) = unsafe {
            (
                (*ip).hop_limit,
                u16::from_be_bytes((*ip).payload_len).wrapping_add(Ipv6Hdr::LEN as u16),
            )
        };
        // SAFETY: the context's metadata, valid for the program's run.
        let ingress = unsafe { (*self.ctx).ingress_ifindex };
        if hop <= 1 {
            // The stack answers with Time Exceeded.
            maps::count(counter::XDP_TRANSLATED_PASS, 0);
            return xdp_action::XDP_PASS;
        }
        let gen = maps::route_gen();
        let cached = !slot.nh.is_null();
        // SAFETY: the slot points into a conntrack value, valid for the program's run; read
        // in place.
        let out = if cached && unsafe { (*slot.nh).stale(gen, ingress, tot_len, slot.now) } == 0 {
            // SAFETY: `eth` was bounds checked by `headers`; the slot as above.
            unsafe {
                copy_macs(eth, slot.nh);
                (*slot.nh).out_ifindex
            }
        } else {
            let Some((fib, rc)) = fib_lookup6(self, ip, ingress) else {
                maps::count(counter::XDP_TRANSLATED_PASS, 0);
                return xdp_action::XDP_PASS;
            };
            let out = fib.ifindex;
            let deliverable = out == ingress || maps::config().is_some_and(|c| c.xdp_device(out));
            if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || !deliverable {
                maps::count(counter::XDP_TRANSLATED_PASS, 0);
                return xdp_action::XDP_PASS;
            }
            if cached {
                // Kept for this flow's next packets (see forward.rs: `fits` only grows until
                // the answer goes stale).
                // SAFETY: as above.
                unsafe {
                    *slot.nh = NextHop {
                        gen,
                        in_ifindex: ingress,
                        out_ifindex: out,
                        checked_s: slot.now,
                        fits: tot_len,
                        dmac: fib.dmac,
                        smac: fib.smac,
                        _pad: [0; 2],
                    }
                };
            }
            // SAFETY: `eth` was bounds checked by `headers`.
            unsafe {
                (*eth).dst_addr = fib.dmac;
                (*eth).src_addr = fib.smac;
            }
            out
        };
        // SAFETY: `ip` was bounds checked by `headers`.
        unsafe { (*ip).hop_limit = hop - 1 };
        if out == ingress {
            maps::count(counter::XDP_TX, 0);
            xdp_action::XDP_TX
        } else {
            maps::count(counter::XDP_REDIRECT, 0);
            // SAFETY: helper without preconditions.
            unsafe { bpf_redirect(out, 0) as u32 }
        }
    }
}

impl Hook6 for TcContext {
    #[inline(always)]
    fn rewrite6(&self, p: &Packet6, e: &CtEntry6) -> Result<(), WriteFailed> {
        let (check_off, mangled) = if p.proto == proto::TCP {
            (L4_OFF + offset_of!(TcpHdr, check), 0)
        } else {
            // A UDP checksum of 0 stays 0; a computed 0 is sent as 0xffff.
            (
                L4_OFF + offset_of!(UdpHdr, check),
                BPF_F_MARK_MANGLED_0 as u64,
            )
        };
        let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled;
        let w = |r: Result<(), i64>| r.map_err(|_| WriteFailed);
        let mut i = 0;
        while i < 4 {
            w(self.l4_csum_replace(
                check_off,
                p.saddr[i] as u64,
                e.nat_saddr_be[i] as u64,
                pseudo | 4,
            ))?;
            w(self.l4_csum_replace(
                check_off,
                p.daddr[i] as u64,
                e.nat_daddr_be[i] as u64,
                pseudo | 4,
            ))?;
            i += 1;
        }
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
        w(self.store(IP_SRC_OFF, &bytes(&e.nat_saddr_be), 0))?;
        w(self.store(IP_DST_OFF, &bytes(&e.nat_daddr_be), 0))?;
        // Source and destination ports: the first four bytes of TCP and UDP headers alike.
        w(self.store(L4_OFF, &e.nat_sport_be, 0))?;
        w(self.store(L4_OFF + 2, &e.nat_dport_be, 0))?;
        Ok(())
    }

    #[inline(always)]
    fn forward6(&self, to_local_backend: bool, _slot: NhSlot) -> u32 {
        if !to_local_backend {
            if let Ok(v) = tc_forward6(self) {
                return v;
            }
        }
        maps::count(counter::XDP_TRANSLATED_PASS, 0);
        TC_ACT_OK as u32
    }
}

/// tc: the FIB names the device towards the (translated) destination; the packet goes out
/// there with its hop limit decremented, and `bpf_redirect_neigh` fills in the next hop's
/// address. `Err`: the stack routes it.
#[inline(always)]
fn tc_forward6(ctx: &TcContext) -> Result<u32, ()> {
    // The header in place (checked again: the rewrite's helpers invalidated every packet
    // pointer), not a copy on the stack.
    let ip = ptr_at::<Ipv6Hdr, TcContext>(ctx, IP_OFF).ok_or(())?;
    // SAFETY: bounds checked just above.
    let hop = unsafe { (*ip).hop_limit };
    if hop <= 1 {
        return Err(()); // the stack answers with Time Exceeded
    }
    // SAFETY: the context's socket buffer, valid for the program's run.
    let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let (fib, rc) = fib_lookup6(ctx, ip, ingress).ok_or(())?;
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Err(());
    }
    ctx.store(IP_HOP_OFF, &(hop - 1), 0).map_err(|_| ())?;
    maps::count(counter::XDP_REDIRECT, 0);
    // SAFETY: helper without preconditions; no next-hop parameters (the kernel looks it up).
    Ok(unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as u32)
}
