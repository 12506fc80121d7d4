//! The set of root certificates a workload trusts.
//!
//! Several roots at once are the normal state during CA rotation: the old root stays in
//! the bundle until every leaf it issued has expired.

use std::fmt;

use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::{Error, x509};

const PEM_TAG: &str = "CERTIFICATE";

/// Root certificates that a peer's chain must lead to.
///
/// Built once from PEM or DER; each root is checked to be a usable trust anchor up front so
/// that a bad bundle fails at configuration time rather than on every handshake.
#[derive(Clone)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
    /// webpki's view of `certs`, same order.
    anchors: Vec<TrustAnchor<'static>>,
    /// Each root's `NotAfter` in Unix seconds, same order.
    not_after: Vec<i64>,
}

// === impl TrustBundle ===

impl TrustBundle {
    /// Parses one or more PEM `CERTIFICATE` blocks.
    ///
    /// Fails on input without any block and on blocks of any other type (a private key
    /// pasted into a bundle is a configuration mistake worth stopping for).
    pub fn from_pem(pem: &str) -> Result<Self, Error> {
        let blocks = pem::parse_many(pem).map_err(|e| Error::Pem(e.to_string()))?;
        let ders = blocks
            .into_iter()
            .map(|b| {
                if b.tag() == PEM_TAG {
                    Ok(b.into_contents())
                } else {
                    Err(Error::NotACertificate(b.tag().to_owned()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_der(ders)
    }

    /// Builds a bundle from DER certificates.
    pub fn from_der(ders: Vec<Vec<u8>>) -> Result<Self, Error> {
        if ders.is_empty() {
            return Err(Error::EmptyBundle);
        }
        let mut certs = Vec::with_capacity(ders.len());
        let mut anchors = Vec::with_capacity(ders.len());
        let mut not_after = Vec::with_capacity(ders.len());
        for (index, der) in ders.into_iter().enumerate() {
            let cert = CertificateDer::from(der);
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|source| Error::BadRoot { index, source })?
                .to_owned();
            not_after.push(x509::validity_secs(&x509::parse_cert(&cert)?).1);
            anchors.push(anchor);
            certs.push(cert);
        }
        Ok(Self {
            certs,
            anchors,
            not_after,
        })
    }

    /// The bundle as concatenated PEM `CERTIFICATE` blocks with `\n` line endings.
    pub fn to_pem(&self) -> String {
        let blocks: Vec<pem::Pem> = self
            .certs
            .iter()
            .map(|c| pem::Pem::new(PEM_TAG, c.to_vec()))
            .collect();
        pem::encode_many_config(
            &blocks,
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        )
    }

    /// The root certificates, in the order given.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The number of roots.
    pub fn len(&self) -> usize {
        self.certs.len()
    }

    /// Whether the bundle has no roots (never true for a bundle built by this crate).
    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The `NotAfter` of the root behind `anchor`, which must be one of [`Self::anchors`].
    pub(crate) fn anchor_not_after(&self, anchor: &TrustAnchor<'_>) -> Option<i64> {
        let i = self.anchors.iter().position(|a| a == anchor)?;
        self.not_after.get(i).copied()
    }
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.certs == other.certs
    }
}

impl Eq for TrustBundle {}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.certs.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::TestCa;

    #[test]
    fn pem_round_trips_with_several_roots() {
        let (a, b) = (TestCa::new("a.test"), TestCa::new("b.test"));
        let pem = format!("{}\n{}", a.root_pem(), b.root_pem());
        let bundle = TrustBundle::from_pem(&pem).unwrap();
        assert_eq!(bundle.len(), 2);
        assert!(!bundle.is_empty());
        assert_eq!(
            bundle.certs(),
            &[a.root_der().clone(), b.root_der().clone()]
        );
        assert_eq!(TrustBundle::from_pem(&bundle.to_pem()).unwrap(), bundle);
        assert!(!bundle.to_pem().contains('\r'));
    }

    #[test]
    fn der_and_pem_agree() {
        let ca = TestCa::new("a.test");
        let from_der = TrustBundle::from_der(vec![ca.root_der().to_vec()]).unwrap();
        assert_eq!(from_der, TrustBundle::from_pem(&ca.root_pem()).unwrap());
    }

    #[test]
    fn rejects_empty_input() {
        for pem in ["", "\n", "not pem at all"] {
            let got = TrustBundle::from_pem(pem);
            assert!(matches!(got, Err(Error::EmptyBundle)), "{pem:?}: {got:?}");
        }
        assert!(matches!(
            TrustBundle::from_der(vec![]),
            Err(Error::EmptyBundle)
        ));
    }

    #[test]
    fn rejects_non_certificate_blocks() {
        let ca = TestCa::new("a.test");
        let key = pem::encode(&pem::Pem::new("PRIVATE KEY", vec![1, 2, 3]));
        let got = TrustBundle::from_pem(&format!("{}{key}", ca.root_pem()));
        assert!(
            matches!(&got, Err(Error::NotACertificate(tag)) if tag == "PRIVATE KEY"),
            "{got:?}"
        );
    }

    #[test]
    fn rejects_malformed_pem_and_der() {
        let got =
            TrustBundle::from_pem("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n");
        assert!(matches!(got, Err(Error::Pem(_))), "{got:?}");
        let got =
            TrustBundle::from_pem("-----BEGIN CERTIFICATE-----\nAAEC\n-----END CERTIFICATE-----\n");
        assert!(
            matches!(got, Err(Error::BadRoot { index: 0, .. })),
            "{got:?}"
        );
        let ca = TestCa::new("a.test");
        let got = TrustBundle::from_der(vec![ca.root_der().to_vec(), vec![0x30, 0x00]]);
        assert!(
            matches!(got, Err(Error::BadRoot { index: 1, .. })),
            "{got:?}"
        );
    }

    #[test]
    fn debug_is_short() {
        let bundle = TestCa::new("a.test").bundle();
        assert_eq!(format!("{bundle:?}"), "TrustBundle { roots: 1 }");
    }
}
