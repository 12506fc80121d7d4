//! The demo application: answers every request with a JSON line saying which workload
//! served it, the path, and the caller identity its proxy vouched for
//! (`x-forwarded-client-cert`), so the demo can show identities end to end.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves until the process is stopped.
pub(crate) async fn run(
    name: String,
    listen: SocketAddr,
    delay: std::time::Duration,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("demo app {name}: cannot listen on {listen}: {e}"))?;
    let name = Arc::new(name);
    loop {
        let (tcp, _) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let name = name.clone();
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let caller = req
                            .headers()
                            .get("x-forwarded-client-cert")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.split(';').find_map(|kv| kv.strip_prefix("URI=")))
                            .unwrap_or("none")
                            .to_owned();
                        let body = serde_json::json!({
                            "workload": *name,
                            "path": req.uri().path(),
                            "caller": caller,
                        });
                        let resp = http::Response::builder()
                            .header(http::header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from(body.to_string())));
                        resp.map_err(|e| e.to_string())
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
