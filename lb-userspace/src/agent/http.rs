//! The agent's HTTP serving: one small tokio runtime on a thread of its own ("http") serves every
//! listener of the agent (`--metrics-addr`, `--health-addr`, each healthCheckNodePort) with
//! hyper's HTTP/1.1 server, so that no client, however slow, holds another client's answer or the
//! agent's loop.
//!
//! Limits, per connection unless said otherwise:
//! - [`MAX_CONNECTIONS`] open connections per listener: at the cap the listener stops accepting
//!   (new connections wait in the kernel's backlog) until one closes; a cap per listener, so
//!   clients of one port (a healthCheckNodePort open to the world) never use up another's (the
//!   kubelet's probes of `--health-addr`);
//! - [`HEADER_READ_TIMEOUT`] to send a whole request head, counted from the connection's start
//!   or the end of its previous answer (so it is also the keep-alive idle timeout): a client
//!   sending a byte a second is cut off after it;
//! - [`MAX_HEAD_BYTES`] of request head and [`MAX_HEADERS`] headers (431 beyond);
//! - [`CONNECTION_DEADLINE`] for everything, answers included: a client that never reads a large
//!   answer holds its connection no longer;
//! - request bodies are never read for a handler (hyper drains what already arrived with the
//!   head, else closes the connection after the answer); only GET and HEAD are answered (405
//!   otherwise).
//!
//! Handlers answer from memory ([`Work::Inline`], on the runtime's thread: health answers read a
//! few atomics) or may take time ([`Work::Blocking`]: `/metrics`, run on the runtime's blocking
//! pool of at most [`BLOCKING_THREADS`] threads, so that a scrape never delays a health answer).
//! Closing a listener ([`Serving::close`]) aborts its accept loop and all its connections and
//! waits only for the runtime to drop the listening socket (at most [`CLOSE_WAIT`]), never for a
//! client.
use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{mpsc, Arc},
    thread,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, server::conn::http1, service::service_fn, Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    runtime::Handle,
    sync::{oneshot, watch, Semaphore},
    task::AbortHandle,
};

/// Open connections per listener.
pub const MAX_CONNECTIONS: usize = 256;
/// Time to send a request head (also the keep-alive idle timeout).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may stay open, whatever it does.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(20);
/// Largest request head (hyper's read buffer; its minimum is 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most request headers.
pub const MAX_HEADERS: usize = 64;
/// Threads of the blocking pool ([`Work::Blocking`] handlers).
pub const BLOCKING_THREADS: usize = 2;
/// How long [`Serving::close`] waits for the runtime to drop the listening socket.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A response: status line text (e.g. `200 OK`), extra headers, body.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn not_found() -> Self {
        Self {
            status: "404 Not Found",
            headers: vec![],
            body: String::new(),
        }
    }

    /// The status code of the status line.
    pub fn code(&self) -> u16 {
        self.status
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(500)
    }
}

/// Answers a request path (query removed), `None` for 404.
pub type Handler = Arc<dyn Fn(&str) -> Option<Response> + Send + Sync>;

/// Where a listener's handler runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// On the runtime's thread: the handler must answer from memory, at once.
    Inline,
    /// On the blocking pool: the handler may read maps.
    Blocking,
}

/// The per-listener connection cap and the per-connection times (the defaults are the constants
/// above; tests shorten them).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub connection_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            connection_deadline: CONNECTION_DEADLINE,
        }
    }
}

struct Inner {
    handle: Handle,
    limits: Limits,
    /// Dropped with the last [`Server`] clone: the runtime's thread then ends.
    _shutdown: oneshot::Sender<()>,
}

/// The HTTP runtime; clones share it. It stops when the last clone and [`Serving`] are dropped.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    /// Starts the runtime's thread.
    pub fn start() -> io::Result<Self> {
        Self::start_with(Limits::default())
    }

    /// [`Server::start`] with other limits.
    pub fn start_with(limits: Limits) -> io::Result<Self> {
        let (handle_tx, handle_rx) = mpsc::channel();
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        thread::Builder::new().name("http".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .max_blocking_threads(BLOCKING_THREADS)
                .thread_name("http-blocking")
                .build();
            match rt {
                Ok(rt) => {
                    let _ = handle_tx.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = shutdown_rx.await;
                    });
                    // Never wait for a blocking handler or a client.
                    rt.shutdown_background();
                }
                Err(e) => {
                    let _ = handle_tx.send(Err(e));
                }
            }
        })?;
        let handle = handle_rx
            .recv()
            .map_err(|_| io::Error::other("the http thread ended before its runtime started"))??;
        Ok(Self {
            inner: Arc::new(Inner {
                handle,
                limits,
                _shutdown: shutdown,
            }),
        })
    }

    /// Serves `listener` with `handler` until the returned [`Serving`] is closed or dropped.
    pub fn serve(
        &self,
        listener: std::net::TcpListener,
        work: Work,
        handler: Handler,
    ) -> io::Result<Serving> {
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let listener = {
            let _rt = self.inner.handle.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (closed_tx, closed) = mpsc::sync_channel(1);
        let (cancel, _) = watch::channel(());
        let accepting = Accepting {
            listener: Some(listener),
            cancel,
            closed: closed_tx,
        };
        let task = self
            .inner
            .handle
            .spawn(accept(accepting, self.inner.limits, work, handler))
            .abort_handle();
        Ok(Serving {
            task,
            closed: Some(closed),
            local,
            _server: self.clone(),
        })
    }
}

/// One served listener.
pub struct Serving {
    task: AbortHandle,
    closed: Option<mpsc::Receiver<()>>,
    local: SocketAddr,
    _server: Server,
}

impl Serving {
    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting and aborts every connection of this listener; returns once the runtime
    /// has dropped the listening socket (so its port can be bound again), or after
    /// [`CLOSE_WAIT`] (false). Never waits for a client.
    pub fn close(mut self) -> bool {
        self.task.abort();
        match self.closed.take() {
            Some(rx) => rx.recv_timeout(CLOSE_WAIT).is_ok(),
            None => true,
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The accept loop's state: dropped when the loop is aborted.
struct Accepting {
    listener: Option<tokio::net::TcpListener>,
    /// Dropping it ends every connection of the listener.
    cancel: watch::Sender<()>,
    closed: mpsc::SyncSender<()>,
}

impl Drop for Accepting {
    fn drop(&mut self) {
        // The socket first, then the word that it is closed.
        drop(self.listener.take());
        let _ = self.closed.try_send(());
    }
}

async fn accept(a: Accepting, limits: Limits, work: Work, handler: Handler) {
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    let Some(listener) = a.listener.as_ref() else {
        return;
    };
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: try again shortly.
                log::debug!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut cancelled = a.cancel.subscribe();
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(answer(req, work, handler).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(MAX_HEAD_BYTES)
                .max_headers(MAX_HEADERS)
                .keep_alive(true)
                // `Content-Type`, as Go's servers (kube-proxy's) write header names.
                .title_case_headers(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(limits.connection_deadline, conn) => {}
                _ = cancelled.changed() => {}
            }
        });
    }
}

async fn answer(
    req: hyper::Request<Incoming>,
    work: Work,
    handler: Handler,
) -> hyper::Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return hyper::Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header(header::ALLOW, "GET, HEAD")
            .body(Full::new(Bytes::new()))
            .expect("a valid response");
    }
    let path = req.uri().path().to_string();
    let resp = match work {
        Work::Inline => handler(&path),
        Work::Blocking => tokio::task::spawn_blocking(move || handler(&path))
            .await
            .unwrap_or_else(|_| {
                Some(Response {
                    status: "500 Internal Server Error",
                    headers: vec![],
                    body: String::new(),
                })
            }),
    };
    to_hyper(resp.unwrap_or_else(Response::not_found))
}

fn to_hyper(r: Response) -> hyper::Response<Full<Bytes>> {
    let mut b = hyper::Response::builder()
        .status(StatusCode::from_u16(r.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    for (k, v) in &r.headers {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(Bytes::from(r.body))).unwrap_or_else(|_| {
        let mut e = hyper::Response::new(Full::new(Bytes::new()));
        *e.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        e
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        time::Instant,
    };

    use super::*;

    /// One request with `Connection: close`, read to the end: (status code, whole answer).
    pub(crate) fn get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
        request(addr, "GET", path)
    }

    pub(crate) fn request(addr: SocketAddr, method: &str, path: &str) -> io::Result<(u16, String)> {
        let mut c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        let code = s
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((code, s))
    }

    /// Clients that a one-at-a-time server would serve forever: `idle` connections that send
    /// nothing, one that sends its request head a byte a second and never finishes it, and one
    /// that asks for `big` and never reads the answer. Held until dropped.
    pub(crate) struct Hogs {
        _idle: Vec<TcpStream>,
        _unread: TcpStream,
        stop: Arc<std::sync::atomic::AtomicBool>,
        slow: Option<thread::JoinHandle<()>>,
    }

    impl Drop for Hogs {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(t) = self.slow.take() {
                let _ = t.join();
            }
        }
    }

    pub(crate) fn hogs(addr: SocketAddr, idle: usize, big: &str) -> Hogs {
        use std::sync::atomic::{AtomicBool, Ordering};
        let idle = (0..idle)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let mut unread = TcpStream::connect(addr).unwrap();
        write!(unread, "GET {big} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let slow = {
            let stop = stop.clone();
            let mut c = TcpStream::connect(addr).unwrap();
            thread::spawn(move || {
                let head = b"GET /healthz HTTP/1.1\r\nHost: a-very-slow-client\r\n";
                for b in head.iter().cycle() {
                    if stop.load(Ordering::Relaxed) || c.write_all(&[*b]).is_err() {
                        return;
                    }
                    thread::sleep(Duration::from_secs(1));
                }
            })
        };
        // Give the server time to see them all.
        thread::sleep(Duration::from_millis(300));
        Hogs {
            _idle: idle,
            _unread: unread,
            stop,
            slow: Some(slow),
        }
    }

    fn handler() -> Handler {
        Arc::new(|path: &str| match path {
            "/healthz" => Some(Response {
                status: "200 OK",
                headers: vec![("Content-Type", "application/json".into())],
                body: "{}".into(),
            }),
            // 32 MiB: far more than loopback's socket buffers hold.
            "/big" => Some(Response {
                status: "200 OK",
                headers: vec![],
                body: "x".repeat(32 << 20),
            }),
            _ => None,
        })
    }

    fn bind() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").unwrap()
    }

    #[test]
    fn answers_while_idle_slow_and_non_reading_clients_are_connected() {
        let server = Server::start().unwrap();
        let serving = server.serve(bind(), Work::Inline, handler()).unwrap();
        let addr = serving.local_addr();
        let _hogs = hogs(addr, 100, "/big");
        // A one-at-a-time server would still be reading the slow client's head (it never ends)
        // or writing to the client that never reads: this answer proves it is not one.
        let started = Instant::now();
        let (code, body) = get(addr, "/healthz").unwrap();
        let took = started.elapsed();
        println!("/healthz with 100 idle, 1 slow-writing, 1 non-reading connections: {took:?}");
        assert_eq!(code, 200, "{body}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        // Many at once, too.
        let many: Vec<_> = (0..20)
            .map(|_| thread::spawn(move || get(addr, "/healthz").unwrap().0))
            .collect();
        for t in many {
            assert_eq!(t.join().unwrap(), 200);
        }
    }

    #[test]
    fn status_methods_and_head() {
        let server = Server::start().unwrap();
        let serving = server.serve(bind(), Work::Blocking, handler()).unwrap();
        let addr = serving.local_addr();
        let (code, r) = get(addr, "/healthz?verbose").unwrap();
        assert_eq!(code, 200, "{r}");
        assert!(r
            .to_ascii_lowercase()
            .contains("content-type: application/json"));
        assert!(r.ends_with("\r\n\r\n{}"), "{r}");
        assert_eq!(get(addr, "/nothing").unwrap().0, 404);
        let (code, r) = request(addr, "HEAD", "/healthz").unwrap();
        assert_eq!(code, 200);
        assert!(r.ends_with("\r\n\r\n"), "HEAD has no body: {r}");
        let (code, r) = request(addr, "POST", "/healthz").unwrap();
        assert_eq!(code, 405);
        assert!(r.to_ascii_lowercase().contains("allow: get, head"), "{r}");
        // A body announced as a gigabyte is not waited for: the answer, then the connection
        // closes (it cannot be kept alive with the body still coming).
        let mut c = TcpStream::connect(addr).unwrap();
        write!(
            c,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nabc"
        )
        .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(s.starts_with("HTTP/1.1 200"), "{s}");
        // A head larger than the limit.
        let mut c = TcpStream::connect(addr).unwrap();
        let _ = write!(
            c,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES * 2)
        );
        let mut s = String::new();
        let _ = c.read_to_string(&mut s);
        assert!(s.starts_with("HTTP/1.1 431"), "{s}");
    }

    #[test]
    fn a_client_that_stops_sending_is_cut_off_after_the_header_timeout() {
        let server = Server::start().unwrap();
        let serving = server.serve(bind(), Work::Inline, handler()).unwrap();
        let mut c = TcpStream::connect(serving.local_addr()).unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
        c.set_read_timeout(Some(HEADER_READ_TIMEOUT * 4)).unwrap();
        let mut s = String::new();
        // The server closes without an answer; a read timeout would be an error.
        c.read_to_string(&mut s).unwrap();
        assert!(s.is_empty(), "{s}");
    }

    #[test]
    fn a_client_that_never_reads_is_dropped_at_the_deadline() {
        let server = Server::start_with(Limits {
            connection_deadline: Duration::from_secs(1),
            ..Limits::default()
        })
        .unwrap();
        let serving = server.serve(bind(), Work::Inline, handler()).unwrap();
        let mut c = TcpStream::connect(serving.local_addr()).unwrap();
        write!(c, "GET /big HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // Not reading: the answer fills the socket buffers and the server's write waits...
        thread::sleep(Duration::from_secs(2));
        // ... until the deadline drops the connection: reading now, slowly (the whole answer
        // would take 25 s at this pace), ends (EOF or reset) with less than the whole answer.
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let ended = loop {
            match c.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
            thread::sleep(Duration::from_millis(50));
        };
        assert!(
            ended.is_ok() || ended.as_ref().unwrap_err().kind() == io::ErrorKind::ConnectionReset,
            "{ended:?}"
        );
        assert!(got.len() < 32 << 20, "{} bytes", got.len());
    }

    #[test]
    fn at_the_connection_cap_the_listener_waits_for_a_free_slot() {
        let server = Server::start_with(Limits {
            max_connections: 2,
            ..Limits::default()
        })
        .unwrap();
        let serving = server.serve(bind(), Work::Inline, handler()).unwrap();
        let addr = serving.local_addr();
        let mut idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        thread::sleep(Duration::from_millis(200));
        // A third connection waits in the backlog, unanswered...
        let mut c = TcpStream::connect(addr).unwrap();
        write!(
            c,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 1];
        let e = c.read(&mut buf).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e}"
        );
        // ... and is served once a slot frees.
        idle.pop();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert!(s.starts_with("HTTP/1.1 200"), "{s}");
    }

    #[test]
    fn closing_returns_with_clients_attached_and_frees_the_port() {
        let server = Server::start().unwrap();
        let serving = server.serve(bind(), Work::Inline, handler()).unwrap();
        let addr = serving.local_addr();
        let hogs = hogs(addr, 10, "/big");
        // Structural: the slow client never finishes its head and the other never reads, so a
        // close that waited for a client would not return before they are dropped (below).
        assert!(serving.close(), "the runtime dropped the listener");
        assert_eq!(
            TcpStream::connect(addr).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        // The port can be served again at once.
        let again = server
            .serve(TcpListener::bind(addr).unwrap(), Work::Inline, handler())
            .unwrap();
        assert_eq!(get(again.local_addr(), "/healthz").unwrap().0, 200);
        drop(hogs);
    }
}
