//! The calling side of the proxy-to-proxy leg: a request is sent from the task that asked
//! for it, its body piped from that task too until the response head arrives; only a body
//! still streaming then gets a task of its own. Tunnels (`CONNECT`) are byte streams over
//! the same connection ([`Tunnel`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use bytes::Bytes;
use h2::SendStream;
use h2::client::{ResponseFuture, SendRequest};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Body as HttpBody;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{KeepAlive, PeerBody, Pipe, Tunnel};
use crate::error::Error;
use crate::http::Body;

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
            let mut pipe = Box::pin(Pipe::new(body, stream));
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
        let (parts, recv) = response.into_parts();
        let body = PeerBody::new(recv, &parts.headers);
        Ok(Response::from_parts(parts, body))
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
        Ok(Tunnel::new(send, response.into_body()))
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
    let mut keepalive = KeepAlive::new(conn.ping_pong());
    let ended = std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = Pin::new(&mut conn).poll(cx) {
            return Poll::Ready(r);
        }
        keepalive.poll_dead(cx).map(|()| {
            tracing::debug!(%addr, "peer did not answer a ping; closing");
            Ok(())
        })
    })
    .await;
    closed.store(true, Ordering::Relaxed);
    if let Err(error) = ended {
        tracing::debug!(%error, %addr, "peer connection ended");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use bytes::Bytes;
    use h2::{Reason, RecvStream, SendStream};
    use http::{HeaderMap, Method, Request, Response};
    use hyper::body::{Body as HttpBody, Frame};

    use super::*;
    use crate::http::{Body, BodyError};

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

    /// Answers at once and sends each chunk back as it arrives; ends when the client ends.
    async fn echo_as_it_reads(
        req: Request<RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
    ) {
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
        let conn = pair(echo_as_it_reads).await;
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
        let conn = pair(|req, respond| async move {
            assert_eq!(req.method(), Method::CONNECT);
            assert_eq!(req.uri().authority().unwrap().as_str(), "10.0.0.9:5432");
            echo_as_it_reads(req, respond).await;
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
