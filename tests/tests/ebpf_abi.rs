//! The kernel side against the ABI in lb-common, without a kernel: the compiled object's maps are
//! exactly lb-common's map names, with lb-common's key and value sizes; every counter index has
//! an increment site in lb-ebpf's sources (or is listed as retired).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya_obj::{maps::PinningType, Object};
use lb_common::{
    counter, map_name, AffinityKey, AffinityValue, Backend, BenchFrame, Config, Counter, CtKey,
    CtValue, FrontendSlot, FrontendSlotKey, MaglevChunk, MaglevKey, MemberKey, RevNat,
    ServiceCounters, ServiceName, SockFlow, SockKey, SockRevNat,
};

/// Maps of the object that are not ours to name: aya-log's ring buffer and level, and the data
/// sections of globals.
const NOT_OURS: [&str; 2] = ["AYA_LOGS", "AYA_LOG_LEVEL"];

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
}

/// The `pub const NAME: TYPE = VALUE;` items of `pub mod <module> { ... }` in lb-common's source,
/// as (NAME, VALUE text).
fn lb_common_consts(module: &str) -> Vec<(String, String)> {
    let src = std::fs::read_to_string(workspace().join("lb-common/src/lib.rs")).unwrap();
    let start = src
        .find(&format!("pub mod {module} {{"))
        .unwrap_or_else(|| panic!("no module {module}"));
    let mut depth = 0;
    let mut end = start;
    for (i, c) in src[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    end = start + i;
                    break;
                }
            }
            _ => {}
        }
    }
    src[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let (_, value) = rest.split_once('=')?;
            Some((
                name.trim().to_string(),
                value.trim().trim_end_matches(';').trim().to_string(),
            ))
        })
        .collect()
}

#[test]
fn map_names_of_the_object_are_lb_common_constants_both_ways() {
    let obj = Object::parse(lb_userspace::EBPF_OBJECT).expect("parsing the eBPF object");
    let pinned: BTreeSet<&str> = obj
        .maps
        .iter()
        .filter(|(_, m)| m.pinning() == PinningType::ByName)
        .map(|(n, _)| n.as_str())
        .collect();
    let all: BTreeSet<&str> = map_name::ALL.into_iter().collect();
    assert_eq!(
        all.len(),
        map_name::ALL.len(),
        "map_name::ALL names a map twice"
    );
    // Every pinned map of the object is one of lb-common's names, and every name is a pinned
    // map of the object: a `#[map(name = ...)]` literal that differs from its constant fails
    // one direction or the other.
    assert_eq!(pinned, all, "pinned maps of the object vs map_name::ALL");
    // The maps that are not pinned are the benchmark's, the ICMP answers' rate limiter,
    // aya-log's, and data sections.
    for (name, m) in &obj.maps {
        if m.pinning() != PinningType::ByName {
            assert!(
                name == lb_common::BENCH_MAP || name == lb_common::REJECT_RATE_MAP || lb_common::SCRATCH_MAPS.contains(&name.as_str()) || NOT_OURS.contains(&name.as_str()) || name.starts_with('.'),
                "map {name} of the object is neither pinned under an lb-common name nor a known unpinned map"
            );
        }
    }
    assert!(
        obj.maps.contains_key(lb_common::REJECT_RATE_MAP),
        "no rate limiter map {}",
        lb_common::REJECT_RATE_MAP
    );
    assert!(
        obj.maps.contains_key(lb_common::BENCH_MAP),
        "no benchmark map {}",
        lb_common::BENCH_MAP
    );
    // Every map-name constant of lb-common is in ALL (which the agent uninstalls and lbctl opens).
    let consts: BTreeSet<String> = lb_common_consts("map_name")
        .into_iter()
        .filter(|(name, _)| name != "ALL")
        .map(|(_, value)| value.trim_matches('"').to_string())
        .collect();
    assert_eq!(
        consts,
        all.iter().map(|s| s.to_string()).collect(),
        "map_name constants vs map_name::ALL"
    );
}

#[test]
fn map_layouts_of_the_object_are_lb_common_types() {
    fn size<T>() -> u32 {
        size_of::<T>() as u32
    }
    let want: BTreeMap<&str, (u32, u32)> = [
        (
            map_name::FRONTENDS,
            (size::<FrontendSlotKey>(), size::<FrontendSlot>()),
        ),
        (map_name::BACKENDS, (size::<u32>(), size::<Backend>())),
        (map_name::REV_NAT, (size::<u32>(), size::<RevNat>())),
        (
            map_name::SOCK_REV_NAT,
            (size::<SockKey>(), size::<SockRevNat>()),
        ),
        (map_name::SOCK_FLOW, (size::<SockKey>(), size::<SockFlow>())),
        (map_name::STATS, (size::<u32>(), size::<Counter>())),
        (map_name::CONNTRACK, (size::<CtKey>(), size::<CtValue>())),
        (
            map_name::CONNTRACK_NEW,
            (size::<CtKey>(), size::<CtValue>()),
        ),
        (map_name::ROUTE_GEN, (size::<u32>(), size::<u32>())),
        (
            map_name::MAGLEV,
            (size::<MaglevKey>(), size::<MaglevChunk>()),
        ),
        (map_name::CONFIG, (size::<u32>(), size::<Config>())),
        (
            map_name::AFFINITY,
            (size::<AffinityKey>(), size::<AffinityValue>()),
        ),
        (map_name::MEMBERS, (size::<MemberKey>(), size::<u32>())),
        (
            map_name::SERVICE_STATS,
            (size::<u32>(), size::<ServiceCounters>()),
        ),
        (
            map_name::SERVICE_NAMES,
            (size::<u32>(), size::<ServiceName>()),
        ),
        (
            map_name::FRAGMENTS,
            (size::<lb_common::FragKey>(), size::<lb_common::FragPorts>()),
        ),
        (
            map_name::SOURCE_RANGES,
            // An LPM trie's key: the prefix length, then the data.
            (
                size::<u32>() + size::<lb_common::SourceRangeKey>(),
                size::<u32>(),
            ),
        ),
        (
            map_name::SOURCE_RANGES6,
            (
                size::<u32>() + size::<lb_common::SourceRangeKey6>(),
                size::<u32>(),
            ),
        ),
        (map_name::ADDR6, (size::<lb_common::Addr6>(), size::<u32>())),
        (
            map_name::ADDR6_IDS,
            (size::<u32>(), size::<lb_common::Addr6>()),
        ),
        (
            map_name::SOCK_REV_NAT6,
            (
                size::<lb_common::SockKey6>(),
                size::<lb_common::SockRevNat6>(),
            ),
        ),
        (
            map_name::CONNTRACK6,
            (size::<lb_common::CtKey6>(), size::<lb_common::CtValue6>()),
        ),
        (
            map_name::CONNTRACK6_NEW,
            (size::<lb_common::CtKey6>(), size::<lb_common::CtValue6>()),
        ),
        (
            map_name::CONFIG6,
            (size::<u32>(), size::<lb_common::Config6>()),
        ),
        // Program arrays: index -> program fd.
        (map_name::XDP6_PROG, (size::<u32>(), size::<u32>())),
        (map_name::TC6_PROG, (size::<u32>(), size::<u32>())),
        (map_name::TCE6_PROG, (size::<u32>(), size::<u32>())),
        (lb_common::BENCH_MAP, (size::<u32>(), size::<BenchFrame>())),
        // (second, answers sent), per CPU.
        (lb_common::REJECT_RATE_MAP, (size::<u32>(), 8)),
    ]
    .into();
    assert_eq!(want.len(), map_name::ALL.len() + 2, "one layout per map");
    let obj = Object::parse(lb_userspace::EBPF_OBJECT).expect("parsing the eBPF object");
    for (name, (key, value)) in want {
        let m = obj
            .maps
            .get(name)
            .unwrap_or_else(|| panic!("no map {name} in the object"));
        assert_eq!(
            (m.key_size(), m.value_size()),
            (key, value),
            "{name}: (key, value) sizes"
        );
    }
    assert_eq!(
        obj.maps[map_name::STATS].max_entries(),
        counter::COUNT,
        "one stats entry per counter"
    );
}

/// lb-ebpf's sources without comments and whitespace.
fn ebpf_code() -> BTreeMap<String, String> {
    let dir = workspace().join("lb-ebpf/src");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "rs") {
            let src = std::fs::read_to_string(&path).unwrap();
            let code: String = src
                .lines()
                .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
                .flat_map(|l| l.chars())
                .filter(|c| !c.is_whitespace())
                .collect();
            out.insert(
                path.file_name().unwrap().to_string_lossy().into_owned(),
                code,
            );
        }
    }
    assert!(
        out.len() > 5,
        "lb-ebpf sources not found in {}",
        dir.display()
    );
    out
}

/// The increment sites of counter `name` in `code`: the calls that end in `maps::count` with it,
/// directly (`maps::count(counter::X, ..)`) or through the XDP path's `Stop`, which its entry
/// point counts (`Stop::Pass(counter::X)`, `Stop::drop_other(counter::X, ..)`,
/// `Stop::Drop { reason: counter::X, .. }`).
fn increment_sites(code: &str, name: &str) -> usize {
    const CALLS: [&str; 4] = ["count(", "Pass(", "drop_other(", "reason:"];
    let mut n = 0;
    for prefix in ["counter::", "lb_common::counter::"] {
        let needle = format!("{prefix}{name}");
        for (at, _) in code.match_indices(&needle) {
            let ends_there = !code[at + needle.len()..]
                .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
            let before = &code[..at];
            let qualified = prefix == "counter::" && before.ends_with("lb_common::");
            if ends_there && !qualified && CALLS.iter().any(|c| before.ends_with(c)) {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn every_counter_has_an_increment_site_unless_retired() {
    // The constants and the names agree: counter `i` is the constant NAMES[i] in upper case.
    let consts: BTreeMap<String, u32> = lb_common_consts("counter")
        .into_iter()
        .filter_map(|(name, value)| Some((name, value.parse().ok()?)))
        .filter(|(name, _)| name != "COUNT")
        .collect();
    let by_index: BTreeMap<u32, String> = (0..counter::COUNT)
        .map(|i| (i, counter::NAMES[i as usize].to_ascii_uppercase()))
        .collect();
    assert_eq!(
        consts,
        by_index
            .iter()
            .map(|(i, n)| (n.clone(), *i))
            .collect::<BTreeMap<_, _>>(),
        "lb_common::counter constants vs counter::NAMES"
    );

    let code = ebpf_code();
    let mut missing = Vec::new();
    for (i, name) in &by_index {
        let sites: usize = code.values().map(|c| increment_sites(c, name)).sum();
        let retired = counter::RETIRED.contains(i);
        if retired {
            assert_eq!(
                sites, 0,
                "{name} is listed in counter::RETIRED but lb-ebpf increments it"
            );
        } else if sites == 0 {
            missing.push(name.clone());
        }
    }
    assert!(missing.is_empty(), "counters without an increment site in lb-ebpf (retire them in counter::RETIRED, or count them): {missing:?}");
    // Retired counters: kept only so that the stats layout (lb_stats_v2) does not change.
    assert_eq!(counter::RETIRED, [counter::XDP_FRONTEND_PASS]);
}

#[test]
fn increment_sites_are_recognised_and_only_those() {
    let code = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
    assert_eq!(
        increment_sites(&code("maps::count(counter::XDP_RX, len);"), "XDP_RX"),
        1
    );
    assert_eq!(
        increment_sites(
            &code("maps::count(lb_common::counter::XDP_RX, 0)"),
            "XDP_RX"
        ),
        1
    );
    assert_eq!(
        increment_sites(&code(".ok_or(Stop::Pass(counter::XDP_RX))?"), "XDP_RX"),
        1
    );
    assert_eq!(
        increment_sites(&code("Stop::drop_other(counter::XDP_RX, id)"), "XDP_RX"),
        1
    );
    assert_eq!(
        increment_sites(
            &code("Stop::Drop { reason: counter::XDP_RX, svc_port_id }"),
            "XDP_RX"
        ),
        1
    );
    // A longer name, a mention that counts nothing, an import.
    assert_eq!(
        increment_sites(&code("maps::count(counter::XDP_RX_MORE, 0)"), "XDP_RX"),
        0
    );
    assert_eq!(
        increment_sites(&code("let c = counter::XDP_RX;"), "XDP_RX"),
        0
    );
    assert_eq!(
        increment_sites(&code("use lb_common::counter::XDP_RX;"), "XDP_RX"),
        0
    );
}
