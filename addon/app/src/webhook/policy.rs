//! `POST /validate` for `policy.trellis.dev/v1alpha1` **AuthorizationPolicies**: the checks
//! the CRD's schema cannot express, at `kubectl apply`.
//!
//! The schema refuses types, enums, limits and pattern shapes; it cannot refuse a
//! principal outside the trust-domain forms, a namespace or service account that is not a
//! name, a duplicate target Service or a path holding a query. Such a policy would be
//! stored and then enforced fail-closed by the control plane (an ALLOW policy allowing
//! nothing, a DENY policy refusing everything on its targets), which surprises whoever
//! applied it. This review refuses it instead, naming every bad field.
//!
//! The object is read as the CRD's own type ([`AuthorizationPolicy`]), converted with
//! [`trellis_kube::convert::policy`] and checked with [`trellis_controller::Policy::problems`]:
//! the functions the Kubernetes source and the translator run, so the webhook and the
//! control plane cannot disagree about what is valid. An object that does not even parse
//! as the type (a field of the wrong type, a port over 65535, an unknown field: things the
//! schema normally refuses first) is denied the same way, naming the field.
//!
//! An UPDATE that leaves `spec` as it was is allowed even when the policy has problems,
//! with a warning listing them: the stored policy is already enforced fail-closed, and
//! refusing a metadata-only change (a label, or a finalizer's removal during a delete)
//! would only stop the object from being relabelled or deleted.

use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::core::response::{StatusCause, StatusDetails, StatusSummary};
use kube::core::{DynamicObject, GroupVersionKind};
use serde_json::Value;
use trellis_controller::policy::{AuthorizationPolicy, POLICY_GROUP};
use trellis_kube::convert::Skip;

use super::{Verdict, invalid_response};

/// The version of the kind reviewed. The webhook's rule names only this one; with the
/// default `matchPolicy: Equivalent` the API server converts another served version to it.
const POLICY_VERSION: &str = "v1alpha1";
/// The kind reviewed.
const POLICY_KIND: &str = "AuthorizationPolicy";
/// Most causes in one refusal. A policy within the schema's limits can hold hundreds of
/// thousands of bad values (64 rules of 64 sources of 64 principals); listing them all
/// would make an answer of megabytes. The first ones are enough to start fixing it.
const MAX_CAUSES: usize = 50;

/// One bad field.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    /// Path of the field, e.g. `spec.rules[0].from[0].principals[1]`.
    field: String,
    /// What is wrong with it.
    message: String,
}

/// Whether `kind` is the AuthorizationPolicy this module reviews.
pub(super) fn is_policy(kind: &GroupVersionKind) -> bool {
    kind.group == POLICY_GROUP && kind.version == POLICY_VERSION && kind.kind == POLICY_KIND
}

/// The decision for a CREATE or UPDATE of an AuthorizationPolicy (the caller allows every
/// other operation): allowed when the policy has no problem, else denied with code 422,
/// `reason: Invalid` and one cause per problem. `raw` is the whole AdmissionReview.
pub(super) fn decide(
    req: &AdmissionRequest<DynamicObject>,
    raw: &Value,
    allow: AdmissionResponse,
) -> (Verdict, AdmissionResponse, String) {
    let object = raw.pointer("/request/object").filter(|o| !o.is_null());
    // The object's own name wins: request.name is empty on a CREATE with generateName.
    let name = object
        .and_then(|o| o.pointer("/metadata/name"))
        .and_then(Value::as_str)
        .unwrap_or(&req.name)
        .to_owned();
    let namespace = object
        .and_then(|o| o.pointer("/metadata/namespace"))
        .and_then(Value::as_str)
        .or(req.namespace.as_deref())
        .unwrap_or_default()
        .to_owned();
    let subject = format!("{POLICY_KIND} {namespace}/{name}");
    let Some(object) = object else {
        let mut r = invalid_response(
            Some(req.uid.clone()),
            "request.object: missing for CREATE/UPDATE",
        );
        r.types = allow.types;
        return (Verdict::Invalid, r, subject);
    };
    let new = match parse(object) {
        Ok(policy) => policy,
        Err(problem) => {
            let r = deny(allow, &name, &namespace, &[problem]);
            return (Verdict::Denied, r, subject);
        }
    };
    let problems = problems(new.clone(), &name, &namespace);
    if problems.is_empty() {
        return (Verdict::Allowed, allow, subject);
    }
    let unchanged = req.operation == Operation::Update
        && raw
            .pointer("/request/oldObject")
            .and_then(|old| parse(old).ok())
            .is_some_and(|old| old.spec == new.spec);
    if unchanged {
        let mut allow = allow;
        allow.warnings = Some(vec![format!(
            "{POLICY_KIND} {namespace}/{name} is invalid and stays enforced fail-closed \
             (this update leaves its spec unchanged, so it is allowed): {}",
            listed(&problems)
        )]);
        return (Verdict::Allowed, allow, subject);
    }
    (
        Verdict::Denied,
        deny(allow, &name, &namespace, &problems),
        subject,
    )
}

/// `object` as the CRD's type; a failure names the field (`spec.rules[0].to[0].ports[1]`,
/// `spec.rules[0].when` for an unknown field, `spec.targetRefs[0].name` for a missing
/// one).
fn parse(object: &Value) -> Result<AuthorizationPolicy, Problem> {
    serde_path_to_error::deserialize::<_, AuthorizationPolicy>(object).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let path = if path == "." { String::new() } else { path };
        // A missing field's path stops at its parent (an unknown one's names it): add it,
        // so the cause points at the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(field, _)| field);
        let field = match missing {
            Some(field) if path.is_empty() => field.to_owned(),
            Some(field) => format!("{path}.{field}"),
            None => path,
        };
        Problem { field, message }
    })
}

/// Every problem of `policy` (named `name` in `namespace`), as the control plane finds
/// them: the Kubernetes source's conversion, then [`trellis_controller::Policy::problems`].
fn problems(mut policy: AuthorizationPolicy, name: &str, namespace: &str) -> Vec<Problem> {
    policy.metadata.name = Some(name.to_owned());
    policy.metadata.namespace = Some(namespace.to_owned());
    // The Kubernetes source watches the JSON form (so one unreadable object cannot stop
    // the others); this spec already parsed, so it converts back without loss.
    let spec = match serde_json::to_value(&policy.spec) {
        Ok(spec) => spec,
        Err(e) => {
            return vec![Problem {
                field: "spec".to_owned(),
                message: e.to_string(),
            }];
        }
    };
    let raw = trellis_kube::convert::RawPolicy {
        metadata: policy.metadata,
        spec,
    };
    match trellis_kube::convert::policy(&raw) {
        // `problems` gives `field: message` lines; a field path never holds ": ".
        Ok(policy) => policy
            .problems()
            .into_iter()
            .map(|line| match line.split_once(": ") {
                Some((field, message)) => Problem {
                    field: field.to_owned(),
                    message: message.to_owned(),
                },
                None => Problem {
                    field: String::new(),
                    message: line,
                },
            })
            .collect(),
        // Name and namespace are set above, so this cannot happen; if it ever did, refuse.
        Err(Skip::Invalid(why) | Skip::Ignored(why)) => vec![Problem {
            field: "metadata".to_owned(),
            message: why,
        }],
    }
}

/// The first [`MAX_CAUSES`] problems as `field: message`, joined by `; `, and how many
/// more there are.
fn listed(problems: &[Problem]) -> String {
    let mut text = problems
        .iter()
        .take(MAX_CAUSES)
        .map(|p| {
            if p.field.is_empty() {
                p.message.clone()
            } else {
                format!("{}: {}", p.field, p.message)
            }
        })
        .collect::<Vec<_>>()
        .join("; ");
    if let Some(more) = problems.len().checked_sub(MAX_CAUSES).filter(|n| *n > 0) {
        text.push_str(&format!("; and {more} more"));
    }
    text
}

/// A 422 refusal naming every bad field (the first [`MAX_CAUSES`]), shaped as the API
/// server's own validation errors: kubectl prints `The AuthorizationPolicy "<name>" is
/// invalid:` and one `field: message` line per cause.
fn deny(
    allow: AdmissionResponse,
    name: &str,
    namespace: &str,
    problems: &[Problem],
) -> AdmissionResponse {
    let mut r = allow.deny(format!(
        "invalid {POLICY_KIND} {namespace}/{name}: {}",
        listed(problems)
    ));
    r.result.status = Some(StatusSummary::Failure);
    r.result.code = 422;
    r.result.reason = "Invalid".to_owned();
    r.result.details = Some(StatusDetails {
        name: name.to_owned(),
        group: POLICY_GROUP.to_owned(),
        kind: POLICY_KIND.to_owned(),
        uid: String::new(),
        causes: problems
            .iter()
            .take(MAX_CAUSES)
            .map(|p| StatusCause {
                reason: "FieldValueInvalid".to_owned(),
                message: p.message.clone(),
                field: p.field.clone(),
            })
            .collect(),
        retry_after_seconds: 0,
    });
    r
}

#[cfg(test)]
mod tests;
