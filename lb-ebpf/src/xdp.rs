//! North-south path on the node's devices: NodePorts, LoadBalancer ingress IPs and external IPs.
//!
//! parse → conntrack → frontend lookup → backend choice → SNAT port (remote backends) →
//! conntrack entries for both directions → DNAT/SNAT with checksums → forward (FIB + XDP_TX or
//! redirect; XDP_PASS for local backends or unknown routes) → counters. ICMP errors about
//! translated flows take their own way (icmp.rs).
use aya_log_ebpf::debug;
use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::XdpContext};
use lb_common::{
    affinity_client, counter, ct_flags, flow_hash, limits, mix32, proto, scope, CtEntry,
    CtKey, ServiceKey,
};

use crate::{
    affinity,
    clock::now_s,
    ct, forward, icmp,
    maps::{self, ServiceEvent, CONNTRACK_NEW},
    nat,
    parse::{self, Closing, Packet},
    verdict::Stop,
};

/// The XDP path. `Ok`: the verdict of a packet it translated (its counters written); `Err`: why
/// it stopped, for the entry point to count and act on.
#[inline(always)]
pub fn try_xdp(ctx: &XdpContext) -> Result<u32, Stop> {
    let len = (ctx.data_end() - ctx.data()) as u64;
    maps::count(counter::XDP_RX, len);
    let l3 = parse::ipv4(ctx)?;
    let p = match l3.proto {
        proto::TCP => parse::tcp(ctx, l3)?,
        proto::UDP => parse::udp(ctx, l3)?,
        proto::ICMP => {
            let verdict = icmp::translate_error(ctx, &l3).ok_or(Stop::Pass(counter::XDP_NOT_TCP_UDP))?;
            maps::count(counter::XDP_ICMP_ERROR_XLATE, len);
            return Ok(verdict);
        }
        _ => return Err(Stop::Pass(counter::XDP_NOT_TCP_UDP)),
    };
    handle(ctx, &p, len)
}

#[inline(always)]
fn handle(ctx: &XdpContext, p: &Packet, len: u64) -> Result<u32, Stop> {
    let key = CtKey {
        saddr_be: p.saddr,
        daddr_be: p.daddr,
        sport_be: p.sport,
        dport_be: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    };
    if let Some((e, unconfirmed)) = ct::lookup(&key) {
        let reply = e.flags & ct_flags::REPLY != 0;
        // A fresh SYN on an old tuple starts a new connection: choose again.
        if reply || !p.syn_only {
            let now = now_s();
            // Confirmation: TCP by the client's first packet after its SYN, UDP by a reply.
            let confirms = if p.proto == proto::TCP { !reply } else { reply };
            if unconfirmed && confirms {
                ct::confirm(&key, &e, now);
            } else {
                ct::touch(&key, unconfirmed, now);
            }
            if p.closing != Closing::No {
                ct::closing(&key, &e, p.closing == Closing::Rst);
            }
            nat::rewrite(p, &e);
            if reply {
                maps::count(counter::XDP_REPLY, len);
            } else {
                maps::count(counter::XDP_ESTABLISHED, len);
            }
            maps::count_service(e.svc_port_id, ServiceEvent::Packet(len));
            return Ok(forward::forward(ctx, &p.l3, !reply && e.flags & ct_flags::LOCAL_BACKEND != 0));
        }
        // The client reuses the four-tuple of an earlier flow: that flow is over; drop its
        // entries (in whichever tier) so that the new one starts unconfirmed and alone.
        ct::forget(&key, &e);
    }
    let skey = ServiceKey {
        addr_be: p.daddr,
        port_be: p.dport,
        proto: p.proto,
        scope: scope::EXTERNAL,
        slot: 0,
        _pad: 0,
    };
    let master = maps::service(&skey).ok_or(Stop::Pass(counter::XDP_NO_FRONTEND))?;
    if master.count == 0 {
        return Err(Stop::Drop {
            reason: counter::XDP_DROP_NO_BACKEND,
            svc_port_id: master.svc_port_id,
            event: ServiceEvent::DropNoBackend,
        });
    }
    let cfg = maps::config().ok_or(Stop::Pass(counter::XDP_NO_CONFIG))?;
    let now = now_s();
    let aff = affinity::enabled(&master)
        .then(|| affinity::key(&master, affinity_client::ADDR, p.saddr as u64));
    // Deterministic: the same packet gets the same backend (and SNAT port candidates) on every
    // node, and again after its conntrack entries were evicted. (With session affinity too: a
    // client's next choice after its record expired depends on its next flow, as kube-proxy's
    // fresh random choice would.)
    let hash = flow_hash(p.saddr, p.daddr, p.sport, p.dport, p.proto);
    let pinned = match &aff {
        Some(k) => affinity::lookup(&skey, &master, k, now),
        None => None,
    };
    let (backend_id, be) = match pinned {
        Some(x) => x,
        None => {
            let backend_id = match maps::maglev(&master, hash) {
                Some(id) => {
                    maps::count(counter::XDP_MAGLEV, 0);
                    id
                }
                None => {
                    // No table (a single backend, or maps written by an older agent).
                    // SAFETY: helper without preconditions.
                    let r = unsafe { bpf_get_prandom_u32() };
                    let mut bkey = skey;
                    bkey.slot = (r % master.count as u32) as u16 + 1;
                    maps::service(&bkey)
                        .map(|v| v.backend_id)
                        .ok_or(Stop::drop_other(counter::XDP_DROP_BACKEND_MISSING, master.svc_port_id))?
                }
            };
            let Some(be) = maps::backend(backend_id) else {
                debug!(ctx, "slot points at missing backend {}", backend_id);
                return Err(Stop::drop_other(counter::XDP_DROP_BACKEND_MISSING, master.svc_port_id));
            };
            (backend_id, be)
        }
    };
    if let Some(k) = &aff {
        affinity::record(k, backend_id, now);
    }
    let local = be.flags & lb_common::backend_flags::LOCAL != 0;
    // Remote backends see the node as the source (externalTrafficPolicy Cluster); local ones
    // see the client, and answer it through this node, where tc egress translates back.
    let mut flags = 0;
    if local {
        flags |= ct_flags::LOCAL_BACKEND;
    } else {
        flags |= ct_flags::SNAT;
    }
    let mut rkey = CtKey {
        saddr_be: be.addr_be,
        daddr_be: if local { p.saddr } else { cfg.node_addr_be },
        sport_be: be.port_be,
        dport_be: p.sport,
        proto: p.proto,
        _pad: [0; 3],
    };
    let rentry = CtEntry {
        nat_saddr_be: p.daddr,
        nat_daddr_be: p.saddr,
        nat_sport_be: p.dport,
        nat_dport_be: p.sport,
        svc_port_id: master.svc_port_id,
        backend_id,
        last_seen_s: now,
        flags: flags | ct_flags::REPLY,
        _pad: 0,
    };
    // Whether the conntrack refused an insert (not a collision): translate statelessly.
    let mut stateless = false;
    if local {
        stateless = CONNTRACK_NEW.insert(&rkey, &rentry, 0).is_err();
    } else {
        let min = cfg.snat_port_min as u32;
        let range = (cfg.snat_port_max as u32).wrapping_sub(min).wrapping_add(1);
        if cfg.snat_port_max < cfg.snat_port_min || range == 0 {
            return Err(Stop::drop_other(counter::XDP_DROP_SNAT_EXHAUSTED, master.svc_port_id));
        }
        let start = mix32(hash ^ 0x5bd1_e995);
        let mut found = false;
        for i in 0..limits::SNAT_TRIES {
            let port = (min + (start.wrapping_add(i.wrapping_mul(4099)) % range)) as u16;
            rkey.dport_be = port.to_be();
            // A candidate is free when neither map holds it, when the entry holding it is this
            // very flow's (its other entry was evicted), or when it belongs to a TCP flow the
            // backend closed and that has been idle since (its entries are dropped first).
            let taken = match ct::lookup(&rkey) {
                Some((e, _)) if ct::same_flow(&e, p.saddr, p.sport, p.daddr, p.dport) => false,
                Some((e, _)) if ct::reusable(&e, now) => {
                    ct::forget(&rkey, &e);
                    false
                }
                Some(_) => true,
                None => false,
            };
            if !taken {
                found = true;
                // Not a collision (we checked): a refusal is the map's.
                stateless = CONNTRACK_NEW.insert(&rkey, &rentry, 0).is_err();
                break;
            }
            maps::count(counter::XDP_SNAT_COLLISION, 0);
        }
        if !found {
            debug!(ctx, "SNAT ports exhausted towards {:i}:{}", u32::from_be(be.addr_be), u16::from_be(be.port_be));
            return Err(Stop::drop_other(counter::XDP_DROP_SNAT_EXHAUSTED, master.svc_port_id));
        }
    }
    let fentry = CtEntry {
        nat_saddr_be: rkey.daddr_be,
        nat_daddr_be: be.addr_be,
        nat_sport_be: rkey.dport_be,
        nat_dport_be: be.port_be,
        svc_port_id: master.svc_port_id,
        backend_id,
        last_seen_s: now,
        flags,
        _pad: 0,
    };
    if !stateless && CONNTRACK_NEW.insert(&key, &fentry, 0).is_err() {
        stateless = true;
    }
    if stateless {
        // The packet still goes where the flow's next packet would go (the choice above is a
        // function of the packet); replies need the entries, which the next packet retries.
        debug!(ctx, "conntrack insert refused: translating statelessly");
        maps::count(counter::XDP_STATELESS, len);
    }
    nat::rewrite(p, &fentry);
    maps::count(counter::XDP_NEW_FLOW, len);
    maps::count_service(master.svc_port_id, ServiceEvent::NewConnection(len));
    Ok(forward::forward(ctx, &p.l3, local))
}
