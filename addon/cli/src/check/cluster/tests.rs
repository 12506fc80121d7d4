//! The Kubernetes checks: pure decisions in tables, and every check end to end against the
//! Kubernetes API stand-in (`trellis_kube::stand_in`), with exact lines and exit codes.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use http::Method;
use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    date_time_ymd,
};
use serde_json::{Value, json};
use trellis_kube::stand_in::ApiStandIn;
use trellis_webhook::{Decision, InjectConfig};

use super::*;
use crate::check::{exit_code, render};

/// 2030-01-01T00:00:00Z: the checks' clock; certificates are dated around it.
const NOW: u64 = 1_893_456_000;
const DAY: u64 = 86_400;
const CP_A: &str = "trellis-control-plane-7d9f-a";
const CP_B: &str = "trellis-control-plane-7d9f-b";

fn options() -> Options {
    Options {
        namespace: NAMESPACE.to_owned(),
        injection_namespace: None,
        warn_within: Duration::from_secs(30 * DAY),
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(NOW),
    }
}

/// A self-signed certificate (a CA when `ca`), valid from 2020 to `not_after`.
fn cert(cn: &str, ca: bool, not_after: (i32, u8, u8)) -> String {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    }
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    params.self_signed(&key).unwrap().pem()
}

/// The exposition a control plane replica serves on its metrics port.
fn metrics(
    version: &str,
    connected: u64,
    behind: u64,
    by_version: &[(&str, u64)],
    signing: u64,
) -> String {
    let mut out = format!(
        "# HELP trellis_build_info The control plane's build.\n\
         # TYPE trellis_build_info gauge\n\
         trellis_build_info{{version=\"{version}\"}} 1\n\
         # TYPE trellis_discovery_connected_proxies gauge\n\
         trellis_discovery_connected_proxies {connected}\n\
         trellis_discovery_proxies_behind {behind}\n\
         trellis_discovery_pushes_total 42\n"
    );
    for (v, n) in by_version {
        out.push_str(&format!(
            "trellis_discovery_proxies_by_version{{proxy_version=\"{v}\"}} {n}\n"
        ));
    }
    out.push_str(&format!(
        "trellis_ca_signing_expiry_timestamp_seconds {signing}\n\
         trellis_webhook_certificate_expiration_timestamp_seconds {}\n# EOF\n",
        NOW + 20 * 3600
    ));
    out
}

fn status(code: u16, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": "InternalError", "code": code})
}

fn webhook_config(
    kind: &str,
    name: &str,
    hook: &str,
    path: &str,
    ca_bundle: Option<&str>,
) -> Value {
    let mut client_config = json!({
        "service": {"name": "trellis-webhook", "namespace": NAMESPACE, "port": 443, "path": path}
    });
    if let Some(pem) = ca_bundle {
        // k8s-openapi writes a ByteString as base64, as the API server does.
        client_config["caBundle"] =
            serde_json::to_value(ByteString(pem.as_bytes().to_vec())).unwrap();
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
        "metadata": {"name": name},
        "webhooks": [{
            "name": hook, "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": client_config,
        }],
    })
}

fn pod(namespace: &str, name: &str, labels: Value, image: &str, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "control-plane", "image": image}]},
        "status": {"phase": phase},
    })
}

fn control_plane_labels() -> Value {
    json!({"app.kubernetes.io/name": "trellis", "app.kubernetes.io/component": "control-plane",
           "app.kubernetes.io/instance": "trellis"})
}

/// A cluster in the stand-in, healthy unless a test changes it.
struct Cluster {
    api: ApiStandIn,
    root: String,
    /// The resources of every SelfSubjectAccessReview, in order.
    reviews: Arc<Mutex<Vec<String>>>,
}

impl Cluster {
    /// A cluster without Trellis: kube-system and default, every create allowed.
    fn fresh() -> Self {
        let api = ApiStandIn::default();
        for ns in ["default", "kube-system"] {
            api.apply_json(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
            .unwrap();
        }
        let cluster = Self {
            api,
            root: String::new(),
            reviews: Arc::default(),
        };
        cluster.deny(&[]);
        cluster
    }

    /// Trellis installed and healthy: two replicas, both webhooks with the trust bundle as
    /// caBundle, the webhook Service ready, injection working in `shop`, three injected
    /// pods running (and one pending), all connected and synced on 0.1.0.
    fn healthy() -> Self {
        Self::with_root((2035, 1, 1))
    }

    /// [`healthy`](Self::healthy) with a trust root that expires at `not_after`.
    fn with_root(not_after: (i32, u8, u8)) -> Self {
        let mut cluster = Self::fresh();
        cluster.root = cert("Trellis root", true, not_after);
        let api = &cluster.api;
        let apply = |v: Value| {
            api.apply_json(v).unwrap();
        };
        apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}));
        apply(json!({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": "shop", "labels": {"trellis.dev/inject": "enabled"}}}));
        apply(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "trellis-control-plane", "namespace": NAMESPACE},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": control_plane_labels()},
                "template": {"metadata": {"labels": control_plane_labels()},
                             "spec": {"containers": [{"name": "control-plane"}]}},
            },
            "status": {"replicas": 2, "availableReplicas": 2, "readyReplicas": 2},
        }));
        for name in [CP_A, CP_B] {
            apply(pod(
                NAMESPACE,
                name,
                control_plane_labels(),
                "ghcr.io/trellis-mesh/control-plane:0.1.0",
                "Running",
            ));
        }
        cluster.set_ca_bundles(Some(&cluster.root));
        apply(json!({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": "trellis-webhook", "namespace": NAMESPACE},
                     "spec": {"ports": [{"name": "https-webhook", "port": 443}]}}));
        cluster.set_endpoints(&[Some(true), None]);
        cluster.set_trust_bundle(&cluster.root);
        for (name, phase) in [
            ("web-1", "Running"),
            ("web-2", "Running"),
            ("api-1", "Running"),
            ("api-2", "Pending"),
        ] {
            apply(pod(
                "shop",
                name,
                json!({"trellis.dev/proxy": "native"}),
                "shop/app:1",
                phase,
            ));
        }
        // An uninjected pod: not counted.
        apply(pod("default", "plain", json!({}), "nginx:1", "Running"));
        let signing = NOW + 200 * DAY;
        cluster.serve_metrics(CP_A, metrics("0.1.0", 2, 0, &[("0.1.0", 2)], signing));
        cluster.serve_metrics(CP_B, metrics("0.1.0", 1, 0, &[("0.1.0", 1)], signing));
        cluster.inject_in("shop", true);
        cluster.publish_bundle("shop", &cluster.root);
        cluster.install_crds(|_| {});
        cluster.install_gateway_api();
        cluster
    }

    /// Applies the Gateway API's HTTPRoute CRD (as upstream's standard install would),
    /// serving v1 and v1beta1.
    fn install_gateway_api(&self) {
        self.api
            .apply_json(json!({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": "httproutes.gateway.networking.k8s.io"},
                "spec": {
                    "group": "gateway.networking.k8s.io", "scope": "Namespaced",
                    "names": {"kind": "HTTPRoute", "plural": "httproutes",
                              "listKind": "HTTPRouteList", "singular": "httproute"},
                    "versions": [
                        {"name": "v1", "served": true, "storage": true},
                        {"name": "v1beta1", "served": true, "storage": false},
                    ],
                },
            }))
            .unwrap();
    }

    /// Applies the chart's CRD files (charts/trellis/crds/, as `kubectl apply` would),
    /// established, after `edit` changed each (as JSON).
    fn install_crds(&self, edit: impl Fn(&mut Value)) {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../charts/trellis/crds/authorizationpolicies.policy.trellis.dev.yaml"
        ))
        .unwrap();
        let mut crd: Value = serde_yaml::from_str(&text).unwrap();
        crd["status"] = json!({"conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"},
        ]});
        edit(&mut crd);
        self.api.apply_json(crd).unwrap();
    }

    /// SelfSubjectAccessReviews answer allowed except for these resources.
    fn deny(&self, denied: &'static [&'static str]) {
        let reviews = Arc::clone(&self.reviews);
        self.api.handle(
            Method::POST,
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            move |_, body| {
                let mut review: Value = serde_json::from_slice(body).unwrap();
                let attributes = &review["spec"]["resourceAttributes"];
                let resource = attributes["resource"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                assert_eq!(attributes["verb"], "create");
                reviews.lock().unwrap().push(resource.clone());
                review["status"] = json!({"allowed": !denied.contains(&resource.as_str())});
                (201, review)
            },
        );
    }

    fn set_ca_bundles(&self, pem: Option<&str>) {
        let mutating = webhook_config(
            "MutatingWebhookConfiguration",
            "trellis-sidecar-injector",
            "inject.trellis.dev",
            "/inject",
            pem,
        );
        let validating = webhook_config(
            "ValidatingWebhookConfiguration",
            "trellis-config",
            "config.trellis.dev",
            "/validate",
            pem,
        );
        self.api.apply_json(mutating).unwrap();
        self.api.apply_json(validating).unwrap();
    }

    /// The webhook Service's one EndpointSlice, an endpoint per `ready` condition.
    fn set_endpoints(&self, ready: &[Option<bool>]) {
        let endpoints: Vec<Value> = ready
            .iter()
            .enumerate()
            .map(|(i, ready)| {
                let mut e = json!({"addresses": [format!("10.244.0.{}", i + 7)]});
                if let Some(ready) = ready {
                    e["conditions"] = json!({"ready": ready});
                }
                e
            })
            .collect();
        self.api
            .apply_json(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "trellis-webhook-x7k2p", "namespace": NAMESPACE,
                             "labels": {"kubernetes.io/service-name": "trellis-webhook"}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "https-webhook", "port": 9443, "protocol": "TCP"}],
            }))
            .unwrap();
    }

    fn set_trust_bundle(&self, pem: &str) {
        self.publish_bundle(NAMESPACE, pem);
    }

    /// The control plane's copy of the trust bundle in `namespace`.
    fn publish_bundle(&self, namespace: &str, pem: &str) {
        self.api
            .apply_json(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "trellis-trust-bundle", "namespace": namespace},
                "data": {"trust-bundle.pem": pem},
            }))
            .unwrap();
    }

    fn set_available(&self, available: i32) {
        let mut deployment = self
            .api
            .get("deployments", NAMESPACE, "trellis-control-plane")
            .unwrap();
        deployment["status"]["availableReplicas"] = json!(available);
        self.api.apply_json(deployment).unwrap();
    }

    fn serve_metrics(&self, pod: &str, text: String) {
        self.api.handle(
            Method::GET,
            &format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:9090/proxy/metrics"),
            move |_, _| (200, Value::String(text.clone())),
        );
    }

    /// Answers the dry-run pod create in `namespace` as the API server does with the
    /// injector in place: the real `trellis_webhook::inject` (when `webhook`), else the
    /// pod as sent. A create that is not a dry run is a 500: nothing may be stored.
    fn inject_in(&self, namespace: &str, webhook: bool) {
        let ns = namespace.to_owned();
        self.api.handle(
            Method::POST,
            &format!("/api/v1/namespaces/{namespace}/pods"),
            move |uri, body| {
                let query = uri.query().unwrap_or_default();
                if !query.split('&').any(|q| q == "dryRun=All") {
                    return (500, status(500, "not a dry run"));
                }
                let mut pod: Value = serde_json::from_slice(body).unwrap();
                assert!(pod["metadata"]["generateName"].is_string(), "{pod}");
                pod["metadata"]["namespace"] = json!(ns);
                pod["metadata"]["name"] = json!("trellis-check-q8z4m");
                if !webhook {
                    return (201, pod);
                }
                let typed: Pod = serde_json::from_value(pod.clone()).unwrap();
                let labels =
                    BTreeMap::from([("trellis.dev/inject".to_owned(), "enabled".to_owned())]);
                let config = InjectConfig::new(
                    "ghcr.io/trellis-mesh/proxy:0.1.0",
                    "trellis-control-plane.trellis-system.svc:15010",
                );
                match trellis_webhook::inject(&typed, &labels, &config) {
                    Ok(Decision::Patch(ops, _)) => {
                        trellis_webhook::apply_patch(&mut pod, &ops).unwrap();
                        (201, pod)
                    }
                    Ok(Decision::Skip(_)) => (201, pod),
                    Err(e) => (422, status(422, &e.to_string())),
                }
            },
        );
    }

    async fn post(&self) -> Vec<Check> {
        post_install(&self.api.client(), &options()).await
    }

    async fn pre(&self) -> Vec<Check> {
        pre_install(&self.api.client(), &options()).await
    }
}

/// The check whose line is exactly `line`; it must have `verdict`.
#[track_caller]
fn find<'a>(checks: &'a [Check], verdict: Verdict, line: &str) -> &'a Check {
    let Some(check) = checks.iter().find(|c| c.line == line) else {
        panic!("no check {line:?} in\n{}", render(checks));
    };
    assert_eq!(check.verdict, verdict, "{}", render(checks));
    check
}

/// Like [`find`], and the hint contains `hint`.
#[track_caller]
fn find_hinted(checks: &[Check], verdict: Verdict, line: &str, hint: &str) {
    let check = find(checks, verdict, line);
    let text = check.hint.as_deref().unwrap_or_default();
    assert!(text.contains(hint), "hint {text:?} lacks {hint:?}");
}

fn failed(checks: &[Check]) -> Vec<&str> {
    checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .map(|c| c.line.as_str())
        .collect()
}

// === whole runs ===

#[tokio::test]
async fn a_healthy_install_is_all_ok() {
    let cluster = Cluster::healthy();
    let checks = cluster.post().await;
    let expected = "\
kubernetes-api
--------------
✔ can query the Kubernetes API

kubernetes-version
------------------
✔ Kubernetes v1.33.0 runs native sidecars (1.29 or later)

control-plane
-------------
✔ control plane: 2 of 2 replicas available
✔ control plane pods run one version: 0.1.0

crds
----
✔ CustomResourceDefinition authorizationpolicies.policy.trellis.dev is established and serves v1alpha1

routes
------
✔ Gateway API CustomResourceDefinition httproutes.gateway.networking.k8s.io serves v1

webhook
-------
✔ MutatingWebhookConfiguration trellis-sidecar-injector: caBundle is the trust bundle (1 certificate)
✔ ValidatingWebhookConfiguration trellis-config: caBundle is the trust bundle (1 certificate)
✔ service trellis-system/trellis-webhook has 2 ready endpoints
✔ a dry-run pod in shop is injected (trellis.dev/injected=0.1.0, native sidecar)
✔ no injected namespace enforces a Pod Security level that refuses the capture step (1 checked)

trust
-----
✔ trust root CN=Trellis root: 1826 days left
✔ trust bundle published in every injected namespace (1)
✔ CA signing certificate: 200 days left
✔ webhook serving certificate (from the mesh CA): 20h 0m left

data-plane
----------
✔ 3 proxies connected to 2 control plane replicas (3 injected pods running)
✔ every connected proxy acked the latest configuration
✔ every proxy runs the control plane's version 0.1.0

Status check results are ✔
";
    assert_eq!(render(&checks), expected);
    assert_eq!(exit_code(&checks), ExitCode::SUCCESS);
    // Nothing was created: the injection test was a dry run.
    assert!(
        cluster
            .api
            .get("pods", "shop", "trellis-check-q8z4m")
            .is_none()
    );
}

#[tokio::test]
async fn a_fresh_cluster_is_ready_for_an_install() {
    let cluster = Cluster::fresh();
    let checks = cluster.pre().await;
    let expected = "\
kubernetes-api
--------------
✔ can query the Kubernetes API

kubernetes-version
------------------
✔ Kubernetes v1.33.0 runs native sidecars (1.29 or later)

pre-install
-----------
✔ can create the 16 kinds of objects the chart installs
✔ Trellis is not installed yet
✔ no other service mesh found (Istio, Linkerd, Open Service Mesh)

Status check results are ✔
";
    assert_eq!(render(&checks), expected);
    assert_eq!(exit_code(&checks), ExitCode::SUCCESS);
    let reviews = cluster.reviews.lock().unwrap().clone();
    assert_eq!(
        reviews,
        [
            "namespaces",
            "customresourcedefinitions",
            "serviceaccounts",
            "configmaps",
            "services",
            "deployments",
            "poddisruptionbudgets",
            "networkpolicies",
            "clusterroles",
            "clusterrolebindings",
            "roles",
            "rolebindings",
            "mutatingwebhookconfigurations",
            "validatingwebhookconfigurations",
            "validatingadmissionpolicies",
            "validatingadmissionpolicybindings",
        ]
    );
}

// === pre-install ===

#[tokio::test]
async fn an_old_cluster_fails_and_one_without_native_sidecars_warns() {
    let cluster = Cluster::fresh();
    cluster.api.set_version("v1.26.15");
    let checks = cluster.pre().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "Kubernetes v1.26.15 is older than 1.28, the oldest Trellis supports",
        "upgrade the cluster",
    );
    assert_eq!(exit_code(&checks), ExitCode::FAILURE);
    assert!(
        render(&checks).ends_with("\n✖ 1 check failed\n"),
        "{}",
        render(&checks)
    );

    cluster.api.set_version("v1.28.3");
    let checks = cluster.pre().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "Kubernetes v1.28.3: classic sidecar: native sidecars need 1.29",
        "upgrade to 1.29",
    );
    assert_eq!(exit_code(&checks), ExitCode::SUCCESS, "a warning exits 0");
    assert!(render(&checks).ends_with("\nStatus check results are ✔ (1 warning)\n"));
}

#[tokio::test]
async fn missing_permissions_are_named() {
    let cluster = Cluster::fresh();
    cluster.deny(&["namespaces", "deployments", "clusterroles"]);
    let checks = cluster.pre().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "missing permission to create: namespaces, deployments.apps in trellis-system, \
         clusterroles.rbac.authorization.k8s.io",
        "cluster-admin",
    );
    assert_eq!(exit_code(&checks), ExitCode::FAILURE);

    // Once the namespace exists, creating it is not needed (nor asked about).
    cluster
        .api
        .apply_json(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        )
        .unwrap();
    cluster.reviews.lock().unwrap().clear();
    let checks = cluster.pre().await;
    find(
        &checks,
        Verdict::Fail,
        "missing permission to create: deployments.apps in trellis-system, \
         clusterroles.rbac.authorization.k8s.io",
    );
    assert!(
        !cluster
            .reviews
            .lock()
            .unwrap()
            .contains(&"namespaces".to_owned())
    );
}

#[tokio::test]
async fn a_failing_access_review_fails_the_permission_check() {
    let cluster = Cluster::fresh();
    cluster.api.handle(
        Method::POST,
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        |_, _| (503, status(503, "the authorizer is down")),
    );
    let checks = cluster.pre().await;
    find(
        &checks,
        Verdict::Fail,
        "cannot check permissions (create namespaces): the authorizer is down (503)",
    );
}

#[tokio::test]
async fn istio_is_a_conflict() {
    let cluster = Cluster::fresh();
    let api = &cluster.api;
    api.apply_json(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}),
    )
    .unwrap();
    api.apply_json(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "shop", "labels": {"istio-injection": "enabled"}}}))
        .unwrap();
    api.apply_json(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "blog", "labels": {"istio.io/rev": "1-24"}}}))
        .unwrap();
    api.apply_json(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "off", "labels": {"istio-injection": "disabled"}}}))
        .unwrap();
    for name in ["istio-sidecar-injector", "istio-revision-tag-default"] {
        api.apply_json(webhook_config(
            "MutatingWebhookConfiguration",
            name,
            "sidecar-injector.istio.io",
            "/inject",
            None,
        ))
        .unwrap();
    }
    let checks = cluster.pre().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "Istio is installed: namespace istio-system, \
         mutatingwebhookconfiguration istio-revision-tag-default, \
         mutatingwebhookconfiguration istio-sidecar-injector; \
         namespaces set up for its injection: blog (istio.io/rev=1-24), shop (istio-injection=enabled)",
        "uninstall Istio first (istioctl uninstall --purge)",
    );
    assert_eq!(exit_code(&checks), ExitCode::FAILURE);
    assert!(!render(&checks).contains("no other service mesh"));
}

#[tokio::test]
async fn a_linkerd_annotated_namespace_is_a_leftover_until_linkerd_is_there() {
    let cluster = Cluster::fresh();
    let api = &cluster.api;
    api.apply_json(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "shop", "annotations": {"linkerd.io/inject": "enabled"}}}))
        .unwrap();
    api.apply_json(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "off", "annotations": {"linkerd.io/inject": "disabled"}}}))
        .unwrap();
    let checks = cluster.pre().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "Linkerd is not installed, but namespaces set up for its injection: \
         shop (linkerd.io/inject=enabled)",
        "leftovers of an uninstall",
    );
    assert_eq!(exit_code(&checks), ExitCode::SUCCESS);

    api.apply_json(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "linkerd"}}),
    )
    .unwrap();
    api.apply_json(webhook_config(
        "MutatingWebhookConfiguration",
        "linkerd-proxy-injector-webhook-config",
        "linkerd-proxy-injector.linkerd.io",
        "/",
        None,
    ))
    .unwrap();
    let checks = cluster.pre().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "Linkerd is installed: namespace linkerd, \
         mutatingwebhookconfiguration linkerd-proxy-injector-webhook-config; \
         namespaces set up for its injection: shop (linkerd.io/inject=enabled)",
        "linkerd uninstall",
    );
}

#[tokio::test]
async fn open_service_mesh_is_a_conflict_and_an_existing_trellis_a_warning() {
    let cluster = Cluster::healthy();
    cluster
        .api
        .apply_json(webhook_config(
            "ValidatingWebhookConfiguration",
            "osm-webhook-osm",
            "osm-inject.k8s.io",
            "/validate",
            None,
        ))
        .unwrap();
    let checks = cluster.pre().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "Open Service Mesh is installed: validatingwebhookconfiguration osm-webhook-osm",
        "osm uninstall mesh",
    );
    find_hinted(
        &checks,
        Verdict::Warn,
        "Trellis is already installed: deployment trellis-system/trellis-control-plane, \
         mutatingwebhookconfiguration trellis-sidecar-injector, \
         validatingwebhookconfiguration trellis-config",
        "helm upgrade",
    );
    assert_eq!(
        failed(&checks),
        ["Open Service Mesh is installed: validatingwebhookconfiguration osm-webhook-osm"]
    );
}

// === control-plane ===

#[tokio::test]
async fn a_control_plane_without_available_replicas_fails() {
    let cluster = Cluster::healthy();
    cluster.set_available(0);
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "control plane: 0 of 2 replicas available",
        "kubectl -n trellis-system describe deployment/trellis-control-plane",
    );
    assert_eq!(exit_code(&checks), ExitCode::FAILURE);

    cluster.set_available(1);
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Warn,
        "control plane: 1 of 2 replicas available",
    );
    assert_eq!(exit_code(&checks), ExitCode::SUCCESS);
}

#[tokio::test]
async fn a_missing_control_plane_fails() {
    let cluster = Cluster::healthy();
    cluster
        .api
        .remove("deployments", NAMESPACE, "trellis-control-plane");
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "deployment trellis-system/trellis-control-plane not found",
        "helm install trellis charts/trellis -n trellis-system",
    );
}

#[tokio::test]
async fn control_plane_pods_on_two_versions_warn() {
    let cluster = Cluster::healthy();
    cluster
        .api
        .apply_json(pod(
            NAMESPACE,
            CP_B,
            control_plane_labels(),
            "ghcr.io/trellis-mesh/control-plane:0.2.0",
            "Running",
        ))
        .unwrap();
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "control plane pods run different versions: 0.1.0 (1 pod), 0.2.0 (1 pod)",
        "rollout status",
    );
}

// === crds ===

const CRD: &str = "authorizationpolicies.policy.trellis.dev";

#[tokio::test]
async fn a_missing_crd_fails() {
    let cluster = Cluster::healthy();
    cluster.api.remove("customresourcedefinitions", "", CRD);
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "CustomResourceDefinition authorizationpolicies.policy.trellis.dev not found",
        "kubectl apply -f charts/trellis/crds/ (Helm installs them on the first install only); \
         until then no AuthorizationPolicy can be created",
    );
    assert_eq!(failed(&checks).len(), 1);
    assert_eq!(exit_code(&checks), ExitCode::FAILURE);
}

#[tokio::test]
async fn a_crd_that_is_not_established_fails_with_the_api_servers_reason() {
    let cluster = Cluster::healthy();
    cluster.install_crds(|crd| {
        crd["status"] = json!({"conditions": [
            {"type": "NamesAccepted", "status": "False", "reason": "ShortNamesConflict",
             "message": "\"authz\" is already in use"},
            {"type": "Established", "status": "False", "reason": "NotAccepted",
             "message": "not all names are accepted"},
        ]});
    });
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "CustomResourceDefinition authorizationpolicies.policy.trellis.dev is not established: \
         NamesAccepted False: \"authz\" is already in use",
        "kubectl describe crd authorizationpolicies.policy.trellis.dev",
    );

    // Just created: no condition yet.
    cluster.install_crds(|crd| crd["status"] = json!({}));
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "CustomResourceDefinition authorizationpolicies.policy.trellis.dev is not established: \
         no Established condition",
        "kubectl apply -f charts/trellis/crds/",
    );
    assert_eq!(failed(&checks).len(), 1);
}

#[tokio::test]
async fn a_crd_that_does_not_serve_v1alpha1_fails() {
    let cluster = Cluster::healthy();
    cluster.install_crds(|crd| {
        crd["spec"]["versions"][0]["served"] = json!(false);
    });
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "CustomResourceDefinition authorizationpolicies.policy.trellis.dev does not serve \
         v1alpha1 (serves: none)",
        "kubectl apply -f charts/trellis/crds/ of the release you run",
    );
    cluster.install_crds(|crd| {
        crd["spec"]["versions"][0]["name"] = json!("v1alpha2");
    });
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Fail,
        "CustomResourceDefinition authorizationpolicies.policy.trellis.dev does not serve \
         v1alpha1 (serves: v1alpha2)",
    );
}

#[tokio::test]
async fn a_crd_from_another_release_warns() {
    let cluster = Cluster::healthy();
    // The previous release's schema: no limit on rules.
    cluster.install_crds(|crd| {
        let spec = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["spec"]["properties"];
        spec["rules"].as_object_mut().unwrap().remove("maxItems");
    });
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "CustomResourceDefinition authorizationpolicies.policy.trellis.dev v1alpha1: schema \
         differs from this trellis version's",
        "Helm never upgrades a chart's CRDs: kubectl apply -f charts/trellis/crds/",
    );
    assert_eq!(exit_code(&checks), ExitCode::SUCCESS);
}

#[test]
fn the_crd_as_the_chart_ships_it_is_the_one_generated() {
    // The chart's YAML (whole numbers as integers) reads back as the generated CRD: the
    // schema comparison above sees no difference where there is none.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../charts/trellis/crds/authorizationpolicies.policy.trellis.dev.yaml"
    ))
    .unwrap();
    let shipped: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
    let generated = trellis_controller::crd::crds();
    assert_eq!(
        crd_check(&generated[0], Some(&shipped)).verdict,
        Verdict::Fail
    );
    let mut established = shipped;
    established.status =
        serde_json::from_value(json!({"conditions": [{"type": "Established", "status": "True"}]}))
            .unwrap();
    assert_eq!(
        crd_check(&generated[0], Some(&established)),
        Check::ok(
            CRDS,
            "CustomResourceDefinition authorizationpolicies.policy.trellis.dev is established \
             and serves v1alpha1"
        )
    );
}

// === routes ===

#[tokio::test]
async fn missing_gateway_api_crds_warn_with_the_install_command() {
    let cluster = Cluster::healthy();
    let route_crd = "httproutes.gateway.networking.k8s.io";
    let mut crd = cluster
        .api
        .remove("customresourcedefinitions", "", route_crd)
        .unwrap();
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "Gateway API CRDs not installed (httproutes.gateway.networking.k8s.io not found)",
        "kubectl apply -f https://github.com/kubernetes-sigs/gateway-api/releases/download/\
         v1.6.1/standard-install.yaml",
    );
    assert!(failed(&checks).is_empty(), "{:?}", failed(&checks));
    assert_eq!(exit_code(&checks), ExitCode::SUCCESS, "a warning only");

    // An old Gateway API that does not serve v1 yet.
    crd["spec"]["versions"] = json!([{"name": "v1beta1", "served": true, "storage": true}]);
    crd["metadata"]["resourceVersion"] = Value::Null;
    cluster.api.apply_json(crd).unwrap();
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "CustomResourceDefinition httproutes.gateway.networking.k8s.io does not serve v1 \
         (serves: v1beta1)",
        "upgrade the Gateway API CRDs",
    );
}

// === webhook ===

#[tokio::test]
async fn a_missing_webhook_configuration_fails() {
    let cluster = Cluster::healthy();
    cluster.api.remove(
        "mutatingwebhookconfigurations",
        "",
        "trellis-sidecar-injector",
    );
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "MutatingWebhookConfiguration trellis-sidecar-injector not found",
        "install or upgrade the chart",
    );
    assert_eq!(exit_code(&checks), ExitCode::FAILURE);
}

#[tokio::test]
async fn an_empty_or_absent_ca_bundle_fails() {
    let cluster = Cluster::healthy();
    cluster.set_ca_bundles(Some(""));
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "MutatingWebhookConfiguration trellis-sidecar-injector: inject.trellis.dev has no caBundle",
        "the control plane keeps caBundle equal to the trust bundle",
    );
    find(
        &checks,
        Verdict::Fail,
        "ValidatingWebhookConfiguration trellis-config: config.trellis.dev has no caBundle",
    );
    cluster.set_ca_bundles(None);
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Fail,
        "ValidatingWebhookConfiguration trellis-config: config.trellis.dev has no caBundle",
    );
}

#[tokio::test]
async fn a_ca_bundle_other_than_the_trust_bundle_fails() {
    let cluster = Cluster::healthy();
    let other = cert("Someone else's root", true, (2035, 1, 1));
    cluster.set_ca_bundles(Some(&other));
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Fail,
        "MutatingWebhookConfiguration trellis-sidecar-injector: inject.trellis.dev: caBundle \
         differs from the trust bundle in trellis-trust-bundle",
    );
    // Order and repetition do not matter: the same set of certificates is the same bundle.
    let second = cert("Trellis root 2", true, (2036, 1, 1));
    cluster.set_trust_bundle(&format!("{}{second}", cluster.root));
    cluster.set_ca_bundles(Some(&format!("{second}{}{second}", cluster.root)));
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Ok,
        "MutatingWebhookConfiguration trellis-sidecar-injector: caBundle is the trust bundle \
         (3 certificates)",
    );
    // cert-manager's CA injector owns it: not compared.
    let mut config = webhook_config(
        "MutatingWebhookConfiguration",
        "trellis-sidecar-injector",
        "inject.trellis.dev",
        "/inject",
        Some(&other),
    );
    config["metadata"]["annotations"] =
        json!({"cert-manager.io/inject-ca-from": "trellis-system/trellis-webhook"});
    cluster.api.apply_json(config).unwrap();
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Ok,
        "MutatingWebhookConfiguration trellis-sidecar-injector: caBundle from cert-manager \
         (1 certificate)",
    );
}

#[tokio::test]
async fn an_expired_or_unparsable_ca_bundle_fails() {
    let cluster = Cluster::healthy();
    let old = cert("Old root", true, (2029, 6, 1));
    let both = format!("{}{old}", cluster.root);
    cluster.set_trust_bundle(&both);
    cluster.set_ca_bundles(Some(&both));
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Fail,
        "MutatingWebhookConfiguration trellis-sidecar-injector: inject.trellis.dev: caBundle \
         certificate CN=Old root has expired",
    );
    find(&checks, Verdict::Fail, "trust root CN=Old root: EXPIRED");

    cluster.set_ca_bundles(Some("not a certificate"));
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Fail,
        "ValidatingWebhookConfiguration trellis-config: config.trellis.dev: caBundle is not PEM \
         certificates: no PEM CERTIFICATE block",
    );
}

#[tokio::test]
async fn a_webhook_service_without_ready_endpoints_fails() {
    let cluster = Cluster::healthy();
    cluster.set_endpoints(&[Some(false), Some(false)]);
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "service trellis-system/trellis-webhook has no ready endpoints",
        "edits of trellis-config are refused",
    );
    assert_eq!(exit_code(&checks), ExitCode::FAILURE);
    cluster.set_endpoints(&[Some(false), None]);
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Ok,
        "service trellis-system/trellis-webhook has 1 ready endpoint",
    );
    cluster.api.remove("services", NAMESPACE, "trellis-webhook");
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Fail,
        "service trellis-system/trellis-webhook not found",
    );
}

#[tokio::test]
async fn a_dry_run_that_comes_back_without_the_proxy_fails() {
    let cluster = Cluster::healthy();
    cluster.inject_in("shop", false);
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "a dry-run pod in shop came back without the proxy (no trellis.dev/injected annotation)",
        "namespaceSelector and objectSelector of MutatingWebhookConfiguration \
         trellis-sidecar-injector",
    );
    assert_eq!(exit_code(&checks), ExitCode::FAILURE);
}

#[tokio::test]
async fn a_refused_dry_run_fails_with_the_api_servers_reason() {
    let cluster = Cluster::healthy();
    cluster
        .api
        .handle(Method::POST, "/api/v1/namespaces/shop/pods", |_, _| {
            (
                500,
                status(
                    500,
                    "Internal error occurred: failed calling webhook \"inject.trellis.dev\": \
                 tls: failed to verify certificate: x509: certificate signed by unknown authority",
                ),
            )
        });
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Fail,
        "a dry-run pod in shop was refused: Internal error occurred: failed calling webhook \
         \"inject.trellis.dev\": tls: failed to verify certificate: x509: certificate signed by \
         unknown authority (500)",
    );
}

#[tokio::test]
async fn injection_is_tested_only_where_the_injector_is_called() {
    let cluster = Cluster::healthy();
    cluster.api.remove("namespaces", "", "shop");
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "injection not tested: no namespace is labelled trellis.dev/inject=enabled",
        "--injection-namespace",
    );

    let mut options = options();
    options.injection_namespace = Some("default".to_owned());
    let checks = post_install(&cluster.api.client(), &options).await;
    find(
        &checks,
        Verdict::Warn,
        "injection not tested: namespace default is not labelled trellis.dev/inject=enabled \
         (the injector's namespaceSelector skips it)",
    );
    options.injection_namespace = Some("nowhere".to_owned());
    let checks = post_install(&cluster.api.client(), &options).await;
    find(
        &checks,
        Verdict::Warn,
        "injection not tested: namespace nowhere does not exist",
    );

    // An explicit, labelled namespace is used; the first labelled one otherwise.
    for ns in ["a-team", "shop"] {
        cluster
            .api
            .apply_json(json!({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": ns, "labels": {"trellis.dev/inject": "enabled"}}}))
            .unwrap();
    }
    cluster.inject_in("a-team", true);
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Ok,
        "a dry-run pod in a-team is injected (trellis.dev/injected=0.1.0, native sidecar)",
    );
    options.injection_namespace = Some("shop".to_owned());
    let checks = post_install(&cluster.api.client(), &options).await;
    find(
        &checks,
        Verdict::Ok,
        "a dry-run pod in shop is injected (trellis.dev/injected=0.1.0, native sidecar)",
    );
}

// === trust ===

#[tokio::test]
async fn an_expiring_trust_root_warns_then_fails() {
    let cluster = Cluster::with_root((2030, 1, 21));
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "trust root CN=Trellis root: 20 days left",
        "rotate the CA",
    );
    assert_eq!(exit_code(&checks), ExitCode::SUCCESS);

    let cluster = Cluster::with_root((2030, 1, 3));
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Fail,
        "trust root CN=Trellis root: 2 days left",
    );
    assert_eq!(exit_code(&checks), ExitCode::FAILURE);
}

#[tokio::test]
async fn a_missing_or_bad_trust_bundle_fails() {
    let cluster = Cluster::healthy();
    cluster
        .api
        .remove("configmaps", NAMESPACE, "trellis-trust-bundle");
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "trust bundle configmap trellis-system/trellis-trust-bundle: not found",
        "the control plane publishes it",
    );
    // Without a bundle the caBundles cannot be compared, but are still checked.
    find(
        &checks,
        Verdict::Ok,
        "MutatingWebhookConfiguration trellis-sidecar-injector: caBundle holds 1 certificate, \
         none expired",
    );

    let leaf = cert("not a CA", false, (2035, 1, 1));
    cluster.set_trust_bundle(&format!("{}{leaf}", cluster.root));
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Fail,
        "trust root CN=not a CA is not a CA certificate",
    );

    cluster.set_trust_bundle("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    let checks = cluster.post().await;
    let line = &checks
        .iter()
        .find(|c| c.line.starts_with("trust bundle configmap"))
        .unwrap()
        .line;
    assert!(
        line.starts_with(
            "trust bundle configmap trellis-system/trellis-trust-bundle: trust-bundle.pem is not \
             PEM certificates: not an X.509 certificate"
        ),
        "{line}"
    );
}

#[tokio::test]
async fn an_expiring_signing_certificate_fails() {
    let cluster = Cluster::healthy();
    cluster.serve_metrics(CP_A, metrics("0.1.0", 2, 0, &[("0.1.0", 2)], NOW + DAY));
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "CA signing certificate: 1 days left",
        "rotate the CA",
    );
    // The soonest of the replicas counts.
    let today = "trellis_build_info{version=\"0.1.0\"} 1\n\
                 trellis_discovery_connected_proxies 1\n\
                 trellis_ca_signing_expiry_timestamp_seconds 1893000000\n";
    cluster.serve_metrics(CP_A, today.to_owned());
    let checks = cluster.post().await;
    find(&checks, Verdict::Fail, "CA signing certificate: EXPIRED");
}

// === data-plane ===

#[tokio::test]
async fn proxies_behind_warn() {
    let cluster = Cluster::healthy();
    cluster.serve_metrics(
        CP_B,
        metrics("0.1.0", 1, 1, &[("0.1.0", 1)], NOW + 200 * DAY),
    );
    cluster.serve_metrics(
        CP_A,
        metrics("0.1.0", 2, 1, &[("0.1.0", 2)], NOW + 200 * DAY),
    );
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "2 proxies have not acked the latest configuration",
        "they may still be applying it",
    );
    assert_eq!(exit_code(&checks), ExitCode::SUCCESS);
}

#[tokio::test]
async fn proxy_version_skew_warns_and_fails_past_one_minor() {
    let cluster = Cluster::healthy();
    let signing = NOW + 200 * DAY;
    cluster.serve_metrics(CP_A, metrics("0.1.0", 2, 0, &[("0.0.9", 2)], signing));
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "proxies on other versions than the control plane's 0.1.0: 0.0.9 (2 proxies)",
        "kubectl rollout restart",
    );
    assert_eq!(exit_code(&checks), ExitCode::SUCCESS);

    cluster.serve_metrics(
        CP_A,
        metrics("0.3.0", 2, 0, &[("0.1.0", 1), ("0.3.0", 1)], signing),
    );
    cluster.serve_metrics(CP_B, metrics("0.3.0", 1, 0, &[("0.1.0", 1)], signing));
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "proxies more than one minor version from the control plane's 0.3.0: 0.1.0 (2 proxies)",
        "not supported",
    );
    assert_eq!(exit_code(&checks), ExitCode::FAILURE);
}

#[tokio::test]
async fn injected_pods_that_are_not_connected_warn() {
    let cluster = Cluster::healthy();
    cluster.serve_metrics(CP_B, metrics("0.1.0", 0, 0, &[], NOW + 200 * DAY));
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "1 injected pod is not connected: 3 injected pods running, 2 proxies connected to 2 \
         control plane replicas",
        "kubectl logs POD -c trellis-proxy",
    );
}

#[tokio::test]
async fn unreadable_metrics_warn_for_one_replica_and_fail_for_all() {
    let cluster = Cluster::healthy();
    cluster.api.handle(
        Method::GET,
        &format!("/api/v1/namespaces/{NAMESPACE}/pods/{CP_B}:9090/proxy/metrics"),
        |_, _| {
            (
                503,
                status(503, "error trying to reach service: connection refused"),
            )
        },
    );
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Warn,
        "cannot read the metrics of trellis-control-plane-7d9f-b: error trying to reach service: \
         connection refused (503)",
        "kubectl get --raw /api/v1/namespaces/trellis-system/pods/trellis-control-plane-7d9f-b:9090/proxy/metrics",
    );
    find(
        &checks,
        Verdict::Warn,
        "1 injected pod is not connected: 3 injected pods running, 2 proxies connected to 1 \
         control plane replica",
    );

    cluster.api.handle(
        Method::GET,
        &format!("/api/v1/namespaces/{NAMESPACE}/pods/{CP_A}:9090/proxy/metrics"),
        |_, _| (404, Value::String("404 page not found".to_owned())),
    );
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Fail,
        "cannot read the metrics of trellis-control-plane-7d9f-a: 404 page not found (404)",
    );
    assert!(!render(&checks).contains("CA signing certificate"));
}

// === pure decisions ===

#[test]
fn versions() {
    let cases = [
        ("v1.26.15", Verdict::Fail),
        ("v1.27.9", Verdict::Fail),
        ("v1.28.0", Verdict::Warn),
        ("v1.28.3-eks-1234", Verdict::Warn),
        ("v1.29.0", Verdict::Ok),
        ("v1.33.1+k3s1", Verdict::Ok),
        ("v2.0.0", Verdict::Ok),
        ("devel", Verdict::Warn),
    ];
    for (version, verdict) in cases {
        assert_eq!(version_check(version).verdict, verdict, "{version}");
    }
}

#[test]
fn skew() {
    let of = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
        pairs.iter().map(|(v, n)| ((*v).to_owned(), *n)).collect()
    };
    // (control plane version, proxies per version, verdict, line)
    type Case<'a> = (&'a str, &'a [(&'a str, u64)], Verdict, &'a str);
    let cases: [Case<'_>; 7] = [
        (
            "0.1.0",
            &[("0.1.0", 4)],
            Verdict::Ok,
            "every proxy runs the control plane's version 0.1.0",
        ),
        (
            "0.1.0",
            &[],
            Verdict::Ok,
            "no proxy to compare with the control plane's version 0.1.0",
        ),
        (
            "0.1.0",
            &[("0.1.0", 3), ("0.1.1", 0)],
            Verdict::Ok,
            "every proxy runs the control plane's version 0.1.0",
        ),
        (
            "0.2.0",
            &[("0.1.4", 1), ("0.2.1", 2)],
            Verdict::Warn,
            "proxies on other versions than the control plane's 0.2.0: 0.1.4 (1 proxy), 0.2.1 (2 proxies)",
        ),
        (
            "1.4.0",
            &[("1.2.0", 1), ("1.3.0", 1)],
            Verdict::Fail,
            "proxies more than one minor version from the control plane's 1.4.0: 1.2.0 (1 proxy), 1.3.0 (1 proxy)",
        ),
        (
            "1.0.0",
            &[("0.9.0", 1)],
            Verdict::Fail,
            "proxies more than one minor version from the control plane's 1.0.0: 0.9.0 (1 proxy)",
        ),
        (
            "0.1.0",
            &[("dev", 1)],
            Verdict::Warn,
            "proxies on other versions than the control plane's 0.1.0: dev (1 proxy)",
        ),
    ];
    for (ours, proxies, verdict, line) in cases {
        let check = skew_check(ours, &of(proxies));
        assert_eq!(
            (check.verdict, check.line.as_str()),
            (verdict, line),
            "{ours} {proxies:?}"
        );
    }
}

#[test]
fn image_versions() {
    let cases = [
        ("ghcr.io/trellis-mesh/control-plane:0.1.0", "0.1.0"),
        ("localhost:5000/trellis/control-plane:dev", "dev"),
        ("localhost:5000/trellis/control-plane", "latest"),
        ("control-plane", "latest"),
        (
            "ghcr.io/trellis-mesh/control-plane@sha256:0123456789abcdef0123",
            "@sha256:0123456789ab",
        ),
    ];
    for (image, version) in cases {
        assert_eq!(image_version(image), version, "{image}");
    }
}

#[test]
fn replica_metrics_read_the_contract_families_and_skip_the_rest() {
    let text = metrics(
        "0.1.0",
        5,
        1,
        &[("0.1.0", 4), ("0.0.9", 1), ("0.0.8", 0)],
        1_900_000_000,
    );
    let m = replica_metrics(&text).unwrap();
    assert_eq!(
        m,
        ReplicaMetrics {
            version: Some("0.1.0".to_owned()),
            connected: 5,
            behind: 1,
            by_version: BTreeMap::from([("0.0.9".to_owned(), 1), ("0.1.0".to_owned(), 4)]),
            signing_not_after: Some(1_900_000_000),
            webhook_not_after: Some(NOW + 20 * 3600),
        }
    );
    assert_eq!(replica_metrics("").unwrap(), ReplicaMetrics::default());
    assert!(replica_metrics("trellis_build_info{version=\"0.1.0} 1\n").is_err());
}

#[test]
fn permission_lines() {
    let answers: Vec<(Access, Result<bool, String>)> =
        CHART_CREATES.iter().map(|a| (*a, Ok(true))).collect();
    assert_eq!(
        permissions_check(NAMESPACE, &answers),
        Check::ok(
            PRE_INSTALL,
            "can create the 15 kinds of objects the chart installs"
        )
    );
}

#[test]
fn the_webhook_certificate_must_be_renewed_in_time() {
    let at = |left: Option<i64>| {
        let m = ReplicaMetrics {
            webhook_not_after: left.map(|l| NOW.saturating_add_signed(l)),
            ..ReplicaMetrics::default()
        };
        webhook_cert_check(&[&m], NOW)
    };
    let ok = at(Some(13 * 3600));
    assert_eq!(
        (ok.verdict, ok.line.as_str()),
        (
            Verdict::Ok,
            "webhook serving certificate (from the mesh CA): 13h 0m left"
        )
    );
    let late = at(Some(59 * 60));
    assert_eq!(
        (late.verdict, late.line.as_str()),
        (
            Verdict::Warn,
            "webhook serving certificate (from the mesh CA): 0h 59m left"
        )
    );
    assert_eq!(at(Some(0)).verdict, Verdict::Fail);
    assert_eq!(at(Some(-60)).verdict, Verdict::Fail);
    assert!(at(Some(-60)).line.contains("EXPIRED"));
    assert_eq!(at(None).verdict, Verdict::Warn);
    // The soonest of the replicas counts.
    let (a, b) = (
        ReplicaMetrics {
            webhook_not_after: Some(NOW + 20 * 3600),
            ..ReplicaMetrics::default()
        },
        ReplicaMetrics {
            webhook_not_after: Some(NOW + 30 * 60),
            ..ReplicaMetrics::default()
        },
    );
    assert_eq!(webhook_cert_check(&[&a, &b], NOW).verdict, Verdict::Warn);
}

#[tokio::test]
async fn an_injected_namespace_without_the_current_trust_bundle_fails() {
    let cluster = Cluster::healthy();
    // A second injected namespace the publisher has not reached, and shop on an old bundle.
    cluster
        .api
        .apply_json(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "pay", "labels": {"trellis.dev/inject": "enabled"}}}))
        .unwrap();
    let old = cert("Old root", true, (2031, 6, 1));
    cluster.publish_bundle("shop", &old);
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "trust bundle configmap trellis-trust-bundle not current in 2 of 2 injected namespaces: \
         pay (missing), shop (differs)",
        "cannot start their proxy",
    );
    // Published again: current everywhere.
    cluster.publish_bundle("shop", &cluster.root);
    cluster.publish_bundle("pay", &cluster.root);
    let checks = cluster.post().await;
    find(
        &checks,
        Verdict::Ok,
        "trust bundle published in every injected namespace (2)",
    );
}

#[tokio::test]
async fn pod_security_that_refuses_the_capture_step_fails() {
    let cluster = Cluster::healthy();
    for (name, level) in [
        ("shop", "restricted"),
        ("pay", "baseline"),
        ("ops", "privileged"),
    ] {
        cluster
            .api
            .apply_json(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {
                "trellis.dev/inject": "enabled",
                "pod-security.kubernetes.io/enforce": level,
            }}}))
            .unwrap();
    }
    // Not injected: its level does not matter.
    cluster
        .api
        .apply_json(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "locked", "labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
        }}}))
        .unwrap();
    let checks = cluster.post().await;
    find_hinted(
        &checks,
        Verdict::Fail,
        "Pod Security refuses injected pods (the capture step needs NET_ADMIN and NET_RAW) in: \
         pay (baseline), shop (restricted)",
        "pod-security.kubernetes.io/enforce=privileged",
    );
}
