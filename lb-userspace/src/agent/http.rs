//! A minimal HTTP/1.1 responder for the agent's small endpoints (health check ports, /metrics,
//! /healthz, /livez): one request per connection, answered by a handler of the request path.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

/// A response: status line text (e.g. `200 OK`), extra headers, body.
pub struct Response {
    pub status: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn encode(&self) -> String {
        let mut s = format!("HTTP/1.1 {}\r\n", self.status);
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        s.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.body.len(),
            self.body
        ));
        s
    }
}

/// Accepts on `listener` (non-blocking) until `stop`, answering each request with `handler`.
pub fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    handler: impl Fn(&str) -> Option<Response>,
) {
    let _ = listener.set_nonblocking(true);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let _ = answer(conn, &handler);
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Reads the request head and writes the handler's answer (404 when it has none).
fn answer(mut conn: TcpStream, handler: &impl Fn(&str) -> Option<Response>) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 16 * 1024 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&seen);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let resp = handler(path).unwrap_or(Response {
        status: "404 Not Found",
        headers: vec![],
        body: String::new(),
    });
    conn.write_all(resp.encode().as_bytes())?;
    conn.flush()
}
