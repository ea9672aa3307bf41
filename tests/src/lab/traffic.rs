//! Traffic through the lab: `lab-client` exchanges at a lab place ([`Exchange`]) and TCP
//! connections held open across several exchanges ([`HeldConnection`]).
use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    process::{ChildStdin, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{bin_path, Lab};
use crate::netns::{self, ManagedProcess};

/// Extra time a held connection's client gets beyond its own I/O timeout.
const HOLD_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One exchange of `lab-client`, as printed on one JSON line. Addresses are kept as the text
/// `IP:PORT`; [`Exchange::seen_addr`], [`Exchange::seen_ip`] and [`Exchange::peer_addr`] parse them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    pub ok: bool,
    /// Name of the echo server that answered.
    #[serde(default)]
    pub backend: Option<String>,
    /// The client address and port the echo server saw (`accept()` / `recvfrom()` peer).
    #[serde(default)]
    pub seen_peer: Option<String>,
    /// TCP: `getpeername()` of the client socket; UDP: the source of the reply.
    #[serde(default)]
    pub peer: Option<String>,
    /// When `ok` is false: the error kind, its text and the step (`TimedOut: ... (connect)`).
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub elapsed_ms: u64,
}

impl Exchange {
    /// The client address and port the echo server saw.
    pub fn seen_addr(&self) -> Option<SocketAddr> {
        self.seen_peer.as_deref()?.parse().ok()
    }

    /// The client IP address the echo server saw.
    pub fn seen_ip(&self) -> Option<IpAddr> {
        self.seen_addr().map(|p| p.ip())
    }

    /// `getpeername()` (TCP) or the reply's source (UDP).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer.as_deref()?.parse().ok()
    }

    /// Parses `lab-client` output: one JSON object per non-empty line.
    pub fn parse_lines(text: &str) -> Result<Vec<Exchange>> {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad lab-client line: {l}")))
            .collect()
    }
}

/// Panics, naming `what`, the count and the first failure, unless every exchange succeeded.
pub fn all_ok(ex: &[Exchange], what: &str) {
    let bad: Vec<_> = ex.iter().filter(|e| !e.ok).collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} failed, first {:?}",
        bad.len(),
        ex.len(),
        bad.first()
    );
}

/// Exchanges of pod a1 (10.244.1.10) with `frontend`, translated at socket level: every one
/// served, each showing `frontend` as its peer (getpeername, or the datagram's source) while
/// the backend saw the pod's own address (of the frontend's family), spread over all four
/// backends of the example lab.
/// Returns the spread.
pub fn socket_level_spread(
    ex: &[Exchange],
    proto: &str,
    frontend: &str,
) -> std::collections::BTreeMap<String, usize> {
    all_ok(ex, proto);
    // a1's own address of the frontend's family (an IPv4-mapped frontend is IPv4).
    let own = if frontend.starts_with('[') && !frontend.starts_with("[::ffff:") {
        "[fd00:244:1::10]:"
    } else {
        "10.244.1.10:"
    };
    for e in ex {
        assert_eq!(e.peer.as_deref(), Some(frontend), "{proto}: {e:?}");
        assert!(
            e.seen_peer.as_deref().unwrap().starts_with(own),
            "{proto}: the pod's own address is kept: {e:?}"
        );
    }
    let spread = by_backend(ex);
    assert_eq!(
        spread.keys().cloned().collect::<Vec<_>>(),
        ["a1", "a2", "b1", "b2"],
        "{proto}: {spread:?}"
    );
    spread
}

/// How many exchanges each backend served (`""`: failed ones).
pub fn by_backend(ex: &[Exchange]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for e in ex {
        *m.entry(e.backend.clone().unwrap_or_default()).or_default() += 1;
    }
    m
}

impl Lab {
    /// Runs `lab-client ARGS...` at a lab place (see [`Lab::command_at`]) and parses its output.
    pub fn run_client(&self, place: &str, args: &[&str]) -> Result<Vec<Exchange>> {
        let bin = bin_path("lab-client")?;
        let mut cmd = self.command_at(place, &bin, args)?;
        let desc = format!("lab-client {} at {place}", args.join(" "));
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {desc}"))?;
        if !out.status.success() {
            bail!(
                "{desc} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Exchange::parse_lines(&String::from_utf8_lossy(&out.stdout)).with_context(|| desc)
    }

    /// `count` TCP exchanges from `place` to `target` (`IP:PORT`), each on a new connection.
    pub fn tcp(&self, place: &str, target: &str, count: u32) -> Result<Vec<Exchange>> {
        self.run_client(place, &["tcp", target, "--count", &count.to_string()])
    }

    /// `count` UDP exchanges from `place` to `target`, each from a new socket.
    pub fn udp(&self, place: &str, target: &str, count: u32) -> Result<Vec<Exchange>> {
        self.run_client(place, &["udp", target, "--count", &count.to_string()])
    }

    /// `count` exchanges of `proto` (`tcp` or `udp`) from `place` to `target`, each given at
    /// most `timeout_ms`; panics unless every one failed (refused, dropped or timed out).
    pub fn all_fail(
        &self,
        place: &str,
        proto: &str,
        target: &str,
        count: u32,
        timeout_ms: u32,
    ) -> Vec<Exchange> {
        let args = [
            proto,
            target,
            "--count",
            &count.to_string(),
            "--timeout-ms",
            &timeout_ms.to_string(),
        ];
        let ex = self.run_client(place, &args).unwrap();
        assert!(
            ex.iter().all(|e| !e.ok),
            "{proto} {target} from {place} must not be served: {ex:?}"
        );
        ex
    }

    /// Opens one TCP connection from `place` to `target` and does a first exchange on it
    /// (`lab-client hold`); more exchanges on the same connection with
    /// [`HeldConnection::exchange`].
    pub fn hold(&self, place: &str, target: &str) -> Result<HeldConnection> {
        self.hold_as(place, "hold", target)
    }

    /// Like [`Lab::hold`] with one connected UDP socket (`lab-client hold-udp`): after a failed
    /// exchange, the next one connects a new socket.
    pub fn hold_udp(&self, place: &str, target: &str) -> Result<HeldConnection> {
        self.hold_as(place, "hold-udp", target)
    }

    /// Like [`Lab::hold`] from source port `source_port` (bound with SO_REUSEADDR).
    pub fn hold_from(&self, place: &str, target: &str, source_port: u16) -> Result<HeldConnection> {
        self.hold_with(
            place,
            &["hold", target, "--source-port", &source_port.to_string()],
        )
    }

    fn hold_as(&self, place: &str, mode: &str, target: &str) -> Result<HeldConnection> {
        self.hold_with(place, &[mode, target])
    }

    fn hold_with(&self, place: &str, args: &[&str]) -> Result<HeldConnection> {
        let (mode, target) = (args[0], args[1]);
        let bin = bin_path("lab-client")?;
        let mut cmd = self.command_at(place, &bin, args)?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut process =
            ManagedProcess::spawn(format!("lab-client {mode} {target} at {place}"), cmd)?;
        let stdin = process
            .child_mut()
            .stdin
            .take()
            .context("lab-client stdin")?;
        let stdout = process
            .child_mut()
            .stdout
            .take()
            .context("lab-client stdout")?;
        let lines = all_lines(stdout);
        let mut held = HeldConnection {
            process,
            stdin: Some(stdin),
            lines,
            first: None,
        };
        held.first = Some(held.next_exchange()?);
        Ok(held)
    }
}

/// One TCP connection kept open by `lab-client hold` (see [`Lab::hold`]). The client process
/// is stopped on drop.
pub struct HeldConnection {
    process: ManagedProcess,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// The exchange made right after connecting (always set by [`Lab::hold`]).
    pub first: Option<Exchange>,
}

impl HeldConnection {
    /// One more exchange on the same connection.
    pub fn exchange(&mut self) -> Result<Exchange> {
        let stdin = self.stdin.as_mut().context("held connection is closed")?;
        stdin
            .write_all(b"next\n")
            .and_then(|_| stdin.flush())
            .with_context(|| format!("{} has exited", self.process.name()))?;
        self.next_exchange()
    }

    fn next_exchange(&mut self) -> Result<Exchange> {
        let line = self.lines.recv_timeout(HOLD_REPLY_TIMEOUT).map_err(|e| {
            let status = self.process.try_wait().map(netns::status_text);
            anyhow!(
                "{}: no reply line ({e}; exited: {status:?})",
                self.process.name()
            )
        })?;
        serde_json::from_str(&line).with_context(|| format!("bad lab-client line: {line}"))
    }

    /// Closes stdin (the client exits) and stops the process.
    pub fn close(mut self) -> Result<()> {
        self.stdin.take();
        self.process.stop_with_grace(Duration::from_secs(1))?;
        Ok(())
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        self.stdin.take();
        // ManagedProcess's own drop stops the client.
    }
}

/// Every line a reader produces, delivered on a channel.
fn all_lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn exchange_lines_parse() {
        let out = r#"{"ok":true,"backend":"a1","seen_peer":"10.244.1.10:40000","peer":"10.96.0.10:80","error":null,"elapsed_ms":3}
{"ok":false,"error":"TimedOut: connection timed out (connect)","elapsed_ms":2000}
"#;
        let ex = Exchange::parse_lines(out).expect("parse");
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].backend.as_deref(), Some("a1"));
        assert_eq!(
            ex[0].seen_ip(),
            Some(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10)))
        );
        assert_eq!(ex[0].peer_addr(), Some("10.96.0.10:80".parse().unwrap()));
        assert!(!ex[1].ok);
        assert_eq!(ex[1].elapsed_ms, 2000);
        assert!(ex[1].backend.is_none());
    }
}
