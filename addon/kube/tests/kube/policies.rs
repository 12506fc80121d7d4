//! AuthorizationPolicies from the API stand-in: into the snapshot with service accounts
//! resolved, invalid ones fail-closed, and a missing CRD that must not hold the first
//! snapshot back.

use std::time::Duration;

use serde_json::{Value, json};
use trellis_api::MeshSnapshot;
use trellis_api::authz::{Action, AuthorizationPolicy, Pattern, Rule, Source};
use trellis_kube::Kind;
use trellis_kube::stand_in::ApiStandIn;

use crate::support::*;

const DEBOUNCE: Duration = Duration::from_millis(20);
const RESOURCE: &str = "authorizationpolicies";

fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "policy.trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

fn keys(snap: &MeshSnapshot) -> Vec<String> {
    snap.authorization
        .iter()
        .map(AuthorizationPolicy::key)
        .collect()
}

fn find<'a>(snap: &'a MeshSnapshot, key: &str) -> Option<&'a AuthorizationPolicy> {
    snap.authorization.iter().find(|p| p.key() == key)
}

#[tokio::test]
async fn policies_reach_the_snapshot_with_service_accounts_resolved() {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    api.apply(&service("demo", "web", "10.96.0.10", &[("http", 80)]));
    api.apply_json(policy(
        "demo",
        "web-readers",
        json!({
            "targetRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"from": [{"serviceAccounts": ["client", "other/batch"]}]}],
        }),
    ))
    .unwrap();
    let running = Running::start(api.client(), DEBOUNCE);
    let first = running.ready().await;
    assert_eq!(keys(&first), ["demo/web-readers"]);
    let readers = &first.authorization[0];
    assert_eq!(readers.target_services, ["web"]);
    assert_eq!(readers.action, Action::Allow);
    assert_eq!(
        readers.rules,
        [Rule {
            from: vec![Source {
                principals: vec![
                    Pattern::Exact(format!("spiffe://{TD}/ns/demo/sa/client")),
                    Pattern::Exact(format!("spiffe://{TD}/ns/other/sa/batch")),
                ],
                namespaces: vec![],
            }],
            to: vec![],
        }]
    );
    assert_eq!(
        running.handle.status().kinds[&Kind::AuthorizationPolicy].objects,
        1
    );

    // A policy change alone publishes a new version; so does a new policy and a deletion.
    api.apply_json(policy(
        "demo",
        "web-readers",
        json!({"targetRefs": [{"kind": "Service", "name": "web"}], "action": "DENY",
               "rules": [{}]}),
    ))
    .unwrap();
    let changed = running
        .until("DENY", |s| {
            find(s, "demo/web-readers").is_some_and(|p| p.action == Action::Deny)
        })
        .await;
    assert!(changed.version > first.version);
    api.apply_json(policy("trellis-system", "mesh", json!({"dryRun": true})))
        .unwrap();
    running
        .until("a root policy", |s| {
            keys(s) == ["demo/web-readers", "trellis-system/mesh"]
        })
        .await;
    api.remove(RESOURCE, "demo", "web-readers").unwrap();
    running
        .until("deleted", |s| keys(s) == ["trellis-system/mesh"])
        .await;
    let status = running.handle.status();
    assert_eq!(status.kinds[&Kind::AuthorizationPolicy].errors, 0);
    assert!(has_line(
        &running.metrics(),
        "trellis_controller_invalid_policies 0"
    ));
    running.stop().await;
}

#[tokio::test]
async fn an_invalid_policy_reaches_the_snapshot_fail_closed() {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    // What the CRD schema may let through: a service account with two slashes.
    api.apply_json(policy(
        "demo",
        "bad-allow",
        json!({
            "targetRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"from": [{"serviceAccounts": ["a/b/c"]}]}],
        }),
    ))
    .unwrap();
    api.apply_json(policy(
        "demo",
        "bad-deny",
        json!({
            "targetRefs": [{"kind": "Deployment", "name": "web"}],
            "action": "DENY",
            "rules": [{"to": [{"methods": ["POST"]}]}],
        }),
    ))
    .unwrap();
    let running = Running::start(api.client(), DEBOUNCE);
    let first = running.ready().await;
    assert_eq!(keys(&first), ["demo/bad-allow", "demo/bad-deny"]);
    // ALLOW: its targets, no rules: allows nothing.
    let allow = &first.authorization[0];
    assert_eq!(
        (
            allow.target_services.as_slice(),
            allow.action,
            allow.rules.as_slice()
        ),
        (["web".to_owned()].as_slice(), Action::Allow, [].as_slice())
    );
    // DENY with bad targetRefs: the whole namespace, one empty rule: refuses everything.
    let deny = &first.authorization[1];
    assert_eq!(
        (
            deny.target_services.as_slice(),
            deny.action,
            deny.rules.as_slice()
        ),
        ([].as_slice(), Action::Deny, [Rule::default()].as_slice())
    );
    assert!(has_line(
        &running.metrics(),
        "trellis_controller_invalid_policies 2"
    ));

    // Fixed: enforced as written, and no longer counted.
    api.apply_json(policy(
        "demo",
        "bad-allow",
        json!({
            "targetRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"from": [{"serviceAccounts": ["b/c"]}]}],
        }),
    ))
    .unwrap();
    let fixed = running
        .until("fixed", |s| {
            find(s, "demo/bad-allow").is_some_and(|p| !p.rules.is_empty())
        })
        .await;
    assert_eq!(
        find(&fixed, "demo/bad-allow").unwrap().rules[0].from[0].principals,
        [Pattern::Exact(format!("spiffe://{TD}/ns/b/sa/c"))]
    );
    eventually("the gauge at 1", || {
        has_line(&running.metrics(), "trellis_controller_invalid_policies 1").then_some(())
    })
    .await;
    running.stop().await;
}

#[tokio::test]
async fn a_missing_crd_does_not_block_the_first_snapshot() {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    api.apply(&service("demo", "web", "10.96.0.10", &[("http", 80)]));
    api.apply_json(policy(
        "demo",
        "waiting",
        json!({"action": "DENY", "rules": [{}]}),
    ))
    .unwrap();
    api.unserve(RESOURCE, true);
    let running = Running::start(api.client(), DEBOUNCE);
    let first = running.ready().await;
    assert_eq!(first.version, 1);
    assert_eq!(first.services.len(), 1);
    assert!(first.authorization.is_empty(), "no CRD: no policies");
    let status = running.handle.status();
    let kind = &status.kinds[&Kind::AuthorizationPolicy];
    assert!(kind.listed && kind.errors >= 1, "{kind:?}");
    let error = kind.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("404") && error.contains("kubectl apply -f charts/trellis/crds/"),
        "{error}"
    );
    assert!(
        running.metrics().lines().any(|l| l
            .starts_with("trellis_kube_watch_errors_total{kind=\"AuthorizationPolicy\"}")
            && !l.ends_with(" 0")),
        "{}",
        running.metrics()
    );

    // The CRD is applied: the next retry lists it, and the policy is enforced.
    api.unserve(RESOURCE, false);
    let snap = running
        .until("the policy after the CRD", |s| keys(s) == ["demo/waiting"])
        .await;
    assert!(snap.version > first.version);
    assert!(api.requests(RESOURCE).0 >= 2, "the list was retried");
    running
        .until_status("the missing-CRD note cleared", |s| {
            s.kinds[&Kind::AuthorizationPolicy].last_error.is_none()
        })
        .await;
    running.stop().await;
}
