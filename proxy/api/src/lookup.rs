//! Original-destination lookup for transparently captured connections.
//!
//! With capture (iptables), an application connects to a service's virtual IP or straight
//! to a pod, and the proxy only learns that original destination. [`AddressIndex`] maps it
//! back to the mesh: a service address on one of the service's ports names the service; an
//! endpoint's exact `ip:port` names that endpoint. Pure data, so the proxy builds one per
//! snapshot and every lookup is a hash probe.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, SocketAddr};

use crate::snapshot::{Endpoint, MeshSnapshot, Service, ServicePort};

/// Where an original destination goes, borrowed from the index that answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    /// A service address on one of its ports: balance over the port's endpoints.
    Service {
        /// The service the address belongs to.
        service: &'a Service,
        /// The port that was dialled.
        port: &'a ServicePort,
    },
    /// An endpoint's own address: connect to that endpoint only.
    Endpoint {
        /// The first service (by key) whose port lists the endpoint.
        service: &'a Service,
        /// The port of `service` that lists it.
        port: &'a ServicePort,
        /// The endpoint dialled.
        endpoint: &'a Endpoint,
    },
}

/// A snapshot's services indexed by the addresses a captured connection may be sent to.
///
/// Owns a copy of the services so that a proxy can keep the index next to (or instead of)
/// its snapshot without borrowing it. Rebuild it whenever the snapshot changes.
///
/// Where the snapshot is ambiguous the answer is still deterministic: an `ip:port` claimed
/// by several services (as an address or as an endpoint) goes to the first by service key,
/// then port order; a service address wins over an endpoint with the same `ip:port`, since
/// virtual IPs exist only to be resolved by proxies.
#[derive(Debug, Clone, Default)]
pub struct AddressIndex {
    /// The snapshot's services, in key order; the maps point into this.
    services: Vec<Service>,
    /// `(service address, service port)` -> (service, port) positions.
    by_service_address: HashMap<(IpAddr, u16), (usize, usize)>,
    /// Endpoint `ip:port` -> (service, port, endpoint) positions.
    by_endpoint: HashMap<(IpAddr, u16), (usize, usize, usize)>,
}

// === impl AddressIndex ===

impl AddressIndex {
    /// Indexes every service address and endpoint of `snapshot`.
    pub fn new(snapshot: &MeshSnapshot) -> Self {
        let services: Vec<Service> = snapshot.services.values().cloned().collect();
        let mut by_service_address = HashMap::new();
        let mut by_endpoint = HashMap::new();
        // `services` is in key order, so keeping the first entry per key gives the
        // first-by-key-order answer the type promises.
        for (s, svc) in services.iter().enumerate() {
            for (p, port) in svc.ports.iter().enumerate() {
                for ip in &svc.addresses {
                    if let Entry::Vacant(slot) = by_service_address.entry(key(*ip, port.port)) {
                        slot.insert((s, p));
                    }
                }
                for (e, ep) in port.endpoints.iter().enumerate() {
                    let at = key(ep.address.ip(), ep.address.port());
                    if let Entry::Vacant(slot) = by_endpoint.entry(at) {
                        slot.insert((s, p, e));
                    }
                }
            }
        }
        Self {
            services,
            by_service_address,
            by_endpoint,
        }
    }

    /// Where a connection to `dst` goes, or `None` when `dst` is not in the mesh.
    ///
    /// Only the IP and port of `dst` count: an IPv6 flow label or scope id does not, and
    /// an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as a dual-stack socket reports an
    /// IPv4 peer) matches its IPv4 form.
    pub fn lookup(&self, dst: SocketAddr) -> Option<Destination<'_>> {
        let at = key(dst.ip(), dst.port());
        if let Some(&(s, p)) = self.by_service_address.get(&at) {
            let service = self.services.get(s)?;
            return Some(Destination::Service {
                service,
                port: service.ports.get(p)?,
            });
        }
        let &(s, p, e) = self.by_endpoint.get(&at)?;
        let service = self.services.get(s)?;
        let port = service.ports.get(p)?;
        Some(Destination::Endpoint {
            service,
            port,
            endpoint: port.endpoints.get(e)?,
        })
    }
}

/// The map key for an address: canonical IP (IPv4-mapped IPv6 folded to IPv4) and port,
/// so that equal destinations written differently meet.
fn key(ip: IpAddr, port: u16) -> (IpAddr, u16) {
    (ip.to_canonical(), port)
}

// === impl Destination ===

impl<'a> Destination<'a> {
    /// The service the connection belongs to.
    pub fn service(&self) -> &'a Service {
        match self {
            Destination::Service { service, .. } | Destination::Endpoint { service, .. } => service,
        }
    }

    /// The service port the connection belongs to.
    pub fn port(&self) -> &'a ServicePort {
        match self {
            Destination::Service { port, .. } | Destination::Endpoint { port, .. } => port,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::snapshot::{Protocol, ServiceKey};

    fn endpoint(addr: &str, workload: &str) -> Endpoint {
        Endpoint {
            address: addr.parse().unwrap(),
            identity: format!("spiffe://cluster.local/ns/demo/sa/{workload}"),
            workload: workload.into(),
            labels: BTreeMap::new(),
        }
    }

    fn port(name: &str, number: u16, endpoints: Vec<Endpoint>) -> ServicePort {
        ServicePort {
            name: name.into(),
            port: number,
            protocol: Protocol::Http,
            endpoints,
        }
    }

    fn service(name: &str, addresses: &[&str], ports: Vec<ServicePort>) -> Service {
        Service {
            key: ServiceKey::new("demo", name),
            hostnames: Vec::new(),
            ports,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    /// `web` (dual stack, two ports) and `api` (IPv6 only) share the pod 10.0.0.1:8080;
    /// `zeta` claims web's address, which the controller refuses but the contract allows.
    fn snapshot() -> MeshSnapshot {
        let web = service(
            "web",
            &["10.96.0.10", "fd00::10"],
            vec![
                port(
                    "http",
                    80,
                    vec![
                        endpoint("10.0.0.1:8080", "web-1"),
                        endpoint("[fd00:1::2]:8080", "web-2"),
                    ],
                ),
                port("admin", 9000, vec![endpoint("10.0.0.1:9000", "web-1")]),
            ],
        );
        let api = service(
            "api",
            &["fd00::20"],
            vec![port("grpc", 80, vec![endpoint("10.0.0.1:8080", "web-1")])],
        );
        let zeta = service(
            "zeta",
            &["10.96.0.10"],
            vec![port("http", 80, vec![endpoint("10.0.0.9:80", "zeta-1")])],
        );
        MeshSnapshot {
            version: 1,
            trust_domain: "cluster.local".into(),
            services: [web, api, zeta]
                .into_iter()
                .map(|s| (s.key.clone(), s))
                .collect(),
            ..Default::default()
        }
    }

    /// A lookup result as plain strings: `service/port` or `service/port/workload`.
    fn describe(found: Option<Destination<'_>>) -> Option<String> {
        found.map(|d| match d {
            Destination::Service { service, port } => format!("{}/{}", service.key, port.name),
            Destination::Endpoint {
                service,
                port,
                endpoint,
            } => format!("{}/{}/{}", service.key, port.name, endpoint.workload),
        })
    }

    #[test]
    fn destinations_resolve_to_services_and_endpoints() {
        let index = AddressIndex::new(&snapshot());
        let cases = [
            (
                "service IPv4 address",
                "10.96.0.10:80",
                Some("demo/web/http"),
            ),
            (
                "service second port",
                "10.96.0.10:9000",
                Some("demo/web/admin"),
            ),
            (
                "service IPv6 address",
                "[fd00::10]:80",
                Some("demo/web/http"),
            ),
            ("other service IPv6", "[fd00::20]:80", Some("demo/api/grpc")),
            (
                "IPv4-mapped IPv6 service address",
                "[::ffff:10.96.0.10]:80",
                Some("demo/web/http"),
            ),
            ("endpoint", "10.0.0.1:9000", Some("demo/web/admin/web-1")),
            (
                "endpoint of several services: first by key",
                "10.0.0.1:8080",
                Some("demo/api/grpc/web-1"),
            ),
            (
                "IPv6 endpoint",
                "[fd00:1::2]:8080",
                Some("demo/web/http/web-2"),
            ),
            (
                "IPv6 endpoint with a scope id",
                "[fd00:1::2%3]:8080",
                Some("demo/web/http/web-2"),
            ),
            (
                "endpoint of a later service",
                "10.0.0.9:80",
                Some("demo/zeta/http/zeta-1"),
            ),
            ("unknown IPv4", "10.96.0.99:80", None),
            ("unknown IPv6", "[fd00::99]:80", None),
            ("service address, wrong port", "10.96.0.10:81", None),
            (
                "service address, other family's port",
                "[fd00::20]:9000",
                None,
            ),
            ("endpoint IP, wrong port", "10.0.0.1:80", None),
        ];
        for (case, dst, want) in cases {
            let dst: SocketAddr = dst.parse().unwrap();
            assert_eq!(
                describe(index.lookup(dst)).as_deref(),
                want,
                "{case}: {dst}"
            );
        }
    }

    #[test]
    fn service_address_wins_over_an_endpoint_at_the_same_address() {
        let mut snap = snapshot();
        let odd = service(
            "odd",
            &[],
            vec![port("http", 80, vec![endpoint("10.96.0.10:80", "odd-1")])],
        );
        snap.services.insert(odd.key.clone(), odd);
        let index = AddressIndex::new(&snap);
        assert_eq!(
            describe(index.lookup("10.96.0.10:80".parse().unwrap())).as_deref(),
            Some("demo/web/http")
        );
    }

    #[test]
    fn destination_accessors_and_empty_index() {
        let snap = snapshot();
        let index = AddressIndex::new(&snap);
        let found = index.lookup("10.0.0.1:9000".parse().unwrap()).unwrap();
        assert_eq!(found.service().key, ServiceKey::new("demo", "web"));
        assert_eq!(found.port().port, 9000);
        assert_eq!(
            AddressIndex::default().lookup("10.96.0.10:80".parse().unwrap()),
            None
        );
        assert_eq!(
            AddressIndex::new(&MeshSnapshot::default()).lookup("10.0.0.1:8080".parse().unwrap()),
            None
        );
    }
}
