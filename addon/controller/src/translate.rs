//! Objects to snapshot: a pure function, shared by every source.
//!
//! The file source feeds it a directory's [`Objects`]; the Kubernetes source (crate
//! `trellis-kube`) feeds it a cluster's. Nothing here reads files, clocks or globals, so
//! the same objects always give the same snapshot.
//!
//! Rules:
//! - Endpoints depend on [`Objects::endpoint_source`]:
//!   - [`EndpointSource::Selectors`] (the file source): a Service's endpoints are the
//!     Workloads in its namespace whose labels contain its (non-empty) selector; a Service
//!     without a selector has none. Every port gets one endpoint per selected Workload, at
//!     the Workload's `meshAddress`, or for a Workload with `address` (transparent capture)
//!     at `<address>:<targetPort>` (`port` when `targetPort` is absent; a named
//!     `targetPort` cannot be resolved without Pod container ports, so that endpoint is
//!     left out).
//!   - [`EndpointSource::EndpointSlices`] (Kubernetes): a Service's endpoints come only
//!     from the EndpointSlices in its namespace labelled `kubernetes.io/service-name` =
//!     its name. For each Service port, a slice's port of the same name (unset and `""`
//!     are the same) gives the target port, so named `targetPort`s work: Kubernetes
//!     resolved them. Every ready endpoint (`ready` unset or `true`) yields one endpoint
//!     per address at `<address>:<slice port>`; its identity and labels are those of the
//!     Workload (the Pod) its `targetRef` names in the same namespace, plus
//!     `topology.kubernetes.io/zone` when the slice gives a zone. An endpoint whose Pod is
//!     unknown is left out with a warning: without an identity it cannot be verified. The
//!     same address in two slices counts once. Selectors are not looked at.
//!
//!   Either way an endpoint's identity is
//!   `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>` of its Workload, and a
//!   port's endpoints are sorted by workload name, then address.
//! - A Service's addresses are its `clusterIPs`, or else its `clusterIP`, in written order
//!   without duplicates; `None` (headless) gives none.
//! - A port's protocol comes from `appProtocol` when set, else from the port name's prefix
//!   (the part before the first `-`). `http`, `http2`, `h2c`, `grpc`, `grpc-web` and `ws`
//!   (optionally `kubernetes.io/`-prefixed) are HTTP; `tcp`, `tls`, `https` and `wss` are
//!   TCP. Other values differ by source: an unrecognised `appProtocol` is an explicit
//!   claim that the port is not HTTP we understand, so it is carried as opaque TCP; a port
//!   name without a known prefix says nothing, so it gets the HTTP default.
//! - Extra host names come from the `trellis.dev/hostnames` annotation, in written order,
//!   without duplicates.
//! - AuthorizationPolicies become `MeshSnapshot::authorization`, sorted by namespace and
//!   name, service accounts resolved to SPIFFE IDs; one with problems is translated
//!   fail-closed, never left out (see `crate::authorization`).
//! - HTTPRoutes with a Service parent (GAMMA) become `MeshSnapshot::routes`, sorted by
//!   namespace and name; one with problems is left out, as are routes of Gateways only
//!   (see `crate::routes`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use trellis_api::{Endpoint, MeshSnapshot, Protocol, ServiceKey};
use trellis_identity::SpiffeId;

use crate::objects::{
    EndpointSlice, EndpointSource, HOSTNAMES_ANNOTATION, IntOrString, ObjectKey, Objects, Service,
    ServicePort, Workload, ZONE_LABEL,
};
use crate::validate::split_hostnames;

/// Builds the snapshot for `objects` at `version`.
///
/// Objects are expected to be validated (as [`crate::load_dir`] does); an
/// AuthorizationPolicy with problems is translated fail-closed (report it with
/// [`crate::InvalidPolicies`]), an HTTPRoute with problems is left out (report it with
/// [`crate::InvalidRoutes`]), and anything else that still cannot be represented (a port outside 1..=65535, an identity that does not parse, e.g.
/// under an invalid trust domain, a pod address with a named targetPort, a slice endpoint
/// whose Pod is unknown) is left out with a warning rather than failing.
pub fn translate(objects: &Objects, trust_domain: &str, version: u64) -> MeshSnapshot {
    // Slices by the Service they name, built once rather than scanned per Service.
    let mut slices: HashMap<ObjectKey, Vec<&EndpointSlice>> = HashMap::new();
    if objects.endpoint_source == EndpointSource::EndpointSlices {
        for slice in objects.endpoint_slices.values() {
            if let Some(service) = &slice.service_name {
                slices
                    .entry(ObjectKey::new(&slice.namespace, service))
                    .or_default()
                    .push(slice);
            }
        }
    }
    let services = objects
        .services
        .values()
        .map(|svc| {
            let service = match objects.endpoint_source {
                EndpointSource::Selectors => service(svc, objects, trust_domain),
                EndpointSource::EndpointSlices => {
                    let own = slices
                        .get(&svc.metadata.key())
                        .map(Vec::as_slice)
                        .unwrap_or_default();
                    sliced_service(svc, own, objects, trust_domain)
                }
            };
            (service.key.clone(), service)
        })
        .collect();
    MeshSnapshot {
        version,
        trust_domain: trust_domain.to_owned(),
        services,
        authorization: crate::authorization::translate_policies(objects, trust_domain),
        routes: crate::routes::translate_routes(objects),
        ..Default::default()
    }
}

fn service(svc: &Service, objects: &Objects, trust_domain: &str) -> trellis_api::Service {
    let key = ServiceKey::new(&svc.metadata.namespace, &svc.metadata.name);
    // Identities once per workload (and one warning for a bad one), addresses per port:
    // a pod-address workload serves each port at its own target port.
    let members: Vec<(&Workload, String)> = objects
        .workloads
        .values()
        .filter(|w| selects(svc, w))
        .filter_map(|w| Some((w, identity(w, trust_domain)?)))
        .collect();
    let ports = svc
        .spec
        .ports
        .iter()
        .filter_map(|port| {
            let Some(number) = u16::try_from(port.port).ok().filter(|n| *n != 0) else {
                tracing::warn!(service = %key, port = port.port, "skipping out-of-range port");
                return None;
            };
            let mut endpoints: Vec<Endpoint> = members
                .iter()
                .filter_map(|(w, identity)| {
                    Some(Endpoint {
                        address: endpoint_address(&key, port, number, w)?,
                        identity: identity.clone(),
                        workload: w.metadata.name.clone(),
                        labels: w.metadata.labels.clone(),
                    })
                })
                .collect();
            endpoints.sort_by(|a, b| (&a.workload, a.address).cmp(&(&b.workload, b.address)));
            Some(trellis_api::ServicePort {
                name: port.name.clone().unwrap_or_default(),
                port: number,
                protocol: port_protocol(port),
                endpoints,
            })
        })
        .collect();
    assemble(key, svc, ports)
}

/// A Service's endpoints from its EndpointSlices (see the module docs).
fn sliced_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    objects: &Objects,
    trust_domain: &str,
) -> trellis_api::Service {
    let key = ServiceKey::new(&svc.metadata.namespace, &svc.metadata.name);
    // Each slice's ready endpoints resolved to a Workload once (one warning per unknown
    // Pod), then placed at each port's number in that slice.
    let members: Vec<(&EndpointSlice, Vec<SliceMember<'_>>)> = slices
        .iter()
        .map(|slice| (*slice, slice_members(&key, slice, objects, trust_domain)))
        .collect();
    let ports = svc
        .spec
        .ports
        .iter()
        .filter_map(|port| {
            let Some(number) = u16::try_from(port.port).ok().filter(|n| *n != 0) else {
                tracing::warn!(service = %key, port = port.port, "skipping out-of-range port");
                return None;
            };
            let name = port.name.as_deref().unwrap_or_default();
            let mut endpoints: Vec<Endpoint> = Vec::new();
            for (slice, members) in &members {
                let Some(slice_port) = slice
                    .ports
                    .iter()
                    .find(|p| p.name.as_deref().unwrap_or_default() == name)
                else {
                    continue;
                };
                let Some(target) = slice_port
                    .port
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n != 0)
                else {
                    tracing::warn!(
                        service = %key,
                        slice = %slice.key(),
                        port = ?slice_port.port,
                        "skipping slice port: no port number in 1..=65535"
                    );
                    continue;
                };
                for member in members {
                    endpoints.extend(member.addresses.iter().map(|ip| Endpoint {
                        address: SocketAddr::new(*ip, target),
                        identity: member.identity.clone(),
                        workload: member.workload.metadata.name.clone(),
                        labels: member.labels.clone(),
                    }));
                }
            }
            endpoints.sort_by(|a, b| (&a.workload, a.address).cmp(&(&b.workload, b.address)));
            // One endpoint per address: a Pod listed by two slices (as during a slice
            // handover) is still one backend.
            let mut seen = BTreeSet::new();
            endpoints.retain(|e| seen.insert(e.address));
            Some(trellis_api::ServicePort {
                name: port.name.clone().unwrap_or_default(),
                port: number,
                protocol: port_protocol(port),
                endpoints,
            })
        })
        .collect();
    assemble(key, svc, ports)
}

/// A ready slice endpoint with the Workload that gives it identity and labels.
struct SliceMember<'a> {
    workload: &'a Workload,
    identity: String,
    labels: BTreeMap<String, String>,
    addresses: &'a [IpAddr],
}

/// The ready endpoints of `slice` whose Pod is known and has a valid identity.
fn slice_members<'a>(
    key: &ServiceKey,
    slice: &'a EndpointSlice,
    objects: &'a Objects,
    trust_domain: &str,
) -> Vec<SliceMember<'a>> {
    slice
        .endpoints
        .iter()
        .filter(|ep| ep.is_ready())
        .filter_map(|ep| {
            let Some(pod) = &ep.target_pod else {
                tracing::warn!(
                    service = %key,
                    slice = %slice.key(),
                    addresses = ?ep.addresses,
                    "skipping endpoint: no Pod targetRef, so no identity"
                );
                return None;
            };
            let Some(workload) = objects
                .workloads
                .get(&ObjectKey::new(&slice.namespace, pod))
            else {
                tracing::warn!(
                    service = %key,
                    slice = %slice.key(),
                    %pod,
                    "skipping endpoint: unknown Pod, so no identity"
                );
                return None;
            };
            let identity = identity(workload, trust_domain)?;
            let mut labels = workload.metadata.labels.clone();
            if let Some(zone) = &ep.zone {
                labels.insert(ZONE_LABEL.to_owned(), zone.clone());
            }
            Some(SliceMember {
                workload,
                identity,
                labels,
                addresses: &ep.addresses,
            })
        })
        .collect()
}

/// The Service with its `ports`, addresses and host names.
fn assemble(
    key: ServiceKey,
    svc: &Service,
    ports: Vec<trellis_api::ServicePort>,
) -> trellis_api::Service {
    let mut addresses: Vec<IpAddr> = Vec::new();
    for (_, ip) in svc.spec.addresses() {
        if !addresses
            .iter()
            .any(|a| a.to_canonical() == ip.to_canonical())
        {
            addresses.push(ip);
        }
    }
    let mut hostnames: Vec<String> = Vec::new();
    if let Some(list) = svc.metadata.annotations.get(HOSTNAMES_ANNOTATION) {
        for host in split_hostnames(list) {
            if !hostnames.iter().any(|h| h == host) {
                hostnames.push(host.to_owned());
            }
        }
    }
    trellis_api::Service {
        key,
        hostnames,
        ports,
        addresses,
    }
}

/// Whether `svc` selects `w`: same namespace, non-empty selector contained in its labels.
pub(crate) fn selects(svc: &Service, w: &Workload) -> bool {
    let selector = &svc.spec.selector;
    w.metadata.namespace == svc.metadata.namespace
        && !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| w.metadata.labels.get(k) == Some(v))
}

/// The SPIFFE ID `w`'s endpoints must present; `None` (with a warning) if it does not parse.
fn identity(w: &Workload, trust_domain: &str) -> Option<String> {
    match SpiffeId::new(trust_domain, &w.metadata.namespace, &w.spec.service_account) {
        Ok(id) => Some(id.to_string()),
        Err(error) => {
            tracing::warn!(workload = %w.metadata.key(), %error, "skipping endpoint");
            None
        }
    }
}

/// Where `w` serves `port` (numbered `number`): its meshAddress, or its pod address at
/// the target port. `None` (with a warning) when that cannot be worked out.
fn endpoint_address(
    key: &ServiceKey,
    port: &ServicePort,
    number: u16,
    w: &Workload,
) -> Option<SocketAddr> {
    let workload = w.metadata.key();
    let ip = match (w.spec.mesh_address, w.spec.address) {
        (Some(mesh), None) => return Some(mesh),
        (None, Some(ip)) => ip,
        _ => {
            tracing::warn!(
                %workload,
                "skipping endpoint: needs exactly one of meshAddress and address"
            );
            return None;
        }
    };
    let target = match &port.target_port {
        None => number,
        Some(IntOrString::Int(n)) => {
            let Some(target) = u16::try_from(*n).ok().filter(|t| *t != 0) else {
                tracing::warn!(service = %key, %workload, target_port = n, "skipping endpoint: out-of-range targetPort");
                return None;
            };
            target
        }
        Some(IntOrString::String(name)) => {
            tracing::warn!(service = %key, %workload, target_port = %name, "skipping endpoint: a named targetPort needs Pod container ports");
            return None;
        }
    };
    Some(SocketAddr::new(ip, target))
}

/// The protocol of a Service port (see the module docs for the table).
pub(crate) fn port_protocol(port: &ServicePort) -> Protocol {
    if let Some(app) = &port.app_protocol {
        let app = app.to_ascii_lowercase();
        return match known_protocol(app.strip_prefix("kubernetes.io/").unwrap_or(&app)) {
            Some(p) => p,
            None => Protocol::Tcp,
        };
    }
    let name = port.name.as_deref().unwrap_or_default();
    let prefix = name.split('-').next().unwrap_or_default();
    known_protocol(prefix).unwrap_or(Protocol::Http)
}

fn known_protocol(name: &str) -> Option<Protocol> {
    match name {
        "http" | "http2" | "h2c" | "grpc" | "grpc-web" | "ws" => Some(Protocol::Http),
        "tcp" | "tls" | "https" | "wss" => Some(Protocol::Tcp),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::objects::{ObjectMeta, ServiceSpec, WorkloadSpec};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn meta(ns: &str, name: &str, l: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: name.into(),
            namespace: ns.into(),
            labels: labels(l),
            annotations: BTreeMap::new(),
        }
    }

    fn port(name: Option<&str>, app_protocol: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(Into::into),
            port: 80,
            target_port: None,
            protocol: None,
            app_protocol: app_protocol.map(Into::into),
        }
    }

    fn svc(ns: &str, name: &str, selector: &[(&str, &str)]) -> Service {
        Service {
            metadata: meta(ns, name, &[]),
            spec: ServiceSpec {
                selector: labels(selector),
                ports: vec![port(Some("http"), None)],
                ..ServiceSpec::default()
            },
        }
    }

    fn workload(ns: &str, name: &str, sa: &str, addr: &str, l: &[(&str, &str)]) -> Workload {
        Workload {
            metadata: meta(ns, name, l),
            spec: WorkloadSpec {
                service_account: sa.into(),
                mesh_address: Some(addr.parse().unwrap()),
                address: None,
            },
        }
    }

    fn objects(services: Vec<Service>, workloads: Vec<Workload>) -> Objects {
        Objects {
            services: services
                .into_iter()
                .map(|s| (s.metadata.key(), s))
                .collect(),
            workloads: workloads
                .into_iter()
                .map(|w| (w.metadata.key(), w))
                .collect(),
            ..Objects::default()
        }
    }

    /// The workload names serving the first port of `ns/name`.
    fn backends(snapshot: &MeshSnapshot, ns: &str, name: &str) -> Vec<String> {
        snapshot.services[&ServiceKey::new(ns, name)].ports[0]
            .endpoints
            .iter()
            .map(|e| e.workload.clone())
            .collect()
    }

    #[test]
    fn endpoints_are_workloads_matching_the_selector_in_the_same_namespace() {
        let objs = objects(
            vec![
                svc("demo", "web", &[("app", "web")]),
                svc("demo", "v2", &[("app", "web"), ("version", "v2")]),
                svc("demo", "headless", &[]),
                svc("demo", "nobody", &[("app", "nobody")]),
            ],
            vec![
                workload("demo", "web-2", "web", "127.0.0.1:16012", &[("app", "web")]),
                workload(
                    "demo",
                    "web-1",
                    "web",
                    "127.0.0.1:16011",
                    &[("app", "web"), ("version", "v2")],
                ),
                workload(
                    "other",
                    "web-3",
                    "web",
                    "127.0.0.1:16013",
                    &[("app", "web")],
                ),
            ],
        );
        let snap = translate(&objs, "cluster.local", 7);
        assert_eq!(snap.version, 7);
        let cases: &[(&str, &[&str])] = &[
            ("web", &["web-1", "web-2"]),
            ("v2", &["web-1"]),
            ("headless", &[]),
            ("nobody", &[]),
        ];
        for (name, want) in cases {
            assert_eq!(backends(&snap, "demo", name), *want, "service {name}");
        }
    }

    #[test]
    fn endpoints_carry_address_identity_and_labels() {
        let objs = objects(
            vec![svc("demo", "api", &[("app", "api")])],
            vec![workload(
                "demo",
                "api-1",
                "api",
                "127.0.0.1:16021",
                &[("app", "api")],
            )],
        );
        let snap = translate(&objs, "mesh.example", 1);
        assert_eq!(snap.trust_domain, "mesh.example");
        let ep = &snap.services[&ServiceKey::new("demo", "api")].ports[0].endpoints[0];
        assert_eq!(ep.address, "127.0.0.1:16021".parse().unwrap());
        assert_eq!(ep.identity, "spiffe://mesh.example/ns/demo/sa/api");
        assert_eq!(ep.labels, labels(&[("app", "api")]));
    }

    #[test]
    fn pod_address_endpoints_are_address_and_target_port_per_port() {
        let mut s = svc("demo", "api", &[("app", "api")]);
        s.spec.ports = vec![port(Some("http"), None), port(Some("admin"), None)];
        s.spec.ports[0].target_port = Some(IntOrString::Int(8080));
        s.spec.ports[1].port = 9000;
        let mut named = port(Some("metrics"), None);
        named.port = 9100;
        named.target_port = Some(IntOrString::String("metrics".into()));
        s.spec.ports.push(named);
        let pod = |name: &str, ip: &str| {
            let mut w = workload("demo", name, "api", "127.0.0.1:1", &[("app", "api")]);
            w.spec.mesh_address = None;
            w.spec.address = Some(ip.parse().unwrap());
            w
        };
        let objs = objects(
            vec![s],
            vec![
                pod("api-2", "fd00:10:244::12"),
                pod("api-1", "10.244.0.12"),
                workload("demo", "api-3", "api", "127.0.0.1:16023", &[("app", "api")]),
            ],
        );
        let snap = translate(&objs, "cluster.local", 1);
        let svc = &snap.services[&ServiceKey::new("demo", "api")];
        let got: Vec<(u16, Vec<(String, String)>)> = svc
            .ports
            .iter()
            .map(|p| {
                let eps = p
                    .endpoints
                    .iter()
                    .map(|e| (e.workload.clone(), e.address.to_string()))
                    .collect();
                (p.port, eps)
            })
            .collect();
        let ep = |w: &str, a: &str| (w.to_owned(), a.to_owned());
        assert_eq!(
            got,
            [
                (
                    80,
                    vec![
                        ep("api-1", "10.244.0.12:8080"),
                        ep("api-2", "[fd00:10:244::12]:8080"),
                        ep("api-3", "127.0.0.1:16023"),
                    ]
                ),
                (
                    9000,
                    vec![
                        ep("api-1", "10.244.0.12:9000"),
                        ep("api-2", "[fd00:10:244::12]:9000"),
                        ep("api-3", "127.0.0.1:16023"),
                    ]
                ),
                // A named targetPort cannot be resolved for a pod address (validation
                // refuses it; unvalidated objects lose just those endpoints).
                (9100, vec![ep("api-3", "127.0.0.1:16023")]),
            ]
        );
        // Identity and labels do not depend on the mode.
        let pod_ep = &svc.ports[0].endpoints[0];
        assert_eq!(pod_ep.identity, "spiffe://cluster.local/ns/demo/sa/api");
        assert_eq!(pod_ep.labels, labels(&[("app", "api")]));
    }

    #[test]
    fn service_addresses_come_from_cluster_ips_else_cluster_ip() {
        let cases: &[(Option<&str>, &[&str], &[&str])] = &[
            (None, &[], &[]),
            (Some("None"), &[], &[]),
            (Some(""), &[], &[]),
            (Some("None"), &["None"], &[]),
            (Some("10.96.0.10"), &[], &["10.96.0.10"]),
            (Some("fd00::10"), &[], &["fd00::10"]),
            (
                Some("10.96.0.10"),
                &["10.96.0.10", "fd00::10"],
                &["10.96.0.10", "fd00::10"],
            ),
            (
                None,
                &["fd00::10", "10.96.0.10"],
                &["fd00::10", "10.96.0.10"],
            ),
            // Unvalidated input: duplicates dropped, unparsable values skipped.
            (
                None,
                &["10.96.0.10", "x", "::ffff:10.96.0.10"],
                &["10.96.0.10"],
            ),
        ];
        for (cluster_ip, cluster_ips, want) in cases {
            let mut s = svc("demo", "web", &[]);
            s.spec.cluster_ip = cluster_ip.map(Into::into);
            s.spec.cluster_ips = cluster_ips.iter().map(|ip| (*ip).to_owned()).collect();
            let snap = translate(&objects(vec![s], vec![]), "td", 1);
            let got: Vec<String> = snap.services[&ServiceKey::new("demo", "web")]
                .addresses
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(
                got, *want,
                "clusterIP {cluster_ip:?} clusterIPs {cluster_ips:?}"
            );
        }
    }

    #[test]
    fn endpoints_with_invalid_identity_are_left_out() {
        let objs = objects(
            vec![svc("demo", "api", &[("app", "api")])],
            vec![workload(
                "demo",
                "api-1",
                "api",
                "127.0.0.1:16021",
                &[("app", "api")],
            )],
        );
        let snap = translate(&objs, "Not A Domain", 1);
        assert_eq!(backends(&snap, "demo", "api"), Vec::<String>::new());
    }

    #[test]
    fn port_protocol_comes_from_app_protocol_then_name_prefix() {
        let cases = [
            (None, None, Protocol::Http),
            (Some("http"), None, Protocol::Http),
            (Some("http-web"), None, Protocol::Http),
            (Some("http2"), None, Protocol::Http),
            (Some("grpc-api"), None, Protocol::Http),
            (Some("h2c"), None, Protocol::Http),
            (Some("tcp"), None, Protocol::Tcp),
            (Some("tcp-db"), None, Protocol::Tcp),
            (Some("tls-db"), None, Protocol::Tcp),
            (Some("tcpish"), None, Protocol::Http),
            (Some("metrics"), None, Protocol::Http),
            (Some("tcp-db"), Some("http"), Protocol::Http),
            (Some("web"), Some("tcp"), Protocol::Tcp),
            (None, Some("kubernetes.io/h2c"), Protocol::Http),
            (None, Some("GRPC"), Protocol::Http),
            (None, Some("mysql"), Protocol::Tcp),
        ];
        for (name, app, want) in cases {
            assert_eq!(
                port_protocol(&port(name, app)),
                want,
                "name {name:?} appProtocol {app:?}"
            );
        }
    }

    #[test]
    fn hostnames_annotation_adds_trimmed_unique_names() {
        let mut s = svc("demo", "web", &[]);
        s.metadata.annotations.insert(
            HOSTNAMES_ANNOTATION.into(),
            " web.example ,www,,web.example".into(),
        );
        let snap = translate(
            &objects(vec![s, svc("demo", "plain", &[])], vec![]),
            "td",
            1,
        );
        assert_eq!(
            snap.services[&ServiceKey::new("demo", "web")].hostnames,
            ["web.example", "www"]
        );
        assert!(
            snap.services[&ServiceKey::new("demo", "plain")]
                .hostnames
                .is_empty()
        );
    }

    mod slices {
        //! `EndpointSource::EndpointSlices`: one table of cluster states, each with the
        //! endpoints every port of `demo/api` should get.

        use super::*;
        use crate::objects::{EndpointPort, SliceEndpoint};

        /// A Pod: a Workload with a pod address and service account `api`.
        fn pod(ns: &str, name: &str, ip: &str) -> Workload {
            Workload {
                metadata: meta(ns, name, &[("app", "api")]),
                spec: WorkloadSpec {
                    service_account: "api".into(),
                    mesh_address: None,
                    address: Some(ip.parse().unwrap()),
                },
            }
        }

        fn slice_port(name: Option<&str>, port: i32) -> EndpointPort {
            EndpointPort {
                name: name.map(Into::into),
                port: Some(port),
                protocol: Some("TCP".into()),
                app_protocol: None,
            }
        }

        fn ep(ips: &[&str], ready: Option<bool>, pod: &str) -> SliceEndpoint {
            SliceEndpoint {
                addresses: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
                ready,
                target_pod: Some(pod.into()),
                ..SliceEndpoint::default()
            }
        }

        fn slice(
            ns: &str,
            name: &str,
            service: &str,
            ports: Vec<EndpointPort>,
            endpoints: Vec<SliceEndpoint>,
        ) -> EndpointSlice {
            EndpointSlice {
                namespace: ns.into(),
                name: name.into(),
                service_name: Some(service.into()),
                ports,
                endpoints,
            }
        }

        /// `demo/api` with ports `http` 80 and `metrics` 9100; its selector matches every
        /// pod, which must not matter.
        fn api() -> Service {
            let mut s = svc("demo", "api", &[("app", "api")]);
            let mut metrics = port(Some("metrics"), None);
            metrics.port = 9100;
            metrics.target_port = Some(IntOrString::String("metrics".into()));
            s.spec.ports.push(metrics);
            s
        }

        fn cluster(
            services: Vec<Service>,
            pods: Vec<Workload>,
            slices: Vec<EndpointSlice>,
        ) -> Objects {
            let mut objs = objects(services, pods);
            objs.endpoint_source = EndpointSource::EndpointSlices;
            objs.endpoint_slices = slices.into_iter().map(|s| (s.key(), s)).collect();
            objs
        }

        /// `(port, [(workload, address)])` of every port of `demo/api`.
        type Ports = Vec<(u16, Vec<(String, String)>)>;

        fn endpoints(snap: &MeshSnapshot) -> Ports {
            snap.services[&ServiceKey::new("demo", "api")]
                .ports
                .iter()
                .map(|p| {
                    let eps = p
                        .endpoints
                        .iter()
                        .map(|e| (e.workload.clone(), e.address.to_string()))
                        .collect();
                    (p.port, eps)
                })
                .collect()
        }

        fn want(http: &[(&str, &str)], metrics: &[(&str, &str)]) -> Ports {
            let list = |eps: &[(&str, &str)]| {
                eps.iter()
                    .map(|(w, a)| ((*w).to_owned(), (*a).to_owned()))
                    .collect()
            };
            vec![(80, list(http)), (9100, list(metrics))]
        }

        #[test]
        fn endpoints_come_from_ready_slice_endpoints_of_known_pods() {
            let pods = || {
                vec![
                    pod("demo", "api-1", "10.0.0.1"),
                    pod("demo", "api-2", "10.0.0.2"),
                    pod("demo", "api-3", "fd00::3"),
                    pod("other", "api-9", "10.0.0.9"),
                ]
            };
            let both = || {
                vec![
                    slice_port(Some("http"), 8080),
                    slice_port(Some("metrics"), 9090),
                ]
            };
            let cases: Vec<(&str, Vec<EndpointSlice>, Ports)> = vec![
                (
                    "service with no slices has no endpoints",
                    vec![],
                    want(&[], &[]),
                ),
                (
                    "ready, nil (ready) and not ready",
                    vec![slice(
                        "demo",
                        "api-a",
                        "api",
                        both(),
                        vec![
                            ep(&["10.0.0.1"], Some(true), "api-1"),
                            ep(&["10.0.0.2"], None, "api-2"),
                            ep(&["fd00::3"], Some(false), "api-3"),
                        ],
                    )],
                    want(
                        &[("api-1", "10.0.0.1:8080"), ("api-2", "10.0.0.2:8080")],
                        &[("api-1", "10.0.0.1:9090"), ("api-2", "10.0.0.2:9090")],
                    ),
                ),
                (
                    "unknown pod (or one in another namespace) is left out",
                    vec![slice(
                        "demo",
                        "api-a",
                        "api",
                        both(),
                        vec![
                            ep(&["10.0.0.1"], None, "api-1"),
                            ep(&["10.0.0.7"], None, "api-7"),
                            ep(&["10.0.0.9"], None, "api-9"),
                            SliceEndpoint {
                                target_pod: None,
                                ..ep(&["10.0.0.8"], None, "")
                            },
                        ],
                    )],
                    want(&[("api-1", "10.0.0.1:8080")], &[("api-1", "10.0.0.1:9090")]),
                ),
                (
                    "two slices for one service, each with its own target ports",
                    vec![
                        slice(
                            "demo",
                            "api-a",
                            "api",
                            both(),
                            vec![ep(&["10.0.0.2"], None, "api-2")],
                        ),
                        slice(
                            "demo",
                            "api-b",
                            "api",
                            vec![
                                slice_port(Some("metrics"), 9191),
                                slice_port(Some("http"), 8181),
                            ],
                            vec![ep(&["10.0.0.1"], None, "api-1")],
                        ),
                    ],
                    want(
                        &[("api-1", "10.0.0.1:8181"), ("api-2", "10.0.0.2:8080")],
                        &[("api-1", "10.0.0.1:9191"), ("api-2", "10.0.0.2:9090")],
                    ),
                ),
                (
                    "ports match by name: a slice without a port's name gives it nothing",
                    vec![slice(
                        "demo",
                        "api-a",
                        "api",
                        vec![slice_port(Some("metrics"), 9090), slice_port(None, 7070)],
                        vec![ep(&["10.0.0.1"], None, "api-1")],
                    )],
                    want(&[], &[("api-1", "10.0.0.1:9090")]),
                ),
                (
                    "ipv6 addresses",
                    vec![slice(
                        "demo",
                        "api-v6",
                        "api",
                        both(),
                        vec![ep(&["fd00::3"], None, "api-3")],
                    )],
                    want(
                        &[("api-3", "[fd00::3]:8080")],
                        &[("api-3", "[fd00::3]:9090")],
                    ),
                ),
                (
                    "the same address in two slices counts once",
                    vec![
                        slice(
                            "demo",
                            "api-a",
                            "api",
                            both(),
                            vec![ep(&["10.0.0.1"], None, "api-1")],
                        ),
                        slice(
                            "demo",
                            "api-b",
                            "api",
                            both(),
                            vec![ep(&["10.0.0.1"], Some(true), "api-1")],
                        ),
                    ],
                    want(&[("api-1", "10.0.0.1:8080")], &[("api-1", "10.0.0.1:9090")]),
                ),
                (
                    "slices of other services and namespaces are not this service's",
                    vec![
                        slice(
                            "demo",
                            "web-a",
                            "web",
                            both(),
                            vec![ep(&["10.0.0.1"], None, "api-1")],
                        ),
                        slice(
                            "other",
                            "api-a",
                            "api",
                            both(),
                            vec![ep(&["10.0.0.9"], None, "api-9")],
                        ),
                        EndpointSlice {
                            service_name: None,
                            ..slice(
                                "demo",
                                "orphan",
                                "api",
                                both(),
                                vec![ep(&["10.0.0.2"], None, "api-2")],
                            )
                        },
                    ],
                    want(&[], &[]),
                ),
                (
                    "a slice port without a number gives nothing",
                    vec![slice(
                        "demo",
                        "api-a",
                        "api",
                        vec![
                            EndpointPort {
                                port: None,
                                ..slice_port(Some("http"), 0)
                            },
                            slice_port(Some("metrics"), 9090),
                        ],
                        vec![ep(&["10.0.0.1"], None, "api-1")],
                    )],
                    want(&[], &[("api-1", "10.0.0.1:9090")]),
                ),
            ];
            for (case, slices, expected) in cases {
                let snap = translate(&cluster(vec![api()], pods(), slices), "cluster.local", 1);
                assert_eq!(endpoints(&snap), expected, "{case}");
            }
        }

        #[test]
        fn unnamed_service_port_matches_unset_or_empty_slice_port_name() {
            for slice_name in [None, Some("")] {
                let mut s = svc("demo", "api", &[]);
                s.spec.ports[0].name = None;
                let objs = cluster(
                    vec![s],
                    vec![pod("demo", "api-1", "10.0.0.1")],
                    vec![slice(
                        "demo",
                        "api-a",
                        "api",
                        vec![slice_port(slice_name, 8080)],
                        vec![ep(&["10.0.0.1"], None, "api-1")],
                    )],
                );
                let snap = translate(&objs, "cluster.local", 1);
                assert_eq!(
                    backends(&snap, "demo", "api"),
                    ["api-1"],
                    "slice port name {slice_name:?}"
                );
            }
        }

        #[test]
        fn slice_endpoints_carry_pod_identity_labels_and_zone() {
            let mut api_1 = pod("demo", "api-1", "10.0.0.1");
            api_1.spec.service_account = "api-sa".into();
            let zoned = SliceEndpoint {
                zone: Some("zone-a".into()),
                node: Some("node-1".into()),
                ..ep(&["10.0.0.1"], None, "api-1")
            };
            let objs = cluster(
                vec![api()],
                vec![api_1, pod("demo", "api-2", "10.0.0.2")],
                vec![slice(
                    "demo",
                    "api-a",
                    "api",
                    vec![slice_port(Some("http"), 8080)],
                    vec![zoned, ep(&["10.0.0.2"], None, "api-2")],
                )],
            );
            let snap = translate(&objs, "mesh.example", 3);
            let eps = &snap.services[&ServiceKey::new("demo", "api")].ports[0].endpoints;
            let got: Vec<(&str, &str, &BTreeMap<String, String>)> = eps
                .iter()
                .map(|e| (e.workload.as_str(), e.identity.as_str(), &e.labels))
                .collect();
            assert_eq!(
                got,
                [
                    (
                        "api-1",
                        "spiffe://mesh.example/ns/demo/sa/api-sa",
                        &labels(&[("app", "api"), (ZONE_LABEL, "zone-a")])
                    ),
                    (
                        "api-2",
                        "spiffe://mesh.example/ns/demo/sa/api",
                        &labels(&[("app", "api")])
                    ),
                ]
            );
        }

        #[test]
        fn selectors_are_ignored_and_slices_unused_by_the_file_source() {
            let slices = vec![slice(
                "demo",
                "api-a",
                "api",
                vec![slice_port(Some("http"), 8080)],
                vec![ep(&["10.0.0.1"], None, "api-1")],
            )];
            // The slice lists only api-1 although the selector matches api-2 as well.
            let objs = cluster(
                vec![api()],
                vec![
                    pod("demo", "api-1", "10.0.0.1"),
                    pod("demo", "api-2", "10.0.0.2"),
                ],
                slices,
            );
            let snap = translate(&objs, "cluster.local", 1);
            assert_eq!(backends(&snap, "demo", "api"), ["api-1"]);
            // The same objects under the selector rule ignore the slices.
            let objs = Objects {
                endpoint_source: EndpointSource::Selectors,
                ..objs
            };
            let snap = translate(&objs, "cluster.local", 1);
            assert_eq!(backends(&snap, "demo", "api"), ["api-1", "api-2"]);
        }
    }
}
