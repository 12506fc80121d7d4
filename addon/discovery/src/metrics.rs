//! Discovery metrics: connected proxies and push/ack/nack counts.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The discovery server's metrics. Cheap to clone: clones share the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `trellis_discovery_connected_proxies`: streams past their Hello, right now.
    pub(crate) connected_proxies: Gauge,
    /// `trellis_discovery_pushes_total`: responses sent (full or incremental).
    pub(crate) pushes: Counter,
    /// `trellis_discovery_acks_total`: versions proxies acked.
    pub(crate) acks: Counter,
    /// `trellis_discovery_nacks_total`: versions proxies refused.
    pub(crate) nacks: Counter,
    /// `trellis_discovery_full_pushes_total`: of the pushes, full views.
    pub(crate) full_pushes: Counter,
    /// `trellis_discovery_pushed_bytes_total`: encoded size of every push.
    pub(crate) pushed_bytes: Counter,
    /// `trellis_discovery_ack_latency_seconds`: from a push to the proxy's ack of it.
    pub(crate) ack_latency: Histogram,
    /// `trellis_discovery_proxies_behind`: connected proxies that have not acked the
    /// latest version sent to them (refused it, or not answered yet).
    pub(crate) proxies_behind: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connected_proxies: Gauge::default(),
            pushes: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            full_pushes: Counter::default(),
            proxies_behind: Gauge::default(),
            pushed_bytes: Counter::default(),
            // 1 ms .. ~16 s: loopback acks to proxies on a struggling node.
            ack_latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
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
            "Discovery versions sent to proxies (one per version, however many parts)",
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
        registry.register(
            "trellis_discovery_full_pushes",
            "Discovery responses sent as full views",
            metrics.full_pushes.clone(),
        );
        registry.register(
            "trellis_discovery_pushed_bytes",
            "Encoded bytes of discovery responses sent",
            metrics.pushed_bytes.clone(),
        );
        registry.register(
            "trellis_discovery_proxies_behind",
            "Connected proxies that have not acked the latest version sent to them",
            metrics.proxies_behind.clone(),
        );
        registry.register(
            "trellis_discovery_ack_latency_seconds",
            "Time from sending a discovery response to the proxy's ack of it",
            metrics.ack_latency.clone(),
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
