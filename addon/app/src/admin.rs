//! Control-plane admin endpoints on loopback: `/live`, `/ready`, `/metrics`,
//! `/debug/proxies` (who is connected and which version each acked), `/debug/snapshot`
//! (the mesh as the control plane sees it), `/debug/source` (config reload status) and
//! `/debug/ca` (CA source, generation, expiry, trust bundle).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_api::MeshSnapshot;
use trellis_controller::SourceStatus;
use trellis_discovery::DiscoveryService;

/// What the admin endpoints read.
pub(crate) struct Admin {
    pub(crate) snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    pub(crate) source: watch::Receiver<SourceStatus>,
    pub(crate) discovery: DiscoveryService,
    pub(crate) registry: Registry,
    pub(crate) ca: Arc<trellis_ca::CertificateAuthority>,
}

// === impl Admin ===

impl Admin {
    /// Serves until `shutdown`.
    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let tcp = tokio::select! {
                r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
                () = shutdown.cancelled() => return,
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(&req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
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
            "/debug/snapshot" => {
                let snap = self.snapshots.borrow().clone();
                let services: Vec<_> = snap.services.values().collect();
                json(
                    &serde_json::json!({ "version": snap.version, "trust_domain": snap.trust_domain, "services": services }),
                )
            }
            "/debug/ca" => json(&self.ca.status()),
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
                "endpoints: /live /ready /metrics /debug/proxies /debug/snapshot /debug/source /debug/ca\n"
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
