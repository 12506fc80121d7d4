//! Tables: what the checks report (with exact field paths), what valid routes become, and
//! which routes are not the mesh's.

use std::collections::BTreeMap;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use serde_json::json;

use super::*;
use crate::objects::ObjectMeta;

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: namespace.into(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    }
}

/// A route in `demo` from a YAML spec (flow style is fine), parsed as the sources do.
fn route(name: &str, spec: &str) -> Route {
    let spec: Value =
        serde_yaml::from_str(spec).unwrap_or_else(|e| panic!("test spec {spec:?}: {e}"));
    Route::from_json_spec(meta("demo", name), &spec)
}

/// `spec` with a Service parent `web` prepended as `parentRefs` and `rules` as given.
fn on_web(rules: &str) -> String {
    format!("{{parentRefs: [{{group: '', kind: Service, name: web}}], rules: {rules}}}")
}

fn key(ns: &str, name: &str) -> ServiceKey {
    ServiceKey::new(ns, name)
}

fn backend(name: &str, port: u16, weight: u32) -> api::Backend {
    api::Backend {
        service: key("demo", name),
        port,
        weight,
    }
}

fn prefix(path: &str) -> api::RouteMatch {
    api::RouteMatch {
        path: PathMatch::Prefix(path.into()),
        method: None,
        headers: vec![],
        query: vec![],
    }
}

#[test]
fn valid_routes_have_no_problems() {
    for spec in [
        // Upstream's defaults: one rule, one PathPrefix "/" match, no backends.
        "{parentRefs: [{group: '', kind: Service, name: web}]}",
        "{parentRefs: [{group: core, kind: Service, name: web, port: 80}]}",
        &on_web("[{matches: []}]"),
        &on_web(
            "[{name: canary, matches: [{path: {type: Exact, value: /a}, method: GET, \
             headers: [{name: X-Canary, value: '1'}, {type: Exact, name: x-canary, value: '2'}], \
             queryParams: [{name: v, value: '2'}, {name: V, value: '3'}]}], \
             backendRefs: [{name: web-v1, port: 80, weight: 0}, \
             {group: '', kind: Service, name: web-v2, namespace: demo, port: 8080, weight: 1000000}], \
             timeouts: {request: 1h2m3s4ms}}]",
        ),
        &on_web("[{matches: [{path: {value: '/a%2e/b;c=d@e'}}]}, {timeouts: {request: 0s}}]"),
        // Another namespace's Service (a consumer route), and hostnames (ignored).
        "{parentRefs: [{group: '', kind: Service, namespace: shop, name: web}, {name: gw}], \
         hostnames: ['*.example.com']}",
    ] {
        let r = route("ok", spec);
        assert!(r.is_mesh(), "{spec}");
        assert_eq!(r.problems(), Vec::<String>::new(), "{spec}");
    }
    // A custom resource name may hold dots.
    let dotted = route(
        "web.canary",
        "{parentRefs: [{group: '', kind: Service, name: web}]}",
    );
    assert_eq!(dotted.problems(), Vec::<String>::new());
}

#[test]
fn every_problem_is_reported_with_its_field() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "regular expression path",
            &on_web(
                "[{matches: [{path: {type: Exact, value: /a}}, \
                 {path: {type: RegularExpression, value: '/a.*'}}]}]",
            ),
            &[
                "spec.rules[0].matches[1].path.type: RegularExpression is not supported; use \
               Exact or PathPrefix",
            ],
        ),
        (
            "unknown path type",
            &on_web("[{matches: [{path: {type: Glob, value: /a}}]}]"),
            &[
                r#"spec.rules[0].matches[0].path.type: "Glob" is not a known path match type: use Exact or PathPrefix"#,
            ],
        ),
        (
            "relative path, and upstream's other path rules",
            &on_web(
                "[{matches: [{path: {value: api}}, {path: {type: Exact, value: '/a//b'}}, \
                 {path: {value: '/a/..'}}, {path: {value: '/a?b=1'}}, {path: {value: '/%zz'}}]}]",
            ),
            &[
                r#"spec.rules[0].matches[0].path.value: "api" does not start with "/""#,
                r#"spec.rules[0].matches[1].path.value: "/a//b" must not contain "//""#,
                r#"spec.rules[0].matches[2].path.value: "/a/.." must not end with "/..""#,
                r#"spec.rules[0].matches[3].path.value: "/a?b=1" holds a character a URL path cannot (a query, a space, a bare '%'?)"#,
                r#"spec.rules[0].matches[4].path.value: "/%zz" holds a character a URL path cannot (a query, a space, a bare '%'?)"#,
            ],
        ),
        (
            "header and query matches: Exact only, tokens, each name once",
            &on_web(
                "[{matches: [{}, {headers: [{type: RegularExpression, name: x-a, value: 'a.*'}, \
                 {name: 'x b', value: v}, {name: x-a, value: w}], \
                 queryParams: [{name: q, value: ''}, {type: Prefix, name: r, value: v}]}]}]",
            ),
            &[
                "spec.rules[0].matches[1].headers[0].type: RegularExpression is not supported; \
                 use Exact",
                r#"spec.rules[0].matches[1].headers[1].name: "x b" is not a name: 1 to 256 letters, digits or !#$%&'*+-.^_`|~"#,
                r#"spec.rules[0].matches[1].headers[2].name: duplicate name "x-a" (also spec.rules[0].matches[1].headers[0])"#,
                "spec.rules[0].matches[1].queryParams[0].value: must be 1 to 1024 characters, got 0",
                r#"spec.rules[0].matches[1].queryParams[1].type: "Prefix" is not a known match type: use Exact"#,
            ],
        ),
        (
            "method outside the enum",
            &on_web("[{matches: [{method: get}]}]"),
            &[
                r#"spec.rules[0].matches[0].method: "get" is not a method: one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH"#,
            ],
        ),
        (
            "backends: kind, group, namespace, port, weight",
            &on_web(
                "[{backendRefs: [{name: web}, {kind: Deployment, name: web, port: 80}, \
                 {group: apps, name: web, port: 80}, {name: web, namespace: other, port: 80}, \
                 {name: web, port: 0, weight: -1}, {name: Web, port: 70000, weight: 1000001}]}]",
            ),
            &[
                "spec.rules[0].backendRefs[0].port: is required for a Service backend",
                r#"spec.rules[0].backendRefs[1].kind: "Deployment" is not supported: only Service"#,
                r#"spec.rules[0].backendRefs[2].group: "apps" is not the core group: a Service backend's group is "" (or leave it out)"#,
                r#"spec.rules[0].backendRefs[3].namespace: "other" is not the route's namespace "demo": a backend in another namespace needs a ReferenceGrant, which is not supported"#,
                "spec.rules[0].backendRefs[4].port: must be between 1 and 65535, got 0",
                "spec.rules[0].backendRefs[4].weight: must be between 0 and 1000000, got -1",
                r#"spec.rules[0].backendRefs[5].name: invalid Service name "Web": use lowercase letters, digits and '-', starting and ending with a letter or digit (a DNS-1123 label)"#,
                "spec.rules[0].backendRefs[5].port: must be between 1 and 65535, got 70000",
                "spec.rules[0].backendRefs[5].weight: must be between 0 and 1000000, got 1000001",
            ],
        ),
        (
            "filters, on a rule and on a backend",
            &on_web(
                "[{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: \
                 [{name: x, value: y}]}}], backendRefs: [{name: web, port: 80, \
                 filters: [{type: URLRewrite, urlRewrite: {hostname: a}}]}]}]",
            ),
            &[
                "spec.rules[0].filters: filters are not supported yet",
                "spec.rules[0].backendRefs[0].filters: filters are not supported yet",
            ],
        ),
        (
            "timeouts",
            &on_web(
                "[{timeouts: {request: '10'}}, {timeouts: {request: 1d}}, \
                 {timeouts: {request: 1h1m1s1ms1h}}, {timeouts: {request: 123456s}}, \
                 {timeouts: {request: 10s, backendRequest: 1s}}]",
            ),
            &[
                r#"spec.rules[0].timeouts.request: "10" is not a Gateway API duration: 1 to 4 parts of a number (at most 5 digits) and a unit h, m, s or ms, e.g. "10s", "500ms", "1h30m""#,
                r#"spec.rules[1].timeouts.request: "1d" is not a Gateway API duration: 1 to 4 parts of a number (at most 5 digits) and a unit h, m, s or ms, e.g. "10s", "500ms", "1h30m""#,
                r#"spec.rules[2].timeouts.request: "1h1m1s1ms1h" is not a Gateway API duration: 1 to 4 parts of a number (at most 5 digits) and a unit h, m, s or ms, e.g. "10s", "500ms", "1h30m""#,
                r#"spec.rules[3].timeouts.request: "123456s" is not a Gateway API duration: 1 to 4 parts of a number (at most 5 digits) and a unit h, m, s or ms, e.g. "10s", "500ms", "1h30m""#,
                "spec.rules[4].timeouts.backendRequest: is not supported; use timeouts.request",
            ],
        ),
        (
            "Service parents: sectionName, port, names, each Service once",
            "{parentRefs: [{group: '', kind: Service, name: web, sectionName: http}, \
             {group: core, kind: Service, name: web, namespace: demo, port: 0}, \
             {group: '', kind: Service, name: Api, namespace: Shop}, {name: Gw_1}]}",
            &[
                "spec.parentRefs[0].sectionName: is not supported for a Service parent; use port \
                 to attach to one port",
                "spec.parentRefs[1].port: must be between 1 and 65535, got 0",
                "spec.parentRefs[1].name: duplicate parent Service demo/web (also \
                 spec.parentRefs[0])",
                r#"spec.parentRefs[2].namespace: invalid namespace "Shop": use lowercase letters, digits and '-', starting and ending with a letter or digit (a DNS-1123 label)"#,
                r#"spec.parentRefs[2].name: invalid Service name "Api": use lowercase letters, digits and '-', starting and ending with a letter or digit (a DNS-1123 label)"#,
            ],
        ),
        (
            "no rules, explicitly",
            &on_web("[]"),
            &["spec.rules: at least one rule is required"],
        ),
        (
            "rule names: syntax, uniqueness",
            &on_web("[{name: a}, {name: A_b}, {name: a}]"),
            &[
                r#"spec.rules[1].name: invalid rule name "A_b": use lowercase letters, digits and '-', starting and ending with a letter or digit (a DNS-1123 label)"#,
                r#"spec.rules[2].name: duplicate rule name "a" (also spec.rules[0].name)"#,
            ],
        ),
        (
            "a field upstream's standard channel does not have",
            &on_web("[{retry: {attempts: 3}}]"),
            &[
                "spec.rules[0].retry: unknown field `retry`, expected one of `name`, `matches`, \
               `filters`, `backendRefs`, `timeouts`",
            ],
        ),
        (
            "a value of the wrong type",
            &on_web("[{backendRefs: [{name: web, port: eighty}]}]"),
            &["spec.rules[0].backendRefs[0].port: invalid type: string \"eighty\", expected i32"],
        ),
    ];
    for (case, spec, want) in cases {
        let want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(route("r", spec).problems(), want, "case: {case}");
    }
}

#[test]
fn limits_are_upstreams() {
    // A flow list of `n` items, item `i` from `item(i)`.
    let list = |n: usize, item: &dyn Fn(usize) -> String| {
        format!("[{}]", (0..n).map(item).collect::<Vec<_>>().join(", "))
    };
    let same = |n: usize, item: &str| list(n, &|_| item.to_owned());
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "{{parentRefs: {}}}",
                list(33, &|i| format!(
                    "{{group: '', kind: Service, name: web-{i}}}"
                ))
            ),
            "spec.parentRefs: has 33 entries; at most 32 are accepted",
        ),
        (
            on_web(&same(17, "{}")),
            "spec.rules: has 17 entries; at most 16 are accepted",
        ),
        (
            on_web(&format!("[{{matches: {}}}]", same(65, "{}"))),
            "spec.rules[0].matches: has 65 entries; at most 64 are accepted",
        ),
        (
            on_web(&same(3, &format!("{{matches: {}}}", same(43, "{}")))),
            "spec.rules: has 129 matches in all; at most 128 are accepted",
        ),
        (
            on_web(&format!(
                "[{{backendRefs: {}}}]",
                same(17, "{name: web, port: 80}")
            )),
            "spec.rules[0].backendRefs: has 17 entries; at most 16 are accepted",
        ),
        (
            on_web(&format!(
                "[{{matches: [{{headers: {}}}]}}]",
                list(17, &|i| format!("{{name: h{i}, value: v}}"))
            )),
            "spec.rules[0].matches[0].headers: has 17 entries; at most 16 are accepted",
        ),
        (
            on_web(&format!(
                "[{{matches: [{{queryParams: {}}}]}}]",
                list(17, &|i| format!("{{name: q{i}, value: v}}"))
            )),
            "spec.rules[0].matches[0].queryParams: has 17 entries; at most 16 are accepted",
        ),
    ];
    for (spec, want) in cases {
        let problems = route("r", &spec).problems();
        assert_eq!(problems, [want], "{spec}");
    }
}

#[test]
fn routes_without_a_service_parent_are_not_the_meshs() {
    for spec in [
        // The defaults make a bare parentRef a Gateway.
        "{parentRefs: [{name: gw}], rules: [{matches: [{path: {type: RegularExpression, value: x}}]}]}",
        // kind Service without group "" is in the Gateway API group: not a Service.
        "{parentRefs: [{kind: Service, name: web}]}",
        "{parentRefs: [{group: '', kind: Gateway, name: gw}]}",
        "{}",
        // A Gateway's route this version cannot parse stays ignored.
        "{parentRefs: [{name: gw}], rules: [{retry: {attempts: 3}}]}",
    ] {
        let r = route("gw", spec);
        assert!(!r.is_mesh(), "{spec}");
        assert_eq!(r.problems(), Vec::<String>::new(), "{spec}");
    }
    // Its parents are read leniently when the spec does not parse: a mesh route.
    let r = route(
        "bad",
        "{parentRefs: [{group: '', kind: Service, name: web, port: x}], rules: 3}",
    );
    assert!(r.is_mesh());
    assert_eq!(
        r.problems(),
        ["spec.parentRefs[0].port: invalid type: string \"x\", expected i32"]
    );
}

#[test]
fn valid_routes_translate_rule_by_rule() {
    let r = route(
        "web",
        "{parentRefs: [{group: '', kind: Service, name: web, port: 80}, \
          {group: '', kind: Service, namespace: shop, name: cart}, {name: gw}], \
          hostnames: [web.example], \
          rules: [\
            {name: canary, matches: [{path: {type: Exact, value: /login}, method: POST, \
               headers: [{name: X-Canary, value: '1'}, {name: x-canary, value: '2'}], \
               queryParams: [{name: V, value: '2'}]}], \
             backendRefs: [{name: web-v2, port: 8080}], timeouts: {request: 1s500ms}}, \
            {matches: [], backendRefs: [{name: web-v1, port: 80, weight: 90}, \
               {name: web-v2, port: 80, weight: 10}], timeouts: {request: 0s}}, \
            {}]}",
    );
    assert_eq!(r.problems(), Vec::<String>::new());
    let got = translate_route(&r).unwrap();
    let want = api::HttpRoute {
        namespace: "demo".into(),
        name: "web".into(),
        parents: vec![
            api::RouteParent {
                service: key("demo", "web"),
                port: Some(80),
            },
            api::RouteParent {
                service: key("shop", "cart"),
                port: None,
            },
        ],
        rules: vec![
            api::RouteRule {
                name: "canary".into(),
                matches: vec![api::RouteMatch {
                    path: PathMatch::Exact("/login".into()),
                    method: Some("POST".into()),
                    // Header names lower case; the second, equivalent one is ignored.
                    headers: vec![("x-canary".into(), "1".into())],
                    query: vec![("V".into(), "2".into())],
                }],
                backends: vec![backend("web-v2", 8080, 1)],
                timeout: Some(Duration::from_millis(1500)),
            },
            api::RouteRule {
                name: String::new(),
                // Empty stays empty: every request.
                matches: vec![],
                backends: vec![backend("web-v1", 80, 90), backend("web-v2", 80, 10)],
                // 0s: no timeout of the route's.
                timeout: None,
            },
            api::RouteRule {
                name: String::new(),
                // Absent: upstream's default match.
                matches: vec![prefix("/")],
                backends: vec![],
                timeout: None,
            },
        ],
    };
    assert_eq!(got, want);
}

#[test]
fn the_snapshot_holds_the_meshs_valid_routes_sorted() {
    let mut objects = Objects::default();
    for (ns, name, spec) in [
        (
            "shop",
            "b",
            "{parentRefs: [{group: '', kind: Service, name: web}]}",
        ),
        (
            "demo",
            "z",
            "{parentRefs: [{group: '', kind: Service, name: web}]}",
        ),
        (
            "demo",
            "a",
            "{parentRefs: [{group: '', kind: Service, name: web}]}",
        ),
        ("demo", "gateway", "{parentRefs: [{name: gw}]}"),
        (
            "demo",
            "invalid",
            "{parentRefs: [{group: '', kind: Service, name: web}], rules: \
             [{filters: [{type: CORS}]}]}",
        ),
    ] {
        let spec: Value = serde_yaml::from_str(spec).unwrap();
        let r = Route::from_json_spec(meta(ns, name), &spec);
        objects.routes.insert(r.metadata.key(), r);
    }
    let snap = crate::translate(&objects, "cluster.local", 1);
    let keys: Vec<String> = snap.routes.iter().map(api::HttpRoute::key).collect();
    assert_eq!(keys, ["demo/a", "demo/z", "shop/b"]);
    // What the wire accepts: the proxy's own checks pass.
    let wire = api::routes_to_wire(&snap.routes);
    assert_eq!(api::routes_from_wire(&wire), Ok(snap.routes));

    let mut registry = Registry::default();
    let mut invalid = InvalidRoutes::new().with_metrics(InvalidCount::routes(&mut registry));
    assert_eq!(invalid.report(&objects), 1);
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    assert!(
        text.lines()
            .any(|l| l == "trellis_controller_invalid_routes 1"),
        "{text}"
    );
    objects.routes.retain(|k, _| k.name != "invalid");
    assert_eq!(invalid.report(&objects), 0);
}

#[test]
fn gateway_durations_add_their_parts() {
    for (text, millis) in [
        ("0s", 0),
        ("10s", 10_000),
        ("500ms", 500),
        ("1h2m", 3_720_000),
        ("1m1ms", 60_001),
        ("99999h", 99_999 * 3_600_000),
        ("1s1s1s1s", 4_000),
    ] {
        assert_eq!(
            gateway_duration(text),
            Ok(Duration::from_millis(millis)),
            "{text}"
        );
    }
    for text in [
        "",
        "s",
        "1",
        "1.5s",
        "-1s",
        "1us",
        "1 s",
        "100000s",
        "1s1s1s1s1s",
        "1S",
    ] {
        assert!(gateway_duration(text).is_err(), "{text:?}");
    }
}

#[test]
fn a_spec_that_does_not_parse_keeps_its_error_and_parents_only() {
    let r = Route::from_json_spec(
        meta("demo", "r"),
        &json!({"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [{"matches": [{"path": {"type": "Exact", "value": 7}}]}]}),
    );
    assert_eq!(r.spec.parent_refs.len(), 1);
    assert!(r.spec.rules.is_empty());
    assert_eq!(
        r.problems(),
        ["spec.rules[0].matches[0].path.value: invalid type: integer `7`, expected a string"]
    );
    let absent = Route::from_json_spec(meta("demo", "r"), &Value::Null);
    assert!(!absent.is_mesh(), "no parents: nobody's");
}
