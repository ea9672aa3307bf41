//! Upgrades across map layout versions (the `_vN` suffix of every pinned map name).
//!
//! A new agent whose layout of a map differs from the pinned one never reads the old map as if
//! it had the new layout: it creates the map under its new name next to the old one. Then:
//! 1. maps whose contents come from the cluster (services, backends, rev-NAT, membership,
//!    Maglev tables, names, config) are filled by the first sync, and counters start at zero;
//! 2. state the datapath accumulated (conntrack) is converted from the old layout when this
//!    module knows that layout, before the new programs are attached and once more right after
//!    (for flows the old programs created meanwhile), never overwriting an entry the new
//!    programs wrote;
//! 3. only then the new programs replace the old ones (an atomic program swap on the pinned XDP
//!    link, a new cgroup/tc link renamed over the old pin), so no packet ever meets an empty map;
//! 4. the old pins are removed; the kernel frees the old maps once the old programs are gone.
//!
//! Known layouts: `lb_ct_v1` (the conntrack value carried the frontend's rev-NAT id where v2
//! carries the Service-port id).
use std::{collections::HashMap, fs, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{map_name, CtEntry, CtKey};

use super::pinned::{open_pinned, OtherVersion};

/// The conntrack value of layout v1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntryV1 {
    pub nat_saddr_be: u32,
    pub nat_daddr_be: u32,
    pub nat_sport_be: u16,
    pub nat_dport_be: u16,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub last_seen_s: u32,
    pub flags: u16,
    pub _pad: u16,
}
// SAFETY: repr(C), Copy, explicit padding, any bit pattern is valid.
unsafe impl aya::Pod for CtEntryV1 {}
const _: () = assert!(std::mem::size_of::<CtEntryV1>() == 28);

/// What one copy pass did for one old map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Copied {
    pub from: String,
    pub to: &'static str,
    /// Entries written into the new map.
    pub copied: u64,
    /// Entries the new map already had (written by the new programs): kept as they are.
    pub kept: u64,
}

const BPF_NOEXIST: u64 = 1;

/// Converts the state of every old map this module knows into its current map under `bpffs`.
/// `svc_port_of_rev_nat` maps a (rev-NAT id, protocol) to its Service-port id, from the synced
/// state (rev-NAT ids are kept across versions: the rev-NAT map's layout did not change).
///
/// `seen` carries what an earlier pass copied: a later pass (after the program swap) copies only
/// entries the old programs wrote or changed since, so it never brings back an entry the new
/// programs removed meanwhile (a flow that ended, a SNAT port given to a new flow). Entries the
/// new programs hold in either conntrack tier are kept as they are.
pub fn copy_state(
    bpffs: &Path,
    old: &[OtherVersion],
    svc_port_of_rev_nat: &HashMap<(u32, u8), u32>,
    seen: &mut HashMap<CtKey, CtEntryV1>,
) -> Result<Vec<Copied>> {
    let mut out = Vec::new();
    for o in old {
        if o.name == "lb_ct_v1" && o.current == map_name::CONNTRACK {
            let data = MapData::from_pin(&o.path)
                .with_context(|| format!("opening {}", o.path.display()))?;
            let from: BpfHashMap<MapData, CtKey, CtEntryV1> =
                BpfHashMap::try_from(Map::LruHashMap(data)).with_context(|| {
                    format!("{} does not have the v1 conntrack layout", o.path.display())
                })?;
            let mut to: BpfHashMap<MapData, CtKey, CtEntry> =
                BpfHashMap::try_from(Map::LruHashMap(open_pinned(bpffs, map_name::CONNTRACK)?))?;
            let new_tier: BpfHashMap<MapData, CtKey, CtEntry> = BpfHashMap::try_from(
                Map::LruHashMap(open_pinned(bpffs, map_name::CONNTRACK_NEW)?),
            )?;
            let (mut copied, mut kept) = (0, 0);
            let entries: Vec<(CtKey, CtEntryV1)> = from.iter().collect::<Result<_, _>>()?;
            for (k, v) in entries {
                if seen.get(&k) == Some(&v) {
                    continue; // copied by an earlier pass, unchanged since
                }
                seen.insert(k, v);
                if new_tier.get(&k, 0).is_ok() {
                    kept += 1;
                    continue;
                }
                let e = convert_ct_v1(&v, k.proto, svc_port_of_rev_nat);
                match to.insert(k, e, BPF_NOEXIST) {
                    Ok(()) => copied += 1,
                    Err(_) => kept += 1,
                }
            }
            out.push(Copied {
                from: o.name.clone(),
                to: o.current,
                copied,
                kept,
            });
        }
    }
    Ok(out)
}

/// A v1 conntrack value (of a flow of protocol `proto`) in the v2 layout.
pub fn convert_ct_v1(
    v: &CtEntryV1,
    proto: u8,
    svc_port_of_rev_nat: &HashMap<(u32, u8), u32>,
) -> CtEntry {
    CtEntry {
        nat_saddr_be: v.nat_saddr_be,
        nat_daddr_be: v.nat_daddr_be,
        nat_sport_be: v.nat_sport_be,
        nat_dport_be: v.nat_dport_be,
        // Unknown (the frontend is gone): the flow still works, only its per-Service counters
        // are not kept.
        svc_port_id: svc_port_of_rev_nat
            .get(&(v.rev_nat_id, proto))
            .copied()
            .unwrap_or(0),
        backend_id: v.backend_id,
        last_seen_s: v.last_seen_s,
        flags: v.flags,
        // Placeholder until the v2 -> v3 conversion lands (branch nat-agent).
        state: lb_common::ct_state::TCP_ESTABLISHED,
        _pad: 0,
        seq_next: 0,
    }
}

/// Removes the old pins (once the new programs are attached).
pub fn remove(old: &[OtherVersion]) -> Result<()> {
    for o in old {
        if o.path.exists() {
            fs::remove_file(&o.path).with_context(|| format!("removing {}", o.path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_v1_keeps_the_flow_and_maps_the_service_port() {
        let v1 = CtEntryV1 {
            nat_saddr_be: 1,
            nat_daddr_be: 2,
            nat_sport_be: 3,
            nat_dport_be: 4,
            rev_nat_id: 7,
            backend_id: 9,
            last_seen_s: 11,
            flags: 5,
            _pad: 0,
        };
        // One address and port, two Service ports (TCP and UDP).
        let ids = HashMap::from([((7, 6), 42), ((7, 17), 43)]);
        let e = convert_ct_v1(&v1, 6, &ids);
        assert_eq!(
            (
                e.nat_saddr_be,
                e.nat_daddr_be,
                e.nat_sport_be,
                e.nat_dport_be
            ),
            (1, 2, 3, 4)
        );
        assert_eq!(
            (e.svc_port_id, e.backend_id, e.last_seen_s, e.flags),
            (42, 9, 11, 5)
        );
        assert_eq!(convert_ct_v1(&v1, 17, &ids).svc_port_id, 43);
        assert_eq!(convert_ct_v1(&v1, 6, &HashMap::new()).svc_port_id, 0);
    }
}
