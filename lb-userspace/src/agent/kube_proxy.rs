//! `lb-agent cleanup-kube-proxy`: removes what kube-proxy leaves on a node in its iptables and
//! nftables modes, as `kube-proxy --cleanup` does, so that a node migrated to this agent keeps no
//! stale Service rules: kube-proxy's last DNAT rules would go on translating packets the agent's
//! programs leave to the stack (to backends that may be gone), and its `KUBE-FORWARD` and
//! firewall chains would go on filtering.
//!
//! What is removed, in the `nat`, `filter` and `mangle` tables of every iptables backend in use
//! (nf_tables and legacy, IPv4 and IPv6):
//! - kube-proxy's top-level chains [`CHAINS`] (kube-proxy's own cleanup removes `KUBE-SERVICES`,
//!   `KUBE-NODEPORTS`, `KUBE-POSTROUTING`, `KUBE-EXTERNAL-SERVICES`, `KUBE-FORWARD`; this also
//!   removes `KUBE-MARK-MASQ`, which kube-proxy has created itself since kubelet stopped doing so
//!   in 1.25, `KUBE-PROXY-FIREWALL` and the `KUBE-PROXY-CANARY` chains);
//! - every per-Service and per-endpoint chain ([`CHAIN_PREFIXES`]: `KUBE-SVC-`, `KUBE-SVL-`,
//!   `KUBE-EXT-`, `KUBE-FW-`, `KUBE-SEP-`, and `KUBE-XLB-` of kube-proxy before 1.24);
//! - every rule of another chain (the built-in `PREROUTING`, `INPUT`, `FORWARD`, `OUTPUT`,
//!   `POSTROUTING`, or anyone's) that jumps (`-j`/`-g`) to one of those chains.
//!
//! What stays: the kubelet's chains (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`, `KUBE-MARK-DROP`,
//! which kube-proxy also leaves) and everything else. nftables: the tables `ip kube-proxy` and
//! `ip6 kube-proxy` are deleted whole. IPVS mode's leftovers (the `kube-ipvs0` device, IPVS
//! services, ipsets) are not handled: run `kube-proxy --cleanup` for those.
//!
//! Each backend is read with its `*-save` tool and changed in one `*-restore --noflush`
//! transaction per table, as kube-proxy does. A legacy backend is looked at only when the kernel
//! has legacy tables (`/proc/net/ip_tables_names` is not empty, the test kube-proxy's image's
//! `iptables-wrapper` makes too), so nothing here loads a kernel module. A tool that is missing is skipped with a message
//! on stderr (the image has them all); when every tool is missing that is an error (exit 2), and
//! a tool that fails is an error (exit 1).
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// kube-proxy's fixed chain names (in any of [`TABLES`]).
pub const CHAINS: &[&str] = &[
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
];

/// Prefixes of kube-proxy's per-Service-port and per-endpoint chains.
pub const CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
    "KUBE-XLB-",
];

/// The iptables tables kube-proxy writes to.
pub const TABLES: &[&str] = &["nat", "filter", "mangle"];

/// The nftables tables of kube-proxy's nftables mode (family, name).
pub const NFT_TABLES: &[(&str, &str)] = &[("ip", "kube-proxy"), ("ip6", "kube-proxy")];

/// Whether `chain` is one of kube-proxy's.
pub fn is_kube_proxy_chain(chain: &str) -> bool {
    CHAINS.contains(&chain) || CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p))
}

/// What to change in one table of one backend.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TablePlan {
    pub table: String,
    /// kube-proxy's chains in the table, with their rule counts: flushed and deleted.
    pub chains: BTreeMap<String, usize>,
    /// Rules of other chains that jump to one of them, as `iptables-save` prints them without
    /// the leading `-A ` (`PREROUTING -m comment --comment "..." -j KUBE-SERVICES`): deleted.
    pub jumps: Vec<String>,
}

impl TablePlan {
    /// The `iptables-restore --noflush` input: chain lines (flush), the jumps' deletions, then
    /// the chains' deletions, in one transaction.
    pub fn restore_input(&self) -> String {
        let mut s = format!("*{}\n", self.table);
        for c in self.chains.keys() {
            s.push_str(&format!(":{c} - [0:0]\n"));
        }
        for j in &self.jumps {
            s.push_str(&format!("-D {j}\n"));
        }
        for c in self.chains.keys() {
            s.push_str(&format!("-X {c}\n"));
        }
        s.push_str("COMMIT\n");
        s
    }
}

/// Splits a rule line as `iptables-save` prints it into arguments: blanks separate them, double
/// quotes group (with `\"` and `\\` escapes inside), as iptables-restore reads them.
fn split_args(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_arg = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                in_arg = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_arg {
                    out.push(std::mem::take(&mut cur));
                    in_arg = false;
                }
            }
            c => {
                cur.push(c);
                in_arg = true;
            }
        }
    }
    if in_arg {
        out.push(cur);
    }
    out
}

/// The target of a rule (`-j X`, `-g X`, `--jump X`, `--goto X`), given its arguments.
fn jump_target(args: &[String]) -> Option<&str> {
    args.windows(2)
        .find(|w| matches!(w[0].as_str(), "-j" | "-g" | "--jump" | "--goto"))
        .map(|w| w[1].as_str())
}

/// Reads `iptables-save` output (all tables) and plans the removal of kube-proxy's chains and of
/// the jumps into them, for the tables of [`TABLES`] that hold any. Pure: no tool runs here.
pub fn plan_iptables(save: &str) -> Vec<TablePlan> {
    let mut plans: Vec<TablePlan> = Vec::new();
    // Rules per table: (chain, rest of the line after `-A `).
    let mut rules: Vec<(String, String)> = Vec::new();
    let mut table: Option<TablePlan> = None;
    let finish = |t: Option<TablePlan>, rules: &mut Vec<(String, String)>, plans: &mut Vec<_>| {
        let Some(mut t) = t else { return };
        for (chain, rest) in rules.drain(..) {
            if let Some(n) = t.chains.get_mut(&chain) {
                *n += 1;
                continue;
            }
            let args = split_args(&rest);
            if jump_target(&args).is_some_and(|target| t.chains.contains_key(target)) {
                t.jumps.push(rest);
            }
        }
        if !t.chains.is_empty() && TABLES.contains(&t.table.as_str()) {
            plans.push(t);
        }
    };
    for line in save.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            finish(table.take(), &mut rules, &mut plans);
            table = Some(TablePlan {
                table: name.to_string(),
                ..TablePlan::default()
            });
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if let Some(t) = table.as_mut() {
                if is_kube_proxy_chain(name) {
                    t.chains.insert(name.to_string(), 0);
                }
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            rules.push((chain.to_string(), rest.to_string()));
        } else if line == "COMMIT" {
            finish(table.take(), &mut rules, &mut plans);
        }
    }
    finish(table.take(), &mut rules, &mut plans);
    plans
}

/// The tables `nft list tables` prints (`table ip kube-proxy` lines) that are kube-proxy's.
pub fn plan_nft(list_tables: &str) -> Vec<(String, String)> {
    let present: BTreeSet<(String, String)> = list_tables
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next(), w.next()) {
                (Some("table"), Some(family), Some(name)) => {
                    Some((family.to_string(), name.to_string()))
                }
                _ => None,
            }
        })
        .collect();
    NFT_TABLES
        .iter()
        .map(|(f, n)| (f.to_string(), n.to_string()))
        .filter(|t| present.contains(t))
        .collect()
}

/// One iptables backend and family: its tools and where the kernel says it has tables.
struct Backend {
    /// For messages: `iptables-nft`, `ip6tables-legacy`, ...
    name: &'static str,
    save: &'static str,
    restore: &'static str,
    /// Legacy only: the kernel's list of legacy tables (in this network namespace); the backend
    /// is looked at only when it names any.
    legacy_tables: Option<&'static str>,
}

const BACKENDS: &[Backend] = &[
    Backend {
        name: "iptables-nft",
        save: "iptables-nft-save",
        restore: "iptables-nft-restore",
        legacy_tables: None,
    },
    Backend {
        name: "ip6tables-nft",
        save: "ip6tables-nft-save",
        restore: "ip6tables-nft-restore",
        legacy_tables: None,
    },
    Backend {
        name: "iptables-legacy",
        save: "iptables-legacy-save",
        restore: "iptables-legacy-restore",
        legacy_tables: Some("/proc/net/ip_tables_names"),
    },
    Backend {
        name: "ip6tables-legacy",
        save: "ip6tables-legacy-save",
        restore: "ip6tables-legacy-restore",
        legacy_tables: Some("/proc/net/ip6_tables_names"),
    },
];

/// What a cleanup did.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per removed chain, jump rule and nftables table.
    pub removed: Vec<String>,
    /// One line per tool that was not there (what was therefore not looked at).
    pub skipped: Vec<String>,
}

/// Whether `program` is an executable on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(program)).is_ok_and(|m| {
                m.is_file()
                    && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
            })
        })
    })
}

/// Runs `program args`, with `input` on stdin; fails with its stderr. Returns its stdout.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let desc = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{}`", desc.trim()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .with_context(|| format!("writing to `{}`", desc.trim()))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            desc.trim(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `lb-agent cleanup-kube-proxy`: removes kube-proxy's iptables chains and the jumps into them
/// from every backend in use, and its nftables tables, in the caller's network namespace.
/// Running it again removes nothing.
pub fn cleanup() -> Result<Report> {
    let mut report = Report::default();
    // Backends and nft actually read: with none, nothing was looked at, which is no success.
    let mut looked = 0;
    for b in BACKENDS {
        if let Some(names) = b.legacy_tables {
            let in_use = std::fs::read_to_string(names).is_ok_and(|s| !s.trim().is_empty());
            if !in_use {
                continue;
            }
        }
        if !on_path(b.save) || !on_path(b.restore) {
            report.skipped.push(format!(
                "{}: `{}`/`{}` not found, its rules were not looked at",
                b.name, b.save, b.restore
            ));
            continue;
        }
        let save = run(b.save, &[], None)?;
        looked += 1;
        for plan in plan_iptables(&save) {
            run(b.restore, &["--noflush"], Some(&plan.restore_input()))
                .with_context(|| format!("{} table {}", b.name, plan.table))?;
            for j in &plan.jumps {
                report
                    .removed
                    .push(format!("{} {}: rule -A {j}", b.name, plan.table));
            }
            for (c, n) in &plan.chains {
                report
                    .removed
                    .push(format!("{} {}: chain {c} ({n} rules)", b.name, plan.table));
            }
        }
    }
    if on_path("nft") {
        let tables = run("nft", &["list", "tables"], None)?;
        looked += 1;
        for (family, name) in plan_nft(&tables) {
            run("nft", &["delete", "table", &family, &name], None)?;
            report.removed.push(format!("nft: table {family} {name}"));
        }
    } else {
        report.skipped.push(format!(
            "nft: not found, the nftables tables {} were not looked at",
            NFT_TABLES
                .iter()
                .map(|(f, n)| format!("{f} {n}"))
                .collect::<Vec<_>>()
                .join(" and ")
        ));
    }
    if looked == 0 {
        bail!(crate::error::UsageError(format!(
            "none of {} nor nft is on PATH: nothing was looked at (install iptables and nftables)",
            BACKENDS
                .iter()
                .filter(|b| b.legacy_tables.is_none())
                .map(|b| b.save)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:USER-IN - [0:0]
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -j KUBE-FIREWALL
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m comment --comment "a \"-j KUBE-FORWARD\" in a comment" -j USER-IN
-A KUBE-FIREWALL -d 127.0.0.0/8 -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A USER-IN -g KUBE-FORWARD
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-DEF - [0:0]
:KUBE-MARK-DROP - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-ABC
-A KUBE-SVC-ABC -j KUBE-SEP-DEF
-A KUBE-SEP-DEF -p tcp -j DNAT --to-destination 10.0.0.1:6443
COMMIT
*raw
:KUBE-SERVICES - [0:0]
COMMIT
"#;

    #[test]
    fn plans_kube_proxy_chains_and_the_jumps_into_them_only() {
        let plans = plan_iptables(SAVE);
        let tables: Vec<&str> = plans.iter().map(|p| p.table.as_str()).collect();
        // raw is not kube-proxy's table: left alone even with a KUBE-SERVICES chain in it.
        assert_eq!(tables, ["mangle", "filter", "nat"]);
        assert_eq!(
            plans[0].chains,
            BTreeMap::from([("KUBE-PROXY-CANARY".into(), 0)])
        );
        assert!(plans[0].jumps.is_empty());
        // KUBE-NODEPORTS is not declared in filter here: its jump is not planned (restore would
        // fail on an unknown target, and there is no such chain to remove).
        assert_eq!(
            plans[1].chains,
            BTreeMap::from([("KUBE-FORWARD".into(), 1)])
        );
        assert_eq!(
            plans[1].jumps,
            [
                r#"FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD"#,
                "USER-IN -g KUBE-FORWARD",
            ]
        );
        assert_eq!(
            plans[2].chains,
            BTreeMap::from([
                ("KUBE-SEP-DEF".into(), 1),
                ("KUBE-SERVICES".into(), 1),
                ("KUBE-SVC-ABC".into(), 1)
            ])
        );
        assert_eq!(
            plans[2].jumps,
            [r#"PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#]
        );
        assert_eq!(
            plans[2].restore_input(),
            "*nat\n:KUBE-SEP-DEF - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-ABC - [0:0]\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -X KUBE-SEP-DEF\n-X KUBE-SERVICES\n-X KUBE-SVC-ABC\nCOMMIT\n"
        );
    }

    #[test]
    fn nothing_of_kube_proxy_plans_nothing() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-MARK-DROP - [0:0]\n\
                    -A PREROUTING -j KUBE-MARK-DROP\nCOMMIT\n*filter\n:KUBE-FIREWALL - [0:0]\n\
                    :KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
        assert_eq!(plan_iptables(save), []);
        assert_eq!(plan_iptables(""), []);
    }

    #[test]
    fn chain_names() {
        for c in [
            "KUBE-SERVICES",
            "KUBE-SVL-X",
            "KUBE-FW-X",
            "KUBE-XLB-X",
            "KUBE-PROXY-CANARY",
        ] {
            assert!(is_kube_proxy_chain(c), "{c}");
        }
        for c in [
            "KUBE-FIREWALL",
            "KUBE-KUBELET-CANARY",
            "KUBE-MARK-DROP",
            "KUBE-SVC",
            "FORWARD",
        ] {
            assert!(!is_kube_proxy_chain(c), "{c}");
        }
    }

    #[test]
    fn quoted_arguments_split_as_iptables_restore_reads_them() {
        assert_eq!(
            split_args(r#"X -m comment --comment "a \"q\" -j Y" -j  Z"#),
            [
                "X",
                "-m",
                "comment",
                "--comment",
                r#"a "q" -j Y"#,
                "-j",
                "Z"
            ]
        );
        assert_eq!(
            split_args(r#"X --comment "" -j Z"#),
            ["X", "--comment", "", "-j", "Z"]
        );
    }

    #[test]
    fn nft_tables_of_kube_proxy_only() {
        let list =
            "table ip nat\ntable ip kube-proxy\ntable inet kube-proxy\ntable ip6 kube-proxy\n";
        assert_eq!(
            plan_nft(list),
            [
                ("ip".to_string(), "kube-proxy".to_string()),
                ("ip6".to_string(), "kube-proxy".to_string())
            ]
        );
        assert_eq!(plan_nft("table ip filter\n"), []);
    }
}
