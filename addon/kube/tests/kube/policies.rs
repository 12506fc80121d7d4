//! AuthorizationPolicies from the API stand-in: into the snapshot with service accounts
//! resolved, invalid ones fail-closed, malformed ones (a spec that does not even parse)
//! fail-closed on their own without stopping the others, and a missing CRD that must not
//! hold the first snapshot back.

use std::time::Duration;

use serde_json::{Value, json};
use trellis_api::MeshSnapshot;
use trellis_api::authz::{Action, AuthorizationPolicy, Operation, Pattern, Rule, Source};
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

/// A policy as translated: `(key, target services, action, dry run, rules)`.
type Enforced = (String, Vec<String>, Action, bool, Vec<Rule>);

fn enforced(p: &AuthorizationPolicy) -> Enforced {
    (
        p.key(),
        p.target_services.clone(),
        p.action,
        p.dry_run,
        p.rules.clone(),
    )
}

fn expect(key: &str, targets: &[&str], action: Action, rules: Vec<Rule>) -> Enforced {
    let targets = targets.iter().map(|t| (*t).to_owned()).collect();
    (key.to_owned(), targets, action, false, rules)
}

/// `demo/web-readers`: lets service account `client` call Service `web`.
fn web_readers() -> Value {
    policy(
        "demo",
        "web-readers",
        json!({
            "targetRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"from": [{"serviceAccounts": ["client"]}]}],
        }),
    )
}

/// `web-readers` as enforced.
fn web_readers_enforced() -> Enforced {
    let from_client = Rule {
        from: vec![Source {
            principals: vec![Pattern::Exact(format!("spiffe://{TD}/ns/demo/sa/client"))],
            namespaces: vec![],
        }],
        to: vec![],
    };
    expect(
        "demo/web-readers",
        &["web"],
        Action::Allow,
        vec![from_client],
    )
}

/// Three specs the typed CRD struct cannot deserialize: a field of a newer Trellis, a port
/// out of range, an action that does not exist.
fn malformed() -> [Value; 3] {
    [
        policy(
            "demo",
            "newer-field",
            json!({
                "targetRefs": [{"kind": "Service", "name": "web"}],
                "action": "ALLOW",
                "rules": [{
                    "from": [{"serviceAccounts": ["client"]}],
                    "when": [{"key": "request.headers[x-team]", "values": ["a"]}],
                }],
            }),
        ),
        policy(
            "demo",
            "big-port",
            json!({
                "targetRefs": [{"kind": "Service", "name": "api"}],
                "action": "DENY",
                "rules": [{"to": [{"ports": [8080, 70000]}]}],
            }),
        ),
        policy(
            "demo",
            "audit",
            json!({
                "targetRefs": [{"kind": "Service", "name": "web"}],
                "action": "AUDIT",
                "rules": [{"from": [{"namespaces": ["ops"]}]}],
            }),
        ),
    ]
}

/// The three of [`malformed`] as enforced: the readable ALLOW keeps its target and allows
/// nothing; the DENY keeps its target and refuses everything on it; the unknown action
/// refuses everything on its target.
fn malformed_enforced() -> [Enforced; 3] {
    [
        expect("demo/audit", &["web"], Action::Deny, vec![Rule::default()]),
        expect(
            "demo/big-port",
            &["api"],
            Action::Deny,
            vec![Rule::default()],
        ),
        expect("demo/newer-field", &["web"], Action::Allow, vec![]),
    ]
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
async fn a_malformed_policy_is_enforced_fail_closed_without_stopping_the_others() {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    api.apply(&service("demo", "web", "10.96.0.10", &[("http", 80)]));
    api.apply_json(web_readers()).unwrap();
    for bad in malformed() {
        api.apply_json(bad).unwrap();
    }
    let running = Running::start(api.client(), DEBOUNCE);
    // Before the fix, the list failed to deserialize and this never came.
    let first = running.ready().await;
    let got: Vec<Enforced> = first.authorization.iter().map(enforced).collect();
    let [audit, big_port, newer_field] = malformed_enforced();
    assert_eq!(
        got,
        [audit, big_port, newer_field, web_readers_enforced()],
        "the good policy intact, the malformed ones fail-closed"
    );
    let status = running.handle.status();
    let kind = &status.kinds[&Kind::AuthorizationPolicy];
    assert_eq!((kind.objects, kind.errors), (4, 0), "{kind:?}");
    let metrics = running.metrics();
    assert!(
        has_line(&metrics, "trellis_controller_invalid_policies 3"),
        "{metrics}"
    );
    assert!(
        has_line(
            &metrics,
            "trellis_kube_watch_errors_total{kind=\"AuthorizationPolicy\"} 0"
        ),
        "{metrics}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_malformed_policy_arriving_by_watch_does_not_stop_later_changes() {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    api.apply(&service("demo", "web", "10.96.0.10", &[("http", 80)]));
    api.apply_json(web_readers()).unwrap();
    let running = Running::start(api.client(), DEBOUNCE);
    let first = running.ready().await;
    let got: Vec<Enforced> = first.authorization.iter().map(enforced).collect();
    assert_eq!(got, [web_readers_enforced()]);

    // A malformed policy arrives by watch: it is enforced fail-closed on its own.
    let [bad, ..] = malformed();
    api.apply_json(bad).unwrap();
    let [.., newer_field] = malformed_enforced();
    let with_bad = running
        .until("the malformed policy, fail-closed", |s| {
            find(s, "demo/newer-field").map(enforced).as_ref() == Some(&newer_field)
        })
        .await;
    assert_eq!(
        find(&with_bad, "demo/web-readers").map(enforced),
        Some(web_readers_enforced())
    );
    eventually("the gauge at 1", || {
        has_line(&running.metrics(), "trellis_controller_invalid_policies 1").then_some(())
    })
    .await;

    // A later change of the good policy is still applied (before the fix, the watch
    // failed on the malformed event, and every re-list failed too).
    api.apply_json(policy(
        "demo",
        "web-readers",
        json!({"targetRefs": [{"kind": "Service", "name": "web"}], "action": "DENY",
               "rules": [{"to": [{"ports": [8080]}]}]}),
    ))
    .unwrap();
    let changed = running
        .until("the good policy changed", |s| {
            find(s, "demo/web-readers").is_some_and(|p| p.action == Action::Deny)
        })
        .await;
    assert_eq!(
        find(&changed, "demo/web-readers").map(enforced),
        Some(expect(
            "demo/web-readers",
            &["web"],
            Action::Deny,
            vec![Rule {
                from: vec![],
                to: vec![Operation {
                    ports: vec![8080],
                    methods: vec![],
                    paths: vec![],
                }],
            }],
        ))
    );
    assert_eq!(
        find(&changed, "demo/newer-field").map(enforced),
        Some(newer_field)
    );

    // The malformed one fixed: enforced as written, and no longer counted.
    api.apply_json(policy(
        "demo",
        "newer-field",
        json!({"targetRefs": [{"kind": "Service", "name": "web"}], "action": "ALLOW",
               "rules": [{"from": [{"serviceAccounts": ["client"]}]}]}),
    ))
    .unwrap();
    running
        .until("the malformed policy fixed", |s| {
            find(s, "demo/newer-field").is_some_and(|p| p.rules.len() == 1)
        })
        .await;
    eventually("the gauge at 0", || {
        has_line(&running.metrics(), "trellis_controller_invalid_policies 0").then_some(())
    })
    .await;
    let status = running.handle.status();
    assert_eq!(status.kinds[&Kind::AuthorizationPolicy].errors, 0);
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
