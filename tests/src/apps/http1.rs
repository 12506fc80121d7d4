//! HTTP/1.1: a hyper echo server and raw-socket clients that show exactly what came back
//! (status line, headers in order, framing, interim `1xx` responses).
//!
//! Server routes (any method unless said):
//! - `/chunked?n=N&delay_ms=D`: `N` (default 3) chunks `chunk <i>\n`, `D` ms (default 20)
//!   apart, chunked transfer encoding.
//! - `/big?bytes=N`: `N` bytes of the [`pattern`](super::pattern) stream in 64 KiB chunks,
//!   generated as they are sent (never buffered), with `Content-Length`.
//! - `/sink`: reads the body as it streams, answers its length in decimal with
//!   `x-pattern-ok: true|false` (whether it was the pattern stream).
//! - anything else: `POST`, `PUT`, `PATCH` echo the body back as it streams (with the
//!   request's `Content-Length` when it had one, else chunked); other methods answer
//!   `<name> <METHOD> <path?query>`.
//!
//! Every route honours `?sleep_ms=N` (wait before answering) and `?status=NNN`. Every
//! response carries `x-served-by: <name>` and `x-conn-request: <n>` (the request's position on
//! its server-side connection). `Expect: 100-continue` is answered by hyper when the body is
//! first read, which the echo route does before it sends its head.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::{
    AppKind, BODY_KEEP, Entry, Listen, PATTERN_CHUNK, Received, Recorder, accept_loop, connect,
    must_listen, pattern_chunk, pattern_mismatch, timed,
};

/// How long [`http_expect_continue`] waits for `100 Continue` before sending the body anyway
/// (as curl does after 1 s).
pub const CONTINUE_WAIT: Duration = Duration::from_secs(3);

/// Largest response head the clients accept.
const MAX_HEAD: usize = 64 * 1024;

type Body = BoxBody<Bytes, std::io::Error>;

/// The HTTP/1.1 echo server on `listen` (a port on `0.0.0.0`, or a bound listener); `name`
/// goes into `x-served-by` and `GET` answers. Runs until dropped.
pub async fn http_server(listen: impl Listen, name: impl Into<String>, rec: Recorder) {
    let listener = must_listen(listen, "http_server");
    let name: Arc<str> = name.into().into();
    accept_loop(listener, move |tcp, peer| {
        let (name, rec) = (name.clone(), rec.clone());
        async move {
            let count = Arc::new(AtomicU64::new(0));
            let svc = hyper::service::service_fn(move |req| {
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                handle(req, peer, n, name.clone(), rec.clone())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        }
    })
    .await
}

/// The value of `key` in a query string.
fn query<'q>(q: &'q str, key: &str) -> Option<&'q str> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find_map(|(k, v)| (k == key).then_some(v))
}

fn query_num<T: std::str::FromStr>(q: &str, key: &str) -> Option<T> {
    query(q, key).and_then(|v| v.parse().ok())
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

async fn handle(
    req: http::Request<Incoming>,
    peer: SocketAddr,
    conn_request: u64,
    name: Arc<str>,
    rec: Recorder,
) -> Result<http::Response<Body>, Infallible> {
    let (parts, mut body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let q = parts.uri.query().unwrap_or("").to_owned();
    let entry = rec.push(Received {
        method: parts.method.to_string(),
        target: pq.clone(),
        headers: parts.headers.clone(),
        conn_request,
        ..Received::new(AppKind::Http, peer)
    });

    if let Some(ms) = query_num::<u64>(&q, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut resp = http::Response::builder()
        .status(query_num::<u16>(&q, "status").unwrap_or(200))
        .header("x-served-by", &*name)
        .header("x-conn-request", conn_request);

    let body: Body = match path.as_str() {
        "/chunked" => {
            drain(&mut body, &entry).await;
            let n = query_num::<u32>(&q, "n").unwrap_or(3);
            let delay = Duration::from_millis(query_num(&q, "delay_ms").unwrap_or(20));
            let chunks = stream::unfold(0, move |i| async move {
                if i >= n {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(delay).await;
                }
                let data = Bytes::from(format!("chunk {i}\n"));
                Some((Ok(Frame::data(data)), i + 1))
            });
            StreamBody::new(chunks).boxed()
        }
        "/big" => {
            drain(&mut body, &entry).await;
            let total = query_num::<u64>(&q, "bytes").unwrap_or(1 << 20);
            resp = resp.header(http::header::CONTENT_LENGTH, total);
            let chunks = stream::unfold(0u64, move |sent| async move {
                if sent >= total {
                    return None;
                }
                let len = (total - sent).min(PATTERN_CHUNK as u64) as usize;
                let data = pattern_chunk(sent, len);
                Some((Ok(Frame::data(data)), sent + len as u64))
            });
            StreamBody::new(chunks).boxed()
        }
        "/sink" => {
            let (mut len, mut ok) = (0u64, true);
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(data) = frame.data_ref() {
                    entry.append_body(data);
                    ok &= pattern_mismatch(len, data).is_none();
                    len += data.len() as u64;
                }
            }
            resp = resp.header("x-pattern-ok", ok.to_string());
            full(len.to_string())
        }
        _ if matches!(parts.method.as_str(), "POST" | "PUT" | "PATCH") => {
            if let Some(len) = parts.headers.get(http::header::CONTENT_LENGTH) {
                resp = resp.header(http::header::CONTENT_LENGTH, len);
            }
            // Read the first frame before answering: that is what makes hyper send
            // `100 Continue`, before our head rather than never.
            let first = next_data(&mut body, &entry).await;
            let rest = stream::unfold((first, body, entry), |(first, mut body, entry)| async {
                let data = match first {
                    Some(data) => data,
                    None => next_data(&mut body, &entry).await?,
                };
                Some((data.map(Frame::data), (None, body, entry)))
            });
            StreamBody::new(rest).boxed()
        }
        _ => {
            drain(&mut body, &entry).await;
            full(format!("{name} {} {pq}", parts.method))
        }
    };
    Ok(resp.body(body).unwrap_or_else(|e| {
        let mut r = http::Response::new(full(e.to_string()));
        *r.status_mut() = http::StatusCode::BAD_REQUEST;
        r
    }))
}

/// The next data frame of `body` (trailers skipped), recorded in `entry`; `None` at the end.
async fn next_data(body: &mut Incoming, entry: &Entry) -> Option<Result<Bytes, std::io::Error>> {
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    entry.append_body(&data);
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(std::io::Error::other(e))),
        }
    }
}

/// Reads (and records) the rest of `body`.
async fn drain(body: &mut Incoming, entry: &Entry) {
    while let Some(Ok(_)) = next_data(body, entry).await {}
}

/// One HTTP/1.x response as the client read it off the socket.
#[derive(Debug, Clone, Default)]
pub struct HttpResponse {
    /// `HTTP/1.1` (or whatever the status line said).
    pub version: String,
    /// The final status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: String,
    /// Header fields in the order received, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked); empty when the helper only counted it; at most
    /// [`BODY_KEEP`] bytes for large uploads.
    pub body: Vec<u8>,
    /// Every body byte received, kept or not.
    pub body_len: u64,
    /// Whether the body came with `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// How many chunks a chunked body came in.
    pub chunks: usize,
    /// Trailer fields of a chunked body, names lowercased.
    pub trailers: Vec<(String, String)>,
    /// Interim `1xx` statuses received before the final one (e.g. `100`).
    pub informational: Vec<u16>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as UTF-8 text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the server announced it will close the connection.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// What to do with body bytes as they arrive.
#[derive(Debug, Clone, Copy)]
enum BodyMode {
    /// Keep at most this many bytes (count all).
    Keep(usize),
    /// Keep none; fail on the first byte that is not the pattern stream.
    Pattern,
}

/// One client connection speaking HTTP/1.1 by hand, for exchanges a client library would
/// hide or tidy up (keep-alive, chunked uploads, `Expect`, `Upgrade`).
#[derive(Debug)]
pub struct Http1Conn {
    /// What was dialled (`host:port`): the `Host` header unless a request sets its own.
    pub authority: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Http1Conn {
    /// Connects to `addr` (a `SocketAddr` or `host:port`).
    pub async fn connect(addr: impl fmt::Display) -> anyhow::Result<Self> {
        let authority = addr.to_string();
        let (r, w) = connect(&authority).await?.into_split();
        Ok(Self {
            authority,
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, raw: &[u8]) -> anyhow::Result<()> {
        self.writer.write_all(raw).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// The request head: request line, `Host` (unless `headers` has one), `headers`.
    fn head(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("host: {}\r\n", self.authority));
        }
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head
    }

    /// Sends one request with `body` (and `Content-Length` when there is a body or the
    /// method is `POST`/`PUT`/`PATCH`) and reads the response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<HttpResponse> {
        let mut head = self.head(method, path, headers);
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut raw = head.into_bytes();
        raw.extend_from_slice(body);
        self.send(&raw).await?;
        self.read_response(method == "HEAD").await
    }

    /// Reads one response (interim `1xx` ones other than `101` are collected in
    /// `informational`); `head_request`: the request was `HEAD` (no body follows).
    pub async fn read_response(&mut self, head_request: bool) -> anyhow::Result<HttpResponse> {
        self.read_response_with(head_request, BodyMode::Keep(usize::MAX))
            .await
    }

    async fn read_response_with(
        &mut self,
        head_request: bool,
        mode: BodyMode,
    ) -> anyhow::Result<HttpResponse> {
        let mut informational = Vec::new();
        loop {
            let mut resp = read_head(&mut self.reader).await?;
            if (100..200).contains(&resp.status) && resp.status != 101 {
                informational.push(resp.status);
                continue;
            }
            resp.informational = informational;
            let no_body = head_request || matches!(resp.status, 101 | 204 | 304);
            if !no_body {
                read_body(&mut self.reader, &mut resp, mode).await?;
            }
            return Ok(resp);
        }
    }
}

/// Reads a status line and header fields (no body).
async fn read_head(r: &mut (impl AsyncBufRead + Unpin)) -> anyhow::Result<HttpResponse> {
    let mut lines = Vec::new();
    let mut size = 0;
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).await?;
        anyhow::ensure!(
            n > 0,
            "connection closed {}",
            if lines.is_empty() {
                "before a response".to_owned()
            } else {
                format!("inside a response head: {lines:?}")
            }
        );
        size += n;
        anyhow::ensure!(size <= MAX_HEAD, "response head over {MAX_HEAD} bytes");
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            if lines.is_empty() {
                continue; // stray CRLF between responses
            }
            break;
        }
        lines.push(line);
    }
    let status_line = &lines[0];
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default().to_owned();
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line {status_line:?}"))?;
    anyhow::ensure!(
        version.starts_with("HTTP/1."),
        "bad status line {status_line:?}"
    );
    let reason = parts.next().unwrap_or_default().to_owned();
    Ok(HttpResponse {
        version,
        status,
        reason,
        headers: parse_fields(&lines[1..])?,
        ..HttpResponse::default()
    })
}

fn parse_fields(lines: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    lines
        .iter()
        .map(|l| {
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("bad header line {l:?}"))?;
            Ok((n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect()
}

/// Reads the body that `resp`'s head announces, into `resp` as `mode` says.
async fn read_body(
    r: &mut (impl AsyncBufRead + Unpin),
    resp: &mut HttpResponse,
    mode: BodyMode,
) -> anyhow::Result<()> {
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let length = resp
        .header("content-length")
        .map(|v| v.parse::<u64>())
        .transpose()
        .map_err(|e| anyhow::anyhow!("bad content-length: {e}"))?;
    let take = |resp: &mut HttpResponse, data: &[u8]| -> anyhow::Result<()> {
        match mode {
            BodyMode::Keep(limit) => {
                let room = limit.saturating_sub(resp.body.len());
                resp.body.extend_from_slice(&data[..data.len().min(room)]);
            }
            BodyMode::Pattern => {
                if let Some(i) = pattern_mismatch(resp.body_len, data) {
                    anyhow::bail!("body byte {i} is not the pattern stream's");
                }
            }
        }
        resp.body_len += data.len() as u64;
        Ok(())
    };
    if chunked {
        resp.chunked = true;
        loop {
            let mut line = String::new();
            anyhow::ensure!(
                r.read_line(&mut line).await? > 0,
                "connection closed inside a chunked body"
            );
            let size = line.trim_end().split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| anyhow::anyhow!("bad chunk size line {line:?}"))?;
            if size == 0 {
                let mut trailers = Vec::new();
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t).await?;
                    let t = t.trim_end_matches(['\r', '\n']).to_owned();
                    if t.is_empty() {
                        break;
                    }
                    trailers.push(t);
                }
                resp.trailers = parse_fields(&trailers)?;
                return Ok(());
            }
            resp.chunks += 1;
            let mut left = size;
            while left > 0 {
                let buf = r.fill_buf().await?;
                anyhow::ensure!(!buf.is_empty(), "connection closed inside a chunk");
                let n = buf.len().min(left as usize);
                take(resp, &buf[..n])?;
                r.consume(n);
                left -= n as u64;
            }
            let mut crlf = String::new();
            r.read_line(&mut crlf).await?;
            anyhow::ensure!(crlf.trim().is_empty(), "chunk not followed by CRLF");
        }
    }
    let mut left = length.unwrap_or(u64::MAX);
    while left > 0 {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            anyhow::ensure!(
                length.is_none(),
                "connection closed {left} bytes before the end of the body"
            );
            return Ok(());
        }
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        take(resp, &buf[..n])?;
        r.consume(n);
        left -= n as u64;
    }
    Ok(())
}

/// One request on a new connection: `method path` with `headers` and `body`.
pub async fn http_request(
    addr: impl fmt::Display,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    timed(format!("{method} {path} to {addr}"), async {
        let mut conn = Http1Conn::connect(&addr).await?;
        conn.request(method, path, headers, body).await
    })
    .await
}

/// `GET path` on a new connection.
pub async fn http_get(addr: impl fmt::Display, path: &str) -> anyhow::Result<HttpResponse> {
    http_request(addr, "GET", path, &[], &[]).await
}

/// `GET` each of `paths` in turn on ONE connection (keep-alive); fails if the connection
/// closes before every response is in.
pub async fn http_keep_alive(
    addr: impl fmt::Display,
    paths: &[&str],
) -> anyhow::Result<Vec<HttpResponse>> {
    timed(format!("keep-alive GETs to {addr}"), async {
        let mut conn = Http1Conn::connect(&addr).await?;
        let mut out = Vec::new();
        for path in paths {
            let resp = conn.request("GET", path, &[], &[]).await.map_err(|e| {
                anyhow::anyhow!(
                    "request {} of {} on one connection: {e}",
                    out.len() + 1,
                    paths.len()
                )
            })?;
            out.push(resp);
        }
        Ok(out)
    })
    .await
}

/// `POST path` with `Transfer-Encoding: chunked`, each of `chunks` written (and flushed)
/// separately, 5 ms apart.
pub async fn http_chunked_upload(
    addr: impl fmt::Display,
    path: &str,
    chunks: &[&[u8]],
) -> anyhow::Result<HttpResponse> {
    timed(format!("chunked POST {path} to {addr}"), async {
        let mut conn = Http1Conn::connect(&addr).await?;
        let head = conn.head("POST", path, &[("transfer-encoding", "chunked")]) + "\r\n";
        conn.send(head.as_bytes()).await?;
        for chunk in chunks.iter().filter(|c| !c.is_empty()) {
            let mut raw = format!("{:x}\r\n", chunk.len()).into_bytes();
            raw.extend_from_slice(chunk);
            raw.extend_from_slice(b"\r\n");
            conn.send(&raw).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        conn.send(b"0\r\n\r\n").await?;
        conn.read_response(false).await
    })
    .await
}

/// `POST path` with `Expect: 100-continue`: sends the head, waits (up to
/// [`CONTINUE_WAIT`]) for `100 Continue`, then sends `body`. A final response instead of
/// `100` is returned as is, without the body sent. The `100`, when it came, is in
/// `informational`.
pub async fn http_expect_continue(
    addr: impl fmt::Display,
    path: &str,
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    timed(
        format!("Expect: 100-continue POST {path} to {addr}"),
        async {
            let mut conn = Http1Conn::connect(&addr).await?;
            let len = body.len().to_string();
            let headers = [("expect", "100-continue"), ("content-length", len.as_str())];
            let head = conn.head("POST", path, &headers) + "\r\n";
            conn.send(head.as_bytes()).await?;
            let mut informational = Vec::new();
            // No answer in time: send the body anyway, as clients do.
            if let Ok(interim) =
                tokio::time::timeout(CONTINUE_WAIT, read_head(&mut conn.reader)).await
            {
                let mut interim = interim?;
                if interim.status != 100 {
                    read_body(&mut conn.reader, &mut interim, BodyMode::Keep(usize::MAX)).await?;
                    return Ok(interim);
                }
                informational.push(100);
            }
            conn.send(body).await?;
            let mut resp = conn.read_response(false).await?;
            informational.append(&mut resp.informational);
            resp.informational = informational;
            Ok(resp)
        },
    )
    .await
}

/// `POST path` with a `bytes`-long body of the [`pattern`](super::pattern) stream, generated
/// and written while the response is read (so an echoing server can stream it back). Keeps
/// at most [`BODY_KEEP`] bytes of the response body; `body_len` counts it all. Against
/// `/sink` the body is the byte count the server read.
pub async fn http_big_upload(
    addr: impl fmt::Display,
    path: &str,
    bytes: u64,
) -> anyhow::Result<HttpResponse> {
    timed(format!("{bytes}-byte POST {path} to {addr}"), async {
        let mut conn = Http1Conn::connect(&addr).await?;
        let len = bytes.to_string();
        let head = conn.head("POST", path, &[("content-length", len.as_str())]) + "\r\n";
        conn.send(head.as_bytes()).await?;
        let Http1Conn { reader, writer, .. } = &mut conn;
        let write = async {
            let mut sent = 0;
            while sent < bytes {
                let n = (bytes - sent).min(PATTERN_CHUNK as u64) as usize;
                writer.write_all(&pattern_chunk(sent, n)).await?;
                sent += n as u64;
            }
            writer.flush().await?;
            anyhow::Ok(())
        };
        let read = async {
            let mut resp = read_head(reader).await?;
            while (100..200).contains(&resp.status) {
                resp = read_head(reader).await?;
            }
            read_body(reader, &mut resp, BodyMode::Keep(BODY_KEEP)).await?;
            anyhow::Ok(resp)
        };
        let (written, resp) = tokio::join!(write, read);
        let resp = resp?;
        // A server may answer (e.g. 413) before reading everything; the answer counts.
        if resp.status < 300 {
            written?;
        }
        Ok(resp)
    })
    .await
}

/// `GET /big?bytes=N`: reads the body as it streams, checking every byte against the
/// [`pattern`](super::pattern) stream and keeping none (`body` stays empty; `body_len`
/// counts). Fails on the first wrong byte.
pub async fn http_big_download(
    addr: impl fmt::Display,
    bytes: u64,
) -> anyhow::Result<HttpResponse> {
    timed(format!("{bytes}-byte GET from {addr}"), async {
        let mut conn = Http1Conn::connect(&addr).await?;
        let head = conn.head("GET", &format!("/big?bytes={bytes}"), &[]) + "\r\n";
        conn.send(head.as_bytes()).await?;
        conn.read_response_with(false, BodyMode::Pattern).await
    })
    .await
}

/// Reads one raw response head from `r` (for the other apps' raw checks).
pub(crate) async fn read_response_head(
    r: &mut (impl AsyncBufRead + Unpin),
) -> anyhow::Result<HttpResponse> {
    read_head(r).await
}

/// Reads a body framed as `resp` says, keeping it all (for the other apps' raw checks).
pub(crate) async fn read_response_body(
    r: &mut (impl AsyncBufRead + Unpin),
    resp: &mut HttpResponse,
) -> anyhow::Result<()> {
    read_body(r, resp, BodyMode::Keep(usize::MAX)).await
}
