//! Table tests over real AdmissionReview v1 shapes (tests/fixtures/*.json): each fixture
//! holds the namespace's labels, the cluster version, the review and the expected answer.
//! Every patch is applied to the pod as the API server would, and the result is checked
//! field by field and injected again (which must be a skip).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use trellis_webhook::{
    Decision, InjectConfig, KubeVersion, Outcome, SkipReason, apply_patch, inject, review,
};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(name: &str) -> Value {
    let path = fixtures_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// What the control plane builds from the chart: the proxy image, its own init image,
/// and the control plane's Service name.
fn config(version: &str) -> InjectConfig {
    InjectConfig {
        kubernetes_version: version.parse::<KubeVersion>().unwrap(),
        init_image: Some("trellis.azurecr.io/trellis/proxy-init:0.1.0".to_owned()),
        ..InjectConfig::new(
            "trellis.azurecr.io/trellis/proxy:0.1.0",
            trellis_webhook::DEFAULT_CONTROL_PLANE,
        )
    }
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(v.clone()).unwrap()
}

/// What one fixture produced.
struct Run {
    outcome: Outcome,
    message: String,
    response: Value,
    /// The pod after the patch (the request's pod when there was none).
    pod: Value,
}

fn run(name: &str) -> Run {
    let f = load(name);
    let ns_labels = labels(&f["namespaceLabels"]);
    let cfg = config(f["kubernetesVersion"].as_str().unwrap());
    let body = serde_json::to_vec(&f["review"]).unwrap();
    let reviewed = review(&body, &|_| ns_labels.clone(), &cfg);
    let answer: Value = serde_json::from_slice(&reviewed.body).unwrap();
    let mut pod = f["review"]["request"]["object"].clone();
    if let Some(patch) = answer["response"]["patch"].as_str() {
        assert_eq!(answer["response"]["patchType"], "JSONPatch", "{name}");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&bytes).unwrap();
        apply_patch(&mut pod, &ops).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    Run {
        outcome: reviewed.outcome,
        message: reviewed.message,
        response: answer["response"].clone(),
        pod,
    }
}

fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {list}"))
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().map(|c| c["name"].as_str().unwrap()).collect())
        .unwrap_or_default()
}

fn env_of(c: &Value) -> BTreeMap<String, Value> {
    c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let v = e
                .get("value")
                .cloned()
                .unwrap_or_else(|| e["valueFrom"].clone());
            (e["name"].as_str().unwrap().to_owned(), v)
        })
        .collect()
}

#[test]
fn every_fixture_gets_its_expected_answer() {
    let all = fixture_names();
    assert!(all.len() >= 13, "{all:?}");
    for name in all {
        let f = load(&name);
        let r = run(&name);
        let expect = &f["expect"];
        let outcome = match r.outcome {
            Outcome::Injected => "injected",
            Outcome::Skipped => "skipped",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
        };
        assert_eq!(outcome, expect["outcome"], "{name}: {}", r.message);
        let wanted = expect["messageContains"].as_str().unwrap();
        assert!(
            r.message.contains(wanted),
            "{name}: {:?} lacks {wanted:?}",
            r.message
        );
        assert_eq!(
            r.response["allowed"],
            matches!(r.outcome, Outcome::Injected | Outcome::Skipped),
            "{name}"
        );
        if r.outcome != Outcome::Invalid {
            assert_eq!(r.response["uid"], f["review"]["request"]["uid"], "{name}");
        }
        // Base64, as the API documents `patch` (Go's []byte), not kube's array of numbers.
        let patch = r.response.get("patch");
        assert_eq!(
            patch.is_some_and(Value::is_string),
            r.outcome == Outcome::Injected,
            "{name}"
        );
        if r.outcome == Outcome::Denied {
            assert_eq!(r.response["status"]["code"], 422, "{name}");
        }
    }
}

#[test]
fn injecting_the_result_again_is_a_skip() {
    for name in fixture_names() {
        let r = run(&name);
        if r.outcome != Outcome::Injected {
            continue;
        }
        let f = load(&name);
        let pod: Pod = serde_json::from_value(r.pod.clone()).unwrap();
        let cfg = config(f["kubernetesVersion"].as_str().unwrap());
        let again = inject(&pod, &labels(&f["namespaceLabels"]), &cfg).unwrap();
        assert_eq!(
            again,
            Decision::Skip(SkipReason::AlreadyInjected(
                "annotation trellis.dev/injected=0.1.0".into()
            )),
            "{name}"
        );
        // The proxy container alone (the annotation removed) also stops a second injection.
        let mut stripped = r.pod.clone();
        stripped["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("trellis.dev/injected");
        let pod: Pod = serde_json::from_value(stripped).unwrap();
        let again = inject(&pod, &labels(&f["namespaceLabels"]), &cfg).unwrap();
        assert!(
            matches!(again, Decision::Skip(SkipReason::AlreadyInjected(ref w)) if w.contains("container trellis-proxy")),
            "{name}: {again:?}"
        );
    }
}

#[test]
fn a_namespace_opt_in_gets_a_native_sidecar_with_least_privilege() {
    let r = run("deployment-namespace-opt-in");
    let pod = &r.pod;
    // Capture first, then the proxy, both init containers; the app is untouched.
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["trellis-init", "trellis-proxy"]
    );
    assert_eq!(names(&pod["spec"]["containers"]), ["web"]);
    let original = load("deployment-namespace-opt-in");
    assert_eq!(
        pod["spec"]["containers"][0],
        original["review"]["request"]["object"]["spec"]["containers"][0],
        "app container and its probes unchanged"
    );

    let init = container(&pod["spec"]["initContainers"], "trellis-init");
    assert_eq!(init["args"], json!(["init"]));
    // The capture step runs from its own image (iptables), the proxy from the proxy's.
    assert_eq!(init["image"], "trellis.azurecr.io/trellis/proxy-init:0.1.0");
    assert_eq!(
        init["securityContext"],
        json!({
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "seccompProfile": { "type": "RuntimeDefault" },
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "readOnlyRootFilesystem": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
        })
    );
    let env = env_of(init);
    assert_eq!(env["TRELLIS_INIT_EXCLUDE_INBOUND_PORTS"], "8080,15090");
    assert_eq!(env["TRELLIS_INIT_EXCLUDE_OUTBOUND_PORTS"], "");
    assert_eq!(
        env["TRELLIS_INIT_EXCLUDE_OUTBOUND_CIDRS"],
        "169.254.169.254/32"
    );
    assert_eq!(env["TRELLIS_INIT_PROXY_UID"], "1337");
    assert!(init.get("restartPolicy").is_none());

    let proxy = container(&pod["spec"]["initContainers"], "trellis-proxy");
    assert_eq!(proxy["restartPolicy"], "Always");
    // The app starts only once the proxy is ready.
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"],
        serde_json::json!(["/usr/local/bin/trellis-proxy", "wait", "--timeout", "120s"])
    );
    assert_eq!(proxy["args"], json!(["run"]));
    assert_eq!(
        proxy["securityContext"],
        json!({
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "seccompProfile": { "type": "RuntimeDefault" },
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
        })
    );
    let env = env_of(proxy);
    let field = |p: &str| json!({ "fieldRef": { "apiVersion": "v1", "fieldPath": p } });
    assert_eq!(env["TRELLIS_PROXY_MODE"], "transparent");
    assert_eq!(proxy["image"], "trellis.azurecr.io/trellis/proxy:0.1.0");
    assert_eq!(
        env["TRELLIS_PROXY_CONTROL_PLANE"], "trellis-control-plane.trellis-system.svc:15010",
        "the Service's DNS name, passed as given"
    );
    assert_eq!(
        env["TRELLIS_PROXY_CONTROL_PLANE_IDENTITY"],
        "spiffe://cluster.local/ns/trellis-system/sa/trellis-control-plane"
    );
    assert_eq!(env["TRELLIS_PROXY_TRUST_DOMAIN"], "cluster.local");
    assert_eq!(
        env["TRELLIS_PROXY_CA_ROOTS"],
        "/var/run/trellis/trust/trust-bundle.pem"
    );
    assert_eq!(
        env["TRELLIS_PROXY_TOKEN_FILE"],
        "/var/run/secrets/trellis/tokens/token"
    );
    assert_eq!(env["TRELLIS_PROXY_WORKLOAD"], field("metadata.name"));
    assert_eq!(env["TRELLIS_PROXY_NAMESPACE"], field("metadata.namespace"));
    assert_eq!(
        env["TRELLIS_PROXY_SERVICE_ACCOUNT"],
        field("spec.serviceAccountName")
    );
    assert_eq!(env["TRELLIS_PROXY_SERVICE_NAME"], "web");
    assert_eq!(env["TRELLIS_PROXY_METRICS"], "0.0.0.0:15090");
    assert_eq!(env["TRELLIS_LOG"], "info");
    assert!(!env.contains_key("TRELLIS_PROXY_SHUTDOWN_TOKEN_FILE"));
    assert_eq!(
        proxy["ports"],
        json!([{ "name": "trellis-metrics", "containerPort": 15090, "protocol": "TCP" }])
    );
    assert_eq!(
        proxy["startupProbe"]["httpGet"],
        json!({ "path": "/metrics", "port": 15090 })
    );
    assert_eq!(
        proxy["resources"],
        json!({ "requests": { "cpu": "50m", "memory": "64Mi" }, "limits": { "memory": "256Mi" } })
    );
    assert_eq!(
        proxy["volumeMounts"],
        json!([
            { "name": "trellis-token", "mountPath": "/var/run/secrets/trellis/tokens", "readOnly": true },
            { "name": "trellis-trust", "mountPath": "/var/run/trellis/trust", "readOnly": true },
        ])
    );

    assert_eq!(
        pod["spec"]["volumes"],
        json!([
            { "name": "trellis-token", "projected": { "sources": [{ "serviceAccountToken": {
                "audience": "trellis", "expirationSeconds": 3600, "path": "token" } }] } },
            { "name": "trellis-trust", "configMap": { "name": "trellis-trust-bundle",
                "items": [{ "key": "trust-bundle.pem", "path": "trust-bundle.pem" }] } },
        ])
    );
    assert_eq!(
        pod["metadata"]["annotations"],
        json!({
            "trellis.dev/injected": "0.1.0",
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "15090",
            "prometheus.io/path": "/metrics",
            "kubectl.kubernetes.io/default-container": "web",
        })
    );
    assert_eq!(pod["metadata"]["labels"]["trellis.dev/proxy"], "native");
    assert_eq!(pod["metadata"]["labels"]["app"], "web");
}

#[test]
fn existing_init_containers_volumes_and_annotations_are_kept() {
    let r = run("existing-init-containers-and-volumes");
    let pod = &r.pod;
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["trellis-init", "trellis-proxy", "migrate"]
    );
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        [
            "kube-api-access-x7k2p",
            "cache",
            "trellis-token",
            "trellis-trust"
        ]
    );
    let a = &pod["metadata"]["annotations"];
    // The app's own scrape annotations stay; ours are not forced over them.
    assert_eq!(a["prometheus.io/port"], "9102");
    assert!(a.get("prometheus.io/path").is_none());
    assert_eq!(a["trellis.dev/injected"], "0.1.0");
    assert_eq!(a["trellis.dev/inject"], "enabled");
    let init = container(&pod["spec"]["initContainers"], "trellis-init");
    let env = env_of(init);
    assert_eq!(env["TRELLIS_INIT_EXCLUDE_INBOUND_PORTS"], "8080,9102,15090");
    assert_eq!(env["TRELLIS_INIT_EXCLUDE_OUTBOUND_PORTS"], "5432");
    assert_eq!(
        env["TRELLIS_INIT_EXCLUDE_OUTBOUND_CIDRS"],
        "169.254.169.254/32,10.20.0.0/16,fd00:1::/64"
    );
    let proxy = container(&pod["spec"]["initContainers"], "trellis-proxy");
    assert_eq!(env_of(proxy)["TRELLIS_PROXY_SERVICE_NAME"], "payments-api");

    // The operations themselves: per-key adds with RFC 6901 escaping, appends and
    // inserts at the front, never a replace of what the pod had.
    let f = load("existing-init-containers-and-volumes");
    let pod_in: Pod = serde_json::from_value(f["review"]["request"]["object"].clone()).unwrap();
    let Decision::Patch(ops, _) = inject(&pod_in, &BTreeMap::new(), &config("1.29")).unwrap()
    else {
        panic!("not injected");
    };
    let paths: Vec<(&str, &str)> = ops
        .iter()
        .map(|o| (o["op"].as_str().unwrap(), o["path"].as_str().unwrap()))
        .collect();
    assert_eq!(
        paths,
        [
            ("add", "/metadata/annotations/trellis.dev~1injected"),
            (
                "add",
                "/metadata/annotations/kubectl.kubernetes.io~1default-container"
            ),
            ("add", "/metadata/labels/trellis.dev~1proxy"),
            ("add", "/spec/volumes/-"),
            ("add", "/spec/volumes/-"),
            ("add", "/spec/initContainers/0"),
            ("add", "/spec/initContainers/1"),
        ]
    );
}

#[test]
fn classic_sidecar_on_1_28_runs_first_with_capture_last() {
    let r = run("classic-sidecar-1-28");
    let pod = &r.pod;
    assert_eq!(names(&pod["spec"]["initContainers"]), ["trellis-init"]);
    assert_eq!(names(&pod["spec"]["containers"]), ["trellis-proxy", "web"]);
    let proxy = container(&pod["spec"]["containers"], "trellis-proxy");
    assert!(proxy.get("restartPolicy").is_none());
    // A classic sidecar holds the app containers with its postStart hook.
    assert_eq!(
        proxy["lifecycle"]["postStart"]["exec"]["command"][1],
        "wait"
    );
    assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
    assert_eq!(pod["metadata"]["labels"]["trellis.dev/proxy"], "classic");
    // `kubectl logs` and `exec` pick the app, not the proxy now in front of it.
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "web"
    );
    assert!(!env_of(proxy).contains_key("TRELLIS_PROXY_SHUTDOWN_TOKEN_FILE"));
}

#[test]
fn a_classic_job_gets_the_shutdown_token_a_native_one_does_not() {
    let r = run("job-pod-classic");
    let pod = &r.pod;
    assert_eq!(
        names(&pod["spec"]["containers"]),
        ["trellis-proxy", "report"]
    );
    let proxy = container(&pod["spec"]["containers"], "trellis-proxy");
    assert_eq!(
        env_of(proxy)["TRELLIS_PROXY_SHUTDOWN_TOKEN_FILE"],
        "/var/run/trellis/shutdown/token"
    );
    assert_eq!(env_of(proxy)["TRELLIS_PROXY_SERVICE_NAME"], "report");
    let shutdown_mount = json!({
        "name": "trellis-shutdown", "mountPath": "/var/run/trellis/shutdown", "readOnly": true
    });
    let app = container(&pod["spec"]["containers"], "report");
    assert_eq!(app["volumeMounts"], json!([shutdown_mount]));
    assert!(
        proxy["volumeMounts"]
            .as_array()
            .unwrap()
            .contains(&shutdown_mount)
    );
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    assert_eq!(
        volumes[2],
        json!({ "name": "trellis-shutdown", "downwardAPI": { "items": [{ "path": "token",
            "fieldRef": { "apiVersion": "v1", "fieldPath": "metadata.uid" } }] } })
    );

    let r = run("job-pod-native");
    let pod = &r.pod;
    assert_eq!(names(&pod["spec"]["containers"]), ["report"]);
    assert_eq!(
        names(&pod["spec"]["initContainers"]),
        ["trellis-init", "trellis-proxy"]
    );
    assert_eq!(
        names(&pod["spec"]["volumes"]),
        ["trellis-token", "trellis-trust"]
    );
    assert!(pod["spec"]["containers"][0].get("volumeMounts").is_none());
}

#[test]
fn malformed_reviews_are_refused_never_a_panic() {
    let cfg = config("1.29");
    let none = |_: &str| BTreeMap::new();
    let cases: [(&[u8], u16, &str); 5] = [
        (b"not json", 400, "request body is not JSON"),
        (b"{}", 400, "expected apiVersion admission.k8s.io/v1"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            400,
            "has no request",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u-2","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","userInfo":{}}}"#,
            200,
            "request.object: missing for CREATE",
        ),
        (
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u-3","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"operation":"CREATE","userInfo":{},"object":{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x"},"spec":{"containers":"nope"}}}}"#,
            200,
            "request.object: not a Pod",
        ),
    ];
    for (body, status, wanted) in cases {
        let r = review(body, &none, &cfg);
        assert_eq!(r.outcome, Outcome::Invalid, "{wanted}");
        assert_eq!(r.http_status, status, "{wanted}");
        assert!(
            r.message.contains(wanted),
            "{:?} lacks {wanted:?}",
            r.message
        );
        let answer: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(answer["response"]["allowed"], false);
        assert_eq!(answer["response"]["status"]["code"], 400);
    }
}

#[test]
fn opt_in_rules() {
    let f = load("deployment-namespace-opt-in");
    let base: Pod = serde_json::from_value(f["review"]["request"]["object"].clone()).unwrap();
    let cfg = config("1.29");
    let enabled = labels(&json!({ "trellis.dev/inject": "enabled" }));
    let disabled = labels(&json!({ "trellis.dev/inject": "disabled" }));
    let none = BTreeMap::new();
    let with = |labels: &[(&str, &str)], annotations: &[(&str, &str)]| {
        let mut p = base.clone();
        let l = p.metadata.labels.get_or_insert_default();
        l.extend(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        if !annotations.is_empty() {
            let a = p.metadata.annotations.get_or_insert_default();
            a.extend(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            );
        }
        p
    };
    let injected = |d: Result<Decision, _>| matches!(d, Ok(Decision::Patch(..)));
    let k = "trellis.dev/inject";
    assert!(injected(inject(&base, &enabled, &cfg)));
    assert_eq!(
        inject(&base, &none, &cfg),
        Ok(Decision::Skip(SkipReason::NotOptedIn))
    );
    assert_eq!(
        inject(&base, &disabled, &cfg),
        Ok(Decision::Skip(SkipReason::NotOptedIn))
    );
    assert!(injected(inject(&with(&[(k, "enabled")], &[]), &none, &cfg)));
    assert!(injected(inject(
        &with(&[], &[(k, "enabled")]),
        &disabled,
        &cfg
    )));
    assert_eq!(
        inject(&with(&[(k, "enabled")], &[(k, "disabled")]), &enabled, &cfg),
        Ok(Decision::Skip(SkipReason::OptedOut))
    );
    let e = inject(&with(&[(k, "yes")], &[]), &enabled, &cfg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "metadata.labels[\"trellis.dev/inject\"]: \"yes\" must be \"enabled\" or \"disabled\""
    );
    let mut ts = base.clone();
    ts.metadata.namespace = Some("trellis-system".into());
    assert_eq!(
        inject(&ts, &enabled, &cfg),
        Ok(Decision::Skip(SkipReason::SystemNamespace(
            "trellis-system".into()
        )))
    );
}

#[test]
fn bad_values_are_errors_naming_the_field() {
    let f = load("deployment-namespace-opt-in");
    let base: Pod = serde_json::from_value(f["review"]["request"]["object"].clone()).unwrap();
    let cfg = config("1.29");
    let enabled = labels(&json!({ "trellis.dev/inject": "enabled" }));
    for (key, value, wanted) in [
        (
            "trellis.dev/exclude-inbound-ports",
            "80,0",
            "\"0\" is not a port",
        ),
        (
            "trellis.dev/exclude-outbound-ports",
            "http",
            "\"http\" is not a port",
        ),
        (
            "trellis.dev/exclude-outbound-cidrs",
            "10.0.0.0/33",
            "prefix length must be 0-32",
        ),
        (
            "trellis.dev/service-name",
            "Web API",
            "must be 1 to 63 lower-case",
        ),
    ] {
        let mut p = base.clone();
        p.metadata.annotations = Some([(key.to_owned(), value.to_owned())].into());
        let e = inject(&p, &enabled, &cfg).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("metadata.annotations[{key:?}]: ")),
            "{e}"
        );
        assert!(e.contains(wanted), "{e}");
    }
    // An app container on a proxy port would collide with the proxy.
    let mut p = base.clone();
    p.spec.as_mut().unwrap().containers[0]
        .ports
        .as_mut()
        .unwrap()[0]
        .container_port = 15006;
    let e = inject(&p, &enabled, &cfg).unwrap_err().to_string();
    assert_eq!(
        e,
        "spec.containers[0].ports[0].containerPort: 15006 is a port of the Trellis proxy"
    );
    // An app running as the proxy's UID would bypass capture.
    let mut p = base.clone();
    p.spec.as_mut().unwrap().containers[0].security_context =
        Some(serde_json::from_value(json!({ "runAsUser": 1337 })).unwrap());
    let e = inject(&p, &enabled, &cfg).unwrap_err().to_string();
    assert_eq!(
        e,
        "spec.containers[0].securityContext.runAsUser: 1337 is the Trellis proxy's UID, \
         whose traffic is never captured"
    );
    let mut p = base.clone();
    p.spec.as_mut().unwrap().security_context =
        Some(serde_json::from_value(json!({ "runAsUser": 1337, "runAsNonRoot": true })).unwrap());
    let e = inject(&p, &enabled, &cfg).unwrap_err().to_string();
    assert!(e.starts_with("spec.securityContext.runAsUser: 1337"), "{e}");
    // The injector's own configuration is checked too.
    let bad = InjectConfig {
        proxy_image: String::new(),
        ..cfg
    };
    assert!(matches!(
        inject(&base, &enabled, &bad),
        Err(trellis_webhook::InjectError::Config(_))
    ));
}

#[test]
fn the_proxy_env_names_exist_in_the_proxy_sources() {
    // The contract with the proxy is its flags' environment variables: every one the
    // injector sets must be declared by `trellis-proxy run` or `init`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proxy/sidecar/src");
    let run_flags = std::fs::read_to_string(root.join("config.rs")).unwrap();
    let init_flags = std::fs::read_to_string(root.join("capture/config.rs")).unwrap();
    let main = std::fs::read_to_string(root.join("main.rs")).unwrap();
    for name in ["job-pod-classic", "deployment-namespace-opt-in"] {
        let r = run(name);
        let all = r.pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(
                r.pod["spec"]["initContainers"]
                    .as_array()
                    .into_iter()
                    .flatten(),
            );
        for c in all.filter(|c| c["name"].as_str().unwrap().starts_with("trellis-")) {
            for var in env_of(c).keys() {
                let declared = format!("env = \"{var}\"");
                let found = run_flags.contains(&declared)
                    || init_flags.contains(&declared)
                    || (var == "TRELLIS_LOG" && main.contains("try_from_env(\"TRELLIS_LOG\")"));
                assert!(found, "{var} is not a flag of trellis-proxy");
            }
        }
    }
}

#[test]
fn without_an_init_image_the_capture_step_runs_from_the_proxy_image() {
    let f = load("deployment-namespace-opt-in");
    let cfg = InjectConfig {
        init_image: None,
        ..config("1.29")
    };
    let body = serde_json::to_vec(&f["review"]).unwrap();
    let ns = labels(&f["namespaceLabels"]);
    let reviewed = review(&body, &|_| ns.clone(), &cfg);
    assert_eq!(reviewed.outcome, Outcome::Injected, "{}", reviewed.message);
    let pod: Pod = serde_json::from_value(f["review"]["request"]["object"].clone()).unwrap();
    let Decision::Patch(ops, _) = inject(&pod, &ns, &cfg).unwrap() else {
        panic!("not injected");
    };
    let mut doc = f["review"]["request"]["object"].clone();
    apply_patch(&mut doc, &ops).unwrap();
    let init = container(&doc["spec"]["initContainers"], "trellis-init");
    assert_eq!(init["image"], "trellis.azurecr.io/trellis/proxy:0.1.0");
}

#[test]
fn the_namespace_to_look_up_is_that_of_a_pod_create() {
    let f = load("deployment-namespace-opt-in");
    let body = serde_json::to_vec(&f["review"]).unwrap();
    assert_eq!(
        trellis_webhook::pod_namespace(&body).as_deref(),
        Some("shop")
    );
    // The request's namespace when the pod names none (a CREATE usually leaves it out).
    let mut review = f["review"].clone();
    review["request"]["object"]["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    review["request"]["namespace"] = json!("other");
    let body = serde_json::to_vec(&review).unwrap();
    assert_eq!(
        trellis_webhook::pod_namespace(&body).as_deref(),
        Some("other")
    );
    // Nothing to look up: an UPDATE, another kind, a subresource, not a review at all.
    for name in ["update-is-left-alone", "not-v1"] {
        let body = serde_json::to_vec(&load(name)["review"]).unwrap();
        assert_eq!(trellis_webhook::pod_namespace(&body), None, "{name}");
    }
    let mut sub = f["review"].clone();
    sub["request"]["subResource"] = json!("ephemeralcontainers");
    let body = serde_json::to_vec(&sub).unwrap();
    assert_eq!(trellis_webhook::pod_namespace(&body), None);
    assert_eq!(trellis_webhook::pod_namespace(b"{"), None);
}

#[test]
fn an_unknown_namespace_refuses_the_pod() {
    let f = load("deployment-namespace-opt-in");
    let body = serde_json::to_vec(&f["review"]).unwrap();
    let asked = std::cell::RefCell::new(Vec::new());
    let reviewed = trellis_webhook::review_with(
        &body,
        &|ns| {
            asked.borrow_mut().push(ns.to_owned());
            Err("namespace not found".to_owned())
        },
        &config("1.29"),
    );
    assert_eq!(asked.into_inner(), ["shop"]);
    assert_eq!(reviewed.outcome, Outcome::Denied);
    assert_eq!(reviewed.http_status, 200);
    let answer: Value = serde_json::from_slice(&reviewed.body).unwrap();
    let r = &answer["response"];
    assert_eq!(r["uid"], f["review"]["request"]["uid"]);
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 503);
    assert_eq!(r["status"]["reason"], "ServiceUnavailable");
    assert_eq!(
        r["status"]["message"],
        "trellis sidecar injection: the labels of namespace \"shop\" are unknown (namespace \
         not found); the pod is refused rather than started without its proxy, retry"
    );
    assert!(r.get("patch").is_none());
    // A request that needs no lookup never calls it.
    let body = serde_json::to_vec(&load("update-is-left-alone")["review"]).unwrap();
    let reviewed = trellis_webhook::review_with(
        &body,
        &|_| panic!("no lookup for an UPDATE"),
        &config("1.29"),
    );
    assert_eq!(reviewed.outcome, Outcome::Skipped);
}
