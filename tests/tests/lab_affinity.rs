//! Session affinity end to end (`sessionAffinity: ClientIP`, `timeoutSeconds: 2`, three
//! backends): on the socket-level path (ClusterIP from pods) and the north-south path (NodePort
//! from the external client: XDP on the XDP lab variant, tc ingress on the plain one). Every test
//! runs on both lab variants (`_plain`, `_xdp`), and has an IPv6 twin (`…6`: an IPv6-only Service
//! of the same kind, `sticky6`, reached at its IPv6 ClusterIP from pods and at node1's IPv6
//! address from the external client).
use std::{collections::BTreeSet, time::Duration};

use lb_tests::{
    lab::{Exchange, Lab},
    on_both_variants, Variant,
};

use lb_tests::scenario::{example_manifests as examples, start_example_on, Running};

/// The example manifests' `sticky` (IPv4) or this file's IPv6 twin of it, `sticky6`.
#[derive(Clone, Copy, PartialEq)]
enum Family {
    V4,
    V6,
}

/// `sticky`'s IPv6 twin: ClientIP affinity (2 s) over a1, a2 and b1, IPv6 only.
const STICKY6: &str = "apiVersion: v1
kind: Service
metadata: {name: sticky6, namespace: default}
spec:
  type: NodePort
  ipFamilies: [IPv6]
  clusterIPs: [\"fd00:96::160\"]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}
  selector: {app: sticky6}
  ports:
  - {name: tcp, port: 80, targetPort: 8080, nodePort: 30200}
  - {name: udp, port: 80, targetPort: 8080, nodePort: 30200, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky6-1, namespace: default, labels: {kubernetes.io/service-name: sticky6}}
addressType: IPv6
ports:
- {name: tcp, port: 8080}
- {name: udp, port: 8080, protocol: UDP}
endpoints:
- {addresses: [\"fd00:244:1::10\"], nodeName: node1}
- {addresses: [\"fd00:244:1::11\"], nodeName: node1}
- {addresses: [\"fd00:244:2::10\"], nodeName: node2}
";

impl Family {
    /// The sticky Service's ClusterIP (pods reach it at socket level).
    fn cluster_ip(self) -> &'static str {
        match self {
            Family::V4 => "10.96.0.60:80",
            Family::V6 => "[fd00:96::160]:80",
        }
    }

    /// Its NodePort on node1 (the external client reaches it through the north-south path).
    fn node_port(self) -> &'static str {
        match self {
            Family::V4 => "192.168.100.1:30100",
            Family::V6 => "[fd00:100::1]:30200",
        }
    }

    /// The manifests the agents run on, and the generation they reach.
    fn manifests(self) -> (String, u32) {
        match self {
            Family::V4 => (examples(), 1),
            Family::V6 => (format!("{}\n---\n{STICKY6}", examples().trim_end()), 2),
        }
    }

    /// How the sticky EndpointSlice names itself and an endpoint (pod `name`) in the manifests.
    fn endpoint(self, s: &Running, pod: &str) -> (&'static str, String) {
        let p = s.lab.pod(pod);
        match self {
            Family::V4 => ("name: sticky-1", format!("- {{addresses: [{}]", p.addr)),
            Family::V6 => (
                "name: sticky6-1",
                format!("- {{addresses: [\"{}\"]", p.addr6),
            ),
        }
    }
}

/// The lab of variant `v` with agents on the family's manifests.
fn setup(v: Variant, f: Family) -> Option<Running> {
    let mut s = start_example_on(v)?;
    if f == Family::V6 {
        s.apply(&f.manifests().0, 2);
    }
    Some(s)
}

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

fn affinity_keeps_a_client_on_one_backend_on_both_paths(v: Variant, f: Family) {
    let Some(s) = setup(v, f) else { return };
    for proto in ["tcp", "udp"] {
        one_backend(&s.lab, "a1", proto, f.cluster_ip(), 50);
        one_backend(&s.lab, "client", proto, f.node_port(), 50);
    }
}
fn affinity_keeps_a_client_on_one_backend_on_both_paths4(v: Variant) {
    affinity_keeps_a_client_on_one_backend_on_both_paths(v, Family::V4);
}
on_both_variants!(affinity_keeps_a_client_on_one_backend_on_both_paths4: lab_affinity_keeps_a_client_on_one_backend_on_both_paths_plain, lab_affinity_keeps_a_client_on_one_backend_on_both_paths_xdp);

fn affinity_keeps_a_client_on_one_backend_on_both_paths6(v: Variant) {
    affinity_keeps_a_client_on_one_backend_on_both_paths(v, Family::V6);
}
on_both_variants!(affinity_keeps_a_client_on_one_backend_on_both_paths6: lab_affinity_keeps_a_client_on_one_backend_on_both_paths6_plain, lab_affinity_keeps_a_client_on_one_backend_on_both_paths6_xdp);

fn affinity_two_clients_can_land_on_different_backends(v: Variant, f: Family) {
    let Some(s) = setup(v, f) else { return };
    // Pods a1 and a2 are two clients (two network namespaces). Each choice is independent, so
    // they differ with probability 2/3; after the 2 s timeout both choose again.
    for round in 0..8 {
        let x = one_backend(&s.lab, "a1", "tcp", f.cluster_ip(), 20);
        let y = one_backend(&s.lab, "a2", "tcp", f.cluster_ip(), 20);
        if x != y {
            eprintln!("round {round}: a1 -> {x}, a2 -> {y}");
            return;
        }
        std::thread::sleep(Duration::from_millis(3100));
    }
    panic!("two clients always shared a backend over 8 independent rounds");
}
fn affinity_two_clients_can_land_on_different_backends4(v: Variant) {
    affinity_two_clients_can_land_on_different_backends(v, Family::V4);
}
on_both_variants!(affinity_two_clients_can_land_on_different_backends4: lab_affinity_two_clients_can_land_on_different_backends_plain, lab_affinity_two_clients_can_land_on_different_backends_xdp);

fn affinity_two_clients_can_land_on_different_backends6(v: Variant) {
    affinity_two_clients_can_land_on_different_backends(v, Family::V6);
}
on_both_variants!(affinity_two_clients_can_land_on_different_backends6: lab_affinity_two_clients_can_land_on_different_backends6_plain, lab_affinity_two_clients_can_land_on_different_backends6_xdp);

fn affinity_expires_after_the_idle_timeout(v: Variant, f: Family) {
    let Some(s) = setup(v, f) else { return };
    let mut first = [
        one_backend(&s.lab, "a1", "tcp", f.cluster_ip(), 5),
        one_backend(&s.lab, "client", "tcp", f.node_port(), 5),
    ];
    let mut moved = [false, false];
    for _ in 0..8 {
        // Idle longer than timeoutSeconds (2): the next connection is balanced afresh.
        std::thread::sleep(Duration::from_millis(3100));
        let now = [
            one_backend(&s.lab, "a1", "tcp", f.cluster_ip(), 5),
            one_backend(&s.lab, "client", "tcp", f.node_port(), 5),
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
fn affinity_expires_after_the_idle_timeout4(v: Variant) {
    affinity_expires_after_the_idle_timeout(v, Family::V4);
}
on_both_variants!(affinity_expires_after_the_idle_timeout4: lab_affinity_expires_after_the_idle_timeout_plain, lab_affinity_expires_after_the_idle_timeout_xdp);

fn affinity_expires_after_the_idle_timeout6(v: Variant) {
    affinity_expires_after_the_idle_timeout(v, Family::V6);
}
on_both_variants!(affinity_expires_after_the_idle_timeout6: lab_affinity_expires_after_the_idle_timeout6_plain, lab_affinity_expires_after_the_idle_timeout6_xdp);

fn affinity_moves_off_a_removed_backend_without_failures(v: Variant, f: Family) {
    let Some(mut s) = setup(v, f) else { return };
    let pinned_sock = one_backend(&s.lab, "a1", "tcp", f.cluster_ip(), 10);
    let pinned_xdp = one_backend(&s.lab, "client", "tcp", f.node_port(), 10);
    // Remove both pinned backends from the Service (the sticky slice only).
    let (text, generation) = f.manifests();
    let (slice, _) = f.endpoint(&s, &pinned_sock);
    let (head, tail) = text.split_at(text.find(slice).unwrap());
    let mut tail = tail.to_string();
    for b in BTreeSet::from([pinned_sock.clone(), pinned_xdp.clone()]) {
        let (_, entry) = f.endpoint(&s, &b);
        assert!(tail.contains(&entry), "{entry} in the sticky slice");
        tail = tail.replace(&entry, "# removed: ");
    }
    s.apply(&format!("{head}{tail}"), generation + 1);
    // Well within the 2 s timeout: the records are still live but their backends are gone.
    let now_sock = one_backend(&s.lab, "a1", "tcp", f.cluster_ip(), 20);
    let now_xdp = one_backend(&s.lab, "client", "tcp", f.node_port(), 20);
    assert_ne!(now_sock, pinned_sock);
    assert_ne!(now_xdp, pinned_xdp);
}
fn affinity_moves_off_a_removed_backend_without_failures4(v: Variant) {
    affinity_moves_off_a_removed_backend_without_failures(v, Family::V4);
}
on_both_variants!(affinity_moves_off_a_removed_backend_without_failures4: lab_affinity_moves_off_a_removed_backend_without_failures_plain, lab_affinity_moves_off_a_removed_backend_without_failures_xdp);

fn affinity_moves_off_a_removed_backend_without_failures6(v: Variant) {
    affinity_moves_off_a_removed_backend_without_failures(v, Family::V6);
}
on_both_variants!(affinity_moves_off_a_removed_backend_without_failures6: lab_affinity_moves_off_a_removed_backend_without_failures6_plain, lab_affinity_moves_off_a_removed_backend_without_failures6_xdp);
