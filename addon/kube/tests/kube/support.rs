//! Object builders and a running source with waits that fail with what they saw.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use trellis_api::{MeshSnapshot, ServiceKey};
use trellis_kube::{KubeHandle, KubeSettings, KubeSource, KubeStatus, Metrics};

/// Trust domain of every test.
pub const TD: &str = "cluster.local";
/// How long a wait may take before the test fails: generous, as the watcher's backoff
/// after an error is 0.8-1.6 s.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A [`KubeSource`] running against a client.
pub struct Running {
    pub snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    pub handle: KubeHandle,
    registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    pub fn start(client: kube::Client, debounce: Duration) -> Running {
        let mut registry = Registry::default();
        let settings = KubeSettings {
            debounce,
            ..KubeSettings::new(TD)
        };
        let source =
            KubeSource::new(client, settings).with_metrics(Metrics::register(&mut registry));
        let handle = source.handle();
        let (tx, snapshots) = watch::channel(Arc::new(source.empty_snapshot()));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(source.run(tx, async move {
            let _ = stopped.await;
        }));
        Running {
            snapshots,
            handle,
            registry,
            stop: Some(stop),
            task,
        }
    }

    /// The first snapshot, once every kind is listed.
    pub async fn ready(&self) -> Arc<MeshSnapshot> {
        tokio::time::timeout(PATIENCE, self.handle.ready_snapshot(&self.snapshots))
            .await
            .expect("no first snapshot in time")
            .expect("source stopped")
    }

    /// Waits for a snapshot satisfying `want`; fails with the last one seen.
    pub async fn until(
        &self,
        what: &str,
        want: impl Fn(&MeshSnapshot) -> bool,
    ) -> Arc<MeshSnapshot> {
        let mut snapshots = self.snapshots.clone();
        let waited = tokio::time::timeout(PATIENCE, snapshots.wait_for(|s| want(s))).await;
        match waited {
            Ok(Ok(snapshot)) => Arc::clone(&snapshot),
            _ => panic!(
                "timed out waiting for {what}; last snapshot: {:#?}",
                self.snapshots.borrow()
            ),
        }
    }

    /// Waits for a status satisfying `want`; fails with the last one seen.
    pub async fn until_status(&self, what: &str, want: impl Fn(&KubeStatus) -> bool) -> KubeStatus {
        let mut status = self.handle.status_changes();
        let waited = tokio::time::timeout(PATIENCE, status.wait_for(|s| want(s))).await;
        match waited {
            Ok(Ok(s)) => s.clone(),
            _ => panic!(
                "timed out waiting for {what}; last status: {:#?}",
                self.handle.status()
            ),
        }
    }

    /// Waits for the mesh ConfigMap data to be `want`.
    pub async fn until_config(&self, want: Option<&[(&str, &str)]>) {
        let want = want.map(data);
        let mut config = self.handle.config();
        let waited = tokio::time::timeout(
            PATIENCE,
            config.wait_for(|c| c.as_ref().map(|c| &c.data) == want.as_ref()),
        )
        .await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "timed out waiting for config {want:?}; last: {:?}",
            self.handle.config().borrow()
        );
    }

    pub fn version(&self) -> u64 {
        self.snapshots.borrow().version
    }

    pub fn metrics(&self) -> String {
        metrics_text(&self.registry)
    }

    /// Drops the snapshot receiver, shutdown still pending, and waits for the source to
    /// notice that nobody is left to serve.
    pub async fn abandon(self) {
        let Running {
            snapshots,
            stop,
            task,
            ..
        } = self;
        drop(snapshots);
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("source did not stop")
            .expect("source panicked");
        drop(stop);
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("source did not stop")
            .expect("source panicked");
    }
}

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("test object")
}

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub fn namespace(name: &str) -> Namespace {
    from(json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}}))
}

/// A ClusterIP Service selecting `app=<name>` with ports `(name, port)`, target port
/// named like the port.
pub fn service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, i32)]) -> Service {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "targetPort": n, "protocol": "TCP"}))
        .collect();
    from(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "selector": {"app": name}, "ports": ports,
        },
    }))
}

/// A running, scheduled Pod.
pub fn pod(ns: &str, name: &str, ip: &str, service_account: &str) -> Pod {
    from(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "api"}},
        "spec": {
            "nodeName": "node-1", "serviceAccountName": service_account,
            "containers": [{"name": "app", "image": "app:1"}],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }))
}

/// An EndpointSlice of `service` with ports `(name, port)` and endpoints
/// `(address, pod, ready)`.
pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: &[(&str, i32)],
    endpoints: &[(&str, &str, Option<bool>)],
) -> EndpointSlice {
    let v6 = endpoints.iter().any(|(ip, _, _)| ip.contains(':'));
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"}))
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, pod, ready)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "name": pod, "namespace": ns},
                "zone": "zone-a",
            })
        })
        .collect();
    from(json!({
        "metadata": {
            "name": name, "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": if v6 { "IPv6" } else { "IPv4" },
        "ports": ports,
        "endpoints": endpoints,
    }))
}

pub fn config_map(ns: &str, name: &str, pairs: &[(&str, &str)]) -> ConfigMap {
    from(json!({"metadata": {"name": name, "namespace": ns}, "data": data(pairs)}))
}

/// `(address, identity)` of every endpoint of port `port` of `ns/name`; empty when the
/// service or port is absent.
pub fn endpoints(snap: &MeshSnapshot, ns: &str, name: &str, port: u16) -> Vec<(String, String)> {
    snap.services
        .get(&ServiceKey::new(ns, name))
        .and_then(|s| s.ports.iter().find(|p| p.port == port))
        .map(|p| {
            p.endpoints
                .iter()
                .map(|e| (e.address.to_string(), e.identity.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// `(address, spiffe id of service account sa in ns)`.
pub fn ep(address: &str, ns: &str, sa: &str) -> (String, String) {
    (address.to_owned(), format!("spiffe://{TD}/ns/{ns}/sa/{sa}"))
}

/// Whether the metrics text holds the exact line.
/// `registry` in the Prometheus text format.
pub fn metrics_text(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    encode(&mut text, registry).expect("metrics encode");
    text
}

pub fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// Polls `probe` every 10 ms until it gives a value; fails after [`PATIENCE`] with `what`.
pub async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
