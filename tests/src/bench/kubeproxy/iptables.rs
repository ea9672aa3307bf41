//! kube-proxy's iptables mode: the `iptables-restore` input of its first (full) sync and of a
//! partial sync, with kube-proxy's chain names.
use std::{collections::BTreeSet, fmt::Write as _, net::Ipv4Addr};

use super::{
    changed_services, endpoint_string, hash_base32, proto, service_port_name, CLUSTER_CIDR,
    LARGE_CLUSTER_ENDPOINTS, MASQUERADE_MARK,
};
use crate::bench::gen::BenchService;

/// iptables chain of a Service port: `PREFIX` + 16 characters of its hash, as kube-proxy's
/// `portProtoHash`.
fn ipt_chain(prefix: &str, s: &BenchService) -> String {
    format!(
        "{prefix}{}",
        hash_base32(&format!("{}{}", service_port_name(s), proto(s)), 16)
    )
}

pub(super) fn ipt_svc_chain(s: &BenchService) -> String {
    ipt_chain("KUBE-SVC-", s)
}

pub(super) fn ipt_ext_chain(s: &BenchService) -> String {
    ipt_chain("KUBE-EXT-", s)
}

fn ipt_sep_chain(s: &BenchService, ep: Ipv4Addr) -> String {
    let input = format!(
        "{}{}{}",
        service_port_name(s),
        proto(s),
        endpoint_string(s, ep)
    );
    format!("KUBE-SEP-{}", hash_base32(&input, 16))
}

/// The full `iptables-restore --noflush` input kube-proxy's iptables mode loads on its first
/// sync: filter and nat tables. kube-proxy adds the jump rules from the built-in chains
/// (`PREROUTING`/`OUTPUT` -> `KUBE-SERVICES`, `POSTROUTING` -> `KUBE-POSTROUTING`, the filter
/// jumps) with single `iptables -I` calls just before; here they are part of the same input (as
/// `-A` lines), which gives the same ruleset in an empty namespace.
pub fn iptables_full_restore(services: &[BenchService]) -> String {
    iptables_restore(services, None, &[])
}

/// The `iptables-restore --noflush` input of kube-proxy's partial sync after the Services
/// changed from `before` to `after` (the default since Kubernetes 1.28, `MinimizeIPTablesRestore`):
/// the filter table and the nat top-level chains (`KUBE-SERVICES`, `KUBE-NODEPORTS`,
/// `KUBE-POSTROUTING`, `KUBE-MARK-MASQ`) are always rewritten in full, one rule per Service port
/// included; the `KUBE-SVC`/`KUBE-EXT`/`KUBE-SEP` chains only of the Services that changed. Chains
/// that are no longer used are deleted (`-X`) only below [`LARGE_CLUSTER_ENDPOINTS`]: in large
/// clusters kube-proxy leaves them for a later cleanup (at most once per sync period, after an
/// `iptables-save`), so this input does not touch them either.
pub fn iptables_partial_restore(before: &[BenchService], after: &[BenchService]) -> String {
    let changed = changed_services(before, after);
    let stale = if total_endpoints(after) > LARGE_CLUSTER_ENDPOINTS {
        Vec::new()
    } else {
        let used: BTreeSet<String> = ipt_service_chains(after).into_iter().collect();
        let mut stale: Vec<String> = ipt_service_chains(before)
            .into_iter()
            .filter(|c| !used.contains(c))
            .collect();
        stale.sort();
        stale.dedup();
        stale
    };
    iptables_restore(after, Some(&changed), &stale)
}

/// Every per-Service chain (SVC, EXT, SEP) the Services use.
fn ipt_service_chains(services: &[BenchService]) -> Vec<String> {
    let mut out = Vec::new();
    for s in services.iter().filter(|s| !s.endpoints.is_empty()) {
        out.push(ipt_svc_chain(s));
        if s.node_port.is_some() {
            out.push(ipt_ext_chain(s));
        }
        out.extend(s.endpoints.iter().map(|(ep, _)| ipt_sep_chain(s, *ep)));
    }
    out
}

fn total_endpoints(services: &[BenchService]) -> usize {
    services.iter().map(|s| s.endpoints.len()).sum()
}
/// `--comment` argument: quoted when it has spaces, as kube-proxy writes it.
fn comment(text: &str) -> String {
    if text.contains(' ') {
        format!("-m comment --comment \"{text}\"")
    } else {
        format!("-m comment --comment {text}")
    }
}

/// kube-proxy's probability text for the i-th of n endpoint rules: 1/(n-i), ten decimals.
fn probability(remaining: usize) -> String {
    format!("{:.10}", 1.0 / remaining as f64)
}

fn iptables_restore(
    services: &[BenchService],
    changed: Option<&BTreeSet<(String, String)>>,
    stale: &[String],
) -> String {
    let large = total_endpoints(services) > LARGE_CLUSTER_ENDPOINTS;
    let mark = format!("{MASQUERADE_MARK}/{MASQUERADE_MARK}");
    let full = changed.is_none();

    // filter: always complete.
    let mut out = String::with_capacity(services.len() * 1200 + 4096);
    out.push_str("*filter\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    if full {
        // The jumps kube-proxy (and kubelet, for KUBE-FIREWALL) ensure before the restore.
        let new = "-m conntrack --ctstate NEW";
        for (chain, extra, text, target) in [
            (
                "INPUT",
                new,
                "kubernetes load balancer firewall",
                "KUBE-PROXY-FIREWALL",
            ),
            (
                "INPUT",
                "",
                "kubernetes health check service ports",
                "KUBE-NODEPORTS",
            ),
            (
                "INPUT",
                new,
                "kubernetes externally-visible service portals",
                "KUBE-EXTERNAL-SERVICES",
            ),
            ("INPUT", "", "", "KUBE-FIREWALL"),
            (
                "FORWARD",
                new,
                "kubernetes load balancer firewall",
                "KUBE-PROXY-FIREWALL",
            ),
            ("FORWARD", "", "kubernetes forwarding rules", "KUBE-FORWARD"),
            (
                "FORWARD",
                new,
                "kubernetes service portals",
                "KUBE-SERVICES",
            ),
            (
                "FORWARD",
                new,
                "kubernetes externally-visible service portals",
                "KUBE-EXTERNAL-SERVICES",
            ),
            (
                "OUTPUT",
                new,
                "kubernetes load balancer firewall",
                "KUBE-PROXY-FIREWALL",
            ),
            ("OUTPUT", new, "kubernetes service portals", "KUBE-SERVICES"),
            ("OUTPUT", "", "", "KUBE-FIREWALL"),
        ] {
            let mut line = format!("-A {chain}");
            if !extra.is_empty() {
                let _ = write!(line, " {extra}");
            }
            if !text.is_empty() {
                let _ = write!(line, " {}", comment(text));
            }
            let _ = writeln!(out, "{line} -j {target}");
        }
    }
    // localhost NodePorts are on (the default), so kube-proxy writes kubelet's anti-martian rule.
    let _ = writeln!(
        out,
        "-A KUBE-FIREWALL {} -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        comment("block incoming localnet connections")
    );
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
    );
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD {} -m mark --mark {mark} -j ACCEPT",
        comment("kubernetes forwarding rules")
    );
    let _ = writeln!(
        out,
        "-A KUBE-FORWARD {} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        comment("kubernetes forwarding conntrack rule")
    );
    out.push_str("COMMIT\n");

    // nat: chain lines first, then rules, as kube-proxy's two buffers.
    let mut chains = String::with_capacity(services.len() * 400 + 1024);
    let mut rules = String::with_capacity(services.len() * 1000 + 1024);
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{c} - [0:0]");
    }
    if full {
        let portals = comment("kubernetes service portals");
        let _ = writeln!(rules, "-A PREROUTING {portals} -j KUBE-SERVICES");
        let _ = writeln!(rules, "-A OUTPUT {portals} -j KUBE-SERVICES");
        let _ = writeln!(
            rules,
            "-A POSTROUTING {} -j KUBE-POSTROUTING",
            comment("kubernetes postrouting rules")
        );
    }
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {mark} -j RETURN"
    );
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}"
    );
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING {} -j MASQUERADE --random-fully",
        comment("kubernetes service traffic requiring SNAT")
    );
    let _ = writeln!(
        rules,
        "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}"
    );

    for s in services {
        let spn = service_port_name(s);
        let p = proto(s);
        let svc = ipt_svc_chain(s);
        let has_endpoints = !s.endpoints.is_empty();
        let write_chains =
            changed.is_none_or(|c| c.contains(&(s.namespace.clone(), s.name.clone())));
        if !has_endpoints {
            // kube-proxy REJECTs in the filter table; the generators here only produce Services
            // with endpoints, and the filter table was written above.
            continue;
        }
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES {} -m {p} -p {p} -d {} --dport {} -j {svc}",
            comment(&format!("{spn} cluster IP")),
            s.cluster_ip,
            s.port
        );
        if let Some(np) = s.node_port {
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS {} -m {p} -p {p} --dport {np} -j {}",
                comment(&spn),
                ipt_ext_chain(s)
            );
        }
        if !write_chains {
            continue;
        }
        // Cluster IP: masquerade what comes from outside the pod network.
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {svc} {} -m {p} -p {p} -d {} --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
            comment(&format!("{spn} cluster IP")),
            s.cluster_ip,
            s.port
        );
        if s.node_port.is_some() {
            let ext = ipt_ext_chain(s);
            let _ = writeln!(chains, ":{ext} - [0:0]");
            let _ = writeln!(
                rules,
                "-A {ext} {} -j KUBE-MARK-MASQ",
                comment(&format!(
                    "masquerade traffic for {spn} external destinations"
                ))
            );
            let _ = writeln!(rules, "-A {ext} -j {svc}");
        }
        let n = s.endpoints.len();
        for (i, (ep, _)) in s.endpoints.iter().enumerate() {
            let mut line = format!("-A {svc}");
            if !large {
                let _ = write!(
                    line,
                    " {}",
                    comment(&format!("{spn} -> {}", endpoint_string(s, *ep)))
                );
            }
            if i + 1 < n {
                let _ = write!(
                    line,
                    " -m statistic --mode random --probability {}",
                    probability(n - i)
                );
            }
            let _ = writeln!(rules, "{line} -j {}", ipt_sep_chain(s, *ep));
        }
        for (ep, _) in &s.endpoints {
            let sep = ipt_sep_chain(s, *ep);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let c = if large {
                String::new()
            } else {
                format!(" {}", comment(&spn))
            };
            let _ = writeln!(rules, "-A {sep}{c} -s {ep}/32 -j KUBE-MARK-MASQ");
            let _ = writeln!(
                rules,
                "-A {sep}{c} -m {p} -p {p} -j DNAT --to-destination {}",
                endpoint_string(s, *ep)
            );
        }
    }
    for c in stale {
        let _ = writeln!(chains, ":{c} - [0:0]");
        let _ = writeln!(rules, "-X {c}");
    }
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES {} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
    );
    out.push_str("*nat\n");
    out.push_str(&chains);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::gen;

    #[test]
    fn iptables_rules_have_the_kube_proxy_shape() {
        let mut svcs = gen::filler(3, 3, "node2");
        svcs[0].node_port = Some(30080);
        let text = iptables_full_restore(&svcs);
        let svc = ipt_svc_chain(&svcs[0]);
        assert!(text.contains(&format!(":{svc} - [0:0]")));
        assert!(text.contains("-m statistic --mode random --probability 0.3333333333"));
        assert!(text.contains("-m statistic --mode random --probability 0.5000000000"));
        assert!(text.contains(&format!("-A KUBE-NODEPORTS -m comment --comment bench/fill-0:p -m tcp -p tcp --dport 30080 -j {}", ipt_ext_chain(&svcs[0]))));
        assert!(text.contains("-j DNAT --to-destination 10.250.0.1:8080"));
        let last_nat = text.lines().rev().nth(1).unwrap();
        assert!(
            last_nat.contains("--dst-type LOCAL -j KUBE-NODEPORTS"),
            "{last_nat}"
        );
        assert_eq!(text.matches("COMMIT").count(), 2);
    }
}
