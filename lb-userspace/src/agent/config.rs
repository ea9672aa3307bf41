//! The agent's configuration: `lb-agent run`'s flags, its configuration file (`--config`), and
//! how the two meet (a flag or its environment variable > the file > the default).
//!
//! The file is versioned YAML (`apiVersion: lb-agent.config/v1alpha1`, `kind:
//! AgentConfiguration`). Where kube-proxy's `KubeProxyConfiguration` has the setting, the field
//! has its name and its default (`hostnameOverride`, `clientConnection.kubeconfig`,
//! `healthzBindAddress` 0.0.0.0:10256, `metricsBindAddress` 127.0.0.1:10249,
//! `nodePortAddresses`, `conntrack.maxPerCore` and `conntrack.min`, `logging.format`); every
//! other field is its flag's name in camelCase. A field the file does not know is an error naming
//! it, never a setting that silently does nothing.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use crate::control::model::NodePortAddresses;
use crate::dataplane::capacity::{MapSizes, SIZE_RANGE};

/// `apiVersion` of the configuration file.
pub const API_VERSION: &str = "lb-agent.config/v1alpha1";
/// `kind` of the configuration file.
pub const KIND: &str = "AgentConfiguration";

/// kube-proxy's `healthzBindAddress` default.
pub const DEFAULT_HEALTHZ: &str = "0.0.0.0:10256";
/// kube-proxy's `metricsBindAddress` default.
pub const DEFAULT_METRICS: &str = "127.0.0.1:10249";
/// kube-proxy's `conntrack.maxPerCore` default (flows per CPU).
pub const DEFAULT_CT_MAX_PER_CORE: u32 = 32_768;
/// kube-proxy's `conntrack.min` default (flows).
pub const DEFAULT_CT_MIN: u32 = 131_072;

/// What `lb-agent run` was told (flags, file and defaults merged).
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
    /// Which of the Node's addresses serve NodePorts and health-check node ports.
    pub nodeport_addresses: NodePortAddresses,
    /// Time between the starts of two conntrack sweeps.
    pub ct_gc_interval: Duration,
    /// Terminate TCP sockets connected to removed backends too (UDP ones always are).
    pub terminate_tcp_sockets: bool,
    /// Hook the node's other interfaces (see `agent::interfaces`) with the tc programs.
    pub other_interfaces: bool,
    /// The node's procfs, where pods' network namespaces are found.
    pub proc: PathBuf,
    /// Where to serve Prometheus metrics (`/metrics`); `None`: nowhere.
    pub metrics_addr: Option<SocketAddr>,
    /// Where to serve node health (`/healthz`, `/livez`); `None`: nowhere.
    pub health_addr: Option<SocketAddr>,
    /// Serve only Services labelled `service.kubernetes.io/service-proxy-name` with this value
    /// (a canary beside kube-proxy); `None`: only Services without the label, as kube-proxy.
    pub service_proxy_name: Option<String>,
    /// Entries of every sized map (used when the agent first pins them).
    pub map_sizes: MapSizes,
    /// Logs as one JSON object per line.
    pub log_json: bool,
}

/// A listen address that may be switched off: `IP:PORT`, or the empty string for none (as
/// kube-proxy's `healthzBindAddress` and `metricsBindAddress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindAddr(pub Option<SocketAddr>);

impl std::fmt::Display for BindAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => Ok(()),
        }
    }
}

pub fn parse_bind(s: &str) -> Result<BindAddr, String> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(BindAddr(None));
    }
    t.parse()
        .map(|a| BindAddr(Some(a)))
        .map_err(|_| format!("{s:?}: expected IP:PORT (e.g. 0.0.0.0:10256), or \"\" for none"))
}

pub fn parse_map_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{s:?}: not a number of entries"))?;
    check_map_size(n)
}

fn check_map_size(n: u32) -> Result<u32, String> {
    let (lo, hi) = SIZE_RANGE;
    if !(lo..=hi).contains(&n) {
        return Err(format!("{n}: must be between {lo} and {hi} entries"));
    }
    Ok(n)
}

pub fn parse_other_interfaces(s: &str) -> Result<bool, String> {
    match s {
        "tc" => Ok(true),
        "none" => Ok(false),
        _ => Err(format!("`{s}`: expected tc or none")),
    }
}

pub fn parse_north_south(s: &str) -> Result<super::hook::NorthSouth, String> {
    s.parse()
}

pub fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or("expected MIN-MAX, e.g. 1024-29999")?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a port"))?;
    if a == 0 || a > b {
        return Err(format!("{s}: need 1 <= MIN <= MAX <= 65535"));
    }
    Ok((a, b))
}

/// `5s`, `500ms`, `1m`, or plain seconds; at least 100 ms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((t, "s"), |i| t.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 5s, 500ms or 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    if !(0.1..=3600.0).contains(&secs) {
        return Err(format!("{s:?}: must be between 100ms and 1h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn duration_text(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// How many CPUs the agent may run on (kube-proxy's `runtime.NumCPU()`: the affinity mask).
pub fn cpus() -> u32 {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let n = if unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) } == 0 {
        unsafe { libc::CPU_COUNT(&set) as u32 }
    } else {
        0
    };
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    }
}

/// Confirmed-conntrack entries for kube-proxy's conntrack sizing: `max(maxPerCore x cpus,
/// min)` flows (`maxPerCore` 0: `min` alone), two entries per flow.
pub fn conntrack_entries(max_per_core: u32, min: u32, cpus: u32) -> Result<u32, String> {
    let flows = (u64::from(max_per_core) * u64::from(cpus)).max(u64::from(min));
    let entries = flows * 2;
    let (lo, hi) = SIZE_RANGE;
    if entries > u64::from(hi) {
        return Err(format!(
            "conntrack: max(maxPerCore {max_per_core} x {cpus} CPUs, min {min}) = {flows} flows needs {entries} entries (two per flow), above the {hi} limit: lower conntrack.maxPerCore / --conntrack-max-per-core or set --map-conntrack"
        ));
    }
    Ok((entries as u32).max(lo))
}

// ---- the file ----

/// The configuration file, as written. Every field but `apiVersion` and `kind` may be left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    pub api_version: String,
    pub kind: String,
    /// `--node` (kube-proxy's name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname_override: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_connection: Option<ClientConnection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifests: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bpffs: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub north_south: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_ports: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(rename = "nodePortRange")]
    pub nodeport_range: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_port_addresses: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<Conntrack>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ct_gc_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terminate_tcp_sockets: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_interfaces: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proc: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthz_bind_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_bind_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_proxy_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map_sizes: Option<MapSizesFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logging: Option<Logging>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientConnection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
}

/// kube-proxy's conntrack sizing. Its timeouts (`tcpEstablishedTimeout`, ...) are not here: the
/// datapath's lifetimes are fixed (README, "Conntrack and SNAT"), so the file rejects them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Conntrack {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_core: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Logging {
    /// `text` or `json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// `--map-*`, one field per flag.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MapSizesFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frontend_slots: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rev_nat: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_ports: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maglev_chunks: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack_new: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sock_rev_nat: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sock_flow: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fragments: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<u32>,
}

impl ConfigFile {
    /// Reads and checks a configuration file: YAML that names this version and kind, with no
    /// field it does not know. Errors name the file and, for YAML errors, the position.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--config {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("--config {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        // apiVersion and kind first, so that another kind of file is named as such rather
        // than by its first unknown field.
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Head {
            api_version: Option<String>,
            kind: Option<String>,
        }
        let head: Head =
            serde_saphyr::from_str(text).map_err(|e| e.without_snippet().to_string())?;
        match (head.api_version.as_deref(), head.kind.as_deref()) {
            (Some(API_VERSION), Some(KIND)) => {}
            (v, k) => {
                return Err(format!(
                    "apiVersion {} / kind {}: expected apiVersion: {API_VERSION} and kind: {KIND}",
                    v.unwrap_or("(missing)"),
                    k.unwrap_or("(missing)")
                ))
            }
        }
        serde_saphyr::from_str(text).map_err(|e| e.without_snippet().to_string())
    }

    /// The file that says everything `cfg` holds (what `--print-config` prints).
    pub fn from_run(cfg: &RunConfig) -> Self {
        let s = &cfg.map_sizes;
        let opt_path = |p: &Option<PathBuf>| p.clone();
        Self {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            hostname_override: Some(cfg.node.clone()),
            client_connection: Some(ClientConnection {
                kubeconfig: opt_path(&cfg.kubeconfig),
            }),
            manifests: opt_path(&cfg.manifests),
            poll_interval_ms: Some(cfg.poll_interval.as_millis() as u64),
            cgroup: Some(cfg.cgroup.clone()),
            bpffs: Some(cfg.bpffs.clone()),
            devices: Some(cfg.devices.clone()),
            north_south: Some(cfg.north_south.to_string()),
            snat_ports: Some(format!("{}-{}", cfg.snat_ports.0, cfg.snat_ports.1)),
            nodeport_range: Some(format!("{}-{}", cfg.nodeport_range.0, cfg.nodeport_range.1)),
            node_port_addresses: Some(cfg.nodeport_addresses.to_strings()),
            conntrack: None,
            ct_gc_interval: Some(duration_text(cfg.ct_gc_interval)),
            terminate_tcp_sockets: Some(cfg.terminate_tcp_sockets),
            other_interfaces: Some(if cfg.other_interfaces { "tc" } else { "none" }.into()),
            proc: Some(cfg.proc.clone()),
            healthz_bind_address: Some(BindAddr(cfg.health_addr).to_string()),
            metrics_bind_address: Some(BindAddr(cfg.metrics_addr).to_string()),
            service_proxy_name: cfg.service_proxy_name.clone(),
            map_sizes: Some(MapSizesFile {
                frontend_slots: Some(s.frontend_slots),
                backends: Some(s.backends),
                rev_nat: Some(s.rev_nat),
                service_ports: Some(s.service_ports),
                maglev_chunks: Some(s.maglev_chunks),
                conntrack: Some(s.conntrack),
                conntrack_new: Some(s.conntrack_new),
                affinity: Some(s.affinity),
                sock_rev_nat: Some(s.sock_rev_nat),
                sock_flow: Some(s.sock_flow),
                fragments: Some(s.fragments),
                source_ranges: Some(s.source_ranges),
            }),
            logging: Some(Logging {
                format: Some(if cfg.log_json { "json" } else { "text" }.into()),
            }),
        }
    }
}

// ---- the flags ----

/// `lb-agent run`'s flags. Each has a field in the configuration file (README table); a flag
/// given on the command line or by its environment variable wins over the file, the file over
/// the default.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Configuration file (YAML, apiVersion lb-agent.config/v1alpha1, kind
    /// AgentConfiguration): every flag below has a field there; flags win over it.
    #[arg(long, env = "LB_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the configuration these flags and the file amount to (as a configuration file)
    /// and exit.
    #[arg(long)]
    pub print_config: bool,
    /// This node's name (as in its Node object and endpoints' nodeName); file:
    /// hostnameOverride. Default: the host name, lower-cased (as kube-proxy and the kubelet).
    #[arg(long)]
    pub node: Option<String>,
    /// Manifests file or directory (multi-document YAML: Node, Service, EndpointSlice),
    /// re-read on change. Without it, the agent watches the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API (default: the in-cluster service account); file:
    /// clientConnection.kubeconfig.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// cgroup v2 directory the socket-level programs attach to (required, here or in the file).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Directory on a bpf filesystem for this agent's pinned maps and links (required, here or
    /// in the file).
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Network device to attach the north-south programs to (repeatable). `auto` (also
    /// what no --device means): the devices that carry the node's InternalIP and those of
    /// IPv4 default routes; `none`: no device (socket-level translation only).
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// North-south hook per --device: xdp, tc (tc ingress, TCX) or auto (XDP only where
    /// XDP_TX and redirect deliver: a veth whose peer runs XDP, or a device with native XDP;
    /// else tc).
    #[arg(long, value_name = "xdp|tc|auto", default_value = "auto", value_parser = parse_north_south)]
    pub north_south: super::hook::NorthSouth,
    /// How often the manifests are checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub poll_interval_ms: u64,
    /// Source ports (MIN-MAX) for flows translated to the node's address. Must not overlap
    /// the node's ephemeral ports (net.ipv4.ip_local_port_range) nor --nodeport-range.
    #[arg(long, default_value = "1024-29999", value_parser = parse_range)]
    pub snat_ports: (u16, u16),
    /// The cluster's NodePort range (MIN-MAX, the API server's --service-node-port-range).
    #[arg(long, default_value = "30000-32767", value_parser = parse_range)]
    pub nodeport_range: (u16, u16),
    /// Which Node addresses serve NodePorts and health-check node ports (kube-proxy's
    /// nodePortAddresses): IPv4 CIDRs (comma-separated or repeated), or `primary` (the first
    /// InternalIP); default: every InternalIP and ExternalIP of the Node.
    #[arg(long, value_delimiter = ',', value_name = "CIDR|primary")]
    pub nodeport_addresses: Vec<String>,
    /// Time between conntrack garbage-collection sweeps (e.g. 5s, 500ms, 1m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub ct_gc_interval: Duration,
    /// Also terminate TCP sockets still connected to a backend that left their Service
    /// (bpf_sock_destroy, Linux >= 6.5). Connected UDP sockets always are; TCP connections
    /// are left to finish by default, as with kube-proxy.
    #[arg(long)]
    pub terminate_tcp_sockets: bool,
    /// The node's procfs (its PID namespace's view), where the network namespaces of pods
    /// are found (/PID/ns/net) to terminate their sockets to removed backends. In a pod
    /// without hostPID, mount the node's /proc elsewhere and name it here.
    #[arg(long, env = "LB_AGENT_PROC", default_value = "/proc")]
    pub proc: PathBuf,
    /// The node's other interfaces (up, with an IPv4 address, not a --device): `tc` attaches
    /// the tc ingress and egress programs to each (NodePort, LoadBalancer, external-IP and
    /// ClusterIP traffic arriving there); `none` leaves them alone.
    #[arg(long, env = "LB_AGENT_OTHER_INTERFACES", value_name = "tc|none", default_value = "tc", value_parser = parse_other_interfaces, action = clap::ArgAction::Set)]
    pub other_interfaces: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics; "" for none (kube-proxy's
    /// metricsBindAddress).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS, value_parser = parse_bind)]
    pub metrics_addr: BindAddr,
    /// Serve node health at http://ADDR/healthz and /livez; "" for none (kube-proxy's
    /// healthzBindAddress).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_HEALTHZ, value_parser = parse_bind)]
    pub health_addr: BindAddr,
    /// Serve only Services (and EndpointSlices) labelled
    /// service.kubernetes.io/service-proxy-name=NAME, e.g. a canary beside kube-proxy, which
    /// leaves such Services alone. Without it: only Services without that label.
    #[arg(long, value_name = "NAME")]
    pub service_proxy_name: Option<String>,
    #[command(flatten)]
    pub map_sizes: MapSizeArgs,
}

/// Map sizes, in entries (README: bytes per entry). A map keeps the size it was first pinned with
/// until `lb-agent uninstall` (or a reboot) removes it.
#[derive(clap::Args, Debug)]
pub struct MapSizeArgs {
    /// Frontend slots (a master plus one per backend, per frontend and scope) and membership
    /// entries: lb_svc_v3, lb_member_v1.
    #[arg(long, env = "LB_AGENT_MAP_FRONTEND_SLOTS", default_value_t = lb_common::limits::FRONTEND_SLOTS, value_parser = parse_map_size)]
    pub map_frontend_slots: u32,
    /// Backends (one per distinct address, port, protocol): lb_backend_v1.
    #[arg(long, env = "LB_AGENT_MAP_BACKENDS", default_value_t = lb_common::limits::BACKENDS, value_parser = parse_map_size)]
    pub map_backends: u32,
    /// Rev-NAT entries (one per frontend address and port): lb_revnat_v1.
    #[arg(long, env = "LB_AGENT_MAP_REV_NAT", default_value_t = lb_common::limits::REV_NAT, value_parser = parse_map_size)]
    pub map_rev_nat: u32,
    /// Service ports (per-CPU counters and names): lb_svc_stats_v2, lb_svc_names_v1.
    #[arg(long, env = "LB_AGENT_MAP_SERVICE_PORTS", default_value_t = lb_common::limits::SERVICE_STATS, value_parser = parse_map_size)]
    pub map_service_ports: u32,
    /// Maglev table chunks: lb_maglev_v1.
    #[arg(long, env = "LB_AGENT_MAP_MAGLEV_CHUNKS", default_value_t = lb_common::limits::MAGLEV_CHUNKS, value_parser = parse_map_size)]
    pub map_maglev_chunks: u32,
    /// Confirmed conntrack (LRU, two per north-south flow): lb_ct_v4. Default: two per flow
    /// of kube-proxy's sizing, max(--conntrack-max-per-core x CPUs, --conntrack-min).
    #[arg(long, env = "LB_AGENT_MAP_CONNTRACK", value_parser = parse_map_size)]
    pub map_conntrack: Option<u32>,
    /// Flows per CPU for the default --map-conntrack (kube-proxy's conntrack.maxPerCore; 0:
    /// --conntrack-min alone).
    #[arg(long, default_value_t = DEFAULT_CT_MAX_PER_CORE)]
    pub conntrack_max_per_core: u32,
    /// Least flows for the default --map-conntrack (kube-proxy's conntrack.min).
    #[arg(long, default_value_t = DEFAULT_CT_MIN)]
    pub conntrack_min: u32,
    /// Unconfirmed conntrack (LRU, two per flow until confirmed): lb_ct_new_v3.
    #[arg(long, env = "LB_AGENT_MAP_CONNTRACK_NEW", default_value_t = lb_common::limits::CONNTRACK_NEW, value_parser = parse_map_size)]
    pub map_conntrack_new: u32,
    /// Session affinity records (LRU): lb_affinity_v1.
    #[arg(long, env = "LB_AGENT_MAP_AFFINITY", default_value_t = lb_common::limits::AFFINITY, value_parser = parse_map_size)]
    pub map_affinity: u32,
    /// Socket rev-NAT (LRU, one per translated socket): lb_sk_revnat_v1.
    #[arg(long, env = "LB_AGENT_MAP_SOCK_REV_NAT", default_value_t = lb_common::limits::SOCK_REV_NAT, value_parser = parse_map_size)]
    pub map_sock_rev_nat: u32,
    /// UDP socket flow choices (LRU): lb_sk_flow_v1.
    #[arg(long, env = "LB_AGENT_MAP_SOCK_FLOW", default_value_t = lb_common::limits::SOCK_FLOW, value_parser = parse_map_size)]
    pub map_sock_flow: u32,
    /// Fragmented datagrams in transit (LRU): lb_frag_v1.
    #[arg(long, env = "LB_AGENT_MAP_FRAGMENTS", default_value_t = lb_common::limits::FRAGMENTS, value_parser = parse_map_size)]
    pub map_fragments: u32,
    /// loadBalancerSourceRanges prefixes (one per Service port and prefix): lb_srcrange_v1.
    #[arg(long, env = "LB_AGENT_MAP_SOURCE_RANGES", default_value_t = lb_common::limits::SOURCE_RANGES, value_parser = parse_map_size)]
    pub map_source_ranges: u32,
}

impl MapSizeArgs {
    /// The sizes the flags alone say (`render`).
    pub fn sizes(&self) -> Result<MapSizes, String> {
        merge_sizes(
            self,
            &|_| true,
            &MapSizesFile::default(),
            &Conntrack::default(),
        )
    }
}

/// Whether a value was given on the command line or by its environment variable (clap's
/// argument id: the field name).
pub type Explicit<'a> = dyn Fn(&str) -> bool + 'a;

/// The file's value, unless the flag was given on the command line or by its environment
/// variable (then the flag's value stands).
fn unless_given<T>(given: bool, file: Option<T>) -> Option<T> {
    file.filter(|_| !given)
}

fn merge_sizes(
    a: &MapSizeArgs,
    explicit: &Explicit<'_>,
    m: &MapSizesFile,
    ct: &Conntrack,
) -> Result<MapSizes, String> {
    let pick = |id: &str, flag: u32, file: Option<u32>, field: &str| -> Result<u32, String> {
        match unless_given(explicit(id), file) {
            Some(v) => check_map_size(v).map_err(|e| format!("mapSizes.{field}: {e}")),
            None => Ok(flag),
        }
    };
    let per_core = unless_given(explicit("conntrack_max_per_core"), ct.max_per_core)
        .unwrap_or(a.conntrack_max_per_core);
    let min = unless_given(explicit("conntrack_min"), ct.min).unwrap_or(a.conntrack_min);
    let conntrack = match unless_given(explicit("map_conntrack"), m.conntrack) {
        Some(v) => check_map_size(v).map_err(|e| format!("mapSizes.conntrack: {e}"))?,
        None => match a.map_conntrack {
            Some(v) => v,
            None => conntrack_entries(per_core, min, cpus())?,
        },
    };
    Ok(MapSizes {
        frontend_slots: pick(
            "map_frontend_slots",
            a.map_frontend_slots,
            m.frontend_slots,
            "frontendSlots",
        )?,
        backends: pick("map_backends", a.map_backends, m.backends, "backends")?,
        rev_nat: pick("map_rev_nat", a.map_rev_nat, m.rev_nat, "revNat")?,
        service_ports: pick(
            "map_service_ports",
            a.map_service_ports,
            m.service_ports,
            "servicePorts",
        )?,
        maglev_chunks: pick(
            "map_maglev_chunks",
            a.map_maglev_chunks,
            m.maglev_chunks,
            "maglevChunks",
        )?,
        conntrack,
        conntrack_new: pick(
            "map_conntrack_new",
            a.map_conntrack_new,
            m.conntrack_new,
            "conntrackNew",
        )?,
        affinity: pick("map_affinity", a.map_affinity, m.affinity, "affinity")?,
        sock_rev_nat: pick(
            "map_sock_rev_nat",
            a.map_sock_rev_nat,
            m.sock_rev_nat,
            "sockRevNat",
        )?,
        sock_flow: pick("map_sock_flow", a.map_sock_flow, m.sock_flow, "sockFlow")?,
        fragments: pick("map_fragments", a.map_fragments, m.fragments, "fragments")?,
        source_ranges: pick(
            "map_source_ranges",
            a.map_source_ranges,
            m.source_ranges,
            "sourceRanges",
        )?,
    })
}

/// The host name, lower-cased (what the kubelet registers the Node as by default).
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates (checked below).
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim().to_lowercase();
    (!name.is_empty()).then_some(name)
}

impl RunArgs {
    /// Flags, file and defaults merged: a flag given on the command line or by its environment
    /// variable (`explicit`) wins over the file, the file over the flag's default.
    /// `log_json`: the global `--log-format` and whether it was given.
    pub fn resolve(
        self,
        explicit: &Explicit<'_>,
        log_json: (bool, bool),
    ) -> Result<RunConfig, String> {
        let f = match &self.config {
            Some(p) => ConfigFile::load(p)?,
            None => ConfigFile::default(),
        };
        // Errors about the file's values name the file and the field.
        let in_file = |e: String| match &self.config {
            Some(p) => format!("--config {}: {e}", p.display()),
            None => e,
        };
        let at = |field: &str, e: String| in_file(format!("{field}: {e}"));
        // A value the flag did not give explicitly comes from the file, parsed as the flag is.
        fn take<T>(
            given: bool,
            file: &Option<String>,
            parse: impl Fn(&str) -> Result<T, String>,
        ) -> Result<Option<T>, String> {
            unless_given(given, file.as_deref()).map(parse).transpose()
        }
        let node = match (self.node, f.hostname_override.clone()) {
            (Some(n), _) => n,
            (None, Some(n)) if !n.trim().is_empty() => n.trim().to_lowercase(),
            _ => hostname().ok_or("--node: not given and the host name cannot be read")?,
        };
        let kubeconfig = self.kubeconfig.or(f
            .client_connection
            .as_ref()
            .and_then(|c| c.kubeconfig.clone()));
        let manifests = self.manifests.or(f.manifests.clone());
        if manifests.is_some() && kubeconfig.is_some() {
            return Err(
                "--manifests and --kubeconfig (clientConnection.kubeconfig) exclude each other"
                    .into(),
            );
        }
        let cgroup = self.cgroup.or(f.cgroup.clone()).ok_or(
            "--cgroup: required (the cgroup v2 directory to attach to, e.g. /sys/fs/cgroup), as a flag or the file's cgroup",
        )?;
        let bpffs = self.bpffs.or(f.bpffs.clone()).ok_or(
            "--bpffs: required (a directory on a bpf filesystem, e.g. /sys/fs/bpf/lb), as a flag or the file's bpffs",
        )?;
        let devices = unless_given(explicit("devices"), f.devices.clone()).unwrap_or(self.devices);
        let north_south = take(explicit("north_south"), &f.north_south, parse_north_south)
            .map_err(|e| at("northSouth", e))?
            .unwrap_or(self.north_south);
        let poll_interval_ms = unless_given(explicit("poll_interval_ms"), f.poll_interval_ms)
            .unwrap_or(self.poll_interval_ms);
        let snat_ports = take(explicit("snat_ports"), &f.snat_ports, parse_range)
            .map_err(|e| at("snatPorts", e))?
            .unwrap_or(self.snat_ports);
        let nodeport_range = take(explicit("nodeport_range"), &f.nodeport_range, parse_range)
            .map_err(|e| at("nodePortRange", e))?
            .unwrap_or(self.nodeport_range);
        let nodeport_addresses = match unless_given(
            explicit("nodeport_addresses"),
            f.node_port_addresses.as_ref(),
        ) {
            Some(v) => NodePortAddresses::parse(v).map_err(|e| at("nodePortAddresses", e))?,
            None => NodePortAddresses::parse(&self.nodeport_addresses)
                .map_err(|e| format!("--nodeport-addresses: {e}"))?,
        };
        let ct_gc_interval = take(
            explicit("ct_gc_interval"),
            &f.ct_gc_interval,
            parse_duration,
        )
        .map_err(|e| at("ctGcInterval", e))?
        .unwrap_or(self.ct_gc_interval);
        let terminate_tcp_sockets =
            unless_given(explicit("terminate_tcp_sockets"), f.terminate_tcp_sockets)
                .unwrap_or(self.terminate_tcp_sockets);
        let other_interfaces = take(
            explicit("other_interfaces"),
            &f.other_interfaces,
            parse_other_interfaces,
        )
        .map_err(|e| at("otherInterfaces", e))?
        .unwrap_or(self.other_interfaces);
        let proc = unless_given(explicit("proc"), f.proc.clone()).unwrap_or(self.proc);
        let metrics_addr = take(
            explicit("metrics_addr"),
            &f.metrics_bind_address,
            parse_bind,
        )
        .map_err(|e| at("metricsBindAddress", e))?
        .unwrap_or(self.metrics_addr);
        let health_addr = take(explicit("health_addr"), &f.healthz_bind_address, parse_bind)
            .map_err(|e| at("healthzBindAddress", e))?
            .unwrap_or(self.health_addr);
        let service_proxy_name = self
            .service_proxy_name
            .or(f.service_proxy_name.clone())
            .filter(|n| !n.is_empty());
        let map_sizes = merge_sizes(
            &self.map_sizes,
            explicit,
            &f.map_sizes.clone().unwrap_or_default(),
            &f.conntrack.clone().unwrap_or_default(),
        )
        .map_err(in_file)?;
        let format = f.logging.as_ref().and_then(|l| l.format.as_deref());
        let log_json = match unless_given(log_json.1, format) {
            Some(v) => match v {
                "json" => true,
                "text" => false,
                other => {
                    return Err(at(
                        "logging.format",
                        format!("{other:?}: expected text or json"),
                    ))
                }
            },
            _ => log_json.0,
        };
        Ok(RunConfig {
            node,
            manifests,
            kubeconfig,
            cgroup,
            bpffs,
            devices,
            north_south,
            poll_interval: Duration::from_millis(poll_interval_ms.max(10)),
            snat_ports,
            nodeport_range,
            nodeport_addresses,
            ct_gc_interval,
            terminate_tcp_sockets,
            other_interfaces,
            proc,
            metrics_addr: metrics_addr.0,
            health_addr: health_addr.0,
            service_proxy_name,
            map_sizes,
            log_json,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use clap::{ArgMatches, Args, Command, FromArgMatches};

    use super::*;

    /// Parses `args` as `run`'s flags and resolves them as `lb-agent` does.
    fn resolve(args: &[&str]) -> Result<RunConfig, String> {
        let cmd = RunArgs::augment_args(Command::new("run").no_binary_name(true));
        let m: ArgMatches = cmd.try_get_matches_from(args).map_err(|e| e.to_string())?;
        let a = RunArgs::from_arg_matches(&m).map_err(|e| e.to_string())?;
        let explicit = |id: &str| {
            matches!(
                m.value_source(id),
                Some(
                    clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable
                )
            )
        };
        a.resolve(&explicit, (false, false))
    }

    /// A file under the temp directory, removed when dropped.
    struct Temp(PathBuf);
    impl Temp {
        fn new(text: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "lb-agent-config-{}-{}.yaml",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, text).unwrap();
            Self(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file(body: &str) -> Temp {
        Temp::new(&format!("apiVersion: {API_VERSION}\nkind: {KIND}\n{body}"))
    }

    #[test]
    fn defaults_are_kube_proxys_where_it_has_the_setting() {
        let c = resolve(&["--node", "n1", "--cgroup", "/cg", "--bpffs", "/b"]).unwrap();
        assert_eq!(c.health_addr, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(c.metrics_addr, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!(c.nodeport_addresses, NodePortAddresses::All);
        assert_eq!(
            c.map_sizes.conntrack,
            conntrack_entries(32_768, 131_072, cpus()).unwrap()
        );
        assert_eq!(c.service_proxy_name, None);
        // What the flags' defaults were before the file existed.
        assert_eq!(c.snat_ports, (1024, 29999));
        assert_eq!(c.map_sizes.backends, lb_common::limits::BACKENDS);
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let f = file(
            "hostnameOverride: Node-A\ncgroup: /cg\nbpffs: /b\nsnatPorts: 2000-2999\nctGcInterval: 1m\nhealthzBindAddress: \"\"\nmapSizes: {backends: 4096, frontendSlots: 1024}\nconntrack: {min: 1000, maxPerCore: 0}\nnodePortAddresses: [10.0.0.0/8]\nserviceProxyName: canary\nlogging: {format: json}\n",
        );
        let p = f.path().to_str().unwrap();
        let c = resolve(&["--config", p, "--map-backends", "2048"]).unwrap();
        assert_eq!(c.node, "node-a", "hostnameOverride, lower-cased");
        assert_eq!(c.snat_ports, (2000, 2999), "file over default");
        assert_eq!(c.ct_gc_interval, Duration::from_secs(60));
        assert_eq!(c.health_addr, None, "\"\" switches it off");
        assert_eq!(c.metrics_addr, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!(c.map_sizes.backends, 2048, "flag over file");
        assert_eq!(c.map_sizes.frontend_slots, 1024);
        assert_eq!(
            c.map_sizes.conntrack, 2000,
            "two entries per flow of conntrack.min"
        );
        assert_eq!(c.service_proxy_name.as_deref(), Some("canary"));
        assert!(c.log_json);
        assert_eq!(
            c.nodeport_addresses,
            NodePortAddresses::Cidrs(vec![(Ipv4Addr::new(10, 0, 0, 0).into(), 8)])
        );
        // A flag given with its default value still wins over the file.
        let c = resolve(&["--config", p, "--snat-ports", "1024-29999", "--node", "x"]).unwrap();
        assert_eq!(c.snat_ports, (1024, 29999));
        assert_eq!(c.node, "x");
        // --map-conntrack wins over the sizing.
        let c = resolve(&["--config", p, "--map-conntrack", "4096"]).unwrap();
        assert_eq!(c.map_sizes.conntrack, 4096);
    }

    #[test]
    fn other_interfaces_takes_its_value_on_the_command_line() {
        let base = ["--node", "n1", "--cgroup", "/cg", "--bpffs", "/b"];
        let with = |v: &str| {
            let mut args = base.to_vec();
            args.extend(["--other-interfaces", v]);
            resolve(&args)
        };
        assert!(resolve(&base).unwrap().other_interfaces, "default tc");
        assert!(!with("none").unwrap().other_interfaces);
        assert!(with("tc").unwrap().other_interfaces);
        let e = with("bogus").unwrap_err();
        assert!(e.contains("expected tc or none"), "{e}");
    }

    #[test]
    fn unknown_fields_and_other_kinds_are_named() {
        let f = file("cgroup: /cg\nbpffs: /b\nsnatPort: 2000-2999\n");
        let e = resolve(&["--config", f.path().to_str().unwrap(), "--node", "n"]).unwrap_err();
        assert!(e.contains("unknown field `snatPort`"), "{e}");
        assert!(e.contains("line 5"), "{e}");
        // kube-proxy's conntrack timeouts are not settable here: an error, not ignored.
        let f = file("conntrack: {tcpEstablishedTimeout: 1h}\n");
        let e = resolve(&["--config", f.path().to_str().unwrap()]).unwrap_err();
        assert!(e.contains("unknown field `tcpEstablishedTimeout`"), "{e}");
        let g = Temp::new(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: iptables\n",
        );
        let e = resolve(&["--config", g.path().to_str().unwrap()]).unwrap_err();
        assert!(
            e.contains("expected apiVersion: lb-agent.config/v1alpha1"),
            "{e}"
        );
        let e = resolve(&["--config", "/nonexistent/lb.yaml"]).unwrap_err();
        assert!(e.starts_with("--config /nonexistent/lb.yaml: "), "{e}");
        // A bad value names its field.
        let f = file("cgroup: /cg\nbpffs: /b\nsnatPorts: 3000-2000\n");
        let e = resolve(&["--config", f.path().to_str().unwrap()]).unwrap_err();
        assert!(e.contains("snatPorts: 3000-2000"), "{e}");
        let f = file("cgroup: /cg\nbpffs: /b\nmapSizes: {backends: 3}\n");
        let e = resolve(&["--config", f.path().to_str().unwrap()]).unwrap_err();
        assert!(e.contains("mapSizes.backends: 3: must be between"), "{e}");
    }

    #[test]
    fn required_values_come_from_either_place() {
        let e = resolve(&["--node", "n", "--bpffs", "/b"]).unwrap_err();
        assert!(e.starts_with("--cgroup: required"), "{e}");
        let f = file("cgroup: /cg\n");
        let e = resolve(&["--config", f.path().to_str().unwrap(), "--node", "n"]).unwrap_err();
        assert!(e.starts_with("--bpffs: required"), "{e}");
    }

    /// What `--print-config` prints reads back as the same configuration.
    #[test]
    fn printed_configuration_reads_back_the_same() {
        let c = resolve(&[
            "--node",
            "n1",
            "--cgroup",
            "/cg",
            "--bpffs",
            "/b",
            "--device",
            "eth0",
            "--nodeport-addresses",
            "10.0.0.0/8,192.168.0.0/16",
            "--ct-gc-interval",
            "500ms",
            "--metrics-addr",
            "",
        ])
        .unwrap();
        let text = serde_saphyr::to_string(&ConfigFile::from_run(&c)).unwrap();
        let f = Temp::new(&text);
        let back = resolve(&["--config", f.path().to_str().unwrap()]).unwrap();
        assert_eq!(format!("{back:?}"), format!("{c:?}"));
    }

    #[test]
    fn node_port_addresses_select_as_kube_proxy() {
        let addrs = [Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(203, 0, 113, 7)];
        let p = |v: &[&str]| {
            NodePortAddresses::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(p(&[]).unwrap().select(&addrs), addrs);
        assert_eq!(p(&["primary"]).unwrap().select(&addrs), addrs[..1]);
        assert_eq!(
            p(&["203.0.113.0/24", "fd00::/8"]).unwrap().select(&addrs),
            addrs[1..]
        );
        assert_eq!(p(&["0.0.0.0/0"]).unwrap().select(&addrs), addrs);
        assert!(p(&["primary", "10.0.0.0/8"]).is_err());
        assert!(p(&["fd00::/8"]).is_err(), "no IPv4 CIDR left");
        assert!(p(&["10.0.0.0"]).is_err());
        assert!(p(&["10.0.0.0/33"]).is_err());
    }

    #[test]
    fn conntrack_sizing_is_kube_proxys() {
        assert_eq!(conntrack_entries(32_768, 131_072, 2).unwrap(), 262_144);
        assert_eq!(conntrack_entries(32_768, 131_072, 8).unwrap(), 524_288);
        assert_eq!(conntrack_entries(0, 131_072, 64).unwrap(), 262_144);
        assert!(conntrack_entries(1 << 20, 0, 64).is_err());
    }
}
