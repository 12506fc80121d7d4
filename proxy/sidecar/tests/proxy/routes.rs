//! HTTPRoutes applied by the real outbound side: a client app's requests to `web` follow
//! the rules of the routes attached to it, reach `web` or `web-v2` (two workloads behind
//! real inbound sides, over real mTLS), and are counted per route.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_api::route::{Backend, HttpRoute, PathMatch, RouteMatch, RouteParent, RouteRule};
use trellis_api::{Endpoint, MeshSnapshot, Protocol, Service, ServiceKey, ServicePort};
use trellis_identity::SpiffeId;
use trellis_identity::test_util::TestCa;
use trellis_proxy::config::Mode;
use trellis_proxy::http::full;
use trellis_proxy::identity::Certified;
use trellis_proxy::inbound::Inbound;
use trellis_proxy::outbound::route::View;
use trellis_proxy::transport::Limits;

use super::authorization::{App, WAIT, metrics_for, start_outbound};

const WEB: &str = "spiffe://cluster.local/ns/demo/sa/web";
const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

/// `web` (workload web-0) and `web-v2` (workload web-v2-0), each an app behind a real
/// inbound side, and a client app's real outbound side whose view the test sets.
struct Mesh {
    web: App,
    v2: App,
    /// (service name, inbound address, workload)
    backends: Vec<(&'static str, SocketAddr, &'static str)>,
    client: SocketAddr,
    views: watch::Sender<Arc<View>>,
    registry: Registry,
    _stop: tokio_util::sync::DropGuard,
}

fn service(name: &str, inbound: SocketAddr, workload: &str) -> Service {
    Service {
        key: ServiceKey::new("demo", name),
        hostnames: Vec::new(),
        addresses: Vec::new(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http,
            endpoints: vec![Endpoint {
                address: inbound,
                identity: WEB.into(),
                workload: workload.into(),
                labels: BTreeMap::new(),
            }],
        }],
    }
}

fn prefix(path: &str) -> RouteMatch {
    RouteMatch {
        path: PathMatch::Prefix(path.into()),
        method: None,
        headers: Vec::new(),
        query: Vec::new(),
    }
}

fn to(backends: &[(&str, u32)]) -> Vec<Backend> {
    backends
        .iter()
        .map(|(name, weight)| Backend {
            service: ServiceKey::new("demo", *name),
            port: 80,
            weight: *weight,
        })
        .collect()
}

fn rule(name: &str, matches: Vec<RouteMatch>, backends: Vec<Backend>) -> RouteRule {
    RouteRule {
        name: name.into(),
        matches,
        backends,
        timeout: None,
    }
}

/// The route under test: `x-canary: 1` to web-v2; `/api` split web 3 : web-v2 1 (or
/// `api_weights`); `/static` to web; exact `/gone` to nothing; `/slow` to web with a
/// 200 ms timeout. Anything else matches no rule.
fn canary(api_weights: (u32, u32)) -> HttpRoute {
    let mut header = prefix("/");
    header.headers = vec![("x-canary".into(), "1".into())];
    let mut gone = prefix("/");
    gone.path = PathMatch::Exact("/gone".into());
    let mut slow = rule("slow", vec![prefix("/slow")], to(&[("web", 1)]));
    slow.timeout = Some(Duration::from_millis(200));
    HttpRoute {
        namespace: "demo".into(),
        name: "web-canary".into(),
        parents: vec![RouteParent {
            service: ServiceKey::new("demo", "web"),
            port: Some(80),
        }],
        rules: vec![
            rule("canary-header", vec![header], to(&[("web-v2", 1)])),
            rule(
                "api",
                vec![prefix("/api")],
                to(&[("web", api_weights.0), ("web-v2", api_weights.1)]),
            ),
            rule("static", vec![prefix("/static")], to(&[("web", 1)])),
            rule("gone", vec![gone], Vec::new()),
            slow,
        ],
    }
}

impl Mesh {
    async fn start() -> Self {
        let ca = TestCa::new("cluster.local");
        let stop = CancellationToken::new();
        let web_id = SpiffeId::parse(WEB).unwrap();
        let mut backends = Vec::new();
        let mut apps = Vec::new();
        for (name, workload) in [("web", "web-0"), ("web-v2", "web-v2-0")] {
            let certified = Certified::new(ca.issue(&web_id), ca.bundle(), 0).unwrap();
            let (certs_tx, certs) = watch::channel(Some(Arc::new(certified)));
            std::mem::forget(certs_tx);
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let view = View::new(
                MeshSnapshot {
                    version: 1,
                    trust_domain: "cluster.local".into(),
                    ..Default::default()
                },
                &web_id,
                workload,
                Mode::Explicit,
            );
            let (views_tx, views) = watch::channel(Arc::new(view));
            std::mem::forget(views_tx);
            let app = App::start().await;
            let inbound = Arc::new(Inbound::new(
                web_id.clone(),
                app.addr,
                Mode::Explicit,
                certs,
                views,
                metrics_for(&web_id, &mut Registry::default()),
                Duration::from_secs(5),
                Limits::default(),
            ));
            tokio::spawn(inbound.serve(listener, stop.clone(), TaskTracker::new()));
            backends.push((name, addr, workload));
            apps.push(app);
        }

        let client_id = SpiffeId::parse(CLIENT).unwrap();
        let (views, views_rx) = watch::channel(Arc::new(View::default()));
        let mut registry = Registry::default();
        let metrics = metrics_for(&client_id, &mut registry);
        let client = start_outbound(&ca, client_id, views_rx, metrics, stop.clone()).await;
        let v2 = apps.pop().unwrap();
        let web = apps.pop().unwrap();
        Self {
            web,
            v2,
            backends,
            client,
            views,
            registry,
            _stop: stop.drop_guard(),
        }
    }

    /// Publishes the client's view with `routes`, as the discovery client does.
    fn push(&self, routes: Vec<HttpRoute>) {
        let services = self
            .backends
            .iter()
            .map(|(name, addr, workload)| {
                let svc = service(name, *addr, workload);
                (svc.key.clone(), svc)
            })
            .collect();
        let snap = MeshSnapshot {
            version: self.views.borrow().snapshot.version + 1,
            trust_domain: "cluster.local".into(),
            services,
            routes,
            ..Default::default()
        };
        let client = SpiffeId::parse(CLIENT).unwrap();
        self.views.send_replace(Arc::new(View::new(
            snap,
            &client,
            "client-0",
            Mode::Explicit,
        )));
    }

    /// `method path` from the client app to `web.demo`, with `headers`: status and body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String) {
        let tcp = TcpStream::connect(self.client).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://web.demo{path}"))
            .header("host", "web.demo");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = tokio::time::timeout(WAIT, sender.send_request(req.body(full("")).unwrap()))
            .await
            .unwrap()
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        self.send(Method::GET, path, &[]).await
    }

    /// Requests the client's proxy counted with `labels` (all of them) in its request
    /// histogram, waiting up to 5 s for `want` (metrics land when a response ends).
    async fn counted(&self, labels: &[&str], want: u64) -> u64 {
        let mut got = 0;
        for _ in 0..500 {
            let text = trellis_proxy::metrics::encode(&self.registry).unwrap();
            got = text
                .lines()
                .filter(|l| l.starts_with("http_client_request_duration_seconds_count{"))
                .filter(|l| labels.iter().all(|want| l.contains(want)))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            if got == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        got
    }
}

fn paths(app: &App) -> Vec<String> {
    app.seen()
}

#[tokio::test]
async fn requests_follow_the_most_specific_rule_to_its_backend() {
    let mesh = Mesh::start().await;
    // Before any route: web's own endpoints, no route label.
    mesh.push(Vec::new());
    assert_eq!(mesh.get("/anything").await.0, StatusCode::OK);
    assert_eq!(paths(&mesh.web), ["GET /anything"]);

    mesh.push(vec![canary((3, 1))]);
    let (status, body) = mesh.get("/static/app.js").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "app saw /static/app.js")
    );
    // The header rule is more specific than nothing, but a path prefix beats a header
    // (Gateway API precedence): /static with the header still goes to web.
    mesh.send(Method::GET, "/static/x", &[("x-canary", "1")])
        .await;
    mesh.send(Method::GET, "/home", &[("x-canary", "1")]).await;
    assert_eq!(paths(&mesh.v2), ["GET /home"]);
    assert_eq!(
        paths(&mesh.web),
        ["GET /anything", "GET /static/app.js", "GET /static/x"]
    );

    // No rule matches: 404 from the client's proxy, and neither app sees it.
    let (status, body) = mesh.send(Method::POST, "/other", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body.contains("no rule of the HTTPRoutes attached to demo/web:80"),
        "{body}"
    );
    // A rule without backends: 500, naming the route.
    let (status, body) = mesh.get("/gone").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(body.contains("HTTPRoute demo/web-canary"), "{body}");
    assert_eq!(mesh.web.seen().len() + mesh.v2.seen().len(), 4);

    // Paths are matched normalized: /./static/../gone is /gone (500, no app).
    mesh.get("/./static/../gone").await;
    assert_eq!(mesh.web.seen().len() + mesh.v2.seen().len(), 4);

    // The rule's timeout replaces the proxy's 5 s: the app answers after 2 s.
    let started = std::time::Instant::now();
    let (status, _) = mesh.get("/slow").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Every routed request carries the route's labels, its 500s and 504 too; the
    // unrouted one and the one no rule matched (404) do not.
    let route = "route_namespace=\"demo\",route_name=\"web-canary\"";
    assert_eq!(mesh.counted(&[route], 6).await, 6);
    assert_eq!(
        mesh.counted(&[route, "http_response_status_code=\"500\""], 2)
            .await,
        2
    );
    assert_eq!(mesh.counted(&["route_name=\"\""], 2).await, 2);
}

#[tokio::test]
async fn weights_split_traffic_and_a_new_view_applies_to_the_next_request() {
    let mesh = Mesh::start().await;
    mesh.push(vec![canary((3, 1))]);
    for i in 0..400 {
        assert_eq!(mesh.get(&format!("/api/{i}")).await.0, StatusCode::OK);
    }
    let (web, v2) = (mesh.web.seen().len(), mesh.v2.seen().len());
    assert_eq!(web + v2, 400);
    // 3:1 of 400 is 300:100; the binomial standard deviation is under 9.
    assert!((255..=345).contains(&web), "web {web}, web-v2 {v2}");
    // Each backend's requests are counted under its own destination service.
    let route = "route_name=\"web-canary\"";
    assert_eq!(
        mesh.counted(&[route, "destination_service_name=\"web-v2\""], v2 as u64)
            .await,
        v2 as u64
    );

    // Promote the canary: every request goes to web-v2 from the next one on.
    mesh.push(vec![canary((0, 1))]);
    for i in 0..50 {
        mesh.get(&format!("/api/after-{i}")).await;
    }
    assert_eq!(
        mesh.web.seen().len(),
        web,
        "web got none after the promotion"
    );
    assert_eq!(mesh.v2.seen().len(), v2 + 50);

    // Routes removed: web's own endpoints again.
    mesh.push(Vec::new());
    mesh.get("/api/unrouted").await;
    assert_eq!(
        mesh.web.seen().last().map(String::as_str),
        Some("GET /api/unrouted")
    );
}
