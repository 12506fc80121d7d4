//! Golden metrics pushed over OTLP: every `--metrics-push-interval` (30 s by default) the
//! two request-duration histograms (`http_server_request_duration_seconds`,
//! `http_client_request_duration_seconds`) go to the sink trellis-config's `tracing.otlp`
//! names, the same sink and channel as spans ([`crate::trace::SinkChannel`]). With the
//! sink `mesh`, the control plane's telemetry gateway turns them into Application Insights
//! `customMetrics` (docs/telemetry-gateway.md).
//!
//! Nothing here runs per request: the request path records into the Prometheus families
//! as before, and the pusher reads them on its own timer. prometheus-client 0.24 cannot
//! iterate a family's series, so the pusher encodes the two families to the text format
//! (the `/metrics` encoder, [`crate::metrics::encode`]) and parses them back — a format
//! the proxy itself writes, so the parser is small.
//!
//! OTLP shape: one `Histogram` metric per family (`http.server.request.duration`,
//! `http.client.request.duration`, unit `s`), **cumulative** temporality (from the proxy's
//! start, or from where `Streams` restarted them), explicit bounds from the `le` buckets
//! (Prometheus buckets are cumulative, OTLP bucket counts are per bucket: converted),
//! `count`, `sum`, and the labels as attributes under their semantic-convention names. A
//! failed push is counted (`trellis_proxy_metric_exports_total{result="failed"}`) and
//! logged, never retried: the next push carries what it had, so nothing is lost but time
//! resolution.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Histogram, HistogramDataPoint, Metric, ResourceMetrics, ScopeMetrics,
    metric,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::trace::{EXPORT_TIMEOUT, Settings, Sink, SinkChannel, SinkError, attr, int_attr};

/// Default `--metrics-push-interval`.
pub const DEFAULT_PUSH_INTERVAL: Duration = Duration::from_secs(30);

/// The families pushed: Prometheus name, OTLP name, description.
const FAMILIES: [(&str, &str, &str); 2] = [
    (
        "http_server_request_duration_seconds",
        "http.server.request.duration",
        "Duration of HTTP server requests (inbound), to the end of the response",
    ),
    (
        "http_client_request_duration_seconds",
        "http.client.request.duration",
        "Duration of HTTP client requests (outbound), to the end of the response",
    ),
];

/// One histogram series read back from the text exposition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramSeries {
    /// Its labels in exposition order, without `le`.
    pub labels: Vec<(String, String)>,
    /// `(upper bound, cumulative count)` per `_bucket` line, in exposition order
    /// (`+Inf` is `f64::INFINITY`).
    pub buckets: Vec<(f64, u64)>,
    /// `_sum`, when exposed.
    pub sum: Option<f64>,
    /// `_count`, when exposed.
    pub count: Option<u64>,
}

/// A line of a pushed family the parser could not read (a bug: the proxy wrote it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number in the exposition.
    pub line: usize,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exposition line {}: {}", self.line, self.problem)
    }
}

impl std::error::Error for ParseError {}

/// The series of histogram family `family` in an OpenMetrics (or Prometheus) text
/// exposition, in order of first appearance. Lines of other families are skipped unread.
pub fn parse_histogram(text: &str, family: &str) -> Result<Vec<HistogramSeries>, ParseError> {
    let mut series: Vec<HistogramSeries> = Vec::new();
    let mut index: HashMap<Vec<(String, String)>, usize> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let err = |problem| ParseError {
            line: n + 1,
            problem,
        };
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        let (suffix, rest) = match rest.find(['{', ' ']) {
            Some(at) => rest.split_at(at),
            None => continue,
        };
        if !matches!(suffix, "_bucket" | "_sum" | "_count") {
            continue;
        }
        let (mut labels, rest) = match rest.strip_prefix('{') {
            Some(rest) => parse_labels(rest).ok_or_else(|| err("malformed label set"))?,
            None => (Vec::new(), rest),
        };
        // The value is the first token; a timestamp or an exemplar (` # {...}`) may follow.
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("no value"))?;
        let value = parse_float(value).ok_or_else(|| err("value is not a number"))?;
        let le = labels
            .iter()
            .position(|(k, _)| k == "le")
            .map(|at| labels.remove(at).1);
        let at = *index.entry(labels.clone()).or_insert_with(|| {
            series.push(HistogramSeries {
                labels,
                ..HistogramSeries::default()
            });
            series.len() - 1
        });
        let s = &mut series[at];
        match suffix {
            "_bucket" => {
                let le = le.ok_or_else(|| err("bucket without le"))?;
                let bound = parse_float(&le).ok_or_else(|| err("le is not a number"))?;
                let count = as_count(value).ok_or_else(|| err("bucket count is not a count"))?;
                s.buckets.push((bound, count));
            }
            "_sum" => s.sum = Some(value),
            _ => s.count = Some(as_count(value).ok_or_else(|| err("count is not a count"))?),
        }
    }
    Ok(series)
}

/// `key="value",...}` and what follows the `}`; values unescape `\\`, `\"` and `\n`.
fn parse_labels(mut rest: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        // `end` indexes the closing quote inside `after[1..]`.
        rest = after.get(end + 2..)?;
    }
}

/// A sample value: a float, or `+Inf` / `-Inf` / `NaN` as the text formats write them.
fn parse_float(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// A counter value as an integer: finite, not negative, whole.
fn as_count(v: f64) -> Option<u64> {
    // Saturates above u64::MAX, which no counter reaches.
    (v.is_finite() && v >= 0.0 && v.fract() == 0.0).then_some(v as u64)
}

/// The OTLP attribute for a label: semantic-convention names for the HTTP labels (status
/// codes as integers, an empty gRPC status left out), the mesh labels as they are.
fn attribute(key: &str, value: &str) -> Option<KeyValue> {
    let int = |name: &str| value.parse::<i64>().ok().map(|v| int_attr(name, v));
    match key {
        "http_request_method" => Some(attr("http.request.method", value)),
        "http_response_status_code" => int("http.response.status_code"),
        "rpc_grpc_status_code" => int("rpc.grpc.status_code"),
        // An empty Prometheus label is an absent one (no gRPC status, no route).
        _ if value.is_empty() => None,
        _ => Some(attr(key, value)),
    }
}

/// One series' cumulative values as OTLP counts them: the total, the sum, and the count
/// of each bucket (per bucket, not cumulative), the last one above every bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values {
    /// Requests.
    pub count: u64,
    /// Seconds, summed (0 when the exposition had no `_sum`).
    pub sum: f64,
    /// Per-bucket counts: one per explicit bound, then the `+Inf` bucket.
    pub bucket_counts: Vec<u64>,
}

impl Values {
    /// What was added since `base` (a snapshot of the same series taken earlier).
    fn since(&self, base: &Self) -> Self {
        let same_buckets = self.bucket_counts.len() == base.bucket_counts.len();
        Self {
            count: self.count.saturating_sub(base.count),
            sum: self.sum - base.sum,
            bucket_counts: self
                .bucket_counts
                .iter()
                .enumerate()
                .map(|(i, c)| match base.bucket_counts.get(i) {
                    Some(b) if same_buckets => c.saturating_sub(*b),
                    _ => *c,
                })
                .collect(),
        }
    }
}

/// The explicit bounds and [`Values`] of `series` (Prometheus buckets are cumulative:
/// converted to per-bucket counts); `None` when it has neither buckets nor a count.
fn values(series: &HistogramSeries) -> Option<(Vec<f64>, Values)> {
    let mut buckets = series.buckets.clone();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let count = series.count.or_else(|| buckets.last().map(|b| b.1))?;
    let mut bounds = Vec::with_capacity(buckets.len());
    let mut bucket_counts = Vec::with_capacity(buckets.len() + 1);
    let mut below = 0;
    for (bound, cumulative) in &buckets {
        if bound.is_infinite() {
            continue;
        }
        bounds.push(*bound);
        // Cumulative counts never go down; saturating only guards a torn read.
        bucket_counts.push(cumulative.saturating_sub(below));
        below = below.max(*cumulative);
    }
    // The bucket above the last bound (`+Inf`): whatever the finite buckets did not hold.
    bucket_counts.push(count.saturating_sub(below));
    let values = Values {
        count,
        sum: series.sum.unwrap_or_default(),
        bucket_counts,
    };
    Some((bounds, values))
}

/// The OTLP attributes of a series' labels.
fn attributes(labels: &[(String, String)]) -> Vec<KeyValue> {
    labels.iter().filter_map(|(k, v)| attribute(k, v)).collect()
}

/// A stable key for a label set (the pusher keeps a few numbers per series, not its
/// labels). A fixed-key SipHash: 64 bits make a collision among one proxy's series
/// vanishingly unlikely, and it would only merge two series' bases.
fn series_key(family: usize, labels: &[(String, String)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    family.hash(&mut h);
    labels.hash(&mut h);
    h.finish()
}

/// One series as read at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Index into the pushed families (0: server, 1: client).
    family: usize,
    key: u64,
    labels: Vec<(String, String)>,
    bounds: Vec<f64>,
    values: Values,
    /// Whether the exposition had a `_sum` (OTLP leaves `sum` out otherwise).
    has_sum: bool,
}

/// Every series of the pushed families in `text`, in exposition order.
pub fn samples(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (family, (name, _, _)) in FAMILIES.iter().enumerate() {
        for series in parse_histogram(text, name)? {
            let Some((bounds, values)) = values(&series) else {
                continue;
            };
            out.push(Sample {
                family,
                key: series_key(family, &series.labels),
                has_sum: series.sum.is_some(),
                labels: series.labels,
                bounds,
                values,
            });
        }
    }
    Ok(out)
}

/// The cumulative streams the pusher reports.
///
/// A stream's values must never have reached the gateway before its start, or the gateway
/// (which turns each stream into deltas, and takes a stream it has not seen in full)
/// would count them twice. So whenever the gateway may have lost track — the first push,
/// a new connection (another control-plane replica, or a restarted one), any failed or
/// skipped push — the pusher starts new streams: start time = the last push the sink
/// accepted, values = what was added since (that push's values are the base). After
/// pushes that succeed on one connection the streams simply continue.
#[derive(Debug)]
struct Streams {
    /// Start of the current streams (Unix ns).
    start: u64,
    /// Per series: the values already delivered when the current streams started.
    base: HashMap<u64, Values>,
    /// Per series: the values of the last push the sink accepted, and when it was taken.
    delivered: HashMap<u64, Values>,
    delivered_at: u64,
    /// The channel generation of the last push, if it was accepted: the streams continue
    /// only on the same connection after a success.
    continuing: Option<u64>,
}

impl Streams {
    fn new(process_start: u64) -> Self {
        Self {
            start: process_start,
            base: HashMap::new(),
            delivered: HashMap::new(),
            delivered_at: process_start,
            continuing: None,
        }
    }

    /// Starts new streams unless the last push was accepted on channel `generation`.
    fn continue_or_restart(&mut self, generation: u64) {
        if self.continuing != Some(generation) {
            self.start = self.delivered_at;
            self.base.clone_from(&self.delivered);
        }
    }

    /// The sink accepted the push of `samples`, taken at `at`, on channel `generation`.
    fn accepted(&mut self, samples: &[Sample], at: u64, generation: u64) {
        self.delivered = samples.iter().map(|s| (s.key, s.values.clone())).collect();
        self.delivered_at = at;
        self.continuing = Some(generation);
    }

    /// A push failed or was skipped: the next one starts new streams.
    fn interrupted(&mut self) {
        self.continuing = None;
    }
}

/// The export request for `samples` (taken at `now`) as streams from `start` with the
/// already-delivered `base` subtracted, or `None` when there is no series yet.
fn request(
    samples: &[Sample],
    base: &HashMap<u64, Values>,
    resource: &Resource,
    start: u64,
    now: u64,
) -> Option<ExportMetricsServiceRequest> {
    let mut metrics = Vec::new();
    for (family, (_, name, description)) in FAMILIES.iter().enumerate() {
        let data_points: Vec<HistogramDataPoint> = samples
            .iter()
            .filter(|s| s.family == family)
            .map(|s| {
                let values = match base.get(&s.key) {
                    Some(b) => s.values.since(b),
                    None => s.values.clone(),
                };
                HistogramDataPoint {
                    attributes: attributes(&s.labels),
                    start_time_unix_nano: start,
                    time_unix_nano: now,
                    count: values.count,
                    sum: s.has_sum.then_some(values.sum),
                    bucket_counts: values.bucket_counts,
                    explicit_bounds: s.bounds.clone(),
                    ..HistogramDataPoint::default()
                }
            })
            .collect();
        if data_points.is_empty() {
            continue;
        }
        metrics.push(Metric {
            name: (*name).to_owned(),
            description: (*description).to_owned(),
            unit: "s".to_owned(),
            data: Some(metric::Data::Histogram(Histogram {
                data_points,
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            })),
            ..Metric::default()
        });
    }
    if metrics.is_empty() {
        return None;
    }
    Some(ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(crate::trace::scope()),
                metrics,
                ..ScopeMetrics::default()
            }],
            ..ResourceMetrics::default()
        }],
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Reads the request histograms and pushes them; see the module docs.
pub struct Pusher {
    /// The two duration families only (clones of the proxy's: the same series), so a push
    /// encodes neither the size histograms nor anything else.
    families: Registry,
    exports: Family<ResultLabels, Counter>,
    streams: Streams,
}

impl fmt::Debug for Pusher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pusher")
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl Pusher {
    /// A pusher of `metrics`' duration families; its outcome counter
    /// (`trellis_proxy_metric_exports_total`) is registered on `registry`.
    pub fn new(metrics: &Metrics, registry: &mut Registry) -> Self {
        let mut families = Registry::default();
        for (family, (name, _, help)) in [&metrics.http_server, &metrics.http_client]
            .into_iter()
            .zip(FAMILIES)
        {
            families.register(name, help, family.duration.clone());
        }
        let exports = Family::<ResultLabels, Counter>::default();
        for result in ["ok", "failed"] {
            let _ = exports.get_or_create(&ResultLabels { result });
        }
        registry.sub_registry_with_prefix("trellis_proxy").register(
            "metric_exports",
            "OTLP metric pushes of the request histograms, by result",
            exports.clone(),
        );
        Self {
            families,
            exports,
            streams: Streams::new(unix_nanos(SystemTime::now())),
        }
    }

    /// Every series of the pushed families now, and the time they were read.
    pub fn samples(&self) -> Result<(Vec<Sample>, u64), SinkError> {
        let text = crate::metrics::encode(&self.families)?;
        Ok((samples(&text)?, unix_nanos(SystemTime::now())))
    }

    /// Pushes every `interval` while `settings` names a sink, through `sinks`, until
    /// `stop`; then pushes once more (the requests of the drain) and returns.
    pub async fn run(
        mut self,
        mut settings: watch::Receiver<Settings>,
        resource: Resource,
        sinks: SinkChannel,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Warn on the first failure after a success, then only at debug: an unreachable
        // sink must not fill the log every interval.
        let mut failing = false;
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                () = stop.cancelled() => true,
            };
            let sink = settings.borrow_and_update().sink.clone();
            if sink == Sink::Off {
                self.streams.interrupted();
            } else {
                match self.push(&sink, &resource, &sinks).await {
                    Ok(()) => failing = false,
                    Err(error) if failing => debug!(%error, ?sink, "metrics push failed"),
                    Err(error) => {
                        warn!(%error, ?sink, "metrics push failed; the next one carries what this one had");
                        failing = true;
                    }
                }
            }
            if last {
                return;
            }
        }
    }

    /// One push; its outcome is counted (nothing is, when there was nothing to send).
    async fn push(
        &mut self,
        sink: &Sink,
        resource: &Resource,
        sinks: &SinkChannel,
    ) -> Result<(), SinkError> {
        let outcome = self.try_push(sink, resource, sinks).await;
        let result = match &outcome {
            Ok(false) => return Ok(()),
            Ok(true) => "ok",
            Err(_) => {
                self.streams.interrupted();
                "failed"
            }
        };
        self.exports.get_or_create(&ResultLabels { result }).inc();
        outcome.map(|_| ())
    }

    /// `Ok(false)`: nothing recorded yet, nothing sent.
    async fn try_push(
        &mut self,
        sink: &Sink,
        resource: &Resource,
        sinks: &SinkChannel,
    ) -> Result<bool, SinkError> {
        let (samples, now) = self.samples()?;
        if samples.is_empty() {
            return Ok(false);
        }
        let (channel, generation) = sinks
            .get(sink)
            .await
            .map_err(|e| format!("cannot reach the sink: {e}"))?;
        self.streams.continue_or_restart(generation);
        let streams = &self.streams;
        let Some(request) = request(&samples, &streams.base, resource, streams.start, now) else {
            return Ok(false);
        };
        let mut client = MetricsServiceClient::new(channel);
        let failure = match tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await {
            Ok(Ok(response)) => {
                // Accepted, even in part: points the gateway refused (its series bound)
                // are not offered again, or they would be refused again every time.
                self.streams.accepted(&samples, now, generation);
                return match response.into_inner().partial_success {
                    Some(p) if p.rejected_data_points > 0 => Err(format!(
                        "the sink rejected {} data points: {}",
                        p.rejected_data_points, p.error_message
                    )
                    .into()),
                    _ => Ok(true),
                };
            }
            Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
            Err(_) => format!("timed out after {EXPORT_TIMEOUT:?}"),
        };
        sinks.reset(generation).await;
        Err(failure.into())
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;

    use super::*;

    const FAMILY: &str = "http_server_request_duration_seconds";

    fn series(
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        sum: Option<f64>,
        count: Option<u64>,
    ) -> HistogramSeries {
        HistogramSeries {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            buckets: buckets.to_vec(),
            sum,
            count,
        }
    }

    #[test]
    fn the_parser_reads_the_families_it_is_asked_for() {
        type Case = (
            &'static str,
            &'static str,
            Result<Vec<HistogramSeries>, ParseError>,
        );
        let cases: Vec<Case> = vec![
            (
                "le last, as prometheus-client writes a family",
                "# TYPE http_server_request_duration_seconds histogram\n\
                 http_server_request_duration_seconds_sum{m=\"GET\"} 0.25\n\
                 http_server_request_duration_seconds_count{m=\"GET\"} 3\n\
                 http_server_request_duration_seconds_bucket{m=\"GET\",le=\"0.1\"} 1\n\
                 http_server_request_duration_seconds_bucket{m=\"GET\",le=\"+Inf\"} 3\n\
                 # EOF\n",
                Ok(vec![series(
                    &[("m", "GET")],
                    &[(0.1, 1), (f64::INFINITY, 3)],
                    Some(0.25),
                    Some(3),
                )]),
            ),
            (
                "le first, two series, other families skipped",
                "http_client_request_duration_seconds_count{m=\"GET\"} 9\n\
                 http_server_request_duration_seconds_bucket{le=\"1.0\",m=\"GET\"} 2\n\
                 http_server_request_duration_seconds_bucket{le=\"1.0\",m=\"PUT\"} 1\n\
                 http_server_request_duration_seconds_count{m=\"PUT\"} 1\n\
                 http_server_request_duration_seconds_created{m=\"PUT\"} 17.0\n\
                 http_server_request_duration_seconds_more_bucket{le=\"1.0\"} 5\n",
                Ok(vec![
                    series(&[("m", "GET")], &[(1.0, 2)], None, None),
                    series(&[("m", "PUT")], &[(1.0, 1)], None, Some(1)),
                ]),
            ),
            (
                "escaped quotes, backslashes and newlines in values; a comma inside a value",
                "http_server_request_duration_seconds_count{a=\"say \\\"hi\\\", \\\\ok\\n\",b=\"\"} 4\n",
                Ok(vec![series(
                    &[("a", "say \"hi\", \\ok\n"), ("b", "")],
                    &[],
                    None,
                    Some(4),
                )]),
            ),
            (
                "no labels, a timestamp and an exemplar after the value, float counts",
                "http_server_request_duration_seconds_bucket{le=\"+Inf\"} 7.0 # {trace_id=\"x\"} 0.3\n\
                 http_server_request_duration_seconds_sum 1.5e-3 1700000000\n",
                Ok(vec![series(&[], &[(f64::INFINITY, 7)], Some(0.0015), None)]),
            ),
            (
                "an unterminated label set",
                "http_server_request_duration_seconds_count{a=\"x} 1\n",
                Err(ParseError {
                    line: 1,
                    problem: "malformed label set",
                }),
            ),
            (
                "a bucket without le",
                "\nhttp_server_request_duration_seconds_bucket{a=\"x\"} 1\n",
                Err(ParseError {
                    line: 2,
                    problem: "bucket without le",
                }),
            ),
            (
                "a count that is not a count",
                "http_server_request_duration_seconds_count -1\n",
                Err(ParseError {
                    line: 1,
                    problem: "count is not a count",
                }),
            ),
            (
                "a missing value",
                "http_server_request_duration_seconds_sum{a=\"x\"}\n",
                Err(ParseError {
                    line: 1,
                    problem: "no value",
                }),
            ),
        ];
        for (name, text, expected) in cases {
            assert_eq!(parse_histogram(text, FAMILY), expected, "{name}");
        }
    }

    #[test]
    fn cumulative_buckets_become_per_bucket_counts() {
        let s = series(
            &[],
            // Out of order on purpose: sorted by bound first.
            &[(f64::INFINITY, 10), (0.001, 2), (0.002, 2), (0.004, 7)],
            Some(0.02),
            Some(10),
        );
        let (bounds, v) = values(&s).unwrap();
        assert_eq!(bounds, vec![0.001, 0.002, 0.004]);
        assert_eq!(v.bucket_counts, vec![2, 0, 5, 3]);
        assert_eq!((v.count, v.sum), (10, 0.02));
        // Without `+Inf` and `_count`: the last bucket is the total, nothing above it.
        let (_, v) = values(&series(&[], &[(0.5, 3)], None, None)).unwrap();
        assert_eq!((v.bucket_counts, v.count, v.sum), (vec![3, 0], 3, 0.0));
        // Nothing at all: no data point.
        assert_eq!(values(&HistogramSeries::default()), None);
        // A missing `_sum` is left out of the data point, not sent as 0.
        let text = "http_client_request_duration_seconds_count{a=\"x\"} 2\n";
        let samples = samples(text).unwrap();
        let r = request(&samples, &HashMap::new(), &Resource::default(), 1, 2).unwrap();
        let Some(metric::Data::Histogram(h)) =
            &r.resource_metrics[0].scope_metrics[0].metrics[0].data
        else {
            panic!("{r:?}")
        };
        assert_eq!((h.data_points[0].count, h.data_points[0].sum), (2, None));
    }

    #[test]
    fn labels_become_semantic_convention_attributes() {
        let labels: Vec<(String, String)> = [
            ("http_request_method", "GET"),
            ("http_response_status_code", "503"),
            ("rpc_grpc_status_code", ""),
            ("source_workload", "client"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/demo/sa/web",
            ),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let got: Vec<(String, Option<Value>)> = attributes(&labels)
            .into_iter()
            .map(|kv| (kv.key, kv.value.and_then(|v| v.value)))
            .collect();
        let s = |v: &str| Some(Value::StringValue(v.to_owned()));
        assert_eq!(
            got,
            vec![
                ("http.request.method".to_owned(), s("GET")),
                (
                    "http.response.status_code".to_owned(),
                    Some(Value::IntValue(503))
                ),
                ("source_workload".to_owned(), s("client")),
                (
                    "destination_principal".to_owned(),
                    s("spiffe://cluster.local/ns/demo/sa/web")
                ),
            ]
        );
        let grpc = attribute("rpc_grpc_status_code", "14").unwrap();
        assert_eq!(grpc.key, "rpc.grpc.status_code");
        assert_eq!(grpc.value.unwrap().value, Some(Value::IntValue(14)));
    }

    fn labels(status: u16) -> crate::telemetry::HttpLabels {
        crate::telemetry::HttpLabels::sample(status)
    }

    fn proxy() -> (Metrics, Pusher, Registry) {
        let mut registry = Registry::default();
        let (tracer, _queue) = crate::trace::Tracer::new(&mut registry);
        let id: trellis_identity::SpiffeId =
            "spiffe://cluster.local/ns/demo/sa/web".parse().unwrap();
        let local = crate::telemetry::Local::new("web", &id);
        let metrics = Metrics::new(&mut registry, local, tracer);
        let pusher = Pusher::new(&metrics, &mut registry);
        (metrics, pusher, registry)
    }

    fn histogram(r: &ExportMetricsServiceRequest) -> &Histogram {
        match &r.resource_metrics[0].scope_metrics[0].metrics[0].data {
            Some(metric::Data::Histogram(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    fn by_status(h: &Histogram, code: i64) -> &HistogramDataPoint {
        h.data_points
            .iter()
            .find(|p| {
                p.attributes.iter().any(|kv| {
                    kv.key == "http.response.status_code"
                        && kv.value.as_ref().and_then(|v| v.value.clone())
                            == Some(Value::IntValue(code))
                })
            })
            .unwrap_or_else(|| panic!("no {code} in {h:?}"))
    }

    #[test]
    fn the_proxys_own_families_round_trip_into_one_request() {
        let (metrics, pusher, registry) = proxy();
        let resource = crate::trace::resource("web", "demo", "web-1");
        let (none, _) = pusher.samples().unwrap();
        assert!(none.is_empty(), "nothing yet: {none:?}");

        for _ in 0..7 {
            metrics
                .http_server
                .duration
                .get_or_create(&labels(200))
                .observe(0.003);
        }
        for _ in 0..3 {
            metrics
                .http_server
                .duration
                .get_or_create(&labels(503))
                .observe(20.0);
        }
        // A size histogram is not pushed.
        metrics
            .http_server
            .request_size
            .get_or_create(&labels(200))
            .observe(10.0);
        // The outcome counter exists at 0 from the start.
        let text = crate::metrics::encode(&registry).unwrap();
        for result in ["ok", "failed"] {
            let line = format!("trellis_proxy_metric_exports_total{{result=\"{result}\"}} 0");
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }

        let (samples, now) = pusher.samples().unwrap();
        let start = pusher.streams.start;
        let request = request(&samples, &HashMap::new(), &resource, start, now).unwrap();
        let rm = &request.resource_metrics[0];
        assert_eq!(rm.resource.as_ref(), Some(&resource));
        let [m] = &rm.scope_metrics[0].metrics[..] else {
            panic!("{:?}", rm.scope_metrics)
        };
        assert_eq!(
            (m.name.as_str(), m.unit.as_str()),
            ("http.server.request.duration", "s")
        );
        let h = histogram(&request);
        assert_eq!(
            h.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        let ok = by_status(h, 200);
        assert_eq!(ok.count, 7);
        assert!((ok.sum.unwrap() - 0.021).abs() < 1e-9, "{ok:?}");
        assert_eq!(ok.explicit_bounds.len(), 16);
        assert_eq!(ok.bucket_counts.len(), 17);
        // 3 ms falls in (2 ms, 4 ms]: the fourth bucket.
        assert_eq!(ok.bucket_counts[3], 7);
        assert_eq!(ok.bucket_counts.iter().sum::<u64>(), 7);
        assert_eq!((ok.start_time_unix_nano, ok.time_unix_nano), (start, now));
        assert_eq!(ok.attributes.len(), 11, "{:?}", ok.attributes);
        let failed = by_status(h, 503);
        assert_eq!(failed.count, 3);
        // 20 s is above the last bound (16.384 s): the +Inf bucket.
        assert_eq!(failed.bucket_counts.last(), Some(&3));
    }

    #[test]
    fn streams_continue_on_one_connection_and_restart_from_what_was_delivered() {
        let (metrics, mut pusher, _registry) = proxy();
        let resource = Resource::default();
        // Not held: a family's guard blocks the insertion of another series.
        let ok = || {
            metrics
                .http_server
                .duration
                .get_or_create(&labels(200))
                .observe(0.001)
        };
        let push = |pusher: &mut Pusher, generation: u64| {
            let (samples, now) = pusher.samples().unwrap();
            pusher.streams.continue_or_restart(generation);
            let s = &pusher.streams;
            let r = request(&samples, &s.base, &resource, s.start, now).unwrap();
            let p = by_status(histogram(&r), 200).clone();
            (p, samples, now)
        };
        let process_start = pusher.streams.start;
        for _ in 0..4 {
            ok();
        }
        // The first push: from the process start, everything.
        let (p, samples, now) = push(&mut pusher, 1);
        assert_eq!((p.start_time_unix_nano, p.count), (process_start, 4));
        pusher.streams.accepted(&samples, now, 1);
        let first_accepted = now;

        // Accepted, same connection: the stream goes on, cumulative.
        ok();
        let (p, samples, now) = push(&mut pusher, 1);
        assert_eq!((p.start_time_unix_nano, p.count), (process_start, 5));
        // This push fails: it may or may not have counted.
        pusher.streams.interrupted();
        let _ = (samples, now);

        // The next push (here on a new connection) starts new streams at the last
        // accepted push, without what it delivered: 5 - 4.
        ok();
        let (p, samples, now) = push(&mut pusher, 2);
        assert_eq!((p.start_time_unix_nano, p.count), (first_accepted, 2));
        assert!((p.sum.unwrap() - 0.002).abs() < 1e-9, "{p:?}");
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), 2);
        pusher.streams.accepted(&samples, now, 2);
        let second_accepted = now;

        // Another connection (another control-plane replica) after a success: new
        // streams again, from that success.
        ok();
        let (p, _, _) = push(&mut pusher, 3);
        assert_eq!((p.start_time_unix_nano, p.count), (second_accepted, 1));
        // A series born after the last accepted push is new in full.
        metrics
            .http_server
            .duration
            .get_or_create(&labels(404))
            .observe(0.5);
        let (samples, now) = pusher.samples().unwrap();
        let s = &pusher.streams;
        let r = request(&samples, &s.base, &resource, s.start, now).unwrap();
        assert_eq!(by_status(histogram(&r), 404).count, 1);
    }
}
