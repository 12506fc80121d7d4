//! App -> mesh.
//!
//! Explicit mode: the app sends HTTP/1.1 to the outbound listener as to an HTTP proxy;
//! the authority names the service. Transparent mode: iptables sends every outbound TCP
//! connection here; its original destination says where it was going, protocol detection
//! says what it speaks:
//!
//! ```text
//! accept -> original dst -> mesh service / endpoint?  -- no --> passthrough TCP to it
//!                 | yes
//!                 v
//!           detect (peek) -> HTTP/1, HTTP/2: per request: pick endpoint (P2C peak-EWMA)
//!                                            -> pooled mTLS HTTP/2 to the peer proxy
//!                         -> TLS, upgrade, opaque, server-first: CONNECT tunnel on the
//!                                            same pooled connection
//! ```

pub mod balance;
pub mod pool;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};
use trellis_identity::SpiffeId;

use crate::config::Mode;
use crate::detect::Protocol;
use crate::error::Error;
use crate::http::{
    Access, Body, BodyError, ORIG_PROTO, TunnelAccess, XFCC, addr_text, error_response, joined,
    strip_hop_by_hop,
};
use crate::identity::Certified;
use crate::metrics::Metrics;
use crate::telemetry::{
    DST_SERVICE, DST_WORKLOAD, HttpLabels, Pending, SRC_WORKLOAD, method_label, none, unknown,
};
use crate::trace::{attr, int_attr};
use balance::Balancer;
use pool::Pool;
use route::{Target, View};

/// Settings of the outbound side.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Explicit or transparent.
    pub mode: Mode,
    /// Per-request timeout (to response headers).
    pub request_timeout: Duration,
    /// Protocol detection timeout.
    pub detect_timeout: Duration,
    /// Ports forwarded as opaque TCP without detection.
    pub opaque_ports: Vec<u16>,
    /// The proxy's own listener ports: a captured connection to one is a loop.
    pub own_ports: Vec<u16>,
    /// Connection and HTTP limits.
    pub limits: crate::transport::Limits,
}

/// Shared state of the outbound side.
pub struct Outbound {
    me: SpiffeId,
    certs: watch::Receiver<Option<Arc<Certified>>>,
    view: watch::Receiver<Arc<View>>,
    metrics: Metrics,
    settings: Settings,
    pool: Pool,
    balancer: Balancer,
}

/// How the requests of one app connection are routed.
#[derive(Debug, Clone)]
enum Routing {
    /// By each request's authority (explicit mode).
    ByHost,
    /// Every request to the connection's original destination (transparent mode).
    Fixed(Box<Target>),
}

/// The app-side HTTP version, carried to the peer so it speaks the same to its app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppProto {
    Http1,
    Http2,
}

// === impl Outbound ===

impl Outbound {
    /// Builds the outbound side.
    pub fn new(
        me: SpiffeId,
        certs: watch::Receiver<Option<Arc<Certified>>>,
        view: watch::Receiver<Arc<View>>,
        metrics: Metrics,
        settings: Settings,
    ) -> Self {
        Self {
            me,
            certs,
            view,
            metrics,
            settings,
            pool: Pool::default(),
            balancer: Balancer::new(),
        }
    }

    /// Accepts app connections until `shutdown`; connections finish within the drain.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) {
        // Peer connections nobody used for a while are closed.
        let reaper = self.clone();
        crate::transport::reap_every_30s(shutdown.clone(), move || {
            reaper.pool.reap(Duration::from_secs(90));
        });
        let stop = shutdown.clone();
        let listener =
            crate::transport::Listener::new(listener, &self.settings.limits, &self.metrics);
        crate::transport::accept_loop(listener, "outbound", stop, tasks, move |tcp, remote| {
            let this = self.clone();
            let shutdown = shutdown.clone();
            async move {
                match this.settings.mode {
                    Mode::Explicit => {
                        // HTTP/2 with prior knowledge (gRPC clients) or HTTP/1.1.
                        let timeout = this.settings.detect_timeout;
                        let proto = match crate::detect::detect(&tcp, timeout).await {
                            Ok(Protocol::Http2) => AppProto::Http2,
                            Ok(_) => AppProto::Http1,
                            Err(_) => return,
                        };
                        this.serve_http(tcp, remote, proto, Routing::ByHost, &shutdown)
                            .await
                    }
                    Mode::Transparent => this.transparent(tcp, remote, &shutdown).await,
                }
            }
        })
        .await;
    }

    /// One captured connection: where was it going, and what does it speak?
    async fn transparent(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        shutdown: &CancellationToken,
    ) {
        let orig = match crate::capture::original_dst(&tcp) {
            Ok(a) => a,
            Err(error) => {
                warn!(%remote, %error, "no original destination: is the connection captured by `trellis-proxy init`?");
                return;
            }
        };
        if self.is_loop(orig) {
            warn!(%remote, %orig, "refusing a connection addressed to the proxy itself (capture loop)");
            return;
        }
        let target = self.view.borrow().lookup(orig);
        let opaque = self.settings.opaque_ports.contains(&orig.port())
            || target
                .as_ref()
                .is_some_and(|t| t.protocol == trellis_api::Protocol::Tcp);
        let proto = if opaque {
            Protocol::Opaque
        } else {
            match crate::detect::detect(&tcp, self.settings.detect_timeout).await {
                Ok(p) => p,
                Err(error) => {
                    debug!(%remote, %error, "connection failed during protocol detection");
                    return;
                }
            }
        };
        match (proto, target) {
            (Protocol::Http1 { upgrade: Some(u) }, Some(t)) if u != "h2c" => {
                // WebSocket and other upgrades: the bytes go through as they are and the
                // server-side app performs the upgrade itself.
                self.tunnel(tcp, orig, t, &format!("upgrade:{u}")).await;
            }
            (Protocol::Http1 { .. }, Some(t)) => {
                // An h2c upgrade is served as plain HTTP/1.1: the Upgrade header is
                // hop-by-hop and dropped, so the server never switches (smuggling history).
                self.serve_http(
                    tcp,
                    remote,
                    AppProto::Http1,
                    Routing::Fixed(Box::new(t)),
                    shutdown,
                )
                .await;
            }
            (Protocol::Http2, Some(t)) => {
                self.serve_http(
                    tcp,
                    remote,
                    AppProto::Http2,
                    Routing::Fixed(Box::new(t)),
                    shutdown,
                )
                .await
            }
            (Protocol::Tls { .. }, Some(t)) => self.tunnel(tcp, orig, t, "tls").await,
            (Protocol::Opaque, Some(t)) => self.tunnel(tcp, orig, t, "tcp").await,
            (Protocol::Tls { sni: Some(sni) }, None) => {
                let by_name = self.view.borrow().lookup_sni(&sni, orig.port());
                match by_name {
                    Some(t) => self.tunnel(tcp, orig, t, "tls").await,
                    None => self.passthrough(tcp, orig, "tls").await,
                }
            }
            (p, None) => self.passthrough(tcp, orig, protocol_label(&p)).await,
        }
    }

    /// A captured connection to one of our own ports would come straight back here.
    fn is_loop(&self, orig: SocketAddr) -> bool {
        self.settings.own_ports.contains(&orig.port())
            && (orig.ip().is_loopback() || orig.ip().is_unspecified())
    }

    /// Serves HTTP on an app connection, forwarding each request into the mesh.
    async fn serve_http(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        proto: AppProto,
        routing: Routing,
        shutdown: &CancellationToken,
    ) {
        let limits = self.settings.limits.clone();
        let routing = Arc::new(routing);
        let svc = hyper::service::service_fn(move |req| {
            let this = self.clone();
            let routing = routing.clone();
            // Boxed once here: the request future is large, and hyper and the idle
            // tracker would otherwise move it whole per request.
            Box::pin(async move {
                Ok::<_, std::convert::Infallible>(this.handle(req, &routing, proto).await)
            })
        });
        match proto {
            AppProto::Http1 => {
                crate::transport::serve_http1(
                    TokioIo::new(tcp),
                    svc,
                    &limits,
                    shutdown,
                    remote,
                    "outbound",
                )
                .await
            }
            AppProto::Http2 => {
                crate::transport::serve_http2(
                    TokioIo::new(tcp),
                    svc,
                    &limits,
                    shutdown,
                    remote,
                    "outbound",
                )
                .await
            }
        }
    }

    /// Handles one request from the app.
    async fn handle(
        &self,
        req: Request<Incoming>,
        routing: &Routing,
        proto: AppProto,
    ) -> Response<Body> {
        let start = Instant::now();
        let m = &self.metrics;
        let labels = HttpLabels {
            http_request_method: method_label(req.method()),
            http_response_status_code: 0,
            rpc_grpc_status_code: None,
            source_workload: m.local.workload.clone(),
            source_namespace: m.local.namespace.clone(),
            source_principal: m.local.principal.clone(),
            destination_workload: unknown(),
            destination_namespace: unknown(),
            destination_principal: unknown(),
            destination_service_name: unknown(),
            destination_service_namespace: unknown(),
            route_namespace: none(),
            route_name: none(),
            connection_security_policy: "mutual_tls",
        };
        let authority = authority_of(&req);
        let parent = crate::trace::extract(req.headers());
        let tap = || crate::tap::TapStart {
            direction: "outbound",
            authority: authority
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            path: req.uri().path().to_owned(),
            method: req.method().to_string(),
        };
        let attributes = || {
            let (host, port) = authority
                .as_ref()
                .map(|a| (a.host(), a.port_u16().unwrap_or(80)))
                .unwrap_or_default();
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            vec![
                attr("http.request.method", req.method().as_str()),
                attr("url.full", format!("http://{host}:{port}{target}")),
                attr("server.address", host),
                int_attr("server.port", i64::from(port)),
                attr(
                    "network.protocol.version",
                    if proto == AppProto::Http2 { "2" } else { "1.1" },
                ),
            ]
        };
        let mut pending = Pending::new(m, labels, start, parent.as_ref(), false, attributes, tap);
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let mut access = Access {
            direction: "outbound",
            protocol: proto.label(),
            src: self.me.as_str(),
            dst: "-",
            service: "-".into(),
            route: "-".into(),
            endpoint: "-".into(),
            method: &method,
            authority: authority
                .as_ref()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default(),
            path: &path,
            trace_id: pending.trace.trace_id,
            start,
        };
        let result = self
            .forward(req, authority, routing, proto, &mut access, &mut pending)
            .await;
        let (dst, resp, err) = match result {
            Ok((dst, resp)) => (Some(dst), resp, None),
            Err(e) => (None, error_response(&e), Some(e)),
        };
        access.dst = dst.as_ref().map_or("-", SpiffeId::as_str);
        let line = access.line(resp.status(), err.as_ref());
        let (mut parts, body) = resp.into_parts();
        // The peer's answer, for the metrics only: the app never sees it.
        if let Some(w) = parts.headers.remove(&DST_WORKLOAD) {
            pending.labels.destination_workload = m.claimed.claimed(Some(&w));
        }
        let body = pending.observe(&m.http_client, &mut parts, body, line);
        Response::from_parts(parts, body.boxed_unsync())
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        authority: Result<http::uri::Authority, Error>,
        routing: &Routing,
        proto: AppProto,
        access: &mut Access<'_>,
        pending: &mut Pending,
    ) -> Result<(SpiffeId, Response<Body>), Error> {
        if req.method() == Method::CONNECT {
            return Err(Error::BadHost(
                "CONNECT tunnelling through the proxy is not supported".into(),
            ));
        }
        let view = self.view.borrow().clone();
        // Transparent connections route every request to the same target: borrow it
        // rather than cloning its endpoint list per request.
        let mut target: std::borrow::Cow<'_, Target> = match routing {
            Routing::Fixed(t) => std::borrow::Cow::Borrowed(&**t),
            Routing::ByHost => {
                let authority = authority
                    .as_ref()
                    .map_err(|e| Error::BadHost(e.to_string()))?;
                if view.snapshot.version == 0 {
                    return Err(Error::NotReady("no discovery view yet"));
                }
                std::borrow::Cow::Owned(view.route(authority)?)
            }
        };
        let mut timeout = self.settings.request_timeout;
        if let Some(routed) = route_request(&view, &target, &req)? {
            let known = &self.metrics.known;
            pending.labels.route_namespace = known.known(&routed.route.namespace);
            pending.labels.route_name = known.known(&routed.route.name);
            access.route = routed.route.key();
            if let Some(span) = pending.span.as_mut() {
                span.push(attr("trellis.route", access.route.clone()));
            }
            timeout = routed.timeout.unwrap_or(timeout);
            target = std::borrow::Cow::Owned(routed.target?);
        }
        // Transparent mode keeps whatever authority the app used (or the original
        // destination): the peer's app sees the request as it was sent.
        let authority = match authority {
            Ok(a) => a,
            Err(_) if matches!(routing, Routing::Fixed(_)) => target_authority(&target),
            Err(e) => return Err(e),
        };
        access.service = joined(&target.service.namespace, '/', &target.service.name);
        let known = &self.metrics.known;
        let labels = &mut pending.labels;
        labels.destination_service_name = known.known(&target.service.name);
        labels.destination_service_namespace = known.known(&target.service.namespace);
        let (sender, endpoint, identity) = self.connect(&view, &target).await?;
        access.endpoint = addr_text(endpoint);
        labels.destination_principal = known.known(identity.as_str());
        labels.destination_namespace = known.known(identity.namespace());
        if let Some(span) = pending.span.as_mut() {
            span.push(attr("network.peer.address", endpoint.to_string()));
            span.push(attr(
                "trellis.destination.service",
                target.service.to_string(),
            ));
            span.push(attr("trellis.destination.principal", identity.as_str()));
        }

        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(http::header::HOST);
        // Only the inbound proxy may state who the caller is.
        parts.headers.remove(&XFCC);
        parts
            .headers
            .insert(&ORIG_PROTO, HeaderValue::from_static(proto.label()));
        // What the peer cannot learn from our certificate, for its metrics (overwriting
        // whatever the app sent under these names).
        parts
            .headers
            .insert(&SRC_WORKLOAD, self.metrics.local.header.clone());
        pending.inject(&mut parts.headers);
        let service = joined(&target.service.name, '.', &target.service.namespace);
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(service)) {
            parts.headers.insert(&DST_SERVICE, v);
        }
        // The app's path and query as they came (no copy, no re-parse).
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(authority);
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = Uri::from_parts(uri).map_err(|e| Error::BadHost(e.to_string()))?;
        parts.version = http::Version::HTTP_2;
        let upstream = Request::from_parts(parts, pending.count(body));

        let in_flight = self.balancer.start(endpoint);
        let resp = tokio::time::timeout(timeout, sender.send(upstream))
            .await
            .map_err(|_| Error::Timeout(timeout))??;
        in_flight.finish();
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = match proto {
            AppProto::Http1 => http::Version::HTTP_11,
            AppProto::Http2 => http::Version::HTTP_2,
        };
        Ok((
            identity,
            Response::from_parts(parts, body.map_err(BodyError::from).boxed_unsync()),
        ))
    }

    /// Picks an endpoint for `target` among `view`'s and returns a pooled connection to it.
    async fn connect(
        &self,
        view: &View,
        target: &Target,
    ) -> Result<(crate::peer::client::PeerConn, SocketAddr, SpiffeId), Error> {
        let Some(certified) = self.certs.borrow().clone() else {
            return Err(Error::NotReady("no certificate yet"));
        };
        // Borrowed, not cloned: an endpoint carries its identity, workload and labels.
        let endpoint = match &target.pinned {
            Some(e) => e,
            None => self
                .balancer
                .pick(view.endpoints(target))
                .ok_or_else(|| Error::NoEndpoints(target.service.to_string()))?,
        };
        let (sender, identity) = self.pool.get(endpoint, &certified, &self.metrics).await?;
        Ok((sender, endpoint.address, identity))
    }

    /// Carries a connection's bytes to a mesh endpoint in a CONNECT tunnel.
    async fn tunnel(&self, tcp: TcpStream, orig: SocketAddr, target: Target, protocol: &str) {
        let start = Instant::now();
        let mut log = TunnelAccess::new("outbound", protocol, self.me.as_str(), orig);
        log.service = target.service.to_string();
        let result = async {
            let view = self.view.borrow().clone();
            let (sender, endpoint, identity) = self.connect(&view, &target).await?;
            log.endpoint = endpoint.to_string();
            log.dst = identity.to_string();
            let tunnel = sender.tunnel(endpoint).await?;
            crate::tunnel::splice(tcp, tunnel)
                .await
                .map_err(|e| Error::Upstream(Box::new(e)))
        }
        .await;
        log.finish(start, result, &self.metrics);
    }

    /// Forwards a connection to a destination outside the mesh, untouched.
    async fn passthrough(&self, mut tcp: TcpStream, orig: SocketAddr, protocol: &str) {
        let start = Instant::now();
        let mut log = TunnelAccess::new("outbound", protocol, self.me.as_str(), orig);
        log.service = "passthrough".into();
        log.endpoint = orig.to_string();
        if self.view.borrow().snapshot.outbound == trellis_api::OutboundPolicy::RegistryOnly {
            // Dropping the connection closes it: the app sees a reset or EOF at once,
            // like Istio's BlackHoleCluster, and the access line says why.
            log.service = "blocked".into();
            log.finish(start, Err(Error::OutsideMesh(orig)), &self.metrics);
            return;
        }
        let result = async {
            // The proxy's own traffic (UID 1337) is not captured, so this goes straight out.
            let mut upstream = TcpStream::connect(orig)
                .await
                .map_err(|source| Error::Connect { addr: orig, source })?;
            let _ = upstream.set_nodelay(true);
            tokio::io::copy_bidirectional(&mut tcp, &mut upstream)
                .await
                .map_err(|e| Error::Upstream(Box::new(e)))
        }
        .await;
        log.finish(start, result, &self.metrics);
    }
}

// === impl AppProto ===

impl AppProto {
    fn label(self) -> &'static str {
        match self {
            AppProto::Http1 => "HTTP/1.1",
            AppProto::Http2 => "HTTP/2",
        }
    }
}

fn protocol_label(p: &Protocol) -> &'static str {
    match p {
        Protocol::Http1 { .. } => "http/1.1",
        Protocol::Http2 => "h2",
        Protocol::Tls { .. } => "tls",
        Protocol::Opaque => "tcp",
    }
}

/// An authority for a request that named none (HTTP/1.0 without Host): the service's
/// `<name>.<namespace>:<port>`.
/// The HTTPRoute rule and backend `req` follows, when routes attach to `target`.
///
/// Paths are matched in their normalized form (as authorization policies see them), so
/// `/./api` follows the `/api` rule; a path that cannot be normalized is matched as sent.
fn route_request<'v, B>(
    view: &'v View,
    target: &Target,
    req: &Request<B>,
) -> Result<Option<route::Routed<'v>>, Error> {
    if !view.routed(target) {
        return Ok(None);
    }
    let raw = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let path = trellis_api::authz::normalize_path(raw)
        .unwrap_or(std::borrow::Cow::Borrowed(req.uri().path()));
    let has_header = |name: &str, value: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .any(|v| v.as_bytes() == value.as_bytes())
    };
    let request = trellis_api::route::RouteRequest {
        method: req.method().as_str(),
        path: &path,
        query: req.uri().query().unwrap_or(""),
        has_header: &has_header,
    };
    view.apply_routes(target, &request, rand::random())
}

fn target_authority(t: &Target) -> http::uri::Authority {
    let host = format!("{}.{}", t.service.name, t.service.namespace);
    format!("{host}:{}", t.port)
        .parse()
        .unwrap_or_else(|_| http::uri::Authority::from_static("unknown"))
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
