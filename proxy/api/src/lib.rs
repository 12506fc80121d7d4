//! The contract between the Trellis proxy and its control plane.
//!
//! Owns: the protobuf services (`proto/discovery.proto`, `proto/identity.proto`), their
//! generated tonic/prost code (checked in under `src/gen/`, verified against the .proto
//! files by a test), and the plain snapshot types ([`MeshSnapshot`]) that the control
//! plane builds and the proxy consumes.
//!
//! Must not depend on: any other Trellis crate, kube, azure. It sits under `proxy/` so the
//! data plane builds without anything from `addon/`.

pub mod snapshot;

pub use snapshot::{Endpoint, MeshSnapshot, Protocol, Service, ServiceKey, ServicePort};
