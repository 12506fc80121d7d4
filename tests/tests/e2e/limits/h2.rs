//! HTTP/2 abuse against the inbound listener, with raw frames over mTLS (no HTTP/2
//! library would send them): Rapid Reset, CONTINUATION flood, oversized header lists
//! (reliability.md §3 rows 5, 6, 9). Each paired with legitimate traffic that must pass.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{mesh, mesh_client_tls, mtls_connect};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 5.1) after `first`'s high bits.
fn hpack_int(first: u8, n: u32, mut v: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name (RFC 7541 6.2.2).
fn literal(name: &str, value: &str, out: &mut Vec<u8>) {
    out.push(0x00);
    hpack_int(0, 7, name.len(), out);
    out.extend_from_slice(name.as_bytes());
    hpack_int(0, 7, value.len(), out);
    out.extend_from_slice(value.as_bytes());
}

/// `GET http://web.demo/` as an HPACK block: static-table entries plus the authority.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01]; // :method GET, :scheme http, :path /, :authority
    hpack_int(0, 7, "web.demo".len(), &mut b);
    b.extend_from_slice(b"web.demo");
    b
}

/// The preface, our SETTINGS, and the ACK of the server's: a connection ready for frames.
async fn handshake(
    mut io: TlsStream<TcpStream>,
) -> (
    ReadHalf<TlsStream<TcpStream>>,
    WriteHalf<TlsStream<TcpStream>>,
    Vec<(u16, u32)>,
) {
    io.write_all(PREFACE).await.unwrap();
    io.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let (mut r, mut w) = tokio::io::split(io);
    loop {
        let (kind, flags, _, payload) = read_frame(&mut r).await.expect("server SETTINGS");
        if kind == SETTINGS && flags & ACK == 0 {
            let settings = payload
                .chunks(6)
                .map(|c| {
                    (
                        u16::from_be_bytes([c[0], c[1]]),
                        u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                    )
                })
                .collect();
            w.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
            return (r, w, settings);
        }
    }
}

async fn read_frame(r: &mut ReadHalf<TlsStream<TcpStream>>) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], stream, payload))
}

/// Reads until GOAWAY (its error code) or the end of the connection (`None`).
async fn until_goaway(mut r: ReadHalf<TlsStream<TcpStream>>) -> Option<u32> {
    while let Some((kind, _, _, payload)) = read_frame(&mut r).await {
        if kind == GOAWAY && payload.len() >= 8 {
            return Some(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ]));
        }
    }
    None
}

/// `n` requests through the mesh, on `conns` concurrent app connections; the count of 200s.
async fn legit_traffic(outbound: std::net::SocketAddr, conns: usize, n: usize) -> usize {
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            tokio::spawn(async move {
                let tcp = TcpStream::connect(outbound).await.unwrap();
                let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut ok = 0;
                for i in 0..n / conns {
                    let req = http::Request::get(format!("/legit/{c}/{i}"))
                        .header("host", "web.demo")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    if let Ok(resp) = send.send_request(req).await {
                        let status = resp.status();
                        if resp.into_body().collect().await.is_ok() && status == 200 {
                            ok += 1;
                        }
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_advertises_its_stream_and_header_limits() {
    let m = mesh(&[], &[]).await;
    let io = mtls_connect(m.web.inbound, mesh_client_tls(&m.cp)).await;
    let (_r, _w, settings) = handshake(io).await;
    let get = |id| settings.iter().find(|(k, _)| *k == id).map(|(_, v)| *v);
    assert_eq!(
        get(0x3),
        Some(256),
        "SETTINGS_MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    assert_eq!(
        get(0x6),
        Some(64 * 1024),
        "SETTINGS_MAX_HEADER_LIST_SIZE: {settings:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_while_legitimate_clients_are_served() {
    let m = mesh(&[], &[]).await;
    let io = mtls_connect(m.web.inbound, mesh_client_tls(&m.cp)).await;
    let (r, mut w, _) = handshake(io).await;
    let reader = tokio::spawn(until_goaway(r));
    let legit = tokio::spawn(legit_traffic(m.client.outbound, 10, 300));

    // 5000 HEADERS + RST_STREAM pairs (CVE-2023-44487), written as fast as possible.
    let block = get_block();
    let mut sent = 0;
    'attack: for batch in 0..50u32 {
        let mut buf = Vec::new();
        for i in 0..100u32 {
            let id = 2 * (batch * 100 + i) + 1;
            buf.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
            buf.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            break 'attack;
        }
        sent += 100;
    }
    let goaway = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the connection neither got GOAWAY nor closed")
        .unwrap();
    assert_eq!(goaway, Some(ENHANCE_YOUR_CALM), "after {sent} resets");
    let reached_app = m
        .web_app
        .received()
        .iter()
        .filter(|r| r.path_and_query == "/")
        .count();
    assert!(
        reached_app < 1000,
        "{reached_app} of {sent} reset requests reached the app"
    );

    assert_eq!(
        legit.await.unwrap(),
        300,
        "legitimate requests failed during the attack"
    );
    let (status, _, _) = trellis_e2e::http_get(m.client.outbound, "web.demo", "/after")
        .await
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_after_a_few_frames() {
    let m = mesh(&[], &[]).await;
    let io = mtls_connect(m.web.inbound, mesh_client_tls(&m.cp)).await;
    let (r, mut w, _) = handshake(io).await;
    let reader = tokio::spawn(until_goaway(r));

    // HEADERS without END_HEADERS, then 8 KiB CONTINUATIONs that never end the block.
    w.write_all(&frame(HEADERS, END_STREAM, 1, &get_block()))
        .await
        .unwrap();
    let mut chunk = Vec::new();
    literal("x-flood", &"a".repeat(8 * 1024), &mut chunk);
    let mut sent = 0;
    for _ in 0..1000 {
        if w.write_all(&frame(CONTINUATION, 0, 1, &chunk))
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
        // Let the server's answer arrive before the socket buffers hide it.
        if sent % 8 == 0 && reader.is_finished() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let goaway = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the connection neither got GOAWAY nor closed")
        .unwrap();
    assert_eq!(
        goaway,
        Some(ENHANCE_YOUR_CALM),
        "after {sent} CONTINUATION frames"
    );
    assert!(sent < 1000, "the proxy kept reading all {sent} frames");
    assert!(m.web_app.received().is_empty());

    // Paired: a legitimate request on a fresh connection is served.
    let io = mtls_connect(m.web.inbound, mesh_client_tls(&m.cp)).await;
    let (mut r, mut w, _) = handshake(io).await;
    w.write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &get_block()))
        .await
        .unwrap();
    let status = loop {
        let (kind, _, stream, payload) = read_frame(&mut r).await.expect("a response");
        if kind == PING {
            w.write_all(&frame(PING, ACK, 0, &payload)).await.unwrap();
        }
        if kind == HEADERS && stream == 1 {
            break payload.first().copied();
        }
    };
    assert_eq!(status, Some(0x88), ":status 200 (HPACK static index 8)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_list_over_64k_is_431_while_48k_passes() {
    let m = mesh(&[], &[]).await;
    let io = mtls_connect(m.web.inbound, mesh_client_tls(&m.cp)).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Paired: 48 KiB of headers (decoded) pass and reach the app intact.
    assert_eq!(status_with_header(&mut send, 48 * 1024).await, 200);
    let got = m.web_app.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["x-big"].len(), 48 * 1024);
    // The limit: over 64 KiB decoded is refused with 431 before the app.
    assert_eq!(status_with_header(&mut send, 70 * 1024).await, 431);
    assert_eq!(m.web_app.received().len(), 1);
}

/// One request carrying a header of `size` bytes; its status.
async fn status_with_header(
    send: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    size: usize,
) -> u16 {
    let req = http::Request::get("http://web.demo/big-headers")
        .header("x-big", "b".repeat(size))
        .body(Empty::<Bytes>::new())
        .unwrap();
    send.send_request(req).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_with_a_hundred_concurrent_streams_is_never_cut() {
    // Paired with every HTTP/2 flood guard (reliability.md §3 row 7): heavy, legitimate
    // multiplexing on one connection for a few seconds gets no GOAWAY and no reset.
    let m = mesh(&[], &[]).await;
    let io = mtls_connect(m.web.inbound, mesh_client_tls(&m.cp)).await;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let streams: Vec<_> = (0..100)
        .map(|s| {
            let mut send = send.clone();
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0, Vec::new());
                let mut i = 0;
                while std::time::Instant::now() < until {
                    // A little server time keeps all 100 streams open at once.
                    let req = http::Request::get(format!("http://web.demo/s{s}/{i}?sleep_ms=20"))
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    match send.send_request(req).await {
                        Ok(r) => {
                            let status = r.status();
                            match r.into_body().collect().await {
                                Ok(_) if status == 200 => ok += 1,
                                Ok(_) => failed.push(format!("status {status}")),
                                Err(e) => failed.push(format!("body: {e}")),
                            }
                        }
                        Err(e) => failed.push(e.to_string()),
                    }
                    i += 1;
                }
                (ok, failed)
            })
        })
        .collect();
    let mut total = 0;
    for s in streams {
        let (ok, failed) = s.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        total += ok;
    }
    assert!(total >= 1000, "only {total} requests in 3 s");
    assert!(
        !conn.is_finished(),
        "the connection was closed under legitimate load"
    );
    assert_eq!(m.web_app.received().len(), total);
}
