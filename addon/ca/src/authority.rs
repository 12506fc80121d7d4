//! The local profile's root of trust and the one place that signs leaves.
//!
//! [`CertificateAuthority`] owns an ECDSA P-256 self-signed root, persisted in a directory
//! so that a restarted control plane keeps the root its proxies already trust. Given a
//! CSR and an identity that the caller's token proved, [`CertificateAuthority::sign`]
//! builds the leaf entirely from its own rules: only the CSR's public key is used, and a
//! CSR that asks for more than the leaf will carry is refused (`csr.rs`).
//!
//! Key storage seam: there is no `SigningKeyStore` trait yet. All signing with the root
//! key goes through `Root::sign_leaf` in `authority/root.rs`, so a later Key Vault
//! (`keyvault-key`) source can swap that one function for a remote signer (an
//! `rcgen::SigningKey` whose `sign` calls Key Vault) without touching the CSR or validity
//! rules around it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::info;
use trellis_api::Trust;
use trellis_identity::{SpiffeError, SpiffeId};
use x509_parser::prelude::FromDer;

use crate::CaPems;
use crate::csr;
use crate::fs::{KEY_MODE, PUBLIC_MODE, ensure_dir, write_atomic};

mod material;
mod root;

pub use material::{CaMaterial, spiffe_trust_domain};
use root::{CLOCK_SKEW, Root};

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
    /// CA material from a source (a Secret, Key Vault) cannot be used.
    #[error("CA material from {source_label}: {what}: {reason}")]
    InvalidMaterial {
        /// The source (`secret /etc/cacerts`, `keyvault-secret https://…`).
        source_label: String,
        /// Which part (`root-cert`, `ca-cert`, `ca-key`, `cert-chain`).
        what: String,
        /// What is wrong with it.
        reason: String,
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
    /// The CSR asks for a SPIFFE id other than the one the caller's token proves.
    #[error("csr asks for identity {requested}, but the token proves {identity}")]
    CsrIdentity {
        /// The URI SAN asked for, quoted and cut short (caller-supplied).
        requested: String,
        /// The identity the token proves.
        identity: String,
    },
    /// The CSR asks for something a leaf never carries: another name, CA powers, a key or
    /// extended key usage beyond mTLS, or a critical extension the CA does not grant.
    #[error("csr refused: {0}")]
    CsrPolicy(String),
    /// A name asked for in a serving certificate is not a DNS name the control plane
    /// can be reached by (empty list, IP address, wildcard, or not a valid name).
    #[error("serving certificate: {0}")]
    ServingName(String),
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

/// A TLS serving certificate for one of the control plane's own HTTPS listeners (the
/// admission webhook), from [`CertificateAuthority::issue_serving`]. Its private key was
/// generated in memory for it and never leaves the process; `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingCert {
    /// Leaf first, then the intermediates (none when the root signs itself), DER; never
    /// the root, which verifiers have in the trust bundle.
    pub chain_der: Vec<Vec<u8>>,
    key_pkcs8_der: Vec<u8>,
    /// The leaf's `notBefore` (one minute before issuance).
    pub not_before: SystemTime,
    /// The leaf's `notAfter`.
    pub not_after: SystemTime,
    /// The leaf's serial number, lowercase hex, for logs.
    pub serial: String,
    /// Generation of the CA that signed it: a listener renews when the CA's generation
    /// moves past it.
    pub generation: u64,
}

/// The certificate authority: signs leaves with its current [`CaMaterial`] and keeps the
/// trust bundle peers verify against, through a root or CA change.
///
/// A change of CA goes through three steps so that no handshake fails
/// ([`CertificateAuthority::stage`], [`CertificateAuthority::activate`],
/// [`CertificateAuthority::retire_expired`]): the new roots join the bundle while the old CA
/// still signs; then the new CA signs and the generation goes up (proxies re-issue at
/// once); the old roots leave the bundle only when every leaf they could have verified
/// has expired.
pub struct CertificateAuthority {
    trust_domain: String,
    config: CaConfig,
    state: RwLock<State>,
    /// The bundle and generation proxies must know (discovery's `Trust`), on every change.
    trust: watch::Sender<Trust>,
}

/// The CA as `/debug/ca` and `trellis check` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaStatus {
    /// Trust domain.
    pub trust_domain: String,
    /// Generation of the signing CA.
    pub generation: u64,
    /// Where the signing material came from.
    pub source: String,
    /// When the signing chain expires (Unix seconds): no leaf lives past it.
    pub signing_not_after_unix: u64,
    /// A staged CA that does not sign yet, by source.
    pub pending: Option<String>,
    /// Every root in the bundle.
    pub roots: Vec<RootStatus>,
}

/// One root of the trust bundle.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RootStatus {
    /// First 8 bytes of the SHA-256 of the DER, hex (as proxies show it).
    pub fingerprint: String,
    /// Subject, RFC 4514.
    pub subject: String,
    /// Expiry, Unix seconds.
    pub not_after_unix: u64,
    /// Leaving the bundle at this time (Unix seconds): a root of an earlier CA.
    pub retiring_at_unix: Option<u64>,
}

/// What [`CertificateAuthority::stage`] did with new material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staged {
    /// The same CA and roots as now: nothing to do.
    Unchanged,
    /// The same issuing CA with other roots (a root added for a rotation, or removed):
    /// the bundle is updated at once, signing continues.
    RootsUpdated,
    /// A different issuing CA: its roots are in the bundle now; call
    /// [`CertificateAuthority::activate`] once proxies have the bundle.
    Pending,
}

struct State {
    signing: Arc<CaMaterial>,
    pending: Option<Arc<CaMaterial>>,
    /// Roots of earlier CAs, trusted until every leaf they verified has expired.
    retiring: Vec<(Vec<u8>, SystemTime)>,
    generation: u64,
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
    /// A CA signing with `material` for `trust_domain`, generation 1.
    pub fn new(trust_domain: &str, material: CaMaterial) -> Result<Self, Error> {
        check_trust_domain(trust_domain)?;
        Ok(Self::from_material(trust_domain, material))
    }

    /// Generates a fresh in-memory root for `trust_domain` (tests, throwaway meshes).
    pub fn generate(trust_domain: &str) -> Result<Self, Error> {
        check_trust_domain(trust_domain)?;
        let root = Root::generate(trust_domain, now(), ROOT_LIFETIME)?;
        Ok(Self::from_material(
            trust_domain,
            root.into_material("self-signed (in memory)"),
        ))
    }

    /// Loads the self-signed root from `dir/root-cert.pem` and `dir/root-key.pem`, or
    /// generates and writes one there if neither exists (creating `dir` with mode 0700).
    ///
    /// A loaded root must match its key, be a CA, be unexpired and, if it carries a
    /// `spiffe://` URI SAN, name `trust_domain`.
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        check_trust_domain(trust_domain)?;
        let material = load_or_generate_self_signed(dir, trust_domain)?;
        Ok(Self::from_material(trust_domain, material))
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

    /// The material leaves are signed with now.
    pub fn signing(&self) -> Arc<CaMaterial> {
        self.read().signing.clone()
    }

    /// The roots peers are verified against, DER: the signing CA's, a pending CA's and
    /// those of earlier CAs still retiring.
    pub fn trust_bundle_der(&self) -> Vec<Vec<u8>> {
        self.trust.borrow().roots_der.clone()
    }

    /// The trust bundle as PEM, for a bootstrap roots file.
    pub fn trust_bundle_pem(&self) -> String {
        self.trust_bundle_der()
            .into_iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der)))
            .collect()
    }

    /// Writes [`CertificateAuthority::trust_bundle_pem`] to `path` atomically (mode
    /// 0644): the file proxies bootstrap from, so a reader never sees half a bundle.
    pub fn write_trust_bundle(&self, path: &Path) -> io::Result<()> {
        write_atomic(path, self.trust_bundle_pem().as_bytes(), PUBLIC_MODE)
    }

    /// The current CA generation: goes up by one each time a different CA starts signing.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Bundle (every root a peer certificate may chain to, DER, deduplicated) and
    /// generation, now.
    pub fn trust(&self) -> Trust {
        self.trust.borrow().clone()
    }

    /// Bundle and generation now and on every change.
    pub fn subscribe(&self) -> watch::Receiver<Trust> {
        self.trust.subscribe()
    }

    /// When the signing CA (or anything on its path to the root) expires.
    pub fn root_not_after(&self) -> SystemTime {
        self.read().signing.not_after()
    }

    /// Offers new material from the CA source (step 1 of a change; see the type's docs).
    pub fn stage(&self, material: CaMaterial) -> Staged {
        let mut state = self.write();
        let current = state.pending.as_ref().unwrap_or(&state.signing);
        if current.same_as(&material) {
            return Staged::Unchanged;
        }
        let outcome = if current.issuer_der() == material.issuer_der() {
            // Same issuing CA, other roots: nothing is re-issued, the bundle changes.
            let material = Arc::new(material);
            if state.pending.is_some() {
                state.pending = Some(material);
            } else {
                state.signing = material;
            }
            Staged::RootsUpdated
        } else {
            info!(from = %state.signing.label(), to = %material.label(), "new CA staged: its roots join the trust bundle");
            state.pending = Some(Arc::new(material));
            Staged::Pending
        };
        self.publish(&state);
        outcome
    }

    /// Starts signing with the staged material (step 2): the generation goes up so
    /// proxies re-issue, and the old CA's roots stay trusted until `now` plus the
    /// longest leaf lifetime. Returns false when nothing was staged.
    pub fn activate(&self, now: SystemTime) -> bool {
        let mut state = self.write();
        let Some(next) = state.pending.take() else {
            return false;
        };
        let old = std::mem::replace(&mut state.signing, next);
        // Every leaf the old CA signed expires within the longest lifetime; the margin
        // covers clocks a little behind ours, without holding short-lived meshes for long.
        let until = now + self.config.max_ttl() + CLOCK_SKEW.min(self.config.max_ttl() / 4);
        for root in old.roots_der() {
            if !state.signing.roots_der().contains(root) {
                state.retiring.retain(|(r, _)| r != root);
                state.retiring.push((root.clone(), until));
            }
        }
        state.generation += 1;
        info!(from = %old.label(), to = %state.signing.label(), generation = state.generation, "new CA signing; proxies re-issue");
        self.publish(&state);
        true
    }

    /// Drops retiring roots whose leaves have all expired by `now` (step 3). Returns how
    /// many left the bundle.
    pub fn retire_expired(&self, now: SystemTime) -> usize {
        let mut state = self.write();
        let before = state.retiring.len();
        state.retiring.retain(|(_, until)| *until > now);
        let gone = before - state.retiring.len();
        if gone > 0 {
            info!(roots = gone, "old roots retired from the trust bundle");
            self.publish(&state);
        }
        gone
    }

    /// The CA's state for operators: source, generation, expiry, every root.
    pub fn status(&self) -> CaStatus {
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
        };
        let state = self.read();
        let trust = trust_of(&state);
        let roots = trust
            .roots_der
            .iter()
            .map(|der| {
                let digest = ring::digest::digest(&ring::digest::SHA256, der);
                let (subject, not_after) =
                    match x509_parser::prelude::X509Certificate::from_der(der) {
                        Ok((_, x)) => (
                            x.subject().to_string(),
                            u64::try_from(x.validity().not_after.timestamp()).unwrap_or(0),
                        ),
                        Err(_) => ("?".to_owned(), 0),
                    };
                RootStatus {
                    fingerprint: digest.as_ref()[..8]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect(),
                    subject,
                    not_after_unix: not_after,
                    retiring_at_unix: state
                        .retiring
                        .iter()
                        .find(|(r, _)| r == der)
                        .map(|(_, t)| unix(*t)),
                }
            })
            .collect();
        CaStatus {
            trust_domain: self.trust_domain.clone(),
            generation: state.generation,
            source: state.signing.label().to_owned(),
            signing_not_after_unix: unix(state.signing.not_after()),
            pending: state.pending.as_ref().map(|m| m.label().to_owned()),
            roots,
        }
    }

    /// The next time [`CertificateAuthority::retire_expired`] has work, if any.
    pub fn next_retirement(&self) -> Option<SystemTime> {
        self.read().retiring.iter().map(|(_, t)| *t).min()
    }

    /// Signs a leaf for `identity` over the public key of `csr_der` with the signing
    /// material.
    ///
    /// The CSR must be at most 16 KiB, parse as PKCS#10, carry an EC P-256 or P-384 key
    /// and verify under it, and ask for nothing the leaf will not carry: no SAN but one URI
    /// equal to `identity`, no `CA:TRUE`, no keyCertSign/cRLSign, no extended key usage
    /// beyond serverAuth/clientAuth ([`Error::CsrIdentity`], [`Error::CsrPolicy`]). Only its
    /// public key is used: the leaf has exactly one URI SAN
    /// (`identity`, which must be in this CA's trust domain), `CA:FALSE`, key usage
    /// digitalSignature + keyAgreement, EKU serverAuth + clientAuth, a random serial,
    /// `notBefore` one minute in the past, and a lifetime of [`CaConfig::ttl_for`]
    /// `requested_ttl`, cut short where the issuing chain expires. The chain returned is
    /// the leaf and the intermediates, never a root.
    pub fn sign(
        &self,
        csr_der: &[u8],
        identity: &SpiffeId,
        requested_ttl: Option<Duration>,
    ) -> Result<Issued, Error> {
        Ok(self
            .sign_with_generation(csr_der, identity, requested_ttl)?
            .0)
    }

    /// [`CertificateAuthority::sign`], also returning the generation of the CA that
    /// signed (read together, so a concurrent activation cannot mislabel the leaf).
    pub fn sign_with_generation(
        &self,
        csr_der: &[u8],
        identity: &SpiffeId,
        requested_ttl: Option<Duration>,
    ) -> Result<(Issued, u64), Error> {
        if identity.trust_domain() != self.trust_domain {
            return Err(Error::ForeignIdentity {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let public_key = csr::public_key(csr_der, identity)?;
        let (signing, generation) = {
            let state = self.read();
            (state.signing.clone(), state.generation)
        };
        let issued = signing.sign_leaf(
            &public_key,
            identity,
            now(),
            self.config.ttl_for(requested_ttl),
        )?;
        Ok((issued, generation))
    }

    /// Issues a TLS serving certificate for the control plane itself, for `dns_names`
    /// (the names clients such as the Kubernetes API server dial, e.g.
    /// `trellis-webhook.trellis-system.svc`), with a fresh ECDSA P-256 key generated here.
    ///
    /// This is deliberately not reachable through the CSR API: [`CertificateAuthority::sign`]
    /// (and so `Identity/Certify`) refuses any DNS name, because a workload must never
    /// obtain a certificate for a name it does not own. Only the control plane calls
    /// this, for itself, with names from its own flags; it is not counted in
    /// `trellis_ca_certificates_issued_total`, which counts workload leaves.
    ///
    /// The leaf carries the DNS SANs and **no URI SAN**: every proxy accepts a peer only
    /// with exactly one `spiffe://` URI SAN of the trust domain
    /// (`trellis_identity::verify_peer`), so although it chains to the mesh's roots this
    /// certificate can never pass as a mesh identity, on either side of an mTLS
    /// connection. It is `CA:FALSE`, key usage digitalSignature, EKU serverAuth only
    /// (never clientAuth). Lifetime: `ttl`, at most [`CaConfig::max_ttl`] (old roots are
    /// retired on the assumption that no leaf lives longer), cut short where the issuing
    /// chain expires. Returns the chain (leaf and intermediates, never the root), the key
    /// and the generation of the CA that signed it.
    pub fn issue_serving(&self, dns_names: &[String], ttl: Duration) -> Result<ServingCert, Error> {
        check_serving_names(dns_names)?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let (signing, generation) = {
            let state = self.read();
            (state.signing.clone(), state.generation)
        };
        let ttl = self.config.ttl_for(Some(ttl));
        let (issued, not_before) = signing.sign_serving(&key, dns_names, now(), ttl)?;
        Ok(ServingCert {
            chain_der: issued.chain_der,
            key_pkcs8_der: key.serialize_der(),
            not_before,
            not_after: issued.not_after,
            serial: issued.serial,
            generation,
        })
    }

    fn from_material(trust_domain: &str, material: CaMaterial) -> Self {
        let state = State {
            signing: Arc::new(material),
            pending: None,
            retiring: Vec::new(),
            generation: 1,
        };
        let (trust, _) = watch::channel(trust_of(&state));
        Self {
            trust_domain: trust_domain.to_owned(),
            config: CaConfig::default(),
            state: RwLock::new(state),
            trust,
        }
    }

    fn publish(&self, state: &State) {
        self.trust.send_replace(trust_of(state));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for CertificateAuthority {
    // Never prints key material: only what identifies the CA.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.read();
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("config", &self.config)
            .field("signing", &state.signing)
            .field("pending", &state.pending)
            .field("generation", &state.generation)
            .finish_non_exhaustive()
    }
}

// === impl ServingCert ===

impl ServingCert {
    /// The private key (PKCS#8 DER), for a TLS server config.
    pub fn private_key(&self) -> rustls_pki_types::PrivateKeyDer<'static> {
        rustls_pki_types::PrivateKeyDer::Pkcs8(self.key_pkcs8_der.clone().into())
    }

    /// The chain as rustls takes it.
    pub fn certificates(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.chain_der
            .iter()
            .map(|der| rustls_pki_types::CertificateDer::from(der.clone()))
            .collect()
    }
}

impl fmt::Debug for ServingCert {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert")
            .field("chain_len", &self.chain_der.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("serial", &self.serial)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Names a serving certificate may carry: at least one, each a DNS name (no IP address,
/// no wildcard: the control plane is reached by exact Service names).
fn check_serving_names(dns_names: &[String]) -> Result<(), Error> {
    if dns_names.is_empty() {
        return Err(Error::ServingName("no DNS name given".to_owned()));
    }
    for name in dns_names {
        let ok = !name.contains('*')
            && matches!(
                rustls_pki_types::ServerName::try_from(name.as_str()),
                Ok(rustls_pki_types::ServerName::DnsName(_))
            );
        if !ok {
            return Err(Error::ServingName(format!("{name:?} is not a DNS name")));
        }
    }
    Ok(())
}

/// The bundle: signing roots first, then a pending CA's, then retiring ones.
fn trust_of(state: &State) -> Trust {
    let mut roots: Vec<Vec<u8>> = Vec::new();
    let pending = state.pending.iter().flat_map(|m| m.roots_der().iter());
    let retiring = state.retiring.iter().map(|(r, _)| r);
    for root in state
        .signing
        .roots_der()
        .iter()
        .chain(pending)
        .chain(retiring)
    {
        if !roots.contains(root) {
            roots.push(root.clone());
        }
    }
    Trust {
        roots_der: roots,
        generation: state.generation,
    }
}

/// Generates the Istio `cacerts` layout in memory: a root named `name` (pathlen 1,
/// `root_lifetime`) and an intermediate it signed (`ca_lifetime`, never past the root).
/// For `trellis ca` (plug-in secrets) and tests.
pub fn generate_pems(
    trust_domain: &str,
    name: &str,
    root_lifetime: Duration,
    ca_lifetime: Duration,
) -> Result<CaPems, Error> {
    check_trust_domain(trust_domain)?;
    Root::generate_pems(trust_domain, name, now(), root_lifetime, ca_lifetime)
}

/// The local profile's root from `dir`, generated and persisted on first use.
pub fn load_or_generate_self_signed(dir: &Path, trust_domain: &str) -> Result<CaMaterial, Error> {
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
    Ok(root.into_material(&format!("self-signed {}", dir.display())))
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
        let ca = CertificateAuthority::from_material("cluster.local", root.into_material("test"));
        let id = SpiffeId::new("cluster.local", "demo", "web").unwrap();
        let issued = ca.sign(&p256_csr(), &id, None).unwrap();
        assert_eq!(issued.not_after, ca.root_not_after());
    }

    #[test]
    fn expired_root_signs_nothing() {
        let long_ago = now() - Duration::from_secs(7200);
        let root = Root::generate("cluster.local", long_ago, Duration::from_secs(3600)).unwrap();
        let ca = CertificateAuthority::from_material("cluster.local", root.into_material("test"));
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
