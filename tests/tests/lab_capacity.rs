//! Maps too small for the cluster, in the lab with real agents: `--map-frontend-slots 32` holds
//! the example's oldest Service ports (by creation time, then namespace/name) and no more. The
//! others are rejected with one log line each naming the map and its capacity, and counted in
//! `lb_service_ports_not_fitting`; what fits is served. Removing two Services makes room: the
//! next sync serves a rejected one, with no restart and nothing cleared by hand.
use std::time::Duration;

use lb_tests::scenario::{example_manifests, http_get, start_example_with};

/// The example manifests without the documents of these Services (Service and slices).
fn without(services: &[&str]) -> String {
    example_manifests()
        .split("\n---\n")
        .filter(|doc| {
            !services.iter().any(|s| {
                doc.contains(&format!("metadata: {{name: {s}, namespace: default}}"))
                    || doc.contains(&format!("kubernetes.io/service-name: {s}}}"))
            })
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

#[test]
fn lab_maps_too_small_serve_what_fits_and_report_the_rest() {
    let Some(mut s) = start_example_with(&[
        "--map-frontend-slots",
        "32",
        "--metrics-addr",
        "0.0.0.0:9464",
    ]) else {
        return;
    };
    s.agents[0]
        .wait_for_log(
            "rejected Service default/sticky: port tcp/TCP is not served: map lb_svc_v3 is full \
             (capacity 32 entries",
            Duration::from_secs(10),
        )
        .unwrap();
    // What fits is served.
    let ex = s
        .lab
        .run_client("a1", &["tcp", "10.96.0.10:80", "--count", "10"])
        .unwrap();
    assert!(ex.iter().all(|e| e.ok), "{ex:?}");
    // What does not is not (no translation: the ClusterIP is nobody's address).
    let sticky = s
        .lab
        .run_client("a1", &["tcp", "10.96.0.60:80", "--count", "1"])
        .unwrap();
    assert!(sticky.iter().all(|e| !e.ok), "{sticky:?}");
    let metric = |s: &lb_tests::scenario::Running, line: &str| {
        let (_, _, body) = http_get(&s.lab.client_netns, "192.168.100.1:9464", "/metrics");
        body.lines()
            .find(|l| l.starts_with(line))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
    };
    assert_eq!(
        metric(&s, "lb_service_ports_not_fitting{map=\"lb_svc_v3\"}").as_deref(),
        Some("8"),
        "sticky, web-cluster and web-local, TCP and UDP, and dual-stack/echo's UDP port in both \
         families (its TCP port fits in both)"
    );
    assert_eq!(
        metric(&s, "lb_map_capacity{map=\"services\"}").as_deref(),
        Some("32"),
        "the flag sized the kernel's map"
    );
    // Room made: sticky is served by the next sync.
    s.apply(&without(&["ext", "legacy-db"]), 2);
    s.agents[0]
        .wait_for_log(
            "Service default/sticky fits in the maps again and is served",
            Duration::from_secs(5),
        )
        .unwrap();
    let sticky = s
        .lab
        .run_client("a1", &["tcp", "10.96.0.60:80", "--count", "10"])
        .unwrap();
    assert!(sticky.iter().all(|e| e.ok), "{sticky:?}");
    assert!(s.agents.iter_mut().all(|a| a.is_running()));
}
