//! The deployment manifests under `deploy/` (everything but `deploy/examples/`).
//!
//! Every YAML document is read, recognised by `apiVersion` + `kind` and, where k8s-openapi has the
//! type, deserialized into it. k8s-openapi ignores fields it does not know, so each document is
//! also serialized back and compared with what was read: a misspelled field (`hostNetwrok`) is
//! an error here instead of a setting that silently never takes effect. On top of that: RBAC is
//! exactly what the agent's watchers need, the DaemonSet runs the agent as documented (service
//! account, host network, capabilities, mounts, flags, probes), the kustomizations reference what
//! exists and build what the tests check, and the alerts use only metrics the agent exports.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{json, Value};

// The kustomize subset and the PromQL scanning, each in a file of its own under tests/deploy/
// (`#[path]`: a file directly in tests/ would be a test binary of its own).
#[path = "deploy/kustomize.rs"]
mod kustomize;
#[path = "deploy/promql.rs"]
mod promql;

use kustomize::{apply_json_patch, built_daemonset, kustomizations, split_image};
use promql::{balanced, identifiers, is_duration, label_values, PROMQL_WORDS};

// ---- the contract the manifests are checked against ----

/// Exactly what the ClusterRole grants: (API group, resource, verb).
const RBAC: [(&str, &str, &str); 6] = [
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
    ("", "services", "list"),
    ("", "services", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
];

/// Exactly the capabilities the agent container adds (after dropping ALL).
const CAPABILITIES: [&str; 6] = [
    "BPF",
    "NET_ADMIN",
    "PERFMON",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "SYS_RESOURCE",
];

/// The metric names lb-agent exports (`--metrics-addr`).
const METRICS: [&str; 20] = [
    "lb_datapath_events_total",
    "lb_map_entries",
    "lb_map_capacity",
    "lb_sync_duration_seconds",
    "lb_map_writes_total",
    "lb_sync_errors_total",
    "lb_watch_restarts_total",
    "lb_last_sync_timestamp_seconds",
    "lb_service_local_endpoints",
    "lb_service_drops_total",
    "lb_service_topology_hints_unusable",
    "lb_conntrack_gc_sweeps_total",
    "lb_conntrack_gc_errors_total",
    "lb_conntrack_gc_removed_entries_total",
    "lb_conntrack_gc_duration_seconds",
    "lb_conntrack_gc_last_duration_seconds",
    "lb_conntrack_gc_interval_seconds",
    "lb_conntrack_entries",
    "lb_conntrack_udp_flushed_entries_total",
    // Prometheus' own, per scrape target.
    "up",
];

/// Histograms: also exported as `<name>_bucket`, `_sum` and `_count`.
const HISTOGRAMS: [&str; 2] = [
    "lb_sync_duration_seconds",
    "lb_conntrack_gc_duration_seconds",
];

/// Values of `lb_map_entries{map}` / `lb_map_capacity{map}` (`inspect::map_occupancy`).
const MAPS: [&str; 8] = [
    "services",
    "backends",
    "rev_nat",
    "members",
    "conntrack",
    "affinity",
    "sock_rev_nat",
    "sock_flow",
];

/// What the alerts must cover: each of these appears in some rule's expression.
const ALERTED: [&str; 11] = [
    "up{",
    "lb_last_sync_timestamp_seconds",
    "lb_sync_errors_total",
    "lb_map_capacity{map=\"conntrack\"}",
    "\"xdp_drop_ct_full\"",
    "\"xdp_drop_snat_exhausted\"",
    "\"xdp_drop_no_backend\"",
    "\"affinity_evictions\"",
    "lb_service_local_endpoints",
    "lb_service_drops_total{reason=\"no_backend\"}",
    "lb_service_topology_hints_unusable",
];

const CONTAINER: &str = "lb-agent";
const AGENT_PATH: &str = "/usr/local/bin/lb-agent";
const INIT_CONTAINER: &str = "prepare-node";

// ---- reading deploy/ ----

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
}

/// One YAML document: the file (relative to deploy/), its position in the file, its content.
#[derive(Clone, Debug)]
struct Doc {
    file: PathBuf,
    index: usize,
    value: Value,
}

impl Doc {
    fn name(&self) -> String {
        format!(
            "deploy/{} (document {})",
            self.file.display(),
            self.index + 1
        )
    }
    fn str(&self, pointer: &str) -> &str {
        self.value
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    fn kind(&self) -> (&str, &str) {
        (self.str("/apiVersion"), self.str("/kind"))
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            // Example objects and promtool's unit tests of the alerts are not manifests.
            if p == deploy_dir().join("examples") || p == deploy_dir().join("monitoring/tests") {
                continue;
            }
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

fn parse_documents(file: &Path, text: &str) -> Vec<Doc> {
    let rel = file
        .strip_prefix(deploy_dir())
        .unwrap_or(file)
        .to_path_buf();
    let mut docs = Vec::new();
    let values: Vec<Value> = serde_saphyr::from_multiple(text)
        .unwrap_or_else(|e| panic!("deploy/{}: {e}", rel.display()));
    for (index, value) in values.into_iter().enumerate() {
        if !value.is_null() {
            docs.push(Doc {
                file: rel.clone(),
                index,
                value,
            });
        }
    }
    docs
}

fn documents() -> Vec<Doc> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    assert!(
        !files.is_empty(),
        "no YAML under {}",
        deploy_dir().display()
    );
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let found = parse_documents(&f, &text);
        assert!(!found.is_empty(), "{}: no YAML document", f.display());
        docs.extend(found);
    }
    docs
}

fn one<'a>(docs: &'a [Doc], api_version: &str, kind: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == (api_version, kind))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {api_version} {kind}, found {}",
        found.len()
    );
    found[0]
}

// ---- typed round trip: unknown fields are errors ----

/// Differences between what was read and what the typed value serializes back to.
fn diff(path: &str, read: &Value, back: &Value, out: &mut Vec<String>) {
    match (read, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    None => out.push(format!(
                        "{p}: unknown field (the type has no such field; misspelled?)"
                    )),
                    Some(w) => diff(&p, v, w, out),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!(
                    "{path}.{k}: appears on serialization but was not written"
                ));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), v, w, out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: written {a}, read as {b}")),
    }
}

fn typed<T: DeserializeOwned + Serialize>(name: &str, value: &Value) -> Result<T, String> {
    let t: T = serde_json::from_value(value.clone()).map_err(|e| format!("{name}: {e}"))?;
    let back = serde_json::to_value(&t).map_err(|e| format!("{name}: {e}"))?;
    let mut diffs = Vec::new();
    diff("", value, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(t)
    } else {
        Err(format!(
            "{name}: {} does not take it as written:\n  {}",
            std::any::type_name::<T>(),
            diffs.join("\n  ")
        ))
    }
}

fn parse<T: DeserializeOwned + Serialize>(doc: &Doc) -> T {
    typed(&doc.name(), &doc.value).unwrap_or_else(|e| panic!("{e}"))
}

// ---- DaemonSet helpers ----

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .template
        .spec
        .as_ref()
        .expect("DaemonSet without a pod template spec")
}

fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = pod_spec(ds);
    assert_eq!(spec.containers.len(), 1, "one container, the agent");
    let c = &spec.containers[0];
    assert_eq!(c.name, CONTAINER);
    c
}

/// The one init container: `lb-agent prepare-node`.
fn init_container(ds: &DaemonSet) -> &Container {
    let init = pod_spec(ds).init_containers.as_deref().unwrap_or_default();
    assert_eq!(init.len(), 1, "one init container, prepare-node");
    assert_eq!(init[0].name, INIT_CONTAINER);
    &init[0]
}

/// `--flag=value` and `--flag value` pairs, in order.
fn flags(args: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if let Some(f) = a.strip_prefix("--") {
            match f.split_once('=') {
                Some((k, v)) => out.push((k.to_string(), v.to_string())),
                None => {
                    let v = args
                        .get(i + 1)
                        .filter(|v| !v.starts_with("--"))
                        .cloned()
                        .unwrap_or_default();
                    if !v.is_empty() {
                        i += 1;
                    }
                    out.push((f.to_string(), v));
                }
            }
        }
        i += 1;
    }
    out
}

fn flag<'a>(flags: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    flags
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn port_of(addr: &str) -> i32 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr}: no port"))
}

fn container_port(c: &Container, name: &str) -> i32 {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container has no port named {name}"))
        .container_port
}

/// (path, port number) of a probe's httpGet, named ports resolved.
fn http_probe(c: &Container, probe: Option<&Probe>, what: &str) -> (String, i32) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{what}: no httpGet probe"));
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => container_port(c, name),
    };
    (get.path.clone().unwrap_or_default(), port)
}

fn host_path_mount<'a>(
    ds: &'a DaemonSet,
    host_path: &str,
) -> &'a k8s_openapi::api::core::v1::VolumeMount {
    let volume = pod_spec(ds)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == host_path))
        .unwrap_or_else(|| panic!("no hostPath volume for {host_path}"));
    agent_container(ds)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .unwrap_or_else(|| panic!("volume {} ({host_path}) is not mounted", volume.name))
}

// ---- tests ----

#[test]
fn every_document_is_a_known_kind_and_parses_without_unknown_fields() {
    let docs = documents();
    let patch_files: BTreeSet<PathBuf> = kustomizations(&docs)
        .iter()
        .flat_map(|k| {
            k.doc
                .value
                .get("patches")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |p| {
                    p["path"]
                        .as_str()
                        .map(|s| k.doc.file.parent().unwrap().join(s))
                })
        })
        .collect();
    for doc in &docs {
        if doc.value.is_array() {
            assert!(
                patch_files.contains(&doc.file),
                "{}: a list, but no kustomization uses it as a patch",
                doc.name()
            );
            for op in doc.value.as_array().unwrap() {
                let keys: BTreeSet<&str> = op
                    .as_object()
                    .expect("patch operation")
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert!(
                    keys.is_subset(&BTreeSet::from(["op", "path", "value", "from"])),
                    "{}: {keys:?}",
                    doc.name()
                );
                assert!(
                    ["add", "remove", "replace", "test"].contains(&op["op"].as_str().unwrap_or("")),
                    "{}: {op}",
                    doc.name()
                );
            }
            // Shape only here; applying it is built_daemonset's and the device test's job.
            continue;
        }
        match doc.kind() {
            ("apps/v1", "DaemonSet") => drop(parse::<DaemonSet>(doc)),
            ("v1", "ServiceAccount") => drop(parse::<ServiceAccount>(doc)),
            ("v1", "Namespace") => {
                let ns = parse::<Namespace>(doc);
                let name = ns.metadata.name.unwrap_or_default();
                assert!(
                    !["kube-system", "kube-public", "kube-node-lease", "default"]
                        .contains(&name.as_str()),
                    "{}: declares the system namespace {name}; `kubectl delete -k` would delete it",
                    doc.name()
                );
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(parse::<ClusterRole>(doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                drop(parse::<ClusterRoleBinding>(doc))
            }
            ("monitoring.coreos.com/v1", "PrometheusRule") => check_prometheus_rule(doc),
            ("monitoring.coreos.com/v1", "PodMonitor") => {
                let keys: BTreeSet<&str> = doc
                    .value
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert_eq!(
                    keys,
                    BTreeSet::from(["apiVersion", "kind", "metadata", "spec"]),
                    "{}",
                    doc.name()
                );
            }
            ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                assert_eq!(
                    doc.file.file_name().unwrap(),
                    "kustomization.yaml",
                    "{}",
                    doc.name()
                );
                let known = BTreeSet::from([
                    "apiVersion",
                    "kind",
                    "namespace",
                    "resources",
                    "labels",
                    "images",
                    "patches",
                    "components",
                    "configMapGenerator",
                ]);
                for k in doc.value.as_object().unwrap().keys() {
                    assert!(known.contains(k.as_str()), "{}: `{k}` is not a field these manifests use (commonLabels is deprecated: use labels)", doc.name());
                }
                // Generated ConfigMaps (the Grafana dashboard): named, from files that exist.
                let dir = deploy_dir().join(doc.file.parent().unwrap());
                for g in doc.value["configMapGenerator"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    assert!(
                        g["name"].as_str().is_some(),
                        "{}: generator without a name",
                        doc.name()
                    );
                    let files = g["files"].as_array().expect("configMapGenerator files");
                    assert!(!files.is_empty(), "{}: generator without files", doc.name());
                    for f in files {
                        let f = f.as_str().expect("file name");
                        let path = dir.join(f.rsplit_once('=').map_or(f, |(_, p)| p));
                        assert!(
                            path.is_file(),
                            "{}: {} does not exist",
                            doc.name(),
                            path.display()
                        );
                    }
                }
            }
            (api, kind) => panic!("{}: unknown apiVersion/kind {api:?}/{kind:?}", doc.name()),
        }
    }
}

#[test]
fn misspelled_fields_are_caught() {
    let docs = documents();
    let ds = one(&docs, "apps/v1", "DaemonSet");
    let mut bad = ds.value.clone();
    bad["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    let err = typed::<DaemonSet>("misspelled", &bad).unwrap_err();
    assert!(
        err.contains(".spec.template.spec.hostNetwrok: unknown field"),
        "{err}"
    );
    let mut bad = one(&docs, "rbac.authorization.k8s.io/v1", "ClusterRole")
        .value
        .clone();
    bad["rules"][0]["verb"] = json!(["get"]);
    assert!(typed::<ClusterRole>("misspelled", &bad)
        .unwrap_err()
        .contains(".rules[0].verb: unknown field"));
}

#[test]
fn cluster_role_grants_exactly_list_and_watch_on_services_endpointslices_nodes() {
    let docs = documents();
    let role: ClusterRole = parse(one(&docs, "rbac.authorization.k8s.io/v1", "ClusterRole"));
    assert!(role.aggregation_rule.is_none(), "no aggregation");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none(), "resourceNames: {rule:?}");
        assert!(
            rule.non_resource_urls.is_none(),
            "nonResourceURLs: {rule:?}"
        );
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        assert!(
            !groups.is_empty() && !resources.is_empty() && !rule.verbs.is_empty(),
            "empty rule {rule:?}"
        );
        for g in &groups {
            for r in &resources {
                for v in &rule.verbs {
                    assert!(g != "*" && r != "*" && v != "*", "wildcard in {rule:?}");
                    assert!(
                        granted.insert((g.clone(), r.clone(), v.clone())),
                        "granted twice: {g:?} {r} {v}"
                    );
                }
            }
        }
    }
    let want: BTreeSet<(String, String, String)> = RBAC
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    assert_eq!(granted, want);
}

#[test]
fn binding_binds_the_role_to_the_agents_service_account() {
    let docs = documents();
    let role: ClusterRole = parse(one(&docs, "rbac.authorization.k8s.io/v1", "ClusterRole"));
    let binding: ClusterRoleBinding = parse(one(
        &docs,
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
    ));
    let sa: ServiceAccount = parse(one(&docs, "v1", "ServiceAccount"));
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.clone().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    let s = &subjects[0];
    assert_eq!(s.kind, "ServiceAccount");
    assert_eq!(Some(&s.name), sa.metadata.name.as_ref());
    assert!(
        s.namespace.is_some(),
        "a ServiceAccount subject needs its namespace"
    );
    assert_eq!(s.namespace, sa.metadata.namespace);
    assert_ne!(
        sa.automount_service_account_token,
        Some(false),
        "the agent uses the in-cluster token"
    );

    let ds = built_daemonset(&docs);
    assert_eq!(pod_spec(&ds).service_account_name, sa.metadata.name);
    assert_eq!(
        ds.metadata.namespace, sa.metadata.namespace,
        "DaemonSet and ServiceAccount in one namespace"
    );
    assert_ne!(pod_spec(&ds).automount_service_account_token, Some(false));
}

#[test]
fn namespaced_objects_are_in_their_kustomizations_namespace_and_every_manifest_is_listed() {
    let docs = documents();
    let ks = kustomizations(&docs);
    assert!(
        ks.iter().any(|k| k.dir == deploy_dir()),
        "deploy/kustomization.yaml"
    );
    let mut listed = BTreeSet::new();
    for k in &ks {
        for r in k.strings("/resources") {
            let p = k.dir.join(&r);
            assert!(
                p.is_file() || p.join("kustomization.yaml").is_file(),
                "{}: resource {r} does not exist (or is a directory without kustomization.yaml)",
                k.doc.name()
            );
            listed.insert(p.canonicalize().unwrap());
        }
        for p in k
            .doc
            .value
            .get("patches")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let path = p["path"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: patches need a path", k.doc.name()));
            assert!(
                k.dir.join(path).is_file(),
                "{}: patch {path} does not exist",
                k.doc.name()
            );
            listed.insert(k.dir.join(path).canonicalize().unwrap());
            let target = &p["target"];
            assert!(
                k.resources()
                    .iter()
                    .any(|d| d.str("/kind") == target["kind"]
                        && d.value["metadata"]["name"] == target["name"]),
                "{}: patch {path} targets nothing in the resources",
                k.doc.name()
            );
        }
        for img in k
            .doc
            .value
            .get("images")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = img["name"].as_str().unwrap();
            let used = k
                .resources()
                .iter()
                .filter(|d| d.kind() == ("apps/v1", "DaemonSet"))
                .any(|d| {
                    d.value["spec"]["template"]["spec"]["containers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|c| split_image(c["image"].as_str().unwrap_or("")).0 == name)
                });
            assert!(
                used,
                "{}: image {name} is used by no container",
                k.doc.name()
            );
        }
        for label in k
            .doc
            .value
            .get("labels")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            assert_ne!(
                label.get("includeSelectors"),
                Some(&json!(true)),
                "{}: selectors are immutable",
                k.doc.name()
            );
        }
        let ns = k
            .namespace()
            .unwrap_or_else(|| panic!("{}: set namespace", k.doc.name()));
        for d in k.resources() {
            let cluster_scoped = matches!(
                d.str("/kind"),
                "ClusterRole" | "ClusterRoleBinding" | "Namespace"
            );
            if cluster_scoped {
                assert!(
                    d.value["metadata"].get("namespace").is_none(),
                    "{}: cluster-scoped",
                    d.name()
                );
            } else {
                assert_eq!(
                    d.str("/metadata/namespace"),
                    ns,
                    "{}: same namespace with and without kustomize",
                    d.name()
                );
            }
            for s in d
                .value
                .get("subjects")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                assert_eq!(s["namespace"], ns, "{}: subject namespace", d.name());
            }
        }
    }
    for d in &docs {
        if d.kind().1 == "Kustomization" {
            continue;
        }
        let p = deploy_dir().join(&d.file).canonicalize().unwrap();
        assert!(
            listed.contains(&p),
            "{}: no kustomization lists it",
            d.name()
        );
    }
}

#[test]
fn daemonset_runs_on_every_node_in_the_host_network() {
    let docs = documents();
    let ds = built_daemonset(&docs);
    let spec = &ds.spec;
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            template_labels.get(k),
            Some(v),
            "selector {k}={v} must match the pod template"
        );
    }
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    // A share of the nodes at a time (the old pod's programs keep translating meanwhile)...
    assert_eq!(
        rolling.max_unavailable,
        Some(IntOrString::String("10%".into()))
    );
    // ... and never a surge: a second pod on a node cannot have the same host ports, nor the pin
    // directory, which one agent at a time holds.
    assert!(
        matches!(rolling.max_surge, None | Some(IntOrString::Int(0))),
        "{:?}",
        rolling.max_surge
    );

    let pod = pod_spec(&ds);
    assert_eq!(pod.host_network, Some(true));
    // The node's resolv.conf: ClusterFirstWithHostNet would resolve through CoreDNS's ClusterIP,
    // which on this node only this agent translates. The API server is reached by address.
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    let c = agent_container(&ds);
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        let from = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == var)
            .and_then(|e| e.value_from.as_ref()?.config_map_key_ref.as_ref())
            .unwrap_or_else(|| panic!("{var} from a ConfigMap"));
        assert_eq!(from.name, "lb-agent-apiserver");
        assert_eq!(from.optional, Some(true), "{var}");
    }
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "a toleration of every taint (operator Exists, no key, no effect)"
    );
    assert_ne!(pod.host_pid, Some(true));
    assert_ne!(pod.host_ipc, Some(true));
}

#[test]
fn agent_container_is_not_privileged_and_has_exactly_its_capabilities() {
    let docs = documents();
    let ds = built_daemonset(&docs);
    let c = agent_container(&ds);
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_user, Some(0));
    assert_ne!(
        sc.proc_mount.as_deref(),
        Some("Unmasked"),
        "needs hostUsers: false, impossible with hostNetwork"
    );
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        caps.drop.clone().unwrap_or_default(),
        vec!["ALL".to_string()]
    );
    let add: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(add, BTreeSet::from(CAPABILITIES));
    // The API server refuses this spelling together with allowPrivilegeEscalation: false.
    assert!(!add.contains("CAP_SYS_ADMIN"));
    if let Some(psc) = &pod_spec(&ds).security_context {
        assert!(
            psc.sysctls.is_none(),
            "net.* sysctls are refused for hostNetwork pods"
        );
    }
}

#[test]
fn agent_container_mounts_bpffs_and_the_cgroup_root_as_its_flags_say() {
    let docs = documents();
    let ds = built_daemonset(&docs);
    let c = agent_container(&ds);
    let privileged = c.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
    for m in c.volume_mounts.iter().flatten() {
        // API validation and runc's rules, which no type expresses.
        assert!(
            privileged || m.mount_propagation.as_deref() != Some("Bidirectional"),
            "{}: Bidirectional propagation is only allowed for privileged containers",
            m.mount_path
        );
        assert!(
            m.mount_path != "/proc" && !m.mount_path.starts_with("/proc/"),
            "{}: runc refuses mounts under /proc",
            m.mount_path
        );
    }
    let args = c.args.clone().unwrap_or_default();
    let f = flags(&args);
    // Only the agent's pin directory of the node's bpffs, created by the kubelet when missing,
    // and the agent pins right there: --bpffs is the mount itself.
    let bpffs = host_path_mount(&ds, "/sys/fs/bpf/lb");
    assert_ne!(
        bpffs.read_only,
        Some(true),
        "maps and links are pinned there"
    );
    let volumes = pod_spec(&ds).volumes.as_deref().unwrap_or_default();
    let pin_volume = volumes.iter().find(|v| v.name == bpffs.name).unwrap();
    assert_eq!(
        pin_volume.host_path.as_ref().unwrap().type_.as_deref(),
        Some("DirectoryOrCreate")
    );
    for v in volumes {
        if let Some(h) = &v.host_path {
            assert!(
                h.path != "/sys/fs/bpf" && h.path != "/sys/fs/bpf/" && h.path != "/sys",
                "{}: the node's whole bpffs is mounted",
                v.name
            );
        }
    }
    // The container's /sys is a sysfs of its own, where no mount point can be created: the pin
    // directory goes on /sys/fs/bpf, which exists there.
    assert_eq!(bpffs.mount_path, "/sys/fs/bpf");
    assert_eq!(flag(&f, "bpffs"), vec![bpffs.mount_path.as_str()]);
    // lbctl in the container reads the same directory.
    let lbctl = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "LBCTL_BPFFS")
        .expect("env LBCTL_BPFFS");
    assert_eq!(lbctl.value.as_deref(), Some(bpffs.mount_path.as_str()));
    let help = Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("LBCTL_BPFFS"));
    let cgroup = host_path_mount(&ds, "/sys/fs/cgroup");
    assert_eq!(
        cgroup.read_only,
        Some(true),
        "attaching needs only a directory fd"
    );
    assert_eq!(flag(&f, "cgroup"), vec![cgroup.mount_path.as_str()]);
    // The node's /proc, read-only, where --proc (LB_AGENT_PROC) says: pods' network
    // namespaces for socket termination, without sharing the node's PID namespace.
    let proc = host_path_mount(&ds, "/proc");
    assert_eq!(proc.read_only, Some(true));
    assert!(flag(&f, "proc").is_empty(), "{args:?}");
    let env = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "LB_AGENT_PROC")
        .expect("env LB_AGENT_PROC");
    assert_eq!(env.value.as_deref(), Some(proc.mount_path.as_str()));
}

#[test]
fn agent_arguments_node_ports_and_probes() {
    let docs = documents();
    let ds = built_daemonset(&docs);
    let c = agent_container(&ds);
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    let f = flags(&args);

    // --node from the downward API.
    assert_eq!(flag(&f, "node"), vec!["$(NODE_NAME)"]);
    let env = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("env NODE_NAME");
    let field = env
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");

    // The Kubernetes API, not manifests.
    assert!(
        flag(&f, "manifests").is_empty() && flag(&f, "kubeconfig").is_empty(),
        "{args:?}"
    );
    assert_eq!(flag(&f, "log-format"), vec!["json"]);

    // Ports and probes.
    let metrics = flag(&f, "metrics-addr");
    let health = flag(&f, "health-addr");
    assert_eq!(metrics.len(), 1, "--metrics-addr");
    assert_eq!(health.len(), 1, "--health-addr");
    assert_eq!(port_of(metrics[0]), 9464);
    assert_eq!(port_of(health[0]), 10256);
    assert_eq!(container_port(c, "metrics"), 9464);
    assert_eq!(container_port(c, "healthz"), 10256);
    assert_eq!(
        http_probe(c, c.liveness_probe.as_ref(), "liveness"),
        ("/livez".to_string(), 10256)
    );
    assert_eq!(
        http_probe(c, c.readiness_probe.as_ref(), "readiness"),
        ("/healthz".to_string(), 10256)
    );
    if c.startup_probe.is_some() {
        let (path, port) = http_probe(c, c.startup_probe.as_ref(), "startup");
        assert!(path == "/livez" || path == "/healthz");
        assert_eq!(port, 10256);
    }

    // Every flag is one lb-agent knows.
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (name, _) in &f {
        assert!(
            help.contains(&format!("--{name} ")),
            "lb-agent run has no --{name}:\n{help}"
        );
    }
}

#[test]
fn daemonset_device_list_is_patchable() {
    let docs = documents();
    let ds = built_daemonset(&docs);
    let args = agent_container(&ds).args.clone().unwrap_or_default();
    let first_device = args
        .iter()
        .position(|a| a.starts_with("--device"))
        .expect("at least one --device");
    for a in &args[first_device..] {
        let dev = a
            .strip_prefix("--device=")
            .unwrap_or_else(|| panic!("{a}: devices are `--device=IFACE`, last in args"));
        assert!(
            !dev.is_empty()
                && dev.len() < 16
                && !dev.contains('/')
                && !dev.contains(char::is_whitespace),
            "{dev}: not an interface name"
        );
    }
    // Appending a device is one `add .../args/-`.
    let mut raw = one(&docs, "apps/v1", "DaemonSet").value.clone();
    apply_json_patch(&mut raw, &json!([{"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--device=eth1"}])).unwrap();
    let with: DaemonSet = typed("patched", &raw).unwrap();
    assert_eq!(
        agent_container(&with)
            .args
            .as_ref()
            .unwrap()
            .last()
            .unwrap(),
        "--device=eth1"
    );
    // The shipped patch guards the position it replaces.
    let mut moved = one(&docs, "apps/v1", "DaemonSet").value.clone();
    moved["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array_mut()
        .unwrap()
        .insert(1, json!("--snat-ports=1024-29999"));
    let patch: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(deploy_dir().join("patches/devices.yaml")).unwrap(),
    )
    .unwrap();
    assert!(
        apply_json_patch(&mut moved, &patch).is_err(),
        "patches/devices.yaml must fail when the arguments move"
    );
}

#[test]
fn agent_command_execs_the_binary_the_image_installs() {
    let docs = documents();
    let ds = built_daemonset(&docs);
    let c = agent_container(&ds);
    let containerfile = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    let installs = containerfile.lines().any(|l| {
        l.starts_with("COPY")
            && l.contains("lb-agent")
            && l.contains("lbctl")
            && l.trim_end().ends_with("/usr/local/bin/")
    });
    assert!(
        installs,
        "Containerfile must copy lb-agent and lbctl into /usr/local/bin/"
    );
    // The agent itself, no shell wrapper (there is none in the image to remount /proc/sys).
    let command = c.command.clone().unwrap_or_default();
    assert!(
        command.is_empty() || command == [AGENT_PATH],
        "unexpected command {command:?}"
    );
    // cleanup-kube-proxy runs iptables-*-save/-restore and nft from the image.
    assert!(
        containerfile.lines().any(|l| l.contains("apt-get install")
            && l.split_whitespace().any(|w| w == "iptables")
            && l.split_whitespace().any(|w| w == "nftables")),
        "the runtime image must install iptables and nftables"
    );
    assert!(
        c.image
            .as_deref()
            .is_some_and(|i| !i.is_empty() && !i.ends_with(":latest")),
        "a pinned image tag"
    );
}

#[test]
fn init_container_prepares_the_node_and_only_it_is_privileged() {
    let docs = documents();
    let ds = built_daemonset(&docs);
    let init = init_container(&ds);
    let agent = agent_container(&ds);
    // The same image (kustomize's `images` rewrites both), running `lb-agent prepare-node`.
    assert_eq!(init.image, agent.image);
    assert_eq!(init.command.as_deref(), Some(&[AGENT_PATH.to_string()][..]));
    assert_eq!(
        init.args.as_deref(),
        Some(&["prepare-node".to_string()][..])
    );
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args(["prepare-node", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "lb-agent has no prepare-node");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("accept_local"),
        "prepare-node sets accept_local"
    );
    // A writable /proc/sys needs privileged; the long-running agent is not.
    let sc = init.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(true));
    assert_ne!(
        agent.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    // It mounts nothing and serves nothing.
    assert!(init.volume_mounts.as_ref().is_none_or(Vec::is_empty));
    assert!(init.ports.as_ref().is_none_or(Vec::is_empty));
    // Both have a memory request and a limit not below it.
    for c in [init, agent] {
        let r = c.resources.as_ref().expect("resources");
        let req = r.requests.as_ref().and_then(|m| m.get("memory"));
        let lim = r.limits.as_ref().and_then(|m| m.get("memory"));
        let (Some(req), Some(lim)) = (req, lim) else {
            panic!("{}: memory request and limit", c.name)
        };
        assert!(mebibytes(&lim.0) >= mebibytes(&req.0), "{}", c.name);
    }
}

/// `256Mi`, `1Gi` in MiB (the units these manifests use).
fn mebibytes(q: &str) -> u64 {
    if let Some(n) = q.strip_suffix("Mi") {
        n.parse().unwrap()
    } else if let Some(n) = q.strip_suffix("Gi") {
        n.parse::<u64>().unwrap() * 1024
    } else {
        panic!("{q}: use Mi or Gi")
    }
}

// ---- PrometheusRule ----

fn check_prometheus_rule(doc: &Doc) {
    let name = doc.name();
    let v = &doc.value;
    let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["apiVersion", "kind", "metadata", "spec"]),
        "{name}"
    );
    assert!(
        !doc.str("/metadata/name").is_empty(),
        "{name}: metadata.name"
    );
    let spec_keys: BTreeSet<&str> = v["spec"]
        .as_object()
        .expect("spec")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(spec_keys, BTreeSet::from(["groups"]), "{name}: spec");
    let groups = v["spec"]["groups"].as_array().expect("spec.groups");
    assert!(!groups.is_empty(), "{name}: no groups");
    let mut group_names = BTreeSet::new();
    let mut alerts = BTreeSet::new();
    let mut exprs = String::new();
    let labels_in_metrics: BTreeSet<&str> = BTreeSet::from([
        "counter",
        "map",
        "namespace",
        "name",
        "job",
        "node",
        "le",
        "instance",
        "reason",
    ]);
    for g in groups {
        for k in g.as_object().expect("group").keys() {
            assert!(
                [
                    "name",
                    "interval",
                    "rules",
                    "limit",
                    "query_offset",
                    "partial_response_strategy"
                ]
                .contains(&k.as_str()),
                "{name}: group field {k}"
            );
        }
        let gname = g["name"].as_str().expect("group name");
        assert!(group_names.insert(gname), "{name}: group {gname} twice");
        let rules = g["rules"].as_array().expect("rules");
        assert!(!rules.is_empty(), "{name}: group {gname} has no rules");
        for r in rules {
            for k in r.as_object().expect("rule").keys() {
                assert!(
                    [
                        "alert",
                        "expr",
                        "for",
                        "keep_firing_for",
                        "labels",
                        "annotations"
                    ]
                    .contains(&k.as_str()),
                    "{name}: rule field {k} in {r}"
                );
            }
            let alert = r["alert"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: every rule here is an alert: {r}"));
            assert!(
                alert.starts_with("Lb") && alert.chars().all(|c| c.is_ascii_alphanumeric()),
                "{name}: alert name {alert}"
            );
            assert!(alerts.insert(alert), "{name}: alert {alert} twice");
            let expr = r["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: expr"));
            assert!(!expr.trim().is_empty(), "{alert}: empty expr");
            assert!(
                balanced(expr, '(', ')') && balanced(expr, '{', '}') && balanced(expr, '[', ']'),
                "{alert}: unbalanced: {expr}"
            );
            let for_ = r["for"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: `for`"));
            assert!(is_duration(for_), "{alert}: for {for_:?}");
            let severity = r["labels"]["severity"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: labels.severity"));
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{alert}: severity {severity}"
            );
            for a in ["summary", "description"] {
                let text = r["annotations"][a]
                    .as_str()
                    .unwrap_or_else(|| panic!("{alert}: annotations.{a}"));
                assert!(!text.trim().is_empty(), "{alert}: empty {a}");
                assert_eq!(
                    text.matches("{{").count(),
                    text.matches("}}").count(),
                    "{alert}: template braces in {a}"
                );
            }

            for id in identifiers(expr) {
                if id.chars().all(|c| c.is_ascii_digit() || c == '.')
                    || PROMQL_WORDS.contains(&id.as_str())
                    || labels_in_metrics.contains(id.as_str())
                {
                    continue;
                }
                let base = HISTOGRAMS.iter().find(|h| {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| id == format!("{h}{s}"))
                });
                assert!(
                    METRICS.contains(&id.as_str()) || base.is_some(),
                    "{alert}: `{id}` is not a metric lb-agent exports (or an unknown PromQL word)"
                );
                assert!(
                    !id.starts_with("lb_") || METRICS.contains(&id.as_str()) || base.is_some(),
                    "{alert}: {id}"
                );
            }
            for c in label_values(expr, "counter") {
                assert!(
                    lb_common::counter::NAMES.contains(&c.as_str()) || c == "affinity_evictions",
                    "{alert}: no datapath counter {c}"
                );
            }
            for m in label_values(expr, "map") {
                assert!(MAPS.contains(&m.as_str()), "{alert}: no map {m}");
            }
            exprs.push_str(expr);
            exprs.push('\n');
        }
    }
    let compact: String = exprs.chars().filter(|c| !c.is_whitespace()).collect();
    for needle in ALERTED {
        assert!(compact.contains(needle), "{name}: no alert uses {needle}");
    }
}

#[test]
fn alerts_use_only_exported_metrics_and_scrape_the_agent() {
    let docs = documents();
    let rule = one(&docs, "monitoring.coreos.com/v1", "PrometheusRule");
    check_prometheus_rule(rule);

    // The PodMonitor scrapes the agent's metrics port and names the job the alerts use.
    let pm = one(&docs, "monitoring.coreos.com/v1", "PodMonitor");
    let ds = built_daemonset(&docs);
    let c = agent_container(&ds);
    let labels: BTreeMap<String, String> = ds
        .spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    for (k, v) in pm.value["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("PodMonitor selector")
    {
        assert_eq!(
            labels.get(k).map(String::as_str),
            v.as_str(),
            "PodMonitor selector {k}"
        );
    }
    let job_label = pm.str("/spec/jobLabel");
    let job = labels
        .get(job_label)
        .unwrap_or_else(|| panic!("jobLabel {job_label:?} is not a pod label"));
    let endpoints = pm.value["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("podMetricsEndpoints");
    assert!(!endpoints.is_empty());
    for e in endpoints {
        assert_eq!(
            container_port(c, e["port"].as_str().expect("named port")),
            9464
        );
        assert_eq!(e["path"], "/metrics");
    }
    let mut exprs = String::new();
    for g in rule.value["spec"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            exprs.push_str(r["expr"].as_str().unwrap());
        }
    }
    for j in label_values(&exprs, "job") {
        assert_eq!(
            &j, job,
            "alerts select job {j:?}, the PodMonitor makes it {job:?}"
        );
    }
}

#[test]
fn promql_scanning_helpers() {
    assert_eq!(
        identifiers(r#"rate(lb_x{counter="lb_not_a_metric"}[5m]) > 0.9"#),
        vec!["rate", "lb_x", "counter", "0.9"]
    );
    assert_eq!(
        label_values(r#"a{map=~"x|y", counter="c"} / b{xmap="no"}"#, "map"),
        vec!["x", "y"]
    );
    assert_eq!(
        label_values(r#"a{counter!="c"}"#, "counter"),
        Vec::<String>::new()
    );
    assert!(is_duration("5m") && is_duration("1h30m") && !is_duration("5") && !is_duration("m"));
    assert_eq!(
        flags(&[
            "run".into(),
            "--a=1".into(),
            "--b".into(),
            "2".into(),
            "--c".into()
        ]),
        vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("c".into(), String::new())
        ]
    );
}
