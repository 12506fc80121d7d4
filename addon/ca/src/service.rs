//! The `trellis.identity.v1.Identity` gRPC service: token in, certificate out.
//!
//! Order matters: the token is verified before the CSR is even parsed, so an
//! unauthenticated caller can only make the CA do bounded JWT work, and the identity
//! in the leaf comes from the token alone. Then the caller's identity is rate-limited
//! (one token bucket per SPIFFE id, [`RateLimit`]), and only then is the CSR parsed,
//! checked against the identity (`csr.rs`) and signed.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use trellis_api::identity::v1::identity_server::{Identity, IdentityServer};
use trellis_api::identity::v1::{CertifyRequest, CertifyResponse};
use trellis_identity::SpiffeId;

use crate::rate::Limiter;
use crate::{CertificateAuthority, Error, MAX_TOKEN_LEN, RateLimit, TokenError, TokenVerifier};

/// The largest request the server decodes. A CSR is capped at 16 KiB and a token at
/// 8 KiB; anything bigger is refused before protobuf decoding allocates for it.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// The CA's gRPC service.
pub struct IdentityService {
    ca: Arc<CertificateAuthority>,
    verifier: Arc<dyn TokenVerifier>,
    limiter: Limiter,
    metrics: Metrics,
}

/// The CA's Prometheus metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    issued: Counter,
    failed: Family<FailureLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: Reason,
}

/// Why a request failed, as a bounded label set.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum Reason {
    /// The token was refused.
    Unauthenticated,
    /// The token verifier could not be reached.
    VerifierUnavailable,
    /// The caller's identity cannot be certified by this CA.
    Identity,
    /// The CSR was refused.
    InvalidCsr,
    /// The CSR asked for something a leaf never carries (CA:TRUE, a DNS name, ...).
    CsrPolicy,
    /// The caller's identity has spent its request budget.
    RateLimited,
    /// The CA itself failed (expired root, signing error).
    Internal,
}

// === impl IdentityService ===

impl IdentityService {
    /// A service issuing from `ca` to callers proven by `verifier`, with the default
    /// per-identity [`RateLimit`].
    pub fn new(
        ca: Arc<CertificateAuthority>,
        verifier: Arc<dyn TokenVerifier>,
        metrics: Metrics,
    ) -> Self {
        Self {
            ca,
            verifier,
            limiter: Limiter::new(RateLimit::default()),
            metrics,
        }
    }

    /// Replaces the per-identity rate limit.
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.limiter = Limiter::new(limit);
        self
    }

    /// The tonic server, with decoding capped at [`MAX_MESSAGE_LEN`].
    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self).max_decoding_message_size(MAX_MESSAGE_LEN)
    }

    fn refuse(&self, reason: Reason, status: Status) -> Status {
        self.metrics
            .failed
            .get_or_create(&FailureLabels { reason })
            .inc();
        status
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let req = request.into_inner();
        // Checked here as well as in JwksVerifier, so that any verifier (a TokenReview
        // call, say) is spared oversized input.
        if req.token.len() > MAX_TOKEN_LEN {
            let e = TokenError::TooLong { max: MAX_TOKEN_LEN };
            warn!(reason = "unauthenticated", error = %e, "certificate request refused");
            return Err(self.refuse(
                Reason::Unauthenticated,
                Status::unauthenticated(e.to_string()),
            ));
        }
        let caller = match self.verifier.verify(&req.token).await {
            Ok(caller) => caller,
            Err(e) => {
                let (reason, status) = match &e {
                    TokenError::Unavailable(_) => (
                        Reason::VerifierUnavailable,
                        Status::unavailable("token verifier unavailable"),
                    ),
                    e => (
                        Reason::Unauthenticated,
                        Status::unauthenticated(e.to_string()),
                    ),
                };
                warn!(reason = reason.as_str(), error = %e, "certificate request refused");
                return Err(self.refuse(reason, status));
            }
        };
        let identity = SpiffeId::new(
            self.ca.trust_domain(),
            &caller.namespace,
            &caller.service_account,
        )
        .map_err(|e| {
            warn!(reason = "identity", error = %e, "certificate request refused");
            self.refuse(Reason::Identity, Status::permission_denied(e.to_string()))
        })?;
        // Per identity, after the token (so a caller spends only its own budget) and before
        // the CSR is parsed (so the budget bounds the CSR work too). A refused request
        // takes nothing from the bucket: the proxy retries with backoff while its old
        // certificate serves, and gets through as soon as the bucket refills.
        if let Err(limited) = self
            .limiter
            .check(identity.as_str(), tokio::time::Instant::now())
        {
            let limit = self.limiter.limit();
            let message = format!(
                "certificate request rate limit exceeded for {identity} (burst {}, {} per second); retry in {} ms",
                limit.burst(),
                limit.per_second(),
                limited.retry_after.as_millis().max(1)
            );
            // Only the first refusal of a run is logged; the metric counts them all.
            if limited.first {
                warn!(%identity, reason = Reason::RateLimited.as_str(), "certificate request refused; further refusals for this identity are only counted until one succeeds");
            }
            return Err(self.refuse(Reason::RateLimited, Status::resource_exhausted(message)));
        }
        let requested_ttl = (req.requested_ttl_seconds > 0)
            .then(|| Duration::from_secs(u64::from(req.requested_ttl_seconds)));
        let (issued, ca_generation) = self.ca.sign_with_generation(&req.csr_der, &identity, requested_ttl).map_err(|e| {
            let (reason, status) = status_for(&e);
            warn!(%identity, reason = reason.as_str(), error = %e, "certificate request refused");
            self.refuse(reason, status)
        })?;
        let not_after_unix = issued
            .not_after
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok())
            .unwrap_or(0);
        self.metrics.issued.inc();
        info!(%identity, serial = %issued.serial, not_after = not_after_unix, "issued certificate");
        Ok(Response::new(CertifyResponse {
            chain_der: issued.chain_der,
            trust_bundle_der: self.ca.trust_bundle_der(),
            identity: identity.to_string(),
            not_after_unix,
            ca_generation,
        }))
    }
}

impl fmt::Debug for IdentityService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityService")
            .field("ca", &self.ca)
            .field("rate_limit", &self.limiter.limit())
            .finish_non_exhaustive()
    }
}

/// The gRPC status for a signing failure: the caller's fault is `INVALID_ARGUMENT` with
/// the reason; the CA's own failures are reported without internals.
fn status_for(e: &Error) -> (Reason, Status) {
    match e {
        Error::CsrTooLarge { .. }
        | Error::CsrMalformed(_)
        | Error::CsrSignature
        | Error::CsrKeyType(_) => (Reason::InvalidCsr, Status::invalid_argument(e.to_string())),
        Error::CsrPolicy(_) => (Reason::CsrPolicy, Status::invalid_argument(e.to_string())),
        Error::ForeignIdentity { .. } | Error::CsrIdentity { .. } => {
            (Reason::Identity, Status::permission_denied(e.to_string()))
        }
        Error::RootExpired { .. } => (
            Reason::Internal,
            Status::failed_precondition("CA root has expired"),
        ),
        _ => (
            Reason::Internal,
            Status::internal("certificate signing failed"),
        ),
    }
}

// === impl Metrics ===

impl Metrics {
    /// Creates the metrics and registers them: `trellis_ca_certificates_issued_total` and
    /// `trellis_ca_requests_failed_total{reason}`, where reason is one of
    /// `unauthenticated`, `verifier_unavailable`, `identity`, `invalid_csr`, `csr_policy`,
    /// `rate_limited`, `internal`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "trellis_ca_certificates_issued",
            "Leaf certificates issued",
            metrics.issued.clone(),
        );
        registry.register(
            "trellis_ca_requests_failed",
            "Certificate requests refused, by reason",
            metrics.failed.clone(),
        );
        // Every reason from the start, at 0: a series that appears only with its first
        // failure breaks `rate()` and "no failures" alerts.
        for reason in [
            Reason::Unauthenticated,
            Reason::VerifierUnavailable,
            Reason::Identity,
            Reason::InvalidCsr,
            Reason::CsrPolicy,
            Reason::RateLimited,
            Reason::Internal,
        ] {
            let _ = metrics.failed.get_or_create(&FailureLabels { reason });
        }
        metrics
    }

    /// Certificates issued so far.
    pub fn issued(&self) -> u64 {
        self.issued.get()
    }
}

// === impl Reason ===

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::VerifierUnavailable => "verifier_unavailable",
            Self::Identity => "identity",
            Self::InvalidCsr => "invalid_csr",
            Self::CsrPolicy => "csr_policy",
            Self::RateLimited => "rate_limited",
            Self::Internal => "internal",
        }
    }
}

impl EncodeLabelValue for Reason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_their_names() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.issued.inc();
        metrics
            .failed
            .get_or_create(&FailureLabels {
                reason: Reason::InvalidCsr,
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("trellis_ca_certificates_issued_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"trellis_ca_requests_failed_total{reason="invalid_csr"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn csr_errors_are_invalid_argument_and_internals_are_hidden() {
        let (_, s) = status_for(&Error::CsrSignature);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let (r, s) = status_for(&Error::CsrPolicy("requests CA:TRUE".into()));
        assert_eq!(
            (r, s.code()),
            (Reason::CsrPolicy, tonic::Code::InvalidArgument)
        );
        let identity = Error::CsrIdentity {
            requested: "\"spiffe://td/ns/a/sa/b\"".into(),
            identity: "spiffe://td/ns/a/sa/c".into(),
        };
        let (r, s) = status_for(&identity);
        assert_eq!(
            (r, s.code()),
            (Reason::Identity, tonic::Code::PermissionDenied)
        );
        let (_, s) = status_for(&Error::Config("secret detail".into()));
        assert_eq!(s.code(), tonic::Code::Internal);
        assert!(!s.message().contains("secret"));
    }
}
