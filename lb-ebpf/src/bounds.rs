//! The packet as the north-south path's program holds it: where its directly readable bytes
//! are, its length, and the verdicts that pass or drop it, for XDP and for tc. The parse stage and
//! the verdicts need only this; hook.rs adds what else differs between the two programs.
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    programs::{TcContext, XdpContext},
    EbpfContext,
};

/// A program context's packet bounds and verdicts.
pub trait Bounds: EbpfContext {
    /// The verdict that hands the packet to the stack untouched.
    const PASS: u32;
    /// The verdict that drops the packet.
    const DROP: u32;
    /// Start and end of the directly readable part of the packet (all of it for XDP; the
    /// pulled linear part for tc).
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// The frame's length, for the byte counters.
    fn frame_len(&self) -> u64;
}

impl Bounds for XdpContext {
    const PASS: u32 = xdp_action::XDP_PASS;
    const DROP: u32 = xdp_action::XDP_DROP;

    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn frame_len(&self) -> u64 {
        (self.data_end() - self.data()) as u64
    }
}

impl Bounds for TcContext {
    const PASS: u32 = TC_ACT_OK as u32;
    const DROP: u32 = TC_ACT_SHOT as u32;

    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn frame_len(&self) -> u64 {
        self.len() as u64
    }
}
