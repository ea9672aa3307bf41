//! `lbctl`'s views of the pinned maps: frontends with their backends, backends, conntrack and
//! affinity entries, the datapath config, and `lookup`, which explains the backend a flow has or
//! would get. Counters and occupancy come from `dataplane::read`, shared with the metrics. Works
//! while the agent is down.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::Path,
};

use anyhow::Result;
use lb_common::{map_name, service_flags, Addr6, CtKeyOf};
use serde::Serialize;

use crate::{
    control::model::FamilyAddr,
    dataplane::{
        addr6_words,
        ct_gc::{self, CtAddr},
        pinned::{check_dir, AyaDataplane},
        read::{boot_seconds, conntrack_tiers, typed},
        Dataplane, MapContents,
    },
    error::usage,
};

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FrontendView {
    /// `namespace/name:port/PROTO` of the Service port.
    pub service: Option<String>,
    pub frontend: String,
    pub protocol: &'static str,
    pub scope: &'static str,
    /// `IPv4` or `IPv6`.
    pub family: &'static str,
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
    pub family: &'static str,
    pub flags: u8,
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

/// An address and port of the service maps as they read: an IPv6 one (`v6`) is held as its
/// handle, resolved through the address table.
fn sock(s: &MapContents, addr_be: u32, port_be: u16, v6: bool) -> String {
    if !v6 {
        return addr(addr_be, port_be).to_string();
    }
    let port = u16::from_be(port_be);
    match s.addr6_ids.get(&addr_be) {
        Some(a) => SocketAddrV6::new(*a, port, 0, 0).to_string(),
        None => format!(
            "<IPv6 handle {} not interned>:{port}",
            Ipv4Addr::from(addr_be.to_ne_bytes())
        ),
    }
}

fn backend_addr(s: &MapContents, b: &lb_common::Backend) -> String {
    sock(s, b.addr_be, b.port_be, is_v6_backend(b))
}

fn is_v6_backend(b: &lb_common::Backend) -> bool {
    b.flags & lb_common::backend_flags::IPV6 != 0
}

fn family(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// What the service maps pinned under `bpffs` hold.
pub fn map_contents(bpffs: &Path) -> Result<MapContents> {
    check_dir(bpffs)?;
    AyaDataplane::from_pins(bpffs)?.contents()
}

pub fn frontends(s: &MapContents) -> Vec<FrontendView> {
    let mut out = Vec::new();
    for (k, v) in s.services.iter().filter(|(k, _)| k.slot == 0) {
        let backends = (1..=v.count)
            .map(|slot| {
                let id = s
                    .services
                    .get(&lb_common::FrontendSlotKey { slot, ..*k })
                    .map(|e| e.backend_id);
                match id.and_then(|id| s.backends.get(&id)) {
                    Some(b) => backend_addr(s, b),
                    None => format!("<missing slot {slot}>"),
                }
            })
            .collect();
        let v6 = k.scope & lb_common::scope::IPV6 != 0;
        out.push(FrontendView {
            service: s.service_names.get(&v.svc_port_id).cloned(),
            frontend: sock(s, k.addr_be, k.port_be, v6),
            protocol: proto_name(k.proto),
            scope: if k.scope & !lb_common::scope::IPV6 == lb_common::scope::INTERNAL {
                "internal"
            } else {
                "external"
            },
            family: family(v6),
            flags: v.flags,
            rev_nat_id: v.rev_nat_id,
            affinity_timeout_s: v.affinity_timeout_s,
            backends,
        });
    }
    out
}

pub fn backends(s: &MapContents) -> Vec<BackendView> {
    s.backends
        .iter()
        .map(|(id, b)| BackendView {
            id: *id,
            address: backend_addr(s, b),
            protocol: proto_name(b.proto),
            family: family(is_v6_backend(b)),
            flags: b.flags,
        })
        .collect()
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

#[derive(Debug, Serialize)]
pub struct ConntrackView {
    pub flow: String,
    pub protocol: &'static str,
    pub translated: String,
    pub direction: &'static str,
    pub snat: bool,
    pub local_backend: bool,
    pub backend_id: u32,
    /// Seconds since this entry's direction last saw a packet.
    pub idle_seconds: u32,
    /// The flow's state (`ct_state::name`: `syn_sent`, `established`, `time_wait`,
    /// `unreplied`, `replied`, ...).
    pub state: &'static str,
    /// Seconds before the flow expires: its state's lifetime minus the time since either
    /// direction last saw a packet (0 once expired: the datapath treats it as a miss and the
    /// agent's sweep removes it).
    pub expires_in_seconds: u32,
    /// "established" (confirmed flows) or "new" (TCP before the handshake completed, UDP before
    /// a reply).
    pub tier: &'static str,
    /// The XDP path's cached next hop for this direction (output device and MAC addresses,
    /// `dev eth0 to 02:..:02 from 02:..:01`), "-" when none is cached (unconfirmed flows, tc,
    /// traffic the stack forwards).
    pub next_hop: Option<String>,
    /// Whether the XDP path would use that next hop for the flow's next packet now (same route
    /// generation, younger than `limits::NEXT_HOP_REVALIDATE_S`; the device and size checks
    /// depend on the packet); "-" when none is cached.
    pub next_hop_fresh: Option<bool>,
    /// `IPv4` (`lb_ct_*`) or `IPv6` (`lb_ct6_*`).
    pub family: &'static str,
}

/// `aa:bb:cc:dd:ee:ff`.
fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A device's name by index, or `if<N>` when it has none (gone, or in another namespace).
fn device_name(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{ifindex}");
    }
    // SAFETY: on success the name is NUL-terminated inside `buf`.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The next-hop columns of a conntrack value: its text and whether it is fresh at `now` in
/// route generation `gen`.
fn next_hop_view(
    nh: &lb_common::NextHop,
    gen: Option<u32>,
    now: u32,
) -> (Option<String>, Option<bool>) {
    if nh.in_ifindex == 0 {
        return (None, None);
    }
    let text = format!(
        "dev {} to {} from {}",
        device_name(nh.out_ifindex),
        mac(nh.dmac),
        mac(nh.smac)
    );
    // The datapath's own test, with the packet-dependent parts (device, size) taken as met.
    let fresh = gen.is_some_and(|g| nh.stale(g, nh.in_ifindex, nh.fits, now) == 0);
    (Some(text), Some(fresh))
}

/// An address and port of a conntrack entry as they read (`[2001:db8::1]:80` for IPv6).
fn ct_sock<A: ct_gc::CtAddr>(a: A, port_be: u16) -> String {
    std::net::SocketAddr::new(a.ip(), u16::from_be(port_be)).to_string()
}

/// Both families' conntrack entries (both tiers each), sorted by flow.
pub fn conntrack(bpffs: &Path) -> Result<Vec<ConntrackView>> {
    let now = boot_seconds();
    // An agent older than the next-hop cache pinned no generation map: every next hop shows as
    // not fresh then.
    let gen = crate::dataplane::read::route_gen(bpffs).ok();
    let mut v = conntrack_views::<u32>(bpffs, now, gen)?;
    v.extend(conntrack_views::<lb_common::Addr6>(bpffs, now, gen)?);
    v.sort_by(|a, b| a.flow.cmp(&b.flow));
    Ok(v)
}

/// One family's conntrack entries at `now`, with next hops checked against route
/// generation `gen`.
fn conntrack_views<A: ct_gc::CtAddr>(
    bpffs: &Path,
    now: u32,
    gen: Option<u32>,
) -> Result<Vec<ConntrackView>>
where
    lb_common::CtKeyOf<A>: aya::Pod,
    lb_common::CtValueOf<A>: aya::Pod,
{
    use lb_common::{ct_flags, ct_state};
    let all = conntrack_tiers::<A>(bpffs)?;
    let last_seen: std::collections::HashMap<lb_common::CtKeyOf<A>, u32> =
        all.iter().map(|(k, v, _)| (*k, v.e.last_seen_s)).collect();
    Ok(all
        .into_iter()
        .map(|(k, v, tier)| {
            let e = v.e;
            let (next_hop, next_hop_fresh) = next_hop_view(&v.nh, gen, now);
            let partner = last_seen.get(&e.partner_key(&k)).copied();
            let last = partner.map_or(e.last_seen_s, |p| ct_gc::latest(e.last_seen_s, p));
            let lifetime = ct_state::lifetime_s(e.state);
            ConntrackView {
                tier,
                state: ct_state::name(e.state),
                expires_in_seconds: lifetime.saturating_sub(now.saturating_sub(last)),
                flow: format!(
                    "{} -> {}",
                    ct_sock(k.saddr_be, k.sport_be),
                    ct_sock(k.daddr_be, k.dport_be)
                ),
                protocol: proto_name(k.proto),
                translated: format!(
                    "{} -> {}",
                    ct_sock(e.nat_saddr_be, e.nat_sport_be),
                    ct_sock(e.nat_daddr_be, e.nat_dport_be)
                ),
                direction: if e.flags & ct_flags::REPLY != 0 {
                    "reply"
                } else {
                    "original"
                },
                snat: e.flags & ct_flags::SNAT != 0,
                local_backend: e.flags & ct_flags::LOCAL_BACKEND != 0,
                backend_id: e.backend_id,
                idle_seconds: now.saturating_sub(e.last_seen_s),
                next_hop,
                next_hop_fresh,
                family: A::FAMILY,
            }
        })
        .collect())
}

#[derive(Debug, Serialize)]
pub struct AffinityView {
    pub svc_port_id: u32,
    pub client: String,
    pub backend: String,
    pub backend_id: u32,
    pub idle_seconds: u32,
    pub timeout_seconds: Option<u32>,
    pub live: bool,
}

pub fn affinity(bpffs: &Path) -> Result<Vec<AffinityView>> {
    use lb_common::{affinity_client, AffinityKey, AffinityValue};
    let s = map_contents(bpffs)?;
    let now = boot_seconds();
    let mut v: Vec<AffinityView> =
        typed::<AffinityKey, AffinityValue>(bpffs, map_name::AFFINITY, true)?
            .into_iter()
            .map(|(k, r)| {
                let timeout = s
                    .services
                    .iter()
                    .find(|(sk, sv)| sk.slot == 0 && sv.svc_port_id == k.svc_port_id)
                    .map(|(_, sv)| sv.affinity_timeout_s);
                let idle = now.saturating_sub(r.last_used_s);
                AffinityView {
                    svc_port_id: k.svc_port_id,
                    client: if k.client_kind == affinity_client::ADDR {
                        std::net::Ipv4Addr::from((k.client as u32).to_ne_bytes()).to_string()
                    } else {
                        format!("netns:{}", k.client)
                    },
                    backend: s
                        .backends
                        .get(&r.backend_id)
                        .map_or("<gone>".into(), |b| backend_addr(&s, b)),
                    backend_id: r.backend_id,
                    idle_seconds: idle,
                    timeout_seconds: timeout,
                    live: timeout.is_some_and(|t| idle <= t),
                }
            })
            .collect();
    v.sort_by(|a, b| (a.svc_port_id, &a.client).cmp(&(b.svc_port_id, &b.client)));
    Ok(v)
}

#[derive(Debug, Serialize)]
pub struct ConfigView {
    pub node_address: String,
    /// The node's IPv6 address translated IPv6 flows leave from (`lb_config6_v2`; `null`
    /// while the agent wrote none: the node has no IPv6 address, or an older agent pinned no
    /// such map).
    pub node_address6: Option<String>,
    /// The node's IPv6 pod CIDR (`lb_config6_v2`), as `pod_cidr` for IPv6 sources (`null`:
    /// none).
    pub pod_cidr6: Option<String>,
    pub snat_ports: String,
    pub ready: bool,
    /// The north-south hook of each device (`xdp` or `tc`), from the pinned links' names
    /// (`links/xdp_<device>`, `links/tc_ingress_<device>`).
    pub devices: Vec<crate::dataplane::links::DeviceHook>,
    /// The node's other interfaces running the tc programs (`links/iface_in_<if>`).
    pub interfaces: Vec<String>,
    /// The node's pod CIDR: ClusterIP packets from it that arrive on an interface keep their
    /// source (`null`: every such source is masqueraded).
    pub pod_cidr: Option<String>,
    /// externalTrafficPolicy Cluster traffic to local backends is masqueraded.
    pub masquerade_local_backends: bool,
}

impl ConfigView {
    /// `eth0=tc,eth1=xdp` (`-` without devices), for the table.
    pub fn hooks_text(&self) -> String {
        if self.devices.is_empty() {
            return "-".into();
        }
        self.devices
            .iter()
            .map(|d| format!("{}={}", d.device, d.hook))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The node's IPv6 address and pod CIDR from `lb_config6_v2`, when the agent wrote them.
fn config6(bpffs: &Path) -> Result<(Option<String>, Option<String>)> {
    if !bpffs.join(map_name::CONFIG6).exists() {
        return Ok((None, None));
    }
    let data = crate::dataplane::pinned::open_pinned(bpffs, map_name::CONFIG6)?;
    let m: aya::maps::Array<aya::maps::MapData, lb_common::Config6> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data))?;
    let c = m.get(&0, 0)?;
    let addr = crate::dataplane::addr6_from_words;
    let pod_cidr6 = (c.pod_mask != [0; 4]).then(|| {
        let len = u128::from(addr(&c.pod_mask)).leading_ones();
        format!("{}/{len}", addr(&c.pod_net))
    });
    Ok((
        (c.ready != 0).then(|| addr(&c.node_addr).to_string()),
        pod_cidr6,
    ))
}

pub fn config(bpffs: &Path) -> Result<ConfigView> {
    let c = map_contents(bpffs)?.config;
    let six = config6(bpffs)?;
    Ok(ConfigView {
        node_address: std::net::Ipv4Addr::from(c.node_addr_be.to_ne_bytes()).to_string(),
        node_address6: six.0,
        pod_cidr6: six.1,
        snat_ports: format!("{}-{}", c.snat_port_min, c.snat_port_max),
        ready: c.ready != 0,
        devices: crate::dataplane::links::device_hooks(bpffs)?,
        interfaces: crate::dataplane::links::other_interfaces(bpffs)?,
        pod_cidr: (c.pod_mask_be != 0).then(|| {
            let net = std::net::Ipv4Addr::from(c.pod_net_be.to_ne_bytes());
            format!("{net}/{}", u32::from_be(c.pod_mask_be).leading_ones())
        }),
        masquerade_local_backends: c.flags & lb_common::config_flags::MASQUERADE_LOCAL != 0,
    })
}

/// What `lbctl lookup` explains.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Lookup {
    pub frontend: String,
    pub scope: &'static str,
    /// `conntrack`, `source range denied` (a new flow from outside the Service's
    /// loadBalancerSourceRanges), `affinity`, `maglev`, `fresh choice`, `no backend` or `not a
    /// frontend`.
    pub reason: &'static str,
    /// The backend the flow has or will get (empty for a fresh choice: see `candidates`).
    pub backend: Option<String>,
    pub candidates: Vec<String>,
}

/// A `lbctl lookup` question: a flow (or a client's next one) to a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupQuery {
    pub frontend: SocketAddr,
    pub proto: u8,
    pub client: IpAddr,
    pub client_port: Option<u16>,
}

/// `lbctl lookup`'s `--frontend IP:PORT/PROTO` (an IPv6 address in brackets,
/// `[2001:db8::10]:80/TCP`; no protocol: TCP) and `--client IP` or `IP:PORT` (`2001:db8::1`,
/// `[2001:db8::1]:40000`). Both of one family: no flow crosses families (each path translates
/// within its own), so a mixed pair names no flow and is a usage error rather than a `not a
/// frontend` answer that would send the user looking for a missing Service.
pub fn parse_lookup(frontend: &str, client: &str) -> Result<LookupQuery> {
    let (addr, proto) = frontend.split_once('/').unwrap_or((frontend, "TCP"));
    let proto = match proto.to_ascii_uppercase().as_str() {
        "TCP" => lb_common::proto::TCP,
        "UDP" => lb_common::proto::UDP,
        p => {
            return Err(usage(format!(
                "--frontend {frontend}: protocol {p} is neither TCP nor UDP"
            )))
        }
    };
    let fe: SocketAddr = addr
        .parse()
        .map_err(|_| usage(format!("--frontend {frontend}: expected IP:PORT/PROTO")))?;
    let (ip, port) = match client.parse::<SocketAddr>() {
        Ok(a) => (a.ip(), Some(a.port())),
        Err(_) => (
            client
                .strip_prefix('[')
                .and_then(|c| c.strip_suffix(']'))
                .unwrap_or(client)
                .parse()
                .map_err(|_| usage(format!("--client {client}: expected IP or IP:PORT")))?,
            None,
        ),
    };
    if fe.is_ipv6() != ip.is_ipv6() {
        return Err(mixed_families(fe, ip));
    }
    Ok(LookupQuery {
        frontend: fe,
        proto,
        client: ip,
        client_port: port,
    })
}

/// The usage error of a frontend and a client of different families.
fn mixed_families(frontend: SocketAddr, client: IpAddr) -> anyhow::Error {
    usage(format!(
        "--frontend {frontend} is {} but --client {client} is {}: a flow has one IP family",
        family(frontend.is_ipv6()),
        family(client.is_ipv6())
    ))
}

/// The backend address and port of the conntrack entry under `key` (either tier) of family `A`.
fn ct_backend<A: CtAddr>(bpffs: &Path, key: CtKeyOf<A>) -> Result<Option<String>>
where
    CtKeyOf<A>: aya::Pod,
    lb_common::CtValueOf<A>: aya::Pod,
{
    Ok(conntrack_tiers::<A>(bpffs)?
        .into_iter()
        .find_map(|(k, v, _)| {
            (k == key).then(|| {
                SocketAddr::new(v.e.nat_daddr_be.ip(), u16::from_be(v.e.nat_dport_be)).to_string()
            })
        }))
}

/// The client and frontend addresses of a flow as the datapath's keys hold them: IPv4 ones as
/// `u32`, IPv6 ones as their wire words (conntrack, hashes and affinity are keyed on the
/// addresses themselves; only the service maps use the IPv6 handles).
#[derive(Clone, Copy)]
enum Ends {
    V4 { client: u32, frontend: u32 },
    V6 { client: Addr6, frontend: Addr6 },
}

impl Ends {
    fn of(frontend: SocketAddr, client: IpAddr) -> Result<Self> {
        Ok(match (frontend.ip(), client) {
            (IpAddr::V4(f), IpAddr::V4(c)) => Ends::V4 {
                client: u32::from_ne_bytes(c.octets()),
                frontend: u32::from_ne_bytes(f.octets()),
            },
            (IpAddr::V6(f), IpAddr::V6(c)) => Ends::V6 {
                client: addr6_words(c),
                frontend: addr6_words(f),
            },
            _ => return Err(mixed_families(frontend, client)),
        })
    }
}

/// Which backend a flow from `client` to `frontend` has or would get, and why. An IPv6 flow
/// is looked up as the IPv6 path (`north_south6::choose`) looks: the frontend by its address's
/// handle in the IPv6 scopes, conntrack in the IPv6 tiers, affinity by the folded client
/// address (`affinity_client::ADDR6`), Maglev by the IPv6 flow hash. A client of the other
/// family than the frontend is a usage error (see [`parse_lookup`]).
pub fn lookup(
    bpffs: &Path,
    frontend: impl Into<SocketAddr>,
    proto: u8,
    client: impl Into<IpAddr>,
    client_port: Option<u16>,
) -> Result<Lookup> {
    use lb_common::{
        affinity_client, scope, AffinityKey, AffinityValue, FrontendSlotKey, MemberKey,
    };
    let (frontend, client) = (frontend.into(), client.into());
    let ends = Ends::of(frontend, client)?;
    let s = map_contents(bpffs)?;
    let fp_be = frontend.port().to_be();
    // The frontends map's address: an IPv6 one by its handle (an address without one is no
    // frontend's), in the IPv6 scopes.
    let (fe_be, external, internal) = match frontend.ip() {
        IpAddr::V4(a) => (
            Some(u32::from_ne_bytes(a.octets())),
            scope::EXTERNAL,
            scope::INTERNAL,
        ),
        IpAddr::V6(a) => (s.addr6.get(&a).copied(), scope::EXTERNAL6, scope::INTERNAL6),
    };
    let master_of = |sc| {
        let k = FrontendSlotKey {
            addr_be: fe_be?,
            port_be: fp_be,
            proto,
            scope: sc,
            slot: 0,
            _pad: 0,
        };
        s.services.get(&k).map(|v| (k, *v))
    };
    // North-south when the frontend is external, else the socket-level entry.
    let (scope_name, found) = match master_of(external) {
        Some(m) => ("external", Some(m)),
        None => ("internal", master_of(internal)),
    };
    let mut out = Lookup {
        frontend: frontend.to_string(),
        scope: scope_name,
        reason: "not a frontend",
        backend: None,
        candidates: vec![],
    };
    let Some((mk, master)) = found else {
        return Ok(out);
    };
    let be = |id: u32| s.backends.get(&id).map(|b| backend_addr(&s, b));
    out.candidates = (1..=master.count)
        .filter_map(|slot| {
            s.services
                .get(&FrontendSlotKey { slot, ..mk })
                .and_then(|v| be(v.backend_id))
        })
        .collect();
    let now = boot_seconds();
    if let (Some(port), "external") = (client_port, scope_name) {
        // The client's packet as the conntrack keys it, in either family.
        fn key<A>(client: A, frontend: A, sport_be: u16, dport_be: u16, proto: u8) -> CtKeyOf<A> {
            CtKeyOf {
                saddr_be: client,
                daddr_be: frontend,
                sport_be,
                dport_be,
                proto,
                _pad: [0; 3],
            }
        }
        let (sp, dp) = (port.to_be(), fp_be);
        let backend = match ends {
            Ends::V4 { client, frontend } => {
                ct_backend::<u32>(bpffs, key(client, frontend, sp, dp, proto))?
            }
            Ends::V6 { client, frontend } => {
                ct_backend::<Addr6>(bpffs, key(client, frontend, sp, dp, proto))?
            }
        };
        if let Some(b) = backend {
            out.reason = "conntrack";
            out.backend = Some(b);
            return Ok(out);
        }
    }
    // A new flow from outside the Service port's loadBalancerSourceRanges is dropped first.
    if scope_name == "external"
        && master.flags & service_flags::SOURCE_RANGES != 0
        && !s.source_ranges.iter().any(|(id, net, len)| {
            *id == master.svc_port_id
                && match (client, *net) {
                    (IpAddr::V4(c), IpAddr::V4(n)) => crate::control::plan::in_prefix(c, n, *len),
                    (IpAddr::V6(c), IpAddr::V6(n)) => FamilyAddr::in_prefix(c, n, *len),
                    _ => false,
                }
        })
    {
        out.reason = "source range denied";
        return Ok(out);
    }
    if master.count == 0 {
        out.reason = "no backend";
        return Ok(out);
    }
    if master.flags & service_flags::SESSION_AFFINITY != 0 && scope_name == "external" {
        let (client_kind, client) = match ends {
            Ends::V4 { client, .. } => (affinity_client::ADDR, client as u64),
            Ends::V6 { client, .. } => (affinity_client::ADDR6, affinity_client::client6(&client)),
        };
        let key = AffinityKey {
            svc_port_id: master.svc_port_id,
            client_kind,
            client,
        };
        let rec = typed::<AffinityKey, AffinityValue>(bpffs, map_name::AFFINITY, true)?
            .into_iter()
            .find(|(k, _)| *k == key);
        if let Some((_, r)) = rec {
            let live = now.saturating_sub(r.last_used_s) <= master.affinity_timeout_s;
            if live
                && s.members.contains_key(&MemberKey {
                    frontend: mk,
                    backend_id: r.backend_id,
                })
            {
                out.reason = "affinity";
                out.backend = be(r.backend_id);
                return Ok(out);
            }
        }
    }
    // North-south with a Maglev table and a known client port: the exact choice.
    if let (Some(port), "external", true) = (
        client_port,
        scope_name,
        master.maglev_id != 0 && master.maglev_m != 0,
    ) {
        let hash = match ends {
            Ends::V4 { client, frontend } => {
                lb_common::flow_hash(client, frontend, port.to_be(), fp_be, proto)
            }
            Ends::V6 { client, frontend } => {
                lb_common::flow_hash6(&client, &frontend, port.to_be(), fp_be, proto)
            }
        };
        let idx = hash % master.maglev_m;
        let key = lb_common::MaglevKey {
            table_id: master.maglev_id,
            chunk: idx / lb_common::MAGLEV_CHUNK,
        };
        if let Some(id) = s
            .maglev
            .get(&key)
            .map(|c| c.backend_ids[(idx % lb_common::MAGLEV_CHUNK) as usize])
        {
            out.reason = "maglev";
            out.backend = be(id);
            return Ok(out);
        }
    }
    out.reason = "fresh choice";
    Ok(out)
}

/// `lbctl status`: the node's load balancer on one screen.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// Whether an agent holds the pin directory (its lock, seen in `/proc/locks`); `None`: not
    /// known (no `/proc/locks`).
    pub agent_running: Option<bool>,
    /// The agent's `/healthz`, when asked for (`--health-addr`).
    pub health: Option<HealthProbe>,
    pub config: ConfigView,
    /// The pinned maps of this lbctl's layout (names carry their version).
    pub layout: Vec<&'static str>,
    /// Pinned maps of another layout version (an upgrade in progress, or leftovers).
    pub other_layouts: Vec<String>,
    pub maps: Vec<crate::dataplane::read::MapOccupancy>,
    /// Kernel memory of all the maps, bytes.
    pub map_memory_bytes: u64,
    /// Counter rates over `interval_seconds`, busiest first.
    pub rates: Vec<CounterRate>,
    pub interval_seconds: f64,
}

/// What `/healthz` answered.
#[derive(Debug, Serialize)]
pub struct HealthProbe {
    pub address: String,
    /// HTTP status, or `None` when unreachable (`error` says why).
    pub status: Option<u16>,
    pub error: Option<String>,
    /// The JSON body (`lastUpdated`, `currentTime`, `nodeEligible`, ...).
    pub body: Option<serde_json::Value>,
}

/// Packets and bytes per second of one datapath counter.
#[derive(Debug, Serialize, PartialEq)]
pub struct CounterRate {
    pub counter: &'static str,
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
}

/// Whether a process holds a `flock` on `dir` (how `lb-agent run` marks its pin directory),
/// from `/proc/locks`, without taking the lock (an agent starting meanwhile must get it).
pub fn agent_holds(dir: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).ok()?;
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(m.dev()),
        libc::minor(m.dev()),
        m.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    Some(locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK ADVISORY WRITE 1234 00:1f:5678 0 EOF" (blocked waiters have "->" first)
        f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&want.as_str())
    }))
}

/// `GET /healthz` at `addr` with a short timeout.
pub fn probe_health(addr: &str) -> HealthProbe {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(1);
    let answer = (|| -> std::io::Result<String> {
        let sa: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut c = std::net::TcpStream::connect_timeout(&sa, timeout)?;
        c.set_read_timeout(Some(timeout))?;
        c.set_write_timeout(Some(timeout))?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: lbctl\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        c.take(64 * 1024).read_to_string(&mut out)?;
        Ok(out)
    })();
    match answer {
        Ok(text) => {
            let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok());
            let body = text
                .split_once("\r\n\r\n")
                .and_then(|(_, b)| serde_json::from_str(b).ok());
            HealthProbe {
                address: addr.into(),
                status,
                error: status.is_none().then(|| "not an HTTP answer".into()),
                body,
            }
        }
        Err(e) => HealthProbe {
            address: addr.into(),
            status: None,
            error: Some(e.to_string()),
            body: None,
        },
    }
}

/// Unix seconds as `2026-12-01T10:00:00Z`.
fn unix_time_text(secs: u64) -> String {
    jiff::Timestamp::from_second(secs as i64)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| secs.to_string())
}

/// Everything `lbctl status` shows; counter rates from two reads `interval` apart.
pub fn status(
    bpffs: &Path,
    health_addr: Option<&str>,
    interval: std::time::Duration,
) -> Result<StatusView> {
    use crate::dataplane::read;
    check_dir(bpffs)?;
    let first = read::stats(bpffs)?;
    let started = std::time::Instant::now();
    std::thread::sleep(interval);
    let second = read::stats(bpffs)?;
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let mut rates: Vec<CounterRate> = second
        .iter()
        .map(|c| {
            let before = first.iter().find(|b| b.name == c.name);
            let dp = c.packets - before.map_or(0, |b| b.packets.min(c.packets));
            let db = c.bytes - before.map_or(0, |b| b.bytes.min(c.bytes));
            CounterRate {
                counter: c.name,
                packets_per_second: dp as f64 / secs,
                bytes_per_second: db as f64 / secs,
            }
        })
        .collect();
    rates.sort_by(|a, b| {
        b.packets_per_second
            .total_cmp(&a.packets_per_second)
            .then(a.counter.cmp(b.counter))
    });
    Ok(StatusView {
        agent_running: agent_holds(bpffs),
        health: health_addr.map(probe_health),
        config: config(bpffs)?,
        layout: map_name::ALL.to_vec(),
        other_layouts: crate::dataplane::pinned::other_versions(bpffs)
            .into_iter()
            .map(|o| o.name)
            .collect(),
        maps: read::map_occupancy(bpffs)?,
        map_memory_bytes: read::map_memory(bpffs)?.iter().map(|(_, b)| b).sum(),
        rates,
        interval_seconds: secs,
    })
}

impl StatusView {
    /// The one-screen text; `wide`: every counter, not only the moving ones.
    pub fn text(&self, wide: bool) -> String {
        let mut out = String::new();
        let agent = match self.agent_running {
            Some(true) => "running (holds the pin directory)",
            Some(false) => "not running (the maps and programs stay as it left them)",
            None => "unknown (no /proc/locks)",
        };
        let health = match &self.health {
            None => String::new(),
            Some(h) => match (h.status, &h.error) {
                (Some(s), _) => format!(
                    "; /healthz at {}: {s}{}",
                    h.address,
                    h.body
                        .as_ref()
                        .and_then(|b| b.get("lastUpdated"))
                        .map(|t| match t.as_u64() {
                            Some(secs) => format!(", last sync at {}", unix_time_text(secs)),
                            None => format!(", last updated {t}"),
                        })
                        .unwrap_or_default()
                ),
                (None, e) => format!(
                    "; /healthz at {}: unreachable ({})",
                    h.address,
                    e.as_deref().unwrap_or("?")
                ),
            },
        };
        out.push_str(&format!("agent:      {agent}{health}\n"));
        let c = &self.config;
        out.push_str(&format!(
            "node:       {}, SNAT ports {}, {}\n",
            c.node_address,
            c.snat_ports,
            if c.ready { "ready" } else { "not ready" }
        ));
        out.push_str(&format!(
            "devices:    {}; other interfaces: {}\n",
            c.hooks_text(),
            if c.interfaces.is_empty() {
                "-".into()
            } else {
                c.interfaces.join(",")
            }
        ));
        out.push_str(&format!(
            "layout:     {} maps ({}){}\n",
            self.layout.len(),
            self.layout
                .iter()
                .find(|m| m.starts_with("lb_svc_v"))
                .copied()
                .unwrap_or("-"),
            if self.other_layouts.is_empty() {
                String::new()
            } else {
                format!("; other versions pinned: {}", self.other_layouts.join(","))
            }
        ));
        out.push_str(&format!(
            "memory:     {:.1} MiB in maps\n\n",
            self.map_memory_bytes as f64 / 1048576.0
        ));
        let rows: Vec<Vec<String>> = self
            .maps
            .iter()
            .map(|m| {
                vec![
                    m.map.to_string(),
                    m.entries.to_string(),
                    m.capacity.to_string(),
                    format!(
                        "{:.1}%",
                        m.entries as f64 * 100.0 / m.capacity.max(1) as f64
                    ),
                ]
            })
            .collect();
        out.push_str(&table(&["MAP", "ENTRIES", "CAPACITY", "FILL"], &rows));
        out.push('\n');
        let rows: Vec<Vec<String>> = self
            .rates
            .iter()
            .filter(|r| wide || r.packets_per_second > 0.0)
            .map(|r| {
                vec![
                    r.counter.to_string(),
                    format!("{:.1}", r.packets_per_second),
                    format!("{:.0}", r.bytes_per_second),
                ]
            })
            .collect();
        out.push_str(&format!(
            "counters over {:.1} s{}:\n",
            self.interval_seconds,
            if wide {
                ""
            } else {
                " (moving ones; -o wide: all)"
            }
        ));
        out.push_str(&table(&["COUNTER", "PACKETS/S", "BYTES/S"], &rows));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::proto::{TCP, UDP};

    fn q(frontend: &str, client: &str) -> LookupQuery {
        parse_lookup(frontend, client).unwrap()
    }

    /// The message of a usage error (exit code 2), or a panic for any other outcome.
    fn usage_error(frontend: &str, client: &str) -> String {
        let e = parse_lookup(frontend, client).unwrap_err();
        assert!(
            e.downcast_ref::<crate::error::UsageError>().is_some(),
            "{e:#}"
        );
        e.to_string()
    }

    #[test]
    fn lookup_arguments_of_either_family() {
        assert_eq!(
            q("203.0.113.10:80/TCP", "10.0.0.1:40000"),
            LookupQuery {
                frontend: "203.0.113.10:80".parse().unwrap(),
                proto: TCP,
                client: "10.0.0.1".parse().unwrap(),
                client_port: Some(40000),
            }
        );
        assert_eq!(q("203.0.113.10:53/udp", "10.0.0.1").client_port, None);
        assert_eq!(q("203.0.113.10:53/udp", "10.0.0.1").proto, UDP);
        assert_eq!(
            q("[2001:db8::10]:80/TCP", "[2001:db8::1]:40000"),
            LookupQuery {
                frontend: "[2001:db8::10]:80".parse().unwrap(),
                proto: TCP,
                client: "2001:db8::1".parse().unwrap(),
                client_port: Some(40000),
            }
        );
        for client in ["2001:db8::1", "[2001:db8::1]"] {
            let l = q("[2001:db8::10]:53/UDP", client);
            assert_eq!(
                (l.client, l.client_port, l.proto),
                ("2001:db8::1".parse().unwrap(), None, UDP),
                "{client}"
            );
        }
        // No protocol: TCP, as for IPv4.
        assert_eq!(q("[2001:db8::10]:80", "2001:db8::1").proto, TCP);
    }

    #[test]
    fn lookup_arguments_of_two_families_are_a_usage_error() {
        assert_eq!(
            usage_error("[2001:db8::10]:80/TCP", "10.0.0.1"),
            "--frontend [2001:db8::10]:80 is IPv6 but --client 10.0.0.1 is IPv4: a flow has one IP family"
        );
        assert_eq!(
            usage_error("203.0.113.10:80/TCP", "[2001:db8::1]:40000"),
            "--frontend 203.0.113.10:80 is IPv4 but --client 2001:db8::1 is IPv6: a flow has one IP family"
        );
        // The library call says the same (no maps read: the directory does not exist).
        let e = lookup(
            Path::new("/nonexistent"),
            "[2001:db8::10]:80".parse::<SocketAddr>().unwrap(),
            TCP,
            "10.0.0.1".parse::<Ipv4Addr>().unwrap(),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("a flow has one IP family"), "{e:#}");
        // Malformed arguments keep their messages; an IPv6 address without brackets is no
        // socket address.
        assert_eq!(
            usage_error("2001:db8::10:80/TCP", "2001:db8::1"),
            "--frontend 2001:db8::10:80/TCP: expected IP:PORT/PROTO"
        );
        assert_eq!(
            usage_error("[2001:db8::10]:80/SCTP", "2001:db8::1"),
            "--frontend [2001:db8::10]:80/SCTP: protocol SCTP is neither TCP nor UDP"
        );
        assert_eq!(
            usage_error("[2001:db8::10]:80/TCP", "2001:db8::1:40000:x"),
            "--client 2001:db8::1:40000:x: expected IP or IP:PORT"
        );
    }
}
