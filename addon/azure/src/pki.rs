//! Certificate profiles and parsing shared by the Key Vault source and the admin functions.
//!
//! Trellis CA certificates: O=Trellis, CN names the role and trust domain, one URI SAN
//! `spiffe://<td>`, CA:TRUE with a path length (root 1: it signs one intermediate; the
//! intermediate 0: it signs leaves only), keyCertSign + cRLSign, a random 128-bit serial,
//! `not_before` back-dated a minute for clock skew.

use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyUsagePurpose, SanType,
    SerialNumber,
};
use time::OffsetDateTime;
use trellis_identity::SpiffeId;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::Error;

/// `not_before` is back-dated by this much so a peer whose clock lags still accepts it.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// 16 random bytes: above CA/B's 64-bit minimum, below RFC 5280's 20 octets with a sign byte.
const SERIAL_LEN: usize = 16;

/// Which CA certificate to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CaRole {
    /// The self-signed root: path length 1, so it can sign one intermediate.
    Root,
    /// The issuing intermediate: path length 0, it signs leaves only.
    Intermediate,
}

/// Validates a trust domain with the rules SPIFFE IDs use (trellis-identity exposes them
/// only through `SpiffeId`; any valid namespace and service account do).
pub(crate) fn check_trust_domain(trust_domain: &str) -> Result<(), Error> {
    SpiffeId::new(trust_domain, "ns", "sa").map_err(|source| Error::TrustDomain {
        trust_domain: trust_domain.to_owned(),
        source,
    })?;
    Ok(())
}

/// Now, in whole seconds: a certificate cannot carry more, and the `not_after` we report
/// must equal the one in the certificate.
pub(crate) fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// `from + lifetime`, refusing a zero lifetime and one that overflows the calendar.
pub(crate) fn expiry(from: OffsetDateTime, lifetime: Duration) -> Result<OffsetDateTime, Error> {
    if lifetime < Duration::from_secs(1) {
        return Err(Error::Config(
            "a certificate lifetime must be at least 1s".to_owned(),
        ));
    }
    time::Duration::try_from(lifetime)
        .ok()
        .and_then(|d| from.checked_add(d))
        .ok_or_else(|| Error::Config(format!("certificate lifetime {lifetime:?} is too long")))
}

/// The parameters of a Trellis CA certificate valid from `now - CLOCK_SKEW` to `not_after`.
pub(crate) fn ca_params(
    role: CaRole,
    trust_domain: &str,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, Error> {
    let (label, path_len) = match role {
        CaRole::Root => ("root", 1),
        CaRole::Intermediate => ("intermediate", 0),
    };
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Trellis");
    dn.push(
        DnType::CommonName,
        format!("Trellis {label} {trust_domain}"),
    );
    params.distinguished_name = dn;
    let uri = Ia5String::try_from(format!("spiffe://{trust_domain}"))
        .map_err(|e| Error::Certificate(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    params.not_before = now - CLOCK_SKEW;
    params.not_after = not_after;
    // A root has no issuer key to point at; an intermediate names its root's key.
    params.use_authority_key_identifier_extension = role == CaRole::Intermediate;
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; SERIAL_LEN] = rand::random();
    // Positive and without a leading zero octet, so the DER length is stable.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// What we check and report about one certificate.
#[derive(Debug, Clone)]
pub(crate) struct ParsedCert {
    pub(crate) der: Vec<u8>,
    /// The whole SubjectPublicKeyInfo, DER.
    pub(crate) spki: Vec<u8>,
    pub(crate) subject: String,
    pub(crate) issuer: String,
    pub(crate) serial: String,
    pub(crate) is_ca: bool,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: OffsetDateTime,
    /// The trust domain of a `spiffe://<td>` URI SAN, if any.
    pub(crate) trust_domain: Option<String>,
}

/// Parses every CERTIFICATE block of `pem_text`; other blocks are an error (a key pasted
/// into a certificate secret must not be passed along). The reason never quotes content.
pub(crate) fn parse_pem_certs(pem_text: &str) -> Result<Vec<ParsedCert>, String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| format!("not PEM: {e}"))?;
    if blocks.is_empty() {
        return Err("no PEM CERTIFICATE block".to_owned());
    }
    blocks
        .into_iter()
        .map(|block| {
            if block.tag() != "CERTIFICATE" {
                return Err(format!(
                    "expected CERTIFICATE blocks, found {}",
                    block.tag()
                ));
            }
            parse_der_cert(block.into_contents())
        })
        .collect()
}

fn parse_der_cert(der: Vec<u8>) -> Result<ParsedCert, String> {
    let (rest, x509) =
        X509Certificate::from_der(&der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the certificate".to_owned());
    }
    Ok(ParsedCert {
        der: der.clone(),
        spki: x509.public_key().raw.to_vec(),
        subject: x509.subject().to_string(),
        issuer: x509.issuer().to_string(),
        serial: x509.raw_serial_as_string(),
        is_ca: x509.is_ca(),
        not_before: x509.validity().not_before.to_datetime().into(),
        not_after: x509.validity().not_after.to_datetime(),
        trust_domain: trellis_ca::spiffe_trust_domain(&x509),
    })
}

/// Checks `cert_der`'s signature with the public key of `issuer_der` (its own when `None`).
pub(crate) fn verify_signed_by(cert_der: &[u8], issuer_der: Option<&[u8]>) -> Result<(), String> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| e.to_string())?;
    let result = match issuer_der {
        None => cert.verify_signature(None),
        Some(der) => {
            let (_, issuer) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
            cert.verify_signature(Some(issuer.public_key()))
        }
    };
    result.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use rcgen::KeyPair;

    use super::*;

    #[test]
    fn ca_profiles_have_the_right_constraints_and_names() {
        let now = now();
        let not_after = expiry(now, Duration::from_secs(3600)).unwrap();
        for (role, path_len, cn) in [
            (CaRole::Root, 1, "Trellis root td.example"),
            (CaRole::Intermediate, 0, "Trellis intermediate td.example"),
        ] {
            let params = ca_params(role, "td.example", now, not_after).unwrap();
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let pem = params.self_signed(&key).unwrap().pem();
            let certs = parse_pem_certs(&pem).unwrap();
            assert_eq!(certs.len(), 1);
            let cert = &certs[0];
            assert!(cert.is_ca);
            assert_eq!(cert.subject, format!("O=Trellis, CN={cn}"));
            assert_eq!(cert.trust_domain.as_deref(), Some("td.example"));
            assert_eq!(cert.not_after, not_after);
            assert_eq!(
                SystemTime::from(now - CLOCK_SKEW),
                cert.not_before,
                "back-dated by the clock skew"
            );
            let (_, x509) = X509Certificate::from_der(&cert.der).unwrap();
            let bc = x509.basic_constraints().unwrap().unwrap().value;
            assert_eq!(bc.path_len_constraint, Some(path_len));
            let ku = x509.key_usage().unwrap().unwrap().value;
            assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
            assert_eq!(x509.raw_serial().len(), SERIAL_LEN);
        }
    }

    #[test]
    fn lifetimes_must_be_positive_and_representable() {
        let now = now();
        assert!(expiry(now, Duration::ZERO).is_err());
        assert!(expiry(now, Duration::MAX).is_err());
        assert_eq!(
            expiry(now, Duration::from_secs(60)).unwrap(),
            now + Duration::from_secs(60)
        );
    }

    #[test]
    fn parsing_refuses_non_certificates_without_quoting_them() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let err = parse_pem_certs(&key.serialize_pem()).unwrap_err();
        assert_eq!(err, "expected CERTIFICATE blocks, found PRIVATE KEY");
        assert_eq!(
            parse_pem_certs("hello").unwrap_err(),
            "no PEM CERTIFICATE block"
        );
        let garbage = pem::encode(&pem::Pem::new("CERTIFICATE", b"secret-ish".to_vec()));
        let err = parse_pem_certs(&garbage).unwrap_err();
        assert!(!err.contains("secret-ish"), "{err}");
    }

    #[test]
    fn trust_domain_is_validated() {
        check_trust_domain("cluster.local").unwrap();
        let err = check_trust_domain("Bad Domain").unwrap_err().to_string();
        assert!(
            err.starts_with("invalid trust domain \"Bad Domain\""),
            "{err}"
        );
    }
}
