//! Pooled mTLS HTTP/2 connections to peer proxies: one per (address, identity), shared
//! by every request and tunnel to that peer, reaped when idle.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use trellis_api::Endpoint;
use trellis_identity::SpiffeId;

use super::route::endpoint_identity;
use crate::error::Error;
use crate::identity::Certified;
use crate::metrics::{DirectionLabels, Metrics};
use crate::peer::client::PeerConn;

/// How long connecting (TCP + mTLS + HTTP/2 handshake) to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled connection, the identity its server proved, and when it was last handed out.
struct Entry {
    identity: SpiffeId,
    sender: PeerConn,
    last_used: Instant,
}

/// Connections to peers, by address; an address has one entry per identity it was asked
/// to prove (almost always one).
///
/// Keyed by address rather than by (address, identity) so a pooled request costs a hash
/// of the address and a string comparison: the identity is parsed, and its TLS settings
/// looked up, only when a connection is opened (that was ~5% of a hop's instructions).
#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<SocketAddr, Vec<Entry>>>,
}

// === impl Pool ===

impl Pool {
    /// A ready sender to `endpoint` and the identity it proved; connects (checking that
    /// the server is `endpoint.identity`) when none is pooled.
    pub async fn get(
        &self,
        endpoint: &Endpoint,
        certified: &Certified,
        metrics: &Metrics,
    ) -> Result<(PeerConn, SpiffeId), Error> {
        let addr = endpoint.address;
        {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = conns.get_mut(&addr).and_then(|v| {
                v.iter_mut()
                    .find(|e| e.identity.as_str() == endpoint.identity && !e.sender.is_closed())
            }) {
                e.last_used = Instant::now();
                return Ok((e.sender.clone(), e.identity.clone()));
            }
        }
        let identity = endpoint_identity(endpoint)?;
        let tls = certified
            .client_config(&identity)
            .map_err(|e| Error::Upstream(Box::new(e)))?;
        // Boxed: the TCP + TLS + h2 handshake future is large and rare; inline it would
        // grow every request's future (and the memmove of it per request, ~4% of a hop).
        let sender = Box::pin(connect(addr, tls, metrics)).await?;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let entries = conns.entry(addr).or_default();
        entries.retain(|e| !e.sender.is_closed() && e.identity != identity);
        entries.push(Entry {
            identity: identity.clone(),
            sender: sender.clone(),
            last_used: Instant::now(),
        });
        Ok((sender, identity))
    }

    /// Drops connections unused for `idle`; streams still open on them finish (the
    /// connection closes when its last handle goes).
    pub fn reap(&self, idle: Duration) -> usize {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        crate::transport::retain_pooled(&mut conns, |e| {
            !e.sender.is_closed() && e.last_used.elapsed() < idle
        })
    }
}

async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    metrics: &Metrics,
) -> Result<PeerConn, Error> {
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
    PeerConn::handshake(tls_stream, addr)
        .await
        .map_err(|e| Error::Upstream(Box::new(e)))
}
