//! Caller tokens: who is asking the CA for a certificate.
//!
//! The CA trusts only a [`TokenVerifier`]'s answer to "which namespace and service
//! account is this?". In Kubernetes that answer comes from a projected ServiceAccount
//! token, checked against the cluster's OIDC JWKS ([`OidcVerifier`]) or, later, by
//! TokenReview. The local profile has no API server, so [`LocalIssuer`] mints tokens of
//! exactly the same shape, and [`JwksVerifier`] checks them with the same rules as the
//! OIDC path: moving to Kubernetes swaps the verifier, not the CA or the proxy.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use trellis_identity::SpiffeError;

mod https;
mod jwks;
mod local;
mod oidc;

pub use jwks::JwksVerifier;
pub use local::{ISSUER_KEY_FILE, JWKS_FILE, LOCAL_ISSUER, LocalIssuer};
pub use oidc::{
    DEFAULT_FETCH_TIMEOUT, DEFAULT_JWKS_REFRESH, DEFAULT_MIN_REFETCH, OidcConfig, OidcVerifier,
};

/// The audience the CA expects in caller tokens (the projected-token `audience`).
pub const DEFAULT_AUDIENCE: &str = "trellis";
/// The longest token accepted, in bytes. Kubernetes tokens are ~1 KiB; the cap bounds
/// base64 and JSON work on hostile input.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Prefix of a ServiceAccount token's `sub`: `system:serviceaccount:<ns>:<name>`.
const SUBJECT_PREFIX: &str = "system:serviceaccount:";
/// Clock skew tolerated on `exp` and `nbf`, seconds (the Kubernetes API server's value).
const LEEWAY_SECS: u64 = 60;

/// The future returned by [`TokenVerifier::verify`].
pub type VerifyFuture<'a> = Pin<Box<dyn Future<Output = Result<Caller, TokenError>> + Send + 'a>>;

/// Proves who a caller is from its bearer token.
///
/// The future is boxed so the trait is dyn-compatible (`Arc<dyn TokenVerifier>`) and an
/// implementation may await I/O, such as fetching keys ([`OidcVerifier`]).
///
/// TokenReview plugs in here, with the Kubernetes client (a later issue; this crate must
/// not depend on kube): a verifier in the control-plane crate creates a TokenReview with
/// `audiences: [DEFAULT_AUDIENCE]`, maps `status.user.username`
/// (`system:serviceaccount:<ns>:<sa>`) to a [`Caller`], `authenticated: false` to a
/// refusal and an unreachable API server to [`TokenError::Unavailable`]. Unlike the JWKS
/// paths it also refuses tokens of deleted pods and service accounts, at the cost of one
/// API call per certificate.
pub trait TokenVerifier: Send + Sync + 'static {
    /// Verifies `token`, returning the workload it was issued to.
    fn verify<'a>(&'a self, token: &'a str) -> VerifyFuture<'a>;
}

/// The workload a verified token was issued to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    /// The Kubernetes namespace (or the local profile's equivalent).
    pub namespace: String,
    /// The service account name.
    pub service_account: String,
}

/// Why a token was refused, or a token issuer or verifier could not be set up.
///
/// No variant carries the token or any part of it: these messages reach logs and, in
/// short form, the caller.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("token is longer than {max} bytes")]
    TooLong {
        /// The cap.
        max: usize,
    },
    /// The token is not a three-part JWS with JSON header and claims of the expected shape.
    #[error("token is not a well-formed service account JWT")]
    Malformed,
    /// The token's `alg` is not one the verifier accepts, or not its key's: ES256 for the
    /// local issuer, RS256 or ES256 for a cluster's OIDC issuer (`none` and HMAC never).
    #[error("token algorithm {0:?} is not accepted")]
    Algorithm(String),
    /// The token header has no `kid`.
    #[error("token header has no key id")]
    MissingKeyId,
    /// The token's `kid` names no key in the JWKS.
    #[error("token key id is not in the trusted key set")]
    UnknownKey,
    /// The signature does not verify under the key its `kid` names.
    #[error("token signature does not verify")]
    Signature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iss` is not the trusted issuer.
    #[error("token issuer is not trusted")]
    Issuer,
    /// `aud` does not contain the CA's audience.
    #[error("token audience does not include {0:?}")]
    Audience(String),
    /// `sub` is not `system:serviceaccount:<namespace>:<name>`.
    #[error("token subject is not a service account")]
    Subject,
    /// `sub` and the `kubernetes.io` claims name different workloads.
    #[error("token subject does not match its kubernetes.io claims")]
    ClaimsMismatch,
    /// The namespace or service account is not a valid identity segment.
    #[error("token names an invalid workload: {0}")]
    InvalidName(#[source] SpiffeError),
    /// The JWKS cannot be used.
    #[error("invalid JWKS: {0}")]
    Jwks(String),
    /// A token issuer key file cannot be used.
    #[error("invalid issuer key in {path}: {reason}")]
    InvalidKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong (never the key itself).
        reason: &'static str,
    },
    /// Reading or writing issuer material failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Signing a token failed.
    #[error("minting a token failed")]
    Mint,
    /// A verifier's configuration cannot be used (an issuer URL that is not `https://`,
    /// extra roots without a certificate).
    #[error("invalid token verifier configuration: {0}")]
    Config(String),
    /// The verifier could not reach what it needs (e.g. the TokenReview API); the token
    /// itself may be fine, so callers should retry rather than give up.
    #[error("token verifier unavailable: {0}")]
    Unavailable(String),
}

/// The claims of a projected ServiceAccount token that Trellis reads and writes.
/// Unknown claims (`kubernetes.io.pod`, `node`, ...) are ignored when reading.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    aud: Audience,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubernetesClaims,
}

/// `aud` may be one string or an array (RFC 7519 §4.1.3); Kubernetes writes an array.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: ServiceAccountRef,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServiceAccountRef {
    name: String,
    uid: String,
}

// === impl Audience ===

impl Audience {
    fn contains(&self, audience: &str) -> bool {
        match self {
            Self::One(a) => a == audience,
            Self::Many(all) => all.iter().any(|a| a == audience),
        }
    }
}

/// Splits `system:serviceaccount:<ns>:<name>` into its parts.
fn parse_subject(sub: &str) -> Option<(&str, &str)> {
    let (namespace, name) = sub.strip_prefix(SUBJECT_PREFIX)?.split_once(':')?;
    if namespace.is_empty() || name.is_empty() || name.contains(':') {
        return None;
    }
    Some((namespace, name))
}

#[cfg(test)]
mod tests;
