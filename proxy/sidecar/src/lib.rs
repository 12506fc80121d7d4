//! The Trellis data-plane proxy: one per workload.
//!
//! ```text
//! outbound: app --http/1.1--> listen -> authority -> route (pure) -> endpoint
//!                                  -> mTLS (SPIFFE id checked) --h2--> peer proxy
//! inbound:  peer --mTLS--> accept -> peer identity -> authorize (pure) --http/1.1--> app
//! admin:    127.0.0.1 /live /ready /metrics /config
//! ```
//!
//! The proxy asks the control plane's CA for a certificate (its key never leaves the
//! process), holds one discovery stream for its view of the mesh, and keeps serving on
//! its last good view when the control plane is gone.
//!
//! Owns: listeners, routing, balancing, mTLS connections, authorization policy
//! enforcement (the decision is `trellis_api::authz`'s), the access log and proxy
//! metrics. May depend on `trellis-api` and `trellis-identity` only: never on kube,
//! k8s-openapi, azure or any `addon/` crate (checked by `.ci/run`).

pub mod admin;
pub mod app;
pub mod authz;
pub mod capture;
pub mod config;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod error;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod logging;
pub mod metrics;
pub mod otlp_metrics;
pub mod outbound;
pub mod peer;
pub mod tap;
pub mod telemetry;
pub mod trace;
pub mod transport;
pub mod tunnel;

pub use config::{Args, Config};
pub use error::{Error, Side};
