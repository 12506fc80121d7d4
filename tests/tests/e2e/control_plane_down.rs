//! The proxy keeps serving known destinations on its last good view while the control
//! plane is gone, and reconnects when it is back.

use std::time::Duration;

use trellis_e2e::{http_get, wait_until};

use crate::request_path::start_mesh;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_keeps_serving_when_the_control_plane_is_killed() {
    let mut m = start_mesh().await;
    assert_eq!(
        http_get(m.client.outbound, "web.demo", "/before")
            .await
            .unwrap()
            .0,
        200
    );
    let connected = "trellis_proxy_discovery_connected";
    assert_eq!(m.client.metric(connected).await, Some(1.0));

    m.cp.kill().await;
    wait_until(Duration::from_secs(10), || async {
        m.client.metric(connected).await == Some(0.0)
    })
    .await
    .expect("the proxy did not notice the control plane was gone");
    for i in 0..5 {
        let (status, _, body) = http_get(m.client.outbound, "web.demo", &format!("/during/{i}"))
            .await
            .unwrap();
        assert_eq!(
            status,
            200,
            "request {i} failed with the control plane down: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let (ready, _, _) = http_get(m.client.admin, "localhost", "/ready")
        .await
        .unwrap();
    assert_eq!(
        ready, 200,
        "a proxy with a certificate and a view stays ready"
    );
    assert!(
        m.client.wait_log("keeping the last good view").await,
        "{}",
        m.client.log()
    );

    // Back again: the proxy reconnects with backoff and acks the new stream's full view.
    m.cp.restart().await;
    wait_until(Duration::from_secs(15), || async {
        m.client.metric(connected).await == Some(1.0)
    })
    .await
    .unwrap_or_else(|()| panic!("the proxy did not reconnect; log:\n{}", m.client.log()));
    assert_eq!(
        http_get(m.client.outbound, "web.demo", "/after")
            .await
            .unwrap()
            .0,
        200
    );
    let paths: Vec<_> = m
        .web_app
        .received()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(paths.len(), 7, "{paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_reach_proxies_and_a_bad_edit_keeps_the_last_good_state() {
    let m = start_mesh().await;
    let version = |cfg: &serde_json::Value| cfg["discovery"]["version"].as_u64().unwrap();
    let v1 = version(&m.client.config().await);

    // A new service appears in the proxy's view.
    let extra = r#"
apiVersion: v1
kind: Service
metadata: { name: extra, namespace: demo }
spec:
  selector: { app: web }
  ports: [{ name: http, port: 8080 }]
"#;
    std::fs::write(m.cp.config_dir().join("extra.yaml"), extra).unwrap();
    wait_until(Duration::from_secs(10), || async {
        version(&m.client.config().await) > v1
    })
    .await
    .expect("the new service never reached the proxy");
    assert_eq!(
        http_get(m.client.outbound, "extra.demo:8080", "/x")
            .await
            .unwrap()
            .0,
        200
    );
    let v2 = version(&m.client.config().await);

    // A broken edit: the control plane reports it, naming the file and field, and keeps
    // serving the last good snapshot.
    std::fs::write(
        m.cp.config_dir().join("extra.yaml"),
        extra.replace("port: 8080", "port: 99999"),
    )
    .unwrap();
    let status = m.cp.source_status_with("99999").await;
    let err = status["last_error"].as_str().unwrap();
    assert!(
        err.contains("extra.yaml") && err.contains("spec.ports[0].port"),
        "{err}"
    );
    assert_eq!(status["last_good_version"].as_u64(), Some(v2));
    assert!(
        m.cp.log().contains("spec.ports[0].port"),
        "the control plane must log the bad field"
    );
    assert_eq!(version(&m.client.config().await), v2);
    assert_eq!(
        http_get(m.client.outbound, "extra.demo:8080", "/y")
            .await
            .unwrap()
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_endpoint_does_not_fail_its_in_flight_requests() {
    let m = start_mesh().await;
    let version = |cfg: &serde_json::Value| cfg["discovery"]["version"].as_u64().unwrap();
    let v1 = version(&m.client.config().await);

    // A slow request is on its way to web-1 ...
    let outbound = m.client.outbound;
    let slow =
        tokio::spawn(async move { http_get(outbound, "web.demo", "/slow?sleep_ms=1500").await });
    wait_until(Duration::from_secs(5), || async {
        !m.web_app.received().is_empty()
    })
    .await
    .expect("the slow request never reached the app");

    // ... when web-1 leaves the service (its Workload no longer has the label).
    let path = m.cp.config_dir().join("mesh.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        yaml.replace("labels: { app: web }", "labels: { app: retired }"),
    )
    .unwrap();
    wait_until(Duration::from_secs(10), || async {
        version(&m.client.config().await) > v1
    })
    .await
    .expect("the removal never reached the client proxy");

    let (status, _, body) = slow.await.unwrap().unwrap();
    assert_eq!(
        status,
        200,
        "the in-flight request failed: {}",
        String::from_utf8_lossy(&body)
    );
    let (status, headers, _) = http_get(m.client.outbound, "web.demo", "/after")
        .await
        .unwrap();
    assert_eq!(status, 503, "no endpoints left");
    assert_eq!(headers["x-trellis-error"], "upstream");

    // Back in the service: traffic flows again.
    std::fs::write(&path, yaml).unwrap();
    wait_until(Duration::from_secs(10), || async {
        http_get(m.client.outbound, "web.demo", "/again")
            .await
            .is_ok_and(|r| r.0 == 200)
    })
    .await
    .expect("the endpoint did not come back");
}
