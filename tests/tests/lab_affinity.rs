//! Session affinity end to end (`sessionAffinity: ClientIP`, `timeoutSeconds: 2`, three
//! backends): on the socket-level path (ClusterIP from pods) and the north-south path (NodePort
//! from the external client: XDP on the XDP lab variant, tc ingress on the plain one). Every test
//! runs on both lab variants (`_plain`, `_xdp`).
use std::{collections::BTreeSet, time::Duration};

use lb_tests::{
    lab::{Exchange, Lab},
    on_both_variants, Variant,
};

const CLUSTER_IP: &str = "10.96.0.60:80";
const NODE_PORT: &str = "192.168.100.1:30100";

use lb_tests::scenario::{example_manifests as examples, start_example_on as setup};

fn backends(ex: &[Exchange], what: &str) -> BTreeSet<String> {
    let bad: Vec<_> = ex.iter().filter(|e| !e.ok).collect();
    assert!(
        bad.is_empty(),
        "{what}: {} failed, first {:?}",
        bad.len(),
        bad.first()
    );
    ex.iter().map(|e| e.backend.clone().unwrap()).collect()
}

/// `count` exchanges from `at`, which must all reach one backend; returns it.
fn one_backend(lab: &Lab, at: &str, proto: &str, target: &str, count: u32) -> String {
    let ex = lab
        .run_client(at, &[proto, target, "--count", &count.to_string()])
        .unwrap();
    let b = backends(&ex, &format!("{proto} {target} from {at}"));
    assert_eq!(b.len(), 1, "{proto} {target} from {at}: {b:?}");
    b.into_iter().next().unwrap()
}

fn affinity_keeps_a_client_on_one_backend_on_both_paths(v: Variant) {
    let Some(s) = setup(v) else { return };
    for proto in ["tcp", "udp"] {
        one_backend(&s.lab, "a1", proto, CLUSTER_IP, 50);
        one_backend(&s.lab, "client", proto, NODE_PORT, 50);
    }
}
on_both_variants!(affinity_keeps_a_client_on_one_backend_on_both_paths: lab_affinity_keeps_a_client_on_one_backend_on_both_paths_plain, lab_affinity_keeps_a_client_on_one_backend_on_both_paths_xdp);

fn affinity_two_clients_can_land_on_different_backends(v: Variant) {
    let Some(s) = setup(v) else { return };
    // Pods a1 and a2 are two clients (two network namespaces). Each choice is independent, so
    // they differ with probability 2/3; after the 2 s timeout both choose again.
    for round in 0..8 {
        let x = one_backend(&s.lab, "a1", "tcp", CLUSTER_IP, 20);
        let y = one_backend(&s.lab, "a2", "tcp", CLUSTER_IP, 20);
        if x != y {
            eprintln!("round {round}: a1 -> {x}, a2 -> {y}");
            return;
        }
        std::thread::sleep(Duration::from_millis(3100));
    }
    panic!("two clients always shared a backend over 8 independent rounds");
}
on_both_variants!(affinity_two_clients_can_land_on_different_backends: lab_affinity_two_clients_can_land_on_different_backends_plain, lab_affinity_two_clients_can_land_on_different_backends_xdp);

fn affinity_expires_after_the_idle_timeout(v: Variant) {
    let Some(s) = setup(v) else { return };
    let mut first = [
        one_backend(&s.lab, "a1", "tcp", CLUSTER_IP, 5),
        one_backend(&s.lab, "client", "tcp", NODE_PORT, 5),
    ];
    let mut moved = [false, false];
    for _ in 0..8 {
        // Idle longer than timeoutSeconds (2): the next connection is balanced afresh.
        std::thread::sleep(Duration::from_millis(3100));
        let now = [
            one_backend(&s.lab, "a1", "tcp", CLUSTER_IP, 5),
            one_backend(&s.lab, "client", "tcp", NODE_PORT, 5),
        ];
        for i in 0..2 {
            moved[i] |= now[i] != first[i];
        }
        if moved == [true, true] {
            return;
        }
        first = now;
    }
    panic!(
        "after idle timeouts the choice never moved (socket path moved: {}, XDP path moved: {})",
        moved[0], moved[1]
    );
}
on_both_variants!(affinity_expires_after_the_idle_timeout: lab_affinity_expires_after_the_idle_timeout_plain, lab_affinity_expires_after_the_idle_timeout_xdp);

fn affinity_moves_off_a_removed_backend_without_failures(v: Variant) {
    let Some(mut s) = setup(v) else { return };
    let pinned_sock = one_backend(&s.lab, "a1", "tcp", CLUSTER_IP, 10);
    let pinned_xdp = one_backend(&s.lab, "client", "tcp", NODE_PORT, 10);
    // Remove both pinned backends from the Service (the sticky slice only).
    let text = examples();
    let (head, tail) = text.split_at(text.find("name: sticky-1").unwrap());
    let mut tail = tail.to_string();
    for b in BTreeSet::from([pinned_sock.clone(), pinned_xdp.clone()]) {
        let addr = s.lab.pod(&b).addr.to_string();
        tail = tail.replace(&format!("- {{addresses: [{addr}]"), "# removed: ");
    }
    s.apply(&format!("{head}{tail}"), 2);
    // Well within the 2 s timeout: the records are still live but their backends are gone.
    let now_sock = one_backend(&s.lab, "a1", "tcp", CLUSTER_IP, 20);
    let now_xdp = one_backend(&s.lab, "client", "tcp", NODE_PORT, 20);
    assert_ne!(now_sock, pinned_sock);
    assert_ne!(now_xdp, pinned_xdp);
}
on_both_variants!(affinity_moves_off_a_removed_backend_without_failures: lab_affinity_moves_off_a_removed_backend_without_failures_plain, lab_affinity_moves_off_a_removed_backend_without_failures_xdp);
