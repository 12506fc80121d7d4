//! A tiny HTTP/1.1 client for the CLI: admin endpoints, the demo traffic, tap streams.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A response: status, headers and the whole body as text.
pub(crate) struct Reply {
    pub(crate) status: http::StatusCode,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: String,
}

/// HTTP/1.1 client with a per-request timeout.
#[derive(Clone)]
pub(crate) struct HttpClient {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl HttpClient {
    pub(crate) fn new() -> Self {
        let client = Client::builder(TokioExecutor::new())
            .set_host(false)
            .build_http();
        Self { client }
    }

    /// GET `path` from `addr`, with `host` as the Host header.
    pub(crate) async fn get(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
    ) -> anyhow::Result<Reply> {
        self.request(http::Method::GET, addr, host, path).await
    }

    /// `method` `path` (no body) to `addr`, with `host` as the Host header.
    pub(crate) async fn request(
        &self,
        method: http::Method,
        addr: SocketAddr,
        host: &str,
        path: &str,
    ) -> anyhow::Result<Reply> {
        self.request_with(method, addr, host, path, &[]).await
    }

    /// [`Self::request`] with extra `headers`.
    pub(crate) async fn request_with(
        &self,
        method: http::Method,
        addr: SocketAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header(http::header::HOST, host);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Empty::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(5), self.client.request(req)).await??;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await??
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// GET `path` from `addr` with `Authorization: Bearer <token>`, for a response that
    /// streams: the head within 5 s, then the body as it comes (no timeout).
    pub(crate) async fn get_stream(
        &self,
        addr: SocketAddr,
        path: &str,
        token: &str,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let req = http::Request::get(format!("http://{addr}{path}"))
            .header(http::header::HOST, "localhost")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::new())?;
        Ok(tokio::time::timeout(Duration::from_secs(5), self.client.request(req)).await??)
    }
}
