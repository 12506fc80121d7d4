//! Key pair and certificate signing request generation for this workload.
//!
//! The key never leaves the process: it is generated here, kept in memory, and only the
//! CSR (public key plus requested SPIFFE ID) is sent to the CA.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{Error, SpiffeId};

/// A freshly generated private key and the CSR to send to the CA for it.
pub struct CsrKey {
    /// The DER-encoded PKCS#10 request, self-signed with `key`.
    pub csr_der: Vec<u8>,
    /// The ECDSA P-256 private key (PKCS#8), to pair with the certificate the CA returns.
    pub key: PrivateKeyDer<'static>,
}

// === impl CsrKey ===

impl fmt::Debug for CsrKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately absent.
        f.debug_struct("CsrKey")
            .field("csr_len", &self.csr_der.len())
            .finish_non_exhaustive()
    }
}

/// Generates an ECDSA P-256 key and a CSR whose only SAN is `id` as a URI.
///
/// The subject is empty: SPIFFE identifies the workload by the URI SAN alone, and the CA
/// builds the certificate's names itself anyway.
pub fn generate_csr(id: &SpiffeId) -> Result<CsrKey, Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(Error::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id.as_str().try_into().map_err(Error::Generate)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(Error::Generate)?;
    Ok(CsrKey {
        csr_der: csr.der().to_vec(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

#[cfg(test)]
mod tests {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    use x509_parser::prelude::FromDer;

    use super::*;

    fn id() -> SpiffeId {
        SpiffeId::new("cluster.local", "demo", "web").unwrap()
    }

    #[test]
    fn csr_round_trips_through_x509_parser() {
        let out = generate_csr(&id()).unwrap();
        let (rest, csr) = X509CertificationRequest::from_der(&out.csr_der).unwrap();
        assert!(rest.is_empty());
        csr.verify_signature().unwrap();

        let spki = &csr.certification_request_info.subject_pki;
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .as_oid()
            .unwrap();
        assert_eq!(curve, OID_EC_P256);

        let sans: Vec<_> = csr
            .requested_extensions()
            .unwrap()
            .filter_map(|e| match e {
                ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(
            sans,
            vec![GeneralName::URI("spiffe://cluster.local/ns/demo/sa/web")]
        );
    }

    #[test]
    fn csr_key_is_the_csr_public_key() {
        let out = generate_csr(&id()).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(&out.csr_der).unwrap();
        let PrivateKeyDer::Pkcs8(pkcs8) = &out.key else {
            panic!("not pkcs8")
        };
        let key = KeyPair::try_from(pkcs8).unwrap();
        assert_eq!(
            key.public_key_raw(),
            csr.certification_request_info
                .subject_pki
                .subject_public_key
                .data
                .as_ref()
        );
    }

    #[test]
    fn each_csr_has_a_fresh_key() {
        let a = generate_csr(&id()).unwrap();
        let b = generate_csr(&id()).unwrap();
        assert_ne!(a.key.secret_der(), b.key.secret_der());
    }

    #[test]
    fn csr_key_debug_hides_the_key() {
        let out = generate_csr(&id()).unwrap();
        let dbg = format!("{out:?}");
        assert!(dbg.starts_with("CsrKey"), "{dbg}");
        assert!(!dbg.contains("key"), "{dbg}");
    }
}
