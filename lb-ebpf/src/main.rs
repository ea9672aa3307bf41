//! Kernel programs of the load balancer. Entry points are thin: each calls a `try_*` function
//! and maps its error to an explicit action (see shared/DESIGN.md, style rule 4).
//!
//! XDP path, one module per stage: parse → conntrack (ct) → frontend lookup → backend selection
//! (select, with affinity) → SNAT port (snat) → NAT with checksums (nat) → forward, and ICMP
//! errors about translated flows (icmp); xdp.rs runs the stages, verdict.rs says how a packet
//! it does not translate ends. The socket-level path (sock.rs) shares frontend lookup and
//! backend selection. tc egress: tc.rs. Every map and counter: maps.rs.
#![no_std]
#![no_main]

mod affinity;
mod bench;
mod clock;
mod csum;
mod ct;
mod forward;
mod frag;
mod frontend;
mod icmp;
mod maps;
mod nat;
mod parse;
mod select;
mod snat;
mod sock;
mod tc;
mod verdict;
mod xdp;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::counter;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    match sock::try_connect4(&ctx) {
        Ok(()) => sock::ALLOW,
        Err(refusal) => sock::refuse(&ctx, refusal),
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    match sock::try_sendmsg4(&ctx) {
        Ok(()) => sock::ALLOW,
        Err(refusal) => sock::refuse(&ctx, refusal),
    }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    // recvmsg4 may only return 1.
    sock::recvmsg4(&ctx);
    sock::ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    // getpeername4 may only return 1.
    sock::getpeername4(&ctx);
    sock::ALLOW
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let verdict = match xdp::try_xdp(&ctx) {
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
