//! The rules kube-proxy would write for the same Services, in its iptables and its nftables mode,
//! and how long the kernel tools take to load them.
//!
//! The generators follow kube-proxy's proxiers (`pkg/proxy/iptables/proxier.go` and
//! `pkg/proxy/nftables/proxier.go`, Kubernetes 1.31+) for the settings a typical cluster runs:
//! `--cluster-cidr` local-traffic detection ([`CLUSTER_CIDR`]), the default masquerade bit 14
//! ([`MASQUERADE_MARK`]), NodePorts on every local address (`--nodeport-addresses` unset),
//! `nf_conntrack_tcp_be_liberal` unset, no session affinity, every endpoint ready. Every
//! [`BenchService`] is one Service port named `p` (as
//! [`gen::to_manifests`](super::gen::to_manifests) writes it), so its kube-proxy name is
//! `namespace/name:p`. Chain names use kube-proxy's own hash (SHA-256, base32, truncated), so they
//! are the names a real kube-proxy would pick for these Service ports.
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
//!
//! The parts: `iptables.rs` and `nftables.rs` write the rules, `tools.rs` runs the kernel tools
//! on them, `bench.rs` times those runs; chain names hash with the sha2 and data-encoding crates.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use super::gen::BenchService;

mod bench;
mod iptables;
mod nftables;
mod tools;

pub use bench::{
    restore_bench, restore_bench_services, restore_bench_with_limit, RestoreBench,
    IPTABLES_NOFLUSH_LIMIT,
};
pub use iptables::{iptables_full_restore, iptables_partial_restore};
pub use nftables::{nft_full_transaction, nft_partial_transaction};
pub use tools::{
    iptables_flush_in, iptables_replace_in, iptables_restore_in, nft_apply_in, nft_flush_in,
    tool_version, Applied,
};

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

/// The port name every generated Service port has (see
/// [`gen::to_manifests`](super::gen::to_manifests)).
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
    use sha2::Digest;
    let mut s = data_encoding::BASE32.encode(&sha2::Sha256::digest(input.as_bytes()));
    s.truncate(n);
    s
}

// ---------------------------------------------------------------------------------------------
// Partial syncs

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

#[cfg(test)]
mod tests {
    use super::{iptables::ipt_svc_chain, nftables::nft_hashed, *};

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
}
