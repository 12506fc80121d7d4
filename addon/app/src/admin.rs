//! Control-plane admin endpoints on loopback: `/live`, `/ready`, `/metrics`,
//! `/debug/proxies` (who is connected, which version each acked, whether it is synced),
//! `/debug/acks` (per service: the version it last changed at and how many of the proxies
//! that receive it applied that version), `/debug/snapshot` (the mesh as the control plane
//! sees it, every authorization policy as enforced included), `/debug/source` (config reload status) and `/debug/ca` (CA source, generation,
//! expiry, trust bundle). `--metrics-addr` serves `/metrics` alone on a second listener
//! that may face out of the pod.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_api::MeshSnapshot;
use trellis_controller::SourceStatus;
use trellis_discovery::DiscoveryService;

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoints {
    /// The admin port (loopback): everything.
    All,
    /// `--metrics-addr`: `GET /metrics` and nothing else, so it may face out of the pod.
    MetricsOnly,
}

/// `trellis_build_info{version}` = 1: which build this replica runs, for `trellis check`'s
/// version skew against the proxies (`trellis_discovery_proxies_by_version`).
pub(crate) fn register_build_info(registry: &mut Registry) {
    #[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
    struct Build {
        version: &'static str,
    }
    let info = prometheus_client::metrics::family::Family::<Build, Gauge>::default();
    info.get_or_create(&Build {
        version: env!("CARGO_PKG_VERSION"),
    })
    .set(1);
    registry.register(
        "trellis_build_info",
        "1, labelled with the build version of this control plane",
        info,
    );
}

/// What the admin endpoints read.
pub(crate) struct Admin {
    pub(crate) snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    pub(crate) source: watch::Receiver<SourceStatus>,
    pub(crate) discovery: DiscoveryService,
    pub(crate) registry: Registry,
    pub(crate) ca: Arc<trellis_ca::CertificateAuthority>,
    /// Recent traces the telemetry gateway received.
    pub(crate) traces: trellis_telemetry::Recent,
}

// === impl Admin ===

impl Admin {
    /// Serves until `shutdown`.
    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        endpoints: Endpoints,
        shutdown: CancellationToken,
    ) {
        loop {
            let tcp = tokio::select! {
                r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
                () = shutdown.cancelled() => return,
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move {
                        Ok::<_, Infallible>(match endpoints {
                            Endpoints::All => this.handle(&req),
                            Endpoints::MetricsOnly => this.handle_metrics_only(&req),
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }

    /// The metrics-only listener: `/metrics` as on the admin port, 404 for the rest.
    fn handle_metrics_only<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.uri().path() == "/metrics" {
            return self.handle(req);
        }
        reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "this listener serves /metrics only\n".into(),
        )
    }

    /// Answers one request; generic over the body, which no endpoint reads, so tests can
    /// call it without a connection.
    fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET\n".into(),
            );
        }
        match req.uri().path() {
            "/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
            "/ready" => reply(
                StatusCode::OK,
                "text/plain",
                format!("ready: version {}\n", self.snapshots.borrow().version),
            ),
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        out,
                    ),
                    Err(e) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("{e}\n"),
                    ),
                }
            }
            "/debug/proxies" => json(&self.discovery.proxies()),
            "/debug/acks" => json(&self.discovery.service_acks()),
            "/debug/snapshot" => {
                let snap = self.snapshots.borrow().clone();
                let services: Vec<_> = snap.services.values().collect();
                json(&serde_json::json!({
                    "version": snap.version,
                    "trust_domain": snap.trust_domain,
                    "outbound_traffic_policy": snap.outbound,
                    "services": services,
                    "authorization": snap.authorization,
                }))
            }
            "/debug/ca" => json(&self.ca.status()),
            "/debug/traces" => json(&self.traces.traces(50)),
            "/debug/source" => {
                let s = self.source.borrow().clone();
                json(&serde_json::json!({
                    "last_error": s.last_error,
                    "last_good_version": s.last_good_version,
                    "reloads_ok": s.reloads_ok,
                    "reloads_failed": s.reloads_failed,
                }))
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "endpoints: /live /ready /metrics /debug/proxies /debug/acks /debug/snapshot /debug/source /debug/ca\n"
                    .into(),
            ),
        }
    }
}

fn json(v: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(v) {
        Ok(s) => reply(StatusCode::OK, "application/json", s),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http_body_util::BodyExt;
    use trellis_api::{Service, ServiceKey};

    use super::*;

    fn service(namespace: &str, name: &str) -> (ServiceKey, Service) {
        let key = ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        };
        let svc = Service {
            key: key.clone(),
            hostnames: Vec::new(),
            ports: Vec::new(),
            addresses: Vec::new(),
        };
        (key, svc)
    }

    async fn get(admin: &Admin, path: &str) -> anyhow::Result<(StatusCode, String)> {
        let resp = admin.handle(&Request::get(path).body(())?);
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8(body.to_vec())?))
    }

    /// `/debug/acks` is the JSON of `service_acks()`: one entry per service, with the
    /// version it changed at; with no proxy connected nobody receives it.
    #[tokio::test]
    async fn debug_acks_lists_every_service() -> anyhow::Result<()> {
        let snapshot = MeshSnapshot {
            version: 7,
            trust_domain: "cluster.local".into(),
            services: BTreeMap::from([service("demo", "web"), service("shop", "cart")]),
            authorization: vec![trellis_api::authz::AuthorizationPolicy {
                namespace: "demo".into(),
                name: "deny-all".into(),
                target_services: vec!["web".into()],
                action: trellis_api::authz::Action::Deny,
                dry_run: true,
                rules: vec![trellis_api::authz::Rule::default()],
            }],
            ..MeshSnapshot::default()
        };
        let (_tx, snapshots) = watch::channel(Arc::new(snapshot));
        let (_source_tx, source) = watch::channel(SourceStatus::default());
        let mut registry = Registry::default();
        let discovery = DiscoveryService::new(
            snapshots.clone(),
            trellis_discovery::Metrics::new(&mut registry),
        );
        let admin = Admin {
            snapshots,
            source,
            discovery,
            registry,
            ca: Arc::new(trellis_ca::CertificateAuthority::generate("cluster.local")?),
            traces: trellis_telemetry::Recent::new(16),
        };

        let (status, body) = get(&admin, "/debug/acks").await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(
            doc,
            serde_json::json!([
                { "service": "demo/web", "version": 7, "proxies": 0, "applied": 0, "pending": [] },
                { "service": "shop/cart", "version": 7, "proxies": 0, "applied": 0, "pending": [] },
            ])
        );

        let (status, body) = get(&admin, "/debug/snapshot").await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(doc["version"], 7);
        assert_eq!(
            doc["authorization"],
            serde_json::json!([{
                "namespace": "demo", "name": "deny-all", "target_services": ["web"],
                "action": "DENY", "dry_run": true, "rules": [{"from": [], "to": []}],
            }])
        );

        let (status, body) = get(&admin, "/nope").await?;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("/debug/acks"), "{body}");
        Ok(())
    }
}
