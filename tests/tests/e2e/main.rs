//! End-to-end scenarios: the real `trellis-addon` and `trellis-proxy` binaries on
//! loopback, with in-process apps that record the bytes they receive.
//!
//! One integration-test binary (it links once); scenario modules share the harness in
//! `trellis_e2e`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod acks;
mod apps;
mod bad_config;
mod capture;
mod control_plane_down;
mod dashboard;
mod endpoints;
mod generated;
mod kubernetes;
mod limits;
mod metrics;
mod mtls;
mod policy;
mod protocols;
mod request_path;
mod rotation;
mod routes;
mod tap;
mod telemetry;
mod tracing;
mod workbook;
