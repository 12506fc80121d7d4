//! TLS the app originates: a rustls echo server with a self-signed certificate for a name
//! (e.g. `web.demo.svc.cluster.local`), and a client that trusts exactly that certificate
//! and returns the certificate it was shown, so a test can tell that the mesh passed the
//! TLS through instead of terminating it.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::tcp::echo;
use super::{AppKind, Listen, Received, Recorder, accept_loop, connect, must_listen, timed};

/// A self-signed certificate and its key (ECDSA P-256), made with rcgen.
#[derive(Debug, Clone)]
pub struct TlsCert {
    /// The DNS name the certificate is for (its only SAN).
    pub name: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl TlsCert {
    /// A fresh self-signed certificate for `name`.
    pub fn generate(name: &str) -> anyhow::Result<Self> {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec![name.to_owned()])?;
        Ok(Self {
            name: name.to_owned(),
            cert_der: cert.der().to_vec(),
            key_der: signing_key.serialize_der(),
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS echo server on `listen` (a port on `0.0.0.0`, or a bound listener) presenting
/// `cert` (TLS 1.2 and 1.3, no ALPN). One [`Received`] per completed handshake: the SNI and
/// the decrypted bytes. Runs until dropped.
pub async fn tls_echo_server(listen: impl Listen, cert: TlsCert, rec: Recorder) {
    let listener = must_listen(listen, "tls_echo_server");
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth().with_single_cert(
                vec![CertificateDer::from(cert.cert_der)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der)),
            )
        })
        .unwrap_or_else(|e| panic!("tls_echo_server cannot use its certificate: {e}"));
    let acceptor = TlsAcceptor::from(Arc::new(config));
    accept_loop(listener, move |tcp, peer| {
        let (acceptor, rec) = (acceptor.clone(), rec.clone());
        async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let entry = rec.push(Received {
                server_name: tls.get_ref().1.server_name().map(str::to_owned),
                ..Received::new(AppKind::Tls, peer)
            });
            let _ = echo(&mut tls, &entry).await;
        }
    })
    .await
}

/// What a TLS client saw.
#[derive(Debug, Clone)]
pub struct TlsEcho {
    /// What came back (decrypted).
    pub echo: Vec<u8>,
    /// The end-entity certificate the server presented, DER: the app's own when the mesh
    /// passed the TLS through.
    pub peer_cert_der: Vec<u8>,
    /// The negotiated protocol version, e.g. `TLSv1_3`.
    pub version: String,
}

/// Connects to `addr`, does a TLS handshake with SNI `server_name` trusting only
/// `trusted`, sends `data` and reads as many bytes back.
pub async fn tls_echo(
    addr: impl fmt::Display,
    server_name: &str,
    trusted: &TlsCert,
    data: &[u8],
) -> anyhow::Result<TlsEcho> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(trusted.cert_der.clone()))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_owned())?;
    timed(format!("TLS echo with {addr} ({server_name})"), async {
        let tcp = connect(&addr.to_string()).await?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| anyhow::anyhow!("TLS handshake with {addr} as {server_name}: {e}"))?;
        let (_, session) = tls.get_ref();
        let peer_cert_der = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let version = session
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        // Write and read at once: a large payload would otherwise fill both directions.
        let (mut r, mut w) = tokio::io::split(tls);
        let mut echo = vec![0u8; data.len()];
        let (written, read) = tokio::join!(
            async {
                w.write_all(data).await?;
                w.flush().await
            },
            r.read_exact(&mut echo)
        );
        read.map_err(|e| anyhow::anyhow!("reading the echo: {e}"))?;
        written?;
        let _ = r.unsplit(w).shutdown().await;
        Ok(TlsEcho {
            echo,
            peer_cert_der,
            version,
        })
    })
    .await
}
