//! The Kubernetes API source: three kube-rs watchers — all Services, all `discovery.k8s.io/v1`
//! EndpointSlices and this node's Node — feeding kube reflector stores, behind the same
//! [`Source`] trait as the manifests.
//!
//! The watchers run on a tokio runtime of their own, on a background thread, so the agent's
//! plain main loop can call [`Source::poll`] every ~200 ms without blocking:
//!
//! - `poll` reports nothing until each watcher has completed its first list, so the agent never
//!   programs a half-listed cluster (say, Services without their EndpointSlices);
//! - after that it returns a snapshot whenever a store really changed since the last snapshot;
//!   watch bookmarks, or a re-list that found the same objects, produce none;
//! - a watch error re-lists (or resumes the watch) with kube's default backoff (0.8 s doubling
//!   up to 30 s, with jitter). A re-list swaps the complete new list into the store at once,
//!   so objects deleted while the watch was down disappear, and until then the store keeps what
//!   it had. While the API server is unreachable `poll` just reports no change, and the agent
//!   keeps serving the last good state.
//!
//! Every watch error counts in [`KubeSource::watch_restarts`].
use std::{
    fmt::Debug,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        reflector::{self, store::Writer, Store},
        watcher::{self, DefaultBackoff},
        WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use serde::de::DeserializeOwned;

use super::source::{default_endpoint_slice, default_service, Objects, Source, SourceError};

/// Where the API server is and how to authenticate to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubeConfigChoice {
    /// The pod's service account (the DaemonSet's default).
    InCluster,
    /// A kubeconfig file (`--kubeconfig`), its current context.
    Kubeconfig(PathBuf),
    /// A plain URL without credentials, e.g. `http://127.0.0.1:8080` (a local fake API server in
    /// tests, or `kubectl proxy`).
    Url(String),
}

/// How long dropping a [`KubeSource`] waits for its runtime's blocking tasks (a DNS lookup in
/// flight) before leaving them behind.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Indices into [`Progress::listed`].
const SERVICES: usize = 0;
const ENDPOINT_SLICES: usize = 1;
const NODE: usize = 2;

/// What the watcher tasks tell `poll`, besides the stores themselves.
#[derive(Default)]
struct Progress {
    /// Bumped after every event that can change a store (an applied or deleted object, or a
    /// completed list swapped in), so `poll` only looks at the stores when something happened.
    generation: AtomicU64,
    /// Which watchers have completed their first list (indexed by [`SERVICES`], ...).
    listed: [AtomicBool; 3],
    /// Watch errors so far; after each one the watch resumes or re-lists, with backoff.
    restarts: AtomicU64,
}

impl Progress {
    fn all_listed(&self) -> bool {
        self.listed.iter().all(|l| l.load(Ordering::Acquire))
    }
}

/// The objects of one snapshot, as shared pointers into the stores: cheap to keep between polls,
/// and cheap to compare, as objects the watch did not touch are the very same allocation.
#[derive(Default)]
struct StoreObjects {
    services: Vec<Arc<Service>>,
    endpoint_slices: Vec<Arc<EndpointSlice>>,
    nodes: Vec<Arc<Node>>,
}

impl StoreObjects {
    fn same_as(&self, other: &StoreObjects) -> bool {
        same_objects(&self.services, &other.services)
            && same_objects(&self.endpoint_slices, &other.endpoint_slices)
            && same_objects(&self.nodes, &other.nodes)
    }

    /// Owned, defaulted copies for the rest of the agent. Objects from the API server carry
    /// their defaults already; applying them again is harmless and keeps both sources alike.
    fn to_objects(&self) -> Objects {
        let mut objects = Objects {
            nodes: self.nodes.iter().map(|n| Node::clone(n)).collect(),
            services: self.services.iter().map(|s| Service::clone(s)).collect(),
            endpoint_slices: self
                .endpoint_slices
                .iter()
                .map(|s| EndpointSlice::clone(s))
                .collect(),
            versioned: true,
        };
        objects.services.iter_mut().for_each(default_service);
        objects
            .endpoint_slices
            .iter_mut()
            .for_each(default_endpoint_slice);
        objects
    }
}

fn same_objects<K: PartialEq>(a: &[Arc<K>], b: &[Arc<K>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
}

/// A store's objects in a stable order (namespace, name), so equal stores give equal snapshots.
fn sorted<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<Arc<K>> {
    let mut objects = store.state();
    objects.sort_by_cached_key(|o| (o.namespace(), o.name_any()));
    objects
}

/// Snapshots of the Services, EndpointSlices and this Node, as kube-rs watchers see them.
pub struct KubeSource {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    progress: Arc<Progress>,
    /// [`Progress::generation`] when `poll` last looked at the stores.
    seen_generation: Option<u64>,
    /// What `poll` last returned.
    last: Option<StoreObjects>,
    /// Tells the background thread to stop (dropped or sent on drop).
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts watching. Fails only on configuration errors (no in-cluster service account, an
    /// unreadable kubeconfig, a malformed URL); an unreachable API server is not an error here,
    /// `poll` just reports nothing until the first lists complete.
    pub fn new(config: KubeConfigChoice, node_name: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("kube-watch")
            .build()
            .context("starting the Kubernetes watch runtime")?;
        // The client spawns its connection machinery on the runtime: build it there.
        let client = runtime.block_on(client(&config))?;

        let progress = Arc::new(Progress::default());
        let (services, services_writer) = reflector::store::<Service>();
        let (endpoint_slices, endpoint_slices_writer) = reflector::store::<EndpointSlice>();
        let (nodes, nodes_writer) = reflector::store::<Node>();
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();

        let watches = {
            let progress = progress.clone();
            let node_selector = format!("metadata.name={node_name}");
            async move {
                futures::join!(
                    watch_into(
                        Api::<Service>::all(client.clone()),
                        watcher::Config::default(),
                        services_writer,
                        progress.clone(),
                        SERVICES,
                    ),
                    watch_into(
                        Api::<EndpointSlice>::all(client.clone()),
                        watcher::Config::default(),
                        endpoint_slices_writer,
                        progress.clone(),
                        ENDPOINT_SLICES,
                    ),
                    watch_into(
                        Api::<Node>::all(client),
                        watcher::Config::default().fields(&node_selector),
                        nodes_writer,
                        progress,
                        NODE,
                    ),
                );
            }
        };
        let thread = std::thread::Builder::new()
            .name("kube-watch".into())
            .spawn(move || {
                runtime.block_on(async move {
                    // The watches never end by themselves; a sent or dropped shutdown ends them.
                    tokio::select! {
                        () = watches => {}
                        _ = stopped => {}
                    }
                });
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
            })
            .context("starting the Kubernetes watch thread")?;

        Ok(Self {
            services,
            endpoint_slices,
            nodes,
            progress,
            seen_generation: None,
            last: None,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Watch errors so far (a failed list or watch, a dropped connection, an expired
    /// resourceVersion); after each one the watcher resumes or re-lists with backoff.
    pub fn watch_restarts(&self) -> u64 {
        self.progress.restarts.load(Ordering::Relaxed)
    }
}

impl Source for KubeSource {
    fn poll(&mut self) -> Result<Option<Objects>, SourceError> {
        if !self.progress.all_listed() {
            return Ok(None);
        }
        // Read the generation before the stores: an event landing in between shows up in this
        // snapshot and again as a newer generation next time, where it compares equal.
        let generation = self.progress.generation.load(Ordering::Acquire);
        if self.seen_generation == Some(generation) {
            return Ok(None);
        }
        self.seen_generation = Some(generation);
        let current = StoreObjects {
            services: sorted(&self.services),
            endpoint_slices: sorted(&self.endpoint_slices),
            nodes: sorted(&self.nodes),
        };
        if self
            .last
            .as_ref()
            .is_some_and(|last| last.same_as(&current))
        {
            return Ok(None);
        }
        let objects = current.to_objects();
        self.last = Some(current);
        Ok(Some(objects))
    }

    fn watch_restarts(&self) -> u64 {
        KubeSource::watch_restarts(self)
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // An error means the thread has ended already.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the Kubernetes watch thread panicked");
            }
        }
    }
}

/// A client for the chosen API server.
async fn client(choice: &KubeConfigChoice) -> Result<Client> {
    let config = match choice {
        KubeConfigChoice::InCluster => kube::Config::incluster().context(
            "in-cluster Kubernetes config (is this running in a pod? else pass --kubeconfig)",
        )?,
        KubeConfigChoice::Kubeconfig(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        KubeConfigChoice::Url(url) => kube::Config::new(
            url.parse()
                .with_context(|| format!("API server URL {url:?}"))?,
        ),
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Runs one watcher for ever, feeding `writer`'s store and reporting to `progress`.
async fn watch_into<K>(
    api: Api<K>,
    config: watcher::Config,
    mut writer: Writer<K>,
    progress: Arc<Progress>,
    index: usize,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let kind = K::kind(&());
    // Paces the forced re-lists below; kube's own backoff paces everything else.
    let mut relist_backoff = DefaultBackoff::default();
    // Whether the last thing seen was an error: the first error of a run is a warning, the rest
    // of the run (the same outage, retried with backoff) only debug, so an outage is one line.
    let mut failing = false;
    loop {
        let mut events = watcher::watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed();
        // A watcher stream never ends by itself; it is only left for a forced re-list.
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        log::info!("watch {kind}: receiving again");
                        failing = false;
                    }
                    // managedFields can be half of an object's size and nothing here reads them.
                    let event = event.modify(|o| o.managed_fields_mut().clear());
                    writer.apply_watcher_event(&event);
                    match event {
                        // A (re-)list is buffered by the writer until it is complete; the store
                        // keeps the previous objects meanwhile.
                        watcher::Event::Init | watcher::Event::InitApply(_) => {}
                        watcher::Event::InitDone => {
                            progress.listed[index].store(true, Ordering::Release);
                            progress.generation.fetch_add(1, Ordering::AcqRel);
                        }
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                            progress.generation.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                }
                Err(e) => {
                    progress.restarts.fetch_add(1, Ordering::Relaxed);
                    if failing {
                        log::debug!("watch {kind}: {e}");
                    } else {
                        log::warn!(
                            "watch {kind}: {e}; retrying with backoff, keeping the last state"
                        );
                        failing = true;
                    }
                    if expired_at_watch_start(&e) {
                        break;
                    }
                }
            }
        }
        // kube's watcher re-lists when a watch stream reports an expired resourceVersion (an
        // ERROR event with code 410), but when the watch request itself is answered `410 Gone`
        // it retries the same resourceVersion for ever. Start a new watcher, which lists
        // afresh, as client-go's reflector does.
        let delay = relist_backoff.next().unwrap_or(Duration::from_secs(30));
        log::debug!("watch {kind}: resourceVersion expired; re-listing in {delay:?}");
        tokio::time::sleep(delay).await;
    }
}

/// Whether the API server answered a watch request (or a watch stream line) with a `410 Gone`
/// status: the resourceVersion we resume from is no longer available and only a re-list helps.
fn expired_at_watch_start(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}
