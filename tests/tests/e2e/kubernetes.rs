//! `trellis-addon run --kubernetes` against the Kubernetes API stand-in
//! (`trellis_kube::stand_in`) served over HTTPS, found through `KUBECONFIG` as on a
//! developer machine: the real control plane lists and watches Namespaces, Services,
//! EndpointSlices, Pods, AuthorizationPolicies and the `trellis-config` ConfigMap, holds
//! the Lease, writes Events,
//! serves real proxies, and serves the sidecar injector (`POST /inject`) over HTTPS with a
//! certificate from its own mesh CA, which a client verifies against the trust bundle
//! file the control plane writes.
//!
//! The proxies run in explicit mode, so a Pod's IP is 127.0.0.1 and its EndpointSlice port
//! is its proxy's inbound (mesh) port: `<pod IP>:<slice port>` is then exactly where the
//! peer proxy accepts mTLS, as a Workload's `meshAddress` is in the local profile.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_e2e::{ControlPlane, EchoServer, Launch, Proxy, free_port, http_get};
use trellis_kube::stand_in::{ApiStandIn, HttpsApi};

use crate::request_path::loopback;

/// The control plane's pod name: the Lease holder and the Events' reporting instance.
const POD_NAME: &str = "trellis-controller-0";
/// How long any one change may take to show.
const PATIENCE: Duration = Duration::from_secs(10);
/// The name the API server dials the webhooks by (`--webhook-dns-names`' default).
const WEBHOOK_DNS_NAME: &str = "trellis-webhook.trellis-system.svc";
/// The images the injector is given, as the chart hands them over.
const PROXY_IMAGE: &str = "localhost/trellis/proxy:e2e";
const INIT_IMAGE: &str = "localhost/trellis/proxy-init:e2e";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
const WEB_ID: &str = "spiffe://cluster.local/ns/demo/sa/web";

fn namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
    })
}

/// A ClusterIP Service selecting `app=<name>`, port `http` 80 -> `target_port`.
fn service(ns: &str, name: &str, cluster_ip: &str, target_port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": target_port, "protocol": "TCP"}],
        },
    })
}

/// A scheduled, running Pod at 127.0.0.1 (where every explicit-mode proxy listens).
fn pod(ns: &str, name: &str, app: &str, service_account: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {
            "nodeName": "node-1", "serviceAccountName": service_account,
            "containers": [{"name": "app", "image": "app:1"}],
        },
        "status": {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]},
    })
}

/// The EndpointSlice of `service`: port `http` = `port`, and `pod` at 127.0.0.1 with
/// readiness `ready` (`None`: no endpoint at all).
fn slice(ns: &str, service: &str, port: u16, pod: &str, ready: Option<bool>) -> Value {
    let endpoints: Vec<Value> = ready
        .map(|ready| {
            json!({
                "addresses": ["127.0.0.1"],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": ns, "name": pod},
                "nodeName": "node-1",
            })
        })
        .into_iter()
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-x1"), "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn config_map(discovery: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "trellis-config", "namespace": "trellis-system"},
        "data": {"discovery": discovery},
    })
}

/// A webhook configuration with one entry per name and no `caBundle`.
fn webhook_configuration(kind: &str, name: &str, hooks: &[&str]) -> Value {
    let webhooks: Vec<Value> = hooks
        .iter()
        .map(|h| {
            json!({
                "name": h, "sideEffects": "None", "admissionReviewVersions": ["v1"],
                "clientConfig": {"service": {"namespace": "trellis-system", "name": "trellis-webhook"}},
            })
        })
        .collect();
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
        "metadata": {"name": name}, "webhooks": webhooks,
    })
}

/// The API stand-in, the control plane on it, and `client-1` -> `web-1` with their apps.
struct Cluster {
    api: ApiStandIn,
    _https: HttpsApi,
    cp: ControlPlane,
    /// The control plane's admission webhook listener (`/validate`, `/inject`).
    webhook: SocketAddr,
    client: Proxy,
    web: Proxy,
    web_app: EchoServer,
    _client_app: EchoServer,
}

/// Namespaces `demo` (Services `web` and `client`, one Pod and slice each) and `other`
/// (Service `api`, no endpoints: something a restricted scope hides), then the control
/// plane and both proxies.
async fn start_cluster() -> anyhow::Result<Cluster> {
    let (client_in, web_in) = (loopback(free_port()), loopback(free_port()));
    let api = ApiStandIn::default();
    for object in [
        namespace("trellis-system"),
        namespace("demo"),
        namespace("other"),
        service("demo", "web", "10.96.0.10", web_in.port()),
        pod("demo", "web-1", "web", "web"),
        slice("demo", "web", web_in.port(), "web-1", Some(true)),
        service("demo", "client", "10.96.0.11", client_in.port()),
        pod("demo", "client-1", "client", "client"),
        slice("demo", "client", client_in.port(), "client-1", Some(true)),
        service("other", "api", "10.96.0.20", 8080),
        // As the chart renders them: no caBundle, which the control plane fills in.
        webhook_configuration(
            "MutatingWebhookConfiguration",
            "trellis-sidecar-injector",
            &["inject.trellis.dev"],
        ),
        webhook_configuration(
            "ValidatingWebhookConfiguration",
            "trellis-config",
            &["config.trellis.dev", "second.trellis.dev"],
        ),
    ] {
        api.apply_json(object)?;
    }
    let https = api.serve_https().await?;
    let kubeconfig = https.kubeconfig();
    let webhook = loopback(free_port());
    let cp = ControlPlane::start_kubernetes(|dir| {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, kubeconfig).unwrap();
        Launch {
            // No --webhook-cert: the certificate comes from the control plane's own CA.
            args: vec!["--webhook-listen".to_owned(), webhook.to_string()],
            env: vec![
                ("KUBECONFIG".to_owned(), path.display().to_string()),
                ("POD_NAME".to_owned(), POD_NAME.to_owned()),
                // As the chart sets them.
                ("TRELLIS_PROXY_IMAGE".to_owned(), PROXY_IMAGE.to_owned()),
                ("TRELLIS_PROXY_INIT_IMAGE".to_owned(), INIT_IMAGE.to_owned()),
            ],
        }
    })
    .await;
    let web_app = EchoServer::start("web-1").await;
    let client_app = EchoServer::start("client-1").await;
    let web = Proxy::start(&cp, "web-1", "demo", "web", web_in, web_app.addr).await;
    let client = Proxy::start(
        &cp,
        "client-1",
        "demo",
        "client",
        client_in,
        client_app.addr,
    )
    .await;
    Ok(Cluster {
        api,
        _https: https,
        cp,
        webhook,
        client,
        web,
        web_app,
        _client_app: client_app,
    })
}

/// Polls `probe` every 50 ms until it gives a value; fails after [`PATIENCE`] naming
/// `what`, with what `probe` saw last and the control plane's log.
async fn until<T, F, Fut>(cp: &ControlPlane, what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let end = tokio::time::Instant::now() + PATIENCE;
    loop {
        let last = match probe().await {
            Ok(value) => return Ok(value),
            Err(last) => last,
        };
        if tokio::time::Instant::now() > end {
            bail!(
                "{what}: not within {PATIENCE:?}; last seen: {last}\ncontrol plane log:\n{}",
                cp.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `Ok(value)` when `value` is `want`, else the value as the error.
fn expect<T: PartialEq + std::fmt::Debug>(value: T, want: &T) -> Result<T, String> {
    if value == *want {
        Ok(value)
    } else {
        Err(format!("{value:?}"))
    }
}

/// `(address, identity)` of every endpoint of `demo/web` in the client proxy's `/config`.
async fn web_endpoints(client: &Proxy) -> Vec<(String, String)> {
    let config = client.config().await;
    let services = config["discovery"]["services"].as_array().cloned();
    let web = services
        .into_iter()
        .flatten()
        .find(|s| s["key"]["namespace"] == "demo" && s["key"]["name"] == "web");
    let endpoints = web
        .and_then(|s| s["ports"][0]["endpoints"].as_array().cloned())
        .unwrap_or_default();
    endpoints
        .iter()
        .map(|e| {
            let field = |f: &str| e[f].as_str().unwrap_or_default().to_owned();
            (field("address"), field("identity"))
        })
        .collect()
}

/// The services the client proxy holds, as `<namespace>/<name>`.
async fn held_services(client: &Proxy) -> BTreeSet<String> {
    let config = client.config().await;
    let services = config["discovery"]["services"].as_array().cloned();
    services
        .into_iter()
        .flatten()
        .map(|s| {
            let part = |f: &str| s["key"][f].as_str().unwrap_or("?").to_owned();
            format!("{}/{}", part("namespace"), part("name"))
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// One sample of the control plane's `/metrics`.
async fn cp_metric(cp: &ControlPlane, series: &str) -> Option<f64> {
    let (_, _, body) = http_get(cp.admin, "localhost", "/metrics").await.ok()?;
    String::from_utf8_lossy(&body).lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The Lease's `holderIdentity` (`""` when released, `None` when there is no Lease).
fn lease_holder(api: &ApiStandIn) -> Option<String> {
    let lease = api.get("leases", "trellis-system", "trellis-controller")?;
    Some(
        lease["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// `(type, reason, note)` of every Event the control plane created, in order.
fn events(api: &ApiStandIn) -> Vec<(String, String, String)> {
    api.writes("events")
        .into_iter()
        .filter(|w| w.code == 201)
        .map(|w| {
            let field = |f: &str| w.body[f].as_str().unwrap_or_default().to_owned();
            (field("type"), field("reason"), field("note"))
        })
        .collect()
}

/// A pod CREATE as the API server sends it to the mutating webhook.
fn pod_review(ns: &str, uid: &str) -> Vec<u8> {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-5c9f-", "namespace": ns, "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "web:1"}]},
    });
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": ns, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "dryRun": false,
        },
    }))
    .unwrap_or_default()
}

/// POSTs `body` to `path` on the webhook over TLS 1.3, verifying the server as
/// [`WEBHOOK_DNS_NAME`] against exactly the roots of `bundle` (a PEM file): `(HTTP
/// status, JSON body)`.
async fn webhook_post(
    addr: SocketAddr,
    bundle: &std::path::Path,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Value)> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(bundle)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(WEBHOOK_DNS_NAME)?;
    let mut tls = connector
        .connect(name, tokio::net::TcpStream::connect(addr).await?)
        .await
        .context("TLS to the webhook, verified against the trust bundle file")?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {WEBHOOK_DNS_NAME}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw).await?;
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no response head")?;
    let head = String::from_utf8_lossy(&raw[..at]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line: {head}"))?;
    let json = serde_json::from_slice(&raw[at + 4..]).unwrap_or(Value::Null);
    Ok((status, json))
}

/// GET through the client proxy to `web.demo`: `(status, body)`.
async fn call_web(c: &Cluster, path: &str) -> anyhow::Result<(u16, String)> {
    let (status, _, body) = http_get(c.client.outbound, "web.demo", path).await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_are_served_from_the_cluster_and_sigterm_releases_the_lease() -> anyhow::Result<()>
{
    let mut c = start_cluster().await?;
    let web_addr = c.web.inbound.to_string();

    // The endpoint is the slice's, at the web proxy's mesh address, with the Pod's identity.
    assert_eq!(
        web_endpoints(&c.client).await,
        [(web_addr.clone(), WEB_ID.to_owned())]
    );
    let (status, body) = call_web(&c, "/hello?from=cluster").await?;
    assert_eq!(
        (status, body.as_str()),
        (200, "hello from web-1 /hello?from=cluster")
    );
    let got = c.web_app.received();
    ensure!(got.len() == 1, "{got:?}");
    assert_eq!(
        got[0].headers["x-forwarded-client-cert"],
        format!("By={WEB_ID};URI={CLIENT_ID}").as_str(),
        "the web app sees the caller's identity, from its certificate"
    );
    ensure!(
        c.web.wait_log(&format!("src=\"{CLIENT_ID}\"")).await,
        "{}",
        c.web.log()
    );

    // The sidecar injector, over HTTPS with a certificate from the control plane's own
    // CA: a client trusting only the trust bundle file reaches /inject for the name.
    c.api.apply_json(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {
            "kubernetes.io/metadata.name": "shop", "trellis.dev/inject": "enabled",
        }},
    }))?;
    let bundle = c.cp.root_pem();
    let (status, answer) =
        webhook_post(c.webhook, &bundle, "/inject", &pod_review("shop", "uid-1")).await?;
    let response = &answer["response"];
    ensure!(
        status == 200 && response["uid"] == "uid-1" && response["allowed"] == true,
        "{status} {answer}
control plane log:
{}",
        c.cp.log()
    );
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().context("no patch")?)?;
    let ops: Vec<Value> = serde_json::from_slice(&patch)?;
    // The stand-in says v1.33.0: a native sidecar, so the pod's (absent) initContainers
    // become the capture step and the proxy.
    let init = ops
        .iter()
        .find(|op| op["op"] == "add" && op["path"] == "/spec/initContainers")
        .with_context(|| format!("no initContainers in {ops:?}"))?;
    let names: Vec<&str> = init["value"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["trellis-init", "trellis-proxy"]);
    assert_eq!(init["value"][0]["image"], INIT_IMAGE);
    let proxy = &init["value"][1];
    assert_eq!(proxy["image"], PROXY_IMAGE);
    assert_eq!(proxy["restartPolicy"], "Always");
    let env = |name: &str| {
        proxy["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        env("TRELLIS_PROXY_CONTROL_PLANE"),
        Some(json!("trellis-control-plane.trellis-system.svc:15010"))
    );
    // The trust bundle reaches the cluster: a ConfigMap in every namespace (the new
    // `shop` included, without waiting for a resync) and every webhook's caBundle.
    let pem = std::fs::read_to_string(&bundle)?;
    let want_bundle = base64::engine::general_purpose::STANDARD.encode(pem.as_bytes());
    until(&c.cp, "trust bundle published", || {
        let api = c.api.clone();
        let (pem, want_bundle) = (pem.clone(), want_bundle.clone());
        async move {
            for ns in ["trellis-system", "demo", "other", "shop"] {
                let cm = api.get("configmaps", ns, "trellis-trust-bundle");
                let data = cm.as_ref().map(|cm| cm["data"]["trust-bundle.pem"].clone());
                if data != Some(json!(pem)) {
                    return Err(format!("{ns}: {cm:?}"));
                }
            }
            for (resource, name, entries) in [
                (
                    "mutatingwebhookconfigurations",
                    "trellis-sidecar-injector",
                    1,
                ),
                ("validatingwebhookconfigurations", "trellis-config", 2),
            ] {
                let config = api.get(resource, "", name).unwrap_or_default();
                let bundles: Vec<&Value> = (config["webhooks"].as_array().into_iter().flatten())
                    .map(|w| &w["clientConfig"]["caBundle"])
                    .collect();
                if bundles.len() != entries || bundles.iter().any(|b| **b != json!(want_bundle)) {
                    return Err(format!("{name}: {bundles:?}"));
                }
            }
            Ok(())
        }
    })
    .await?;
    // A namespace the cluster does not have: refused, failing closed.
    let (status, answer) =
        webhook_post(c.webhook, &bundle, "/inject", &pod_review("ghost", "uid-2")).await?;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert_eq!(answer["response"]["status"]["code"], 503, "{answer}");
    // /validate is served on the same listener.
    let (status, _) = webhook_post(c.webhook, &bundle, "/validate", b"{}").await?;
    assert_eq!(status, 400);
    for (series, want) in [
        (
            "trellis_webhook_injections_total{outcome=\"injected\"}",
            1.0,
        ),
        ("trellis_webhook_injections_total{outcome=\"refused\"}", 1.0),
    ] {
        assert_eq!(cp_metric(&c.cp, series).await, Some(want), "{series}");
    }
    let expiry = cp_metric(
        &c.cp,
        "trellis_webhook_certificate_expiration_timestamp_seconds",
    )
    .await
    .context("no webhook certificate expiry")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    ensure!(
        (23.0 * 3600.0..=24.0 * 3600.0).contains(&(expiry - now)),
        "a 24 h certificate: expires {expiry}, now {now}"
    );

    // trellis-config's proxy.resources reach the next injected pod, live.
    c.api.apply_json(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "trellis-config", "namespace": "trellis-system"},
        "data": {"proxy": "resources:\n  requests: {cpu: 200m}\n  limits: {memory: 512Mi}\n"},
    }))?;
    until(&c.cp, "proxy.resources in the injected proxy", || {
        let bundle = bundle.clone();
        let webhook = c.webhook;
        async move {
            let (_, answer) =
                webhook_post(webhook, &bundle, "/inject", &pod_review("shop", "uid-r"))
                    .await
                    .map_err(|e| e.to_string())?;
            let patch = base64::engine::general_purpose::STANDARD
                .decode(answer["response"]["patch"].as_str().unwrap_or_default())
                .map_err(|e| e.to_string())?;
            let ops: Vec<Value> = serde_json::from_slice(&patch).map_err(|e| e.to_string())?;
            let resources = ops
                .iter()
                .find(|op| op["path"] == "/spec/initContainers")
                .map(|op| op["value"][1]["resources"].clone())
                .unwrap_or_default();
            expect(
                resources,
                &json!({"requests": {"cpu": "200m"}, "limits": {"memory": "512Mi"}}),
            )
        }
    })
    .await?;

    // Not ready: the endpoint leaves the client's view and the call has nowhere to go.
    let slice_port = c.web.inbound.port();
    c.api
        .apply_json(slice("demo", "web", slice_port, "web-1", Some(false)))?;
    until(&c.cp, "the not-ready endpoint removed", || async {
        expect(web_endpoints(&c.client).await, &vec![])
    })
    .await?;
    let (status, body) = call_web(&c, "/not-ready").await?;
    assert_eq!(status, 503, "{body}");
    // Ready again: back, and served.
    c.api
        .apply_json(slice("demo", "web", slice_port, "web-1", Some(true)))?;
    let want = vec![(web_addr.clone(), WEB_ID.to_owned())];
    until(&c.cp, "the endpoint back once ready", || async {
        expect(web_endpoints(&c.client).await, &want)
    })
    .await?;
    assert_eq!(call_web(&c, "/ready-again").await?.0, 200);
    // The endpoint removed from the slice, then added back.
    c.api
        .apply_json(slice("demo", "web", slice_port, "web-1", None))?;
    until(&c.cp, "the endpoint removed from the slice", || async {
        expect(web_endpoints(&c.client).await, &vec![])
    })
    .await?;
    c.api
        .apply_json(slice("demo", "web", slice_port, "web-1", Some(true)))?;
    until(&c.cp, "the endpoint added back", || async {
        expect(web_endpoints(&c.client).await, &want)
    })
    .await?;
    assert_eq!(call_web(&c, "/added-back").await?.0, 200);

    // An AuthorizationPolicy created in the cluster reaches the control plane's snapshot,
    // its service account resolved. A dry run, so that no call here depends on whether
    // these proxies enforce it.
    c.api.apply_json(json!({
        "apiVersion": "policy.trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "web-readers", "namespace": "demo"},
        "spec": {
            "targetRefs": [{"kind": "Service", "name": "web"}], "dryRun": true,
            "rules": [{"from": [{"serviceAccounts": ["client"]}]}],
        },
    }))?;
    let want_policies = json!([{
        "namespace": "demo", "name": "web-readers", "target_services": ["web"],
        "action": "ALLOW", "dry_run": true,
        "rules": [{"from": [{"principals": [CLIENT_ID], "namespaces": []}], "to": []}],
    }]);
    until(&c.cp, "the policy in /debug/snapshot", || async {
        let (_, _, body) = http_get(c.cp.admin, "localhost", "/debug/snapshot")
            .await
            .map_err(|e| e.to_string())?;
        let doc: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        expect(doc["authorization"].clone(), &want_policies)
    })
    .await?;
    assert_eq!(call_web(&c, "/with-a-policy").await?.0, 200);

    // The control plane leads (the only replica), and releases the Lease on SIGTERM before
    // it exits: a successor need not wait out the 15 s lease.
    until(&c.cp, "the Lease held by the control plane", || async {
        expect(lease_holder(&c.api), &Some(POD_NAME.to_owned()))
    })
    .await?;
    c.cp.terminate();
    let exit = c.cp.wait_exit(PATIENCE).await;
    let exit = exit.with_context(|| format!("still running; log:\n{}", c.cp.log()))?;
    ensure!(exit.success(), "exit {exit}; log:\n{}", c.cp.log());
    assert_eq!(
        lease_holder(&c.api),
        Some(String::new()),
        "the exited control plane left the Lease held; log:\n{}",
        c.cp.log()
    );
    let last = c.api.writes("leases").pop().context("no Lease writes")?;
    assert_eq!((last.method.as_str(), last.code), ("PUT", 200));
    assert_eq!(last.body["spec"]["holderIdentity"], Value::Null, "{last:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_map_is_applied_a_bad_edit_is_rejected_with_an_event_then_recovered()
-> anyhow::Result<()> {
    let c = start_cluster().await?;
    let everything = set(&["demo/client", "demo/web", "other/api"]);
    let own_namespace = set(&["demo/client", "demo/web"]);
    assert_eq!(
        held_services(&c.client).await,
        everything,
        "no ConfigMap: every namespace"
    );
    let rejected = "trellis_mesh_config_rejected_total";
    assert_eq!(cp_metric(&c.cp, rejected).await, Some(0.0));
    // Events come from the Lease holder only: this replica, once it has taken the Lease.
    until(&c.cp, "the Lease held by the control plane", || async {
        expect(lease_holder(&c.api), &Some(POD_NAME.to_owned()))
    })
    .await?;

    // Created valid: each namespace sees only itself (and trellis-system).
    c.api.apply_json(config_map("scope: {default: []}"))?;
    until(&c.cp, "the restricted scope applied", || async {
        expect(held_services(&c.client).await, &own_namespace)
    })
    .await?;
    ensure!(c.cp.log().contains("mesh config changed"), "{}", c.cp.log());

    // Edited invalid: rejected, counted, reported on the ConfigMap; the last good config
    // stays in force and the control plane keeps serving.
    c.api
        .apply_json(config_map("scope: {default: [Not_A_Namespace]}"))?;
    until(&c.cp, "the rejection counted", || async {
        expect(cp_metric(&c.cp, rejected).await, &Some(1.0))
    })
    .await?;
    let warning = until(&c.cp, "a Warning Event", || async {
        let events = events(&c.api);
        match events.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(format!("{events:?}")),
        }
    })
    .await?;
    assert_eq!(
        (warning.0.as_str(), warning.1.as_str()),
        ("Warning", "InvalidConfig")
    );
    ensure!(
        warning.2.contains("data.discovery") && warning.2.contains("Not_A_Namespace"),
        "the note must name the field: {}",
        warning.2
    );
    let created = c.api.writes("events").remove(0).body;
    let config_map_uid = c
        .api
        .get("configmaps", "trellis-system", "trellis-config")
        .context("the ConfigMap")?["metadata"]["uid"]
        .clone();
    assert_eq!(
        created["regarding"],
        json!({
            "apiVersion": "v1", "kind": "ConfigMap", "namespace": "trellis-system",
            "name": "trellis-config", "uid": config_map_uid,
        })
    );
    assert_eq!(created["reportingInstance"], POD_NAME);
    assert_eq!(created["metadata"]["namespace"], "trellis-system");
    assert_eq!(
        cp_metric(&c.cp, "trellis_mesh_config_invalid").await,
        Some(1.0)
    );
    assert_eq!(
        held_services(&c.client).await,
        own_namespace,
        "last good scope kept"
    );
    let (ready, _, _) = http_get(c.cp.admin, "localhost", "/ready").await?;
    assert_eq!(ready, 200);

    // Valid again, every namespace: applied, and a Normal Event says so.
    c.api.apply_json(config_map("scope: {default: [\"*\"]}"))?;
    until(&c.cp, "the open scope applied", || async {
        expect(held_services(&c.client).await, &everything)
    })
    .await?;
    let applied = until(&c.cp, "a Normal Event", || async {
        let events = events(&c.api);
        match events.as_slice() {
            [_, applied] => Ok(applied.clone()),
            _ => Err(format!("{events:?}")),
        }
    })
    .await?;
    assert_eq!(
        (applied.0.as_str(), applied.1.as_str()),
        ("Normal", "ConfigApplied")
    );
    assert_eq!(
        cp_metric(&c.cp, "trellis_mesh_config_invalid").await,
        Some(0.0)
    );
    assert_eq!(cp_metric(&c.cp, rejected).await, Some(1.0));
    Ok(())
}
