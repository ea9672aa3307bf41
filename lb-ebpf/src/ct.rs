//! Two-tier conntrack with a per-flow state. A new flow's entries go to `CONNTRACK_NEW`; once
//! the flow is confirmed both entries move to `CONNTRACK`. Both maps are LRU: a flood of new
//! flows (SYN flood, spoofed UDP) can only evict other unconfirmed flows, never the established
//! ones.
//!
//! Confirmation needs what a spoofed source cannot produce: for TCP, the client's
//! acknowledgment of the backend's SYN-ACK (its ack number is the backend's initial sequence
//! number plus one, which only the real client saw), or for a flow picked up mid-stream, a reply
//! that is not a reset; for UDP, a reply.
//!
//! Each state has an idle lifetime (`ct_state::lifetime_s`): an entry past it is a miss here
//! (and removed), so a SNAT port comes back when its flow expires even if the agent's sweep has
//! not run yet. A TCP FIN or RST moves the state only when its sequence number is within
//! `limits::TCP_SEQ_WINDOW` of the next one its sender was seen to owe (`CtEntry::seq_next`);
//! a spoofed reset with a guessed number changes nothing.
//!
//! The conntrack stage of the north-south path is `follow` (packets of known flows) and `track_new`
//! (a new flow's entries); tc egress follows the replies of local backends; the ICMP error path
//! only looks entries up.
use aya_ebpf::maps::LruHashMap;
use lb_common::{
    counter, ct_flags, ct_state, limits, proto, Addr6, CtEntryOf, CtKeyOf, CtValueOf, NextHop,
};

use crate::{
    clock,
    flow::{seg_flags, NhSlot, Seg},
    maps::{self, CONNTRACK, CONNTRACK6, CONNTRACK6_NEW, CONNTRACK_NEW},
};

/// An address family's conntrack: its address type and its two tiers. IPv4 (`u32`) and IPv6
/// ([`Addr6`]) flows run the same states and lifetimes in maps of their own.
pub trait CtAddr: Copy + PartialEq + 'static {
    /// Confirmed flows.
    fn established() -> &'static LruHashMap<CtKeyOf<Self>, CtValueOf<Self>>;
    /// Flows not confirmed yet.
    fn fresh() -> &'static LruHashMap<CtKeyOf<Self>, CtValueOf<Self>>;
    /// [`confirm`], with the family's buffers for [`confirm_with`].
    fn confirm(key: &CtKeyOf<Self>, e: &CtEntryOf<Self>, now: u32);
}

impl CtAddr for u32 {
    #[inline(always)]
    fn established() -> &'static LruHashMap<CtKeyOf<u32>, CtValueOf<u32>> {
        &CONNTRACK
    }
    #[inline(always)]
    fn fresh() -> &'static LruHashMap<CtKeyOf<u32>, CtValueOf<u32>> {
        &CONNTRACK_NEW
    }
    #[inline(always)]
    fn confirm(key: &CtKeyOf<u32>, e: &CtEntryOf<u32>, now: u32) {
        confirm_on_stack(key, e, now)
    }
}

impl CtAddr for Addr6 {
    #[inline(always)]
    fn established() -> &'static LruHashMap<CtKeyOf<Addr6>, CtValueOf<Addr6>> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn fresh() -> &'static LruHashMap<CtKeyOf<Addr6>, CtValueOf<Addr6>> {
        &CONNTRACK6_NEW
    }
    #[inline(always)]
    fn confirm(key: &CtKeyOf<Addr6>, e: &CtEntryOf<Addr6>, now: u32) {
        // The IPv6 values are built in the per-CPU scratch (its new-flow fields are free on a
        // known flow's path).
        let Some(s) = maps::NEW_FLOW6.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: per-CPU value, no concurrent user on this CPU.
        let s = unsafe { &mut *s };
        s.reply_key = e.partner_key(key);
        s.reply.e = e.partner(key).1;
        s.reply.nh = NextHop::NONE;
        s.entry.nh = NextHop::NONE;
        confirm_with(key, e, now, &s.reply_key, &mut s.reply, &mut s.entry);
    }
}

/// What the conntrack reads of a TCP or UDP packet, of either family: its four-tuple as on the
/// wire, its protocol, and (TCP) its segment.
pub trait Tuple {
    type A: CtAddr;
    fn saddr(&self) -> Self::A;
    fn daddr(&self) -> Self::A;
    fn sport(&self) -> u16;
    fn dport(&self) -> u16;
    fn proto(&self) -> u8;
    /// A TCP SYN without ACK.
    fn syn_only(&self) -> bool;
    fn seg(&self) -> &Seg;
}

/// [`Tuple`] for a packet type whose fields hold it (`saddr`, `daddr`, `sport`, `dport`,
/// `proto`, `syn_only`, `seg`).
macro_rules! tuple_of_fields {
    ($packet:ty, $addr:ty) => {
        impl Tuple for $packet {
            type A = $addr;
            #[inline(always)]
            fn saddr(&self) -> $addr {
                self.saddr
            }
            #[inline(always)]
            fn daddr(&self) -> $addr {
                self.daddr
            }
            #[inline(always)]
            fn sport(&self) -> u16 {
                self.sport
            }
            #[inline(always)]
            fn dport(&self) -> u16 {
                self.dport
            }
            #[inline(always)]
            fn proto(&self) -> u8 {
                self.proto
            }
            #[inline(always)]
            fn syn_only(&self) -> bool {
                self.syn_only
            }
            #[inline(always)]
            fn seg(&self) -> &Seg {
                &self.seg
            }
        }
    };
}
tuple_of_fields!(crate::parse::Packet, u32);
tuple_of_fields!(crate::flow::Packet6, Addr6);

/// A conntrack map refused an insert: an LRU map that found no entry to evict, or a bucket
/// busy on another CPU (never a collision: an insert replaces). The only way an LRU conntrack
/// is "full"; counted as `XDP_DROP_CT_FULL` where it happens (`insert`).
pub struct Refused;

// `key` writes the protocol and the padding as one aligned word: both families' keys end so.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(CtKeyOf<u32>, proto) % 4 == 0);
    assert!(offset_of!(CtKeyOf<u32>, proto) + 4 == size_of::<CtKeyOf<u32>>());
    assert!(offset_of!(CtKeyOf<lb_common::Addr6>, proto) % 4 == 0);
    assert!(
        offset_of!(CtKeyOf<lb_common::Addr6>, proto) + 4 == size_of::<CtKeyOf<lb_common::Addr6>>()
    );
};

/// The key of a packet's own direction.
#[inline(always)]
pub fn key<P: Tuple>(p: &P) -> CtKeyOf<P::A> {
    let mut k = core::mem::MaybeUninit::<CtKeyOf<P::A>>::uninit();
    let kp = k.as_mut_ptr();
    // SAFETY: every byte of the key is written before `assume_init`: the addresses and ports
    // field by field, the protocol and the three padding bytes as one aligned word (`proto`
    // follows two 4-byte-aligned addresses and two ports, so it sits at a multiple of 4 with
    // exactly the padding after it). Zeroing the padding on its own would be a call to
    // `memset` (the BPF target does not inline it), on every packet.
    unsafe {
        core::ptr::addr_of_mut!((*kp).saddr_be).write(p.saddr());
        core::ptr::addr_of_mut!((*kp).daddr_be).write(p.daddr());
        core::ptr::addr_of_mut!((*kp).sport_be).write(p.sport());
        core::ptr::addr_of_mut!((*kp).dport_be).write(p.dport());
        (core::ptr::addr_of_mut!((*kp).proto) as *mut u32).write(u32::from_ne_bytes([
            p.proto(),
            0,
            0,
            0,
        ]));
        k.assume_init()
    }
}

/// The state a new flow starts in, and its first entry's sequence tracking.
#[inline(always)]
pub fn initial<P: Tuple>(p: &P) -> (u8, u16, u32) {
    if p.proto() == proto::TCP {
        let state = if p.syn_only() {
            ct_state::TCP_SYN_SENT
        } else {
            ct_state::TCP_PICKUP
        };
        (state, ct_flags::SEQ_KNOWN, p.seg().end())
    } else {
        (ct_state::UDP_UNREPLIED, 0, 0)
    }
}

/// The conntrack stage for a packet of a known flow: the entry to translate it with, after
/// refreshing it and moving the flow's state (see the module doc). `None` when the packet
/// starts a new flow: nothing live is tracked for its four-tuple (no entry, or an expired one,
/// which is removed), or it is a client's SYN on the four-tuple of a flow that is over or still
/// opening (the client reused its port, or retransmits): that flow's entries go, so that the new
/// one starts alone. A SYN on an open flow is forwarded on it (as Linux conntrack does: the
/// backend answers with a challenge ACK, the client resets, and its next SYN starts afresh).
///
/// With the entry comes its next-hop slot when the flow is confirmed (the entry stays where it
/// is for the rest of the program's run; an unconfirmed flow's entry may move, and its packets
/// look their next hop up each time).
#[inline(always)]
pub fn follow<P: Tuple>(key: &CtKeyOf<P::A>, p: &P) -> Option<(CtEntryOf<P::A>, NhSlot)> {
    follow_inner(key, p.proto(), p.seg())
}

/// `follow` for any program type: the four-tuple's key, its protocol and (TCP) its segment.
#[inline(always)]
pub fn follow_seg<A: CtAddr>(key: &CtKeyOf<A>, l4: u8, seg: &Seg) -> Option<CtEntryOf<A>> {
    follow_inner(key, l4, seg).map(|(e, _)| e)
}

#[inline(always)]
fn follow_inner<A: CtAddr>(key: &CtKeyOf<A>, l4: u8, seg: &Seg) -> Option<(CtEntryOf<A>, NhSlot)> {
    let (ptr, unconfirmed) = lookup_ptr(key)?;
    // SAFETY: the LRU value stays valid for the program's run; copied out at once.
    let e = unsafe { *ptr };
    let now = clock::now_s();
    if e.expired(e.last_seen_s, now) && flow_expired(key, &e, now) {
        maps::count(counter::CT_EXPIRED, 0);
        forget(key, &e);
        return None;
    }
    let reply = e.flags & ct_flags::REPLY != 0;
    if l4 != proto::TCP {
        // The refresh first: a confirmation moves the entry, and `ptr` with it.
        refresh(ptr, &e, now, e.flags, e.seq_next);
        if reply && (unconfirmed || e.state != ct_state::UDP_REPLIED) {
            let mut v = e;
            v.state = ct_state::UDP_REPLIED;
            if unconfirmed {
                confirm(key, &v, now);
            } else {
                set_state(key, ptr, &e, ct_state::UDP_REPLIED);
            }
        }
        return Some((e, slot(ptr, unconfirmed, now)));
    }
    let syn_only = seg.has(seg_flags::SYN) && !seg.has(seg_flags::ACK);
    if !reply && syn_only && !open(e.state) {
        forget(key, &e);
        return None;
    }
    // The sender's window, from before this segment.
    let known = e.flags & ct_flags::SEQ_KNOWN != 0;
    let in_window =
        known && (seg.seq.wrapping_sub(e.seq_next) as i32).unsigned_abs() <= limits::TCP_SEQ_WINDOW;
    // Only a segment in the window moves it (a spoofed one far off must not drag the window
    // to where the spoofer's next guess lands).
    let end = seg.end();
    let (flags, seq_next) = if !known || (in_window && (end.wrapping_sub(e.seq_next) as i32) > 0) {
        (e.flags | ct_flags::SEQ_KNOWN, end)
    } else {
        (e.flags, e.seq_next)
    };
    refresh(ptr, &e, now, flags, seq_next);

    let state = next_state(key, &e, seg, reply, in_window);
    // An established flow still in the new-flow tier (its move was refused) tries again.
    if unconfirmed && state == ct_state::TCP_ESTABLISHED {
        let mut v = e;
        v.state = state;
        v.flags = flags;
        v.seq_next = seq_next;
        confirm(key, &v, now);
    } else if state != e.state {
        set_state(key, ptr, &e, state);
    }
    Some((e, slot(ptr, unconfirmed, now)))
}

/// The next-hop slot of a confirmed flow's entry (see `follow`).
#[inline(always)]
fn slot<A: CtAddr>(ptr: *mut CtEntryOf<A>, unconfirmed: bool, now: u32) -> NhSlot {
    if unconfirmed {
        return NhSlot::NONE;
    }
    // `ptr` is the `e` of a conntrack value, its first field (`repr(C)`): the value starts
    // there.
    let value = ptr.cast::<CtValueOf<A>>();
    // SAFETY: the LRU value stays valid for the program's run; only the field's address is
    // taken.
    let nh = unsafe { core::ptr::addr_of_mut!((*value).nh) };
    NhSlot { nh, now }
}

/// Whether a SYN from the client on this flow is part of it (an open connection: forwarded as
/// is) rather than the start of a new one.
#[inline(always)]
fn open(state: u8) -> bool {
    matches!(
        state,
        ct_state::TCP_ESTABLISHED | ct_state::TCP_FIN_CLIENT | ct_state::TCP_FIN_BACKEND
    )
}

/// A TCP flow's next state after segment `seg` of the original (client) or reply (backend)
/// direction.
#[inline(always)]
fn next_state<A: CtAddr>(
    key: &CtKeyOf<A>,
    e: &CtEntryOf<A>,
    seg: &Seg,
    reply: bool,
    in_window: bool,
) -> u8 {
    let s = e.state;
    if seg.has(seg_flags::RST) {
        if in_window || refused_syn(key, e, seg, reply) {
            return ct_state::TCP_RESET;
        }
        maps::count(counter::CT_OUT_OF_WINDOW, 0);
        return s;
    }
    if seg.has(seg_flags::FIN) {
        if !in_window {
            maps::count(counter::CT_OUT_OF_WINDOW, 0);
            return s;
        }
        return match (s, reply) {
            (ct_state::TCP_FIN_CLIENT, true) => ct_state::TCP_CLOSED,
            (ct_state::TCP_FIN_BACKEND, false) => ct_state::TCP_TIME_WAIT,
            (ct_state::TCP_FIN_CLIENT | ct_state::TCP_FIN_BACKEND, _) => s,
            (ct_state::TCP_CLOSED | ct_state::TCP_TIME_WAIT | ct_state::TCP_RESET, _) => s,
            (_, false) => ct_state::TCP_FIN_CLIENT,
            (_, true) => ct_state::TCP_FIN_BACKEND,
        };
    }
    match s {
        // The backend's SYN-ACK: its sequence number is now on the reply entry.
        ct_state::TCP_SYN_SENT if reply && seg.has(seg_flags::SYN) && seg.has(seg_flags::ACK) => {
            ct_state::TCP_SYN_RECV
        }
        // The client acknowledges exactly the backend's SYN-ACK.
        ct_state::TCP_SYN_RECV if !reply && seg.has(seg_flags::ACK) => {
            match lookup(&e.partner_key(key)) {
                Some((r, _)) if r.flags & ct_flags::SEQ_KNOWN != 0 && r.seq_next == seg.ack => {
                    ct_state::TCP_ESTABLISHED
                }
                _ => s,
            }
        }
        // A flow picked up mid-stream (the SYN's entries were lost) that the backend answers
        // with a SYN-ACK is still opening: the client's ACK of it confirms, as above.
        ct_state::TCP_PICKUP if reply && seg.has(seg_flags::SYN) => ct_state::TCP_SYN_RECV,
        // Otherwise the backend answered mid-stream, and not with a reset.
        ct_state::TCP_PICKUP if reply => ct_state::TCP_ESTABLISHED,
        _ => s,
    }
}

/// A backend's reset refusing the client's SYN (nothing listens): it acknowledges exactly the
/// SYN (its own sequence number is 0 and says nothing).
#[inline(always)]
fn refused_syn<A: CtAddr>(key: &CtKeyOf<A>, e: &CtEntryOf<A>, seg: &Seg, reply: bool) -> bool {
    if !reply || e.state != ct_state::TCP_SYN_SENT || !seg.has(seg_flags::ACK) {
        return false;
    }
    matches!(lookup(&e.partner_key(key)), Some((o, _)) if o.flags & ct_flags::SEQ_KNOWN != 0 && o.seq_next == seg.ack)
}

/// Writes a packet's refresh into its own entry: last-seen time and the sender's sequence
/// tracking, each only when it changed (a store dirties the entry's cache line on every CPU
/// that reads it).
#[inline(always)]
fn refresh<A: CtAddr>(
    ptr: *mut CtEntryOf<A>,
    e: &CtEntryOf<A>,
    now: u32,
    flags: u16,
    seq_next: u32,
) {
    // SAFETY: the LRU value stays valid for the program's run.
    unsafe {
        if e.last_seen_s != now {
            (*ptr).last_seen_s = now;
        }
        if e.flags != flags {
            (*ptr).flags = flags;
        }
        if e.seq_next != seq_next {
            (*ptr).seq_next = seq_next;
        }
    }
}

/// Sets a flow's state on both of its entries (`ptr` is the packet's own, `e` its old value).
#[inline(always)]
fn set_state<A: CtAddr>(key: &CtKeyOf<A>, ptr: *mut CtEntryOf<A>, e: &CtEntryOf<A>, state: u8) {
    // SAFETY: the LRU values stay valid for the program's run.
    unsafe { (*ptr).state = state };
    if let Some(r) = lookup_ptr(&e.partner_key(key)).map(|(r, _)| r) {
        // SAFETY: as above.
        unsafe { (*r).state = state };
    }
}

/// Whether a flow whose entry `e` (under `key`) is past its lifetime by its own last-seen time
/// is also past it by its other entry's (each direction refreshes its own entry only).
#[inline(always)]
pub fn flow_expired<A: CtAddr>(key: &CtKeyOf<A>, e: &CtEntryOf<A>, now: u32) -> bool {
    match lookup(&e.partner_key(key)) {
        Some((other, _)) => e.expired(other.last_seen_s, now),
        None => true,
    }
}

/// Writes a new flow's two entries into the new-flow tier: the reply direction first (for a
/// SNAT flow it holds the port), then the packet's own. `Err` when the map refuses one: after a
/// refused reply entry the other is not tried; after a refused original the reply entry stays,
/// as after an eviction of the other half (the flow's next packet rebuilds it, and
/// `snat::free_port` sees the port as the flow's own). The packet is translated all the same.
#[inline(always)]
pub fn track_new<A: CtAddr>(
    key: &CtKeyOf<A>,
    entry: &CtEntryOf<A>,
    reply_key: &CtKeyOf<A>,
    reply: &CtEntryOf<A>,
) -> Result<(), Refused> {
    insert(A::fresh(), reply_key, &CtValueOf::new(*reply))?;
    insert(A::fresh(), key, &CtValueOf::new(*entry))
}

/// `track_new` with the values built in place (the IPv6 path builds them in a scratch map).
#[inline(always)]
pub fn track_new_values<A: CtAddr>(
    key: &CtKeyOf<A>,
    entry: &CtValueOf<A>,
    reply_key: &CtKeyOf<A>,
    reply: &CtValueOf<A>,
) -> Result<(), Refused> {
    insert(A::fresh(), reply_key, reply)?;
    insert(A::fresh(), key, entry)
}

/// Inserts an entry into one tier; a refusal is counted (`XDP_DROP_CT_FULL`) and returned.
#[inline(always)]
fn insert<A: CtAddr>(
    tier: &LruHashMap<CtKeyOf<A>, CtValueOf<A>>,
    key: &CtKeyOf<A>,
    e: &CtValueOf<A>,
) -> Result<(), Refused> {
    tier.insert(key, e, 0).map_err(|_| {
        maps::count(counter::XDP_DROP_CT_FULL, 0);
        Refused
    })
}

/// The entry for `key` and whether it is still unconfirmed (expired entries included: the
/// callers that translate check the lifetime).
#[inline(always)]
pub fn lookup<A: CtAddr>(key: &CtKeyOf<A>) -> Option<(CtEntryOf<A>, bool)> {
    // SAFETY: copied out at once.
    lookup_ptr(key).map(|(p, u)| (unsafe { *p }, u))
}
#[inline(always)]
fn lookup_ptr<A: CtAddr>(key: &CtKeyOf<A>) -> Option<(*mut CtEntryOf<A>, bool)> {
    // The entry is the value's first field: the value's address is the entry's.
    if let Some(p) = A::established().get_ptr_mut(key) {
        return Some((p.cast::<CtEntryOf<A>>(), false));
    }
    A::fresh()
        .get_ptr_mut(key)
        .map(|p| (p.cast::<CtEntryOf<A>>(), true))
}

/// Removes a flow's entries (both directions, both tiers).
#[inline(always)]
pub fn forget<A: CtAddr>(key: &CtKeyOf<A>, e: &CtEntryOf<A>) {
    let pk = e.partner_key(key);
    for k in [key, &pk] {
        // Each entry sits in one tier at most (or none, evicted): the other removal finds
        // nothing, which is no error here.
        let _ = A::established().remove(k);
        let _ = A::fresh().remove(k);
    }
}

/// Moves a confirmed flow (both directions) from the new-flow map to the established one, with
/// `e` (the packet's own entry, its new state included) as the new value under `key`. When the
/// established map refuses (counted by `insert`), the flow stays unconfirmed where it is and
/// works on, in its new state; its next packet tries again.
#[inline(always)]
pub fn confirm<A: CtAddr>(key: &CtKeyOf<A>, e: &CtEntryOf<A>, now: u32) {
    A::confirm(key, e, now)
}

/// `confirm` with its values on the stack (IPv4: the layout the XDP program was verified with).
#[inline(always)]
fn confirm_on_stack(key: &CtKeyOf<u32>, e: &CtEntryOf<u32>, now: u32) {
    let (pk, computed) = e.partner(key);
    // SAFETY: copied out at once.
    let mut pv = unsafe { CONNTRACK_NEW.get(pk).map(|v| v.e) }.unwrap_or(computed);
    pv.last_seen_s = now;
    pv.state = e.state;
    let mut v = *e;
    v.last_seen_s = now;
    let moved = insert(&CONNTRACK, &pk, &CtValueOf::new(pv)).is_ok()
        && match insert(&CONNTRACK, key, &CtValueOf::new(v)) {
            Ok(()) => true,
            Err(Refused) => {
                // Undo the first move, so that the flow stays whole in the new-flow tier.
                // (Nothing to undo if the LRU evicted it meanwhile.)
                let _ = CONNTRACK.remove(pk);
                false
            }
        };
    if !moved {
        // The state moves on in the new-flow tier.
        for (k, val) in [(key, &v), (&pk, &pv)] {
            if let Some(p) = CONNTRACK_NEW.get_ptr_mut(k) {
                // SAFETY: the LRU value stays valid for the program's run.
                unsafe { (*p).e.state = val.state };
            }
        }
        return;
    }
    // The new-flow tier's copies go; either may have been evicted already.
    let _ = CONNTRACK_NEW.remove(pk);
    let _ = CONNTRACK_NEW.remove(key);
    maps::count(counter::CT_CONFIRMED, 0);
}

/// `confirm` with its three values in buffers the family provides (the IPv4 family's stack,
/// the IPv6 family's per-CPU scratch): `pk` holds the other direction's key and `pv` its
/// entry as computed from `e` (the new-flow tier's copy replaces it when there is one); `v`
/// is written here.
#[inline(always)]
pub fn confirm_with<A: CtAddr>(
    key: &CtKeyOf<A>,
    e: &CtEntryOf<A>,
    now: u32,
    pk: &CtKeyOf<A>,
    pv: &mut CtValueOf<A>,
    v: &mut CtValueOf<A>,
) {
    if let Some(found) = A::fresh().get_ptr_mut(pk) {
        // SAFETY: the LRU value stays valid for the program's run; copied at once.
        pv.e = unsafe { (*found).e };
    }
    pv.e.last_seen_s = now;
    pv.e.state = e.state;
    v.e = *e;
    v.e.last_seen_s = now;
    let moved = insert(A::established(), pk, pv).is_ok()
        && match insert(A::established(), key, v) {
            Ok(()) => true,
            Err(Refused) => {
                // Undo the first move, so that the flow stays whole in the new-flow tier.
                // (Nothing to undo if the LRU evicted it meanwhile.)
                let _ = A::established().remove(pk);
                false
            }
        };
    if !moved {
        // The state moves on in the new-flow tier.
        for (k, state) in [(key, v.e.state), (pk, pv.e.state)] {
            if let Some(p) = A::fresh().get_ptr_mut(k) {
                // SAFETY: the LRU value stays valid for the program's run.
                unsafe { (*p).e.state = state };
            }
        }
        return;
    }
    // The new-flow tier's copies go; either may have been evicted already.
    let _ = A::fresh().remove(pk);
    let _ = A::fresh().remove(key);
    maps::count(counter::CT_CONFIRMED, 0);
}

/// Whether the entry found for a SNAT candidate belongs to the same client flow (a flow whose
/// other entry was evicted): then the candidate is the flow's own and may be reused.
#[inline(always)]
pub fn same_flow<A: CtAddr>(
    existing: &CtEntryOf<A>,
    client_addr: A,
    client_port: u16,
    frontend_addr: A,
    frontend_port: u16,
) -> bool {
    existing.nat_daddr_be == client_addr
        && existing.nat_dport_be == client_port
        && existing.nat_saddr_be == frontend_addr
        && existing.nat_sport_be == frontend_port
}
