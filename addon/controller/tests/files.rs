//! The file source through its public API: validation messages as an operator sees them,
//! the demo directory, and the polling watcher against real temporary directories.

// `allow-unwrap-in-tests` covers `#[test]` functions only; the helpers here are test code
// too, and a failed setup should panic with its error.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use trellis_api::authz::Action;
use trellis_api::{MeshSnapshot, Protocol, ServiceKey};
use trellis_controller::{FileSource, Metrics, SourceStatus, load_dir};

const POLL: Duration = Duration::from_millis(20);
const WAIT: Duration = Duration::from_secs(1);

const WEB_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80}]
";

fn workload(name: &str, sa: &str, addr: &str) -> String {
    format!(
        "apiVersion: local.trellis.dev/v1alpha1\nkind: Workload\n\
         metadata: {{name: {name}, namespace: demo, labels: {{app: web}}}}\n\
         spec: {{serviceAccount: {sa}, meshAddress: {addr:?}}}\n"
    )
}

/// An AuthorizationPolicy in `demo` with `spec` (flow YAML).
fn policy(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.trellis.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: demo}}\nspec: {spec}\n"
    )
}

/// An HTTPRoute in `demo` with `spec` (flow YAML).
fn http_route(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: {name}, namespace: demo}}\nspec: {spec}\n"
    )
}

/// A route of Service `web` sending everything to `backend`:80.
fn web_route(name: &str, backend: &str) -> String {
    http_route(
        name,
        &format!(
            "{{parentRefs: [{{group: '', kind: Service, name: web}}], \
             rules: [{{backendRefs: [{{name: {backend}, port: 80}}]}}]}}"
        ),
    )
}

/// A Workload with a pod `address` (transparent capture) instead of a meshAddress.
fn pod_workload(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: local.trellis.dev/v1alpha1\nkind: Workload\n\
         metadata: {{name: {name}, namespace: demo, labels: {{app: web}}}}\n\
         spec: {{serviceAccount: web, address: {ip:?}}}\n"
    )
}

/// Writes atomically (temp file, then rename), so a poll never sees a half-written file.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(name)).unwrap();
}

/// Loads `files` from a fresh directory and returns its problems, one line each, with
/// the directory prefix removed.
fn problems(files: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        write(dir.path(), name, text);
    }
    let err = load_dir(dir.path()).unwrap_err();
    assert_eq!(err.exit_code(), 64);
    let prefix = format!("{}/", dir.path().display());
    err.to_string()
        .lines()
        .map(|l| l.replace(&prefix, ""))
        .collect()
}

#[test]
fn validation_errors_name_file_document_object_and_field() {
    let svc = |spec: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec: {spec}\n"
        )
    };
    let web1 = workload("web-1", "web", "127.0.0.1:16011");
    type Files = Vec<(&'static str, String)>;
    let cases: Vec<(&str, Files, &str)> = vec![
        (
            "unknown field",
            vec![("web.yaml", svc("{portz: [{port: 80}]}"))],
            "web.yaml (document 1): Service demo/web: spec.portz: unknown field `portz`, \
             expected one of `type`, `clusterIP`, `clusterIPs`, `selector`, `ports`",
        ),
        (
            "cluster IP that is not an IP",
            vec![(
                "web.yaml",
                svc("{clusterIPs: [10.96.0.10, x], ports: [{port: 80}]}"),
            )],
            "web.yaml (document 1): Service demo/web: spec.clusterIPs[1]: invalid clusterIP \
             \"x\": expected an IP address or \"None\"",
        ),
        (
            "duplicate cluster IP",
            vec![(
                "web.yaml",
                svc("{clusterIPs: [fd00::10, 10.96.0.10, 'fd00:0::10'], ports: [{port: 80}]}"),
            )],
            "web.yaml (document 1): Service demo/web: spec.clusterIPs[2]: duplicate address \
             fd00::10 (also spec.clusterIPs[0])",
        ),
        (
            "clusterIP is not clusterIPs[0]",
            vec![(
                "web.yaml",
                svc("{clusterIP: 10.96.0.10, clusterIPs: [10.96.0.11], ports: [{port: 80}]}"),
            )],
            "web.yaml (document 1): Service demo/web: spec.clusterIPs[0]: \"10.96.0.11\" must \
             equal spec.clusterIP \"10.96.0.10\" when both are set",
        ),
        (
            "cluster IP shared by two services",
            vec![
                (
                    "a.yaml",
                    svc("{clusterIP: 10.96.0.10, ports: [{port: 80}]}"),
                ),
                (
                    "b.yaml",
                    svc("{clusterIPs: [fd00::11, 10.96.0.10], ports: [{port: 80}]}")
                        .replace("name: web", "name: api"),
                ),
            ],
            "b.yaml (document 1): Service demo/api: spec.clusterIPs[1]: 10.96.0.10 is also a \
             cluster IP of Service demo/web in a.yaml (document 1); each service needs its own",
        ),
        (
            "neither meshAddress nor address",
            vec![(
                "w.yaml",
                web1.replace(", meshAddress: \"127.0.0.1:16011\"", ""),
            )],
            "w.yaml (document 1): Workload demo/web-1: spec: needs exactly one of meshAddress \
             (ip:port where its proxy accepts mTLS) and address (the pod IP, for transparent \
             capture); got neither",
        ),
        (
            "both meshAddress and address",
            vec![(
                "w.yaml",
                web1.replace(
                    "serviceAccount: web,",
                    "serviceAccount: web, address: 10.0.0.1,",
                ),
            )],
            "w.yaml (document 1): Workload demo/web-1: spec: needs exactly one of meshAddress \
             (ip:port where its proxy accepts mTLS) and address (the pod IP, for transparent \
             capture); got both",
        ),
        (
            "pod address with a port",
            vec![("w.yaml", pod_workload("web-1", "10.244.0.12:8080"))],
            "w.yaml (document 1): Workload demo/web-1: spec.address: invalid address \
             \"10.244.0.12:8080\": expected the pod's IP address without a port, e.g. \
             10.244.0.12 or fd00:10:244::12",
        ),
        (
            "shared pod address",
            vec![
                ("a.yaml", pod_workload("web-1", "fd00:10:244::12")),
                ("b.yaml", pod_workload("web-2", "fd00:10:244:0::12")),
            ],
            "b.yaml (document 1): Workload demo/web-2: spec.address: fd00:10:244::12 is also \
             the address of Workload demo/web-1 in a.yaml (document 1); each workload needs \
             its own",
        ),
        (
            "named targetPort for a pod address",
            vec![
                ("a.yaml", pod_workload("web-1", "10.244.0.12")),
                (
                    "web.yaml",
                    svc(
                        "{selector: {app: web}, ports: [{port: 80, targetPort: 8080}, \
                         {name: metrics, port: 9100, targetPort: metrics}]}",
                    ),
                ),
            ],
            "web.yaml (document 1): Service demo/web: spec.ports[1].targetPort: named \
             targetPort \"metrics\" needs Pod container ports; use a number (selected Workload \
             demo/web-1 has spec.address)",
        ),
        (
            "port out of range",
            vec![(
                "web.yaml",
                svc("{ports: [{name: http, port: 80}, {name: admin, port: 70000}]}"),
            )],
            "web.yaml (document 1): Service demo/web: spec.ports[1].port: \
             must be between 1 and 65535, got 70000",
        ),
        (
            "port of the wrong type",
            vec![("web.yaml", svc("{ports: [{port: eighty}]}"))],
            "web.yaml (document 1): Service demo/web: spec.ports[0].port: \
             invalid type: string \"eighty\", expected i32",
        ),
        (
            "udp",
            vec![("web.yaml", svc("{ports: [{port: 53, protocol: UDP}]}"))],
            "web.yaml (document 1): Service demo/web: spec.ports[0].protocol: \
             protocol UDP is not supported: the mesh carries TCP only",
        ),
        (
            "duplicate workload across files",
            vec![("a.yaml", web1.clone()), ("b.yaml", format!("---\n{web1}"))],
            "b.yaml (document 1): Workload demo/web-1: \
             defined twice: in a.yaml (document 1) and in b.yaml (document 1)",
        ),
        (
            "shared mesh address",
            vec![
                ("a.yaml", web1.clone()),
                ("b.yaml", workload("web-2", "web", "127.0.0.1:16011")),
            ],
            "b.yaml (document 1): Workload demo/web-2: spec.meshAddress: 127.0.0.1:16011 is \
             also the meshAddress of Workload demo/web-1 in a.yaml (document 1); each workload \
             needs its own",
        ),
        (
            "bad mesh address",
            vec![("w.yaml", workload("web-1", "web", "localhost:16011"))],
            "w.yaml (document 1): Workload demo/web-1: spec.meshAddress: invalid meshAddress \
             \"localhost:16011\": expected ip:port, e.g. 127.0.0.1:16011",
        ),
        (
            "bad service account",
            vec![("w.yaml", workload("web-1", "Web_1", "127.0.0.1:16011"))],
            "w.yaml (document 1): Workload demo/web-1: spec.serviceAccount: does not make a \
             valid identity: invalid service account \"Web_1\": use lowercase letters, \
             digits, '-' and '.'",
        ),
        (
            "unsupported kind",
            vec![(
                "x.yaml",
                format!(
                    "{web1}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n"
                ),
            )],
            "x.yaml (document 2): unsupported kind \"Deployment\" (apiVersion \"apps/v1\"): \
             supported kinds are Service (v1), Workload (local.trellis.dev/v1alpha1), \
             AuthorizationPolicy (policy.trellis.dev/v1alpha1) and HTTPRoute \
             (gateway.networking.k8s.io/v1)",
        ),
        (
            "policy: unknown field",
            vec![("p.yaml", policy("readers", "{rulez: []}"))],
            "p.yaml (document 1): AuthorizationPolicy demo/readers: spec.rulez: unknown field \
             `rulez`, expected one of `targetRefs`, `action`, `dryRun`, `rules`",
        ),
        (
            "policy: unknown field in a rule",
            vec![(
                "p.yaml",
                policy("readers", "{rules: [{from: [{users: [x]}]}]}"),
            )],
            "p.yaml (document 1): AuthorizationPolicy demo/readers: spec.rules[0].from[0].users: \
             unknown field `users`, expected one of `principals`, `namespaces`, \
             `serviceAccounts`",
        ),
        (
            "policy: action neither ALLOW nor DENY",
            vec![("p.yaml", policy("readers", "{action: AUDIT}"))],
            "p.yaml (document 1): AuthorizationPolicy demo/readers: spec.action: unknown \
             variant `AUDIT`, expected `ALLOW` or `DENY`",
        ),
        (
            "policy: port out of range",
            vec![(
                "p.yaml",
                policy("readers", "{rules: [{to: [{ports: [70000]}]}]}"),
            )],
            "p.yaml (document 1): AuthorizationPolicy demo/readers: spec.rules[0].to[0].ports[0]: \
             invalid value: integer `70000`, expected u16",
        ),
        (
            "policy: a problem serde cannot see",
            vec![(
                "p.yaml",
                policy(
                    "readers",
                    "{rules: [{from: [{}, {serviceAccounts: [a/b/c]}]}]}",
                ),
            )],
            "p.yaml (document 1): AuthorizationPolicy demo/readers: \
             spec.rules[0].from[1].serviceAccounts[0]: \"a/b/c\" is not <name> or \
             <namespace>/<name>",
        ),
        (
            "policy defined twice",
            vec![
                ("a.yaml", policy("readers", "{}")),
                ("b.yaml", policy("readers", "{action: DENY}")),
            ],
            "b.yaml (document 1): AuthorizationPolicy demo/readers: \
             defined twice: in a.yaml (document 1) and in b.yaml (document 1)",
        ),
        (
            "policy without a spec",
            vec![(
                "p.yaml",
                "apiVersion: policy.trellis.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {name: readers, namespace: demo}\n"
                    .to_owned(),
            )],
            "p.yaml (document 1): AuthorizationPolicy demo/readers: missing field `spec`",
        ),
        (
            "route: a path match the mesh cannot honour",
            vec![(
                "r.yaml",
                http_route(
                    "web",
                    "{parentRefs: [{group: '', kind: Service, name: web}], rules: [{matches: \
                     [{path: {value: /a}}, {path: {type: RegularExpression, value: '/a.*'}}]}]}",
                ),
            )],
            "r.yaml (document 1): HTTPRoute demo/web: spec.rules[0].matches[1].path.type: \
             RegularExpression is not supported; use Exact or PathPrefix",
        ),
        (
            "route: unknown field",
            vec![(
                "r.yaml",
                http_route(
                    "web",
                    "{parentRefs: [{group: '', kind: Service, name: web}], rulez: []}",
                ),
            )],
            "r.yaml (document 1): HTTPRoute demo/web: spec.rulez: unknown field `rulez`, \
             expected one of `parentRefs`, `hostnames`, `rules`",
        ),
        (
            "route defined twice",
            vec![
                ("a.yaml", web_route("web", "web-v1")),
                ("b.yaml", web_route("web", "web-v2")),
            ],
            "b.yaml (document 1): HTTPRoute demo/web: defined twice: in a.yaml (document 1) \
             and in b.yaml (document 1)",
        ),
        (
            "route without a spec",
            vec![(
                "r.yaml",
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                 metadata: {name: web, namespace: demo}\n"
                    .to_owned(),
            )],
            "r.yaml (document 1): HTTPRoute demo/web: missing field `spec`",
        ),
        (
            "yaml syntax",
            vec![(
                "web.yaml",
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: [web\n".to_owned(),
            )],
            "web.yaml:5:1 (document 1): invalid YAML: did not find expected ',' or ']' at \
             line 5 column 1, while parsing a flow sequence at line 4 column 9",
        ),
    ];
    for (case, files, want) in cases {
        let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
        assert_eq!(problems(&files), [want], "case: {case}");
    }
}

#[test]
fn demo_directory_loads_into_the_demo_mesh() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/demo");
    let snapshot = FileSource::new(&dir, "cluster.local", POLL)
        .load_initial()
        .unwrap();
    assert_eq!(snapshot.version, 1);
    let keys: Vec<String> = snapshot.services.keys().map(ToString::to_string).collect();
    assert_eq!(keys, ["demo/api", "demo/web"]);
    let endpoints = |name: &str| -> Vec<(String, String, String)> {
        let svc = &snapshot.services[&ServiceKey::new("demo", name)];
        assert_eq!(svc.ports.len(), 1);
        assert_eq!(
            (svc.ports[0].port, svc.ports[0].protocol),
            (80, Protocol::Http)
        );
        svc.ports[0]
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.workload.clone(),
                    e.address.to_string(),
                    e.identity.clone(),
                )
            })
            .collect()
    };
    let ep = |w: &str, addr: &str, sa: &str| {
        (
            w.to_owned(),
            addr.to_owned(),
            format!("spiffe://cluster.local/ns/demo/sa/{sa}"),
        )
    };
    assert_eq!(
        endpoints("web"),
        [
            ep("web-1", "127.0.0.1:16011", "web"),
            ep("web-2", "127.0.0.1:16012", "web")
        ]
    );
    assert_eq!(endpoints("api"), [ep("api-1", "127.0.0.1:16021", "api")]);
    // client-1 loads (so its identity is valid) but serves nothing.
    let objects = load_dir(&dir).unwrap();
    assert_eq!(objects.workloads.len(), 4);
}

#[test]
fn transparent_capture_objects_load_into_addresses_and_pod_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    // As `kubectl get -o yaml` exports a dual-stack Service: clusterIP repeats clusterIPs[0].
    let web = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00::10']
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: 8080}
    - {name: admin, port: 9000}
";
    write(dir.path(), "web.yaml", web);
    write(
        dir.path(),
        "web-1.yaml",
        &pod_workload("web-1", "10.244.0.12"),
    );
    write(
        dir.path(),
        "web-2.yaml",
        &pod_workload("web-2", "fd00:10:244::13"),
    );
    // A named targetPort is fine for a Service that selects only meshAddress workloads.
    let named = WEB_SERVICE
        .replace("name: web,", "name: legacy,")
        .replace("{app: web}", "{app: legacy}")
        .replace("port: 80}", "port: 80, targetPort: http}");
    write(dir.path(), "legacy.yaml", &named);
    let legacy_1 =
        workload("legacy-1", "legacy", "127.0.0.1:16041").replace("app: web", "app: legacy");
    write(dir.path(), "legacy-1.yaml", &legacy_1);
    let snapshot = FileSource::new(dir.path(), "cluster.local", POLL)
        .load_initial()
        .unwrap();
    let svc = &snapshot.services[&ServiceKey::new("demo", "web")];
    let addresses: Vec<String> = svc.addresses.iter().map(ToString::to_string).collect();
    assert_eq!(addresses, ["10.96.0.10", "fd00::10"]);
    let ports: Vec<(u16, Vec<String>)> = svc
        .ports
        .iter()
        .map(|p| {
            let eps = p.endpoints.iter().map(|e| e.address.to_string()).collect();
            (p.port, eps)
        })
        .collect();
    assert_eq!(
        ports,
        [
            (
                80,
                vec![
                    "10.244.0.12:8080".to_owned(),
                    "[fd00:10:244::13]:8080".to_owned()
                ]
            ),
            (
                9000,
                vec![
                    "10.244.0.12:9000".to_owned(),
                    "[fd00:10:244::13]:9000".to_owned()
                ]
            ),
        ]
    );
    assert!(
        svc.ports[0]
            .endpoints
            .iter()
            .all(|e| e.identity == "spiffe://cluster.local/ns/demo/sa/web")
    );
    let legacy = &snapshot.services[&ServiceKey::new("demo", "legacy")];
    assert!(legacy.addresses.is_empty());
    assert_eq!(
        legacy.ports[0].endpoints[0].address.to_string(),
        "127.0.0.1:16041"
    );
}

/// A running watcher over a temporary directory.
struct Watcher {
    dir: tempfile::TempDir,
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    status: watch::Receiver<SourceStatus>,
    registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Watcher {
    fn start(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            write(dir.path(), name, text);
        }
        let mut registry = Registry::default();
        let source = FileSource::new(dir.path(), "cluster.local", POLL)
            .with_metrics(Metrics::new(&mut registry));
        let (tx, snapshots) = watch::channel(Arc::new(source.load_initial().unwrap()));
        let (status_tx, status) = watch::channel(SourceStatus::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(source.run(tx, status_tx, async move {
            let _ = stopped.await;
        }));
        Self {
            dir,
            snapshots,
            status,
            registry,
            stop: Some(stop),
            task,
        }
    }

    fn write(&self, name: &str, text: &str) {
        write(self.dir.path(), name, text);
    }

    async fn next_snapshot(&mut self) -> Arc<MeshSnapshot> {
        tokio::time::timeout(WAIT, self.snapshots.changed())
            .await
            .unwrap()
            .unwrap();
        Arc::clone(&self.snapshots.borrow_and_update())
    }

    async fn status_when(&mut self, f: impl FnMut(&SourceStatus) -> bool) -> SourceStatus {
        let status = tokio::time::timeout(WAIT, self.status.wait_for(f))
            .await
            .unwrap()
            .unwrap();
        status.clone()
    }

    fn metrics(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).unwrap();
        text
    }
}

fn web_endpoints(snapshot: &MeshSnapshot) -> Vec<String> {
    snapshot.services[&ServiceKey::new("demo", "web")].ports[0]
        .endpoints
        .iter()
        .map(|e| e.workload.clone())
        .collect()
}

#[tokio::test]
async fn watcher_publishes_good_changes_and_keeps_the_last_good_snapshot_on_errors() {
    let mut w = Watcher::start(&[
        ("svc.yaml", WEB_SERVICE),
        ("web-1.yaml", &workload("web-1", "web", "127.0.0.1:16011")),
    ]);
    assert_eq!(web_endpoints(&w.snapshots.borrow()), ["web-1"]);

    // A good change: version 2.
    w.write("web-2.yaml", &workload("web-2", "web", "127.0.0.1:16012"));
    let v2 = w.next_snapshot().await;
    assert_eq!(v2.version, 2);
    assert_eq!(web_endpoints(&v2), ["web-1", "web-2"]);

    // A broken change: version 2 stays, the error names the file and field.
    let broken = WEB_SERVICE
        .replace("name: web,", "name: api,")
        .replace("ports:", "portz:");
    w.write("api.yaml", &broken);
    let status = w.status_when(|s| s.reloads_failed == 1).await;
    let error = status.last_error.unwrap();
    assert!(
        error.contains("api.yaml (document 1): Service demo/api: spec.portz"),
        "{error}"
    );
    assert_eq!(status.last_good_version, 2);
    assert!(!w.snapshots.has_changed().unwrap());
    assert_eq!(w.snapshots.borrow().version, 2);

    // Fixed: version 3 with the new service, error cleared.
    w.write("api.yaml", &broken.replace("portz:", "ports:"));
    let v3 = w.next_snapshot().await;
    assert_eq!(v3.version, 3);
    assert!(v3.services.contains_key(&ServiceKey::new("demo", "api")));
    let status = w.status_when(|s| s.reloads_ok == 2).await;
    assert_eq!(
        (
            status.last_error,
            status.last_good_version,
            status.reloads_failed
        ),
        (None, 3, 1)
    );
    let metrics = w.metrics();
    for line in [
        "trellis_controller_reloads_total{result=\"ok\"} 2",
        "trellis_controller_reloads_total{result=\"error\"} 1",
        "trellis_controller_snapshot_version 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
}

#[test]
fn policies_load_into_the_snapshot_with_service_accounts_resolved() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", WEB_SERVICE);
    write(
        dir.path(),
        "policies.yaml",
        &format!(
            "{}---\n{}",
            policy(
                "web-readers",
                "{targetRefs: [{kind: Service, name: web}], rules: [{from: [{serviceAccounts: \
                 [client, other/batch]}], to: [{methods: [GET], paths: ['/api/*']}]}]}"
            ),
            policy("deny-all", "{action: DENY, dryRun: true, rules: [{}]}")
        ),
    );
    let objects = load_dir(dir.path()).unwrap();
    assert_eq!(objects.policies.len(), 2);
    let snapshot = FileSource::new(dir.path(), "mesh.example", POLL)
        .load_initial()
        .unwrap();
    let keys: Vec<String> = snapshot.authorization.iter().map(|p| p.key()).collect();
    assert_eq!(keys, ["demo/deny-all", "demo/web-readers"]);
    let readers = &snapshot.authorization[1];
    assert_eq!(readers.target_services, ["web"]);
    assert_eq!(readers.action, Action::Allow);
    let principals: Vec<String> = readers.rules[0].from[0]
        .principals
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        principals,
        [
            "spiffe://mesh.example/ns/demo/sa/client",
            "spiffe://mesh.example/ns/other/sa/batch"
        ]
    );
    let deny = &snapshot.authorization[0];
    assert_eq!((deny.action, deny.dry_run), (Action::Deny, true));
}

/// A policy change alone is a new snapshot: proxies must get it.
#[tokio::test]
async fn watcher_publishes_a_policy_only_change() {
    let mut w = Watcher::start(&[("svc.yaml", WEB_SERVICE)]);
    assert!(w.snapshots.borrow().authorization.is_empty());
    w.write("p.yaml", &policy("readers", "{action: DENY, rules: [{}]}"));
    let v2 = w.next_snapshot().await;
    assert_eq!(v2.version, 2);
    assert_eq!(v2.authorization.len(), 1);
    // An invalid edit is refused whole: the policy stays as it was.
    w.write(
        "p.yaml",
        &policy(
            "readers",
            "{action: DENY, rules: [{to: [{methods: [get]}]}]}",
        ),
    );
    let status = w.status_when(|s| s.reloads_failed == 1).await;
    let error = status.last_error.unwrap();
    assert!(
        error.contains(
            "AuthorizationPolicy demo/readers: spec.rules[0].to[0].methods[0]: \"get\" is not \
             an HTTP method"
        ),
        "{error}"
    );
    assert_eq!(w.snapshots.borrow().version, 2);
    w.write("p.yaml", "");
    let v3 = w.next_snapshot().await;
    assert_eq!(v3.version, 3);
    assert!(v3.authorization.is_empty());
}

#[tokio::test]
async fn watcher_does_not_publish_a_change_that_leaves_the_snapshot_equal() {
    let mut w = Watcher::start(&[("svc.yaml", WEB_SERVICE)]);
    w.write(
        "svc.yaml",
        &format!("# only a comment changed\n{WEB_SERVICE}"),
    );
    let status = w.status_when(|s| s.reloads_ok == 1).await;
    assert_eq!(status.last_good_version, 1);
    assert!(!w.snapshots.has_changed().unwrap());
}

#[tokio::test]
async fn watcher_stops_on_shutdown() {
    let mut w = Watcher::start(&[("svc.yaml", WEB_SERVICE)]);
    if let Some(stop) = w.stop.take() {
        stop.send(()).unwrap();
    }
    tokio::time::timeout(WAIT, &mut w.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn watcher_stops_when_no_one_receives_snapshots() {
    let w = Watcher::start(&[("svc.yaml", WEB_SERVICE)]);
    let Watcher {
        snapshots,
        task,
        stop: _stop,
        ..
    } = w;
    drop(snapshots);
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

/// `(backend, weight)` of each backend of each rule of a route.
type RuleBackends = Vec<Vec<(String, u32)>>;

/// `(key, backends of each rule)` of every route of a snapshot.
fn routes(snapshot: &MeshSnapshot) -> Vec<(String, RuleBackends)> {
    snapshot
        .routes
        .iter()
        .map(|r| {
            let rules = r
                .rules
                .iter()
                .map(|rule| {
                    (rule.backends.iter())
                        .map(|b| (b.service.name.clone(), b.weight))
                        .collect()
                })
                .collect();
            (r.key(), rules)
        })
        .collect()
}

/// What `trellis demo` writes: an HTTPRoute with a Service parent loads into the
/// snapshot; a Gateway's route in the same directory is ignored, even one the mesh could
/// not honour.
#[test]
fn http_routes_with_service_parents_load_and_gateway_routes_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "svc.yaml", WEB_SERVICE);
    write(
        dir.path(),
        "routes.yaml",
        &format!(
            "{}---\n{}",
            http_route(
                "web-split",
                "{parentRefs: [{group: '', kind: Service, name: web, port: 80}], rules: \
                 [{backendRefs: [{name: web-v1, port: 80, weight: 90}, \
                 {name: web-v2, port: 80, weight: 10}]}]}",
            ),
            http_route(
                "ingress",
                "{parentRefs: [{name: public-gateway}], hostnames: [shop.example], rules: \
                 [{matches: [{path: {type: RegularExpression, value: '/.*'}}], \
                 filters: [{type: URLRewrite, urlRewrite: {hostname: web}}]}]}",
            ),
        ),
    );
    let objects = load_dir(dir.path()).unwrap();
    assert_eq!(objects.routes.len(), 1, "only the mesh's route is kept");
    let snapshot = FileSource::new(dir.path(), "cluster.local", POLL)
        .load_initial()
        .unwrap();
    assert_eq!(
        routes(&snapshot),
        [(
            "demo/web-split".to_owned(),
            vec![vec![("web-v1".to_owned(), 90), ("web-v2".to_owned(), 10)]]
        )]
    );
    assert_eq!(snapshot.routes[0].parents[0].port, Some(80));
}

/// A route change alone is a new snapshot; a bad route edit is refused naming the field,
/// and the last good snapshot (with the route as it was) stays.
#[tokio::test]
async fn watcher_publishes_route_changes_and_refuses_a_bad_route_edit() {
    let mut w = Watcher::start(&[("svc.yaml", WEB_SERVICE)]);
    assert!(w.snapshots.borrow().routes.is_empty());
    w.write("route.yaml", &web_route("web", "web-v1"));
    let v2 = w.next_snapshot().await;
    assert_eq!(v2.version, 2);
    assert_eq!(
        routes(&v2),
        [("demo/web".to_owned(), vec![vec![("web-v1".to_owned(), 1)]])]
    );

    w.write(
        "route.yaml",
        &http_route(
            "web",
            "{parentRefs: [{group: '', kind: Service, name: web}], rules: [{backendRefs: \
             [{name: web-v2, port: 80, weight: 10}, {name: web-v3, namespace: other, port: 80}]}]}",
        ),
    );
    let status = w.status_when(|s| s.reloads_failed == 1).await;
    let error = status.last_error.unwrap();
    assert!(
        error.contains(
            "route.yaml (document 1): HTTPRoute demo/web: spec.rules[0].backendRefs[1].namespace: \
             \"other\" is not the route's namespace \"demo\""
        ),
        "{error}"
    );
    assert_eq!(status.last_good_version, 2);
    assert_eq!(w.snapshots.borrow().version, 2);
    assert_eq!(
        routes(&w.snapshots.borrow()),
        routes(&v2),
        "the last good route stays"
    );

    // Fixed: version 3 with the new route.
    w.write("route.yaml", &web_route("web", "web-v2"));
    let v3 = w.next_snapshot().await;
    assert_eq!(v3.version, 3);
    assert_eq!(
        routes(&v3),
        [("demo/web".to_owned(), vec![vec![("web-v2".to_owned(), 1)]])]
    );
}

/// The examples `docs/examples/routes/` holds (also validated against the upstream CRD's
/// schema by `scripts/validate-chart`) load through the file source, each as the mesh
/// route it shows.
#[test]
fn route_examples_load_through_the_file_source() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples/routes");
    let snapshot = FileSource::new(&dir, "cluster.local", POLL)
        .load_initial()
        .unwrap();
    let keys: Vec<String> = snapshot.routes.iter().map(|r| r.key()).collect();
    assert_eq!(
        keys,
        [
            "shop/checkout-canary",
            "shop/reviews-by-header",
            "shop/storefront-paths"
        ]
    );
    let canary = &snapshot.routes[0];
    let weights: Vec<u32> = canary.rules[0].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [90, 10]);
    let by_header = &snapshot.routes[1];
    assert_eq!(
        by_header.rules[0].matches[0].headers,
        [("x-canary".to_owned(), "true".to_owned())]
    );
    let paths = &snapshot.routes[2];
    assert_eq!(
        paths.rules[0].timeout,
        Some(Duration::from_secs(10)),
        "{paths:?}"
    );
    assert_eq!(paths.rules[1].timeout, None);
}
