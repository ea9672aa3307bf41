//! Socket-level load balancing: translate a frontend to a backend once, when a socket connects
//! (TCP, connected UDP) or sends a datagram (unconnected UDP), and translate the backend back to
//! the frontend where the application reads a peer address (recvmsg, getpeername).
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::warn;
use lb_common::{
    affinity_client, counter, proto, scope, service_flags, MemberKey, SockFlow, SockKey, SockRevNat,
};

use crate::{
    affinity, clock,
    frontend::{self, Frontend},
    maps::{self, ServiceEvent, MEMBERS, SOCK_FLOW, SOCK_REV_NAT},
    select::{self, Chosen, Missing},
};

const AF_INET: u32 = 2;
const ECONNREFUSED: i32 = 111;

/// Verdicts of the socket programs: 1 lets the call proceed, 0 refuses it (the caller sees
/// EPERM). recvmsg4 and getpeername4 may only return `ALLOW`.
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
fn source_allowed(fe: &Frontend, src_be: u32) -> Result<(), Refusal> {
    let flags = fe.master.flags;
    if flags & service_flags::SOURCE_RANGES == 0 {
        return Ok(());
    }
    let allowed = if src_be == 0 {
        flags & service_flags::ALLOW_FROM_NODE != 0
    } else {
        maps::source_in_ranges(fe.master.svc_port_id, src_be)
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

/// The source address a connecting socket is bound to (0: not bound yet).
#[inline(always)]
fn bound_source(ctx: &SockAddrContext) -> u32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr whose `sk` is a valid socket for the
    // program's lifetime (connect4 and sendmsg4 both have one).
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() {
            return 0;
        }
        (*sk).src_ip4
    }
}

/// The frontend a socket address names, if it is one of ours.
#[inline(always)]
fn frontend(ctx: &SockAddrContext) -> Option<Frontend> {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.user_family != AF_INET {
        return None;
    }
    let p = sa.protocol as u8;
    if p != proto::TCP && p != proto::UDP {
        return None;
    }
    frontend::lookup(sa.user_ip4, sa.user_port as u16, p, scope::INTERNAL)
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
fn translate(ctx: &SockAddrContext, fe: &Frontend, chosen: &Chosen, cookie: u64) {
    let be = &chosen.backend;
    let rev_key = SockKey {
        cookie,
        addr_be: be.addr_be,
        port_be: be.port_be,
        proto: fe.key.proto,
        _pad: 0,
    };
    let rev = SockRevNat {
        addr_be: fe.key.addr_be,
        port_be: fe.key.port_be,
        _pad: 0,
        rev_nat_id: fe.master.rev_nat_id,
        _pad2: 0,
    };
    // A failed insert (map full) only loses the reverse view; the connection still works.
    let _ = SOCK_REV_NAT.insert(rev_key, rev, 0);
    // SAFETY: valid context; both fields are writable for connect4/sendmsg4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = be.addr_be;
        (*ctx.sock_addr).user_port = be.port_be as u32;
    }
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

/// connect4: a connection to a frontend goes to a backend. `Ok` also for addresses that are no
/// frontend of ours (left as they are).
#[inline(always)]
pub fn try_connect4(ctx: &SockAddrContext) -> Result<(), Refusal> {
    let Some(fe) = frontend(ctx) else {
        return Ok(());
    };
    source_allowed(&fe, bound_source(ctx))?;
    let chosen = choose(ctx, &fe)?;
    translate(ctx, &fe, &chosen, cookie(ctx));
    maps::count(counter::SOCK_CONNECT_XLATE, 0);
    maps::count_service(fe.master.svc_port_id, ServiceEvent::NewConnection(0));
    Ok(())
}

/// sendmsg4: a datagram of an unconnected UDP socket to a frontend goes to a backend, the same
/// one as the socket's earlier datagrams while it keeps its slot.
#[inline(always)]
pub fn try_sendmsg4(ctx: &SockAddrContext) -> Result<(), Refusal> {
    let Some(fe) = frontend(ctx) else {
        return Ok(());
    };
    // The datagram's source: an IP_PKTINFO address, else the socket's bound one (0: unbound).
    // SAFETY: valid context; msg_src_ip4 is readable for sendmsg4.
    source_allowed(&fe, unsafe { (*ctx.sock_addr).msg_src_ip4 })?;
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
                    translate(ctx, &fe, &chosen, cookie);
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
    translate(ctx, &fe, &chosen, cookie);
    maps::count(counter::SOCK_SENDMSG_XLATE, 0);
    maps::count_service(fe.master.svc_port_id, ServiceEvent::NewConnection(0));
    Ok(())
}

/// Replaces a backend peer address with the frontend the socket asked for. Returns whether it did.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) -> bool {
    // SAFETY: valid context.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.user_family != AF_INET {
        return false;
    }
    let key = SockKey {
        cookie: cookie(ctx),
        addr_be: sa.user_ip4,
        port_be: sa.user_port as u16,
        proto: sa.protocol as u8,
        _pad: 0,
    };
    // SAFETY: value copied out at once.
    let Some(rev) = (unsafe { SOCK_REV_NAT.get(key).copied() }) else {
        return false;
    };
    // SAFETY: user_ip4/user_port are writable for recvmsg4/getpeername4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = rev.addr_be;
        (*ctx.sock_addr).user_port = rev.port_be as u32;
    }
    true
}

pub fn recvmsg4(ctx: &SockAddrContext) {
    if reverse(ctx) {
        maps::count(counter::SOCK_RECVMSG_REVNAT, 0);
    }
}

pub fn getpeername4(ctx: &SockAddrContext) {
    if reverse(ctx) {
        maps::count(counter::SOCK_GETPEERNAME_REVNAT, 0);
    }
}
