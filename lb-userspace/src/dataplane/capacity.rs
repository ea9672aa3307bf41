//! What the maps can hold: the entries of every sized map (flags of `lb-agent run` and
//! `render`), and which Service ports fit in the service maps.
//!
//! Service ports are admitted oldest first (the Service's creationTimestamp, then
//! namespace/name, port, protocol), each with everything it needs: frontend slots, backends,
//! rev-NAT entries, its name and stats entry, Maglev chunks. One that would overflow a map is
//! not programmed at all and is reported with the map, its capacity and the numbers; every older
//! one keeps being served and updated, and a newer Service can never push an older one out.
//! When the cluster shrinks, the next sync admits it again: nothing to clear by hand.
//!
//! Pure (no aya): `render` runs it without a kernel, the agent with the sizes of its maps.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    hash::Hash,
    net::SocketAddr,
};

use lb_common::{limits, map_name};

use super::{maglev::table_size, maglev_tables::chunk_count};
use crate::control::{
    desired::{service_port_frontends, BackendKey, Desired, DesiredFrontend, FrontendKey},
    model::Rejected,
    plan::Plan,
};

/// Entries of every map whose size is a setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Frontend slots (`lb_svc_v3`: a master plus one slot per backend, per frontend and
    /// scope) and membership entries (`lb_member_v1`, one per backend slot).
    pub frontend_slots: u32,
    /// Backends (`lb_backend_v1`): one per distinct address, port and protocol.
    pub backends: u32,
    /// Rev-NAT entries (`lb_revnat_v1`): one per frontend address and port.
    pub rev_nat: u32,
    /// Service ports (`lb_svc_stats_v2` per-CPU counters and `lb_svc_names_v1`).
    pub service_ports: u32,
    /// Maglev table chunks (`lb_maglev_v1`).
    pub maglev_chunks: u32,
    /// Confirmed conntrack (`lb_ct_v4`, LRU): two per north-south flow.
    pub conntrack: u32,
    /// Unconfirmed conntrack (`lb_ct_new_v3`, LRU): two per flow before its confirmation.
    pub conntrack_new: u32,
    /// Session affinity records (`lb_affinity_v1`, LRU).
    pub affinity: u32,
    /// Socket rev-NAT (`lb_sk_revnat_v1`, LRU): one per translated socket and backend.
    pub sock_rev_nat: u32,
    /// Per-socket UDP flow choices (`lb_sk_flow_v1`, LRU).
    pub sock_flow: u32,
    /// Fragmented datagrams in transit (`lb_frag_v1`, LRU).
    pub fragments: u32,
    /// loadBalancerSourceRanges prefixes (`lb_srcrange_v1`): one per Service port and prefix.
    pub source_ranges: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            frontend_slots: limits::FRONTEND_SLOTS,
            backends: limits::BACKENDS,
            rev_nat: limits::REV_NAT,
            service_ports: limits::SERVICE_STATS,
            maglev_chunks: limits::MAGLEV_CHUNKS,
            conntrack: limits::CONNTRACK,
            conntrack_new: limits::CONNTRACK_NEW,
            affinity: limits::AFFINITY,
            sock_rev_nat: limits::SOCK_REV_NAT,
            sock_flow: limits::SOCK_FLOW,
            fragments: limits::FRAGMENTS,
            source_ranges: limits::SOURCE_RANGES,
        }
    }
}

/// The smallest and largest size a map may be given (the kernel's own limit is far above).
pub const SIZE_RANGE: (u32, u32) = (16, 1 << 24);

impl MapSizes {
    /// (pinned map name, entries) of every map these sizes set.
    pub fn per_map(&self) -> [(&'static str, u32); 20] {
        [
            (map_name::FRONTENDS, self.frontend_slots),
            (map_name::MEMBERS, self.frontend_slots),
            (map_name::BACKENDS, self.backends),
            (map_name::REV_NAT, self.rev_nat),
            (map_name::SERVICE_STATS, self.service_ports),
            (map_name::SERVICE_NAMES, self.service_ports),
            (map_name::MAGLEV, self.maglev_chunks),
            (map_name::CONNTRACK, self.conntrack),
            (map_name::CONNTRACK_NEW, self.conntrack_new),
            (map_name::AFFINITY, self.affinity),
            (map_name::SOCK_REV_NAT, self.sock_rev_nat),
            (map_name::SOCK_FLOW, self.sock_flow),
            (map_name::FRAGMENTS, self.fragments),
            (map_name::SOURCE_RANGES, self.source_ranges),
            // Sized with others: an interned IPv6 address per backend or frontend address at
            // most, so the address tables never fill before those maps do.
            (map_name::ADDR6, self.addr6()),
            (map_name::ADDR6_IDS, self.addr6()),
            (map_name::SOURCE_RANGES6, self.source_ranges),
            (map_name::SOCK_REV_NAT6, self.sock_rev_nat6()),
            (map_name::CONNTRACK6, Self::quarter(self.conntrack)),
            (map_name::CONNTRACK6_NEW, Self::quarter(self.conntrack_new)),
        ]
    }

    /// Entries of each IPv6 address table (`lb_addr6_v1`, `lb_addr6_id_v1`).
    pub fn addr6(&self) -> u32 {
        self.backends.saturating_add(self.rev_nat)
    }

    /// Entries of the IPv6 socket rev-NAT map (`lb_sk_revnat6_v1`, LRU): a quarter of the IPv4
    /// one's (its entries are twice the size), at least the smallest map size.
    pub fn sock_rev_nat6(&self) -> u32 {
        Self::quarter(self.sock_rev_nat)
    }

    /// An IPv6 twin's entries: a quarter of its IPv4 map's (its entries are about twice the
    /// size), at least the smallest map size. The IPv6 conntrack tiers (`lb_ct6_v1`,
    /// `lb_ct6_new_v1`) follow `--map-conntrack` and `--map-conntrack-new` so.
    pub fn quarter(entries: u32) -> u32 {
        (entries / 4).max(SIZE_RANGE.0)
    }

    /// Sets the size of `map` (a pinned map name), as found on a pinned map.
    pub fn set(&mut self, map: &str, entries: u32) {
        let field = match map {
            map_name::FRONTENDS => &mut self.frontend_slots,
            map_name::BACKENDS => &mut self.backends,
            map_name::REV_NAT => &mut self.rev_nat,
            map_name::SERVICE_STATS => &mut self.service_ports,
            map_name::MAGLEV => &mut self.maglev_chunks,
            map_name::CONNTRACK => &mut self.conntrack,
            map_name::CONNTRACK_NEW => &mut self.conntrack_new,
            map_name::AFFINITY => &mut self.affinity,
            map_name::SOCK_REV_NAT => &mut self.sock_rev_nat,
            map_name::SOCK_FLOW => &mut self.sock_flow,
            map_name::FRAGMENTS => &mut self.fragments,
            map_name::SOURCE_RANGES => &mut self.source_ranges,
            // Sized with another map (members with the slots, names with the stats).
            _ => return,
        };
        *field = entries;
    }
}

/// The flag, map, key bytes, value bytes (per CPU for the stats) and default entries of every
/// sized map, as the README's table of map sizes shows them.
pub fn size_flags() -> [(&'static str, &'static str, usize, usize, u32); 14] {
    use std::mem::size_of as sz;

    use lb_common::*;
    let d = MapSizes::default();
    [
        (
            "--map-frontend-slots",
            map_name::FRONTENDS,
            sz::<FrontendSlotKey>(),
            sz::<FrontendSlot>(),
            d.frontend_slots,
        ),
        (
            "--map-frontend-slots",
            map_name::MEMBERS,
            sz::<MemberKey>(),
            sz::<u32>(),
            d.frontend_slots,
        ),
        (
            "--map-backends",
            map_name::BACKENDS,
            sz::<u32>(),
            sz::<Backend>(),
            d.backends,
        ),
        (
            "--map-rev-nat",
            map_name::REV_NAT,
            sz::<u32>(),
            sz::<RevNat>(),
            d.rev_nat,
        ),
        (
            "--map-service-ports",
            map_name::SERVICE_STATS,
            sz::<u32>(),
            sz::<ServiceCounters>(),
            d.service_ports,
        ),
        (
            "--map-service-ports",
            map_name::SERVICE_NAMES,
            sz::<u32>(),
            sz::<ServiceName>(),
            d.service_ports,
        ),
        (
            "--map-maglev-chunks",
            map_name::MAGLEV,
            sz::<MaglevKey>(),
            sz::<MaglevChunk>(),
            d.maglev_chunks,
        ),
        (
            "--map-conntrack",
            map_name::CONNTRACK,
            sz::<CtKey>(),
            sz::<CtValue>(),
            d.conntrack,
        ),
        (
            "--map-conntrack-new",
            map_name::CONNTRACK_NEW,
            sz::<CtKey>(),
            sz::<CtValue>(),
            d.conntrack_new,
        ),
        (
            "--map-affinity",
            map_name::AFFINITY,
            sz::<AffinityKey>(),
            sz::<AffinityValue>(),
            d.affinity,
        ),
        (
            "--map-sock-rev-nat",
            map_name::SOCK_REV_NAT,
            sz::<SockKey>(),
            sz::<SockRevNat>(),
            d.sock_rev_nat,
        ),
        (
            "--map-sock-flow",
            map_name::SOCK_FLOW,
            sz::<SockKey>(),
            sz::<SockFlow>(),
            d.sock_flow,
        ),
        (
            "--map-fragments",
            map_name::FRAGMENTS,
            sz::<FragKey>(),
            sz::<FragPorts>(),
            d.fragments,
        ),
        (
            "--map-source-ranges",
            map_name::SOURCE_RANGES,
            // The LPM trie's key: a prefix length, then the data.
            sz::<u32>() + sz::<SourceRangeKey>(),
            sz::<u32>(),
            d.source_ranges,
        ),
    ]
}

/// The README's table of map sizes (checked by a test against the types).
pub fn size_table() -> String {
    let mut out = String::from(
        "| flag (env `LB_AGENT_MAP_…`) | map | key + value bytes | default entries |\n|---|---|---|---|\n",
    );
    for (flag, map, k, v, n) in size_flags() {
        let per_cpu = if map == map_name::SERVICE_STATS {
            " per CPU"
        } else {
            ""
        };
        out.push_str(&format!(
            "| `{flag}` | `{map}` | {k} + {v}{per_cpu} | {n} |\n"
        ));
    }
    out
}

/// Entries one frontend or Service port adds to the service maps, or what they hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub slots: u64,
    pub members: u64,
    pub backends: u64,
    pub rev_nat: u64,
    pub service_ports: u64,
    pub maglev_chunks: u64,
    pub source_ranges: u64,
}

impl Entries {
    pub fn add(&mut self, o: &Entries) {
        self.slots += o.slots;
        self.members += o.members;
        self.backends += o.backends;
        self.rev_nat += o.rev_nat;
        self.service_ports += o.service_ports;
        self.maglev_chunks += o.maglev_chunks;
        self.source_ranges += o.source_ranges;
    }

    /// The first map `needs` more entries would overflow, with (map, capacity, used, needs).
    pub fn overflow(&self, needs: &Entries, sizes: &MapSizes) -> Option<Shortfall> {
        [
            (
                map_name::FRONTENDS,
                sizes.frontend_slots,
                self.slots,
                needs.slots,
            ),
            (
                map_name::MEMBERS,
                sizes.frontend_slots,
                self.members,
                needs.members,
            ),
            (
                map_name::BACKENDS,
                sizes.backends,
                self.backends,
                needs.backends,
            ),
            (
                map_name::REV_NAT,
                sizes.rev_nat,
                self.rev_nat,
                needs.rev_nat,
            ),
            (
                map_name::SERVICE_STATS,
                sizes.service_ports,
                self.service_ports,
                needs.service_ports,
            ),
            (
                map_name::MAGLEV,
                sizes.maglev_chunks,
                self.maglev_chunks,
                needs.maglev_chunks,
            ),
            (
                map_name::SOURCE_RANGES,
                sizes.source_ranges,
                self.source_ranges,
                needs.source_ranges,
            ),
        ]
        .into_iter()
        .find(|(_, cap, used, need)| *need > 0 && used + need > *cap as u64)
        .map(|(map, capacity, used, needs)| Shortfall {
            map,
            capacity,
            used,
            needs,
        })
    }
}

/// A map that has no room for what a Service port or frontend needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub map: &'static str,
    pub capacity: u32,
    pub used: u64,
    pub needs: u64,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "map {} is full (capacity {} entries, {} in use, {} more needed)",
            self.map, self.capacity, self.used, self.needs
        )
    }
}

/// Entries of a Maglev table for `backends` distinct backends.
pub fn table_chunks(backends: usize) -> u64 {
    chunk_count(table_size(backends)) as u64
}

/// What the maps hold so far, by identity, while Service ports are admitted.
#[derive(Default)]
struct Held {
    entries: Entries,
    backends: HashSet<BackendKey>,
    rev_nat: HashSet<SocketAddr>,
    names: HashSet<String>,
    tables: HashSet<Vec<BackendKey>>,
    /// Service ports whose source ranges are counted.
    ranges: HashSet<String>,
}

impl Held {
    /// What the frontends of one Service port add, and the identities they bring.
    fn needs(&self, fes: &[(FrontendKey, DesiredFrontend)]) -> (Entries, Held) {
        let mut n = Held::default();
        for (fe, d) in fes {
            let set: BTreeSet<BackendKey> = d.backends.iter().map(|(k, _)| *k).collect();
            n.entries.slots += 1 + set.len() as u64;
            n.entries.members += set.len() as u64;
            for k in &set {
                if !self.backends.contains(k) && n.backends.insert(*k) {
                    n.entries.backends += 1;
                }
            }
            if !self.rev_nat.contains(&fe.addr) && n.rev_nat.insert(fe.addr) {
                n.entries.rev_nat += 1;
            }
            if !self.names.contains(&d.service_port) && n.names.insert(d.service_port.clone()) {
                n.entries.service_ports += 1;
            }
            if let Some(r) = &d.source_ranges {
                // Once per Service port (its frontends share the set).
                if n.ranges.insert(d.service_port.clone()) {
                    n.entries.source_ranges += r.len() as u64;
                }
            }
            if super::maglev_tables::wants_table(fe, d, set.len()) {
                let set: Vec<BackendKey> = set.into_iter().collect();
                if !self.tables.contains(&set) && !n.tables.contains(&set) {
                    n.entries.maglev_chunks += table_chunks(set.len());
                    n.tables.insert(set);
                }
            }
        }
        (n.entries, n)
    }

    fn take(&mut self, n: Held) {
        self.entries.add(&n.entries);
        self.backends.extend(n.backends);
        self.rev_nat.extend(n.rev_nat);
        self.names.extend(n.names);
        self.tables.extend(n.tables);
    }
}

/// What every Service port together needs of the maps, kept up to date one Service port at a
/// time: shared entries (a backend, a rev-NAT address, a Service-port name, a Maglev table) are
/// counted by how many Service ports use them. When the total fits, [`fit`] keeps every Service
/// port (each one's admission only adds to a total that stays below it), so a cycle need not
/// run it.
#[derive(Default)]
pub struct Tally {
    slots: u64,
    members: u64,
    source_ranges: u64,
    maglev_chunks: u64,
    backends: HashMap<BackendKey, u32>,
    rev_nat: HashMap<SocketAddr, u32>,
    names: HashMap<String, u32>,
    tables: HashMap<Vec<BackendKey>, u32>,
}

fn refer<K: Hash + Eq>(m: &mut HashMap<K, u32>, k: K) -> bool {
    let n = m.entry(k).or_default();
    *n += 1;
    *n == 1
}

fn unrefer<K: Hash + Eq>(m: &mut HashMap<K, u32>, k: &K) -> bool {
    match m.get_mut(k) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            m.remove(k);
            true
        }
        None => false,
    }
}

impl Tally {
    /// Counts the frontends of one Service port (`desired::service_port_frontends`).
    pub fn add(&mut self, fes: &[(FrontendKey, DesiredFrontend)]) {
        let (e, n) = Held::default().needs(fes);
        self.slots += e.slots;
        self.members += e.members;
        self.source_ranges += e.source_ranges;
        for b in n.backends {
            refer(&mut self.backends, b);
        }
        for a in n.rev_nat {
            refer(&mut self.rev_nat, a);
        }
        for name in n.names {
            refer(&mut self.names, name);
        }
        for t in n.tables {
            let chunks = table_chunks(t.len());
            if refer(&mut self.tables, t) {
                self.maglev_chunks += chunks;
            }
        }
    }

    /// Forgets the frontends of one Service port counted by [`Tally::add`].
    pub fn remove(&mut self, fes: &[(FrontendKey, DesiredFrontend)]) {
        let (e, n) = Held::default().needs(fes);
        self.slots -= e.slots;
        self.members -= e.members;
        self.source_ranges -= e.source_ranges;
        for b in &n.backends {
            unrefer(&mut self.backends, b);
        }
        for a in &n.rev_nat {
            unrefer(&mut self.rev_nat, a);
        }
        for name in &n.names {
            unrefer(&mut self.names, name);
        }
        for t in &n.tables {
            if unrefer(&mut self.tables, t) {
                self.maglev_chunks -= table_chunks(t.len());
            }
        }
    }

    /// What every Service port counted needs.
    pub fn entries(&self) -> Entries {
        Entries {
            slots: self.slots,
            members: self.members,
            backends: self.backends.len() as u64,
            rev_nat: self.rev_nat.len() as u64,
            service_ports: self.names.len() as u64,
            maglev_chunks: self.maglev_chunks,
            source_ranges: self.source_ranges,
        }
    }

    /// Whether maps of `sizes` hold every Service port counted.
    pub fn fits(&self, sizes: &MapSizes) -> bool {
        Entries::default()
            .overflow(&self.entries(), sizes)
            .is_none()
    }
}

/// Keeps in `plan` the Service ports that fit in maps of `sizes` (oldest first) and moves the
/// others to its rejected list, returning those rejections.
pub fn fit(plan: &mut Plan, sizes: &MapSizes) -> Vec<Rejected> {
    fit_desired(plan, sizes).1
}

/// [`fit`], also returning the map contents of what it kept: `desired::desired` of the fitted
/// plan, from the frontends `fit` builds anyway (the agent would build them twice otherwise).
pub fn fit_desired(plan: &mut Plan, sizes: &MapSizes) -> (Desired, Vec<Rejected>) {
    // Both families' Service ports, oldest Service first (a Service's IPv4 ports before its
    // IPv6 ones), each with its frontends.
    let mut ports: Vec<FitPort> = plan
        .services
        .iter()
        .enumerate()
        .map(|(i, sp)| FitPort::of(sp, 0, i))
        .chain(
            plan.services_ipv6
                .iter()
                .enumerate()
                .map(|(i, sp)| FitPort::of(sp, 1, i)),
        )
        .collect();
    let mut order: Vec<usize> = (0..ports.len()).collect();
    order.sort_by(|a, b| ports[*a].order.cmp(&ports[*b].order));
    let mut held = Held::default();
    let mut keep = [
        vec![true; plan.services.len()],
        vec![true; plan.services_ipv6.len()],
    ];
    let mut rejected = Vec::new();
    for i in order {
        let p = &mut ports[i];
        let (needs, identities) = held.needs(&p.fes);
        match held.entries.overflow(&needs, sizes) {
            None => held.take(identities),
            Some(short) => {
                keep[p.family][p.index] = false;
                p.fes.clear();
                rejected.push(Rejected {
                    kind: "Service".into(),
                    namespace: p.order.2.clone(),
                    name: p.order.3.clone(),
                    reason: format!(
                        "port {}/{:?}{} is not served: {short}; older Service ports keep \
                         theirs (raise the map's size flag of lb-agent run, see the README)",
                        p.port,
                        p.protocol,
                        if p.family == 1 { " (IPv6)" } else { "" }
                    ),
                });
            }
        }
    }
    let [mut k4, mut k6] = keep.map(|k| k.into_iter());
    plan.services
        .retain(|_| k4.next().expect("one flag per port"));
    plan.services_ipv6
        .retain(|_| k6.next().expect("one flag per port"));
    plan.rejected.extend(rejected.iter().cloned());
    plan.rejected.sort();
    // In plan order, as `desired::desired` builds it.
    let desired = ports.into_iter().flat_map(|p| p.fes).collect();
    (desired, rejected)
}

/// A Service port of either family, as [`fit_desired`] weighs it.
struct FitPort {
    /// Age (no creation time last), namespace, name, port name, protocol, family.
    order: (bool, i64, String, String, String, u8, usize),
    family: usize,
    index: usize,
    /// Its name, else its first frontend's port.
    port: String,
    protocol: crate::control::model::Protocol,
    fes: Vec<(FrontendKey, DesiredFrontend)>,
}

impl FitPort {
    fn of<A: crate::control::model::FamilyAddr>(
        sp: &crate::control::plan::ServicePortPlan<A>,
        family: usize,
        index: usize,
    ) -> Self {
        let port = if sp.port_name.is_empty() {
            sp.frontends.first().map_or_else(String::new, |f| {
                Into::<std::net::SocketAddr>::into(f.address)
                    .port()
                    .to_string()
            })
        } else {
            sp.port_name.clone()
        };
        FitPort {
            order: (
                sp.created.is_none(),
                sp.created.unwrap_or(0),
                sp.namespace.clone(),
                sp.name.clone(),
                sp.port_name.clone(),
                sp.protocol.number(),
                family,
            ),
            family,
            index,
            port,
            protocol: sp.protocol,
            fes: service_port_frontends(sp),
        }
    }
}

/// The map a [`fit`] rejection names (for the metric), when it is one.
pub fn rejected_map(r: &Rejected) -> Option<&'static str> {
    map_name::ALL
        .into_iter()
        .find(|m| r.reason.contains(&format!("map {m} is full")))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        net::SocketAddrV4,
    };

    use super::*;
    use crate::{
        control::{desired::desired, model, plan, source},
        dataplane::{fake::FakeDataplane, sync::Syncer, Dataplane, MapContents},
    };

    /// Service `s{i}` (created on day i + 1 of 2024, ClusterIP 10.96.0.{i+1}, port 80) with the
    /// endpoints 10.1.i.j for j in `eps`.
    fn service(i: u32, eps: impl IntoIterator<Item = u32>) -> String {
        let addrs: Vec<String> = eps.into_iter().map(|j| format!("10.1.{i}.{j}")).collect();
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns, creationTimestamp: \"2024-01-{:02}T00:00:00Z\"}}\nspec: {{clusterIP: 10.96.0.{}, ports: [{{name: web, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: web, port: 8080}}]\nendpoints: [{}]\n",
            i + 1,
            i + 1,
            addrs
                .iter()
                .map(|a| format!("{{addresses: [{a}]}}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn plan_of(yaml: &str) -> Plan {
        let mut o = source::Objects::default();
        source::parse_into(std::path::Path::new("t.yaml"), yaml, &mut o).unwrap();
        plan::plan(&model::build(&o, "n1"), "n1")
    }

    fn served(p: &Plan) -> Vec<String> {
        p.services.iter().map(|s| s.name.clone()).collect()
    }

    fn small(backends: u32) -> MapSizes {
        MapSizes {
            backends,
            ..MapSizes::default()
        }
    }

    /// Frontend -> the backend addresses its counted slots resolve to.
    fn resolved(s: &MapContents) -> BTreeMap<(SocketAddrV4, u8), BTreeSet<SocketAddrV4>> {
        let mut out = BTreeMap::new();
        for (k, v) in s.services.iter().filter(|(k, _)| k.slot == 0) {
            let fe = crate::control::desired::sock_addr(k.addr_be, k.port_be);
            let mut set = BTreeSet::new();
            for slot in 1..=v.count {
                let key = FrontendSlotKey { slot, ..*k };
                let b = s.services.get(&key).expect("every counted slot exists");
                let be = s
                    .backends
                    .get(&b.backend_id)
                    .expect("every slot's backend exists");
                set.insert(crate::control::desired::sock_addr(be.addr_be, be.port_be));
            }
            out.insert((fe, k.scope), set);
        }
        out
    }

    fn wanted(
        d: &crate::control::desired::Desired,
    ) -> BTreeMap<(SocketAddrV4, u8), BTreeSet<SocketAddrV4>> {
        let v4 = |a: std::net::SocketAddr| match a {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => panic!("IPv4 only"),
        };
        d.iter()
            .map(|(k, v)| {
                (
                    (v4(k.addr), k.scope),
                    v.backends.iter().map(|(b, _)| v4(b.addr)).collect(),
                )
            })
            .collect()
    }

    use lb_common::FrontendSlotKey;

    /// The README's table of map sizes is the one the types give.
    #[test]
    fn the_readme_lists_every_map_size_with_its_bytes_per_entry() {
        let readme = include_str!("../../../README.md");
        let table = size_table();
        assert!(
            readme.contains(&table),
            "README.md lacks this table:\n{table}"
        );
    }

    /// Five Services of five endpoints in a backends map of 16: the three oldest are served,
    /// the two newest rejected with the map, its capacity and the numbers; in any input order.
    #[test]
    fn the_oldest_service_ports_fit_and_the_rest_are_rejected_naming_the_map() {
        let parts: Vec<String> = (0..5).map(|i| service(i, 1..=5)).collect();
        let forward = parts.concat();
        let backward: String = parts.iter().rev().cloned().collect();
        for yaml in [forward, backward] {
            let mut p = plan_of(&yaml);
            let rejected = fit(&mut p, &small(16));
            assert_eq!(served(&p), ["s0", "s1", "s2"]);
            let names: Vec<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
            assert_eq!(names, ["s3", "s4"]);
            assert_eq!(
                rejected[0].reason,
                "port web/TCP is not served: map lb_backend_v1 is full (capacity 16 entries, 15 \
                 in use, 5 more needed); older Service ports keep theirs (raise the map's size \
                 flag of lb-agent run, see the README)"
            );
            assert_eq!(rejected_map(&rejected[0]), Some(map_name::BACKENDS));
            assert!(p.rejected.contains(&rejected[1]), "render's list has them");
        }
        // Every map is checked: here the frontend slots (6 per Service port).
        let mut p = plan_of(&(0..3).map(|i| service(i, 1..=5)).collect::<String>());
        let rejected = fit(
            &mut p,
            &MapSizes {
                frontend_slots: 16,
                ..MapSizes::default()
            },
        );
        assert_eq!(served(&p), ["s0", "s1"]);
        // fit_desired's map contents are those of the fitted plan.
        let mut q = plan_of(&(0..3).map(|i| service(i, 1..=5)).collect::<String>());
        let (d, again) = fit_desired(
            &mut q,
            &MapSizes {
                frontend_slots: 16,
                ..MapSizes::default()
            },
        );
        assert_eq!(again, rejected);
        assert_eq!(d, desired(&p));
        assert!(rejected[0]
            .reason
            .contains("map lb_svc_v3 is full (capacity 16 entries, 12 in use, 6 more needed)"));
    }

    fn sync_to(
        s: &mut Syncer<FakeDataplane>,
        yaml: &str,
        sizes: &MapSizes,
    ) -> (Vec<String>, crate::dataplane::sync::SyncStats) {
        let mut p = plan_of(yaml);
        let rejected = fit(&mut p, sizes);
        let d = desired(&p);
        let st = s.sync(&d).expect("a full map never fails the sync");
        assert!(
            st.deferred.is_empty(),
            "applied within one sync: {:?}",
            st.deferred
        );
        assert_eq!(resolved(&s.dataplane().contents().unwrap()), wanted(&d));
        (rejected.into_iter().map(|r| r.name).collect(), st)
    }

    /// On maps the size of what fits, exactly full: the served Services keep being updated
    /// within one sync (an endpoint replaced needs a backend entry before the old one goes:
    /// break before make), a removed Service makes room for a rejected one in the same sync,
    /// and the fake fails every write the kernel would refuse.
    #[test]
    fn a_full_map_never_stops_the_others_and_recovery_is_automatic() {
        let sizes = small(15);
        // Every intermediate state: each counted slot resolves to a live backend.
        fn valid(c: &MapContents) {
            resolved(c);
        }
        let mut s = Syncer::adopt(FakeDataplane {
            sizes: Some(sizes),
            after_write: Some(valid),
            ..Default::default()
        })
        .unwrap();
        s.set_sizes(sizes);
        let all = |eps0: std::ops::RangeInclusive<u32>, skip: Option<u32>| -> String {
            (0..5)
                .filter(|i| Some(*i) != skip)
                .map(|i| {
                    if i == 0 {
                        service(0, eps0.clone())
                    } else {
                        service(i, 1..=5)
                    }
                })
                .collect()
        };
        let (rejected, _) = sync_to(&mut s, &all(1..=5, None), &sizes);
        assert_eq!(rejected, ["s3", "s4"]);
        assert_eq!(s.dataplane().contents().unwrap().backends.len(), 15);
        // One endpoint of s0 replaced, then all of them.
        let (rejected, st) = sync_to(&mut s, &all(2..=6, None), &sizes);
        assert_eq!(rejected, ["s3", "s4"]);
        assert!(st.writes > 0);
        let (rejected, _) = sync_to(&mut s, &all(11..=15, None), &sizes);
        assert_eq!(rejected, ["s3", "s4"]);
        // s1 goes: s3 takes its room in the same sync.
        let (rejected, _) = sync_to(&mut s, &all(11..=15, Some(1)), &sizes);
        assert_eq!(rejected, ["s4"]);
        // s0 grows to 12 endpoints: the oldest keeps its place, newer ones make room.
        let (rejected, _) = sync_to(&mut s, &all(1..=12, Some(1)), &sizes);
        assert_eq!(rejected, ["s2", "s3", "s4"]);
        // And back: they return.
        let (rejected, _) = sync_to(&mut s, &all(1..=5, Some(1)), &sizes);
        assert_eq!(rejected, ["s4"]);
        // A one-endpoint Service replacing its endpoint in a full map (the last resort: no
        // backend in common and no room for one more).
        let sizes = small(6);
        let mut s = Syncer::adopt(FakeDataplane {
            sizes: Some(sizes),
            after_write: Some(valid),
            ..Default::default()
        })
        .unwrap();
        s.set_sizes(sizes);
        let two = |a: u32| format!("{}{}", service(0, [a]), service(1, 1..=5));
        assert!(sync_to(&mut s, &two(1), &sizes).0.is_empty());
        assert!(sync_to(&mut s, &two(2), &sizes).0.is_empty());
    }
}
