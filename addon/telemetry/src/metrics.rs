//! Gateway metrics: spans and metric data points in, out, and where the rest went.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// One label, `key="value"`; static strings so the label sets are fixed at compile time.
type Label = [(&'static str, &'static str); 1];

/// The telemetry gateway's metrics. Cheap to clone: clones share the same series.
///
/// Every labelled series exists (at 0) from the start, so dashboards and alerts see a
/// drop reason before the first drop happens.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `trellis_telemetry_spans_received_total`
    pub(crate) received: Counter,
    /// `trellis_telemetry_spans_exported_total`
    pub(crate) exported: Counter,
    /// `trellis_telemetry_spans_dropped_total{reason="queue_full"}`
    pub(crate) dropped_queue_full: Counter,
    /// `trellis_telemetry_spans_dropped_total{reason="invalid"}`
    pub(crate) dropped_invalid: Counter,
    /// `trellis_telemetry_spans_dropped_total{reason="export_failed"}`
    pub(crate) dropped_export_failed: Counter,
    /// `trellis_telemetry_queue_spans`
    pub(crate) queue: Gauge,
    /// `trellis_telemetry_export_batches_total{outcome="ok"}`
    pub(crate) batches_ok: Counter,
    /// `trellis_telemetry_export_batches_total{outcome="error"}`
    pub(crate) batches_error: Counter,
    /// `trellis_telemetry_requests_refused_total{reason="unauthenticated"}`
    pub(crate) refused_unauthenticated: Counter,
    /// `trellis_telemetry_requests_refused_total{reason="too_many_spans"}`
    pub(crate) refused_too_many_spans: Counter,
    /// `trellis_telemetry_metric_points_received_total`
    pub(crate) metric_points_received: Counter,
    /// `trellis_telemetry_metric_points_dropped_total{reason="unsupported"}`
    pub(crate) metric_points_unsupported: Counter,
    /// `trellis_telemetry_metric_points_dropped_total{reason="series_limit"}`
    pub(crate) metric_points_series_limit: Counter,
    /// `trellis_telemetry_metric_points_dropped_total{reason="no_exporter"}`
    pub(crate) metric_points_no_exporter: Counter,
    /// `trellis_telemetry_metric_series`
    pub(crate) metric_series: Gauge,
    /// `trellis_telemetry_metric_exports_total{outcome="ok"}`
    pub(crate) metric_exports_ok: Counter,
    /// `trellis_telemetry_metric_exports_total{outcome="error"}`
    pub(crate) metric_exports_error: Counter,
}

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    ///
    /// Counter names are registered without `_total`: prometheus-client appends it.
    pub fn new(registry: &mut Registry) -> Self {
        let received = Counter::default();
        let exported = Counter::default();
        let dropped = Family::<Label, Counter>::default();
        let queue = Gauge::default();
        let batches = Family::<Label, Counter>::default();
        let refused = Family::<Label, Counter>::default();
        registry.register(
            "trellis_telemetry_spans_received",
            "Spans in accepted OTLP export requests (before validation and queueing)",
            received.clone(),
        );
        registry.register(
            "trellis_telemetry_spans_exported",
            "Spans the exporter delivered (Application Insights accepted the batch)",
            exported.clone(),
        );
        registry.register(
            "trellis_telemetry_spans_dropped",
            "Spans not delivered, by reason: queue_full, invalid, export_failed",
            dropped.clone(),
        );
        registry.register(
            "trellis_telemetry_queue_spans",
            "Spans waiting in the gateway's queue for the exporter",
            queue.clone(),
        );
        registry.register(
            "trellis_telemetry_export_batches",
            "Export calls to the exporter, by outcome: ok, error (including timeouts)",
            batches.clone(),
        );
        registry.register(
            "trellis_telemetry_requests_refused",
            "OTLP export requests (traces or metrics) refused whole, by reason: \
             unauthenticated, too_many_spans",
            refused.clone(),
        );
        let points_received = Counter::default();
        let points_dropped = Family::<Label, Counter>::default();
        let metric_series = Gauge::default();
        let metric_exports = Family::<Label, Counter>::default();
        registry.register(
            "trellis_telemetry_metric_points_received",
            "Metric data points in accepted OTLP metric export requests",
            points_received.clone(),
        );
        registry.register(
            "trellis_telemetry_metric_points_dropped",
            "Metric data points not recorded, by reason: unsupported, series_limit, no_exporter",
            points_dropped.clone(),
        );
        registry.register(
            "trellis_telemetry_metric_series",
            "Golden-metric series whose last cumulative values the gateway holds",
            metric_series.clone(),
        );
        registry.register(
            "trellis_telemetry_metric_exports",
            "Metric exports to Application Insights, by outcome: ok, error (including timeouts)",
            metric_exports.clone(),
        );
        // Resolving each series once creates it at 0 (it shows in the exposition) and spares
        // the hot path the family's lock.
        let series = |family: &Family<Label, Counter>, key, value| {
            family.get_or_create(&[(key, value)]).clone()
        };
        Self {
            received,
            exported,
            dropped_queue_full: series(&dropped, "reason", "queue_full"),
            dropped_invalid: series(&dropped, "reason", "invalid"),
            dropped_export_failed: series(&dropped, "reason", "export_failed"),
            queue,
            batches_ok: series(&batches, "outcome", "ok"),
            batches_error: series(&batches, "outcome", "error"),
            refused_unauthenticated: series(&refused, "reason", "unauthenticated"),
            refused_too_many_spans: series(&refused, "reason", "too_many_spans"),
            metric_points_received: points_received,
            metric_points_unsupported: series(&points_dropped, "reason", "unsupported"),
            metric_points_series_limit: series(&points_dropped, "reason", "series_limit"),
            metric_points_no_exporter: series(&points_dropped, "reason", "no_exporter"),
            metric_series,
            metric_exports_ok: series(&metric_exports, "outcome", "ok"),
            metric_exports_error: series(&metric_exports, "outcome", "error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn every_series_exists_at_zero_under_its_documented_name() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.dropped_invalid.inc();
        metrics.queue.set(3);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "trellis_telemetry_spans_received_total 0",
            "trellis_telemetry_spans_exported_total 0",
            "trellis_telemetry_spans_dropped_total{reason=\"queue_full\"} 0",
            "trellis_telemetry_spans_dropped_total{reason=\"invalid\"} 1",
            "trellis_telemetry_spans_dropped_total{reason=\"export_failed\"} 0",
            "trellis_telemetry_queue_spans 3",
            "trellis_telemetry_export_batches_total{outcome=\"ok\"} 0",
            "trellis_telemetry_export_batches_total{outcome=\"error\"} 0",
            "trellis_telemetry_requests_refused_total{reason=\"unauthenticated\"} 0",
            "trellis_telemetry_requests_refused_total{reason=\"too_many_spans\"} 0",
            "trellis_telemetry_metric_points_received_total 0",
            "trellis_telemetry_metric_points_dropped_total{reason=\"unsupported\"} 0",
            "trellis_telemetry_metric_points_dropped_total{reason=\"series_limit\"} 0",
            "trellis_telemetry_metric_points_dropped_total{reason=\"no_exporter\"} 0",
            "trellis_telemetry_metric_series 0",
            "trellis_telemetry_metric_exports_total{outcome=\"ok\"} 0",
            "trellis_telemetry_metric_exports_total{outcome=\"error\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
