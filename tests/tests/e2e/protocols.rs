//! Every protocol through two captured pods: app A -> iptables -> proxy A -> mTLS
//! (HTTP/2, CONNECT tunnels for byte streams) -> iptables -> proxy B -> app B. The apps
//! know nothing about the mesh: they dial the Service's virtual IP (or a pod IP).

use std::time::Duration;

use trellis_e2e::apps::{
    self, Recorder, TlsCert, WsFrame, echo_request, grpc_server, h2c_upgrade, http_big_download,
    http_big_upload, http_chunked_upload, http_expect_continue, http_get, http_keep_alive,
    http_server, tcp_echo, tcp_echo_server, tcp_greeting_echo, tcp_greeting_server, tls_echo,
    tls_echo_server, ws_echo, ws_handshake, ws_server,
};
use trellis_e2e::captured::{CLIENT_ID, CapturedMesh, SERVER_ID, ports};
use trellis_e2e::wait_until;

async fn mesh() -> CapturedMesh {
    CapturedMesh::start().await.expect("captured mesh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_passes_intact_with_identities() {
    let m = mesh().await;
    let rec = Recorder::new();
    let r = rec.clone();
    let _app = m
        .server
        .spawn(move || http_server(ports::HTTP, "server-1", r));
    let vip = m.service(ports::HTTP);

    let resp = m
        .client
        .run(move || async move { http_get(vip, "/hello?x=1").await })
        .await
        .unwrap();
    assert_eq!(resp.status, 200, "{}\n{}", resp.text(), m.log("client-1"));
    let got = rec.last().unwrap();
    assert_eq!(got.target, "/hello?x=1");
    assert_eq!(
        got.caller().as_deref(),
        Some(CLIENT_ID),
        "the server app sees the client's identity"
    );

    // Keep-alive: two requests on one app connection.
    let both = m
        .client
        .run(move || async move { http_keep_alive(vip, &["/a", "/b"]).await })
        .await
        .unwrap();
    assert_eq!(
        both.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 200]
    );

    // Chunked request body, re-framed but byte-identical.
    let resp = m
        .client
        .run(move || async move {
            http_chunked_upload(vip, "/echo", &[b"one-", b"two-", b"three"]).await
        })
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(rec.last().unwrap().body, b"one-two-three");

    // Expect: 100-continue: the client gets its 100 before sending the body.
    let resp = m
        .client
        .run(move || async move { http_expect_continue(vip, "/echo", b"after-100").await })
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert!(
        resp.informational.contains(&100),
        "no 100 Continue: {resp:?}"
    );
    assert_eq!(rec.last().unwrap().body, b"after-100");

    // Large bodies both ways, streamed (64 MiB is far more than any buffer we hold).
    const BIG: u64 = 64 * 1024 * 1024;
    let up = m
        .client
        .run(move || async move { http_big_upload(vip, "/sink", BIG).await })
        .await
        .unwrap();
    assert_eq!(up.status, 200);
    assert_eq!(rec.last().unwrap().body_len, BIG);
    let down = m
        .client
        .run(move || async move { http_big_download(vip, BIG).await })
        .await
        .unwrap();
    assert_eq!((down.status, down.body_len), (200, BIG));

    // Chunked response streamed through.
    let resp = m
        .client
        .run(move || async move { http_get(vip, "/chunked?n=5").await })
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp.chunked && resp.chunks >= 5, "{resp:?}");

    // Dialling the pod IP directly still goes through the mesh (pinned endpoint).
    let pod = std::net::SocketAddr::new(m.server.ip.into(), ports::HTTP);
    let resp = m
        .client
        .run(move || async move { http_get(pod, "/direct").await })
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(rec.last().unwrap().caller().as_deref(), Some(CLIENT_ID));

    let inbound: Vec<_> = m
        .access_log("server-1")
        .into_iter()
        .filter(|l| l.contains("direction=\"inbound\""))
        .collect();
    assert!(
        inbound
            .iter()
            .any(|l| l.contains(&format!("src=\"{CLIENT_ID}\"")) && l.contains("path=\"/hello\"")),
        "{inbound:#?}"
    );
    let outbound = m.access_log("client-1");
    assert!(
        outbound
            .iter()
            .any(|l| l.contains(&format!("dst=\"{SERVER_ID}\"")) && l.contains("service=demo/web")),
        "{outbound:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streams_keep_status_trailers_and_deadlines() {
    let m = mesh().await;
    let rec = Recorder::new();
    let r = rec.clone();
    let _app = m.server.spawn(move || grpc_server(ports::GRPC, r));
    let url = m.service(ports::GRPC).to_string();

    let calls = m
        .client
        .run(move || async move {
            let mut c = apps::GrpcClient::connect(url).await.unwrap();
            let unary = c.unary(echo_request("hi"), None).await;
            let server_stream = c
                .server_stream(
                    apps::EchoRequest {
                        message: "s".into(),
                        count: 5,
                        ..Default::default()
                    },
                    None,
                )
                .await;
            let client_stream = c
                .client_stream(
                    vec![echo_request("a"), echo_request("b"), echo_request("c")],
                    None,
                )
                .await;
            let bidi = c
                .bidi(vec![echo_request("x"), echo_request("y")], None)
                .await;
            let failed = c
                .unary(
                    apps::EchoRequest {
                        message: "no".into(),
                        fail_code: 5,
                        ..Default::default()
                    },
                    None,
                )
                .await;
            let late = c
                .unary(
                    apps::EchoRequest {
                        message: "slow".into(),
                        delay_ms: 2000,
                        ..Default::default()
                    },
                    Some(Duration::from_millis(200)),
                )
                .await;
            (unary, server_stream, client_stream, bidi, failed, late)
        })
        .await;
    let (unary, server_stream, client_stream, bidi, failed, late) = calls;
    assert!(unary.is_ok(), "{unary:?}\n{}", m.log("client-1"));
    assert_eq!(unary.messages(), ["hi"]);
    assert_eq!(
        unary.replies[0].caller, CLIENT_ID,
        "the gRPC server sees the client's identity"
    );
    assert!(server_stream.is_ok());
    assert_eq!(server_stream.replies.len(), 5);
    assert!(client_stream.is_ok());
    assert_eq!(client_stream.messages().concat(), "a,b,c");
    assert!(bidi.is_ok());
    assert_eq!(bidi.messages(), ["x", "y"]);
    // grpc-status, message and custom trailers survive both proxies.
    assert_eq!(failed.code, tonic::Code::NotFound, "{failed:?}");
    assert!(
        failed.trailer("x-detail").is_some(),
        "custom trailer lost: {failed:?}"
    );
    assert_eq!(late.code, tonic::Code::DeadlineExceeded, "{late:?}");
    assert!(rec.len() >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_and_h2c_is_refused() {
    let m = mesh().await;
    let rec = Recorder::new();
    let (r1, r2) = (rec.clone(), rec.clone());
    let _ws = m.server.spawn(move || ws_server(ports::WS, r1));
    let _http = m
        .server
        .spawn(move || http_server(ports::HTTP, "server-1", r2));
    let ws = m.service(ports::WS);
    let http = m.service(ports::HTTP);

    let head = m
        .client
        .run(move || async move { ws_handshake(ws, "/chat").await })
        .await
        .unwrap();
    assert_eq!(head.status, 101, "{head:?}");
    let frames = vec![
        WsFrame::Text("hello".into()),
        WsFrame::Binary(vec![0, 1, 2, 255]),
        WsFrame::Text("é".repeat(5000)),
    ];
    let sent = frames.clone();
    let echoed = m
        .client
        .run(move || async move { ws_echo(ws, "/chat", &sent).await })
        .await
        .unwrap();
    assert_eq!(echoed, frames);

    let resp = m
        .client
        .run(move || async move { h2c_upgrade(http, "/h2c").await })
        .await
        .unwrap();
    assert_ne!(
        resp.status, 101,
        "an h2c upgrade must not be honoured: {resp:?}"
    );
    let seen = rec
        .all()
        .into_iter()
        .find(|r| r.target == "/h2c")
        .expect("the request itself is served");
    assert!(
        seen.header("upgrade").is_none(),
        "Upgrade: h2c reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_server_first_and_passthrough() {
    let m = mesh().await;
    let rec = Recorder::new();
    let (r1, r2, r3, r4) = (rec.clone(), rec.clone(), rec.clone(), Recorder::new());
    let _echo = m.server.spawn(move || tcp_echo_server(ports::TCP, r1));
    let _banner = m
        .server
        .spawn(move || tcp_greeting_server(ports::BANNER, "220 banner ready\r\n", r2));
    let _mysql = m
        .server
        .spawn(move || tcp_greeting_server(ports::MYSQL, "mysql greeting\r\n", r3));
    let outside_rec = r4.clone();
    let _outside = m.outside.spawn(move || tcp_echo_server(ports::OUTSIDE, r4));
    let (tcp, banner, mysql) = (
        m.service(ports::TCP),
        m.service(ports::BANNER),
        m.service(ports::MYSQL),
    );
    let outside = std::net::SocketAddr::new(m.outside.ip.into(), ports::OUTSIDE);

    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
    let d = data.clone();
    let echoed = m
        .client
        .run(move || async move { tcp_echo(tcp, &d).await })
        .await
        .unwrap();
    assert!(echoed == data, "opaque bytes altered");

    // Server speaks first on an undeclared port: detection times out (300 ms) and the
    // connection is tunnelled as TCP.
    let g = m
        .client
        .run(move || async move { tcp_greeting_echo(banner, b"EHLO x\r\n").await })
        .await
        .unwrap();
    assert_eq!(g.greeting, b"220 banner ready\r\n");
    assert_eq!(g.echo, b"EHLO x\r\n");
    // ... and on a default opaque port no detection delay applies.
    let g = m
        .client
        .run(move || async move { tcp_greeting_echo(mysql, b"ping").await })
        .await
        .unwrap();
    assert_eq!(g.greeting, b"mysql greeting\r\n");
    assert!(
        g.waited < Duration::from_millis(250),
        "opaque port waited for detection: {:?}",
        g.waited
    );

    // A destination outside the mesh passes through untouched.
    let echoed = m
        .client
        .run(move || async move { tcp_echo(outside, b"outside").await })
        .await
        .unwrap();
    assert_eq!(echoed, b"outside");
    assert_eq!(outside_rec.len(), 1);

    let logged = wait_until(Duration::from_secs(5), || async {
        let log = m.access_log("client-1");
        log.iter()
            .any(|l| l.contains("protocol=tcp") && l.contains("service=demo/web"))
            && log.iter().any(|l| l.contains("service=passthrough"))
    });
    assert!(logged.await.is_ok(), "{:#?}", m.access_log("client-1"));
    let log = m.access_log("client-1");
    assert!(
        log.iter().any(|l| l.contains("service=passthrough")),
        "{log:#?}"
    );
    let inbound_logged = wait_until(Duration::from_secs(5), || async {
        m.access_log("server-1")
            .iter()
            .any(|l| l.contains("direction=\"inbound\"") && l.contains(&format!("src={CLIENT_ID}")))
    });
    assert!(
        inbound_logged.await.is_ok(),
        "{:#?}",
        m.access_log("server-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_from_the_app_passes_through_untouched() {
    let m = mesh().await;
    let name = "web.demo.svc.cluster.local";
    let cert = TlsCert::generate(name).unwrap();
    let rec = Recorder::new();
    let (c, r) = (cert.clone(), rec.clone());
    let _tls = m.server.spawn(move || tls_echo_server(ports::TLS, c, r));
    let addr = m.service(ports::TLS);
    let trusted = cert.clone();
    let got = m
        .client
        .run(move || async move { tls_echo(addr, name, &trusted, b"secret bytes").await })
        .await
        .unwrap();
    assert_eq!(got.echo, b"secret bytes");
    assert_eq!(
        got.peer_cert_der, cert.cert_der,
        "the app's own certificate must reach the client: TLS was not terminated"
    );
    assert_eq!(rec.last().unwrap().server_name.as_deref(), Some(name));
    // A tunnel is logged when it closes, just after the client has its echo.
    let logged = wait_until(Duration::from_secs(5), || async {
        m.access_log("client-1")
            .iter()
            .any(|l| l.contains("protocol=tls") && l.contains("service=demo/web"))
    });
    assert!(logged.await.is_ok(), "{:#?}", m.access_log("client-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_traffic_is_captured_too() {
    let m = mesh().await;
    let rec = Recorder::new();
    let r = rec.clone();
    let v6 = std::net::SocketAddr::new(m.outside.ip6.into(), ports::OUTSIDE);
    let listener = m.outside.listen(v6).unwrap();
    let _outside = m.outside.spawn(move || tcp_echo_server(listener, r));
    let echoed = m
        .client
        .run(move || async move { tcp_echo(v6, b"over ipv6").await })
        .await
        .unwrap();
    assert_eq!(echoed, b"over ipv6");
    // It went through the client's proxy (captured via ip6tables), not around it.
    let logged = wait_until(Duration::from_secs(5), || async {
        m.access_log("client-1")
            .iter()
            .any(|l| l.contains("service=passthrough") && l.contains(&format!("orig_dst={v6}")))
    });
    assert!(logged.await.is_ok(), "{:#?}", m.access_log("client-1"));
    assert_eq!(rec.len(), 1);
}

/// `outboundTrafficPolicy.mode: REGISTRY_ONLY` in trellis-config, applied live: a captured
/// connection to a destination outside the mesh is closed without reaching it, logged as
/// blocked and counted, while mesh traffic still flows; back to ALLOW_ANY, it passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_only_refuses_destinations_outside_the_mesh() {
    let m = mesh().await;
    let rec = Recorder::new();
    let outside_rec = Recorder::new();
    let (r1, r2) = (rec.clone(), outside_rec.clone());
    let _echo = m.server.spawn(move || tcp_echo_server(ports::TCP, r1));
    let _outside = m.outside.spawn(move || tcp_echo_server(ports::OUTSIDE, r2));
    let tcp = m.service(ports::TCP);
    let outside = std::net::SocketAddr::new(m.outside.ip.into(), ports::OUTSIDE);

    m.set_mesh_config_data("{outboundTrafficPolicy: 'mode: REGISTRY_ONLY'}")
        .unwrap();
    // Applied once a connection outside gets no echo (closed by the proxy: an error or an
    // early EOF); every attempt before that passed through.
    let blocked = wait_until(Duration::from_secs(10), || async {
        !m.client
            .run(move || async move { tcp_echo(outside, b"x").await })
            .await
            .is_ok_and(|echoed| echoed == b"x")
    })
    .await;
    if blocked.is_err() {
        let config = m
            .client
            .run(|| async {
                trellis_e2e::mesh::http_get(
                    std::net::SocketAddr::from(([127, 0, 0, 1], 15020)),
                    "localhost",
                    "/config",
                )
                .await
            })
            .await;
        panic!(
            "never blocked:\n{}\n{}\n{config:?}",
            m.log("control-plane"),
            m.log("client-1"),
        );
    }
    let reached = outside_rec.len();
    for _ in 0..3 {
        let r = m
            .client
            .run(move || async move { tcp_echo(outside, b"blocked?").await })
            .await;
        assert!(
            !r.as_ref().is_ok_and(|echoed| echoed == b"blocked?"),
            "a connection outside the mesh got through: {r:?}"
        );
    }
    assert_eq!(
        outside_rec.len(),
        reached,
        "the outside pod saw a blocked connection"
    );
    // Mesh services are not affected.
    let echoed = m
        .client
        .run(move || async move { tcp_echo(tcp, b"inside").await })
        .await
        .unwrap();
    assert_eq!(echoed, b"inside");
    let logged = wait_until(Duration::from_secs(5), || async {
        m.access_log("client-1").iter().any(|l| {
            l.contains("service=blocked")
                && l.contains(&format!("orig_dst={outside}"))
                && l.contains("outboundTrafficPolicy is REGISTRY_ONLY")
        })
    });
    assert!(logged.await.is_ok(), "{:#?}", m.access_log("client-1"));

    m.set_mesh_config_data("{outboundTrafficPolicy: 'mode: ALLOW_ANY'}")
        .unwrap();
    let open = wait_until(Duration::from_secs(10), || async {
        m.client
            .run(move || async move { tcp_echo(outside, b"again").await })
            .await
            .is_ok_and(|echoed| echoed == b"again")
    })
    .await;
    assert!(open.is_ok(), "ALLOW_ANY did not come back");
    assert!(outside_rec.len() > reached);
}

/// `proxy.accessLogFormat: json` and `proxy.accessLog: false` in trellis-config reach the
/// running proxies through discovery: JSON access lines with the fixed field names, then
/// none at all, while requests keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_format_and_switch_come_from_the_mesh_config() {
    let m = mesh().await;
    let rec = Recorder::new();
    let r = rec.clone();
    let _app = m
        .server
        .spawn(move || http_server(ports::HTTP, "server-1", r));
    let vip = m.service(ports::HTTP);
    let json_lines = |name: &str| -> Vec<serde_json::Value> {
        m.log(name)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect()
    };

    m.set_mesh_config_data("{proxy: 'accessLogFormat: json'}")
        .unwrap();
    let found = wait_until(Duration::from_secs(10), || async {
        let resp = m
            .client
            .run(move || async move { http_get(vip, "/json?q=1").await })
            .await;
        assert!(resp.is_ok_and(|r| r.status == 200));
        json_lines("client-1")
            .iter()
            .any(|v| v["path"] == "/json" && v["direction"] == "outbound")
    })
    .await;
    assert!(found.is_ok(), "no JSON access line:\n{}", m.log("client-1"));
    let line = json_lines("client-1")
        .into_iter()
        .find(|v| v["path"] == "/json")
        .unwrap();
    let keys: Vec<&str> = line
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "authority",
            "bytes_received",
            "bytes_sent",
            "direction",
            "dst",
            "duration_ms",
            "endpoint",
            "error",
            "kind",
            "method",
            "mtls",
            "orig_dst",
            "path",
            "protocol",
            "route",
            "service",
            "src",
            "status",
            "time",
            "trace_id"
        ],
        "{line}"
    );
    assert_eq!(line["kind"], "request");
    assert_eq!(line["src"], CLIENT_ID);
    assert_eq!(line["dst"], SERVER_ID);
    assert_eq!(line["method"], "GET");
    assert_eq!(line["status"], 200);
    assert_eq!(line["mtls"], true);
    assert_eq!(line["service"], "demo/web");
    // Written when the response ended: the body sizes are known.
    assert_eq!(line["bytes_received"], 0, "{line}");
    assert!(line["bytes_sent"].as_u64().is_some_and(|n| n > 0), "{line}");
    // The server side writes JSON too, with the caller's identity.
    let inbound = wait_until(Duration::from_secs(5), || async {
        json_lines("server-1")
            .iter()
            .any(|v| v["direction"] == "inbound" && v["src"] == CLIENT_ID)
    });
    assert!(inbound.await.is_ok(), "{}", m.log("server-1"));

    m.set_mesh_config_data("{proxy: 'accessLog: false'}")
        .unwrap();
    // Off once a request leaves no line; then a few more leave none either.
    let off = wait_until(Duration::from_secs(10), || async {
        let before = m.log("client-1").lines().count();
        let resp = m
            .client
            .run(move || async move { http_get(vip, "/quiet").await })
            .await;
        assert!(resp.is_ok_and(|r| r.status == 200));
        // Lines are flushed every 50 ms.
        tokio::time::sleep(Duration::from_millis(150)).await;
        m.log("client-1").lines().count() == before
    })
    .await;
    assert!(
        off.is_ok(),
        "access lines kept coming:\n{}",
        m.log("client-1")
    );
    let before = m.log("client-1").lines().count();
    for _ in 0..5 {
        let resp = m
            .client
            .run(move || async move { http_get(vip, "/quiet").await })
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        m.log("client-1").lines().count(),
        before,
        "{}",
        m.log("client-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_follows_endpoints_that_leave() {
    let m = mesh().await;
    let rec = Recorder::new();
    let r = rec.clone();
    let _app = m
        .server
        .spawn(move || http_server(ports::HTTP, "server-1", r));
    let vip = m.service(ports::HTTP);
    // One app connection to the Service's virtual IP, kept open across a view change.
    let (go_on, wait) = tokio::sync::oneshot::channel::<()>();
    let client = m.client.run(move || async move {
        let mut conn = apps::Http1Conn::connect(vip).await?;
        let first = conn.request("GET", "/before", &[], &[]).await?;
        wait.await?;
        let second = conn.request("GET", "/after", &[], &[]).await?;
        anyhow::Ok((first.status, second.status, second.text()))
    });
    let edit = async {
        // Wait for the first request, then take server-1 out of the Service.
        wait_until(Duration::from_secs(10), || async { rec.last().is_some() })
            .await
            .expect("the first request never arrived");
        let path = m.dir.path().join("config/mesh.yaml");
        let yaml = std::fs::read_to_string(&path).unwrap();
        let retired = yaml.replacen(
            "name: server-1, namespace: demo, labels: { app: web }",
            "name: server-1, namespace: demo, labels: { app: retired }",
            1,
        );
        assert_ne!(yaml, retired, "the mesh YAML changed shape");
        std::fs::write(&path, retired).unwrap();
        // Poll interval 200 ms, then one push: well within 3 s.
        tokio::time::sleep(Duration::from_secs(3)).await;
        go_on.send(()).unwrap();
    };
    let (result, ()) = tokio::join!(client, edit);
    let (first, second, body) = result.expect("the app connection");
    assert_eq!(first, 200, "{}", m.log("client-1"));
    // Before, a captured connection kept the endpoints it was opened with and this request
    // reached the retired server; now it picks among the current view's: none.
    assert_eq!(second, 503, "{body}\n{}", m.log("client-1"));
    assert_eq!(rec.all().len(), 1, "the retired server got a request");
}
