//! App -> mesh. Explicit mode: the app sends plain HTTP/1.1 to the outbound listener (as
//! to an HTTP proxy, absolute-form or with a Host header); the proxy routes the authority
//! to a service endpoint and forwards over mTLS (HTTP/2, one multiplexed connection per
//! peer) after checking the peer proves the identity discovery named for it.
//!
//! ```text
//! listen -> authority -> route (pure) -> pick endpoint -> mTLS connect (pooled) -> peer
//! ```

pub mod route;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;
use trellis_identity::SpiffeId;

use crate::error::Error;
use crate::http::{Access, Body, XFCC, error_response, strip_hop_by_hop};
use crate::identity::Certified;
use crate::metrics::{DirectionLabels, Metrics};
use route::View;

/// How long connecting (TCP + mTLS) to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Shared state of the outbound side.
pub struct Outbound {
    /// Our identity, for the access log.
    pub me: SpiffeId,
    /// Current certificate.
    pub certs: watch::Receiver<Option<Arc<Certified>>>,
    /// Current discovery view.
    pub view: watch::Receiver<Arc<View>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Time allowed for a request head.
    pub header_read_timeout: Duration,
    pool: Pool,
}

/// HTTP/2 connections to peers, one per (address, identity).
#[derive(Default)]
struct Pool {
    conns: Mutex<HashMap<(SocketAddr, SpiffeId), http2::SendRequest<Body>>>,
}

// === impl Outbound ===

impl Outbound {
    /// Builds the outbound side.
    pub fn new(
        me: SpiffeId,
        certs: watch::Receiver<Option<Arc<Certified>>>,
        view: watch::Receiver<Arc<View>>,
        metrics: Metrics,
        request_timeout: Duration,
        header_read_timeout: Duration,
    ) -> Self {
        Self {
            me,
            certs,
            view,
            metrics,
            request_timeout,
            header_read_timeout,
            pool: Pool::default(),
        }
    }

    /// Accepts app connections until `shutdown`; connections finish within the drain.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) {
        let stop = shutdown.clone();
        crate::transport::accept_loop(listener, "outbound", stop, tasks, move |tcp, remote| {
            let this = self.clone();
            let shutdown = shutdown.clone();
            let header_read_timeout = this.header_read_timeout;
            async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, std::convert::Infallible>(this.handle(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    // Slow-header clients are cut; the header block is capped at 64 KiB.
                    .header_read_timeout(header_read_timeout)
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(tcp), svc);
                crate::transport::serve_until(conn, &shutdown, remote, "outbound").await;
            }
        })
        .await;
    }

    /// Handles one request from the app.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let authority = authority_of(&req);
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let mut access = Access {
            direction: "outbound",
            src: self.me.as_str(),
            dst: "-",
            service: "-".into(),
            endpoint: "-".into(),
            method: &method,
            authority: authority
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            path: &path,
            start,
        };
        let result = self.forward(req, authority, &mut access).await;
        let (dst, resp, err) = match result {
            Ok((dst, resp)) => (Some(dst), resp, None),
            Err(e) => (None, error_response(&e), Some(e)),
        };
        let dst = dst.map(|d| d.to_string());
        access.dst = dst.as_deref().unwrap_or("-");
        access.finish(resp.status(), err.as_ref(), &self.metrics);
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        authority: Result<http::uri::Authority, Error>,
        access: &mut Access<'_>,
    ) -> Result<(SpiffeId, Response<Body>), Error> {
        let authority = authority?;
        if req.method() == Method::CONNECT {
            return Err(Error::BadHost(format!(
                "{authority}: CONNECT tunnelling is not supported yet"
            )));
        }
        let Some(certified) = self.certs.borrow().clone() else {
            return Err(Error::NotReady("no certificate yet"));
        };
        let target = {
            let view = self.view.borrow().clone();
            if view.snapshot.version == 0 {
                return Err(Error::NotReady("no discovery view yet"));
            }
            view.route(&authority)?
        };
        access.service = target.service.to_string();
        access.endpoint = target.endpoint.address.to_string();
        let tls = certified
            .client_config(&target.identity)
            .map_err(|e| Error::Upstream(Box::new(e)))?;
        let mut sender = self
            .pool
            .get(
                target.endpoint.address,
                &target.identity,
                tls,
                &self.metrics,
            )
            .await?;

        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(http::header::HOST);
        // Only the inbound proxy may state who the caller is.
        parts.headers.remove(&XFCC);
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|e| Error::BadHost(e.to_string()))?;
        parts.version = http::Version::HTTP_2;
        let upstream = Request::from_parts(parts, body.boxed_unsync());

        let resp = tokio::time::timeout(self.request_timeout, sender.send_request(upstream))
            .await
            .map_err(|_| Error::Timeout(self.request_timeout))?
            .map_err(|e| Error::Upstream(Box::new(e)))?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = http::Version::HTTP_11;
        Ok((
            target.identity,
            Response::from_parts(parts, body.boxed_unsync()),
        ))
    }
}

/// The request's authority: the absolute-form URI's, else the Host header.
fn authority_of<B>(req: &Request<B>) -> Result<http::uri::Authority, Error> {
    if let Some(a) = req.uri().authority() {
        return Ok(a.clone());
    }
    let host = req.headers().get(http::header::HOST).ok_or(Error::NoHost)?;
    let host = host
        .to_str()
        .map_err(|_| Error::BadHost(String::from_utf8_lossy(host.as_bytes()).into_owned()))?;
    host.parse().map_err(|_| Error::BadHost(host.to_owned()))
}

// === impl Pool ===

impl Pool {
    async fn get(
        &self,
        addr: SocketAddr,
        id: &SpiffeId,
        tls: Arc<rustls::ClientConfig>,
        metrics: &Metrics,
    ) -> Result<http2::SendRequest<Body>, Error> {
        let key = (addr, id.clone());
        {
            let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = conns.get(&key).filter(|s| !s.is_closed()) {
                return Ok(s.clone());
            }
        }
        let connect = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from("trellis-peer")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            TlsConnector::from(tls).connect(name, tcp).await
        };
        let tls_stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                if source.kind() == std::io::ErrorKind::InvalidData {
                    metrics
                        .tls_failures
                        .get_or_create(&DirectionLabels {
                            direction: "outbound",
                        })
                        .inc();
                }
                return Err(Error::Connect { addr, source });
            }
            Err(_) => {
                let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                return Err(Error::Connect { addr, source });
            }
        };
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(tls_stream))
            .await
            .map_err(|e| Error::Upstream(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(%error, %addr, "peer connection ended");
            }
        });
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|_, s| !s.is_closed());
        conns.insert(key, sender.clone());
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_comes_from_absolute_uri_then_host() {
        let r = Request::get("http://web.demo:8080/x")
            .header("host", "other")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&r).unwrap().as_str(), "web.demo:8080");
        let r = Request::get("/x")
            .header("host", "web.demo")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&r).unwrap().as_str(), "web.demo");
        let r = Request::get("/x").body(()).unwrap();
        assert!(matches!(authority_of(&r), Err(Error::NoHost)));
        let r = Request::get("/x")
            .header("host", "bad host")
            .body(())
            .unwrap();
        assert!(matches!(authority_of(&r), Err(Error::BadHost(_))));
    }
}
