//! Errors from building the gateway and its Application Insights exporter.

/// Why the gateway or its exporter could not be built.
///
/// No variant ever carries the connection string or the instrumentation key: these
/// messages end up in logs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Application Insights connection string is malformed or incomplete.
    #[error("Application Insights connection string: {0}")]
    ConnectionString(String),
    /// The HTTPS client for Application Insights could not be built (bad trusted roots,
    /// no usable TLS provider).
    #[error("Application Insights HTTPS client: {0}")]
    Transport(String),
    /// A [`GatewayConfig`](crate::GatewayConfig) value is out of range, or the gateway was
    /// started outside a Tokio runtime.
    #[error("telemetry gateway: {0}")]
    Config(String),
}
