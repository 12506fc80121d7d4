//! The object kinds the file source accepts, as typed values.
//!
//! Two kinds, written exactly as they would be applied to Kubernetes:
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
//! The types deserialize with `deny_unknown_fields`; checks that serde cannot express
//! (ranges, name syntax, duplicates) live in `validate` and `files`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};

/// `apiVersion` of the Service kind.
pub const SERVICE_API_VERSION: &str = "v1";
/// `apiVersion` of the Workload kind.
pub const WORKLOAD_API_VERSION: &str = "local.trellis.dev/v1alpha1";
/// Service annotation listing extra host names, comma-separated.
pub const HOSTNAMES_ANNOTATION: &str = "trellis.dev/hostnames";

/// Every object of a directory (or, later, of a cluster), keyed by namespace and name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Objects {
    /// Services by namespace and name.
    pub services: BTreeMap<ObjectKey, Service>,
    /// Workloads by namespace and name.
    pub workloads: BTreeMap<ObjectKey, Workload>,
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

// === impl ObjectMeta ===

impl ObjectMeta {
    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
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

// === impl WorkloadDocument ===

impl From<WorkloadDocument> for Workload {
    fn from(doc: WorkloadDocument) -> Self {
        Self {
            metadata: doc.metadata,
            spec: doc.spec,
        }
    }
}
