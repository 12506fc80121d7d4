//! Workload identity for Trellis: SPIFFE IDs, CSRs, trust bundles and the rustls
//! verifiers that admit a peer only with a chain to the trust bundle and exactly one
//! well-formed SPIFFE URI SAN in the trust domain.
//!
//! Owns: [`SpiffeId`] parsing, key and CSR generation, certificate/identity extraction,
//! rustls client and server configurations for mesh mTLS.
//!
//! Must not depend on: any other Trellis crate, kube, azure, or network I/O. Everything
//! here is pure so it can be table-tested and fuzzed.

mod conn;
mod spiffe;

pub use conn::ConnectInfo;
pub use spiffe::{DEFAULT_TRUST_DOMAIN, Error as SpiffeError, SpiffeId};
