//! Outbound routing: which service and endpoints a request's authority names, then which
//! HTTPRoute rule and backend it follows ([`View::apply_routes`]). Pure over the discovery
//! view, so it is table-tested without sockets. The view also carries the inbound side's
//! [`Authorizer`] and the [`RouteTable`] of this proxy's namespace, both built here once
//! per view rather than per request.

use std::collections::HashMap;
use std::net::SocketAddr;

use trellis_api::authz::{Authorizer, EndpointPorts, Workload};
use trellis_api::route::{HttpRoute, RouteRequest, RouteTable, Selection};
use trellis_api::{AddressIndex, Destination, Endpoint, MeshSnapshot, Protocol, ServiceKey};
use trellis_identity::SpiffeId;

use crate::config::Mode;
use crate::error::Error;

/// Cluster DNS suffix accepted in host names (`<svc>.<ns>.svc.cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The discovery view plus the index routing needs and the authorization policies that
/// apply to this proxy.
#[derive(Debug, Default)]
pub struct View {
    /// The applied snapshot.
    pub snapshot: MeshSnapshot,
    /// The snapshot's authorization policies that apply to this workload, ready to decide.
    pub authz: Authorizer,
    /// The snapshot's routes as they apply to this proxy's requests.
    routes: RouteTable,
    /// host name (lowercase, no port) -> service.
    hosts: HashMap<String, ServiceKey>,
    /// service and endpoint addresses -> what they are.
    index: AddressIndex,
}

/// The service port a request or connection is for, before an endpoint is picked.
///
/// It names the port rather than holding its endpoints: a request picks among the
/// endpoints of the view current when it is sent ([`View::endpoints`]), so a long-lived
/// app connection follows endpoints that come and go, and routing a request copies no
/// endpoint list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The service.
    pub service: ServiceKey,
    /// The service port addressed.
    pub port: u16,
    /// That port's protocol.
    pub protocol: Protocol,
    /// An endpoint the client chose itself (it dialled a pod address); no balancing.
    pub pinned: Option<Endpoint>,
}

/// Where a route sends a request.
#[derive(Debug)]
pub struct Routed<'v> {
    /// The backend's service port, or why the rule has none to offer (answered 500, and
    /// still counted under the route).
    pub target: Result<Target, Error>,
    /// The route that matched, in the view the request is routed by.
    pub route: &'v HttpRoute,
    /// The rule's request timeout, replacing the proxy's own.
    pub timeout: Option<std::time::Duration>,
}

// === impl View ===

impl View {
    /// Indexes a snapshot for a proxy whose own identity is `me` (short names resolve in
    /// its namespace, like Kubernetes DNS search paths), serving the workload `workload`
    /// (its pod name, as its endpoints in discovery name it) in `mode`.
    pub fn new(snapshot: MeshSnapshot, me: &SpiffeId, workload: &str, mode: Mode) -> Self {
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
        let index = AddressIndex::new(&snapshot);
        let authz = Authorizer::new(
            &snapshot.authorization,
            &snapshot.services,
            &Workload {
                namespace: me.namespace(),
                name: workload,
                // Explicit mode: our endpoints are our inbound address, whatever the port.
                endpoints: match mode {
                    Mode::Explicit => EndpointPorts::ProxyAddress,
                    Mode::Transparent => EndpointPorts::TargetPort,
                },
            },
        );
        let routes = RouteTable::new(&snapshot.routes, me.namespace());
        Self {
            snapshot,
            authz,
            routes,
            hosts,
            index,
        }
    }

    /// The endpoints serving `target` in this view: empty when its service or port is
    /// gone (the request then fails with 503), whatever they were when the target was
    /// found.
    pub fn endpoints(&self, target: &Target) -> &[Endpoint] {
        self.snapshot
            .services
            .get(&target.service)
            .and_then(|svc| svc.ports.iter().find(|p| p.port == target.port))
            .map_or(&[], |p| p.endpoints.as_slice())
    }

    /// Whether routes may apply to requests for `target`: routes attach to its service,
    /// and the client did not dial an endpoint itself. Callers skip building the
    /// request for [`Self::apply_routes`] otherwise, the common case.
    pub fn routed(&self, target: &Target) -> bool {
        target.pinned.is_none() && self.routes.attached(&target.service)
    }

    /// Applies the routes attached to `target`'s service port to a request: `Ok(None)`
    /// when none attaches (or the client dialled an endpoint itself), else the rule's
    /// choice. `roll` is a uniformly random number that picks the backend by weight.
    pub fn apply_routes(
        &self,
        target: &Target,
        req: &RouteRequest<'_>,
        roll: u64,
    ) -> Result<Option<Routed<'_>>, Error> {
        if target.pinned.is_some() {
            return Ok(None);
        }
        let (route, rule) = match self.routes.select(&target.service, target.port, req) {
            Selection::Unrouted => return Ok(None),
            Selection::NoMatch => {
                return Err(Error::NoRouteMatch(format!(
                    "{}:{}",
                    target.service, target.port
                )));
            }
            Selection::Rule { route, rule } => (route, rule),
        };
        let unusable = |why: String| Error::NoBackend {
            route: route.key(),
            why,
        };
        let target = rule
            .pick(roll)
            .ok_or_else(|| {
                unusable(if rule.backends.is_empty() {
                    "the matching rule has no backendRefs".into()
                } else {
                    "every backendRef of the matching rule has weight 0".into()
                })
            })
            .and_then(|backend| {
                let port = self
                    .snapshot
                    .services
                    .get(&backend.service)
                    .and_then(|svc| {
                        svc.ports
                            .iter()
                            .find(|p| p.port == backend.port && p.protocol == Protocol::Http)
                    })
                    .ok_or_else(|| {
                        unusable(format!(
                            "backend {}:{} is not an HTTP port of a mesh service",
                            backend.service, backend.port
                        ))
                    })?;
                Ok(Target {
                    service: backend.service.clone(),
                    port: port.port,
                    protocol: port.protocol,
                    pinned: None,
                })
            });
        Ok(Some(Routed {
            target,
            route,
            timeout: rule.timeout,
        }))
    }

    /// Routes an authority (`host[:port]`, port 80 when absent) to an HTTP service port.
    pub fn route(&self, authority: &http::uri::Authority) -> Result<Target, Error> {
        let host = authority.host().trim_end_matches('.');
        // Copied only when it has capitals: most clients send the name as written.
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(host.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(host)
        };
        let port = authority.port_u16().unwrap_or(80);
        let key = self
            .hosts
            .get(&*host)
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
        Ok(Target {
            service: key.clone(),
            port: sp.port,
            protocol: sp.protocol,
            pinned: None,
        })
    }

    /// What a captured connection's original destination is in the mesh: a service
    /// address and port, or one endpoint (the client dialled a pod directly).
    pub fn lookup(&self, dst: SocketAddr) -> Option<Target> {
        match self.index.lookup(dst)? {
            Destination::Service { service, port } => Some(Target {
                service: service.key.clone(),
                port: port.port,
                protocol: port.protocol,
                pinned: None,
            }),
            Destination::Endpoint {
                service,
                port,
                endpoint,
            } => Some(Target {
                service: service.key.clone(),
                port: port.port,
                protocol: port.protocol,
                pinned: Some(endpoint.clone()),
            }),
        }
    }

    /// A mesh service named by a TLS server name, on `port` (any protocol).
    pub fn lookup_sni(&self, sni: &str, port: u16) -> Option<Target> {
        let key = self.hosts.get(sni.trim_end_matches('.'))?;
        let svc = self.snapshot.services.get(key)?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        Some(Target {
            service: key.clone(),
            port: sp.port,
            protocol: sp.protocol,
            pinned: None,
        })
    }
}

/// The identity an endpoint must prove.
pub fn endpoint_identity(endpoint: &Endpoint) -> Result<SpiffeId, Error> {
    SpiffeId::parse(&endpoint.identity).map_err(|_| Error::BadEndpointIdentity {
        addr: endpoint.address,
        identity: endpoint.identity.clone(),
    })
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
                        addresses: if name == "web" {
                            vec!["10.96.0.10".parse().unwrap()]
                        } else {
                            vec![]
                        },
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
            ..Default::default()
        };
        View::new(
            snap,
            &SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/client").unwrap(),
            "client-0",
            Mode::Explicit,
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
            assert_eq!(v.endpoints(&t).len(), 2);
            assert_eq!(t.pinned, None);
        }
    }

    #[test]
    fn short_names_resolve_only_in_own_namespace() {
        let v = view();
        assert!(matches!(route(&v, "api:8080"), Err(Error::NoRoute(_))));
        assert_eq!(
            v.endpoints(&route(&v, "api.other:8080").unwrap())[0]
                .address
                .port(),
            4
        );
        assert_eq!(
            route(&v, "api.example.com:8080").unwrap().service.name,
            "api"
        );
    }

    #[test]
    fn unknown_wrong_port_and_tcp_ports_do_not_route_http() {
        let v = view();
        assert!(matches!(route(&v, "nope.demo"), Err(Error::NoRoute(_))));
        assert!(matches!(route(&v, "web.demo:81"), Err(Error::NoRoute(_))));
        assert!(matches!(route(&v, "db.demo:5432"), Err(Error::NoRoute(_))));
        assert!(v.endpoints(&route(&v, "empty.demo").unwrap()).is_empty());
    }

    #[test]
    fn invalid_endpoint_identity_is_an_error() {
        let v = view();
        let t = route(&v, "bad.demo").unwrap();
        assert!(matches!(
            endpoint_identity(&v.endpoints(&t)[0]),
            Err(Error::BadEndpointIdentity { .. })
        ));
        assert!(endpoint_identity(&v.endpoints(&route(&v, "web").unwrap())[0]).is_ok());
    }

    #[test]
    fn original_destinations_resolve_to_services_and_pinned_endpoints() {
        let v = view();
        let t = v.lookup("10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!((t.service.name.as_str(), t.pinned.is_none()), ("web", true));
        let t = v.lookup("127.0.0.1:2".parse().unwrap()).unwrap();
        assert_eq!(
            t.pinned.unwrap().address.port(),
            2,
            "a pod address pins its endpoint"
        );
        assert!(v.lookup("10.96.0.10:81".parse().unwrap()).is_none());
        assert!(v.lookup("192.0.2.1:80".parse().unwrap()).is_none());
    }

    #[test]
    fn tls_server_names_resolve_to_services() {
        let v = view();
        assert_eq!(
            v.lookup_sni("web.demo.svc.cluster.local", 80)
                .unwrap()
                .service
                .name,
            "web"
        );
        assert_eq!(
            v.lookup_sni("db.demo", 5432).unwrap().service.name,
            "db",
            "any protocol"
        );
        assert!(v.lookup_sni("web.demo", 443).is_none());
        assert!(v.lookup_sni("example.com", 443).is_none());
    }

    /// The demo's view with one route on web: `/api` to api.other (no: cross-namespace
    /// backends are the control plane's to refuse; the proxy only needs an HTTP port),
    /// `/split` 1:0 to empty, `/none` to nothing, `/db` to a TCP port.
    fn routed_view() -> View {
        use trellis_api::route::{
            Backend, HttpRoute, PathMatch, RouteMatch, RouteParent, RouteRule,
        };
        let v = view();
        let rule = |path: &str, backends: Vec<(&str, &str, u16, u32)>| RouteRule {
            name: path.trim_start_matches('/').into(),
            matches: vec![RouteMatch {
                path: PathMatch::Prefix(path.into()),
                method: None,
                headers: vec![],
                query: vec![],
            }],
            backends: backends
                .into_iter()
                .map(|(ns, name, port, weight)| Backend {
                    service: ServiceKey::new(ns, name),
                    port,
                    weight,
                })
                .collect(),
            timeout: (path == "/api").then(|| std::time::Duration::from_millis(250)),
        };
        let mut snap = v.snapshot;
        snap.routes = vec![HttpRoute {
            namespace: "demo".into(),
            name: "web-routes".into(),
            parents: vec![RouteParent {
                service: ServiceKey::new("demo", "web"),
                port: Some(80),
            }],
            rules: vec![
                rule("/api", vec![("other", "api", 8080, 1)]),
                rule(
                    "/split",
                    vec![("demo", "empty", 80, 1), ("demo", "web", 80, 0)],
                ),
                rule("/none", vec![]),
                rule("/db", vec![("demo", "db", 5432, 1)]),
            ],
        }];
        View::new(
            snap,
            &SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/client").unwrap(),
            "client-0",
            Mode::Explicit,
        )
    }

    fn apply<'v>(v: &'v View, target: &Target, path: &str) -> Result<Option<Routed<'v>>, Error> {
        let req = RouteRequest {
            method: "GET",
            path,
            query: "",
            has_header: &|_, _| false,
        };
        v.apply_routes(target, &req, 12345)
    }

    #[test]
    fn routes_pick_backends_and_refuse_what_cannot_be_served() {
        let v = routed_view();
        let web = route(&v, "web").unwrap();
        let r = apply(&v, &web, "/api/x").unwrap().unwrap();
        let t = r.target.as_ref().unwrap();
        assert_eq!(t.service, ServiceKey::new("other", "api"));
        assert_eq!(t.port, 8080);
        assert_eq!(
            (r.route.namespace.as_str(), r.route.name.as_str()),
            ("demo", "web-routes")
        );
        assert_eq!(r.timeout, Some(std::time::Duration::from_millis(250)));
        let r = apply(&v, &web, "/split").unwrap().unwrap();
        assert_eq!(
            r.target.unwrap().service.name,
            "empty",
            "weight 0 is never picked"
        );
        assert!(matches!(apply(&v, &web, "/"), Err(Error::NoRouteMatch(_))));
        let r = apply(&v, &web, "/none").unwrap().unwrap();
        assert_eq!(r.route.name, "web-routes", "counted under its route");
        let e = r.target.unwrap_err();
        assert_eq!(e.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            e.to_string(),
            "HTTPRoute demo/web-routes: the matching rule has no backendRefs"
        );
        let e = apply(&v, &web, "/db").unwrap().unwrap().target.unwrap_err();
        assert_eq!(
            e.to_string(),
            "HTTPRoute demo/web-routes: backend demo/db:5432 is not an HTTP port of a mesh service"
        );
        // Other services, and a client that dialled an endpoint itself, are not routed.
        let api = route(&v, "api.other:8080").unwrap();
        assert!(apply(&v, &api, "/api").unwrap().is_none());
        let pinned = v.lookup("127.0.0.1:2".parse().unwrap()).unwrap();
        assert!(apply(&v, &pinned, "/api").unwrap().is_none());
    }
}
