//! The Trellis controller's mesh sources: objects in, versioned [`MeshSnapshot`]s out.
//!
//! Two sources produce the same [`Objects`] and share [`translate`]:
//!
//! - a directory of YAML ([`FileSource`]) for the local profile: Services, Workloads,
//!   AuthorizationPolicies and HTTPRoutes, endpoints by selector
//!   ([`EndpointSource::Selectors`]);
//! - a Kubernetes cluster (crate `trellis-kube`, which depends on this one and not the
//!   other way round): Namespaces, Services, EndpointSlices, Pods (as Workloads),
//!   AuthorizationPolicies and HTTPRoutes, endpoints from the slices
//!   ([`EndpointSource::EndpointSlices`]).
//!
//! Entry points:
//!
//! - [`objects`]: the object types (`v1` Service, `local.trellis.dev/v1alpha1` Workload,
//!   `policy.trellis.dev/v1alpha1` AuthorizationPolicy as [`Policy`],
//!   `gateway.networking.k8s.io/v1` HTTPRoute as [`Route`], and the Kubernetes-only
//!   Namespace and EndpointSlice), and the per-object checks both sources apply
//!   ([`objects::Service::problems`], [`objects::Workload::problems`],
//!   [`Policy::problems`], [`Route::problems`]).
//! - [`load_dir`]: reads and validates a directory, reporting every problem at once.
//! - [`translate`]: the pure objects-to-snapshot function; AuthorizationPolicies with
//!   problems (possible from Kubernetes) are translated fail-closed, and
//!   [`InvalidPolicies`] reports them (a warning per change, a gauge). HTTPRoutes with a
//!   Service parent (GAMMA) become `MeshSnapshot::routes`; one with problems is left out
//!   (the safe direction for a route) and [`InvalidRoutes`] reports it.
//! - [`FileSource`]: polls the directory and publishes changed snapshots, keeping the last
//!   good one when an edit is broken.
//! - [`policy`] and [`crd`]: the `policy.trellis.dev` custom resource types and the
//!   CustomResourceDefinitions generated from them (shipped in `charts/trellis/crds/`).
//! - [`httproute`]: the Gateway API HTTPRoute as plain serde types (upstream owns that
//!   CRD; nothing is generated from them).
//!
//! Owns: parsing and validation of mesh objects, snapshot versioning for the file source,
//! the `trellis_controller_*` metrics, the Trellis CRDs.
//!
//! Must not depend on: kube's client or runtime (only its `derive`: the kube-core types and
//! the CustomResource macro, no I/O), azure, or the proxy crate.
//!
//! [`MeshSnapshot`]: trellis_api::MeshSnapshot

mod authorization;
pub mod crd;
mod error;
mod files;
pub mod httproute;
mod invalid;
mod metrics;
pub mod objects;
pub mod policy;
mod routes;
mod source;
mod translate;
mod validate;

pub use authorization::{
    InvalidPolicies, MAX_POLICY_ENTRIES, MAX_POLICY_LONG_STRING, MAX_POLICY_STRING,
};
pub use error::{ConfigError, EXIT_CONFIG, Error, Position, Problem};
pub use files::{MAX_DOCUMENTS, MAX_FILE_BYTES, MAX_FILES, load_dir};
pub use metrics::{InvalidCount, Metrics};
pub use objects::{EndpointSource, ObjectKey, Objects, Policy, Route, SpecParseError};
pub use routes::{
    InvalidRoutes, MAX_BACKEND_WEIGHT, MAX_ROUTE_BACKENDS, MAX_ROUTE_MATCHES, MAX_ROUTE_PARENTS,
    MAX_ROUTE_RULES, MAX_ROUTE_TOTAL_MATCHES, MAX_ROUTE_VALUE_MATCHES,
};
pub use source::{FileSource, SourceStatus};
pub use translate::translate;
