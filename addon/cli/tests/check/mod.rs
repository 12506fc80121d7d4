//! `trellis check --pre` and `--kubernetes` as a user runs them: the real binary, a
//! kubeconfig (`KUBECONFIG`, `--context`) pointing at the Kubernetes API stand-in served
//! over HTTPS, the printed report and the exit code. Every check's decision is tested
//! in the binary's unit tests (`src/check/cluster/tests.rs`); this covers the wiring.

use std::path::Path;
use std::process::Output;

use http::Method;
use serde_json::{Value, json};
use trellis_kube::stand_in::ApiStandIn;

async fn trellis_check(kubeconfig: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .arg("check")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await
        .unwrap()
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_against_a_cluster_through_a_kubeconfig() {
    let api = ApiStandIn::default();
    api.set_version("v1.26.3");
    api.apply_json(namespace("default")).unwrap();
    api.apply_json(namespace("istio-system")).unwrap();
    api.handle(
        Method::POST,
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        |_, body| {
            let mut review: Value = serde_json::from_slice(body).unwrap();
            review["status"] = json!({"allowed": true});
            (201, review)
        },
    );
    let https = api.serve_https().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    https.write_kubeconfig(&kubeconfig).unwrap();

    // Before an install, on a cluster too old and with Istio.
    let out = trellis_check(&kubeconfig, &["--pre", "--context", "trellis-stand-in"]).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout,
        "\
kubernetes-api
--------------
✔ can initialize the client
✔ can query the Kubernetes API

kubernetes-version
------------------
✖ Kubernetes v1.26.3 is older than 1.28, the oldest Trellis supports
    hint: upgrade the cluster to 1.29 or later (native sidecars)

pre-install
-----------
✔ can create the 16 kinds of objects the chart installs
✔ Trellis is not installed yet
✖ Istio is installed: namespace istio-system
    hint: two meshes' sidecars in one pod fight over its traffic: uninstall Istio first (istioctl uninstall --purge)

✖ 2 checks failed
",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1));

    // Ready for an install: exit 0.
    api.set_version("v1.31.0");
    api.remove("namespaces", "", "istio-system").unwrap();
    let out = trellis_check(&kubeconfig, &["--pre"]).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.ends_with("\n\nStatus check results are ✔\n"),
        "{stdout}"
    );
    assert_eq!(out.status.code(), Some(0));

    // After an install that did not happen: every part is missing, with what to do.
    let out = trellis_check(&kubeconfig, &["--kubernetes"]).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout,
        "\
kubernetes-api
--------------
✔ can initialize the client
✔ can query the Kubernetes API

kubernetes-version
------------------
✔ Kubernetes v1.31.0 runs native sidecars (1.29 or later)

control-plane
-------------
✖ deployment trellis-system/trellis-control-plane not found
    hint: install the chart: helm install trellis charts/trellis -n trellis-system

crds
----
✖ CustomResourceDefinition authorizationpolicies.policy.trellis.dev not found
    hint: kubectl apply -f charts/trellis/crds/ (Helm installs them on the first install only); until then no AuthorizationPolicy can be created

routes
------
‼ Gateway API CRDs not installed (httproutes.gateway.networking.k8s.io not found)
    hint: kubectl apply -f https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.6.1/standard-install.yaml to route, split and time out requests with HTTPRoutes (until then Services are served unrouted)

webhook
-------
✖ MutatingWebhookConfiguration trellis-sidecar-injector not found
    hint: install or upgrade the chart: it creates both webhook configurations
✖ ValidatingWebhookConfiguration trellis-config not found
    hint: install or upgrade the chart: it creates both webhook configurations
✖ service trellis-system/trellis-webhook not found
    hint: install or upgrade the chart: the API server calls both webhooks through it
‼ injection not tested: no namespace is labelled trellis.dev/inject=enabled
    hint: label a namespace for injection (kubectl label namespace NAME trellis.dev/inject=enabled) or pass --injection-namespace with one

trust
-----
✖ trust bundle configmap trellis-system/trellis-trust-bundle: not found
    hint: the control plane publishes it once its CA is loaded: check its log (kubectl -n trellis-system logs deployment/trellis-control-plane)

data-plane
----------
✖ no running control plane pod to read metrics from
    hint: see the control-plane checks above

✖ 7 checks failed, 2 warnings
"
    );
    assert_eq!(out.status.code(), Some(1));

    // The API gone: the first check that needs it fails, and nothing after it runs.
    drop(https);
    let out = trellis_check(&kubeconfig, &["--kubernetes"]).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with(
            "kubernetes-api\n--------------\n✔ can initialize the client\n\
             ✖ can query the Kubernetes API: "
        ),
        "{stdout}"
    );
    assert!(stdout.ends_with("\n\n✖ 1 check failed\n"), "{stdout}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn kubernetes_flags_need_kubernetes_mode() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["check", "--context", "prod"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--kubernetes"), "{stderr}");
}
