//! `gateway.networking.k8s.io/v1` **HTTPRoute**: the Gateway API's type, as plain serde
//! structs.
//!
//! Trellis does not own this CRD (the Gateway API project does; install its standard
//! channel), so nothing here generates a schema: these types read what the upstream
//! schema accepts (camelCase names, its defaults) and refuse any other field. Defaults are
//! upstream's, applied when a field is absent, as the API server does:
//!
//! | field | default |
//! | --- | --- |
//! | `parentRefs[].group` / `kind` | `gateway.networking.k8s.io` / `Gateway` |
//! | `rules` | one rule with one match: `PathPrefix` `/` |
//! | `rules[].matches` | one match: `PathPrefix` `/` |
//! | `matches[].path` (`type` / `value`) | `PathPrefix` / `/` |
//! | `headers[].type`, `queryParams[].type` | `Exact` |
//! | `backendRefs[].group` / `kind` / `weight` | `""` / `Service` / `1` |
//!
//! So a route attaches to a Service (the GAMMA pattern) only when its parentRef says so
//! whole: `group: ""` (or `core`) and `kind: Service`. What Trellis honours of the rest,
//! and what it refuses, is checked by [`Route::problems`](crate::Route::problems).
//!
//! ```yaml
//! apiVersion: gateway.networking.k8s.io/v1
//! kind: HTTPRoute
//! metadata:
//!   name: web-canary
//!   namespace: demo
//! spec:
//!   parentRefs:
//!     - group: ""                 # core: a Service, not a Gateway
//!       kind: Service
//!       name: web
//!       port: 80                  # optional: every port when absent
//!   rules:
//!     - backendRefs:
//!         - {name: web-v1, port: 80, weight: 90}
//!         - {name: web-v2, port: 80, weight: 10}
//! ```

use serde::Deserialize;
use serde_json::Value;

/// API group of the Gateway API kinds.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// `apiVersion` of the HTTPRoute kind Trellis reads.
pub const HTTP_ROUTE_API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// The kind's name.
pub const HTTP_ROUTE_KIND: &str = "HTTPRoute";
/// The kind's resource (URL plural).
pub const HTTP_ROUTE_PLURAL: &str = "httproutes";
/// The version of the resource Trellis reads.
pub const HTTP_ROUTE_VERSION: &str = "v1";
/// The name of the HTTPRoute CustomResourceDefinition.
pub const HTTP_ROUTE_CRD: &str = "httproutes.gateway.networking.k8s.io";
/// How to install the Gateway API's standard CRDs (HTTPRoute among them), which Trellis
/// reads but does not ship: the release whose schema Trellis is checked against.
pub const GATEWAY_API_INSTALL: &str = "kubectl apply -f \
    https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.6.1/standard-install.yaml";

/// The `spec` of an HTTPRoute.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// What the route attaches to: Gateways (not the mesh's, ignored) or Services.
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    /// Host names to match. A Service parent is reached by its own names and addresses,
    /// so the mesh ignores them (as the GAMMA pattern does).
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// The rules, in order; absent: one rule matching every path, without backends.
    #[serde(default = "default_rules")]
    pub rules: Vec<HttpRouteRule>,
}

/// A parent of the route (`ParentReference`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    /// API group; absent: `gateway.networking.k8s.io`. A Service's is `""` (or `core`).
    #[serde(default = "gateway_group")]
    pub group: String,
    /// Kind; absent: `Gateway`.
    #[serde(default = "gateway_kind")]
    pub kind: String,
    /// Namespace; absent: the route's.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Name of the parent.
    pub name: String,
    /// A section (a Gateway listener); not supported for Service parents.
    #[serde(default)]
    pub section_name: Option<String>,
    /// One port of the parent; absent: every port.
    #[serde(default)]
    pub port: Option<i32>,
}

/// One rule (`HTTPRouteRule`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Name of the rule, unique in the route.
    #[serde(default)]
    pub name: Option<String>,
    /// The rule applies to a request that any of these matches; absent: one match,
    /// `PathPrefix` `/`; empty: every request.
    #[serde(default = "default_matches")]
    pub matches: Vec<HttpRouteMatch>,
    /// Request and response filters; read (as JSON) so that any is refused by name.
    #[serde(default)]
    pub filters: Vec<Value>,
    /// Where matching requests go, by weight.
    #[serde(default)]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Option<HttpRouteTimeouts>,
}

/// Conditions on a request (`HTTPRouteMatch`); all that are given must hold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// The path condition; absent: `PathPrefix` `/`.
    #[serde(default)]
    pub path: HttpPathMatch,
    /// Header conditions.
    #[serde(default)]
    pub headers: Vec<HttpValueMatch>,
    /// Query parameter conditions.
    #[serde(default)]
    pub query_params: Vec<HttpValueMatch>,
    /// The method, upper case (`GET`, ...); absent: any.
    #[serde(default)]
    pub method: Option<String>,
}

/// How the path is matched (`HTTPPathMatch`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPathMatch {
    /// `Exact`, `PathPrefix` (the default) or `RegularExpression`.
    #[serde(default = "path_prefix", rename = "type")]
    pub match_type: String,
    /// The path; absent: `/`.
    #[serde(default = "slash")]
    pub value: String,
}

/// A header (`HTTPHeaderMatch`) or query parameter (`HTTPQueryParamMatch`) condition.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpValueMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(default = "exact", rename = "type")]
    pub match_type: String,
    /// Header name (case-insensitive) or query parameter name (case-sensitive).
    pub name: String,
    /// The value.
    pub value: String,
}

/// A backend of a rule (`HTTPBackendRef`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBackendRef {
    /// API group; absent: `""` (core).
    #[serde(default)]
    pub group: String,
    /// Kind; absent: `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    /// Name of the backend.
    pub name: String,
    /// Namespace; absent: the route's.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Service port (required for a Service).
    #[serde(default)]
    pub port: Option<i32>,
    /// Relative share of the rule's requests, 0 to 1,000,000; absent: 1.
    #[serde(default = "one")]
    pub weight: i32,
    /// Filters for this backend only; read (as JSON) so that any is refused by name.
    #[serde(default)]
    pub filters: Vec<Value>,
}

/// A rule's timeouts (`HTTPRouteTimeouts`), in the Gateway API duration format (`10s`,
/// `500ms`, `1h2m`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    /// How long a whole request may take; `0s`: no timeout set by the route.
    #[serde(default)]
    pub request: Option<String>,
    /// How long one request to a backend may take (not supported).
    #[serde(default)]
    pub backend_request: Option<String>,
}

fn gateway_group() -> String {
    GATEWAY_GROUP.to_owned()
}

fn gateway_kind() -> String {
    "Gateway".to_owned()
}

fn service_kind() -> String {
    "Service".to_owned()
}

fn path_prefix() -> String {
    "PathPrefix".to_owned()
}

fn exact() -> String {
    "Exact".to_owned()
}

fn slash() -> String {
    "/".to_owned()
}

fn one() -> i32 {
    1
}

fn default_matches() -> Vec<HttpRouteMatch> {
    vec![HttpRouteMatch {
        path: HttpPathMatch::default(),
        headers: Vec::new(),
        query_params: Vec::new(),
        method: None,
    }]
}

fn default_rules() -> Vec<HttpRouteRule> {
    vec![HttpRouteRule {
        name: None,
        matches: default_matches(),
        filters: Vec::new(),
        backend_refs: Vec::new(),
        timeouts: None,
    }]
}

// === impl HttpPathMatch ===

impl Default for HttpPathMatch {
    /// `PathPrefix` `/`: every path.
    fn default() -> Self {
        Self {
            match_type: path_prefix(),
            value: slash(),
        }
    }
}

// === impl ParentReference ===

impl ParentReference {
    /// Whether it names a Service (group `""` or `core`, kind `Service`): a mesh parent.
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_str(), "" | "core") && self.kind == "Service"
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn absent_fields_take_the_upstream_defaults() {
        let spec: HttpRouteSpec = serde_json::from_value(json!({
            "parentRefs": [{"name": "gw"}, {"group": "", "kind": "Service", "name": "web"}],
            "rules": [{"matches": [{}, {"path": {"type": "Exact"}}]},
                      {"backendRefs": [{"name": "web", "port": 80}]}],
        }))
        .unwrap();
        let gw = &spec.parent_refs[0];
        assert_eq!(
            (gw.group.as_str(), gw.kind.as_str()),
            (GATEWAY_GROUP, "Gateway")
        );
        assert!(!gw.is_service() && spec.parent_refs[1].is_service());
        let first = &spec.rules[0].matches;
        assert_eq!(first[0].path, HttpPathMatch::default());
        assert_eq!(
            (
                first[1].path.match_type.as_str(),
                first[1].path.value.as_str()
            ),
            ("Exact", "/")
        );
        // Absent matches: one PathPrefix "/" match, as the API server stores it.
        assert_eq!(spec.rules[1].matches, default_matches());
        let b = &spec.rules[1].backend_refs[0];
        assert_eq!(
            (b.group.as_str(), b.kind.as_str(), b.weight),
            ("", "Service", 1)
        );
        let bare: HttpRouteSpec = serde_json::from_value(json!({})).unwrap();
        assert_eq!(bare.rules, default_rules());
        let empty: HttpRouteSpec =
            serde_json::from_value(json!({"rules": [{"matches": []}]})).unwrap();
        assert!(
            empty.rules[0].matches.is_empty(),
            "explicitly empty stays empty"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            serde_json::from_value::<HttpRouteSpec>(json!({"rules": [{"retry": {}}]})).unwrap_err();
        assert!(err.to_string().contains("unknown field `retry`"), "{err}");
    }
}
