//! The alerts under promtool: `promtool check rules` on deploy/monitoring/prometheusrule.yaml's
//! groups, and `promtool test rules` on deploy/monitoring/tests/*.yaml, where every alert has a
//! case in which it fires and one in which it does not (checked here, so a new alert without
//! tests fails). promtool comes from Debian's prometheus package (`cargo xtask setup`); without
//! it these tests fail under `CI=true` and say that they skip elsewhere.
//!
//! The unit tests compare the alerts' labels; their annotations' templates are checked by
//! `promtool check rules` (which parses them), so the rule file the unit tests run on leaves the
//! annotations out (promtool would otherwise require each expected alert to spell them whole).
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use lb_tests::monitoring::{promtool, run_promtool, TempDir};
use serde_json::Value;

const MONITORING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/monitoring");
/// The name the unit test files give their rule file.
const RULE_FILE: &str = "lb-agent.rules.yaml";

/// prometheusrule.yaml's `spec.groups` as a plain rule file (JSON, which is YAML), with or
/// without the annotations.
fn rule_file(annotations: bool) -> Value {
    let path = format!("{MONITORING}/prometheusrule.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let rule: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut groups = rule["spec"]["groups"].clone();
    assert!(
        groups.as_array().is_some_and(|g| !g.is_empty()),
        "{path}: spec.groups"
    );
    if !annotations {
        for g in groups.as_array_mut().unwrap() {
            for r in g["rules"].as_array_mut().expect("rules") {
                r.as_object_mut().expect("rule").remove("annotations");
            }
        }
    }
    serde_json::json!({ "groups": groups })
}

/// The unit test files, parsed.
fn test_files() -> Vec<(PathBuf, Value)> {
    let dir = format!("{MONITORING}/tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no promtool unit tests in {dir}");
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let v: Value =
                serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, v)
        })
        .collect()
}

/// A directory with the rule file (`rules`) and a copy of every unit test file; their names.
fn unit_test_dir(rules: &Value) -> (TempDir, Vec<String>) {
    let dir = TempDir::new("promtool-tests");
    std::fs::write(dir.0.join(RULE_FILE), rules.to_string()).unwrap();
    let mut names = Vec::new();
    for (p, _) in test_files() {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::copy(&p, dir.0.join(&name)).unwrap();
        names.push(name);
    }
    (dir, names)
}

fn promtool_test_rules(promtool: &Path, rules: &Value) -> Result<String, String> {
    let (dir, names) = unit_test_dir(rules);
    let mut args = vec!["test", "rules"];
    args.extend(names.iter().map(String::as_str));
    run_promtool(promtool, &dir.0, &args)
}

#[test]
fn promtool_check_rules_accepts_the_alerts() {
    let Some(promtool) = promtool() else { return };
    let dir = TempDir::new("promtool-check");
    std::fs::write(dir.0.join(RULE_FILE), rule_file(true).to_string()).unwrap();
    let out = run_promtool(&promtool, &dir.0, &["check", "rules", RULE_FILE])
        .unwrap_or_else(|e| panic!("{e}"));
    println!("{out}");
    let alerts = alert_names().len();
    assert!(
        out.contains(&format!("SUCCESS: {alerts} rules found")),
        "{out}"
    );
}

#[test]
fn promtool_unit_tests_pass() {
    let Some(promtool) = promtool() else { return };
    let out = promtool_test_rules(&promtool, &rule_file(false)).unwrap_or_else(|e| panic!("{e}"));
    println!("{out}");
    assert_eq!(out.matches("SUCCESS").count(), test_files().len(), "{out}");
}

/// The unit tests fail when an alert changes under them: the same files against rules where
/// LbSyncErrors needs 1,000 errors and LbServiceTopologyHintsUnusable never fires.
#[test]
fn promtool_unit_tests_fail_on_a_changed_alert() {
    let Some(promtool) = promtool() else { return };
    let mut rules = rule_file(false);
    let mut changed = 0;
    for g in rules["groups"].as_array_mut().unwrap() {
        for r in g["rules"].as_array_mut().unwrap() {
            let expr = match r["alert"].as_str().unwrap() {
                "LbSyncErrors" => "increase(lb_sync_errors_total[15m]) > 1000",
                "LbServiceTopologyHintsUnusable" => "lb_service_topology_hints_unusable == 2",
                _ => continue,
            };
            r["expr"] = expr.into();
            changed += 1;
        }
    }
    assert_eq!(changed, 2);
    let err = promtool_test_rules(&promtool, &rules).expect_err("promtool test rules passed");
    for alert in ["LbSyncErrors", "LbServiceTopologyHintsUnusable"] {
        assert!(
            err.contains(&format!("alertname: {alert}")),
            "{alert}: {err}"
        );
    }
}

fn alert_names() -> Vec<String> {
    let mut out = Vec::new();
    for g in rule_file(false)["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            out.push(
                r["alert"]
                    .as_str()
                    .expect("every rule is an alert")
                    .to_string(),
            );
        }
    }
    out
}

/// What the unit test files lack: for each alert, a case where it fires (non-empty
/// `exp_alerts`) and one where it does not (empty or absent); and what they have too much: a
/// test of an alert that does not exist, a rule file other than [`RULE_FILE`].
fn coverage_problems(alerts: &[String], files: &[(PathBuf, Value)]) -> Vec<String> {
    let mut fires: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut quiet: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for (path, f) in files {
        let file = path.file_name().unwrap().to_string_lossy();
        if f["rule_files"] != serde_json::json!([RULE_FILE]) {
            out.push(format!("{file}: rule_files must be [{RULE_FILE}]"));
        }
        for t in f["tests"].as_array().into_iter().flatten() {
            let test = t["name"].as_str().unwrap_or("?");
            for c in t["alert_rule_test"].as_array().into_iter().flatten() {
                let alert = c["alertname"].as_str().expect("alertname");
                let Some(a) = alerts.iter().find(|a| *a == alert) else {
                    out.push(format!("{file}: {test}: no alert {alert} in the rules"));
                    continue;
                };
                let empty = c["exp_alerts"].as_array().is_none_or(|v| v.is_empty());
                let at = format!(
                    "{file}: {test} at {}",
                    c["eval_time"].as_str().unwrap_or("?")
                );
                if empty { &mut quiet } else { &mut fires }
                    .entry(a.as_str())
                    .or_default()
                    .push(at);
            }
        }
    }
    for a in alerts {
        if !fires.contains_key(a.as_str()) {
            out.push(format!("{a}: no unit test where it fires"));
        }
        if !quiet.contains_key(a.as_str()) {
            out.push(format!("{a}: no unit test where it does not fire"));
        }
    }
    out
}

#[test]
fn every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() {
    let alerts = alert_names();
    let unique: BTreeSet<&String> = alerts.iter().collect();
    assert_eq!(
        unique.len(),
        alerts.len(),
        "an alert name twice: {alerts:?}"
    );
    let problems = coverage_problems(&alerts, &test_files());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The check above fails for an alert without tests, one tested only firing or only quiet, and
/// a test of an alert that does not exist.
#[test]
fn an_alert_without_both_cases_fails_the_check() {
    let file: Value = serde_saphyr::from_str(
        r#"
rule_files: [lb-agent.rules.yaml]
tests:
  - name: t
    alert_rule_test:
      - {alertname: Both, eval_time: 1m, exp_alerts: []}
      - {alertname: Both, eval_time: 9m, exp_alerts: [{exp_labels: {severity: info}}]}
      - {alertname: OnlyFires, eval_time: 9m, exp_alerts: [{exp_labels: {severity: info}}]}
      - {alertname: OnlyQuiet, eval_time: 9m}
      - {alertname: Gone, eval_time: 9m, exp_alerts: []}
"#,
    )
    .unwrap();
    let alerts: Vec<String> = ["Both", "OnlyFires", "OnlyQuiet", "Untested"]
        .map(String::from)
        .into();
    assert_eq!(
        coverage_problems(&alerts, &[(PathBuf::from("x.yaml"), file)]),
        [
            "x.yaml: t: no alert Gone in the rules",
            "OnlyFires: no unit test where it does not fire",
            "OnlyQuiet: no unit test where it fires",
            "Untested: no unit test where it fires",
            "Untested: no unit test where it does not fire",
        ]
    );
}
