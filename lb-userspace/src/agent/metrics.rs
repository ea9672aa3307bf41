//! Operations endpoints of the agent: Prometheus metrics (`--metrics-addr` only, text format,
//! through the prometheus-client crate) and node health (`--health-addr`: `/healthz` and
//! `/livez` only, as kube-proxy's port 10256):
//! - `/livez`: the agent's loop is alive (it went round within [`STALE_AFTER`]), no update has
//!   waited longer than [`STALE_AFTER`] to reach the maps (a snapshot not synced yet, a failed
//!   sync being retried: kube-proxy's "queued update not applied within the health timeout"),
//!   and the pins are not lost;
//! - `/healthz`: all that, and programmed (the first sync succeeded and the programs are
//!   attached: 503 before, unlike kube-proxy, which answers 200 while it starts up), and the
//!   node eligible (kube-proxy's `nodeEligible`: not being deleted, no
//!   `ToBeDeletedByClusterAutoscaler` taint).
//!
//! Reading the maps for `/metrics` (counters, per-Service counters, the entry count of every map:
//! walks over up to millions of conntrack entries) happens at most once every
//! [`MAP_READ_INTERVAL`]; scrapes in between (or concurrent ones) encode the last reading.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use super::{health_check::HealthEntry, http::Response};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabel {
    counter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceHookLabel {
    device: String,
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InterfaceLabel {
    interface: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct ServicePortLabel {
    namespace: String,
    name: String,
    port: String,
    protocol: String,
    /// `IPv4` or `IPv6`: each family's Service port counts apart, as kube-proxy's proxier per
    /// family does.
    ip_family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceDropLabel {
    namespace: String,
    name: String,
    port: String,
    protocol: String,
    ip_family: String,
    reason: String,
}

/// Splits `namespace/name:port/PROTO` (the plan's Service-port identity, with `/IPv6` after it
/// for the IPv6 family's) into labels.
fn service_port_label(s: &str) -> Option<ServicePortLabel> {
    let (s, ip_family) = match s.strip_suffix(crate::control::desired::IPV6_SUFFIX) {
        Some(s) => (s, "IPv6"),
        None => (s, "IPv4"),
    };
    let (namespace, rest) = s.split_once('/')?;
    let (name_port, protocol) = rest.rsplit_once('/')?;
    let (name, port) = name_port.split_once(':')?;
    Some(ServicePortLabel {
        namespace: namespace.into(),
        name: name.into(),
        port: port.into(),
        protocol: protocol.into(),
        ip_family: ip_family.into(),
    })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    namespace: String,
    name: String,
}

/// How long the agent's loop may be silent, or an update wait for the maps, before /healthz and
/// /livez fail.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// Map reads for `/metrics` happen at most once per this interval.
pub const MAP_READ_INTERVAL: Duration = Duration::from_secs(10);

/// What one read of the pinned maps gives the metrics (`None`: that read failed, e.g. no maps).
#[derive(Default)]
pub struct MapReadings {
    pub service_stats: Option<Vec<(u32, lb_common::ServiceCounters)>>,
    pub counters: Option<Vec<crate::dataplane::read::CounterView>>,
    pub occupancy: Option<Vec<crate::dataplane::read::MapOccupancy>>,
    /// Kernel memory per map (pinned name, bytes).
    pub memory: Option<Vec<(&'static str, u64)>>,
}

/// Reads the maps pinned under a directory.
pub type MapReader = Box<dyn Fn(&Path) -> MapReadings + Send + Sync>;

/// The real map reader: `dataplane::read`.
pub fn read_maps(bpffs: &Path) -> MapReadings {
    use crate::dataplane::read;
    MapReadings {
        service_stats: read::service_stats(bpffs).ok(),
        counters: read::stats(bpffs).ok(),
        occupancy: read::map_occupancy(bpffs).ok(),
        memory: read::map_memory(bpffs).ok(),
    }
}

pub struct Ops {
    registry: Registry,
    bpffs: PathBuf,
    datapath: Family<CounterLabel, Counter>,
    datapath_seen: Mutex<BTreeMap<String, u64>>,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    map_memory: Family<MapLabel, Gauge>,
    not_fitting: Family<MapLabel, Gauge>,
    deferred: Gauge,
    programming_latency: Histogram,
    service_changes: Counter,
    endpoint_changes: Counter,
    service_changes_pending: Gauge,
    endpoint_changes_pending: Gauge,
    sync_duration: Histogram,
    map_writes: Counter,
    sync_errors: Counter,
    watch_restarts: Counter,
    last_sync: Gauge,
    local_endpoints: Family<ServiceLabel, Gauge>,
    device_hook: Family<DeviceHookLabel, Gauge>,
    interface_hooked: Family<InterfaceLabel, Gauge>,
    masquerade_local: Gauge,
    local_seen: Mutex<Vec<ServiceLabel>>,
    topology_hints_unusable: Family<ServicePortLabel, Gauge>,
    hints_seen: Mutex<Vec<ServicePortLabel>>,
    service_packets: Family<ServicePortLabel, Counter>,
    service_bytes: Family<ServicePortLabel, Counter>,
    service_new: Family<ServicePortLabel, Counter>,
    service_drops: Family<ServiceDropLabel, Counter>,
    ct_gc_sweeps: Counter,
    ct_gc_errors: Counter,
    ct_gc_removed: Counter,
    ct_gc_duration: Histogram,
    ct_gc_last_duration: Gauge<f64, AtomicU64>,
    ct_gc_interval: Gauge<f64, AtomicU64>,
    ct_entries: Family<TierLabel, Gauge>,
    ct_udp_flushed: Counter,
    sock_term_supported: Gauge,
    sock_term_passes: Counter,
    sock_term_errors: Counter,
    sock_term_sockets: Family<ResultLabel, Counter>,
    /// Service-port id -> identity, from the last sync.
    service_ports: Mutex<BTreeMap<u32, String>>,
    /// Last seen per (id, field) counter values, to turn absolute counts into increments.
    service_seen: Mutex<BTreeMap<(u32, u8), u64>>,
    /// The first sync succeeded and the programs are attached.
    programmed: AtomicBool,
    /// This node may receive load-balanced traffic (kube-proxy's `nodeEligible`).
    node_eligible: AtomicBool,
    /// Unix time since when an update waits for the maps (0: none).
    pending_since: AtomicU64,
    pins_lost: AtomicBool,
    heartbeat: AtomicU64,
    map_reader: MapReader,
    map_read_interval: Duration,
    /// When the maps were last read for the metrics; locked for the read, so that concurrent
    /// scrapes share one.
    maps_read_at: Mutex<Option<Instant>>,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Ops {
    pub fn new(bpffs: PathBuf) -> Self {
        Self::with_map_reader(bpffs, Box::new(read_maps))
    }

    /// [`Ops::new`] with another map reader (tests count the reads).
    pub fn with_map_reader(bpffs: PathBuf, map_reader: MapReader) -> Self {
        let mut registry = Registry::with_prefix("lb");
        let datapath = Family::<CounterLabel, Counter>::default();
        registry.register(
            "datapath_events",
            "Datapath events by reason (per-CPU counters summed)",
            datapath.clone(),
        );
        let map_entries = Family::<MapLabel, Gauge>::default();
        registry.register(
            "map_entries",
            "Entries in each BPF map",
            map_entries.clone(),
        );
        let map_capacity = Family::<MapLabel, Gauge>::default();
        registry.register(
            "map_capacity",
            "Capacity of each BPF map",
            map_capacity.clone(),
        );
        let map_memory = Family::<MapLabel, Gauge>::default();
        registry.register(
            "map_memory_bytes",
            "Kernel memory of each BPF map (its memlock charge), by pinned name",
            map_memory.clone(),
        );
        let not_fitting = Family::<MapLabel, Gauge>::default();
        registry.register(
            "service_ports_not_fitting",
            "Service ports not programmed because the named map has no room for them (oldest Services are served first)",
            not_fitting.clone(),
        );
        let deferred = Gauge::default();
        registry.register(
            "frontends_deferred",
            "Frontends left as they were at the last sync because a map had no room (tried again at the next)",
            deferred.clone(),
        );
        let programming_latency = Histogram::new(exponential_buckets(0.001, 2.5, 14));
        registry.register(
            "network_programming_duration_seconds",
            "From an EndpointSlice change (its endpoints.kubernetes.io/last-change-trigger-time) to the maps holding it (kube-proxy's network_programming_duration_seconds)",
            programming_latency.clone(),
        );
        let service_changes = Counter::default();
        registry.register(
            "sync_proxy_rules_service_changes",
            "Services added, removed or modified in the snapshots applied (kube-proxy's sync_proxy_rules_service_changes_total)",
            service_changes.clone(),
        );
        let endpoint_changes = Counter::default();
        registry.register(
            "sync_proxy_rules_endpoint_changes",
            "EndpointSlices added, removed or modified in the snapshots applied (kube-proxy's sync_proxy_rules_endpoint_changes_total)",
            endpoint_changes.clone(),
        );
        let service_changes_pending = Gauge::default();
        registry.register(
            "sync_proxy_rules_service_changes_pending",
            "Service changes seen and not yet in the maps (a failed sync keeps them)",
            service_changes_pending.clone(),
        );
        let endpoint_changes_pending = Gauge::default();
        registry.register(
            "sync_proxy_rules_endpoint_changes_pending",
            "EndpointSlice changes seen and not yet in the maps (a failed sync keeps them)",
            endpoint_changes_pending.clone(),
        );
        let build_info = Family::<BuildLabel, Gauge>::default();
        registry.register(
            "build_info",
            "1, labelled with the agent's version",
            build_info.clone(),
        );
        build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register(
            "sync_duration_seconds",
            "Time to apply one change to the maps",
            sync_duration.clone(),
        );
        let map_writes = Counter::default();
        registry.register("map_writes", "Map writes by the sync", map_writes.clone());
        let sync_errors = Counter::default();
        registry.register("sync_errors", "Syncs that failed", sync_errors.clone());
        let watch_restarts = Counter::default();
        registry.register(
            "watch_restarts",
            "Kubernetes watch errors (each re-lists)",
            watch_restarts.clone(),
        );
        let last_sync = Gauge::default();
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last successful sync",
            last_sync.clone(),
        );
        let local_endpoints = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "service_local_endpoints",
            "Ready local endpoints of LoadBalancer Services with externalTrafficPolicy Local",
            local_endpoints.clone(),
        );
        let topology_hints_unusable = Family::<ServicePortLabel, Gauge>::default();
        registry.register(
            "service_topology_hints_unusable",
            "Per Service port whose ready endpoints carry topology hints: 1 while the hints cannot be used on this node (some endpoints without hints, none for this node or zone, or no zone label) and the whole cluster's endpoints serve, 0 while they are used",
            topology_hints_unusable.clone(),
        );
        let device_hook = Family::<DeviceHookLabel, Gauge>::default();
        registry.register(
            "device_hook",
            "1 for the program that does north-south translation on each --device: xdp or tc (tc ingress)",
            device_hook.clone(),
        );
        let interface_hooked = Family::<InterfaceLabel, Gauge>::default();
        registry.register(
            "interface_hooked",
            "1 for each of the node's other interfaces (up, IPv4 address, not a --device) that runs the tc ingress and egress programs",
            interface_hooked.clone(),
        );
        let masquerade_local = Gauge::default();
        registry.register(
            "masquerade_local_backends",
            "1 when externalTrafficPolicy Cluster traffic to local backends is masqueraded (an interface with a route runs no program of ours)",
            masquerade_local.clone(),
        );
        let service_packets = Family::<ServicePortLabel, Counter>::default();
        registry.register(
            "service_packets",
            "Packets of a Service port through the XDP path",
            service_packets.clone(),
        );
        let service_bytes = Family::<ServicePortLabel, Counter>::default();
        registry.register(
            "service_bytes",
            "Bytes of a Service port through the XDP path",
            service_bytes.clone(),
        );
        let service_new = Family::<ServicePortLabel, Counter>::default();
        registry.register(
            "service_new_connections",
            "New connections (flows, sockets) to a Service port",
            service_new.clone(),
        );
        let service_drops = Family::<ServiceDropLabel, Counter>::default();
        registry.register(
            "service_drops",
            "Connections or packets of a Service port refused or dropped, by reason",
            service_drops.clone(),
        );
        let ct_gc_sweeps = Counter::default();
        registry.register(
            "conntrack_gc_sweeps",
            "Conntrack garbage-collection sweeps completed",
            ct_gc_sweeps.clone(),
        );
        let ct_gc_errors = Counter::default();
        registry.register(
            "conntrack_gc_errors",
            "Conntrack garbage-collection sweeps that failed",
            ct_gc_errors.clone(),
        );
        let ct_gc_removed = Counter::default();
        registry.register(
            "conntrack_gc_removed_entries",
            "Conntrack entries of expired flows removed by the sweeps (both directions, both tiers)",
            ct_gc_removed.clone(),
        );
        let ct_gc_duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "conntrack_gc_duration_seconds",
            "Time one conntrack sweep took",
            ct_gc_duration.clone(),
        );
        let ct_gc_last_duration = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "conntrack_gc_last_duration_seconds",
            "Time the last conntrack sweep took",
            ct_gc_last_duration.clone(),
        );
        let ct_gc_interval = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "conntrack_gc_interval_seconds",
            "Time between the starts of two conntrack sweeps (--ct-gc-interval)",
            ct_gc_interval.clone(),
        );
        let ct_entries = Family::<TierLabel, Gauge>::default();
        registry.register(
            "conntrack_entries",
            "Conntrack entries per tier (established, new) after the last sweep",
            ct_entries.clone(),
        );
        let ct_udp_flushed = Counter::default();
        registry.register(
            "conntrack_udp_flushed_entries",
            "UDP conntrack entries removed because their backend left the Service port",
            ct_udp_flushed.clone(),
        );
        let sock_term_supported = Gauge::default();
        registry.register(
            "socket_termination_supported",
            "1 when the kernel lets the agent terminate sockets connected to removed backends (bpf_sock_destroy, Linux >= 6.5)",
            sock_term_supported.clone(),
        );
        let sock_term_passes = Counter::default();
        registry.register(
            "socket_termination_passes",
            "Walks of the node's sockets for sockets connected to removed backends",
            sock_term_passes.clone(),
        );
        let sock_term_errors = Counter::default();
        registry.register(
            "socket_termination_errors",
            "Socket termination passes that failed",
            sock_term_errors.clone(),
        );
        let sock_term_sockets = Family::<ResultLabel, Counter>::default();
        registry.register(
            "socket_termination_sockets",
            "Sockets connected to removed backends, by result: terminated, failed (the kernel refused), gone (closed or reconnected before the walk)",
            sock_term_sockets.clone(),
        );
        Self {
            sock_term_supported,
            sock_term_passes,
            sock_term_errors,
            sock_term_sockets,
            ct_gc_sweeps,
            ct_gc_errors,
            ct_gc_removed,
            ct_gc_duration,
            ct_gc_last_duration,
            ct_gc_interval,
            ct_entries,
            ct_udp_flushed,
            service_packets,
            service_bytes,
            service_new,
            service_drops,
            service_ports: Mutex::default(),
            service_seen: Mutex::default(),
            registry,
            bpffs,
            datapath,
            datapath_seen: Mutex::default(),
            map_entries,
            map_capacity,
            map_memory,
            not_fitting,
            deferred,
            programming_latency,
            service_changes,
            endpoint_changes,
            service_changes_pending,
            endpoint_changes_pending,
            sync_duration,
            map_writes,
            sync_errors,
            watch_restarts,
            last_sync,
            local_endpoints,
            device_hook,
            interface_hooked,
            masquerade_local,
            local_seen: Mutex::default(),
            topology_hints_unusable,
            hints_seen: Mutex::default(),
            programmed: AtomicBool::new(false),
            node_eligible: AtomicBool::new(true),
            pending_since: AtomicU64::new(0),
            pins_lost: AtomicBool::new(false),
            heartbeat: AtomicU64::new(now_s()),
            map_reader,
            map_read_interval: MAP_READ_INTERVAL,
            maps_read_at: Mutex::new(None),
        }
    }

    /// Reads the maps at most once per `interval` (default [`MAP_READ_INTERVAL`]; tests that
    /// compare two scrapes across a change use zero).
    pub fn with_map_read_interval(mut self, interval: Duration) -> Self {
        self.map_read_interval = interval;
        self
    }

    /// The other interfaces hooked (`lb_interface_hooked{interface} 1`) and whether local
    /// backends of externalTrafficPolicy Cluster get the masquerade.
    pub fn other_interfaces<'a>(&self, hooked: impl IntoIterator<Item = &'a str>, masq: bool) {
        self.interface_hooked.clear();
        for interface in hooked {
            self.interface_hooked
                .get_or_create(&InterfaceLabel {
                    interface: interface.into(),
                })
                .set(1);
        }
        self.masquerade_local.set(masq as i64);
    }

    /// The north-south hook attached on each device (`lb_device_hook{device,hook} 1`).
    pub fn device_hooks<'a>(
        &self,
        hooks: impl IntoIterator<Item = (&'a str, crate::dataplane::links::Hook)>,
    ) {
        self.device_hook.clear();
        for (device, hook) in hooks {
            self.device_hook
                .get_or_create(&DeviceHookLabel {
                    device: device.into(),
                    hook: hook.as_str().into(),
                })
                .set(1);
        }
    }

    /// The agent's loop is alive.
    pub fn heartbeat(&self) {
        self.heartbeat.store(now_s(), Ordering::Relaxed);
    }

    /// An update (a new snapshot) waits for the maps; the oldest waiting one counts.
    pub fn queued(&self) {
        let _ = self.pending_since.compare_exchange(
            0,
            now_s().max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A sync succeeded: nothing waits any more.
    pub fn synced(&self, took: Duration, writes: u64) {
        self.sync_duration.observe(took.as_secs_f64());
        self.map_writes.inc_by(writes);
        self.last_sync.set(now_s() as i64);
        self.pending_since.store(0, Ordering::Relaxed);
    }

    /// Whether this node may receive load-balanced traffic (`health_check::node_eligible`).
    pub fn node_eligible(&self, yes: bool) {
        self.node_eligible.store(yes, Ordering::Relaxed);
    }

    /// The programs are attached (after the first successful sync).
    pub fn attached(&self) {
        self.programmed.store(true, Ordering::Relaxed);
    }

    /// UDP conntrack entries a sync flushed (backends that left their Service port).
    /// Service ports `capacity::fit` left out, counted per map that had no room.
    pub fn not_fitting(&self, rejected: &[crate::control::model::Rejected]) {
        for map in lb_common::map_name::ALL {
            let n = rejected
                .iter()
                .filter(|r| crate::dataplane::capacity::rejected_map(r) == Some(map))
                .count();
            let l = MapLabel { map: map.into() };
            if n > 0 || self.not_fitting.get(&l).is_some() {
                self.not_fitting.get_or_create(&l).set(n as i64);
            }
        }
    }

    /// Changes of a snapshot about to be applied (pending until [`Ops::changes_applied`]).
    pub fn changes_seen(&self, services: u64, endpoint_slices: u64) {
        self.service_changes_pending.inc_by(services as i64);
        self.endpoint_changes_pending.inc_by(endpoint_slices as i64);
    }

    /// The pending changes are in the maps, as of `at`; `triggers`: the trigger times of the
    /// EndpointSlices among them.
    pub fn changes_applied(&self, at: SystemTime, triggers: &[SystemTime]) {
        self.service_changes
            .inc_by(self.service_changes_pending.get().max(0) as u64);
        self.endpoint_changes
            .inc_by(self.endpoint_changes_pending.get().max(0) as u64);
        self.service_changes_pending.set(0);
        self.endpoint_changes_pending.set(0);
        for t in triggers {
            if let Ok(d) = at.duration_since(*t) {
                self.programming_latency.observe(d.as_secs_f64());
            }
        }
    }

    /// Frontends the last sync left as they were for want of room.
    pub fn deferred(&self, frontends: usize) {
        self.deferred.set(frontends as i64);
    }

    pub fn udp_flows_flushed(&self, entries: u64) {
        self.ct_udp_flushed.inc_by(entries);
    }

    /// The conntrack sweeps start, one every `interval`.
    pub fn ct_gc_started(&self, interval: Duration) {
        self.ct_gc_interval.set(interval.as_secs_f64());
    }

    /// One conntrack sweep completed.
    pub fn ct_swept(&self, st: &crate::dataplane::ct_gc::SweepStats) {
        self.ct_gc_sweeps.inc();
        self.ct_gc_removed.inc_by(st.removed);
        self.ct_gc_duration.observe(st.duration.as_secs_f64());
        self.ct_gc_last_duration.set(st.duration.as_secs_f64());
        for (tier, n) in [
            ("established", st.established_entries),
            ("new", st.new_entries),
        ] {
            self.ct_entries
                .get_or_create(&TierLabel { tier: tier.into() })
                .set(n as i64);
        }
    }

    /// Whether sockets to removed backends can be terminated on this kernel.
    pub fn socket_termination_supported(&self, yes: bool) {
        self.sock_term_supported.set(yes as i64);
    }

    /// One socket termination pass completed.
    pub fn sockets_terminated(&self, out: &crate::dataplane::sock_term::Outcome) {
        self.sock_term_passes.inc();
        for (result, n) in [
            ("terminated", out.terminated),
            ("failed", out.failed),
            ("gone", out.gone),
        ] {
            self.sock_term_sockets
                .get_or_create(&ResultLabel {
                    result: result.into(),
                })
                .inc_by(n);
        }
    }

    /// A socket termination pass failed.
    pub fn socket_termination_failed(&self) {
        self.sock_term_errors.inc();
    }

    /// A conntrack sweep failed.
    pub fn ct_gc_failed(&self) {
        self.ct_gc_errors.inc();
    }

    /// The pin directory lost this agent's pins (the programs are detached): health answers
    /// 503 from now on, so that the liveness probe restarts the agent, which pins afresh.
    pub fn pins_lost(&self) {
        self.pins_lost.store(true, Ordering::Relaxed);
    }

    /// A sync failed: its update still waits (the loop retries it).
    pub fn sync_failed(&self) {
        self.sync_errors.inc();
        self.queued();
    }

    /// Sets the watch-restart counter to the source's running total.
    pub fn watch_restarts(&self, total: u64) {
        let now = self.watch_restarts.get();
        if total > now {
            self.watch_restarts.inc_by(total - now);
        }
    }

    pub fn local_endpoints(&self, entries: &BTreeMap<u16, HealthEntry>) {
        let mut seen = self.local_seen.lock().expect("ops lock");
        for l in seen.drain(..) {
            self.local_endpoints.remove(&l);
        }
        for e in entries.values() {
            let l = ServiceLabel {
                namespace: e.namespace.clone(),
                name: e.name.clone(),
            };
            self.local_endpoints
                .get_or_create(&l)
                .set(e.local_endpoints as i64);
            seen.push(l);
        }
    }

    /// Per Service port of the plan whose endpoints carry topology hints: whether this node can
    /// use them (Service ports without hints have no series).
    pub fn topology_hints<'a>(
        &self,
        services: impl IntoIterator<Item = &'a crate::control::plan::ServicePortPlan>,
    ) {
        use crate::control::plan::TopologyHints;
        let mut now = BTreeMap::new();
        for sp in services {
            let unusable = match sp.topology_hints {
                TopologyHints::Absent => continue,
                TopologyHints::Used => 0,
                TopologyHints::Unusable => 1,
            };
            let l = ServicePortLabel {
                namespace: sp.namespace.clone(),
                name: sp.name.clone(),
                port: sp.port_name.clone(),
                protocol: format!("{:?}", sp.protocol),
                ip_family: "IPv4".into(),
            };
            now.insert(l, unusable);
        }
        // Series of Service ports that lost their hints (or left) go; the others are set in
        // place, so that a scrape never misses a series that stays.
        let mut seen = self.hints_seen.lock().expect("ops lock");
        for l in seen.iter().filter(|l| !now.contains_key(*l)) {
            self.topology_hints_unusable.remove(l);
        }
        for (l, v) in &now {
            self.topology_hints_unusable.get_or_create(l).set(*v);
        }
        *seen = now.into_keys().collect();
    }

    /// The Service-port ids the sync assigned (for the per-Service metrics' labels).
    pub fn service_ports(&self, ports: &std::collections::HashMap<String, u32>) {
        *self.service_ports.lock().expect("ops lock") =
            ports.iter().map(|(k, v)| (*v, k.clone())).collect();
    }

    /// Reads the pinned maps into the datapath and occupancy metrics, unless they were read less
    /// than [`MAP_READ_INTERVAL`] ago.
    fn refresh(&self) {
        let mut read_at = self.maps_read_at.lock().expect("ops lock");
        if read_at.is_some_and(|t| t.elapsed() < self.map_read_interval) {
            return;
        }
        let readings = (self.map_reader)(&self.bpffs);
        self.apply(readings);
        *read_at = Some(Instant::now());
    }

    fn apply(&self, readings: MapReadings) {
        if let Some(stats) = readings.service_stats {
            let names = self.service_ports.lock().expect("ops lock");
            let mut seen = self.service_seen.lock().expect("ops lock");
            for (id, c) in stats {
                let Some(l) = names.get(&id).and_then(|n| service_port_label(n)) else {
                    continue;
                };
                let drop_label = |reason: &str| ServiceDropLabel {
                    namespace: l.namespace.clone(),
                    name: l.name.clone(),
                    port: l.port.clone(),
                    protocol: l.protocol.clone(),
                    ip_family: l.ip_family.clone(),
                    reason: reason.into(),
                };
                let mut bump = |field: u8, now: u64, counter: &Counter| {
                    let before = seen.insert((id, field), now).unwrap_or(0);
                    counter.inc_by(now.saturating_sub(before));
                };
                bump(0, c.packets, &self.service_packets.get_or_create(&l));
                bump(1, c.bytes, &self.service_bytes.get_or_create(&l));
                bump(2, c.new_connections, &self.service_new.get_or_create(&l));
                bump(
                    3,
                    c.drops_no_backend,
                    &self.service_drops.get_or_create(&drop_label("no_backend")),
                );
                bump(
                    4,
                    c.drops_other,
                    &self.service_drops.get_or_create(&drop_label("other")),
                );
                bump(
                    5,
                    c.drops_source_range,
                    &self
                        .service_drops
                        .get_or_create(&drop_label("source_range")),
                );
            }
        }
        if let Some(counters) = readings.counters {
            let mut seen = self.datapath_seen.lock().expect("ops lock");
            for c in counters {
                let before = seen.insert(c.name.to_string(), c.packets).unwrap_or(0);
                let label = CounterLabel {
                    counter: c.name.to_string(),
                };
                // Counters only grow; a map re-created under us restarts from zero.
                self.datapath
                    .get_or_create(&label)
                    .inc_by(c.packets.saturating_sub(before));
            }
        }
        if let Some(maps) = readings.occupancy {
            for m in maps {
                let l = MapLabel {
                    map: m.map.to_string(),
                };
                self.map_entries.get_or_create(&l).set(m.entries as i64);
                self.map_capacity.get_or_create(&l).set(m.capacity as i64);
            }
        }
        if let Some(maps) = readings.memory {
            for (map, bytes) in maps {
                let l = MapLabel { map: map.into() };
                self.map_memory.get_or_create(&l).set(bytes as i64);
            }
        }
    }

    /// `GET /metrics`.
    pub fn metrics(&self) -> Response {
        self.refresh();
        let mut body = String::new();
        let status = match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
            Ok(()) => "200 OK",
            Err(_) => "500 Internal Server Error",
        };
        // The process metrics every Prometheus client exposes, unprefixed, before the end mark.
        if let Some(head) = body.strip_suffix("# EOF\n") {
            body = format!("{head}{}# EOF\n", Self::process_metrics());
        }
        Response {
            status,
            headers: vec![(
                "Content-Type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8".into(),
            )],
            body,
        }
    }

    /// `process_*` as Prometheus' client libraries name them, from /proc/self.
    pub fn process_metrics() -> String {
        let mut out = String::new();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let f: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
        let boot = std::fs::read_to_string("/proc/stat")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        let mut metric = |name: &str, kind: &str, help: &str, sample: &str, v: Option<f64>| {
            if let Some(v) = v {
                out.push_str(&format!(
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{sample} {v}\n"
                ));
            }
        };
        // (Fields from index 0 = state: utime 11, stime 12, starttime 19, vsize 20, rss 21.)
        metric(
            "process_cpu_seconds",
            "counter",
            "Total user and system CPU time spent in seconds.",
            "process_cpu_seconds_total",
            num(11).zip(num(12)).map(|(u, s)| (u + s) / ticks),
        );
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            "process_resident_memory_bytes",
            num(21).map(|p| p * page),
        );
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            "process_virtual_memory_bytes",
            num(20),
        );
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            "process_start_time_seconds",
            num(19).zip(boot).map(|(t, b)| b + t / ticks),
        );
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            "process_open_fds",
            std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as f64),
        );
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into a struct we own.
        let max_fds = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0)
            .then_some(lim.rlim_cur as f64);
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            "process_max_fds",
            max_fds,
        );
        out
    }

    /// `/livez`'s verdict: the loop goes round, no update waits too long, the pins are there.
    fn live(&self, now: u64) -> bool {
        let beat = self.heartbeat.load(Ordering::Relaxed);
        let pending = self.pending_since.load(Ordering::Relaxed);
        !self.pins_lost.load(Ordering::Relaxed)
            && now.saturating_sub(beat) < STALE_AFTER.as_secs()
            && (pending == 0 || now.saturating_sub(pending) < STALE_AFTER.as_secs())
    }

    /// kube-proxy's `serviceProxyHealthy` of the healthCheckNodePorts: live and programmed
    /// (`/healthz` without the node's eligibility).
    pub fn proxy_healthy(&self) -> bool {
        self.live(now_s()) && self.programmed.load(Ordering::Relaxed)
    }

    /// `GET /healthz` (`ready`: also programmed and the node eligible, with `nodeEligible` in
    /// the body, as kube-proxy's) or `/livez`.
    pub fn health(&self, ready: bool) -> Response {
        let now = now_s();
        let eligible = self.node_eligible.load(Ordering::Relaxed);
        let healthy =
            self.live(now) && (!ready || (self.programmed.load(Ordering::Relaxed) && eligible));
        let mut body = serde_json::json!({
            "lastUpdated": self.last_sync.get(),
            "currentTime": now,
            "healthy": healthy,
        });
        if ready {
            body["nodeEligible"] = eligible.into();
        }
        let body = body.to_string();
        Response {
            status: if healthy {
                "200 OK"
            } else {
                "503 Service Unavailable"
            },
            headers: vec![
                ("Content-Type", "application/json".into()),
                ("X-Content-Type-Options", "nosniff".into()),
            ],
            body,
        }
    }

    /// Routes a path of `--metrics-addr`: `/metrics` only.
    pub fn metrics_route(&self, path: &str) -> Option<Response> {
        (path == "/metrics").then(|| self.metrics())
    }

    /// Routes a path of `--health-addr`: `/healthz` and `/livez` only.
    pub fn health_route(&self, path: &str) -> Option<Response> {
        match path {
            "/healthz" => Some(self.health(true)),
            "/livez" => Some(self.health(false)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{SocketAddr, TcpListener},
        sync::Arc,
    };

    use super::*;
    use crate::agent::http::{
        self,
        tests::{get, hogs},
        Work,
    };

    /// A Service port's identity in the maps names its family's series: the IPv6 family's
    /// (`/IPv6` after it) counts apart from the IPv4 one's, with the same other labels.
    #[test]
    fn each_family_of_a_service_port_has_its_own_series() {
        let v4 = service_port_label("shop/web:http/TCP").unwrap();
        let v6 = service_port_label("shop/web:http/TCP/IPv6").unwrap();
        assert_eq!(
            (
                v4.namespace.as_str(),
                v4.name.as_str(),
                v4.port.as_str(),
                v4.protocol.as_str()
            ),
            ("shop", "web", "http", "TCP")
        );
        assert_eq!(
            (v6.namespace, v6.name, v6.port, v6.protocol),
            (
                v4.namespace.clone(),
                v4.name.clone(),
                v4.port.clone(),
                v4.protocol.clone()
            )
        );
        assert_eq!(
            (v4.ip_family.as_str(), v6.ip_family.as_str()),
            ("IPv4", "IPv6")
        );
        assert!(service_port_label("garbage").is_none());
    }

    fn code(r: Option<Response>) -> u16 {
        r.expect("routed").code()
    }

    #[test]
    fn healthz_needs_programmed_and_fresh_livez_a_live_loop() {
        let ops = Ops::new(PathBuf::from("/nonexistent"));
        // Starting: alive, not programmed.
        assert_eq!(code(ops.health_route("/healthz")), 503);
        assert_eq!(code(ops.health_route("/livez")), 200);
        assert!(!ops.proxy_healthy());
        ops.queued();
        ops.synced(Duration::from_millis(1), 10);
        // Synced but not attached yet.
        assert_eq!(code(ops.health_route("/healthz")), 503);
        ops.attached();
        assert_eq!(code(ops.health_route("/healthz")), 200);
        assert_eq!(code(ops.health_route("/livez")), 200);
        assert!(ops.proxy_healthy());
        // A failed sync is retried: healthy while its update is recent...
        ops.sync_failed();
        assert_eq!(code(ops.health_route("/healthz")), 200);
        // ... not once it has waited longer than STALE_AFTER.
        ops.pending_since
            .store(now_s() - STALE_AFTER.as_secs(), Ordering::Relaxed);
        assert_eq!(code(ops.health_route("/healthz")), 503);
        assert_eq!(code(ops.health_route("/livez")), 503);
        assert!(!ops.proxy_healthy());
        // A new update does not reset the oldest one's age; a successful sync does.
        ops.queued();
        assert_eq!(code(ops.health_route("/livez")), 503);
        ops.synced(Duration::from_millis(1), 0);
        assert_eq!(code(ops.health_route("/healthz")), 200);
        let v: serde_json::Value =
            serde_json::from_str(&ops.health_route("/healthz").unwrap().body).unwrap();
        assert_eq!(v["healthy"], true);
        assert!(v["lastUpdated"].as_i64().unwrap() > 0);
        assert!(v["currentTime"].as_u64().unwrap() > 0);
        // A loop that stopped going round is neither live nor healthy.
        ops.heartbeat
            .store(now_s() - STALE_AFTER.as_secs() - 1, Ordering::Relaxed);
        assert_eq!(code(ops.health_route("/livez")), 503);
        assert_eq!(code(ops.health_route("/healthz")), 503);
        ops.heartbeat();
        assert_eq!(code(ops.health_route("/livez")), 200);
        // A node being deleted: not ready (load balancers drain it), still live; the health
        // check ports' serviceProxyHealthy ignores it, as kube-proxy's.
        ops.node_eligible(false);
        assert_eq!(code(ops.health_route("/healthz")), 503);
        assert_eq!(code(ops.health_route("/livez")), 200);
        assert!(ops.proxy_healthy());
        let v: serde_json::Value =
            serde_json::from_str(&ops.health_route("/healthz").unwrap().body).unwrap();
        assert_eq!(v["nodeEligible"], false);
        ops.node_eligible(true);
        assert_eq!(code(ops.health_route("/healthz")), 200);
        // Lost pins: 503 on both, for good.
        ops.pins_lost();
        assert_eq!(code(ops.health_route("/livez")), 503);
        assert_eq!(code(ops.health_route("/healthz")), 503);
        // Each address its own paths.
        assert!(ops.health_route("/metrics").is_none());
        assert!(ops.health_route("/other").is_none());
        assert!(ops.metrics_route("/healthz").is_none());
        assert!(ops.metrics_route("/livez").is_none());
        // Metrics encode even without maps to read.
        let m = ops.metrics_route("/metrics").unwrap();
        assert!(m.body.contains("lb_map_writes_total 10"), "{}", m.body);
        assert!(m.body.contains("lb_sync_errors_total 1"), "{}", m.body);
    }

    /// One series per Service port with hints: 1 unusable, 0 used; none without hints, and a
    /// Service port that loses its hints loses its series.
    #[test]
    fn topology_hints_unusable_per_service_port_with_hints() {
        use crate::control::model::{Protocol, TrafficPolicy};
        use crate::control::plan::{ServicePortPlan, TopologyHints};
        let sp = |name: &str, hints| ServicePortPlan {
            namespace: "default".into(),
            name: name.into(),
            port_name: "http".into(),
            protocol: Protocol::TCP,
            family: crate::control::model::IpFamily::IPv4,
            frontends: Vec::new(),
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_traffic_policy: None,
            cluster_endpoints: Some(Vec::new()),
            local_endpoints: None,
            session_affinity_timeout_seconds: None,
            health_check_node_port: None,
            has_endpoints: true,
            topology_hints: hints,
            source_ranges: None,
            source_ranges_allow_node: false,
            created: None,
        };
        let ops = Ops::with_map_reader(
            PathBuf::from("/nonexistent"),
            Box::new(|_| MapReadings::default()),
        );
        let series = |ops: &Ops| -> Vec<String> {
            ops.metrics_route("/metrics")
                .unwrap()
                .body
                .lines()
                .filter(|l| l.starts_with("lb_service_topology_hints_unusable{"))
                .map(str::to_string)
                .collect()
        };
        ops.topology_hints(&[
            sp("a", TopologyHints::Used),
            sp("b", TopologyHints::Unusable),
            sp("c", TopologyHints::Absent),
        ]);
        let mut got = series(&ops);
        got.sort();
        assert_eq!(
            got,
            [
                r#"lb_service_topology_hints_unusable{namespace="default",name="a",port="http",protocol="TCP",ip_family="IPv4"} 0"#,
                r#"lb_service_topology_hints_unusable{namespace="default",name="b",port="http",protocol="TCP",ip_family="IPv4"} 1"#,
            ]
        );
        ops.topology_hints(&[
            sp("a", TopologyHints::Unusable),
            sp("b", TopologyHints::Absent),
        ]);
        assert_eq!(
            series(&ops),
            [
                r#"lb_service_topology_hints_unusable{namespace="default",name="a",port="http",protocol="TCP",ip_family="IPv4"} 1"#
            ]
        );
    }

    /// kube-proxy's change and programming metrics, build info and the process metrics, in one
    /// well-formed exposition.
    #[test]
    fn change_programming_build_and_process_metrics() {
        let ops = Ops::with_map_reader(
            PathBuf::from("/nonexistent"),
            Box::new(|_| MapReadings::default()),
        );
        ops.changes_seen(2, 1);
        let body = ops.metrics_route("/metrics").unwrap().body;
        assert!(
            body.contains("lb_sync_proxy_rules_service_changes_pending 2\n"),
            "{body}"
        );
        assert!(
            body.contains("lb_sync_proxy_rules_service_changes_total 0\n"),
            "{body}"
        );
        let now = SystemTime::now();
        ops.changes_applied(now, &[now - Duration::from_millis(1500)]);
        let body = ops.metrics_route("/metrics").unwrap().body;
        for line in [
            "lb_sync_proxy_rules_service_changes_total 2\n",
            "lb_sync_proxy_rules_endpoint_changes_total 1\n",
            "lb_sync_proxy_rules_service_changes_pending 0\n",
            "lb_network_programming_duration_seconds_count 1\n",
            "lb_network_programming_duration_seconds_sum 1.5\n",
        ] {
            assert!(body.contains(line), "{line}: {body}");
        }
        assert!(body.contains(&format!(
            "lb_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        let value = |name: &str| -> f64 {
            body.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name}: {body}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_start_time_seconds") > 1.7e9);
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert!(body.ends_with("# EOF\n") && body.matches("# EOF").count() == 1);
    }

    #[test]
    fn scrapes_in_a_row_read_the_maps_once_per_interval() {
        let reads = Arc::new(AtomicU64::new(0));
        let r = reads.clone();
        let ops = Ops::with_map_reader(
            PathBuf::from("/nonexistent"),
            Box::new(move |_| {
                r.fetch_add(1, Ordering::Relaxed);
                MapReadings {
                    occupancy: Some(vec![crate::dataplane::read::MapOccupancy {
                        map: "conntrack",
                        entries: 7,
                        capacity: 9,
                    }]),
                    ..Default::default()
                }
            }),
        );
        for _ in 0..5 {
            let m = ops.metrics_route("/metrics").unwrap();
            assert!(
                m.body
                    .lines()
                    .any(|l| l == r#"lb_map_entries{map="conntrack"} 7"#),
                "{}",
                m.body
            );
        }
        assert_eq!(
            reads.load(Ordering::Relaxed),
            1,
            "one map walk for 5 scrapes"
        );
        // Health answers never read the maps.
        ops.health_route("/healthz");
        ops.health_route("/livez");
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        // Once the interval has passed, the next scrape reads again.
        *ops.maps_read_at.lock().unwrap() = Instant::now().checked_sub(MAP_READ_INTERVAL);
        ops.metrics_route("/metrics");
        assert_eq!(reads.load(Ordering::Relaxed), 2);
    }

    /// The agent's two operations addresses as `agent::run` serves them.
    fn serve(ops: &Arc<Ops>) -> (http::Server, http::Serving, http::Serving) {
        let server = http::Server::start().unwrap();
        let m = ops.clone();
        let metrics = server
            .serve(
                TcpListener::bind("127.0.0.1:0").unwrap(),
                Work::Blocking,
                Arc::new(move |p: &str| m.metrics_route(p)),
            )
            .unwrap();
        let h = ops.clone();
        let health = server
            .serve(
                TcpListener::bind("127.0.0.1:0").unwrap(),
                Work::Inline,
                Arc::new(move |p: &str| h.health_route(p)),
            )
            .unwrap();
        (server, metrics, health)
    }

    #[test]
    fn metrics_only_on_the_metrics_addr_health_only_on_the_health_addr() {
        let ops = Arc::new(Ops::new(PathBuf::from("/nonexistent")));
        ops.synced(Duration::from_millis(1), 3);
        ops.attached();
        let (_server, metrics, health) = serve(&ops);
        let (m, h): (SocketAddr, SocketAddr) = (metrics.local_addr(), health.local_addr());
        let (code, body) = get(m, "/metrics").unwrap();
        assert_eq!(code, 200);
        assert!(body.contains("lb_map_writes_total 3"), "{body}");
        assert_eq!(get(h, "/metrics").unwrap().0, 404);
        assert_eq!(get(h, "/healthz").unwrap().0, 200);
        assert_eq!(get(h, "/livez").unwrap().0, 200);
        assert_eq!(get(m, "/healthz").unwrap().0, 404);
        assert_eq!(get(m, "/livez").unwrap().0, 404);
    }

    #[test]
    fn healthz_answers_while_both_ports_are_hogged() {
        let ops = Arc::new(Ops::new(PathBuf::from("/nonexistent")));
        ops.synced(Duration::from_millis(1), 3);
        ops.attached();
        let (_server, metrics, health) = serve(&ops);
        let (m, h) = (metrics.local_addr(), health.local_addr());
        let _on_metrics = hogs(m, 100, "/metrics");
        let _on_health = hogs(h, 100, "/healthz");
        // Structural: a one-at-a-time server would be stuck on the slow client's endless head.
        for (addr, path) in [(h, "/healthz"), (h, "/livez"), (m, "/metrics")] {
            let started = Instant::now();
            let (code, body) = get(addr, path).unwrap();
            let took = started.elapsed();
            println!("{path} with 100 idle and 1 slow-writing connections on each port: {took:?}");
            assert_eq!(code, 200, "{body}");
            assert!(took < Duration::from_secs(5), "{took:?}");
        }
    }

    #[test]
    fn device_hook_is_one_per_device() {
        use crate::dataplane::links::Hook;
        let ops = Ops::new(PathBuf::from("/nonexistent"));
        ops.device_hooks([("eth0", Hook::Tc), ("eth1", Hook::Xdp)]);
        let body = ops.metrics_route("/metrics").unwrap().body;
        for want in [
            r#"lb_device_hook{device="eth0",hook="tc"} 1"#,
            r#"lb_device_hook{device="eth1",hook="xdp"} 1"#,
        ] {
            assert!(body.lines().any(|l| l == want), "{want}: {body}");
        }
        // A new set replaces the old one.
        ops.device_hooks([("eth0", Hook::Xdp)]);
        let body = ops.metrics_route("/metrics").unwrap().body;
        let hooks: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("lb_device_hook{"))
            .collect();
        assert_eq!(hooks, [r#"lb_device_hook{device="eth0",hook="xdp"} 1"#]);
    }
}
