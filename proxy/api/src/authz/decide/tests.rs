//! Istio's AuthorizationPolicy semantics, one table row per behaviour.

use std::collections::BTreeMap;

use super::*;
use crate::authz::ROOT_NAMESPACE;
use crate::snapshot::{Endpoint, Protocol, ServicePort};

const ME: &str = "web-0";
const GOOD: &str = "spiffe://cluster.local/ns/demo/sa/good";
const BAD: &str = "spiffe://cluster.local/ns/other/sa/bad";

fn pat(s: &str) -> Pattern {
    Pattern::parse(s, || "test".into()).expect("test pattern")
}

fn pats(values: &[&str]) -> Vec<Pattern> {
    values.iter().map(|v| pat(v)).collect()
}

fn policy(ns: &str, name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        namespace: ns.into(),
        name: name.into(),
        target_services: Vec::new(),
        action,
        dry_run: false,
        rules,
    }
}

fn allow(name: &str, rules: Vec<Rule>) -> AuthorizationPolicy {
    policy("demo", name, Action::Allow, rules)
}

fn deny(name: &str, rules: Vec<Rule>) -> AuthorizationPolicy {
    policy("demo", name, Action::Deny, rules)
}

fn dry(mut p: AuthorizationPolicy) -> AuthorizationPolicy {
    p.dry_run = true;
    p
}

fn targeting(mut p: AuthorizationPolicy, services: &[&str]) -> AuthorizationPolicy {
    p.target_services = services.iter().map(|s| (*s).to_owned()).collect();
    p
}

/// A rule: callers with these principals (empty: anyone) calling these operations.
fn rule(principals: &[&str], to: Vec<Operation>) -> Rule {
    Rule {
        from: if principals.is_empty() {
            Vec::new()
        } else {
            vec![Source {
                principals: pats(principals),
                namespaces: Vec::new(),
            }]
        },
        to,
    }
}

fn from_ns(namespaces: &[&str]) -> Rule {
    Rule {
        from: vec![Source {
            principals: Vec::new(),
            namespaces: pats(namespaces),
        }],
        to: Vec::new(),
    }
}

fn op(ports: &[u16], methods: &[&str], paths: &[&str]) -> Operation {
    Operation {
        ports: ports.to_vec(),
        methods: pats(methods),
        paths: pats(paths),
    }
}

/// `demo/web` serves port 80 from `web-0:8080` and `web-1:8080`; `demo/admin` serves 9090
/// from `web-0:9090`; `demo/other` from `other-0:8080`.
fn services() -> BTreeMap<ServiceKey, Service> {
    let mut services = BTreeMap::new();
    let ep = |addr: &str, workload: &str| Endpoint {
        address: addr.parse().expect("test address"),
        identity: "spiffe://cluster.local/ns/demo/sa/web".into(),
        workload: workload.into(),
        labels: BTreeMap::new(),
    };
    for (name, port, endpoints) in [
        (
            "web",
            80,
            vec![ep("10.0.0.1:8080", "web-0"), ep("10.0.0.2:8080", "web-1")],
        ),
        ("admin", 9090, vec![ep("10.0.0.1:9090", "web-0")]),
        ("other", 80, vec![ep("10.0.0.3:8080", "other-0")]),
    ] {
        let key = ServiceKey::new("demo", name);
        services.insert(
            key.clone(),
            Service {
                key,
                hostnames: Vec::new(),
                addresses: Vec::new(),
                ports: vec![ServicePort {
                    name: "http".into(),
                    port,
                    protocol: Protocol::Http,
                    endpoints,
                }],
            },
        );
    }
    services
}

fn authorizer(policies: Vec<AuthorizationPolicy>) -> Authorizer {
    authorizer_in("demo", EndpointPorts::TargetPort, policies)
}

fn authorizer_in(
    namespace: &str,
    endpoints: EndpointPorts,
    mut policies: Vec<AuthorizationPolicy>,
) -> Authorizer {
    policies.sort();
    Authorizer::new(
        &policies,
        &services(),
        &Workload {
            namespace,
            name: ME,
            endpoints,
        },
    )
}

fn http<'a>(principal: &'a str, method: &'a str, path: &'a str) -> Request<'a> {
    Request {
        principal,
        namespace: principal
            .split("/ns/")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap_or(""),
        port: 8080,
        http: Some(HttpRequest { method, path }),
    }
}

fn on_port(mut req: Request<'_>, port: u16) -> Request<'_> {
    req.port = port;
    req
}

fn tcp(principal: &str) -> Request<'_> {
    Request {
        http: None,
        ..http(principal, "", "")
    }
}

fn key(k: &str) -> PolicyKey {
    k.into()
}

/// The decision, with `None` (no policy applies to the request) as the allowed request
/// it stands for.
fn decide(a: &Authorizer, req: &Request<'_>) -> Decision {
    a.authorize(req).unwrap_or(Decision {
        verdict: Verdict::Allow(None),
        dry_run: Vec::new(),
        path: None,
    })
}

/// The verdict as a short string: `allow`, `allow:<policy>`, `deny:<policy>`,
/// `deny:no-allow`, `bad-path`.
fn verdict(a: &Authorizer, req: &Request<'_>) -> String {
    match decide(a, req).verdict {
        Verdict::Allow(None) => "allow".into(),
        Verdict::Allow(Some(k)) => format!("allow:{k}"),
        Verdict::Deny(Denial::Policy(k)) => format!("deny:{k}"),
        Verdict::Deny(Denial::NoAllowMatched(_)) => "deny:no-allow".into(),
        Verdict::Deny(Denial::BadPath(_)) => "bad-path".into(),
    }
}

#[test]
fn istio_semantics_table() {
    let only_good = || allow("only-good", vec![rule(&[GOOD], vec![])]);
    let deny_admin = || {
        deny(
            "deny-admin",
            vec![rule(&[], vec![op(&[], &[], &["/admin*"])])],
        )
    };
    let rows: Vec<(&str, Vec<AuthorizationPolicy>, Request<'_>, &str)> = vec![
        ("no policies allow", vec![], http(BAD, "GET", "/"), "allow"),
        (
            "allow matches",
            vec![only_good()],
            http(GOOD, "GET", "/"),
            "allow:demo/only-good",
        ),
        (
            "allow present, none matches",
            vec![only_good()],
            http(BAD, "GET", "/"),
            "deny:no-allow",
        ),
        (
            "deny beats allow",
            vec![only_good(), deny_admin()],
            http(GOOD, "GET", "/admin"),
            "deny:demo/deny-admin",
        ),
        (
            "deny not matching leaves allow",
            vec![only_good(), deny_admin()],
            http(GOOD, "GET", "/public"),
            "allow:demo/only-good",
        ),
        (
            "only deny policies, not matching: allowed",
            vec![deny_admin()],
            http(BAD, "GET", "/public"),
            "allow",
        ),
        (
            "allow-nothing (no rules) refuses everyone",
            vec![allow("nothing", vec![])],
            http(GOOD, "GET", "/"),
            "deny:no-allow",
        ),
        (
            "deny without rules matches nothing",
            vec![deny("nothing", vec![])],
            http(BAD, "GET", "/"),
            "allow",
        ),
        (
            "an empty rule matches everyone",
            vec![allow("all", vec![Rule::default()])],
            http(BAD, "DELETE", "/x"),
            "allow:demo/all",
        ),
        (
            "any ALLOW policy may match",
            vec![only_good(), allow("ns-other", vec![from_ns(&["other"])])],
            http(BAD, "GET", "/"),
            "allow:demo/ns-other",
        ),
        (
            "from: namespaces",
            vec![allow("ns", vec![from_ns(&["dem*"])])],
            http(BAD, "GET", "/"),
            "deny:no-allow",
        ),
        (
            "from and to must both match",
            vec![allow(
                "get-only",
                vec![rule(&[GOOD], vec![op(&[], &["GET"], &[])])],
            )],
            http(GOOD, "POST", "/"),
            "deny:no-allow",
        ),
        (
            "methods are case-sensitive",
            vec![allow("get", vec![rule(&[], vec![op(&[], &["GET"], &[])])])],
            http(GOOD, "get", "/"),
            "deny:no-allow",
        ),
        (
            "within an entry every list must match",
            vec![allow(
                "get-api",
                vec![rule(&[], vec![op(&[8080], &["GET"], &["/api/*"])])],
            )],
            http(GOOD, "GET", "/other"),
            "deny:no-allow",
        ),
        (
            "any entry of `to` may match",
            vec![allow(
                "two-ops",
                vec![rule(
                    &[],
                    vec![op(&[], &["POST"], &[]), op(&[], &[], &["/health"])],
                )],
            )],
            http(BAD, "GET", "/health"),
            "allow:demo/two-ops",
        ),
        (
            "to.ports: another port does not match",
            vec![allow("p9090", vec![rule(&[], vec![op(&[9090], &[], &[])])])],
            http(GOOD, "GET", "/"),
            "deny:no-allow",
        ),
        (
            "to.ports: the request's port matches",
            vec![allow("p9090", vec![rule(&[], vec![op(&[9090], &[], &[])])])],
            on_port(http(GOOD, "GET", "/"), 9090),
            "allow:demo/p9090",
        ),
        (
            "root namespace policy applies to every workload",
            vec![policy(
                ROOT_NAMESPACE,
                "mesh-deny-other",
                Action::Deny,
                vec![from_ns(&["other"])],
            )],
            http(BAD, "GET", "/"),
            "deny:trellis-system/mesh-deny-other",
        ),
        (
            "another namespace's policy does not apply",
            vec![policy("shop", "nothing", Action::Allow, vec![])],
            http(BAD, "GET", "/"),
            "allow",
        ),
        (
            "the first matching deny (by namespace, name) is named",
            vec![
                deny("b", vec![Rule::default()]),
                deny("a", vec![Rule::default()]),
            ],
            http(BAD, "GET", "/"),
            "deny:demo/a",
        ),
        (
            "patterns: suffix",
            vec![allow("sfx", vec![rule(&["*/sa/good"], vec![])])],
            http(GOOD, "GET", "/"),
            "allow:demo/sfx",
        ),
        (
            "patterns: prefix",
            vec![allow(
                "pfx",
                vec![rule(&["spiffe://cluster.local/ns/other/*"], vec![])],
            )],
            http(GOOD, "GET", "/"),
            "deny:no-allow",
        ),
        (
            "patterns: any",
            vec![allow("star", vec![rule(&["*"], vec![])])],
            http(BAD, "GET", "/"),
            "allow:demo/star",
        ),
    ];
    for (name, policies, req, want) in rows {
        assert_eq!(verdict(&authorizer(policies), &req), want, "{name}");
    }
}

#[test]
fn targeting_by_service_and_target_port() {
    let deny_all =
        |name: &str, targets: &[&str]| targeting(deny(name, vec![Rule::default()]), targets);
    // `web` has web-0 on 8080: applies on 8080 only.
    let a = authorizer(vec![deny_all("t-web", &["web"])]);
    assert_eq!(verdict(&a, &http(GOOD, "GET", "/")), "deny:demo/t-web");
    assert_eq!(verdict(&a, &on_port(http(GOOD, "GET", "/"), 9090)), "allow");
    assert_eq!(a.applied(), vec![(key("demo/t-web"), Some(vec![8080]))]);
    // `admin` targets web-0 on 9090.
    let a = authorizer(vec![deny_all("t-admin", &["admin"])]);
    assert_eq!(verdict(&a, &http(GOOD, "GET", "/")), "allow");
    assert_eq!(
        verdict(&a, &on_port(http(GOOD, "GET", "/"), 9090)),
        "deny:demo/t-admin"
    );
    // Several targets: the union of their ports.
    let a = authorizer(vec![deny_all("t-both", &["web", "admin"])]);
    assert_eq!(
        a.applied(),
        vec![(key("demo/t-both"), Some(vec![8080, 9090]))]
    );
    // A Service without us, or not in the view: the policy does not apply.
    for targets in [&["other"][..], &["missing"]] {
        let a = authorizer(vec![deny_all("t", targets)]);
        assert!(a.is_empty(), "{targets:?}");
        assert_eq!(verdict(&a, &http(BAD, "GET", "/")), "allow");
    }
    // An ALLOW policy targeting another Service makes nothing of ours allow-only.
    let a = authorizer(vec![targeting(allow("other-only", vec![]), &["other"])]);
    assert_eq!(verdict(&a, &http(BAD, "GET", "/")), "allow");
    // Explicit mode: endpoints are the proxy's address, the workload alone decides.
    let a = authorizer_in(
        "demo",
        EndpointPorts::ProxyAddress,
        vec![deny_all("t-admin", &["admin"])],
    );
    assert_eq!(verdict(&a, &http(GOOD, "GET", "/")), "deny:demo/t-admin");
    assert_eq!(a.applied(), vec![(key("demo/t-admin"), None)]);
    // A targeted policy in the root namespace targets the root namespace's Services.
    let root = targeting(
        policy(ROOT_NAMESPACE, "t", Action::Deny, vec![Rule::default()]),
        &["web"],
    );
    assert!(authorizer(vec![root]).is_empty());
    // A proxy in another namespace: our namespace's policies are not its.
    let a = authorizer_in(
        "shop",
        EndpointPorts::TargetPort,
        vec![
            deny_all("t-web", &["web"]),
            deny("all", vec![Rule::default()]),
        ],
    );
    assert!(a.is_empty());
}

#[test]
fn tcp_with_http_only_fields_fails_closed() {
    let get = || vec![rule(&[], vec![op(&[], &["GET"], &[])])];
    let admin = || vec![rule(&[], vec![op(&[], &[], &["/admin"])])];
    // ALLOW naming methods or paths matches no TCP connection.
    assert_eq!(
        verdict(&authorizer(vec![allow("get", get())]), &tcp(GOOD)),
        "deny:no-allow"
    );
    assert_eq!(
        verdict(&authorizer(vec![allow("adm", admin())]), &tcp(GOOD)),
        "deny:no-allow"
    );
    // ... unless another of its operations has no HTTP-only field.
    let mixed = vec![rule(
        &[],
        vec![op(&[], &["GET"], &[]), op(&[8080], &[], &[])],
    )];
    assert_eq!(
        verdict(&authorizer(vec![allow("mixed", mixed)]), &tcp(GOOD)),
        "allow:demo/mixed"
    );
    // DENY ignores them: the connection is refused.
    assert_eq!(
        verdict(&authorizer(vec![deny("get", get())]), &tcp(GOOD)),
        "deny:demo/get"
    );
    assert_eq!(
        verdict(&authorizer(vec![deny("adm", admin())]), &tcp(GOOD)),
        "deny:demo/adm"
    );
    // ... but not the fields TCP has: another port is still another port.
    let other_port = vec![rule(&[], vec![op(&[9090], &["GET"], &[])])];
    assert_eq!(
        verdict(&authorizer(vec![deny("p", other_port)]), &tcp(GOOD)),
        "allow"
    );
    // The same policies over HTTP decide on the method and path.
    assert_eq!(
        verdict(
            &authorizer(vec![deny("get", get())]),
            &http(GOOD, "POST", "/")
        ),
        "allow"
    );
    assert_eq!(
        verdict(
            &authorizer(vec![allow("get", get())]),
            &http(GOOD, "GET", "/")
        ),
        "allow:demo/get"
    );
}

#[test]
fn paths_match_normalized_and_bad_paths_are_refused() {
    let deny_admin = || {
        deny(
            "deny-admin",
            vec![rule(&[], vec![op(&[], &[], &["/admin", "/admin/*"])])],
        )
    };
    let a = authorizer(vec![deny_admin()]);
    for path in [
        "/admin",
        "/./admin",
        "//admin",
        "/public/../admin",
        "/%61dmin",
        "/admin?x",
        "/admin/x/../y",
        "/%2e%2e/admin/",
    ] {
        assert_eq!(
            verdict(&a, &http(GOOD, "GET", path)),
            "deny:demo/deny-admin",
            "{path}"
        );
    }
    for path in [
        "/admin%2Fx",
        "/admin%2fx",
        "/a%5Cb",
        "/x\\admin",
        "*",
        "/a%zz",
    ] {
        assert_eq!(verdict(&a, &http(GOOD, "GET", path)), "bad-path", "{path}");
    }
    for path in ["/ADMIN", "/public", "/..", "/administrator"] {
        assert_eq!(verdict(&a, &http(GOOD, "GET", path)), "allow", "{path}");
    }

    // The app is sent the path that was authorized, with the query kept by the caller.
    let d = decide(&a, &http(GOOD, "GET", "/public/./x//y?q=1"));
    assert_eq!(d.path.as_deref(), Some("/public/x/y"));
    let d = decide(&a, &http(GOOD, "GET", "/public/x?q=/../a"));
    assert_eq!(d.path, None, "already normal: nothing to rewrite");
    let d = decide(&a, &http(GOOD, "GET", "/..?q"));
    assert_eq!(d.path.as_deref(), Some("/"));

    // An ALLOW policy on paths: allowed requests get the normalized path, refused ones
    // carry none (they are not forwarded).
    let a = authorizer(vec![allow(
        "public",
        vec![rule(&[], vec![op(&[], &[], &["/public/*"])])],
    )]);
    let d = decide(&a, &http(GOOD, "GET", "/x/../public/a"));
    assert_eq!(
        (d.verdict, d.path.as_deref()),
        (Verdict::Allow(Some(key("demo/public"))), Some("/public/a"))
    );
    let d = decide(&a, &http(GOOD, "GET", "/public/../secret"));
    assert_eq!(d.path, None);
    assert!(matches!(
        d.verdict,
        Verdict::Deny(Denial::NoAllowMatched(_))
    ));

    // No policy names paths: the path is neither checked nor rewritten.
    let a = authorizer(vec![allow("all", vec![Rule::default()])]);
    let d = decide(&a, &http(GOOD, "GET", "/admin%2Fx/./y"));
    assert_eq!(
        (d.verdict, d.path),
        (Verdict::Allow(Some(key("demo/all"))), None)
    );
    // A policy naming paths on another port (its Service targets us on 9090) does not
    // count on 8080.
    let a = authorizer(vec![targeting(
        deny("on-admin", vec![rule(&[], vec![op(&[], &[], &["/admin"])])]),
        &["admin"],
    )]);
    assert_eq!(verdict(&a, &http(GOOD, "GET", "/admin%2Fx")), "allow");
    assert_eq!(
        verdict(&a, &on_port(http(GOOD, "GET", "/admin%2Fx"), 9090)),
        "bad-path"
    );
    // Only a dry-run policy names paths: a bad path is let through, unchanged, and
    // reported as what the dry-run DENY policy would do.
    let a = authorizer(vec![dry(deny_admin())]);
    let d = decide(&a, &http(GOOD, "GET", "/admin%2Fx"));
    assert_eq!(d.verdict, Verdict::Allow(None));
    assert_eq!(d.dry_run, vec![DryRun::Policy(key("demo/deny-admin"))]);
    let d = decide(&a, &http(GOOD, "GET", "/public/../admin"));
    assert_eq!((d.verdict, d.path), (Verdict::Allow(None), None));
    assert_eq!(d.dry_run, vec![DryRun::Policy(key("demo/deny-admin"))]);
}

#[test]
fn dry_run_is_reported_and_never_enforced() {
    let a = authorizer(vec![dry(deny("would-deny", vec![from_ns(&["other"])]))]);
    let d = decide(&a, &http(BAD, "GET", "/"));
    assert_eq!(d.verdict, Verdict::Allow(None));
    assert_eq!(d.dry_run, vec![DryRun::Policy(key("demo/would-deny"))]);
    assert!(decide(&a, &http(GOOD, "GET", "/")).dry_run.is_empty());

    // A dry-run ALLOW: would refuse what no ALLOW policy matches.
    let a = authorizer(vec![dry(allow("would-allow", vec![rule(&[GOOD], vec![])]))]);
    let d = decide(&a, &http(BAD, "GET", "/"));
    assert_eq!(d.verdict, Verdict::Allow(None));
    assert_eq!(
        d.dry_run,
        vec![DryRun::NoAllowMatched(vec![key("demo/would-allow")])]
    );
    assert!(decide(&a, &http(GOOD, "GET", "/")).dry_run.is_empty());
    // ... and an enforced ALLOW that matches keeps the request allowed with it enforced.
    let a = authorizer(vec![
        dry(allow("would-allow", vec![rule(&[GOOD], vec![])])),
        allow("bad-too", vec![from_ns(&["other"])]),
    ]);
    let d = decide(&a, &http(BAD, "GET", "/"));
    assert_eq!(d.verdict, Verdict::Allow(Some(key("demo/bad-too"))));
    assert!(d.dry_run.is_empty());

    // Dry-run policies never change the enforced decision, nor count as ALLOW policies.
    let a = authorizer(vec![
        dry(deny("d1", vec![Rule::default()])),
        dry(allow("a1", vec![])),
    ]);
    let d = decide(&a, &http(GOOD, "GET", "/"));
    assert_eq!(d.verdict, Verdict::Allow(None));
    assert_eq!(
        d.dry_run,
        vec![
            DryRun::Policy(key("demo/d1")),
            DryRun::NoAllowMatched(vec![key("demo/a1")]),
        ]
    );
    // Reported even when an enforced policy refuses too.
    let a = authorizer(vec![
        deny("d0", vec![Rule::default()]),
        dry(deny("d1", vec![Rule::default()])),
    ]);
    let d = decide(&a, &tcp(GOOD));
    assert_eq!(d.verdict, Verdict::Deny(Denial::Policy(key("demo/d0"))));
    assert_eq!(d.dry_run, vec![DryRun::Policy(key("demo/d1"))]);
}

#[test]
fn refusals_name_the_policy() {
    let a = authorizer(vec![allow("x", vec![]), allow("y", vec![])]);
    let d = decide(&a, &http(GOOD, "GET", "/"));
    let Verdict::Deny(denial) = d.verdict else {
        panic!("allow-nothing allowed");
    };
    assert_eq!(denial.to_string(), "no ALLOW policy matched");
    assert_eq!(
        denial,
        Denial::NoAllowMatched(vec![key("demo/x"), key("demo/y")])
    );
    assert_eq!(denial.policy(), None);
    let denial = Denial::Policy(key("demo/deny-admin"));
    assert_eq!(denial.to_string(), "denied by policy demo/deny-admin");
    assert_eq!(denial.policy(), Some(&key("demo/deny-admin")));
    assert_eq!(
        DryRun::NoAllowMatched(vec![key("demo/a"), key("demo/b")]).to_string(),
        "no ALLOW policy would match (dry-run ALLOW policies: demo/a, demo/b)"
    );
}

#[test]
fn no_applicable_policy_decides_nothing() {
    let a = Authorizer::default();
    assert!(a.is_empty());
    assert_eq!(a.authorize(&http(BAD, "GET", "/admin%2Fx")), None);
    assert_eq!(a.authorize(&tcp(BAD)), None);
    // A policy on another port of ours: nothing applies to this request either, so
    // nothing is evaluated (the bad path included) and nothing is reported.
    let a = authorizer(vec![targeting(
        deny("on-admin", vec![rule(&[], vec![op(&[], &[], &["/admin"])])]),
        &["admin"],
    )]);
    assert!(!a.is_empty());
    assert_eq!(a.authorize(&http(BAD, "GET", "/admin%2Fx")), None);
    assert!(
        a.authorize(&on_port(http(BAD, "GET", "/x"), 9090))
            .is_some()
    );
    // A dry-run policy applies: the request is decided (allowed) and reported.
    let a = authorizer(vec![dry(deny("d", vec![Rule::default()]))]);
    assert_eq!(
        a.authorize(&tcp(GOOD)),
        Some(Decision {
            verdict: Verdict::Allow(None),
            dry_run: vec![DryRun::Policy(key("demo/d"))],
            path: None,
        })
    );
}
