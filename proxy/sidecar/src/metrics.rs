//! The proxy's Prometheus metrics. Label sets are bounded: never paths, hosts or peer
//! addresses. The HTTP request families, with mesh labels, live in [`crate::telemetry`].

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::telemetry::{HttpFamilies, Interner, Local, MAX_CLAIMED_NAMES, MAX_KNOWN_NAMES};
use crate::trace::Tracer;

/// Labels of a finished tunnelled connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// `ok`, `error`, `blocked` (a destination outside the mesh under `REGISTRY_ONLY`) or
    /// `denied` (an inbound tunnel an authorization policy refused).
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
    /// Inbound requests (`http_server_*`), with mesh labels.
    pub http_server: HttpFamilies,
    /// Outbound requests (`http_client_*`), with mesh labels.
    pub http_client: HttpFamilies,
    /// This proxy's workload as label values.
    pub local: Arc<Local>,
    /// Names peers claimed in the telemetry headers, interned and capped.
    pub claimed: Arc<Interner>,
    /// Service, namespace and identity names from discovery, interned and capped.
    pub known: Arc<Interner>,
    /// Starts and queues spans.
    pub tracer: Arc<Tracer>,
    /// Live request stream for `GET /tap`.
    pub tap: Arc<crate::tap::Tap>,
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
    /// Authorization decisions on inbound requests and tunnels.
    pub authz: crate::authz::AuthzMetrics,
}

/// The registry as the OpenMetrics text `/metrics` serves (ending in `# EOF`). Also what
/// the OTLP metrics pusher reads the request histograms from ([`crate::otlp_metrics`]):
/// prometheus-client has no other way to iterate a family's series.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

// === impl Metrics ===

impl Metrics {
    /// Creates the metrics: the HTTP families under their semantic-convention names,
    /// everything else under `trellis_proxy_`. `local` labels this proxy's side.
    pub fn new(registry: &mut Registry, local: Local, tracer: Arc<Tracer>) -> Self {
        let m = Self {
            http_server: HttpFamilies::register("server", registry),
            http_client: HttpFamilies::register("client", registry),
            local: Arc::new(local),
            claimed: Arc::new(Interner::new(MAX_CLAIMED_NAMES)),
            known: Arc::new(Interner::new(MAX_KNOWN_NAMES)),
            tracer,
            tap: Arc::default(),
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
            authz: crate::authz::AuthzMetrics::default(),
        };
        let r = registry.sub_registry_with_prefix("trellis_proxy");
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
        r.register(
            "authorization_decisions",
            "Authorization policy decisions on inbound requests and tunnels that a policy \
             applied to, by decision and deciding policy",
            m.authz.decisions.clone(),
        );
        // The fixed label sets exist from the start, at 0: a series that appears only with
        // its first event breaks `rate()` and "no errors" alerts. Request series stay
        // created on demand: their peers and status codes are not known in advance.
        for direction in ["inbound", "outbound"] {
            let _ = m.tls_failures.get_or_create(&DirectionLabels { direction });
            for outcome in ["ok", "error", "blocked", "denied"] {
                let _ = m
                    .tcp_connections
                    .get_or_create(&TcpLabels { direction, outcome });
            }
        }
        m
    }
}
