//! Data-plane errors that say which side failed, so the status code, the log field and
//! the metric label all come from one `match` (pingora's `ErrorSource`).

use http::StatusCode;

/// Which side of the proxy a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client that sent us the request (bad request, unknown destination).
    Downstream,
    /// The peer proxy or the local app we forwarded to.
    Upstream,
    /// The proxy itself (not ready, no certificate yet).
    Internal,
}

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request named no host (no absolute URI, no Host header).
    #[error("request has no host: send an absolute URI or a Host header")]
    NoHost,
    /// The host is not a valid authority.
    #[error("invalid host {0:?}")]
    BadHost(String),
    /// No mesh service answers to this host and port.
    #[error("no mesh service for {0}")]
    NoRoute(String),
    /// HTTPRoutes attach to the service port, and none of their rules matches.
    #[error("no rule of the HTTPRoutes attached to {0} matches the request")]
    NoRouteMatch(String),
    /// The rule that matched has no backend that can serve the request.
    #[error("HTTPRoute {route}: {why}")]
    NoBackend {
        /// `<namespace>/<name>` of the route.
        route: String,
        /// Why no backend can be used.
        why: String,
    },
    /// The service exists but has no endpoints.
    #[error("service {0} has no endpoints")]
    NoEndpoints(String),
    /// The proxy has no certificate or no view yet.
    #[error("proxy not ready: {0}")]
    NotReady(&'static str),
    /// The endpoint's identity in discovery is not a valid SPIFFE ID.
    #[error("endpoint {addr} has an invalid identity {identity:?}")]
    BadEndpointIdentity {
        /// Endpoint address.
        addr: std::net::SocketAddr,
        /// What discovery said.
        identity: String,
    },
    /// Could not connect or complete mTLS to the peer (includes identity mismatch).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// Peer address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The upstream HTTP exchange failed.
    #[error("upstream request failed: {0}")]
    Upstream(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The upstream did not answer in time.
    #[error("upstream timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// A destination outside the mesh while the mesh's outbound traffic policy is
    /// REGISTRY_ONLY.
    #[error("{0} is outside the mesh and outboundTrafficPolicy is REGISTRY_ONLY")]
    OutsideMesh(std::net::SocketAddr),
    /// An authorization policy refused the request or tunnel (inbound); the message names
    /// the policy (`denied by policy demo/deny-admin`, `no ALLOW policy matched`).
    #[error("{0}")]
    Denied(trellis_api::authz::Denial),
}

// === impl Error ===

impl Error {
    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            Error::NoHost
            | Error::BadHost(_)
            | Error::NoRoute(_)
            | Error::NoRouteMatch(_)
            | Error::OutsideMesh(_)
            | Error::Denied(_) => Side::Downstream,
            // A route whose backends cannot be used is the mesh's configuration.
            Error::NotReady(_) | Error::NoBackend { .. } => Side::Internal,
            Error::NoEndpoints(_)
            | Error::BadEndpointIdentity { .. }
            | Error::Connect { .. }
            | Error::Upstream(_)
            | Error::Timeout(_) => Side::Upstream,
        }
    }

    /// The status code returned to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NoHost | Error::BadHost(_) => StatusCode::BAD_REQUEST,
            Error::Denied(trellis_api::authz::Denial::BadPath(_)) => StatusCode::BAD_REQUEST,
            Error::Denied(_) => StatusCode::FORBIDDEN,
            Error::NoRoute(_) | Error::NoRouteMatch(_) => StatusCode::NOT_FOUND,
            // The Gateway API's answer for a rule without a usable backend.
            Error::NoBackend { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            // Istio's BlackHoleCluster answers 502 for HTTP under REGISTRY_ONLY.
            Error::OutsideMesh(_) => StatusCode::BAD_GATEWAY,
            Error::NoEndpoints(_) | Error::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::BadEndpointIdentity { .. } | Error::Connect { .. } | Error::Upstream(_) => {
                StatusCode::BAD_GATEWAY
            }
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

impl Side {
    /// Label value for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}
