//! Golden metrics: proxies push their histograms over real gRPC (cumulative), the gateway
//! turns them into deltas and records them, and the real Application Insights exporter
//! posts `Microsoft.ApplicationInsights.Metric` envelopes to the ingestion stand-in.

// Test helpers outside #[test] functions panic on broken fixtures, as the tests do.

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, metric,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::{Channel, Server};
use trellis_telemetry::stand_in::IngestionStandIn;
use trellis_telemetry::{
    Metrics, MetricsConfig, MetricsGateway, MetricsWorker, app_insights_exporter,
};

use crate::support::*;

const SERVER: &str = "http.server.request.duration";
const CLIENT: &str = "http.client.request.duration";

// === OTLP builders ===

fn point(status: i64, start: u64, count: u64, sum: f64) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes: vec![
            s("http.request.method", "GET"),
            i("http.response.status_code", status),
            s("source_workload", "client"),
            s("destination_workload", "web"),
        ],
        start_time_unix_nano: start,
        time_unix_nano: start + 1,
        count,
        sum: Some(sum),
        // Two bounds, everything in the first bucket: buckets are not exported anyway.
        explicit_bounds: vec![0.1, 1.0],
        bucket_counts: vec![count, 0, 0],
        ..Default::default()
    }
}

fn histogram(name: &str, points: Vec<HistogramDataPoint>) -> Metric {
    Metric {
        name: name.to_owned(),
        unit: "s".to_owned(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points: points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Default::default()
    }
}

fn request(resource: Resource, metrics: Vec<Metric>) -> ExportMetricsServiceRequest {
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(resource),
            scope_metrics: vec![ScopeMetrics {
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

// === the harness ===

struct Harness {
    gateway: MetricsGateway,
    worker: Option<MetricsWorker>,
    registry: Registry,
    servers: Vec<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

fn quick() -> MetricsConfig {
    MetricsConfig {
        export_interval: Duration::from_millis(200),
        ..MetricsConfig::default()
    }
}

impl Harness {
    /// The service exporting to `stand_in` (`None`: without an exporter).
    fn start(stand_in: Option<&IngestionStandIn>, config: MetricsConfig) -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let (gateway, worker) = match stand_in {
            Some(stand_in) => {
                let exporter =
                    app_insights_exporter(&stand_in.connection_string(), Some(stand_in.ca_pem()))
                        .unwrap();
                MetricsGateway::spawn(Some(exporter), config, metrics).unwrap()
            }
            None => MetricsGateway::spawn_without_exporter(config, metrics).unwrap(),
        };
        Self {
            gateway,
            worker: Some(worker),
            registry,
            servers: Vec::new(),
        }
    }

    /// A client whose every request carries `peer` as its verified identity (`None`: a TLS
    /// client without a certificate).
    async fn proxy(&mut self, peer: Option<&str>) -> MetricsServiceClient<Channel> {
        let service = tonic::service::interceptor::InterceptedService::new(
            self.gateway.clone().into_server(),
            as_peer(peer),
        );
        let addr = serve(&mut self.servers, Server::builder().add_service(service)).await;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        MetricsServiceClient::new(channel)
    }

    fn metric(&self, series: &str) -> u64 {
        metric(&self.registry, series)
    }

    fn dropped(&self, reason: &str) -> u64 {
        self.metric(&format!(
            "trellis_telemetry_metric_points_dropped_total{{reason=\"{reason}\"}}"
        ))
    }

    async fn shutdown(&mut self) {
        if let Some(worker) = self.worker.take() {
            tokio::time::timeout(WAIT, worker.shutdown()).await.unwrap();
        }
    }
}

/// Sends `request`; the answer's rejected data point count.
async fn push(
    client: &mut MetricsServiceClient<Channel>,
    request: ExportMetricsServiceRequest,
) -> i64 {
    let response = client.export(request).await.unwrap().into_inner();
    response
        .partial_success
        .map_or(0, |p| p.rejected_data_points)
}

/// The Metric envelopes stored so far.
fn metric_envelopes(stand_in: &IngestionStandIn) -> Vec<Value> {
    stand_in
        .envelopes()
        .into_iter()
        .filter(|e| e["name"] == "Microsoft.ApplicationInsights.Metric")
        .collect()
}

/// Sum of the values of metric `name` per (cloud role, status code) over `envelopes`.
fn totals(envelopes: &[Value], name: &str) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for e in envelopes {
        let base = &e["data"]["baseData"];
        for m in base["metrics"].as_array().unwrap() {
            if m["name"] != name {
                continue;
            }
            let role = e["tags"]["ai.cloud.role"]
                .as_str()
                .unwrap_or("-")
                .to_owned();
            let status = base["properties"]["http.response.status_code"]
                .as_str()
                .unwrap_or("-")
                .to_owned();
            *out.entry((role, status)).or_insert(0.0) += m["value"].as_f64().unwrap();
        }
    }
    out
}

/// Waits until the counts of `name` reach `expected` (then a little longer, to catch an
/// extra export), and returns the Metric envelopes.
async fn settle(
    stand_in: &IngestionStandIn,
    name: &str,
    expected: &BTreeMap<(String, String), f64>,
) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let envelopes = metric_envelopes(stand_in);
        if &totals(&envelopes, name) == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: wanted {expected:?}, have {:?} in {envelopes:#?}",
            totals(&envelopes, name)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Three more export intervals: nothing may be added twice.
    tokio::time::sleep(Duration::from_millis(700)).await;
    metric_envelopes(stand_in)
}

fn key(role: &str, status: &str) -> (String, String) {
    (role.to_owned(), status.to_owned())
}

// === tests ===

/// Two proxies push cumulative histograms twice; Application Insights gets the request
/// counts and duration sums per role and status, each request once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_histograms_become_custom_metrics_per_role_and_status() {
    let stand_in = IngestionStandIn::start().await.unwrap();
    let mut h = Harness::start(Some(&stand_in), quick());
    let mut web = h.proxy(Some(WEB)).await;
    let mut checkout = h.proxy(Some(CHECKOUT)).await;
    let t = 1_700_000_000_000_000_000;

    let web_report = |ok: u64, failed: u64| {
        request(
            workload("shop", "web", "web-1"),
            vec![histogram(
                SERVER,
                vec![
                    point(200, t, ok, 0.01 * ok as f64),
                    point(503, t, failed, 0.5 * failed as f64),
                ],
            )],
        )
    };
    assert_eq!(push(&mut web, web_report(5, 2)).await, 0);
    assert_eq!(
        push(
            &mut checkout,
            request(
                workload("payments", "checkout", "checkout-7"),
                vec![histogram(CLIENT, vec![point(200, t, 4, 0.2)])],
            ),
        )
        .await,
        0
    );
    // Let one export go out between the two reports, so the second is a delta.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(push(&mut web, web_report(7, 3)).await, 0);

    let expected = BTreeMap::from([(key("shop.web", "200"), 7.0), (key("shop.web", "503"), 3.0)]);
    let envelopes = settle(&stand_in, "http.server.request.count", &expected).await;
    assert_eq!(
        totals(&envelopes, "http.client.request.count"),
        BTreeMap::from([(key("payments.checkout", "200"), 4.0)])
    );
    let sums = totals(&envelopes, "http.server.request.duration.sum");
    assert!(
        (sums[&key("shop.web", "200")] - 0.07).abs() < 1e-9,
        "{sums:?}"
    );
    assert!(
        (sums[&key("shop.web", "503")] - 1.5).abs() < 1e-9,
        "{sums:?}"
    );

    // The envelope: cloud role and instance from the checked resource, the attributes as
    // properties, the caller's identity among them.
    let e = envelopes
        .iter()
        .find(|e| e["data"]["baseData"]["metrics"][0]["name"] == "http.server.request.count")
        .unwrap();
    assert_eq!(e["iKey"], stand_in.instrumentation_key());
    assert_eq!(e["data"]["baseType"], "MetricData");
    assert_eq!(e["tags"]["ai.cloud.role"], "shop.web");
    assert_eq!(e["tags"]["ai.cloud.roleInstance"], "web-1");
    let props = &e["data"]["baseData"]["properties"];
    assert_eq!(props["trellis.identity"], WEB);
    assert_eq!(props["http.request.method"], "GET");
    assert_eq!(props["destination_workload"], "web");
    assert!(props.get("service.namespace").is_none(), "{props:#}");
    assert_eq!(
        h.metric("trellis_telemetry_metric_points_received_total"),
        5
    );
    assert_eq!(h.metric("trellis_telemetry_metric_series"), 3);
    assert!(h.metric("trellis_telemetry_metric_exports_total{outcome=\"ok\"}") >= 2);
    assert_eq!(
        h.metric("trellis_telemetry_metric_exports_total{outcome=\"error\"}"),
        0
    );
    h.shutdown().await;
}

/// A proxy restarts (a new start time, a lower count): its new requests count once, the
/// old ones are not counted again, and a repeated report adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_counts_from_zero_and_nothing_twice() {
    let stand_in = IngestionStandIn::start().await.unwrap();
    let mut h = Harness::start(Some(&stand_in), quick());
    let mut web = h.proxy(Some(WEB)).await;
    let report = |start: u64, count: u64| {
        request(
            workload("shop", "web", "web-1"),
            vec![histogram(
                SERVER,
                vec![point(200, start, count, 0.1 * count as f64)],
            )],
        )
    };
    push(&mut web, report(100, 10)).await;
    push(&mut web, report(100, 10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Restarted: counting from 0 again, with a new start time.
    push(&mut web, report(200, 4)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    push(&mut web, report(200, 4)).await;
    push(&mut web, report(200, 6)).await;
    // And once more, but reported with the old start time and a lower count (a proxy
    // that does not set start times): still a restart, never a negative delta.
    push(&mut web, report(200, 1)).await;

    let expected = BTreeMap::from([(key("shop.web", "200"), 17.0)]);
    let envelopes = settle(&stand_in, "http.server.request.count", &expected).await;
    for e in &envelopes {
        let value = e["data"]["baseData"]["metrics"][0]["value"]
            .as_f64()
            .unwrap();
        assert!(value > 0.0, "no zero or negative data point: {e:#}");
    }
    let sums = totals(&envelopes, "http.server.request.duration.sum");
    assert!(
        (sums[&key("shop.web", "200")] - 1.7).abs() < 1e-9,
        "{sums:?}"
    );
    h.shutdown().await;
}

/// A caller cannot put its metrics under another namespace's role, nor set `ai.*` tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_cannot_claim_another_role() {
    let stand_in = IngestionStandIn::start().await.unwrap();
    let mut h = Harness::start(Some(&stand_in), quick());
    let mut web = h.proxy(Some(WEB)).await;
    let mut resource = workload("payments", "checkout", "checkout-7");
    resource
        .attributes
        .push(s("ai.cloud.role", "payments.checkout"));
    let mut p = point(200, 1, 2, 0.2);
    p.attributes.push(s("ai.cloud.role", "payments.checkout"));
    p.attributes.push(s("ai.cloud.roleInstance", "checkout-7"));
    p.attributes.push(s("trellis.identity", CHECKOUT));
    push(
        &mut web,
        request(resource, vec![histogram(SERVER, vec![p])]),
    )
    .await;

    // The service name is the caller's to give; the namespace is not.
    let expected = BTreeMap::from([(key("shop.checkout", "200"), 2.0)]);
    let envelopes = settle(&stand_in, "http.server.request.count", &expected).await;
    for e in &envelopes {
        assert_eq!(e["tags"]["ai.cloud.roleInstance"], "checkout-7");
        assert_eq!(e["data"]["baseData"]["properties"]["trellis.identity"], WEB);
    }
    h.shutdown().await;
}

/// Only the two golden cumulative histograms are taken; the rest is reported rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_metrics_are_rejected_in_the_partial_success() {
    let stand_in = IngestionStandIn::start().await.unwrap();
    let mut h = Harness::start(Some(&stand_in), quick());
    let mut web = h.proxy(Some(WEB)).await;
    let gauge = Metric {
        name: "queue.depth".to_owned(),
        data: Some(metric::Data::Gauge(Gauge {
            data_points: vec![NumberDataPoint::default(), NumberDataPoint::default()],
        })),
        ..Default::default()
    };
    let response = web
        .export(request(
            workload("shop", "web", "web-1"),
            vec![gauge, histogram(SERVER, vec![point(200, 1, 1, 0.1)])],
        ))
        .await
        .unwrap()
        .into_inner();
    let partial = response.partial_success.unwrap();
    assert_eq!(partial.rejected_data_points, 2);
    assert!(
        partial
            .error_message
            .contains("queue.depth is not a golden metric"),
        "{}",
        partial.error_message
    );
    assert_eq!(h.dropped("unsupported"), 2);
    assert_eq!(
        h.metric("trellis_telemetry_metric_points_received_total"),
        3
    );
    let expected = BTreeMap::from([(key("shop.web", "200"), 1.0)]);
    settle(&stand_in, "http.server.request.count", &expected).await;
    h.shutdown().await;
}

/// Beyond `max_series` new series are refused (and said so) while known ones go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_series_beyond_the_bound_are_refused() {
    let stand_in = IngestionStandIn::start().await.unwrap();
    let config = MetricsConfig {
        max_series: 1,
        ..quick()
    };
    let mut h = Harness::start(Some(&stand_in), config);
    let mut web = h.proxy(Some(WEB)).await;
    let report = |ok: u64, failed: u64| {
        request(
            workload("shop", "web", "web-1"),
            vec![histogram(
                SERVER,
                vec![point(200, 1, ok, 0.1), point(503, 1, failed, 0.1)],
            )],
        )
    };
    assert_eq!(push(&mut web, report(1, 1)).await, 1);
    assert_eq!(push(&mut web, report(3, 2)).await, 1);
    assert_eq!(h.dropped("series_limit"), 2);
    assert_eq!(h.metric("trellis_telemetry_metric_series"), 1);
    let expected = BTreeMap::from([(key("shop.web", "200"), 3.0)]);
    settle(&stand_in, "http.server.request.count", &expected).await;
    h.shutdown().await;
}

/// The control plane's shutdown exports what was recorded since the last interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_exports_what_is_left() {
    let stand_in = IngestionStandIn::start().await.unwrap();
    let config = MetricsConfig {
        export_interval: Duration::from_secs(3600),
        ..MetricsConfig::default()
    };
    let mut h = Harness::start(Some(&stand_in), config);
    let mut web = h.proxy(Some(WEB)).await;
    push(
        &mut web,
        request(
            workload("shop", "web", "web-1"),
            vec![histogram(SERVER, vec![point(200, 1, 5, 0.5)])],
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        metric_envelopes(&stand_in).is_empty(),
        "an hour has not passed"
    );
    h.shutdown().await;
    let envelopes = metric_envelopes(&stand_in);
    assert_eq!(
        totals(&envelopes, "http.server.request.count"),
        BTreeMap::from([(key("shop.web", "200"), 5.0)])
    );
}

/// Without an exporter the points are accepted and dropped, counted; without a verified
/// identity the request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_points_are_dropped_and_anonymous_callers_refused() {
    let mut h = Harness::start(None, quick());
    let mut web = h.proxy(Some(WEB)).await;
    let report = || {
        request(
            workload("shop", "web", "web-1"),
            vec![histogram(SERVER, vec![point(200, 1, 5, 0.5)])],
        )
    };
    assert_eq!(push(&mut web, report()).await, 0);
    assert_eq!(h.dropped("no_exporter"), 1);
    assert_eq!(h.gateway.series(), 0);
    let mut anonymous = h.proxy(None).await;
    let status = anonymous.export(report()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(
        h.metric("trellis_telemetry_requests_refused_total{reason=\"unauthenticated\"}"),
        1
    );
    h.shutdown().await;
}
