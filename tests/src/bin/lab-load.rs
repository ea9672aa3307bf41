//! Load generator of the lab benchmarks (`lb_tests::bench::labbench`): drives `lab-echo` servers
//! (directly or through a Service address) for a fixed time and prints one JSON line, a
//! `lb_tests::bench::labbench::LoadReport`.
//!
//! ```text
//! lab-load tcp IP:PORT --duration-ms D [--workers W] [--timeout-ms T]
//!     W threads, each in a loop: open a NEW connection, send one line, read the one-line reply
//!     (`NAME IP:PORT`), close. `ok` counts requests whose reply arrived.
//! lab-load udp IP:PORT --duration-ms D [--workers W] [--flows F] [--timeout-ms T]
//!     W threads with F connected sockets each (distinct source ports); every socket keeps one
//!     datagram in flight and sends the next as soon as the reply arrives, or after T without
//!     one (counted as an error). `ok` counts replies received.
//! ```
//! Exits 0 whatever the errors (they are counted); 2 on bad arguments, 1 when sockets cannot be
//! created at all.
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::exit,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use lb_tests::bench::labbench::LoadReport;

struct Args {
    proto: String,
    target: SocketAddr,
    duration: Duration,
    workers: usize,
    flows: usize,
    timeout: Duration,
}

fn usage(why: &str) -> ! {
    eprintln!(
        "lab-load: {why}\nusage: lab-load tcp|udp IP:PORT --duration-ms D [--workers W] [--flows F] [--timeout-ms T]"
    );
    exit(2)
}

fn parse_args() -> Args {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(proto), Some(target)) = (args.first(), args.get(1)) else {
        usage("missing mode or target")
    };
    if proto != "tcp" && proto != "udp" {
        usage(&format!("unknown mode {proto}"));
    }
    let target = target
        .parse()
        .unwrap_or_else(|_| usage(&format!("bad target {target} (IP:PORT)")));
    let mut a = Args {
        proto: proto.clone(),
        target,
        duration: Duration::from_secs(5),
        workers: 4,
        flows: 16,
        timeout: Duration::from_millis(if proto == "tcp" { 2000 } else { 300 }),
    };
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let n: u64 = value
            .parse()
            .unwrap_or_else(|_| usage(&format!("bad number {value}")));
        match flag.as_str() {
            "--duration-ms" => a.duration = Duration::from_millis(n),
            "--workers" => a.workers = (n as usize).max(1),
            "--flows" => a.flows = (n as usize).max(1),
            "--timeout-ms" => a.timeout = Duration::from_millis(n.max(1)),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    a
}

fn main() {
    let a = parse_args();
    let barrier = Arc::new(Barrier::new(a.workers + 1));
    let mut handles = Vec::new();
    for _ in 0..a.workers {
        let (proto, target, duration, flows, timeout, barrier) = (
            a.proto.clone(),
            a.target,
            a.duration,
            a.flows,
            a.timeout,
            barrier.clone(),
        );
        handles.push(thread::spawn(move || -> io::Result<LoadReport> {
            // UDP sockets are made before the clock starts.
            let socks = if proto == "udp" {
                Some(udp_sockets(target, flows))
            } else {
                None
            };
            barrier.wait();
            let deadline = Instant::now() + duration;
            match socks {
                Some(socks) => udp_worker(socks?, deadline, timeout),
                None => Ok(tcp_worker(target, deadline, timeout)),
            }
        }));
    }
    barrier.wait();
    let started = Instant::now();
    let mut report = LoadReport {
        proto: a.proto.clone(),
        workers: a.workers,
        flows: if a.proto == "udp" {
            a.workers * a.flows
        } else {
            0
        },
        ..Default::default()
    };
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => report.merge(r),
            Ok(Err(e)) => {
                eprintln!("lab-load: cannot set up sockets: {e}");
                exit(1)
            }
            Err(_) => {
                eprintln!("lab-load: a worker panicked");
                exit(1)
            }
        }
    }
    report.elapsed_s = started.elapsed().as_secs_f64();
    match serde_json::to_string(&report) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("lab-load: json: {e}");
            exit(1)
        }
    }
}

/// The backend name of a well-formed reply `NAME IP:PORT`.
fn backend_of(reply: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(reply).ok()?;
    let mut it = text.split_whitespace();
    let name = it.next()?;
    it.next()?.parse::<SocketAddr>().ok()?;
    Some(name.to_string())
}

fn tcp_worker(target: SocketAddr, deadline: Instant, timeout: Duration) -> LoadReport {
    let mut r = LoadReport::default();
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        r.sent += 1;
        match tcp_request(target, timeout, &mut buf) {
            Ok(name) => {
                r.ok += 1;
                *r.backends.entry(name).or_default() += 1;
            }
            Err(e) => {
                r.errors += 1;
                r.note_error(e);
            }
        }
    }
    r
}

/// One request on a new connection; the error names the step.
fn tcp_request(target: SocketAddr, timeout: Duration, buf: &mut [u8]) -> Result<String, String> {
    let step = |what: &str, e: io::Error| format!("{:?}: {e} ({what})", e.kind());
    let mut s = TcpStream::connect_timeout(&target, timeout).map_err(|e| step("connect", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| step("setsockopt", e))?;
    s.set_nodelay(true).map_err(|e| step("setsockopt", e))?;
    s.write_all(b"x\n").map_err(|e| step("send", e))?;
    let mut got = 0;
    loop {
        let n = s.read(&mut buf[got..]).map_err(|e| step("read", e))?;
        if n == 0 {
            return Err("UnexpectedEof: connection closed without a full reply (read)".into());
        }
        got += n;
        if buf[..got].contains(&b'\n') || got == buf.len() {
            break;
        }
    }
    backend_of(&buf[..got]).ok_or_else(|| {
        format!(
            "bad reply `{}`",
            String::from_utf8_lossy(&buf[..got]).trim()
        )
    })
}

fn udp_sockets(target: SocketAddr, flows: usize) -> io::Result<Vec<UdpSocket>> {
    (0..flows)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(target)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect()
}

fn udp_worker(
    socks: Vec<UdpSocket>,
    deadline: Instant,
    timeout: Duration,
) -> io::Result<LoadReport> {
    let mut r = LoadReport::default();
    let mut pfds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut sent_at = vec![Instant::now(); socks.len()];
    let send = |r: &mut LoadReport, s: &UdpSocket| {
        r.sent += 1;
        if let Err(e) = s.send(b"x\n") {
            if e.kind() != io::ErrorKind::WouldBlock {
                r.errors += 1;
                r.note_error(format!("{:?}: {e} (send)", e.kind()));
            }
        }
    };
    for (i, s) in socks.iter().enumerate() {
        send(&mut r, s);
        sent_at[i] = Instant::now();
    }
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let wait_ms = (deadline - now).as_millis().clamp(1, 10) as libc::c_int;
        // SAFETY: pfds is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let now = Instant::now();
        for (i, s) in socks.iter().enumerate() {
            let mut answered = false;
            if pfds[i].revents != 0 {
                loop {
                    match s.recv(&mut buf) {
                        Ok(len) => {
                            answered = true;
                            match backend_of(&buf[..len]) {
                                Some(name) => {
                                    r.ok += 1;
                                    *r.backends.entry(name).or_default() += 1;
                                }
                                None => {
                                    r.errors += 1;
                                    r.note_error(format!(
                                        "bad reply `{}`",
                                        String::from_utf8_lossy(&buf[..len]).trim()
                                    ));
                                }
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // E.g. ECONNREFUSED from an ICMP port unreachable.
                            answered = true;
                            r.errors += 1;
                            r.note_error(format!("{:?}: {e} (recv)", e.kind()));
                            break;
                        }
                    }
                }
                pfds[i].revents = 0;
            }
            if !answered && now.duration_since(sent_at[i]) >= timeout {
                r.errors += 1;
                r.note_error(format!(
                    "TimedOut: no reply within {} ms",
                    timeout.as_millis()
                ));
                answered = true;
            }
            if answered && now < deadline {
                send(&mut r, s);
                sent_at[i] = now;
            }
        }
    }
    Ok(r)
}
