//! Verifying ServiceAccount-shaped JWTs against a JWKS, as the cluster OIDC path will.

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

/// The only signature algorithm accepted. Pinning one algorithm (rather than trusting
/// the header) is what defeats `alg: none` and HS256-with-the-public-key confusion.
const ALG: &str = "ES256";
/// Longest `alg` value echoed in an error; the header is attacker-controlled.
const MAX_ECHOED_ALG: usize = 16;

/// Verifies ES256 JWTs shaped like projected Kubernetes ServiceAccount tokens against a
/// JSON Web Key Set: pinned algorithm, `kid` lookup, signature, `exp`/`nbf` with 60 s of
/// leeway, exact `iss`, `aud` containing the CA's audience, and a
/// `system:serviceaccount:<ns>:<name>` subject that agrees with the `kubernetes.io` claims.
pub struct JwksVerifier {
    keys: HashMap<String, DecodingKey>,
    issuer: String,
    audience: String,
    validation: Validation,
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
        let set: JwkSet = serde_json::from_str(jwks_json)
            .map_err(|e| TokenError::Jwks(format!("not a JWKS document: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some((kid, key)) = usable_key(jwk)? else {
                continue;
            };
            if keys.insert(kid.clone(), key).is_some() {
                return Err(TokenError::Jwks(format!("duplicate key id {kid:?}")));
            }
        }
        if keys.is_empty() {
            return Err(TokenError::Jwks(
                "no EC P-256 (ES256) signing key".to_owned(),
            ));
        }
        if issuer.is_empty() || audience.is_empty() {
            return Err(TokenError::Jwks(
                "issuer and audience must not be empty".to_owned(),
            ));
        }
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // iss and aud are checked on the typed claims below, exactly; jsonwebtoken's
        // subset matching on arrays is looser than we want for `iss`.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        Ok(Self {
            keys,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            validation,
        })
    }

    /// The trusted issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The audience tokens must carry.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The synchronous check behind [`TokenVerifier::verify`].
    pub fn verify_now(&self, token: &str) -> Result<Caller, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong { max: MAX_TOKEN_LEN });
        }
        let header = parse_header(token)?;
        if header.alg != ALG {
            let mut alg = header.alg;
            alg.truncate(alg.floor_char_boundary(MAX_ECHOED_ALG));
            return Err(TokenError::Algorithm(alg));
        }
        if header.crit.is_some() {
            return Err(TokenError::Malformed);
        }
        let kid = header.kid.ok_or(TokenError::MissingKeyId)?;
        let key = self.keys.get(&kid).ok_or(TokenError::UnknownKey)?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
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

impl TokenVerifier for JwksVerifier {
    fn verify<'a>(&'a self, token: &'a str) -> VerifyFuture<'a> {
        Box::pin(std::future::ready(self.verify_now(token)))
    }
}

impl fmt::Debug for JwksVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("JwksVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("kids", &kids)
            .finish()
    }
}

/// The key id and decoding key of `jwk` if it is an EC P-256 signing key, `None` if it
/// is some other kind of key, an error if it claims to be one and is broken.
fn usable_key(jwk: &Jwk) -> Result<Option<(String, DecodingKey)>, TokenError> {
    let is_p256 = jwk.kty == "EC" && jwk.crv.as_deref() == Some("P-256");
    let for_es256 = jwk.alg.as_deref().is_none_or(|a| a == ALG);
    let for_signing = jwk.use_.as_deref().is_none_or(|u| u == "sig");
    if !(is_p256 && for_es256 && for_signing) {
        return Ok(None);
    }
    let kid = jwk
        .kid
        .clone()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| TokenError::Jwks("EC key without a kid".to_owned()))?;
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
    let key = DecodingKey::from_ec_components(&x, &y)
        .map_err(|_| TokenError::Jwks(format!("key {kid:?}: invalid coordinates")))?;
    Ok(Some((kid, key)))
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
