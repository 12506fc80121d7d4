//! Kubernetes objects (`k8s-openapi` types) to the controller's [`Objects`]: pure
//! functions, so that every rule is table-tested without a cluster.
//!
//! - **Namespace**: name and labels.
//! - **Service**: converted into the controller's own [`Service`] type and checked with
//!   [`Service::problems`], so the file source's rules apply (and the
//!   `trellis.dev/hostnames` annotation passes through unchanged). Ports whose protocol is
//!   not TCP are dropped first: the mesh carries TCP only, and on a cluster such ports
//!   (DNS over UDP, say) are normal rather than a mistake. An `ExternalName` Service, or
//!   one with only non-TCP ports, is not part of the mesh. Headless Services
//!   (`clusterIP: None`) are kept: they have endpoints but no virtual IP.
//! - **Pod**: a [`Workload`] with `address` = `status.podIP` and the service account
//!   `spec.serviceAccountName` (`default` when unset). Pods not yet scheduled, without an
//!   IP yet, or finished (phase `Succeeded`/`Failed`, whose IP may already belong to
//!   another Pod) are not part of the mesh.
//! - **EndpointSlice**: [`EndpointSlice`], for slices with address type `IPv4` or `IPv6`
//!   and a `kubernetes.io/service-name` label; `FQDN` slices and unlabelled ones are not
//!   the mesh's.
//! - **AuthorizationPolicy** (`policy.trellis.dev/v1alpha1`): watched as a
//!   [`RawPolicy`], whose `spec` is any JSON, so that one object the typed custom
//!   resource cannot deserialize (applied with `--validate=false` against an older CRD,
//!   written for a newer Trellis with an unknown field or action, a port out of range)
//!   fails neither the list nor the watch of every policy. Each becomes a [`Policy`] on
//!   its own ([`Policy::from_json_spec`]) with the object's name, namespace, labels and
//!   annotations: its `spec` as is when it parses, else a fail-closed stand-in carrying
//!   the parse error. It is never skipped for what its spec says: leaving out a policy
//!   could open access, so one with problems ([`Policy::problems`], parse errors first)
//!   goes to the translator, which enforces it fail-closed.
//! - **HTTPRoute** (`gateway.networking.k8s.io/v1`, the Gateway API's): watched as a
//!   [`RawRoute`] for the same reason (a field of a newer Gateway API, or of its
//!   experimental channel, must not fail every route), and each becomes a [`Route`] on
//!   its own ([`Route::from_json_spec`]). A route without a Service parent is a Gateway's,
//!   not the mesh's: [`Skip::Ignored`]. A mesh route with problems is kept here and left
//!   out by the translator ([`trellis_controller::InvalidRoutes`] reports it), so its
//!   Services are served as if it did not exist.
//!
//! Each conversion returns a [`Skip`] for an object it leaves out: [`Skip::Ignored`] for
//! objects that are simply not part of the mesh (logged at debug), [`Skip::Invalid`] for
//! objects the controller refuses (logged as a warning). Either way only that object is
//! left out.
//!
//! The `strip_*` functions drop what none of this reads before an object is stored.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta as KubeMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString as KubeIntOrString;
use kube::Resource;
use serde::Deserialize;
use trellis_controller::httproute::{
    GATEWAY_GROUP, HTTP_ROUTE_KIND, HTTP_ROUTE_PLURAL, HTTP_ROUTE_VERSION,
};
use trellis_controller::objects::{
    self, EndpointPort, EndpointSlice, IntOrString, ObjectMeta, SERVICE_NAME_LABEL, Service,
    ServicePort, ServiceSpec, SliceEndpoint, Workload, WorkloadSpec,
};
use trellis_controller::policy::AuthorizationPolicy;
use trellis_controller::{EndpointSource, ObjectKey, Objects, Policy, Route};

use crate::Kind;

/// Annotation `kubectl apply` writes: a full copy of the object, never read here.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// Annotations kept on Services: the mesh's own.
const MESH_ANNOTATION_PREFIX: &str = "trellis.dev/";

/// A `policy.trellis.dev/v1alpha1` AuthorizationPolicy as the API server sends it, its
/// `spec` not yet parsed: what the source watches and stores, so that every object
/// deserializes whatever its spec holds. [`policy`] parses each one on its own.
///
/// The resource (group, version, kind, plural, scope) is the custom resource type's,
/// [`AuthorizationPolicy`], so both always name the same API.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RawPolicy {
    /// The object's metadata.
    pub metadata: KubeMeta,
    /// The object's `spec`, any JSON; `null` when absent.
    #[serde(default)]
    pub spec: serde_json::Value,
}

impl Resource for RawPolicy {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind((): &()) -> Cow<'_, str> {
        AuthorizationPolicy::kind(&())
    }

    fn group((): &()) -> Cow<'_, str> {
        AuthorizationPolicy::group(&())
    }

    fn version((): &()) -> Cow<'_, str> {
        AuthorizationPolicy::version(&())
    }

    fn plural((): &()) -> Cow<'_, str> {
        AuthorizationPolicy::plural(&())
    }

    fn meta(&self) -> &KubeMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut KubeMeta {
        &mut self.metadata
    }
}

/// A `gateway.networking.k8s.io/v1` HTTPRoute as the API server sends it, its `spec` not
/// yet parsed: what the source watches and stores. [`route`] parses each one on its own.
/// Its `status` is kept as JSON for the leader's route status writer
/// ([`crate::route_status`]), which compares its own entries with what is there; the
/// snapshot never reads it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RawRoute {
    /// The object's metadata.
    pub metadata: KubeMeta,
    /// The object's `spec`, any JSON; `null` when absent.
    #[serde(default)]
    pub spec: serde_json::Value,
    /// The object's `status` (`parents`, one entry per parent and controller), any JSON;
    /// `null` when absent.
    #[serde(default)]
    pub status: serde_json::Value,
}

impl Resource for RawRoute {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind((): &()) -> Cow<'_, str> {
        Cow::Borrowed(HTTP_ROUTE_KIND)
    }

    fn group((): &()) -> Cow<'_, str> {
        Cow::Borrowed(GATEWAY_GROUP)
    }

    fn version((): &()) -> Cow<'_, str> {
        Cow::Borrowed(HTTP_ROUTE_VERSION)
    }

    fn plural((): &()) -> Cow<'_, str> {
        Cow::Borrowed(HTTP_ROUTE_PLURAL)
    }

    fn meta(&self) -> &KubeMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut KubeMeta {
        &mut self.metadata
    }
}

/// Why an object was left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Not part of the mesh, as expected (a Pod without an IP, an `ExternalName` Service).
    Ignored(String),
    /// Refused: the controller cannot represent it (the reason says why).
    Invalid(String),
}

/// An object left out of [`Objects`], with its kind and `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its kind.
    pub kind: Kind,
    /// `namespace/name` (just `name` for a Namespace).
    pub key: String,
    /// Why.
    pub skip: Skip,
}

/// The result of converting a cluster's objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Converted {
    /// What the translator gets; `endpoint_source` is
    /// [`EndpointSource::EndpointSlices`].
    pub objects: Objects,
    /// What was left out, in kind order, then the order given.
    pub skipped: Vec<Skipped>,
}

/// Converts every object of a cluster; see the module docs for the rules.
pub fn objects<'a>(
    namespaces: impl IntoIterator<Item = &'a core::Namespace>,
    services: impl IntoIterator<Item = &'a core::Service>,
    slices: impl IntoIterator<Item = &'a discovery::EndpointSlice>,
    pods: impl IntoIterator<Item = &'a core::Pod>,
    policies: impl IntoIterator<Item = &'a RawPolicy>,
    routes: impl IntoIterator<Item = &'a RawRoute>,
) -> Converted {
    let mut out = Converted {
        objects: Objects {
            endpoint_source: EndpointSource::EndpointSlices,
            ..Objects::default()
        },
        skipped: Vec::new(),
    };
    for ns in namespaces {
        match namespace(ns) {
            Ok(ns) => {
                out.objects.namespaces.insert(ns.name.clone(), ns);
            }
            Err(skip) => out.skip(Kind::Namespace, &ns.metadata, skip),
        }
    }
    for svc in services {
        match service(svc) {
            Ok(svc) => {
                out.objects.services.insert(svc.metadata.key(), svc);
            }
            Err(skip) => out.skip(Kind::Service, &svc.metadata, skip),
        }
    }
    for slice in slices {
        match endpoint_slice(slice) {
            Ok(slice) => {
                out.objects.endpoint_slices.insert(slice.key(), slice);
            }
            Err(skip) => out.skip(Kind::EndpointSlice, &slice.metadata, skip),
        }
    }
    for p in pods {
        match pod(p) {
            Ok(w) => {
                out.objects.workloads.insert(w.metadata.key(), w);
            }
            Err(skip) => out.skip(Kind::Pod, &p.metadata, skip),
        }
    }
    for p in policies {
        match policy(p) {
            Ok(p) => {
                out.objects.policies.insert(p.metadata.key(), p);
            }
            Err(skip) => out.skip(Kind::AuthorizationPolicy, &p.metadata, skip),
        }
    }
    for r in routes {
        match route(r) {
            Ok(r) => {
                out.objects.routes.insert(r.metadata.key(), r);
            }
            Err(skip) => out.skip(Kind::HttpRoute, &r.metadata, skip),
        }
    }
    out
}

/// An HTTPRoute as the controller's [`Route`] when it is the mesh's (a Service parent);
/// kept with its problems, if any, for the translator to leave out and report. A
/// Gateway's route is [`Skip::Ignored`]; an object without a name or namespace (which the
/// API server never sends) is refused.
pub fn route(r: &RawRoute) -> Result<Route, Skip> {
    let metadata = ObjectMeta {
        labels: r.metadata.labels.clone().unwrap_or_default(),
        ..meta(&r.metadata)?
    };
    let route = Route::from_json_spec(metadata, &r.spec);
    if !route.is_mesh() {
        // The classic slip: `kind: Service` without `group: ""` names a Gateway API kind.
        let hint = if route.spec.parent_refs.iter().any(|p| p.kind == "Service") {
            " (a parentRef of kind Service needs group \"\": without it the group is \
             gateway.networking.k8s.io)"
        } else {
            ""
        };
        return Err(Skip::Ignored(format!(
            "no Service parent: a Gateway's route, not the mesh's{hint}"
        )));
    }
    Ok(route)
}

/// An AuthorizationPolicy as the controller's [`Policy`], fail-closed with its parse
/// error when its spec does not parse ([`Policy::from_json_spec`]); only an object
/// without a name or namespace (which the API server never sends) is refused.
pub fn policy(p: &RawPolicy) -> Result<Policy, Skip> {
    let metadata = meta(&p.metadata)?;
    let metadata = ObjectMeta {
        labels: p.metadata.labels.clone().unwrap_or_default(),
        annotations: p.metadata.annotations.clone().unwrap_or_default(),
        ..metadata
    };
    Ok(Policy::from_json_spec(metadata, &p.spec))
}

/// A Namespace: its name and labels.
pub fn namespace(ns: &core::Namespace) -> Result<objects::Namespace, Skip> {
    let Some(name) = ns.metadata.name.clone() else {
        return Err(Skip::Invalid("no metadata.name".to_owned()));
    };
    Ok(objects::Namespace {
        name,
        labels: ns.metadata.labels.clone().unwrap_or_default(),
    })
}

/// A Service, checked by the file source's rules.
pub fn service(svc: &core::Service) -> Result<Service, Skip> {
    let mut metadata = meta(&svc.metadata)?;
    metadata.annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let empty = core::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&empty);
    if spec.type_.as_deref() == Some("ExternalName") {
        return Err(Skip::Ignored(
            "type ExternalName: a DNS alias, not meshed".to_owned(),
        ));
    }
    let all_ports = spec.ports.as_deref().unwrap_or_default();
    let ports: Vec<ServicePort> = all_ports
        .iter()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .map(|p| ServicePort {
            name: p.name.clone(),
            port: p.port,
            target_port: p.target_port.as_ref().map(|t| match t {
                KubeIntOrString::Int(n) => IntOrString::Int(*n),
                KubeIntOrString::String(s) => IntOrString::String(s.clone()),
            }),
            protocol: p.protocol.clone(),
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    if ports.is_empty() && !all_ports.is_empty() {
        return Err(Skip::Ignored(
            "no TCP ports: the mesh carries TCP only".to_owned(),
        ));
    }
    let svc = Service {
        metadata,
        spec: ServiceSpec {
            service_type: spec.type_.clone(),
            cluster_ip: spec.cluster_ip.clone(),
            cluster_ips: spec.cluster_ips.clone().unwrap_or_default(),
            selector: spec.selector.clone().unwrap_or_default(),
            ports,
        },
    };
    invalid_if(svc.problems())?;
    Ok(svc)
}

/// A Pod as a Workload with its pod IP, or why it is not (yet) part of the mesh.
pub fn pod(pod: &core::Pod) -> Result<Workload, Skip> {
    let metadata = meta(&pod.metadata)?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if let Some(phase @ ("Succeeded" | "Failed")) = status.and_then(|s| s.phase.as_deref()) {
        return Err(Skip::Ignored(format!("phase {phase}: finished")));
    }
    if spec
        .and_then(|s| s.node_name.as_deref())
        .is_none_or(str::is_empty)
    {
        return Err(Skip::Ignored("not scheduled yet".to_owned()));
    }
    let Some(ip) = status
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
    else {
        return Err(Skip::Ignored("no pod IP yet".to_owned()));
    };
    let address: IpAddr = ip
        .parse()
        .map_err(|_| Skip::Invalid(format!("status.podIP: {ip:?} is not an IP address")))?;
    // `serviceAccount` is the deprecated alias Kubernetes still fills in.
    let service_account = spec
        .and_then(|s| {
            s.service_account_name
                .as_ref()
                .or(s.service_account.as_ref())
        })
        .filter(|sa| !sa.is_empty())
        .cloned()
        .unwrap_or_else(|| "default".to_owned());
    let w = Workload {
        metadata: ObjectMeta {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ..metadata
        },
        spec: WorkloadSpec {
            service_account,
            mesh_address: None,
            address: Some(address),
        },
    };
    // A Pod name is a DNS-1123 subdomain (dots allowed), wider than the label a Workload
    // document must use; it is only a display name here, so that one rule is not applied.
    invalid_if(
        w.problems()
            .into_iter()
            .filter(|p| !p.starts_with("metadata.name:"))
            .collect(),
    )?;
    Ok(w)
}

/// An EndpointSlice of IP addresses that belongs to a Service.
pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<EndpointSlice, Skip> {
    let metadata = meta(&slice.metadata)?;
    match slice.address_type.as_str() {
        "IPv4" | "IPv6" => {}
        other => {
            return Err(Skip::Ignored(format!(
                "address type {other}: not IP addresses"
            )));
        }
    }
    let Some(service_name) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
    else {
        return Err(Skip::Ignored(format!(
            "no {SERVICE_NAME_LABEL} label: not a Service's"
        )));
    };
    let ports = slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| EndpointPort {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.clone(),
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let addresses = ep
            .addresses
            .iter()
            .map(|a| {
                a.parse::<IpAddr>().map_err(|_| {
                    Skip::Invalid(format!(
                        "endpoints[{i}].addresses: {a:?} is not an IP address"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let conditions = ep.conditions.as_ref();
        // Only a Pod in the slice's own namespace can be looked up for an identity.
        let target_pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .filter(|r| {
                r.namespace
                    .as_deref()
                    .is_none_or(|ns| ns == metadata.namespace)
            })
            .and_then(|r| r.name.clone());
        endpoints.push(SliceEndpoint {
            addresses,
            ready: conditions.and_then(|c| c.ready),
            serving: conditions.and_then(|c| c.serving),
            terminating: conditions.and_then(|c| c.terminating),
            target_pod,
            zone: ep.zone.clone(),
            node: ep.node_name.clone(),
        });
    }
    Ok(EndpointSlice {
        namespace: metadata.namespace,
        name: metadata.name,
        service_name: Some(service_name),
        ports,
        endpoints,
    })
}

/// The mesh ConfigMap as the app parses it: its `data`, and the names of its
/// `binaryData` keys, which Trellis never reads and refuses by name (so that a setting put
/// there by mistake is reported instead of silently ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigMapData {
    /// `data` (empty when it has none).
    pub data: BTreeMap<String, String>,
    /// The keys of `binaryData`, sorted.
    pub binary_keys: Vec<String>,
}

/// The mesh ConfigMap's `data` and `binaryData` keys.
pub fn config_data(cm: &core::ConfigMap) -> ConfigMapData {
    ConfigMapData {
        data: cm.data.clone().unwrap_or_default(),
        binary_keys: cm
            .binary_data
            .as_ref()
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default(),
    }
}

// Memory: a reflector keeps every object of its kind for as long as the process runs, so
// what no conversion reads is dropped before storing. On a Pod that is nearly everything
// (containers, volumes, conditions, container statuses), typically over 90% of it.

/// Drops what no kind's conversion reads from `meta`: managed fields (often the largest
/// part of an object), owner references, finalizers and kubectl's last-applied copy.
fn strip_meta(meta: &mut KubeMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED_ANNOTATION);
    }
}

/// Keeps a Namespace's name and labels.
pub(crate) fn strip_namespace(ns: &mut core::Namespace) {
    strip_meta(&mut ns.metadata);
    ns.metadata.annotations = None;
    ns.spec = None;
    ns.status = None;
}

/// Keeps a Service's spec and its `trellis.dev/` annotations.
pub(crate) fn strip_service(svc: &mut core::Service) {
    strip_meta(&mut svc.metadata);
    if let Some(annotations) = &mut svc.metadata.annotations {
        annotations.retain(|k, _| k.starts_with(MESH_ANNOTATION_PREFIX));
    }
    svc.status = None;
}

/// Keeps a slice's ports and its endpoints' addresses, conditions, targets, zones, nodes.
pub(crate) fn strip_endpoint_slice(slice: &mut discovery::EndpointSlice) {
    strip_meta(&mut slice.metadata);
    slice.metadata.annotations = None;
    for ep in &mut slice.endpoints {
        ep.hints = None;
        ep.deprecated_topology = None;
        ep.hostname = None;
        if let Some(target) = &mut ep.target_ref {
            target.uid = None;
            target.resource_version = None;
            target.field_path = None;
        }
    }
}

/// Keeps a Pod's labels, node, service account, phase and IPs.
pub(crate) fn strip_pod(pod: &mut core::Pod) {
    strip_meta(&mut pod.metadata);
    pod.metadata.annotations = None;
    pod.spec = pod.spec.take().map(|s| core::PodSpec {
        node_name: s.node_name,
        service_account_name: s.service_account_name,
        service_account: s.service_account,
        ..core::PodSpec::default()
    });
    pod.status = pod.status.take().map(|s| core::PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        ..core::PodStatus::default()
    });
}

/// Keeps a policy's name, namespace, labels, annotations (but kubectl's copy) and spec.
pub(crate) fn strip_policy(p: &mut RawPolicy) {
    strip_meta(&mut p.metadata);
}

/// Keeps a route's name, namespace, generation, labels, spec and status.
pub(crate) fn strip_route(r: &mut RawRoute) {
    strip_meta(&mut r.metadata);
    r.metadata.annotations = None;
}

/// Keeps a ConfigMap's `data`.
pub(crate) fn strip_config_map(cm: &mut core::ConfigMap) {
    strip_meta(&mut cm.metadata);
    cm.metadata.annotations = None;
    // Only the keys are read (to refuse them by name); the bytes can be large.
    cm.binary_data = cm.binary_data.take().map(|b| {
        b.into_keys()
            .map(|k| (k, k8s_openapi::ByteString(Vec::new())))
            .collect()
    });
}

/// Name and namespace (required), without labels or annotations.
fn meta(meta: &KubeMeta) -> Result<ObjectMeta, Skip> {
    let (Some(name), Some(namespace)) = (&meta.name, &meta.namespace) else {
        return Err(Skip::Invalid(
            "metadata.name and metadata.namespace are required".to_owned(),
        ));
    };
    Ok(ObjectMeta {
        name: name.clone(),
        namespace: namespace.clone(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    })
}

fn invalid_if(problems: Vec<String>) -> Result<(), Skip> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Skip::Invalid(problems.join("; ")))
    }
}

// === impl Converted ===

impl Converted {
    fn skip(&mut self, kind: Kind, meta: &KubeMeta, skip: Skip) {
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        let key = match &meta.namespace {
            Some(ns) => ObjectKey::new(ns, name).to_string(),
            None => name.to_owned(),
        };
        self.skipped.push(Skipped { kind, key, skip });
    }
}

// === impl Skip ===

impl Skip {
    /// The reason, whichever the variant.
    pub fn reason(&self) -> &str {
        match self {
            Skip::Ignored(r) | Skip::Invalid(r) => r,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
