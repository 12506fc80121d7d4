//! `POST /inject` over HTTPS with the certificate from the mesh CA, against the Kubernetes
//! API stand-in: clients trust only the CA's trust bundle; the certificate is renewed at
//! half its lifetime and when the CA's generation changes; namespaces unknown to the
//! watch cache are read from the API once, and a namespace that cannot be read refuses
//! the pod.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_rustls::client::TlsStream;
use trellis_ca::{CaMaterial, generate_pems};
use trellis_kube::stand_in::ApiStandIn;
use trellis_kube::{KubeHandle, KubeSettings, KubeSource};

use super::*;
use crate::injector::{Injector, InjectorSettings, NamespaceLookup};
use crate::mesh_config::{LogLevel, ProxySettings};

const TD: &str = "cluster.local";
const UID: &str = "0b6a3f0e-7f7e-4e6c-9d1e-6c4f1f0c2a11";
const PROXY_IMAGE: &str = "trellis.azurecr.io/trellis/proxy:0.1.0";
const INIT_IMAGE: &str = "trellis.azurecr.io/trellis/proxy-init:0.1.0";
const PATIENCE: Duration = Duration::from_secs(10);

fn settings() -> InjectorSettings {
    InjectorSettings {
        proxy_image: PROXY_IMAGE.to_owned(),
        init_image: Some(INIT_IMAGE.to_owned()),
        pull_policy: "IfNotPresent".to_owned(),
        control_plane: trellis_webhook::DEFAULT_CONTROL_PLANE.to_owned(),
    }
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// The stand-in with `shop` (opted in) and `plain` (not).
fn api() -> ApiStandIn {
    let api = ApiStandIn::default();
    api.apply_json(namespace(
        "shop",
        json!({"trellis.dev/inject": "enabled", "kubernetes.io/metadata.name": "shop"}),
    ))
    .unwrap();
    api.apply_json(namespace(
        "plain",
        json!({"kubernetes.io/metadata.name": "plain"}),
    ))
    .unwrap();
    api
}

/// A Kubernetes source on `api`, listed once (its Namespace cache is filled); it runs
/// until `shutdown`.
async fn synced_cache(api: &ApiStandIn, shutdown: &CancellationToken) -> KubeHandle {
    let source = KubeSource::new(api.client(), KubeSettings::new(TD));
    let handle = source.handle();
    let (tx, rx) = watch::channel(Arc::new(source.empty_snapshot()));
    tokio::spawn(source.run(tx, shutdown.clone().cancelled_owned()));
    handle.ready_snapshot(&rx).await.unwrap();
    // The source stops when every receiver is gone; keep one for the test's life.
    let stop = shutdown.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        drop(rx);
    });
    handle
}

/// A source that never runs: its Namespace cache stays empty, so every lookup goes to
/// the API server.
fn empty_cache(api: &ApiStandIn) -> KubeHandle {
    KubeSource::new(api.client(), KubeSettings::new(TD)).handle()
}

fn injector(
    api: &ApiStandIn,
    cache: KubeHandle,
    version: &str,
) -> (Injector, watch::Sender<ProxySettings>) {
    let (tx, rx) = watch::channel(ProxySettings::default());
    let injector = Injector::new(
        settings(),
        TD.to_owned(),
        watch::channel(version.parse().unwrap()).1,
        rx,
        NamespaceLookup::new(cache, api.client()),
    );
    (injector, tx)
}

/// A Deployment's pod as the API server sends it for admission, in `ns`.
fn pod_review(ns: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": UID,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod(ns),
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        }
    }))
    .unwrap()
}

fn pod(ns: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7d9f8b6c5d-",
            "namespace": ns,
            "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5d"},
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "web", "image": "shop.azurecr.io/web:1.4.2",
                            "ports": [{"name": "http", "containerPort": 8080}]}],
        },
    })
}

/// The webhook in mesh CA mode on 127.0.0.1, for `DEFAULT_DNS_NAME`, living `ttl`.
async fn start(
    ca: &Arc<CertificateAuthority>,
    ttl: Duration,
    injector: Option<Injector>,
    registry: &mut Registry,
    shutdown: &CancellationToken,
) -> SocketAddr {
    let webhook = Webhook {
        addr: "127.0.0.1:0".parse().unwrap(),
        source: CertSource::MeshCa {
            dns_names: vec![DEFAULT_DNS_NAME.to_owned()],
            ttl,
        },
        files: None,
        metrics: WebhookMetrics::new(registry),
    };
    webhook
        .start(Serving {
            ca: ca.clone(),
            injector,
            poll: Duration::from_millis(50),
            shutdown: shutdown.clone(),
        })
        .await
        .unwrap()
}

/// A TLS 1.3 connection verifying the server as `name` against exactly `roots`.
async fn connect(
    addr: SocketAddr,
    roots: &[Vec<u8>],
    name: &str,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(CertificateDer::from(root.clone())).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
}

/// The leaf the server presents, verified against `roots`.
async fn served_leaf(addr: SocketAddr, roots: &[Vec<u8>]) -> std::io::Result<Vec<u8>> {
    let tls = connect(addr, roots, DEFAULT_DNS_NAME).await?;
    let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    Ok(leaf.map(|c| c.to_vec()).unwrap_or_default())
}

/// One request on an open (keep-alive) connection: `(status, body)`.
async fn request(
    tls: &mut BufReader<TlsStream<tokio::net::TcpStream>>,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {DEFAULT_DNS_NAME}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    tls.get_mut().write_all(head.as_bytes()).await?;
    tls.get_mut().write_all(body).await?;
    let mut status_line = String::new();
    tls.read_line(&mut status_line).await?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0;
    loop {
        let mut line = String::new();
        tls.read_line(&mut line).await?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    tls.read_exact(&mut body).await?;
    Ok((status, body))
}

/// POSTs `body` to `path` on a new connection trusting `roots`.
async fn post_once(
    addr: SocketAddr,
    roots: &[Vec<u8>],
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Value)> {
    let mut tls = BufReader::new(connect(addr, roots, DEFAULT_DNS_NAME).await?);
    let (status, body) = request(&mut tls, path, body).await?;
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, value))
}

/// The pod after the answer's patch, as the API server would apply it.
fn patched(pod: Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let ops: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
    let mut pod = pod;
    trellis_webhook::apply_patch(&mut pod, &ops).unwrap();
    pod
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name} in {list}"))
}

fn env(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e["value"].clone()))
        .collect()
}

fn metrics(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injects_over_https_with_a_certificate_from_the_mesh_ca() {
    let shutdown = CancellationToken::new();
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let api = api();
    let cache = synced_cache(&api, &shutdown).await;
    let (injector, proxy_settings) = injector(&api, cache, "v1.33.0");
    let mut registry = Registry::default();
    let addr = start(
        &ca,
        24 * 3600 * Duration::from_secs(1),
        Some(injector.clone()),
        &mut registry,
        &shutdown,
    )
    .await;
    let bundle = ca.trust_bundle_der();

    // A client that trusts only the mesh's trust bundle reaches /inject for the name.
    let (status, answer) = post_once(addr, &bundle, INJECT_PATH, &pod_review("shop"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let response = &answer["response"];
    assert_eq!(response["uid"], UID);
    assert_eq!(response["allowed"], true, "{response}");
    let injected = patched(pod("shop"), response);
    // Kubernetes 1.33: a native sidecar, after the capture step, from their own images.
    let init = &injected["spec"]["initContainers"];
    assert_eq!(init[0]["name"], "trellis-init");
    assert_eq!(init[0]["image"], INIT_IMAGE);
    let proxy = container(init, "trellis-proxy");
    assert_eq!(proxy["image"], PROXY_IMAGE);
    assert_eq!(proxy["restartPolicy"], "Always");
    let vars = env(proxy);
    assert_eq!(
        vars["TRELLIS_PROXY_CONTROL_PLANE"],
        "trellis-control-plane.trellis-system.svc:15010"
    );
    assert_eq!(
        vars["TRELLIS_PROXY_CONTROL_PLANE_IDENTITY"],
        "spiffe://cluster.local/ns/trellis-system/sa/trellis-control-plane"
    );
    assert_eq!(vars["TRELLIS_PROXY_TRUST_DOMAIN"], TD);
    assert_eq!(vars["TRELLIS_LOG"], "info,access=info");
    assert_eq!(
        injected["spec"]["containers"][0]["name"], "web",
        "the app untouched"
    );

    // The mesh config's proxy settings apply to the next pod.
    proxy_settings.send_replace(ProxySettings {
        log_level: LogLevel::Debug,
        access_log: false,
        ..ProxySettings::default()
    });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while injector.config().log_level != "debug,access=off" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "config not followed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, answer) = post_once(addr, &bundle, INJECT_PATH, &pod_review("shop"))
        .await
        .unwrap();
    let injected = patched(pod("shop"), &answer["response"]);
    let proxy = container(&injected["spec"]["initContainers"], "trellis-proxy");
    assert_eq!(env(proxy)["TRELLIS_LOG"], "debug,access=off");

    // Not opted in: allowed unchanged.
    let (status, answer) = post_once(addr, &bundle, INJECT_PATH, &pod_review("plain"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    // A namespace neither cached nor in the API: refused, failing closed.
    let (status, answer) = post_once(addr, &bundle, INJECT_PATH, &pod_review("nowhere"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let response = &answer["response"];
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 503);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("namespace \"nowhere\"") && message.contains("no such namespace"),
        "{message}"
    );
    // Not a review: invalid. /validate is served on the same listener.
    let (status, _) = post_once(addr, &bundle, INJECT_PATH, b"{}").await.unwrap();
    assert_eq!(status, 400);
    let (status, answer) = post_once(addr, &bundle, VALIDATE_PATH, &pod_review("shop"))
        .await
        .unwrap();
    assert_eq!(
        (status, &answer["response"]["allowed"]),
        (200, &json!(true))
    );

    // Only for its names, and only to clients trusting the mesh's roots.
    assert!(
        connect(addr, &bundle, "other.trellis-system.svc")
            .await
            .is_err()
    );
    let stranger = CertificateAuthority::generate(TD).unwrap();
    assert!(
        connect(addr, &stranger.trust_bundle_der(), DEFAULT_DNS_NAME)
            .await
            .is_err()
    );

    let text = metrics(&registry);
    let leaf = served_leaf(addr, &bundle).await.unwrap();
    let expiry = not_after(&CertificateDer::from(leaf)).unwrap();
    for line in [
        "trellis_webhook_injections_total{outcome=\"injected\"} 2".to_owned(),
        "trellis_webhook_injections_total{outcome=\"skipped\"} 1".to_owned(),
        "trellis_webhook_injections_total{outcome=\"refused\"} 1".to_owned(),
        "trellis_webhook_injections_total{outcome=\"invalid\"} 1".to_owned(),
        "trellis_webhook_reviews_total{result=\"allowed\"} 1".to_owned(),
        format!("trellis_webhook_certificate_expiration_timestamp_seconds {expiry}"),
    ] {
        assert!(text.contains(&line), "{line} in\n{text}");
    }
    let hours = (expiry - i64::try_from(unix(SystemTime::now())).unwrap()) / 3600;
    assert!(
        (23..=24).contains(&hours),
        "a 24 h certificate: {hours} h left"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_generation_change_renews_the_certificate_under_the_open_listener() {
    let shutdown = CancellationToken::new();
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let api = api();
    let cache = synced_cache(&api, &shutdown).await;
    let (injector, _settings) = injector(&api, cache, "1.33");
    let mut registry = Registry::default();
    let addr = start(
        &ca,
        Duration::from_secs(24 * 3600),
        Some(injector),
        &mut registry,
        &shutdown,
    )
    .await;
    let old_roots = ca.trust_bundle_der();
    let first = served_leaf(addr, &old_roots).await.unwrap();
    // A connection opened before the change, kept alive across it.
    let mut open = BufReader::new(connect(addr, &old_roots, DEFAULT_DNS_NAME).await.unwrap());
    assert_eq!(
        request(&mut open, INJECT_PATH, &pod_review("shop"))
            .await
            .unwrap()
            .0,
        200
    );

    // A bundle-only change (a root added) renews nothing.
    let staged_pems = generate_pems(
        TD,
        "next",
        48 * 3600 * Duration::from_secs(1),
        Duration::from_secs(24 * 3600),
    )
    .unwrap();
    let next = CaMaterial::from_pems(&staged_pems, TD, "next").unwrap();
    assert_eq!(ca.stage(next), trellis_ca::Staged::Pending);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        served_leaf(addr, &old_roots).await.unwrap(),
        first,
        "staging renews nothing"
    );

    // The new CA signs (generation 2): the next certificate chains to the new root only.
    assert!(ca.activate(SystemTime::now()));
    let new_root = CertificateDer::from_pem_slice(staged_pems.root_cert.as_bytes())
        .unwrap()
        .to_vec();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let renewed = loop {
        if let Ok(leaf) = served_leaf(addr, std::slice::from_ref(&new_root)).await {
            break leaf;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never renewed from the new CA"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(renewed, first);
    // The old connection still works; new ones get the new certificate.
    assert_eq!(
        request(&mut open, INJECT_PATH, &pod_review("shop"))
            .await
            .unwrap()
            .0,
        200
    );
    let (status, answer) = post_once(
        addr,
        std::slice::from_ref(&new_root),
        INJECT_PATH,
        &pod_review("shop"),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, &answer["response"]["allowed"]),
        (200, &json!(true))
    );
    let expiry = format!(
        "trellis_webhook_certificate_expiration_timestamp_seconds {}",
        not_after(&CertificateDer::from(renewed)).unwrap()
    );
    assert!(
        metrics(&registry).contains(&expiry),
        "{}",
        metrics(&registry)
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_renewed_at_half_its_lifetime() {
    let shutdown = CancellationToken::new();
    let ca = Arc::new(CertificateAuthority::generate(TD).unwrap());
    let mut registry = Registry::default();
    // 4 s: renewed about every 2 s.
    let addr = start(&ca, Duration::from_secs(4), None, &mut registry, &shutdown).await;
    let roots = ca.trust_bundle_der();
    let first = served_leaf(addr, &roots).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = served_leaf(addr, &roots).await.unwrap();
        if now != first {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_namespaces_are_read_from_the_api_and_unreadable_ones_refuse_the_pod() {
    let api = api();
    // Nothing listed yet: every namespace is unknown to the cache.
    let (injector, _settings) = injector(&api, empty_cache(&api), "1.28");
    let reviewed = injector.review(&pod_review("shop")).await;
    assert_eq!(reviewed.outcome, Outcome::Injected, "{}", reviewed.message);
    // 1.28: a classic sidecar.
    assert!(
        reviewed.message.contains("classic sidecar"),
        "{}",
        reviewed.message
    );
    let reviewed = injector.review(&pod_review("plain")).await;
    assert_eq!(reviewed.outcome, Outcome::Skipped, "{}", reviewed.message);

    // Deleted (or never created): refused with the reason.
    let reviewed = injector.review(&pod_review("gone")).await;
    assert_eq!(reviewed.outcome, Outcome::Denied);
    assert_eq!(
        reviewed.message,
        "trellis sidecar injection: the labels of namespace \"gone\" are unknown (no such \
         namespace); the pod is refused rather than started without its proxy, retry"
    );
    // The API server failing: refused too, never injected or skipped blindly.
    api.outage("namespaces", Some(500));
    let reviewed = injector.review(&pod_review("shop")).await;
    assert_eq!(reviewed.outcome, Outcome::Denied);
    assert!(
        reviewed
            .message
            .contains("reading it from the API server failed"),
        "{}",
        reviewed.message
    );
    let answer: Value = serde_json::from_slice(&reviewed.body).unwrap();
    assert_eq!(answer["response"]["status"]["code"], 503);

    // Requests that need no namespace never ask.
    let mut update: Value = serde_json::from_slice(&pod_review("shop")).unwrap();
    update["request"]["operation"] = json!("UPDATE");
    let reviewed = injector.review(&serde_json::to_vec(&update).unwrap()).await;
    assert_eq!(reviewed.outcome, Outcome::Skipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_in_the_watch_cache_need_no_api_call() {
    let shutdown = CancellationToken::new();
    let api = api();
    let cache = synced_cache(&api, &shutdown).await;
    let (injector, _settings) = injector(&api, cache, "1.33");
    // With the API down, the cached labels still decide.
    api.outage("namespaces", Some(500));
    let reviewed = injector.review(&pod_review("shop")).await;
    assert_eq!(reviewed.outcome, Outcome::Injected, "{}", reviewed.message);
    let reviewed = injector.review(&pod_review("plain")).await;
    assert_eq!(reviewed.outcome, Outcome::Skipped, "{}", reviewed.message);
    shutdown.cancel();
}

#[tokio::test]
async fn a_cluster_version_change_switches_the_sidecar_mode_of_the_next_pod() {
    let api = ApiStandIn::default();
    let (version_tx, version_rx) = watch::channel("1.28".parse().unwrap());
    let (_proxy_tx, proxy_rx) = watch::channel(ProxySettings::default());
    let injector = Injector::new(
        settings(),
        TD.to_owned(),
        version_rx,
        proxy_rx,
        NamespaceLookup::new(empty_cache(&api), api.client()),
    );
    assert!(!injector.config().kubernetes_version.has_native_sidecars());
    version_tx.send("1.30".parse().unwrap()).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !injector.config().kubernetes_version.has_native_sidecars() {
        assert!(tokio::time::Instant::now() < deadline, "still classic");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
