//! Distributed tracing: trace context in and out of every HTTP request, a SERVER span
//! per inbound request and a CLIENT span per outbound one, sampled per the mesh config,
//! exported over OTLP/gRPC through a bounded queue.
//!
//! Context is read from W3C `traceparent` first, then B3 (single `b3` or the
//! `x-b3-*` headers). The proxy always passes a context on: it rewrites `traceparent`
//! (and B3 headers the request carried) to name its own span as the parent, so the next
//! hop joins the same trace. The app must copy the incoming headers onto the calls it
//! makes for one trace to span several hops, as with every mesh.
//!
//! Sampling is parent-based: an incoming decision (the `sampled` flag) is kept; a new
//! trace is sampled with the probability the mesh config sets (`tracing.sampling`).
//! Only sampled requests build a span (its attributes are collected at all only then).
//! Finished spans go into a queue of [`QUEUE_SPANS`]; when it is full the span is dropped
//! and counted, never waited for: tracing must not slow traffic down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

/// W3C trace context.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// B3 single header.
static B3: HeaderName = HeaderName::from_static("b3");
static B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
static B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");

/// Finished spans waiting for export; more are dropped.
pub const QUEUE_SPANS: usize = 2048;
/// Spans per export request.
pub const BATCH_SPANS: usize = 512;
/// Longest a finished span waits for its batch.
pub const BATCH_DELAY: Duration = Duration::from_secs(2);

/// The parent context a request arrived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// Trace id.
    pub trace_id: [u8; 16],
    /// The caller's span.
    pub span_id: [u8; 8],
    /// The caller's decision, if it made one.
    pub sampled: Option<bool>,
    /// Where it came from: B3 headers are rewritten too when the request carried them.
    pub b3: Option<B3Kind>,
}

/// Which B3 form a request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum B3Kind {
    /// `b3: {trace}-{span}[-{sampled}[-{parent}]]`.
    Single,
    /// `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`.
    Multi,
}

/// Reads the trace context of a request: `traceparent`, else B3. Malformed or all-zero
/// ids count as no context (a new trace starts).
pub fn extract(headers: &HeaderMap) -> Option<Parent> {
    let b3 = if headers.contains_key(&B3) {
        Some(B3Kind::Single)
    } else if headers.contains_key(&B3_TRACE) {
        Some(B3Kind::Multi)
    } else {
        None
    };
    if let Some(p) = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
    {
        return Some(Parent { b3, ..p });
    }
    match b3? {
        B3Kind::Single => {
            let v = headers.get(&B3)?.to_str().ok()?;
            let mut parts = v.split('-');
            let trace_id = hex_trace(parts.next()?)?;
            let span_id = hex_id::<8>(parts.next()?)?;
            let sampled = parts.next().and_then(b3_sampled);
            Some(Parent {
                trace_id,
                span_id,
                sampled,
                b3,
            })
        }
        B3Kind::Multi => {
            let get = |h: &HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
            Some(Parent {
                trace_id: hex_trace(get(&B3_TRACE)?)?,
                span_id: hex_id::<8>(get(&B3_SPAN)?)?,
                sampled: get(&B3_SAMPLED).and_then(b3_sampled),
                b3,
            })
        }
    }
}

/// `00-{32 hex}-{16 hex}-{2 hex}`; later versions are read the same way (the spec's
/// forward-compatibility rule), version `ff` is invalid.
fn parse_traceparent(v: &str) -> Option<Parent> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    if version.len() != 2 || version.eq_ignore_ascii_case("ff") {
        return None;
    }
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if trace.len() != 32 || flags.len() != 2 || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Parent {
        trace_id: hex_id::<16>(trace).filter(|t| *t != [0; 16])?,
        span_id: hex_id::<8>(span).filter(|s| *s != [0; 8])?,
        sampled: Some(flags & 1 == 1),
        b3: None,
    })
}

/// B3 trace ids are 64 or 128 bit; a 64-bit one is left-padded with zeros.
fn hex_trace(s: &str) -> Option<[u8; 16]> {
    let id = match s.len() {
        32 => hex_id::<16>(s)?,
        16 => {
            let low = hex_id::<8>(s)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn hex_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    // By hand rather than `u8::from_str_radix` per pair: this runs for every request
    // that carries a trace context, and from_str_radix also took a leading `+`.
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let mut out = [0u8; N];
    for (b, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        *b = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    (out != [0; N]).then_some(out)
}

/// Bytes as lower-case hex (trace and span ids as W3C writes them).
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let [hi, lo] = hex_pair(*b);
        s.push(char::from(hi));
        s.push(char::from(lo));
    }
    s
}

/// One byte as two lower-case hex digits (every request writes a traceparent: no
/// formatting machinery on that path).
fn hex_pair(b: u8) -> [u8; 2] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]
}

/// `00-{trace}-{span}-{flags}`, the 55 bytes of a version-00 traceparent.
fn traceparent(trace: &[u8; 16], span: &[u8; 8], sampled: bool) -> [u8; 55] {
    let mut out = [b'-'; 55];
    out[..2].copy_from_slice(b"00");
    for (i, b) in trace.iter().enumerate() {
        out[3 + 2 * i..5 + 2 * i].copy_from_slice(&hex_pair(*b));
    }
    for (i, b) in span.iter().enumerate() {
        out[36 + 2 * i..38 + 2 * i].copy_from_slice(&hex_pair(*b));
    }
    out[53..].copy_from_slice(if sampled { b"01" } else { b"00" });
    out
}

/// The span a request runs under: its ids, and whether it is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// Trace id (new, or the caller's).
    pub trace_id: [u8; 16],
    /// This proxy's span for the request.
    pub span_id: [u8; 8],
    /// The caller's span, if the request arrived with one.
    pub parent: Option<[u8; 8]>,
    /// Recorded and exported.
    pub sampled: bool,
}

impl Context {
    /// The trace id as 32 hex digits (access logs).
    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Writes this context into `headers` for the next hop: `traceparent` always, and
    /// the B3 form the request came with, if any.
    pub fn inject(&self, headers: &mut HeaderMap, b3: Option<B3Kind>) {
        let tp = traceparent(&self.trace_id, &self.span_id, self.sampled);
        if let Ok(v) = HeaderValue::from_bytes(&tp) {
            headers.insert(&TRACEPARENT, never_indexed(v));
        }
        let Some(b3) = b3 else {
            return;
        };
        let (trace, span) = (hex(&self.trace_id), hex(&self.span_id));
        let sampled = if self.sampled { "1" } else { "0" };
        match b3 {
            B3Kind::Single => {
                if let Ok(v) = HeaderValue::from_str(&format!("{trace}-{span}-{sampled}")) {
                    headers.insert(&B3, never_indexed(v));
                }
            }
            B3Kind::Multi => {
                let mut set = |name: &HeaderName, v: String| {
                    if let Ok(v) = HeaderValue::from_str(&v) {
                        headers.insert(name, never_indexed(v));
                    }
                };
                set(&B3_TRACE, trace);
                set(&B3_SPAN, span);
                set(&B3_SAMPLED, sampled.to_owned());
                match self.parent {
                    Some(p) => set(&B3_PARENT, hex(&p)),
                    None => {
                        headers.remove(&B3_PARENT);
                    }
                }
            }
        }
    }
}

/// Marks a per-request value (a trace or span id) so HPACK sends it as a literal that is
/// never indexed: such a value never repeats, so adding it to the connection's dynamic
/// table only evicts entries that would, and the table search and insertion were ~8% of
/// an outbound hop's instructions (`scripts/bench --count`).
fn never_indexed(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// Where spans go, from the mesh config (`tracing.otlp`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Sink {
    /// Not exported (spans are not built; context still propagates).
    #[default]
    Off,
    /// The control plane's telemetry gateway, over the proxy's mTLS connection.
    Mesh,
    /// An OTLP/gRPC collector, e.g. `http://otel-collector.monitoring:4317`.
    Collector(String),
}

/// What the mesh config says about tracing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// Probability of sampling a new trace, in millionths (1% = 10,000).
    pub sampling_per_million: u32,
    /// Where to send spans.
    pub sink: Sink,
}

impl From<&trellis_api::Tracing> for Settings {
    fn from(t: &trellis_api::Tracing) -> Self {
        Self {
            sampling_per_million: t.sampling_per_million,
            sink: match t.otlp.as_str() {
                "" => Sink::Off,
                "mesh" => Sink::Mesh,
                url => Sink::Collector(url.to_owned()),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// Starts spans and hands finished ones to the exporter.
#[derive(Debug)]
pub struct Tracer {
    /// Current probability of sampling a new trace, in millionths.
    sampling: AtomicU32,
    /// Spans have somewhere to go (`tracing.otlp` set): without, nothing is sampled.
    enabled: AtomicBool,
    settings: watch::Sender<Settings>,
    queue: mpsc::Sender<Span>,
    dropped: Family<DropLabels, Counter>,
    exported: Counter,
}

/// The receiving end of the span queue, for [`export`].
#[derive(Debug)]
pub struct Queue(mpsc::Receiver<Span>);

impl Tracer {
    /// A tracer (sampling nothing until [`Tracer::apply`]), its queue, and its metrics
    /// registered under `trellis_proxy_`.
    pub fn new(registry: &mut Registry) -> (Arc<Self>, Queue) {
        let (tx, rx) = mpsc::channel(QUEUE_SPANS);
        let t = Self {
            sampling: AtomicU32::new(0),
            enabled: AtomicBool::new(false),
            settings: watch::Sender::new(Settings::default()),
            queue: tx,
            dropped: Family::default(),
            exported: Counter::default(),
        };
        for reason in ["queue_full", "export_failed"] {
            let _ = t.dropped.get_or_create(&DropLabels { reason });
        }
        let r = registry.sub_registry_with_prefix("trellis_proxy");
        r.register(
            "spans_dropped",
            "Finished spans not exported, by reason",
            t.dropped.clone(),
        );
        r.register(
            "spans_exported",
            "Spans the OTLP endpoint accepted",
            t.exported.clone(),
        );
        (Arc::new(t), Queue(rx))
    }

    /// The settings in force now and later (the metrics pusher follows the same sink).
    pub fn settings(&self) -> watch::Receiver<Settings> {
        self.settings.subscribe()
    }

    /// Takes new settings: the probability applies to the next request, the sink to the
    /// next batch.
    pub fn apply(&self, s: &Settings) {
        self.sampling
            .store(s.sampling_per_million.min(1_000_000), Ordering::Relaxed);
        self.enabled.store(s.sink != Sink::Off, Ordering::Relaxed);
        self.settings.send_if_modified(|running| {
            let changed = running != s;
            if changed {
                *running = s.clone();
            }
            changed
        });
    }

    /// The context for a request that arrived with `parent`: a new span in the caller's
    /// trace, or a new trace. Export off means nothing is sampled, whatever the caller
    /// decided (its decision still travels on in the flag).
    pub fn start(&self, parent: Option<&Parent>) -> Context {
        let p = self.sampling.load(Ordering::Relaxed);
        let on = self.enabled.load(Ordering::Relaxed);
        let span_id = loop {
            let id: [u8; 8] = rand::random();
            if id != [0; 8] {
                break id;
            }
        };
        match parent {
            Some(parent) => Context {
                trace_id: parent.trace_id,
                span_id,
                parent: Some(parent.span_id),
                sampled: on
                    && parent
                        .sampled
                        .unwrap_or_else(|| rand::random_range(0..1_000_000) < p),
            },
            None => Context {
                trace_id: loop {
                    let id: [u8; 16] = rand::random();
                    if id != [0; 16] {
                        break id;
                    }
                },
                span_id,
                parent: None,
                sampled: on && rand::random_range(0..1_000_000) < p,
            },
        }
    }

    /// Queues a finished span; a full queue drops it (counted).
    pub fn finish(&self, span: Span) {
        if self.queue.try_send(span).is_err() {
            self.dropped
                .get_or_create(&DropLabels {
                    reason: "queue_full",
                })
                .inc();
        }
    }
}

/// A sampled request's span, as far as known before its response ends.
#[derive(Debug)]
pub struct Pending {
    ctx: Context,
    kind: span::SpanKind,
    name: &'static str,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    tracer: Arc<Tracer>,
}

/// A string attribute.
pub fn attr(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

/// An integer attribute.
pub fn int_attr(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}

impl Pending {
    /// A SERVER (inbound) or CLIENT (outbound) span named after the method, as the
    /// semantic conventions name HTTP spans without a route.
    pub fn new(
        tracer: &Arc<Tracer>,
        ctx: Context,
        server: bool,
        method: &'static str,
        attributes: Vec<KeyValue>,
    ) -> Self {
        Self {
            ctx,
            kind: if server {
                span::SpanKind::Server
            } else {
                span::SpanKind::Client
            },
            name: method,
            start: SystemTime::now(),
            attributes,
            tracer: tracer.clone(),
        }
    }

    /// Adds an attribute learnt on the way (the endpoint, the peer).
    pub fn push(&mut self, kv: KeyValue) {
        self.attributes.push(kv);
    }

    /// Ends the span: status from the HTTP status (a server span fails on 5xx, a client
    /// span on 4xx and 5xx) and the gRPC status (anything but OK fails), then queues it.
    pub fn finish(mut self, status: u16, grpc: Option<u8>) {
        self.attributes
            .push(int_attr("http.response.status_code", i64::from(status)));
        if let Some(g) = grpc {
            self.attributes
                .push(int_attr("rpc.grpc.status_code", i64::from(g)));
        }
        let server = self.kind == span::SpanKind::Server;
        let failed = status >= 500 || (!server && status >= 400) || grpc.is_some_and(|g| g != 0);
        let nanos = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        };
        let span = Span {
            trace_id: self.ctx.trace_id.to_vec(),
            span_id: self.ctx.span_id.to_vec(),
            parent_span_id: self.ctx.parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: 1,
            name: self.name.to_owned(),
            kind: self.kind as i32,
            start_time_unix_nano: nanos(self.start),
            end_time_unix_nano: nanos(SystemTime::now()),
            attributes: self.attributes,
            status: Some(Status {
                code: if failed {
                    status::StatusCode::Error as i32
                } else {
                    status::StatusCode::Unset as i32
                },
                message: String::new(),
            }),
            ..Span::default()
        };
        self.tracer.finish(span);
    }
}

/// Who this proxy is, as OTLP resource attributes: the workload as `service.name` and
/// `service.namespace` (Application Insights' cloud role), the pod as the instance.
pub fn resource(service_name: &str, namespace: &str, pod: &str) -> Resource {
    Resource {
        attributes: vec![
            attr("service.name", service_name),
            attr("service.namespace", namespace),
            attr("service.instance.id", pod),
            attr("k8s.pod.name", pod),
            attr("k8s.namespace.name", namespace),
            attr("telemetry.sdk.name", "trellis-proxy"),
            attr("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
        ],
        ..Resource::default()
    }
}

/// How the exporters reach the mesh sink (the control plane): a fresh mTLS channel.
pub type Connect = Arc<
    dyn Fn()
            -> futures_util::future::BoxFuture<'static, Result<tonic::transport::Channel, SinkError>>
        + Send
        + Sync,
>;

/// Why the sink could not be reached.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// How long one export call (spans or metrics) may take before it counts as failed.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC channel to the sink `tracing.otlp` names, shared by the span exporter and the
/// metrics pusher ([`crate::otlp_metrics`]): one HTTP/2 connection to the control plane
/// carries both, and both follow a sink change the same way. Cheap to clone.
#[derive(Clone)]
pub struct SinkChannel {
    mesh: Connect,
    /// The channel in use and the sink it reaches.
    current: Arc<tokio::sync::Mutex<Current>>,
}

/// The open channel, if any, and its generation: every new channel gets the next number,
/// so that a failure seen on an old channel does not drop a newer one.
#[derive(Default)]
struct Current {
    channel: Option<(Sink, tonic::transport::Channel)>,
    generation: u64,
}

impl std::fmt::Debug for SinkChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkChannel").finish_non_exhaustive()
    }
}

impl SinkChannel {
    /// No channel yet; `mesh` opens one to the control plane when `Sink::Mesh` is asked for.
    pub fn new(mesh: Connect) -> Self {
        Self {
            mesh,
            current: Arc::default(),
        }
    }

    /// A channel to `sink` and its generation: the one in use when it reaches the same
    /// sink, else a new one (a collector's is lazy: errors show on the first call).
    pub async fn get(&self, sink: &Sink) -> Result<(tonic::transport::Channel, u64), SinkError> {
        // An async lock: connecting to the control plane is awaited while holding it, so
        // the two exporters never open two connections at once.
        let mut current = self.current.lock().await;
        if let Some((s, ch)) = &current.channel
            && s == sink
        {
            return Ok((ch.clone(), current.generation));
        }
        let ch = match sink {
            Sink::Mesh => (self.mesh)().await?,
            Sink::Collector(url) => tonic::transport::Endpoint::from_shared(url.clone())
                .map(|e| e.connect_timeout(Duration::from_secs(5)).connect_lazy())?,
            Sink::Off => return Err("telemetry export is off (tracing.otlp unset)".into()),
        };
        current.generation = current.generation.wrapping_add(1);
        current.channel = Some((sink.clone(), ch.clone()));
        Ok((ch, current.generation))
    }

    /// Forgets the channel of `generation` after a failed call, so the next call
    /// reconnects (the control plane restarted, or our certificate changed).
    pub async fn reset(&self, generation: u64) {
        let mut current = self.current.lock().await;
        if current.generation == generation {
            current.channel = None;
        }
    }
}

/// Sends queued spans in batches to the sink `settings` names, until the queue closes.
/// A batch that cannot be sent is dropped (counted): spans are not worth holding traffic
/// or memory for.
pub async fn export(
    tracer: Arc<Tracer>,
    Queue(mut rx): Queue,
    resource: Resource,
    sinks: SinkChannel,
) {
    let mut settings = tracer.settings.subscribe();
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH_SPANS);
    let failed = |n: u64| {
        tracer
            .dropped
            .get_or_create(&DropLabels {
                reason: "export_failed",
            })
            .inc_by(n);
    };
    loop {
        // Collect a batch: up to BATCH_SPANS, or what arrived within BATCH_DELAY of the
        // first.
        match rx.recv().await {
            Some(s) => batch.push(s),
            None => return,
        }
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH_SPANS {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let sink = settings.borrow_and_update().sink.clone();
        let spans = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_SPANS));
        let n = spans.len() as u64;
        if sink == Sink::Off {
            continue;
        }
        let (ch, generation) = match sinks.get(&sink).await {
            Ok(ch) => ch,
            Err(error) => {
                warn!(%error, ?sink, spans = n, "cannot reach the trace sink; spans dropped");
                failed(n);
                continue;
            }
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope()),
                    spans,
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        };
        let mut client = TraceServiceClient::new(ch);
        match tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await {
            Ok(Ok(resp)) => {
                let rejected = resp
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0));
                tracer.exported.inc_by(n.saturating_sub(rejected));
                if rejected > 0 {
                    debug!(rejected, "the trace sink rejected some spans");
                    failed(rejected);
                }
            }
            Ok(Err(status)) => {
                warn!(code = ?status.code(), message = status.message(), spans = n, "trace export failed; spans dropped");
                failed(n);
                sinks.reset(generation).await;
            }
            Err(_) => {
                warn!(spans = n, "trace export timed out; spans dropped");
                failed(n);
                sinks.reset(generation).await;
            }
        }
    }
}

/// The instrumentation scope of everything the proxy exports over OTLP.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "trellis-proxy".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..InstrumentationScope::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn reads_traceparent_then_b3() {
        let p = extract(&headers(&[("traceparent", TP)])).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert_eq!(p.sampled, Some(true));
        let p = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0",
        )]))
        .unwrap();
        assert_eq!(hex(&p.span_id), "e457b5a2e4d86bd1");
        assert_eq!((p.sampled, p.b3), (Some(false), Some(B3Kind::Single)));
        let p = extract(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
        ]))
        .unwrap();
        assert_eq!(hex(&p.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert_eq!((p.sampled, p.b3), (Some(true), Some(B3Kind::Multi)));
    }

    #[test]
    fn ids_are_hex_of_the_exact_length() {
        assert_eq!(hex_id::<2>("0aFf"), Some([0x0a, 0xff]));
        assert_eq!(hex_id::<2>("0000"), None, "all-zero ids are invalid");
        for bad in ["0af", "0aff0", "+aff", "0ag0", "0a f", "éa"] {
            assert_eq!(hex_id::<2>(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn traceparent_bytes_match_the_formatted_form() {
        let (t, s) = ([0xab; 16], [0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        let tp = traceparent(&t, &s, true);
        assert_eq!(
            std::str::from_utf8(&tp).unwrap(),
            format!("00-{}-0123456789abcdef-01", "ab".repeat(16))
        );
        assert!(
            std::str::from_utf8(&traceparent(&t, &s, false))
                .unwrap()
                .ends_with("-00")
        );
        assert_eq!(hex(&[0x00, 0x0f, 0xf0, 0xff]), "000ff0ff");
    }

    #[test]
    fn malformed_context_starts_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(extract(&headers(&[("traceparent", bad)])), None, "{bad}");
        }
        // A future version may carry more fields.
        assert!(
            extract(&headers(&[(
                "traceparent",
                &format!("01{}-more", &TP[2..])
            )]))
            .is_some()
        );
    }

    #[test]
    fn the_next_hop_gets_our_span_as_its_parent() {
        let mut registry = Registry::default();
        let (tracer, _queue) = Tracer::new(&mut registry);
        tracer.apply(&Settings {
            sampling_per_million: 0,
            sink: Sink::Mesh,
        });
        let parent = extract(&headers(&[
            ("traceparent", TP),
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
        ]))
        .unwrap();
        let ctx = tracer.start(Some(&parent));
        assert_eq!(ctx.trace_id, parent.trace_id);
        assert_eq!(ctx.parent, Some(parent.span_id));
        assert_ne!(ctx.span_id, parent.span_id);
        // The caller sampled it: kept, even at 0% for new traces.
        assert!(ctx.sampled);
        let mut out = HeaderMap::new();
        ctx.inject(&mut out, parent.b3);
        let tp = out.get("traceparent").unwrap().to_str().unwrap();
        assert_eq!(
            tp,
            format!("00-{}-{}-01", hex(&ctx.trace_id), hex(&ctx.span_id))
        );
        assert_eq!(out.get("x-b3-spanid").unwrap(), &hex(&ctx.span_id));
        assert_eq!(out.get("x-b3-parentspanid").unwrap(), "00f067aa0ba902b7");
        // A new trace at 0%: not sampled, but still propagated.
        let root = tracer.start(None);
        assert!(!root.sampled && root.parent.is_none());
    }

    #[test]
    fn sampling_follows_the_probability_and_off_means_never() {
        let mut registry = Registry::default();
        let (tracer, _queue) = Tracer::new(&mut registry);
        tracer.apply(&Settings {
            sampling_per_million: 250_000,
            sink: Sink::Mesh,
        });
        let sampled = (0..20_000).filter(|_| tracer.start(None).sampled).count();
        assert!(
            (4_000..6_000).contains(&sampled),
            "{sampled} of 20000 at 25%"
        );
        tracer.apply(&Settings {
            sampling_per_million: 1_000_000,
            sink: Sink::Off,
        });
        let parent = extract(&headers(&[("traceparent", TP)])).unwrap();
        assert!(!tracer.start(Some(&parent)).sampled);
        assert!(!tracer.start(None).sampled);
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let mut registry = Registry::default();
        let (tracer, _queue) = Tracer::new(&mut registry);
        for _ in 0..QUEUE_SPANS + 5 {
            tracer.finish(Span::default());
        }
        let dropped = tracer
            .dropped
            .get_or_create(&DropLabels {
                reason: "queue_full",
            })
            .get();
        assert_eq!(dropped, 5);
    }
}
