//! Packet-fixture harness: loads the real object into a private pin directory (optionally with
//! stand-ins pinned there in place of some of its maps), programs its maps through the real sync
//! code, and runs the XDP program on frames with BPF_PROG_TEST_RUN.
//! Used by the kernel tests and the benchmarks (it used to ship inside lb-userspace's library).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, MapInfo, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
    Pod,
};
use lb_common::{
    map_name, program_name, AffinityKey, AffinityValue, BenchFrame, Config, Counter, CtEntry,
    CtKey, CtValue, NextHop,
};

use lb_userspace::{
    agent::preflight::mount_point,
    control::desired::Desired,
    dataplane::{pinned::AyaDataplane, read::read_counters, sync::Syncer},
};

/// Collects the kernel's aya-log records (level, text).
#[derive(Clone, Default)]
pub struct LogCapture(pub std::sync::Arc<std::sync::Mutex<Vec<(log::Level, String)>>>);

impl log::Log for LogCapture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        self.0
            .lock()
            .expect("log capture")
            .push((r.level(), r.args().to_string()));
    }
    fn flush(&self) {}
}

/// A map created and pinned under the name of one of the object's maps before the object is
/// loaded: the loader takes a map pinned under a map's name as it is, so the programs run on the
/// stand-in instead of the map the object declares. It stages what the real map cannot be made
/// to do within one BPF_PROG_TEST_RUN: e.g. the conntrack tiers are LRU maps, which refuse an
/// insert only when they find no entry to evict on any CPU or a bucket is busy, while a plain
/// hash map that is full refuses every new key (the helper returns an error, as a refusing LRU's
/// does).
pub struct StandIn {
    /// The object's map it stands in for.
    pub name: &'static str,
    make: MakeStandIn,
}

/// Creates a stand-in, fills it (checking it holds what it should), pins it at the path and
/// returns its id.
type MakeStandIn = Box<dyn Fn(&Path) -> Result<u32>>;

impl StandIn {
    /// A plain hash map (`BPF_MAP_TYPE_HASH`) of `K` -> `V` holding exactly `entries` and no
    /// room for more, which refuses every new key: checked by inserting `probe` (a key not among
    /// `entries`), which must fail.
    pub fn full_hash<K: Pod, V: Pod>(
        name: &'static str,
        entries: Vec<(K, V)>,
        probe: (K, V),
    ) -> Self {
        let make = move |path: &Path| -> Result<u32> {
            let mut m = HashMap::<MapData, K, V>::create(entries.len() as u32, 0)
                .with_context(|| format!("creating the stand-in for {name}"))?;
            for (k, v) in &entries {
                m.insert(k, v, 0)
                    .with_context(|| format!("stand-in for {name}: filling"))?;
            }
            let held = m.keys().collect::<Result<Vec<_>, _>>()?.len();
            ensure!(
                held == entries.len(),
                "stand-in for {name}: {held} entries after inserting {}",
                entries.len()
            );
            let (k, v) = &probe;
            ensure!(
                m.insert(k, v, 0).is_err(),
                "stand-in for {name}: a new key was accepted; the stand-in is not full"
            );
            m.pin(path)
                .with_context(|| format!("pinning the stand-in for {name}"))?;
            Ok(MapInfo::from_pin(path)?.id())
        };
        Self {
            name,
            make: Box::new(make),
        }
    }
}

pub struct XdpHarness {
    ebpf: aya::Ebpf,
    logger: aya_log::EbpfLogger<LogCapture>,
    logs: LogCapture,
    dir: PathBuf,
    pub syncer: Syncer<AyaDataplane>,
}

/// Conntrack entries of one tier, as read from its map.
pub type CtEntries = Vec<(CtKey, CtEntry)>;

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    pub verdict: u32,
    pub output: Vec<u8>,
    pub duration_ns: u64,
}

impl XdpHarness {
    pub fn new() -> Result<Self> {
        Self::with_map_sizes(&[])
    }

    /// Like `new`, with some maps given another capacity (to test behaviour under pressure).
    pub fn with_map_sizes(sizes: &[(&str, u32)]) -> Result<Self> {
        Self::with_stand_ins(sizes, &[])
    }

    /// Like `with_map_sizes`, with some of the object's maps replaced by [`StandIn`]s, pinned
    /// before the object is loaded. Checks that the loaded object uses each stand-in.
    pub fn with_stand_ins(sizes: &[(&str, u32)], stand_ins: &[StandIn]) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let bpffs = mount_point("bpf")
            .ok_or_else(|| anyhow!("no bpf filesystem mounted (mount -t bpf bpf /sys/fs/bpf)"))?;
        let dir = bpffs.join(format!(
            "lbfix{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Self::load_into(&dir, sizes, stand_ins).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })
    }

    fn load_into(dir: &Path, sizes: &[(&str, u32)], stand_ins: &[StandIn]) -> Result<Self> {
        let dir = dir.to_path_buf();
        let mut ids = Vec::new();
        for s in stand_ins {
            ids.push((s.name, (s.make)(&dir.join(s.name))?));
        }
        let mut loader = aya::EbpfLoader::new();
        loader.default_map_pin_directory(&dir);
        for (name, size) in sizes {
            loader.map_max_entries(name, *size);
        }
        let mut ebpf = loader.load(lb_userspace::EBPF_OBJECT)?;
        let logs = LogCapture::default();
        let logger = aya_log::EbpfLogger::init_with_logger(&mut ebpf, logs.clone())
            .context("aya-log ring buffer")?;
        let xdp: &mut Xdp = ebpf
            .program_mut(program_name::XDP)
            .ok_or_else(|| anyhow!("no XDP program"))?
            .try_into()?;
        xdp.load().context("loading the XDP program (verifier)")?;
        // The IPv6 north-south programs, in the program arrays `lb_xdp` and `lb_tc_ingress`
        // tail-call for IPv6 frames, as the agent puts them there.
        lb_userspace::agent::attach::install_ipv6_north_south(&mut ebpf)?;
        for (name, id) in ids {
            let data = match ebpf.map(name) {
                Some(
                    Map::HashMap(d)
                    | Map::LruHashMap(d)
                    | Map::PerCpuHashMap(d)
                    | Map::PerCpuLruHashMap(d),
                ) => d,
                Some(_) => bail!("stand-in for {name}: the object's map is no hash map"),
                None => bail!("stand-in for {name}: the object has no such map"),
            };
            ensure!(
                data.info()?.id() == id,
                "the loader did not take the stand-in for {name} (is the map pinned by name?)"
            );
        }
        let syncer = Syncer::adopt(AyaDataplane::from_ebpf(&mut ebpf)?)?;
        Ok(Self {
            ebpf,
            logger,
            logs,
            dir,
            syncer,
        })
    }

    /// Programs the maps through the real sync code.
    pub fn program(&mut self, desired: &Desired) -> Result<u64> {
        Ok(self.syncer.sync(desired)?.writes)
    }

    /// Writes the datapath config through the real sync code.
    pub fn set_config(&mut self, config: &Config) -> Result<()> {
        self.syncer.set_config(config)?;
        Ok(())
    }

    /// Writes the IPv6 half of the datapath config through the real sync code.
    pub fn set_config6(&mut self, config: &lb_common::Config6) -> Result<()> {
        self.syncer.set_config6(config)?;
        Ok(())
    }

    /// Every conntrack entry, confirmed and unconfirmed.
    pub fn conntrack_entries(&self) -> Result<CtEntries> {
        let (mut all, new) = self.conntrack_tiers()?;
        all.extend(new);
        Ok(all)
    }

    /// How many instructions the verifier processed to accept the loaded program `name` (its
    /// headroom under the 1,000,000 budget), when the kernel says.
    pub fn verified_instructions(&self, name: &str) -> Result<Option<u32>> {
        let prog = self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("no program {name}"))?;
        Ok(prog.info()?.verified_instruction_count())
    }

    /// The conntrack entries as (established, unconfirmed).
    pub fn conntrack_tiers(&self) -> Result<(CtEntries, CtEntries)> {
        let read = |name: &str| -> Result<CtEntries> {
            let map = self
                .ebpf
                .map(name)
                .ok_or_else(|| anyhow!("no map {name}"))?;
            let ct: HashMap<&MapData, CtKey, CtValue> = HashMap::try_from(map)?;
            Ok(ct
                .iter()
                .map(|kv| kv.map(|(k, v)| (k, v.e)))
                .collect::<Result<Vec<_>, _>>()?)
        };
        Ok((read(map_name::CONNTRACK)?, read(map_name::CONNTRACK_NEW)?))
    }

    /// Every IPv6 conntrack entry, confirmed and unconfirmed (`lb_ct6_v1`, `lb_ct6_new_v1`).
    pub fn conntrack6_entries(&self) -> Result<Vec<(lb_common::CtKey6, lb_common::CtEntry6)>> {
        let mut all = Vec::new();
        for name in [map_name::CONNTRACK6, map_name::CONNTRACK6_NEW] {
            let map = self
                .ebpf
                .map(name)
                .ok_or_else(|| anyhow!("no map {name}"))?;
            let ct: HashMap<&MapData, lb_common::CtKey6, lb_common::CtValue6> =
                HashMap::try_from(map)?;
            for kv in ct.iter() {
                let (k, v) = kv?;
                all.push((k, v.e));
            }
        }
        Ok(all)
    }

    /// Runs `f` on each conntrack tier (established, then new), writable; stops at the first
    /// `Some` it returns.
    fn each_tier<T>(
        &mut self,
        mut f: impl FnMut(&mut HashMap<&mut MapData, CtKey, CtValue>) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        for name in [map_name::CONNTRACK, map_name::CONNTRACK_NEW] {
            let map = self
                .ebpf
                .map_mut(name)
                .ok_or_else(|| anyhow!("no map {name}"))?;
            let mut ct: HashMap<&mut MapData, CtKey, CtValue> = HashMap::try_from(map)?;
            if let Some(out) = f(&mut ct)? {
                return Ok(Some(out));
            }
        }
        Ok(None)
    }

    /// Removes a conntrack entry from both tiers (to stage an eviction).
    pub fn conntrack_remove(&mut self, key: &CtKey) -> Result<()> {
        self.each_tier(|ct| {
            let _ = ct.remove(key);
            Ok(None::<()>)
        })?;
        Ok(())
    }

    /// Removes every conntrack entry of both tiers except those under `keep`; returns how many
    /// it removed.
    pub fn conntrack_clear_except(&mut self, keep: &[CtKey]) -> Result<usize> {
        let mut n = 0;
        self.each_tier(|ct| {
            let keys = ct.keys().collect::<Result<Vec<_>, _>>()?;
            for k in keys.iter().filter(|k| !keep.contains(k)) {
                ct.remove(k)?;
                n += 1;
            }
            Ok(None::<()>)
        })?;
        Ok(n)
    }

    /// Makes every conntrack entry (both tiers) `secs` seconds older, as if the flows had been
    /// idle that much longer (to stage expiry without waiting).
    pub fn conntrack_age(&mut self, secs: u32) -> Result<()> {
        self.each_tier(|ct| {
            let all = ct.iter().collect::<Result<Vec<_>, _>>()?;
            for (k, mut v) in all {
                v.e.last_seen_s = v.e.last_seen_s.wrapping_sub(secs);
                ct.insert(k, v, 0)?;
            }
            Ok(None::<()>)
        })?;
        Ok(())
    }

    /// Inserts a conntrack entry (to stage collisions).
    pub fn conntrack_insert(&mut self, key: &CtKey, entry: &CtEntry) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(map_name::CONNTRACK)
            .ok_or_else(|| anyhow!("no conntrack map"))?;
        let mut ct: HashMap<&mut MapData, CtKey, CtValue> = HashMap::try_from(map)?;
        ct.insert(key, CtValue::new(*entry), 0)?;
        Ok(())
    }

    /// The next hop cached in a conntrack entry (either tier).
    pub fn conntrack_next_hop(&mut self, key: &CtKey) -> Result<Option<NextHop>> {
        self.conntrack_value(key, |v| v.nh)
    }

    /// Rewrites the next hop cached in a conntrack entry (either tier), e.g. to make it older.
    pub fn conntrack_set_next_hop(&mut self, key: &CtKey, nh: NextHop) -> Result<()> {
        self.conntrack_value(key, |v| v.nh = nh)?
            .ok_or_else(|| anyhow!("no conntrack entry for {key:?}"))
    }

    /// Applies `f` to the conntrack value under `key` in whichever tier holds it, writing the
    /// value back; `None` when neither does.
    fn conntrack_value<T>(
        &mut self,
        key: &CtKey,
        f: impl FnOnce(&mut CtValue) -> T,
    ) -> Result<Option<T>> {
        let mut f = Some(f);
        self.each_tier(|ct| {
            let Ok(mut v) = ct.get(key, 0) else {
                return Ok(None);
            };
            let out = f.take().map(|f| f(&mut v));
            ct.insert(key, v, 0)?;
            Ok(out)
        })
    }

    /// The route generation (`map_name::ROUTE_GEN`).
    pub fn route_gen(&self) -> Result<u32> {
        let map = self
            .ebpf
            .map(map_name::ROUTE_GEN)
            .ok_or_else(|| anyhow!("no map {}", map_name::ROUTE_GEN))?;
        let a: aya::maps::Array<&MapData, u32> = aya::maps::Array::try_from(map)?;
        Ok(a.get(&0, 0)?)
    }

    /// Sets the route generation (`map_name::ROUTE_GEN`), as the agent's route monitor does.
    pub fn set_route_gen(&mut self, gen: u32) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(map_name::ROUTE_GEN)
            .ok_or_else(|| anyhow!("no map {}", map_name::ROUTE_GEN))?;
        let mut a: aya::maps::Array<&mut MapData, u32> = aya::maps::Array::try_from(map)?;
        a.set(0, gen, 0)?;
        Ok(())
    }

    /// Every session affinity record.
    pub fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>> {
        let map = self
            .ebpf
            .map(map_name::AFFINITY)
            .ok_or_else(|| anyhow!("no affinity map"))?;
        let m: HashMap<&MapData, AffinityKey, AffinityValue> = HashMap::try_from(map)?;
        Ok(m.iter().collect::<Result<Vec<_>, _>>()?)
    }

    /// Overwrites an affinity record (to age it without waiting).
    pub fn affinity_set(&mut self, key: &AffinityKey, value: &AffinityValue) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(map_name::AFFINITY)
            .ok_or_else(|| anyhow!("no affinity map"))?;
        let mut m: HashMap<&mut MapData, AffinityKey, AffinityValue> = HashMap::try_from(map)?;
        m.insert(key, value, 0)?;
        Ok(())
    }

    /// Runs the XDP program once on `frame`.
    pub fn run(&self, frame: &[u8]) -> Result<RunResult> {
        self.run_repeat(frame, 1)
    }

    /// Runs the program `repeat` times on `frame` (the kernel reports the mean duration).
    pub fn run_repeat(&self, frame: &[u8], repeat: u32) -> Result<RunResult> {
        let xdp: &Xdp = self
            .ebpf
            .program(program_name::XDP)
            .ok_or_else(|| anyhow!("no XDP program"))?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = xdp
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        out.truncate(r.data_size_out as usize);
        Ok(RunResult {
            verdict: r.return_value,
            output: out,
            duration_ns: r.duration.as_nanos() as u64,
        })
    }

    /// Loads another XDP program of the object (`lb_xdp_pass`, the benchmark programs).
    pub fn load_program(&mut self, name: &str) -> Result<()> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("no program {name}"))?
            .try_into()?;
        if p.fd().is_err() {
            p.load()
                .with_context(|| format!("loading {name} (verifier)"))?;
        }
        Ok(())
    }

    /// Sets the frame the benchmark programs restore before each iteration.
    pub fn set_bench_frame(&mut self, frame: &BenchFrame) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(lb_common::BENCH_MAP)
            .ok_or_else(|| anyhow!("no bench map"))?;
        let mut a: Array<&mut MapData, BenchFrame> = Array::try_from(map)?;
        a.set(0, frame, 0)?;
        Ok(())
    }

    /// Runs program `name` (loaded) `repeat` times on `frame`: the kernel's mean ns per run.
    pub fn run_program(&self, name: &str, frame: &[u8], repeat: u32) -> Result<RunResult> {
        self.run_with(name, frame, repeat, None)
    }

    /// Like `run_program`, with an `xdp_md` context (e.g. naming the ingress device).
    pub fn run_program_ctx(
        &self,
        name: &str,
        frame: &[u8],
        repeat: u32,
        ctx: &[u8],
    ) -> Result<RunResult> {
        self.run_with(name, frame, repeat, Some(ctx))
    }

    /// One run of program `name` with an `xdp_md` context.
    pub fn run_ctx(&self, name: &str, frame: &[u8], ctx: &[u8]) -> Result<RunResult> {
        self.run_with(name, frame, 1, Some(ctx))
    }

    fn run_with(
        &self,
        name: &str,
        frame: &[u8],
        repeat: u32,
        ctx: Option<&[u8]>,
    ) -> Result<RunResult> {
        let xdp: &Xdp = self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("no program {name}"))?
            .try_into()?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = xdp
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: ctx,
                repeat,
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        out.truncate(r.data_size_out as usize);
        Ok(RunResult {
            verdict: r.return_value,
            output: out,
            duration_ns: r.duration.as_nanos() as u64,
        })
    }

    /// Every counter, summed over CPUs, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, Counter>> {
        let map = self
            .ebpf
            .map(map_name::STATS)
            .ok_or_else(|| anyhow!("no stats map"))?;
        let arr: PerCpuArray<&MapData, Counter> = PerCpuArray::try_from(map)?;
        Ok(read_counters(&arr)?
            .into_iter()
            .map(|c| {
                (
                    c.name,
                    Counter {
                        packets: c.packets,
                        bytes: c.bytes,
                    },
                )
            })
            .collect())
    }

    /// The kernel's log records since the last call.
    pub fn take_logs(&mut self) -> Vec<(log::Level, String)> {
        self.logger.flush();
        std::mem::take(&mut *self.logs.0.lock().expect("log capture"))
    }

    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for XdpHarness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every key in both conntrack tiers of `t`, as text (sorted: for comparing what a sweep or a
/// flush left).
pub fn ct_keys(t: &lb_userspace::dataplane::ct_gc::CtTiers) -> std::collections::BTreeSet<String> {
    use lb_userspace::dataplane::ct_gc::Tier;
    [Tier::Established, Tier::New]
        .into_iter()
        .flat_map(|tier| t.entries(tier).expect("reading a conntrack tier"))
        .map(|(k, _)| format!("{k:?}"))
        .collect()
}
