//! An in-memory certificate authority for tests, here and in other crates (feature
//! `test-util`).
//!
//! It signs whatever it is asked to, including certificates no real CA should issue, so
//! that tests can build every row of the accept/reject matrix.

// Test helpers fail loudly: a broken fixture is a bug in the test, not an error to handle.
#![allow(clippy::expect_used)]

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{SpiffeId, Svid, TrustBundle};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// An extended key usage to put in a test leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Eku {
    /// id-kp-clientAuth.
    ClientAuth,
    /// id-kp-serverAuth.
    ServerAuth,
}

/// What to put in a leaf issued by [`TestCa::issue_with`].
///
/// Start from [`LeafOptions::new`] (a well-formed SVID) and override fields with struct
/// update syntax: `LeafOptions { is_ca: true, ..LeafOptions::new(&id) }`.
#[derive(Debug, Clone)]
pub struct LeafOptions {
    /// URI SANs, verbatim and in order (any count, need not be SPIFFE IDs; ASCII only).
    pub uri_sans: Vec<String>,
    /// DNS SANs, verbatim.
    pub dns_sans: Vec<String>,
    /// `NotBefore`.
    pub not_before: SystemTime,
    /// `NotAfter`.
    pub not_after: SystemTime,
    /// Whether to mark the leaf CA:TRUE in basic constraints.
    pub is_ca: bool,
    /// Extended key usages; empty omits the extension.
    pub ekus: Vec<Eku>,
    /// Whether the key usage also allows keyCertSign (besides digitalSignature).
    pub key_cert_sign: bool,
    /// Sign with the CA's intermediate instead of the root; the chain then holds both.
    pub via_intermediate: bool,
}

/// An in-memory root CA, with one intermediate below it, both valid from a day ago.
///
/// The root is valid for 365 days and the intermediate for 30, so tests can issue leaves
/// that outlive either.
pub struct TestCa {
    root_key: KeyPair,
    root_params: CertificateParams,
    root_der: CertificateDer<'static>,
    inter_key: KeyPair,
    inter_params: CertificateParams,
    inter_der: CertificateDer<'static>,
}

// === impl LeafOptions ===

impl LeafOptions {
    /// A well-formed SVID for `id`: one URI SAN, valid from a minute ago for an hour,
    /// both EKUs, not a CA, signed by the root.
    pub fn new(id: &SpiffeId) -> Self {
        let now = SystemTime::now();
        Self {
            uri_sans: vec![id.to_string()],
            dns_sans: Vec::new(),
            not_before: now - Duration::from_secs(60),
            not_after: now + HOUR,
            is_ca: false,
            ekus: vec![Eku::ClientAuth, Eku::ServerAuth],
            key_cert_sign: false,
            via_intermediate: false,
        }
    }
}

// === impl TestCa ===

impl TestCa {
    /// Creates a fresh root and intermediate; `trust_domain` only names them.
    pub fn new(trust_domain: &str) -> Self {
        let now = SystemTime::now();
        let root_key = KeyPair::generate().expect("root key");
        let root_params = ca_params(&format!("{trust_domain} test root"), now, 365 * DAY);
        let root_der = root_params
            .self_signed(&root_key)
            .expect("root cert")
            .der()
            .clone();

        let inter_key = KeyPair::generate().expect("intermediate key");
        let inter_params = ca_params(&format!("{trust_domain} test intermediate"), now, 30 * DAY);
        let inter_der = inter_params
            .signed_by(&inter_key, &Issuer::from_params(&root_params, &root_key))
            .expect("intermediate cert")
            .der()
            .clone();
        Self {
            root_key,
            root_params,
            root_der,
            inter_key,
            inter_params,
            inter_der,
        }
    }

    /// The root certificate as PEM.
    pub fn root_pem(&self) -> String {
        self.bundle().to_pem()
    }

    /// The root certificate as DER.
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// A trust bundle holding just this CA's root.
    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::from_der(vec![self.root_der.to_vec()]).expect("test root is a trust anchor")
    }

    /// A well-formed SVID for `id` (which may be in any trust domain), valid for an hour.
    pub fn issue(&self, id: &SpiffeId) -> Svid {
        let (chain, key) = self.issue_with(LeafOptions::new(id));
        Svid::new(chain, key).expect("well-formed svid")
    }

    /// Issues a leaf exactly as described, however malformed, and returns its chain (leaf
    /// first, then the intermediate if one signed it; never the root) and private key.
    pub fn issue_with(
        &self,
        opts: LeafOptions,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.not_before = opts.not_before.into();
        params.not_after = opts.not_after.into();
        params.subject_alt_names = opts
            .uri_sans
            .iter()
            .map(|u| SanType::URI(u.as_str().try_into().expect("uri san is ascii")))
            .chain(
                opts.dns_sans
                    .iter()
                    .map(|d| SanType::DnsName(d.as_str().try_into().expect("dns san is ascii"))),
            )
            .collect();
        // Explicit CA:FALSE, as the real CA issues.
        params.is_ca = if opts.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if opts.key_cert_sign {
            params.key_usages.push(KeyUsagePurpose::KeyCertSign);
        }
        params.extended_key_usages = opts
            .ekus
            .iter()
            .map(|e| match e {
                Eku::ClientAuth => ExtendedKeyUsagePurpose::ClientAuth,
                Eku::ServerAuth => ExtendedKeyUsagePurpose::ServerAuth,
            })
            .collect();

        let (issuer, mut chain) = if opts.via_intermediate {
            let issuer = Issuer::from_params(&self.inter_params, &self.inter_key);
            (issuer, vec![self.inter_der.clone()])
        } else {
            (
                Issuer::from_params(&self.root_params, &self.root_key),
                Vec::new(),
            )
        };
        let leaf = params
            .signed_by(&key, &issuer)
            .expect("leaf cert")
            .der()
            .clone();
        chain.insert(0, leaf);
        (
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// Parameters for a CA certificate named `cn`, valid from a day before `now` for `ttl`.
fn ca_params(cn: &str, now: SystemTime, ttl: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = (now - DAY).into();
    params.not_after = (now + ttl).into();
    params
}
