//! Pinned state as an agent of an older layout version left it, for upgrade tests: maps created
//! with the raw `bpf(2)` system call (no object file of the old version is needed) and pinned.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
/// `BPF_MAP_TYPE_LRU_HASH`.
pub const LRU_HASH: u32 = 9;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zeroed, large enough `union bpf_attr` for the commands used here.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Creates a map (`name` at most 15 bytes) and pins it at `path`; the returned fd keeps it alive
/// until the pin does.
pub fn create_pinned(
    path: &Path,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let owned = lb_userspace::dataplane::bpf_sys::create_map(
        map_type,
        key_size,
        value_size,
        max_entries,
        name,
    )?;
    let fd = owned.as_raw_fd();
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(owned)
}
