//! kustomize, the subset the manifests use: a kustomization's resources, namespace, JSON 6902
//! patches and image overrides, applied as `kustomize build` does.
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::{json, Value};

use super::{deploy_dir, parse_documents, typed, Doc};

/// A kustomization file, its directory, and the documents its resources hold.
pub struct Kustomization {
    pub doc: Doc,
    pub dir: PathBuf,
}

pub fn kustomizations(docs: &[Doc]) -> Vec<Kustomization> {
    docs.iter()
        .filter(|d| d.kind() == ("kustomize.config.k8s.io/v1beta1", "Kustomization"))
        .map(|d| Kustomization {
            doc: d.clone(),
            dir: deploy_dir().join(d.file.parent().unwrap()),
        })
        .collect()
}

impl Kustomization {
    pub fn strings(&self, pointer: &str) -> Vec<String> {
        self.doc
            .value
            .pointer(pointer)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .unwrap_or_else(|| {
                                panic!("{}: {pointer}: not a string", self.doc.name())
                            })
                            .to_string()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn namespace(&self) -> Option<&str> {
        self.doc.value.get("namespace").and_then(Value::as_str)
    }

    /// The documents of this kustomization's file resources (directories are kustomizations of
    /// their own and are checked on their own).
    pub fn resources(&self) -> Vec<Doc> {
        let mut out = Vec::new();
        for r in self.strings("/resources") {
            let p = self.dir.join(&r);
            if p.is_file() {
                out.extend(parse_documents(&p, &std::fs::read_to_string(&p).unwrap()));
            }
        }
        out
    }

    /// What `kustomize build` gives for the DaemonSet: namespace, JSON 6902 patches, images.
    fn build_daemonset(&self) -> Option<Value> {
        let mut ds = self
            .resources()
            .into_iter()
            .find(|d| d.kind() == ("apps/v1", "DaemonSet"))?
            .value;
        if let Some(ns) = self.namespace() {
            ds["metadata"]["namespace"] = json!(ns);
        }
        for patch in self
            .doc
            .value
            .get("patches")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let target = &patch["target"];
            if target["kind"] != "DaemonSet" || target["name"] != ds["metadata"]["name"] {
                continue;
            }
            let path = self.dir.join(patch["path"].as_str().expect("patch path"));
            let ops: Value =
                serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            apply_json_patch(&mut ds, &ops).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
        for image in self
            .doc
            .value
            .get("images")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = image["name"].as_str().expect("images[].name");
            // kustomize's image transformer rewrites containers and initContainers alike.
            let spec = &mut ds["spec"]["template"]["spec"];
            let mut all: Vec<&mut Value> = Vec::new();
            for (key, list) in spec.as_object_mut().unwrap().iter_mut() {
                if key == "containers" || key == "initContainers" {
                    all.extend(list.as_array_mut().unwrap().iter_mut());
                }
            }
            for c in all {
                let current = c["image"].as_str().unwrap().to_string();
                let (repo, tag) = split_image(&current);
                if repo == name {
                    let repo = image.get("newName").and_then(Value::as_str).unwrap_or(repo);
                    let tag = image.get("newTag").and_then(Value::as_str).unwrap_or(tag);
                    c["image"] = json!(format!("{repo}:{tag}"));
                }
            }
        }
        Some(ds)
    }
}

/// `registry:5000/a/b:tag` -> (`registry:5000/a/b`, `tag`).
pub fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

/// An RFC 6902 JSON patch (the `json-patch` crate, which kube uses too); all or nothing.
pub fn apply_json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let patch: json_patch::Patch =
        serde_json::from_value(ops.clone()).map_err(|e| format!("not a JSON 6902 patch: {e}"))?;
    json_patch::patch(doc, &patch).map_err(|e| e.to_string())
}

/// The deployed DaemonSet: deploy/kustomization.yaml applied to daemonset.yaml.
pub fn built_daemonset(docs: &[Doc]) -> DaemonSet {
    let ks = kustomizations(docs);
    let root = ks
        .iter()
        .find(|k| k.dir == deploy_dir())
        .expect("deploy/kustomization.yaml");
    let value = root
        .build_daemonset()
        .expect("deploy/kustomization.yaml has no DaemonSet resource");
    typed("DaemonSet after deploy/kustomization.yaml", &value).unwrap_or_else(|e| panic!("{e}"))
}
