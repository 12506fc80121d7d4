//! The HTTP/2 leg between proxies, on the `h2` crate directly: the calling side
//! ([`client`]) and the answering side ([`server`]), and what both use: bodies piped under
//! flow control, peer bodies handed on as `http_body`s, tunnels as byte streams, and
//! keep-alive pings.
//!
//! Why not hyper here: hyper spawns a task per request on both sides (its future moved
//! and completed through the scheduler), passes client requests through a dispatch
//! channel and wraps every body with a ping recorder. That was about a tenth of each
//! hop's instructions (BENCHMARKS.md, "Instructions per request"). App-facing HTTP stays
//! on hyper.
//!
//! Must not know about routing, identities or metrics: `outbound` and `inbound` do.

pub mod client;
pub mod server;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{PingPong, Reason, RecvStream, SendStream};
use http::HeaderMap;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::http::{Body, BodyError};

use crate::transport::{H2_KEEP_ALIVE_INTERVAL, H2_KEEP_ALIVE_TIMEOUT};

/// Keep-alive pings on one connection: a PING every [`H2_KEEP_ALIVE_INTERVAL`], and the
/// verdict that the peer is gone when one goes [`H2_KEEP_ALIVE_TIMEOUT`] unanswered (the
/// same as hyper's servers on the other listeners).
pub(crate) struct KeepAlive {
    ping: Option<PingPong>,
    tick: tokio::time::Interval,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl KeepAlive {
    /// Pings over `ping` (none: never fires).
    pub(crate) fn new(ping: Option<PingPong>) -> Self {
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + H2_KEEP_ALIVE_INTERVAL,
            H2_KEEP_ALIVE_INTERVAL,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            ping,
            tick,
            waiting: None,
        }
    }

    /// Ready when the peer failed to answer a ping in time (or pings failed): the
    /// connection should be closed. Polled alongside the connection itself, which is
    /// what carries the PONG in.
    pub(crate) fn poll_dead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(ping) = self.ping.as_mut() else {
            return Poll::Pending;
        };
        loop {
            if let Some(deadline) = self.waiting.as_mut() {
                match ping.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => self.waiting = None,
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => return deadline.as_mut().poll(cx),
                }
            }
            ready!(self.tick.poll_tick(cx));
            if ping.send_ping(h2::Ping::opaque()).is_err() {
                return Poll::Ready(());
            }
            self.waiting = Some(Box::pin(tokio::time::sleep(H2_KEEP_ALIVE_TIMEOUT)));
        }
    }
}

/// The `content-length` of a response, when it has exactly one valid one.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()?.parse().ok()
}

/// Sends a body (a request on the calling side, a response on the answering side) on its
/// stream under HTTP/2 flow control: a chunk is sent as the peer's window allows,
/// trailers end the stream, and a reset by the peer ends the pipe.
/// (hyper's `PipeToSendStream`, including its care not to claim window before a chunk is
/// in hand: hyper#4003.)
pub(crate) struct Pipe {
    body: Body,
    stream: SendStream<Bytes>,
    /// A chunk polled from the body, waiting for window.
    held: Option<(Bytes, bool)>,
}

impl Pipe {
    /// Pipes `body` to `stream` when awaited.
    pub(crate) fn new(body: Body, stream: SendStream<Bytes>) -> Self {
        Self {
            body,
            stream,
            held: None,
        }
    }

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
                tracing::debug!(%error, "body to the peer ended early");
            }
        })
    }
}

/// A body from a peer (a response on the calling side, a request on the answering side):
/// data frames as they come (their window given back as they are handed on), then the
/// trailers.
pub struct PeerBody {
    recv: RecvStream,
    content_length: Option<u64>,
    trailers_next: bool,
}

impl PeerBody {
    /// The body of a message with `headers` arriving on `recv`.
    pub(crate) fn new(recv: RecvStream, headers: &HeaderMap) -> Self {
        Self {
            recv,
            content_length: content_length(headers),
            trailers_next: false,
        }
    }

    /// The stream, for a `CONNECT` that becomes a tunnel.
    pub(crate) fn into_stream(self) -> RecvStream {
        self.recv
    }
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

/// A `CONNECT` stream between peers as a byte stream (either side).
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    unread: Bytes,
    shut: bool,
}

impl Tunnel {
    /// The byte stream over an accepted `CONNECT`'s two halves.
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            unread: Bytes::new(),
            shut: false,
        }
    }
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
