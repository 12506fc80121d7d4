//! Table tests for the conversion rules. Objects are written as the API server would send
//! them (JSON), so the tests also pin the field names the conversion reads.

use serde_json::{Value, json};
use trellis_api::ServiceKey;
use trellis_controller::objects::HOSTNAMES_ANNOTATION;

use super::*;

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn pod_json(spec: Value, status: Value) -> core::Pod {
    from(json!({
        "metadata": {"name": "api-1", "namespace": "demo", "labels": {"app": "api"}},
        "spec": spec,
        "status": status,
    }))
}

fn running() -> Value {
    json!({"phase": "Running", "podIP": "10.0.0.1"})
}

fn scheduled() -> Value {
    json!({"nodeName": "node-1", "serviceAccountName": "api", "containers": []})
}

/// Case, spec, status, expected (address, service account) or skip.
type PodCase = (
    &'static str,
    Value,
    Value,
    Result<(&'static str, &'static str), Skip>,
);

#[test]
fn pods_with_an_ip_become_workloads_others_are_skipped() {
    let ignored = |r: &str| Err(Skip::Ignored(r.to_owned()));
    let cases: Vec<PodCase> = vec![
        ("running", scheduled(), running(), Ok(("10.0.0.1", "api"))),
        (
            "pending but with an IP",
            scheduled(),
            json!({"phase": "Pending", "podIP": "10.0.0.1"}),
            Ok(("10.0.0.1", "api")),
        ),
        (
            "ipv6",
            scheduled(),
            json!({"phase": "Running", "podIP": "fd00::1"}),
            Ok(("fd00::1", "api")),
        ),
        (
            "no service account: default",
            json!({"nodeName": "node-1", "containers": []}),
            running(),
            Ok(("10.0.0.1", "default")),
        ),
        (
            "deprecated serviceAccount alias",
            json!({"nodeName": "node-1", "serviceAccount": "old", "containers": []}),
            running(),
            Ok(("10.0.0.1", "old")),
        ),
        (
            "not scheduled",
            json!({"containers": []}),
            json!({"phase": "Pending"}),
            ignored("not scheduled yet"),
        ),
        (
            "scheduled without IP",
            scheduled(),
            json!({"phase": "Pending"}),
            ignored("no pod IP yet"),
        ),
        (
            "empty IP",
            scheduled(),
            json!({"phase": "Pending", "podIP": ""}),
            ignored("no pod IP yet"),
        ),
        (
            "succeeded",
            scheduled(),
            json!({"phase": "Succeeded", "podIP": "10.0.0.1"}),
            ignored("phase Succeeded: finished"),
        ),
        (
            "failed",
            scheduled(),
            json!({"phase": "Failed", "podIP": "10.0.0.1"}),
            ignored("phase Failed: finished"),
        ),
        (
            "bad IP",
            scheduled(),
            json!({"phase": "Running", "podIP": "10.0.0.300"}),
            Err(Skip::Invalid(
                "status.podIP: \"10.0.0.300\" is not an IP address".to_owned(),
            )),
        ),
    ];
    for (case, spec, status, want) in cases {
        let got = pod(&pod_json(spec, status)).map(|w| {
            assert_eq!(w.metadata.key(), ObjectKey::new("demo", "api-1"), "{case}");
            assert_eq!(
                w.metadata.labels.get("app").map(String::as_str),
                Some("api")
            );
            assert_eq!(w.spec.mesh_address, None, "{case}");
            (w.spec.address.unwrap().to_string(), w.spec.service_account)
        });
        let want = want.map(|(a, sa)| (a.to_owned(), sa.to_owned()));
        assert_eq!(got, want, "{case}");
    }
}

#[test]
fn pods_whose_identity_the_controller_refuses_are_invalid() {
    let p = pod_json(
        json!({"nodeName": "n", "serviceAccountName": "Bad_SA", "containers": []}),
        running(),
    );
    let Err(Skip::Invalid(reason)) = pod(&p) else {
        panic!("expected invalid, got {:?}", pod(&p));
    };
    assert!(reason.starts_with("spec.serviceAccount: "), "{reason}");
    // A dotted Pod name is valid in Kubernetes and only a display name here.
    let mut dotted = pod_json(scheduled(), running());
    dotted.metadata.name = Some("api.v1-0".into());
    assert_eq!(pod(&dotted).unwrap().metadata.name, "api.v1-0");
}

fn svc_json(annotations: Value, spec: Value) -> core::Service {
    from(json!({
        "metadata": {
            "name": "api", "namespace": "demo", "labels": {"team": "a"},
            "annotations": annotations,
        },
        "spec": spec,
    }))
}

#[test]
fn services_convert_ports_addresses_and_hostnames() {
    let svc = svc_json(
        json!({HOSTNAMES_ANNOTATION: "api.example, www.example", "other": "x"}),
        json!({
            "type": "ClusterIP",
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00::10"],
            "selector": {"app": "api"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "grpc", "port": 9000, "targetPort": "grpc", "appProtocol": "grpc"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
        }),
    );
    let got = service(&svc).unwrap();
    assert_eq!(got.metadata.key(), ObjectKey::new("demo", "api"));
    assert_eq!(got.metadata.annotations.len(), 2);
    assert_eq!(got.spec.cluster_ips, ["10.96.0.10", "fd00::10"]);
    assert_eq!(
        got.spec.selector.get("app").map(String::as_str),
        Some("api")
    );
    let ports: Vec<_> = got
        .spec
        .ports
        .iter()
        .map(|p| {
            (
                p.name.as_deref(),
                p.port,
                p.target_port.clone(),
                p.app_protocol.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            (Some("http"), 80, Some(IntOrString::Int(8080)), None),
            (
                Some("grpc"),
                9000,
                Some(IntOrString::String("grpc".into())),
                Some("grpc")
            ),
        ],
        "the UDP port is dropped"
    );
    // The hostnames reach the snapshot exactly as from a file.
    let objs = Objects {
        services: [(got.metadata.key(), got)].into(),
        ..Objects::default()
    };
    let snap = trellis_controller::translate(&objs, "cluster.local", 1);
    let s = &snap.services[&ServiceKey::new("demo", "api")];
    assert_eq!(s.hostnames, ["api.example", "www.example"]);
    assert_eq!(s.addresses.len(), 2);
}

#[test]
fn services_outside_the_mesh_or_refused_are_skipped_alone() {
    let cases: Vec<(&str, Value, Value, Result<(), Skip>)> = vec![
        (
            "headless",
            json!({}),
            json!({"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80}]}),
            Ok(()),
        ),
        ("no spec ports", json!({}), json!({}), Ok(())),
        (
            "external name",
            json!({}),
            json!({"type": "ExternalName", "externalName": "db.example"}),
            Err(Skip::Ignored(
                "type ExternalName: a DNS alias, not meshed".into(),
            )),
        ),
        (
            "udp only",
            json!({}),
            json!({"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}),
            Err(Skip::Ignored(
                "no TCP ports: the mesh carries TCP only".into(),
            )),
        ),
        (
            "bad hostname",
            json!({HOSTNAMES_ANNOTATION: "Bad_Host"}),
            json!({"ports": [{"port": 80}]}),
            Err(Skip::Invalid(
                "metadata.annotations[\"trellis.dev/hostnames\"]: invalid host name \
                 \"Bad_Host\": use lowercase letters, digits and '-', starting and ending \
                 with a letter or digit (a DNS-1123 label)"
                    .into(),
            )),
        ),
        (
            "duplicate port",
            json!({}),
            json!({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}),
            Err(Skip::Invalid(
                "spec.ports[1].port: duplicate port 80 (also spec.ports[0])".into(),
            )),
        ),
    ];
    for (case, annotations, spec, want) in cases {
        let got = service(&svc_json(annotations, spec)).map(|_| ());
        assert_eq!(got, want, "{case}");
    }
    let headless = service(&svc_json(
        json!({}),
        json!({"clusterIP": "None", "ports": [{"port": 80}]}),
    ))
    .unwrap();
    let objs = Objects {
        services: [(headless.metadata.key(), headless)].into(),
        ..Objects::default()
    };
    let snap = trellis_controller::translate(&objs, "cluster.local", 1);
    let s = &snap.services[&ServiceKey::new("demo", "api")];
    assert!(s.addresses.is_empty());
    assert_eq!(s.ports.len(), 1);
}

fn slice_json(labels: Value, address_type: &str, endpoints: Value) -> discovery::EndpointSlice {
    from(json!({
        "metadata": {"name": "api-x1", "namespace": "demo", "labels": labels},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
        "endpoints": endpoints,
    }))
}

fn owned() -> Value {
    json!({SERVICE_NAME_LABEL: "api"})
}

#[test]
fn endpoint_slices_keep_addresses_conditions_and_pod_targets() {
    let slice = slice_json(
        owned(),
        "IPv6",
        json!([
            {
                "addresses": ["fd00::1"],
                "conditions": {"ready": false, "serving": true, "terminating": true},
                "targetRef": {"kind": "Pod", "name": "api-1", "namespace": "demo"},
                "zone": "zone-a",
                "nodeName": "node-1",
            },
            {"addresses": ["fd00::2"], "targetRef": {"kind": "Pod", "name": "api-2"}},
            {"addresses": ["fd00::3"], "targetRef": {"kind": "Node", "name": "node-3"}},
            {
                "addresses": ["fd00::4"],
                "targetRef": {"kind": "Pod", "name": "x", "namespace": "other"},
            },
            {"addresses": ["fd00::5"]},
        ]),
    );
    let got = endpoint_slice(&slice).unwrap();
    assert_eq!(got.key(), ObjectKey::new("demo", "api-x1"));
    assert_eq!(got.service_name.as_deref(), Some("api"));
    assert_eq!(
        got.ports,
        [EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            app_protocol: Some("http".into()),
        }]
    );
    assert_eq!(
        got.endpoints[0],
        SliceEndpoint {
            addresses: vec!["fd00::1".parse().unwrap()],
            ready: Some(false),
            serving: Some(true),
            terminating: Some(true),
            target_pod: Some("api-1".into()),
            zone: Some("zone-a".into()),
            node: Some("node-1".into()),
        }
    );
    let targets: Vec<Option<&str>> = got
        .endpoints
        .iter()
        .map(|e| e.target_pod.as_deref())
        .collect();
    // Only Pods in the slice's namespace can give an identity.
    assert_eq!(targets, [Some("api-1"), Some("api-2"), None, None, None]);
    assert_eq!(got.endpoints[1].ready, None, "unset stays unset (ready)");
}

#[test]
fn endpoint_slices_not_of_a_service_or_not_ips_are_skipped() {
    let ep = json!([{"addresses": ["10.0.0.1"]}]);
    let cases = [
        (
            "fqdn",
            slice_json(owned(), "FQDN", json!([{"addresses": ["db.example"]}])),
            Skip::Ignored("address type FQDN: not IP addresses".into()),
        ),
        (
            "no service label",
            slice_json(json!({}), "IPv4", ep),
            Skip::Ignored("no kubernetes.io/service-name label: not a Service's".into()),
        ),
        (
            "bad address",
            slice_json(
                owned(),
                "IPv4",
                json!([{"addresses": ["10.0.0.1", "nope"]}]),
            ),
            Skip::Invalid("endpoints[0].addresses: \"nope\" is not an IP address".into()),
        ),
    ];
    for (case, slice, want) in cases {
        assert_eq!(endpoint_slice(&slice), Err(want), "{case}");
    }
}

#[test]
fn cluster_objects_translate_with_skips_reported_per_object() {
    let namespaces: Vec<core::Namespace> = vec![
        from(json!({"metadata": {"name": "demo", "labels": {"mesh": "on"}}})),
        from(json!({"metadata": {}})),
    ];
    let services = vec![
        svc_json(
            json!({}),
            json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}),
        ),
        from(json!({
            "metadata": {"name": "ext", "namespace": "demo"},
            "spec": {"type": "ExternalName"},
        })),
    ];
    let slices = vec![slice_json(
        owned(),
        "IPv4",
        json!([
            {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "api-1"}},
            {"addresses": ["10.0.0.2"], "targetRef": {"kind": "Pod", "name": "api-2"}},
        ]),
    )];
    let mut pending = pod_json(scheduled(), json!({"phase": "Pending"}));
    pending.metadata.name = Some("api-2".into());
    let pods = vec![pod_json(scheduled(), running()), pending];
    let policies: Vec<RawPolicy> = vec![
        from(json!({
            "apiVersion": "policy.trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "readers", "namespace": "demo"},
            "spec": {"rules": [{"from": [{"serviceAccounts": ["web"]}]}]},
        })),
        from(json!({
            "apiVersion": "policy.trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "nameless"},
            "spec": {},
        })),
    ];
    let routes: Vec<RawRoute> = vec![
        route_json(
            "demo",
            "api-split",
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
                "rules": [{"backendRefs": [{"name": "api", "port": 80}]}],
            }),
        ),
        route_json(
            "demo",
            "ingress",
            json!({"parentRefs": [{"name": "public"}]}),
        ),
    ];
    let converted = objects(&namespaces, &services, &slices, &pods, &policies, &routes);
    let objs = &converted.objects;
    assert_eq!(objs.endpoint_source, EndpointSource::EndpointSlices);
    assert_eq!(
        objs.namespaces["demo"]
            .labels
            .get("mesh")
            .map(String::as_str),
        Some("on")
    );
    assert_eq!(objs.services.len(), 1);
    assert_eq!(objs.endpoint_slices.len(), 1);
    assert_eq!(objs.workloads.len(), 1);
    assert_eq!(
        objs.policies.keys().collect::<Vec<_>>(),
        [&ObjectKey::new("demo", "readers")]
    );
    assert_eq!(
        objs.routes.keys().collect::<Vec<_>>(),
        [&ObjectKey::new("demo", "api-split")]
    );
    let skipped: Vec<(Kind, &str, &str)> = converted
        .skipped
        .iter()
        .map(|s| (s.kind, s.key.as_str(), s.skip.reason()))
        .collect();
    assert_eq!(
        skipped,
        [
            (Kind::Namespace, "<unnamed>", "no metadata.name"),
            (
                Kind::Service,
                "demo/ext",
                "type ExternalName: a DNS alias, not meshed"
            ),
            (Kind::Pod, "demo/api-2", "no pod IP yet"),
            (
                Kind::AuthorizationPolicy,
                "nameless",
                "metadata.name and metadata.namespace are required"
            ),
            (
                Kind::HttpRoute,
                "demo/ingress",
                "no Service parent: a Gateway's route, not the mesh's"
            ),
        ]
    );
    let snap = trellis_controller::translate(objs, "cluster.local", 1);
    let eps = &snap.services[&ServiceKey::new("demo", "api")].ports[0].endpoints;
    let got: Vec<(String, &str)> = eps
        .iter()
        .map(|e| (e.address.to_string(), e.identity.as_str()))
        .collect();
    // api-2 has no IP in its Pod yet, so it has no identity: left out.
    assert_eq!(
        got,
        [(
            "10.0.0.1:8080".to_owned(),
            "spiffe://cluster.local/ns/demo/sa/api"
        )]
    );
}

#[test]
fn policies_are_converted_whole_and_never_skipped_for_their_spec() {
    let mut p: RawPolicy = from(json!({
        "apiVersion": "policy.trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {
            "name": "readers", "namespace": "demo", "labels": {"team": "a"},
            "annotations": {
                "note": "kept",
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
            },
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            "resourceVersion": "7", "uid": "u-1",
        },
        "spec": {
            "targetRefs": [{"group": "", "kind": "Deployment", "name": "web"}],
            "action": "DENY",
            "rules": [{"from": [{"serviceAccounts": ["a/b/c"]}]}],
        },
    }));
    strip_policy(&mut p);
    assert_eq!(p.metadata.managed_fields, None);
    let converted = policy(&p).unwrap();
    assert_eq!(converted.metadata.key(), ObjectKey::new("demo", "readers"));
    assert_eq!(converted.metadata.labels["team"], "a");
    assert_eq!(
        converted.metadata.annotations.keys().collect::<Vec<_>>(),
        ["note"]
    );
    assert_eq!(converted.spec, from(p.spec.clone()));
    assert_eq!(converted.parse_errors, []);
    // Invalid, yet converted: the translator enforces it fail-closed.
    assert_eq!(converted.problems().len(), 2, "{:?}", converted.problems());
    let mut objs = Objects::default();
    objs.policies.insert(converted.metadata.key(), converted);
    let snap = trellis_controller::translate(&objs, "cluster.local", 1);
    let enforced = &snap.authorization[0];
    assert_eq!(enforced.action, trellis_api::authz::Action::Deny);
    assert!(enforced.target_services.is_empty(), "whole namespace");
    assert_eq!(enforced.rules, [trellis_api::authz::Rule::default()]);
}

#[test]
fn a_policy_whose_spec_does_not_parse_is_converted_fail_closed() {
    use trellis_api::authz::{Action, Rule};

    let raw = |spec: Value| -> RawPolicy {
        from(json!({
            "apiVersion": "policy.trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "demo", "labels": {"team": "a"}},
            "spec": spec,
        }))
    };
    // Case, spec, problems, (targets, action, rules) enforced.
    type Case = (
        &'static str,
        Value,
        Vec<&'static str>,
        (Vec<&'static str>, Action, Vec<Rule>),
    );
    let cases: Vec<Case> = vec![
        (
            "a field of a newer Trellis, ALLOW: its target, allows nothing",
            json!({"targetRefs": [{"kind": "Service", "name": "web"}], "action": "ALLOW",
                   "rules": [{"when": [{"key": "k"}]}]}),
            vec!["spec.rules[0].when: unknown field `when`, expected `from` or `to`"],
            (vec!["web"], Action::Allow, vec![]),
        ),
        (
            "a port out of range, DENY: its target, refuses everything",
            json!({"targetRefs": [{"kind": "Service", "name": "api"}], "action": "DENY",
                   "rules": [{"to": [{"ports": [8080, 70000]}]}]}),
            vec!["spec.rules[0].to[0].ports[1]: invalid value: integer `70000`, expected u16"],
            (vec!["api"], Action::Deny, vec![Rule::default()]),
        ),
        (
            "an unknown action: DENY",
            json!({"action": "AUDIT", "rules": [{}]}),
            vec!["spec.action: unknown variant `AUDIT`, expected `ALLOW` or `DENY`"],
            (vec![], Action::Deny, vec![Rule::default()]),
        ),
        (
            "no spec at all: DENY on the whole namespace",
            Value::Null,
            vec!["spec: invalid type: null, expected struct AuthorizationPolicySpec"],
            (vec![], Action::Deny, vec![Rule::default()]),
        ),
    ];
    for (case, spec, problems, (targets, action, rules)) in cases {
        let converted = policy(&raw(spec)).unwrap();
        assert_eq!(
            converted.metadata.key(),
            ObjectKey::new("demo", "p"),
            "{case}"
        );
        assert_eq!(converted.metadata.labels["team"], "a", "{case}");
        assert_eq!(converted.problems(), problems, "{case}");
        let mut objs = Objects::default();
        objs.policies.insert(converted.metadata.key(), converted);
        let snap = trellis_controller::translate(&objs, "cluster.local", 1);
        let enforced = &snap.authorization[0];
        assert_eq!(
            (
                &enforced.target_services,
                enforced.action,
                &enforced.rules,
                enforced.dry_run
            ),
            (
                &targets.iter().map(|t| (*t).to_owned()).collect(),
                action,
                &rules,
                false
            ),
            "{case}"
        );
    }
}

fn route_json(ns: &str, name: &str, spec: Value) -> RawRoute {
    from(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns, "labels": {"team": "a"}},
        "spec": spec,
        "status": {"parents": [{"controllerName": "example.com/gateway", "conditions": []}]},
    }))
}

#[test]
fn routes_of_the_mesh_are_kept_with_their_problems_and_gateway_routes_ignored() {
    let service_parent = json!({"group": "", "kind": "Service", "name": "web"});
    // Case, spec, the route's problems or why it is skipped.
    type RouteCase = (&'static str, Value, Result<Vec<String>, Skip>);
    let cases: Vec<RouteCase> = vec![
        (
            "a valid mesh route",
            json!({"parentRefs": [service_parent], "rules": [{}]}),
            Ok(vec![]),
        ),
        (
            "core group spelled out",
            json!({"parentRefs": [{"group": "core", "kind": "Service", "name": "web"}]}),
            Ok(vec![]),
        ),
        (
            "a mesh route with problems is kept, for the translator to leave out",
            json!({"parentRefs": [service_parent],
                   "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/.*"}}]}]}),
            Ok(vec![
                "spec.rules[0].matches[0].path.type: RegularExpression is not supported; use \
                 Exact or PathPrefix"
                    .to_owned(),
            ]),
        ),
        (
            "a mesh route this version cannot parse is kept with its parse error",
            json!({"parentRefs": [service_parent], "rules": [{"retry": {"attempts": 2}}]}),
            Ok(vec![
                "spec.rules[0].retry: unknown field `retry`, expected one of `name`, \
                 `matches`, `filters`, `backendRefs`, `timeouts`"
                    .to_owned(),
            ]),
        ),
        (
            "a Gateway's route",
            json!({"parentRefs": [{"name": "public"}], "rules": [{"retry": {}}]}),
            Err(Skip::Ignored(
                "no Service parent: a Gateway's route, not the mesh's".to_owned(),
            )),
        ),
        (
            "kind Service without group \"\" is a Gateway API kind",
            json!({"parentRefs": [{"kind": "Service", "name": "web"}]}),
            Err(Skip::Ignored(
                "no Service parent: a Gateway's route, not the mesh's (a parentRef of kind \
                 Service needs group \"\": without it the group is gateway.networking.k8s.io)"
                    .to_owned(),
            )),
        ),
    ];
    for (case, spec, want) in cases {
        let got = route(&route_json("demo", "r", spec)).map(|r| {
            assert_eq!(r.metadata.labels.get("team").map(String::as_str), Some("a"));
            r.problems()
        });
        assert_eq!(got, want, "{case}");
    }
    let mut nameless = route_json("demo", "r", json!({"parentRefs": [service_parent]}));
    nameless.metadata.namespace = None;
    assert!(matches!(route(&nameless), Err(Skip::Invalid(_))));
}

#[test]
fn stripping_keeps_everything_the_conversion_reads() {
    let mut p: core::Pod = from(json!({
        "metadata": {
            "name": "api-1", "namespace": "demo", "labels": {"app": "api"},
            "annotations": {"big": "x"},
            "managedFields": [{"manager": "kubelet", "operation": "Update"}],
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u"},
            ],
        },
        "spec": {
            "nodeName": "node-1", "serviceAccountName": "api",
            "containers": [{"name": "app", "image": "app:1", "env": [{"name": "A", "value": "b"}]}],
            "volumes": [{"name": "v", "emptyDir": {}}],
        },
        "status": {
            "phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{
                "name": "app", "image": "app:1", "imageID": "", "ready": true,
                "restartCount": 0,
            }],
        },
    }));
    let before = pod(&p);
    strip_pod(&mut p);
    assert_eq!(pod(&p), before);
    assert_eq!(p.metadata.managed_fields, None);
    assert_eq!(p.metadata.annotations, None);
    assert_eq!(p.metadata.owner_references, None);
    let spec = p.spec.as_ref().unwrap();
    assert!(spec.containers.is_empty() && spec.volumes.is_none());
    assert!(p.status.as_ref().unwrap().container_statuses.is_none());

    let mut svc = svc_json(
        json!({HOSTNAMES_ANNOTATION: "api.example", LAST_APPLIED_ANNOTATION: "{...}", "x": "y"}),
        json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}),
    );
    svc.metadata.managed_fields = Some(vec![Default::default()]);
    let mut before = service(&svc).unwrap();
    strip_service(&mut svc);
    // Only the mesh's annotations are kept, which is all the translator reads.
    before
        .metadata
        .annotations
        .retain(|k, _| k.starts_with(MESH_ANNOTATION_PREFIX));
    assert_eq!(service(&svc), Ok(before));
    assert_eq!(svc.metadata.managed_fields, None);

    let mut slice = slice_json(
        owned(),
        "IPv4",
        json!([{
            "addresses": ["10.0.0.1"],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "name": "api-1", "uid": "u", "resourceVersion": "7"},
            "hints": {"forZones": [{"name": "zone-a"}]},
            "zone": "zone-a",
        }]),
    );
    let before = endpoint_slice(&slice);
    strip_endpoint_slice(&mut slice);
    assert_eq!(endpoint_slice(&slice), before);
    assert_eq!(slice.endpoints[0].hints, None);

    let mut r = route_json(
        "demo",
        "web",
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": "web"}]}),
    );
    r.metadata.managed_fields = Some(vec![Default::default()]);
    r.metadata.annotations =
        Some([(LAST_APPLIED_ANNOTATION.to_owned(), "{...}".to_owned())].into());
    let before = route(&r);
    strip_route(&mut r);
    assert_eq!(route(&r), before);
    assert_eq!(
        (r.metadata.managed_fields, r.metadata.annotations),
        (None, None)
    );

    let mut ns: core::Namespace = from(json!({
        "metadata": {"name": "demo", "labels": {"a": "b"}, "annotations": {"c": "d"}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }));
    let before = namespace(&ns);
    strip_namespace(&mut ns);
    assert_eq!(namespace(&ns), before);
    assert_eq!((ns.spec, ns.status), (None, None));

    let mut cm: core::ConfigMap = from(json!({
        "metadata": {"name": "trellis-config", "namespace": "trellis-system"},
        "data": {"mesh.yaml": "ca: self-signed"},
        "binaryData": {"blob": "AAAA"},
    }));
    let before = config_data(&cm);
    assert_eq!(before.binary_keys, ["blob"]);
    strip_config_map(&mut cm);
    assert_eq!(config_data(&cm), before);
    // The key stays (to be refused by name); its bytes do not.
    let kept: Vec<usize> = cm
        .binary_data
        .iter()
        .flat_map(|b| b.values().map(|v| v.0.len()))
        .collect();
    assert_eq!(kept, [0]);
}
