//! [`KubeSource`] against a local fake API server on 127.0.0.1 that speaks the list/watch
//! protocol kube's watcher uses:
//!
//! - `GET <collection>?limit=500[&continue=..][&fieldSelector=..]`: a JSON list whose
//!   `metadata.resourceVersion` the watch then starts from (items without `kind`/`apiVersion`, as
//!   the real API server sends them), paginated with `continue` tokens;
//! - `GET <collection>?watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`:
//!   a chunked stream of one JSON event per line (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`),
//!   replaying every change after N from a global history, as etcd's revisions are global;
//! - an expired resourceVersion (history "compacted" by [`Cluster::expire`]): an `ERROR` event
//!   with code 410 `Expired` on the stream, as the real API server does, or (in
//!   [`Cluster::gone_as_http`] mode) a plain `410 Gone` answer to the watch request;
//! - `403 Forbidden` for collections the test forbids (RBAC not granted yet).
//!
//! The fake keeps its objects in a [`Cluster`] ("etcd") that outlives the server, so a test can
//! stop the server and start it again on the same port. Every wait polls with a deadline.
use std::time::{Duration, Instant};

use lb_userspace::control::{
    kube_source::{KubeConfigChoice, KubeSource},
    source::{Objects, Source},
};
use serde_json::{json, Value};

// The fake API server, in a file of its own under tests/kube_source/ (`#[path]`: a file directly
// in tests/ would be a test binary of its own).
#[path = "kube_source/fake_api.rs"]
mod fake_api;

use fake_api::{Cluster, FakeApi, Kind};

// ------------------------------------------------------------------------------------------------
// Objects and helpers
// ------------------------------------------------------------------------------------------------

fn service(namespace: &str, name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    })
}

fn endpoint_slice(namespace: &str, name: &str, service: &str, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": namespace,
            "name": name,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

fn node(name: &str, zone: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]},
    })
}

/// Two Services in two namespaces with their slices, and three Nodes; the source is node-b's.
fn seeded() -> Cluster {
    let cluster = Cluster::new();
    let mut web = service("default", "web", "10.96.0.10");
    // Server-side apply bookkeeping, which the source drops.
    web["metadata"]["managedFields"] = json!([{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {}}]);
    cluster.apply(web);
    cluster.apply(service("kube-system", "dns", "10.96.0.53"));
    cluster.apply(endpoint_slice(
        "default",
        "web-abc",
        "web",
        &["10.0.1.1", "10.0.2.1"],
    ));
    cluster.apply(endpoint_slice(
        "kube-system",
        "dns-xyz",
        "dns",
        &["10.0.1.53"],
    ));
    for (name, zone) in [
        ("node-a", "zone-a"),
        ("node-b", "zone-b"),
        ("node-c", "zone-a"),
    ] {
        cluster.apply(node(name, zone));
    }
    cluster
}

const NODE: &str = "node-b";
/// Generous: kube's backoff after an error starts at 0.8 s (with jitter) and doubles.
const DEADLINE: Duration = Duration::from_secs(40);
const TICK: Duration = Duration::from_millis(20);

fn source(api: &FakeApi) -> KubeSource {
    KubeSource::new(KubeConfigChoice::Url(api.url()), NODE).expect("KubeSource::new")
}

/// Polls until a snapshot satisfies `want`, failing after [`DEADLINE`].
fn wait_for(src: &mut KubeSource, what: &str, want: impl Fn(&Objects) -> bool) -> Objects {
    let deadline = Instant::now() + DEADLINE;
    let mut last = None;
    loop {
        match src.poll() {
            Ok(Some(objects)) if want(&objects) => return objects,
            Ok(Some(objects)) => last = Some(summary(&objects)),
            Ok(None) => {}
            Err(e) => panic!("poll failed while waiting for {what}: {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last snapshot: {last:?}"
        );
        std::thread::sleep(TICK);
    }
}

/// Polls until the next snapshot, failing after [`DEADLINE`].
fn next_snapshot(src: &mut KubeSource, what: &str) -> Objects {
    wait_for(src, what, |_| true)
}

/// Waits until `cond` holds, failing after [`DEADLINE`].
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(TICK);
    }
}

/// Asserts that `poll` reports no change (and no error) for `period`.
fn assert_quiet(src: &mut KubeSource, period: Duration, why: &str) {
    let end = Instant::now() + period;
    while Instant::now() < end {
        match src.poll() {
            Ok(None) => {}
            Ok(Some(objects)) => panic!("{why}: unexpected snapshot {:?}", summary(&objects)),
            Err(e) => panic!("{why}: poll failed: {e}"),
        }
        std::thread::sleep(TICK);
    }
}

fn name_of<K: kube::ResourceExt>(o: &K) -> String {
    match o.namespace() {
        Some(ns) => format!("{ns}/{}", o.name_any()),
        None => o.name_any(),
    }
}

fn names<K: kube::ResourceExt>(objects: &[K]) -> Vec<String> {
    objects.iter().map(name_of).collect()
}

/// (Services, EndpointSlices, Nodes) by "namespace/name".
fn summary(o: &Objects) -> (Vec<String>, Vec<String>, Vec<String>) {
    (
        names(&o.services),
        names(&o.endpoint_slices),
        names(&o.nodes),
    )
}

fn cluster_ip(o: &Objects, namespace: &str, name: &str) -> Option<String> {
    o.services
        .iter()
        .find(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata.name.as_deref() == Some(name)
        })
        .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
}

fn endpoint_addresses(o: &Objects, namespace: &str, name: &str) -> Vec<String> {
    o.endpoint_slices
        .iter()
        .filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && s.metadata.name.as_deref() == Some(name)
        })
        .flat_map(|s| {
            s.endpoints
                .iter()
                .flatten()
                .flat_map(|e| e.addresses.clone())
        })
        .collect()
}

fn zone_of_node(o: &Objects) -> Option<String> {
    let node = o.nodes.first()?;
    node.metadata
        .labels
        .as_ref()?
        .get("topology.kubernetes.io/zone")
        .cloned()
}

/// The snapshot holds exactly what the server has now (this node only).
fn matches_server(o: &Objects, cluster: &Cluster) -> bool {
    names(&o.services) == cluster.names(Kind::Service)
        && names(&o.endpoint_slices) == cluster.names(Kind::EndpointSlice)
        && names(&o.nodes)
            == cluster
                .names(Kind::Node)
                .into_iter()
                .filter(|n| n == NODE)
                .collect::<Vec<_>>()
}

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

/// The first snapshot holds every Service and EndpointSlice and only this Node, ordered by
/// namespace/name; requests are what kube's watcher sends; nothing more comes without changes.
#[test]
fn initial_list_has_services_endpoint_slices_and_only_this_node() {
    let cluster = seeded();
    let api = FakeApi::start(&cluster, 0);
    let mut src = source(&api);

    let first = next_snapshot(&mut src, "the first snapshot");
    assert_eq!(
        summary(&first),
        (
            vec!["default/web".to_string(), "kube-system/dns".to_string()],
            vec![
                "default/web-abc".to_string(),
                "kube-system/dns-xyz".to_string()
            ],
            vec!["node-b".to_string()],
        )
    );
    assert_eq!(
        cluster_ip(&first, "default", "web").as_deref(),
        Some("10.96.0.10")
    );
    assert_eq!(
        endpoint_addresses(&first, "default", "web-abc"),
        ["10.0.1.1", "10.0.2.1"]
    );
    assert_eq!(zone_of_node(&first).as_deref(), Some("zone-b"));
    // Services are defaulted like manifests (targetPort given here; protocol kept).
    let port = &first.services[0]
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()[0];
    assert_eq!(port.protocol.as_deref(), Some("TCP"));
    // managedFields are dropped to save memory.
    assert!(first.services.iter().all(|s| s
        .metadata
        .managed_fields
        .as_ref()
        .is_none_or(Vec::is_empty)));
    assert_eq!(src.watch_restarts(), 0);

    // What went over the wire: paginated most-recent lists, then watches from the list's
    // resourceVersion with bookmarks; the Node only by field selector.
    for kind in Kind::ALL {
        let lists = cluster.requests(kind, false);
        assert_eq!(lists.len(), 1, "{kind:?} lists: {lists:?}");
        assert_eq!(lists[0].query.get("limit").map(String::as_str), Some("500"));
        assert!(
            !lists[0].query.contains_key("resourceVersion"),
            "{:?}",
            lists[0]
        );
    }
    wait_until("three watches", || {
        Kind::ALL
            .iter()
            .all(|k| !cluster.requests(*k, true).is_empty())
    });
    for kind in Kind::ALL {
        let watch = &cluster.requests(kind, true)[0];
        assert_eq!(
            watch.query.get("allowWatchBookmarks").map(String::as_str),
            Some("true"),
            "{watch:?}"
        );
        assert!(watch.query.contains_key("timeoutSeconds"), "{watch:?}");
        assert_eq!(
            watch.query.get("resourceVersion").map(String::as_str),
            Some("7"),
            "{watch:?}"
        );
    }
    let node_selector = Some("metadata.name=node-b");
    assert_eq!(
        cluster.requests(Kind::Node, false)[0]
            .query
            .get("fieldSelector")
            .map(String::as_str),
        node_selector
    );
    assert_eq!(
        cluster.requests(Kind::Node, true)[0]
            .query
            .get("fieldSelector")
            .map(String::as_str),
        node_selector
    );
    assert!(!cluster.requests(Kind::Service, false)[0]
        .query
        .contains_key("fieldSelector"));

    assert_quiet(
        &mut src,
        Duration::from_millis(300),
        "no change after the first snapshot",
    );
}

/// `poll` says nothing while one watcher has not completed its first list (here RBAC does not
/// allow EndpointSlices yet), although the other two have; then the full snapshot comes.
#[test]
fn no_snapshot_until_every_watcher_has_listed() {
    let cluster = seeded();
    cluster.forbid(Kind::EndpointSlice, true);
    let api = FakeApi::start(&cluster, 0);
    let mut src = source(&api);

    wait_until(
        "Services and the Node listed, EndpointSlices refused",
        || {
            cluster.lists(Kind::Service) >= 1
                && cluster.lists(Kind::Node) >= 1
                && cluster.lists(Kind::EndpointSlice) >= 1
        },
    );
    // The other watchers are watching by now: their lists were answered.
    wait_until("Service and Node watches", || {
        !cluster.requests(Kind::Service, true).is_empty()
            && !cluster.requests(Kind::Node, true).is_empty()
    });
    assert_quiet(
        &mut src,
        Duration::from_millis(400),
        "EndpointSlices not listed yet",
    );
    assert!(
        src.watch_restarts() >= 1,
        "the refused list counts as a watch error"
    );

    cluster.forbid(Kind::EndpointSlice, false);
    let first = next_snapshot(&mut src, "the snapshot once EndpointSlices list");
    assert!(matches_server(&first, &cluster), "{:?}", summary(&first));
}

/// More objects than one page: the watcher follows `continue` tokens and the snapshot has all.
#[test]
fn initial_list_follows_continue_tokens() {
    let cluster = seeded();
    for i in 0..1100 {
        cluster.apply(service(
            "bulk",
            &format!("svc-{i:04}"),
            &format!("10.97.{}.{}", i / 250, i % 250),
        ));
    }
    let api = FakeApi::start(&cluster, 0);
    let mut src = source(&api);

    let first = next_snapshot(&mut src, "the first snapshot");
    assert_eq!(first.services.len(), 1102);
    assert!(matches_server(&first, &cluster));
    let continues: Vec<Option<String>> = cluster
        .requests(Kind::Service, false)
        .iter()
        .map(|r| r.query.get("continue").cloned())
        .collect();
    assert_eq!(
        continues,
        [None, Some("500".to_string()), Some("1000".to_string())]
    );
}

/// ADDED, MODIFIED and DELETED events each change the next snapshot; a BOOKMARK, or a change to
/// another Node, does not produce one.
#[test]
fn watch_events_change_the_next_snapshot_and_bookmarks_do_not() {
    let cluster = seeded();
    let api = FakeApi::start(&cluster, 0);
    let mut src = source(&api);
    next_snapshot(&mut src, "the first snapshot");
    wait_until("three watches", || cluster.db().active_watches == 3);

    cluster.apply(service("default", "api", "10.96.0.20"));
    let s = next_snapshot(&mut src, "ADDED Service");
    assert_eq!(
        names(&s.services),
        ["default/api", "default/web", "kube-system/dns"]
    );

    cluster.apply(service("default", "web", "10.96.0.11"));
    let s = next_snapshot(&mut src, "MODIFIED Service");
    assert_eq!(
        cluster_ip(&s, "default", "web").as_deref(),
        Some("10.96.0.11")
    );

    cluster.delete(Kind::Service, "kube-system", "dns");
    let s = next_snapshot(&mut src, "DELETED Service");
    assert_eq!(names(&s.services), ["default/api", "default/web"]);

    cluster.apply(endpoint_slice("default", "web-abc", "web", &["10.0.1.1"]));
    let s = next_snapshot(&mut src, "MODIFIED EndpointSlice");
    assert_eq!(endpoint_addresses(&s, "default", "web-abc"), ["10.0.1.1"]);

    cluster.apply(endpoint_slice("default", "api-1", "api", &["10.0.3.1"]));
    let s = next_snapshot(&mut src, "ADDED EndpointSlice");
    assert_eq!(
        names(&s.endpoint_slices),
        ["default/api-1", "default/web-abc", "kube-system/dns-xyz"]
    );

    cluster.delete(Kind::EndpointSlice, "kube-system", "dns-xyz");
    let s = next_snapshot(&mut src, "DELETED EndpointSlice");
    assert_eq!(
        names(&s.endpoint_slices),
        ["default/api-1", "default/web-abc"]
    );

    cluster.apply(node("node-b", "zone-c"));
    let s = next_snapshot(&mut src, "MODIFIED Node");
    assert_eq!(zone_of_node(&s).as_deref(), Some("zone-c"));
    assert!(matches_server(&s, &cluster), "{:?}", summary(&s));

    // Another node's change never reaches this node's watch.
    cluster.apply(node("node-a", "zone-c"));
    // A bookmark reaches all three watches (the fake counts what it sent) and changes nothing.
    let sent = cluster.db().bookmarks_sent;
    cluster.bookmark();
    wait_until("bookmarks delivered", || {
        cluster.db().bookmarks_sent == sent + 3
    });
    assert_quiet(
        &mut src,
        Duration::from_millis(400),
        "bookmark / other node",
    );

    // The stream is still alive after the bookmark.
    cluster.apply(service("default", "web", "10.96.0.12"));
    let s = next_snapshot(&mut src, "MODIFIED Service after a bookmark");
    assert_eq!(
        cluster_ip(&s, "default", "web").as_deref(),
        Some("10.96.0.12")
    );
    assert_eq!(src.watch_restarts(), 0);
}

/// Changes whose events were lost, then the history is compacted: the running watches end with
/// an `ERROR` event code 410, the watchers re-list, and the snapshot converges to what the
/// server has; the error counts as a restart.
#[test]
fn expired_watch_relists_and_converges() {
    expired_watch_case(false);
}

/// The same with the watch request itself answered `410 Gone`, which kube's watcher alone would
/// retry with the same resourceVersion for ever; the source re-lists.
#[test]
fn gone_watch_request_relists_and_converges() {
    expired_watch_case(true);
}

fn expired_watch_case(gone_as_http: bool) {
    let cluster = seeded();
    cluster.gone_as_http(gone_as_http);
    let api = FakeApi::start(&cluster, 0);
    let mut src = source(&api);
    next_snapshot(&mut src, "the first snapshot");
    wait_until("three watches", || cluster.db().active_watches == 3);
    let lists: Vec<usize> = Kind::ALL.iter().map(|k| cluster.lists(*k)).collect();
    let restarts = src.watch_restarts();

    cluster.apply_silently(service("default", "web", "10.96.0.99"));
    cluster.apply_silently(service("default", "api", "10.96.0.20"));
    cluster.delete_silently(Kind::Service, "kube-system", "dns");
    cluster.apply_silently(endpoint_slice("default", "web-abc", "web", &["10.0.9.9"]));
    cluster.apply_silently(node("node-b", "zone-z"));
    assert_quiet(
        &mut src,
        Duration::from_millis(200),
        "lost events are not seen",
    );

    cluster.expire();
    // Each watcher re-lists on its own (backoff has jitter): wait for all three.
    let s = wait_for(&mut src, "convergence after 410", |o| {
        matches_server(o, &cluster)
            && cluster_ip(o, "default", "web").as_deref() == Some("10.96.0.99")
            && endpoint_addresses(o, "default", "web-abc") == ["10.0.9.9"]
            && zone_of_node(o).as_deref() == Some("zone-z")
    });
    assert_eq!(names(&s.services), ["default/api", "default/web"]);
    assert_eq!(endpoint_addresses(&s, "default", "web-abc"), ["10.0.9.9"]);
    assert_eq!(zone_of_node(&s).as_deref(), Some("zone-z"));
    wait_until("every watcher re-listed", || {
        Kind::ALL
            .iter()
            .zip(&lists)
            .all(|(k, before)| cluster.lists(*k) > *before)
    });
    assert!(cluster.db().expired_answers >= 3, "the fake answered 410");
    assert!(
        src.watch_restarts() >= restarts + 3,
        "restarts {} before {restarts}",
        src.watch_restarts()
    );

    // Watching again from the fresh list.
    cluster.apply(service("default", "late", "10.96.0.30"));
    let s = next_snapshot(&mut src, "an event after the re-list");
    assert_eq!(
        names(&s.services),
        ["default/api", "default/late", "default/web"]
    );
}

/// A re-list that finds the very objects the source has gives no snapshot.
#[test]
fn relist_of_unchanged_objects_gives_no_snapshot() {
    let cluster = seeded();
    let api = FakeApi::start(&cluster, 0);
    let mut src = source(&api);
    next_snapshot(&mut src, "the first snapshot");
    wait_until("three watches", || cluster.db().active_watches == 3);
    let lists: Vec<usize> = Kind::ALL.iter().map(|k| cluster.lists(*k)).collect();

    cluster.expire();
    wait_until("every watcher re-listed and watches again", || {
        Kind::ALL
            .iter()
            .zip(&lists)
            .all(|(k, before)| cluster.lists(*k) > *before)
            && cluster.db().active_watches == 3
    });
    assert_quiet(
        &mut src,
        Duration::from_millis(300),
        "re-list of unchanged objects",
    );
    assert!(src.watch_restarts() >= 3);
}

/// The API server goes away: `poll` keeps answering "no change" (no error, so the agent keeps
/// its state) while the watchers retry; it comes back on the same port with changes made
/// meanwhile, and the snapshot converges.
#[test]
fn api_outage_keeps_last_state_and_recovers_on_restart() {
    let cluster = seeded();
    let api = FakeApi::start(&cluster, 0);
    let port = api.port;
    let mut src = source(&api);
    let first = next_snapshot(&mut src, "the first snapshot");
    wait_until("three watches", || cluster.db().active_watches == 3);
    let restarts = src.watch_restarts();

    api.stop();
    // Every failed reconnect counts; poll stays quiet throughout.
    let deadline = Instant::now() + DEADLINE;
    while src.watch_restarts() < restarts + 3 {
        assert!(Instant::now() < deadline, "watch errors during the outage");
        assert!(matches!(src.poll(), Ok(None)));
        std::thread::sleep(TICK);
    }
    assert_quiet(&mut src, Duration::from_millis(1500), "API server down");

    // Changes while the server is down, then it comes back on the same port.
    cluster.apply(service("default", "api", "10.96.0.20"));
    cluster.delete(Kind::EndpointSlice, "kube-system", "dns-xyz");
    cluster.apply(node("node-b", "zone-c"));
    let api = FakeApi::start(&cluster, port);
    assert_eq!(api.port, port);
    let s = wait_for(&mut src, "convergence after the restart", |o| {
        matches_server(o, &cluster) && zone_of_node(o).as_deref() == Some("zone-c")
    });
    assert_ne!(summary(&s), summary(&first));
    assert_eq!(
        names(&s.services),
        ["default/api", "default/web", "kube-system/dns"]
    );
    assert_eq!(names(&s.endpoint_slices), ["default/web-abc"]);
    assert!(src.watch_restarts() > restarts);

    // And it keeps watching.
    cluster.delete(Kind::Service, "default", "api");
    let s = next_snapshot(&mut src, "an event after the restart");
    assert_eq!(names(&s.services), ["default/web", "kube-system/dns"]);
    drop(api);
}

/// Dropping the source stops its watchers promptly: the server sees every watch go away.
#[test]
fn drop_stops_the_watchers() {
    let cluster = seeded();
    let api = FakeApi::start(&cluster, 0);
    let mut src = source(&api);
    next_snapshot(&mut src, "the first snapshot");
    wait_until("three watches", || cluster.db().active_watches == 3);

    let started = Instant::now();
    drop(src);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "drop took {:?}",
        started.elapsed()
    );
    wait_until("watches closed", || cluster.db().active_watches == 0);
    drop(api);
}

/// Configuration errors are errors at start, with the path or URL in the message; an
/// unreachable server is not.
#[test]
fn configuration_errors_fail_at_start() {
    let missing = KubeSource::new(
        KubeConfigChoice::Kubeconfig("/nonexistent/kubeconfig".into()),
        NODE,
    );
    let e = format!(
        "{:#}",
        missing.err().expect("missing kubeconfig is an error")
    );
    assert!(e.contains("/nonexistent/kubeconfig"), "{e}");

    let bad_url = KubeSource::new(KubeConfigChoice::Url("http://[not a url".into()), NODE);
    let e = format!("{:#}", bad_url.err().expect("malformed URL is an error"));
    assert!(e.contains("not a url"), "{e}");

    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        let e = KubeSource::new(KubeConfigChoice::InCluster, NODE)
            .err()
            .expect("not in a pod");
        assert!(format!("{e:#}").contains("in-cluster"), "{e:#}");
    }

    // Nothing listens on port 9 of the loopback: not an error, just no snapshot yet.
    let mut unreachable =
        KubeSource::new(KubeConfigChoice::Url("http://127.0.0.1:9".into()), NODE).unwrap();
    assert_quiet(
        &mut unreachable,
        Duration::from_millis(200),
        "unreachable API server",
    );
}

/// A dual-stack Service from the API (both families' clusterIPs, an IPv4 and an IPv6 slice, a
/// Node with addresses of both families) reaches the model and the plan per family: each
/// family's frontends with only that family's endpoints.
#[test]
fn dual_stack_objects_are_planned_per_family() {
    use lb_userspace::control::{model, plan};
    let cluster = Cluster::new();
    let mut web = service("default", "web", "10.96.0.10");
    web["spec"]["clusterIPs"] = json!(["10.96.0.10", "fd00:96::10"]);
    web["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
    web["spec"]["ipFamilyPolicy"] = json!("PreferDualStack");
    cluster.apply(web);
    cluster.apply(endpoint_slice("default", "web-v4", "web", &["10.0.1.1"]));
    let mut v6 = endpoint_slice("default", "web-v6", "web", &["fd00:244::1"]);
    v6["addressType"] = json!("IPv6");
    cluster.apply(v6);
    let mut n = node(NODE, "zone-b");
    n["status"]["addresses"] = json!([
        {"type": "InternalIP", "address": "192.0.2.1"},
        {"type": "InternalIP", "address": "2001:db8::1"}
    ]);
    cluster.apply(n);
    let api = FakeApi::start(&cluster, 0);
    let mut src = source(&api);
    let objects = wait_for(&mut src, "the dual-stack objects", |o| {
        o.services.len() == 1 && o.endpoint_slices.len() == 2 && o.nodes.len() == 1
    });
    let p = plan::plan(&model::build(&objects, NODE), NODE);
    assert!(p.rejected.is_empty(), "{:?}", p.rejected);
    assert_eq!(
        p.node.ipv6_addresses,
        ["2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap()]
    );
    let v4: Vec<String> = p.services[0]
        .cluster_endpoints
        .iter()
        .flatten()
        .map(|e| e.addr.to_string())
        .collect();
    let v6: Vec<String> = p.services_ipv6[0]
        .cluster_endpoints
        .iter()
        .flatten()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(
        (v4, v6),
        (
            vec!["10.0.1.1:8080".to_string()],
            vec!["[fd00:244::1]:8080".to_string()]
        )
    );
    assert_eq!(
        p.services_ipv6[0].frontends[0].address.to_string(),
        "[fd00:96::10]:80"
    );
}
