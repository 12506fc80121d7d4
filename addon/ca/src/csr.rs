//! Checks on an incoming PKCS#10 CSR.
//!
//! The CSR is only a carrier for the caller's public key and its proof of possession (the
//! self-signature). Subject, SANs, requested extensions and CA requests are never read:
//! the authority derives every field of the leaf itself (see `reliability.md` §3 row 12,
//! and Istio CVE-2022-39388 for what trusting the request leads to).

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::authority::Error;

/// The largest CSR accepted, in bytes. A P-384 CSR is well under 1 KiB; the cap bounds
/// parsing work for hostile input long before the gRPC message limit does.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Parses `der` as a CSR, checks its key type and self-signature, and returns its public
/// key in the form rcgen signs over.
pub(crate) fn public_key(der: &[u8]) -> Result<rcgen::SubjectPublicKeyInfo, Error> {
    if der.len() > MAX_CSR_LEN {
        return Err(Error::CsrTooLarge {
            len: der.len(),
            max: MAX_CSR_LEN,
        });
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| Error::CsrMalformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::CsrMalformed(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    // Key type before signature: an RSA request should hear "RSA is refused", not a
    // signature error it cannot act on.
    check_key_type(spki)?;
    csr.verify_signature().map_err(|_| Error::CsrSignature)?;
    rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| Error::CsrMalformed(e.to_string()))
}

/// Only EC P-256 and P-384: what rustls and the proxy use, and nothing with a size knob
/// (RSA-1024) that a caller could turn down.
fn check_key_type(spki: &SubjectPublicKeyInfo<'_>) -> Result<(), Error> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => Ok(()),
            Some(c) => Err(Error::CsrKeyType(format!("EC curve {c}"))),
            None => Err(Error::CsrKeyType("EC key without a named curve".to_owned())),
        };
    }
    let name = if *alg == OID_PKCS1_RSAENCRYPTION {
        "RSA".to_owned()
    } else if *alg == OID_SIG_ED25519 {
        "Ed25519".to_owned()
    } else {
        format!("key algorithm {alg}")
    };
    Err(Error::CsrKeyType(name))
}
