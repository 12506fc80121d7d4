//! The CA through its public API: the CSR matrix, persistence, and the gRPC service
//! called directly (no transport).

// Helpers outside `#[test]` functions unwrap too; a failure there is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use tonic::Code;
use trellis_api::identity::v1::CertifyRequest;
use trellis_api::identity::v1::identity_server::Identity;
use trellis_ca::{
    CaConfig, CertificateAuthority, DEFAULT_AUDIENCE, Error, ISSUER_KEY_FILE, IdentityService,
    JWKS_FILE, LocalIssuer, MAX_CSR_LEN, Metrics, ROOT_CERT_FILE, ROOT_KEY_FILE, TokenVerifier,
};
use trellis_identity::SpiffeId;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const TD: &str = "cluster.local";
const HOUR: Duration = Duration::from_secs(3600);
const RSA_2048_CSR: &[u8] = include_bytes!("data/rsa2048.csr.der");
const RSA_1024_CSR: &[u8] = include_bytes!("data/rsa1024.csr.der");

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn csr_with(alg: &'static rcgen::SignatureAlgorithm, params: &CertificateParams) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn p256_csr() -> Vec<u8> {
    csr_with(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &CertificateParams::default(),
    )
}

/// A CSR that asks for everything the CA must not grant.
fn greedy_csr() -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "admin");
    params.subject_alt_names = vec![
        SanType::URI(
            Ia5String::try_from("spiffe://cluster.local/ns/kube-system/sa/admin").unwrap(),
        ),
        SanType::URI(Ia5String::try_from("spiffe://other.domain/ns/a/sa/b").unwrap()),
        SanType::DnsName(Ia5String::try_from("evil.example").unwrap()),
        SanType::IpAddress("10.0.0.1".parse().unwrap()),
    ];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, &params)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn now() -> i64 {
    unix(SystemTime::now())
}

/// Checks every property the CA promises of a leaf for `identity`.
fn assert_leaf(leaf_der: &[u8], root_der: &[u8], identity: &SpiffeId) {
    let (rest, leaf) = X509Certificate::from_der(leaf_der).unwrap();
    assert!(rest.is_empty());
    let (_, root) = X509Certificate::from_der(root_der).unwrap();

    leaf.verify_signature(Some(root.public_key()))
        .expect("leaf verifies under the root key");
    assert_eq!(leaf.issuer(), root.subject());
    assert_eq!(leaf.subject().iter().count(), 0, "subject must be empty");

    let san = leaf
        .subject_alternative_name()
        .unwrap()
        .expect("SAN present");
    assert!(san.critical, "SAN is critical with an empty subject");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(identity.as_str())],
        "exactly one URI SAN, the token's identity"
    );

    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca, "CA:FALSE");
    assert!(!leaf.is_ca());

    let ku = leaf.key_usage().unwrap().expect("keyUsage present").value;
    assert!(ku.digital_signature() && ku.key_agreement());
    assert!(!ku.key_cert_sign() && !ku.crl_sign());

    let eku = leaf
        .extended_key_usage()
        .unwrap()
        .expect("EKU present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(!eku.code_signing && !eku.any);

    assert!(leaf.validity().not_after <= root.validity().not_after);
    let serial = leaf.raw_serial();
    assert!(serial.len() >= 16, "serial is random, 128 bits");
}

// === CSR matrix ===

#[test]
fn leaf_carries_only_the_authorised_identity() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let identity = id("demo", "web");
    let issued = ca.sign(&greedy_csr(), &identity, None).unwrap();
    assert_eq!(issued.chain_der.len(), 1);
    assert_leaf(&issued.chain_der[0], ca.root_der(), &identity);

    let (_, leaf) = X509Certificate::from_der(&issued.chain_der[0]).unwrap();
    let not_before = leaf.validity().not_before.timestamp();
    let not_after = leaf.validity().not_after.timestamp();
    assert!(
        (now() - 60 - not_before).abs() <= 2,
        "back-dated one minute"
    );
    assert!((not_after - now() - 24 * 3600).abs() <= 2, "24 h default");
    assert_eq!(unix(issued.not_after), not_after);
    assert_eq!(hex(leaf.raw_serial()), issued.serial);
}

#[test]
fn leaf_keeps_the_csr_public_key() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let issued = ca.sign(csr.der(), &id("demo", "web"), None).unwrap();
    let (_, leaf) = X509Certificate::from_der(&issued.chain_der[0]).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key)
    );
}

#[test]
fn leaf_is_accepted_by_webpki_as_client_and_server() {
    // The verifier rustls uses: catches encodings x509-parser tolerates but TLS stacks don't.
    let ca = CertificateAuthority::generate(TD).unwrap();
    let issued = ca.sign(&greedy_csr(), &id("demo", "web"), None).unwrap();
    let root = CertificateDer::from(ca.root_der());
    let anchors = [webpki::anchor_from_trusted_cert(&root).unwrap()];
    let leaf = CertificateDer::from(issued.chain_der[0].as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .unwrap();
    }
}

#[test]
fn p384_key_is_accepted() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let csr = csr_with(
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &CertificateParams::default(),
    );
    let identity = id("demo", "web");
    let issued = ca.sign(&csr, &identity, None).unwrap();
    assert_leaf(&issued.chain_der[0], ca.root_der(), &identity);
}

#[test]
fn serials_differ_between_leaves() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let csr = p256_csr();
    let a = ca.sign(&csr, &id("demo", "web"), None).unwrap();
    let b = ca.sign(&csr, &id("demo", "web"), None).unwrap();
    assert_ne!(a.serial, b.serial);
}

#[test]
fn garbage_is_not_a_csr() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let mut trailing = p256_csr();
    trailing.push(0);
    let mut truncated = p256_csr();
    truncated.truncate(truncated.len() / 2);
    for (name, der) in [
        ("empty", Vec::new()),
        ("text", b"-----BEGIN CERTIFICATE REQUEST-----".to_vec()),
        ("random", (0..200u8).map(|i| i.wrapping_mul(37)).collect()),
        ("a certificate", ca.root_der().to_vec()),
        ("trailing byte", trailing),
        ("truncated", truncated),
    ] {
        let err = ca.sign(&der, &id("demo", "web"), None).unwrap_err();
        assert!(matches!(err, Error::CsrMalformed(_)), "{name}: {err:?}");
    }
}

#[test]
fn broken_self_signature_is_refused() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let mut csr = p256_csr();
    // The last byte is inside the ECDSA `s` integer: still DER, no longer a signature.
    let last = csr.len() - 1;
    csr[last] ^= 0x01;
    let err = ca.sign(&csr, &id("demo", "web"), None).unwrap_err();
    assert!(matches!(err, Error::CsrSignature), "{err:?}");
}

#[test]
fn rsa_and_ed25519_keys_are_refused() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    for (name, csr) in [("rsa-2048", RSA_2048_CSR), ("rsa-1024", RSA_1024_CSR)] {
        let err = ca.sign(csr, &id("demo", "web"), None).unwrap_err();
        assert!(
            matches!(&err, Error::CsrKeyType(k) if k == "RSA"),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains("P-256"), "{err}");
    }
    let ed = csr_with(&rcgen::PKCS_ED25519, &CertificateParams::default());
    let err = ca.sign(&ed, &id("demo", "web"), None).unwrap_err();
    assert!(
        matches!(&err, Error::CsrKeyType(k) if k == "Ed25519"),
        "{err:?}"
    );
}

#[test]
fn oversize_csr_is_refused_before_parsing() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let err = ca
        .sign(&vec![0x30; MAX_CSR_LEN + 1], &id("demo", "web"), None)
        .unwrap_err();
    assert!(matches!(err, Error::CsrTooLarge { .. }), "{err:?}");

    // A well-formed request made large by a padding extension.
    let mut params = CertificateParams::default();
    params.custom_extensions = vec![CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 4, 1, 99999, 1],
        vec![0x05; 20_000],
    )];
    let big = csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, &params);
    assert!(big.len() > MAX_CSR_LEN);
    let err = ca.sign(&big, &id("demo", "web"), None).unwrap_err();
    assert!(matches!(err, Error::CsrTooLarge { .. }), "{err:?}");
}

#[test]
fn identity_outside_trust_domain_is_refused() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let foreign = SpiffeId::new("other.domain", "demo", "web").unwrap();
    let err = ca.sign(&p256_csr(), &foreign, None).unwrap_err();
    assert!(matches!(err, Error::ForeignIdentity { .. }), "{err:?}");
}

#[test]
fn ttl_follows_config() {
    let config = CaConfig::default()
        .with_default_ttl(HOUR)
        .with_max_ttl(2 * HOUR);
    let ca = CertificateAuthority::generate(TD)
        .unwrap()
        .with_config(config)
        .unwrap();
    let csr = p256_csr();
    let identity = id("demo", "web");
    for (requested, expected) in [
        (None, HOUR),
        (Some(Duration::ZERO), HOUR),
        (Some(HOUR / 6), HOUR / 6),
        (Some(48 * HOUR), 2 * HOUR),
    ] {
        let issued = ca.sign(&csr, &identity, requested).unwrap();
        let lifetime = unix(issued.not_after) - now();
        assert!(
            (lifetime - expected.as_secs() as i64).abs() <= 2,
            "{requested:?}: lifetime {lifetime}s"
        );
    }
}

#[test]
fn default_max_ttl_is_24h() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let issued = ca
        .sign(&p256_csr(), &id("demo", "web"), Some(365 * 24 * HOUR))
        .unwrap();
    assert!((unix(issued.not_after) - now() - 24 * 3600).abs() <= 2);
}

// === persistence ===

#[test]
fn root_and_issuer_survive_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");

    let first = CertificateAuthority::load_or_generate(&dir, TD).unwrap();
    let second = CertificateAuthority::load_or_generate(&dir, TD).unwrap();
    assert_eq!(first.root_der(), second.root_der());
    assert_eq!(first.root_pem(), second.root_pem());
    assert_eq!(first.trust_bundle_der(), vec![first.root_der().to_vec()]);
    // The reloaded root can still sign, and its leaves chain to the original root.
    let identity = id("demo", "web");
    let issued = second.sign(&p256_csr(), &identity, None).unwrap();
    assert_leaf(&issued.chain_der[0], first.root_der(), &identity);

    let issuer_a = LocalIssuer::load_or_generate(&dir).unwrap();
    let issuer_b = LocalIssuer::load_or_generate(&dir).unwrap();
    assert_eq!(issuer_a.key_id(), issuer_b.key_id());
    assert_eq!(issuer_a.jwks_json(), issuer_b.jwks_json());
    assert_eq!(
        std::fs::read_to_string(dir.join(JWKS_FILE)).unwrap(),
        issuer_a.jwks_json()
    );
    let token = issuer_a
        .mint("demo", "web", DEFAULT_AUDIENCE, HOUR)
        .unwrap();
    assert!(
        issuer_b
            .verifier(DEFAULT_AUDIENCE)
            .unwrap()
            .verify_now(&token)
            .is_ok()
    );

    let mode = |name: &str| {
        std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(ROOT_KEY_FILE), 0o600);
    assert_eq!(mode(ISSUER_KEY_FILE), 0o600);
    assert_eq!(
        mode(ROOT_CERT_FILE) & 0o022,
        0,
        "cert not writable by others"
    );
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn mismatched_root_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    CertificateAuthority::load_or_generate(&a, TD).unwrap();
    CertificateAuthority::load_or_generate(&b, TD).unwrap();
    std::fs::copy(b.join(ROOT_KEY_FILE), a.join(ROOT_KEY_FILE)).unwrap();
    let err = CertificateAuthority::load_or_generate(&a, TD).unwrap_err();
    assert!(matches!(err, Error::RootKeyMismatch { .. }), "{err:?}");
}

#[test]
fn half_a_root_is_refused_not_regenerated() {
    let tmp = tempfile::tempdir().unwrap();
    CertificateAuthority::load_or_generate(tmp.path(), TD).unwrap();
    std::fs::remove_file(tmp.path().join(ROOT_CERT_FILE)).unwrap();
    let err = CertificateAuthority::load_or_generate(tmp.path(), TD).unwrap_err();
    assert!(matches!(err, Error::IncompleteRoot { .. }), "{err:?}");
    assert!(
        tmp.path().join(ROOT_KEY_FILE).exists(),
        "the key is left alone"
    );
}

#[test]
fn root_of_another_trust_domain_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    CertificateAuthority::load_or_generate(tmp.path(), "example.org").unwrap();
    let err = CertificateAuthority::load_or_generate(tmp.path(), TD).unwrap_err();
    assert!(matches!(err, Error::RootTrustDomain { .. }), "{err:?}");
}

#[test]
fn corrupt_issuer_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(ISSUER_KEY_FILE), "not a key").unwrap();
    assert!(LocalIssuer::load_or_generate(tmp.path()).is_err());
}

// === gRPC service ===

struct Fixture {
    service: IdentityService,
    issuer: LocalIssuer,
    ca: Arc<CertificateAuthority>,
    registry: Registry,
}

fn fixture() -> Fixture {
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let issuer = LocalIssuer::generate().unwrap();
    let verifier: Arc<dyn TokenVerifier> = Arc::new(issuer.verifier(DEFAULT_AUDIENCE).unwrap());
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let service = IdentityService::new(ca.clone(), verifier, metrics);
    Fixture {
        service,
        issuer,
        ca,
        registry,
    }
}

fn request(csr_der: Vec<u8>, token: String, ttl: u32) -> tonic::Request<CertifyRequest> {
    tonic::Request::new(CertifyRequest {
        csr_der,
        token,
        requested_ttl_seconds: ttl,
    })
}

fn metrics_text(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test]
async fn service_issues_for_the_token_identity() {
    let f = fixture();
    let token = f
        .issuer
        .mint("demo", "web", DEFAULT_AUDIENCE, HOUR)
        .unwrap();
    let resp = f
        .service
        .certify(request(greedy_csr(), token, 600))
        .await
        .unwrap()
        .into_inner();

    let identity = id("demo", "web");
    assert_eq!(resp.identity, identity.as_str());
    assert_eq!(resp.trust_bundle_der, vec![f.ca.root_der().to_vec()]);
    assert_eq!(resp.chain_der.len(), 1);
    assert_leaf(&resp.chain_der[0], f.ca.root_der(), &identity);
    let (_, leaf) = X509Certificate::from_der(&resp.chain_der[0]).unwrap();
    assert_eq!(resp.not_after_unix, leaf.validity().not_after.timestamp());
    assert!(
        (resp.not_after_unix - now() - 600).abs() <= 2,
        "requested TTL honoured"
    );
    assert!(metrics_text(&f.registry).contains("trellis_ca_certificates_issued_total 1"));
}

#[tokio::test]
async fn service_refuses_bad_tokens_as_unauthenticated() {
    let f = fixture();
    let other = LocalIssuer::generate().unwrap();
    let cases = [
        ("empty", String::new()),
        ("garbage", "not.a.token".to_owned()),
        ("oversize", "a".repeat(64 * 1024)),
        (
            "other issuer key",
            other.mint("demo", "web", DEFAULT_AUDIENCE, HOUR).unwrap(),
        ),
        (
            "wrong audience",
            f.issuer.mint("demo", "web", "kubernetes", HOUR).unwrap(),
        ),
    ];
    for (name, token) in cases {
        let status = f
            .service
            .certify(request(p256_csr(), token.clone(), 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
        if token.len() > 8 {
            assert!(
                !status.message().contains(&token[..8]),
                "{name}: token echoed"
            );
        }
    }
    let text = metrics_text(&f.registry);
    assert!(
        text.contains(r#"trellis_ca_requests_failed_total{reason="unauthenticated"} 5"#),
        "{text}"
    );
    assert!(
        text.contains("trellis_ca_certificates_issued_total 0"),
        "{text}"
    );
}

#[tokio::test]
async fn service_refuses_bad_csrs_as_invalid_argument() {
    let f = fixture();
    for (name, csr) in [
        ("garbage", b"garbage".to_vec()),
        ("rsa", RSA_2048_CSR.to_vec()),
        ("oversize", vec![0x30; MAX_CSR_LEN + 1]),
    ] {
        let token = f
            .issuer
            .mint("demo", "web", DEFAULT_AUDIENCE, HOUR)
            .unwrap();
        let status = f.service.certify(request(csr, token, 0)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
    }
    let text = metrics_text(&f.registry);
    assert!(
        text.contains(r#"trellis_ca_requests_failed_total{reason="invalid_csr"} 3"#),
        "{text}"
    );
}

#[tokio::test]
async fn verifier_is_usable_as_a_trait_object() {
    let issuer = LocalIssuer::generate().unwrap();
    let verifier: Arc<dyn TokenVerifier> = Arc::new(issuer.verifier(DEFAULT_AUDIENCE).unwrap());
    let token = issuer.mint("demo", "web", DEFAULT_AUDIENCE, HOUR).unwrap();
    let caller = verifier.verify(&token).await.unwrap();
    assert_eq!(
        (caller.namespace.as_str(), caller.service_account.as_str()),
        ("demo", "web")
    );
}

#[test]
fn server_builds() {
    let _server = fixture().service.into_server();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
