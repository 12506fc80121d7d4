//! Mesh -> app. Terminates mTLS (client certificate required, verified against the trust
//! bundle with exactly one SPIFFE ID in the trust domain), authorizes the peer, and
//! forwards each HTTP/2 request to the local app over HTTP/1.1 with the peer's identity
//! in `x-forwarded-client-cert`.
//!
//! ```text
//! mTLS accept -> peer identity -> authorize (pure) -> http2 server -> app (http1)
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HOST, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use trellis_identity::SpiffeId;

use crate::error::Error;
use crate::http::{Access, Body, XFCC, error_response, strip_hop_by_hop};
use crate::identity::Certified;
use crate::metrics::{DirectionLabels, Metrics};

/// How long the TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared state of the inbound side.
pub struct Inbound {
    /// Our identity.
    pub me: SpiffeId,
    /// The local app.
    pub app: SocketAddr,
    /// Current certificate.
    pub certs: watch::Receiver<Option<Arc<Certified>>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Per-request timeout.
    pub request_timeout: Duration,
    client: Client<HttpConnector, Body>,
}

/// The authorization decision for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it.
    Allow,
    /// Refuse it, with the reason.
    Deny(String),
}

/// Decides whether `peer` may talk to `me`. Pure. Today: any identity of our trust
/// domain (the TLS verifier already enforced that); policies arrive with the policy issue.
pub fn authorize(peer: &SpiffeId, me: &SpiffeId) -> Verdict {
    if peer.trust_domain() == me.trust_domain() {
        Verdict::Allow
    } else {
        Verdict::Deny(format!(
            "{peer} is outside trust domain {}",
            me.trust_domain()
        ))
    }
}

// === impl Inbound ===

impl Inbound {
    /// Builds the inbound side.
    pub fn new(
        me: SpiffeId,
        app: SocketAddr,
        certs: watch::Receiver<Option<Arc<Certified>>>,
        metrics: Metrics,
        request_timeout: Duration,
    ) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .set_host(false)
            .build(http);
        Self {
            me,
            app,
            certs,
            metrics,
            request_timeout,
            client,
        }
    }

    /// Accepts peer connections until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) {
        let stop = shutdown.clone();
        crate::transport::accept_loop(listener, "inbound", stop, tasks, move |tcp, remote| {
            self.clone().connection(tcp, remote, shutdown.clone())
        })
        .await;
    }

    async fn connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        shutdown: CancellationToken,
    ) {
        // Read the certificate per connection so a rotation applies to the next one.
        let Some(certified) = self.certs.borrow().clone() else {
            debug!(%remote, "refusing connection: no certificate yet");
            return;
        };
        let acceptor = TlsAcceptor::from(certified.server.clone());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                self.metrics
                    .tls_failures
                    .get_or_create(&DirectionLabels {
                        direction: "inbound",
                    })
                    .inc();
                warn!(%remote, %error, "mTLS handshake refused");
                return;
            }
            Err(_) => {
                self.metrics
                    .tls_failures
                    .get_or_create(&DirectionLabels {
                        direction: "inbound",
                    })
                    .inc();
                warn!(%remote, "mTLS handshake timed out");
                return;
            }
        };
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(trellis_identity::peer_identity);
        let Some(peer) = peer else {
            // Unreachable with a Required verifier; refuse rather than serve anonymously.
            warn!(%remote, "refusing connection without a peer identity");
            return;
        };
        if let Verdict::Deny(reason) = authorize(&peer, &self.me) {
            warn!(%remote, %peer, %reason, "connection denied");
            return;
        }
        debug!(%remote, %peer, "mTLS connection accepted");
        let peer = Arc::new(peer);
        let this = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let this = this.clone();
            let peer = peer.clone();
            async move { Ok::<_, std::convert::Infallible>(this.handle(req, &peer).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .max_header_list_size(64 * 1024)
            .keep_alive_interval(Duration::from_secs(30))
            .serve_connection(TokioIo::new(tls), svc);
        crate::transport::serve_until(conn, &shutdown, remote, "inbound").await;
    }

    /// Forwards one request from `peer` to the app.
    async fn handle(&self, req: Request<Incoming>, peer: &SpiffeId) -> Response<Body> {
        let start = Instant::now();
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let access = Access {
            direction: "inbound",
            src: peer.as_str(),
            dst: self.me.as_str(),
            service: "-".into(),
            endpoint: self.app.to_string(),
            method: &method,
            authority: req
                .uri()
                .authority()
                .map(ToString::to_string)
                .unwrap_or_default(),
            path: &path,
            start,
        };
        let (resp, err) = match self.forward(req, peer).await {
            Ok(r) => (r, None),
            Err(e) => (error_response(&e), Some(e)),
        };
        access.finish(resp.status(), err.as_ref(), &self.metrics);
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: &SpiffeId,
    ) -> Result<Response<Body>, Error> {
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(a) = parts.uri.authority() {
            let host =
                HeaderValue::from_str(a.as_str()).map_err(|_| Error::BadHost(a.to_string()))?;
            parts.headers.insert(HOST, host);
        }
        let xfcc = HeaderValue::from_str(&format!("By={};URI={}", self.me, peer))
            .map_err(|e| Error::Upstream(Box::new(e)))?;
        parts.headers.insert(&XFCC, xfcc);
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(self.app.to_string())
            .path_and_query(path)
            .build()
            .map_err(|e| Error::BadHost(e.to_string()))?;
        parts.version = http::Version::HTTP_11;
        let req = Request::from_parts(parts, body.boxed_unsync());
        let resp = tokio::time::timeout(self.request_timeout, self.client.request(req))
            .await
            .map_err(|_| Error::Timeout(self.request_timeout))?
            .map_err(|e| Error::Upstream(Box::new(e)))?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn authorize_allows_own_trust_domain_only() {
        let me = id("spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(
            authorize(&id("spiffe://cluster.local/ns/other/sa/x"), &me),
            Verdict::Allow
        );
        assert!(matches!(
            authorize(&id("spiffe://evil.org/ns/demo/sa/web"), &me),
            Verdict::Deny(_)
        ));
    }
}
