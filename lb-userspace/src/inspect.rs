//! Reading the pinned maps for `lbctl` (works while the agent is down).
use std::{net::SocketAddrV4, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{counter, map_name, Counter};
use serde::Serialize;

use crate::dataplane::{AyaDataplane, Dataplane, Snapshot};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FrontendView {
    pub frontend: String,
    pub protocol: &'static str,
    pub scope: &'static str,
    pub flags: u16,
    pub rev_nat_id: u32,
    pub affinity_timeout_s: u32,
    pub backends: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendView {
    pub id: u32,
    pub address: String,
    pub protocol: &'static str,
    pub flags: u8,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CounterView {
    pub name: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

fn proto_name(p: u8) -> &'static str {
    match p {
        lb_common::proto::TCP => "TCP",
        lb_common::proto::UDP => "UDP",
        _ => "?",
    }
}

fn addr(addr_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr_be.to_ne_bytes().into(), u16::from_be(port_be))
}

fn check_dir(bpffs: &Path) -> Result<()> {
    if !bpffs.is_dir() {
        anyhow::bail!(crate::agent::UsageError(format!(
            "--bpffs {}: no such directory (is the agent's --bpffs right?)",
            bpffs.display()
        )));
    }
    Ok(())
}

pub fn snapshot(bpffs: &Path) -> Result<Snapshot> {
    check_dir(bpffs)?;
    AyaDataplane::from_pins(bpffs)?.snapshot()
}

pub fn frontends(s: &Snapshot) -> Vec<FrontendView> {
    let mut out = Vec::new();
    for (k, v) in s.services.iter().filter(|(k, _)| k.slot == 0) {
        let backends = (1..=v.count)
            .map(|slot| {
                let id = s.services.get(&lb_common::ServiceKey { slot, ..*k }).map(|e| e.backend_id);
                match id.and_then(|id| s.backends.get(&id)) {
                    Some(b) => addr(b.addr_be, b.port_be).to_string(),
                    None => format!("<missing slot {slot}>"),
                }
            })
            .collect();
        out.push(FrontendView {
            frontend: addr(k.addr_be, k.port_be).to_string(),
            protocol: proto_name(k.proto),
            scope: if k.scope == lb_common::scope::INTERNAL { "internal" } else { "external" },
            flags: v.flags,
            rev_nat_id: v.rev_nat_id,
            affinity_timeout_s: v.affinity_timeout_s,
            backends,
        });
    }
    out
}

pub fn backends(s: &Snapshot) -> Vec<BackendView> {
    s.backends
        .iter()
        .map(|(id, b)| BackendView {
            id: *id,
            address: addr(b.addr_be, b.port_be).to_string(),
            protocol: proto_name(b.proto),
            flags: b.flags,
        })
        .collect()
}

/// Sums the per-CPU counters pinned under `bpffs`, and adds `affinity_evictions`: affinity
/// records are only ever removed by the LRU, so the records created minus those alive is the
/// number evicted under pressure.
pub fn stats(bpffs: &Path) -> Result<Vec<CounterView>> {
    check_dir(bpffs)?;
    let p = bpffs.join(map_name::STATS);
    let data = MapData::from_pin(&p).with_context(|| format!("cannot open pinned map {}", p.display()))?;
    let arr: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let mut out = read_counters(&arr)?;
    let p = bpffs.join(map_name::AFFINITY);
    let data = MapData::from_pin(&p).with_context(|| format!("cannot open pinned map {}", p.display()))?;
    let aff: aya::maps::HashMap<MapData, lb_common::AffinityKey, lb_common::AffinityValue> =
        aya::maps::HashMap::try_from(Map::LruHashMap(data))?;
    let alive = aff.keys().count() as u64;
    out.push(affinity_evictions(&out, alive));
    Ok(out)
}

/// The derived `affinity_evictions` counter.
pub fn affinity_evictions(counters: &[CounterView], alive: u64) -> CounterView {
    let created = counters.iter().find(|c| c.name == "affinity_new").map_or(0, |c| c.packets);
    CounterView { name: "affinity_evictions", packets: created.saturating_sub(alive), bytes: 0 }
}

/// Sums a per-CPU counter array (also used on a freshly loaded object in tests).
pub fn read_counters<T: std::borrow::Borrow<MapData>>(arr: &PerCpuArray<T, Counter>) -> Result<Vec<CounterView>> {
    let mut out = Vec::new();
    for (i, name) in counter::NAMES.iter().enumerate() {
        let values = arr.get(&(i as u32), 0)?;
        let (packets, bytes) = values.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
        out.push(CounterView { name, packets, bytes });
    }
    Ok(out)
}

/// An aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Entries and capacity of one pinned map.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MapOccupancy {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

fn count_entries<K: aya::Pod, V: aya::Pod>(bpffs: &Path, name: &str, lru: bool) -> Result<u64> {
    let p = bpffs.join(name);
    let data = MapData::from_pin(&p).with_context(|| format!("cannot open pinned map {}", p.display()))?;
    let map = if lru { Map::LruHashMap(data) } else { Map::HashMap(data) };
    let m: aya::maps::HashMap<MapData, K, V> = aya::maps::HashMap::try_from(map)?;
    Ok(m.keys().count() as u64)
}

/// Occupancy of every hash map pinned under `bpffs`.
pub fn map_occupancy(bpffs: &Path) -> Result<Vec<MapOccupancy>> {
    use lb_common::*;
    check_dir(bpffs)?;
    Ok(vec![
        MapOccupancy { map: "services", entries: count_entries::<ServiceKey, ServiceValue>(bpffs, map_name::SERVICES, false)?, capacity: limits::SERVICES as u64 },
        MapOccupancy { map: "backends", entries: count_entries::<u32, Backend>(bpffs, map_name::BACKENDS, false)?, capacity: limits::BACKENDS as u64 },
        MapOccupancy { map: "rev_nat", entries: count_entries::<u32, RevNat>(bpffs, map_name::REV_NAT, false)?, capacity: limits::REV_NAT as u64 },
        MapOccupancy { map: "members", entries: count_entries::<MemberKey, u32>(bpffs, map_name::MEMBERS, false)?, capacity: limits::MEMBERS as u64 },
        MapOccupancy { map: "conntrack", entries: count_entries::<CtKey, CtEntry>(bpffs, map_name::CONNTRACK, true)?, capacity: limits::CONNTRACK as u64 },
        MapOccupancy { map: "affinity", entries: count_entries::<AffinityKey, AffinityValue>(bpffs, map_name::AFFINITY, true)?, capacity: limits::AFFINITY as u64 },
        MapOccupancy { map: "sock_rev_nat", entries: count_entries::<SockKey, SockRevNat>(bpffs, map_name::SOCK_REV_NAT, true)?, capacity: limits::SOCK_REV_NAT as u64 },
        MapOccupancy { map: "sock_flow", entries: count_entries::<SockKey, SockFlow>(bpffs, map_name::SOCK_FLOW, true)?, capacity: limits::SOCK_FLOW as u64 },
    ])
}
