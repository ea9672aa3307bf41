//! Socket termination on the real kernel: the iterator programs load (the verifier accepts the
//! hand-assembled `bpf_sock_destroy` call), destroy exactly the listed sockets that are still
//! connected to the listed backend, in the agent's namespace and in another one, and leave
//! every other socket alone. Loopback sockets only, in this process's namespace and in one
//! the test creates. IPv4 and IPv6 backends: an IPv4 one matches an AF_INET socket's (or an
//! AF_INET6 socket's IPv4-mapped) peer, an IPv6 one only an AF_INET6 socket's IPv6 peer.
use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    time::Duration,
};

use lb_common::proto;
use lb_tests::netns::ScratchNetns;
use lb_userspace::dataplane::sock_term::{self, SockTerminator, Target};

fn cookie(fd: &impl AsRawFd) -> u64 {
    let mut c = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: SO_COOKIE writes a u64 into `c`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut c as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    c
}

fn target(fd: &impl AsRawFd, backend: SocketAddr, p: u8) -> Target {
    Target {
        cookie: cookie(fd),
        backend,
        proto: p,
    }
}

/// A connected UDP socket still answers through its server.
fn udp_works(c: &UdpSocket, server: &UdpSocket) -> bool {
    if c.send(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let Ok((n, from)) = server.recv_from(&mut buf) else {
        return false;
    };
    server.send_to(&buf[..n], from).is_ok() && c.recv(&mut buf).is_ok()
}

#[test]
fn sock_destroy_terminates_listed_sockets_connected_to_their_backend() {
    let term = SockTerminator::new().expect("socket termination needs Linux >= 6.5 with BTF");
    let t = Duration::from_secs(2);

    // UDP: one doomed socket, one listed but connected to another backend (it reconnected),
    // one not listed.
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let other = UdpSocket::bind("127.0.0.1:0").unwrap();
    server.set_read_timeout(Some(t)).unwrap();
    other.set_read_timeout(Some(t)).unwrap();
    let doomed = UdpSocket::bind("127.0.0.1:0").unwrap();
    doomed.connect(server.local_addr().unwrap()).unwrap();
    let moved = UdpSocket::bind("127.0.0.1:0").unwrap();
    moved.connect(other.local_addr().unwrap()).unwrap();
    let bystander = UdpSocket::bind("127.0.0.1:0").unwrap();
    bystander.connect(server.local_addr().unwrap()).unwrap();
    for s in [&doomed, &moved, &bystander] {
        s.set_read_timeout(Some(t)).unwrap();
    }
    assert!(udp_works(&doomed, &server));

    // TCP: one doomed connection, one bystander to the same listener.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let mut tcp_doomed = TcpStream::connect(backend).unwrap();
    let (mut tcp_doomed_peer, _) = listener.accept().unwrap();
    let mut tcp_bystander = TcpStream::connect(backend).unwrap();
    let (mut tcp_bystander_peer, _) = listener.accept().unwrap();
    for s in [
        &tcp_doomed,
        &tcp_doomed_peer,
        &tcp_bystander,
        &tcp_bystander_peer,
    ] {
        s.set_read_timeout(Some(t)).unwrap();
    }

    let targets = [
        target(&doomed, server.local_addr().unwrap(), proto::UDP),
        // Listed with the backend it no longer talks to.
        target(&moved, server.local_addr().unwrap(), proto::UDP),
        target(&tcp_doomed, backend, proto::TCP),
    ];
    let namespaces = [Path::new("/proc/self/ns/net").to_path_buf()];
    let out = term.terminate(&targets, &namespaces).unwrap();
    assert_eq!(
        (out.terminated, out.failed, out.gone, out.namespaces),
        (2, 0, 1, 1),
        "{out:?}"
    );

    // The destroyed UDP socket reports the abort, then has no peer any more.
    let mut buf = [0u8; 16];
    let e = doomed.recv(&mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
    assert!(doomed.send(b"ping").is_err());
    assert!(
        udp_works(&moved, &other),
        "a socket connected elsewhere stays"
    );
    assert!(udp_works(&bystander, &server), "an unlisted socket stays");

    // The destroyed TCP connection is aborted on both ends; the other one goes on.
    let e = tcp_doomed.read(&mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
    match tcp_doomed_peer.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the backend's end of an aborted connection: {other:?}"),
    }
    tcp_bystander.write_all(b"hi").unwrap();
    assert_eq!(tcp_bystander_peer.read(&mut buf).unwrap(), 2);

    // Terminating again finds nothing: the sockets are gone.
    let again = term.terminate(&targets[..1], &namespaces).unwrap();
    assert_eq!((again.terminated, again.gone), (0, 1), "{again:?}");
}

#[test]
fn sock_destroy_reaches_sockets_of_other_namespaces() {
    let term = SockTerminator::new().expect("socket termination needs Linux >= 6.5 with BTF");
    let ns = ScratchNetns::new("lbst").unwrap();
    let path = ns.path();

    // A socket pair made by a thread that entered the namespace (sockets belong to the
    // namespace of the thread that creates them).
    let (server, client) = std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: setns with a valid namespace fd moves this thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let server = UdpSocket::bind("127.0.0.1:0").unwrap();
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            client.connect(server.local_addr().unwrap()).unwrap();
            (server, client)
        })
        .join()
        .unwrap()
    });
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let targets = [target(&client, server.local_addr().unwrap(), proto::UDP)];

    // Walking only this process's namespace does not find it.
    let here = [Path::new("/proc/self/ns/net").to_path_buf()];
    let out = term.terminate(&targets, &here).unwrap();
    assert_eq!((out.terminated, out.gone), (0, 1), "{out:?}");

    // The node's namespace list has it (named namespaces included), and the walk reaches it.
    let all = sock_term::namespaces(Path::new("/proc"));
    assert!(all.iter().any(|p| p == &path), "{all:?}");
    let out = term.terminate(&targets, &all).unwrap();
    assert_eq!((out.terminated, out.failed), (1, 0), "{out:?}");
    let mut buf = [0u8; 8];
    let e = client.recv(&mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
}

/// The destroyed TCP connection is aborted on both ends.
fn tcp_aborted(c: &mut TcpStream, peer: &mut TcpStream) {
    let mut buf = [0u8; 16];
    let e = c.read(&mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
    match peer.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the backend's end of an aborted connection: {other:?}"),
    }
}

/// A destroyed UDP socket reports the abort, then has no peer any more.
fn udp_aborted(c: &UdpSocket) {
    let mut buf = [0u8; 16];
    let e = c.recv(&mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
    assert!(c.send(b"ping").is_err());
}

#[test]
fn sock_destroy_terminates_ipv6_sockets_connected_to_their_ipv6_backend() {
    let term = SockTerminator::new().expect("socket termination needs Linux >= 6.5 with BTF");
    let t = Duration::from_secs(2);
    let udp = |a: &str| {
        let s = UdpSocket::bind(a).unwrap();
        s.set_read_timeout(Some(t)).unwrap();
        s
    };

    // UDP over ::1: one doomed socket, one listed but connected to another backend, one
    // listed with another port of its backend, one not listed.
    let server = udp("[::1]:0");
    let other = udp("[::1]:0");
    let backend = server.local_addr().unwrap();
    let doomed = udp("[::1]:0");
    doomed.connect(backend).unwrap();
    let moved = udp("[::1]:0");
    moved.connect(other.local_addr().unwrap()).unwrap();
    let other_port = udp("[::1]:0");
    other_port.connect(backend).unwrap();
    let bystander = udp("[::1]:0");
    bystander.connect(backend).unwrap();
    assert!(udp_works(&doomed, &server));

    // An AF_INET socket listed with an IPv6 backend of its port, the unspecified address
    // (what its unused skc_v6_daddr holds): the family check leaves it alone.
    let server4 = udp("127.0.0.1:0");
    let v4 = udp("127.0.0.1:0");
    v4.connect(server4.local_addr().unwrap()).unwrap();
    let v4_as_v6 = SocketAddr::new(
        Ipv6Addr::UNSPECIFIED.into(),
        server4.local_addr().unwrap().port(),
    );

    // An AF_INET6 socket with an IPv4-mapped peer, listed with the IPv4 backend (as the
    // IPv4 socket records list it): destroyed through skc_daddr, as before.
    let mapped = udp("[::]:0");
    let mapped_peer = SocketAddr::V6(SocketAddrV6::new(
        Ipv4Addr::LOCALHOST.to_ipv6_mapped(),
        server4.local_addr().unwrap().port(),
        0,
        0,
    ));
    mapped.connect(mapped_peer).unwrap();
    assert!(udp_works(&mapped, &server4));

    // TCP over ::1: one doomed connection, one bystander to the same listener.
    let listener = TcpListener::bind("[::1]:0").unwrap();
    let tcp_backend = listener.local_addr().unwrap();
    let mut tcp_doomed = TcpStream::connect(tcp_backend).unwrap();
    let (mut tcp_doomed_peer, _) = listener.accept().unwrap();
    let mut tcp_bystander = TcpStream::connect(tcp_backend).unwrap();
    let (mut tcp_bystander_peer, _) = listener.accept().unwrap();
    for s in [
        &tcp_doomed,
        &tcp_doomed_peer,
        &tcp_bystander,
        &tcp_bystander_peer,
    ] {
        s.set_read_timeout(Some(t)).unwrap();
    }

    let wrong_port = SocketAddr::new(backend.ip(), backend.port() ^ 1);
    let targets = [
        target(&doomed, backend, proto::UDP),
        target(&moved, backend, proto::UDP),
        target(&other_port, wrong_port, proto::UDP),
        target(&v4, v4_as_v6, proto::UDP),
        target(&mapped, server4.local_addr().unwrap(), proto::UDP),
        target(&tcp_doomed, tcp_backend, proto::TCP),
    ];
    let namespaces = [Path::new("/proc/self/ns/net").to_path_buf()];
    let out = term.terminate(&targets, &namespaces).unwrap();
    assert_eq!(
        (out.terminated, out.failed, out.gone, out.namespaces),
        (3, 0, 3, 1),
        "{out:?}"
    );

    udp_aborted(&doomed);
    udp_aborted(&mapped);
    assert!(
        udp_works(&moved, &other),
        "a socket connected elsewhere stays"
    );
    assert!(
        udp_works(&other_port, &server),
        "a socket connected to another port stays"
    );
    assert!(udp_works(&bystander, &server), "an unlisted socket stays");
    assert!(
        udp_works(&v4, &server4),
        "an AF_INET socket listed with an IPv6 backend stays"
    );
    tcp_aborted(&mut tcp_doomed, &mut tcp_doomed_peer);
    let mut buf = [0u8; 16];
    tcp_bystander.write_all(b"hi").unwrap();
    assert_eq!(tcp_bystander_peer.read(&mut buf).unwrap(), 2);

    // Terminating again finds nothing: the sockets are gone.
    let again = term.terminate(&targets[..1], &namespaces).unwrap();
    assert_eq!((again.terminated, again.gone), (0, 1), "{again:?}");
}

/// A TCP connection from `local` to `remote` (bound first).
fn tcp_from(local: &str, remote: SocketAddr) -> TcpStream {
    let local: SocketAddr = local.parse().unwrap();
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    s.bind(&local.into()).unwrap();
    s.connect(&remote.into()).unwrap();
    s.into()
}

#[test]
fn sock_destroy_reaches_ipv6_sockets_of_other_namespaces() {
    let term = SockTerminator::new().expect("socket termination needs Linux >= 6.5 with BTF");
    let ns = ScratchNetns::new("lbst6").unwrap();
    for a in ["fd00:5e::1/128", "fd00:5e::2/128"] {
        lb_tests::netns::ip(&ns.name, &["addr", "add", a, "dev", "lo", "nodad"]).unwrap();
    }
    let path = ns.path();

    // Sockets made by a thread that entered the namespace, on its ULAs (backends on ::1,
    // clients on ::2, so that the peer address differs from the socket's own): a connected
    // UDP socket and a TCP connection, each with a bystander to the same backend.
    let (server, client, udp_bystander, listener, tcp, tcp_peer, tcp_bystander, tcp_by_peer) =
        std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(&path).unwrap();
                // SAFETY: setns with a valid namespace fd moves this thread only.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                let server = UdpSocket::bind("[fd00:5e::1]:0").unwrap();
                let client = UdpSocket::bind("[fd00:5e::2]:0").unwrap();
                client.connect(server.local_addr().unwrap()).unwrap();
                let bystander = UdpSocket::bind("[fd00:5e::2]:0").unwrap();
                bystander.connect(server.local_addr().unwrap()).unwrap();
                let listener = TcpListener::bind("[fd00:5e::1]:0").unwrap();
                let tcp = tcp_from("[fd00:5e::2]:0", listener.local_addr().unwrap());
                let (peer, _) = listener.accept().unwrap();
                let tcp_bystander = tcp_from("[fd00:5e::2]:0", listener.local_addr().unwrap());
                let (by_peer, _) = listener.accept().unwrap();
                (
                    server,
                    client,
                    bystander,
                    listener,
                    tcp,
                    peer,
                    tcp_bystander,
                    by_peer,
                )
            })
            .join()
            .unwrap()
        });
    let (mut tcp, mut tcp_peer, mut tcp_bystander, mut tcp_by_peer) =
        (tcp, tcp_peer, tcp_bystander, tcp_by_peer);
    let t = Some(Duration::from_secs(2));
    for s in [&server, &client, &udp_bystander] {
        s.set_read_timeout(t).unwrap();
    }
    for s in [&tcp, &tcp_peer, &tcp_bystander, &tcp_by_peer] {
        s.set_read_timeout(t).unwrap();
    }
    assert!(udp_works(&client, &server));
    let targets = [
        target(&client, server.local_addr().unwrap(), proto::UDP),
        target(&tcp, listener.local_addr().unwrap(), proto::TCP),
    ];

    // Walking only this process's namespace does not find them.
    let here = [Path::new("/proc/self/ns/net").to_path_buf()];
    let out = term.terminate(&targets, &here).unwrap();
    assert_eq!((out.terminated, out.gone), (0, 2), "{out:?}");
    assert!(udp_works(&client, &server));

    // The node's namespace list has the scratch one, and the walk reaches them.
    let all = sock_term::namespaces(Path::new("/proc"));
    assert!(all.iter().any(|p| p == &path), "{all:?}");
    let out = term.terminate(&targets, &all).unwrap();
    assert_eq!((out.terminated, out.failed), (2, 0), "{out:?}");
    udp_aborted(&client);
    tcp_aborted(&mut tcp, &mut tcp_peer);
    assert!(
        udp_works(&udp_bystander, &server),
        "an unlisted socket stays"
    );
    let mut buf = [0u8; 4];
    tcp_bystander.write_all(b"hi").unwrap();
    assert_eq!(tcp_by_peer.read(&mut buf).unwrap(), 2);
}
