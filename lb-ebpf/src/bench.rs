//! Benchmark-only programs (`cargo xtask bench`); the agent never loads or attaches them.
//!
//! BPF_PROG_TEST_RUN with `repeat` > 1 hands each iteration the packet the previous one wrote.
//! To time a path that rewrites packets, every iteration first restores the original frame from
//! the `lb_bench` map (and, for new flows, gives it a fresh source address and port). `lb_bench_restore`
//! does exactly that work and returns XDP_PASS, so its cost minus the floor's is the restore's
//! own, which the benchmark subtracts.
use core::mem::offset_of;

use aya_ebpf::{bindings::xdp_action, macros::map, maps::Array, programs::XdpContext};
use lb_common::{proto, BenchFrame, BENCH_FRAME_LEN};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{csum, maps, north_south};

#[map(name = "lb_bench")]
pub static BENCH: Array<BenchFrame> = Array::with_max_entries(1, 0);

/// Offsets in the frame: IPv4 checksum, source address and protocol, the L4 header (IPv4
/// without options).
const IP_CHECK: usize = EthHdr::LEN + offset_of!(Ipv4Hdr, check);
const IP_SRC: usize = EthHdr::LEN + offset_of!(Ipv4Hdr, src_addr);
const IP_PROTO: usize = EthHdr::LEN + offset_of!(Ipv4Hdr, proto);
const L4: usize = EthHdr::LEN + Ipv4Hdr::LEN;
/// The lowest source port a varied frame gets (Linux's default ephemeral range starts here).
const EPHEMERAL_BASE: u16 = 32768;

/// Restores the frame; false when the packet is not a benchmark frame.
#[inline(always)]
pub fn restore(ctx: &XdpContext) -> bool {
    let Some(f) = BENCH.get_ptr_mut(0) else {
        return false;
    };
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + BENCH_FRAME_LEN > end {
        return false;
    }
    // SAFETY: the packet holds at least BENCH_FRAME_LEN bytes (checked above); `f` is the map
    // value, valid for the program's run.
    unsafe {
        let dst = start as *mut u64;
        let src = (*f).bytes.as_ptr() as *const u64;
        for i in 0..BENCH_FRAME_LEN / 8 {
            core::ptr::write_unaligned(dst.add(i), core::ptr::read_unaligned(src.add(i)));
        }
        // IPv4 frames only (the offsets are IPv4's).
        if (*f).vary_source != 0 {
            let seq = (*f).seq;
            (*f).seq = seq.wrapping_add(1);
            let p = start as *mut u8;
            let old = core::ptr::read_unaligned(p.add(IP_SRC) as *const u32);
            let new = (u32::from_be(old).wrapping_add(seq & 0x00ff_ffff)).to_be();
            core::ptr::write_unaligned(p.add(IP_SRC) as *mut u32, new);
            let ipc = core::ptr::read_unaligned(p.add(IP_CHECK) as *const u16);
            core::ptr::write_unaligned(p.add(IP_CHECK) as *mut u16, csum::replace4(ipc, old, new));
            let l4c = if *p.add(IP_PROTO) == proto::TCP {
                L4 + offset_of!(TcpHdr, check)
            } else {
                L4 + offset_of!(UdpHdr, check)
            };
            // And a source port as a client's ephemeral port would be: spread over
            // 32768..=49151 (inside the SNAT range the per-packet bench configures,
            // 32768-60999, so the port is kept when free; the agent's default range,
            // 1024-29999, would fold it instead).
            let old_port = core::ptr::read_unaligned(p.add(L4) as *const u16);
            let new_port = (EPHEMERAL_BASE | (seq.wrapping_mul(40503) as u16 & 0x3fff)).to_be();
            core::ptr::write_unaligned(p.add(L4) as *mut u16, new_port);
            let c = core::ptr::read_unaligned(p.add(l4c) as *const u16);
            let c = csum::replace2(csum::replace4(c, old, new), old_port, new_port);
            core::ptr::write_unaligned(p.add(l4c) as *mut u16, c);
        }
    }
    true
}

pub fn bench_xdp(ctx: &XdpContext) -> u32 {
    if !restore(ctx) {
        return xdp_action::XDP_ABORTED;
    }
    if crate::is_ipv6(ctx) {
        // As `lb_xdp` does: IPv6 frames go on in `lb_xdp6`, tail-called, so the IPv6 figure
        // includes the tail call a node pays. The call does not return when it succeeds; an
        // empty slot (the IPv6 path not loaded) aborts, which the benchmark reports.
        // SAFETY: see `lb_xdp`.
        unsafe { maps::XDP6_PROG.tail_call(ctx, 0) };
        return xdp_action::XDP_ABORTED;
    }
    match north_south::run(ctx) {
        Ok(verdict) => verdict,
        Err(stop) => stop.act(ctx),
    }
}

pub fn bench_restore(ctx: &XdpContext) -> u32 {
    if !restore(ctx) {
        return xdp_action::XDP_ABORTED;
    }
    xdp_action::XDP_PASS
}
