//! Socket-level load balancing: translate a frontend to a backend once, when a socket connects
//! (TCP, connected UDP) or sends a datagram (unconnected UDP), and translate the backend back to
//! the frontend where the application reads a peer address (recvmsg, getpeername).
use aya_log_ebpf::debug;
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie},
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{
    affinity_client, counter, proto, scope, Backend, ServiceKey, ServiceValue, SockFlow, SockKey,
    SockRevNat,
};

use crate::{
    affinity, clock,
    maps::{self, ServiceEvent, SOCK_FLOW, SOCK_REV_NAT},
};

const AF_INET: u32 = 2;

/// Verdicts of the socket programs: 1 lets the call proceed, 0 refuses it (the caller sees
/// EPERM). recvmsg4 and getpeername4 may only return `ALLOW`.
pub const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// Why a translation was refused.
enum Refusal {
    NoBackend,
    BackendMissing,
}

struct Frontend {
    key: ServiceKey,
    count: u16,
    rev_nat_id: u32,
    master: ServiceValue,
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
    let key = ServiceKey {
        addr_be: sa.user_ip4,
        port_be: sa.user_port as u16,
        proto: p,
        scope: scope::INTERNAL,
        slot: 0,
        _pad: 0,
    };
    let master = maps::service(&key)?;
    Some(Frontend { key, count: master.count, rev_nat_id: master.rev_nat_id, master })
}

/// The backend in `slot` (1-based) of a frontend, with its id.
#[inline(always)]
fn slot_backend(fe: &Frontend, slot: u16) -> Option<(u32, Backend)> {
    let mut key = fe.key;
    key.slot = slot;
    let id = maps::service(&key)?.backend_id;
    Some((id, maps::backend(id)?))
}

/// The backend for a new connection: the client's affinity record when live and usable, else a
/// fresh uniform choice (recorded when the Service asks for affinity). The slot is 0 when the
/// backend came from the affinity record.
#[inline(always)]
fn choose(ctx: &SockAddrContext, fe: &Frontend) -> Result<(u16, u32, Backend), Refusal> {
    if fe.count == 0 {
        return Err(Refusal::NoBackend);
    }
    if !affinity::enabled(&fe.master) {
        return choose_fresh(fe);
    }
    // The client's address is not known at connect time: key on its network namespace.
    // SAFETY: bpf_get_netns_cookie accepts a bpf_sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = affinity::key(&fe.master, affinity_client::NETNS, netns);
    let now = clock::now_s();
    if let Some((id, be)) = affinity::lookup(&fe.key, &fe.master, &key, now) {
        affinity::record(&key, id, now);
        return Ok((0, id, be));
    }
    let chosen = choose_fresh(fe)?;
    affinity::record(&key, chosen.1, now);
    Ok(chosen)
}

#[inline(always)]
fn choose_fresh(fe: &Frontend) -> Result<(u16, u32, Backend), Refusal> {
    // SAFETY: helper without preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = (r % fe.count as u32) as u16 + 1;
    let (id, be) = slot_backend(fe, slot).ok_or(Refusal::BackendMissing)?;
    Ok((slot, id, be))
}

/// Rewrites the destination to the backend and remembers, per socket, which frontend it was.
#[inline(always)]
fn translate(ctx: &SockAddrContext, fe: &Frontend, be: &Backend, cookie: u64) {
    let rev_key = SockKey { cookie, addr_be: be.addr_be, port_be: be.port_be, proto: fe.key.proto, _pad: 0 };
    let rev = SockRevNat {
        addr_be: fe.key.addr_be,
        port_be: fe.key.port_be,
        _pad: 0,
        rev_nat_id: fe.rev_nat_id,
        _pad2: 0,
    };
    // A failed insert (map full) only loses the reverse view; the connection still works.
    let _ = SOCK_REV_NAT.insert(&rev_key, &rev, 0);
    // SAFETY: valid context; both fields are writable for connect4/sendmsg4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = be.addr_be;
        (*ctx.sock_addr).user_port = be.port_be as u32;
    }
}

#[inline(always)]
fn refuse(ctx: &SockAddrContext, fe: &Frontend, r: Refusal) -> i32 {
    match r {
        Refusal::NoBackend => {
            maps::count(counter::SOCK_NO_BACKEND, 0);
            maps::count_service(fe.master.svc_port_id, ServiceEvent::DropNoBackend);
        }
        Refusal::BackendMissing => {
            debug!(ctx, "slot of {:i}:{} points at a missing backend", u32::from_be(fe.key.addr_be), u16::from_be(fe.key.port_be));
            maps::count(counter::SOCK_BACKEND_MISSING, 0);
            maps::count_service(fe.master.svc_port_id, ServiceEvent::DropOther);
        }
    }
    REFUSE
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: bpf_get_socket_cookie accepts a bpf_sock_addr context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

pub fn connect4(ctx: &SockAddrContext) -> i32 {
    let Some(fe) = frontend(ctx) else { return ALLOW };
    match choose(ctx, &fe) {
        Ok((_, _, be)) => {
            translate(ctx, &fe, &be, cookie(ctx));
            maps::count(counter::SOCK_CONNECT_XLATE, 0);
            maps::count_service(fe.master.svc_port_id, ServiceEvent::NewConnection(0));
            ALLOW
        }
        Err(r) => refuse(ctx, &fe, r),
    }
}

pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    let Some(fe) = frontend(ctx) else { return ALLOW };
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
    if let Some(flow) = unsafe { SOCK_FLOW.get(&flow_key).copied() } {
        if flow.slot != 0 && flow.slot <= fe.count {
            if let Some((id, be)) = slot_backend(&fe, flow.slot) {
                if id == flow.backend_id {
                    translate(ctx, &fe, &be, cookie);
                    maps::count(counter::SOCK_FLOW_REUSE, 0);
                    maps::count(counter::SOCK_SENDMSG_XLATE, 0);
                    return ALLOW;
                }
            }
        }
    }
    match choose(ctx, &fe) {
        Ok((slot, id, be)) => {
            // Remember the slot for the socket's next datagrams; an affinity choice carries no
            // slot, so look its backend's slot up.
            let slot = if slot != 0 {
                slot
            } else {
                let m = lb_common::MemberKey { frontend: fe.key, backend_id: id };
                // SAFETY: value copied out at once.
                unsafe { crate::maps::MEMBERS.get(&m).copied() }.unwrap_or(0) as u16
            };
            let flow = SockFlow { backend_id: id, slot, _pad: 0 };
            let _ = SOCK_FLOW.insert(&flow_key, &flow, 0);
            translate(ctx, &fe, &be, cookie);
            maps::count(counter::SOCK_SENDMSG_XLATE, 0);
            maps::count_service(fe.master.svc_port_id, ServiceEvent::NewConnection(0));
            ALLOW
        }
        Err(r) => refuse(ctx, &fe, r),
    }
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
    let Some(rev) = (unsafe { SOCK_REV_NAT.get(&key).copied() }) else { return false };
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
