//! Topology-aware routing end to end: EndpointSlice zone hints keep node1's clients in zone-a;
//! when zone-a's endpoints go away the fallback sends them to zone-b, without a failed connection.
use std::{collections::BTreeMap, time::Duration};

use lb_tests::lab::{bin_path, Exchange, Lab};

const ZONED: &str = "10.96.0.50:80";

fn manifests(with_zone_a: bool) -> String {
    let nodes = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/lab.yaml"
    ))
    .unwrap();
    // Keep only the two Node objects of the example.
    let nodes: Vec<&str> = nodes
        .split("\n---\n")
        .filter(|d| d.contains("kind: Node"))
        .collect();
    let zone_a = if with_zone_a {
        "- {addresses: [10.244.1.10], nodeName: node1, zone: zone-a, hints: {forZones: [{name: zone-a}]}}\n\
         - {addresses: [10.244.1.11], nodeName: node1, zone: zone-a, hints: {forZones: [{name: zone-a}]}}\n"
    } else {
        ""
    };
    format!(
        "{}\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {{name: zoned, namespace: default, annotations: {{service.kubernetes.io/topology-mode: Auto}}}}\n\
spec: {{clusterIP: 10.96.0.50, selector: {{app: zoned}}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
metadata: {{name: zoned-1, namespace: default, labels: {{kubernetes.io/service-name: zoned}}}}\n\
addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{zone_a}\
- {{addresses: [10.244.2.10], nodeName: node2, zone: zone-b, hints: {{forZones: [{{name: zone-b}}]}}}}\n\
- {{addresses: [10.244.2.11], nodeName: node2, zone: zone-b, hints: {{forZones: [{{name: zone-b}}]}}}}\n",
        nodes.join("\n---\n")
    )
}

fn spread(ex: &[Exchange]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in ex {
        *m.entry(e.backend.clone().unwrap_or_else(|| "failed".into()))
            .or_default() += 1;
    }
    m
}

#[test]
fn lab_zone_hints_keep_traffic_in_zone_and_fall_back_without_failures() {
    let Some(()) = lb_tests::require_privileges() else {
        return;
    };
    let lab = Lab::new().unwrap();
    let path = lab.tmpdir().join("zoned.yaml");
    std::fs::write(&path, manifests(true)).unwrap();
    let mut agent = lab
        .spawn_agent("node1", &bin_path("lb-agent").unwrap(), &path, &[])
        .unwrap();
    agent
        .wait_for_log("sync generation 1:", Duration::from_secs(20))
        .unwrap();

    // node1 is in zone-a: only zone-a's endpoints serve it.
    let ex = lab
        .run_client("a1", &["tcp", ZONED, "--count", "100"])
        .unwrap();
    let s = spread(&ex);
    assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["a1", "a2"], "{s:?}");

    // zone-a's endpoints go away while a client keeps connecting.
    // Rounds of 50 connections run before, during and after the change, until three rounds
    // after the agent applied it.
    let applied = std::sync::atomic::AtomicBool::new(false);
    let all = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut all = Vec::new();
            let mut after = 0;
            while after < 3 {
                if applied.load(std::sync::atomic::Ordering::SeqCst) {
                    after += 1;
                }
                all.extend(
                    lab.run_client("a2", &["tcp", ZONED, "--count", "50"])
                        .unwrap(),
                );
            }
            all
        });
        std::thread::sleep(Duration::from_millis(200));
        std::fs::write(&path, manifests(false)).unwrap();
        agent
            .wait_for_log("sync generation 2:", Duration::from_secs(20))
            .unwrap();
        applied.store(true, std::sync::atomic::Ordering::SeqCst);
        traffic.join().unwrap()
    });
    eprintln!(
        "{} connections across the change: {:?}",
        all.len(),
        spread(&all)
    );
    let failed: Vec<_> = all.iter().filter(|e| !e.ok).collect();
    assert!(
        failed.is_empty(),
        "{} connections failed during the change: {:?}",
        failed.len(),
        failed.first()
    );
    let s = spread(&all);
    assert!(
        s.contains_key("b1") || s.contains_key("b2"),
        "traffic moved to zone-b during the run: {s:?}"
    );

    // Afterwards: no zone-a endpoint has a hint for zone-a, so hints are ignored: zone-b serves.
    let ex = lab
        .run_client("a1", &["tcp", ZONED, "--count", "100"])
        .unwrap();
    let s = spread(&ex);
    assert_eq!(s.keys().cloned().collect::<Vec<_>>(), ["b1", "b2"], "{s:?}");
}
