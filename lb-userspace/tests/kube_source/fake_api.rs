//! The fake API server of the `KubeSource` tests (what it speaks is in tests/kube_source.rs): a
//! [`Cluster`] ("etcd") holds the objects, the change history and the knobs for failures; a
//! [`FakeApi`] serves it on 127.0.0.1.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpSocket, TcpStream,
    },
};

/// The three collections the agent watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Service | Kind::Node => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn from_name(name: &str) -> Kind {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .unwrap_or_else(|| panic!("kind {name}"))
    }

    fn from_path(path: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.path() == path)
    }
}

/// (namespace, name); the namespace is empty for Nodes.
type Key = (String, String);

fn key_of(obj: &Value) -> Key {
    let meta = &obj["metadata"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (s(&meta["namespace"]), s(&meta["name"]))
}

/// One entry of the change history.
struct Change {
    rv: u64,
    kind: Kind,
    /// `ADDED`, `MODIFIED`, `DELETED` or `BOOKMARK`.
    kind_of_event: &'static str,
    object: Value,
}

/// One request the fake answered: the collection, list or watch, and the decoded query.
#[derive(Clone, Debug)]
pub struct Request {
    pub kind: Kind,
    pub watch: bool,
    pub query: BTreeMap<String, String>,
}

#[derive(Default)]
pub struct Db {
    /// The latest resourceVersion, global across collections.
    rv: u64,
    objects: BTreeMap<Kind, BTreeMap<Key, Value>>,
    history: Vec<Change>,
    /// Watches from a resourceVersion older than this are expired.
    oldest_rv: u64,
    /// Bumped by [`Cluster::expire`]: watches started before it end.
    epoch: u64,
    /// Answer an expired watch with `410 Gone` instead of `200` and an `ERROR` event.
    gone_as_http: bool,
    forbidden: BTreeSet<Kind>,
    requests: Vec<Request>,
    /// Watch requests answered "expired", in either form.
    pub expired_answers: u64,
    pub bookmarks_sent: u64,
    pub active_watches: usize,
}

struct Shared {
    db: Mutex<Db>,
    /// Ticks on every change, to wake the watch streams.
    changed: tokio::sync::watch::Sender<()>,
}

/// The fake's storage ("etcd"): objects, history, and knobs for failures. Outlives servers.
#[derive(Clone)]
pub struct Cluster(Arc<Shared>);

impl Cluster {
    pub fn new() -> Self {
        let (changed, _) = tokio::sync::watch::channel(());
        Cluster(Arc::new(Shared {
            db: Mutex::new(Db::default()),
            changed,
        }))
    }

    pub fn db(&self) -> MutexGuard<'_, Db> {
        self.0.db.lock().unwrap()
    }

    fn notify(&self) {
        self.0.changed.send_replace(());
    }

    /// Creates or replaces an object (its `kind` says where), recording an ADDED or MODIFIED
    /// event unless `silently` (an event the watchers will never see, like one lost to
    /// compaction).
    fn put(&self, mut obj: Value, silently: bool) {
        let kind = Kind::from_name(obj["kind"].as_str().unwrap_or_default());
        let mut db = self.db();
        db.rv += 1;
        let rv = db.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let previous = db
            .objects
            .entry(kind)
            .or_default()
            .insert(key_of(&obj), obj.clone());
        if !silently {
            let kind_of_event = if previous.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            db.history.push(Change {
                rv,
                kind,
                kind_of_event,
                object: obj,
            });
        }
        drop(db);
        self.notify();
    }

    pub fn apply(&self, obj: Value) {
        self.put(obj, false);
    }

    pub fn apply_silently(&self, obj: Value) {
        self.put(obj, true);
    }

    fn remove(&self, kind: Kind, namespace: &str, name: &str, silently: bool) {
        let mut db = self.db();
        let key = (namespace.to_string(), name.to_string());
        let Some(mut obj) = db.objects.entry(kind).or_default().remove(&key) else {
            panic!("no {kind:?} {namespace}/{name} to delete");
        };
        db.rv += 1;
        let rv = db.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if !silently {
            db.history.push(Change {
                rv,
                kind,
                kind_of_event: "DELETED",
                object: obj,
            });
        }
        drop(db);
        self.notify();
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        self.remove(kind, namespace, name, false);
    }

    pub fn delete_silently(&self, kind: Kind, namespace: &str, name: &str) {
        self.remove(kind, namespace, name, true);
    }

    /// A BOOKMARK for every collection at the latest resourceVersion.
    pub fn bookmark(&self) {
        let mut db = self.db();
        let rv = db.rv;
        for kind in Kind::ALL {
            let object = json!({
                "kind": kind.name(),
                "apiVersion": kind.api_version(),
                "metadata": {"resourceVersion": rv.to_string()},
            });
            db.history.push(Change {
                rv,
                kind,
                kind_of_event: "BOOKMARK",
                object,
            });
        }
        drop(db);
        self.notify();
    }

    /// Compacts the history: running watches end with 410 and watches from any older
    /// resourceVersion are refused, so the watchers must re-list.
    pub fn expire(&self) {
        let mut db = self.db();
        db.oldest_rv = db.rv;
        db.epoch += 1;
        drop(db);
        self.notify();
    }

    /// Answer expired watches with HTTP `410 Gone` rather than an `ERROR` event.
    pub fn gone_as_http(&self, on: bool) {
        self.db().gone_as_http = on;
    }

    pub fn forbid(&self, kind: Kind, on: bool) {
        let mut db = self.db();
        if on {
            db.forbidden.insert(kind);
        } else {
            db.forbidden.remove(&kind);
        }
    }

    pub fn requests(&self, kind: Kind, watch: bool) -> Vec<Request> {
        self.db()
            .requests
            .iter()
            .filter(|r| r.kind == kind && r.watch == watch)
            .cloned()
            .collect()
    }

    pub fn lists(&self, kind: Kind) -> usize {
        self.requests(kind, false).len()
    }

    /// "namespace/name" of every object of `kind` the server has now.
    pub fn names(&self, kind: Kind) -> Vec<String> {
        let db = self.db();
        db.objects
            .get(&kind)
            .map(|m| m.keys().map(qualified).collect())
            .unwrap_or_default()
    }
}

fn qualified((namespace, name): &Key) -> String {
    if namespace.is_empty() {
        name.clone()
    } else {
        format!("{namespace}/{name}")
    }
}

/// A running fake API server on 127.0.0.1, serving a [`Cluster`].
pub struct FakeApi {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApi {
    /// Serves `cluster` on `port` (0: any free port) from a thread of its own.
    pub fn start(cluster: &Cluster, port: u16) -> Self {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let cluster = cluster.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                // SO_REUSEADDR, so a restarted server gets the same port back at once.
                let socket = TcpSocket::new_v4().unwrap();
                socket.set_reuseaddr(true).unwrap();
                socket.bind(([127, 0, 0, 1], port).into()).unwrap();
                let listener = socket.listen(64).unwrap();
                ready_tx
                    .send(listener.local_addr().unwrap().port())
                    .unwrap();
                let accept = async {
                    while let Ok((conn, _)) = listener.accept().await {
                        tokio::spawn(serve_connection(conn, cluster.clone()));
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime drops every connection task, closing its socket.
        });
        let port = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("fake API server bound");
        FakeApi {
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops listening and closes every connection, as a crashed API server would.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Decodes `application/x-www-form-urlencoded` text.
fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

/// A field selector: `metadata.name=X` and/or `metadata.namespace=Y`, comma-separated.
fn parse_field_selector(selector: Option<&String>) -> Result<Vec<(String, String)>, String> {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Ok(Vec::new());
    };
    selector
        .split(',')
        .map(|term| {
            let (field, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("invalid field selector term {term:?}"))?;
            match field {
                "metadata.name" | "metadata.namespace" => {
                    Ok((field.to_string(), value.to_string()))
                }
                _ => Err(format!("field label not supported: {field}")),
            }
        })
        .collect()
}

fn selects(selector: &[(String, String)], obj: &Value) -> bool {
    selector.iter().all(|(field, value)| {
        let meta = &obj["metadata"];
        let actual = match field.as_str() {
            "metadata.name" => &meta["name"],
            _ => &meta["namespace"],
        };
        actual.as_str().unwrap_or_default() == value
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// Reads one request head; returns its target (`/path?query`), or `None` when the client is gone.
async fn read_request(reader: &mut BufReader<OwnedReadHalf>) -> Option<String> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let target = line.split_whitespace().nth(1)?.to_string();
    let mut body_len = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                body_len = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; body_len];
    reader.read_exact(&mut body).await.ok()?;
    Some(target)
}

async fn respond(writer: &mut OwnedWriteHalf, code: u16, body: &Value) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    writer.write_all(head.as_bytes()).await?;
    writer.write_all(body.as_bytes()).await?;
    writer.flush().await
}

/// Writes one watch event as one chunk, newline-terminated.
async fn write_event(writer: &mut OwnedWriteHalf, event: &Value) -> std::io::Result<()> {
    let line = format!("{event}\n");
    writer
        .write_all(format!("{:X}\r\n{line}\r\n", line.len()).as_bytes())
        .await?;
    writer.flush().await
}

async fn end_chunks(writer: &mut OwnedWriteHalf) -> std::io::Result<()> {
    writer.write_all(b"0\r\n\r\n").await?;
    writer.flush().await
}

/// Serves requests on one connection (keep-alive) until the client leaves or a watch ends.
async fn serve_connection(conn: TcpStream, cluster: Cluster) {
    let (read, mut writer) = conn.into_split();
    let mut reader = BufReader::new(read);
    while let Some(target) = read_request(&mut reader).await {
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let query = parse_query(query);
        let Some(kind) = Kind::from_path(path) else {
            let body = status(
                404,
                "NotFound",
                &format!("the server could not find {path}"),
            );
            if respond(&mut writer, 404, &body).await.is_err() {
                return;
            }
            continue;
        };
        let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
        cluster.db().requests.push(Request {
            kind,
            watch,
            query: query.clone(),
        });
        if watch {
            // A watch response is the rest of this connection.
            let _ = serve_watch(&mut reader, &mut writer, &cluster, kind, &query).await;
            return;
        }
        let (code, body) = list(&cluster, kind, &query);
        if respond(&mut writer, code, &body).await.is_err() {
            return;
        }
    }
}

/// Answers a list request.
fn list(cluster: &Cluster, kind: Kind, query: &BTreeMap<String, String>) -> (u16, Value) {
    let db = cluster.db();
    if db.forbidden.contains(&kind) {
        return (
            403,
            status(403, "Forbidden", &format!("cannot list {}", kind.path())),
        );
    }
    let selector = match parse_field_selector(query.get("fieldSelector")) {
        Ok(s) => s,
        Err(e) => return (400, status(400, "BadRequest", &e)),
    };
    let mut items: Vec<Value> = db
        .objects
        .get(&kind)
        .map(|m| {
            m.values()
                .filter(|o| selects(&selector, o))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    // Items of a list carry no kind or apiVersion; the list does.
    for item in &mut items {
        if let Some(map) = item.as_object_mut() {
            map.remove("kind");
            map.remove("apiVersion");
        }
    }
    let offset: usize = query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let end = offset.saturating_add(limit).min(items.len());
    let page: Vec<Value> = items
        .get(offset..end)
        .map(<[Value]>::to_vec)
        .unwrap_or_default();
    let mut metadata = json!({"resourceVersion": db.rv.to_string()});
    if end < items.len() {
        metadata["continue"] = json!(end.to_string());
    }
    let body = json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": page,
    });
    (200, body)
}

/// Decrements the active watch count when a watch response ends, however it ends.
struct ActiveWatch(Cluster);

impl Drop for ActiveWatch {
    fn drop(&mut self) {
        self.0.db().active_watches -= 1;
    }
}

/// Streams a watch: every change after the requested resourceVersion, then new ones as they
/// happen, until `timeoutSeconds`, an expiry, or the client leaving.
async fn serve_watch(
    reader: &mut BufReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
    cluster: &Cluster,
    kind: Kind,
    query: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let selector = match parse_field_selector(query.get("fieldSelector")) {
        Ok(s) => s,
        Err(e) => return respond(writer, 400, &status(400, "BadRequest", &e)).await,
    };
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1800);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let expired = status(410, "Expired", "too old resource version");
    let expired_event = json!({"type": "ERROR", "object": expired});

    // Subscribe before reading the history, so no change slips between the two.
    let mut changed = cluster.0.changed.subscribe();
    // Decide under the lock, answer after it (a std mutex guard must not live across awaits).
    enum Start {
        Forbidden,
        Expired { as_http: bool },
        Stream { cursor: usize, epoch: u64 },
    }
    let start = {
        let mut db = cluster.db();
        let from: u64 = match query.get("resourceVersion").map(|v| v.parse()) {
            Some(Ok(rv)) => rv,
            // Real servers treat a missing or "0" resourceVersion as "any"; kube always sends one.
            _ => db.rv,
        };
        if db.forbidden.contains(&kind) {
            Start::Forbidden
        } else if from < db.oldest_rv {
            db.expired_answers += 1;
            Start::Expired {
                as_http: db.gone_as_http,
            }
        } else {
            db.active_watches += 1;
            Start::Stream {
                cursor: db.history.partition_point(|c| c.rv <= from),
                epoch: db.epoch,
            }
        }
    };
    let (mut cursor, epoch) = match start {
        Start::Forbidden => {
            return respond(writer, 403, &status(403, "Forbidden", "cannot watch")).await
        }
        Start::Expired { as_http: true } => return respond(writer, 410, &expired).await,
        Start::Expired { as_http: false } => {
            writer.write_all(WATCH_HEAD.as_bytes()).await?;
            write_event(writer, &expired_event).await?;
            return end_chunks(writer).await;
        }
        Start::Stream { cursor, epoch } => (cursor, epoch),
    };
    let _active = ActiveWatch(cluster.clone());
    writer.write_all(WATCH_HEAD.as_bytes()).await?;
    writer.flush().await?;

    loop {
        let (events, expired_now, gone_as_http) = {
            let mut db = cluster.db();
            let mut events = Vec::new();
            for change in &db.history[cursor..] {
                if change.kind != kind {
                    continue;
                }
                let bookmark = change.kind_of_event == "BOOKMARK";
                if (bookmark && !bookmarks) || (!bookmark && !selects(&selector, &change.object)) {
                    continue;
                }
                events.push((
                    bookmark,
                    json!({"type": change.kind_of_event, "object": change.object}),
                ));
            }
            cursor = db.history.len();
            db.bookmarks_sent += events.iter().filter(|(b, _)| *b).count() as u64;
            (events, db.epoch != epoch, db.gone_as_http)
        };
        for (_, event) in &events {
            write_event(writer, event).await?;
        }
        if expired_now {
            // Compacted under a running watch: the real server ends it with 410 Expired.
            if !gone_as_http {
                cluster.db().expired_answers += 1;
                write_event(writer, &expired_event).await?;
            }
            return end_chunks(writer).await;
        }
        let mut probe = [0u8; 1];
        tokio::select! {
            _ = changed.changed() => {}
            () = tokio::time::sleep_until(deadline) => return end_chunks(writer).await,
            // A client says nothing more during a watch: any read result means it left.
            _ = reader.read(&mut probe) => return Ok(()),
        }
    }
}

const WATCH_HEAD: &str = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                          Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
