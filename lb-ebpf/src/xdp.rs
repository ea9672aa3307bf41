//! North-south path on the node's devices: NodePorts, LoadBalancer ingress IPs and external IPs.
//!
//! parse → conntrack → frontend lookup → backend choice → SNAT port (remote backends) →
//! conntrack entries for both directions → DNAT/SNAT with checksums → forward (FIB + XDP_TX or
//! redirect; XDP_PASS for local backends or unknown routes) → counters.
use aya_log_ebpf::debug;
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup, bpf_get_prandom_u32, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    affinity_client, counter, ct_flags, flow_hash, limits, mix32, proto, scope, CtEntry,
    CtKey, ServiceKey,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    affinity,
    clock::now_s,
    csum, ct,
    maps::{self, ServiceEvent, CONNTRACK_NEW},
    parse::ptr_at,
};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// More-fragments flag and fragment offset bits of the IPv4 `frags` field (host order).
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const AF_INET: u8 = 2;
/// Offsets of the checksum field inside the TCP and UDP headers.
const TCP_CHECK_OFF: usize = 16;
const UDP_CHECK_OFF: usize = 6;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const CLOSING_FIN: u8 = 1;
const CLOSING_RST: u8 = 2;
const TCP_FLAG_ACK: u8 = 0x10;

/// A parsed TCP/UDP over IPv4 packet.
struct Packet {
    l4_off: usize,
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    /// A TCP SYN without ACK: the start of a new connection.
    syn_only: bool,
    /// 0, or CLOSING_FIN / CLOSING_RST: the sender is closing.
    closing: u8,
}

/// Not a counter: `parse` found ICMP, which `icmp_error` looks at before counting.
const ICMP_SEEN: u32 = u32::MAX;

pub fn process(ctx: &XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    maps::count(counter::XDP_RX, len);
    match parse(ctx) {
        Ok(p) => handle(ctx, &p, len),
        Err(ICMP_SEEN) => match icmp_error(ctx) {
            Some(verdict) => {
                maps::count(counter::XDP_ICMP_ERROR_XLATE, len);
                verdict
            }
            None => {
                maps::count(counter::XDP_NOT_TCP_UDP, len);
                xdp_action::XDP_PASS
            }
        },
        Err(reason) => {
            maps::count(reason, len);
            xdp_action::XDP_PASS
        }
    }
}

/// Parses the frame; the error is the counter that says why it is passed untouched.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Packet, u32> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(counter::XDP_TRUNCATED_ETH)?;
    // SAFETY: bounds checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return Err(counter::XDP_NON_IPV4);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN).ok_or(counter::XDP_TRUNCATED_IPV4)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Err(counter::XDP_BAD_IPV4);
    }
    let hdr_len = ihl * 4;
    if hdr_len > Ipv4Hdr::LEN {
        if ptr_at::<u8>(ctx, EthHdr::LEN + hdr_len - 1).is_none() {
            return Err(counter::XDP_TRUNCATED_IPV4);
        }
        maps::count(counter::XDP_IPV4_OPTIONS, 0);
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & (IP_MF | IP_OFFSET) != 0 {
        return Err(counter::XDP_FRAGMENT);
    }
    let l4_off = EthHdr::LEN + hdr_len;
    let (sport, dport, syn_only, closing) = match ip.proto {
        proto::TCP => {
            let tcp = ptr_at::<TcpHdr>(ctx, l4_off).ok_or(counter::XDP_TRUNCATED_L4)?;
            // SAFETY: bounds checked by ptr_at; byte 13 of the TCP header holds the flags.
            let (s, d, flags) = unsafe {
                ((*tcp).source, (*tcp).dest, *((tcp as *const u8).add(13)))
            };
            let syn_only = flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
            let closing = if flags & TCP_FLAG_RST != 0 {
                CLOSING_RST
            } else if flags & TCP_FLAG_FIN != 0 {
                CLOSING_FIN
            } else {
                0
            };
            (u16::from_ne_bytes(s), u16::from_ne_bytes(d), syn_only, closing)
        }
        proto::UDP => {
            let udp = ptr_at::<UdpHdr>(ctx, l4_off).ok_or(counter::XDP_TRUNCATED_L4)?;
            // SAFETY: bounds checked by ptr_at.
            let (s, d) = unsafe { ((*udp).src, (*udp).dst) };
            (u16::from_ne_bytes(s), u16::from_ne_bytes(d), false, 0)
        }
        proto::ICMP => return Err(ICMP_SEEN),
        _ => return Err(counter::XDP_NOT_TCP_UDP),
    };
    Ok(Packet {
        l4_off,
        proto: ip.proto,
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport,
        dport,
        syn_only,
        closing,
    })
}


fn handle(ctx: &XdpContext, p: &Packet, len: u64) -> u32 {
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
            if p.closing != 0 {
                ct::closing(&key, &e, p.closing == CLOSING_RST);
            }
            if rewrite(ctx, p, &e).is_err() {
                return xdp_action::XDP_PASS;
            }
            maps::count(if reply { counter::XDP_REPLY } else { counter::XDP_ESTABLISHED }, len);
            maps::count_service(e.svc_port_id, ServiceEvent::Packet(len));
            return forward(ctx, !reply && e.flags & ct_flags::LOCAL_BACKEND != 0);
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
    let Some(master) = maps::service(&skey) else {
        maps::count(counter::XDP_NO_FRONTEND, len);
        return xdp_action::XDP_PASS;
    };
    if master.count == 0 {
        maps::count(counter::XDP_DROP_NO_BACKEND, len);
        maps::count_service(master.svc_port_id, ServiceEvent::DropNoBackend);
        return xdp_action::XDP_DROP;
    }
    let Some(cfg) = maps::config() else {
        maps::count(counter::XDP_NO_CONFIG, len);
        return xdp_action::XDP_PASS;
    };
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
                    let Some(id) = maps::service(&bkey).map(|v| v.backend_id) else {
                        maps::count(counter::XDP_DROP_BACKEND_MISSING, len);
                        maps::count_service(master.svc_port_id, ServiceEvent::DropOther);
                        return xdp_action::XDP_DROP;
                    };
                    id
                }
            };
            let Some(be) = maps::backend(backend_id) else {
                debug!(ctx, "slot points at missing backend {}", backend_id);
                maps::count(counter::XDP_DROP_BACKEND_MISSING, len);
                maps::count_service(master.svc_port_id, ServiceEvent::DropOther);
                return xdp_action::XDP_DROP;
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
            maps::count(counter::XDP_DROP_SNAT_EXHAUSTED, len);
            maps::count_service(master.svc_port_id, ServiceEvent::DropOther);
            return xdp_action::XDP_DROP;
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
                if let Err(err) = CONNTRACK_NEW.insert(&rkey, &rentry, 0) {
                    // Not a collision (we checked): the map refused.
                    let _ = err;
                    stateless = true;
                }
                break;
            }
            maps::count(counter::XDP_SNAT_COLLISION, 0);
        }
        if !found {
            debug!(ctx, "SNAT ports exhausted towards {:i}:{}", u32::from_be(be.addr_be), u16::from_be(be.port_be));
            maps::count(counter::XDP_DROP_SNAT_EXHAUSTED, len);
            maps::count_service(master.svc_port_id, ServiceEvent::DropOther);
            return xdp_action::XDP_DROP;
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
    if rewrite(ctx, p, &fentry).is_err() {
        return xdp_action::XDP_PASS;
    }
    maps::count(counter::XDP_NEW_FLOW, len);
    maps::count_service(master.svc_port_id, ServiceEvent::NewConnection(len));
    forward(ctx, local)
}

/// Writes the entry's addresses and ports into the packet, updating the IPv4 and L4 checksums.
#[inline(always)]
fn rewrite(ctx: &XdpContext, p: &Packet, e: &CtEntry) -> Result<(), ()> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN).ok_or(())?;
    let check_off = p.l4_off + if p.proto == proto::TCP { TCP_CHECK_OFF } else { UDP_CHECK_OFF };
    let l4check = ptr_at::<[u8; 2]>(ctx, check_off).ok_or(())?;
    let ports = ptr_at::<[u8; 4]>(ctx, p.l4_off).ok_or(())?;
    // SAFETY: every pointer was bounds checked above.
    unsafe {
        let mut ipc = u16::from_ne_bytes((*ip).check);
        ipc = csum::replace4(ipc, p.saddr, e.nat_saddr_be);
        ipc = csum::replace4(ipc, p.daddr, e.nat_daddr_be);
        (*ip).check = ipc.to_ne_bytes();
        (*ip).src_addr = e.nat_saddr_be.to_ne_bytes();
        (*ip).dst_addr = e.nat_daddr_be.to_ne_bytes();

        let old = u16::from_ne_bytes(*l4check);
        // A UDP checksum of 0 means "none": leave it so.
        if !(p.proto == proto::UDP && old == 0) {
            let mut c = csum::replace4(old, p.saddr, e.nat_saddr_be);
            c = csum::replace4(c, p.daddr, e.nat_daddr_be);
            c = csum::replace2(c, p.sport, e.nat_sport_be);
            c = csum::replace2(c, p.dport, e.nat_dport_be);
            if p.proto == proto::UDP && c == 0 {
                c = 0xffff;
            }
            *l4check = c.to_ne_bytes();
        }
        let sp = e.nat_sport_be.to_ne_bytes();
        let dp = e.nat_dport_be.to_ne_bytes();
        *ports = [sp[0], sp[1], dp[0], dp[1]];
    }
    Ok(())
}

/// Sends a translated packet on: to the stack for local backends, else by FIB lookup out of a
/// device (XDP_TX when it is the receiving one), else to the stack.
#[inline(always)]
fn forward(ctx: &XdpContext, to_local_backend: bool) -> u32 {
    if to_local_backend {
        maps::count(counter::XDP_TRANSLATED_PASS, 0);
        return xdp_action::XDP_PASS;
    }
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN))
    else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: zeroed plain-data struct.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    // SAFETY: bounds checked pointers.
    let ttl = unsafe {
        fib.family = AF_INET;
        fib.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
        fib.l4_protocol = (*ip).proto;
        (*ip).ttl
    };
    if ttl <= 1 {
        maps::count(counter::XDP_TRANSLATED_PASS, 0);
        return xdp_action::XDP_PASS; // let the stack answer with Time Exceeded
    }
    // SAFETY: XDP context, 64-byte ingress_ifindex read.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    fib.ifindex = ingress;
    // SAFETY: valid context and params.
    let rc = unsafe {
        bpf_fib_lookup(ctx.as_ptr(), &mut fib, core::mem::size_of::<FibParams>() as i32, 0)
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        maps::count(counter::XDP_TRANSLATED_PASS, 0);
        return xdp_action::XDP_PASS;
    }
    // SAFETY: bounds checked pointers; TTL and protocol share one 16-bit checksum word.
    unsafe {
        let word = ip as *mut u8;
        let old = u16::from_ne_bytes([*word.add(8), *word.add(9)]);
        (*ip).ttl = ttl - 1;
        let new = u16::from_ne_bytes([*word.add(8), *word.add(9)]);
        (*ip).check = csum::replace2(u16::from_ne_bytes((*ip).check), old, new).to_ne_bytes();
        (*eth).dst_addr = fib.dmac;
        (*eth).src_addr = fib.smac;
    }
    if fib.ifindex == ingress {
        maps::count(counter::XDP_TX, 0);
        xdp_action::XDP_TX
    } else {
        maps::count(counter::XDP_REDIRECT, 0);
        // SAFETY: helper without preconditions.
        unsafe { bpf_redirect(fib.ifindex, 0) as u32 }
    }
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_HDR_LEN: usize = 8;

/// Translates an ICMP error (destination unreachable, including fragmentation needed, or time
/// exceeded) that quotes a packet of a translated flow, so path MTU discovery and fast failures
/// work through the load balancer. The quoted packet S->D belongs to a flow whose opposite
/// direction D->S has a conntrack entry rewriting it to (nat_s -> nat_d); so the quoted packet is
/// rewritten to nat_d -> nat_s and the error is sent to nat_d. Returns `None` (not ours) to pass
/// the packet untouched.
#[inline(always)]
fn icmp_error(ctx: &XdpContext) -> Option<u32> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN)?;
    // SAFETY: bounds checked.
    let ihl = unsafe { ((*ip).vihl & 0x0f) as usize } * 4;
    let icmp_off = EthHdr::LEN + ihl;
    let icmp = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, icmp_off)?;
    // SAFETY: bounds checked.
    let icmp_type = unsafe { (*icmp)[0] };
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner_off = icmp_off + ICMP_HDR_LEN;
    let inner = ptr_at::<Ipv4Hdr>(ctx, inner_off)?;
    // SAFETY: bounds checked.
    let (ivihl, iproto, isrc, idst) = unsafe {
        ((*inner).vihl, (*inner).proto, u32::from_ne_bytes((*inner).src_addr), u32::from_ne_bytes((*inner).dst_addr))
    };
    // Quoted headers with options are rare enough to leave to the stack.
    if ivihl != 0x45 || (iproto != proto::TCP && iproto != proto::UDP) {
        return None;
    }
    let l4_off = inner_off + Ipv4Hdr::LEN;
    let ports = ptr_at::<[u8; 8]>(ctx, l4_off)?;
    // SAFETY: bounds checked.
    let q = unsafe { *ports };
    let (isport, idport) = (u16::from_ne_bytes([q[0], q[1]]), u16::from_ne_bytes([q[2], q[3]]));
    let key = CtKey { saddr_be: idst, daddr_be: isrc, sport_be: idport, dport_be: isport, proto: iproto, _pad: [0; 3] };
    let (e, _) = ct::lookup(&key)?;
    let (nsrc, nsport, ndst, ndport) = (e.nat_daddr_be, e.nat_dport_be, e.nat_saddr_be, e.nat_sport_be);
    // SAFETY: every pointer below was bounds checked above.
    unsafe {
        // Outer header: the error now goes to the quoted packet's new source.
        let odst = u32::from_ne_bytes((*ip).dst_addr);
        (*ip).check = csum::replace4(u16::from_ne_bytes((*ip).check), odst, nsrc).to_ne_bytes();
        (*ip).dst_addr = nsrc.to_ne_bytes();
        // Quoted IPv4 header.
        let old_icheck = u16::from_ne_bytes((*inner).check);
        let mut icheck = csum::replace4(old_icheck, isrc, nsrc);
        icheck = csum::replace4(icheck, idst, ndst);
        (*inner).check = icheck.to_ne_bytes();
        (*inner).src_addr = nsrc.to_ne_bytes();
        (*inner).dst_addr = ndst.to_ne_bytes();
        // Quoted ports, and the quoted UDP checksum when there is one (a TCP checksum lies
        // beyond the 8 quoted bytes).
        let mut nq = q;
        nq[0..2].copy_from_slice(&nsport.to_ne_bytes());
        nq[2..4].copy_from_slice(&ndport.to_ne_bytes());
        let old_ucheck = u16::from_ne_bytes([q[6], q[7]]);
        let mut ucheck = old_ucheck;
        if iproto == proto::UDP && old_ucheck != 0 {
            ucheck = csum::replace4(ucheck, isrc, nsrc);
            ucheck = csum::replace4(ucheck, idst, ndst);
            ucheck = csum::replace2(ucheck, isport, nsport);
            ucheck = csum::replace2(ucheck, idport, ndport);
            if ucheck == 0 {
                ucheck = 0xffff;
            }
            nq[6..8].copy_from_slice(&ucheck.to_ne_bytes());
        }
        *ports = nq;
        // The ICMP checksum covers everything quoted.
        let mut c = u16::from_ne_bytes([(*icmp)[2], (*icmp)[3]]);
        c = csum::replace4(c, isrc, nsrc);
        c = csum::replace4(c, idst, ndst);
        c = csum::replace2(c, old_icheck, icheck);
        c = csum::replace2(c, isport, nsport);
        c = csum::replace2(c, idport, ndport);
        c = csum::replace2(c, old_ucheck, ucheck);
        let cb = c.to_ne_bytes();
        (*icmp)[2] = cb[0];
        (*icmp)[3] = cb[1];
    }
    // Towards a local backend the stack delivers it; otherwise route it.
    let to_local = e.flags & ct_flags::REPLY == 0 && e.flags & ct_flags::LOCAL_BACKEND != 0;
    Some(forward(ctx, to_local))
}
