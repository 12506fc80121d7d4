//! HTTP routes as proxies apply them, their wire form, and the choice of rule and backend.
//!
//! The control plane validates Gateway API `HTTPRoute`s whose parents are Services (the
//! GAMMA pattern) and sends the result; a proxy applies them to the requests its app sends.
//! This file is plain data, parsing and two pure functions: [`RouteTable::select`] picks
//! the rule a request follows, [`RouteRule::pick`] one of its backends by weight.
//!
//! Semantics follow the Gateway API, so a user coming from Istio or Linkerd keeps their
//! routes as they are:
//! - a route in the namespace of the Service it attaches to (a *producer* route) applies
//!   to every client; a route in the client's own namespace (a *consumer* route) applies to
//!   that namespace's clients only and, when one exists for a Service, replaces the
//!   producer routes for them;
//! - among all rules of the routes that apply, the most specific match wins: an exact path,
//!   then the longest path prefix, then a method, then the most header matches, then the
//!   most query-parameter matches; remaining ties go to the route first by namespace/name
//!   (the Gateway API's second tie-breaker: proxies do not know creation times) and to
//!   rules and matches in their order;
//! - a request that no rule matches is answered 404; a rule with no backend that can be
//!   picked (none, or every weight 0) is answered 500.

use std::collections::HashMap;
use std::time::Duration;

use crate::ServiceKey;
use crate::discovery::v1 as pb;

/// One HTTPRoute, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct HttpRoute {
    /// Namespace of the route.
    pub namespace: String,
    /// Name of the route.
    pub name: String,
    /// The Services it attaches to (at least one).
    pub parents: Vec<RouteParent>,
    /// Its rules, in order (at least one).
    pub rules: Vec<RouteRule>,
}

/// A Service a route attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct RouteParent {
    /// The Service.
    pub service: ServiceKey,
    /// One of its ports, or `None` for all of them.
    pub port: Option<u16>,
}

/// One rule of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct RouteRule {
    /// The rule's name, or empty.
    pub name: String,
    /// Any of them; empty: every request.
    pub matches: Vec<RouteMatch>,
    /// Where matching requests go.
    pub backends: Vec<Backend>,
    /// `timeouts.request`: how long the backend may take to start its response; `None`:
    /// the proxy's own request timeout. Shown as `timeout_ms`.
    #[serde(rename = "timeout_ms", serialize_with = "millis")]
    pub timeout: Option<Duration>,
}

/// Conditions on a request; every one that is set must hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct RouteMatch {
    /// The path condition.
    pub path: PathMatch,
    /// An upper-case method, or `None` for any.
    pub method: Option<String>,
    /// Header names (lower case) with the exact value one of their values must have.
    pub headers: Vec<(String, String)>,
    /// Query parameter names with the exact value (as sent) the first of them must have.
    pub query: Vec<(String, String)>,
}

/// How a request path is matched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// A prefix of whole segments: `/a` matches `/a` and `/a/b`, not `/ab`. A trailing
    /// `/` of the prefix is not significant (except for `/` itself).
    Prefix(String),
}

/// A Service port that receives a share of a rule's requests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Backend {
    /// The Service.
    pub service: ServiceKey,
    /// The Service port.
    pub port: u16,
    /// Relative share; 0 is never picked.
    pub weight: u32,
}

/// Why a route from the wire was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A required field was empty.
    #[error("{0} is empty")]
    Empty(String),
    /// A port above 65535 (or 0 where a port is required).
    #[error("{field} = {port} is not a port (1..=65535)")]
    BadPort {
        /// Path of the field, e.g. `rules[0].backends[1].port`.
        field: String,
        /// The value received.
        port: u32,
    },
    /// A path that does not start with `/`.
    #[error("{field} = {value:?} does not start with \"/\"")]
    BadPath {
        /// Path of the field.
        field: String,
        /// The value received.
        value: String,
    },
    /// A path match without a kind this proxy knows.
    #[error("{field} has unknown path match kind {kind}")]
    UnknownPathKind {
        /// Path of the field.
        field: String,
        /// The value received.
        kind: i32,
    },
    /// Two routes of the same namespace and name.
    #[error("appears twice")]
    Duplicate,
}

/// What a request is matched on.
pub struct RouteRequest<'a> {
    /// The method as sent.
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The query (after `?`), or empty.
    pub query: &'a str,
    /// Whether the request carries header `name` (lower case) with value `value`.
    pub has_header: &'a dyn Fn(&str, &str) -> bool,
}

/// The rule a request follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection<'a> {
    /// No route attaches to the service port: it is used as it is.
    Unrouted,
    /// Routes attach, and none of their rules matches: answer 404.
    NoMatch,
    /// This rule of this route.
    Rule {
        /// The route.
        route: &'a HttpRoute,
        /// The rule that matched.
        rule: &'a RouteRule,
    },
}

/// The routes that apply to one client, indexed by the Service they attach to.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<HttpRoute>,
    /// parent service -> indexes into `routes`, in order.
    by_parent: HashMap<ServiceKey, Vec<usize>>,
}

// === impl HttpRoute ===

impl HttpRoute {
    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

// === impl RouteTable ===

impl RouteTable {
    /// The routes of `routes` that apply to a client in namespace `client_namespace`:
    /// for each parent Service, its consumer routes from that namespace when there are
    /// any, else its producer routes. Routes of other namespaces are ignored.
    pub fn new(routes: &[HttpRoute], client_namespace: &str) -> Self {
        let mut routes = routes.to_vec();
        routes.sort();
        let mut consumer: HashMap<ServiceKey, Vec<usize>> = HashMap::new();
        let mut producer: HashMap<ServiceKey, Vec<usize>> = HashMap::new();
        for (i, route) in routes.iter().enumerate() {
            for parent in &route.parents {
                let side = if route.namespace == parent.service.namespace {
                    &mut producer
                } else if route.namespace == client_namespace {
                    &mut consumer
                } else {
                    continue;
                };
                let list = side.entry(parent.service.clone()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        // A consumer route for a service replaces that service's producer routes.
        producer.extend(consumer);
        Self {
            routes,
            by_parent: producer,
        }
    }

    /// True when no route applies.
    pub fn is_empty(&self) -> bool {
        self.by_parent.is_empty()
    }

    /// True when a route applies to some port of `service`: only then is a request to it
    /// worth looking at.
    pub fn attached(&self, service: &ServiceKey) -> bool {
        self.by_parent.contains_key(service)
    }

    /// The rule a request to `port` of `service` follows.
    pub fn select(&self, service: &ServiceKey, port: u16, req: &RouteRequest<'_>) -> Selection<'_> {
        let Some(candidates) = self.by_parent.get(service) else {
            return Selection::Unrouted;
        };
        let mut attached = false;
        let mut best: Option<(Rank, &HttpRoute, &RouteRule)> = None;
        for &i in candidates {
            let route = &self.routes[i];
            let on_port = route
                .parents
                .iter()
                .any(|p| &p.service == service && p.port.is_none_or(|p| p == port));
            if !on_port {
                continue;
            }
            attached = true;
            for rule in &route.rules {
                let rank = if rule.matches.is_empty() {
                    Some(Rank::catch_all())
                } else {
                    rule.matches
                        .iter()
                        .filter(|m| m.matches(req))
                        .map(Rank::of)
                        .max()
                };
                // Strictly greater: earlier routes and rules win ties.
                if let Some(rank) = rank
                    && best.as_ref().is_none_or(|(b, _, _)| rank > *b)
                {
                    best = Some((rank, route, rule));
                }
            }
        }
        match best {
            Some((_, route, rule)) => Selection::Rule { route, rule },
            None if attached => Selection::NoMatch,
            None => Selection::Unrouted,
        }
    }
}

/// How specific a match is, compared in Gateway API precedence order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    exact: bool,
    prefix_len: usize,
    method: bool,
    headers: usize,
    query: usize,
}

impl Rank {
    fn catch_all() -> Self {
        Self {
            exact: false,
            prefix_len: 1,
            method: false,
            headers: 0,
            query: 0,
        }
    }

    fn of(m: &RouteMatch) -> Self {
        let (exact, prefix_len) = match &m.path {
            PathMatch::Exact(_) => (true, 0),
            PathMatch::Prefix(p) => (false, p.len()),
        };
        Self {
            exact,
            prefix_len,
            method: m.method.is_some(),
            headers: m.headers.len(),
            query: m.query.len(),
        }
    }
}

// === impl RouteMatch ===

impl RouteMatch {
    /// Whether `req` meets every condition.
    pub fn matches(&self, req: &RouteRequest<'_>) -> bool {
        self.path.matches(req.path)
            && self.method.as_deref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(n, v)| (req.has_header)(n, v))
            && self
                .query
                .iter()
                .all(|(n, v)| first_query_value(req.query, n) == Some(v.as_str()))
    }
}

/// The value of the first parameter named `name` in `query` (`a=1&b=2`); a parameter
/// without `=` has the empty value.
fn first_query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        (n == name).then_some(v)
    })
}

// === impl PathMatch ===

impl PathMatch {
    /// Whether `path` (no query) meets this condition.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(p) => path == p,
            Self::Prefix(p) => {
                let p = if p.len() > 1 {
                    p.trim_end_matches('/')
                } else {
                    p.as_str()
                };
                p == "/"
                    || path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        }
    }
}

// === impl RouteRule ===

impl RouteRule {
    /// The backend for a request, given a uniformly random `roll`: each backend's share is
    /// its weight over the sum of weights. `None` when no backend can be picked (none, or
    /// every weight 0).
    pub fn pick(&self, roll: u64) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = roll % total;
        for b in &self.backends {
            let w = u64::from(b.weight);
            if point < w {
                return Some(b);
            }
            point -= w;
        }
        None
    }
}

/// A timeout as whole milliseconds (`null` when unset), for debug output.
fn millis<S: serde::Serializer>(t: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_u128(t.as_millis()),
        None => s.serialize_none(),
    }
}

// === wire ===

/// The wire form of a set of routes.
pub fn routes_to_wire(routes: &[HttpRoute]) -> pb::HttpRoutes {
    pb::HttpRoutes {
        routes: routes.iter().map(pb::HttpRoute::from).collect(),
    }
}

/// A set of routes from the wire, sorted by namespace and name; the first bad route
/// refuses the set, naming it (`Err((key, error))`).
pub fn routes_from_wire(wire: &pb::HttpRoutes) -> Result<Vec<HttpRoute>, (String, RouteError)> {
    let mut routes = wire
        .routes
        .iter()
        .map(|r| HttpRoute::try_from(r).map_err(|e| (format!("{}/{}", r.namespace, r.name), e)))
        .collect::<Result<Vec<_>, _>>()?;
    routes.sort();
    if let Some(pair) = routes
        .windows(2)
        .find(|w| (&w[0].namespace, &w[0].name) == (&w[1].namespace, &w[1].name))
    {
        return Err((pair[0].key(), RouteError::Duplicate));
    }
    Ok(routes)
}

impl From<&HttpRoute> for pb::HttpRoute {
    fn from(r: &HttpRoute) -> Self {
        Self {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            parents: r
                .parents
                .iter()
                .map(|p| pb::RouteParent {
                    namespace: p.service.namespace.clone(),
                    name: p.service.name.clone(),
                    port: p.port.map_or(0, u32::from),
                })
                .collect(),
            rules: r.rules.iter().map(pb::RouteRule::from).collect(),
        }
    }
}

impl From<&RouteRule> for pb::RouteRule {
    fn from(rule: &RouteRule) -> Self {
        let pairs = |v: &[(String, String)]| {
            v.iter()
                .map(|(name, value)| pb::RouteValueMatch {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect()
        };
        Self {
            name: rule.name.clone(),
            matches: rule
                .matches
                .iter()
                .map(|m| {
                    let (kind, path) = match &m.path {
                        PathMatch::Exact(p) => (pb::RoutePathMatch::Exact, p),
                        PathMatch::Prefix(p) => (pb::RoutePathMatch::Prefix, p),
                    };
                    pb::RouteMatch {
                        path_kind: kind.into(),
                        path: path.clone(),
                        method: m.method.clone().unwrap_or_default(),
                        headers: pairs(&m.headers),
                        query_params: pairs(&m.query),
                    }
                })
                .collect(),
            backends: rule
                .backends
                .iter()
                .map(|b| pb::RouteBackend {
                    namespace: b.service.namespace.clone(),
                    name: b.service.name.clone(),
                    port: u32::from(b.port),
                    weight: b.weight,
                })
                .collect(),
            request_timeout_ms: rule
                .timeout
                .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

impl TryFrom<&pb::HttpRoute> for HttpRoute {
    type Error = RouteError;

    fn try_from(r: &pb::HttpRoute) -> Result<Self, RouteError> {
        let nonempty = |v: &str, field: &str| {
            if v.is_empty() {
                Err(RouteError::Empty(field.to_owned()))
            } else {
                Ok(v.to_owned())
            }
        };
        let namespace = nonempty(&r.namespace, "namespace")?;
        let name = nonempty(&r.name, "name")?;
        if r.parents.is_empty() {
            return Err(RouteError::Empty("parents".into()));
        }
        if r.rules.is_empty() {
            return Err(RouteError::Empty("rules".into()));
        }
        let parents = r
            .parents
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let field = format!("parents[{i}]");
                Ok(RouteParent {
                    service: ServiceKey::new(
                        nonempty(&p.namespace, &format!("{field}.namespace"))?,
                        nonempty(&p.name, &format!("{field}.name"))?,
                    ),
                    port: match p.port {
                        0 => None,
                        n => Some(port(n, &format!("{field}.port"))?),
                    },
                })
            })
            .collect::<Result<_, RouteError>>()?;
        let rules = r
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| rule_from_wire(rule, &format!("rules[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            namespace,
            name,
            parents,
            rules,
        })
    }
}

fn rule_from_wire(rule: &pb::RouteRule, field: &str) -> Result<RouteRule, RouteError> {
    let pairs = |v: &[pb::RouteValueMatch], field: String| {
        v.iter()
            .enumerate()
            .map(|(i, p)| {
                if p.name.is_empty() {
                    Err(RouteError::Empty(format!("{field}[{i}].name")))
                } else {
                    Ok((p.name.clone(), p.value.clone()))
                }
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let matches = rule
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("{field}.matches[{i}]");
            if !m.path.starts_with('/') {
                return Err(RouteError::BadPath {
                    field: format!("{field}.path"),
                    value: m.path.clone(),
                });
            }
            let path = match pb::RoutePathMatch::try_from(m.path_kind) {
                Ok(pb::RoutePathMatch::Exact) => PathMatch::Exact(m.path.clone()),
                Ok(pb::RoutePathMatch::Prefix) => PathMatch::Prefix(m.path.clone()),
                Ok(pb::RoutePathMatch::Unspecified) | Err(_) => {
                    return Err(RouteError::UnknownPathKind {
                        field: format!("{field}.path_kind"),
                        kind: m.path_kind,
                    });
                }
            };
            Ok(RouteMatch {
                path,
                method: (!m.method.is_empty()).then(|| m.method.clone()),
                headers: pairs(&m.headers, format!("{field}.headers"))?
                    .into_iter()
                    .map(|(n, v)| (n.to_ascii_lowercase(), v))
                    .collect(),
                query: pairs(&m.query_params, format!("{field}.query_params"))?,
            })
        })
        .collect::<Result<_, _>>()?;
    let backends = rule
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let field = format!("{field}.backends[{i}]");
            if b.namespace.is_empty() || b.name.is_empty() {
                return Err(RouteError::Empty(format!("{field}.name")));
            }
            Ok(Backend {
                service: ServiceKey::new(b.namespace.clone(), b.name.clone()),
                port: port(b.port, &format!("{field}.port"))?,
                weight: b.weight,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(RouteRule {
        name: rule.name.clone(),
        matches,
        backends,
        timeout: (rule.request_timeout_ms > 0)
            .then(|| Duration::from_millis(rule.request_timeout_ms)),
    })
}

fn port(n: u32, field: &str) -> Result<u16, RouteError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| RouteError::BadPort {
            field: field.to_owned(),
            port: n,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey::new(ns, name)
    }

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch {
            path: PathMatch::Prefix(p.into()),
            method: None,
            headers: vec![],
            query: vec![],
        }
    }

    fn rule(name: &str, matches: Vec<RouteMatch>, backend: &str) -> RouteRule {
        RouteRule {
            name: name.into(),
            matches,
            backends: vec![Backend {
                service: key("demo", backend),
                port: 80,
                weight: 1,
            }],
            timeout: None,
        }
    }

    fn route(ns: &str, name: &str, parent: &str, rules: Vec<RouteRule>) -> HttpRoute {
        HttpRoute {
            namespace: ns.into(),
            name: name.into(),
            parents: vec![RouteParent {
                service: key("demo", parent),
                port: None,
            }],
            rules,
        }
    }

    fn no_headers(_: &str, _: &str) -> bool {
        false
    }

    /// The rule name `select` picks for `method path?query` to demo/web:80.
    fn picked(
        table: &RouteTable,
        method: &str,
        target: &str,
        hdr: &dyn Fn(&str, &str) -> bool,
    ) -> String {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let req = RouteRequest {
            method,
            path,
            query,
            has_header: hdr,
        };
        match table.select(&key("demo", "web"), 80, &req) {
            Selection::Unrouted => "unrouted".into(),
            Selection::NoMatch => "404".into(),
            Selection::Rule { route, rule } => format!("{}#{}", route.name, rule.name),
        }
    }

    #[test]
    fn prefix_matches_whole_segments() {
        let p = PathMatch::Prefix("/api/".into());
        assert!(p.matches("/api"));
        assert!(p.matches("/api/v1"));
        assert!(!p.matches("/apiv1"));
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
        assert!(PathMatch::Exact("/a".into()).matches("/a"));
        assert!(!PathMatch::Exact("/a".into()).matches("/a/"));
    }

    #[test]
    fn most_specific_match_wins_across_routes() {
        let mut exact = prefix("/");
        exact.path = PathMatch::Exact("/api/login".into());
        let mut get = prefix("/api");
        get.method = Some("GET".into());
        let mut beta = prefix("/api");
        beta.headers = vec![("x-beta".into(), "1".into())];
        let mut q = prefix("/api");
        q.query = vec![("v".into(), "2".into())];
        let routes = vec![
            route(
                "demo",
                "b",
                "web",
                vec![rule("all", vec![prefix("/")], "web")],
            ),
            route(
                "demo",
                "a",
                "web",
                vec![
                    rule("api", vec![prefix("/api")], "web"),
                    rule("exact", vec![exact], "web"),
                    rule("get", vec![get], "web"),
                    rule("beta", vec![beta], "web"),
                    rule("query", vec![q], "web"),
                ],
            ),
        ];
        let t = RouteTable::new(&routes, "demo");
        let beta_hdr = |n: &str, v: &str| n == "x-beta" && v == "1";
        assert_eq!(picked(&t, "GET", "/", &no_headers), "b#all");
        assert_eq!(picked(&t, "GET", "/apix", &no_headers), "b#all");
        assert_eq!(picked(&t, "POST", "/api/login", &no_headers), "a#exact");
        assert_eq!(picked(&t, "GET", "/api/x", &beta_hdr), "a#get");
        assert_eq!(picked(&t, "POST", "/api/x", &beta_hdr), "a#beta");
        assert_eq!(picked(&t, "POST", "/api/x?v=2", &no_headers), "a#query");
        assert_eq!(picked(&t, "POST", "/api/x?v=3", &no_headers), "a#api");
        assert_eq!(picked(&t, "POST", "/api/x?w=1&v=2", &no_headers), "a#query");
    }

    #[test]
    fn ties_go_to_the_first_route_by_name_then_rule_order() {
        let routes = vec![
            route(
                "demo",
                "z",
                "web",
                vec![rule("z", vec![prefix("/")], "web")],
            ),
            route(
                "demo",
                "m",
                "web",
                vec![
                    rule("m1", vec![], "web"),
                    rule("m2", vec![prefix("/")], "web"),
                ],
            ),
        ];
        let t = RouteTable::new(&routes, "demo");
        assert_eq!(picked(&t, "GET", "/x", &no_headers), "m#m1");
    }

    #[test]
    fn attached_routes_without_a_match_answer_404_and_other_ports_are_unrouted() {
        let mut r = route(
            "demo",
            "r",
            "web",
            vec![rule("api", vec![prefix("/api")], "web")],
        );
        let t = RouteTable::new(std::slice::from_ref(&r), "other");
        assert_eq!(picked(&t, "GET", "/", &no_headers), "404");
        r.parents[0].port = Some(8080);
        let t = RouteTable::new(&[r], "other");
        assert_eq!(picked(&t, "GET", "/api", &no_headers), "unrouted");
    }

    #[test]
    fn consumer_routes_replace_producer_routes_for_their_namespace_only() {
        let producer = route("demo", "p", "web", vec![rule("p", vec![], "web")]);
        let consumer = route("shop", "c", "web", vec![rule("c", vec![], "web")]);
        let stranger = route("else", "s", "web", vec![rule("s", vec![], "web")]);
        let all = [producer, consumer, stranger];
        assert_eq!(
            picked(&RouteTable::new(&all, "shop"), "GET", "/", &no_headers),
            "c#c"
        );
        assert_eq!(
            picked(&RouteTable::new(&all, "demo"), "GET", "/", &no_headers),
            "p#p"
        );
        assert_eq!(
            picked(&RouteTable::new(&all, "else"), "GET", "/", &no_headers),
            "s#s"
        );
        assert_eq!(
            picked(&RouteTable::new(&all, "none"), "GET", "/", &no_headers),
            "p#p"
        );
        assert!(RouteTable::new(&[], "demo").is_empty());
    }

    #[test]
    fn weights_split_exactly_over_every_roll() {
        let mut r = rule("split", vec![], "v1");
        r.backends.push(Backend {
            service: key("demo", "v2"),
            port: 80,
            weight: 3,
        });
        r.backends.push(Backend {
            service: key("demo", "never"),
            port: 80,
            weight: 0,
        });
        let mut counts = HashMap::new();
        for roll in 0..400u64 {
            let b = r.pick(roll).map(|b| b.service.name.clone());
            *counts.entry(b).or_insert(0) += 1;
        }
        assert_eq!(counts.get(&Some("v1".into())), Some(&100));
        assert_eq!(counts.get(&Some("v2".into())), Some(&300));
        assert_eq!(counts.len(), 2);
        r.backends.iter_mut().for_each(|b| b.weight = 0);
        assert_eq!(r.pick(7), None);
        r.backends.clear();
        assert_eq!(r.pick(7), None);
    }

    #[test]
    fn routes_round_trip_and_bad_ones_name_the_field() {
        let mut m = prefix("/api");
        m.method = Some("GET".into());
        m.headers = vec![("x-canary".into(), "1".into())];
        m.query = vec![("v".into(), "2".into())];
        let mut r = route("demo", "web", "web", vec![rule("r", vec![m], "web-v2")]);
        r.rules[0].timeout = Some(Duration::from_millis(1500));
        r.parents[0].port = Some(80);
        let wire = routes_to_wire(std::slice::from_ref(&r));
        assert_eq!(routes_from_wire(&wire), Ok(vec![r.clone()]));

        let mut bad = wire.clone();
        bad.routes[0].rules[0].backends[0].port = 70000;
        assert_eq!(
            routes_from_wire(&bad).map_err(|(k, e)| format!("{k}: {e}")),
            Err("demo/web: rules[0].backends[0].port = 70000 is not a port (1..=65535)".into())
        );
        let mut bad = wire.clone();
        bad.routes[0].rules[0].matches[0].path = "api".into();
        assert!(matches!(
            routes_from_wire(&bad),
            Err((_, RouteError::BadPath { .. }))
        ));
        let mut bad = wire.clone();
        bad.routes[0].rules[0].matches[0].path_kind = 0;
        assert!(matches!(
            routes_from_wire(&bad),
            Err((_, RouteError::UnknownPathKind { .. }))
        ));
        let mut bad = wire.clone();
        bad.routes.push(bad.routes[0].clone());
        assert_eq!(
            routes_from_wire(&bad),
            Err(("demo/web".into(), RouteError::Duplicate))
        );
        let mut bad = wire;
        bad.routes[0].parents.clear();
        assert_eq!(
            routes_from_wire(&bad),
            Err(("demo/web".into(), RouteError::Empty("parents".into())))
        );
    }
}
