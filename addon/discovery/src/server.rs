//! The `Discovery` gRPC service: one task per proxy stream.
//!
//! A stream goes: identity from the connection (never from the Hello), the Hello within
//! [`DEFAULT_HELLO_TIMEOUT`], a full view, then one incremental diff per change of the
//! snapshot watch channel that changes this proxy's view. Acks and Nacks are read
//! concurrently and recorded in the registry that [`DiscoveryService::proxies`] reads.
//!
//! After a Nack the proxy kept its previous version, not the one we sent, so a diff
//! against what we sent would be applied to the wrong base: the next push after a Nack is
//! a full view. Diffs already in flight when the Nack arrives were built on the refused
//! version; the proxy's `apply` may accept them on its older base, and the full view that
//! follows the next change puts it right.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use trellis_api::discovery::v1::discovery_request::Kind;
use trellis_api::discovery::v1::discovery_server::{Discovery, DiscoveryServer};
use trellis_api::discovery::v1::{DiscoveryRequest, DiscoveryResponse, Hello};
use trellis_api::{MeshSnapshot, diff, full, same_view};
use trellis_identity::{ConnectInfo, SpiffeId};

use crate::registry::{Proxies, Registration};
use crate::{Metrics, ProxyStatus, view_for};

/// How long a new stream may take to send its Hello before it is closed.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request message accepted: Hellos, Acks and Nacks are small, and a peer
/// sending more is misbehaving.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Largest response message sent: a full view of a large mesh, with headroom.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Responses buffered per stream before its task waits for the client. Small on purpose:
/// the watch channel coalesces changes, so a slow proxy gets the newest view rather than a
/// queue of stale ones.
const RESPONSE_BUFFER: usize = 2;

type ResponseTx = mpsc::Sender<Result<DiscoveryResponse, Status>>;

/// The discovery gRPC service.
///
/// A cheap handle: clones share the snapshot channel, the metrics and the registry of
/// connected proxies, so keep a clone for [`proxies`](Self::proxies) before calling
/// [`into_server`](Self::into_server).
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    metrics: Metrics,
    proxies: Proxies,
    hello_timeout: Duration,
}

/// One proxy's stream, owned by its task.
struct ProxyStream {
    peer: SpiffeId,
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    inbound: Streaming<DiscoveryRequest>,
    tx: ResponseTx,
    metrics: Metrics,
}

/// Why a stream task stopped early; logged, and sent to the client when it is still there.
enum Closed {
    /// The client went away: nothing left to tell it.
    ClientGone,
    /// The stream broke a rule of the contract.
    Refused(Status),
}

// === impl DiscoveryService ===

impl DiscoveryService {
    /// A service streaming views of the snapshots published on `snapshots`.
    pub fn new(snapshots: watch::Receiver<Arc<MeshSnapshot>>, metrics: Metrics) -> Self {
        Self {
            snapshots,
            metrics,
            proxies: Proxies::default(),
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
        }
    }

    /// Changes how long a new stream may take to send its Hello.
    #[must_use]
    pub fn with_hello_timeout(mut self, timeout: Duration) -> Self {
        self.hello_timeout = timeout;
        self
    }

    /// The tonic service, with request messages capped at [`MAX_REQUEST_BYTES`] and
    /// responses at [`MAX_RESPONSE_BYTES`].
    pub fn into_server(self) -> DiscoveryServer<Self> {
        DiscoveryServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// The proxies connected now (streams past their Hello), in connection order.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        self.proxies.list()
    }

    /// Runs one stream to its end; the registration is dropped, and the proxy unlisted,
    /// however it ends.
    async fn run(self, mut stream: ProxyStream, remote: Option<SocketAddr>) {
        let hello = match stream.await_hello(self.hello_timeout).await {
            Ok(hello) => hello,
            Err(closed) => return stream.close(closed).await,
        };
        info!(
            peer = %stream.peer,
            workload = %hello.workload,
            proxy_version = %hello.proxy_version,
            last_version = hello.last_version,
            ?remote,
            "proxy connected"
        );
        let registration = self.proxies.register(
            ProxyStatus {
                identity: stream.peer.to_string(),
                workload: hello.workload,
                proxy_version: hello.proxy_version,
                remote,
                connected_since: SystemTime::now(),
                sent_version: 0,
                acked_version: None,
                last_nack: None,
            },
            &self.metrics,
        );
        let closed = stream.serve(&registration).await;
        info!(peer = %stream.peer, "proxy disconnected");
        stream.close(closed).await;
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let info = request.extensions().get::<ConnectInfo>();
        let remote = info.and_then(|info| info.remote_addr);
        let Some(peer) = info.and_then(|info| info.peer.clone()) else {
            warn!(
                ?remote,
                "discovery stream without a verified client identity"
            );
            return Err(Status::unauthenticated(
                "discovery needs a client certificate carrying a SPIFFE ID",
            ));
        };
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        let stream = ProxyStream {
            peer,
            snapshots: self.snapshots.clone(),
            inbound: request.into_inner(),
            tx,
            metrics: self.metrics.clone(),
        };
        // The handler returns at once so the client sees response headers; the Hello and
        // everything after it are handled by the stream's own task.
        tokio::spawn(self.clone().run(stream, remote));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

// === impl ProxyStream ===

impl ProxyStream {
    /// The first message, which must be a Hello and arrive within `timeout`.
    async fn await_hello(&mut self, timeout: Duration) -> Result<Hello, Closed> {
        let first = tokio::time::timeout(timeout, self.inbound.message())
            .await
            .map_err(|_| {
                Closed::Refused(Status::deadline_exceeded(format!(
                    "no Hello within {} ms",
                    timeout.as_millis()
                )))
            })?;
        match first {
            Ok(Some(DiscoveryRequest {
                kind: Some(Kind::Hello(hello)),
            })) => Ok(hello),
            Ok(Some(_)) => Err(Closed::Refused(Status::invalid_argument(
                "the first message must be a Hello",
            ))),
            Ok(None) | Err(_) => Err(Closed::ClientGone),
        }
    }

    /// Sends the full view, then diffs as the mesh changes, until either side stops.
    async fn serve(&mut self, registration: &Registration) -> Closed {
        let snapshot = self.snapshots.borrow_and_update().clone();
        let mut sent = view_for(&snapshot, &self.peer);
        if let Err(closed) = self.push(full(&sent), registration).await {
            return closed;
        }
        // Set by a Nack: the proxy holds an older version than `sent`.
        let mut resync = false;
        loop {
            tokio::select! {
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        return Closed::Refused(Status::unavailable("discovery is shutting down"));
                    }
                    let snapshot = self.snapshots.borrow_and_update().clone();
                    let view = view_for(&snapshot, &self.peer);
                    if same_view(&sent, &view) {
                        continue;
                    }
                    let resp = if resync { full(&view) } else { diff(&sent, &view) };
                    if let Err(closed) = self.push(resp, registration).await {
                        return closed;
                    }
                    sent = view;
                    resync = false;
                }
                msg = self.inbound.message() => match msg {
                    Ok(Some(req)) => resync |= self.record(req, registration),
                    Ok(None) => return Closed::ClientGone,
                    Err(status) => {
                        debug!(peer = %self.peer, %status, "discovery stream broke");
                        return Closed::ClientGone;
                    }
                },
                () = self.tx.closed() => return Closed::ClientGone,
            }
        }
    }

    async fn push(
        &self,
        resp: DiscoveryResponse,
        registration: &Registration,
    ) -> Result<(), Closed> {
        let version = resp.version;
        debug!(
            peer = %self.peer,
            version,
            full = resp.full,
            upserts = resp.upserts.len(),
            removed = resp.removed.len(),
            trust_roots = resp.trust_roots_der.len(),
            ca_generation = resp.ca_generation,
            "pushing view"
        );
        self.tx
            .send(Ok(resp))
            .await
            .map_err(|_| Closed::ClientGone)?;
        self.metrics.pushes.inc();
        registration.update(|status| status.sent_version = version);
        Ok(())
    }

    /// Records an Ack or Nack; true when the proxy refused a version and needs a full
    /// view next.
    fn record(&self, req: DiscoveryRequest, registration: &Registration) -> bool {
        match req.kind {
            Some(Kind::Ack(ack)) => {
                debug!(peer = %self.peer, version = ack.version, "proxy acked");
                self.metrics.acks.inc();
                registration.update(|status| status.acked_version = Some(ack.version));
                false
            }
            Some(Kind::Nack(nack)) => {
                warn!(peer = %self.peer, version = nack.version, error = %nack.error, "proxy refused config");
                self.metrics.nacks.inc();
                registration.update(|status| status.last_nack = Some((nack.version, nack.error)));
                true
            }
            Some(Kind::Hello(_)) => {
                warn!(peer = %self.peer, "ignoring a second Hello on a discovery stream");
                false
            }
            None => false,
        }
    }

    /// Ends the stream, telling a client that is still there why.
    async fn close(self, closed: Closed) {
        if let Closed::Refused(status) = closed {
            debug!(peer = %self.peer, %status, "closing discovery stream");
            // The client may be gone by now; then there is nobody to tell.
            let _ = self.tx.send(Err(status)).await;
        }
    }
}
