//! `lb-agent`: the node daemon (`run`), the plan printer (`render`), the cleaner (`uninstall`),
//! the init container's `prepare-node` and the migration helper `cleanup-kube-proxy`.
use std::{
    io::Write,
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
};

use clap::{parser::ValueSource, CommandFactory, FromArgMatches, Parser, Subcommand};
use lb_userspace::{
    agent,
    agent::config::{MapSizeArgs, RunArgs},
    control::{model, plan, source},
    dataplane::capacity::{self, MapSizes},
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
    Run(RunArgs),
    /// Print the plan (endpoint sets per Service port) for a node as JSON; Service ports that
    /// would not fit in maps of the given sizes are in its `rejected` list.
    Render {
        #[arg(long)]
        manifests: PathBuf,
        #[arg(long)]
        node: String,
        /// As `run --service-proxy-name`: plan only the Services labelled for this proxy name.
        #[arg(long, value_name = "NAME")]
        service_proxy_name: Option<String>,
        /// As `run --nodeport-addresses`.
        #[arg(long, value_delimiter = ',', value_name = "CIDR|primary")]
        nodeport_addresses: Vec<String>,
        #[command(flatten)]
        map_sizes: MapSizeArgs,
    },
    /// Detach the programs: remove the links and maps this project pins under --bpffs (other
    /// pins there stay).
    Uninstall {
        #[arg(long)]
        bpffs: PathBuf,
    },
    /// Set the node's sysctls `run` needs (net.ipv4.conf.all.accept_local=1), so that the agent
    /// itself runs with a read-only /proc/sys: the DaemonSet's init container. Needs a writable
    /// /proc/sys (a privileged container, or root on the node).
    PrepareNode,
    /// Remove kube-proxy's iptables chains (KUBE-SERVICES, KUBE-SVC-*, ..., and the jumps into
    /// them) and its nftables tables (ip/ip6 kube-proxy) from this network namespace, as
    /// `kube-proxy --cleanup` does; prints what it removed. Run it once per node after removing
    /// kube-proxy; running it again removes nothing.
    CleanupKubeProxy,
}

fn main() {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let given = |m: &clap::ArgMatches, id: &str| {
        matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let log_flag = (
        matches!(cli.log_format, LogFormat::Json),
        given(&matches, "log_format"),
    );
    // `run`: its flags, the configuration file and the defaults, merged before anything else
    // (the file may choose the log format).
    let (run, command) = match cli.command {
        Command::Run(args) => {
            let m = matches.subcommand_matches("run").expect("run's matches");
            let print = args.print_config;
            match args.resolve(&|id| given(m, id), log_flag) {
                Err(e) => {
                    eprintln!("lb-agent: error: {e}");
                    std::process::exit(2);
                }
                Ok(cfg) if print => {
                    let text = serde_saphyr::to_string(&agent::config::ConfigFile::from_run(&cfg))
                        .expect("a configuration serializes");
                    print!("{text}");
                    return;
                }
                Ok(cfg) => (Some(cfg), None),
            }
        }
        other => (None, Some(other)),
    };
    let json = run.as_ref().map_or(log_flag.0, |c| c.log_json);
    // tracing, with `log` records bridged in; RUST_LOG filters (default info).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let result = match (run, command) {
        (Some(cfg), _) => {
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone()).expect("signal handler");
            }
            agent::run(&cfg, stop)
        }
        (
            None,
            Some(Command::Render {
                manifests,
                node,
                service_proxy_name,
                nodeport_addresses,
                map_sizes,
            }),
        ) => render_checks(service_proxy_name, &nodeport_addresses)
            .and_then(|checks| Ok((checks, map_sizes.sizes()?)))
            .map_err(|e| error::UsageError(e).into())
            .and_then(|(checks, sizes)| render(&manifests, &node, &checks, &sizes)),
        (None, Some(Command::Uninstall { bpffs })) => {
            agent::attach::uninstall(&bpffs).map(|removed| {
                for p in removed {
                    println!("removed {}", p.display());
                }
            })
        }
        (None, Some(Command::PrepareNode)) => {
            agent::attach::prepare_node(std::path::Path::new(agent::attach::PROC_SYS)).map(|set| {
                for line in &set {
                    println!("set {line}");
                }
                if set.is_empty() {
                    println!("nothing to set: net.ipv4.conf.all.accept_local is 1");
                }
            })
        }
        (None, Some(Command::CleanupKubeProxy)) => agent::kube_proxy::cleanup().map(|report| {
            for line in &report.skipped {
                eprintln!("lb-agent cleanup-kube-proxy: skipped {line}");
            }
            for line in &report.removed {
                println!("removed {line}");
            }
            if report.removed.is_empty() && report.skipped.is_empty() {
                println!("nothing of kube-proxy's found");
            } else if report.removed.is_empty() {
                println!("nothing of kube-proxy's found where it looked (skipped: see above)");
            }
        }),
        (None, Some(Command::Run(_)) | None) => unreachable!("run is resolved above"),
    };
    if let Err(e) = result {
        std::process::exit(report_error("lb-agent", &e));
    }
}

fn render_checks(
    service_proxy_name: Option<String>,
    nodeport_addresses: &[String],
) -> Result<model::Checks, String> {
    Ok(model::Checks {
        service_proxy_name: service_proxy_name.filter(|n| !n.is_empty()),
        node_port_addresses: model::NodePortAddresses::parse(nodeport_addresses)
            .map_err(|e| format!("--nodeport-addresses: {e}"))?,
        ..model::Checks::default()
    })
}

fn render(
    manifests: &std::path::Path,
    node: &str,
    checks: &model::Checks,
    sizes: &MapSizes,
) -> anyhow::Result<()> {
    if !manifests.exists() {
        return Err(error::UsageError(format!(
            "--manifests {}: no such file or directory",
            manifests.display()
        ))
        .into());
    }
    let objects = source::read_manifests(manifests)?;
    let m = model::build_with(&objects, node, checks);
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
