//! Authorization policies enforced by the real inbound side over real mTLS.
//!
//! Each test runs, in process, a proxy's inbound side (explicit mode) in front of a
//! recording app, and pushes views with policies through the same watch channel the
//! discovery client publishes on. Callers are either a peer proxy speaking HTTP/2 over
//! mTLS with its own certificate (as the outbound side does, so tunnels and headers can be
//! driven directly), or an app going through a real outbound side. The app records every
//! request and connection it gets, so "the app never saw it" is asserted, not assumed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use trellis_api::authz::{Action, AuthorizationPolicy, Operation, Pattern, Rule, Source};
use trellis_api::{Endpoint, MeshSnapshot, Protocol, Service, ServiceKey, ServicePort};
use trellis_identity::SpiffeId;
use trellis_identity::test_util::TestCa;
use trellis_proxy::config::Mode;
use trellis_proxy::http::{Body, full};
use trellis_proxy::identity::{ALPN_H2, Certified};
use trellis_proxy::inbound::Inbound;
use trellis_proxy::metrics::Metrics;
use trellis_proxy::outbound::route::View;
use trellis_proxy::outbound::{Outbound, Settings};
use trellis_proxy::peer::client::PeerConn;
use trellis_proxy::transport::Limits;

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const GOOD: &str = "spiffe://cluster.local/ns/demo/sa/good";
const BAD: &str = "spiffe://cluster.local/ns/other/sa/bad";
pub(super) const WAIT: Duration = Duration::from_secs(10);

// === policies ===

fn pats(values: &[&str]) -> Vec<Pattern> {
    values
        .iter()
        .map(|v| Pattern::parse(v, || "test".into()).unwrap())
        .collect()
}

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        namespace: "demo".into(),
        name: name.into(),
        target_services: Vec::new(),
        action,
        dry_run: false,
        rules,
    }
}

fn from(principals: &[&str], namespaces: &[&str]) -> Rule {
    Rule {
        from: vec![Source {
            principals: pats(principals),
            namespaces: pats(namespaces),
        }],
        to: Vec::new(),
    }
}

fn to(methods: &[&str], paths: &[&str]) -> Rule {
    Rule {
        from: Vec::new(),
        to: vec![Operation {
            ports: Vec::new(),
            methods: pats(methods),
            paths: pats(paths),
        }],
    }
}

// === the app ===

/// A local app on loopback speaking HTTP/1.1 and HTTP/2 (prior knowledge), recording
/// every connection and every request (`METHOD path?query`).
#[derive(Clone)]
pub(super) struct App {
    pub(super) addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl App {
    pub(super) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = Self {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            connections: Arc::default(),
        };
        let this = app.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                this.connections.fetch_add(1, Ordering::SeqCst);
                let seen = this.seen.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let target = req.uri().path_and_query().unwrap().to_string();
                            // For timeouts: answer late.
                            if target.starts_with("/slow") {
                                tokio::time::sleep(Duration::from_secs(2)).await;
                            }
                            seen.lock()
                                .unwrap()
                                .push(format!("{} {target}", req.method()));
                            let grpc = req
                                .headers()
                                .get("content-type")
                                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                            let mut resp = Response::new(full(format!("app saw {target}")));
                            if grpc {
                                *resp.body_mut() = full("");
                                let h = resp.headers_mut();
                                h.insert("content-type", "application/grpc".parse().unwrap());
                                h.insert("grpc-status", "0".parse().unwrap());
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let mut first = [0u8; 4];
                    let _ = tcp.peek(&mut first).await;
                    let io = TokioIo::new(tcp);
                    if &first == b"PRI " {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        app
    }

    pub(super) fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

// === the mesh ===

/// One serving workload `demo/web-0` (identity `sa/web`): its inbound side in front of an
/// [`App`], a view channel standing in for discovery, and its metrics.
struct Server {
    ca: TestCa,
    id: SpiffeId,
    addr: SocketAddr,
    app: App,
    views: watch::Sender<Arc<View>>,
    registry: Registry,
    _stop: DropGuard,
}

/// The mesh as discovery would send it: `demo/web` on port 80, served by `web-0` at the
/// inbound address (explicit mode), with `policies`.
fn snapshot(inbound: SocketAddr, policies: Vec<AuthorizationPolicy>) -> MeshSnapshot {
    let key = ServiceKey::new("demo", "web");
    let web = Service {
        key: key.clone(),
        hostnames: Vec::new(),
        addresses: Vec::new(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http,
            endpoints: vec![Endpoint {
                address: inbound,
                identity: WEB.into(),
                workload: "web-0".into(),
                labels: BTreeMap::new(),
            }],
        }],
    };
    let mut policies = policies;
    policies.sort();
    MeshSnapshot {
        version: 1,
        trust_domain: "cluster.local".into(),
        services: BTreeMap::from([(key, web)]),
        authorization: policies,
        ..Default::default()
    }
}

pub(super) fn metrics_for(id: &SpiffeId, registry: &mut Registry) -> Metrics {
    let (tracer, _spans) = trellis_proxy::trace::Tracer::new(registry);
    Metrics::new(
        registry,
        trellis_proxy::telemetry::Local::new(id.service_account(), id),
        tracer,
    )
}

impl Server {
    async fn start(policies: Vec<AuthorizationPolicy>) -> Self {
        access_log();
        let ca = TestCa::new("cluster.local");
        let id = SpiffeId::parse(WEB).unwrap();
        let certified = Certified::new(ca.issue(&id), ca.bundle(), 0).unwrap();
        let (certs_tx, certs) = watch::channel(Some(Arc::new(certified)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let view = View::new(snapshot(addr, policies), &id, "web-0", Mode::Explicit);
        let (views, view_rx) = watch::channel(Arc::new(view));
        let mut registry = Registry::default();
        let metrics = metrics_for(&id, &mut registry);
        let app = App::start().await;
        let inbound = Arc::new(Inbound::new(
            id.clone(),
            app.addr,
            Mode::Explicit,
            certs,
            view_rx,
            metrics,
            Duration::from_secs(5),
            Limits::default(),
        ));
        let stop = CancellationToken::new();
        tokio::spawn(inbound.serve(listener, stop.clone(), TaskTracker::new()));
        // The certificate never changes here; its channel stays open as in a running proxy.
        std::mem::forget(certs_tx);
        Self {
            ca,
            id,
            addr,
            app,
            views,
            registry,
            _stop: stop.drop_guard(),
        }
    }

    /// Publishes a new view with `policies`, as the discovery client does.
    fn push(&self, policies: Vec<AuthorizationPolicy>) {
        let mut snap = snapshot(self.addr, policies);
        snap.version = self.views.borrow().snapshot.version + 1;
        let view = View::new(snap, &self.id, "web-0", Mode::Explicit);
        self.views.send_replace(Arc::new(view));
    }

    /// A peer proxy with identity `id`: one mTLS HTTP/2 connection to our inbound side.
    async fn peer(&self, id: &str) -> Peer {
        let id = SpiffeId::parse(id).unwrap();
        let tls = trellis_identity::client_config(
            Some(&self.ca.issue(&id)),
            &self.ca.bundle(),
            &self.id,
            &[ALPN_H2],
        )
        .unwrap();
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("web.demo").unwrap();
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .unwrap();
        // The outbound side's own HTTP/2 client.
        let sender = PeerConn::handshake(tls, self.addr).await.unwrap();
        Peer { sender }
    }

    /// A client app of workload `demo/<sa>` going through a real outbound side (explicit
    /// mode) with identity `id`: returns the outbound listener's address.
    async fn outbound(&self, id: &str) -> SocketAddr {
        let id = SpiffeId::parse(id).unwrap();
        // The client's view: the same services; policies are the server's business.
        let view = View::new(
            snapshot(self.addr, Vec::new()),
            &id,
            "client-0",
            Mode::Explicit,
        );
        let (views_tx, views) = watch::channel(Arc::new(view));
        std::mem::forget(views_tx);
        let metrics = metrics_for(&id, &mut Registry::default());
        start_outbound(&self.ca, id, views, metrics, CancellationToken::new()).await
    }

    /// The value of a sample in our `/metrics` text, 0 when absent.
    fn metric(&self, series: &str) -> u64 {
        let text = trellis_proxy::metrics::encode(&self.registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits (up to 5 s) for a line of our `/metrics` text to satisfy `line`: request
    /// metrics are recorded when the response body ends, just after the client has it.
    async fn wait_for(&self, line: impl Fn(&str) -> bool) {
        for _ in 0..500 {
            let text = trellis_proxy::metrics::encode(&self.registry).unwrap();
            if text.lines().any(&line) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let text = trellis_proxy::metrics::encode(&self.registry).unwrap();
        panic!("no such metrics line in:\n{text}");
    }

    fn decisions(&self, decision: &str, policy: &str) -> u64 {
        self.metric(&format!(
            "trellis_proxy_authorization_decisions_total{{decision=\"{decision}\",policy=\"{policy}\"}}"
        ))
    }
}

/// A peer proxy's connection to the server's inbound side.
struct Peer {
    sender: PeerConn,
}

/// A response, read to its end.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    trailers: Option<HeaderMap>,
}

impl Peer {
    /// Sends `req` and reads the whole response.
    async fn send(&mut self, req: Request<Body>) -> Answer {
        let resp = tokio::time::timeout(WAIT, self.sender.send(req))
            .await
            .expect("an answer in time")
            .expect("a response");
        let (parts, body) = resp.into_parts();
        let collected = tokio::time::timeout(WAIT, body.collect())
            .await
            .expect("the body in time")
            .expect("the body");
        let trailers = collected.trailers().cloned();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(collected.to_bytes().to_vec()).unwrap(),
            trailers,
        }
    }

    /// `method path` as the outbound side sends it for an HTTP/1.1 client app.
    async fn request(&mut self, method: Method, path: &str) -> Answer {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://web.demo{path}"))
            .header("trellis-orig-proto", "HTTP/1.1")
            .body(full(""))
            .unwrap();
        self.send(req).await
    }

    async fn get(&mut self, path: &str) -> Answer {
        self.request(Method::GET, path).await
    }

    /// A unary gRPC call, as the outbound side sends it for an HTTP/2 client app.
    async fn grpc(&mut self, path: &str) -> Answer {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://web.demo{path}"))
            .header("trellis-orig-proto", "HTTP/2")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        self.send(req).await
    }

    /// Opens a `CONNECT` tunnel with the outbound side's own function and, once open,
    /// sends an HTTP/1.1 request for `path` through it to the app; the app's answer.
    async fn tunnel(&mut self, path: &str) -> Result<String, String> {
        let target: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let mut io = tokio::time::timeout(WAIT, self.sender.tunnel(target))
            .await
            .expect("a tunnel answer in time")
            .map_err(|e| e.to_string())?;
        io.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, io.read_to_end(&mut out))
            .await
            .expect("the tunnelled answer in time")
            .unwrap();
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

// === the access log ===

/// Access lines, as the binary writes them (the direct batch writer), for every test in
/// this binary.
fn access_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (writer, guard) = trellis_proxy::logging::batch_writer(
            Sink(log.clone()),
            Duration::from_millis(10),
            1 << 20,
        )
        .unwrap();
        trellis_proxy::logging::install_direct(writer);
        // Flushes for the life of the test binary.
        std::mem::forget(guard);
        // Request lines go through the direct writer when `access` events are enabled;
        // connection lines through this subscriber, into the same buffer.
        let for_tracing = log.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("access=info,off")
            .with_ansi(false)
            .with_writer(move || Sink(for_tracing.clone()))
            .try_init();
        log
    })
    .clone()
}

/// The first access line containing `needle` (waits for the writer's flush).
async fn access_line(needle: &str) -> String {
    let log = access_log();
    for _ in 0..200 {
        let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no access line with {needle:?}");
}

/// Sends `GET path` as an HTTP/1.1 app through the outbound at `outbound`, with a header
/// the app (and its log) can be recognized by.
/// A real outbound side (explicit mode, 5 s request timeout) for workload `id` with a
/// certificate from `ca`, reading its view from `views`, until `stop`: the address apps
/// send their requests to.
pub(super) async fn start_outbound(
    ca: &TestCa,
    id: SpiffeId,
    views: watch::Receiver<Arc<View>>,
    metrics: Metrics,
    stop: CancellationToken,
) -> SocketAddr {
    let certified = Certified::new(ca.issue(&id), ca.bundle(), 0).unwrap();
    let (certs_tx, certs) = watch::channel(Some(Arc::new(certified)));
    // The certificate never changes here; its channel stays open as in a running proxy.
    std::mem::forget(certs_tx);
    let outbound = Arc::new(Outbound::new(
        id,
        certs,
        views,
        metrics,
        Settings {
            mode: Mode::Explicit,
            request_timeout: Duration::from_secs(5),
            detect_timeout: Duration::from_secs(1),
            opaque_ports: Vec::new(),
            own_ports: Vec::new(),
            limits: Limits::default(),
        },
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(outbound.serve(listener, stop, TaskTracker::new()));
    addr
}

pub(super) async fn http1_via(outbound: SocketAddr, path: &str) -> (StatusCode, HeaderMap, String) {
    let tcp = TcpStream::connect(outbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(format!("http://web.demo{path}"))
        .header("host", "web.demo")
        .body(full(""))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

// === tests ===

#[tokio::test]
async fn denied_caller_gets_403_and_allowed_caller_200_over_mtls() {
    let server = Server::start(vec![policy(
        "only-good",
        Action::Allow,
        vec![from(&[GOOD], &[])],
    )])
    .await;
    let mut good = server.peer(GOOD).await;
    let mut bad = server.peer(BAD).await;

    let a = good.get("/hello").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::OK, "app saw /hello")
    );

    let a = bad.get("/secret-1").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.body, "RBAC: access denied");
    assert_eq!(a.headers["content-type"], "text/plain");
    // The same over HTTP/2 to the app.
    let req = Request::builder()
        .uri("http://web.demo/secret-2")
        .header("trellis-orig-proto", "HTTP/2")
        .body(full(""))
        .unwrap();
    let a = bad.send(req).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );

    assert_eq!(
        server.app.seen(),
        vec!["GET /hello"],
        "the app never sees a refused request"
    );
    assert_eq!(server.decisions("allow", "demo/only-good"), 1);
    assert_eq!(server.decisions("deny", "-"), 2);
    // The request metrics count the 403 as any other answer.
    server
        .wait_for(|l| {
            l.starts_with("http_server_request_duration_seconds_count{")
                && l.contains("http_response_status_code=\"403\"")
                && l.contains(&format!("source_principal=\"{BAD}\""))
                && l.ends_with(" 2")
        })
        .await;
    let line = access_line("path=\"/secret-1\"").await;
    assert!(line.contains("status=403"), "{line}");
    assert!(line.contains("error=no ALLOW policy matched"), "{line}");
    assert!(line.contains(&format!("src=\"{BAD}\"")), "{line}");
}

#[tokio::test]
async fn apps_behind_a_real_outbound_get_403_over_http1_and_http2() {
    let server = Server::start(vec![policy(
        "deny-other",
        Action::Deny,
        vec![from(&[], &["other"])],
    )])
    .await;
    let (good, bad) = (server.outbound(GOOD).await, server.outbound(BAD).await);

    let (status, _, body) = http1_via(good, "/via-outbound").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "app saw /via-outbound")
    );
    let (status, headers, body) = http1_via(bad, "/via-outbound-refused").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
    assert_eq!(headers["content-type"], "text/plain");

    // An HTTP/2 (prior knowledge) client app: plain HTTP/2, then gRPC.
    let tcp = TcpStream::connect(bad).await.unwrap();
    let h2 = PeerConn::handshake(tcp, bad).await.unwrap();
    let mut client = Peer { sender: h2 };
    let req = Request::builder()
        .uri("http://web.demo/h2-refused")
        .body(full(""))
        .unwrap();
    let a = client.send(req).await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
    let req = Request::builder()
        .method(Method::POST)
        .uri("http://web.demo/pkg.Svc/Refused")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let a = client.send(req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["grpc-status"], "7");

    assert_eq!(server.app.seen(), vec!["GET /via-outbound"]);
    assert_eq!(server.decisions("deny", "demo/deny-other"), 3);
    let line = access_line("path=\"/via-outbound-refused\"").await;
    assert!(
        line.contains("error=denied by policy demo/deny-other"),
        "{line}"
    );
}

#[tokio::test]
async fn grpc_call_refused_with_permission_denied_trailers_only() {
    let server = Server::start(vec![policy(
        "deny-other",
        Action::Deny,
        vec![from(&[], &["other"])],
    )])
    .await;
    let a = server.peer(BAD).await.grpc("/pkg.Svc/Call").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["content-type"], "application/grpc");
    assert_eq!(a.headers["grpc-status"], "7", "PERMISSION_DENIED");
    assert_eq!(a.headers["grpc-message"], "RBAC: access denied");
    assert_eq!((a.body.as_str(), a.trailers), ("", None), "trailers-only");

    let a = server.peer(GOOD).await.grpc("/pkg.Svc/Call").await;
    assert_eq!(a.headers["grpc-status"], "0");
    assert_eq!(server.app.seen(), vec!["POST /pkg.Svc/Call"]);
    server
        .wait_for(|l| {
            l.starts_with("http_server_request_duration_seconds_count{")
                && l.contains("rpc_grpc_status_code=\"7\"")
        })
        .await;
}

#[tokio::test]
async fn deny_policy_matches_normalized_paths_and_the_app_sees_what_was_authorized() {
    let server = Server::start(vec![policy(
        "deny-admin",
        Action::Deny,
        vec![to(&[], &["/admin", "/admin/*"])],
    )])
    .await;
    let mut peer = server.peer(GOOD).await;
    for path in [
        "/admin",
        "/./admin",
        "//admin",
        "/public/../admin",
        "/%61dmin",
        "/%2e%2e/admin",
        "/admin/x?y=1",
        "/admin?x",
    ] {
        let a = peer.get(path).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (StatusCode::FORBIDDEN, "RBAC: access denied"),
            "{path}"
        );
    }
    let a = peer.get("/admin%2Fx").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("encoded \"/\""), "{}", a.body);
    // Case is significant: `/ADMIN` is another path, and goes through as it is.
    let a = peer.get("/ADMIN").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::OK, "app saw /ADMIN")
    );
    // The app is sent the normalized path it was authorized on, with the query.
    let a = peer.get("/public/./a//b/../c?q=/../admin").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::OK, "app saw /public/a/c?q=/../admin")
    );
    assert_eq!(
        server.app.seen(),
        vec!["GET /ADMIN", "GET /public/a/c?q=/../admin"],
        "nothing under /admin reached the app"
    );
    assert_eq!(server.decisions("deny", "demo/deny-admin"), 8);
    assert_eq!(server.decisions("deny", "-"), 1, "the bad path");
    let line = access_line("path=\"/public/../admin\"").await;
    assert!(
        line.contains("error=denied by policy demo/deny-admin"),
        "{line}"
    );
}

#[tokio::test]
async fn refused_tunnel_is_403_and_never_reaches_the_app() {
    let server = Server::start(vec![policy(
        "deny-other",
        Action::Deny,
        vec![from(&[], &["other"])],
    )])
    .await;
    let refused = server.peer(BAD).await.tunnel("/never").await;
    assert_eq!(
        refused.unwrap_err(),
        "upstream request failed: peer refused the tunnel: 403 Forbidden"
    );
    assert_eq!(
        server.app.connections(),
        0,
        "no connection was opened to the app"
    );

    let mut good = server.peer(GOOD).await;
    let answer = good.tunnel("/tunnelled").await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("app saw /tunnelled"), "{answer}");

    // An ALLOW policy naming methods matches no tunnel (opaque TCP has no method): the
    // same caller's HTTP GET is allowed, its tunnel refused.
    server.push(vec![policy(
        "get-only",
        Action::Allow,
        vec![to(&["GET"], &[])],
    )]);
    assert_eq!(good.get("/get-ok").await.status, StatusCode::OK);
    let refused = good.tunnel("/never-either").await;
    assert!(refused.unwrap_err().contains("403"));

    assert_eq!(server.app.seen(), vec!["GET /tunnelled", "GET /get-ok"]);
    assert_eq!(
        server.metric(
            "trellis_proxy_tcp_connections_total{direction=\"inbound\",outcome=\"denied\"}"
        ),
        2
    );
    assert_eq!(server.decisions("deny", "demo/deny-other"), 1);
    assert_eq!(server.decisions("deny", "-"), 1);
    let line = access_line(&format!("src={BAD}")).await;
    assert!(
        line.contains("error=denied by policy demo/deny-other"),
        "{line}"
    );
}

#[tokio::test]
async fn policy_change_applies_to_the_next_request_without_reconnecting() {
    let server = Server::start(Vec::new()).await;
    let mut peer = server.peer(GOOD).await;
    assert_eq!(peer.get("/one").await.status, StatusCode::OK);

    server.push(vec![policy(
        "deny-all",
        Action::Deny,
        vec![Rule::default()],
    )]);
    assert_eq!(peer.get("/two").await.status, StatusCode::FORBIDDEN);

    server.push(vec![policy(
        "allow-good",
        Action::Allow,
        vec![from(&[GOOD], &[])],
    )]);
    assert_eq!(peer.get("/three").await.status, StatusCode::OK);

    server.push(vec![policy("allow-nobody", Action::Allow, Vec::new())]);
    assert_eq!(peer.get("/four").await.status, StatusCode::FORBIDDEN);

    server.push(Vec::new());
    assert_eq!(peer.get("/five").await.status, StatusCode::OK);

    assert!(!peer.sender.is_closed(), "one connection throughout");
    assert_eq!(
        server.app.seen(),
        vec!["GET /one", "GET /three", "GET /five"]
    );
    assert_eq!(server.decisions("deny", "demo/deny-all"), 1);
    assert_eq!(server.decisions("allow", "demo/allow-good"), 1);
    assert_eq!(server.decisions("deny", "-"), 1);
}

#[tokio::test]
async fn dry_run_refusal_is_counted_and_let_through() {
    let mut would_deny = policy("would-deny", Action::Deny, vec![from(&[], &["other"])]);
    would_deny.dry_run = true;
    let server = Server::start(vec![would_deny]).await;
    let a = server.peer(BAD).await.get("/dry").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (StatusCode::OK, "app saw /dry")
    );
    assert_eq!(server.app.seen(), vec!["GET /dry"]);
    assert_eq!(server.decisions("dry_run_deny", "demo/would-deny"), 1);
    assert_eq!(server.decisions("allow", "-"), 1);
    assert_eq!(server.decisions("deny", "demo/would-deny"), 0);
}

/// The paired test: with an ALLOW policy every caller matches, heavy normal traffic on
/// one connection is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_all_policy_does_not_cut_normal_traffic() {
    let server = Server::start(vec![
        policy(
            "allow-mesh",
            Action::Allow,
            vec![from(&[], &["demo", "other"])],
        ),
        policy("deny-admin", Action::Deny, vec![to(&[], &["/admin/*"])]),
    ])
    .await;
    let peer = server.peer(GOOD).await;
    const REQUESTS: usize = 400;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let mut p = Peer {
            sender: peer.sender.clone(),
        };
        tasks.spawn(async move { p.get(&format!("/item/{i}?q={i}")).await });
    }
    let mut ok = 0;
    while let Some(a) = tasks.join_next().await {
        let a = a.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        ok += 1;
    }
    assert_eq!(ok, REQUESTS);
    let seen = server.app.seen();
    assert_eq!(seen.len(), REQUESTS);
    assert!(seen.contains(&"GET /item/7?q=7".to_owned()));
    assert_eq!(
        server.decisions("allow", "demo/allow-mesh"),
        REQUESTS as u64
    );
    assert_eq!(server.decisions("deny", "demo/deny-admin"), 0);
}
