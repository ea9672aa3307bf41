//! A sync that removes a backend from a UDP Service port flushes that backend's UDP conntrack
//! flows of that Service port (both directions, both tiers) within the same sync, as kube-proxy
//! clears conntrack for removed UDP endpoints, and nothing else: TCP flows, other backends'
//! flows and the same backend's flows of another Service port stay. Real maps (the object's,
//! pinned by the packet-fixture harness) and the real sync code.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{ct_flags, ct_state, proto, scope, service_flags, CtEntry, CtKey};
use lb_tests::harness::XdpHarness;
use lb_userspace::{
    control::desired::{BackendKey, Desired, DesiredFrontend, FrontendKey},
    dataplane::ct_gc::Tier,
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);

fn fe(port: u16, p: u8) -> FrontendKey {
    FrontendKey {
        addr: std::net::SocketAddr::V4(SocketAddrV4::new(NODE, port)),
        proto: p,
        scope: scope::EXTERNAL,
    }
}

fn be(last: u8, p: u8) -> BackendKey {
    BackendKey {
        addr: std::net::SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, last), 53)),
        proto: p,
    }
}

fn front(name: &str, backends: &[BackendKey]) -> DesiredFrontend {
    DesiredFrontend {
        service_port: name.into(),
        flags: service_flags::NODE_PORT,
        affinity_timeout_s: 0,
        source_ranges: None,
        backends: backends.iter().map(|b| (*b, 0)).collect(),
    }
}

/// A flow's two entries from client 10.0.0.<n>:<4000+n> to `frontend`, on `backend`.
fn flow(
    n: u8,
    frontend: &FrontendKey,
    svc_port_id: u32,
    backend: (&BackendKey, u32),
    protocol: u8,
) -> [(CtKey, CtEntry); 2] {
    let ip = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
    let key = CtKey {
        saddr_be: ip(Ipv4Addr::new(10, 0, 0, n)),
        daddr_be: ip(v4(frontend.addr)),
        sport_be: (4000 + n as u16).to_be(),
        dport_be: frontend.addr.port().to_be(),
        proto: protocol,
        _pad: [0; 3],
    };
    let e = CtEntry {
        nat_saddr_be: ip(NODE),
        nat_daddr_be: ip(v4(backend.0.addr)),
        nat_sport_be: (20000 + n as u16).to_be(),
        nat_dport_be: backend.0.addr.port().to_be(),
        svc_port_id,
        backend_id: backend.1,
        last_seen_s: 1,
        flags: ct_flags::SNAT,
        state: if protocol == proto::UDP {
            ct_state::UDP_REPLIED
        } else {
            ct_state::TCP_ESTABLISHED
        },
        _pad: 0,
        seq_next: 0,
    };
    let (rk, r) = e.partner(&key);
    [(key, e), (rk, r)]
}

#[test]
fn kernel_sync_flushes_the_udp_flows_of_a_removed_backend() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let mut h = XdpHarness::new().expect("loading the XDP program into the kernel");
    let (dns_udp, dns_tcp, other_udp) = (
        fe(30053, proto::UDP),
        fe(30053, proto::TCP),
        fe(30054, proto::UDP),
    );
    let (b1, b2) = (be(1, proto::UDP), be(2, proto::UDP));
    let (t1, t2) = (be(1, proto::TCP), be(2, proto::TCP));
    let mut d: Desired = [
        (dns_udp, front("kube-system/dns:53/UDP", &[b1, b2])),
        (dns_tcp, front("kube-system/dns:53/TCP", &[t1, t2])),
        (other_udp, front("default/other:53/UDP", &[b2])),
    ]
    .into();
    let st = h.syncer.sync(&d).unwrap();
    assert_eq!(st.udp_flows_flushed, 0);
    let ids = h.syncer.service_ports().clone();
    let contents = lb_userspace::dataplane::Dataplane::contents(h.syncer.dataplane()).unwrap();
    let id_of = |b: &BackendKey| {
        contents
            .backends
            .iter()
            .find(|(_, v)| {
                v.addr_be == u32::from_ne_bytes(v4(b.addr).octets()) && v.proto == b.proto
            })
            .map(|(id, _)| *id)
            .unwrap()
    };
    let (dns, dns_t, other) = (
        ids["kube-system/dns:53/UDP"],
        ids["kube-system/dns:53/TCP"],
        ids["default/other:53/UDP"],
    );

    let t = lb_userspace::dataplane::pinned::open_conntrack(h.pin_dir()).unwrap();
    let mut flushed = BTreeSet::new();
    let mut n = 0;
    let mut stage = |f: [(CtKey, CtEntry); 2], tier: Tier, goes: bool| {
        for (k, e) in f {
            t.insert(&k, &e, tier).unwrap();
            if goes {
                flushed.insert(format!("{k:?}"));
            }
        }
    };
    for tier in [Tier::Established, Tier::New] {
        for _ in 0..3 {
            n += 1;
            // b2's UDP flows of the DNS port: these go.
            stage(
                flow(n, &dns_udp, dns, (&b2, id_of(&b2)), proto::UDP),
                tier,
                true,
            );
            n += 1;
            // b1's stay; b2's of the other Service port stay.
            stage(
                flow(n, &dns_udp, dns, (&b1, id_of(&b1)), proto::UDP),
                tier,
                false,
            );
            n += 1;
            stage(
                flow(n, &other_udp, other, (&b2, id_of(&b2)), proto::UDP),
                tier,
                false,
            );
            n += 1;
            // TCP flows stay: the TCP port's, and a TCP entry naming the UDP port and b2.
            stage(
                flow(n, &dns_tcp, dns_t, (&t2, id_of(&t2)), proto::TCP),
                tier,
                false,
            );
            n += 1;
            stage(
                flow(n, &dns_tcp, dns, (&b2, id_of(&b2)), proto::TCP),
                tier,
                false,
            );
        }
    }
    let before = lb_tests::harness::ct_keys(&t);
    assert_eq!(before.len(), 2 * 3 * 5 * 2);

    // b2 leaves the DNS UDP port (and the TCP one): one sync.
    d.insert(dns_udp, front("kube-system/dns:53/UDP", &[b1]));
    d.insert(dns_tcp, front("kube-system/dns:53/TCP", &[t1]));
    let st = h.syncer.sync(&d).unwrap();
    let after = lb_tests::harness::ct_keys(&t);
    assert_eq!(st.udp_flows_flushed, flushed.len() as u64);
    assert_eq!(
        before.difference(&after).cloned().collect::<BTreeSet<_>>(),
        flushed,
        "exactly b2's UDP flows of the DNS port are gone"
    );
    // A sync that changes nothing flushes nothing.
    assert_eq!(h.syncer.sync(&d).unwrap().udp_flows_flushed, 0);
    // The other Service port losing b2 (its last backend): its flows go too.
    d.insert(other_udp, front("default/other:53/UDP", &[]));
    let st = h.syncer.sync(&d).unwrap();
    assert_eq!(st.udp_flows_flushed, 2 * 3 * 2);
}

/// The IPv4 address of a socket address of these IPv4-only tests.
fn v4(a: std::net::SocketAddr) -> Ipv4Addr {
    match a.ip() {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => panic!("{a}: IPv4 only"),
    }
}
