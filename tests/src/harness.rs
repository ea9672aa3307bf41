//! Packet-fixture harness: loads the real object into a private pin directory, programs its maps
//! through the real sync code, and runs the XDP program on frames with BPF_PROG_TEST_RUN.
//! Used by the kernel tests and the benchmarks (it used to ship inside lb-userspace's library).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    map_name, program_name, AffinityKey, AffinityValue, BenchFrame, Config, Counter, CtEntry, CtKey,
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
        static N: AtomicU32 = AtomicU32::new(0);
        let bpffs = mount_point("bpf")
            .ok_or_else(|| anyhow!("no bpf filesystem mounted (mount -t bpf bpf /sys/fs/bpf)"))?;
        let dir = bpffs.join(format!(
            "lbfix{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
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

    /// Every conntrack entry, confirmed and unconfirmed.
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtEntry)>> {
        let (mut all, new) = self.conntrack_tiers()?;
        all.extend(new);
        Ok(all)
    }

    /// The conntrack entries as (established, unconfirmed).
    pub fn conntrack_tiers(&self) -> Result<(CtEntries, CtEntries)> {
        let read = |name: &str| -> Result<CtEntries> {
            let map = self
                .ebpf
                .map(name)
                .ok_or_else(|| anyhow!("no map {name}"))?;
            let ct: HashMap<&MapData, CtKey, CtEntry> = HashMap::try_from(map)?;
            Ok(ct.iter().collect::<Result<Vec<_>, _>>()?)
        };
        Ok((read(map_name::CONNTRACK)?, read(map_name::CONNTRACK_NEW)?))
    }

    /// Removes a conntrack entry from both tiers (to stage an eviction).
    pub fn conntrack_remove(&mut self, key: &CtKey) -> Result<()> {
        for name in [map_name::CONNTRACK, map_name::CONNTRACK_NEW] {
            let map = self
                .ebpf
                .map_mut(name)
                .ok_or_else(|| anyhow!("no map {name}"))?;
            let mut ct: HashMap<&mut MapData, CtKey, CtEntry> = HashMap::try_from(map)?;
            let _ = ct.remove(key);
        }
        Ok(())
    }

    /// Inserts a conntrack entry (to stage collisions).
    pub fn conntrack_insert(&mut self, key: &CtKey, entry: &CtEntry) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(map_name::CONNTRACK)
            .ok_or_else(|| anyhow!("no conntrack map"))?;
        let mut ct: HashMap<&mut MapData, CtKey, CtEntry> = HashMap::try_from(map)?;
        ct.insert(key, entry, 0)?;
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
