//! The control plane's own TLS serving certificates (`CertificateAuthority::issue_serving`):
//! what the leaf carries, parsed from the DER; that rustls accepts it for its DNS names
//! against the trust bundle and for no other name; that no mesh peer can take it for an
//! identity; and that it is not counted as a workload certificate.

// Helpers outside `#[test]` functions unwrap too; a failure there is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::registry::Registry;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use trellis_ca::{
    CaConfig, CaMaterial, CertificateAuthority, DEFAULT_AUDIENCE, Error, IdentityService,
    LocalIssuer, Metrics, TokenVerifier, generate_pems,
};
use trellis_identity::{PeerRole, SpiffeId, TrustBundle};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const TD: &str = "cluster.local";
const NAME: &str = "trellis-webhook.trellis-system.svc";
const HOUR: Duration = Duration::from_secs(3600);

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|n| (*n).to_owned()).collect()
}

fn unix(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// A CA whose issuing certificate is an intermediate (the `secret` / Key Vault layout),
/// so the chain carries more than the leaf.
fn intermediate_ca() -> CertificateAuthority {
    let pems = generate_pems(TD, "test", 10 * 24 * HOUR, 5 * 24 * HOUR).unwrap();
    let material = CaMaterial::from_pems(&pems, TD, "test").unwrap();
    CertificateAuthority::new(TD, material).unwrap()
}

/// rustls' own server verifier, trusting exactly the CA's trust bundle.
fn verifier(ca: &CertificateAuthority) -> Arc<WebPkiServerVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    for der in ca.trust_bundle_der() {
        roots.add(CertificateDer::from(der)).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap()
}

fn verify(
    verifier: &WebPkiServerVerifier,
    chain: &[CertificateDer<'static>],
    name: &str,
) -> Result<(), rustls::Error> {
    let (leaf, intermediates) = chain.split_first().unwrap();
    verifier
        .verify_server_cert(
            leaf,
            intermediates,
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
}

#[test]
fn the_leaf_carries_dns_names_server_auth_and_no_identity() {
    for ca in [
        CertificateAuthority::generate(TD).unwrap(),
        intermediate_ca(),
    ] {
        let dns = names(&[NAME, "trellis-webhook.trellis-system.svc.cluster.local"]);
        let cert = ca.issue_serving(&dns, 24 * HOUR).unwrap();
        let intermediates = ca.signing().chain_der().to_vec();
        assert_eq!(
            cert.chain_der[1..],
            intermediates[..],
            "leaf + intermediates"
        );
        for root in ca.trust_bundle_der() {
            assert!(!cert.chain_der.contains(&root), "never the root");
        }
        assert_eq!(cert.generation, ca.generation());

        let (rest, leaf) = X509Certificate::from_der(&cert.chain_der[0]).unwrap();
        assert!(rest.is_empty());
        let san = leaf.subject_alternative_name().unwrap().expect("a SAN");
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::DNSName(&dns[0]), GeneralName::DNSName(&dns[1])],
            "the DNS names and nothing else: no URI SAN"
        );
        let bc = leaf.basic_constraints().unwrap().expect("basicConstraints");
        assert!(!bc.value.ca, "CA:FALSE");
        let ku = leaf.key_usage().unwrap().expect("keyUsage").value;
        assert!(ku.digital_signature());
        assert!(!ku.key_cert_sign() && !ku.crl_sign() && !ku.key_agreement());
        let eku = leaf.extended_key_usage().unwrap().expect("EKU").value;
        assert!(eku.server_auth, "serverAuth");
        assert!(
            !eku.client_auth && !eku.any && !eku.code_signing && eku.other.is_empty(),
            "serverAuth only: {eku:?}"
        );
        assert_eq!(unix(cert.not_after), leaf.validity().not_after.timestamp());
        assert_eq!(
            unix(cert.not_before),
            leaf.validity().not_before.timestamp()
        );
        assert!(leaf.raw_serial().len() >= 16);
        let issuer_der = ca.signing().issuer_der().to_vec();
        let (_, issuer) = X509Certificate::from_der(&issuer_der).unwrap();
        leaf.verify_signature(Some(issuer.public_key())).unwrap();
        // The key returned is the leaf's.
        let key = rcgen::KeyPair::try_from(&cert.private_key()).unwrap();
        assert_eq!(
            rcgen::PublicKeyData::subject_public_key_info(&key),
            leaf.public_key().raw
        );
    }
}

#[test]
fn rustls_accepts_it_for_its_names_only() {
    for ca in [
        CertificateAuthority::generate(TD).unwrap(),
        intermediate_ca(),
    ] {
        let cert = ca.issue_serving(&names(&[NAME]), HOUR).unwrap();
        let chain = cert.certificates();
        let trusting = verifier(&ca);
        verify(&trusting, &chain, NAME).unwrap();
        let err = verify(&trusting, &chain, "other.trellis-system.svc").unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
                    | rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForNameContext { .. }
                    )
            ),
            "{err:?}"
        );
        // A bundle without the CA's root trusts none of it.
        let stranger = CertificateAuthority::generate(TD).unwrap();
        assert!(verify(&verifier(&stranger), &chain, NAME).is_err());
    }
}

#[test]
fn no_mesh_peer_accepts_it_as_an_identity() {
    let ca = intermediate_ca();
    let cert = ca.issue_serving(&names(&[NAME]), HOUR).unwrap();
    let bundle = TrustBundle::from_der(ca.trust_bundle_der()).unwrap();
    for role in [PeerRole::Server, PeerRole::Client] {
        let got =
            trellis_identity::verify_peer(&cert.certificates(), &bundle, TD, role, UnixTime::now());
        assert!(got.is_err(), "{role}: {got:?}");
    }
    assert_eq!(trellis_identity::peer_identity(&cert.certificates()), None);
}

#[test]
fn lifetime_is_capped_by_the_max_ttl_and_the_chain() {
    let ca = CertificateAuthority::generate(TD)
        .unwrap()
        .with_config(
            CaConfig::default()
                .with_max_ttl(2 * HOUR)
                .with_default_ttl(HOUR),
        )
        .unwrap();
    let cert = ca.issue_serving(&names(&[NAME]), 24 * HOUR).unwrap();
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert_eq!(
        life,
        2 * HOUR + Duration::from_secs(60),
        "2 h, back-dated 1 min"
    );

    // An intermediate that expires in an hour cuts a 24 h request short.
    let pems = generate_pems(TD, "short", 24 * HOUR, HOUR).unwrap();
    let ca = CertificateAuthority::new(TD, CaMaterial::from_pems(&pems, TD, "t").unwrap()).unwrap();
    let cert = ca.issue_serving(&names(&[NAME]), 24 * HOUR).unwrap();
    assert_eq!(cert.not_after, ca.root_not_after());
}

#[test]
fn names_that_are_not_dns_names_are_refused() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    for bad in [
        vec![],
        names(&["10.0.0.1"]),
        names(&["*.trellis-system.svc"]),
        names(&["not a name"]),
        names(&[NAME, ""]),
    ] {
        let err = ca.issue_serving(&bad, HOUR).unwrap_err();
        assert!(matches!(err, Error::ServingName(_)), "{bad:?}: {err:?}");
    }
}

#[test]
fn the_csr_api_still_refuses_dns_names() {
    // The internal path does not open the public one: a CSR asking for the webhook's
    // name is refused as before.
    let ca = CertificateAuthority::generate(TD).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(names(&[NAME]))
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let id = SpiffeId::new(TD, "trellis-system", "trellis-control-plane").unwrap();
    let err = ca.sign(csr.der(), &id, None).unwrap_err();
    assert!(matches!(err, Error::CsrPolicy(_)), "{err:?}");
}

#[test]
fn keys_are_fresh_and_not_printed() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let a = ca.issue_serving(&names(&[NAME]), HOUR).unwrap();
    let b = ca.issue_serving(&names(&[NAME]), HOUR).unwrap();
    assert_ne!(a.private_key(), b.private_key());
    assert_ne!(a.serial, b.serial);
    let shown = format!("{a:?}");
    assert!(
        shown.contains("ServingCert") && !shown.contains("key"),
        "{shown}"
    );
}

#[test]
fn it_is_not_counted_as_a_workload_certificate() {
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let issuer = LocalIssuer::generate().unwrap();
    let verifier: Arc<dyn TokenVerifier> = Arc::new(issuer.verifier(DEFAULT_AUDIENCE).unwrap());
    let mut registry = Registry::default();
    let _service = IdentityService::new(ca.clone(), verifier, Metrics::new(&mut registry));
    ca.issue_serving(&names(&[NAME]), HOUR).unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("trellis_ca_certificates_issued_total 0"),
        "{text}"
    );
}

#[test]
fn a_new_generation_signs_the_next_certificate() {
    let ca = CertificateAuthority::generate(TD).unwrap();
    let first = ca.issue_serving(&names(&[NAME]), HOUR).unwrap();
    let pems = generate_pems(TD, "next", 24 * HOUR, 12 * HOUR).unwrap();
    ca.stage(CaMaterial::from_pems(&pems, TD, "next").unwrap());
    assert!(ca.activate(SystemTime::now()));
    let second = ca.issue_serving(&names(&[NAME]), HOUR).unwrap();
    assert_eq!((first.generation, second.generation), (1, 2));
    // Signed by the new intermediate, which the chain now carries; both roots are
    // trusted during the change, and the new chain verifies.
    assert_eq!(second.chain_der.len(), 2);
    verify(&verifier(&ca), &second.certificates(), NAME).unwrap();
}
