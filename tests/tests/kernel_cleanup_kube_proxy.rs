//! `lb-agent cleanup-kube-proxy` for real: in a network namespace of its own, the test installs
//! some rules of "the node's own" (iptables nat/filter/mangle chains and jumps, IPv4 and IPv6, an
//! nftables table), then kube-proxy's rules for 20 Services as kube-proxy writes them (the
//! benchmarks' generators: iptables in both the nf_tables and the legacy backend, the nftables
//! mode's `ip kube-proxy` table, an `ip6 kube-proxy` table and IPv6 chains, the canary chains
//! kube-proxy keeps in mangle, nat and filter), runs the real binary there twice, and checks
//! that every chain and table of kube-proxy is gone, that exactly the node's own rules and the
//! kubelet's chains (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`) remain, and that the second run
//! finds nothing.
use std::collections::BTreeSet;

use lb_tests::{
    bench::{gen, kubeproxy},
    netns::{self, ScratchNetns},
};

/// The node's own rules, there before kube-proxy: they must stay byte for byte. The mangle rule
/// and KUBE-KUBELET-CANARY stand for the kubelet and the node's other tenants.
const NODE_RULES_V4: &str = "*nat
:USER-NAT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -j USER-NAT
-A USER-NAT -p tcp -m tcp --dport 2222 -j DNAT --to-destination 10.1.2.3:22
-A POSTROUTING -s 10.1.0.0/16 -j MASQUERADE
COMMIT
*filter
:USER-FWD - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -m comment --comment \"node firewall, not kubernetes service portals\" -j USER-FWD
-A USER-FWD -s 10.1.0.0/16 -j ACCEPT
COMMIT
*mangle
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -p udp -m udp --dport 53 -j MARK --set-xmark 0x1/0xffffffff
COMMIT
";

const NODE_RULES_V6: &str = "*nat
:USER-NAT6 - [0:0]
-A PREROUTING -j USER-NAT6
-A USER-NAT6 -p tcp -m tcp --dport 2222 -j DNAT --to-destination [fd00::3]:22
COMMIT
";

const NODE_NFT: &str = "table inet node-fw {
  chain input { type filter hook input priority 0; policy accept; tcp dport 2222 accept; }
}
";

/// kube-proxy's canary chains (mangle, nat, filter) and a jump from a chain of the node's own
/// into kube-proxy's KUBE-MARK-MASQ, which must go with the chain.
const KUBE_PROXY_EXTRA_V4: &str = "*mangle
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*nat
:KUBE-PROXY-CANARY - [0:0]
-A USER-NAT -s 10.9.0.0/16 -j KUBE-MARK-MASQ
COMMIT
*filter
:KUBE-PROXY-CANARY - [0:0]
COMMIT
";

/// kube-proxy's IPv6 side, as its dual-stack iptables proxier writes it (one Service).
const KUBE_PROXY_V6: &str = "*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]
:KUBE-SEP-BBBBBBBBBBBBBBBB - [0:0]
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE
-A KUBE-SERVICES -d fd00:96::10/128 -p tcp -m tcp --dport 80 -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SVC-AAAAAAAAAAAAAAAA -j KUBE-SEP-BBBBBBBBBBBBBBBB
-A KUBE-SEP-BBBBBBBBBBBBBBBB -p tcp -m tcp -j DNAT --to-destination [fd00:250::1]:8080
COMMIT
";

const KUBE_PROXY_NFT_V6: &str = "add table ip6 kube-proxy
add chain ip6 kube-proxy services
add chain ip6 kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add rule ip6 kube-proxy nat-prerouting jump services
";

/// The kubelet's chains, which kube-proxy's cleanup leaves too.
const KUBELET_CHAINS: &[&str] = &["KUBE-FIREWALL", "KUBE-KUBELET-CANARY"];

fn ready() -> Option<()> {
    lb_tests::require_privileges()?;
    for tool in [
        "iptables-nft-restore",
        "iptables-legacy-restore",
        "ip6tables-nft-restore",
        "nft",
    ] {
        if let Err(e) = kubeproxy::tool_version(tool, &["--version"]) {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{e:#}");
            }
            eprintln!("skipping: {e:#}");
            return None;
        }
    }
    Some(())
}

/// Loads `input` with `restore --noflush` inside `ns`.
fn restore(ns: &str, restore: &str, input: &str) {
    let mut cmd = netns::command_in(ns, None, restore);
    cmd.arg("--noflush");
    run_with_stdin(cmd, input);
}

fn run_with_stdin(mut cmd: std::process::Command, input: &str) {
    use std::io::Write;
    let desc = netns::describe(&cmd);
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{desc}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{desc}: {}\n{input}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `save` inside `ns` as (table, line) pairs: chain declarations without their counters, rules;
/// no comments, no COMMIT.
fn saved(ns: &str, save: &str) -> BTreeSet<(String, String)> {
    let text = netns::exec_in(ns, save, &[]).unwrap();
    let mut table = String::new();
    let mut out = BTreeSet::new();
    for l in text.lines() {
        if let Some(t) = l.strip_prefix('*') {
            table = t.to_string();
        } else if let Some(decl) = l.strip_prefix(':') {
            let mut w = decl.split_whitespace();
            let (name, policy) = (w.next().unwrap(), w.next().unwrap());
            out.insert((table.clone(), format!(":{name} {policy}")));
        } else if l.starts_with("-A ") {
            out.insert((table.clone(), l.to_string()));
        }
    }
    out
}

/// Chains declared in a [`saved`] set: (table, name).
fn chains(s: &BTreeSet<(String, String)>) -> BTreeSet<(String, String)> {
    s.iter()
        .filter_map(|(t, l)| {
            let name = l.strip_prefix(':')?.split_whitespace().next()?;
            Some((t.clone(), name.to_string()))
        })
        .collect()
}

fn nft_tables(ns: &str) -> BTreeSet<String> {
    netns::exec_in(ns, "nft", &["list", "tables"])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Runs `lb-agent cleanup-kube-proxy` inside `ns`: (stdout lines, stderr).
fn cleanup(ns: &str) -> (Vec<String>, String) {
    let bin = lb_tests::bin_path("lb-agent").unwrap();
    let mut cmd = netns::command_in(ns, None, &bin);
    cmd.arg("cleanup-kube-proxy");
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "exit {}: {stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    (stdout.lines().map(str::to_string).collect(), stderr)
}

const BACKENDS: [(&str, &str, &str); 3] = [
    ("iptables-nft", "iptables-nft-save", "iptables-nft-restore"),
    (
        "iptables-legacy",
        "iptables-legacy-save",
        "iptables-legacy-restore",
    ),
    (
        "ip6tables-nft",
        "ip6tables-nft-save",
        "ip6tables-nft-restore",
    ),
];

#[test]
fn kernel_cleanup_kube_proxy_removes_its_chains_and_tables_and_nothing_else() {
    let Some(()) = ready() else { return };
    let scratch = ScratchNetns::new("lbkpclean").unwrap();
    let ns = scratch.name.as_str();

    // The node's own rules, and what they look like before kube-proxy.
    for (_, _, r) in &BACKENDS[..2] {
        restore(ns, r, NODE_RULES_V4);
    }
    restore(ns, "ip6tables-nft-restore", NODE_RULES_V6);
    let mut nft = netns::command_in(ns, None, "nft");
    nft.args(["-f", "-"]);
    run_with_stdin(nft, NODE_NFT);
    let before: Vec<BTreeSet<(String, String)>> =
        BACKENDS.iter().map(|(_, s, _)| saved(ns, s)).collect();
    let node_fw = netns::exec_in(ns, "nft", &["list", "table", "inet", "node-fw"]).unwrap();
    let tables_before = nft_tables(ns);

    // kube-proxy's rules for 20 Services, in every backend, and its nftables tables.
    let services = gen::filler(20, 3, "node2");
    let ipt = kubeproxy::iptables_full_restore(&services);
    for (_, _, r) in &BACKENDS[..2] {
        restore(ns, r, &ipt);
        restore(ns, r, KUBE_PROXY_EXTRA_V4);
    }
    restore(ns, "ip6tables-nft-restore", KUBE_PROXY_V6);
    kubeproxy::nft_apply_in(ns, &kubeproxy::nft_full_transaction(&services)).unwrap();
    kubeproxy::nft_apply_in(ns, KUBE_PROXY_NFT_V6).unwrap();
    let installed: Vec<BTreeSet<(String, String)>> =
        BACKENDS.iter().map(|(_, s, _)| saved(ns, s)).collect();
    // What must go: every KUBE- chain that appeared, but the kubelet's.
    let kube_proxy_chains: Vec<BTreeSet<(String, String)>> = installed
        .iter()
        .map(|s| {
            chains(s)
                .into_iter()
                .filter(|(_, c)| c.starts_with("KUBE-") && !KUBELET_CHAINS.contains(&c.as_str()))
                .collect()
        })
        .collect();
    assert!(
        kube_proxy_chains[0].len() > 60 && kube_proxy_chains[1] == kube_proxy_chains[0],
        "the rules went in: {:?}",
        kube_proxy_chains[0]
    );
    assert_eq!(kube_proxy_chains[2].len(), 5, "{:?}", kube_proxy_chains[2]);
    let tables = nft_tables(ns);
    assert!(tables.contains("table ip kube-proxy") && tables.contains("table ip6 kube-proxy"));

    let (out, stderr) = cleanup(ns);
    assert!(!stderr.contains("skipped"), "every tool is here: {stderr}");

    // Every kube-proxy chain is reported, once, under its backend and table.
    for ((name, _, _), chains) in BACKENDS.iter().zip(&kube_proxy_chains) {
        let reported: BTreeSet<(String, String)> = out
            .iter()
            .filter_map(|l| {
                let rest = l.strip_prefix(&format!("removed {name} "))?;
                let (table, what) = rest.split_once(": chain ")?;
                Some((table.to_string(), what.split(' ').next()?.to_string()))
            })
            .collect();
        assert_eq!(&reported, chains, "{name}: {out:#?}");
    }
    for t in ["ip", "ip6"] {
        assert!(
            out.contains(&format!("removed nft: table {t} kube-proxy")),
            "{out:#?}"
        );
    }
    // The node's own jump into KUBE-MARK-MASQ went with the chain.
    assert!(
        out.iter()
            .any(|l| l
                == "removed iptables-nft nat: rule -A USER-NAT -s 10.9.0.0/16 -j KUBE-MARK-MASQ"),
        "{out:#?}"
    );

    // What remains is exactly the node's own rules plus the kubelet's KUBE-FIREWALL (chain,
    // rule and its jumps from INPUT and OUTPUT, written with kube-proxy's rules).
    let mut expected_after = Vec::new();
    for (i, (name, save, _)) in BACKENDS.iter().enumerate() {
        let after = saved(ns, save);
        let kubelet: BTreeSet<(String, String)> = installed[i]
            .iter()
            .filter(|(_, l)| l.contains("KUBE-FIREWALL"))
            .cloned()
            .collect();
        let expected: BTreeSet<(String, String)> = before[i].union(&kubelet).cloned().collect();
        if i < 2 {
            assert!(
                kubelet.len() >= 4,
                "{name}: KUBE-FIREWALL with its rule and jumps"
            );
        }
        assert_eq!(
            after.difference(&expected).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "{name}: left over"
        );
        assert_eq!(
            expected.difference(&after).collect::<Vec<_>>(),
            Vec::<&(String, String)>::new(),
            "{name}: removed but not kube-proxy's"
        );
        expected_after.push(expected);
    }
    assert_eq!(nft_tables(ns), tables_before);
    assert_eq!(
        netns::exec_in(ns, "nft", &["list", "table", "inet", "node-fw"]).unwrap(),
        node_fw
    );

    // Idempotent: nothing left to remove, the same state after.
    let (again, _) = cleanup(ns);
    assert_eq!(again, ["nothing of kube-proxy's found"]);
    for ((name, save, _), expected) in BACKENDS.iter().zip(&expected_after) {
        assert_eq!(&saved(ns, save), expected, "{name} after the second run");
    }
    assert_eq!(nft_tables(ns), tables_before);
}
