//! A small HTTP/1.1 server standing in for an application: answers `200` with
//! `hello from <name> <path>` and records each request's method, path, headers and
//! body bytes for the test to assert on. `?sleep_ms=N` in the query makes it wait N ms
//! before answering (a slow request in flight, for drain and timeout tests); `?status=N`
//! answers with status N; `?forge=1` adds a `trellis-dst-workload: forged` header (an app
//! trying to speak for its proxy).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One request as the app received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: http::Method,
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// The recording server; stops when dropped.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub name: String,
    received: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (rec, n) = (received.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (rec, n) = (rec.clone(), n.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (rec, n) = (rec.clone(), n.clone());
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let pq = parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default();
                                if let Some(ms) = sleep_ms(&pq) {
                                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                                }
                                let reply = format!("hello from {n} {pq}");
                                // `?status=NNN` answers with that status; `?forge=1` also
                                // claims to be another workload in the header proxies use.
                                let status = query_param(&pq, "status").unwrap_or(200u16);
                                let forge = query_param::<u8>(&pq, "forge") == Some(1);
                                rec.lock().unwrap().push(Recorded {
                                    method: parts.method,
                                    path_and_query: pq,
                                    headers: parts.headers,
                                    body,
                                });
                                let mut resp = http::Response::builder();
                                if forge {
                                    resp = resp.header("trellis-dst-workload", "forged");
                                }
                                Ok::<_, std::convert::Infallible>(
                                    resp.status(status)
                                        .header("x-served-by", n.as_str())
                                        .body(Full::new(Bytes::from(reply)))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            name: name.to_owned(),
            received,
            task,
        }
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Recorded> {
        self.received.lock().unwrap().clone()
    }
}

/// The `sleep_ms` query parameter of a path-and-query, if any.
fn sleep_ms(path_and_query: &str) -> Option<u64> {
    query_param(path_and_query, "sleep_ms")
}

/// `?<name>=<number>` of a request target.
fn query_param<T: std::str::FromStr>(path_and_query: &str, name: &str) -> Option<T> {
    let (_, query) = path_and_query.split_once('?')?;
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
