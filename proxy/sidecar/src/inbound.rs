//! Mesh -> app. Terminates mTLS (client certificate required, verified against the trust
//! bundle with exactly one SPIFFE ID in the trust domain), authorizes the peer, then each
//! request and tunnel against the authorization policies of the current view, and
//! forwards what is allowed to the local app (HTTP/1.1 or HTTP/2, as the client spoke)
//! with the peer's identity in `x-forwarded-client-cert`.
//!
//! ```text
//! mTLS accept -> peer identity -> trust domain (pure) -> http2 server
//!   -> per request / CONNECT: authorize (pure, trellis_api::authz) -> app | 403
//! ```
//!
//! The policies are read from the view per request, so a pushed change applies to the
//! next request, on connections already open too. Nothing of a refused request reaches
//! the app: no connection is opened to it.

mod h1_pool;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HOST, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use trellis_api::authz::{
    Decision, HttpRequest, Request as AuthzRequest, Verdict as PolicyVerdict,
};
use trellis_identity::SpiffeId;

use crate::config::Mode;
use crate::error::Error;
use crate::http::{
    Access, Body, BodyError, ORIG_PROTO, TunnelAccess, XFCC, addr_text, error_response,
    strip_hop_by_hop,
};
use crate::identity::Certified;
use crate::metrics::{DirectionLabels, Metrics};
use crate::outbound::route::View;
use crate::peer::PeerBody;
use crate::telemetry::{
    DST_SERVICE, DST_WORKLOAD, HttpLabels, Local, Pending, SRC_WORKLOAD, method_label,
};
use crate::trace::{attr, int_attr};

/// How long the TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared state of the inbound side.
pub struct Inbound {
    /// Our identity.
    pub me: SpiffeId,
    /// The local app (explicit mode); in transparent mode the app port is the one the
    /// peer originally dialled.
    pub app: SocketAddr,
    /// Explicit or transparent.
    pub mode: Mode,
    /// Current certificate.
    pub certs: watch::Receiver<Option<Arc<Certified>>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// The discovery view: its authorizer decides on every request and tunnel.
    pub view: watch::Receiver<Arc<View>>,
    /// HTTP/1.1 connections to the app (see [`h1_pool`]).
    app_h1: Arc<h1_pool::H1Pool>,
    /// HTTP/2 (prior knowledge) connections to the app, for clients that spoke HTTP/2
    /// (gRPC), keyed by app address so the request keeps the client's `:authority`.
    app_h2: AppH2Pool,
    limits: crate::transport::Limits,
}

/// The authorization decision for a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it.
    Allow,
    /// Refuse it, with the reason.
    Deny(String),
}

/// Decides whether `peer` may talk to `me` at all, per connection. Pure. Any identity of
/// our trust domain (the TLS verifier already enforced that); authorization policies then
/// decide per request ([`trellis_api::authz::Authorizer`]).
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
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: SpiffeId,
        app: SocketAddr,
        mode: Mode,
        certs: watch::Receiver<Option<Arc<Certified>>>,
        view: watch::Receiver<Arc<View>>,
        metrics: Metrics,
        request_timeout: Duration,
        limits: crate::transport::Limits,
    ) -> Self {
        Self {
            me,
            app,
            mode,
            app_h2: AppH2Pool::default(),
            certs,
            view,
            metrics,
            request_timeout,
            app_h1: Arc::default(),
            limits,
        }
    }

    /// Accepts peer connections until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) {
        // App connections nobody used for a minute are closed.
        let pool = self.app_h1.clone();
        crate::transport::reap_every_30s(shutdown.clone(), move || {
            pool.reap(Duration::from_secs(60));
        });
        let stop = shutdown.clone();
        let listener = crate::transport::Listener::new(listener, &self.limits, &self.metrics);
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
        let fail = |why: &str| {
            self.metrics
                .tls_failures
                .get_or_create(&DirectionLabels {
                    direction: "inbound",
                })
                .inc();
            warn!(%remote, reason = why, "mTLS handshake refused");
        };
        // Where the peer was connecting: in transparent mode that port is the app's.
        let app_ip = match self.mode {
            Mode::Explicit => None,
            Mode::Transparent => match crate::capture::original_dst(&tcp) {
                Ok(orig) => Some(orig),
                Err(error) => {
                    warn!(%remote, %error, "no original destination on a captured inbound connection");
                    return;
                }
            },
        };
        // Strict mTLS: a client that does not even start TLS is refused before any byte
        // reaches the app.
        let mut first = [0u8; 1];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == 0x16 => {}
            Ok(Ok(_)) => return fail("plaintext client on the mTLS port"),
            _ => return,
        }
        // Read the certificate per connection so a rotation applies to the next one.
        let Some(certified) = self.certs.borrow().clone() else {
            debug!(%remote, "refusing connection: no certificate yet");
            return;
        };
        let acceptor = TlsAcceptor::from(certified.server.clone());
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => return fail(&error.to_string()),
            Err(_) => return fail("handshake timed out"),
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
        // The peer's label values and the XFCC header the app gets, once per connection
        // rather than per request.
        let Ok(xfcc) = HeaderValue::from_str(&format!("By={};URI={}", self.me, peer)) else {
            // Unreachable: SPIFFE ids are URI characters, all valid in a header value.
            warn!(%remote, %peer, "refusing connection: its identity cannot be written as XFCC");
            return;
        };
        let peer = Arc::new((Local::peer(&peer), peer, xfcc));
        let this = self.clone();
        let handle = move |req| {
            let this = this.clone();
            let peer = peer.clone();
            async move { this.handle(req, &peer.1, &peer.0, &peer.2, app_ip).await }
        };
        crate::peer::server::serve(tls, handle, &self.limits, &shutdown, remote, "inbound").await;
    }

    /// The app address for a request or tunnel: explicit mode's `--app`; in transparent
    /// mode the loopback address of the family the peer dialled, on `port` (the peer's
    /// original port, or the tunnel's). Never another host.
    fn app_addr(&self, orig: Option<SocketAddr>, port: Option<u16>) -> SocketAddr {
        match orig {
            None => self.app,
            Some(o) => {
                let ip: std::net::IpAddr = if o.is_ipv6() {
                    std::net::Ipv6Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv4Addr::LOCALHOST.into()
                };
                SocketAddr::new(ip, port.unwrap_or(o.port()))
            }
        }
    }

    /// Forwards one request (or opens one tunnel) from `peer` to the app.
    async fn handle(
        &self,
        req: Request<PeerBody>,
        peer: &SpiffeId,
        peer_labels: &Local,
        xfcc: &HeaderValue,
        orig: Option<SocketAddr>,
    ) -> Response<Body> {
        if req.method() == http::Method::CONNECT {
            // Boxed: tunnels are rare and their future is large; see Pool::get.
            return Box::pin(self.tunnel(req, peer, orig)).await;
        }
        let start = Instant::now();
        let m = &self.metrics;
        let (service_name, service_namespace) =
            m.claimed.claimed_service(req.headers().get(&DST_SERVICE));
        let labels = HttpLabels {
            http_request_method: method_label(req.method()),
            http_response_status_code: 0,
            rpc_grpc_status_code: None,
            source_workload: m.claimed.claimed(req.headers().get(&SRC_WORKLOAD)),
            source_namespace: peer_labels.namespace.clone(),
            source_principal: peer_labels.principal.clone(),
            destination_workload: m.local.workload.clone(),
            destination_namespace: m.local.namespace.clone(),
            destination_principal: m.local.principal.clone(),
            destination_service_name: service_name,
            destination_service_namespace: service_namespace,
            route_namespace: crate::telemetry::none(),
            route_name: crate::telemetry::none(),
            connection_security_policy: "mutual_tls",
        };
        let h2 = req
            .headers()
            .get(&ORIG_PROTO)
            .is_some_and(|v| v == "HTTP/2");
        let parent = crate::trace::extract(req.headers());
        let tap = || crate::tap::TapStart {
            direction: "inbound",
            authority: req
                .uri()
                .authority()
                .map(ToString::to_string)
                .or_else(|| Some(req.headers().get(HOST)?.to_str().ok()?.to_owned()))
                .unwrap_or_default(),
            path: req.uri().path().to_owned(),
            method: req.method().to_string(),
        };
        let attributes = || {
            // The authority the client used (h2 `:authority`, else Host).
            let authority: Option<http::uri::Authority> = req
                .uri()
                .authority()
                .cloned()
                .or_else(|| req.headers().get(HOST)?.to_str().ok()?.parse().ok());
            let (host, port) = authority
                .as_ref()
                .map(|a| (a.host(), a.port_u16().unwrap_or(80)))
                .unwrap_or_default();
            vec![
                attr("http.request.method", req.method().as_str()),
                attr("url.path", req.uri().path()),
                attr("url.scheme", "http"),
                attr("server.address", host),
                int_attr("server.port", i64::from(port)),
                attr("network.protocol.version", if h2 { "2" } else { "1.1" }),
                attr("trellis.source.principal", peer.as_str()),
            ]
        };
        let pending = Pending::new(m, labels, start, parent.as_ref(), true, attributes, tap);
        let app = self.app_addr(orig, None);
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let access = Access {
            direction: "inbound",
            protocol: if h2 { "HTTP/2" } else { "HTTP/1.1" },
            src: peer.as_str(),
            dst: self.me.as_str(),
            service: "-".into(),
            route: "-".into(),
            endpoint: addr_text(app),
            method: &method,
            authority: req
                .uri()
                .authority()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default(),
            path: &path,
            trace_id: pending.trace.trace_id,
            start,
        };
        let decision = self.authorize_request(peer, app.port(), Some((&method, &path)));
        let (resp, err) = match decision {
            Some(Decision {
                verdict: PolicyVerdict::Deny(denial),
                ..
            }) => {
                debug!(%peer, %method, %path, ?denial, "request refused by authorization policy");
                (
                    crate::authz::denied(&denial, req.headers()),
                    Some(Error::Denied(denial)),
                )
            }
            allowed => {
                // The app gets the path that was authorized.
                let path = allowed.and_then(|d| d.path);
                match self.forward(req, xfcc, app, h2, path, &pending).await {
                    Ok(r) => (r, None),
                    Err(e) => (error_response(&e), Some(e)),
                }
            }
        };
        let line = access.line(resp.status(), err.as_ref());
        let (mut parts, body) = resp.into_parts();
        // Overwritten: the app cannot speak for this proxy.
        parts.headers.insert(&DST_WORKLOAD, m.local.header.clone());
        let body = pending.observe(&m.http_server, &mut parts, body, line);
        Response::from_parts(parts, body.boxed_unsync())
    }

    async fn tunnel(
        &self,
        req: Request<PeerBody>,
        peer: &SpiffeId,
        orig: Option<SocketAddr>,
    ) -> Response<Body> {
        let port = req.uri().port_u16();
        let app = self.app_addr(orig, port);
        let mut log = TunnelAccess::new("inbound", "tunnel", peer.as_str(), app);
        log.dst = self.me.to_string();
        log.endpoint = app.to_string();
        let metrics = self.metrics.clone();
        let start = Instant::now();
        // Before connecting to the app: a refused tunnel never reaches it.
        if let Some(Decision {
            verdict: PolicyVerdict::Deny(denial),
            ..
        }) = self.authorize_request(peer, app.port(), None)
        {
            debug!(%peer, %app, ?denial, "tunnel refused by authorization policy");
            log.finish(start, Err(Error::Denied(denial)), &metrics);
            return crate::authz::forbidden();
        }
        match crate::tunnel::accept(req, app, move |r| {
            log.finish(start, r.map_err(|e| Error::Upstream(Box::new(e))), &metrics);
        })
        .await
        {
            Ok(resp) => resp,
            Err(e) => {
                warn!(%peer, %app, error = %e, "tunnel to the app failed");
                error_response(&e)
            }
        }
    }

    /// The authorization policies' decision on a request from `peer` to the app's `port`
    /// (`http`: its method and path; `None` for a tunnel), counted and logged; `None`
    /// when no policy applies to it (allowed: nothing to decide, nothing counted).
    fn authorize_request(
        &self,
        peer: &SpiffeId,
        port: u16,
        http: Option<(&http::Method, &str)>,
    ) -> Option<Decision> {
        let decision = {
            // Decided under the view's read lock: a pure computation, no await.
            let view = self.view.borrow();
            if view.authz.is_empty() {
                return None;
            }
            view.authz.authorize(&AuthzRequest {
                principal: peer.as_str(),
                namespace: peer.namespace(),
                port,
                http: http.map(|(method, path)| HttpRequest {
                    method: method.as_str(),
                    path,
                }),
            })?
        };
        let authz = &self.metrics.authz;
        match &http {
            Some((method, path)) => {
                authz.record(&decision, peer.as_str(), &format_args!("{method} {path}"));
            }
            None => authz.record(
                &decision,
                peer.as_str(),
                &format_args!("tunnel to port {port}"),
            ),
        }
        Some(decision)
    }

    async fn forward(
        &self,
        req: Request<PeerBody>,
        xfcc: &HeaderValue,
        app: SocketAddr,
        h2: bool,
        path: Option<String>,
        pending: &Pending,
    ) -> Result<Response<Body>, Error> {
        let (mut parts, body) = req.into_parts();
        if let Some(path) = path {
            set_path(&mut parts.uri, &path)?;
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(&ORIG_PROTO);
        parts.headers.remove(&SRC_WORKLOAD);
        parts.headers.remove(&DST_SERVICE);
        pending.inject(&mut parts.headers);
        if !h2 && let Some(a) = parts.uri.authority() {
            let host =
                HeaderValue::from_str(a.as_str()).map_err(|_| Error::BadHost(a.to_string()))?;
            parts.headers.insert(HOST, host);
        }
        parts.headers.insert(&XFCC, xfcc.clone());
        parts.version = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        let req = Request::from_parts(parts, pending.count(body));
        let send = async {
            if h2 {
                let resp = self.app_h2.send(app, req).await?;
                Ok(resp.map(|b| b.map_err(BodyError::from).boxed_unsync()))
            } else {
                send_h1(&self.app_h1, app, req).await
            }
        };
        let mut resp = tokio::time::timeout(self.request_timeout, send)
            .await
            .map_err(|_| Error::Timeout(self.request_timeout))??;
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp)
    }
}

/// Replaces `uri`'s path with `path` (normalized by the authorizer), keeping its query,
/// scheme and authority.
fn set_path(uri: &mut Uri, path: &str) -> Result<(), Error> {
    let target = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = std::mem::take(uri).into_parts();
    // Cannot fail for a path the authorizer produced (only valid characters survive
    // normalization); refused as a bad path if it ever did, rather than sent unchanged.
    let refuse = || {
        Error::Denied(trellis_api::authz::Denial::BadPath(
            trellis_api::authz::PathError::NotOriginForm(path.to_owned()),
        ))
    };
    parts.path_and_query = Some(target.parse().map_err(|_| refuse())?);
    *uri = Uri::from_parts(parts).map_err(|_| refuse())?;
    Ok(())
}

/// Sends an HTTP/1.1 request to the app at `app`, in origin form (the client's
/// authority already travels in the Host header).
async fn send_h1(
    pool: &Arc<h1_pool::H1Pool>,
    app: SocketAddr,
    mut req: Request<Body>,
) -> Result<Response<Body>, Error> {
    let target = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(target);
    pool.send(app, req).await
}

/// HTTP/2 connections to the local app. hyper-util's pooled client dials the URI's
/// authority, which for HTTP/2 is also the `:authority` the app sees; dialling here
/// instead lets the request keep the client's own (RFC 9113: a Host header that
/// disagrees with `:authority` is malformed, and strict servers answer 400).
#[derive(Default)]
struct AppH2Pool {
    conns: std::sync::Mutex<
        std::collections::HashMap<SocketAddr, hyper::client::conn::http2::SendRequest<Body>>,
    >,
}

// === impl AppH2Pool ===

impl AppH2Pool {
    /// A new connection to the app, pooled. Called boxed: the handshake future is large
    /// and rare, and inline it would grow every request's future.
    async fn connect(
        &self,
        app: SocketAddr,
    ) -> Result<hyper::client::conn::http2::SendRequest<Body>, Error> {
        let tcp = h1_pool::dial(app).await?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| Error::Upstream(Box::new(e)))?;
        h1_pool::drive_app_conn(conn, app);
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|_, s| !s.is_closed());
        conns.insert(app, sender.clone());
        Ok(sender)
    }

    async fn send(&self, app: SocketAddr, req: Request<Body>) -> Result<Response<Incoming>, Error> {
        let pooled = {
            let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.get(&app).filter(|s| !s.is_closed()).cloned()
        };
        let mut sender = match pooled {
            Some(s) => s,
            None => Box::pin(self.connect(app)).await?,
        };
        sender
            .send_request(req)
            .await
            .map_err(|e| Error::Upstream(Box::new(e)))
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
