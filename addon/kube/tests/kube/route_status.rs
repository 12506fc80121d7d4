//! The route status writer against the API stand-in: what a mesh HTTPRoute's
//! `status.parents` says (accepted or refused by field, backends resolved or not), that it
//! follows the route's generation and the Services, that other controllers' entries are
//! kept (a conflicting write of theirs included), and what is not written (nothing
//! changed, or a replica that does not lead).

use std::time::Duration;

use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use trellis_kube::route_status::{CONTROLLER_NAME, RouteStatusSettings, RouteStatusWriter};
use trellis_kube::stand_in::{ApiStandIn, Write};

use crate::support::{PATIENCE, Running, eventually, has_line, metrics_text, namespace, service};

const RESOURCE: &str = "httproutes";
const RESYNC: Duration = Duration::from_millis(100);
const THEIRS: &str = "example.com/gateway-controller";

/// A writer running against the stand-in, with the source that feeds it.
struct Writing {
    registry: Registry,
    source: Running,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Writing {
    /// Starts the source, waits for its first snapshot, then starts the writer.
    async fn start(api: &ApiStandIn, leader: watch::Receiver<bool>) -> Writing {
        let source = Running::start(api.client(), Duration::from_millis(20));
        source.ready().await;
        let settings = RouteStatusSettings {
            resync: RESYNC,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
            request_timeout: Duration::from_secs(2),
        };
        let mut registry = Registry::default();
        let writer = RouteStatusWriter::new(api.client(), settings).with_metrics(&mut registry);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(writer.run(leader, source.handle.clone(), async move {
            let _ = stopped.await;
        }));
        Writing {
            registry,
            source,
            stop: Some(stop),
            task,
        }
    }

    fn metrics(&self) -> String {
        metrics_text(&self.registry)
    }

    fn writes(&self, result: &str, n: u64) -> bool {
        let line = format!("trellis_route_status_writes_total{{result=\"{result}\"}} {n}");
        has_line(&self.metrics(), &line)
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("writer did not stop")
            .expect("writer panicked");
        self.source.stop().await;
    }
}

fn http_route(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": spec,
    })
}

fn web_parent() -> Value {
    json!({"group": "", "kind": "Service", "name": "web", "port": 80})
}

/// Service `web` port 80 split between `backends`, equally.
fn split(backends: &[&str]) -> Value {
    let refs: Vec<Value> = backends
        .iter()
        .map(|b| json!({"name": b, "port": 80}))
        .collect();
    json!({"parentRefs": [web_parent()], "rules": [{"backendRefs": refs}]})
}

/// Namespace `demo` with Services `services` (each with port 80).
fn cluster(services: &[&str]) -> ApiStandIn {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    for (i, name) in services.iter().enumerate() {
        api.apply(&service(
            "demo",
            name,
            &format!("10.96.0.{}", i + 10),
            &[("http", 80)],
        ));
    }
    api
}

/// The stored `status` of route `demo/<name>`.
fn status(api: &ApiStandIn, name: &str) -> Value {
    api.get(RESOURCE, "demo", name)
        .map(|r| r["status"].clone())
        .unwrap_or(Value::Null)
}

/// Our entries in a status.
fn ours(status: &Value) -> Vec<Value> {
    (status["parents"].as_array().into_iter().flatten())
        .filter(|e| e["controllerName"] == CONTROLLER_NAME)
        .cloned()
        .collect()
}

/// Waits until the stored status of `demo/<name>` satisfies `want`; returns it.
async fn until_status(
    api: &ApiStandIn,
    name: &str,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            let now = status(api, name);
            if want(&now) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!(
            "timed out waiting for {what}; status: {:#}",
            status(api, name)
        )
    })
}

/// Our `(type, status, reason)` of each condition of our first entry.
fn verdicts(status: &Value) -> Vec<(String, String, String)> {
    let entries = ours(status);
    let conditions = entries
        .first()
        .and_then(|e| e["conditions"].as_array().cloned())
        .unwrap_or_default();
    conditions
        .iter()
        .map(|c| {
            let text = |f: &str| c[f].as_str().unwrap_or_default().to_owned();
            (text("type"), text("status"), text("reason"))
        })
        .collect()
}

/// `status` without the conditions' `lastTransitionTime`.
fn undated(status: &Value) -> Value {
    let mut status = status.clone();
    for entry in status["parents"].as_array_mut().into_iter().flatten() {
        for condition in entry["conditions"].as_array_mut().into_iter().flatten() {
            if let Some(fields) = condition.as_object_mut() {
                fields.remove("lastTransitionTime");
            }
        }
    }
    status
}

fn verdict(kind: &str, status: &str, reason: &str) -> (String, String, String) {
    (kind.to_owned(), status.to_owned(), reason.to_owned())
}

/// The route status PUTs, as `(answer code)`.
fn status_writes(api: &ApiStandIn) -> Vec<u16> {
    let writes = api.writes(RESOURCE);
    let status = writes
        .iter()
        .filter(|w: &&Write| w.subresource.as_deref() == Some("status"));
    status.map(|w| w.code).collect()
}

#[tokio::test]
async fn an_accepted_route_gets_both_conditions_at_its_generation() {
    let api = cluster(&["web", "web-v1", "web-v2"]);
    api.apply_json(http_route("web-canary", split(&["web-v1", "web-v2"])))
        .unwrap();
    let (_leader, leading) = watch::channel(true);
    let writing = Writing::start(&api, leading).await;

    let written = until_status(&api, "web-canary", "our entry", |s| !ours(s).is_empty()).await;
    let since = written["parents"][0]["conditions"][0]["lastTransitionTime"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(since.len() == 20 && since.ends_with('Z'), "{since}");
    let entry = |generation: i64| {
        json!({"parents": [{
            "parentRef": {"group": "", "kind": "Service", "name": "web", "port": 80},
            "controllerName": "trellis.dev/mesh-controller",
            "conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted",
                 "message": "applied by the mesh's proxies",
                 "observedGeneration": generation, "lastTransitionTime": since},
                {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs",
                 "message": "every backend is an existing Service of the route's namespace",
                 "observedGeneration": generation, "lastTransitionTime": since},
            ],
        }]})
    };
    assert_eq!(written, entry(1));
    // The PUT went to the status subresource, with the resourceVersion it read.
    let put = &api.writes(RESOURCE)[0];
    assert_eq!(
        (put.method.as_str(), put.subresource.as_deref(), put.code),
        ("PUT", Some("status"), 200)
    );
    assert!(
        put.body["metadata"]["resourceVersion"].is_string(),
        "{:#}",
        put.body
    );

    // A spec change is a new generation: observed, the transition times kept.
    api.apply_json(http_route("web-canary", split(&["web-v2"])))
        .unwrap();
    let stored = api.get(RESOURCE, "demo", "web-canary").unwrap();
    assert_eq!(stored["metadata"]["generation"], 2);
    let rewritten = until_status(&api, "web-canary", "generation 2", |s| {
        s["parents"][0]["conditions"][0]["observedGeneration"] == 2
    })
    .await;
    assert_eq!(rewritten, entry(2));
    assert_eq!(status_writes(&api), [200, 200]);
    eventually("two ok writes counted", || {
        writing.writes("ok", 2).then_some(())
    })
    .await;
    writing.stop().await;
}

#[tokio::test]
async fn a_regular_expression_match_is_not_accepted_and_the_field_named() {
    let api = cluster(&["web", "web-v2"]);
    api.apply_json(http_route(
        "regex",
        json!({
            "parentRefs": [web_parent()],
            "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]+"}}],
                       "backendRefs": [{"name": "web-v2", "port": 80}]}],
        }),
    ))
    .unwrap();
    let (_leader, leading) = watch::channel(true);
    let writing = Writing::start(&api, leading).await;

    let written = until_status(&api, "regex", "our entry", |s| !ours(s).is_empty()).await;
    assert_eq!(
        verdicts(&written),
        [
            verdict("Accepted", "False", "UnsupportedValue"),
            verdict("ResolvedRefs", "True", "ResolvedRefs"),
        ]
    );
    assert_eq!(
        written["parents"][0]["conditions"][0]["message"],
        "not applied, Trellis does not support: spec.rules[0].matches[0].path.type: \
         RegularExpression is not supported; use Exact or PathPrefix"
    );
    // Left out of the snapshot, as before.
    assert!(writing.source.snapshots.borrow().routes.is_empty());
    writing.stop().await;
}

#[tokio::test]
async fn a_missing_backend_is_not_resolved_until_its_service_exists() {
    let api = cluster(&["web", "web-v1"]);
    api.apply_json(http_route("web-canary", split(&["web-v1", "web-v2"])))
        .unwrap();
    let (_leader, leading) = watch::channel(true);
    let writing = Writing::start(&api, leading).await;

    let missing = until_status(&api, "web-canary", "our entry", |s| !ours(s).is_empty()).await;
    assert_eq!(
        verdicts(&missing),
        [
            verdict("Accepted", "True", "Accepted"),
            verdict("ResolvedRefs", "False", "BackendNotFound"),
        ]
    );
    let resolved = &missing["parents"][0]["conditions"][1];
    assert_eq!(
        resolved["message"],
        "spec.rules[0].backendRefs[1]: Service demo/web-v2 not found"
    );

    // The Service is created: the condition flips, Accepted keeps its transition time.
    api.apply(&service("demo", "web-v2", "10.96.0.30", &[("http", 80)]));
    let found = until_status(&api, "web-canary", "ResolvedRefs True", |s| {
        verdicts(s).get(1) == Some(&verdict("ResolvedRefs", "True", "ResolvedRefs"))
    })
    .await;
    assert_eq!(
        found["parents"][0]["conditions"][0], missing["parents"][0]["conditions"][0],
        "Accepted did not change"
    );
    assert_eq!(status_writes(&api), [200, 200]);
    writing.stop().await;
}

#[tokio::test]
async fn another_controllers_entry_is_kept_even_when_written_in_between() {
    let api = cluster(&["web", "web-v1"]);
    let spec = json!({
        "parentRefs": [
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"},
            web_parent(),
        ],
        "rules": [{"backendRefs": [{"name": "web-v1", "port": 80}]}],
    });
    api.apply_json(http_route("shared", spec.clone())).unwrap();
    let theirs = json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"},
        "controllerName": THEIRS,
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "ok", "observedGeneration": 1,
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    });
    // The gateway controller writes its entry between our read and our write.
    let mut theirs_written = http_route("shared", spec.clone());
    theirs_written["metadata"]["generation"] = json!(1);
    theirs_written["status"] = json!({"parents": [theirs]});
    api.interpose_next_write_json(theirs_written).unwrap();
    let (_leader, leading) = watch::channel(true);
    let writing = Writing::start(&api, leading).await;

    let both = until_status(&api, "shared", "both entries", |s| !ours(s).is_empty()).await;
    let parents = both["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{both:#}");
    assert_eq!(parents[0], theirs, "theirs untouched, in place");
    assert_eq!(parents[1]["parentRef"], web_parent());
    assert_eq!(
        status_writes(&api),
        [409, 200],
        "read again after the conflict"
    );
    eventually("the conflict counted", || {
        (writing.writes("conflict", 1) && writing.writes("ok", 1)).then_some(())
    })
    .await;

    // They change their entry: ours is still right, so nothing is written.
    let mut updated = theirs.clone();
    updated["conditions"][0]["message"] = json!("still ok");
    let ours_now = parents[1].clone();
    api.set_status(
        RESOURCE,
        "demo",
        "shared",
        json!({"parents": [updated.clone(), ours_now]}),
    )
    .unwrap();
    tokio::time::sleep(RESYNC * 3).await;
    assert_eq!(status_writes(&api), [409, 200]);

    // The Service parent is dropped from the spec: our entry goes, theirs stays.
    let gateway_only = json!({
        "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"}],
        "rules": [{"backendRefs": [{"name": "web-v1", "port": 80}]}],
    });
    api.apply_json(http_route("shared", gateway_only)).unwrap();
    let left = until_status(&api, "shared", "ours removed", |s| ours(s).is_empty()).await;
    assert_eq!(left, json!({"parents": [updated]}));
    writing.stop().await;
}

#[tokio::test]
async fn nothing_is_written_when_nothing_changed() {
    let api = cluster(&["web", "web-v1"]);
    api.apply_json(http_route("web-canary", split(&["web-v1"])))
        .unwrap();
    let (_leader, leading) = watch::channel(true);
    let writing = Writing::start(&api, leading).await;
    let first = until_status(&api, "web-canary", "our entry", |s| !ours(s).is_empty()).await;

    // Resyncs, and changes that do not touch what the status says (another Service, a
    // label on the route), write nothing.
    tokio::time::sleep(RESYNC * 4).await;
    api.apply(&service("demo", "unrelated", "10.96.0.40", &[("http", 80)]));
    let mut labelled = http_route("web-canary", split(&["web-v1"]));
    labelled["metadata"]["labels"] = json!({"team": "web"});
    api.apply_json(labelled).unwrap();
    tokio::time::sleep(RESYNC * 4).await;
    assert_eq!(status_writes(&api), [200]);
    assert_eq!(status(&api, "web-canary"), first);
    let metrics = writing.metrics();
    for line in [
        "trellis_route_status_writes_total{result=\"ok\"} 1",
        "trellis_route_status_writes_total{result=\"conflict\"} 0",
        "trellis_route_status_writes_total{result=\"error\"} 0",
    ] {
        assert!(has_line(&metrics, line), "missing {line:?} in\n{metrics}");
    }

    // Someone wipes the status: written back at once (dated anew: nothing of the old
    // entry is left to keep the times from).
    api.set_status(RESOURCE, "demo", "web-canary", Value::Null)
        .unwrap();
    let repaired = until_status(&api, "web-canary", "repaired", |s| !ours(s).is_empty()).await;
    assert_eq!(undated(&repaired), undated(&first));
    assert_eq!(status_writes(&api), [200, 200]);
    writing.stop().await;
}

#[tokio::test]
async fn a_follower_writes_nothing_until_it_leads() {
    let api = cluster(&["web", "web-v1"]);
    api.apply_json(http_route("web-canary", split(&["web-v1"])))
        .unwrap();
    let (leader, leading) = watch::channel(false);
    let writing = Writing::start(&api, leading).await;

    tokio::time::sleep(RESYNC * 4).await;
    api.apply_json(http_route("web-canary", split(&["web-v1", "web"])))
        .unwrap();
    tokio::time::sleep(RESYNC * 4).await;
    assert!(api.writes(RESOURCE).is_empty(), "a follower wrote");
    assert_eq!(status(&api, "web-canary"), Value::Null);
    assert!(writing.writes("ok", 0));

    // Leadership gained: the status is written at once.
    leader.send_replace(true);
    let written = until_status(&api, "web-canary", "our entry", |s| !ours(s).is_empty()).await;
    assert_eq!(
        written["parents"][0]["conditions"][0]["observedGeneration"],
        2
    );
    writing.stop().await;
}

#[tokio::test]
async fn failures_are_retried_with_backoff() {
    let api = cluster(&["web", "web-v1"]);
    api.apply_json(http_route("web-canary", split(&["web-v1"])))
        .unwrap();
    let (leader, leading) = watch::channel(false);
    let writing = Writing::start(&api, leading).await;
    // The source's watch stays open; every other request for routes fails.
    api.outage(RESOURCE, Some(500));
    leader.send_replace(true);
    eventually("errors counted", || {
        (!writing.writes("error", 0) && !writing.writes("error", 1)).then_some(())
    })
    .await;
    assert_eq!(status(&api, "web-canary"), Value::Null);
    api.outage(RESOURCE, None);
    until_status(&api, "web-canary", "written after the outage", |s| {
        !ours(s).is_empty()
    })
    .await;
    writing.stop().await;
}
