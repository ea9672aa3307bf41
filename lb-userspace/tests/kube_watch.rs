//! The Kubernetes API source against a local fake API server that speaks the list/watch protocol
//! kube's watcher uses: JSON lists with `metadata.resourceVersion`, chunked watch streams of
//! `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK` events, and `410 Gone` (an `ERROR` event with code
//! 410) that forces a re-list. Real sockets on 127.0.0.1, bounded waits.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use lb_userspace::{
    source::{Objects, Source},
    watch::{KubeConfigChoice, KubeSource},
};
use serde_json::{json, Value};

/// One resource collection of the fake server.
#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    watchers: Vec<mpsc::Sender<Option<String>>>,
    /// Every event with its resourceVersion, replayed to a watch that starts from an older one.
    history: Vec<(u64, String)>,
}

#[derive(Default)]
struct State {
    rv: u64,
    collections: BTreeMap<&'static str, Collection>,
    lists: u64,
}

struct FakeApi {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

const PATHS: [(&str, &str, &str); 3] = [
    ("/api/v1/services", "v1", "Service"),
    ("/apis/discovery.k8s.io/v1/endpointslices", "discovery.k8s.io/v1", "EndpointSlice"),
    ("/api/v1/nodes", "v1", "Node"),
];

fn kind_of(path: &str) -> Option<(&'static str, &'static str, &'static str)> {
    PATHS.iter().copied().find(|(p, _, _)| *p == path)
}

impl FakeApi {
    fn start(port: u16, state: Arc<Mutex<State>>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, _)) => {
                        let (st, sp) = (st.clone(), sp.clone());
                        std::thread::spawn(move || serve(c, st, sp));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { port, state, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Adds or changes an object and tells the watchers.
    fn apply(&self, path: &str, mut obj: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("").to_string();
        let key = format!("{ns}/{name}");
        let coll = s.collections.entry(kind_of(path).unwrap().0).or_default();
        let ty = if coll.objects.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        coll.objects.insert(key, obj.clone());
        let ev = json!({"type": ty, "object": obj}).to_string();
        coll.history.push((s_rv(&obj), ev.clone()));
        coll.watchers.retain(|w| w.send(Some(ev.clone())).is_ok());
    }

    fn delete(&self, path: &str, ns: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let coll = s.collections.entry(kind_of(path).unwrap().0).or_default();
        if let Some(mut obj) = coll.objects.remove(&format!("{ns}/{name}")) {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let ev = json!({"type": "DELETED", "object": obj}).to_string();
            coll.history.push((rv, ev.clone()));
            coll.watchers.retain(|w| w.send(Some(ev.clone())).is_ok());
        }
    }

    fn bookmark(&self, path: &str) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let (_, api, kind) = kind_of(path).unwrap();
        let ev = json!({"type": "BOOKMARK", "object": {"apiVersion": api, "kind": kind, "metadata": {"resourceVersion": s.rv.to_string()}}}).to_string();
        let coll = s.collections.entry(kind_of(path).unwrap().0).or_default();
        coll.watchers.retain(|w| w.send(Some(ev.clone())).is_ok());
    }

    /// Changes an object without telling anyone, then ends every watch with 410 Gone (as the
    /// API server does when a watch's resourceVersion was compacted away).
    fn change_silently_and_expire(&self, path: &str, mut obj: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let key = format!("{}/{}", obj["metadata"]["namespace"].as_str().unwrap_or(""), obj["metadata"]["name"].as_str().unwrap());
        let gone = json!({"type": "ERROR", "object": {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}})
        .to_string();
        for (name, coll) in s.collections.iter_mut() {
            if *name == kind_of(path).unwrap().0 {
                coll.objects.insert(key.clone(), obj.clone());
            }
            for w in coll.watchers.drain(..) {
                let _ = w.send(Some(gone.clone()));
                let _ = w.send(None);
            }
        }
    }

    fn lists(&self) -> u64 {
        self.state.lock().unwrap().lists
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let mut s = self.state.lock().unwrap();
        for coll in s.collections.values_mut() {
            for w in coll.watchers.drain(..) {
                let _ = w.send(None);
            }
        }
    }
}

fn s_rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap()
}

fn query(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let params = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3D", "=").replace("%2F", "/")))
        .collect();
    (path.to_string(), params)
}

fn serve(conn: TcpStream, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || stop.load(Ordering::Relaxed) {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut content_length = 0;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; content_length];
        let _ = reader.read_exact(&mut body);
        let (path, params) = query(&target);
        let Some((coll_name, api, kind)) = kind_of(&path) else {
            let _ = write!(w, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        let selector = params.get("fieldSelector").and_then(|f| f.strip_prefix("metadata.name=")).map(str::to_string);
        let keep = |o: &Value| selector.as_deref().is_none_or(|n| o["metadata"]["name"] == n);
        if params.get("watch").map(String::as_str) == Some("true") {
            let (tx, rx) = mpsc::channel();
            let from: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            {
                let mut s = state.lock().unwrap();
                let coll = s.collections.entry(coll_name).or_default();
                for (rv, ev) in &coll.history {
                    if *rv > from {
                        let _ = tx.send(Some(ev.clone()));
                    }
                }
                coll.watchers.push(tx);
            }
            let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
            let _ = w.flush();
            loop {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(Some(ev)) => {
                        let v: Value = serde_json::from_str(&ev).unwrap();
                        if v["type"] != "BOOKMARK" && v["type"] != "ERROR" && !keep(&v["object"]) {
                            continue;
                        }
                        let data = format!("{ev}\n");
                        if write!(w, "{:x}\r\n{data}\r\n", data.len()).and_then(|_| w.flush()).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = write!(w, "0\r\n\r\n");
                        return;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => {}
                    Err(_) => return,
                }
            }
        }
        let mut s = state.lock().unwrap();
        s.lists += 1;
        let rv = s.rv.to_string();
        let items: Vec<Value> = s.collections.entry(coll_name).or_default().objects.values().filter(|o| keep(o)).cloned().collect();
        let list = json!({"apiVersion": api, "kind": format!("{kind}List"), "metadata": {"resourceVersion": rv}, "items": items}).to_string();
        drop(s);
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{list}", list.len());
        let _ = w.flush();
    }
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80, "protocol": "TCP"}]}})
}

fn slice(name: &str, svc: &str, ips: &[&str]) -> Value {
    let eps: Vec<Value> = ips.iter().map(|ip| json!({"addresses": [ip]})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "ports": [{"name": "", "port": 8080, "protocol": "TCP"}], "endpoints": eps})
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
}

/// Polls until a snapshot satisfying `want` arrives (or fails after 15 s).
fn wait_for(src: &mut KubeSource, what: &str, want: impl Fn(&Objects) -> bool) -> Objects {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Some(o) = src.poll().unwrap() {
            if want(&o) {
                return o;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no snapshot with {what} within 15 s");
}

fn names<T: kube::ResourceExt>(v: &[T]) -> Vec<String> {
    let mut n: Vec<String> = v.iter().map(|o| o.name_any()).collect();
    n.sort();
    n
}

fn seeded() -> (FakeApi, KubeSource) {
    let api = FakeApi::start(0, Default::default());
    api.apply(PATHS[0].0, service("web", "10.96.0.10"));
    api.apply(PATHS[1].0, slice("web-1", "web", &["10.244.1.10"]));
    api.apply(PATHS[2].0, node("node1"));
    api.apply(PATHS[2].0, node("node2"));
    let src = KubeSource::new(KubeConfigChoice::Url(api.url()), "node1").unwrap();
    (api, src)
}

#[test]
fn initial_list_gives_services_slices_and_only_this_node() {
    let (_api, mut src) = seeded();
    let o = wait_for(&mut src, "the initial list", |_| true);
    assert_eq!(names(&o.services), ["web"]);
    assert_eq!(names(&o.endpoint_slices), ["web-1"]);
    assert_eq!(names(&o.nodes), ["node1"], "the Node watch selects this node only");
    assert!(src.poll().unwrap().is_none(), "no change, no snapshot");
}

#[test]
fn watch_events_change_the_next_snapshot_and_bookmarks_do_not() {
    let (api, mut src) = seeded();
    wait_for(&mut src, "the initial list", |_| true);
    api.apply(PATHS[1].0, slice("web-1", "web", &["10.244.1.10", "10.244.2.10"]));
    let o = wait_for(&mut src, "the MODIFIED slice", |o| o.endpoint_slices[0].endpoints.as_ref().unwrap().len() == 2);
    assert_eq!(names(&o.services), ["web"]);
    api.apply(PATHS[0].0, service("db", "10.96.0.20"));
    wait_for(&mut src, "the ADDED service", |o| names(&o.services) == ["db", "web"]);
    api.delete(PATHS[0].0, "default", "web");
    wait_for(&mut src, "the DELETED service", |o| names(&o.services) == ["db"]);
    // A bookmark only moves the resourceVersion: no new snapshot.
    for p in PATHS {
        api.bookmark(p.0);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(src.poll().unwrap().is_none(), "a bookmark is not a change");
    // The Node watch ignores other nodes.
    api.apply(PATHS[2].0, node("node3"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(src.poll().unwrap().is_none());
}

#[test]
fn gone_leads_to_a_relist_that_converges() {
    let (api, mut src) = seeded();
    wait_for(&mut src, "the initial list", |_| true);
    let lists_before = api.lists();
    let restarts_before = src.watch_restarts();
    // A change the watch never reports, then 410 Gone: only a re-list can find it.
    api.change_silently_and_expire(PATHS[1].0, slice("web-1", "web", &["10.244.9.9"]));
    let o = wait_for(&mut src, "the re-listed slice", |o| {
        o.endpoint_slices[0].endpoints.as_ref().unwrap()[0].addresses == ["10.244.9.9"]
    });
    assert_eq!(names(&o.services), ["web"]);
    assert!(api.lists() > lists_before, "re-listed");
    assert!(src.watch_restarts() > restarts_before, "the 410 was counted");
}

#[test]
fn unreachable_api_keeps_the_last_state_then_converges() {
    let state: Arc<Mutex<State>> = Default::default();
    let api = FakeApi::start(0, state.clone());
    let port = api.port;
    api.apply(PATHS[0].0, service("web", "10.96.0.10"));
    api.apply(PATHS[2].0, node("node1"));
    let mut src = KubeSource::new(KubeConfigChoice::Url(api.url()), "node1").unwrap();
    wait_for(&mut src, "the initial list", |o| names(&o.services) == ["web"]);
    drop(api);
    // While the API server is away: no snapshot, no error; the agent keeps what it has.
    for _ in 0..20 {
        assert!(src.poll().unwrap().is_none());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Back on the same port, with a change made meanwhile.
    let api = FakeApi::start(port, state);
    api.apply(PATHS[0].0, service("db", "10.96.0.20"));
    wait_for(&mut src, "the state after the outage", |o| names(&o.services) == ["db", "web"]);
    assert!(src.watch_restarts() > 0);
}
