//! The mesh as plain data: what the control plane knows at one version.
//!
//! Both the control plane (which builds a [`MeshSnapshot`] from its sources) and the proxy
//! (which rebuilds one from discovery responses) use these types; protobuf types stay at
//! the wire edge.

use std::collections::BTreeMap;
use std::fmt;

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

/// Identifies a service: `<namespace>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceKey {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

/// The whole mesh at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MeshSnapshot {
    /// Monotonic version; bumps on every change the control plane accepts.
    pub version: u64,
    /// Trust domain of every identity in the mesh.
    pub trust_domain: String,
    /// Services by key, with their endpoints resolved.
    pub services: BTreeMap<ServiceKey, Service>,
    /// The trust bundle and the CA generation (empty when the control plane has none).
    pub trust: Trust,
    /// What proxies do with connections to destinations outside the mesh.
    pub outbound: OutboundPolicy,
    /// How proxies write their access log.
    pub access_log: AccessLog,
    /// Where and how often proxies record spans.
    pub tracing: Tracing,
    /// Authorization policies, sorted by namespace and name. The control plane's snapshot
    /// holds every policy of the mesh; a proxy's view holds those of its namespace and of
    /// [`crate::authz::ROOT_NAMESPACE`].
    pub authorization: Vec<crate::authz::AuthorizationPolicy>,
    /// HTTP routes, sorted by namespace and name. The control plane's snapshot holds every
    /// route of the mesh; a proxy's view holds the producer routes (in their parent
    /// Service's namespace) and the routes of its own namespace.
    pub routes: Vec<crate::route::HttpRoute>,
}

/// trellis-config's `tracing`: how often proxies sample new traces and where they send
/// spans. The default is off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Tracing {
    /// Probability of sampling a new trace, in millionths (1% = 10,000).
    pub sampling_per_million: u32,
    /// `""` (off), `"mesh"` (the control plane's telemetry gateway) or an OTLP/gRPC URL.
    pub otlp: String,
}

/// How proxies write their access log: trellis-config's `proxy.accessLog` and
/// `proxy.accessLogFormat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    /// Not set by the control plane: the proxy keeps its own default (text).
    #[default]
    Unset,
    /// `key=value` text lines.
    Text,
    /// One JSON object per line.
    Json,
    /// No access lines.
    Off,
}

/// What a proxy does with a connection to a destination outside the mesh (no service or
/// endpoint in its view): trellis-config's `outboundTrafficPolicy.mode`, Istio's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    /// Pass it through as plain TCP to its original destination (the default).
    #[default]
    AllowAny,
    /// Refuse it: closed at once, logged and counted.
    RegistryOnly,
}

/// The roots peers are verified against, and the generation of the CA that signs now.
///
/// Sent in every full view and in increments where it changed (an increment without
/// roots leaves it as it was; see `DiscoveryResponse` in `proto/discovery.proto`). The
/// roots are opaque bytes here: parsing them is the proxy's job, which keeps its last good
/// bundle when a pushed one does not parse.
///
/// Serializes (for `/debug` and `/config` output) as the root count, short sha256
/// fingerprints ([`fingerprint`]) and the generation, never the certificates themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// Root certificates, DER, in the control plane's order. Empty: no bundle.
    pub roots_der: Vec<Vec<u8>>,
    /// Generation of the CA that signs new leaves; a proxy whose leaf is older
    /// re-issues. 0 when the control plane does not number generations.
    pub generation: u64,
}

/// A service and its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Namespace and name.
    pub key: ServiceKey,
    /// Extra host names besides the Kubernetes DNS forms.
    pub hostnames: Vec<String>,
    /// Ports, each with the endpoints that serve it.
    pub ports: Vec<ServicePort>,
    /// Virtual IPs (Kubernetes cluster IPs) that only proxies resolve: a captured
    /// connection to `<address>:<port>` of one of `ports` goes to this service.
    pub addresses: Vec<std::net::IpAddr>,
}

/// Application protocol of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2: routed per request.
    Http,
    /// Opaque TCP: forwarded per connection.
    Tcp,
}

/// One port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Port name (may be empty).
    pub name: String,
    /// The port clients address.
    pub port: u16,
    /// Application protocol.
    pub protocol: Protocol,
    /// Where the port is served.
    pub endpoints: Vec<Endpoint>,
}

/// A place a service port is served, and who must be there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Where to open the mTLS connection (the peer proxy's inbound listener).
    pub address: std::net::SocketAddr,
    /// SPIFFE ID the peer must present (validated by the control plane).
    pub identity: String,
    /// Workload (pod) name.
    pub workload: String,
    /// Workload labels.
    pub labels: BTreeMap<String, String>,
}

// === impl ServiceKey ===

impl ServiceKey {
    /// Builds a key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

// === impl Trust ===

impl Trust {
    /// [`fingerprint`] of each root, in order.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots_der.iter().map(|der| fingerprint(der)).collect()
    }
}

impl Serialize for Trust {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Trust", 3)?;
        s.serialize_field("roots", &self.roots_der.len())?;
        s.serialize_field("fingerprints", &self.fingerprints())?;
        s.serialize_field("generation", &self.generation)?;
        s.end()
    }
}

/// A short, stable name for a certificate in logs and debug output: the first 8 bytes of
/// the SHA-256 of its DER, as 16 lowercase hex digits. Enough to tell roots apart and to
/// match them against `openssl x509 -fingerprint -sha256`; not meant for security checks.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .take(FINGERPRINT_BYTES)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Bytes of the SHA-256 digest that [`fingerprint`] shows.
const FINGERPRINT_BYTES: usize = 8;

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
