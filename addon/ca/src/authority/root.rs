//! The local profile's self-signed root: generated, or loaded from the state directory.
//! It becomes a [`CaMaterial`] whose issuing CA is the root itself.

use std::path::Path;
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use time::OffsetDateTime;
use tracing::warn;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::material::{CaMaterial, spiffe_trust_domain};
use super::{Error, io_err, now};
use crate::CaPems;
use crate::fs::is_too_open;

/// `not_before` is back-dated by this much so a peer whose clock lags slightly still
/// accepts a freshly issued certificate.
pub(super) const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Random serial length: 16 bytes (128 bits) is well above CA/B's 64-bit minimum and
/// below RFC 5280's 20-octet cap even with a sign byte.
const SERIAL_LEN: usize = 16;

/// The root certificate and its signing key.
pub(super) struct Root {
    pub(super) der: Vec<u8>,
    pub(super) pem: String,
    pub(super) not_after: OffsetDateTime,
    pub(super) issuer: Issuer<'static, KeyPair>,
}

// === impl Root ===

impl Root {
    pub(super) fn generate(
        trust_domain: &str,
        now: OffsetDateTime,
        lifetime: Duration,
    ) -> Result<Self, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(
            DnType::CommonName,
            format!("Trellis local root {trust_domain}"),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(format!(
            "spiffe://{trust_domain}"
        ))?)];
        // pathlen 0: the local root signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + lifetime;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// The Istio `cacerts` layout made here: a root (pathlen 1) named `name` and an
    /// intermediate (pathlen 0) it signed, both P-256 with the trust domain's URI SAN.
    pub(super) fn generate_pems(
        trust_domain: &str,
        name: &str,
        now: OffsetDateTime,
        root_lifetime: Duration,
        ca_lifetime: Duration,
    ) -> Result<CaPems, Error> {
        let san = || -> Result<Vec<SanType>, Error> {
            Ok(vec![SanType::URI(Ia5String::try_from(format!(
                "spiffe://{trust_domain}"
            ))?)])
        };
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut root = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(DnType::CommonName, format!("{name} root {trust_domain}"));
        root.distinguished_name = dn;
        root.subject_alt_names = san()?;
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        root.serial_number = Some(random_serial());
        root.not_before = now - CLOCK_SKEW;
        root.not_after = now + root_lifetime;
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root.clone(), root_key);

        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(
            DnType::CommonName,
            format!("{name} intermediate {trust_domain}"),
        );
        ca.distinguished_name = dn;
        ca.subject_alt_names = san()?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.serial_number = Some(random_serial());
        ca.not_before = now - CLOCK_SKEW;
        ca.not_after = (now + ca_lifetime).min(root.not_after);
        ca.use_authority_key_identifier_extension = true;
        let ca_cert = ca.signed_by(&ca_key, &root_issuer)?;
        Ok(CaPems {
            root_cert: root_cert.pem(),
            ca_cert: ca_cert.pem(),
            ca_key: ca_key.serialize_pem(),
            cert_chain: ca_cert.pem(),
        })
    }

    pub(super) fn load(
        cert_path: &Path,
        key_path: &Path,
        trust_domain: &str,
    ) -> Result<Self, Error> {
        let invalid = |path: &Path, reason: String| Error::InvalidRoot {
            path: path.to_owned(),
            reason,
        };
        let cert_pem = std::fs::read_to_string(cert_path).map_err(io_err("reading", cert_path))?;
        let parsed = pem::parse(&cert_pem).map_err(|e| invalid(cert_path, e.to_string()))?;
        if parsed.tag() != "CERTIFICATE" {
            return Err(invalid(
                cert_path,
                format!("expected a CERTIFICATE block, found {}", parsed.tag()),
            ));
        }
        let der = parsed.into_contents();
        let (rest, x509) =
            X509Certificate::from_der(&der).map_err(|e| invalid(cert_path, e.to_string()))?;
        if !rest.is_empty() {
            return Err(invalid(
                cert_path,
                "trailing bytes after the certificate".to_owned(),
            ));
        }
        if !x509.is_ca() {
            return Err(invalid(cert_path, "not a CA certificate".to_owned()));
        }
        if let Some(found) = spiffe_trust_domain(&x509)
            && found != trust_domain
        {
            return Err(Error::RootTrustDomain {
                expected: trust_domain.to_owned(),
                found,
            });
        }
        let not_after = x509.validity().not_after.to_datetime();
        if not_after <= now() {
            return Err(Error::RootExpired { not_after });
        }

        if is_too_open(key_path).map_err(io_err("reading", key_path))? {
            warn!(path = %key_path.display(), "root key file is readable by group or others; chmod 600 it");
        }
        let key_pem = std::fs::read_to_string(key_path).map_err(io_err("reading", key_path))?;
        // The rcgen error may describe the key's contents; keep only that it failed.
        let key = KeyPair::from_pem(&key_pem).map_err(|_| {
            invalid(
                key_path,
                "not a PKCS#8 private key rcgen can sign with".to_owned(),
            )
        })?;
        if key.subject_public_key_info() != x509.public_key().raw {
            return Err(Error::RootKeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&der.as_slice().into(), key)
            .map_err(|e| invalid(cert_path, e.to_string()))?;
        Ok(Self {
            pem: cert_pem,
            der,
            not_after,
            issuer,
        })
    }

    /// The root as material that signs leaves itself.
    pub(super) fn into_material(self, label: &str) -> CaMaterial {
        CaMaterial::self_signed(self.issuer, self.der, self.not_after, label)
    }
}

pub(super) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; SERIAL_LEN] = rand::random();
    // Positive and without a leading zero octet, so the DER length is stable.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_random_positive_and_fixed_length() {
        let a = random_serial();
        let b = random_serial();
        assert_ne!(a, b);
        assert_eq!(a.len(), SERIAL_LEN);
        assert_eq!(a.as_ref()[0] & 0xc0, 0x40);
    }
}
