//! The sidecar injector's decision. This crate owns *whether* a pod gets the Trellis proxy
//! and *exactly what* is added to it: [`inject`] is a pure function from a Pod, its
//! namespace's labels and an [`InjectConfig`] to a [`Decision`] (skip, with the reason, or
//! an RFC 6902 JSON patch), and [`review`] wraps it in an `admission.k8s.io/v1`
//! AdmissionReview for the mutating webhook. `trellis inject` (the CLI) applies the same
//! function to YAML offline, so the webhook and the CLI cannot disagree.
//!
//! No I/O, no clock, no randomness: the same input always gives the same patch. This
//! crate must not depend on kube's client or runtime (only on `kube` with the `admission`
//! feature, for the AdmissionReview types), nor on the proxy crate: the contract with the
//! proxy is its flags' environment variables (`TRELLIS_PROXY_*`, `TRELLIS_INIT_*`), named
//! here as constants and checked by tests against the proxy's sources.
//!
//! Serving the webhook over HTTPS is the control plane's job (`trellis-addon`).

mod config;
mod inject;
mod net;
mod review;

pub use config::{
    DEFAULT_CONTROL_PLANE, DEFAULT_IMDS_CIDR, InjectConfig, KubeVersion, NATIVE_SIDECAR_MIN,
    ProxyResources,
};
pub use inject::{
    ANNOTATION_EXCLUDE_INBOUND_PORTS, ANNOTATION_EXCLUDE_OUTBOUND_CIDRS,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS, ANNOTATION_INJECT, ANNOTATION_INJECTED,
    ANNOTATION_SERVICE_NAME, Decision, INIT_CONTAINER_NAME, InjectError, LABEL_PROXY,
    PROXY_CONTAINER_NAME, SHUTDOWN_TOKEN_PATH, SidecarMode, SkipReason, Summary, inject,
};
pub use review::{
    MalformedReview, NamespaceLabels, Outcome, Reviewed, admission_request, pod_namespace, review,
    review_with,
};

/// The injector's version, written into `trellis.dev/injected`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Applies RFC 6902 operations (as [`Decision::Patch`] gives them) to a JSON document, as
/// the API server does: all or nothing. For `trellis inject` and tests.
pub fn apply_patch(doc: &mut serde_json::Value, ops: &[serde_json::Value]) -> Result<(), String> {
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops.to_vec()))
        .map_err(|e| format!("not a JSON patch: {e}"))?;
    json_patch::patch(doc, &patch).map_err(|e| e.to_string())
}
