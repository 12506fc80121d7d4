//! The admin endpoints, on loopback only: `/live`, `/ready`, `/metrics` (Prometheus
//! text) and `/config` (the identity, certificate and discovery view in JSON). Read-only:
//! nothing here changes the proxy.

use std::sync::Arc;
use std::time::SystemTime;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::http::{Body, full};
use crate::identity::Certified;
use crate::outbound::route::View;

/// What the admin endpoints read.
pub struct Admin {
    /// Workload name.
    pub workload: String,
    /// Current certificate.
    pub certs: watch::Receiver<Option<Arc<Certified>>>,
    /// Current view.
    pub view: watch::Receiver<Arc<View>>,
    /// Metrics registry.
    pub registry: Registry,
}

// === impl Admin ===

impl Admin {
    /// Ready once we hold a certificate and a discovery view.
    pub fn is_ready(&self) -> Result<(), &'static str> {
        if self.certs.borrow().is_none() {
            return Err("no certificate yet");
        }
        if self.view.borrow().snapshot.version == 0 {
            return Err("no discovery view yet");
        }
        Ok(())
    }

    /// Serves until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let tcp = tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, _)) => tcp,
                    Err(error) => { warn!(%error, "admin accept failed"); continue; }
                },
                () = shutdown.cancelled() => return,
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, std::convert::Infallible>(this.handle(&req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n".into()),
            "/ready" => match self.is_ready() {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => {
                        let mut r = text(StatusCode::OK, out);
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        r
                    }
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                }
            }
            "/config" => {
                let body = self.config_json();
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "endpoints: /live /ready /metrics /config\n".into(),
            ),
        }
    }

    fn config_json(&self) -> String {
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        let cert = self.certs.borrow().as_ref().map(|c| {
            serde_json::json!({
                "identity": c.svid.id().as_str(),
                "not_before_unix": unix(c.svid.not_before()),
                "not_after_unix": unix(c.svid.not_after()),
                "trust_roots": c.bundle.len(),
            })
        });
        let view = self.view.borrow().clone();
        let services: Vec<_> = view.snapshot.services.values().collect();
        let doc = serde_json::json!({
            "workload": self.workload,
            "ready": self.is_ready().is_ok(),
            "certificate": cert,
            "discovery": {
                "version": view.snapshot.version,
                "trust_domain": view.snapshot.trust_domain,
                "services": services,
            },
        });
        serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}
