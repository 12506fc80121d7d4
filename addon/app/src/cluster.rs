//! Running on a cluster (`trellis-addon run --kubernetes`): the mesh and the mesh config
//! come from the Kubernetes API through `trellis-kube`, instead of a directory and a file.
//!
//! The trust domain must be known before the first snapshot (every endpoint's identity
//! carries it), and it may be set in the ConfigMap, so the ConfigMap is read once, directly,
//! before the watchers start; after that its changes arrive through the watcher like every
//! other object.
//!
//! Once the CA exists, [`publish_trust`] keeps the trust bundle in the cluster (webhook
//! `caBundle`s, a ConfigMap per namespace), written by the Lease holder only; from the
//! start, the Lease holder also keeps `status.parents` of the mesh's HTTPRoutes current
//! (`trellis_kube::route_status`).

use std::sync::Arc;

use anyhow::Context;
use k8s_openapi::api::core::v1::ConfigMap;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;
use trellis_api::MeshSnapshot;
use trellis_ca::CertificateAuthority;
use trellis_controller::SourceStatus;
use trellis_kube::events::{ConfigEvents, EventSettings};
use trellis_kube::leader::{self, LeaderElector, LeaseSettings};
use trellis_kube::publish::{PublishSettings, TrustPublisher};
use trellis_kube::route_status::{RouteStatusSettings, RouteStatusWriter};
use trellis_kube::{KubeHandle, KubeSettings, KubeSource, KubeStatus};

use crate::mesh_config::{self, MeshConfig};

/// The cluster connection, from the pod's service account or `KUBECONFIG`.
pub(crate) async fn connect() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster service account or KUBECONFIG)")
}

/// The `trellis-config` ConfigMap as it is now; absent means every default.
pub(crate) async fn startup_config(client: &kube::Client) -> anyhow::Result<MeshConfig> {
    let api =
        kube::Api::<ConfigMap>::namespaced(client.clone(), trellis_kube::DEFAULT_CONFIG_NAMESPACE);
    let found = api
        .get_opt(trellis_kube::DEFAULT_CONFIG_NAME)
        .await
        .context("reading ConfigMap trellis-system/trellis-config")?;
    let Some(cm) = found else {
        info!("ConfigMap trellis-system/trellis-config not found; using the defaults");
        return Ok(MeshConfig::default());
    };
    let data = trellis_kube::convert::config_data(&cm);
    mesh_config::parse_config_map_data(&data.data, &binary_keys(&data))
        .map_err(|e| anyhow::anyhow!("ConfigMap trellis-system/trellis-config: {e}"))
}

/// The `binaryData` keys as the parser takes them.
pub(crate) fn binary_keys(data: &trellis_kube::convert::ConfigMapData) -> Vec<&str> {
    data.binary_keys.iter().map(String::as_str).collect()
}

/// The running source: its handle, the snapshots it publishes (the first one complete),
/// its status in the shape `/debug/source` shows for the file source, and the Event
/// writer for the mesh config (leader-only).
pub(crate) struct Cluster {
    pub(crate) handle: KubeHandle,
    /// The API client, for direct reads (the injector's Namespace fallback, the version)
    /// and the writers that start after the CA.
    pub(crate) client: kube::Client,
    pub(crate) snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    pub(crate) status: watch::Receiver<SourceStatus>,
    pub(crate) events: ConfigEvents,
    /// The leader elector; awaited at shutdown, which is when it releases the Lease.
    pub(crate) elector: Option<tokio::task::JoinHandle<()>>,
    /// Whether this replica holds the Lease, for the writers that start after the CA.
    pub(crate) leader: watch::Receiver<bool>,
}

/// Mesh config rejections and recoveries become Kubernetes Events on the ConfigMap.
impl crate::config_watch::ConfigEvents for ConfigEvents {
    fn rejected(&mut self, error: &str) {
        ConfigEvents::rejected(self, error);
    }
    fn applied(&mut self, summary: &str) {
        ConfigEvents::applied(self, summary);
    }
}

impl Cluster {
    /// The Event sink for `config_watch::Applier`.
    pub(crate) fn config_events(&self) -> Box<dyn crate::config_watch::ConfigEvents> {
        Box::new(self.events.clone())
    }
}

/// Starts the watchers and waits until every kind is listed once.
pub(crate) async fn start(
    client: kube::Client,
    trust_domain: &str,
    registry: &mut Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<Cluster> {
    // Replicas serve discovery side by side; only status writes (Events, HTTPRoute status)
    // need one writer,
    // chosen through the Lease. The elector releases the Lease when `shutdown` fires.
    let id = leader::default_identity().unwrap_or_else(|| "trellis-controller".to_owned());
    let elector = LeaderElector::new(client.clone(), LeaseSettings::new(&id))
        .map_err(|e| anyhow::anyhow!("leader election settings: {e}"))?;
    elector.register_metrics(registry);
    let leader = elector.subscribe();
    let events = ConfigEvents::new(client.clone(), EventSettings::new(&id), leader.clone());
    events.register_metrics(registry);
    let stop = shutdown.clone();
    let elector = tokio::spawn(elector.run(async move { stop.cancelled().await }));

    let source = KubeSource::new(client.clone(), KubeSettings::new(trust_domain))
        .with_metrics(trellis_kube::Metrics::register(registry));
    let handle = source.handle();
    let (tx, snapshots) = watch::channel(Arc::new(source.empty_snapshot()));
    let stop = shutdown.clone();
    tokio::spawn(source.run(tx, async move { stop.cancelled().await }));
    // HTTPRoute status (Accepted / ResolvedRefs), by the Lease holder; it waits for the
    // source's first snapshot by itself.
    let route_status = RouteStatusWriter::new(client.clone(), RouteStatusSettings::default())
        .with_metrics(registry);
    let stop = shutdown.clone();
    tokio::spawn(
        route_status.run(leader.clone(), handle.clone(), async move {
            stop.cancelled().await
        }),
    );
    info!("waiting for the first list of every watched kind");
    let first = handle
        .ready_snapshot(&snapshots)
        .await
        .context("the Kubernetes source stopped before its first snapshot")?;
    info!(
        version = first.version,
        services = first.services.len(),
        "first snapshot from the cluster"
    );
    let (status_tx, status) = watch::channel(source_status(&handle.status()));
    let mut changes = handle.status_changes();
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let next = source_status(&changes.borrow_and_update());
            if status_tx.send(next).is_err() {
                return;
            }
        }
    });
    Ok(Cluster {
        handle,
        client,
        snapshots,
        status,
        events,
        elector: Some(elector),
        leader,
    })
}

/// Starts publishing the CA's trust bundle (PEM) into the cluster until `shutdown`: the
/// `caBundle` of every entry of the two admission webhook configurations, and the
/// `trellis-trust-bundle` ConfigMap the injector mounts, in every namespace but the
/// system ones. Written by the Lease holder only; a CA rotation is published at once.
pub(crate) fn publish_trust(
    cluster: &Cluster,
    ca: &Arc<CertificateAuthority>,
    registry: &mut Registry,
    shutdown: CancellationToken,
) {
    let publisher = TrustPublisher::new(cluster.client.clone(), PublishSettings::default())
        .with_metrics(registry);
    // Subscribed before the first read, so a change in between is not missed.
    let mut trust = ca.subscribe();
    let (bundle_tx, bundle) = watch::channel(ca.trust_bundle_pem());
    let ca = Arc::clone(ca);
    // `Trust` changes with every bundle or generation change; only the PEM matters here.
    // Ends with the CA or when the publisher stops.
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = bundle_tx.closed() => return,
                changed = trust.changed() => if changed.is_err() { return },
            }
            trust.borrow_and_update();
            let pem = ca.trust_bundle_pem();
            bundle_tx.send_if_modified(|current| {
                let changed = *current != pem;
                if changed {
                    *current = pem;
                }
                changed
            });
        }
    });
    tokio::spawn(publisher.run(
        bundle,
        cluster.leader.clone(),
        cluster.handle.clone(),
        async move { shutdown.cancelled().await },
    ));
}

/// The watchers' state as `/debug/source` shows it: the served version, and the newest
/// error of each kind whose watch is failing.
fn source_status(status: &KubeStatus) -> SourceStatus {
    let errors: Vec<String> = status
        .kinds
        .iter()
        .filter_map(|(kind, k)| Some(format!("{kind}: {}", k.last_error.as_ref()?)))
        .collect();
    SourceStatus {
        last_error: (!errors.is_empty()).then(|| errors.join("\n")),
        last_good_version: status.snapshot_version,
        reloads_ok: 0,
        reloads_failed: status.kinds.values().map(|k| k.errors).sum(),
    }
}
