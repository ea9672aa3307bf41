//! `lb-agent`: the node daemon (`run`), the plan printer (`render`) and the cleaner (`uninstall`).
use std::{
    io::Write,
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use clap::{Parser, Subcommand};
use lb_userspace::{
    agent,
    control::{model, plan, source},
    dataplane::capacity::{self, MapSizes, SIZE_RANGE},
    error, report_error,
};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "eBPF/XDP Kubernetes Service dataplane: node agent"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing would only obscure the flags"
)]
enum Command {
    /// Load and attach the programs, pin maps and links, and keep the maps in sync.
    Run {
        /// This node's name (as in its Node object and endpoints' nodeName).
        #[arg(long)]
        node: String,
        /// Manifests file or directory (multi-document YAML: Node, Service, EndpointSlice),
        /// re-read on change. Without it, the agent watches the Kubernetes API.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Kubeconfig for the Kubernetes API (default: the in-cluster service account).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// cgroup v2 directory the socket-level programs attach to.
        #[arg(long)]
        cgroup: PathBuf,
        /// Directory on a bpf filesystem for this agent's pinned maps and links.
        #[arg(long)]
        bpffs: PathBuf,
        /// Network device to attach the north-south programs to (repeatable). `auto` (also
        /// what no --device means): the devices that carry the node's InternalIP and those of
        /// IPv4 default routes; `none`: no device (socket-level translation only).
        #[arg(long = "device")]
        devices: Vec<String>,
        /// North-south hook per --device: xdp, tc (tc ingress, TCX) or auto (XDP only where
        /// XDP_TX and redirect deliver: a veth whose peer runs XDP, or a device with native XDP;
        /// else tc).
        #[arg(long, value_name = "xdp|tc|auto", default_value = "auto", value_parser = parse_north_south)]
        north_south: agent::hook::NorthSouth,
        /// How often the manifests are checked for changes, in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_interval_ms: u64,
        /// Source ports (MIN-MAX) for flows translated to the node's address. Must not overlap
        /// the node's ephemeral ports (net.ipv4.ip_local_port_range) nor --nodeport-range.
        #[arg(long, default_value = "1024-29999", value_parser = parse_range)]
        snat_ports: (u16, u16),
        /// The cluster's NodePort range (MIN-MAX, the API server's --service-node-port-range).
        #[arg(long, default_value = "30000-32767", value_parser = parse_range)]
        nodeport_range: (u16, u16),
        /// Time between conntrack garbage-collection sweeps (e.g. 5s, 500ms, 1m).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        ct_gc_interval: Duration,
        /// Also terminate TCP sockets still connected to a backend that left their Service
        /// (bpf_sock_destroy, Linux >= 6.5). Connected UDP sockets always are; TCP connections
        /// are left to finish by default, as with kube-proxy.
        #[arg(long)]
        terminate_tcp_sockets: bool,
        /// The node's procfs (its PID namespace's view), where the network namespaces of pods
        /// are found (/PID/ns/net) to terminate their sockets to removed backends. In a pod
        /// without hostPID, mount the node's /proc elsewhere and name it here.
        #[arg(long, env = "LB_AGENT_PROC", default_value = "/proc")]
        proc: PathBuf,
        /// The node's other interfaces (up, with an IPv4 address, not a --device): `tc` attaches
        /// the tc ingress and egress programs to each (NodePort, LoadBalancer, external-IP and
        /// ClusterIP traffic arriving there); `none` leaves them alone.
        #[arg(long, env = "LB_AGENT_OTHER_INTERFACES", value_name = "tc|none", default_value = "tc", value_parser = parse_other_interfaces)]
        other_interfaces: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9464).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Serve node health at http://ADDR/healthz and /livez (e.g. 0.0.0.0:10256).
        #[arg(long)]
        health_addr: Option<std::net::SocketAddr>,
        #[command(flatten)]
        map_sizes: MapSizeArgs,
    },
    /// Print the plan (endpoint sets per Service port) for a node as JSON; Service ports that
    /// would not fit in maps of the given sizes are in its `rejected` list.
    Render {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long)]
        node: String,
        #[command(flatten)]
        map_sizes: MapSizeArgs,
    },
    /// Detach the programs: remove the links and maps this project pins under --bpffs (other
    /// pins there stay).
    Uninstall {
        #[arg(long)]
        bpffs: PathBuf,
    },
}

/// Map sizes, in entries (README: bytes per entry). A map keeps the size it was first pinned with
/// until `lb-agent uninstall` (or a reboot) removes it.
#[derive(clap::Args)]
struct MapSizeArgs {
    /// Frontend slots (a master plus one per backend, per frontend and scope) and membership
    /// entries: lb_svc_v3, lb_member_v1.
    #[arg(long, env = "LB_AGENT_MAP_FRONTEND_SLOTS", default_value_t = lb_common::limits::FRONTEND_SLOTS, value_parser = parse_map_size)]
    map_frontend_slots: u32,
    /// Backends (one per distinct address, port, protocol): lb_backend_v1.
    #[arg(long, env = "LB_AGENT_MAP_BACKENDS", default_value_t = lb_common::limits::BACKENDS, value_parser = parse_map_size)]
    map_backends: u32,
    /// Rev-NAT entries (one per frontend address and port): lb_revnat_v1.
    #[arg(long, env = "LB_AGENT_MAP_REV_NAT", default_value_t = lb_common::limits::REV_NAT, value_parser = parse_map_size)]
    map_rev_nat: u32,
    /// Service ports (per-CPU counters and names): lb_svc_stats_v1, lb_svc_names_v1.
    #[arg(long, env = "LB_AGENT_MAP_SERVICE_PORTS", default_value_t = lb_common::limits::SERVICE_STATS, value_parser = parse_map_size)]
    map_service_ports: u32,
    /// Maglev table chunks: lb_maglev_v1.
    #[arg(long, env = "LB_AGENT_MAP_MAGLEV_CHUNKS", default_value_t = lb_common::limits::MAGLEV_CHUNKS, value_parser = parse_map_size)]
    map_maglev_chunks: u32,
    /// Confirmed conntrack (LRU, two per north-south flow): lb_ct_v3.
    #[arg(long, env = "LB_AGENT_MAP_CONNTRACK", default_value_t = lb_common::limits::CONNTRACK, value_parser = parse_map_size)]
    map_conntrack: u32,
    /// Unconfirmed conntrack (LRU, two per flow until confirmed): lb_ct_new_v2.
    #[arg(long, env = "LB_AGENT_MAP_CONNTRACK_NEW", default_value_t = lb_common::limits::CONNTRACK_NEW, value_parser = parse_map_size)]
    map_conntrack_new: u32,
    /// Session affinity records (LRU): lb_affinity_v1.
    #[arg(long, env = "LB_AGENT_MAP_AFFINITY", default_value_t = lb_common::limits::AFFINITY, value_parser = parse_map_size)]
    map_affinity: u32,
    /// Socket rev-NAT (LRU, one per translated socket): lb_sk_revnat_v1.
    #[arg(long, env = "LB_AGENT_MAP_SOCK_REV_NAT", default_value_t = lb_common::limits::SOCK_REV_NAT, value_parser = parse_map_size)]
    map_sock_rev_nat: u32,
    /// UDP socket flow choices (LRU): lb_sk_flow_v1.
    #[arg(long, env = "LB_AGENT_MAP_SOCK_FLOW", default_value_t = lb_common::limits::SOCK_FLOW, value_parser = parse_map_size)]
    map_sock_flow: u32,
    /// Fragmented datagrams in transit (LRU): lb_frag_v1.
    #[arg(long, env = "LB_AGENT_MAP_FRAGMENTS", default_value_t = lb_common::limits::FRAGMENTS, value_parser = parse_map_size)]
    map_fragments: u32,
    /// loadBalancerSourceRanges prefixes (one per Service port and prefix): lb_srcrange_v1.
    #[arg(long, env = "LB_AGENT_MAP_SOURCE_RANGES", default_value_t = lb_common::limits::SOURCE_RANGES, value_parser = parse_map_size)]
    map_source_ranges: u32,
}

impl MapSizeArgs {
    fn sizes(&self) -> MapSizes {
        MapSizes {
            frontend_slots: self.map_frontend_slots,
            backends: self.map_backends,
            rev_nat: self.map_rev_nat,
            service_ports: self.map_service_ports,
            maglev_chunks: self.map_maglev_chunks,
            conntrack: self.map_conntrack,
            conntrack_new: self.map_conntrack_new,
            affinity: self.map_affinity,
            sock_rev_nat: self.map_sock_rev_nat,
            sock_flow: self.map_sock_flow,
            fragments: self.map_fragments,
            source_ranges: self.map_source_ranges,
        }
    }
}

fn parse_map_size(s: &str) -> Result<u32, String> {
    let (lo, hi) = SIZE_RANGE;
    let n: u32 = s
        .replace('_', "")
        .parse()
        .map_err(|_| format!("{s:?}: not a number of entries"))?;
    if !(lo..=hi).contains(&n) {
        return Err(format!("{s}: must be between {lo} and {hi} entries"));
    }
    Ok(n)
}

fn main() {
    let cli = Cli::parse();
    // tracing, with `log` records bridged in; RUST_LOG filters (default info).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().init(),
    }
    let result = match cli.command {
        Command::Run {
            node,
            manifests,
            kubeconfig,
            cgroup,
            bpffs,
            devices,
            north_south,
            poll_interval_ms,
            snat_ports,
            nodeport_range,
            ct_gc_interval,
            terminate_tcp_sockets,
            other_interfaces,
            proc,
            metrics_addr,
            health_addr,
            map_sizes,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone()).expect("signal handler");
            }
            let cfg = agent::config::RunConfig {
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
                ct_gc_interval,
                terminate_tcp_sockets,
                other_interfaces,
                proc,
                metrics_addr,
                health_addr,
                map_sizes: map_sizes.sizes(),
            };
            agent::run(&cfg, stop)
        }
        Command::Render {
            manifests,
            node,
            map_sizes,
        } => render(&manifests, &node, &map_sizes.sizes()),
        Command::Uninstall { bpffs } => agent::attach::uninstall(&bpffs).map(|removed| {
            for p in removed {
                println!("removed {}", p.display());
            }
        }),
    };
    if let Err(e) = result {
        std::process::exit(report_error("lb-agent", &e));
    }
}

fn parse_other_interfaces(s: &str) -> Result<bool, String> {
    match s {
        "tc" => Ok(true),
        "none" => Ok(false),
        _ => Err(format!("`{s}`: expected tc or none")),
    }
}

fn parse_north_south(s: &str) -> Result<agent::hook::NorthSouth, String> {
    s.parse()
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
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
fn parse_duration(s: &str) -> Result<Duration, String> {
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

fn render(manifests: &std::path::Path, node: &str, sizes: &MapSizes) -> anyhow::Result<()> {
    if !manifests.exists() {
        return Err(error::UsageError(format!(
            "--manifests {}: no such file or directory",
            manifests.display()
        ))
        .into());
    }
    let objects = source::read_manifests(manifests)?;
    let m = model::build(&objects, node);
    let mut p = plan::plan(&m, node);
    capacity::fit(&mut p, sizes);
    let text = serde_json::to_string_pretty(&p)?;
    // A reader that stops early (`| head`) is no error.
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    Ok(())
}
