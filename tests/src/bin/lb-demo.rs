//! `cargo xtask demo`: builds the reference lab, runs one agent per node on the example manifests
//! (embedded: deploy/examples/lab.yaml, or `--manifests PATH`), sends real traffic to every
//! frontend the plan lists, prints which backend served how many requests, and tears down.
//! The lab is the plain variant of shared/LAB.md (nothing on the fabric side of the nodes' veths,
//! as on kind: the agents pick tc ingress) unless `--variant xdp`.
//!
//! lb-demo [--manifests PATH] [--requests N] [--variant plain|xdp]
use std::{collections::BTreeMap, path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use lb_tests::lab::{bin_path, Lab, Variant};

const EMBEDDED: &str = include_str!("../../../deploy/examples/lab.yaml");

fn main() {
    if let Err(e) = run() {
        eprintln!("lb-demo: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut manifests: Option<PathBuf> = None;
    let mut requests = 100u32;
    let mut variant = Variant::Plain;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--manifests" => manifests = Some(args.next().context("--manifests PATH")?.into()),
            "--requests" => requests = args.next().context("--requests N")?.parse()?,
            "--variant" => {
                variant = match args.next().as_deref() {
                    Some("plain") => Variant::Plain,
                    Some("xdp") => Variant::Xdp,
                    _ => bail!("--variant plain|xdp"),
                }
            }
            other => {
                bail!("unknown argument {other} (usage: lb-demo [--manifests PATH] [--requests N] [--variant plain|xdp])")
            }
        }
    }
    if lb_tests::require_privileges().is_none() {
        bail!("the demo needs root with BPF (run `cargo xtask setup`)");
    }
    let agent = bin_path("lb-agent")?;
    println!(
        "building the lab (2 nodes, 4 pods, 1 external client; {} variant)...",
        variant.name()
    );
    let lab = Lab::new_variant(variant)?;
    let path = lab.tmpdir().join("manifests.yaml");
    match &manifests {
        Some(p) => std::fs::copy(p, &path)
            .map(|_| ())
            .with_context(|| format!("reading {}", p.display()))?,
        None => std::fs::write(&path, EMBEDDED)?,
    }
    let mut agents = Vec::new();
    for node in ["node1", "node2"] {
        let mut a = lab.spawn_agent(node, &agent, &path, &[])?;
        a.wait_for_log("sync generation 1:", Duration::from_secs(30))?;
        let hook = a
            .log()
            .lines()
            .find_map(|l| {
                l.split_once("north-south hook ")
                    .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_else(|| "?".into());
        println!("agent on {node}: programmed (north-south hook on eth0: {hook})");
        agents.push(a);
    }
    let plan = Command::new(&agent)
        .args(["render", "--node", "node1", "--manifests"])
        .arg(&path)
        .output()?;
    if !plan.status.success() {
        bail!("render failed: {}", String::from_utf8_lossy(&plan.stderr));
    }
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout)?;

    println!();
    println!("{requests} requests per frontend, each on a new connection (TCP) or socket (UDP):");
    println!();
    let header = [
        "SERVICE", "PORT", "FAMILY", "KIND", "FRONTEND", "FROM", "BACKEND", "REQUESTS",
    ];
    let mut rows: Vec<Vec<String>> = Vec::new();
    for svc in plan["services"].as_array().into_iter().flatten() {
        let name = format!(
            "{}/{}",
            svc["namespace"].as_str().unwrap_or(""),
            svc["name"].as_str().unwrap_or("")
        );
        let port = format!(
            "{}/{}",
            svc["port_name"].as_str().unwrap_or(""),
            svc["protocol"].as_str().unwrap_or("")
        );
        let family = svc["family"].as_str().unwrap_or("IPv4").to_string();
        let proto = if svc["protocol"] == "UDP" {
            "udp"
        } else {
            "tcp"
        };
        for fe in svc["frontends"].as_array().into_iter().flatten() {
            let kind = fe["kind"].as_str().unwrap_or("");
            let addr = fe["address"].as_str().unwrap_or("");
            // ClusterIPs from a pod on node1 (socket-level path); north-south frontends from the
            // external client, routed through node1.
            let from = if kind == "ClusterIP" {
                "pod a1"
            } else {
                "client"
            };
            if kind != "ClusterIP" && family == "IPv6" {
                // The north-south path does not serve IPv6 yet (issue 17): said, not sent.
                rows.push(vec![
                    name.clone(),
                    port.clone(),
                    family.clone(),
                    kind.into(),
                    addr.into(),
                    "client".into(),
                    "(IPv6 from outside the node: not served yet)".into(),
                    "-".into(),
                ]);
                continue;
            }
            if kind != "ClusterIP" {
                let ip = addr.split(':').next().unwrap_or("");
                lab.client_route(&format!("{ip}/32"), "node1")?;
            }
            let at = if kind == "ClusterIP" { "a1" } else { "client" };
            let ex = lab.run_client(
                at,
                &[
                    proto,
                    addr,
                    "--count",
                    &requests.to_string(),
                    "--timeout-ms",
                    "1000",
                ],
            )?;
            let mut served: BTreeMap<String, usize> = BTreeMap::new();
            for e in &ex {
                let key = match (&e.backend, &e.error) {
                    (Some(b), _) => b.clone(),
                    (None, Some(err)) => format!("failed: {}", err.split(':').next().unwrap_or("")),
                    _ => "failed".into(),
                };
                *served.entry(key).or_default() += 1;
            }
            for (backend, n) in served {
                rows.push(vec![
                    name.clone(),
                    port.clone(),
                    family.clone(),
                    kind.into(),
                    addr.into(),
                    from.into(),
                    backend,
                    n.to_string(),
                ]);
            }
        }
    }
    print_table(&header, &rows);
    for (node, a) in ["node1", "node2"].iter().zip(&agents) {
        let log = a.log();
        let writes: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("sync generation"))
            .collect();
        println!(
            "\n{node} agent: {}",
            writes.last().map(|l| l.trim()).unwrap_or("no sync logged")
        );
    }
    drop(agents);
    drop(lab);
    println!("\nlab torn down");
    Ok(())
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
