//! Echo server of the lab's pods: for every TCP line and every UDP datagram it answers
//! `NAME PEER_IP:PEER_PORT`, so a client learns which backend served it and which source address
//! the backend saw. Prints `ready` once every socket is bound.
use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, UdpSocket},
    thread,
};

fn main() {
    let mut name = String::new();
    let mut ports = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--name" => name = args.next().expect("--name NAME"),
            "--port" => ports.push(args.next().expect("--port P").parse::<u16>().expect("port")),
            other => panic!("lab-echo: unknown argument {other}"),
        }
    }
    let mut handles = Vec::new();
    for port in ports {
        let tcp = TcpListener::bind(("0.0.0.0", port)).expect("bind tcp");
        let udp = UdpSocket::bind(("0.0.0.0", port)).expect("bind udp");
        let n = name.clone();
        handles.push(thread::spawn(move || {
            for conn in tcp.incoming().flatten() {
                let n = n.clone();
                thread::spawn(move || {
                    let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                    let mut w = conn.try_clone().expect("clone");
                    for line in BufReader::new(conn).lines() {
                        if line.is_err() || writeln!(w, "{n} {peer}").is_err() {
                            break;
                        }
                    }
                });
            }
        }));
        let n = name.clone();
        handles.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("{n} {from}\n").as_bytes(), from);
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush().expect("stdout");
    for h in handles {
        let _ = h.join();
    }
}
