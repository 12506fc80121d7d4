//! The Trellis controller's mesh sources: objects in, versioned [`MeshSnapshot`]s out.
//!
//! Today there is one source, a directory of YAML ([`FileSource`]) for the local profile;
//! the Kubernetes watchers will produce the same [`Objects`] and share [`translate`].
//!
//! - [`objects`]: the accepted kinds (`v1` Service, `local.trellis.dev/v1alpha1` Workload).
//! - [`load_dir`]: reads and validates a directory, reporting every problem at once.
//! - [`translate`]: the pure objects-to-snapshot function.
//! - [`FileSource`]: polls the directory and publishes changed snapshots, keeping the last
//!   good one when an edit is broken.
//!
//! Owns: parsing and validation of mesh objects, snapshot versioning for the file source,
//! the `trellis_controller_*` metrics.
//!
//! Must not depend on: kube, azure, or the proxy crate.
//!
//! [`MeshSnapshot`]: trellis_api::MeshSnapshot

mod error;
mod files;
mod metrics;
pub mod objects;
mod source;
mod translate;
mod validate;

pub use error::{ConfigError, EXIT_CONFIG, Error, Position, Problem};
pub use files::{MAX_DOCUMENTS, MAX_FILE_BYTES, MAX_FILES, load_dir};
pub use metrics::Metrics;
pub use objects::{ObjectKey, Objects};
pub use source::{FileSource, SourceStatus};
pub use translate::translate;
