//! App A -> proxy A (outbound) -> mTLS -> proxy B (inbound) -> app B.

use std::net::SocketAddr;

use bytes::Bytes;
use trellis_e2e::{ControlPlane, EchoServer, Proxy, free_port, http_get, http_request};

/// The mesh of most scenarios: service `web` backed by workload `web-1` whose proxy
/// listens on `web_inbound`; workload `client-1` with no service.
pub(crate) fn two_workloads(client_inbound: SocketAddr, web_inbound: SocketAddr) -> String {
    trellis_e2e::mesh_yaml(
        "demo",
        &["web"],
        &[
            ("web-1", "web", "web", web_inbound),
            ("client-1", "client", "client", client_inbound),
        ],
    )
}

pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A control plane, a client proxy and a server proxy with its app.
pub(crate) struct Mesh {
    pub(crate) cp: ControlPlane,
    pub(crate) client: Proxy,
    pub(crate) web: Proxy,
    pub(crate) web_app: EchoServer,
    pub(crate) _client_app: EchoServer,
}

pub(crate) async fn start_mesh() -> Mesh {
    start_mesh_with(&[]).await
}

/// [`start_mesh`] with extra flags for the client proxy.
pub(crate) async fn start_mesh_with(client_flags: &[&str]) -> Mesh {
    let (client_in, web_in) = (loopback(free_port()), loopback(free_port()));
    let cp = ControlPlane::start(&two_workloads(client_in, web_in)).await;
    let web_app = EchoServer::start("web-1").await;
    let client_app = EchoServer::start("client-1").await;
    let web = Proxy::start(&cp, "web-1", "demo", "web", web_in, web_app.addr).await;
    let (ca, ns, sa) = ("client-1", "demo", "client");
    let client = Proxy::start_with(&cp, ca, ns, sa, client_in, client_app.addr, client_flags).await;
    Mesh {
        cp,
        client,
        web,
        web_app,
        _client_app: client_app,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_and_identities_cross_the_mesh() {
    let m = start_mesh().await;
    let body = Bytes::from_static(b"ping \x00\x01\x02 binary-safe payload");
    let (status, headers, reply) = http_request(
        m.client.outbound,
        http::Method::POST,
        "web.demo",
        "/echo?x=1&y=%20z",
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "body: {}", String::from_utf8_lossy(&reply));
    assert_eq!(reply, Bytes::from("hello from web-1 /echo?x=1&y=%20z"));
    assert_eq!(headers["x-served-by"], "web-1");

    let got = m.web_app.received();
    assert_eq!(got.len(), 1, "{got:?}");
    let r = &got[0];
    assert_eq!(r.method, http::Method::POST);
    assert_eq!(r.path_and_query, "/echo?x=1&y=%20z");
    assert_eq!(r.body, body, "the app must receive exactly the bytes sent");
    assert_eq!(r.headers["host"], "web.demo");
    // The server-side proxy vouches for the client's identity, taken from its certificate.
    assert_eq!(
        r.headers["x-forwarded-client-cert"],
        "By=spiffe://cluster.local/ns/demo/sa/web;URI=spiffe://cluster.local/ns/demo/sa/client"
    );

    // One access-log line per request on each side, with both identities.
    assert!(
        m.web.wait_log("direction=\"inbound\"").await,
        "{}",
        m.web.log()
    );
    assert!(
        m.client.wait_log("direction=\"outbound\"").await,
        "{}",
        m.client.log()
    );
    let inbound: Vec<_> = m
        .web
        .access_log()
        .into_iter()
        .filter(|l| l.contains("direction=\"inbound\""))
        .collect();
    assert_eq!(inbound.len(), 1, "{inbound:?}");
    let l = &inbound[0];
    assert!(
        l.contains("src=\"spiffe://cluster.local/ns/demo/sa/client\""),
        "{l}"
    );
    assert!(
        l.contains("dst=\"spiffe://cluster.local/ns/demo/sa/web\""),
        "{l}"
    );
    assert!(l.contains("status=200"), "{l}");
    let outbound: Vec<_> = m
        .client
        .access_log()
        .into_iter()
        .filter(|l| l.contains("direction=\"outbound\""))
        .collect();
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    assert!(
        outbound[0].contains("service=demo/web")
            && outbound[0].contains("dst=\"spiffe://cluster.local/ns/demo/sa/web\""),
        "{}",
        outbound[0]
    );

    // Recorded when each response ends, which may be a moment after the client has it.
    let post = |kind| {
        trellis_e2e::request_series(kind, "client", "web", "demo", 200)
            .replace("\"GET\"", "\"POST\"")
    };
    let (server, client) = (post("server"), post("client"));
    let counted = trellis_e2e::wait_until(std::time::Duration::from_secs(5), || async {
        m.web.metric(&server).await == Some(1.0) && m.client.metric(&client).await == Some(1.0)
    })
    .await;
    assert!(
        counted.is_ok(),
        "web: {:?}, client: {:?}",
        m.web.metric(&server).await,
        m.client.metric(&client).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_identity_header_from_the_app_is_replaced() {
    let m = start_mesh().await;
    let forged = "By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin";
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::get(format!("http://{}/", m.client.outbound))
        .header("host", "web.demo")
        .header("x-forwarded-client-cert", forged)
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(client.request(req).await.unwrap().status(), 200);
    let got = m.web_app.received();
    let xfcc: Vec<_> = got[0]
        .headers
        .get_all("x-forwarded-client-cert")
        .iter()
        .collect();
    assert_eq!(xfcc.len(), 1);
    assert_eq!(
        xfcc[0],
        "By=spiffe://cluster.local/ns/demo/sa/web;URI=spiffe://cluster.local/ns/demo/sa/client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_is_404_from_the_proxy_and_admin_is_informative() {
    let m = start_mesh().await;
    let (status, headers, body) = http_get(m.client.outbound, "nope.demo", "/").await.unwrap();
    assert_eq!(status, 404);
    assert_eq!(headers["x-trellis-error"], "downstream");
    assert!(String::from_utf8_lossy(&body).contains("no mesh service for nope.demo"));
    assert!(m.web_app.received().is_empty());

    let (status, _, _) = http_get(m.client.outbound, "", "/").await.unwrap();
    assert_eq!(status, 400, "an empty Host is a bad request");

    let cfg = m.client.config().await;
    assert_eq!(
        cfg["certificate"]["identity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
    assert_eq!(cfg["ready"], true);
    assert!(cfg["discovery"]["version"].as_u64().unwrap() >= 1);
    let services = cfg["discovery"]["services"].as_array().unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(
        services[0]["ports"][0]["endpoints"][0]["identity"],
        "spiffe://cluster.local/ns/demo/sa/web"
    );
    let (live, _, _) = http_get(m.client.admin, "localhost", "/live")
        .await
        .unwrap();
    assert_eq!(live, 200);
    drop(m.cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_is_refused_while_large_normal_traffic_passes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = start_mesh().await;

    // Paired with the limit below: 48 KiB of headers and an 8 MiB body go through intact.
    let big_header = "h".repeat(48 * 1024);
    let body = Bytes::from(
        (0..8 * 1024 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::post(format!("http://{}/upload", m.client.outbound))
        .header("host", "web.demo")
        .header("x-big", &big_header)
        .body(http_body_util::Full::new(body.clone()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = m.web_app.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["x-big"], big_header.as_str());
    assert!(
        got[0].body == body,
        "8 MiB body altered: {} bytes arrived",
        got[0].body.len()
    );

    // The limit: a request head over 64 KiB is refused by the outbound proxy with 431
    // and never reaches the app.
    let mut tcp = tokio::net::TcpStream::connect(m.client.outbound)
        .await
        .unwrap();
    let head = format!(
        "GET / HTTP/1.1\r\nhost: web.demo\r\nx-huge: {}\r\n\r\n",
        "h".repeat(80 * 1024)
    );
    let _ = tcp.write_all(head.as_bytes()).await;
    let mut reply = vec![0u8; 512];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
    assert_eq!(
        m.web_app.received().len(),
        1,
        "the oversized request reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_cut_but_a_briefly_paused_client_is_served() {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = start_mesh_with(&["--header-read-timeout", "1s"]).await;

    // Paired: headers arriving in pieces well within the limit are served.
    let mut tcp = tokio::net::TcpStream::connect(m.client.outbound)
        .await
        .unwrap();
    tcp.write_all(b"GET /paused HTTP/1.1\r\nhost: web.demo\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tcp.write_all(b"x-late: 1\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    // The limit: a head that never completes is cut after the timeout.
    let mut tcp = tokio::net::TcpStream::connect(m.client.outbound)
        .await
        .unwrap();
    tcp.write_all(b"GET /slow HTTP/1.1\r\nhost: web.demo\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "the proxy kept a slow-header connection open for 5s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut too early: {:?}",
        started.elapsed()
    );
    let paths: Vec<_> = m
        .web_app
        .received()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(paths, ["/paused"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_mode_carries_grpc_from_an_http2_client() {
    use trellis_e2e::apps::grpc::pb::{EchoRequest, echo_client::EchoClient};
    use trellis_e2e::apps::{Recorder, grpc_server};

    let (client_in, web_in) = (loopback(free_port()), loopback(free_port()));
    let cp = ControlPlane::start(&two_workloads(client_in, web_in)).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = listener.local_addr().unwrap();
    let rec = Recorder::new();
    let server = tokio::spawn(grpc_server(listener, rec.clone()));
    let _web = Proxy::start(&cp, "web-1", "demo", "web", web_in, app).await;
    let client_app = EchoServer::start("client-1").await;
    let client = Proxy::start(
        &cp,
        "client-1",
        "demo",
        "client",
        client_in,
        client_app.addr,
    )
    .await;

    // The gRPC client talks HTTP/2 to its proxy; :authority names the service.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", client.outbound))
        .unwrap()
        .origin("http://web.demo:80".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let reply = EchoClient::new(channel)
        .unary(EchoRequest {
            message: "over h2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "over h2");
    assert_eq!(reply.caller, "spiffe://cluster.local/ns/demo/sa/client");
    assert_eq!(rec.len(), 1);
    assert!(
        client.wait_log("protocol=\"HTTP/2\"").await,
        "{}",
        client.log()
    );
    let log = client.access_log();
    assert!(
        log.iter()
            .any(|l| l.contains("protocol=\"HTTP/2\"") && l.contains("service=demo/web")),
        "{log:#?}"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trellis_proxy_wait_returns_once_the_proxy_is_ready_and_fails_at_its_timeout() {
    let m = start_mesh().await;
    let wait = |admin: SocketAddr, timeout: &str| {
        tokio::process::Command::new(trellis_e2e::mesh::bin("trellis-proxy"))
            .args(["wait", "--admin", &admin.to_string(), "--timeout", timeout])
            .output()
    };
    let ready = wait(m.web.admin, "10s").await.unwrap();
    assert!(
        ready.status.success(),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    // Nobody listens there: it keeps trying, then says why it gave up.
    let nobody = loopback(free_port());
    let started = std::time::Instant::now();
    let out = wait(nobody, "1s").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "gave up early"
    );
    assert!(stderr.contains("was not ready within 1s"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_finds_its_control_plane_by_name_and_serves_metrics_on_ipv4_and_ipv6() {
    // On a cluster the injector passes the control plane's Service name and
    // `--metrics 0.0.0.0:15090`; here `localhost` stands for the name.
    let port = free_port();
    let m = start_mesh().await;
    let by_name = format!("--control-plane=localhost:{}", m.cp.grpc.port());
    let metrics = format!("0.0.0.0:{port}");
    let app = EchoServer::start("named-1").await;
    let named = Proxy::start_with(
        &m.cp,
        "named-1",
        "demo",
        "client",
        loopback(free_port()),
        app.addr,
        &[&by_name, "--metrics", &metrics],
    )
    .await;
    // Ready means it got its certificate and view over the named address.
    let (status, _, body) = http_request(
        named.outbound,
        http::Method::GET,
        "web.demo",
        "/by-name",
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let addr: SocketAddr = addr.parse().unwrap();
        let (status, _, body) = http_get(addr, "localhost", "/metrics").await.unwrap();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "{addr}: {body}");
        assert!(
            body.contains("trellis_proxy_certificate_expiration_timestamp_seconds"),
            "{addr}: {body}"
        );
        // The metrics-only listener serves nothing else, on either family.
        let (status, _, _) = http_get(addr, "localhost", "/config").await.unwrap();
        assert_eq!(status, 404, "{addr}");
    }
}
