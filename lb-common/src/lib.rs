//! The ABI shared by the kernel programs (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Only `#[repr(C)]`, `Copy` plain-data types and constants live here. Rules:
//! - no `bool`, `Option` or data-carrying enum in a map key or value;
//! - padding is explicit and always zero (hash keys compare every byte);
//! - fields in network byte order end in `_be`: their in-memory bytes are the wire bytes
//!   (`addr_be` is `u32::from_ne_bytes(ip.octets())`, `port_be` is `port.to_be()`);
//! - each type's size is asserted at compile time;
//! - a layout change bumps the version suffix of the map's name, so an upgraded agent never
//!   misreads a map pinned by an older one.
#![no_std]

/// Names of the maps as pinned under `--bpffs` (at most 15 bytes: the kernel's object name limit).
pub mod map_name {
    /// The frontends' slots (the master entry and the backend slots of every frontend). The pin
    /// keeps its first name, `svc`: renaming a pinned map is a layout upgrade.
    pub const FRONTENDS: &str = "lb_svc_v3";
    pub const BACKENDS: &str = "lb_backend_v1";
    pub const REV_NAT: &str = "lb_revnat_v1";
    pub const SOCK_REV_NAT: &str = "lb_sk_revnat_v1";
    pub const SOCK_FLOW: &str = "lb_sk_flow_v1";
    pub const STATS: &str = "lb_stats_v6";
    pub const CONNTRACK: &str = "lb_ct_v4";
    /// Conntrack of flows not confirmed yet (TCP until the client acknowledged the backend's
    /// SYN-ACK, UDP before the first reply): a flood of new flows churns this map, never the
    /// established flows'.
    pub const CONNTRACK_NEW: &str = "lb_ct_new_v3";
    /// The route generation (one `u32`): the agent moves it on whenever a route, address,
    /// link or neighbour's link-layer address changes, which makes every cached next hop
    /// (`CtValue::nh`) stale.
    pub const ROUTE_GEN: &str = "lb_route_gen_v1";
    /// The ports of IPv4 datagrams whose first fragment was seen, for their later fragments.
    pub const FRAGMENTS: &str = "lb_frag_v1";
    pub const MAGLEV: &str = "lb_maglev_v1";
    pub const CONFIG: &str = "lb_config_v2";
    pub const AFFINITY: &str = "lb_affinity_v1";
    pub const MEMBERS: &str = "lb_member_v1";
    pub const SERVICE_STATS: &str = "lb_svc_stats_v2";
    pub const SERVICE_NAMES: &str = "lb_svc_names_v1";
    /// loadBalancerSourceRanges (LPM trie): (Service-port id, source prefix) of the Service
    /// ports whose LoadBalancer frontends only admit those sources.
    pub const SOURCE_RANGES: &str = "lb_srcrange_v1";
    /// loadBalancerSourceRanges of IPv6 frontends (LPM trie, [`crate::SourceRangeKey6`]).
    pub const SOURCE_RANGES6: &str = "lb_srcrange6_v1";
    /// IPv6 address -> its handle ([`crate::Addr6`] -> `u32`): every IPv6 address the service
    /// maps mention (frontends, backends) is interned as a 32-bit handle, which stands for it
    /// in the IPv4-sized keys and values of the frontends, backends and rev-NAT maps.
    pub const ADDR6: &str = "lb_addr6_v1";
    /// Handle -> IPv6 address, the other way round.
    pub const ADDR6_IDS: &str = "lb_addr6_id_v1";
    /// The socket rev-NAT map of IPv6 sockets ([`crate::SockKey6`] -> [`crate::SockRevNat6`]).
    pub const SOCK_REV_NAT6: &str = "lb_sk_revnat6_v1";
    /// The IPv6 north-south conntrack ([`crate::CtKey6`] -> [`crate::CtValue6`]), confirmed
    /// flows, and its new-flow tier: the IPv4 pair's twins.
    pub const CONNTRACK6: &str = "lb_ct6_v1";
    pub const CONNTRACK6_NEW: &str = "lb_ct6_new_v1";
    /// The IPv6 half of the node's configuration ([`crate::Config6`]).
    pub const CONFIG6: &str = "lb_config6_v2";
    /// Program arrays through which the XDP and tc ingress programs hand IPv6 frames to their
    /// IPv6 twins (`program_name::XDP6`, `program_name::TC_INGRESS6`) with a tail call: the
    /// IPv4 program stays within the verifier's budget, and each family's path is verified
    /// alone. Pinned, so that an agent that is down leaves them filled.
    pub const XDP6_PROG: &str = "lb_xdp6_prog_v1";
    pub const TC6_PROG: &str = "lb_tc6_prog_v1";
    /// The same for `lb_tc_egress` and `program_name::TC_EGRESS6`.
    pub const TCE6_PROG: &str = "lb_tce6_prog_v1";
    /// Every map the agent pins, for `uninstall` and for `lbctl`.
    pub const ALL: [&str; 27] = [
        FRONTENDS,
        BACKENDS,
        REV_NAT,
        SOCK_REV_NAT,
        SOCK_FLOW,
        STATS,
        CONNTRACK,
        CONNTRACK_NEW,
        CONFIG,
        AFFINITY,
        MEMBERS,
        SERVICE_STATS,
        SERVICE_NAMES,
        MAGLEV,
        FRAGMENTS,
        SOURCE_RANGES,
        ROUTE_GEN,
        SOURCE_RANGES6,
        ADDR6,
        ADDR6_IDS,
        SOCK_REV_NAT6,
        CONNTRACK6,
        CONNTRACK6_NEW,
        CONFIG6,
        XDP6_PROG,
        TC6_PROG,
        TCE6_PROG,
    ];

    /// Splits a pinned name into its base and layout version: `lb_ct_v2` -> (`lb_ct`, 2).
    pub fn split_version(name: &str) -> Option<(&str, u32)> {
        let (base, v) = name.rsplit_once("_v")?;
        let v = v.parse().ok()?;
        Some((base, v))
    }
}

/// Names of the programs in the object file (the function names of the entry points).
pub mod program_name {
    pub const CONNECT4: &str = "lb_connect4";
    pub const SENDMSG4: &str = "lb_sendmsg4";
    pub const RECVMSG4: &str = "lb_recvmsg4";
    pub const GETPEERNAME4: &str = "lb_getpeername4";
    /// The same four hooks for IPv4-mapped IPv6 socket addresses (`::ffff:a.b.c.d`).
    pub const CONNECT6: &str = "lb_connect6";
    pub const SENDMSG6: &str = "lb_sendmsg6";
    pub const RECVMSG6: &str = "lb_recvmsg6";
    pub const GETPEERNAME6: &str = "lb_getpeername6";
    pub const XDP: &str = "lb_xdp";
    /// Returns XDP_PASS only (benchmark floor; lets a veth peer accept XDP_TX frames).
    pub const XDP_PASS: &str = "lb_xdp_pass";
    pub const TC_EGRESS: &str = "lb_tc_egress";
    /// The north-south path at tc (TCX) ingress, for devices where XDP cannot deliver.
    pub const TC_INGRESS: &str = "lb_tc_ingress";
    /// The IPv6 north-south path, tail-called by `lb_xdp` and `lb_tc_ingress` for IPv6 frames
    /// (`map_name::XDP6_PROG`, `map_name::TC6_PROG`); never attached by itself.
    pub const XDP6: &str = "lb_xdp6";
    pub const TC_INGRESS6: &str = "lb_tc_ingress6";
    /// tc egress for IPv6 frames, tail-called by `lb_tc_egress` (`map_name::TCE6_PROG`).
    pub const TC_EGRESS6: &str = "lb_tc_egress6";
    /// Benchmark only (never attached by the agent): restores the frame of `lb_bench` before
    /// every BPF_PROG_TEST_RUN iteration, then runs the XDP path.
    pub const BENCH_XDP: &str = "lb_bench_xdp";
    /// Benchmark only: the same restore, then XDP_PASS (the restore's own cost).
    pub const BENCH_RESTORE: &str = "lb_bench_restore";
}

/// Per-CPU scratch maps of the IPv6 north-south path (its packet and conntrack key, a new
/// flow's entries, the FIB lookup's parameters): kernel-internal, not pinned.
pub const SCRATCH_MAPS: [&str; 3] = ["lb_packet6", "lb_newflow6", "lb_fib6"];

/// Name of the benchmark map (one [`BenchFrame`]); not pinned.
pub const BENCH_MAP: &str = "lb_bench";

/// Name of the per-CPU rate limiter of the datapath's ICMP port unreachable answers
/// (`limits::REJECTS_PER_SECOND`); not pinned: it may start over whenever the programs load.
pub const REJECT_RATE_MAP: &str = "lb_reject_rate";

/// Length of a benchmark frame (frames are padded to it): room for an IPv6 TCP segment with a
/// byte of payload (75 bytes), a multiple of 8 (the restore copies words).
pub const BENCH_FRAME_LEN: usize = 80;

/// What the benchmark programs write into the packet before each iteration.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    pub bytes: [u8; BENCH_FRAME_LEN],
    /// Non-zero: each iteration gets a new IPv4 source address (`base + seq`) and a source port
    /// in 32768..=49151 derived from `seq`, checksums fixed, so that every iteration is a new
    /// flow from a client with an ephemeral port. IPv4 frames only (IPv6 ones are restored as
    /// they are).
    pub vary_source: u32,
    /// Iterations so far (the next source offset).
    pub seq: u32,
}

/// Capacities of the maps. Memory per entry is key + value + the kernel's per-entry overhead.
pub mod limits {
    /// Devices running the XDP program that the datapath config lists as redirect targets
    /// (`Config::xdp_ifindexes`); more are reached through the stack.
    pub const XDP_DEVICES: usize = 8;
    /// Frontend slots: one master (slot 0) plus one per backend slot, for each frontend and scope.
    pub const FRONTEND_SLOTS: u32 = 262_144;
    /// Backends: one per distinct (address, port, protocol) endpoint.
    pub const BACKENDS: u32 = 131_072;
    /// Rev-NAT entries: one per frontend.
    pub const REV_NAT: u32 = 65_536;
    /// Socket rev-NAT (LRU): one per translated socket and backend, for recvmsg/getpeername.
    pub const SOCK_REV_NAT: u32 = 262_144;
    /// Socket rev-NAT of IPv6 sockets (LRU): one per translated IPv6 socket and backend.
    pub const SOCK_REV_NAT6: u32 = SOCK_REV_NAT / 4;
    /// loadBalancerSourceRanges entries of IPv6 Service ports.
    pub const SOURCE_RANGES6: u32 = 16_384;
    /// Largest IPv6 address handle (`map_name::ADDR6`): handles are `1..=ADDR6_HANDLE_MAX`, so
    /// as IPv4 addresses they lie in 0.0.0.0/8, which no packet or socket is addressed to.
    pub const ADDR6_HANDLE_MAX: u32 = (1 << 24) - 1;
    /// Per-socket UDP flow choice (LRU), so an unconnected UDP socket keeps its backend.
    pub const SOCK_FLOW: u32 = 262_144;
    /// Conntrack (LRU): two entries per confirmed north-south flow (original and reply direction).
    pub const CONNTRACK: u32 = 262_144;
    /// The longest a cached next hop (`CtValue::nh`) is used without a FIB lookup, in seconds,
    /// whatever the route generation says: changes the agent did not see (it was down) are
    /// picked up within this bound.
    pub const NEXT_HOP_REVALIDATE_S: u32 = 5;
    /// Conntrack of unconfirmed flows (LRU): two entries per flow between its first packet and its
    /// confirmation (TCP: the client's first ACK; UDP: the first reply).
    pub const CONNTRACK_NEW: u32 = 65_536;
    /// Maglev table chunks (allocated on use): `ceil(M / MAGLEV_CHUNK)` per distinct backend set
    /// of an external frontend.
    pub const MAGLEV_CHUNKS: u32 = 262_144;
    /// Session affinity records (LRU): one per (Service port, client). Under pressure the least
    /// recently used records are evicted (counted as `affinity_evictions` by lbctl).
    pub const AFFINITY: u32 = 262_144;
    /// Per-Service-port counters: one entry per Service port.
    pub const SERVICE_STATS: u32 = 65_536;
    /// Membership entries: one per backend slot, like the frontends map.
    pub const MEMBERS: u32 = 262_144;
    /// IPv4 datagrams in reassembly-free transit (LRU): one per fragmented datagram whose first
    /// fragment was seen, until its last fragment passed or the entry is evicted.
    pub const FRAGMENTS: u32 = 16_384;
    /// SNAT port candidates tried before a new flow is dropped as a collision.
    pub const SNAT_TRIES: u32 = 16;
    /// Sequence numbers a TCP FIN or RST may be away from the next one its sender was seen to
    /// owe, and still change the flow's state (an unscaled maximum window: stricter than Linux
    /// conntrack, which allows the receiver's scaled window).
    pub const TCP_SEQ_WINDOW: u32 = 65_535;
    /// loadBalancerSourceRanges entries: one per (Service port, source prefix), plus one per
    /// LoadBalancer IP of a Service port whose ranges hold a node address.
    pub const SOURCE_RANGES: u32 = 65_536;
    /// ICMP port unreachable messages (kube-proxy's REJECT for a Service without endpoints) the
    /// north-south path sends per second and CPU; beyond it new flows are dropped unanswered
    /// (`counter::REJECT_SUPPRESSED`). The kernel's own ICMP errors are limited alike
    /// (`net.ipv4.icmp_msgs_per_sec`, 1,000).
    pub const REJECTS_PER_SECOND: u32 = 1_000;
    /// Largest number of backends one Service frontend can have (slots are `u16`).
    pub const BACKENDS_PER_SERVICE: u32 = 65_535;
}

/// Traffic scope of a service entry: which endpoint set (kube-proxy's "cluster" or "local"
/// categorisation, after traffic policy) serves traffic that originates inside or outside the node.
pub mod scope {
    /// Traffic from pods and processes on the node (socket-level path).
    pub const INTERNAL: u8 = 0;
    /// Traffic arriving on the node's devices (XDP path).
    pub const EXTERNAL: u8 = 1;
    /// Added to the scope of an IPv6 frontend's keys (whose address is an IPv6 handle,
    /// `map_name::ADDR6`): an IPv4 lookup never finds an IPv6 frontend.
    pub const IPV6: u8 = 2;
    pub const INTERNAL6: u8 = INTERNAL | IPV6;
    pub const EXTERNAL6: u8 = EXTERNAL | IPV6;
}

/// IP protocol numbers as they appear in the IPv4 header and in `bpf_sock_addr.protocol`.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMP: u8 = 1;
}

/// Flags of a service master entry (slot 0).
pub mod service_flags {
    pub const CLUSTER_IP: u16 = 1 << 0;
    pub const NODE_PORT: u16 = 1 << 1;
    pub const LOAD_BALANCER: u16 = 1 << 2;
    pub const EXTERNAL_IP: u16 = 1 << 3;
    pub const SESSION_AFFINITY: u16 = 1 << 4;
    /// externalTrafficPolicy Local (external scope only): the client's address is never
    /// translated, whatever `config_flags::MASQUERADE_LOCAL` says.
    pub const EXTERNAL_POLICY_LOCAL: u16 = 1 << 5;
    /// The Service port has no usable endpoint anywhere in the cluster (kube-proxy's
    /// `!hasEndpoints`): connections are rejected (`ECONNREFUSED` for in-node clients), not
    /// just dropped.
    pub const NO_ENDPOINTS: u16 = 1 << 6;
    /// A LoadBalancer frontend of a Service with loadBalancerSourceRanges (kube-proxy's
    /// firewall): a new flow or socket is admitted only from a source inside the Service
    /// port's prefixes in [`crate::map_name::SOURCE_RANGES`]; others are dropped (counted as
    /// `counter::SOURCE_RANGE_DENIED`). Frontends without it never look the map up.
    pub const SOURCE_RANGES: u16 = 1 << 7;
    /// With `SOURCE_RANGES`: a node address lies in the ranges (kube-proxy's `allowFromNode`),
    /// so an in-node socket whose source is not bound yet (its source will be a node address)
    /// is admitted at socket level.
    pub const ALLOW_FROM_NODE: u16 = 1 << 8;
}

/// Flags of a backend.
pub mod backend_flags {
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 0;
    /// The endpoint is terminating (serving-terminating fallback).
    pub const TERMINATING: u8 = 1 << 1;
    /// The backend's `addr_be` is an IPv6 address handle (`map_name::ADDR6_IDS`).
    pub const IPV6: u8 = 1 << 2;
}

/// Flags of a rev-NAT entry.
pub mod rev_nat_flags {
    /// The entry's `addr_be` is an IPv6 address handle (`map_name::ADDR6_IDS`).
    pub const IPV6: u16 = 1 << 0;
}

/// An IPv6 address as the maps hold it: four words whose in-memory bytes are the wire bytes
/// (as `bpf_sock_addr.user_ip6`).
pub type Addr6 = [u32; 4];

/// Key data of the IPv6 source-ranges LPM trie: the Service port's id (matched whole), then
/// the source address. An entry for `addr/len` has prefix length `32 + len`; a lookup uses 160.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey6 {
    pub svc_port_id: u32,
    pub addr: Addr6,
}

/// Key of the IPv6 socket rev-NAT map: the socket cookie and the backend's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey6 {
    pub cookie: u64,
    pub addr: Addr6,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
    pub _pad2: u32,
}

/// Value of the IPv6 socket rev-NAT map: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNat6 {
    pub addr: Addr6,
    pub port_be: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
}

/// Key of the frontends map ([`map_name::FRONTENDS`]). Slot 0 holds the master entry of a frontend, slots `1..=count` point
/// at backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendSlotKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub scope: u8,
    pub slot: u16,
    pub _pad: u16,
}

/// Value of the frontends map. In the master entry (slot 0): `count`, `flags`, `rev_nat_id`,
/// `affinity_timeout_s`, `svc_port_id` and (external frontends with two or more backends) the
/// Maglev table are set and `backend_id` is 0. In a backend slot: only `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FrontendSlot {
    pub backend_id: u32,
    pub count: u16,
    pub flags: u16,
    pub rev_nat_id: u32,
    pub affinity_timeout_s: u32,
    /// The Service port this frontend belongs to: every frontend of a Service port (ClusterIP,
    /// NodePorts, LoadBalancer IPs, external IPs, both scopes) shares it, and with it the
    /// session affinity records.
    pub svc_port_id: u32,
    /// The Maglev lookup table new flows choose their backend from (0: none, choose a slot at
    /// random, as the socket-level path does).
    pub maglev_id: u32,
    /// The table's size M (a prime): entry `flow_hash % M`.
    pub maglev_m: u32,
    pub _pad: u32,
}

/// Entries per Maglev chunk (one map value).
pub const MAGLEV_CHUNK: u32 = 256;

/// Key of the Maglev map: entry `i` of table `table_id` lives in chunk `i / MAGLEV_CHUNK` at
/// position `i % MAGLEV_CHUNK`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub table_id: u32,
    pub chunk: u32,
}

/// Value of the Maglev map: backend ids.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevChunk {
    pub backend_ids: [u32; MAGLEV_CHUNK as usize],
}

/// The 32-bit mix step of the flow hash (the finaliser of a well-known integer hash).
#[inline(always)]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// The hash new flows are placed with: every node computes the same value for the same packet
/// (no per-node seed), so nodes behind one external load balancer choose alike. Arguments are
/// as on the wire (`_be` fields).
#[inline(always)]
pub const fn flow_hash(
    saddr_be: u32,
    daddr_be: u32,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let ports = ((sport_be as u32) << 16) | dport_be as u32;
    mix32(saddr_be ^ mix32(daddr_be ^ mix32(ports ^ mix32(proto as u32 ^ 0x9e37_79b9))))
}

/// [`flow_hash`] of an IPv6 packet: each address folded to 32 bits first (every bit counts).
#[inline(always)]
pub const fn flow_hash6(
    saddr: &Addr6,
    daddr: &Addr6,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    flow_hash(fold6(saddr), fold6(daddr), sport_be, dport_be, proto)
}

/// An IPv6 address folded to 32 bits, for hashes and the affinity key.
#[inline(always)]
pub const fn fold6(a: &Addr6) -> u32 {
    mix32(a[0] ^ mix32(a[1] ^ mix32(a[2] ^ mix32(a[3]))))
}

/// SNAT port candidate `i` (host order) for a new flow from client port `client_port` (host
/// order) with flow hash `hash`, in the range `min..=max` (not empty). Candidate 0 is the
/// client's port when it lies in the range, else the client's port folded into it (distinct
/// ports of one client, up to the range's size, get distinct first candidates); the others
/// come from the flow hash. The kernel tries them in order; tests and lbctl predict them.
#[inline(always)]
pub const fn snat_candidate(i: u32, client_port: u16, hash: u32, min: u16, max: u16) -> u16 {
    let min = min as u32;
    let range = (max as u32).wrapping_sub(min).wrapping_add(1);
    if range == 0 {
        return min as u16;
    }
    let client = client_port as u32;
    let port = if i == 0 {
        if client >= min && client - min < range {
            client
        } else {
            min + client % range
        }
    } else {
        min + mix32(hash ^ 0x5bd1_e995).wrapping_add(i.wrapping_mul(4099)) % range
    };
    port as u16
}

/// Key of the affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub svc_port_id: u32,
    /// `affinity_client::ADDR` or `affinity_client::NETNS`.
    pub client_kind: u32,
    /// The client's IPv4 address (network order, zero-extended) or its network namespace cookie.
    pub client: u64,
}

pub mod affinity_client {
    /// Keyed on the client's address (north-south).
    pub const ADDR: u32 = 1;
    /// Keyed on the client's network namespace (socket level, where the address is not known
    /// at connect time): one pod, one client.
    pub const NETNS: u32 = 2;
    /// Keyed on an IPv6 client's address (north-south), folded to 64 bits by [`client6`].
    pub const ADDR6: u32 = 3;

    /// The `AffinityKey::client` of an IPv6 client address: its two halves XORed (two clients
    /// share a record only when their halves XOR alike, which no prefix assignment produces).
    #[inline(always)]
    pub const fn client6(a: &crate::Addr6) -> u64 {
        (((a[0] ^ a[2]) as u64) << 32) | (a[1] ^ a[3]) as u64
    }
}

/// Value of the affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend_id: u32,
    /// Seconds (CLOCK_MONOTONIC_COARSE) of the last new connection that used the record.
    pub last_used_s: u32,
}

/// Key of the membership map: a frontend (its master key, slot 0) and one of its backends.
/// The value (`u32`) is the backend's slot. It answers "is this backend still usable for this
/// frontend" in O(1), for session affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub frontend: FrontendSlotKey,
    pub backend_id: u32,
}

/// The data of a source-ranges LPM trie key (the kernel's `bpf_lpm_trie_key` is a `u32`
/// prefix length followed by these bytes): the Service port's id, always matched whole, then
/// the source address. An entry for `a.b.c.d/len` has prefix length `32 + len`; a lookup uses
/// the packet's source with prefix length 64. The value (`u32`) is 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub svc_port_id: u32,
    pub addr_be: u32,
}

impl SourceRangeKey {
    /// Bits of the key data that a source address adds to the Service-port id.
    pub const ID_BITS: u32 = 32;
}

/// Value of the backends map (key: backend id, `u32`, 0 reserved).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub flags: u8,
    pub zone: u8,
    pub _pad: [u8; 3],
}

/// Value of the rev-NAT map (key: rev-NAT id, `u32`, 0 reserved): the frontend a reply must
/// appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RevNat {
    pub addr_be: u32,
    pub port_be: u16,
    /// `rev_nat_flags` (0 in entries written before IPv6: an IPv4 address).
    pub flags: u16,
}

/// Key of the per-socket maps: the socket cookie and an address (the backend for the socket
/// rev-NAT map, the frontend for the socket flow map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the socket rev-NAT map: the frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNat {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
    pub _pad2: u32,
}

/// Value of the socket flow map: the backend an unconnected UDP socket was given for a frontend,
/// with the slot it was found in, so that a change of the slot's backend is noticed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockFlow {
    pub backend_id: u32,
    pub slot: u16,
    pub _pad: u16,
}

/// Key of the conntrack maps: a packet's addresses as seen on the wire. Generic over the
/// address (`u32` for IPv4, [`Addr6`] for IPv6): both families' conntracks share one layout
/// and one state machine.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKeyOf<A> {
    pub saddr_be: A,
    pub daddr_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The IPv4 conntrack's key ([`map_name::CONNTRACK`]).
pub type CtKey = CtKeyOf<u32>;
/// The IPv6 conntrack's key ([`map_name::CONNTRACK6`]).
pub type CtKey6 = CtKeyOf<Addr6>;

/// Value of the conntrack map: the addresses to write into a packet that matches the key. The
/// original direction (client -> frontend) becomes (client or SNAT address -> backend); the reply
/// direction (backend -> client or SNAT address) becomes (frontend -> client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntryOf<A> {
    pub nat_saddr_be: A,
    pub nat_daddr_be: A,
    pub nat_sport_be: u16,
    pub nat_dport_be: u16,
    /// The Service port of the flow (for per-Service counters).
    pub svc_port_id: u32,
    pub backend_id: u32,
    /// Seconds (CLOCK_MONOTONIC_COARSE) when the entry was last used.
    pub last_seen_s: u32,
    pub flags: u16,
    /// The flow's state (`ct_state`), the same in both of its entries.
    pub state: u8,
    pub _pad: u8,
    /// TCP: the sequence number following the last segment this direction's sender was seen to
    /// send (a SYN and a FIN count one), host order. Valid with `ct_flags::SEQ_KNOWN`.
    pub seq_next: u32,
}

pub type CtEntry = CtEntryOf<u32>;
pub type CtEntry6 = CtEntryOf<Addr6>;

/// Value of the conntrack maps: a direction's entry, and where its translated packets went last
/// (XDP): the FIB's answer, reused instead of a lookup per packet while it is fresh
/// (`NextHop::stale` is 0). One cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValueOf<A> {
    pub e: CtEntryOf<A>,
    pub nh: NextHop,
}

pub type CtValue = CtValueOf<u32>;
pub type CtValue6 = CtValueOf<Addr6>;

impl<A: Copy> CtValueOf<A> {
    /// An entry without a next hop.
    #[inline(always)]
    pub const fn new(e: CtEntryOf<A>) -> Self {
        CtValueOf {
            e,
            nh: NextHop::NONE,
        }
    }
}

/// A cached FIB answer for one direction of a flow, `CtValue::nh` (XDP only: tc hands the next
/// hop to `bpf_redirect_neigh`). Valid while the route generation (`map_name::ROUTE_GEN`) is
/// the one it was looked up in, the packet arrived on the same device, is no longer than one
/// that was seen to fit the route's MTU, and the answer is younger than
/// `limits::NEXT_HOP_REVALIDATE_S` (a bound for changes no agent reported: an agent that is
/// down or restarting). Only answers the XDP path acts on are cached (the receiving device, or
/// a redirect target running the XDP program); `in_ifindex` 0 means nothing is cached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NextHop {
    pub gen: u32,
    pub in_ifindex: u32,
    pub out_ifindex: u32,
    /// Seconds (as `CtEntry::last_seen_s`) of the FIB lookup this answer came from.
    pub checked_s: u32,
    /// The longest IPv4 packet (total length) the lookup was made for: a longer one is looked
    /// up again (the FIB checks it against the route's MTU).
    pub fits: u16,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub _pad: [u8; 2],
}

impl NextHop {
    /// Nothing cached.
    pub const NONE: NextHop = NextHop {
        gen: 0,
        in_ifindex: 0,
        out_ifindex: 0,
        checked_s: 0,
        fits: 0,
        dmac: [0; 6],
        smac: [0; 6],
        _pad: [0; 2],
    };

    /// Zero when this answer may be used for a packet of `tot_len` bytes that arrived on
    /// `in_ifindex` at `now_s`, in route generation `gen` (nothing cached: `in_ifindex` 0,
    /// never a device's). Computed without branches: the XDP program is close to the
    /// verifier's budget, and each branch multiplies the paths it explores.
    #[inline(always)]
    pub fn stale(&self, gen: u32, in_ifindex: u32, tot_len: u16, now_s: u32) -> u32 {
        // Each term is non-zero exactly when its condition fails; the age and length terms
        // take the sign bit of a difference (ages and lengths are far below 2^31).
        let age = now_s.wrapping_sub(self.checked_s);
        let too_old = (limits::NEXT_HOP_REVALIDATE_S - 1).wrapping_sub(age) >> 31;
        let too_long = (self.fits as u32).wrapping_sub(tot_len as u32) >> 31;
        (self.gen ^ gen) | (self.in_ifindex ^ in_ifindex) | too_old | too_long
    }
}

impl<A: Copy> CtKeyOf<A> {
    /// The key of a flow's other direction, when this direction's packets are rewritten to
    /// (`nat_saddr_be`, `nat_daddr_be`, `nat_sport_be`, `nat_dport_be`): the other direction
    /// arrives as (nat_d -> nat_s).
    #[inline(always)]
    pub const fn reverse(
        &self,
        nat_saddr_be: A,
        nat_daddr_be: A,
        nat_sport_be: u16,
        nat_dport_be: u16,
    ) -> CtKeyOf<A> {
        CtKeyOf {
            saddr_be: nat_daddr_be,
            daddr_be: nat_saddr_be,
            sport_be: nat_dport_be,
            dport_be: nat_sport_be,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

impl<A: Copy> CtEntryOf<A> {
    /// The key of the other direction's entry of the flow whose entry under `key` this is.
    #[inline(always)]
    pub const fn partner_key(&self, key: &CtKeyOf<A>) -> CtKeyOf<A> {
        key.reverse(
            self.nat_saddr_be,
            self.nat_daddr_be,
            self.nat_sport_be,
            self.nat_dport_be,
        )
    }

    /// The other direction's key and entry of the flow whose entry under `key` this is: that
    /// direction is rewritten back to (key's destination -> key's source). The computed entry
    /// has the flow's state and no sequence tracking.
    #[inline(always)]
    pub const fn partner(&self, key: &CtKeyOf<A>) -> (CtKeyOf<A>, CtEntryOf<A>) {
        let v = CtEntryOf {
            nat_saddr_be: key.daddr_be,
            nat_daddr_be: key.saddr_be,
            nat_sport_be: key.dport_be,
            nat_dport_be: key.sport_be,
            svc_port_id: self.svc_port_id,
            backend_id: self.backend_id,
            last_seen_s: self.last_seen_s,
            flags: (self.flags ^ ct_flags::REPLY) & !ct_flags::SEQ_KNOWN,
            state: self.state,
            _pad: 0,
            seq_next: 0,
        };
        (self.partner_key(key), v)
    }

    /// Whether a flow in this entry's state, last seen (in either direction) at `last_seen_s`,
    /// has expired at `now_s` (seconds of CLOCK_MONOTONIC, as `bpf_ktime_get_coarse_ns`).
    #[inline(always)]
    pub fn expired(&self, last_seen_s: u32, now_s: u32) -> bool {
        now_s.wrapping_sub(last_seen_s) as i32 > ct_state::lifetime_s(self.state) as i32
    }
}

/// States of a conntrack flow. "Client" is the sender of the original direction (the flow's
/// first packet), "backend" the sender of replies. Each state has its idle lifetime, after
/// which the entries are a miss for the datapath (and the agent's sweep removes them); a SNAT
/// port goes to another flow only once the flow holding it expired.
pub mod ct_state {
    /// TCP: the client's SYN was seen, no answer yet.
    pub const TCP_SYN_SENT: u8 = 1;
    /// TCP: the backend answered with a SYN-ACK; the client has not acknowledged it yet.
    pub const TCP_SYN_RECV: u8 = 2;
    /// TCP: the flow's first packet seen was not a SYN (its entries were lost: evicted, expired,
    /// or the node restarted its tracking). Confirmed by a reply that is not a reset.
    pub const TCP_PICKUP: u8 = 3;
    /// TCP: the handshake completed (the client acknowledged the backend's SYN-ACK).
    pub const TCP_ESTABLISHED: u8 = 4;
    /// TCP: the client sent a FIN (in window); the backend has not.
    pub const TCP_FIN_CLIENT: u8 = 5;
    /// TCP: the backend sent a FIN (in window); the client has not.
    pub const TCP_FIN_BACKEND: u8 = 6;
    /// TCP: both sent a FIN, the client first: the client holds TIME-WAIT, the backend does not.
    pub const TCP_CLOSED: u8 = 7;
    /// TCP: both sent a FIN, the backend first: the backend holds the four-tuple in TIME-WAIT
    /// (60 s on Linux), so the SNAT port stays with the flow as long.
    pub const TCP_TIME_WAIT: u8 = 8;
    /// TCP: a reset (in window) ended the flow; no end keeps state.
    pub const TCP_RESET: u8 = 9;
    /// UDP: no reply yet.
    pub const UDP_UNREPLIED: u8 = 10;
    /// UDP: the backend replied.
    pub const UDP_REPLIED: u8 = 11;

    /// Idle lifetimes in seconds. TCP as Linux conntrack keeps them, with kube-proxy's
    /// established timeout (its `--conntrack-tcp-timeout-established` default, 24 h); UDP as
    /// Linux (`nf_conntrack_udp_timeout`, `_stream`).
    pub const TCP_SYN_S: u32 = 60;
    pub const TCP_ESTABLISHED_S: u32 = 86_400;
    pub const TCP_HALF_CLOSED_S: u32 = 120;
    pub const TCP_CLOSED_S: u32 = 10;
    pub const TCP_TIME_WAIT_S: u32 = 60;
    pub const UDP_UNREPLIED_S: u32 = 30;
    pub const UDP_REPLIED_S: u32 = 120;

    /// The idle lifetime of a flow in `state` (an unknown state: the handshake's).
    #[inline(always)]
    pub const fn lifetime_s(state: u8) -> u32 {
        match state {
            TCP_ESTABLISHED => TCP_ESTABLISHED_S,
            TCP_FIN_CLIENT | TCP_FIN_BACKEND => TCP_HALF_CLOSED_S,
            TCP_CLOSED | TCP_RESET => TCP_CLOSED_S,
            TCP_TIME_WAIT => TCP_TIME_WAIT_S,
            UDP_UNREPLIED => UDP_UNREPLIED_S,
            UDP_REPLIED => UDP_REPLIED_S,
            _ => TCP_SYN_S,
        }
    }

    /// Stable names, for lbctl.
    pub fn name(state: u8) -> &'static str {
        match state {
            TCP_SYN_SENT => "syn_sent",
            TCP_SYN_RECV => "syn_recv",
            TCP_PICKUP => "pickup",
            TCP_ESTABLISHED => "established",
            TCP_FIN_CLIENT => "fin_client",
            TCP_FIN_BACKEND => "fin_backend",
            TCP_CLOSED => "closed",
            TCP_TIME_WAIT => "time_wait",
            TCP_RESET => "reset",
            UDP_UNREPLIED => "unreplied",
            UDP_REPLIED => "replied",
            _ => "unknown",
        }
    }
}

/// Key of the fragments map: what identifies one IPv4 datagram's fragments on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the fragments map: the ports of the datagram, from its first fragment, as they were
/// on the wire before translation (the key of its flow's conntrack entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
}

/// Flags of a conntrack entry.
pub mod ct_flags {
    /// Reply direction (backend -> client).
    pub const REPLY: u16 = 1 << 0;
    /// The flow's source was translated to the node (externalTrafficPolicy Cluster, remote backend).
    pub const SNAT: u16 = 1 << 1;
    /// The backend runs on this node.
    pub const LOCAL_BACKEND: u16 = 1 << 2;
    /// Layout v2 only (read by the upgrade from `lb_ct_v2`): a FIN or RST was seen. Bit 3 stays
    /// unused.
    pub const V2_CLOSING: u16 = 1 << 3;
    /// Layout v2 only: with V2_CLOSING, the flow was reset. Bit 4 stays unused.
    pub const V2_CLOSED_FAST: u16 = 1 << 4;
    /// TCP: `seq_next` holds a sequence number seen from this direction's sender.
    pub const SEQ_KNOWN: u16 = 1 << 5;
}

/// The single entry (index 0) of the config array, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Config {
    /// The node address that translated flows leave from (first InternalIP).
    pub node_addr_be: u32,
    /// SNAT port range, host order, inclusive.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Non-zero once the agent has written the config.
    pub ready: u32,
    /// `config_flags`.
    pub flags: u32,
    /// This node's pod CIDR (the Node's `spec.podCIDRs`, IPv4), network order: a ClusterIP
    /// packet from inside it comes from a local pod and keeps its source (kube-proxy's
    /// `--detect-local-mode NodeCIDR`). `pod_mask_be` 0: the node has none, every source of a
    /// ClusterIP packet that arrives on an interface is masqueraded.
    pub pod_net_be: u32,
    pub pod_mask_be: u32,
    /// The ifindexes of the devices that run the XDP program (0: unused), so deliver frames
    /// redirected into them. A translated packet whose route leaves by another interface (a
    /// bridge, a tc device) goes through the stack instead of a redirect that would drop it.
    pub xdp_ifindexes: [u32; limits::XDP_DEVICES],
    /// The smallest prefix that covers every ClusterIP (network order; valid with
    /// `config_flags::CLUSTER_IPS`): the north-south path looks a ClusterIP up only for
    /// destinations inside it, so other traffic pays no second lookup.
    pub cluster_ip_net_be: u32,
    pub cluster_ip_mask_be: u32,
}

/// The IPv6 half of the node's configuration (`map_name::CONFIG6`), written by the agent when
/// the node has an IPv6 address; the SNAT port range and flags are [`Config`]'s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config6 {
    /// The node's IPv6 address translated flows leave from (its first IPv6 InternalIP).
    pub node_addr: Addr6,
    /// Non-zero once written.
    pub ready: u32,
    pub _pad: u32,
    /// The node's IPv6 pod CIDR (`spec.podCIDRs`): network and mask, in the address's layout;
    /// an all-zero mask when the Node has none (every source is then "outside").
    pub pod_net: Addr6,
    pub pod_mask: Addr6,
}

impl Config6 {
    /// Whether `saddr` lies in the node's IPv6 pod CIDR (a local pod).
    #[inline(always)]
    pub fn from_local_pod(&self, saddr: &Addr6) -> bool {
        let mask = &self.pod_mask;
        (mask[0] | mask[1] | mask[2] | mask[3]) != 0
            && saddr[0] & mask[0] == self.pod_net[0]
            && saddr[1] & mask[1] == self.pod_net[1]
            && saddr[2] & mask[2] == self.pod_net[2]
            && saddr[3] & mask[3] == self.pod_net[3]
    }
}

/// Flags of [`Config`].
pub mod config_flags {
    /// externalTrafficPolicy Cluster flows to a local backend are masqueraded too (the agent
    /// cannot guarantee that their replies meet a program of ours, whatever interface they
    /// leave by: an interface with an IPv4 route runs no tc egress program of ours).
    pub const MASQUERADE_LOCAL: u32 = 1 << 0;
    /// `Config::cluster_ip_net_be`/`cluster_ip_mask_be` hold a prefix (there are ClusterIPs).
    pub const CLUSTER_IPS: u32 = 1 << 1;
}

impl Config {
    /// Whether `daddr_be` may be a ClusterIP (inside the prefix that covers them all).
    #[inline(always)]
    pub fn maybe_cluster_ip(&self, daddr_be: u32) -> bool {
        self.flags & config_flags::CLUSTER_IPS != 0
            && daddr_be & self.cluster_ip_mask_be == self.cluster_ip_net_be
    }

    /// Whether `ifindex` is a device running the XDP program (a redirect target).
    #[inline(always)]
    pub fn xdp_device(&self, ifindex: u32) -> bool {
        let mut i = 0;
        while i < limits::XDP_DEVICES {
            if self.xdp_ifindexes[i] == ifindex && ifindex != 0 {
                return true;
            }
            i += 1;
        }
        false
    }

    /// Whether `saddr_be` lies in the node's pod CIDR (a local pod).
    #[inline(always)]
    pub fn from_local_pod(&self, saddr_be: u32) -> bool {
        self.pod_mask_be != 0 && saddr_be & self.pod_mask_be == self.pod_net_be
    }
}

/// Per-CPU traffic counters of one Service port (value of the service stats map, keyed by
/// Service-port id). The socket-level path sees connections, not packets: it counts
/// `new_connections` and drops only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    /// Refused or dropped because the frontend had no usable endpoint.
    pub drops_no_backend: u64,
    /// Dropped for another reason (SNAT ports exhausted, inconsistent maps).
    pub drops_other: u64,
    /// Dropped or refused: the source is outside the Service's loadBalancerSourceRanges.
    pub drops_source_range: u64,
}

/// Value of the Service names map (key: Service-port id): `namespace/name:port/PROTO`, NUL
/// padded. Only userspace reads it (lbctl, metrics, adoption after a restart).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub bytes: [u8; 256],
}

/// A per-CPU counter (stats map value).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Indices into the stats map: one named counter per reason. For the socket-level programs
/// `packets` counts calls and `bytes` stays 0.
pub mod counter {
    /// Frames seen by the XDP program.
    pub const XDP_RX: u32 = 0;
    /// Frames shorter than an Ethernet header (passed).
    pub const XDP_TRUNCATED_ETH: u32 = 1;
    /// Frames whose EtherType is not IPv4 (passed).
    pub const XDP_NON_IPV4: u32 = 2;
    /// IPv4 header cut short: shorter than 20 bytes or than its IHL says (passed).
    pub const XDP_TRUNCATED_IPV4: u32 = 3;
    /// IPv4 header with a version other than 4 or an IHL below 5 (passed).
    pub const XDP_BAD_IPV4: u32 = 4;
    /// IPv4 header carrying options (parsed past them; informational).
    pub const XDP_IPV4_OPTIONS: u32 = 5;
    /// IPv4 fragments seen (more-fragments set or a non-zero offset; informational). A first
    /// fragment is translated like a whole datagram, later ones by `XDP_FRAG_XLATE`.
    pub const XDP_FRAGMENT: u32 = 6;
    /// TCP or UDP header cut short (passed).
    pub const XDP_TRUNCATED_L4: u32 = 7;
    /// IPv4 packets that are neither TCP nor UDP (passed).
    pub const XDP_NOT_TCP_UDP: u32 = 8;
    /// TCP/UDP packets whose destination is no frontend (passed).
    pub const XDP_NO_FRONTEND: u32 = 9;
    /// Retired: TCP/UDP packets to a frontend while north-south translation was not enabled
    /// yet (passed). Nothing increments it since the XDP path translates (a packet to a
    /// frontend before the agent's config is `XDP_NO_CONFIG`). The index and name stay, so the
    /// stats layout (`lb_stats_v2`) and the metrics keep their shape; it reads 0.
    pub const XDP_FRONTEND_PASS: u32 = 10;
    /// Verdicts of the XDP program.
    pub const XDP_VERDICT_PASS: u32 = 11;
    pub const XDP_VERDICT_DROP: u32 = 12;
    /// connect4/connect6: connections translated to a backend.
    pub const SOCK_CONNECT_XLATE: u32 = 13;
    /// sendmsg4/sendmsg6: datagrams translated to a backend.
    pub const SOCK_SENDMSG_XLATE: u32 = 14;
    /// connect/sendmsg refused because the frontend has no backend.
    pub const SOCK_NO_BACKEND: u32 = 15;
    /// connect/sendmsg: a slot pointed at a missing backend (inconsistent maps; refused).
    pub const SOCK_BACKEND_MISSING: u32 = 16;
    /// recvmsg4/recvmsg6: source addresses translated back to the frontend.
    pub const SOCK_RECVMSG_REVNAT: u32 = 17;
    /// getpeername4/getpeername6: peer addresses translated back to the frontend.
    pub const SOCK_GETPEERNAME_REVNAT: u32 = 18;
    /// sendmsg4/sendmsg6: an unconnected UDP socket reused its earlier backend.
    pub const SOCK_FLOW_REUSE: u32 = 19;
    /// XDP: a new north-south flow was translated to a backend.
    pub const XDP_NEW_FLOW: u32 = 20;
    /// XDP: a packet of a known flow (original direction) was translated.
    pub const XDP_ESTABLISHED: u32 = 21;
    /// XDP: a reply was translated back to the frontend.
    pub const XDP_REPLY: u32 = 22;
    /// XDP: dropped, the frontend has no usable endpoint on this node (externalTrafficPolicy Local).
    pub const XDP_DROP_NO_BACKEND: u32 = 23;
    /// XDP: an SNAT port candidate was taken; another was tried.
    pub const XDP_SNAT_COLLISION: u32 = 24;
    /// XDP: dropped, no SNAT port was free after every try.
    pub const XDP_DROP_SNAT_EXHAUSTED: u32 = 25;
    /// XDP: translated packets sent back out of the receiving device (XDP_TX).
    pub const XDP_TX: u32 = 26;
    /// XDP: translated packets redirected to another device.
    pub const XDP_REDIRECT: u32 = 27;
    /// XDP: translated packets handed to the stack (local backend, or route unknown).
    pub const XDP_TRANSLATED_PASS: u32 = 28;
    /// XDP: ICMP errors (unreachable, fragmentation needed, time exceeded) about a translated
    /// flow, translated for the other side of the translation.
    pub const XDP_ICMP_ERROR_XLATE: u32 = 29;
    /// XDP: the agent has not written the config yet (passed).
    pub const XDP_NO_CONFIG: u32 = 30;
    /// tc egress: replies of local backends translated back to the frontend.
    pub const TC_REPLY: u32 = 31;
    /// tc egress: packets seen.
    pub const TC_SEEN: u32 = 32;
    /// XDP: dropped, a slot pointed at a missing backend.
    pub const XDP_DROP_BACKEND_MISSING: u32 = 33;
    /// XDP and tc egress: the conntrack refused an insert (an LRU map that found no entry to
    /// evict, or a bucket busy on another CPU: the only way an LRU conntrack is full). A new
    /// flow's packet is then translated without entries (`XDP_STATELESS`), and the flow's
    /// replies are not translated back until a later packet's insert succeeds; a flow it
    /// could not confirm stays in the new-flow tier. The name is older than the two-tier conntrack,
    /// which translates instead of dropping; it stays for the metrics and alerts.
    pub const XDP_DROP_CT_FULL: u32 = 34;
    /// Session affinity: a live record was used.
    pub const AFFINITY_HIT: u32 = 35;
    /// Session affinity: a record had expired; a fresh choice was made.
    pub const AFFINITY_EXPIRED: u32 = 36;
    /// Session affinity: the recorded backend left the usable set; a fresh choice was made.
    pub const AFFINITY_STALE: u32 = 37;
    /// Session affinity: records created for clients without one (with the map's entry count,
    /// this gives the LRU evictions).
    pub const AFFINITY_NEW: u32 = 38;
    /// XDP: an unconfirmed flow was confirmed (TCP: the client's first ACK; UDP: a reply) and
    /// moved from the new-flow conntrack to the established one.
    pub const CT_CONFIRMED: u32 = 39;
    /// XDP: a new flow's backend came from the Maglev table (else: a random slot).
    pub const XDP_MAGLEV: u32 = 40;
    /// XDP: the conntrack refused an insert; the packet was translated statelessly (the same
    /// choice the flow's next packet makes) instead of being dropped.
    pub const XDP_STATELESS: u32 = 41;
    /// Conntrack: a lookup found an entry past its state's lifetime; it was a miss (the packet
    /// started a new flow, or went untranslated), and the entries were removed.
    pub const CT_EXPIRED: u32 = 42;
    /// XDP: IPv4 fragments after the first translated with their datagram's flow (found
    /// through the fragments map).
    pub const XDP_FRAG_XLATE: u32 = 43;
    /// XDP: IPv4 fragments after the first whose first fragment was not seen (or whose flow is
    /// not tracked): passed untranslated.
    pub const XDP_FRAG_NO_FIRST: u32 = 44;
    /// Conntrack: a TCP FIN or RST whose sequence number is outside the window its sender was
    /// seen at: forwarded, but the flow's state did not change.
    pub const CT_OUT_OF_WINDOW: u32 = 45;
    /// XDP: a new SNAT flow kept the client's source port.
    pub const XDP_SNAT_PRESERVED: u32 = 46;
    /// XDP: an SNAT port candidate was skipped because a socket of the node uses it.
    pub const XDP_SNAT_SOCKET: u32 = 47;
    /// tc egress: a `bpf_skb_*` helper failed (a frame shorter than its headers claim, or a
    /// store the kernel refused); the packet went on untranslated.
    pub const TC_ERROR: u32 = 48;
    /// North-south or socket level: a new flow or socket to a LoadBalancer frontend from a
    /// source outside the Service's loadBalancerSourceRanges was dropped (refused).
    pub const SOURCE_RANGE_DENIED: u32 = 49;
    /// North-south: a new flow to a Service port without any endpoint in the cluster was
    /// answered with an ICMP port unreachable built by the datapath (kube-proxy's REJECT).
    pub const REJECT_SENT: u32 = 50;
    /// North-south: a new flow to a Service port without any endpoint was dropped without an
    /// answer: over the ICMP error rate limit (`limits::REJECTS_PER_SECOND` per CPU), from a
    /// source no ICMP error may go to (RFC 1122: 0.0.0.0/8, loopback, multicast, broadcast), or
    /// a frame the kernel would not resize.
    pub const REJECT_SUPPRESSED: u32 = 51;
    /// North-south: a new flow that keeps the client's address had its source port remapped,
    /// because another live flow held the same four-tuple at the backend (one client port to
    /// two frontends that share a backend), as Linux NAT remaps on such a clash.
    pub const XDP_PORT_REMAP: u32 = 52;
    /// IPv6 frames handed to the IPv6 north-south path (`lb_xdp6`, `lb_tc_ingress6`); its
    /// other counters are the `xdp_*` ones, shared with IPv4.
    pub const XDP_IPV6: u32 = 53;
    /// IPv6 packets whose next header is an extension header (hop-by-hop, routing, fragment,
    /// destination options, ...): passed untranslated.
    pub const XDP_IPV6_EXT_HDR: u32 = 54;
    /// ICMPv6 packets that are not an error about a translated flow (neighbour discovery,
    /// echo, ...): passed untouched.
    pub const XDP_ICMPV6_PASS: u32 = 55;
    /// IPv6 header cut short or not version 6 (passed).
    pub const XDP_BAD_IPV6: u32 = 56;
    /// The IPv6 path found no usable IPv6 configuration (the node has no IPv6 address, or the
    /// agent has not written it): IPv6 frames to a frontend are passed untranslated.
    pub const XDP_NO_CONFIG6: u32 = 57;
    /// Number of counters (stats map size).
    pub const COUNT: u32 = 58;

    /// Counters nothing increments any more, kept so that the stats layout does not change
    /// (every other index has an increment site in lb-ebpf; a test checks both).
    pub const RETIRED: [u32; 1] = [XDP_FRONTEND_PASS];

    /// Stable names, indexed by counter, for `lbctl stats` and metrics.
    pub const NAMES: [&str; COUNT as usize] = [
        "xdp_rx",
        "xdp_truncated_eth",
        "xdp_non_ipv4",
        "xdp_truncated_ipv4",
        "xdp_bad_ipv4",
        "xdp_ipv4_options",
        "xdp_fragment",
        "xdp_truncated_l4",
        "xdp_not_tcp_udp",
        "xdp_no_frontend",
        "xdp_frontend_pass",
        "xdp_verdict_pass",
        "xdp_verdict_drop",
        "sock_connect_xlate",
        "sock_sendmsg_xlate",
        "sock_no_backend",
        "sock_backend_missing",
        "sock_recvmsg_revnat",
        "sock_getpeername_revnat",
        "sock_flow_reuse",
        "xdp_new_flow",
        "xdp_established",
        "xdp_reply",
        "xdp_drop_no_backend",
        "xdp_snat_collision",
        "xdp_drop_snat_exhausted",
        "xdp_tx",
        "xdp_redirect",
        "xdp_translated_pass",
        "xdp_icmp_error_xlate",
        "xdp_no_config",
        "tc_reply",
        "tc_seen",
        "xdp_drop_backend_missing",
        "xdp_drop_ct_full",
        "affinity_hit",
        "affinity_expired",
        "affinity_stale",
        "affinity_new",
        "ct_confirmed",
        "xdp_maglev",
        "xdp_stateless",
        "ct_expired",
        "xdp_frag_xlate",
        "xdp_frag_no_first",
        "ct_out_of_window",
        "xdp_snat_preserved",
        "xdp_snat_socket",
        "tc_error",
        "source_range_denied",
        "reject_sent",
        "reject_suppressed",
        "xdp_port_remap",
        "xdp_ipv6",
        "xdp_ipv6_ext_hdr",
        "xdp_icmpv6_pass",
        "xdp_bad_ipv6",
        "xdp_no_config6",
    ];
}

const _: () = {
    assert!(core::mem::size_of::<FrontendSlotKey>() == 12);
    assert!(core::mem::size_of::<FrontendSlot>() == 32);
    assert!(core::mem::size_of::<MaglevKey>() == 8);
    assert!(core::mem::size_of::<MaglevChunk>() == 1024);
    assert!(core::mem::size_of::<AffinityKey>() == 16);
    assert!(core::mem::size_of::<AffinityValue>() == 8);
    assert!(core::mem::size_of::<MemberKey>() == 16);
    assert!(core::mem::size_of::<ServiceCounters>() == 48);
    assert!(core::mem::size_of::<SourceRangeKey>() == 8);
    assert!(core::mem::size_of::<ServiceName>() == 256);
    assert!(core::mem::size_of::<Backend>() == 12);
    assert!(core::mem::size_of::<RevNat>() == 8);
    assert!(core::mem::size_of::<SockKey>() == 16);
    assert!(core::mem::size_of::<SockRevNat>() == 16);
    assert!(core::mem::size_of::<SockFlow>() == 8);
    assert!(core::mem::size_of::<SockKey6>() == 32);
    assert!(core::mem::size_of::<SockRevNat6>() == 24);
    assert!(core::mem::size_of::<SourceRangeKey6>() == 20);
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<CtKey>() == 16);
    assert!(core::mem::size_of::<CtKey6>() == 40);
    assert!(core::mem::size_of::<CtEntry6>() == 56);
    assert!(core::mem::size_of::<CtValue6>() == 88);
    assert!(core::mem::size_of::<Config6>() == 56);
    assert!(core::mem::size_of::<CtEntry>() == 32);
    assert!(core::mem::size_of::<NextHop>() == 32);
    assert!(core::mem::size_of::<CtValue>() == 64);
    assert!(core::mem::size_of::<FragKey>() == 12);
    assert!(core::mem::size_of::<FragPorts>() == 4);
    assert!(core::mem::size_of::<Config>() == 32 + 4 * limits::XDP_DEVICES);
    assert!(core::mem::size_of::<BenchFrame>() == 88);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is `repr(C)`, `Copy`, has explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for FrontendSlotKey {}
    unsafe impl aya::Pod for FrontendSlot {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockRevNat {}
    unsafe impl aya::Pod for SockFlow {}
    unsafe impl aya::Pod for SockKey6 {}
    unsafe impl aya::Pod for SockRevNat6 {}
    unsafe impl aya::Pod for SourceRangeKey6 {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for CtKey6 {}
    unsafe impl aya::Pod for CtEntry6 {}
    unsafe impl aya::Pod for CtValue6 {}
    unsafe impl aya::Pod for Config6 {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for MaglevChunk {}
    unsafe impl aya::Pod for BenchFrame {}
}
