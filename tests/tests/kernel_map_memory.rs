//! The agent's map-memory metric on real maps: `lb_map_memory_bytes{map}` is exported for every
//! map the agent pins, with the kernel's own figure, which is at least what the map's entries
//! need (key and value of every entry for the preallocated maps, the values once per CPU for
//! the per-CPU ones): what the README's table of map sizes and bytes per entry rests on.
use std::collections::BTreeMap;

use lb_common::map_name;
use lb_tests::harness::XdpHarness;
use lb_userspace::{agent::metrics::Ops, dataplane::capacity};

/// `lb_map_memory_bytes` samples of a scrape, by map.
fn memory_samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter_map(|l| l.strip_prefix("lb_map_memory_bytes{map=\""))
        .filter_map(|l| {
            let (map, value) = l.split_once("\"} ")?;
            Some((map.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn kernel_map_memory_metric_covers_every_pinned_map() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let h = XdpHarness::new().expect("loading the XDP program into the kernel");
    // The source-range tries are allocated on use and weighs nothing while empty: one prefix.
    {
        use aya::maps::{lpm_trie::Key, LpmTrie, Map, MapData};
        let data = MapData::from_pin(h.pin_dir().join(map_name::SOURCE_RANGES)).unwrap();
        let mut trie: LpmTrie<MapData, lb_common::SourceRangeKey, u32> =
            LpmTrie::try_from(Map::LpmTrie(data)).unwrap();
        let key = lb_common::SourceRangeKey {
            svc_port_id: 7u32.to_be(),
            addr_be: u32::from_ne_bytes([192, 0, 2, 0]),
        };
        trie.insert(
            &Key::new(lb_common::SourceRangeKey::ID_BITS + 24, key),
            1,
            0,
        )
        .unwrap();
    }
    // Its IPv6 twin likewise.
    {
        use aya::maps::{lpm_trie::Key, LpmTrie, Map, MapData};
        let data = MapData::from_pin(h.pin_dir().join(map_name::SOURCE_RANGES6)).unwrap();
        let mut trie: LpmTrie<MapData, lb_common::SourceRangeKey6, u32> =
            LpmTrie::try_from(Map::LpmTrie(data)).unwrap();
        let key = lb_common::SourceRangeKey6 {
            svc_port_id: 7u32.to_be(),
            addr: lb_userspace::dataplane::addr6_words("2001:db8::".parse().unwrap()),
        };
        trie.insert(
            &Key::new(lb_common::SourceRangeKey::ID_BITS + 32, key),
            1,
            0,
        )
        .unwrap();
    }
    let ops = Ops::new(h.pin_dir().to_path_buf()).with_map_read_interval(std::time::Duration::ZERO);
    let scrape = ops.metrics();
    let memory = memory_samples(&scrape.body);
    let pinned: Vec<&str> = map_name::ALL.to_vec();
    assert_eq!(
        memory.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut p = pinned.clone();
            p.sort();
            p
        },
        "one sample per pinned map:\n{}",
        scrape.body
    );
    assert!(memory.values().all(|b| *b > 0.0), "{memory:?}");

    // The preallocated maps cost at least their entries' keys and values; the maps allocated
    // on use (Maglev chunks, the source-range trie) are empty here and are not held to it.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for (flag, map, key, value, entries) in capacity::size_flags() {
        if map == map_name::MAGLEV || map == map_name::SOURCE_RANGES {
            continue;
        }
        let per_cpu = if map == map_name::SERVICE_STATS {
            cpus
        } else {
            1.0
        };
        let least = entries as f64 * (key as f64 + value as f64 * per_cpu);
        assert!(
            memory[map] >= least,
            "{map} ({flag}): {} bytes, less than {least} for {entries} entries of {key} + {value}",
            memory[map]
        );
    }
}
