//! Kubernetes Events about the mesh ConfigMap, written by the leader only.
//!
//! Why: the admission webhook keeps most bad ConfigMaps out, but one can still get in (the
//! webhook was down, or an older controller accepted it). The app then keeps its last good
//! config and calls [`ConfigEvents::rejected`] with the parse error, which names the field;
//! the operator sees it in `kubectl describe configmap trellis-config` as a `Warning`
//! `InvalidConfig` Event. When a valid config is applied after that,
//! [`ConfigEvents::applied`] records a `Normal` `ConfigApplied` Event.
//!
//! - Only the replica holding the Lease writes (see [`crate::leader`]): every replica
//!   watches the same ConfigMap and would otherwise repeat every Event. Leadership is read
//!   both when the app calls and again just before the write.
//! - An identical rejection (same note) is written at most once per repeat window (5 min);
//!   an applied config ends the window, so the same mistake made again is reported again.
//! - Events are `events.k8s.io/v1`, built by kube-runtime's `Recorder` (reporting
//!   controller `trellis.dev/controller`, reporting instance the pod name), regarding the
//!   ConfigMap with its UID (read by a LIST on its name; without it `kubectl describe`
//!   would not show the Event). A fresh `Recorder` per Event: its series aggregation keys
//!   on reason and object but not on the note, so a *different* rejection would be patched
//!   into the old Event and keep the old note.
//! - Notes are cut to Kubernetes' 1 KiB limit.
//! - The caller never waits for the API: calls enqueue on a bounded channel and a task
//!   writes. A full queue or a failed write is logged and counted in
//!   `trellis_kube_event_write_errors_total`; a failed rejection is not remembered, so the
//!   next identical one is written.
//!
//! RBAC: `create` on `events` (`events.k8s.io`) in the ConfigMap's namespace, plus the
//! `list` on ConfigMaps there that the source already has.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::leader::is_leader;
use crate::source::{DEFAULT_CONFIG_NAME, DEFAULT_CONFIG_NAMESPACE};

/// `reason` of the Event for a ConfigMap that was rejected.
pub const REASON_INVALID_CONFIG: &str = "InvalidConfig";
/// `reason` of the Event for a valid config applied after a rejection.
pub const REASON_CONFIG_APPLIED: &str = "ConfigApplied";
/// `action` of both Events.
pub const ACTION_LOAD_CONFIG: &str = "LoadConfig";
/// `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "trellis.dev/controller";
/// Kubernetes' limit on an Event's note, in bytes.
pub const NOTE_LIMIT: usize = 1024;
/// Default interval within which an identical rejection is not written again.
pub const DEFAULT_REPEAT_WINDOW: Duration = Duration::from_secs(5 * 60);

/// Events queued and not yet written; beyond this, new ones are dropped (and counted).
const QUEUE: usize = 32;
/// Bound on the ConfigMap lookup and on the write of one Event.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Which ConfigMap the Events regard, and who reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSettings {
    /// Namespace of the mesh ConfigMap; the Events are created there.
    pub config_namespace: String,
    /// Name of the mesh ConfigMap.
    pub config_name: String,
    /// `reportingInstance`: this replica's pod name (the Lease identity).
    pub instance: String,
    /// An identical rejection is not written again within this interval.
    pub repeat_window: Duration,
}

/// Records the outcome of loading the mesh ConfigMap as Kubernetes Events, from the
/// leader only. Cheap to clone; the writer task ends when the last clone is dropped.
///
/// ```no_run
/// # fn demo(client: kube::Client, leader: tokio::sync::watch::Receiver<bool>) {
/// use trellis_kube::events::{ConfigEvents, EventSettings};
///
/// // Inside a Tokio runtime; `leader` from `LeaderElector::subscribe`.
/// let settings = EventSettings::new("trellis-controller-7d9f-x2");
/// let events = ConfigEvents::new(client, settings, leader);
/// events.rejected("mesh.yaml: mtls.mode: unknown variant `strikt`");
/// events.applied("config version 4");
/// # }
/// ```
#[derive(Clone)]
pub struct ConfigEvents {
    /// `None` when there was no runtime to write from.
    tx: Option<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
}

/// What the callers and the writer task share.
struct Shared {
    leader: watch::Receiver<bool>,
    repeat_window: Duration,
    write_errors: Counter,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The last outcome was a rejection (whether or not it was written).
    rejected: bool,
    /// Rejection notes written (or queued) and when.
    recent: HashMap<String, Instant>,
}

/// One Event to write.
#[derive(Debug)]
struct Job {
    type_: EventType,
    reason: &'static str,
    note: String,
}

// === impl EventSettings ===

impl EventSettings {
    /// Events about `trellis-system/trellis-config`, reported as `instance`, repeat window
    /// 5 minutes.
    pub fn new(instance: impl Into<String>) -> Self {
        Self {
            config_namespace: DEFAULT_CONFIG_NAMESPACE.to_owned(),
            config_name: DEFAULT_CONFIG_NAME.to_owned(),
            instance: instance.into(),
            repeat_window: DEFAULT_REPEAT_WINDOW,
        }
    }
}

// === impl ConfigEvents ===

impl ConfigEvents {
    /// Starts the writer task; `leader` says whether this replica may write (from
    /// [`LeaderElector::subscribe`](crate::leader::LeaderElector::subscribe)). Call it
    /// inside a Tokio runtime: without one nothing is ever written (each Event is logged
    /// and counted as a write error).
    pub fn new(client: Client, settings: EventSettings, leader: watch::Receiver<bool>) -> Self {
        let shared = Arc::new(Shared {
            leader,
            repeat_window: settings.repeat_window,
            write_errors: Counter::default(),
            state: Mutex::new(State::default()),
        });
        let tx = match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let (tx, rx) = mpsc::channel(QUEUE);
                runtime.spawn(write(client, settings, Arc::clone(&shared), rx));
                Some(tx)
            }
            Err(error) => {
                tracing::error!(%error, "no Tokio runtime: config Events will not be written");
                None
            }
        };
        Self { tx, shared }
    }

    /// Registers `trellis_kube_event_write_errors_total`: Events that could not be
    /// written (API error, timeout, or a full queue). Once per registry.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "trellis_kube_event_write_errors",
            "Kubernetes Events that could not be written (API error, timeout or full queue)",
            self.shared.write_errors.clone(),
        );
    }

    /// The ConfigMap was rejected and the last good config kept: a `Warning`
    /// `InvalidConfig` Event whose note is `message` (which should name the field),
    /// unless this replica is not leader or wrote the same note within the repeat window.
    /// Never waits.
    pub fn rejected(&self, message: &str) {
        let note = truncate_note(message);
        {
            let mut state = self.shared.lock();
            state.rejected = true;
            if !is_leader(&self.shared.leader) {
                return;
            }
            let now = Instant::now();
            let window = self.shared.repeat_window;
            state
                .recent
                .retain(|_, at| now.duration_since(*at) < window);
            if state.recent.contains_key(&note) {
                tracing::debug!(%note, "config rejection already reported");
                return;
            }
            state.recent.insert(note.clone(), now);
        }
        self.send(Job {
            type_: EventType::Warning,
            reason: REASON_INVALID_CONFIG,
            note,
        });
    }

    /// A valid config was applied: a `Normal` `ConfigApplied` Event with note `summary`
    /// if the previous outcome was a rejection and this replica is leader. Ends the
    /// repeat window of earlier rejections. Never waits.
    pub fn applied(&self, summary: &str) {
        {
            let mut state = self.shared.lock();
            let after_rejection = std::mem::take(&mut state.rejected);
            state.recent.clear();
            if !after_rejection || !is_leader(&self.shared.leader) {
                return;
            }
        }
        self.send(Job {
            type_: EventType::Normal,
            reason: REASON_CONFIG_APPLIED,
            note: truncate_note(summary),
        });
    }

    fn send(&self, job: Job) {
        let Some(tx) = &self.tx else {
            self.shared.failed(&job, "no runtime to write from");
            return;
        };
        if let Err(error) = tx.try_send(job) {
            let (mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) =
                error;
            self.shared.failed(&job, "the Event queue is full");
        }
    }
}

// === impl Shared ===

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts and logs an Event that was not written, and forgets a rejection so that the
    /// next identical one is tried again.
    fn failed(&self, job: &Job, error: &str) {
        self.forget(job);
        self.write_errors.inc();
        tracing::warn!(reason = job.reason, note = %job.note, %error, "could not write Event");
    }

    fn forget(&self, job: &Job) {
        if job.reason == REASON_INVALID_CONFIG {
            self.lock().recent.remove(&job.note);
        }
    }
}

/// The writer task: one Event at a time, each bounded by [`REQUEST_TIMEOUT`].
async fn write(
    client: Client,
    settings: EventSettings,
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Job>,
) {
    let reporter = Reporter {
        controller: REPORTING_CONTROLLER.to_owned(),
        instance: Some(settings.instance.clone()),
    };
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &settings.config_namespace);
    while let Some(job) = rx.recv().await {
        if !is_leader(&shared.leader) {
            tracing::debug!(reason = job.reason, "not leader any more; Event dropped");
            shared.forget(&job);
            continue;
        }
        let regarding = regarding(&config_maps, &settings).await;
        let event = Event {
            type_: job.type_,
            reason: job.reason.to_owned(),
            note: Some(job.note.clone()),
            action: ACTION_LOAD_CONFIG.to_owned(),
            secondary: None,
        };
        // A fresh Recorder: see the module docs.
        let recorder = Recorder::new(client.clone(), reporter.clone());
        match tokio::time::timeout(REQUEST_TIMEOUT, recorder.publish(&event, &regarding)).await {
            Ok(Ok(())) => {
                tracing::debug!(reason = job.reason, note = %job.note, "wrote Event");
            }
            Ok(Err(error)) => shared.failed(&job, &error.to_string()),
            Err(_) => shared.failed(&job, "timed out"),
        }
    }
}

/// A reference to the ConfigMap, with its UID when it can be read (best effort: the Event
/// is still written without it).
async fn regarding(config_maps: &Api<ConfigMap>, settings: &EventSettings) -> ObjectReference {
    let params = ListParams::default().fields(&format!("metadata.name={}", settings.config_name));
    let uid = match tokio::time::timeout(REQUEST_TIMEOUT, config_maps.list(&params)).await {
        Ok(Ok(list)) => list.items.into_iter().find_map(|cm| cm.metadata.uid),
        Ok(Err(error)) => {
            tracing::debug!(%error, "could not read the ConfigMap's uid");
            None
        }
        Err(_) => None,
    };
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("ConfigMap".to_owned()),
        namespace: Some(settings.config_namespace.clone()),
        name: Some(settings.config_name.clone()),
        uid,
        ..ObjectReference::default()
    }
}

/// `note` cut to at most [`NOTE_LIMIT`] bytes on a character boundary, ending in `...`
/// when cut.
fn truncate_note(note: &str) -> String {
    if note.len() <= NOTE_LIMIT {
        return note.to_owned();
    }
    const MARK: &str = "...";
    let mut end = NOTE_LIMIT - MARK.len();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_notes_are_kept_whole() {
        let note = "x".repeat(NOTE_LIMIT);
        assert_eq!(truncate_note(&note), note);
        assert_eq!(truncate_note("mtls.mode: bad"), "mtls.mode: bad");
    }

    #[test]
    fn long_notes_are_cut_to_the_limit_on_a_char_boundary() {
        let note = format!("mtls.mode: {}", "é".repeat(2000));
        let cut = truncate_note(&note);
        assert!(cut.len() <= NOTE_LIMIT, "{}", cut.len());
        assert!(cut.len() >= NOTE_LIMIT - 4, "{}", cut.len());
        assert!(cut.starts_with("mtls.mode: éé") && cut.ends_with("é..."));
    }
}
