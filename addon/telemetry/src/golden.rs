//! The OTLP metrics service: the proxies' golden request histograms in, Application
//! Insights `customMetrics` out.
//!
//! Proxies push `http.server.request.duration` and `http.client.request.duration` as
//! cumulative histograms (one series per peer, status, ...). Application Insights takes
//! pre-aggregated metrics as deltas (`Temporality::Delta`) and has no histogram buckets, so
//! per series the gateway keeps the last cumulative `(count, sum)` it saw, turns each new
//! report into the difference, and adds it to SDK counters:
//!
//! | proxy histogram | SDK instrument (Application Insights metric name) | added |
//! | --- | --- | --- |
//! | `http.server.request.duration` | `Counter<u64>` `http.server.request.count` | count delta |
//! | | `Counter<f64>` `http.server.request.duration.sum` (s) | sum delta |
//! | `http.client.request.duration` | `Counter<u64>` `http.client.request.count` | count delta |
//! | | `Counter<f64>` `http.client.request.duration.sum` (s) | sum delta |
//!
//! (SDK metric data cannot be built from outside the SDK, so instruments it is.) A series
//! is (caller identity, instance, metric, attributes). Its first report counts in full, a
//! lower count or another start time means a new stream (the proxy restarted, or started
//! new streams after losing track of what was delivered; see the proxy's
//! `otlp_metrics`), and a stream that goes on gives the difference.
//!
//! **Identity.** The same rule as spans (`convert`): with a verified caller the resource's
//! namespace is its SPIFFE id's, and `ai.*` attributes are dropped wherever a caller put
//! them. Each data point then gets `ai.cloud.role` = `<service.namespace>.<service.name>`
//! and `ai.cloud.roleInstance` = the pod, from that checked resource — the exporter copies
//! data-point attributes named `ai.*` into the envelope's tags — so the metrics carry the
//! cloud role their Request envelopes do.
//!
//! **Export.** A [`ManualReader`] collected by this module's own Tokio task, which awaits
//! the exporter there: the SDK's stock `PeriodicReader` runs its own thread and
//! `block_on`s the exporter, and the Application Insights exporter's reqwest/hyper client
//! needs a Tokio runtime; the async-runtime `PeriodicReader` would do, but its `shutdown`
//! also `block_on`s (from inside our runtime), hides export failures in the SDK's internal
//! log, and is experimental too. Our task counts each export's outcome, bounds it with a
//! timeout, and exports once more when told to stop ([`MetricsWorker::shutdown`]).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, MeterProvider as _};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::metrics::v1::{AggregationTemporality, metric};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Stream, Temporality,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};
use trellis_identity::SpiffeId;

use crate::convert::{IDENTITY_ATTRIBUTE, key_values, resource_attributes};
use crate::{DEFAULT_MAX_MESSAGE_BYTES, Error, Metrics};

/// Default [`MetricsConfig::export_interval`].
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(60);
/// Default [`MetricsConfig::max_series`].
pub const DEFAULT_MAX_SERIES: usize = 20_000;
/// Default [`MetricsConfig::series_ttl`]: three times the longest push interval a proxy
/// accepts (10 min), so a series is only forgotten once its proxy has stopped reporting.
pub const DEFAULT_SERIES_TTL: Duration = Duration::from_secs(30 * 60);
/// Default [`MetricsConfig::export_timeout`] (as for spans: above the exporter's retries).
pub const DEFAULT_METRICS_EXPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// The histograms accepted: OTLP name, then the two instruments' names.
const GOLDEN: [(&str, &str, &str); 2] = [
    (
        "http.server.request.duration",
        "http.server.request.count",
        "http.server.request.duration.sum",
    ),
    (
        "http.client.request.duration",
        "http.client.request.count",
        "http.client.request.duration.sum",
    ),
];

const SERVICE_NAME: &str = "service.name";
const SERVICE_NAMESPACE: &str = "service.namespace";
const POD_NAME: &str = "k8s.pod.name";
const SERVICE_INSTANCE: &str = "service.instance.id";
/// Data-point attributes the exporter turns into envelope tags.
const ROLE_TAG: &str = "ai.cloud.role";
const ROLE_INSTANCE_TAG: &str = "ai.cloud.roleInstance";

/// The metrics service's limits and export timing. [`Default`] gives the documented
/// defaults.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Refuse requests without a verified caller identity (`Status::unauthenticated`);
    /// requests with one get the identity rule either way.
    pub require_identity: bool,
    /// How often the deltas are collected and exported to Application Insights.
    pub export_interval: Duration,
    /// An export call that takes longer is abandoned (counted as an error).
    pub export_timeout: Duration,
    /// Series tracked at most; data points of further series are refused (counted) until
    /// old ones are forgotten.
    pub max_series: usize,
    /// A series not reported for this long is forgotten.
    pub series_ttl: Duration,
    /// Largest request the server decodes, compressed and after decompression.
    pub max_message_bytes: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            require_identity: true,
            export_interval: DEFAULT_METRICS_INTERVAL,
            export_timeout: DEFAULT_METRICS_EXPORT_TIMEOUT,
            max_series: DEFAULT_MAX_SERIES,
            series_ttl: DEFAULT_SERIES_TTL,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl MetricsConfig {
    fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Config(what.to_owned()));
        if self.export_interval.is_zero() || self.export_timeout.is_zero() {
            return bad("export_interval and export_timeout must be more than 0");
        }
        // The SDK's cardinality limit is set to it; usize::MAX would overflow there.
        if self.max_series == 0 || self.max_series > 10_000_000 {
            return bad("max_series must be from 1 to 10,000,000");
        }
        if self.series_ttl.is_zero() {
            return bad("series_ttl must be more than 0");
        }
        if self.max_message_bytes == 0 {
            return bad("max_message_bytes must be at least 1");
        }
        Ok(())
    }
}

/// One series: whose, which metric, which attributes (the final ones, role included,
/// sorted by key so the order a proxy sent them in does not matter).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    /// The verified caller's SPIFFE id; empty for an anonymous one.
    identity: String,
    /// Index into [`GOLDEN`].
    metric: usize,
    attributes: Vec<(String, String)>,
}

/// The last cumulative values of a series.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cumulative {
    start: u64,
    count: u64,
    sum: f64,
}

#[derive(Debug)]
struct SeriesState {
    last: Cumulative,
    seen: Instant,
}

/// What a new report of a series adds: `(count, sum)`. A first report adds itself; so does
/// one that starts a new stream (another start time, or a count lower than the last: the
/// proxy restarted). Sums never go down: a negative difference is taken as 0.
fn delta(previous: Option<Cumulative>, now: Cumulative) -> (u64, f64) {
    match previous {
        Some(p) if p.start == now.start && now.count >= p.count => {
            (now.count - p.count, (now.sum - p.sum).max(0.0))
        }
        _ => (now.count, now.sum.max(0.0)),
    }
}

/// The series map, bounded.
#[derive(Debug)]
struct SeriesMap {
    series: HashMap<SeriesKey, SeriesState>,
    max: usize,
    ttl: Duration,
}

/// What the map made of one report.
#[derive(Debug, PartialEq)]
enum Recorded {
    /// Add these.
    Delta(u64, f64),
    /// A new series beyond the bound: refused.
    Refused,
}

impl SeriesMap {
    fn record(&mut self, key: SeriesKey, now: Cumulative, at: Instant) -> Recorded {
        if let Some(state) = self.series.get_mut(&key) {
            let (count, sum) = delta(Some(state.last), now);
            *state = SeriesState {
                last: now,
                seen: at,
            };
            return Recorded::Delta(count, sum);
        }
        if self.series.len() >= self.max {
            return Recorded::Refused;
        }
        self.series.insert(
            key,
            SeriesState {
                last: now,
                seen: at,
            },
        );
        let (count, sum) = delta(None, now);
        Recorded::Delta(count, sum)
    }

    /// Forgets the series not reported since `ttl` before `now`.
    fn sweep(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.series
            .retain(|_, s| now.saturating_duration_since(s.seen) < ttl);
    }
}

/// The four instruments.
#[derive(Debug, Clone)]
struct Instruments {
    counts: [Counter<u64>; 2],
    sums: [Counter<f64>; 2],
}

/// A [`ManualReader`] the provider and the export task share (`with_reader` takes the
/// reader by value; collecting needs it afterwards).
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// The telemetry gateway's OTLP `MetricsService`: golden histograms in, Application
/// Insights metrics out (see the module docs).
///
/// Cheap to clone; clones share the series map and the instruments.
#[derive(Clone)]
pub struct MetricsGateway {
    inner: Arc<MetricsInner>,
}

struct MetricsInner {
    config: MetricsConfig,
    metrics: Metrics,
    /// Shared with the export task, which forgets quiet series.
    series: Arc<Mutex<SeriesMap>>,
    /// `None` without an exporter: data points are accepted and dropped (counted).
    instruments: Option<Instruments>,
}

/// The export task of a [`MetricsGateway`]: stop it with [`shutdown`](Self::shutdown),
/// which exports what was recorded since the last interval first.
#[derive(Debug)]
pub struct MetricsWorker {
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl MetricsWorker {
    /// Collects and exports once more, shuts the meter provider down, and waits for the
    /// task to end (at most the export timeout, plus the exporter's shutdown).
    pub async fn shutdown(self) {
        self.stop.notify_one();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "telemetry metrics worker ended abnormally");
        }
    }
}

impl MetricsGateway {
    /// The service, exporting through `exporter` (`None`: data points are accepted and
    /// dropped, counted as `no_exporter`), and its export task on the current Tokio
    /// runtime. Fails on an out-of-range `config` or outside a runtime.
    pub fn spawn<E>(
        exporter: Option<E>,
        config: MetricsConfig,
        metrics: Metrics,
    ) -> Result<(Self, MetricsWorker), Error>
    where
        E: PushMetricExporter,
    {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| Error::Config(format!("needs a Tokio runtime: {e}")))?;
        let stop = Arc::new(Notify::new());
        let series = Arc::new(Mutex::new(SeriesMap {
            series: HashMap::new(),
            max: config.max_series,
            ttl: config.series_ttl,
        }));
        let (instruments, task) = match exporter {
            Some(exporter) => {
                let reader = SharedReader(Arc::new(
                    ManualReader::builder()
                        .with_temporality(exporter.temporality())
                        .build(),
                ));
                let limit = config.max_series;
                let provider = SdkMeterProvider::builder()
                    // Everything an envelope says comes from the data point: an empty
                    // resource adds no properties (and no cloud role) of its own.
                    .with_resource(Resource::builder_empty().build())
                    .with_reader(reader.clone())
                    // Above its cardinality limit (2,000 by default) the SDK folds new
                    // attribute sets into one overflow series; the series bound is ours.
                    .with_view(move |_: &opentelemetry_sdk::metrics::Instrument| {
                        Stream::builder().with_cardinality_limit(limit).build().ok()
                    })
                    .build();
                let meter = provider.meter("trellis-telemetry-gateway");
                let instruments = Instruments {
                    counts: GOLDEN.map(|(_, count, _)| {
                        meter
                            .u64_counter(count)
                            .with_unit("{request}")
                            .with_description("HTTP requests, from the proxies' histograms")
                            .build()
                    }),
                    sums: GOLDEN.map(|(_, _, sum)| {
                        meter
                            .f64_counter(sum)
                            .with_unit("s")
                            .with_description("Total duration of HTTP requests")
                            .build()
                    }),
                };
                let task = runtime.spawn(export_loop(
                    provider,
                    reader,
                    exporter,
                    config.clone(),
                    metrics.clone(),
                    series.clone(),
                    stop.clone(),
                ));
                (Some(instruments), task)
            }
            // Without an exporter no series is tracked: nothing to export or forget.
            None => (None, runtime.spawn(async {})),
        };
        let gateway = Self {
            inner: Arc::new(MetricsInner {
                config,
                metrics,
                series,
                instruments,
            }),
        };
        Ok((gateway, MetricsWorker { stop, task }))
    }

    /// [`spawn`](Self::spawn) with no exporter (no Application Insights connection
    /// string): the service answers, so proxies do not count failures, but every data
    /// point is dropped (counted as `no_exporter`).
    pub fn spawn_without_exporter(
        config: MetricsConfig,
        metrics: Metrics,
    ) -> Result<(Self, MetricsWorker), Error> {
        Self::spawn(None::<NoExporter>, config, metrics)
    }

    /// The tonic service to mount next to the trace service, with the decoding limit set
    /// and gzip-compressed requests accepted.
    pub fn into_server(self) -> MetricsServiceServer<Self> {
        let limit = self.inner.config.max_message_bytes;
        MetricsServiceServer::new(self)
            .max_decoding_message_size(limit)
            .accept_compressed(CompressionEncoding::Gzip)
    }

    /// Series tracked right now.
    pub fn series(&self) -> usize {
        lock(&self.inner.series).series.len()
    }
}

impl fmt::Debug for MetricsGateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsGateway")
            .field("config", &self.inner.config)
            .field("exporting", &self.inner.instruments.is_some())
            .finish_non_exhaustive()
    }
}

/// The exporter type of [`MetricsGateway::spawn_without_exporter`]; never built.
#[derive(Debug)]
struct NoExporter;

impl PushMetricExporter for NoExporter {
    async fn export(&self, _metrics: &ResourceMetrics) -> OTelSdkResult {
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Delta
    }
}

/// One data point ready to be recorded.
#[derive(Debug, Clone, PartialEq)]
struct Point {
    metric: usize,
    attributes: Vec<KeyValue>,
    cumulative: Cumulative,
}

/// A request's data points after the identity rule, and what was refused.
#[derive(Debug, Default)]
struct Converted {
    points: Vec<Point>,
    /// Data points of other metrics, or not cumulative histograms.
    unsupported: u64,
    /// The first unsupported metric's name and why, for the partial-success message.
    first_unsupported: Option<String>,
}

fn data_point_count(data: Option<&metric::Data>) -> u64 {
    let n = match data {
        Some(metric::Data::Gauge(g)) => g.data_points.len(),
        Some(metric::Data::Sum(s)) => s.data_points.len(),
        Some(metric::Data::Histogram(h)) => h.data_points.len(),
        Some(metric::Data::ExponentialHistogram(h)) => h.data_points.len(),
        Some(metric::Data::Summary(s)) => s.data_points.len(),
        None => 0,
    };
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The data points of `request` worth recording; `peer` is the verified caller, if any.
fn convert(request: ExportMetricsServiceRequest, peer: Option<&SpiffeId>) -> Converted {
    let mut out = Converted::default();
    for resource_metrics in request.resource_metrics {
        // The same rule as for spans: namespace from the identity, no `ai.*`.
        let resource = resource_attributes(resource_metrics.resource, peer);
        let get = |key: &str| {
            resource
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.as_str().into_owned())
                .filter(|v| !v.is_empty())
        };
        // As the exporter derives a span's role, so a workload's Requests and metrics
        // share one cloud role.
        let role = get(SERVICE_NAME).map(|name| match get(SERVICE_NAMESPACE) {
            Some(ns) => format!("{ns}.{name}"),
            None => name,
        });
        let instance = get(POD_NAME).or_else(|| get(SERVICE_INSTANCE));
        let identity = get(IDENTITY_ATTRIBUTE);
        for scope_metrics in resource_metrics.scope_metrics {
            for m in scope_metrics.metrics {
                let golden = GOLDEN.iter().position(|(name, _, _)| *name == m.name);
                let histogram = match (golden, m.data) {
                    (Some(metric), Some(metric::Data::Histogram(h)))
                        if h.aggregation_temporality
                            == AggregationTemporality::Cumulative as i32 =>
                    {
                        (metric, h)
                    }
                    (golden, data) => {
                        out.unsupported += data_point_count(data.as_ref());
                        out.first_unsupported.get_or_insert_with(|| match golden {
                            Some(_) => format!("{} is not a cumulative histogram", m.name),
                            None => format!("{} is not a golden metric", m.name),
                        });
                        continue;
                    }
                };
                let (metric, histogram) = histogram;
                for p in histogram.data_points {
                    let mut attributes: Vec<KeyValue> = key_values(p.attributes)
                        .filter(|kv| kv.key.as_str() != IDENTITY_ATTRIBUTE)
                        .collect();
                    if let Some(identity) = &identity {
                        attributes.push(KeyValue::new(IDENTITY_ATTRIBUTE, identity.clone()));
                    }
                    if let Some(role) = &role {
                        attributes.push(KeyValue::new(ROLE_TAG, role.clone()));
                    }
                    if let Some(instance) = &instance {
                        attributes.push(KeyValue::new(ROLE_INSTANCE_TAG, instance.clone()));
                    }
                    attributes.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
                    // A repeated key: the last one a map would keep.
                    attributes.reverse();
                    attributes.dedup_by(|a, b| a.key == b.key);
                    attributes.reverse();
                    let sum = p.sum.filter(|s| s.is_finite()).unwrap_or_default();
                    out.points.push(Point {
                        metric,
                        attributes,
                        cumulative: Cumulative {
                            start: p.start_time_unix_nano,
                            count: p.count,
                            sum,
                        },
                    });
                }
            }
        }
    }
    out
}

#[tonic::async_trait]
impl MetricsService for MetricsGateway {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let inner = &self.inner;
        let metrics = &inner.metrics;
        let peer = crate::gateway::caller(&request, inner.config.require_identity, metrics)?;
        let converted = convert(request.into_inner(), peer.as_ref());
        let accepted = u64::try_from(converted.points.len()).unwrap_or(u64::MAX);
        let total = accepted + converted.unsupported;
        metrics.metric_points_received.inc_by(total);
        metrics
            .metric_points_unsupported
            .inc_by(converted.unsupported);

        let Some(instruments) = &inner.instruments else {
            metrics.metric_points_no_exporter.inc_by(accepted);
            return Ok(Response::new(response(&converted, 0, inner)));
        };
        let identity = peer
            .as_ref()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let now = Instant::now();
        let mut refused = 0;
        // Deltas first, under the lock; the instruments after, without it.
        let deltas: Vec<(usize, Vec<KeyValue>, u64, f64)> = {
            let mut series = lock(&inner.series);
            let deltas = converted
                .points
                .iter()
                .filter_map(|p| {
                    let key = SeriesKey {
                        identity: identity.clone(),
                        metric: p.metric,
                        attributes: p
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                            .collect(),
                    };
                    match series.record(key, p.cumulative, now) {
                        Recorded::Delta(count, sum) => {
                            Some((p.metric, p.attributes.clone(), count, sum))
                        }
                        Recorded::Refused => {
                            refused += 1;
                            None
                        }
                    }
                })
                .collect();
            metrics.metric_series.set(gauge(series.series.len()));
            deltas
        };
        metrics.metric_points_series_limit.inc_by(refused);
        for (metric, attributes, count, sum) in deltas {
            // Nothing new: no data point (a delta of 0 would still be an envelope).
            if count > 0 {
                instruments.counts[metric].add(count, &attributes);
            }
            if sum > 0.0 {
                instruments.sums[metric].add(sum, &attributes);
            }
        }
        if converted.unsupported + refused > 0 {
            tracing::debug!(
                peer = peer.as_ref().map(|p| p.as_str()),
                unsupported = converted.unsupported,
                refused,
                "telemetry metric data points rejected"
            );
        }
        Ok(Response::new(response(&converted, refused, inner)))
    }
}

/// The answer: a partial success naming what was rejected, if anything was.
fn response(
    converted: &Converted,
    refused: u64,
    inner: &MetricsInner,
) -> ExportMetricsServiceResponse {
    let rejected = converted.unsupported + refused;
    let partial_success = (rejected > 0).then(|| {
        let mut reasons = Vec::new();
        if converted.unsupported > 0 {
            reasons.push(format!(
                "{} unsupported: only cumulative histograms {} and {} are accepted (first: {})",
                converted.unsupported,
                GOLDEN[0].0,
                GOLDEN[1].0,
                converted.first_unsupported.as_deref().unwrap_or("unknown")
            ));
        }
        if refused > 0 {
            reasons.push(format!(
                "{refused} refused: the gateway tracks at most {} series",
                inner.config.max_series
            ));
        }
        ExportMetricsPartialSuccess {
            rejected_data_points: i64::try_from(rejected).unwrap_or(i64::MAX),
            error_message: format!("{rejected} data points rejected: {}", reasons.join("; ")),
        }
    });
    ExportMetricsServiceResponse { partial_success }
}

/// Collects and exports every `export_interval`, forgets old series, and on `stop`
/// exports once more and shuts down.
async fn export_loop<E: PushMetricExporter>(
    provider: SdkMeterProvider,
    reader: SharedReader,
    exporter: E,
    config: MetricsConfig,
    metrics: Metrics,
    series: Arc<Mutex<SeriesMap>>,
    stop: Arc<Notify>,
) {
    let interval = config.export_interval;
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rm = ResourceMetrics::default();
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            () = stop.notified() => true,
        };
        {
            let mut series = lock(&series);
            series.sweep(Instant::now());
            metrics.metric_series.set(gauge(series.series.len()));
        }
        if let Err(e) = reader.collect(&mut rm) {
            tracing::warn!(error = %e, "collecting telemetry metrics failed");
        } else if rm.scope_metrics().next().is_some() {
            let outcome =
                match tokio::time::timeout(config.export_timeout, exporter.export(&rm)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("timed out after {:?}", config.export_timeout)),
                };
            match outcome {
                Ok(()) => {
                    metrics.metric_exports_ok.inc();
                }
                Err(error) => {
                    metrics.metric_exports_error.inc();
                    // Names the endpoint and status, never the instrumentation key.
                    tracing::warn!(%error, "telemetry metrics export failed; this interval's deltas are lost");
                }
            }
        }
        if last {
            break;
        }
    }
    if let Err(e) = provider.shutdown() {
        tracing::debug!(error = %e, "telemetry meter provider shutdown");
    }
    if let Err(e) = exporter.shutdown() {
        tracing::debug!(error = %e, "telemetry metrics exporter shutdown");
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A poisoned lock only means another RPC panicked mid-update of one series: the map is
/// still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue as ProtoKeyValue, any_value};
    use opentelemetry_proto::tonic::metrics::v1::{
        Histogram, HistogramDataPoint, Metric, ResourceMetrics as ProtoResourceMetrics,
        ScopeMetrics, Sum,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;

    use super::*;

    fn c(start: u64, count: u64, sum: f64) -> Cumulative {
        Cumulative { start, count, sum }
    }

    #[test]
    fn cumulative_reports_become_deltas_and_a_restart_counts_in_full() {
        // (previous, now, expected)
        let cases = [
            (None, c(1, 10, 2.0), (10, 2.0)),
            (Some(c(1, 10, 2.0)), c(1, 15, 2.5), (5, 0.5)),
            (Some(c(1, 10, 2.0)), c(1, 10, 2.0), (0, 0.0)),
            // Lower than before: the proxy restarted; the new value is all new.
            (Some(c(1, 10, 2.0)), c(1, 3, 0.3), (3, 0.3)),
            // Another start time: a new stream, whatever its count.
            (Some(c(1, 10, 2.0)), c(2, 12, 3.0), (12, 3.0)),
            // A sum that went down within a stream (a float's rounding) adds nothing.
            (Some(c(1, 10, 2.0)), c(1, 11, 1.999_999), (1, 0.0)),
        ];
        for (previous, now, expected) in cases {
            assert_eq!(delta(previous, now), expected, "{previous:?} -> {now:?}");
        }
    }

    fn key(identity: &str, n: usize) -> SeriesKey {
        SeriesKey {
            identity: identity.to_owned(),
            metric: 0,
            attributes: vec![("n".to_owned(), n.to_string())],
        }
    }

    #[test]
    fn the_series_map_is_bounded_and_forgets_quiet_series() {
        let mut map = SeriesMap {
            series: HashMap::new(),
            max: 2,
            ttl: Duration::from_secs(60),
        };
        let t0 = Instant::now();
        assert_eq!(
            map.record(key("a", 1), c(1, 5, 1.0), t0),
            Recorded::Delta(5, 1.0)
        );
        assert_eq!(
            map.record(key("a", 2), c(1, 1, 0.5), t0),
            Recorded::Delta(1, 0.5)
        );
        // A third series is refused, and stays refused while the others are reported...
        assert_eq!(map.record(key("b", 1), c(1, 9, 9.0), t0), Recorded::Refused);
        // ... but known series go on.
        let t1 = t0 + Duration::from_secs(45);
        assert_eq!(
            map.record(key("a", 1), c(1, 8, 1.5), t1),
            Recorded::Delta(3, 0.5)
        );
        // `a/2` was last reported at t0: forgotten a minute later, making room.
        map.sweep(t0 + Duration::from_secs(61));
        assert_eq!(map.series.len(), 1);
        assert_eq!(
            map.record(key("b", 1), c(1, 9, 9.0), t1),
            Recorded::Delta(9, 9.0)
        );
        // The same attributes from another caller are another series.
        assert_eq!(map.record(key("c", 1), c(1, 1, 0.1), t1), Recorded::Refused);
    }

    fn kv(key: &str, value: &str) -> ProtoKeyValue {
        ProtoKeyValue {
            key: key.to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_owned())),
            }),
            ..Default::default()
        }
    }

    fn histogram(name: &str, points: Vec<HistogramDataPoint>) -> Metric {
        Metric {
            name: name.to_owned(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points: points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Default::default()
        }
    }

    fn request(resource: Vec<ProtoKeyValue>, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ProtoResourceMetrics {
                resource: Some(ProtoResource {
                    attributes: resource,
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn attr(point: &Point, key: &str) -> Option<String> {
        point
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
    }

    #[test]
    fn a_caller_cannot_report_as_another_namespace_or_set_ai_attributes() {
        let peer: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let resource = vec![
            kv("service.name", "web"),
            kv("service.namespace", "payments"),
            kv("k8s.pod.name", "web-1"),
            kv("ai.cloud.role", "payments.checkout"),
            kv(
                "trellis.identity",
                "spiffe://cluster.local/ns/payments/sa/x",
            ),
        ];
        let point = HistogramDataPoint {
            attributes: vec![
                kv("http.response.status_code", "200"),
                kv("ai.cloud.role", "payments.checkout"),
                kv("ai.cloud.roleInstance", "checkout-1"),
                kv("ai.operation.name", "forged"),
                kv(
                    "trellis.identity",
                    "spiffe://cluster.local/ns/payments/sa/x",
                ),
            ],
            start_time_unix_nano: 7,
            count: 3,
            sum: Some(0.5),
            ..Default::default()
        };
        let out = convert(
            request(
                resource.clone(),
                vec![histogram(
                    "http.server.request.duration",
                    vec![point.clone()],
                )],
            ),
            Some(&peer),
        );
        let [p] = &out.points[..] else {
            panic!("{out:?}")
        };
        assert_eq!(attr(p, "ai.cloud.role").as_deref(), Some("shop.web"));
        assert_eq!(attr(p, "ai.cloud.roleInstance").as_deref(), Some("web-1"));
        assert_eq!(attr(p, "ai.operation.name"), None);
        assert_eq!(
            attr(p, "trellis.identity").as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(attr(p, "http.response.status_code").as_deref(), Some("200"));
        assert_eq!(p.attributes.len(), 4, "{:?}", p.attributes);
        assert_eq!((p.metric, p.cumulative), (0, c(7, 3, 0.5)));

        // Anonymous (require_identity off): the resource as reported, still without ai.*.
        let out = convert(
            request(
                resource,
                vec![histogram("http.client.request.duration", vec![point])],
            ),
            None,
        );
        let p = &out.points[0];
        assert_eq!(attr(p, "ai.cloud.role").as_deref(), Some("payments.web"));
        assert_eq!(attr(p, "trellis.identity"), None);
        assert_eq!(p.metric, 1);
    }

    #[test]
    fn only_the_golden_cumulative_histograms_are_accepted() {
        let point = HistogramDataPoint {
            count: 1,
            ..Default::default()
        };
        let mut delta_histogram = histogram("http.server.request.duration", vec![point.clone()]);
        if let Some(metric::Data::Histogram(h)) = &mut delta_histogram.data {
            h.aggregation_temporality = AggregationTemporality::Delta as i32;
        }
        let sum = Metric {
            name: "http.server.request.duration".to_owned(),
            data: Some(metric::Data::Sum(Sum {
                data_points: vec![Default::default(), Default::default()],
                ..Default::default()
            })),
            ..Default::default()
        };
        let out = convert(
            request(
                vec![],
                vec![
                    histogram("queue.depth", vec![point.clone(), point.clone()]),
                    delta_histogram,
                    sum,
                    histogram("http.client.request.duration", vec![point]),
                ],
            ),
            None,
        );
        assert_eq!(out.points.len(), 1);
        assert_eq!(out.unsupported, 5);
        assert_eq!(
            out.first_unsupported.as_deref(),
            Some("queue.depth is not a golden metric")
        );
    }
}
