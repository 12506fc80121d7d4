//! Tests of the AuthorizationPolicy review: table of decisions, agreement with the
//! control plane's checks, the exact refusal bytes, the cause cap, and the example and
//! invalid policy files of the repository.

use http::StatusCode;
use serde_json::json;

use super::*;
use crate::webhook::{Reviewed, review};

const UID: &str = "0df28fbd-5f5f-11e8-b7cc-42010a800002";

/// An AdmissionReview for a `kind` of `group/version` (resource `resource`), as the API
/// server sends it.
fn review_of(
    operation: &str,
    kind: (&str, &str, &str, &str),
    name: &str,
    namespace: &str,
    object: Value,
    old: Value,
) -> Vec<u8> {
    crate::webhook::review_json(UID, operation, kind, name, namespace, object, old)
}

const TRELLIS: (&str, &str, &str, &str) = (
    "policy.trellis.dev",
    "v1alpha1",
    "AuthorizationPolicy",
    "authorizationpolicies",
);

/// An AuthorizationPolicy `shop/orders` with `spec`.
fn policy(spec: Value) -> Value {
    json!({
        "apiVersion": "policy.trellis.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "orders", "namespace": "shop", "uid": "c0ffee", "generation": 1},
        "spec": spec,
    })
}

fn good_spec() -> Value {
    json!({
        "targetRefs": [{"kind": "Service", "name": "orders"}],
        "action": "ALLOW",
        "rules": [{
            "from": [{"serviceAccounts": ["frontend", "billing/reconciler"]}],
            "to": [{"ports": [8080], "methods": ["GET", "POST"], "paths": ["/orders", "/orders/*"]}],
        }],
    })
}

/// Within the CRD's schema (types, limits, pattern shapes), but wrong six ways.
fn bad_spec() -> Value {
    json!({
        "targetRefs": [{"kind": "Service", "name": "orders"}, {"kind": "Service", "name": "orders"}],
        "rules": [{
            "from": [{
                "principals": ["frontend"],
                "namespaces": ["Shop"],
                "serviceAccounts": ["web.v1"],
            }],
            "to": [{"methods": ["get"], "paths": ["/orders?id=1"]}],
        }],
    })
}

fn create(object: Value) -> Vec<u8> {
    review_of("CREATE", TRELLIS, "orders", "shop", object, Value::Null)
}

fn update(object: Value, old: Value) -> Vec<u8> {
    review_of("UPDATE", TRELLIS, "orders", "shop", object, old)
}

fn response(reviewed: &Reviewed) -> Value {
    let v: Value = serde_json::from_slice(&reviewed.body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    v["response"].clone()
}

/// `(field, message)` of every cause of a refusal.
fn causes(r: &Value) -> Vec<(String, String)> {
    r["status"]["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["reason"], "FieldValueInvalid", "{c}");
            (
                c["field"].as_str().unwrap().to_owned(),
                c["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn owned(causes: &[(&str, &str)]) -> Vec<(String, String)> {
    causes
        .iter()
        .map(|(f, m)| ((*f).to_owned(), (*m).to_owned()))
        .collect()
}

/// The six problems of [`bad_spec`], as `Policy::problems` words them.
const BAD_SPEC_CAUSES: [(&str, &str); 6] = [
    (
        "spec.targetRefs[1].name",
        "duplicate target Service \"orders\" (also spec.targetRefs[0])",
    ),
    (
        "spec.rules[0].from[0].principals[0]",
        "\"frontend\" is neither spiffe://<trust-domain>/<path> nor \
         <trust-domain>/ns/<namespace>/sa/<service-account> (patterns: exact, \"*\", \
         \"prefix*\" or \"*suffix\")",
    ),
    (
        "spec.rules[0].from[0].namespaces[0]",
        "\"Shop\" is not a namespace name (a DNS-1123 label) or a pattern of one (\"*\", \
         \"prefix*\" or \"*suffix\")",
    ),
    (
        "spec.rules[0].from[0].serviceAccounts[0]",
        "\"web.v1\": invalid name \"web.v1\": use lowercase letters, digits and '-', \
         starting and ending with a letter or digit (a DNS-1123 label)",
    ),
    (
        "spec.rules[0].to[0].methods[0]",
        "\"get\" is not an HTTP method: \"*\" or an upper-case name such as GET",
    ),
    (
        "spec.rules[0].to[0].paths[0]",
        "\"/orders?id=1\" holds a query or fragment: paths are matched without them",
    ),
];

#[test]
fn reviews() {
    struct Case {
        name: &'static str,
        body: Vec<u8>,
        verdict: Verdict,
        /// Every cause `(field, message)` of the refusal; empty when allowed.
        causes: Vec<(String, String)>,
    }
    let allowed = |name, body| Case {
        name,
        body,
        verdict: Verdict::Allowed,
        causes: Vec::new(),
    };
    let denied = |name, body, causes: &[(&str, &str)]| Case {
        name,
        body,
        verdict: Verdict::Denied,
        causes: owned(causes),
    };
    let with_rule = |rule: Value| policy(json!({"rules": [rule]}));
    let mut no_namespace = policy(good_spec());
    no_namespace["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    let mut bad_no_namespace = policy(json!({"rules": [{"from": [{"namespaces": ["Shop"]}]}]}));
    bad_no_namespace["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    let cases = [
        allowed("good policy", create(policy(good_spec()))),
        allowed("allow nothing: spec {}", create(policy(json!({})))),
        allowed(
            "good policy, UPDATE",
            update(policy(good_spec()), policy(json!({}))),
        ),
        allowed(
            "an invalid policy fixed by an UPDATE",
            update(policy(good_spec()), policy(bad_spec())),
        ),
        allowed(
            "namespace from the request",
            review_of(
                "CREATE",
                TRELLIS,
                "orders",
                "shop",
                no_namespace,
                Value::Null,
            ),
        ),
        denied(
            "within the schema, wrong six ways",
            create(policy(bad_spec())),
            &BAD_SPEC_CAUSES,
        ),
        denied(
            "an UPDATE that changes the spec of an invalid policy",
            update(
                policy(json!({"rules": [{"to": [{"paths": ["/orders?x"]}]}]})),
                policy(bad_spec()),
            ),
            &[(
                "spec.rules[0].to[0].paths[0]",
                "\"/orders?x\" holds a query or fragment: paths are matched without them",
            )],
        ),
        denied(
            "an UPDATE that breaks a good policy",
            update(policy(bad_spec()), policy(good_spec())),
            &BAD_SPEC_CAUSES,
        ),
        denied(
            "namespace from the request, still checked",
            review_of(
                "CREATE",
                TRELLIS,
                "orders",
                "shop",
                bad_no_namespace,
                Value::Null,
            ),
            &[(
                "spec.rules[0].from[0].namespaces[0]",
                "\"Shop\" is not a namespace name (a DNS-1123 label) or a pattern of one \
                 (\"*\", \"prefix*\" or \"*suffix\")",
            )],
        ),
        denied(
            "Istio's trust-domain form: a prefix must name a whole trust domain",
            create(with_rule(json!({"from": [{"principals": ["cluster*"]}]}))),
            &[(
                "spec.rules[0].from[0].principals[0]",
                "\"cluster*\" is neither spiffe://<trust-domain>/<path> nor \
                 <trust-domain>/ns/<namespace>/sa/<service-account> (patterns: exact, \"*\", \
                 \"prefix*\" or \"*suffix\")",
            )],
        ),
        // What the schema refuses first, if it is ever bypassed: never a 500, the field
        // named.
        denied(
            "port over 65535",
            create(with_rule(json!({"to": [{"ports": [8080, 70000]}]}))),
            &[(
                "spec.rules[0].to[0].ports[1]",
                "invalid value: integer `70000`, expected u16",
            )],
        ),
        denied(
            "port 0",
            create(with_rule(json!({"to": [{"ports": [0]}]}))),
            &[(
                "spec.rules[0].to[0].ports[0]",
                "must be between 1 and 65535, got 0",
            )],
        ),
        denied(
            "unknown field in a rule (Istio's `when`)",
            create(with_rule(json!({"when": [{"key": "request.headers[x]"}]}))),
            &[(
                "spec.rules[0].when",
                "unknown field `when`, expected `from` or `to`",
            )],
        ),
        denied(
            "unknown field in spec (Istio's `selector`)",
            create(policy(json!({"selector": {"matchLabels": {"app": "web"}}}))),
            &[(
                "spec.selector",
                "unknown field `selector`, expected one of `targetRefs`, `action`, `dryRun`, \
                 `rules`",
            )],
        ),
        denied(
            "dryRun as a string",
            create(policy(json!({"dryRun": "yes"}))),
            &[(
                "spec.dryRun",
                "invalid type: string \"yes\", expected a boolean",
            )],
        ),
        denied(
            "action in lower case",
            create(policy(json!({"action": "allow"}))),
            &[(
                "spec.action",
                "unknown variant `allow`, expected `ALLOW` or `DENY`",
            )],
        ),
        denied(
            "targetRef without a name",
            create(policy(json!({"targetRefs": [{"kind": "Service"}]}))),
            &[("spec.targetRefs[0].name", "missing field `name`")],
        ),
        denied(
            "no spec",
            create(json!({
                "apiVersion": "policy.trellis.dev/v1alpha1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "orders", "namespace": "shop"},
            })),
            &[("spec", "missing field `spec`")],
        ),
        allowed(
            "DELETE of an invalid policy",
            review_of(
                "DELETE",
                TRELLIS,
                "orders",
                "shop",
                Value::Null,
                policy(bad_spec()),
            ),
        ),
        allowed(
            "Istio's AuthorizationPolicy",
            review_of(
                "CREATE",
                (
                    "security.istio.io",
                    "v1",
                    "AuthorizationPolicy",
                    "authorizationpolicies",
                ),
                "orders",
                "shop",
                json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                       "metadata": {"name": "orders", "namespace": "shop"},
                       "spec": {"selector": {"matchLabels": {"app": "orders"}}}}),
                Value::Null,
            ),
        ),
        allowed(
            "another kind of the group",
            review_of(
                "CREATE",
                (
                    "policy.trellis.dev",
                    "v1alpha1",
                    "PeerAuthentication",
                    "peerauthentications",
                ),
                "orders",
                "shop",
                policy(bad_spec()),
                Value::Null,
            ),
        ),
        allowed(
            "another version of the kind",
            review_of(
                "CREATE",
                (
                    "policy.trellis.dev",
                    "v1beta1",
                    "AuthorizationPolicy",
                    "authorizationpolicies",
                ),
                "orders",
                "shop",
                policy(bad_spec()),
                Value::Null,
            ),
        ),
    ];
    for case in cases {
        let reviewed = review(&case.body);
        let name = case.name;
        assert_eq!(reviewed.verdict, case.verdict, "{name}: {reviewed:?}");
        assert_eq!(reviewed.http_status, StatusCode::OK, "{name}");
        assert_eq!(reviewed.uid, UID, "{name}");
        let r = response(&reviewed);
        assert_eq!(r["uid"], UID, "{name}");
        if case.causes.is_empty() {
            assert_eq!(r["allowed"], true, "{name}: {r}");
            assert_eq!(reviewed.message, "", "{name}");
            assert_eq!(r.get("warnings"), None, "{name}: {r}");
            continue;
        }
        assert_eq!(r["allowed"], false, "{name}: {r}");
        assert_eq!(r["status"]["status"], "Failure", "{name}: {r}");
        assert_eq!(r["status"]["code"], 422, "{name}: {r}");
        assert_eq!(r["status"]["reason"], "Invalid", "{name}: {r}");
        let details = &r["status"]["details"];
        assert_eq!(details["kind"], "AuthorizationPolicy", "{name}");
        assert_eq!(details["group"], "policy.trellis.dev", "{name}");
        assert_eq!(details["name"], "orders", "{name}");
        assert_eq!(causes(&r), case.causes, "{name}");
        // The message lists every cause, after the object's kind and key.
        let listed: Vec<String> = case
            .causes
            .iter()
            .map(|(f, m)| format!("{f}: {m}"))
            .collect();
        let expected = format!(
            "invalid AuthorizationPolicy shop/orders: {}",
            listed.join("; ")
        );
        assert_eq!(r["status"]["message"], expected.as_str(), "{name}");
        assert_eq!(reviewed.message, expected, "{name}");
        assert_eq!(
            reviewed.subject, "AuthorizationPolicy shop/orders",
            "{name}"
        );
    }
}

/// The webhook refuses exactly what the control plane finds wrong: its causes are the
/// `field: message` lines of `Policy::problems` on the same object, converted as the
/// Kubernetes source converts it.
#[test]
fn the_webhook_and_the_control_plane_agree() {
    for spec in [
        bad_spec(),
        good_spec(),
        json!({"targetRefs": [{"kind": "Svc", "name": "A"}]}),
    ] {
        let object = policy(spec.clone());
        // As the Kubernetes source reads it: the JSON form.
        let raw: trellis_kube::convert::RawPolicy = serde_json::from_value(object.clone()).unwrap();
        let control_plane = trellis_kube::convert::policy(&raw).unwrap().problems();
        let r = response(&review(&create(object)));
        let webhook: Vec<String> = if r["allowed"] == true {
            Vec::new()
        } else {
            causes(&r)
                .into_iter()
                .map(|(f, m)| format!("{f}: {m}"))
                .collect()
        };
        assert_eq!(webhook, control_plane, "{spec}");
    }
}

#[test]
fn an_update_leaving_an_invalid_spec_unchanged_is_allowed_with_a_warning() {
    let mut relabelled = policy(bad_spec());
    relabelled["metadata"]["labels"] = json!({"team": "shop"});
    relabelled["metadata"]["finalizers"] = json!([]);
    let reviewed = review(&update(relabelled, policy(bad_spec())));
    assert_eq!(reviewed.verdict, Verdict::Allowed, "{reviewed:?}");
    let r = response(&reviewed);
    assert_eq!(r["allowed"], true, "{r}");
    let listed: Vec<String> = BAD_SPEC_CAUSES
        .iter()
        .map(|(f, m)| format!("{f}: {m}"))
        .collect();
    assert_eq!(
        r["warnings"],
        json!([format!(
            "AuthorizationPolicy shop/orders is invalid and stays enforced fail-closed (this \
             update leaves its spec unchanged, so it is allowed): {}",
            listed.join("; ")
        )])
    );
    // The same spec written differently (defaults spelled out) is the same spec.
    let mut spelled_out = bad_spec();
    spelled_out["action"] = json!("ALLOW");
    spelled_out["dryRun"] = json!(false);
    let r = response(&review(&update(policy(spelled_out), policy(bad_spec()))));
    assert_eq!(r["allowed"], true, "{r}");
    // An old object that does not parse gives no such pass.
    let r = response(&review(&update(
        policy(bad_spec()),
        policy(json!({"dryRun": "yes"})),
    )));
    assert_eq!(r["allowed"], false, "{r}");
    // A CREATE has no old object to compare with, even if one is sent.
    let body = review_of(
        "CREATE",
        TRELLIS,
        "orders",
        "shop",
        policy(bad_spec()),
        policy(bad_spec()),
    );
    assert_eq!(review(&body).verdict, Verdict::Denied);
}

#[test]
fn a_denial_is_exactly_this_json() {
    let reviewed = review(&create(policy(
        json!({"rules": [{"to": [{"methods": ["get"]}]}]}),
    )));
    let expected = concat!(
        r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"#,
        r#""uid":"0df28fbd-5f5f-11e8-b7cc-42010a800002","allowed":false,"status":{"#,
        r#""status":"Failure","code":422,"message":"invalid AuthorizationPolicy shop/orders: "#,
        r#"spec.rules[0].to[0].methods[0]: \"get\" is not an HTTP method: \"*\" or an "#,
        r#"upper-case name such as GET","reason":"Invalid","details":{"name":"orders","#,
        r#""group":"policy.trellis.dev","kind":"AuthorizationPolicy","causes":[{"#,
        r#""reason":"FieldValueInvalid","message":"\"get\" is not an HTTP method: \"*\" or "#,
        r#"an upper-case name such as GET","field":"spec.rules[0].to[0].methods[0]"}]}}}}"#,
    );
    assert_eq!(String::from_utf8(reviewed.body).unwrap(), expected);
}

#[test]
fn a_policy_with_very_many_problems_lists_the_first_ones() {
    // Within the schema's limits: 64 sources of 64 bad principals, 4096 problems.
    let sources: Vec<Value> = (0..64)
        .map(|i| {
            let principals: Vec<String> = (0..64).map(|j| format!("p{i}-{j}")).collect();
            json!({"principals": principals})
        })
        .collect();
    let reviewed = review(&create(policy(json!({"rules": [{"from": sources}]}))));
    assert_eq!(reviewed.verdict, Verdict::Denied);
    let r = response(&reviewed);
    let causes = causes(&r);
    assert_eq!(causes.len(), MAX_CAUSES);
    assert_eq!(causes[0].0, "spec.rules[0].from[0].principals[0]");
    assert_eq!(causes[49].0, "spec.rules[0].from[0].principals[49]");
    let message = r["status"]["message"].as_str().unwrap();
    assert!(
        message.ends_with(&format!("; and {} more", 64 * 64 - MAX_CAUSES)),
        "{}",
        &message[message.len() - 80..]
    );
    assert!(
        message.contains("spec.rules[0].from[0].principals[49]: \"p0-49\" is neither"),
        "{message}"
    );
    assert!(!message.contains("principals[50]"), "{message}");
    assert!(reviewed.body.len() < 64 * 1024, "{}", reviewed.body.len());
}

#[test]
fn a_review_without_an_object_is_malformed() {
    let reviewed = review(&create(Value::Null));
    assert_eq!(reviewed.verdict, Verdict::Invalid);
    assert_eq!(reviewed.http_status, StatusCode::OK);
    assert_eq!(reviewed.subject, "AuthorizationPolicy shop/orders");
    let r = response(&reviewed);
    assert_eq!(r["uid"], UID);
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 400);
    assert_eq!(
        r["status"]["message"],
        "invalid AdmissionReview: request.object: missing for CREATE/UPDATE"
    );
}

/// The YAML files of `dir` (from the repository root), sorted by name: (file name, the
/// `# path: ` header line's value or "", the document).
fn yaml_files(dir: &str) -> Vec<(String, String, Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(dir);
    let mut files: Vec<(String, String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let path: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("# path: "))
                .collect();
            (name, path, serde_yaml::from_str(&text).unwrap())
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!files.is_empty(), "no YAML in {}", dir.display());
    files
}

/// Every documented example policy (docs/examples/policy) is admitted.
#[test]
fn the_example_policies_are_allowed() {
    for (file, _, object) in yaml_files("docs/examples/policy") {
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        let namespace = object["metadata"]["namespace"].as_str().unwrap().to_owned();
        let reviewed = review(&review_of(
            "CREATE",
            TRELLIS,
            &name,
            &namespace,
            object,
            Value::Null,
        ));
        assert_eq!(reviewed.verdict, Verdict::Allowed, "{file}: {reviewed:?}");
        assert_eq!(
            reviewed.subject,
            format!("AuthorizationPolicy {namespace}/{name}")
        );
    }
}

/// What the CRD's schema refuses (tests/chart/invalid-policies), the webhook refuses too
/// when it gets the chance, at the field the schema names or below it: a policy that got
/// past the schema is still stopped at `kubectl apply`. A file of another API group is
/// not the webhook's (the API server refuses it: no CRD serves it).
#[test]
fn the_schemas_refusals_are_refused_too() {
    let mut reviewed_files = 0;
    for (file, path, object) in yaml_files("tests/chart/invalid-policies") {
        assert!(!path.is_empty(), "{file}: no `# path: ` header");
        let group = object["apiVersion"].as_str().unwrap().split('/').next();
        let kind = if group == Some("policy.trellis.dev") {
            TRELLIS
        } else {
            (
                "security.istio.io",
                "v1",
                "AuthorizationPolicy",
                "authorizationpolicies",
            )
        };
        let reviewed = review(&review_of(
            "CREATE",
            kind,
            "orders",
            "shop",
            object,
            Value::Null,
        ));
        if kind != TRELLIS {
            assert_eq!(reviewed.verdict, Verdict::Allowed, "{file}");
            continue;
        }
        reviewed_files += 1;
        assert_eq!(reviewed.verdict, Verdict::Denied, "{file}: {reviewed:?}");
        let r = response(&reviewed);
        let (field, _) = &causes(&r)[0];
        assert!(
            field == &path || field.starts_with(&format!("{path}.")),
            "{file}: {field} is not at {path}"
        );
    }
    assert!(reviewed_files >= 15, "{reviewed_files}");
}
