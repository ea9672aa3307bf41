//! The only code that touches the service maps: a trait with the aya implementation (pinned maps)
//! and an in-memory fake for tests. Every write goes through here and is counted.
use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    map_name, Backend, Config, MaglevChunk, MaglevKey, MemberKey, RevNat, ServiceKey, ServiceName,
    ServiceValue,
};

/// Everything the sync reads back to adopt what is already programmed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u32, RevNat>,
    pub members: BTreeMap<MemberKey, u32>,
    /// Service-port id -> `namespace/name:port/PROTO`.
    pub service_names: BTreeMap<u32, String>,
    /// Maglev table chunks.
    pub maglev: BTreeMap<MaglevKey, MaglevChunk>,
    pub config: Config,
}

/// Encodes a Service-port name for the names map (truncated to its 256 bytes).
pub fn encode_name(name: &str) -> ServiceName {
    let mut bytes = [0u8; 256];
    let n = name.len().min(bytes.len());
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    ServiceName { bytes }
}

pub fn decode_name(v: &ServiceName) -> String {
    let end = v.bytes.iter().position(|b| *b == 0).unwrap_or(v.bytes.len());
    String::from_utf8_lossy(&v.bytes[..end]).into_owned()
}

pub trait Dataplane {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()>;
    fn del_service(&mut self, key: &ServiceKey) -> Result<()>;
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<()>;
    fn del_backend(&mut self, id: u32) -> Result<()>;
    fn put_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<()>;
    fn del_rev_nat(&mut self, id: u32) -> Result<()>;
    fn put_config(&mut self, value: &Config) -> Result<()>;
    fn put_member(&mut self, key: &MemberKey, slot: u32) -> Result<()>;
    fn del_member(&mut self, key: &MemberKey) -> Result<()>;
    fn put_service_name(&mut self, id: u32, name: &str) -> Result<()>;
    fn del_service_name(&mut self, id: u32) -> Result<()>;
    fn put_maglev(&mut self, key: &MaglevKey, value: &MaglevChunk) -> Result<()>;
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<()>;
    /// Reads back every entry (used once, at start, to adopt pinned state).
    fn snapshot(&self) -> Result<Snapshot>;
}

/// In-memory dataplane: the same operations on B-trees, with an operation log for tests.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub state: Snapshot,
    /// Every operation in order, e.g. `put_service 10.0.0.1:80/6/0#0`.
    pub log: Vec<String>,
}

/// How the fake dataplane's log names a service entry.
pub(crate) fn svc_key_str(k: &ServiceKey) -> String {
    let ip = std::net::Ipv4Addr::from(k.addr_be.to_ne_bytes());
    format!("{ip}:{}/{}/{}#{}", u16::from_be(k.port_be), k.proto, k.scope, k.slot)
}

impl Dataplane for FakeDataplane {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        self.log.push(format!("put_service {}", svc_key_str(key)));
        self.state.services.insert(*key, *value);
        Ok(())
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.log.push(format!("del_service {}", svc_key_str(key)));
        self.state.services.remove(key);
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<()> {
        self.log.push(format!("put_backend {id}"));
        self.state.backends.insert(id, *value);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<()> {
        self.log.push(format!("del_backend {id}"));
        self.state.backends.remove(&id);
        Ok(())
    }
    fn put_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<()> {
        self.log.push(format!("put_rev_nat {id}"));
        self.state.rev_nat.insert(id, *value);
        Ok(())
    }
    fn del_rev_nat(&mut self, id: u32) -> Result<()> {
        self.log.push(format!("del_rev_nat {id}"));
        self.state.rev_nat.remove(&id);
        Ok(())
    }
    fn put_member(&mut self, key: &MemberKey, slot: u32) -> Result<()> {
        self.log.push(format!("put_member {} {}", svc_key_str(&key.frontend), key.backend_id));
        self.state.members.insert(*key, slot);
        Ok(())
    }
    fn del_member(&mut self, key: &MemberKey) -> Result<()> {
        self.log.push(format!("del_member {} {}", svc_key_str(&key.frontend), key.backend_id));
        self.state.members.remove(key);
        Ok(())
    }
    fn put_service_name(&mut self, id: u32, name: &str) -> Result<()> {
        self.log.push(format!("put_service_name {id}"));
        self.state.service_names.insert(id, name.to_string());
        Ok(())
    }
    fn del_service_name(&mut self, id: u32) -> Result<()> {
        self.log.push(format!("del_service_name {id}"));
        self.state.service_names.remove(&id);
        Ok(())
    }
    fn put_maglev(&mut self, key: &MaglevKey, value: &MaglevChunk) -> Result<()> {
        self.log.push(format!("put_maglev {} {}", key.table_id, key.chunk));
        self.state.maglev.insert(*key, *value);
        Ok(())
    }
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<()> {
        self.log.push(format!("del_maglev {} {}", key.table_id, key.chunk));
        self.state.maglev.remove(key);
        Ok(())
    }
    fn put_config(&mut self, value: &Config) -> Result<()> {
        self.log.push("put_config".into());
        self.state.config = *value;
        Ok(())
    }
    fn snapshot(&self) -> Result<Snapshot> {
        Ok(self.state.clone())
    }
}

/// The pinned service maps, through aya.
pub struct AyaDataplane {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nat: HashMap<MapData, u32, RevNat>,
    members: HashMap<MapData, MemberKey, u32>,
    names: HashMap<MapData, u32, ServiceName>,
    maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    config: Array<MapData, Config>,
}

impl AyaDataplane {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self> {
        let mut take = |name: &str| {
            ebpf.take_map(name).with_context(|| format!("map {name} missing from the object"))
        };
        Ok(Self {
            services: HashMap::try_from(take(map_name::SERVICES)?)?,
            backends: HashMap::try_from(take(map_name::BACKENDS)?)?,
            rev_nat: HashMap::try_from(take(map_name::REV_NAT)?)?,
            members: HashMap::try_from(take(map_name::MEMBERS)?)?,
            names: HashMap::try_from(take(map_name::SERVICE_NAMES)?)?,
            maglev: HashMap::try_from(take(map_name::MAGLEV)?)?,
            config: Array::try_from(take(map_name::CONFIG)?)?,
        })
    }

    /// Opens the maps pinned under `dir` (as `lbctl` does).
    pub fn from_pins(dir: &Path) -> Result<Self> {
        let open_data = |name: &str| crate::inspect::open_pinned(dir, name);
        let open = |name: &str| -> Result<Map> { Ok(Map::HashMap(open_data(name)?)) };
        Ok(Self {
            services: HashMap::try_from(open(map_name::SERVICES)?)?,
            backends: HashMap::try_from(open(map_name::BACKENDS)?)?,
            rev_nat: HashMap::try_from(open(map_name::REV_NAT)?)?,
            members: HashMap::try_from(open(map_name::MEMBERS)?)?,
            names: HashMap::try_from(open(map_name::SERVICE_NAMES)?)?,
            maglev: HashMap::try_from(open(map_name::MAGLEV)?)?,
            config: Array::try_from(Map::Array(open_data(map_name::CONFIG)?))?,
        })
    }
}

impl Dataplane for AyaDataplane {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<()> {
        Ok(self.services.insert(key, value, 0)?)
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<()> {
        Ok(self.services.remove(key)?)
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<()> {
        Ok(self.backends.insert(id, value, 0)?)
    }
    fn del_backend(&mut self, id: u32) -> Result<()> {
        Ok(self.backends.remove(&id)?)
    }
    fn put_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<()> {
        Ok(self.rev_nat.insert(id, value, 0)?)
    }
    fn del_rev_nat(&mut self, id: u32) -> Result<()> {
        Ok(self.rev_nat.remove(&id)?)
    }
    fn put_config(&mut self, value: &Config) -> Result<()> {
        Ok(self.config.set(0, value, 0)?)
    }
    fn put_member(&mut self, key: &MemberKey, slot: u32) -> Result<()> {
        Ok(self.members.insert(key, slot, 0)?)
    }
    fn del_member(&mut self, key: &MemberKey) -> Result<()> {
        Ok(self.members.remove(key)?)
    }
    fn put_service_name(&mut self, id: u32, name: &str) -> Result<()> {
        Ok(self.names.insert(id, encode_name(name), 0)?)
    }
    fn del_service_name(&mut self, id: u32) -> Result<()> {
        Ok(self.names.remove(&id)?)
    }
    fn put_maglev(&mut self, key: &MaglevKey, value: &MaglevChunk) -> Result<()> {
        Ok(self.maglev.insert(key, value, 0)?)
    }
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<()> {
        Ok(self.maglev.remove(key)?)
    }
    fn snapshot(&self) -> Result<Snapshot> {
        let mut s = Snapshot { config: self.config.get(&0, 0)?, ..Default::default() };
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
        Ok(s)
    }
}
