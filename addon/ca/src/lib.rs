//! The Trellis certificate authority.
//!
//! A proxy makes its own key pair, sends a CSR together with a caller token, and gets
//! back a leaf for the SPIFFE identity the TOKEN proves, plus the trust bundle. A CSR that
//! asks for anything else (another identity, DNS names, CA powers) is refused, and each
//! identity is rate-limited ([`RateLimit`]).
//!
//! Owns: the local profile's self-signed root ([`CertificateAuthority`]), leaf signing
//! rules, the control plane's own TLS serving certificates
//! ([`CertificateAuthority::issue_serving`]: DNS names, never reachable from a CSR),
//! caller-token verification behind [`TokenVerifier`] (the local profile's
//! [`LocalIssuer`] / [`JwksVerifier`] pair, and [`OidcVerifier`] for a cluster's OIDC
//! issuer), and the `trellis.identity.v1.Identity` gRPC service ([`IdentityService`]).
//!
//! Must not depend on: kube or azure crates. Kubernetes TokenReview and Key Vault signing
//! plug in from other crates: the former as another [`TokenVerifier`], the latter by
//! replacing the one signing function in `authority.rs`.

mod authority;
mod csr;
mod fs;
mod pems;
mod rate;
mod service;
pub mod source;
mod token;

pub use authority::{
    CaConfig, CaMaterial, CaStatus, CertificateAuthority, DEFAULT_MAX_TTL, DEFAULT_TTL, Error,
    Issued, ROOT_CERT_FILE, ROOT_KEY_FILE, RootStatus, ServingCert, Staged, generate_pems,
    load_or_generate_self_signed, spiffe_trust_domain,
};
pub use csr::MAX_CSR_LEN;
pub use pems::{CA_CERT_PEM, CA_KEY_PEM, CERT_CHAIN_PEM, CaPems, ROOT_CERT_PEM};
pub use rate::{
    DEFAULT_MAX_TRACKED_IDENTITIES, DEFAULT_RATE_LIMIT_BURST, DEFAULT_RATE_LIMIT_PER_SECOND,
    RateLimit,
};
pub use service::{IdentityService, MAX_MESSAGE_LEN, Metrics};
pub use token::{
    Caller, DEFAULT_AUDIENCE, DEFAULT_FETCH_TIMEOUT, DEFAULT_JWKS_REFRESH, DEFAULT_MIN_REFETCH,
    ISSUER_KEY_FILE, JWKS_FILE, JwksVerifier, LOCAL_ISSUER, LocalIssuer, MAX_TOKEN_LEN, OidcConfig,
    OidcVerifier, TokenError, TokenVerifier, VerifyFuture,
};
