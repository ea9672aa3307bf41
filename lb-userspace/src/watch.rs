//! The Kubernetes API source: kube-rs watchers on Services, `discovery.k8s.io/v1` EndpointSlices
//! and this node's Node, behind the same [`Source`] trait as the manifests. Watch errors re-list
//! with kube's default backoff; while the API is unreachable `poll` reports no change, so the
//! agent keeps serving the last good state.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;

use crate::source::{default_endpoint_slice, default_service, Objects, Source, SourceError};

/// Where the API server is.
#[derive(Clone, Debug)]
pub enum KubeConfigChoice {
    /// The in-cluster service account (the DaemonSet's default).
    InCluster,
    /// A kubeconfig file (`--kubeconfig`).
    Kubeconfig(PathBuf),
    /// A plain URL without credentials (tests against a local fake API server).
    Url(String),
}

type Store<K> = BTreeMap<(String, String), K>;

#[derive(Default)]
struct Shared {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    /// Which watchers completed their first list.
    synced: [bool; 3],
    changed: bool,
}

/// Snapshots of the objects the watchers keep.
pub struct KubeSource {
    shared: Arc<Mutex<Shared>>,
    restarts: Arc<AtomicU64>,
    _runtime: std::thread::JoinHandle<()>,
}

fn key<K: Resource>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// One watcher feeding one store of `Shared`.
async fn run_watcher<K>(
    api: Api<K>,
    cfg: watcher::Config,
    shared: Arc<Mutex<Shared>>,
    restarts: Arc<AtomicU64>,
    idx: usize,
    store: fn(&mut Shared) -> &mut Store<K>,
) where
    K: Resource<DynamicType = ()> + Clone + PartialEq + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let mut buffer: Store<K> = BTreeMap::new();
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    while let Some(event) = stream.next().await {
        let mut s = shared.lock().expect("kube source lock");
        match event {
            Ok(watcher::Event::Init) => buffer.clear(),
            Ok(watcher::Event::InitApply(o)) => {
                buffer.insert(key(&o), o);
            }
            Ok(watcher::Event::InitDone) => {
                // The complete list replaces the store at once (objects deleted while we were
                // away disappear here).
                let listed = std::mem::take(&mut buffer);
                if *store(&mut s) != listed || !s.synced[idx] {
                    *store(&mut s) = listed;
                    s.changed = true;
                }
                s.synced[idx] = true;
            }
            Ok(watcher::Event::Apply(o)) => {
                let k = key(&o);
                if store(&mut s).get(&k) != Some(&o) {
                    store(&mut s).insert(k, o);
                    s.changed = true;
                }
            }
            Ok(watcher::Event::Delete(o)) => {
                if store(&mut s).remove(&key(&o)).is_some() {
                    s.changed = true;
                }
            }
            Err(e) => {
                // The backoff re-lists; the last good state stays programmed meanwhile.
                restarts.fetch_add(1, Ordering::Relaxed);
                log::warn!("watch {}: {e}; re-listing with backoff", K::kind(&()));
            }
        }
    }
}

async fn client(choice: &KubeConfigChoice) -> Result<Client> {
    let config = match choice {
        KubeConfigChoice::InCluster => kube::Config::incluster().context("in-cluster config (is this running in a pod? else pass --kubeconfig)")?,
        KubeConfigChoice::Kubeconfig(p) => {
            let kc = kube::config::Kubeconfig::read_from(p).with_context(|| format!("reading kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.context("kubeconfig")?
        }
        KubeConfigChoice::Url(u) => kube::Config::new(u.parse().with_context(|| format!("URL {u}"))?),
    };
    Ok(Client::try_from(config)?)
}

impl KubeSource {
    pub fn new(choice: KubeConfigChoice, node_name: &str) -> Result<Self> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let restarts = Arc::new(AtomicU64::new(0));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        // Build the client up front so a bad kubeconfig is one clear error at start.
        let client = runtime.block_on(client(&choice))?;
        let (sh, rs, node) = (shared.clone(), restarts.clone(), node_name.to_string());
        let handle = std::thread::Builder::new().name("kube-watch".into()).spawn(move || {
            runtime.block_on(async move {
                let services = run_watcher(
                    Api::<Service>::all(client.clone()),
                    watcher::Config::default(),
                    sh.clone(),
                    rs.clone(),
                    0,
                    |s| &mut s.services,
                );
                let slices = run_watcher(
                    Api::<EndpointSlice>::all(client.clone()),
                    watcher::Config::default(),
                    sh.clone(),
                    rs.clone(),
                    1,
                    |s| &mut s.slices,
                );
                let nodes = run_watcher(
                    Api::<Node>::all(client),
                    watcher::Config::default().fields(&format!("metadata.name={node}")),
                    sh,
                    rs,
                    2,
                    |s| &mut s.nodes,
                );
                futures::join!(services, slices, nodes);
            })
        })?;
        Ok(Self { shared, restarts, _runtime: handle })
    }

}

impl Source for KubeSource {
    /// Watch errors so far (each one leads to a re-list after backoff).
    fn watch_restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    fn poll(&mut self) -> Result<Option<Objects>, SourceError> {
        let mut s = self.shared.lock().expect("kube source lock");
        if !s.synced.iter().all(|d| *d) || !s.changed {
            return Ok(None);
        }
        s.changed = false;
        let mut objects = Objects {
            nodes: s.nodes.values().cloned().collect(),
            services: s.services.values().cloned().collect(),
            endpoint_slices: s.slices.values().cloned().collect(),
        };
        // Objects from the API server carry their defaults already; applying them again is
        // harmless and keeps both sources alike.
        objects.services.iter_mut().for_each(default_service);
        objects.endpoint_slices.iter_mut().for_each(default_endpoint_slice);
        Ok(Some(objects))
    }
}
