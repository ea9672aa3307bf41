//! Maglev tables by backend set: one table per distinct set of backends, shared by every
//! frontend with that set, written whole before a master points at it and deleted with its last
//! reference. This registry keeps the books (ids, sizes, references, what adoption may keep);
//! the sync writes and deletes the chunks, in its order.
use std::collections::{BTreeMap, HashMap};

use lb_common::{scope, MaglevChunk, MaglevKey, MAGLEV_CHUNK};

use super::{ids::IdAllocator, maglev};
use crate::control::desired::{BackendKey, DesiredFrontend, FrontendKey};

/// A programmed Maglev table.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Table {
    id: u32,
    m: u32,
    refs: u32,
}

/// How many map entries (chunks) a table of size `m` takes.
pub(super) fn chunk_count(m: u32) -> u32 {
    m.div_ceil(MAGLEV_CHUNK)
}

/// Whether a frontend gets a Maglev table: north-south frontends an external load balancer or
/// router may spread over nodes (NodePorts, LoadBalancer IPs, external IPs) with two or more
/// backends. ClusterIPs reached from outside the node keep the uniform random choice, which
/// saves a table per ClusterIP.
pub(super) fn wants_table(fe: &FrontendKey, d: &DesiredFrontend, backends: usize) -> bool {
    use lb_common::service_flags::{EXTERNAL_IP, LOAD_BALANCER, NODE_PORT};
    fe.scope == scope::EXTERNAL
        && backends >= 2
        && d.flags & (NODE_PORT | LOAD_BALANCER | EXTERNAL_IP) != 0
}

/// The Maglev table of a backend set, as (M, backend ids), with `id_of` giving each backend's id
/// in the maps.
pub(super) fn table_of(set: &[BackendKey], id_of: impl Fn(&BackendKey) -> u32) -> (u32, Vec<u32>) {
    let entries: Vec<_> = set.iter().map(|k| (k.addr, k.proto, id_of(k))).collect();
    maglev::table(&entries)
}

/// The programmed Maglev tables, by backend set (sorted, deduplicated) and by id.
#[derive(Debug)]
pub(super) struct MaglevTables {
    by_set: HashMap<Vec<BackendKey>, Table>,
    sets: HashMap<u32, Vec<BackendKey>>,
    ids: IdAllocator,
}

impl MaglevTables {
    /// No table yet; ids in `used` (found in the pinned maps) are not handed out.
    pub(super) fn with_used(used: impl Iterator<Item = u32>) -> Self {
        Self {
            by_set: HashMap::new(),
            sets: HashMap::new(),
            ids: IdAllocator::with_used(used),
        }
    }

    /// Whether `set` has a table.
    pub(super) fn has(&self, set: &[BackendKey]) -> bool {
        self.by_set.contains_key(set)
    }

    /// Chunks of every table (map entries).
    pub(super) fn chunks(&self) -> u64 {
        self.by_set.values().map(|t| chunk_count(t.m) as u64).sum()
    }

    /// Whether table `id` is the one of `set`.
    pub(super) fn is_table_of(&self, id: u32, set: &[BackendKey]) -> bool {
        self.sets.get(&id).is_some_and(|s| s == set)
    }

    /// The (id, M) of the table of `set` when there is one, taking a reference to it.
    pub(super) fn share(&mut self, set: &[BackendKey]) -> Option<(u32, u32)> {
        let t = self.by_set.get_mut(set)?;
        t.refs += 1;
        Some((t.id, t.m))
    }

    /// An id for a new table (registered with [`MaglevTables::insert`] once written).
    pub(super) fn new_id(&mut self) -> u32 {
        self.ids.alloc()
    }

    /// Registers the table `id` of size `m` for `set`, written in full, with one reference.
    pub(super) fn insert(&mut self, set: &[BackendKey], id: u32, m: u32) {
        self.by_set.insert(set.to_vec(), Table { id, m, refs: 1 });
        self.sets.insert(id, set.to_vec());
    }

    /// Drops a reference to table `id`. When that was the last one the table is forgotten and
    /// its M returned: its chunks are to be deleted, then its id released.
    pub(super) fn unref(&mut self, id: u32) -> Option<u32> {
        let set = self.sets.get(&id).cloned()?;
        let t = self.by_set.get_mut(&set).expect("by_set and sets agree");
        t.refs -= 1;
        if t.refs > 0 {
            return None;
        }
        let m = t.m;
        self.by_set.remove(&set);
        self.sets.remove(&id);
        Some(m)
    }

    /// Hands the id of a deleted table out again.
    pub(super) fn release(&mut self, id: u32) {
        self.ids.release(id);
    }

    /// Adopts table `id` of size `m`, found pinned for a frontend whose backends are `set`, when
    /// it is exactly what this agent would write (`programmed`: the pinned chunks). A set adopted
    /// for an earlier frontend is shared when its id and M agree. False: the frontend gets a
    /// fresh table on the next sync.
    pub(super) fn adopt(
        &mut self,
        id: u32,
        m: u32,
        mut set: Vec<BackendKey>,
        id_of: impl Fn(&BackendKey) -> u32,
        programmed: &BTreeMap<MaglevKey, MaglevChunk>,
    ) -> bool {
        set.sort();
        set.dedup();
        if let Some(t) = self.by_set.get_mut(&set) {
            if t.id == id && t.m == m {
                t.refs += 1;
                return true;
            }
            return false;
        }
        if self.sets.contains_key(&id) {
            return false;
        }
        let (want_m, want) = table_of(&set, id_of);
        let chunks = maglev::chunks(&want);
        let same = want_m == m
            && chunks.iter().enumerate().all(|(c, v)| {
                programmed.get(&MaglevKey {
                    table_id: id,
                    chunk: c as u32,
                }) == Some(v)
            });
        if same {
            self.by_set.insert(set.clone(), Table { id, m, refs: 1 });
            self.sets.insert(id, set);
        }
        same
    }

    /// Takes one more reference to the known table `id`, for a master found pointing at it
    /// whose frontend did not adopt it (its backends differ): the master drops it when it is
    /// rewritten or removed. Nothing when no such table is known (its chunks are strays then,
    /// removed after the masters are rewritten).
    pub(super) fn hold(&mut self, id: u32) {
        if let Some(set) = self.sets.get(&id) {
            self.by_set
                .get_mut(set)
                .expect("by_set and sets agree")
                .refs += 1;
        }
    }

    /// Whether chunk `k` belongs to a known table.
    pub(super) fn explains(&self, k: &MaglevKey) -> bool {
        self.by_set
            .values()
            .any(|t| t.id == k.table_id && k.chunk < chunk_count(t.m))
    }
}
