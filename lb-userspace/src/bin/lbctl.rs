//! `lbctl`: reads the maps pinned by an agent (works while the agent is down).
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{dataplane::read, inspect, report_error};

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Inspect the live load-balancer maps")]
struct Cli {
    /// The agent's --bpffs directory (in the DaemonSet's pod: /sys/fs/bpf, set by LBCTL_BPFFS).
    #[arg(
        long,
        global = true,
        env = "LBCTL_BPFFS",
        default_value = "/sys/fs/bpf/lb"
    )]
    bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    /// The table with more columns (services: flags, rev-NAT id, affinity; status: every
    /// counter).
    Wide,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// Frontends with their backends, in slot order.
    Services {
        /// Only this frontend (IP:PORT).
        #[arg(long)]
        frontend: Option<String>,
        /// Only this Service (NAMESPACE/NAME) or Service port (NAMESPACE/NAME:PORT).
        #[arg(long)]
        service: Option<String>,
    },
    /// Backends by id.
    Backends,
    /// Datapath counters, summed over CPUs.
    Stats,
    /// North-south connection tracking entries (both directions).
    Conntrack {
        /// Only flows whose original or translated addresses mention this IP[:PORT].
        #[arg(long)]
        filter: Option<String>,
    },
    /// Session affinity records.
    Affinity,
    /// The datapath config (node address, SNAT ports) and each device's north-south hook
    /// (xdp or tc, from the pinned links).
    Config,
    /// The node's load balancer on one screen: agent, health, devices, layout, map fill and
    /// memory, counter rates.
    Status {
        /// Also ask the agent's /healthz here (its --health-addr; `none`: do not).
        #[arg(long, default_value = "127.0.0.1:10256")]
        health_addr: String,
        /// Time between the two counter reads the rates come from, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Prints a shell completion script (e.g. `lbctl completion bash > /etc/bash_completion.d/lbctl`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Which backend a flow has or would get, and why (conntrack, affinity, fresh choice).
    Lookup {
        /// The frontend: IP:PORT/PROTO, e.g. 203.0.113.10:80/TCP or [2001:db8::10]:80/TCP.
        #[arg(long)]
        frontend: String,
        /// The client: IP or IP:PORT, e.g. 2001:db8::1 or [2001:db8::1]:40000, of the
        /// frontend's family (with a port, an existing connection is looked up too).
        #[arg(long)]
        client: String,
    },
}

/// Prints `v` as JSON or YAML when that is the format; false: a table is wanted.
fn structured<T: serde::Serialize + ?Sized>(v: &T, f: Format) -> anyhow::Result<bool> {
    match f {
        Format::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Format::Yaml => print!("{}", serde_saphyr::to_string(&v)?),
        Format::Table | Format::Wide => return Ok(false),
    }
    Ok(true)
}

/// Prints a list of serializable rows as JSON, YAML or an aligned table (columns in key order).
fn print_rows<T: serde::Serialize>(rows: &[T], f: Format) -> anyhow::Result<()> {
    if structured(rows, f)? {
        return Ok(());
    }
    let values: Vec<serde_json::Map<String, serde_json::Value>> = rows
        .iter()
        .map(|r| match serde_json::to_value(r) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => Default::default(),
        })
        .collect();
    let headers: Vec<String> = values
        .first()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let cell = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let table: Vec<Vec<String>> = values
        .iter()
        .map(|m| headers.iter().map(|h| cell(&m[h])).collect())
        .collect();
    let upper: Vec<String> = headers.iter().map(|h| h.to_uppercase()).collect();
    print!(
        "{}",
        inspect::table(
            &upper.iter().map(String::as_str).collect::<Vec<_>>(),
            &table
        )
    );
    Ok(())
}

fn main() {
    // A reader that stops early (`lbctl conntrack | head`) ends lbctl quietly, as it does any
    // command-line tool, instead of a panic on the broken pipe.
    // SAFETY: setting a signal's disposition to the default, before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        std::process::exit(report_error("lbctl", &e));
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let f = cli.output;
    let wide = f == Format::Wide;
    match &cli.command {
        Command::Services { frontend, service } => {
            let mut v = inspect::frontends(&inspect::map_contents(&cli.bpffs)?);
            if let Some(f) = frontend {
                v.retain(|x| &x.frontend == f);
            }
            if let Some(want) = service {
                // NAMESPACE/NAME matches every port; NAMESPACE/NAME:PORT one port name.
                v.retain(|x| {
                    x.service.as_deref().is_some_and(|s| {
                        let s = s
                            .strip_suffix(lb_userspace::control::desired::IPV6_SUFFIX)
                            .unwrap_or(s);
                        let (svc, _proto) = s.rsplit_once('/').unwrap_or((s, ""));
                        svc == want || svc.split_once(':').is_some_and(|(n, _)| n == want)
                    })
                });
            }
            if !structured(&v, f)? {
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .map(|f| {
                        let mut row = vec![
                            f.service.clone().unwrap_or_else(|| "-".into()),
                            f.frontend.clone(),
                            f.protocol.into(),
                            f.scope.into(),
                            f.backends.len().to_string(),
                        ];
                        if wide {
                            row.extend([
                                format!("{:#x}", f.flags),
                                f.rev_nat_id.to_string(),
                                if f.affinity_timeout_s == 0 {
                                    "-".into()
                                } else {
                                    format!("{}s", f.affinity_timeout_s)
                                },
                            ]);
                        }
                        row.push(f.backends.join(","));
                        row
                    })
                    .collect();
                let headers: &[&str] = if wide {
                    &[
                        "SERVICE", "FRONTEND", "PROTO", "SCOPE", "COUNT", "FLAGS", "REV_NAT",
                        "AFFINITY", "BACKENDS",
                    ]
                } else {
                    &["SERVICE", "FRONTEND", "PROTO", "SCOPE", "COUNT", "BACKENDS"]
                };
                print!("{}", inspect::table(headers, &rows));
            }
        }
        Command::Backends => {
            let v = inspect::backends(&inspect::map_contents(&cli.bpffs)?);
            if !structured(&v, f)? {
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .map(|b| {
                        vec![
                            b.id.to_string(),
                            b.address.clone(),
                            b.protocol.into(),
                            format!("{:#x}", b.flags),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    inspect::table(&["ID", "ADDRESS", "PROTO", "FLAGS"], &rows)
                );
            }
        }
        Command::Conntrack { filter } => {
            let mut v = inspect::conntrack(&cli.bpffs)?;
            if let Some(f) = filter {
                v.retain(|c| c.flow.contains(f.as_str()) || c.translated.contains(f.as_str()));
            }
            print_rows(&v, f)?;
        }
        Command::Affinity => print_rows(&inspect::affinity(&cli.bpffs)?, f)?,
        Command::Status {
            health_addr,
            interval_ms,
        } => {
            let health = (health_addr != "none").then_some(health_addr.as_str());
            let st = inspect::status(
                &cli.bpffs,
                health,
                std::time::Duration::from_millis((*interval_ms).clamp(10, 60_000)),
            )?;
            if !structured(&st, f)? {
                print!("{}", st.text(wide));
            }
        }
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(*shell, &mut Cli::command(), "lbctl", &mut std::io::stdout());
        }
        Command::Config => {
            let c = inspect::config(&cli.bpffs)?;
            if matches!(f, Format::Json | Format::Yaml) {
                print_rows(&[c], f)?;
            } else {
                let row = vec![
                    c.node_address.clone(),
                    c.snat_ports.clone(),
                    c.ready.to_string(),
                    c.hooks_text(),
                    if c.interfaces.is_empty() {
                        "-".into()
                    } else {
                        c.interfaces.join(",")
                    },
                    c.pod_cidr.clone().unwrap_or_else(|| "-".into()),
                    c.masquerade_local_backends.to_string(),
                    c.node_address6.clone().unwrap_or_else(|| "-".into()),
                    c.pod_cidr6.clone().unwrap_or_else(|| "-".into()),
                ];
                print!(
                    "{}",
                    inspect::table(
                        &[
                            "NODE_ADDRESS",
                            "SNAT_PORTS",
                            "READY",
                            "HOOKS",
                            "INTERFACES",
                            "POD_CIDR",
                            "MASQ_LOCAL",
                            "NODE_ADDRESS6",
                            "POD_CIDR6"
                        ],
                        &[row]
                    )
                );
            }
        }
        Command::Lookup { frontend, client } => {
            let q = inspect::parse_lookup(frontend, client)?;
            let l = inspect::lookup(&cli.bpffs, q.frontend, q.proto, q.client, q.client_port)?;
            if !structured(&l, f)? {
                println!("frontend:   {} ({} scope)", l.frontend, l.scope);
                println!("reason:     {}", l.reason);
                println!("backend:    {}", l.backend.as_deref().unwrap_or("-"));
                println!("candidates: {}", l.candidates.join(", "));
            }
        }
        Command::Stats => {
            let v = read::stats(&cli.bpffs)?;
            if !structured(&v, f)? {
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .map(|c| vec![c.name.into(), c.packets.to_string(), c.bytes.to_string()])
                    .collect();
                print!(
                    "{}",
                    inspect::table(&["COUNTER", "PACKETS", "BYTES"], &rows)
                );
            }
        }
    }
    Ok(())
}
