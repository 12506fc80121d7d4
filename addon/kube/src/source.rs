//! The watch loop: seven reflectors in, versioned snapshots and the raw mesh config out.
//!
//! Each kind runs a kube-rs `watcher` (list, then watch from the list's resource version;
//! on an error it resumes or re-lists) with the default backoff, feeding a reflector
//! store. A store is swapped atomically when a (re-)list completes, so a restarting watch
//! never shows a half-listed kind. The loop:
//!
//! 1. waits until every kind has completed its first list, then publishes version
//!    `current + 1` whatever it holds (so proxies never see a half-listed cluster, and an
//!    empty cluster still becomes ready);
//! 2. after that, on any change, waits the debounce interval (measured from the first
//!    change, so a steady stream of changes still publishes once per interval), rebuilds
//!    [`Objects`](trellis_controller::Objects) from the stores, translates, and publishes
//!    only when the services, the authorization policies or the routes differ from the
//!    last published snapshot. Policies with problems are reported (a warning per change,
//!    the `trellis_controller_invalid_policies` gauge) and translated fail-closed; the
//!    mesh's HTTPRoutes with problems are reported likewise
//!    (`trellis_controller_invalid_routes`) and left out.
//!
//! AuthorizationPolicies are watched with their `spec` as plain JSON
//! ([`RawPolicy`](crate::convert::RawPolicy)): with the typed custom resource, one object
//! that did not deserialize failed the whole list (no policy ever listed) or the watch
//! (every later change ignored). Each spec is parsed at conversion, on its own, and one
//! that does not parse is enforced fail-closed with the others untouched.
//!
//! HTTPRoutes (`gateway.networking.k8s.io/v1`) are watched the same way
//! ([`RawRoute`](crate::convert::RawRoute)), for the same reason; a Gateway's route is not
//! the mesh's and is left out at conversion.
//!
//! AuthorizationPolicy and HTTPRoute are custom resources: without its CRD, a kind's list
//! fails with 404. That must not hold the first snapshot back forever (a control plane
//! upgraded before its CRDs were applied, or a cluster without the Gateway API, would
//! never become ready), so a 404 counts as listed and empty, with one warning naming the
//! fix (`kubectl apply -f charts/trellis/crds/`, or installing the Gateway API's standard
//! CRDs); the watcher keeps retrying with its backoff, and the objects appear once the
//! CRD is installed.
//!
//! The ConfigMap does not feed the snapshot; its `data` is sent as soon as it changes.
//!
//! Each rebuild also sends, when it changed, the [`RouteView`] (every HTTPRoute with its
//! status, and the Services that exist) that the leader's route status writer works from
//! ([`KubeHandle::route_view`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::error::Error as StdError;
use std::fmt::{self, Debug};
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{BoxStream, select_all};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;
use trellis_api::MeshSnapshot;
use trellis_controller::{InvalidPolicies, InvalidRoutes, ObjectKey};

use crate::Kind;
use crate::convert::{self, ConfigMapData, RawPolicy, RawRoute, Skip, Skipped};
use crate::metrics::Metrics;
use crate::route_status::RouteView;

/// Default coalescing interval between a change and the snapshot it leads to.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// Default namespace of the mesh ConfigMap.
pub const DEFAULT_CONFIG_NAMESPACE: &str = "trellis-system";
/// Default name of the mesh ConfigMap.
pub const DEFAULT_CONFIG_NAME: &str = "trellis-config";

/// What the source watches and how it publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeSettings {
    /// Trust domain of every identity; must already be valid (the app checks it at start).
    pub trust_domain: String,
    /// How long changes are coalesced before a snapshot is rebuilt.
    pub debounce: Duration,
    /// Namespace of the mesh ConfigMap.
    pub config_namespace: String,
    /// Name of the mesh ConfigMap.
    pub config_name: String,
}

/// A cluster as a source of mesh snapshots.
///
/// ```no_run
/// # async fn demo(client: kube::Client) -> Result<(), trellis_kube::SourceStopped> {
/// use std::sync::Arc;
/// use tokio::sync::{oneshot, watch};
/// use trellis_kube::{KubeSettings, KubeSource};
///
/// let source = KubeSource::new(client, KubeSettings::new("cluster.local"));
/// let handle = source.handle();
/// let (tx, snapshots) = watch::channel(Arc::new(source.empty_snapshot()));
/// let (stop, stopped) = oneshot::channel::<()>();
/// tokio::spawn(source.run(tx, async move { stopped.await.ok(); }));
/// // Blocks until every kind has been listed and version 1 is out.
/// let first = handle.ready_snapshot(&snapshots).await?;
/// let mesh_config = handle.config(); // raw ConfigMap data, for the app to parse
/// # drop((first, mesh_config, stop));
/// # Ok(())
/// # }
/// ```
pub struct KubeSource {
    client: Client,
    settings: KubeSettings,
    metrics: Option<Metrics>,
    status: watch::Sender<KubeStatus>,
    config: watch::Sender<Option<ConfigMapData>>,
    route_view: watch::Sender<Option<Arc<RouteView>>>,
    /// The Namespace store, made here so handles can read it before `run` starts.
    namespaces: (Store<Namespace>, Writer<Namespace>),
}

/// A cheap, cloneable view of a [`KubeSource`]'s progress and of the mesh ConfigMap.
#[derive(Debug, Clone)]
pub struct KubeHandle {
    status: watch::Receiver<KubeStatus>,
    config: watch::Receiver<Option<ConfigMapData>>,
    route_view: watch::Receiver<Option<Arc<RouteView>>>,
    namespaces: Store<Namespace>,
}

/// What the source has done so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeStatus {
    /// Every kind has been listed and the first snapshot published.
    pub synced: bool,
    /// Version of the last snapshot published; 0 before the first.
    pub snapshot_version: u64,
    /// Per kind, every kind present.
    pub kinds: BTreeMap<Kind, KindStatus>,
}

/// The watch of one kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindStatus {
    /// Its first list has completed.
    pub listed: bool,
    /// Objects held in memory (as of the last rebuild; the ConfigMap: 0 or 1).
    pub objects: usize,
    /// List/watch errors so far (each followed by a restart with backoff).
    pub errors: u64,
    /// The latest of those errors. It stays after the watch recovers (a resumed watch
    /// says nothing until something changes); compare `errors` over time to see whether
    /// it is still failing. The one exception: a missing CRD (AuthorizationPolicy,
    /// HTTPRoute) is cleared when the kind lists, since then the CRD is there.
    pub last_error: Option<String>,
}

/// The source stopped (shut down, or nobody received its snapshots) before it was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceStopped;

/// What one step of a kind's watch means to the loop.
enum Update {
    /// A list completed and the store was replaced.
    Listed,
    /// An object was added, changed or deleted.
    Changed,
    /// Part of a list in progress: the store is unchanged until it completes.
    Progress,
    /// The list or watch failed; it restarts after a backoff.
    Failed {
        /// The error with its sources.
        error: String,
        /// The API server answered 404: for a custom resource, its CRD is not installed.
        not_found: bool,
    },
}

/// The reflector stores, read at every rebuild.
struct Stores {
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    policies: Store<RawPolicy>,
    routes: Store<RawRoute>,
    config: Store<ConfigMap>,
}

/// The loop's state between updates.
struct Publisher {
    settings: KubeSettings,
    metrics: Option<Metrics>,
    status: watch::Sender<KubeStatus>,
    config: watch::Sender<Option<ConfigMapData>>,
    route_view: watch::Sender<Option<Arc<RouteView>>>,
    tx: watch::Sender<Arc<MeshSnapshot>>,
    stores: Stores,
    listed: BTreeSet<Kind>,
    /// When the first change not yet published arrived.
    pending_since: Option<Instant>,
    published: bool,
    /// Skipped objects already logged, so a rebuild does not repeat the same warning.
    logged_skips: HashMap<(Kind, String), Skip>,
    /// Reports policies enforced fail-closed, once per change.
    invalid_policies: InvalidPolicies,
    /// Reports the mesh's routes left out for their problems, once per change.
    invalid_routes: InvalidRoutes,
    /// The custom resource kinds whose missing-CRD warning was logged since they last
    /// listed.
    crd_missing_warned: BTreeSet<Kind>,
}

// === impl KubeSettings ===

impl KubeSettings {
    /// Defaults: 100 ms debounce, ConfigMap `trellis-system/trellis-config`.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            debounce: DEFAULT_DEBOUNCE,
            config_namespace: DEFAULT_CONFIG_NAMESPACE.to_owned(),
            config_name: DEFAULT_CONFIG_NAME.to_owned(),
        }
    }
}

// === impl KubeSource ===

impl KubeSource {
    /// A source reading the cluster behind `client`. Nothing is requested until
    /// [`run`](Self::run).
    pub fn new(client: Client, settings: KubeSettings) -> Self {
        let (status, _) = watch::channel(KubeStatus::default());
        let (config, _) = watch::channel(None);
        let (route_view, _) = watch::channel(None);
        let (store, writer) = reflector::store();
        Self {
            client,
            settings,
            metrics: None,
            status,
            config,
            route_view,
            namespaces: (store, writer),
        }
    }

    /// Records watch errors and object counts in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A handle on status and mesh config that outlives [`run`](Self::run)'s start.
    pub fn handle(&self) -> KubeHandle {
        KubeHandle {
            status: self.status.subscribe(),
            config: self.config.subscribe(),
            route_view: self.route_view.subscribe(),
            namespaces: self.namespaces.0.clone(),
        }
    }

    /// Version 0 with no services, in this source's trust domain: the value to create the
    /// snapshot channel with. Nothing should be served from it: wait for
    /// [`KubeHandle::ready_snapshot`].
    pub fn empty_snapshot(&self) -> MeshSnapshot {
        MeshSnapshot {
            version: 0,
            trust_domain: self.settings.trust_domain.clone(),
            ..MeshSnapshot::default()
        }
    }

    /// Watches the cluster until stopped, publishing snapshots on `tx` (see the module
    /// docs for when).
    ///
    /// `run` must be the only writer of `tx`; versions continue from the one in it
    /// (normally 0, from [`empty_snapshot`](Self::empty_snapshot)). Stops when `shutdown`
    /// completes or every receiver of `tx` has been dropped.
    pub async fn run(
        self,
        tx: watch::Sender<Arc<MeshSnapshot>>,
        shutdown: impl Future<Output = ()>,
    ) {
        let Self {
            client,
            settings,
            metrics,
            status,
            config,
            route_view,
            namespaces: (namespaces, namespaces_w),
        } = self;
        let (services, services_w) = reflector::store();
        let (slices, slices_w) = reflector::store();
        let (pods, pods_w) = reflector::store();
        let (policies, policies_w) = reflector::store();
        let (routes, routes_w) = reflector::store();
        let (config_store, config_w) = reflector::store();
        let everything = watcher::Config::default;
        let config_only = everything().fields(&format!("metadata.name={}", settings.config_name));
        let mut updates = select_all([
            watch_kind(
                Kind::Namespace,
                Api::all(client.clone()),
                everything(),
                namespaces_w,
                convert::strip_namespace,
            ),
            watch_kind(
                Kind::Service,
                Api::all(client.clone()),
                everything(),
                services_w,
                convert::strip_service,
            ),
            watch_kind(
                Kind::EndpointSlice,
                Api::all(client.clone()),
                everything(),
                slices_w,
                convert::strip_endpoint_slice,
            ),
            watch_kind(
                Kind::Pod,
                Api::all(client.clone()),
                everything(),
                pods_w,
                convert::strip_pod,
            ),
            watch_kind(
                Kind::AuthorizationPolicy,
                // Untyped specs: one malformed policy must not fail the whole list or
                // watch (see `convert`); each is parsed, and failed closed, on its own.
                Api::<RawPolicy>::all(client.clone()),
                everything(),
                policies_w,
                convert::strip_policy,
            ),
            watch_kind(
                Kind::HttpRoute,
                // Untyped specs too: a field of a newer or experimental Gateway API must
                // fail only its own route.
                Api::<RawRoute>::all(client.clone()),
                everything(),
                routes_w,
                convert::strip_route,
            ),
            watch_kind(
                Kind::ConfigMap,
                Api::namespaced(client, &settings.config_namespace),
                config_only,
                config_w,
                convert::strip_config_map,
            ),
        ]);
        let invalid_policies = match &metrics {
            Some(m) => InvalidPolicies::new().with_metrics(m.policies.clone()),
            None => InvalidPolicies::new(),
        };
        let invalid_routes = match &metrics {
            Some(m) => InvalidRoutes::new().with_metrics(m.routes.clone()),
            None => InvalidRoutes::new(),
        };
        let mut publisher = Publisher {
            settings,
            metrics,
            status,
            config,
            route_view,
            tx,
            stores: Stores {
                namespaces,
                services,
                slices,
                pods,
                policies,
                routes,
                config: config_store,
            },
            listed: BTreeSet::new(),
            pending_since: None,
            published: false,
            logged_skips: HashMap::new(),
            invalid_policies,
            invalid_routes,
            crd_missing_warned: BTreeSet::new(),
        };
        tokio::pin!(shutdown);
        loop {
            let due = publisher.due();
            tokio::select! {
                // Biased so that a steady stream of updates cannot starve the publish.
                biased;
                () = &mut shutdown => {
                    tracing::debug!("kubernetes source stopping: shutdown");
                    return;
                }
                () = publisher.tx.closed() => {
                    tracing::debug!("kubernetes source stopping: no receivers");
                    return;
                }
                () = sleep_until(due) => publisher.publish(),
                update = updates.next() => match update {
                    Some((kind, update)) => publisher.update(kind, update),
                    // The watchers never end; should they, nothing would change any more.
                    None => return,
                },
            }
        }
    }
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// One kind's watch: stripped, restarted with backoff, stored, reduced to [`Update`]s.
fn watch_kind<K>(
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    strip: fn(&mut K),
) -> BoxStream<'static, (Kind, Update)>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let events = watcher(api, config).modify(strip).default_backoff();
    updates(kind, reflector::reflector(writer, events)).boxed()
}

fn updates<K>(
    kind: Kind,
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
) -> impl Stream<Item = (Kind, Update)> {
    events.map(move |event| {
        let update = match event {
            Ok(watcher::Event::InitDone) => Update::Listed,
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Update::Changed,
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Update::Progress,
            Err(error) => Update::Failed {
                error: error_chain(&error),
                not_found: not_found(&error),
            },
        };
        (kind, update)
    })
}

/// Whether the API server answered 404, as it does for a custom resource whose CRD is not
/// installed (with a plain-text body, which kube-rs turns into a `Status` with that code).
fn not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status))
        | watcher::Error::WatchError(status) => status.code == 404 || status.reason == "NotFound",
        _ => false,
    }
}

/// `error` with its sources, which hold the API server's message and code.
fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

// === impl Publisher ===

impl Publisher {
    /// When the next rebuild is due: never before every kind is listed.
    fn due(&self) -> Option<Instant> {
        if self.listed.len() < Kind::ALL.len() {
            return None;
        }
        self.pending_since.map(|t| t + self.settings.debounce)
    }

    fn update(&mut self, kind: Kind, update: Update) {
        match update {
            Update::Progress => return,
            Update::Listed => {
                if self.listed.insert(kind) {
                    tracing::debug!(%kind, "listed");
                }
                // A missing CRD is not an error that a later list could leave in doubt.
                let crd_installed = self.crd_missing_warned.remove(&kind);
                if crd_installed {
                    tracing::info!(%kind, "listed: the CRD is installed now");
                }
                self.status.send_modify(|s| {
                    let k = s.kinds.entry(kind).or_default();
                    k.listed = true;
                    if crd_installed {
                        k.last_error = None;
                    }
                });
            }
            Update::Changed => {}
            Update::Failed {
                error,
                not_found: true,
            } if kind.crd_install_hint().is_some() => {
                return self.crd_missing(kind, error);
            }
            Update::Failed { error, .. } => {
                tracing::warn!(%kind, %error, "kubernetes watch failed; restarting with backoff");
                if let Some(metrics) = &self.metrics {
                    metrics.watch_error(kind);
                }
                self.status.send_modify(|s| {
                    let k = s.kinds.entry(kind).or_default();
                    k.errors += 1;
                    k.last_error = Some(error);
                });
                return;
            }
        }
        if kind == Kind::ConfigMap {
            self.send_config();
        }
        // The ConfigMap's first list counts towards readiness; its changes do not touch
        // the snapshot.
        if kind != Kind::ConfigMap || !self.published {
            self.pending_since.get_or_insert_with(Instant::now);
        }
    }

    /// A custom resource kind's CRD is not installed: the kind counts as listed and empty
    /// (so the first snapshot is not held back), one warning says how to install it, and
    /// the watcher keeps retrying with its backoff. The error is still counted, so the
    /// watch error rate shows that it is missing.
    fn crd_missing(&mut self, kind: Kind, error: String) {
        let install = kind.crd_install_hint().unwrap_or_default();
        let error = format!("{error} (the CRD is not installed: {install})");
        if self.crd_missing_warned.contains(&kind) {
            tracing::debug!(%kind, %error, "still no CRD; retrying with backoff");
        } else {
            match kind {
                Kind::HttpRoute => tracing::warn!(
                    %kind,
                    %error,
                    "the Gateway API CRDs are not installed, so there are no HTTPRoutes and \
                     no routing; install them with `{install}` (retrying with backoff \
                     meanwhile)"
                ),
                _ => tracing::warn!(
                    %kind,
                    %error,
                    "the {kind} CRD is not installed, so there are no {kind}s; install it \
                     with `{install}` (retrying with backoff meanwhile)"
                ),
            }
            self.crd_missing_warned.insert(kind);
        }
        if let Some(metrics) = &self.metrics {
            metrics.watch_error(kind);
        }
        let first = self.listed.insert(kind);
        self.status.send_modify(|s| {
            let k = s.kinds.entry(kind).or_default();
            k.listed = true;
            k.errors += 1;
            k.last_error = Some(error);
        });
        if first {
            self.pending_since.get_or_insert_with(Instant::now);
        }
    }

    /// Sends the ConfigMap's data if it changed.
    fn send_config(&self) {
        let name = &self.settings.config_name;
        let stored = self.stores.config.state();
        let data = stored
            .iter()
            .find(|cm| cm.metadata.name.as_ref() == Some(name))
            .map(|cm| convert::config_data(cm));
        let present = usize::from(data.is_some());
        self.config.send_if_modified(|current| {
            if *current == data {
                return false;
            }
            tracing::info!(
                config = %format!("{}/{name}", self.settings.config_namespace),
                present = data.is_some(),
                "mesh ConfigMap changed"
            );
            *current = data;
            true
        });
        self.count(Kind::ConfigMap, present);
    }

    fn count(&self, kind: Kind, objects: usize) {
        if let Some(metrics) = &self.metrics {
            metrics.set_objects(kind, objects);
        }
        self.status.send_if_modified(|s| {
            let k = s.kinds.entry(kind).or_default();
            let changed = k.objects != objects;
            k.objects = objects;
            changed
        });
    }

    /// Rebuilds from the stores and publishes if the services, the policies or the routes
    /// changed (always, the first time).
    fn publish(&mut self) {
        self.pending_since = None;
        let namespaces = self.stores.namespaces.state();
        let services = self.stores.services.state();
        let slices = self.stores.slices.state();
        let pods = self.stores.pods.state();
        let policies = self.stores.policies.state();
        let routes = self.stores.routes.state();
        self.count(Kind::Namespace, namespaces.len());
        self.count(Kind::Service, services.len());
        self.count(Kind::EndpointSlice, slices.len());
        self.count(Kind::Pod, pods.len());
        self.count(Kind::AuthorizationPolicy, policies.len());
        self.count(Kind::HttpRoute, routes.len());
        let converted = convert::objects(
            namespaces.iter().map(Arc::as_ref),
            services.iter().map(Arc::as_ref),
            slices.iter().map(Arc::as_ref),
            pods.iter().map(Arc::as_ref),
            policies.iter().map(Arc::as_ref),
            routes.iter().map(Arc::as_ref),
        );
        self.log_skips(converted.skipped);
        self.invalid_policies.report(&converted.objects);
        self.invalid_routes.report(&converted.objects);
        self.send_route_view(&routes, &services);
        let current = Arc::clone(&self.tx.borrow());
        let version = current.version.saturating_add(1);
        let next =
            trellis_controller::translate(&converted.objects, &self.settings.trust_domain, version);
        if self.published
            && next.services == current.services
            && next.authorization == current.authorization
            && next.routes == current.routes
        {
            tracing::debug!("cluster changed, snapshot did not");
            return;
        }
        let services = next.services.len();
        let policies = next.authorization.len();
        let routes = next.routes.len();
        self.tx.send_replace(Arc::new(next));
        tracing::info!(
            version,
            services,
            policies,
            routes,
            "published mesh snapshot"
        );
        self.published = true;
        self.status.send_modify(|s| {
            s.synced = true;
            s.snapshot_version = version;
        });
    }

    /// Sends the routes and the Services that exist to the route status writer, if they
    /// changed.
    fn send_route_view(&self, routes: &[Arc<RawRoute>], services: &[Arc<Service>]) {
        let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            ObjectKey::new(
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        let mut routes = routes.to_vec();
        routes.sort_by_cached_key(|r| key(&r.metadata));
        let view = RouteView {
            routes,
            services: services.iter().map(|s| key(&s.metadata)).collect(),
        };
        self.route_view.send_if_modified(|current| {
            if current.as_deref() == Some(&view) {
                return false;
            }
            *current = Some(Arc::new(view));
            true
        });
    }

    /// Logs each skipped object once per distinct reason: invalid ones as warnings.
    fn log_skips(&mut self, skipped: Vec<Skipped>) {
        let mut now = HashMap::with_capacity(skipped.len());
        for Skipped { kind, key, skip } in skipped {
            let id = (kind, key);
            if self.logged_skips.get(&id) != Some(&skip) {
                let (kind, key) = (&id.0, &id.1);
                match &skip {
                    Skip::Invalid(reason) => {
                        tracing::warn!(%kind, object = %key, %reason, "skipping object");
                    }
                    Skip::Ignored(reason) => {
                        tracing::debug!(%kind, object = %key, %reason, "not part of the mesh");
                    }
                }
            }
            now.insert(id, skip);
        }
        self.logged_skips = now;
    }
}

// === impl KubeHandle ===

impl KubeHandle {
    /// The source's status now.
    pub fn status(&self) -> KubeStatus {
        self.status.borrow().clone()
    }

    /// Status as it changes.
    pub fn status_changes(&self) -> watch::Receiver<KubeStatus> {
        self.status.clone()
    }

    /// The labels of Namespace `name` as last listed or watched; `None` when it is not
    /// known (not yet listed, or deleted). For the sidecar injector's opt-in label.
    pub fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let object = self.namespaces.get(&reflector::ObjectRef::new(name))?;
        Some(object.metadata.labels.clone().unwrap_or_default())
    }

    /// The names of every Namespace known now, sorted. A Namespace added or deleted
    /// changes the Namespace count in [`KubeStatus::kinds`] at the next rebuild, so
    /// [`status_changes`](Self::status_changes) wakes readers of this list.
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names: Vec<String> = (self.namespaces.state().iter())
            .filter_map(|ns| ns.metadata.name.clone())
            .collect();
        names.sort();
        names
    }

    /// The HTTPRoutes (with their status) and the Services that exist, as of the last
    /// rebuild: `None` until the first snapshot, then sent again whenever they change (a
    /// route's spec, generation or status; a Service created or deleted). For the route
    /// status writer ([`crate::route_status`]).
    pub fn route_view(&self) -> watch::Receiver<Option<Arc<RouteView>>> {
        self.route_view.clone()
    }

    /// The mesh ConfigMap's `data`: `None` while it does not exist (and until it has been
    /// listed: [`KubeStatus::kinds`] says when). Raw, for the app to parse and validate.
    pub fn config(&self) -> watch::Receiver<Option<ConfigMapData>> {
        self.config.clone()
    }

    /// Waits until the source has published its first snapshot (every kind listed), then
    /// returns the current snapshot of `snapshots`, the receiver of the channel given to
    /// [`KubeSource::run`]. Fails if the source stopped first.
    pub async fn ready_snapshot(
        &self,
        snapshots: &watch::Receiver<Arc<MeshSnapshot>>,
    ) -> Result<Arc<MeshSnapshot>, SourceStopped> {
        let mut status = self.status.clone();
        status
            .wait_for(|s| s.synced)
            .await
            .map_err(|_| SourceStopped)?;
        Ok(Arc::clone(&snapshots.borrow()))
    }
}

// === impl KubeStatus ===

impl Default for KubeStatus {
    fn default() -> Self {
        Self {
            synced: false,
            snapshot_version: 0,
            kinds: Kind::ALL
                .into_iter()
                .map(|k| (k, KindStatus::default()))
                .collect(),
        }
    }
}

// === impl SourceStopped ===

impl fmt::Display for SourceStopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the kubernetes source stopped before its first snapshot")
    }
}

impl StdError for SourceStopped {}
