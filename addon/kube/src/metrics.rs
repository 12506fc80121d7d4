//! Metrics of the Kubernetes source.
//!
//! - `trellis_kube_watch_errors_total{kind}`: errors of the list/watch of each kind (each is
//!   followed by a restart with backoff). Every kind's series exists from registration, so
//!   a rate query sees zeros rather than gaps.
//! - `trellis_kube_objects{kind}`: objects of each kind held in memory (skipped ones
//!   included; the ConfigMap is 0 or 1).
//! - `trellis_controller_invalid_policies`: the controller's gauge of AuthorizationPolicies
//!   enforced fail-closed ([`trellis_controller::InvalidCount::policies`]), and
//!   `trellis_controller_invalid_routes`, the HTTPRoutes left out for their problems
//!   ([`trellis_controller::InvalidCount::routes`]), registered here because only this source can
//!   hold invalid ones.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use trellis_controller::InvalidCount;

use crate::Kind;

type KindLabel = [(&'static str, &'static str); 1];

/// Handles to the source's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    watch_errors: Family<KindLabel, Counter>,
    objects: Family<KindLabel, Gauge>,
    pub(crate) policies: InvalidCount,
    pub(crate) routes: InvalidCount,
}

// === impl Metrics ===

impl Metrics {
    /// Registers the metrics in `registry`; give the result to
    /// [`KubeSource::with_metrics`](crate::KubeSource::with_metrics).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            watch_errors: Family::default(),
            objects: Family::default(),
            policies: InvalidCount::policies(registry),
            routes: InvalidCount::routes(registry),
        };
        registry.register(
            "trellis_kube_watch_errors",
            "Errors listing or watching a kind of object; the watch restarts with backoff",
            metrics.watch_errors.clone(),
        );
        registry.register(
            "trellis_kube_objects",
            "Objects of a kind held in memory",
            metrics.objects.clone(),
        );
        // Created now so every kind is exported at zero; the guards are dropped at once.
        for kind in Kind::ALL {
            let _ = metrics.watch_errors.get_or_create(&label(kind));
            let _ = metrics.objects.get_or_create(&label(kind));
        }
        metrics
    }

    pub(crate) fn watch_error(&self, kind: Kind) {
        self.watch_errors.get_or_create(&label(kind)).inc();
    }

    pub(crate) fn set_objects(&self, kind: Kind, count: usize) {
        self.objects
            .get_or_create(&label(kind))
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

fn label(kind: Kind) -> KindLabel {
    [("kind", kind.as_str())]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn exposes_errors_and_objects_by_kind_from_zero() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.watch_error(Kind::Pod);
        metrics.watch_error(Kind::Pod);
        metrics.set_objects(Kind::EndpointSlice, 7);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "trellis_kube_watch_errors_total{kind=\"Pod\"} 2",
            "trellis_kube_watch_errors_total{kind=\"ConfigMap\"} 0",
            "trellis_kube_objects{kind=\"EndpointSlice\"} 7",
            "trellis_kube_objects{kind=\"Namespace\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
