//! This workload's certified key, and identity extraction from a leaf certificate.

use std::fmt;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME;

use crate::{Error, SpiffeId, x509};

/// An X.509-SVID with its private key: what this workload presents in a handshake.
///
/// Construction checks that the leaf carries exactly one SPIFFE ID and that the key
/// matches it; it does not check that the chain is trusted or currently valid (the peer
/// does that, and a workload may hold a not-yet-valid SVID during rotation).
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
}

// === impl Svid ===

impl Svid {
    /// Builds an SVID from its chain (leaf first, then intermediates, no root) and key.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, Error> {
        let leaf = chain.first().ok_or(Error::EmptyChain)?;
        let id = leaf_identity(leaf)?;
        let (not_before, not_after) = x509::validity_secs(&x509::parse_cert(leaf)?);
        // Catch a key that does not belong to the leaf now, not at the first handshake.
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
            .map_err(Error::Key)?;
        Ok(Self {
            id,
            chain,
            key,
            not_before: x509::system_time(not_before)?,
            not_after: x509::system_time(not_after)?,
        })
    }

    /// The identity in the leaf's URI SAN.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The leaf's `NotBefore`.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// The leaf's `NotAfter`; rotation is scheduled from this.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// A copy of the private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Self {
            id: self.id.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is deliberately absent.
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The SPIFFE ID of a leaf certificate.
///
/// Per the X.509-SVID spec the leaf carries exactly one URI SAN and it is the identity.
/// Zero URI SANs, two or more (even two valid SPIFFE IDs, or the same one twice, possibly
/// split over two SAN extensions), or one that is not a canonical [`SpiffeId`] are all
/// errors. DNS, IP and other SANs are ignored. This does not verify the chain; see
/// [`verify_peer`](crate::verify_peer).
pub fn leaf_identity(cert: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    let cert = x509::parse_cert(cert)?;
    let mut uris = Vec::new();
    // Walk every extension rather than asking for "the" SAN extension, so that a second
    // SAN extension cannot hide a second URI.
    for ext in cert.iter_extensions() {
        if ext.oid != OID_X509_EXT_SUBJECT_ALT_NAME {
            continue;
        }
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                uris.extend(san.general_names.iter().filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                }));
            }
            ParsedExtension::ParseError { error } => return Err(Error::BadSan(error.to_string())),
            other => return Err(Error::BadSan(format!("unexpected {other:?}"))),
        }
    }
    match uris.as_slice() {
        [] => Err(Error::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(|source| Error::InvalidSpiffeId {
            uri: (*uri).to_owned(),
            source,
        }),
        many => Err(Error::MultipleUriSans(many.len())),
    }
}

#[cfg(test)]
mod tests;
