//! Running the kernel tools on the rules: `iptables-restore` and `nft` inside a network
//! namespace with the rules on stdin, timed, and on failure the input line the error names.
use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::netns;

/// What one load of rules cost.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Applied {
    /// Wall clock from starting the tool until it exited successfully.
    pub ms: f64,
    /// Lines and bytes of input given to the tool.
    pub lines: usize,
    pub bytes: usize,
}

/// Runs `iptables-restore --noflush` (what kube-proxy runs, without `--counters`) inside network
/// namespace `ns` with `input` on stdin. On failure the error holds the tool's stderr and the
/// input line it names.
pub fn iptables_restore_in(ns: &str, input: &str) -> Result<Applied> {
    run_with_input(ns, "iptables-restore", &["--noflush"], input)
}

/// Runs plain `iptables-restore` (no `--noflush`: the tables it names are replaced) inside
/// network namespace `ns` with `input` on stdin. In a namespace that holds no other rules the
/// result is what `--noflush` gives, without the cost that grows with rules x chains in the
/// nf_tables backend (see [`IPTABLES_NOFLUSH_LIMIT`](super::IPTABLES_NOFLUSH_LIMIT)); the lab
/// uses it to load large rulesets.
pub fn iptables_replace_in(ns: &str, input: &str) -> Result<Applied> {
    run_with_input(ns, "iptables-restore", &[], input)
}

/// Runs `nft -f -` inside network namespace `ns` with `input` on stdin (as knftables does). On
/// failure the error holds nft's stderr and the input line it names.
pub fn nft_apply_in(ns: &str, input: &str) -> Result<Applied> {
    run_with_input(ns, "nft", &["-f", "-"], input)
}

/// Removes kube-proxy's iptables rules from namespace `ns`: flushes and deletes every chain of
/// the nat and filter tables (the namespace holds nothing else).
pub fn iptables_flush_in(ns: &str) -> Result<()> {
    for table in ["nat", "filter"] {
        netns::exec_in(ns, "iptables", &["-w", "-t", table, "-F"])?;
        netns::exec_in(ns, "iptables", &["-w", "-t", table, "-X"])?;
    }
    Ok(())
}

/// Deletes the `ip kube-proxy` table in namespace `ns`.
pub fn nft_flush_in(ns: &str) -> Result<()> {
    netns::exec_in(ns, "nft", &["delete", "table", "ip", "kube-proxy"])?;
    Ok(())
}

fn run_with_input(ns: &str, program: &str, args: &[&str], input: &str) -> Result<Applied> {
    match run_limited(ns, program, args, input, None)? {
        Run::Done(a) => Ok(a),
        Run::TimedOut { .. } => unreachable!("no limit was given"),
    }
}

/// How a limited tool run ended.
pub(super) enum Run {
    Done(Applied),
    /// Stopped (SIGKILL) at the limit, having read `read_bytes` (of its input and anything else).
    TimedOut {
        read_bytes: u64,
    },
}

/// Runs `program args` in `ns` with `input` on stdin, killed after `limit` when given.
pub(super) fn run_limited(
    ns: &str,
    program: &str,
    args: &[&str],
    input: &str,
    limit: Option<Duration>,
) -> Result<Run> {
    let mut cmd = netns::command_in(ns, None, program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let desc = format!("{} in netns {ns}", netns::describe(&cmd));
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{desc}` (run `cargo xtask setup`)"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let data = input.as_bytes().to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
    );
    let deadline = limit.map(|l| started + l);
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for `{desc}`"))?
        {
            break status;
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            let read_bytes = std::fs::read_to_string(format!("/proc/{}/io", child.id()))
                .ok()
                .and_then(|io| {
                    io.lines()
                        .find_map(|l| l.strip_prefix("rchar: ")?.trim().parse().ok())
                })
                .unwrap_or(0);
            let _ = child.kill();
            let _ = child.wait();
            let _ = writer.join();
            return Ok(Run::TimedOut { read_bytes });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    let write_result = writer
        .join()
        .map_err(|_| anyhow::anyhow!("stdin writer panicked"))?;
    let _ = stdout.join();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr);
        let offending = offending_line(&stderr, input)
            .map(|(n, l)| format!("\ninput line {n}: {l}"))
            .unwrap_or_default();
        bail!(
            "`{desc}` failed ({status}): {}{offending}\n({} input lines)",
            stderr.trim(),
            input.lines().count()
        );
    }
    write_result.with_context(|| format!("writing the input of `{desc}`"))?;
    Ok(Run::Done(Applied {
        ms: ms(elapsed),
        lines: input.lines().count(),
        bytes: input.len(),
    }))
}

/// The input line an error message points at: `line N` / `line: N` (iptables-restore) or
/// `FILE:N:` (nft). iptables-restore reports errors found while committing a table at its
/// `COMMIT` line; then the first rule naming a token the message quotes (`Chain 'X' does not
/// exist`, ``Couldn't load target `X'``) is the offending line.
fn offending_line<'a>(stderr: &str, input: &'a str) -> Option<(usize, &'a str)> {
    let number = |s: &str| -> Option<usize> {
        let digits: String = s
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().ok()
    };
    let mut found = None;
    for marker in ["line: ", "line "] {
        if let Some(i) = stderr.find(marker) {
            found = number(&stderr[i + marker.len()..]);
            if found.is_some() {
                break;
            }
        }
    }
    if found.is_none() {
        // nft: "/dev/stdin:12:5-9: Error: ..."
        found = stderr.lines().find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let n = number(rest)?;
            rest[n.to_string().len()..].starts_with(':').then_some(n)
        });
    }
    let lines: Vec<&str> = input.lines().collect();
    let named = found.and_then(|n| Some((n, *lines.get(n.checked_sub(1)?)?)));
    if named.is_some_and(|(_, l)| l.trim() != "COMMIT") {
        return named;
    }
    // Quoted tokens: 'X' or `X'.
    let mut tokens = Vec::new();
    for open in ['\'', '`'] {
        let mut rest = stderr;
        while let Some(i) = rest.find(open) {
            let after = &rest[i + 1..];
            let Some(j) = after.find('\'') else { break };
            if j > 0 {
                tokens.push(&after[..j]);
            }
            rest = &after[j + 1..];
        }
    }
    let by_token = lines.iter().enumerate().find(|(_, l)| {
        !l.starts_with(':') && tokens.iter().any(|t| l.split_whitespace().any(|w| w == *t))
    });
    by_token.map(|(i, l)| (i + 1, *l)).or(named)
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The first line of `program args` (`iptables -V`, `nft -v`); fails naming `cargo xtask setup`.
pub fn tool_version(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{program}`: install it with `cargo xtask setup`"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offending_lines_are_found() {
        let input = "a\nb\nc\n";
        assert_eq!(
            offending_line("iptables-restore v1.8.9 (nf_tables): line 2 failed", input),
            Some((2, "b"))
        );
        assert_eq!(
            offending_line("/dev/stdin:3:1-3: Error: syntax error", input),
            Some((3, "c"))
        );
        assert_eq!(offending_line("nothing", input), None);
        let rules = "*nat\n:KUBE-X - [0:0]\n-A KUBE-X -j NOPE\nCOMMIT\n";
        let nf = "iptables-restore v1.8.9 (nf_tables): Chain 'NOPE' does not exist\nError occurred at line: 4\n";
        assert_eq!(offending_line(nf, rules), Some((3, "-A KUBE-X -j NOPE")));
        let legacy = "iptables-restore v1.8.9 (legacy): Couldn't load target `NOPE':No such file or directory\n\nError occurred at line: 3";
        assert_eq!(
            offending_line(legacy, rules),
            Some((3, "-A KUBE-X -j NOPE"))
        );
        assert_eq!(
            offending_line("Error occurred at line: 2", rules),
            Some((2, ":KUBE-X - [0:0]"))
        );
    }
}
