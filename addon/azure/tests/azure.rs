//! The Key Vault CA sources and `trellis ca` functions against the Entra ID and Key Vault
//! stand-ins, through the real SDK: `WorkloadIdentityCredential` exchanging a federated
//! token, `SecretClient` / `KeyClient` with the challenge flow.

// Test helpers fail loudly: a broken fixture is a bug in the test.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use azure_core::credentials::TokenCredential;
use azure_security_keyvault_keys::KeyClient;
use azure_security_keyvault_keys::models::{CreateKeyParameters, CurveName, KeyOperation, KeyType};
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, PublicKeyData, SanType,
};
use tempfile::NamedTempFile;
use trellis_azure::stand_in::{AzureStandIn, VAULT_HOST};
use trellis_azure::{
    CaLayout, Error, Expiry, KeyVaultKeySource, KeyVaultSecretsSource, SecretNames, Vault,
    create_plugin_secrets, create_root_key, show,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const TD: &str = "cluster.local";
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const YEAR: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// A running stand-in and a vault reached with the real workload identity credential.
struct Fixture {
    azure: AzureStandIn,
    credential: Arc<dyn TokenCredential>,
    vault: Vault,
    // Held so the token file outlives the credential that re-reads it.
    _token_file: NamedTempFile,
}

async fn fixture() -> Fixture {
    let azure = AzureStandIn::start().await.unwrap();
    let token_file = azure.federated_token_file().unwrap();
    let credential = azure.credential(token_file.path()).unwrap();
    let vault = azure.vault(credential.clone()).unwrap();
    Fixture {
        azure,
        credential,
        vault,
        _token_file: token_file,
    }
}

impl Fixture {
    fn secrets_source(&self, names: SecretNames) -> KeyVaultSecretsSource {
        KeyVaultSecretsSource::new(
            &self.azure.vault_url(),
            self.credential.clone(),
            names,
            self.azure.client_options().unwrap(),
        )
        .unwrap()
    }

    fn key_source(&self, key: &str, secret: &str) -> KeyVaultKeySource {
        KeyVaultKeySource::new(
            &self.azure.vault_url(),
            key,
            secret,
            self.credential.clone(),
            self.azure.client_options().unwrap(),
        )
        .unwrap()
    }
}

fn parse(pem_text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(pem_text)
        .unwrap()
        .into_iter()
        .map(|p| {
            assert_eq!(p.tag(), "CERTIFICATE");
            p.into_contents()
        })
        .collect()
}

fn one_cert(pem_text: &str) -> Vec<u8> {
    let mut certs = parse(pem_text);
    assert_eq!(certs.len(), 1, "exactly one certificate");
    certs.remove(0)
}

fn x509(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

fn path_len(cert: &X509Certificate<'_>) -> Option<u32> {
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca, "CA:TRUE");
    bc.path_len_constraint
}

/// `after - before`, per operation, leaving out operations that did not move.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(op, n)| (op.clone(), n - before.get(op).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

// === keyvault-secret ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_secrets_round_trip_byte_identical() {
    let fx = fixture().await;
    let names = SecretNames::default();
    let uploaded = create_plugin_secrets(&fx.vault, &names, TD, 10 * YEAR, YEAR, false)
        .await
        .unwrap();
    // What the vault holds is what was generated, byte for byte.
    assert_eq!(fx.azure.secret("root-cert").unwrap(), uploaded.root_cert);
    assert_eq!(fx.azure.secret("ca-cert").unwrap(), uploaded.ca_cert);
    assert_eq!(fx.azure.secret("ca-key").unwrap(), uploaded.ca_key);
    assert_eq!(fx.azure.secret("cert-chain").unwrap(), uploaded.cert_chain);

    // The generated material is a usable plug-in CA: intermediate under root, key matches.
    let root_der = one_cert(&uploaded.root_cert);
    let ca_der = one_cert(&uploaded.ca_cert);
    let (root, ca) = (x509(&root_der), x509(&ca_der));
    ca.verify_signature(Some(root.public_key())).unwrap();
    root.verify_signature(None).unwrap();
    assert_eq!(path_len(&root), Some(1));
    assert_eq!(path_len(&ca), Some(0));
    assert_eq!(uri_sans(&ca), ["spiffe://cluster.local"]);
    assert!(ca.validity().not_after <= root.validity().not_after);
    let ca_key = KeyPair::from_pem(&uploaded.ca_key).unwrap();
    assert_eq!(ca_key.subject_public_key_info(), ca.public_key().raw);
    assert_eq!(uploaded.cert_chain, uploaded.ca_cert);

    let loaded = fx.secrets_source(names.clone()).load().await.unwrap();
    assert_eq!(loaded, uploaded);
    assert_eq!(loaded.ca_key.as_bytes(), uploaded.ca_key.as_bytes());

    // Uploading again would replace a CA in use: refused unless forced.
    let err = create_plugin_secrets(&fx.vault, &names, TD, 10 * YEAR, YEAR, false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::SecretExists { name, .. } if name == "root-cert"),
        "{err}"
    );
    let replaced = create_plugin_secrets(&fx.vault, &names, TD, 10 * YEAR, YEAR, true)
        .await
        .unwrap();
    assert_ne!(replaced.root_cert, uploaded.root_cert);
    assert_eq!(fx.azure.secret("ca-key").unwrap(), replaced.ca_key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_secret_names_are_used() {
    let fx = fixture().await;
    let names = SecretNames {
        root_cert: "mesh-root".into(),
        ca_cert: "mesh-ca".into(),
        ca_key: "mesh-ca-key".into(),
        cert_chain: "mesh-chain".into(),
    };
    let uploaded = create_plugin_secrets(&fx.vault, &names, TD, YEAR, DAY, false)
        .await
        .unwrap();
    assert_eq!(fx.azure.secret("mesh-ca-key").unwrap(), uploaded.ca_key);
    assert!(fx.azure.secret("ca-key").is_none());
    assert_eq!(fx.secrets_source(names).load().await.unwrap(), uploaded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_cert_chain_loads_as_empty() {
    let fx = fixture().await;
    fx.azure.insert_secret("root-cert", "ROOT PEM");
    fx.azure.insert_secret("ca-cert", "CA PEM");
    fx.azure.insert_secret("ca-key", "KEY PEM");
    let loaded = fx
        .secrets_source(SecretNames::default())
        .load()
        .await
        .unwrap();
    assert_eq!(loaded.root_cert, "ROOT PEM");
    assert_eq!(loaded.ca_cert, "CA PEM");
    assert_eq!(loaded.ca_key, "KEY PEM");
    assert_eq!(loaded.cert_chain, "");
    assert_eq!(fx.azure.calls_to("secrets.get"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_ca_key_is_an_error_naming_it() {
    let fx = fixture().await;
    fx.azure.insert_secret("root-cert", "ROOT PEM");
    fx.azure.insert_secret("ca-cert", "CA PEM");
    fx.azure.insert_secret("cert-chain", "CHAIN PEM");
    let err = fx
        .secrets_source(SecretNames::default())
        .load()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::SecretNotFound { name, .. } if name == "ca-key"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "Key Vault {}: secret ca-key not found (HTTP 404)",
            fx.azure.vault_url()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_federated_token_fails_without_leaking_values() {
    let fx = fixture().await;
    let values = [
        "ROOT-VALUE-1f3a",
        "CA-VALUE-77c2",
        "KEY-VALUE-9e0d",
        "CHAIN-VALUE-4b11",
    ];
    for (name, value) in SecretNames::default().all().into_iter().zip(values) {
        fx.azure.insert_secret(name, value);
    }
    let wrong = AzureStandIn::token_file("not-the-federated-token").unwrap();
    let credential = fx.azure.credential(wrong.path()).unwrap();
    let source = KeyVaultSecretsSource::new(
        &fx.azure.vault_url(),
        credential,
        SecretNames::default(),
        fx.azure.client_options().unwrap(),
    )
    .unwrap();
    let err = source.load().await.unwrap_err();
    let shown = format!("{err} / {err:?}");
    assert!(
        shown.starts_with(&format!(
            "Key Vault {}: get secret root-cert: ",
            fx.azure.vault_url()
        )),
        "{shown}"
    );
    // Entra ID's reason comes through; no secret value, and neither token, does.
    assert!(shown.contains("AADSTS70021"), "{shown}");
    for secret in values
        .iter()
        .copied()
        .chain(["not-the-federated-token", fx.azure.federated_token()])
    {
        assert!(!shown.contains(secret), "{secret} leaked: {shown}");
    }
    // Challenged, refused at Entra ID, and no secret was served.
    assert_eq!(fx.azure.calls_to("vault.challenge"), 1);
    assert!(fx.azure.calls_to("entra.rejected") >= 1);
    assert_eq!(fx.azure.calls_to("entra.token"), 0);
    assert_eq!(fx.azure.calls_to("secrets.get"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_client_id_is_refused_by_entra() {
    let fx = fixture().await;
    fx.azure.insert_secret("root-cert", "ROOT");
    let token_file = fx.azure.federated_token_file().unwrap();
    let credential = trellis_azure::workload_identity_credential(
        Some(trellis_azure::stand_in::TENANT_ID.to_owned()),
        Some("00000000-0000-0000-0000-000000000bad".to_owned()),
        Some(token_file.path().to_owned()),
        fx.azure.client_options().unwrap(),
    )
    .unwrap();
    let vault = fx.azure.vault(credential).unwrap();
    let err = show(&vault, &CaLayout::PluginSecrets(SecretNames::default()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("AADSTS700016"), "{err}");
    assert_eq!(fx.azure.calls_to("secrets.get"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_request_is_challenged_then_the_token_is_reused() {
    let fx = fixture().await;
    for name in SecretNames::default().all() {
        fx.azure.insert_secret(name, name);
    }
    let source = fx.secrets_source(SecretNames::default());
    source.load().await.unwrap();
    // One 401 with the challenge, one token exchange, then the four reads.
    assert_eq!(
        fx.azure.calls(),
        counts(&[
            ("entra.token", 1),
            ("secrets.get", 4),
            ("vault.challenge", 1)
        ])
    );
    source.load().await.unwrap();
    assert_eq!(
        fx.azure.calls(),
        counts(&[
            ("entra.token", 1),
            ("secrets.get", 8),
            ("vault.challenge", 1)
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_url_must_name_the_vault_the_challenge_is_for() {
    // Same server, reached by IP: the SDK refuses the challenge because the resource
    // (vault.azure.net) is not a suffix of the host, as it would for a spoofed vault.
    let fx = fixture().await;
    fx.azure.insert_secret("root-cert", "ROOT");
    let port = fx
        .azure
        .vault_url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    let by_ip = format!("https://127.0.0.1:{port}/");
    assert!(fx.azure.vault_url().contains(VAULT_HOST));
    let source = KeyVaultSecretsSource::new(
        &by_ip,
        fx.credential.clone(),
        SecretNames::default(),
        fx.azure.client_options().unwrap(),
    )
    .unwrap();
    let err = source.load().await.unwrap_err().to_string();
    assert!(err.contains("doesn't match the requested domain"), "{err}");
    assert_eq!(fx.azure.calls_to("entra.token"), 0);
}

// === keyvault-key ===

#[tokio::test]
async fn root_key_signs_one_intermediate_per_issue_and_leaves_need_no_calls() {
    // Plain current-thread runtime: the Key Vault signer blocks on a spawn_blocking thread
    // while this runtime's only thread drives the request.
    let fx = fixture().await;
    let root_pem = create_root_key(
        &fx.vault,
        "trellis-root",
        "trellis-root-cert",
        TD,
        10 * YEAR,
        false,
    )
    .await
    .unwrap();
    assert_eq!(fx.azure.secret("trellis-root-cert").unwrap(), root_pem);
    assert_eq!(fx.azure.key_versions("trellis-root"), 1);
    let root_der = one_cert(&root_pem);
    let root = x509(&root_der);
    root.verify_signature(None).unwrap();
    assert_eq!(path_len(&root), Some(1));
    assert_eq!(uri_sans(&root), ["spiffe://cluster.local"]);
    assert_eq!(
        root.subject().to_string(),
        "O=Trellis, CN=Trellis root cluster.local"
    );
    let ku = root.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    // The root creation: existence check, create, one sign, store the certificate.
    assert_eq!(fx.azure.calls_to("keys.sign"), 1);
    assert_eq!(fx.azure.calls_to("keys.create"), 1);
    assert_eq!(fx.azure.calls_to("secrets.set"), 1);

    let source = fx.key_source("trellis-root", "trellis-root-cert");
    let before = fx.azure.calls();
    let (pems, not_after) = source.issue_intermediate(TD, DAY).await.unwrap();
    assert_eq!(
        delta(&before, &fx.azure.calls()),
        // New clients are challenged once each; the credential's token is reused.
        counts(&[
            ("keys.get", 1),
            ("keys.sign", 1),
            ("secrets.get", 1),
            ("vault.challenge", 2)
        ])
    );

    assert_eq!(pems.root_cert, root_pem);
    assert_eq!(pems.cert_chain, pems.ca_cert);
    let ca_der = one_cert(&pems.ca_cert);
    let ca = x509(&ca_der);
    ca.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(path_len(&ca), Some(0));
    assert_eq!(uri_sans(&ca), ["spiffe://cluster.local"]);
    assert_eq!(ca.issuer(), root.subject());
    assert!(ca.validity().not_after <= root.validity().not_after);
    assert_eq!(
        SystemTime::from(ca.validity().not_after.to_datetime()),
        not_after
    );
    let remaining = not_after.duration_since(SystemTime::now()).unwrap();
    assert!(
        remaining <= DAY && remaining > DAY - Duration::from_secs(60),
        "{remaining:?}"
    );
    let ca_key = KeyPair::from_pem(&pems.ca_key).unwrap();
    assert_eq!(ca_key.subject_public_key_info(), ca.public_key().raw);

    // A second intermediate: exactly one more sign, get_key and get_secret; a fresh key.
    let before = fx.azure.calls();
    let (second, _) = source.issue_intermediate(TD, DAY).await.unwrap();
    assert_eq!(
        delta(&before, &fx.azure.calls()),
        counts(&[("keys.get", 1), ("keys.sign", 1), ("secrets.get", 1)])
    );
    assert_ne!(second.ca_key, pems.ca_key);
    assert_ne!(second.ca_cert, pems.ca_cert);

    // Leaves are signed locally with the in-memory intermediate: Key Vault sees nothing.
    let before = fx.azure.calls();
    let issuer = Issuer::from_ca_cert_pem(&pems.ca_cert, ca_key).unwrap();
    for i in 0..50 {
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://cluster.local/ns/default/sa/app-{i}")
                .try_into()
                .unwrap(),
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
        x509(leaf.der())
            .verify_signature(Some(ca.public_key()))
            .unwrap();
    }
    assert_eq!(fx.azure.calls(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_never_outlives_the_root() {
    let fx = fixture().await;
    let root_pem = create_root_key(&fx.vault, "short-root", "short-root-cert", TD, DAY, false)
        .await
        .unwrap();
    let root_der = one_cert(&root_pem);
    let root_not_after: SystemTime = x509(&root_der).validity().not_after.to_datetime().into();
    let (pems, not_after) = fx
        .key_source("short-root", "short-root-cert")
        .issue_intermediate(TD, 10 * YEAR)
        .await
        .unwrap();
    assert_eq!(not_after, root_not_after);
    let ca_der = one_cert(&pems.ca_cert);
    assert_eq!(
        SystemTime::from(x509(&ca_der).validity().not_after.to_datetime()),
        root_not_after
    );
    // A trust domain other than the root's is refused before anything is signed.
    let before = fx.azure.calls_to("keys.sign");
    let err = fx
        .key_source("short-root", "short-root-cert")
        .issue_intermediate("other.domain", DAY)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("trust domain \"cluster.local\", not \"other.domain\""),
        "{err}"
    );
    assert_eq!(fx.azure.calls_to("keys.sign"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_certificate_of_another_key_is_refused() {
    let fx = fixture().await;
    create_root_key(&fx.vault, "root-a", "root-a-cert", TD, YEAR, false)
        .await
        .unwrap();
    create_root_key(&fx.vault, "root-b", "root-b-cert", TD, YEAR, false)
        .await
        .unwrap();
    let signs = fx.azure.calls_to("keys.sign");
    let err = fx
        .key_source("root-a", "root-b-cert")
        .issue_intermediate(TD, DAY)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RootKeyMismatch { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "Key Vault {}: secret root-b-cert holds no root certificate for key root-a (public keys differ); recreate the root with `trellis ca create`",
            fx.azure.vault_url()
        )
    );
    assert_eq!(fx.azure.calls_to("keys.sign"), signs, "nothing signed");

    // During a root rotation the secret holds both roots; the matching one signs.
    let both = format!(
        "{}{}",
        fx.azure.secret("root-b-cert").unwrap(),
        fx.azure.secret("root-a-cert").unwrap()
    );
    fx.azure.insert_secret("rotation-roots", &both);
    let (pems, _) = fx
        .key_source("root-a", "rotation-roots")
        .issue_intermediate(TD, DAY)
        .await
        .unwrap();
    assert_eq!(pems.root_cert, both);
    let root_a = one_cert(&fx.azure.secret("root-a-cert").unwrap());
    let ca_der = one_cert(&pems.ca_cert);
    x509(&ca_der)
        .verify_signature(Some(x509(&root_a).public_key()))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_root_key_refuses_an_existing_key_unless_forced() {
    let fx = fixture().await;
    let first = create_root_key(
        &fx.vault,
        "trellis-root",
        "trellis-root-cert",
        TD,
        YEAR,
        false,
    )
    .await
    .unwrap();
    let err = create_root_key(
        &fx.vault,
        "trellis-root",
        "trellis-root-cert",
        TD,
        YEAR,
        false,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::KeyExists { .. }), "{err:?}");
    assert_eq!(fx.azure.key_versions("trellis-root"), 1);
    assert_eq!(fx.azure.secret("trellis-root-cert").unwrap(), first);

    let second = create_root_key(
        &fx.vault,
        "trellis-root",
        "trellis-root-cert",
        TD,
        YEAR,
        true,
    )
    .await
    .unwrap();
    assert_ne!(first, second);
    assert_eq!(fx.azure.key_versions("trellis-root"), 2);
    // The source follows the latest key version and its new root.
    let (pems, _) = fx
        .key_source("trellis-root", "trellis-root-cert")
        .issue_intermediate(TD, DAY)
        .await
        .unwrap();
    let root_der = one_cert(&second);
    let ca_der = one_cert(&pems.ca_cert);
    x509(&ca_der)
        .verify_signature(Some(x509(&root_der).public_key()))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_without_sign_permission_is_refused_with_403() {
    let fx = fixture().await;
    let keys = KeyClient::new(
        &fx.azure.vault_url(),
        fx.credential.clone(),
        Some(azure_security_keyvault_keys::KeyClientOptions {
            client_options: fx.azure.client_options().unwrap(),
            ..Default::default()
        }),
    )
    .unwrap();
    let created = keys
        .create_key(
            "verify-only",
            CreateKeyParameters {
                kty: Some(KeyType::Ec),
                curve: Some(CurveName::P256),
                key_ops: Some(vec![KeyOperation::Verify]),
                ..Default::default()
            }
            .try_into()
            .unwrap(),
            None,
        )
        .await
        .unwrap()
        .into_model()
        .unwrap();
    // A "root" with the key's public key (signed elsewhere: this key cannot sign), so the
    // source gets as far as asking Key Vault to sign.
    let jwk = created.key.unwrap();
    let mut spki = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04,
    ];
    spki.extend(jwk.x.unwrap());
    spki.extend(jwk.y.unwrap());
    let public = rcgen::SubjectPublicKeyInfo::from_der(&spki).unwrap();
    let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
    let other_issuer = Issuer::new(params.clone(), other);
    let fake_root = params.signed_by(&public, &other_issuer).unwrap();
    fx.azure.insert_secret("verify-only-cert", &fake_root.pem());

    let err = fx
        .key_source("verify-only", "verify-only-cert")
        .issue_intermediate(TD, DAY)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::KeyVault {
                operation: "sign",
                status: Some(403),
                ..
            }
        ),
        "{err:?}"
    );
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!(
            "Key Vault {}: sign key verify-only: HTTP 403 (Forbidden): ",
            fx.azure.vault_url()
        )),
        "{shown}"
    );
    assert_eq!(fx.azure.calls_to("keys.sign"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_root_secret_or_missing_key_is_refused() {
    let fx = fixture().await;
    fx.azure.insert_secret("trellis-root-cert", "irrelevant");
    let err = fx
        .key_source("trellis-root", "trellis-root-cert")
        .issue_intermediate(TD, DAY)
        .await
        .unwrap_err();
    // The secret is read first and is not PEM.
    assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
    let root = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = CertificateParams::default().self_signed(&root).unwrap();
    fx.azure.insert_secret("trellis-root-cert", &cert.pem());
    let err = fx
        .key_source("trellis-root", "trellis-root-cert")
        .issue_intermediate(TD, DAY)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::KeyVault {
                operation: "get",
                status: Some(404),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("key trellis-root"), "{err}");
}

// === show ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_reports_certificates_and_expiry_without_reading_the_key() {
    let fx = fixture().await;
    let names = SecretNames::default();
    create_plugin_secrets(&fx.vault, &names, TD, 10 * YEAR, YEAR, false)
        .await
        .unwrap();
    let gets = fx.azure.calls_to("secrets.get");
    let report = show(&fx.vault, &CaLayout::PluginSecrets(names))
        .await
        .unwrap();
    assert_eq!(
        fx.azure.calls_to("secrets.get") - gets,
        3,
        "ca-key is never read"
    );
    let now = SystemTime::now();
    assert_eq!(
        report
            .certs
            .iter()
            .map(|c| (c.secret.as_str(), c.subject.as_str(), c.days_left(now)))
            .collect::<Vec<_>>(),
        [
            (
                "root-cert",
                "O=Trellis, CN=Trellis root cluster.local",
                3649
            ),
            (
                "ca-cert",
                "O=Trellis, CN=Trellis intermediate cluster.local",
                364
            ),
            (
                "cert-chain",
                "O=Trellis, CN=Trellis intermediate cluster.local",
                364
            ),
        ]
    );
    assert_eq!(report.check_expiry(now, 30 * DAY).status, Expiry::Ok);
    let check = report.check_expiry(now, 400 * DAY);
    assert_eq!(check.status, Expiry::ExpiresSoon);
    assert_eq!(
        check
            .findings
            .iter()
            .map(|f| f.secret.as_str())
            .collect::<Vec<_>>(),
        ["ca-cert", "cert-chain"]
    );
    assert_eq!(
        report.check_expiry(now + 2 * YEAR, DAY).status,
        Expiry::Expired
    );

    create_root_key(
        &fx.vault,
        "trellis-root",
        "trellis-root-cert",
        TD,
        YEAR,
        false,
    )
    .await
    .unwrap();
    let layout = CaLayout::RootKey {
        key_name: "trellis-root".into(),
        root_cert_secret: "trellis-root-cert".into(),
    };
    let report = show(&fx.vault, &layout).await.unwrap();
    assert_eq!(report.certs.len(), 1);
    let key = report.root_key.as_ref().unwrap();
    assert!(key.matches_root);
    assert!(
        key.kid
            .as_deref()
            .unwrap()
            .starts_with(&format!("{}keys/trellis-root/", fx.azure.vault_url())),
        "{key:?}"
    );
    let rendered = report.render(now);
    assert!(
        rendered.contains("(matches the root certificate)"),
        "{rendered}"
    );
}

/// The CA switching from a self-signed root to the Key Vault root key on a running mesh,
/// driven by the same source loop the control plane runs: staged, activated, retired;
/// one Key Vault `sign` for the intermediate however often the source is re-read and
/// however many leaves are signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_ca_switches_to_the_key_vault_root_with_one_sign() {
    use trellis_azure::KeyVaultKeyCa;
    use trellis_ca::source::{self, CaSource, RotationPolicy, SourceMetrics};
    use trellis_ca::{CaConfig, CertificateAuthority};

    let fx = fixture().await;
    create_root_key(
        &fx.vault,
        "trellis-root",
        "trellis-root-cert",
        TD,
        10 * YEAR,
        false,
    )
    .await
    .unwrap();
    let kv_root = one_cert(&fx.azure.secret("trellis-root-cert").unwrap());
    let signs_after_root = fx.azure.calls_to("keys.sign");

    let ttl = Duration::from_secs(2);
    let ca = Arc::new(
        CertificateAuthority::generate(TD)
            .unwrap()
            .with_config(CaConfig::default().with_max_ttl(ttl).with_default_ttl(ttl))
            .unwrap(),
    );
    let old_root = ca.trust_bundle_der()[0].clone();
    let kv = KeyVaultKeySource::from_vault(&fx.vault, "trellis-root", "trellis-root-cert").unwrap();
    let src: Arc<dyn CaSource> = Arc::new(KeyVaultKeyCa::new(kv, TD, 30 * DAY));
    assert!(src.label().starts_with("keyvault-key https://"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(source::run(
        ca.clone(),
        src,
        RotationPolicy {
            reload_interval: Duration::from_millis(100),
            propagation: Duration::from_millis(300),
        },
        SourceMetrics::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    // Staged then active: generation 2, signing through the Key Vault-signed intermediate.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ca.generation() < 2 {
        assert!(std::time::Instant::now() < deadline, "never activated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let csr = {
        let key = KeyPair::generate().unwrap();
        CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    };
    let me = trellis_identity::SpiffeId::new(TD, "demo", "web").unwrap();
    for _ in 0..50 {
        let leaf = ca.sign(&csr, &me, None).unwrap();
        assert_eq!(leaf.chain_der.len(), 2);
        // leaf <- intermediate <- Key Vault root.
        let inter = x509(&leaf.chain_der[1]);
        inter
            .verify_signature(Some(x509(&kv_root).public_key()))
            .unwrap();
    }
    assert!(ca.trust_bundle_der().contains(&kv_root));
    // The old root retires once its leaves (2 s + margin) have expired.
    while ca.trust_bundle_der().contains(&old_root) {
        assert!(
            std::time::Instant::now() < deadline,
            "old root never retired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ca.trust_bundle_der(), vec![kv_root]);
    // Dozens of source reads and 50 leaves: one sign, for the one intermediate.
    assert_eq!(fx.azure.calls_to("keys.sign"), signs_after_root + 1);
    let _ = stop_tx.send(());
    task.await.unwrap();
}
