//! The `keyvault-key` CA source: a root key that never leaves Key Vault signs a short-lived
//! intermediate whose key lives only in the control plane's memory.
//!
//! The root is a non-exportable EC P-256 key in Key Vault; its self-signed certificate
//! (made by [`create_root_key`](crate::create_root_key)) is stored as a secret. At start and
//! before the intermediate expires the control plane calls
//! [`KeyVaultKeySource::issue_intermediate`]: one `get_secret`, one `get_key` and exactly
//! one `sign` per intermediate, whatever the number of workloads, because every leaf is then
//! signed locally by the intermediate.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, StatusCode};
use azure_security_keyvault_keys::models::{
    CurveName, Key, KeyClientSignOptions, KeyType, SignParameters, SignatureAlgorithm,
};
use azure_security_keyvault_keys::{KeyClient, ResourceExt};
use azure_security_keyvault_secrets::SecretClient;
use rcgen::{Issuer, KeyPair, PublicKeyData, SigningKey};
use tokio::runtime::Handle;
use tracing::info;
use trellis_ca::CaPems;

use crate::Error;
use crate::error::key_vault_error;
use crate::pki::{self, CaRole, ParsedCert};
use crate::vault::{Vault, require_secret};

/// Default name of the Key Vault key holding the root.
pub const DEFAULT_ROOT_KEY: &str = "trellis-root";
/// Default name of the secret holding the root certificate (PEM).
pub const DEFAULT_ROOT_CERT_SECRET: &str = "trellis-root-cert";

/// The DER SubjectPublicKeyInfo header of an uncompressed EC P-256 point: SEQUENCE {
/// AlgorithmIdentifier { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes follow) }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// An uncompressed P-256 point: 0x04 || x || y.
const P256_POINT_LEN: usize = 65;
/// An ES256 signature as JWS (and Key Vault) encode it: r || s, 32 bytes each.
const ES256_RAW_LEN: usize = 64;

/// Issues intermediates signed by a root key held in Key Vault.
pub struct KeyVaultKeySource {
    vault: String,
    key_name: String,
    root_cert_secret: String,
    secrets: SecretClient,
    keys: Arc<KeyClient>,
}

impl KeyVaultKeySource {
    /// A source for root key `key_name` whose certificate is in secret `root_cert_secret`
    /// (see [`Vault::new`] for what the URL and options must be).
    pub fn new(
        vault_url: &str,
        key_name: &str,
        root_cert_secret: &str,
        credential: Arc<dyn TokenCredential>,
        options: ClientOptions,
    ) -> Result<Self, Error> {
        Self::from_vault(
            &Vault::new(vault_url, credential, options)?,
            key_name,
            root_cert_secret,
        )
    }

    /// `<vault url> key <name>`, for logs.
    pub fn label(&self) -> String {
        format!("{} key {}", self.vault, self.key_name)
    }

    /// The same, for an existing [`Vault`].
    pub fn from_vault(
        vault: &Vault,
        key_name: &str,
        root_cert_secret: &str,
    ) -> Result<Self, Error> {
        Ok(Self {
            vault: vault.url().to_owned(),
            key_name: key_name.to_owned(),
            root_cert_secret: root_cert_secret.to_owned(),
            secrets: vault.secret_client()?,
            keys: Arc::new(vault.key_client()?),
        })
    }

    /// Builds a new intermediate CA for `trust_domain` and has Key Vault sign it with the
    /// root key. Returns the CA material (the intermediate's key only in memory) and the
    /// intermediate's `notAfter` = min(now + `lifetime`, the root's `notAfter`).
    ///
    /// The root certificate secret may hold several roots (during a root rotation); the one
    /// whose public key is the Key Vault key's signs, and all of them go to `root_cert`.
    pub async fn issue_intermediate(
        &self,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<(CaPems, SystemTime), Error> {
        pki::check_trust_domain(trust_domain)?;
        let vault = self.vault.as_str();
        let root_pem = require_secret(&self.secrets, vault, &self.root_cert_secret).await?;
        let secret_object = || format!("secret {}", self.root_cert_secret);
        let roots = pki::parse_pem_certs(&root_pem).map_err(|reason| Error::Invalid {
            vault: vault.to_owned(),
            object: secret_object(),
            reason,
        })?;
        let key = get_key(&self.keys, vault, &self.key_name)
            .await?
            .ok_or_else(|| Error::KeyVault {
                vault: vault.to_owned(),
                operation: "get",
                object: format!("key {}", self.key_name),
                status: Some(404),
                code: Some("KeyNotFound".to_owned()),
                message: "the root key does not exist; create it with `trellis ca create`"
                    .to_owned(),
            })?;
        let spki = key.spki();
        let root = roots
            .into_iter()
            .find(|cert| cert.spki == spki)
            .ok_or_else(|| Error::RootKeyMismatch {
                vault: vault.to_owned(),
                key: self.key_name.clone(),
                secret: self.root_cert_secret.clone(),
            })?;
        let invalid = |reason: String| Error::Invalid {
            vault: vault.to_owned(),
            object: secret_object(),
            reason,
        };
        check_root(&root, trust_domain).map_err(invalid)?;

        let now = pki::now();
        if root.not_after <= now {
            return Err(invalid(format!(
                "the root certificate expired at {}",
                root.not_after
            )));
        }
        let not_after = pki::expiry(now, lifetime)?.min(root.not_after);
        let params = pki::ca_params(CaRole::Intermediate, trust_domain, now, not_after)?;
        let signer = KeyVaultSigner::new(self.keys.clone(), vault, &self.key_name, key)?;
        let root_der = root.der.clone();
        let (cert_pem, cert_der, key_pem) = on_blocking_thread(move || {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(|e| Error::Certificate(e.to_string()))?;
            let issuer = Issuer::from_ca_cert_der(&root_der.as_slice().into(), signer)
                .map_err(|e| Error::Certificate(format!("root certificate: {e}")))?;
            let cert = params
                .signed_by(&key, &issuer)
                .map_err(|e| issuer.key().failure_or(e))?;
            Ok((cert.pem(), cert.der().to_vec(), key.serialize_pem()))
        })
        .await?;
        // Key Vault's signature must verify under the root before the CA trusts it: a wrong
        // key version or a mangled signature would otherwise reach every proxy.
        pki::verify_signed_by(&cert_der, Some(&root.der)).map_err(|reason| Error::Invalid {
            vault: vault.to_owned(),
            object: format!("key {}", self.key_name),
            reason: format!("its signature does not verify under the root: {reason}"),
        })?;
        info!(
            vault,
            key = %self.key_name,
            trust_domain,
            not_after = %not_after,
            "issued an intermediate CA signed by the Key Vault root key"
        );
        Ok((
            CaPems {
                root_cert: root_pem,
                ca_cert: cert_pem.clone(),
                ca_key: key_pem,
                cert_chain: cert_pem,
            },
            not_after.into(),
        ))
    }
}

impl std::fmt::Debug for KeyVaultKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVaultKeySource")
            .field("vault", &self.vault)
            .field("key_name", &self.key_name)
            .field("root_cert_secret", &self.root_cert_secret)
            .finish_non_exhaustive()
    }
}

fn check_root(root: &ParsedCert, trust_domain: &str) -> Result<(), String> {
    if !root.is_ca {
        return Err("the root certificate is not a CA certificate".to_owned());
    }
    match root.trust_domain.as_deref() {
        Some(found) if found != trust_domain => Err(format!(
            "the root certificate is for trust domain {found:?}, not {trust_domain:?}"
        )),
        _ => Ok(()),
    }
}

/// Runs rcgen's synchronous build on the blocking pool.
///
/// rcgen's `SigningKey::sign` is synchronous, but signing with Key Vault is an HTTP call:
/// [`KeyVaultSigner::sign`] waits for it with `Handle::block_on`, which panics on a runtime
/// worker thread and would stall the runtime if it did not. A `spawn_blocking` thread may
/// block, and the runtime keeps driving the request's I/O meanwhile.
pub(crate) async fn on_blocking_thread<T: Send + 'static>(
    build: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(build)
        .await
        .map_err(|e| Error::Task(e.to_string()))?
}

/// A Key Vault EC P-256 key's public half, as `get_key` or `create_key` returned it.
#[derive(Debug, Clone)]
pub(crate) struct VaultKey {
    /// The key's id: `https://<vault>/keys/<name>/<version>`.
    pub(crate) kid: String,
    /// The version signing uses, so the signature matches the public key we checked.
    pub(crate) version: String,
    /// 0x04 || x || y.
    pub(crate) point: Vec<u8>,
}

impl VaultKey {
    /// The key as a DER SubjectPublicKeyInfo, comparable with a certificate's.
    pub(crate) fn spki(&self) -> Vec<u8> {
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&self.point);
        spki
    }

    pub(crate) fn from_model(vault: &str, name: &str, key: &Key) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::Invalid {
            vault: vault.to_owned(),
            object: format!("key {name}"),
            reason: reason.to_owned(),
        };
        let jwk = key
            .key
            .as_ref()
            .ok_or_else(|| invalid("the response has no key"))?;
        if !matches!(jwk.kty, Some(KeyType::Ec | KeyType::EcHsm))
            || !matches!(jwk.crv, Some(CurveName::P256))
        {
            return Err(invalid("not an EC P-256 key"));
        }
        let (Some(x), Some(y)) = (&jwk.x, &jwk.y) else {
            return Err(invalid("the key has no x or y coordinate"));
        };
        if x.len() != 32 || y.len() != 32 {
            return Err(invalid("a P-256 coordinate is not 32 bytes"));
        }
        let id = key
            .resource_id()
            .map_err(|e| invalid(&format!("no usable key id: {e}")))?;
        let version = id
            .version
            .filter(|v| !v.is_empty())
            .ok_or_else(|| invalid("the key id has no version"))?;
        let mut point = Vec::with_capacity(P256_POINT_LEN);
        point.push(0x04);
        point.extend_from_slice(x);
        point.extend_from_slice(y);
        Ok(Self {
            kid: id.source_id,
            version,
            point,
        })
    }
}

/// The latest version of key `name`; `None` when it does not exist (404).
pub(crate) async fn get_key(
    client: &KeyClient,
    vault: &str,
    name: &str,
) -> Result<Option<VaultKey>, Error> {
    let response = match client.get_key(name, None).await {
        Ok(response) => response,
        Err(e) if e.http_status() == Some(StatusCode::NotFound) => return Ok(None),
        Err(e) => return Err(key_vault_error(vault, "get", format!("key {name}"), &e)),
    };
    let key = response
        .into_model()
        .map_err(|e| key_vault_error(vault, "get", format!("key {name}"), &e))?;
    VaultKey::from_model(vault, name, &key).map(Some)
}

/// An `rcgen` signing key whose private half is a Key Vault key: `sign` hashes with SHA-256
/// and asks Key Vault for an ES256 signature. One call per certificate built.
///
/// `sign` blocks on the runtime, so certificates must be built on a blocking thread
/// ([`on_blocking_thread`]). rcgen's error type cannot carry our error, so a failure is kept
/// here and taken back with [`KeyVaultSigner::failure_or`].
pub(crate) struct KeyVaultSigner {
    keys: Arc<KeyClient>,
    runtime: Handle,
    vault: String,
    key_name: String,
    key: VaultKey,
    failure: Mutex<Option<Error>>,
}

impl KeyVaultSigner {
    /// Must be called inside the tokio runtime that will drive the signing requests.
    pub(crate) fn new(
        keys: Arc<KeyClient>,
        vault: &str,
        key_name: &str,
        key: VaultKey,
    ) -> Result<Self, Error> {
        let runtime = Handle::try_current().map_err(|e| {
            Error::Task(format!("signing with Key Vault needs a tokio runtime: {e}"))
        })?;
        Ok(Self {
            keys,
            runtime,
            vault: vault.to_owned(),
            key_name: key_name.to_owned(),
            key,
            failure: Mutex::new(None),
        })
    }

    /// The error behind rcgen's `RemoteKeyError`, or `err` itself when signing did not fail.
    pub(crate) fn failure_or(&self, err: rcgen::Error) -> Error {
        self.failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| Error::Certificate(err.to_string()))
    }

    fn sign_remote(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        let object = || format!("key {}", self.key_name);
        let digest = ring::digest::digest(&ring::digest::SHA256, msg);
        let parameters = SignParameters {
            algorithm: Some(SignatureAlgorithm::Es256),
            value: Some(digest.as_ref().to_vec()),
        };
        let options = KeyClientSignOptions {
            key_version: Some(self.key.version.clone()),
            ..KeyClientSignOptions::default()
        };
        let result = self
            .runtime
            .block_on(async {
                let body = parameters.try_into()?;
                self.keys
                    .sign(&self.key_name, body, Some(options))
                    .await?
                    .into_model()
            })
            .map_err(|e| key_vault_error(&self.vault, "sign", object(), &e))?;
        let raw = result.result.unwrap_or_default();
        es256_raw_to_der(&raw).ok_or_else(|| Error::Invalid {
            vault: self.vault.clone(),
            object: object(),
            reason: format!(
                "the ES256 signature is {} bytes, expected {ES256_RAW_LEN}",
                raw.len()
            ),
        })
    }
}

impl PublicKeyData for KeyVaultSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.key.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for KeyVaultSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_remote(msg).map_err(|e| {
            *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}

/// Converts an ES256 signature from JWS form (r || s, 32 bytes each, as Key Vault returns
/// it) to the DER `ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }` X.509 carries.
/// `None` unless `raw` is 64 bytes.
pub(crate) fn es256_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() != ES256_RAW_LEN {
        return None;
    }
    let (r, s) = raw.split_at(ES256_RAW_LEN / 2);
    let (r, s) = (der_integer(r), der_integer(s));
    // At most 2 × 35 bytes: always the short length form.
    let len = u8::try_from(r.len() + s.len()).ok()?;
    let mut der = Vec::with_capacity(2 + usize::from(len));
    der.extend_from_slice(&[0x30, len]);
    der.extend_from_slice(&r);
    der.extend_from_slice(&s);
    Some(der)
}

/// A non-negative big-endian integer as a minimal DER INTEGER of at most 33 content bytes:
/// leading zeros dropped (one kept for zero), and a 0x00 prepended when the top bit is set,
/// which would otherwise make it negative.
fn der_integer(magnitude: &[u8]) -> Vec<u8> {
    let first = magnitude
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(magnitude.len().saturating_sub(1));
    let digits = magnitude.get(first..).unwrap_or_default();
    let digits: &[u8] = if digits.is_empty() { &[0] } else { digits };
    let pad = digits[0] & 0x80 != 0;
    let mut out = Vec::with_capacity(3 + digits.len());
    out.push(0x02);
    out.push(u8::try_from(digits.len() + usize::from(pad)).unwrap_or(u8::MAX));
    if pad {
        out.push(0x00);
    }
    out.extend_from_slice(digits);
    out
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
        UnparsedPublicKey,
    };

    use super::*;

    #[test]
    fn der_integer_is_minimal_and_positive() {
        let mut r = [0u8; 32];
        r[0] = 0x80;
        r[31] = 0x01;
        let mut s = [0u8; 32];
        s[2] = 0x7f;
        s[31] = 0x02;
        let der = es256_raw_to_der(&[r, s].concat()).unwrap();
        let mut want = vec![0x30, 35 + 32, 0x02, 33, 0x00];
        want.extend_from_slice(&r);
        want.extend_from_slice(&[0x02, 30]);
        want.extend_from_slice(&s[2..]);
        assert_eq!(der, want);
        assert_eq!(der[1] as usize, der.len() - 2);
    }

    #[test]
    fn der_integer_edge_cases() {
        assert_eq!(der_integer(&[0; 32]), vec![0x02, 0x01, 0x00]);
        assert_eq!(der_integer(&[0, 0, 0x01]), vec![0x02, 0x01, 0x01]);
        assert_eq!(der_integer(&[0, 0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der_integer(&[0xff; 32]).len(), 2 + 33);
        // A leading zero byte followed by a high bit keeps exactly one zero.
        assert_eq!(
            der_integer(&[0, 0, 0xc0, 1]),
            vec![0x02, 0x03, 0x00, 0xc0, 0x01]
        );
        assert!(es256_raw_to_der(&[1; 63]).is_none());
        assert!(es256_raw_to_der(&[1; 65]).is_none());
    }

    /// Signatures in r||s form from ring, converted, verify as DER with ring. Signs until
    /// both interesting shapes were seen: a high-bit r or s (needs a 0x00 pad, about 3 in 4
    /// signatures) and a leading zero byte (must be stripped, about 1 in 128).
    #[test]
    fn converted_signatures_verify_as_der() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
        let (mut high_bit, mut leading_zero) = (0, 0);
        for i in 0u32..20_000 {
            let msg = i.to_be_bytes();
            let raw = key.sign(&rng, &msg).unwrap();
            let raw = raw.as_ref();
            let der = es256_raw_to_der(raw).unwrap();
            public.verify(&msg, &der).unwrap();
            high_bit += usize::from(raw[0] & 0x80 != 0 || raw[32] & 0x80 != 0);
            leading_zero += usize::from(raw[0] == 0 || raw[32] == 0);
            if high_bit > 0 && leading_zero > 0 {
                return;
            }
        }
        panic!("not both shapes seen: high bit {high_bit}, leading zero {leading_zero}");
    }

    #[test]
    fn spki_of_a_point_matches_rcgen() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let vault_key = VaultKey {
            kid: "https://kv/keys/k/v".into(),
            version: "v".into(),
            point: key.public_key_raw().to_vec(),
        };
        assert_eq!(vault_key.spki(), key.subject_public_key_info());
    }

    #[test]
    fn root_must_be_a_ca_for_the_trust_domain() {
        let now = pki::now();
        let not_after = pki::expiry(now, Duration::from_secs(600)).unwrap();
        let params = pki::ca_params(CaRole::Root, "td.one", now, not_after).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let root = pki::parse_pem_certs(&pem).unwrap().remove(0);
        check_root(&root, "td.one").unwrap();
        assert_eq!(
            check_root(&root, "td.two").unwrap_err(),
            "the root certificate is for trust domain \"td.one\", not \"td.two\""
        );
    }
}
