//! `cargo xtask fuzz [TARGET] [--seconds N] [-LIBFUZZER_FLAG=V]... [INPUT]`: the cargo-fuzz
//! targets of `fuzz/` (nightly). Builds them once into `<target dir>/fuzz`, then runs each (or
//! one) for N seconds on its working corpus `fuzz/corpus/<target>` (the committed seeds of
//! `fuzz/seeds/<target>` are copied in first). A finding fails with the input libFuzzer saved
//! under `fuzz/artifacts/<target>/`; giving such a file as INPUT replays it.
//!
//! The full libFuzzer output goes to `<target dir>/fuzz/logs/<target>.log`; the terminal gets
//! everything except the per-input `NEW`/`REDUCE` lines.

use crate::util::{self, display};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: &[&str] = &["manifests", "objects"];
/// `cargo xtask fuzz` without `--seconds`.
pub const ON_DEMAND_SECONDS: u64 = 300;
/// libFuzzer flags every run gets (more can be given on the command line).
const LIBFUZZER_FLAGS: &[&str] = &[
    // Manifests and object lists of a few Services; the seeds are at most 8 KiB.
    "-max_len=16384",
    "-rss_limit_mb=2048",
    // A single input slower than this is a finding (a hang or something quadratic).
    "-timeout=20",
    "-print_final_stats=1",
];

const USAGE: &str =
    "usage: cargo xtask fuzz [TARGET] [--seconds N] [-LIBFUZZER_FLAG=VALUE]... [INPUT]";

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    /// None: every target.
    pub target: Option<String>,
    pub seconds: u64,
    /// `-name=value` arguments for libFuzzer.
    pub libfuzzer: Vec<String>,
    /// A saved input to replay instead of fuzzing.
    pub input: Option<PathBuf>,
}

/// Parses the arguments after `fuzz`; `Err` is a usage message.
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        target: None,
        seconds: ON_DEMAND_SECONDS,
        libfuzzer: Vec::new(),
        input: None,
    };
    let seconds = |v: &str| {
        v.parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("--seconds needs a positive number, not {v:?}"))
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--seconds" {
            o.seconds = seconds(it.next().ok_or("--seconds needs a value")?)?;
        } else if let Some(v) = a.strip_prefix("--seconds=") {
            o.seconds = seconds(v)?;
        } else if a.starts_with('-') && !a.starts_with("--") && a.contains('=') {
            o.libfuzzer.push(a.clone());
        } else if a.starts_with('-') {
            return Err(format!("unknown option {a:?}"));
        } else if TARGETS.contains(&a.as_str()) && o.target.is_none() {
            o.target = Some(a.clone());
        } else if o.input.is_none() && Path::new(a).is_file() {
            o.input = Some(PathBuf::from(a));
        } else {
            return Err(format!(
                "{a:?} is neither a fuzz target ({}) nor an input file",
                TARGETS.join(", ")
            ));
        }
    }
    if o.input.is_some() && o.target.is_none() {
        return Err("replaying an input needs its TARGET".into());
    }
    Ok(o)
}

/// What one run of a target did.
#[derive(Debug)]
pub struct Outcome {
    pub target: String,
    pub seconds: u64,
    /// Inputs executed (libFuzzer's `Done N runs`).
    pub runs: Option<u64>,
    /// The input libFuzzer saved for a finding.
    pub artifact: Option<PathBuf>,
    pub status: ExitStatus,
    pub log: PathBuf,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.status.success() && self.artifact.is_none()
    }

    /// `manifests 20 s (12345 runs)`, or what failed and where the input is.
    pub fn describe(&self) -> String {
        let runs = self
            .runs
            .map_or_else(|| "? runs".to_string(), |n| format!("{n} runs"));
        if self.passed() {
            return format!("{} {} s ({runs})", self.target, self.seconds);
        }
        match &self.artifact {
            Some(a) => format!("{} FAILED after {runs}: input {}", self.target, a.display()),
            None => format!(
                "{} FAILED ({}; log {})",
                self.target,
                self.status,
                self.log.display()
            ),
        }
    }
}

/// `fuzz: manifests 20 s (12345 runs), objects 20 s (23456 runs)`.
pub fn summary(outcomes: &[Outcome]) -> String {
    let parts: Vec<String> = outcomes.iter().map(Outcome::describe).collect();
    format!("fuzz: {}", parts.join(", "))
}

/// What a libFuzzer output line tells: the number of runs, or where a finding was saved.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Done {
        runs: u64,
    },
    Artifact(PathBuf),
    /// `#123\tNEW ...` / `REDUCE`: kept in the log only.
    Progress,
    Other,
}

pub fn classify(line: &str) -> Line {
    let line = line.trim_end();
    if let Some(rest) = line.strip_prefix("Done ") {
        // `Done 27646 runs in 61 second(s)`
        if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
            return Line::Done { runs: n };
        }
    }
    // `artifact_prefix='…/'; Test unit written to /work/main/fuzz/artifacts/manifests/crash-55b4`
    if let Some(i) = line.find("Test unit written to ") {
        return Line::Artifact(PathBuf::from(
            line[i + "Test unit written to ".len()..].trim(),
        ));
    }
    if let Some(rest) = line.strip_prefix('#') {
        let mut f = rest.split_whitespace();
        if f.next()
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()))
            && matches!(f.next(), Some("NEW" | "REDUCE"))
        {
            return Line::Progress;
        }
    }
    Line::Other
}

pub fn fuzz_dir() -> PathBuf {
    util::workspace_root().join("fuzz")
}

/// `<workspace target dir>/fuzz`: the sanitizer builds never mix with the normal ones.
fn fuzz_target_dir() -> Result<PathBuf> {
    Ok(util::target_dir()?.join("fuzz"))
}

/// `cargo +nightly fuzz <sub> --target-dir <dir>`, from `fuzz/`. Through the rustup proxy on
/// PATH (not `$CARGO`, the stable cargo that runs xtask), so `+nightly` selects the toolchain.
fn cargo_fuzz(sub: &str, target_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz", sub, "--target-dir"])
        .arg(target_dir);
    cmd.current_dir(fuzz_dir());
    // Set by the `cargo run` that started xtask. Build scripts that watch them (ring watches
    // CARGO_PKG_NAME, ...) would rebuild whenever the fuzz targets are built by hand instead.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if is_cargo_run_env(key) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Variables `cargo run` sets for the program it runs (and rustup's toolchain choice).
fn is_cargo_run_env(key: &str) -> bool {
    matches!(
        key,
        "CARGO"
            | "CARGO_CRATE_NAME"
            | "CARGO_BIN_NAME"
            | "CARGO_PRIMARY_PACKAGE"
            | "RUSTUP_TOOLCHAIN"
    ) || key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_MANIFEST_")
}

/// Builds every target (sanitizer build; the first one takes minutes).
pub fn build() -> Result<()> {
    let dir = fuzz_target_dir()?;
    util::run(&mut cargo_fuzz("build", &dir)).context("building the fuzz targets")
}

/// Copies the committed seeds of `target` into its working corpus (new or changed files only).
fn seed_corpus(target: &str) -> Result<PathBuf> {
    let corpus = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let seeds = fuzz_dir().join("seeds").join(target);
    for entry in
        std::fs::read_dir(&seeds).with_context(|| format!("reading {}", seeds.display()))?
    {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        let dst = corpus.join(format!(
            "seed-{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        if std::fs::read(&dst).ok().as_deref() != Some(&bytes[..]) {
            std::fs::write(&dst, &bytes).with_context(|| format!("writing {}", dst.display()))?;
        }
    }
    Ok(corpus)
}

/// Runs `target` for `seconds` on its corpus (or replays `input`), after [`build`].
pub fn run_target(
    target: &str,
    seconds: u64,
    extra: &[String],
    input: Option<&Path>,
) -> Result<Outcome> {
    let dir = fuzz_target_dir()?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{target}.log"));
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;

    let mut cmd = cargo_fuzz("run", &dir);
    cmd.arg(target);
    match input {
        Some(file) => {
            cmd.arg(std::fs::canonicalize(file).with_context(|| format!("{}", file.display()))?);
        }
        None => {
            cmd.arg(seed_corpus(target)?);
        }
    }
    cmd.arg("--").args(LIBFUZZER_FLAGS);
    let dict = fuzz_dir().join("dicts").join(format!("{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    if input.is_none() {
        cmd.arg(format!("-max_total_time={seconds}"));
    }
    cmd.args(extra);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("+ {}", display(&cmd));
    writeln!(log, "+ {}", display(&cmd))?;
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", display(&cmd)))?;

    // stdout (cargo-fuzz's report) and stderr (cargo, libFuzzer) into one stream of lines.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ]
    .into_iter()
    .map(|r| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).split(b'\n').map_while(Result::ok) {
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);
    let (mut runs, mut artifact) = (None, None);
    for line in rx {
        let _ = writeln!(log, "{line}");
        match classify(&line) {
            Line::Done { runs: n } => runs = Some(n),
            Line::Artifact(p) => artifact = Some(p),
            Line::Progress => continue,
            Line::Other => {}
        }
        eprintln!("{line}");
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    Ok(Outcome {
        target: target.into(),
        seconds,
        runs,
        artifact,
        status,
        log: log_path,
    })
}

/// Builds, then runs each of `targets` for `seconds`. Every target runs even after a finding.
pub fn run_all(targets: &[&str], seconds: u64, extra: &[String]) -> Result<Vec<Outcome>> {
    let manifest = fuzz_dir().join("Cargo.toml");
    check_targets_match(
        &std::fs::read_to_string(&manifest)
            .with_context(|| format!("reading {}", manifest.display()))?,
    )?;
    ensure_cargo_fuzz()?;
    build()?;
    targets
        .iter()
        .map(|t| run_target(t, seconds, extra, None))
        .collect()
}

fn ensure_cargo_fuzz() -> Result<()> {
    if !crate::setup::cargo_fuzz_installed() {
        println!("xtask: cargo-fuzz is not installed; installing it");
        crate::setup::cargo_fuzz()?;
    }
    Ok(())
}

/// `cargo xtask fuzz ...`; returns the exit code.
pub fn fuzz(args: &[String]) -> Result<i32> {
    let o = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("xtask fuzz: {e}\n{USAGE}\ntargets: {}", TARGETS.join(", "));
            return Ok(2);
        }
    };
    if let Some(input) = &o.input {
        ensure_cargo_fuzz()?;
        build()?;
        let target = o.target.as_deref().expect("checked by parse_args");
        let out = run_target(target, 0, &o.libfuzzer, Some(input))?;
        if out.status.success() {
            println!(
                "xtask fuzz: {target} runs {} without a finding",
                input.display()
            );
            return Ok(0);
        }
        println!(
            "xtask fuzz: {target} fails on {} (log {})",
            input.display(),
            out.log.display()
        );
        return Ok(util::exit_code(out.status).max(1));
    }
    let targets: Vec<&str> = match &o.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    let outcomes = run_all(&targets, o.seconds, &o.libfuzzer)?;
    println!("xtask {}", summary(&outcomes));
    if outcomes.iter().all(Outcome::passed) {
        return Ok(0);
    }
    let dir = fuzz_target_dir()?;
    for out in outcomes.iter().filter(|o| !o.passed()) {
        if let Some(a) = &out.artifact {
            println!(
                "xtask fuzz: replay with `cargo xtask fuzz {t} {a}`; minimize with \
                 `cd fuzz && cargo +nightly fuzz tmin --target-dir {d} {t} {a}`",
                t = out.target,
                a = a.display(),
                d = dir.display(),
            );
        }
    }
    Ok(1)
}

/// Seconds per target for `cargo xtask test`: `LB_FUZZ_SECONDS`, else `default`; 0 skips.
pub fn test_seconds(env: Option<&str>, default: u64) -> Result<u64> {
    match env.map(str::trim) {
        None | Some("") => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("LB_FUZZ_SECONDS must be a number of seconds, not {v:?}")),
    }
}

/// Fails unless every target of `fuzz/Cargo.toml` is in [`TARGETS`] and vice versa.
pub fn check_targets_match(cargo_toml: &str) -> Result<()> {
    let mut names: Vec<&str> = cargo_toml
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "lb-fuzz")
        .collect();
    names.sort_unstable();
    let mut want = TARGETS.to_vec();
    want.sort_unstable();
    if names != want {
        bail!("fuzz/Cargo.toml has targets {names:?}, xtask knows {want:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn args() {
        let o = parse_args(&[]).unwrap();
        assert_eq!(
            (o.target, o.seconds, o.input),
            (None, ON_DEMAND_SECONDS, None)
        );
        let o = parse_args(&s(&["objects", "--seconds", "60", "-jobs=2"])).unwrap();
        assert_eq!(o.target.as_deref(), Some("objects"));
        assert_eq!(o.seconds, 60);
        assert_eq!(o.libfuzzer, s(&["-jobs=2"]));
        assert_eq!(
            parse_args(&s(&["--seconds=5", "manifests"]))
                .unwrap()
                .seconds,
            5
        );
        // Replay: an existing file after the target.
        let me = concat!(env!("CARGO_MANIFEST_DIR"), "/src/fuzz.rs");
        let o = parse_args(&s(&["manifests", me])).unwrap();
        assert_eq!(o.input.as_deref(), Some(Path::new(me)));
        assert!(parse_args(&s(&[me])).is_err(), "an input needs its target");
        for bad in [
            &["nope"][..],
            &["--seconds"],
            &["--seconds", "0"],
            &["--seconds=x"],
            &["--jobs=2"],
            &["-x"],
        ] {
            assert!(parse_args(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn libfuzzer_lines() {
        assert_eq!(
            classify("Done 27646 runs in 61 second(s)\n"),
            Line::Done { runs: 27646 }
        );
        assert_eq!(
            classify("artifact_prefix='/w/fuzz/artifacts/manifests/'; Test unit written to /w/fuzz/artifacts/manifests/crash-55b4"),
            Line::Artifact(PathBuf::from("/w/fuzz/artifacts/manifests/crash-55b4"))
        );
        assert_eq!(
            classify("#1024\tNEW    cov: 6794 ft: 29272 corp: 1063/3552Kb"),
            Line::Progress
        );
        assert_eq!(classify("#52\tREDUCE cov: 1 ft: 2"), Line::Progress);
        assert_eq!(classify("#65536\tpulse  cov: 6794 ft: 29272"), Line::Other);
        assert_eq!(classify("#27646\tDONE   cov: 6794"), Line::Other);
        assert_eq!(classify("Done"), Line::Other);
    }

    #[test]
    fn summary_lines() {
        use std::os::unix::process::ExitStatusExt;
        let out = |t: &str, runs, artifact: Option<&str>, code| Outcome {
            target: t.into(),
            seconds: 20,
            runs,
            artifact: artifact.map(PathBuf::from),
            status: ExitStatus::from_raw(code << 8),
            log: PathBuf::from(format!("/t/fuzz/logs/{t}.log")),
        };
        let ok = [
            out("manifests", Some(12345), None, 0),
            out("objects", Some(7), None, 0),
        ];
        assert_eq!(
            summary(&ok),
            "fuzz: manifests 20 s (12345 runs), objects 20 s (7 runs)"
        );
        let bad = [
            out(
                "manifests",
                Some(9),
                Some("fuzz/artifacts/manifests/crash-1"),
                77,
            ),
            out("objects", None, None, 1),
        ];
        assert!(!bad[0].passed() && !bad[1].passed());
        assert_eq!(
            summary(&bad),
            "fuzz: manifests FAILED after 9 runs: input fuzz/artifacts/manifests/crash-1, objects FAILED (exit status: 1; log /t/fuzz/logs/objects.log)"
        );
    }

    #[test]
    fn cargo_run_env_is_dropped() {
        for k in [
            "CARGO",
            "CARGO_PKG_NAME",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "RUSTUP_TOOLCHAIN",
        ] {
            assert!(is_cargo_run_env(k), "{k}");
        }
        for k in [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_NET_OFFLINE",
            "RUSTFLAGS",
            "PATH",
        ] {
            assert!(!is_cargo_run_env(k), "{k}");
        }
    }

    #[test]
    fn seconds_from_env() {
        assert_eq!(test_seconds(None, 20).unwrap(), 20);
        assert_eq!(test_seconds(Some(""), 20).unwrap(), 20);
        assert_eq!(test_seconds(Some("0"), 20).unwrap(), 0);
        assert_eq!(test_seconds(Some(" 300 "), 20).unwrap(), 300);
        assert!(test_seconds(Some("1m"), 20).is_err());
    }

    #[test]
    fn targets_are_those_of_the_fuzz_crate() {
        let toml = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        check_targets_match(&toml).unwrap();
        for t in TARGETS {
            assert!(
                fuzz_dir()
                    .join("fuzz_targets")
                    .join(format!("{t}.rs"))
                    .is_file(),
                "{t}"
            );
            assert!(fuzz_dir().join("seeds").join(t).is_dir(), "seeds of {t}");
        }
    }
}
