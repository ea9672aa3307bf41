//! `lbctl`: reads the maps pinned by an agent (works while the agent is down).
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{inspect, report_error};

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Inspect the live load-balancer maps")]
struct Cli {
    /// The agent's --bpffs directory.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Frontends with their backends, in slot order.
    Services {
        /// Only this frontend (IP:PORT).
        #[arg(long)]
        frontend: Option<String>,
    },
    /// Backends by id.
    Backends,
    /// Datapath counters, summed over CPUs.
    Stats,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        std::process::exit(report_error("lbctl", &e));
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let json = matches!(cli.output, Format::Json);
    match &cli.command {
        Command::Services { frontend } => {
            let mut v = inspect::frontends(&inspect::snapshot(&cli.bpffs)?);
            if let Some(f) = frontend {
                v.retain(|x| &x.frontend == f);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .map(|f| {
                        vec![
                            f.frontend.clone(),
                            f.protocol.into(),
                            f.scope.into(),
                            f.backends.len().to_string(),
                            f.backends.join(","),
                        ]
                    })
                    .collect();
                print!("{}", inspect::table(&["FRONTEND", "PROTO", "SCOPE", "COUNT", "BACKENDS"], &rows));
            }
        }
        Command::Backends => {
            let v = inspect::backends(&inspect::snapshot(&cli.bpffs)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> = v
                    .iter()
                    .map(|b| vec![b.id.to_string(), b.address.clone(), b.protocol.into(), format!("{:#x}", b.flags)])
                    .collect();
                print!("{}", inspect::table(&["ID", "ADDRESS", "PROTO", "FLAGS"], &rows));
            }
        }
        Command::Stats => {
            let v = inspect::stats(&cli.bpffs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<Vec<String>> =
                    v.iter().map(|c| vec![c.name.into(), c.packets.to_string(), c.bytes.to_string()]).collect();
                print!("{}", inspect::table(&["COUNTER", "PACKETS", "BYTES"], &rows));
            }
        }
    }
    Ok(())
}
