//! Prometheus pieces shared by the monitoring tests: the series selectors of a PromQL expression
//! (tests/alert_coverage.rs, tests/monitoring.rs), the text exposition of a scrape, `promtool`,
//! and the check of the Grafana dashboard's queries (deploy/monitoring/dashboard.json) against a
//! real scrape of an agent (tests/lab_dashboard.rs).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Labels Prometheus gives every series of a target (podmonitor.yaml): not in the agent's scrape.
pub const TARGET_LABELS: [&str; 3] = ["job", "node", "instance"];

/// `metric{label="v", label=~"a|b"}`: the metric and, per label, the values it is matched
/// against (regex alternatives split).
#[derive(Debug, PartialEq, Eq)]
pub struct Selector {
    pub metric: String,
    pub labels: BTreeMap<String, Vec<String>>,
}

/// PromQL words that are not metrics: aggregations (they may take `by (...)` before their
/// parentheses), binary and modifier keywords.
pub const KEYWORDS: [&str; 24] = [
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "atan2",
];
/// Keywords whose parentheses hold label names.
pub const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The series selectors of a PromQL expression: every identifier that is not a function (followed
/// by `(`), a keyword, a label list's label or a number, with its `{...}` matchers. String
/// literals and `[range]`s are skipped.
pub fn selectors(expr: &str) -> Vec<Selector> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let next_non_space = |mut j: usize| {
        while j < c.len() && c[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i += 1;
            while i < c.len() && c[i] != ch {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch == '[' {
            while i < c.len() && c[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let j = next_non_space(i);
            if LABEL_LISTS.contains(&word.as_str()) && c.get(j) == Some(&'(') {
                // Skip the label list.
                i = j;
                while i < c.len() && c[i] != ')' {
                    i += 1;
                }
                i += 1;
            } else if KEYWORDS.contains(&word.as_str()) || c.get(j) == Some(&'(') {
                // A keyword or a function: its arguments are scanned as they come.
            } else {
                let mut labels = BTreeMap::new();
                if c.get(j) == Some(&'{') {
                    let end = (j..c.len()).find(|&k| c[k] == '}').expect("closing brace");
                    let body: String = c[j + 1..end].iter().collect();
                    labels = matchers(&body);
                    i = end + 1;
                }
                out.push(Selector {
                    metric: word,
                    labels,
                });
            }
        } else {
            i += 1;
        }
    }
    out
}

/// `a="x", b=~"y|z"` -> {a: [x], b: [y, z]}. Negative matchers (`!=`, `!~`) select no value.
pub fn matchers(body: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let mut rest = body;
    while let Some(q) = rest.find('"') {
        let head = rest[..q].trim().trim_start_matches(',').trim();
        let close = rest[q + 1..].find('"').expect("closing quote") + q + 1;
        let value = &rest[q + 1..close];
        rest = &rest[close + 1..];
        let (label, op) = if let Some(l) = head.strip_suffix("=~") {
            (l, "=~")
        } else if let Some(l) = head.strip_suffix("!~") {
            (l, "!~")
        } else if let Some(l) = head.strip_suffix("!=") {
            (l, "!=")
        } else if let Some(l) = head.strip_suffix('=') {
            (l, "=")
        } else {
            panic!("matcher {head:?} in {{{body}}}")
        };
        let values: Vec<String> = match op {
            "=" => vec![value.to_string()],
            "=~" => value.split('|').map(str::to_string).collect(),
            _ => continue,
        };
        out.entry(label.trim().to_string())
            .or_insert_with(Vec::new)
            .extend(values);
    }
    out
}

/// Parses the text exposition into series (`name` + sorted labels) -> value.
pub fn samples(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = l
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line {l:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, matchers(rest.strip_suffix('}').expect("}"))),
            None => (series, BTreeMap::new()),
        };
        let labels = labels
            .into_iter()
            .map(|(k, mut v)| (k, v.pop().unwrap_or_default()))
            .collect();
        out.insert(
            (name.to_string(), labels),
            value.parse().unwrap_or_else(|_| panic!("value in {l:?}")),
        );
    }
    out
}

/// The labels of the `by`, `without`, `on`, `ignoring`, `group_left` and `group_right` lists of
/// an expression (string literals and `[range]`s skipped).
pub fn grouping_labels(expr: &str) -> Vec<String> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i += 1;
            while i < c.len() && c[i] != ch {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if ch == '[' || ch == '{' {
            let close = if ch == '[' { ']' } else { '}' };
            while i < c.len() && c[i] != close {
                i += 1;
            }
            i += 1;
        } else if ch.is_ascii_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let mut j = i;
            while j < c.len() && c[j].is_whitespace() {
                j += 1;
            }
            if LABEL_LISTS.contains(&word.as_str()) && c.get(j) == Some(&'(') {
                let end = (j..c.len())
                    .find(|&k| c[k] == ')')
                    .expect("closing parenthesis");
                let list: String = c[j + 1..end].iter().collect();
                out.extend(
                    list.split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_string),
                );
                i = end + 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

// ---- promtool ----

/// `promtool` on PATH. Missing: with `CI=true` the test fails (CI must have it: `cargo xtask
/// setup` installs Debian's prometheus package); elsewhere it says why it skips.
pub fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("promtool is not on PATH: CI must have it (`cargo xtask setup` installs Debian's prometheus package)");
        }
        eprintln!("skipping: promtool is not on PATH (`cargo xtask setup` installs it)");
    }
    found
}

/// Runs `promtool` with `args` in `dir`; its output, or an error with the output.
pub fn run_promtool(promtool: &Path, dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", promtool.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "promtool {}: {}\n{text}",
            args.join(" "),
            out.status
        ))
    }
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether every expression parses, by `promtool check rules` on a rule file with one recording
/// rule per expression (JSON, which is YAML). `Err` names promtool's complaints.
pub fn promtool_parses(promtool: &Path, exprs: &[(String, String)]) -> Result<(), String> {
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": e}))
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = TempDir::new("dashboard-rules");
    std::fs::write(dir.0.join("dashboard.rules.yaml"), file.to_string()).unwrap();
    run_promtool(
        promtool,
        &dir.0,
        &["check", "rules", "dashboard.rules.yaml"],
    )
    .map(|_| ())
    .map_err(|e| {
        let names: Vec<String> = exprs
            .iter()
            .enumerate()
            .map(|(i, (what, e))| format!("dashboard:query_{i} = {what}: {e}"))
            .collect();
        format!("{e}\n{}", names.join("\n"))
    })
}

// ---- the Grafana dashboard ----

pub const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/monitoring/dashboard.json"
);

/// One query of the dashboard: where it is (`panel title / refId`, or `variable name`) and its
/// PromQL.
#[derive(Clone, Debug)]
pub struct Query {
    pub place: String,
    pub expr: String,
}

/// The panels' queries (rows' panels too) and the query variables' queries.
pub fn dashboard_queries(dashboard: &Value) -> Vec<Query> {
    fn panels(list: &Value, out: &mut Vec<Query>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title}: a target without expr"));
                out.push(Query {
                    place: format!("{title} / {}", t["refId"].as_str().unwrap_or("?")),
                    expr: expr.to_string(),
                });
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] == "query" {
            let q = &v["query"];
            let expr = q["query"].as_str().or(q.as_str()).expect("variable query");
            out.push(Query {
                place: format!("variable {}", v["name"].as_str().unwrap_or("?")),
                expr: expr.to_string(),
            });
        }
    }
    out
}

/// The dashboard's variable names.
pub fn dashboard_variables(dashboard: &Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v["name"].as_str().expect("variable name").to_string())
        .collect()
}

/// A query as Prometheus gets it: Grafana's interval variables as durations, the dashboard's own
/// variables as a regex matching anything (they sit in `=~` matchers), and a variable query's
/// `label_values(selector, label)` as its selector. `Err` for any other `$`.
pub fn substitute(expr: &str, variables: &[String]) -> Result<String, String> {
    let mut out = expr.trim().to_string();
    if let Some(inner) = out
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let (selector, _label) = inner
            .rsplit_once(',')
            .ok_or("label_values without a label")?;
        out = selector.trim().to_string();
    }
    // Each `$name` or `${name}`, whole.
    let mut done = String::new();
    let mut rest = out.as_str();
    while let Some(at) = rest.find('$') {
        done.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(b) => {
                let end = b.find('}').ok_or("unclosed ${")?;
                (&b[..end], end + 2)
            }
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        let value = match name {
            "__rate_interval" => "5m",
            "__interval" => "1m",
            "__range" => "1h",
            n if variables.iter().any(|v| v == n) => ".+",
            n => return Err(format!("unknown variable ${n}")),
        };
        done.push_str(value);
        rest = &after[len..];
    }
    done.push_str(rest);
    Ok(done)
}

/// Why a (substituted) query finds nothing in a scrape: every selector must name a series of the
/// scrape; each label value it matches (`=`, or each `=~` alternative) must be a value of that
/// label on some series of that metric (a real regex: the label must exist there); and every
/// label of a `by`/`on`/... list must be a label of some selected series. Target labels
/// ([`TARGET_LABELS`]) are Prometheus' own and not checked. Empty: the query is fine.
pub fn query_problems(
    expr: &str,
    scrape: &BTreeMap<(String, BTreeMap<String, String>), f64>,
) -> Vec<String> {
    let mut out = Vec::new();
    let sels = selectors(expr);
    if sels.is_empty() {
        out.push("no series selector".to_string());
    }
    let mut labels_seen: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
    for s in &sels {
        let series: Vec<&BTreeMap<String, String>> = scrape
            .keys()
            .filter(|(name, _)| *name == s.metric)
            .map(|(_, l)| l)
            .collect();
        if series.is_empty() {
            out.push(format!("no series {} in the scrape", s.metric));
            continue;
        }
        labels_seen.extend(series.iter().flat_map(|l| l.keys().map(String::as_str)));
        for (label, values) in &s.labels {
            if TARGET_LABELS.contains(&label.as_str()) {
                continue;
            }
            for v in values {
                let regex = v.chars().any(|c| ".*+?()[]{}^$\\".contains(c));
                let found = series.iter().any(|l| match l.get(label) {
                    Some(have) => regex || have == v,
                    None => false,
                });
                if !found {
                    let have: BTreeSet<&str> = series
                        .iter()
                        .filter_map(|l| l.get(label).map(String::as_str))
                        .collect();
                    out.push(if have.is_empty() {
                        format!("{}: no series has a label {label}", s.metric)
                    } else {
                        format!(
                            "{}: no series has {label}={v:?} (values: {have:?})",
                            s.metric
                        )
                    });
                }
            }
        }
    }
    for l in grouping_labels(expr) {
        if !labels_seen.contains(l.as_str()) {
            out.push(format!(
                "grouping label {l}: on none of the selected series"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_selectors_are_found() {
        let sel = |metric: &str, labels: &[(&str, &[&str])]| Selector {
            metric: metric.into(),
            labels: labels
                .iter()
                .map(|(l, v)| (l.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
        };
        assert_eq!(
            selectors(r#"rate(lb_x_total{counter="a"}[5m]) > 0.9 and up{job="j", x!="y"} == 0"#),
            vec![
                sel("lb_x_total", &[("counter", &["a"])]),
                sel("up", &[("job", &["j"])])
            ]
        );
        assert_eq!(
            selectors(
                "histogram_quantile(0.99,\n  sum by (job, node, le) (rate(lb_h_bucket[15m]))\n) > 1 unless on (a) (max by (b) (g) == 0)"
            ),
            vec![sel("lb_h_bucket", &[]), sel("g", &[])]
        );
        assert_eq!(
            selectors(r#"lb_e{map=~"services|backends"} / lb_c{map=~"services|backends"} > 0.85"#),
            vec![
                sel("lb_e", &[("map", &["services", "backends"])]),
                sel("lb_c", &[("map", &["services", "backends"])])
            ]
        );
        assert_eq!(selectors("(time() - lb_t > 600)"), vec![sel("lb_t", &[])]);
    }

    #[test]
    fn grouping_labels_are_found() {
        assert_eq!(
            grouping_labels(
                r#"sum by (namespace, name) (rate(x{a="by (no)"}[5m])) and on(node) y"#
            ),
            ["namespace", "name", "node"]
        );
    }

    /// The dashboard check fails on a misspelled metric, label, label value or grouping label
    /// and on an unknown variable, and passes the same queries spelled right.
    #[test]
    fn query_check_fails_on_misspellings() {
        let scrape = samples(
            "# TYPE lb_service_drops_total counter\n\
             lb_service_drops_total{namespace=\"default\",name=\"web\",port=\"\",protocol=\"TCP\",reason=\"no_backend\"} 3\n\
             lb_service_drops_total{namespace=\"default\",name=\"web\",port=\"\",protocol=\"TCP\",reason=\"other\"} 0\n\
             lb_map_entries{map=\"conntrack\"} 2\n\
             # EOF\n",
        );
        let vars = ["node".to_string()];
        let check = |q: &str| query_problems(&substitute(q, &vars).unwrap(), &scrape);
        for good in [
            r#"sum by (namespace, name, reason) (rate(lb_service_drops_total{job="lb-agent", node=~"$node", reason=~"no_backend|other"}[$__rate_interval]))"#,
            r#"max by (node, map) (lb_map_entries{map="conntrack", node=~"${node}"})"#,
            r#"lb_map_entries{map=~"conn.*"}"#,
        ] {
            assert_eq!(check(good), Vec::<String>::new(), "{good}");
        }
        for (bad, why) in [
            (
                r#"rate(lb_service_drop_total[5m])"#,
                "no series lb_service_drop_total in the scrape",
            ),
            (
                r#"lb_map_entries{mpa="conntrack"}"#,
                "lb_map_entries: no series has a label mpa",
            ),
            (
                r#"lb_map_entries{map="contrack"}"#,
                r#"lb_map_entries: no series has map="contrack" (values: {"conntrack"})"#,
            ),
            (
                r#"lb_service_drops_total{reason=~"no_backend|others"}"#,
                r#"lb_service_drops_total: no series has reason="others" (values: {"no_backend", "other"})"#,
            ),
            (
                r#"sum by (namespce) (lb_service_drops_total)"#,
                "grouping label namespce: on none of the selected series",
            ),
            (r#"sum(rate(lb_service_drops_total[$__rate_interval]))"#, ""),
        ] {
            let got = check(bad);
            if why.is_empty() {
                assert!(got.is_empty(), "{bad}: {got:?}");
            } else {
                assert_eq!(got, [why], "{bad}");
            }
        }
        assert!(substitute(
            r#"lb_map_entries{node=~"$nodes_typo"}"#,
            &["nod".to_string()]
        )
        .is_err());
        assert_eq!(
            substitute("label_values(lb_build_info, node)", &vars).unwrap(),
            "lb_build_info"
        );
    }
}
