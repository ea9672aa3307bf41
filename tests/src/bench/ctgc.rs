//! The agent's conntrack sweep on full maps: both tiers at their capacity (`limits::CONNTRACK`
//! and `limits::CONNTRACK_NEW` entries, LRU maps of the real layout created for the run), read
//! with `BPF_MAP_LOOKUP_BATCH` as the sweep does and, for comparison, with aya's per-key
//! iteration (`get_next_key` + `lookup` per entry). Then a sweep that finds half of the flows
//! expired: how fast entries are removed.
use std::time::Instant;

use anyhow::Result;
use aya::maps::{HashMap, Map, MapData};
use lb_common::{ct_flags, ct_state, limits, proto, CtEntry, CtKey};
use lb_userspace::dataplane::ct_gc::{sweep, CtTiers, Tier};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct CtGcBench {
    /// Entries in both tiers when the sweeps ran.
    pub entries: u64,
    /// A sweep with nothing expired: every entry read (batched).
    pub sweep_idle_s: f64,
    pub sweep_entries_per_s: f64,
    /// aya's per-key iteration over the same entries.
    pub aya_iter_s: f64,
    pub aya_iter_entries_per_s: f64,
    /// A sweep that finds half of the flows expired.
    pub sweep_half_expired_s: f64,
    pub removed: u64,
    pub removed_per_s: f64,
}

const NOW: u32 = 10_000_000;

/// Fills a tier with `flows` flows (two entries each), numbered from `first`; every other flow
/// is stamped past its lifetime.
fn fill(t: &CtTiers, tier: Tier, first: u32, flows: u32) -> Result<()> {
    for i in first..first + flows {
        let key = CtKey {
            saddr_be: (0x0a00_0000 + i).to_be(),
            daddr_be: u32::from_ne_bytes([10, 96, 0, 1]),
            sport_be: ((i % 50_000) as u16 + 1024).to_be(),
            dport_be: 53u16.to_be(),
            proto: proto::UDP,
            _pad: [0; 3],
        };
        let (state, age) = match tier {
            Tier::Established => (ct_state::UDP_REPLIED, ct_state::UDP_REPLIED_S),
            Tier::New => (ct_state::UDP_UNREPLIED, ct_state::UDP_UNREPLIED_S),
        };
        let e = CtEntry {
            nat_saddr_be: u32::from_ne_bytes([192, 168, 0, 1]),
            nat_daddr_be: (0x0af4_0000 + (i % 1000)).to_be(),
            nat_sport_be: ((i % 60_000) as u16 + 1024).to_be(),
            nat_dport_be: (8000 + (i / 60_000) as u16).to_be(),
            svc_port_id: 1,
            backend_id: 1 + i % 1000,
            last_seen_s: if i % 2 == 0 { NOW - age - 1 } else { NOW },
            flags: ct_flags::SNAT,
            state,
            _pad: 0,
            seq_next: 0,
        };
        let (rk, r) = e.partner(&key);
        t.insert(&key, &e, tier)?;
        t.insert(&rk, &r, tier)?;
    }
    Ok(())
}

/// `scale` 1.0: the tiers' real capacities; less for a quick run.
pub fn ct_gc_bench(scale: f64) -> Result<CtGcBench> {
    let cap = |n: u32| ((n as f64 * scale) as u32).max(64);
    let (est, new) = (cap(limits::CONNTRACK), cap(limits::CONNTRACK_NEW));
    // The LRU maps get some headroom, so that filling them to the tiers' capacity evicts
    // nothing (an LRU map may evict before it is full).
    let t = CtTiers::create((est + est / 4, new + new / 4))?;
    fill(&t, Tier::Established, 0, est / 2)?;
    fill(&t, Tier::New, est / 2, new / 2)?;

    let started = Instant::now();
    let idle = sweep(&t, NOW - 1_000)?; // nothing expired yet at this time
    let sweep_idle_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(idle.removed == 0, "nothing should expire: {idle:?}");

    // aya's per-key walk over both tiers, through a second handle on the same maps.
    let started = Instant::now();
    let mut n = 0u64;
    for tier in [Tier::Established, Tier::New] {
        let data: MapData = t.map_data(tier)?;
        let m: HashMap<MapData, CtKey, lb_common::CtValue> =
            HashMap::try_from(Map::LruHashMap(data))?;
        for kv in m.iter() {
            kv?;
            n += 1;
        }
    }
    let aya_iter_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let half = sweep(&t, NOW)?;
    let sweep_half_expired_s = started.elapsed().as_secs_f64();
    eprintln!(
        "ctgc: half-expired sweep: walk {:?}, decide + re-read {:?}, delete {:?}",
        half.walk, half.recheck, half.delete
    );
    Ok(CtGcBench {
        entries: idle.examined,
        sweep_idle_s,
        sweep_entries_per_s: idle.examined as f64 / sweep_idle_s,
        aya_iter_s,
        aya_iter_entries_per_s: n as f64 / aya_iter_s,
        sweep_half_expired_s,
        removed: half.removed,
        removed_per_s: half.removed as f64 / sweep_half_expired_s,
    })
}
