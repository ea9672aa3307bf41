//! An in-memory [`Dataplane`] for tests: the same operations on B-trees, with an operation log.
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use lb_common::{
    Backend, Config, FrontendSlot, FrontendSlotKey, MaglevChunk, MaglevKey, MemberKey, RevNat,
};

use super::{capacity::MapSizes, Dataplane, MapContents, SourceRange};

/// In-memory dataplane: the same operations on B-trees, with an operation log for tests.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub state: MapContents,
    /// Every operation in order, e.g. `put_service 10.0.0.1:80/6/0#0`.
    pub log: Vec<String>,
    /// (Service-port id, backend id) pairs whose UDP flows were flushed, in order.
    pub flushed: Vec<(u32, u32)>,
    /// Map sizes to enforce as the kernel does (a new key in a full map fails); None: unbounded.
    pub sizes: Option<MapSizes>,
    /// Called with the contents after every write (a check of every intermediate state).
    pub after_write: Option<fn(&MapContents)>,
}

impl FakeDataplane {
    fn written(&self) {
        if let Some(check) = self.after_write {
            check(&self.state);
        }
    }
}

/// Fails like the kernel's hash map update (E2BIG) when `key` is new and `map` holds `cap`.
fn room<K: Ord, V>(map: &BTreeMap<K, V>, key: &K, cap: Option<u32>, name: &str) -> Result<()> {
    match cap {
        Some(cap) if !map.contains_key(key) && map.len() >= cap as usize => {
            bail!("{name}: map full ({cap} entries)")
        }
        _ => Ok(()),
    }
}

/// How the fake dataplane's log names a service entry.
pub(crate) fn svc_key_str(k: &FrontendSlotKey) -> String {
    let ip = std::net::Ipv4Addr::from(k.addr_be.to_ne_bytes());
    format!(
        "{ip}:{}/{}/{}#{}",
        u16::from_be(k.port_be),
        k.proto,
        k.scope,
        k.slot
    )
}

impl Dataplane for FakeDataplane {
    fn put_service(&mut self, key: &FrontendSlotKey, value: &FrontendSlot) -> Result<()> {
        self.log.push(format!("put_service {}", svc_key_str(key)));
        room(
            &self.state.services,
            key,
            self.sizes.map(|s| s.frontend_slots),
            "services",
        )?;
        self.state.services.insert(*key, *value);
        self.written();
        Ok(())
    }
    fn del_service(&mut self, key: &FrontendSlotKey) -> Result<()> {
        self.log.push(format!("del_service {}", svc_key_str(key)));
        self.state.services.remove(key);
        self.written();
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<()> {
        self.log.push(format!("put_backend {id}"));
        room(
            &self.state.backends,
            &id,
            self.sizes.map(|s| s.backends),
            "backends",
        )?;
        self.state.backends.insert(id, *value);
        self.written();
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<()> {
        self.log.push(format!("del_backend {id}"));
        self.state.backends.remove(&id);
        self.written();
        Ok(())
    }
    fn put_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<()> {
        self.log.push(format!("put_rev_nat {id}"));
        room(
            &self.state.rev_nat,
            &id,
            self.sizes.map(|s| s.rev_nat),
            "rev_nat",
        )?;
        self.state.rev_nat.insert(id, *value);
        self.written();
        Ok(())
    }
    fn del_rev_nat(&mut self, id: u32) -> Result<()> {
        self.log.push(format!("del_rev_nat {id}"));
        self.state.rev_nat.remove(&id);
        self.written();
        Ok(())
    }
    fn put_member(&mut self, key: &MemberKey, slot: u32) -> Result<()> {
        self.log.push(format!(
            "put_member {} {}",
            svc_key_str(&key.frontend),
            key.backend_id
        ));
        room(
            &self.state.members,
            key,
            self.sizes.map(|s| s.frontend_slots),
            "members",
        )?;
        self.state.members.insert(*key, slot);
        self.written();
        Ok(())
    }
    fn del_member(&mut self, key: &MemberKey) -> Result<()> {
        self.log.push(format!(
            "del_member {} {}",
            svc_key_str(&key.frontend),
            key.backend_id
        ));
        self.state.members.remove(key);
        self.written();
        Ok(())
    }
    fn put_service_name(&mut self, id: u32, name: &str) -> Result<()> {
        self.log.push(format!("put_service_name {id}"));
        room(
            &self.state.service_names,
            &id,
            self.sizes.map(|s| s.service_ports),
            "names",
        )?;
        self.state.service_names.insert(id, name.to_string());
        self.written();
        Ok(())
    }
    fn del_service_name(&mut self, id: u32) -> Result<()> {
        self.log.push(format!("del_service_name {id}"));
        self.state.service_names.remove(&id);
        self.written();
        Ok(())
    }
    fn put_maglev(&mut self, key: &MaglevKey, value: &MaglevChunk) -> Result<()> {
        self.log
            .push(format!("put_maglev {} {}", key.table_id, key.chunk));
        room(
            &self.state.maglev,
            key,
            self.sizes.map(|s| s.maglev_chunks),
            "maglev",
        )?;
        self.state.maglev.insert(*key, *value);
        self.written();
        Ok(())
    }
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<()> {
        self.log
            .push(format!("del_maglev {} {}", key.table_id, key.chunk));
        self.state.maglev.remove(key);
        self.written();
        Ok(())
    }
    fn put_source_range(&mut self, r: SourceRange) -> Result<()> {
        self.log
            .push(format!("put_source_range {} {}/{}", r.0, r.1, r.2));
        if let Some(cap) = self.sizes.map(|s| s.source_ranges) {
            if !self.state.source_ranges.contains(&r)
                && self.state.source_ranges.len() >= cap as usize
            {
                bail!("source ranges: map full ({cap} entries)");
            }
        }
        self.state.source_ranges.insert(r);
        self.written();
        Ok(())
    }
    fn del_source_range(&mut self, r: SourceRange) -> Result<()> {
        self.log
            .push(format!("del_source_range {} {}/{}", r.0, r.1, r.2));
        self.state.source_ranges.remove(&r);
        self.written();
        Ok(())
    }
    fn put_addr6_id(&mut self, handle_be: u32, addr: std::net::Ipv6Addr) -> Result<()> {
        self.log.push(format!(
            "put_addr6_id {} {addr}",
            std::net::Ipv4Addr::from(handle_be.to_ne_bytes())
        ));
        self.state.addr6_ids.insert(handle_be, addr);
        self.written();
        Ok(())
    }
    fn del_addr6_id(&mut self, handle_be: u32) -> Result<()> {
        self.log.push(format!(
            "del_addr6_id {}",
            std::net::Ipv4Addr::from(handle_be.to_ne_bytes())
        ));
        self.state.addr6_ids.remove(&handle_be);
        self.written();
        Ok(())
    }
    fn put_addr6(&mut self, addr: std::net::Ipv6Addr, handle_be: u32) -> Result<()> {
        self.log.push(format!("put_addr6 {addr}"));
        self.state.addr6.insert(addr, handle_be);
        self.written();
        Ok(())
    }
    fn del_addr6(&mut self, addr: std::net::Ipv6Addr) -> Result<()> {
        self.log.push(format!("del_addr6 {addr}"));
        self.state.addr6.remove(&addr);
        self.written();
        Ok(())
    }
    fn put_config(&mut self, value: &Config) -> Result<()> {
        self.log.push("put_config".into());
        self.state.config = *value;
        Ok(())
    }
    fn put_config6(&mut self, value: &lb_common::Config6) -> Result<()> {
        self.log.push("put_config6".into());
        self.state.config6 = *value;
        Ok(())
    }
    fn contents(&self) -> Result<MapContents> {
        Ok(self.state.clone())
    }
    fn flush_udp_flows(&mut self, gone: &std::collections::BTreeSet<(u32, u32)>) -> Result<u64> {
        self.flushed.extend(gone.iter().copied());
        Ok(0)
    }
}
