//! Discovery metrics: connected proxies and push/ack/nack counts.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
    /// `trellis_discovery_proxies_by_version`: connected proxies per build version, as
    /// their Hello says (for `trellis check`'s version skew).
    pub(crate) proxies_by_version: Family<VersionLabel, Gauge>,
}

/// The `proxy_version` label: what the proxy's Hello said, if it looks like a version.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct VersionLabel {
    proxy_version: String,
}

/// Most distinct `proxy_version` series at once; connected proxies beyond them count as
/// `other`. Versions come from authenticated proxies, but a bound keeps a buggy or
/// compromised one from growing the series without end.
const MAX_VERSIONS: usize = 16;

impl VersionLabel {
    /// The label for a Hello's `proxy_version`: kept when it is 1 to 32 characters of
    /// letters, digits, `.`, `-` and `+` (a semantic version), else `invalid`.
    pub(crate) fn of(version: &str) -> Self {
        let ok = (1..=32).contains(&version.len())
            && version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'));
        Self {
            proxy_version: if ok { version } else { "invalid" }.to_owned(),
        }
    }

    fn other() -> Self {
        Self {
            proxy_version: "other".to_owned(),
        }
    }
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
            proxies_by_version: Family::default(),
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
            "trellis_discovery_proxies_by_version",
            "Connected proxies by the build version their Hello gave",
            metrics.proxies_by_version.clone(),
        );
        registry.register(
            "trellis_discovery_ack_latency_seconds",
            "Time from sending a discovery response to the proxy's ack of it",
            metrics.ack_latency.clone(),
        );
        metrics
    }

    /// Counts a proxy of `version` in; returns the label to [`Self::proxy_left`] with.
    pub(crate) fn proxy_joined(&self, version: &str) -> VersionLabel {
        let mut label = VersionLabel::of(version);
        // A read of the family's series, then the add: two streams racing past the bound
        // can go one or two over it, which is harmless.
        if self.proxies_by_version.get(&label).is_none()
            && count_series(&self.proxies_by_version) >= MAX_VERSIONS
        {
            label = VersionLabel::other();
        }
        self.proxies_by_version.get_or_create(&label).inc();
        label
    }

    /// Counts a proxy out; a version nobody runs any more disappears from `/metrics`.
    pub(crate) fn proxy_left(&self, label: &VersionLabel) {
        let now = self.proxies_by_version.get_or_create(label).dec() - 1;
        if now <= 0 {
            self.proxies_by_version.remove(label);
        }
    }
}

/// Series in `family` now. prometheus-client has no length accessor, so the exposition
/// is counted: this runs once per stream, not per request.
fn count_series(family: &Family<VersionLabel, Gauge>) -> usize {
    let mut registry = Registry::default();
    registry.register("v", "", family.clone());
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => text.lines().filter(|l| !l.starts_with('#')).count(),
        Err(_) => MAX_VERSIONS,
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
        let v = metrics.proxy_joined("0.1.0");
        metrics.proxy_joined("0.1.0");
        let bad = metrics.proxy_joined("0.1.0\"} 9\n");
        metrics.proxy_left(&bad);
        metrics.proxy_left(&bad);
        for n in 0..40 {
            metrics.proxy_joined(&format!("9.{n}.0"));
        }
        let mut text = String::new();
        encode(&mut text, &registry)?;
        let versions: Vec<&str> = (text.lines())
            .filter(|l| l.starts_with("trellis_discovery_proxies_by_version{"))
            .collect();
        assert_eq!(versions.len(), MAX_VERSIONS + 1, "{text}");
        assert!(
            versions.contains(&"trellis_discovery_proxies_by_version{proxy_version=\"0.1.0\"} 2")
        );
        // 40 versions: 15 fit next to 0.1.0, the other 25 are counted as `other`.
        assert!(
            versions.contains(&"trellis_discovery_proxies_by_version{proxy_version=\"other\"} 25")
        );
        assert!(
            !text.contains("invalid"),
            "a version whose proxies left is removed:\n{text}"
        );
        metrics.proxy_left(&v);
        metrics.proxy_left(&v);
        let mut text = String::new();
        encode(&mut text, &registry)?;
        assert!(!text.contains("proxy_version=\"0.1.0\""), "{text}");
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
