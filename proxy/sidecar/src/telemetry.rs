//! Request telemetry: the golden HTTP metrics with mesh labels, named after the
//! OpenTelemetry semantic conventions (`http.server.request.duration` is exported as
//! `http_server_request_duration_seconds`), and the peer exchange that fills them in.
//!
//! A request is recorded when its response ENDS (last body frame, trailers, reset or
//! drop), not at its head: the duration then covers the whole exchange, the response size
//! is known, and a gRPC status sent in trailers is seen. [`Observed`] wraps the response
//! body to do that; [`counted`] counts the request body's bytes on the way.
//!
//! Peers tell each other what mTLS cannot: the outbound proxy sends its workload name and
//! the service the app addressed (`trellis-src-workload`, `trellis-dst-service`), the
//! inbound proxy answers with its workload name (`trellis-dst-workload`). The headers
//! are set and removed by the proxies only: an app cannot forge them, and never sees them.
//! Namespaces and principals come from the verified certificates, never from headers.
//!
//! Cardinality is bounded: no path, host or peer address is a label; names a peer claims
//! are checked (a DNS label or subdomain, at most 63 bytes) and at most
//! [`MAX_CLAIMED_NAMES`] distinct ones are kept, later ones count as `unknown`.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use trellis_identity::SpiffeId;

/// Outbound -> inbound: the calling workload's name.
pub static SRC_WORKLOAD: HeaderName = HeaderName::from_static("trellis-src-workload");
/// Outbound -> inbound: the service the app addressed, `<name>.<namespace>`.
pub static DST_SERVICE: HeaderName = HeaderName::from_static("trellis-dst-service");
/// Inbound -> outbound (response): the serving workload's name.
pub static DST_WORKLOAD: HeaderName = HeaderName::from_static("trellis-dst-workload");

/// Distinct names peers may introduce into label values before the rest count as
/// `unknown` (a peer with a valid certificate could otherwise grow the metrics forever).
pub const MAX_CLAIMED_NAMES: usize = 256;

/// The value of a label nobody could fill in.
pub const UNKNOWN: &str = "unknown";

/// A shared, cheap-to-clone label value.
pub type Name = Arc<str>;

/// Labels of one HTTP request, the same for both directions. Prometheus spellings of
/// the semantic-convention attributes (`http.request.method` -> `http_request_method`)
/// plus the mesh's source and destination, Istio style.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpLabels {
    /// `GET`, `POST`, ... or `_OTHER` for a method outside RFC 9110 and PATCH.
    pub http_request_method: &'static str,
    /// Status code returned to the client.
    pub http_response_status_code: u16,
    /// `grpc-status` of a gRPC response; empty for other responses.
    pub rpc_grpc_status_code: Option<u8>,
    /// Calling workload (Deployment-level name, `--service-name` of its proxy).
    pub source_workload: Name,
    /// Calling workload's namespace (from its certificate).
    pub source_namespace: Name,
    /// Calling workload's SPIFFE id.
    pub source_principal: Name,
    /// Serving workload.
    pub destination_workload: Name,
    /// Serving workload's namespace (from its certificate).
    pub destination_namespace: Name,
    /// Serving workload's SPIFFE id.
    pub destination_principal: Name,
    /// The service the app addressed.
    pub destination_service_name: Name,
    /// That service's namespace.
    pub destination_service_namespace: Name,
    /// Namespace of the HTTPRoute the request followed; empty when no route applied, and
    /// always on the serving side (routes are applied by the caller's proxy).
    pub route_namespace: Name,
    /// Name of that HTTPRoute; empty likewise.
    pub route_name: Name,
    /// `mutual_tls`: proxy-to-proxy HTTP is always mTLS.
    pub connection_security_policy: &'static str,
}

/// One side of a request as label values: this proxy's workload, or a peer's.
#[derive(Debug, Clone)]
pub struct Local {
    /// `--service-name` (a peer's: `unknown` until its header says).
    pub workload: Name,
    /// Namespace, from the SPIFFE id.
    pub namespace: Name,
    /// SPIFFE id.
    pub principal: Name,
    /// `workload` as a header value, sent to peers.
    pub header: HeaderValue,
}

impl Local {
    /// The labels of the workload `service_name` with identity `id`. A name that is not
    /// a valid label value becomes `unknown` (the config check refuses one first).
    pub fn new(service_name: &str, id: &SpiffeId) -> Self {
        let workload: Name = if valid_name(service_name) {
            service_name.into()
        } else {
            unknown()
        };
        Self {
            header: HeaderValue::from_str(&workload)
                .unwrap_or_else(|_| HeaderValue::from_static(UNKNOWN)),
            workload,
            namespace: id.namespace().into(),
            principal: id.as_str().into(),
        }
    }

    /// A peer's labels: its workload is not known from the certificate.
    pub fn peer(id: &SpiffeId) -> Self {
        Self {
            workload: unknown(),
            namespace: id.namespace().into(),
            principal: id.as_str().into(),
            header: HeaderValue::from_static(UNKNOWN),
        }
    }
}

/// The three histograms of one direction.
#[derive(Debug, Clone)]
pub struct HttpFamilies {
    /// Request arrival to the end of the response.
    pub duration: Family<HttpLabels, Histogram>,
    /// Request body bytes.
    pub request_size: Family<HttpLabels, Histogram>,
    /// Response body bytes.
    pub response_size: Family<HttpLabels, Histogram>,
    /// The three histograms of each label set seen, found with one lookup per request.
    series: Arc<Mutex<HashMap<HttpLabels, Series, LabelHash>>>,
}

/// Hashes label sets for the series map and the interners: foldhash, seeded per process.
/// SipHash over the fourteen label strings was ~2% of a hop. Flooding these maps with
/// colliding keys is not a concern: their keys come from capped interners
/// ([`MAX_KNOWN_NAMES`], [`MAX_CLAIMED_NAMES`]), so they hold few of them.
type LabelHash = foldhash::fast::RandomState;

/// One label set's histograms: handles sharing the families' own (a histogram clone
/// shares its buckets).
#[derive(Debug)]
struct Series {
    duration: Histogram,
    request_size: Histogram,
    response_size: Histogram,
}

impl HttpFamilies {
    fn new() -> Self {
        // 0.5 ms doubling to 16 s: a mesh hop is well under a millisecond, so the
        // semantic conventions' advised buckets (from 5 ms) would put every request in
        // the first one.
        let duration = || Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        // 64 B times 4 up to 16 MiB.
        let size = || Histogram::new(exponential_buckets(64.0, 4.0, 10));
        Self {
            duration: Family::new_with_constructor(duration),
            request_size: Family::new_with_constructor(size),
            response_size: Family::new_with_constructor(size),
            series: Arc::default(),
        }
    }

    /// Records one finished request under `labels`.
    ///
    /// One hash of the labels (fourteen strings) per request instead of one per family:
    /// the three `get_or_create` calls were ~5% of a hop's instructions.
    #[allow(clippy::cast_precision_loss)] // bucket boundaries, not exact sizes
    fn record(&self, labels: HttpLabels, elapsed: f64, request_bytes: u64, response_bytes: u64) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let s = series.entry(labels).or_insert_with_key(|labels| Series {
            duration: self.duration.get_or_create(labels).clone(),
            request_size: self.request_size.get_or_create(labels).clone(),
            response_size: self.response_size.get_or_create(labels).clone(),
        });
        s.duration.observe(elapsed);
        s.request_size.observe(request_bytes as f64);
        s.response_size.observe(response_bytes as f64);
    }

    /// Registers the families as `http_<kind>_...` (`kind`: `server` or `client`).
    pub fn register(kind: &str, registry: &mut Registry) -> Self {
        let f = Self::new();
        registry.register(
            format!("http_{kind}_request_duration_seconds"),
            format!("Duration of HTTP {kind} requests, to the end of the response"),
            f.duration.clone(),
        );
        registry.register(
            format!("http_{kind}_request_body_size_bytes"),
            format!("Size of HTTP {kind} request bodies"),
            f.request_size.clone(),
        );
        registry.register(
            format!("http_{kind}_response_body_size_bytes"),
            format!("Size of HTTP {kind} response bodies"),
            f.response_size.clone(),
        );
        f
    }
}

/// Interned label values: one allocation per distinct name, and a cap on how many.
/// Names peers claim in headers go through [`Interner::claimed`] (checked, capped at
/// [`MAX_CLAIMED_NAMES`]); names from discovery and certificates through
/// [`Interner::known`] (capped at [`MAX_KNOWN_NAMES`], the size of a very large mesh).
#[derive(Debug)]
pub struct Interner {
    // Hashed as the series map: SipHash was ~290 instructions a lookup, five lookups per
    // request.
    names: RwLock<HashSet<Name, LabelHash>>,
    cap: usize,
}

/// Distinct service, namespace and identity names from discovery kept as label values.
pub const MAX_KNOWN_NAMES: usize = 16_384;

impl Interner {
    /// An interner keeping at most `cap` names.
    pub fn new(cap: usize) -> Self {
        Self {
            names: RwLock::default(),
            cap,
        }
    }

    /// The interned `name`, or `unknown` when it would be one name too many.
    pub fn known(&self, name: &str) -> Name {
        {
            let names = self.names.read().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = names.get(name) {
                return n.clone();
            }
        }
        let mut names = self.names.write().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = names.get(name) {
            return n.clone();
        }
        if names.len() >= self.cap {
            return unknown();
        }
        let n: Name = name.into();
        names.insert(n.clone());
        n
    }

    /// The interned header value, or `unknown` when it is missing, not a valid name, or
    /// would be one name too many.
    pub fn claimed(&self, value: Option<&HeaderValue>) -> Name {
        match value.and_then(|v| v.to_str().ok()) {
            Some(name) if valid_name(name) => self.known(name),
            _ => unknown(),
        }
    }

    /// `<name>.<namespace>` from a `trellis-dst-service` header, both checked.
    pub fn claimed_service(&self, value: Option<&HeaderValue>) -> (Name, Name) {
        match value
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.split_once('.'))
        {
            Some((name, ns)) if valid_name(name) && valid_name(ns) => {
                (self.known(name), self.known(ns))
            }
            _ => (unknown(), unknown()),
        }
    }
}

/// A Kubernetes-style name: lower-case alphanumerics, `-` and `.`, 1 to 63 bytes.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The empty label value: nothing to say (no route applied).
pub fn none() -> Name {
    static NONE: std::sync::OnceLock<Name> = std::sync::OnceLock::new();
    NONE.get_or_init(|| "".into()).clone()
}

/// The shared `unknown` label value.
pub fn unknown() -> Name {
    // One shared allocation; cloning it is a reference count.
    static UNKNOWN_NAME: std::sync::OnceLock<Name> = std::sync::OnceLock::new();
    UNKNOWN_NAME.get_or_init(|| UNKNOWN.into()).clone()
}

/// The semantic conventions' method label: the known methods by name, others `_OTHER`
/// (a client must not be able to mint label values).
pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::CONNECT => "CONNECT",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::TRACE => "TRACE",
        http::Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

/// `grpc-status` from headers or trailers: 0..=16 are the defined codes; anything else
/// is reported as 2 (UNKNOWN), as gRPC clients do.
fn grpc_status(headers: &HeaderMap) -> Option<u8> {
    let v = headers.get("grpc-status")?;
    Some(
        v.to_str()
            .ok()
            .and_then(|s| s.parse::<u8>().ok())
            .filter(|c| *c <= 16)
            .unwrap_or(2),
    )
}

/// Whether a response is gRPC (its status may come in trailers).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A request in flight: its labels as far as known, when it arrived, and its request
/// body's byte count so far.
#[derive(Debug)]
pub struct Pending {
    /// Labels; the status code and the destination fill in as the request goes.
    pub labels: HttpLabels,
    /// Bytes of the request body sent on (shared with [`counted`]).
    pub request_bytes: Arc<AtomicU64>,
    /// The request's trace context, passed on to the next hop.
    pub trace: crate::trace::Context,
    /// The B3 form the request carried, rewritten alongside `traceparent`.
    pub b3: Option<crate::trace::B3Kind>,
    /// The request's span, when sampled.
    pub span: Option<crate::trace::Pending>,
    /// What a tap event needs, when a tap session was open at the start.
    tap: Option<(Arc<crate::tap::Tap>, crate::tap::TapStart)>,
    start: Instant,
}

impl Pending {
    /// A request that arrived at `start` with the trace context `parent`: it runs under a
    /// new span of the metrics' tracer, recorded when sampled (`server`: a SERVER span,
    /// else CLIENT) with the attributes `attributes` builds (called only then); `tap`
    /// builds its tap details, called only while a tap session is open.
    pub fn new(
        metrics: &crate::metrics::Metrics,
        labels: HttpLabels,
        start: Instant,
        parent: Option<&crate::trace::Parent>,
        server: bool,
        attributes: impl FnOnce() -> Vec<opentelemetry_proto::tonic::common::v1::KeyValue>,
        tap: impl FnOnce() -> crate::tap::TapStart,
    ) -> Self {
        let tracer = &metrics.tracer;
        let trace = tracer.start(parent);
        let span = trace.sampled.then(|| {
            crate::trace::Pending::new(
                tracer,
                trace,
                server,
                labels.http_request_method,
                attributes(),
            )
        });
        Self {
            labels,
            request_bytes: Arc::default(),
            trace,
            b3: parent.and_then(|p| p.b3),
            span,
            tap: metrics.tap.active().then(|| (metrics.tap.clone(), tap())),
            start,
        }
    }

    /// Writes the trace context for the next hop into `headers`.
    pub fn inject(&self, headers: &mut HeaderMap) {
        self.trace.inject(headers, self.b3);
    }

    /// Counts `body`'s bytes as the request body.
    pub fn count<B>(&self, body: B) -> crate::http::Body
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<crate::http::BodyError>,
    {
        counted(body, self.request_bytes.clone())
    }

    /// Wraps the response body so that the request is recorded in `families` (and its
    /// access line written) when it ends; the status code and a trailers-only gRPC
    /// status come from `head`.
    pub fn observe<B>(
        mut self,
        families: &HttpFamilies,
        head: &mut http::response::Parts,
        body: B,
        access: Option<crate::http::AccessLine>,
    ) -> Observed<B> {
        self.labels.http_response_status_code = head.status.as_u16();
        let mut record = Record::new(
            families,
            self.labels,
            self.start,
            self.request_bytes,
            &head.headers,
        );
        record.span = self.span;
        record.access = access;
        record.tap = self
            .tap
            .map(|(tap, start)| (tap, start, self.trace.trace_id));
        Observed::new(body, record)
    }
}

/// One request being measured; recorded once, when its response ends.
#[derive(Debug)]
pub struct Record {
    families: HttpFamilies,
    labels: HttpLabels,
    start: Instant,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    span: Option<crate::trace::Pending>,
    tap: Option<(Arc<crate::tap::Tap>, crate::tap::TapStart, [u8; 16])>,
    access: Option<crate::http::AccessLine>,
}

impl Record {
    /// A record for a request that arrived at `start`, with its labels as known at the
    /// response head (the gRPC status may still come from trailers).
    pub fn new(
        families: &HttpFamilies,
        mut labels: HttpLabels,
        start: Instant,
        request_bytes: Arc<AtomicU64>,
        head: &HeaderMap,
    ) -> Self {
        if labels.rpc_grpc_status_code.is_none() {
            labels.rpc_grpc_status_code = grpc_status(head);
        }
        Self {
            families: families.clone(),
            labels,
            start,
            request_bytes,
            response_bytes: 0,
            span: None,
            tap: None,
            access: None,
        }
    }

    fn finish(self) {
        let Self {
            families,
            labels,
            start,
            request_bytes,
            response_bytes,
            span,
            tap,
            access,
        } = self;
        let elapsed = start.elapsed();
        let request_bytes = request_bytes.load(Ordering::Relaxed);
        if let Some(line) = access {
            line.write(request_bytes, response_bytes);
        }
        if let Some((tap, started, trace_id)) = tap {
            tap.publish(crate::tap::TapEvent {
                time: crate::logging::access_time().to_string(),
                direction: started.direction,
                method: started.method,
                authority: started.authority,
                path: started.path,
                status: labels.http_response_status_code,
                grpc_status: labels.rpc_grpc_status_code,
                duration_ms: elapsed.as_secs_f64() * 1e3,
                request_bytes,
                response_bytes,
                source_workload: labels.source_workload.to_string(),
                source_principal: labels.source_principal.to_string(),
                destination_workload: labels.destination_workload.to_string(),
                destination_principal: labels.destination_principal.to_string(),
                destination_service: format!(
                    "{}.{}",
                    labels.destination_service_name, labels.destination_service_namespace
                ),
                trace_id: crate::trace::hex(&trace_id),
            });
        }
        if let Some(span) = span {
            span.finish(
                labels.http_response_status_code,
                labels.rpc_grpc_status_code,
            );
        }
        families.record(labels, elapsed.as_secs_f64(), request_bytes, response_bytes);
    }
}

/// A response body that records its request when it ends: at the last frame, on an
/// error, or when dropped unfinished (the client went away).
pub struct Observed<B> {
    inner: B,
    record: Option<Record>,
}

impl<B> Observed<B> {
    /// Wraps `inner`; `record` is recorded once.
    pub fn new(inner: B, record: Record) -> Self {
        Self {
            inner,
            record: Some(record),
        }
    }
}

impl<B> HttpBody for Observed<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(r) = this.record.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        r.response_bytes += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref()
                        && let Some(code) = grpc_status(trailers)
                    {
                        r.labels.rpc_grpc_status_code = Some(code);
                    }
                }
                if this.inner.is_end_stream()
                    && let Some(r) = this.record.take()
                {
                    r.finish();
                }
            }
            Poll::Ready(_) => {
                if let Some(r) = this.record.take() {
                    r.finish();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            r.finish();
        }
    }
}

/// `body` as the proxy's [`crate::http::Body`], adding each data frame's length to
/// `bytes` on the way.
pub fn counted<B>(body: B, bytes: Arc<AtomicU64>) -> crate::http::Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<crate::http::BodyError>,
{
    use http_body_util::BodyExt as _;
    body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        frame
    })
    .map_err(Into::into)
    .boxed_unsync()
}

#[cfg(test)]
impl HttpLabels {
    /// A `GET` from demo/client to demo/web with `status`, for tests.
    pub(crate) fn sample(status: u16) -> Self {
        Self {
            http_request_method: "GET",
            http_response_status_code: status,
            rpc_grpc_status_code: None,
            source_workload: "client".into(),
            source_namespace: "demo".into(),
            source_principal: "spiffe://cluster.local/ns/demo/sa/client".into(),
            destination_workload: "web".into(),
            destination_namespace: "demo".into(),
            destination_principal: "spiffe://cluster.local/ns/demo/sa/web".into(),
            destination_service_name: "web".into(),
            destination_service_namespace: "demo".into(),
            route_namespace: none(),
            route_name: none(),
            connection_security_policy: "mutual_tls",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn labels() -> HttpLabels {
        HttpLabels::sample(200)
    }

    #[test]
    fn series_hashes_follow_label_values() {
        use std::hash::BuildHasher as _;
        let state = LabelHash::default();
        let a = labels();
        assert_eq!(state.hash_one(&a), state.hash_one(a.clone()));
        let mut b = labels();
        b.destination_workload = "web-2".into();
        assert_ne!(state.hash_one(&a), state.hash_one(&b));
        assert_ne!(
            state.hash_one(labels()),
            state.hash_one(HttpLabels::sample(503))
        );
        // Recorded under one series each.
        let families = HttpFamilies::new();
        families.record(a.clone(), 0.001, 0, 3);
        families.record(a, 0.002, 0, 3);
        families.record(b, 0.001, 0, 3);
        assert_eq!(families.series.lock().unwrap().len(), 2);
        // The cached handles share the families' histograms: the counts are exported.
        let mut registry = Registry::default();
        registry.register("d", "d", families.duration);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let mut counts: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("d_count{"))
            .filter_map(|l| l.rsplit(' ').next())
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, ["1", "2"], "{text}");
    }

    fn exposition(r: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).unwrap();
        s
    }

    #[test]
    fn claimed_names_are_checked_and_capped() {
        let c = Interner::new(MAX_CLAIMED_NAMES);
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(&*c.claimed(Some(&v("web"))), "web");
        assert_eq!(&*c.claimed(None), "unknown");
        assert_eq!(&*c.claimed(Some(&v("Web"))), "unknown");
        assert_eq!(&*c.claimed(Some(&v("a b"))), "unknown");
        assert_eq!(&*c.claimed(Some(&v(&"a".repeat(64)))), "unknown");
        assert_eq!(&*c.claimed(Some(&v(&"a".repeat(63)))), "a".repeat(63));
        // Interned: the same allocation every time.
        assert!(Arc::ptr_eq(
            &c.claimed(Some(&v("web"))),
            &c.claimed(Some(&v("web")))
        ));
        for i in 0..MAX_CLAIMED_NAMES * 2 {
            c.claimed(Some(&v(&format!("w{i}"))));
        }
        assert_eq!(c.names.read().unwrap().len(), MAX_CLAIMED_NAMES);
        assert_eq!(&*c.claimed(Some(&v("one-too-many"))), "unknown");
        // Names seen before the cap still resolve.
        assert_eq!(&*c.claimed(Some(&v("web"))), "web");
        let full = c.claimed_service(Some(&v("web.demo")));
        assert_eq!(full, (Name::from("web"), unknown()), "demo is one too many");
        let fresh = Interner::new(4);
        assert_eq!(
            fresh.claimed_service(Some(&v("web.demo"))),
            (Name::from("web"), Name::from("demo"))
        );
        assert_eq!(c.claimed_service(Some(&v("api"))), (unknown(), unknown()));
        assert_eq!(c.claimed_service(Some(&v("a.B"))), (unknown(), unknown()));
    }

    #[test]
    fn methods_outside_the_standard_set_are_other() {
        assert_eq!(method_label(&http::Method::GET), "GET");
        assert_eq!(method_label(&http::Method::PATCH), "PATCH");
        let odd = http::Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(method_label(&odd), "_OTHER");
    }

    #[tokio::test]
    async fn records_sizes_and_grpc_status_from_trailers_once() {
        let mut reg = Registry::default();
        let f = HttpFamilies::register("server", &mut reg);
        let req = Arc::new(AtomicU64::new(0));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("14"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::data(Bytes::from_static(b" world"))),
            Ok(Frame::trailers(trailers)),
        ];
        let counted = counted(
            StreamBody::new(futures_util::stream::iter(vec![Ok::<
                _,
                std::convert::Infallible,
            >(Frame::data(
                Bytes::from_static(b"abc"),
            ))])),
            req.clone(),
        );
        let _ = counted.collect().await.unwrap();
        let rec = Record::new(&f, labels(), Instant::now(), req, &HeaderMap::new());
        let body = Observed::new(StreamBody::new(futures_util::stream::iter(frames)), rec);
        let _ = body.collect().await.unwrap();
        let text = exposition(&reg);
        let count = text
            .lines()
            .filter(|l| l.starts_with("http_server_request_duration_seconds_count{"))
            .collect::<Vec<_>>();
        assert_eq!(count.len(), 1, "{text}");
        assert!(count[0].contains(r#"rpc_grpc_status_code="14""#), "{text}");
        assert!(count[0].ends_with(" 1"), "{text}");
        assert!(
            text.contains("http_server_response_body_size_bytes_sum{")
                && text.lines().any(
                    |l| l.starts_with("http_server_response_body_size_bytes_sum{")
                        && l.ends_with(" 11.0")
                ),
            "{text}"
        );
        assert!(
            text.lines().any(
                |l| l.starts_with("http_server_request_body_size_bytes_sum{")
                    && l.ends_with(" 3.0")
            ),
            "{text}"
        );
    }

    #[test]
    fn a_body_dropped_unfinished_is_recorded() {
        let mut reg = Registry::default();
        let f = HttpFamilies::register("client", &mut reg);
        let mut head = HeaderMap::new();
        head.insert("grpc-status", HeaderValue::from_static("7"));
        let rec = Record::new(
            &f,
            labels(),
            Instant::now(),
            Arc::new(AtomicU64::new(0)),
            &head,
        );
        drop(Observed::new(http_body_util::Empty::<Bytes>::new(), rec));
        let text = exposition(&reg);
        assert!(
            text.lines().any(
                |l| l.starts_with("http_client_request_duration_seconds_count{")
                    && l.contains(r#"rpc_grpc_status_code="7""#)
                    && l.ends_with(" 1")
            ),
            "{text}"
        );
    }
}
