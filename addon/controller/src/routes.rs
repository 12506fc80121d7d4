//! HTTPRoutes (Gateway API, GAMMA): the checks both sources apply, their translation into
//! the routes proxies apply (`trellis_api::route`), and the reporting of invalid ones.
//!
//! **Whose route.** A route is the mesh's when one of its `parentRefs` is a Service
//! (`group: ""` or `core`, `kind: Service`; upstream's defaults make a bare parentRef a
//! Gateway). Other parents (Gateways) are some ingress controller's and ignored, and a
//! route without a Service parent is ignored whole: no check, no translation, no error.
//!
//! **Checks** ([`problems`]), every problem with the path of its field
//! (`spec.rules[0].matches[1].path.value: ...`), refusing what the mesh cannot honour:
//! - `metadata.name` a DNS-1123 subdomain, `metadata.namespace` a DNS-1123 label;
//! - Service parents: a DNS-1123 label name (and namespace; absent: the route's), `port`
//!   1..=65535 when given, no `sectionName`, each Service once (the upstream CEL rule);
//! - rules: at least one, at most [`MAX_ROUTE_RULES`] with at most [`MAX_ROUTE_MATCHES`]
//!   matches each and [`MAX_ROUTE_TOTAL_MATCHES`] in all; rule names DNS-1123 subdomains,
//!   unique;
//! - matches: path `Exact` or `PathPrefix` (`RegularExpression` is refused) with a value
//!   that starts with `/` and passes upstream's other path rules (no `//`, `/./`, `/../`,
//!   `%2F`, `#`, no trailing `/.` or `/..`, only URL path characters, at most 1024);
//!   header and query parameter matches `Exact` only, at most [`MAX_ROUTE_VALUE_MATCHES`]
//!   of each, names HTTP tokens, each name once; the method one of upstream's nine;
//! - backendRefs: at most [`MAX_ROUTE_BACKENDS`], core `Service`s in the route's own
//!   namespace (another namespace needs a ReferenceGrant, not supported), `port` required,
//!   `weight` 0..=[`MAX_BACKEND_WEIGHT`];
//! - `filters` (of a rule or of a backend) are refused: not supported yet;
//! - `timeouts.request` in the Gateway API duration format (`10s`, `500ms`, `1h2m`);
//!   `timeouts.backendRequest` is refused (not supported);
//! - `hostnames` are ignored: a Service parent is reached by its own names and addresses.
//!
//! **Translation** ([`translate_routes`]): the mesh's valid routes, sorted by namespace and
//! name: parents are the Service parents (namespace resolved), rules in order, an empty
//! `matches` stays empty (every request), header names lower case (a later match on an
//! equivalent name is ignored, as upstream says), backends in the route's namespace,
//! `timeouts.request` as the rule's timeout (`0s`: none of the route's).
//!
//! **Invalid routes.** The file source refuses a directory holding one. The Kubernetes
//! source cannot refuse: a route with problems is left out of the snapshot, so requests to
//! its Services go to them as if it did not exist, which is the safe direction for a
//! route (unlike a policy, nothing has to fail closed). [`InvalidRoutes`] warns once per
//! change, naming the route and its fields, and counts them in
//! `trellis_controller_invalid_routes`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;
use trellis_api::ServiceKey;
use trellis_api::route::{self as api, PathMatch};

use crate::authorization::{parse_error, shown};
use crate::httproute::{
    GATEWAY_GROUP, HttpBackendRef, HttpRouteMatch, HttpRouteRule, HttpRouteSpec, HttpValueMatch,
    ParentReference,
};
use crate::invalid::Ledger;
use crate::metrics::InvalidCount;
use crate::objects::{ObjectMeta, Objects, Route};
use crate::validate::{FieldError, dns_label, dns_subdomain};

/// Most rules in a route (upstream's `maxItems`).
pub const MAX_ROUTE_RULES: usize = 16;
/// Most matches in one rule (upstream's `maxItems`).
pub const MAX_ROUTE_MATCHES: usize = 64;
/// Most matches in all the rules of a route (upstream's CEL rule).
pub const MAX_ROUTE_TOTAL_MATCHES: usize = 128;
/// Most backendRefs in one rule (upstream's `maxItems`).
pub const MAX_ROUTE_BACKENDS: usize = 16;
/// Most parentRefs in a route (upstream's `maxItems`).
pub const MAX_ROUTE_PARENTS: usize = 32;
/// Most header matches, and most query parameter matches, in one match.
pub const MAX_ROUTE_VALUE_MATCHES: usize = 16;
/// Largest backend weight (upstream's `maximum`).
pub const MAX_BACKEND_WEIGHT: i32 = 1_000_000;

/// The methods upstream's enum allows.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
/// Longest path value, header name, header value and query parameter value.
const MAX_PATH: usize = 1024;
const MAX_NAME: usize = 256;
const MAX_HEADER_VALUE: usize = 4096;
const MAX_QUERY_VALUE: usize = 1024;
/// Path values upstream refuses for `Exact` and `PathPrefix` (its CEL rules).
const PATH_FORBIDDEN: [&str; 6] = ["//", "/./", "/../", "%2f", "%2F", "#"];
const PATH_FORBIDDEN_ENDS: [&str; 2] = ["/..", "/."];
/// Most `<number><unit>` parts of a duration, and digits of a number.
const DURATION_PARTS: usize = 4;
const DURATION_DIGITS: usize = 5;

/// See [`Route::from_json_spec`].
pub(crate) fn from_json_spec(metadata: ObjectMeta, spec: &Value) -> Route {
    let error = match serde_path_to_error::deserialize::<_, HttpRouteSpec>(spec) {
        Ok(parsed) => return Route::new(metadata, parsed),
        Err(e) => parse_error("spec", e),
    };
    // Only whose route it is matters now: the parents, read leniently (with upstream's
    // defaults), so that a Gateway's route that this version cannot parse stays ignored
    // and a mesh route that it cannot parse is reported.
    let parent_refs = spec
        .get("parentRefs")
        .and_then(Value::as_array)
        .map(|refs| refs.iter().map(lenient_parent).collect())
        .unwrap_or_default();
    Route {
        metadata,
        spec: HttpRouteSpec {
            parent_refs,
            hostnames: Vec::new(),
            rules: Vec::new(),
        },
        parse_errors: vec![error],
    }
}

/// A parentRef as far as it reads: strings where strings are, defaults elsewhere.
fn lenient_parent(entry: &Value) -> ParentReference {
    let text = |key: &str| entry.get(key).and_then(Value::as_str).map(str::to_owned);
    ParentReference {
        group: text("group").unwrap_or_else(|| GATEWAY_GROUP.to_owned()),
        kind: text("kind").unwrap_or_else(|| "Gateway".to_owned()),
        namespace: text("namespace"),
        name: text("name").unwrap_or_default(),
        section_name: text("sectionName"),
        port: None,
    }
}

/// Every problem of `route`, in field order; none for a route that is not the mesh's.
pub(crate) fn problems(route: &Route) -> Vec<FieldError> {
    if !route.is_mesh() {
        return Vec::new();
    }
    let mut c = Checker::default();
    if let Err(why) = dns_subdomain(&route.metadata.name) {
        c.push(
            "metadata.name",
            format!("invalid name {}: {why}", shown(&route.metadata.name)),
        );
    }
    if let Err(why) = dns_label(&route.metadata.namespace) {
        c.push(
            "metadata.namespace",
            format!(
                "invalid namespace {}: {why}",
                shown(&route.metadata.namespace)
            ),
        );
    }
    // The spec as written did not parse: say why, and nothing more (the rest is a stand-in).
    if !route.parse_errors.is_empty() {
        for e in &route.parse_errors {
            c.push(e.field.clone(), e.message.clone());
        }
        return c.errors;
    }
    let spec = &route.spec;
    c.count("spec.parentRefs", spec.parent_refs.len(), MAX_ROUTE_PARENTS);
    let mut parents: BTreeMap<(String, &str), usize> = BTreeMap::new();
    let service_parents = spec.parent_refs.iter().enumerate().take(MAX_ROUTE_PARENTS);
    for (i, parent) in service_parents.filter(|(_, p)| p.is_service()) {
        let namespace = parent
            .namespace
            .clone()
            .unwrap_or_else(|| route.metadata.namespace.clone());
        c.parent(i, parent);
        if dns_label(&parent.name).is_ok()
            && let Some(first) = parents.insert((namespace.clone(), &parent.name), i)
        {
            parents.insert((namespace.clone(), &parent.name), first);
            c.push(
                format!("spec.parentRefs[{i}].name"),
                format!(
                    "duplicate parent Service {namespace}/{} (also spec.parentRefs[{first}])",
                    parent.name
                ),
            );
        }
    }
    if spec.rules.is_empty() {
        c.push("spec.rules", "at least one rule is required");
    }
    c.count("spec.rules", spec.rules.len(), MAX_ROUTE_RULES);
    let total: usize = spec.rules.iter().map(|r| r.matches.len()).sum();
    if total > MAX_ROUTE_TOTAL_MATCHES {
        c.push(
            "spec.rules",
            format!("has {total} matches in all; at most {MAX_ROUTE_TOTAL_MATCHES} are accepted"),
        );
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (r, rule) in spec.rules.iter().enumerate().take(MAX_ROUTE_RULES) {
        if let Some(name) = &rule.name {
            let at = format!("spec.rules[{r}].name");
            if let Err(why) = dns_subdomain(name) {
                c.push(at, format!("invalid rule name {}: {why}", shown(name)));
            } else if let Some(first) = names.insert(name, r) {
                names.insert(name, first);
                c.push(
                    at,
                    format!("duplicate rule name {name:?} (also spec.rules[{first}].name)"),
                );
            }
        }
        c.rule(&format!("spec.rules[{r}]"), rule, &route.metadata.namespace);
    }
    c.errors
}

/// Accumulates problems.
#[derive(Default)]
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// A list of `len` entries at `field` may hold at most `max`; only that many are
    /// checked further, so a huge list gives one problem, not thousands.
    fn count(&mut self, field: &str, len: usize, max: usize) {
        if len > max {
            self.push(
                field,
                format!("has {len} entries; at most {max} are accepted"),
            );
        }
    }

    /// A port given as an int32, at `field`.
    fn port(&mut self, field: String, port: i32) {
        if !(1..=65535).contains(&port) {
            self.push(field, format!("must be between 1 and 65535, got {port}"));
        }
    }

    fn parent(&mut self, i: usize, parent: &ParentReference) {
        let at = |field: &str| format!("spec.parentRefs[{i}].{field}");
        if let Some(namespace) = &parent.namespace
            && let Err(why) = dns_label(namespace)
        {
            self.push(
                at("namespace"),
                format!("invalid namespace {}: {why}", shown(namespace)),
            );
        }
        if let Err(why) = dns_label(&parent.name) {
            self.push(
                at("name"),
                format!("invalid Service name {}: {why}", shown(&parent.name)),
            );
        }
        if parent.section_name.is_some() {
            self.push(
                at("sectionName"),
                "is not supported for a Service parent; use port to attach to one port",
            );
        }
        if let Some(port) = parent.port {
            self.port(at("port"), port);
        }
    }

    fn rule(&mut self, at: &str, rule: &HttpRouteRule, namespace: &str) {
        let matches = format!("{at}.matches");
        self.count(&matches, rule.matches.len(), MAX_ROUTE_MATCHES);
        for (m, one) in rule.matches.iter().enumerate().take(MAX_ROUTE_MATCHES) {
            self.route_match(&format!("{matches}[{m}]"), one);
        }
        if !rule.filters.is_empty() {
            self.push(format!("{at}.filters"), "filters are not supported yet");
        }
        let backends = format!("{at}.backendRefs");
        self.count(&backends, rule.backend_refs.len(), MAX_ROUTE_BACKENDS);
        for (b, backend) in rule
            .backend_refs
            .iter()
            .enumerate()
            .take(MAX_ROUTE_BACKENDS)
        {
            self.backend(&format!("{backends}[{b}]"), backend, namespace);
        }
        if let Some(timeouts) = &rule.timeouts {
            if let Some(request) = &timeouts.request
                && let Err(why) = gateway_duration(request)
            {
                self.push(format!("{at}.timeouts.request"), why);
            }
            if timeouts.backend_request.is_some() {
                self.push(
                    format!("{at}.timeouts.backendRequest"),
                    "is not supported; use timeouts.request",
                );
            }
        }
    }

    fn route_match(&mut self, at: &str, m: &HttpRouteMatch) {
        let path = &m.path;
        match path.match_type.as_str() {
            "Exact" | "PathPrefix" => {
                if let Err(why) = path_value(&path.value) {
                    self.push(format!("{at}.path.value"), why);
                }
            }
            "RegularExpression" => self.push(
                format!("{at}.path.type"),
                "RegularExpression is not supported; use Exact or PathPrefix",
            ),
            other => self.push(
                format!("{at}.path.type"),
                format!(
                    "{} is not a known path match type: use Exact or PathPrefix",
                    shown(other)
                ),
            ),
        }
        self.values(&format!("{at}.headers"), &m.headers, MAX_HEADER_VALUE);
        self.values(
            &format!("{at}.queryParams"),
            &m.query_params,
            MAX_QUERY_VALUE,
        );
        if let Some(method) = &m.method
            && !METHODS.contains(&method.as_str())
        {
            self.push(
                format!("{at}.method"),
                format!(
                    "{} is not a method: one of {}",
                    shown(method),
                    METHODS.join(", ")
                ),
            );
        }
    }

    /// Header or query parameter matches at `field`.
    fn values(&mut self, field: &str, values: &[HttpValueMatch], max_value: usize) {
        self.count(field, values.len(), MAX_ROUTE_VALUE_MATCHES);
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, v) in values.iter().enumerate().take(MAX_ROUTE_VALUE_MATCHES) {
            let at = |f: &str| format!("{field}[{i}].{f}");
            match v.match_type.as_str() {
                "Exact" => {}
                "RegularExpression" => {
                    self.push(at("type"), "RegularExpression is not supported; use Exact");
                }
                other => self.push(
                    at("type"),
                    format!("{} is not a known match type: use Exact", shown(other)),
                ),
            }
            if let Err(why) = token(&v.name) {
                self.push(at("name"), why);
            } else if let Some(first) = seen.insert(&v.name, i) {
                seen.insert(&v.name, first);
                self.push(
                    at("name"),
                    format!("duplicate name {:?} (also {field}[{first}])", v.name),
                );
            }
            let chars = v.value.chars().count();
            if chars == 0 || chars > max_value {
                self.push(
                    at("value"),
                    format!("must be 1 to {max_value} characters, got {chars}"),
                );
            }
        }
    }

    fn backend(&mut self, at: &str, b: &HttpBackendRef, namespace: &str) {
        let field = |f: &str| format!("{at}.{f}");
        if !b.group.is_empty() {
            self.push(
                field("group"),
                format!(
                    "{} is not the core group: a Service backend's group is \"\" (or leave it \
                     out)",
                    shown(&b.group)
                ),
            );
        }
        if b.kind != "Service" {
            self.push(
                field("kind"),
                format!("{} is not supported: only Service", shown(&b.kind)),
            );
        }
        if let Err(why) = dns_label(&b.name) {
            self.push(
                field("name"),
                format!("invalid Service name {}: {why}", shown(&b.name)),
            );
        }
        if let Some(ns) = &b.namespace
            && ns != namespace
        {
            self.push(
                field("namespace"),
                format!(
                    "{} is not the route's namespace {namespace:?}: a backend in another \
                     namespace needs a ReferenceGrant, which is not supported",
                    shown(ns)
                ),
            );
        }
        match b.port {
            Some(port) => self.port(field("port"), port),
            None => self.push(field("port"), "is required for a Service backend"),
        }
        if !(0..=MAX_BACKEND_WEIGHT).contains(&b.weight) {
            self.push(
                field("weight"),
                format!(
                    "must be between 0 and {MAX_BACKEND_WEIGHT}, got {}",
                    b.weight
                ),
            );
        }
        if !b.filters.is_empty() {
            self.push(field("filters"), "filters are not supported yet");
        }
    }
}

/// An `Exact` or `PathPrefix` value, by upstream's rules.
fn path_value(value: &str) -> Result<(), String> {
    if !value.starts_with('/') {
        return Err(format!("{} does not start with \"/\"", shown(value)));
    }
    let chars = value.chars().count();
    if chars > MAX_PATH {
        return Err(format!(
            "is {chars} characters long; at most {MAX_PATH} are accepted"
        ));
    }
    if let Some(bad) = PATH_FORBIDDEN.iter().find(|f| value.contains(**f)) {
        return Err(format!("{} must not contain {bad:?}", shown(value)));
    }
    if let Some(bad) = PATH_FORBIDDEN_ENDS.iter().find(|f| value.ends_with(**f)) {
        return Err(format!("{} must not end with {bad:?}", shown(value)));
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let ok = if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
            i += 2;
            hex
        } else {
            b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&b)
        };
        if !ok {
            return Err(format!(
                "{} holds a character a URL path cannot (a query, a space, a bare '%'?)",
                shown(value)
            ));
        }
        i += 1;
    }
    Ok(())
}

/// A header or query parameter name: an HTTP token of at most [`MAX_NAME`] characters.
fn token(name: &str) -> Result<(), String> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(tchar) {
        return Err(format!(
            "{} is not a name: 1 to {MAX_NAME} letters, digits or !#$%&'*+-.^_`|~",
            shown(name)
        ));
    }
    Ok(())
}

/// A Gateway API duration (GEP-2257): 1 to 4 parts of up to 5 digits and a unit (`h`,
/// `m`, `s`, `ms`), added up (`1h30m`, `1s500ms`).
pub(crate) fn gateway_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{} is not a Gateway API duration: 1 to {DURATION_PARTS} parts of a number (at \
             most {DURATION_DIGITS} digits) and a unit h, m, s or ms, e.g. \"10s\", \"500ms\", \
             \"1h30m\"",
            shown(text)
        )
    };
    let mut rest = text.as_bytes();
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > DURATION_DIGITS || parts == DURATION_PARTS {
            return Err(bad());
        }
        let number = rest[..digits]
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        rest = &rest[digits..];
        let (millis, len) = match rest {
            [b'm', b's', ..] => (1, 2),
            [b'h', ..] => (3_600_000, 1),
            [b'm', ..] => (60_000, 1),
            [b's', ..] => (1_000, 1),
            _ => return Err(bad()),
        };
        rest = &rest[len..];
        total += Duration::from_millis(number * millis);
        parts += 1;
    }
    if parts == 0 {
        return Err(bad());
    }
    Ok(total)
}

/// The mesh's valid routes of `objects`, as proxies apply them, sorted by namespace and
/// name. Routes with problems are left out (report them with [`InvalidRoutes`]).
pub(crate) fn translate_routes(objects: &Objects) -> Vec<api::HttpRoute> {
    // The map is keyed by (namespace, name): its order is the order proxies expect.
    objects
        .routes
        .values()
        .filter(|r| r.is_mesh() && problems(r).is_empty())
        .filter_map(|r| {
            let translated = translate_route(r);
            if translated.is_none() {
                tracing::warn!(route = %r.metadata.key(), "HTTPRoute does not translate; left out");
            }
            translated
        })
        .collect()
}

/// A valid mesh route as proxies apply it; `None` if a value does not convert after all.
fn translate_route(route: &Route) -> Option<api::HttpRoute> {
    let namespace = &route.metadata.namespace;
    let parents = route
        .spec
        .parent_refs
        .iter()
        .filter(|p| p.is_service())
        .map(|p| {
            Some(api::RouteParent {
                service: ServiceKey::new(p.namespace.as_deref().unwrap_or(namespace), &p.name),
                port: match p.port {
                    Some(port) => Some(u16::try_from(port).ok()?),
                    None => None,
                },
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let rules = route
        .spec
        .rules
        .iter()
        .map(|rule| translate_rule(rule, namespace))
        .collect::<Option<Vec<_>>>()?;
    Some(api::HttpRoute {
        namespace: namespace.clone(),
        name: route.metadata.name.clone(),
        parents,
        rules,
    })
}

fn translate_rule(rule: &HttpRouteRule, namespace: &str) -> Option<api::RouteRule> {
    let matches = rule
        .matches
        .iter()
        .map(|m| {
            let path = match m.path.match_type.as_str() {
                "Exact" => PathMatch::Exact(m.path.value.clone()),
                "PathPrefix" => PathMatch::Prefix(m.path.value.clone()),
                _ => return None,
            };
            // Header names are case-insensitive: the first of equivalent names counts.
            let mut seen = BTreeSet::new();
            let headers = m
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .filter(|(name, _)| seen.insert(name.clone()))
                .collect();
            Some(api::RouteMatch {
                path,
                method: m.method.clone(),
                headers,
                query: m
                    .query_params
                    .iter()
                    .map(|q| (q.name.clone(), q.value.clone()))
                    .collect(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let backends = rule
        .backend_refs
        .iter()
        .map(|b| {
            Some(api::Backend {
                service: ServiceKey::new(namespace, &b.name),
                port: u16::try_from(b.port?).ok()?,
                weight: u32::try_from(b.weight).ok()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let timeout = match rule.timeouts.as_ref().and_then(|t| t.request.as_deref()) {
        Some(text) => Some(gateway_duration(text).ok()?).filter(|t| !t.is_zero()),
        None => None,
    };
    Some(api::RouteRule {
        name: rule.name.clone().unwrap_or_default(),
        matches,
        backends,
        timeout,
    })
}

/// Reports the mesh's routes with problems that reach translation (from Kubernetes): a
/// warning for each, once per distinct set of problems, saying it is left out; an info
/// line when one is fixed or deleted; and their number in
/// `trellis_controller_invalid_routes`.
#[derive(Debug, Default)]
pub struct InvalidRoutes {
    ledger: Ledger,
}

impl InvalidRoutes {
    /// A reporter that logs only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also keeps the count in `metrics` ([`InvalidCount::routes`]).
    #[must_use]
    pub fn with_metrics(self, metrics: InvalidCount) -> Self {
        Self {
            ledger: self.ledger.with_metrics(metrics),
        }
    }

    /// Checks every route of `objects` (call it with the objects given to
    /// [`translate`](crate::translate)) and returns how many of the mesh's have problems.
    pub fn report(&mut self, objects: &Objects) -> usize {
        self.ledger.update(
            &objects.routes,
            problems,
            |key, route, _, lines| {
                let services: Vec<String> = (route.spec.parent_refs.iter())
                    .filter(|p| p.is_service())
                    .map(|p| {
                        let ns = p.namespace.as_deref().unwrap_or(&key.namespace);
                        format!("{ns}/{}", p.name)
                    })
                    .collect();
                tracing::warn!(
                    route = %key,
                    services = %services.join(", "),
                    problems = %lines,
                    "invalid HTTPRoute: left out until it is fixed; its Services are served \
                     as if it did not exist"
                );
            },
            |key| tracing::info!(route = %key, "HTTPRoute no longer invalid (fixed or deleted)"),
        )
    }
}

#[cfg(test)]
mod tests;
