use rustls_pki_types::UnixTime;

use super::*;
use crate::matrix::{Fixture, TD};
use crate::test_util::{LeafOptions, TestCa};

#[test]
fn accepts_valid_svid_in_either_role() {
    let fx = Fixture::new();
    for role in [PeerRole::Client, PeerRole::Server] {
        let svid = fx.ca.issue(fx.id(role));
        let got = verify_peer(svid.chain(), &fx.ca.bundle(), TD, role, UnixTime::now());
        assert_eq!(got.unwrap(), *fx.id(role), "{role:?}");
    }
}

#[test]
fn accepts_chain_through_intermediate() {
    let fx = Fixture::new();
    let (chain, _) = fx.ca.issue_with(LeafOptions {
        via_intermediate: true,
        ..LeafOptions::new(&fx.client_id)
    });
    assert_eq!(chain.len(), 2);
    let got = verify_peer(
        &chain,
        &fx.ca.bundle(),
        TD,
        PeerRole::Client,
        UnixTime::now(),
    );
    assert_eq!(got.unwrap(), fx.client_id);
}

#[test]
fn accepts_dns_sans_next_to_the_one_uri_san() {
    let fx = Fixture::new();
    let (chain, _) = fx.ca.issue_with(LeafOptions {
        dns_sans: vec!["*.demo.svc".to_owned(), "server.demo.svc".to_owned()],
        ..LeafOptions::new(&fx.server_id)
    });
    let got = verify_peer(
        &chain,
        &fx.ca.bundle(),
        TD,
        PeerRole::Server,
        UnixTime::now(),
    );
    assert_eq!(got.unwrap(), fx.server_id);
}

#[test]
fn accepts_any_root_of_a_rotating_bundle() {
    let fx = Fixture::new();
    let pem = format!("{}{}", fx.other_ca.root_pem(), fx.ca.root_pem());
    let bundle = TrustBundle::from_pem(&pem).unwrap();
    assert_eq!(bundle.len(), 2);
    for ca in [&fx.ca, &fx.other_ca] {
        let svid = ca.issue(&fx.client_id);
        let got = verify_peer(svid.chain(), &bundle, TD, PeerRole::Client, UnixTime::now());
        assert_eq!(got.unwrap(), fx.client_id);
    }
}

#[test]
fn rejects_every_bad_client_leaf() {
    rejects_every_bad_leaf(PeerRole::Client);
}

#[test]
fn rejects_every_bad_server_leaf() {
    rejects_every_bad_leaf(PeerRole::Server);
}

fn rejects_every_bad_leaf(role: PeerRole) {
    let fx = Fixture::new();
    let bundle = fx.ca.bundle();
    for case in fx.rejected(role) {
        match verify_peer(&case.chain, &bundle, TD, role, UnixTime::now()) {
            Ok(id) => panic!("{role:?} {}: accepted as {id}", case.name),
            Err(e) => assert!(
                (case.check)(&e),
                "{role:?} {}: wrong reason: {e}",
                case.name
            ),
        }
    }
}

#[test]
fn rejects_empty_chain() {
    let fx = Fixture::new();
    let got = verify_peer(&[], &fx.ca.bundle(), TD, PeerRole::Client, UnixTime::now());
    assert!(matches!(got, Err(Error::EmptyChain)), "{got:?}");
}

#[test]
fn rejects_garbage_leaf() {
    let fx = Fixture::new();
    let chain = [CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])];
    let got = verify_peer(
        &chain,
        &fx.ca.bundle(),
        TD,
        PeerRole::Client,
        UnixTime::now(),
    );
    assert!(matches!(got, Err(Error::Untrusted(_))), "{got:?}");
}

#[test]
fn rejects_the_root_itself_as_a_leaf() {
    let ca = TestCa::new(TD);
    let chain = [ca.root_der().clone()];
    let got = verify_peer(&chain, &ca.bundle(), TD, PeerRole::Client, UnixTime::now());
    assert!(got.is_err(), "{got:?}");
}

#[test]
fn rejects_valid_id_when_trust_domain_argument_differs() {
    let fx = Fixture::new();
    let svid = fx.ca.issue(&fx.client_id);
    let got = verify_peer(
        svid.chain(),
        &fx.ca.bundle(),
        "example.org",
        PeerRole::Client,
        UnixTime::now(),
    );
    assert!(
        matches!(got, Err(Error::ForeignTrustDomain { .. })),
        "{got:?}"
    );
}

#[test]
fn expiry_is_judged_at_the_given_time() {
    let fx = Fixture::new();
    let svid = fx.ca.issue(&fx.client_id);
    let later = UnixTime::since_unix_epoch(
        svid.not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            + std::time::Duration::from_secs(1),
    );
    let got = verify_peer(svid.chain(), &fx.ca.bundle(), TD, PeerRole::Client, later);
    assert!(
        matches!(
            got,
            Err(Error::Untrusted(webpki::Error::CertExpired { .. }))
        ),
        "{got:?}"
    );
}
