//! HTTP routes end to end: a Gateway API HTTPRoute in the control plane's config directory
//! reaches the client's proxy, which splits `web`'s traffic between two workloads by
//! weight and sends opted-in requests to the canary, counting them per route; a broken
//! edit keeps the route in force, and so does a control plane that is gone.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use trellis_e2e::{ControlPlane, EchoServer, Proxy, free_port, http_get, wait_until};

use crate::request_path::loopback;

/// Half of web's requests to web-v2, all of them with `x-canary: true`.
const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web-split, namespace: demo }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
  rules:
    - matches: [{ headers: [{ name: x-canary, value: "true" }] }]
      backendRefs: [{ name: web-v2, port: 80 }]
    - matches: [{ path: { type: PathPrefix, value: /api } }]
      backendRefs: [{ name: web, port: 80, weight: 1 }, { name: web-v2, port: 80, weight: 1 }]
"#;

struct Mesh {
    cp: ControlPlane,
    client: Proxy,
    _web: (Proxy, Proxy),
    apps: (EchoServer, EchoServer, EchoServer),
}

async fn start() -> Mesh {
    let (client_in, web_in, v2_in) = (
        loopback(free_port()),
        loopback(free_port()),
        loopback(free_port()),
    );
    let yaml = trellis_e2e::mesh_yaml(
        "demo",
        &["web", "web-v2"],
        &[
            ("web-1", "web", "web", web_in),
            ("web-v2-1", "web", "web-v2", v2_in),
            ("client-1", "client", "client", client_in),
        ],
    );
    let cp = ControlPlane::start(&yaml).await;
    let web_app = EchoServer::start("web-1").await;
    let v2_app = EchoServer::start("web-v2-1").await;
    let client_app = EchoServer::start("client-1").await;
    let web = Proxy::start(&cp, "web-1", "demo", "web", web_in, web_app.addr).await;
    let v2 = Proxy::start(&cp, "web-v2-1", "demo", "web", v2_in, v2_app.addr).await;
    let client = Proxy::start(
        &cp,
        "client-1",
        "demo",
        "client",
        client_in,
        client_app.addr,
    )
    .await;
    Mesh {
        cp,
        client,
        _web: (web, v2),
        apps: (web_app, v2_app, client_app),
    }
}

/// GET `path` of web.demo through the client's proxy with `headers`: the status and the
/// workload that served it (`-` for none).
async fn get(client: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let http: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .set_host(false)
        .build_http();
    let mut req = http::Request::builder()
        .uri(format!("http://{client}{path}"))
        .header(http::header::HOST, "web.demo");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        http.request(req.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .unwrap()
    .unwrap();
    let served = resp
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    (status, served)
}

async fn routes(m: &Mesh) -> usize {
    m.client.config().await["discovery"]["routes"]
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_split_and_match_follow_edits_and_survive_the_control_plane() {
    let mut m = start().await;
    let c = m.client.outbound;
    // Before the route: web is web-1 only.
    assert_eq!(get(c, "/api/0", &[]).await, (200, "web-1".to_owned()));

    std::fs::write(m.cp.config_dir().join("route.yaml"), ROUTE).unwrap();
    wait_until(Duration::from_secs(10), || async { routes(&m).await == 1 })
        .await
        .unwrap_or_else(|()| panic!("the route never reached the client's proxy"));

    // The opt-in header goes to the canary where no longer path prefix matches (a path
    // outranks a header in Gateway API precedence: /api/x with the header is split).
    for path in ["/", "/other", "/apix"] {
        assert_eq!(
            get(c, path, &[("x-canary", "true")]).await,
            (200, "web-v2-1".to_owned()),
            "{path}"
        );
    }
    // /api is split 1:1 (both sides get some of 60: all on one side is 2^-59).
    let mut served = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..60 {
        let (status, by) = get(c, &format!("/api/{i}"), &[]).await;
        assert_eq!(status, 200);
        *served.entry(by).or_default() += 1;
    }
    assert_eq!(served.len(), 2, "{served:?}");
    assert_eq!(served.values().sum::<u32>(), 60);
    // Routes attached, no rule matched: 404 from the client's proxy, no app sees it.
    let before = m.apps.0.received().len() + m.apps.1.received().len();
    assert_eq!(get(c, "/other", &[]).await.0, 404);
    assert_eq!(
        m.apps.0.received().len() + m.apps.1.received().len(),
        before
    );

    // Counted per route on the calling side.
    let routed = wait_until(Duration::from_secs(5), || async {
        let (_, _, body) = http_get(m.client.admin, "localhost", "/metrics")
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body).into_owned();
        let n: f64 = text
            .lines()
            .filter(|l| l.starts_with("http_client_request_duration_seconds_count{"))
            .filter(|l| l.contains(r#"route_namespace="demo",route_name="web-split""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        n == 63.0
    })
    .await;
    assert!(
        routed.is_ok(),
        "the client's proxy did not count 63 requests under demo/web-split"
    );
    assert!(
        m.client.wait_log("route=demo/web-split").await,
        "{}",
        m.client.log()
    );

    // A broken edit is refused naming the field; the route in force stays in force.
    std::fs::write(
        m.cp.config_dir().join("route.yaml"),
        ROUTE.replace("type: PathPrefix", "type: RegularExpression"),
    )
    .unwrap();
    let source = m.cp.source_status_with("route.yaml").await;
    let err = source["last_error"].as_str().unwrap_or_default();
    assert!(err.contains("spec.rules[1].matches[0].path"), "{err}");
    assert_eq!(
        get(c, "/", &[("x-canary", "true")]).await,
        (200, "web-v2-1".to_owned())
    );

    // The control plane gone: the proxy keeps routing on its last good view.
    m.cp.kill().await;
    wait_until(Duration::from_secs(10), || async {
        m.client.metric("trellis_proxy_discovery_connected").await == Some(0.0)
    })
    .await
    .expect("the proxy did not notice the control plane was gone");
    assert_eq!(
        get(c, "/anything", &[("x-canary", "true")]).await,
        (200, "web-v2-1".to_owned())
    );
    assert_eq!(get(c, "/other", &[]).await.0, 404);
}
