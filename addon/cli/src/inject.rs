//! `trellis inject`: the sidecar injector offline, like `istioctl kube-inject`. Reads
//! multi-document YAML on stdin, runs the webhook's own [`trellis_webhook::inject`] on
//! every Pod and pod template (Deployment, StatefulSet, DaemonSet, ReplicaSet,
//! ReplicationController, Job, CronJob; the items of a `List`), writes YAML to stdout.
//!
//! The namespace counts as opted in (`trellis.dev/inject: enabled`): running the command
//! is the opt-in. Everything else follows the webhook: a pod that says
//! `trellis.dev/inject: disabled`, a `kube-system`/`trellis-system` object, a
//! `hostNetwork` pod and an already injected pod are left alone (reported on stderr).
//! Documents that are not injected, including other kinds, are written back byte for
//! byte; injected ones are re-serialized (keys in alphabetical order). An error names the
//! document (1-based), the object and the field, and nothing is written.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use trellis_webhook::{Decision, InjectConfig, KubeVersion, ProxyResources};

/// `trellis inject` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The proxy image (`registry/repository:tag` or `@sha256:...`).
    #[arg(long)]
    proxy_image: String,
    /// The image of the capture step (`trellis-proxy init`, which needs iptables: the
    /// proxy image's `init` target). Default: the proxy image.
    #[arg(long)]
    proxy_init_image: Option<String>,
    /// The control plane's gRPC address as the proxies reach it, `host:port`: its
    /// Service's DNS name, or an IP address.
    #[arg(long, default_value = trellis_webhook::DEFAULT_CONTROL_PLANE)]
    control_plane: String,
    /// The cluster's Kubernetes version: a native sidecar from 1.29, a classic one before.
    #[arg(long, default_value = "1.29")]
    kubernetes_version: KubeVersion,
    /// The mesh's trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The SPIFFE ID the control plane presents. Default:
    /// `spiffe://<trust domain>/ns/trellis-system/sa/trellis-control-plane`.
    #[arg(long)]
    control_plane_identity: Option<String>,
    /// The proxy's log filter (`TRELLIS_LOG`).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Outbound CIDRs that bypass the proxy in every pod (comma-separated); add the API
    /// server's address here. Pods add their own with `trellis.dev/exclude-outbound-cidrs`.
    #[arg(long, value_delimiter = ',', default_value = trellis_webhook::DEFAULT_IMDS_CIDR)]
    exclude_outbound_cidrs: Vec<String>,
    /// The proxy's CPU request.
    #[arg(long, default_value = "50m")]
    proxy_cpu_request: String,
    /// The proxy's memory request.
    #[arg(long, default_value = "64Mi")]
    proxy_memory_request: String,
    /// The proxy's memory limit.
    #[arg(long, default_value = "256Mi")]
    proxy_memory_limit: String,
    /// The namespace of objects that do not name one.
    #[arg(long, default_value = "default")]
    namespace: String,
}

/// Where a kind keeps its pod template.
fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = config(&args);
    if let Err(e) = config.check() {
        eprintln!("trellis inject: {e}");
        return Ok(ExitCode::from(64));
    }
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading stdin")?;
    let (output, notes) = transform(&input, &config, &args.namespace)?;
    for note in notes {
        eprintln!("trellis inject: {note}");
    }
    let mut out = std::io::stdout().lock();
    out.write_all(output.as_bytes())
        .and_then(|()| out.flush())
        .context("writing stdout")?;
    Ok(ExitCode::SUCCESS)
}

fn config(args: &Args) -> InjectConfig {
    let mut c = InjectConfig::new(args.proxy_image.clone(), args.control_plane.clone());
    c.init_image.clone_from(&args.proxy_init_image);
    c.kubernetes_version = args.kubernetes_version;
    c.control_plane_identity = args.control_plane_identity.clone().unwrap_or_else(|| {
        format!(
            "spiffe://{}/ns/trellis-system/sa/trellis-control-plane",
            args.trust_domain
        )
    });
    c.trust_domain.clone_from(&args.trust_domain);
    c.log_level.clone_from(&args.log_level);
    c.exclude_outbound_cidrs = args
        .exclude_outbound_cidrs
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    c.proxy_resources = ProxyResources {
        cpu_request: Some(args.proxy_cpu_request.clone()),
        memory_request: Some(args.proxy_memory_request.clone()),
        cpu_limit: None,
        memory_limit: Some(args.proxy_memory_limit.clone()),
    };
    c
}

/// The documents of a YAML stream, split on `---` lines, empty ones dropped.
fn documents(input: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
        }
    }
    docs.retain(|d| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

/// What happened to one pod (template).
enum Done {
    /// Injected: the summary.
    Injected(String),
    /// Left alone: why.
    Skipped(String),
}

/// The output YAML and the notes for stderr, or the first error.
pub(crate) fn transform(
    input: &str,
    config: &InjectConfig,
    namespace: &str,
) -> anyhow::Result<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for (i, text) in documents(input).into_iter().enumerate() {
        let n = i + 1;
        let mut doc: Value =
            serde_yaml::from_str(&text).map_err(|e| anyhow!("document {n}: not YAML: {e}"))?;
        let what = describe(&doc);
        let done = inject_document(&mut doc, config, namespace)
            .map_err(|e| anyhow!("document {n} ({what}): {e}"))?;
        if done.iter().any(|d| matches!(d, Done::Injected(_))) {
            out.push(serde_yaml::to_string(&doc).context("writing YAML")?);
        } else {
            let mut text = text;
            if !text.ends_with('\n') {
                text.push('\n');
            }
            out.push(text);
        }
        notes.extend(done.into_iter().map(|d| match d {
            Done::Injected(m) => format!("document {n} ({what}): {m}"),
            Done::Skipped(m) => format!("document {n} ({what}): not injected: {m}"),
        }));
    }
    Ok((out.join("---\n"), notes))
}

fn describe(doc: &Value) -> String {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("object");
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)");
    match doc.pointer("/metadata/namespace").and_then(Value::as_str) {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Injects every pod template of `doc` in place: what happened to each (none for kinds
/// without pods).
fn inject_document(
    doc: &mut Value,
    config: &InjectConfig,
    namespace: &str,
) -> anyhow::Result<Vec<Done>> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind == "List" {
        let mut all = Vec::new();
        let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) else {
            return Ok(all);
        };
        for (i, item) in items.iter_mut().enumerate() {
            let what = describe(item);
            let done = inject_document(item, config, namespace)
                .map_err(|e| anyhow!("items[{i}] ({what}): {e}"))?;
            all.extend(done.into_iter().map(|d| match d {
                Done::Injected(m) => Done::Injected(format!("items[{i}] ({what}): {m}")),
                Done::Skipped(m) => Done::Skipped(format!("items[{i}] ({what}): {m}")),
            }));
        }
        return Ok(all);
    }
    let Some(path) = template_path(kind) else {
        return Ok(Vec::new());
    };
    let object_namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or(namespace)
        .to_owned();
    let Some(template) = doc.pointer_mut(path) else {
        let field = path.trim_start_matches('/').replace('/', ".");
        return Err(anyhow!("{field}: missing"));
    };
    // The template as a Pod, in the object's namespace (removed again afterwards).
    let had_namespace = template.pointer("/metadata/namespace").is_some();
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": template.get("metadata").cloned().unwrap_or_else(|| json!({})),
        "spec": template.get("spec").cloned().unwrap_or(Value::Null),
    });
    if !had_namespace && let Some(meta) = pod["metadata"].as_object_mut() {
        meta.insert("namespace".to_owned(), Value::String(object_namespace));
    }
    let prefix = path.trim_start_matches('/').replace('/', ".");
    let at = |field: String| {
        if prefix.is_empty() {
            field
        } else {
            format!("{prefix}.{field}")
        }
    };
    let typed: Pod = serde_json::from_value(pod.clone()).map_err(|e| {
        let what = if prefix.is_empty() {
            "the pod"
        } else {
            prefix.as_str()
        };
        anyhow!("{what}: not a pod: {e}")
    })?;
    let opted_in = BTreeMap::from([("trellis.dev/inject".to_owned(), "enabled".to_owned())]);
    let decision = trellis_webhook::inject(&typed, &opted_in, config).map_err(|e| match e {
        trellis_webhook::InjectError::Field { field, reason } => anyhow!("{}: {reason}", at(field)),
        e @ trellis_webhook::InjectError::Config(_) => anyhow!("{e}"),
    })?;
    let (ops, summary) = match decision {
        Decision::Skip(reason) => return Ok(vec![Done::Skipped(reason.to_string())]),
        Decision::Patch(ops, summary) => (ops, summary),
    };
    trellis_webhook::apply_patch(&mut pod, &ops).map_err(|e| anyhow!("applying the patch: {e}"))?;
    if !had_namespace && let Some(meta) = pod["metadata"].as_object_mut() {
        meta.remove("namespace");
    }
    if let Some(t) = template.as_object_mut() {
        t.insert("metadata".to_owned(), pod["metadata"].take());
        t.insert("spec".to_owned(), pod["spec"].take());
    }
    Ok(vec![Done::Injected(summary.to_string())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_on_separator_lines_only() {
        let input =
            "---\na: 1\n--- # second\nb: '---'\n  --- indented\n---\n# only a comment\n---\n\n";
        assert_eq!(documents(input), ["a: 1\n", "b: '---'\n  --- indented\n"]);
        assert_eq!(documents("a: 1"), ["a: 1"]);
        assert!(documents("").is_empty());
    }

    #[test]
    fn kinds_map_to_their_pod_template() {
        assert_eq!(template_path("Pod"), Some(""));
        assert_eq!(template_path("Deployment"), Some("/spec/template"));
        assert_eq!(
            template_path("CronJob"),
            Some("/spec/jobTemplate/spec/template")
        );
        assert_eq!(template_path("Service"), None);
    }
}
