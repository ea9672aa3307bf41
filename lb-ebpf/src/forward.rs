//! Forward stage of the north-south path under XDP (tc forwards in hook.rs): where a translated packet goes. Local backends are reached
//! through the stack; otherwise a FIB lookup names the device and next hop: XDP_TX when it is
//! the receiving device, a redirect when it is another device running the XDP program; the
//! stack when the route is unknown, leaves by another interface (a bridge towards pods, a tc
//! device) or the TTL runs out.
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::counter;

use crate::{csum, maps, parse::Ipv4};

const AF_INET: u8 = 2;

/// Sends a translated packet on and counts how (`XDP_TRANSLATED_PASS`, `XDP_TX`,
/// `XDP_REDIRECT`); returns the verdict.
#[inline(always)]
pub fn forward(ctx: &XdpContext, l3: &Ipv4, to_local_backend: bool) -> u32 {
    if to_local_backend {
        maps::count(counter::XDP_TRANSLATED_PASS, 0);
        return xdp_action::XDP_PASS;
    }
    let (eth, ip) = (l3.eth, l3.ip);
    // SAFETY: zeroed plain-data struct.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    // SAFETY: `ip` was bounds checked by the parse stage; the union fields written are the
    // IPv4 members.
    let ttl = unsafe {
        fib.family = AF_INET;
        fib.__bindgen_anon_1.tot_len = (*ip).tot_len();
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
        fib.l4_protocol = (*ip).proto;
        (*ip).ttl
    };
    if ttl <= 1 {
        maps::count(counter::XDP_TRANSLATED_PASS, 0);
        return xdp_action::XDP_PASS; // let the stack answer with Time Exceeded
    }
    // SAFETY: XDP context, 64-byte ingress_ifindex read.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
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
    // Another device takes a redirected frame only when it runs an XDP program of ours (a
    // bridge never does; a veth whose peer runs none drops it): otherwise the stack forwards.
    let deliverable =
        fib.ifindex == ingress || maps::config().is_some_and(|c| c.xdp_device(fib.ifindex));
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 || !deliverable {
        maps::count(counter::XDP_TRANSLATED_PASS, 0);
        return xdp_action::XDP_PASS;
    }
    // SAFETY: `eth` and `ip` were bounds checked by the parse stage.
    unsafe {
        // TTL and protocol share one 16-bit word of the header checksum.
        let proto = (*ip).proto;
        let old = u16::from_ne_bytes([ttl, proto]);
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        (*ip).ttl = ttl - 1;
        (*ip).check = csum::replace2(u16::from_ne_bytes((*ip).check), old, new).to_ne_bytes();
        (*eth).dst_addr = fib.dmac;
        (*eth).src_addr = fib.smac;
    }
    if fib.ifindex == ingress {
        maps::count(counter::XDP_TX, 0);
        xdp_action::XDP_TX
    } else {
        maps::count(counter::XDP_REDIRECT, 0);
        // SAFETY: helper without preconditions.
        unsafe { bpf_redirect(fib.ifindex, 0) as u32 }
    }
}
