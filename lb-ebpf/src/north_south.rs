//! North-south path on the node's devices: NodePorts, LoadBalancer ingress IPs and external IPs,
//! run by the XDP program or, where XDP cannot deliver, the tc ingress program (hook.rs says
//! what differs). This module only runs the stages, each in its own module:
//!
//! parse → conntrack (ct) → frontend lookup → backend selection (select: affinity, Maglev,
//! slot) → SNAT port (snat; remote backends) → conntrack entries for both directions (ct) →
//! DNAT/SNAT with checksums (nat; the hook's write) → forward (the hook's: FIB + XDP_TX or a
//! redirect; the stack for local backends or unknown routes) → counters. The counters are the
//! `xdp_*` ones whichever hook runs the path. ICMP errors about translated flows take their own
//! way (icmp). A packet the path does not translate ends with a `Stop` (verdict.rs).
use lb_common::{
    affinity_client, backend_flags, config_flags, counter, ct_flags, flow_hash, proto, scope,
    service_flags, Config, CtEntry, CtKey,
};

use crate::{
    affinity, clock, ct,
    flow::NhSlot,
    frag, frontend,
    hook::Hook,
    icmp,
    maps::{self, ServiceEvent},
    parse::{self, Frag, Packet},
    reject, select, snat,
    verdict::Stop,
};

/// The north-south path. `Ok`: the verdict of a packet it translated (its counters written);
/// `Err`: why it stopped, for the entry point to count and act on.
#[inline(always)]
pub fn run<H: Hook>(ctx: &H) -> Result<u32, Stop> {
    let len = ctx.frame_len();
    maps::count(counter::XDP_RX, len);
    let l3 = parse::ipv4(ctx)?;
    if l3.frag == Frag::Later {
        if l3.proto != proto::TCP && l3.proto != proto::UDP {
            return Err(Stop::Pass(counter::XDP_NOT_TCP_UDP));
        }
        return frag::later(ctx, &l3);
    }
    let p = match l3.proto {
        proto::TCP => parse::tcp(ctx, l3)?,
        proto::UDP => parse::udp(ctx, l3)?,
        // A fragmented ICMP error is not read (its quoted header may be cut).
        proto::ICMP if l3.frag == Frag::No => {
            let verdict =
                icmp::translate_error(ctx, &l3).ok_or(Stop::Pass(counter::XDP_NOT_TCP_UDP))?;
            maps::count(counter::XDP_ICMP_ERROR_XLATE, len);
            return Ok(verdict);
        }
        _ => return Err(Stop::Pass(counter::XDP_NOT_TCP_UDP)),
    };
    let key = ct::key(&p);
    let verdict = match ct::follow(&key, &p) {
        Some((e, slot)) => {
            if l3.frag == Frag::First {
                frag::remember(&l3, &p);
            }
            known_flow(ctx, &p, &e, slot, len)?
        }
        None => new_flow(ctx, &p, &key, len)?,
    };
    Ok(verdict)
}

/// A packet of a tracked flow, in either direction: translated with its entry, forwarded with
/// its cached next hop when the flow is confirmed.
#[inline(always)]
fn known_flow<H: Hook>(
    ctx: &H,
    p: &Packet,
    e: &CtEntry,
    slot: NhSlot,
    len: u64,
) -> Result<u32, Stop> {
    ctx.rewrite(p, e)
        .map_err(|_| Stop::drop_other(counter::TC_ERROR, e.svc_port_id))?;
    let reply = e.flags & ct_flags::REPLY != 0;
    if reply {
        maps::count(counter::XDP_REPLY, len);
    } else {
        maps::count(counter::XDP_ESTABLISHED, len);
    }
    maps::count_service_packet(e.svc_port_id, len);
    Ok(ctx.forward_flow(
        &p.l3,
        !reply && e.flags & ct_flags::LOCAL_BACKEND != 0,
        slot,
    ))
}

/// The first packet of a flow (as far as the conntrack knows): to a frontend's backend, tracked
/// in both directions.
#[inline(always)]
fn new_flow<H: Hook>(ctx: &H, p: &Packet, key: &CtKey, len: u64) -> Result<u32, Stop> {
    // NodePorts, LoadBalancer IPs and external IPs; else a ClusterIP, for a packet that no
    // local socket sent (an off-node client routed to the service range, a VM or namespace
    // behind the node): with the internal endpoint set, as kube-proxy serves it.
    let (fe, cluster_ip) = match frontend::lookup(p.daddr, p.dport, p.proto, scope::EXTERNAL) {
        Some(fe) => (fe, false),
        // (Only inside the prefix that covers every ClusterIP: other traffic, the bulk of what
        // a device sees, pays no second lookup.)
        None if maps::config().is_some_and(|c| c.maybe_cluster_ip(p.daddr)) => {
            match frontend::lookup(p.daddr, p.dport, p.proto, scope::INTERNAL) {
                Some(fe) if fe.master.flags & service_flags::CLUSTER_IP != 0 => (fe, true),
                _ => return Err(Stop::Pass(counter::XDP_NO_FRONTEND)),
            }
        }
        None => return Err(Stop::Pass(counter::XDP_NO_FRONTEND)),
    };
    let svc_port_id = fe.master.svc_port_id;
    // loadBalancerSourceRanges (kube-proxy's firewall), before anything else: only
    // LoadBalancer frontends of such Services carry the flag, all others skip the lookup.
    if fe.master.flags & service_flags::SOURCE_RANGES != 0
        && !maps::source_in_ranges(svc_port_id, p.saddr)
    {
        return Err(Stop::Drop {
            reason: counter::SOURCE_RANGE_DENIED,
            svc_port_id,
            event: ServiceEvent::DropSourceRange,
        });
    }
    if fe.master.count == 0 {
        // No endpoint anywhere: kube-proxy's REJECT. Endpoints elsewhere, none for this
        // traffic here (externalTrafficPolicy Local): dropped.
        if fe.master.flags & service_flags::NO_ENDPOINTS != 0 {
            return reject::port_unreachable(ctx, p, svc_port_id, len);
        }
        return Err(Stop::Drop {
            reason: counter::XDP_DROP_NO_BACKEND,
            svc_port_id,
            event: ServiceEvent::DropNoBackend,
        });
    }
    let cfg = maps::config().ok_or(Stop::Pass(counter::XDP_NO_CONFIG))?;
    let now = clock::now_s();
    // Deterministic: the same packet gets the same backend (and SNAT port candidates) on every
    // node, and again after its conntrack entries were evicted. (With session affinity too: a
    // client's next choice after its record expired depends on its next flow, as kube-proxy's
    // fresh random choice would.)
    let hash = flow_hash(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let chosen = if affinity::enabled(&fe.master) {
        let client = affinity::key(&fe.master, affinity_client::ADDR, p.saddr as u64);
        select::with_affinity(&fe, &client, now, || select::by_hash(&fe, hash))
    } else {
        select::by_hash(&fe, hash)
    };
    let Ok(chosen) = chosen else {
        // Counted, not logged: a log call's frame on top of this path's stack exceeds the
        // verifier's 512 bytes.
        return Err(Stop::drop_other(
            counter::XDP_DROP_BACKEND_MISSING,
            svc_port_id,
        ));
    };
    let be = chosen.backend;
    let local = be.flags & backend_flags::LOCAL != 0;
    let snat = masquerade(
        cfg,
        fe.master.flags,
        cluster_ip,
        local,
        cfg.from_local_pod(p.saddr),
    );
    let mut flags = 0;
    if local {
        flags |= ct_flags::LOCAL_BACKEND;
    }
    if snat {
        flags |= ct_flags::SNAT;
    }
    let mut reply_key = CtKey {
        saddr_be: be.addr_be,
        daddr_be: if snat { cfg.node_addr_be } else { p.saddr },
        sport_be: be.port_be,
        dport_be: p.sport,
        proto: p.proto,
        _pad: [0; 3],
    };
    // The source port the backend sees: for SNAT a free port of the node's; otherwise the
    // client's own, unless another flow already holds that four-tuple at the backend (one
    // client port to two frontends that keep the client's address and share a backend): then
    // it is remapped, as Linux NAT does on such a clash.
    if snat {
        reply_key.dport_be = snat::free_port(ctx, cfg, p, &mut reply_key.clone(), hash, now)
            .map_err(|snat::Exhausted| {
                Stop::drop_other(counter::XDP_DROP_SNAT_EXHAUSTED, svc_port_id)
            })?;
    } else if snat::taken(&reply_key, p) {
        reply_key.dport_be =
            snat::remap_port(cfg, p, &reply_key, hash).map_err(|snat::Exhausted| {
                Stop::drop_other(counter::XDP_DROP_SNAT_EXHAUSTED, svc_port_id)
            })?;
    }
    // Replies (backend -> node or client) are translated back to frontend -> client.
    let (state, seq_flags, seq_next) = ct::initial(p);
    let reply = CtEntry {
        nat_saddr_be: p.daddr,
        nat_daddr_be: p.saddr,
        nat_sport_be: p.dport,
        nat_dport_be: p.sport,
        svc_port_id,
        backend_id: chosen.id,
        last_seen_s: now,
        flags: flags | ct_flags::REPLY,
        state,
        _pad: 0,
        seq_next: 0,
    };
    // The client's packets go to the backend, from the node (SNAT) or the client.
    let entry = CtEntry {
        nat_saddr_be: reply_key.daddr_be,
        nat_daddr_be: be.addr_be,
        nat_sport_be: reply_key.dport_be,
        nat_dport_be: be.port_be,
        svc_port_id,
        backend_id: chosen.id,
        last_seen_s: now,
        flags: flags | seq_flags,
        state,
        _pad: 0,
        seq_next,
    };
    if ct::track_new(key, &entry, &reply_key, &reply).is_err() {
        // The packet still goes where the flow's next packet would go (the choice above is a
        // function of the packet); replies need the entries, which the next packet retries.
        maps::count(counter::XDP_STATELESS, len);
    }
    if p.l3.frag == Frag::First {
        frag::remember(&p.l3, p);
    }
    ctx.rewrite(p, &entry)
        .map_err(|_| Stop::drop_other(counter::TC_ERROR, svc_port_id))?;
    maps::count(counter::XDP_NEW_FLOW, len);
    maps::count_service(svc_port_id, ServiceEvent::NewConnection(len));
    Ok(ctx.forward(&p.l3, local))
}

/// Whether a new flow's source is translated to the node (masquerade), so that the backend's
/// replies come back to this node's programs:
/// - a local backend and a source in the node's pod CIDR (a pod or guest on the node's pod
///   bridge): always, whatever the frontend and policy; the reply would otherwise go from pod
///   to pod over the bridge, past every program (kube-proxy's hairpin masquerade, and what
///   br_netfilter does for it).
/// - ClusterIP reached from outside a local socket: unless the source is a local pod (the
///   node's pod CIDR, kube-proxy's rule); a local pod's flow to a remote backend keeps its
///   source, and the replies come back through a device of ours.
/// - NodePort, LoadBalancer IP, external IP, externalTrafficPolicy Local: never (the client's
///   address is the point).
/// - externalTrafficPolicy Cluster: for a remote backend always; for a local one only when the
///   agent cannot guarantee that its replies meet a program of ours whatever interface they
///   leave by (`config_flags::MASQUERADE_LOCAL`); otherwise the local backend sees the client,
///   and the reply is translated on its way out.
///
/// `local_pod`: the source lies in the node's pod CIDR of its family. Both families' paths
/// decide with this one function.
#[inline(always)]
pub fn masquerade(
    cfg: &Config,
    fe_flags: u16,
    cluster_ip: bool,
    local: bool,
    local_pod: bool,
) -> bool {
    if local && local_pod {
        return true;
    }
    if cluster_ip {
        return local || !local_pod;
    }
    if fe_flags & service_flags::EXTERNAL_POLICY_LOCAL != 0 {
        return false;
    }
    !local || cfg.flags & config_flags::MASQUERADE_LOCAL != 0
}
