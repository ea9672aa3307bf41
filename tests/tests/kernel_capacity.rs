//! Map capacity isolation on the kernel's own maps: sized as `lb-agent run --map-*` sizes them
//! (the loader's max entries, read back from the pins), filled to the last entry by the Service
//! ports that fit, then changed: endpoints replaced, a Service removed so that a rejected one
//! fits, one Service growing. Every sync succeeds (the kernel would refuse a write to a full map
//! with E2BIG, which the syncer's accounting must foresee), applies everything within that
//! sync, and leaves each counted slot on a live backend.
use std::collections::{BTreeMap, BTreeSet};

use lb_common::{map_name, FrontendSlotKey};
use lb_tests::harness::XdpHarness;
use lb_userspace::{
    control::{desired::desired, model, plan, source},
    dataplane::{
        capacity::{fit, table_chunks, MapSizes},
        read::pinned_sizes,
        Dataplane, MapContents,
    },
};

const NODE: &str = "---\napiVersion: v1\nkind: Node\nmetadata: {name: n1}\nstatus: {addresses: [{type: InternalIP, address: 192.168.100.1}]}\n";

/// NodePort Service `s{i}` (created on day i + 1) with endpoints 10.1.i.j for j in `eps`.
fn service(i: u32, eps: impl IntoIterator<Item = u32>) -> String {
    let endpoints: Vec<String> = eps
        .into_iter()
        .map(|j| format!("{{addresses: [10.1.{i}.{j}], nodeName: n{}}}", 2 + j % 2))
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns, creationTimestamp: \"2024-01-{:02}T00:00:00Z\"}}\nspec: {{type: NodePort, clusterIP: 10.96.0.{}, ports: [{{name: web, port: 80, nodePort: {}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: web, port: 8080}}]\nendpoints: [{}]\n",
        i + 1,
        i + 1,
        30000 + i,
        endpoints.join(", ")
    )
}

/// Frontend master key -> the backend addresses its counted slots resolve to (panics on a
/// slot that is missing or points at no backend).
fn resolved(c: &MapContents) -> BTreeMap<FrontendSlotKey, BTreeSet<(u32, u16)>> {
    let mut out = BTreeMap::new();
    for (k, v) in c.services.iter().filter(|(k, _)| k.slot == 0) {
        let set = (1..=v.count)
            .map(|slot| {
                let s = c.services[&FrontendSlotKey { slot, ..*k }];
                let b = c.backends[&s.backend_id];
                (b.addr_be, b.port_be)
            })
            .collect();
        out.insert(*k, set);
    }
    out
}

#[test]
fn kernel_full_maps_keep_serving_what_fits_and_apply_changes_in_one_sync() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    // Three Services of five endpoints fill backends and Maglev tables exactly; frontend slots
    // (18 per Service: ClusterIP, NodePort inside and outside) have room for four.
    let want = MapSizes {
        backends: 15,
        maglev_chunks: 3 * table_chunks(5) as u32,
        frontend_slots: 72,
        ..MapSizes::default()
    };
    let sizes: Vec<(&str, u32)> = want.per_map().to_vec();
    let mut h = XdpHarness::with_map_sizes(&sizes).expect("loading the programs into the kernel");
    let got = pinned_sizes(h.pin_dir()).expect("reading the pinned maps' sizes");
    assert_eq!(got, want, "the kernel's maps have the sizes asked for");
    h.syncer.set_sizes(got);

    // Each step: the Service ports served, and the map each rejected one did not fit in.
    let mut step = |yaml: String, served: &[&str], full: &[&str]| {
        let mut o = source::Objects::default();
        source::parse_into(
            std::path::Path::new("t.yaml"),
            &format!("{NODE}{yaml}"),
            &mut o,
        )
        .unwrap();
        let mut p = plan::plan(&model::build(&o, "n1"), "n1");
        let rejected = fit(&mut p, &got);
        let names: Vec<&str> = p.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, served, "rejected: {rejected:?}");
        assert_eq!(rejected.len(), full.len(), "{rejected:?}");
        for (r, map) in rejected.iter().zip(full) {
            assert!(r.reason.contains(&format!("map {map} is full")), "{r:?}");
        }
        let d = desired(&p);
        let st = h.syncer.sync(&d).expect("a sync on full kernel maps");
        assert!(st.deferred.is_empty(), "deferred: {:?}", st.deferred);
        let c = h.syncer.dataplane().contents().unwrap();
        let got = resolved(&c);
        assert_eq!(got.len(), d.len());
        for (fe, df) in &d {
            let key = lb_userspace::control::desired::service_key(fe, 0);
            let addrs: BTreeSet<(u32, u16)> = df
                .backends
                .iter()
                .map(|(b, _)| {
                    let std::net::IpAddr::V4(ip) = b.addr.ip() else {
                        panic!("{b:?}: IPv4 only");
                    };
                    (u32::from_ne_bytes(ip.octets()), b.addr.port().to_be())
                })
                .collect();
            assert_eq!(got[&key], addrs, "{fe:?}");
        }
        c
    };
    let all = |eps0: std::ops::RangeInclusive<u32>, without: Option<u32>| -> String {
        (0..5)
            .filter(|i| Some(*i) != without)
            .map(|i| {
                if i == 0 {
                    service(0, eps0.clone())
                } else {
                    service(i, 1..=5)
                }
            })
            .collect()
    };
    let b = map_name::BACKENDS;
    let c = step(all(1..=5, None), &["s0", "s1", "s2"], &[b, b]);
    assert_eq!(c.backends.len(), 15);
    assert_eq!(c.maglev.len() as u32, want.maglev_chunks);
    // One endpoint replaced, then all five, on full maps.
    step(all(2..=6, None), &["s0", "s1", "s2"], &[b, b]);
    step(all(11..=15, None), &["s0", "s1", "s2"], &[b, b]);
    // s1 goes: s3 takes its room in the same sync.
    step(all(11..=15, Some(1)), &["s0", "s2", "s3"], &[b]);
    // s0 grows beyond what its Maglev table may take: it alone is rejected, the rest fits.
    step(
        all(1..=12, Some(1)),
        &["s2", "s3", "s4"],
        &[map_name::MAGLEV],
    );
    step(all(1..=5, Some(1)), &["s0", "s2", "s3"], &[b]);
}
