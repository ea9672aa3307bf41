//! Crash replay, for tests: what a SIGKILL in the middle of a sync leaves in the maps, and
//! whether a restarted agent gets from there to where one clean sync would be.
//!
//! [`CrashAfter`] is a [`Dataplane`] that dies after a given number of writes (every later write
//! fails without touching the maps, as nothing writes after a kill) and can check the maps after
//! each write; [`live_problems`] is what the datapath needs of every state it may see (each
//! counted slot resolves to a backend that exists, ...); [`leftover_problems`] what a finished
//! sync must also leave (no entry nothing accounts for); [`canonical`] the maps without their ids,
//! to compare with a clean sync; [`replay`] kills a sequence of syncs after each of its writes,
//! restarts an agent on what is left and checks all of that. The sync's unit tests replay on the
//! fake dataplane, `tests/tests/kernel_crash_sync.rs` on real pinned maps.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, ensure, Context, Result};
use lb_common::{
    Backend, Config, FrontendSlot, FrontendSlotKey, MaglevChunk, MaglevKey, MemberKey, RevNat,
    MAGLEV_CHUNK,
};

use super::{
    fake::svc_key_str, fake::FakeDataplane, sync::Syncer, Dataplane, MapContents, SourceRange,
};
use crate::control::desired::Desired;

/// The error of a write after the kill.
#[derive(Debug)]
pub struct Killed;

impl std::fmt::Display for Killed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the agent was killed before this write")
    }
}

impl std::error::Error for Killed {}

/// A [`Dataplane`] that stops writing after `budget` writes and, with `check`, reads the maps
/// back after every write and notes what [`live_problems`] finds.
pub struct CrashAfter<D> {
    pub inner: D,
    /// Writes left before the kill; `None`: never killed.
    left: Option<u64>,
    /// A write was refused: the agent is dead.
    dead: bool,
    /// Whether to check after each write (a cell: the replay stops checking through the
    /// syncer's shared reference).
    pub check: std::cell::Cell<bool>,
    /// Writes applied so far.
    pub writes: u64,
    /// Problems seen after a write: (write number, operation, problem); the first 20.
    pub problems: Vec<(u64, String, String)>,
}

impl<D: Dataplane> CrashAfter<D> {
    pub fn new(inner: D, budget: Option<u64>, check: bool) -> Self {
        Self {
            inner,
            left: budget,
            dead: false,
            check: std::cell::Cell::new(check),
            writes: 0,
            problems: Vec::new(),
        }
    }

    /// Whether a write was refused (the agent died).
    pub fn killed(&self) -> bool {
        self.dead
    }

    fn step(
        &mut self,
        what: impl FnOnce() -> String,
        op: impl FnOnce(&mut D) -> Result<()>,
    ) -> Result<()> {
        match &mut self.left {
            Some(0) => {
                self.dead = true;
                return Err(Killed.into());
            }
            Some(n) => *n -= 1,
            None => {}
        }
        op(&mut self.inner)?;
        self.writes += 1;
        if self.check.get() && self.problems.len() < 20 {
            let st = self.inner.contents()?;
            let what = what();
            for p in live_problems(&st) {
                self.problems.push((self.writes, what.clone(), p));
            }
        }
        Ok(())
    }
}

impl<D: Dataplane> Dataplane for CrashAfter<D> {
    fn put_service(&mut self, k: &FrontendSlotKey, v: &FrontendSlot) -> Result<()> {
        self.step(
            || format!("put_service {}", svc_key_str(k)),
            |d| d.put_service(k, v),
        )
    }
    fn del_service(&mut self, k: &FrontendSlotKey) -> Result<()> {
        self.step(
            || format!("del_service {}", svc_key_str(k)),
            |d| d.del_service(k),
        )
    }
    fn put_backend(&mut self, id: u32, v: &Backend) -> Result<()> {
        self.step(|| format!("put_backend {id}"), |d| d.put_backend(id, v))
    }
    fn del_backend(&mut self, id: u32) -> Result<()> {
        self.step(|| format!("del_backend {id}"), |d| d.del_backend(id))
    }
    fn put_rev_nat(&mut self, id: u32, v: &RevNat) -> Result<()> {
        self.step(|| format!("put_rev_nat {id}"), |d| d.put_rev_nat(id, v))
    }
    fn del_rev_nat(&mut self, id: u32) -> Result<()> {
        self.step(|| format!("del_rev_nat {id}"), |d| d.del_rev_nat(id))
    }
    fn put_config(&mut self, v: &Config) -> Result<()> {
        self.step(|| "put_config".into(), |d| d.put_config(v))
    }
    fn put_config6(&mut self, v: &lb_common::Config6) -> Result<()> {
        self.step(|| "put_config6".into(), |d| d.put_config6(v))
    }
    fn put_addr6_id(&mut self, h: u32, a: std::net::Ipv6Addr) -> Result<()> {
        self.step(|| format!("put_addr6_id {h} {a}"), |d| d.put_addr6_id(h, a))
    }
    fn del_addr6_id(&mut self, h: u32) -> Result<()> {
        self.step(|| format!("del_addr6_id {h}"), |d| d.del_addr6_id(h))
    }
    fn put_addr6(&mut self, a: std::net::Ipv6Addr, h: u32) -> Result<()> {
        self.step(|| format!("put_addr6 {a}"), |d| d.put_addr6(a, h))
    }
    fn del_addr6(&mut self, a: std::net::Ipv6Addr) -> Result<()> {
        self.step(|| format!("del_addr6 {a}"), |d| d.del_addr6(a))
    }
    fn put_member(&mut self, k: &MemberKey, slot: u32) -> Result<()> {
        self.step(
            || format!("put_member {} {}", svc_key_str(&k.frontend), k.backend_id),
            |d| d.put_member(k, slot),
        )
    }
    fn del_member(&mut self, k: &MemberKey) -> Result<()> {
        self.step(
            || format!("del_member {} {}", svc_key_str(&k.frontend), k.backend_id),
            |d| d.del_member(k),
        )
    }
    fn put_service_name(&mut self, id: u32, name: &str) -> Result<()> {
        self.step(
            || format!("put_service_name {id}"),
            |d| d.put_service_name(id, name),
        )
    }
    fn del_service_name(&mut self, id: u32) -> Result<()> {
        self.step(
            || format!("del_service_name {id}"),
            |d| d.del_service_name(id),
        )
    }
    fn put_maglev(&mut self, k: &MaglevKey, v: &MaglevChunk) -> Result<()> {
        self.step(
            || format!("put_maglev {} {}", k.table_id, k.chunk),
            |d| d.put_maglev(k, v),
        )
    }
    fn del_maglev(&mut self, k: &MaglevKey) -> Result<()> {
        self.step(
            || format!("del_maglev {} {}", k.table_id, k.chunk),
            |d| d.del_maglev(k),
        )
    }
    fn put_source_range(&mut self, r: SourceRange) -> Result<()> {
        self.step(
            || format!("put_source_range {} {}/{}", r.0, r.1, r.2),
            |d| d.put_source_range(r),
        )
    }
    fn del_source_range(&mut self, r: SourceRange) -> Result<()> {
        self.step(
            || format!("del_source_range {} {}/{}", r.0, r.1, r.2),
            |d| d.del_source_range(r),
        )
    }
    fn contents(&self) -> Result<MapContents> {
        self.inner.contents()
    }
    fn flush_udp_flows(&mut self, gone: &BTreeSet<(u32, u32)>) -> Result<u64> {
        if self.dead {
            return Err(Killed.into());
        }
        self.inner.flush_udp_flows(gone)
    }
}

/// What the datapath needs of every state it can see, as one line per problem: every master's
/// rev-NAT entry is there and names the frontend; each of its counted slots is there and names a
/// backend that exists; its Maglev table (if any) is complete and names only backends that exist
/// (a backend on its way out of the frontend is fine: new flows go where they went a moment ago);
/// and every membership entry (what affinity records are checked against) names a backend that
/// exists, so that a backend id handed out again is never taken for a member.
pub fn live_problems(st: &MapContents) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in st.services.iter().filter(|(k, _)| k.slot == 0) {
        let fe = svc_key_str(k);
        match st.rev_nat.get(&v.rev_nat_id) {
            Some(r) if r.addr_be == k.addr_be && r.port_be == k.port_be => {}
            Some(_) => out.push(format!(
                "{fe}: rev-NAT {} names another frontend",
                v.rev_nat_id
            )),
            None => out.push(format!("{fe}: rev-NAT {} missing", v.rev_nat_id)),
        }
        let v6 = k.scope & lb_common::scope::IPV6 != 0;
        if v6 && !interned(st, k.addr_be) {
            out.push(format!("{fe}: IPv6 handle not interned both ways"));
        }
        for slot in 1..=v.count {
            match st.services.get(&FrontendSlotKey { slot, ..*k }) {
                None => out.push(format!("{fe}: counted slot {slot} of {} missing", v.count)),
                Some(s) => match st.backends.get(&s.backend_id) {
                    None => out.push(format!(
                        "{fe}: slot {slot} names missing backend {}",
                        s.backend_id
                    )),
                    Some(b) => {
                        let b6 = b.flags & lb_common::backend_flags::IPV6 != 0;
                        if b6 != v6 {
                            out.push(format!(
                                "{fe}: slot {slot} names a backend of the other family"
                            ));
                        } else if b6 && !interned(st, b.addr_be) {
                            out.push(format!("{fe}: slot {slot}'s IPv6 backend not interned"));
                        }
                    }
                },
            }
        }
        if v.maglev_id != 0 && v.count > 0 {
            for (c, chunk) in table_chunks(st, v) {
                match chunk {
                    None => out.push(format!(
                        "{fe}: Maglev table {} lacks chunk {c}",
                        v.maglev_id
                    )),
                    Some(ids) => {
                        if let Some(id) = ids.iter().find(|id| !st.backends.contains_key(id)) {
                            out.push(format!(
                                "{fe}: Maglev table {} names missing backend {id}",
                                v.maglev_id
                            ));
                        }
                    }
                }
            }
        }
    }
    for m in st.members.keys() {
        if !st.backends.contains_key(&m.backend_id) {
            out.push(format!(
                "{}: membership entry names missing backend {}",
                svc_key_str(&m.frontend),
                m.backend_id
            ));
        }
    }
    out
}

/// Whether an IPv6 handle's address is in both directions of the table.
fn interned(st: &MapContents, handle_be: u32) -> bool {
    st.addr6_ids
        .get(&handle_be)
        .is_some_and(|a| st.addr6.get(a) == Some(&handle_be))
}

/// The used entries of each chunk of the table a master points at (`None`: chunk missing).
fn table_chunks<'a>(
    st: &'a MapContents,
    v: &FrontendSlot,
) -> impl Iterator<Item = (u32, Option<&'a [u32]>)> + 'a {
    let (id, m) = (v.maglev_id, v.maglev_m);
    (0..m.div_ceil(MAGLEV_CHUNK)).map(move |c| {
        let n = (m - c * MAGLEV_CHUNK).min(MAGLEV_CHUNK) as usize;
        let chunk = st.maglev.get(&MaglevKey {
            table_id: id,
            chunk: c,
        });
        (c, chunk.map(|ch| &ch.backend_ids[..n]))
    })
}

/// What a finished sync leaves besides [`live_problems`]: every entry accounted for (slots
/// within a master's count, one membership entry per counted slot and no other, backends,
/// rev-NAT entries, names and Maglev chunks that some master uses), and Maglev tables naming
/// only the frontend's own backends.
pub fn leftover_problems(st: &MapContents) -> Vec<String> {
    let mut out = live_problems(st);
    let masters: BTreeMap<FrontendSlotKey, &FrontendSlot> = st
        .services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| (*k, v))
        .collect();
    let mut backends = BTreeSet::new();
    let mut want_members = BTreeMap::new();
    let mut chunks = BTreeSet::new();
    for (k, v) in st.services.iter().filter(|(k, _)| k.slot != 0) {
        match masters.get(&FrontendSlotKey { slot: 0, ..*k }) {
            Some(m) if k.slot <= m.count => {
                backends.insert(v.backend_id);
                want_members.insert(
                    MemberKey {
                        frontend: FrontendSlotKey { slot: 0, ..*k },
                        backend_id: v.backend_id,
                    },
                    k.slot as u32,
                );
            }
            _ => out.push(format!(
                "{}: slot beyond its master's count",
                svc_key_str(k)
            )),
        }
    }
    if st.members != want_members {
        out.push(format!(
            "membership entries {:?} are not those of the counted slots {:?}",
            st.members, want_members
        ));
    }
    for (k, v) in &masters {
        if v.maglev_id == 0 {
            continue;
        }
        let own: BTreeSet<u32> = (1..=v.count)
            .filter_map(|slot| st.services.get(&FrontendSlotKey { slot, ..*k }))
            .map(|s| s.backend_id)
            .collect();
        for (c, ids) in table_chunks(st, v) {
            chunks.insert(MaglevKey {
                table_id: v.maglev_id,
                chunk: c,
            });
            if ids.is_some_and(|ids| ids.iter().any(|id| !own.contains(id))) {
                out.push(format!(
                    "{}: Maglev table {} names a backend outside the frontend",
                    svc_key_str(k),
                    v.maglev_id
                ));
            }
        }
    }
    for id in st.backends.keys().filter(|id| !backends.contains(id)) {
        out.push(format!("backend {id} unused"));
    }
    for id in st.rev_nat.keys() {
        if !masters.values().any(|m| m.rev_nat_id == *id) {
            out.push(format!("rev-NAT {id} unused"));
        }
    }
    for id in st.service_names.keys() {
        if !masters.values().any(|m| m.svc_port_id == *id) {
            out.push(format!("Service-port name {id} unused"));
        }
    }
    for m in masters.values() {
        if !st.service_names.contains_key(&m.svc_port_id) {
            out.push(format!("Service-port id {} has no name", m.svc_port_id));
        }
    }
    for k in st.maglev.keys().filter(|k| !chunks.contains(k)) {
        out.push(format!("Maglev chunk {}/{} unused", k.table_id, k.chunk));
    }
    // Every interned address is named by a backend or rev-NAT entry, in both directions.
    let named: BTreeSet<u32> = st
        .backends
        .values()
        .filter(|b| b.flags & lb_common::backend_flags::IPV6 != 0)
        .map(|b| b.addr_be)
        .chain(
            st.rev_nat
                .values()
                .filter(|r| r.flags & lb_common::rev_nat_flags::IPV6 != 0)
                .map(|r| r.addr_be),
        )
        .collect();
    for (h, a) in &st.addr6_ids {
        if !named.contains(h) {
            out.push(format!("IPv6 address {a} (handle {h}) unused"));
        }
        if st.addr6.get(a) != Some(h) {
            out.push(format!("IPv6 address {a}: the tables disagree"));
        }
    }
    if st.addr6.len() != st.addr6_ids.len() {
        out.push(format!(
            "IPv6 address tables of {} and {} entries",
            st.addr6.len(),
            st.addr6_ids.len()
        ));
    }
    for (id, net, len) in &st.source_ranges {
        if !masters
            .values()
            .any(|m| m.svc_port_id == *id && m.flags & lb_common::service_flags::SOURCE_RANGES != 0)
        {
            out.push(format!(
                "source range {net}/{len} of Service-port id {id} unused"
            ));
        }
    }
    out
}

/// The maps without their ids (which depend on the order things were written in): per frontend
/// its master's settings, rev-NAT entry, Service-port name, the backends of its counted slots
/// (sorted), its membership entries as backends, and its Maglev table as backends; and how many
/// entries each map holds.
pub fn canonical(st: &MapContents) -> BTreeMap<String, String> {
    // IPv6 handles are ids too: each is spelt as its address.
    let ip = |addr_be: u32, v6: bool| {
        if v6 {
            st.addr6_ids.get(&addr_be).map_or_else(
                || format!("handle {addr_be} not interned"),
                |a| a.to_string(),
            )
        } else {
            std::net::Ipv4Addr::from(addr_be.to_ne_bytes()).to_string()
        }
    };
    let backend = |id: &u32| {
        st.backends.get(id).map_or_else(
            || format!("missing {id}"),
            |b| {
                let v6 = b.flags & lb_common::backend_flags::IPV6 != 0;
                format!(
                    "{}:{} proto {} flags {:#x}",
                    ip(b.addr_be, v6),
                    u16::from_be(b.port_be),
                    b.proto,
                    b.flags
                )
            },
        )
    };
    let mut out = BTreeMap::new();
    for (k, v) in st.services.iter().filter(|(k, _)| k.slot == 0) {
        let v6 = k.scope & lb_common::scope::IPV6 != 0;
        let mut slots: Vec<String> = (1..=v.count)
            .map(|slot| {
                st.services
                    .get(&FrontendSlotKey { slot, ..*k })
                    .map_or_else(|| "no slot".into(), |s| backend(&s.backend_id))
            })
            .collect();
        slots.sort();
        let mut members: Vec<String> = st
            .members
            .keys()
            .filter(|m| m.frontend == *k)
            .map(|m| backend(&m.backend_id))
            .collect();
        members.sort();
        // The table as the backends it names (sorted) and each entry's place among them.
        let entries: Vec<u32> = table_chunks(st, v)
            .flat_map(|(_, ids)| ids.unwrap_or(&[]).iter().copied())
            .collect();
        let ids: BTreeSet<u32> = entries.iter().copied().collect();
        let mut named: Vec<(String, u32)> = ids.iter().map(|id| (backend(id), *id)).collect();
        named.sort();
        let place: BTreeMap<u32, usize> = named
            .iter()
            .enumerate()
            .map(|(i, (_, id))| (*id, i))
            .collect();
        let places: Vec<usize> = entries.iter().map(|id| place[id]).collect();
        let named: Vec<&String> = named.iter().map(|(b, _)| b).collect();
        let table = format!("{named:?} {places:?}");
        let ranges: Vec<String> = st
            .source_ranges
            .iter()
            .filter(|(id, _, _)| *id == v.svc_port_id)
            .map(|(_, net, len)| format!("{net}/{len}"))
            .collect();
        let rev_nat = st.rev_nat.get(&v.rev_nat_id).map(|r| {
            let r6 = r.flags & lb_common::rev_nat_flags::IPV6 != 0;
            format!(
                "{}:{} flags {}",
                ip(r.addr_be, r6),
                u16::from_be(r.port_be),
                r.flags
            )
        });
        out.insert(
            format!(
                "{}:{}/{}/{}",
                ip(k.addr_be, v6),
                u16::from_be(k.port_be),
                k.proto,
                k.scope
            ),
            format!(
                "count {} flags {:#x} affinity {} m {} rev-NAT {rev_nat:?} name {:?} slots {slots:?} members {members:?} table {table} source ranges {ranges:?}",
                v.count,
                v.flags,
                v.affinity_timeout_s,
                v.maglev_m,
                st.service_names.get(&v.svc_port_id),
            ),
        );
    }
    out.insert(
        "entries".into(),
        format!(
            "services {} backends {} rev-NAT {} members {} names {} Maglev chunks {} source ranges {} IPv6 addresses {:?}",
            st.services.len(),
            st.backends.len(),
            st.rev_nat.len(),
            st.members.len(),
            st.service_names.len(),
            st.maglev.len(),
            st.source_ranges.len(),
            st.addr6.keys().collect::<Vec<_>>(),
        ),
    );
    out
}

/// Makes the maps behind `dp` hold exactly `want` (deleting, then writing what differs).
pub fn restore<D: Dataplane>(dp: &mut D, want: &MapContents) -> Result<()> {
    let have = dp.contents()?;
    for k in have
        .services
        .keys()
        .filter(|k| !want.services.contains_key(k))
    {
        dp.del_service(k)?;
    }
    for k in have
        .members
        .keys()
        .filter(|k| !want.members.contains_key(k))
    {
        dp.del_member(k)?;
    }
    for k in have.maglev.keys().filter(|k| !want.maglev.contains_key(k)) {
        dp.del_maglev(k)?;
    }
    for r in have.source_ranges.difference(&want.source_ranges) {
        dp.del_source_range(*r)?;
    }
    for r in want.source_ranges.difference(&have.source_ranges) {
        dp.put_source_range(*r)?;
    }
    for k in have
        .backends
        .keys()
        .filter(|k| !want.backends.contains_key(k))
    {
        dp.del_backend(*k)?;
    }
    for k in have
        .rev_nat
        .keys()
        .filter(|k| !want.rev_nat.contains_key(k))
    {
        dp.del_rev_nat(*k)?;
    }
    for k in have
        .service_names
        .keys()
        .filter(|k| !want.service_names.contains_key(k))
    {
        dp.del_service_name(*k)?;
    }
    for a in have.addr6.keys().filter(|a| !want.addr6.contains_key(a)) {
        dp.del_addr6(*a)?;
    }
    for h in have
        .addr6_ids
        .keys()
        .filter(|h| !want.addr6_ids.contains_key(h))
    {
        dp.del_addr6_id(*h)?;
    }
    for (h, a) in &want.addr6_ids {
        if have.addr6_ids.get(h) != Some(a) {
            dp.put_addr6_id(*h, *a)?;
        }
    }
    for (a, h) in &want.addr6 {
        if have.addr6.get(a) != Some(h) {
            dp.put_addr6(*a, *h)?;
        }
    }
    for (k, v) in &want.backends {
        if have.backends.get(k) != Some(v) {
            dp.put_backend(*k, v)?;
        }
    }
    for (k, v) in &want.rev_nat {
        if have.rev_nat.get(k) != Some(v) {
            dp.put_rev_nat(*k, v)?;
        }
    }
    for (k, v) in &want.service_names {
        if have.service_names.get(k) != Some(v) {
            dp.put_service_name(*k, v)?;
        }
    }
    for (k, v) in &want.maglev {
        if have.maglev.get(k) != Some(v) {
            dp.put_maglev(k, v)?;
        }
    }
    for (k, v) in &want.members {
        if have.members.get(k) != Some(v) {
            dp.put_member(k, *v)?;
        }
    }
    for (k, v) in &want.services {
        if have.services.get(k) != Some(v) {
            dp.put_service(k, v)?;
        }
    }
    if have.config != want.config {
        dp.put_config(&want.config)?;
    }
    ensure!(
        dp.contents()? == *want,
        "the maps do not hold what was restored"
    );
    Ok(())
}

/// What a [`replay`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Writes of each sync of the uninterrupted run.
    pub writes: Vec<u64>,
    /// Syncs killed (one per write position of every sync, and of every first sync of a
    /// restarted agent with [`ReplayOptions::twice`]).
    pub kills: u64,
    /// Writes of the restarted agents' first syncs, in all.
    pub recovery_writes: u64,
}

/// How far a [`replay`] goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayOptions {
    /// Also restart from each killed state on the next desired state (the cluster changed
    /// while no agent ran).
    pub skip_ahead: bool,
    /// Let each restarted agent go on through the rest of the sequence (checked at the end of
    /// each sync): its books after the repair are right for the incremental syncs that follow.
    pub carry_on: bool,
    /// Kill each restarted agent's first sync (on the killed sync's desired state) after each
    /// of its writes too, and restart a third agent on what that left (an agent in a crash
    /// loop); see `kill_the_recovery`.
    pub twice: bool,
}

/// Replays `sequence` (one sync per desired state, by one agent) and kills it after each write
/// of each sync in turn; a fresh agent then adopts what the maps hold and syncs the killed
/// sync's desired state (see [`ReplayOptions`] for more). Fails unless every state on the way
/// (every write of the uninterrupted run, the state at each kill, every write of each restarted
/// agent's first sync) has no [`live_problems`], each restarted agent ends where one clean sync
/// of its desired state ends ([`canonical`], no [`leftover_problems`]), and a second sync
/// writes nothing.
///
/// `open(state)`: the maps a (re)started agent opens, holding exactly `state` (the fake: a
/// [`FakeDataplane`] with that state; pinned maps: reopened, then [`restore`]d).
pub fn replay<D: Dataplane>(
    sequence: &[Desired],
    opts: ReplayOptions,
    mut open: impl FnMut(&MapContents) -> Result<D>,
) -> Result<ReplayStats> {
    let empty = MapContents::default();
    let clean: Vec<BTreeMap<String, String>> = sequence
        .iter()
        .map(|d| {
            let mut s = Syncer::adopt(FakeDataplane::default())?;
            s.sync(d)?;
            Ok(canonical(&s.dataplane().state))
        })
        .collect::<Result<_>>()?;
    let mut stats = ReplayStats::default();
    // The uninterrupted run, checked after every write: the states a killed sync passed through.
    let mut agent = Syncer::adopt(CrashAfter::new(open(&empty)?, None, true))?;
    for (k, d) in sequence.iter().enumerate() {
        let before = agent.dataplane().writes;
        agent.sync(d).with_context(|| format!("sync {k}"))?;
        stats.writes.push(agent.dataplane().writes - before);
        let st = agent.dataplane().contents()?;
        ensure_clean(&st, &clean[k], &format!("sync {k}"))?;
    }
    if let Some((n, op, p)) = agent.dataplane().problems.first() {
        bail!("uninterrupted run, after write {n} ({op}): {p}");
    }
    drop(agent);
    for k in 0..sequence.len() {
        let prefix: u64 = stats.writes[..k].iter().sum();
        for n in 0..stats.writes[k] {
            let at = format!(
                "sync {k} killed after {n} of its {} writes",
                stats.writes[k]
            );
            let mut agent = Syncer::adopt(CrashAfter::new(open(&empty)?, Some(prefix + n), false))?;
            for d in &sequence[..k] {
                agent.sync(d).with_context(|| at.clone())?;
            }
            // Killed is what the dataplane says: a sync may go on past a failed write (to other
            // frontends) and even return, but nothing it does after the kill reaches the maps.
            let result = agent.sync(&sequence[k]);
            if !agent.dataplane().killed() {
                match result {
                    Err(e) => return Err(e.context(at)),
                    Ok(_) => bail!("{at}: the sync was not killed"),
                }
            }
            let dead = agent.dataplane().contents()?;
            drop(agent);
            if let Some(p) = live_problems(&dead).first() {
                bail!("{at}: the state left: {p}");
            }
            let targets = if opts.skip_ahead && k + 1 < sequence.len() {
                vec![k, k + 1]
            } else {
                vec![k]
            };
            for t in targets {
                let at = format!("{at}, restarted on state {t}");
                let mut again = Syncer::adopt(CrashAfter::new(open(&dead)?, None, true))?;
                let w0 = again.sync(&sequence[t]).with_context(|| at.clone())?.writes;
                stats.recovery_writes += w0;
                if let Some((n, op, p)) = again.dataplane().problems.first() {
                    bail!("{at}: after recovery write {n} ({op}): {p}");
                }
                let recovered = again.dataplane().contents()?;
                ensure_clean(&recovered, &clean[t], &at)?;
                let w = again.sync(&sequence[t]).with_context(|| at.clone())?.writes;
                ensure!(w == 0, "{at}: a second sync wrote {w} entries");
                if opts.carry_on {
                    again.dataplane().check.set(false);
                    for (u, d) in sequence.iter().enumerate().skip(t + 1) {
                        let at = format!("{at}, then state {u}");
                        again.sync(d).with_context(|| at.clone())?;
                        ensure_clean(&again.dataplane().contents()?, &clean[u], &at)?;
                    }
                }
                drop(again);
                if opts.twice && t == k {
                    stats.kills += kill_the_recovery(
                        &sequence[t],
                        &clean[t],
                        w0,
                        &dead,
                        &recovered,
                        &at,
                        &mut open,
                    )?;
                }
            }
            stats.kills += 1;
        }
    }
    Ok(stats)
}

/// Kills a restarted agent's first sync (from the killed state `dead` to `desired`, `writes`
/// writes) after each of its writes in turn and restarts a third agent on what is left: the
/// state left has no [`live_problems`] and the third agent ends where a clean sync ends (its
/// writes are not checked one by one, which would cost minutes). Returns the number of kills.
fn kill_the_recovery<D: Dataplane>(
    desired: &Desired,
    clean: &BTreeMap<String, String>,
    writes: u64,
    dead: &MapContents,
    recovered: &MapContents,
    at: &str,
    open: &mut impl FnMut(&MapContents) -> Result<D>,
) -> Result<u64> {
    for m in 0..writes {
        let at = format!("{at}, killed again after {m} of its {writes} writes");
        let mut agent = Syncer::adopt(CrashAfter::new(open(dead)?, Some(m), false))?;
        let result = agent.sync(desired);
        if !agent.dataplane().killed() {
            match result {
                Err(e) => return Err(e.context(at)),
                Ok(_) => bail!("{at}: the sync was not killed"),
            }
        }
        let dead_again = agent.dataplane().contents()?;
        drop(agent);
        if let Some(p) = live_problems(&dead_again).first() {
            bail!("{at}: the state left: {p}");
        }
        let mut third = Syncer::adopt(open(&dead_again)?)?;
        third.sync(desired).with_context(|| at.clone())?;
        let end = third.dataplane().contents()?;
        // Mostly the very state the first restart ended in (checked already); else compare.
        if end != *recovered {
            ensure_clean(&end, clean, &at)?;
        }
    }
    Ok(writes)
}

/// Fails unless `st` has no [`leftover_problems`] and is `clean` but for ids.
fn ensure_clean(st: &MapContents, clean: &BTreeMap<String, String>, at: &str) -> Result<()> {
    if let Some(p) = leftover_problems(st).first() {
        bail!("{at}: {p}");
    }
    let got = canonical(st);
    for (k, want) in clean {
        ensure!(
            got.get(k) == Some(want),
            "{at}: {k} is {:?}, a clean sync writes {want:?}",
            got.get(k)
        );
    }
    if let Some(k) = got.keys().find(|k| !clean.contains_key(*k)) {
        bail!("{at}: {k} is left over: {:?}", got[k]);
    }
    Ok(())
}

/// A realistic run of cluster changes, as desired states one after the other: a Service with a
/// ClusterIP (both scopes), a NodePort and a LoadBalancer IP (Maglev tables), a DNS Service with
/// a UDP and a TCP port, a session-affinity Service and a single-endpoint one; then endpoints
/// added, replaced, terminating, removed, scaled to zero and back, Services removed and added
/// again, a traffic policy and an affinity timeout changed, loadBalancerSourceRanges set,
/// changed and dropped with their LoadBalancer IP, the IPv6 half of a dual-stack Service
/// (interned addresses) scaled, rolled, fenced with IPv6 source ranges and removed, and finally
/// nothing.
pub fn change_sequence() -> Vec<Desired> {
    use lb_common::{backend_flags as bf, proto, scope, service_flags as sf};
    use std::net::{Ipv4Addr, SocketAddrV4};

    use crate::control::desired::{BackendKey, DesiredFrontend, FrontendKey};

    let fe = |a: [u8; 4], port: u16, p: u8, s: u8| FrontendKey {
        addr: SocketAddrV4::new(Ipv4Addr::from(a), port).into(),
        proto: p,
        scope: s,
    };
    let be = |node: u8, pod: u8, port: u16, p: u8| BackendKey {
        addr: SocketAddrV4::new(Ipv4Addr::new(10, 244, node, pod), port).into(),
        proto: p,
    };
    let front =
        |name: &str, flags: u16, affinity: u32, backends: Vec<(BackendKey, u8)>| DesiredFrontend {
            service_port: name.into(),
            flags,
            affinity_timeout_s: affinity,
            source_ranges: None,
            backends,
        };
    let web = |d: &mut Desired, backends: &[(u8, u8, u8)], lb: bool, local: bool| {
        let all: Vec<(BackendKey, u8)> = backends
            .iter()
            .map(|(n, p, f)| (be(*n, *p, 8080, proto::TCP), *f))
            .collect();
        let name = "default/web:80/TCP";
        let cip = sf::CLUSTER_IP;
        d.insert(
            fe([10, 96, 0, 10], 80, proto::TCP, scope::INTERNAL),
            front(name, cip, 0, all.clone()),
        );
        d.insert(
            fe([10, 96, 0, 10], 80, proto::TCP, scope::EXTERNAL),
            front(name, cip, 0, all.clone()),
        );
        let node_port = if local {
            let mine = all
                .iter()
                .filter(|b| b.1 & bf::LOCAL != 0)
                .copied()
                .collect();
            front(name, sf::NODE_PORT | sf::EXTERNAL_POLICY_LOCAL, 0, mine)
        } else {
            front(name, sf::NODE_PORT, 0, all.clone())
        };
        d.insert(
            fe([192, 168, 100, 1], 30080, proto::TCP, scope::EXTERNAL),
            node_port,
        );
        if lb {
            d.insert(
                fe([172, 18, 0, 10], 80, proto::TCP, scope::EXTERNAL),
                front(name, sf::LOAD_BALANCER, 0, all),
            );
        }
    };
    let dns = |d: &mut Desired, pods: &[(u8, u8)]| {
        for (p, name) in [
            (proto::UDP, "kube-system/dns:53/UDP"),
            (proto::TCP, "kube-system/dns:53/TCP"),
        ] {
            let b = pods
                .iter()
                .map(|(n, pod)| (be(*n, *pod, 53, p), 0))
                .collect();
            d.insert(
                fe([10, 96, 0, 53], 53, p, scope::INTERNAL),
                front(name, sf::CLUSTER_IP, 0, b),
            );
        }
    };
    let sticky = |d: &mut Desired, pods: &[u8], timeout: u32| {
        let b: Vec<_> = pods
            .iter()
            .map(|pod| (be(2, *pod, 8443, proto::TCP), 0))
            .collect();
        let name = "shop/cart:443/TCP";
        let f = sf::SESSION_AFFINITY;
        d.insert(
            fe([10, 96, 0, 20], 443, proto::TCP, scope::INTERNAL),
            front(name, sf::CLUSTER_IP | f, timeout, b.clone()),
        );
        d.insert(
            fe([172, 18, 0, 20], 443, proto::TCP, scope::EXTERNAL),
            front(name, sf::LOAD_BALANCER | f, timeout, b),
        );
    };
    let api = |d: &mut Desired| {
        let b = vec![(be(1, 200, 6443, proto::TCP), bf::LOCAL)];
        d.insert(
            fe([10, 96, 0, 1], 443, proto::TCP, scope::INTERNAL),
            front("default/kubernetes:443/TCP", sf::CLUSTER_IP, 0, b),
        );
    };
    // loadBalancerSourceRanges on a LoadBalancer IP.
    let fence = |d: &mut Desired, ip: [u8; 4], port: u16, ranges: &[([u8; 4], u8)]| {
        let v = d
            .get_mut(&fe(ip, port, proto::TCP, scope::EXTERNAL))
            .expect("a LoadBalancer frontend");
        v.flags |= sf::SOURCE_RANGES;
        v.source_ranges = Some(
            ranges
                .iter()
                .map(|(a, l)| (Ipv4Addr::from(*a).into(), *l))
                .collect(),
        );
    };
    // The IPv6 half of a dual-stack web Service: its frontends' keys and backends hold
    // interned handles; a LoadBalancer IP with IPv6 source ranges.
    let web6 = |d: &mut Desired, pods: &[(u8, u8)], ranges: Option<&[&str]>| {
        let be6 = |node: u8, pod: u8| BackendKey {
            addr: std::net::SocketAddr::new(
                std::net::Ipv6Addr::new(0xfd00, 0x244, node.into(), 0, 0, 0, 0, pod.into()).into(),
                8080,
            ),
            proto: proto::TCP,
        };
        let fe6 = |a: &str, port: u16, s: u8| FrontendKey {
            addr: std::net::SocketAddr::new(a.parse().expect("an IPv6 address"), port),
            proto: proto::TCP,
            scope: s,
        };
        let all: Vec<(BackendKey, u8)> = pods.iter().map(|(n, p)| (be6(*n, *p), 0)).collect();
        let name = "default/web:80/TCP/IPv6";
        d.insert(
            fe6("fd00:96::10", 80, scope::INTERNAL),
            front(name, sf::CLUSTER_IP, 0, all.clone()),
        );
        for s in [scope::INTERNAL, scope::EXTERNAL] {
            d.insert(
                fe6("fd00:100::1", 30080, s),
                front(name, sf::NODE_PORT, 0, all.clone()),
            );
        }
        if let Some(r) = ranges {
            let mut v = front(name, sf::LOAD_BALANCER | sf::SOURCE_RANGES, 0, all);
            v.source_ranges = Some(
                r.iter()
                    .map(|p| {
                        let (a, l) = p.split_once('/').expect("a prefix");
                        (a.parse().expect("an address"), l.parse().expect("a length"))
                    })
                    .collect(),
            );
            d.insert(fe6("2001:db8::10", 80, scope::EXTERNAL), v);
        }
    };
    let l = bf::LOCAL;
    let mut out = Vec::new();
    // 0: three Services.
    let mut d = Desired::new();
    web(&mut d, &[(1, 1, l), (2, 2, 0), (2, 3, 0)], true, false);
    dns(&mut d, &[(1, 10), (2, 11)]);
    api(&mut d);
    fence(
        &mut d,
        [172, 18, 0, 10],
        80,
        &[([10, 0, 0, 0], 8), ([192, 168, 0, 0], 16)],
    );
    web6(&mut d, &[(1, 1), (2, 2)], Some(&["fd00::/8"]));
    out.push(d);
    // 1: web scales up and changes its source ranges, the session-affinity Service arrives, a
    // DNS pod is replaced.
    let mut d = Desired::new();
    web(
        &mut d,
        &[(1, 1, l), (2, 2, 0), (2, 3, 0), (1, 4, l)],
        true,
        false,
    );
    dns(&mut d, &[(1, 10), (2, 12)]);
    api(&mut d);
    sticky(&mut d, &[30, 31, 32], 10800);
    fence(
        &mut d,
        [172, 18, 0, 10],
        80,
        &[([10, 0, 0, 0], 8), ([172, 16, 0, 0], 12)],
    );
    web6(
        &mut d,
        &[(1, 1), (2, 2), (1, 4)],
        Some(&["fd00::/8", "2001:db8:1::/48"]),
    );
    out.push(d);
    // 2: a web pod terminates, another is gone; the cart scales to zero; the API Service goes.
    let mut d = Desired::new();
    web(
        &mut d,
        &[(1, 1, l), (2, 2, l | bf::TERMINATING), (1, 4, l)],
        true,
        false,
    );
    dns(&mut d, &[(1, 10), (2, 12)]);
    sticky(&mut d, &[], 10800);
    fence(
        &mut d,
        [172, 18, 0, 10],
        80,
        &[([10, 0, 0, 0], 8), ([172, 16, 0, 0], 12)],
    );
    web6(&mut d, &[(1, 1), (1, 4)], None);
    out.push(d);
    // 3: web rolls to new pods; the cart comes back on new pods; the API Service is back; DNS
    // goes.
    let mut d = Desired::new();
    web(&mut d, &[(1, 1, l), (1, 5, l), (2, 6, 0)], true, false);
    sticky(&mut d, &[33, 34], 10800);
    api(&mut d);
    fence(
        &mut d,
        [172, 18, 0, 10],
        80,
        &[([10, 0, 0, 0], 8), ([172, 16, 0, 0], 12)],
    );
    fence(&mut d, [172, 18, 0, 20], 443, &[([10, 1, 0, 0], 16)]);
    web6(&mut d, &[(1, 5), (2, 6)], Some(&["2001:db8:1::/48"]));
    out.push(d);
    // 4: web loses its LoadBalancer IP and turns to externalTrafficPolicy Local; the cart's
    // affinity timeout changes.
    let mut d = Desired::new();
    web(&mut d, &[(1, 1, l), (1, 5, l), (2, 6, 0)], false, true);
    sticky(&mut d, &[33, 34], 600);
    api(&mut d);
    fence(&mut d, [172, 18, 0, 20], 443, &[([10, 1, 0, 0], 16)]);
    out.push(d);
    // 5: everything removed.
    out.push(Desired::new());
    out
}
