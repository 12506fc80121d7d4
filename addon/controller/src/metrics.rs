//! Metrics of the file source.
//!
//! - `trellis_controller_reloads_total{result="ok"|"error"}`: directory changes loaded
//!   (or refused). Both series exist from registration, so a rate query sees zeros
//!   rather than gaps.
//! - `trellis_controller_snapshot_version`: version of the snapshot built from the
//!   directory; the version discovery pushes adds trust and proxy-setting changes on top.
//! - `trellis_controller_invalid_policies` ([`InvalidCount::policies`], registered by the source
//!   that can hold invalid policies, Kubernetes): AuthorizationPolicies with problems,
//!   translated fail-closed. The file source refuses such a directory instead.
//! - `trellis_controller_invalid_routes` ([`InvalidCount::routes`], registered likewise by the
//!   Kubernetes source): the mesh's HTTPRoutes with problems, left out of the snapshot.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type ResultLabel = [(&'static str, &'static str); 1];

/// Handles to the controller's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    reloads: Family<ResultLabel, Counter>,
    snapshot_version: Gauge,
}

/// A gauge of objects with problems that the Kubernetes source could not refuse, for
/// [`InvalidPolicies`](crate::InvalidPolicies) ([`InvalidCount::policies`]) and
/// [`InvalidRoutes`](crate::InvalidRoutes) ([`InvalidCount::routes`]); cheap to clone.
#[derive(Debug, Clone)]
pub struct InvalidCount {
    invalid: Gauge,
}

// === impl Metrics ===

impl Metrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            reloads: Family::default(),
            snapshot_version: Gauge::default(),
        };
        registry.register(
            "trellis_controller_reloads",
            "Directory changes loaded, by result (ok, or error: the last good snapshot is kept)",
            metrics.reloads.clone(),
        );
        registry.register(
            "trellis_controller_snapshot_version",
            "Version of the snapshot built from the config directory (discovery versions add trust and proxy-setting changes on top)",
            metrics.snapshot_version.clone(),
        );
        // Created now so both series are exported at zero; the guards are dropped at once.
        let _ = metrics.reloads.get_or_create(&[("result", "ok")]);
        let _ = metrics.reloads.get_or_create(&[("result", "error")]);
        metrics
    }

    pub(crate) fn reload_ok(&self) {
        self.reloads.get_or_create(&[("result", "ok")]).inc();
    }

    pub(crate) fn reload_failed(&self) {
        self.reloads.get_or_create(&[("result", "error")]).inc();
    }

    pub(crate) fn set_version(&self, version: u64) {
        self.snapshot_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
    }
}

// === impl InvalidCount ===

impl InvalidCount {
    /// Registers `trellis_controller_invalid_policies` in `registry`.
    pub fn policies(registry: &mut Registry) -> Self {
        Self::register(
            registry,
            "trellis_controller_invalid_policies",
            "AuthorizationPolicies with problems, enforced fail-closed (ALLOW: allows nothing; DENY: refuses everything) until fixed",
        )
    }

    /// Registers `trellis_controller_invalid_routes` in `registry`.
    pub fn routes(registry: &mut Registry) -> Self {
        Self::register(
            registry,
            "trellis_controller_invalid_routes",
            "HTTPRoutes with a Service parent and problems, left out of the snapshot (their Services are served unrouted) until fixed",
        )
    }

    fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let metrics = Self {
            invalid: Gauge::default(),
        };
        registry.register(name, help, metrics.invalid.clone());
        metrics
    }

    pub(crate) fn set(&self, count: usize) {
        self.invalid.set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn exposes_reloads_by_result_and_version() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.reload_ok();
        metrics.reload_ok();
        metrics.set_version(3);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "trellis_controller_reloads_total{result=\"ok\"} 2",
            "trellis_controller_reloads_total{result=\"error\"} 0",
            "trellis_controller_snapshot_version 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
