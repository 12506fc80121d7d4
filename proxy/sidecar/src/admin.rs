//! The admin endpoints, on loopback only (enforced by the config): `/live`, `/ready`,
//! `/metrics` (Prometheus text) and `/config` (identity, certificate, trust bundle and
//! CA generation, discovery view, authorization policies and routes in JSON) are read-only and GET-only. The one action, `POST /shutdown` (drain and exit,
//! for Jobs without native sidecars), exists only when a token file is configured and
//! needs `Authorization: Bearer <token>`; so does `GET /tap`, the live request stream
//! (`trellis tap`, `trellis top`), which exists only with `--tap-token-file`.

use std::sync::Arc;
use std::time::SystemTime;

use http::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::http::{Body, full};
use crate::identity::Certified;
use crate::outbound::route::View;
use crate::transport::{Limits, Listener};

/// Connections the admin listener holds at once: a few probes and scrapers.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// What the admin endpoints read, and the drain they may start.
pub struct Admin {
    /// Workload name.
    pub workload: String,
    /// Current certificate.
    pub certs: watch::Receiver<Option<Arc<Certified>>>,
    /// Current view.
    pub view: watch::Receiver<Arc<View>>,
    /// Metrics registry.
    pub registry: Registry,
    /// The proxy's drain signal: cancelled means draining (`/ready` answers 503), and
    /// an authorized `POST /shutdown` cancels it, like SIGTERM.
    pub shutdown: CancellationToken,
    /// The bearer token `POST /shutdown` requires; `None` disables the endpoint.
    pub shutdown_token: Option<ShutdownToken>,
    /// The live request stream `GET /tap` serves.
    pub tap: Arc<crate::tap::Tap>,
    /// The bearer token `GET /tap` requires; `None` disables the endpoint.
    pub tap_token: Option<ShutdownToken>,
}

/// A secret that authorizes an admin action (`POST /shutdown`, `GET /tap`). Never printed.
#[derive(Clone)]
pub struct ShutdownToken(Vec<u8>);

/// What a listener of [`Admin`] answers.
#[derive(Debug, Clone, Copy)]
enum Routes {
    /// Everything (loopback only).
    Admin,
    /// `GET /metrics` only.
    MetricsOnly,
}

// === impl Admin ===

impl Admin {
    /// Ready once we hold a certificate and a discovery view, until the drain starts.
    pub fn is_ready(&self) -> Result<(), &'static str> {
        if self.shutdown.is_cancelled() {
            return Err("draining");
        }
        if self.certs.borrow().is_none() {
            return Err("no certificate yet");
        }
        if self.view.borrow().snapshot.version == 0 {
            return Err("no discovery view yet");
        }
        Ok(())
    }

    /// Serves until `stop`, each connection a task in `tasks`. `stop` is separate from
    /// the drain signal so probes and `/metrics` keep answering while the proxy drains.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) {
        self.serve_routes(listener, stop, tasks, Routes::Admin)
            .await;
    }

    /// Serves only `GET /metrics` (the `--metrics` listener, reachable from outside the
    /// pod): nothing that reveals the mesh (`/config`) or changes the proxy (`/shutdown`).
    pub async fn serve_metrics(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) {
        self.serve_routes(listener, stop, tasks, Routes::MetricsOnly)
            .await;
    }

    async fn serve_routes(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: CancellationToken,
        tasks: TaskTracker,
        routes: Routes,
    ) {
        let limits = Limits::default();
        let listener = Listener::from(listener).with_max_connections(MAX_ADMIN_CONNECTIONS);
        let accepting = stop.clone();
        crate::transport::accept_loop(listener, "admin", accepting, tasks, move |tcp, remote| {
            let this = self.clone();
            let (stop, limits) = (stop.clone(), limits.clone());
            async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move {
                        let resp = match routes {
                            Routes::Admin => this.handle(&req),
                            Routes::MetricsOnly => this.handle_metrics_only(&req),
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                crate::transport::serve_http1(
                    TokioIo::new(tcp),
                    svc,
                    &limits,
                    &stop,
                    remote,
                    "admin",
                )
                .await;
            }
        })
        .await;
    }

    fn handle_metrics_only<B>(&self, req: &Request<B>) -> Response<Body> {
        match (req.uri().path(), req.method()) {
            ("/metrics", &Method::GET) => self.metrics(),
            ("/metrics", _) => text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into()),
            _ => text(
                StatusCode::NOT_FOUND,
                "this listener serves /metrics only\n".into(),
            ),
        }
    }

    fn metrics(&self) -> Response<Body> {
        match crate::metrics::encode(&self.registry) {
            Ok(out) => {
                let mut r = text(StatusCode::OK, out);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        }
    }

    fn handle<B>(&self, req: &Request<B>) -> Response<Body> {
        if req.uri().path() == "/shutdown" {
            return self.shutdown(req);
        }
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        match req.uri().path() {
            "/tap" => self.tap(req),
            "/live" => text(StatusCode::OK, "live\n".into()),
            "/ready" => match self.is_ready() {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            "/metrics" => self.metrics(),
            "/config" => {
                let body = self.config_json();
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "endpoints: /live /ready /metrics /config /tap /shutdown\n".into(),
            ),
        }
    }

    /// `POST /shutdown`: 404 when not configured, 405 for other methods, 401 without the
    /// right bearer token, else 202 and the same drain as SIGTERM.
    fn shutdown<B>(&self, req: &Request<B>) -> Response<Body> {
        let Some(token) = &self.shutdown_token else {
            return text(
                StatusCode::NOT_FOUND,
                "/shutdown is disabled (no --shutdown-token-file)\n".into(),
            );
        };
        if req.method() != Method::POST {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n".into());
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            return r;
        }
        if let Some(refused) = bearer(req, token, "POST /shutdown") {
            return refused;
        }
        info!("POST /shutdown: draining");
        self.shutdown.cancel();
        text(StatusCode::ACCEPTED, "draining\n".into())
    }

    /// `GET /tap[?max=N]`: 404 when not configured, 401 without the right bearer token,
    /// 429 when [`crate::tap::MAX_SESSIONS`] are open; else 200 and one JSON line per
    /// finished request (`TapEvent`), a `{"dropped":N}` line when this session fell
    /// behind, until the client leaves or N events were sent.
    fn tap<B>(&self, req: &Request<B>) -> Response<Body> {
        use futures_util::StreamExt as _;
        use tokio::sync::broadcast::error::RecvError;

        let Some(token) = &self.tap_token else {
            return text(
                StatusCode::NOT_FOUND,
                "/tap is disabled (no --tap-token-file)\n".into(),
            );
        };
        if let Some(refused) = bearer(req, token, "GET /tap") {
            return refused;
        }
        let max = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("max=")))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        let Some(rx) = self.tap.subscribe() else {
            return text(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{} tap sessions are open already\n",
                    crate::tap::MAX_SESSIONS
                ),
            );
        };
        info!("tap session opened");
        let lines = futures_util::stream::unfold(rx, |mut rx| async move {
            let line = match rx.recv().await {
                Ok(event) => serde_json::to_string(&*event).ok()?,
                Err(RecvError::Lagged(n)) => format!("{{\"dropped\":{n}}}"),
                Err(RecvError::Closed) => return None,
            };
            Some((line, rx))
        })
        .take(max)
        .map(|mut line| {
            line.push('\n');
            Ok::<_, crate::http::BodyError>(hyper::body::Frame::data(bytes::Bytes::from(line)))
        });
        let mut r = Response::new(http_body_util::BodyExt::boxed_unsync(
            http_body_util::StreamBody::new(lines),
        ));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/x-ndjson"),
        );
        r
    }

    fn config_json(&self) -> String {
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let cert = self.certs.borrow().as_ref().map(|c| {
            serde_json::json!({
                "identity": c.svid.id().as_str(),
                "not_before_unix": unix(c.svid.not_before()),
                "not_after_unix": unix(c.svid.not_after()),
                "ca_generation": c.ca_generation,
                "trust_roots": c.bundle.len(),
                "trust_root_fingerprints": c
                    .bundle
                    .certs()
                    .iter()
                    .map(|r| trellis_api::fingerprint(r))
                    .collect::<Vec<_>>(),
            })
        });
        let view = self.view.borrow().clone();
        let services: Vec<_> = view.snapshot.services.values().collect();
        // Which of the pushed policies this workload enforces, and on which ports (`null`:
        // every port).
        let applied: Vec<_> = view
            .authz
            .applied()
            .into_iter()
            .map(|(policy, ports)| serde_json::json!({"policy": &*policy, "ports": ports}))
            .collect();
        let doc = serde_json::json!({
            "workload": self.workload,
            "ready": self.is_ready().is_ok(),
            "certificate": cert,
            "discovery": {
                "version": view.snapshot.version,
                "trust_domain": view.snapshot.trust_domain,
                // What the control plane pushed (roots, fingerprints, generation); the
                // certificate above shows the bundle in use.
                "trust": view.snapshot.trust,
                "outbound_traffic_policy": view.snapshot.outbound,
                "tracing": view.snapshot.tracing,
                "services": services,
                "authorization": {
                    "policies": view.snapshot.authorization,
                    "applied": applied,
                },
                // Every route pushed; which ones this proxy applies to which Service is
                // decided per request (consumer routes of its namespace first).
                "routes": view.snapshot.routes,
            },
        });
        serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

// === impl ShutdownToken ===

impl ShutdownToken {
    /// Reads the token file: its content without surrounding whitespace (a trailing
    /// newline from `echo` or a Secret mount is not part of the token). Empty is refused.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Self> {
        let raw = std::fs::read(path)?;
        let token = raw.trim_ascii();
        if token.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the token file is empty",
            ));
        }
        Ok(Self(token.to_vec()))
    }

    /// Compares in time that depends only on the token's length, never on how much of
    /// `presented` is right, so the token cannot be guessed byte by byte.
    fn matches(&self, presented: &[u8]) -> bool {
        let expected = &self.0;
        let mut diff = expected.len() ^ presented.len();
        for (i, e) in expected.iter().enumerate() {
            diff |= usize::from(e ^ presented.get(i).copied().unwrap_or(0));
        }
        std::hint::black_box(diff) == 0
    }
}

impl std::fmt::Debug for ShutdownToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShutdownToken(<redacted>)")
    }
}

/// `None` when `req` carries `Authorization: Bearer <token>`, else the 401 to answer.
fn bearer<B>(req: &Request<B>, token: &ShutdownToken, what: &str) -> Option<Response<Body>> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if presented.is_some_and(|p| token.matches(p)) {
        return None;
    }
    warn!("refused {what}: missing or wrong bearer token");
    let mut r = text(StatusCode::UNAUTHORIZED, "bearer token required\n".into());
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    Some(r)
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(token: Option<&str>) -> Admin {
        Admin {
            workload: "w".into(),
            certs: watch::channel(None).1,
            view: watch::channel(Arc::new(View::default())).1,
            registry: Registry::default(),
            shutdown: CancellationToken::new(),
            shutdown_token: token.map(|t| ShutdownToken(t.as_bytes().to_vec())),
            tap: Arc::default(),
            tap_token: token.map(|t| ShutdownToken(t.as_bytes().to_vec())),
        }
    }

    #[tokio::test]
    async fn tap_needs_its_token_caps_sessions_and_streams_events() {
        use http_body_util::BodyExt as _;
        assert_eq!(
            call(&admin(None), Method::GET, "/tap", None),
            StatusCode::NOT_FOUND
        );
        let a = admin(Some("s3cret"));
        assert_eq!(
            call(&a, Method::GET, "/tap", None),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            call(&a, Method::GET, "/tap", Some("Bearer nope")),
            StatusCode::UNAUTHORIZED
        );
        let req = |q: &str| {
            Request::get(format!("/tap{q}"))
                .header(header::AUTHORIZATION, "Bearer s3cret")
                .body(())
                .unwrap()
        };
        let sessions: Vec<_> = (0..crate::tap::MAX_SESSIONS)
            .map(|_| a.handle(&req("")))
            .collect();
        assert!(sessions.iter().all(|r| r.status() == StatusCode::OK));
        assert_eq!(a.handle(&req("")).status(), StatusCode::TOO_MANY_REQUESTS);
        drop(sessions);
        let resp = a.handle(&req("?max=2"));
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/x-ndjson");
        for path in ["/a", "/b", "/c"] {
            a.tap.publish(crate::tap::TapEvent {
                time: "t".into(),
                direction: "inbound",
                method: "GET".into(),
                authority: "web.demo".into(),
                path: path.into(),
                status: 200,
                grpc_status: None,
                duration_ms: 1.5,
                request_bytes: 0,
                response_bytes: 2,
                source_workload: "client".into(),
                source_principal: "spiffe://cluster.local/ns/demo/sa/client".into(),
                destination_workload: "web".into(),
                destination_principal: "spiffe://cluster.local/ns/demo/sa/web".into(),
                destination_service: "web.demo".into(),
                trace_id: "ab".repeat(16),
            });
        }
        // `max=2`: two lines, then the stream ends.
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let lines: Vec<serde_json::Value> = body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0]["path"], "/a");
        assert_eq!(lines[1]["path"], "/b");
        assert_eq!(lines[1]["destination_workload"], "web");
    }

    fn call(a: &Admin, method: Method, path: &str, auth: Option<&str>) -> StatusCode {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(v) = auth {
            req = req.header(header::AUTHORIZATION, v);
        }
        a.handle(&req.body(()).unwrap()).status()
    }

    /// The `--metrics` listener answers `GET /metrics` and nothing else: no `/config`
    /// (it names every service and endpoint), no `/shutdown`, even with the token.
    #[test]
    fn the_metrics_listener_serves_metrics_only() {
        let a = admin(Some("tok"));
        let call = |method: Method, path: &str| {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::AUTHORIZATION, "Bearer tok")
                .body(())
                .unwrap();
            a.handle_metrics_only(&req)
        };
        let ok = call(Method::GET, "/metrics");
        assert_eq!(ok.status(), StatusCode::OK);
        assert!(
            ok.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        for path in ["/config", "/shutdown", "/ready", "/live", "/"] {
            assert_eq!(
                call(Method::GET, path).status(),
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
        assert_eq!(
            call(Method::POST, "/shutdown").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            call(Method::POST, "/metrics").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert!(!a.shutdown.is_cancelled());
    }

    #[test]
    fn shutdown_is_absent_without_a_token_file() {
        let a = admin(None);
        assert_eq!(
            call(&a, Method::POST, "/shutdown", Some("Bearer x")),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            call(&a, Method::GET, "/shutdown", None),
            StatusCode::NOT_FOUND
        );
        assert!(!a.shutdown.is_cancelled());
    }

    #[test]
    fn shutdown_needs_post_and_the_bearer_token() {
        let a = admin(Some("tok"));
        assert_eq!(
            call(&a, Method::GET, "/shutdown", Some("Bearer tok")),
            StatusCode::METHOD_NOT_ALLOWED
        );
        for auth in [
            None,
            Some("Bearer"),
            Some("Bearer tok2"),
            Some("bearer tok"),
            Some("Basic dG9r"),
            Some("tok"),
        ] {
            assert_eq!(
                call(&a, Method::POST, "/shutdown", auth),
                StatusCode::UNAUTHORIZED,
                "{auth:?}"
            );
        }
        assert!(!a.shutdown.is_cancelled(), "refused calls must not drain");
        assert_eq!(
            call(&a, Method::POST, "/shutdown", Some("Bearer tok")),
            StatusCode::ACCEPTED
        );
        assert!(a.shutdown.is_cancelled());
        assert_eq!(
            call(&a, Method::GET, "/ready", None),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(call(&a, Method::GET, "/live", None), StatusCode::OK);
    }

    #[test]
    fn read_endpoints_are_get_only() {
        let a = admin(Some("tok"));
        for path in ["/live", "/ready", "/metrics", "/config"] {
            for m in [Method::POST, Method::PUT, Method::DELETE] {
                assert_eq!(
                    call(&a, m.clone(), path, Some("Bearer tok")),
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{m} {path}"
                );
            }
        }
        assert!(!a.shutdown.is_cancelled());
    }

    #[test]
    fn config_shows_roots_fingerprints_and_generation() {
        use trellis_api::{MeshSnapshot, Trust, fingerprint};
        use trellis_identity::test_util::TestCa;
        use trellis_identity::{SpiffeId, TrustBundle};

        let (a, b) = (TestCa::new("a.test"), TestCa::new("b.test"));
        let id = SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap();
        let roots = vec![a.root_der().to_vec(), b.root_der().to_vec()];
        let bundle = TrustBundle::from_der(roots.clone()).unwrap();
        let certified = Certified::new(a.issue(&id), bundle, 3).unwrap();
        let policy = |ns: &str, name: &str| trellis_api::authz::AuthorizationPolicy {
            namespace: ns.into(),
            name: name.into(),
            target_services: Vec::new(),
            action: trellis_api::authz::Action::Deny,
            dry_run: false,
            rules: vec![trellis_api::authz::Rule {
                from: vec![trellis_api::authz::Source {
                    principals: Vec::new(),
                    namespaces: vec![trellis_api::authz::Pattern::Prefix("dev-".into())],
                }],
                to: Vec::new(),
            }],
        };
        let snapshot = MeshSnapshot {
            version: 2,
            trust: Trust {
                roots_der: roots,
                generation: 4,
            },
            authorization: vec![policy("demo", "deny-dev"), policy("shop", "x")],
            ..Default::default()
        };
        let a_admin = Admin {
            certs: watch::channel(Some(Arc::new(certified))).1,
            view: watch::channel(Arc::new(View::new(
                snapshot,
                &id,
                "web-0",
                crate::config::Mode::Explicit,
            )))
            .1,
            ..admin(None)
        };
        let doc: serde_json::Value = serde_json::from_str(&a_admin.config_json()).unwrap();
        let (fa, fb) = (fingerprint(a.root_der()), fingerprint(b.root_der()));
        for f in [&fa, &fb] {
            assert_eq!(f.len(), 16, "{f}");
            assert!(
                f.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
        }
        assert_ne!(fa, fb);
        let cert = &doc["certificate"];
        assert_eq!(cert["ca_generation"], 3);
        assert_eq!(cert["trust_roots"], 2);
        assert_eq!(cert["trust_root_fingerprints"], serde_json::json!([fa, fb]));
        assert_eq!(
            doc["discovery"]["trust"],
            serde_json::json!({"roots": 2, "fingerprints": [fa, fb], "generation": 4})
        );
        // Every pushed policy as pushed; the ones this workload enforces, with their ports.
        let authz = &doc["discovery"]["authorization"];
        assert_eq!(
            authz["policies"][0],
            serde_json::json!({
                "namespace": "demo", "name": "deny-dev", "target_services": [],
                "action": "DENY", "dry_run": false,
                "rules": [{"from": [{"principals": [], "namespaces": ["dev-*"]}], "to": []}],
            })
        );
        assert_eq!(
            authz["applied"],
            serde_json::json!([{"policy": "demo/deny-dev", "ports": null}])
        );
    }

    #[test]
    fn token_comparison_needs_every_byte_and_the_length() {
        let t = ShutdownToken(b"s3cret-token".to_vec());
        assert!(t.matches(b"s3cret-token"));
        for wrong in [
            &b""[..],
            b"s3cret-toke",
            b"s3cret-token!",
            b"s3cret-tokeN",
            b"S3cret-token",
            b"s3cret-token\0",
        ] {
            assert!(!t.matches(wrong), "{}", String::from_utf8_lossy(wrong));
        }
    }

    #[test]
    fn token_file_is_trimmed_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("trellis-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "abc\n").unwrap();
        assert!(ShutdownToken::from_file(&f).unwrap().matches(b"abc"));
        std::fs::write(&f, " \n").unwrap();
        assert!(ShutdownToken::from_file(&f).is_err());
        assert_eq!(
            format!("{:?}", ShutdownToken(b"abc".to_vec())),
            "ShutdownToken(<redacted>)"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
