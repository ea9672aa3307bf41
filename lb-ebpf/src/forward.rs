//! Forward stage of the north-south path under XDP (tc forwards in hook.rs): where a translated
//! packet goes. Local backends are reached through the stack; otherwise a FIB lookup names the
//! device and next hop: XDP_TX when it is the receiving device, a redirect when it is another
//! device running the XDP program; the stack when the route is unknown, leaves by another
//! interface (a bridge towards pods, a tc device) or the TTL runs out.
//!
//! A confirmed flow keeps the FIB's answer in its conntrack value (`CtValue::nh`) and reuses it
//! instead of a lookup per packet while it is fresh (`NextHop::stale` is 0: the same route
//! generation, which the agent moves on whenever a route, address, link or neighbour changes;
//! the same receiving device; a packet no longer than one the route's MTU was checked for; and
//! younger than `limits::NEXT_HOP_REVALIDATE_S`). Only answers this stage acts on are cached:
//! the stack's cases are looked up every time.
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{counter, NextHop};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{csum, flow::NhSlot, maps, parse::Ipv4};

const AF_INET: u8 = 2;

/// Sends a translated packet on and counts how (`XDP_TRANSLATED_PASS`, `XDP_TX`,
/// `XDP_REDIRECT`); returns the verdict. With a slot, its cached next hop is used when fresh,
/// and a new answer is kept in it.
///
/// (The XDP program is close to the verifier's budget of instructions it explores: every
/// branch here multiplies the paths after it, so the cache check is one branch.)
#[inline(always)]
pub fn forward(ctx: &XdpContext, l3: &Ipv4, to_local_backend: bool, slot: NhSlot) -> u32 {
    if to_local_backend {
        maps::count(counter::XDP_TRANSLATED_PASS, 0);
        return xdp_action::XDP_PASS;
    }
    let (eth, ip) = (l3.eth, l3.ip);
    // SAFETY: `ip` was bounds checked by the parse stage.
    let (ttl, tot_len) = unsafe { ((*ip).ttl, (*ip).tot_len()) };
    if ttl <= 1 {
        maps::count(counter::XDP_TRANSLATED_PASS, 0);
        return xdp_action::XDP_PASS; // let the stack answer with Time Exceeded
    }
    // SAFETY: XDP context, 64-byte ingress_ifindex read.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let gen = maps::route_gen();
    let cached = !slot.nh.is_null();
    let (out, dmac, smac) = match &slot {
        // SAFETY: the slot points into a conntrack value, valid for the program's run; read in
        // place.
        s if cached && unsafe { (*s.nh).stale(gen, ingress, tot_len, s.now) } == 0 => unsafe {
            ((*s.nh).out_ifindex, (*s.nh).dmac, (*s.nh).smac)
        },
        _ => match lookup(ctx, ip, ingress, tot_len) {
            Some(fib) => {
                if cached {
                    let s = &slot;
                    // Kept for this flow's next packets. A packet looked up again only for its
                    // size (the rest was fresh) is longer than the old `fits`: `fits` only
                    // grows until the answer goes stale.
                    // SAFETY: as above.
                    unsafe {
                        *s.nh = NextHop {
                            gen,
                            in_ifindex: ingress,
                            out_ifindex: fib.ifindex,
                            checked_s: s.now,
                            fits: tot_len,
                            dmac: fib.dmac,
                            smac: fib.smac,
                            _pad: [0; 2],
                        }
                    };
                }
                (fib.ifindex, fib.dmac, fib.smac)
            }
            None => {
                maps::count(counter::XDP_TRANSLATED_PASS, 0);
                return xdp_action::XDP_PASS;
            }
        },
    };
    send(eth, ip, ttl, ingress, out, dmac, smac)
}

/// The FIB's answer for a translated packet, when this stage can act on it: a route out of the
/// receiving device or of another device running the XDP program (a bridge never does; a veth
/// whose peer runs none drops a redirected frame), with the next hop's address known. `None`:
/// the stack forwards it.
#[inline(always)]
fn lookup(ctx: &XdpContext, ip: *mut Ipv4Hdr, ingress: u32, tot_len: u16) -> Option<FibParams> {
    // SAFETY: zeroed plain-data struct.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    // SAFETY: `ip` was bounds checked by the parse stage; the union fields written are the
    // IPv4 members.
    unsafe {
        fib.family = AF_INET;
        fib.__bindgen_anon_1.tot_len = tot_len;
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
        fib.l4_protocol = (*ip).proto;
    }
    fib.ifindex = ingress;
    // SAFETY: valid context and params.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    let deliverable =
        fib.ifindex == ingress || maps::config().is_some_and(|c| c.xdp_device(fib.ifindex));
    (rc == BPF_FIB_LKUP_RET_SUCCESS as i64 && deliverable).then_some(fib)
}

/// Writes the next hop's addresses and the decremented TTL, and sends the frame out of `out`.
#[inline(always)]
fn send(
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    ttl: u8,
    ingress: u32,
    out: u32,
    dmac: [u8; 6],
    smac: [u8; 6],
) -> u32 {
    // SAFETY: `eth` and `ip` were bounds checked by the parse stage.
    unsafe {
        // TTL and protocol share one 16-bit word of the header checksum.
        let proto = (*ip).proto;
        let old = u16::from_ne_bytes([ttl, proto]);
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        (*ip).ttl = ttl - 1;
        (*ip).check = csum::replace2(u16::from_ne_bytes((*ip).check), old, new).to_ne_bytes();
        (*eth).dst_addr = dmac;
        (*eth).src_addr = smac;
    }
    if out == ingress {
        maps::count(counter::XDP_TX, 0);
        xdp_action::XDP_TX
    } else {
        maps::count(counter::XDP_REDIRECT, 0);
        // SAFETY: helper without preconditions.
        unsafe { bpf_redirect(out, 0) as u32 }
    }
}
