//! Byte tunnels between proxies (the client side is [`crate::outbound::peer::Tunnel`]): opaque TCP, TLS the app originates, and HTTP/1.1
//! upgrades (WebSocket) ride an HTTP/2 `CONNECT` stream on the same pooled mTLS
//! connection that carries HTTP, so every kind of traffic between two proxies shares
//! one multiplexed, mutually authenticated connection.
//!
//! The `CONNECT` authority is the destination the client dialled (`ip:port`). The
//! receiving proxy uses only its port and connects to its own app on that port: a tunnel
//! can never be pointed at another host.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::Error;
use crate::http::Body;

/// Bytes moved by a finished tunnel: (client to server, server to client).
pub type Moved = (u64, u64);

/// Copies both ways until both sides are done, returning the byte counts.
pub async fn splice<A, B>(mut a: A, mut b: B) -> std::io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional(&mut a, &mut b).await
}

/// Serves a `CONNECT` request on the inbound side: connects to `app`, answers 200 and
/// splices the upgraded stream to it in the background. `on_done` runs with the byte
/// counts (or the error) when the tunnel closes.
pub async fn accept<F>(
    req: Request<hyper::body::Incoming>,
    app: SocketAddr,
    on_done: F,
) -> Result<Response<Body>, Error>
where
    F: FnOnce(std::io::Result<Moved>) + Send + 'static,
{
    let tcp = tokio::net::TcpStream::connect(app)
        .await
        .map_err(|source| Error::Connect { addr: app, source })?;
    let _ = tcp.set_nodelay(true);
    tokio::spawn(async move {
        let result = match hyper::upgrade::on(req).await {
            Ok(upgraded) => splice(tcp, TokioIo::new(upgraded)).await,
            Err(e) => Err(std::io::Error::other(e)),
        };
        on_done(result);
    });
    Ok(Response::new(crate::http::full(Bytes::new())))
}
