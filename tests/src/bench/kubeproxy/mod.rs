//! The rules kube-proxy would write for the same Services, in its iptables and its nftables mode,
//! and how long the kernel tools take to load them.
//!
//! The generators follow kube-proxy's proxiers (`pkg/proxy/iptables/proxier.go` and
//! `pkg/proxy/nftables/proxier.go`, Kubernetes 1.31+) for the settings a typical cluster runs:
//! `--cluster-cidr` local-traffic detection ([`CLUSTER_CIDR`]), the default masquerade bit 14
//! ([`MASQUERADE_MARK`]), NodePorts on every local address (`--nodeport-addresses` unset),
//! `nf_conntrack_tcp_be_liberal` unset, no session affinity, every endpoint ready. Every
//! [`BenchService`] is one Service port named `p` (as [`gen::to_manifests`] writes it), so its
//! kube-proxy name is `namespace/name:p`. Chain names use kube-proxy's own hash (SHA-256, base32,
//! truncated), so they are the names a real kube-proxy would pick for these Service ports.
//!
//! What each mode does with a Service port (Cluster traffic policies):
//! - iptables: `nat` `KUBE-SERVICES` has one rule per ClusterIP matching address, protocol and
//!   port; its last rule sends `-m addrtype --dst-type LOCAL` to `KUBE-NODEPORTS`, which matches
//!   the NodePort and jumps to `KUBE-EXT-<hash>` (mark for masquerade, then `KUBE-SVC-<hash>`).
//!   `KUBE-SVC-<hash>` marks off-cluster sources for masquerade, then picks an endpoint with
//!   `-m statistic --mode random --probability 1/(n-i)`; `KUBE-SEP-<hash>` marks hairpin traffic
//!   and DNATs. `KUBE-POSTROUTING` masquerades marked packets (`--random-fully`). Filter table:
//!   `KUBE-FORWARD` (drop INVALID, accept marked and established) and the chains kube-proxy
//!   always declares. With more than 1,000 endpoints ("large cluster mode") the endpoint rules
//!   carry no comments, as in kube-proxy.
//! - nftables: one table `ip kube-proxy`; `services` looks up `ip daddr . meta l4proto . th
//!   dport` in the `service-ips` verdict map and, for `fib daddr type local`, `meta l4proto . th
//!   dport` in `service-nodeports`; `service-<hash>-ns/name/tcp/p` chains pick an endpoint with
//!   `numgen random mod N vmap { ... }`; `endpoint-...` chains DNAT; `masquerading` masquerades
//!   by mark. The text is what knftables feeds `nft -f -`: one command per line.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::gen::{self, BenchService};
use crate::netns;

/// The pod network, kube-proxy's `--cluster-cidr` (local-traffic detector): traffic to a
/// ClusterIP from outside it is masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The Service network (nftables mode drops traffic to unallocated ClusterIPs in it).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// kube-proxy's default masquerade mark (`--masquerade-bit 14`).
pub const MASQUERADE_MARK: &str = "0x4000";
/// Above this many endpoints kube-proxy's iptables mode drops the per-endpoint comments
/// (`largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// The port name every generated Service port has (see [`gen::to_manifests`]).
const PORT_NAME: &str = "p";

// ---------------------------------------------------------------------------------------------
// Names

/// kube-proxy's name of a Service port: `namespace/name:port`.
pub fn service_port_name(s: &BenchService) -> String {
    format!("{}/{}:{PORT_NAME}", s.namespace, s.name)
}

fn proto(s: &BenchService) -> String {
    s.protocol.to_ascii_lowercase()
}

/// `IP:PORT` of an endpoint, as kube-proxy prints it.
fn endpoint_string(s: &BenchService, ep: Ipv4Addr) -> String {
    format!("{ep}:{}", s.target_port)
}

/// base32 (RFC 4648) of SHA-256(`input`), the first `n` characters.
fn hash_base32(input: &str, n: usize) -> String {
    let mut s = base32(&sha256(input.as_bytes()));
    s.truncate(n);
    s
}

/// iptables chain of a Service port: `PREFIX` + 16 characters of its hash, as kube-proxy's
/// `portProtoHash`.
fn ipt_chain(prefix: &str, s: &BenchService) -> String {
    format!(
        "{prefix}{}",
        hash_base32(&format!("{}{}", service_port_name(s), proto(s)), 16)
    )
}

fn ipt_svc_chain(s: &BenchService) -> String {
    ipt_chain("KUBE-SVC-", s)
}

fn ipt_ext_chain(s: &BenchService) -> String {
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

/// kube-proxy's `hashAndTruncate`: 8 hash characters, `-`, the readable name.
fn nft_hashed(name: String) -> String {
    format!("{}-{name}", hash_base32(&name, 8))
}

fn nft_base(s: &BenchService) -> String {
    nft_hashed(format!(
        "{}/{}/{}/{PORT_NAME}",
        s.namespace,
        s.name,
        proto(s)
    ))
}

fn nft_svc_chain(s: &BenchService) -> String {
    format!("service-{}", nft_base(s))
}

fn nft_ext_chain(s: &BenchService) -> String {
    format!("external-{}", nft_base(s))
}

fn nft_ep_chain(s: &BenchService, ep: Ipv4Addr) -> String {
    let name = format!(
        "{}/{}/{}/{PORT_NAME}__{ep}/{}",
        s.namespace,
        s.name,
        proto(s),
        s.target_port
    );
    format!("endpoint-{}", nft_hashed(name))
}

// ---------------------------------------------------------------------------------------------
// iptables

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

/// `namespace/name` of the Services whose ports or endpoints differ between `before` and
/// `after` (added, removed or changed), as kube-proxy's change trackers report them.
fn changed_services(before: &[BenchService], after: &[BenchService]) -> BTreeSet<(String, String)> {
    let index = |list: &[BenchService]| -> BTreeMap<(String, String), Vec<BenchService>> {
        let mut m: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for s in list {
            m.entry((s.namespace.clone(), s.name.clone()))
                .or_default()
                .push(s.clone());
        }
        m
    };
    let (b, a) = (index(before), index(after));
    b.keys()
        .chain(a.keys())
        .filter(|k| b.get(*k) != a.get(*k))
        .cloned()
        .collect()
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

// ---------------------------------------------------------------------------------------------
// nftables

const NFT_TABLE: &str = "ip kube-proxy";

/// The `nft -f` input of kube-proxy's nftables mode on its first (full) sync: the table, its
/// base chains (hooked at dstnat-10 / dstnat+10 for filtering, dstnat and srcnat for NAT), the
/// top-level chains, sets and verdict maps, then every Service port's chains, rules and map
/// elements.
pub fn nft_full_transaction(services: &[BenchService]) -> String {
    let mut out = String::with_capacity(services.len() * 2500 + 8192);
    nft_setup(&mut out);
    nft_services(&mut out, services, None);
    out
}

/// The `nft -f` input of kube-proxy's nftables mode for a partial sync after the Services
/// changed from `before` to `after`: no table setup; for each changed Service its chains are
/// re-created and flushed (`add chain` + `flush chain`) and their rules written again; map
/// elements are written only when new or different; chains no longer used are flushed (kube-proxy
/// deletes them in a later sync, once no map element can point at them any more). kube-proxy
/// also lists the table's chains (`nft list chains`) on every sync to find those stale chains;
/// [`restore_bench`] times that separately.
pub fn nft_partial_transaction(before: &[BenchService], after: &[BenchService]) -> String {
    let changed = changed_services(before, after);
    let mut out = String::new();
    nft_services(&mut out, after, Some((&changed, before)));
    let used: BTreeSet<String> = nft_service_chains(after).into_iter().collect();
    let mut stale: Vec<String> = nft_service_chains(before)
        .into_iter()
        .filter(|c| !used.contains(c))
        .collect();
    stale.sort();
    stale.dedup();
    for c in stale {
        let _ = writeln!(out, "flush chain {NFT_TABLE} {c}");
    }
    out
}

fn nft_service_chains(services: &[BenchService]) -> Vec<String> {
    let mut out = Vec::new();
    for s in services.iter().filter(|s| !s.endpoints.is_empty()) {
        out.push(nft_svc_chain(s));
        if s.node_port.is_some() {
            out.push(nft_ext_chain(s));
        }
        out.extend(s.endpoints.iter().map(|(ep, _)| nft_ep_chain(s, *ep)));
    }
    out
}

fn nft_setup(out: &mut String) {
    let t = NFT_TABLE;
    let _ = writeln!(
        out,
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}"
    );
    // dstnat = -100, srcnat = 100.
    let base = [
        ("filter-prerouting", "filter", "prerouting", -110),
        ("filter-input", "filter", "input", -110),
        ("filter-forward", "filter", "forward", -110),
        ("filter-output", "filter", "output", -110),
        ("filter-output-post-dnat", "filter", "output", -90),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ];
    // First sync: add + delete every base chain, so that one left by an older kube-proxy with
    // other properties is re-created.
    for (name, ..) in base {
        let _ = writeln!(out, "add chain {t} {name}");
        let _ = writeln!(out, "delete chain {t} {name}");
    }
    for (name, ty, hook, prio) in base {
        let _ = writeln!(
            out,
            "add chain {t} {name} {{ type {ty} hook {hook} priority {prio} ; }}"
        );
        let _ = writeln!(out, "flush chain {t} {name}");
    }
    let mut created = BTreeSet::new();
    let mut ensure = |out: &mut String, chain: &str| {
        if created.insert(chain.to_string()) {
            let _ = writeln!(out, "add chain {t} {chain}");
            let _ = writeln!(out, "flush chain {t} {chain}");
        }
    };
    for (dst, src, extra) in [
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        (
            "cluster-ips-check",
            "filter-output-post-dnat",
            "ct state new ",
        ),
    ] {
        ensure(out, dst);
        let _ = writeln!(out, "add rule {t} {src} {extra}jump {dst}");
    }
    for c in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        ensure(out, c);
    }
    let m = MASQUERADE_MARK;
    let _ = writeln!(out, "add rule {t} mark-for-masquerade mark set mark or {m}");
    let _ = writeln!(out, "add rule {t} masquerading mark and {m} == 0 return");
    let _ = writeln!(out, "add rule {t} masquerading mark set mark xor {m}");
    let _ = writeln!(out, "add rule {t} masquerading masquerade fully-random");
    let _ = writeln!(
        out,
        "add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    let _ = writeln!(
        out,
        "add rule {t} cluster-ips-check ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
    );
    // NodePorts on every local address: the nodeport-ips set is not used (add + delete).
    let _ = writeln!(out, "add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}");
    let _ = writeln!(out, "delete set {t} nodeport-ips");
    let _ = writeln!(
        out,
        "add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(out, "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}");
    let _ = writeln!(out, "flush chain {t} reject-chain");
    let _ = writeln!(out, "add rule {t} reject-chain reject");
    let _ = writeln!(out, "add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services");
    let _ = writeln!(
        out,
        "add rule {t} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"
    );
    let _ = writeln!(
        out,
        "add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    ensure(out, "firewall-check");
    let _ = writeln!(
        out,
        "add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(
        out,
        "add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(
        out,
        "add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
    );
    let _ = writeln!(out, "flush set {t} cluster-ips");
    for m in [
        "service-ips",
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-nodeports",
    ] {
        let _ = writeln!(out, "flush map {t} {m}");
    }
}

/// Per-Service part of a sync. `partial`: the changed Services and the previous Services (whose
/// map elements already exist).
fn nft_services(
    out: &mut String,
    services: &[BenchService],
    partial: Option<(&BTreeSet<(String, String)>, &[BenchService])>,
) {
    let t = NFT_TABLE;
    // Elements already programmed (partial syncs only write new or changed elements).
    let existing: BTreeSet<String> = match partial {
        Some((_, before)) => {
            let mut e = BTreeSet::new();
            for s in before.iter().filter(|s| !s.endpoints.is_empty()) {
                e.extend(nft_elements(s));
            }
            e
        }
        None => BTreeSet::new(),
    };
    let mut chains = String::new();
    let mut rules = String::new();
    let mut elements = String::new();
    for s in services.iter().filter(|s| !s.endpoints.is_empty()) {
        let skip =
            partial.is_some_and(|(c, _)| !c.contains(&(s.namespace.clone(), s.name.clone())));
        let p = proto(s);
        let svc = nft_svc_chain(s);
        if !skip {
            let mut ensure = |c: &str| {
                let _ = writeln!(chains, "add chain {t} {c}");
                let _ = writeln!(chains, "flush chain {t} {c}");
            };
            for (ep, _) in &s.endpoints {
                ensure(&nft_ep_chain(s, *ep));
            }
            ensure(&svc);
            if s.node_port.is_some() {
                ensure(&nft_ext_chain(s));
            }
        }
        for e in nft_elements(s) {
            if !existing.contains(&e) {
                elements.push_str(&e);
                elements.push('\n');
            }
        }
        if skip {
            continue;
        }
        let _ = writeln!(
            rules,
            "add rule {t} {svc} ip daddr {} {p} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            s.cluster_ip, s.port
        );
        if s.node_port.is_some() {
            let ext = nft_ext_chain(s);
            let _ = writeln!(rules, "add rule {t} {ext} jump mark-for-masquerade");
            let _ = writeln!(rules, "add rule {t} {ext} goto {svc}");
        }
        let vmap: Vec<String> = s
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, (ep, _))| format!("{i} : goto {}", nft_ep_chain(s, *ep)))
            .collect();
        let _ = writeln!(
            rules,
            "add rule {t} {svc} numgen random mod {} vmap {{ {} }}",
            s.endpoints.len(),
            vmap.join(" , ")
        );
        for (ep, _) in &s.endpoints {
            let chain = nft_ep_chain(s, *ep);
            let _ = writeln!(
                rules,
                "add rule {t} {chain} ip saddr {ep} jump mark-for-masquerade"
            );
            let _ = writeln!(
                rules,
                "add rule {t} {chain} meta l4proto {p} dnat to {}",
                endpoint_string(s, *ep)
            );
        }
    }
    // kube-proxy adds everything to one transaction as it goes; chains must exist before rules
    // and elements point at them, which this order guarantees as well.
    out.push_str(&chains);
    out.push_str(&elements);
    out.push_str(&rules);
}

/// The map and set elements of one Service port, one `add element` command each.
fn nft_elements(s: &BenchService) -> Vec<String> {
    let t = NFT_TABLE;
    let p = proto(s);
    let mut v = vec![
        format!("add element {t} cluster-ips {{ {} }}", s.cluster_ip),
        format!(
            "add element {t} service-ips {{ {} . {p} . {} : goto {} }}",
            s.cluster_ip,
            s.port,
            nft_svc_chain(s)
        ),
    ];
    if let Some(np) = s.node_port {
        v.push(format!(
            "add element {t} service-nodeports {{ {p} . {np} : goto {} }}",
            nft_ext_chain(s)
        ));
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Loading rules

/// What one load of rules cost.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Applied {
    /// Wall clock from starting the tool until it exited successfully.
    pub ms: f64,
    /// Lines and bytes of input given to the tool.
    pub lines: usize,
    pub bytes: usize,
}

/// Runs `iptables-restore --noflush` (what kube-proxy runs, without `--counters`) inside network
/// namespace `ns` with `input` on stdin. On failure the error holds the tool's stderr and the
/// input line it names.
pub fn iptables_restore_in(ns: &str, input: &str) -> Result<Applied> {
    run_with_input(ns, "iptables-restore", &["--noflush"], input)
}

/// Runs plain `iptables-restore` (no `--noflush`: the tables it names are replaced) inside
/// network namespace `ns` with `input` on stdin. In a namespace that holds no other rules the
/// result is what `--noflush` gives, without the cost that grows with rules x chains in the
/// nf_tables backend (see [`IPTABLES_NOFLUSH_LIMIT`]); the lab uses it to load large rulesets.
pub fn iptables_replace_in(ns: &str, input: &str) -> Result<Applied> {
    run_with_input(ns, "iptables-restore", &[], input)
}

/// Runs `nft -f -` inside network namespace `ns` with `input` on stdin (as knftables does). On
/// failure the error holds nft's stderr and the input line it names.
pub fn nft_apply_in(ns: &str, input: &str) -> Result<Applied> {
    run_with_input(ns, "nft", &["-f", "-"], input)
}

/// Removes kube-proxy's iptables rules from namespace `ns`: flushes and deletes every chain of
/// the nat and filter tables (the namespace holds nothing else).
pub fn iptables_flush_in(ns: &str) -> Result<()> {
    for table in ["nat", "filter"] {
        netns::exec_in(ns, "iptables", &["-w", "-t", table, "-F"])?;
        netns::exec_in(ns, "iptables", &["-w", "-t", table, "-X"])?;
    }
    Ok(())
}

/// Deletes the `ip kube-proxy` table in namespace `ns`.
pub fn nft_flush_in(ns: &str) -> Result<()> {
    netns::exec_in(ns, "nft", &["delete", "table", "ip", "kube-proxy"])?;
    Ok(())
}

fn run_with_input(ns: &str, program: &str, args: &[&str], input: &str) -> Result<Applied> {
    match run_limited(ns, program, args, input, None)? {
        Run::Done(a) => Ok(a),
        Run::TimedOut { .. } => unreachable!("no limit was given"),
    }
}

/// How a limited tool run ended.
enum Run {
    Done(Applied),
    /// Stopped (SIGKILL) at the limit, having read `read_bytes` (of its input and anything else).
    TimedOut {
        read_bytes: u64,
    },
}

/// Runs `program args` in `ns` with `input` on stdin, killed after `limit` when given.
fn run_limited(
    ns: &str,
    program: &str,
    args: &[&str],
    input: &str,
    limit: Option<Duration>,
) -> Result<Run> {
    let mut cmd = netns::command_in(ns, None, program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let desc = format!("{} in netns {ns}", netns::describe(&cmd));
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{desc}` (run `cargo xtask setup`)"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let data = input.as_bytes().to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
    );
    let deadline = limit.map(|l| started + l);
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for `{desc}`"))?
        {
            break status;
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            let read_bytes = std::fs::read_to_string(format!("/proc/{}/io", child.id()))
                .ok()
                .and_then(|io| {
                    io.lines()
                        .find_map(|l| l.strip_prefix("rchar: ")?.trim().parse().ok())
                })
                .unwrap_or(0);
            let _ = child.kill();
            let _ = child.wait();
            let _ = writer.join();
            return Ok(Run::TimedOut { read_bytes });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    let write_result = writer
        .join()
        .map_err(|_| anyhow::anyhow!("stdin writer panicked"))?;
    let _ = stdout.join();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr);
        let offending = offending_line(&stderr, input)
            .map(|(n, l)| format!("\ninput line {n}: {l}"))
            .unwrap_or_default();
        bail!(
            "`{desc}` failed ({status}): {}{offending}\n({} input lines)",
            stderr.trim(),
            input.lines().count()
        );
    }
    write_result.with_context(|| format!("writing the input of `{desc}`"))?;
    Ok(Run::Done(Applied {
        ms: ms(elapsed),
        lines: input.lines().count(),
        bytes: input.len(),
    }))
}

/// The input line an error message points at: `line N` / `line: N` (iptables-restore) or
/// `FILE:N:` (nft). iptables-restore reports errors found while committing a table at its
/// `COMMIT` line; then the first rule naming a token the message quotes (`Chain 'X' does not
/// exist`, ``Couldn't load target `X'``) is the offending line.
fn offending_line<'a>(stderr: &str, input: &'a str) -> Option<(usize, &'a str)> {
    let number = |s: &str| -> Option<usize> {
        let digits: String = s
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    };
    let mut found = None;
    for marker in ["line: ", "line "] {
        if let Some(i) = stderr.find(marker) {
            found = number(&stderr[i + marker.len()..]);
            if found.is_some() {
                break;
            }
        }
    }
    if found.is_none() {
        // nft: "/dev/stdin:12:5-9: Error: ..."
        found = stderr.lines().find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let n = number(rest)?;
            rest[n.to_string().len()..].starts_with(':').then_some(n)
        });
    }
    let lines: Vec<&str> = input.lines().collect();
    let named = found.and_then(|n| Some((n, *lines.get(n.checked_sub(1)?)?)));
    if named.is_some_and(|(_, l)| l.trim() != "COMMIT") {
        return named;
    }
    // Quoted tokens: 'X' or `X'.
    let mut tokens = Vec::new();
    for open in ['\'', '`'] {
        let mut rest = stderr;
        while let Some(i) = rest.find(open) {
            let after = &rest[i + 1..];
            let Some(j) = after.find('\'') else { break };
            if j > 0 {
                tokens.push(&after[..j]);
            }
            rest = &after[j + 1..];
        }
    }
    let by_token = lines.iter().enumerate().find(|(_, l)| {
        !l.starts_with(':') && tokens.iter().any(|t| l.split_whitespace().any(|w| w == *t))
    });
    by_token.map(|(i, l)| (i + 1, *l)).or(named)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Control-plane benchmark

/// Time to load kube-proxy's rules for `services` Services of `endpoints_per_service` endpoints,
/// from scratch and for one endpoint change. All times are wall clock of the tool's run
/// (process start to exit), as kube-proxy experiences them.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreBench {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// `iptables -V`, e.g. `iptables v1.8.9 (nf_tables)`.
    pub iptables_version: String,
    /// The backend `iptables -V` names: `nf_tables` or `legacy`.
    pub iptables_backend: String,
    /// Plain `iptables-restore` (tables replaced) of the full ruleset into an empty namespace:
    /// the same ruleset kube-proxy's first sync writes, loaded the fastest way the tool offers.
    pub iptables_full_ms: f64,
    /// `iptables-restore --noflush` (kube-proxy's own call) of the same input into another empty
    /// namespace; `None` when it did not finish within `iptables_full_noflush_limit_ms` and was
    /// killed (see [`IPTABLES_NOFLUSH_LIMIT`]).
    pub iptables_full_noflush_ms: Option<f64>,
    pub iptables_full_noflush_limit_ms: f64,
    /// When killed at the limit: the bytes it had read by then (its input is
    /// `iptables_full_bytes`; a few KB are other files), to tell how far it got.
    pub iptables_full_noflush_read_bytes_at_limit: Option<u64>,
    pub iptables_full_lines: usize,
    pub iptables_full_bytes: usize,
    /// `iptables-restore --noflush` of the partial sync after one endpoint changed (see
    /// [`iptables_partial_restore`]), applied to the ruleset of `iptables_full_ms`.
    pub iptables_partial_ms: f64,
    pub iptables_partial_lines: usize,
    pub iptables_partial_bytes: usize,
    /// `nft -v`.
    pub nft_version: String,
    /// `nft -f -` of the full transaction into an empty namespace.
    pub nft_full_ms: f64,
    pub nft_full_lines: usize,
    pub nft_full_bytes: usize,
    /// `nft -f -` of the partial transaction after one endpoint changed (see
    /// [`nft_partial_transaction`]).
    pub nft_partial_ms: f64,
    pub nft_partial_lines: usize,
    pub nft_partial_bytes: usize,
    /// `nft --json list chains ip` after the full load: the listing kube-proxy's nftables mode
    /// runs on every sync to find stale chains, in addition to `nft_partial_ms`.
    pub nft_list_chains_ms: f64,
    /// What changed: `namespace/name`, removed endpoint, added endpoint.
    pub change: String,
}

/// How long [`restore_bench`] lets `iptables-restore --noflush` run on the full ruleset. With
/// the nf_tables backend of iptables 1.8.9 its cost grows with (rules x chains): every command
/// inserts its chain and jump target into a sorted linked list of chain names (a `strcmp` walk,
/// most of the CPU time), so 2,000 Services of 10 endpoints take ~40 s and 10,000 take hours.
pub const IPTABLES_NOFLUSH_LIMIT: Duration = Duration::from_secs(180);

/// The Services of [`restore_bench`]: `services` fillers ([`gen::filler`], ClusterIP, TCP) with
/// `endpoints` endpoints each, and the same after one endpoint change: the middle Service's
/// first endpoint is replaced by a new address (a pod replaced by another).
pub fn restore_bench_services(
    services: usize,
    endpoints: usize,
) -> (Vec<BenchService>, Vec<BenchService>, String) {
    let before = gen::filler(services, endpoints, "node2");
    let mut after = before.clone();
    let mut change = String::from("nothing (no Service with endpoints)");
    if let Some(s) = after.get_mut(services / 2) {
        if let Some(first) = s.endpoints.first_mut() {
            let old = first.0;
            let new = Ipv4Addr::new(
                10,
                251,
                (services / 2 / 256) as u8,
                (services / 2 % 256) as u8,
            );
            first.0 = new;
            change = format!(
                "{}/{}: endpoint {old} replaced by {new}",
                s.namespace, s.name
            );
        }
    }
    (before, after, change)
}

/// Times kube-proxy's rule loads for `services` ClusterIP Services of `endpoints` endpoints each
/// (see [`restore_bench_services`]), each in fresh network namespaces deleted afterwards; see
/// [`restore_bench_with_limit`]. `iptables-restore --noflush` of the full ruleset is stopped
/// after [`IPTABLES_NOFLUSH_LIMIT`].
pub fn restore_bench(services: usize, endpoints: usize) -> Result<RestoreBench> {
    restore_bench_with_limit(services, endpoints, IPTABLES_NOFLUSH_LIMIT)
}

/// [`restore_bench`] with another limit for the full `iptables-restore --noflush`:
/// - iptables: plain `iptables-restore` of [`iptables_full_restore`] into an empty namespace, and
///   `iptables-restore --noflush` (kube-proxy's first sync exactly; killed after `noflush_limit`)
///   of the same input into another; on the former `iptables-restore --noflush` of
///   [`iptables_partial_restore`] for one endpoint change. This mimics kube-proxy's iptables
///   mode since 1.28 (`MinimizeIPTablesRestore` on by default): the partial sync rewrites the
///   top-level chains in full (KUBE-SERVICES has one rule per Service port, so this input still
///   grows with the cluster) and only the chains of the Service that changed.
/// - nftables: `nft -f -` of [`nft_full_transaction`], then of [`nft_partial_transaction`] (the
///   changed Service's chains re-created and flushed and refilled, the stale endpoint chain
///   flushed; unchanged map elements not written), plus the `nft list chains` kube-proxy runs on
///   each sync, timed on its own.
pub fn restore_bench_with_limit(
    services: usize,
    endpoints: usize,
    noflush_limit: Duration,
) -> Result<RestoreBench> {
    let (before, after, change) = restore_bench_services(services, endpoints);
    let iptables_version = tool_version("iptables", &["-V"])?;
    let iptables_backend = iptables_version
        .rsplit_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(b, _)| b.to_string())
        .unwrap_or_else(|| "legacy".into());
    let nft_version = tool_version("nft", &["-v"])?;

    let full_input = iptables_full_restore(&before);
    let (ipt_flush, ipt_partial) = {
        let ns = PrivateNetns::new("ipt")?;
        let full = iptables_replace_in(&ns.name, &full_input).context("iptables full restore")?;
        let partial = iptables_restore_in(&ns.name, &iptables_partial_restore(&before, &after))
            .context("iptables partial restore")?;
        (full, partial)
    };
    let ipt_noflush = {
        let ns = PrivateNetns::new("iptnf")?;
        run_limited(
            &ns.name,
            "iptables-restore",
            &["--noflush"],
            &full_input,
            Some(noflush_limit),
        )
        .context("iptables full restore --noflush")?
    };
    let (nft_full, nft_partial, list_ms) = {
        let ns = PrivateNetns::new("nft")?;
        let full = nft_apply_in(&ns.name, &nft_full_transaction(&before))
            .context("nft full transaction")?;
        let started = Instant::now();
        netns::exec_in(&ns.name, "nft", &["--json", "list", "chains", "ip"])
            .context("nft list chains")?;
        let list_ms = ms(started.elapsed());
        let partial = nft_apply_in(&ns.name, &nft_partial_transaction(&before, &after))
            .context("nft partial transaction")?;
        (full, partial, list_ms)
    };
    let (iptables_full_noflush_ms, iptables_full_noflush_read_bytes_at_limit) = match ipt_noflush {
        Run::Done(a) => (Some(a.ms), None),
        Run::TimedOut { read_bytes } => (None, Some(read_bytes)),
    };
    Ok(RestoreBench {
        services,
        endpoints_per_service: endpoints,
        iptables_version,
        iptables_backend,
        iptables_full_ms: ipt_flush.ms,
        iptables_full_noflush_ms,
        iptables_full_noflush_limit_ms: ms(noflush_limit),
        iptables_full_noflush_read_bytes_at_limit,
        iptables_full_lines: ipt_flush.lines,
        iptables_full_bytes: ipt_flush.bytes,
        iptables_partial_ms: ipt_partial.ms,
        iptables_partial_lines: ipt_partial.lines,
        iptables_partial_bytes: ipt_partial.bytes,
        nft_version,
        nft_full_ms: nft_full.ms,
        nft_full_lines: nft_full.lines,
        nft_full_bytes: nft_full.bytes,
        nft_partial_ms: nft_partial.ms,
        nft_partial_lines: nft_partial.lines,
        nft_partial_bytes: nft_partial.bytes,
        nft_list_chains_ms: list_ms,
        change,
    })
}

/// The first line of `program args` (`iptables -V`, `nft -v`); fails naming `cargo xtask setup`.
pub fn tool_version(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{program}`: install it with `cargo xtask setup`"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// A network namespace of our own (`lbkp<pid>x<n>-<what>`), deleted on drop.
struct PrivateNetns {
    name: String,
}

static NETNS_COUNTER: AtomicU32 = AtomicU32::new(0);

impl PrivateNetns {
    fn new(what: &str) -> Result<Self> {
        let name = format!(
            "lbkp{}x{}-{what}",
            std::process::id(),
            NETNS_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        netns::run("ip", &["netns", "add", &name])?;
        let ns = PrivateNetns { name };
        netns::ip(&ns.name, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for PrivateNetns {
    fn drop(&mut self) {
        if let Err(e) = netns::run("ip", &["netns", "del", &self.name]) {
            eprintln!("restore bench: removing netns {}: {e:#}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SHA-256 and base32, for kube-proxy's chain names (no dependency for two small functions).

fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, v) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// RFC 4648 base32 with padding (Go's `base32.StdEncoding`).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let v = u64::from_be_bytes([0, 0, 0, buf[0], buf[1], buf[2], buf[3], buf[4]]);
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < chars {
                out.push(ALPHABET[((v >> (35 - i * 5)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn sha256_and_base32_match_the_standards() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI======");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
    }

    #[test]
    fn chain_names_are_kube_proxys() {
        // kube-proxy's iptables tests: "ns1/svc1:p80" + "tcp" hashes to KUBE-SVC-XPGD46QRK7WJZT7O.
        let s = BenchService {
            namespace: "ns1".into(),
            name: "svc1".into(),
            cluster_ip: Ipv4Addr::new(172, 30, 0, 41),
            port: 80,
            protocol: "TCP",
            node_port: None,
            target_port: 80,
            endpoints: vec![],
        };
        let h = hash_base32("ns1/svc1:p80tcp", 16);
        assert_eq!(h, "XPGD46QRK7WJZT7O");
        assert_eq!(
            hash_base32("ns1/svc1:p80tcp10.180.0.1:80", 16),
            "SXIVWICOYRO3J4NJ"
        );
        // ...and its nftables tests: service-ULMVA6XW-ns1/svc1/tcp/p80,
        // endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80.
        assert_eq!(
            nft_hashed("ns1/svc1/tcp/p80".into()),
            "ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nft_hashed("ns1/svc1/tcp/p80__10.180.0.1/80".into()),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        assert!(ipt_svc_chain(&s).starts_with("KUBE-SVC-"));
        assert_eq!(ipt_svc_chain(&s).len(), "KUBE-SVC-".len() + 16);
    }

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

    #[test]
    fn partial_syncs_only_touch_the_changed_service() {
        let (before, after, change) = restore_bench_services(300, 3);
        assert!(change.contains("bench/fill-150"), "{change}");
        let ipt = iptables_partial_restore(&before, &after);
        // Every Service keeps its KUBE-SERVICES rule...
        assert_eq!(
            ipt.lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES") && l.contains("cluster IP"))
                .count(),
            300
        );
        // ...but only fill-150 gets its chains rewritten.
        assert_eq!(
            ipt.lines().filter(|l| l.starts_with(":KUBE-SVC-")).count(),
            1
        );
        assert_eq!(
            ipt.lines().filter(|l| l.starts_with(":KUBE-SEP-")).count(),
            4,
            "3 used + 1 stale (small cluster: deleted)\n{ipt}"
        );
        assert!(ipt.contains("-X KUBE-SEP-"));
        assert!(!ipt.contains("-A PREROUTING"));
        let nft = nft_partial_transaction(&before, &after);
        assert_eq!(
            nft.lines().filter(|l| l.starts_with("add chain")).count(),
            4,
            "{nft}"
        );
        assert_eq!(
            nft.lines().filter(|l| l.starts_with("flush chain")).count(),
            5,
            "{nft}"
        );
        assert!(!nft.contains("add element"), "{nft}");
    }

    #[test]
    fn offending_lines_are_found() {
        let input = "a\nb\nc\n";
        assert_eq!(
            offending_line("iptables-restore v1.8.9 (nf_tables): line 2 failed", input),
            Some((2, "b"))
        );
        assert_eq!(
            offending_line("/dev/stdin:3:1-3: Error: syntax error", input),
            Some((3, "c"))
        );
        assert_eq!(offending_line("nothing", input), None);
        let rules = "*nat\n:KUBE-X - [0:0]\n-A KUBE-X -j NOPE\nCOMMIT\n";
        let nf = "iptables-restore v1.8.9 (nf_tables): Chain 'NOPE' does not exist\nError occurred at line: 4\n";
        assert_eq!(offending_line(nf, rules), Some((3, "-A KUBE-X -j NOPE")));
        let legacy = "iptables-restore v1.8.9 (legacy): Couldn't load target `NOPE':No such file or directory\n\nError occurred at line: 3";
        assert_eq!(
            offending_line(legacy, rules),
            Some((3, "-A KUBE-X -j NOPE"))
        );
        assert_eq!(
            offending_line("Error occurred at line: 2", rules),
            Some((2, ":KUBE-X - [0:0]"))
        );
    }
}
