//! Objects from the Kubernetes API: each input line is one object as a watch event carries it,
//! deserialized as kube-rs does (`serde_json` into the k8s-openapi type: a Service, an
//! EndpointSlice or a Node; lines that are none of them are dropped as a watch error would), kept
//! in reflector stores (one object per kind, namespace and name; the last one wins; sorted), then
//! defaulted as the Kubernetes source does, and run through model, plan, desired and render.
//!
//! The same objects written as a file (`kubectl get -o json`: a `List`) and read by the manifests
//! source must plan exactly the same: a file behaves as the same objects in a cluster would.
#![no_main]
use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use lb_fuzz::{check_pipeline, check_same_plans};
use lb_userspace::control::source::{default_endpoint_slice, default_service, parse_into, Objects};
use libfuzzer_sys::fuzz_target;

type Key = (Option<String>, Option<String>);

fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (meta.namespace.clone(), meta.name.clone())
}

/// Escapes (`\uXXXX`, the same character in JSON and YAML) what the YAML parser of the manifests
/// source does not take raw: DEL, C1 controls, U+FEFF, U+FFFE/U+FFFF (`control characters are not
/// allowed`), and U+2028/U+2029 (line breaks to YAML 1.1; Go's JSON encoder escapes them too).
/// These can only occur inside strings, where serde_json leaves them raw.
/// Known limitation, not checked: a manifests file with such raw characters is a parse error.
fn yaml_safe(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '\u{7f}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut services: BTreeMap<Key, Service> = BTreeMap::new();
    let mut slices: BTreeMap<Key, EndpointSlice> = BTreeMap::new();
    let mut nodes: BTreeMap<Key, Node> = BTreeMap::new();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(s) = serde_json::from_slice::<Service>(line) {
            services.insert(key(&s.metadata), s);
        } else if let Ok(s) = serde_json::from_slice::<EndpointSlice>(line) {
            slices.insert(key(&s.metadata), s);
        } else if let Ok(n) = serde_json::from_slice::<Node>(line) {
            nodes.insert(key(&n.metadata), n);
        }
    }
    let mut objects = Objects {
        nodes: nodes.into_values().collect(),
        services: services.into_values().collect(),
        endpoint_slices: slices.into_values().collect(),
        versioned: false,
    };
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": objects.nodes.iter().map(|o| serde_json::to_value(o).unwrap())
            .chain(objects.services.iter().map(|o| serde_json::to_value(o).unwrap()))
            .chain(objects.endpoint_slices.iter().map(|o| serde_json::to_value(o).unwrap()))
            .collect::<Vec<_>>(),
    });
    objects.services.iter_mut().for_each(default_service);
    objects
        .endpoint_slices
        .iter_mut()
        .for_each(default_endpoint_slice);
    check_pipeline(&objects);

    let file = yaml_safe(&serde_json::to_string_pretty(&list).expect("objects serialize"));
    let mut from_file = Objects::default();
    if let Err(e) = parse_into(std::path::Path::new("fuzz.json"), &file, &mut from_file) {
        panic!("the manifests source cannot read the objects as JSON: {e}\n{file}");
    }
    check_same_plans(&objects, &from_file);
});
