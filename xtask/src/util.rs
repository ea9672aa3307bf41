//! Small helpers for running commands and locating things. No dependencies beyond std + anyhow.

use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Crates that are workspace members but cannot be built for the host (lb-ebpf is built for the
/// BPF target by lb-userspace/build.rs; a host build fails with "unwinding panics are not
/// supported without std"). `--workspace` would include them, so they are excluded explicitly.
pub const HOST_EXCLUDED: &[&str] = &["lb-ebpf"];

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The cargo that runs us (`cargo run` sets `CARGO`), so children use the same toolchain.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// `cargo <sub> --workspace --exclude <host-excluded>...`
pub fn cargo_workspace(sub: &str) -> Command {
    let mut cmd = cargo();
    cmd.arg(sub).arg("--workspace");
    for krate in HOST_EXCLUDED {
        cmd.args(["--exclude", krate]);
    }
    cmd
}

pub fn display(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), v.to_string_lossy()));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with inherited stdio, echoing it first; fails on non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = run_status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs a command with inherited stdio, echoing it first; returns its status.
pub fn run_status(cmd: &mut Command) -> Result<ExitStatus> {
    eprintln!("+ {}", display(cmd));
    cmd.status()
        .with_context(|| format!("cannot run `{}`", display(cmd)))
}

/// Output of a command that is only queried: `Ok(None)` when the program does not exist or exits
/// non-zero, stdout otherwise. stderr is discarded.
pub fn query<S: AsRef<OsStr>>(program: S, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// First executable named `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Effective uid from /proc/self/status (avoids a libc dependency).
pub fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Mounts from /proc/mounts as (mount point, fs type).
pub fn mounts() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    parse_mounts(&text)
}

pub fn parse_mounts(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _src = f.next()?;
            let point = f.next()?;
            let fstype = f.next()?;
            // /proc/mounts escapes spaces etc. as octal (\040); good enough for display.
            Some((point.to_string(), fstype.to_string()))
        })
        .collect()
}

/// `target_directory` from `cargo metadata` (honours CARGO_TARGET_DIR and config).
pub fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run `cargo metadata`")?;
    if !out.status.success() {
        // Fall back to what cargo would use without config.
        if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
            return Ok(workspace_root().join(dir));
        }
        bail!("`cargo metadata` failed ({})", out.status);
    }
    let json = String::from_utf8_lossy(&out.stdout);
    json_string_field(&json, "target_directory")
        .map(PathBuf::from)
        .context("`cargo metadata` output has no target_directory")
}

/// The value of the first `"key": "<string>"` in a JSON text. Enough for cargo metadata's
/// top-level `target_directory` without pulling serde_json into xtask.
pub fn json_string_field(json: &str, key: &str) -> Option<String> {
    let needle = format!("\"{key}\"");
    let mut rest = &json[json.find(&needle)? + needle.len()..];
    rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other), // \" \\ \/
            },
            c => out.push(c),
        }
    }
    None
}

/// Exit code to propagate for a child's status (128 + signal when killed by one).
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field_from_cargo_metadata() {
        let json = r#"{"packages":[{"name":"x","targets":[]}],"target_directory":"/work/t\"a\\rg\u0065t","version":1,"workspace_root":"/work/main"}"#;
        assert_eq!(
            json_string_field(json, "target_directory").as_deref(),
            Some("/work/t\"a\\rget")
        );
        assert_eq!(
            json_string_field(json, "workspace_root").as_deref(),
            Some("/work/main")
        );
        assert_eq!(json_string_field(json, "nope"), None);
        assert_eq!(
            json_string_field(r#"{"target_directory": "/a/b" }"#, "target_directory").as_deref(),
            Some("/a/b")
        );
    }

    #[test]
    fn mounts_parse() {
        let m = parse_mounts(
            "bpf /sys/fs/bpf bpf rw,relatime 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n",
        );
        assert_eq!(m[0], ("/sys/fs/bpf".into(), "bpf".into()));
        assert_eq!(m[1], ("/sys/fs/cgroup/unified".into(), "cgroup2".into()));
    }
}
