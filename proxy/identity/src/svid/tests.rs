use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, CustomExtension, KeyPair, SanType};

use super::*;
use crate::test_util::{LeafOptions, TestCa};

fn id() -> SpiffeId {
    SpiffeId::new("cluster.local", "demo", "web").unwrap()
}

#[test]
fn svid_exposes_id_chain_and_validity() {
    let ca = TestCa::new("cluster.local");
    let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
    let not_after = not_before + Duration::from_secs(3600);
    let (chain, key) = ca.issue_with(LeafOptions {
        not_before,
        not_after,
        via_intermediate: true,
        ..LeafOptions::new(&id())
    });
    let svid = Svid::new(chain.clone(), key.clone_key()).unwrap();
    assert_eq!(svid.id(), &id());
    assert_eq!(svid.chain(), chain.as_slice());
    assert_eq!(svid.not_before(), not_before);
    assert_eq!(svid.not_after(), not_after);
    assert_eq!(svid.key().secret_der(), key.secret_der());
    let copy = svid.clone();
    assert_eq!(copy.key().secret_der(), key.secret_der());
    assert_eq!((copy.id(), copy.chain()), (svid.id(), svid.chain()));
}

#[test]
fn svid_debug_hides_the_key() {
    let ca = TestCa::new("cluster.local");
    let svid = ca.issue(&id());
    let dbg = format!("{svid:?}");
    assert!(
        dbg.contains("spiffe://cluster.local/ns/demo/sa/web"),
        "{dbg}"
    );
    assert!(!dbg.contains("key"), "{dbg}");
}

#[test]
fn svid_rejects_empty_chain_wrong_key_and_bad_identity() {
    let ca = TestCa::new("cluster.local");
    let (chain, key) = ca.issue_with(LeafOptions::new(&id()));
    let (_, other_key) = ca.issue_with(LeafOptions::new(&id()));
    assert!(matches!(
        Svid::new(vec![], key.clone_key()),
        Err(Error::EmptyChain)
    ));
    assert!(matches!(Svid::new(chain, other_key), Err(Error::Key(_))));
    let (chain, key) = ca.issue_with(LeafOptions {
        uri_sans: vec![id().to_string(), id().to_string()],
        ..LeafOptions::new(&id())
    });
    assert!(matches!(
        Svid::new(chain, key),
        Err(Error::MultipleUriSans(2))
    ));
}

#[test]
fn leaf_identity_needs_exactly_one_canonical_uri_san() {
    let ca = TestCa::new("cluster.local");
    let leaf = |uris: &[&str], dns: &[&str]| {
        let (chain, _) = ca.issue_with(LeafOptions {
            uri_sans: uris.iter().map(|s| (*s).to_owned()).collect(),
            dns_sans: dns.iter().map(|s| (*s).to_owned()).collect(),
            ..LeafOptions::new(&id())
        });
        leaf_identity(&chain[0])
    };
    let good = "spiffe://cluster.local/ns/demo/sa/web";
    assert_eq!(leaf(&[good], &[]).unwrap(), id());
    assert_eq!(
        leaf(&[good], &["web.demo.svc", "*.demo.svc"]).unwrap(),
        id()
    );
    assert!(matches!(leaf(&[], &[]), Err(Error::NoUriSan)));
    assert!(matches!(leaf(&[], &["web.demo.svc"]), Err(Error::NoUriSan)));
    assert!(matches!(
        leaf(&[good, good], &[]),
        Err(Error::MultipleUriSans(2))
    ));
    let other = "spiffe://cluster.local/ns/demo/sa/db";
    assert!(matches!(
        leaf(&[good, other, "x:y"], &[]),
        Err(Error::MultipleUriSans(3))
    ));
    let got = leaf(&["spiffe://cluster.local/ns/demo/sa/web/"], &[]);
    assert!(
        matches!(&got, Err(Error::InvalidSpiffeId { uri, .. }) if uri.ends_with('/')),
        "{got:?}"
    );
}

#[test]
fn leaf_identity_sees_uri_sans_in_a_second_san_extension() {
    // DER GeneralNames holding one uniformResourceIdentifier ([6] IA5String).
    let uri = b"spiffe://cluster.local/ns/demo/sa/db";
    let mut names = vec![0x30, uri.len() as u8 + 2, 0x86, uri.len() as u8];
    names.extend_from_slice(uri);

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id().as_str().try_into().unwrap())];
    params.custom_extensions = vec![CustomExtension::from_oid_content(&[2, 5, 29, 17], names)];
    let cert = params.self_signed(&key).unwrap();
    let got = leaf_identity(cert.der());
    assert!(matches!(got, Err(Error::MultipleUriSans(2))), "{got:?}");
}

#[test]
fn leaf_identity_rejects_garbage_and_trailing_bytes() {
    let ca = TestCa::new("cluster.local");
    let (chain, _) = ca.issue_with(LeafOptions::new(&id()));
    let mut padded = chain[0].to_vec();
    padded.push(0);
    let got = leaf_identity(&CertificateDer::from(padded));
    assert!(matches!(got, Err(Error::BadCertificate(_))), "{got:?}");
    let got = leaf_identity(&CertificateDer::from(vec![1, 2, 3]));
    assert!(matches!(got, Err(Error::BadCertificate(_))), "{got:?}");
}
