//! The protocol apps against each other on loopback, no proxy: each must work directly
//! before a scenario trusts what it reports through the mesh.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::Code;
use trellis_e2e::apps::{
    self, AppKind, BODY_KEEP, EchoRequest, GREETING, GrpcClient, Recorder, TlsCert, WS_ACCEPT,
    WsFrame, echo_request,
};

const CALLER: &str = "spiffe://cluster.local/ns/demo/sa/client";
const XFCC: &str =
    "By=spiffe://cluster.local/ns/demo/sa/web;URI=spiffe://cluster.local/ns/demo/sa/client";

/// A server task, aborted when dropped.
struct Running(tokio::task::JoinHandle<()>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `serve` on a fresh loopback listener.
async fn start<F, Fut>(serve: F) -> (SocketAddr, Running)
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, Running(tokio::spawn(serve(listener))))
}

async fn http(rec: &Recorder) -> (SocketAddr, Running) {
    let rec = rec.clone();
    start(|l| apps::http_server(l, "web-1", rec)).await
}

#[tokio::test]
async fn http_get_echoes_request_line_and_records_headers() {
    let rec = Recorder::new();
    let (addr, _srv) = http(&rec).await;
    let resp = apps::http_request(
        addr,
        "GET",
        "/hello?x=1",
        &[("x-forwarded-client-cert", XFCC)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!((resp.status, resp.version.as_str()), (200, "HTTP/1.1"));
    assert_eq!(resp.text(), "web-1 GET /hello?x=1");
    assert_eq!(resp.header("X-Served-By"), Some("web-1"));
    assert_eq!(resp.header("x-conn-request"), Some("1"));
    let got = rec.last().unwrap();
    assert_eq!(got.kind, AppKind::Http);
    assert_eq!(
        (got.method.as_str(), got.target.as_str()),
        ("GET", "/hello?x=1")
    );
    assert_eq!(got.header("host"), Some(addr.to_string()));
    assert_eq!(got.xfcc().as_deref(), Some(XFCC));
    assert_eq!(got.caller().as_deref(), Some(CALLER));
    assert_eq!(rec.len(), 1);
    rec.clear();
    assert!(rec.is_empty());
}

#[tokio::test]
async fn http_sleep_status_and_post_echo() {
    let rec = Recorder::new();
    let (addr, _srv) = http(&rec).await;
    let start = Instant::now();
    let resp = apps::http_get(addr, "/?sleep_ms=60&status=418")
        .await
        .unwrap();
    assert_eq!(resp.status, 418);
    assert!(start.elapsed() >= Duration::from_millis(60));

    let resp = apps::http_request(addr, "POST", "/echo", &[], b"hello")
        .await
        .unwrap();
    assert_eq!(resp.text(), "hello");
    assert_eq!(resp.header("content-length"), Some("5"));
    assert!(!resp.chunked);
    assert_eq!(rec.last().unwrap().body, b"hello");
}

#[tokio::test]
async fn http_keep_alive_serves_two_requests_on_one_connection() {
    let rec = Recorder::new();
    let (addr, _srv) = http(&rec).await;
    let resps = apps::http_keep_alive(addr, &["/one", "/two"])
        .await
        .unwrap();
    let bodies: Vec<_> = resps.iter().map(|r| r.text()).collect();
    assert_eq!(bodies, ["web-1 GET /one", "web-1 GET /two"]);
    assert_eq!(resps[1].header("x-conn-request"), Some("2"));
    assert!(!resps[0].closes());
    let all = rec.all();
    assert_eq!(all[0].peer, all[1].peer);
    assert_eq!(all[1].conn_request, 2);
}

#[tokio::test]
async fn http_chunked_both_ways() {
    let rec = Recorder::new();
    let (addr, _srv) = http(&rec).await;
    let resp = apps::http_get(addr, "/chunked?n=4&delay_ms=5")
        .await
        .unwrap();
    assert!(resp.chunked);
    assert_eq!(resp.chunks, 4);
    assert_eq!(resp.text(), "chunk 0\nchunk 1\nchunk 2\nchunk 3\n");

    let resp = apps::http_chunked_upload(addr, "/upload", &[b"ab", b"cd", b"ef"])
        .await
        .unwrap();
    assert_eq!((resp.status, resp.text().as_str()), (200, "abcdef"));
    assert!(resp.chunked, "no length came in, so none goes out");
    let got = rec.last().unwrap();
    assert_eq!(got.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!((got.body.as_slice(), got.body_len), (&b"abcdef"[..], 6));
}

#[tokio::test]
async fn http_expect_continue_gets_100_before_sending_the_body() {
    let rec = Recorder::new();
    let (addr, _srv) = http(&rec).await;
    let start = Instant::now();
    let resp = apps::http_expect_continue(addr, "/upload", b"payload")
        .await
        .unwrap();
    assert!(start.elapsed() < apps::http1::CONTINUE_WAIT);
    assert_eq!(resp.informational, [100]);
    assert_eq!((resp.status, resp.text().as_str()), (200, "payload"));
    assert_eq!(
        rec.last().unwrap().header("expect").as_deref(),
        Some("100-continue")
    );
}

#[tokio::test]
async fn http_large_bodies_stream_both_ways() {
    let rec = Recorder::new();
    let (addr, _srv) = http(&rec).await;
    let resp = apps::http_big_download(addr, 3 << 20).await.unwrap();
    assert_eq!((resp.status, resp.body_len), (200, 3 << 20));
    assert_eq!(resp.header("content-length"), Some("3145728"));
    assert!(resp.body.is_empty());

    let resp = apps::http_big_upload(addr, "/sink", 3 << 20).await.unwrap();
    assert_eq!(resp.text(), "3145728");
    assert_eq!(resp.header("x-pattern-ok"), Some("true"));
    let got = rec.last().unwrap();
    assert_eq!((got.body.len(), got.body_len), (BODY_KEEP, 3 << 20));

    let resp = apps::http_big_upload(addr, "/echo", 2 << 20).await.unwrap();
    assert_eq!(resp.body_len, 2 << 20);
    assert_eq!(resp.body, apps::pattern(0, BODY_KEEP));
}

#[tokio::test]
async fn h2c_upgrade_is_not_switched_by_a_plain_server() {
    let rec = Recorder::new();
    let (addr, _srv) = http(&rec).await;
    let resp = apps::h2c_upgrade(addr, "/").await.unwrap();
    assert_eq!((resp.status, resp.text().as_str()), (200, "web-1 GET /"));
    assert_eq!(
        rec.last().unwrap().header("upgrade").as_deref(),
        Some("h2c")
    );
}

async fn grpc(rec: &Recorder) -> (SocketAddr, Running, GrpcClient) {
    let rec = rec.clone();
    let (addr, srv) = start(|l| apps::grpc_server(l, rec)).await;
    let client = GrpcClient::connect(addr).await.unwrap();
    (
        addr,
        srv,
        client
            .with_metadata("x-forwarded-client-cert", XFCC)
            .unwrap(),
    )
}

fn failing(message: &str, code: Code) -> EchoRequest {
    EchoRequest {
        fail_code: code as i32,
        ..echo_request(message)
    }
}

#[tokio::test]
async fn grpc_unary_ok_error_and_deadline() {
    let rec = Recorder::new();
    let (_addr, _srv, mut client) = grpc(&rec).await;
    let call = client.unary(echo_request("hi"), None).await;
    assert!(call.is_ok(), "{call:?}");
    assert_eq!(call.messages(), ["hi"]);
    assert_eq!(call.replies[0].caller, CALLER);
    let got = rec.last().unwrap();
    assert_eq!((got.kind, got.method.as_str()), (AppKind::Grpc, "Unary"));
    assert_eq!(got.target, "/trellis.test.echo.v1.Echo/Unary");
    assert_eq!(got.caller().as_deref(), Some(CALLER));
    assert_eq!(got.messages_text(), ["hi"]);

    let call = client.unary(failing("nope", Code::NotFound), None).await;
    assert_eq!(call.code, Code::NotFound);
    assert_eq!(call.message, "requested failure: nope");
    assert_eq!(call.trailer("x-detail").as_deref(), Some("nope"));
    assert_eq!(
        call.trailer_bin("x-detail-bin").as_deref(),
        Some(&b"nope"[..])
    );

    let start = Instant::now();
    let slow = EchoRequest {
        delay_ms: 1_000,
        ..echo_request("slow")
    };
    let call = client.unary(slow, Some(Duration::from_millis(100))).await;
    assert_eq!(call.code, Code::DeadlineExceeded, "{call:?}");
    assert!(start.elapsed() < Duration::from_millis(800));
    assert!(rec.last().unwrap().header("grpc-timeout").is_some());
}

#[tokio::test]
async fn grpc_streams_every_way() {
    let rec = Recorder::new();
    let (_addr, _srv, mut client) = grpc(&rec).await;
    let three = EchoRequest {
        count: 3,
        ..echo_request("s")
    };
    let call = client.server_stream(three.clone(), None).await;
    assert!(call.is_ok(), "{call:?}");
    let index: Vec<_> = call.replies.iter().map(|r| r.index).collect();
    assert_eq!(index, [0, 1, 2]);

    let call = client
        .server_stream(
            EchoRequest {
                fail_code: Code::Unavailable as i32,
                ..three
            },
            None,
        )
        .await;
    assert_eq!((call.replies.len(), call.code), (3, Code::Unavailable));
    assert_eq!(call.trailer("x-detail").as_deref(), Some("s"));

    let reqs = ["a", "b", "c"].map(echo_request).to_vec();
    let call = client.client_stream(reqs.clone(), None).await;
    assert!(call.is_ok(), "{call:?}");
    assert_eq!(
        (call.replies[0].message.as_str(), call.replies[0].index),
        ("a,b,c", 3)
    );
    assert_eq!(rec.last().unwrap().messages_text(), ["a", "b", "c"]);

    let call = client.bidi(reqs, None).await;
    assert!(call.is_ok(), "{call:?}");
    assert_eq!(call.messages(), ["a", "b", "c"]);
    assert_eq!(call.replies[2].caller, CALLER);

    let reqs = vec![
        echo_request("x"),
        failing("y", Code::PermissionDenied),
        echo_request("z"),
    ];
    let call = client.bidi(reqs, None).await;
    assert_eq!(call.messages(), ["x"]);
    assert_eq!(call.code, Code::PermissionDenied);
    assert_eq!(call.trailer("x-detail").as_deref(), Some("y"));
}

#[tokio::test]
async fn grpc_server_stops_with_its_connections() {
    let rec = Recorder::new();
    let (_addr, srv, mut client) = grpc(&rec).await;
    assert!(client.unary(echo_request("before"), None).await.is_ok());
    drop(srv);
    let call = client
        .unary(echo_request("after"), Some(Duration::from_secs(2)))
        .await;
    assert!(!call.is_ok(), "a stopped server still answered: {call:?}");
    assert_ne!(
        call.code,
        Code::DeadlineExceeded,
        "the connection should fail fast"
    );
}

#[tokio::test]
async fn websocket_echoes_and_shows_its_101() {
    let rec = Recorder::new();
    let (addr, _srv) = start({
        let rec = rec.clone();
        |l| apps::ws_server(l, rec)
    })
    .await;
    let frames = vec![
        WsFrame::Text("hello".into()),
        WsFrame::Binary(vec![0, 1, 2, 255]),
        WsFrame::Text("again".into()),
    ];
    assert_eq!(apps::ws_echo(addr, "/chat", &frames).await.unwrap(), frames);
    let got = rec.last().unwrap();
    assert_eq!(
        (got.kind, got.target.as_str()),
        (AppKind::WebSocket, "/chat")
    );
    assert_eq!(got.header("upgrade").as_deref(), Some("websocket"));
    assert_eq!(got.messages.len(), 3);

    let resp = apps::ws_handshake(addr, "/raw").await.unwrap();
    assert_eq!(resp.status, 101);
    assert_eq!(resp.header("sec-websocket-accept"), Some(WS_ACCEPT));
    assert_eq!(resp.header("sec-websocket-protocol"), Some("echo"));
    assert_eq!(
        resp.header(apps::WS_SERVER_HEADER.0),
        Some(apps::WS_SERVER_HEADER.1)
    );
    assert_eq!(resp.body, b"raw hello");
}

#[tokio::test]
async fn tcp_echo_and_server_speaks_first() {
    let rec = Recorder::new();
    let (addr, _srv) = start({
        let rec = rec.clone();
        |l| apps::tcp_echo_server(l, rec)
    })
    .await;
    assert_eq!(apps::tcp_echo(addr, b"ping\n").await.unwrap(), b"ping\n");
    let big = apps::pattern(0, 1 << 20);
    assert_eq!(apps::tcp_echo(addr, &big).await.unwrap(), big);
    let got = rec.all();
    assert_eq!(
        (got[0].kind, got[0].body.as_slice()),
        (AppKind::Tcp, &b"ping\n"[..])
    );

    // A std listener, bound before the server runs (as `Pod::listen` gives).
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = std_listener.local_addr().unwrap();
    let _srv = Running(tokio::spawn(apps::tcp_greeting_server(
        std_listener,
        GREETING,
        rec.clone(),
    )));
    let greeted = apps::tcp_greeting_echo(addr, b"EHLO me\r\n").await.unwrap();
    assert_eq!(greeted.greeting, GREETING);
    assert_eq!(greeted.echo, b"EHLO me\r\n");
    assert!(greeted.waited < Duration::from_secs(1));
}

#[tokio::test]
async fn tls_passes_the_apps_own_certificate() {
    let name = "web.demo.svc.cluster.local";
    let cert = TlsCert::generate(name).unwrap();
    let rec = Recorder::new();
    let (addr, _srv) = start({
        let (rec, cert) = (rec.clone(), cert.clone());
        |l| apps::tls_echo_server(l, cert, rec)
    })
    .await;
    let got = apps::tls_echo(addr, name, &cert, b"secret").await.unwrap();
    assert_eq!(got.echo, b"secret");
    assert_eq!(got.peer_cert_der, cert.cert_der);
    assert_eq!(got.version, "TLSv1_3");
    let rec = rec.last().unwrap();
    assert_eq!(
        (rec.kind, rec.server_name.as_deref()),
        (AppKind::Tls, Some(name))
    );
    assert_eq!(rec.body, b"secret");

    let other = TlsCert::generate(name).unwrap();
    let err = apps::tls_echo(addr, name, &other, b"x").await.unwrap_err();
    assert!(err.to_string().contains("handshake"), "{err}");
}

#[tokio::test]
async fn servers_listen_on_their_port() {
    let rec = Recorder::new();
    let cert = TlsCert::generate("tls.demo").unwrap();
    let ports: Vec<u16> = (0..6).map(|_| trellis_e2e::free_port()).collect();
    let _servers = [
        Running(tokio::spawn(apps::http_server(ports[0], "p", rec.clone()))),
        Running(tokio::spawn(apps::grpc_server(ports[1], rec.clone()))),
        Running(tokio::spawn(apps::ws_server(ports[2], rec.clone()))),
        Running(tokio::spawn(apps::tcp_echo_server(ports[3], rec.clone()))),
        Running(tokio::spawn(apps::tcp_greeting_server(
            ports[4],
            GREETING,
            rec.clone(),
        ))),
        Running(tokio::spawn(apps::tls_echo_server(
            ports[5],
            cert.clone(),
            rec.clone(),
        ))),
    ];
    let at = |i: usize| format!("127.0.0.1:{}", ports[i]);
    for i in 0..6 {
        apps::wait_listening(at(i), Duration::from_secs(2))
            .await
            .unwrap();
    }
    assert_eq!(apps::http_get(at(0), "/").await.unwrap().text(), "p GET /");
    let mut grpc = GrpcClient::connect(at(1)).await.unwrap();
    assert!(grpc.unary(echo_request("hi"), None).await.is_ok());
    let frames = [WsFrame::Text("t".into())];
    assert_eq!(apps::ws_echo(at(2), "/", &frames).await.unwrap(), frames);
    assert_eq!(apps::tcp_echo(at(3), b"x").await.unwrap(), b"x");
    assert_eq!(
        apps::tcp_greeting_echo(at(4), b"y").await.unwrap().echo,
        b"y"
    );
    assert_eq!(
        apps::tls_echo(at(5), "tls.demo", &cert, b"z")
            .await
            .unwrap()
            .echo,
        b"z"
    );
}

#[test]
fn xfcc_uri_takes_the_last_elements_uri() {
    assert_eq!(apps::xfcc_uri(XFCC).as_deref(), Some(CALLER));
    let two = format!("By=a;URI=\"spiffe://x/1\",{XFCC}");
    assert_eq!(apps::xfcc_uri(&two).as_deref(), Some(CALLER));
    assert_eq!(apps::xfcc_uri("By=a"), None);
}
