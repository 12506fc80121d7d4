//! The answering side of the proxy-to-proxy leg: each stream is handled in a task of its
//! own (so one slow request never holds up another), which answers the request and
//! pipes the response body under flow control. A `CONNECT` handler takes its stream over
//! as a tunnel ([`TakeTunnel`]).
//!
//! The connection is held to the listener's [`Limits`] as hyper's server was (same
//! settings, same tests in `tests/e2e/limits/h2.rs`): concurrent streams, decoded header
//! list size (431 from `h2` itself), Rapid Reset and protocol-error reset budgets
//! (GOAWAY), keep-alive pings, the idle timeout (graceful close) and the drain (GOAWAY,
//! streams in flight finish).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Request, Response};
use hyper::body::Body as HttpBody;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{KeepAlive, PeerBody, Pipe};
use crate::http::Body;
use crate::transport::{IDLE_CLOSE_GRACE, IdleTimer, Limits};

/// Put in the extensions of a `CONNECT`'s 200 response: the stream's sending half goes
/// to the receiver instead of a response body, and the two halves become a
/// [`super::Tunnel`]. (Shared and taken once: extensions must be `Clone`.)
#[derive(Clone)]
pub struct TakeTunnel(Arc<Mutex<Option<oneshot::Sender<SendStream<Bytes>>>>>);

impl TakeTunnel {
    /// The extension, and where the stream's sending half will arrive.
    pub fn new() -> (Self, oneshot::Receiver<SendStream<Bytes>>) {
        let (tx, rx) = oneshot::channel();
        (Self(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    fn hand_over(&self, send: SendStream<Bytes>) {
        let taker = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(taker) = taker {
            let _ = taker.send(send);
        }
    }
}

/// Serves HTTP/2 from a peer proxy on `io` (mTLS already done) with `handle` until the
/// peer is done, the connection has been idle for `limits.idle_timeout`, or `shutdown`
/// (then GOAWAY, and the streams in flight finish).
pub async fn serve<I, H, F>(
    io: I,
    handle: H,
    limits: &Limits,
    shutdown: &CancellationToken,
    remote: SocketAddr,
    what: &'static str,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<PeerBody>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let idle = IdleTimer::new(limits.idle_timeout);
    let idle_expired = async {
        if limits.idle_timeout.is_zero() {
            std::future::pending().await
        } else {
            idle.expired().await;
        }
    };
    let mut idle_expired = pin!(idle_expired);
    let mut cancelled = pin!(shutdown.cancelled());

    // hyper's server settings, and the listener's limits (see `transport`).
    let handshake = h2::server::Builder::new()
        .initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_send_buffer_size(400 * 1024)
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(limits.h2_max_local_error_reset_streams))
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::select! {
        c = handshake => match c {
            Ok(c) => c,
            Err(error) => {
                debug!(%error, %remote, listener = what, "HTTP/2 handshake failed");
                return;
            }
        },
        () = &mut cancelled => return,
        () = &mut idle_expired => return,
    };

    let handle = Arc::new(handle);
    let mut keepalive = KeepAlive::new(conn.ping_pong());
    let mut draining = false;
    // Armed when the idle timer fires: how long the goodbye may take.
    let mut closing = false;
    let mut grace = pin!(tokio::time::sleep(IDLE_CLOSE_GRACE));
    // One hand-written poll rather than `select!`: this runs on every frame batch, and
    // `select!` would build five futures (and pick a random order) each time.
    std::future::poll_fn(|cx| {
        loop {
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    let busy = idle.busy();
                    tokio::spawn(answer(req, respond, handle.clone(), busy));
                    continue;
                }
                Poll::Ready(Some(Err(error))) => {
                    debug!(%error, %remote, listener = what, "connection ended");
                    return Poll::Ready(());
                }
                Poll::Ready(None) => return Poll::Ready(()),
                Poll::Pending => {}
            }
            if !draining && cancelled.as_mut().poll(cx).is_ready() {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            if !closing && idle_expired.as_mut().poll(cx).is_ready() {
                debug!(%remote, listener = what, "closing idle connection");
                conn.graceful_shutdown();
                closing = true;
                grace
                    .as_mut()
                    .reset(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                continue;
            }
            if closing && !draining && grace.as_mut().poll(cx).is_ready() {
                debug!(%remote, listener = what, "idle connection did not close in time; dropped");
                return Poll::Ready(());
            }
            if keepalive.poll_dead(cx).is_ready() {
                debug!(%remote, listener = what, "peer did not answer a ping; closing");
                return Poll::Ready(());
            }
            return Poll::Pending;
        }
    })
    .await;
}

/// Answers one stream: the handler's response, then its body. A stream the peer resets
/// first is abandoned, and the handler's work (the request to the app) with it.
async fn answer<H, F>(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    handle: Arc<H>,
    _busy: crate::transport::Busy,
) where
    H: Fn(Request<PeerBody>) -> F,
    F: Future<Output = Response<Body>>,
{
    let (parts, recv) = req.into_parts();
    let body = PeerBody::new(recv, &parts.headers);
    // Boxed: the handler's future is kilobytes; inline, the task would copy it whole when
    // spawned and again when it completes (~3,700 instructions a request in memcpy).
    let mut answering = Box::pin(handle(Request::from_parts(parts, body)));
    let resp = std::future::poll_fn(|cx| {
        if let Poll::Ready(resp) = answering.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    let Some(resp) = resp else {
        return;
    };
    let (mut parts, body) = resp.into_parts();
    let take = parts.extensions.remove::<TakeTunnel>();
    if take.is_none()
        && let Some(len) = body.size_hint().exact()
        && !parts.headers.contains_key(http::header::CONTENT_LENGTH)
    {
        // As hyper's server does: a known length is stated.
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, len.into());
    }
    let end = take.is_none() && body.is_end_stream();
    let send = match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(send) => send,
        Err(error) => {
            debug!(%error, "response head not sent");
            return;
        }
    };
    if let Some(take) = take {
        take.hand_over(send);
    } else if !end {
        Pipe::new(body, send).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::http::{BodyError, full};
    use crate::peer::client::PeerConn;

    fn limits() -> Limits {
        Limits {
            idle_timeout: Duration::from_secs(5),
            ..Limits::default()
        }
    }

    /// `serve` on one end of a duplex pipe with `handle`; the client on the other end and
    /// the server's task.
    async fn pair<H, F>(
        handle: H,
        shutdown: CancellationToken,
    ) -> (PeerConn, tokio::task::JoinHandle<()>)
    where
        H: Fn(Request<PeerBody>) -> F + Send + Sync + 'static,
        F: Future<Output = Response<Body>> + Send + 'static,
    {
        let (client, server): (DuplexStream, DuplexStream) = tokio::io::duplex(256 * 1024);
        let remote = SocketAddr::from(([127, 0, 0, 1], 1));
        let served = tokio::spawn(async move {
            serve(server, handle, &limits(), &shutdown, remote, "test").await;
        });
        let conn = PeerConn::handshake(client, remote)
            .await
            .expect("handshake");
        (conn, served)
    }

    /// Echoes the request body and its trailers; `/slow` answers after 20 s.
    async fn echo(req: Request<PeerBody>) -> Response<Body> {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(20)).await;
            return Response::new(full("slow"));
        }
        let (tx, body) =
            tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, BodyError>>(4);
        tokio::spawn(async move {
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(body);
        Response::new(http_body_util::StreamBody::new(stream).boxed_unsync())
    }

    /// A body larger than the windows goes up and comes back with its trailers, and the
    /// answer states a known length.
    #[tokio::test]
    async fn a_large_body_and_trailers_are_echoed_and_a_known_length_is_stated() {
        let (conn, _served) = pair(echo, CancellationToken::new()).await;
        let data: Bytes = (0..3 * 1024 * 1024 + 1)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<_>>()
            .into();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = http_body_util::Full::new(data.clone())
            .map_err(BodyError::from)
            .with_trailers(std::future::ready(Some(Ok(trailers))))
            .boxed_unsync();
        let req = Request::post("http://web.demo/echo").body(body).unwrap();
        let resp = conn.send(req).await.unwrap();
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), data);

        let handle = |_req: Request<PeerBody>| async { Response::new(full("four")) };
        let (conn, _served) = pair(handle, CancellationToken::new()).await;
        let req = Request::get("http://web.demo/").body(full("")).unwrap();
        let resp = conn.send(req).await.unwrap();
        assert_eq!(resp.headers()[http::header::CONTENT_LENGTH], "4");
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "four");
    }

    /// A `CONNECT` answered with [`TakeTunnel`] becomes a byte stream both ways.
    #[tokio::test]
    async fn a_connect_taken_over_is_a_tunnel() {
        let handle = |req: Request<PeerBody>| async move {
            let recv = req.into_body().into_stream();
            let (take, taken) = TakeTunnel::new();
            tokio::spawn(async move {
                let send = taken.await.expect("the stream");
                let mut tunnel = super::super::Tunnel::new(send, recv);
                let mut got = vec![0u8; 5];
                tunnel.read_exact(&mut got).await.unwrap();
                got.reverse();
                tunnel.write_all(&got).await.unwrap();
                tunnel.shutdown().await.unwrap();
            });
            let mut resp = Response::new(full(""));
            resp.extensions_mut().insert(take);
            resp
        };
        let (conn, _served) = pair(handle, CancellationToken::new()).await;
        let mut tunnel = conn.tunnel("10.0.0.1:7".parse().unwrap()).await.unwrap();
        tunnel.write_all(b"hello").await.unwrap();
        let mut back = Vec::new();
        tunnel.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"olleh");
    }

    /// The idle timer never cuts a stream in flight, and closes the connection once
    /// nothing has been in flight for the timeout.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_but_a_slow_stream_completes() {
        let (conn, served) = pair(echo, CancellationToken::new()).await;
        let start = tokio::time::Instant::now();
        let req = Request::get("http://web.demo/slow").body(full("")).unwrap();
        let resp = conn.send(req).await.expect("slow stream");
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "slow");
        assert!(start.elapsed() >= Duration::from_secs(20), "not cut at 5 s");
        // Gracefully (GOAWAY, then the close): well before the idle timeout plus the
        // grace after which an unanswered goodbye is dropped.
        tokio::time::timeout(Duration::from_secs(8), served)
            .await
            .expect("the server closes an idle connection with a goodbye")
            .expect("server task");
        tokio::time::timeout(Duration::from_secs(30), async {
            while !conn.is_closed() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the client sees the close");
    }

    /// The drain lets the stream in flight finish, refuses new ones and ends the
    /// connection.
    #[tokio::test(start_paused = true)]
    async fn the_drain_finishes_streams_in_flight_and_refuses_new_ones() {
        let shutdown = CancellationToken::new();
        let (conn, served) = pair(echo, shutdown.clone()).await;
        let slow = tokio::spawn({
            let conn = conn.clone();
            async move {
                let req = Request::get("http://web.demo/slow").body(full("")).unwrap();
                let resp = conn.send(req).await?;
                Ok::<_, crate::error::Error>(resp.into_body().collect().await.unwrap().to_bytes())
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.cancel();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let req = Request::get("http://web.demo/new").body(full("")).unwrap();
        assert!(
            conn.send(req).await.is_err(),
            "a new stream after GOAWAY is refused"
        );
        assert_eq!(slow.await.unwrap().unwrap(), "slow");
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the connection ends once the stream is done")
            .expect("server task");
    }

    /// A stream the peer resets is abandoned: the handler's future is dropped.
    #[tokio::test]
    async fn a_reset_stream_drops_its_handler() {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let seen = dropped.clone();
        let handle = move |_req: Request<PeerBody>| {
            let flag = Flag(seen.clone());
            async move {
                let _flag = flag;
                std::future::pending::<Response<Body>>().await
            }
        };
        let (conn, _served) = pair(handle, CancellationToken::new()).await;
        let req = Request::get("http://web.demo/never")
            .body(full(""))
            .unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), conn.send(req)).await;
        assert!(waited.is_err(), "no answer");
        tokio::time::timeout(Duration::from_secs(5), async {
            while !dropped.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the handler is dropped once the client gives up");
    }
}
