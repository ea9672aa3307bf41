//! Loads and stores of packet memory at any alignment, one BPF instruction each.
//!
//! Packet data has no alignment Rust could rely on (the headers sit wherever the frame starts,
//! and `adjust_head` moves it), so a plain multi-byte read or write of a header field is split
//! into single bytes, and a 16-byte copy becomes a call to a byte-by-byte `memmove`. The kernel
//! itself allows a word load or store at any address of packet memory: the verifier checks
//! packet alignment only under `BPF_F_STRICT_ALIGNMENT` (which the agent never sets) or on
//! architectures without efficient unaligned access (the DaemonSet's x86-64 and arm64 nodes
//! have it). These functions emit that one instruction through inline assembly, which makes no
//! alignment claim to the compiler. They are for packet pointers only: the verifier checks
//! stack and map accesses for alignment whatever the architecture.
//!
//! Used where the IPv6 path moves 128-bit addresses and where a forwarded frame gets its
//! cached MAC addresses (`cargo xtask bench`: `established_ipv6`).

/// One 32-bit load; the value is the four bytes in memory order, as `read_unaligned::<u32>`
/// would give them.
///
/// # Safety
/// `p..p + 4` lies inside a bounds-checked part of the packet.
#[inline(always)]
pub unsafe fn load32(p: *const u8) -> u32 {
    let v: u64;
    // SAFETY: the caller's; the instruction only reads those four bytes.
    unsafe {
        core::arch::asm!(
            "{v} = *(u32 *)({p} + 0)",
            v = out(reg) v,
            p = in(reg) p,
            options(nostack, readonly, preserves_flags)
        );
    }
    v as u32
}

/// One 32-bit store of `v` in memory order (see [`load32`]).
///
/// # Safety
/// `p..p + 4` lies inside a bounds-checked, writable part of the packet.
#[inline(always)]
pub unsafe fn store32(p: *mut u8, v: u32) {
    // SAFETY: the caller's; the instruction only writes those four bytes.
    unsafe {
        core::arch::asm!(
            "*(u32 *)({p} + 0) = {v}",
            p = in(reg) p,
            v = in(reg) v as u64,
            options(nostack, preserves_flags)
        );
    }
}

/// One 16-bit store of `v` in memory order (see [`load32`]).
///
/// # Safety
/// `p..p + 2` lies inside a bounds-checked, writable part of the packet.
#[inline(always)]
pub unsafe fn store16(p: *mut u8, v: u16) {
    // SAFETY: the caller's; the instruction only writes those two bytes.
    unsafe {
        core::arch::asm!(
            "*(u16 *)({p} + 0) = {v}",
            p = in(reg) p,
            v = in(reg) v as u64,
            options(nostack, preserves_flags)
        );
    }
}
