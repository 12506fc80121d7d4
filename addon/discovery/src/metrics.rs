//! Discovery metrics: connected proxies and push/ack/nack counts.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The discovery server's metrics. Cheap to clone: clones share the same series.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// `trellis_discovery_connected_proxies`: streams past their Hello, right now.
    pub(crate) connected_proxies: Gauge,
    /// `trellis_discovery_pushes_total`: responses sent (full or incremental).
    pub(crate) pushes: Counter,
    /// `trellis_discovery_acks_total`: versions proxies acked.
    pub(crate) acks: Counter,
    /// `trellis_discovery_nacks_total`: versions proxies refused.
    pub(crate) nacks: Counter,
}

// === impl Metrics ===

impl Metrics {
    /// Creates the metrics and registers them on `registry`.
    ///
    /// Counter names are registered without `_total`: prometheus-client appends it.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "trellis_discovery_connected_proxies",
            "Proxies with an open discovery stream",
            metrics.connected_proxies.clone(),
        );
        registry.register(
            "trellis_discovery_pushes",
            "Discovery responses sent to proxies",
            metrics.pushes.clone(),
        );
        registry.register(
            "trellis_discovery_acks",
            "Config versions acked by proxies",
            metrics.acks.clone(),
        );
        registry.register(
            "trellis_discovery_nacks",
            "Config versions refused by proxies",
            metrics.nacks.clone(),
        );
        metrics
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn metrics_are_exported_under_their_documented_names() -> Result<(), std::fmt::Error> {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.connected_proxies.inc();
        metrics.pushes.inc();
        metrics.acks.inc();
        metrics.nacks.inc();
        let mut text = String::new();
        encode(&mut text, &registry)?;
        for line in [
            "trellis_discovery_connected_proxies 1",
            "trellis_discovery_pushes_total 1",
            "trellis_discovery_acks_total 1",
            "trellis_discovery_nacks_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        Ok(())
    }
}
