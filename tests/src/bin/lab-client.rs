//! Client of the lab: exchanges with `lab-echo` servers (directly or through a Service address)
//! and prints one JSON object per exchange (see `lb_tests::Exchange`):
//! `{"ok":true,"backend":"a1","seen_peer":"10.244.1.10:40000","peer":"10.96.0.10:80","error":null,"elapsed_ms":1}`
//! An IPv6 target gets an AF_INET6 socket: a pod's IPv6 address in the dual-stack lab
//! (`[fd00:244:1::10]:8080`), or an IPv4-mapped one (`[::ffff:10.96.0.10]:80`), which the
//! dual-stack socket (IPV6_V6ONLY off) sends as IPv4.
//! `backend` and `seen_peer` come from the reply; `peer` is `getpeername()` of the TCP socket or
//! the source `recvfrom()` reported for UDP. Exits 0 even when exchanges fail.
//!
//! ```text
//! lab-client tcp IP:PORT [--count N] [--timeout-ms T] [--bind IP] [--source-port P]
//!                                                       each exchange on a new connection
//!                                                       (from IP and port P when given, bound
//!                                                       with SO_REUSEADDR)
//! lab-client udp IP:PORT [--count N] [--timeout-ms T] [--bind IP] [--source-port P]
//!                                                       each from a new unconnected socket
//!                                                       (bound to IP: its source address; to
//!                                                       port P when given, as `nc -u -p P` in
//!                                                       a loop)
//! lab-client udp-connected IP:PORT [--count N] [--timeout-ms T]
//!                                                       each from a new connected socket (as
//!                                                       `agnhost connect --protocol udp`): an
//!                                                       ICMP port unreachable fails its read
//!                                                       with ECONNREFUSED
//! lab-client hold IP:PORT [--timeout-ms T] [--source-port P]
//!                                                       one connection: one exchange at start,
//!                                                       one more per stdin line, until EOF
//! lab-client hold-udp IP:PORT [--timeout-ms T]          the same on one connected UDP socket;
//!                                                       after a failed exchange the next one
//!                                                       connects a new socket (as an
//!                                                       application does after ECONNABORTED)
//! ```
use std::{
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    process::exit,
    time::{Duration, Instant},
};

use lb_tests::Exchange;

/// An error with the step it happened in (`connect`, `send`, `read`, ...).
struct Failure {
    step: &'static str,
    err: io::Error,
    /// Known for TCP once connected.
    peer: Option<SocketAddr>,
}

type Outcome = Result<(String, SocketAddr), Failure>;

fn step<T>(step: &'static str, peer: Option<SocketAddr>, r: io::Result<T>) -> Result<T, Failure> {
    r.map_err(|err| Failure { step, err, peer })
}

fn report(outcome: Outcome, started: Instant, timeout: Duration) {
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let ex = match outcome {
        Ok((reply, peer)) => {
            let mut it = reply.split_whitespace();
            let backend = it.next().map(str::to_string);
            // Only a well-formed `NAME IP:PORT` counts as an answer.
            let seen_peer = it
                .next()
                .filter(|s| s.parse::<SocketAddr>().is_ok())
                .map(str::to_string);
            let ok = backend.is_some() && seen_peer.is_some();
            Exchange {
                ok,
                backend,
                seen_peer,
                peer: Some(peer.to_string()),
                error: (!ok).then(|| format!("reply: unexpected `{reply}`")),
                elapsed_ms,
            }
        }
        Err(Failure { step, err, peer }) => {
            // A socket timeout surfaces as EAGAIN (WouldBlock) on Linux.
            // The kind comes first so callers can match on it: `PermissionDenied: ... (connect)`.
            let error = if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                format!(
                    "TimedOut: no answer within {} ms: {err} ({step})",
                    timeout.as_millis()
                )
            } else {
                format!("{:?}: {err} ({step})", err.kind())
            };
            Exchange {
                ok: false,
                backend: None,
                seen_peer: None,
                peer: peer.map(|p| p.to_string()),
                error: Some(error),
                elapsed_ms,
            }
        }
    };
    let line = serde_json::to_string(&ex)
        .unwrap_or_else(|e| format!(r#"{{"ok":false,"error":"json: {e}"}}"#));
    let mut out = io::stdout().lock();
    // Nothing sensible to do if stdout is gone.
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

/// One request line and one reply line on a connected stream.
fn request(stream: &mut TcpStream, reader: &mut BufReader<TcpStream>, peer: SocketAddr) -> Outcome {
    step("send", Some(peer), stream.write_all(b"hello\n"))?;
    let mut line = String::new();
    let n = step("read", Some(peer), reader.read_line(&mut line))?;
    if n == 0 {
        return step(
            "read",
            Some(peer),
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed without a reply",
            )),
        );
    }
    Ok((line.trim().to_string(), peer))
}

/// A TCP connection to `target`; from `bind` and from port `source_port` when given (bound
/// with SO_REUSEADDR, so that connections to different targets can share a port, as the
/// kernel's own port choice lets them). std's TcpStream cannot bind before it connects.
fn connect(
    target: SocketAddr,
    timeout: Duration,
    bind: Option<IpAddr>,
    source_port: u16,
) -> Result<(TcpStream, BufReader<TcpStream>, SocketAddr), Failure> {
    let s = if bind.is_none() && source_port == 0 {
        step(
            "connect",
            None,
            TcpStream::connect_timeout(&target, timeout),
        )?
    } else {
        let sock = step(
            "socket",
            None,
            socket2::Socket::new(
                socket2::Domain::for_address(target),
                socket2::Type::STREAM,
                None,
            ),
        )?;
        step("setsockopt", None, sock.set_reuse_address(true))?;
        let from = SocketAddr::new(bind.unwrap_or_else(|| unspecified(target)), source_port);
        step("bind", None, sock.bind(&from.into()))?;
        step(
            "connect",
            None,
            sock.connect_timeout(&target.into(), timeout),
        )?;
        sock.into()
    };
    let peer = step("getpeername", None, s.peer_addr())?;
    step("setsockopt", Some(peer), s.set_read_timeout(Some(timeout)))?;
    step("setsockopt", Some(peer), s.set_write_timeout(Some(timeout)))?;
    let reader = BufReader::new(step("dup", Some(peer), s.try_clone())?);
    Ok((s, reader, peer))
}

fn tcp_once(
    target: SocketAddr,
    timeout: Duration,
    bind: Option<IpAddr>,
    source_port: u16,
) -> Outcome {
    let (mut s, mut reader, peer) = connect(target, timeout, bind, source_port)?;
    request(&mut s, &mut reader, peer)
}

fn udp_once(target: SocketAddr, timeout: Duration, bind: IpAddr, source_port: u16) -> Outcome {
    let s = step("bind", None, UdpSocket::bind((bind, source_port)))?;
    step("setsockopt", None, s.set_read_timeout(Some(timeout)))?;
    step("send", None, s.send_to(b"hello\n", target))?;
    let mut buf = [0u8; 2048];
    let (n, from) = step("read", None, s.recv_from(&mut buf))?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
}

fn hold(target: SocketAddr, timeout: Duration, source_port: u16) {
    let started = Instant::now();
    let mut conn = match connect(target, timeout, None, source_port) {
        Ok(c) => Some(c),
        Err(f) => {
            report(Err(f), started, timeout);
            None
        }
    };
    if let Some((s, reader, peer)) = conn.as_mut() {
        report(request(s, reader, *peer), started, timeout);
    }
    for line in io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        let started = Instant::now();
        let outcome = match conn.as_mut() {
            Some((s, reader, peer)) => request(s, reader, *peer),
            None => step(
                "send",
                None,
                Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "never connected",
                )),
            ),
        };
        report(outcome, started, timeout);
    }
}

/// The unspecified address of `target`'s family (`0.0.0.0` or `::`, IPV6_V6ONLY off by default).
fn unspecified(target: SocketAddr) -> IpAddr {
    match target {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

fn udp_connect(target: SocketAddr, timeout: Duration) -> Result<UdpSocket, Failure> {
    let s = step("bind", None, UdpSocket::bind((unspecified(target), 0)))?;
    step("setsockopt", None, s.set_read_timeout(Some(timeout)))?;
    step("connect", None, s.connect(target))?;
    Ok(s)
}

fn udp_request(s: &UdpSocket) -> Outcome {
    step("send", None, s.send(b"hello\n"))?;
    let mut buf = [0u8; 2048];
    let n = step("read", None, s.recv(&mut buf))?;
    let peer = step("getpeername", None, s.peer_addr())?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), peer))
}

fn hold_udp(target: SocketAddr, timeout: Duration) {
    let mut sock: Option<UdpSocket> = None;
    let exchange = |sock: &mut Option<UdpSocket>| {
        let started = Instant::now();
        let outcome = match sock.take() {
            Some(s) => Ok(s),
            None => udp_connect(target, timeout),
        }
        .and_then(|s| {
            let r = udp_request(&s);
            if r.is_ok() {
                *sock = Some(s);
            }
            r
        });
        report(outcome, started, timeout);
    };
    exchange(&mut sock);
    for line in io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        exchange(&mut sock);
    }
}

fn usage(why: &str) -> ! {
    eprintln!(
        "lab-client: {why}\nusage: lab-client tcp|udp|udp-connected IP:PORT [--count N] [--timeout-ms T] [--bind IP] [--source-port P (udp, tcp)]\n       \
         lab-client hold|hold-udp IP:PORT [--timeout-ms T] [--source-port P (hold)]"
    );
    exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(target)) = (args.first(), args.get(1)) else {
        usage("missing mode or target");
    };
    let target: SocketAddr = target
        .parse()
        .unwrap_or_else(|_| usage(&format!("bad target {target} (IP:PORT)")));
    let mut count = 1u32;
    let mut timeout = Duration::from_millis(2000);
    let mut bind: Option<IpAddr> = None;
    let mut source_port = 0u16;
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--count" => {
                count = value
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("bad count {value}")))
            }
            "--timeout-ms" => {
                let ms: u64 = value
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("bad timeout {value}")));
                timeout = Duration::from_millis(ms.max(1));
            }
            "--bind" => {
                bind = Some(
                    value
                        .parse()
                        .unwrap_or_else(|_| usage(&format!("bad address {value}"))),
                )
            }
            "--source-port" if ["udp", "tcp", "hold"].contains(&mode.as_str()) => {
                source_port = value
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("bad port {value}")))
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if bind.is_some() && mode != "udp" && mode != "tcp" {
        usage("--bind is for udp and tcp only");
    }
    match mode.as_str() {
        "tcp" | "udp" | "udp-connected" => {
            for _ in 0..count {
                let started = Instant::now();
                let outcome = match mode.as_str() {
                    "tcp" => tcp_once(target, timeout, bind, source_port),
                    // Unbound by default, in the target's family: an IPv6 target
                    // (`[::ffff:10.96.0.10]:80`, IPv4-mapped) gets a dual-stack AF_INET6 socket.
                    "udp" => {
                        let bind = bind.unwrap_or_else(|| unspecified(target));
                        udp_once(target, timeout, bind, source_port)
                    }
                    _ => udp_connect(target, timeout).and_then(|s| udp_request(&s)),
                };
                report(outcome, started, timeout);
            }
        }
        "hold" => hold(target, timeout, source_port),
        "hold-udp" => hold_udp(target, timeout),
        other => usage(&format!("unknown mode {other}")),
    }
}
