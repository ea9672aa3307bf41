//! Read-only views of the pinned maps, shared by `lbctl` and the agent's metrics: datapath
//! counters, per-Service-port counters, map occupancy, conntrack and affinity entries. They work
//! while the agent is down.
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{counter, map_name, Counter};
use serde::Serialize;

use super::{
    capacity::MapSizes,
    pinned::{check_dir, open_pinned},
};

/// One datapath counter, summed over CPUs.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CounterView {
    pub name: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Sums the per-CPU counters pinned under `bpffs`, and adds `affinity_evictions`: affinity
/// records are only ever removed by the LRU, so the records created minus those alive is the
/// number evicted under pressure.
pub fn stats(bpffs: &Path) -> Result<Vec<CounterView>> {
    check_dir(bpffs)?;
    let data = open_pinned(bpffs, map_name::STATS)?;
    let arr: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let mut out = read_counters(&arr)?;
    let data = open_pinned(bpffs, map_name::AFFINITY)?;
    let aff: aya::maps::HashMap<MapData, lb_common::AffinityKey, lb_common::AffinityValue> =
        aya::maps::HashMap::try_from(Map::LruHashMap(data))?;
    let alive = aff.keys().count() as u64;
    out.push(affinity_evictions(&out, alive));
    Ok(out)
}

/// Packets per datapath counter (indexed as `counter::NAMES`), summed over CPUs: the stats map
/// alone (what the agent's lost-traffic warnings compare).
pub fn counter_packets(bpffs: &Path) -> Result<Vec<u64>> {
    let data = open_pinned(bpffs, map_name::STATS)?;
    let arr: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    Ok(read_counters(&arr)?.iter().map(|c| c.packets).collect())
}

/// The derived `affinity_evictions` counter.
pub fn affinity_evictions(counters: &[CounterView], alive: u64) -> CounterView {
    let created = counters
        .iter()
        .find(|c| c.name == "affinity_new")
        .map_or(0, |c| c.packets);
    CounterView {
        name: "affinity_evictions",
        packets: created.saturating_sub(alive),
        bytes: 0,
    }
}

/// Sums a per-CPU counter array (also used on a freshly loaded object in tests).
pub fn read_counters<T: std::borrow::Borrow<MapData>>(
    arr: &PerCpuArray<T, Counter>,
) -> Result<Vec<CounterView>> {
    let mut out = Vec::new();
    for (i, name) in counter::NAMES.iter().enumerate() {
        let values = arr.get(&(i as u32), 0)?;
        let (packets, bytes) = values
            .iter()
            .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
        out.push(CounterView {
            name,
            packets,
            bytes,
        });
    }
    Ok(out)
}

/// Entries and capacity of one pinned map.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MapOccupancy {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

fn count_entries<K: aya::Pod, V: aya::Pod>(bpffs: &Path, name: &str, lru: bool) -> Result<u64> {
    let data = open_pinned(bpffs, name)?;
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    let m: aya::maps::HashMap<MapData, K, V> = aya::maps::HashMap::try_from(map)?;
    Ok(m.keys().count() as u64)
}

/// What the kernel says of one open map in `/proc/self/fdinfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelMapInfo {
    /// The memory the kernel charges for the map (`memlock`), in bytes.
    pub memlock: u64,
    /// Its capacity (`max_entries`).
    pub max_entries: u64,
}

/// [`KernelMapInfo`] of an open map (the bench's memory table reads it too).
pub fn kernel_map_info(data: &MapData) -> Result<KernelMapInfo> {
    use std::os::fd::{AsFd, AsRawFd};
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .context("reading the map's fdinfo")?;
    let field = |k: &str| -> Result<u64> {
        info.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {k} line in the map's fdinfo"))
    };
    Ok(KernelMapInfo {
        memlock: field("memlock:")?,
        max_entries: field("max_entries:")?,
    })
}

/// The kernel memory of every map pinned under `bpffs` (the `memlock` the kernel charges for
/// it, from `/proc/self/fdinfo`), by pinned name.
pub fn map_memory(bpffs: &Path) -> Result<Vec<(&'static str, u64)>> {
    check_dir(bpffs)?;
    let mut out = Vec::new();
    for name in map_name::ALL {
        let data = open_pinned(bpffs, name)?;
        let info = kernel_map_info(&data).with_context(|| format!("map {name}"))?;
        out.push((name, info.memlock));
    }
    Ok(out)
}

/// The sizes (max entries) of the maps pinned under `bpffs`: what the kernel made them, which
/// is what an agent's size flags said when it first pinned them.
pub fn pinned_sizes(bpffs: &Path) -> Result<MapSizes> {
    let mut sizes = MapSizes::default();
    for (name, _) in MapSizes::default().per_map() {
        let path = bpffs.join(name);
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("reading the size of {}", path.display()))?;
        sizes.set(name, info.max_entries());
    }
    Ok(sizes)
}

/// Occupancy of every hash map pinned under `bpffs`.
pub fn map_occupancy(bpffs: &Path) -> Result<Vec<MapOccupancy>> {
    use lb_common::*;
    check_dir(bpffs)?;
    let sizes = pinned_sizes(bpffs)?;
    Ok(vec![
        MapOccupancy {
            map: "services",
            entries: count_entries::<FrontendSlotKey, FrontendSlot>(
                bpffs,
                map_name::FRONTENDS,
                false,
            )?,
            capacity: sizes.frontend_slots as u64,
        },
        MapOccupancy {
            map: "backends",
            entries: count_entries::<u32, Backend>(bpffs, map_name::BACKENDS, false)?,
            capacity: sizes.backends as u64,
        },
        MapOccupancy {
            map: "rev_nat",
            entries: count_entries::<u32, RevNat>(bpffs, map_name::REV_NAT, false)?,
            capacity: sizes.rev_nat as u64,
        },
        MapOccupancy {
            map: "members",
            entries: count_entries::<MemberKey, u32>(bpffs, map_name::MEMBERS, false)?,
            capacity: sizes.frontend_slots as u64,
        },
        MapOccupancy {
            map: "conntrack",
            entries: count_entries::<CtKey, lb_common::CtValue>(bpffs, map_name::CONNTRACK, true)?,
            capacity: sizes.conntrack as u64,
        },
        MapOccupancy {
            map: "conntrack_new",
            entries: count_entries::<CtKey, lb_common::CtValue>(
                bpffs,
                map_name::CONNTRACK_NEW,
                true,
            )?,
            capacity: sizes.conntrack_new as u64,
        },
        MapOccupancy {
            map: "maglev",
            entries: count_entries::<MaglevKey, MaglevChunk>(bpffs, map_name::MAGLEV, false)?,
            capacity: sizes.maglev_chunks as u64,
        },
        MapOccupancy {
            map: "affinity",
            entries: count_entries::<AffinityKey, AffinityValue>(bpffs, map_name::AFFINITY, true)?,
            capacity: sizes.affinity as u64,
        },
        MapOccupancy {
            map: "sock_rev_nat",
            entries: count_entries::<SockKey, SockRevNat>(bpffs, map_name::SOCK_REV_NAT, true)?,
            capacity: sizes.sock_rev_nat as u64,
        },
        MapOccupancy {
            map: "sock_flow",
            entries: count_entries::<SockKey, SockFlow>(bpffs, map_name::SOCK_FLOW, true)?,
            capacity: sizes.sock_flow as u64,
        },
        MapOccupancy {
            map: "source_ranges",
            entries: {
                let data = open_pinned(bpffs, map_name::SOURCE_RANGES)?;
                let m: aya::maps::LpmTrie<MapData, SourceRangeKey, u32> =
                    aya::maps::LpmTrie::try_from(Map::LpmTrie(data))?;
                m.keys().count() as u64
            },
            capacity: sizes.source_ranges as u64,
        },
    ])
}

/// Seconds of CLOCK_MONOTONIC_COARSE, the clock the datapath stamps records with.
pub fn boot_seconds() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// Every entry of the pinned hash map `name` (an LRU one with `lru`).
pub(crate) fn typed<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &str,
    lru: bool,
) -> Result<Vec<(K, V)>> {
    let data = open_pinned(bpffs, name)?;
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    let m: aya::maps::HashMap<MapData, K, V> = aya::maps::HashMap::try_from(map)?;
    Ok(m.iter().collect::<Result<Vec<_>, _>>()?)
}

/// A conntrack entry of family `A` with its tier's name.
pub(crate) type TieredEntry<A> = (lb_common::CtKeyOf<A>, lb_common::CtValueOf<A>, &'static str);

/// Both conntrack tiers of one family (`A`: `u32` or `Addr6`), each value with its tier's
/// name. An IPv6 tier an older agent did not pin reads as empty.
pub(crate) fn conntrack_tiers<A: super::ct_gc::CtAddr>(bpffs: &Path) -> Result<Vec<TieredEntry<A>>>
where
    lb_common::CtKeyOf<A>: aya::Pod,
    lb_common::CtValueOf<A>: aya::Pod,
{
    let mut v = Vec::new();
    for (name, tier) in [(A::MAPS.0, "established"), (A::MAPS.1, "new")] {
        if A::FAMILY == "IPv6" && !bpffs.join(name).exists() {
            continue;
        }
        v.extend(
            typed::<lb_common::CtKeyOf<A>, lb_common::CtValueOf<A>>(bpffs, name, true)?
                .into_iter()
                .map(|(k, v)| (k, v, tier)),
        );
    }
    Ok(v)
}

/// The route generation the datapath's cached next hops are checked against
/// (`lb_route_gen_v1`).
pub fn route_gen(bpffs: &Path) -> Result<u32> {
    let data = open_pinned(bpffs, map_name::ROUTE_GEN)?;
    let m: aya::maps::Array<MapData, u32> = aya::maps::Array::try_from(Map::Array(data))?;
    Ok(m.get(&0, 0)?)
}

/// Per-Service-port counters summed over CPUs, by Service-port id.
pub fn service_stats(bpffs: &Path) -> Result<Vec<(u32, lb_common::ServiceCounters)>> {
    let data = open_pinned(bpffs, map_name::SERVICE_STATS)?;
    let m: aya::maps::PerCpuHashMap<MapData, u32, lb_common::ServiceCounters> =
        aya::maps::PerCpuHashMap::try_from(Map::PerCpuHashMap(data))?;
    let mut out = Vec::new();
    for kv in m.iter() {
        let (id, per_cpu) = kv?;
        let mut sum = lb_common::ServiceCounters::default();
        for c in per_cpu.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
            sum.new_connections += c.new_connections;
            sum.drops_no_backend += c.drops_no_backend;
            sum.drops_other += c.drops_other;
            sum.drops_source_range += c.drops_source_range;
        }
        out.push((id, sum));
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}
