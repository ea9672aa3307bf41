//! Test support for the load balancer: the reference lab (a small cluster in network
//! namespaces, see [`lab`]) and the helpers its binaries and tests share.
//!
//! Binaries of this crate: `lab-echo` (the pods' echo server) and `lab-client` (runs exchanges
//! and prints one JSON line per exchange).
pub mod bench;
pub mod fixture;
pub mod harness;
pub mod lab;
pub mod legacy;
pub mod monitoring;
pub mod netns;
pub mod scenario;
pub mod xdp;

pub use lab::{bin_path, AgentProcess, Exchange, Family, HeldConnection, Lab, Node, Pod, Variant};

/// Generates one `#[test]` per lab variant (shared/LAB.md: plain and XDP) from a function that
/// takes the [`Variant`]; the test names are written out so they stay greppable and keep the
/// `lab_` prefix:
///
/// ```ignore
/// fn cluster_policy(v: Variant) { /* ... */ }
/// lb_tests::on_both_variants!(cluster_policy: lab_cluster_policy_plain, lab_cluster_policy_xdp);
/// ```
#[macro_export]
macro_rules! on_both_variants {
    ($body:ident: $plain:ident, $xdp:ident) => {
        #[test]
        fn $plain() {
            $body($crate::lab::Variant::Plain)
        }
        #[test]
        fn $xdp() {
            $body($crate::lab::Variant::Xdp)
        }
    };
}

/// Gate for tests that need root, cgroup v2 and a bpf filesystem (mounted here at /sys/fs/bpf
/// when missing, as fixtures need it before any lab exists).
///
/// Returns `Some(())` when the test can run. Otherwise, outside CI it prints why and returns
/// `None` (the test returns); with `CI=true` it panics with the reason, so that a CI machine
/// that lost its privileges fails loudly instead of passing empty tests.
///
/// ```no_run
/// fn my_lab_test() {
///     let Some(()) = lb_tests::require_privileges() else { return };
///     // ...
/// }
/// ```
pub fn require_privileges() -> Option<()> {
    let problem =
        privilege_problem().or_else(|| netns::ensure_bpffs().err().map(|e| format!("{e:#}")));
    let Some(reason) = problem else {
        return Some(());
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "this test needs privileges that CI must provide: {reason} (run as root with BPF; see \
             `cargo xtask setup`)"
        );
    }
    eprintln!("skipping privileged test: {reason}");
    None
}

/// Why privileged tests cannot run here, if they cannot.
pub fn privilege_problem() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!("not running as root (euid {euid})"));
    }
    if netns::mount_point("cgroup2").is_none() {
        return Some("no cgroup2 filesystem is mounted (see /proc/mounts)".into());
    }
    // The lab mounts a bpf filesystem at /sys/fs/bpf when there is none.
    if netns::mount_point("bpf").is_none() && !std::path::Path::new("/sys/fs/bpf").is_dir() {
        return Some("no bpf filesystem is mounted and /sys/fs/bpf does not exist".into());
    }
    for tool in ["ip", "bridge", "ethtool"] {
        if !on_path(tool) {
            return Some(format!("`{tool}` is not on PATH (run `cargo xtask setup`)"));
        }
    }
    None
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}
