//! The Trellis discovery gRPC server: per-proxy views, incremental updates, acks.
//!
//! Owns: the `trellis.discovery.v1.Discovery` service ([`DiscoveryService`]), which streams
//! each connected proxy a full view of the mesh and then incremental diffs as the
//! control plane's [`MeshSnapshot`](trellis_api::MeshSnapshot) watch channel changes; the
//! registry of connected proxies and the versions they acked ([`ProxyStatus`]); what each
//! proxy may see ([`Scope`]); and the discovery metrics ([`Metrics`]).
//!
//! Must not depend on: kube, azure, or TLS. The binary that serves this service terminates
//! mTLS and puts a [`trellis_identity::ConnectInfo`] into each request's extensions; the
//! proxy's identity comes only from there.

mod metrics;
mod published;
mod registry;
mod scope;
mod server;

pub use metrics::Metrics;
pub use registry::ProxyStatus;
pub use scope::{CONTROL_PLANE_NAMESPACE, NamespaceSet, Scope};
pub use server::{
    DEFAULT_FULL_VIEWS_IN_FLIGHT, DEFAULT_HELLO_TIMEOUT, DiscoveryService, MAX_REQUEST_BYTES,
    MAX_RESPONSE_BYTES, ServiceAcks,
};
