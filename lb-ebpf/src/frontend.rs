//! Frontend lookup: the frontends map's master entry (slot 0) for an address, port and protocol
//! in one traffic scope (`scope::EXTERNAL` for the north-south path, `scope::INTERNAL` for the socket
//! level), and the backend ids in its slots.
use lb_common::{FrontendSlot, FrontendSlotKey};

use crate::maps;

/// A frontend of ours: its master key (slot 0) and entry.
#[derive(Clone, Copy)]
pub struct Frontend {
    pub key: FrontendSlotKey,
    pub master: FrontendSlot,
}

/// The frontend at this address (network order), if there is one.
#[inline(always)]
pub fn lookup(addr_be: u32, port_be: u16, proto: u8, scope: u8) -> Option<Frontend> {
    let key = FrontendSlotKey {
        addr_be,
        port_be,
        proto,
        scope,
        slot: 0,
        _pad: 0,
    };
    let master = maps::service(&key)?;
    Some(Frontend { key, master })
}

impl Frontend {
    /// The backend id in `slot` (1-based).
    #[inline(always)]
    pub fn slot(&self, slot: u16) -> Option<u32> {
        let mut key = self.key;
        key.slot = slot;
        maps::service(&key).map(|v| v.backend_id)
    }
}
