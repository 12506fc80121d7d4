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
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{Map, json};

/// API group of every Trellis policy kind.
pub const POLICY_GROUP: &str = "policy.trellis.dev";
/// `apiVersion` of the policy kinds.
pub const POLICY_API_VERSION: &str = "policy.trellis.dev/v1alpha1";

// The limits agreed for every policy.trellis.dev list and string. The CRD's schema
// (`maxItems`, `maxLength`, `pattern`) carries them, so the API server refuses an
// oversized or malformed policy at `kubectl apply`, before the control plane sees it.

/// Most rules in one policy, targetRefs in one policy, entries in one `from` or `to` list,
/// and values in one list of a `from` or `to` entry (`maxItems` in the CRD).
pub const SCHEMA_MAX_ITEMS: usize = 64;
/// Longest name or pattern, in characters (a DNS subdomain is at most 253).
pub const SCHEMA_MAX_STRING: usize = 253;
/// Longest path or principal pattern, in characters.
pub const SCHEMA_MAX_LONG_STRING: usize = 1024;
/// What a pattern may be (`Pattern::parse` in trellis-api): `*`, an exact value, `prefix*`
/// or `*suffix`; never empty, and no `*` anywhere else. RE2 (the API server's Go regexp)
/// and Python's `re` (the chart's schema checks) read it the same.
pub const SCHEMA_PATTERN_REGEX: &str = r"^(\*|\*?[^*]+|[^*]+\*)$";
/// A service account: `name`, or `namespace/name` (a DNS label, then a DNS subdomain).
pub const SCHEMA_SERVICE_ACCOUNT_REGEX: &str =
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-.a-z0-9]*[a-z0-9])?$";

/// The schema of `ports`: at most [`SCHEMA_MAX_ITEMS`] integers in 1..=65535. Written out
/// because schemars describes a `u16` as `format: uint16` from 0, a format Kubernetes does
/// not know and a port no workload listens on.
fn port_list_schema(_: &mut SchemaGenerator) -> Schema {
    let mut schema = Map::new();
    schema.insert("type".to_owned(), json!("array"));
    schema.insert("maxItems".to_owned(), json!(SCHEMA_MAX_ITEMS));
    schema.insert(
        "items".to_owned(),
        json!({"type": "integer", "minimum": 1, "maximum": u16::MAX}),
    );
    Schema::from(schema)
}

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
    shortname = "authz",
    category = "trellis",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Dry-run", type_ = "boolean", json_path = ".spec.dryRun"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "Who may call the workloads of a namespace or Service, and what they may call \
           (Istio AuthorizationPolicy semantics)."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The Services (of the policy's namespace) whose workloads the policy applies to, on
    /// those Services' target ports. Absent or empty: every workload of the namespace; in
    /// the root namespace `trellis-system`, every workload of the mesh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = SCHEMA_MAX_ITEMS))]
    pub target_refs: Vec<PolicyTargetRef>,
    /// `ALLOW` (default) or `DENY`. A matching DENY policy refuses a request; else, when
    /// ALLOW policies apply to the workload, one of them must match.
    #[serde(default)]
    pub action: PolicyAction,
    /// Evaluate the policy and log and count what it would refuse, without refusing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    // Defaulted by the API server too, so the Dry-run column reads `false`, not blank.
    #[schemars(extend("default" = false))]
    pub dry_run: bool,
    /// The policy matches a request when any rule does. Absent or empty: it matches
    /// nothing (an ALLOW policy without rules allows nothing).
    #[serde(default)]
    #[schemars(length(max = SCHEMA_MAX_ITEMS))]
    pub rules: Vec<PolicyRule>,
}

/// A Service the policy applies to (the Gateway API `LocalPolicyTargetReference` shape).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    /// API group of the target: `""` (core), the default.
    #[serde(default)]
    #[schemars(extend("enum" = [""]))]
    pub group: String,
    /// Kind of the target: `Service`.
    #[schemars(extend("enum" = ["Service"]))]
    pub kind: String,
    /// Name of the Service, in the policy's namespace.
    #[schemars(length(min = 1, max = SCHEMA_MAX_STRING))]
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
    #[schemars(length(max = SCHEMA_MAX_ITEMS))]
    pub from: Vec<PolicySource>,
    /// What is called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = SCHEMA_MAX_ITEMS))]
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
    #[schemars(length(max = SCHEMA_MAX_ITEMS))]
    #[schemars(inner(length(min = 1, max = SCHEMA_MAX_LONG_STRING), pattern(SCHEMA_PATTERN_REGEX)))]
    pub principals: Vec<String>,
    /// Namespaces of the caller's identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = SCHEMA_MAX_ITEMS))]
    #[schemars(inner(length(min = 1, max = SCHEMA_MAX_STRING), pattern(SCHEMA_PATTERN_REGEX)))]
    pub namespaces: Vec<String>,
    /// Service accounts: `name` (in the policy's namespace) or `namespace/name`; exact
    /// names, no patterns. Shorthand for principals in the mesh's trust domain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = SCHEMA_MAX_ITEMS))]
    #[schemars(inner(
        length(min = 1, max = SCHEMA_MAX_STRING),
        pattern(SCHEMA_SERVICE_ACCOUNT_REGEX)
    ))]
    pub service_accounts: Vec<String>,
}

/// What is called. Every list given must match (AND); within a list, any entry (OR).
/// `methods` and `paths` are HTTP-only: on an opaque TCP connection an ALLOW operation
/// naming them matches nothing and a DENY operation ignores them (it refuses the
/// connection), both the fail-closed reading.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyOperation {
    /// The workload's (target) ports, not the Service's: 1 to 65535.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "port_list_schema")]
    pub ports: Vec<u16>,
    /// HTTP methods, upper case (`GET`), or patterns (`*`). HTTP-only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = SCHEMA_MAX_ITEMS))]
    #[schemars(inner(length(min = 1, max = SCHEMA_MAX_STRING), pattern(SCHEMA_PATTERN_REGEX)))]
    pub methods: Vec<String>,
    /// Request paths, without the query: exact, `prefix*`, `*suffix` or `*`. HTTP-only.
    /// Matched after normalization: unreserved characters percent-decoded, `.` and `..`
    /// segments resolved, repeated slashes merged (`/a/./b//c` is `/a/b/c`). A request
    /// whose path holds an encoded slash (`%2F`) is refused when a policy names paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = SCHEMA_MAX_ITEMS))]
    #[schemars(inner(length(min = 1, max = SCHEMA_MAX_LONG_STRING), pattern(SCHEMA_PATTERN_REGEX)))]
    pub paths: Vec<String>,
}
