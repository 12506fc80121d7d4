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

/// A CSR that asks for exactly what the leaf will carry (the identity as its one URI SAN,
/// CA:FALSE, mTLS usages) plus a subject, which the CA ignores: leaves have none.
fn modest_csr(identity: &SpiffeId) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "admin");
    params.subject_alt_names = vec![SanType::URI(
        Ia5String::try_from(identity.as_str()).unwrap(),
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, &params)
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
    let issued = ca.sign(&modest_csr(&identity), &identity, None).unwrap();
    assert_eq!(issued.chain_der.len(), 1);
    assert_leaf(
        &issued.chain_der[0],
        ca.trust_bundle_der()[0].as_slice(),
        &identity,
    );

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
    let identity = id("demo", "web");
    let issued = ca.sign(&modest_csr(&identity), &identity, None).unwrap();
    let root = CertificateDer::from(ca.trust_bundle_der().remove(0));
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
fn a_csr_asking_for_more_than_the_leaf_carries_is_refused() {
    // The CA used to sign greedy requests and silently narrow them; now it says no, so a
    // misconfigured or probing caller hears why instead of getting a different leaf.
    let ca = CertificateAuthority::generate(TD).unwrap();
    let err = ca
        .sign(&greedy_csr(), &id("demo", "web"), None)
        .unwrap_err();
    assert!(matches!(err, Error::CsrPolicy(_)), "{err:?}");
    // The proxy's own CSR (one URI SAN, its identity) is what the CA expects...
    let proxy = trellis_identity::generate_csr(&id("demo", "web")).unwrap();
    ca.sign(&proxy.csr_der, &id("demo", "web"), None).unwrap();
    // ...but only for the identity it names.
    let err = ca
        .sign(&proxy.csr_der, &id("demo", "db"), None)
        .unwrap_err();
    assert!(
        matches!(&err, Error::CsrIdentity { identity, .. } if identity == "spiffe://cluster.local/ns/demo/sa/db"),
        "{err:?}"
    );
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
    assert_leaf(
        &issued.chain_der[0],
        ca.trust_bundle_der()[0].as_slice(),
        &identity,
    );
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
        ("a certificate", ca.trust_bundle_der()[0].clone()),
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
    assert_eq!(
        first.trust_bundle_der()[0].as_slice(),
        second.trust_bundle_der()[0].as_slice()
    );
    assert_eq!(first.trust_bundle_pem(), second.trust_bundle_pem());
    assert_eq!(
        first.trust_bundle_der(),
        vec![first.trust_bundle_der()[0].clone()]
    );
    // The reloaded root can still sign, and its leaves chain to the original root.
    let identity = id("demo", "web");
    let issued = second.sign(&p256_csr(), &identity, None).unwrap();
    assert_leaf(
        &issued.chain_der[0],
        first.trust_bundle_der()[0].as_slice(),
        &identity,
    );

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
        .certify(request(modest_csr(&id("demo", "web")), token, 600))
        .await
        .unwrap()
        .into_inner();

    let identity = id("demo", "web");
    assert_eq!(resp.identity, identity.as_str());
    assert_eq!(
        resp.trust_bundle_der,
        vec![f.ca.trust_bundle_der()[0].clone()]
    );
    assert_eq!(resp.chain_der.len(), 1);
    assert_leaf(
        &resp.chain_der[0],
        f.ca.trust_bundle_der()[0].as_slice(),
        &identity,
    );
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

/// What a request in the abuse matrix carries as its token.
enum Tok {
    /// A valid token for demo/`sa`.
    For(&'static str),
    /// Valid but for `exp`, an hour ago.
    Expired,
    /// Valid but for `aud`.
    WrongAudience,
    /// Signed by another key under the trusted key id.
    OtherKey,
    /// Minted by another issuer (its own key id).
    OtherIssuer,
    /// 64 KiB of token.
    Oversized,
}

/// A service whose issuer key is on disk, so tests can forge tokens with arbitrary claims.
struct Forger {
    fixture: Fixture,
    /// A handle on the service's metrics (they share their counters).
    metrics: Metrics,
    key: jsonwebtoken::EncodingKey,
    _dir: tempfile::TempDir,
}

fn forger(limit: Option<trellis_ca::RateLimit>) -> Forger {
    let dir = tempfile::tempdir().unwrap();
    let issuer = LocalIssuer::load_or_generate(dir.path()).unwrap();
    let pem = std::fs::read_to_string(dir.path().join(ISSUER_KEY_FILE)).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_der(pem::parse(pem).unwrap().contents());
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let verifier: Arc<dyn TokenVerifier> = Arc::new(issuer.verifier(DEFAULT_AUDIENCE).unwrap());
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let mut service = IdentityService::new(ca.clone(), verifier, metrics.clone());
    if let Some(limit) = limit {
        service = service.with_rate_limit(limit);
    }
    Forger {
        fixture: Fixture {
            service,
            issuer,
            ca,
            registry,
        },
        metrics,
        key,
        _dir: dir,
    }
}

impl Forger {
    fn token(&self, tok: &Tok) -> String {
        let issuer = &self.fixture.issuer;
        match tok {
            Tok::For(sa) => issuer.mint("demo", sa, DEFAULT_AUDIENCE, HOUR).unwrap(),
            Tok::Expired => self.forge(issuer.key_id(), -3600, DEFAULT_AUDIENCE),
            Tok::WrongAudience => issuer.mint("demo", "web", "kubernetes", HOUR).unwrap(),
            Tok::OtherKey => {
                let other = forger(None);
                other.forge(issuer.key_id(), 3600, DEFAULT_AUDIENCE)
            }
            Tok::OtherIssuer => LocalIssuer::generate()
                .unwrap()
                .mint("demo", "web", DEFAULT_AUDIENCE, HOUR)
                .unwrap(),
            Tok::Oversized => "e".repeat(64 * 1024),
        }
    }

    /// A demo/web token under `kid`, expiring `exp_in` seconds from now.
    fn forge(&self, kid: &str, exp_in: i64, audience: &str) -> String {
        let now = now();
        let claims = serde_json::json!({
            "iss": trellis_ca::LOCAL_ISSUER,
            "sub": "system:serviceaccount:demo:web",
            "aud": [audience],
            "iat": now - 7200,
            "nbf": now - 7200,
            "exp": now + exp_in,
            "kubernetes.io": {"namespace": "demo", "serviceaccount": {"name": "web", "uid": "u"}},
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn csr_asking(tweak: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
    let mut params = CertificateParams::default();
    tweak(&mut params);
    csr_with(&rcgen::PKCS_ECDSA_P256_SHA256, &params)
}

fn uri_san(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).unwrap())
}

/// Every way a caller might try to get more than its token proves, through the service,
/// each paired with what must still work. Refused requests never move the issued counter;
/// a bad token is refused before its (equally bad) CSR is looked at.
#[tokio::test]
async fn abuse_matrix() {
    let f = forger(None);
    let web = "spiffe://cluster.local/ns/demo/sa/web";
    let greedy = greedy_csr();
    type Row = (&'static str, Tok, Vec<u8>, Result<(), (Code, &'static str)>);
    let rows: Vec<Row> = vec![
        (
            "CSR names another service account",
            Tok::For("web"),
            csr_asking(|p| {
                p.subject_alt_names = vec![uri_san("spiffe://cluster.local/ns/demo/sa/admin")]
            }),
            Err((
                Code::PermissionDenied,
                "csr asks for identity \"spiffe://cluster.local/ns/demo/sa/admin\", but the token proves spiffe://cluster.local/ns/demo/sa/web",
            )),
        ),
        (
            "two URI SANs, the first ours",
            Tok::For("web"),
            csr_asking(|p| {
                p.subject_alt_names = vec![
                    uri_san(web),
                    uri_san("spiffe://cluster.local/ns/demo/sa/admin"),
                ]
            }),
            Err((
                Code::InvalidArgument,
                "csr refused: requests 2 URI SANs; at most one is allowed",
            )),
        ),
        (
            "DNS SAN",
            Tok::For("web"),
            csr_asking(|p| {
                p.subject_alt_names = vec![
                    uri_san(web),
                    SanType::DnsName(Ia5String::try_from("web.demo.svc").unwrap()),
                ]
            }),
            Err((
                Code::InvalidArgument,
                "csr refused: requests DNS SAN \"web.demo.svc\"",
            )),
        ),
        (
            "IP SAN",
            Tok::For("web"),
            csr_asking(|p| {
                p.subject_alt_names = vec![SanType::IpAddress("10.0.0.1".parse().unwrap())]
            }),
            Err((
                Code::InvalidArgument,
                "csr refused: requests IP address SAN 10.0.0.1",
            )),
        ),
        (
            "CA:TRUE",
            Tok::For("web"),
            csr_asking(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
            Err((
                Code::InvalidArgument,
                "csr refused: requests basicConstraints CA:TRUE",
            )),
        ),
        (
            "keyCertSign",
            Tok::For("web"),
            csr_asking(|p| {
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ]
            }),
            Err((
                Code::InvalidArgument,
                "csr refused: requests key usage keyCertSign",
            )),
        ),
        (
            "1 MiB CSR",
            Tok::For("web"),
            vec![0x30; 1024 * 1024],
            Err((
                Code::InvalidArgument,
                "csr is 1048576 bytes, more than the 16384 allowed",
            )),
        ),
        (
            "garbage DER",
            Tok::For("web"),
            b"\x30\x03\x02\x01\xff garbage".to_vec(),
            Err((Code::InvalidArgument, "csr is not a valid PKCS#10 request")),
        ),
        (
            "expired token",
            Tok::Expired,
            greedy.clone(),
            Err((Code::Unauthenticated, "token has expired")),
        ),
        (
            "wrong audience",
            Tok::WrongAudience,
            greedy.clone(),
            Err((
                Code::Unauthenticated,
                "token audience does not include \"trellis\"",
            )),
        ),
        (
            "signed by another key under our key id",
            Tok::OtherKey,
            greedy.clone(),
            Err((Code::Unauthenticated, "token signature does not verify")),
        ),
        (
            "another issuer's key",
            Tok::OtherIssuer,
            greedy.clone(),
            Err((
                Code::Unauthenticated,
                "token key id is not in the trusted key set",
            )),
        ),
        (
            "oversized token",
            Tok::Oversized,
            greedy,
            Err((Code::Unauthenticated, "token is longer than 8192 bytes")),
        ),
        // What must keep working.
        (
            "the proxy's CSR",
            Tok::For("web"),
            trellis_identity::generate_csr(&id("demo", "web"))
                .unwrap()
                .csr_der,
            Ok(()),
        ),
        (
            "a CSR without extensions",
            Tok::For("web"),
            p256_csr(),
            Ok(()),
        ),
        (
            "CA:FALSE, mTLS usages and a subject",
            Tok::For("web"),
            modest_csr(&id("demo", "web")),
            Ok(()),
        ),
    ];
    for (name, tok, csr, expected) in rows {
        let token = f.token(&tok);
        let before = f.metrics.issued();
        let result = f
            .fixture
            .service
            .certify(request(csr, token.clone(), 0))
            .await;
        let after = f.metrics.issued();
        match (result, expected) {
            (Ok(resp), Ok(())) => {
                let resp = resp.into_inner();
                assert_eq!(resp.identity, web, "{name}");
                assert_leaf(
                    &resp.chain_der[0],
                    f.fixture.ca.trust_bundle_der()[0].as_slice(),
                    &id("demo", "web"),
                );
                assert_eq!(after, before + 1, "{name}: issued counter");
            }
            (Err(status), Err((code, message))) => {
                assert_eq!(status.code(), code, "{name}: {status:?}");
                assert!(
                    status.message().contains(message),
                    "{name}: {:?} does not contain {message:?}",
                    status.message()
                );
                assert!(
                    !status
                        .message()
                        .contains(&token[token.len().saturating_sub(16)..]),
                    "{name}: token echoed"
                );
                assert_eq!(after, before, "{name}: issued counter moved");
            }
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
    let text = metrics_text(&f.fixture.registry);
    for line in [
        r#"trellis_ca_requests_failed_total{reason="identity"} 1"#,
        r#"trellis_ca_requests_failed_total{reason="csr_policy"} 5"#,
        r#"trellis_ca_requests_failed_total{reason="invalid_csr"} 2"#,
        r#"trellis_ca_requests_failed_total{reason="unauthenticated"} 5"#,
        "trellis_ca_certificates_issued_total 3",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn each_identity_is_rate_limited_after_its_token_and_before_its_csr() {
    let f = forger(Some(trellis_ca::RateLimit::new(3, 1.0).unwrap()));
    let web = f.token(&Tok::For("web"));
    for _ in 0..3 {
        f.fixture
            .service
            .certify(request(p256_csr(), web.clone(), 0))
            .await
            .unwrap();
    }
    // A bad token is refused as such and spends nothing.
    let status = f
        .fixture
        .service
        .certify(request(p256_csr(), f.token(&Tok::Expired), 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // The fourth request is refused before its CSR (garbage here) is parsed.
    for csr in [p256_csr(), b"garbage".to_vec()] {
        let status = f
            .fixture
            .service
            .certify(request(csr, web.clone(), 0))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().starts_with(
                "certificate request rate limit exceeded for spiffe://cluster.local/ns/demo/sa/web (burst 3, 1 per second); retry in "
            ),
            "{}",
            status.message()
        );
    }
    // Another identity has its own budget.
    f.fixture
        .service
        .certify(request(p256_csr(), f.token(&Tok::For("db")), 0))
        .await
        .unwrap();
    // One request's worth of refill later, one more request goes through.
    tokio::time::advance(Duration::from_secs(1)).await;
    f.fixture
        .service
        .certify(request(p256_csr(), web.clone(), 0))
        .await
        .unwrap();
    let status = f
        .fixture
        .service
        .certify(request(p256_csr(), web, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let text = metrics_text(&f.fixture.registry);
    for line in [
        r#"trellis_ca_requests_failed_total{reason="rate_limited"} 3"#,
        r#"trellis_ca_requests_failed_total{reason="unauthenticated"} 1"#,
        "trellis_ca_certificates_issued_total 5",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    // Every reason is exported from the start; the others stayed at 0.
    assert!(
        text.contains(r#"trellis_ca_requests_failed_total{reason="invalid_csr"} 0"#),
        "{text}"
    );
}

/// The paired positive: at a CA generation change every replica of a Deployment
/// re-issues within ~2 s under one service account. 200 at once all get through with the
/// default limit.
#[tokio::test]
async fn a_burst_of_200_for_one_identity_is_served_by_default() {
    let f = fixture();
    let token = f
        .issuer
        .mint("demo", "web", DEFAULT_AUDIENCE, HOUR)
        .unwrap();
    let csr = trellis_identity::generate_csr(&id("demo", "web"))
        .unwrap()
        .csr_der;
    let calls = (0..200).map(|_| f.service.certify(request(csr.clone(), token.clone(), 0)));
    let results = futures_util::future::join_all(calls).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
    let text = metrics_text(&f.registry);
    assert!(
        text.contains("trellis_ca_certificates_issued_total 200"),
        "{text}"
    );
    assert!(
        text.contains(r#"trellis_ca_requests_failed_total{reason="rate_limited"} 0"#),
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

// === CA material from sources, and changing CA on a live mesh ===

use trellis_ca::source::{self, CaSource, DirSource, RotationPolicy, SourceMetrics};
use trellis_ca::{CaMaterial, CaPems, Staged, generate_pems};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn plugin(name: &str) -> CaPems {
    generate_pems(TD, name, 365 * DAY, 30 * DAY).unwrap()
}

/// webpki's verdict on a leaf chain (leaf first) against `roots`.
fn webpki_accepts(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> bool {
    let roots: Vec<CertificateDer<'_>> = roots.iter().map(|r| r.as_slice().into()).collect();
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf = CertificateDer::from(chain[0].as_slice());
    let inter: Vec<CertificateDer<'_>> = chain[1..].iter().map(|c| c.as_slice().into()).collect();
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inter,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .is_ok()
}

#[test]
fn plugin_layout_signs_leaves_that_chain_through_the_intermediate() {
    let pems = plugin("test");
    let material = CaMaterial::from_pems(&pems, TD, "test").unwrap();
    assert_eq!(material.roots_der().len(), 1);
    assert_eq!(
        material.chain_der().len(),
        1,
        "the intermediate rides with each leaf"
    );
    let ca = CertificateAuthority::new(TD, material).unwrap();
    let issued = ca.sign(&p256_csr(), &id("demo", "web"), None).unwrap();
    assert_eq!(issued.chain_der.len(), 2);
    assert_eq!(issued.chain_der[1], ca.signing().issuer_der());
    assert!(webpki_accepts(&issued.chain_der, &ca.trust_bundle_der()));
    // Never the root in the chain, and without the intermediate the leaf does not verify.
    assert!(!issued.chain_der.contains(&ca.trust_bundle_der()[0]));
    assert!(!webpki_accepts(
        &issued.chain_der[..1],
        &ca.trust_bundle_der()
    ));
}

#[test]
fn a_leaf_never_outlives_the_intermediate() {
    let pems = generate_pems(TD, "short", 365 * DAY, HOUR).unwrap();
    let ca = CertificateAuthority::new(TD, CaMaterial::from_pems(&pems, TD, "t").unwrap())
        .unwrap()
        .with_config(CaConfig::default().with_max_ttl(DAY).with_default_ttl(DAY))
        .unwrap();
    let issued = ca.sign(&p256_csr(), &id("demo", "web"), None).unwrap();
    assert_eq!(issued.not_after, ca.signing().not_after());
    assert!(unix(issued.not_after) <= now() + 3600 + 1);
}

#[test]
fn bad_plugin_material_is_refused_with_the_part_named() {
    let good = plugin("a");
    let other = plugin("b");
    let cases: Vec<(&str, CaPems, &str)> = vec![
        (
            "key of another CA",
            CaPems {
                ca_key: other.ca_key.clone(),
                ..good.clone()
            },
            "ca-key: does not belong to the certificate in ca-cert",
        ),
        (
            "intermediate of another root",
            CaPems {
                root_cert: other.root_cert.clone(),
                ..good.clone()
            },
            "ca-cert: does not chain to any certificate in root-cert",
        ),
        (
            "no root",
            CaPems {
                root_cert: String::new(),
                ..good.clone()
            },
            "root-cert: no certificate",
        ),
        (
            "a key where the root should be",
            CaPems {
                root_cert: good.ca_key.clone(),
                ..good.clone()
            },
            "root-cert: expected CERTIFICATE blocks, found PRIVATE KEY",
        ),
        (
            "garbage key",
            CaPems {
                ca_key: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
                ..good.clone()
            },
            "ca-key: not a PKCS#8 private key",
        ),
        (
            "two issuing certificates",
            CaPems {
                ca_cert: format!("{}{}", good.ca_cert, other.ca_cert),
                ..good
            },
            "ca-cert: expected exactly one certificate, found 2",
        ),
    ];
    for (what, pems, expected) in cases {
        let err = CaMaterial::from_pems(&pems, TD, "secret /x")
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{what}: {err}");
        assert!(
            err.starts_with("CA material from secret /x: "),
            "{what}: {err}"
        );
        assert!(
            !err.contains("BEGIN PRIVATE KEY"),
            "{what}: key material in {err}"
        );
    }
    // An intermediate for another trust domain.
    let foreign = generate_pems("other.domain", "x", 365 * DAY, DAY).unwrap();
    assert!(matches!(
        CaMaterial::from_pems(&foreign, TD, "t"),
        Err(Error::RootTrustDomain { .. })
    ));
}

#[test]
fn several_roots_are_all_trusted() {
    let a = plugin("a");
    let b = plugin("b");
    let both = CaPems {
        root_cert: format!("{}{}", a.root_cert, b.root_cert),
        ..a
    };
    let m = CaMaterial::from_pems(&both, TD, "t").unwrap();
    assert_eq!(m.roots_der().len(), 2);
}

/// The three steps of a CA switch, as proxies would see them through the bundle.
#[test]
fn switching_ca_overlaps_roots_then_retires_the_old_one() {
    let ca = CertificateAuthority::load_or_generate(&tempfile::tempdir().unwrap().keep(), TD)
        .unwrap()
        .with_config(
            CaConfig::default()
                .with_max_ttl(HOUR)
                .with_default_ttl(HOUR),
        )
        .unwrap();
    let mut trust = ca.subscribe();
    let old_root = ca.trust_bundle_der()[0].clone();
    let old_leaf = ca.sign(&p256_csr(), &id("demo", "a"), None).unwrap();
    assert_eq!(ca.generation(), 1);

    // Step 1: new roots join; the old CA still signs; generation unchanged.
    let next = CaMaterial::from_pems(&plugin("kv"), TD, "next").unwrap();
    let new_root = next.roots_der()[0].clone();
    assert_eq!(ca.stage(next), Staged::Pending);
    assert!(trust.has_changed().unwrap());
    let bundle = trust.borrow_and_update().clone();
    assert_eq!(bundle.roots_der, vec![old_root.clone(), new_root]);
    assert_eq!(bundle.generation, 1);
    let during = ca.sign(&p256_csr(), &id("demo", "b"), None).unwrap();
    assert_eq!(
        during.chain_der.len(),
        1,
        "still the self-signed root signing"
    );
    // Another new CA while one is pending replaces the pending one.
    assert_eq!(
        ca.stage(CaMaterial::from_pems(&plugin("kv"), TD, "other").unwrap()),
        Staged::Pending,
        "a different intermediate replaces the pending one"
    );

    // Step 2: the new CA signs; generation 2; both roots still trusted.
    let t0 = SystemTime::now();
    assert!(ca.activate(t0));
    assert!(!ca.activate(t0), "nothing left to activate");
    assert_eq!(ca.generation(), 2);
    let new_leaf = ca.sign(&p256_csr(), &id("demo", "c"), None).unwrap();
    let bundle = ca.trust_bundle_der();
    assert_eq!(bundle.len(), 2);
    assert!(webpki_accepts(&new_leaf.chain_der, &bundle));
    assert!(
        webpki_accepts(&old_leaf.chain_der, &bundle),
        "old leaves keep working"
    );
    let (_, generation) = ca
        .sign_with_generation(&p256_csr(), &id("demo", "d"), None)
        .unwrap();
    assert_eq!(generation, 2);

    // Step 3: the old root stays until every leaf it verified has expired.
    assert_eq!(ca.retire_expired(t0 + HOUR - Duration::from_secs(1)), 0);
    assert_eq!(ca.trust_bundle_der().len(), 2);
    assert!(ca.next_retirement().unwrap() > t0 + HOUR);
    assert_eq!(ca.retire_expired(t0 + HOUR + Duration::from_secs(120)), 1);
    let bundle = ca.trust_bundle_der();
    assert!(!bundle.contains(&old_root));
    assert!(webpki_accepts(&new_leaf.chain_der, &bundle));
    assert!(!webpki_accepts(&old_leaf.chain_der, &bundle));
}

#[test]
fn a_root_added_to_the_same_ca_only_grows_the_bundle() {
    let a = plugin("a");
    let ca = CertificateAuthority::new(TD, CaMaterial::from_pems(&a, TD, "t").unwrap()).unwrap();
    let extra = plugin("next-root");
    let grown = CaPems {
        root_cert: format!("{}{}", a.root_cert, extra.root_cert),
        ..a
    };
    let m = CaMaterial::from_pems(&grown, TD, "t").unwrap();
    assert_eq!(ca.stage(m), Staged::RootsUpdated);
    assert_eq!(ca.trust_bundle_der().len(), 2);
    assert_eq!(ca.generation(), 1, "same issuing CA: nobody re-issues");
    assert_eq!(
        ca.stage(CaMaterial::from_pems(&grown, TD, "t").unwrap()),
        Staged::Unchanged
    );
}

#[tokio::test(start_paused = true)]
async fn the_source_loop_stages_activates_and_survives_bad_material() {
    let dir = tempfile::tempdir().unwrap();
    let first = plugin("first");
    source::write_dir(dir.path(), &first).unwrap();
    let src = DirSource::new(dir.path());
    assert_eq!(src.label(), format!("secret {}", dir.path().display()));
    let material = CaMaterial::from_pems(&src.load().await.unwrap(), TD, &src.label()).unwrap();
    let ca = Arc::new(
        CertificateAuthority::new(TD, material)
            .unwrap()
            .with_config(
                CaConfig::default()
                    .with_max_ttl(HOUR)
                    .with_default_ttl(HOUR),
            )
            .unwrap(),
    );
    let metrics = SourceMetrics::new(&mut Registry::default());
    let policy = RotationPolicy {
        reload_interval: Duration::from_secs(10),
        propagation: Duration::from_secs(30),
    };
    let stop = tokio_util_like_stop();
    let task = tokio::spawn(source::run(
        ca.clone(),
        Arc::new(src),
        policy,
        metrics.clone(),
        stop.1,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ca.generation(), 1);

    // A broken key file: the CA keeps its material and counts the failure.
    std::fs::write(dir.path().join("ca-key.pem"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(metrics.load_failures() >= 1);
    assert_eq!(ca.trust_bundle_der().len(), 1);

    // New material: staged at the next read, active after the propagation delay.
    let second = plugin("second");
    source::write_dir(dir.path(), &second).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        ca.trust_bundle_der().len(),
        2,
        "both roots while propagating"
    );
    assert_eq!(ca.generation(), 1);
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(ca.generation(), 2);
    let leaf = ca.sign(&p256_csr(), &id("demo", "web"), None).unwrap();
    assert_eq!(leaf.chain_der[1], ca.signing().issuer_der());
    let _ = stop.0.send(());
    task.await.unwrap();
}

/// A oneshot used as the loop's shutdown future.
fn tokio_util_like_stop() -> (
    tokio::sync::oneshot::Sender<()>,
    impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}
