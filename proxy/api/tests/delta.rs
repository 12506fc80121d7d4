//! `apply`, `diff` and `full` as the proxy and the control plane use them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use trellis_api::discovery::v1 as pb;
use trellis_api::{
    ConvertError, Endpoint, MeshSnapshot, Protocol, Service, ServiceKey, ServicePort, apply, diff,
    full,
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
