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
//! Known layouts (conntrack only; every other map is refilled or restarts at zero):
//! - `lb_ct_v1`: the value carried the frontend's rev-NAT id where v2 carries the Service-port
//!   id. Converted to v2, then as v2.
//! - `lb_ct_v2` (established) and `lb_ct_new_v1` (unconfirmed): the v2 value (28 bytes, no flow
//!   state; a FIN or RST marked the reply-direction entry with `V2_CLOSING`, a reset also with
//!   `V2_CLOSED_FAST`). Converted to v3 (`lb_ct_v3`, `lb_ct_new_v2`) with a state derived from
//!   the tier, the protocol and the reply entry's flags (see [`state_of_v2`]), the same on both
//!   entries of a flow; no sequence number is known yet (`seq_next` 0, no `SEQ_KNOWN`).
//! - `lb_ct_v3` (established) and `lb_ct_new_v2` (unconfirmed): the v3 value is today's
//!   `CtEntry` alone; v4 (`lb_ct_v4`, `lb_ct_new_v3`) adds the cached next hop (`CtValue`), which
//!   starts empty (the flow's next packet looks it up). v1 and v2 entries go through v3.
use std::{collections::HashMap, fs, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{ct_flags, ct_state, map_name, proto, CtEntry, CtKey, CtValue};

use super::{
    ct_gc::Tier,
    pinned::{open_pinned, OtherVersion},
};

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

/// The conntrack value of layout v2 (`lb_ct_v2`, `lb_ct_new_v1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntryV2 {
    pub nat_saddr_be: u32,
    pub nat_daddr_be: u32,
    pub nat_sport_be: u16,
    pub nat_dport_be: u16,
    pub svc_port_id: u32,
    pub backend_id: u32,
    pub last_seen_s: u32,
    /// `ct_flags`, with `V2_CLOSING` and `V2_CLOSED_FAST` meaningful.
    pub flags: u16,
    pub _pad: u16,
}
// SAFETY: repr(C), Copy, explicit padding, any bit pattern is valid.
unsafe impl aya::Pod for CtEntryV2 {}
const _: () = assert!(std::mem::size_of::<CtEntryV2>() == 28);

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

/// The old conntrack maps this module converts: (pinned name, layout, tier it goes to).
const KNOWN: [(&str, u8, Tier); 5] = [
    ("lb_ct_v1", 1, Tier::Established),
    ("lb_ct_v2", 2, Tier::Established),
    ("lb_ct_new_v1", 2, Tier::New),
    ("lb_ct_v3", 3, Tier::Established),
    ("lb_ct_new_v2", 3, Tier::New),
];

/// An old conntrack value: v1 and v2 in the v2 layout (their flow state is derived when they
/// are written), v3 as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldEntry {
    V2(CtEntryV2),
    V3(CtEntry),
}

/// The entries of one old conntrack map.
type OldEntries = Vec<(CtKey, OldEntry)>;

/// What earlier passes copied: (old map, key) -> the old value.
pub type Seen = HashMap<(String, CtKey), OldEntry>;

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
    seen: &mut Seen,
) -> Result<Vec<Copied>> {
    // Every old entry first (in the v2 layout): a flow's state comes from its reply entry.
    let mut olds: Vec<(&OtherVersion, Tier, OldEntries)> = Vec::new();
    for o in old {
        let Some((_, layout, tier)) = KNOWN.iter().find(|(n, _, _)| *n == o.name) else {
            continue;
        };
        let data =
            MapData::from_pin(&o.path).with_context(|| format!("opening {}", o.path.display()))?;
        let bad = || {
            format!(
                "{} does not have the v{layout} conntrack layout",
                o.path.display()
            )
        };
        let entries: OldEntries = match *layout {
            1 => {
                let from: BpfHashMap<MapData, CtKey, CtEntryV1> =
                    BpfHashMap::try_from(Map::LruHashMap(data)).with_context(bad)?;
                from.iter()
                    .map(|kv| {
                        kv.map(|(k, v)| {
                            let v2 = convert_ct_v1(&v, k.proto, svc_port_of_rev_nat);
                            (k, OldEntry::V2(v2))
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
            2 => {
                let from: BpfHashMap<MapData, CtKey, CtEntryV2> =
                    BpfHashMap::try_from(Map::LruHashMap(data)).with_context(bad)?;
                from.iter()
                    .map(|kv| kv.map(|(k, v)| (k, OldEntry::V2(v))))
                    .collect::<Result<_, _>>()?
            }
            _ => {
                let from: BpfHashMap<MapData, CtKey, CtEntry> =
                    BpfHashMap::try_from(Map::LruHashMap(data)).with_context(bad)?;
                from.iter()
                    .map(|kv| kv.map(|(k, v)| (k, OldEntry::V3(v))))
                    .collect::<Result<_, _>>()?
            }
        };
        olds.push((o, *tier, entries));
    }
    if olds.is_empty() {
        return Ok(Vec::new());
    }
    // The v2 entries of every old map: a v2 flow's state comes from its reply entry.
    let all: HashMap<CtKey, CtEntryV2> = olds
        .iter()
        .flat_map(|(_, _, e)| e.iter())
        .filter_map(|(k, v)| match v {
            OldEntry::V2(v) => Some((*k, *v)),
            OldEntry::V3(_) => None,
        })
        .collect();
    let mut est: BpfHashMap<MapData, CtKey, CtValue> =
        BpfHashMap::try_from(Map::LruHashMap(open_pinned(bpffs, map_name::CONNTRACK)?))?;
    let mut new: BpfHashMap<MapData, CtKey, CtValue> = BpfHashMap::try_from(Map::LruHashMap(
        open_pinned(bpffs, map_name::CONNTRACK_NEW)?,
    ))?;
    let mut out = Vec::new();
    for (o, tier, entries) in olds {
        let (mut copied, mut kept) = (0, 0);
        for (k, v) in entries {
            if seen.get(&(o.name.clone(), k)) == Some(&v) {
                continue; // copied by an earlier pass, unchanged since
            }
            seen.insert((o.name.clone(), k), v);
            if est.get(&k, 0).is_ok() || new.get(&k, 0).is_ok() {
                kept += 1;
                continue;
            }
            let e = match v {
                OldEntry::V3(e) => e,
                OldEntry::V2(v) => {
                    let reply_flags = if v.flags & ct_flags::REPLY != 0 {
                        v.flags
                    } else {
                        all.get(&partner_key_v2(&k, &v))
                            .map_or(v.flags, |p| p.flags)
                    };
                    convert_ct_v2(&v, state_of_v2(k.proto, tier, reply_flags))
                }
            };
            let to = match tier {
                Tier::Established => &mut est,
                Tier::New => &mut new,
            };
            match to.insert(k, CtValue::new(e), BPF_NOEXIST) {
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
    Ok(out)
}

/// The key of a v2 entry's other direction (as `CtEntry::partner_key`).
fn partner_key_v2(key: &CtKey, e: &CtEntryV2) -> CtKey {
    key.reverse(
        e.nat_saddr_be,
        e.nat_daddr_be,
        e.nat_sport_be,
        e.nat_dport_be,
    )
}

/// A v1 conntrack value (of a flow of protocol `proto`) in the v2 layout.
pub fn convert_ct_v1(
    v: &CtEntryV1,
    proto: u8,
    svc_port_of_rev_nat: &HashMap<(u32, u8), u32>,
) -> CtEntryV2 {
    CtEntryV2 {
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
        _pad: 0,
    }
}

/// The v3 state of a v2 flow of protocol `proto` in `tier`, from its reply-direction entry's
/// flags (where the v2 datapath marked FINs and RSTs). A FIN without a reset becomes TIME-WAIT:
/// v2 did not record who closed first, and TIME-WAIT keeps the SNAT port longest of the closed
/// states, in case the backend holds the four-tuple.
pub fn state_of_v2(protocol: u8, tier: Tier, reply_flags: u16) -> u8 {
    let closing = reply_flags & ct_flags::V2_CLOSING != 0;
    let reset = reply_flags & ct_flags::V2_CLOSED_FAST != 0;
    match (protocol == proto::TCP, tier) {
        (true, Tier::Established) if closing && reset => ct_state::TCP_RESET,
        (true, Tier::Established) if closing => ct_state::TCP_TIME_WAIT,
        (true, Tier::Established) => ct_state::TCP_ESTABLISHED,
        (true, Tier::New) => ct_state::TCP_PICKUP,
        (false, Tier::Established) => ct_state::UDP_REPLIED,
        (false, Tier::New) => ct_state::UDP_UNREPLIED,
    }
}

/// A v2 conntrack value in the v3 layout, in `state`.
pub fn convert_ct_v2(v: &CtEntryV2, state: u8) -> CtEntry {
    CtEntry {
        nat_saddr_be: v.nat_saddr_be,
        nat_daddr_be: v.nat_daddr_be,
        nat_sport_be: v.nat_sport_be,
        nat_dport_be: v.nat_dport_be,
        svc_port_id: v.svc_port_id,
        backend_id: v.backend_id,
        last_seen_s: v.last_seen_s,
        flags: v.flags & !(ct_flags::V2_CLOSING | ct_flags::V2_CLOSED_FAST | ct_flags::SEQ_KNOWN),
        state,
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
        // v1 -> v2 -> v3.
        let v3 = convert_ct_v2(&e, ct_state::TCP_ESTABLISHED);
        assert_eq!(
            (
                v3.svc_port_id,
                v3.backend_id,
                v3.last_seen_s,
                v3.flags,
                v3.state
            ),
            (42, 9, 11, 5, ct_state::TCP_ESTABLISHED)
        );
    }

    #[test]
    fn conntrack_v2_states_follow_tier_protocol_and_closing_flags() {
        use ct_flags::{REPLY, V2_CLOSED_FAST as FAST, V2_CLOSING as CLOSING};
        use ct_state::*;
        use Tier::{Established as E, New as N};
        let t = proto::TCP;
        let u = proto::UDP;
        for (p, tier, flags, want) in [
            (t, E, REPLY, TCP_ESTABLISHED),
            (t, E, REPLY | CLOSING, TCP_TIME_WAIT),
            (t, E, REPLY | CLOSING | FAST, TCP_RESET),
            // CLOSED_FAST alone was never written; without CLOSING it means nothing.
            (t, E, REPLY | FAST, TCP_ESTABLISHED),
            (t, N, REPLY | CLOSING, TCP_PICKUP),
            (t, N, 0, TCP_PICKUP),
            (u, E, REPLY, UDP_REPLIED),
            (u, N, REPLY, UDP_UNREPLIED),
        ] {
            assert_eq!(state_of_v2(p, tier, flags), want, "{p} {tier:?} {flags:#x}");
        }
    }

    #[test]
    fn conntrack_v2_clears_the_old_closing_bits_and_knows_no_sequence() {
        let v2 = CtEntryV2 {
            nat_saddr_be: 1,
            nat_daddr_be: 2,
            nat_sport_be: 3,
            nat_dport_be: 4,
            svc_port_id: 5,
            backend_id: 6,
            last_seen_s: 7,
            flags: ct_flags::REPLY
                | ct_flags::SNAT
                | ct_flags::V2_CLOSING
                | ct_flags::V2_CLOSED_FAST,
            _pad: 0,
        };
        let e = convert_ct_v2(&v2, ct_state::TCP_RESET);
        assert_eq!(e.flags, ct_flags::REPLY | ct_flags::SNAT);
        assert_eq!((e.state, e.seq_next, e._pad), (ct_state::TCP_RESET, 0, 0));
        assert_eq!(
            (
                e.nat_saddr_be,
                e.nat_daddr_be,
                e.nat_sport_be,
                e.nat_dport_be
            ),
            (1, 2, 3, 4)
        );
        assert_eq!((e.svc_port_id, e.backend_id, e.last_seen_s), (5, 6, 7));
    }
}
