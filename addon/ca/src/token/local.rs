//! The local profile's token issuer: a stand-in for the Kubernetes API server's
//! ServiceAccount token signer.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde::Serialize;
use trellis_identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};

use super::jwks::{Jwk, JwkSet};
use super::{Audience, Claims, JwksVerifier, KubernetesClaims, ServiceAccountRef, TokenError};
use crate::fs::{KEY_MODE, PUBLIC_MODE, ensure_dir, is_too_open, write_atomic};

/// The `iss` of locally minted tokens.
pub const LOCAL_ISSUER: &str = "https://trellis.local/issuer";
/// File name of the persisted issuer key (PKCS#8 PEM, mode 0600).
pub const ISSUER_KEY_FILE: &str = "issuer-key.pem";
/// File name of the published JWKS, rewritten from the key on every load.
pub const JWKS_FILE: &str = "jwks.json";

const PKCS8_TAG: &str = "PRIVATE KEY";

/// Mints ES256 tokens shaped like projected Kubernetes ServiceAccount tokens, and
/// publishes the matching JWKS for [`JwksVerifier`].
pub struct LocalIssuer {
    encoding: EncodingKey,
    pkcs8: Vec<u8>,
    kid: String,
    jwk: Jwk,
}

// === impl LocalIssuer ===

impl LocalIssuer {
    /// Generates an in-memory issuer key.
    pub fn generate() -> Result<Self, TokenError> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| TokenError::Mint)?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec()).ok_or(TokenError::Mint)
    }

    /// Loads `dir/issuer-key.pem`, or generates it (mode 0600, `dir` created 0700); then
    /// (re)writes `dir/jwks.json` from the key so the two can never disagree.
    pub fn load_or_generate(dir: &Path) -> Result<Self, TokenError> {
        let io = |action: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| TokenError::Io {
                action,
                path,
                source,
            }
        };
        ensure_dir(dir).map_err(io("creating directory", dir))?;
        let key_path = dir.join(ISSUER_KEY_FILE);
        let issuer = if key_path.try_exists().map_err(io("reading", &key_path))? {
            if is_too_open(&key_path).map_err(io("reading", &key_path))? {
                tracing::warn!(path = %key_path.display(), "issuer key file is readable by group or others; chmod 600 it");
            }
            let text = std::fs::read_to_string(&key_path).map_err(io("reading", &key_path))?;
            let invalid = |reason| TokenError::InvalidKey {
                path: key_path.clone(),
                reason,
            };
            let block = pem::parse(&text).map_err(|_| invalid("not PEM"))?;
            if block.tag() != PKCS8_TAG {
                return Err(invalid("expected a PRIVATE KEY (PKCS#8) block"));
            }
            Self::from_pkcs8(block.into_contents())
                .ok_or_else(|| invalid("not an EC P-256 PKCS#8 key"))?
        } else {
            let issuer = Self::generate()?;
            let text = pem::encode(&pem::Pem::new(PKCS8_TAG, issuer.pkcs8.clone()));
            write_atomic(&key_path, text.as_bytes(), KEY_MODE).map_err(io("writing", &key_path))?;
            issuer
        };
        let jwks_path = dir.join(JWKS_FILE);
        write_atomic(&jwks_path, issuer.jwks_json().as_bytes(), PUBLIC_MODE)
            .map_err(io("writing", &jwks_path))?;
        Ok(issuer)
    }

    /// The `iss` claim of minted tokens.
    pub fn issuer(&self) -> &str {
        LOCAL_ISSUER
    }

    /// The key id (`kid`): the RFC 7638 JWK thumbprint of the public key.
    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWKS document (`kty` EC, `crv` P-256, `x`, `y`, `kid`, `alg`
    /// ES256, `use` sig).
    pub fn jwks_json(&self) -> String {
        let set = JwkSet {
            keys: vec![self.jwk.clone()],
        };
        // Serialising plain strings cannot fail.
        serde_json::to_string_pretty(&set).unwrap_or_default()
    }

    /// A verifier that trusts exactly this issuer for `audience`.
    pub fn verifier(&self, audience: &str) -> Result<JwksVerifier, TokenError> {
        JwksVerifier::new(&self.jwks_json(), LOCAL_ISSUER, audience)
    }

    /// Mints a token for `namespace`/`service_account`, valid for `ttl` from now, shaped
    /// like a projected ServiceAccount token: `sub` is
    /// `system:serviceaccount:<ns>:<sa>`, `aud` is `[audience]`, and the `kubernetes.io`
    /// claim carries the namespace and service account name and uid.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        ttl: Duration,
    ) -> Result<String, TokenError> {
        SpiffeId::new(DEFAULT_TRUST_DOMAIN, namespace, service_account)
            .map_err(TokenError::InvalidName)?;
        let now = unix_now();
        let claims = Claims {
            iss: LOCAL_ISSUER.to_owned(),
            sub: format!("{}{namespace}:{service_account}", super::SUBJECT_PREFIX),
            aud: Audience::Many(vec![audience.to_owned()]),
            exp: now.saturating_add(ttl.as_secs()),
            iat: Some(now),
            nbf: Some(now),
            kubernetes: KubernetesClaims {
                namespace: namespace.to_owned(),
                serviceaccount: ServiceAccountRef {
                    name: service_account.to_owned(),
                    uid: service_account_uid(namespace, service_account),
                },
            },
        };
        self.encode(&self.kid, &claims)
    }

    /// Signs arbitrary claims under an arbitrary `kid` (tests forge tokens with this).
    pub(super) fn encode(&self, kid: &str, claims: &impl Serialize) -> Result<String, TokenError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|_| TokenError::Mint)
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Option<Self> {
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &SystemRandom::new(),
        )
        .ok()?;
        // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
        let point = pair.public_key().as_ref();
        let (x, y) = point.get(1..)?.split_at_checked(32)?;
        let x = URL_SAFE_NO_PAD.encode(x);
        let y = URL_SAFE_NO_PAD.encode(y);
        let kid = thumbprint(&x, &y);
        let jwk = Jwk {
            kty: "EC".to_owned(),
            crv: Some("P-256".to_owned()),
            x: Some(x),
            y: Some(y),
            n: None,
            e: None,
            kid: Some(kid.clone()),
            alg: Some("ES256".to_owned()),
            use_: Some("sig".to_owned()),
        };
        Some(Self {
            encoding: EncodingKey::from_ec_der(&pkcs8),
            pkcs8,
            kid,
            jwk,
        })
    }
}

impl fmt::Debug for LocalIssuer {
    // The private key is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalIssuer")
            .field("issuer", &LOCAL_ISSUER)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// RFC 7638 thumbprint of an EC key: SHA-256 over the required members in
/// lexicographic order, base64url. Stable across restarts because it depends only on
/// the key.
fn thumbprint(x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// A stable UUID-shaped uid per service account, standing in for the object uid the
/// Kubernetes API server would put in the token.
fn service_account_uid(namespace: &str, name: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{namespace}/{name}").as_bytes(),
    );
    let b = digest.as_ref();
    let hex: String = b.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
