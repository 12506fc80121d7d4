//! The trust bundle publisher against the API stand-in: the ConfigMap in every namespace
//! but the excluded ones, the `caBundle` of every webhook entry, what is not written
//! (identical objects, foreign ConfigMaps, anything from a follower), and recovery from
//! conflicts, outages and drift.

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine as _;
use http::Method;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use trellis_kube::publish::{PublishSettings, TrustPublisher};
use trellis_kube::stand_in::{ApiStandIn, Write};

use crate::leader::{Elector, fast};
use crate::support::{Running, eventually, has_line, metrics_text, namespace};

const CM: &str = "trellis-trust-bundle";
const KEY: &str = "trust-bundle.pem";
const INJECTOR: &str = "trellis-sidecar-injector";
const VALIDATOR: &str = "trellis-config";
const EXCLUDED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// The namespaces of [`cluster`] that get the ConfigMap.
const MESHED: [&str; 4] = ["default", "payments", "shop", "trellis-system"];

const ROOT_A: &str = "-----BEGIN CERTIFICATE-----\r\nMIIBszCCAVmgAwIBAgIUROOTA\r\n\
                      -----END CERTIFICATE-----\r\n";
const ROOT_B: &str = "-----BEGIN CERTIFICATE-----\r\nMIIBszCCAVmgAwIBAgIUROOTB\r\n\
                      -----END CERTIFICATE-----\r\n";

/// Both roots, as during a CA rotation.
fn rotated() -> String {
    format!("{ROOT_A}{ROOT_B}")
}

fn mutating(name: &str, entries: &[&str]) -> MutatingWebhookConfiguration {
    let webhooks: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "name": e, "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "clientConfig": {"service": {
                    "name": "trellis-webhook", "namespace": "trellis-system", "path": "/inject",
                }},
            })
        })
        .collect();
    serde_json::from_value(json!({"metadata": {"name": name}, "webhooks": webhooks})).unwrap()
}

fn validating(name: &str, entries: &[&str]) -> ValidatingWebhookConfiguration {
    let webhooks: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "name": e, "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "clientConfig": {"service": {
                    "name": "trellis-webhook", "namespace": "trellis-system", "path": "/validate",
                }},
            })
        })
        .collect();
    serde_json::from_value(json!({"metadata": {"name": name}, "webhooks": webhooks})).unwrap()
}

/// The stand-in with `namespaces` and, when `webhooks`, both webhook configurations (two
/// entries in the injector's, one in the validator's).
fn cluster(namespaces: &[&str], webhooks: bool) -> ApiStandIn {
    let api = ApiStandIn::default();
    for ns in namespaces {
        api.apply(&namespace(ns));
    }
    if webhooks {
        api.apply(&mutating(
            INJECTOR,
            &["inject.trellis.dev", "inject-v2.trellis.dev"],
        ));
        api.apply(&validating(VALIDATOR, &["config.trellis.dev"]));
    }
    api
}

/// Every namespace of the default test cluster, the excluded ones included.
fn all_namespaces() -> Vec<&'static str> {
    MESHED.iter().chain(EXCLUDED.iter()).copied().collect()
}

/// Short timings: resync as given, backoff 50 ms to 400 ms.
fn settings(resync: Duration) -> PublishSettings {
    PublishSettings {
        resync,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        request_timeout: Duration::from_secs(2),
        ..PublishSettings::default()
    }
}

/// A publisher running against the stand-in, with the source that feeds it Namespaces.
struct Publishing {
    bundle: watch::Sender<String>,
    registry: Registry,
    source: Running,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Publishing {
    async fn start(
        api: &ApiStandIn,
        settings: PublishSettings,
        pem: &str,
        leader: watch::Receiver<bool>,
    ) -> Publishing {
        Self::start_after(api, settings, pem, leader, || {}).await
    }

    /// Starts the source, waits for its first list, runs `then`, starts the publisher.
    async fn start_after(
        api: &ApiStandIn,
        settings: PublishSettings,
        pem: &str,
        leader: watch::Receiver<bool>,
        then: impl FnOnce(),
    ) -> Publishing {
        let source = Running::start(api.client(), Duration::from_millis(20));
        source.ready().await;
        then();
        let mut registry = Registry::default();
        let publisher = TrustPublisher::new(api.client(), settings).with_metrics(&mut registry);
        let (bundle, rx) = watch::channel(pem.to_owned());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(
            publisher.run(rx, leader, source.handle.clone(), async move {
                let _ = stopped.await;
            }),
        );
        Publishing {
            bundle,
            registry,
            source,
            stop: Some(stop),
            task,
        }
    }

    fn metrics(&self) -> String {
        metrics_text(&self.registry)
    }

    async fn until_metric(&self, line: &str) {
        eventually(&format!("metric line {line:?}"), || {
            has_line(&self.metrics(), line).then_some(())
        })
        .await;
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(crate::support::PATIENCE, &mut self.task)
            .await
            .expect("publisher did not stop")
            .expect("publisher panicked");
        self.source.stop().await;
    }
}

/// A leadership channel that says `leading` and stays open.
fn leadership(leading: bool) -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(leading)
}

fn write_counter(target: &str, result: &str, n: u64) -> String {
    format!("trellis_trust_bundle_writes_total{{target=\"{target}\",result=\"{result}\"}} {n}")
}

/// The trust bundle ConfigMap in `ns`, if any.
fn config_map(api: &ApiStandIn, ns: &str) -> Option<Value> {
    api.object::<ConfigMap>(ns, CM)
}

/// Whether `ns` holds our ConfigMap with exactly `pem`.
fn holds(api: &ApiStandIn, ns: &str, pem: &str) -> bool {
    config_map(api, ns).is_some_and(|cm| {
        cm["data"] == json!({KEY: pem})
            && cm["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "trellis"
    })
}

/// The decoded `caBundle` of every entry of a webhook configuration.
fn ca_bundles(config: &Value) -> Vec<Option<String>> {
    let entries = config["webhooks"].as_array().cloned().unwrap_or_default();
    entries
        .iter()
        .map(|w| {
            let encoded = w["clientConfig"]["caBundle"].as_str()?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .expect("caBundle is base64");
            Some(String::from_utf8(bytes).expect("caBundle is UTF-8"))
        })
        .collect()
}

fn injector(api: &ApiStandIn) -> Value {
    api.object::<MutatingWebhookConfiguration>("", INJECTOR)
        .expect("the injector configuration exists")
}

fn validator(api: &ApiStandIn) -> Value {
    api.object::<ValidatingWebhookConfiguration>("", VALIDATOR)
        .expect("the validator configuration exists")
}

/// Whether every webhook entry of both configurations holds exactly `pem`.
fn webhooks_hold(api: &ApiStandIn, pem: &str) -> bool {
    let all = |config: Value, entries: usize| {
        let bundles = ca_bundles(&config);
        bundles.len() == entries && bundles.iter().all(|b| b.as_deref() == Some(pem))
    };
    all(injector(api), 2) && all(validator(api), 1)
}

/// Waits until every namespace in `namespaces` and both webhook configurations hold `pem`.
async fn until_published(api: &ApiStandIn, namespaces: &[&str], pem: &str) {
    eventually(
        &format!("the bundle in {namespaces:?} and both webhooks"),
        || {
            let done = namespaces.iter().all(|ns| holds(api, ns, pem)) && webhooks_hold(api, pem);
            done.then_some(())
        },
    )
    .await;
}

fn webhook_writes(api: &ApiStandIn) -> Vec<Write> {
    let mut writes = api.writes("mutatingwebhookconfigurations");
    writes.extend(api.writes("validatingwebhookconfigurations"));
    writes
}

/// `(method, namespace, answer)` of each ConfigMap write, sorted.
fn config_map_writes(api: &ApiStandIn) -> Vec<(Method, String, u16)> {
    let mut writes: Vec<_> = api
        .writes("configmaps")
        .into_iter()
        .map(|w| (w.method, w.namespace.unwrap_or_default(), w.code))
        .collect();
    writes.sort_by(|a, b| (a.1.as_str(), a.0.as_str()).cmp(&(b.1.as_str(), b.0.as_str())));
    writes
}

#[tokio::test]
async fn every_namespace_but_the_excluded_gets_the_bundle_once() {
    let api = cluster(&all_namespaces(), true);
    let (_leader, leading) = leadership(true);
    let resync = Duration::from_millis(200);
    let publishing = Publishing::start(&api, settings(resync), ROOT_A, leading).await;

    until_published(&api, &MESHED, ROOT_A).await;
    for ns in EXCLUDED {
        assert_eq!(config_map(&api, ns), None, "a ConfigMap in {ns}");
    }
    // One create per namespace, one update per webhook configuration.
    let created: Vec<_> = MESHED
        .iter()
        .map(|ns| (Method::POST, (*ns).to_owned(), 201))
        .collect();
    assert_eq!(config_map_writes(&api), created);
    let webhooks: Vec<_> = webhook_writes(&api)
        .into_iter()
        .map(|w| (w.method, w.code))
        .collect();
    assert_eq!(webhooks, [(Method::PUT, 200), (Method::PUT, 200)]);
    publishing
        .until_metric("trellis_trust_bundle_namespaces 4")
        .await;
    publishing
        .until_metric("trellis_trust_bundle_webhook_configurations 2")
        .await;
    let metrics = publishing.metrics();
    for line in [
        write_counter("configmap", "created", 4),
        write_counter("configmap", "updated", 0),
        write_counter("webhook", "updated", 2),
        write_counter("configmap", "failed", 0),
    ] {
        assert!(has_line(&metrics, &line), "missing {line:?} in\n{metrics}");
    }

    // Later syncs read everything again and write nothing that is already right: edit one
    // ConfigMap behind the publisher's back; once the resync has repaired it, that repair
    // is the only write since.
    tokio::time::sleep(resync * 2).await;
    let before = (api.writes("configmaps").len(), webhook_writes(&api).len());
    assert_eq!(before, (4, 2), "writes without a change");
    let mut edited: ConfigMap = serde_json::from_value(config_map(&api, "shop").unwrap()).unwrap();
    edited.data = Some([(KEY.to_owned(), "tampered".to_owned())].into());
    api.apply(&edited);
    eventually("the edited ConfigMap repaired", || {
        holds(&api, "shop", ROOT_A).then_some(())
    })
    .await;
    tokio::time::sleep(resync * 2).await;
    let after = config_map_writes(&api);
    assert_eq!(after.len(), 5, "{after:?}");
    assert!(
        after.contains(&(Method::PUT, "shop".to_owned(), 200)),
        "{after:?}"
    );
    assert_eq!(webhook_writes(&api).len(), 2);
    publishing.stop().await;
}

#[tokio::test]
async fn a_rotated_bundle_reaches_every_config_map_and_every_webhook_entry() {
    let api = cluster(&all_namespaces(), true);
    let (_leader, leading) = leadership(true);
    // A resync far away: the rotation itself must trigger the writes.
    let publishing =
        Publishing::start(&api, settings(Duration::from_secs(3600)), ROOT_A, leading).await;
    until_published(&api, &MESHED, ROOT_A).await;

    publishing.bundle.send_replace(rotated());
    until_published(&api, &MESHED, &rotated()).await;
    let updates: Vec<_> = config_map_writes(&api)
        .into_iter()
        .filter(|(method, _, _)| method == Method::PUT)
        .collect();
    let want: Vec<_> = MESHED
        .iter()
        .map(|ns| (Method::PUT, (*ns).to_owned(), 200))
        .collect();
    assert_eq!(updates, want);
    assert_eq!(
        ca_bundles(&injector(&api)),
        [Some(rotated()), Some(rotated())]
    );
    assert_eq!(ca_bundles(&validator(&api)), [Some(rotated())]);
    publishing
        .until_metric(&write_counter("configmap", "updated", 4))
        .await;
    publishing
        .until_metric(&write_counter("webhook", "updated", 4))
        .await;

    // The old root leaves the bundle.
    publishing.bundle.send_replace(ROOT_B.to_owned());
    until_published(&api, &MESHED, ROOT_B).await;
    publishing.stop().await;
}

#[tokio::test]
async fn a_foreign_config_map_is_left_alone_and_counted_once() {
    let mut namespaces = all_namespaces();
    namespaces.extend(["legacy", "helm-managed"]);
    let api = cluster(&namespaces, true);
    let foreign = |ns: &str, labels: Value| -> ConfigMap {
        serde_json::from_value(json!({
            "metadata": {"name": CM, "namespace": ns, "labels": labels},
            "data": {KEY: "someone else's roots", "extra": "kept"},
        }))
        .unwrap()
    };
    api.apply(&foreign("legacy", json!({})));
    api.apply(&foreign(
        "helm-managed",
        json!({"app.kubernetes.io/managed-by": "Helm"}),
    ));
    let before = (config_map(&api, "legacy"), config_map(&api, "helm-managed"));
    let (_leader, leading) = leadership(true);
    let resync = Duration::from_millis(150);
    let publishing = Publishing::start(&api, settings(resync), ROOT_A, leading).await;

    until_published(&api, &MESHED, ROOT_A).await;
    publishing
        .until_metric(&write_counter("configmap", "foreign", 2))
        .await;
    // Several resyncs and a rotation later: untouched, and still counted once each.
    tokio::time::sleep(resync * 3).await;
    publishing.bundle.send_replace(rotated());
    until_published(&api, &MESHED, &rotated()).await;
    tokio::time::sleep(resync * 2).await;
    let after = (config_map(&api, "legacy"), config_map(&api, "helm-managed"));
    assert_eq!(after, before, "a foreign ConfigMap changed");
    let touched: Vec<_> = config_map_writes(&api)
        .into_iter()
        .filter(|(_, ns, _)| ns == "legacy" || ns == "helm-managed")
        .collect();
    assert!(touched.is_empty(), "{touched:?}");
    let metrics = publishing.metrics();
    assert!(
        has_line(&metrics, &write_counter("configmap", "foreign", 2)),
        "{metrics}"
    );
    // They do not hold the bundle: only the four meshed namespaces count.
    assert!(
        has_line(&metrics, "trellis_trust_bundle_namespaces 4"),
        "{metrics}"
    );
    publishing.stop().await;
}

#[tokio::test]
async fn a_new_namespace_gets_its_config_map_without_waiting_for_the_resync() {
    let api = cluster(&all_namespaces(), true);
    let (_leader, leading) = leadership(true);
    let publishing =
        Publishing::start(&api, settings(Duration::from_secs(3600)), ROOT_A, leading).await;
    until_published(&api, &MESHED, ROOT_A).await;

    api.apply(&namespace("new-team"));
    eventually("the ConfigMap in the new namespace", || {
        holds(&api, "new-team", ROOT_A).then_some(())
    })
    .await;
    publishing
        .until_metric("trellis_trust_bundle_namespaces 5")
        .await;
    // Only the new namespace was written.
    assert_eq!(api.writes("configmaps").len(), 5);
    assert_eq!(webhook_writes(&api).len(), 2);

    // A namespace deleted leaves the count.
    api.delete::<k8s_openapi::api::core::v1::Namespace>("", "new-team");
    publishing
        .until_metric("trellis_trust_bundle_namespaces 4")
        .await;
    publishing.stop().await;
}

#[tokio::test]
async fn a_follower_writes_nothing_and_starts_when_it_leads() {
    let api = cluster(&all_namespaces(), true);
    // Another replica holds the Lease for an hour: this one follows.
    let held: Lease = serde_json::from_value(json!({
        "metadata": {"name": "trellis-controller", "namespace": "trellis-system"},
        "spec": {
            "holderIdentity": "pod-other", "leaseDurationSeconds": 3600,
            "acquireTime": "2025-01-01T00:00:00.000000Z",
            "renewTime": "2025-01-01T00:00:00.000000Z", "leaseTransitions": 0,
        },
    }))
    .unwrap();
    api.apply(&held);
    let elector = Elector::start(&api, fast("pod-a"));
    let publishing = Publishing::start(
        &api,
        settings(Duration::from_millis(100)),
        ROOT_A,
        elector.leader.clone(),
    )
    .await;

    // Resyncs, a rotation, a new namespace: nothing is written by a follower.
    tokio::time::sleep(Duration::from_millis(300)).await;
    publishing.bundle.send_replace(rotated());
    api.apply(&namespace("new-team"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!elector.leads());
    assert!(
        api.writes("configmaps").is_empty(),
        "{:?}",
        api.writes("configmaps")
    );
    assert!(
        webhook_writes(&api).is_empty(),
        "{:?}",
        webhook_writes(&api)
    );
    assert!(has_line(
        &publishing.metrics(),
        "trellis_trust_bundle_namespaces 0"
    ));

    // The other replica releases the Lease: this one leads, and publishes everything.
    let mut released = held;
    if let Some(spec) = released.spec.as_mut() {
        spec.holder_identity = None;
    }
    api.apply(&released);
    elector.until(true).await;
    let mut everywhere = MESHED.to_vec();
    everywhere.push("new-team");
    until_published(&api, &everywhere, &rotated()).await;
    publishing
        .until_metric("trellis_trust_bundle_namespaces 5")
        .await;

    // Stepping down stops the writes again.
    let elector = elector.stop().await;
    assert!(!elector.leads());
    let writes = (api.writes("configmaps").len(), webhook_writes(&api).len());
    publishing.bundle.send_replace(ROOT_B.to_owned());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        (api.writes("configmaps").len(), webhook_writes(&api).len()),
        writes
    );
    assert!(has_line(
        &publishing.metrics(),
        "trellis_trust_bundle_namespaces 0"
    ));
    publishing.stop().await;
}

#[tokio::test]
async fn a_conflict_on_the_webhook_write_is_read_again_and_retried() {
    let api = cluster(&all_namespaces(), true);
    // Another client edits the injector configuration just before our write lands.
    let mut edited = mutating(INJECTOR, &["inject.trellis.dev", "inject-v2.trellis.dev"]);
    edited.metadata.labels = Some([("edited-by".to_owned(), "someone-else".to_owned())].into());
    api.interpose_next_write(&edited);
    let (_leader, leading) = leadership(true);
    let publishing =
        Publishing::start(&api, settings(Duration::from_secs(3600)), ROOT_A, leading).await;

    until_published(&api, &MESHED, ROOT_A).await;
    let writes: Vec<_> = api
        .writes("mutatingwebhookconfigurations")
        .into_iter()
        .map(|w| (w.method, w.code))
        .collect();
    assert_eq!(writes, [(Method::PUT, 409), (Method::PUT, 200)]);
    // The other client's edit survives: the retry started from a fresh read.
    assert_eq!(
        injector(&api)["metadata"]["labels"]["edited-by"],
        "someone-else"
    );
    let metrics = publishing.metrics();
    for line in [
        write_counter("webhook", "conflict", 1),
        write_counter("webhook", "updated", 2),
        write_counter("webhook", "failed", 0),
    ] {
        assert!(has_line(&metrics, &line), "missing {line:?} in\n{metrics}");
    }
    publishing.stop().await;
}

#[tokio::test]
async fn a_config_map_created_by_another_replica_first_is_read_again_and_replaced() {
    let api = cluster(&["trellis-system"], true);
    // Just before our create, another (older) replica creates it with the old bundle.
    let stale: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": CM, "namespace": "trellis-system",
            "labels": {"app.kubernetes.io/managed-by": "trellis"},
        },
        "data": {KEY: ROOT_B},
    }))
    .unwrap();
    api.interpose_next_write(&stale);
    let (_leader, leading) = leadership(true);
    let publishing =
        Publishing::start(&api, settings(Duration::from_secs(3600)), ROOT_A, leading).await;

    until_published(&api, &["trellis-system"], ROOT_A).await;
    assert_eq!(
        config_map_writes(&api),
        [
            (Method::POST, "trellis-system".to_owned(), 409),
            (Method::PUT, "trellis-system".to_owned(), 200),
        ]
    );
    publishing
        .until_metric(&write_counter("configmap", "conflict", 1))
        .await;
    publishing.stop().await;
}

#[tokio::test]
async fn an_api_outage_is_retried_until_everything_converges() {
    let api = cluster(&all_namespaces(), true);
    let resources = [
        "configmaps",
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
    ];
    let (_leader, leading) = leadership(true);
    // After the source's first list (it watches a ConfigMap too).
    let publishing = Publishing::start_after(
        &api,
        settings(Duration::from_secs(3600)),
        ROOT_A,
        leading,
        || {
            for resource in resources {
                api.outage(resource, Some(503));
            }
        },
    )
    .await;

    // Failing, retried (the counters keep rising), never written, the loop alive.
    eventually("repeated failures", || {
        let metrics = publishing.metrics();
        let failed = |target: &str| {
            let line = write_counter(target, "failed", 0);
            let prefix = line.trim_end_matches('0');
            (metrics.lines())
                .find_map(|l| l.strip_prefix(prefix)?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (failed("configmap") >= 8 && failed("webhook") >= 4).then_some(())
    })
    .await;
    let succeeded = |w: &Write| w.code < 300;
    assert!(!api.writes("configmaps").iter().any(succeeded));
    assert!(!webhook_writes(&api).iter().any(succeeded));
    assert!(has_line(
        &publishing.metrics(),
        "trellis_trust_bundle_namespaces 0"
    ));

    for resource in resources {
        api.outage(resource, None);
    }
    until_published(&api, &MESHED, ROOT_A).await;
    publishing
        .until_metric("trellis_trust_bundle_namespaces 4")
        .await;
    publishing
        .until_metric("trellis_trust_bundle_webhook_configurations 2")
        .await;
    publishing.stop().await;
}

#[tokio::test]
async fn a_deleted_config_map_is_recreated_by_the_resync() {
    let api = cluster(&all_namespaces(), true);
    let (_leader, leading) = leadership(true);
    let publishing =
        Publishing::start(&api, settings(Duration::from_millis(200)), ROOT_A, leading).await;
    until_published(&api, &MESHED, ROOT_A).await;

    // Deleting a ConfigMap changes no Namespace: only the resync can notice.
    api.remove("configmaps", "payments", CM)
        .expect("it existed");
    // And an entry's caBundle wiped by a `helm upgrade` that templated none.
    let mut wiped = mutating(INJECTOR, &["inject.trellis.dev", "inject-v2.trellis.dev"]);
    wiped.metadata.resource_version = None;
    api.apply(&wiped);
    until_published(&api, &MESHED, ROOT_A).await;
    let creates: Vec<_> = config_map_writes(&api)
        .into_iter()
        .filter(|(method, ns, _)| method == Method::POST && ns == "payments")
        .collect();
    assert_eq!(creates.len(), 2, "{creates:?}");
    publishing
        .until_metric(&write_counter("configmap", "created", 5))
        .await;
    publishing.stop().await;
}

#[tokio::test]
async fn a_missing_webhook_configuration_is_set_once_it_appears_without_an_error_storm() {
    // The validator is installed, the injector not (yet).
    let api = cluster(&all_namespaces(), false);
    api.apply(&validating(VALIDATOR, &["config.trellis.dev"]));
    let (_leader, leading) = leadership(true);
    let resync = Duration::from_millis(150);
    let publishing = Publishing::start(&api, settings(resync), ROOT_A, leading).await;

    eventually("the ConfigMaps and the validator", || {
        let done = MESHED.iter().all(|ns| holds(&api, ns, ROOT_A))
            && ca_bundles(&validator(&api)) == [Some(ROOT_A.to_owned())];
        done.then_some(())
    })
    .await;
    tokio::time::sleep(resync * 2).await;
    let metrics = publishing.metrics();
    assert!(
        has_line(&metrics, &write_counter("webhook", "failed", 0)),
        "{metrics}"
    );
    assert!(has_line(
        &metrics,
        "trellis_trust_bundle_webhook_configurations 1"
    ));
    assert!(api.writes("mutatingwebhookconfigurations").is_empty());

    api.apply(&mutating(
        INJECTOR,
        &["inject.trellis.dev", "inject-v2.trellis.dev"],
    ));
    until_published(&api, &MESHED, ROOT_A).await;
    publishing
        .until_metric("trellis_trust_bundle_webhook_configurations 2")
        .await;
    let names: BTreeSet<_> = config_map_writes(&api).into_iter().map(|w| w.1).collect();
    assert_eq!(names, MESHED.map(str::to_owned).into());
    publishing.stop().await;
}
