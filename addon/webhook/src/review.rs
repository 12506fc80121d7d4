//! [`review`]: the mutating webhook's AdmissionReview in, its answer out.

use std::collections::BTreeMap;

use base64::Engine;

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde::Deserialize;
use serde_json::Value;

use crate::config::InjectConfig;
use crate::inject::{Decision, InjectError, inject};

const ADMISSION_V1: &str = "admission.k8s.io/v1";

/// A namespace's labels as a fallible lookup gives them to [`review_with`]: `Err` says
/// why they could not be read.
pub type NamespaceLabels = Result<BTreeMap<String, String>, String>;

/// What [`review`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Allowed with a patch that adds the proxy.
    Injected,
    /// Allowed unchanged (not a pod CREATE, or the pod is skipped).
    Skipped,
    /// Refused: a field of the pod is wrong (code 422), the injector's configuration is
    /// (code 500), or the labels of the pod's namespace could not be read (code 503,
    /// [`review_with`]).
    Denied,
    /// Not a well-formed AdmissionReview (code 400).
    Invalid,
}

/// The answer to one AdmissionReview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// The decision, for logs and metrics.
    pub outcome: Outcome,
    /// 200 whenever the request's uid was found (the API server reads the body only on
    /// 200); 400 when the body was not an AdmissionReview with a uid.
    pub http_status: u16,
    /// The AdmissionReview JSON carrying `response` (base64 JSONPatch when injected).
    pub body: Vec<u8>,
    /// The request's uid, empty when it could not be read.
    pub uid: String,
    /// What was done or why not: the patch summary, the skip reason or the refusal.
    pub message: String,
}

/// Reviews one `admission.k8s.io/v1` AdmissionReview body for the mutating webhook.
/// Never panics: anything unreadable becomes a refusal saying what was wrong.
///
/// Only a Pod CREATE (no subresource) is considered; everything else is allowed
/// unchanged. `namespace_labels` gives the labels of a namespace by name (the
/// AdmissionReview does not carry them; the control plane watches Namespaces). A skipped
/// pod is allowed with the reason as the status message; a pod the injector refuses (a
/// bad `trellis.dev/*` annotation) is denied with code 422 naming the field.
pub fn review(
    body: &[u8],
    namespace_labels: &dyn Fn(&str) -> BTreeMap<String, String>,
    config: &InjectConfig,
) -> Reviewed {
    review_with(body, &|ns| Ok(namespace_labels(ns)), config)
}

/// [`review`] for a caller whose namespace lookup can fail (the control plane: its
/// Namespace cache may not hold a namespace created a moment ago, and the API server may
/// not answer). `Err(why)` refuses the pod, code 503, naming the namespace and `why`:
/// the webhook fails closed, as its `failurePolicy: Fail` does, so no pod of an opted-in
/// namespace starts without the proxy it was meant to get. The lookup is called only for
/// a Pod CREATE, with the namespace [`pod_namespace`] gives for the same body, so a caller
/// can do its (async) lookup first and answer from the result.
pub fn review_with(
    body: &[u8],
    namespace_labels: &dyn Fn(&str) -> NamespaceLabels,
    config: &InjectConfig,
) -> Reviewed {
    let (raw, request) = match admission_request(body) {
        Ok(parsed) => parsed,
        Err(MalformedReview { uid, message }) => return malformed(uid, &message),
    };
    let allow = AdmissionResponse::from(&request);
    let skipped = |mut r: AdmissionResponse, why: String| {
        r.result.message.clone_from(&why);
        answer(Outcome::Skipped, r, &request.uid, why)
    };
    let k = &request.kind;
    if !(k.group.is_empty() && k.version == "v1" && k.kind == "Pod") {
        return skipped(allow, format!("not a Pod ({})", k.kind));
    }
    if request.operation != Operation::Create {
        return skipped(allow, format!("{:?} is not a CREATE", request.operation));
    }
    if let Some(sub) = request.sub_resource.as_deref().filter(|s| !s.is_empty()) {
        return skipped(allow, format!("subresource {sub}"));
    }
    let mut pod = match raw.pointer("/request/object") {
        None | Some(Value::Null) => {
            return malformed(
                Some(request.uid.clone()),
                "request.object: missing for CREATE",
            );
        }
        Some(v) => match Pod::deserialize(v) {
            Ok(p) => p,
            Err(e) => {
                return malformed(
                    Some(request.uid.clone()),
                    &format!("request.object: not a Pod: {e}"),
                );
            }
        },
    };
    if pod.metadata.namespace.as_deref().is_none_or(str::is_empty) {
        pod.metadata.namespace.clone_from(&request.namespace);
    }
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let labels = match namespace_labels(&namespace) {
        Ok(labels) => labels,
        Err(why) => return unavailable(allow, &request.uid, &namespace, &why),
    };
    match inject(&pod, &labels, config) {
        Ok(Decision::Skip(reason)) => skipped(allow, format!("not injected: {reason}")),
        Ok(Decision::Patch(ops, summary)) => {
            let message = summary.to_string();
            let patch = serde_json::from_value::<json_patch::Patch>(Value::Array(ops))
                .map_err(|e| e.to_string())
                .and_then(|p| allow.clone().with_patch(p).map_err(|e| e.to_string()));
            match patch {
                Ok(mut r) => {
                    r.result.message.clone_from(&message);
                    answer(Outcome::Injected, r, &request.uid, message)
                }
                Err(e) => {
                    let e = InjectError::Config(format!("cannot encode the patch: {e}"));
                    deny(allow, &request.uid, &e)
                }
            }
        }
        Err(e) => deny(allow, &request.uid, &e),
    }
}

/// The namespace whose labels [`review`] would look up for `body`: that of a v1 Pod
/// CREATE without subresource (the pod's own `metadata.namespace`, else the request's);
/// `None` for anything else, which needs no lookup.
pub fn pod_namespace(body: &[u8]) -> Option<String> {
    let raw: Value = serde_json::from_slice(body).ok()?;
    let request = raw.get("request")?;
    let kind = request.get("kind")?;
    let is =
        |v: &Value, field: &str, want: &str| v.get(field).and_then(Value::as_str) == Some(want);
    if !(is(kind, "group", "") && is(kind, "version", "v1") && is(kind, "kind", "Pod")) {
        return None;
    }
    if !is(request, "operation", "CREATE") {
        return None;
    }
    if request
        .get("subResource")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty())
    {
        return None;
    }
    let non_empty = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    non_empty(request.pointer("/object/metadata/namespace"))
        .or_else(|| non_empty(request.get("namespace")))
        .or(Some(String::new()))
}

/// The pod's namespace could not be read: refused (503), so the API server's caller
/// (usually a controller) retries, rather than admitted without the proxy.
fn unavailable(allow: AdmissionResponse, uid: &str, namespace: &str, why: &str) -> Reviewed {
    let message = format!(
        "trellis sidecar injection: the labels of namespace {namespace:?} are unknown ({why}); \
         the pod is refused rather than started without its proxy, retry"
    );
    let mut r = allow.deny(&message);
    r.result.code = 503;
    r.result.reason = "ServiceUnavailable".to_owned();
    r.result.status = Some(kube::core::response::StatusSummary::Failure);
    answer(Outcome::Denied, r, uid, message)
}

fn deny(allow: AdmissionResponse, uid: &str, e: &InjectError) -> Reviewed {
    let message = format!("trellis sidecar injection: {e}");
    let mut r = allow.deny(&message);
    match e {
        InjectError::Field { .. } => {
            r.result.code = 422;
            r.result.reason = "Invalid".to_owned();
        }
        InjectError::Config(_) => {
            r.result.code = 500;
            r.result.reason = "InternalError".to_owned();
        }
    }
    r.result.status = Some(kube::core::response::StatusSummary::Failure);
    answer(Outcome::Denied, r, uid, message)
}

fn answer(outcome: Outcome, r: AdmissionResponse, uid: &str, message: String) -> Reviewed {
    Reviewed {
        outcome,
        http_status: 200,
        body: to_json(r),
        uid: uid.to_owned(),
        message,
    }
}

/// A body that is not a usable `admission.k8s.io/v1` AdmissionReview: the request's uid
/// when it could still be read (the API server reads only an answer that echoes it, so
/// with one the refusal is a 200, without one a 400), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedReview {
    /// `request.uid`, when the body is JSON that has one.
    pub uid: Option<String>,
    /// What is wrong, e.g. `AdmissionReview has no request`.
    pub message: String,
}

/// Parses an `admission.k8s.io/v1` AdmissionReview into its raw JSON (for the fields the
/// typed request leaves out, such as the object as sent) and its request. Every webhook
/// the control plane serves (`/inject` here, `/validate` in the app) starts with it.
pub fn admission_request(
    body: &[u8],
) -> Result<(Value, AdmissionRequest<DynamicObject>), MalformedReview> {
    let bad = |uid: Option<String>, message: String| MalformedReview { uid, message };
    let raw: Value = serde_json::from_slice(body)
        .map_err(|e| bad(None, format!("request body is not JSON: {e}")))?;
    let uid = raw
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let api_version = raw.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = raw.get("kind").and_then(Value::as_str).unwrap_or("");
    if api_version != ADMISSION_V1 || kind != "AdmissionReview" {
        return Err(bad(
            uid,
            format!(
                "expected apiVersion {ADMISSION_V1}, kind AdmissionReview; \
                 found {api_version:?} {kind:?}"
            ),
        ));
    }
    let review = AdmissionReview::<DynamicObject>::deserialize(&raw)
        .map_err(|e| bad(uid.clone(), format!("malformed AdmissionReview: {e}")))?;
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| bad(uid, "AdmissionReview has no request".to_owned()))?;
    Ok((raw, request))
}

fn malformed(uid: Option<String>, message: &str) -> Reviewed {
    let http_status = if uid.is_some() { 200 } else { 400 };
    let mut r = AdmissionResponse::invalid(format!("invalid AdmissionReview: {message}"));
    r.uid = uid.clone().unwrap_or_default();
    r.result.code = 400;
    Reviewed {
        outcome: Outcome::Invalid,
        http_status,
        message: r.result.message.clone(),
        body: to_json(r),
        uid: uid.unwrap_or_default(),
    }
}

/// The review JSON. kube serializes `patch` (`Vec<u8>`) as an array of numbers; the API
/// documents it as base64 (Go's `[]byte`), so it is rewritten as such.
fn to_json(response: AdmissionResponse) -> Vec<u8> {
    let encoded = serde_json::to_value(response.into_review()).and_then(|mut review| {
        if let Some(patch) = review.pointer_mut("/response/patch") {
            let bytes: Vec<u8> = serde_json::from_value(patch.take())?;
            *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        serde_json::to_vec(&review)
    });
    match encoded {
        Ok(body) => body,
        Err(_) => concat!(
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":"#,
            r#"{"uid":"","allowed":false,"status":{"code":500,"message":"internal error"}}}"#
        )
        .as_bytes()
        .to_vec(),
    }
}
