//! Workload identity for Trellis: SPIFFE IDs, CSRs, trust bundles and the rustls
//! verifiers that admit a peer only with a chain to the trust bundle and exactly one
//! well-formed SPIFFE URI SAN in the trust domain.
//!
//! Owns: [`SpiffeId`] parsing, key and CSR generation, certificate/identity extraction,
//! rustls client and server configurations for mesh mTLS.
//!
//! Must not depend on: any other Trellis crate, kube, azure, or network I/O. Everything
//! here is pure so it can be table-tested and fuzzed.
//!
//! The trust decision lives in one function, [`verify_peer`]; the rustls verifiers behind
//! [`server_config`] and [`client_config`] only call it.

mod bundle;
mod conn;
mod csr;
mod error;
mod spiffe;
mod svid;
mod tls;
mod verify;
mod x509;

#[cfg(test)]
mod matrix;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;

pub use bundle::TrustBundle;
pub use conn::ConnectInfo;
pub use csr::{CsrKey, generate_csr};
pub use error::Error;
pub use spiffe::{DEFAULT_TRUST_DOMAIN, Error as SpiffeError, SpiffeId};
pub use svid::{Svid, leaf_identity};
pub use tls::{ClientAuth, client_config, peer_identity, server_config};
pub use verify::{PeerRole, verify_peer};
