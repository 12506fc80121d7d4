//! [`inject`]: whether a pod gets the proxy, and the RFC 6902 patch that adds it.
//!
//! What a patch adds (docs/architecture.md, "Sidecar injection"):
//!
//! - `trellis-init`: `trellis-proxy init` (iptables capture), root with only `NET_ADMIN`
//!   and `NET_RAW`, every other capability dropped, no privilege escalation.
//! - `trellis-proxy`: `trellis-proxy run` in transparent mode, UID 1337, non-root,
//!   read-only root filesystem, no capabilities, seccomp `RuntimeDefault`. A native
//!   sidecar (an init container with `restartPolicy: Always`) from Kubernetes 1.29, the
//!   first regular container before.
//! - Volumes: the projected ServiceAccount token (audience `trellis`) and the trust
//!   bundle ConfigMap; for classic sidecars in pods that run to completion, the
//!   `POST /shutdown` token.
//! - The `trellis.dev/injected` annotation, the `trellis.dev/proxy` label and the
//!   `prometheus.io/*` annotations.
//!
//! App probes are left as they are; their ports are excluded from inbound capture, since
//! the kubelet does not speak mTLS and the proxy has no probe endpoint reachable from the
//! node (its admin port is loopback-only).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Map, Value, json};

use crate::config::InjectConfig;
use crate::net;

/// Label (namespace or pod) or annotation (pod): `enabled` opts in, `disabled` (pod) opts
/// out.
pub const ANNOTATION_INJECT: &str = "trellis.dev/inject";
/// Set on every injected pod, with the injector's version: the pod is not injected again.
pub const ANNOTATION_INJECTED: &str = "trellis.dev/injected";
/// The proxy's `--service-name` (the workload's stable name in metrics and traces).
pub const ANNOTATION_SERVICE_NAME: &str = "trellis.dev/service-name";
/// Inbound ports that reach the app without the proxy (comma-separated).
pub const ANNOTATION_EXCLUDE_INBOUND_PORTS: &str = "trellis.dev/exclude-inbound-ports";
/// Outbound destination ports that bypass the proxy (comma-separated).
pub const ANNOTATION_EXCLUDE_OUTBOUND_PORTS: &str = "trellis.dev/exclude-outbound-ports";
/// Outbound destination CIDRs that bypass the proxy, added to the mesh-wide ones.
pub const ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: &str = "trellis.dev/exclude-outbound-cidrs";
/// Label on every injected pod, `native` or `classic` (PodMonitors select on it).
pub const LABEL_PROXY: &str = "trellis.dev/proxy";
/// Name of the proxy container.
pub const PROXY_CONTAINER_NAME: &str = "trellis-proxy";
/// Name of the capture init container.
pub const INIT_CONTAINER_NAME: &str = "trellis-init";
/// Where a classic sidecar's pod that runs to completion finds the `POST /shutdown`
/// bearer token (every container): the app's last step is
/// `curl -X POST -H "Authorization: Bearer $(cat <this>)" http://127.0.0.1:15020/shutdown`.
pub const SHUTDOWN_TOKEN_PATH: &str = "/var/run/trellis/shutdown/token";

const SYSTEM_NAMESPACES: [&str; 2] = ["kube-system", "trellis-system"];
/// The proxy's outbound, inbound and admin ports (DESIGN.md).
const PROXY_PORTS: [u16; 3] = [15001, 15006, 15020];
const ADMIN_PORT: u16 = 15020;
const TOKEN_VOLUME: &str = "trellis-token";
const TOKEN_DIR: &str = "/var/run/secrets/trellis/tokens";
const TOKEN_FILE: &str = "token";
const TRUST_VOLUME: &str = "trellis-trust";
const TRUST_DIR: &str = "/var/run/trellis/trust";
const SHUTDOWN_VOLUME: &str = "trellis-shutdown";
const SHUTDOWN_DIR: &str = "/var/run/trellis/shutdown";
const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// How the proxy runs next to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    /// An init container with `restartPolicy: Always` (Kubernetes 1.29+): started, and
    /// past its startup probe, before any later init container and the app; stopped
    /// after them; a Job completes when its app does.
    Native,
    /// The first regular container (before 1.29).
    Classic,
}

/// Why a pod was left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Neither the namespace nor the pod says `trellis.dev/inject: enabled`.
    NotOptedIn,
    /// The pod says `trellis.dev/inject: disabled`.
    OptedOut,
    /// `kube-system` and `trellis-system` are never injected.
    SystemNamespace(String),
    /// The pod shares the node's network namespace: capture would redirect the node's
    /// traffic.
    HostNetwork,
    /// The pod already has the proxy (what says so).
    AlreadyInjected(String),
}

/// What a patch does, for the response's message, logs and `trellis inject`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Native or classic sidecar.
    pub mode: SidecarMode,
    /// The proxy's `--service-name`, if one was found (else the proxy uses the service
    /// account).
    pub service_name: Option<String>,
    /// Inbound ports not captured besides the proxy's own: the metrics port, the app's
    /// probe ports and the pod's annotation, sorted.
    pub exclude_inbound_ports: Vec<u16>,
    /// The app's probe ports among those (the kubelet reaches them directly).
    pub probe_ports: Vec<u16>,
    /// Outbound ports not captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound CIDRs not captured: the mesh-wide ones, then the pod's.
    pub exclude_outbound_cidrs: Vec<String>,
    /// Classic sidecar in a pod that runs to completion: the app must end with
    /// `POST /shutdown` (token at [`SHUTDOWN_TOKEN_PATH`]).
    pub shutdown_endpoint: bool,
}

/// The decision for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Leave the pod as it is.
    Skip(SkipReason),
    /// Apply these RFC 6902 operations (in order) to the pod.
    Patch(Vec<Value>, Summary),
}

/// Why a pod cannot be injected: something in it is wrong (the field is named), or the
/// injector's own configuration is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// A field of the pod, e.g. `metadata.annotations["trellis.dev/exclude-outbound-cidrs"]`.
    #[error("{field}: {reason}")]
    Field {
        /// The field, as a path into the pod.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The injector's configuration.
    #[error("injector configuration: {0}")]
    Config(String),
}

// === inject ===

/// Decides whether `pod` gets the proxy and builds the patch that adds it.
///
/// `namespace_labels` are the labels of the pod's namespace (empty when unknown); the
/// pod's namespace is `metadata.namespace` (the webhook fills it from the request).
/// Skips, in this order: `kube-system`/`trellis-system`; a pod that already has the
/// proxy; a pod that opts out; a pod not opted in (by itself or its namespace);
/// `hostNetwork`. Errors name the field: a bad `trellis.dev/*` value, an app container
/// using a proxy port or running as the proxy's UID, a probe on a named port the container
/// does not have.
pub fn inject(
    pod: &Pod,
    namespace_labels: &BTreeMap<String, String>,
    config: &InjectConfig,
) -> Result<Decision, InjectError> {
    config.check().map_err(InjectError::Config)?;
    let meta = &pod.metadata;
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    if SYSTEM_NAMESPACES.contains(&namespace) {
        return Ok(Decision::Skip(SkipReason::SystemNamespace(
            namespace.to_owned(),
        )));
    }
    if let Some(what) = already_injected(pod) {
        return Ok(Decision::Skip(SkipReason::AlreadyInjected(what)));
    }
    match pod_opt_in(pod)? {
        Some(false) => return Ok(Decision::Skip(SkipReason::OptedOut)),
        Some(true) => {}
        None => {
            if namespace_labels.get(ANNOTATION_INJECT).map(String::as_str) != Some("enabled") {
                return Ok(Decision::Skip(SkipReason::NotOptedIn));
            }
        }
    }
    let Some(spec) = &pod.spec else {
        return Err(field("spec", "missing"));
    };
    if spec.host_network == Some(true) {
        return Ok(Decision::Skip(SkipReason::HostNetwork));
    }

    let annotation = |key: &'static str| meta.annotations.as_ref().and_then(|a| a.get(key));
    let annotation_field = |key: &str| format!("metadata.annotations[{key:?}]");
    let ports_of = |key: &'static str| -> Result<Vec<u16>, InjectError> {
        match annotation(key) {
            None => Ok(Vec::new()),
            Some(v) => net::port_list(v).map_err(|e| field(&annotation_field(key), &e)),
        }
    };
    let user_inbound = ports_of(ANNOTATION_EXCLUDE_INBOUND_PORTS)?;
    let exclude_outbound_ports = ports_of(ANNOTATION_EXCLUDE_OUTBOUND_PORTS)?;
    let mut exclude_outbound_cidrs = config.exclude_outbound_cidrs.clone();
    if let Some(v) = annotation(ANNOTATION_EXCLUDE_OUTBOUND_CIDRS) {
        let cidrs = net::cidr_list(v)
            .map_err(|e| field(&annotation_field(ANNOTATION_EXCLUDE_OUTBOUND_CIDRS), &e))?;
        for c in cidrs {
            if !exclude_outbound_cidrs.contains(&c) {
                exclude_outbound_cidrs.push(c);
            }
        }
    }

    let proxy_ports = [
        PROXY_PORTS[0],
        PROXY_PORTS[1],
        PROXY_PORTS[2],
        config.metrics_port,
    ];
    let app_containers = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("spec.containers[{i}]"), c))
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, c)| (format!("spec.initContainers[{i}]"), c)),
        );
    let pod_uid = spec.security_context.as_ref().and_then(|sc| sc.run_as_user);
    if pod_uid == Some(config.proxy_uid) {
        return Err(field(
            "spec.securityContext.runAsUser",
            &uid_clash(config.proxy_uid),
        ));
    }
    let mut probe_ports = BTreeSet::new();
    for (path, c) in app_containers {
        let uid = c.security_context.as_ref().and_then(|sc| sc.run_as_user);
        if uid == Some(config.proxy_uid) {
            return Err(field(
                &format!("{path}.securityContext.runAsUser"),
                &uid_clash(config.proxy_uid),
            ));
        }
        for (j, p) in c.ports.iter().flatten().enumerate() {
            if u16::try_from(p.container_port).is_ok_and(|n| proxy_ports.contains(&n)) {
                return Err(field(
                    &format!("{path}.ports[{j}].containerPort"),
                    &format!("{} is a port of the Trellis proxy", p.container_port),
                ));
            }
        }
        for (name, probe) in [
            ("livenessProbe", &c.liveness_probe),
            ("readinessProbe", &c.readiness_probe),
            ("startupProbe", &c.startup_probe),
        ] {
            let Some(probe) = probe else { continue };
            if let Some(port) =
                probe_port(c, probe).map_err(|e| field(&format!("{path}.{name}"), &e))?
            {
                if proxy_ports.contains(&port) {
                    return Err(field(
                        &format!("{path}.{name}"),
                        &format!("probes port {port}, a port of the Trellis proxy"),
                    ));
                }
                probe_ports.insert(port);
            }
        }
    }
    let mut inbound: BTreeSet<u16> = user_inbound.into_iter().collect();
    inbound.insert(config.metrics_port);
    inbound.extend(&probe_ports);

    let service_name = service_name(pod)?;
    let mode = if config.kubernetes_version.has_native_sidecars() {
        SidecarMode::Native
    } else {
        SidecarMode::Classic
    };
    let runs_to_completion = matches!(spec.restart_policy.as_deref(), Some("Never" | "OnFailure"));
    let shutdown_endpoint = mode == SidecarMode::Classic && runs_to_completion;
    let summary = Summary {
        mode,
        service_name,
        exclude_inbound_ports: inbound.into_iter().collect(),
        probe_ports: probe_ports.into_iter().collect(),
        exclude_outbound_ports,
        exclude_outbound_cidrs,
        shutdown_endpoint,
    };
    Ok(Decision::Patch(patch(pod, config, &summary), summary))
}

/// Capture lets the proxy's UID through unredirected: an app with that UID would bypass
/// the mesh without anyone noticing.
fn uid_clash(uid: i64) -> String {
    format!("{uid} is the Trellis proxy's UID, whose traffic is never captured")
}

fn field(field: &str, reason: &str) -> InjectError {
    InjectError::Field {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

/// What says the pod already has the proxy, if anything.
fn already_injected(pod: &Pod) -> Option<String> {
    if let Some(v) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_INJECTED))
    {
        return Some(format!("annotation {ANNOTATION_INJECTED}={v}"));
    }
    let spec = pod.spec.as_ref()?;
    let has = |cs: &[Container]| cs.iter().any(|c| c.name == PROXY_CONTAINER_NAME);
    if has(&spec.containers) {
        return Some(format!("container {PROXY_CONTAINER_NAME}"));
    }
    if has(spec.init_containers.as_deref().unwrap_or_default()) {
        return Some(format!("init container {PROXY_CONTAINER_NAME}"));
    }
    None
}

/// The pod's own choice: label or annotation `trellis.dev/inject`; `disabled` in either
/// wins. Any other value is an error naming where it is.
fn pod_opt_in(pod: &Pod) -> Result<Option<bool>, InjectError> {
    let mut choice = None;
    for (kind, map) in [
        ("labels", &pod.metadata.labels),
        ("annotations", &pod.metadata.annotations),
    ] {
        let Some(v) = map.as_ref().and_then(|m| m.get(ANNOTATION_INJECT)) else {
            continue;
        };
        match v.as_str() {
            "enabled" => choice = Some(choice.unwrap_or(true)),
            "disabled" => choice = Some(false),
            other => {
                return Err(field(
                    &format!("metadata.{kind}[{ANNOTATION_INJECT:?}]"),
                    &format!("{other:?} must be \"enabled\" or \"disabled\""),
                ));
            }
        }
    }
    Ok(choice)
}

/// The port a probe reaches over the network (`httpGet`, `tcpSocket`, `grpc`); `None` for
/// `exec`. A named port is looked up in the container's ports.
fn probe_port(c: &Container, probe: &Probe) -> Result<Option<u16>, String> {
    let port = if let Some(h) = &probe.http_get {
        ("httpGet.port", &h.port)
    } else if let Some(t) = &probe.tcp_socket {
        ("tcpSocket.port", &t.port)
    } else if let Some(g) = &probe.grpc {
        return u16::try_from(g.port)
            .ok()
            .filter(|p| *p > 0)
            .map(Some)
            .ok_or_else(|| format!("grpc.port {} is not a port", g.port));
    } else {
        return Ok(None);
    };
    let number = match port.1 {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .ok_or_else(|| format!("{}: the container has no port named {name:?}", port.0))?,
    };
    u16::try_from(number)
        .ok()
        .filter(|p| *p > 0)
        .map(Some)
        .ok_or_else(|| format!("{}: {number} is not a port", port.0))
}

/// The proxy's `--service-name`: the `trellis.dev/service-name` annotation (checked), else
/// the first valid of the `app.kubernetes.io/name` and `app` labels and the name of the
/// controller that owns the pod (a ReplicaSet's Deployment, a StatefulSet, DaemonSet, or
/// a Job, without the scheduled-time suffix of a CronJob's Jobs). `None` lets the proxy use
/// the service account.
fn service_name(pod: &Pod) -> Result<Option<String>, InjectError> {
    let meta = &pod.metadata;
    if let Some(v) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_SERVICE_NAME))
    {
        if !valid_name(v) {
            return Err(field(
                &format!("metadata.annotations[{ANNOTATION_SERVICE_NAME:?}]"),
                &format!("{v:?} must be 1 to 63 lower-case letters, digits, '-' or '.'"),
            ));
        }
        return Ok(Some(v.clone()));
    }
    let labels = meta.labels.as_ref();
    let from_labels = ["app.kubernetes.io/name", "app"]
        .iter()
        .filter_map(|k| labels.and_then(|l| l.get(*k)))
        .find(|v| valid_name(v))
        .cloned();
    if from_labels.is_some() {
        return Ok(from_labels);
    }
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let from_owner = owner.and_then(|o| match o.kind.as_str() {
        "ReplicaSet" => {
            let hash = labels.and_then(|l| l.get("pod-template-hash"))?;
            o.name
                .strip_suffix(hash.as_str())?
                .strip_suffix('-')
                .map(str::to_owned)
        }
        "StatefulSet" | "DaemonSet" => Some(o.name.clone()),
        // A CronJob's Jobs are `<cronjob>-<scheduled minute>`: one name for all runs.
        "Job" => Some(match o.name.rsplit_once('-') {
            Some((base, n)) if n.len() >= 8 && n.bytes().all(|b| b.is_ascii_digit()) => {
                base.to_owned()
            }
            _ => o.name.clone(),
        }),
        _ => None,
    });
    Ok(from_owner.filter(|n| valid_name(n)))
}

/// The proxy's rule for a service name (proxy/sidecar/src/telemetry.rs, `valid_name`).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

// === the patch ===

/// RFC 6901: `~` is `~0`, `/` is `~1` (annotation keys have slashes).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn add(path: &str, value: Value) -> Value {
    json!({ "op": "add", "path": path, "value": value })
}

/// Adds entries to a string map that may be absent: the whole map when it is, else one
/// `add` per key (which replaces an existing key).
fn add_entries(
    ops: &mut Vec<Value>,
    base: &str,
    existing: Option<&BTreeMap<String, String>>,
    entries: &[(&str, String)],
) {
    match existing {
        None => {
            let map: Map<String, Value> = entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::String(v.clone())))
                .collect();
            ops.push(add(base, Value::Object(map)));
        }
        Some(_) => {
            for (k, v) in entries {
                ops.push(add(
                    &format!("{base}/{}", escape(k)),
                    Value::String(v.clone()),
                ));
            }
        }
    }
}

/// Adds items to an array that may be absent: the whole array when it is, else at the
/// front (in order) or at the end.
fn add_items(ops: &mut Vec<Value>, base: &str, exists: bool, items: Vec<Value>, front: bool) {
    if !exists {
        ops.push(add(base, Value::Array(items)));
        return;
    }
    for (i, item) in items.into_iter().enumerate() {
        let path = if front {
            format!("{base}/{i}")
        } else {
            format!("{base}/-")
        };
        ops.push(add(&path, item));
    }
}

fn joined<T: ToString>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

fn restricted(extra: Value) -> Value {
    let mut sc = json!({
        "allowPrivilegeEscalation": false,
        "privileged": false,
        "seccompProfile": { "type": "RuntimeDefault" },
    });
    if let (Value::Object(sc), Value::Object(extra)) = (&mut sc, extra) {
        sc.extend(extra);
    }
    sc
}

fn env(name: &str, value: &str) -> Value {
    json!({ "name": name, "value": value })
}

fn env_field(name: &str, field_path: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "apiVersion": "v1", "fieldPath": field_path } } })
}

fn init_container(config: &InjectConfig, s: &Summary) -> Value {
    let uid = config.proxy_uid.to_string();
    json!({
        "name": INIT_CONTAINER_NAME,
        "image": config.init_image.as_ref().unwrap_or(&config.proxy_image),
        "imagePullPolicy": config.image_pull_policy,
        "args": ["init"],
        "env": [
            env("TRELLIS_INIT_PROXY_UID", &uid),
            env("TRELLIS_INIT_PROXY_GID", &uid),
            env("TRELLIS_INIT_EXCLUDE_INBOUND_PORTS", &joined(&s.exclude_inbound_ports)),
            env("TRELLIS_INIT_EXCLUDE_OUTBOUND_PORTS", &joined(&s.exclude_outbound_ports)),
            env("TRELLIS_INIT_EXCLUDE_OUTBOUND_CIDRS", &joined(&s.exclude_outbound_cidrs)),
        ],
        "resources": {
            "requests": { "cpu": "10m", "memory": "16Mi" },
            "limits": { "memory": "64Mi" },
        },
        // iptables needs root with NET_ADMIN and NET_RAW in the pod's network namespace,
        // and writes its lock under /run: so a writable root filesystem, nothing else.
        "securityContext": restricted(json!({
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "readOnlyRootFilesystem": false,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
        })),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

fn proxy_container(config: &InjectConfig, s: &Summary) -> Value {
    let r = &config.proxy_resources;
    let quantities = |pairs: [(&str, &Option<String>); 2]| -> Map<String, Value> {
        pairs
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_owned(), Value::String(v.clone()))))
            .collect()
    };
    let mut resources = Map::new();
    let requests = quantities([("cpu", &r.cpu_request), ("memory", &r.memory_request)]);
    let limits = quantities([("cpu", &r.cpu_limit), ("memory", &r.memory_limit)]);
    if !requests.is_empty() {
        resources.insert("requests".to_owned(), Value::Object(requests));
    }
    if !limits.is_empty() {
        resources.insert("limits".to_owned(), Value::Object(limits));
    }

    let mut envs = vec![
        env("TRELLIS_PROXY_MODE", "transparent"),
        env("TRELLIS_PROXY_CONTROL_PLANE", &config.control_plane),
        env(
            "TRELLIS_PROXY_CONTROL_PLANE_IDENTITY",
            &config.control_plane_identity,
        ),
        env("TRELLIS_PROXY_TRUST_DOMAIN", &config.trust_domain),
        env(
            "TRELLIS_PROXY_CA_ROOTS",
            &format!("{TRUST_DIR}/{}", config.trust_bundle_key),
        ),
        env(
            "TRELLIS_PROXY_TOKEN_FILE",
            &format!("{TOKEN_DIR}/{TOKEN_FILE}"),
        ),
        env_field("TRELLIS_PROXY_WORKLOAD", "metadata.name"),
        env_field("TRELLIS_PROXY_NAMESPACE", "metadata.namespace"),
        env_field("TRELLIS_PROXY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ];
    if let Some(name) = &s.service_name {
        envs.push(env("TRELLIS_PROXY_SERVICE_NAME", name));
    }
    envs.push(env(
        "TRELLIS_PROXY_METRICS",
        &format!("0.0.0.0:{}", config.metrics_port),
    ));
    envs.push(env("TRELLIS_LOG", &config.log_level));
    let mut mounts = vec![
        json!({ "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true }),
        json!({ "name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": true }),
    ];
    if s.shutdown_endpoint {
        envs.push(env(
            "TRELLIS_PROXY_SHUTDOWN_TOKEN_FILE",
            SHUTDOWN_TOKEN_PATH,
        ));
        mounts.push(shutdown_mount());
    }
    // The admin port (/ready) is loopback-only, so the kubelet cannot reach it; the
    // metrics listener answers as soon as the proxy serves.
    let probe = |period: u32, failures: u32| {
        json!({
            "httpGet": { "path": "/metrics", "port": config.metrics_port },
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        })
    };
    let uid = config.proxy_uid;
    let mut c = json!({
        "name": PROXY_CONTAINER_NAME,
        "image": config.proxy_image,
        "imagePullPolicy": config.image_pull_policy,
        "args": ["run"],
        "env": envs,
        "ports": [{ "name": "trellis-metrics", "containerPort": config.metrics_port, "protocol": "TCP" }],
        "resources": resources,
        "volumeMounts": mounts,
        "startupProbe": probe(1, 120),
        "livenessProbe": probe(10, 3),
        "securityContext": restricted(json!({
            "runAsUser": uid,
            "runAsGroup": uid,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
        })),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if let Value::Object(m) = &mut c {
        // The kubelet starts the next container only once this hook returns, in both
        // modes: the app never runs before its proxy holds a certificate and a view.
        m.insert(
            "lifecycle".to_owned(),
            json!({ "postStart": { "exec": { "command": [PROXY_BINARY, "wait", "--timeout", "120s"] } } }),
        );
        if s.mode == SidecarMode::Native {
            m.insert(
                "restartPolicy".to_owned(),
                Value::String("Always".to_owned()),
            );
        }
    }
    c
}

/// Where the proxy image puts the binary (images/proxy/Dockerfile).
pub(crate) const PROXY_BINARY: &str = "/usr/local/bin/trellis-proxy";

fn shutdown_mount() -> Value {
    json!({ "name": SHUTDOWN_VOLUME, "mountPath": SHUTDOWN_DIR, "readOnly": true })
}

fn volumes(config: &InjectConfig, s: &Summary) -> Vec<Value> {
    let mut v = vec![
        json!({
            "name": TOKEN_VOLUME,
            "projected": { "sources": [{ "serviceAccountToken": {
                "audience": config.token_audience,
                "expirationSeconds": config.token_expiration_seconds,
                "path": TOKEN_FILE,
            }}]},
        }),
        json!({
            "name": TRUST_VOLUME,
            "configMap": {
                "name": config.trust_bundle_config_map,
                "items": [{ "key": config.trust_bundle_key, "path": config.trust_bundle_key }],
            },
        }),
    ];
    if s.shutdown_endpoint {
        // The pod's UID as the bearer token: readable by every container of the pod and
        // by nobody else through the loopback-only admin port.
        v.push(json!({
            "name": SHUTDOWN_VOLUME,
            "downwardAPI": { "items": [{ "path": "token", "fieldRef": { "apiVersion": "v1", "fieldPath": "metadata.uid" } }] },
        }));
    }
    v
}

fn patch(pod: &Pod, config: &InjectConfig, s: &Summary) -> Vec<Value> {
    let mut ops = Vec::new();
    let meta = &pod.metadata;
    let Some(spec) = &pod.spec else {
        return ops;
    };
    let mode = match s.mode {
        SidecarMode::Native => "native",
        SidecarMode::Classic => "classic",
    };
    let annotations = meta.annotations.as_ref();
    let mut new_annotations = vec![(ANNOTATION_INJECTED, crate::VERSION.to_owned())];
    // An app that already announces its own metrics keeps its annotations; the proxy's
    // are then found through the `trellis-metrics` port (PodMonitor).
    if !annotations.is_some_and(|a| a.contains_key("prometheus.io/scrape")) {
        new_annotations.push(("prometheus.io/scrape", "true".to_owned()));
        new_annotations.push(("prometheus.io/port", config.metrics_port.to_string()));
        new_annotations.push(("prometheus.io/path", "/metrics".to_owned()));
    }
    let first_app = spec.containers.first().map(|c| c.name.clone());
    if let Some(first) = first_app
        && !annotations.is_some_and(|a| a.contains_key(DEFAULT_CONTAINER))
    {
        new_annotations.push((DEFAULT_CONTAINER, first));
    }
    add_entries(
        &mut ops,
        "/metadata/annotations",
        annotations,
        &new_annotations,
    );
    add_entries(
        &mut ops,
        "/metadata/labels",
        meta.labels.as_ref(),
        &[(LABEL_PROXY, mode.to_owned())],
    );

    add_items(
        &mut ops,
        "/spec/volumes",
        spec.volumes.is_some(),
        volumes(config, s),
        false,
    );

    let init = init_container(config, s);
    let proxy = proxy_container(config, s);
    let has_init = spec.init_containers.is_some();
    match s.mode {
        // Capture first, then the proxy, then the pod's own init containers: their
        // traffic goes through the running proxy.
        SidecarMode::Native => {
            add_items(
                &mut ops,
                "/spec/initContainers",
                has_init,
                vec![init, proxy],
                true,
            );
        }
        // No proxy runs during init: capture goes last, so the pod's own init containers
        // keep their network.
        SidecarMode::Classic => {
            add_items(
                &mut ops,
                "/spec/initContainers",
                has_init,
                vec![init],
                false,
            );
            if s.shutdown_endpoint {
                // Before the proxy is inserted at index 0, while the app's indices hold.
                for (i, c) in spec.containers.iter().enumerate() {
                    let base = format!("/spec/containers/{i}/volumeMounts");
                    let exists = c.volume_mounts.is_some();
                    add_items(&mut ops, &base, exists, vec![shutdown_mount()], false);
                }
            }
            ops.push(add("/spec/containers/0", proxy));
        }
    }
    ops
}

// === impl SkipReason, Summary, SidecarMode ===

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotOptedIn => write!(
                f,
                "neither the namespace nor the pod has {ANNOTATION_INJECT}: enabled"
            ),
            Self::OptedOut => write!(f, "the pod has {ANNOTATION_INJECT}: disabled"),
            Self::SystemNamespace(ns) => write!(f, "namespace {ns} is never injected"),
            Self::HostNetwork => write!(f, "the pod uses the host network"),
            Self::AlreadyInjected(what) => write!(f, "already injected ({what})"),
        }
    }
}

impl fmt::Display for SidecarMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native sidecar",
            Self::Classic => "classic sidecar",
        })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "trellis-proxy injected as a {}", self.mode)?;
        if let Some(name) = &self.service_name {
            write!(f, ", service name {name}")?;
        }
        write!(
            f,
            "; inbound ports not captured: {}",
            joined(&self.exclude_inbound_ports)
        )?;
        if !self.probe_ports.is_empty() {
            write!(f, " (probe ports {})", joined(&self.probe_ports))?;
        }
        if !self.exclude_outbound_ports.is_empty() {
            write!(
                f,
                "; outbound ports not captured: {}",
                joined(&self.exclude_outbound_ports)
            )?;
        }
        if !self.exclude_outbound_cidrs.is_empty() {
            write!(
                f,
                "; outbound CIDRs not captured: {}",
                joined(&self.exclude_outbound_cidrs)
            )?;
        }
        if self.shutdown_endpoint {
            write!(
                f,
                "; the app must end with POST http://127.0.0.1:{ADMIN_PORT}/shutdown \
                 (bearer token in {SHUTDOWN_TOKEN_PATH})"
            )?;
        }
        Ok(())
    }
}
