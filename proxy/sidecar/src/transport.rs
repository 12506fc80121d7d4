//! Connection plumbing shared by the listeners: the limits every connection is held to,
//! the accept loop (a cap per listener, one tracked task per connection), HTTP server
//! builders with those limits set, and serving a connection until it ends, goes idle or
//! the proxy drains.
//!
//! | limit | default | where | over it |
//! | --- | --- | --- | --- |
//! | connections per listener | 10 000 (`--max-connections`) | [`accept_loop`] | accepted and reset at once |
//! | idle connection | 5 min (`--idle-timeout`) | [`serve_http1`], [`serve_http2`] | graceful close |
//! | HTTP/1 request head time | 10 s (`--header-read-timeout`) | [`h1_server_builder`] | connection closed |
//! | HTTP/1 header count | [`MAX_HEADERS`] | [`h1_server_builder`] | 431, closed |
//! | HTTP/1 head / HTTP/2 header list | [`MAX_HEADER_BYTES`] | both builders | 431 |
//! | HTTP/2 streams, resets, CONTINUATION | see [`h2_server_builder`] | [`h2_server_builder`] | REFUSED_STREAM / GOAWAY |
//!
//! The inbound listener's peer connections are served by [`crate::peer::server`] on `h2`
//! directly, held to the same [`Limits`] with the same HTTP/2 settings.

mod idle;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

pub use idle::{Busy, IdleBody, IdleTimer, TrackIdle};

use crate::config::Config;
use crate::metrics::{ListenerLabels, Metrics};

/// Default cap on open connections per listener.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Default time a connection may stay open with no request in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Default time an HTTP/1 client has to send a request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Request headers an HTTP/1 request may carry (hyper's default, made explicit).
pub const MAX_HEADERS: usize = 100;
/// Size of an HTTP/1 request head, and of a decoded HTTP/2 header list.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Streams one HTTP/2 client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams the client reset before we accepted them, after which we send GOAWAY
/// (Rapid Reset, CVE-2023-44487); h2's own default.
pub const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams we reset because the client broke the protocol, after which we send GOAWAY
/// (RUSTSEC-2024-0003); hyper's own default.
pub const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// How often an HTTP/2 connection is PINGed to detect a dead peer.
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is closed.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a connection closed for idleness may take to say goodbye (GOAWAY, PING).
pub(crate) const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed accept: EMFILE would otherwise make the loop spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// The limits a listener and its connections are held to; see the module table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open connections per listener.
    pub max_connections: usize,
    /// Time without a request in flight before a connection is closed; zero: never.
    pub idle_timeout: Duration,
    /// Time an HTTP/1 client has to send a request head (also between requests).
    pub header_read_timeout: Duration,
    /// Headers per HTTP/1 request.
    pub max_headers: usize,
    /// Bytes of an HTTP/1 request head or an HTTP/2 decoded header list.
    pub max_header_bytes: usize,
    /// HTTP/2 concurrent streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client before accept, before GOAWAY.
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams reset for client errors, before GOAWAY.
    pub h2_max_local_error_reset_streams: usize,
}

/// A bound listener and the cap on its open connections: what [`accept_loop`] serves.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    max_connections: usize,
    metrics: Option<Metrics>,
}

/// One admitted connection: holds its slot and the open-connections gauge up.
struct Admitted {
    _permit: OwnedSemaphorePermit,
    open: Option<Gauge>,
}

// === impl Limits ===

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_headers: MAX_HEADERS,
            max_header_bytes: MAX_HEADER_BYTES,
            h2_max_concurrent_streams: H2_MAX_CONCURRENT_STREAMS,
            h2_max_pending_accept_reset_streams: H2_MAX_PENDING_ACCEPT_RESET_STREAMS,
            h2_max_local_error_reset_streams: H2_MAX_LOCAL_ERROR_RESET_STREAMS,
        }
    }
}

impl From<&Config> for Limits {
    fn from(cfg: &Config) -> Self {
        Self {
            max_connections: cfg.max_connections as usize,
            idle_timeout: cfg.idle_timeout,
            header_read_timeout: cfg.header_read_timeout,
            ..Self::default()
        }
    }
}

// === impl Listener ===

impl Listener {
    /// Wraps a bound listener with `limits.max_connections`, counting its connections
    /// in `metrics` (`trellis_proxy_connections_open`, `..._refused_total`).
    pub fn new(tcp: TcpListener, limits: &Limits, metrics: &Metrics) -> Self {
        Self {
            tcp,
            max_connections: limits.max_connections.max(1),
            metrics: Some(metrics.clone()),
        }
    }

    /// Sets the cap on open connections (at least 1).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// A bare listener gets the default cap and no metrics (tests, tools).
impl From<TcpListener> for Listener {
    fn from(tcp: TcpListener) -> Self {
        Self {
            tcp,
            max_connections: Limits::default().max_connections,
            metrics: None,
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(g) = &self.open {
            g.dec();
        }
    }
}

/// Keeps the pooled connections in `pools` (lists by address) that `keep` accepts, drops
/// emptied lists, and returns how many were dropped: both connection pools' reaping.
pub fn retain_pooled<K, T>(
    pools: &mut std::collections::HashMap<K, Vec<T>>,
    mut keep: impl FnMut(&T) -> bool,
) -> usize {
    let mut dropped = 0;
    pools.retain(|_, list| {
        let before = list.len();
        list.retain(&mut keep);
        dropped += before - list.len();
        !list.is_empty()
    });
    dropped
}

/// Runs `reap` every 30 s until `stop`: the connection pools close what sat idle.
pub fn reap_every_30s(stop: CancellationToken, mut reap: impl FnMut() + Send + 'static) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = tick.tick() => reap(),
                () = stop.cancelled() => return,
            }
        }
    });
}

/// Accepts on `listener` until `shutdown`, running `handle` for each connection as a
/// task in `tasks` (so the drain can wait for it). At most the listener's
/// `max_connections` are open at once: one more is accepted and reset at once (a flood
/// then costs an accept, not a task and buffers), and counted as refused. Returning
/// drops the listener, so new connections are refused from the moment the drain starts.
pub async fn accept_loop<F, Fut>(
    listener: impl Into<Listener>,
    what: &'static str,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Listener {
        tcp: listener,
        max_connections,
        metrics,
    } = listener.into();
    let slots = Arc::new(Semaphore::new(max_connections));
    let label = ListenerLabels { listener: what };
    let open = metrics
        .as_ref()
        .map(|m| m.connections_open.get_or_create(&label).clone());
    let refused: Option<Counter> = metrics
        .as_ref()
        .map(|m| m.connections_refused.get_or_create(&label).clone());
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(error) => {
                    // Typically EMFILE: keep serving the connections we have.
                    warn!(%error, listener = what, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Reset rather than FIN: no TIME_WAIT left behind per refused connection.
            let _ = tcp.set_zero_linger();
            if let Some(c) = &refused {
                c.inc();
            }
            debug!(%remote, listener = what, max_connections, "connection refused: listener full");
            continue;
        };
        if let Some(g) = &open {
            g.inc();
        }
        let admitted = Admitted {
            _permit: permit,
            open: open.clone(),
        };
        let _ = tcp.set_nodelay(true);
        let conn = handle(tcp, remote);
        tasks.spawn(async move {
            let _admitted = admitted;
            conn.await;
        });
    }
}

/// The HTTP/1 server builder every listener uses: hyper's timer, the request head
/// bounded in time (`header_read_timeout`, which hyper also runs while a keep-alive
/// connection waits for its next request) and in size (`max_header_bytes`, 431), at most
/// `max_headers` headers (431).
pub fn h1_server_builder(cfg: &Limits) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_headers(cfg.max_headers)
        .max_header_size(cfg.max_header_bytes)
        // The read buffer bounds the head too; bodies stream through it.
        .max_buf_size(cfg.max_header_bytes.max(8 * 1024));
    b
}

/// The HTTP/2 server builder (inbound, and outbound for apps speaking HTTP/2):
///
/// - `max_concurrent_streams` ([`H2_MAX_CONCURRENT_STREAMS`]): more streams are
///   refused with REFUSED_STREAM, which clients retry;
/// - `max_header_list_size` ([`MAX_HEADER_BYTES`], decoded size, so HPACK bombs count
///   in full): over it the request gets 431; a header block that keeps growing over
///   CONTINUATION frames is cut with GOAWAY after a few frames (CONTINUATION flood,
///   RUSTSEC-2024-0332: h2 caps the frame count from this size);
/// - `max_pending_accept_reset_streams` ([`H2_MAX_PENDING_ACCEPT_RESET_STREAMS`]) and
///   `max_local_error_reset_streams` ([`H2_MAX_LOCAL_ERROR_RESET_STREAMS`]): Rapid
///   Reset, answered with GOAWAY ENHANCE_YOUR_CALM;
/// - keepalive PING every [`H2_KEEP_ALIVE_INTERVAL`], closed after
///   [`H2_KEEP_ALIVE_TIMEOUT`] without an answer (dead peers).
///
/// Idle connections are closed by [`serve_http2`], not here.
pub fn h2_server_builder(cfg: &Limits) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(cfg.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(cfg.h2_max_local_error_reset_streams)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    b
}

/// Serves HTTP/1 on `io` with `svc` under `limits` until the client is done, the
/// connection has been idle for `limits.idle_timeout`, or `shutdown` (then in-flight
/// requests finish and the response carries `Connection: close`).
pub async fn serve_http1<I, S, B>(
    io: I,
    svc: S,
    limits: &Limits,
    shutdown: &CancellationToken,
    remote: SocketAddr,
    what: &'static str,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let idle = IdleTimer::new(limits.idle_timeout);
    let conn = h1_server_builder(limits).serve_connection(io, idle.track(svc));
    drive(
        conn,
        Some(&idle).filter(|_| !limits.idle_timeout.is_zero()),
        shutdown,
        remote,
        what,
    )
    .await;
}

/// Serves HTTP/2 on `io` with `svc` under `limits` until the client is done, the
/// connection has been idle for `limits.idle_timeout`, or `shutdown` (then GOAWAY, and
/// streams in flight finish).
pub async fn serve_http2<I, S, B>(
    io: I,
    svc: S,
    limits: &Limits,
    shutdown: &CancellationToken,
    remote: SocketAddr,
    what: &'static str,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<B>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let idle = IdleTimer::new(limits.idle_timeout);
    let conn = h2_server_builder(limits).serve_connection(io, idle.track(svc));
    drive(
        conn,
        Some(&idle).filter(|_| !limits.idle_timeout.is_zero()),
        shutdown,
        remote,
        what,
    )
    .await;
}

async fn drive<C>(
    conn: C,
    idle: Option<&IdleTimer>,
    shutdown: &CancellationToken,
    remote: SocketAddr,
    what: &'static str,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(conn);
    let expired = async {
        match idle {
            Some(idle) => idle.expired().await,
            None => std::future::pending().await,
        }
    };
    let draining = tokio::select! {
        r = conn.as_mut() => {
            if let Err(error) = r {
                debug!(%error, %remote, listener = what, "connection ended");
            }
            return;
        }
        () = shutdown.cancelled() => true,
        () = expired => {
            debug!(%remote, listener = what, "closing idle connection");
            false
        }
    };
    conn.as_mut().graceful_shutdown();
    if draining {
        // The drain deadline (app.rs) bounds this wait.
        let _ = conn.await;
    } else if tokio::time::timeout(IDLE_CLOSE_GRACE, conn).await.is_err() {
        debug!(%remote, listener = what, "idle connection did not close in time; dropped");
    }
}

#[cfg(test)]
mod tests;
