//! The clock of every timestamp in the maps (conntrack last-seen, affinity last-used).
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;

/// Seconds of CLOCK_MONOTONIC_COARSE. The coarse clock costs a fraction of the precise one,
/// which matters on the per-packet path; a tick's precision is plenty for seconds. Userspace
/// (the garbage collector, lbctl) compares ages against the same clock.
#[inline(always)]
pub fn now_s() -> u32 {
    // SAFETY: helper without preconditions.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}
