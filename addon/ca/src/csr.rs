//! Checks on an incoming PKCS#10 CSR.
//!
//! The CSR carries the caller's public key and its proof of possession (the
//! self-signature). The authority derives every field of the leaf itself (see
//! `reliability.md` §3 row 12, and Istio CVE-2022-39388 for what trusting the request leads
//! to); the identity comes from the caller's token alone.
//!
//! What the CSR *asks for* is still checked, and a request for anything the leaf will not
//! carry is refused rather than silently narrowed: a caller asking for another identity,
//! a DNS name or CA powers is either misconfigured or probing, and both deserve a clear
//! error and a metric rather than a certificate that differs from what was asked. Allowed
//! in the `extensionRequest`: at most one SAN, a URI equal to the token's SPIFFE id (what
//! `trellis_identity::generate_csr` sends); `basicConstraints` with CA:FALSE; a key usage
//! without keyCertSign or cRLSign; an extended key usage of serverAuth and/or clientAuth.
//! Other non-critical extensions are ignored (never copied); other critical ones are
//! refused. The subject is ignored: leaves have an empty subject.

use std::net::IpAddr;

use trellis_identity::SpiffeId;
use x509_parser::asn1_rs::{Header, Length};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::{ParsedCriAttribute, X509CriAttribute};
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
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

/// Longest caller-supplied value (a SAN, an OID) quoted back in an error.
const MAX_ECHOED: usize = 64;

/// Parses `der` as a CSR, checks its key type, that it asks for nothing but `identity`
/// (see the module docs), and its self-signature; returns its public key in the form
/// rcgen signs over.
pub(crate) fn public_key(
    der: &[u8],
    identity: &SpiffeId,
) -> Result<rcgen::SubjectPublicKeyInfo, Error> {
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
    // signature error it cannot act on. The policy before the signature: it is cheaper.
    check_key_type(spki)?;
    check_requests(&csr, identity)?;
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

/// Refuses a CSR whose `extensionRequest` asks for anything the leaf will not carry.
///
/// Walks the attributes itself rather than through `requested_extensions()`, which reads
/// only the first `extensionRequest` attribute and only the first value of its SET: a
/// request hiding `CA:TRUE` in a second one must not pass as "no extensions".
fn check_requests(csr: &X509CertificationRequest<'_>, identity: &SpiffeId) -> Result<(), Error> {
    let mut uris: Vec<&str> = Vec::new();
    let mut seen = false;
    for attr in csr.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(request) = attr.parsed_attribute() else {
            continue;
        };
        if seen {
            return Err(Error::CsrMalformed(
                "more than one extensionRequest attribute".to_owned(),
            ));
        }
        seen = true;
        check_single_value(attr)?;
        for ext in &request.extensions {
            check_extension(ext, &mut uris)?;
        }
    }
    match uris.as_slice() {
        [] => Ok(()),
        [uri] if *uri == identity.as_str() => Ok(()),
        // Another workload's identity (or one in another trust domain): not a malformed
        // request but a caller asking for what its token does not prove.
        [uri] if uri.starts_with("spiffe://") => Err(Error::CsrIdentity {
            requested: quoted(uri),
            identity: identity.to_string(),
        }),
        [uri] => Err(Error::CsrPolicy(format!(
            "requests URI SAN {}; the only URI SAN allowed is the token's identity {identity}",
            quoted(uri)
        ))),
        many => Err(Error::CsrPolicy(format!(
            "requests {} URI SANs; at most one is allowed, the token's identity {identity}",
            many.len()
        ))),
    }
}

/// An attribute's value is a SET; x509-parser parses its first member and drops the rest.
/// More than one `extensionRequest` value is refused.
fn check_single_value(attr: &X509CriAttribute<'_>) -> Result<(), Error> {
    let single = match Header::from_der(attr.value) {
        Ok((rest, header)) => header.length() == Length::Definite(rest.len()),
        Err(_) => false,
    };
    if single {
        Ok(())
    } else {
        Err(Error::CsrMalformed(
            "extensionRequest attribute must hold exactly one value".to_owned(),
        ))
    }
}

/// Checks one requested extension, collecting URI SANs into `uris` (checked once all
/// extensions are seen, so that two SAN extensions count together).
fn check_extension<'a>(ext: &'a X509Extension<'_>, uris: &mut Vec<&'a str>) -> Result<(), Error> {
    match ext.parsed_extension() {
        ParsedExtension::SubjectAlternativeName(san) => {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => uris.push(uri),
                    other => {
                        return Err(Error::CsrPolicy(format!(
                            "requests {}; the only SAN allowed is the token's identity as a URI",
                            describe_name(other)
                        )));
                    }
                }
            }
            Ok(())
        }
        ParsedExtension::BasicConstraints(bc) if bc.ca => Err(Error::CsrPolicy(
            "requests basicConstraints CA:TRUE; leaves are never CAs".to_owned(),
        )),
        ParsedExtension::BasicConstraints(_) => Ok(()),
        ParsedExtension::KeyUsage(ku) => {
            let refused: Vec<&str> = [
                (ku.key_cert_sign(), "keyCertSign"),
                (ku.crl_sign(), "cRLSign"),
            ]
            .into_iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| name)
            .collect();
            if refused.is_empty() {
                Ok(())
            } else {
                Err(Error::CsrPolicy(format!(
                    "requests key usage {}; leaves cannot sign certificates or CRLs",
                    refused.join(", ")
                )))
            }
        }
        ParsedExtension::ExtendedKeyUsage(eku) => {
            let mut refused: Vec<String> = [
                (eku.any, "anyExtendedKeyUsage"),
                (eku.code_signing, "codeSigning"),
                (eku.email_protection, "emailProtection"),
                (eku.time_stamping, "timeStamping"),
                (eku.ocsp_signing, "OCSPSigning"),
            ]
            .into_iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| name.to_owned())
            .collect();
            refused.extend(eku.other.iter().map(|oid| quoted(&oid.to_id_string())));
            if refused.is_empty() {
                Ok(())
            } else {
                Err(Error::CsrPolicy(format!(
                    "requests extended key usage {}; leaves are for serverAuth and clientAuth only",
                    refused.join(", ")
                )))
            }
        }
        ParsedExtension::ParseError { .. } => Err(Error::CsrMalformed(format!(
            "requested extension {} does not parse",
            quoted(&ext.oid.to_id_string())
        ))),
        // Anything else is never copied into the leaf. A critical one is a demand the
        // leaf would not meet, so it is refused; a non-critical one is ignored.
        _ if ext.critical => Err(Error::CsrPolicy(format!(
            "requests critical extension {}, which this CA does not grant",
            quoted(&ext.oid.to_id_string())
        ))),
        _ => Ok(()),
    }
}

/// A SAN that is not a URI, for an error message.
fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(dns) => format!("DNS SAN {}", quoted(dns)),
        GeneralName::IPAddress(bytes) => {
            let ip = <[u8; 4]>::try_from(*bytes)
                .map(IpAddr::from)
                .or_else(|_| <[u8; 16]>::try_from(*bytes).map(IpAddr::from));
            match ip {
                Ok(ip) => format!("IP address SAN {ip}"),
                Err(_) => format!("IP address SAN of {} bytes", bytes.len()),
            }
        }
        GeneralName::RFC822Name(email) => format!("email SAN {}", quoted(email)),
        GeneralName::OtherName(oid, _) => {
            format!("otherName SAN {}", quoted(&oid.to_id_string()))
        }
        GeneralName::DirectoryName(_) => "directoryName SAN".to_owned(),
        GeneralName::RegisteredID(_) => "registeredID SAN".to_owned(),
        GeneralName::X400Address(_) => "x400Address SAN".to_owned(),
        GeneralName::EDIPartyName(_) => "ediPartyName SAN".to_owned(),
        GeneralName::Invalid(..) => "an undecodable SAN".to_owned(),
        GeneralName::URI(uri) => format!("URI SAN {}", quoted(uri)),
    }
}

/// A caller-supplied value for an error message: quoted and escaped (no control
/// characters reach logs) and cut to [`MAX_ECHOED`] characters.
fn quoted(s: &str) -> String {
    let mut cut: String = s.chars().take(MAX_ECHOED).collect();
    let truncated = cut.len() < s.len();
    if truncated {
        cut.push('…');
    }
    format!("{cut:?}")
}

#[cfg(test)]
mod tests {
    use rcgen::string::Ia5String;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose, SanType,
    };

    use super::*;

    fn me() -> SpiffeId {
        SpiffeId::new("cluster.local", "demo", "web").unwrap()
    }

    fn csr(params: &CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s).unwrap())
    }

    #[test]
    fn accepts_what_the_leaf_will_carry() {
        let proxy = trellis_identity::generate_csr(&me()).unwrap().csr_der;
        let mut benign = CertificateParams::default();
        benign.subject_alt_names = vec![uri(me().as_str())];
        benign.is_ca = IsCa::ExplicitNoCa;
        benign.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyAgreement,
        ];
        benign.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // A non-critical extension the CA never copies is ignored.
        benign.custom_extensions = vec![CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 99999, 1],
            vec![0x05, 0x00],
        )];
        for (name, der) in [
            ("proxy", proxy),
            ("no extensions", csr(&CertificateParams::default())),
            ("benign extensions", csr(&benign)),
        ] {
            public_key(&der, &me()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn refuses_what_the_leaf_will_not_carry() {
        let mut critical =
            CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 2], vec![0x05, 0x00]);
        critical.set_criticality(true);
        type Tweak = Box<dyn Fn(&mut CertificateParams)>;
        let cases: Vec<(&str, Tweak, &str)> = vec![
            (
                "another identity",
                Box::new(|p| {
                    p.subject_alt_names = vec![uri("spiffe://cluster.local/ns/demo/sa/db")]
                }),
                "csr asks for identity \"spiffe://cluster.local/ns/demo/sa/db\", but the token proves spiffe://cluster.local/ns/demo/sa/web",
            ),
            (
                "a non-SPIFFE URI",
                Box::new(|p| p.subject_alt_names = vec![uri("https://evil.example/")]),
                "csr refused: requests URI SAN \"https://evil.example/\"; the only URI SAN allowed is the token's identity spiffe://cluster.local/ns/demo/sa/web",
            ),
            (
                "two URIs, one ours",
                Box::new(|p| {
                    p.subject_alt_names = vec![
                        uri("spiffe://cluster.local/ns/demo/sa/web"),
                        uri("spiffe://cluster.local/ns/demo/sa/db"),
                    ]
                }),
                "requests 2 URI SANs; at most one is allowed",
            ),
            (
                "dns",
                Box::new(|p| {
                    p.subject_alt_names = vec![SanType::DnsName(
                        Ia5String::try_from("evil.example").unwrap(),
                    )]
                }),
                "requests DNS SAN \"evil.example\"",
            ),
            (
                "ipv6",
                Box::new(|p| {
                    p.subject_alt_names = vec![SanType::IpAddress("::1".parse().unwrap())]
                }),
                "requests IP address SAN ::1",
            ),
            (
                "email",
                Box::new(|p| {
                    p.subject_alt_names = vec![SanType::Rfc822Name(
                        Ia5String::try_from("a@b.example").unwrap(),
                    )]
                }),
                "requests email SAN \"a@b.example\"",
            ),
            (
                "CA:TRUE",
                Box::new(|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0))),
                "requests basicConstraints CA:TRUE",
            ),
            (
                "crlSign",
                Box::new(|p| p.key_usages = vec![KeyUsagePurpose::CrlSign]),
                "requests key usage cRLSign",
            ),
            (
                "codeSigning",
                Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning]),
                "requests extended key usage codeSigning",
            ),
            (
                "any EKU",
                Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::Any]),
                "requests extended key usage anyExtendedKeyUsage",
            ),
            (
                "unknown critical extension",
                Box::new(move |p| p.custom_extensions = vec![critical.clone()]),
                "requests critical extension \"1.3.6.1.4.1.99999.2\"",
            ),
        ];
        for (name, tweak, expected) in cases {
            let mut params = CertificateParams::default();
            tweak(&mut params);
            let err = public_key(&csr(&params), &me()).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{name}: {err} (expected {expected:?})"
            );
        }
    }

    #[test]
    fn echoed_values_are_escaped_and_bounded() {
        assert_eq!(quoted("a\u{7}b"), r#""a\u{7}b""#);
        let long = quoted(&"x".repeat(1000));
        assert_eq!(long.chars().count(), MAX_ECHOED + 3);
        assert!(long.ends_with("…\""));
    }

    /// DER for `SEQUENCE { OID extensionRequest, SET { <values> } }`.
    fn extension_request_attr(values: &[&[u8]]) -> Vec<u8> {
        let content: Vec<u8> = values.concat();
        let set = der(0x31, &content);
        let oid = [
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e,
        ];
        der(0x30, &[&oid[..], &set].concat())
    }

    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        assert!(content.len() < 128);
        [&[tag, content.len() as u8][..], content].concat()
    }

    #[test]
    fn a_second_extension_request_value_is_not_skipped() {
        // Extensions { Extension { basicConstraints, critical, CA:TRUE } }.
        let ca_true = der(
            0x30,
            &der(
                0x30,
                &[
                    &[0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff][..],
                    &der(0x04, &der(0x30, &[0x01, 0x01, 0xff])),
                ]
                .concat(),
            ),
        );
        let empty = der(0x30, &[]);
        let one = extension_request_attr(&[&ca_true]);
        let (_, attr) = X509CriAttribute::from_der(&one).unwrap();
        check_single_value(&attr).unwrap();
        let two = extension_request_attr(&[&empty, &ca_true]);
        let (_, attr) = X509CriAttribute::from_der(&two).unwrap();
        // x509-parser sees only the first (empty) value...
        let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
            panic!("not an extension request");
        };
        assert!(req.extensions.is_empty());
        // ...so the check refuses the attribute as a whole.
        let err = check_single_value(&attr).unwrap_err();
        assert!(err.to_string().contains("exactly one value"), "{err}");
    }
}
