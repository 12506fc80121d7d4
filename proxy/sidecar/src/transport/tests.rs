//! Limits at the lowest level that sees them: the accept loop on loopback sockets, the
//! HTTP servers over `tokio::io::duplex` with paused time.

use std::convert::Infallible;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;

use super::*;
use crate::http::{Body, full};

fn limits() -> Limits {
    Limits {
        idle_timeout: Duration::from_secs(5),
        header_read_timeout: Duration::from_secs(60),
        ..Limits::default()
    }
}

/// `/slow` answers after 20 s; everything else at once.
fn svc() -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    hyper::service::service_fn(|req: Request<Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        Ok::<_, Infallible>(Response::new(full("ok")))
    })
}

fn spawn_h1(limits: Limits, shutdown: CancellationToken) -> DuplexStream {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let remote = SocketAddr::from(([127, 0, 0, 1], 1));
    tokio::spawn(async move {
        serve_http1(
            TokioIo::new(server),
            svc(),
            &limits,
            &shutdown,
            remote,
            "test",
        )
        .await;
    });
    client
}

/// Sends `head` and reads one response (head and `content-length` body) as text.
async fn roundtrip(io: &mut DuplexStream, head: &str) -> String {
    io.write_all(head.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await.expect("read");
        assert!(
            n > 0,
            "closed before a response: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")?
                        .parse()
                        .ok()
                })
                .unwrap_or(0usize);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

/// True once the server closed its side (EOF), within `limit` of virtual time.
async fn closed_within(io: &mut DuplexStream, limit: Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, io.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn get(path: &str, extra_headers: usize) -> String {
    let mut h = format!("GET {path} HTTP/1.1\r\nhost: x\r\n");
    for i in 0..extra_headers {
        h.push_str(&format!("x-h{i}: v\r\n"));
    }
    h + "\r\n"
}

#[tokio::test]
async fn accept_loop_refuses_over_the_cap_and_admits_again_after_a_close() {
    let mut registry = Registry::default();
    let metrics = Metrics::new(
        &mut registry,
        crate::telemetry::Local::peer(
            &trellis_identity::SpiffeId::parse("spiffe://t/ns/t/sa/t").unwrap(),
        ),
        crate::trace::Tracer::new(&mut Registry::default()).0,
    );
    let cap = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = tcp.local_addr().expect("addr");
    let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
    tokio::spawn(accept_loop(
        Listener::new(tcp, &cap, &metrics),
        "test",
        shutdown.clone(),
        tasks.clone(),
        |mut tcp: TcpStream, _| async move {
            // Echo one byte back so the client knows it was admitted, then hold on.
            let mut b = [0u8; 1];
            while let Ok(1) = tcp.read(&mut b).await {
                let _ = tcp.write_all(&b).await;
            }
        },
    ));
    let label = ListenerLabels { listener: "test" };
    let open = || metrics.connections_open.get_or_create(&label).get();
    let refused = || metrics.connections_refused.get_or_create(&label).get();

    async fn admitted(addr: SocketAddr) -> (TcpStream, bool) {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let _ = c.write_all(b"x").await;
        let mut b = [0u8; 1];
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await,
            Ok(Ok(1))
        );
        (c, ok)
    }
    let (a, ok_a) = admitted(addr).await;
    let (_b, ok_b) = admitted(addr).await;
    assert!(ok_a && ok_b, "connections under the cap are served");
    let (_c, ok_c) = admitted(addr).await;
    assert!(!ok_c, "the connection over the cap is closed at once");
    assert_eq!((open(), refused()), (2, 1));

    drop(a);
    let mut again = false;
    for _ in 0..100 {
        if open() == 1 {
            again = admitted(addr).await.1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(again, "a freed slot admits a new connection");
    assert_eq!(refused(), 1);

    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed once the drain starts"
    );
}

#[tokio::test(start_paused = true)]
async fn h1_header_count_over_the_limit_is_431_and_at_the_limit_passes() {
    let mut c = spawn_h1(limits(), CancellationToken::new());
    // `host` plus 99 more: exactly the limit.
    let r = roundtrip(&mut c, &get("/", MAX_HEADERS - 1)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let mut c = spawn_h1(limits(), CancellationToken::new());
    let r = roundtrip(&mut c, &get("/", MAX_HEADERS)).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    assert!(closed_within(&mut c, Duration::from_secs(1)).await);
}

#[tokio::test(start_paused = true)]
async fn h1_idle_connection_is_closed_after_the_idle_timeout() {
    let mut c = spawn_h1(limits(), CancellationToken::new());
    let r = roundtrip(&mut c, &get("/", 0)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        !closed_within(&mut c, Duration::from_secs(4)).await,
        "closed early"
    );
    assert!(
        closed_within(&mut c, Duration::from_secs(2)).await,
        "still open after 6 s idle"
    );
}

#[tokio::test(start_paused = true)]
async fn h1_request_slower_than_the_idle_timeout_completes() {
    let mut c = spawn_h1(limits(), CancellationToken::new());
    let r = roundtrip(&mut c, &get("/slow", 0)).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok"), "{r}");
    // The connection is reusable afterwards.
    let r = roundtrip(&mut c, &get("/", 0)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

#[tokio::test(start_paused = true)]
async fn h1_keep_alive_waits_for_the_next_request_no_longer_than_the_header_timeout() {
    // hyper starts the head timer as soon as a keep-alive connection waits for its next
    // request, so `header_read_timeout` bounds HTTP/1 idleness when it is the shorter.
    let short = Limits {
        header_read_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(300),
        ..Limits::default()
    };
    let mut c = spawn_h1(short, CancellationToken::new());
    roundtrip(&mut c, &get("/", 0)).await;
    assert!(closed_within(&mut c, Duration::from_secs(3)).await);
}

#[tokio::test(start_paused = true)]
async fn drain_lets_an_h1_request_in_flight_finish_with_connection_close() {
    let shutdown = CancellationToken::new();
    let mut c = spawn_h1(limits(), shutdown.clone());
    let client = tokio::spawn(async move {
        let r = roundtrip(&mut c, &get("/slow", 0)).await;
        (r, closed_within(&mut c, Duration::from_secs(1)).await)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    shutdown.cancel();
    let (r, closed) = client.await.expect("client");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
    assert!(closed, "connection closed after the last response");
}

#[tokio::test(start_paused = true)]
async fn h2_idle_connection_gets_goaway_but_a_slow_stream_completes() {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let remote = SocketAddr::from(([127, 0, 0, 1], 1));
    let served = tokio::spawn(async move {
        let shutdown = CancellationToken::new();
        serve_http2(
            TokioIo::new(server),
            svc(),
            &limits(),
            &shutdown,
            remote,
            "test",
        )
        .await;
    });
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(client))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    let start = tokio::time::Instant::now();
    let req = Request::get("http://x/slow")
        .body(Default::default())
        .expect("req");
    let resp = send.send_request(req).await.expect("slow stream");
    assert_eq!(resp.status(), 200);
    assert!(
        start.elapsed() >= Duration::from_secs(20),
        "not cut by the 5 s idle timer"
    );
    // Then idle: the server says goodbye and both sides finish.
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("server closes an idle connection")
        .expect("server task");
    let _ = tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .expect("client sees the close");
}

#[test]
fn limits_follow_the_flags_and_fill_in_the_rest() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: crate::config::Args,
    }
    let argv = [
        "p",
        "--ca-roots",
        "/r",
        "--token-file",
        "/t",
        "--namespace",
        "demo",
        "--workload",
        "w",
    ];
    let cfg = Config::try_from(Cli::parse_from(argv).args).expect("config");
    assert_eq!(Limits::from(&cfg), Limits::default());
    let flags = [
        "--max-connections",
        "20",
        "--idle-timeout",
        "1s",
        "--header-read-timeout",
        "3s",
    ];
    let cfg = Config::try_from(Cli::parse_from(argv.iter().chain(&flags)).args).expect("config");
    let l = Limits::from(&cfg);
    assert_eq!(
        (l.max_connections, l.idle_timeout),
        (20, Duration::from_secs(1))
    );
    assert_eq!(l.header_read_timeout, Duration::from_secs(3));
    assert!(Cli::try_parse_from(argv.iter().chain(&["--max-connections", "0"])).is_err());
}
