//! The folders of lb-userspace follow the data flow and imports only run down it:
//! `agent/` → `dataplane/` → `control/` → lb-common (`error.rs` is shared; `inspect.rs`, lbctl's
//! views, sits beside `agent/` and reads through `dataplane/`). This test reads the sources and
//! fails on an import that runs back up, and on aya in `control/` (pure code, no maps).
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// The crate's top-level modules, from the bottom of the flow up.
const LAYERS: &[(&str, &[&str])] = &[
    // (module, the crate modules it may use)
    ("error", &[]),
    ("control", &["control", "error"]),
    ("dataplane", &["dataplane", "control", "error"]),
    ("inspect", &["inspect", "dataplane", "control", "error"]),
    (
        "agent",
        &["agent", "dataplane", "control", "error", "EBPF_OBJECT"],
    ),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`control/plan.rs` → `control`, `error.rs` → `error`).
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    Some(first.trim_end_matches(".rs").to_string())
}

/// Every crate module a source names: `crate::x` paths and the names inside `use crate::{...}`.
fn crate_modules_used(source: &str) -> BTreeSet<String> {
    let code: String = source
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut used = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c, d::{e, f}}`: the names at depth 0 of the group.
            let mut depth = 0;
            let mut name = String::new();
            let mut at_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => at_start = true,
                    c if depth == 0 && at_start && (c.is_alphanumeric() || c == '_') => {
                        name.push(c)
                    }
                    _ if depth == 0 && at_start && !name.is_empty() => {
                        used.insert(std::mem::take(&mut name));
                        at_start = false;
                    }
                    _ => {}
                }
            }
            if !name.is_empty() {
                used.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            used.insert(name);
        }
    }
    used
}

#[test]
fn imports_only_run_down_the_data_flow() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        let Some((_, allowed)) = LAYERS.iter().find(|(m, _)| *m == module) else {
            continue; // lib.rs and bin/: the top
        };
        checked += 1;
        let source = fs::read_to_string(file).unwrap();
        for used in crate_modules_used(&source) {
            if !allowed.contains(&used.as_str()) {
                wrong.push(format!("{}: {module} uses crate::{used}", file.display()));
            }
        }
        if module == "control" && (source.contains("use aya") || source.contains("aya::")) {
            wrong.push(format!("{}: control/ uses aya", file.display()));
        }
    }
    assert!(
        checked > 20,
        "only {checked} source files found under {}",
        src().display()
    );
    assert!(
        wrong.is_empty(),
        "imports that run back up:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scanner_sees_grouped_and_inline_paths() {
    let src = "use crate::{agent::config::RunConfig, control::{plan, model}, error};\n\
               fn f() { crate::dataplane::read::stats(); } // crate::inspect in a comment\n";
    let used = crate_modules_used(src);
    let want: BTreeSet<String> = ["agent", "control", "error", "dataplane"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(used, want);
}
