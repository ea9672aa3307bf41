//! SNAT port choice for new flows to remote backends (externalTrafficPolicy Cluster): the source
//! port on the node address that the backend answers to, as Linux NAT chooses it. The same
//! search remaps the port of a flow that keeps the client's address when another flow already
//! holds its four-tuple at the backend.
//!
//! The first candidate is the client's own port when it lies in the configured range (the
//! range excludes the node's ephemeral ports, so a port of a connection the node opens later
//! never meets a translated flow's), else the client's port folded into the range (so distinct
//! ports of one client get distinct first candidates). Further candidates come from the flow
//! hash. Every choice is a function of the packet: a flow whose entries were evicted gets its
//! port back, on any node.
//!
//! A candidate is free when no live flow holds it (expired flows give their port back; a TCP
//! flow whose backend closed first holds it through the backend's TIME-WAIT, see
//! `ct_state::TCP_TIME_WAIT`) and no socket of the node uses it (a listener on the port, or a
//! connection of the node to the same backend address and port).
use aya_ebpf::{
    helpers::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    EbpfContext,
};
use lb_common::{counter, limits, proto, snat_candidate, Addr6, Config, CtKeyOf};

use crate::{
    ct::{self, CtAddr, Tuple},
    maps,
};

/// No SNAT port is free (or the configured range is empty).
pub struct Exhausted;

/// The first free port (network order) for a new flow `p` whose reply entry is `rkey` with the
/// port as its destination (`rkey`'s port is the candidates' scratch: it ends as the last one
/// tried). Each taken candidate is counted (`XDP_SNAT_COLLISION`, or
/// `XDP_SNAT_SOCKET` when a socket of the node has it); after `limits::SNAT_TRIES` of them the
/// flow gets none.
#[inline(always)]
pub fn free_port<P: Tuple>(
    ctx: &impl EbpfContext,
    cfg: &Config,
    p: &P,
    rkey: &mut CtKeyOf<P::A>,
    hash: u32,
    now: u32,
) -> Result<u16, Exhausted>
where
    P::A: SockLookup,
{
    if cfg.snat_port_max < cfg.snat_port_min {
        return Err(Exhausted);
    }
    let client = u16::from_be(p.sport());
    for i in 0..limits::SNAT_TRIES {
        let port = snat_candidate(i, client, hash, cfg.snat_port_min, cfg.snat_port_max);
        rkey.dport_be = port.to_be();
        if !held(rkey, p, now) {
            if P::A::node_socket(ctx, rkey) {
                maps::count(counter::XDP_SNAT_SOCKET, 0);
                continue;
            }
            if port == client {
                maps::count(counter::XDP_SNAT_PRESERVED, 0);
            }
            return Ok(rkey.dport_be);
        }
        maps::count(counter::XDP_SNAT_COLLISION, 0);
    }
    // Counted by the caller (`XDP_DROP_SNAT_EXHAUSTED`); no log here: a log call's stack
    // frame on top of the XDP path's exceeds the verifier's 512 bytes.
    Err(Exhausted)
}

/// Whether a live flow other than `p`'s holds the reply four-tuple `rkey`. An expired holder
/// gives it up (its entries are removed, counted as `CT_EXPIRED`); a holder that is `p`'s own
/// flow (its other entry was evicted) keeps it for `p`.
#[inline(always)]
fn held<P: Tuple>(rkey: &CtKeyOf<P::A>, p: &P, now: u32) -> bool {
    let Some((e, _)) = ct::lookup(rkey) else {
        return false;
    };
    if ct::same_flow(&e, p.saddr(), p.sport(), p.daddr(), p.dport()) {
        return false;
    }
    if e.expired(e.last_seen_s, now) && ct::flow_expired(rkey, &e, now) {
        maps::count(counter::CT_EXPIRED, 0);
        ct::forget(rkey, &e);
        return false;
    }
    true
}

/// Whether an entry of another flow than `p`'s sits under the reply four-tuple `rkey`, live or
/// not: the cheap first test of a flow that keeps the client's port (`free_port` then judges
/// each candidate as [`held`] does, so an expired holder still gives the port back).
#[inline(always)]
pub fn taken<P: Tuple>(rkey: &CtKeyOf<P::A>, p: &P) -> bool {
    ct::lookup(rkey)
        .is_some_and(|(e, _)| !ct::same_flow(&e, p.saddr(), p.sport(), p.daddr(), p.dport()))
}

/// A port (network order) for a flow that keeps the client's address but whose four-tuple at
/// the backend is [`taken`]: the first SNAT candidate that is not the client's own port, if no
/// other flow has it (one try: such clashes are rare, two in a row rarer). Counted as
/// `XDP_PORT_REMAP`.
#[inline(always)]
pub fn remap_port<P: Tuple>(
    cfg: &Config,
    p: &P,
    reply: &CtKeyOf<P::A>,
    hash: u32,
) -> Result<u16, Exhausted> {
    if cfg.snat_port_max < cfg.snat_port_min {
        return Err(Exhausted);
    }
    let client = u16::from_be(p.sport());
    let mut port = snat_candidate(0, client, hash, cfg.snat_port_min, cfg.snat_port_max);
    if port == client {
        port = snat_candidate(1, client, hash, cfg.snat_port_min, cfg.snat_port_max);
    }
    let mut rkey = *reply;
    rkey.dport_be = port.to_be();
    if port == client || taken(&rkey, p) {
        maps::count(counter::XDP_SNAT_COLLISION, 0);
        return Err(Exhausted);
    }
    maps::count(counter::XDP_PORT_REMAP, 0);
    Ok(rkey.dport_be)
}

/// A family's socket lookup: whether a socket of the node would receive packets of a reply
/// four-tuple (backend -> node:port), a TCP listener or connection, or a UDP socket, on the
/// port.
pub trait SockLookup: CtAddr {
    fn node_socket(ctx: &impl EbpfContext, rkey: &CtKeyOf<Self>) -> bool;
}

/// The tuple of `bpf_sk_lookup_*` for IPv4 (the `ipv4` member of `struct bpf_sock_tuple`).
#[repr(C)]
struct Tuple4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

impl SockLookup for u32 {
    #[inline(always)]
    fn node_socket(ctx: &impl EbpfContext, rkey: &CtKeyOf<u32>) -> bool {
        let mut t = Tuple4 {
            saddr: rkey.saddr_be,
            daddr: rkey.daddr_be,
            sport: rkey.sport_be,
            dport: rkey.dport_be,
        };
        sock_exists(ctx, rkey.proto, &mut t)
    }
}

impl SockLookup for Addr6 {
    #[inline(always)]
    fn node_socket(ctx: &impl EbpfContext, rkey: &CtKeyOf<Addr6>) -> bool {
        // Built in the per-CPU scratch (the IPv6 path's stack is full).
        let Some(s) = maps::NEW_FLOW6.get_ptr_mut(0) else {
            return false;
        };
        // SAFETY: per-CPU value, no concurrent user on this CPU; the tuple field is used by
        // this lookup only.
        let t = unsafe { &mut (*s).sock };
        t.saddr = rkey.saddr_be;
        t.daddr = rkey.daddr_be;
        t.sport = rkey.sport_be;
        t.dport = rkey.dport_be;
        sock_exists(ctx, rkey.proto, t)
    }
}

/// Whether a socket matches the lookup tuple `t` (a `Tuple4` or `Tuple6`, its size telling the
/// kernel which).
#[inline(always)]
fn sock_exists<T>(ctx: &impl EbpfContext, l4: u8, t: &mut T) -> bool {
    let size = core::mem::size_of::<T>() as u32;
    // The network namespace of the device the packet came in on.
    let netns = u32::MAX as u64;
    let tuple = t as *mut T as *mut _;
    // SAFETY: the tuple lives on the stack for the call; a socket found is released at once.
    unsafe {
        let sk = if l4 == proto::TCP {
            bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), tuple, size, netns, 0)
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk as *mut _);
    }
    true
}
