//! Config Events against the API stand-in: what the leader writes when a ConfigMap is
//! rejected or a good one applied again, and what it (or a follower) does not write.

use std::time::Duration;

use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;
use trellis_kube::events::{ConfigEvents, EventSettings};

use crate::leader::{Elector, fast};
use crate::support::{eventually, has_line, metrics_text};
use trellis_kube::stand_in::ApiStandIn;

const NS: &str = "trellis-system";
const BAD_MODE: &str =
    "mesh.yaml: mtls.mode: unknown variant `strikt`, expected `strict` or `permissive`";
const BAD_DEBOUNCE: &str = "mesh.yaml: discovery.debounce: invalid duration `fast`";

/// The stand-in with the mesh ConfigMap in it.
fn api_with_config_map() -> ApiStandIn {
    let api = ApiStandIn::default();
    let config_map = json!({
        "metadata": {"name": "trellis-config", "namespace": NS, "uid": "cm-uid-1"},
        "data": {"mesh.yaml": "mtls:\n  mode: strikt\n"},
    });
    api.apply(
        &serde_json::from_value::<k8s_openapi::api::core::v1::ConfigMap>(config_map).unwrap(),
    );
    api
}

fn start(
    api: &ApiStandIn,
    settings: EventSettings,
    leader: watch::Receiver<bool>,
) -> (ConfigEvents, Registry) {
    let events = ConfigEvents::new(api.client(), settings, leader);
    let mut registry = Registry::default();
    events.register_metrics(&mut registry);
    (events, registry)
}

/// The bodies of Events created so far, once there are `n`.
async fn until_events(api: &ApiStandIn, n: usize) -> Vec<Value> {
    let created = || {
        let writes = api.writes("events");
        let created: Vec<Value> = writes
            .into_iter()
            .filter(|w| w.code == 201)
            .map(|w| w.body)
            .collect();
        created
    };
    eventually(&format!("{n} Events"), || {
        let created = created();
        (created.len() >= n).then_some(created)
    })
    .await
}

/// `(type, reason, note)` of each Event.
fn brief(events: &[Value]) -> Vec<(&str, &str, &str)> {
    events
        .iter()
        .map(|e| {
            let field = |f: &str| e[f].as_str().unwrap_or_default();
            (field("type"), field("reason"), field("note"))
        })
        .collect()
}

#[tokio::test]
async fn a_rejection_is_one_warning_event_on_the_config_map_naming_the_field() {
    let api = api_with_config_map();
    let (_leader, rx) = watch::channel(true);
    let (events, registry) = start(&api, EventSettings::new("pod-a"), rx);

    events.rejected(BAD_MODE);
    events.rejected(BAD_MODE); // identical, within the window: not written again
    events.rejected(BAD_DEBOUNCE); // a different field: written, after the first
    let written = until_events(&api, 2).await;

    let event = &written[0];
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidConfig");
    assert_eq!(event["note"], BAD_MODE);
    assert_eq!(event["action"], "LoadConfig");
    assert_eq!(
        event["regarding"],
        json!({
            "apiVersion": "v1", "kind": "ConfigMap", "namespace": NS,
            "name": "trellis-config", "uid": "cm-uid-1",
        })
    );
    assert_eq!(event["reportingController"], "trellis.dev/controller");
    assert_eq!(event["reportingInstance"], "pod-a");
    assert!(event["eventTime"].is_string());
    assert_eq!(event["metadata"]["namespace"], NS);
    assert!(
        event["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("trellis-config.")
    );
    let paths: Vec<_> = api
        .writes("events")
        .into_iter()
        .map(|w| w.namespace)
        .collect();
    assert_eq!(paths, [Some(NS.to_owned()), Some(NS.to_owned())]);

    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        brief(&until_events(&api, 2).await),
        [
            ("Warning", "InvalidConfig", BAD_MODE),
            ("Warning", "InvalidConfig", BAD_DEBOUNCE),
        ]
    );
    assert_eq!(api.writes("events").len(), 2, "only two POSTs");
    assert!(has_line(
        &metrics_text(&registry),
        "trellis_kube_event_write_errors_total 0"
    ));
}

#[tokio::test]
async fn repeats_wait_out_the_window_and_an_applied_config_is_reported_once() {
    let api = api_with_config_map();
    let (_leader, rx) = watch::channel(true);
    let settings = EventSettings {
        repeat_window: Duration::from_millis(300),
        ..EventSettings::new("pod-a")
    };
    let (events, _registry) = start(&api, settings, rx);

    events.rejected(BAD_MODE);
    events.rejected(BAD_MODE);
    until_events(&api, 1).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    events.rejected(BAD_MODE); // the window has passed
    until_events(&api, 2).await;

    events.applied("config version 4");
    events.applied("config version 5"); // not after a rejection: nothing
    // The applied config ended the window: the same mistake again is reported again.
    events.rejected(BAD_MODE);
    let written = until_events(&api, 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(api.writes("events").len(), 4);
    assert_eq!(
        brief(&written),
        [
            ("Warning", "InvalidConfig", BAD_MODE),
            ("Warning", "InvalidConfig", BAD_MODE),
            ("Normal", "ConfigApplied", "config version 4"),
            ("Warning", "InvalidConfig", BAD_MODE),
        ]
    );
}

#[tokio::test]
async fn a_follower_writes_no_events() {
    let api = api_with_config_map();
    let (leader, rx) = watch::channel(false);
    let (events, _registry) = start(&api, EventSettings::new("pod-a"), rx);

    events.rejected(BAD_MODE);
    // Leading from now on: the rejection above is not written late, the next one is.
    leader.send_replace(true);
    events.rejected(BAD_DEBOUNCE);
    let written = until_events(&api, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(api.writes("events").len(), 1);
    assert_eq!(
        brief(&written),
        [("Warning", "InvalidConfig", BAD_DEBOUNCE)]
    );
}

#[tokio::test]
async fn of_two_replicas_only_the_lease_holder_writes() {
    let api = api_with_config_map();
    let a = Elector::start(&api, fast("pod-a"));
    let b = Elector::start(&api, fast("pod-b"));
    let leader = eventually("a leader", || match (a.leads(), b.leads()) {
        (true, false) => Some("pod-a"),
        (false, true) => Some("pod-b"),
        _ => None,
    })
    .await;
    let (on_a, _ra) = start(&api, EventSettings::new("pod-a"), a.leader.clone());
    let (on_b, _rb) = start(&api, EventSettings::new("pod-b"), b.leader.clone());

    // Both replicas see the same bad ConfigMap.
    on_a.rejected(BAD_MODE);
    on_b.rejected(BAD_MODE);
    let written = until_events(&api, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(api.writes("events").len(), 1);
    assert_eq!(written[0]["reportingInstance"], leader);
    assert_eq!(written[0]["note"], BAD_MODE);
}

#[tokio::test]
async fn a_failed_write_is_counted_and_the_next_identical_rejection_retried() {
    let api = api_with_config_map();
    api.fail_next("events", 1, 500);
    let (_leader, rx) = watch::channel(true);
    let (events, registry) = start(&api, EventSettings::new("pod-a"), rx);

    events.rejected(BAD_MODE);
    eventually("the failed write counted", || {
        has_line(
            &metrics_text(&registry),
            "trellis_kube_event_write_errors_total 1",
        )
        .then_some(())
    })
    .await;
    assert_eq!(api.writes("events")[0].code, 500);

    events.rejected(BAD_MODE);
    let written = until_events(&api, 1).await;
    assert_eq!(brief(&written), [("Warning", "InvalidConfig", BAD_MODE)]);
    let codes: Vec<u16> = api.writes("events").iter().map(|w| w.code).collect();
    assert_eq!(codes, [500, 201]);
}
