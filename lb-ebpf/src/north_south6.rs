//! The IPv6 north-south path: NodePorts, LoadBalancer IPs and external IPs reached over IPv6,
//! run by `lb_xdp6` and `lb_tc_ingress6`, which `lb_xdp` and `lb_tc_ingress` tail-call for
//! IPv6 frames (each family's program is verified on its own: the IPv4 one is close to the
//! verifier's budget). The stages are the IPv4 path's (north_south.rs), with the family's own
//! parse (parse6), conntrack maps (the same `ct` code over `Addr6` keys), frontend lookup
//! through the address's handle (`map_name::ADDR6`, scope `EXTERNAL6`), NAT (no IPv4 header
//! checksum; the pseudo-header's 128-bit addresses in the L4 checksum) and forward (FIB
//! AF_INET6, hop limit), in hook6.rs.
//!
//! A new flow to a Service port without any endpoint is answered with an ICMPv6 port
//! unreachable (reject.rs), as kube-proxy's REJECT. ClusterIPs reached from outside a local
//! socket are served as on the IPv4 path, and who is masqueraded follows the same rules with
//! the node's IPv6 pod CIDR. Not yet on this path (passed untranslated, each counted):
//! extension headers and fragments.
use lb_common::{
    affinity_client, backend_flags, counter, ct_flags, flow_hash6, scope, service_flags, CtEntry6,
    CtKey6, CtValue6,
};

use crate::{
    affinity, clock, ct,
    flow::{NhSlot, Packet6},
    hook6::Hook6,
    maps::{self, Choice6, ServiceEvent},
    parse6, reject, select, snat,
    verdict::Stop,
};

/// Returned by [`tracked`] for a packet that starts a new flow (no verdict of XDP or tc).
const NEW_FLOW: u32 = u32::MAX;

/// What [`choose`] found for a new flow.
enum Chosen {
    /// A backend, left in the scratch value.
    Backend,
    /// None: the Service port has no endpoint anywhere, and the client gets kube-proxy's
    /// REJECT.
    Reject { svc_port_id: u32 },
}

/// The IPv6 north-south path (see `north_south::run`); returns the verdict, its reason
/// counted. The known-flow path and both halves of a new flow's are BPF functions of their own
/// ([`tracked`], [`choose`], [`establish`]): each
/// gets its own stack frame, which 128-bit addresses fill twice as fast as IPv4's.
#[inline(always)]
pub fn run<H: Hook6>(ctx: &H) -> u32 {
    let len = ctx.frame_len();
    maps::count(counter::XDP_RX, len);
    maps::count(counter::XDP_IPV6, len);
    let Some(s) = maps::PACKET6.get_ptr_mut(0) else {
        return Stop::Pass(counter::XDP_NO_CONFIG6).act(ctx);
    };
    // SAFETY: per-CPU value, no concurrent user on this CPU; `packet` writes every field the
    // stages read before they read it.
    let s = unsafe { &mut *s };
    if let Err(stop) = parse6::packet(ctx, &mut s.p) {
        // An ICMPv6 error about a translated flow is translated too (icmp6.rs).
        if let Stop::Pass(counter::XDP_ICMPV6_PASS) = stop {
            if let Some(verdict) = crate::icmp6::translate_error(ctx) {
                return verdict;
            }
        }
        return stop.act(ctx);
    }
    s.key = ct::key(&s.p);
    let verdict = tracked(ctx, &s.p, &s.key);
    if verdict != NEW_FLOW {
        return verdict;
    }
    // A new flow, in two BPF functions of their own (each frame counts on top of this one's):
    // the backend's choice, then the flow's entries and the translation.
    match choose(&s.p) {
        Ok(Chosen::Backend) => {}
        Ok(Chosen::Reject { svc_port_id }) => {
            return reject::port_unreachable6(ctx, &s.p, svc_port_id, len)
        }
        Err(stop) => return stop.act(ctx),
    }
    match establish(ctx, &s.p, &s.key, len) {
        Ok(v) => v,
        Err(stop) => stop.act(ctx),
    }
}

/// A packet of a tracked flow, in either direction: its verdict, or [`NEW_FLOW`].
#[inline(never)]
fn tracked<H: Hook6>(ctx: &H, p: &Packet6, key: &CtKey6) -> u32 {
    let Some((e, slot)) = ct::follow(key, p) else {
        return NEW_FLOW;
    };
    match known_flow(ctx, p, &e, slot, ctx.frame_len()) {
        Ok(v) => v,
        Err(stop) => stop.act(ctx),
    }
}

#[inline(always)]
fn known_flow<H: Hook6>(
    ctx: &H,
    p: &Packet6,
    e: &CtEntry6,
    slot: NhSlot,
    len: u64,
) -> Result<u32, Stop> {
    ctx.rewrite6(p, e)
        .map_err(|_| Stop::drop_other(counter::TC_ERROR, e.svc_port_id))?;
    let reply = e.flags & ct_flags::REPLY != 0;
    if reply {
        maps::count(counter::XDP_REPLY, len);
    } else {
        maps::count(counter::XDP_ESTABLISHED, len);
    }
    maps::count_service_packet(e.svc_port_id, len);
    Ok(ctx.forward6(!reply && e.flags & ct_flags::LOCAL_BACKEND != 0, slot))
}

/// The first packet of a flow, first half: its IPv6 external frontend and the backend, left in
/// the scratch value (`maps::NewFlow6`: `reply_key` with the backend's address and port as
/// its source, and `choice`).
#[inline(never)]
fn choose(p: &Packet6) -> Result<Chosen, Stop> {
    // Only addresses some frontend or backend uses have a handle: other traffic stops here.
    let handle = maps::addr6_handle(&p.daddr).ok_or(Stop::Pass(counter::XDP_NO_FRONTEND))?;
    // NodePorts, LoadBalancer IPs and external IPs; else a ClusterIP, for a packet that no
    // local socket sent, with the internal endpoint set (as north_south.rs; the handle lookup
    // already kept out every address that is no Service's or endpoint's).
    let (fe, cluster_ip) = match crate::frontend::lookup(handle, p.dport, p.proto, scope::EXTERNAL6)
    {
        Some(fe) => (fe, false),
        None => match crate::frontend::lookup(handle, p.dport, p.proto, scope::INTERNAL6) {
            Some(fe) if fe.master.flags & service_flags::CLUSTER_IP != 0 => (fe, true),
            _ => return Err(Stop::Pass(counter::XDP_NO_FRONTEND)),
        },
    };
    let svc_port_id = fe.master.svc_port_id;
    if fe.master.flags & service_flags::SOURCE_RANGES != 0
        && !maps::source_in_ranges6(svc_port_id, &p.saddr)
    {
        return Err(Stop::Drop {
            reason: counter::SOURCE_RANGE_DENIED,
            svc_port_id,
            event: ServiceEvent::DropSourceRange,
        });
    }
    if fe.master.count == 0 {
        // No endpoint anywhere: kube-proxy's REJECT (reject.rs). Endpoints elsewhere, none
        // for this traffic here (externalTrafficPolicy Local): dropped.
        if fe.master.flags & service_flags::NO_ENDPOINTS != 0 {
            return Ok(Chosen::Reject { svc_port_id });
        }
        return Err(Stop::Drop {
            reason: counter::XDP_DROP_NO_BACKEND,
            svc_port_id,
            event: ServiceEvent::DropNoBackend,
        });
    }
    let cfg = maps::config().ok_or(Stop::Pass(counter::XDP_NO_CONFIG))?;
    let scratch = maps::NEW_FLOW6
        .get_ptr_mut(0)
        .ok_or(Stop::Pass(counter::XDP_NO_CONFIG6))?;
    let now = clock::now_s();
    let hash = flow_hash6(&p.saddr, &p.daddr, p.sport, p.dport, p.proto);
    let chosen = if affinity::enabled(&fe.master) {
        let client = affinity::key(
            &fe.master,
            affinity_client::ADDR6,
            affinity_client::client6(&p.saddr),
        );
        select::with_affinity(&fe, &client, now, || select::by_hash(&fe, hash))
    } else {
        select::by_hash(&fe, hash)
    };
    let missing = || Stop::drop_other(counter::XDP_DROP_BACKEND_MISSING, svc_port_id);
    let chosen = chosen.map_err(|_| missing())?;
    let be = chosen.backend;
    if be.flags & backend_flags::IPV6 == 0 {
        return Err(missing());
    }
    let be_addr = maps::addr6_of(be.addr_be).ok_or_else(missing)?;
    let local = be.flags & backend_flags::LOCAL != 0;
    // Who is masqueraded: IPv4's rules (`north_south::masquerade`), with the node's IPv6 pod
    // CIDR.
    let local_pod = maps::config6().is_some_and(|c| c.from_local_pod(&p.saddr));
    let snat = crate::north_south::masquerade(cfg, fe.master.flags, cluster_ip, local, local_pod);
    let mut flags = 0;
    if local {
        flags |= ct_flags::LOCAL_BACKEND;
    }
    // SAFETY: per-CPU value, no concurrent user on this CPU.
    let s = unsafe { &mut *scratch };
    s.reply_key = CtKey6 {
        saddr_be: be_addr,
        daddr_be: p.saddr,
        sport_be: be.port_be,
        dport_be: p.sport,
        proto: p.proto,
        _pad: [0; 3],
    };
    s.choice = Choice6 {
        svc_port_id,
        backend_id: chosen.id,
        hash,
        now,
        flags,
        snat: snat as u8,
        _pad: 0,
    };
    Ok(Chosen::Backend)
}

/// The first packet of a flow, second half: the port the backend sees, both conntrack entries,
/// the translation and the verdict.
#[inline(never)]
fn establish<H: Hook6>(ctx: &H, p: &Packet6, key: &CtKey6, len: u64) -> Result<u32, Stop> {
    let cfg = maps::config().ok_or(Stop::Pass(counter::XDP_NO_CONFIG))?;
    // The entries are built in a per-CPU scratch value (see `maps::NewFlow6`), where
    // `choose` left its choice.
    let scratch = maps::NEW_FLOW6
        .get_ptr_mut(0)
        .ok_or(Stop::Pass(counter::XDP_NO_CONFIG6))?;
    // SAFETY: per-CPU value, no concurrent user on this CPU.
    let s = unsafe { &mut *scratch };
    let Choice6 {
        svc_port_id,
        backend_id,
        hash,
        now,
        mut flags,
        snat,
        ..
    } = s.choice;
    if snat != 0 {
        flags |= ct_flags::SNAT;
        s.reply_key.daddr_be = maps::config6()
            .ok_or(Stop::Pass(counter::XDP_NO_CONFIG6))?
            .node_addr;
        s.reply_key.dport_be = snat::free_port(ctx, cfg, p, &mut s.reply_key, hash, now).map_err(
            |snat::Exhausted| Stop::drop_other(counter::XDP_DROP_SNAT_EXHAUSTED, svc_port_id),
        )?;
    } else if snat::taken(&s.reply_key, p) {
        s.reply_key.dport_be =
            snat::remap_port(cfg, p, &s.reply_key, hash).map_err(|snat::Exhausted| {
                Stop::drop_other(counter::XDP_DROP_SNAT_EXHAUSTED, svc_port_id)
            })?;
    }
    let (state, seq_flags, seq_next) = ct::initial(p);
    // Replies (backend -> node or client) are translated back to frontend -> client.
    s.reply = CtValue6::new(CtEntry6 {
        nat_saddr_be: p.daddr,
        nat_daddr_be: p.saddr,
        nat_sport_be: p.dport,
        nat_dport_be: p.sport,
        svc_port_id,
        backend_id,
        last_seen_s: now,
        flags: flags | ct_flags::REPLY,
        state,
        _pad: 0,
        seq_next: 0,
    });
    // The client's packets go to the backend, from the node (SNAT) or the client.
    s.entry = CtValue6::new(CtEntry6 {
        nat_saddr_be: s.reply_key.daddr_be,
        nat_daddr_be: s.reply_key.saddr_be,
        nat_sport_be: s.reply_key.dport_be,
        nat_dport_be: s.reply_key.sport_be,
        svc_port_id,
        backend_id,
        last_seen_s: now,
        flags: flags | seq_flags,
        state,
        _pad: 0,
        seq_next,
    });
    if ct::track_new_values(key, &s.entry, &s.reply_key, &s.reply).is_err() {
        maps::count(counter::XDP_STATELESS, len);
    }
    ctx.rewrite6(p, &s.entry.e)
        .map_err(|_| Stop::drop_other(counter::TC_ERROR, svc_port_id))?;
    maps::count(counter::XDP_NEW_FLOW, len);
    maps::count_service(svc_port_id, ServiceEvent::NewConnection(len));
    Ok(ctx.forward6(flags & ct_flags::LOCAL_BACKEND != 0, NhSlot::NONE))
}
