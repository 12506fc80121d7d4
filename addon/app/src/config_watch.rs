//! The mesh config while running: one path from a new `trellis-config` to what it
//! changes, whether it came from a file (local profile) or the ConfigMap (Kubernetes).
//!
//! A new version is parsed by the same function as the admission webhook, checked against
//! the running trust domain, and then either applied (the CA settings and the discovery
//! scope go out on their watch channels; `ca::supervise` and the discovery server react)
//! or rejected: the running config stays, the error naming the field is logged, the
//! `trellis_mesh_config_*` metrics move, and the rejection is handed to the event sink
//! (a Kubernetes Event on the ConfigMap when running on a cluster).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use trellis_api::{AccessLog, OutboundPolicy};
use trellis_discovery::Scope;

use crate::ca::ConfigMetrics;
use crate::mesh_config::{
    self, CaSettings, ConfigError, MeshConfig, ProxySettings, RunningTrustDomain,
};

/// Where rejections and recoveries are reported besides the log and the metrics.
pub(crate) trait ConfigEvents: Send {
    /// A new version was refused; `error` names the field.
    fn rejected(&mut self, error: &str);
    /// A version was applied after a rejection.
    fn applied(&mut self, summary: &str);
}

/// What an accepted config changes, as watch channels for the parts that apply it.
pub(crate) struct Applied {
    /// The CA source settings (`ca::supervise`).
    pub(crate) ca: watch::Receiver<CaSettings>,
    /// The discovery scope (the discovery server).
    pub(crate) scope: watch::Receiver<Arc<Scope>>,
    /// The settings every proxy gets, joined into every snapshot (`ca::join`).
    pub(crate) proxies: watch::Receiver<ProxyWide>,
    /// The `proxy` key as the sidecar injector reads it (the proxy's log filter for pods
    /// created from now on).
    pub(crate) proxy: watch::Receiver<ProxySettings>,
}

/// Mesh-wide settings every proxy receives through discovery, in every response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProxyWide {
    /// `outboundTrafficPolicy.mode`.
    pub(crate) outbound: OutboundPolicy,
    /// `proxy.accessLog` and `proxy.accessLogFormat`.
    pub(crate) access_log: AccessLog,
    /// `tracing`.
    pub(crate) tracing: trellis_api::Tracing,
}

impl ProxyWide {
    fn of(config: &MeshConfig) -> Self {
        Self {
            outbound: config.outbound_traffic_policy.mode.policy(),
            access_log: config.proxy.access_log(),
            tracing: config.tracing.clone(),
        }
    }
}

/// Applies accepted versions of the mesh config, keeping the last good one.
pub(crate) struct Applier {
    running: MeshConfig,
    trust_domain: RunningTrustDomain,
    ca: watch::Sender<CaSettings>,
    scope: watch::Sender<Arc<Scope>>,
    proxies: watch::Sender<ProxyWide>,
    proxy: watch::Sender<ProxySettings>,
    metrics: ConfigMetrics,
    events: Option<Box<dyn ConfigEvents>>,
    /// Set while the newest version seen is refused, so recovery can be reported.
    rejecting: bool,
}

impl Applier {
    /// Starts from the config in force at startup; the receivers are what
    /// `ca::supervise`, the discovery server and `ca::join` read.
    pub(crate) fn new(
        running: MeshConfig,
        trust_domain: RunningTrustDomain,
        metrics: ConfigMetrics,
    ) -> (Self, Applied) {
        let (ca, ca_rx) = watch::channel(running.ca.clone());
        let (scope, scope_rx) = watch::channel(Arc::new(running.discovery.scope.clone()));
        let (proxies, proxies_rx) = watch::channel(ProxyWide::of(&running));
        let (proxy, proxy_rx) = watch::channel(running.proxy.clone());
        let applier = Self {
            running,
            trust_domain,
            ca,
            scope,
            proxies,
            proxy,
            metrics,
            events: None,
            rejecting: false,
        };
        let applied = Applied {
            ca: ca_rx,
            scope: scope_rx,
            proxies: proxies_rx,
            proxy: proxy_rx,
        };
        (applier, applied)
    }

    /// Also reports rejections and recoveries to `events`.
    pub(crate) fn with_events(mut self, events: Box<dyn ConfigEvents>) -> Self {
        self.events = Some(events);
        self
    }

    /// Takes a new version (`origin` names where it came from, for the log).
    pub(crate) fn offer(&mut self, parsed: Result<MeshConfig, ConfigError>, origin: &str) {
        let checked = parsed.and_then(|next| {
            self.trust_domain.check_reload(&next)?;
            Ok(next)
        });
        let next = match checked {
            Ok(next) => next,
            Err(e) => {
                self.metrics.set_invalid(true);
                error!(origin, error = %e, "mesh config rejected; keeping the running config");
                if let Some(events) = &mut self.events {
                    events.rejected(&e.to_string());
                }
                self.rejecting = true;
                return;
            }
        };
        self.metrics.set_invalid(false);
        if std::mem::take(&mut self.rejecting)
            && let Some(events) = &mut self.events
        {
            events.applied("the mesh config is valid again and in force");
        }
        if next == self.running {
            return;
        }
        info!(origin, "mesh config changed");
        self.ca.send_if_modified(|ca| {
            let changed = *ca != next.ca;
            *ca = next.ca.clone();
            changed
        });
        let scope = next.discovery.scope.clone();
        self.scope.send_if_modified(|running| {
            let changed = **running != scope;
            if changed {
                info!(
                    unrestricted = scope.is_all(),
                    "discovery scope changed; proxies get full views"
                );
                *running = Arc::new(scope);
            }
            changed
        });
        let proxies = ProxyWide::of(&next);
        self.proxies.send_if_modified(|running| {
            let changed = *running != proxies;
            if changed {
                info!(
                    outbound = ?proxies.outbound,
                    access_log = ?proxies.access_log,
                    tracing = ?proxies.tracing,
                    "proxy settings changed"
                );
                *running = proxies;
            }
            changed
        });
        let proxy = next.proxy.clone();
        self.proxy.send_if_modified(|running| {
            let changed = *running != proxy;
            *running = proxy;
            changed
        });
        self.running = next;
    }
}

/// Re-reads the mesh config file every `poll` and offers each changed version. An
/// unreadable file keeps the running config (and says so once).
pub(crate) async fn watch_file(
    path: PathBuf,
    poll: Duration,
    mut applier: Applier,
    shutdown: CancellationToken,
) {
    let mut last_text = std::fs::read_to_string(&path).ok();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                if last_text.is_some() {
                    error!(path = %path.display(), error = %e, "mesh config unreadable; keeping the running config");
                    last_text = None;
                }
                continue;
            }
        };
        if last_text.as_deref() == Some(text.as_str()) {
            continue;
        }
        last_text = Some(text.clone());
        applier.offer(mesh_config::parse(&text), &path.display().to_string());
    }
}

/// Offers every change of the ConfigMap's `data` (from the Kubernetes source). A deleted
/// ConfigMap keeps the running config: deleting it is more likely a mistake than a wish to
/// fall back to every default at once, and the webhook cannot refuse a delete.
pub(crate) async fn watch_config_map(
    mut data: watch::Receiver<Option<trellis_kube::convert::ConfigMapData>>,
    mut applier: Applier,
    shutdown: CancellationToken,
) {
    // At startup an absent ConfigMap was already reported (the defaults apply); only a
    // later disappearance is news.
    let mut first = true;
    loop {
        let current = data.borrow_and_update().clone();
        match current {
            Some(data) => applier.offer(
                mesh_config::parse_config_map_data(&data.data, &crate::cluster::binary_keys(&data)),
                "ConfigMap trellis-system/trellis-config",
            ),
            None if first => {}
            None => warn!(
                "ConfigMap trellis-system/trellis-config is absent; keeping the running config"
            ),
        }
        first = false;
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = data.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    use super::*;

    /// Records what the applier reported.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<Vec<String>>>);

    impl ConfigEvents for Recorded {
        fn rejected(&mut self, error: &str) {
            self.0
                .lock()
                .map(|mut v| v.push(format!("rejected: {error}")))
                .ok();
        }
        fn applied(&mut self, summary: &str) {
            self.0
                .lock()
                .map(|mut v| v.push(format!("applied: {summary}")))
                .ok();
        }
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn metric(registry: &Registry, name: &str) -> Option<String> {
        let mut text = String::new();
        encode(&mut text, registry).ok()?;
        let line = text.lines().find(|l| l.split(' ').next() == Some(name))?;
        Some(line.split(' ').nth(1)?.to_owned())
    }

    /// Bad versions keep the running config, count, and are reported with the field;
    /// good ones reach the scope channel (and the CA channel only when `ca` changed).
    #[test]
    fn offers_apply_or_keep_the_last_good_config() -> Result<(), String> {
        let mut registry = Registry::default();
        let metrics = ConfigMetrics::new(&mut registry);
        let running = MeshConfig::default();
        let td = RunningTrustDomain::resolve(None, &running)?;
        let (applier, applied) = Applier::new(running, td, metrics);
        let Applied {
            mut ca,
            mut scope,
            proxies: mut outbound,
            mut proxy,
        } = applied;
        let events = Recorded::default();
        let mut applier = applier.with_events(Box::new(events.clone()));
        ca.borrow_and_update();
        scope.borrow_and_update();

        let own_only = data(&[("discovery", "scope: {default: []}")]);
        applier.offer(mesh_config::parse_config_map_data(&own_only, &[]), "test");
        assert!(scope.has_changed().map_err(|e| e.to_string())?);
        assert!(!scope.borrow_and_update().allows("a", "b"));
        assert!(
            !ca.has_changed().map_err(|e| e.to_string())?,
            "ca unchanged"
        );

        let bad = data(&[("discovery", "scope: {default: [Not_A_Namespace]}")]);
        applier.offer(mesh_config::parse_config_map_data(&bad, &[]), "test");
        let moved = data(&[("trustDomain", "other.example")]);
        applier.offer(mesh_config::parse_config_map_data(&moved, &[]), "test");
        assert!(
            !scope.has_changed().map_err(|e| e.to_string())?,
            "bad versions applied"
        );
        assert_eq!(
            metric(&registry, "trellis_mesh_config_invalid").as_deref(),
            Some("1")
        );
        assert_eq!(
            metric(&registry, "trellis_mesh_config_rejected_total").as_deref(),
            Some("2")
        );

        let back = data(&[
            ("discovery", "scope: {default: [\"*\"]}"),
            ("outboundTrafficPolicy", "mode: REGISTRY_ONLY"),
        ]);
        applier.offer(mesh_config::parse_config_map_data(&back, &[]), "test");
        assert!(scope.borrow_and_update().allows("a", "b"));
        assert!(
            !proxy.has_changed().map_err(|e| e.to_string())?,
            "the proxy key did not change"
        );
        let louder = data(&[
            ("discovery", "scope: {default: [\"*\"]}"),
            ("outboundTrafficPolicy", "mode: REGISTRY_ONLY"),
            ("proxy", "logLevel: debug"),
        ]);
        applier.offer(mesh_config::parse_config_map_data(&louder, &[]), "test");
        assert!(proxy.has_changed().map_err(|e| e.to_string())?);
        assert_eq!(proxy.borrow_and_update().log_filter(), "debug,access=info");
        assert!(outbound.has_changed().map_err(|e| e.to_string())?);
        assert_eq!(
            outbound.borrow_and_update().outbound,
            OutboundPolicy::RegistryOnly
        );
        assert_eq!(
            metric(&registry, "trellis_mesh_config_invalid").as_deref(),
            Some("0")
        );
        let seen = events.0.lock().map_err(|e| e.to_string())?.clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen[0].starts_with("rejected: data.discovery: scope.default[0]"),
            "{seen:?}"
        );
        assert!(seen[1].contains("trustDomain"), "{seen:?}");
        assert!(seen[2].starts_with("applied: "), "{seen:?}");
        Ok(())
    }

    /// The ConfigMap watcher refuses `binaryData` by name, exactly as the startup read
    /// and the webhook do.
    #[tokio::test]
    async fn the_config_map_watcher_refuses_binary_data() -> Result<(), String> {
        let mut registry = Registry::default();
        let metrics = ConfigMetrics::new(&mut registry);
        let running = MeshConfig::default();
        let td = RunningTrustDomain::resolve(None, &running)?;
        let (applier, _applied) = Applier::new(running, td, metrics);
        let events = Recorded::default();
        let applier = applier.with_events(Box::new(events.clone()));
        let cm = trellis_kube::convert::ConfigMapData {
            data: BTreeMap::new(),
            binary_keys: vec!["blob".to_owned()],
        };
        let (_tx, rx) = watch::channel(Some(cm));
        let stop = CancellationToken::new();
        let task = tokio::spawn(watch_config_map(rx, applier, stop.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.cancel();
        task.await.map_err(|e| e.to_string())?;
        assert_eq!(
            metric(&registry, "trellis_mesh_config_rejected_total").as_deref(),
            Some("1")
        );
        let seen = events.0.lock().map_err(|e| e.to_string())?.clone();
        assert!(
            seen.len() == 1 && seen[0].contains("binaryData.blob"),
            "{seen:?}"
        );
        Ok(())
    }
}
