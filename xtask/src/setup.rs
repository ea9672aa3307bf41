//! `cargo xtask setup`: installs, idempotently, what a fresh Debian 12 machine lacks. Prints one
//! line per step: `ok: ...` (found) or `installed: ...` (did something).

use crate::util::{self, query, run, which};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// LLVM major that bpf-linker is built against and that the nightly must use.
const LLVM_MAJOR: u32 = 22;
/// bpf-linker series we want (`0.13.x`).
const BPF_LINKER_SERIES: &str = "0.13";

/// Debian packages. LLVM dev + the libraries bpf-linker's link needs, then the lab's tools.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libpolly-22-dev",
    "ethtool",
    "iproute2",
    "iptables",
    "nftables",
];

/// Tools the lab and benchmarks call, checked cheaply on PATH by [`setup_needed`].
const LAB_TOOLS: &[&str] = &["ethtool", "ip", "iptables", "nft"];

const BPFFS_PATH: &str = "/sys/fs/bpf";

/// Cheap checks only (no apt, no network): true when `setup` would have something to do.
/// Returns the reason so callers can say why they run setup.
pub fn setup_needed() -> Option<String> {
    if !bpf_linker_version().is_some_and(|v| is_wanted_bpf_linker(&v)) {
        return Some(format!("bpf-linker {BPF_LINKER_SERIES}.x is not on PATH"));
    }
    if !nightly_has_rust_src() {
        return Some("rust-src is not installed for the nightly toolchain".into());
    }
    if llvm_config().is_none() {
        return Some(format!("llvm-config-{LLVM_MAJOR} is missing"));
    }
    if bpffs_mount().is_none() {
        return Some("no bpf filesystem is mounted".into());
    }
    if let Some(tool) = LAB_TOOLS.iter().find(|t| which(t).is_none()) {
        return Some(format!("`{tool}` is not on PATH"));
    }
    if which("promtool").is_none() {
        return Some("`promtool` is not on PATH".into());
    }
    if !cargo_fuzz_installed() {
        return Some("cargo-fuzz is not installed".into());
    }
    if let Some((toolchain, component)) = missing_lint_component() {
        return Some(format!(
            "{component} is not installed for the {toolchain} toolchain"
        ));
    }
    None
}

pub fn setup() -> Result<()> {
    if util::effective_uid() != Some(0) {
        bail!("setup needs root (it installs packages and mounts bpffs): run it as root, e.g. `sudo -E cargo xtask setup`");
    }
    apt_packages()?;
    promtool()?;
    rust_src()?;
    lint_components()?;
    cargo_fuzz()?;
    bpf_linker()?;
    llvm_versions_match()?;
    bpffs()?;
    cgroup2()?;
    Ok(())
}

// ---- Debian packages ----

fn dpkg_installed(pkg: &str) -> bool {
    query("dpkg-query", &["-W", "--showformat=${Status}", pkg])
        .is_some_and(|s| s.trim() == "install ok installed")
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    let present: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !missing.contains(p))
        .collect();
    if !present.is_empty() {
        println!("ok: debian packages installed: {}", present.join(" "));
    }
    if missing.is_empty() {
        return Ok(());
    }
    run(Command::new("apt-get").arg("update")).context("apt-get update")?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y"])
        .args(&missing))
    .context("apt-get install")?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these packages are still not installed: {}",
            still.join(" ")
        );
    }
    println!("installed: debian packages {}", missing.join(" "));
    Ok(())
}

// ---- promtool (the alert and dashboard tests) ----

/// Where Debian's invoke-rc.d asks whether a package may start its service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Debian's `prometheus` package for its `promtool` (`promtool check rules`, `promtool test
/// rules` in the monitoring tests). The package ships a Prometheus server and an init script;
/// while it installs, a `policy-rc.d` that answers 101 ("action forbidden") keeps the server
/// from starting, unless the machine already has a policy of its own (containers usually do).
fn promtool() -> Result<()> {
    if let Some(path) = which("promtool") {
        println!("ok: promtool at {}", path.display());
        return Ok(());
    }
    let own_policy = !std::path::Path::new(POLICY_RC_D).exists();
    if own_policy {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(POLICY_RC_D, "#!/bin/sh\n# written by cargo xtask setup while it installs prometheus (for promtool)\nexit 101\n")
            .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(POLICY_RC_D, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {POLICY_RC_D}"))?;
    }
    let installed = run(Command::new("apt-get").arg("update"))
        .context("apt-get update")
        .and_then(|()| {
            run(Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "--no-install-recommends", "prometheus"]))
            .context("apt-get install prometheus (for promtool)")
        });
    if own_policy {
        std::fs::remove_file(POLICY_RC_D).with_context(|| format!("removing {POLICY_RC_D}"))?;
    }
    installed?;
    match which("promtool") {
        Some(path) => {
            println!(
                "installed: debian package prometheus (promtool at {})",
                path.display()
            );
            Ok(())
        }
        None => bail!("apt-get installed prometheus but `promtool` is still not on PATH"),
    }
}

// ---- rust-src for nightly ----

fn nightly_installed() -> bool {
    query("rustup", &["toolchain", "list"])
        .is_some_and(|s| s.lines().any(|l| l.starts_with("nightly")))
}

fn nightly_has_rust_src() -> bool {
    has_component("nightly", "rust-src")
}

fn rust_src() -> Result<()> {
    if which("rustup").is_none() {
        bail!("rustup is not on PATH (install it from https://rustup.rs and add ~/.cargo/bin to PATH)");
    }
    if !nightly_installed() {
        bail!(
            "the `nightly` toolchain is not installed; install one whose LLVM major is {LLVM_MAJOR} \
             (check `rustc +nightly -vV`): `rustup toolchain install nightly --profile minimal --component rust-src`"
        );
    }
    if nightly_has_rust_src() {
        println!("ok: rust-src installed for the nightly toolchain");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    if !nightly_has_rust_src() {
        bail!("`rustup component add rust-src --toolchain nightly` succeeded but rust-src is still not listed");
    }
    println!("installed: rust-src for the nightly toolchain");
    Ok(())
}

// ---- rustfmt and clippy (cargo xtask lint) ----

/// What `cargo xtask lint` runs: rustfmt and clippy on the default toolchain, clippy on nightly
/// (the kernel crate is linted for the BPF target).
const LINT_COMPONENTS: &[(&str, &str)] = &[
    ("stable", "rustfmt"),
    ("stable", "clippy"),
    ("nightly", "clippy"),
];

fn has_component(toolchain: &str, component: &str) -> bool {
    query(
        "rustup",
        &["component", "list", "--toolchain", toolchain, "--installed"],
    )
    .is_some_and(|s| {
        s.lines()
            .any(|l| l.trim() == component || l.trim().starts_with(&format!("{component}-")))
    })
}

fn missing_lint_component() -> Option<(&'static str, &'static str)> {
    LINT_COMPONENTS
        .iter()
        .copied()
        .find(|(t, c)| !has_component(t, c))
}

fn lint_components() -> Result<()> {
    for &(toolchain, component) in LINT_COMPONENTS {
        if has_component(toolchain, component) {
            println!("ok: {component} installed for the {toolchain} toolchain");
            continue;
        }
        run(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            toolchain,
        ]))?;
        if !has_component(toolchain, component) {
            bail!("`rustup component add {component} --toolchain {toolchain}` succeeded but {component} is still not listed");
        }
        println!("installed: {component} for the {toolchain} toolchain");
    }
    Ok(())
}

// ---- cargo-fuzz ----

/// `cargo fuzz --version` works (the fuzz targets of fuzz/ run with `cargo +nightly fuzz`).
pub fn cargo_fuzz_installed() -> bool {
    query("cargo", &["fuzz", "--version"]).is_some()
}

/// Installs cargo-fuzz with `cargo install --locked` unless `cargo fuzz --version` works.
pub fn cargo_fuzz() -> Result<()> {
    if let Some(v) = query("cargo", &["fuzz", "--version"]) {
        println!("ok: {}", v.trim());
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).args(["install", "cargo-fuzz", "--locked"]))
        .context("installing cargo-fuzz")?;
    match query("cargo", &["fuzz", "--version"]) {
        Some(v) => {
            println!("installed: {}", v.trim());
            Ok(())
        }
        None => bail!(
            "cargo-fuzz was installed into {} but `cargo fuzz --version` fails; put {} first on PATH",
            cargo_home_bin().display(),
            cargo_home_bin().display()
        ),
    }
}

// ---- bpf-linker ----

/// `bpf-linker --version` output (e.g. `bpf-linker 0.13.0`), None if it is not on PATH or fails.
fn bpf_linker_version() -> Option<String> {
    query("bpf-linker", &["--version"]).map(|s| s.trim().to_string())
}

/// `bpf-linker 0.13.0` -> true; other series or garbage -> false.
pub fn is_wanted_bpf_linker(version_output: &str) -> bool {
    version_output
        .split_whitespace()
        .nth(1)
        .is_some_and(|v| v == BPF_LINKER_SERIES || v.starts_with(&format!("{BPF_LINKER_SERIES}.")))
}

/// llvm-config for LLVM 22: on PATH (Debian puts llvm-config-22 in /usr/bin), else the versioned
/// prefix.
fn llvm_config() -> Option<PathBuf> {
    which(&format!("llvm-config-{LLVM_MAJOR}")).or_else(|| {
        let p = PathBuf::from(format!("/usr/lib/llvm-{LLVM_MAJOR}/bin/llvm-config"));
        p.is_file().then_some(p)
    })
}

fn cargo_home_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn bpf_linker() -> Result<()> {
    let found = bpf_linker_version();
    if let Some(v) = found.as_deref().filter(|v| is_wanted_bpf_linker(v)) {
        let path = which("bpf-linker")
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        println!("ok: {v} ({path})");
        return Ok(());
    }
    // Installed by cargo but not reachable: reinstalling would not help.
    let in_cargo_home = cargo_home_bin().join("bpf-linker");
    if let Some(v) = query(&in_cargo_home, &["--version"]).filter(|v| is_wanted_bpf_linker(v)) {
        bail!(
            "{} is installed at {} but `bpf-linker` on PATH is {}; put {} first on PATH",
            v.trim(),
            in_cargo_home.display(),
            found.as_deref().unwrap_or("missing"),
            cargo_home_bin().display()
        );
    }
    let llvm_config = llvm_config().with_context(|| {
        format!(
            "llvm-config-{LLVM_MAJOR} not found although llvm-{LLVM_MAJOR}-dev should be installed"
        )
    })?;
    let prefix = query(&llvm_config, &["--prefix"])
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .with_context(|| format!("`{} --prefix` failed", llvm_config.display()))?;
    // --locked: build with bpf-linker's own Cargo.lock (verified to work for 0.13.0 + llvm-22).
    // cargo install replaces an installed bpf-linker of another version by itself.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .env("LLVM_PREFIX", &prefix)
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("^{BPF_LINKER_SERIES}"),
        ])
        .args([
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ]))
    .context("installing bpf-linker")?;
    match bpf_linker_version() {
        Some(v) if is_wanted_bpf_linker(&v) => {
            println!("installed: {v} built against LLVM {LLVM_MAJOR} (LLVM_PREFIX={prefix})");
            Ok(())
        }
        other => bail!(
            "bpf-linker was installed into {} but `bpf-linker --version` on PATH gives {}; put {} first on PATH",
            cargo_home_bin().display(),
            other.as_deref().unwrap_or("nothing (not found)"),
            cargo_home_bin().display()
        ),
    }
}

// ---- LLVM versions ----

/// `LLVM version: 22.1.4` in `rustc -vV` output -> 22.
pub fn rustc_llvm_major(rustc_vv: &str) -> Option<u32> {
    let v = rustc_vv
        .lines()
        .find_map(|l| l.trim().strip_prefix("LLVM version:"))?;
    major(v.trim())
}

/// Leading number of `22.1.8` / `22` / `22git`.
fn major(v: &str) -> Option<u32> {
    let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// LLVM major a dynamically linked bpf-linker loads, from `ldd` output (`libLLVM.so.22.1`,
/// `libLLVM-22.so`).
pub fn ldd_llvm_major(ldd: &str) -> Option<u32> {
    ldd.lines().find_map(|l| {
        let after = &l[l.find("libLLVM")? + "libLLVM".len()..];
        let start = after.find(|c: char| c.is_ascii_digit())?;
        major(&after[start..])
    })
}

/// bpf-linker's LLVM major and where that came from. bpf-linker 0.13 does not print its LLVM
/// version (`--version` prints `bpf-linker 0.13.0`), so: its version output if a future release
/// adds it, else the libLLVM it is dynamically linked to, else llvm-config-22 (what setup builds it
/// against).
fn bpf_linker_llvm_major() -> Option<(u32, String)> {
    if let Some(v) = bpf_linker_version() {
        if let Some(m) = v.find("LLVM").and_then(|i| {
            let after = &v[i..];
            after
                .find(|c: char| c.is_ascii_digit())
                .and_then(|s| major(&after[s..]))
        }) {
            return Some((m, "from `bpf-linker --version`".into()));
        }
    }
    if let Some(path) = which("bpf-linker") {
        if let Some(m) = query("ldd", &[path.to_str()?])
            .as_deref()
            .and_then(ldd_llvm_major)
        {
            return Some((
                m,
                format!("dynamically linked libLLVM of {}", path.display()),
            ));
        }
    }
    let cfg = llvm_config()?;
    let v = query(&cfg, &["--version"])?;
    Some((
        major(v.trim())?,
        format!(
            "bpf-linker does not report its LLVM; assuming the {} it is built against ({})",
            cfg.display(),
            v.trim()
        ),
    ))
}

fn llvm_versions_match() -> Result<()> {
    let vv = query("rustup", &["run", "nightly", "rustc", "-vV"])
        .context("`rustc +nightly -vV` failed")?;
    let nightly =
        rustc_llvm_major(&vv).context("no `LLVM version:` line in `rustc +nightly -vV`")?;
    let (linker, source) =
        bpf_linker_llvm_major().context("cannot determine which LLVM bpf-linker uses")?;
    if nightly != linker {
        let fix = if nightly != LLVM_MAJOR {
            format!(
                "install a nightly built with LLVM {linker} (`rustup toolchain install nightly-YYYY-MM-DD` \
                 and make it `nightly`) or rebuild bpf-linker for LLVM {nightly}: \
                 `LLVM_PREFIX=$(llvm-config-{nightly} --prefix) cargo install bpf-linker --force --version ^{BPF_LINKER_SERIES} --locked --no-default-features --features llvm-{nightly}`"
            )
        } else {
            format!(
                "rebuild bpf-linker for LLVM {nightly}: `LLVM_PREFIX=$(llvm-config-{nightly} --prefix) cargo install bpf-linker --force --version ^{BPF_LINKER_SERIES} --locked --no-default-features --features llvm-{nightly}`"
            )
        };
        bail!(
            "LLVM mismatch: nightly rustc uses LLVM {nightly} but bpf-linker uses LLVM {linker} ({source}); \
             linking BPF would fail with `Invalid record`. Fix: {fix}"
        );
    }
    println!("ok: LLVM {nightly} in both nightly rustc and bpf-linker ({source})");
    Ok(())
}

// ---- mounts ----

fn bpffs_mount() -> Option<String> {
    util::mounts()
        .into_iter()
        .find(|(_, t)| t == "bpf")
        .map(|(p, _)| p)
}

fn bpffs() -> Result<()> {
    if let Some(p) = bpffs_mount() {
        println!("ok: bpffs mounted at {p}");
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS_PATH).with_context(|| format!("creating {BPFFS_PATH}"))?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS_PATH]))?;
    if bpffs_mount().is_none() {
        bail!("`mount -t bpf bpf {BPFFS_PATH}` succeeded but /proc/mounts shows no bpf filesystem");
    }
    println!("installed: mounted bpffs at {BPFFS_PATH}");
    Ok(())
}

fn cgroup2() -> Result<()> {
    match util::mounts().into_iter().find(|(_, t)| t == "cgroup2") {
        Some((p, _)) => {
            println!("ok: cgroup v2 mounted at {p}");
            Ok(())
        }
        None => bail!(
            "no cgroup v2 filesystem is mounted (the socket-level programs attach to a cgroup v2). \
             Fix: `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified`, \
             or boot with systemd.unified_cgroup_hierarchy=1"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_linker_series() {
        assert!(is_wanted_bpf_linker("bpf-linker 0.13.0"));
        assert!(is_wanted_bpf_linker("bpf-linker 0.13.12\n"));
        assert!(!is_wanted_bpf_linker("bpf-linker 0.12.0"));
        assert!(!is_wanted_bpf_linker("bpf-linker 0.130.0"));
        assert!(!is_wanted_bpf_linker("bpf-linker"));
        assert!(!is_wanted_bpf_linker(""));
    }

    #[test]
    fn llvm_majors() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(rustc_llvm_major(vv), Some(22));
        assert_eq!(rustc_llvm_major("rustc 1.0\n"), None);
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f95dc400000)\n";
        assert_eq!(ldd_llvm_major(ldd), Some(22));
        assert_eq!(
            ldd_llvm_major("\tlibLLVM-21.so => /usr/lib/x (0x1)\n"),
            Some(21)
        );
        assert_eq!(ldd_llvm_major("\tlibc.so.6 => /lib/libc.so.6\n"), None);
    }
}
