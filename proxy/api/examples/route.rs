//! What choosing an HTTPRoute rule and backend costs the proxy per request, by route set.
//!
//! `cargo run --release -p trellis-api --example route` builds the `RouteTable` a proxy
//! builds on each view change and times `select` plus `pick` on the request path, for: no
//! route on the Service (the fast path of every unrouted request), the demo's canary (a
//! header rule and a weighted split), and 16 routes of 16 rules each on one Service (the
//! upstream schema's rule limit, every rule with a path, a method and a header to compare),
//! matched by the last rule. Each row is the median of 5 runs of 200,000 choices. Figures
//! are in BENCHMARKS.md.

use std::hint::black_box;
use std::time::Instant;

use trellis_api::ServiceKey;
use trellis_api::route::{
    Backend, HttpRoute, PathMatch, RouteMatch, RouteParent, RouteRequest, RouteRule, RouteTable,
    Selection,
};

const CHOICES: u32 = 200_000;
const RUNS: usize = 5;

fn backend(name: &str, weight: u32) -> Backend {
    Backend {
        service: ServiceKey::new("demo", name),
        port: 80,
        weight,
    }
}

fn route(name: &str, rules: Vec<RouteRule>) -> HttpRoute {
    HttpRoute {
        namespace: "demo".into(),
        name: name.into(),
        parents: vec![RouteParent {
            service: ServiceKey::new("demo", "web"),
            port: Some(80),
        }],
        rules,
    }
}

/// The demo's canary: `x-canary: true` to web-canary, the rest 80/20.
fn demo() -> Vec<HttpRoute> {
    vec![route(
        "web-canary",
        vec![
            RouteRule {
                name: "opt-in".into(),
                matches: vec![RouteMatch {
                    path: PathMatch::Prefix("/".into()),
                    method: None,
                    headers: vec![("x-canary".into(), "true".into())],
                    query: Vec::new(),
                }],
                backends: vec![backend("web-canary", 1)],
                timeout: None,
            },
            RouteRule {
                name: "split".into(),
                matches: Vec::new(),
                backends: vec![backend("web-stable", 80), backend("web-canary", 20)],
                timeout: None,
            },
        ],
    )]
}

/// 16 routes x 16 rules, each matching `/api/v<i>/<j>` for GET with `x-tenant: t<i>-<j>`:
/// only the last rule of the last route matches the timed request.
fn many() -> Vec<HttpRoute> {
    (0..16)
        .map(|i| {
            let rules = (0..16)
                .map(|j| RouteRule {
                    name: format!("r{j}"),
                    matches: vec![RouteMatch {
                        path: PathMatch::Prefix(format!("/api/v{i}/{j}")),
                        method: Some("GET".into()),
                        headers: vec![("x-tenant".into(), format!("t{i}-{j}"))],
                        query: Vec::new(),
                    }],
                    backends: vec![backend("web-stable", 9), backend("web-canary", 1)],
                    timeout: None,
                })
                .collect();
            route(&format!("routes-{i:02}"), rules)
        })
        .collect()
}

/// Median nanoseconds per choice (rule and backend) for `req` to demo/web:80.
fn time(table: &RouteTable, req: &RouteRequest<'_>) -> f64 {
    let web = ServiceKey::new("demo", "web");
    let mut runs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            for roll in 0..u64::from(CHOICES) {
                if let Selection::Rule { rule, .. } = table.select(black_box(&web), 80, req) {
                    black_box(rule.pick(roll));
                }
            }
            start.elapsed().as_nanos() as f64 / f64::from(CHOICES)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[RUNS / 2]
}

fn no_header(_: &str, _: &str) -> bool {
    false
}

fn canary_header(name: &str, value: &str) -> bool {
    name == "x-canary" && value == "true"
}

fn tenant_header(name: &str, value: &str) -> bool {
    name == "x-tenant" && value == "t15-15"
}

fn main() {
    let request =
        |path: &'static str, has_header: &'static dyn Fn(&str, &str) -> bool| RouteRequest {
            method: "GET",
            path,
            query: "",
            has_header,
        };
    let cases = [
        (
            "no route on the Service",
            Vec::new(),
            request("/hello", &no_header),
        ),
        (
            "the demo's canary, split request GET /hello",
            demo(),
            request("/hello", &no_header),
        ),
        (
            "the demo's canary, opted-in request (x-canary: true)",
            demo(),
            request("/hello", &canary_header),
        ),
        (
            "16 routes x 16 rules (path, method, header), matched by the last",
            many(),
            request("/api/v15/15/items", &tenant_header),
        ),
    ];
    println!("| routes, request | ns per request |");
    println!("|---|---:|");
    for (name, routes, req) in &cases {
        let table = RouteTable::new(routes, "demo");
        println!("| {name} | {:.0} |", time(&table, req));
    }
}
