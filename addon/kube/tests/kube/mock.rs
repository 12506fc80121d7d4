//! The ConfigMap watch over a scripted `tower_test::mock` API: every ConfigMap request is
//! recorded (to check what kube-rs's watcher sends) and answered from a script whose
//! steps the test releases one by one, so each state is observed before the next.

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tower_test::mock;
use trellis_kube::Kind;

use crate::support::{PATIENCE, Running};
use trellis_kube::stand_in::event_line;

type SendResponse = mock::SendResponse<Response<Body>>;

fn response(body: String) -> Response<Body> {
    Response::new(Body::from(body.into_bytes()))
}

fn list(kind: &str, items: Vec<Value>, rv: &str) -> Response<Body> {
    let list = json!({
        "kind": kind, "apiVersion": "v1",
        "metadata": {"resourceVersion": rv},
        "items": items,
    });
    response(list.to_string())
}

fn config_map(value: &str, rv: &str) -> Value {
    json!({
        "kind": "ConfigMap", "apiVersion": "v1",
        "metadata": {
            "name": "trellis-config", "namespace": "trellis-system", "resourceVersion": rv,
        },
        "data": {"mesh.yaml": value},
    })
}

/// The script for the ConfigMap's requests, in order; every other kind gets an empty list
/// and a watch that stays open.
async fn serve(
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
    log: mpsc::UnboundedSender<String>,
    mut gates: Vec<oneshot::Receiver<()>>,
) {
    let mut open: Vec<SendResponse> = Vec::new();
    let mut step = 0;
    while let Some((req, send)) = handle.next_request().await {
        let uri = req.uri().clone();
        let watch = uri.query().unwrap_or_default().contains("watch=true");
        if !uri.path().ends_with("/configmaps") {
            if watch {
                open.push(send);
            } else {
                send.send_response(list("List", vec![], "1"));
            }
            continue;
        }
        let _ = log.send(uri.to_string());
        step += 1;
        let body = match step {
            // The initial list: version 1 of the data.
            1 => Some(list("ConfigMapList", vec![config_map("v: 1", "10")], "10")),
            // The watch from that list: a change, a bookmark, then 410 Gone.
            2 => {
                let mut events = Vec::new();
                events.extend_from_slice(&event_line("MODIFIED", &config_map("v: 2", "11")));
                let bookmark = json!({
                    "kind": "ConfigMap", "apiVersion": "v1",
                    "metadata": {"resourceVersion": "12"},
                });
                events.extend_from_slice(&event_line("BOOKMARK", &bookmark));
                let gone = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "too old resource version", "reason": "Expired", "code": 410,
                });
                events.extend_from_slice(&event_line("ERROR", &gone));
                Some(Response::new(Body::from(events)))
            }
            // The re-list: the ConfigMap was deleted meanwhile.
            3 => Some(list("ConfigMapList", vec![], "13")),
            // The new watch stays open.
            _ => None,
        };
        match body {
            Some(body) if !gates.is_empty() => {
                let gate = gates.remove(0);
                // Answered from its own task so that other kinds are served meanwhile.
                tokio::spawn(async move {
                    let _ = gate.await;
                    send.send_response(body);
                });
            }
            Some(body) => send.send_response(body),
            None => open.push(send),
        }
    }
}

#[tokio::test]
async fn config_map_watch_follows_a_scripted_api() {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (log_tx, mut log) = mpsc::unbounded_channel();
    let mut releases = Vec::new();
    let mut gates = Vec::new();
    for _ in 0..3 {
        let (tx, rx) = oneshot::channel::<()>();
        releases.push(tx);
        gates.push(rx);
    }
    let mut releases = releases.into_iter();
    let mut release = move || {
        if let Some(r) = releases.next() {
            let _ = r.send(());
        }
    };
    tokio::spawn(serve(handle, log_tx, gates));
    let running = Running::start(
        kube::Client::new(service, "default"),
        Duration::from_millis(20),
    );

    release();
    running.until_config(Some(&[("mesh.yaml", "v: 1")])).await;
    let first = running.ready().await;
    assert_eq!(first.version, 1);
    assert!(first.services.is_empty());

    release();
    running.until_config(Some(&[("mesh.yaml", "v: 2")])).await;
    let status = running
        .until_status("the 410", |s| s.kinds[&Kind::ConfigMap].errors == 1)
        .await;
    let error = status.kinds[&Kind::ConfigMap]
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(error.contains("too old resource version"), "{error}");

    release();
    running.until_config(None).await;

    let mut requests = Vec::new();
    while requests.len() < 4 {
        let next = tokio::time::timeout(PATIENCE, log.recv()).await;
        match next {
            Ok(Some(uri)) => requests.push(uri),
            _ => panic!("expected 4 ConfigMap requests, got {requests:#?}"),
        }
    }
    let expected: [&[&str]; 4] = [
        &["limit=500"],
        &[
            "watch=true",
            "allowWatchBookmarks=true",
            "resourceVersion=10",
        ],
        &["limit=500"],
        &["watch=true", "resourceVersion=13"],
    ];
    for (uri, parts) in requests.iter().zip(expected) {
        // Only the mesh ConfigMap, in its namespace.
        assert!(
            uri.starts_with("/api/v1/namespaces/trellis-system/configmaps?")
                && uri.contains("fieldSelector=metadata.name%3Dtrellis-config"),
            "{uri}"
        );
        for part in parts {
            assert!(uri.contains(part), "{uri} lacks {part}");
        }
        assert_eq!(
            uri.contains("watch=true"),
            parts[0] == "watch=true",
            "{uri}"
        );
    }
    assert_eq!(running.version(), 1, "config changes publish no snapshot");
    running.stop().await;
}
