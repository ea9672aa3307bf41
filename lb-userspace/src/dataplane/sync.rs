//! Incremental sync: diff the desired state against what is programmed and apply the minimal map
//! operations, in an order where every intermediate state is valid for the datapath:
//! 1. removed frontends (master first), strays, then backends and names nothing uses any more:
//!    a shrinking cluster frees entries before anything grows;
//! 2. per new or changed frontend, when the maps have room for what it adds (else it waits, see
//!    [`Syncer::sync`]): its backends that are new or changed, its rev-NAT entry, backend slots
//!    (new slots beyond the current count are invisible until the master says so; an in-place
//!    slot change swaps one live backend for another), membership;
//! 3. its master entry (count, flags) last, then slots beyond the new count;
//! 4. backends and names that lost their last reference.
//!
//! One endpoint change touches O(1) entries: a removed backend's slot is refilled by a new one or
//! by the last slot, so the other slots keep their backends.
//!
//! North-south frontends (NodePort, LoadBalancer, external IP) with two or more backends also get
//! a Maglev table (see [`super::maglev`]), shared by every frontend with the same backend set
//! (the books are kept in `maglev_tables`). A changed set gets a new table, written
//! in full before the master switches to it (one atomic write), and the old table is deleted
//! after: a new flow sees either the old or the new table, never a mix.
//!
//! Adoption ([`Syncer::adopt`]) takes the maps as it finds them, also after a sync that was
//! killed half-way: a counted slot that is missing or names no backend is kept as a hole, a
//! table that is not exactly the frontend's is not adopted, and the first sync compares every
//! frontend, so it rewrites whatever is wrong; it never deletes what a master still counts or
//! names before that master is rewritten. Entries nothing explains (slots no master counts,
//! rev-NAT entries and backends nothing uses) go with the other removals; the chunks of a table
//! a master still points at, and backends such a table or a membership entry still names, wait
//! until that master has been applied. The replay in [`super::crash`] kills a sync after each
//! of its writes to check all of this.
use std::{
    collections::{hash_map::Entry, BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
};

use anyhow::Result;
use lb_common::{Backend, Config, FrontendSlot, FrontendSlotKey, MaglevKey, MemberKey, RevNat};

use super::{
    addr6::{Addr6Table, Change, Strays},
    capacity::{table_chunks, Entries, MapSizes, Shortfall},
    ids::IdAllocator,
    maglev,
    maglev_tables::{chunk_count, table_of, wants_table, MaglevTables},
    Dataplane, MapContents,
};
use crate::control::desired::{
    backend_value, service_key_in, BackendKey, Desired, DesiredFrontend, FrontendKey,
};

#[derive(Clone, Debug, PartialEq, Eq)]
struct ProgrammedFrontend {
    rev_nat_id: u32,
    svc_port_id: u32,
    flags: u16,
    affinity_timeout_s: u32,
    /// Backend id of slot `i + 1`; 0 marks a slot known to be missing.
    slots: Vec<u32>,
    /// (Maglev table id, M); (0, 0) without a table.
    maglev: (u32, u32),
}

/// Counters of one sync pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub writes: u64,
    /// UDP conntrack entries removed because their backend left the Service port.
    pub udp_flows_flushed: u64,
    /// Frontends left as they were because a map had no room: (frontend, Service port, why).
    pub deferred: Vec<(FrontendKey, String, Shortfall)>,
}

pub struct Syncer<D: Dataplane> {
    dp: D,
    frontends: BTreeMap<FrontendKey, ProgrammedFrontend>,
    backends: HashMap<BackendKey, (u32, Backend)>,
    /// The key of each backend id in `backends`.
    backend_keys: HashMap<u32, BackendKey>,
    backend_refs: HashMap<u32, u32>,
    backend_ids: IdAllocator,
    rev_nat: HashMap<SocketAddr, (u32, u32)>, // frontend address -> (id, references)
    rev_nat_ids: IdAllocator,
    /// Entries found at adoption that no desired state explains (removed on the next sync).
    stray_services: Vec<FrontendSlotKey>,
    stray_backends: Vec<u32>,
    stray_rev_nat: Vec<u32>,
    config: Config,
    config6: lb_common::Config6,
    /// Service port (see `DesiredFrontend::service_port`) -> id shared by its frontends.
    svc_port_ids: HashMap<String, u32>,
    svc_port_alloc: IdAllocator,
    /// Programmed membership entries: (frontend, backend id) -> slot.
    members: BTreeMap<MemberKey, u32>,
    /// Maglev tables by backend set.
    tables: MaglevTables,
    /// Chunks found at adoption that no table explains.
    stray_maglev: Vec<MaglevKey>,
    /// Backend ids named by the Maglev tables that masters found at adoption point at but that
    /// were not adopted, by table id: those backends stay while a master points at the table.
    stale_tables: HashMap<u32, Vec<u32>>,
    /// What was last applied per frontend: later syncs touch only frontends whose desired
    /// state differs, so one endpoint change costs O(changed) work, not O(cluster).
    applied: HashMap<FrontendKey, DesiredFrontend>,
    /// Frontends per Service-port name (a name dies with its last frontend).
    name_refs: HashMap<String, u32>,
    /// Backends whose last reference went away in this sync.
    maybe_unused: Vec<u32>,
    /// (Service-port id, backend id) of UDP frontends' backends that left a frontend in this
    /// sync: their conntrack flows are flushed unless the backend still serves the Service port.
    departed: BTreeSet<(u32, u32)>,
    /// Counts the changes of `svc_port_ids` ([`Syncer::names_version`]).
    names_version: u64,
    /// The next sync compares everything (the first one after adoption).
    full_pass: bool,
    /// Frontends the last sync left as they were for want of room (compared again by the next
    /// [`Syncer::sync_touched`] whatever it is told).
    waiting: BTreeSet<FrontendKey>,
    /// Total map writes since start.
    pub total_writes: u64,
    /// What the maps can hold.
    sizes: MapSizes,
    /// Programmed loadBalancerSourceRanges prefixes by Service-port id.
    ranges: BTreeMap<u32, BTreeSet<(IpAddr, u8)>>,
    /// The IPv6 addresses the maps mention, with their handles.
    addrs: Addr6Table,
    /// Entries of the address tables found at adoption that form no pair.
    stray_addrs: Strays,
}

impl<D: Dataplane> Syncer<D> {
    /// Adopts whatever the dataplane already holds (pinned maps of an earlier agent), so that a
    /// restarted agent rewrites nothing that is still right, and repairs the rest on the first
    /// sync (which compares every frontend): a counted slot that is missing or names no backend,
    /// membership entries that are not those of the slots, a Maglev table that is not exactly
    /// the frontend's, a master whose rev-NAT entry is not its own; entries nothing explains go
    /// once the masters are right (see the module documentation).
    pub fn adopt(dp: D) -> Result<Self> {
        let found = dp.contents()?;
        let (addrs, stray_addrs) = Addr6Table::adopt(&found.addr6_ids, &found.addr6);
        let mut s = Self {
            dp,
            frontends: BTreeMap::new(),
            backends: HashMap::new(),
            backend_keys: HashMap::new(),
            backend_refs: HashMap::new(),
            backend_ids: IdAllocator::with_used(found.backends.keys().copied()),
            rev_nat: HashMap::new(),
            rev_nat_ids: IdAllocator::with_used(found.rev_nat.keys().copied()),
            stray_services: Vec::new(),
            stray_backends: Vec::new(),
            stray_rev_nat: Vec::new(),
            config: found.config,
            config6: found.config6,
            svc_port_ids: HashMap::new(),
            svc_port_alloc: IdAllocator::with_used(
                found
                    .services
                    .iter()
                    .filter(|(k, _)| k.slot == 0)
                    .map(|(_, v)| v.svc_port_id)
                    .chain(found.service_names.keys().copied()),
            ),
            members: found.members.clone(),
            tables: MaglevTables::with_used(found.maglev.keys().map(|k| k.table_id)),
            stray_maglev: Vec::new(),
            stale_tables: HashMap::new(),
            applied: HashMap::new(),
            name_refs: HashMap::new(),
            maybe_unused: Vec::new(),
            departed: BTreeSet::new(),
            names_version: 0,
            full_pass: true,
            waiting: BTreeSet::new(),
            total_writes: 0,
            sizes: MapSizes::default(),
            ranges: BTreeMap::new(),
            addrs,
            stray_addrs,
        };
        for (id, net, len) in &found.source_ranges {
            s.ranges.entry(*id).or_default().insert((*net, *len));
        }
        // Service-port identities as the names map recorded them.
        for (id, name) in &found.service_names {
            s.svc_port_ids.insert(name.clone(), *id);
        }
        s.load(found);
        Ok(s)
    }

    fn load(&mut self, found: MapContents) {
        for (id, b) in &found.backends {
            let v6 = b.flags & lb_common::backend_flags::IPV6 != 0;
            // An IPv6 backend whose handle is not interned names nothing: a stray.
            let Some(addr) = self.sock_of(b.addr_be, b.port_be, v6) else {
                self.stray_backends.push(*id);
                continue;
            };
            let key = BackendKey {
                addr,
                proto: b.proto,
            };
            match self.backends.entry(key) {
                // A duplicate: keep the first id.
                Entry::Occupied(_) => self.stray_backends.push(*id),
                Entry::Vacant(v) => {
                    v.insert((*id, *b));
                    self.backend_keys.insert(*id, key);
                    self.addrs.refer(addr.ip());
                }
            }
        }
        let mut rev_by_id = HashMap::new();
        for (id, r) in &found.rev_nat {
            let v6 = r.flags & lb_common::rev_nat_flags::IPV6 != 0;
            let Some(addr) = self.sock_of(r.addr_be, r.port_be, v6) else {
                self.stray_rev_nat.push(*id);
                continue;
            };
            match self.rev_nat.entry(addr) {
                Entry::Occupied(_) => self.stray_rev_nat.push(*id),
                Entry::Vacant(v) => {
                    v.insert((*id, 0));
                    rev_by_id.insert(*id, addr);
                    self.addrs.refer(addr.ip());
                }
            }
        }
        // Each master's counted slots: one that is missing or names no (adopted) backend is
        // kept as 0, a hole the next sync fills before anything it counts is deleted.
        let live: std::collections::HashSet<u32> =
            self.backends.values().map(|(id, _)| *id).collect();
        for (k, v) in found.services.iter().filter(|(k, _)| k.slot == 0) {
            let Some(fe) = self.frontend_of(k) else {
                self.stray_services.push(*k);
                continue;
            };
            let slots = (1..=v.count)
                .map(|slot| {
                    let id = found
                        .services
                        .get(&FrontendSlotKey { slot, ..*k })
                        .map_or(0, |s| s.backend_id);
                    if live.contains(&id) {
                        id
                    } else {
                        0
                    }
                })
                .collect();
            if rev_by_id.get(&v.rev_nat_id) != Some(&fe.addr) {
                // The master points at a rev-NAT entry that is not its own: rewrite it.
                self.stray_services.push(*k);
                continue;
            }
            self.frontends.insert(
                fe,
                ProgrammedFrontend {
                    rev_nat_id: v.rev_nat_id,
                    svc_port_id: v.svc_port_id,
                    flags: v.flags,
                    affinity_timeout_s: v.affinity_timeout_s,
                    slots,
                    maglev: (v.maglev_id, v.maglev_m),
                },
            );
        }
        self.adopt_tables(&found);
        for (k, _) in found.services.iter().filter(|(k, _)| k.slot != 0) {
            let in_use = self.frontend_of(k).is_some_and(|fe| {
                self.frontends
                    .get(&fe)
                    .is_some_and(|p| (k.slot as usize) <= p.slots.len())
            });
            if !in_use {
                self.stray_services.push(*k);
            }
        }
        for p in self.frontends.values() {
            for id in p.slots.iter().filter(|id| **id != 0) {
                *self.backend_refs.entry(*id).or_default() += 1;
            }
        }
        for p in self.frontends.values() {
            let addr = rev_by_id[&p.rev_nat_id];
            self.rev_nat.get_mut(&addr).expect("loaded above").1 += 1;
        }
    }

    /// The socket address a map entry holds (an IPv6 one as its handle when `v6`; `None` when
    /// the handle is not interned).
    fn sock_of(&self, addr_be: u32, port_be: u16, v6: bool) -> Option<SocketAddr> {
        let ip = self.addrs.ip_of(addr_be, v6)?;
        Some(SocketAddr::new(ip, u16::from_be(port_be)))
    }

    /// The frontend a services-map key belongs to (`None`: an IPv6 handle not interned).
    fn frontend_of(&self, k: &FrontendSlotKey) -> Option<FrontendKey> {
        let v6 = k.scope & lb_common::scope::IPV6 != 0;
        Some(FrontendKey {
            addr: self.sock_of(k.addr_be, k.port_be, v6)?,
            proto: k.proto,
            scope: k.scope & !lb_common::scope::IPV6,
        })
    }

    /// The services-map key of a frontend's slot.
    fn key(&self, fe: &FrontendKey, slot: u16) -> FrontendSlotKey {
        service_key_in(fe, slot, &self.addrs)
    }

    /// One more entry names `ip`: an IPv6 address new to the maps is interned first.
    fn refer_addr(&mut self, ip: IpAddr) -> Result<()> {
        let change = self.addrs.refer(ip);
        self.apply_addr(change)
    }

    /// An entry naming `ip` was deleted: the last one takes the address out of the tables.
    fn release_addr(&mut self, ip: IpAddr) -> Result<()> {
        let change = self.addrs.release(ip);
        self.apply_addr(change)
    }

    /// Writes what the address table asks for, in the order [`Change`] gives.
    fn apply_addr(&mut self, change: Change) -> Result<()> {
        match change {
            Change::None => {}
            Change::Put(h, a) => {
                self.write(|dp| dp.put_addr6_id(h, a))?;
                self.write(|dp| dp.put_addr6(a, h))?;
            }
            Change::Del(h, a) => {
                self.write(|dp| dp.del_addr6(a))?;
                self.write(|dp| dp.del_addr6_id(h))?;
            }
        }
        Ok(())
    }

    /// Keeps the Maglev tables that are exactly what this agent would write for their frontends;
    /// frontends with any other table get a fresh one on the next sync, and chunks nobody uses
    /// are removed then. A master keeps its (not adopted) table meanwhile: where another
    /// frontend adopted that table, the master holds a reference to it, so that its chunks stay
    /// until the master has been rewritten or removed (a killed sync may leave one frontend of a
    /// shared table switched, or its slots changed, and the other not).
    fn adopt_tables(&mut self, found: &MapContents) {
        let by_id: HashMap<u32, BackendKey> =
            self.backends.iter().map(|(k, (id, _))| (*id, *k)).collect();
        let fes: Vec<FrontendKey> = self.frontends.keys().copied().collect();
        let mut not_adopted = Vec::new();
        for fe in fes {
            let p = &self.frontends[&fe];
            let (id, m) = p.maglev;
            if id == 0 {
                continue;
            }
            let keys: Option<Vec<BackendKey>> =
                p.slots.iter().map(|s| by_id.get(s).copied()).collect();
            let backends = &self.backends;
            let adopted = keys.is_some_and(|set| {
                self.tables
                    .adopt(id, m, set, |k| backends[k].0, &found.maglev)
            });
            if !adopted {
                not_adopted.push((id, m));
            }
        }
        for (id, m) in not_adopted {
            self.tables.hold(id);
            let named = (0..chunk_count(m))
                .filter_map(|c| {
                    found.maglev.get(&MaglevKey {
                        table_id: id,
                        chunk: c,
                    })
                })
                .flat_map(|chunk| chunk.backend_ids.iter().copied())
                .filter(|b| *b != 0);
            self.stale_tables.entry(id).or_default().extend(named);
        }
        for k in found.maglev.keys() {
            if !self.tables.explains(k) {
                self.stray_maglev.push(*k);
            }
        }
    }

    /// The table for `set`, written now when no frontend uses it yet.
    fn ref_table(&mut self, set: &[BackendKey]) -> Result<(u32, u32)> {
        if let Some(t) = self.tables.share(set) {
            return Ok(t);
        }
        let backends = &self.backends;
        let (m, table) = table_of(set, |k| backends[k].0);
        let id = self.tables.new_id();
        for (c, chunk) in maglev::chunks(&table).iter().enumerate() {
            let key = MaglevKey {
                table_id: id,
                chunk: c as u32,
            };
            self.write(|dp| dp.put_maglev(&key, chunk))?;
        }
        self.tables.insert(set, id, m);
        Ok((id, m))
    }

    /// Drops a reference; the last one deletes the table's chunks.
    fn unref_table(&mut self, id: u32) -> Result<()> {
        let Some(m) = self.tables.unref(id) else {
            return Ok(());
        };
        for c in 0..chunk_count(m) {
            let key = MaglevKey {
                table_id: id,
                chunk: c,
            };
            self.write(|dp| dp.del_maglev(&key))?;
        }
        self.tables.release(id);
        // What the table named when it was found at adoption goes with it: its id may be
        // handed out again, to a table naming other backends.
        self.stale_tables.remove(&id);
        Ok(())
    }

    /// The sizes of the maps written to (their defaults until told).
    pub fn set_sizes(&mut self, sizes: MapSizes) {
        self.sizes = sizes;
    }

    /// Writes the datapath config (node address, SNAT ports) when it changed.
    pub fn set_config(&mut self, config: &Config) -> Result<u64> {
        if self.config == *config {
            return Ok(0);
        }
        self.write(|dp| dp.put_config(config))?;
        self.config = *config;
        Ok(1)
    }

    /// Writes the IPv6 half of the datapath config (the node's IPv6 address) when it changed.
    pub fn set_config6(&mut self, config: &lb_common::Config6) -> Result<u64> {
        if self.config6 == *config {
            return Ok(0);
        }
        self.write(|dp| dp.put_config6(config))?;
        self.config6 = *config;
        Ok(1)
    }

    /// (rev-NAT id, protocol) -> Service-port id of every programmed frontend (for conntrack
    /// migration; a rev-NAT id names an address and port, shared by TCP and UDP).
    pub fn svc_port_by_rev_nat(&self) -> HashMap<(u32, u8), u32> {
        self.frontends
            .iter()
            .map(|(k, p)| ((p.rev_nat_id, k.proto), p.svc_port_id))
            .collect()
    }

    /// Changes whenever [`Syncer::service_ports`] does (so a caller that copies them need not
    /// copy them after every sync).
    pub fn names_version(&self) -> u64 {
        self.names_version
    }

    /// Service port (`namespace/name:port/PROTO`) -> its id in the maps.
    pub fn service_ports(&self) -> &HashMap<String, u32> {
        &self.svc_port_ids
    }

    pub fn dataplane(&self) -> &D {
        &self.dp
    }

    /// Applies `desired`, returning how many map writes it took.
    ///
    /// Order: first what is no longer desired is removed (frontends, strays, backends and names
    /// nothing uses any more), so a shrinking cluster frees entries before anything grows. Then
    /// each new or changed frontend is applied when the maps have room for what it adds
    /// (backends before the slots that point at them); one that does not fit is left as it was
    /// and tried again after the entries the others released are freed, the last time after
    /// shrinking it to the backends it keeps (break before make). What still does not fit is
    /// reported in [`SyncStats::deferred`] and tried again by the next sync: one frontend
    /// without room never stops the others.
    pub fn sync(&mut self, desired: &Desired) -> Result<SyncStats> {
        self.sync_some(desired, None)
    }

    /// [`Syncer::sync`] when the caller knows which frontends' desired state may have changed
    /// since the last sync (`touched`: `control::memo::Update::touched`): only those are
    /// compared, so the pass costs what changed, not the cluster. The frontends left waiting for
    /// room by the last sync are compared too; the first sync after adoption compares
    /// everything anyway.
    pub fn sync_touched(
        &mut self,
        desired: &Desired,
        touched: &BTreeSet<FrontendKey>,
    ) -> Result<SyncStats> {
        self.sync_some(desired, Some(touched))
    }

    fn sync_some(
        &mut self,
        desired: &Desired,
        touched: Option<&BTreeSet<FrontendKey>>,
    ) -> Result<SyncStats> {
        let before = self.total_writes;
        let full = self.full_pass;
        let waiting = std::mem::take(&mut self.waiting);
        let touched: Option<BTreeSet<FrontendKey>> = touched
            .filter(|_| !full)
            .map(|t| t.iter().chain(&waiting).copied().collect());
        // Frontends to (re)apply: all of them on a full pass, else those whose desired state
        // changed since it was applied.
        let changed: Vec<(FrontendKey, &DesiredFrontend)> = if full {
            desired.iter().map(|(k, d)| (*k, d)).collect()
        } else if let Some(t) = &touched {
            t.iter()
                .filter_map(|k| desired.get_key_value(k))
                .filter(|(k, d)| self.applied.get(*k) != Some(*d))
                .map(|(k, d)| (*k, d))
                .collect()
        } else {
            desired
                .iter()
                .filter(|(k, d)| self.applied.get(*k) != Some(*d))
                .map(|(k, d)| (*k, d))
                .collect()
        };
        let gone: Vec<FrontendKey> = if let Some(t) = &touched {
            t.iter()
                .filter(|k| !desired.contains_key(k) && self.frontends.contains_key(k))
                .copied()
                .collect()
        } else if full || desired.len() != self.applied.len() || !changed.is_empty() {
            self.frontends
                .keys()
                .filter(|k| !desired.contains_key(k))
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        // Backends and names the changed frontends want stay while the others are freed.
        let wanted: HashSet<BackendKey> = changed
            .iter()
            .flat_map(|(_, d)| d.backends.iter().map(|(k, _)| *k))
            .collect();
        let wanted_names: HashSet<&str> = changed
            .iter()
            .map(|(_, d)| d.service_port.as_str())
            .collect();
        let mut dead_names: Vec<String> = Vec::new();
        // 1. removals: frontends no longer desired, strays, then unreferenced entries.
        for fe in &gone {
            if let Some(o) = self.applied.remove(fe) {
                dead_names.extend(self.unref_name(&o.service_port));
            }
        }
        for fe in gone {
            self.remove_frontend(&fe)?;
        }
        if full {
            let stray_members: Vec<MemberKey> = self
                .members
                .keys()
                .filter(|m| {
                    self.frontend_of(&m.frontend)
                        .is_none_or(|fe| !self.frontends.contains_key(&fe))
                })
                .copied()
                .collect();
            for m in stray_members {
                self.write(|dp| dp.del_member(&m))?;
                self.members.remove(&m);
            }
        }
        for k in self.take_stray_services() {
            self.write(|dp| dp.del_service(&k))?;
        }
        // Address-table entries that form no pair name nothing (an entry naming their handle
        // was a stray); gone before any handle is handed out, which could be theirs.
        let strays = std::mem::take(&mut self.stray_addrs);
        for a in strays.addrs {
            self.write(|dp| dp.del_addr6(a))?;
        }
        for h in strays.ids {
            self.write(|dp| dp.del_addr6_id(h))?;
        }
        for k in self.take_stray_maglev() {
            self.write(|dp| dp.del_maglev(&k))?;
        }
        for (id, addr) in self.take_stray_rev_nat(full) {
            self.write(|dp| dp.del_rev_nat(id))?;
            if let Some(addr) = addr {
                self.release_addr(addr.ip())?;
            }
        }
        for id in std::mem::take(&mut self.stray_backends) {
            self.write(|dp| dp.del_backend(id))?;
        }
        self.free_backends(full, &wanted)?;
        dead_names.retain(|n| !wanted_names.contains(n.as_str()));
        self.free_names(std::mem::take(&mut dead_names))?;
        // 2. frontends that are new or changed, in rounds while the maps are short of room.
        let mut pending = changed;
        let mut deferred = Vec::new();
        for round in 0..3 {
            if pending.is_empty() {
                break;
            }
            if round == 2 {
                // Break before make: frontends that replace backends in full maps move in
                // steps, each freeing what the next one needs.
                let mut left = Vec::new();
                for (fe, d) in pending {
                    if !self.walk_to(&fe, d, &mut dead_names)? {
                        left.push((fe, d));
                    }
                }
                pending = left;
            }
            let mut used = self.entries();
            let mut later = Vec::new();
            for (fe, d) in pending {
                let needs = self.needs(&fe, d);
                if let Some(short) = used.overflow(&needs, &self.sizes) {
                    later.push((fe, d, short));
                    continue;
                }
                used.add(&needs);
                self.apply(&fe, d, &mut dead_names)?;
            }
            // Entries the applied frontends released make room for the next round.
            let keep: HashSet<BackendKey> = later
                .iter()
                .flat_map(|(_, d, _)| d.backends.iter().map(|(k, _)| *k))
                .collect();
            self.free_backends(false, &keep)?;
            deferred = later
                .iter()
                .map(|(fe, d, short)| (*fe, d.service_port.clone(), short.clone()))
                .collect();
            pending = later.into_iter().map(|(fe, d, _)| (fe, d)).collect();
        }
        if full {
            // Names found at adoption that nothing uses.
            dead_names.extend(
                self.svc_port_ids
                    .keys()
                    .filter(|k| !self.name_refs.contains_key(*k))
                    .cloned(),
            );
        }
        // Chunks of tables that masters pointed at until they were applied just now.
        for k in self.take_stray_maglev() {
            self.write(|dp| dp.del_maglev(&k))?;
        }
        // A deferred frontend's name stays while it waits (its id keeps its counters).
        let waiting: HashSet<&str> = deferred.iter().map(|(_, n, _)| n.as_str()).collect();
        dead_names.retain(|n| !waiting.contains(n.as_str()));
        self.free_names(dead_names)?;
        self.maybe_unused.clear();
        self.free_ranges()?;
        if full {
            self.free_unreferenced_addrs()?;
        }
        let udp_flows_flushed = self.flush_departed()?;
        self.full_pass = false;
        self.waiting = deferred.iter().map(|(fe, _, _)| *fe).collect();
        Ok(SyncStats {
            writes: self.total_writes - before,
            udp_flows_flushed,
            deferred,
        })
    }

    /// Writes one new or changed frontend: its backends (new or changed), its name, its slots,
    /// and the name references.
    fn apply(
        &mut self,
        fe: &FrontendKey,
        d: &DesiredFrontend,
        dead_names: &mut Vec<String>,
    ) -> Result<()> {
        let mut keys: Vec<(BackendKey, u8)> = d.backends.clone();
        keys.sort();
        keys.dedup_by_key(|(k, _)| *k);
        for (k, flags) in keys {
            let known = self.backends.get(&k).copied();
            if known.is_none() {
                self.refer_addr(k.addr.ip())?;
            }
            let value = backend_value(&k, flags, &self.addrs);
            match known {
                Some((_, v)) if v == value => {}
                Some((id, _)) => {
                    self.write(|dp| dp.put_backend(id, &value))?;
                    self.backends.insert(k, (id, value));
                }
                None => {
                    let id = self.backend_ids.alloc();
                    self.write(|dp| dp.put_backend(id, &value))?;
                    self.backends.insert(k, (id, value));
                    self.backend_keys.insert(id, k);
                }
            }
        }
        // Service port ids: kept from the names map (adoption), else new, named before use.
        if !self.svc_port_ids.contains_key(&d.service_port) {
            let id = self.svc_port_alloc.alloc();
            self.write(|dp| dp.put_service_name(id, &d.service_port))?;
            self.svc_port_ids.insert(d.service_port.clone(), id);
            self.names_version += 1;
        }
        // The source ranges before a master that names them (a master whose flag finds no
        // entry admits nobody: never more than the ranges say).
        if let Some(want) = &d.source_ranges {
            self.sync_ranges(self.svc_port_ids[&d.service_port], want)?;
        }
        self.sync_frontend(fe, d)?;
        let old = self.applied.insert(*fe, d.clone());
        if old.as_ref().map(|o| &o.service_port) != Some(&d.service_port) {
            *self.name_refs.entry(d.service_port.clone()).or_default() += 1;
            if let Some(o) = old {
                dead_names.extend(self.unref_name(&o.service_port));
            }
        }
        Ok(())
    }

    /// Applies `d` to an existing frontend in steps when the maps lack room for its new
    /// backends while the old ones are still there (make before break): each step keeps the
    /// backends it shares with `d`, adds as many new ones as there is room for and drops the
    /// others, which frees their entries for the next step (else it keeps a single backend of
    /// its own, which needs no Maglev table); a step never leaves the frontend without a
    /// backend, except as the last resort (a frontend of one backend replacing it while no room
    /// is left for even one more), where it is empty between two writes. False: still no room.
    fn walk_to(
        &mut self,
        fe: &FrontendKey,
        d: &DesiredFrontend,
        dead_names: &mut Vec<String>,
    ) -> Result<bool> {
        for _ in 0..8 {
            let used = self.entries();
            // No step of the backends makes room in the source-ranges map.
            if used.source_ranges + self.needs(fe, d).source_ranges
                > u64::from(self.sizes.source_ranges)
            {
                return Ok(false);
            }
            if used.overflow(&self.needs(fe, d), &self.sizes).is_none() {
                self.apply(fe, d, dead_names)?;
                return Ok(true);
            }
            let Some(p) = self.frontends.get(fe) else {
                return Ok(false);
            };
            if !self.svc_port_ids.contains_key(&d.service_port) {
                return Ok(false);
            }
            let current: HashSet<u32> = p.slots.iter().copied().filter(|id| *id != 0).collect();
            let cap = |c: u32, u: u64| (c as u64).saturating_sub(u);
            let room = cap(self.sizes.backends, used.backends)
                .min(cap(self.sizes.frontend_slots, used.members))
                .min(cap(self.sizes.frontend_slots, used.slots)) as usize;
            let in_current = |k: &BackendKey| {
                self.backends
                    .get(k)
                    .is_some_and(|(id, _)| current.contains(id))
            };
            let mut seen = HashSet::new();
            let mut step: Vec<(BackendKey, u8)> = Vec::new();
            let mut added = 0;
            for (k, f) in &d.backends {
                if !seen.insert(*k) {
                    continue;
                }
                if in_current(k) {
                    step.push((*k, *f));
                } else if added < room {
                    added += 1;
                    step.push((*k, *f));
                }
            }
            let kept_all = step.len() == current.len() && added == 0;
            // One backend it has: no new entry, no Maglev table.
            let one: Vec<(BackendKey, u8)> = step
                .iter()
                .find(|(k, _)| in_current(k))
                .copied()
                .or_else(|| {
                    self.backends
                        .iter()
                        .find(|(_, (id, _))| current.contains(id))
                        .map(|(k, (_, v))| (*k, v.flags))
                })
                .into_iter()
                .collect();
            let mut choices = Vec::new();
            if !step.is_empty() && !kept_all {
                choices.push(step);
            }
            if one.len() < current.len() {
                choices.push(one);
            }
            choices.push(Vec::new());
            let next = choices
                .into_iter()
                .map(|backends| DesiredFrontend {
                    backends,
                    ..d.clone()
                })
                .find(|c| {
                    c.backends.is_empty()
                        || used.overflow(&self.needs(fe, c), &self.sizes).is_none()
                })
                .expect("the empty step always fits");
            self.apply(fe, &next, dead_names)?;
            let keep: HashSet<BackendKey> = d.backends.iter().map(|(k, _)| *k).collect();
            self.free_backends(false, &keep)?;
        }
        Ok(false)
    }

    /// Makes Service port `id`'s source ranges exactly `want`: the new prefixes first, then
    /// those it no longer has.
    fn sync_ranges(&mut self, id: u32, want: &BTreeSet<(IpAddr, u8)>) -> Result<()> {
        let have = self.ranges.get(&id).cloned().unwrap_or_default();
        for (net, len) in want.difference(&have) {
            let r = (id, *net, *len);
            self.write(|dp| dp.put_source_range(r))?;
            self.ranges.entry(id).or_default().insert((*net, *len));
        }
        for (net, len) in have.difference(want) {
            let r = (id, *net, *len);
            self.write(|dp| dp.del_source_range(r))?;
            if let Some(set) = self.ranges.get_mut(&id) {
                set.remove(&(*net, *len));
            }
        }
        if self.ranges.get(&id).is_some_and(|s| s.is_empty()) {
            self.ranges.remove(&id);
        }
        Ok(())
    }

    /// Removes the source ranges of Service ports no programmed frontend filters with any more
    /// (after their masters lost the flag or were removed).
    fn free_ranges(&mut self) -> Result<()> {
        if self.ranges.is_empty() {
            return Ok(());
        }
        let used: HashSet<u32> = self
            .frontends
            .values()
            .filter(|p| p.flags & lb_common::service_flags::SOURCE_RANGES != 0)
            .map(|p| p.svc_port_id)
            .collect();
        let dead: Vec<u32> = self
            .ranges
            .keys()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        for id in dead {
            for (net, len) in self.ranges.remove(&id).unwrap_or_default() {
                self.write(|dp| dp.del_source_range((id, net, len)))?;
            }
        }
        Ok(())
    }

    /// Removes a frontend that is no longer desired: master first, then its slots, membership,
    /// rev-NAT and Maglev references.
    fn remove_frontend(&mut self, fe: &FrontendKey) -> Result<()> {
        let Some(p) = self.frontends.remove(fe) else {
            return Ok(());
        };
        let master = self.key(fe, 0);
        self.write(|dp| dp.del_service(&master))?;
        for (i, id) in p.slots.iter().enumerate() {
            let k = self.key(fe, i as u16 + 1);
            self.write(|dp| dp.del_service(&k))?;
            self.unref_backend(*id);
        }
        self.sync_members(fe, &[], false)?;
        self.unref_rev_nat(fe.addr)?;
        self.unref_table(p.maglev.0)?;
        if fe.proto == lb_common::proto::UDP {
            self.departed.extend(
                p.slots
                    .iter()
                    .filter(|id| **id != 0)
                    .map(|id| (p.svc_port_id, *id)),
            );
        }
        Ok(())
    }

    /// Deletes backends no slot points at: every one on a full pass (`all`), else those that
    /// lost their last reference; `keep` stays (a frontend about to be applied wants it).
    fn free_backends(&mut self, all: bool, keep: &HashSet<BackendKey>) -> Result<()> {
        let candidates: Vec<u32> = if all {
            self.backends.values().map(|(id, _)| *id).collect()
        } else {
            std::mem::take(&mut self.maybe_unused)
        };
        if candidates.is_empty() {
            return Ok(());
        }
        let by_id: HashMap<u32, BackendKey> = if all {
            self.backends.iter().map(|(k, (id, _))| (*id, *k)).collect()
        } else {
            // Few candidates: their keys by id.
            candidates
                .iter()
                .filter_map(|id| Some((*id, *self.backend_keys.get(id)?)))
                .collect()
        };
        let named = self.still_named();
        let mut unused: Vec<(BackendKey, u32)> = Vec::new();
        for id in candidates {
            if self.backend_refs.get(&id).copied().unwrap_or(0) != 0 {
                continue;
            }
            match by_id.get(&id) {
                Some(k) if keep.contains(k) || named.contains(&id) => self.maybe_unused.push(id),
                Some(k) => unused.push((*k, id)),
                None => {}
            }
        }
        unused.sort();
        unused.dedup();
        for (k, id) in unused {
            self.write(|dp| dp.del_backend(id))?;
            self.backends.remove(&k);
            self.backend_keys.remove(&id);
            self.backend_refs.remove(&id);
            self.backend_ids.release(id);
            self.release_addr(k.addr.ip())?;
        }
        Ok(())
    }

    /// In the first sync after adoption: backends that no slot counts but that a membership
    /// entry or a table a master points at still names (a killed sync had moved a slot off
    /// them but not yet the rest). They go once their frontend is applied, not before: their
    /// ids could otherwise be handed out again while still named. Later syncs keep membership
    /// and tables in step with the slots, so the set is empty then (and costs nothing).
    fn still_named(&self) -> HashSet<u32> {
        if !self.full_pass {
            return HashSet::new();
        }
        let tables = self
            .frontends
            .values()
            .filter_map(|p| self.stale_tables.get(&p.maglev.0))
            .flatten();
        self.members
            .keys()
            .map(|m| m.backend_id)
            .chain(tables.copied())
            .collect()
    }

    /// Deletes the names (and frees the ids) of Service ports no frontend uses any more.
    fn free_names(&mut self, names: Vec<String>) -> Result<()> {
        for k in names {
            if self.name_refs.contains_key(&k) {
                continue;
            }
            if let Some(id) = self.svc_port_ids.remove(&k) {
                self.names_version += 1;
                self.write(|dp| dp.del_service_name(id))?;
                self.svc_port_alloc.release(id);
            }
        }
        Ok(())
    }

    /// What the service maps hold, as this syncer knows them.
    fn entries(&self) -> Entries {
        Entries {
            slots: self
                .frontends
                .values()
                .map(|p| 1 + p.slots.len() as u64)
                .sum::<u64>()
                + self.stray_services.len() as u64,
            members: self.members.len() as u64,
            backends: (self.backends.len() + self.stray_backends.len()) as u64,
            rev_nat: (self.rev_nat.len() + self.stray_rev_nat.len()) as u64,
            service_ports: self.svc_port_ids.len() as u64,
            maglev_chunks: self.tables.chunks() + self.stray_maglev.len() as u64,
            source_ranges: self.ranges.values().map(|s| s.len() as u64).sum(),
        }
    }

    /// The entries applying `d` to `fe` adds before anything it replaces is freed.
    fn needs(&self, fe: &FrontendKey, d: &DesiredFrontend) -> Entries {
        let set: BTreeSet<BackendKey> = d.backends.iter().map(|(k, _)| *k).collect();
        let old = self.frontends.get(fe);
        let have: HashSet<u32> = old
            .map(|p| p.slots.iter().copied().collect())
            .unwrap_or_default();
        let mut n = Entries::default();
        for k in &set {
            match self.backends.get(k) {
                None => {
                    n.backends += 1;
                    n.members += 1;
                }
                Some((id, _)) if !have.contains(id) => n.members += 1,
                Some(_) => {}
            }
        }
        n.slots = match old {
            None => 1 + set.len() as u64,
            Some(p) => (set.len() as u64).saturating_sub(p.slots.len() as u64),
        };
        if old.is_none() && !self.rev_nat.contains_key(&fe.addr) {
            n.rev_nat = 1;
        }
        if !self.svc_port_ids.contains_key(&d.service_port) {
            n.service_ports = 1;
        }
        if let Some(want) = &d.source_ranges {
            let have = self
                .svc_port_ids
                .get(&d.service_port)
                .and_then(|id| self.ranges.get(id));
            n.source_ranges = want
                .iter()
                .filter(|r| !have.is_some_and(|h| h.contains(r)))
                .count() as u64;
        }
        if wants_table(fe, d, set.len()) {
            let set: Vec<BackendKey> = set.into_iter().collect();
            if !self.tables.has(&set) {
                n.maglev_chunks = table_chunks(set.len());
            }
        }
        n
    }

    /// The entries found at adoption that no frontend explained (a killed sync can leave slots
    /// written for a master it had not written yet, or beyond a master's count), less any the
    /// sync has written again for a master that now counts them: deleting those would leave the
    /// master counting a slot that is gone.
    fn take_stray_services(&mut self) -> Vec<FrontendSlotKey> {
        let mut strays = std::mem::take(&mut self.stray_services);
        strays.retain(|k| {
            self.frontend_of(k).is_none_or(|fe| {
                self.frontends
                    .get(&fe)
                    .is_none_or(|p| k.slot as usize > p.slots.len())
            })
        });
        strays
    }

    /// Maglev chunks found at adoption that no adopted table explains and no master points at
    /// any more (a master found pointing at one keeps it until it is applied or removed).
    fn take_stray_maglev(&mut self) -> Vec<MaglevKey> {
        if self.stray_maglev.is_empty() {
            return Vec::new();
        }
        let pointed: HashSet<u32> = self
            .frontends
            .values()
            .map(|p| p.maglev.0)
            .filter(|id| *id != 0)
            .collect();
        let (keep, out) = std::mem::take(&mut self.stray_maglev)
            .into_iter()
            .partition(|k| pointed.contains(&k.table_id));
        self.stray_maglev = keep;
        self.stale_tables.retain(|id, _| pointed.contains(id));
        out
    }

    /// Rev-NAT entries to delete: duplicates found at adoption and, on the first sync after it,
    /// those no frontend uses (a killed sync wrote one before its frontend's master, or had
    /// removed the master and not yet the entry).
    /// Each comes with the address whose reference it held (to be dropped once it is deleted).
    fn take_stray_rev_nat(&mut self, full: bool) -> Vec<(u32, Option<SocketAddr>)> {
        let mut out: Vec<(u32, Option<SocketAddr>)> = std::mem::take(&mut self.stray_rev_nat)
            .into_iter()
            .map(|id| (id, None))
            .collect();
        if full {
            let unused: Vec<SocketAddr> = self
                .rev_nat
                .iter()
                .filter(|(_, (_, refs))| *refs == 0)
                .map(|(addr, _)| *addr)
                .collect();
            for addr in unused {
                let (id, _) = self.rev_nat.remove(&addr).expect("listed above");
                self.rev_nat_ids.release(id);
                out.push((id, Some(addr)));
            }
            out.sort();
        }
        out
    }

    /// At the end of the first sync following adoption: interned addresses nothing names any
    /// more (a killed sync left them).
    fn free_unreferenced_addrs(&mut self) -> Result<()> {
        for change in self.addrs.take_unreferenced() {
            self.apply_addr(change)?;
        }
        Ok(())
    }

    /// Flushes the UDP conntrack flows of backends that left a UDP frontend in this sync and no
    /// longer serve its Service port through any frontend (kube-proxy clears conntrack for
    /// removed UDP endpoints): the flow's next datagram is balanced again. A backend that still
    /// serves the Service port through another frontend (another address, or the other traffic
    /// scope) keeps its flows: a conntrack entry names the Service port and the backend, and
    /// the flows through that frontend are still right. TCP flows stay: a connection to a
    /// terminating backend may finish. Runs after every map write of the sync, when no slot
    /// points at the backend any more, and before its id can be handed out again.
    fn flush_departed(&mut self) -> Result<u64> {
        let mut gone = std::mem::take(&mut self.departed);
        if gone.is_empty() {
            return Ok(0);
        }
        let svc_ports: BTreeSet<u32> = gone.iter().map(|(s, _)| *s).collect();
        for (k, p) in &self.frontends {
            if k.proto != lb_common::proto::UDP || !svc_ports.contains(&p.svc_port_id) {
                continue;
            }
            for id in &p.slots {
                gone.remove(&(p.svc_port_id, *id));
            }
        }
        if gone.is_empty() {
            return Ok(0);
        }
        self.dp.flush_udp_flows(&gone)
    }

    /// Drops one reference to a Service-port name; returns it when that was the last.
    fn unref_name(&mut self, name: &str) -> Option<String> {
        let r = self.name_refs.get_mut(name)?;
        *r -= 1;
        if *r == 0 {
            self.name_refs.remove(name);
            return Some(name.to_string());
        }
        None
    }

    fn write(&mut self, op: impl FnOnce(&mut D) -> Result<()>) -> Result<()> {
        self.total_writes += 1;
        op(&mut self.dp)
    }

    fn unref_backend(&mut self, id: u32) {
        if let Some(r) = self.backend_refs.get_mut(&id) {
            *r = r.saturating_sub(1);
            if *r == 0 {
                self.maybe_unused.push(id);
            }
        }
    }

    fn unref_rev_nat(&mut self, addr: SocketAddr) -> Result<()> {
        let Some((id, refs)) = self.rev_nat.get_mut(&addr) else {
            return Ok(());
        };
        *refs -= 1;
        if *refs == 0 {
            let id = *id;
            self.rev_nat.remove(&addr);
            self.write(|dp| dp.del_rev_nat(id))?;
            self.rev_nat_ids.release(id);
            self.release_addr(addr.ip())?;
        }
        Ok(())
    }

    fn sync_frontend(&mut self, fe: &FrontendKey, d: &DesiredFrontend) -> Result<()> {
        let new_ids: Vec<u32> = d.backends.iter().map(|(k, _)| self.backends[k].0).collect();
        let old = self.frontends.get(fe).cloned();
        let rev_nat_id = match &old {
            Some(p) => p.rev_nat_id,
            None => self.ref_rev_nat(fe.addr)?,
        };
        let old_slots = old.as_ref().map(|p| p.slots.clone()).unwrap_or_default();
        let slots = next_slots(&old_slots, &new_ids);
        for (i, id) in slots.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                let v = FrontendSlot {
                    backend_id: *id,
                    ..Default::default()
                };
                let k = self.key(fe, i as u16 + 1);
                self.write(|dp| dp.put_service(&k, &v))?;
            }
        }
        let svc_port_id = self.svc_port_ids[&d.service_port];
        // Membership of the new slots before the master makes them visible.
        self.sync_members(fe, &slots, true)?;
        // The Maglev table, complete before the master points at it.
        let old_table = old.as_ref().map_or((0, 0), |p| p.maglev);
        let maglev = if wants_table(fe, d, slots.len()) {
            let mut set: Vec<BackendKey> = d.backends.iter().map(|(k, _)| *k).collect();
            set.sort();
            set.dedup();
            if old_table.0 != 0 && self.tables.is_table_of(old_table.0, &set) {
                old_table
            } else {
                self.ref_table(&set)?
            }
        } else {
            (0, 0)
        };
        let master = ProgrammedFrontend {
            rev_nat_id,
            svc_port_id,
            flags: d.flags,
            affinity_timeout_s: d.affinity_timeout_s,
            slots: slots.clone(),
            maglev,
        };
        let master_changed = old.as_ref().is_none_or(|p| {
            p.slots.len() != slots.len()
                || p.svc_port_id != svc_port_id
                || p.flags != d.flags
                || p.affinity_timeout_s != d.affinity_timeout_s
                || p.maglev != maglev
        });
        if master_changed {
            let v = FrontendSlot {
                backend_id: 0,
                count: slots.len() as u16,
                flags: d.flags,
                rev_nat_id,
                affinity_timeout_s: d.affinity_timeout_s,
                svc_port_id,
                maglev_id: maglev.0,
                maglev_m: maglev.1,
                _pad: 0,
            };
            let k = self.key(fe, 0);
            self.write(|dp| dp.put_service(&k, &v))?;
        }
        if old_table.0 != 0 && old_table != maglev {
            self.unref_table(old_table.0)?;
        }
        for i in slots.len()..old_slots.len() {
            let k = self.key(fe, i as u16 + 1);
            self.write(|dp| dp.del_service(&k))?;
        }
        // Backends that left the frontend stop being members only after the master shrank.
        self.sync_members(fe, &slots, false)?;
        if fe.proto == lb_common::proto::UDP {
            if let Some(p) = &old {
                let stay: BTreeSet<u32> = if p.svc_port_id == svc_port_id {
                    slots.iter().copied().collect()
                } else {
                    BTreeSet::new()
                };
                self.departed.extend(
                    p.slots
                        .iter()
                        .filter(|id| **id != 0 && !stay.contains(id))
                        .map(|id| (p.svc_port_id, *id)),
                );
            }
        }
        for id in old_slots.iter().filter(|id| **id != 0) {
            self.unref_backend(*id);
        }
        for id in &slots {
            *self.backend_refs.entry(*id).or_default() += 1;
        }
        self.frontends.insert(*fe, master);
        Ok(())
    }

    /// Brings the membership entries of `fe` in line with `slots`: with `adding`, writes the
    /// entries that are new or moved; without, deletes the ones no longer wanted.
    fn sync_members(&mut self, fe: &FrontendKey, slots: &[u32], adding: bool) -> Result<()> {
        let master = self.key(fe, 0);
        let want: BTreeMap<MemberKey, u32> = slots
            .iter()
            .enumerate()
            .filter(|(_, id)| **id != 0)
            .map(|(i, id)| {
                (
                    MemberKey {
                        frontend: master,
                        backend_id: *id,
                    },
                    i as u32 + 1,
                )
            })
            .collect();
        let lo = MemberKey {
            frontend: master,
            backend_id: 0,
        };
        let hi = MemberKey {
            frontend: master,
            backend_id: u32::MAX,
        };
        let have: BTreeMap<MemberKey, u32> =
            self.members.range(lo..=hi).map(|(k, v)| (*k, *v)).collect();
        if adding {
            for (k, slot) in &want {
                if have.get(k) != Some(slot) {
                    self.write(|dp| dp.put_member(k, *slot))?;
                    self.members.insert(*k, *slot);
                }
            }
        } else {
            for k in have.keys().filter(|k| !want.contains_key(k)) {
                self.write(|dp| dp.del_member(k))?;
                self.members.remove(k);
            }
        }
        Ok(())
    }

    fn ref_rev_nat(&mut self, addr: SocketAddr) -> Result<u32> {
        if let Some((id, refs)) = self.rev_nat.get_mut(&addr) {
            *refs += 1;
            return Ok(*id);
        }
        self.refer_addr(addr.ip())?;
        let id = self.rev_nat_ids.alloc();
        let (addr_be, port_be) = self.addrs.map_sock(addr).expect("interned just now");
        let v = RevNat {
            addr_be,
            port_be,
            flags: if addr.is_ipv6() {
                lb_common::rev_nat_flags::IPV6
            } else {
                0
            },
        };
        self.write(|dp| dp.put_rev_nat(id, &v))?;
        self.rev_nat.insert(addr, (id, 1));
        Ok(id)
    }
}

/// The new slot array: backends that stay keep their slot; a freed slot takes a new backend, or
/// else the last slot's backend; remaining new backends are appended. So one endpoint change
/// rewrites at most two slots.
fn next_slots(old: &[u32], new_ids: &[u32]) -> Vec<u32> {
    let wanted: BTreeSet<u32> = new_ids.iter().copied().collect();
    let mut seen = BTreeSet::new();
    let mut slots: Vec<Option<u32>> = old
        .iter()
        .map(|id| (*id != 0 && wanted.contains(id) && seen.insert(*id)).then_some(*id))
        .collect();
    let mut adds: VecDeque<u32> = new_ids
        .iter()
        .filter(|id| !seen.contains(id))
        .copied()
        .collect();
    let mut added = BTreeSet::new();
    adds.retain(|id| added.insert(*id));
    for s in slots.iter_mut().filter(|s| s.is_none()) {
        match adds.pop_front() {
            Some(id) => *s = Some(id),
            None => break,
        }
    }
    slots.extend(adds.into_iter().map(Some));
    // Fill the remaining holes from the tail.
    let mut i = 0;
    while i < slots.len() {
        if slots[i].is_none() {
            while matches!(slots.last(), Some(None)) {
                slots.pop();
            }
            if i < slots.len() {
                slots.swap_remove(i);
            }
        }
        i += 1;
    }
    slots
        .into_iter()
        .map(|s| s.expect("holes filled"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use crate::control::desired::{service_key, sock_addr};

    use lb_common::{scope, MAGLEV_CHUNK};

    use super::*;
    use crate::dataplane::{
        crash,
        fake::{svc_key_str, FakeDataplane},
    };

    fn fe(i: u32) -> FrontendKey {
        FrontendKey {
            addr: SocketAddrV4::new(Ipv4Addr::from(0x0a60_0000 + i), 80).into(),
            proto: 6,
            scope: 0,
        }
    }
    fn be(i: u32) -> BackendKey {
        BackendKey {
            addr: SocketAddrV4::new(Ipv4Addr::from(0x0af4_0000 + i), 8080).into(),
            proto: 6,
        }
    }
    fn desired(n: u32, per: u32) -> Desired {
        (0..n)
            .map(|s| {
                let backends = (0..per).map(|b| (be(s * per + b), 0)).collect();
                (
                    fe(s),
                    DesiredFrontend {
                        service_port: format!("ns/s{s}:p/TCP"),
                        flags: 1,
                        affinity_timeout_s: 0,
                        source_ranges: None,
                        backends,
                    },
                )
            })
            .collect()
    }

    /// What the datapath would resolve for every frontend: its backend addresses, as a set.
    fn resolved(s: &MapContents) -> BTreeMap<FrontendSlotKey, BTreeSet<SocketAddrV4>> {
        let mut out = BTreeMap::new();
        for (k, v) in s.services.iter().filter(|(k, _)| k.slot == 0) {
            let set = (1..=v.count)
                .map(|slot| {
                    let id = s.services[&FrontendSlotKey { slot, ..*k }].backend_id;
                    let b = s.backends[&id];
                    sock_addr(b.addr_be, b.port_be)
                })
                .collect();
            out.insert(*k, set);
        }
        out
    }

    #[test]
    fn udp_backends_that_leave_a_service_port_have_their_flows_flushed() {
        let udp = |mut fe: FrontendKey| {
            fe.proto = lb_common::proto::UDP;
            fe
        };
        let ube = |i: u32| BackendKey {
            proto: lb_common::proto::UDP,
            ..be(i)
        };
        let front = |name: &str, bes: &[u32]| DesiredFrontend {
            service_port: name.into(),
            flags: 1,
            affinity_timeout_s: 0,
            source_ranges: None,
            backends: bes.iter().map(|b| (ube(*b), 0)).collect(),
        };
        // A UDP Service port with two frontends (ClusterIP and a NodePort-like address), a TCP
        // one, and another UDP Service port sharing backend 2.
        let mut d: Desired = Desired::new();
        d.insert(udp(fe(0)), front("ns/dns:53/UDP", &[1, 2, 3]));
        d.insert(udp(fe(1)), front("ns/dns:53/UDP", &[1, 2, 3]));
        d.insert(fe(2), desired(1, 3)[&fe(0)].clone());
        d.insert(udp(fe(3)), front("ns/other:53/UDP", &[2]));
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        s.sync(&d).unwrap();
        assert!(s.dataplane().flushed.is_empty());
        let id = |s: &Syncer<FakeDataplane>, b: u32| s.backends[&ube(b)].0;
        let dns = s.service_ports()["ns/dns:53/UDP"];
        let (b1, b2, b3) = (id(&s, 1), id(&s, 2), id(&s, 3));
        // Backend 2 leaves one frontend of the DNS port only: it still serves the port.
        d.insert(udp(fe(1)), front("ns/dns:53/UDP", &[1, 3]));
        s.sync(&d).unwrap();
        assert!(s.dataplane().flushed.is_empty());
        // ... then the other: its DNS flows go (not those of the other Service port).
        d.insert(udp(fe(0)), front("ns/dns:53/UDP", &[1, 3]));
        s.sync(&d).unwrap();
        assert_eq!(s.dataplane().flushed, vec![(dns, b2)]);
        // A TCP frontend losing a backend flushes nothing.
        let mut tcp = desired(1, 3)[&fe(0)].clone();
        tcp.backends.pop();
        d.insert(fe(2), tcp);
        s.sync(&d).unwrap();
        assert_eq!(s.dataplane().flushed.len(), 1);
        // A removed UDP Service: all its backends' flows go.
        d.remove(&udp(fe(0)));
        d.remove(&udp(fe(1)));
        s.sync(&d).unwrap();
        let mut got = s.dataplane().flushed[1..].to_vec();
        got.sort();
        let mut want = vec![(dns, b1), (dns, b3)];
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn next_slots_keeps_positions() {
        assert_eq!(next_slots(&[1, 2, 3, 4], &[1, 2, 3, 4]), vec![1, 2, 3, 4]);
        assert_eq!(next_slots(&[1, 2, 3, 4], &[1, 3, 4]), vec![1, 4, 3]);
        assert_eq!(next_slots(&[1, 2, 3, 4], &[1, 3, 4, 5]), vec![1, 5, 3, 4]);
        assert_eq!(next_slots(&[1, 2, 3], &[1, 2, 3, 9]), vec![1, 2, 3, 9]);
        assert_eq!(next_slots(&[1, 2, 3], &[]), Vec::<u32>::new());
        assert_eq!(next_slots(&[1, 2, 3, 4, 5], &[5]), vec![5]);
        assert_eq!(next_slots(&[1, 0, 3], &[1, 3]), vec![1, 3]);
        assert_eq!(next_slots(&[], &[7, 7, 8]), vec![7, 8]);
    }

    /// Source ranges live once per Service port, written before the first master that
    /// names them, changed in place (new prefixes first), kept while a fenced frontend of
    /// the port remains, removed after the last one lost its flag or went, and adopted
    /// after a restart without a write; a map without room defers the frontend.
    #[test]
    fn source_ranges_follow_their_service_port() {
        use lb_common::service_flags::SOURCE_RANGES;
        let net = |a: &str, l: u8| (IpAddr::V4(a.parse::<Ipv4Addr>().unwrap()), l);
        let fence = |d: &mut Desired, i: u32, r: &[(IpAddr, u8)]| {
            let v = d.get_mut(&fe(i)).unwrap();
            v.flags |= SOURCE_RANGES;
            v.source_ranges = Some(r.iter().copied().collect());
        };
        let mut d = desired(3, 2);
        // Frontends 0 and 1 are one Service port (two LoadBalancer IPs), 2 another.
        d.get_mut(&fe(1)).unwrap().service_port = "ns/s0:p/TCP".into();
        fence(&mut d, 0, &[net("10.0.0.0", 8), net("192.168.1.0", 24)]);
        fence(&mut d, 1, &[net("10.0.0.0", 8), net("192.168.1.0", 24)]);
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        s.sync(&d).unwrap();
        let id = s.service_ports()["ns/s0:p/TCP"];
        let st = &s.dataplane().state;
        assert_eq!(
            st.source_ranges,
            [
                (id, net("10.0.0.0", 8).0, 8),
                (id, net("192.168.1.0", 24).0, 24)
            ]
            .into()
        );
        let log = &s.dataplane().log;
        let first_range = log.iter().position(|l| l.starts_with("put_source_range"));
        let first_master = log.iter().position(|l| {
            l.starts_with("put_service") && l.ends_with(&format!("{}/6/0#0", fe(0).addr))
        });
        assert!(first_range < first_master, "{log:?}");
        assert_eq!(log.iter().filter(|l| l.contains("source_range")).count(), 2);
        assert_eq!(s.sync(&d).unwrap().writes, 0);

        // Adopted as they are.
        let mut again = Syncer::adopt(std::mem::take(&mut s.dp)).unwrap();
        assert_eq!(again.sync(&d).unwrap().writes, 0);
        let mut s = again;

        // A changed set: one prefix added, one removed.
        fence(&mut d, 0, &[net("10.0.0.0", 8), net("172.16.0.0", 12)]);
        fence(&mut d, 1, &[net("10.0.0.0", 8), net("172.16.0.0", 12)]);
        s.dp.log.clear();
        s.sync(&d).unwrap();
        assert_eq!(
            s.dp.log,
            vec![
                format!("put_source_range {id} 172.16.0.0/12"),
                format!("del_source_range {id} 192.168.1.0/24"),
            ]
        );
        // One fenced frontend left: the set stays; none left: it goes, after the master.
        d.get_mut(&fe(0)).unwrap().flags &= !SOURCE_RANGES;
        d.get_mut(&fe(0)).unwrap().source_ranges = None;
        s.sync(&d).unwrap();
        assert_eq!(s.dp.state.source_ranges.len(), 2);
        d.remove(&fe(1));
        s.dp.log.clear();
        s.sync(&d).unwrap();
        assert!(s.dp.state.source_ranges.is_empty());
        let log = &s.dp.log;
        let del = log.iter().position(|l| l.starts_with("del_source_range"));
        let master = log.iter().position(|l| l.starts_with("del_service"));
        assert!(master < del, "{log:?}");

        // A full source-ranges map defers the frontend that needs more, and nothing else.
        let mut s = Syncer::adopt(FakeDataplane {
            sizes: Some(MapSizes {
                source_ranges: 16,
                ..MapSizes::default()
            }),
            ..Default::default()
        })
        .unwrap();
        s.set_sizes(MapSizes {
            source_ranges: 16,
            ..MapSizes::default()
        });
        let mut d = desired(3, 2);
        let many: Vec<(IpAddr, u8)> = (0..10u32)
            .map(|i| (IpAddr::V4(Ipv4Addr::from(i << 24)), 8))
            .collect();
        fence(&mut d, 0, &many);
        fence(&mut d, 2, &many);
        let st = s.sync(&d).unwrap();
        assert_eq!(st.deferred.len(), 1, "{:?}", st.deferred);
        assert_eq!(st.deferred[0].0, fe(2));
        assert_eq!(st.deferred[0].2.map, lb_common::map_name::SOURCE_RANGES);
        assert_eq!(s.dp.state.source_ranges.len(), 10);
        assert_eq!(resolved(&s.dp.state).len(), 2);
    }

    #[test]
    fn programs_then_reaches_a_fixed_point() {
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        let d = desired(3, 4);
        let first = s.sync(&d).unwrap();
        // 3 names + 12 backends + 3 rev-NAT + 12 slots + 12 memberships + 3 masters.
        assert_eq!(first.writes, 45);
        assert_eq!(s.sync(&d).unwrap().writes, 0);
        let r = resolved(&s.dataplane().state);
        assert_eq!(r.len(), 3);
        assert!(r.values().all(|set| set.len() == 4));
    }

    #[test]
    fn removal_empties_the_maps() {
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        s.sync(&desired(5, 3)).unwrap();
        s.sync(&Desired::new()).unwrap();
        assert_eq!(s.dataplane().state, MapContents::default());
    }

    #[test]
    fn adopting_pinned_state_rewrites_nothing() {
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        let d = desired(4, 3);
        s.sync(&d).unwrap();
        let dp = FakeDataplane {
            state: s.dataplane().state.clone(),
            ..Default::default()
        };
        let mut again = Syncer::adopt(dp).unwrap();
        assert_eq!(again.sync(&d).unwrap().writes, 0);
        // And a change after adoption is still minimal.
        let mut d2 = d.clone();
        d2.get_mut(&fe(1)).unwrap().backends.pop();
        // master + tail slot + membership + backend
        assert_eq!(again.sync(&d2).unwrap().writes, 4);
    }

    #[test]
    fn adoption_removes_strays() {
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        s.sync(&desired(2, 2)).unwrap();
        let mut state = s.dataplane().state.clone();
        // A slot beyond the master's count and a backend nobody points at.
        let mut k = service_key(&fe(0), 9);
        k.slot = 9;
        state.services.insert(
            k,
            FrontendSlot {
                backend_id: 1,
                ..Default::default()
            },
        );
        state.backends.insert(
            77,
            backend_value(&be(77), 0, &crate::control::desired::Ipv4Only),
        );
        let mut again = Syncer::adopt(FakeDataplane {
            state,
            ..Default::default()
        })
        .unwrap();
        again.sync(&desired(2, 2)).unwrap();
        assert_eq!(again.dataplane().state, s.dataplane().state);
    }

    /// Every intermediate state a change passes through resolves each frontend to backends that
    /// exist, and never to an empty set when neither end state is empty.
    #[test]
    fn every_intermediate_state_is_valid() {
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        let d1 = desired(3, 4);
        s.sync(&d1).unwrap();
        let start = s.dataplane().state.clone();
        let mut d2 = d1.clone();
        d2.get_mut(&fe(0)).unwrap().backends.remove(1);
        d2.get_mut(&fe(1)).unwrap().backends.push((be(100), 0));
        d2.remove(&fe(2));
        s.dp.log.clear();
        s.sync(&d2).unwrap();
        // Replay the log from `start` one operation at a time.
        let log = s.dataplane().log.clone();
        let end = s.dataplane().state.clone();
        let mut replay = FakeDataplane {
            state: start,
            ..Default::default()
        };
        let mut ops = log.iter();
        // Rebuild each op from the end state or the start state to step through.
        let all_keys: BTreeSet<FrontendSlotKey> = replay
            .state
            .services
            .keys()
            .chain(end.services.keys())
            .copied()
            .collect();
        for op in ops.by_ref() {
            let (verb, arg) = op.split_once(' ').unwrap();
            match verb {
                "put_backend" => {
                    let id: u32 = arg.parse().unwrap();
                    replay.state.backends.insert(id, end.backends[&id]);
                }
                "del_backend" => {
                    replay.state.backends.remove(&arg.parse::<u32>().unwrap());
                }
                "put_rev_nat" => {
                    let id: u32 = arg.parse().unwrap();
                    replay.state.rev_nat.insert(id, end.rev_nat[&id]);
                }
                "del_rev_nat" => {
                    replay.state.rev_nat.remove(&arg.parse::<u32>().unwrap());
                }
                // Membership and names do not change what a frontend resolves to.
                "put_member" | "del_member" | "put_service_name" | "del_service_name" => {}
                "put_service" | "del_service" => {
                    let k = *all_keys.iter().find(|k| svc_key_str(k) == arg).unwrap();
                    if verb == "put_service" {
                        replay.state.services.insert(k, end.services[&k]);
                    } else {
                        replay.state.services.remove(&k);
                    }
                }
                _ => unreachable!(),
            }
            // Every visible slot resolves to an existing backend.
            let r = resolved(&replay.state);
            for (k, set) in &r {
                if k.addr_be == service_key(&fe(0), 0).addr_be
                    || k.addr_be == service_key(&fe(1), 0).addr_be
                {
                    assert!(!set.is_empty(), "{op}: empty set for a live frontend");
                }
            }
        }
        assert_eq!(
            (
                &replay.state.services,
                &replay.state.backends,
                &replay.state.rev_nat
            ),
            (&end.services, &end.backends, &end.rev_nat)
        );
    }

    #[test]
    fn membership_follows_slots_and_service_ports_share_an_id() {
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        let mut d = desired(2, 3);
        // Two frontends of one Service port (say its ClusterIP and a NodePort).
        d.get_mut(&fe(1)).unwrap().service_port = "ns/s0:p/TCP".into();
        s.sync(&d).unwrap();
        let st = &s.dataplane().state;
        let masters: Vec<u32> = st
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .map(|(_, v)| v.svc_port_id)
            .collect();
        assert_eq!(masters.len(), 2);
        assert_eq!(masters[0], masters[1]);
        assert_ne!(masters[0], 0);
        // Every slot has its membership entry and nothing else does.
        let expect: BTreeMap<MemberKey, u32> = st
            .services
            .iter()
            .filter(|(k, _)| k.slot != 0)
            .map(|(k, v)| {
                (
                    MemberKey {
                        frontend: FrontendSlotKey { slot: 0, ..*k },
                        backend_id: v.backend_id,
                    },
                    k.slot as u32,
                )
            })
            .collect();
        assert_eq!(st.members, expect);
        // Removing a backend removes its membership; adoption keeps the ids.
        d.get_mut(&fe(0)).unwrap().backends.remove(0);
        s.sync(&d).unwrap();
        assert_eq!(s.dataplane().state.members.len(), 5);
        let mut again = Syncer::adopt(FakeDataplane {
            state: s.dataplane().state.clone(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(again.sync(&d).unwrap().writes, 0);
        // Stray memberships found at adoption are removed.
        let mut state = s.dataplane().state.clone();
        state.members.insert(
            MemberKey {
                frontend: service_key(&fe(7), 0),
                backend_id: 3,
            },
            1,
        );
        let mut again = Syncer::adopt(FakeDataplane {
            state,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(again.sync(&d).unwrap().writes, 1);
        assert_eq!(again.dataplane().state.members.len(), 5);
    }

    #[test]
    fn one_endpoint_change_among_10000_services_is_constant() {
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        let mut d = desired(10_000, 2);
        s.sync(&d).unwrap();
        // Replace one endpoint of one Service.
        d.get_mut(&fe(4242)).unwrap().backends[0] = (be(999_999), 0);
        let st = s.sync(&d).unwrap();
        // new backend + its slot + its membership + old membership + old backend.
        assert_eq!(st.writes, 5);
        // Remove one endpoint: master + tail slot + membership + backend.
        d.get_mut(&fe(17)).unwrap().backends.pop();
        assert_eq!(s.sync(&d).unwrap().writes, 4);
        // Add one endpoint: backend + slot + membership + master.
        d.get_mut(&fe(9000))
            .unwrap()
            .backends
            .push((be(888_888), 0));
        assert_eq!(s.sync(&d).unwrap().writes, 4);
    }

    /// The same Services as LoadBalancer frontends on the XDP path.
    fn external(d: &Desired) -> Desired {
        d.iter()
            .map(|(k, v)| {
                let v = DesiredFrontend {
                    flags: lb_common::service_flags::LOAD_BALANCER,
                    ..v.clone()
                };
                (
                    FrontendKey {
                        scope: scope::EXTERNAL,
                        ..*k
                    },
                    v,
                )
            })
            .collect()
    }

    /// For every visible external master: its Maglev table is complete and names only backends
    /// that exist and belong to the frontend.
    fn check_tables(st: &MapContents) {
        check_tables_with(st, true)
    }

    /// `strict: false` (states inside a change): a table may still name a backend that is leaving
    /// the frontend, as long as it exists; new flows are then sent where they were a moment ago.
    fn check_tables_with(st: &MapContents, strict: bool) {
        for (k, v) in st
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0 && k.scope == scope::EXTERNAL)
        {
            if v.count < 2 || v.flags & lb_common::service_flags::CLUSTER_IP != 0 {
                assert_eq!(v.maglev_id, 0);
                continue;
            }
            assert_ne!(v.maglev_id, 0, "{k:?} has no table");
            let slots: BTreeSet<u32> = (1..=v.count)
                .map(|slot| st.services[&FrontendSlotKey { slot, ..*k }].backend_id)
                .collect();
            for c in 0..chunk_count(v.maglev_m) {
                let chunk = st
                    .maglev
                    .get(&MaglevKey {
                        table_id: v.maglev_id,
                        chunk: c,
                    })
                    .expect("chunk present");
                let n = (v.maglev_m - c * MAGLEV_CHUNK).min(MAGLEV_CHUNK) as usize;
                for id in &chunk.backend_ids[..n] {
                    assert!(
                        st.backends.contains_key(id),
                        "table names missing backend {id}"
                    );
                    assert!(
                        !strict || slots.contains(id),
                        "table names backend {id} outside the frontend"
                    );
                }
            }
        }
    }

    #[test]
    fn maglev_tables_are_shared_replaced_whole_and_adopted() {
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        let mut d = external(&desired(3, 10));
        // A second frontend of the first Service port with the same backends shares the table.
        let mut twin = d[&FrontendKey {
            scope: scope::EXTERNAL,
            ..fe(0)
        }]
            .clone();
        twin.service_port = "ns/s0:p/TCP".into();
        d.insert(
            FrontendKey {
                scope: scope::EXTERNAL,
                ..fe(50)
            },
            twin,
        );
        s.sync(&d).unwrap();
        let st = s.dataplane().state.clone();
        check_tables(&st);
        let tables: BTreeSet<u32> = st.maglev.keys().map(|k| k.table_id).collect();
        assert_eq!(tables.len(), 3, "four frontends, three backend sets");
        // M = 1021 for 10 backends: 4 chunks per table.
        assert_eq!(st.maglev.len(), 12);
        // Adoption keeps everything.
        let mut again = Syncer::adopt(FakeDataplane {
            state: st.clone(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(again.sync(&d).unwrap().writes, 0);
        // One endpoint replaced in the Service with one frontend: its slots as before (5 writes),
        // a new table (4 chunks) before the master switch (1), the old table's 4 chunks after.
        let k2 = FrontendKey {
            scope: scope::EXTERNAL,
            ..fe(2)
        };
        d.get_mut(&k2).unwrap().backends[3] = (be(777_777), 0);
        again.dp.log.clear();
        let w = again.sync(&d).unwrap().writes;
        assert_eq!(w, 5 + 4 + 1 + 4, "{:?}", again.dataplane().log);
        let log = &again.dataplane().log;
        let last_put = log
            .iter()
            .rposition(|l| l.starts_with("put_maglev"))
            .unwrap();
        let master = log
            .iter()
            .position(|l| l.starts_with("put_service") && l.ends_with("#0"))
            .unwrap();
        let first_del = log
            .iter()
            .position(|l| l.starts_with("del_maglev"))
            .unwrap();
        assert!(last_put < master && master < first_del, "{log:?}");
        check_tables(&again.dataplane().state);
        assert_eq!(again.dataplane().state.maglev.len(), 12);
        // Tampered chunks are not adopted: the frontend gets a fresh table and the stray goes.
        let mut state = again.dataplane().state.clone();
        let victim = *state.maglev.keys().next().unwrap();
        state.maglev.get_mut(&victim).unwrap().backend_ids[0] = 999;
        let mut third = Syncer::adopt(FakeDataplane {
            state,
            ..Default::default()
        })
        .unwrap();
        assert!(third.sync(&d).unwrap().writes > 0);
        check_tables(&third.dataplane().state);
        assert_eq!(third.dataplane().state.maglev.len(), 12);
        // A ClusterIP reached from outside gets no table.
        let mut cip = external(&desired(1, 5));
        cip.values_mut()
            .for_each(|v| v.flags = lb_common::service_flags::CLUSTER_IP);
        let mut fresh = Syncer::adopt(FakeDataplane::default()).unwrap();
        fresh.sync(&cip).unwrap();
        assert!(fresh.dataplane().state.maglev.is_empty());
        // Everything removed: no chunk left.
        third.sync(&Desired::new()).unwrap();
        assert!(third.dataplane().state.maglev.is_empty());
    }

    #[test]
    fn maglev_every_intermediate_state_is_valid() {
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        let mut d = external(&desired(4, 6));
        s.sync(&d).unwrap();
        let keys: Vec<FrontendKey> = d.keys().copied().collect();
        d.get_mut(&keys[0]).unwrap().backends.remove(2);
        d.get_mut(&keys[1]).unwrap().backends.push((be(5000), 0));
        d.get_mut(&keys[2]).unwrap().backends.truncate(1);
        d.remove(&keys[3]);
        // Replay the change one operation at a time on a copy that applies the same operations.
        struct Stepper {
            inner: FakeDataplane,
        }
        impl Dataplane for Stepper {
            fn put_service(&mut self, k: &FrontendSlotKey, v: &FrontendSlot) -> Result<()> {
                self.inner.put_service(k, v)?;
                check_tables_with(&self.inner.state, false);
                Ok(())
            }
            fn del_service(&mut self, k: &FrontendSlotKey) -> Result<()> {
                self.inner.del_service(k)?;
                check_tables_with(&self.inner.state, false);
                Ok(())
            }
            fn put_backend(&mut self, id: u32, v: &Backend) -> Result<()> {
                self.inner.put_backend(id, v)
            }
            fn del_backend(&mut self, id: u32) -> Result<()> {
                self.inner.del_backend(id)?;
                check_tables_with(&self.inner.state, false);
                Ok(())
            }
            fn put_rev_nat(&mut self, id: u32, v: &RevNat) -> Result<()> {
                self.inner.put_rev_nat(id, v)
            }
            fn del_rev_nat(&mut self, id: u32) -> Result<()> {
                self.inner.del_rev_nat(id)
            }
            fn put_config(&mut self, v: &Config) -> Result<()> {
                self.inner.put_config(v)
            }
            fn put_config6(&mut self, v: &lb_common::Config6) -> Result<()> {
                self.inner.put_config6(v)
            }
            fn put_member(&mut self, k: &MemberKey, slot: u32) -> Result<()> {
                self.inner.put_member(k, slot)
            }
            fn del_member(&mut self, k: &MemberKey) -> Result<()> {
                self.inner.del_member(k)
            }
            fn put_service_name(&mut self, id: u32, n: &str) -> Result<()> {
                self.inner.put_service_name(id, n)
            }
            fn del_service_name(&mut self, id: u32) -> Result<()> {
                self.inner.del_service_name(id)
            }
            fn put_maglev(&mut self, k: &MaglevKey, v: &lb_common::MaglevChunk) -> Result<()> {
                self.inner.put_maglev(k, v)?;
                check_tables_with(&self.inner.state, false);
                Ok(())
            }
            fn del_maglev(&mut self, k: &MaglevKey) -> Result<()> {
                self.inner.del_maglev(k)?;
                check_tables_with(&self.inner.state, false);
                Ok(())
            }
            fn put_source_range(&mut self, r: crate::dataplane::SourceRange) -> Result<()> {
                self.inner.put_source_range(r)
            }
            fn del_source_range(&mut self, r: crate::dataplane::SourceRange) -> Result<()> {
                self.inner.del_source_range(r)
            }
            fn put_addr6_id(&mut self, h: u32, a: std::net::Ipv6Addr) -> Result<()> {
                self.inner.put_addr6_id(h, a)
            }
            fn del_addr6_id(&mut self, h: u32) -> Result<()> {
                self.inner.del_addr6_id(h)
            }
            fn put_addr6(&mut self, a: std::net::Ipv6Addr, h: u32) -> Result<()> {
                self.inner.put_addr6(a, h)
            }
            fn del_addr6(&mut self, a: std::net::Ipv6Addr) -> Result<()> {
                self.inner.del_addr6(a)
            }
            fn contents(&self) -> Result<MapContents> {
                self.inner.contents()
            }
            fn flush_udp_flows(&mut self, gone: &BTreeSet<(u32, u32)>) -> Result<u64> {
                self.inner.flush_udp_flows(gone)
            }
        }
        let state = s.dataplane().state.clone();
        let mut stepped = Syncer::adopt(Stepper {
            inner: FakeDataplane {
                state,
                ..Default::default()
            },
        })
        .unwrap();
        stepped.sync(&d).unwrap();
        check_tables(&stepped.dataplane().inner.state);
    }

    const ALL: crash::ReplayOptions = crash::ReplayOptions {
        skip_ahead: true,
        carry_on: true,
        twice: true,
    };

    fn fake_with(state: &MapContents) -> Result<FakeDataplane> {
        Ok(FakeDataplane {
            state: state.clone(),
            ..Default::default()
        })
    }

    /// SIGKILL after any write of a realistic run of changes, then a restarted agent: every
    /// state on the way resolves each counted slot to a backend that exists, and the restarted
    /// agent ends where one clean sync ends (also when the cluster changed meanwhile).
    #[test]
    fn a_sync_killed_after_any_write_recovers() {
        let seq = crash::change_sequence();
        let st = crash::replay(&seq, ALL, fake_with).unwrap();
        assert!(st.writes.iter().sum::<u64>() > 200, "{st:?}");
    }

    /// The same on the shapes of the other tests: many backends, Maglev tables shared and
    /// replaced, a frontend shrinking to one backend, frontends removed and added again.
    #[test]
    fn maglev_sync_killed_after_any_write_recovers() {
        let mut d = external(&desired(4, 6));
        d.extend(desired(2, 3));
        let mut seq = vec![d.clone()];
        let keys: Vec<FrontendKey> = d.keys().copied().collect();
        d.get_mut(&keys[0]).unwrap().backends.remove(2);
        d.get_mut(&keys[1]).unwrap().backends.push((be(5000), 0));
        d.get_mut(&keys[2]).unwrap().backends.truncate(1);
        d.get_mut(&keys[4]).unwrap().backends[0] = (be(6000), 0);
        let removed = d.remove(&keys[3]).unwrap();
        seq.push(d.clone());
        d.insert(keys[3], removed);
        d.get_mut(&keys[2]).unwrap().backends.clear();
        seq.push(d);
        let opts = crash::ReplayOptions {
            twice: false,
            ..ALL
        };
        crash::replay(&seq, opts, fake_with).unwrap();
    }

    /// What the crash the review saw left (a master counting a slot that is not there), a slot
    /// naming a backend that is gone, a missing membership entry and a missing Maglev chunk:
    /// adoption finds each, and the next sync repairs it although nothing is desired to change,
    /// without a state on the way that the datapath could not resolve.
    #[test]
    fn adoption_repairs_damaged_frontends() {
        let mut d = external(&desired(2, 4));
        d.extend(desired(2, 4));
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        s.sync(&d).unwrap();
        let good = s.dataplane().state.clone();
        let ext0 = service_key(
            &FrontendKey {
                scope: scope::EXTERNAL,
                ..fe(0)
            },
            0,
        );
        type Damage = Box<dyn Fn(&mut MapContents)>;
        let damages: Vec<(&str, Damage)> = vec![
            (
                "counted slot missing",
                Box::new(|st: &mut MapContents| {
                    st.services.remove(&service_key(&fe(0), 2));
                }),
            ),
            (
                "slot names a missing backend",
                Box::new(|st: &mut MapContents| {
                    st.services
                        .get_mut(&service_key(&fe(1), 3))
                        .unwrap()
                        .backend_id = 999;
                }),
            ),
            (
                "membership entry missing",
                Box::new(move |st: &mut MapContents| {
                    let k = *st.members.keys().find(|m| m.frontend == ext0).unwrap();
                    st.members.remove(&k);
                }),
            ),
            (
                "rev-NAT entry missing",
                Box::new(|st: &mut MapContents| {
                    let id = st.services[&service_key(&fe(1), 0)].rev_nat_id;
                    st.rev_nat.remove(&id);
                }),
            ),
            (
                "Maglev chunk missing",
                Box::new(|st: &mut MapContents| {
                    let k = *st.maglev.keys().next().unwrap();
                    st.maglev.remove(&k);
                }),
            ),
        ];
        for (what, damage) in damages {
            let mut state = good.clone();
            damage(&mut state);
            let mut again = Syncer::adopt(crash::CrashAfter::new(
                fake_with(&state).unwrap(),
                None,
                true,
            ))
            .unwrap();
            assert!(again.sync(&d).unwrap().writes > 0, "{what}");
            // The repair adds no problem to those of the damage.
            let before = crash::live_problems(&state);
            for (n, op, p) in &again.dataplane().problems {
                assert!(before.contains(p), "{what}: after write {n} ({op}): {p}");
            }
            let st = &again.dataplane().inner.state;
            assert_eq!(crash::leftover_problems(st), Vec::<String>::new(), "{what}");
            assert_eq!(crash::canonical(st), crash::canonical(&good), "{what}");
        }
    }

    /// Slots a killed sync wrote beyond a master's count (it was growing the frontend) or for a
    /// master it had not written yet are rewritten by the restarted agent's sync and then kept,
    /// not deleted as leftovers found at adoption.
    #[test]
    fn orphan_slots_rewritten_at_restart_are_kept() {
        let small = desired(2, 3);
        let mut big = small.clone();
        big.get_mut(&fe(0)).unwrap().backends.push((be(100), 0));
        big.insert(fe(5), desired(6, 4)[&fe(5)].clone());
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        s.sync(&small).unwrap();
        // Kill the growth at each master write (a fresh agent makes the same writes).
        let mut probe = Syncer::adopt(fake_with(&s.dataplane().state).unwrap()).unwrap();
        probe.sync(&big).unwrap();
        let masters: Vec<usize> = (probe.dataplane().log.iter().enumerate())
            .filter(|(_, l)| l.starts_with("put_service") && l.ends_with("#0"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(masters.len(), 2);
        let orphan = [service_key(&fe(0), 4), service_key(&fe(5), 1)];
        for (at, orphan) in masters.into_iter().zip(orphan) {
            let mut dying = Syncer::adopt(crash::CrashAfter::new(
                fake_with(&s.dataplane().state).unwrap(),
                Some(at as u64),
                false,
            ))
            .unwrap();
            assert!(dying.sync(&big).is_err());
            let dead = dying.dataplane().inner.state.clone();
            assert!(dead.services.contains_key(&orphan));
            let mut again = Syncer::adopt(crash::CrashAfter::new(
                fake_with(&dead).unwrap(),
                None,
                true,
            ))
            .unwrap();
            again.sync(&big).unwrap();
            let st = &again.dataplane().inner.state;
            assert_eq!(again.dataplane().problems, vec![]);
            assert_eq!(crash::leftover_problems(st), Vec::<String>::new());
            let r = resolved(st);
            assert_eq!(r[&service_key(&fe(0), 0)].len(), 4);
            assert_eq!(r[&service_key(&fe(5), 0)].len(), 4);
        }
    }

    /// Incremental syncs (only changed frontends are looked at) end in the same state as one
    /// full sync of the final desired state, over a long random sequence of changes.
    #[test]
    fn incremental_syncs_match_a_full_sync() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u32| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as u32
        };
        let mut d = external(&desired(30, 4));
        let mut s = Syncer::adopt(FakeDataplane::default()).unwrap();
        s.sync(&d).unwrap();
        for step in 0..400 {
            let keys: Vec<FrontendKey> = d.keys().copied().collect();
            match next(6) {
                0 if !keys.is_empty() => {
                    d.remove(&keys[next(keys.len() as u32) as usize]);
                }
                1 => {
                    let f = FrontendKey {
                        scope: scope::EXTERNAL,
                        ..fe(1000 + next(50))
                    };
                    let backends = (0..next(5)).map(|_| (be(next(200)), 0)).collect();
                    d.insert(
                        f,
                        DesiredFrontend {
                            service_port: format!("ns/x{}:p/TCP", next(8)),
                            flags: lb_common::service_flags::LOAD_BALANCER,
                            affinity_timeout_s: 0,
                            source_ranges: None,
                            backends,
                        },
                    );
                }
                2 if !keys.is_empty() => {
                    let v = d.get_mut(&keys[next(keys.len() as u32) as usize]).unwrap();
                    v.backends.push((be(next(200)), next(2) as u8));
                    v.backends.dedup_by_key(|b| b.0);
                }
                3 if !keys.is_empty() => {
                    let v = d.get_mut(&keys[next(keys.len() as u32) as usize]).unwrap();
                    if !v.backends.is_empty() {
                        v.backends.remove(next(v.backends.len() as u32) as usize);
                    }
                }
                4 if !keys.is_empty() => {
                    d.get_mut(&keys[next(keys.len() as u32) as usize])
                        .unwrap()
                        .service_port = format!("ns/y{}:p/TCP", next(5));
                }
                _ => {}
            }
            // Backend flags follow the endpoint, whatever frontend lists it.
            let mut flags: BTreeMap<BackendKey, u8> = BTreeMap::new();
            for v in d.values() {
                for (k, f) in &v.backends {
                    flags.entry(*k).or_insert(*f);
                }
            }
            for v in d.values_mut() {
                for b in v.backends.iter_mut() {
                    b.1 = flags[&b.0];
                }
                let mut seen = BTreeSet::new();
                v.backends.retain(|b| seen.insert(b.0));
            }
            s.sync(&d).unwrap();
            let mut fresh = Syncer::adopt(FakeDataplane::default()).unwrap();
            fresh.sync(&d).unwrap();
            let (a, b) = (&s.dataplane().state, &fresh.dataplane().state);
            assert_eq!(resolved(a), resolved(b), "step {step}");
            let names =
                |st: &MapContents| st.service_names.values().cloned().collect::<BTreeSet<_>>();
            assert_eq!(names(a), names(b), "step {step}");
            assert_eq!(
                a.backends.len(),
                b.backends.len(),
                "step {step}: leftover backends"
            );
            assert_eq!(a.members.len(), b.members.len(), "step {step}");
            assert_eq!(a.rev_nat.len(), b.rev_nat.len(), "step {step}");
            assert_eq!(a.maglev.len(), b.maglev.len(), "step {step}");
            check_tables(a);
        }
    }
}
