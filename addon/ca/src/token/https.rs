//! The smallest HTTPS client the OIDC verifier needs: one GET at a time, HTTP/1.1 over
//! rustls with ring, a size cap on the body, an overall timeout, no redirects, no proxy.
//!
//! hyper's connection API plus tokio-rustls rather than reqwest: the CA fetches two small
//! documents every few minutes, and this keeps reqwest's stack (and its TLS backend
//! choice) out of the CA crate. Server certificates are verified with the platform
//! verifier (the system's roots, like `trellis-azure`'s transport) plus any extra roots
//! given for a private issuer.

use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, HOST};
use http::uri::{Scheme, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::TokenError;

/// The largest response body read. Discovery documents and JWKS are a few KiB.
pub(super) const MAX_BODY: usize = 1024 * 1024;

/// An HTTPS GET client with fixed trust.
pub(super) struct HttpsClient {
    tls: TlsConnector,
    timeout: Duration,
}

// === impl HttpsClient ===

impl HttpsClient {
    /// A client trusting the system's roots plus the certificates in `extra_roots_pem`,
    /// giving up on a request after `timeout`.
    pub(super) fn new(
        extra_roots_pem: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, TokenError> {
        let extra = match extra_roots_pem {
            Some(pem) => parse_certificates(pem)?,
            None => Vec::new(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
                .map_err(|e| TokenError::Config(format!("TLS roots: {e}")))?;
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TokenError::Config(format!("TLS: {e}")))?
            .dangerous()
            // Not a shortcut: the platform verifier is a complete WebPKI verifier.
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: TlsConnector::from(Arc::new(config)),
            timeout,
        })
    }

    /// GETs `url` (which must be `https://`) and returns the body of a 200 response.
    /// Errors name the URL and what failed; they never carry the body.
    pub(super) async fn get(&self, url: &str) -> Result<Bytes, String> {
        match tokio::time::timeout(self.timeout, self.get_inner(url)).await {
            Ok(result) => result.map_err(|e| format!("GET {url}: {e}")),
            Err(_) => Err(format!(
                "GET {url}: no response within {} s",
                self.timeout.as_secs_f32()
            )),
        }
    }

    async fn get_inner(&self, url: &str) -> Result<Bytes, String> {
        let uri = parse_https_url(url)?;
        let authority = uri
            .authority()
            .ok_or_else(|| "URL has no host".to_owned())?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(443);
        let tcp = connect(host, port).await?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let request = http::Request::get(path)
            .header(HOST, authority.as_str())
            .header(ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("request: {e}"))?;
        let exchange = async move {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            let status = response.status();
            if status != http::StatusCode::OK {
                // Redirects are not followed: an issuer's documents live at fixed URLs.
                return Err(format!("HTTP status {status}"));
            }
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the body (at most {MAX_BODY} bytes): {e}"))?;
            Ok(body.to_bytes())
        };
        // The connection future drives the socket; it may finish (the server closing)
        // before the exchange has read everything it delivered, so the exchange decides.
        tokio::pin!(conn, exchange);
        let mut conn_done = false;
        loop {
            tokio::select! {
                result = &mut exchange => return result,
                _ = &mut conn, if !conn_done => conn_done = true,
            }
        }
    }
}

/// Checks that `url` is an absolute `https://` URL without user info or fragment.
pub(super) fn parse_https_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme() != Some(&Scheme::HTTPS) {
        return Err("not an https:// URL".to_owned());
    }
    match uri.authority() {
        Some(a) if a.as_str().contains('@') => Err("URL must not carry user info".to_owned()),
        Some(a) if a.host().is_empty() => Err("URL has no host".to_owned()),
        Some(_) if url.contains('#') => Err("URL must not carry a fragment".to_owned()),
        Some(_) => Ok(uri),
        None => Err("URL has no host".to_owned()),
    }
}

/// Connects to the first address of `host` that answers.
async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?;
    let mut last = format!("{host} has no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Two small requests: no point batching writes.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    Err(last)
}

fn parse_certificates(pem_text: &str) -> Result<Vec<CertificateDer<'static>>, TokenError> {
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem_text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TokenError::Config(format!("extra roots: {e}")))?;
    if certs.is_empty() {
        return Err(TokenError::Config(
            "extra roots: no CERTIFICATE block".to_owned(),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_https_urls() {
        for good in [
            "https://issuer.example",
            "https://issuer.example:8443/tenant/",
            "https://127.0.0.1:1/x",
            "https://[::1]:8443/",
        ] {
            parse_https_url(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for (bad, why) in [
            ("http://issuer.example", "https://"),
            ("issuer.example", "https://"),
            ("https://user:pw@issuer.example/", "user info"),
            ("https://issuer.example/#x", "fragment"),
            ("", "not a URL"),
        ] {
            let err = parse_https_url(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn extra_roots_must_hold_a_certificate() {
        for bad in [
            "",
            "not pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            assert!(matches!(
                HttpsClient::new(Some(bad), Duration::from_secs(1)),
                Err(TokenError::Config(_))
            ));
        }
        let ca = rcgen::generate_simple_self_signed(["ca.test".to_owned()]).unwrap();
        HttpsClient::new(Some(&ca.cert.pem()), Duration::from_secs(1)).unwrap();
    }
}
