//! Every map of the kernel side, in one place. Names and layouts come from `lb-common`.
use aya_ebpf::{
    macros::map,
    maps::{
        lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap,
        ProgramArray,
    },
};
use lb_common::{
    limits, Addr6, AffinityKey, AffinityValue, Backend, Config, Config6, Counter, CtKey, CtKey6,
    CtValue, CtValue6, FragKey, FragPorts, FrontendSlot, FrontendSlotKey, MaglevChunk, MaglevKey,
    MemberKey, RevNat, ServiceCounters, ServiceName, SockFlow, SockKey, SockKey6, SockRevNat,
    SockRevNat6, SourceRangeKey, SourceRangeKey6, MAGLEV_CHUNK,
};

/// `BPF_F_NO_PREALLOC`: entries are allocated when written (Maglev chunks are 1 KiB each).
const NO_PREALLOC: u32 = 1;

#[map(name = "lb_svc_v3")]
pub static FRONTENDS: HashMap<FrontendSlotKey, FrontendSlot> =
    HashMap::pinned(limits::FRONTEND_SLOTS, 0);

#[map(name = "lb_backend_v1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(limits::BACKENDS, 0);

#[map(name = "lb_revnat_v1")]
pub static REV_NAT: HashMap<u32, RevNat> = HashMap::pinned(limits::REV_NAT, 0);

#[map(name = "lb_sk_revnat_v1")]
pub static SOCK_REV_NAT: LruHashMap<SockKey, SockRevNat> =
    LruHashMap::pinned(limits::SOCK_REV_NAT, 0);

/// IPv6 address -> handle, and back (`map_name::ADDR6`): allocated on use, as a cluster without
/// IPv6 has none. Room for every backend and frontend address (the agent sizes them so).
#[map(name = "lb_addr6_v1")]
pub static ADDR6: HashMap<Addr6, u32> =
    HashMap::pinned(limits::BACKENDS + limits::REV_NAT, NO_PREALLOC);

#[map(name = "lb_addr6_id_v1")]
pub static ADDR6_IDS: HashMap<u32, Addr6> =
    HashMap::pinned(limits::BACKENDS + limits::REV_NAT, NO_PREALLOC);

#[map(name = "lb_sk_revnat6_v1")]
pub static SOCK_REV_NAT6: LruHashMap<SockKey6, SockRevNat6> =
    LruHashMap::pinned(limits::SOCK_REV_NAT6, 0);

#[map(name = "lb_sk_flow_v1")]
pub static SOCK_FLOW: LruHashMap<SockKey, SockFlow> = LruHashMap::pinned(limits::SOCK_FLOW, 0);

#[map(name = "lb_ct_v4")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(limits::CONNTRACK, 0);

#[map(name = "lb_ct_new_v3")]
pub static CONNTRACK_NEW: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(limits::CONNTRACK_NEW, 0);

/// The IPv6 conntrack's two tiers (the agent sizes them as the IPv4 ones).
#[map(name = "lb_ct6_v1")]
pub static CONNTRACK6: LruHashMap<CtKey6, CtValue6> = LruHashMap::pinned(limits::CONNTRACK, 0);

#[map(name = "lb_ct6_new_v1")]
pub static CONNTRACK6_NEW: LruHashMap<CtKey6, CtValue6> =
    LruHashMap::pinned(limits::CONNTRACK_NEW, 0);

/// A new IPv6 flow's conntrack entries while the IPv6 path builds them: too big for the
/// program's 512-byte stack beside everything else the path holds. Not pinned (scratch).
#[repr(C)]
pub struct NewFlow6 {
    /// The socket lookup's tuple of an SNAT candidate.
    pub sock: crate::flow::Tuple6,
    pub reply_key: CtKey6,
    pub choice: Choice6,
    pub entry: CtValue6,
    pub reply: CtValue6,
}

/// A new IPv6 flow's frontend and backend, as `north_south6::choose` left them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Choice6 {
    pub svc_port_id: u32,
    pub backend_id: u32,
    pub hash: u32,
    pub now: u32,
    pub flags: u16,
    pub snat: u8,
    pub _pad: u8,
}

#[map(name = "lb_newflow6")]
pub static NEW_FLOW6: PerCpuArray<NewFlow6> = PerCpuArray::with_max_entries(1, 0);

/// The IPv6 packet being translated and its conntrack key (parse6.rs), scratch like
/// [`NEW_FLOW6`].
#[repr(C)]
pub struct Packet6Scratch {
    pub p: crate::flow::Packet6,
    pub key: CtKey6,
}

#[map(name = "lb_packet6")]
pub static PACKET6: PerCpuArray<Packet6Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The IPv6 path's FIB lookup parameters (hook6.rs), scratch like [`NEW_FLOW6`].
#[map(name = "lb_fib6")]
pub static FIB6: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// Where `lb_xdp` and `lb_tc_ingress` hand IPv6 frames on (`map_name::XDP6_PROG`): slot 0
/// holds the IPv6 program, filled by the agent.
#[map(name = "lb_xdp6_prog_v1")]
pub static XDP6_PROG: ProgramArray = ProgramArray::pinned(1, 0);

#[map(name = "lb_tc6_prog_v1")]
pub static TC6_PROG: ProgramArray = ProgramArray::pinned(1, 0);

/// Where `lb_tc_egress` hands IPv6 frames on (`map_name::TCE6_PROG`).
#[map(name = "lb_tce6_prog_v1")]
pub static TCE6_PROG: ProgramArray = ProgramArray::pinned(1, 0);

#[map(name = "lb_frag_v1")]
pub static FRAGMENTS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(limits::FRAGMENTS, 0);

#[map(name = "lb_maglev_v1")]
pub static MAGLEV: HashMap<MaglevKey, MaglevChunk> =
    HashMap::pinned(limits::MAGLEV_CHUNKS, NO_PREALLOC);

#[map(name = "lb_affinity_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(limits::AFFINITY, 0);

#[map(name = "lb_member_v1")]
pub static MEMBERS: HashMap<MemberKey, u32> = HashMap::pinned(limits::MEMBERS, 0);

#[map(name = "lb_svc_stats_v2")]
pub static SERVICE_STATS: PerCpuHashMap<u32, ServiceCounters> =
    PerCpuHashMap::pinned(limits::SERVICE_STATS, 0);

/// Written and read by userspace only; declared here so that it is created and pinned with the
/// rest.
#[map(name = "lb_svc_names_v1")]
pub static SERVICE_NAMES: HashMap<u32, ServiceName> = HashMap::pinned(limits::SERVICE_STATS, 0);

/// loadBalancerSourceRanges by Service port (aya adds the `BPF_F_NO_PREALLOC` an LPM trie
/// requires).
#[map(name = "lb_srcrange_v1")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> = LpmTrie::pinned(limits::SOURCE_RANGES, 0);

/// loadBalancerSourceRanges of IPv6 frontends.
#[map(name = "lb_srcrange6_v1")]
pub static SOURCE_RANGES6: LpmTrie<SourceRangeKey6, u32> =
    LpmTrie::pinned(limits::SOURCE_RANGES6, 0);

#[map(name = "lb_config_v2")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "lb_config6_v2")]
pub static CONFIG6: Array<Config6> = Array::pinned(1, 0);

/// The route generation (`map_name::ROUTE_GEN`), moved on by the agent whenever a route,
/// address, link or neighbour changes: cached next hops of another generation are stale.
#[map(name = "lb_route_gen_v1")]
pub static ROUTE_GEN: Array<u32> = Array::pinned(1, 0);

/// This CPU's ICMP port unreachable answers in the current second (reject.rs).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RejectWindow {
    pub second: u32,
    pub sent: u32,
}

/// Not pinned: a rate limiter's state, which may start over whenever the programs are loaded.
#[map(name = "lb_reject_rate")]
pub static REJECT_RATE: PerCpuArray<RejectWindow> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "lb_stats_v6")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::pinned(lb_common::counter::COUNT, 0);

/// Adds one event of `bytes` bytes to counter `idx`.
#[inline(always)]
pub fn count(idx: u32, bytes: u64) {
    if let Some(c) = STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Looks up a service entry (master when `key.slot == 0`).
#[inline(always)]
pub fn service(key: &FrontendSlotKey) -> Option<FrontendSlot> {
    // SAFETY: the value is copied out before any other map operation.
    unsafe { FRONTENDS.get(key).copied() }
}

#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    // SAFETY: as above.
    unsafe { BACKENDS.get(id).copied() }
}

#[inline(always)]
pub fn config() -> Option<&'static Config> {
    // An array map's value lives as long as the map: a reference, not a copy on the stack.
    CONFIG.get(0).filter(|c| c.ready != 0)
}

/// The IPv6 half of the node's configuration, once the agent wrote it.
#[inline(always)]
pub fn config6() -> Option<&'static Config6> {
    CONFIG6.get(0).filter(|c| c.ready != 0)
}

/// The current route generation (0 until an agent sets one: cached next hops then only live
/// for `limits::NEXT_HOP_REVALIDATE_S`).
#[inline(always)]
pub fn route_gen() -> u32 {
    ROUTE_GEN.get(0).copied().unwrap_or(0)
}

/// Entry `hash % M` of a master's Maglev table: the backend id a new flow with this hash gets.
#[inline(always)]
pub fn maglev(master: &FrontendSlot, hash: u32) -> Option<u32> {
    if master.maglev_id == 0 || master.maglev_m == 0 {
        return None;
    }
    let idx = hash % master.maglev_m;
    let key = MaglevKey {
        table_id: master.maglev_id,
        chunk: idx / MAGLEV_CHUNK,
    };
    // SAFETY: as above.
    let chunk = unsafe { MAGLEV.get(key) }?;
    let id = chunk.backend_ids[(idx % MAGLEV_CHUNK) as usize & (MAGLEV_CHUNK as usize - 1)];
    (id != 0).then_some(id)
}

/// Whether `saddr_be` lies in one of the source ranges of Service port `svc_port_id` (one
/// longest-prefix lookup).
#[inline(always)]
pub fn source_in_ranges(svc_port_id: u32, saddr_be: u32) -> bool {
    let key = Key::new(
        SourceRangeKey::ID_BITS + 32,
        SourceRangeKey {
            svc_port_id,
            addr_be: saddr_be,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// Whether an IPv6 source lies in a Service port's IPv6 loadBalancerSourceRanges.
#[inline(always)]
pub fn source_in_ranges6(svc_port_id: u32, saddr: &Addr6) -> bool {
    let key = Key::new(
        SourceRangeKey::ID_BITS + 128,
        SourceRangeKey6 {
            svc_port_id,
            addr: *saddr,
        },
    );
    SOURCE_RANGES6.get(&key).is_some()
}

/// The handle of an IPv6 address the service maps mention (`map_name::ADDR6`).
#[inline(always)]
pub fn addr6_handle(addr: &Addr6) -> Option<u32> {
    // SAFETY: the value is copied out at once.
    unsafe { ADDR6.get(addr).copied() }
}

/// The IPv6 address of a handle.
#[inline(always)]
pub fn addr6_of(handle: u32) -> Option<Addr6> {
    // SAFETY: as above.
    unsafe { ADDR6_IDS.get(handle).copied() }
}

/// What a per-Service counter update adds.
#[derive(Clone, Copy)]
pub enum ServiceEvent {
    Packet(u64),
    NewConnection(u64),
    DropNoBackend,
    DropOther,
    DropSourceRange,
}

/// Adds a packet to the Service port's per-CPU counters when it has them already (its flow's
/// first packet created them): one lookup and no insert path on the established path.
#[inline(always)]
pub fn count_service_packet(svc_port_id: u32, len: u64) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(svc_port_id) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}

/// Adds an event to the Service port's per-CPU counters.
#[inline(always)]
pub fn count_service(svc_port_id: u32, ev: ServiceEvent) {
    if svc_port_id == 0 {
        return;
    }
    let mut p = SERVICE_STATS.get_ptr_mut(svc_port_id);
    if p.is_none() {
        // When the map refuses (full), the lookup below finds nothing and the event goes
        // uncounted for this Service port; the global counters still have it.
        let _ = SERVICE_STATS.insert(svc_port_id, ServiceCounters::default(), 0);
        p = SERVICE_STATS.get_ptr_mut(svc_port_id);
    }
    let Some(c) = p else { return };
    // SAFETY: per-CPU value, no concurrent writer on this CPU.
    unsafe {
        match ev {
            ServiceEvent::Packet(b) => {
                (*c).packets += 1;
                (*c).bytes += b;
            }
            ServiceEvent::NewConnection(b) => {
                (*c).new_connections += 1;
                if b > 0 {
                    (*c).packets += 1;
                    (*c).bytes += b;
                }
            }
            ServiceEvent::DropNoBackend => (*c).drops_no_backend += 1,
            ServiceEvent::DropOther => (*c).drops_other += 1,
            ServiceEvent::DropSourceRange => (*c).drops_source_range += 1,
        }
    }
}
