//! The local profile's root of trust and the one place that signs leaves.
//!
//! [`CertificateAuthority`] owns an ECDSA P-256 self-signed root, persisted in a directory
//! so that a restarted control plane keeps the root its proxies already trust. Given a
//! CSR and an identity that the caller's token proved, [`CertificateAuthority::sign`]
//! builds the leaf entirely from its own rules: only the CSR's public key is used.
//!
//! Key storage seam: there is no `SigningKeyStore` trait yet. All signing with the root
//! key goes through `Root::sign_leaf` in `authority/root.rs`, so a later Key Vault
//! (`keyvault-key`) source can swap that one function for a remote signer (an
//! `rcgen::SigningKey` whose `sign` calls Key Vault) without touching the CSR or validity
//! rules around it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use trellis_identity::{SpiffeError, SpiffeId};

use crate::csr;
use crate::fs::{KEY_MODE, PUBLIC_MODE, ensure_dir, write_atomic};

mod root;

use root::Root;

/// File name of the persisted root certificate (PEM).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// File name of the persisted root private key (PKCS#8 PEM, mode 0600).
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Leaf lifetime when the caller asks for none: the design's 24 h, rotated at ~70%.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest leaf lifetime granted unless configured otherwise.
pub const DEFAULT_MAX_TTL: Duration = DEFAULT_TTL;

/// How long a generated root is valid: ten years, so the local profile never has to
/// rotate it in practice.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Why the authority could not load, generate or sign.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing CA material failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (`reading`, `writing`, `creating directory`).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Only one of the root certificate and key exists.
    #[error(
        "incomplete root: {present} exists but {missing} does not; restore it, or remove both to generate a new root (proxies must then be re-trusted)"
    )]
    IncompleteRoot {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// A persisted root certificate or key cannot be used.
    #[error("invalid root material in {path}: {reason}")]
    InvalidRoot {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The root key does not belong to the root certificate.
    #[error("root key {key} does not match root certificate {cert}")]
    RootKeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The persisted root names another trust domain.
    #[error(
        "root certificate is for trust domain {found:?}, but the CA is configured for {expected:?}"
    )]
    RootTrustDomain {
        /// The configured trust domain.
        expected: String,
        /// The trust domain in the root's URI SAN.
        found: String,
    },
    /// The root has expired, so nothing it signs can be valid.
    #[error("root certificate expired at {not_after}")]
    RootExpired {
        /// When it expired.
        not_after: OffsetDateTime,
    },
    /// The configured trust domain is not valid.
    #[error("invalid trust domain: {0}")]
    TrustDomain(#[source] SpiffeError),
    /// The identity to certify is outside this CA's trust domain.
    #[error("identity {identity} is outside trust domain {trust_domain:?}")]
    ForeignIdentity {
        /// The identity asked for.
        identity: String,
        /// This CA's trust domain.
        trust_domain: String,
    },
    /// The CA configuration is inconsistent.
    #[error("invalid CA configuration: {0}")]
    Config(String),
    /// The CSR exceeds [`MAX_CSR_LEN`](crate::MAX_CSR_LEN).
    #[error("csr is {len} bytes, more than the {max} allowed")]
    CsrTooLarge {
        /// Its size.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The CSR is not a DER PKCS#10 request.
    #[error("csr is not a valid PKCS#10 request: {0}")]
    CsrMalformed(String),
    /// The CSR's self-signature does not verify: no proof of possession of the key.
    #[error("csr signature does not verify against its own public key")]
    CsrSignature,
    /// The CSR's key is not EC P-256 or P-384.
    #[error("csr key must be EC P-256 or P-384, got {0}")]
    CsrKeyType(String),
    /// Building or signing a certificate failed.
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
}

/// Leaf lifetime policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaConfig {
    default_ttl: Duration,
    max_ttl: Duration,
}

/// A signed leaf and what the caller needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Leaf first, then intermediates (none in the local profile), DER.
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf's `notAfter`.
    pub not_after: SystemTime,
    /// The leaf's serial number, lowercase hex, for logs.
    pub serial: String,
}

/// The certificate authority of the local profile: a self-signed root that signs leaves.
pub struct CertificateAuthority {
    trust_domain: String,
    config: CaConfig,
    root: Root,
}

// === impl CaConfig ===

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_MAX_TTL,
        }
    }
}

impl CaConfig {
    /// Sets the lifetime used when a request asks for none.
    pub fn with_default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Sets the longest lifetime granted; longer requests are shortened to it.
    pub fn with_max_ttl(mut self, ttl: Duration) -> Self {
        self.max_ttl = ttl;
        self
    }

    /// The lifetime used when a request asks for none.
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// The longest lifetime granted.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// The lifetime granted for a request: the default when none (or zero) is asked
    /// for, never more than the maximum.
    pub fn ttl_for(&self, requested: Option<Duration>) -> Duration {
        let asked = requested
            .filter(|d| !d.is_zero())
            .unwrap_or(self.default_ttl);
        asked.min(self.max_ttl)
    }

    fn validate(&self) -> Result<(), Error> {
        if self.default_ttl.as_secs() == 0 || self.max_ttl.as_secs() == 0 {
            return Err(Error::Config(
                "default and maximum TTL must be at least one second".to_owned(),
            ));
        }
        if self.default_ttl > self.max_ttl {
            return Err(Error::Config(format!(
                "default TTL {}s exceeds maximum TTL {}s",
                self.default_ttl.as_secs(),
                self.max_ttl.as_secs()
            )));
        }
        Ok(())
    }
}

// === impl CertificateAuthority ===

impl CertificateAuthority {
    /// Generates a fresh in-memory root for `trust_domain` (tests, throwaway meshes).
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        check_trust_domain(trust_domain)?;
        let root = Root::generate(trust_domain, now(), ROOT_LIFETIME)?;
        Ok(Self::from_root(trust_domain, root))
    }

    /// Loads the root from `dir/root-cert.pem` and `dir/root-key.pem`, or generates and
    /// writes one there if neither exists (creating `dir` with mode 0700).
    ///
    /// A loaded root must match its key, be a CA, be unexpired and, if it carries a
    /// `spiffe://` URI SAN, name `trust_domain`.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        check_trust_domain(trust_domain)?;
        ensure_dir(dir).map_err(io_err("creating directory", dir))?;
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let has_cert = exists(&cert_path)?;
        let has_key = exists(&key_path)?;
        let root = match (has_cert, has_key) {
            (true, true) => Root::load(&cert_path, &key_path, trust_domain)?,
            (false, false) => {
                let root = Root::generate(trust_domain, now(), ROOT_LIFETIME)?;
                // Key first: a crash in between leaves a key without a certificate,
                // which the next start reports instead of silently trusting.
                let key_pem = root.issuer.key().serialize_pem();
                write_atomic(&key_path, key_pem.as_bytes(), KEY_MODE)
                    .map_err(io_err("writing", &key_path))?;
                write_atomic(&cert_path, root.pem.as_bytes(), PUBLIC_MODE)
                    .map_err(io_err("writing", &cert_path))?;
                root
            }
            (true, false) => {
                return Err(Error::IncompleteRoot {
                    present: cert_path,
                    missing: key_path,
                });
            }
            (false, true) => {
                return Err(Error::IncompleteRoot {
                    present: key_path,
                    missing: cert_path,
                });
            }
        };
        Ok(Self::from_root(trust_domain, root))
    }

    /// Replaces the leaf lifetime policy.
    pub fn with_config(mut self, config: CaConfig) -> Result<Self, Error> {
        config.validate()?;
        self.config = config;
        Ok(self)
    }

    /// The trust domain this CA issues identities in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The leaf lifetime policy.
    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root.pem
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root.der
    }

    /// When the root expires.
    pub fn root_not_after(&self) -> SystemTime {
        self.root.not_after.into()
    }

    /// The roots peers are verified against, DER. One today; several during a rotation.
    pub fn trust_bundle_der(&self) -> Vec<Vec<u8>> {
        vec![self.root.der.clone()]
    }

    /// Signs a leaf for `identity` over the public key of `csr_der`.
    ///
    /// The CSR must be at most 16 KiB, parse as PKCS#10, carry an EC P-256 or P-384 key
    /// and verify under it. Nothing else in it is used: the leaf has exactly one URI SAN
    /// (`identity`, which must be in this CA's trust domain), `CA:FALSE`, key usage
    /// digitalSignature + keyAgreement, EKU serverAuth + clientAuth, a random serial,
    /// `notBefore` one minute in the past, and a lifetime of [`CaConfig::ttl_for`]
    /// `requested_ttl`, cut short at the root's `notAfter`.
    pub fn sign(
        &self,
        csr_der: &[u8],
        identity: &SpiffeId,
        requested_ttl: Option<Duration>,
    ) -> Result<Issued, Error> {
        if identity.trust_domain() != self.trust_domain {
            return Err(Error::ForeignIdentity {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let public_key = csr::public_key(csr_der)?;
        self.root.sign_leaf(
            &public_key,
            identity,
            now(),
            self.config.ttl_for(requested_ttl),
        )
    }

    fn from_root(trust_domain: &str, root: Root) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            config: CaConfig::default(),
            root,
        }
    }
}

impl fmt::Debug for CertificateAuthority {
    // Never prints key material: only what identifies the root.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("config", &self.config)
            .field("root_not_after", &self.root.not_after)
            .finish_non_exhaustive()
    }
}

/// Validates a trust domain with the same rules as SPIFFE IDs use.
fn check_trust_domain(trust_domain: &str) -> Result<(), Error> {
    // trellis-identity exposes trust-domain validation only through SpiffeId; any valid
    // namespace and service account do.
    SpiffeId::new(trust_domain, "ns", "sa").map_err(Error::TrustDomain)?;
    Ok(())
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn exists(path: &Path) -> Result<bool, Error> {
    path.try_exists().map_err(io_err("reading", path))
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error + use<> {
    let path = path.to_owned();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    fn p256_csr() -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn ttl_defaults_and_clamps() {
        let hour = Duration::from_secs(3600);
        let cfg = CaConfig::default()
            .with_default_ttl(hour)
            .with_max_ttl(2 * hour);
        assert_eq!(cfg.ttl_for(None), hour);
        assert_eq!(cfg.ttl_for(Some(Duration::ZERO)), hour);
        assert_eq!(cfg.ttl_for(Some(hour / 2)), hour / 2);
        assert_eq!(cfg.ttl_for(Some(10 * hour)), 2 * hour);
        assert_eq!(
            CaConfig::default().ttl_for(Some(48 * hour)),
            DEFAULT_MAX_TTL
        );
    }

    #[test]
    fn config_rejects_default_above_max_and_zero() {
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let bad = CaConfig::default().with_default_ttl(DEFAULT_MAX_TTL * 2);
        assert!(matches!(ca.with_config(bad), Err(Error::Config(_))));
        let ca = CertificateAuthority::generate("cluster.local").unwrap();
        let zero = CaConfig::default().with_max_ttl(Duration::ZERO);
        assert!(matches!(ca.with_config(zero), Err(Error::Config(_))));
    }

    #[test]
    fn leaf_never_outlives_root() {
        let now = now().replace_nanosecond(0).unwrap();
        let root = Root::generate("cluster.local", now, Duration::from_secs(2 * 3600)).unwrap();
        let ca = CertificateAuthority::from_root("cluster.local", root);
        let id = SpiffeId::new("cluster.local", "demo", "web").unwrap();
        let issued = ca.sign(&p256_csr(), &id, None).unwrap();
        assert_eq!(issued.not_after, ca.root_not_after());
    }

    #[test]
    fn expired_root_signs_nothing() {
        let long_ago = now() - Duration::from_secs(7200);
        let root = Root::generate("cluster.local", long_ago, Duration::from_secs(3600)).unwrap();
        let ca = CertificateAuthority::from_root("cluster.local", root);
        let id = SpiffeId::new("cluster.local", "demo", "web").unwrap();
        assert!(matches!(
            ca.sign(&p256_csr(), &id, None),
            Err(Error::RootExpired { .. })
        ));
    }

    #[test]
    fn invalid_trust_domain_is_refused() {
        assert!(matches!(
            CertificateAuthority::generate("Bad Domain"),
            Err(Error::TrustDomain(_))
        ));
    }
}
