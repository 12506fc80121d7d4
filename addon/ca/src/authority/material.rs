//! What the CA signs with: an issuing certificate and key, the chain up to a root, and the
//! roots themselves. Every source ends here: the local profile's self-signed root, the
//! Istio `cacerts` layout from a mounted Secret or Key Vault secrets, and a Key Vault-signed
//! intermediate all become a [`CaMaterial`], so validation happens once.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use time::OffsetDateTime;
use trellis_identity::SpiffeId;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::root::{CLOCK_SKEW, hex, random_serial};
use super::{Error, Issued};
use crate::CaPems;

/// How many certificates a chain from the issuing CA to a root may hold.
const MAX_CHAIN: usize = 5;

/// Validated CA material: the issuing key and certificate, the intermediates sent with
/// every leaf, and the roots peers verify against.
pub struct CaMaterial {
    issuer: Issuer<'static, KeyPair>,
    issuer_der: Vec<u8>,
    /// The earliest `notAfter` on the path from the issuing CA to its root: no leaf may
    /// outlive any certificate it depends on.
    not_after: OffsetDateTime,
    /// Sent after the leaf: the issuing CA and intermediates, never a root.
    chain_der: Vec<Vec<u8>>,
    roots_der: Vec<Vec<u8>>,
    /// Where the material came from, for logs (`self-signed`, `secret /etc/cacerts`, …).
    label: String,
}

/// One parsed certificate with its DER.
struct Cert {
    der: Vec<u8>,
}

// === impl CaMaterial ===

impl CaMaterial {
    /// Material whose issuing CA is the root itself (the local profile).
    pub(super) fn self_signed(
        issuer: Issuer<'static, KeyPair>,
        der: Vec<u8>,
        not_after: OffsetDateTime,
        label: &str,
    ) -> Self {
        Self {
            issuer,
            issuer_der: der.clone(),
            not_after,
            chain_der: Vec::new(),
            roots_der: vec![der],
            label: label.to_owned(),
        }
    }

    /// Parses and validates the Istio `cacerts` layout.
    ///
    /// `root_cert` holds one or more CA certificates (all become trusted roots);
    /// `ca_cert` is the issuing CA and `ca_key` its PKCS#8 key, which must match;
    /// `cert_chain` (optional) holds intermediates. The issuing CA must be a CA, unexpired,
    /// name `trust_domain` if it carries a `spiffe://` URI SAN, and chain by signature to
    /// one of the roots through at most five certificates. `label` names the source in
    /// errors and logs. Errors never include key material.
    pub fn from_pems(pems: &CaPems, trust_domain: &str, label: &str) -> Result<Self, Error> {
        let invalid = |what: &str, reason: String| Error::InvalidMaterial {
            source_label: label.to_owned(),
            what: what.to_owned(),
            reason,
        };
        let roots = parse_certs(&pems.root_cert).map_err(|e| invalid("root-cert", e))?;
        if roots.is_empty() {
            return Err(invalid("root-cert", "no certificate".to_owned()));
        }
        for (i, root) in roots.iter().enumerate() {
            let x = root.parse().map_err(|e| invalid("root-cert", e))?;
            if !x.is_ca() {
                return Err(invalid(
                    "root-cert",
                    format!("certificate {} is not a CA", i + 1),
                ));
            }
        }
        let mut ca = parse_certs(&pems.ca_cert).map_err(|e| invalid("ca-cert", e))?;
        if ca.len() != 1 {
            return Err(invalid(
                "ca-cert",
                format!("expected exactly one certificate, found {}", ca.len()),
            ));
        }
        let ca = ca.remove(0);
        let chain = parse_certs(&pems.cert_chain).map_err(|e| invalid("cert-chain", e))?;

        let ca_x = ca.parse().map_err(|e| invalid("ca-cert", e))?;
        if !ca_x.is_ca() {
            return Err(invalid("ca-cert", "not a CA certificate".to_owned()));
        }
        if let Some(found) = spiffe_trust_domain(&ca_x)
            && found != trust_domain
        {
            return Err(Error::RootTrustDomain {
                expected: trust_domain.to_owned(),
                found,
            });
        }
        // The rcgen error may describe the key's contents; keep only that it failed.
        let key = KeyPair::from_pem(&pems.ca_key).map_err(|_| {
            invalid(
                "ca-key",
                "not a PKCS#8 private key rcgen can sign with".to_owned(),
            )
        })?;
        if key.subject_public_key_info() != ca_x.public_key().raw {
            return Err(invalid(
                "ca-key",
                "does not belong to the certificate in ca-cert".to_owned(),
            ));
        }

        // Walk from the issuing CA to a root by signature, collecting what peers need.
        let mut not_after = ca_x.validity().not_after.to_datetime();
        let mut chain_der = Vec::new();
        let issuer_der = ca_x.as_raw().to_vec();
        let mut current = Cert {
            der: issuer_der.clone(),
        };
        for _ in 0..MAX_CHAIN {
            if roots.iter().any(|r| r.der == current.der) {
                break;
            }
            let cur_x = current.parse().map_err(|e| invalid("cert-chain", e))?;
            not_after = not_after.min(cur_x.validity().not_after.to_datetime());
            let issuer = roots
                .iter()
                .chain(chain.iter())
                .filter(|c| c.der != current.der)
                .find(|c| {
                    c.parse()
                        .is_ok_and(|p| cur_x.verify_signature(Some(p.public_key())).is_ok())
                });
            chain_der.push(current.der.clone());
            match issuer {
                Some(next) => {
                    current = Cert {
                        der: next.der.clone(),
                    }
                }
                None => {
                    return Err(invalid(
                        "ca-cert",
                        "does not chain to any certificate in root-cert (add the missing \
                         intermediates to cert-chain)"
                            .to_owned(),
                    ));
                }
            }
        }
        if !roots.iter().any(|r| r.der == current.der) {
            return Err(invalid(
                "cert-chain",
                format!("more than {MAX_CHAIN} certificates between ca-cert and the root"),
            ));
        }
        let root_x = current.parse().map_err(|e| invalid("root-cert", e))?;
        not_after = not_after.min(root_x.validity().not_after.to_datetime());
        if not_after <= OffsetDateTime::now_utc() {
            return Err(Error::RootExpired { not_after });
        }
        let issuer = Issuer::from_ca_cert_der(&issuer_der.as_slice().into(), key)
            .map_err(|e| invalid("ca-cert", e.to_string()))?;
        Ok(Self {
            issuer,
            issuer_der,
            not_after,
            chain_der,
            roots_der: roots.into_iter().map(|c| c.der).collect(),
            label: label.to_owned(),
        })
    }

    /// The roots this material trusts, DER.
    pub fn roots_der(&self) -> &[Vec<u8>] {
        &self.roots_der
    }

    /// The issuing CA certificate, DER.
    pub fn issuer_der(&self) -> &[u8] {
        &self.issuer_der
    }

    /// The certificates sent after each leaf (issuing CA and intermediates; empty when
    /// the root signs leaves itself).
    pub fn chain_der(&self) -> &[Vec<u8>] {
        &self.chain_der
    }

    /// No leaf outlives this: the earliest expiry on the path to the root.
    pub fn not_after(&self) -> SystemTime {
        self.not_after.into()
    }

    /// Where this material came from.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// True when both sign with the same issuing certificate and trust the same roots.
    pub fn same_as(&self, other: &CaMaterial) -> bool {
        self.issuer_der == other.issuer_der && self.roots_der == other.roots_der
    }

    /// Signs a leaf for `identity` over `public_key`, valid from one minute ago for
    /// `ttl`, cut at [`CaMaterial::not_after`].
    pub(super) fn sign_leaf(
        &self,
        public_key: &impl PublicKeyData,
        identity: &SpiffeId,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<Issued, Error> {
        let (issued, _) = self.sign(public_key, now, ttl, |params| {
            // Empty subject, identity only in the (then critical) SAN, per X.509-SVID.
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(identity.as_str())?)];
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyAgreement,
            ];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            Ok(())
        })?;
        Ok(issued)
    }

    /// Signs a TLS serving leaf for `dns_names` over `public_key` (the control plane's
    /// own HTTPS listeners; see [`CertificateAuthority::issue_serving`]): the DNS SANs and
    /// no URI SAN, `CA:FALSE`, key usage digitalSignature, EKU serverAuth only, valid from
    /// one minute ago for `ttl`, cut at [`CaMaterial::not_after`]. The names must have
    /// been checked by the caller.
    ///
    /// [`CertificateAuthority::issue_serving`]: super::CertificateAuthority::issue_serving
    pub(super) fn sign_serving(
        &self,
        public_key: &impl PublicKeyData,
        dns_names: &[String],
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<(Issued, SystemTime), Error> {
        self.sign(public_key, now, ttl, |params| {
            let mut dn = DistinguishedName::new();
            // The first name as CN, for people reading the certificate (`openssl x509`);
            // verifiers use only the SANs.
            if let Some(first) = dns_names.first() {
                dn.push(rcgen::DnType::CommonName, first.as_str());
            }
            params.distinguished_name = dn;
            params.subject_alt_names = dns_names
                .iter()
                .map(|n| Ia5String::try_from(n.as_str()).map(SanType::DnsName))
                .collect::<Result<_, _>>()?;
            // ECDHE key exchange: the key only signs the handshake.
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            // serverAuth only: it can never act as a client (a proxy's mTLS peer) either.
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            Ok(())
        })
    }

    /// What every leaf shares: valid from one minute before `now` (whole seconds: the
    /// certificate cannot carry more, and the reported `not_after` must equal the one in
    /// it) for `ttl`, cut at [`CaMaterial::not_after`] (an error once that has passed);
    /// explicit `CA:FALSE` (no reader may guess); a random serial; the authority key id;
    /// signed by the issuing CA, returned with its chain (never the root) and `notBefore`.
    /// `fill` sets the subject, SANs and usages.
    fn sign(
        &self,
        public_key: &impl PublicKeyData,
        now: OffsetDateTime,
        ttl: Duration,
        fill: impl FnOnce(&mut rcgen::CertificateParams) -> Result<(), Error>,
    ) -> Result<(Issued, SystemTime), Error> {
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let not_after = (now + ttl).min(self.not_after);
        if not_after <= now {
            return Err(Error::RootExpired {
                not_after: self.not_after,
            });
        }
        let serial = random_serial();
        let mut params = rcgen::CertificateParams::default();
        fill(&mut params)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.serial_number = Some(serial.clone());
        let not_before = now - CLOCK_SKEW;
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain_der = Vec::with_capacity(1 + self.chain_der.len());
        chain_der.push(cert.der().to_vec());
        chain_der.extend(self.chain_der.iter().cloned());
        let issued = Issued {
            chain_der,
            not_after: not_after.into(),
            serial: hex(serial.as_ref()),
        };
        Ok((issued, not_before.into()))
    }
}

impl fmt::Debug for CaMaterial {
    // Never prints key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial")
            .field("label", &self.label)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain_der.len())
            .field("roots", &self.roots_der.len())
            .finish_non_exhaustive()
    }
}

// === impl Cert ===

impl Cert {
    fn parse(&self) -> Result<X509Certificate<'_>, String> {
        let (rest, x) = X509Certificate::from_der(&self.der).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err("trailing bytes after a certificate".to_owned());
        }
        Ok(x)
    }
}

/// Every `CERTIFICATE` block of `text`; any other block is an error.
fn parse_certs(text: &str) -> Result<Vec<Cert>, String> {
    let blocks = pem::parse_many(text).map_err(|e| e.to_string())?;
    blocks
        .into_iter()
        .map(|b| {
            if b.tag() == "CERTIFICATE" {
                Ok(Cert {
                    der: b.into_contents(),
                })
            } else {
                Err(format!("expected CERTIFICATE blocks, found {}", b.tag()))
            }
        })
        .collect()
}

/// The trust domain of a CA's `spiffe://<td>` URI SAN, if it has one.
pub fn spiffe_trust_domain(x509: &X509Certificate<'_>) -> Option<String> {
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => uri
            .strip_prefix("spiffe://")
            .map(|td| td.trim_end_matches('/').to_owned()),
        _ => None,
    })
}
