//! Upgrade across map layout versions without blackholing: node1's pinned state is turned into
//! what an agent of the previous layout left (conntrack in the v1 layout under `lb_ct_v1`, the
//! services and stats maps under their previous names), while its programs stay attached. The
//! new agent fills fresh maps, converts the conntrack, swaps the programs and removes the old
//! pins; new connections flow throughout and a held connection survives.
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{map_name, CtEntry, CtKey, FrontendSlot, FrontendSlotKey};
use lb_tests::{lab::bin_path, legacy, scenario::start_example};
use lb_userspace::dataplane::migrate::CtEntryV1;

const TARGET: &str = "203.0.113.11:80";

#[test]
fn lab_upgrade_from_an_older_layout_loses_nothing() {
    let Some(mut s) = start_example() else { return };
    s.lab.client_route("203.0.113.11/32", "node1").unwrap();
    let mut held = s.lab.hold("client", TARGET).unwrap();
    assert!(held.first.as_ref().unwrap().ok);
    let bpffs = s.lab.node("node1").bpffs.clone();
    assert!(!s.agents[0].stop_with(libc::SIGKILL).unwrap().success());

    // The conntrack as the current layout holds it.
    let open = |name: &str| MapData::from_pin(bpffs.join(name)).unwrap();
    let ct: HashMap<MapData, CtKey, CtEntry> =
        HashMap::try_from(Map::LruHashMap(open(map_name::CONNTRACK))).unwrap();
    let before: std::collections::HashMap<CtKey, CtEntry> =
        ct.iter().map(|kv| kv.unwrap()).collect();
    assert!(
        !before.is_empty(),
        "the held connection has conntrack entries"
    );
    drop(ct);
    // Service-port id -> the rev-NAT id of one of its frontends (v1 stored the rev-NAT id; with the
    // flow's protocol it names the Service port again).
    let svc: HashMap<MapData, FrontendSlotKey, FrontendSlot> =
        HashMap::try_from(Map::HashMap(open(map_name::FRONTENDS))).unwrap();
    let rev_of: BTreeMap<u32, u32> = svc
        .iter()
        .map(|kv| kv.unwrap())
        .filter(|(k, _)| k.slot == 0)
        .map(|(_, v)| (v.svc_port_id, v.rev_nat_id))
        .collect();
    drop(svc);

    // The previous layout's pins. The attached programs keep using their maps.
    let _keep = legacy::create_pinned(
        &bpffs.join("lb_ct_v1"),
        legacy::LRU_HASH,
        16,
        28,
        lb_common::limits::CONNTRACK,
        "lb_ct_v1",
    )
    .unwrap();
    let mut v1: HashMap<MapData, CtKey, CtEntryV1> =
        HashMap::try_from(Map::LruHashMap(open("lb_ct_v1"))).unwrap();
    for (k, e) in &before {
        let rev_nat_id = if e.svc_port_id == 0 {
            0
        } else {
            rev_of[&e.svc_port_id]
        };
        let old = CtEntryV1 {
            nat_saddr_be: e.nat_saddr_be,
            nat_daddr_be: e.nat_daddr_be,
            nat_sport_be: e.nat_sport_be,
            nat_dport_be: e.nat_dport_be,
            rev_nat_id,
            backend_id: e.backend_id,
            last_seen_s: e.last_seen_s,
            flags: e.flags,
            _pad: 0,
        };
        v1.insert(k, old, 0).unwrap();
    }
    drop(v1);
    std::fs::remove_file(bpffs.join(map_name::CONNTRACK)).unwrap();
    std::fs::rename(bpffs.join(map_name::FRONTENDS), bpffs.join("lb_svc_v2")).unwrap();
    std::fs::rename(bpffs.join(map_name::STATS), bpffs.join("lb_stats_v1")).unwrap();

    // New connections all along, through node1's XDP path.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let load = {
        let (flag, count, lab) = (stop.clone(), sent.clone(), &s.lab);
        std::thread::scope(|scope| {
            let h = scope.spawn(move || {
                let mut all = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    all.extend(
                        lab.run_client("client", &["tcp", TARGET, "--count", "5"])
                            .unwrap(),
                    );
                    count.store(all.len(), Ordering::Relaxed);
                }
                all
            });
            // The upgraded agent on the same pins.
            let mut again = s
                .lab
                .spawn_agent("node1", &bin_path("lb-agent").unwrap(), &s.manifests, &[])
                .unwrap();
            again
                .wait_for_log("sync generation 1:", Duration::from_secs(20))
                .unwrap();
            // The load ran before the upgraded agent started and goes on for a second after its
            // first sync, and at least until 1,000 connections were made: how many fit in the
            // upgrade window itself depends on the machine's load, not on the upgrade.
            std::thread::sleep(Duration::from_secs(1));
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while sent.load(Ordering::Relaxed) < 1000 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::Relaxed);
            let ex = h.join().unwrap();
            (again, ex)
        })
    };
    let (again, exchanges) = load;
    let bad: Vec<_> = exchanges.iter().filter(|e| !e.ok).collect();
    assert!(
        exchanges.len() >= 1000,
        "too little traffic through the upgrade (30 s after the first sync): {}",
        exchanges.len()
    );
    // Known and not yet explained: on the CI machine about one connection attempt in 2,000
    // times out around the program swap (a SYN unanswered for 2 s). Tolerate at most one in a
    // thousand, and say so; anything more is a regression.
    eprintln!(
        "{} of {} connections failed during the upgrade: {:?}",
        bad.len(),
        exchanges.len(),
        bad.first()
    );
    assert!(
        bad.len() * 1000 <= exchanges.len(),
        "{} of {} connections failed during the upgrade: {:?}",
        bad.len(),
        exchanges.len(),
        bad
    );

    let log = again.log();
    assert!(
        log.contains(
            "lb_ct_v1 was pinned by an agent of another layout version: lb_ct_v2 replaces it"
        ),
        "{log}"
    );
    assert!(
        log.contains(
            "lb_svc_v2 was pinned by an agent of another layout version: lb_svc_v3 replaces it"
        ),
        "{log}"
    );
    let want = format!(
        "migrated {} entries of lb_ct_v1 into lb_ct_v2",
        before.len()
    );
    assert!(log.contains(&want), "expected `{want}` in\n{log}");
    // Every converted entry is in the new conntrack with its Service-port id restored.
    let ct: HashMap<MapData, CtKey, CtEntry> =
        HashMap::try_from(Map::LruHashMap(open(map_name::CONNTRACK))).unwrap();
    let after: std::collections::HashMap<CtKey, CtEntry> =
        ct.iter().map(|kv| kv.unwrap()).collect();
    for (k, e) in &before {
        let got = after
            .get(k)
            .unwrap_or_else(|| panic!("{k:?} was not migrated"));
        assert_eq!(
            CtEntry {
                last_seen_s: e.last_seen_s,
                ..*got
            },
            *e
        );
    }
    for old in ["lb_ct_v1", "lb_svc_v2", "lb_stats_v1"] {
        assert!(!bpffs.join(old).exists(), "{old} is still pinned");
    }
    for _ in 0..3 {
        assert!(held.exchange().unwrap().ok, "the held connection broke");
    }
    // The new stats map counts from zero and sees the traffic that followed.
    let stats = s.stats("node1");
    assert!(stats["xdp_rx"] > 0);
    s.agents.push(again);
}
