//! Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
//! Values are taken as they sit in memory (network order); ones-complement sums do not depend on
//! byte order as long as every operand is read the same way.

#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let mut s = (!check) as u32 + (!old) as u32 + new as u32;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let c = replace2(check, old as u16, new as u16);
    replace2(c, (old >> 16) as u16, (new >> 16) as u16)
}

/// `check` after a 128-bit value (an IPv6 address, as the maps hold it) changed from `old` to
/// `new`.
#[inline(always)]
pub fn replace16(check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    Update::of(check).words(old, new).check()
}

/// Several changes of one checksum at once: RFC 1624's `~HC + ~m + m'` for every changed
/// field, summed in 64 bits and folded once at the end. The same result as a chain of
/// [`replace2`]/[`replace4`] calls (ones-complement sums fold as 32-bit words too: 2^32 and 1
/// are the same modulo 0xffff), but the adds are independent instead of each waiting for the
/// previous fold: the IPv6 rewrite changes eighteen 16-bit words of its pseudo-header and
/// ports.
#[derive(Clone, Copy)]
pub struct Update(u64);

impl Update {
    /// Starts from the checksum as it sits in the packet.
    #[inline(always)]
    pub fn of(check: u16) -> Self {
        Update((!check) as u64)
    }

    /// A 128-bit value changed from `old` to `new` (at most eight of these and four
    /// [`Update::half`] fit the 64-bit sum with room to spare).
    #[inline(always)]
    pub fn words(self, old: &[u32; 4], new: &[u32; 4]) -> Self {
        // The four `!old[i]` are `4 * 0xffff_ffff` less the four `old[i]`: no complement (and
        // no masking back to 32 bits) per word.
        let o = old[0] as u64 + old[1] as u64 + old[2] as u64 + old[3] as u64;
        let n = new[0] as u64 + new[1] as u64 + new[2] as u64 + new[3] as u64;
        Update(self.0 + (4 * 0xffff_ffff - o) + n)
    }

    /// A 16-bit field changed from `old` to `new`.
    #[inline(always)]
    pub fn half(self, old: u16, new: u16) -> Self {
        Update(self.0 + (!old) as u64 + new as u64)
    }

    /// The new checksum.
    #[inline(always)]
    pub fn check(self) -> u16 {
        let mut s = (self.0 & 0xffff_ffff) + (self.0 >> 32);
        s = (s & 0xffff_ffff) + (s >> 32);
        // At most 2^32 - 1 now; two folds leave at most 0xffff.
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }
}
