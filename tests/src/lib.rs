//! Harness for Trellis end-to-end tests: starts the real `trellis-addon` and
//! `trellis-proxy` binaries on loopback, small in-process HTTP servers that record every
//! request they receive, and clients that speak to the proxies.
//!
//! The binaries must be built first (`cargo build --bins`; the README's test command
//! does it). The harness finds them next to the test executable's `deps/` directory and
//! fails loudly, never skips, when they are missing.
//!
//! May depend on the proxy-side crates and `trellis-ca` (to mint certificates from the
//! control plane's persisted root); never on kube.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    unreachable_pub
)]

pub mod app;
pub mod apps;
pub mod captured;
pub mod mesh;
pub mod netns;

pub use app::{EchoServer, Recorded};
pub use mesh::{
    ControlPlane, Launch, Load, Proxy, TRUST_DOMAIN, free_port, http_get, http_request, mesh_yaml,
    request_series, wait_until,
};
