//! HTTP/1.1 connections to the local app, kept alive and reused.
//!
//! The inbound side used hyper-util's generic pooled client. For the one thing it needs
//! here (requests to a known socket address, one at a time per connection) that client
//! cost ~9,000 instructions per request (key hashing, checkout and return bookkeeping,
//! an absolute URI built per request), about a tenth of a hop (`scripts/bench --count`).
//! This pool is a list of connections per app address: a request takes the most
//! recently used connection that is ready, or opens one, and its response body gives the
//! connection back when it ends.
//!
//! A kept-alive connection the app has just closed can fail a request before any of it
//! was written; such a request is sent again once on a new connection, as hyper-util's
//! client did. A request that may have reached the app is never resent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::error::Error;
use crate::http::Body;

/// How long opening a connection to the app may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per app address; more are closed when they come back.
const MAX_IDLE_PER_APP: usize = 64;

/// Idle connections to the app, by address.
#[derive(Default)]
pub(super) struct H1Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
}

/// A connection waiting for its next request.
struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

// === impl H1Pool ===

impl H1Pool {
    /// Sends `req` (origin-form URI, Host header set) to the app at `app`.
    pub(super) async fn send(
        self: &Arc<Self>,
        app: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Body>, Error> {
        let (mut sender, reused) = match self.checkout(app) {
            Some(s) => (s, true),
            None => (Box::pin(connect(app)).await?, false),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                // Not a byte of it was written: the app closed the kept-alive
                // connection as we took it. Once more, on a connection of our own.
                Some(req) if reused => {
                    debug!(%app, error = %e.error(), "pooled app connection was closed; retrying on a new one");
                    sender = Box::pin(connect(app)).await?;
                    sender
                        .send_request(req)
                        .await
                        .map_err(|e| Error::Upstream(Box::new(e)))?
                }
                _ => return Err(Error::Upstream(Box::new(e.into_error()))),
            },
        };
        let pool = Arc::downgrade(self);
        Ok(resp.map(|inner| {
            use http_body_util::BodyExt as _;
            Returning {
                inner,
                slot: Some((pool, app, sender)),
            }
            .boxed_unsync()
        }))
    }

    /// The most recently used ready connection to `app`; closed ones are dropped and
    /// ones still finishing a response are left for later.
    fn checkout(&self, app: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&app)?;
        list.retain(|i| !i.sender.is_closed());
        let at = list.iter().rposition(|i| i.sender.is_ready())?;
        Some(list.swap_remove(at).sender)
    }

    /// Takes a connection back after its response ended.
    fn checkin(&self, app: SocketAddr, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(app).or_default();
        if list.len() < MAX_IDLE_PER_APP {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes connections idle for longer than `idle_for`; returns how many.
    pub(super) fn reap(&self, idle_for: Duration) -> usize {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        crate::transport::retain_pooled(&mut idle, |i| {
            !i.sender.is_closed() && i.since.elapsed() < idle_for
        })
    }

    #[cfg(test)]
    fn idle_count(&self, app: SocketAddr) -> usize {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.get(&app).map_or(0, Vec::len)
    }
}

/// Drives a client connection to the app (HTTP/1.1 here, HTTP/2 in `inbound`) on its own
/// task until it ends; how it ended is logged at debug.
pub(super) fn drive_app_conn<C, E>(conn: C, app: SocketAddr)
where
    C: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%error, %app, "app connection ended");
        }
    });
}

/// A TCP connection to the app (no Nagle delay), within [`CONNECT_TIMEOUT`].
pub(super) async fn dial(app: SocketAddr) -> Result<tokio::net::TcpStream, Error> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(app))
        .await
        .map_err(|_| Error::Connect {
            addr: app,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        })?
        .map_err(|source| Error::Connect { addr: app, source })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Opens a connection to the app. Called boxed: the handshake future is large and rare,
/// and inline it would grow every request's future.
async fn connect(app: SocketAddr) -> Result<http1::SendRequest<Body>, Error> {
    let tcp = dial(app).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| Error::Upstream(Box::new(e)))?;
    drive_app_conn(conn, app);
    Ok(sender)
}

/// A response body that gives its connection back to the pool when it ends. Dropped
/// unfinished (the client went away), the connection still has response bytes to read,
/// so it is closed instead.
struct Returning {
    inner: Incoming,
    slot: Option<(
        std::sync::Weak<H1Pool>,
        SocketAddr,
        http1::SendRequest<Body>,
    )>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((pool, app, sender)) = self.slot.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.checkin(app, sender);
        }
    }
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = crate::http::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.slot = None,
            _ => {}
        }
        polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header(http::header::HOST, "app")
            .body(crate::http::full(Bytes::new()))
            .unwrap()
    }

    /// An app that answers every request on a connection with its connection's number
    /// and the request line it read, closing after `per_conn` requests (0: never).
    async fn app(per_conn: usize) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let mut served = 0;
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 1024];
                        let Ok(read) = tcp.read(&mut chunk).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..read]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            let line = String::from_utf8_lossy(&head);
                            let line = line.lines().next().unwrap_or_default().to_owned();
                            let body = format!("conn {n}: {line}");
                            served += 1;
                            let close = per_conn != 0 && served == per_conn;
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{}\r\n{body}",
                                body.len(),
                                if close { "connection: close\r\n" } else { "" }
                            );
                            if tcp.write_all(resp.as_bytes()).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn text(resp: Response<Body>) -> String {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_finished_response_gives_its_connection_to_the_next_request() {
        let (app, accepted) = app(0).await;
        let pool = Arc::new(H1Pool::default());
        for i in 0..5 {
            let resp = pool.send(app, get(&format!("/r{i}"))).await.unwrap();
            assert_eq!(text(resp).await, format!("conn 1: GET /r{i} HTTP/1.1"));
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(app), 1);
    }

    #[tokio::test]
    async fn a_connection_still_answering_is_not_shared() {
        let (app, accepted) = app(0).await;
        let pool = Arc::new(H1Pool::default());
        // The first response is not read yet when the second request goes out.
        let first = pool.send(app, get("/a")).await.unwrap();
        let second = pool.send(app, get("/b")).await.unwrap();
        assert_eq!(text(second).await, "conn 2: GET /b HTTP/1.1");
        assert_eq!(text(first).await, "conn 1: GET /a HTTP/1.1");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_the_app_closes_are_not_reused() {
        let (app, accepted) = app(1).await;
        let pool = Arc::new(H1Pool::default());
        for i in 1..=3 {
            let resp = pool.send(app, get("/x")).await.unwrap();
            assert_eq!(text(resp).await, format!("conn {i}: GET /x HTTP/1.1"));
            // Let the connection task see the close.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(pool.reap(Duration::ZERO), 0, "closed connections were kept");
    }

    #[tokio::test]
    async fn a_body_dropped_unfinished_closes_its_connection() {
        let (app, accepted) = app(0).await;
        let pool = Arc::new(H1Pool::default());
        drop(pool.send(app, get("/a")).await.unwrap());
        let resp = pool.send(app, get("/b")).await.unwrap();
        assert_eq!(text(resp).await, "conn 2: GET /b HTTP/1.1");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_reaped() {
        let (app, _) = app(0).await;
        let pool = Arc::new(H1Pool::default());
        let resp = pool.send(app, get("/a")).await.unwrap();
        text(resp).await;
        assert_eq!(pool.reap(Duration::from_secs(60)), 0);
        assert_eq!(pool.reap(Duration::ZERO), 1);
        assert_eq!(pool.idle_count(app), 0);
    }

    #[tokio::test]
    async fn an_app_that_is_down_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        drop(listener);
        let pool = Arc::new(H1Pool::default());
        let err = pool.send(app, get("/")).await.unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    }
}
