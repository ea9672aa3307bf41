//! Userspace of the load balancer: the node agent (`lb-agent`) and the map inspector (`lbctl`).
//!
//! Data flow: [`control`] (source → model → plan → desired map contents) → [`dataplane`]
//! (sync → BPF maps); [`agent`] runs both in a loop and serves metrics and health checks;
//! [`inspect`] gives `lbctl` its views of the maps. Imports go one way, agent → dataplane →
//! control → lb-common (a folder imports only folders to its right), never back; [`error`] is
//! shared by all.
pub mod agent;
pub mod control;
pub mod dataplane;
pub mod error;
pub mod inspect;

/// The compiled kernel programs, built by build.rs with aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Prints `PROG: error: MESSAGE` and returns the exit code: 2 for errors the user can fix
/// (wrong flags, missing interface, cgroup, privileges, unparsable manifests), 1 otherwise.
pub fn report_error(prog: &str, e: &anyhow::Error) -> i32 {
    if let Some(u) = e.downcast_ref::<error::UsageError>() {
        eprintln!("{prog}: error: {u}");
        return 2;
    }
    if let Some(s) = e.downcast_ref::<control::source::SourceError>() {
        eprintln!("{prog}: error: {s}");
        return 2;
    }
    eprintln!("{prog}: error: {e:#}");
    1
}
