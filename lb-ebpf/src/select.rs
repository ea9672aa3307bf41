//! Backend selection for a new connection: the client's session affinity record when the
//! Service asks for affinity and its backend is still usable, else the frontend's Maglev table
//! (XDP path: external frontends with two or more backends), else a uniformly random slot.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{counter, AffinityKey, Backend};

use crate::{affinity, frontend::Frontend, maps};

/// A backend chosen for a new connection.
#[derive(Clone, Copy)]
pub struct Chosen {
    pub id: u32,
    pub backend: Backend,
    /// The slot it sits in (1-based); 0 when it came from an affinity record or a Maglev table.
    pub slot: u16,
}

/// A slot or Maglev entry names no backend the maps hold: the maps are inconsistent (the agent
/// writes backends before the slots and tables that point at them).
pub struct Missing;

/// The backend in `slot` (1-based) of a frontend.
#[inline(always)]
pub fn in_slot(fe: &Frontend, slot: u16) -> Result<Chosen, Missing> {
    let id = fe.slot(slot).ok_or(Missing)?;
    let backend = maps::backend(id).ok_or(Missing)?;
    Ok(Chosen { id, backend, slot })
}

/// A uniformly random slot. The frontend must have backends (`master.count > 0`).
#[inline(always)]
pub fn random_slot(fe: &Frontend) -> Result<Chosen, Missing> {
    // SAFETY: helper without preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    in_slot(fe, (r % fe.master.count as u32) as u16 + 1)
}

/// The frontend's Maglev entry for the flow hash (counted as `XDP_MAGLEV`), else a random slot:
/// no table (a single backend, or maps written by an older agent).
#[inline(always)]
pub fn by_hash(fe: &Frontend, hash: u32) -> Result<Chosen, Missing> {
    match maps::maglev(&fe.master, hash) {
        Some(id) => {
            maps::count(counter::XDP_MAGLEV, 0);
            let backend = maps::backend(id).ok_or(Missing)?;
            Ok(Chosen {
                id,
                backend,
                slot: 0,
            })
        }
        None => random_slot(fe),
    }
}

/// The backend of the client's live affinity record when it is still usable for `fe`, else
/// `fresh()`'s choice; the record is created or refreshed with the backend either way.
#[inline(always)]
pub fn with_affinity(
    fe: &Frontend,
    client: &AffinityKey,
    now: u32,
    fresh: impl FnOnce() -> Result<Chosen, Missing>,
) -> Result<Chosen, Missing> {
    let chosen = match affinity::lookup(&fe.key, &fe.master, client, now) {
        Some((id, backend)) => Chosen {
            id,
            backend,
            slot: 0,
        },
        None => fresh()?,
    };
    affinity::record(client, chosen.id, now);
    Ok(chosen)
}
