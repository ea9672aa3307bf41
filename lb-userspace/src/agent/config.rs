//! The agent's configuration, as `lb-agent run` takes it from its flags.
use std::{path::PathBuf, time::Duration};

/// What `lb-agent run` was told.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub node: String,
    /// Where objects come from: a manifests file or directory, else the Kubernetes API.
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the API (default: the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub devices: Vec<String>,
    /// How each device's north-south hook (XDP or tc ingress) is chosen.
    pub north_south: super::hook::NorthSouth,
    pub poll_interval: Duration,
    /// SNAT port range (inclusive) for externalTrafficPolicy Cluster flows to remote backends.
    pub snat_ports: (u16, u16),
    /// The cluster's NodePort range (inclusive): `--snat-ports` must stay out of it.
    pub nodeport_range: (u16, u16),
    /// Time between the starts of two conntrack sweeps.
    pub ct_gc_interval: Duration,
    /// Terminate TCP sockets connected to removed backends too (UDP ones always are).
    pub terminate_tcp_sockets: bool,
    /// Hook the node's other interfaces (see `agent::interfaces`) with the tc programs.
    pub other_interfaces: bool,
    /// The node's procfs, where pods' network namespaces are found.
    pub proc: PathBuf,
    /// Where to serve Prometheus metrics (`/metrics`).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where to serve node health (`/healthz`, `/livez`).
    pub health_addr: Option<std::net::SocketAddr>,
    /// Entries of every sized map (used when the agent first pins them).
    pub map_sizes: crate::dataplane::capacity::MapSizes,
}
