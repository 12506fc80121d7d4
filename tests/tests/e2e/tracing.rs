//! Traces through three workloads, end to end: client-1 calls `web`, whose app calls
//! `api` passing the trace headers on. The proxies record a CLIENT and a SERVER span per
//! hop and export them (`tracing.otlp: mesh`) to the control plane's telemetry gateway,
//! which sends them to the Application Insights ingestion stand-in: Request and
//! Dependency envelopes with each workload's role, one operation id, parent ids linking
//! the hops. Then sampling goes to 0 live: no more spans, context still propagated.
//!
//! And golden metrics: the proxies push their request histograms (OTLP metrics, every
//! 200 ms here) to the same gateway, which sends request counts and duration sums as
//! `Microsoft.ApplicationInsights.Metric` envelopes (customMetrics) per cloud role and
//! status; a restarted proxy adds its new requests, never its old ones again.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use trellis_e2e::{ControlPlane, EchoServer, Launch, Proxy, free_port, http_get, wait_until};
use trellis_telemetry::stand_in::IngestionStandIn;

use crate::request_path::loopback;

/// The envelope name of Application Insights metrics (customMetrics).
const METRIC: &str = "Microsoft.ApplicationInsights.Metric";

fn mesh(client_in: SocketAddr, web_in: SocketAddr, api_in: SocketAddr) -> String {
    trellis_e2e::mesh_yaml(
        "demo",
        &["web", "api"],
        &[
            ("web-1", "web", "web", web_in),
            ("api-1", "api", "api", api_in),
            ("client-1", "client", "client", client_in),
        ],
    )
}

fn mesh_config(tracing: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: trellis-config, namespace: trellis-system}}\ndata:\n  tracing: '{tracing}'\n"
    )
}

/// The `web` app: answers every request by calling `api.demo` through its own proxy
/// (at `outbound`, known once the proxy started) with the trace headers it received, as
/// an instrumented app would.
async fn relay(outbound: Arc<OnceLock<SocketAddr>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let outbound = outbound.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let outbound = *outbound.get().unwrap();
                        async move {
                            let client: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
                                hyper_util::client::legacy::Client::builder(
                                    hyper_util::rt::TokioExecutor::new(),
                                )
                                .build_http();
                            let mut next = http::Request::get(format!("http://{outbound}/api"))
                                .header("host", "api.demo");
                            for h in [
                                "traceparent",
                                "b3",
                                "x-b3-traceid",
                                "x-b3-spanid",
                                "x-b3-sampled",
                            ] {
                                if let Some(v) = req.headers().get(h) {
                                    next = next.header(h, v);
                                }
                            }
                            let resp = client
                                .request(next.body(Empty::new()).unwrap())
                                .await
                                .unwrap();
                            let status = resp.status();
                            let body = resp.into_body().collect().await.unwrap().to_bytes();
                            let reply = format!("web-1 -> {}", String::from_utf8_lossy(&body));
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(reply)))
                                    .unwrap(),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

fn base(e: &Value) -> &Value {
    &e["data"]["baseData"]
}

/// The span envelopes (Request, Dependency, ...): every envelope but the Metric ones.
fn span_envelopes(ingestion: &IngestionStandIn) -> Vec<Value> {
    ingestion
        .envelopes()
        .into_iter()
        .filter(|e| e["name"] != METRIC)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_crosses_three_workloads_into_application_insights() {
    let ingestion = IngestionStandIn::start().await.unwrap();
    let (client_in, web_in, api_in) = (
        loopback(free_port()),
        loopback(free_port()),
        loopback(free_port()),
    );
    let (connection, ca) = (ingestion.connection_string(), ingestion.ca_pem().to_owned());
    let cp = ControlPlane::start_with(&mesh(client_in, web_in, api_in), |dir| {
        std::fs::write(
            dir.join("mesh-config.yaml"),
            mesh_config("{sampling: 100, otlp: mesh}"),
        )
        .unwrap();
        std::fs::write(dir.join("ingestion-ca.pem"), ca).unwrap();
        Launch {
            args: vec![
                "--mesh-config".into(),
                dir.join("mesh-config.yaml").display().to_string(),
            ],
            env: vec![
                ("APPLICATIONINSIGHTS_CONNECTION_STRING".into(), connection),
                (
                    "TRELLIS_AZURE_EXTRA_ROOTS".into(),
                    dir.join("ingestion-ca.pem").display().to_string(),
                ),
            ],
        }
    })
    .await;
    let api_app = EchoServer::start("api-1").await;
    let api = Proxy::start(&cp, "api-1", "demo", "api", api_in, api_app.addr).await;
    let web_out = Arc::new(OnceLock::new());
    let web_app = relay(web_out.clone()).await;
    let web = Proxy::start(&cp, "web-1", "demo", "web", web_in, web_app).await;
    web_out.set(web.outbound).unwrap();
    let client_app = EchoServer::start("client-1").await;
    let client = Proxy::start(
        &cp,
        "client-1",
        "demo",
        "client",
        client_in,
        client_app.addr,
    )
    .await;

    let (status, _, body) = http_get(client.outbound, "web.demo", "/checkout")
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, Bytes::from_static(b"web-1 -> hello from api-1 /api"));
    // api's app saw a context naming api's proxy's SERVER span as parent.
    let seen = api_app.received();
    let traceparent = seen[0].headers["traceparent"].to_str().unwrap().to_owned();
    assert!(
        traceparent.starts_with("00-") && traceparent.ends_with("-01"),
        "{traceparent}"
    );

    ingestion
        .wait_for(4, Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("{e}\ncontrol plane log:\n{}", cp.log()));
    // Metrics go out every 60 s by default: a slow run may see one, and it is not a span.
    let envelopes = span_envelopes(&ingestion);
    assert_eq!(envelopes.len(), 4, "{envelopes:#?}");
    let find = |kind: &str, role: &str| {
        envelopes
            .iter()
            .find(|e| e["data"]["baseType"] == kind && e["tags"]["ai.cloud.role"] == role)
            .unwrap_or_else(|| panic!("no {kind} for {role}: {envelopes:#?}"))
    };
    let client_dep = find("RemoteDependencyData", "demo.client");
    let web_req = find("RequestData", "demo.web");
    let web_dep = find("RemoteDependencyData", "demo.web");
    let api_req = find("RequestData", "demo.api");
    // One operation: the trace id api's app was handed.
    let trace_id = &traceparent[3..35];
    for e in [client_dep, web_req, web_dep, api_req] {
        assert_eq!(e["tags"]["ai.operation.id"], trace_id, "{e:#}");
        let code = &base(e)[if e["data"]["baseType"] == "RequestData" {
            "responseCode"
        } else {
            "resultCode"
        }];
        assert_eq!(code, "200", "{e:#}");
        let d = base(e)["duration"].as_str().unwrap();
        assert!(d.starts_with("0.00:00:0"), "{d}");
    }
    // Each hop's parent is the span before it.
    assert!(
        client_dep["tags"].get("ai.operation.parentId").is_none(),
        "{client_dep:#}"
    );
    assert_eq!(
        web_req["tags"]["ai.operation.parentId"],
        base(client_dep)["id"]
    );
    assert_eq!(
        web_dep["tags"]["ai.operation.parentId"],
        base(web_req)["id"]
    );
    assert_eq!(
        api_req["tags"]["ai.operation.parentId"],
        base(web_dep)["id"]
    );
    // The context api's app got names api's SERVER span.
    assert_eq!(&traceparent[36..52], base(api_req)["id"].as_str().unwrap());
    // Instances, targets and identities.
    assert_eq!(client_dep["tags"]["ai.cloud.roleInstance"], "client-1");
    assert_eq!(api_req["tags"]["ai.cloud.roleInstance"], "api-1");
    assert_eq!(base(web_dep)["target"], "api.demo:80");
    assert_eq!(
        base(web_dep)["properties"]["trellis.destination.principal"],
        "spiffe://cluster.local/ns/demo/sa/api"
    );
    assert_eq!(
        base(api_req)["properties"]["trellis.source.principal"],
        "spiffe://cluster.local/ns/demo/sa/web"
    );
    // The access log carries the same trace id.
    assert!(
        client
            .access_log()
            .iter()
            .any(|l| l.contains(&format!("trace_id={trace_id}"))),
        "{:?}",
        client.access_log()
    );
    // And the control plane's local view shows the trace whole.
    let (_, _, traces) = http_get(cp.admin, "localhost", "/debug/traces")
        .await
        .unwrap();
    let traces: Value = serde_json::from_slice(&traces).unwrap();
    let t = traces
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["trace_id"] == trace_id)
        .unwrap_or_else(|| panic!("{traces:#}"));
    assert_eq!(t["spans"].as_array().unwrap().len(), 4, "{t:#}");

    for e in &envelopes {
        assert_eq!(e["sampleRate"], 100.0, "{e:#}");
    }

    // At 50%, the envelopes say so: Application Insights counts each as two requests.
    std::fs::write(
        cp.dir.path().join("mesh-config.yaml"),
        mesh_config("{sampling: 50, otlp: mesh}"),
    )
    .unwrap();
    let half = wait_until(Duration::from_secs(20), || async {
        let _ = http_get(client.outbound, "web.demo", "/half").await;
        ingestion
            .envelopes()
            .iter()
            .any(|e| e["sampleRate"] == 50.0 && e["tags"]["ai.cloud.role"] == "demo.api")
    })
    .await;
    assert!(half.is_ok(), "{:#?}\n{}", ingestion.envelopes(), cp.log());
    // Spans still in flight at 50% land before the count below is taken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_off = span_envelopes(&ingestion).len();
    let exported_before_off = client
        .metric("trellis_proxy_spans_exported_total")
        .await
        .unwrap();

    // Sampling off, live: requests still carry context, but no span is recorded.
    std::fs::write(
        cp.dir.path().join("mesh-config.yaml"),
        mesh_config("{sampling: 0, otlp: mesh}"),
    )
    .unwrap();
    let applied = wait_until(Duration::from_secs(10), || async {
        client.config().await["discovery"]["tracing"]["sampling_per_million"] == 0
            && web.config().await["discovery"]["tracing"]["sampling_per_million"] == 0
            && api.config().await["discovery"]["tracing"]["sampling_per_million"] == 0
    })
    .await;
    assert!(applied.is_ok(), "{}", client.config().await);
    for _ in 0..5 {
        let (status, _, _) = http_get(client.outbound, "web.demo", "/quiet")
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    let quiet = api_app.received();
    let last = quiet.last().unwrap().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        last.ends_with("-00"),
        "not sampled, still propagated: {last}"
    );
    // Give a batch time to go out (the proxies batch for up to 2 s), then check none did.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        span_envelopes(&ingestion).len(),
        before_off,
        "{:#?}",
        ingestion.envelopes()
    );
    let exported = client
        .metric("trellis_proxy_spans_exported_total")
        .await
        .unwrap();
    assert_eq!(exported, exported_before_off);
}

/// `d.hh:mm:ss.ffffff`, the envelopes' duration format, in seconds.
fn duration_seconds(d: &str) -> f64 {
    let (days, rest) = d.split_once('.').unwrap();
    let parts: Vec<f64> = rest.split(':').map(|p| p.parse().unwrap()).collect();
    days.parse::<f64>().unwrap() * 86_400.0 + parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// Per (cloud role, status code): the summed values of metric `name` in the Metric
/// envelopes received so far.
fn metric_totals(ingestion: &IngestionStandIn, name: &str) -> Vec<(String, String, f64)> {
    let mut totals: std::collections::BTreeMap<(String, String), f64> = Default::default();
    for e in ingestion.envelopes().iter().filter(|e| e["name"] == METRIC) {
        for m in base(e)["metrics"].as_array().unwrap() {
            if m["name"] == name {
                let role = e["tags"]["ai.cloud.role"]
                    .as_str()
                    .unwrap_or("-")
                    .to_owned();
                let status = base(e)["properties"]["http.response.status_code"]
                    .as_str()
                    .unwrap_or("-")
                    .to_owned();
                *totals.entry((role, status)).or_default() += m["value"].as_f64().unwrap();
            }
        }
    }
    totals.into_iter().map(|((r, s), v)| (r, s, v)).collect()
}

fn counts(expected: &[(&str, &str, f64)]) -> Vec<(String, String, f64)> {
    expected
        .iter()
        .map(|(r, s, v)| ((*r).to_owned(), (*s).to_owned(), *v))
        .collect()
}

/// Waits until the request counts of `name` are `expected` exactly, then three more
/// export intervals, and checks they stayed so (nothing counted twice).
async fn counts_settle(
    ingestion: &IngestionStandIn,
    cp: &ControlPlane,
    name: &str,
    expected: &[(&str, &str, f64)],
) {
    let expected = counts(expected);
    let reached = wait_until(Duration::from_secs(20), || async {
        metric_totals(ingestion, name) == expected
    })
    .await;
    assert!(
        reached.is_ok(),
        "{name}: wanted {expected:?}, have {:?}\n{:#?}\ncontrol plane log:\n{}",
        metric_totals(ingestion, name),
        ingestion.envelopes(),
        cp.log()
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(metric_totals(ingestion, name), expected, "{name} changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_metrics_reach_application_insights_as_custom_metrics() {
    let ingestion = IngestionStandIn::start().await.unwrap();
    let (client_in, web_in) = (loopback(free_port()), loopback(free_port()));
    let mesh = trellis_e2e::mesh_yaml(
        "demo",
        &["web"],
        &[
            ("web-1", "web", "web", web_in),
            ("client-1", "client", "client", client_in),
        ],
    );
    let (connection, ca) = (ingestion.connection_string(), ingestion.ca_pem().to_owned());
    let cp = ControlPlane::start_with(&mesh, |dir| {
        std::fs::write(
            dir.join("mesh-config.yaml"),
            mesh_config("{sampling: 100, otlp: mesh}"),
        )
        .unwrap();
        std::fs::write(dir.join("ingestion-ca.pem"), ca).unwrap();
        Launch {
            args: vec![
                "--mesh-config".into(),
                dir.join("mesh-config.yaml").display().to_string(),
                "--telemetry-metrics-interval".into(),
                "300ms".into(),
            ],
            env: vec![
                ("APPLICATIONINSIGHTS_CONNECTION_STRING".into(), connection),
                (
                    "TRELLIS_AZURE_EXTRA_ROOTS".into(),
                    dir.join("ingestion-ca.pem").display().to_string(),
                ),
            ],
        }
    })
    .await;
    let push = ["--metrics-push-interval", "200ms"];
    let web_app = EchoServer::start("web-1").await;
    let mut web = Proxy::start_with(&cp, "web-1", "demo", "web", web_in, web_app.addr, &push).await;
    let client_app = EchoServer::start("client-1").await;
    let client = Proxy::start_with(
        &cp,
        "client-1",
        "demo",
        "client",
        client_in,
        client_app.addr,
        &push,
    )
    .await;

    // Known traffic: 7 successes and 3 failures, client -> web.
    let started = std::time::Instant::now();
    for (path, status) in [("/ok", 200), ("/fail?status=503", 503)] {
        let n = if status == 200 { 7 } else { 3 };
        for _ in 0..n {
            let (got, _, _) = http_get(client.outbound, "web.demo", path).await.unwrap();
            assert_eq!(got, status);
        }
    }
    let traffic = started.elapsed().as_secs_f64();

    counts_settle(
        &ingestion,
        &cp,
        "http.server.request.count",
        &[("demo.web", "200", 7.0), ("demo.web", "503", 3.0)],
    )
    .await;
    counts_settle(
        &ingestion,
        &cp,
        "http.client.request.count",
        &[("demo.client", "200", 7.0), ("demo.client", "503", 3.0)],
    )
    .await;

    // Duration sums: positive, within the traffic's wall time, and what the Request
    // envelopes of the same 10 requests add up to.
    let server_sum: f64 = metric_totals(&ingestion, "http.server.request.duration.sum")
        .iter()
        .filter(|(role, _, _)| role == "demo.web")
        .map(|(_, _, v)| v)
        .sum();
    assert!(
        server_sum > 0.0 && server_sum < traffic,
        "{server_sum} s of {traffic} s"
    );
    // Spans travel on their own schedule (batches of up to 2 s in the proxy, 1 s here).
    let web_requests = || {
        span_envelopes(&ingestion)
            .into_iter()
            .filter(|e| {
                e["data"]["baseType"] == "RequestData" && e["tags"]["ai.cloud.role"] == "demo.web"
            })
            .collect::<Vec<Value>>()
    };
    let spans_in = wait_until(Duration::from_secs(15), || async {
        web_requests().len() >= 10
    })
    .await;
    assert!(spans_in.is_ok(), "{:#?}", ingestion.envelopes());
    let requests = web_requests();
    assert_eq!(requests.len(), 10, "{requests:#?}");
    let spans_sum: f64 = requests
        .iter()
        .map(|e| duration_seconds(base(e)["duration"].as_str().unwrap()))
        .sum();
    assert!(
        (server_sum - spans_sum).abs() <= 0.5 * spans_sum + 0.01,
        "metrics say {server_sum} s, Request envelopes {spans_sum} s"
    );
    let client_sum: f64 = metric_totals(&ingestion, "http.client.request.duration.sum")
        .iter()
        .map(|(_, _, v)| v)
        .sum();
    assert!(
        client_sum >= server_sum && client_sum < traffic,
        "{client_sum} s"
    );

    // One envelope as Application Insights stores it.
    let example = ingestion
        .envelopes()
        .into_iter()
        .find(|e| {
            e["name"] == METRIC
                && base(e)["metrics"][0]["name"] == "http.server.request.count"
                && base(e)["properties"]["http.response.status_code"] == "503"
        })
        .unwrap();
    assert_eq!(example["data"]["baseType"], "MetricData");
    assert_eq!(example["tags"]["ai.cloud.roleInstance"], "web-1");
    let properties = &base(&example)["properties"];
    assert_eq!(
        properties["trellis.identity"],
        "spiffe://cluster.local/ns/demo/sa/web"
    );
    assert_eq!(properties["source_workload"], "client");
    assert_eq!(properties["destination_service_name"], "web");
    assert_eq!(properties["http.request.method"], "GET");
    println!("example Metric envelope:\n{example:#}");
    assert!(
        web.metric("trellis_proxy_metric_exports_total{result=\"ok\"}")
            .await
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        web.metric("trellis_proxy_metric_exports_total{result=\"failed\"}")
            .await,
        Some(0.0)
    );

    // The web proxy restarts: its counts start from 0; the new requests are added, the old
    // ones not again.
    web.terminate();
    assert!(
        web.wait_exit(Duration::from_secs(10)).await.is_some(),
        "{}",
        web.log()
    );
    let web = Proxy::start_with(&cp, "web-1", "demo", "web", web_in, web_app.addr, &push).await;
    for _ in 0..2 {
        let (got, _, _) = http_get(client.outbound, "web.demo", "/again")
            .await
            .unwrap();
        assert_eq!(got, 200);
    }
    counts_settle(
        &ingestion,
        &cp,
        "http.server.request.count",
        &[("demo.web", "200", 9.0), ("demo.web", "503", 3.0)],
    )
    .await;
    counts_settle(
        &ingestion,
        &cp,
        "http.client.request.count",
        &[("demo.client", "200", 9.0), ("demo.client", "503", 3.0)],
    )
    .await;
    for e in ingestion.envelopes().iter().filter(|e| e["name"] == METRIC) {
        let value = base(e)["metrics"][0]["value"].as_f64().unwrap();
        assert!(value > 0.0, "no zero or negative data point: {e:#}");
    }
    drop(web);
}
