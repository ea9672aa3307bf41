//! A do-nothing XDP program (`return XDP_PASS`) attached to a device through a BPF link, loaded
//! with raw `bpf()` syscalls so the lab needs no BPF toolchain and no object file.
//!
//! Why the lab needs it: XDP_TX (and XDP_REDIRECT) out of a veth queue `xdp_frame`s on the peer's
//! receive ring, and the kernel only schedules the peer's NAPI to drain that ring when the peer
//! itself has an XDP program (veth_xdp_flush() checks the peer's `xdp_prog`). A peer that merely
//! has GRO on (NAPI enabled) accepts the frames but leaves them in the ring until unrelated
//! traffic happens to kick its NAPI, so a node's XDP_TX would look like a silent drop.
use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    thread,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::NETNS_RUN_DIR;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_PASS: i32 = 2;

#[repr(C)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high nibble.
    regs: u8,
    off: i16,
    imm: i32,
}

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-extends the rest.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The leading fields of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialized repr(C) prefix of `union bpf_attr` of the given size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn load_pass_program() -> Result<OwnedFd> {
    // r0 = XDP_PASS; exit
    let insns = [
        Insn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: XDP_PASS,
        },
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"lab_xdp_pass");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    bpf(BPF_PROG_LOAD, &mut attr).context("loading an XDP_PASS program (bpf BPF_PROG_LOAD)")
}

/// Attaches an XDP_PASS program to `dev` in network namespace `ns`. The program stays attached
/// while the returned link descriptor is open (or until the device goes away).
pub fn attach_pass(ns: &str, dev: &str) -> Result<OwnedFd> {
    let ns_path = Path::new(NETNS_RUN_DIR).join(ns);
    let dev_c = CString::new(dev).context("device name")?;
    // setns(CLONE_NEWNET) changes only the calling thread, so do the namespace-relative part
    // (the ifindex lookup and the attach) on a short-lived thread of its own.
    thread::scope(|s| {
        s.spawn(|| -> Result<OwnedFd> {
            let nsf =
                File::open(&ns_path).with_context(|| format!("opening {}", ns_path.display()))?;
            // SAFETY: setns on a valid namespace fd; affects this thread only.
            if unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns into {ns}: {}", io::Error::last_os_error());
            }
            // SAFETY: NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(dev_c.as_ptr()) };
            if ifindex == 0 {
                bail!("no device {dev} in {ns}: {}", io::Error::last_os_error());
            }
            let prog = load_pass_program()?;
            let mut attr = LinkCreateAttr {
                prog_fd: prog.as_raw_fd() as u32,
                target_ifindex: ifindex,
                attach_type: BPF_XDP,
                flags: 0,
            };
            // The link keeps its own reference to the program.
            bpf(BPF_LINK_CREATE, &mut attr)
                .with_context(|| format!("attaching XDP_PASS to {dev} in {ns}"))
        })
        .join()
        .map_err(|_| anyhow!("XDP attach thread panicked"))?
    })
}
