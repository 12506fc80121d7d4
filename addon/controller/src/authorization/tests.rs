//! Tables: what the checks report, what valid policies become, and what invalid ones are
//! enforced as.

use std::collections::BTreeMap;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use serde_json::json;
use trellis_api::authz::{AuthorizationPolicy, Operation};

use super::*;
use crate::objects::{ObjectKey, ObjectMeta};
use crate::policy::AuthorizationPolicySpec;

const TD: &str = "mesh.example";

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: namespace.into(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    }
}

fn policy(namespace: &str, name: &str, spec: &str) -> Policy {
    Policy::new(
        meta(namespace, name),
        serde_yaml::from_str::<AuthorizationPolicySpec>(spec)
            .unwrap_or_else(|e| panic!("test spec {spec:?}: {e}")),
    )
}

fn lines(p: &Policy) -> Vec<String> {
    p.problems()
}

fn exact(s: &str) -> Pattern {
    Pattern::Exact(s.into())
}

#[test]
fn valid_policies_have_no_problems() {
    for spec in [
        "{}",
        "{action: DENY, dryRun: true}",
        "targetRefs: [{kind: Service, name: web}, {group: '', kind: Service, name: api}]",
        "rules: [{}]",
        "rules: [{from: [{principals: ['*', 'spiffe://td/ns/a/sa/b', 'spiffe://td/x', \
         'spiffe://*', 'spiffe://td/ns/a/*', 'td/ns/a/sa/b', 'td/ns/a/*', 'td/*', \
         '*/sa/web']}]}]",
        "rules: [{from: [{namespaces: ['*', demo, 'prod-*', '*-prod']}]}]",
        "rules: [{from: [{serviceAccounts: [web, other/web]}]}]",
        "rules: [{to: [{ports: [1, 65535], methods: ['*', GET, M-SEARCH], \
         paths: ['*', '/a', '/a/*', '*.js', '/']}]}]",
    ] {
        let p = policy("demo", "ok", spec);
        assert_eq!(lines(&p), Vec::<String>::new(), "{spec}");
    }
    // A custom resource name may hold dots.
    assert_eq!(
        lines(&policy("demo", "allow.web", "{}")),
        Vec::<String>::new()
    );
}

#[test]
fn every_problem_is_reported_with_its_field() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "service account with too many parts",
            "rules: [{from: [{}, {serviceAccounts: [a/b/c]}]}]",
            &[
                r#"spec.rules[0].from[1].serviceAccounts[0]: "a/b/c" is not <name> or <namespace>/<name>"#,
            ],
        ),
        (
            "service account patterns and bad names",
            "rules: [{from: [{serviceAccounts: ['web*', Web, 'x/', '/x', Demo/web]}]}]",
            &[
                r#"spec.rules[0].from[0].serviceAccounts[0]: "web*": serviceAccounts are exact names; use principals for patterns"#,
                "spec.rules[0].from[0].serviceAccounts[1]: \"Web\": invalid name \"Web\": use \
                 lowercase letters, digits and '-', starting and ending with a letter or digit \
                 (a DNS-1123 label)",
                r#"spec.rules[0].from[0].serviceAccounts[2]: "x/" is not <name> or <namespace>/<name>"#,
                r#"spec.rules[0].from[0].serviceAccounts[3]: "/x" is not <name> or <namespace>/<name>"#,
                "spec.rules[0].from[0].serviceAccounts[4]: \"Demo/web\": invalid namespace \
                 \"Demo\": use lowercase letters, digits and '-', starting and ending with a \
                 letter or digit (a DNS-1123 label)",
            ],
        ),
        (
            "target refs",
            "targetRefs: [{kind: Service, name: web}, {group: apps, kind: Deployment, name: \
             web}, {kind: Service, name: Web_1}, {kind: Service, name: web}]",
            &[
                r#"spec.targetRefs[1].group: "apps" is not the core group: a Service's group is "" (or leave it out)"#,
                r#"spec.targetRefs[1].kind: "Deployment" is not supported: only Service"#,
                r#"spec.targetRefs[1].name: duplicate target Service "web" (also spec.targetRefs[0])"#,
                "spec.targetRefs[2].name: invalid Service name \"Web_1\": use lowercase \
                 letters, digits and '-', starting and ending with a letter or digit (a \
                 DNS-1123 label)",
                r#"spec.targetRefs[3].name: duplicate target Service "web" (also spec.targetRefs[0])"#,
            ],
        ),
        (
            "principals",
            "rules: [{from: [{principals: ['a*b', 'spiffe://', 'spiffe://td', \
             'spiffe://Bad/ns/a/sa/b', 'td/ns/a', 'spif*', 'cluster*', '']}]}]",
            &[
                r#"spec.rules[0].from[0].principals[0]: "a*b" is not a pattern: exact, "*", "prefix*" or "*suffix""#,
                r#"spec.rules[0].from[0].principals[1]: "spiffe://" is neither spiffe://<trust-domain>/<path> nor <trust-domain>/ns/<namespace>/sa/<service-account> (patterns: exact, "*", "prefix*" or "*suffix")"#,
                r#"spec.rules[0].from[0].principals[2]: "spiffe://td" is neither spiffe://<trust-domain>/<path> nor <trust-domain>/ns/<namespace>/sa/<service-account> (patterns: exact, "*", "prefix*" or "*suffix")"#,
                r#"spec.rules[0].from[0].principals[3]: "spiffe://Bad/ns/a/sa/b" is neither spiffe://<trust-domain>/<path> nor <trust-domain>/ns/<namespace>/sa/<service-account> (patterns: exact, "*", "prefix*" or "*suffix")"#,
                r#"spec.rules[0].from[0].principals[4]: "td/ns/a" is neither spiffe://<trust-domain>/<path> nor <trust-domain>/ns/<namespace>/sa/<service-account> (patterns: exact, "*", "prefix*" or "*suffix")"#,
                r#"spec.rules[0].from[0].principals[5]: "spif*" is neither spiffe://<trust-domain>/<path> nor <trust-domain>/ns/<namespace>/sa/<service-account> (patterns: exact, "*", "prefix*" or "*suffix")"#,
                r#"spec.rules[0].from[0].principals[6]: "cluster*" is neither spiffe://<trust-domain>/<path> nor <trust-domain>/ns/<namespace>/sa/<service-account> (patterns: exact, "*", "prefix*" or "*suffix")"#,
                r#"spec.rules[0].from[0].principals[7]: "" is not a pattern: exact, "*", "prefix*" or "*suffix""#,
            ],
        ),
        (
            "namespaces",
            "rules: [{from: [{namespaces: [Demo, 'a_*', '**']}]}]",
            &[
                r#"spec.rules[0].from[0].namespaces[0]: "Demo" is not a namespace name (a DNS-1123 label) or a pattern of one ("*", "prefix*" or "*suffix")"#,
                r#"spec.rules[0].from[0].namespaces[1]: "a_*" is not a namespace name (a DNS-1123 label) or a pattern of one ("*", "prefix*" or "*suffix")"#,
                r#"spec.rules[0].from[0].namespaces[2]: "**" is not a pattern: exact, "*", "prefix*" or "*suffix""#,
            ],
        ),
        (
            "methods, paths and ports",
            "rules: [{}, {to: [{ports: [80, 0], methods: [get, 'G*', 'GET POST'], \
             paths: [api, 'api/*', '/a?x=1', '/a*b']}]}]",
            &[
                "spec.rules[1].to[0].ports[1]: must be between 1 and 65535, got 0",
                r#"spec.rules[1].to[0].methods[0]: "get" is not an HTTP method: "*" or an upper-case name such as GET"#,
                r#"spec.rules[1].to[0].methods[1]: "G*" is not an HTTP method: "*" or an upper-case name such as GET"#,
                r#"spec.rules[1].to[0].methods[2]: "GET POST" is not an HTTP method: "*" or an upper-case name such as GET"#,
                r#"spec.rules[1].to[0].paths[0]: "api" is not a path pattern: "*", "*suffix", or starting with "/""#,
                r#"spec.rules[1].to[0].paths[1]: "api/*" is not a path pattern: "*", "*suffix", or starting with "/""#,
                r#"spec.rules[1].to[0].paths[2]: "/a?x=1" holds a query or fragment: paths are matched without them"#,
                r#"spec.rules[1].to[0].paths[3]: "/a*b" is not a pattern: exact, "*", "prefix*" or "*suffix""#,
            ],
        ),
    ];
    for (case, spec, want) in cases {
        let got = lines(&policy("demo", "p", spec));
        let want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(got, want, "{case}");
    }
    // Metadata too.
    let mut p = policy("demo", "p", "{}");
    p.metadata.name = "Bad_Name".into();
    p.metadata.namespace = "demo.x".into();
    let got = lines(&p);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].starts_with("metadata.name: invalid name \"Bad_Name\": "));
    assert!(got[1].starts_with("metadata.namespace: invalid namespace \"demo.x\": "));
}

#[test]
fn counts_and_lengths_are_limited() {
    let many = |n: usize, f: &dyn Fn(usize) -> String| -> String {
        (0..n).map(f).collect::<Vec<_>>().join(", ")
    };
    let long = |n: usize| "a".repeat(n);
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "65 rules",
            format!("rules: [{}]", many(65, &|_| "{}".into())),
            vec!["spec.rules: has 65 entries; at most 64 are accepted".into()],
        ),
        (
            "65 targetRefs, each checked only up to 64",
            format!(
                "targetRefs: [{}]",
                many(65, &|i| format!("{{kind: Service, name: s{}}}", i % 64))
            ),
            vec!["spec.targetRefs: has 65 entries; at most 64 are accepted".into()],
        ),
        (
            "65 from and 65 to entries",
            format!(
                "rules: [{{from: [{}], to: [{}]}}]",
                many(65, &|_| "{}".into()),
                many(65, &|_| "{}".into())
            ),
            vec![
                "spec.rules[0].from: has 65 entries; at most 64 are accepted".into(),
                "spec.rules[0].to: has 65 entries; at most 64 are accepted".into(),
            ],
        ),
        (
            "65 values in each list",
            format!(
                "rules: [{{from: [{{principals: [{}], namespaces: [{}], serviceAccounts: [{}]}}], \
                 to: [{{ports: [{}], methods: [{}], paths: [{}]}}]}}]",
                many(65, &|_| "'*'".into()),
                many(65, &|_| "demo".into()),
                many(65, &|_| "web".into()),
                many(65, &|_| "80".into()),
                many(65, &|_| "GET".into()),
                many(65, &|_| "/".into()),
            ),
            [
                "from[0].principals",
                "from[0].namespaces",
                "from[0].serviceAccounts",
                "to[0].ports",
                "to[0].methods",
                "to[0].paths",
            ]
            .iter()
            .map(|f| format!("spec.rules[0].{f}: has 65 entries; at most 64 are accepted"))
            .collect(),
        ),
        (
            "string lengths: 253, and 1024 for principals and paths",
            format!(
                "rules: [{{from: [{{principals: ['spiffe://td/{}', 'spiffe://td/{}'], \
                 namespaces: ['{}*', '{}*']}}], to: [{{methods: [{}], paths: ['/{}', '/{}']}}]}}]",
                long(1024 - 12),
                long(1024 - 11),
                long(252),
                long(253),
                "A".repeat(254),
                long(1023),
                long(1024),
            ),
            vec![
                format!(
                    "spec.rules[0].from[0].principals[1]: \"spiffe://td/{}\"... is 1025 \
                     characters long; at most 1024 are accepted",
                    long(80 - 12)
                ),
                format!(
                    "spec.rules[0].from[0].namespaces[1]: \"{}\"... is 254 characters long; \
                     at most 253 are accepted",
                    long(80)
                ),
                format!(
                    "spec.rules[0].to[0].methods[0]: \"{}\"... is 254 characters long; at \
                     most 253 are accepted",
                    "A".repeat(80)
                ),
                format!(
                    "spec.rules[0].to[0].paths[1]: \"/{}\"... is 1025 characters long; at \
                     most 1024 are accepted",
                    long(79)
                ),
            ],
        ),
    ];
    for (case, spec, want) in cases {
        assert_eq!(lines(&policy("demo", "p", &spec)), want, "{case}");
    }
}

fn translated(namespace: &str, spec: &str) -> AuthorizationPolicy {
    let p = policy(namespace, "p", spec);
    let mut objects = Objects::default();
    objects.policies.insert(p.metadata.key(), p);
    let mut all = translate_policies(&objects, TD);
    assert_eq!(all.len(), 1);
    all.remove(0)
}

fn want(
    namespace: &str,
    targets: &[&str],
    action: Action,
    dry_run: bool,
    rules: Vec<Rule>,
) -> AuthorizationPolicy {
    AuthorizationPolicy {
        namespace: namespace.into(),
        name: "p".into(),
        target_services: targets.iter().map(|t| (*t).to_owned()).collect(),
        action,
        dry_run,
        rules,
    }
}

#[test]
fn valid_policies_translate_one_to_one() {
    let cases: Vec<(&str, &str, AuthorizationPolicy)> = vec![
        (
            "empty spec: ALLOW, whole namespace, no rules",
            "{}",
            want("demo", &[], Action::Allow, false, vec![]),
        ),
        (
            "targets sorted and deduplicated; action and dry run",
            "{targetRefs: [{kind: Service, name: web}, {kind: Service, name: api}], \
             action: DENY, dryRun: true, rules: [{}]}",
            want(
                "demo",
                &["api", "web"],
                Action::Deny,
                true,
                vec![Rule::default()],
            ),
        ),
        (
            "service accounts resolved in the policy's namespace or their own",
            "rules: [{from: [{serviceAccounts: [client, other/batch], namespaces: ['prod-*']}]}]",
            want(
                "demo",
                &[],
                Action::Allow,
                false,
                vec![Rule {
                    from: vec![Source {
                        principals: vec![
                            exact("spiffe://mesh.example/ns/demo/sa/client"),
                            exact("spiffe://mesh.example/ns/other/sa/batch"),
                        ],
                        namespaces: vec![Pattern::Prefix("prod-".into())],
                    }],
                    to: vec![],
                }],
            ),
        ),
        (
            "principals: Istio's form gets the scheme, SPIFFE IDs and suffixes stay",
            "rules: [{from: [{principals: ['td/ns/a/sa/b', 'td/ns/a/*', \
             'spiffe://td/ns/c/sa/d', 'spiffe://td/*', '*/sa/web', '*']}, \
             {serviceAccounts: [web]}]}]",
            want(
                "demo",
                &[],
                Action::Allow,
                false,
                vec![Rule {
                    from: vec![
                        Source {
                            principals: vec![
                                exact("spiffe://td/ns/a/sa/b"),
                                Pattern::Prefix("spiffe://td/ns/a/".into()),
                                exact("spiffe://td/ns/c/sa/d"),
                                Pattern::Prefix("spiffe://td/".into()),
                                Pattern::Suffix("/sa/web".into()),
                                Pattern::Any,
                            ],
                            namespaces: vec![],
                        },
                        Source {
                            principals: vec![exact("spiffe://mesh.example/ns/demo/sa/web")],
                            namespaces: vec![],
                        },
                    ],
                    to: vec![],
                }],
            ),
        ),
        (
            "operations",
            "rules: [{to: [{ports: [8080], methods: [GET, '*'], paths: ['/api/*', '*.js', \
             /exact]}, {ports: [9090]}]}, {}]",
            want(
                "demo",
                &[],
                Action::Allow,
                false,
                vec![
                    Rule {
                        from: vec![],
                        to: vec![
                            Operation {
                                ports: vec![8080],
                                methods: vec![exact("GET"), Pattern::Any],
                                paths: vec![
                                    Pattern::Prefix("/api/".into()),
                                    Pattern::Suffix(".js".into()),
                                    exact("/exact"),
                                ],
                            },
                            Operation {
                                ports: vec![9090],
                                ..Operation::default()
                            },
                        ],
                    },
                    Rule::default(),
                ],
            ),
        ),
    ];
    for (case, spec, expected) in cases {
        assert_eq!(translated("demo", spec), expected, "{case}");
    }
}

#[test]
fn invalid_policies_translate_fail_closed() {
    let bad_rule = "rules: [{from: [{serviceAccounts: [a/b/c]}]}, {}]";
    let cases: Vec<(&str, String, AuthorizationPolicy)> = vec![
        (
            "invalid ALLOW keeps its targets and allows nothing",
            format!("{{targetRefs: [{{kind: Service, name: web}}], {bad_rule}}}"),
            want("demo", &["web"], Action::Allow, false, vec![]),
        ),
        (
            "invalid DENY keeps its targets and refuses everything",
            format!("{{targetRefs: [{{kind: Service, name: web}}], action: DENY, {bad_rule}}}"),
            want("demo", &["web"], Action::Deny, false, vec![Rule::default()]),
        ),
        (
            "invalid targetRefs: the whole namespace (ALLOW)",
            "{targetRefs: [{kind: Deployment, name: web}], rules: [{}]}".into(),
            want("demo", &[], Action::Allow, false, vec![]),
        ),
        (
            "invalid targetRefs: the whole namespace (DENY), even with valid rules",
            "{targetRefs: [{kind: Service, name: web}, {kind: Service, name: web}], \
             action: DENY, rules: [{to: [{methods: [POST]}]}]}"
                .into(),
            want("demo", &[], Action::Deny, false, vec![Rule::default()]),
        ),
        (
            "too many targetRefs: the whole namespace",
            format!(
                "{{targetRefs: [{}]}}",
                (0..65)
                    .map(|i| format!("{{kind: Service, name: s{i}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            want("demo", &[], Action::Allow, false, vec![]),
        ),
        (
            "dry run is kept: never enforced either way",
            format!("{{action: DENY, dryRun: true, {bad_rule}}}"),
            want("demo", &[], Action::Deny, true, vec![Rule::default()]),
        ),
        (
            "a bad port",
            "{targetRefs: [{kind: Service, name: api}], rules: [{to: [{ports: [0]}]}]}".into(),
            want("demo", &["api"], Action::Allow, false, vec![]),
        ),
    ];
    for (case, spec, expected) in cases {
        assert_eq!(translated("demo", &spec), expected, "{case}");
    }
    // Invalid metadata fails closed too (only Kubernetes could send it, and it does not).
    let mut p = policy(
        "demo",
        "p",
        "{action: DENY, rules: [{to: [{methods: [GET]}]}]}",
    );
    p.metadata.name = "Bad_Name".into();
    let translated = translate_policy(&p, &problems(&p), TD);
    assert_eq!(translated.rules, [Rule::default()]);
}

#[test]
fn policies_come_out_sorted_by_namespace_and_name() {
    let mut objects = Objects::default();
    for (ns, name) in [("b", "x"), ("a", "z"), ("trellis-system", "a"), ("a", "y")] {
        let p = policy(ns, name, "{}");
        objects.policies.insert(p.metadata.key(), p);
    }
    let keys: Vec<String> = translate_policies(&objects, TD)
        .iter()
        .map(AuthorizationPolicy::key)
        .collect();
    assert_eq!(keys, ["a/y", "a/z", "b/x", "trellis-system/a"]);
}

#[test]
fn invalid_policies_are_counted_in_the_gauge() {
    let mut registry = Registry::default();
    let mut report = InvalidPolicies::new().with_metrics(InvalidCount::policies(&mut registry));
    let gauge = |registry: &Registry| {
        let mut text = String::new();
        encode(&mut text, registry).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("trellis_controller_invalid_policies "))
            .map(str::to_owned)
    };
    assert_eq!(gauge(&registry).as_deref(), Some("0"));
    let mut objects = Objects::default();
    for (name, spec) in [
        ("ok", "{}"),
        ("bad-allow", "rules: [{to: [{ports: [0]}]}]"),
        (
            "bad-deny",
            "{action: DENY, targetRefs: [{kind: Pod, name: x}]}",
        ),
    ] {
        let p = policy("demo", name, spec);
        objects.policies.insert(p.metadata.key(), p);
    }
    assert_eq!(report.report(&objects), 2);
    assert_eq!(gauge(&registry).as_deref(), Some("2"));
    // Reported again unchanged: still two (logged once, not asserted here).
    assert_eq!(report.report(&objects), 2);
    objects
        .policies
        .remove(&ObjectKey::new("demo", "bad-allow"));
    assert_eq!(report.report(&objects), 1);
    assert_eq!(gauge(&registry).as_deref(), Some("1"));
}

#[test]
fn the_fail_closed_effect_is_named() {
    let effect = |ns: &str, spec: &str| {
        let p = policy(ns, "p", spec);
        fail_closed_effect(&p, &problems(&p))
    };
    assert_eq!(
        effect(
            "demo",
            "{targetRefs: [{kind: Service, name: web}], rules: [{to: [{ports: [0]}]}]}"
        ),
        "allows nothing on Services web"
    );
    assert_eq!(
        effect("demo", "{action: DENY, targetRefs: [{kind: Pod, name: x}]}"),
        "refuses every request to every workload of namespace demo"
    );
    assert_eq!(
        effect(
            ROOT_NAMESPACE,
            "{dryRun: true, targetRefs: [{kind: Pod, name: x}]}"
        ),
        "allows nothing on every workload of the mesh (dry run: reported, not enforced)"
    );
}

#[test]
fn a_spec_that_parses_from_json_is_kept_as_is() {
    let spec = json!({
        "targetRefs": [{"kind": "Service", "name": "web"}],
        "action": "DENY",
        "rules": [{"to": [{"ports": [8080], "methods": ["POST"]}]}],
    });
    let p = Policy::from_json_spec(meta("demo", "p"), &spec);
    assert_eq!(p, policy("demo", "p", &spec.to_string()));
    assert_eq!(p.parse_errors, []);
    assert_eq!(lines(&p), Vec::<String>::new());
}

#[test]
fn a_spec_that_does_not_parse_becomes_a_fail_closed_stand_in() {
    let web = json!([{"kind": "Service", "name": "web"}]);
    let rules = json!([{"to": [{"ports": [70000]}]}]);
    let port = "spec.rules[0].to[0].ports[0]: invalid value: integer `70000`, expected u16";
    // Case, spec, problems, enforced (targets, action, dry run, rules).
    let cases: Vec<(&str, serde_json::Value, Vec<String>, AuthorizationPolicy)> = vec![
        (
            "ALLOW read: its targets, allows nothing",
            json!({"targetRefs": web, "action": "ALLOW", "rules": rules}),
            vec![port.to_owned()],
            want("demo", &["web"], Action::Allow, false, vec![]),
        ),
        (
            "DENY: its targets, refuses everything",
            json!({"targetRefs": web, "action": "DENY", "rules": rules}),
            vec![port.to_owned()],
            want("demo", &["web"], Action::Deny, false, vec![Rule::default()]),
        ),
        (
            "no action (ALLOW were it valid): unreadable, so DENY",
            json!({"targetRefs": web, "rules": rules}),
            vec![port.to_owned()],
            want("demo", &["web"], Action::Deny, false, vec![Rule::default()]),
        ),
        (
            "an action that is not a string: DENY",
            json!({"targetRefs": web, "action": 1}),
            vec!["spec.action: invalid type: integer `1`, expected string or map".to_owned()],
            want("demo", &["web"], Action::Deny, false, vec![Rule::default()]),
        ),
        (
            "lower-case allow is not ALLOW: DENY",
            json!({"action": "allow"}),
            vec!["spec.action: unknown variant `allow`, expected `ALLOW` or `DENY`".to_owned()],
            want("demo", &[], Action::Deny, false, vec![Rule::default()]),
        ),
        (
            "dry run read as true: kept, never enforced",
            json!({"action": "DENY", "dryRun": true, "rules": rules}),
            vec![port.to_owned()],
            want("demo", &[], Action::Deny, true, vec![Rule::default()]),
        ),
        (
            "dry run not a boolean: enforced",
            json!({"action": "ALLOW", "dryRun": "yes"}),
            vec!["spec.dryRun: invalid type: string \"yes\", expected a boolean".to_owned()],
            want("demo", &[], Action::Allow, false, vec![]),
        ),
        (
            "a target with a field this version does not know: the whole namespace",
            json!({"targetRefs": [{"kind": "Service", "name": "web"},
                                  {"kind": "Service", "name": "api", "namespace": "other"}],
                   "action": "DENY"}),
            vec![
                "spec.targetRefs[1].namespace: unknown field `namespace`, expected one of \
                 `group`, `kind`, `name`"
                    .to_owned(),
            ],
            want("demo", &[], Action::Deny, false, vec![Rule::default()]),
        ),
        (
            "targetRefs unreadable besides another error: both named, the whole namespace",
            json!({"targetRefs": [{"kind": "Service"}], "action": "ALLOW", "rules": rules}),
            vec![
                port.to_owned(),
                "spec.targetRefs[0]: missing field `name`".to_owned(),
            ],
            want("demo", &[], Action::Allow, false, vec![]),
        ),
        (
            "targetRefs null: the whole namespace",
            json!({"targetRefs": null, "action": "ALLOW"}),
            vec!["spec.targetRefs: invalid type: null, expected a sequence".to_owned()],
            want("demo", &[], Action::Allow, false, vec![]),
        ),
        (
            "a readable target that the checks refuse: the whole namespace",
            json!({"targetRefs": [{"kind": "Deployment", "name": "web"}], "action": "ALLOW",
                   "extra": 1}),
            vec![
                "spec.extra: unknown field `extra`, expected one of `targetRefs`, `action`, \
                 `dryRun`, `rules`"
                    .to_owned(),
                "spec.targetRefs[0].kind: \"Deployment\" is not supported: only Service".to_owned(),
            ],
            want("demo", &[], Action::Allow, false, vec![]),
        ),
        (
            "not an object: DENY on the whole namespace",
            json!("ALLOW"),
            vec![
                "spec: invalid type: string \"ALLOW\", expected struct AuthorizationPolicySpec"
                    .to_owned(),
            ],
            want("demo", &[], Action::Deny, false, vec![Rule::default()]),
        ),
    ];
    for (case, spec, problems, expected) in cases {
        let p = Policy::from_json_spec(meta("demo", "p"), &spec);
        assert_eq!(lines(&p), problems, "{case}");
        let mut objects = Objects::default();
        objects.policies.insert(p.metadata.key(), p);
        assert_eq!(translate_policies(&objects, TD), [expected], "{case}");
    }
}

#[test]
fn parse_errors_are_cut_to_a_loggable_length() {
    let key = "k".repeat(5000);
    let p = Policy::from_json_spec(meta("demo", "p"), &json!({ key: 1 }));
    let [e] = p.parse_errors.as_slice() else {
        panic!("{:?}", p.parse_errors)
    };
    let cut = format!("spec.{}...", "k".repeat(PARSE_ERROR_CHARS - "spec.".len()));
    assert_eq!(e.field, cut);
    assert_eq!(e.message.chars().count(), PARSE_ERROR_CHARS + 3);
    assert!(e.message.starts_with("unknown field `kkk"), "{}", e.message);
    assert!(e.message.ends_with("..."), "{}", e.message);
}

#[test]
fn a_spec_that_does_not_parse_is_counted_and_its_effect_named() {
    let mut registry = Registry::default();
    let mut report = InvalidPolicies::new().with_metrics(InvalidCount::policies(&mut registry));
    let mut objects = Objects::default();
    let bad = Policy::from_json_spec(
        meta("demo", "newer"),
        &json!({"targetRefs": [{"kind": "Service", "name": "web"}], "action": "AUDIT"}),
    );
    assert_eq!(
        fail_closed_effect(&bad, &problems(&bad)),
        "refuses every request to Services web"
    );
    objects.policies.insert(bad.metadata.key(), bad);
    let good = policy("demo", "ok", "{}");
    objects.policies.insert(good.metadata.key(), good);
    assert_eq!(report.report(&objects), 1);
    let mut text = String::new();
    encode(&mut text, &registry).unwrap();
    assert!(
        text.lines()
            .any(|l| l == "trellis_controller_invalid_policies 1"),
        "{text}"
    );
}
