//! Socket-level load balancing: translate a frontend to a backend once, when a socket connects
//! (TCP, connected UDP) or sends a datagram (unconnected UDP), and translate the backend back to
//! the frontend where the application reads a peer address (recvmsg, getpeername).
//!
//! Three families of socket addresses ([`Family`]): AF_INET ones ([`V4`], the `*4` hooks) and
//! IPv4-mapped IPv6 ones, `::ffff:a.b.c.d` ([`Mapped6`], the `*6` hooks), name IPv4 frontends;
//! a dual-stack AF_INET6 socket (IPV6_V6ONLY off) uses mapped addresses for IPv4 peers (Java
//! does so on every host with IPv6). A mapped frontend becomes `::ffff:<backend>`, and the
//! backend reads back as `::ffff:<frontend>`. Other IPv6 addresses ([`V6`], the `*6` hooks)
//! name IPv6 frontends: the maps key those on the address's handle (`map_name::ADDR6`, one
//! lookup more), in the IPv6 scopes (`scope::INTERNAL6`), with IPv6 backends only, and the
//! per-socket record of an IPv6 socket is keyed on the full address
//! (`map_name::SOCK_REV_NAT6`). The frontend lookup, backend choice, affinity, refusals,
//! source ranges, per-socket records and counters are the same code for the three.
//!
//! Which hook the kernel (6.18) runs for an AF_INET6 socket and a mapped peer, measured by
//! `lab_mapped6_hooks_the_kernel_runs_for_mapped_addresses` (tests/tests/lab_mapped6.rs), which
//! removes one link at a time:
//! - TCP and UDP `connect`: connect6, with the mapped address; never connect4 (the kernel then
//!   hands the socket to the IPv4 connect, `tcp_v4_connect` / `__ip4_datagram_connect`,
//!   without running the IPv4 hook);
//! - UDP `sendto`/`sendmsg` with a mapped destination: **sendmsg4**, with an AF_INET address
//!   (`udpv6_sendmsg` hands the datagram to `udp_sendmsg` before its own hook runs: sendmsg6
//!   never sees it). The socket cookie is the AF_INET6 socket's, so recvmsg6 finds the record
//!   sendmsg4 wrote. A connected socket's `send` has the backend connect6 chose, no frontend;
//! - UDP `recvfrom`/`recvmsg`: recvmsg6, with the IPv4 source as a mapped address; never
//!   recvmsg4;
//! - `getpeername`: getpeername6, with the mapped peer; never getpeername4.
//!
//! sendmsg6 is attached all the same (a mapped destination it sees is translated like one
//! sendmsg4 sees), for kernels that run it before the hand-over.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::warn;
use lb_common::{
    affinity_client, backend_flags, counter, proto, scope, service_flags, Addr6, Backend,
    MemberKey, SockFlow, SockKey, SockKey6, SockRevNat, SockRevNat6,
};

use crate::{
    affinity, clock,
    frontend::{self, Frontend},
    maps::{self, ServiceEvent, MEMBERS, SOCK_FLOW, SOCK_REV_NAT, SOCK_REV_NAT6},
    select::{self, Chosen, Missing},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const ECONNREFUSED: i32 = 111;

/// The socket addresses a program translates: AF_INET ones and IPv4-mapped IPv6 ones name IPv4
/// frontends and backends, other IPv6 ones IPv6 frontends and backends.
pub trait Family {
    /// The scope of this family's in-node frontends in the frontends map.
    const SCOPE: u8;
    /// An address of the family as the maps and the socket context hold it (network order).
    type Addr: Copy;
    /// The frontends-map address (an IPv4 address, or an IPv6 address's handle) of the socket
    /// address, when it is of this family and (IPv6) an address the maps know.
    fn map_addr(sa: &bpf_sock_addr) -> Option<u32>;
    /// The socket address's address, once [`Family::map_addr`] accepted it.
    fn user_addr(sa: &bpf_sock_addr) -> Self::Addr;
    /// Points the socket address at the backend; false when the backend is not of this family
    /// or its address is unknown (inconsistent maps).
    fn set_backend(sa: &mut bpf_sock_addr, be: &Backend) -> bool;
    /// Points the socket address (a peer address in recvmsg, getpeername) at `addr`:`port_be`.
    fn set(sa: &mut bpf_sock_addr, addr: &Self::Addr, port_be: u16);
    /// The source a socket is bound to (`None`: not bound, or to no address of the family).
    fn bound(sk: &bpf_sock) -> Option<Self::Addr>;
    /// A datagram's source in sendmsg: an IP_PKTINFO / IPV6_PKTINFO address, else the socket's
    /// bound one.
    fn msg_source(sa: &bpf_sock_addr) -> Option<Self::Addr>;
    /// Whether `src` lies in a Service port's loadBalancerSourceRanges.
    fn in_ranges(svc_port_id: u32, src: &Self::Addr) -> bool;
    /// Remembers, for the socket `cookie`, that backend `back` stands for frontend `front`.
    fn remember(
        cookie: u64,
        proto: u8,
        front: (Self::Addr, u16),
        back: (Self::Addr, u16),
        rev_nat_id: u32,
    );
    /// The frontend a socket's backend peer `peer` stands for.
    fn recall(cookie: u64, proto: u8, peer: (Self::Addr, u16)) -> Option<(Self::Addr, u16)>;
}

/// AF_INET socket addresses (connect4, sendmsg4, recvmsg4, getpeername4).
pub struct V4;

/// IPv4-mapped IPv6 socket addresses, `::ffff:a.b.c.d` (connect6, sendmsg6, recvmsg6,
/// getpeername6).
pub struct Mapped6;

/// IPv6 socket addresses that are not IPv4-mapped (connect6, sendmsg6, recvmsg6,
/// getpeername6): IPv6 frontends, whose addresses the maps hold as handles
/// (`map_name::ADDR6`).
pub struct V6;

/// Reads the four words of an IPv6 address in a context. The kernel accepts only 4-byte
/// accesses to these fields: one volatile read each.
#[inline(always)]
fn words(w: &[u32; 4]) -> Addr6 {
    let r = |i: usize| {
        // SAFETY: `i` < 4, a read of a field of the context the kernel handed over.
        unsafe { core::ptr::read_volatile(w.as_ptr().add(i)) }
    };
    [r(0), r(1), r(2), r(3)]
}

/// Writes the four words of an IPv6 address into a context, one 4-byte write each.
#[inline(always)]
fn set_words(w: &mut [u32; 4], a: &Addr6) {
    for (i, v) in a.iter().enumerate() {
        // SAFETY: `i` < 4, a write of a field writable for the *6 hooks.
        unsafe { core::ptr::write_volatile(w.as_mut_ptr().add(i), *v) };
    }
}

/// The IPv4 address of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, network order words).
#[inline(always)]
fn mapped(w: &[u32; 4]) -> Option<u32> {
    let a = words(w);
    (a[0] == 0 && a[1] == 0 && a[2] == 0x0000_ffffu32.to_be()).then_some(a[3])
}

/// Whether a *6 hook's socket address is IPv4-mapped (handled as [`Mapped6`], else as [`V6`]).
#[inline(always)]
pub fn is_mapped(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    mapped(&sa.user_ip6).is_some()
}

/// The IPv4 side shared by [`V4`] and [`Mapped6`]: the per-socket record keyed on IPv4.
#[inline(always)]
fn remember4(cookie: u64, proto: u8, front: (u32, u16), back: (u32, u16), rev_nat_id: u32) {
    let key = SockKey {
        cookie,
        addr_be: back.0,
        port_be: back.1,
        proto,
        _pad: 0,
    };
    let rev = SockRevNat {
        addr_be: front.0,
        port_be: front.1,
        _pad: 0,
        rev_nat_id,
        _pad2: 0,
    };
    // A failed insert (map full) only loses the reverse view; the connection still works.
    let _ = SOCK_REV_NAT.insert(key, rev, 0);
}

#[inline(always)]
fn recall4(cookie: u64, proto: u8, peer: (u32, u16)) -> Option<(u32, u16)> {
    let key = SockKey {
        cookie,
        addr_be: peer.0,
        port_be: peer.1,
        proto,
        _pad: 0,
    };
    // SAFETY: value copied out at once.
    let rev = unsafe { SOCK_REV_NAT.get(key).copied() }?;
    Some((rev.addr_be, rev.port_be))
}

#[inline(always)]
fn is_v6(be: &Backend) -> bool {
    be.flags & backend_flags::IPV6 != 0
}

impl Family for V4 {
    const SCOPE: u8 = scope::INTERNAL;
    type Addr = u32;

    #[inline(always)]
    fn map_addr(sa: &bpf_sock_addr) -> Option<u32> {
        (sa.user_family == AF_INET).then_some(sa.user_ip4)
    }

    #[inline(always)]
    fn user_addr(sa: &bpf_sock_addr) -> u32 {
        sa.user_ip4
    }

    #[inline(always)]
    fn set_backend(sa: &mut bpf_sock_addr, be: &Backend) -> bool {
        if is_v6(be) {
            return false;
        }
        Self::set(sa, &be.addr_be, be.port_be);
        true
    }

    #[inline(always)]
    fn set(sa: &mut bpf_sock_addr, addr: &u32, port_be: u16) {
        sa.user_ip4 = *addr;
        sa.user_port = port_be as u32;
    }

    #[inline(always)]
    fn bound(sk: &bpf_sock) -> Option<u32> {
        Some(sk.src_ip4).filter(|a| *a != 0)
    }

    #[inline(always)]
    fn msg_source(sa: &bpf_sock_addr) -> Option<u32> {
        Some(sa.msg_src_ip4).filter(|a| *a != 0)
    }

    #[inline(always)]
    fn in_ranges(svc_port_id: u32, src: &u32) -> bool {
        maps::source_in_ranges(svc_port_id, *src)
    }

    #[inline(always)]
    fn remember(cookie: u64, proto: u8, front: (u32, u16), back: (u32, u16), rev_nat_id: u32) {
        remember4(cookie, proto, front, back, rev_nat_id)
    }

    #[inline(always)]
    fn recall(cookie: u64, proto: u8, peer: (u32, u16)) -> Option<(u32, u16)> {
        recall4(cookie, proto, peer)
    }
}

impl Family for Mapped6 {
    const SCOPE: u8 = scope::INTERNAL;
    type Addr = u32;

    #[inline(always)]
    fn map_addr(sa: &bpf_sock_addr) -> Option<u32> {
        if sa.user_family != AF_INET6 {
            return None;
        }
        mapped(&sa.user_ip6)
    }

    #[inline(always)]
    fn user_addr(sa: &bpf_sock_addr) -> u32 {
        // SAFETY: a 4-byte read of a field of the context.
        unsafe { core::ptr::read_volatile(&sa.user_ip6[3]) }
    }

    #[inline(always)]
    fn set_backend(sa: &mut bpf_sock_addr, be: &Backend) -> bool {
        if is_v6(be) {
            return false;
        }
        Self::set(sa, &be.addr_be, be.port_be);
        true
    }

    /// Only the last word changes: the address stays `::ffff:` + IPv4.
    #[inline(always)]
    fn set(sa: &mut bpf_sock_addr, addr: &u32, port_be: u16) {
        // SAFETY: a 4-byte write of a field writable for connect6/sendmsg6/recvmsg6/getpeername6.
        unsafe { core::ptr::write_volatile(&mut sa.user_ip6[3], *addr) };
        sa.user_port = port_be as u32;
    }

    /// A dual-stack socket bound to `::ffff:a.b.c.d` has the source a.b.c.d; one bound to `::`
    /// (unbound) or to a real IPv6 address has no IPv4 source.
    #[inline(always)]
    fn bound(sk: &bpf_sock) -> Option<u32> {
        mapped(&sk.src_ip6).filter(|a| *a != 0)
    }

    #[inline(always)]
    fn msg_source(sa: &bpf_sock_addr) -> Option<u32> {
        mapped(&sa.msg_src_ip6).filter(|a| *a != 0)
    }

    #[inline(always)]
    fn in_ranges(svc_port_id: u32, src: &u32) -> bool {
        maps::source_in_ranges(svc_port_id, *src)
    }

    #[inline(always)]
    fn remember(cookie: u64, proto: u8, front: (u32, u16), back: (u32, u16), rev_nat_id: u32) {
        remember4(cookie, proto, front, back, rev_nat_id)
    }

    #[inline(always)]
    fn recall(cookie: u64, proto: u8, peer: (u32, u16)) -> Option<(u32, u16)> {
        recall4(cookie, proto, peer)
    }
}

impl Family for V6 {
    const SCOPE: u8 = scope::INTERNAL6;
    type Addr = Addr6;

    #[inline(always)]
    fn map_addr(sa: &bpf_sock_addr) -> Option<u32> {
        if sa.user_family != AF_INET6 {
            return None;
        }
        maps::addr6_handle(&words(&sa.user_ip6))
    }

    #[inline(always)]
    fn user_addr(sa: &bpf_sock_addr) -> Addr6 {
        words(&sa.user_ip6)
    }

    #[inline(always)]
    fn set_backend(sa: &mut bpf_sock_addr, be: &Backend) -> bool {
        if !is_v6(be) {
            return false;
        }
        let Some(a) = maps::addr6_of(be.addr_be) else {
            return false;
        };
        Self::set(sa, &a, be.port_be);
        true
    }

    #[inline(always)]
    fn set(sa: &mut bpf_sock_addr, addr: &Addr6, port_be: u16) {
        set_words(&mut sa.user_ip6, addr);
        sa.user_port = port_be as u32;
    }

    /// `::` is not bound; an IPv4-mapped source is no IPv6 source either.
    #[inline(always)]
    fn bound(sk: &bpf_sock) -> Option<Addr6> {
        let a = words(&sk.src_ip6);
        (a != [0; 4] && mapped(&sk.src_ip6).is_none()).then_some(a)
    }

    #[inline(always)]
    fn msg_source(sa: &bpf_sock_addr) -> Option<Addr6> {
        let a = words(&sa.msg_src_ip6);
        (a != [0; 4] && mapped(&sa.msg_src_ip6).is_none()).then_some(a)
    }

    #[inline(always)]
    fn in_ranges(svc_port_id: u32, src: &Addr6) -> bool {
        maps::source_in_ranges6(svc_port_id, src)
    }

    #[inline(always)]
    fn remember(cookie: u64, proto: u8, front: (Addr6, u16), back: (Addr6, u16), rev_nat_id: u32) {
        let key = SockKey6 {
            cookie,
            addr: back.0,
            port_be: back.1,
            proto,
            _pad: 0,
            _pad2: 0,
        };
        let rev = SockRevNat6 {
            addr: front.0,
            port_be: front.1,
            _pad: 0,
            rev_nat_id,
        };
        // A failed insert (map full) only loses the reverse view; the connection still works.
        let _ = SOCK_REV_NAT6.insert(key, rev, 0);
    }

    #[inline(always)]
    fn recall(cookie: u64, proto: u8, peer: (Addr6, u16)) -> Option<(Addr6, u16)> {
        let key = SockKey6 {
            cookie,
            addr: peer.0,
            port_be: peer.1,
            proto,
            _pad: 0,
            _pad2: 0,
        };
        // SAFETY: value copied out at once.
        let rev = unsafe { SOCK_REV_NAT6.get(key).copied() }?;
        Some((rev.addr, rev.port_be))
    }
}

/// Verdicts of the socket programs: 1 lets the call proceed, 0 refuses it (the caller sees
/// EPERM). recvmsg and getpeername programs may only return `ALLOW`.
pub const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// Why a connection or datagram to a frontend is refused.
pub struct Refusal {
    fe: Frontend,
    why: Why,
}

enum Why {
    /// The frontend has no usable endpoint.
    NoBackend,
    /// A slot points at a missing backend (inconsistent maps).
    BackendMissing,
    /// The frontend admits only the Service's loadBalancerSourceRanges, and this socket's
    /// source is not in them.
    SourceRange,
}

/// loadBalancerSourceRanges at socket level, for a frontend that has them: a socket bound to
/// a source address (`src_be`, 0 when unbound) is judged by that address, as a packet would
/// be; an unbound one gets a node address as its source when it sends, so it is admitted when
/// a node address lies in the ranges (`ALLOW_FROM_NODE`, kube-proxy's `allowFromNode`).
#[inline(always)]
fn source_allowed<F: Family>(fe: &Frontend, src: Option<F::Addr>) -> Result<(), Refusal> {
    let flags = fe.master.flags;
    if flags & service_flags::SOURCE_RANGES == 0 {
        return Ok(());
    }
    let allowed = match src {
        None => flags & service_flags::ALLOW_FROM_NODE != 0,
        Some(a) => F::in_ranges(fe.master.svc_port_id, &a),
    };
    if allowed {
        Ok(())
    } else {
        Err(Refusal {
            fe: *fe,
            why: Why::SourceRange,
        })
    }
}

/// The source address a connecting socket is bound to (`None`: not bound yet).
#[inline(always)]
fn bound_source<F: Family>(ctx: &SockAddrContext) -> Option<F::Addr> {
    // SAFETY: the kernel hands a valid bpf_sock_addr whose `sk` is a valid socket for the
    // program's lifetime (connect and sendmsg programs have one).
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        F::bound(&*sk)
    }
}

/// The frontend a socket address names, if it is one of ours.
#[inline(always)]
fn frontend<F: Family>(ctx: &SockAddrContext) -> Option<Frontend> {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    let p = sa.protocol as u8;
    if p != proto::TCP && p != proto::UDP {
        return None;
    }
    let addr = F::map_addr(sa)?;
    frontend::lookup(addr, sa.user_port as u16, p, F::SCOPE)
}

/// The backend for a new connection: the client's affinity record when live and usable, else a
/// fresh uniform choice (recorded when the Service asks for affinity).
#[inline(always)]
fn choose(ctx: &SockAddrContext, fe: &Frontend) -> Result<Chosen, Refusal> {
    if fe.master.count == 0 {
        return Err(Refusal {
            fe: *fe,
            why: Why::NoBackend,
        });
    }
    let chosen = if affinity::enabled(&fe.master) {
        // The client's address is not known at connect time: key on its network namespace.
        // SAFETY: bpf_get_netns_cookie accepts a bpf_sock_addr context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        let client = affinity::key(&fe.master, affinity_client::NETNS, netns);
        select::with_affinity(fe, &client, clock::now_s(), || select::random_slot(fe))
    } else {
        select::random_slot(fe)
    };
    chosen.map_err(|Missing| Refusal {
        fe: *fe,
        why: Why::BackendMissing,
    })
}

/// Rewrites the destination to the backend and remembers, per socket, which frontend it was.
#[inline(always)]
fn translate<F: Family>(
    ctx: &SockAddrContext,
    fe: &Frontend,
    chosen: &Chosen,
    cookie: u64,
) -> Result<(), Refusal> {
    // SAFETY: valid context; the address and port are writable for connect and sendmsg.
    let sa = unsafe { &mut *ctx.sock_addr };
    let front = (F::user_addr(sa), sa.user_port as u16);
    if !F::set_backend(sa, &chosen.backend) {
        return Err(Refusal {
            fe: *fe,
            why: Why::BackendMissing,
        });
    }
    let back = (F::user_addr(sa), sa.user_port as u16);
    F::remember(cookie, fe.key.proto, front, back, fe.master.rev_nat_id);
    Ok(())
}

/// Counts a refusal and returns the verdict that refuses the call.
#[inline(always)]
pub fn refuse(ctx: &SockAddrContext, r: Refusal) -> i32 {
    let fe = &r.fe;
    match r.why {
        Why::NoBackend => {
            maps::count(counter::SOCK_NO_BACKEND, 0);
            maps::count_service(fe.master.svc_port_id, ServiceEvent::DropNoBackend);
            if fe.master.flags & service_flags::NO_ENDPOINTS != 0 {
                // No endpoint anywhere: rejected as kube-proxy's REJECT rule does, so the
                // caller sees ECONNREFUSED instead of the EPERM of a plain refusal.
                // SAFETY: a helper of cgroup programs, with a valid errno.
                unsafe { aya_ebpf::helpers::generated::bpf_set_retval(-ECONNREFUSED) };
            }
        }
        Why::BackendMissing => {
            warn!(
                ctx,
                "slot of {:i}:{} points at a missing backend",
                u32::from_be(fe.key.addr_be),
                u16::from_be(fe.key.port_be)
            );
            maps::count(counter::SOCK_BACKEND_MISSING, 0);
            maps::count_service(fe.master.svc_port_id, ServiceEvent::DropOther);
        }
        Why::SourceRange => {
            maps::count(counter::SOURCE_RANGE_DENIED, 0);
            maps::count_service(fe.master.svc_port_id, ServiceEvent::DropSourceRange);
        }
    }
    REFUSE
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: bpf_get_socket_cookie accepts a bpf_sock_addr context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// connect4/connect6: a connection to a frontend goes to a backend. `Ok` also for addresses
/// that are no frontend of ours (left as they are).
#[inline(always)]
pub fn try_connect<F: Family>(ctx: &SockAddrContext) -> Result<(), Refusal> {
    let Some(fe) = frontend::<F>(ctx) else {
        return Ok(());
    };
    source_allowed::<F>(&fe, bound_source::<F>(ctx))?;
    let chosen = choose(ctx, &fe)?;
    translate::<F>(ctx, &fe, &chosen, cookie(ctx))?;
    maps::count(counter::SOCK_CONNECT_XLATE, 0);
    maps::count_service(fe.master.svc_port_id, ServiceEvent::NewConnection(0));
    Ok(())
}

/// sendmsg4/sendmsg6: a datagram of an unconnected UDP socket to a frontend goes to a backend,
/// the same one as the socket's earlier datagrams while it keeps its slot.
#[inline(always)]
pub fn try_sendmsg<F: Family>(ctx: &SockAddrContext) -> Result<(), Refusal> {
    let Some(fe) = frontend::<F>(ctx) else {
        return Ok(());
    };
    // SAFETY: valid context; the message source is readable for sendmsg.
    source_allowed::<F>(&fe, F::msg_source(unsafe { &*ctx.sock_addr }))?;
    let cookie = cookie(ctx);
    let flow_key = SockKey {
        cookie,
        addr_be: fe.key.addr_be,
        port_be: fe.key.port_be,
        proto: fe.key.proto,
        _pad: 0,
    };
    // An unconnected UDP socket keeps its backend, as a conntrack entry would keep it, for as
    // long as that backend still sits in the same slot of the frontend.
    // SAFETY: value copied out at once.
    if let Some(flow) = unsafe { SOCK_FLOW.get(flow_key).copied() } {
        if flow.slot != 0 && flow.slot <= fe.master.count {
            if let Ok(chosen) = select::in_slot(&fe, flow.slot) {
                if chosen.id == flow.backend_id {
                    translate::<F>(ctx, &fe, &chosen, cookie)?;
                    maps::count(counter::SOCK_FLOW_REUSE, 0);
                    maps::count(counter::SOCK_SENDMSG_XLATE, 0);
                    return Ok(());
                }
            }
        }
    }
    let chosen = choose(ctx, &fe)?;
    // Remember the slot for the socket's next datagrams; an affinity choice carries no slot, so
    // look its backend's slot up.
    let slot = if chosen.slot != 0 {
        chosen.slot
    } else {
        let m = MemberKey {
            frontend: fe.key,
            backend_id: chosen.id,
        };
        // SAFETY: value copied out at once.
        unsafe { MEMBERS.get(m).copied() }.unwrap_or(0) as u16
    };
    let flow = SockFlow {
        backend_id: chosen.id,
        slot,
        _pad: 0,
    };
    // A failed insert (map full) only loses the memory: the next datagram chooses again.
    let _ = SOCK_FLOW.insert(flow_key, flow, 0);
    translate::<F>(ctx, &fe, &chosen, cookie)?;
    maps::count(counter::SOCK_SENDMSG_XLATE, 0);
    maps::count_service(fe.master.svc_port_id, ServiceEvent::NewConnection(0));
    Ok(())
}

/// Replaces a backend peer address with the frontend the socket asked for. Returns whether it did.
#[inline(always)]
fn reverse<F: Family>(ctx: &SockAddrContext) -> bool {
    // SAFETY: valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let family_ok = match F::SCOPE & scope::IPV6 {
        0 => F::map_addr(sa).is_some(),
        _ => sa.user_family == AF_INET6,
    };
    if !family_ok {
        return false;
    }
    let peer = (F::user_addr(sa), sa.user_port as u16);
    let Some((addr, port_be)) = F::recall(cookie(ctx), sa.protocol as u8, peer) else {
        return false;
    };
    // The address and port are writable for recvmsg and getpeername.
    F::set(sa, &addr, port_be);
    true
}

/// recvmsg4/recvmsg6: a datagram's source.
pub fn recvmsg<F: Family>(ctx: &SockAddrContext) {
    if reverse::<F>(ctx) {
        maps::count(counter::SOCK_RECVMSG_REVNAT, 0);
    }
}

/// getpeername4/getpeername6: a connected socket's peer.
pub fn getpeername<F: Family>(ctx: &SockAddrContext) {
    if reverse::<F>(ctx) {
        maps::count(counter::SOCK_GETPEERNAME_REVNAT, 0);
    }
}
