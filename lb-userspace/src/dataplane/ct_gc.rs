//! Conntrack garbage collection and flushes, on both tiers (`CONNTRACK`, established flows, and
//! `CONNTRACK_NEW`, unconfirmed ones), of either family: [`CtTiers`] is generic over the
//! address ([`CtAddr`]: `u32` for the IPv4 maps, [`Addr6`] for `CONNTRACK6`/`CONNTRACK6_NEW`),
//! as the datapath's conntrack is.
//!
//! The datapath treats an entry past its state's lifetime as a miss (`CtEntry::expired`), but
//! only when a packet looks it up; [`sweep`] removes the flows no packet comes back for, so their
//! SNAT ports and map slots come back without waiting for the LRU. A flow has two entries
//! (original and reply direction; `CtEntry::partner_key` finds one from the other) and each direction's
//! packets refresh only their own entry, so a flow is expired when the more recent of its two
//! `last_seen_s` is past the lifetime of its state.
//!
//! A sweep reads both maps with `BPF_MAP_LOOKUP_BATCH` (aya's per-key iteration costs two
//! syscalls per entry: `get_next_key` and `lookup`), reads them once more right before
//! deleting (a packet may have refreshed an entry meanwhile) and deletes what is still expired
//! with `BPF_MAP_DELETE_BATCH`: no syscall per entry. The kernel has no
//! conditional delete: a packet landing between that re-read and the delete finds no entry and
//! starts the flow again (with the same backend and SNAT port candidates: both are functions of
//! the packet), which is the datapath's answer to any evicted flow.
//!
//! [`flush_udp`] removes the UDP flows of backends that left a Service port (kube-proxy clears
//! conntrack for removed UDP endpoints), so the flow's next datagram is balanced again; the
//! service maps' flush runs it on both families' tiers.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::MapData;
use lb_common::{map_name, proto, Addr6, CtEntryOf, CtKeyOf, CtValueOf};

use super::bpf_sys;

/// The address of a conntrack family: `u32` (IPv4, network order) or [`Addr6`] (IPv6, the
/// wire bytes). Generic code over it also bounds `CtKeyOf<A>` and `CtValueOf<A>` by
/// `aya::Pod`, which both families' types are.
pub trait CtAddr: Copy + Eq + std::hash::Hash + std::fmt::Debug + Send + 'static {
    /// The family's tiers: (established, new).
    const MAPS: (&'static str, &'static str);
    /// `IPv4` or `IPv6`.
    const FAMILY: &'static str;
    /// The address as it reads.
    fn ip(self) -> std::net::IpAddr;
}

impl CtAddr for u32 {
    const MAPS: (&'static str, &'static str) = (map_name::CONNTRACK, map_name::CONNTRACK_NEW);
    const FAMILY: &'static str = "IPv4";
    fn ip(self) -> std::net::IpAddr {
        std::net::Ipv4Addr::from(self.to_ne_bytes()).into()
    }
}

impl CtAddr for Addr6 {
    const MAPS: (&'static str, &'static str) = (map_name::CONNTRACK6, map_name::CONNTRACK6_NEW);
    const FAMILY: &'static str = "IPv6";
    fn ip(self) -> std::net::IpAddr {
        let mut b = [0u8; 16];
        for (i, w) in self.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        std::net::Ipv6Addr::from(b).into()
    }
}

/// The two conntrack tiers of one family (IPv4 unless said otherwise).
pub struct CtTiers<A = u32> {
    established: MapData,
    new: MapData,
    family: std::marker::PhantomData<A>,
}

/// Which tier an entry sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Established,
    New,
}

impl<A: CtAddr> CtTiers<A>
where
    CtKeyOf<A>: aya::Pod,
    CtValueOf<A>: aya::Pod,
{
    /// The tiers from their maps (`pinned::open_conntrack` opens the pinned ones).
    pub fn from_maps(established: MapData, new: MapData) -> Self {
        Self {
            established,
            new,
            family: std::marker::PhantomData,
        }
    }

    /// The tiers of a loaded object (their fds duplicated: the object keeps its maps).
    pub fn from_ebpf(ebpf: &aya::Ebpf) -> Result<Self> {
        Self::from_fds(
            bpf_sys::object_map_fd(ebpf, A::MAPS.0)?,
            bpf_sys::object_map_fd(ebpf, A::MAPS.1)?,
        )
    }

    /// Tiers from map fds (maps taken from a loaded object, or created by a test).
    pub fn from_fds(established: OwnedFd, new: OwnedFd) -> Result<Self> {
        Ok(Self::from_maps(
            MapData::from_fd(established).context("conntrack map")?,
            MapData::from_fd(new).context("new-flow conntrack map")?,
        ))
    }

    /// Writes an entry into one tier (tests and benchmarks stage flows with it).
    pub fn insert(&self, key: &CtKeyOf<A>, e: &CtEntryOf<A>, t: Tier) -> Result<()> {
        Ok(bpf_sys::update(self.fd(t), key, &CtValueOf::new(*e), 0)?)
    }

    /// Every entry of one tier.
    pub fn entries(&self, t: Tier) -> Result<Vec<(CtKeyOf<A>, CtEntryOf<A>)>> {
        let mut out = Vec::new();
        bpf_sys::for_each_batch::<CtKeyOf<A>, CtValueOf<A>>(self.fd(t), |k, v| {
            out.extend(k.iter().copied().zip(v.iter().map(|v| v.e)))
        })?;
        Ok(out)
    }

    /// Two LRU hash maps of the tiers' key and value sizes and `capacities`, not pinned (for
    /// tests and benchmarks).
    pub fn create(capacities: (u32, u32)) -> Result<Self> {
        let make = |n: u32, name: &str| {
            bpf_sys::create_map(
                bpf_sys::MAP_TYPE_LRU_HASH,
                std::mem::size_of::<CtKeyOf<A>>() as u32,
                std::mem::size_of::<CtValueOf<A>>() as u32,
                n,
                name,
            )
            .with_context(|| format!("creating map {name}"))
        };
        Self::from_fds(
            make(capacities.0, "test_ct")?,
            make(capacities.1, "test_ct_new")?,
        )
    }

    /// A second handle on one tier's map (for aya's typed views).
    pub fn map_data(&self, t: Tier) -> Result<MapData> {
        Ok(MapData::from_fd(self.fd(t).try_clone_to_owned()?)?)
    }

    fn fd(&self, t: Tier) -> BorrowedFd<'_> {
        match t {
            Tier::Established => self.established.fd().as_fd(),
            Tier::New => self.new.fd().as_fd(),
        }
    }

    /// The entry for `key` in either tier (established first, as the datapath looks).
    pub fn get(&self, key: &CtKeyOf<A>) -> Result<Option<(CtEntryOf<A>, Tier)>> {
        self.get_from(key, Tier::Established)
    }

    /// The entry for `key` in either tier, looking in `first` first (where it was last seen).
    fn get_from(&self, key: &CtKeyOf<A>, first: Tier) -> Result<Option<(CtEntryOf<A>, Tier)>> {
        let other = match first {
            Tier::Established => Tier::New,
            Tier::New => Tier::Established,
        };
        for t in [first, other] {
            if let Some(v) = bpf_sys::lookup::<CtKeyOf<A>, CtValueOf<A>>(self.fd(t), key)? {
                return Ok(Some((v.e, t)));
            }
        }
        Ok(None)
    }
}

/// A seeded multiply-rotate hash for the sweep's key sets: hundreds of thousands of 16-byte
/// keys per sweep, where SipHash's cost showed in the sweep's time. The keys are packets'
/// four-tuples, which a sender chooses: the seed is random per process, so colliding keys
/// cannot be computed from outside.
#[derive(Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 =
                (self.0.rotate_left(5) ^ u64::from_ne_bytes(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// Builds [`KeyHasher`]s from one random seed per process.
#[derive(Clone, Copy)]
pub struct KeyHash(u64);

impl Default for KeyHash {
    fn default() -> Self {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        KeyHash(*SEED.get_or_init(|| {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x9e37_79b9_7f4a_7c15);
            h.finish() | 1
        }))
    }
}

impl std::hash::BuildHasher for KeyHash {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.0)
    }
}

/// The more recent of two `last_seen_s` stamps (the clock may wrap).
pub fn latest(a: u32, b: u32) -> u32 {
    if b.wrapping_sub(a) as i32 > 0 {
        b
    } else {
        a
    }
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Entries read (both tiers).
    pub examined: u64,
    /// Entries removed (both tiers, both directions).
    pub removed: u64,
    /// Entries left in each tier after the sweep (as read, minus those removed).
    pub established_entries: u64,
    pub new_entries: u64,
    /// Reading both tiers.
    pub walk: Duration,
    /// Deciding which flows expired, and reading both tiers again.
    pub recheck: Duration,
    /// Deleting.
    pub delete: Duration,
    /// The whole sweep.
    pub duration: Duration,
}

impl SweepStats {
    /// One sweep's figures for two families' sweeps (`self` then `other`, one after the
    /// other): counts add up, durations too.
    pub fn and(self, other: SweepStats) -> SweepStats {
        SweepStats {
            examined: self.examined + other.examined,
            removed: self.removed + other.removed,
            established_entries: self.established_entries + other.established_entries,
            new_entries: self.new_entries + other.new_entries,
            walk: self.walk + other.walk,
            recheck: self.recheck + other.recheck,
            delete: self.delete + other.delete,
            duration: self.duration + other.duration,
        }
    }
}

/// Removes every flow expired at `now_s` (seconds of CLOCK_MONOTONIC_COARSE, as
/// `read::boot_seconds`) from both tiers: both entries of it, whichever tier each is in.
pub fn sweep<A: CtAddr>(t: &CtTiers<A>, now_s: u32) -> Result<SweepStats>
where
    CtKeyOf<A>: aya::Pod,
    CtValueOf<A>: aya::Pod,
{
    let started = Instant::now();
    let mut st = SweepStats::default();
    // Entries expired by their own stamp: a flow can only be expired if each of its entries is
    // (the flow's stamp is the later of the two), so only these are looked at again.
    let mut candidates: HashMap<CtKeyOf<A>, (CtEntryOf<A>, Tier), KeyHash> = HashMap::default();
    let mut seen = [0u64; 2];
    for (i, tier) in [Tier::Established, Tier::New].into_iter().enumerate() {
        seen[i] =
            bpf_sys::for_each_batch::<CtKeyOf<A>, CtValueOf<A>>(t.fd(tier), |keys, values| {
                for (k, CtValueOf { e: v, .. }) in keys.iter().zip(values) {
                    if v.expired(v.last_seen_s, now_s) {
                        candidates.insert(*k, (*v, tier));
                    }
                }
            })
            .with_context(|| format!("reading the {tier:?} conntrack tier"))?;
    }
    st.walk = started.elapsed();
    st.examined = seen[0] + seen[1];
    // The flows whose entries (both, where both exist) are expired by the later stamp.
    let mut doomed: [Vec<CtKeyOf<A>>; 2] = [Vec::new(), Vec::new()];
    let mut done: HashSet<CtKeyOf<A>, KeyHash> = HashSet::default();
    for (k, (e, tier)) in &candidates {
        if done.contains(k) {
            continue;
        }
        let pk = e.partner_key(k);
        let partner = match candidates.get(&pk) {
            Some(p) => Some(*p),
            // Not expired by its own stamp (then the flow is alive), or absent (evicted: the
            // flow is this entry alone, unless the partner was written after the walk).
            None => match t.get(&pk)? {
                Some(_) => continue,
                None => None,
            },
        };
        let last = partner.map_or(e.last_seen_s, |(p, _)| latest(e.last_seen_s, p.last_seen_s));
        if !e.expired(last, now_s) {
            continue;
        }
        done.insert(*k);
        done.insert(pk);
        doomed[(*tier == Tier::New) as usize].push(*k);
        if let Some((_, pt)) = partner {
            doomed[(pt == Tier::New) as usize].push(pk);
        }
    }
    // Look again right before deleting: a packet may have refreshed an entry since the walk
    // (or the datapath replaced an expired flow with a new one under the same key). One more
    // batched walk costs far less than a lookup per entry; what stays expired goes, in
    // batches. (The kernel has no conditional delete: a packet landing between this walk and
    // the delete finds no entry and starts the flow again, see the module doc.)
    let mut still: HashSet<CtKeyOf<A>, KeyHash> = HashSet::default();
    for tier in [Tier::Established, Tier::New] {
        bpf_sys::for_each_batch::<CtKeyOf<A>, CtValueOf<A>>(t.fd(tier), |keys, values| {
            for (k, CtValueOf { e: v, .. }) in keys.iter().zip(values) {
                if done.contains(k) && v.expired(v.last_seen_s, now_s) {
                    still.insert(*k);
                }
            }
        })
        .with_context(|| format!("re-reading the {tier:?} conntrack tier"))?;
    }
    st.recheck = started.elapsed() - st.walk;
    let mut removed = [0u64; 2];
    for (i, tier) in [Tier::Established, Tier::New].into_iter().enumerate() {
        let keys: Vec<CtKeyOf<A>> = doomed[i]
            .iter()
            .filter(|k| {
                // Both entries of the flow must still be expired (or the partner absent).
                let e_ok = still.contains(*k);
                e_ok && candidates.get(*k).is_some_and(|(e, _)| {
                    let pk = e.partner_key(k);
                    !candidates.contains_key(&pk) || still.contains(&pk)
                })
            })
            .copied()
            .collect();
        removed[i] = bpf_sys::delete_batch(t.fd(tier), &keys)
            .with_context(|| format!("deleting from the {tier:?} conntrack tier"))?;
    }
    st.delete = started.elapsed() - st.walk - st.recheck;
    st.removed = removed[0] + removed[1];
    st.established_entries = seen[0].saturating_sub(removed[0]);
    st.new_entries = seen[1].saturating_sub(removed[1]);
    st.duration = started.elapsed();
    Ok(st)
}

/// Removes the UDP entries (both directions, both tiers) whose (Service-port id, backend id) is
/// in `gone`. Returns the number of entries removed.
pub fn flush_udp<A: CtAddr>(t: &CtTiers<A>, gone: &BTreeSet<(u32, u32)>) -> Result<u64>
where
    CtKeyOf<A>: aya::Pod,
    CtValueOf<A>: aya::Pod,
{
    if gone.is_empty() {
        return Ok(0);
    }
    let mut removed = 0;
    for tier in [Tier::Established, Tier::New] {
        let mut doomed = Vec::new();
        bpf_sys::for_each_batch::<CtKeyOf<A>, CtValueOf<A>>(t.fd(tier), |keys, values| {
            for (k, CtValueOf { e: v, .. }) in keys.iter().zip(values) {
                if k.proto == proto::UDP && gone.contains(&(v.svc_port_id, v.backend_id)) {
                    doomed.push(*k);
                }
            }
        })?;
        removed += bpf_sys::delete_batch(t.fd(tier), &doomed)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{CtEntry, CtKey};

    #[test]
    fn partner_of_partner_is_the_key() {
        let k = CtKey {
            saddr_be: 1,
            daddr_be: 2,
            sport_be: 3,
            dport_be: 4,
            proto: 17,
            _pad: [0; 3],
        };
        let e = CtEntry {
            nat_saddr_be: 5,
            nat_daddr_be: 6,
            nat_sport_be: 7,
            nat_dport_be: 8,
            svc_port_id: 1,
            backend_id: 1,
            last_seen_s: 0,
            flags: 0,
            state: 0,
            _pad: 0,
            seq_next: 0,
        };
        let pk = e.partner_key(&k);
        assert_eq!(
            (pk.saddr_be, pk.daddr_be, pk.sport_be, pk.dport_be),
            (6, 5, 8, 7)
        );
        // The reply entry translates back to the original addresses.
        let pe = CtEntry {
            nat_saddr_be: k.daddr_be,
            nat_daddr_be: k.saddr_be,
            nat_sport_be: k.dport_be,
            nat_dport_be: k.sport_be,
            ..e
        };
        assert_eq!(pe.partner_key(&pk), k);
    }

    #[test]
    fn addresses_read_as_their_wire_bytes() {
        let v6: Addr6 = [
            u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]),
            0,
            0,
            u32::from_ne_bytes([0, 0, 0, 0x01]),
        ];
        assert_eq!(v6.ip().to_string(), "2001:db8::1");
        assert_eq!(
            u32::from_ne_bytes([10, 0, 0, 1]).ip().to_string(),
            "10.0.0.1"
        );
    }

    #[test]
    fn latest_handles_wrapping() {
        assert_eq!(latest(10, 20), 20);
        assert_eq!(latest(20, 10), 20);
        assert_eq!(latest(u32::MAX - 1, 3), 3);
    }
}
