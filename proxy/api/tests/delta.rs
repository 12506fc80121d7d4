//! `apply`, `diff` and `full` as the proxy and the control plane use them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use trellis_api::discovery::v1 as pb;
use trellis_api::{
    AccessLog, ConvertError, Endpoint, MeshSnapshot, OutboundPolicy, Protocol, Service, ServiceKey,
    ServicePort, Trust, apply, diff, full, same_view,
};

fn endpoint(addr: &str, sa: &str) -> Endpoint {
    Endpoint {
        address: addr
            .parse::<SocketAddr>()
            .unwrap_or_else(|e| panic!("{addr}: {e}")),
        identity: format!("spiffe://cluster.local/ns/demo/sa/{sa}"),
        workload: format!("{sa}-{}", addr.len()),
        labels: BTreeMap::from([("app".to_owned(), sa.to_owned())]),
    }
}

fn service(name: &str, port: u16, endpoints: &[&str]) -> Service {
    Service {
        key: ServiceKey::new("demo", name),
        hostnames: Vec::new(),
        ports: vec![ServicePort {
            name: "http".into(),
            port,
            protocol: Protocol::Http,
            endpoints: endpoints.iter().map(|a| endpoint(a, name)).collect(),
        }],
        addresses: Vec::new(),
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn snapshot(version: u64, services: Vec<Service>) -> MeshSnapshot {
    MeshSnapshot {
        version,
        trust_domain: "cluster.local".into(),
        services: services.into_iter().map(|s| (s.key.clone(), s)).collect(),
        trust: Trust::default(),
        outbound: OutboundPolicy::AllowAny,
        access_log: AccessLog::Unset,
        tracing: Default::default(),
        authorization: Vec::new(),
        routes: Vec::new(),
    }
}

/// A trust bundle of fake roots: trellis-api treats roots as opaque bytes.
fn trust(roots: &[&str], generation: u64) -> Trust {
    Trust {
        roots_der: roots.iter().map(|r| r.as_bytes().to_vec()).collect(),
        generation,
    }
}

fn trusted(version: u64, services: Vec<Service>, trust: Trust) -> MeshSnapshot {
    MeshSnapshot {
        trust,
        ..snapshot(version, services)
    }
}

fn proto(svc: &Service) -> pb::Service {
    pb::Service::from(svc)
}

#[test]
fn full_response_replaces_everything() {
    let current = snapshot(3, vec![service("old", 80, &["10.0.0.1:80"])]);
    let want = snapshot(4, vec![service("web", 8080, &["10.0.0.2:8080"])]);
    assert_eq!(apply(&current, &full(&want)), Ok(want));
}

#[test]
fn incremental_response_applies_upserts_then_removals() {
    let current = snapshot(
        1,
        vec![
            service("a", 80, &["10.0.0.1:80"]),
            service("b", 80, &["10.0.0.2:80"]),
        ],
    );
    let changed_a = service("a", 80, &["10.0.0.1:80", "10.0.0.9:80"]);
    let c = service("c", 81, &[]);
    let resp = pb::DiscoveryResponse {
        version: 2,
        full: false,
        // "c" is both upserted and removed: removals come last, so it is gone.
        upserts: vec![proto(&changed_a), proto(&c)],
        removed: vec![
            "demo/b".into(),
            "demo/c".into(),
            "demo/never-existed".into(),
        ],
        trust_domain: "cluster.local".into(),
        ..Default::default()
    };
    assert_eq!(apply(&current, &resp), Ok(snapshot(2, vec![changed_a])));
}

#[test]
fn responses_that_do_not_move_forward_are_stale() {
    let current = snapshot(5, vec![]);
    for version in [0, 4, 5] {
        for resp in [
            full(&snapshot(version, vec![])),
            diff(&current, &snapshot(version, vec![])),
        ] {
            assert_eq!(
                apply(&current, &resp),
                Err(ConvertError::Stale {
                    version,
                    current: 5
                }),
                "version {version}, full {}",
                resp.full
            );
        }
    }
}

#[test]
fn malformed_responses_are_refused_whole() {
    let current = snapshot(1, vec![service("a", 80, &["10.0.0.1:80"])]);
    let good = proto(&service("b", 80, &["10.0.0.2:80"]));
    let mut bad_addr = proto(&service("c", 80, &["10.0.0.3:80"]));
    bad_addr.ports[0].endpoints[0].address = "nowhere".into();
    let resp = |upserts: Vec<pb::Service>, removed: Vec<&str>| pb::DiscoveryResponse {
        version: 2,
        full: false,
        upserts,
        removed: removed.into_iter().map(String::from).collect(),
        trust_domain: "cluster.local".into(),
        ..Default::default()
    };
    let cases = [
        (
            "bad address after a good upsert",
            resp(vec![good.clone(), bad_addr], vec![]),
            "service demo/c: ports[0].endpoints[0].address = \"nowhere\" is not ip:port",
        ),
        (
            "duplicate service",
            resp(vec![good.clone(), good.clone()], vec![]),
            "service demo/b: upserted twice in one response",
        ),
        (
            "removed key without namespace",
            resp(vec![good], vec!["a"]),
            "removed[0] = \"a\" is not <namespace>/<name>",
        ),
    ];
    for (case, resp, want) in cases {
        let got = apply(&current, &resp).map_err(|e| e.to_string());
        assert_eq!(got, Err(want.to_owned()), "{case}");
    }
}

#[test]
fn diff_carries_only_changes() {
    let a = service("a", 80, &["10.0.0.1:80"]);
    let b = service("b", 80, &["10.0.0.2:80"]);
    let b2 = service("b", 80, &["10.0.0.3:80"]);
    let c = service("c", 80, &[]);
    let old = snapshot(1, vec![a.clone(), b]);
    let new = snapshot(2, vec![b2.clone(), c.clone()]);
    let resp = diff(&old, &new);
    assert_eq!(
        resp,
        pb::DiscoveryResponse {
            version: 2,
            full: false,
            upserts: vec![proto(&b2), proto(&c)],
            removed: vec!["demo/a".into()],
            trust_domain: "cluster.local".into(),
            trust_roots_der: Vec::new(),
            ca_generation: 0,
            more: false,
            outbound_traffic_policy: 0,
            access_log: 0,
            tracing: None,
            authorization: None,
            routes: None,
        }
    );
    assert!(trellis_api::same_view(
        &old,
        &snapshot(9, vec![a, service("b", 80, &["10.0.0.2:80"])])
    ));
    assert!(!trellis_api::same_view(&old, &new));
}

/// Hand-built sequences covering adds, removals, endpoint churn, port and protocol
/// changes, trust-domain changes and empty meshes; every step is checked both ways.
#[test]
fn diff_then_apply_reaches_every_snapshot_in_sequences() {
    let a1 = service("a", 80, &["10.0.0.1:80"]);
    let a2 = service("a", 80, &["10.0.0.1:80", "10.0.0.2:80"]);
    let a3 = Service {
        ports: vec![ServicePort {
            protocol: Protocol::Tcp,
            ..a2.ports[0].clone()
        }],
        ..a2.clone()
    };
    let b = service("b", 9090, &["[fd00::1]:9090"]);
    let b_hosts = Service {
        hostnames: vec!["b.example".into()],
        ..b.clone()
    };
    let c = service("c", 443, &[]);
    // Cluster IPs appear, change family, grow to dual stack and go away again.
    let c_v4 = Service {
        addresses: vec![ip("10.96.0.3")],
        ..c.clone()
    };
    let c_dual = Service {
        addresses: vec![ip("10.96.0.3"), ip("fd00::3")],
        ..c.clone()
    };
    let c_v6 = Service {
        addresses: vec![ip("fd00::3")],
        ..c.clone()
    };
    let mut other_domain = snapshot(0, vec![a1.clone()]);
    other_domain.trust_domain = "prod.example".into();

    let sequences: Vec<Vec<MeshSnapshot>> = vec![
        vec![
            snapshot(0, vec![]),
            snapshot(1, vec![a1.clone()]),
            snapshot(2, vec![]),
        ],
        vec![
            snapshot(0, vec![]),
            snapshot(1, vec![a1.clone(), b.clone()]),
            snapshot(2, vec![a2.clone(), b.clone()]),
            snapshot(3, vec![a3.clone(), b_hosts.clone()]),
            snapshot(4, vec![a3, b_hosts.clone(), c.clone()]),
            snapshot(5, vec![c.clone()]),
            snapshot(6, vec![c.clone()]),
            snapshot(7, vec![c_v4]),
            snapshot(8, vec![c_dual.clone()]),
            snapshot(9, vec![c_v6, b.clone()]),
            snapshot(10, vec![c.clone(), b.clone()]),
        ],
        vec![
            snapshot(0, vec![]),
            snapshot(10, vec![b.clone(), c_dual]),
            snapshot(11, vec![a1.clone(), b_hosts]),
            MeshSnapshot {
                version: 12,
                ..other_domain
            },
            snapshot(13, vec![a1, a2, b, c].into_iter().skip(1).collect()),
        ],
    ];

    for (s, seq) in sequences.iter().enumerate() {
        let mut held = seq[0].clone();
        for (step, new) in seq.iter().enumerate().skip(1) {
            let incremental = apply(&held, &diff(&held, new));
            assert_eq!(
                incremental.as_ref(),
                Ok(new),
                "sequence {s} step {step}: diff"
            );
            // A full view brings any older state, from any sequence, to the same place.
            for any in seq.iter().chain(sequences.iter().flatten()) {
                if any.version < new.version {
                    assert_eq!(
                        apply(any, &full(new)).as_ref(),
                        Ok(new),
                        "sequence {s} step {step}: full"
                    );
                }
            }
            held = incremental.unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[test]
fn full_carries_the_bundle_and_generation() {
    let a = service("a", 80, &["10.0.0.1:80"]);
    let want = trusted(4, vec![a.clone()], trust(&["root-old", "root-new"], 3));
    let resp = full(&want);
    assert_eq!(
        resp,
        pb::DiscoveryResponse {
            version: 4,
            full: true,
            upserts: vec![proto(&a)],
            removed: Vec::new(),
            trust_domain: "cluster.local".into(),
            trust_roots_der: vec![b"root-old".to_vec(), b"root-new".to_vec()],
            ca_generation: 3,
            more: false,
            outbound_traffic_policy: 0,
            access_log: 0,
            tracing: None,
            authorization: Some(pb::AuthorizationPolicies::default()),
            routes: Some(pb::HttpRoutes::default()),
        }
    );
    let held = trusted(1, vec![], trust(&["root-older"], 1));
    assert_eq!(apply(&held, &resp), Ok(want));
}

/// An old control plane sends no roots: a full view without roots leaves no bundle (the
/// proxy then keeps verifying with its CertifyResponse's bundle).
#[test]
fn full_without_roots_leaves_the_trust_empty() {
    let held = trusted(1, vec![], trust(&["root-a"], 2));
    let resp = pb::DiscoveryResponse {
        version: 2,
        full: true,
        trust_domain: "cluster.local".into(),
        ..Default::default()
    };
    let got = apply(&held, &resp).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.trust, Trust::default());
    assert_eq!(got, snapshot(2, vec![]));
}

/// Empty roots in an increment mean "unchanged", and the generation travels with the
/// roots: one sent without roots is ignored.
#[test]
fn increment_without_roots_keeps_the_trust() {
    let a = service("a", 80, &["10.0.0.1:80"]);
    let held = trusted(1, vec![], trust(&["root-a", "root-b"], 2));
    for ca_generation in [0, 1, 2, 9] {
        let resp = pb::DiscoveryResponse {
            version: 2,
            full: false,
            upserts: vec![proto(&a)],
            trust_domain: "cluster.local".into(),
            ca_generation,
            ..Default::default()
        };
        assert_eq!(
            apply(&held, &resp),
            Ok(trusted(2, vec![a.clone()], trust(&["root-a", "root-b"], 2))),
            "ca_generation {ca_generation}"
        );
    }
}

#[test]
fn increment_with_roots_replaces_the_bundle_whole() {
    let held = trusted(1, vec![], trust(&["root-a", "root-b"], 2));
    let resp = pb::DiscoveryResponse {
        version: 2,
        full: false,
        trust_domain: "cluster.local".into(),
        trust_roots_der: vec![b"root-c".to_vec()],
        ca_generation: 3,
        ..Default::default()
    };
    assert_eq!(
        apply(&held, &resp),
        Ok(trusted(2, vec![], trust(&["root-c"], 3)))
    );
}

#[test]
fn diff_carries_the_trust_only_when_it_changed() {
    let a = service("a", 80, &["10.0.0.1:80"]);
    let a2 = service("a", 80, &["10.0.0.2:80"]);
    let old = trusted(1, vec![a.clone()], trust(&["root-a"], 1));
    // Services changed, trust did not: no roots, generation 0.
    let resp = diff(&old, &trusted(2, vec![a2.clone()], trust(&["root-a"], 1)));
    assert!(!resp.full);
    assert_eq!(resp.upserts, vec![proto(&a2)]);
    assert_eq!(resp.trust_roots_der, Vec::<Vec<u8>>::new());
    assert_eq!(resp.ca_generation, 0);

    let cases = [
        ("root added", trust(&["root-a", "root-b"], 1)),
        ("generation bumped, same roots", trust(&["root-a"], 2)),
        ("root replaced", trust(&["root-b"], 1)),
        ("roots reordered", trust(&["root-b", "root-a"], 1)),
    ];
    for (case, new_trust) in cases {
        let new = trusted(2, vec![a.clone()], new_trust.clone());
        assert!(!same_view(&old, &new), "{case}");
        let resp = diff(&old, &new);
        assert_eq!(
            resp,
            pb::DiscoveryResponse {
                version: 2,
                full: false,
                upserts: Vec::new(),
                removed: Vec::new(),
                trust_domain: "cluster.local".into(),
                trust_roots_der: new_trust.roots_der.clone(),
                ca_generation: new_trust.generation,
                more: false,
                outbound_traffic_policy: 0,
                access_log: 0,
                tracing: None,
                authorization: None,
                routes: None,
            },
            "{case}"
        );
        assert_eq!(apply(&old, &resp).as_ref(), Ok(&new), "{case}");
    }
    assert!(same_view(&old, &trusted(7, vec![a], trust(&["root-a"], 1))));
}

/// "No roots" has no incremental form, so dropping the bundle is sent as a full view.
#[test]
fn diff_to_no_bundle_is_a_full_view() {
    let a = service("a", 80, &["10.0.0.1:80"]);
    let old = trusted(1, vec![a.clone()], trust(&["root-a"], 1));
    for new_trust in [Trust::default(), trust(&[], 2)] {
        let new = trusted(2, vec![a.clone()], new_trust);
        let resp = diff(&old, &new);
        assert_eq!(resp, full(&new));
        assert_eq!(apply(&old, &resp).as_ref(), Ok(&new));
    }
}

/// A rotation as the control plane runs it, with service churn in between: bundle
/// appears, old+new roots, generation bump, old root dropped, CA switched again.
#[test]
fn diff_then_apply_follows_a_root_rotation() {
    let a = service("a", 80, &["10.0.0.1:80"]);
    let b = service("b", 80, &["10.0.0.2:80"]);
    let seq = [
        snapshot(1, vec![a.clone()]),
        trusted(2, vec![a.clone()], trust(&["root-1"], 1)),
        trusted(3, vec![a.clone(), b.clone()], trust(&["root-1"], 1)),
        trusted(
            4,
            vec![a.clone(), b.clone()],
            trust(&["root-1", "root-2"], 1),
        ),
        trusted(
            5,
            vec![a.clone(), b.clone()],
            trust(&["root-1", "root-2"], 2),
        ),
        trusted(6, vec![b.clone()], trust(&["root-1", "root-2"], 2)),
        trusted(7, vec![b.clone()], trust(&["root-2"], 2)),
        trusted(8, vec![a.clone()], trust(&["root-2", "root-3"], 3)),
        trusted(9, vec![a.clone()], Trust::default()),
        trusted(10, vec![a, b], trust(&["root-3"], 3)),
    ];
    let mut held = seq[0].clone();
    for (step, new) in seq.iter().enumerate().skip(1) {
        let resp = diff(&held, new);
        let trust_changed = held.trust != new.trust;
        assert_eq!(
            !resp.trust_roots_der.is_empty(),
            trust_changed && !new.trust.roots_der.is_empty(),
            "step {step}: roots only when the trust changed"
        );
        let got = apply(&held, &resp).unwrap_or_else(|e| panic!("step {step}: {e}"));
        assert_eq!(&got, new, "step {step}: diff");
        for older in &seq[..step] {
            assert_eq!(
                apply(older, &full(new)).as_ref(),
                Ok(new),
                "step {step}: full"
            );
        }
        held = got;
    }
}

#[test]
fn trust_serializes_as_count_and_fingerprints() -> anyhow::Result<()> {
    // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
    assert_eq!(trellis_api::fingerprint(b"abc"), "ba7816bf8f01cfea");
    let t = trust(&["abc", ""], 4);
    assert_eq!(
        t.fingerprints(),
        vec!["ba7816bf8f01cfea".to_owned(), "e3b0c44298fc1c14".to_owned()]
    );
    assert_eq!(
        serde_json::to_string(&t)?,
        r#"{"roots":2,"fingerprints":["ba7816bf8f01cfea","e3b0c44298fc1c14"],"generation":4}"#
    );
    let snap = serde_json::to_value(trusted(1, vec![], t))?;
    assert_eq!(snap["trust"]["roots"], 2);
    assert!(!snap.to_string().contains("abc"), "{snap}");
    Ok(())
}

/// The outbound policy rides every response: a change alone is an increment that moves
/// the proxy to the new policy, an increment without a change keeps it, and a policy value
/// the proxy does not know is read as REGISTRY_ONLY (fail closed).
#[test]
fn outbound_policy_travels_with_every_response() -> Result<(), trellis_api::ConvertError> {
    let old = snapshot(1, vec![]);
    let strict = MeshSnapshot {
        outbound: OutboundPolicy::RegistryOnly,
        ..snapshot(2, vec![])
    };
    assert!(!same_view(&old, &strict));
    let resp = diff(&old, &strict);
    assert!(!resp.full);
    assert_eq!(
        resp.outbound_traffic_policy,
        pb::OutboundTrafficPolicy::RegistryOnly as i32
    );
    let applied = apply(&old, &resp)?;
    assert_eq!(applied.outbound, OutboundPolicy::RegistryOnly);
    let later = MeshSnapshot {
        version: 3,
        ..strict.clone()
    };
    assert_eq!(
        apply(&applied, &diff(&strict, &later))?.outbound,
        OutboundPolicy::RegistryOnly
    );
    let unknown = pb::DiscoveryResponse {
        version: 4,
        outbound_traffic_policy: 7,
        ..diff(&old, &old)
    };
    assert_eq!(
        apply(&old, &unknown)?.outbound,
        OutboundPolicy::RegistryOnly
    );
    Ok(())
}

fn policies(names: &[&str]) -> Vec<trellis_api::authz::AuthorizationPolicy> {
    use trellis_api::authz::{Action, AuthorizationPolicy, Pattern, Rule, Source};
    names
        .iter()
        .map(|name| AuthorizationPolicy {
            namespace: "demo".into(),
            name: (*name).into(),
            target_services: vec!["web".into()],
            action: Action::Allow,
            dry_run: false,
            rules: vec![Rule {
                from: vec![Source {
                    principals: vec![Pattern::Prefix("spiffe://cluster.local/ns/demo/".into())],
                    namespaces: Vec::new(),
                }],
                to: Vec::new(),
            }],
        })
        .collect()
}

#[test]
fn policies_travel_whole_and_only_when_changed() -> Result<(), ConvertError> {
    let mut old = snapshot(1, vec![service("web", 80, &["10.0.0.1:8080"])]);
    old.authorization = policies(&["a", "b"]);
    // A full response carries the policies even when the proxy has none.
    let held = apply(&MeshSnapshot::default(), &full(&old))?;
    assert_eq!(held.authorization, old.authorization);

    // An increment that changes something else leaves them out, and the proxy keeps them.
    let mut other = old.clone();
    other.version = 2;
    other.services.clear();
    let resp = diff(&old, &other);
    assert_eq!(resp.authorization, None);
    assert_eq!(apply(&held, &resp)?.authorization, old.authorization);
    assert!(!same_view(&old, &other));

    // A change sends the whole new set, which replaces the old one (no merge).
    let mut new = old.clone();
    new.version = 3;
    new.authorization = policies(&["c"]);
    assert!(!same_view(&old, &new));
    let resp = diff(&old, &new);
    assert_eq!(
        resp.authorization.as_ref().map(|a| a.policies.len()),
        Some(1)
    );
    assert_eq!(apply(&held, &resp)?.authorization, new.authorization);

    // Removing every policy is an empty set, not an absent one.
    let mut none = old.clone();
    none.version = 4;
    none.authorization.clear();
    let resp = diff(&old, &none);
    assert_eq!(
        resp.authorization.as_ref().map(|a| a.policies.len()),
        Some(0)
    );
    assert!(apply(&held, &resp)?.authorization.is_empty());

    // A full response without the field (an older control plane) means none.
    let mut older = full(&new);
    older.version = 5;
    older.authorization = None;
    assert!(apply(&held, &older)?.authorization.is_empty());

    // A bad policy refuses the whole response, naming the policy and the field.
    let mut bad = diff(&old, &new);
    if let Some(set) = bad.authorization.as_mut() {
        set.policies[0].rules[0].from[0].principals[0] = "a*b".into();
    }
    let err = apply(&held, &bad).err().map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some(
            "authorization policy demo/c: rules[0].from[0].principals[0] = \"a*b\" is not a \
             pattern (exact, \"*\", \"prefix*\" or \"*suffix\")"
        )
    );
    Ok(())
}

fn routes(names: &[&str]) -> Vec<trellis_api::route::HttpRoute> {
    use trellis_api::route::{Backend, HttpRoute, RouteParent, RouteRule};
    names
        .iter()
        .map(|name| HttpRoute {
            namespace: "demo".into(),
            name: (*name).into(),
            parents: vec![RouteParent {
                service: ServiceKey::new("demo", "web"),
                port: None,
            }],
            rules: vec![RouteRule {
                name: String::new(),
                matches: Vec::new(),
                backends: vec![Backend {
                    service: ServiceKey::new("demo", "web-v2"),
                    port: 80,
                    weight: 1,
                }],
                timeout: None,
            }],
        })
        .collect()
}

#[test]
fn routes_travel_whole_and_only_when_changed() -> Result<(), ConvertError> {
    let mut old = snapshot(1, vec![service("web", 80, &["10.0.0.1:8080"])]);
    old.routes = routes(&["a", "b"]);
    let held = apply(&MeshSnapshot::default(), &full(&old))?;
    assert_eq!(held.routes, old.routes);

    // Unchanged routes stay out of an increment, and the proxy keeps them.
    let mut other = old.clone();
    other.version = 2;
    other.services.clear();
    let resp = diff(&old, &other);
    assert_eq!(resp.routes, None);
    assert_eq!(apply(&held, &resp)?.routes, old.routes);

    // A change sends the whole new set; removing all is an empty set, not an absent one.
    let mut new = old.clone();
    new.version = 3;
    new.routes = routes(&["c"]);
    assert!(!same_view(&old, &new));
    let resp = diff(&old, &new);
    assert_eq!(resp.routes.as_ref().map(|r| r.routes.len()), Some(1));
    assert_eq!(apply(&held, &resp)?.routes, new.routes);
    let mut none = old.clone();
    none.version = 4;
    none.routes.clear();
    let resp = diff(&old, &none);
    assert_eq!(resp.routes.as_ref().map(|r| r.routes.len()), Some(0));
    assert!(apply(&held, &resp)?.routes.is_empty());

    // A bad route refuses the whole response, naming the route and the field.
    let mut bad = diff(&old, &new);
    if let Some(set) = bad.routes.as_mut() {
        set.routes[0].rules[0].backends[0].port = 0;
    }
    let err = apply(&held, &bad).err().map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("HTTP route demo/c: rules[0].backends[0].port = 0 is not a port (1..=65535)")
    );
    Ok(())
}
