//! Publishes the mesh trust bundle into the cluster, from the leader only.
//!
//! Why: the control plane's admission webhooks serve a certificate issued by the mesh CA,
//! so the API server must be given the mesh's roots (each webhook's `caBundle`); and an
//! injected proxy must trust the control plane before it holds a certificate, so every
//! namespace where pods may be injected needs the roots in a ConfigMap the injector mounts.
//! The CA's roots change at runtime (rotation), and a chart cannot template a CA it does
//! not own, so the controller keeps both current.
//!
//! What [`TrustPublisher`] writes, all with the PEM of the trust bundle:
//!
//! - `clientConfig.caBundle` of **every** entry of the `MutatingWebhookConfiguration`
//!   `trellis-sidecar-injector` and of the `ValidatingWebhookConfiguration`
//!   `trellis-config` (GET, set, PUT with the `resourceVersion` read; a 409 Conflict is
//!   re-read and retried, at most 5 times). A configuration that does not exist is left
//!   alone (one warning) until the next trigger: the chart may not install it.
//! - ConfigMap `trellis-trust-bundle`, key `trust-bundle.pem`, labelled
//!   `app.kubernetes.io/managed-by: trellis`, in every Namespace except `kube-system`,
//!   `kube-public` and `kube-node-lease` (`trellis-system` included: `trellis check`
//!   reads it). One GET per namespace, then a create when missing, or a replace (with the
//!   `resourceVersion` read) when its `data` differs; an identical one is not written. A
//!   ConfigMap of that name without the label belongs to someone else: it is never
//!   written, and is reported once (a warning and `result="foreign"`) until it changes
//!   hands. ConfigMaps are never listed cluster-wide.
//!
//! When: only while this replica holds the controller Lease (see [`crate::leader`]);
//! leadership is read again just before every write, so a replica that lost it stops
//! within one request. A full sync runs when leadership is gained, at once when the bundle
//! changes, and every resync period (5 min), which repairs drift (a ConfigMap deleted or
//! edited, a `caBundle` overwritten). A new Namespace gets its ConfigMap when the source's
//! status says the Namespace set changed, without waiting for the resync. Failed objects
//! are retried with exponential backoff (1 s doubling to 1 min), objects that failed last
//! time last, so one namespace that always fails cannot starve the others; a pass in which
//! 8 objects failed in a row and none succeeded is cut short (the API is likely down).
//! Nothing here ever stops the loop or the control plane.
//!
//! Metrics: `trellis_trust_bundle_writes_total{target,result}`,
//! `trellis_trust_bundle_namespaces` and `trellis_trust_bundle_webhook_configurations`
//! (both 0 on a replica that does not lead).
//!
//! RBAC: `get` and `update` on the two webhook configurations (by name); `get`, `update`
//! (by name) and `create` (which RBAC cannot restrict by name) on ConfigMaps cluster-wide.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Kind;
use crate::leader::is_leader;
use crate::source::KubeHandle;

/// Default name of the trust bundle ConfigMap (the injector's `trust_bundle_config_map`).
pub const DEFAULT_CONFIG_MAP_NAME: &str = "trellis-trust-bundle";
/// Default key of the PEM bundle in that ConfigMap (the injector's `trust_bundle_key`).
pub const DEFAULT_CONFIG_MAP_KEY: &str = "trust-bundle.pem";
/// Namespaces that get no trust bundle ConfigMap by default: nothing there is injected.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 3] =
    ["kube-system", "kube-public", "kube-node-lease"];
/// Default name of the sidecar injector's `MutatingWebhookConfiguration`.
pub const DEFAULT_MUTATING_WEBHOOK: &str = "trellis-sidecar-injector";
/// Default name of the mesh ConfigMap validator's `ValidatingWebhookConfiguration`.
pub const DEFAULT_VALIDATING_WEBHOOK: &str = "trellis-config";
/// Default interval of the full resync that repairs drift.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(5 * 60);
/// The label that marks a ConfigMap as written by Trellis.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "trellis";

/// Re-reads after a 409 before an object counts as failed for this pass.
pub(crate) const CONFLICT_RETRIES: u32 = 5;
/// ConfigMap syncs in flight at once: a cluster of many namespaces converges in seconds
/// without a burst of requests.
const CONCURRENCY: usize = 4;
/// Failures in a row, with no success in the pass, after which the pass stops early.
const FAILURES_BEFORE_CUTOFF: usize = 8;

/// What to publish where, and how often to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishSettings {
    /// Name of the ConfigMap written in every namespace.
    pub config_map_name: String,
    /// Its key holding the PEM bundle.
    pub config_map_key: String,
    /// Namespaces that get no ConfigMap.
    pub excluded_namespaces: BTreeSet<String>,
    /// The `MutatingWebhookConfiguration` whose `caBundle`s are kept; `None`: none.
    pub mutating_webhook: Option<String>,
    /// The `ValidatingWebhookConfiguration` whose `caBundle`s are kept; `None`: none.
    pub validating_webhook: Option<String>,
    /// Interval of the full resync that repairs drift.
    pub resync: Duration,
    /// First retry delay after a failed pass; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Bound on each request to the API server.
    pub request_timeout: Duration,
}

/// Keeps the webhook `caBundle`s and the per-namespace trust bundle ConfigMaps equal to
/// the mesh trust bundle, from the leader only (see the module docs).
///
/// ```no_run
/// # async fn demo(client: kube::Client, handle: trellis_kube::KubeHandle,
/// #     elector: &trellis_kube::leader::LeaderElector) {
/// use prometheus_client::registry::Registry;
/// use tokio::sync::watch;
/// use trellis_kube::publish::{PublishSettings, TrustPublisher};
///
/// let mut registry = Registry::default();
/// let (bundle_tx, bundle) = watch::channel("-----BEGIN CERTIFICATE-----\n...".to_owned());
/// let publisher = TrustPublisher::new(client, PublishSettings::default())
///     .with_metrics(&mut registry);
/// tokio::spawn(publisher.run(bundle, elector.subscribe(), handle, std::future::pending()));
/// // A CA rotation: every caBundle and ConfigMap is updated at once.
/// bundle_tx.send_replace("-----BEGIN CERTIFICATE-----\n...".to_owned());
/// # }
/// ```
pub struct TrustPublisher {
    client: Client,
    settings: PublishSettings,
    metrics: PublishMetrics,
}

/// The publisher's metrics; unregistered ones count into the void.
#[derive(Debug, Clone, Default)]
struct PublishMetrics {
    writes: Family<[(&'static str, &'static str); 2], Counter>,
    namespaces: Gauge,
    webhooks: Gauge,
}

/// What was written to (or found in) the cluster: the `target` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    ConfigMap,
    Webhook,
}

/// The `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteResult {
    Created,
    Updated,
    Failed,
    Conflict,
    Foreign,
}

/// How syncing one object ended.
#[derive(Debug)]
enum Outcome {
    /// It already held the bundle: nothing written.
    Current,
    /// Created or updated to hold the bundle.
    Written,
    /// A ConfigMap of that name without the managed-by label; whether its data happens to
    /// be the bundle.
    Foreign { holds: bool },
    /// The webhook configuration does not exist.
    Absent,
    /// This replica stopped leading before the write.
    NotLeader,
    /// A request failed, timed out, or conflicts did not stop.
    Failed(String),
}

/// Why one request did not succeed.
#[derive(Debug)]
pub(crate) enum CallError {
    /// 409: someone else wrote first (or created it first).
    Conflict,
    /// 404 on a replace: deleted since the read.
    Gone,
    Api(kube::Error),
    TimedOut,
}

/// Which webhook configuration kind.
#[derive(Debug, Clone, Copy)]
enum WebhookKind {
    Mutating,
    Validating,
}

/// What a ConfigMap sync needs; owned apart from [`Runner`] so that syncs in flight borrow
/// it while the runner records their outcomes.
struct Ctx {
    client: Client,
    name: String,
    key: String,
    timeout: Duration,
    metrics: PublishMetrics,
}

/// What one pass of a leader's writer did (this one's, and the HTTPRoute status
/// writer's).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) written: usize,
    pub(crate) failed: usize,
    /// Failures since the last success.
    in_a_row: usize,
    any_succeeded: bool,
    pub(crate) first_error: Option<String>,
}

/// The loop's state.
struct Runner {
    client: Client,
    settings: PublishSettings,
    metrics: PublishMetrics,
    leading: bool,
    /// The bundle the progress below is about.
    published: Option<String>,
    /// Namespaces that need nothing more until the next trigger.
    settled: BTreeSet<String>,
    /// Namespaces whose ConfigMap holds `published`.
    holding: BTreeSet<String>,
    /// Namespaces whose last sync failed: tried last in the next pass.
    failed_last: BTreeSet<String>,
    /// Webhook configurations that need nothing more until the next trigger.
    webhooks_settled: BTreeSet<String>,
    /// Webhook configurations whose every entry holds `published`.
    webhooks_current: BTreeSet<String>,
    /// Namespaces whose foreign ConfigMap was reported; again only after it changed hands.
    foreign_reported: BTreeSet<String>,
    /// Webhook configurations reported missing; again only after they were seen.
    absent_reported: BTreeSet<String>,
    /// Failed passes in a row, and when to try again.
    retry: Retry,
    next_resync: Instant,
    empty_reported: bool,
}

// === impl PublishSettings ===

impl Default for PublishSettings {
    /// ConfigMap `trellis-trust-bundle` / `trust-bundle.pem` everywhere but `kube-system`,
    /// `kube-public` and `kube-node-lease`; webhooks `trellis-sidecar-injector` and
    /// `trellis-config`; resync 5 min; backoff 1 s to 1 min; requests bounded by 10 s.
    fn default() -> Self {
        Self {
            config_map_name: DEFAULT_CONFIG_MAP_NAME.to_owned(),
            config_map_key: DEFAULT_CONFIG_MAP_KEY.to_owned(),
            excluded_namespaces: DEFAULT_EXCLUDED_NAMESPACES.map(str::to_owned).into(),
            mutating_webhook: Some(DEFAULT_MUTATING_WEBHOOK.to_owned()),
            validating_webhook: Some(DEFAULT_VALIDATING_WEBHOOK.to_owned()),
            resync: DEFAULT_RESYNC,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

// === impl TrustPublisher ===

impl TrustPublisher {
    /// A publisher writing through `client`; nothing is requested until
    /// [`run`](Self::run).
    pub fn new(client: Client, settings: PublishSettings) -> Self {
        Self {
            client,
            settings,
            metrics: PublishMetrics::default(),
        }
    }

    /// Registers `trellis_trust_bundle_writes_total{target,result}`,
    /// `trellis_trust_bundle_namespaces` and `trellis_trust_bundle_webhook_configurations`
    /// in `registry`. Once per registry.
    pub fn with_metrics(self, registry: &mut Registry) -> Self {
        self.metrics.register(registry);
        self
    }

    /// Publishes `bundle` (PEM) until `shutdown` completes, writing only while `leader`
    /// (from [`LeaderElector::subscribe`](crate::leader::LeaderElector::subscribe)) says
    /// this replica leads. `handle` gives the Namespaces and wakes the loop when they
    /// change. An empty bundle is never published.
    pub async fn run(
        self,
        mut bundle: watch::Receiver<String>,
        mut leader: watch::Receiver<bool>,
        handle: KubeHandle,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut status = handle.status_changes();
        let mut runner = Runner {
            client: self.client,
            next_resync: Instant::now() + self.settings.resync,
            settings: self.settings,
            metrics: self.metrics,
            leading: false,
            published: None,
            settled: BTreeSet::new(),
            holding: BTreeSet::new(),
            failed_last: BTreeSet::new(),
            webhooks_settled: BTreeSet::new(),
            webhooks_current: BTreeSet::new(),
            foreign_reported: BTreeSet::new(),
            absent_reported: BTreeSet::new(),
            retry: Retry::default(),
            empty_reported: false,
        };
        let (mut bundle_open, mut leader_open, mut status_open) = (true, true, true);
        tokio::pin!(shutdown);
        loop {
            let leading = is_leader(&leader);
            if leading != runner.leading {
                runner.set_leading(leading);
            }
            let targets = runner.targets(&handle);
            runner.prune(targets.as_ref());
            let mut wake = None;
            if leading {
                let now = Instant::now();
                if now >= runner.next_resync {
                    runner.resync(now);
                }
                let pem = bundle.borrow_and_update().clone();
                let work = runner.has_work(&pem, targets.as_ref());
                if work && runner.retry.due(now) {
                    tokio::select! {
                        biased;
                        () = &mut shutdown => return,
                        () = runner.pass(&pem, targets.as_ref(), &leader, &bundle) => {}
                    }
                    continue;
                }
                wake = Some(runner.retry.wake(work, runner.next_resync));
            }
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                changed = bundle.changed(), if bundle_open => bundle_open = changed.is_ok(),
                changed = leader.changed(), if leader_open => leader_open = changed.is_ok(),
                changed = status.changed(), if status_open => status_open = changed.is_ok(),
                () = sleep_until(wake) => {}
            }
        }
    }
}

impl fmt::Debug for TrustPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustPublisher")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Sleeps until `deadline`, or forever without one (a `select!` arm that never fires).
pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

// === impl Runner ===

impl Runner {
    fn set_leading(&mut self, leading: bool) {
        self.leading = leading;
        // Whatever was confirmed belongs to the last term: another leader may have
        // written since, so a new term starts with a full sync.
        self.reset();
        self.retry.reset();
        if leading {
            tracing::info!("leading: publishing the trust bundle");
            self.next_resync = Instant::now() + self.settings.resync;
        } else {
            tracing::debug!("not leading: not publishing the trust bundle");
        }
        self.update_gauges();
    }

    /// Forgets all progress (new bundle or new term).
    fn reset(&mut self) {
        self.settled.clear();
        self.holding.clear();
        self.webhooks_settled.clear();
        self.webhooks_current.clear();
    }

    /// The periodic resync: every object is read again.
    fn resync(&mut self, now: Instant) {
        tracing::debug!("trust bundle resync");
        self.settled.clear();
        self.webhooks_settled.clear();
        self.next_resync = now + self.settings.resync;
    }

    /// The namespaces to hold a ConfigMap; `None` until the Namespaces have been listed.
    fn targets(&self, handle: &KubeHandle) -> Option<BTreeSet<String>> {
        let listed = handle
            .status()
            .kinds
            .get(&Kind::Namespace)
            .is_some_and(|k| k.listed);
        listed.then(|| {
            (handle.namespace_names().into_iter())
                .filter(|ns| !self.settings.excluded_namespaces.contains(ns))
                .collect()
        })
    }

    /// Drops what is known about namespaces that are gone.
    fn prune(&mut self, targets: Option<&BTreeSet<String>>) {
        let Some(targets) = targets else {
            return;
        };
        let before = self.holding.len();
        for set in [
            &mut self.settled,
            &mut self.holding,
            &mut self.failed_last,
            &mut self.foreign_reported,
        ] {
            set.retain(|ns| targets.contains(ns));
        }
        if self.holding.len() != before {
            self.update_gauges();
        }
    }

    fn webhook_names(&self) -> Vec<(WebhookKind, String)> {
        let mutating = (self.settings.mutating_webhook.clone()).map(|n| (WebhookKind::Mutating, n));
        let validating =
            (self.settings.validating_webhook.clone()).map(|n| (WebhookKind::Validating, n));
        mutating.into_iter().chain(validating).collect()
    }

    /// Whether a pass would write or check anything.
    fn has_work(&mut self, pem: &str, targets: Option<&BTreeSet<String>>) -> bool {
        if pem.trim().is_empty() {
            if !std::mem::replace(&mut self.empty_reported, true) {
                tracing::warn!("the trust bundle is empty; not publishing it");
            }
            return false;
        }
        self.empty_reported = false;
        if self.published.as_deref() != Some(pem) {
            return true;
        }
        let webhooks = self.webhook_names();
        webhooks
            .iter()
            .any(|(_, name)| !self.webhooks_settled.contains(name))
            || targets.is_some_and(|t| t.iter().any(|ns| !self.settled.contains(ns)))
    }

    /// Syncs everything not settled. Returns early when leadership is lost, the bundle
    /// changes, or the API looks down.
    async fn pass(
        &mut self,
        pem: &str,
        targets: Option<&BTreeSet<String>>,
        leader: &watch::Receiver<bool>,
        bundle: &watch::Receiver<String>,
    ) {
        if self.published.as_deref() != Some(pem) {
            self.reset();
            self.published = Some(pem.to_owned());
        }
        let interrupted = || !is_leader(leader) || bundle.has_changed().unwrap_or(false);
        let mut tally = Tally::default();
        for (kind, name) in self.webhook_names() {
            if self.webhooks_settled.contains(&name) {
                continue;
            }
            if interrupted() {
                return;
            }
            let outcome = self.sync_webhook(kind, &name, pem, leader).await;
            if !self.record_webhook(kind, name, outcome, &mut tally) {
                return;
            }
        }
        if let Some(targets) = targets {
            // Those that failed last time go last, so one that always fails cannot keep
            // the others waiting behind it.
            let (retried, fresh): (Vec<&String>, Vec<&String>) = (targets.iter())
                .filter(|ns| !self.settled.contains(*ns))
                .partition(|ns| self.failed_last.contains(*ns));
            let pending: Vec<String> = fresh.into_iter().chain(retried).cloned().collect();
            let ctx = Ctx {
                client: self.client.clone(),
                name: self.settings.config_map_name.clone(),
                key: self.settings.config_map_key.clone(),
                timeout: self.settings.request_timeout,
                metrics: self.metrics.clone(),
            };
            let ctx = &ctx;
            let mut results = stream::iter(pending)
                .map(|ns| async move {
                    let outcome = ctx.sync_config_map(&ns, pem, leader).await;
                    (ns, outcome)
                })
                .buffer_unordered(CONCURRENCY);
            while let Some((ns, outcome)) = results.next().await {
                if !self.record_namespace(ns, outcome, &mut tally) || interrupted() {
                    break;
                }
            }
        }
        self.update_gauges();
        self.settle(tally);
    }

    /// Records how a webhook configuration's sync ended; `false`: stop the pass.
    fn record_webhook(
        &mut self,
        kind: WebhookKind,
        name: String,
        outcome: Outcome,
        tally: &mut Tally,
    ) -> bool {
        match outcome {
            Outcome::Current | Outcome::Written => {
                tally.written += usize::from(matches!(outcome, Outcome::Written));
                self.absent_reported.remove(&name);
                self.webhooks_current.insert(name.clone());
                self.webhooks_settled.insert(name);
            }
            Outcome::Absent => {
                if self.absent_reported.insert(name.clone()) {
                    tracing::warn!(
                        ?kind,
                        %name,
                        "webhook configuration not found; its caBundle is set when it appears"
                    );
                } else {
                    tracing::debug!(%name, "webhook configuration still not found");
                }
                self.webhooks_current.remove(&name);
                self.webhooks_settled.insert(name);
            }
            Outcome::NotLeader => return false,
            // A webhook configuration is never foreign; kept for completeness.
            Outcome::Foreign { .. } => {
                self.webhooks_current.remove(&name);
                self.webhooks_settled.insert(name);
            }
            Outcome::Failed(error) => {
                tracing::debug!(%name, %error, "syncing the webhook caBundle failed");
                self.webhooks_current.remove(&name);
                tally.failed(format!("{name}: {error}"));
            }
        }
        true
    }

    /// Records how a namespace's ConfigMap sync ended; `false`: stop the pass.
    fn record_namespace(&mut self, ns: String, outcome: Outcome, tally: &mut Tally) -> bool {
        match outcome {
            Outcome::Current | Outcome::Written => {
                tally.succeeded(matches!(outcome, Outcome::Written));
                self.foreign_reported.remove(&ns);
                self.failed_last.remove(&ns);
                self.holding.insert(ns.clone());
                self.settled.insert(ns);
            }
            Outcome::Foreign { holds } => {
                tally.succeeded(false);
                if self.foreign_reported.insert(ns.clone()) {
                    self.metrics.count(Target::ConfigMap, WriteResult::Foreign);
                    tracing::warn!(
                        namespace = %ns,
                        name = %self.settings.config_map_name,
                        label = %format!("{MANAGED_BY_LABEL}={MANAGED_BY}"),
                        "a ConfigMap of this name without the label exists; leaving it alone \
                         (pods injected there may not trust the control plane)"
                    );
                }
                if holds {
                    self.holding.insert(ns.clone());
                } else {
                    self.holding.remove(&ns);
                }
                self.failed_last.remove(&ns);
                self.settled.insert(ns);
            }
            Outcome::Absent | Outcome::NotLeader => return false,
            Outcome::Failed(error) => {
                tracing::debug!(namespace = %ns, %error, "syncing the trust bundle failed");
                tally.failed(format!("namespace {ns}: {error}"));
                self.holding.remove(&ns);
                self.failed_last.insert(ns);
                if tally.looks_down() {
                    tracing::debug!("trust bundle pass cut short: the API looks down");
                    return false;
                }
            }
        }
        true
    }

    /// Logs the pass and schedules the retry of what failed.
    fn settle(&mut self, tally: Tally) {
        let Tally {
            failed,
            written,
            first_error,
            ..
        } = tally;
        if written > 0 {
            tracing::info!(
                written,
                namespaces = self.holding.len(),
                webhook_configurations = self.webhooks_current.len(),
                "published the trust bundle"
            );
        }
        if failed == 0 {
            let failures = self.retry.succeeded();
            if failures > 0 {
                tracing::info!(failures, "trust bundle publishing recovered");
            }
            return;
        }
        let (delay, first) = self
            .retry
            .failed(self.settings.backoff_min, self.settings.backoff_max);
        let error = first_error.unwrap_or_default();
        // Once per run of failures: an outage must not flood the log.
        if first {
            tracing::warn!(failed, %error, retry_in = ?delay, "publishing the trust bundle failed");
        } else {
            tracing::debug!(failed, %error, retry_in = ?delay, "trust bundle still failing");
        }
    }

    fn update_gauges(&self) {
        let (namespaces, webhooks) = if self.leading {
            (self.holding.len(), self.webhooks_current.len())
        } else {
            (0, 0)
        };
        self.metrics.namespaces.set(gauge(namespaces));
        self.metrics.webhooks.set(gauge(webhooks));
    }

    async fn sync_webhook(
        &self,
        kind: WebhookKind,
        name: &str,
        pem: &str,
        leader: &watch::Receiver<bool>,
    ) -> Outcome {
        let (client, timeout) = (self.client.clone(), self.settings.request_timeout);
        match kind {
            WebhookKind::Mutating => {
                let api = Api::<MutatingWebhookConfiguration>::all(client);
                sync_webhook(&api, name, pem, leader, timeout, &self.metrics).await
            }
            WebhookKind::Validating => {
                let api = Api::<ValidatingWebhookConfiguration>::all(client);
                sync_webhook(&api, name, pem, leader, timeout, &self.metrics).await
            }
        }
    }
}

/// Failed passes in a row and when to try again: the backoff the trust publisher and the
/// route status writer share.
#[derive(Debug, Default)]
pub(crate) struct Retry {
    failures: u32,
    at: Option<Instant>,
}

impl Retry {
    /// Whether a pass may run at `now`: no retry is pending, or its time has come.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.at.is_none_or(|at| at <= now)
    }

    /// When to wake next: the pending retry if work waits for one, else `resync`.
    pub(crate) fn wake(&self, work: bool, resync: Instant) -> Instant {
        self.at
            .filter(|_| work)
            .map_or(resync, |retry| retry.min(resync))
    }

    /// Forgets the run of failures (a new leadership term).
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }

    /// A pass without failures: how many failed passes it ends (0 when none did).
    pub(crate) fn succeeded(&mut self) -> u32 {
        std::mem::take(self).failures
    }

    /// A pass with failures: schedules the retry after [`backoff`]; returns the delay and
    /// whether this pass started the run (the one worth a warning).
    pub(crate) fn failed(&mut self, min: Duration, max: Duration) -> (Duration, bool) {
        self.failures = self.failures.saturating_add(1);
        let delay = backoff(self.failures, min, max);
        self.at = Some(Instant::now() + delay);
        (delay, self.failures == 1)
    }
}

/// The wait after the `failures`-th failed pass in a row (1 or more): `min`, doubling up
/// to `max`.
pub(crate) fn backoff(failures: u32, min: Duration, max: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    min.saturating_mul(1 << exponent).min(max)
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// === impl Tally ===

impl Tally {
    pub(crate) fn succeeded(&mut self, written: bool) {
        self.written += usize::from(written);
        self.in_a_row = 0;
        self.any_succeeded = true;
    }

    pub(crate) fn failed(&mut self, error: String) {
        self.failed += 1;
        self.in_a_row += 1;
        self.first_error.get_or_insert(error);
    }

    /// Only failures so far, and enough of them in a row to stop asking.
    pub(crate) fn looks_down(&self) -> bool {
        !self.any_succeeded && self.in_a_row >= FAILURES_BEFORE_CUTOFF
    }
}

// === impl Ctx ===

impl Ctx {
    /// Makes the ConfigMap in `namespace` hold `pem`: create, replace, or nothing.
    async fn sync_config_map(
        &self,
        namespace: &str,
        pem: &str,
        leader: &watch::Receiver<bool>,
    ) -> Outcome {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), namespace);
        let params = PostParams::default();
        for _ in 0..=CONFLICT_RETRIES {
            let current = match call(self.timeout, api.get_opt(&self.name)).await {
                Ok(current) => current,
                Err(error) => return self.failed(&error),
            };
            if let Some(cm) = &current {
                let holds = holds(cm, &self.key, pem);
                if !managed(cm) {
                    return Outcome::Foreign { holds };
                }
                if holds {
                    return Outcome::Current;
                }
            }
            // Read again just before writing: leadership may have moved during the GET.
            if !is_leader(leader) {
                return Outcome::NotLeader;
            }
            let (written, result) = match current {
                None => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(self.name.clone()),
                            namespace: Some(namespace.to_owned()),
                            labels: Some(
                                [(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())].into(),
                            ),
                            ..ObjectMeta::default()
                        },
                        data: Some(self.data(pem)),
                        ..ConfigMap::default()
                    };
                    let created = call(self.timeout, api.create(&params, &cm)).await;
                    (created, WriteResult::Created)
                }
                Some(mut cm) => {
                    // Our own object: only the data is ours to set; other labels and
                    // annotations someone added stay.
                    cm.data = Some(self.data(pem));
                    cm.binary_data = None;
                    let replaced = call(self.timeout, api.replace(&self.name, &params, &cm)).await;
                    (replaced, WriteResult::Updated)
                }
            };
            match written {
                Ok(_) => {
                    self.metrics.count(Target::ConfigMap, result);
                    return Outcome::Written;
                }
                Err(CallError::Conflict) => {
                    self.metrics.count(Target::ConfigMap, WriteResult::Conflict);
                    tracing::debug!(%namespace, "trust bundle ConfigMap changed; reading again");
                }
                Err(CallError::Gone) => {}
                Err(error) => return self.failed(&error),
            }
        }
        self.metrics.count(Target::ConfigMap, WriteResult::Failed);
        Outcome::Failed("it kept changing under every write".to_owned())
    }

    fn failed(&self, error: &CallError) -> Outcome {
        self.metrics.count(Target::ConfigMap, WriteResult::Failed);
        Outcome::Failed(error.to_string())
    }

    fn data(&self, pem: &str) -> BTreeMap<String, String> {
        [(self.key.clone(), pem.to_owned())].into()
    }
}

/// Whether `cm` holds exactly our data: the one key with the bundle, nothing else.
fn holds(cm: &ConfigMap, key: &str, pem: &str) -> bool {
    let data_ok = cm
        .data
        .as_ref()
        .is_some_and(|d| d.len() == 1 && d.get(key).is_some_and(|v| v == pem));
    data_ok && cm.binary_data.as_ref().is_none_or(BTreeMap::is_empty)
}

fn managed(cm: &ConfigMap) -> bool {
    (cm.metadata.labels.as_ref())
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
}

// === webhook configurations ===

/// A webhook configuration kind: its entries' client configs.
trait WebhookConfiguration:
    kube::Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + fmt::Debug
{
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig>;
}

impl WebhookConfiguration for MutatingWebhookConfiguration {
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig> {
        (self.webhooks.iter_mut().flatten())
            .map(|w| &mut w.client_config)
            .collect()
    }
}

impl WebhookConfiguration for ValidatingWebhookConfiguration {
    fn client_configs(&mut self) -> Vec<&mut WebhookClientConfig> {
        (self.webhooks.iter_mut().flatten())
            .map(|w| &mut w.client_config)
            .collect()
    }
}

/// Sets `caBundle` on every entry of the configuration `name` unless all hold `pem`.
async fn sync_webhook<K: WebhookConfiguration>(
    api: &Api<K>,
    name: &str,
    pem: &str,
    leader: &watch::Receiver<bool>,
    timeout: Duration,
    metrics: &PublishMetrics,
) -> Outcome {
    let bundle = ByteString(pem.as_bytes().to_vec());
    let failed = |error: &CallError| {
        metrics.count(Target::Webhook, WriteResult::Failed);
        Outcome::Failed(error.to_string())
    };
    for _ in 0..=CONFLICT_RETRIES {
        let mut config = match call(timeout, api.get_opt(name)).await {
            Ok(Some(config)) => config,
            Ok(None) => return Outcome::Absent,
            Err(error) => return failed(&error),
        };
        let mut entries = config.client_configs();
        if entries
            .iter()
            .all(|c| c.ca_bundle.as_ref() == Some(&bundle))
        {
            return Outcome::Current;
        }
        if !is_leader(leader) {
            return Outcome::NotLeader;
        }
        for entry in &mut entries {
            entry.ca_bundle = Some(bundle.clone());
        }
        match call(timeout, api.replace(name, &PostParams::default(), &config)).await {
            Ok(_) => {
                metrics.count(Target::Webhook, WriteResult::Updated);
                return Outcome::Written;
            }
            Err(CallError::Conflict) => {
                metrics.count(Target::Webhook, WriteResult::Conflict);
                tracing::debug!(%name, "webhook configuration changed meanwhile; reading again");
            }
            Err(CallError::Gone) => {}
            Err(error) => return failed(&error),
        }
    }
    metrics.count(Target::Webhook, WriteResult::Failed);
    Outcome::Failed("it kept changing under every write".to_owned())
}

/// `request` bounded by `timeout`, its error sorted.
pub(crate) async fn call<T>(
    timeout: Duration,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(kube::Error::Api(status))) if status.code == 409 => Err(CallError::Conflict),
        Ok(Err(kube::Error::Api(status))) if status.code == 404 => Err(CallError::Gone),
        Ok(Err(error)) => Err(CallError::Api(error)),
        Err(_) => Err(CallError::TimedOut),
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Conflict => f.write_str("conflict"),
            CallError::Gone => f.write_str("not found"),
            CallError::Api(error) => write!(f, "{error}"),
            CallError::TimedOut => f.write_str("the API server did not answer in time"),
        }
    }
}

// === impl PublishMetrics ===

impl PublishMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "trellis_trust_bundle_writes",
            "Writes of the trust bundle to the cluster, by target (configmap, webhook) and \
             result (created, updated, failed, conflict, foreign)",
            self.writes.clone(),
        );
        registry.register(
            "trellis_trust_bundle_namespaces",
            "Namespaces whose trust bundle ConfigMap holds the current bundle (0 unless leader)",
            self.namespaces.clone(),
        );
        registry.register(
            "trellis_trust_bundle_webhook_configurations",
            "Webhook configurations whose every caBundle is the current bundle (0 unless leader)",
            self.webhooks.clone(),
        );
        // Every meaningful series from the start, so rates see zeros rather than gaps.
        use WriteResult::{Conflict, Created, Failed, Foreign, Updated};
        for result in [Created, Updated, Failed, Conflict, Foreign] {
            let _ = self
                .writes
                .get_or_create(&labels(Target::ConfigMap, result));
        }
        for result in [Updated, Failed, Conflict] {
            let _ = self.writes.get_or_create(&labels(Target::Webhook, result));
        }
    }

    fn count(&self, target: Target, result: WriteResult) {
        self.writes.get_or_create(&labels(target, result)).inc();
    }
}

fn labels(target: Target, result: WriteResult) -> [(&'static str, &'static str); 2] {
    let target = match target {
        Target::ConfigMap => "configmap",
        Target::Webhook => "webhook",
    };
    let result = match result {
        WriteResult::Created => "created",
        WriteResult::Updated => "updated",
        WriteResult::Failed => "failed",
        WriteResult::Conflict => "conflict",
        WriteResult::Foreign => "foreign",
    };
    [("target", target), ("result", result)]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn retries_back_off_then_reset_on_success() {
        let (min, max) = (Duration::from_millis(100), Duration::from_millis(300));
        let resync = Instant::now() + Duration::from_secs(3600);
        let mut retry = Retry::default();
        assert!(retry.due(Instant::now()));
        assert_eq!(retry.wake(true, resync), resync);
        let (delay, first) = retry.failed(min, max);
        assert_eq!((delay, first), (min, true));
        assert!(!retry.due(Instant::now()));
        assert!(retry.wake(true, resync) < resync);
        assert_eq!(
            retry.wake(false, resync),
            resync,
            "no work, no retry wake-up"
        );
        assert_eq!(retry.failed(min, max), (Duration::from_millis(200), false));
        assert_eq!(retry.failed(min, max).0, max);
        assert_eq!(retry.succeeded(), 3);
        assert!(retry.due(Instant::now()));
        assert_eq!(retry.succeeded(), 0);
    }

    #[test]
    fn defaults_match_the_chart_and_the_injector() {
        let settings = PublishSettings::default();
        assert_eq!(settings.config_map_name, "trellis-trust-bundle");
        assert_eq!(settings.config_map_key, "trust-bundle.pem");
        assert_eq!(
            settings.excluded_namespaces,
            ["kube-node-lease", "kube-public", "kube-system"]
                .map(str::to_owned)
                .into()
        );
        assert!(!settings.excluded_namespaces.contains("trellis-system"));
        assert_eq!(
            settings.mutating_webhook.as_deref(),
            Some("trellis-sidecar-injector")
        );
        assert_eq!(
            settings.validating_webhook.as_deref(),
            Some("trellis-config")
        );
        assert_eq!(settings.resync, Duration::from_secs(300));
    }

    #[test]
    fn metrics_start_at_zero_for_every_meaningful_series() {
        let mut registry = Registry::default();
        let metrics = PublishMetrics::default();
        metrics.register(&mut registry);
        metrics.count(Target::Webhook, WriteResult::Conflict);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "trellis_trust_bundle_writes_total{target=\"configmap\",result=\"foreign\"} 0",
            "trellis_trust_bundle_writes_total{target=\"webhook\",result=\"conflict\"} 1",
            "trellis_trust_bundle_namespaces 0",
            "trellis_trust_bundle_webhook_configurations 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(
            !text.contains("target=\"webhook\",result=\"created\""),
            "{text}"
        );
    }

    #[test]
    fn only_our_label_and_exactly_our_data_count() {
        let with = |data: &[(&str, &str)]| ConfigMap {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ConfigMap::default()
        };
        let label = |value: &str| Some([(MANAGED_BY_LABEL.to_owned(), value.to_owned())].into());
        let mut ours = with(&[("trust-bundle.pem", "PEM")]);
        assert!(!managed(&ours));
        ours.metadata.labels = label("helm");
        assert!(!managed(&ours));
        ours.metadata.labels = label(MANAGED_BY);
        assert!(managed(&ours));

        assert!(holds(&ours, "trust-bundle.pem", "PEM"));
        assert!(!holds(&ours, "trust-bundle.pem", "PEM\n"));
        assert!(!holds(&ours, "ca.pem", "PEM"));
        let extra = with(&[("trust-bundle.pem", "PEM"), ("other", "x")]);
        assert!(!holds(&extra, "trust-bundle.pem", "PEM"));
        let mut binary = ours;
        binary.binary_data = Some([("x".to_owned(), ByteString(vec![1]))].into());
        assert!(!holds(&binary, "trust-bundle.pem", "PEM"));
        assert!(!holds(&ConfigMap::default(), "trust-bundle.pem", "PEM"));
    }
}
