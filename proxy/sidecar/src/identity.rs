//! This workload's certificate: CSR to the control plane's CA, then renewal at 70% of
//! the lifetime. Publishes the current [`Certified`] on a watch channel; listeners read
//! it per connection so a rotation applies to new connections at once.
//!
//! The private key is generated here and never leaves the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};
use trellis_api::identity::v1::{CertifyRequest, identity_client::IdentityClient};
use trellis_identity::{ClientAuth, SpiffeId, Svid, TrustBundle};

use crate::config::Config;
use crate::metrics::Metrics;

/// ALPN for proxy-to-proxy and proxy-to-control-plane connections: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// A certified key with the TLS configurations built from it.
pub struct Certified {
    /// Our certificate chain and key.
    pub svid: Svid,
    /// Roots peers are verified against.
    pub bundle: TrustBundle,
    /// Inbound mTLS server configuration (client certificate required).
    pub server: Arc<rustls::ServerConfig>,
    clients: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the token or roots file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Building TLS material failed.
    #[error(transparent)]
    Tls(#[from] trellis_identity::Error),
    /// Talking to the CA failed.
    #[error("connecting to the CA: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The CA refused.
    #[error("the CA refused: {0}")]
    Refused(#[from] tonic::Status),
    /// The CA issued an identity other than the one we expect.
    #[error("the CA issued {got}, expected {expected}")]
    WrongIdentity {
        /// What we got.
        got: SpiffeId,
        /// What the config says we are.
        expected: SpiffeId,
    },
}

// === impl Certified ===

impl Certified {
    /// Builds the TLS configurations for a fresh certificate.
    pub fn new(svid: Svid, bundle: TrustBundle) -> Result<Self, trellis_identity::Error> {
        let server =
            trellis_identity::server_config(&svid, &bundle, ClientAuth::Required, &[ALPN_H2])?;
        Ok(Self {
            svid,
            bundle,
            server,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// A client configuration that presents our certificate and requires the server to
    /// be exactly `peer`. Cached per peer identity.
    pub fn client_config(
        &self,
        peer: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, trellis_identity::Error> {
        let mut cache = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(peer) {
            return Ok(c.clone());
        }
        let c = trellis_identity::client_config(Some(&self.svid), &self.bundle, peer, &[ALPN_H2])?;
        cache.insert(peer.clone(), c.clone());
        Ok(c)
    }
}

impl std::fmt::Debug for Certified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certified")
            .field("id", self.svid.id())
            .finish_non_exhaustive()
    }
}

/// Requests one certificate from the CA.
pub async fn certify(cfg: &Config, bootstrap: &TrustBundle) -> Result<Certified, Error> {
    let token = tokio::fs::read_to_string(&cfg.token_file)
        .await
        .map_err(|source| Error::Read {
            path: cfg.token_file.display().to_string(),
            source,
        })?;
    let csr = trellis_identity::generate_csr(&cfg.identity)?;
    let tls =
        trellis_identity::client_config(None, bootstrap, &cfg.control_plane_identity, &[ALPN_H2])?;
    let channel = crate::control::connect(cfg.control_plane, tls).await?;
    let resp = IdentityClient::new(channel)
        .certify(CertifyRequest {
            csr_der: csr.csr_der,
            token: token.trim().to_owned(),
            requested_ttl_seconds: u32::try_from(cfg.cert_ttl.as_secs()).unwrap_or(u32::MAX),
        })
        .await?
        .into_inner();
    let chain = resp
        .chain_der
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    let svid = Svid::new(chain, csr.key)?;
    if svid.id() != &cfg.identity {
        return Err(Error::WrongIdentity {
            got: svid.id().clone(),
            expected: cfg.identity.clone(),
        });
    }
    let bundle = TrustBundle::from_der(resp.trust_bundle_der)?;
    Ok(Certified::new(svid, bundle)?)
}

/// When to renew: at 70% of the certificate's lifetime.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life.mul_f64(0.7)
}

/// Keeps a valid certificate published: renews at 70% of its lifetime, retrying with
/// backoff on failure. Runs until the receivers are gone.
pub async fn run(
    cfg: Arc<Config>,
    bootstrap: TrustBundle,
    tx: watch::Sender<Option<Arc<Certified>>>,
    metrics: Metrics,
) {
    let mut backoff = Backoff::new();
    loop {
        match certify(&cfg, &bootstrap).await {
            Ok(c) => {
                backoff.reset();
                let not_after = c.svid.not_after();
                let unix = not_after
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                metrics
                    .cert_expiry
                    .set(i64::try_from(unix.as_secs()).unwrap_or(i64::MAX));
                info!(identity = %c.svid.id(), not_after = unix.as_secs(), "certificate issued");
                let next = renew_at(c.svid.not_before(), not_after);
                if tx.send(Some(Arc::new(c))).is_err() {
                    return;
                }
                let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
                tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
            }
            Err(error) => {
                let wait = backoff.next_wait();
                warn!(%error, retry_in_ms = wait.as_millis() as u64, "certificate request failed");
                tokio::time::sleep(wait).await;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// Exponential backoff with jitter, 100 ms doubling up to 10 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

// === impl Backoff ===

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    /// Starts at the minimum.
    pub fn new() -> Self {
        Self { next: Self::MIN }
    }

    /// Back to the minimum after a success.
    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// The next wait: the current step plus up to 50% jitter, then the step doubles.
    pub fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base + base.mul_f64(rand::random::<f64>() * 0.5)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_seventy_percent() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let na = nb + Duration::from_secs(100);
        assert_eq!(renew_at(nb, na), nb + Duration::from_secs(70));
        // A certificate that ends before it starts renews immediately.
        assert_eq!(renew_at(na, nb), na);
    }

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_wait();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(150));
        for _ in 0..20 {
            assert!(b.next_wait() <= Duration::from_secs(15));
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(150));
    }
}
