//! Limits of the proxy (docs/architecture.md, "Limits"), each tested against the real
//! binaries and paired with a test that heavy legitimate traffic is not cut
//! (reliability.md §7: a flood guard once killed legitimate multiplexing).
//!
//! Connection cap, header count, idle timeout here; HTTP/2 floods in `h2`; drain and
//! `/shutdown` in `drain`.

mod drain;
mod h2;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_e2e::{ControlPlane, EchoServer, Proxy, free_port, http_get};
use trellis_identity::{SpiffeId, Svid, TrustBundle};

use crate::request_path::{loopback, two_workloads};

/// A control plane, a client proxy and a server proxy, each with its own extra flags.
pub(crate) struct Mesh {
    pub(crate) cp: ControlPlane,
    pub(crate) client: Proxy,
    pub(crate) web: Proxy,
    pub(crate) web_app: EchoServer,
    pub(crate) _client_app: EchoServer,
}

pub(crate) async fn mesh(client_flags: &[&str], web_flags: &[&str]) -> Mesh {
    let (client_in, web_in) = (loopback(free_port()), loopback(free_port()));
    let cp = ControlPlane::start(&two_workloads(client_in, web_in)).await;
    let web_app = EchoServer::start("web-1").await;
    let client_app = EchoServer::start("client-1").await;
    let (wa, ws) = ("web-1", "web");
    let web = Proxy::start_with(&cp, wa, "demo", ws, web_in, web_app.addr, web_flags).await;
    let (ca, cs) = ("client-1", "client");
    let client = Proxy::start_with(
        &cp,
        ca,
        "demo",
        cs,
        client_in,
        client_app.addr,
        client_flags,
    )
    .await;
    Mesh {
        cp,
        client,
        web,
        web_app,
        _client_app: client_app,
    }
}

/// A TLS config for talking straight to `web`'s inbound as the `client` workload, with a
/// certificate from the mesh CA (read from the control plane's persisted root).
pub(crate) fn mesh_client_tls(cp: &ControlPlane) -> Arc<rustls::ClientConfig> {
    let id = |s: &str| SpiffeId::parse(s).unwrap();
    let (client, web) = (
        id("spiffe://cluster.local/ns/demo/sa/client"),
        id("spiffe://cluster.local/ns/demo/sa/web"),
    );
    let roots = TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem()).unwrap()).unwrap();
    let ca = trellis_ca::CertificateAuthority::load_or_generate(
        &cp.state_dir().join("ca"),
        "cluster.local",
    )
    .unwrap();
    let csr = trellis_identity::generate_csr(&client).unwrap();
    let issued = ca.sign(&csr.csr_der, &client, None).unwrap();
    let chain = issued
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let svid = Svid::new(chain, csr.key).unwrap();
    trellis_identity::client_config(Some(&svid), &roots, &web, &[b"h2"]).unwrap()
}

/// An mTLS connection to a proxy's inbound port.
pub(crate) async fn mtls_connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("peer").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap()
}

/// One `GET` on an HTTP/1 connection to the outbound listener, as an app would send it.
fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: web.demo\r\n\r\n")
}

/// Reads one response (head plus `content-length` body); `None` if the connection was
/// closed or reset first.
async fn read_response(tcp: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
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
                return Some(text);
            }
        }
    }
}

/// True once the peer closed the connection, within `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, tcp.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_listener_cap_are_refused_while_open_ones_keep_working() {
    let m = mesh(&["--max-connections", "20"], &[]).await;
    let out = m.client.outbound;
    let mut first = TcpStream::connect(out).await.unwrap();
    first.write_all(get("/before").as_bytes()).await.unwrap();
    let r = read_response(&mut first).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");

    // A flood of 300 keep-alive clients: 19 fit next to `first`, the rest are cut.
    // A refused connection may fail as early as `connect` (the reset beat it).
    let flood = (0..300).map(|i| async move {
        let Ok(mut c) = TcpStream::connect(out).await else {
            return (None, false);
        };
        let served = match c.write_all(get(&format!("/flood/{i}")).as_bytes()).await {
            Ok(()) => read_response(&mut c).await.is_some(),
            Err(_) => false,
        };
        (Some(c), served)
    });
    let flood: Vec<_> = futures_join_all(flood).await;
    let served = flood.iter().filter(|(_, s)| *s).count();
    assert_eq!(served, 19, "connections served while at the cap");

    // The connection opened before the flood still works.
    first.write_all(get("/during").as_bytes()).await.unwrap();
    let r = read_response(&mut first).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let refused = r#"trellis_proxy_connections_refused_total{listener="outbound"}"#;
    let open = r#"trellis_proxy_connections_open{listener="outbound"}"#;
    assert_eq!(m.client.metric(refused).await, Some(281.0));
    assert_eq!(m.client.metric(open).await, Some(20.0));

    // Slots come back when clients leave.
    drop(flood);
    trellis_e2e::wait_until(Duration::from_secs(5), || async {
        m.client.metric(open).await == Some(1.0)
    })
    .await
    .expect("open connections drop back to 1");
    let (status, _, _) = http_get(out, "web.demo", "/after").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_clients_for_three_seconds_all_succeed() {
    // Paired with the connection cap and the HTTP/2 stream limits: 100 app connections
    // (under a cap of 128) multiplexed onto the proxies' mTLS HTTP/2 connection.
    let m = mesh(&["--max-connections", "128"], &[]).await;
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let until = Instant::now() + Duration::from_secs(3);
    let workers = (0..100).map(|w| {
        let (ok, failed, out) = (ok.clone(), failed.clone(), m.client.outbound);
        tokio::spawn(async move {
            let tcp = TcpStream::connect(out).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut i = 0;
            while Instant::now() < until {
                let req = http::Request::get(format!("/w{w}/{i}"))
                    .header("host", "web.demo")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let good = match send.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        resp.into_body().collect().await.is_ok() && status == 200
                    }
                    Err(_) => false,
                };
                if good { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        })
    });
    for w in workers.collect::<Vec<_>>() {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok >= 300, "only {ok} requests in 3 s");
    let refused = r#"trellis_proxy_connections_refused_total{listener="outbound"}"#;
    assert_eq!(m.client.metric(refused).await.unwrap_or(0.0), 0.0);
    assert_eq!(m.web_app.received().len(), ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_request_headers_get_431_while_many_pass() {
    let m = mesh(&[], &[]).await;
    let request = |n: usize| {
        let mut h = String::from("GET /headers HTTP/1.1\r\nhost: web.demo\r\n");
        for i in 0..n {
            h.push_str(&format!("x-h{i}: v\r\n"));
        }
        h + "\r\n"
    };
    // Paired: 90 headers (the app adds none of its own limits below 100) pass intact.
    let mut c = TcpStream::connect(m.client.outbound).await.unwrap();
    c.write_all(request(90).as_bytes()).await.unwrap();
    let r = read_response(&mut c).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let got = m.web_app.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0]
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-h"))
            .count(),
        90
    );

    // The limit: host + 100 more is one over hyper's `max_headers` (100).
    let mut c = TcpStream::connect(m.client.outbound).await.unwrap();
    c.write_all(request(100).as_bytes()).await.unwrap();
    let r = read_response(&mut c).await.unwrap_or_default();
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    assert!(closed_within(&mut c, Duration::from_secs(2)).await);
    assert_eq!(
        m.web_app.received().len(),
        1,
        "refused before reaching the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_app_connections_are_closed_but_slow_requests_are_not() {
    let m = mesh(&["--idle-timeout", "1s"], &[]).await;
    let mut c = TcpStream::connect(m.client.outbound).await.unwrap();
    // Paired: a request in flight for 2.5 s, longer than the idle timeout, completes.
    c.write_all(get("/slow?sleep_ms=2500").as_bytes())
        .await
        .unwrap();
    let r = read_response(&mut c).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // Then nothing: the proxy closes the connection about a second later.
    let start = Instant::now();
    assert!(
        closed_within(&mut c, Duration::from_secs(5)).await,
        "idle connection left open"
    );
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "closed after {waited:?}, too early"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_peer_connections_get_goaway_and_the_mesh_reconnects() {
    let m = mesh(&[], &["--idle-timeout", "1s"]).await;
    let tls = mesh_client_tls(&m.cp);
    let io = mtls_connect(m.web.inbound, tls).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // Paired: a stream slower than the idle timeout completes.
    let req = http::Request::get("http://web.demo/slow?sleep_ms=2500")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    // Then idle: the server closes the connection (GOAWAY), and the client sees it end.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("idle peer connection left open")
        .unwrap()
        .unwrap();

    // Through the mesh: the client proxy's pooled connection is closed the same way, and
    // the next request opens a new one.
    let (status, _, _) = http_get(m.client.outbound, "web.demo", "/one")
        .await
        .unwrap();
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _, body) = http_get(m.client.outbound, "web.demo", "/two")
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// `join_all` without the futures crate: each future on its own task.
async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
