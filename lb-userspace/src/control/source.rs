//! Sources of Kubernetes objects. Only this module knows where objects come from; the rest of the
//! agent sees [`Objects`], a consistent snapshot of Nodes, Services and EndpointSlices.
//!
//! The manifests source reads multi-document YAML (a file, or every `*.yaml`/`*.yml`/`*.json` in
//! a directory, in name order) and applies the defaults the API server would have applied to an
//! object written for `kubectl apply`, so a file behaves as the same object in a cluster would.
use std::{
    fmt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

/// A consistent snapshot of the objects the agent reads.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub nodes: Vec<Node>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Whether an object's `metadata.resourceVersion` changes whenever the object does (the
    /// API server's objects): then an object of the same uid and resourceVersion as in an
    /// earlier snapshot is the same object, and `control::memo` need not compare contents.
    /// Manifests may keep a resourceVersion through edits: false there.
    pub versioned: bool,
}

/// A source of snapshots.
pub trait Source {
    /// The current snapshot when it changed since the last call (always on the first call).
    fn poll(&mut self) -> Result<Option<Objects>, SourceError>;
    /// Watch errors so far, for sources that watch (each one re-lists).
    fn watch_restarts(&self) -> u64 {
        0
    }
}

/// Why a source could not produce a snapshot. The agent keeps its last good state.
#[derive(Debug)]
pub enum SourceError {
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// YAML that cannot be parsed: the file and the position.
    Parse {
        path: PathBuf,
        document: usize,
        message: String,
    },
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            SourceError::Parse {
                path,
                document,
                message,
            } => {
                write!(f, "{}: document {document}: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for SourceError {}

/// What a poll sees of a manifest file without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    path: PathBuf,
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// Reads manifests from a file or a directory. Files are looked at (stat) on every poll and
/// read only when that changed: a file is applied once it holds still for one poll (unchanged
/// across two polls) or at once when it was replaced by rename (a new file under the same
/// name, as `mv`, kubectl and editors that save atomically do); a set of files that failed to
/// parse is not read again until one of them changes.
pub struct ManifestsSource {
    path: PathBuf,
    /// Wait for a change to hold still for one poll (off for one-shot reads).
    settle: bool,
    /// The stamps last read (applied, or failed to parse).
    read: Option<Vec<Stamp>>,
    /// Stamps seen changed by the previous poll, not read yet.
    pending: Option<Vec<Stamp>>,
    /// Whether `read` can stand for the contents (no file changed in the last seconds).
    trusted: bool,
    /// The contents last applied, as a SHA-256 digest per file: the agent keeps this source
    /// for its lifetime, and 10,000 Services of manifests are over 12 MB, kept resident for
    /// nothing but this comparison. Two different contents with one digest (a SHA-256
    /// collision) are not a practical concern.
    last: Option<Vec<(PathBuf, Digest)>>,
    /// Contents that failed to parse (reported once), as digests too.
    failed: Option<Vec<(PathBuf, Digest)>>,
}

impl ManifestsSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            settle: true,
            read: None,
            pending: None,
            trusted: false,
            last: None,
            failed: None,
        }
    }

    /// A source that reads what is there at once (`lb-agent render`, tests).
    pub fn immediate(path: impl Into<PathBuf>) -> Self {
        Self {
            settle: false,
            ..Self::new(path)
        }
    }

    fn stamps(&self) -> Result<Vec<Stamp>, SourceError> {
        use std::os::unix::fs::MetadataExt;
        self.files()?
            .into_iter()
            .map(|path| {
                let m = std::fs::metadata(&path).map_err(|error| SourceError::Io {
                    path: path.clone(),
                    error,
                })?;
                Ok(Stamp {
                    dev: m.dev(),
                    ino: m.ino(),
                    len: m.size(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                    ctime: (m.ctime(), m.ctime_nsec()),
                    path,
                })
            })
            .collect()
    }

    /// Whether every file that changed since the last read is a new file under a name read
    /// before (replaced by rename), and none appeared or went away.
    fn replaced_by_rename(&self, now: &[Stamp]) -> bool {
        let Some(before) = &self.read else {
            return false;
        };
        before.len() == now.len()
            && before
                .iter()
                .zip(now)
                .all(|(b, n)| b.path == n.path && (b == n || b.ino != n.ino))
    }

    fn files(&self) -> Result<Vec<PathBuf>, SourceError> {
        let io = |error| SourceError::Io {
            path: self.path.clone(),
            error,
        };
        let meta = std::fs::metadata(&self.path).map_err(io)?;
        if !meta.is_dir() {
            return Ok(vec![self.path.clone()]);
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(io)? {
            let p = entry.map_err(io)?.path();
            let manifest = matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            );
            if manifest && p.is_file() {
                files.push(p);
            }
        }
        files.sort();
        Ok(files)
    }
}

impl Source for ManifestsSource {
    fn poll(&mut self) -> Result<Option<Objects>, SourceError> {
        let stamps = self.stamps()?;
        let unchanged = self.read.as_ref() == Some(&stamps);
        if unchanged && self.trusted {
            self.pending = None;
            return Ok(None);
        }
        if !unchanged
            && self.settle
            && !self.replaced_by_rename(&stamps)
            && self.pending.as_ref() != Some(&stamps)
        {
            // Changed since the last poll: it may be half written.
            self.pending = Some(stamps);
            return Ok(None);
        }
        self.pending = None;
        // File times have a coarse clock: a write in the same tick as the last read, of the
        // same length, leaves the stamp as it was. Stamps of files modified in the last
        // seconds are therefore checked against the contents until they are older.
        let recent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(i64::MAX, |d| d.as_secs() as i64 - 2);
        self.trusted = stamps
            .iter()
            .all(|s| s.mtime.0 < recent && s.ctime.0 < recent);
        self.read = Some(stamps);
        let mut contents = Vec::new();
        for f in self.files()? {
            let bytes = std::fs::read(&f).map_err(|error| SourceError::Io {
                path: f.clone(),
                error,
            })?;
            contents.push((f, bytes));
        }
        let digests: Vec<(PathBuf, Digest)> = contents
            .iter()
            .map(|(p, bytes)| (p.clone(), digest(bytes)))
            .collect();
        if self.last.as_ref() == Some(&digests) || self.failed.as_ref() == Some(&digests) {
            return Ok(None);
        }
        let mut objects = Objects::default();
        for (path, bytes) in &contents {
            let text = String::from_utf8_lossy(bytes);
            if let Err(e) = parse_into(path, &text, &mut objects) {
                self.failed = Some(digests);
                return Err(e);
            }
        }
        self.failed = None;
        self.last = Some(digests);
        Ok(Some(objects))
    }
}

/// The SHA-256 digest of a manifest file's contents.
type Digest = [u8; 32];

fn digest(bytes: &[u8]) -> Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// Reads every manifest below `path` once.
pub fn read_manifests(path: &Path) -> Result<Objects, SourceError> {
    let mut s = ManifestsSource::immediate(path);
    Ok(s.poll()?.unwrap_or_default())
}

/// Parses multi-document YAML holding Nodes, Services, EndpointSlices (and `List`s of them).
/// Other kinds are skipped, as a cluster's proxy would never see them.
pub fn parse_into(path: &Path, text: &str, out: &mut Objects) -> Result<(), SourceError> {
    if let Some((document, line)) = too_deep(text) {
        return Err(SourceError::Parse {
            path: path.to_path_buf(),
            document,
            message: format!(
                "nested deeper than {MAX_DEPTH} levels at line {line} (no Kubernetes object is)"
            ),
        });
    }
    for (i, (first_line, doc)) in documents(text).enumerate() {
        let perr = |message: String| SourceError::Parse {
            path: path.to_path_buf(),
            document: i + 1,
            message,
        };
        let value: serde_json::Value = serde_saphyr::from_str_with_options(doc, yaml_options(doc))
            .map_err(|e| perr(yaml_error(&e, first_line)))?;
        add_value(value, out).map_err(perr)?;
    }
    Ok(())
}

/// The documents of a YAML stream with the line each starts on (from 1): split at the lines
/// that begin with a document marker (`---` or `...` alone or followed by a space), which YAML
/// forbids inside any scalar, so each piece parses alone. Pieces with nothing but blank lines,
/// comments and markers are no document.
fn documents(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let marker = |line: &str| {
        ["---", "..."].iter().any(|m| {
            line.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
        })
    };
    let mut starts = vec![(1usize, 0usize)];
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if marker(line.trim_end_matches('\n')) && offset > 0 {
            starts.push((n + 1, offset));
        }
        offset += line.len();
    }
    let ends: Vec<usize> = starts
        .iter()
        .skip(1)
        .map(|s| s.1)
        .chain([text.len()])
        .collect();
    starts
        .into_iter()
        .zip(ends)
        .map(move |((line, start), end)| (line, &text[start..end]))
        .filter(|(_, doc)| {
            doc.lines().any(|l| {
                let t = l.trim();
                let content = t.strip_prefix("---").map_or(t, str::trim);
                !(content.is_empty() || content.starts_with('#') || t == "...")
            })
        })
}

/// Parser limits for one document: generous enough for any Kubernetes object list (the
/// parser's defaults stop at 250,000 nodes), still bounded by the document's size.
fn yaml_options(doc: &str) -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = doc.len().saturating_mul(2).max(budget.max_events);
    budget.max_nodes = doc.len().max(budget.max_nodes);
    budget.max_total_scalar_bytes = doc.len().max(budget.max_total_scalar_bytes);
    budget.max_depth = 2 * MAX_DEPTH;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// The parser's message, with the position counted from the start of the file (the parser
/// counts from the start of the document it was given).
fn yaml_error(e: &serde_saphyr::Error, first_line: usize) -> String {
    let text = e.without_snippet().to_string();
    match e.location() {
        Some(l) if l.line() > 0 => {
            let rel = format!(" at line {}, column {}", l.line(), l.column());
            let abs = format!(
                " at line {}, column {}",
                l.line() as usize + first_line - 1,
                l.column()
            );
            text.replacen(&rel, &abs, 1)
        }
        _ => text,
    }
}

/// The deepest nesting of flow collections (`[`, `{`) a manifest may have: the YAML parser
/// refuses deeper documents itself (at 128 levels), but only after a scan whose time grows with
/// the square of the depth (a 250 KB document of nested `{` took 18 s); this check takes one
/// linear pass. Kubernetes objects nest less than 20 levels.
pub const MAX_DEPTH: usize = 128;

/// Where (document, line, both from 1) flow collections nest deeper than [`MAX_DEPTH`], if they
/// do. Brackets in quoted scalars and comments do not count; a bracket in a plain or block
/// scalar does, which can only make a document with more than [`MAX_DEPTH`] of them fail here
/// rather than in the parser.
fn too_deep(text: &str) -> Option<(usize, usize)> {
    let (mut depth, mut document, mut content) = (0usize, 1usize, false);
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("---") && depth == 0 {
            if content {
                document += 1;
            }
            content = false;
            continue;
        }
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (quote, c) {
                (Some('"'), '\\') => {
                    chars.next();
                }
                (Some(q), c) if c == q => {
                    if q == '\'' && chars.peek() == Some(&'\'') {
                        chars.next();
                    } else {
                        quote = None;
                    }
                }
                (Some(_), _) => {}
                (None, '#') if prev.is_whitespace() => break,
                (None, '"' | '\'') if prev.is_whitespace() || "[{,:".contains(prev) => {
                    quote = Some(c)
                }
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Some((document, n + 1));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            if !c.is_whitespace() {
                content = true;
            }
            prev = c;
        }
    }
    None
}

fn add_value(value: serde_json::Value, out: &mut Objects) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    let typed = |e: serde_json::Error| format!("{kind} ({api_version}): {e}");
    match (kind.as_str(), api_version.as_str()) {
        ("List", _) => {
            if let Some(items) = value.get("items").and_then(|i| i.as_array()) {
                for item in items.clone() {
                    add_value(item, out)?;
                }
            }
        }
        ("Node", "v1") => out
            .nodes
            .push(serde_json::from_value(value).map_err(typed)?),
        ("Service", "v1") => {
            let mut svc: Service = serde_json::from_value(value).map_err(typed)?;
            default_service(&mut svc);
            out.services.push(svc);
        }
        ("EndpointSlice", "discovery.k8s.io/v1") => {
            let mut slice: EndpointSlice = serde_json::from_value(value).map_err(typed)?;
            default_endpoint_slice(&mut slice);
            out.endpoint_slices.push(slice);
        }
        ("", _) => return Err("object without `kind`".into()),
        // A kind this agent reads, of an API version it does not (none, or a removed beta):
        // said, rather than left out without a word.
        ("Node" | "Service", v) => {
            return Err(format!(
                "{kind} with apiVersion {v:?}: a {kind} must be apiVersion: v1"
            ))
        }
        ("EndpointSlice", v) => {
            return Err(format!(
                "EndpointSlice with apiVersion {v:?}: an EndpointSlice must be apiVersion: \
                 discovery.k8s.io/v1"
            ))
        }
        _ => {}
    }
    Ok(())
}

/// What the API server defaults on a Service created with `kubectl apply`.
pub fn default_service(svc: &mut Service) {
    let meta = &mut svc.metadata;
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some("default".into());
    }
    let Some(spec) = svc.spec.as_mut() else {
        return;
    };
    let type_ = spec.type_.get_or_insert_with(|| "ClusterIP".into()).clone();
    if spec.cluster_ips.is_none() {
        if let Some(ip) = &spec.cluster_ip {
            spec.cluster_ips = Some(vec![ip.clone()]);
        }
    }
    if spec.session_affinity.is_none() {
        spec.session_affinity = Some("None".into());
    }
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let cfg = spec
            .session_affinity_config
            .get_or_insert_with(Default::default);
        let cip = cfg.client_ip.get_or_insert_with(Default::default);
        cip.timeout_seconds.get_or_insert(10800);
    }
    if type_ != "ExternalName" {
        spec.internal_traffic_policy
            .get_or_insert_with(|| "Cluster".into());
    }
    if (type_ == "NodePort" || type_ == "LoadBalancer") && spec.external_traffic_policy.is_none() {
        spec.external_traffic_policy = Some("Cluster".into());
    }
    for port in spec.ports.iter_mut().flatten() {
        port.protocol.get_or_insert_with(|| "TCP".into());
        if port.target_port.is_none() {
            port.target_port =
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port.port));
        }
    }
}

/// What the API server defaults on an EndpointSlice: port name `""`, protocol TCP.
pub fn default_endpoint_slice(slice: &mut EndpointSlice) {
    if slice
        .metadata
        .namespace
        .as_deref()
        .is_none_or(str::is_empty)
    {
        slice.metadata.namespace = Some("default".into());
    }
    for port in slice.ports.iter_mut().flatten() {
        port.name.get_or_insert_with(String::new);
        port.protocol.get_or_insert_with(|| "TCP".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deeply nested flow collections are refused in one linear pass, naming the document and
    /// line, before the parser's quadratic scan; brackets in quotes and comments do not count,
    /// and a normal manifest with some passes.
    /// A kind the agent reads with an API version it does not is an error naming the fix,
    /// never an object silently left out (a Node without `apiVersion` once was).
    #[test]
    fn a_known_kind_of_another_api_version_is_an_error() {
        for (doc, want) in [
            ("kind: Node\nmetadata: {name: n1}\n", "a Node must be apiVersion: v1"),
            (
                "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: IPv4\nendpoints: []\n",
                "must be apiVersion: discovery.k8s.io/v1",
            ),
            (
                "apiVersion: v2\nkind: Service\nmetadata: {name: s}\n",
                "Service with apiVersion \"v2\"",
            ),
        ] {
            let mut o = Objects::default();
            let e = parse_into(Path::new("x.yaml"), doc, &mut o)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        // Other kinds stay ignored, whatever their version.
        let mut o = Objects::default();
        parse_into(
            Path::new("x.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
            &mut o,
        )
        .unwrap();
    }

    #[test]
    fn deep_nesting_is_refused_at_once() {
        let mut o = Objects::default();
        let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: ns, annotations: {a: \"[[[{{\", b: '{{['}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]} # [[[[\n";
        let deep = format!("a: {}1{}\n", "{b: ".repeat(50_000), "}".repeat(50_000));
        let text = format!("{svc}---\n{deep}");
        let started = std::time::Instant::now();
        let err = parse_into(Path::new("m.yaml"), &text, &mut o).unwrap_err();
        assert_eq!(
            err.to_string(),
            "m.yaml: document 2: nested deeper than 128 levels at line 6 (no Kubernetes object is)"
        );
        eprintln!("refused in {:?}", started.elapsed());
        let quoted = format!(
            "{svc}---\n# {}\nkind: ConfigMap\nx: '{}'\n",
            "[".repeat(500),
            "{".repeat(500)
        );
        let mut o = Objects::default();
        parse_into(Path::new("m.yaml"), &quoted, &mut o).unwrap();
        assert_eq!(o.services.len(), 1);
        // Just at the limit: the parser decides (and refuses: its own limit is 128 too).
        let at = format!("{}{}\n", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(too_deep(&at).is_none());
        assert_eq!(too_deep(&format!("[{at}]")), Some((1, 1)));
    }

    #[test]
    fn defaults_like_the_api_server() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  sessionAffinity: ClientIP
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: []
---
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
"#;
        let mut o = Objects::default();
        parse_into(Path::new("x.yaml"), yaml, &mut o).unwrap();
        assert_eq!(o.services.len(), 1);
        let spec = o.services[0].spec.as_ref().unwrap();
        assert_eq!(o.services[0].metadata.namespace.as_deref(), Some("default"));
        assert_eq!(
            spec.cluster_ips.as_deref(),
            Some(&["10.96.0.10".to_string()][..])
        );
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(port.protocol.as_deref(), Some("TCP"));
        assert!(matches!(
            port.target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80))
        ));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(spec.internal_traffic_policy.as_deref(), Some("Cluster"));
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .unwrap()
            .client_ip
            .as_ref()
            .unwrap();
        assert_eq!(timeout.timeout_seconds, Some(10800));
        let sp = &o.endpoint_slices[0].ports.as_ref().unwrap()[0];
        assert_eq!(sp.name.as_deref(), Some(""));
        assert_eq!(sp.protocol.as_deref(), Some("TCP"));
    }

    #[test]
    fn empty_namespace_is_the_default_namespace() {
        // Found by the fuzz targets' invariants (fuzz/): `namespace: ""` stayed empty, so the
        // object was named `/name` in rejections, render and the Service port id.
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: \"\"}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s-1, namespace: ''}\naddressType: IPv4\nendpoints: []\n";
        let mut o = Objects::default();
        parse_into(Path::new("x.yaml"), yaml, &mut o).unwrap();
        assert_eq!(o.services[0].metadata.namespace.as_deref(), Some("default"));
        assert_eq!(
            o.endpoint_slices[0].metadata.namespace.as_deref(),
            Some("default")
        );
    }

    #[test]
    fn parse_error_names_file_and_position() {
        let mut o = Objects::default();
        let err = parse_into(Path::new("bad.yaml"), "kind: Service\n  : [\n", &mut o).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("bad.yaml: document 1:"), "{text}");
        assert!(text.contains("line"), "{text}");
    }

    /// Documents are split at marker lines (content on the marker line kept, comment-only and
    /// empty pieces skipped, `...` ends one), numbered as written, and a parse error names its
    /// document and the line in the file, not in the document.
    #[test]
    fn documents_are_numbered_and_errors_placed_in_the_file() {
        let node = |n: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\n");
        let text = format!(
            "# leading comment\n---\n{}---\n# only a comment\n--- {{apiVersion: v1, kind: Node, metadata: {{name: n2}}}}\n...\n---\n{}",
            node("n1"),
            node("n3")
        );
        let mut o = Objects::default();
        parse_into(Path::new("m.yaml"), &text, &mut o).unwrap();
        let names: Vec<_> = o
            .nodes
            .iter()
            .map(|n| n.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["n1", "n2", "n3"]);
        // The fourth document is broken on line 17 of the file (line 4 of its piece).
        let broken = format!("{text}---\napiVersion: v1\nkind: Node\nmetadata: {{name: x\n");
        let e = parse_into(Path::new("m.yaml"), &broken, &mut Objects::default())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("m.yaml: document 4: "), "{e}");
        assert!(e.contains("at line 17, column 11"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        // A type error names the kind and the document.
        let e = parse_into(
            Path::new("m.yaml"),
            &format!("{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {{ports: 80}}\n", node("a")),
            &mut Objects::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("m.yaml: document 2: Service (v1): "), "{e}");
        // A document larger than the parser's default node budget (250,000) still reads.
        let many: String = (0..130_000)
            .map(|i| format!("  - 10.0.{}.{}\n", i / 250, i % 250))
            .collect();
        let big = format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: big, labels: {{kubernetes.io/service-name: s}}}}\naddressType: IPv4\nendpoints:\n- addresses:\n{many}");
        let mut o = Objects::default();
        parse_into(Path::new("big.yaml"), &big, &mut o).unwrap();
        assert_eq!(
            o.endpoint_slices[0].endpoints.as_ref().unwrap()[0]
                .addresses
                .len(),
            130_000
        );
    }

    #[test]
    fn directory_source_rereads_only_on_change() {
        let dir = std::env::temp_dir().join(format!("lb-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.yaml");
        std::fs::write(&f, "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n").unwrap();
        let mut s = ManifestsSource::immediate(&dir);
        assert_eq!(s.poll().unwrap().unwrap().nodes.len(), 1);
        assert!(s.poll().unwrap().is_none());
        std::fs::write(
            dir.join("b.yml"),
            "apiVersion: v1\nkind: Node\nmetadata: {name: n2}\n",
        )
        .unwrap();
        assert_eq!(s.poll().unwrap().unwrap().nodes.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn node(name: &str) -> String {
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n")
    }

    /// A file written in place is applied once it held still for a poll; one renamed into
    /// place at once; one that fails to parse is reported once and not read again until it
    /// changes, while the last good state stays.
    #[test]
    fn manifests_apply_once_written() {
        let dir = std::env::temp_dir().join(format!("lb-settle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.yaml");
        std::fs::write(&f, node("n1")).unwrap();
        let mut s = ManifestsSource::new(&dir);
        // First sight: wait one poll.
        assert!(s.poll().unwrap().is_none());
        assert_eq!(s.poll().unwrap().unwrap().nodes.len(), 1);
        assert!(s.poll().unwrap().is_none());
        // Written in place (half a document would parse too): not yet, then applied.
        std::fs::write(&f, format!("{}---\n{}", node("n1"), node("n2"))).unwrap();
        assert!(s.poll().unwrap().is_none());
        assert_eq!(s.poll().unwrap().unwrap().nodes.len(), 2);
        // Replaced by rename: at once.
        let tmp = dir.join("a.tmp");
        std::fs::write(&tmp, node("n3")).unwrap();
        std::fs::rename(&tmp, &f).unwrap();
        let o = s.poll().unwrap().unwrap();
        assert_eq!(o.nodes[0].metadata.name.as_deref(), Some("n3"));
        // Unparsable: one error, then quiet until it changes.
        std::fs::write(&f, "kind: Node\n  : [\n").unwrap();
        assert!(s.poll().unwrap().is_none());
        assert!(s.poll().is_err());
        for _ in 0..3 {
            assert!(s.poll().unwrap().is_none());
        }
        std::fs::write(&f, node("n4")).unwrap();
        assert!(s.poll().unwrap().is_none());
        let o = s.poll().unwrap().unwrap();
        assert_eq!(o.nodes[0].metadata.name.as_deref(), Some("n4"));
        // A write of the same length right after a read may leave the file's stamp as it was
        // (coarse file times): a recent file is checked against its contents.
        std::fs::write(&f, node("n5")).unwrap();
        let o = (0..3)
            .find_map(|_| s.poll().unwrap())
            .expect("the change is seen within two polls");
        assert_eq!(o.nodes[0].metadata.name.as_deref(), Some("n5"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
