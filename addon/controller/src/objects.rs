//! The objects the controller translates, as typed values, from either source.
//!
//! Two sources fill [`Objects`]:
//!
//! - **The file source** (local profile, [`crate::load_dir`]): Services, Workloads and
//!   AuthorizationPolicies written as YAML. Endpoints come from selectors
//!   ([`EndpointSource::Selectors`]).
//! - **The Kubernetes source** (crate `trellis-kube`): Namespaces, Services,
//!   `discovery.k8s.io/v1` EndpointSlices (as [`EndpointSlice`]), Pods (as [`Workload`]s
//!   with `address` = the pod IP and the pod's service account) and
//!   `policy.trellis.dev/v1alpha1` AuthorizationPolicies (as [`Policy`]s) and
//!   `gateway.networking.k8s.io/v1` HTTPRoutes (as [`Route`]s). Endpoints come
//!   from the slices ([`EndpointSource::EndpointSlices`]); a Workload only gives an
//!   endpoint its identity and labels. It converts its objects into these types and checks
//!   Services and Workloads with [`Service::problems`] and [`Workload::problems`], the file
//!   source's rules, so an object one source refuses the other refuses too. Policies are
//!   checked with [`Policy::problems`] by both too, but a policy is never left out: one
//!   with problems is translated fail-closed (leaving it out could open access). Routes
//!   are checked with [`Route::problems`] by both; one with problems is left out (the
//!   Kubernetes source) or refuses the directory (the file source).
//!
//! The file source accepts four kinds, written exactly as they would be applied to
//! Kubernetes:
//!
//! - `v1` **Service**: the subset of the Kubernetes Service the mesh uses. `metadata` takes
//!   `name`, `namespace` (default `default`), `labels` and `annotations`; `spec` takes
//!   `type`, `clusterIP`, `clusterIPs`, `selector` and `ports` (`name`, `port`,
//!   `targetPort`, `protocol`, `appProtocol`). Any other field is an error, except a
//!   top-level `status`, which is ignored so that `kubectl get -o yaml` output loads. The
//!   annotation `trellis.dev/hostnames: "a.example,b"` adds host names the service answers
//!   to. `clusterIP` and `clusterIPs` (IPv4 or IPv6; `None` or empty: none) are the
//!   service's virtual IPs, which only proxies resolve: a captured connection to
//!   `<cluster IP>:<port>` goes to the service. As in Kubernetes, when both are set
//!   `clusterIP` must be `clusterIPs[0]`; no address may repeat, within a Service or
//!   across Services.
//! - `local.trellis.dev/v1alpha1` **Workload**: stands in for a Pod in the local
//!   (no-Kubernetes) profile, one per proxy process. Its labels are matched by Service
//!   selectors as a Pod's would be; `spec.serviceAccount` (default `default`) names its
//!   identity. `spec` takes exactly one of two addresses, by how its proxy receives
//!   traffic, and no two Workloads may share one:
//!   - `meshAddress: <ip:port>` (explicit mode): where its proxy accepts mTLS; the
//!     endpoint address for every port of every Service selecting it.
//!   - `address: <pod IP>` (IPv4 or IPv6; transparent capture): its proxy captures the
//!     traffic sent to the pod, so a selecting Service's port has the endpoint
//!     `<address>:<targetPort>` (`port` when `targetPort` is absent). A named
//!     `targetPort` is an error for such a Service: there are no Pod container ports to
//!     resolve it against.
//!
//! ```yaml
//! # Explicit mode: apps send to the proxy, which accepts mTLS on its own port.
//! apiVersion: local.trellis.dev/v1alpha1
//! kind: Workload
//! metadata:
//!   name: web-1
//!   namespace: demo
//!   labels:
//!     app: web
//! spec:
//!   serviceAccount: web           # identity spiffe://<trust-domain>/ns/demo/sa/web
//!   meshAddress: 127.0.0.1:16011  # where web-1's proxy accepts mTLS
//! ---
//! # Transparent capture: endpoints are <pod IP>:<targetPort>, e.g. 10.244.0.12:8080 for
//! # a Service port {port: 80, targetPort: 8080} selecting app=api.
//! apiVersion: local.trellis.dev/v1alpha1
//! kind: Workload
//! metadata:
//!   name: api-1
//!   namespace: demo
//!   labels:
//!     app: api
//! spec:
//!   serviceAccount: api
//!   address: 10.244.0.12          # the pod IP; IPv6 works too, e.g. fd00:10:244::12
//! ```
//!
//! - `policy.trellis.dev/v1alpha1` **AuthorizationPolicy** (as [`Policy`]): who may call
//!   the workloads of its namespace, or of the Services its `spec.targetRefs` name, and
//!   what they may call; the custom resource of [`crate::policy`], whose docs show the
//!   `spec`. `metadata` is as for a Service. The Kubernetes source converts the custom
//!   resource into the same type, and both sources check it with [`Policy::problems`]: the
//!   file source refuses the directory, while a policy from Kubernetes with problems is
//!   still translated, fail-closed (see [`crate::translate`]). From Kubernetes even a
//!   `spec` that does not parse (a field of a newer Trellis, a port out of range) becomes
//!   a [`Policy`] ([`Policy::from_json_spec`]): a fail-closed stand-in carrying its
//!   [`SpecParseError`]s, which [`Policy::problems`] reports.
//!
//! ```yaml
//! apiVersion: policy.trellis.dev/v1alpha1
//! kind: AuthorizationPolicy
//! metadata:
//!   name: web-readers
//!   namespace: demo
//! spec:
//!   targetRefs: [{kind: Service, name: web}]
//!   rules:
//!     - from: [{serviceAccounts: [client]}]   # spiffe://<trust-domain>/ns/demo/sa/client
//!       to: [{methods: [GET]}]
//! ```
//!
//! - `gateway.networking.k8s.io/v1` **HTTPRoute** (as [`Route`]): the Gateway API's
//!   route; the mesh's when a parentRef is a Service (`group: ""`, `kind: Service`: the
//!   GAMMA pattern), else ignored (a Gateway's). The `spec` is upstream's, with its
//!   defaults ([`crate::httproute`]); `metadata` is as for a Service and a top-level
//!   `status` is ignored. What the mesh honours is checked by [`Route::problems`].
//!
//! ```yaml
//! apiVersion: gateway.networking.k8s.io/v1
//! kind: HTTPRoute
//! metadata:
//!   name: web-canary
//!   namespace: demo
//! spec:
//!   parentRefs: [{group: "", kind: Service, name: web, port: 80}]
//!   rules:
//!     - backendRefs:
//!         - {name: web-v1, port: 80, weight: 90}
//!         - {name: web-v2, port: 80, weight: 10}
//! ```
//!
//! The types deserialize with `deny_unknown_fields`; checks that serde cannot express
//! (ranges, name syntax, duplicates) live in `validate` and `files`. The Kubernetes-only
//! types ([`Namespace`], [`EndpointSlice`]) are built by that source's conversion, never
//! parsed from YAML.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};

use crate::httproute::{HttpRouteSpec, ParentReference};
use crate::policy::AuthorizationPolicySpec;

/// `apiVersion` of the Service kind.
pub const SERVICE_API_VERSION: &str = "v1";
/// `apiVersion` of the Workload kind.
pub const WORKLOAD_API_VERSION: &str = "local.trellis.dev/v1alpha1";
/// `apiVersion` of the HTTPRoute kind.
pub use crate::httproute::HTTP_ROUTE_API_VERSION;
/// `apiVersion` of the AuthorizationPolicy kind.
pub use crate::policy::POLICY_API_VERSION;
/// Service annotation listing extra host names, comma-separated.
pub const HOSTNAMES_ANNOTATION: &str = "trellis.dev/hostnames";

/// Label of an EndpointSlice naming the Service it belongs to (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Endpoint label carrying an EndpointSlice endpoint's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Every object of a directory or of a cluster, keyed by namespace and name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Objects {
    /// Services by namespace and name.
    pub services: BTreeMap<ObjectKey, Service>,
    /// Workloads (file source) or Pods (Kubernetes) by namespace and name.
    pub workloads: BTreeMap<ObjectKey, Workload>,
    /// Namespaces by name, with their labels (Kubernetes only; empty for the file source).
    pub namespaces: BTreeMap<String, Namespace>,
    /// EndpointSlices by namespace and name (Kubernetes only; empty for the file source).
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// AuthorizationPolicies by namespace and name.
    pub policies: BTreeMap<ObjectKey, Policy>,
    /// HTTPRoutes by namespace and name: the mesh's (with a Service parent) and, from
    /// Kubernetes, never a Gateway's only (the source leaves those out).
    pub routes: BTreeMap<ObjectKey, Route>,
    /// Where Services' endpoints come from.
    pub endpoint_source: EndpointSource,
}

/// Where the translator takes a Service's endpoints from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EndpointSource {
    /// The Workloads its selector matches (the file source, where nothing else computes
    /// endpoints).
    #[default]
    Selectors,
    /// The EndpointSlices labelled [`SERVICE_NAME_LABEL`] = its name (Kubernetes, whose
    /// endpoint controller already applied selectors, readiness and named target ports).
    EndpointSlices,
}

/// A Namespace: its name and labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// The part of a `discovery.k8s.io/v1` EndpointSlice the mesh uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Namespace (that of its Service too).
    pub namespace: String,
    /// Name of the slice itself.
    pub name: String,
    /// The Service it belongs to: its [`SERVICE_NAME_LABEL`] label.
    pub service_name: Option<String>,
    /// Ports every endpoint of the slice serves.
    pub ports: Vec<EndpointPort>,
    /// The endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// One port of an EndpointSlice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPort {
    /// The Service port's name; `None` and `""` both mean the unnamed port.
    pub name: Option<String>,
    /// The port the endpoints listen on (the Service's target port, resolved).
    pub port: Option<i32>,
    /// Transport protocol (`TCP`, `UDP`, `SCTP`).
    pub protocol: Option<String>,
    /// Application protocol.
    pub app_protocol: Option<String>,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its addresses (one per family the slice holds, in practice one).
    pub addresses: Vec<IpAddr>,
    /// Ready for traffic; `None` means ready (Kubernetes semantics).
    pub ready: Option<bool>,
    /// Serving (may be terminating).
    pub serving: Option<bool>,
    /// Terminating.
    pub terminating: Option<bool>,
    /// The Pod behind it: `targetRef.name` when `targetRef.kind` is `Pod`.
    pub target_pod: Option<String>,
    /// Zone, from `zone`.
    pub zone: Option<String>,
    /// Node, from `nodeName`.
    pub node: Option<String>,
}

/// Namespace and name of an object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name within the namespace.
    pub name: String,
}

/// The `metadata` both kinds share.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectMeta {
    /// Object name: a DNS-1123 label.
    pub name: String,
    /// Namespace: a DNS-1123 label, `default` when absent.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Labels, matched by Service selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations; see [`HOSTNAMES_ANNOTATION`].
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A `v1` Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Name, namespace, labels, annotations.
    pub metadata: ObjectMeta,
    /// The service's selector and ports.
    pub spec: ServiceSpec,
}

/// The accepted part of a Service's `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP` (default), `NodePort` or `LoadBalancer`.
    #[serde(default, rename = "type")]
    pub service_type: Option<String>,
    /// The first virtual IP: an IP address, `None` (headless), empty or absent.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// Every virtual IP (dual stack: one per family), or `["None"]` (headless); when
    /// `clusterIP` is set too, it is the first.
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// Labels a Workload must carry to serve this service; empty selects nothing.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Ports, in declaration order.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

/// One entry of a Service's `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name; its prefix (`http-`, `tcp-`, ...) hints the protocol.
    #[serde(default)]
    pub name: Option<String>,
    /// The port clients address, 1..=65535 (int32 in Kubernetes, checked on load).
    pub port: i32,
    /// The application's port, by number or by name.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    /// Transport protocol: only `TCP` is supported.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Application protocol (`http`, `grpc`, `tcp`, `kubernetes.io/h2c`, ...).
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A Kubernetes `IntOrString`, as used by `targetPort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntOrString {
    /// A port number.
    Int(i32),
    /// A named port.
    String(String),
}

/// A `local.trellis.dev/v1alpha1` Workload: one proxied process of the local profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Name, namespace and the labels selectors match.
    pub metadata: ObjectMeta,
    /// Identity and mesh address.
    pub spec: WorkloadSpec,
}

/// A Workload's `spec`.
///
/// Exactly one of `mesh_address` and `address` is set once validated; both are options
/// here so that a document with neither or both parses and gets an error naming `spec`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Service account the identity is issued for; `default` when absent.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Explicit mode: where this workload's proxy accepts mTLS, the endpoint address for
    /// every service port.
    #[serde(default, deserialize_with = "mesh_address")]
    pub mesh_address: Option<SocketAddr>,
    /// Transparent capture: the pod IP; endpoints are `<address>:<targetPort>`.
    #[serde(default, deserialize_with = "pod_address")]
    pub address: Option<IpAddr>,
}

/// A `policy.trellis.dev/v1alpha1` AuthorizationPolicy: its metadata and its `spec`, the
/// custom resource's own type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Name, namespace (where it applies), labels, annotations.
    pub metadata: ObjectMeta,
    /// Targets, action and rules, as written; when the written spec did not parse
    /// (`parse_errors` is not empty), the fail-closed stand-in of
    /// [`Policy::from_json_spec`] instead.
    pub spec: AuthorizationPolicySpec,
    /// Why the object's `spec` did not parse as an [`AuthorizationPolicySpec`] (a field of
    /// a newer Trellis, a port out of range, an unknown action); empty when it did. Only
    /// [`Policy::from_json_spec`] fills it. [`Policy::problems`] reports these first, so
    /// the policy counts as invalid and is translated fail-closed.
    pub parse_errors: Vec<SpecParseError>,
}

/// A `gateway.networking.k8s.io/v1` HTTPRoute: its metadata and its `spec`, upstream's
/// type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Name, namespace, labels, annotations.
    pub metadata: ObjectMeta,
    /// Parents and rules, as written (with upstream's defaults); when the written spec did
    /// not parse (`parse_errors` is not empty), only its parents, read leniently.
    pub spec: HttpRouteSpec,
    /// Why the object's `spec` did not parse as an [`HttpRouteSpec`]; empty when it did.
    /// Only [`Route::from_json_spec`] fills it; [`Route::problems`] reports it.
    pub parse_errors: Vec<SpecParseError>,
}

/// Why a policy's or route's `spec` did not deserialize, as serde said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecParseError {
    /// Path of the field that failed, e.g. `spec.rules[0].to[0].ports[1]`; `spec` when the
    /// spec as a whole is wrong (not an object, absent).
    pub field: String,
    /// What is wrong, e.g. ``invalid value: integer `70000`, expected u16``.
    pub message: String,
}

/// A whole `v1` Service document as written; converted into [`Service`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ServiceDocument {
    // Checked before this type is chosen; present so `deny_unknown_fields` accepts them.
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    metadata: ObjectMeta,
    spec: ServiceSpec,
    // Ignored so that objects exported from a cluster load unchanged.
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

/// A whole Workload document as written; converted into [`Workload`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct WorkloadDocument {
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    metadata: ObjectMeta,
    spec: WorkloadSpec,
}

/// A whole HTTPRoute document as written; its `spec` is parsed on its own
/// ([`Route::from_json_spec`]) so that a Gateway's route this version cannot parse is
/// ignored rather than refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RouteDocument {
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    metadata: ObjectMeta,
    spec: serde_json::Value,
    // Ignored so that objects exported from a cluster load unchanged.
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

/// A whole AuthorizationPolicy document as written; converted into [`Policy`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PolicyDocument {
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    metadata: ObjectMeta,
    spec: AuthorizationPolicySpec,
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// Parses `meshAddress` with a message that says what shape is expected.
fn mesh_address<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map(Some).map_err(|_| {
        de::Error::custom(format!(
            "invalid meshAddress {text:?}: expected ip:port, e.g. 127.0.0.1:16011"
        ))
    })
}

/// Parses a Workload's `address`; a port here is a common slip from `meshAddress`, so the
/// message shows the expected shape.
fn pod_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<IpAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map(Some).map_err(|_| {
        de::Error::custom(format!(
            "invalid address {text:?}: expected the pod's IP address without a port, \
             e.g. 10.244.0.12 or fd00:10:244::12"
        ))
    })
}

// === impl ObjectKey ===

impl ObjectKey {
    /// Builds a key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// === impl EndpointSlice ===

impl EndpointSlice {
    /// The slice's key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

// === impl SliceEndpoint ===

impl SliceEndpoint {
    /// Whether it takes traffic: `ready` is not `false` (unset means ready).
    pub fn is_ready(&self) -> bool {
        self.ready != Some(false)
    }
}

// === impl ObjectMeta ===

impl ObjectMeta {
    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }
}

// === impl Service ===

impl Service {
    /// What the file source would refuse in this Service, one `field: message` line per
    /// problem; empty when it is acceptable. Checks the object alone, not conflicts with
    /// others.
    pub fn problems(&self) -> Vec<String> {
        crate::validate::service(self)
            .into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }
}

// === impl Workload ===

impl Workload {
    /// What the file source would refuse in this Workload, one `field: message` line per
    /// problem; empty when it is acceptable. Checks the object alone, not conflicts with
    /// others.
    pub fn problems(&self) -> Vec<String> {
        crate::validate::workload(self)
            .into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }
}

// === impl Policy ===

impl Policy {
    /// A policy whose `spec` parsed: `parse_errors` empty.
    pub fn new(metadata: ObjectMeta, spec: AuthorizationPolicySpec) -> Self {
        Self {
            metadata,
            spec,
            parse_errors: Vec::new(),
        }
    }

    /// A policy from its `spec` as JSON (the Kubernetes source's form, which always
    /// deserializes); never fails, so that one malformed object is handled on its own.
    ///
    /// A spec that parses is kept as is. One that does not gets `parse_errors` (the serde
    /// error with its field path) and a fail-closed stand-in as `spec`: the targetRefs
    /// when every entry reads as `{group, kind, name}` strings (else none: the whole
    /// namespace); `action` ALLOW only when it reads `"ALLOW"` (else DENY: an unknown or
    /// unreadable action refuses); `dryRun` only when it reads `true`; no rules. The
    /// translator then enforces it as any invalid policy: an ALLOW that allows nothing, a
    /// DENY that refuses everything, on those targets.
    pub fn from_json_spec(metadata: ObjectMeta, spec: &serde_json::Value) -> Self {
        crate::authorization::from_json_spec(metadata, spec)
    }

    /// Every problem of this policy, one `field: message` line each (e.g.
    /// `spec.rules[0].from[1].serviceAccounts[0]: "a/b/c" is not <name> or
    /// <namespace>/<name>`); empty when it is acceptable. Both sources apply it: the file
    /// source refuses a directory holding a policy with problems, the Kubernetes source
    /// has such a policy translated fail-closed.
    pub fn problems(&self) -> Vec<String> {
        crate::authorization::problems(self)
            .into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }
}

// === impl Route ===

impl Route {
    /// A route whose `spec` parsed: `parse_errors` empty.
    pub fn new(metadata: ObjectMeta, spec: HttpRouteSpec) -> Self {
        Self {
            metadata,
            spec,
            parse_errors: Vec::new(),
        }
    }

    /// A route from its `spec` as JSON (the Kubernetes source's form, and the file
    /// source's after YAML); never fails, so that one malformed object is handled on its
    /// own. A spec that does not parse keeps only its parentRefs (read leniently, with
    /// upstream's defaults), to tell whose route it is, and the serde error with its field
    /// path in `parse_errors`.
    pub fn from_json_spec(metadata: ObjectMeta, spec: &serde_json::Value) -> Self {
        crate::routes::from_json_spec(metadata, spec)
    }

    /// Whether the route is the mesh's: one of its parentRefs is a Service (group `""` or
    /// `core`, kind `Service`). Routes of Gateways only are ignored.
    pub fn is_mesh(&self) -> bool {
        self.spec
            .parent_refs
            .iter()
            .any(ParentReference::is_service)
    }

    /// Every problem of this route, one `field: message` line each (e.g.
    /// `spec.rules[0].matches[1].path.type: RegularExpression is not supported; use Exact
    /// or PathPrefix`); empty when it is acceptable, and for a route that is not the
    /// mesh's ([`is_mesh`](Self::is_mesh)). The file source refuses a directory holding a
    /// route with problems; the Kubernetes source leaves the route out.
    pub fn problems(&self) -> Vec<String> {
        crate::routes::problems(self)
            .into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }
}

// === impl RouteDocument ===

impl From<RouteDocument> for Route {
    fn from(doc: RouteDocument) -> Self {
        Route::from_json_spec(doc.metadata, &doc.spec)
    }
}

// === impl ServiceSpec ===

impl ServiceSpec {
    /// The virtual IPs, each with the path of the field it was written in: `clusterIPs`
    /// when given (Kubernetes sets both, `clusterIP` being the first), else `clusterIP`.
    ///
    /// `None`, empty and unparsable values are skipped (validation reports the latter);
    /// duplicates are kept, so that callers can report or drop them.
    pub(crate) fn addresses(&self) -> Vec<(String, IpAddr)> {
        if self.cluster_ips.is_empty() {
            return self
                .cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse().ok())
                .map(|ip| ("spec.clusterIP".to_owned(), ip))
                .into_iter()
                .collect();
        }
        self.cluster_ips
            .iter()
            .enumerate()
            .filter_map(|(i, ip)| Some((format!("spec.clusterIPs[{i}]"), ip.parse().ok()?)))
            .collect()
    }
}

// === impl IntOrString ===

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A hand-written visitor rather than `#[serde(untagged)]`, whose error ("did not
        // match any variant") does not say what is expected.
        struct IntOrStringVisitor;

        impl Visitor<'_> for IntOrStringVisitor {
            type Value = IntOrString;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                i32::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i32::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_owned()))
            }
        }

        deserializer.deserialize_any(IntOrStringVisitor)
    }
}

// === impl ServiceDocument ===

impl From<ServiceDocument> for Service {
    fn from(doc: ServiceDocument) -> Self {
        Self {
            metadata: doc.metadata,
            spec: doc.spec,
        }
    }
}

// === impl PolicyDocument ===

impl From<PolicyDocument> for Policy {
    fn from(doc: PolicyDocument) -> Self {
        Self::new(doc.metadata, doc.spec)
    }
}

// === impl WorkloadDocument ===

impl From<WorkloadDocument> for Workload {
    fn from(doc: WorkloadDocument) -> Self {
        Self {
            metadata: doc.metadata,
            spec: doc.spec,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            namespace: "demo".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn problems_are_the_file_source_checks_as_lines() {
        let svc = Service {
            metadata: meta("Web"),
            spec: ServiceSpec {
                ports: vec![ServicePort {
                    name: None,
                    port: 80,
                    target_port: None,
                    protocol: Some("UDP".into()),
                    app_protocol: None,
                }],
                ..ServiceSpec::default()
            },
        };
        assert_eq!(
            svc.problems(),
            [
                "metadata.name: invalid name \"Web\": use lowercase letters, digits and '-', \
                 starting and ending with a letter or digit (a DNS-1123 label)",
                "spec.ports[0].protocol: protocol UDP is not supported: the mesh carries TCP only",
            ]
        );
        let ok = Workload {
            metadata: meta("web-1"),
            spec: WorkloadSpec {
                service_account: "web".into(),
                mesh_address: None,
                address: Some(IpAddr::from([10, 0, 0, 1])),
            },
        };
        assert_eq!(ok.problems(), Vec::<String>::new());
        let bad = Workload {
            spec: WorkloadSpec {
                service_account: "Web".into(),
                ..ok.spec.clone()
            },
            ..ok
        };
        assert_eq!(bad.problems().len(), 1, "{:?}", bad.problems());
        assert!(bad.problems()[0].starts_with("spec.serviceAccount: "));
    }

    #[test]
    fn slice_endpoints_are_ready_unless_ready_is_false() {
        for (ready, want) in [(None, true), (Some(true), true), (Some(false), false)] {
            let ep = SliceEndpoint {
                ready,
                ..SliceEndpoint::default()
            };
            assert_eq!(ep.is_ready(), want, "ready {ready:?}");
        }
    }
}
