//! The stand-in over HTTPS, for a client in another process: TLS 1.2/1.3 with rustls (ring)
//! and a fresh test CA, HTTP/1.1 with hyper (what kube-rs speaks), a bearer token, and a
//! kubeconfig that points at it.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::{ApiStandIn, StandInBody, read, status_response};

/// The bearer token the HTTPS front requires (and its kubeconfig carries); any other
/// `Authorization` gets 401, as a real API server answers an unknown token.
pub const TOKEN: &str = "trellis-stand-in-token";

/// Name of the cluster, user and context in the kubeconfig.
const CONTEXT: &str = "trellis-stand-in";

/// The stand-in served on `https://127.0.0.1:<port>`; dropping it stops the server and
/// closes every open connection (watches included).
pub struct HttpsApi {
    addr: SocketAddr,
    ca_pem: String,
    task: JoinHandle<()>,
}

impl ApiStandIn {
    /// Serves this stand-in (the same store: changes made here reach HTTPS watchers) on
    /// 127.0.0.1 at an ephemeral port, with a server certificate for `127.0.0.1` and
    /// `localhost` from a CA made for this server alone. Needs a Tokio runtime with I/O.
    pub async fn serve_https(&self) -> io::Result<HttpsApi> {
        let (ca_pem, tls) = tls_config().map_err(io::Error::other)?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept(listener, tls, self.clone()));
        Ok(HttpsApi { addr, ca_pem, task })
    }
}

// === impl HttpsApi ===

impl HttpsApi {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>`: the kubeconfig's cluster `server`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The test CA's certificate (PEM), the only root the server's certificate chains to.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig (YAML) with one cluster (this server, its CA as
    /// `certificate-authority-data`), one user with the static bearer [`TOKEN`], and one
    /// context joining them, current.
    pub fn kubeconfig(&self) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: {CONTEXT}\n  \
               cluster:\n    \
                 server: \"{url}\"\n    \
                 certificate-authority-data: \"{ca}\"\n\
             users:\n\
             - name: {CONTEXT}\n  \
               user:\n    \
                 token: \"{TOKEN}\"\n\
             contexts:\n\
             - name: {CONTEXT}\n  \
               context:\n    \
                 cluster: {CONTEXT}\n    \
                 user: {CONTEXT}\n    \
                 namespace: default\n\
             current-context: {CONTEXT}\n",
            url = self.url(),
        )
    }

    /// Writes [`kubeconfig`](Self::kubeconfig) to `path` (for `KUBECONFIG`).
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }
}

impl std::fmt::Debug for HttpsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsApi")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for HttpsApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts TLS connections and serves HTTP/1.1 until aborted; aborting drops the
/// connection set, which closes every open connection (and so ends open watches) too.
async fn accept(listener: TcpListener, tls: TlsAcceptor, api: ApiStandIn) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (tls, api) = (tls.clone(), api.clone());
        connections.spawn(async move {
            let Ok(stream) = tls.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |request| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(respond(api, request).await) }
            });
            // A watch is a response body that never ends: hyper streams it chunked, each
            // event flushed as it is sent.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    api: ApiStandIn,
    request: Request<hyper::body::Incoming>,
) -> Response<StandInBody> {
    let (parts, body) = request.into_parts();
    let token = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if token != Some(TOKEN) {
        return status_response(401, "Unauthorized", "Unauthorized");
    }
    api.serve(parts.method, parts.uri, read(body).await).await
}

/// A fresh test CA and a server certificate for 127.0.0.1 and `localhost`: the CA's PEM
/// (for clients to trust) and the server's TLS acceptor.
fn tls_config() -> Result<(String, TlsAcceptor), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| err(&e))?;
    let mut ca_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        "Trellis Kubernetes API stand-in test CA",
    );
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| err(&e))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| err(&e))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "kube-apiserver stand-in");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::DnsName(Ia5String::try_from("localhost").map_err(|e| err(&e))?),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).map_err(|e| err(&e))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| err(&e))?;
    // kube-rs speaks HTTP/1.1 only (watches are chunked responses).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca_cert.pem(), TlsAcceptor::from(Arc::new(config))))
}
