//! IPv4 fragments of translated flows. Only a datagram's first fragment carries the ports; the
//! north-south path translates it like a whole datagram (the L4 checksum, which covers the whole
//! datagram, is updated incrementally) and notes its ports under the datagram's identity
//! (source, destination, IP id, protocol: `FragKey`). A later fragment finds its ports there,
//! and with them its flow's conntrack entry: it gets the flow's addresses (it has no ports to
//! rewrite) and goes the same way. Fragments are never reassembled; a later fragment that
//! arrives before its first one, or whose datagram's entry was evicted, is passed untranslated
//! (`XDP_FRAG_NO_FIRST`), as is one of a flow the conntrack no longer has.
use lb_common::{counter, ct_flags, CtKey, FragKey, FragPorts};

use crate::{
    clock, ct,
    hook::Hook,
    maps::{self, ServiceEvent, FRAGMENTS},
    nat,
    parse::{Ipv4, Packet},
    verdict::Stop,
};

/// The key of `l3`'s datagram, with its addresses as they arrived.
#[inline(always)]
fn key(l3: &Ipv4) -> FragKey {
    // SAFETY: `l3.ip` was bounds checked by the parse stage.
    let h = unsafe { &*l3.ip };
    FragKey {
        saddr_be: u32::from_ne_bytes(h.src_addr),
        daddr_be: u32::from_ne_bytes(h.dst_addr),
        id_be: u16::from_ne_bytes(h.id),
        proto: l3.proto,
        _pad: 0,
    }
}

/// Notes the ports of a first fragment `p` that the north-south path is about to translate (call it
/// before the rewrite: the key holds the addresses as they arrived). A refused insert (the LRU
/// map found nothing to evict) leaves the later fragments untranslated.
#[inline(always)]
pub fn remember(l3: &Ipv4, p: &Packet) {
    let ports = FragPorts {
        sport_be: p.sport,
        dport_be: p.dport,
    };
    let _ = FRAGMENTS.insert(key(l3), ports, 0);
}

/// A fragment after the first: translated with its datagram's flow, or passed.
#[inline(always)]
pub fn later<H: Hook>(ctx: &H, l3: &Ipv4) -> Result<u32, Stop> {
    let fk = key(l3);
    // SAFETY: copied out at once.
    let ports =
        unsafe { FRAGMENTS.get(fk).copied() }.ok_or(Stop::Pass(counter::XDP_FRAG_NO_FIRST))?;
    let ck = CtKey {
        saddr_be: fk.saddr_be,
        daddr_be: fk.daddr_be,
        sport_be: ports.sport_be,
        dport_be: ports.dport_be,
        proto: fk.proto,
        _pad: [0; 3],
    };
    let (e, _) = ct::lookup(&ck).ok_or(Stop::Pass(counter::XDP_FRAG_NO_FIRST))?;
    if e.expired(e.last_seen_s, clock::now_s()) {
        return Err(Stop::Pass(counter::XDP_FRAG_NO_FIRST));
    }
    // In place on both hooks: only the IPv4 header changes, and its checksum with it.
    nat::rewrite_addrs(l3, fk.saddr_be, fk.daddr_be, &e);
    let len = ctx.frame_len();
    maps::count(counter::XDP_FRAG_XLATE, len);
    maps::count_service(e.svc_port_id, ServiceEvent::Packet(len));
    let reply = e.flags & ct_flags::REPLY != 0;
    Ok(ctx.forward(l3, !reply && e.flags & ct_flags::LOCAL_BACKEND != 0))
}
