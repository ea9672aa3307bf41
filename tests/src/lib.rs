//! Privileged tests, the reference lab of shared/LAB.md and the demo.
pub mod lab;
pub mod netns;

/// The policy for tests that need the kernel (BPF, namespaces, cgroups): they run as root with a
/// bpf filesystem and cgroup v2. Elsewhere they are skipped with a line saying why, except under
/// `CI=true`, where a test that cannot run fails loudly instead of skipping silently.
pub fn require_privileges() -> Option<()> {
    // SAFETY: plain libc query.
    let root = unsafe { libc::geteuid() } == 0;
    let problem = if !root {
        Some("not root".to_string())
    } else if netns::mount_point("cgroup2").is_none() {
        Some("no cgroup2 mount".to_string())
    } else if netns::mount_point("bpf").is_none() {
        // The agent and the lab mount it where missing; fixtures need it first.
        netns::run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .err()
            .map(|e| format!("no bpf filesystem and mounting one failed: {e}"))
    } else {
        None
    };
    match problem {
        None => Some(()),
        Some(p) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("kernel test cannot run under CI=true: {p} (run as root with BPF; see `cargo xtask setup`)")
        }
        Some(p) => {
            eprintln!("skipping kernel test: {p}");
            None
        }
    }
}
