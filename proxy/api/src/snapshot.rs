//! The mesh as plain data: what the control plane knows at one version.
//!
//! Both the control plane (which builds a [`MeshSnapshot`] from its sources) and the proxy
//! (which rebuilds one from discovery responses) use these types; protobuf types stay at
//! the wire edge.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

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

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
