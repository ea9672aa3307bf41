//! What changed between two snapshots, for kube-proxy's change metrics: Services and
//! EndpointSlices added, removed or modified (by `resourceVersion`, or by content where there is
//! none, as with manifests), and the `endpoints.kubernetes.io/last-change-trigger-time` of the
//! slices that changed, from which the network programming latency is measured.
use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    time::{Duration, SystemTime},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::control::source::Objects;

/// The annotation the EndpointSlice controller sets to when the change it reflects began.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The identity and version of the Services and EndpointSlices last seen.
#[derive(Default)]
pub struct ChangeTracker {
    services: HashMap<String, u64>,
    slices: HashMap<String, u64>,
}

/// What one snapshot changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: u64,
    pub endpoint_slices: u64,
    /// Trigger times of the EndpointSlices added or modified.
    pub trigger_times: Vec<SystemTime>,
}

fn key(m: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or(""),
        m.name.as_deref().unwrap_or("")
    )
}

/// The object's version: its resourceVersion, or a hash of its content.
fn version<T: serde::Serialize>(m: &ObjectMeta, o: &T) -> u64 {
    let mut h = DefaultHasher::new();
    match &m.resource_version {
        Some(rv) => rv.hash(&mut h),
        None => serde_json::to_string(o).unwrap_or_default().hash(&mut h),
    }
    h.finish()
}

/// Counts what differs between `before` and `now` (keys to versions), and makes `before` `now`.
fn diff(before: &mut HashMap<String, u64>, now: HashMap<String, u64>) -> Vec<String> {
    let mut changed: Vec<String> = now
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    changed.extend(before.keys().filter(|k| !now.contains_key(*k)).cloned());
    *before = now;
    changed
}

/// Parses an RFC 3339 time as the annotation holds it.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let t: jiff::Timestamp = s.parse().ok()?;
    let secs = t.as_second();
    let nanos = t.subsec_nanosecond();
    if secs < 0 || nanos < 0 {
        return None;
    }
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos as u32))
}

impl ChangeTracker {
    /// What `o` changed since the last snapshot observed.
    pub fn observe(&mut self, o: &Objects) -> Changes {
        let services = o
            .services
            .iter()
            .map(|s| (key(&s.metadata), version(&s.metadata, s)))
            .collect();
        let slices: HashMap<String, u64> = o
            .endpoint_slices
            .iter()
            .map(|s| (key(&s.metadata), version(&s.metadata, s)))
            .collect();
        let services = diff(&mut self.services, services).len() as u64;
        let changed = diff(&mut self.slices, slices);
        let trigger_times = o
            .endpoint_slices
            .iter()
            .filter(|s| changed.contains(&key(&s.metadata)))
            .filter_map(|s| s.metadata.annotations.as_ref()?.get(TRIGGER_TIME))
            .filter_map(|t| parse_time(t))
            .collect();
        Changes {
            services,
            endpoint_slices: changed.len() as u64,
            trigger_times,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(yaml: &str) -> Objects {
        let mut o = Objects::default();
        crate::control::source::parse_into(std::path::Path::new("t.yaml"), yaml, &mut o).unwrap();
        o
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";

    fn slice(eps: &str, trigger: &str) -> String {
        format!("---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: a-1, namespace: ns, labels: {{kubernetes.io/service-name: a}}, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{eps}]\n")
    }

    #[test]
    fn counts_changes_and_collects_trigger_times() {
        let mut t = ChangeTracker::default();
        let first = objects(&format!(
            "{SVC}{}",
            slice("{addresses: [10.0.0.1]}", "2026-12-01T10:00:00Z")
        ));
        let c = t.observe(&first);
        assert_eq!((c.services, c.endpoint_slices), (1, 1));
        assert_eq!(
            c.trigger_times,
            vec![parse_time("2026-12-01T10:00:00Z").unwrap()]
        );
        // The same again: nothing.
        assert_eq!(t.observe(&first), Changes::default());
        // An endpoint added: one slice, its new trigger time.
        let c = t.observe(&objects(&format!(
            "{SVC}{}",
            slice(
                "{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}",
                "2026-12-01T10:00:05.250Z"
            )
        )));
        assert_eq!((c.services, c.endpoint_slices), (0, 1));
        assert_eq!(
            c.trigger_times,
            vec![SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_119_205_250)]
        );
        // Everything removed: two changes, no trigger time.
        let c = t.observe(&Objects::default());
        assert_eq!((c.services, c.endpoint_slices), (1, 1));
        assert!(c.trigger_times.is_empty());
    }
}
