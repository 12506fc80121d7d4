//! The Trellis telemetry gateway: OTLP traces and golden metrics from the mesh's proxies
//! in, Azure Application Insights out.
//!
//! Owns: the OTLP `TraceService` the control plane mounts on its mTLS gRPC server
//! ([`Gateway`], [`GatewayConfig`]) and the `MetricsService` beside it ([`MetricsGateway`],
//! [`MetricsConfig`]: golden histograms to Application Insights `customMetrics`); the identity rule for telemetry (a proxy reports only
//! as the namespace of its verified SPIFFE id); the conversion of OTLP spans to the SDK's
//! `SpanData`; the bounded queue and the export worker between the RPCs and the exporter,
//! so a slow Application Insights never blocks a proxy; the Application Insights exporter
//! and its HTTPS client ([`app_insights_exporter`]); the local sink of recent traces
//! ([`Recent`], for `/debug/traces` and the demo); the gateway's metrics ([`Metrics`]);
//! and, behind feature `test-util`, a stand-in for the Application Insights ingestion
//! endpoint (`stand_in`).
//!
//! Must not depend on: kube, the azure_* SDK crates, or any Trellis crate but
//! trellis-identity. It terminates no TLS itself: the binary serving the gateway does, and
//! puts a [`trellis_identity::ConnectInfo`] into each request's extensions; the caller's
//! identity comes only from there. See `docs/telemetry-gateway.md`.

mod convert;
mod error;
mod exporter;
mod gateway;
mod golden;
mod metrics;
mod recent;
mod sampled;
#[cfg(feature = "test-util")]
pub mod stand_in;
mod worker;

pub use convert::{IDENTITY_ATTRIBUTE, MAX_RESOURCE_ATTRIBUTES, SCOPE_NAME};
pub use error::Error;
pub use exporter::app_insights_exporter;
pub use gateway::{
    DEFAULT_BATCH_INTERVAL, DEFAULT_EXPORT_TIMEOUT, DEFAULT_MAX_BATCH_SPANS,
    DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_SPANS_PER_REQUEST, DEFAULT_QUEUE_CAPACITY, Gateway,
    GatewayConfig,
};
pub use golden::{
    DEFAULT_MAX_SERIES, DEFAULT_METRICS_EXPORT_TIMEOUT, DEFAULT_METRICS_INTERVAL,
    DEFAULT_SERIES_TTL, MetricsConfig, MetricsGateway, MetricsWorker,
};
pub use metrics::Metrics;
pub use recent::{DEFAULT_RECENT_SPANS, Recent, SpanView, Tee, TraceView};
pub use sampled::Sampled;
