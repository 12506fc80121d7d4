//! The file source: a directory polled for changes, publishing versioned snapshots.
//!
//! There is no inotify dependency: every poll reads the YAML files and compares a digest
//! of their names and contents with the last one loaded, so only a real change is parsed.
//! A change that does not load keeps the last good snapshot in place (the proxies keep
//! running on it), logs the full error and records it in [`SourceStatus`]. A change that
//! loads bumps the version by one, but only if the translated snapshot differs: editing
//! a comment publishes nothing.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use trellis_api::MeshSnapshot;
use trellis_identity::SpiffeId;

use crate::error::ConfigError;
use crate::files::{self, DirContents};
use crate::metrics::Metrics;
use crate::objects::Objects;
use crate::translate::translate;

/// A directory of YAML as a source of mesh snapshots.
///
/// ```no_run
/// # async fn demo() -> Result<(), trellis_controller::ConfigError> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tokio::sync::{oneshot, watch};
/// use trellis_controller::{FileSource, SourceStatus};
///
/// let source = FileSource::new("/etc/trellis/mesh", "cluster.local", Duration::from_secs(1));
/// let (tx, snapshots) = watch::channel(Arc::new(source.load_initial()?));
/// let (status_tx, status) = watch::channel(SourceStatus::default());
/// let (stop, stopped) = oneshot::channel::<()>();
/// tokio::spawn(source.run(tx, status_tx, async move { stopped.await.ok(); }));
/// // ... serve `snapshots`, report `status.borrow().last_error` ...
/// # drop((snapshots, status, stop));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    trust_domain: String,
    poll_interval: Duration,
    metrics: Option<Metrics>,
    /// Digest of the directory contents behind the snapshot `load_initial` returned, so
    /// that `run` does not reload (and count) a directory that has not changed since.
    loaded_digest: Mutex<Option<u64>>,
}

/// What the source has done so far; read it through the `watch::Receiver` whose sender
/// was given to [`FileSource::run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStatus {
    /// The error of the latest reload if it failed (one line per problem); cleared by the
    /// next successful reload.
    pub last_error: Option<String>,
    /// Version of the snapshot being served.
    pub last_good_version: u64,
    /// Directory changes that loaded (whether or not the snapshot changed).
    pub reloads_ok: u64,
    /// Directory changes refused; each kept the previous snapshot.
    pub reloads_failed: u64,
}

// === impl FileSource ===

impl FileSource {
    /// A source reading `dir`, issuing identities in `trust_domain`, polling every
    /// `poll_interval`. Nothing is read until [`load_initial`](Self::load_initial) or
    /// [`run`](Self::run).
    pub fn new(
        dir: impl Into<PathBuf>,
        trust_domain: impl Into<String>,
        poll_interval: Duration,
    ) -> Self {
        Self {
            dir: dir.into(),
            trust_domain: trust_domain.into(),
            poll_interval,
            metrics: None,
            loaded_digest: Mutex::new(None),
        }
    }

    /// Records reloads and the served version in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The directory being read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads the directory as snapshot version 1.
    ///
    /// Blocking file I/O: call it at startup, before serving. A process should exit with
    /// [`ConfigError::exit_code`] when this fails.
    pub fn load_initial(&self) -> Result<MeshSnapshot, ConfigError> {
        let contents = files::read_dir(&self.dir);
        let snapshot = self.snapshot(&contents.parse()?, 1)?;
        *self
            .loaded_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(contents.digest);
        if let Some(metrics) = &self.metrics {
            metrics.set_version(1);
        }
        tracing::info!(
            dir = %self.dir.display(),
            services = snapshot.services.len(),
            policies = snapshot.authorization.len(),
            routes = snapshot.routes.len(),
            "loaded mesh snapshot version 1"
        );
        Ok(snapshot)
    }

    /// Polls the directory until stopped, publishing each changed snapshot on `tx`.
    ///
    /// `run` must be the only writer of `tx`: new versions continue from the version
    /// already in it (normally the one from [`load_initial`](Self::load_initial); if that
    /// was not called, the first poll loads the directory and publishes if it differs).
    /// Progress and errors are written to `status`.
    ///
    /// Stops when `shutdown` completes (pass e.g. a `oneshot::Receiver` or a cancellation
    /// token's `cancelled()` future) or when every receiver of `tx` has been dropped,
    /// since then nobody is left to serve.
    pub async fn run(
        self,
        tx: watch::Sender<Arc<MeshSnapshot>>,
        status: watch::Sender<SourceStatus>,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut digest = *self
            .loaded_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let version = tx.borrow().version;
        status.send_modify(|s| s.last_good_version = version);
        let mut ticker = tokio::time::interval(self.poll_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => {
                    tracing::debug!(dir = %self.dir.display(), "file source stopping: shutdown");
                    return;
                }
                () = tx.closed() => {
                    tracing::debug!(dir = %self.dir.display(), "file source stopping: no receivers");
                    return;
                }
                _ = ticker.tick() => {}
            }
            self.poll(&mut digest, &tx, &status).await;
        }
    }

    /// One poll: reads the directory off the runtime and reloads if it changed.
    async fn poll(
        &self,
        digest: &mut Option<u64>,
        tx: &watch::Sender<Arc<MeshSnapshot>>,
        status: &watch::Sender<SourceStatus>,
    ) {
        let dir = self.dir.clone();
        let previous = *digest;
        let scanned = tokio::task::spawn_blocking(move || {
            let contents: DirContents = files::read_dir(&dir);
            let changed = previous != Some(contents.digest);
            (contents.digest, changed.then(|| contents.parse()))
        })
        .await;
        let (new_digest, loaded) = match scanned {
            Ok((_, None)) => return,
            Ok((new_digest, Some(loaded))) => (new_digest, loaded),
            // Digest left as it was, so the next poll retries.
            Err(e) => return self.failed(status, format!("directory scan failed: {e}")),
        };
        *digest = Some(new_digest);
        let current = Arc::clone(&tx.borrow());
        let next_version = current.version.saturating_add(1);
        match loaded.and_then(|objects| self.snapshot(&objects, next_version)) {
            Ok(next) => {
                let changed = next.services != current.services
                    || next.authorization != current.authorization
                    || next.routes != current.routes
                    || next.trust_domain != current.trust_domain;
                let version = if changed {
                    tx.send_replace(Arc::new(next));
                    tracing::info!(
                        dir = %self.dir.display(),
                        version = next_version,
                        "published mesh snapshot"
                    );
                    next_version
                } else {
                    tracing::debug!(dir = %self.dir.display(), "directory changed, snapshot did not");
                    current.version
                };
                status.send_modify(|s| {
                    s.last_error = None;
                    s.last_good_version = version;
                    s.reloads_ok += 1;
                });
                if let Some(metrics) = &self.metrics {
                    metrics.reload_ok();
                    metrics.set_version(version);
                }
            }
            Err(error) => self.failed(status, error.to_string()),
        }
    }

    fn failed(&self, status: &watch::Sender<SourceStatus>, error: String) {
        let kept = status.borrow().last_good_version;
        tracing::error!(
            dir = %self.dir.display(),
            kept_version = kept,
            %error,
            "mesh directory not loaded; keeping the last good snapshot"
        );
        status.send_modify(|s| {
            s.last_error = Some(error);
            s.reloads_failed += 1;
        });
        if let Some(metrics) = &self.metrics {
            metrics.reload_failed();
        }
    }

    /// Translates `objects`, refusing a trust domain no identity can be issued in (which
    /// would otherwise silently drop every endpoint).
    fn snapshot(&self, objects: &Objects, version: u64) -> Result<MeshSnapshot, ConfigError> {
        if let Err(e) = SpiffeId::new(&self.trust_domain, "default", "default") {
            return Err(ConfigError::single(
                &self.dir,
                format!("cannot issue identities: {e}"),
            ));
        }
        Ok(translate(objects, &self.trust_domain, version))
    }
}
