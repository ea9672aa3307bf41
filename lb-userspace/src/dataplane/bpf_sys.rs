//! The few `bpf(2)` commands aya 0.14 does not offer: batched lookups (`BPF_MAP_LOOKUP_BATCH`,
//! one syscall for thousands of entries instead of two per entry with `get_next_key` + `lookup`)
//! and creating a standalone LRU hash map (for tests and benchmarks). Plain element lookups and
//! deletes go through here too, so that the conntrack sweep works on a raw map fd. Socket
//! iterator programs are loaded, linked and run here as well: their one kernel-function call
//! (`bpf_sock_destroy`) is something aya 0.14 cannot relocate (see `sock_term`).
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
/// `BPF_PROG_TYPE_TRACING`.
const PROG_TYPE_TRACING: u32 = 26;
/// `BPF_TRACE_ITER`: the attach type of iterator programs.
const TRACE_ITER: u32 = 28;
/// `BPF_MAP_TYPE_LRU_HASH`.
pub const MAP_TYPE_LRU_HASH: u32 = 9;
/// `BPF_MAP_TYPE_HASH`.
pub const MAP_TYPE_HASH: u32 = 1;

/// `union bpf_attr`, as bytes (large enough for every command used here), 8-byte aligned.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32_at(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn read_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable bpf_attr of its full size; every pointer in it points
    // into buffers the caller keeps alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Creates a map of `map_type` (not pinned: it lives as long as the returned fd).
pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32_at(0, map_type)
        .u32_at(4, key_size)
        .u32_at(8, value_size)
        .u32_at(12, max_entries);
    // map_name at offset 28 (after map_flags, inner_map_fd, numa_node): 15 bytes and a NUL.
    let n = name.len().min(15);
    a.0[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    let fd = bpf(BPF_MAP_CREATE, &mut a)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the object `fd` (a map, program or link) at `path` on a bpf filesystem.
pub fn pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::other("a path with a NUL byte"))?;
    let mut a = Attr::new();
    a.u64_at(0, c.as_ptr() as u64)
        .u32_at(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut a).map(|_| ())
}

/// A duplicate of the fd of the hash map `name` of a loaded object (the object keeps its own).
pub fn object_map_fd(ebpf: &aya::Ebpf, name: &str) -> io::Result<OwnedFd> {
    let m = ebpf
        .map(name)
        .ok_or_else(|| io::Error::other(format!("map {name} missing from the object")))?;
    match m {
        aya::maps::Map::LruHashMap(d) | aya::maps::Map::HashMap(d) => {
            d.fd().as_fd().try_clone_to_owned()
        }
        _ => Err(io::Error::other(format!("map {name} is not a hash map"))),
    }
}

/// Looks `key` up; `None` when the map has no such entry.
pub fn lookup<K: aya::Pod, V: aya::Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut v = std::mem::MaybeUninit::<V>::uninit();
    let mut a = Attr::new();
    a.u32_at(0, fd.as_raw_fd() as u32)
        .u64_at(8, key as *const K as u64)
        .u64_at(16, v.as_mut_ptr() as u64);
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut a) {
        // SAFETY: the kernel wrote value_size bytes (== size_of::<V>, checked by the caller's
        // map type), and V is plain data.
        Ok(_) => Ok(Some(unsafe { v.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `key` -> `value` (`flags`: 0 any, 1 only new, 2 only existing).
pub fn update<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32_at(0, fd.as_raw_fd() as u32)
        .u64_at(8, key as *const K as u64)
        .u64_at(16, value as *const V as u64)
        .u64_at(24, flags);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
}

/// Deletes `key`; `false` when there was no such entry.
pub fn delete<K: aya::Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<bool> {
    let mut a = Attr::new();
    a.u32_at(0, fd.as_raw_fd() as u32)
        .u64_at(8, key as *const K as u64);
    match bpf(BPF_MAP_DELETE_ELEM, &mut a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Entries fetched per `BPF_MAP_LOOKUP_BATCH` call (more than any hash bucket holds, so the
/// kernel never answers ENOSPC).
pub const BATCH: usize = 8192;

/// Walks every entry of a hash map with `BPF_MAP_LOOKUP_BATCH`, handing each batch to `f`.
/// Returns the number of entries seen. Entries inserted or removed during the walk may or may
/// not be seen (as with any hash map walk); none is seen twice.
pub fn for_each_batch<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    mut f: impl FnMut(&[K], &[V]),
) -> io::Result<u64> {
    // SAFETY: Pod types are plain data, valid for any bit pattern (all zeroes included).
    let (zk, zv): (K, V) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let mut keys = vec![zk; BATCH];
    let mut values = vec![zv; BATCH];
    // The hash maps' batch token is a bucket index (u32); 8 bytes leave room.
    let mut in_batch = [0u8; 8];
    let mut out_batch = [0u8; 8];
    let mut first = true;
    let mut total = 0u64;
    loop {
        let mut a = Attr::new();
        a.u64_at(0, if first { 0 } else { in_batch.as_ptr() as u64 })
            .u64_at(8, out_batch.as_mut_ptr() as u64)
            .u64_at(16, keys.as_mut_ptr() as u64)
            .u64_at(24, values.as_mut_ptr() as u64)
            .u32_at(32, BATCH as u32)
            .u32_at(36, fd.as_raw_fd() as u32);
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut a);
        let n = a.read_u32(32) as usize;
        match r {
            Ok(_) => {}
            // The end of the map (the last entries, if any, came with it).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                f(&keys[..n], &values[..n]);
                return Ok(total + n as u64);
            }
            Err(e) => return Err(e),
        }
        f(&keys[..n], &values[..n]);
        total += n as u64;
        in_batch = out_batch;
        first = false;
    }
}

/// Deletes `keys` with `BPF_MAP_DELETE_BATCH` (one syscall per [`BATCH`] keys). A key the map
/// no longer has (the datapath removed it meanwhile) is skipped. Returns the number deleted.
pub fn delete_batch<K: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<u64> {
    let mut deleted = 0u64;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(BATCH)];
        let mut a = Attr::new();
        a.u64_at(16, chunk.as_ptr() as u64)
            .u32_at(32, chunk.len() as u32)
            .u32_at(36, fd.as_raw_fd() as u32);
        let r = bpf(BPF_MAP_DELETE_BATCH, &mut a);
        // The kernel deletes in order and stops at the first key it cannot delete; `count`
        // says how many it did.
        let n = (a.read_u32(32) as usize).min(chunk.len());
        deleted += n as u64;
        match r {
            Ok(_) => rest = &rest[chunk.len()..],
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[n + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// Loads a BPF iterator program (`BPF_PROG_TYPE_TRACING`, attached as `BPF_TRACE_ITER`) from
/// raw instructions. `attach_btf_id` is the vmlinux BTF id of the iterator target's
/// `bpf_iter_<target>` function. A refusal carries the verifier's log.
pub fn load_iter_program(insns: &[u64], attach_btf_id: u32, name: &str) -> io::Result<OwnedFd> {
    // Kernel functions may only be called from GPL-compatible programs; lb-ebpf is GPL too.
    let license = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new();
    a.u32_at(0, PROG_TYPE_TRACING)
        .u32_at(4, insns.len() as u32)
        .u64_at(8, insns.as_ptr() as u64)
        .u64_at(16, license.as_ptr() as u64)
        .u32_at(24, 1)
        .u32_at(28, log.len() as u32)
        .u64_at(32, log.as_mut_ptr() as u64)
        .u32_at(68, TRACE_ITER)
        .u32_at(108, attach_btf_id);
    // prog_name at offset 48: 15 bytes and a NUL.
    let n = name.len().min(15);
    a.0[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    match bpf(BPF_PROG_LOAD, &mut a) {
        // SAFETY: the kernel returned a new fd that nothing else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(6).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(io::Error::new(
                e.kind(),
                format!("{e}; verifier: {}", tail.join(" | ")),
            ))
        }
    }
}

/// Links an iterator program (`BPF_LINK_CREATE`, no target parameters).
pub fn link_iter(prog: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32_at(0, prog.as_raw_fd() as u32).u32_at(8, TRACE_ITER);
    let fd = bpf(BPF_LINK_CREATE, &mut a)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs an iterator once over the network namespace of the calling thread: creates an iterator
/// instance (`BPF_ITER_CREATE`, which binds to the thread's namespace) and reads it to its end.
pub fn run_iter(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32_at(0, link.as_raw_fd() as u32);
    let fd = bpf(BPF_ITER_CREATE, &mut a)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: `buf` is writable for its full length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return Ok(()),
            n if n > 0 => continue,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}
