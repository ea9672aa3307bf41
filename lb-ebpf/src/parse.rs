//! The one bounds-checked header access of the kernel side.
use aya_ebpf::programs::XdpContext;

/// A pointer to a `T` at `offset` bytes into the packet, or `None` when the packet is too short.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}
