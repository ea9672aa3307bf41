//! The agent's conntrack sweep (`lb_userspace::dataplane::ct_gc`) on real BPF maps: LRU hash
//! maps of the conntrack tiers' layout, created for the test (no object file needed). Flows of
//! every state, aged exactly at their state's lifetime (kept) and one second past it (removed);
//! the partner rule (a flow is as recent as its more recent direction); flows split across the
//! tiers or missing one entry.
use std::collections::BTreeSet;

use lb_common::{ct_flags, ct_state, proto, CtEntry, CtKey};
use lb_userspace::dataplane::ct_gc::{sweep, CtTiers, Tier};

const NOW: u32 = 1_000_000;

/// A flow's two entries: client 10.0.<n>.1:<n> -> frontend 10.96.0.1:53, translated to backend
/// 10.244.0.1:8053 from the node 192.168.0.1 with SNAT port 20000 + n.
fn flow(n: u16, protocol: u8, state: u8) -> [(CtKey, CtEntry); 2] {
    let ip = |a: [u8; 4]| u32::from_ne_bytes(a);
    let client = ip([10, 0, (n >> 8) as u8, n as u8]);
    let key = CtKey {
        saddr_be: client,
        daddr_be: ip([10, 96, 0, 1]),
        sport_be: (10000 + n).to_be(),
        dport_be: 53u16.to_be(),
        proto: protocol,
        _pad: [0; 3],
    };
    let entry = CtEntry {
        nat_saddr_be: ip([192, 168, 0, 1]),
        nat_daddr_be: ip([10, 244, 0, 1]),
        nat_sport_be: (20000 + n).to_be(),
        nat_dport_be: 8053u16.to_be(),
        svc_port_id: 1,
        backend_id: 1,
        last_seen_s: NOW,
        flags: ct_flags::SNAT,
        state,
        _pad: 0,
        seq_next: 0,
    };
    let (rkey, reply) = entry.partner(&key);
    assert_eq!(reply.flags, ct_flags::SNAT | ct_flags::REPLY);
    assert_eq!(reply.partner_key(&rkey), key);
    [(key, entry), (rkey, reply)]
}

const TCP_STATES: [u8; 9] = [
    ct_state::TCP_SYN_SENT,
    ct_state::TCP_SYN_RECV,
    ct_state::TCP_PICKUP,
    ct_state::TCP_ESTABLISHED,
    ct_state::TCP_FIN_CLIENT,
    ct_state::TCP_FIN_BACKEND,
    ct_state::TCP_CLOSED,
    ct_state::TCP_TIME_WAIT,
    ct_state::TCP_RESET,
];

/// The tier a flow in `state` lives in (unconfirmed flows in the new-flow tier).
fn tier_of(state: u8) -> Tier {
    match state {
        ct_state::TCP_SYN_SENT
        | ct_state::TCP_SYN_RECV
        | ct_state::TCP_PICKUP
        | ct_state::UDP_UNREPLIED => Tier::New,
        _ => Tier::Established,
    }
}

#[test]
fn kernel_ct_gc_removes_exactly_the_expired_flows() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let t = CtTiers::create((4096, 1024)).expect("creating LRU maps");
    let mut kept = BTreeSet::new();
    let mut n = 0u16;
    let mut next = || {
        n += 1;
        n
    };
    let states = TCP_STATES.iter().map(|s| (proto::TCP, *s)).chain([
        (proto::UDP, ct_state::UDP_UNREPLIED),
        (proto::UDP, ct_state::UDP_REPLIED),
    ]);
    let mut expected_removed = 0;
    for (p, state) in states {
        let life = ct_state::lifetime_s(state);
        for (age, expired) in [
            (0, false),
            (life - 1, false),
            (life, false),
            (life + 1, true),
            (life + 100, true),
        ] {
            let f = flow(next(), p, state);
            for (k, mut e) in f {
                e.last_seen_s = NOW - age;
                t.insert(&k, &e, tier_of(state)).unwrap();
                if expired {
                    expected_removed += 1;
                } else {
                    kept.insert(format!("{k:?}"));
                }
            }
        }
    }
    // The partner rule: one direction past the lifetime, the other within it: the flow lives
    // (both directions), whichever direction is the recent one.
    for recent in [0usize, 1] {
        let f = flow(next(), proto::UDP, ct_state::UDP_REPLIED);
        for (i, (k, mut e)) in f.into_iter().enumerate() {
            e.last_seen_s = if i == recent { NOW - 5 } else { NOW - 1000 };
            t.insert(&k, &e, Tier::Established).unwrap();
            kept.insert(format!("{k:?}"));
        }
    }
    // A flow split across the tiers (the datapath moves both entries when it confirms one, and
    // a refused insert can leave them apart): the partner is found in the other tier.
    let f = flow(next(), proto::TCP, ct_state::TCP_ESTABLISHED);
    let mut old = f[0].1;
    old.last_seen_s = NOW - 200_000;
    t.insert(&f[0].0, &old, Tier::Established).unwrap();
    t.insert(&f[1].0, &f[1].1, Tier::New).unwrap();
    kept.extend(f.iter().map(|(k, _)| format!("{k:?}")));
    let f = flow(next(), proto::TCP, ct_state::TCP_CLOSED);
    for (i, (k, mut e)) in f.into_iter().enumerate() {
        e.last_seen_s = NOW - 11;
        let tier = if i == 0 { Tier::Established } else { Tier::New };
        t.insert(&k, &e, tier).unwrap();
        expected_removed += 1;
    }
    // A flow whose other entry was evicted: its own stamp decides.
    let f = flow(next(), proto::UDP, ct_state::UDP_UNREPLIED);
    let mut e = f[0].1;
    e.last_seen_s = NOW - 31;
    t.insert(&f[0].0, &e, Tier::New).unwrap();
    expected_removed += 1;
    let f = flow(next(), proto::UDP, ct_state::UDP_UNREPLIED);
    let mut e = f[1].1;
    e.last_seen_s = NOW - 30;
    t.insert(&f[1].0, &e, Tier::New).unwrap();
    kept.insert(format!("{:?}", f[1].0));

    let total = lb_tests::harness::ct_keys(&t).len() as u64;
    let st = sweep(&t, NOW).unwrap();
    println!("{st:?}");
    assert_eq!(st.examined, total);
    assert_eq!(st.removed, expected_removed);
    assert_eq!(
        lb_tests::harness::ct_keys(&t),
        kept,
        "exactly the expired flows are gone"
    );
    assert_eq!(
        st.established_entries + st.new_entries,
        kept.len() as u64,
        "the per-tier counts after the sweep"
    );
    // A second sweep finds nothing more; a later one, everything but the established flows
    // that are young enough.
    assert_eq!(sweep(&t, NOW).unwrap().removed, 0);
    let later = NOW + ct_state::UDP_REPLIED_S + 1;
    sweep(&t, later).unwrap();
    let left: Vec<(CtKey, CtEntry)> = [Tier::Established, Tier::New]
        .into_iter()
        .flat_map(|tier| t.entries(tier).unwrap())
        .collect();
    assert!(
        left.iter()
            .all(|(_, e)| e.state == ct_state::TCP_ESTABLISHED),
        "{left:?}"
    );
}

#[test]
fn kernel_ct_gc_keeps_a_refreshed_flow_and_removes_it_once_idle() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    // A flow refreshed by a packet of one direction (here: a write, as the datapath's) lives
    // on; once idle past its lifetime, a sweep removes both of its entries.
    let t = CtTiers::create((64, 64)).unwrap();
    let f = flow(1, proto::UDP, ct_state::UDP_UNREPLIED);
    for (k, mut e) in f {
        e.last_seen_s = NOW - 10;
        t.insert(&k, &e, Tier::New).unwrap();
    }
    assert_eq!(sweep(&t, NOW).unwrap().removed, 0);
    // 31 s later without traffic it goes; with a refresh of either direction it stays.
    let mut e = f[1].1;
    e.last_seen_s = NOW + 20;
    t.insert(&f[1].0, &e, Tier::New).unwrap();
    assert_eq!(sweep(&t, NOW + 31).unwrap().removed, 0);
    assert_eq!(sweep(&t, NOW + 51).unwrap().removed, 2);
    assert!(t.get(&f[0].0).unwrap().is_none() && t.get(&f[1].0).unwrap().is_none());
}
