//! Protocol "apps" that end-to-end tests run on each side of two Trellis proxies: servers
//! and clients for HTTP/1.1, gRPC, WebSocket, opaque TCP (echo and server-speaks-first),
//! TLS the app originates, and an h2c upgrade attempt.
//!
//! Each is a plain async function so a test can run it in a pod's thread
//! (`pod.spawn(|| http_server(8080, "web-1", rec.clone()))`,
//! `pod.run(|| http_get("web.demo:80", "/"))`). Servers listen on `0.0.0.0:<port>` or on a
//! listener already bound (see [`Listen`]), panic when they cannot, and stop, connections
//! included, when their future is dropped. Clients take a `SocketAddr` or a `host:port`
//! string (anything `Display`) and return what they observed, so tests assert on bytes.
//! Servers push what they receive into a [`Recorder`].

#![warn(missing_docs)]

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::{TcpListener, TcpStream};

pub mod grpc;
pub mod h2c;
pub mod http1;
pub mod tcp;
pub mod tls;
pub mod ws;

pub use grpc::{EchoReply, EchoRequest, GrpcCall, GrpcClient, echo_request, grpc_server};
pub use h2c::h2c_upgrade;
pub use http1::{
    Http1Conn, HttpResponse, http_big_download, http_big_upload, http_chunked_upload,
    http_expect_continue, http_get, http_keep_alive, http_request, http_server,
};
pub use tcp::{
    GREETING, Greeted, tcp_echo, tcp_echo_server, tcp_greeting_echo, tcp_greeting_server,
};
pub use tls::{TlsCert, TlsEcho, tls_echo, tls_echo_server};
pub use ws::{WS_ACCEPT, WS_KEY, WS_SERVER_HEADER, WsFrame, ws_echo, ws_handshake, ws_server};

/// Longest any client helper waits for its whole exchange before failing.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many body bytes a [`Received`] keeps; `body_len` counts them all.
pub const BODY_KEEP: usize = 1 << 20;

/// The header an inbound Trellis proxy sets: `By=<its id>;URI=<the caller's id>`.
pub const XFCC: &str = "x-forwarded-client-cert";

/// Which app recorded a [`Received`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppKind {
    /// [`http_server`]: one entry per request.
    Http,
    /// [`grpc_server`]: one entry per call.
    Grpc,
    /// [`ws_server`]: one entry per WebSocket connection.
    WebSocket,
    /// [`tcp_echo_server`] or [`tcp_greeting_server`]: one entry per connection.
    Tcp,
    /// [`tls_echo_server`]: one entry per TLS connection.
    Tls,
}

/// What a server received: one request, call or connection.
///
/// Bytes are recorded as they arrive, before they are echoed, so by the time a client has
/// its echo the server's record of it is already there.
#[derive(Debug, Clone)]
pub struct Received {
    /// Which app.
    pub kind: AppKind,
    /// The TCP peer (through the mesh: the inbound proxy).
    pub peer: SocketAddr,
    /// HTTP method; the RPC name for gRPC (`Unary`, `ServerStream`, ...); empty for TCP/TLS.
    pub method: String,
    /// Path and query (HTTP, WebSocket); the full gRPC path; empty for TCP/TLS.
    pub target: String,
    /// Request headers (HTTP, WebSocket handshake) or request metadata (gRPC); empty for
    /// TCP/TLS.
    pub headers: http::HeaderMap,
    /// The first [`BODY_KEEP`] bytes of the request body, or of the connection's bytes
    /// (TCP, TLS: decrypted).
    pub body: Vec<u8>,
    /// Every body byte received, kept or not.
    pub body_len: u64,
    /// WebSocket: each data message's payload; gRPC: each request's `message`.
    pub messages: Vec<Vec<u8>>,
    /// TLS: the SNI the client sent.
    pub server_name: Option<String>,
    /// HTTP: the position of this request on its server-side connection (1 = first).
    pub conn_request: u64,
}

impl Received {
    fn new(kind: AppKind, peer: SocketAddr) -> Self {
        Self {
            kind,
            peer,
            method: String::new(),
            target: String::new(),
            headers: http::HeaderMap::new(),
            body: Vec::new(),
            body_len: 0,
            messages: Vec::new(),
            server_name: None,
            conn_request: 0,
        }
    }

    /// The first value of header `name`, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// The `x-forwarded-client-cert` header the server saw.
    pub fn xfcc(&self) -> Option<String> {
        self.header(XFCC)
    }

    /// The caller's identity: the `URI=` of the `x-forwarded-client-cert` header.
    pub fn caller(&self) -> Option<String> {
        self.xfcc().as_deref().and_then(xfcc_uri)
    }

    /// The messages as UTF-8 text (lossy).
    pub fn messages_text(&self) -> Vec<String> {
        self.messages
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect()
    }

    fn append_body(&mut self, chunk: &[u8]) {
        let room = BODY_KEEP.saturating_sub(self.body.len());
        self.body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        self.body_len += chunk.len() as u64;
    }
}

/// The `URI=` value of the last element of an `x-forwarded-client-cert` value
/// (`By=spiffe://..;URI=spiffe://..`), unquoted.
pub fn xfcc_uri(xfcc: &str) -> Option<String> {
    let element = xfcc.rsplit(',').next()?;
    element.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        k.eq_ignore_ascii_case("uri")
            .then(|| v.trim_matches('"').to_owned())
    })
}

/// Where servers record what they receive; cheap to clone, shared across threads.
#[derive(Debug, Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Received>>>);

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything received so far, oldest first.
    pub fn all(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }

    /// The newest entry.
    pub fn last(&self) -> Option<Received> {
        self.0.lock().unwrap().last().cloned()
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// Adds an entry; returns a handle to update it as more arrives.
    fn push(&self, entry: Received) -> Entry {
        let mut all = self.0.lock().unwrap();
        all.push(entry);
        Entry {
            rec: self.clone(),
            index: all.len() - 1,
        }
    }
}

/// One entry of a [`Recorder`], updated in place while its request or connection lasts.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    rec: Recorder,
    index: usize,
}

impl Entry {
    fn update(&self, f: impl FnOnce(&mut Received)) {
        let mut all = self.rec.0.lock().unwrap();
        // `clear` may have dropped it: then there is nothing to update.
        if let Some(entry) = all.get_mut(self.index) {
            f(entry);
        }
    }

    fn append_body(&self, chunk: &[u8]) {
        self.update(|r| r.append_body(chunk));
    }

    fn push_message(&self, message: Vec<u8>) {
        self.update(|r| r.messages.push(message));
    }
}

/// Byte `i` of the deterministic stream that large transfers carry (`/big`, `/sink`,
/// [`http_big_upload`]), so either side can check every byte without keeping any.
pub fn pattern_byte(i: u64) -> u8 {
    (i % PATTERN_PERIOD) as u8
}

/// Bytes `[offset, offset + len)` of the [`pattern_byte`] stream.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(pattern_byte).collect()
}

const PATTERN_PERIOD: u64 = 251;

/// Size of the chunks large bodies are sent in.
const PATTERN_CHUNK: usize = 64 * 1024;

/// `PATTERN_CHUNK + PATTERN_PERIOD` bytes of the pattern from offset 0: any chunk of up to
/// `PATTERN_CHUNK` bytes at any offset is a slice of it (no copy, no per-byte work).
static PATTERN_BUF: std::sync::LazyLock<Bytes> =
    std::sync::LazyLock::new(|| Bytes::from(pattern(0, PATTERN_CHUNK + PATTERN_PERIOD as usize)));

/// `len` (at most `PATTERN_CHUNK`) pattern bytes from `offset`, as a slice of the shared
/// buffer.
fn pattern_chunk(offset: u64, len: usize) -> Bytes {
    let start = (offset % PATTERN_PERIOD) as usize;
    PATTERN_BUF.slice(start..start + len.min(PATTERN_CHUNK))
}

/// Checks `chunk` against the pattern at `offset`: the index of the first wrong byte.
fn pattern_mismatch(offset: u64, chunk: &[u8]) -> Option<u64> {
    let mut at = offset;
    for piece in chunk.chunks(PATTERN_CHUNK) {
        if piece != pattern_chunk(at, piece.len()) {
            let wrong = piece
                .iter()
                .zip(at..)
                .find(|(b, i)| **b != pattern_byte(*i));
            return wrong.map(|(_, i)| i);
        }
        at += piece.len() as u64;
    }
    None
}

/// Where a server listens: a port (bound on `0.0.0.0`, as apps in pods do), or a listener
/// already bound (a std one, e.g. from `Pod::listen`, so no client can race the server's
/// start; or a tokio one).
pub trait Listen {
    /// The listener, bound.
    fn into_listener(self) -> anyhow::Result<TcpListener>;
}

impl Listen for u16 {
    fn into_listener(self) -> anyhow::Result<TcpListener> {
        let addr = SocketAddr::from(([0, 0, 0, 0], self));
        let l =
            std::net::TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("bind {addr}: {e}"))?;
        l.into_listener()
    }
}

impl Listen for std::net::TcpListener {
    fn into_listener(self) -> anyhow::Result<TcpListener> {
        self.set_nonblocking(true)?;
        Ok(TcpListener::from_std(self)?)
    }
}

impl Listen for TcpListener {
    fn into_listener(self) -> anyhow::Result<TcpListener> {
        Ok(self)
    }
}

/// The listener of server `app`; panics (the server cannot run) when it cannot be had.
fn must_listen(listen: impl Listen, app: &str) -> TcpListener {
    listen
        .into_listener()
        .unwrap_or_else(|e| panic!("{app} cannot listen: {e:#}"))
}

/// Connects to `addr` (a `SocketAddr` or `host:port`), with `TCP_NODELAY`.
async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Runs a client exchange under [`CLIENT_TIMEOUT`].
async fn timed<T>(
    what: impl fmt::Display,
    f: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(CLIENT_TIMEOUT, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: no answer within {CLIENT_TIMEOUT:?}"))?
}

/// Accepts connections until dropped, running `handle` for each in a task that is
/// aborted when this future is dropped (so stopping a server closes its connections).
async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(handle(tcp, peer));
                }
                // EMFILE and friends: back off and keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Waits until something accepts TCP connections at `addr` (a server started in another
/// task or pod), trying every 10 ms for up to `within`. The probe connects and closes at
/// once: the TCP echo servers record it as an empty entry (the others record nothing).
pub async fn wait_listening(addr: impl fmt::Display, within: Duration) -> anyhow::Result<()> {
    let addr = addr.to_string();
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect(addr.as_str()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("nothing listens at {addr} after {within:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
