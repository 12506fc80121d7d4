//! CA sources and the loop that keeps the CA in step with one.
//!
//! A source yields the Istio `cacerts` layout ([`CaPems`]); [`run`] re-reads it on an
//! interval, validates it ([`CaMaterial::from_pems`]) and drives a change through the
//! CA's three steps: stage (new roots join the bundle), activate after `propagation`
//! (the new CA signs, proxies re-issue), retire (old roots leave once their leaves have
//! expired). A source that fails or yields bad material changes nothing: the CA keeps
//! signing with what it has, and the failure is logged and counted.
//!
//! Sources here: [`DirSource`] (a directory in the `cacerts` layout: a mounted Kubernetes
//! Secret on a cluster). Key Vault sources live in `trellis-azure` and implement
//! [`CaSource`] there, so this crate never depends on Azure.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::pems::{CA_CERT_PEM, CA_KEY_PEM, CERT_CHAIN_PEM, ROOT_CERT_PEM};
use crate::{CaMaterial, CaPems, CertificateAuthority, Staged};

/// Why a source could not produce material (the message names the source and object).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Somewhere CA material comes from.
pub trait CaSource: Send + Sync {
    /// Names the source in logs and errors (`secret /etc/cacerts`, `keyvault-secret https://…`).
    fn label(&self) -> String;
    /// Reads the material as it is now.
    fn load(&self) -> BoxFuture<'_, Result<CaPems, SourceError>>;
}

/// A directory in the Istio `cacerts` layout (`root-cert.pem`, `ca-cert.pem`,
/// `ca-key.pem`, optional `cert-chain.pem`): on Kubernetes, the mounted `cacerts`
/// Secret, whose files the kubelet updates in place when the Secret changes.
#[derive(Debug, Clone)]
pub struct DirSource {
    dir: PathBuf,
}

/// How often a source is re-read and how long new roots propagate before use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// How often the source is read.
    pub reload_interval: Duration,
    /// How long a new CA's roots are pushed to proxies before that CA signs. Discovery
    /// pushes reach connected proxies in milliseconds; the wait covers slow ones. A proxy
    /// that reconnects later gets the bundle with its first full view.
    pub propagation: Duration,
}

/// The CA's source and trust metrics.
#[derive(Debug, Clone, Default)]
pub struct SourceMetrics {
    load_failures: Counter,
    changes: Counter,
    generation: Gauge,
    roots: Gauge,
    expiry: Gauge,
}

// === impl DirSource ===

impl DirSource {
    /// A source reading `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

impl CaSource for DirSource {
    fn label(&self) -> String {
        format!("secret {}", self.dir.display())
    }

    fn load(&self) -> BoxFuture<'_, Result<CaPems, SourceError>> {
        Box::pin(async move {
            let read = |name: &'static str, required: bool| {
                let path = self.dir.join(name);
                async move {
                    match tokio::fs::read_to_string(&path).await {
                        Ok(s) => Ok(s),
                        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                            Ok(String::new())
                        }
                        Err(e) => Err(SourceError(format!("reading {}: {e}", path.display()))),
                    }
                }
            };
            Ok(CaPems {
                root_cert: read(ROOT_CERT_PEM, true).await?,
                ca_cert: read(CA_CERT_PEM, true).await?,
                ca_key: read(CA_KEY_PEM, true).await?,
                cert_chain: read(CERT_CHAIN_PEM, false).await?,
            })
        })
    }
}

// === impl RotationPolicy ===

impl Default for RotationPolicy {
    fn default() -> Self {
        Self {
            reload_interval: Duration::from_secs(60),
            propagation: Duration::from_secs(15),
        }
    }
}

// === impl SourceMetrics ===

impl SourceMetrics {
    /// Registers `trellis_ca_source_load_failures_total`, `trellis_ca_changes_total`,
    /// `trellis_ca_generation`, `trellis_ca_trust_roots` and
    /// `trellis_ca_signing_expiry_timestamp_seconds`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "trellis_ca_source_load_failures",
            "CA source reads or validations that failed (the CA kept its material)",
            m.load_failures.clone(),
        );
        registry.register(
            "trellis_ca_changes",
            "Changes of CA material staged (new roots or a new issuing CA)",
            m.changes.clone(),
        );
        registry.register(
            "trellis_ca_generation",
            "Generation of the signing CA; proxies re-issue when it goes up",
            m.generation.clone(),
        );
        registry.register(
            "trellis_ca_trust_roots",
            "Roots in the trust bundle pushed to proxies",
            m.roots.clone(),
        );
        registry.register(
            "trellis_ca_signing_expiry_timestamp_seconds",
            "When the signing CA (or a certificate on its path to the root) expires, Unix seconds",
            m.expiry.clone(),
        );
        m
    }

    /// Source failures so far.
    pub fn load_failures(&self) -> u64 {
        self.load_failures.get()
    }

    fn observe(&self, ca: &CertificateAuthority) {
        let trust = ca.trust();
        self.generation
            .set(i64::try_from(trust.generation).unwrap_or(i64::MAX));
        self.roots
            .set(i64::try_from(trust.roots_der.len()).unwrap_or(i64::MAX));
        let expiry = ca
            .root_not_after()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.expiry
            .set(i64::try_from(expiry.as_secs()).unwrap_or(i64::MAX));
    }
}

/// Reads `source` into `ca` now, returning what the CA did with it.
pub async fn load_once(
    ca: &CertificateAuthority,
    source: &dyn CaSource,
    metrics: &SourceMetrics,
) -> Result<Staged, SourceError> {
    let label = source.label();
    let result = match source.load().await {
        Ok(pems) => CaMaterial::from_pems(&pems, ca.trust_domain(), &label)
            .map_err(|e| SourceError(e.to_string())),
        Err(e) => Err(e),
    };
    match result {
        Ok(material) => {
            let staged = ca.stage(material);
            if staged != Staged::Unchanged {
                metrics.changes.inc();
                info!(source = %label, outcome = ?staged, "CA source changed");
            }
            metrics.observe(ca);
            Ok(staged)
        }
        Err(e) => {
            metrics.load_failures.inc();
            warn!(source = %label, error = %e, "CA source unusable; keeping the current CA");
            Err(e)
        }
    }
}

/// Keeps `ca` in step with `source` until `shutdown` resolves (see the module docs).
pub async fn run(
    ca: Arc<CertificateAuthority>,
    source: Arc<dyn CaSource>,
    policy: RotationPolicy,
    metrics: SourceMetrics,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut next_load = Instant::now();
    let mut activate_at: Option<Instant> = None;
    loop {
        let retire_at = ca
            .next_retirement()
            .map(|t| Instant::now() + t.duration_since(SystemTime::now()).unwrap_or_default());
        let wake = [Some(next_load), activate_at, retire_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_load);
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep_until(wake) => {}
        }
        let now = Instant::now();
        if now >= next_load {
            next_load = now + policy.reload_interval;
            if let Ok(Staged::Pending) = load_once(&ca, source.as_ref(), &metrics).await {
                activate_at = Some(now + policy.propagation);
            }
        }
        if activate_at.is_some_and(|t| Instant::now() >= t) {
            activate_at = None;
            ca.activate(SystemTime::now());
        }
        ca.retire_expired(SystemTime::now());
        metrics.observe(&ca);
    }
}

/// Writes `pems` into `dir` in the `cacerts` layout (the key 0600), for `trellis ca`
/// and tests that stand in for a mounted Secret.
pub fn write_dir(dir: &Path, pems: &CaPems) -> std::io::Result<()> {
    crate::fs::ensure_dir(dir)?;
    let files = [
        (CA_KEY_PEM, &pems.ca_key, crate::fs::KEY_MODE),
        (ROOT_CERT_PEM, &pems.root_cert, crate::fs::PUBLIC_MODE),
        (CA_CERT_PEM, &pems.ca_cert, crate::fs::PUBLIC_MODE),
        (CERT_CHAIN_PEM, &pems.cert_chain, crate::fs::PUBLIC_MODE),
    ];
    for (name, contents, mode) in files {
        crate::fs::write_atomic(&dir.join(name), contents.as_bytes(), mode)?;
    }
    Ok(())
}

/// The local profile's self-signed root in the state directory (generated there on
/// first use), offered as a source so a mesh can switch back to it like to any other.
#[derive(Debug, Clone)]
pub struct SelfSignedSource {
    dir: PathBuf,
    trust_domain: String,
}

impl SelfSignedSource {
    /// The root in `dir` for `trust_domain`.
    pub fn new(dir: impl Into<PathBuf>, trust_domain: &str) -> Self {
        Self {
            dir: dir.into(),
            trust_domain: trust_domain.to_owned(),
        }
    }
}

impl CaSource for SelfSignedSource {
    fn label(&self) -> String {
        format!("self-signed {}", self.dir.display())
    }

    fn load(&self) -> BoxFuture<'_, Result<CaPems, SourceError>> {
        Box::pin(async move {
            // Generates the root on first use, and validates an existing one.
            crate::load_or_generate_self_signed(&self.dir, &self.trust_domain)
                .map_err(|e| SourceError(e.to_string()))?;
            let read = |name: &str| {
                let path = self.dir.join(name);
                std::fs::read_to_string(&path)
                    .map_err(|e| SourceError(format!("reading {}: {e}", path.display())))
            };
            let root = read(crate::ROOT_CERT_FILE)?;
            Ok(CaPems {
                root_cert: root.clone(),
                ca_cert: root,
                ca_key: read(crate::ROOT_KEY_FILE)?,
                cert_chain: String::new(),
            })
        })
    }
}
