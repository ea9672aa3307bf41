//! The maps pinned under `--bpffs`: the aya [`Dataplane`] on them, opening one by name (saying
//! so when only another layout version of it is there), and finding our maps pinned at other
//! layout versions (the `_vN` suffix of every map name; upgrades across them are `migrate`'s).
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    path::PathBuf,
};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError};
use lb_common::{
    map_name, Addr6, Backend, Config, FrontendSlot, FrontendSlotKey, MaglevChunk, MaglevKey,
    MemberKey, RevNat, ServiceName, SourceRangeKey, SourceRangeKey6,
};

use super::{
    addr6_from_words, addr6_words, ct_gc::CtTiers, source_range_key, source_range_key6, Dataplane,
    MapContents, SourceRange,
};
use crate::error::UsageError;

/// Fails with a [`UsageError`] when `bpffs` is not a directory.
pub(crate) fn check_dir(bpffs: &Path) -> Result<()> {
    if !bpffs.is_dir() {
        anyhow::bail!(UsageError(format!(
            "--bpffs {}: no such directory (is the agent's --bpffs right?)",
            bpffs.display()
        )));
    }
    Ok(())
}

/// The conntrack tiers pinned under `bpffs`.
pub fn open_conntrack(bpffs: &Path) -> Result<CtTiers> {
    Ok(CtTiers::from_maps(
        open_pinned(bpffs, map_name::CONNTRACK)?,
        open_pinned(bpffs, map_name::CONNTRACK_NEW)?,
    ))
}

/// The IPv6 conntrack tiers pinned under `bpffs`.
pub fn open_conntrack6(bpffs: &Path) -> Result<CtTiers<Addr6>> {
    Ok(CtTiers::from_maps(
        open_pinned(bpffs, map_name::CONNTRACK6)?,
        open_pinned(bpffs, map_name::CONNTRACK6_NEW)?,
    ))
}

/// Opens a pinned map; when it is missing but a map of the same name with another layout
/// version is there, says so.
pub fn open_pinned(bpffs: &Path, name: &str) -> Result<MapData> {
    check_dir(bpffs)?;
    let p = bpffs.join(name);
    if !p.exists() {
        let stem = name.rsplit_once("_v").map_or(name, |(s, _)| s);
        let other = std::fs::read_dir(bpffs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|f| f.rsplit_once("_v").is_some_and(|(s, _)| s == stem));
        return Err(match other {
            Some(o) => anyhow::Error::new(UsageError(format!(
                "{}: map {name} not found, but {o} is: pinned by an agent of another layout version (use the lbctl of that version, or restart the agent of this one)",
                bpffs.display()
            ))),
            None => anyhow::Error::new(UsageError(format!("{}: map {name} not found (is the agent's --bpffs right?)", bpffs.display()))),
        });
    }
    MapData::from_pin(&p).with_context(|| format!("cannot open pinned map {}", p.display()))
}

/// A map of ours pinned under another layout version than this agent's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherVersion {
    pub path: PathBuf,
    /// Its pinned name, e.g. `lb_ct_v1`.
    pub name: String,
    /// This agent's name for the same map, e.g. `lb_ct_v4`.
    pub current: &'static str,
}

/// The pinned maps under `bpffs` that are ours at another layout version.
pub fn other_versions(bpffs: &Path) -> Vec<OtherVersion> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir(bpffs) else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((base, _)) = map_name::split_version(&name) else {
            continue;
        };
        let current = map_name::ALL
            .iter()
            .find(|c| map_name::split_version(c).is_some_and(|(b, _)| b == base));
        if let Some(current) = current.filter(|c| **c != name) {
            out.push(OtherVersion {
                path: e.path(),
                name,
                current,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Encodes a Service-port name for the names map (truncated to its 256 bytes).
pub fn encode_name(name: &str) -> ServiceName {
    let mut bytes = [0u8; 256];
    let n = name.len().min(bytes.len());
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    ServiceName { bytes }
}

/// The Service-port name a names-map value holds.
pub fn decode_name(v: &ServiceName) -> String {
    let end = v
        .bytes
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(v.bytes.len());
    String::from_utf8_lossy(&v.bytes[..end]).into_owned()
}

/// A delete of an entry that is not there is done, as in the fake: an agent restarted after a
/// kill (or after an older agent's crash) may remove a frontend whose master counts a slot that
/// is missing, and must not fail its syncs from then on.
fn deleted(r: Result<(), MapError>) -> Result<()> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => Ok(r?),
    }
}

/// The pinned service maps, through aya.
pub struct AyaDataplane {
    services: HashMap<MapData, FrontendSlotKey, FrontendSlot>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nat: HashMap<MapData, u32, RevNat>,
    members: HashMap<MapData, MemberKey, u32>,
    names: HashMap<MapData, u32, ServiceName>,
    maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    source_ranges6: LpmTrie<MapData, SourceRangeKey6, u32>,
    addr6: HashMap<MapData, Addr6, u32>,
    addr6_ids: HashMap<MapData, u32, Addr6>,
    config: Array<MapData, Config>,
    config6: Array<MapData, lb_common::Config6>,
    /// The conntrack tiers of both families, for flushing the UDP flows of removed backends: a
    /// backend id names an IPv4 or an IPv6 backend, and its flows are in its family's tiers.
    conntrack: CtTiers,
    conntrack6: CtTiers<Addr6>,
}

impl AyaDataplane {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the object"))
        };
        Ok(Self {
            services: HashMap::try_from(take(map_name::FRONTENDS)?)?,
            backends: HashMap::try_from(take(map_name::BACKENDS)?)?,
            rev_nat: HashMap::try_from(take(map_name::REV_NAT)?)?,
            members: HashMap::try_from(take(map_name::MEMBERS)?)?,
            names: HashMap::try_from(take(map_name::SERVICE_NAMES)?)?,
            maglev: HashMap::try_from(take(map_name::MAGLEV)?)?,
            source_ranges: LpmTrie::try_from(take(map_name::SOURCE_RANGES)?)?,
            source_ranges6: LpmTrie::try_from(take(map_name::SOURCE_RANGES6)?)?,
            addr6: HashMap::try_from(take(map_name::ADDR6)?)?,
            addr6_ids: HashMap::try_from(take(map_name::ADDR6_IDS)?)?,
            config: Array::try_from(take(map_name::CONFIG)?)?,
            config6: Array::try_from(take(map_name::CONFIG6)?)?,
            conntrack: CtTiers::from_ebpf(ebpf)?,
            conntrack6: CtTiers::from_ebpf(ebpf)?,
        })
    }

    /// Opens the maps pinned under `dir` (as `lbctl` does).
    pub fn from_pins(dir: &Path) -> Result<Self> {
        let open_data = |name: &str| open_pinned(dir, name);
        let open = |name: &str| -> Result<Map> { Ok(Map::HashMap(open_data(name)?)) };
        Ok(Self {
            services: HashMap::try_from(open(map_name::FRONTENDS)?)?,
            backends: HashMap::try_from(open(map_name::BACKENDS)?)?,
            rev_nat: HashMap::try_from(open(map_name::REV_NAT)?)?,
            members: HashMap::try_from(open(map_name::MEMBERS)?)?,
            names: HashMap::try_from(open(map_name::SERVICE_NAMES)?)?,
            maglev: HashMap::try_from(open(map_name::MAGLEV)?)?,
            source_ranges: LpmTrie::try_from(Map::LpmTrie(open_data(map_name::SOURCE_RANGES)?))?,
            source_ranges6: LpmTrie::try_from(Map::LpmTrie(open_data(map_name::SOURCE_RANGES6)?))?,
            addr6: HashMap::try_from(open(map_name::ADDR6)?)?,
            addr6_ids: HashMap::try_from(open(map_name::ADDR6_IDS)?)?,
            config: Array::try_from(Map::Array(open_data(map_name::CONFIG)?))?,
            config6: Array::try_from(Map::Array(open_data(map_name::CONFIG6)?))?,
            conntrack: open_conntrack(dir)?,
            conntrack6: open_conntrack6(dir)?,
        })
    }
}

impl Dataplane for AyaDataplane {
    fn put_service(&mut self, key: &FrontendSlotKey, value: &FrontendSlot) -> Result<()> {
        Ok(self.services.insert(key, value, 0)?)
    }
    fn del_service(&mut self, key: &FrontendSlotKey) -> Result<()> {
        deleted(self.services.remove(key))
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<()> {
        Ok(self.backends.insert(id, value, 0)?)
    }
    fn del_backend(&mut self, id: u32) -> Result<()> {
        deleted(self.backends.remove(&id))
    }
    fn put_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<()> {
        Ok(self.rev_nat.insert(id, value, 0)?)
    }
    fn del_rev_nat(&mut self, id: u32) -> Result<()> {
        deleted(self.rev_nat.remove(&id))
    }
    fn put_config(&mut self, value: &Config) -> Result<()> {
        Ok(self.config.set(0, value, 0)?)
    }
    fn put_config6(&mut self, value: &lb_common::Config6) -> Result<()> {
        Ok(self.config6.set(0, value, 0)?)
    }
    fn put_member(&mut self, key: &MemberKey, slot: u32) -> Result<()> {
        Ok(self.members.insert(key, slot, 0)?)
    }
    fn del_member(&mut self, key: &MemberKey) -> Result<()> {
        deleted(self.members.remove(key))
    }
    fn put_service_name(&mut self, id: u32, name: &str) -> Result<()> {
        Ok(self.names.insert(id, encode_name(name), 0)?)
    }
    fn del_service_name(&mut self, id: u32) -> Result<()> {
        deleted(self.names.remove(&id))
    }
    fn put_maglev(&mut self, key: &MaglevKey, value: &MaglevChunk) -> Result<()> {
        Ok(self.maglev.insert(key, value, 0)?)
    }
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<()> {
        deleted(self.maglev.remove(key))
    }
    fn put_source_range(&mut self, (id, net, len): SourceRange) -> Result<()> {
        match net {
            IpAddr::V4(n) => Ok(self
                .source_ranges
                .insert(&source_range_key(id, n, len), 1, 0)?),
            IpAddr::V6(n) => {
                Ok(self
                    .source_ranges6
                    .insert(&source_range_key6(id, n, len), 1, 0)?)
            }
        }
    }
    fn del_source_range(&mut self, (id, net, len): SourceRange) -> Result<()> {
        match net {
            IpAddr::V4(n) => deleted(self.source_ranges.remove(&source_range_key(id, n, len))),
            IpAddr::V6(n) => deleted(self.source_ranges6.remove(&source_range_key6(id, n, len))),
        }
    }
    fn put_addr6_id(&mut self, handle_be: u32, addr: Ipv6Addr) -> Result<()> {
        Ok(self.addr6_ids.insert(handle_be, addr6_words(addr), 0)?)
    }
    fn del_addr6_id(&mut self, handle_be: u32) -> Result<()> {
        deleted(self.addr6_ids.remove(&handle_be))
    }
    fn put_addr6(&mut self, addr: Ipv6Addr, handle_be: u32) -> Result<()> {
        Ok(self.addr6.insert(addr6_words(addr), handle_be, 0)?)
    }
    fn del_addr6(&mut self, addr: Ipv6Addr) -> Result<()> {
        deleted(self.addr6.remove(&addr6_words(addr)))
    }
    fn contents(&self) -> Result<MapContents> {
        let mut s = MapContents {
            config: self.config.get(&0, 0)?,
            config6: self.config6.get(&0, 0)?,
            ..Default::default()
        };
        for kv in self.services.iter() {
            let (k, v) = kv?;
            s.services.insert(k, v);
        }
        for kv in self.backends.iter() {
            let (k, v) = kv?;
            s.backends.insert(k, v);
        }
        for kv in self.rev_nat.iter() {
            let (k, v) = kv?;
            s.rev_nat.insert(k, v);
        }
        for kv in self.members.iter() {
            let (k, v) = kv?;
            s.members.insert(k, v);
        }
        for kv in self.names.iter() {
            let (k, v) = kv?;
            s.service_names.insert(k, decode_name(&v));
        }
        for kv in self.maglev.iter() {
            let (k, v) = kv?;
            s.maglev.insert(k, v);
        }
        for k in self.source_ranges.keys() {
            let k = k?;
            let data = k.data();
            let len = k.prefix_len().saturating_sub(SourceRangeKey::ID_BITS) as u8;
            s.source_ranges.insert((
                data.svc_port_id,
                IpAddr::V4(Ipv4Addr::from(data.addr_be.to_ne_bytes())),
                len,
            ));
        }
        for k in self.source_ranges6.keys() {
            let k = k?;
            let data = k.data();
            let len = k.prefix_len().saturating_sub(SourceRangeKey::ID_BITS) as u8;
            s.source_ranges.insert((
                data.svc_port_id,
                IpAddr::V6(addr6_from_words(&data.addr)),
                len,
            ));
        }
        for kv in self.addr6_ids.iter() {
            let (k, v) = kv?;
            s.addr6_ids.insert(k, addr6_from_words(&v));
        }
        for kv in self.addr6.iter() {
            let (k, v) = kv?;
            s.addr6.insert(addr6_from_words(&k), v);
        }
        Ok(s)
    }
    /// Both families' tiers: `gone` names backends by id only, and an id's flows are in its
    /// family's tiers alone, so looking in both removes exactly its flows.
    fn flush_udp_flows(&mut self, gone: &std::collections::BTreeSet<(u32, u32)>) -> Result<u64> {
        Ok(super::ct_gc::flush_udp(&self.conntrack, gone)?
            + super::ct_gc::flush_udp(&self.conntrack6, gone)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_maps_at_other_versions_only() {
        let dir = std::env::temp_dir().join(format!("lbmig{}", std::process::id()));
        fs::create_dir_all(dir.join("links")).unwrap();
        for f in [
            "lb_ct_v1",
            "lb_ct_v2",
            "lb_svc_v2",
            "lb_svc_v3",
            "lb_backend_v1",
            "other_v1",
            "lb_stats_v1",
            "lb_unknown_v9",
        ] {
            fs::write(dir.join(f), b"").unwrap();
        }
        let found: Vec<(String, &str)> = other_versions(&dir)
            .into_iter()
            .map(|o| (o.name, o.current))
            .collect();
        assert_eq!(
            found,
            vec![
                ("lb_ct_v1".into(), "lb_ct_v4"),
                ("lb_ct_v2".into(), "lb_ct_v4"),
                ("lb_stats_v1".into(), "lb_stats_v6"),
                ("lb_svc_v2".into(), "lb_svc_v3")
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
