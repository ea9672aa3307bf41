//! The XDP path's next-hop cache (`CtValue::nh`) on the real kernel: a confirmed flow's packets
//! reuse the FIB's answer (a neighbour changed behind its back is not noticed) until the route
//! generation moves, the answer is older than `limits::NEXT_HOP_REVALIDATE_S`, or a packet is
//! longer than the answer was checked for; both directions keep one; and the agent's route
//! monitor moves the generation when a neighbour's address changes.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use etherparse::PacketBuilder;
use lb_common::{limits, program_name, Config, CtKey};
use lb_tests::{
    bench::testrun::{xdp_md, BenchNetns},
    harness::XdpHarness,
};
use lb_userspace::control::desired::{BackendKey, Desired, DesiredFrontend, FrontendKey};

const NODE: [u8; 4] = [192, 168, 100, 1];
const CLIENT: [u8; 4] = [198, 18, 0, 1];
const LB_IP: [u8; 4] = [203, 0, 113, 9];
const BACKEND: [u8; 4] = [10, 244, 2, 10];
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// A TCP segment from `src` to `dst` with `payload` bytes; SYN, SYN-ACK or ACK.
fn tcp(
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    kind: &str,
    seq: u32,
    ack: u32,
    payload: usize,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 9])
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, seq, 64000);
    let b = match kind {
        "syn" => b.syn(),
        "synack" => b.syn().ack(ack),
        _ => b.ack(ack),
    };
    let mut v = Vec::new();
    b.write(&mut v, &vec![b'x'; payload]).expect("frame");
    v
}

fn neighbour(ns: &str, mac: &str) -> Result<()> {
    lb_tests::netns::ip(
        ns,
        &[
            "neigh",
            "replace",
            "192.168.100.2",
            "lladdr",
            mac,
            "dev",
            "bench0",
            "nud",
            "permanent",
        ],
    )?;
    Ok(())
}

#[test]
fn kernel_xdp_next_hop_cache_until_routes_change() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let ns = BenchNetns::new().unwrap();
    let name = ns.0.clone();
    ns.run(move || scenario(&name)).unwrap();
}

fn scenario(ns: &str) -> Result<()> {
    let ifindex = {
        let c = std::ffi::CString::new("bench0").expect("name");
        // SAFETY: plain libc call on a valid C string.
        unsafe { libc::if_nametoindex(c.as_ptr()) }
    };
    ensure!(ifindex != 0, "bench0 missing");
    let mut h = XdpHarness::new()?;
    h.set_config(&Config {
        node_addr_be: u32::from_ne_bytes(NODE),
        snat_port_min: 32768,
        snat_port_max: 60999,
        ready: 1,
        ..Default::default()
    })?;
    let fe = FrontendKey {
        addr: std::net::SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(LB_IP), 80)),
        proto: 6,
        scope: lb_common::scope::EXTERNAL,
    };
    let d = DesiredFrontend {
        service_port: "default/web:http/TCP".into(),
        flags: lb_common::service_flags::LOAD_BALANCER,
        affinity_timeout_s: 0,
        source_ranges: None,
        backends: vec![(
            BackendKey {
                addr: std::net::SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(BACKEND), 8080)),
                proto: 6,
            },
            0,
        )],
    };
    h.program(&Desired::from([(fe, d)]))?;
    let run = |h: &XdpHarness, frame: &[u8]| {
        h.run_ctx(program_name::XDP, frame, &xdp_md(ifindex, frame.len()))
    };
    let client = (CLIENT, 40000);
    // The handshake (SYN, the backend's SYN-ACK to the SNAT address, the client's ACK), which
    // confirms the flow.
    let syn = run(&h, &tcp(client, (LB_IP, 80), "syn", 1000, 0, 0))?;
    ensure!(syn.verdict == XDP_TX, "SYN: {}", syn.verdict);
    let o = &syn.output;
    let snat = (
        [o[26], o[27], o[28], o[29]],
        u16::from_be_bytes([o[34], o[35]]),
    );
    let backend = (BACKEND, 8080);
    run(&h, &tcp(backend, snat, "synack", 4999, 1001, 0))?;
    run(&h, &tcp(client, (LB_IP, 80), "ack", 1001, 5000, 0))?;
    ensure!(
        h.counters()?.get("ct_confirmed").map_or(0, |c| c.packets) == 1,
        "the flow is not confirmed"
    );
    let key = CtKey {
        saddr_be: u32::from_ne_bytes(CLIENT),
        daddr_be: u32::from_ne_bytes(LB_IP),
        sport_be: 40000u16.to_be(),
        dport_be: 80u16.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    let mut seq = 1001;
    let mut segment = |h: &XdpHarness, payload: usize| -> Result<(u32, [u8; 6])> {
        let r = run(h, &tcp(client, (LB_IP, 80), "ack", seq, 5000, payload))?;
        seq += payload as u32;
        let mut dmac = [0u8; 6];
        dmac.copy_from_slice(&r.output[..6]);
        Ok((r.verdict, dmac))
    };
    let mac = |last: u8| [2, 0, 0, 0, 0, last];

    // A confirmed flow's packet looks the next hop up and keeps the answer.
    assert_eq!(segment(&h, 10)?, (XDP_TX, mac(2)));
    let nh = h.conntrack_next_hop(&key)?.context("no entry")?;
    assert_eq!(
        (nh.in_ifindex, nh.out_ifindex, nh.dmac),
        (ifindex, ifindex, mac(2))
    );
    assert_eq!(
        nh.fits as usize,
        20 + 20 + 10,
        "the packet's IPv4 total length"
    );

    // lbctl conntrack shows it, fresh; the reply direction has none yet.
    type Shown = Vec<(String, Option<String>, Option<bool>)>;
    let shown = |h: &XdpHarness| -> Result<Shown> {
        Ok(lb_userspace::inspect::conntrack(h.pin_dir())?
            .into_iter()
            .map(|c| (c.direction.to_string(), c.next_hop, c.next_hop_fresh))
            .collect())
    };
    let cached = Some("dev bench0 to 02:00:00:00:00:02 from ".to_string());
    let rows = shown(&h)?;
    assert!(
        rows.iter().any(|(d, n, f)| d == "original"
            && n.as_ref()
                .is_some_and(|n| n.starts_with(cached.as_deref().unwrap()))
            && *f == Some(true)),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|(d, n, f)| d == "reply" && n.is_none() && f.is_none()),
        "{rows:?}"
    );

    // The neighbour's address changes and nobody says so: the cached answer is used.
    neighbour(ns, "02:00:00:00:00:03")?;
    assert_eq!(segment(&h, 10)?, (XDP_TX, mac(2)), "the cache is used");
    // The route generation moves (as the agent's monitor does): looked up again.
    h.set_route_gen(nh.gen.wrapping_add(1))?;
    let rows = shown(&h)?;
    assert!(
        rows.iter()
            .any(|(d, n, f)| d == "original" && n.is_some() && *f == Some(false)),
        "another generation: not fresh: {rows:?}"
    );
    assert_eq!(segment(&h, 10)?, (XDP_TX, mac(3)), "a new generation");
    assert_eq!(
        h.conntrack_next_hop(&key)?.context("entry")?.gen,
        nh.gen.wrapping_add(1)
    );

    // Without a generation move, an answer older than the bound is looked up again.
    neighbour(ns, "02:00:00:00:00:04")?;
    assert_eq!(segment(&h, 10)?, (XDP_TX, mac(3)));
    let mut old = h.conntrack_next_hop(&key)?.context("entry")?;
    old.checked_s = old.checked_s.wrapping_sub(limits::NEXT_HOP_REVALIDATE_S);
    h.conntrack_set_next_hop(&key, old)?;
    assert_eq!(segment(&h, 10)?, (XDP_TX, mac(4)), "older than the bound");

    // A packet longer than the answer was checked for is looked up again: with an MTU below
    // its size the FIB refuses it, and the stack gets it (to fragment or answer).
    lb_tests::netns::ip(ns, &["link", "set", "bench0", "mtu", "400"])?;
    assert_eq!(
        segment(&h, 10)?,
        (XDP_TX, mac(4)),
        "short packets still use the cache"
    );
    assert_eq!(
        segment(&h, 500)?.0,
        XDP_PASS,
        "a longer packet meets the MTU"
    );
    assert_eq!(h.conntrack_next_hop(&key)?.context("entry")?.fits, 50);
    // Longer packets that fit make the answer hold for their size.
    assert_eq!(segment(&h, 300)?, (XDP_TX, mac(4)));
    assert_eq!(h.conntrack_next_hop(&key)?.context("entry")?.fits, 340);
    assert_eq!(segment(&h, 100)?, (XDP_TX, mac(4)));
    assert_eq!(h.conntrack_next_hop(&key)?.context("entry")?.fits, 340);

    // The reply direction keeps its own answer (towards the client's route).
    let reply_key = CtKey {
        saddr_be: u32::from_ne_bytes(BACKEND),
        daddr_be: u32::from_ne_bytes(snat.0),
        sport_be: 8080u16.to_be(),
        dport_be: snat.1.to_be(),
        proto: 6,
        _pad: [0; 3],
    };
    let r = run(&h, &tcp(backend, snat, "ack", 5000, seq, 10))?;
    assert_eq!(r.verdict, XDP_TX);
    let rn = h.conntrack_next_hop(&reply_key)?.context("reply entry")?;
    assert_eq!((rn.out_ifindex, rn.dmac), (ifindex, mac(4)));
    Ok(())
}

/// The agent's route monitor, in a namespace of its own: it sets a generation when it starts,
/// and moves it when a neighbour's address changes and when a route is added.
#[test]
fn kernel_route_monitor_moves_the_generation() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let ns = BenchNetns::new().unwrap();
    let name = ns.0.clone();
    ns.run(move || monitor_scenario(&name)).unwrap();
}

fn monitor_scenario(ns: &str) -> Result<()> {
    let h = XdpHarness::new()?;
    let stop = Arc::new(AtomicBool::new(false));
    // The harness pins the object's maps in a directory of its own, as the agent does in
    // `--bpffs`.
    let gen = lb_userspace::agent::routes::RouteGen::open(h.pin_dir())?;
    lb_userspace::agent::routes::spawn(gen, stop.clone())?;
    let first = h.route_gen()?;
    let result = (|| -> Result<()> {
        ensure!(first != 0, "the monitor sets a generation when it starts");
        let moved = |before: u32| -> Result<u32> {
            let until = Instant::now() + Duration::from_secs(5);
            loop {
                let g = h.route_gen()?;
                if g != before {
                    return Ok(g);
                }
                ensure!(
                    Instant::now() < until,
                    "the generation did not move from {before}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        neighbour(ns, "02:00:00:00:00:05")?;
        let second = moved(first)?;
        lb_tests::netns::ip(
            ns,
            &[
                "route",
                "add",
                "10.99.0.0/16",
                "via",
                "192.168.100.2",
                "dev",
                "bench0",
            ],
        )?;
        moved(second)?;
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    result
}
