//! Kernel programs of the load balancer. Entry points are thin: each calls a `try_*` function
//! and maps its error to an explicit action (see shared/DESIGN.md, style rule 4).
//!
//! North-south path, one module per stage: parse → conntrack (ct) → frontend lookup → backend
//! selection (select, with affinity) → SNAT port (snat) → NAT with checksums (nat) → forward,
//! and ICMP errors about translated flows (icmp); north_south.rs runs the stages, verdict.rs
//! says how a packet it does not translate ends. It runs as XDP (`lb_xdp`) or, where XDP
//! cannot deliver, as tc ingress (`lb_tc_ingress`); bounds.rs and hook.rs hold what differs. The
//! socket-level path (sock.rs: AF_INET, IPv4-mapped IPv6 and IPv6 socket addresses) shares frontend
//! lookup and backend selection. tc egress: tc.rs.
//! Every map and counter: maps.rs.
#![no_std]
#![no_main]
// BPF inline assembly: word loads and stores of packet data at any alignment (pktmem.rs).
#![feature(asm_experimental_arch)]

mod affinity;
mod bench;
mod bounds;
mod clock;
mod csum;
mod ct;
mod flow;
mod forward;
mod frag;
mod frontend;
mod hook;
mod hook6;
mod icmp;
mod icmp6;
mod maps;
mod nat;
mod north_south;
mod north_south6;
mod parse;
mod parse6;
mod pktmem;
mod reject;
mod select;
mod snat;
mod sock;
mod tc;
mod verdict;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::counter;
use sock::{Family, Mapped6, V4, V6};

// Socket-level programs: the `*4` ones for AF_INET addresses, the `*6` ones for IPv4-mapped
// IPv6 addresses (`::ffff:a.b.c.d`) and IPv6 ones, one code path for all three (sock.rs, which says which hook the
// kernel runs where).
#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    connect::<V4>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    if sock::is_mapped(&ctx) {
        connect::<Mapped6>(&ctx)
    } else {
        connect::<V6>(&ctx)
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg::<V4>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    if sock::is_mapped(&ctx) {
        sendmsg::<Mapped6>(&ctx)
    } else {
        sendmsg::<V6>(&ctx)
    }
}

// recvmsg and getpeername programs may only return 1.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::recvmsg::<V4>(&ctx);
    sock::ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    if sock::is_mapped(&ctx) {
        sock::recvmsg::<Mapped6>(&ctx);
    } else {
        sock::recvmsg::<V6>(&ctx);
    }
    sock::ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::getpeername::<V4>(&ctx);
    sock::ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    if sock::is_mapped(&ctx) {
        sock::getpeername::<Mapped6>(&ctx);
    } else {
        sock::getpeername::<V6>(&ctx);
    }
    sock::ALLOW
}

#[inline(always)]
fn connect<F: Family>(ctx: &SockAddrContext) -> i32 {
    match sock::try_connect::<F>(ctx) {
        Ok(()) => sock::ALLOW,
        Err(refusal) => sock::refuse(ctx, refusal),
    }
}

#[inline(always)]
fn sendmsg<F: Family>(ctx: &SockAddrContext) -> i32 {
    match sock::try_sendmsg::<F>(ctx) {
        Ok(()) => sock::ALLOW,
        Err(refusal) => sock::refuse(ctx, refusal),
    }
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    if is_ipv6(&ctx) {
        // SAFETY: a tail call does not return when it succeeds; with the slot empty (no agent
        // filled it yet) the frame goes on here and is passed as not IPv4.
        unsafe { maps::XDP6_PROG.tail_call(&ctx, 0) };
    }
    let verdict = match north_south::run(&ctx) {
        Ok(verdict) => verdict,
        Err(stop) => stop.act(&ctx),
    };
    match verdict {
        xdp_action::XDP_DROP => maps::count(counter::XDP_VERDICT_DROP, 0),
        xdp_action::XDP_PASS => maps::count(counter::XDP_VERDICT_PASS, 0),
        _ => {} // XDP_TX and redirects are counted where they are decided
    }
    verdict
}

/// Returns XDP_PASS and nothing else: the cost floor the benchmarks compare against, and the
/// program a veth needs on the receiving end before it accepts XDP_TX/XDP_REDIRECT frames
/// (used on the lab's fabric ports).
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark only: restore the frame, then the XDP path (see bench.rs).
#[xdp]
pub fn lb_bench_xdp(ctx: XdpContext) -> u32 {
    bench::bench_xdp(&ctx)
}

/// Benchmark only: restore the frame, then XDP_PASS.
#[xdp]
pub fn lb_bench_restore(ctx: XdpContext) -> u32 {
    bench::bench_restore(&ctx)
}

/// The north-south path on devices where XDP cannot deliver (see hook.rs): the same stages as
/// `lb_xdp`, attached to tc (TCX) ingress.
#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    // Direct reads and in-place writes need the headers in the linear, writable part of the
    // socket buffer: pull the most any stage reads (an ICMP error quotes a header with options).
    let want = ctx.len().min(tc::INGRESS_PULL);
    if ctx.pull_data(want).is_err() {
        maps::count(lb_common::counter::TC_ERROR, ctx.len() as u64);
        return TC_ACT_OK;
    }
    if is_ipv6(&ctx) {
        // SAFETY: as in `lb_xdp`.
        unsafe { maps::TC6_PROG.tail_call(&ctx, 0) };
    }
    let verdict = match north_south::run(&ctx) {
        Ok(verdict) => verdict,
        Err(stop) => stop.act(&ctx),
    };
    tc_verdict(verdict)
}

/// The IPv6 north-south path at XDP (north_south6.rs), tail-called by `lb_xdp` for IPv6
/// frames.
#[xdp]
pub fn lb_xdp6(ctx: XdpContext) -> u32 {
    let verdict = north_south6::run(&ctx);
    match verdict {
        xdp_action::XDP_DROP => maps::count(counter::XDP_VERDICT_DROP, 0),
        xdp_action::XDP_PASS => maps::count(counter::XDP_VERDICT_PASS, 0),
        _ => {}
    }
    verdict
}

/// The IPv6 north-south path at tc ingress, tail-called by `lb_tc_ingress` for IPv6 frames
/// (which already pulled the headers in).
#[classifier]
pub fn lb_tc_ingress6(ctx: TcContext) -> i32 {
    let want = ctx.len().min(tc::INGRESS_PULL);
    if ctx.pull_data(want).is_err() {
        maps::count(lb_common::counter::TC_ERROR, ctx.len() as u64);
        return TC_ACT_OK;
    }
    tc_verdict(north_south6::run(&ctx))
}

/// tc egress for IPv6 frames, tail-called by `lb_tc_egress` (tc.rs).
#[classifier]
pub fn lb_tc_egress6(ctx: TcContext) -> i32 {
    match tc::try_egress6(&ctx) {
        Ok(action) => action,
        Err(_) => {
            maps::count(lb_common::counter::TC_ERROR, ctx.len() as u64);
            TC_ACT_OK
        }
    }
}

/// Whether a frame is IPv6 (for the tail call to the IPv6 path).
#[inline(always)]
fn is_ipv6<B: bounds::Bounds>(ctx: &B) -> bool {
    match parse::ptr_at::<network_types::eth::EthHdr, B>(ctx, 0) {
        // SAFETY: bounds checked by ptr_at.
        Some(eth) => unsafe { (*eth).ether_type == network_types::eth::EtherType::Ipv6 as u16 },
        None => false,
    }
}

/// Counts a tc north-south verdict as `lb_xdp` counts its own.
#[inline(always)]
fn tc_verdict(verdict: u32) -> i32 {
    match verdict {
        v if v == TC_ACT_SHOT as u32 => maps::count(counter::XDP_VERDICT_DROP, 0),
        v if v == TC_ACT_OK as u32 => maps::count(counter::XDP_VERDICT_PASS, 0),
        _ => {} // redirects are counted where they are decided
    }
    verdict as i32
}

#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    match tc::try_egress(&ctx) {
        Ok(action) => action,
        // A frame shorter than the headers it claims, or a rewrite the kernel refused: it
        // leaves as it is, counted.
        Err(_) => {
            maps::count(lb_common::counter::TC_ERROR, ctx.len() as u64);
            TC_ACT_OK
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
