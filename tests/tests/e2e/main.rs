//! End-to-end scenarios: the real `trellis-addon` and `trellis-proxy` binaries on
//! loopback, with in-process apps that record the bytes they receive.
//!
//! One integration-test binary (it links once); scenario modules share the harness in
//! `trellis_e2e`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod bad_config;
mod control_plane_down;
mod mtls;
mod request_path;
