//! Load generator of the lab benchmarks (`lb_tests::bench::labbench`): drives `lab-echo` servers
//! (directly or through a Service address) for a fixed time and prints one JSON line, a
//! `lb_tests::bench::labbench::LoadReport`.
//!
//! ```text
//! lab-load tcp IP:PORT[,IP:PORT...] --duration-ms D [--workers W] [--timeout-ms T]
//!     W threads, each in a loop: open a NEW connection, send one line, read the one-line reply
//!     (`NAME IP:PORT`), close. `ok` counts requests whose reply arrived. With several targets,
//!     worker i connects to target i mod (number of targets).
//! lab-load udp IP:PORT[,IP:PORT...] --duration-ms D [--workers W] [--flows F] [--timeout-ms T]
//!     W threads with F connected sockets each (distinct source ports); every socket keeps one
//!     datagram in flight and sends the next as soon as the reply arrives, or after T without
//!     one (counted as an error). `ok` counts replies received. With several targets, worker i
//!     sends to target i mod (number of targets).
//! lab-load udp-flows IP:PORT --flows N --first-port P [--window W] [--timeout-ms T] [--tries R]
//!     N flows, one per source port P..P+N-1 (bound explicitly, so every flow is a distinct
//!     four-tuple): each sends one datagram and waits for the reply, sending it again after T
//!     without one, at most R times. W flows are in flight at once; a flow's socket is closed
//!     once answered. `ok` counts flows answered, `errors` flows never answered (or whose socket
//!     failed), `sent` datagrams.
//! lab-load syn-flood IP:PORT --count N [--ack] [--pps R] [--seed S]
//!     N TCP SYNs through a raw socket (IPPROTO_RAW: the packets carry their own IP header),
//!     each from a different spoofed source address (IPv4: 198.18.0.0/15, RFC 2544's benchmark
//!     range; IPv6: 131,072 addresses of 2001:2::/48, RFC 5180's) and port; with --ack each SYN is
//!     followed by a bare ACK of the same four-tuple (an acknowledgement number nobody sent), as a
//!     spoofer trying to confirm flows would. At most R packets per second when given. `sent`
//!     counts packets sent, `ok` SYNs sent, `errors` packets the socket refused.
//! ```
//! Targets may be IPv4 or IPv6 (`[ADDR]:PORT`); sockets are of the target's family.
//! Exits 0 whatever the errors (they are counted); 2 on bad arguments, 1 when sockets cannot be
//! created at all.
use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::exit,
    sync::{Arc, Barrier},
    thread,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use lb_tests::bench::labbench::LoadReport;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

struct Args {
    proto: String,
    targets: Vec<SocketAddr>,
    duration: Duration,
    workers: usize,
    flows: usize,
    timeout: Duration,
    first_port: u16,
    window: usize,
    tries: u32,
    count: u64,
    ack: bool,
    pps: u64,
    seed: u64,
}

const USAGE: &str =
    "usage: lab-load tcp|udp IP:PORT --duration-ms D [--workers W] [--flows F] [--timeout-ms T]
       lab-load udp-flows IP:PORT --flows N --first-port P [--window W] [--timeout-ms T] [--tries R]
       lab-load syn-flood IP:PORT --count N [--ack] [--pps R] [--seed S]";

fn usage(why: &str) -> ! {
    eprintln!("lab-load: {why}\n{USAGE}");
    exit(2)
}

fn parse_args() -> Args {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(proto), Some(target)) = (args.first(), args.get(1)) else {
        usage("missing mode or target")
    };
    if !["tcp", "udp", "udp-flows", "syn-flood"].contains(&proto.as_str()) {
        usage(&format!("unknown mode {proto}"));
    }
    let targets: Vec<SocketAddr> = target
        .split(',')
        .map(|t| {
            t.parse()
                .unwrap_or_else(|_| usage(&format!("bad target {t} (IP:PORT)")))
        })
        .collect();
    if targets.len() > 1 && proto != "tcp" && proto != "udp" {
        usage("several targets only for tcp and udp");
    }
    let mut a = Args {
        proto: proto.clone(),
        targets,
        duration: Duration::from_secs(5),
        workers: 4,
        flows: 16,
        timeout: Duration::from_millis(match proto.as_str() {
            "tcp" => 2000,
            "udp-flows" => 500,
            _ => 300,
        }),
        first_port: 40000,
        window: 256,
        tries: 3,
        count: 0,
        ack: false,
        pps: 0,
        seed: 1,
    };
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        if flag == "--ack" {
            a.ack = true;
            continue;
        }
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
            "--first-port" => {
                a.first_port = u16::try_from(n)
                    .ok()
                    .filter(|p| *p > 0)
                    .unwrap_or_else(|| usage(&format!("bad port {n}")))
            }
            "--window" => a.window = (n as usize).max(1),
            "--tries" => a.tries = (n as u32).max(1),
            "--count" => a.count = n,
            "--pps" => a.pps = n,
            "--seed" => a.seed = n,
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if a.proto == "udp-flows" && a.first_port as usize + a.flows > 65536 {
        usage("--first-port + --flows goes past port 65535");
    }
    a
}

fn main() {
    let a = parse_args();
    let started = Instant::now();
    let outcome = match a.proto.as_str() {
        "udp-flows" => udp_flows(&a),
        "syn-flood" => syn_flood(&a),
        _ => Ok(timed_load(&a)),
    };
    let mut report = match outcome {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lab-load: cannot set up sockets: {e}");
            exit(1)
        }
    };
    if report.elapsed_s == 0.0 {
        report.elapsed_s = started.elapsed().as_secs_f64();
    }
    match serde_json::to_string(&report) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("lab-load: json: {e}");
            exit(1)
        }
    }
}

/// `tcp` and `udp`: workers for a fixed time.
fn timed_load(a: &Args) -> LoadReport {
    let barrier = Arc::new(Barrier::new(a.workers + 1));
    let mut handles = Vec::new();
    for i in 0..a.workers {
        let (proto, target, duration, flows, timeout, barrier) = (
            a.proto.clone(),
            a.targets[i % a.targets.len()],
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
    report
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

/// The unspecified address of `target`'s family, port `port`: where a client socket binds.
fn any_of(target: SocketAddr, port: u16) -> SocketAddr {
    let ip: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, port)
}

fn udp_sockets(target: SocketAddr, flows: usize) -> io::Result<Vec<UdpSocket>> {
    (0..flows)
        .map(|_| {
            let s = UdpSocket::bind(any_of(target, 0))?;
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

/// `udp-flows`: see the module documentation.
fn udp_flows(a: &Args) -> io::Result<LoadReport> {
    struct Flow {
        sock: UdpSocket,
        port: u16,
        sent_at: Instant,
        tries: u32,
        done: bool,
    }
    let target = a.targets[0];
    let mut r = LoadReport {
        proto: a.proto.clone(),
        workers: 1,
        flows: a.flows,
        ..Default::default()
    };
    let started = Instant::now();
    let mut next = 0usize;
    let mut active: Vec<Flow> = Vec::with_capacity(a.window);
    let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(a.window);
    let mut buf = [0u8; 2048];
    let send = |r: &mut LoadReport, f: &mut Flow| {
        r.sent += 1;
        f.sent_at = Instant::now();
        if let Err(e) = f.sock.send(b"x\n") {
            if e.kind() != io::ErrorKind::WouldBlock {
                r.errors += 1;
                r.note_error(format!("{:?}: {e} (send from port {})", e.kind(), f.port));
                f.done = true;
            }
        }
    };
    while next < a.flows || !active.is_empty() {
        while active.len() < a.window && next < a.flows {
            let port = (a.first_port as usize + next) as u16;
            next += 1;
            let opened = UdpSocket::bind(any_of(target, port)).and_then(|s| {
                s.connect(target)?;
                s.set_nonblocking(true)?;
                Ok(s)
            });
            match opened {
                Ok(sock) => {
                    let mut f = Flow {
                        sock,
                        port,
                        sent_at: Instant::now(),
                        tries: 1,
                        done: false,
                    };
                    send(&mut r, &mut f);
                    if !f.done {
                        active.push(f);
                    }
                }
                Err(e) => {
                    r.errors += 1;
                    r.note_error(format!("{:?}: {e} (bind port {port})", e.kind()));
                }
            }
        }
        pfds.clear();
        pfds.extend(active.iter().map(|f| libc::pollfd {
            fd: f.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        // SAFETY: pfds is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 10) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let now = Instant::now();
        for (f, p) in active.iter_mut().zip(&pfds) {
            if p.revents != 0 {
                match f.sock.recv(&mut buf) {
                    Ok(len) => match backend_of(&buf[..len]) {
                        Some(name) => {
                            r.ok += 1;
                            *r.backends.entry(name).or_default() += 1;
                            f.done = true;
                        }
                        None => {
                            r.note_error(format!(
                                "bad reply `{}`",
                                String::from_utf8_lossy(&buf[..len]).trim()
                            ));
                        }
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        // E.g. ECONNREFUSED from an ICMP port unreachable.
                        r.errors += 1;
                        r.note_error(format!("{:?}: {e} (recv on port {})", e.kind(), f.port));
                        f.done = true;
                    }
                }
            }
            if !f.done && now.duration_since(f.sent_at) >= a.timeout {
                if f.tries < a.tries {
                    f.tries += 1;
                    send(&mut r, f);
                } else {
                    r.errors += 1;
                    r.note_error(format!(
                        "TimedOut: no reply within {} tries of {} ms",
                        a.tries,
                        a.timeout.as_millis()
                    ));
                    f.done = true;
                }
            }
        }
        active.retain(|f| !f.done);
    }
    r.elapsed_s = started.elapsed().as_secs_f64();
    Ok(r)
}

/// `syn-flood`: see the module documentation.
fn syn_flood(a: &Args) -> io::Result<LoadReport> {
    let target = a.targets[0];
    // IPPROTO_RAW: the packets carry their own IP header (IP_HDRINCL, and its IPv6 twin).
    let sock = Socket::new(
        Domain::for_address(target),
        Type::from(libc::SOCK_RAW),
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    // A raw socket's destination port must be 0 (or the protocol, for IPv6).
    let dst = SockAddr::from(SocketAddr::new(target.ip(), 0));
    let mut r = LoadReport {
        proto: a.proto.clone(),
        workers: 1,
        ..Default::default()
    };
    // xorshift64*: the same seed floods with the same tuples.
    let mut state = a.seed.max(1);
    let mut random = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let send = |r: &mut LoadReport, pkt: &[u8]| {
        // ENOBUFS: the device queue is full for a moment; wait and try again.
        for attempt in 0..100 {
            let e = match sock.send_to(pkt, &dst) {
                Ok(_) => {
                    r.sent += 1;
                    return true;
                }
                Err(e) => e,
            };
            if e.raw_os_error() == Some(libc::ENOBUFS) && attempt < 99 {
                thread::sleep(Duration::from_micros(200));
                continue;
            }
            r.errors += 1;
            r.note_error(format!("{:?}: {e} (sendto)", e.kind()));
            return false;
        }
        false
    };
    let started = Instant::now();
    let per_syn = if a.ack { 2 } else { 1 };
    let mut pkt = Vec::with_capacity(64);
    // The IP header of a packet from spoofed source number `n` (its low 17 bits count).
    let ip = |n: u32| match target.ip() {
        IpAddr::V4(dst) => {
            // 198.18.0.0/15.
            let src = Ipv4Addr::from(0xc612_0000u32 | (n & 0x1_ffff));
            PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        }
        IpAddr::V6(dst) => {
            // 2001:2::/48, the same 17 bits at the end.
            let src = Ipv6Addr::from(0x2001_0002_u128 << 96 | u128::from(n & 0x1_ffff));
            PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
        }
    };
    for i in 0..a.count {
        let x = random();
        // Addresses cycle through 131,072 of the range; ports are random, so tuples repeat only
        // by chance after 131,072 SYNs.
        let src = i as u32;
        let sport = 1024 + (x as u16 % 64_000);
        let seq = (x >> 32) as u32;
        pkt.clear();
        ip(src)
            .tcp(sport, target.port(), seq, 64_240)
            .syn()
            .write(&mut pkt, &[])
            .map_err(io::Error::other)?;
        if send(&mut r, &pkt) {
            r.ok += 1;
        }
        if a.ack {
            pkt.clear();
            ip(src)
                .tcp(sport, target.port(), seq.wrapping_add(1), 64_240)
                .ack(random() as u32)
                .write(&mut pkt, &[])
                .map_err(io::Error::other)?;
            send(&mut r, &pkt);
        }
        if a.pps > 0 && i % 64 == 63 {
            let due = Duration::from_secs_f64(((i + 1) * per_syn) as f64 / a.pps as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                thread::sleep(ahead);
            }
        }
    }
    r.elapsed_s = started.elapsed().as_secs_f64();
    Ok(r)
}
