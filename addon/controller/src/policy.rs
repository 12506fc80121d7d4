//! `policy.trellis.dev/v1alpha1` **AuthorizationPolicy**: who may call a workload, and
//! what they may call.
//!
//! The custom resource type ([`AuthorizationPolicy`]) is the one source of its CRD
//! (`trellis-addon print-crds`, checked in under `charts/trellis/crds/` and compared by a
//! drift test); the file source parses the same `spec` from YAML. Semantics are Istio's
//! `security.istio.io` AuthorizationPolicy so that a user moving over keeps their mental
//! model; the target is named Gateway-API style (`targetRefs` to a Service), as Istio's
//! own `targetRefs` and GAMMA do.
//!
//! ```yaml
//! apiVersion: policy.trellis.dev/v1alpha1
//! kind: AuthorizationPolicy
//! metadata:
//!   name: web-readers
//!   namespace: demo
//! spec:
//!   targetRefs:                   # absent: every workload of the namespace
//!     - kind: Service
//!       name: web
//!   action: ALLOW                 # or DENY; default ALLOW
//!   rules:
//!     - from:
//!         - serviceAccounts: [client]   # or "other-namespace/client"
//!       to:
//!         - methods: [GET, HEAD]
//!           paths: ["/hello", "/static/*"]
//! ```

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Trellis policy kind.
pub const POLICY_GROUP: &str = "policy.trellis.dev";
/// `apiVersion` of the policy kinds.
pub const POLICY_API_VERSION: &str = "policy.trellis.dev/v1alpha1";

/// The desired state of an AuthorizationPolicy.
#[derive(
    CustomResource, Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema,
)]
#[kube(
    group = "policy.trellis.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced,
    doc = "Who may call the workloads of a namespace or Service, and what they may call \
           (Istio AuthorizationPolicy semantics)."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The Services (of the policy's namespace) whose workloads the policy applies to, on
    /// those Services' target ports. Absent or empty: every workload of the namespace; in
    /// the root namespace `trellis-system`, every workload of the mesh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetRef>,
    /// `ALLOW` (default) or `DENY`. A matching DENY policy refuses a request; else, when
    /// ALLOW policies apply to the workload, one of them must match.
    #[serde(default)]
    pub action: PolicyAction,
    /// Evaluate the policy and log and count what it would refuse, without refusing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// The policy matches a request when any rule does. Absent or empty: it matches
    /// nothing (an ALLOW policy without rules allows nothing).
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

/// A Service the policy applies to (the Gateway API `LocalPolicyTargetReference` shape).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    /// API group of the target: `""` (core), the default.
    #[serde(default)]
    pub group: String,
    /// Kind of the target: `Service`.
    pub kind: String,
    /// Name of the Service, in the policy's namespace.
    pub name: String,
}

/// What a policy does with the requests it matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    /// Let matching requests through; with ALLOW policies present, others are refused.
    #[default]
    Allow,
    /// Refuse matching requests, whatever ALLOW policies say.
    Deny,
}

/// Matches when the caller matches any entry of `from` (or it is empty) and the request
/// any entry of `to` (or it is empty). An empty rule (`{}`) matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    /// Who calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<PolicySource>,
    /// What is called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<PolicyOperation>,
}

/// Who calls, by mTLS identity. Every list given must match (AND); within a list, any
/// entry (OR). Entries are patterns: exact, `*`, `prefix*` or `*suffix`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySource {
    /// SPIFFE IDs (`spiffe://cluster.local/ns/demo/sa/web`) or Istio's form without the
    /// scheme (`cluster.local/ns/demo/sa/web`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Namespaces of the caller's identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Service accounts: `name` (in the policy's namespace) or `namespace/name`; exact
    /// names, no patterns. Shorthand for principals in the mesh's trust domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
}

/// What is called. Every list given must match (AND); within a list, any entry (OR).
/// `methods` and `paths` are HTTP-only: on an opaque TCP connection an ALLOW operation
/// naming them matches nothing and a DENY operation ignores them (it refuses the
/// connection), both the fail-closed reading.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyOperation {
    /// The workload's (target) ports, not the Service's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// HTTP methods, upper case (`GET`), or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Request paths, without the query, after normalization (`/a/./b` is `/a/b`):
    /// exact, `prefix*`, `*suffix` or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}
