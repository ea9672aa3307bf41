//! Echo server of the lab's pods.
//!
//! `lab-echo --name NAME --port P [--port P ...]` binds 0.0.0.0:P and [::]:P for TCP and UDP for
//! each port; the IPv6 sockets are IPV6_V6ONLY, so an IPv4 peer still shows as `a.b.c.d:port`
//! (not `[::ffff:a.b.c.d]:port`) and an IPv6 peer as `[addr]:port`.
//! For every TCP line and every UDP datagram it answers `NAME PEER_IP:PEER_PORT\n`, the peer as
//! `accept()` / `recvfrom()` saw it, so a client learns which backend served it and which source
//! address reached the backend. Prints `ready` on stdout once every socket is bound.
use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::exit,
    thread,
};

fn usage(why: &str) -> ! {
    eprintln!("lab-echo: {why}\nusage: lab-echo --name NAME --port P [--port P ...]");
    exit(2)
}

fn main() {
    let mut name = None;
    let mut ports = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--name" => name = Some(value),
            "--port" => ports.push(
                value
                    .parse::<u16>()
                    .unwrap_or_else(|_| usage(&format!("bad port {value}"))),
            ),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let name = name.unwrap_or_else(|| usage("--name is required"));
    if ports.is_empty() {
        usage("at least one --port is required");
    }

    // Bind everything first so that `ready` means every socket accepts traffic.
    let mut sockets = Vec::new();
    for port in ports {
        let tcp = TcpListener::bind(("0.0.0.0", port))
            .unwrap_or_else(|e| fail(&format!("cannot bind TCP 0.0.0.0:{port}: {e}")));
        let udp = UdpSocket::bind(("0.0.0.0", port))
            .unwrap_or_else(|e| fail(&format!("cannot bind UDP 0.0.0.0:{port}: {e}")));
        sockets.push((tcp, udp));
        let (tcp, udp) = bind6(port).unwrap_or_else(|e| fail(&format!("[::]:{port}: {e}")));
        sockets.push((tcp, udp));
    }
    let mut threads = Vec::new();
    for (tcp, udp) in sockets {
        let n = name.clone();
        threads.push(thread::spawn(move || serve_tcp(&n, tcp)));
        let n = name.clone();
        threads.push(thread::spawn(move || serve_udp(&n, udp)));
    }
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ready").and_then(|_| out.flush()).is_err() {
        fail("cannot write to stdout");
    }
    drop(out);
    for t in threads {
        let _ = t.join();
    }
}

/// TCP and UDP sockets on `[::]:port` that take IPv6 peers only (IPV6_V6ONLY).
fn bind6(port: u16) -> std::io::Result<(TcpListener, UdpSocket)> {
    use socket2::{Domain, Socket, Type};
    let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into();
    let tcp = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    tcp.set_only_v6(true)?;
    tcp.set_reuse_address(true)?;
    tcp.bind(&addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind TCP: {e}")))?;
    tcp.listen(1024)?;
    let udp = Socket::new(Domain::IPV6, Type::DGRAM, None)?;
    udp.set_only_v6(true)?;
    udp.bind(&addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind UDP: {e}")))?;
    Ok((tcp.into(), udp.into()))
}

fn fail(msg: &str) -> ! {
    eprintln!("lab-echo: {msg}");
    exit(1)
}

fn serve_tcp(name: &str, listener: TcpListener) {
    loop {
        match listener.accept() {
            Ok((conn, peer)) => {
                let reply = format!("{name} {peer}\n");
                thread::spawn(move || answer_lines(conn, &reply));
            }
            Err(e) => eprintln!("lab-echo {name}: accept: {e}"),
        }
    }
}

/// One reply per line received, until the peer closes.
fn answer_lines(conn: TcpStream, reply: &str) {
    let Ok(mut w) = conn.try_clone() else { return };
    for line in BufReader::new(conn).lines() {
        if line.is_err() || w.write_all(reply.as_bytes()).is_err() {
            break;
        }
    }
}

fn serve_udp(name: &str, sock: UdpSocket) {
    let mut buf = [0u8; 65536];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((_, from)) => {
                if let Err(e) = sock.send_to(format!("{name} {from}\n").as_bytes(), from) {
                    eprintln!("lab-echo {name}: send_to {from}: {e}");
                }
            }
            Err(e) => eprintln!("lab-echo {name}: recv_from: {e}"),
        }
    }
}
