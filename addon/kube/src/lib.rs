//! The Kubernetes edge of the control plane: kube-rs watchers turned into the
//! controller's [`trellis_controller::Objects`], translated by the same
//! [`trellis_controller::translate`] as the file source.
//!
//! Replicas: any number of controller replicas serve discovery at once, each from its own
//! watches; reading needs no coordination. The few writes to the cluster (Events about a
//! rejected mesh ConfigMap, the published trust bundle, HTTPRoute status) come from one
//! replica only, the
//! holder of a `coordination.k8s.io` Lease ([`leader`]), so they are not repeated per
//! replica; a replica that loses the Lease, or cannot renew it within the renew deadline,
//! stops writing before another can take over.
//!
//! - [`KubeSource`]: one watcher and reflector (in-memory store) per kind: Namespaces,
//!   Services, `discovery.k8s.io/v1` EndpointSlices, Pods, `policy.trellis.dev/v1alpha1`
//!   AuthorizationPolicies, `gateway.networking.k8s.io/v1` HTTPRoutes, and the mesh
//!   ConfigMap (`trellis-system/trellis-config` by default). It publishes a
//!   [`MeshSnapshot`] once every kind has been listed (a missing CRD, the
//!   AuthorizationPolicy's or the Gateway API's HTTPRoute, counts as listed and empty,
//!   with one warning saying how to install it, and is retried), then after each change
//!   (coalesced over a debounce interval) when the services, the policies or the routes
//!   changed. The ConfigMap's `data` goes out raw on its own channel
//!   ([`KubeHandle::config`]); parsing and keeping the last good config is the app's job.
//!   The routes (with their status) and the Services that exist go out on another
//!   ([`KubeHandle::route_view`]), for the route status writer.
//! - [`convert`]: pure functions from the `k8s-openapi` types (and
//!   [`convert::RawPolicy`], an AuthorizationPolicy whose `spec` is still JSON) to the
//!   controller's objects. An object the controller would refuse is skipped on its own
//!   (with a warning), never the whole snapshot; an AuthorizationPolicy never is: the
//!   translator enforces an invalid one fail-closed, one whose spec does not even parse
//!   included (on its own, without failing the watch of the others), and
//!   [`trellis_controller::InvalidPolicies`] warns about it. HTTPRoutes are watched the
//!   same way ([`convert::RawRoute`]); a Gateway's route (no Service parent) is not the
//!   mesh's and left out quietly, and a mesh route with problems is left out of the
//!   snapshot by the translator (routing falls back to the plain Service) and reported by
//!   [`trellis_controller::InvalidRoutes`].
//! - [`Metrics`]: `trellis_kube_watch_errors_total{kind}`, `trellis_kube_objects{kind}`,
//!   and the controller's `trellis_controller_invalid_policies` and
//!   `trellis_controller_invalid_routes`.
//! - [`leader`]: a Lease-based leader elector (client-go's semantics and timings: 15 s
//!   lease, 10 s renew deadline, 2 s retry), publishing leadership on a `watch` channel;
//!   `trellis_kube_leader`, `trellis_kube_leader_transitions_total`.
//! - [`events`]: `Warning` `InvalidConfig` / `Normal` `ConfigApplied` Events on the mesh
//!   ConfigMap, written by the leader only, never blocking the caller;
//!   `trellis_kube_event_write_errors_total`.
//! - [`publish`]: [`TrustPublisher`](publish::TrustPublisher) keeps the mesh trust bundle
//!   (PEM) in the `caBundle` of every entry of the two admission webhook configurations
//!   and in a `trellis-trust-bundle` ConfigMap in every namespace, written by the leader
//!   only; `trellis_trust_bundle_*`.
//! - [`route_status`]: [`RouteStatusWriter`](route_status::RouteStatusWriter) keeps
//!   `status.parents` of every mesh HTTPRoute current (one entry per Service parent,
//!   `controllerName` [`trellis.dev/mesh-controller`](route_status::CONTROLLER_NAME),
//!   conditions `Accepted` and `ResolvedRefs`), other controllers' entries untouched,
//!   written by the leader only; `trellis_route_status_writes_total`.
//!
//! - `stand_in` (feature `test-util`, tests only): a stand-in for the Kubernetes API
//!   server, in process (a `tower::Service`) or over HTTPS with a kubeconfig.
//!
//! Owns: talking to the Kubernetes API (list/watch, restarts with backoff; the Lease; the
//! Events; the trust bundle ConfigMaps and webhook `caBundle`s; HTTPRoute status), what is
//! kept of each
//! object in memory, snapshot versioning for the Kubernetes source.
//!
//! Must not depend on: azure, or the proxy crate.
//!
//! [`MeshSnapshot`]: trellis_api::MeshSnapshot

use std::fmt;

pub use trellis_controller::httproute::GATEWAY_API_INSTALL;

pub mod convert;
pub mod events;
pub mod leader;
mod metrics;
pub mod publish;
pub mod route_status;
mod source;
#[cfg(feature = "test-util")]
pub mod stand_in;

pub use metrics::Metrics;
pub use source::{
    DEFAULT_CONFIG_NAME, DEFAULT_CONFIG_NAMESPACE, DEFAULT_DEBOUNCE, KindStatus, KubeHandle,
    KubeSettings, KubeSource, KubeStatus, SourceStopped,
};

/// A kind of object the source watches; the `kind` label of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` Namespace.
    Namespace,
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `v1` Pod.
    Pod,
    /// `v1` ConfigMap: the mesh configuration only.
    ConfigMap,
    /// `policy.trellis.dev/v1alpha1` AuthorizationPolicy (a custom resource: its CRD may
    /// not be installed, which counts as none).
    AuthorizationPolicy,
    /// `gateway.networking.k8s.io/v1` HTTPRoute (a custom resource of the Gateway API:
    /// its CRD may not be installed, which counts as none).
    HttpRoute,
}

// === impl Kind ===

impl Kind {
    /// Every kind, in the order they are reported.
    pub const ALL: [Kind; 7] = [
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::ConfigMap,
        Kind::AuthorizationPolicy,
        Kind::HttpRoute,
    ];

    /// The Kubernetes kind name, e.g. `EndpointSlice`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::ConfigMap => "ConfigMap",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::HttpRoute => "HTTPRoute",
        }
    }

    /// How to install the CRD of a custom resource kind, `None` for a built-in kind: a
    /// missing CRD (the list answers 404) counts as "none of this kind", with this hint.
    pub fn crd_install_hint(self) -> Option<&'static str> {
        match self {
            Kind::AuthorizationPolicy => Some("kubectl apply -f charts/trellis/crds/"),
            Kind::HttpRoute => Some(GATEWAY_API_INSTALL),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
