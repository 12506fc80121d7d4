//! Leader election over a `coordination.k8s.io/v1` Lease, for the few writes that must come
//! from one replica only.
//!
//! Why: several controller replicas serve discovery at once, each from its own watches, so
//! reads need no coordination. Status writes (Kubernetes Events about the mesh ConfigMap)
//! would be repeated by every replica, so only the holder of a Lease makes them. kube-rs 5
//! ships no leader-election helper, so this is a small port of client-go's `leaderelection`
//! with the same timings and the same safety argument:
//!
//! - The Lease (`trellis-system/trellis-controller` by default) names its holder (the pod
//!   name), `leaseDurationSeconds` (15) and `renewTime`. The holder renews it every retry
//!   period (2 s); every write is a create (409 AlreadyExists: another replica created it
//!   first) or a replace carrying the `resourceVersion` that was read (409 Conflict: another
//!   replica wrote in between). A replica that loses such a race stays follower, so two
//!   replicas never both believe they hold the Lease.
//! - A follower takes the Lease when it is absent, released (empty holder), or expired.
//!   Expiry is measured, as in client-go, from when *this* replica last saw the record
//!   change (its `resourceVersion`), on its own monotonic clock, plus the record's
//!   `leaseDurationSeconds`. Comparing the holder's `renewTime` with the local wall clock
//!   would let a replica whose clock runs ahead steal a live Lease.
//! - The leader steps down when it has not renewed within the renew deadline (10 s) of
//!   the start of its last successful renewal: before any follower can see the Lease
//!   expire (15 s after it saw that renewal). Requests are cut off at the deadline, so a
//!   hanging API server cannot keep a stale leader. API errors are retried (every retry
//!   period while leading; with exponential backoff up to the lease duration while
//!   following); nothing panics.
//! - On shutdown the elector stops leading first, then clears `holderIdentity` (a
//!   *release*), so a successor takes over at its next retry instead of after expiry.
//!   If the elector's future is dropped (task aborted), it stops leading without a release.
//!
//! Leadership is published on a `watch` channel ([`LeaderElector::subscribe`]); use
//! [`is_leader`] to read it (a closed channel, i.e. an elector that is gone, means *not*
//! leader). Metrics: `trellis_kube_leader` (0/1) and
//! `trellis_kube_leader_transitions_total`.
//!
//! RBAC: `get`, `create` and `update` on `leases` (`coordination.k8s.io`) in the Lease's
//! namespace.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;

/// Default namespace of the Lease.
pub const DEFAULT_LEASE_NAMESPACE: &str = "trellis-system";
/// Default name of the Lease.
pub const DEFAULT_LEASE_NAME: &str = "trellis-controller";
/// Default `leaseDurationSeconds`: how long followers wait after the last renewal they saw.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Default time a leader keeps leading without a successful renewal.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Default interval between renewals (leader) and acquisition attempts (followers).
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Followers wait between 1 and this many retry periods, so replicas do not move in step.
const JITTER: f64 = 1.2;
/// Upper bound on the release at shutdown.
const MAX_RELEASE_TIME: Duration = Duration::from_secs(5);

/// Which Lease to hold, as whom, and how often to renew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's `holderIdentity`: its pod name, unique among replicas.
    pub identity: String,
    /// `leaseDurationSeconds` written to the Lease (rounded up to whole seconds).
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down; below `lease_duration`.
    pub renew_deadline: Duration,
    /// Interval between renewals and between a follower's attempts.
    pub retry_period: Duration,
}

/// Settings that would break the election's guarantees; see [`LeaseSettings::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidLeaseSettings(String);

/// Contends for a Lease and publishes whether this replica holds it.
///
/// ```no_run
/// # use trellis_kube::leader::InvalidLeaseSettings;
/// # async fn demo(client: kube::Client) -> Result<(), InvalidLeaseSettings> {
/// use tokio::sync::oneshot;
/// use trellis_kube::leader::{LeaderElector, LeaseSettings, default_identity, is_leader};
///
/// let identity = default_identity().unwrap_or_else(|| "trellis-controller".to_owned());
/// let elector = LeaderElector::new(client, LeaseSettings::new(identity))?;
/// let leader = elector.subscribe();
/// let (stop, stopped) = oneshot::channel::<()>();
/// let task = tokio::spawn(elector.run(async move { stopped.await.ok(); }));
/// // ... `is_leader(&leader)` before each status write ...
/// # let _ = is_leader(&leader);
/// stop.send(()).ok();
/// task.await.ok(); // the Lease is released
/// # Ok(())
/// # }
/// ```
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    leader: watch::Sender<bool>,
    metrics: LeaderMetrics,
}

/// The elector's metrics, registered with [`LeaderElector::register_metrics`].
#[derive(Debug, Clone, Default)]
struct LeaderMetrics {
    leader: Gauge,
    transitions: Counter,
}

/// What one acquire-or-renew attempt found.
#[derive(Debug)]
enum Attempt {
    /// This replica holds the Lease (created, acquired or renewed it).
    Holding,
    /// Another replica holds an unexpired Lease.
    HeldBy(String),
}

/// Why an attempt did not end in [`Attempt`].
#[derive(Debug)]
enum AttemptError {
    /// 409: another replica created or updated the Lease first.
    LostRace,
    /// Any other API error.
    Api(kube::Error),
    /// No answer before the renew deadline (leader) or within one deadline (follower).
    TimedOut,
}

/// The record as this replica last saw it, and when the record last changed.
struct Observed {
    lease: Lease,
    changed_at: Instant,
}

/// The election loop's state; stops leading when dropped.
struct Runner {
    api: Api<Lease>,
    settings: LeaseSettings,
    leader: watch::Sender<bool>,
    metrics: LeaderMetrics,
    observed: Option<Observed>,
    /// Start of the last successful renewal, while leading.
    renewed: Option<Instant>,
    /// Failed attempts in a row.
    errors: u32,
}

// === impl LeaseSettings ===

impl LeaseSettings {
    /// Lease `trellis-system/trellis-controller` held as `identity`, with client-go's
    /// timings: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            namespace: DEFAULT_LEASE_NAMESPACE.to_owned(),
            name: DEFAULT_LEASE_NAME.to_owned(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// Checks what the safety argument needs: a non-empty identity, a lease of at least
    /// one second, `lease_duration > renew_deadline > 1.2 × retry_period > 0`.
    pub fn validate(&self) -> Result<(), InvalidLeaseSettings> {
        let fail = |why: &str| Err(InvalidLeaseSettings(why.to_owned()));
        if self.identity.is_empty() {
            return fail("the holder identity is empty");
        }
        if self.namespace.is_empty() || self.name.is_empty() {
            return fail("the Lease namespace or name is empty");
        }
        if self.lease_duration < Duration::from_secs(1) {
            return fail("the lease duration is below one second");
        }
        if self.renew_deadline >= self.lease_duration {
            return fail("the renew deadline is not below the lease duration");
        }
        if self.retry_period.is_zero() || self.retry_period.mul_f64(JITTER) >= self.renew_deadline {
            return fail("the retry period is zero or not below the renew deadline / 1.2");
        }
        Ok(())
    }

    /// `leaseDurationSeconds`, rounded up.
    fn lease_seconds(&self) -> i32 {
        let secs = self
            .lease_duration
            .as_secs()
            .saturating_add(u64::from(self.lease_duration.subsec_nanos() > 0));
        i32::try_from(secs).unwrap_or(i32::MAX)
    }
}

/// This replica's default holder identity: `$POD_NAME` (from the downward API), else the
/// hostname (a pod's hostname is its name unless the spec overrides it).
pub fn default_identity() -> Option<String> {
    let env = |name: &str| std::env::var(name).ok();
    let file = |path: &str| std::fs::read_to_string(path).ok();
    [
        env("POD_NAME"),
        env("HOSTNAME"),
        file("/proc/sys/kernel/hostname"),
        file("/etc/hostname"),
    ]
    .into_iter()
    .flatten()
    .map(|s| s.trim().to_owned())
    .find(|s| !s.is_empty())
}

/// Whether the elector behind `leader` holds the Lease now. `false` once the elector is
/// gone (its channel closed), whatever it last sent.
pub fn is_leader(leader: &watch::Receiver<bool>) -> bool {
    leader.has_changed().is_ok() && *leader.borrow()
}

// === impl InvalidLeaseSettings ===

impl fmt::Display for InvalidLeaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid leader election settings: {}", self.0)
    }
}

impl StdError for InvalidLeaseSettings {}

// === impl LeaderElector ===

impl LeaderElector {
    /// An elector for the Lease in `settings`; nothing is requested until
    /// [`run`](Self::run).
    pub fn new(client: Client, settings: LeaseSettings) -> Result<Self, InvalidLeaseSettings> {
        settings.validate()?;
        let (leader, _) = watch::channel(false);
        Ok(Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            leader,
            metrics: LeaderMetrics::default(),
        })
    }

    /// Whether this replica leads: `true` from a successful acquisition until it steps
    /// down. Read it with [`is_leader`]; wait for changes with `changed()`.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// Registers `trellis_kube_leader` (1 while leading) and
    /// `trellis_kube_leader_transitions_total` (each start or end of leading). Once per
    /// registry.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "trellis_kube_leader",
            "Whether this replica holds the controller Lease and makes status writes (0/1)",
            self.metrics.leader.clone(),
        );
        registry.register(
            "trellis_kube_leader_transitions",
            "Times this replica started or stopped leading",
            self.metrics.transitions.clone(),
        );
    }

    /// Contends for the Lease until `shutdown` completes, then stops leading and releases
    /// the Lease if it names this replica (bounded by the renew deadline, at most 5 s).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut runner = Runner {
            api: self.api,
            settings: self.settings,
            leader: self.leader,
            metrics: self.metrics,
            observed: None,
            renewed: None,
            errors: 0,
        };
        tracing::debug!(
            lease = %runner.settings.name,
            namespace = %runner.settings.namespace,
            identity = %runner.settings.identity,
            "leader election starting"
        );
        tokio::pin!(shutdown);
        loop {
            let started = Instant::now();
            let cutoff = runner.renewed.unwrap_or(started) + runner.settings.renew_deadline;
            let attempt = tokio::select! {
                () = &mut shutdown => break,
                attempt = tokio::time::timeout_at(cutoff, runner.attempt()) => {
                    attempt.unwrap_or(Err(AttemptError::TimedOut))
                }
            };
            let next = runner.settle(started, attempt);
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep_until(next) => {}
            }
        }
        if runner.leading() {
            tracing::info!(lease = %runner.settings.name, "stopped leading: shutting down");
        }
        runner.set_leading(false);
        let limit = runner.settings.renew_deadline.min(MAX_RELEASE_TIME);
        match tokio::time::timeout(limit, runner.release()).await {
            Ok(Ok(true)) => tracing::info!(lease = %runner.settings.name, "released the lease"),
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not release the lease; it expires instead");
            }
            Err(_) => tracing::warn!("releasing the lease timed out; it expires instead"),
        }
    }
}

// === impl Runner ===

impl Runner {
    fn leading(&self) -> bool {
        *self.leader.borrow()
    }

    /// One round of client-go's `tryAcquireOrRenew`: read the Lease, then create, take or
    /// renew it unless another replica holds it.
    async fn attempt(&mut self) -> Result<Attempt, AttemptError> {
        let name = self.settings.name.clone();
        let Some(current) = self.api.get_opt(&name).await.map_err(AttemptError::from)? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.holding_spec(None)),
            };
            let created = self.api.create(&PostParams::default(), &lease).await?;
            self.observe(created);
            return Ok(Attempt::Holding);
        };
        self.observe(current.clone());
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        if let Some(holder) = holder
            && holder != self.settings.identity
            && !self.expired()
        {
            return Ok(Attempt::HeldBy(holder.to_owned()));
        }
        let mut lease = current;
        lease.spec = Some(self.holding_spec(Some(spec)));
        let replaced = self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await?;
        self.observe(replaced);
        Ok(Attempt::Holding)
    }

    /// The spec naming this replica, renewed now; acquisition time and transitions carry
    /// over from `old` when it already names this replica.
    fn holding_spec(&self, old: Option<LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let old = old.unwrap_or_default();
        let mine = old.holder_identity.as_deref() == Some(self.settings.identity.as_str());
        let (acquire_time, transitions) = if mine {
            (
                old.acquire_time.unwrap_or_else(|| now.clone()),
                old.lease_transitions.unwrap_or(0),
            )
        } else {
            let transitions = old.lease_transitions.map_or(0, |t| t.saturating_add(1));
            (now.clone(), transitions)
        };
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(self.settings.lease_seconds()),
            acquire_time: Some(acquire_time),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..old
        }
    }

    /// Remembers `lease`, restarting the expiry clock when its version changed.
    fn observe(&mut self, lease: Lease) {
        let version = |l: &Lease| l.metadata.resource_version.clone();
        match &mut self.observed {
            Some(seen) if version(&seen.lease) == version(&lease) && version(&lease).is_some() => {
                seen.lease = lease;
            }
            _ => {
                self.observed = Some(Observed {
                    lease,
                    changed_at: Instant::now(),
                });
            }
        }
    }

    /// Whether the observed record's duration has passed since it last changed.
    fn expired(&self) -> bool {
        let Some(seen) = &self.observed else {
            return true;
        };
        let seconds = seen
            .lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0);
        let duration = seconds.map_or(self.settings.lease_duration, Duration::from_secs);
        seen.changed_at + duration <= Instant::now()
    }

    /// Applies an attempt's outcome; returns when to try next.
    fn settle(&mut self, started: Instant, attempt: Result<Attempt, AttemptError>) -> Instant {
        let retry = self.settings.retry_period;
        let now = Instant::now();
        match attempt {
            Ok(Attempt::Holding) => {
                if self.errors > 0 {
                    tracing::info!(failures = self.errors, "lease requests succeed again");
                }
                self.errors = 0;
                self.renewed = Some(started);
                if !self.leading() {
                    self.set_leading(true);
                    tracing::info!(
                        lease = %self.settings.name,
                        identity = %self.settings.identity,
                        "became leader"
                    );
                }
                now + retry
            }
            Ok(Attempt::HeldBy(holder)) => {
                self.errors = 0;
                if self.leading() {
                    self.step_down(&format!("the lease is held by {holder}"));
                } else {
                    tracing::trace!(%holder, "lease held by another replica");
                }
                now + jitter(retry)
            }
            Err(error) => {
                self.errors = self.errors.saturating_add(1);
                let lost_race = matches!(error, AttemptError::LostRace);
                if lost_race {
                    tracing::debug!("another replica wrote the lease first");
                } else if self.errors == 1 {
                    tracing::warn!(%error, "lease request failed; retrying");
                } else {
                    tracing::debug!(%error, failures = self.errors, "lease request failed");
                }
                if let Some(renewed) = self.renewed.filter(|_| self.leading()) {
                    let deadline = renewed + self.settings.renew_deadline;
                    if now >= deadline {
                        self.step_down("no renewal within the renew deadline");
                        // The backoff of a follower starts now, from one retry period.
                        self.errors = 1;
                    } else if lost_race && self.errors == 1 {
                        // Someone else changed our Lease: look at once who holds it.
                        return now;
                    } else {
                        return (now + retry).min(deadline);
                    }
                }
                if lost_race {
                    return now + jitter(retry);
                }
                let exponent = self.errors.saturating_sub(1).min(16);
                let backoff = retry.saturating_mul(1 << exponent);
                now + jitter(backoff.min(self.settings.lease_duration))
            }
        }
    }

    fn set_leading(&mut self, leading: bool) {
        if self.leader.send_replace(leading) != leading {
            self.metrics.leader.set(i64::from(leading));
            self.metrics.transitions.inc();
        }
        if !leading {
            self.renewed = None;
        }
    }

    fn step_down(&mut self, why: &str) {
        if self.leading() {
            tracing::warn!(
                lease = %self.settings.name,
                identity = %self.settings.identity,
                reason = why,
                "stopped leading"
            );
        }
        self.set_leading(false);
    }

    /// Clears the holder if the Lease names this replica, so a successor need not wait
    /// for it to expire. Returns whether it did.
    async fn release(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(false);
        }
        let now = MicroTime(Timestamp::now());
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Changed since the read: someone else has it now.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // Reached without `run` finishing only when its future is dropped (task aborted).
        self.step_down("the elector was dropped");
    }
}

// === impl AttemptError ===

impl From<kube::Error> for AttemptError {
    fn from(error: kube::Error) -> Self {
        match error {
            kube::Error::Api(status) if status.code == 409 => AttemptError::LostRace,
            error => AttemptError::Api(error),
        }
    }
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::LostRace => f.write_str("another replica wrote the lease first"),
            AttemptError::Api(error) => write!(f, "{error}"),
            AttemptError::TimedOut => f.write_str("the API server did not answer in time"),
        }
    }
}

/// `base` stretched by a random factor in `[1, 1.2)`.
fn jitter(base: Duration) -> Duration {
    let random = RandomState::new().hash_one(std::time::SystemTime::now());
    // Three decimal digits of randomness are plenty.
    let fraction = (random % 1000) as f64 / 1000.0;
    base.mul_f64(1.0 + (JITTER - 1.0) * fraction)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_settings_are_client_go_timings_and_valid() {
        let settings = LeaseSettings::new("pod-a");
        assert_eq!(settings.namespace, "trellis-system");
        assert_eq!(settings.name, "trellis-controller");
        assert_eq!(settings.lease_seconds(), 15);
        assert_eq!(settings.validate(), Ok(()));
    }

    #[test]
    fn settings_that_allow_two_leaders_are_refused() {
        let ok = LeaseSettings::new("pod-a");
        let cases = [
            LeaseSettings {
                identity: String::new(),
                ..ok.clone()
            },
            LeaseSettings {
                renew_deadline: ok.lease_duration,
                ..ok.clone()
            },
            LeaseSettings {
                retry_period: Duration::from_secs(9),
                ..ok.clone()
            },
            LeaseSettings {
                retry_period: Duration::ZERO,
                ..ok.clone()
            },
            LeaseSettings {
                lease_duration: Duration::from_millis(900),
                renew_deadline: Duration::from_millis(500),
                retry_period: Duration::from_millis(100),
                ..ok
            },
        ];
        for case in cases {
            assert!(case.validate().is_err(), "accepted {case:?}");
        }
    }

    #[test]
    fn lease_seconds_round_up() {
        let settings = LeaseSettings {
            lease_duration: Duration::from_millis(1500),
            ..LeaseSettings::new("pod-a")
        };
        assert_eq!(settings.lease_seconds(), 2);
    }

    #[test]
    fn jitter_stays_within_a_fifth_above() {
        let base = Duration::from_millis(1000);
        for _ in 0..100 {
            let j = jitter(base);
            assert!(j >= base && j < base.mul_f64(JITTER), "{j:?}");
        }
    }

    #[test]
    fn a_closed_channel_is_not_leader() {
        let (tx, rx) = watch::channel(true);
        assert!(is_leader(&rx));
        drop(tx);
        assert!(!is_leader(&rx));
    }
}
