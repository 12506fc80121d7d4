//! Verifying ServiceAccount-shaped JWTs against a JWKS: [`JwksVerifier`] for a fixed key
//! set, and the checks it shares with the OIDC verifier (`oidc.rs`), which fetches its keys.

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use trellis_identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};

use super::{
    Caller, Claims, LEEWAY_SECS, MAX_TOKEN_LEN, TokenError, TokenVerifier, VerifyFuture,
    parse_subject,
};

/// Longest `alg` value echoed in an error; the header is attacker-controlled.
const MAX_ECHOED_ALG: usize = 16;
/// Smallest and largest RSA modulus accepted, in bytes (2048 and 8192 bits): the range
/// ring verifies, and nothing a caller could weaken.
const RSA_MODULUS_BYTES: std::ops::RangeInclusive<usize> = 256..=1024;

/// Verifies ES256 JWTs shaped like projected Kubernetes ServiceAccount tokens against a
/// JSON Web Key Set: pinned algorithm, `kid` lookup, signature, `exp`/`nbf` with 60 s of
/// leeway, exact `iss`, `aud` containing the CA's audience, and a
/// `system:serviceaccount:<ns>:<name>` subject that agrees with the `kubernetes.io` claims.
pub struct JwksVerifier {
    keys: KeySet,
    rules: Rules,
}

/// Which signature algorithms a verifier accepts. Pinned per verifier, and per key (a
/// token's `alg` must be its key's), never taken from the token: that is what defeats
/// `alg: none` and HS256-with-the-public-key confusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Algorithms {
    /// ES256 only: the local issuer's tokens.
    Es256,
    /// RS256 or ES256: what a Kubernetes API server signs ServiceAccount tokens with.
    Kubernetes,
}

/// The usable keys of a JWKS, by key id.
pub(super) struct KeySet {
    keys: HashMap<String, VerifyKey>,
}

struct VerifyKey {
    alg: Algorithm,
    key: DecodingKey,
}

/// Every check on a token except where its keys come from: shared by [`JwksVerifier`]
/// (a fixed JWKS) and the OIDC verifier (a fetched one).
pub(super) struct Rules {
    issuer: String,
    audience: String,
    algorithms: Algorithms,
    es256: Validation,
    rs256: Validation,
}

/// One JSON Web Key (RFC 7517), as much of it as EC signing keys need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Jwk {
    pub(super) kty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) n: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) e: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) alg: Option<String>,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub(super) use_: Option<String>,
}

/// A JWKS document: `{"keys": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct JwkSet {
    pub(super) keys: Vec<Jwk>,
}

/// The part of a JOSE header that decides how a token is checked.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// Critical extensions we would have to understand; we understand none.
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

// === impl JwksVerifier ===

impl JwksVerifier {
    /// Builds a verifier from a JWKS document, the exact issuer (`iss`) to trust and the
    /// audience that must appear in `aud`.
    ///
    /// Keys that are not EC P-256 signing keys (e.g. a cluster's RSA keys) are skipped;
    /// at least one usable key must remain, and key ids must be unique.
    pub fn new(jwks_json: &str, issuer: &str, audience: &str) -> Result<Self, TokenError> {
        let keys = KeySet::parse(jwks_json, Algorithms::Es256)?;
        let rules = Rules::new(issuer, audience, Algorithms::Es256)?;
        Ok(Self { keys, rules })
    }

    /// The trusted issuer.
    pub fn issuer(&self) -> &str {
        self.rules.issuer()
    }

    /// The audience tokens must carry.
    pub fn audience(&self) -> &str {
        &self.rules.audience
    }

    /// The synchronous check behind [`TokenVerifier::verify`].
    pub fn verify_now(&self, token: &str) -> Result<Caller, TokenError> {
        self.rules.verify(&self.keys, token)
    }
}

impl TokenVerifier for JwksVerifier {
    fn verify<'a>(&'a self, token: &'a str) -> VerifyFuture<'a> {
        Box::pin(std::future::ready(self.verify_now(token)))
    }
}

impl fmt::Debug for JwksVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksVerifier")
            .field("issuer", &self.rules.issuer)
            .field("audience", &self.rules.audience)
            .field("kids", &self.keys.key_ids())
            .finish()
    }
}

// === impl Algorithms ===

impl Algorithms {
    /// The algorithm a header's `alg` names, if accepted.
    fn accepts(self, alg: &str) -> Option<Algorithm> {
        match (self, alg) {
            (_, "ES256") => Some(Algorithm::ES256),
            (Self::Kubernetes, "RS256") => Some(Algorithm::RS256),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Es256 => "EC P-256 (ES256)",
            Self::Kubernetes => "RSA (RS256) or EC P-256 (ES256)",
        }
    }
}

// === impl KeySet ===

impl KeySet {
    /// The keys of `jwks_json` usable under `algorithms`. Keys of other types are
    /// skipped; at least one usable key must remain, and key ids must be unique.
    pub(super) fn parse(jwks_json: &str, algorithms: Algorithms) -> Result<Self, TokenError> {
        let set: JwkSet = serde_json::from_str(jwks_json)
            .map_err(|e| TokenError::Jwks(format!("not a JWKS document: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some((kid, key)) = usable_key(jwk, algorithms)? else {
                continue;
            };
            if keys.insert(kid.clone(), key).is_some() {
                return Err(TokenError::Jwks(format!("duplicate key id {kid:?}")));
            }
        }
        if keys.is_empty() {
            return Err(TokenError::Jwks(format!(
                "no {} signing key",
                algorithms.describe()
            )));
        }
        Ok(Self { keys })
    }

    /// The key ids, sorted.
    pub(super) fn key_ids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }
}

// === impl Rules ===

impl Rules {
    /// Tokens must name exactly `issuer`, carry `audience` and be signed with one of
    /// `algorithms`.
    pub(super) fn new(
        issuer: &str,
        audience: &str,
        algorithms: Algorithms,
    ) -> Result<Self, TokenError> {
        if issuer.is_empty() || audience.is_empty() {
            return Err(TokenError::Jwks(
                "issuer and audience must not be empty".to_owned(),
            ));
        }
        let validation = |alg| {
            let mut v = Validation::new(alg);
            v.leeway = LEEWAY_SECS;
            v.validate_exp = true;
            v.validate_nbf = true;
            // iss and aud are checked on the typed claims below, exactly; jsonwebtoken's
            // subset matching on arrays is looser than we want for `iss`.
            v.validate_aud = false;
            v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
            v
        };
        Ok(Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            algorithms,
            es256: validation(Algorithm::ES256),
            rs256: validation(Algorithm::RS256),
        })
    }

    /// The trusted issuer.
    pub(super) fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The checks that need no key: size, a three-part JWS, an accepted `alg`, no `crit`,
    /// a `kid`. Returns the key id. A token failing these never causes I/O.
    pub(super) fn precheck(&self, token: &str) -> Result<(String, Algorithm), TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong { max: MAX_TOKEN_LEN });
        }
        let header = parse_header(token)?;
        let Some(alg) = self.algorithms.accepts(&header.alg) else {
            let mut alg = header.alg;
            alg.truncate(alg.floor_char_boundary(MAX_ECHOED_ALG));
            return Err(TokenError::Algorithm(alg));
        };
        if header.crit.is_some() {
            return Err(TokenError::Malformed);
        }
        let kid = header.kid.ok_or(TokenError::MissingKeyId)?;
        Ok((kid, alg))
    }

    /// Verifies `token` against `keys`: [`Rules::precheck`], then the key its `kid` names
    /// (whose algorithm must be the header's), the signature, `exp`/`nbf`, `iss`, `aud` and
    /// the subject.
    pub(super) fn verify(&self, keys: &KeySet, token: &str) -> Result<Caller, TokenError> {
        let (kid, alg) = self.precheck(token)?;
        let key = keys.keys.get(&kid).ok_or(TokenError::UnknownKey)?;
        if key.alg != alg {
            // An RS256 header on an EC key (or the reverse): never let the header choose.
            return Err(TokenError::Algorithm(format!("{alg:?}")));
        }
        let validation = match alg {
            Algorithm::RS256 => &self.rs256,
            _ => &self.es256,
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, validation)
            .map_err(|e| map_jwt_error(e.kind()))?
            .claims;

        if claims.iss != self.issuer {
            return Err(TokenError::Issuer);
        }
        if !claims.aud.contains(&self.audience) {
            return Err(TokenError::Audience(self.audience.clone()));
        }
        let (namespace, name) = parse_subject(&claims.sub).ok_or(TokenError::Subject)?;
        if claims.kubernetes.namespace != namespace || claims.kubernetes.serviceaccount.name != name
        {
            return Err(TokenError::ClaimsMismatch);
        }
        // Any trust domain will do: this only applies SpiffeId's segment grammar, so a
        // token can never name a workload the CA could not put in a certificate.
        SpiffeId::new(DEFAULT_TRUST_DOMAIN, namespace, name).map_err(TokenError::InvalidName)?;
        Ok(Caller {
            namespace: namespace.to_owned(),
            service_account: name.to_owned(),
        })
    }
}

/// The key id and verification key of `jwk` if it is a signing key `algorithms` accepts
/// (EC P-256; RSA too for [`Algorithms::Kubernetes`]), `None` if it is some other kind of
/// key, an error if it claims to be one and is broken.
fn usable_key(
    jwk: &Jwk,
    algorithms: Algorithms,
) -> Result<Option<(String, VerifyKey)>, TokenError> {
    let for_signing = jwk.use_.as_deref().is_none_or(|u| u == "sig");
    let alg = match jwk.kty.as_str() {
        "EC" if jwk.crv.as_deref() == Some("P-256") => Algorithm::ES256,
        "RSA" if algorithms == Algorithms::Kubernetes => Algorithm::RS256,
        _ => return Ok(None),
    };
    let alg_name = match alg {
        Algorithm::RS256 => "RS256",
        _ => "ES256",
    };
    if !(for_signing && jwk.alg.as_deref().is_none_or(|a| a == alg_name)) {
        return Ok(None);
    }
    let kid = jwk
        .kid
        .clone()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| TokenError::Jwks(format!("{} key without a kid", jwk.kty)))?;
    let key = match alg {
        Algorithm::RS256 => rsa_key(jwk, &kid)?,
        _ => ec_key(jwk, &kid)?,
    };
    Ok(Some((kid, VerifyKey { alg, key })))
}

fn ec_key(jwk: &Jwk, kid: &str) -> Result<DecodingKey, TokenError> {
    let coord = |c: &Option<String>, name: &str| -> Result<String, TokenError> {
        let bad = || {
            TokenError::Jwks(format!(
                "key {kid:?}: {name} is not a 32-byte base64url value"
            ))
        };
        let value = c.as_deref().ok_or_else(bad)?;
        match URL_SAFE_NO_PAD.decode(value) {
            Ok(bytes) if bytes.len() == 32 => Ok(value.to_owned()),
            _ => Err(bad()),
        }
    };
    let x = coord(&jwk.x, "x")?;
    let y = coord(&jwk.y, "y")?;
    DecodingKey::from_ec_components(&x, &y)
        .map_err(|_| TokenError::Jwks(format!("key {kid:?}: invalid coordinates")))
}

fn rsa_key(jwk: &Jwk, kid: &str) -> Result<DecodingKey, TokenError> {
    let decode = |v: &Option<String>| v.as_deref().and_then(|v| URL_SAFE_NO_PAD.decode(v).ok());
    let n = decode(&jwk.n)
        .ok_or_else(|| TokenError::Jwks(format!("key {kid:?}: n is not base64url")))?;
    let e = decode(&jwk.e)
        .ok_or_else(|| TokenError::Jwks(format!("key {kid:?}: e is not base64url")))?;
    let modulus = n.iter().position(|b| *b != 0).map_or(&n[..0], |i| &n[i..]);
    if !RSA_MODULUS_BYTES.contains(&modulus.len()) {
        return Err(TokenError::Jwks(format!(
            "key {kid:?}: RSA modulus of {} bits; 2048 to 8192 are accepted",
            modulus.len() * 8
        )));
    }
    if e.is_empty() || e.len() > 4 {
        return Err(TokenError::Jwks(format!(
            "key {kid:?}: invalid RSA exponent"
        )));
    }
    Ok(DecodingKey::from_rsa_raw_components(modulus, &e))
}

/// Decodes the JOSE header without trusting anything in it yet.
fn parse_header(token: &str) -> Result<Header, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
}

/// Maps jsonwebtoken's errors onto ours, dropping their details (which may quote claims).
fn map_jwt_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey | ErrorKind::Crypto(_) => {
            TokenError::Signature
        }
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::Issuer,
        _ => TokenError::Malformed,
    }
}
