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
pub fn replace16(mut check: u16, old: &[u32; 4], new: &[u32; 4]) -> u16 {
    let mut i = 0;
    while i < 4 {
        check = replace4(check, old[i], new[i]);
        i += 1;
    }
    check
}
