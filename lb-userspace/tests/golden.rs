//! Golden tests: manifests in, `lb-agent render` JSON out, compared whole.
//! The expected files were reviewed line by line against kube-proxy's rules (see seed.yaml's
//! comments); regenerate one only after reviewing the difference.
use std::process::Command;

fn render(manifests: &str, node: &str) -> serde_json::Value {
    let dir = format!("{}/tests/golden", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_lb-agent"))
        .args([
            "render",
            "--manifests",
            &format!("{dir}/{manifests}"),
            "--node",
            node,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn golden(name: &str) -> serde_json::Value {
    let p = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn seed_examples_node_a() {
    assert_eq!(render("seed.yaml", "node-a"), golden("seed.node-a.json"));
}

#[test]
fn seed_examples_node_b() {
    assert_eq!(render("seed.yaml", "node-b"), golden("seed.node-b.json"));
}
