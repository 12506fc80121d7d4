//! rustls configurations for mesh mTLS: TLS 1.3 only, the ring provider, and verifiers that
//! defer every trust decision to [`verify_peer`].
//!
//! Session resumption is disabled on both sides so that every connection runs the
//! verifier: a resumed session would skip it, and with it expiry and bundle rotation.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use crate::{Error, PeerRole, SpiffeId, Svid, TrustBundle, leaf_identity, verify_peer};

/// Whether a server insists on a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientAuth {
    /// Refuse clients that present no certificate. The data plane uses this.
    Required,
    /// Accept clients without a certificate (their peer is then `None`), but still refuse
    /// any certificate that does not verify. For the CA's port, where a proxy without a
    /// certificate yet asks for its first one.
    Optional,
}

/// Verifies client certificates with [`verify_peer`] as [`PeerRole::Client`].
#[derive(Debug)]
struct MeshClientVerifier {
    bundle: TrustBundle,
    trust_domain: String,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
}

/// Verifies server certificates with [`verify_peer`] as [`PeerRole::Server`], then
/// requires exactly the expected identity.
#[derive(Debug)]
struct MeshServerVerifier {
    bundle: TrustBundle,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

/// Builds the server side of mesh mTLS for `svid`.
///
/// Clients are verified with [`verify_peer`] against `bundle`, in the SVID's own trust
/// domain; `alpn` lists the protocols offered, most preferred first. After the handshake,
/// [`peer_identity`] on the connection's peer certificates gives the client's identity.
pub fn server_config(
    svid: &Svid,
    bundle: &TrustBundle,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, Error> {
    build_server_config(
        svid.chain().to_vec(),
        svid.key(),
        svid.id().trust_domain(),
        bundle,
        client_auth,
        alpn,
    )
}

/// Builds the client side of mesh mTLS for a connection to `expected`.
///
/// The server must verify with [`verify_peer`] against `bundle` in `expected`'s trust
/// domain and its id must equal `expected` exactly. SVIDs carry no DNS SAN, so the
/// [`ServerName`] a caller passes to rustls is not checked at all (it is still sent as SNI):
/// any placeholder such as `"mesh.invalid"` or the target's IP address will do. With
/// `Some(svid)` the client presents the SVID as its certificate.
pub fn client_config(
    svid: Option<&Svid>,
    bundle: &TrustBundle,
    expected: &SpiffeId,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Error> {
    build_client_config(
        svid.map(|s| (s.chain().to_vec(), s.key())),
        bundle,
        expected,
        alpn,
    )
}

/// The identity of a peer whose chain a handshake with one of our configs already verified
/// (e.g. `ServerConnection::peer_certificates()`): the leaf's SPIFFE ID, or `None` when
/// the peer presented no certificate.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Option<SpiffeId> {
    certs.first().and_then(|leaf| leaf_identity(leaf).ok())
}

/// [`server_config`] with the certificate and trust domain given separately, so tests can
/// serve certificates that are not valid SVIDs.
pub(crate) fn build_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust_domain: &str,
    bundle: &TrustBundle,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let verifier = MeshClientVerifier {
        bundle: bundle.clone(),
        trust_domain: trust_domain.to_owned(),
        mandatory: client_auth == ClientAuth::Required,
        algs: provider.signature_verification_algorithms,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Rustls)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .map_err(Error::Key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// [`client_config`] with the client certificate given as a raw chain and key, so tests
/// can present certificates that are not valid SVIDs.
pub(crate) fn build_client_config(
    cert: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    bundle: &TrustBundle,
    expected: &SpiffeId,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = MeshServerVerifier {
        bundle: bundle.clone(),
        expected: expected.clone(),
        algs: provider.signature_verification_algorithms,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Rustls)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match cert {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(Error::Key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Always ring, never the process-default provider, which another crate may have installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The peer's chain as one slice, leaf first, borrowing the certificates.
fn chain<'a>(
    end_entity: &'a CertificateDer<'_>,
    intermediates: &'a [CertificateDer<'_>],
) -> Vec<CertificateDer<'a>> {
    std::iter::once(end_entity)
        .chain(intermediates)
        .map(|c| CertificateDer::from(c.as_ref()))
        .collect()
}

/// Maps our error onto rustls's so the peer gets a meaningful alert (certificate_expired,
/// unknown_ca); everything else keeps our error intact inside `CertificateError::Other`
/// (alert certificate_unknown) for the local log.
pub(crate) fn to_rustls(err: Error) -> rustls::Error {
    use webpki::Error as W;
    let cert_err = match err {
        Error::Untrusted(W::CertExpired { time, not_after }) => {
            CertificateError::ExpiredContext { time, not_after }
        }
        Error::Untrusted(W::CertNotValidYet { time, not_before }) => {
            CertificateError::NotValidYetContext { time, not_before }
        }
        Error::Untrusted(W::UnknownIssuer) => CertificateError::UnknownIssuer,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_err)
}

// === impl MeshClientVerifier ===

impl ClientCertVerifier for MeshClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients have exactly one SVID, and listing our roots would only
        // advertise them.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chain = chain(end_entity, intermediates);
        verify_peer(
            &chain,
            &self.bundle,
            &self.trust_domain,
            PeerRole::Client,
            now,
        )
        .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

// === impl MeshServerVerifier ===

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // SVIDs have no DNS SAN; the identity check below replaces name checking.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = chain(end_entity, intermediates);
        let td = self.expected.trust_domain();
        let id = verify_peer(&chain, &self.bundle, td, PeerRole::Server, now).map_err(to_rustls)?;
        if id != self.expected {
            let err = Error::IdentityMismatch {
                expected: self.expected.clone(),
                actual: id,
            };
            return Err(to_rustls(err));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
