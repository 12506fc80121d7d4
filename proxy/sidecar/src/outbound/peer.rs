//! The HTTP/2 client of the proxy-to-proxy leg, on the `h2` crate directly.
//!
//! hyper's HTTP/2 client costs a task per request (spawned, moved, completed), a dispatch
//! channel to the connection task and a ping recorder on every body: about a tenth of a
//! hop's instructions (BENCHMARKS.md, "Instructions per request"). Here a request is sent
//! from the task that asked for it; a request body is piped from that task too until the
//! response head arrives, and only a body still streaming then gets a task of its own.
//! Tunnels (`CONNECT`) are byte streams over the same connection ([`Tunnel`]).
//!
//! Owns: the handshake settings, keep-alive pings, request body piping under HTTP/2 flow
//! control, and the response body and tunnel adapters. Must not know about routing,
//! identities or metrics (the pool and `Outbound` do).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::Error;
use crate::http::{Body, BodyError};

/// Pings on an open connection this often; a peer that does not answer within
/// [`KEEPALIVE_TIMEOUT`] is taken as gone and the connection closed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A multiplexed connection to a peer proxy; clones share it.
#[derive(Clone)]
pub struct PeerConn {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl PeerConn {
    /// The HTTP/2 handshake over `io` (already mutually authenticated); the connection is
    /// driven by a task of its own until the peer or every handle goes away.
    pub async fn handshake<T>(io: T, addr: SocketAddr) -> Result<Self, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // hyper's client settings, with the windows the proxy always used.
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            .initial_max_send_streams(100)
            .max_header_list_size(16 * 1024)
            .max_send_buffer_size(1024 * 1024)
            .max_frame_size(16 * 1024)
            .enable_push(false)
            .handshake(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(drive(conn, closed.clone(), addr));
        Ok(Self { send, closed })
    }

    /// True once the connection has ended or refused a new stream (GOAWAY): the pool
    /// opens another.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Sends `req` and waits for the response head. The request body is piped by this
    /// future while it waits; what is left of it then streams on in a task.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<PeerBody>, Error> {
        let (mut parts, body) = req.into_parts();
        let end = body.is_end_stream();
        if let Some(len) = body.size_hint().exact() {
            // As hyper does: a known length is stated, except a zero one on methods
            // without a defined body.
            let payload = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
            if (len != 0 || payload) && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
                parts
                    .headers
                    .insert(http::header::CONTENT_LENGTH, len.into());
            }
        }
        let (response, stream) = self.open(Request::from_parts(parts, ()), end).await?;
        let response = if end {
            drop(stream);
            response.await
        } else {
            let mut pipe = Box::pin(Pipe {
                body,
                stream,
                held: None,
            });
            let mut response = response;
            let first = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = Pin::new(&mut response).poll(cx) {
                    return Poll::Ready(Some(r));
                }
                pipe.as_mut().poll(cx).map(|()| None)
            })
            .await;
            match first {
                Some(r) => {
                    // The head came first (a streaming request): the rest of the body
                    // goes on without this request's future.
                    tokio::spawn(pipe);
                    r
                }
                None => response.await,
            }
        };
        let response = response.map_err(|e| self.failed(e))?;
        let content_length = content_length(response.headers());
        Ok(response.map(|recv| PeerBody {
            recv,
            content_length,
            trailers_next: false,
        }))
    }

    /// Opens a `CONNECT` tunnel to `target` (the peer connects to its own app on that
    /// port) and returns it once the peer answered 200.
    pub async fn tunnel(&self, target: SocketAddr) -> Result<Tunnel, Error> {
        let uri = http::Uri::try_from(crate::http::addr_text(target))
            .map_err(|e| Error::Upstream(Box::new(e)))?;
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = uri;
        let (response, send) = self.open(req, false).await?;
        let response = response.await.map_err(|e| self.failed(e))?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            return Err(Error::Upstream(
                format!("peer refused the tunnel: {status}").into(),
            ));
        }
        Ok(Tunnel {
            send,
            recv: response.into_body(),
            unread: Bytes::new(),
            shut: false,
        })
    }

    /// A new stream for `req`, once the peer allows one more.
    async fn open(
        &self,
        req: Request<()>,
        end: bool,
    ) -> Result<(ResponseFuture, SendStream<Bytes>), Error> {
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .map_err(|e| self.failed(e))?;
        send.send_request(req, end).map_err(|e| self.failed(e))
    }

    /// `e` as the request's error; a connection that can take no more streams is
    /// marked closed so the pool stops handing it out.
    fn failed(&self, e: h2::Error) -> Error {
        if e.is_go_away() || e.is_io() {
            self.closed.store(true, Ordering::Relaxed);
        }
        Error::Upstream(Box::new(e))
    }
}

/// Drives the connection, pinging the peer while it is open; marks it closed at the end.
async fn drive<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    closed: Arc<AtomicBool>,
    addr: SocketAddr,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let ended = match conn.ping_pong() {
        Some(mut ping) => {
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + KEEPALIVE_INTERVAL,
                KEEPALIVE_INTERVAL,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut waiting: Option<Pin<Box<tokio::time::Sleep>>> = None;
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = Pin::new(&mut conn).poll(cx) {
                    return Poll::Ready(r);
                }
                if let Some(deadline) = waiting.as_mut() {
                    match ping.poll_pong(cx) {
                        Poll::Ready(Ok(_)) => waiting = None,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            if deadline.as_mut().poll(cx).is_ready() {
                                tracing::debug!(%addr, "peer did not answer a ping; closing");
                                return Poll::Ready(Ok(()));
                            }
                        }
                    }
                }
                if waiting.is_none() && tick.poll_tick(cx).is_ready() {
                    if ping.send_ping(h2::Ping::opaque()).is_ok() {
                        waiting = Some(Box::pin(tokio::time::sleep(KEEPALIVE_TIMEOUT)));
                    }
                    // Registers the pong's and the deadline's wake-ups.
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            })
            .await
        }
        None => conn.await,
    };
    closed.store(true, Ordering::Relaxed);
    if let Err(error) = ended {
        tracing::debug!(%error, %addr, "peer connection ended");
    }
}

/// The `content-length` of a response, when it has exactly one valid one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()?.parse().ok()
}

/// Sends a request body on its stream under HTTP/2 flow control: a chunk is sent as the
/// peer's window allows, trailers end the stream, and a reset by the peer ends the pipe.
/// (hyper's `PipeToSendStream`, including its care not to claim window before a chunk is
/// in hand: hyper#4003.)
struct Pipe {
    body: Body,
    stream: SendStream<Bytes>,
    /// A chunk polled from the body, waiting for window.
    held: Option<(Bytes, bool)>,
}

impl Pipe {
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BodyError>> {
        loop {
            if let Poll::Ready(reason) = self.stream.poll_reset(cx) {
                let reason = reason?;
                return Poll::Ready(Err(h2::Error::from(reason).into()));
            }
            if let Some((chunk, eos)) = self.held.take() {
                while self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                        Poll::Ready(None) => {
                            return Poll::Ready(Err(h2::Error::from(Reason::CANCEL).into()));
                        }
                        Poll::Pending => {
                            self.held = Some((chunk, eos));
                            return Poll::Pending;
                        }
                    }
                }
                self.stream.send_data(chunk, eos)?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let eos = self.body.is_end_stream();
                        if chunk.is_empty() {
                            self.stream.send_data(chunk, eos)?;
                            if eos {
                                return Poll::Ready(Ok(()));
                            }
                        } else {
                            // h2 raises the claim to the chunk's length in send_data.
                            self.stream.reserve_capacity(1);
                            self.held = Some((chunk, eos));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            self.stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    self.stream.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(Err(e));
                }
                None => {
                    self.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl Future for Pipe {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.step(cx).map(|result| {
            if let Err(error) = result {
                tracing::debug!(%error, "request body to the peer ended early");
            }
        })
    }
}

/// A response body from a peer: data frames as they come (their window given back as
/// they are handed on), then the trailers.
pub struct PeerBody {
    recv: RecvStream,
    content_length: Option<u64>,
    trailers_next: bool,
}

impl HttpBody for PeerBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        while !self.trailers_next {
            match ready!(self.recv.poll_data(cx)) {
                // An empty frame (usually the one carrying END_STREAM) is nothing to
                // hand on.
                Some(Ok(data)) if data.is_empty() => {}
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.trailers_next = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        self.content_length
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A `CONNECT` stream to a peer as a byte stream.
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    unread: Bytes,
    shut: bool,
}

fn io_error(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => std::io::ErrorKind::BrokenPipe.into(),
        }
    } else {
        std::io::Error::other(e)
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.unread = data,
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(()),
                        _ => Err(io_error(e)),
                    });
                }
            }
        }
        let n = self.unread.len().min(buf.remaining());
        buf.put_slice(&self.unread[..n]);
        self.unread.advance(n);
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if let Poll::Ready(reason) = self.send.poll_reset(cx) {
            let e = reason.map_or_else(io_error, |r| io_error(h2::Error::from(r)));
            return Poll::Ready(Err(e));
        }
        self.send.reserve_capacity(buf.len());
        while self.send.capacity() == 0 {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        }
        let n = self.send.capacity().min(buf.len());
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The connection task writes what streams have buffered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// An `h2` server on loopback (default 64 KiB windows, so bodies meet flow control)
    /// running `serve` for each stream; the client connected to it.
    async fn pair<F, Fut>(serve: F) -> PeerConn
    where
        F: Fn(Request<RecvStream>, h2::server::SendResponse<Bytes>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serve = Arc::new(serve);
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            while let Some(Ok((req, respond))) = conn.accept().await {
                tokio::spawn(serve(req, respond));
            }
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        PeerConn::handshake(tcp, addr).await.unwrap()
    }

    /// Reads a whole server-side request body, giving its window back.
    async fn drain(body: &mut RecvStream) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            all.extend_from_slice(&chunk);
        }
        all
    }

    /// Sends `data` on a server-side stream under flow control, then `trailers`.
    async fn send_all(tx: &mut SendStream<Bytes>, mut data: Bytes, trailers: Option<HeaderMap>) {
        while !data.is_empty() {
            tx.reserve_capacity(data.len());
            let cap = std::future::poll_fn(|cx| tx.poll_capacity(cx))
                .await
                .unwrap()
                .unwrap();
            let n = cap.min(data.len());
            tx.send_data(data.split_to(n), false).unwrap();
        }
        match trailers {
            Some(t) => tx.send_trailers(t).unwrap(),
            None => tx.send_data(Bytes::new(), true).unwrap(),
        }
    }

    fn pattern(len: usize) -> Bytes {
        (0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>().into()
    }

    fn post(body: Body) -> Request<Body> {
        Request::post("http://web.demo/echo").body(body).unwrap()
    }

    /// A server that reads the whole request before answering: the request body (many
    /// windows long) is piped by the sending future alone, and the echo comes back whole
    /// with the request's trailers.
    #[tokio::test]
    async fn a_body_larger_than_the_window_is_sent_before_the_answer_and_echoed() {
        let conn = pair(|req, mut respond| async move {
            let (parts, mut body) = req.into_parts();
            let got = drain(&mut body).await;
            let trailers = body.trailers().await.unwrap();
            let len = parts.headers[http::header::CONTENT_LENGTH].clone();
            let mut tx = respond
                .send_response(
                    Response::builder()
                        .header("request-length", len)
                        .body(())
                        .unwrap(),
                    false,
                )
                .unwrap();
            send_all(&mut tx, got.into(), trailers).await;
        })
        .await;
        let data = pattern(3 * 1024 * 1024 + 7);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = http_body_util::Full::new(data.clone())
            .map_err(BodyError::from)
            .with_trailers(std::future::ready(Some(Ok(trailers))))
            .boxed_unsync();
        let resp = tokio::time::timeout(WAIT, conn.send(post(body)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            resp.headers()["request-length"],
            "3145735",
            "length stated by the client"
        );
        let collected = tokio::time::timeout(WAIT, resp.into_body().collect())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), data);
        assert!(!conn.is_closed());
    }

    /// A server that answers at once and echoes as it reads: the request body goes on
    /// after the response head (in its own task) and both directions stream.
    #[tokio::test]
    async fn a_request_body_streams_on_after_the_response_head() {
        let conn = pair(|req, mut respond| async move {
            let mut body = req.into_body();
            let mut tx = respond.send_response(Response::new(()), false).unwrap();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                if chunk.is_empty() {
                    continue; // the END_STREAM frame
                }
                let _ = body.flow_control().release_capacity(chunk.len());
                tx.reserve_capacity(chunk.len());
                let _ = std::future::poll_fn(|cx| tx.poll_capacity(cx)).await;
                tx.send_data(chunk, false).unwrap();
            }
            tx.send_data(Bytes::new(), true).unwrap();
        })
        .await;
        let (chunks, rx) = mpsc::channel::<Result<Frame<Bytes>, BodyError>>(1);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed_unsync();
        chunks
            .send(Ok(Frame::data(Bytes::from_static(b"one"))))
            .await
            .unwrap();
        let resp = tokio::time::timeout(WAIT, conn.send(post(body)))
            .await
            .expect("the head before the request body ends")
            .unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "one");
        chunks
            .send(Ok(Frame::data(Bytes::from_static(b"two"))))
            .await
            .unwrap();
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "two");
        drop(chunks);
        assert!(
            tokio::time::timeout(WAIT, body.frame())
                .await
                .unwrap()
                .is_none()
        );
    }

    /// An empty GET is sent with END_STREAM on its headers and no length; an empty
    /// answer is an exact zero-length body.
    #[tokio::test]
    async fn an_empty_request_ends_with_its_headers() {
        let conn = pair(|req, mut respond| async move {
            let ended = req.body().is_end_stream();
            let has_length = req.headers().contains_key(http::header::CONTENT_LENGTH);
            let resp = Response::builder()
                .header("ended", ended.to_string())
                .header("length", has_length.to_string())
                .body(())
                .unwrap();
            respond.send_response(resp, true).unwrap();
        })
        .await;
        let req = Request::get("http://web.demo/")
            .body(crate::http::full(""))
            .unwrap();
        let resp = conn.send(req).await.unwrap();
        assert_eq!(resp.headers()["ended"], "true");
        assert_eq!(resp.headers()["length"], "false");
        assert!(resp.body().is_end_stream());
        assert_eq!(resp.body().size_hint().exact(), Some(0));
    }

    /// A peer that resets the stream fails the request; one that goes away marks the
    /// connection closed, so the pool stops handing it out.
    #[tokio::test]
    async fn a_reset_fails_the_request_and_a_gone_peer_closes_the_connection() {
        let conn = pair(|req, mut respond| async move {
            if req.uri().path() == "/reset" {
                respond.send_reset(Reason::REFUSED_STREAM);
            } else {
                respond.send_response(Response::new(()), true).unwrap();
            }
        })
        .await;
        let req = Request::get("http://web.demo/reset")
            .body(crate::http::full(""))
            .unwrap();
        let err = conn.send(req).await.err().expect("refused");
        assert!(err.to_string().contains("refused"), "{err}");
        assert!(!conn.is_closed(), "a reset stream leaves the connection");

        // A server that closes its socket at once.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let conn = h2::server::handshake(tcp).await.unwrap();
            drop(conn);
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let conn = PeerConn::handshake(tcp, addr).await.unwrap();
        tokio::time::timeout(WAIT, async {
            while !conn.is_closed() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("marked closed");
    }

    /// A tunnel carries bytes both ways under flow control (more than a window each
    /// way) and a shutdown ends the peer's side.
    #[tokio::test]
    async fn a_tunnel_echoes_more_than_a_window_and_shuts_down() {
        let conn = pair(|req, mut respond| async move {
            assert_eq!(req.method(), Method::CONNECT);
            assert_eq!(req.uri().authority().unwrap().as_str(), "10.0.0.9:5432");
            let mut body = req.into_body();
            let mut tx = respond.send_response(Response::new(()), false).unwrap();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                if chunk.is_empty() {
                    continue; // the END_STREAM frame
                }
                let _ = body.flow_control().release_capacity(chunk.len());
                tx.reserve_capacity(chunk.len());
                let _ = std::future::poll_fn(|cx| tx.poll_capacity(cx)).await;
                tx.send_data(chunk, false).unwrap();
            }
            // The client's shutdown: end ours too.
            tx.send_data(Bytes::new(), true).unwrap();
        })
        .await;
        let tunnel = conn.tunnel("10.0.0.9:5432".parse().unwrap()).await.unwrap();
        let (mut rd, mut wr) = tokio::io::split(tunnel);
        let data = pattern(1024 * 1024 + 3);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, rd.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the bytes come back as sent");
    }

    /// A peer that refuses the tunnel is an error naming the status.
    #[tokio::test]
    async fn a_refused_tunnel_is_an_error() {
        let conn = pair(|_req, mut respond| async move {
            let resp = Response::builder().status(403).body(()).unwrap();
            respond.send_response(resp, true).unwrap();
        })
        .await;
        let err = conn
            .tunnel("10.0.0.9:5432".parse().unwrap())
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("403"), "{err}");
    }
}
