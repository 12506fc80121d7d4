//! The CA's wiring: which source feeds it (from the mesh config, switchable at run time),
//! and the trust bundle joined into the snapshots discovery pushes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use trellis_api::{MeshSnapshot, Trust};

use crate::config_watch::ProxyWide;
use trellis_ca::source::{
    self, CaSource, DirSource, RotationPolicy, SelfSignedSource, SourceMetrics,
};
use trellis_ca::{CaMaterial, CertificateAuthority};

use crate::mesh_config::{self, CaSettings, CaSourceKind, MeshConfig};

/// Metrics of the mesh config file.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConfigMetrics {
    invalid: Gauge,
    rejected: Counter,
}

impl ConfigMetrics {
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "trellis_mesh_config_invalid",
            "1 while the newest mesh config (file or ConfigMap) is invalid or names a CA source that cannot be built; the last good config stays in force",
            m.invalid.clone(),
        );
        registry.register(
            "trellis_mesh_config_rejected",
            "Versions of the mesh config (file or ConfigMap) rejected",
            m.rejected.clone(),
        );
        m
    }

    /// Records a version refused (`true`, counted) or one in force (`false`).
    pub(crate) fn set_invalid(&self, invalid: bool) {
        self.invalid.set(i64::from(invalid));
        if invalid {
            self.rejected.inc();
        }
    }
}

/// Reads the mesh config file; no file configured means the defaults.
pub(crate) fn read_config(path: Option<&Path>) -> Result<MeshConfig, String> {
    let Some(path) = path else {
        return Ok(MeshConfig::default());
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    mesh_config::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The source `settings` name. Key Vault sources need Azure credentials, built in
/// `crate::azure`.
pub(crate) fn build_source(
    settings: &CaSettings,
    state_dir: &Path,
    trust_domain: &str,
) -> Result<Arc<dyn CaSource>, String> {
    Ok(match settings.source {
        CaSourceKind::SelfSigned => {
            Arc::new(SelfSignedSource::new(state_dir.join("ca"), trust_domain))
        }
        CaSourceKind::Secret => {
            let path = settings
                .secret
                .as_ref()
                .map(|s| s.path.clone())
                .ok_or("ca.secret.path is required for source secret")?;
            Arc::new(DirSource::new(path))
        }
        CaSourceKind::KeyvaultSecret | CaSourceKind::KeyvaultKey => {
            crate::azure::build_source(settings, trust_domain)?
        }
    })
}

/// Loads the first material from `source`, before anything is served.
pub(crate) async fn initial_material(
    source: &dyn CaSource,
    trust_domain: &str,
) -> Result<CaMaterial, String> {
    let pems = source.load().await.map_err(|e| e.to_string())?;
    CaMaterial::from_pems(&pems, trust_domain, &source.label()).map_err(|e| e.to_string())
}

/// Runs the CA source loop for the configured source, and restarts it on another source
/// when the mesh config's `ca` settings change (`settings_rx`, fed by
/// `config_watch::Applier`). Settings naming a source that cannot be built keep the
/// running one.
pub(crate) async fn supervise(
    ca: Arc<CertificateAuthority>,
    mut source: Arc<dyn CaSource>,
    mut settings_rx: watch::Receiver<CaSettings>,
    state_dir: PathBuf,
    metrics: (SourceMetrics, ConfigMetrics),
    shutdown: CancellationToken,
) {
    let (source_metrics, config_metrics) = metrics;
    let spawn =
        |source: Arc<dyn CaSource>, settings: &CaSettings| -> (JoinHandle<()>, CancellationToken) {
            let stop = shutdown.child_token();
            let policy = RotationPolicy {
                reload_interval: settings.reload_interval,
                propagation: settings.propagation,
            };
            let s = stop.clone();
            let task = tokio::spawn(source::run(
                ca.clone(),
                source,
                policy,
                source_metrics.clone(),
                async move { s.cancelled().await },
            ));
            (task, stop)
        };
    let mut settings = settings_rx.borrow_and_update().clone();
    let mut running = spawn(source.clone(), &settings);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = settings_rx.changed() => if changed.is_err() {
                // Nobody can change the settings any more: keep running this source.
                shutdown.cancelled().await;
                return;
            },
        }
        let next = settings_rx.borrow_and_update().clone();
        if next == settings {
            continue;
        }
        match build_source(&next, &state_dir, ca.trust_domain()) {
            Ok(s) => {
                info!(from = %source.label(), to = %s.label(), "CA source changed in the mesh config");
                running.1.cancel();
                let _ = (&mut running.0).await;
                source = s;
                settings = next;
                running = spawn(source.clone(), &settings);
            }
            Err(e) => {
                config_metrics.set_invalid(true);
                error!(error = %e, "CA source in the mesh config cannot be used; keeping the running one");
            }
        }
    }
}

/// Joins the CA's trust bundle and the mesh config's proxy-wide settings (outbound traffic
/// policy, access log) into every snapshot from the sources, so a bundle, generation or
/// settings change reaches proxies as a discovery push. The version is the source's plus the number of such changes so far:
/// monotonic, and equal to the source's version (what `/debug/source` shows) until the
/// first one.
pub(crate) async fn join(
    mut snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    mut trust: watch::Receiver<Trust>,
    mut proxies: watch::Receiver<ProxyWide>,
    tx: watch::Sender<Arc<MeshSnapshot>>,
) {
    let mut changes = 0u64;
    let mut last: Option<(Trust, ProxyWide)> = None;
    // Without a mesh config watcher nobody changes the settings: their channel closes and
    // is no longer listened to.
    let mut proxies_open = true;
    loop {
        let mut next = (**snapshots.borrow_and_update()).clone();
        let joined = (
            trust.borrow_and_update().clone(),
            proxies.borrow_and_update().clone(),
        );
        if last.as_ref().is_some_and(|last| *last != joined) {
            changes += 1;
        }
        next.version += changes;
        next.trust = joined.0.clone();
        next.outbound = joined.1.outbound;
        next.access_log = joined.1.access_log;
        next.tracing = joined.1.tracing.clone();
        last = Some(joined);
        if tx.send(Arc::new(next)).is_err() {
            return;
        }
        tokio::select! {
            r = snapshots.changed() => if r.is_err() { return },
            r = trust.changed() => if r.is_err() { return },
            r = proxies.changed(), if proxies_open => proxies_open = r.is_ok(),
        }
    }
}

/// File name, in the state directory, of the current trust bundle (PEM): what proxies
/// bootstrap from with `--ca-roots`. On a cluster the same bundle goes into a ConfigMap.
pub(crate) const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

/// Keeps `<state>/trust-bundle.pem` equal to the CA's bundle after every change (the
/// caller writes it once before serving), so a proxy started during or after a CA switch
/// trusts the control plane's new certificate. `trust` must be subscribed when that first
/// write is made, so no change in between is missed.
pub(crate) async fn write_bundle_file(
    ca: Arc<CertificateAuthority>,
    mut trust: watch::Receiver<Trust>,
    path: PathBuf,
) {
    while trust.changed().await.is_ok() {
        trust.borrow_and_update();
        if let Err(e) = ca.write_trust_bundle(&path) {
            error!(path = %path.display(), error = %e, "writing the trust bundle file failed");
        }
    }
}
