//! `trellis-addon run --kubernetes` against the Kubernetes API stand-in
//! (`trellis_kube::stand_in`) served over HTTPS, found through `KUBECONFIG` as on a
//! developer machine: the real control plane lists and watches Namespaces, Services,
//! EndpointSlices, Pods and the `trellis-config` ConfigMap, holds the Lease, writes Events,
//! and serves real proxies.
//!
//! The proxies run in explicit mode, so a Pod's IP is 127.0.0.1 and its EndpointSlice port
//! is its proxy's inbound (mesh) port: `<pod IP>:<slice port>` is then exactly where the
//! peer proxy accepts mTLS, as a Workload's `meshAddress` is in the local profile.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use trellis_e2e::{ControlPlane, EchoServer, Launch, Proxy, free_port, http_get};
use trellis_kube::stand_in::{ApiStandIn, HttpsApi};

use crate::request_path::loopback;

/// The control plane's pod name: the Lease holder and the Events' reporting instance.
const POD_NAME: &str = "trellis-controller-0";
/// How long any one change may take to show.
const PATIENCE: Duration = Duration::from_secs(10);
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

/// The API stand-in, the control plane on it, and `client-1` -> `web-1` with their apps.
struct Cluster {
    api: ApiStandIn,
    _https: HttpsApi,
    cp: ControlPlane,
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
    ] {
        api.apply_json(object)?;
    }
    let https = api.serve_https().await?;
    let kubeconfig = https.kubeconfig();
    let cp = ControlPlane::start_kubernetes(|dir| {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, kubeconfig).unwrap();
        Launch {
            args: vec![],
            env: vec![
                ("KUBECONFIG".to_owned(), path.display().to_string()),
                ("POD_NAME".to_owned(), POD_NAME.to_owned()),
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
