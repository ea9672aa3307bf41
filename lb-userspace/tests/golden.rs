//! Golden tests: manifests in, `lb-agent render` JSON out, compared whole.
//! `dualstack.yaml`: dual-stack Services, planned per IP family (kube-proxy's proxier per
//! family); the IPv6 family's entries are rendered, not programmed.
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

#[test]
fn dualstack_node_a() {
    assert_eq!(
        render("dualstack.yaml", "node-a"),
        golden("dualstack.node-a.json")
    );
}

#[test]
fn dualstack_node_b() {
    assert_eq!(
        render("dualstack.yaml", "node-b"),
        golden("dualstack.node-b.json")
    );
}

/// The render contract: every Service port and every frontend names its family, and every
/// endpoint of an entry is of that family; the IPv4-only seed holds only IPv4 entries.
#[test]
fn every_frontend_and_endpoint_has_its_family() {
    for (file, node) in [
        ("seed.yaml", "node-a"),
        ("seed.yaml", "node-b"),
        ("dualstack.yaml", "node-a"),
        ("dualstack.yaml", "node-b"),
    ] {
        let v = render(file, node);
        let mut families = std::collections::BTreeSet::new();
        for s in v["services"].as_array().unwrap() {
            let family = s["family"].as_str().unwrap();
            families.insert(family.to_string());
            for f in s["frontends"].as_array().unwrap() {
                assert_eq!(f["family"], family, "{file} {node}: {f}");
                let v6 = f["address"].as_str().unwrap().starts_with('[');
                assert_eq!(v6, family == "IPv6", "{file} {node}: {f}");
            }
            for set in ["cluster_endpoints", "local_endpoints"] {
                for e in s[set].as_array().into_iter().flatten() {
                    let v6 = e.as_str().unwrap().starts_with('[');
                    assert_eq!(v6, family == "IPv6", "{file} {node}: {set} {e}");
                }
            }
        }
        let want: &[&str] = if file == "seed.yaml" {
            &["IPv4"]
        } else {
            &["IPv4", "IPv6"]
        };
        assert_eq!(families.into_iter().collect::<Vec<_>>(), want, "{file}");
    }
}
