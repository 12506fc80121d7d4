//! Table tests for the entries Trellis keeps in `status.parents`. Routes are written as the
//! API server stores them (JSON), so the tests also pin the field names read and written.

use serde_json::{Value, json};

use super::*;

const NOW: &str = "2026-03-01T10:00:00Z";
const EARLIER: &str = "2026-02-01T09:00:00Z";

fn route(generation: i64, spec: Value, status: Value) -> RawRoute {
    serde_json::from_value(json!({
        "metadata": {"name": "web-canary", "namespace": "demo", "generation": generation},
        "spec": spec,
        "status": status,
    }))
    .unwrap()
}

fn web_parent() -> Value {
    json!({"group": "", "kind": "Service", "name": "web", "port": 80})
}

/// `demo/web-canary`: Service `web` port 80 to `backends` (names, port 80).
fn spec(backends: &[&str]) -> Value {
    let backends: Vec<Value> = backends
        .iter()
        .map(|b| json!({"name": b, "port": 80}))
        .collect();
    json!({"parentRefs": [web_parent()], "rules": [{"backendRefs": backends}]})
}

fn services(names: &[&str]) -> BTreeSet<ObjectKey> {
    names
        .iter()
        .map(|n| match n.split_once('/') {
            Some((ns, name)) => ObjectKey::new(ns, name),
            None => ObjectKey::new("demo", *n),
        })
        .collect()
}

fn condition(
    kind: &str,
    holds: bool,
    reason: &str,
    message: &str,
    since: &str,
    generation: i64,
) -> Value {
    json!({
        "type": kind, "status": if holds { "True" } else { "False" }, "reason": reason,
        "message": message, "observedGeneration": generation, "lastTransitionTime": since,
    })
}

fn accepted(since: &str, generation: i64) -> Value {
    condition(
        "Accepted",
        true,
        "Accepted",
        "applied by the mesh's proxies",
        since,
        generation,
    )
}

fn resolved(since: &str, generation: i64) -> Value {
    condition(
        "ResolvedRefs",
        true,
        "ResolvedRefs",
        "every backend is an existing Service of the route's namespace",
        since,
        generation,
    )
}

fn ours(parent_ref: Value, conditions: &[Value]) -> Value {
    json!({"parentRef": parent_ref, "controllerName": CONTROLLER_NAME, "conditions": conditions})
}

fn gateway_entry() -> Value {
    json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "", "lastTransitionTime": EARLIER}],
    })
}

/// The conditions of our first entry in `status`.
fn conditions_of(status: &Value) -> Vec<Value> {
    let entry = (status["parents"].as_array().unwrap().iter())
        .find(|e| e["controllerName"] == CONTROLLER_NAME)
        .unwrap();
    entry["conditions"].as_array().unwrap().clone()
}

#[test]
fn a_supported_route_is_accepted_with_its_refs_resolved() {
    let r = route(3, spec(&["web-v1", "web-v2"]), Value::Null);
    let status = status_update(&r, &services(&["web", "web-v1", "web-v2"]), NOW).unwrap();
    assert_eq!(
        status,
        json!({"parents": [ours(web_parent(), &[accepted(NOW, 3), resolved(NOW, 3)])]})
    );
    // Written as it should be: nothing more to write.
    let written = route(3, spec(&["web-v1", "web-v2"]), status);
    assert_eq!(
        status_update(&written, &services(&["web", "web-v1", "web-v2"]), "later"),
        None
    );
}

#[test]
fn accepted_false_names_every_problem_field() {
    let spec = json!({
        "parentRefs": [web_parent()],
        "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]+"}}],
                   "backendRefs": [{"name": "web-v2", "port": 80}],
                   "filters": [{"type": "RequestHeaderModifier"}]}],
    });
    let status = status_update(
        &route(1, spec, Value::Null),
        &services(&["web", "web-v2"]),
        NOW,
    );
    let conditions = conditions_of(&status.unwrap());
    assert_eq!(
        conditions[0],
        condition(
            "Accepted",
            false,
            "UnsupportedValue",
            "not applied, Trellis does not support: spec.rules[0].matches[0].path.type: \
             RegularExpression is not supported; use Exact or PathPrefix; \
             spec.rules[0].filters: filters are not supported yet",
            NOW,
            1
        )
    );
    assert_eq!(
        conditions[1],
        resolved(NOW, 1),
        "the backends still resolve"
    );
}

#[test]
fn a_spec_that_does_not_parse_is_refused_by_field_and_its_backends_still_judged() {
    let spec = json!({
        "parentRefs": [web_parent()],
        "rules": [{"retry": {"attempts": 3}, "backendRefs": [{"name": "gone", "port": 80}]}],
    });
    let status = status_update(&route(1, spec, Value::Null), &services(&["web"]), NOW);
    let conditions = conditions_of(&status.unwrap());
    assert_eq!(conditions[0]["reason"], "UnsupportedValue");
    let message = conditions[0]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.rules[0]") && message.contains("retry"),
        "{message}"
    );
    assert_eq!(conditions[1]["reason"], "BackendNotFound");
}

#[test]
fn a_parent_service_that_does_not_exist_is_no_matching_parent() {
    let spec = json!({
        "parentRefs": [
            web_parent(),
            {"group": "core", "kind": "Service", "name": "api", "namespace": "shop"},
        ],
        "rules": [{"backendRefs": [{"name": "web-v1", "port": 80}]}],
    });
    let status = status_update(
        &route(2, spec, Value::Null),
        &services(&["web-v1", "web"]),
        NOW,
    )
    .unwrap();
    let parents = status["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2);
    assert_eq!(parents[0]["conditions"][0], accepted(NOW, 2));
    // The parentRef as written: group "core", the namespace, no port.
    assert_eq!(
        parents[1]["parentRef"],
        json!({"group": "core", "kind": "Service", "name": "api", "namespace": "shop"})
    );
    assert_eq!(
        parents[1]["conditions"][0],
        condition(
            "Accepted",
            false,
            "NoMatchingParent",
            "Service shop/api not found",
            NOW,
            2
        )
    );
    assert_eq!(parents[1]["conditions"][1], resolved(NOW, 2));
}

#[test]
fn unresolved_backends_give_the_first_reason_and_name_every_backend() {
    // Case, backendRefs, reason, message.
    let cases: [(&str, Value, &str, &str); 5] = [
        (
            "missing",
            json!([{"name": "web-v1", "port": 80}, {"name": "web-v3", "port": 80}]),
            "BackendNotFound",
            "spec.rules[0].backendRefs[1]: Service demo/web-v3 not found",
        ),
        (
            "another namespace",
            json!([{"name": "web-v1", "namespace": "other", "port": 80}]),
            "RefNotPermitted",
            "spec.rules[0].backendRefs[0]: Service other/web-v1 is in another namespace; that \
             needs a ReferenceGrant, which Trellis does not support",
        ),
        (
            "its own namespace, written",
            json!([{"name": "web-v1", "namespace": "demo", "port": 80}]),
            "ResolvedRefs",
            "every backend is an existing Service of the route's namespace",
        ),
        (
            "another kind",
            json!([{"group": "example.com", "kind": "Bucket", "name": "b"}]),
            "InvalidKind",
            "spec.rules[0].backendRefs[0]: example.com/Bucket \"b\" is not a core Service (group \"\")",
        ),
        (
            "several, first reason wins",
            json!([{"kind": "Pod", "name": "p"}, {"name": "nope", "port": 80}]),
            "InvalidKind",
            "spec.rules[0].backendRefs[0]: kind Pod (\"p\") is not supported: only Service; \
             spec.rules[0].backendRefs[1]: Service demo/nope not found",
        ),
    ];
    for (case, backends, reason, message) in cases {
        let spec = json!({"parentRefs": [web_parent()], "rules": [{"backendRefs": backends}]});
        let status = status_update(
            &route(1, spec, Value::Null),
            &services(&["web", "web-v1", "other/web-v1"]),
            NOW,
        );
        let conditions = conditions_of(&status.unwrap());
        assert_eq!(conditions[1]["reason"], reason, "{case}");
        assert_eq!(conditions[1]["message"], message, "{case}");
        assert_eq!(
            conditions[1]["status"],
            if reason == "ResolvedRefs" {
                "True"
            } else {
                "False"
            },
            "{case}"
        );
    }
}

#[test]
fn transition_times_change_only_with_the_status() {
    let before = json!({"parents": [ours(
        web_parent(),
        &[accepted(EARLIER, 1), resolved(EARLIER, 1)],
    )]});
    // Same statuses, new generation: rewritten with the new generation, times kept.
    let status = status_update(
        &route(2, spec(&["web-v1"]), before.clone()),
        &services(&["web", "web-v1"]),
        NOW,
    );
    assert_eq!(
        status.unwrap(),
        json!({"parents": [ours(web_parent(), &[accepted(EARLIER, 2), resolved(EARLIER, 2)])]})
    );
    // The backend is gone: ResolvedRefs flips (a new time), Accepted keeps its time.
    let status = status_update(
        &route(1, spec(&["web-v1"]), before),
        &services(&["web"]),
        NOW,
    );
    let conditions = conditions_of(&status.unwrap());
    assert_eq!(conditions[0], accepted(EARLIER, 1));
    assert_eq!(
        conditions[1],
        condition(
            "ResolvedRefs",
            false,
            "BackendNotFound",
            "spec.rules[0].backendRefs[0]: Service demo/web-v1 not found",
            NOW,
            1
        )
    );
}

#[test]
fn other_controllers_entries_stay_in_place_and_ours_follow_the_spec() {
    let api = json!({"group": "", "kind": "Service", "name": "api"});
    let stale = ours(api, &[accepted(EARLIER, 1), resolved(EARLIER, 1)]);
    let before = json!({"parents": [stale, gateway_entry()]});
    let both = json!({"parentRefs": [
        web_parent(),
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"},
    ], "rules": [{"backendRefs": [{"name": "web-v1", "port": 80}]}]});
    let status = status_update(
        &route(1, both, before.clone()),
        &services(&["web", "web-v1", "api"]),
        NOW,
    );
    // The entry for `api`, no longer a parent, is gone; the Gateway's kept untouched.
    assert_eq!(
        status.unwrap(),
        json!({"parents": [
            gateway_entry(),
            ours(web_parent(), &[accepted(NOW, 1), resolved(NOW, 1)]),
        ]})
    );

    // A route that no longer has any Service parent: ours removed, theirs kept.
    let gateway_only = json!({"parentRefs": [{"name": "public"}]});
    let status = status_update(
        &route(1, gateway_only.clone(), before),
        &services(&["api"]),
        NOW,
    );
    assert_eq!(status.unwrap(), json!({"parents": [gateway_entry()]}));
    // A Gateway's route without entries of ours: never written.
    let theirs = json!({"parents": [gateway_entry()]});
    assert_eq!(
        status_update(&route(1, gateway_only, theirs), &services(&[]), NOW),
        None
    );
}

#[test]
fn the_same_parent_twice_gets_one_entry() {
    let spec = json!({"parentRefs": [web_parent(), web_parent()],
                      "rules": [{"backendRefs": [{"name": "web-v1", "port": 80}]}]});
    let status = status_update(
        &route(1, spec, Value::Null),
        &services(&["web", "web-v1"]),
        NOW,
    )
    .unwrap();
    let parents = status["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 1);
    let message = parents[0]["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("duplicate parent Service demo/web"),
        "{message}"
    );
}

#[test]
fn long_messages_are_capped() {
    let backends: Vec<Value> = (0..16)
        .map(|i| json!({"name": format!("missing-backend-with-a-long-name-{i:02}"), "port": 80}))
        .collect();
    let spec = json!({"parentRefs": [web_parent()], "rules": [{"backendRefs": backends}]});
    let status = status_update(&route(1, spec, Value::Null), &services(&["web"]), NOW);
    let message = conditions_of(&status.unwrap())[1]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(message.chars().count(), MAX_MESSAGE);
    assert!(message.ends_with("..."), "{message}");
    assert!(message.starts_with("spec.rules[0].backendRefs[0]: Service demo/missing-backend"));
}
