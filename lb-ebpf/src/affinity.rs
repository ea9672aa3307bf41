//! Session affinity (`sessionAffinity: ClientIP`): one record per (Service port, client), shared
//! by every frontend of the Service port, refreshed by each new connection, ignored once expired
//! or once its backend left the frontend's usable set.
use lb_common::{
    counter, service_flags, AffinityKey, AffinityValue, Backend, FrontendSlot, FrontendSlotKey,
    MemberKey,
};

use crate::maps::{self, AFFINITY, MEMBERS};

#[inline(always)]
pub fn enabled(master: &FrontendSlot) -> bool {
    master.flags & service_flags::SESSION_AFFINITY != 0 && master.affinity_timeout_s != 0
}

#[inline(always)]
pub fn key(master: &FrontendSlot, client_kind: u32, client: u64) -> AffinityKey {
    AffinityKey {
        svc_port_id: master.svc_port_id,
        client_kind,
        client,
    }
}

/// The backend a live record pins this client to, when it is still usable for `frontend`.
#[inline(always)]
pub fn lookup(
    frontend: &FrontendSlotKey,
    master: &FrontendSlot,
    key: &AffinityKey,
    now: u32,
) -> Option<(u32, Backend)> {
    // SAFETY: value copied out at once.
    let rec = unsafe { AFFINITY.get(key).copied() }?;
    if now.wrapping_sub(rec.last_used_s) > master.affinity_timeout_s {
        maps::count(counter::AFFINITY_EXPIRED, 0);
        return None;
    }
    let member = MemberKey {
        frontend: *frontend,
        backend_id: rec.backend_id,
    };
    // SAFETY: as above.
    let usable = unsafe { MEMBERS.get(member).is_some() };
    let backend = if usable {
        maps::backend(rec.backend_id)
    } else {
        None
    };
    match backend {
        Some(b) => {
            maps::count(counter::AFFINITY_HIT, 0);
            Some((rec.backend_id, b))
        }
        None => {
            maps::count(counter::AFFINITY_STALE, 0);
            None
        }
    }
}

/// Creates or refreshes the record after a new connection chose `backend_id`.
#[inline(always)]
pub fn record(key: &AffinityKey, backend_id: u32, now: u32) {
    // SAFETY: as above.
    if unsafe { AFFINITY.get(key).is_none() } {
        maps::count(counter::AFFINITY_NEW, 0);
    }
    // A refused insert (rare for an LRU map) only loses the record: the client's next
    // connection chooses afresh, as after an eviction.
    let _ = AFFINITY.insert(
        key,
        AffinityValue {
            backend_id,
            last_used_s: now,
        },
        0,
    );
}
