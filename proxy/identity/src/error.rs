//! The error type for everything in this crate that is not a malformed SPIFFE ID string.
//!
//! Messages are lowercase and carry the underlying reason inline, because most callers log
//! only the `Display` form of a handshake failure.

use crate::{PeerRole, SpiffeError, SpiffeId};

/// Why a certificate, key, bundle, CSR or TLS configuration was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input is not valid PEM.
    #[error("invalid pem: {0}")]
    Pem(String),
    /// A PEM block is something other than a `CERTIFICATE`.
    #[error("pem block {0:?} is not a certificate")]
    NotACertificate(String),
    /// A trust bundle was given no certificates at all.
    #[error("trust bundle holds no certificates")]
    EmptyBundle,
    /// A trust bundle root cannot be used as a trust anchor.
    #[error("trust bundle root #{index} is not a usable trust anchor: {source}")]
    BadRoot {
        /// Position of the root in the bundle.
        index: usize,
        /// webpki's reason.
        source: webpki::Error,
    },
    /// A certificate is not well-formed DER X.509.
    #[error("malformed certificate: {0}")]
    BadCertificate(String),
    /// A certificate's validity dates cannot be represented.
    #[error("certificate validity is out of range")]
    BadValidity,
    /// A certificate chain was empty where a leaf was needed.
    #[error("certificate chain is empty")]
    EmptyChain,
    /// The leaf's subject alternative name extension cannot be parsed.
    #[error("malformed subject alternative name extension: {0}")]
    BadSan(String),
    /// The leaf carries no URI SAN.
    #[error("certificate has no uri san")]
    NoUriSan,
    /// The leaf carries more than one URI SAN; an X.509-SVID has exactly one.
    #[error("certificate has {0} uri sans, expected exactly one")]
    MultipleUriSans(usize),
    /// The leaf's URI SAN is not a valid Trellis SPIFFE ID.
    #[error("uri san {uri:?} is not a valid spiffe id: {source}")]
    InvalidSpiffeId {
        /// The URI SAN as found in the certificate.
        uri: String,
        /// Why it was refused.
        source: SpiffeError,
    },
    /// The chain does not verify to the trust bundle (includes expiry, EKU and CA:TRUE leaves).
    #[error("certificate chain not trusted: {0}")]
    Untrusted(webpki::Error),
    /// The leaf has no EKU extension, or one without the purpose its role needs (our CA
    /// always sets both clientAuth and serverAuth).
    #[error("leaf certificate extended key usage does not allow acting as a tls {0}")]
    MissingEku(PeerRole),
    /// The leaf expires after a certificate that issued it, which our CA never does.
    #[error("leaf certificate expires after its issuer")]
    OutlivesIssuer,
    /// The leaf's key usage allows signing certificates or CRLs, which SVIDs must not.
    #[error("leaf certificate key usage allows signing certificates or crls")]
    LeafCanSign,
    /// The peer's identity is valid but belongs to another trust domain.
    #[error("peer {id} is not in trust domain {expected:?}")]
    ForeignTrustDomain {
        /// The peer's identity.
        id: SpiffeId,
        /// The trust domain we accept.
        expected: String,
    },
    /// The server's identity is valid but not the one the client dialled.
    #[error("peer is {actual}, expected {expected}")]
    IdentityMismatch {
        /// The identity the caller asked for.
        expected: SpiffeId,
        /// The identity the server presented.
        actual: SpiffeId,
    },
    /// The private key is unusable or does not match the leaf certificate.
    #[error("private key does not fit the certificate: {0}")]
    Key(rustls::Error),
    /// rustls refused the configuration.
    #[error("rustls configuration: {0}")]
    Rustls(rustls::Error),
    /// Generating a key pair or CSR failed.
    #[error("key or csr generation failed: {0}")]
    Generate(rcgen::Error),
}
