//! kube-proxy's nftables mode: the `nft -f` input of its first (full) sync and of a partial
//! sync, with kube-proxy's chain names.
use std::{collections::BTreeSet, fmt::Write as _, net::Ipv4Addr};

use super::{
    changed_services, endpoint_string, hash_base32, proto, CLUSTER_CIDR, MASQUERADE_MARK,
    PORT_NAME, SERVICE_CIDR,
};
use crate::bench::gen::BenchService;

const NFT_TABLE: &str = "ip kube-proxy";

/// kube-proxy's `hashAndTruncate`: 8 hash characters, `-`, the readable name.
pub(super) fn nft_hashed(name: String) -> String {
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
/// [`restore_bench`](super::restore_bench) times that separately.
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

/// A partial sync: the changed Services (namespace, name) and the previous Services.
type Partial<'a> = (&'a BTreeSet<(String, String)>, &'a [BenchService]);

/// Per-Service part of a sync. `partial`: the changed Services and the previous Services (whose
/// map elements already exist).
fn nft_services(out: &mut String, services: &[BenchService], partial: Option<Partial<'_>>) {
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
