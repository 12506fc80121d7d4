//! The `Discovery` gRPC service: one task per proxy stream.
//!
//! A stream goes: identity from the connection (never from the Hello), the Hello within
//! [`DEFAULT_HELLO_TIMEOUT`], a full view, then one incremental diff per change of the
//! snapshot watch channel that changes this proxy's view. The identity's namespace also
//! picks the authorization policies the proxy receives (its namespace's and the root
//! namespace's; see `published`). Acks and Nacks are read
//! concurrently and recorded in the registry that [`DiscoveryService::proxies`] reads.
//!
//! After a Nack the proxy kept its previous version, not the one we sent, so a diff
//! against what we sent would be applied to the wrong base: the next push after a Nack is
//! a full view. Diffs already in flight when the Nack arrives were built on the refused
//! version; the proxy's `apply` may accept them on its older base, and the full view that
//! follows the next change puts it right.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prost::Message;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use trellis_api::MeshSnapshot;
use trellis_api::discovery::v1::discovery_request::Kind;
use trellis_api::discovery::v1::discovery_server::{Discovery, DiscoveryServer};
use trellis_api::discovery::v1::{DiscoveryRequest, DiscoveryResponse, Hello};
use trellis_api::parts::DEFAULT_PART_BYTES;
use trellis_api::split;
use trellis_identity::{ConnectInfo, SpiffeId};

use crate::published::{FullParts, Hub, Published, Push};
use crate::registry::{Proxies, Registration};
use crate::{Metrics, ProxyStatus, Scope};

/// How long a new stream may take to send its Hello before it is closed.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request message accepted: Hellos, Acks and Nacks are small, and a peer
/// sending more is misbehaving.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Largest response message sent: a full view of a large mesh, with headroom.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Full views being sent at once, by default (see `ProxyStream::full_view`). Istio's
/// `PILOT_PUSH_THROTTLE` (100) bounds the same thing; a full view here is one message, so a
/// smaller number keeps the peak memory of a mass reconnect near 100 MiB for a mesh of
/// 10,000 endpoints while still keeping both cores busy.
pub const DEFAULT_FULL_VIEWS_IN_FLIGHT: usize = 16;

/// How long a full view holds its slot without an ack before the slot is freed anyway, so
/// that a proxy that never acks cannot starve the others.
const FULL_VIEW_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Proxies named per service in [`ServiceAcks::pending`]; the counts are always whole.
const MAX_PENDING_LISTED: usize = 10;

/// Whether the proxies that receive a service have applied its latest version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceAcks {
    /// `<namespace>/<name>`.
    pub service: String,
    /// The mesh version at which the service last changed.
    pub version: u64,
    /// Connected proxies whose scope includes the service.
    pub proxies: usize,
    /// Of those, the ones that acked `version` or later.
    pub applied: usize,
    /// Some of the others (at most 10), as `workload (identity)`.
    pub pending: Vec<String>,
}

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
    scope: watch::Receiver<Arc<Scope>>,
    /// Keeps a fixed scope's channel open (see [`DiscoveryService::with_scope`]).
    _scope_tx: Option<Arc<watch::Sender<Arc<Scope>>>>,
    hub: Arc<Hub>,
    full_views: Arc<Semaphore>,
    metrics: Metrics,
    proxies: Proxies,
    hello_timeout: Duration,
}

/// One proxy's stream, owned by its task.
struct ProxyStream {
    peer: SpiffeId,
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    scope: watch::Receiver<Arc<Scope>>,
    hub: Arc<Hub>,
    inbound: Streaming<DiscoveryRequest>,
    tx: ResponseTx,
    metrics: Metrics,
    /// The last version pushed and when, until its ack arrives (for the ack latency).
    in_flight: Option<(u64, Instant)>,
    /// This stream's share of `trellis_discovery_proxies_behind`.
    behind: Behind,
    /// Slots for full views being sent, shared by all streams.
    full_views: Arc<Semaphore>,
    /// This stream's slot while its full view is unacked, and when it is freed anyway.
    full_permit: Option<(OwnedSemaphorePermit, tokio::time::Instant)>,
}

/// Whether a stream's proxy has not acked the latest version sent to it, kept in the
/// `trellis_discovery_proxies_behind` gauge; dropping it (the stream ending, however it
/// ends) takes the stream out of the count.
#[derive(Debug)]
struct Behind {
    gauge: prometheus_client::metrics::gauge::Gauge,
    counted: bool,
}

impl Behind {
    fn set(&mut self, behind: bool) {
        if behind != self.counted {
            if behind {
                self.gauge.inc();
            } else {
                self.gauge.dec();
            }
            self.counted = behind;
        }
    }
}

impl Drop for Behind {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Completes when `permit`'s deadline passes; never when there is no permit.
async fn permit_expiry(permit: Option<&(OwnedSemaphorePermit, tokio::time::Instant)>) {
    match permit {
        Some((_, deadline)) => tokio::time::sleep_until(*deadline).await,
        None => std::future::pending().await,
    }
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
    ///
    /// Every proxy sees every service until [`with_scope`](Self::with_scope) or
    /// [`with_scope_updates`](Self::with_scope_updates) narrows it.
    pub fn new(snapshots: watch::Receiver<Arc<MeshSnapshot>>, metrics: Metrics) -> Self {
        let (scope_tx, scope) = watch::channel(Arc::new(Scope::all()));
        Self {
            hub: Arc::new(Hub::new(snapshots.clone(), scope.clone())),
            snapshots,
            scope,
            _scope_tx: Some(Arc::new(scope_tx)),
            full_views: Arc::new(Semaphore::new(DEFAULT_FULL_VIEWS_IN_FLIGHT)),
            metrics,
            proxies: Proxies::default(),
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
        }
    }

    /// Serves every proxy the services `scope` allows it.
    #[must_use]
    pub fn with_scope(self, scope: Scope) -> Self {
        let (scope_tx, scope) = watch::channel(Arc::new(scope));
        Self {
            _scope_tx: Some(Arc::new(scope_tx)),
            ..self.with_scope_updates(scope)
        }
    }

    /// Serves every proxy the services the newest scope on `scope` allows it; a change of
    /// scope sends every connected proxy a full view.
    #[must_use]
    pub fn with_scope_updates(self, scope: watch::Receiver<Arc<Scope>>) -> Self {
        Self {
            hub: Arc::new(Hub::new(self.snapshots.clone(), scope.clone())),
            scope,
            _scope_tx: None,
            ..self
        }
    }

    /// Changes how many full views may be in flight at once (at least 1).
    #[must_use]
    pub fn with_full_views_in_flight(mut self, limit: usize) -> Self {
        self.full_views = Arc::new(Semaphore::new(limit.max(1)));
        self
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
    ///
    /// `synced` is computed now: the proxy acked everything sent, and nothing it receives
    /// changed since.
    pub fn proxies(&self) -> Vec<ProxyStatus> {
        let version = self.hub.latest().version;
        let mut proxies = self.proxies.list();
        for p in &mut proxies {
            p.synced = p.view_version >= version
                && p.acked_version.is_some_and(|acked| acked >= p.sent_version)
                && p.last_nack
                    .as_ref()
                    .is_none_or(|(nacked, _)| *nacked < p.sent_version);
        }
        proxies
    }

    /// For every service: the version it last changed at, and which connected proxies
    /// that receive it (by scope) have applied that version. What `trellis check` and
    /// `/debug/acks` show; a service no proxy receives has `proxies: 0`.
    pub fn service_acks(&self) -> Vec<ServiceAcks> {
        let published = self.hub.latest();
        let proxies: Vec<(String, ProxyStatus)> = self
            .proxies
            .list()
            .into_iter()
            .filter_map(|p| {
                let ns = SpiffeId::parse(&p.identity).ok()?.namespace().to_owned();
                Some((ns, p))
            })
            .collect();
        published
            .services
            .iter()
            .map(|(key, entry)| {
                let mut acks = ServiceAcks {
                    service: key.to_string(),
                    version: entry.changed_at,
                    proxies: 0,
                    applied: 0,
                    pending: Vec::new(),
                };
                for (ns, p) in &proxies {
                    if !published.in_scope(ns, key) {
                        continue;
                    }
                    acks.proxies += 1;
                    if p.acked_version.is_some_and(|v| v >= entry.changed_at) {
                        acks.applied += 1;
                    } else if acks.pending.len() < MAX_PENDING_LISTED {
                        acks.pending
                            .push(format!("{} ({})", p.workload, p.identity));
                    }
                }
                acks
            })
            .collect()
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
                metrics_address: hello.metrics_address,
                admin_address: hello.admin_address,
                remote,
                connected_since: SystemTime::now(),
                sent_version: 0,
                view_version: 0,
                acked_version: None,
                last_nack: None,
                synced: false,
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
            scope: self.scope.clone(),
            hub: self.hub.clone(),
            inbound: request.into_inner(),
            tx,
            metrics: self.metrics.clone(),
            in_flight: None,
            behind: Behind {
                gauge: self.metrics.proxies_behind.clone(),
                counted: false,
            },
            full_views: self.full_views.clone(),
            full_permit: None,
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

    /// Sends the full view, then what changed in it, until either side stops.
    ///
    /// The stream keeps only the version its proxy holds ([`Base`]); what to send is read
    /// from the shared [`Published`](crate::published::Published) mesh, so a push costs
    /// the size of the change. A slow proxy is never queued behind: while this task waits
    /// on the proxy, changes pile up in the watch channel and go out as one push from the
    /// proxy's version to the newest (or a full view once it is past the change log).
    async fn serve(&mut self, registration: &Registration) -> Closed {
        self.snapshots.borrow_and_update();
        self.scope.borrow_and_update();
        let (published, full) = match self.full_view().await {
            Ok(view) => view,
            Err(closed) => return closed,
        };
        let mut base = published.base();
        if let Err(closed) = self.push(full, registration).await {
            return closed;
        }
        registration.update(|status| status.view_version = base.version);
        // Set by a Nack: the proxy holds an older version than `base`.
        let mut resync = false;
        let mut scope_open = true;
        loop {
            tokio::select! {
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        return Closed::Refused(Status::unavailable("discovery is shutting down"));
                    }
                    self.snapshots.borrow_and_update();
                }
                changed = self.scope.changed(), if scope_open => {
                    // A fixed scope's sender may be gone: then it never changes again.
                    scope_open = changed.is_ok();
                    self.scope.borrow_and_update();
                }
                msg = self.inbound.message() => {
                    match msg {
                        Ok(Some(req)) => resync |= self.record(req, registration),
                        Ok(None) => return Closed::ClientGone,
                        Err(status) => {
                            debug!(peer = %self.peer, %status, "discovery stream broke");
                            return Closed::ClientGone;
                        }
                    }
                    continue;
                }
                () = self.tx.closed() => return Closed::ClientGone,
                () = permit_expiry(self.full_permit.as_ref()) => {
                    debug!(peer = %self.peer, "no ack of a full view in time; freeing its slot");
                    self.full_permit = None;
                    continue;
                }
            }
            let (published, push) = if resync {
                match self.full_view().await {
                    Ok((published, full)) => (published, Push::Full(full)),
                    Err(closed) => return closed,
                }
            } else {
                let published = self.hub.latest();
                let push = published.push_from(base, self.peer.namespace());
                (published, push)
            };
            let sent = match push {
                Push::Nothing => Ok(()),
                Push::Full(parts) => self.push(parts, registration).await,
                Push::Send(resp) => {
                    self.push(split(resp, DEFAULT_PART_BYTES), registration)
                        .await
                }
            };
            if let Err(closed) = sent {
                return closed;
            }
            base = published.base();
            registration.update(|status| status.view_version = base.version);
            resync = false;
        }
    }

    /// A full view, sent under one of the server's full-view slots. Its parts are built
    /// as they are sent, so memory stays small; the slots bound the CPU a mass reconnect
    /// takes from changes being pushed to everyone else.
    /// The slot is freed by the proxy's ack or nack (it has read the whole message by
    /// then), the stream ending, or [`FULL_VIEW_ACK_TIMEOUT`].
    async fn full_view(&mut self) -> Result<(Arc<Published>, FullParts), Closed> {
        self.full_permit = None;
        let permit = tokio::select! {
            permit = self.full_views.clone().acquire_owned() => {
                permit.map_err(|_| Closed::Refused(Status::unavailable("discovery is shutting down")))?
            }
            () = self.tx.closed() => return Err(Closed::ClientGone),
        };
        self.full_permit = Some((permit, tokio::time::Instant::now() + FULL_VIEW_ACK_TIMEOUT));
        let published = self.hub.latest();
        let full = FullParts::new(published.clone(), self.peer.namespace(), DEFAULT_PART_BYTES);
        Ok((published, full))
    }

    /// Sends one version, in parts so that no message (and no per-stream encode buffer)
    /// grows with the size of the mesh (see `trellis_api::parts`).
    async fn push(
        &mut self,
        parts: impl IntoIterator<Item = DiscoveryResponse>,
        registration: &Registration,
    ) -> Result<(), Closed> {
        let mut parts = parts.into_iter().peekable();
        let Some(first) = parts.peek() else {
            return Ok(());
        };
        let (version, full) = (first.version, first.full);
        debug!(
            peer = %self.peer,
            version,
            full,
            trust_roots = first.trust_roots_der.len(),
            ca_generation = first.ca_generation,
            outbound_traffic_policy = first.outbound_traffic_policy,
            policies = first.authorization.as_ref().map(|a| a.policies.len()),
            "pushing view"
        );
        let mut bytes = 0;
        for part in parts {
            bytes += part.encoded_len();
            self.tx
                .send(Ok(part))
                .await
                .map_err(|_| Closed::ClientGone)?;
        }
        self.metrics.pushes.inc();
        if full {
            self.metrics.full_pushes.inc();
        }
        self.metrics.pushed_bytes.inc_by(bytes as u64);
        self.in_flight = Some((version, Instant::now()));
        self.behind.set(true);
        registration.update(|status| status.sent_version = version);
        Ok(())
    }

    /// Records an Ack or Nack; true when the proxy refused a version and needs a full
    /// view next.
    fn record(&mut self, req: DiscoveryRequest, registration: &Registration) -> bool {
        match req.kind {
            Some(Kind::Ack(ack)) => {
                debug!(peer = %self.peer, version = ack.version, "proxy acked");
                self.metrics.acks.inc();
                self.full_permit = None;
                if let Some((version, pushed)) = self.in_flight
                    && version == ack.version
                {
                    self.metrics
                        .ack_latency
                        .observe(pushed.elapsed().as_secs_f64());
                    self.in_flight = None;
                    self.behind.set(false);
                }
                registration.update(|status| status.acked_version = Some(ack.version));
                false
            }
            Some(Kind::Nack(nack)) => {
                self.full_permit = None;
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
