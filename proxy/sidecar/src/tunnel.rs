//! Byte tunnels between proxies: opaque TCP, TLS the app originates, and HTTP/1.1
//! upgrades (WebSocket) ride an HTTP/2 `CONNECT` stream on the same pooled mTLS
//! connection that carries HTTP, so every kind of traffic between two proxies shares
//! one multiplexed, mutually authenticated connection. Both ends of the stream are
//! [`crate::peer::Tunnel`]s.
//!
//! The `CONNECT` authority is the destination the client dialled (`ip:port`). The
//! receiving proxy uses only its port and connects to its own app on that port: a tunnel
//! can never be pointed at another host.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::Error;
use crate::http::Body;
use crate::peer::server::TakeTunnel;
use crate::peer::{PeerBody, Tunnel};

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

/// Serves a `CONNECT` request on the inbound side: connects to `app` and answers 200;
/// the peer server hands the stream over ([`TakeTunnel`]) and it is spliced to the app in
/// the background. `on_done` runs with the byte counts (or the error) when the tunnel
/// closes.
pub async fn accept<F>(
    req: Request<PeerBody>,
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
    let recv = req.into_body().into_stream();
    let (take, taken) = TakeTunnel::new();
    tokio::spawn(async move {
        let result = match taken.await {
            Ok(send) => splice(tcp, Tunnel::new(send, recv)).await,
            Err(_) => Err(std::io::Error::other("the tunnel's answer was never sent")),
        };
        on_done(result);
    });
    let mut resp = Response::new(crate::http::full(Bytes::new()));
    resp.extensions_mut().insert(take);
    Ok(resp)
}
