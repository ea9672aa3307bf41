//! Control plane and memory: programming N Services of E endpoints into real BPF maps (loaded
//! into a private pin directory), applying one endpoint change, the kernel's memory for each
//! map, and the agent's resident memory when it runs with those Services.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use lb_userspace::{
    control::{model, source::Objects},
    dataplane::{capacity::MapSizes, cycle::ControlPlane},
};
use serde::Serialize;

use super::gen;
use crate::harness::XdpHarness;

const NODE: &str = "bench-node";

/// The benchmark cluster: a Node, `n - 1` ClusterIP fillers and one NodePort Service, each with
/// `e` endpoints on another node.
pub fn cluster_manifests(n: usize, e: usize) -> String {
    let mut services = gen::filler(n.saturating_sub(1), e, "other-node");
    let mut web = gen::filler(1, e, "other-node").remove(0);
    web.name = "web".into();
    web.cluster_ip = "10.96.0.80".parse().expect("address");
    web.node_port = Some(30080);
    web.endpoints = (0..e)
        .map(|i| {
            (
                format!("10.251.0.{}", i + 1).parse().expect("address"),
                "other-node".to_string(),
            )
        })
        .collect();
    services.push(web);
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\nstatus:\n  addresses: [{{type: InternalIP, address: 192.168.100.1}}]\n{}",
        gen::to_manifests(&services)
    )
}

/// The benchmark's snapshot, as the Kubernetes source hands it over: every object with a uid
/// and a resourceVersion, bumped on each change ([`bump`]).
fn objects(text: &str) -> Result<Objects> {
    let mut o = Objects::default();
    lb_userspace::control::source::parse_into(Path::new("bench.yaml"), text, &mut o)?;
    let stamp = |m: &mut ObjectMeta, kind: &str| {
        m.uid = Some(format!(
            "{kind}/{}/{}",
            m.namespace.as_deref().unwrap_or(""),
            m.name.as_deref().unwrap_or("")
        ));
        m.resource_version = Some("1".into());
    };
    o.services
        .iter_mut()
        .for_each(|s| stamp(&mut s.metadata, "svc"));
    o.endpoint_slices
        .iter_mut()
        .for_each(|s| stamp(&mut s.metadata, "slice"));
    o.nodes
        .iter_mut()
        .for_each(|n| stamp(&mut n.metadata, "node"));
    o.versioned = true;
    Ok(o)
}

/// A changed object's next resourceVersion, as the API server gives it.
fn bump(m: &mut ObjectMeta) {
    let v: u64 = m
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    m.resource_version = Some((v + 1).to_string());
}

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub what: &'static str,
    /// Model + plan + sync, as the agent runs it per generation (median).
    pub cycle_ms: f64,
    /// The sync alone: diff and map writes (median).
    pub sync_ms: f64,
    /// Map writes (the same every repetition).
    pub writes: u64,
    /// Services whose model was rebuilt per change (the most of any repetition).
    pub services_recomputed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MapMemory {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
    /// The kernel's own figure (`memlock` in /proc/self/fdinfo, as the agent's
    /// `lb_map_memory_bytes` reads it: `dataplane::read::kernel_map_info`).
    pub kernel_bytes: u64,
}

/// Programming and changes at one cluster size.
#[derive(Debug, Clone, Serialize)]
pub struct ScalePoint {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub parse_ms: f64,
    pub program_from_scratch_ms: f64,
    pub program_from_scratch_writes: u64,
    pub changes: Vec<Change>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlBench {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Parse the manifests (the manifests source only; the Kubernetes source gets objects).
    pub parse_ms: f64,
    /// Model + plan + sync from empty maps.
    pub program_from_scratch_ms: f64,
    pub program_from_scratch_writes: u64,
    pub changes: Vec<Change>,
    /// Target: one endpoint change in under 5 ms with a number of writes that does not grow with
    /// the cluster.
    pub endpoint_change_target_ms: f64,
    /// Target: the largest cluster programmed from scratch within this many seconds.
    pub program_from_scratch_target_s: f64,
    /// The same measurements at larger clusters (maps sized for them by the size flags).
    pub at_scale: Vec<ScalePoint>,
    pub maps: Vec<MapMemory>,
    /// Kernel memory of every map together.
    pub maps_total_bytes: u64,
    /// Marginal bytes one more ClusterIP Service and one more backend take, from the entries
    /// they add and each map's bytes per entry.
    pub bytes_per_service: f64,
    pub bytes_per_backend: f64,
    /// A NodePort/LoadBalancer Service's Maglev table, extra (bytes per table of M entries).
    pub bytes_per_maglev_table: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Map sizes (as the `--map-*` flags set them) for `n` Services of `e` endpoints: the defaults,
/// or powers of two with room for every frontend slot and backend.
pub fn map_sizes_for(n: usize, e: usize) -> MapSizes {
    let d = MapSizes::default();
    let at_least = |have: u32, need: usize| have.max((need as u32).next_power_of_two());
    MapSizes {
        // A ClusterIP Service port: a master and a slot per backend (the NodePort Service has
        // a few more frontends).
        frontend_slots: at_least(d.frontend_slots, n * (e + 1) + n / 4),
        backends: at_least(d.backends, n * e + e + 16),
        rev_nat: at_least(d.rev_nat, n + 16),
        service_ports: at_least(d.service_ports, n + 16),
        ..d
    }
}

/// One generation as the agent runs it (`ControlPlane::update` and `ControlPlane::sync` on a
/// new snapshot, taken outside the timing as a source hands it over); returns (cycle, sync,
/// writes, Services recomputed).
fn cycle(
    h: &mut XdpHarness,
    cp: &mut ControlPlane,
    o: &Objects,
) -> Result<(Duration, Duration, u64, u64)> {
    let snapshot = o.clone();
    let modelled = cp.memo().work.modelled;
    let t = Instant::now();
    let replaced = cp.update(snapshot);
    if let Some(r) = cp.memo().rejected().next().or(cp.not_fitting().first()) {
        bail!("benchmark objects rejected: {r:?}");
    }
    let s = Instant::now();
    let st = cp.sync(&mut h.syncer)?;
    let (c, sy) = (t.elapsed(), s.elapsed());
    // The replaced snapshot is freed after the timing (the agent frees it off its loop).
    drop(replaced);
    Ok((c, sy, st.writes, cp.memo().work.modelled - modelled))
}

/// Replaces endpoint `which` of the slice of Service `name` with `addr`.
fn replace_endpoint(o: &mut Objects, name: &str, which: usize, addr: &str) {
    let s = o
        .endpoint_slices
        .iter_mut()
        .find(|s| {
            s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .map(String::as_str)
                == Some(name)
        })
        .expect("slice of the Service");
    s.endpoints.as_mut().expect("endpoints")[which].addresses = vec![addr.to_string()];
    bump(&mut s.metadata);
}

/// Programs `n` Services of `e` endpoints from scratch into maps sized for them, then applies
/// endpoint changes, `repeats` times each.
fn measure(n: usize, e: usize, repeats: usize) -> Result<(ScalePoint, XdpHarness, Vec<MapMemory>)> {
    let text = cluster_manifests(n, e);
    let t = Instant::now();
    let mut o = objects(&text)?;
    let parse_ms = ms(t.elapsed());
    drop(text);
    let sizes = map_sizes_for(n, e);
    let mut h = XdpHarness::with_map_sizes(&sizes.per_map())?;
    h.syncer.set_sizes(sizes);
    let empty = map_memory(h.pin_dir())?;
    h.set_config(&lb_common::Config {
        node_addr_be: u32::from_ne_bytes([192, 168, 100, 1]),
        snat_port_min: 32768,
        snat_port_max: 60999,
        ready: 1,
        ..Default::default()
    })?;
    let mut cp = ControlPlane::new(NODE, model::Checks::default(), sizes);
    let (full, _, full_writes, _) = cycle(&mut h, &mut cp, &o)?;

    let mut changes = Vec::new();
    for (what, svc) in [
        (
            "one endpoint of a ClusterIP Service replaced",
            format!("fill-{}", n / 2),
        ),
        (
            "one endpoint of a NodePort Service replaced (its Maglev table is rewritten)",
            "web".to_string(),
        ),
    ] {
        let (mut cycles, mut syncs, mut writes, mut recomputed) = (Vec::new(), Vec::new(), 0, 0);
        for r in 0..repeats {
            replace_endpoint(
                &mut o,
                &svc,
                3,
                &format!("10.252.{}.{}", r / 200, r % 200 + 1),
            );
            let (c, s, w, m) = cycle(&mut h, &mut cp, &o)?;
            cycles.push(ms(c));
            syncs.push(ms(s));
            writes = w;
            recomputed = recomputed.max(m);
        }
        changes.push(Change {
            what,
            cycle_ms: median(cycles),
            sync_ms: median(syncs),
            writes,
            services_recomputed: recomputed,
        });
    }
    // Add and remove one endpoint too.
    {
        let (mut cycles, mut syncs, mut writes, mut recomputed) = (Vec::new(), Vec::new(), 0, 0);
        let svc = format!("fill-{}", n / 3);
        for r in 0..repeats {
            let s = o
                .endpoint_slices
                .iter_mut()
                .find(|s| {
                    s.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(&svc)
                })
                .expect("slice");
            if r % 2 == 0 {
                let eps = s.endpoints.as_mut().expect("endpoints");
                let mut extra = eps[0].clone();
                extra.addresses = vec!["10.253.0.1".into()];
                eps.push(extra);
            } else {
                s.endpoints.as_mut().expect("endpoints").pop();
            }
            bump(&mut s.metadata);
            let (c, sy, w, m) = cycle(&mut h, &mut cp, &o)?;
            cycles.push(ms(c));
            syncs.push(ms(sy));
            writes = writes.max(w);
            recomputed = recomputed.max(m);
        }
        changes.push(Change {
            what: "one endpoint of a ClusterIP Service added or removed (most writes of either)",
            cycle_ms: median(cycles),
            sync_ms: median(syncs),
            writes,
            services_recomputed: recomputed,
        });
    }
    Ok((
        ScalePoint {
            services: n,
            endpoints_per_service: e,
            parse_ms,
            program_from_scratch_ms: ms(full),
            program_from_scratch_writes: full_writes,
            changes,
        },
        h,
        empty,
    ))
}

/// The control-plane benchmark at `n` Services of `e` endpoints (with the maps' memory), and
/// at each of `larger` cluster sizes.
pub fn control_bench(n: usize, e: usize, repeats: usize, larger: &[usize]) -> Result<ControlBench> {
    let (point, h, empty) = measure(n, e, repeats)?;
    let maps = map_memory(h.pin_dir())?;
    let total: u64 = maps.iter().map(|m| m.kernel_bytes).sum();
    let per_entry = |name: &str| -> f64 {
        maps.iter()
            .find(|m| m.map == name)
            .map_or(0.0, |m| m.kernel_bytes as f64 / m.capacity.max(1) as f64)
    };
    use lb_common::map_name as mn;
    // A ClusterIP Service port: one frontend (a master entry), one rev-NAT entry, one name; each
    // backend: a slot, a membership entry and its backend entry.
    let bytes_per_service =
        per_entry(mn::FRONTENDS) + per_entry(mn::REV_NAT) + per_entry(mn::SERVICE_NAMES);
    let bytes_per_backend =
        per_entry(mn::FRONTENDS) + per_entry(mn::MEMBERS) + per_entry(mn::BACKENDS);
    // The Maglev map allocates chunks on use: its growth over the empty map, per chunk, times
    // the chunks of a table for E backends.
    let maglev = maps
        .iter()
        .find(|m| m.map == mn::MAGLEV)
        .expect("maglev map");
    let maglev_empty = empty
        .iter()
        .find(|m| m.map == mn::MAGLEV)
        .expect("maglev map");
    let per_chunk = if maglev.entries > 0 {
        maglev
            .kernel_bytes
            .saturating_sub(maglev_empty.kernel_bytes) as f64
            / maglev.entries as f64
    } else {
        0.0
    };
    let chunks = lb_userspace::dataplane::maglev::table_size(e).div_ceil(lb_common::MAGLEV_CHUNK);
    let bytes_per_maglev_table = per_chunk * chunks as f64;
    drop(h);
    let mut at_scale = Vec::new();
    for big in larger {
        at_scale.push(measure(*big, e, repeats)?.0);
    }
    Ok(ControlBench {
        services: n,
        endpoints_per_service: e,
        parse_ms: point.parse_ms,
        program_from_scratch_ms: point.program_from_scratch_ms,
        program_from_scratch_writes: point.program_from_scratch_writes,
        changes: point.changes,
        endpoint_change_target_ms: 5.0,
        program_from_scratch_target_s: 10.0,
        at_scale,
        maps,
        maps_total_bytes: total,
        bytes_per_service,
        bytes_per_backend,
        bytes_per_maglev_table,
    })
}

/// Entries, capacity and kernel bytes of every map pinned in `dir`.
pub fn map_memory(dir: &Path) -> Result<Vec<MapMemory>> {
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        if path.is_dir() {
            continue;
        }
        let data = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let info = lb_userspace::dataplane::read::kernel_map_info(&data)
            .with_context(|| format!("map {name}"))?;
        let (capacity, kernel_bytes) = (info.max_entries, info.memlock);
        let entries = count_keys(&data)?;
        out.push(MapMemory {
            map: name,
            entries,
            capacity,
            kernel_bytes,
        });
    }
    Ok(out)
}

/// Number of keys (walks the keys with BPF_MAP_GET_NEXT_KEY, whatever the key size).
fn count_keys(data: &aya::maps::MapData) -> Result<u64> {
    use std::os::fd::{AsFd, AsRawFd};
    let info = data.info()?;
    if matches!(
        info.map_type(),
        Ok(aya::maps::MapType::Array | aya::maps::MapType::PerCpuArray)
    ) {
        return Ok(info.max_entries() as u64);
    }
    let ks = info.key_size() as usize;
    let fd = data.fd().as_fd().as_raw_fd();
    let (mut key, mut next) = (vec![0u8; ks], vec![0u8; ks]);
    let mut n = 0u64;
    let mut first = true;
    loop {
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
        let kp = if first { 0u64 } else { key.as_ptr() as u64 };
        attr[8..16].copy_from_slice(&kp.to_ne_bytes());
        attr[16..24].copy_from_slice(&(next.as_mut_ptr() as u64).to_ne_bytes());
        // SAFETY: BPF_MAP_GET_NEXT_KEY (4) with valid key/next buffers of the map's key size.
        let r = unsafe { libc::syscall(libc::SYS_bpf, 4, attr.as_mut_ptr(), attr.len() as u32) };
        if r != 0 {
            break;
        }
        n += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
    Ok(n)
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentMemory {
    pub services: usize,
    pub endpoints_per_service: usize,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
    /// From start to the first sync's log line.
    pub first_sync_s: f64,
    /// The agent's own report of that sync (frontends, writes, time).
    pub first_sync_line: String,
}

/// Runs `lb-agent` (at `agent_bin`) in a private network namespace with a veth device, a cgroup
/// and a pin directory of its own, on `n` Services of `e` endpoints; reads its memory after the
/// first sync, then stops and uninstalls it.
pub fn agent_memory(agent_bin: &Path, n: usize, e: usize) -> Result<AgentMemory> {
    let tag = format!("lbbenchagent{}", std::process::id());
    let tmp = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&tmp)?;
    let manifests = tmp.join("cluster.yaml");
    std::fs::write(&manifests, cluster_manifests(n, e))?;
    let cg_root =
        lb_userspace::agent::preflight::mount_point("cgroup2").context("no cgroup2 mount")?;
    let cgroup = cg_root.join(&tag);
    std::fs::create_dir_all(&cgroup)?;
    let bpffs = lb_userspace::agent::preflight::mount_point("bpf")
        .context("no bpf filesystem")?
        .join(&tag);
    let _ = crate::netns::run("ip", &["netns", "del", &tag]);
    crate::netns::run("ip", &["netns", "add", &tag])?;
    let cleanup = |child: Option<&mut std::process::Child>| {
        if let Some(c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::process::Command::new(agent_bin)
            .args(["uninstall", "--bpffs"])
            .arg(&bpffs)
            .output();
        let _ = crate::netns::run("ip", &["netns", "del", &tag]);
        let _ = std::fs::remove_dir(&cgroup);
        let _ = std::fs::remove_dir_all(&tmp);
    };
    let result = (|| -> Result<AgentMemory> {
        crate::netns::ip(
            &tag,
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
            ],
        )?;
        // The agent serves its metrics and health on loopback by default.
        crate::netns::ip(&tag, &["link", "set", "lo", "up"])?;
        crate::netns::ip(&tag, &["link", "set", "eth0", "up"])?;
        crate::netns::ip(&tag, &["link", "set", "eth1", "up"])?;
        crate::netns::ip(&tag, &["addr", "add", "192.168.100.1/24", "dev", "eth0"])?;
        let start = Instant::now();
        let mut cmd = crate::netns::command_in(&tag, None, agent_bin);
        cmd.args(["run", "--node", NODE, "--manifests"])
            .arg(&manifests)
            .arg("--cgroup")
            .arg(&cgroup)
            .arg("--bpffs")
            .arg(&bpffs)
            .args(["--device", "eth0", "--poll-interval-ms", "200"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().context("starting lb-agent")?;
        let stderr = child.stderr.take().expect("piped");
        let mut line_found = None;
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            if line.contains("sync generation 1:") {
                line_found = Some(line);
                break;
            }
            if start.elapsed() > Duration::from_secs(300) {
                break;
            }
        }
        let first_sync_s = start.elapsed().as_secs_f64();
        let Some(first_sync_line) = line_found else {
            cleanup(Some(&mut child));
            bail!("lb-agent did not report its first sync");
        };
        std::thread::sleep(Duration::from_millis(500));
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        let kib = |k: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let (rss_kib, peak_rss_kib) = (kib("VmRSS:"), kib("VmHWM:"));
        cleanup(Some(&mut child));
        let first_sync_line = first_sync_line
            .split("sync generation 1:")
            .nth(1)
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(AgentMemory {
            services: n,
            endpoints_per_service: e,
            rss_kib,
            peak_rss_kib,
            first_sync_s,
            first_sync_line,
        })
    })();
    if result.is_err() {
        cleanup(None);
    }
    result
}

/// Map memory rows keyed by name (for the report).
pub fn by_name(maps: &[MapMemory]) -> BTreeMap<&str, &MapMemory> {
    maps.iter().map(|m| (m.map.as_str(), m)).collect()
}
