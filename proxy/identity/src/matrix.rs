//! The certificate accept/reject matrix shared by the `verify_peer` table tests and the
//! in-memory handshake tests, so both layers are held to the same rows.

use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::test_util::{Eku, LeafOptions, TestCa};
use crate::{Error, PeerRole, SpiffeId};

pub(crate) const TD: &str = "cluster.local";
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Two workloads under one CA, plus an unrelated CA.
pub(crate) struct Fixture {
    pub(crate) ca: TestCa,
    pub(crate) other_ca: TestCa,
    pub(crate) client_id: SpiffeId,
    pub(crate) server_id: SpiffeId,
}

/// A leaf that must be refused, and how.
pub(crate) struct Case {
    pub(crate) name: String,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) check: fn(&Error) -> bool,
}

// === impl Fixture ===

impl Fixture {
    pub(crate) fn new() -> Self {
        Self {
            ca: TestCa::new(TD),
            other_ca: TestCa::new(TD),
            client_id: SpiffeId::new(TD, "demo", "client").unwrap(),
            server_id: SpiffeId::new(TD, "demo", "server").unwrap(),
        }
    }

    pub(crate) fn id(&self, role: PeerRole) -> &SpiffeId {
        match role {
            PeerRole::Client => &self.client_id,
            PeerRole::Server => &self.server_id,
        }
    }

    /// Every way a leaf presented in `role` must be refused.
    pub(crate) fn rejected(&self, role: PeerRole) -> Vec<Case> {
        use webpki::Error as W;
        let id = self.id(role);
        let base = || LeafOptions::new(id);
        let now = SystemTime::now();
        let wrong_eku = match role {
            PeerRole::Client => Eku::ServerAuth,
            PeerRole::Server => Eku::ClientAuth,
        };
        let mut cases = Vec::new();
        let mut add = |name: &str, (chain, key), check: fn(&Error) -> bool| {
            cases.push(Case {
                name: name.to_owned(),
                chain,
                key,
                check,
            });
        };

        // The other CA has the same subject name as ours, as an impostor would, so webpki
        // finds the issuer by name and fails on the signature.
        add("wrong trust root", self.other_ca.issue_with(base()), |e| {
            matches!(
                e,
                Error::Untrusted(W::UnknownIssuer | W::InvalidSignatureForPublicKey)
            )
        });
        add(
            "expired",
            self.ca.issue_with(LeafOptions {
                not_before: now - 2 * HOUR,
                not_after: now - HOUR,
                ..base()
            }),
            |e| matches!(e, Error::Untrusted(W::CertExpired { .. })),
        );
        add(
            "not yet valid",
            self.ca.issue_with(LeafOptions {
                not_before: now + HOUR,
                not_after: now + 2 * HOUR,
                ..base()
            }),
            |e| matches!(e, Error::Untrusted(W::CertNotValidYet { .. })),
        );
        add(
            "ca:true leaf",
            self.ca.issue_with(LeafOptions {
                is_ca: true,
                ..base()
            }),
            |e| matches!(e, Error::Untrusted(W::CaUsedAsEndEntity)),
        );
        let eku = |e: &Error| matches!(e, Error::Untrusted(W::RequiredEkuNotFoundContext(_)));
        add(
            "wrong eku only",
            self.ca.issue_with(LeafOptions {
                ekus: vec![wrong_eku],
                ..base()
            }),
            eku,
        );
        add(
            "no eku extension",
            self.ca.issue_with(LeafOptions {
                ekus: vec![],
                ..base()
            }),
            |e| matches!(e, Error::MissingEku(_)),
        );
        add(
            "leaf with keyCertSign",
            self.ca.issue_with(LeafOptions {
                key_cert_sign: true,
                ..base()
            }),
            |e| matches!(e, Error::LeafCanSign),
        );
        add(
            "leaf outliving root",
            self.ca.issue_with(LeafOptions {
                not_after: now + 400 * DAY,
                ..base()
            }),
            |e| matches!(e, Error::OutlivesIssuer),
        );
        add(
            "leaf outliving intermediate",
            self.ca.issue_with(LeafOptions {
                not_after: now + 60 * DAY,
                via_intermediate: true,
                ..base()
            }),
            |e| matches!(e, Error::OutlivesIssuer),
        );
        let (mut chain, key) = self.ca.issue_with(LeafOptions {
            via_intermediate: true,
            ..base()
        });
        chain.truncate(1);
        add("intermediate not sent", (chain, key), |e| {
            matches!(e, Error::Untrusted(W::UnknownIssuer))
        });

        let sans = |uris: &[&str], dns: &[&str]| LeafOptions {
            uri_sans: uris.iter().map(|s| (*s).to_owned()).collect(),
            dns_sans: dns.iter().map(|s| (*s).to_owned()).collect(),
            ..base()
        };
        add("no sans", self.ca.issue_with(sans(&[], &[])), |e| {
            matches!(e, Error::NoUriSan)
        });
        add(
            "dns san only",
            self.ca.issue_with(sans(&[], &["server.demo.svc"])),
            |e| matches!(e, Error::NoUriSan),
        );
        let other = format!("spiffe://{TD}/ns/demo/sa/other");
        add(
            "two uri sans",
            self.ca.issue_with(sans(&[id.as_str(), &other], &[])),
            |e| matches!(e, Error::MultipleUriSans(2)),
        );
        add(
            "same uri san twice",
            self.ca.issue_with(sans(&[id.as_str(), id.as_str()], &[])),
            |e| matches!(e, Error::MultipleUriSans(2)),
        );
        let (ns, sa) = (id.namespace(), id.service_account());
        for uri in [
            format!("SPIFFE://{TD}/ns/{ns}/sa/{sa}"),
            format!("spiffe://CLUSTER.LOCAL/ns/{ns}/sa/{sa}"),
            format!("spiffe://{TD}/ns/{ns}/../{ns}/sa/{sa}"),
            format!("spiffe://{TD}/ns/{ns}/sa/x/../{sa}"),
            format!("spiffe://{TD}/ns/{ns}/sa/{sa}%2Fx"),
            format!("spiffe://{TD}/ns/{ns}%2Fsa/{sa}"),
            format!("spiffe://{TD}/ns/{ns}/sa/{sa}/"),
            format!("spiffe://{TD}/ns/{ns}/sa/{sa}?q"),
            format!("spiffe://{TD}/ns/{ns}/sa/{sa}#f"),
            format!("spiffe://{TD}:8443/ns/{ns}/sa/{sa}"),
            format!("spiffe://user@{TD}/ns/{ns}/sa/{sa}"),
            format!("spiffe://{TD}/ns/*/sa/{sa}"),
            format!("spiffe://*.{TD}/ns/{ns}/sa/{sa}"),
            format!("https://{TD}/ns/{ns}/sa/{sa}"),
            String::new(),
        ] {
            add(
                &format!("uri san {uri:?}"),
                self.ca.issue_with(sans(&[&uri], &[])),
                |e| matches!(e, Error::InvalidSpiffeId { .. }),
            );
        }
        let foreign = format!("spiffe://other.domain/ns/{ns}/sa/{sa}");
        add(
            "id in another trust domain",
            self.ca.issue_with(sans(&[&foreign], &[])),
            |e| matches!(e, Error::ForeignTrustDomain { .. }),
        );
        cases
    }
}
