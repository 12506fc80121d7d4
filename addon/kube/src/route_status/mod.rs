//! Writes `status.parents` of the mesh's HTTPRoutes, from the leader only, so that
//! `kubectl get httproute <name> -o yaml` says whether Trellis applies a route.
//!
//! Why: a route Trellis refuses (a `RegularExpression` match, a filter) is left out of
//! every proxy's view, and without a status it looks exactly like one that is applied.
//! The Gateway API gives each controller an entry per parent in `status.parents`; Istio
//! and Linkerd fill theirs, and users look there first.
//!
//! What [`RouteStatusWriter`] keeps, for every HTTPRoute with at least one Service parent
//! (`group: ""` or `core`, `kind: Service`): one entry per Service parentRef, with the
//! parentRef as written, `controllerName` [`CONTROLLER_NAME`] and the conditions
//! `Accepted` and `ResolvedRefs` (what they say and why: [`conditions`]). Entries of other
//! controllers are never changed; ours are replaced, and removed for parents no longer in
//! the spec.
//!
//! How: the status subresource is read (GET `.../httproutes/<name>/status`) and replaced
//! whole (PUT there, with the `resourceVersion` read): a JSON merge patch would replace
//! the `parents` list whole too, and could drop an entry another controller wrote in
//! between. A 409 Conflict is read again and retried, at most 5 times. Only routes whose
//! entries of ours differ from what the source's watch last saw are read at all, and only
//! those that still differ once read are written: a resync that finds everything right
//! sends no request.
//!
//! When: only while this replica holds the controller Lease (see [`crate::leader`]);
//! leadership is read again just before every write. A pass runs when leadership is
//! gained, when the source's routes or Services change ([`KubeHandle::route_view`]: a
//! route's spec, generation or status, a Service created or deleted), and every resync
//! period (5 min). Failed routes are retried with exponential backoff (1 s doubling to
//! 1 min), those that failed last time last; a pass in which 8 routes failed in a row and
//! none succeeded is cut short (the API is likely down). Nothing here ever stops the loop
//! or the control plane.
//!
//! Metrics: `trellis_route_status_writes_total{result}`, `result` one of `ok` (a status
//! written), `conflict` (a 409: read again and retried), `error` (a read or write failed
//! or timed out, or conflicts did not stop; retried with backoff).
//!
//! RBAC: `get` and `update` on `httproutes/status` (`gateway.networking.k8s.io`),
//! cluster-wide.

pub mod conditions;

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::Client;
use kube::api::{ApiResource, DynamicObject, PostParams};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use trellis_controller::ObjectKey;

use crate::convert::RawRoute;
use crate::leader::is_leader;
use crate::publish::{CONFLICT_RETRIES, CallError, Retry, Tally, call, sleep_until};
use crate::source::KubeHandle;

/// The `controllerName` of Trellis's entries in an HTTPRoute's `status.parents`: a
/// domain-prefixed path, as the Gateway API requires, naming the mesh's control plane.
/// Entries with another `controllerName` belong to other controllers and are never
/// changed.
pub const CONTROLLER_NAME: &str = "trellis.dev/mesh-controller";
/// Default interval of the pass that re-checks every route.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(5 * 60);

/// Route statuses synced at once.
const CONCURRENCY: usize = 4;

/// What the writer reads from the source ([`KubeHandle::route_view`]): every HTTPRoute
/// as last listed or watched, and the Services that exist.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteView {
    /// Every HTTPRoute watched, sorted by namespace and name; a Gateway's too, since it
    /// may still carry an entry of ours from when it had a Service parent.
    pub routes: Vec<Arc<RawRoute>>,
    /// Namespace and name of every Service that exists (meshed or not).
    pub services: BTreeSet<ObjectKey>,
}

/// How often to check, and how to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStatusSettings {
    /// Interval of the pass that re-checks every route.
    pub resync: Duration,
    /// First retry delay after a pass with failures; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Bound on each request to the API server.
    pub request_timeout: Duration,
}

/// Keeps Trellis's entries in `status.parents` of every mesh HTTPRoute current, from the
/// leader only (see the module docs).
///
/// ```no_run
/// # async fn demo(client: kube::Client, handle: trellis_kube::KubeHandle,
/// #     elector: &trellis_kube::leader::LeaderElector) {
/// use prometheus_client::registry::Registry;
/// use trellis_kube::route_status::{RouteStatusSettings, RouteStatusWriter};
///
/// let mut registry = Registry::default();
/// let writer = RouteStatusWriter::new(client, RouteStatusSettings::default())
///     .with_metrics(&mut registry);
/// tokio::spawn(writer.run(elector.subscribe(), handle, std::future::pending()));
/// # }
/// ```
pub struct RouteStatusWriter {
    client: Client,
    settings: RouteStatusSettings,
    metrics: StatusMetrics,
}

/// The writer's metrics; unregistered ones count into the void.
#[derive(Debug, Clone, Default)]
struct StatusMetrics {
    writes: Family<[(&'static str, &'static str); 1], Counter>,
}

/// The `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteResult {
    Ok,
    Error,
    Conflict,
}

/// How syncing one route ended.
#[derive(Debug)]
enum Outcome {
    /// Our entries were already right: nothing written.
    Current,
    /// The status was replaced.
    Written,
    /// The route is gone.
    Gone,
    /// This replica stopped leading before the write.
    NotLeader,
    /// A request failed, timed out, or conflicts did not stop.
    Failed(String),
}

/// What a route sync needs; apart from [`Runner`] so that syncs in flight borrow it while
/// the runner records their outcomes.
struct Ctx {
    client: Client,
    resource: ApiResource,
    timeout: Duration,
    metrics: StatusMetrics,
}

/// The loop's state.
struct Runner {
    ctx: Ctx,
    settings: RouteStatusSettings,
    leading: bool,
    /// Something may need writing: a pass is due (after `retry_at`, if set).
    dirty: bool,
    /// Routes whose last sync failed: tried last in the next pass.
    failed_last: BTreeSet<ObjectKey>,
    /// Failed passes in a row, and when to try again.
    retry: Retry,
    next_resync: Instant,
}

// === impl RouteStatusSettings ===

impl Default for RouteStatusSettings {
    /// Resync 5 min; backoff 1 s to 1 min; requests bounded by 10 s.
    fn default() -> Self {
        Self {
            resync: DEFAULT_RESYNC,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

// === impl RouteStatusWriter ===

impl RouteStatusWriter {
    /// A writer through `client`; nothing is requested until [`run`](Self::run).
    pub fn new(client: Client, settings: RouteStatusSettings) -> Self {
        Self {
            client,
            settings,
            metrics: StatusMetrics::default(),
        }
    }

    /// Registers `trellis_route_status_writes_total{result}` in `registry`, every result
    /// at 0. Once per registry.
    pub fn with_metrics(self, registry: &mut Registry) -> Self {
        self.metrics.register(registry);
        self
    }

    /// Keeps route statuses current until `shutdown` completes, writing only while
    /// `leader` (from [`LeaderElector::subscribe`](crate::leader::LeaderElector::subscribe))
    /// says this replica leads. `handle` gives the routes and Services, and wakes the
    /// loop when they change; nothing is written before the source's first snapshot.
    pub async fn run(
        self,
        mut leader: watch::Receiver<bool>,
        handle: KubeHandle,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut views = handle.route_view();
        let mut runner = Runner {
            ctx: Ctx {
                client: self.client,
                resource: ApiResource::erase::<RawRoute>(&()),
                timeout: self.settings.request_timeout,
                metrics: self.metrics,
            },
            next_resync: Instant::now() + self.settings.resync,
            settings: self.settings,
            leading: false,
            dirty: true,
            failed_last: BTreeSet::new(),
            retry: Retry::default(),
        };
        let (mut leader_open, mut views_open) = (true, true);
        tokio::pin!(shutdown);
        loop {
            // Seen whether or not leading, so that a change wakes the loop once.
            let view = views.borrow_and_update().clone();
            let leading = is_leader(&leader);
            if leading != runner.leading {
                runner.set_leading(leading);
            }
            let mut wake = None;
            if leading {
                let now = Instant::now();
                if now >= runner.next_resync {
                    tracing::debug!("route status resync");
                    runner.dirty = true;
                    runner.next_resync = now + runner.settings.resync;
                }
                let due = runner.dirty && runner.retry.due(now);
                if let Some(view) = view.filter(|_| due) {
                    tokio::select! {
                        biased;
                        () = &mut shutdown => return,
                        () = runner.pass(&view, &leader) => {}
                    }
                    continue;
                }
                wake = Some(runner.retry.wake(runner.dirty, runner.next_resync));
            }
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                changed = leader.changed(), if leader_open => leader_open = changed.is_ok(),
                changed = views.changed(), if views_open => {
                    views_open = changed.is_ok();
                    runner.dirty = true;
                }
                () = sleep_until(wake) => {}
            }
        }
    }
}

impl fmt::Debug for RouteStatusWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteStatusWriter")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Now, as Kubernetes writes a `lastTransitionTime` (RFC 3339, whole seconds, UTC).
fn now() -> String {
    let time = serde_json::to_value(Time(Timestamp::now())).ok();
    match time {
        Some(Value::String(text)) => text,
        _ => Timestamp::now().to_string(),
    }
}

// === impl Runner ===

impl Runner {
    fn set_leading(&mut self, leading: bool) {
        self.leading = leading;
        // Another leader may have written meanwhile: a new term starts with a full pass.
        self.dirty = true;
        self.retry.reset();
        self.failed_last.clear();
        if leading {
            tracing::info!("leading: writing HTTPRoute status");
            self.next_resync = Instant::now() + self.settings.resync;
        } else {
            tracing::debug!("not leading: not writing HTTPRoute status");
        }
    }

    /// Syncs every route whose entries of ours, as watched, are not what they should be.
    /// Returns early when leadership is lost or the API looks down.
    async fn pass(&mut self, view: &RouteView, leader: &watch::Receiver<bool>) {
        self.dirty = false;
        let now = now();
        let key = |r: &RawRoute| {
            let m = &r.metadata;
            ObjectKey::new(
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        let stale: Vec<ObjectKey> = (view.routes.iter())
            .filter(|r| conditions::status_update(r, &view.services, &now).is_some())
            .map(|r| key(r))
            .collect();
        self.failed_last.retain(|k| stale.contains(k));
        // Those that failed last time go last, so one that always fails cannot keep the
        // others waiting behind it.
        let (retried, fresh): (Vec<ObjectKey>, Vec<ObjectKey>) = stale
            .into_iter()
            .partition(|k| self.failed_last.contains(k));
        let ctx = &self.ctx;
        let mut results = stream::iter(fresh.into_iter().chain(retried))
            .map(|route| async move {
                let outcome = ctx.sync(&route, &view.services, leader).await;
                (route, outcome)
            })
            .buffer_unordered(CONCURRENCY);
        let mut tally = Tally::default();
        let mut failed_now = BTreeSet::new();
        let mut succeeded_now = BTreeSet::new();
        let mut stopped = false;
        while let Some((route, outcome)) = results.next().await {
            match outcome {
                Outcome::Current | Outcome::Written | Outcome::Gone => {
                    tally.succeeded(matches!(outcome, Outcome::Written));
                    succeeded_now.insert(route);
                }
                Outcome::NotLeader => {
                    stopped = true;
                    break;
                }
                Outcome::Failed(error) => {
                    tracing::debug!(route = %route, %error, "writing the HTTPRoute status failed");
                    tally.failed(format!("{route}: {error}"));
                    failed_now.insert(route);
                    if tally.looks_down() {
                        tracing::debug!("route status pass cut short: the API looks down");
                        break;
                    }
                }
            }
            if !is_leader(leader) {
                stopped = true;
                break;
            }
        }
        drop(results);
        self.failed_last.retain(|k| !succeeded_now.contains(k));
        self.failed_last.extend(failed_now);
        if stopped {
            // Not leading any more: the next term starts over.
            self.dirty = true;
            return;
        }
        self.settle(tally);
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
            tracing::info!(written, "wrote HTTPRoute status");
        }
        if failed == 0 {
            let failures = self.retry.succeeded();
            if failures > 0 {
                tracing::info!(failures, "HTTPRoute status writes recovered");
            }
            return;
        }
        self.dirty = true;
        let (delay, first) = self
            .retry
            .failed(self.settings.backoff_min, self.settings.backoff_max);
        let error = first_error.unwrap_or_default();
        // Once per run of failures: an outage must not flood the log.
        if first {
            tracing::warn!(failed, %error, retry_in = ?delay, "writing HTTPRoute status failed");
        } else {
            tracing::debug!(failed, %error, retry_in = ?delay, "HTTPRoute status still failing");
        }
    }
}

// === impl Ctx ===

impl Ctx {
    /// Makes our entries in `route`'s status what they should be: read, and replace the
    /// status when they differ (with the `resourceVersion` read; re-read on a conflict).
    async fn sync(
        &self,
        route: &ObjectKey,
        services: &BTreeSet<ObjectKey>,
        leader: &watch::Receiver<bool>,
    ) -> Outcome {
        let api = Api::<DynamicObject>::namespaced_with(
            self.client.clone(),
            &route.namespace,
            &self.resource,
        );
        let params = PostParams::default();
        for _ in 0..=CONFLICT_RETRIES {
            let mut current = match call(self.timeout, api.get_status(&route.name)).await {
                Ok(current) => current,
                Err(CallError::Gone) => return Outcome::Gone,
                Err(error) => return self.failed(&error),
            };
            // Judged on the route as read now, not as the watch last saw it.
            let read = RawRoute {
                metadata: current.metadata.clone(),
                spec: current.data["spec"].clone(),
                status: current.data["status"].clone(),
            };
            let Some(status) = conditions::status_update(&read, services, &now()) else {
                return Outcome::Current;
            };
            // Read again just before writing: leadership may have moved during the GET.
            if !is_leader(leader) {
                return Outcome::NotLeader;
            }
            match current.data.as_object_mut() {
                Some(fields) => {
                    fields.insert("status".to_owned(), status);
                }
                None => current.data = serde_json::json!({ "status": status }),
            }
            match call(
                self.timeout,
                api.replace_status(&route.name, &params, &current),
            )
            .await
            {
                Ok(_) => {
                    self.metrics.count(WriteResult::Ok);
                    return Outcome::Written;
                }
                Err(CallError::Conflict) => {
                    self.metrics.count(WriteResult::Conflict);
                    tracing::debug!(route = %route, "HTTPRoute changed meanwhile; reading again");
                }
                Err(CallError::Gone) => return Outcome::Gone,
                Err(error) => return self.failed(&error),
            }
        }
        self.metrics.count(WriteResult::Error);
        Outcome::Failed("it kept changing under every write".to_owned())
    }

    fn failed(&self, error: &CallError) -> Outcome {
        self.metrics.count(WriteResult::Error);
        Outcome::Failed(error.to_string())
    }
}

// === impl StatusMetrics ===

impl StatusMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "trellis_route_status_writes",
            "Writes of HTTPRoute status by the leader, by result (ok, error, conflict)",
            self.writes.clone(),
        );
        // Every series from the start, so rates see zeros rather than gaps.
        for result in [WriteResult::Ok, WriteResult::Error, WriteResult::Conflict] {
            let _ = self.writes.get_or_create(&labels(result));
        }
    }

    fn count(&self, result: WriteResult) {
        self.writes.get_or_create(&labels(result)).inc();
    }
}

fn labels(result: WriteResult) -> [(&'static str, &'static str); 1] {
    let result = match result {
        WriteResult::Ok => "ok",
        WriteResult::Error => "error",
        WriteResult::Conflict => "conflict",
    };
    [("result", result)]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn every_result_series_starts_at_zero() {
        let mut registry = Registry::default();
        let metrics = StatusMetrics::default();
        metrics.register(&mut registry);
        metrics.count(WriteResult::Conflict);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "trellis_route_status_writes_total{result=\"ok\"} 0",
            "trellis_route_status_writes_total{result=\"error\"} 0",
            "trellis_route_status_writes_total{result=\"conflict\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn transition_times_are_whole_seconds_in_utc() {
        let now = now();
        assert_eq!(now.len(), "2026-03-01T10:00:00Z".len(), "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T', "{now}");
    }
}
