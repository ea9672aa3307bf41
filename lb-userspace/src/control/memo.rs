//! The control plane kept between snapshots: the model, plan and map contents of every Service,
//! remembered so that the next snapshot recomputes only the Services it changed.
//!
//! [`Memo::update`] takes a whole snapshot (what the sources hand over) and finds what differs
//! from the last one: an object of the same position and identity is unchanged when it is equal
//! or, for the API server's objects ([`Objects::versioned`]), when its uid and resourceVersion
//! are. Then, for each Service whose object or EndpointSlices changed, it rebuilds that
//! Service's model alone (`model::service_verdict`), settles the frontends it shares with other
//! Services among it and those others only (`model::resolve_collisions_of`: who keeps a claim
//! depends only on the Services that make it), plans the Services whose model changed, and
//! rewrites the map contents of the frontends they had or have. A change of this node's Node
//! object re-plans every Service (its addresses, zone and pod CIDR reach every plan).
//!
//! The result is the from-scratch one, exactly: [`Memo::model`], [`Memo::plan`] and
//! [`Memo::desired`] equal `model::build_with`, `plan::plan` and `desired::desired` of the same
//! snapshot (the unit tests replay random changes and compare).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{
    desired::{service_port_frontends, Desired, DesiredFrontend, FrontendKey},
    model::{
        claims, node_of, resolve_collisions_of, service_key, service_verdict, slice_verdict,
        Checks, Claim, IpFamily, Model, NodeInfo, Rejected, ServiceModel,
    },
    plan::{plan_node, port_plans, Plan, ServicePortPlan},
    source::Objects,
};

/// A Service's place in the model's order: namespace, name, and which of the Services of that
/// namespace and name it is in snapshot order (a manifest may hold two; the API server never).
pub type ServiceKey = (String, String, usize);

/// The Service an EndpointSlice belongs to: namespace and name.
type Group = (String, String);

/// The frontends of one Service port as the maps get them.
pub type PortFrontends = Vec<(FrontendKey, DesiredFrontend)>;

/// An ordered set of Service keys, as a sorted vector. Nearly every frontend and claim has
/// one Service: a `BTreeSet` of one key allocates a whole node (over 600 bytes), and at
/// 10,000 Services the `claimants` and `owners` maps held two such sets per Service port,
/// 12 MB resident. Lookups and changes are by binary search; order and contents are those
/// of the `BTreeSet` it replaces.
#[derive(Debug, Default)]
struct KeySet(Vec<ServiceKey>);

impl KeySet {
    fn insert(&mut self, k: ServiceKey) {
        if let Err(i) = self.0.binary_search(&k) {
            // Room for one more, not for the usual doubling: most sets keep one key.
            self.0.reserve_exact(1);
            self.0.insert(i, k);
        }
    }

    fn remove(&mut self, k: &ServiceKey) {
        if let Ok(i) = self.0.binary_search(k) {
            self.0.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn last(&self) -> Option<&ServiceKey> {
        self.0.last()
    }
}

impl<'a> IntoIterator for &'a KeySet {
    type Item = &'a ServiceKey;
    type IntoIter = std::slice::Iter<'a, ServiceKey>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// What the memo keeps of one Service.
struct Entry {
    /// Its position in the snapshot's Services.
    index: usize,
    /// Its model before collisions with other Services are settled, and its rejections then.
    /// `base` and `model` are one shared model when settling changed nothing (nearly always):
    /// two copies of every model were over 10 MB resident at 10,000 Services.
    base: Option<Arc<ServiceModel>>,
    base_rejected: Vec<Rejected>,
    claims: BTreeSet<Claim>,
    /// Its model once collisions are settled, and what it lost to older Services.
    model: Option<Arc<ServiceModel>>,
    lost: Vec<Rejected>,
    plan: Vec<ServicePortPlan<Ipv4Addr>>,
    plan_ipv6: Vec<ServicePortPlan<Ipv6Addr>>,
    /// Per entry of `plan`, then of `plan_ipv6`, its frontends.
    frontends: Vec<PortFrontends>,
}

impl Entry {
    fn new(index: usize) -> Self {
        Self {
            index,
            base: None,
            base_rejected: Vec::new(),
            claims: BTreeSet::new(),
            model: None,
            lost: Vec::new(),
            plan: Vec::new(),
            plan_ipv6: Vec::new(),
            frontends: Vec::new(),
        }
    }
}

/// What the memo keeps of one EndpointSlice.
struct SliceEntry {
    group: Option<Group>,
    rejected: Vec<Rejected>,
}

/// How much work the memo did, summed over every update (tests read it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Services whose model was rebuilt.
    pub modelled: u64,
    /// Services whose collisions were settled again.
    pub settled: u64,
    /// Services planned (and turned into map contents) again.
    pub planned: u64,
}

/// What one [`Memo::update`] changed.
#[derive(Debug, Default)]
pub struct Update {
    /// Everything was planned again (the first snapshot, a change of this node): every frontend
    /// may have changed.
    pub everything: bool,
    /// The frontends whose map contents may differ from the last update's (every one of them
    /// when `everything`).
    pub touched: BTreeSet<FrontendKey>,
    /// The Services planned again (their frontends now: [`Memo::frontends_of`]).
    pub planned: Vec<ServiceKey>,
    /// Their Service ports' frontends before, and those of Services that left.
    pub gone: Vec<PortFrontends>,
    /// The snapshot this one replaced: freeing a large one takes a while, so the caller picks
    /// when and where (the agent frees it off its loop).
    pub replaced: Objects,
}

/// The control plane of one node, kept between snapshots (see the module documentation).
pub struct Memo {
    node_name: String,
    checks: Checks,
    objects: Objects,
    node: Option<NodeInfo>,
    plan_node: NodeInfo,
    services: BTreeMap<ServiceKey, Entry>,
    /// The key of each of the snapshot's Services, by position.
    service_keys: Vec<ServiceKey>,
    /// Each of the snapshot's EndpointSlices, by position.
    slices: Vec<SliceEntry>,
    /// Positions of the slices of each Service, in snapshot order.
    slices_of: HashMap<Group, Vec<usize>>,
    /// Who claims each address frontend and node port (before collisions are settled).
    claimants: HashMap<Claim, KeySet>,
    /// Every rejection with its count (the model's sorted list, duplicates included).
    rejected: BTreeMap<Rejected, usize>,
    desired: Desired,
    /// The Services whose frontends include each frontend: the last in the model's order wins,
    /// as in `desired::desired`.
    owners: HashMap<FrontendKey, KeySet>,
    built: bool,
    pub work: Work,
}

/// Whether `a` (of the last snapshot) and `b` are the same object: equal, or, when both
/// snapshots are versioned, of the same uid and resourceVersion.
fn same<T: PartialEq>(a: &T, am: &ObjectMeta, b: &T, bm: &ObjectMeta, versioned: bool) -> bool {
    if versioned && bm.resource_version.is_some() {
        return am.uid == bm.uid && am.resource_version == bm.resource_version;
    }
    a == b
}

/// An object's identity for matching it across snapshots.
fn ident(m: &ObjectMeta) -> (Option<&str>, Option<&str>) {
    (m.namespace.as_deref(), m.name.as_deref())
}

fn count(rejected: &mut BTreeMap<Rejected, usize>, add: &[Rejected]) {
    for r in add {
        *rejected.entry(r.clone()).or_default() += 1;
    }
}

fn uncount(rejected: &mut BTreeMap<Rejected, usize>, gone: &[Rejected]) {
    for r in gone {
        if let Some(n) = rejected.get_mut(r) {
            *n -= 1;
            if *n == 0 {
                rejected.remove(r);
            }
        }
    }
}

/// Positions in `new` matched to positions in `old` by identity (the n-th object of an identity
/// to the n-th), or `None` when the identities are the same position by position.
fn matched<T>(
    old: &[T],
    new: &[T],
    meta: impl Fn(&T) -> &ObjectMeta,
) -> Option<Vec<Option<usize>>> {
    if old.len() == new.len()
        && old
            .iter()
            .zip(new)
            .all(|(a, b)| ident(meta(a)) == ident(meta(b)))
    {
        return None;
    }
    let mut by: HashMap<(Option<&str>, Option<&str>), VecDeque<usize>> = HashMap::new();
    for (i, o) in old.iter().enumerate() {
        by.entry(ident(meta(o))).or_default().push_back(i);
    }
    Some(
        new.iter()
            .map(|o| by.get_mut(&ident(meta(o))).and_then(|q| q.pop_front()))
            .collect(),
    )
}

impl Memo {
    pub fn new(node_name: &str, checks: Checks) -> Self {
        Self {
            node_name: node_name.into(),
            checks,
            objects: Objects::default(),
            node: None,
            plan_node: plan_node(None, node_name),
            services: BTreeMap::new(),
            service_keys: Vec::new(),
            slices: Vec::new(),
            slices_of: HashMap::new(),
            claimants: HashMap::new(),
            rejected: BTreeMap::new(),
            desired: Desired::new(),
            owners: HashMap::new(),
            built: false,
            work: Work::default(),
        }
    }

    /// Takes the next snapshot; recomputes what it changed.
    pub fn update(&mut self, objects: Objects) -> Update {
        let old = std::mem::replace(&mut self.objects, objects);
        let versioned = old.versioned && self.objects.versioned && self.built;
        let node = node_of(&self.objects, &self.node_name, &self.checks);
        let everything = !self.built || node != self.node;
        if node != self.node {
            self.plan_node = plan_node(node.as_ref(), &self.node_name);
            self.node = node;
        }

        // EndpointSlices: the Services whose slices changed.
        let mut dirty_groups: BTreeSet<Group> = BTreeSet::new();
        let new_slices = &self.objects.endpoint_slices;
        match matched(&old.endpoint_slices, new_slices, |s| &s.metadata) {
            None => {
                for (i, (a, b)) in old.endpoint_slices.iter().zip(new_slices).enumerate() {
                    if self.built && same(a, &a.metadata, b, &b.metadata, versioned) {
                        continue;
                    }
                    let (group, rejected) = slice_verdict(b, &self.checks);
                    let before =
                        std::mem::replace(&mut self.slices[i], SliceEntry { group, rejected });
                    uncount(&mut self.rejected, &before.rejected);
                    count(&mut self.rejected, &self.slices[i].rejected);
                    if before.group != self.slices[i].group {
                        if let Some(g) = &before.group {
                            if let Some(v) = self.slices_of.get_mut(g) {
                                v.retain(|j| *j != i);
                            }
                        }
                        if let Some(g) = &self.slices[i].group {
                            let v = self.slices_of.entry(g.clone()).or_default();
                            let at = v.partition_point(|j| *j < i);
                            v.insert(at, i);
                        }
                    }
                    dirty_groups.extend(before.group);
                    dirty_groups.extend(self.slices[i].group.clone());
                }
            }
            Some(m) => {
                let mut before: Vec<Option<SliceEntry>> = std::mem::take(&mut self.slices)
                    .into_iter()
                    .map(Some)
                    .collect();
                let mut slices = Vec::with_capacity(new_slices.len());
                for (b, at) in new_slices.iter().zip(&m) {
                    let kept = at.and_then(|i| {
                        let a = &old.endpoint_slices[i];
                        let e = before[i].take()?;
                        if self.built && same(a, &a.metadata, b, &b.metadata, versioned) {
                            Some(e)
                        } else {
                            uncount(&mut self.rejected, &e.rejected);
                            dirty_groups.extend(e.group);
                            None
                        }
                    });
                    let e = kept.unwrap_or_else(|| {
                        let (group, rejected) = slice_verdict(b, &self.checks);
                        count(&mut self.rejected, &rejected);
                        dirty_groups.extend(group.clone());
                        SliceEntry { group, rejected }
                    });
                    slices.push(e);
                }
                for e in before.into_iter().flatten() {
                    uncount(&mut self.rejected, &e.rejected);
                    dirty_groups.extend(e.group);
                }
                self.slices = slices;
                self.slices_of.clear();
                for (i, e) in self.slices.iter().enumerate() {
                    if let Some(g) = &e.group {
                        self.slices_of.entry(g.clone()).or_default().push(i);
                    }
                }
            }
        }

        // Services: those changed, added or removed.
        let mut dirty: BTreeSet<ServiceKey> = BTreeSet::new();
        let mut removed: Vec<(ServiceKey, Entry)> = Vec::new();
        let new_services = &self.objects.services;
        match matched(&old.services, new_services, |s| &s.metadata) {
            None => {
                for (i, (a, b)) in old.services.iter().zip(new_services).enumerate() {
                    if !(self.built && same(a, &a.metadata, b, &b.metadata, versioned)) {
                        dirty.insert(self.service_keys[i].clone());
                    }
                }
            }
            Some(m) => {
                let mut seen: HashMap<Group, usize> = HashMap::new();
                let keys: Vec<ServiceKey> = new_services
                    .iter()
                    .map(|s| {
                        let (ns, name) = service_key(s);
                        let n = seen.entry((ns.clone(), name.clone())).or_default();
                        *n += 1;
                        (ns, name, *n - 1)
                    })
                    .collect();
                let new_keys: BTreeSet<&ServiceKey> = keys.iter().collect();
                let gone: Vec<ServiceKey> = self
                    .services
                    .keys()
                    .filter(|k| !new_keys.contains(k))
                    .cloned()
                    .collect();
                for k in gone {
                    let e = self.services.remove(&k).expect("listed");
                    removed.push((k, e));
                }
                for (j, (k, at)) in keys.iter().zip(&m).enumerate() {
                    let b = &new_services[j];
                    let unchanged = match (self.services.get_mut(k), at) {
                        (Some(e), Some(i)) if e.index == *i => {
                            let a = &old.services[*i];
                            e.index = j;
                            self.built && same(a, &a.metadata, b, &b.metadata, versioned)
                        }
                        (Some(e), _) => {
                            e.index = j;
                            false
                        }
                        (None, _) => {
                            self.services.insert(k.clone(), Entry::new(j));
                            false
                        }
                    };
                    if !unchanged {
                        dirty.insert(k.clone());
                    }
                }
                self.service_keys = keys;
            }
        }
        for (ns, name) in &dirty_groups {
            let from = (ns.clone(), name.clone(), 0);
            let to = (ns.clone(), name.clone(), usize::MAX);
            dirty.extend(self.services.range(from..=to).map(|(k, _)| k.clone()));
        }

        // Models of the dirty Services, before collisions.
        let mut changed_claims: BTreeSet<Claim> = BTreeSet::new();
        for (k, e) in &removed {
            for c in &e.claims {
                if let Some(s) = self.claimants.get_mut(c) {
                    s.remove(k);
                    if s.is_empty() {
                        self.claimants.remove(c);
                    }
                }
            }
            changed_claims.extend(e.claims.iter().cloned());
            uncount(&mut self.rejected, &e.base_rejected);
            uncount(&mut self.rejected, &e.lost);
        }
        for k in &dirty {
            let index = self.services[k].index;
            let svc = &self.objects.services[index];
            let slices: Vec<_> = self
                .slices_of
                .get(&(k.0.clone(), k.1.clone()))
                .into_iter()
                .flatten()
                .map(|i| &self.objects.endpoint_slices[*i])
                .collect();
            let (base, base_rejected) = service_verdict(svc, &slices, &self.checks);
            self.work.modelled += 1;
            let new_claims = base.as_ref().map(claims).unwrap_or_default();
            count(&mut self.rejected, &base_rejected);
            let e = self
                .services
                .get_mut(k)
                .expect("a dirty Service is in the snapshot");
            uncount(&mut self.rejected, &e.base_rejected);
            for c in &e.claims {
                if let Some(s) = self.claimants.get_mut(c) {
                    s.remove(k);
                    if s.is_empty() {
                        self.claimants.remove(c);
                    }
                }
            }
            for c in &new_claims {
                self.claimants
                    .entry(c.clone())
                    .or_default()
                    .insert(k.clone());
            }
            changed_claims.extend(std::mem::take(&mut e.claims));
            changed_claims.extend(new_claims.iter().cloned());
            e.base = base.map(Arc::new);
            e.base_rejected = base_rejected;
            e.claims = new_claims;
        }

        // Collisions: the dirty Services and every claimant of a claim they made or make
        // settle again, among themselves and the other claimants of their claims.
        let mut settle: BTreeSet<ServiceKey> = dirty.clone();
        for c in &changed_claims {
            settle.extend(self.claimants.get(c).into_iter().flatten().cloned());
        }
        let mut among: BTreeSet<ServiceKey> = settle.clone();
        for k in &settle {
            for c in &self.services[k].claims {
                among.extend(self.claimants.get(c).into_iter().flatten().cloned());
            }
        }
        let keys: Vec<&ServiceKey> = among
            .iter()
            .filter(|k| self.services[*k].base.is_some())
            .collect();
        let mut models: Vec<ServiceModel> = keys
            .iter()
            .map(|k| ServiceModel::clone(self.services[*k].base.as_deref().expect("filtered")))
            .collect();
        let mut lost: Vec<Vec<Rejected>> = vec![Vec::new(); models.len()];
        for (i, r) in resolve_collisions_of(&mut models) {
            lost[i].push(r);
        }
        let mut settled: HashMap<&ServiceKey, (ServiceModel, Vec<Rejected>)> =
            keys.into_iter().zip(models.into_iter().zip(lost)).collect();
        let mut replan: Vec<ServiceKey> = Vec::new();
        for k in &settle {
            let (model, lost) = settled
                .remove(k)
                .map_or((None, Vec::new()), |(m, l)| (Some(m), l));
            let e = self
                .services
                .get_mut(k)
                .expect("settled Services are in the snapshot");
            self.work.settled += 1;
            uncount(&mut self.rejected, &e.lost);
            count(&mut self.rejected, &lost);
            e.lost = lost;
            let model = model.map(|m| match &e.base {
                Some(b) if **b == m => b.clone(),
                _ => Arc::new(m),
            });
            // The plan depends on the model and the node only.
            if e.model != model {
                replan.push(k.clone());
            }
            // (Also when equal: then it shares the new `base`.)
            e.model = model;
        }
        if everything {
            replan = self.services.keys().cloned().collect();
        }

        // Plans and map contents of the Services whose model (or node) changed.
        let mut update = Update {
            everything,
            ..Update::default()
        };
        let mut touched: BTreeSet<FrontendKey> = BTreeSet::new();
        for (k, e) in removed {
            for port in e.frontends {
                for (fe, _) in &port {
                    self.unown(fe, &k);
                    touched.insert(*fe);
                }
                update.gone.push(port);
            }
        }
        for k in replan {
            let e = self
                .services
                .get_mut(&k)
                .expect("replanned Services are in the snapshot");
            let (plan, plan_ipv6) = match e.model.as_deref() {
                Some(m) => (
                    if m.serves(IpFamily::IPv4) {
                        port_plans::<Ipv4Addr>(m, &self.plan_node)
                    } else {
                        Vec::new()
                    },
                    if m.serves(IpFamily::IPv6) {
                        port_plans::<Ipv6Addr>(m, &self.plan_node)
                    } else {
                        Vec::new()
                    },
                ),
                None => (Vec::new(), Vec::new()),
            };
            self.work.planned += 1;
            let frontends: Vec<PortFrontends> = plan
                .iter()
                .map(service_port_frontends)
                .chain(plan_ipv6.iter().map(service_port_frontends))
                .collect();
            e.plan = plan;
            e.plan_ipv6 = plan_ipv6;
            let before = std::mem::replace(&mut e.frontends, frontends);
            let now: Vec<FrontendKey> = e.frontends.iter().flatten().map(|(fe, _)| *fe).collect();
            for port in before {
                for (fe, _) in &port {
                    self.unown(fe, &k);
                    touched.insert(*fe);
                }
                update.gone.push(port);
            }
            for fe in now {
                self.owners.entry(fe).or_default().insert(k.clone());
                touched.insert(fe);
            }
            update.planned.push(k);
        }
        for fe in &touched {
            let winner = self.owners.get(fe).and_then(|o| o.last()).and_then(|k| {
                self.services[k]
                    .frontends
                    .iter()
                    .flatten()
                    .rev()
                    .find(|(f, _)| f == fe)
            });
            match winner {
                Some((_, d)) => {
                    self.desired.insert(*fe, d.clone());
                }
                None => {
                    self.desired.remove(fe);
                }
            }
        }
        update.touched = touched;
        update.replaced = old;
        self.built = true;
        update
    }

    fn unown(&mut self, fe: &FrontendKey, k: &ServiceKey) {
        if let Some(o) = self.owners.get_mut(fe) {
            o.remove(k);
            if o.is_empty() {
                self.owners.remove(fe);
            }
        }
    }

    /// The snapshot of the last update.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// The node the plans are made for.
    pub fn node(&self) -> &NodeInfo {
        &self.plan_node
    }

    /// The models of the served Services, in the model's order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceModel> {
        self.services.values().filter_map(|e| e.model.as_deref())
    }

    /// Every rejection, sorted (as `Model::rejected`).
    pub fn rejected(&self) -> impl Iterator<Item = &Rejected> {
        self.rejected
            .iter()
            .flat_map(|(r, n)| std::iter::repeat_n(r, *n))
    }

    /// The IPv4 family's Service port plans, in plan order (as `Plan::services`).
    pub fn port_plans(&self) -> impl Iterator<Item = &ServicePortPlan<Ipv4Addr>> {
        self.services.values().flat_map(|e| &e.plan)
    }

    /// The frontends of each Service port of a Service, IPv4 then IPv6 (empty when it is gone).
    pub fn frontends_of(&self, k: &ServiceKey) -> &[PortFrontends] {
        self.services.get(k).map_or(&[], |e| &e.frontends)
    }

    /// Every Service's Service ports' frontends, in plan order.
    pub fn all_frontends(&self) -> impl Iterator<Item = &PortFrontends> {
        self.services.values().flat_map(|e| &e.frontends)
    }

    /// The map contents (`desired::desired` of [`Memo::plan`]).
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// The model, as `model::build_with` builds it.
    pub fn model(&self) -> Model {
        Model {
            node: self.node.clone(),
            services: self.services().cloned().collect(),
            rejected: self.rejected().cloned().collect(),
        }
    }

    /// The plan, as `plan::plan` makes it of [`Memo::model`].
    pub fn plan(&self) -> Plan {
        Plan {
            node: self.plan_node.clone(),
            services: self.port_plans().cloned().collect(),
            services_ipv6: self
                .services
                .values()
                .flat_map(|e| &e.plan_ipv6)
                .cloned()
                .collect(),
            rejected: self.rejected().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{
        desired::desired,
        model::build_with,
        plan::plan,
        source::{default_endpoint_slice, default_service},
    };
    use k8s_openapi::api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    };
    use serde_json::json;

    const NODE: &str = "node-a";

    /// A small deterministic generator (xorshift), so a failure replays.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    fn node(addr: &str, zone: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": zone}},
            "status": {"addresses": [{"type": "InternalIP", "address": addr}]}
        }))
        .unwrap()
    }

    /// Service `ns/s<i>`: ClusterIP 10.96.0.<i>, port 80; every third a NodePort, every fifth
    /// with an external IP and externalTrafficPolicy Local.
    fn service(ns: &str, i: usize) -> Service {
        let mut spec = json!({
            "type": "ClusterIP",
            "clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
            "ports": [{"name": "p", "port": 80, "targetPort": 8080}],
        });
        if i.is_multiple_of(3) {
            spec["type"] = json!("NodePort");
            spec["ports"][0]["nodePort"] = json!(30000 + i % 2700);
        }
        if i.is_multiple_of(5) {
            spec["externalIPs"] = json!([format!("192.0.{}.{}", i / 250, i % 250 + 1)]);
            spec["externalTrafficPolicy"] = json!("Local");
        }
        let mut s: Service = serde_json::from_value(json!({
            "metadata": {"name": format!("s{i}"), "namespace": ns,
                         "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", i % 60)},
            "spec": spec,
        }))
        .unwrap();
        default_service(&mut s);
        s
    }

    fn slice(ns: &str, i: usize, n: usize) -> EndpointSlice {
        let eps: Vec<_> = (0..n)
            .map(|e| {
                json!({"addresses": [format!("10.{}.{}.{}", 44 + i / 250, i % 250, e + 1)],
                       "nodeName": if e % 2 == 0 { NODE } else { "node-b" },
                       "conditions": {"ready": e % 4 != 3}})
            })
            .collect();
        let mut s: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": format!("s{i}-x"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": format!("s{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "p", "port": 8080}],
            "endpoints": eps,
        }))
        .unwrap();
        default_endpoint_slice(&mut s);
        s
    }

    fn cluster(n: usize) -> Objects {
        let mut o = Objects {
            nodes: vec![node("192.168.0.1", "z1")],
            ..Default::default()
        };
        for i in 0..n {
            let ns = if i % 2 == 0 { "a" } else { "b" };
            o.services.push(service(ns, i));
            o.endpoint_slices.push(slice(ns, i, 1 + i % 4));
        }
        o
    }

    /// The memo's result equals the from-scratch one.
    fn check(memo: &Memo, o: &Objects, checks: &Checks, step: &str) {
        let m = build_with(o, NODE, checks);
        let got = memo.model();
        assert_eq!(got.node, m.node, "{step}: node");
        assert_eq!(got.services, m.services, "{step}: models");
        assert_eq!(got.rejected, m.rejected, "{step}: rejected");
        let p = plan(&m, NODE);
        assert_eq!(memo.plan(), p, "{step}: plan");
        assert_eq!(memo.desired(), &desired(&p), "{step}: desired");
    }

    /// Bumps an object's resourceVersion, as the API server does on every change.
    fn bump(m: &mut ObjectMeta, rv: &mut u64) {
        *rv += 1;
        m.resource_version = Some(rv.to_string());
    }

    /// One random change to `o` (described for the failure message).
    fn change(o: &mut Objects, r: &mut Rng, rv: &mut u64, next: &mut usize) -> String {
        let ns_of = |s: &Service| s.metadata.namespace.clone().unwrap();
        match r.below(12) {
            0 | 1 if !o.endpoint_slices.is_empty() => {
                let i = r.below(o.endpoint_slices.len());
                let s = &mut o.endpoint_slices[i];
                let eps = s.endpoints.get_or_insert_with(Vec::new);
                match r.below(3) {
                    0 => {
                        let mut e = eps.first().cloned().unwrap_or_else(|| {
                            serde_json::from_value(json!({"addresses": ["10.245.0.1"]})).unwrap()
                        });
                        e.addresses = vec![format!("10.245.{}.{}", r.below(200), r.below(250) + 1)];
                        eps.push(e);
                    }
                    1 => {
                        eps.pop();
                    }
                    _ => {
                        if let Some(e) = eps.first_mut() {
                            let c = e.conditions.get_or_insert_with(Default::default);
                            c.ready = Some(!c.ready.unwrap_or(true));
                        }
                    }
                }
                bump(&mut s.metadata, rv);
                format!("endpoint of slice {i}")
            }
            2 => {
                let i = *next;
                *next += 1;
                let ns = if i.is_multiple_of(2) { "a" } else { "b" };
                let mut s = service(ns, i % 250);
                s.metadata.name = Some(format!("s{i}"));
                bump(&mut s.metadata, rv);
                let at = r.below(o.services.len() + 1);
                o.services.insert(at, s);
                let mut sl = slice(ns, i % 250, 2);
                sl.metadata.name = Some(format!("s{i}-x"));
                sl.metadata
                    .labels
                    .as_mut()
                    .unwrap()
                    .insert("kubernetes.io/service-name".into(), format!("s{i}"));
                bump(&mut sl.metadata, rv);
                o.endpoint_slices.push(sl);
                format!("Service s{i} added")
            }
            3 if !o.services.is_empty() => {
                let i = r.below(o.services.len());
                o.services.remove(i);
                format!("Service {i} removed")
            }
            4 | 5 if !o.services.is_empty() => {
                let i = r.below(o.services.len());
                let s = &mut o.services[i];
                let spec = s.spec.as_mut().unwrap();
                match r.below(3) {
                    0 => spec.ports.as_mut().unwrap()[0].port = 80 + r.below(3) as i32,
                    1 => spec.session_affinity = Some("ClientIP".into()),
                    _ => spec.internal_traffic_policy = Some("Local".into()),
                }
                bump(&mut s.metadata, rv);
                format!("Service {i} changed")
            }
            6 | 7 if o.services.len() > 1 => {
                // A collision: one Service's external IP is another's ClusterIP, or its
                // nodePort another's; then flip who is older.
                let a = r.below(o.services.len());
                let b = r.below(o.services.len());
                let ip = o.services[b]
                    .spec
                    .as_ref()
                    .unwrap()
                    .cluster_ip
                    .clone()
                    .unwrap();
                let older = o.services[b].metadata.creation_timestamp.clone();
                let s = &mut o.services[a];
                let spec = s.spec.as_mut().unwrap();
                if r.below(2) == 0 {
                    spec.external_ips = Some(vec![ip]);
                } else {
                    spec.type_ = Some("NodePort".into());
                    spec.ports.as_mut().unwrap()[0].node_port = Some(30000 + r.below(6) as i32);
                }
                if r.below(2) == 0 {
                    s.metadata.creation_timestamp = older;
                    if let Some(t) = s.metadata.creation_timestamp.as_mut() {
                        t.0 = t.0.checked_sub(jiff::SignedDuration::from_secs(1)).unwrap();
                    }
                }
                bump(&mut s.metadata, rv);
                format!("Service {a} collides with {b}")
            }
            8 => {
                let addr = format!("192.168.0.{}", r.below(3) + 1);
                let zone = format!("z{}", r.below(2));
                o.nodes = vec![node(&addr, &zone)];
                bump(&mut o.nodes[0].metadata, rv);
                "Node changed".into()
            }
            9 if !o.endpoint_slices.is_empty() && !o.services.is_empty() => {
                // A slice moves to another Service, or goes.
                let i = r.below(o.endpoint_slices.len());
                if r.below(2) == 0 {
                    let to = o.services[r.below(o.services.len())]
                        .metadata
                        .name
                        .clone()
                        .unwrap();
                    let s = &mut o.endpoint_slices[i];
                    s.metadata
                        .labels
                        .as_mut()
                        .unwrap()
                        .insert("kubernetes.io/service-name".into(), to);
                    bump(&mut s.metadata, rv);
                    format!("slice {i} moved")
                } else {
                    o.endpoint_slices.remove(i);
                    format!("slice {i} removed")
                }
            }
            10 if !o.services.is_empty() => {
                // A second Service of the same namespace and name (a manifest may hold it).
                let i = r.below(o.services.len());
                let mut s = o.services[i].clone();
                let ns = ns_of(&s);
                s.spec = service(&ns, r.below(250)).spec;
                bump(&mut s.metadata, rv);
                o.services.push(s);
                format!("Service {i} duplicated")
            }
            _ => {
                // Nothing changed at all.
                "no change".into()
            }
        }
    }

    fn replay(seed: u64, versioned: bool, checks: Checks) {
        let mut o = cluster(40);
        o.versioned = versioned;
        let mut rv = 0;
        for s in &mut o.services {
            s.metadata.uid = Some(format!("uid-{}", s.metadata.name.clone().unwrap()));
            bump(&mut s.metadata, &mut rv);
        }
        for s in &mut o.endpoint_slices {
            bump(&mut s.metadata, &mut rv);
        }
        let mut memo = Memo::new(NODE, checks.clone());
        memo.update(o.clone());
        check(&memo, &o, &checks, "first");
        let mut r = Rng(seed);
        let mut next = 1000;
        let mut collided = false;
        for step in 0..150 {
            let what = change(&mut o, &mut r, &mut rv, &mut next);
            memo.update(o.clone());
            check(
                &memo,
                &o,
                &checks,
                &format!("seed {seed} step {step}: {what}"),
            );
            collided |= memo
                .rejected()
                .any(|r| r.reason.contains("an older Service"));
        }
        assert!(collided, "seed {seed}: no collision was replayed");
    }

    /// After any sequence of changes (endpoints, Services added, removed and changed, frontends
    /// two Services claim and who is older, the Node, slices that move or go, duplicates), the
    /// memo's model, plan and map contents are the from-scratch ones.
    #[test]
    fn memoised_equals_from_scratch_after_random_changes() {
        for seed in 1..=6 {
            replay(seed * 7919, seed % 2 == 0, Checks::default());
        }
        let narrow = Checks {
            node_port_addresses: crate::control::model::NodePortAddresses::parse(&[
                "192.168.0.0/31".into(),
            ])
            .unwrap(),
            ..Checks::default()
        };
        replay(4242, true, narrow);
    }

    /// One endpoint change recomputes one Service, whatever the size of the cluster; the map
    /// contents that may change are that Service's frontends.
    #[test]
    fn one_endpoint_change_recomputes_one_service_at_any_size() {
        for n in [100, 2000] {
            let mut o = cluster(n);
            o.versioned = true;
            let mut rv = 0;
            for s in &mut o.services {
                bump(&mut s.metadata, &mut rv);
            }
            for s in &mut o.endpoint_slices {
                bump(&mut s.metadata, &mut rv);
            }
            let mut memo = Memo::new(NODE, Checks::default());
            let first = memo.update(o.clone());
            assert!(first.everything);
            assert_eq!(memo.work.modelled, n as u64);
            let before = memo.work;
            let s = &mut o.endpoint_slices[n / 2];
            s.endpoints.as_mut().unwrap()[0].addresses = vec!["10.245.9.9".into()];
            bump(&mut s.metadata, &mut rv);
            let u = memo.update(o.clone());
            assert!(!u.everything);
            assert_eq!(memo.work.modelled - before.modelled, 1, "at {n} Services");
            assert_eq!(memo.work.settled - before.settled, 1, "at {n} Services");
            assert_eq!(memo.work.planned - before.planned, 1, "at {n} Services");
            // s<n/2> has a ClusterIP, maybe a NodePort and an external IP, in up to two scopes.
            assert!(
                !u.touched.is_empty() && u.touched.len() <= 4,
                "{:?}",
                u.touched
            );
            check(&memo, &o, &Checks::default(), &format!("{n} Services"));
        }
    }
}
