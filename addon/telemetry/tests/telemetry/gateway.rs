//! Spans: proxies export OTLP over real gRPC, the gateway converts, queues and exports,
//! and the Application Insights ingestion stand-in receives the envelopes the real
//! exporter sends.

// Test helpers outside #[test] functions panic on broken fixtures, as the tests do.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService as _;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use prometheus_client::registry::Registry;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Server};
use trellis_identity::ConnectInfo;
use trellis_telemetry::stand_in::IngestionStandIn;
use trellis_telemetry::{Gateway, GatewayConfig, Metrics, app_insights_exporter};

use crate::support::*;

/// 2023-11-14T22:13:20Z, the start of every test trace.
const T0_NANOS: u64 = 1_700_000_000_000_000_000;
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

const LEDGER: &str = "spiffe://cluster.local/ns/ledger/sa/ledger";

// === OTLP builders ===

fn hex(id: &str) -> Vec<u8> {
    (0..id.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&id[at..at + 2], 16).unwrap())
        .collect()
}

fn span(
    id: &str,
    parent: Option<&str>,
    kind: span::SpanKind,
    (start_us, end_us): (u64, u64),
    attributes: Vec<KeyValue>,
) -> Span {
    let status_code = attributes
        .iter()
        .find(|kv| kv.key == "http.response.status_code")
        .and_then(|kv| match kv.value.as_ref()?.value {
            Some(any_value::Value::IntValue(code)) => Some(code),
            _ => None,
        });
    Span {
        trace_id: hex(TRACE_ID),
        span_id: hex(id),
        parent_span_id: parent.map(hex).unwrap_or_default(),
        name: "GET".to_owned(),
        kind: kind as i32,
        start_time_unix_nano: T0_NANOS + start_us * 1000,
        end_time_unix_nano: T0_NANOS + end_us * 1000,
        attributes,
        // As the proxy does: ERROR for 5xx, unset otherwise.
        status: status_code.filter(|c| *c >= 500).map(|c| Status {
            code: status::StatusCode::Error as i32,
            message: format!("HTTP {c}"),
        }),
        ..Default::default()
    }
}

fn server_span(id: &str, parent: &str, times: (u64, u64), code: i64, source: &str) -> Span {
    span(
        id,
        Some(parent),
        span::SpanKind::Server,
        times,
        vec![
            s("http.request.method", "GET"),
            s("url.path", "/cart"),
            s("url.scheme", "http"),
            s("server.address", "checkout.payments.svc.cluster.local"),
            i("http.response.status_code", code),
            s("network.protocol.version", "1.1"),
            s("trellis.source.principal", source),
        ],
    )
}

fn client_span(
    id: &str,
    parent: Option<&str>,
    times: (u64, u64),
    code: i64,
    (host, service, principal): (&str, &str, &str),
) -> Span {
    span(
        id,
        parent,
        span::SpanKind::Client,
        times,
        vec![
            s("http.request.method", "GET"),
            s("url.full", &format!("http://{host}:8080/cart")),
            s("server.address", host),
            i("server.port", 8080),
            i("http.response.status_code", code),
            s("network.peer.address", "10.0.1.7"),
            s("trellis.destination.service", service),
            s("trellis.destination.principal", principal),
        ],
    )
}

fn request(resource: Resource, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// `n` distinct valid spans, ids starting at `first`.
fn spans(first: u64, n: u64) -> Vec<Span> {
    (first..first + n)
        .map(|k| {
            let mut span = span(
                &format!("{:016x}", k + 1),
                None,
                span::SpanKind::Server,
                (0, 1000),
                vec![s("http.request.method", "GET")],
            );
            span.trace_id = hex(&format!("{:032x}", k + 1));
            span
        })
        .collect()
}

fn shop_web() -> Resource {
    workload("shop", "web", "web-1")
}

// === a recording exporter ===

/// Records every batch. Optionally holds each export until a permit is added to `gate`,
/// and never finishes the first `hang_first` exports.
#[derive(Debug, Clone, Default)]
struct Recorder {
    batches: Arc<Mutex<Vec<Vec<SpanData>>>>,
    calls: Arc<AtomicUsize>,
    gate: Option<Arc<Semaphore>>,
    hang_first: usize,
}

impl SpanExporter for Recorder {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if call < self.hang_first {
            std::future::pending::<()>().await;
        }
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        self.batches.lock().unwrap().push(batch);
        Ok(())
    }
}

impl Recorder {
    fn gated() -> (Self, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let recorder = Self {
            gate: Some(gate.clone()),
            ..Self::default()
        };
        (recorder, gate)
    }

    fn batch_sizes(&self) -> Vec<usize> {
        self.batches.lock().unwrap().iter().map(Vec::len).collect()
    }

    fn span_ids(&self) -> Vec<String> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .map(|s| s.span_context.span_id().to_string())
            .collect()
    }
}

// === the harness ===

struct Harness {
    gateway: Gateway,
    /// Kept so the handle is not detached; tests that need the worker build their own.
    _worker: JoinHandle<()>,
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

impl Harness {
    fn start<E: SpanExporter + 'static>(exporter: E, config: GatewayConfig) -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let (gateway, worker) = Gateway::spawn(exporter, config, metrics).unwrap();
        Self {
            gateway,
            _worker: worker,
            registry,
            servers: Vec::new(),
        }
    }

    /// The gateway on its own listener whose every request carries `peer` as its verified
    /// identity (`None`: a TLS client without a certificate), and a client for it.
    async fn proxy(&mut self, peer: Option<&str>) -> anyhow::Result<TraceServiceClient<Channel>> {
        let service = tonic::service::interceptor::InterceptedService::new(
            self.gateway.clone().into_server(),
            as_peer(peer),
        );
        let addr = serve(&mut self.servers, Server::builder().add_service(service)).await;
        client(addr).await
    }

    /// The gateway with no `ConnectInfo` at all (mounted without the TLS acceptor).
    async fn bare(&mut self) -> anyhow::Result<TraceServiceClient<Channel>> {
        let router = Server::builder().add_service(self.gateway.clone().into_server());
        let addr = serve(&mut self.servers, router).await;
        client(addr).await
    }

    fn metric(&self, series: &str) -> u64 {
        metric(&self.registry, series)
    }

    fn dropped(&self, reason: &str) -> u64 {
        self.metric(&format!(
            "trellis_telemetry_spans_dropped_total{{reason=\"{reason}\"}}"
        ))
    }

    fn exported(&self) -> u64 {
        self.metric("trellis_telemetry_spans_exported_total")
    }

    fn batches(&self, outcome: &str) -> u64 {
        self.metric(&format!(
            "trellis_telemetry_export_batches_total{{outcome=\"{outcome}\"}}"
        ))
    }
}

async fn client(addr: SocketAddr) -> anyhow::Result<TraceServiceClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(TraceServiceClient::new(channel))
}

async fn send(
    client: &mut TraceServiceClient<Channel>,
    request: ExportTraceServiceRequest,
) -> Result<ExportTraceServiceResponse, tonic::Status> {
    Ok(client.export(request).await?.into_inner())
}

/// Waits for `f` to hold, polling: the worker runs on its own task.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn quick() -> GatewayConfig {
    GatewayConfig {
        batch_interval: Duration::from_millis(50),
        ..GatewayConfig::default()
    }
}

/// The gateway feeding the real Application Insights exporter, pointed at `stand_in`.
fn app_insights_harness(stand_in: &IngestionStandIn, config: GatewayConfig) -> Harness {
    let exporter =
        app_insights_exporter(&stand_in.connection_string(), Some(stand_in.ca_pem())).unwrap();
    Harness::start(exporter, config)
}

fn by_id(envelopes: &[Value]) -> BTreeMap<String, Value> {
    envelopes
        .iter()
        .map(|e| {
            let id = e["data"]["baseData"]["id"].as_str().unwrap().to_owned();
            (id, e.clone())
        })
        .collect()
}

// === tests ===

/// One trace through three workloads: web (shop) → checkout (payments) → ledger (ledger),
/// each proxy exporting its own spans. Asserted on the envelopes the real exporter posts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workloads_one_trace_in_application_insights() -> anyhow::Result<()> {
    let stand_in = IngestionStandIn::start().await?;
    let mut harness = app_insights_harness(&stand_in, quick());
    let (a_client, b_server, b_client, c_server) = (
        "b7ad6b7169203331",
        "00f067aa0ba902b7",
        "53995c3f42cd8ad8",
        "5fb397be34d26b51",
    );
    let checkout_host = "checkout.payments.svc.cluster.local";
    let ledger_host = "ledger.ledger.svc.cluster.local";

    let mut web = harness.proxy(Some(WEB)).await?;
    let mut checkout = harness.proxy(Some(CHECKOUT)).await?;
    let mut ledger = harness.proxy(Some(LEDGER)).await?;
    let a = request(
        shop_web(),
        vec![client_span(
            a_client,
            None,
            (0, 250_000),
            200,
            (checkout_host, "checkout.payments", CHECKOUT),
        )],
    );
    let b = request(
        workload("payments", "checkout", "checkout-7"),
        vec![
            server_span(b_server, a_client, (10_000, 240_000), 200, WEB),
            client_span(
                b_client,
                Some(b_server),
                (20_000, 120_500),
                503,
                (ledger_host, "ledger.ledger", LEDGER),
            ),
        ],
    );
    let c = request(
        workload("ledger", "ledger", "ledger-0"),
        vec![server_span(
            c_server,
            b_client,
            (25_000, 115_250),
            503,
            CHECKOUT,
        )],
    );
    for (proxy, request) in [(&mut web, a), (&mut checkout, b), (&mut ledger, c)] {
        let response = send(proxy, request).await?;
        assert_eq!(response.partial_success, None);
    }

    let envelopes = stand_in.wait_for(4, WAIT).await?;
    assert_eq!(envelopes.len(), 4, "{envelopes:#?}");
    let envelopes = by_id(&envelopes);
    let key = stand_in.instrumentation_key();

    // Common to all: the trace id as operation id, the key, the role from each caller's
    // own resource.
    for (id, role, instance, parent) in [
        (a_client, "shop.web", "web-1", None),
        (b_server, "payments.checkout", "checkout-7", Some(a_client)),
        (b_client, "payments.checkout", "checkout-7", Some(b_server)),
        (c_server, "ledger.ledger", "ledger-0", Some(b_client)),
    ] {
        let e = &envelopes[id];
        assert_eq!(e["iKey"], key, "{e:#}");
        assert_eq!(e["sampleRate"], 100.0);
        let tags = &e["tags"];
        assert_eq!(tags["ai.cloud.role"], role, "{e:#}");
        assert_eq!(tags["ai.cloud.roleInstance"], instance, "{e:#}");
        assert_eq!(tags["ai.operation.id"], TRACE_ID, "{e:#}");
        assert_eq!(
            tags.get("ai.operation.parentId").and_then(Value::as_str),
            parent,
            "{e:#}"
        );
        assert_eq!(e["data"]["baseData"]["ver"], 2);
    }

    // CLIENT spans: dependencies.
    let a = &envelopes[a_client];
    assert_eq!(a["name"], "Microsoft.ApplicationInsights.RemoteDependency");
    assert_eq!(a["time"], "2023-11-14T22:13:20.000Z");
    assert_eq!(a["data"]["baseType"], "RemoteDependencyData");
    let data = &a["data"]["baseData"];
    assert_eq!(data["name"], "GET");
    assert_eq!(data["duration"], "0.00:00:00.250000");
    assert_eq!(data["resultCode"], "200");
    // Status unset (not 5xx): the exporter leaves `success` out; Breeze defaults it to true.
    assert_eq!(data.get("success"), None, "{data:#}");
    assert_eq!(
        data["data"],
        "http://checkout.payments.svc.cluster.local:8080/cart"
    );
    assert_eq!(data["target"], "checkout.payments.svc.cluster.local:8080");
    assert_eq!(data["type"], "HTTP");
    let props = &data["properties"];
    assert_eq!(props["trellis.destination.principal"], CHECKOUT);
    assert_eq!(props["trellis.destination.service"], "checkout.payments");
    assert_eq!(props["network.peer.address"], "10.0.1.7");
    assert_eq!(props["server.port"], "8080");
    assert_eq!(props["trellis.identity"], WEB);
    assert_eq!(props["k8s.pod.name"], "web-1");

    let b2 = &envelopes[b_client]["data"]["baseData"];
    assert_eq!(envelopes[b_client]["time"], "2023-11-14T22:13:20.020Z");
    assert_eq!(b2["duration"], "0.00:00:00.100500");
    assert_eq!(b2["resultCode"], "503");
    assert_eq!(b2["success"], false);
    assert_eq!(b2["target"], "ledger.ledger.svc.cluster.local:8080");
    assert_eq!(b2["properties"]["trellis.identity"], CHECKOUT);

    // SERVER spans: requests.
    let b1 = &envelopes[b_server];
    assert_eq!(b1["name"], "Microsoft.ApplicationInsights.Request");
    assert_eq!(b1["time"], "2023-11-14T22:13:20.010Z");
    assert_eq!(b1["data"]["baseType"], "RequestData");
    let data = &b1["data"]["baseData"];
    assert_eq!(data["name"], "GET");
    assert_eq!(data["duration"], "0.00:00:00.230000");
    assert_eq!(data["responseCode"], "200");
    assert_eq!(data["success"], true);
    // Without server.port (or a Host header attribute) the exporter writes the path only.
    assert_eq!(data["url"], "/cart");
    assert_eq!(data["properties"]["trellis.source.principal"], WEB);
    assert_eq!(data["properties"]["network.protocol.version"], "1.1");
    assert_eq!(data["properties"]["http.response.status_code"], "200");

    let c1 = &envelopes[c_server]["data"]["baseData"];
    assert_eq!(c1["duration"], "0.00:00:00.090250");
    assert_eq!(c1["responseCode"], "503");
    assert_eq!(c1["success"], false);
    assert_eq!(c1["properties"]["trellis.identity"], LEDGER);

    // The stand-in stores before the exporter sees its answer.
    eventually("4 spans exported", || harness.exported() == 4).await?;
    assert_eq!(harness.metric("trellis_telemetry_spans_received_total"), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_claiming_another_namespace_reports_as_its_own() -> anyhow::Result<()> {
    let stand_in = IngestionStandIn::start().await?;
    let mut harness = app_insights_harness(&stand_in, quick());
    let mut web = harness.proxy(Some(WEB)).await?;
    let mut claimed = workload("payments", "web", "web-1");
    claimed.attributes.extend([
        s("ai.cloud.role", "payments.checkout"),
        s("trellis.identity", CHECKOUT),
    ]);
    let mut spoofing = server_span("00f067aa0ba902b7", "b7ad6b7169203331", (0, 5), 200, WEB);
    spoofing.attributes.extend([
        s("ai.cloud.role", "payments.checkout"),
        s("service.namespace", "payments"),
    ]);
    send(&mut web, request(claimed, vec![spoofing])).await?;

    let envelopes = stand_in.wait_for(1, WAIT).await?;
    let e = &envelopes[0];
    assert_eq!(e["tags"]["ai.cloud.role"], "shop.web", "{e:#}");
    let props = &e["data"]["baseData"]["properties"];
    assert_eq!(props["service.namespace"], "shop");
    assert_eq!(props["k8s.namespace.name"], "shop");
    assert_eq!(props["trellis.identity"], WEB);
    // Neither the claimed namespace, nor the role, nor the identity survive anywhere.
    let text = e.to_string();
    for claim in ["\"payments\"", "payments.checkout", CHECKOUT] {
        assert!(!text.contains(claim), "{claim} survived: {e:#}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_verified_identity_are_unauthenticated() -> anyhow::Result<()> {
    let recorder = Recorder::default();
    let mut harness = Harness::start(recorder.clone(), quick());
    let mut no_cert = harness.proxy(None).await?;
    let mut no_tls = harness.bare().await?;
    for client in [&mut no_cert, &mut no_tls] {
        let status = send(client, request(shop_web(), spans(0, 3)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("verified workload identity"),
            "{status:?}"
        );
    }
    assert_eq!(
        harness.metric("trellis_telemetry_requests_refused_total{reason=\"unauthenticated\"}"),
        2
    );
    assert_eq!(harness.metric("trellis_telemetry_spans_received_total"), 0);
    // Nothing was queued: a verified caller's spans are the first to be exported.
    let mut web = harness.proxy(Some(WEB)).await?;
    send(&mut web, request(shop_web(), spans(10, 2))).await?;
    eventually("2 spans exported", || harness.exported() == 2).await?;
    assert_eq!(recorder.span_ids().len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_callers_are_accepted_when_identity_is_not_required() -> anyhow::Result<()> {
    let recorder = Recorder::default();
    let config = GatewayConfig {
        require_identity: false,
        ..quick()
    };
    let mut harness = Harness::start(recorder.clone(), config);
    let mut anonymous = harness.proxy(None).await?;
    send(&mut anonymous, request(shop_web(), spans(0, 2))).await?;
    eventually("2 spans exported", || harness.exported() == 2).await?;
    let batches = recorder.batches.lock().unwrap();
    let scope: Vec<_> = batches[0][0]
        .instrumentation_scope
        .attributes()
        .cloned()
        .collect();
    assert!(scope.iter().all(|kv| kv.key.as_str() != "trellis.identity"));
    assert!(
        scope
            .iter()
            .any(|kv| kv.key.as_str() == "service.namespace" && kv.value.as_str() == "shop")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_spans_are_rejected_and_the_rest_exported() -> anyhow::Result<()> {
    let recorder = Recorder::default();
    let mut harness = Harness::start(recorder.clone(), quick());
    let mut web = harness.proxy(Some(WEB)).await?;
    let mut batch = spans(0, 3);
    let mut short_id = spans(3, 1).remove(0);
    short_id.span_id = vec![1, 2, 3, 4];
    let mut zero_trace = spans(4, 1).remove(0);
    zero_trace.trace_id = vec![0; 16];
    batch.insert(1, short_id);
    batch.push(zero_trace);

    let response = send(&mut web, request(shop_web(), batch)).await?;
    let partial = response.partial_success.context("no partial success")?;
    assert_eq!(partial.rejected_spans, 2);
    assert!(
        partial
            .error_message
            .starts_with("2 of 5 spans rejected: 2 malformed (first: span_id must be 8 bytes"),
        "{}",
        partial.error_message
    );
    eventually("3 spans exported", || harness.exported() == 3).await?;
    assert_eq!(
        recorder.span_ids(),
        ["0000000000000001", "0000000000000002", "0000000000000003"]
    );
    assert_eq!(harness.dropped("invalid"), 2);
    assert_eq!(harness.metric("trellis_telemetry_spans_received_total"), 5);
    Ok(())
}

/// An exporter stuck on a slow Application Insights never holds up a proxy: once the queue
/// is full the rest of a request is dropped at once, and the gateway recovers when the
/// exporter does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_at_once_and_recovers() -> anyhow::Result<()> {
    let (recorder, gate) = Recorder::gated();
    // Batches go out when full (10): the interval is long enough never to split one.
    let config = GatewayConfig {
        queue_capacity: 100,
        max_batch_spans: 10,
        batch_interval: Duration::from_secs(2),
        ..GatewayConfig::default()
    };
    let mut harness = Harness::start(recorder.clone(), config);
    let mut web = harness.proxy(Some(WEB)).await?;

    // The worker takes a first batch and blocks in the exporter with it.
    send(&mut web, request(shop_web(), spans(0, 10))).await?;
    eventually("the exporter to be called", || {
        recorder.calls.load(Ordering::SeqCst) == 1
    })
    .await?;

    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        send(&mut web, request(shop_web(), spans(10, 150))),
    )
    .await
    .context("the RPC waited for the exporter")??;
    assert!(started.elapsed() < Duration::from_secs(5));
    let partial = response.partial_success.context("no partial success")?;
    assert_eq!(partial.rejected_spans, 50);
    assert!(
        partial.error_message.contains("queue is full"),
        "{}",
        partial.error_message
    );
    assert_eq!(harness.dropped("queue_full"), 50);
    assert_eq!(harness.metric("trellis_telemetry_queue_spans"), 100);
    assert_eq!(harness.gateway.queued(), 100);

    // The exporter recovers: everything queued is exported, then new spans flow again.
    gate.add_permits(1000);
    eventually("110 spans exported", || harness.exported() == 110).await?;
    let response = send(&mut web, request(shop_web(), spans(500, 5))).await?;
    assert_eq!(response.partial_success, None);
    eventually("115 spans exported", || harness.exported() == 115).await?;
    assert!(
        recorder.batch_sizes().iter().all(|&n| n <= 10),
        "{:?}",
        recorder.batch_sizes()
    );
    assert_eq!(harness.dropped("queue_full"), 50);
    eventually("an empty queue gauge", || {
        harness.metric("trellis_telemetry_queue_spans") == 0
    })
    .await?;
    Ok(())
}

/// The pair of the test above: heavy but legitimate traffic with a healthy exporter loses
/// nothing at the default limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_legitimate_traffic_loses_nothing() -> anyhow::Result<()> {
    let recorder = Recorder::default();
    let mut harness = Harness::start(recorder.clone(), GatewayConfig::default());
    let web = harness.proxy(Some(WEB)).await?;
    let mut requests = tokio::task::JoinSet::new();
    for k in 0..10 {
        let mut client = web.clone();
        requests.spawn(
            async move { send(&mut client, request(shop_web(), spans(k * 500, 500))).await },
        );
    }
    while let Some(response) = requests.join_next().await {
        assert_eq!(response??.partial_success, None);
    }
    eventually("5000 spans exported", || harness.exported() == 5000).await?;
    let ids: BTreeSet<String> = recorder.span_ids().into_iter().collect();
    assert_eq!(ids.len(), 5000);
    assert_eq!(recorder.span_ids().len(), 5000, "a span was exported twice");
    assert!(recorder.batch_sizes().iter().all(|&n| n <= 512));
    for reason in ["queue_full", "invalid", "export_failed"] {
        assert_eq!(harness.dropped(reason), 0, "{reason}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_capped_and_a_partial_batch_waits_for_the_interval() -> anyhow::Result<()> {
    let recorder = Recorder::default();
    let config = GatewayConfig {
        max_batch_spans: 4,
        batch_interval: Duration::from_secs(2),
        ..GatewayConfig::default()
    };
    let mut harness = Harness::start(recorder.clone(), config);
    let mut web = harness.proxy(Some(WEB)).await?;
    send(&mut web, request(shop_web(), spans(0, 10))).await?;
    eventually("10 spans exported", || harness.exported() == 10).await?;
    assert_eq!(recorder.batch_sizes(), [4, 4, 2]);

    // Three requests well inside one interval share one batch.
    for k in 0..3 {
        send(&mut web, request(shop_web(), spans(100 + k, 1))).await?;
    }
    eventually("13 spans exported", || harness.exported() == 13).await?;
    assert_eq!(recorder.batch_sizes(), [4, 4, 2, 3]);
    assert_eq!(harness.batches("ok"), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_export_is_abandoned_after_the_export_timeout() -> anyhow::Result<()> {
    let recorder = Recorder {
        hang_first: 1,
        ..Recorder::default()
    };
    // The first batch is exactly the first request's 4 spans.
    let config = GatewayConfig {
        export_timeout: Duration::from_millis(300),
        max_batch_spans: 4,
        batch_interval: Duration::from_secs(2),
        ..GatewayConfig::default()
    };
    let mut harness = Harness::start(recorder.clone(), config);
    let mut web = harness.proxy(Some(WEB)).await?;
    send(&mut web, request(shop_web(), spans(0, 4))).await?;
    eventually("a failed batch", || harness.batches("error") == 1).await?;
    assert_eq!(harness.dropped("export_failed"), 4);
    assert_eq!(harness.exported(), 0);
    send(&mut web, request(shop_web(), spans(10, 2))).await?;
    eventually("2 spans exported", || harness.exported() == 2).await?;
    assert_eq!(harness.batches("ok"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_above_the_limits_are_refused() -> anyhow::Result<()> {
    let recorder = Recorder::default();
    let config = GatewayConfig {
        max_spans_per_request: 10,
        max_message_bytes: 16 << 10,
        ..quick()
    };
    let mut harness = Harness::start(recorder.clone(), config);
    let mut web = harness.proxy(Some(WEB)).await?;

    // Too many spans: refused whole, nothing counted as received or queued.
    let status = send(&mut web, request(shop_web(), spans(0, 11)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("accepts at most 10"),
        "{status:?}"
    );
    assert_eq!(
        harness.metric("trellis_telemetry_requests_refused_total{reason=\"too_many_spans\"}"),
        1
    );
    assert_eq!(harness.metric("trellis_telemetry_spans_received_total"), 0);
    let response = send(&mut web, request(shop_web(), spans(0, 10))).await?;
    assert_eq!(response.partial_success, None);

    // Too many bytes, as sent.
    let big = |bytes: usize| {
        let mut spans = spans(100, 1);
        spans[0].attributes.push(s("padding", &"a".repeat(bytes)));
        request(shop_web(), spans)
    };
    let status = send(&mut web, big(20 << 10)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // Too many bytes once decompressed: a small gzip body cannot inflate past the limit.
    let mut gzip = web.clone().send_compressed(CompressionEncoding::Gzip);
    let status = send(&mut gzip, big(64 << 10)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("decompressing"), "{status:?}");
    // Compressed requests within the limit are welcome.
    let response = send(&mut gzip, request(shop_web(), spans(200, 3))).await?;
    assert_eq!(response.partial_success, None);

    eventually("13 spans exported", || harness.exported() == 13).await?;
    Ok(())
}

/// Dropping every handle to the gateway ends the worker, which first exports what is
/// queued, however long the batch interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_gateway_flushes_the_queue() -> anyhow::Result<()> {
    let recorder = Recorder::default();
    let config = GatewayConfig {
        batch_interval: Duration::from_secs(3600),
        ..GatewayConfig::default()
    };
    let (gateway, worker) = Gateway::spawn(recorder.clone(), config, metrics())?;
    let mut call = tonic::Request::new(request(shop_web(), spans(0, 3)));
    call.extensions_mut().insert(ConnectInfo {
        remote_addr: None,
        peer: Some(WEB.parse()?),
    });
    let response = gateway.export(call).await?.into_inner();
    assert_eq!(response.partial_success, None);
    // Queued, or already in the worker's batch waiting for the interval: not exported.
    assert!(recorder.span_ids().is_empty());

    drop(gateway);
    tokio::time::timeout(WAIT, worker).await??;
    assert_eq!(recorder.span_ids().len(), 3);
    Ok(())
}

fn metrics() -> Metrics {
    Metrics::new(&mut Registry::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_twice_then_delivered_exactly_once() -> anyhow::Result<()> {
    let stand_in = IngestionStandIn::start().await?;
    stand_in.fail_next(2, StatusCode::TOO_MANY_REQUESTS);
    let mut harness = app_insights_harness(&stand_in, quick());
    let mut web = harness.proxy(Some(WEB)).await?;
    send(&mut web, request(shop_web(), spans(0, 3))).await?;

    let envelopes = stand_in.wait_for(3, WAIT).await?;
    eventually("a successful batch", || harness.batches("ok") == 1).await?;
    assert_eq!(stand_in.requests(), 3, "two 429s and one 200");
    assert_eq!(stand_in.envelopes().len(), 3);
    let ids: BTreeSet<String> = by_id(&envelopes).into_keys().collect();
    assert_eq!(
        ids,
        BTreeSet::from(
            ["0000000000000001", "0000000000000002", "0000000000000003"].map(String::from)
        )
    );
    assert_eq!(harness.exported(), 3);
    assert_eq!(harness.batches("error"), 0);
    assert_eq!(harness.dropped("export_failed"), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_is_counted_as_export_failed() -> anyhow::Result<()> {
    let stand_in = IngestionStandIn::start().await?;
    // 400 is final: the exporter does not retry it.
    stand_in.fail_next(1, StatusCode::BAD_REQUEST);
    let mut harness = app_insights_harness(&stand_in, quick());
    let mut web = harness.proxy(Some(WEB)).await?;
    send(&mut web, request(shop_web(), spans(0, 3))).await?;
    eventually("a failed batch", || harness.batches("error") == 1).await?;
    assert_eq!(harness.dropped("export_failed"), 3);
    assert_eq!(stand_in.requests(), 1);

    send(&mut web, request(shop_web(), spans(10, 2))).await?;
    stand_in.wait_for(2, WAIT).await?;
    eventually("2 spans exported", || harness.exported() == 2).await?;
    Ok(())
}

/// With `extra_roots_pem`, the exporter trusts those roots and nothing else: against a
/// server whose CA it was not given, no request gets past the TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_given_roots_are_trusted() -> anyhow::Result<()> {
    let stand_in = IngestionStandIn::start().await?;
    let other = IngestionStandIn::start().await?;
    let exporter = app_insights_exporter(&stand_in.connection_string(), Some(other.ca_pem()))?;
    let batch = vec![SpanData::clone(&sample_span_data().await?)];
    // The exporter retries the handshake failures for up to 35 s; a second is plenty to
    // see that none of them reaches HTTP.
    let outcome = tokio::time::timeout(Duration::from_secs(1), exporter.export(batch)).await;
    assert!(outcome.is_err(), "export finished: {outcome:?}");
    assert_eq!(stand_in.requests(), 0);
    Ok(())
}

/// One converted span, taken from the gateway with a recording exporter.
async fn sample_span_data() -> anyhow::Result<SpanData> {
    let recorder = Recorder::default();
    let harness = Harness::start(recorder.clone(), quick());
    let mut call = tonic::Request::new(request(shop_web(), spans(0, 1)));
    call.extensions_mut().insert(ConnectInfo {
        remote_addr: None,
        peer: Some(WEB.parse()?),
    });
    harness.gateway.export(call).await?;
    eventually("1 span exported", || harness.exported() == 1).await?;
    let span = recorder.batches.lock().unwrap()[0][0].clone();
    Ok(span)
}

/// The stand-in's own answers to what the exporter never sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stand_in_refuses_what_breeze_refuses() -> anyhow::Result<()> {
    use std::io::Write as _;

    let stand_in = IngestionStandIn::start().await?;
    let client = raw_client(stand_in.ca_pem())?;
    let url = format!("https://{}/v2/track", stand_in.addr());
    let gzip = |body: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(body).unwrap();
        encoder.finish().unwrap()
    };
    let post = |body: Vec<u8>, gzipped: bool| {
        let mut request = client.post(&url).body(body);
        if gzipped {
            request = request.header("content-encoding", "gzip");
        }
        request.send()
    };
    let key = stand_in.instrumentation_key().to_owned();
    let envelope = |ikey: &str| {
        json!({"name": "Microsoft.ApplicationInsights.Request", "time": "2023-11-14T22:13:20.000Z",
            "iKey": ikey, "data": {"baseType": "RequestData", "baseData": {"ver": 2}}})
    };

    let answer = post(b"not gzip".to_vec(), true).await?;
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    assert!(
        answer
            .text()
            .await?
            .contains("Content-Encoding is gzip but the body is not")
    );

    let answer = post(gzip(b"{\"not\":\"an array\"}"), true).await?;
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    assert!(answer.text().await?.contains("JSON array of envelopes"));

    let answer = post(gzip(b"[{"), true).await?;
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    assert!(answer.text().await?.contains("not JSON"));

    // A zip bomb: tiny on the wire, above the limit once inflated.
    let bomb = gzip(&vec![b' '; trellis_telemetry::stand_in::MAX_JSON_BYTES + 1]);
    assert!(bomb.len() < 1 << 20);
    let answer = post(bomb, true).await?;
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let answer = post(
        vec![b' '; trellis_telemetry::stand_in::MAX_BODY_BYTES + 1],
        false,
    )
    .await?;
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Per-envelope errors: 206, only the valid one stored.
    let body = json!([
        envelope(&key),
        envelope("00000000-0000-4000-8000-000000000000")
    ]);
    let answer = post(gzip(body.to_string().as_bytes()), true).await?;
    assert_eq!(answer.status(), StatusCode::PARTIAL_CONTENT);
    let answer: Value = serde_json::from_str(&answer.text().await?)?;
    assert_eq!(answer["itemsReceived"], 2);
    assert_eq!(answer["itemsAccepted"], 1);
    assert_eq!(answer["errors"][0]["index"], 1);
    assert_eq!(answer["errors"][0]["statusCode"], 400);
    assert_eq!(stand_in.envelopes(), [envelope(&key)]);

    // Plain JSON is accepted too, as Breeze does.
    let answer = post(json!([envelope(&key)]).to_string().into_bytes(), false).await?;
    assert_eq!(answer.status(), StatusCode::OK);
    let answer: Value = serde_json::from_str(&answer.text().await?)?;
    assert_eq!(
        answer,
        json!({"itemsReceived": 1, "itemsAccepted": 1, "errors": []})
    );

    let answer = client
        .get(format!("https://{}/v2/track", stand_in.addr()))
        .send()
        .await?;
    assert_eq!(answer.status(), StatusCode::METHOD_NOT_ALLOWED);
    let answer = client
        .post(format!("https://{}/other", stand_in.addr()))
        .send()
        .await?;
    assert_eq!(answer.status(), StatusCode::NOT_FOUND);

    let err = stand_in
        .wait_for(3, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(err.to_string().contains("2 arrived"), "{err}");
    Ok(())
}

fn raw_client(ca_pem: &str) -> anyhow::Result<reqwest::Client> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()?)
}
