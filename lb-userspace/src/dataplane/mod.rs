//! The dataplane: the only code that touches the BPF maps. [`Dataplane`] is what the sync writes
//! through, with the aya implementation on the pinned maps ([`pinned`]) and an in-memory fake for
//! tests ([`fake`]); [`sync`] turns desired map contents into the fewest safe writes; [`read`]
//! holds the read-only views `lbctl` and the agent's metrics share; [`migrate`] carries state
//! across map layout versions; [`ct_gc`] sweeps expired conntrack flows and flushes those of
//! removed UDP backends ([`bpf_sys`]: the batched map reads aya lacks); [`crash`] kills a sync
//! after each of its writes and checks that a restarted agent recovers (for tests).
//!
//! It takes the desired map contents from `control` and never imports `agent`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use lb_common::{
    Backend, Config, FrontendSlot, FrontendSlotKey, MaglevChunk, MaglevKey, MemberKey, RevNat,
};

pub mod addr6;
pub mod bpf_sys;
pub mod capacity;
pub mod crash;
pub mod ct_gc;
pub mod cycle;
pub mod fake;
mod ids;
pub mod links;
pub mod maglev;
mod maglev_tables;
pub mod migrate;
pub mod pinned;
pub mod read;
pub mod sock_term;
pub mod sync;

/// What the service maps hold: what the sync reads back to adopt what is already programmed,
/// what the fake keeps, and what `lbctl` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: BTreeMap<FrontendSlotKey, FrontendSlot>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u32, RevNat>,
    pub members: BTreeMap<MemberKey, u32>,
    /// Service-port id -> `namespace/name:port/PROTO`.
    pub service_names: BTreeMap<u32, String>,
    /// Maglev table chunks.
    pub maglev: BTreeMap<MaglevKey, MaglevChunk>,
    /// loadBalancerSourceRanges entries: (Service-port id, network, prefix length), of both
    /// families (two maps).
    pub source_ranges: BTreeSet<SourceRange>,
    /// The IPv6 addresses the maps mention, by handle (as the maps hold it, network order: the
    /// handle's address in 0.0.0.0/8): `map_name::ADDR6_IDS`.
    pub addr6_ids: BTreeMap<u32, Ipv6Addr>,
    /// The other direction, `map_name::ADDR6`.
    pub addr6: BTreeMap<Ipv6Addr, u32>,
    pub config: Config,
    pub config6: lb_common::Config6,
}

/// An entry of the source-ranges maps: a prefix a Service port's LoadBalancer frontends admit.
pub type SourceRange = (u32, IpAddr, u8);

/// The IPv4 source-ranges map's key of an entry (LPM: the id's 32 bits, then the prefix's).
pub fn source_range_key(
    id: u32,
    net: Ipv4Addr,
    len: u8,
) -> aya::maps::lpm_trie::Key<lb_common::SourceRangeKey> {
    aya::maps::lpm_trie::Key::new(
        lb_common::SourceRangeKey::ID_BITS + u32::from(len),
        lb_common::SourceRangeKey {
            svc_port_id: id,
            addr_be: u32::from_ne_bytes(net.octets()),
        },
    )
}

/// The IPv6 source-ranges map's key of an entry.
pub fn source_range_key6(
    id: u32,
    net: Ipv6Addr,
    len: u8,
) -> aya::maps::lpm_trie::Key<lb_common::SourceRangeKey6> {
    aya::maps::lpm_trie::Key::new(
        lb_common::SourceRangeKey::ID_BITS + u32::from(len),
        lb_common::SourceRangeKey6 {
            svc_port_id: id,
            addr: addr6_words(net),
        },
    )
}

/// An IPv6 address as the maps hold it (defined beside the datapath config, which needs it too).
pub use crate::control::desired::addr6_words;

/// The IPv6 address of an [`lb_common::Addr6`].
pub fn addr6_from_words(w: &lb_common::Addr6) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, v) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// The writes the sync makes, one map entry each, and the read-back that adoption starts from.
pub trait Dataplane {
    fn put_service(&mut self, key: &FrontendSlotKey, value: &FrontendSlot) -> Result<()>;
    fn del_service(&mut self, key: &FrontendSlotKey) -> Result<()>;
    fn put_backend(&mut self, id: u32, value: &Backend) -> Result<()>;
    fn del_backend(&mut self, id: u32) -> Result<()>;
    fn put_rev_nat(&mut self, id: u32, value: &RevNat) -> Result<()>;
    fn del_rev_nat(&mut self, id: u32) -> Result<()>;
    fn put_config(&mut self, value: &Config) -> Result<()>;
    /// Writes the IPv6 half of the config (`map_name::CONFIG6`).
    fn put_config6(&mut self, value: &lb_common::Config6) -> Result<()>;
    fn put_member(&mut self, key: &MemberKey, slot: u32) -> Result<()>;
    fn del_member(&mut self, key: &MemberKey) -> Result<()>;
    fn put_service_name(&mut self, id: u32, name: &str) -> Result<()>;
    fn del_service_name(&mut self, id: u32) -> Result<()>;
    fn put_maglev(&mut self, key: &MaglevKey, value: &MaglevChunk) -> Result<()>;
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<()>;
    fn put_source_range(&mut self, r: SourceRange) -> Result<()>;
    fn del_source_range(&mut self, r: SourceRange) -> Result<()>;
    /// Handle -> IPv6 address (`map_name::ADDR6_IDS`).
    fn put_addr6_id(&mut self, handle_be: u32, addr: Ipv6Addr) -> Result<()>;
    fn del_addr6_id(&mut self, handle_be: u32) -> Result<()>;
    /// IPv6 address -> handle (`map_name::ADDR6`).
    fn put_addr6(&mut self, addr: Ipv6Addr, handle_be: u32) -> Result<()>;
    fn del_addr6(&mut self, addr: Ipv6Addr) -> Result<()>;
    /// Reads back every entry (used once, at start, to adopt pinned state).
    fn contents(&self) -> Result<MapContents>;
    /// Removes the UDP conntrack flows (both directions, both tiers, both families) of each
    /// (Service-port id, backend id) in `gone`: backends that left the Service port. Returns the
    /// entries removed. Not a service-map write (it does not count in the sync's writes).
    fn flush_udp_flows(&mut self, gone: &BTreeSet<(u32, u32)>) -> Result<u64>;
}
