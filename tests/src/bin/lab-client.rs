//! Client of the lab: runs exchanges against an echo server (usually through a Service address)
//! and prints one JSON object per exchange:
//! `{"ok":true,"backend":"a1","seen_peer":"10.244.1.10:40000","peer":"10.96.0.10:80","error":null,"elapsed_ms":1}`
//! where `peer` is what `getpeername()` (TCP) or `recvfrom()` (UDP) reported.
//!
//! lab-client tcp IP:PORT [--count N] [--timeout-ms T]   each exchange on a new connection
//! lab-client udp IP:PORT [--count N] [--timeout-ms T]   each on a new unconnected socket
//! lab-client hold IP:PORT [--timeout-ms T]              one connection; one more exchange per stdin line
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

fn exchange_line(reply: &str) -> (Option<String>, Option<String>) {
    let mut it = reply.split_whitespace();
    (it.next().map(str::to_string), it.next().map(str::to_string))
}

fn print(ok: Result<(String, SocketAddr), std::io::Error>, started: Instant) {
    let ms = started.elapsed().as_millis() as u64;
    let v = match ok {
        Ok((reply, peer)) => {
            let (backend, seen) = exchange_line(&reply);
            serde_json::json!({"ok": true, "backend": backend, "seen_peer": seen, "peer": peer.to_string(), "error": null, "elapsed_ms": ms})
        }
        Err(e) => serde_json::json!({"ok": false, "backend": null, "seen_peer": null, "peer": null,
            "error": format!("{:?}: {e}", e.kind()), "elapsed_ms": ms}),
    };
    println!("{v}");
    let _ = std::io::stdout().flush();
}

fn tcp_once(target: SocketAddr, timeout: Duration) -> std::io::Result<(String, SocketAddr)> {
    let s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let peer = s.peer_addr()?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut w = s;
    writeln!(w, "hello")?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed without reply"));
    }
    Ok((line.trim().to_string(), peer))
}

fn udp_once(target: SocketAddr, timeout: Duration) -> std::io::Result<(String, SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"hello\n", target)?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim().to_string(), from))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(target)) = (args.first(), args.get(1)) else {
        eprintln!("usage: lab-client tcp|udp|hold IP:PORT [--count N] [--timeout-ms T]");
        std::process::exit(2);
    };
    let target: SocketAddr = target.parse().expect("IP:PORT");
    let mut count = 1u32;
    let mut timeout = Duration::from_millis(2000);
    let mut i = 2;
    while i < args.len() {
        match args[i].as_str() {
            "--count" => count = args[i + 1].parse().expect("count"),
            "--timeout-ms" => timeout = Duration::from_millis(args[i + 1].parse().expect("ms")),
            other => panic!("lab-client: unknown argument {other}"),
        }
        i += 2;
    }
    match mode.as_str() {
        "tcp" | "udp" => {
            for _ in 0..count {
                let t = Instant::now();
                let r = if mode == "tcp" { tcp_once(target, timeout) } else { udp_once(target, timeout) };
                print(r, t);
            }
        }
        "hold" => {
            let t = Instant::now();
            let conn = TcpStream::connect_timeout(&target, timeout).and_then(|s| {
                s.set_read_timeout(Some(timeout))?;
                Ok(s)
            });
            let s = match conn {
                Ok(s) => s,
                Err(e) => return print(Err(e), t),
            };
            let peer = s.peer_addr().expect("peer");
            let mut reader = BufReader::new(s.try_clone().expect("clone"));
            let mut w = s;
            let mut once = |started: Instant| {
                let r = (|| {
                    writeln!(w, "hello")?;
                    let mut line = String::new();
                    reader.read_line(&mut line)?;
                    if line.is_empty() {
                        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
                    }
                    Ok((line.trim().to_string(), peer))
                })();
                print(r, started);
            };
            once(t);
            for line in std::io::stdin().lock().lines() {
                if line.is_err() {
                    break;
                }
                once(Instant::now());
            }
        }
        other => panic!("lab-client: unknown mode {other}"),
    }
}
