//! The Application Insights exporter kept in step with the mesh's sampling rate.
//!
//! Application Insights extrapolates every count it shows (request rate, failures,
//! Application Map edges) from each envelope's `sampleRate`: a span kept at 1% stands for
//! 100 requests. Proxies sample new traces at trellis-config's `tracing.sampling` and the
//! rest of a trace follows its root's decision, so that percentage is the rate of every
//! span the gateway receives. The exporter takes its rate at construction; this wrapper
//! rebuilds it when the rate changes (rare: a config edit).

use std::sync::{Arc, Mutex, PoisonError};

use opentelemetry_application_insights::Exporter;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tokio::sync::watch;

use crate::{Error, app_insights_exporter};

/// An Application Insights exporter whose `sampleRate` follows a sampling probability in
/// millionths (trellis-config `tracing.sampling`; 0 is sent as 100%, since spans then
/// come only from callers that decided to sample, which Trellis cannot weigh).
pub struct Sampled {
    connection_string: String,
    extra_roots_pem: Option<String>,
    sampling: watch::Receiver<u32>,
    current: Mutex<(u32, Arc<Exporter<reqwest::Client>>)>,
}

impl std::fmt::Debug for Sampled {
    // Never the connection string: it holds the instrumentation key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampled")
            .field("sampling_per_million", &*self.sampling.borrow())
            .finish_non_exhaustive()
    }
}

/// `sampleRate` as the exporter takes it: a fraction of 1.
fn fraction(per_million: u32) -> f64 {
    if per_million == 0 {
        1.0
    } else {
        f64::from(per_million.min(1_000_000)) / 1e6
    }
}

impl Sampled {
    /// The exporter for `connection_string` (see [`app_insights_exporter`]), at the rate
    /// `sampling` holds now and later.
    pub fn new(
        connection_string: &str,
        extra_roots_pem: Option<&str>,
        sampling: watch::Receiver<u32>,
    ) -> Result<Self, Error> {
        let rate = *sampling.borrow();
        let exporter = app_insights_exporter(connection_string, extra_roots_pem)?
            .with_sample_rate(fraction(rate));
        Ok(Self {
            connection_string: connection_string.to_owned(),
            extra_roots_pem: extra_roots_pem.map(str::to_owned),
            sampling,
            current: Mutex::new((rate, Arc::new(exporter))),
        })
    }

    /// The exporter for the rate in force, rebuilt if it changed.
    fn exporter(&self) -> Result<Arc<Exporter<reqwest::Client>>, Error> {
        let rate = *self.sampling.borrow();
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.0 != rate {
            let exporter =
                app_insights_exporter(&self.connection_string, self.extra_roots_pem.as_deref())?
                    .with_sample_rate(fraction(rate));
            *current = (rate, Arc::new(exporter));
            tracing::info!(
                sampling_per_million = rate,
                "Application Insights sampleRate follows tracing.sampling"
            );
        }
        Ok(current.1.clone())
    }
}

impl SpanExporter for Sampled {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let exporter = self
            .exporter()
            .map_err(|e| opentelemetry_sdk::error::OTelSdkError::InternalFailure(e.to_string()))?;
        exporter.export(batch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_fractions_and_zero_means_unweighted() {
        assert_eq!(fraction(10_000), 0.01);
        assert_eq!(fraction(1_000_000), 1.0);
        assert_eq!(fraction(5_000_000), 1.0);
        assert_eq!(fraction(0), 1.0);
    }
}
