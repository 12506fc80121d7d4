//! Outbound routing: which service and endpoints a request's authority names. Pure over
//! the discovery view, so it is table-tested without sockets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use trellis_api::{Endpoint, MeshSnapshot, Protocol, ServiceKey};
use trellis_identity::SpiffeId;

use crate::error::Error;

/// Cluster DNS suffix accepted in host names (`<svc>.<ns>.svc.cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The discovery view plus the index routing needs.
#[derive(Debug, Default)]
pub struct View {
    /// The applied snapshot.
    pub snapshot: MeshSnapshot,
    /// host name (lowercase, no port) -> service.
    hosts: HashMap<String, ServiceKey>,
    /// Round-robin cursor (peak-EWMA balancing comes with the data-plane issue).
    cursor: AtomicUsize,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The service.
    pub service: ServiceKey,
    /// The service port addressed.
    pub port: u16,
    /// The endpoint chosen.
    pub endpoint: Endpoint,
    /// The identity the endpoint must prove.
    pub identity: SpiffeId,
}

// === impl View ===

impl View {
    /// Indexes a snapshot for a proxy whose own identity is `me` (short names resolve in
    /// its namespace, like Kubernetes DNS search paths).
    pub fn new(snapshot: MeshSnapshot, me: &SpiffeId) -> Self {
        let mut hosts = HashMap::new();
        for (key, svc) in &snapshot.services {
            let (n, ns) = (&key.name, &key.namespace);
            let mut names = vec![
                format!("{n}.{ns}"),
                format!("{n}.{ns}.svc"),
                format!("{n}.{ns}.svc.{CLUSTER_DOMAIN}"),
            ];
            if ns == me.namespace() {
                names.push(n.clone());
            }
            names.extend(svc.hostnames.iter().map(|h| h.to_ascii_lowercase()));
            for h in names {
                hosts.entry(h).or_insert_with(|| key.clone());
            }
        }
        Self {
            snapshot,
            hosts,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Routes an authority (`host[:port]`, port 80 when absent) to an endpoint.
    pub fn route(&self, authority: &http::uri::Authority) -> Result<Target, Error> {
        let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(80);
        let key = self
            .hosts
            .get(&host)
            .ok_or_else(|| Error::NoRoute(authority.to_string()))?;
        let svc = self
            .snapshot
            .services
            .get(key)
            .ok_or_else(|| Error::NoRoute(authority.to_string()))?;
        let sp = svc
            .ports
            .iter()
            .find(|p| p.port == port && p.protocol == Protocol::Http)
            .ok_or_else(|| {
                Error::NoRoute(format!(
                    "{authority} (service {key} has no HTTP port {port})"
                ))
            })?;
        if sp.endpoints.is_empty() {
            return Err(Error::NoEndpoints(key.to_string()));
        }
        let i = self.cursor.fetch_add(1, Ordering::Relaxed) % sp.endpoints.len();
        let endpoint = sp.endpoints[i].clone();
        let identity =
            SpiffeId::parse(&endpoint.identity).map_err(|_| Error::BadEndpointIdentity {
                addr: endpoint.address,
                identity: endpoint.identity.clone(),
            })?;
        Ok(Target {
            service: key.clone(),
            port,
            endpoint,
            identity,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_api::{Service, ServicePort};

    use super::*;

    fn ep(addr: &str, sa: &str) -> Endpoint {
        Endpoint {
            address: addr.parse().unwrap(),
            identity: format!("spiffe://cluster.local/ns/demo/sa/{sa}"),
            workload: format!("{sa}-x"),
            labels: BTreeMap::new(),
        }
    }

    fn view() -> View {
        let mut services = BTreeMap::new();
        let mut add =
            |ns: &str, name: &str, port: u16, proto, eps: Vec<Endpoint>, hostnames: Vec<String>| {
                let key = ServiceKey::new(ns, name);
                services.insert(
                    key.clone(),
                    Service {
                        key,
                        hostnames,
                        ports: vec![ServicePort {
                            name: "p".into(),
                            port,
                            protocol: proto,
                            endpoints: eps,
                        }],
                    },
                );
            };
        add(
            "demo",
            "web",
            80,
            Protocol::Http,
            vec![ep("127.0.0.1:1", "web"), ep("127.0.0.1:2", "web")],
            vec![],
        );
        add(
            "demo",
            "db",
            5432,
            Protocol::Tcp,
            vec![ep("127.0.0.1:3", "db")],
            vec![],
        );
        add("demo", "empty", 80, Protocol::Http, vec![], vec![]);
        add(
            "other",
            "api",
            8080,
            Protocol::Http,
            vec![ep("127.0.0.1:4", "api")],
            vec!["API.example.com".into()],
        );
        let mut bad = ep("127.0.0.1:5", "x");
        bad.identity = "spiffe://cluster.local/ns/demo/sa/../x".into();
        add("demo", "bad", 80, Protocol::Http, vec![bad], vec![]);
        let snap = MeshSnapshot {
            version: 3,
            trust_domain: "cluster.local".into(),
            services,
        };
        View::new(
            snap,
            &SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/client").unwrap(),
        )
    }

    fn route(v: &View, a: &str) -> Result<Target, Error> {
        v.route(&a.parse().unwrap())
    }

    #[test]
    fn routes_kubernetes_host_forms() {
        let v = view();
        for a in [
            "web",
            "web:80",
            "web.demo",
            "web.demo.svc",
            "web.demo.svc.cluster.local",
            "WEB.Demo:80",
            "web.demo.",
        ] {
            let t = route(&v, a).unwrap_or_else(|e| panic!("{a}: {e}"));
            assert_eq!(t.service, ServiceKey::new("demo", "web"), "{a}");
            assert_eq!(t.identity.service_account(), "web");
        }
    }

    #[test]
    fn short_names_resolve_only_in_own_namespace() {
        let v = view();
        assert!(matches!(route(&v, "api:8080"), Err(Error::NoRoute(_))));
        assert_eq!(
            route(&v, "api.other:8080").unwrap().endpoint.address.port(),
            4
        );
        assert_eq!(
            route(&v, "api.example.com:8080").unwrap().service.name,
            "api"
        );
    }

    #[test]
    fn round_robins_endpoints() {
        let v = view();
        let a = route(&v, "web").unwrap().endpoint.address.port();
        let b = route(&v, "web").unwrap().endpoint.address.port();
        assert_ne!(a, b);
    }

    #[test]
    fn unknown_wrong_port_tcp_and_empty_are_errors() {
        let v = view();
        assert!(matches!(route(&v, "nope.demo"), Err(Error::NoRoute(_))));
        assert!(matches!(route(&v, "web.demo:81"), Err(Error::NoRoute(_))));
        assert!(matches!(route(&v, "db.demo:5432"), Err(Error::NoRoute(_))));
        assert!(matches!(
            route(&v, "empty.demo"),
            Err(Error::NoEndpoints(_))
        ));
        assert!(matches!(
            route(&v, "bad.demo"),
            Err(Error::BadEndpointIdentity { .. })
        ));
    }
}
