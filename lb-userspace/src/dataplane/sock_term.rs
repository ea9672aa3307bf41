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
//! from `lb_sk_revnat_v1` (the record connect4 keeps per translated socket: cookie, backend,
//! frontend), and destroy a socket whose cookie is listed and which is still connected to the
//! listed backend. An iterator walks the sockets of the network namespace of the thread that
//! starts it, so the agent starts one in every namespace of the node (pods and host).
//!
//! Which sockets: UDP sockets by default (as Cilium does; kube-proxy clears conntrack for
//! removed UDP endpoints, whose socket-level equivalent this is). TCP sockets only with
//! `--terminate-tcp-sockets`: a TCP connection to a backend that left the Service (a
//! terminating pod, for instance) may finish, as it does with kube-proxy.
use std::{
    collections::{BTreeSet, HashSet},
    fs, io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::{proto, scope, SockKey, SockRevNat};

use super::bpf_sys;
use crate::control::desired::Desired;

/// Value of the doomed-socket map (key: socket cookie): the backend the socket must still be
/// connected to, and what the iterator did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Doomed {
    /// Backend address and port, network order (as `skc_daddr`, `skc_dport`).
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    /// `bpf_sock_destroy`'s return value, written by the iterator (0: destroyed).
    pub result: i32,
    /// Times the iterator found the socket connected to the backend.
    pub hits: u32,
}
// SAFETY: repr(C) plain data without padding (4 + 2 + 2 + 4 + 4 bytes).
unsafe impl aya::Pod for Doomed {}

/// Entries of the doomed-socket map, and the largest batch of sockets one pass handles.
const DOOMED_CAPACITY: u32 = 16_384;

/// A socket to terminate: its cookie and the backend it was connected to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub cookie: u64,
    pub backend: SocketAddrV4,
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
const JNE_X: u8 = 0x5d;
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
/// and whose peer is still the listed backend: `bpf_sock_destroy`, result and hit count written
/// back into the entry. Returns 0 (the walk goes on).
fn program(doomed_fd: i32, sock_destroy_btf_id: u32) -> Vec<u64> {
    const OUT: i16 = 24;
    let jump_to_out = |at: i16| OUT - (at + 1);
    vec![
        /* 0 */ insn(LDX_DW, 6, 1, 8, 0), // r6 = ctx->sk
        /* 1 */ insn(JEQ_K, 6, 0, jump_to_out(1), 0),
        /* 2 */ insn(MOV64_X, 1, 6, 0, 0),
        /* 3 */ insn(CALL, 0, 0, 0, HELPER_GET_SOCKET_COOKIE),
        /* 4 */ insn(STX_DW, 10, 0, -8, 0), // the cookie on the stack, as the key
        /* 5 */ insn(MOV64_X, 2, 10, 0, 0),
        /* 6 */ insn(ADD64_K, 2, 0, 0, -8),
        /* 7 */ insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, doomed_fd),
        /* 8 */ insn(0, 0, 0, 0, 0),
        /* 9 */ insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        /* 10 */ insn(JEQ_K, 0, 0, jump_to_out(10), 0),
        /* 11 */ insn(MOV64_X, 7, 0, 0, 0), // r7 = the doomed entry
        /* 12 */ insn(LDX_W, 2, 6, SKC_DADDR, 0),
        /* 13 */ insn(LDX_W, 3, 7, 0, 0),
        /* 14 */ insn(JNE_X, 2, 3, jump_to_out(14), 0),
        /* 15 */ insn(LDX_H, 2, 6, SKC_DPORT, 0),
        /* 16 */ insn(LDX_H, 3, 7, 4, 0),
        /* 17 */ insn(JNE_X, 2, 3, jump_to_out(17), 0),
        /* 18 */ insn(MOV64_X, 1, 6, 0, 0),
        /* 19 */ insn(CALL, 0, PSEUDO_KFUNC_CALL, 0, sock_destroy_btf_id as i32),
        /* 20 */ insn(STX_W, 7, 0, 8, 0), // entry.result = r0
        /* 21 */ insn(LDX_W, 1, 7, 12, 0),
        /* 22 */ insn(ADD64_K, 1, 0, 0, 1),
        /* 23 */ insn(STX_W, 7, 1, 12, 0), // entry.hits += 1
        /* 24: OUT */ insn(MOV64_K, 0, 0, 0, 0),
        /* 25 */ insn(EXIT, 0, 0, 0, 0),
    ]
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
        let insns = program(doomed.as_raw_fd(), destroy);
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
                let v = Doomed {
                    addr_be: u32::from(*t.backend.ip()).to_be(),
                    port_be: t.backend.port().to_be(),
                    ..Doomed::default()
                };
                bpf_sys::update(fd, &t.cookie, &v, 0).context("filling the doomed-socket map")?;
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

    /// One pass over the socket records of `rev_nat` (`lb_sk_revnat_v1`): terminates the
    /// sockets of `protos` whose backend no longer serves their frontend, in every namespace
    /// under `proc_root`, and removes the records of those terminated or gone. `None` when no
    /// record is stale (nothing walked).
    pub fn terminate_stale(
        &self,
        rev_nat: BorrowedFd<'_>,
        serving: &Serving,
        protos: &BTreeSet<u8>,
        proc_root: &Path,
    ) -> Result<Option<Outcome>> {
        let stale = stale(rev_nat, serving, protos).context("reading the socket records")?;
        if stale.is_empty() {
            return Ok(None);
        }
        let targets: Vec<Target> = stale.iter().map(|(_, t)| *t).collect();
        let out = self.terminate(&targets, &namespaces(proc_root))?;
        let settled: HashSet<u64> = out.settled.iter().copied().collect();
        let keys: Vec<SockKey> = stale
            .iter()
            .filter(|(_, t)| settled.contains(&t.cookie))
            .map(|(k, _)| *k)
            .collect();
        bpf_sys::delete_batch(rev_nat, &keys).context("removing settled socket records")?;
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
        for (k, v) in keys.iter().zip(values) {
            if !protos.contains(&k.proto) {
                continue;
            }
            let backend = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(k.addr_be)),
                u16::from_be(k.port_be),
            );
            let frontend = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v.addr_be)),
                u16::from_be(v.port_be),
            );
            if !serving.contains(&(frontend.into(), k.proto, backend.into())) {
                out.push((
                    *k,
                    Target {
                        cookie: k.cookie,
                        backend,
                        proto: k.proto,
                    },
                ));
            }
        }
    })?;
    Ok(out)
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
        let p = program(7, 99);
        assert_eq!(p.len(), 26);
        // Every jump lands on the `r0 = 0; exit` tail.
        for (i, x) in p.iter().enumerate() {
            let b = x.to_le_bytes();
            if b[0] == JEQ_K || b[0] == JNE_X {
                let off = i16::from_le_bytes([b[2], b[3]]);
                assert_eq!(i as i16 + 1 + off, 24, "jump at {i}");
            }
        }
    }
}
