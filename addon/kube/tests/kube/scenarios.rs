//! Scenarios against the API stand-in: what the cluster does, and the snapshot (or
//! config) the source must end up publishing.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use trellis_api::ServiceKey;
use trellis_kube::Kind;

use crate::support::*;
use trellis_kube::stand_in::ApiStandIn;

const DEBOUNCE: Duration = Duration::from_millis(20);

/// `demo` with Service `api` (port 80 -> named target `http`), Pod `api-1` and a slice
/// listing it at 8080 with the given readiness.
fn demo(api: &ApiStandIn, ready: Option<bool>) {
    api.apply(&namespace("demo"));
    api.apply(&service("demo", "api", "10.96.0.10", &[("http", 80)]));
    api.apply(&pod("demo", "api-1", "10.0.0.1", "api"));
    api.apply(&slice(
        "demo",
        "api-x1",
        "api",
        &[("http", 8080)],
        &[("10.0.0.1", "api-1", ready)],
    ));
}

#[tokio::test]
async fn first_snapshot_waits_for_every_initial_list() {
    let api = ApiStandIn::default();
    demo(&api, Some(true));
    api.hold_lists("pods");
    api.hold_lists("configmaps");
    // The first Service list fails too: retried before anything is published.
    api.fail_next("services", 1, 500);
    let running = Running::start(api.client(), DEBOUNCE);

    fn listed(kinds: &[Kind]) -> impl Fn(&trellis_kube::KubeStatus) -> bool + '_ {
        move |s| kinds.iter().all(|k| s.kinds[k].listed)
    }
    let status = running
        .until_status(
            "three kinds listed",
            listed(&[Kind::Namespace, Kind::Service, Kind::EndpointSlice]),
        )
        .await;
    assert!(!status.kinds[&Kind::Pod].listed && !status.synced);
    assert_eq!(status.kinds[&Kind::Service].errors, 1);
    tokio::time::sleep(DEBOUNCE * 5).await;
    assert_eq!(
        running.version(),
        0,
        "published before Pods and ConfigMap were listed"
    );

    api.release_lists("configmaps");
    running
        .until_status("ConfigMap listed", listed(&[Kind::ConfigMap]))
        .await;
    tokio::time::sleep(DEBOUNCE * 5).await;
    assert_eq!(running.version(), 0, "published before Pods were listed");
    assert!(!running.handle.status().synced);

    api.release_lists("pods");
    let first = running.ready().await;
    assert_eq!(first.version, 1);
    assert_eq!(first.trust_domain, TD);
    // Complete, not half-listed: the endpoint needs the slice and the Pod.
    assert_eq!(
        endpoints(&first, "demo", "api", 80),
        [ep("10.0.0.1:8080", "demo", "api")]
    );
    assert_eq!(
        first.services[&ServiceKey::new("demo", "api")].addresses,
        ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    for resource in ["namespaces", "endpointslices", "pods", "configmaps"] {
        assert_eq!(api.requests(resource).0, 1, "{resource} listed once");
    }
    assert_eq!(
        api.requests("services").0,
        2,
        "services listed again after the 500"
    );
    running.stop().await;
}

#[tokio::test]
async fn changes_of_every_watched_kind_reach_the_snapshot() {
    let api = ApiStandIn::default();
    demo(&api, Some(false));
    let running = Running::start(api.client(), DEBOUNCE);
    let first = running.ready().await;
    assert_eq!(first.version, 1);
    assert!(first.services.contains_key(&ServiceKey::new("demo", "api")));
    assert_eq!(
        endpoints(&first, "demo", "api", 80),
        [],
        "not ready: no endpoint"
    );

    // The Pod becomes ready in its slice: the endpoint appears, with the Pod's identity.
    let mut last = 1;
    let mut step = async |running: &Running, what: &str, want: Vec<(String, String)>| {
        let snap = running
            .until(what, |s| endpoints(s, "demo", "api", 80) == want)
            .await;
        assert!(
            snap.version > last,
            "{what}: version {} after {last}",
            snap.version
        );
        last = snap.version;
        snap
    };
    api.apply(&slice(
        "demo",
        "api-x1",
        "api",
        &[("http", 8080)],
        &[("10.0.0.1", "api-1", Some(true))],
    ));
    let snap = step(
        &running,
        "api-1 ready",
        vec![ep("10.0.0.1:8080", "demo", "api")],
    )
    .await;
    let endpoint = &snap.services[&ServiceKey::new("demo", "api")].ports[0].endpoints[0];
    assert_eq!(endpoint.workload, "api-1");
    assert_eq!(
        endpoint
            .labels
            .get("topology.kubernetes.io/zone")
            .map(String::as_str),
        Some("zone-a")
    );

    // A second Pod joins the slice.
    api.apply(&pod("demo", "api-2", "10.0.0.2", "api"));
    api.apply(&slice(
        "demo",
        "api-x1",
        "api",
        &[("http", 8080)],
        &[
            ("10.0.0.1", "api-1", Some(true)),
            ("10.0.0.2", "api-2", None),
        ],
    ));
    step(
        &running,
        "api-2 added",
        vec![
            ep("10.0.0.1:8080", "demo", "api"),
            ep("10.0.0.2:8080", "demo", "api"),
        ],
    )
    .await;

    // api-1 leaves the slice.
    api.apply(&slice(
        "demo",
        "api-x1",
        "api",
        &[("http", 8080)],
        &[("10.0.0.2", "api-2", None)],
    ));
    step(
        &running,
        "api-1 removed",
        vec![ep("10.0.0.2:8080", "demo", "api")],
    )
    .await;

    // The Pod's service account changes: so does the endpoint's identity.
    api.apply(&pod("demo", "api-2", "10.0.0.2", "api-v2"));
    step(
        &running,
        "api-2 identity",
        vec![ep("10.0.0.2:8080", "demo", "api-v2")],
    )
    .await;

    // A second (IPv6) slice with its own Pod.
    api.apply(&pod("demo", "api-3", "fd00::3", "api"));
    api.apply(&slice(
        "demo",
        "api-x6",
        "api",
        &[("http", 8080)],
        &[("fd00::3", "api-3", Some(true))],
    ));
    step(
        &running,
        "ipv6 slice",
        vec![
            ep("10.0.0.2:8080", "demo", "api-v2"),
            ep("[fd00::3]:8080", "demo", "api"),
        ],
    )
    .await;
    api.delete::<EndpointSlice>("demo", "api-x6");
    step(
        &running,
        "ipv6 slice deleted",
        vec![ep("10.0.0.2:8080", "demo", "api-v2")],
    )
    .await;

    // The Pod goes while its slice still lists it: no identity, so no endpoint.
    api.delete::<Pod>("demo", "api-2");
    step(&running, "api-2 deleted", vec![]).await;

    // The Service changes (a second port and address), then goes.
    let mut svc = service("demo", "api", "10.96.0.10", &[("http", 80), ("grpc", 9000)]);
    if let Some(spec) = svc.spec.as_mut() {
        spec.cluster_ips = Some(vec!["10.96.0.10".into(), "fd00::10".into()]);
    }
    api.apply(&svc);
    let snap = running
        .until("second port", |s| {
            s.services
                .get(&ServiceKey::new("demo", "api"))
                .is_some_and(|s| s.ports.len() == 2 && s.addresses.len() == 2)
        })
        .await;
    assert!(snap.version > last);
    api.delete::<Service>("demo", "api");
    running
        .until("service deleted", |s| s.services.is_empty())
        .await;

    // A Namespace added and removed: counted, and no snapshot for it.
    let version = running.version();
    api.apply(&namespace("extra"));
    running
        .until_status("two namespaces", |s| s.kinds[&Kind::Namespace].objects == 2)
        .await;
    assert!(has_line(
        &running.metrics(),
        "trellis_kube_objects{kind=\"Namespace\"} 2"
    ));
    api.delete::<Namespace>("", "extra");
    running
        .until_status("one namespace", |s| s.kinds[&Kind::Namespace].objects == 1)
        .await;
    assert_eq!(
        running.version(),
        version,
        "namespaces alone change no service"
    );
    let status = running.handle.status();
    assert!(status.synced);
    assert_eq!(status.snapshot_version, version);
    for kind in Kind::ALL {
        assert_eq!(status.kinds[&kind].errors, 0, "{kind}");
    }
    running.stop().await;
}

#[tokio::test]
async fn gone_watch_relists_and_the_snapshot_converges() {
    let api = ApiStandIn::default();
    demo(&api, Some(true));
    let running = Running::start(api.client(), DEBOUNCE);
    running.ready().await;

    // 410 Gone on the open watch: the watcher re-lists after its backoff. A change made
    // meanwhile is only in the new list.
    api.expire_watches("endpointslices");
    api.apply(&pod("demo", "api-2", "10.0.0.2", "api"));
    api.apply(&slice(
        "demo",
        "api-x1",
        "api",
        &[("http", 8080)],
        &[
            ("10.0.0.1", "api-1", Some(true)),
            ("10.0.0.2", "api-2", Some(true)),
        ],
    ));
    running
        .until("api-2 after the re-list", |s| {
            endpoints(s, "demo", "api", 80)
                == [
                    ep("10.0.0.1:8080", "demo", "api"),
                    ep("10.0.0.2:8080", "demo", "api"),
                ]
        })
        .await;
    assert_eq!(api.requests("endpointslices").0, 2, "re-listed once");
    let status = running.handle.status();
    let slices = &status.kinds[&Kind::EndpointSlice];
    assert_eq!(slices.errors, 1);
    let error = slices.last_error.as_deref().unwrap_or_default();
    assert!(error.contains("too old resource version"), "{error}");
    assert!(has_line(
        &running.metrics(),
        "trellis_kube_watch_errors_total{kind=\"EndpointSlice\"} 1"
    ));

    // The watch keeps working after the restart.
    api.delete::<EndpointSlice>("demo", "api-x1");
    running
        .until("slice deleted", |s| {
            endpoints(s, "demo", "api", 80).is_empty()
        })
        .await;
    running.stop().await;
}

#[tokio::test]
async fn failing_watch_resumes_and_the_snapshot_converges() {
    let api = ApiStandIn::default();
    demo(&api, Some(true));
    let running = Running::start(api.client(), DEBOUNCE);
    running.ready().await;

    // The Pod watch drops and its restart gets a 500; the change made meanwhile arrives
    // when the watch resumes from its last version (no re-list needed).
    api.fail_next("pods", 1, 500);
    api.close_watches("pods");
    api.apply(&pod("demo", "api-1", "10.0.0.1", "api-v2"));
    running
        .until("identity after the restart", |s| {
            endpoints(s, "demo", "api", 80) == [ep("10.0.0.1:8080", "demo", "api-v2")]
        })
        .await;
    assert_eq!(
        api.requests("pods"),
        (1, 3),
        "one list; watches: first, failed, resumed"
    );
    let status = running.handle.status();
    let pods = &status.kinds[&Kind::Pod];
    assert_eq!(pods.errors, 1);
    let error = pods.last_error.as_deref().unwrap_or_default();
    assert!(error.contains("injected failure"), "{error}");
    assert!(has_line(
        &running.metrics(),
        "trellis_kube_watch_errors_total{kind=\"Pod\"} 1"
    ));
    assert!(has_line(
        &running.metrics(),
        "trellis_kube_watch_errors_total{kind=\"Service\"} 0"
    ));
    running.stop().await;
}

#[tokio::test]
async fn config_map_data_flows_raw_through_create_change_and_delete() {
    let api = ApiStandIn::default();
    demo(&api, Some(true));
    // Look-alikes the source must not see: another name, another namespace.
    api.apply(&config_map(
        "trellis-system",
        "other",
        &[("mesh.yaml", "no")],
    ));
    api.apply(&config_map(
        "default",
        "trellis-config",
        &[("mesh.yaml", "no")],
    ));
    let running = Running::start(api.client(), DEBOUNCE);
    let first = running.ready().await;
    assert_eq!(*running.handle.config().borrow(), None, "absent");

    /// What happens, and the data the app should then see.
    type Step = (
        &'static str,
        Option<&'static [(&'static str, &'static str)]>,
    );
    let steps: [Step; 4] = [
        ("created", Some(&[("mesh.yaml", "ca: self-signed\n")])),
        (
            "changed",
            Some(&[("mesh.yaml", "ca: secret\n"), ("extra", "1")]),
        ),
        // Not YAML: parsing is the app's job, the raw data still flows.
        ("invalid", Some(&[("mesh.yaml", "ca: [unclosed")])),
        ("deleted", None),
    ];
    for (what, data) in steps {
        match data {
            Some(data) => {
                api.apply(&config_map("trellis-system", "trellis-config", data));
            }
            None => api.delete::<ConfigMap>("trellis-system", "trellis-config"),
        }
        running.until_config(data).await;
        assert_eq!(
            running.handle.status().kinds[&Kind::ConfigMap].objects,
            usize::from(data.is_some()),
            "{what}"
        );
    }
    // The look-alikes changing is not seen either.
    api.apply(&config_map(
        "default",
        "trellis-config",
        &[("mesh.yaml", "still no")],
    ));
    tokio::time::sleep(DEBOUNCE * 5).await;
    assert_eq!(*running.handle.config().borrow(), None);
    assert_eq!(
        running.version(),
        first.version,
        "config changes publish no snapshot"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_burst_of_changes_is_coalesced_into_few_snapshots() {
    const DEBOUNCE: Duration = Duration::from_millis(300);
    const PODS: usize = 50;
    let api = ApiStandIn::default();
    demo(&api, Some(true));
    let ip = |i: usize| format!("10.0.1.{i}");
    for i in 0..PODS {
        api.apply(&pod("demo", &format!("burst-{i}"), &ip(i), "burst"));
    }
    let running = Running::start(api.client(), DEBOUNCE);
    let first = running.ready().await;
    assert_eq!(first.version, 1);

    // 50 slice updates, each adding one endpoint, a couple of milliseconds apart (so that
    // the source sees them one by one) but well within one debounce interval.
    let mut listed: Vec<(String, String, Option<bool>)> = Vec::new();
    for i in 0..PODS {
        listed.push((ip(i), format!("burst-{i}"), Some(true)));
        let eps: Vec<(&str, &str, Option<bool>)> = listed
            .iter()
            .map(|(ip, pod, ready)| (ip.as_str(), pod.as_str(), *ready))
            .collect();
        api.apply(&slice("demo", "api-burst", "api", &[("http", 8080)], &eps));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut want: Vec<(String, String)> = vec![ep("10.0.0.1:8080", "demo", "api")];
    want.extend((0..PODS).map(|i| ep(&format!("{}:8080", ip(i)), "demo", "burst")));
    want.sort();
    let done = running
        .until("all 50 endpoints", |s| {
            let mut got = endpoints(s, "demo", "api", 80);
            got.sort();
            got == want
        })
        .await;
    // Each publish is one version: 50 changes, at most 3 snapshots.
    let publishes = done.version - first.version;
    assert!(
        (1..=3).contains(&publishes),
        "{publishes} snapshots for 50 changes"
    );
    tokio::time::sleep(DEBOUNCE * 2).await;
    assert_eq!(running.version(), done.version, "nothing left to publish");
    running.stop().await;
}

#[tokio::test]
async fn stops_when_nobody_receives_snapshots() {
    let api = ApiStandIn::default();
    demo(&api, Some(true));
    let running = Running::start(api.client(), DEBOUNCE);
    running.ready().await;
    running.abandon().await;
}

#[tokio::test]
async fn the_handle_reads_namespace_labels_and_wakes_on_namespace_changes() {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    let running = Running::start(api.client(), DEBOUNCE);
    running.ready().await;
    let handle = running.handle.clone();
    assert_eq!(handle.namespace_names(), ["demo"]);
    assert_eq!(
        handle.namespace_labels("demo").unwrap()["kubernetes.io/metadata.name"],
        "demo"
    );
    assert_eq!(handle.namespace_labels("absent"), None);

    let mut changes = handle.status_changes();
    changes.borrow_and_update();
    let mut labelled = namespace("shop");
    labelled
        .metadata
        .labels
        .get_or_insert_default()
        .insert("trellis.dev/inject".into(), "enabled".into());
    api.apply(&labelled);
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("a new Namespace wakes status readers")
        .unwrap();
    assert_eq!(handle.namespace_names(), ["demo", "shop"]);
    assert_eq!(
        handle.namespace_labels("shop").unwrap()["trellis.dev/inject"],
        "enabled"
    );
}
