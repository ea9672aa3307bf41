//! The kube-proxy rules the benchmarks compare against really work: loaded into node1 of the
//! reference lab, the iptables and the nftables rules for the measured NodePort Service (plus
//! 100 ClusterIP fillers) forward the client's TCP and UDP requests to b1 and b2 on node2, with
//! the source rewritten to node1 as externalTrafficPolicy Cluster requires. And a tiny run of
//! the lab benchmark produces traffic in every mode.
use std::{collections::BTreeSet, sync::Mutex, time::Duration};

use lb_tests::{
    bench::{
        gen, kubeproxy,
        labbench::{self, NODE_PORT_TCP, NODE_PORT_UDP},
    },
    lab::{Exchange, Lab},
};

/// The lab tests of this file run one at a time even without `--test-threads=1`.
static SERIAL: Mutex<()> = Mutex::new(());

/// Root, BPF, cgroups (see `require_privileges`) and the two tools; with CI=true anything missing
/// panics.
fn ready() -> Option<std::sync::MutexGuard<'static, ()>> {
    lb_tests::require_privileges()?;
    for (tool, arg) in [("iptables-restore", "--version"), ("nft", "--version")] {
        if let Err(e) = kubeproxy::tool_version(tool, &[arg]) {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{e:#}");
            }
            eprintln!("skipping: {e:#}");
            return None;
        }
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// 40 TCP and 40 UDP exchanges from the client to node1's NodePorts: all answered, by b1 and b2
/// (both seen), which saw node1's address as the source; replies came from the NodePort.
fn check_nodeports(lab: &Lab, what: &str) {
    let node1 = lab.node("node1").addr;
    for (proto, port) in [("tcp", NODE_PORT_TCP), ("udp", NODE_PORT_UDP)] {
        let target = format!("{node1}:{port}");
        let ex = lab
            .run_client("client", &[proto, &target, "--count", "40"])
            .unwrap();
        let bad: Vec<&Exchange> = ex.iter().filter(|e| !e.ok).collect();
        assert!(
            bad.is_empty(),
            "{what} {proto} {target}: {} of {} failed, first {:?}",
            bad.len(),
            ex.len(),
            bad.first()
        );
        let backends: BTreeSet<&str> = ex.iter().filter_map(|e| e.backend.as_deref()).collect();
        assert_eq!(
            backends,
            BTreeSet::from(["b1", "b2"]),
            "{what} {proto}: {ex:?}"
        );
        for e in &ex {
            assert_eq!(
                e.seen_ip(),
                Some(node1.into()),
                "{what} {proto}: the backend must see node1: {e:?}"
            );
            assert_eq!(
                e.peer.as_deref(),
                Some(target.as_str()),
                "{what} {proto}: {e:?}"
            );
        }
    }
}

fn services(lab: &Lab) -> Vec<gen::BenchService> {
    labbench::bench_services(lab, 101)
}

#[test]
fn lab_kubeproxy_iptables_rules_serve_the_nodeport() {
    let Some(_serial) = ready() else { return };
    let lab = Lab::new().expect("lab");
    let node1 = lab.node("node1").netns.clone();
    let rules = kubeproxy::iptables_full_restore(&services(&lab));
    // kube-proxy's own call (`--noflush`); 101 Services load in well under a second.
    kubeproxy::iptables_restore_in(&node1, &rules).unwrap();
    check_nodeports(&lab, "iptables");
    // The rules live in node1's namespace, the one place that translated.
    let nat = lb_tests::netns::exec_in(&node1, "iptables", &["-t", "nat", "-S", "KUBE-NODEPORTS"])
        .unwrap();
    assert_eq!(
        nat.lines()
            .filter(|l| l.starts_with("-A KUBE-NODEPORTS"))
            .count(),
        2,
        "{nat}"
    );
    kubeproxy::iptables_flush_in(&node1).unwrap();
}

#[test]
fn lab_kubeproxy_nftables_rules_serve_the_nodeport() {
    let Some(_serial) = ready() else { return };
    let lab = Lab::new().expect("lab");
    let node1 = lab.node("node1").netns.clone();
    let rules = kubeproxy::nft_full_transaction(&services(&lab));
    kubeproxy::nft_apply_in(&node1, &rules).unwrap();
    check_nodeports(&lab, "nftables");
    let map = lb_tests::netns::exec_in(
        &node1,
        "nft",
        &["list", "map", "ip", "kube-proxy", "service-nodeports"],
    )
    .unwrap();
    assert!(
        map.contains(&format!("tcp . {NODE_PORT_TCP}"))
            && map.contains(&format!("udp . {NODE_PORT_UDP}")),
        "{map}"
    );
    kubeproxy::nft_flush_in(&node1).unwrap();
}

#[test]
fn lab_kubeproxy_rule_errors_name_the_line() {
    let Some(_serial) = ready() else { return };
    let lab = Lab::new().expect("lab");
    let node1 = lab.node("node1").netns.clone();
    let e = kubeproxy::iptables_restore_in(
        &node1,
        "*nat\n:KUBE-X - [0:0]\n-A KUBE-X -j NO-SUCH-CHAIN\nCOMMIT\n",
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("-A KUBE-X -j NO-SUCH-CHAIN"), "{e}");
    let e = kubeproxy::nft_apply_in(
        &node1,
        "add table ip t\nadd chain ip t c\nadd rule ip t c bogus\n",
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("add rule ip t c bogus"), "{e}");
}

#[test]
fn lab_kubeproxy_bench_smoke() {
    let Some(_serial) = ready() else { return };
    let points = labbench::lab_bench(&[1, 100], Duration::from_secs(1), 2).unwrap();
    assert_eq!(points.len(), 2 * labbench::MODES.len(), "{points:#?}");
    for p in &points {
        assert!(p.rps > 0.0 && p.pps > 0.0, "{p:#?}");
        // Two runs each, the point's figure their median.
        assert_eq!(p.rps_spread.runs.len(), 2, "{p:#?}");
        assert!(
            p.rps_spread.min <= p.rps && p.rps <= p.rps_spread.max,
            "{p:#?}"
        );
    }
    let seen: BTreeSet<(String, usize)> = points
        .iter()
        .map(|p| (p.mode.clone(), p.services))
        .collect();
    for mode in labbench::MODES {
        for n in [1, 100] {
            assert!(
                seen.contains(&(mode.to_string(), n)),
                "{mode} {n} missing: {points:#?}"
            );
        }
    }
}
