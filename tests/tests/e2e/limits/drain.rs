//! Graceful drain: SIGTERM (or an authorized `POST /shutdown`) closes the listeners at
//! once, lets requests in flight finish within `--drain-timeout`, and exits 0.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use trellis_e2e::{Proxy, http_get, http_request};

use super::mesh;

/// The slow request every drain test has in flight when the drain starts.
const SLOW: &str = "/slow?sleep_ms=1500";

/// Waits until connecting to `addr` is refused (the listener is closed).
async fn refused_within(addr: SocketAddr, limit: Duration) -> bool {
    trellis_e2e::wait_until(limit, || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await
    .is_ok()
}

/// Waits for a clean exit within the drain timeout (5 s) plus a margin.
async fn exits_zero(p: &mut Proxy) {
    let status = p.wait_exit(Duration::from_secs(8)).await;
    let log = p.log();
    let status =
        status.unwrap_or_else(|| panic!("still running after the drain timeout; log:\n{log}"));
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(
        log.contains("draining") && log.contains("trellis-proxy stopped"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_refuses_new_connections_and_exits_zero() {
    let mut m = mesh(&[], &[]).await;
    let out = m.client.outbound;
    let start = Instant::now();
    let slow = tokio::spawn(async move { http_get(out, "web.demo", SLOW).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    m.client.terminate();
    assert!(
        refused_within(out, Duration::from_secs(1)).await,
        "outbound still accepts"
    );
    assert!(
        !slow.is_finished(),
        "the listener must close while requests are in flight"
    );
    // Probes keep working and say "not ready" while draining.
    let (status, _, body) = http_get(m.client.admin, "localhost", "/ready")
        .await
        .unwrap();
    assert_eq!((status, &body[..]), (503, &b"not ready: draining\n"[..]));
    let (status, headers, body) = slow.await.unwrap().unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, Bytes::from(format!("hello from web-1 {SLOW}")));
    // HTTP/1: the last response tells the app to reconnect elsewhere.
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    assert!(start.elapsed() >= Duration::from_millis(1500));
    exits_zero(&mut m.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_server_side_sends_goaway_and_the_stream_completes() {
    let mut m = mesh(&[], &[]).await;
    let out = m.client.outbound;
    let slow = tokio::spawn(async move { http_get(out, "web.demo", SLOW).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    m.web.terminate();
    assert!(
        refused_within(m.web.inbound, Duration::from_secs(1)).await,
        "inbound still accepts"
    );
    let (status, _, body) = slow.await.unwrap().unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    exits_zero(&mut m.web).await;
    // The client proxy saw GOAWAY, not an error: the app got its answer, and the next
    // request fails cleanly (no endpoint left listening) rather than hanging.
    let (status, headers, _) = http_get(out, "web.demo", "/after").await.unwrap();
    assert_eq!(status, 502);
    assert_eq!(headers["x-trellis-error"], "upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_endpoint_needs_its_token_then_drains_like_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("shutdown-token");
    std::fs::write(&token_file, "let-me-stop\n").unwrap();
    let flag = token_file.to_str().unwrap();
    let mut m = mesh(&["--shutdown-token-file", flag], &[]).await;
    let admin = m.client.admin;
    let post = |auth: Option<&'static str>| async move {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let mut req = http::Request::post(format!("http://{admin}/shutdown"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let req = req.body(http_body_util::Empty::new()).unwrap();
        client.request(req).await.unwrap().status().as_u16()
    };

    // Without the flag the endpoint does not exist.
    let (status, _, _) = http_request(
        m.web.admin,
        http::Method::POST,
        "localhost",
        "/shutdown",
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 404);

    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer let-me-stop-now"),
        Some("let-me-stop"),
    ] {
        assert_eq!(post(auth).await, 401, "{auth:?}");
    }
    let (status, _, _) = http_get(admin, "localhost", "/shutdown").await.unwrap();
    assert_eq!(status, 405, "GET never mutates");
    // Refused attempts changed nothing: still ready and serving.
    let (status, _, _) = http_get(admin, "localhost", "/ready").await.unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = http_get(m.client.outbound, "web.demo", "/still-up")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        m.client
            .wait_exit(Duration::from_millis(100))
            .await
            .is_none()
    );

    // The right token: 202, the request in flight finishes, the process exits 0.
    let out = m.client.outbound;
    let slow = tokio::spawn(async move { http_get(out, "web.demo", SLOW).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(post(Some("Bearer let-me-stop")).await, 202);
    assert!(
        refused_within(out, Duration::from_secs(1)).await,
        "outbound still accepts"
    );
    let (status, _, _) = slow.await.unwrap().unwrap();
    assert_eq!(status, 200);
    exits_zero(&mut m.client).await;
    assert!(m.client.wait_log("POST /shutdown: draining").await);
}
