//! The object kinds the file source accepts, as typed values.
//!
//! Two kinds, written exactly as they would be applied to Kubernetes:
//!
//! - `v1` **Service**: the subset of the Kubernetes Service the mesh uses. `metadata` takes
//!   `name`, `namespace` (default `default`), `labels` and `annotations`; `spec` takes
//!   `type`, `clusterIP`, `selector` and `ports` (`name`, `port`, `targetPort`, `protocol`,
//!   `appProtocol`). Any other field is an error, except a top-level `status`, which is
//!   ignored so that `kubectl get -o yaml` output loads. The annotation
//!   `trellis.dev/hostnames: "a.example,b"` adds host names the service answers to.
//! - `local.trellis.dev/v1alpha1` **Workload**: stands in for a Pod in the local
//!   (no-Kubernetes) profile, one per proxy process. Its labels are matched by Service
//!   selectors as a Pod's would be; `spec.serviceAccount` (default `default`) names its
//!   identity, and `spec.meshAddress` is the `ip:port` where its proxy accepts mTLS: the
//!   endpoint address for every port of every Service selecting it.
//!
//! ```yaml
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
//! ```
//!
//! The types deserialize with `deny_unknown_fields`; checks that serde cannot express
//! (ranges, name syntax, duplicates) live in `validate` and `files`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

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
    /// An IP address, `None` (headless) or absent; not used by the local profile.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Service account the identity is issued for; `default` when absent.
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Where this workload's proxy accepts mTLS.
    #[serde(deserialize_with = "mesh_address")]
    pub mesh_address: SocketAddr,
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
fn mesh_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| {
        de::Error::custom(format!(
            "invalid meshAddress {text:?}: expected ip:port, e.g. 127.0.0.1:16011"
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
