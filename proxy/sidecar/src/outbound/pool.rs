//! Pooled mTLS HTTP/2 connections to peer proxies: one per (address, identity), shared
//! by every request and tunnel to that peer, reaped when idle.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;
use trellis_identity::SpiffeId;

use crate::error::Error;
use crate::http::Body;
use crate::metrics::{DirectionLabels, Metrics};

/// How long connecting (TCP + mTLS + HTTP/2 handshake) to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled connection and when it was last handed out.
struct Entry {
    sender: http2::SendRequest<Body>,
    last_used: Instant,
}

/// Connections to peers.
#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<(SocketAddr, SpiffeId), Entry>>,
}

// === impl Pool ===

impl Pool {
    /// A ready sender to `addr`, which must prove `id`; connects when none is pooled.
    pub async fn get(
        &self,
        addr: SocketAddr,
        id: &SpiffeId,
        tls: Arc<rustls::ClientConfig>,
        metrics: &Metrics,
    ) -> Result<http2::SendRequest<Body>, Error> {
        let key = (addr, id.clone());
        {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = conns.get_mut(&key).filter(|e| !e.sender.is_closed()) {
                e.last_used = Instant::now();
                return Ok(e.sender.clone());
            }
        }
        // Boxed: the TCP + TLS + h2 handshake future is large and rare; inline it would
        // grow every request's future (and the memmove of it per request, ~4% of a hop).
        let sender = Box::pin(connect(addr, tls, metrics)).await?;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|_, e| !e.sender.is_closed());
        conns.insert(
            key,
            Entry {
                sender: sender.clone(),
                last_used: Instant::now(),
            },
        );
        Ok(sender)
    }

    /// Drops connections unused for `idle`; streams still open on them finish (the
    /// connection closes when its last handle goes).
    pub fn reap(&self, idle: Duration) -> usize {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let before = conns.len();
        conns.retain(|_, e| !e.sender.is_closed() && e.last_used.elapsed() < idle);
        before - conns.len()
    }
}

async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    metrics: &Metrics,
) -> Result<http2::SendRequest<Body>, Error> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        // Our verifier checks the SPIFFE id; the name is only for SNI.
        let name = ServerName::try_from("trellis-peer").map_err(std::io::Error::other)?;
        TlsConnector::from(tls).connect(name, tcp).await
    };
    let tls_stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            if source.kind() == std::io::ErrorKind::InvalidData {
                metrics
                    .tls_failures
                    .get_or_create(&DirectionLabels {
                        direction: "outbound",
                    })
                    .inc();
            }
            return Err(Error::Connect { addr, source });
        }
        Err(_) => {
            let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
            return Err(Error::Connect { addr, source });
        }
    };
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(false)
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024)
        .handshake(TokioIo::new(tls_stream))
        .await
        .map_err(|e| Error::Upstream(Box::new(e)))?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            debug!(%error, %addr, "peer connection ended");
        }
    });
    Ok(sender)
}
