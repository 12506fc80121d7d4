//! The proxy's Prometheus metrics. Label sets are small and bounded: direction and
//! status code, never paths or peer addresses.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a finished request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// HTTP status code returned to the client.
    pub status_code: u16,
}

/// Labels of a finished tunnelled connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `ok`, `error`, or `blocked` (a destination outside the mesh under `REGISTRY_ONLY`).
    pub outcome: &'static str,
}

/// Labels of a direction-only metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

/// Labels of a per-listener metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `outbound` or `inbound` (the admin listener has no metrics).
    pub listener: &'static str,
}

/// All proxy metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Requests by direction and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency by direction.
    pub request_duration: Family<DirectionLabels, Histogram>,
    /// Tunnelled or passed-through connections (TCP, TLS, upgrades) by outcome.
    pub tcp_connections: Family<TcpLabels, Counter>,
    /// Failed mTLS handshakes by direction.
    pub tls_failures: Family<DirectionLabels, Counter>,
    /// The discovery version this proxy applied.
    pub discovery_version: Gauge,
    /// 1 while the discovery stream is up.
    pub discovery_connected: Gauge,
    /// Discovery versions refused.
    pub discovery_nacks: Counter,
    /// Unix time the current certificate expires.
    pub cert_expiry: Gauge,
    /// Roots in the trust bundle peers are verified against now.
    pub trust_roots: Gauge,
    /// Generation of the CA that signed the current certificate (0: not numbered).
    pub ca_generation: Gauge,
    /// Connections open now, by listener.
    pub connections_open: Family<ListenerLabels, Gauge>,
    /// Connections closed at accept because the listener was full, by listener.
    pub connections_refused: Family<ListenerLabels, Counter>,
}

// === impl Metrics ===

impl Metrics {
    /// Creates the metrics and registers them under `trellis_proxy_`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            tls_failures: Family::default(),
            tcp_connections: Family::default(),
            discovery_version: Gauge::default(),
            discovery_connected: Gauge::default(),
            discovery_nacks: Counter::default(),
            cert_expiry: Gauge::default(),
            trust_roots: Gauge::default(),
            ca_generation: Gauge::default(),
            connections_open: Family::default(),
            connections_refused: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("trellis_proxy");
        r.register("requests", "HTTP requests handled", m.requests.clone());
        r.register(
            "request_duration_seconds",
            "Time from request received to response headers",
            m.request_duration.clone(),
        );
        r.register(
            "tcp_connections",
            "Tunnelled or passed-through TCP connections",
            m.tcp_connections.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Failed mTLS handshakes",
            m.tls_failures.clone(),
        );
        r.register(
            "discovery_version",
            "Applied discovery version",
            m.discovery_version.clone(),
        );
        r.register(
            "discovery_connected",
            "1 while the discovery stream is connected",
            m.discovery_connected.clone(),
        );
        r.register(
            "discovery_nacks",
            "Discovery versions refused",
            m.discovery_nacks.clone(),
        );
        r.register(
            "certificate_expiration_timestamp_seconds",
            "Unix time the workload certificate expires",
            m.cert_expiry.clone(),
        );
        r.register(
            "trust_roots",
            "Roots in the trust bundle peers are verified against",
            m.trust_roots.clone(),
        );
        r.register(
            "ca_generation",
            "Generation of the CA that signed the workload certificate",
            m.ca_generation.clone(),
        );
        r.register(
            "connections_open",
            "Connections open, by listener",
            m.connections_open.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed at accept because the listener was at --max-connections",
            m.connections_refused.clone(),
        );
        // The fixed label sets exist from the start, at 0: a series that appears only with
        // its first event breaks `rate()` and "no errors" alerts. Request counts stay
        // created on demand: their status codes are not known in advance.
        for direction in ["inbound", "outbound"] {
            let _ = m
                .request_duration
                .get_or_create(&DirectionLabels { direction });
            let _ = m.tls_failures.get_or_create(&DirectionLabels { direction });
            for outcome in ["ok", "error", "blocked"] {
                let _ = m
                    .tcp_connections
                    .get_or_create(&TcpLabels { direction, outcome });
            }
        }
        m
    }
}
