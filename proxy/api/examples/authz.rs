//! What an authorization decision costs the proxy per request, by policy set.
//!
//! `cargo run --release -p trellis-api --example authz` builds the `Authorizer` a proxy
//! builds on each view change and times `authorize` on the request path, for: no policy
//! (the fast path every proxy without policies takes), the demo's two policies (an ALLOW
//! by service account and method, a DENY by path), and 64 policies of 4 rules each with
//! principal and path patterns (the schema's per-list limit; a busy namespace). Each row
//! is the median of 5 runs of 200,000 decisions. Figures are in BENCHMARKS.md.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use trellis_api::authz::{
    Action, AuthorizationPolicy, Authorizer, EndpointPorts, HttpRequest, Operation, Pattern,
    Request, Rule, Source, Workload,
};
use trellis_api::{Endpoint, Protocol, Service, ServiceKey, ServicePort};

const DECISIONS: u32 = 200_000;
const RUNS: usize = 5;

fn web_service() -> BTreeMap<ServiceKey, Service> {
    let endpoint = Endpoint {
        address: std::net::SocketAddr::from(([10, 0, 0, 1], 8080)),
        identity: "spiffe://cluster.local/ns/demo/sa/web".into(),
        workload: "web-1".into(),
        labels: BTreeMap::new(),
    };
    let svc = Service {
        key: ServiceKey::new("demo", "web"),
        hostnames: Vec::new(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http,
            endpoints: vec![endpoint],
        }],
        addresses: Vec::new(),
    };
    BTreeMap::from([(svc.key.clone(), svc)])
}

fn policy(name: &str, action: Action, rules: Vec<Rule>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        namespace: "demo".into(),
        name: name.into(),
        target_services: vec!["web".into()],
        action,
        dry_run: false,
        rules,
    }
}

fn exact(s: &str) -> Pattern {
    Pattern::Exact(s.into())
}

/// The demo's policies: only sa/client may call, only GET/HEAD; nobody reaches /admin.
fn demo() -> Vec<AuthorizationPolicy> {
    vec![
        policy(
            "web-readers",
            Action::Allow,
            vec![Rule {
                from: vec![Source {
                    principals: vec![exact("spiffe://cluster.local/ns/demo/sa/client")],
                    namespaces: Vec::new(),
                }],
                to: vec![Operation {
                    ports: Vec::new(),
                    methods: vec![exact("GET"), exact("HEAD")],
                    paths: Vec::new(),
                }],
            }],
        ),
        policy(
            "web-no-admin",
            Action::Deny,
            vec![Rule {
                from: Vec::new(),
                to: vec![Operation {
                    ports: Vec::new(),
                    methods: Vec::new(),
                    paths: vec![exact("/admin"), Pattern::Prefix("/admin/".into())],
                }],
            }],
        ),
    ]
}

/// 64 ALLOW policies of 4 rules, none matching the timed caller but the last: every
/// policy and rule is evaluated.
fn many() -> Vec<AuthorizationPolicy> {
    (0..64)
        .map(|i| {
            let rules = (0..4)
                .map(|j| Rule {
                    from: vec![Source {
                        principals: vec![Pattern::Prefix(format!(
                            "spiffe://cluster.local/ns/team-{i}-{j}/"
                        ))],
                        namespaces: Vec::new(),
                    }],
                    to: vec![Operation {
                        ports: vec![8080],
                        methods: vec![exact("GET"), exact("POST")],
                        paths: vec![Pattern::Prefix(format!("/api/v{j}/")), exact("/health")],
                    }],
                })
                .collect();
            policy(&format!("p{i:02}"), Action::Allow, rules)
        })
        .chain(demo())
        .collect()
}

/// Median nanoseconds per decision of `req` against `authz`.
fn time(authz: &Authorizer, req: &Request<'_>) -> f64 {
    let mut runs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..DECISIONS {
                black_box(authz.authorize(black_box(req)));
            }
            start.elapsed().as_nanos() as f64 / f64::from(DECISIONS)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[RUNS / 2]
}

fn main() {
    let services = web_service();
    let me = Workload {
        namespace: "demo",
        name: "web-1",
        endpoints: EndpointPorts::TargetPort,
    };
    let request = |principal: &'static str, method: &'static str, path: &'static str| Request {
        principal,
        namespace: "demo",
        port: 8080,
        http: Some(HttpRequest { method, path }),
    };
    let client = "spiffe://cluster.local/ns/demo/sa/client";
    let cases = [
        ("no policy", Vec::new(), request(client, "GET", "/hello")),
        (
            "demo's 2, allowed GET /hello",
            demo(),
            request(client, "GET", "/hello"),
        ),
        (
            "demo's 2, denied GET /public/../admin (normalized)",
            demo(),
            request(client, "GET", "/public/../admin"),
        ),
        (
            "66 policies x 4 rules, allowed by the last",
            many(),
            request(client, "GET", "/hello"),
        ),
    ];
    println!("| policies, request | ns per decision |");
    println!("|---|---:|");
    for (name, policies, req) in &cases {
        let authz = Authorizer::new(policies, &services, &me);
        println!("| {name} | {:.0} |", time(&authz, req));
    }
}
