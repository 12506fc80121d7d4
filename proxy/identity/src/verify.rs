//! The one decision on whether a peer's certificate chain names a workload we trust.
//!
//! Both rustls verifiers in [`crate::tls`] are thin wrappers around [`verify_peer`], so
//! the accept/reject matrix can be table-tested here without a handshake.

use std::fmt;

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::{Error, SpiffeId, TrustBundle, leaf_identity, x509};

/// Which side of the handshake the peer is on, which selects the extended key usage its
/// leaf must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// The peer is a TLS client: its leaf must list id-kp-clientAuth.
    Client,
    /// The peer is a TLS server: its leaf must list id-kp-serverAuth.
    Server,
}

// === impl PeerRole ===

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Server => "server",
        })
    }
}

/// Verifies a peer's chain and returns its identity.
///
/// `chain` is what the peer sent, leaf first; the rest are intermediates. The peer is
/// accepted only if all of these hold:
///
/// 1. webpki builds a path from the leaf to a root in `bundle`, every certificate valid at
///    `now`, the leaf not a CA, and no certificate in the path with an EKU extension that
///    lacks clientAuth (for [`PeerRole::Client`]) or serverAuth (for [`PeerRole::Server`]).
/// 2. The leaf has an EKU extension listing that purpose (webpki alone would accept a
///    leaf without the extension), expires no later than any certificate above it in the
///    path, and its key usage (if present) does not allow signing certificates or CRLs.
/// 3. The leaf has exactly one URI SAN and it is a canonical [`SpiffeId`] ([`leaf_identity`]).
/// 4. That id's trust domain equals `trust_domain`.
pub fn verify_peer(
    chain: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    trust_domain: &str,
    role: PeerRole,
    now: UnixTime,
) -> Result<SpiffeId, Error> {
    let (leaf, intermediates) = chain.split_first().ok_or(Error::EmptyChain)?;
    let ee = EndEntityCert::try_from(leaf).map_err(Error::Untrusted)?;
    // webpki applies this to every certificate in the path, so it must stay "if present":
    // intermediates usually carry no EKU. The leaf's EKU is required separately below.
    let usage = match role {
        PeerRole::Client => KeyUsage::client_auth(),
        PeerRole::Server => KeyUsage::server_auth(),
    };
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            bundle.anchors(),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(Error::Untrusted)?;

    let parsed = x509::parse_cert(leaf)?;
    let (_, leaf_not_after) = x509::validity_secs(&parsed);
    for issuer in path.intermediate_certificates() {
        let der = issuer.der();
        let (_, issuer_not_after) = x509::validity_secs(&x509::parse_cert(&der)?);
        if leaf_not_after > issuer_not_after {
            return Err(Error::OutlivesIssuer);
        }
    }
    match bundle.anchor_not_after(path.anchor()) {
        Some(root_not_after) if leaf_not_after > root_not_after => {
            return Err(Error::OutlivesIssuer);
        }
        _ => {}
    }
    let eku = parsed
        .extended_key_usage()
        .map_err(|e| Error::BadCertificate(e.to_string()))?;
    let eku_ok = eku.is_some_and(|eku| match role {
        PeerRole::Client => eku.value.client_auth,
        PeerRole::Server => eku.value.server_auth,
    });
    if !eku_ok {
        return Err(Error::MissingEku(role));
    }
    let ku = parsed
        .key_usage()
        .map_err(|e| Error::BadCertificate(e.to_string()))?;
    if ku.is_some_and(|ku| ku.value.key_cert_sign() || ku.value.crl_sign()) {
        return Err(Error::LeafCanSign);
    }

    let id = leaf_identity(leaf)?;
    if id.trust_domain() != trust_domain {
        return Err(Error::ForeignTrustDomain {
            id,
            expected: trust_domain.to_owned(),
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests;
