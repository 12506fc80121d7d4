//! The control plane's TLS listener for gRPC: accepts, handshakes each connection in its
//! own task (a slow client cannot stall the accept loop), and hands tonic streams whose
//! `Connected` info carries the verified client identity ([`ConnectInfo`]). Client
//! certificates are optional on this port: a proxy asks the CA for its first certificate
//! without one; discovery refuses streams without one.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;
use trellis_identity::ConnectInfo;

/// How long a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An accepted, handshaken connection.
pub(crate) struct MeshTls {
    inner: TlsStream<TcpStream>,
    info: ConnectInfo,
}

/// Accepts on `listener` forever, TLS-terminating with the latest `config`.
pub(crate) fn incoming(
    listener: TcpListener,
    config: watch::Receiver<Arc<rustls::ServerConfig>>,
) -> ReceiverStream<Result<MeshTls, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(a) => a,
                Err(error) => {
                    debug!(%error, "grpc accept failed");
                    continue;
                }
            };
            let acceptor = TlsAcceptor::from(config.borrow().clone());
            let conn_tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(inner)) => {
                        let peer = inner
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(trellis_identity::peer_identity);
                        let info = ConnectInfo {
                            remote_addr: Some(remote),
                            peer,
                        };
                        let _ = conn_tx.send(Ok(MeshTls { inner, info })).await;
                    }
                    Ok(Err(error)) => debug!(%remote, %error, "grpc TLS handshake failed"),
                    Err(_) => debug!(%remote, "grpc TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

// === impl MeshTls ===

impl tonic::transport::server::Connected for MeshTls {
    type ConnectInfo = ConnectInfo;

    fn connect_info(&self) -> ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for MeshTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
