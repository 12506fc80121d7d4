//! The telemetry gateway end to end, one test binary: `gateway` (spans) and `metrics`
//! (golden metrics) over real gRPC, against the Application Insights ingestion stand-in.
//!
//! TLS is the serving binary's job, so each proxy here gets its own loopback listener whose
//! interceptor puts the `ConnectInfo` that binary's acceptor would (one listener stands in
//! for one proxy's mTLS connection): [`support::as_peer`] and [`support::serve`].

#![allow(clippy::unwrap_used)]

mod gateway;
mod metrics;
mod support;
