//! The stand-in's HTTPS front, reached the way another process reaches it: a kubeconfig
//! file read by kube-rs (certificate-authority-data, bearer token), TLS, HTTP/1.1, and
//! watches as chunked responses that stay open while changes stream in.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::config::{KubeConfigOptions, Kubeconfig};
use trellis_kube::stand_in::{ApiStandIn, HttpsApi, TOKEN};

use crate::support::*;

/// A client built from the kubeconfig text, written to a file and read back as
/// `KUBECONFIG` would be.
async fn client_from(kubeconfig: &str) -> kube::Client {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, kubeconfig).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is complete");
    kube::Client::try_from(config).expect("client")
}

async fn serve(api: &ApiStandIn) -> HttpsApi {
    api.serve_https().await.expect("serve_https")
}

#[tokio::test]
async fn the_source_lists_and_watches_over_https_through_a_kubeconfig() {
    let api = ApiStandIn::default();
    api.apply(&namespace("demo"));
    api.apply(&service("demo", "api", "10.96.0.10", &[("http", 80)]));
    api.apply(&pod("demo", "api-1", "10.0.0.1", "api"));
    api.apply(&slice(
        "demo",
        "api-x1",
        "api",
        &[("http", 8080)],
        &[("10.0.0.1", "api-1", Some(true))],
    ));
    let https = serve(&api).await;
    let kubeconfig = https.kubeconfig();
    assert!(kubeconfig.contains(&format!("server: \"{}\"", https.url())));
    assert!(https.url().starts_with("https://127.0.0.1:"));
    let dir = tempfile::tempdir().unwrap();
    https
        .write_kubeconfig(&dir.path().join("kubeconfig"))
        .unwrap();
    let client =
        client_from(&std::fs::read_to_string(dir.path().join("kubeconfig")).unwrap()).await;

    let running = Running::start(client, Duration::from_millis(20));
    let first = running.ready().await;
    assert_eq!(
        endpoints(&first, "demo", "api", 80),
        [ep("10.0.0.1:8080", "demo", "api")]
    );

    // Changes after the list arrive on the open watches (chunked, unbounded bodies).
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
        .until("the second endpoint, watched over HTTPS", |s| {
            endpoints(s, "demo", "api", 80)
                == [
                    ep("10.0.0.1:8080", "demo", "api"),
                    ep("10.0.0.2:8080", "demo", "api"),
                ]
        })
        .await;
    api.delete::<k8s_openapi::api::discovery::v1::EndpointSlice>("demo", "api-x1");
    running
        .until("no endpoints once the slice is deleted", |s| {
            endpoints(s, "demo", "api", 80).is_empty()
        })
        .await;
    let (lists, watches) = api.requests("endpointslices");
    assert_eq!(lists, 1, "one list, then the same watch all along");
    assert!(watches >= 1);
    running.stop().await;
}

#[tokio::test]
async fn json_objects_apply_with_a_uid_and_unknown_kinds_are_refused() {
    let api = ApiStandIn::default();
    let https = serve(&api).await;
    let client = client_from(&https.kubeconfig()).await;
    let rv = api
        .apply_json(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"},
        }))
        .unwrap();
    let listed = kube::Api::<Namespace>::all(client)
        .list(&Default::default())
        .await
        .unwrap();
    let names: Vec<_> = listed
        .items
        .iter()
        .map(|n| n.metadata.name.clone())
        .collect();
    assert_eq!(names, [Some("demo".to_owned())]);
    let uid = listed.items[0].metadata.uid.clone();
    assert_eq!(uid.as_deref(), Some(format!("uid-{rv}").as_str()));
    // Applied again without a uid, it keeps the one it has.
    api.apply_json(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "demo", "labels": {"team": "a"}},
    }))
    .unwrap();
    let stored = api.get("namespaces", "", "demo").unwrap();
    assert_eq!(stored["metadata"]["uid"].as_str(), uid.as_deref());
    assert_eq!(stored["metadata"]["labels"]["team"], "a");

    let refused = api.apply_json(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web"},
    }));
    assert!(refused.unwrap_err().to_string().contains("\"StatefulSet\""));
    assert!(
        api.apply_json(serde_json::json!({"kind": "Pod", "metadata": {}}))
            .is_err()
    );
    assert_eq!(
        api.remove("namespaces", "", "demo").unwrap()["kind"],
        "Namespace"
    );
    assert!(api.remove("namespaces", "", "demo").is_none());
}

#[tokio::test]
async fn a_wrong_token_is_401_and_a_foreign_ca_is_not_trusted() {
    let api = ApiStandIn::default();
    let https = serve(&api).await;

    let wrong_token = https.kubeconfig().replace(TOKEN, "someone-else");
    let client = client_from(&wrong_token).await;
    let listed = kube::Api::<Namespace>::all(client)
        .list(&Default::default())
        .await;
    match listed {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 401, "{status:?}"),
        other => panic!("expected 401, got {other:?}"),
    }

    // A kubeconfig naming another server's CA: the handshake fails, nothing is served.
    let other = serve(&ApiStandIn::default()).await;
    let b64 = |pem: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(pem)
    };
    let foreign = https
        .kubeconfig()
        .replace(&b64(https.ca_pem()), &b64(other.ca_pem()));
    assert_ne!(foreign, https.kubeconfig());
    let client = client_from(&foreign).await;
    let listed = kube::Api::<Namespace>::all(client)
        .list(&Default::default())
        .await;
    assert!(
        !matches!(listed, Ok(_) | Err(kube::Error::Api(_))),
        "TLS must fail: {listed:?}"
    );
    assert_eq!(api.requests("namespaces"), (0, 0), "no request got through");
}

#[tokio::test]
async fn version_and_registered_handlers_are_answered() {
    let api = ApiStandIn::default();
    let client = api.client();
    let v = client.apiserver_version().await.expect("version");
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "33"));
    api.set_version("v1.28.3");
    let v = client.apiserver_version().await.expect("version");
    assert_eq!(
        (v.major.as_str(), v.minor.as_str(), v.git_version.as_str()),
        ("1", "28", "v1.28.3")
    );

    let path = "/api/v1/namespaces/trellis-system/pods/cp-0:9090/proxy/metrics";
    api.handle(http::Method::GET, path, |uri, _| {
        (200, serde_json::json!({ "path": uri.path() }))
    });
    let req = http::Request::get(path).body(Vec::new()).unwrap();
    let answer: serde_json::Value = client.request(req).await.expect("handled");
    assert_eq!(answer["path"], path);
    api.handle(http::Method::GET, "/metrics-text", |_, _| {
        (200, serde_json::json!("up 1\n"))
    });
    let req = http::Request::get("/metrics-text")
        .body(Vec::new())
        .unwrap();
    assert_eq!(client.request_text(req).await.expect("text"), "up 1\n");
    // Another method on the same path is not handled: it falls through to the store,
    // which has no route for a subresource.
    let req = http::Request::post(path).body(Vec::new()).unwrap();
    let err = client.request::<serde_json::Value>(req).await.unwrap_err();
    assert!(err.to_string().contains("no route"), "{err}");
}
