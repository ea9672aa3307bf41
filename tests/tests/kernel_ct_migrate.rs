//! Conntrack of layout v3 (`lb_ct_v3`, `lb_ct_new_v2`: the entry alone) converted into v4
//! (`lb_ct_v4`, `lb_ct_new_v3`: the entry and an empty next hop) by the upgrade code, on real
//! pinned maps: every entry keeps its tier and its value, an entry the new programs already
//! wrote is kept, and a second pass copies nothing it copied before.
use std::{
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use aya::maps::MapData;
use lb_common::{ct_flags, ct_state, map_name, proto, CtEntry, CtKey, CtValue, NextHop};
use lb_userspace::dataplane::{
    bpf_sys,
    migrate::{self, Seen},
    pinned::other_versions,
};

fn key(n: u16) -> CtKey {
    CtKey {
        saddr_be: u32::from_ne_bytes([198, 18, 0, 1]),
        daddr_be: u32::from_ne_bytes([203, 0, 113, 9]),
        sport_be: (40000 + n).to_be(),
        dport_be: 80u16.to_be(),
        proto: proto::TCP,
        _pad: [0; 3],
    }
}

fn entry(n: u32, state: u8) -> CtEntry {
    CtEntry {
        nat_saddr_be: u32::from_ne_bytes([192, 168, 100, 1]),
        nat_daddr_be: u32::from_ne_bytes([10, 244, 2, 10]),
        nat_sport_be: 33000u16.to_be(),
        nat_dport_be: 8080u16.to_be(),
        svc_port_id: 7,
        backend_id: n,
        last_seen_s: 1000 + n,
        flags: ct_flags::SNAT | ct_flags::SEQ_KNOWN,
        state,
        _pad: 0,
        seq_next: 12345 + n,
    }
}

fn pinned_lru(dir: &Path, name: &str, value_size: usize) -> OwnedFd {
    let fd = bpf_sys::create_map(
        bpf_sys::MAP_TYPE_LRU_HASH,
        std::mem::size_of::<CtKey>() as u32,
        value_size as u32,
        64,
        name,
    )
    .unwrap();
    let copy = fd.try_clone().unwrap();
    MapData::from_fd(copy).unwrap().pin(dir.join(name)).unwrap();
    fd
}

#[test]
fn kernel_conntrack_v3_becomes_v4_with_an_empty_next_hop() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let dir = lb_tests::netns::ensure_bpffs()
        .unwrap()
        .join(format!("lbtest-ctv3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let v3 = std::mem::size_of::<CtEntry>();
    let v4 = std::mem::size_of::<CtValue>();
    let old_est = pinned_lru(&dir, "lb_ct_v3", v3);
    let old_new = pinned_lru(&dir, "lb_ct_new_v2", v3);
    let est = pinned_lru(&dir, map_name::CONNTRACK, v4);
    let new = pinned_lru(&dir, map_name::CONNTRACK_NEW, v4);

    let established = [
        (key(1), entry(1, ct_state::TCP_ESTABLISHED)),
        (key(2), entry(2, ct_state::TCP_FIN_CLIENT)),
    ];
    let opening = (key(3), entry(3, ct_state::TCP_SYN_SENT));
    for (k, e) in &established {
        bpf_sys::update(old_est.as_fd(), k, e, 0).unwrap();
    }
    bpf_sys::update(old_new.as_fd(), &opening.0, &opening.1, 0).unwrap();
    // The new programs already wrote flow 2 (with a next hop): it stays as they wrote it.
    let mut theirs = CtValue::new(entry(2, ct_state::TCP_ESTABLISHED));
    theirs.nh.in_ifindex = 3;
    bpf_sys::update(est.as_fd(), &key(2), &theirs, 0).unwrap();

    let old = other_versions(&dir);
    let mut names: Vec<&str> = old.iter().map(|o| o.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["lb_ct_new_v2", "lb_ct_v3"]);
    let mut seen = Seen::new();
    let copied = migrate::copy_state(&dir, &old, &HashMap::new(), &mut seen).unwrap();
    let total: Vec<(String, u64, u64)> = {
        let mut v: Vec<_> = copied
            .iter()
            .map(|c| (c.from.clone(), c.copied, c.kept))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        total,
        [
            ("lb_ct_new_v2".to_string(), 1, 0),
            ("lb_ct_v3".to_string(), 1, 1)
        ]
    );
    let get = |fd: &OwnedFd, k: &CtKey| bpf_sys::lookup::<CtKey, CtValue>(fd.as_fd(), k).unwrap();
    assert_eq!(get(&est, &key(1)), Some(CtValue::new(established[0].1)));
    assert_eq!(get(&est, &key(1)).unwrap().nh, NextHop::NONE);
    assert_eq!(
        get(&est, &key(2)),
        Some(theirs),
        "kept as the new programs wrote it"
    );
    assert_eq!(
        get(&new, &opening.0),
        Some(CtValue::new(opening.1)),
        "the tier is kept"
    );
    assert_eq!(get(&est, &opening.0), None);

    // A second pass (after the program swap) copies nothing it copied before.
    let again = migrate::copy_state(&dir, &old, &HashMap::new(), &mut seen).unwrap();
    assert!(again.iter().all(|c| c.copied == 0), "{again:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
