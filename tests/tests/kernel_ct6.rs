//! The IPv6 conntrack tiers (`lb_ct6_v1`, `lb_ct6_new_v1`) outside the datapath, on entries the
//! real IPv6 path wrote through BPF_PROG_TEST_RUN: the agent's sweep
//! (`ct_gc::sweep` over `CtTiers<Addr6>`) removes exactly the expired IPv6 flows and leaves the
//! IPv4 tiers alone, `lbctl`'s views show IPv6 entries (`family`, IPv6 addresses) and the
//! node's IPv6 address, `lbctl lookup` explains IPv6 flows as the IPv6 path chose them, and a
//! sync that removes an IPv6 backend from a UDP Service port flushes that backend's IPv6 UDP
//! flows (as `kernel_ct_flush.rs` checks for IPv4).
use lb_common::{ct_state, map_name, scope, service_flags, Addr6};
use lb_tests::{
    fixture::frames::{
        config, config6, ct_key6, frame, frame6, Kind, CLIENT, CLIENT6, NODE, NODE6, REMOTE_POD,
        REMOTE_POD6, TCP, UDP,
    },
    harness::XdpHarness,
};
use lb_userspace::{
    control::desired::{BackendKey, Desired, DesiredFrontend, FrontendKey},
    dataplane::{
        ct_gc::{sweep, CtTiers, Tier},
        pinned::open_pinned,
        read::boot_seconds,
    },
    inspect,
};

/// A harness with an IPv6 NodePort (`[NODE6]:30081` -> `[REMOTE_POD6]:8080`, SNAT to the
/// node's IPv6 address) and an IPv4 one (`NODE:30081` -> `REMOTE_POD:8080`).
fn harness() -> XdpHarness {
    let mut h = XdpHarness::new().unwrap();
    h.set_config(&config(61000, 65535)).unwrap();
    h.set_config6(&config6()).unwrap();
    let fe = |addr: std::net::IpAddr| FrontendKey {
        addr: std::net::SocketAddr::new(addr, 30081),
        proto: TCP,
        scope: scope::EXTERNAL,
    };
    let entry = |name: &str, backend: std::net::IpAddr| DesiredFrontend {
        service_port: name.into(),
        flags: service_flags::NODE_PORT,
        affinity_timeout_s: 0,
        source_ranges: None,
        backends: vec![(
            BackendKey {
                addr: std::net::SocketAddr::new(backend, 8080),
                proto: TCP,
            },
            0,
        )],
    };
    let desired: Desired = [
        (
            fe(std::net::Ipv6Addr::from(NODE6).into()),
            entry(
                "default/web:http/TCP/IPv6",
                std::net::Ipv6Addr::from(REMOTE_POD6).into(),
            ),
        ),
        (
            fe(std::net::Ipv4Addr::from(NODE).into()),
            entry(
                "default/web:http/TCP",
                std::net::Ipv4Addr::from(REMOTE_POD).into(),
            ),
        ),
    ]
    .into();
    h.program(&desired).unwrap();
    h
}

/// The IPv6 tiers as the agent's sweep opens them (pinned by name in the harness's directory).
fn tiers6(h: &XdpHarness) -> CtTiers<Addr6> {
    CtTiers::from_maps(
        open_pinned(h.pin_dir(), map_name::CONNTRACK6).unwrap(),
        open_pinned(h.pin_dir(), map_name::CONNTRACK6_NEW).unwrap(),
    )
}

fn tiers4(h: &XdpHarness) -> CtTiers {
    CtTiers::from_maps(
        open_pinned(h.pin_dir(), map_name::CONNTRACK).unwrap(),
        open_pinned(h.pin_dir(), map_name::CONNTRACK_NEW).unwrap(),
    )
}

/// (established, new) entry counts of a family's tiers.
fn counts<A: lb_userspace::dataplane::ct_gc::CtAddr>(t: &CtTiers<A>) -> (usize, usize)
where
    lb_common::CtKeyOf<A>: aya::Pod,
    lb_common::CtValueOf<A>: aya::Pod,
{
    (
        t.entries(Tier::Established).unwrap().len(),
        t.entries(Tier::New).unwrap().len(),
    )
}

/// A SYN of the IPv6 client from `port` to the IPv6 NodePort; returns the SNAT port it got.
fn syn6(h: &XdpHarness, port: u16) -> u16 {
    let out = h
        .run(&frame6(Kind::Syn, (CLIENT6, port), (NODE6, 30081)))
        .unwrap()
        .output;
    // Translated: from the node's IPv6 address to the backend.
    assert_eq!(out[22..38], NODE6, "source of the translated SYN");
    assert_eq!(
        out[38..54],
        REMOTE_POD6,
        "destination of the translated SYN"
    );
    u16::from_be_bytes([out[54], out[55]])
}

/// A whole IPv6 handshake from `port`: SYN, the backend's SYN-ACK, the client's ACK.
fn handshake6(h: &XdpHarness, port: u16) {
    let snat_port = syn6(h, port);
    h.run(&frame6(
        Kind::SynAck,
        (REMOTE_POD6, 8080),
        (NODE6, snat_port),
    ))
    .unwrap();
    h.run(&frame6(Kind::Ack, (CLIENT6, port), (NODE6, 30081)))
        .unwrap();
}

#[test]
fn kernel_ct_gc_sweeps_the_ipv6_tiers() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let h = harness();
    // One IPv6 flow that stays unconfirmed (a SYN), one confirmed; one IPv4 flow.
    syn6(&h, 40000);
    handshake6(&h, 40001);
    h.run(&frame(Kind::Syn, (CLIENT, 40000), (NODE, 30081)))
        .unwrap();
    let (t6, t4) = (tiers6(&h), tiers4(&h));
    assert_eq!(
        counts(&t6),
        (2, 2),
        "IPv6: a confirmed and an unconfirmed flow"
    );
    assert_eq!(counts(&t4), (0, 2), "IPv4: an unconfirmed flow");
    let states: Vec<u8> = t6
        .entries(Tier::New)
        .unwrap()
        .iter()
        .map(|(_, e)| e.state)
        .collect();
    assert_eq!(states, [ct_state::TCP_SYN_SENT; 2]);

    // Now: nothing has expired.
    let now = boot_seconds();
    let st = sweep(&t6, now).unwrap();
    assert_eq!((st.examined, st.removed), (4, 0), "{st:?}");
    // Past the SYN's lifetime (a margin for the seconds the packets took): the unconfirmed
    // flow goes, both entries; the established one stays.
    let syn_gone = now + ct_state::lifetime_s(ct_state::TCP_SYN_SENT) + 5;
    assert!(syn_gone < now + ct_state::lifetime_s(ct_state::TCP_ESTABLISHED));
    let st = sweep(&t6, syn_gone).unwrap();
    assert_eq!(st.removed, 2, "{st:?}");
    assert_eq!((st.established_entries, st.new_entries), (2, 0), "{st:?}");
    assert_eq!(counts(&t6), (2, 0));
    // The IPv4 tiers are their own: an IPv6 sweep never touched them, and an IPv4 sweep far
    // in the future empties them and leaves the IPv6 flow.
    assert_eq!(counts(&t4), (0, 2));
    let far = now + ct_state::lifetime_s(ct_state::TCP_ESTABLISHED) + 5;
    assert_eq!(sweep(&t4, far).unwrap().removed, 2);
    assert_eq!(counts(&t6), (2, 0));
    // Past the established lifetime the confirmed IPv6 flow goes too.
    assert_eq!(sweep(&t6, far).unwrap().removed, 2);
    assert_eq!(counts(&t6), (0, 0));
}

#[test]
fn kernel_lbctl_views_show_ipv6_conntrack_and_config() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let h = harness();
    syn6(&h, 40000);
    handshake6(&h, 40001);
    h.run(&frame(Kind::Syn, (CLIENT, 40000), (NODE, 30081)))
        .unwrap();
    let v = inspect::conntrack(h.pin_dir()).unwrap();
    let rows: Vec<(&str, &str, &str, &str, &str)> = v
        .iter()
        .map(|c| {
            (
                c.family,
                c.tier,
                c.direction,
                c.flow.as_str(),
                c.translated.as_str(),
            )
        })
        .collect();
    let ipv6: Vec<_> = rows.iter().filter(|r| r.0 == "IPv6").collect();
    let ipv4: Vec<_> = rows.iter().filter(|r| r.0 == "IPv4").collect();
    assert_eq!((ipv6.len(), ipv4.len()), (4, 2), "{rows:#?}");
    // The unconfirmed IPv6 flow's original direction, in the new tier, addresses as IPv6
    // socket addresses.
    let snat = v
        .iter()
        .find(|c| c.flow == "[fd00:100::100]:40000 -> [fd00:100::1]:30081")
        .unwrap_or_else(|| panic!("no IPv6 SYN entry: {rows:#?}"));
    assert_eq!(
        (snat.family, snat.tier, snat.direction, snat.protocol),
        ("IPv6", "new", "original", "TCP")
    );
    assert!(
        snat.translated.starts_with("[fd00:100::1]:")
            && snat.translated.ends_with(" -> [fd00:244:2::10]:8080"),
        "{snat:?}"
    );
    assert!(snat.snat, "{snat:?}");
    // The confirmed flow's entries in the established tier.
    assert!(
        ipv6.iter()
            .filter(|r| r.1 == "established")
            .any(|r| r.3 == "[fd00:100::100]:40001 -> [fd00:100::1]:30081"),
        "{rows:#?}"
    );
    // The IPv4 entries read as before.
    assert!(
        ipv4.iter()
            .any(|r| r.3 == "192.168.100.100:40000 -> 192.168.100.1:30081"),
        "{rows:#?}"
    );
    // The JSON keeps the existing fields and adds `family`.
    let json = serde_json::to_value(&v[0]).unwrap();
    for field in [
        "flow",
        "protocol",
        "translated",
        "direction",
        "snat",
        "local_backend",
        "backend_id",
        "idle_seconds",
        "state",
        "expires_in_seconds",
        "tier",
        "next_hop",
        "next_hop_fresh",
        "family",
    ] {
        assert!(json.get(field).is_some(), "{field} missing: {json}");
    }

    let c = inspect::config(h.pin_dir()).unwrap();
    assert_eq!(c.node_address, "192.168.100.1");
    assert_eq!(c.node_address6.as_deref(), Some("fd00:100::1"));
}

/// The IPv6 path keeps a confirmed flow's next hop in its conntrack value and reuses it while
/// it is fresh, as the IPv4 path does: in a namespace with a route to the backends (the
/// bench's), an established packet leaves with XDP_TX and its entry holds the FIB's answer; a
/// planted answer is used as it is (no lookup); a new route generation makes the next packet
/// look the route up again.
#[test]
fn kernel_xdp6_caches_the_next_hop_of_a_confirmed_flow() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let ns = lb_tests::bench::testrun::BenchNetns::new().unwrap();
    ns.run(|| {
        let ifindex = {
            let c = std::ffi::CString::new("bench0").unwrap();
            // SAFETY: plain libc call on a valid C string.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        };
        assert_ne!(ifindex, 0);
        let mut h = harness();
        handshake6(&h, 40001);
        let ack = frame6(Kind::Ack, (CLIENT6, 40001), (NODE6, 30081));
        let ctx = lb_tests::bench::testrun::xdp_md(ifindex, ack.len());
        let send = |h: &XdpHarness| {
            let r = h.run_ctx(lb_common::program_name::XDP, &ack, &ctx).unwrap();
            assert_eq!(r.verdict, 3, "XDP_TX");
            <[u8; 6]>::try_from(&r.output[0..6]).unwrap()
        };
        let key = lb_tests::fixture::frames::ct_key6((CLIENT6, 40001), (NODE6, 30081), TCP);
        let data = open_pinned(h.pin_dir(), map_name::CONNTRACK6).unwrap();
        let mut m: aya::maps::HashMap<_, lb_common::CtKey6, lb_common::CtValue6> =
            aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).unwrap();
        let neighbour = [2, 0, 0, 0, 0, 2];
        assert_eq!(send(&h), neighbour, "the FIB's next hop");
        let v = m.get(&key, 0).unwrap();
        assert_eq!(
            (v.nh.in_ifindex, v.nh.out_ifindex, v.nh.dmac),
            (ifindex, ifindex, neighbour),
            "{v:?}"
        );
        // A planted answer is what the next packet uses: no lookup while it is fresh.
        let planted = [2, 0, 0, 0, 0, 0x99];
        let mut p = v;
        p.nh.dmac = planted;
        m.insert(key, p, 0).unwrap();
        assert_eq!(send(&h), planted);
        // A routing change (a new generation): looked up again, and kept.
        h.set_route_gen(h.route_gen().unwrap() + 1).unwrap();
        assert_eq!(send(&h), neighbour);
        assert_eq!(m.get(&key, 0).unwrap().nh.dmac, neighbour);
        Ok(())
    })
    .unwrap();
}

/// A second remote IPv6 pod (`fd00:244:2::11`).
const REMOTE_POD6_B: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];

/// Every key of a family's tiers, with its tier.
fn keys_of<A: lb_userspace::dataplane::ct_gc::CtAddr>(
    t: &CtTiers<A>,
) -> std::collections::BTreeSet<(String, &'static str)>
where
    lb_common::CtKeyOf<A>: aya::Pod + std::fmt::Debug,
    lb_common::CtValueOf<A>: aya::Pod,
{
    [(Tier::Established, "established"), (Tier::New, "new")]
        .into_iter()
        .flat_map(|(tier, name)| {
            t.entries(tier)
                .unwrap()
                .into_iter()
                .map(move |(k, _)| (format!("{k:?}"), name))
        })
        .collect()
}

/// kube-proxy clears the UDP conntrack entries of endpoints that went away; the IPv6 flows of
/// a removed IPv6 backend sit in the IPv6 tiers, and the same sync removes them there: both
/// directions, confirmed (replied) and unconfirmed flows. The other backend's UDP flows stay, a
/// TCP flow stays (its backend removed too: a TCP connection may finish), and so does a TCP
/// entry naming the UDP Service port and the removed backend (only UDP entries are flushed).
/// Flows written by the real IPv6 path.
#[test]
fn kernel_sync_flushes_the_ipv6_udp_flows_of_a_removed_backend() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let mut h = XdpHarness::new().unwrap();
    h.set_config(&config(61000, 65535)).unwrap();
    h.set_config6(&config6()).unwrap();
    let fe = |p: u8| FrontendKey {
        addr: std::net::SocketAddr::new(NODE6.into(), 30053),
        proto: p,
        scope: scope::EXTERNAL,
    };
    let be = |a: [u8; 16], p: u8| BackendKey {
        addr: std::net::SocketAddr::new(a.into(), 53),
        proto: p,
    };
    let front = |name: &str, backends: &[BackendKey]| DesiredFrontend {
        service_port: name.into(),
        flags: service_flags::NODE_PORT,
        affinity_timeout_s: 0,
        source_ranges: None,
        backends: backends.iter().map(|b| (*b, 0)).collect(),
    };
    let (udp_fe, tcp_fe) = (fe(UDP), fe(TCP));
    let (b1, b2, t2) = (
        be(REMOTE_POD6, UDP),
        be(REMOTE_POD6_B, UDP),
        be(REMOTE_POD6_B, TCP),
    );
    let mut d: Desired = [
        (udp_fe, front("default/dns:53/UDP/IPv6", &[b1, b2])),
        (tcp_fe, front("default/dns:53/TCP/IPv6", &[t2])),
    ]
    .into();
    h.program(&d).unwrap();

    // UDP flows from 16 client ports, over both backends; every other one answered by its
    // backend (confirmed: the established tier), the rest unconfirmed (the new tier).
    let mut goes = std::collections::BTreeSet::new();
    let mut on = [0usize; 2];
    for (i, port) in (40000..40016u16).enumerate() {
        let out = h
            .run(&frame6(Kind::Udp, (CLIENT6, port), (NODE6, 30053)))
            .unwrap()
            .output;
        let backend: [u8; 16] = out[38..54].try_into().unwrap();
        let snat_port = u16::from_be_bytes([out[54], out[55]]);
        assert!(
            backend == REMOTE_POD6 || backend == REMOTE_POD6_B,
            "{backend:?}"
        );
        if i % 2 == 0 {
            h.run(&frame6(Kind::Udp, (backend, 53), (NODE6, snat_port)))
                .unwrap();
        }
        let tier = if i % 2 == 0 { "established" } else { "new" };
        let keys = [
            ct_key6((CLIENT6, port), (NODE6, 30053), UDP),
            ct_key6((backend, 53), (NODE6, snat_port), UDP),
        ];
        on[(backend == REMOTE_POD6_B) as usize] += 1;
        if backend == REMOTE_POD6_B {
            goes.extend(keys.iter().map(|k| (format!("{k:?}"), tier)));
        }
    }
    assert!(on[0] > 0 && on[1] > 0, "flows on both backends: {on:?}");
    // A TCP connection to the TCP port's backend (the same pod).
    let out = h
        .run(&frame6(Kind::Syn, (CLIENT6, 41000), (NODE6, 30053)))
        .unwrap()
        .output;
    assert_eq!(out[38..54], REMOTE_POD6_B);
    let snat_port = u16::from_be_bytes([out[54], out[55]]);
    h.run(&frame6(
        Kind::SynAck,
        (REMOTE_POD6_B, 53),
        (NODE6, snat_port),
    ))
    .unwrap();
    h.run(&frame6(Kind::Ack, (CLIENT6, 41000), (NODE6, 30053)))
        .unwrap();
    // A TCP entry naming the UDP port and the backend that leaves it (a copy of one of its
    // UDP flows' entries under a TCP key).
    let t6 = tiers6(&h);
    let b2_key = (40000..40016u16)
        .map(|port| ct_key6((CLIENT6, port), (NODE6, 30053), UDP))
        .find(|k| goes.iter().any(|(g, _)| *g == format!("{k:?}")))
        .unwrap();
    let (b2_entry, _) = t6.get(&b2_key).unwrap().unwrap();
    let tcp_copy = lb_common::CtKey6 {
        proto: TCP,
        ..b2_key
    };
    t6.insert(&tcp_copy, &b2_entry, Tier::Established).unwrap();

    let before = keys_of(&t6);
    assert!(goes.is_subset(&before), "{goes:#?}\n{before:#?}");
    for tier in ["established", "new"] {
        assert!(goes.iter().any(|(_, t)| *t == tier), "{tier}: {goes:#?}");
    }
    // 16 UDP flows and a TCP one, two entries each, and the TCP copy.
    assert_eq!(before.len(), 2 * 17 + 1);
    let v4_before = keys_of(&tiers4(&h));

    // The second pod leaves both Service ports: one sync.
    d.insert(udp_fe, front("default/dns:53/UDP/IPv6", &[b1]));
    d.insert(tcp_fe, front("default/dns:53/TCP/IPv6", &[]));
    let st = h.syncer.sync(&d).unwrap();
    let after = keys_of(&t6);
    assert_eq!(st.udp_flows_flushed, goes.len() as u64);
    assert_eq!(
        before
            .difference(&after)
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        goes,
        "exactly the second pod's UDP flows are gone"
    );
    assert!(after.contains(&(format!("{tcp_copy:?}"), "established")));
    assert_eq!(keys_of(&tiers4(&h)), v4_before);
    // A sync that changes nothing flushes nothing.
    assert_eq!(h.syncer.sync(&d).unwrap().udp_flows_flushed, 0);
}

/// `lbctl lookup` on IPv6 flows, against what the real IPv6 path did: an IPv6 NodePort with
/// two backends (a Maglev table) and one with session affinity. The lookup must build the
/// kernel's keys: the frontend by its address's handle in the IPv6 scopes, the conntrack key in
/// the IPv6 tiers, the IPv6 flow hash, the folded-address affinity key.
#[test]
fn kernel_lookup_explains_ipv6_flows() {
    use std::net::{IpAddr, Ipv6Addr, SocketAddr};
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let mut h = XdpHarness::new().unwrap();
    h.set_config(&config(61000, 65535)).unwrap();
    h.set_config6(&config6()).unwrap();
    let fe = |port: u16| FrontendKey {
        addr: SocketAddr::new(NODE6.into(), port),
        proto: TCP,
        scope: scope::EXTERNAL,
    };
    let front = |name: &str, flags: u16, affinity_timeout_s: u32| DesiredFrontend {
        service_port: name.into(),
        flags: service_flags::NODE_PORT | flags,
        affinity_timeout_s,
        source_ranges: None,
        backends: [REMOTE_POD6, REMOTE_POD6_B]
            .into_iter()
            .map(|a| {
                (
                    BackendKey {
                        addr: SocketAddr::new(a.into(), 8080),
                        proto: TCP,
                    },
                    0,
                )
            })
            .collect(),
    };
    let desired: Desired = [
        (fe(30081), front("default/web:http/TCP/IPv6", 0, 0)),
        (
            fe(30082),
            front(
                "default/sticky:http/TCP/IPv6",
                service_flags::SESSION_AFFINITY,
                10800,
            ),
        ),
    ]
    .into();
    h.program(&desired).unwrap();
    let pods = ["[fd00:244:2::10]:8080", "[fd00:244:2::11]:8080"];
    let node = |port: u16| SocketAddr::new(IpAddr::from(NODE6), port);
    let client = IpAddr::from(CLIENT6);
    let lookup = |frontend: SocketAddr, client: IpAddr, port: Option<u16>| {
        inspect::lookup(h.pin_dir(), frontend, TCP, client, port).unwrap()
    };
    // The backend a SYN from the client's `port` to `frontend` went to, as `[addr]:port`.
    let syn = |src: [u8; 16], port: u16, frontend: u16| {
        let out = h
            .run(&frame6(Kind::Syn, (src, port), (NODE6, frontend)))
            .unwrap()
            .output;
        let to: [u8; 16] = out[38..54].try_into().unwrap();
        let to_port = u16::from_be_bytes([out[56], out[57]]);
        SocketAddr::new(Ipv6Addr::from(to).into(), to_port).to_string()
    };

    // New flows: the Maglev table's choice for the five-tuple, which the SYN then gets; over
    // enough ports both backends come up.
    let mut seen = std::collections::BTreeSet::new();
    for port in 42000..42032u16 {
        let l = lookup(node(30081), client, Some(port));
        assert_eq!(
            (l.frontend.as_str(), l.scope, l.reason),
            ("[fd00:100::1]:30081", "external", "maglev"),
            "{l:?}"
        );
        assert_eq!(l.candidates, pods, "{l:?}");
        let predicted = l.backend.clone().unwrap();
        assert_eq!(syn(CLIENT6, port, 30081), predicted, "client port {port}");
        // Now the flow is in the IPv6 conntrack (the new tier): the same backend, from there.
        let l = lookup(node(30081), client, Some(port));
        assert_eq!(
            (l.reason, l.backend.as_deref()),
            ("conntrack", Some(predicted.as_str()))
        );
        seen.insert(predicted);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // A confirmed flow: still found (the established tier).
    handshake_to(&h, 42000, 30081);
    let key = ct_key6((CLIENT6, 42000), (NODE6, 30081), TCP);
    assert_eq!(tiers6(&h).get(&key).unwrap().unwrap().1, Tier::Established);
    assert_eq!(lookup(node(30081), client, Some(42000)).reason, "conntrack");
    // Without a client port: the candidates, no backend.
    let l = lookup(node(30081), client, None);
    assert_eq!((l.reason, l.backend), ("fresh choice", None));
    assert_eq!(l.candidates, pods);

    // Affinity: the client's first connection records its backend, keyed on the folded IPv6
    // address; lookup finds the record, for a new port or none; another client has none.
    let sticky = syn(CLIENT6, 43000, 30082);
    for port in [None, Some(43001)] {
        let l = lookup(node(30082), client, port);
        assert_eq!(
            (l.reason, l.backend.as_deref()),
            ("affinity", Some(sticky.as_str())),
            "{port:?}"
        );
    }
    let mut other = CLIENT6;
    other[15] = 0x01;
    let l = lookup(node(30082), IpAddr::from(other), None);
    assert_eq!((l.reason, l.backend), ("fresh choice", None));

    // An address with no handle, and an IPv6 port nothing serves: no frontend.
    for frontend in ["[2001:db8::99]:30081", "[fd00:100::1]:30099"] {
        let l = lookup(frontend.parse().unwrap(), client, Some(42000));
        assert_eq!(l.reason, "not a frontend", "{frontend}");
    }
    // Families do not mix.
    let e = inspect::lookup(
        h.pin_dir(),
        node(30081),
        TCP,
        IpAddr::from(CLIENT),
        Some(42000),
    )
    .unwrap_err();
    assert!(
        e.downcast_ref::<lb_userspace::error::UsageError>()
            .is_some(),
        "{e:#}"
    );
}

/// The client's ACK after the backend's SYN-ACK, confirming the flow from `port` to the IPv6
/// NodePort `frontend` (its SYN already sent).
fn handshake_to(h: &XdpHarness, port: u16, frontend: u16) {
    let reply = tiers6(h)
        .get(&ct_key6((CLIENT6, port), (NODE6, frontend), TCP))
        .unwrap()
        .expect("the SYN's entry")
        .0;
    let backend = lb_userspace::dataplane::ct_gc::CtAddr::ip(reply.nat_daddr_be);
    let std::net::IpAddr::V6(backend) = backend else {
        unreachable!()
    };
    h.run(&frame6(
        Kind::SynAck,
        (backend.octets(), u16::from_be(reply.nat_dport_be)),
        (NODE6, u16::from_be(reply.nat_sport_be)),
    ))
    .unwrap();
    h.run(&frame6(Kind::Ack, (CLIENT6, port), (NODE6, frontend)))
        .unwrap();
}
