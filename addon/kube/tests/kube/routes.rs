//! HTTPRoutes (Gateway API) from the API stand-in: the mesh's (a Service parent) reach the
//! snapshot at startup and by watch, a Gateway's are left out, an invalid or malformed one
//! is left out on its own (counted, the others kept), and a cluster without the Gateway
//! API's CRDs still becomes ready.

use std::time::Duration;

use serde_json::{Value, json};
use trellis_api::MeshSnapshot;
use trellis_api::route::HttpRoute;
use trellis_kube::stand_in::ApiStandIn;
use trellis_kube::{GATEWAY_API_INSTALL, Kind};

use crate::support::*;

const DEBOUNCE: Duration = Duration::from_millis(20);
const RESOURCE: &str = "httproutes";

fn http_route(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

/// `demo/<name>`: Service `web` split between `web-v1` and `web-v2` by weight.
fn split(name: &str, v1: u32, v2: u32) -> Value {
    http_route(
        "demo",
        name,
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
            "rules": [{"backendRefs": [
                {"name": "web-v1", "port": 80, "weight": v1},
                {"name": "web-v2", "port": 80, "weight": v2},
            ]}],
        }),
    )
}

/// A route of a Gateway: not the mesh's.
fn ingress() -> Value {
    http_route(
        "demo",
        "ingress",
        json!({
            "parentRefs": [{"name": "public"}],
            "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/.*"}}],
                       "backendRefs": [{"name": "web", "port": 80}]}],
        }),
    )
}

/// A mesh route with a problem the schema lets through: a regular expression path.
fn regex_route() -> Value {
    http_route(
        "demo",
        "regex",
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
            "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]+"}}],
                       "backendRefs": [{"name": "web-v2", "port": 80}]}],
        }),
    )
}

/// A mesh route this version cannot even parse: a field of the experimental channel.
fn retry_route() -> Value {
    http_route(
        "demo",
        "retry",
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
            "rules": [{"retry": {"attempts": 3}, "backendRefs": [{"name": "web", "port": 80}]}],
        }),
    )
}

fn keys(snap: &MeshSnapshot) -> Vec<String> {
    snap.routes.iter().map(HttpRoute::key).collect()
}

/// The weights of the first rule of route `key`.
fn weights(snap: &MeshSnapshot, key: &str) -> Option<Vec<u32>> {
    let route = snap.routes.iter().find(|r| r.key() == key)?;
    Some(route.rules[0].backends.iter().map(|b| b.weight).collect())
}

#[tokio::test]
async fn mesh_routes_reach_the_snapshot_at_startup_and_by_watch() {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    api.apply(&service("demo", "web", "10.96.0.10", &[("http", 80)]));
    api.apply_json(split("web-canary", 90, 10)).unwrap();
    api.apply_json(ingress()).unwrap();
    let running = Running::start(api.client(), DEBOUNCE);
    let first = running.ready().await;
    assert_eq!(
        keys(&first),
        ["demo/web-canary"],
        "the Gateway's route left out"
    );
    assert_eq!(weights(&first, "demo/web-canary"), Some(vec![90, 10]));
    let parent = &first.routes[0].parents[0];
    assert_eq!(
        (parent.service.to_string(), parent.port),
        ("demo/web".to_owned(), None)
    );
    let status = running.handle.status();
    assert_eq!(status.kinds[&Kind::HttpRoute].objects, 2);
    assert_eq!(status.kinds[&Kind::HttpRoute].errors, 0);

    // A route change alone publishes a new version; so do a new route and a deletion.
    api.apply_json(split("web-canary", 50, 50)).unwrap();
    let changed = running
        .until("the new weights", |s| {
            weights(s, "demo/web-canary") == Some(vec![50, 50])
        })
        .await;
    assert!(changed.version > first.version);
    api.apply_json(split("web-blue-green", 0, 1)).unwrap();
    running
        .until("a second route", |s| {
            keys(s) == ["demo/web-blue-green", "demo/web-canary"]
        })
        .await;
    api.remove(RESOURCE, "demo", "web-canary").unwrap();
    running
        .until("deleted", |s| keys(s) == ["demo/web-blue-green"])
        .await;
    assert!(has_line(
        &running.metrics(),
        "trellis_controller_invalid_routes 0"
    ));
    running.stop().await;
}

#[tokio::test]
async fn an_invalid_route_is_left_out_and_the_others_kept() {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    api.apply(&service("demo", "web", "10.96.0.10", &[("http", 80)]));
    api.apply_json(split("web-canary", 90, 10)).unwrap();
    api.apply_json(regex_route()).unwrap();
    api.apply_json(retry_route()).unwrap();
    let running = Running::start(api.client(), DEBOUNCE);
    // A malformed route must not fail the list: the first snapshot comes, with the good
    // route only.
    let first = running.ready().await;
    assert_eq!(keys(&first), ["demo/web-canary"]);
    let status = running.handle.status();
    let kind = &status.kinds[&Kind::HttpRoute];
    assert_eq!((kind.objects, kind.errors), (3, 0), "{kind:?}");
    let metrics = running.metrics();
    assert!(
        has_line(&metrics, "trellis_controller_invalid_routes 2"),
        "{metrics}"
    );

    // Another malformed route arrives by watch: left out on its own; a later change of the
    // good route still applies.
    let mut another = retry_route();
    another["metadata"]["name"] = json!("retry-2");
    api.apply_json(another).unwrap();
    eventually("the gauge at 3", || {
        has_line(&running.metrics(), "trellis_controller_invalid_routes 3").then_some(())
    })
    .await;
    api.apply_json(split("web-canary", 0, 100)).unwrap();
    let changed = running
        .until("the good route changed", |s| {
            weights(s, "demo/web-canary") == Some(vec![0, 100])
        })
        .await;
    assert_eq!(keys(&changed), ["demo/web-canary"]);

    // Fixed: the route is applied, and no longer counted.
    api.apply_json(http_route(
        "demo",
        "regex",
        json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                       "backendRefs": [{"name": "web-v2", "port": 80}]}],
        }),
    ))
    .unwrap();
    running
        .until("the fixed route", |s| {
            keys(s) == ["demo/regex", "demo/web-canary"]
        })
        .await;
    eventually("the gauge at 2", || {
        has_line(&running.metrics(), "trellis_controller_invalid_routes 2").then_some(())
    })
    .await;
    assert_eq!(running.handle.status().kinds[&Kind::HttpRoute].errors, 0);
    running.stop().await;
}

#[tokio::test]
async fn missing_gateway_api_crds_do_not_block_the_first_snapshot() {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    api.apply(&service("demo", "web", "10.96.0.10", &[("http", 80)]));
    api.apply_json(split("waiting", 1, 1)).unwrap();
    // Neither CRD: each is its own missing kind.
    api.unserve(RESOURCE, true);
    api.unserve("authorizationpolicies", true);
    let running = Running::start(api.client(), DEBOUNCE);
    let first = running.ready().await;
    assert_eq!(first.version, 1);
    assert_eq!(first.services.len(), 1);
    assert!(first.routes.is_empty(), "no CRD: no routes");
    let status = running.handle.status();
    let kind = &status.kinds[&Kind::HttpRoute];
    assert!(kind.listed && kind.errors >= 1, "{kind:?}");
    let error = kind.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("404") && error.contains(GATEWAY_API_INSTALL),
        "{error}"
    );
    assert!(
        running.metrics().lines().any(|l| l
            .starts_with("trellis_kube_watch_errors_total{kind=\"HTTPRoute\"}")
            && !l.ends_with(" 0")),
        "{}",
        running.metrics()
    );

    // The Gateway API is installed: the next retry lists it, and the route is applied;
    // the AuthorizationPolicy CRD is still missing, and still said so.
    api.unserve(RESOURCE, false);
    let snap = running
        .until("the route after the CRD", |s| keys(s) == ["demo/waiting"])
        .await;
    assert!(snap.version > first.version);
    assert!(api.requests(RESOURCE).0 >= 2, "the list was retried");
    let status = running
        .until_status("the missing-CRD note cleared", |s| {
            s.kinds[&Kind::HttpRoute].last_error.is_none()
        })
        .await;
    let policies = &status.kinds[&Kind::AuthorizationPolicy];
    assert!(
        (policies.last_error.as_deref()).is_some_and(|e| e.contains("charts/trellis/crds/")),
        "{policies:?}"
    );
    running.stop().await;
}
