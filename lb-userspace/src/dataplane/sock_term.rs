//! Socket termination: sockets that the socket-level path connected to a backend which has
//! since left the frontend are destroyed with the kernel's `bpf_sock_destroy` (Linux >= 6.5),
//! so that the application sees `ECONNABORTED` and connects again (to a live backend) instead of
//! talking to a removed endpoint for as long as the socket lives. This is the socket-level
//! counterpart of the UDP conntrack flush: connect4 translates a connected UDP socket once, so
//! flushing conntrack does not move it.
//!
//! How: `bpf_sock_destroy` may only be called from a TCP or UDP socket iterator. Two small
//! iterator programs (one per protocol, assembled below: aya 0.14 cannot relocate a kernel
//! function call) look every socket's cookie up in a map of doomed sockets that the agent fills
//! from the records the socket-level path keeps per translated socket (cookie, backend,
//! frontend): `lb_sk_revnat_v1` for AF_INET sockets and AF_INET6 ones with IPv4-mapped peers,
//! `lb_sk_revnat6_v1` for AF_INET6 sockets with IPv6 peers. They destroy a socket whose cookie
//! is listed and which is still connected to the listed backend: `skc_daddr`/`skc_dport` for
//! an IPv4 backend (an AF_INET6 socket with a mapped peer has its IPv4 address there too),
//! `skc_family` AF_INET6 and `skc_v6_daddr`/`skc_dport` for an IPv6 one. An iterator walks
//! the sockets of the network namespace of the thread that starts it, so the agent starts one
//! in every namespace of the node (pods and host).
//!
//! Which sockets: UDP sockets by default (as Cilium does; kube-proxy clears conntrack for
//! removed UDP endpoints, whose socket-level equivalent this is). TCP sockets only with
//! `--terminate-tcp-sockets`: a TCP connection to a backend that left the Service (a
//! terminating pod, for instance) may finish, as it does with kube-proxy.
use std::{
    collections::{BTreeSet, HashSet},
    fs, io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::{proto, scope, SockKey, SockKey6, SockRevNat, SockRevNat6};

use super::{addr6_from_words, addr6_words, bpf_sys};
use crate::control::desired::Desired;

/// Value of the doomed-socket map (key: socket cookie): the backend the socket must still be
/// connected to, and what the iterator did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Doomed {
    /// IPv4 backend address, network order (as `skc_daddr`); 0 for an IPv6 backend.
    pub addr_be: u32,
    /// Backend port, network order (as `skc_dport`).
    pub port_be: u16,
    /// `AF_INET6`: the backend is `addr6` (an AF_INET6 socket's `skc_v6_daddr`); anything else
    /// (`AF_INET`): the backend is `addr_be`.
    pub family: u16,
    /// `bpf_sock_destroy`'s return value, written by the iterator (0: destroyed).
    pub result: i32,
    /// Times the iterator found the socket connected to the backend.
    pub hits: u32,
    /// IPv6 backend address, wire bytes (as `skc_v6_daddr`); zeroes for an IPv4 backend.
    pub addr6: lb_common::Addr6,
}
// SAFETY: repr(C) plain data without padding (4 + 2 + 2 + 4 + 4 + 16 bytes).
unsafe impl aya::Pod for Doomed {}

impl Doomed {
    /// The entry of a socket that must still be connected to `backend`.
    pub fn new(backend: SocketAddr) -> Self {
        match backend {
            SocketAddr::V4(b) => Doomed {
                addr_be: u32::from(*b.ip()).to_be(),
                port_be: b.port().to_be(),
                family: AF_INET,
                ..Doomed::default()
            },
            SocketAddr::V6(b) => Doomed {
                port_be: b.port().to_be(),
                family: AF_INET6,
                addr6: addr6_words(*b.ip()),
                ..Doomed::default()
            },
        }
    }
}

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// Entries of the doomed-socket map, and the largest batch of sockets one pass handles.
const DOOMED_CAPACITY: u32 = 16_384;

/// A socket to terminate: its cookie and the backend it was connected to (IPv4: an AF_INET
/// socket, or an AF_INET6 one connected to the IPv4-mapped address; IPv6: an AF_INET6 socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub cookie: u64,
    pub backend: SocketAddr,
    pub proto: u8,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Sockets destroyed.
    pub terminated: u64,
    /// Sockets found but that the kernel refused to destroy.
    pub failed: u64,
    /// Targets found in no namespace (closed already, or reconnected elsewhere).
    pub gone: u64,
    /// Network namespaces walked.
    pub namespaces: usize,
    /// Namespaces that could not be entered (gone meanwhile, or no permission).
    pub unreachable: usize,
    pub duration: Duration,
    /// Cookies of the targets terminated or gone: their socket records can go.
    pub settled: Vec<u64>,
}

/// The kernel does not offer what socket termination needs.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One loaded and linked iterator program.
struct Iterator {
    /// Keeps the program alive (the link holds its own reference too).
    _prog: OwnedFd,
    link: OwnedFd,
}

/// The iterator programs and their doomed-socket map.
pub struct SockTerminator {
    doomed: OwnedFd,
    tcp: Iterator,
    udp: Iterator,
}

// BPF instruction encoding (see the kernel's Documentation/bpf/standardization).
const LDX_DW: u8 = 0x79;
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const STX_DW: u8 = 0x7b;
const STX_W: u8 = 0x63;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JNE_X: u8 = 0x5d;
const JA: u8 = 0x05;
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
/// `src_reg` of a `ld_imm64` whose immediate is a map fd.
const PSEUDO_MAP_FD: u8 = 1;
/// `src_reg` of a call whose immediate is a vmlinux BTF function id.
const PSEUDO_KFUNC_CALL: u8 = 2;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_GET_SOCKET_COOKIE: i32 = 46;
/// Offsets in `struct sock_common` (unchanged since Linux 2.6; the verifier checks every load
/// against the running kernel's BTF): `skc_daddr` and `skc_dport`.
const SKC_DADDR: i16 = 0;
const SKC_DPORT: i16 = 12;

/// Where `struct sock_common` keeps `skc_family` and `skc_v6_daddr`: read from the running
/// kernel's BTF ([`sock_common_layout`]), [`SockCommon::USUAL`] when it does not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockCommon {
    pub family: i16,
    pub v6_daddr: i16,
}

impl SockCommon {
    /// `skc_family` (unsigned short, after the address, hash and port pairs) at 16;
    /// `skc_v6_daddr` (struct in6_addr, after `skc_bound_dev_if` (20), the bind-node union
    /// (24, 16 bytes), `skc_prot` (40) and `skc_net` (48)) at 56 on a 64-bit kernel with
    /// network namespaces and IPv6. `kernel_sock_term` checks the offsets in use on the running
    /// kernel, with peers that differ from the sockets' own addresses (`skc_v6_rcv_saddr`,
    /// which follows). A wrong offset could only spare a listed socket (counted `gone`): its
    /// cookie must match first.
    pub const USUAL: SockCommon = SockCommon {
        family: 16,
        v6_daddr: 56,
    };
}
/// Offsets in [`Doomed`].
const DOOMED_ADDR: i16 = 0;
const DOOMED_PORT: i16 = 4;
const DOOMED_FAMILY: i16 = 6;
const DOOMED_RESULT: i16 = 8;
const DOOMED_HITS: i16 = 12;
const DOOMED_ADDR6: i16 = 16;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0x0f);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    u64::from_le_bytes(b)
}

/// The iterator program. Its context (`struct bpf_iter__tcp` / `bpf_iter__udp`) holds the
/// socket at offset 8 (NULL at the end of the walk). For a socket whose cookie is in `doomed`
/// and whose peer is still the listed backend (an IPv4 entry: `skc_daddr`; an IPv6 one: an
/// AF_INET6 socket's `skc_v6_daddr`; both: `skc_dport`): `bpf_sock_destroy`, result and hit
/// count written back into the entry. Returns 0 (the walk goes on).
fn program(doomed_fd: i32, sock_destroy_btf_id: u32, skc: SockCommon) -> Vec<u64> {
    const V6: i16 = 18;
    const PORT: i16 = 32;
    const OUT: i16 = 41;
    let to = |target: i16, at: i16| target - (at + 1);
    let mut p = vec![
        /* 0 */ insn(LDX_DW, 6, 1, 8, 0), // r6 = ctx->sk
        /* 1 */ insn(JEQ_K, 6, 0, to(OUT, 1), 0),
        /* 2 */ insn(MOV64_X, 1, 6, 0, 0),
        /* 3 */ insn(CALL, 0, 0, 0, HELPER_GET_SOCKET_COOKIE),
        /* 4 */ insn(STX_DW, 10, 0, -8, 0), // the cookie on the stack, as the key
        /* 5 */ insn(MOV64_X, 2, 10, 0, 0),
        /* 6 */ insn(ADD64_K, 2, 0, 0, -8),
        /* 7 */ insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, doomed_fd),
        /* 8 */ insn(0, 0, 0, 0, 0),
        /* 9 */ insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        /* 10 */ insn(JEQ_K, 0, 0, to(OUT, 10), 0),
        /* 11 */ insn(MOV64_X, 7, 0, 0, 0), // r7 = the doomed entry
        /* 12 */ insn(LDX_H, 2, 7, DOOMED_FAMILY, 0),
        /* 13 */ insn(JEQ_K, 2, 0, to(V6, 13), AF_INET6 as i32),
        // An IPv4 backend: skc_daddr.
        /* 14 */ insn(LDX_W, 2, 6, SKC_DADDR, 0),
        /* 15 */ insn(LDX_W, 3, 7, DOOMED_ADDR, 0),
        /* 16 */ insn(JNE_X, 2, 3, to(OUT, 16), 0),
        /* 17 */ insn(JA, 0, 0, to(PORT, 17), 0),
        // V6 (18): an IPv6 backend: an AF_INET6 socket whose skc_v6_daddr is the backend.
        /* 18 */
        insn(LDX_H, 2, 6, skc.family, 0),
        /* 19 */ insn(JNE_K, 2, 0, to(OUT, 19), AF_INET6 as i32),
    ];
    // 20..=31: the four words of the address.
    for w in 0..4i16 {
        let at = 20 + 3 * w;
        p.push(insn(LDX_W, 2, 6, skc.v6_daddr + 4 * w, 0));
        p.push(insn(LDX_W, 3, 7, DOOMED_ADDR6 + 4 * w, 0));
        p.push(insn(JNE_X, 2, 3, to(OUT, at + 2), 0));
    }
    p.extend([
        // PORT (32): skc_dport.
        /* 32 */ insn(LDX_H, 2, 6, SKC_DPORT, 0),
        /* 33 */ insn(LDX_H, 3, 7, DOOMED_PORT, 0),
        /* 34 */ insn(JNE_X, 2, 3, to(OUT, 34), 0),
        /* 35 */ insn(MOV64_X, 1, 6, 0, 0),
        /* 36 */ insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, sock_destroy_btf_id as i32),
        /* 37 */ insn(STX_W, 7, 0, DOOMED_RESULT, 0), // entry.result = r0
        /* 38 */ insn(LDX_W, 1, 7, DOOMED_HITS, 0),
        /* 39 */ insn(ADD64_K, 1, 0, 0, 1),
        /* 40 */ insn(STX_W, 7, 1, DOOMED_HITS, 0), // entry.hits += 1
        /* 41: OUT */ insn(MOV64_K, 0, 0, 0, 0),
        /* 42 */ insn(EXIT, 0, 0, 0, 0),
    ]);
    debug_assert_eq!(p.len(), OUT as usize + 2);
    p
}

impl SockTerminator {
    /// Loads and links the iterator programs. `Unsupported` when the kernel lacks
    /// `bpf_sock_destroy` or the socket iterators (Linux < 6.5, or no BTF), or refuses them.
    pub fn new() -> Result<Self, Unsupported> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| {
            Unsupported(format!(
                "no kernel BTF at /sys/kernel/btf/vmlinux ({e}): needs CONFIG_DEBUG_INFO_BTF"
            ))
        })?;
        let func = |name: &str| {
            btf.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func)
                .map_err(|_| {
                    Unsupported(format!(
                        "the kernel has no {name} (socket termination needs Linux >= 6.5)"
                    ))
                })
        };
        let destroy = func("bpf_sock_destroy")?;
        let tcp_target = func("bpf_iter_tcp")?;
        let udp_target = func("bpf_iter_udp")?;
        let doomed = bpf_sys::create_map(
            bpf_sys::MAP_TYPE_HASH,
            8,
            std::mem::size_of::<Doomed>() as u32,
            DOOMED_CAPACITY,
            "lb_sk_doomed",
        )
        .map_err(|e| Unsupported(format!("creating the doomed-socket map: {e}")))?;
        let skc = fs::read("/sys/kernel/btf/vmlinux")
            .ok()
            .and_then(|raw| sock_common_layout(&raw))
            .unwrap_or(SockCommon::USUAL);
        if skc != SockCommon::USUAL {
            log::info!(
                "socket termination: struct sock_common as the kernel's BTF has it: {skc:?}"
            );
        }
        let insns = program(doomed.as_raw_fd(), destroy, skc);
        let iter = |target: u32, name: &str| -> Result<Iterator, Unsupported> {
            let prog = bpf_sys::load_iter_program(&insns, target, name)
                .map_err(|e| Unsupported(format!("loading {name}: {e}")))?;
            let link = bpf_sys::link_iter(prog.as_fd())
                .map_err(|e| Unsupported(format!("linking {name}: {e}")))?;
            Ok(Iterator { _prog: prog, link })
        };
        Ok(Self {
            tcp: iter(tcp_target, "lb_sk_term_tcp")?,
            udp: iter(udp_target, "lb_sk_term_udp")?,
            doomed,
        })
    }

    /// Destroys the `targets` sockets wherever they live among `namespaces` (paths of network
    /// namespace files, such as `/proc/PID/ns/net`). Targets are handled in batches of the
    /// doomed map's size.
    pub fn terminate(&self, targets: &[Target], namespaces: &[PathBuf]) -> Result<Outcome> {
        let started = Instant::now();
        let mut out = Outcome {
            namespaces: namespaces.len(),
            ..Outcome::default()
        };
        for chunk in targets.chunks(DOOMED_CAPACITY as usize) {
            let fd = self.doomed.as_fd();
            for t in chunk {
                bpf_sys::update(fd, &t.cookie, &Doomed::new(t.backend), 0)
                    .context("filling the doomed-socket map")?;
            }
            let tcp = chunk.iter().any(|t| t.proto == proto::TCP);
            let udp = chunk.iter().any(|t| t.proto == proto::UDP);
            out.unreachable = out.unreachable.max(self.walk(namespaces, tcp, udp)?);
            for t in chunk {
                match bpf_sys::lookup::<u64, Doomed>(fd, &t.cookie)? {
                    Some(v) if v.hits > 0 && v.result != 0 => {
                        out.failed += 1;
                        log_refused(t, v.result);
                    }
                    Some(v) if v.hits > 0 => {
                        out.terminated += 1;
                        out.settled.push(t.cookie);
                    }
                    _ => {
                        out.gone += 1;
                        out.settled.push(t.cookie);
                    }
                }
                bpf_sys::delete(fd, &t.cookie)?;
            }
        }
        out.duration = started.elapsed();
        Ok(out)
    }

    /// One pass over the socket records of `rev_nat` (`lb_sk_revnat_v1`) and `rev_nat6`
    /// (`lb_sk_revnat6_v1`): terminates the sockets of `protos` whose backend no longer serves
    /// their frontend, in every namespace under `proc_root`, and removes the records of those
    /// terminated or gone. `None` when no record is stale (nothing walked).
    pub fn terminate_stale(
        &self,
        rev_nat: BorrowedFd<'_>,
        rev_nat6: BorrowedFd<'_>,
        serving: &Serving,
        protos: &BTreeSet<u8>,
        proc_root: &Path,
    ) -> Result<Option<Outcome>> {
        let stale4 = stale(rev_nat, serving, protos).context("reading the socket records")?;
        let stale6 =
            stale6(rev_nat6, serving, protos).context("reading the IPv6 socket records")?;
        if stale4.is_empty() && stale6.is_empty() {
            return Ok(None);
        }
        let targets: Vec<Target> = stale4
            .iter()
            .map(|(_, t)| *t)
            .chain(stale6.iter().map(|(_, t)| *t))
            .collect();
        let out = self.terminate(&targets, &namespaces(proc_root))?;
        let settled: HashSet<u64> = out.settled.iter().copied().collect();
        bpf_sys::delete_batch(rev_nat, &settled_keys(&stale4, &settled))
            .context("removing settled socket records")?;
        bpf_sys::delete_batch(rev_nat6, &settled_keys(&stale6, &settled))
            .context("removing settled IPv6 socket records")?;
        Ok(Some(out))
    }

    /// Runs the iterators in every namespace, on a thread of its own (entering a namespace
    /// changes the calling thread's). Returns the namespaces that could not be entered.
    fn walk(&self, namespaces: &[PathBuf], tcp: bool, udp: bool) -> Result<usize> {
        let links: Vec<BorrowedFd<'_>> = [(tcp, &self.tcp), (udp, &self.udp)]
            .into_iter()
            .filter(|(want, _)| *want)
            .map(|(_, it)| it.link.as_fd())
            .collect();
        std::thread::scope(|s| {
            s.spawn(|| -> Result<usize> {
                let mut unreachable = 0;
                for ns in namespaces {
                    let Ok(f) = fs::File::open(ns) else {
                        unreachable += 1;
                        continue;
                    };
                    // SAFETY: setns on a valid namespace fd; only this thread moves.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        unreachable += 1;
                        continue;
                    }
                    for l in &links {
                        bpf_sys::run_iter(*l)
                            .with_context(|| format!("walking the sockets of {}", ns.display()))?;
                    }
                }
                Ok(unreachable)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the socket walk thread panicked"))?
        })
    }
}

/// The keys of the `stale` records whose socket is `settled`.
fn settled_keys<K: Copy>(stale: &[(K, Target)], settled: &HashSet<u64>) -> Vec<K> {
    stale
        .iter()
        .filter(|(_, t)| settled.contains(&t.cookie))
        .map(|(k, _)| *k)
        .collect()
}

/// The offsets of `skc_family` and `skc_v6_daddr` in `struct sock_common` of raw BTF (as
/// `/sys/kernel/btf/vmlinux`, host byte order), `None` when it has no such struct or members
/// (a kernel without IPv6) or cannot be read.
pub fn sock_common_layout(raw: &[u8]) -> Option<SockCommon> {
    let u16_at = |o: usize| Some(u16::from_ne_bytes(raw.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_ne_bytes(raw.get(o..o + 4)?.try_into().ok()?));
    // struct btf_header: magic, version, flags, hdr_len, type_off, type_len, str_off, str_len.
    if u16_at(0)? != 0xeb9f {
        return None;
    }
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let str_off = u32_at(16)? as usize;
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    let name = |off: u32| -> Option<&[u8]> {
        let from = raw.get(strings + off as usize..)?;
        Some(&from[..from.iter().position(|b| *b == 0)?])
    };
    let mut at = types;
    while at < types + type_len {
        // struct btf_type: name_off, info (vlen: bits 0-15, kind: 24-28, kind_flag: 31), size.
        let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
        let (vlen, kind) = ((info & 0xffff) as usize, (info >> 24) & 0x1f);
        at += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
            3 => 12,                      // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
            2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
            _ => return None,
        };
        if kind == 4 && name(name_off)? == b"sock_common" {
            let (mut family, mut v6_daddr) = (None, None);
            for m in 0..vlen {
                // struct btf_member: name_off, type, offset (bits; with kind_flag, the low 24).
                let m_at = at + 12 * m;
                let bits = u32_at(m_at + 8)? & if info >> 31 == 1 { 0xff_ffff } else { !0 };
                let byte = i16::try_from(bits / 8).ok()?;
                match name(u32_at(m_at)?)? {
                    b"skc_family" => family = Some(byte),
                    b"skc_v6_daddr" => v6_daddr = Some(byte),
                    _ => {}
                }
            }
            return Some(SockCommon {
                family: family?,
                v6_daddr: v6_daddr?,
            });
        }
        at += extra;
    }
    None
}

fn log_refused(t: &Target, result: i32) {
    log::warn!(
        "socket {} connected to removed backend {} ({}): the kernel refused to terminate it: {}",
        t.cookie,
        t.backend,
        if t.proto == proto::TCP { "TCP" } else { "UDP" },
        io::Error::from_raw_os_error(-result)
    );
}

/// The frontend/backend pairs of the socket-level path (internal scope) in `desired`.
pub fn serving(desired: &Desired) -> Serving {
    desired
        .iter()
        .filter(|(k, _)| k.scope == scope::INTERNAL)
        .flat_map(|(k, d)| {
            d.backends
                .iter()
                .map(move |(b, _)| (k.addr, k.proto, b.addr))
        })
        .collect()
}

/// The network namespaces of the node, each once: those of every process (`/proc/PID/ns/net`;
/// pods' namespaces have at least their sandbox process) and the named ones under `/run/netns`.
/// With a host PID namespace (the DaemonSet's `hostPID: true`), that is every pod's.
pub fn namespaces(proc_root: &Path) -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |p: PathBuf| {
        if let Ok(m) = fs::metadata(&p) {
            if seen.insert((m.dev(), m.ino())) {
                out.push(p);
            }
        }
    };
    // The agent's own first.
    add(proc_root.join("self/ns/net"));
    if let Ok(rd) = fs::read_dir(proc_root) {
        let mut pids: Vec<u32> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        for pid in pids {
            add(proc_root.join(pid.to_string()).join("ns/net"));
        }
    }
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            add(e.path());
        }
    }
    out
}

/// The (frontend, protocol, backend) pairs the socket-level path serves: a socket connected
/// through a frontend to a backend outside this set is stale.
pub type Serving = HashSet<(SocketAddr, u8, SocketAddr)>;

/// The sockets of `lb_sk_revnat_v1` (fd `rev_nat`) whose backend no longer serves their
/// frontend, for the protocols in `protos`, with their map keys.
pub fn stale(
    rev_nat: BorrowedFd<'_>,
    serving: &Serving,
    protos: &BTreeSet<u8>,
) -> io::Result<Vec<(SockKey, Target)>> {
    let mut out = Vec::new();
    bpf_sys::for_each_batch::<SockKey, SockRevNat>(rev_nat, |keys, values| {
        out.extend(pick_stale(
            keys.iter().zip(values).map(|(k, v)| (*k, record4(k, v))),
            serving,
            protos,
        ));
    })?;
    Ok(out)
}

/// [`stale`] of `lb_sk_revnat6_v1` (fd `rev_nat6`): the AF_INET6 sockets connected to IPv6
/// backends.
pub fn stale6(
    rev_nat6: BorrowedFd<'_>,
    serving: &Serving,
    protos: &BTreeSet<u8>,
) -> io::Result<Vec<(SockKey6, Target)>> {
    let mut out = Vec::new();
    bpf_sys::for_each_batch::<SockKey6, SockRevNat6>(rev_nat6, |keys, values| {
        out.extend(pick_stale(
            keys.iter().zip(values).map(|(k, v)| (*k, record6(k, v))),
            serving,
            protos,
        ));
    })?;
    Ok(out)
}

/// A socket record: the frontend the socket asked for, and the socket with its backend.
type Record = (SocketAddr, Target);

/// The record of an `lb_sk_revnat_v1` entry.
pub fn record4(k: &SockKey, v: &SockRevNat) -> Record {
    let backend = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(k.addr_be)),
        u16::from_be(k.port_be),
    );
    let frontend = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(v.addr_be)),
        u16::from_be(v.port_be),
    );
    (
        frontend.into(),
        Target {
            cookie: k.cookie,
            backend: backend.into(),
            proto: k.proto,
        },
    )
}

/// The record of an `lb_sk_revnat6_v1` entry.
pub fn record6(k: &SockKey6, v: &SockRevNat6) -> Record {
    let backend = SocketAddrV6::new(addr6_from_words(&k.addr), u16::from_be(k.port_be), 0, 0);
    let frontend = SocketAddrV6::new(addr6_from_words(&v.addr), u16::from_be(v.port_be), 0, 0);
    (
        frontend.into(),
        Target {
            cookie: k.cookie,
            backend: backend.into(),
            proto: k.proto,
        },
    )
}

/// The records (with their keys) of the protocols in `protos` whose backend no longer serves
/// their frontend.
fn pick_stale<K>(
    records: impl std::iter::Iterator<Item = (K, Record)>,
    serving: &Serving,
    protos: &BTreeSet<u8>,
) -> Vec<(K, Target)> {
    records
        .filter(|(_, (frontend, t))| {
            protos.contains(&t.proto) && !serving.contains(&(*frontend, t.proto, t.backend))
        })
        .map(|(k, (_, t))| (k, t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_registers_offsets_and_immediates() {
        // r6 = *(u64 *)(r1 + 8)
        assert_eq!(
            insn(LDX_DW, 6, 1, 8, 0).to_le_bytes(),
            [0x79, 0x16, 8, 0, 0, 0, 0, 0]
        );
        // *(u64 *)(r10 - 8) = r0
        assert_eq!(
            insn(STX_DW, 10, 0, -8, 0).to_le_bytes(),
            [0x7b, 0x0a, 0xf8, 0xff, 0, 0, 0, 0]
        );
        // call of a kernel function by BTF id
        assert_eq!(
            insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, 0x1234).to_le_bytes(),
            [0x85, 0x20, 0, 0, 0x34, 0x12, 0, 0]
        );
        let p = program(7, 99, SockCommon::USUAL);
        assert_eq!(p.len(), 43);
        // Every jump lands on the `r0 = 0; exit` tail, but the family branch (to the IPv6
        // address check) and the IPv4 check's jump over it (to the port check).
        let mut jumps = Vec::new();
        for (i, x) in p.iter().enumerate() {
            let b = x.to_le_bytes();
            if [JEQ_K, JNE_K, JNE_X, JA].contains(&b[0]) {
                let off = i16::from_le_bytes([b[2], b[3]]);
                jumps.push((i, i as i16 + 1 + off));
            }
        }
        let elsewhere: Vec<_> = jumps.iter().filter(|(_, to)| *to != 41).collect();
        assert_eq!(elsewhere, [&(13, 18), &(17, 32)]);
        assert_eq!(jumps.len(), 11);
        let at = |i: usize| p[i].to_le_bytes();
        // The family test: entry.family == AF_INET6, then the socket's skc_family.
        assert_eq!(at(12)[..4], [LDX_H, 0x72, 6, 0]);
        assert_eq!(at(13)[4..], (libc::AF_INET6).to_le_bytes());
        assert_eq!(at(18)[..4], [LDX_H, 0x62, 16, 0]);
        assert_eq!(at(19)[4..], (libc::AF_INET6).to_le_bytes());
        // The IPv6 words: skc_v6_daddr against entry.addr6, word by word.
        for w in 0..4 {
            assert_eq!(at(20 + 3 * w)[..4], [LDX_W, 0x62, 56 + 4 * w as u8, 0]);
            assert_eq!(at(21 + 3 * w)[..4], [LDX_W, 0x73, 16 + 4 * w as u8, 0]);
        }
        // The IPv4 check is the one before IPv6: skc_daddr against entry.addr_be.
        assert_eq!(at(14)[..4], [LDX_W, 0x62, 0, 0]);
        assert_eq!(at(15)[..4], [LDX_W, 0x73, 0, 0]);
    }

    /// The running kernel's BTF (where there is one) has `skc_family` and `skc_v6_daddr` at
    /// the usual offsets (a 64-bit kernel with network namespaces and IPv6), and the reader
    /// finds them; a cut or foreign blob says nothing.
    #[test]
    fn sock_common_layout_is_read_from_btf() {
        let Ok(raw) = fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("no /sys/kernel/btf/vmlinux: skipped");
            return;
        };
        assert_eq!(sock_common_layout(&raw), Some(SockCommon::USUAL));
        assert_eq!(sock_common_layout(&raw[..raw.len() / 2]), None);
        assert_eq!(sock_common_layout(b"not btf at all"), None);
    }

    #[test]
    fn doomed_entries_hold_either_family() {
        assert_eq!(std::mem::size_of::<Doomed>(), 32);
        let v4 = Doomed::new("10.1.2.3:8080".parse().unwrap());
        assert_eq!(
            (v4.addr_be, v4.port_be, v4.family, v4.addr6),
            (
                u32::from_ne_bytes([10, 1, 2, 3]),
                u16::from_ne_bytes([0x1f, 0x90]),
                2,
                [0; 4]
            )
        );
        let v6 = Doomed::new("[fd00::1:2]:53".parse().unwrap());
        assert_eq!((v6.addr_be, v6.port_be, v6.family), (0, 53u16.to_be(), 10));
        // In-memory bytes are the wire bytes, as skc_v6_daddr's.
        let bytes: Vec<u8> = v6.addr6.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(
            bytes,
            "fd00::1:2".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
    }

    fn key6(cookie: u64, backend: &str, proto: u8) -> SockKey6 {
        let b: SocketAddrV6 = backend.parse().unwrap();
        SockKey6 {
            cookie,
            addr: addr6_words(*b.ip()),
            port_be: b.port().to_be(),
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }

    fn rev6(frontend: &str) -> SockRevNat6 {
        let f: SocketAddrV6 = frontend.parse().unwrap();
        SockRevNat6 {
            addr: addr6_words(*f.ip()),
            port_be: f.port().to_be(),
            _pad: 0,
            rev_nat_id: 7,
        }
    }

    #[test]
    fn stale_records_are_those_whose_backend_left_their_frontend() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let serving: Serving = [
            (sa("[fd00:96::1]:53"), proto::UDP, sa("[fd00:10::1]:5353")),
            (sa("[fd00:96::1]:80"), proto::TCP, sa("[fd00:10::1]:8080")),
            (sa("10.96.0.1:53"), proto::UDP, sa("10.0.0.1:5353")),
        ]
        .into();
        let udp: BTreeSet<u8> = [proto::UDP].into();
        let both: BTreeSet<u8> = [proto::UDP, proto::TCP].into();
        let v6 = [
            // Still served.
            (
                key6(1, "[fd00:10::1]:5353", proto::UDP),
                rev6("[fd00:96::1]:53"),
            ),
            // Its backend left the frontend (still serves another one).
            (
                key6(2, "[fd00:10::2]:5353", proto::UDP),
                rev6("[fd00:96::1]:53"),
            ),
            // Another port of the backend.
            (
                key6(3, "[fd00:10::1]:5354", proto::UDP),
                rev6("[fd00:96::1]:53"),
            ),
            // TCP: a backend that left, a backend that serves.
            (
                key6(4, "[fd00:10::2]:8080", proto::TCP),
                rev6("[fd00:96::1]:80"),
            ),
            (
                key6(5, "[fd00:10::1]:8080", proto::TCP),
                rev6("[fd00:96::1]:80"),
            ),
            // The frontend is gone.
            (
                key6(6, "[fd00:10::1]:5353", proto::UDP),
                rev6("[fd00:96::2]:53"),
            ),
        ];
        let pick = |protos: &BTreeSet<u8>| -> Vec<(u64, SocketAddr)> {
            pick_stale(
                v6.iter().map(|(k, v)| (k.cookie, record6(k, v))),
                &serving,
                protos,
            )
            .into_iter()
            .map(|(c, t)| {
                assert_eq!(c, t.cookie);
                (c, t.backend)
            })
            .collect()
        };
        assert_eq!(
            pick(&udp),
            [
                (2, sa("[fd00:10::2]:5353")),
                (3, sa("[fd00:10::1]:5354")),
                (6, sa("[fd00:10::1]:5353"))
            ]
        );
        assert_eq!(pick(&both).len(), 4);
        assert!(pick(&both).contains(&(4, sa("[fd00:10::2]:8080"))));

        // IPv4 records read the same way, and an IPv4 pair never serves an IPv6 record.
        let k4 = |cookie, b: &str| {
            let b: SocketAddrV4 = b.parse().unwrap();
            SockKey {
                cookie,
                addr_be: u32::from(*b.ip()).to_be(),
                port_be: b.port().to_be(),
                proto: proto::UDP,
                _pad: 0,
            }
        };
        let r4 = |f: &str| {
            let f: SocketAddrV4 = f.parse().unwrap();
            SockRevNat {
                addr_be: u32::from(*f.ip()).to_be(),
                port_be: f.port().to_be(),
                _pad: 0,
                rev_nat_id: 1,
                _pad2: 0,
            }
        };
        let v4 = [
            (k4(10, "10.0.0.1:5353"), r4("10.96.0.1:53")),
            (k4(11, "10.0.0.2:5353"), r4("10.96.0.1:53")),
        ];
        let got: Vec<u64> = pick_stale(
            v4.iter().map(|(k, v)| (k.cookie, record4(k, v))),
            &serving,
            &udp,
        )
        .into_iter()
        .map(|(c, _)| c)
        .collect();
        assert_eq!(got, [11]);
        let mapped = record6(
            &key6(12, "[::ffff:10.0.0.1]:5353", proto::UDP),
            &rev6("[::ffff:10.96.0.1]:53"),
        );
        assert_eq!(
            pick_stale([(12, mapped)].into_iter(), &serving, &udp).len(),
            1
        );
    }
}
