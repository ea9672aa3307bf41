//! Two-tier conntrack. A new flow's entries go to `CONNTRACK_NEW`; once the flow is confirmed
//! (TCP: the client's first packet after the SYN; UDP: the first reply) both entries move to
//! `CONNTRACK`. Both maps are LRU: a flood of new flows (SYN flood, spoofed UDP) can only evict
//! other unconfirmed flows, never the established ones.
//!
//! The conntrack stage of the XDP path is `follow` (packets of known flows) and `track_new`
//! (a new flow's entries); tc egress looks entries up and confirms UDP flows, the ICMP error
//! path looks entries up.
use aya_ebpf::maps::LruHashMap;
use lb_common::{counter, ct_flags, proto, CtEntry, CtKey};

use crate::{
    clock,
    maps::{self, CONNTRACK, CONNTRACK_NEW},
    parse::{Closing, Packet},
};

/// A conntrack map refused an insert: an LRU map that found no entry to evict, or a bucket
/// busy on another CPU (never a collision: an insert replaces). The only way an LRU conntrack
/// is "full"; counted as `XDP_DROP_CT_FULL` where it happens (`insert`).
pub struct Refused;

/// The key of a packet's own direction.
#[inline(always)]
pub fn key(p: &Packet) -> CtKey {
    CtKey {
        saddr_be: p.saddr,
        daddr_be: p.daddr,
        sport_be: p.sport,
        dport_be: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    }
}

/// The conntrack stage for a packet: the entry to translate it with when it belongs to a
/// tracked flow, after refreshing the entry, confirming the flow (TCP: the client's first
/// packet after its SYN; UDP: a reply) and noting a FIN or RST. `None` when the packet starts
/// a new flow: nothing is tracked for its four-tuple, or it is a fresh SYN on the four-tuple of
/// an earlier flow; that flow is over, and its entries (in whichever tier) are dropped so that
/// the new one starts unconfirmed and alone.
#[inline(always)]
pub fn follow(key: &CtKey, p: &Packet) -> Option<CtEntry> {
    let (e, unconfirmed) = lookup(key)?;
    let reply = e.flags & ct_flags::REPLY != 0;
    if !reply && p.syn_only {
        forget(key, &e);
        return None;
    }
    let now = clock::now_s();
    let confirms = if p.proto == proto::TCP { !reply } else { reply };
    if unconfirmed && confirms {
        confirm(key, &e, now);
    } else {
        touch(key, unconfirmed, now);
    }
    if p.closing != Closing::No {
        closing(key, &e, p.closing == Closing::Rst);
    }
    Some(e)
}

/// Writes a new flow's two entries into the new-flow tier: the reply direction first (for a
/// SNAT flow it holds the port), then the packet's own. `Err` when the map refuses one: after a
/// refused reply entry the other is not tried; after a refused original the reply entry stays,
/// as after an eviction of the other half (the flow's next packet rebuilds it, and
/// `snat::free_port` sees the port as the flow's own). The packet is translated all the same.
#[inline(always)]
pub fn track_new(
    key: &CtKey,
    entry: &CtEntry,
    reply_key: &CtKey,
    reply: &CtEntry,
) -> Result<(), Refused> {
    insert(&CONNTRACK_NEW, reply_key, reply)?;
    insert(&CONNTRACK_NEW, key, entry)
}

/// Inserts an entry into one tier; a refusal is counted (`XDP_DROP_CT_FULL`) and returned.
#[inline(always)]
fn insert(tier: &LruHashMap<CtKey, CtEntry>, key: &CtKey, e: &CtEntry) -> Result<(), Refused> {
    tier.insert(key, e, 0).map_err(|_| {
        maps::count(counter::XDP_DROP_CT_FULL, 0);
        Refused
    })
}

/// The entry for `key` and whether it is still unconfirmed.
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<(CtEntry, bool)> {
    if let Some(e) = maps::conntrack(key) {
        return Some((e, false));
    }
    // SAFETY: the value is copied out at once.
    unsafe { CONNTRACK_NEW.get(key).copied() }.map(|e| (e, true))
}

/// Refreshes the last-seen time of an entry.
#[inline(always)]
fn touch(key: &CtKey, unconfirmed: bool, now: u32) {
    let v = if unconfirmed {
        CONNTRACK_NEW.get_ptr_mut(key)
    } else {
        CONNTRACK.get_ptr_mut(key)
    };
    if let Some(v) = v {
        // SAFETY: the LRU value stays valid for the program's run.
        unsafe {
            if (*v).last_seen_s != now {
                (*v).last_seen_s = now;
            }
        }
    }
}

/// Records a TCP FIN or RST of a tracked flow on its reply-direction entry (see
/// `ct_flags::CLOSING`). Runs only for FIN and RST packets.
#[inline(always)]
fn closing(key: &CtKey, e: &CtEntry, rst: bool) {
    let reply = e.flags & ct_flags::REPLY != 0;
    let (rk, _) = if reply { (*key, *e) } else { partner(key, e) };
    let Some(r) = CONNTRACK
        .get_ptr_mut(rk)
        .or_else(|| CONNTRACK_NEW.get_ptr_mut(rk))
    else {
        return;
    };
    // SAFETY: the LRU value stays valid for the program's run.
    unsafe {
        let state = if rst {
            lb_common::ct_state::TCP_RESET
        } else {
            lb_common::ct_state::TCP_TIME_WAIT
        };
        if (*r).state != state {
            (*r).state = state;
        }
    }
}

/// Whether a reply-direction entry holding a SNAT port belongs to a TCP flow that closed and has
/// been idle long enough for the port to go to a new flow.
#[inline(always)]
pub fn reusable(e: &CtEntry, now: u32) -> bool {
    e.expired(e.last_seen_s, now)
}

/// Removes a flow's entries (both directions, both tiers).
#[inline(always)]
pub fn forget(key: &CtKey, e: &CtEntry) {
    let (pk, _) = partner(key, e);
    for k in [key, &pk] {
        // Each entry sits in one tier at most (or none, evicted): the other removal finds
        // nothing, which is no error here.
        let _ = CONNTRACK.remove(k);
        let _ = CONNTRACK_NEW.remove(k);
    }
}

/// The entry of the opposite direction: a packet matching `key` is rewritten to `e`'s
/// addresses, so the other direction arrives as (nat_d -> nat_s) and is rewritten to (d -> s).
#[inline(always)]
fn partner(key: &CtKey, e: &CtEntry) -> (CtKey, CtEntry) {
    let k = CtKey {
        saddr_be: e.nat_daddr_be,
        daddr_be: e.nat_saddr_be,
        sport_be: e.nat_dport_be,
        dport_be: e.nat_sport_be,
        proto: key.proto,
        _pad: [0; 3],
    };
    let v = CtEntry {
        nat_saddr_be: key.daddr_be,
        nat_daddr_be: key.saddr_be,
        nat_sport_be: key.dport_be,
        nat_dport_be: key.sport_be,
        svc_port_id: e.svc_port_id,
        backend_id: e.backend_id,
        last_seen_s: e.last_seen_s,
        flags: e.flags ^ ct_flags::REPLY,
        state: e.state,
        _pad: 0,
        seq_next: 0,
    };
    (k, v)
}

/// Moves a confirmed flow (both directions) from the new-flow map to the established one. When
/// the established map refuses (counted by `insert`), the flow stays unconfirmed where it is
/// and works on; its next confirming packet tries again.
#[inline(always)]
pub fn confirm(key: &CtKey, e: &CtEntry, now: u32) {
    let (pk, computed) = partner(key, e);
    // SAFETY: copied out at once.
    let mut pv = unsafe { CONNTRACK_NEW.get(pk).copied() }.unwrap_or(computed);
    pv.last_seen_s = now;
    let mut v = *e;
    v.last_seen_s = now;
    if insert(&CONNTRACK, &pk, &pv).is_err() {
        return;
    }
    if insert(&CONNTRACK, key, &v).is_err() {
        // Undo the first move, so that the flow stays whole in the new-flow tier. (Nothing to
        // undo if the LRU evicted it meanwhile.)
        let _ = CONNTRACK.remove(pk);
        return;
    }
    // The new-flow tier's copies go; either may have been evicted already.
    let _ = CONNTRACK_NEW.remove(pk);
    let _ = CONNTRACK_NEW.remove(key);
    maps::count(counter::CT_CONFIRMED, 0);
}

/// Whether the entry found for a SNAT candidate belongs to the same client flow (a flow whose
/// other entry was evicted): then the candidate is the flow's own and may be reused.
#[inline(always)]
pub fn same_flow(
    existing: &CtEntry,
    client_addr: u32,
    client_port: u16,
    frontend_addr: u32,
    frontend_port: u16,
) -> bool {
    existing.nat_daddr_be == client_addr
        && existing.nat_dport_be == client_port
        && existing.nat_saddr_be == frontend_addr
        && existing.nat_sport_be == frontend_port
}
