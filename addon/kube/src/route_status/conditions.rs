//! What Trellis's entries in an HTTPRoute's `status.parents` should say: pure functions
//! of the route as stored and of the Services that exist, table-tested.
//!
//! One entry per Service parentRef (the same parentRef twice gives one entry), in spec
//! order, each with the parentRef as written, [`CONTROLLER_NAME`], and two conditions:
//!
//! | type | `True` | `False`, reason |
//! | --- | --- | --- |
//! | `Accepted` | `Accepted` | `NoMatchingParent` (the parent Service does not exist), else `UnsupportedValue` (the route's problems, `field: message`, as [`Route::problems`] gives them) |
//! | `ResolvedRefs` | `ResolvedRefs` | `InvalidKind` (a backend that is not a core Service), `RefNotPermitted` (a Service of another namespace), `BackendNotFound` (a Service that does not exist): the first bad backend's reason; the message names every bad backend |
//!
//! Each condition carries `observedGeneration` (the route's `metadata.generation`) and
//! `lastTransitionTime`, kept from our previous entry for that parent when the condition's
//! `status` did not change. Messages are capped at [`MAX_MESSAGE`] characters. Entries of
//! other controllers are kept as they are, in place; ours follow them.
//!
//! [`Route::problems`]: trellis_controller::Route::problems

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};
use trellis_controller::ObjectKey;
use trellis_controller::httproute::ParentReference;

use super::CONTROLLER_NAME;
use crate::convert::{self, RawRoute};

/// Longest condition message, in characters.
pub const MAX_MESSAGE: usize = 1024;
/// Most entries in `status.parents` (the Gateway API's `maxItems`).
const MAX_PARENTS: usize = 32;
/// The fields of a parentRef echoed into its status entry, when written.
const PARENT_REF_FIELDS: [&str; 6] = ["group", "kind", "namespace", "name", "sectionName", "port"];

/// One condition before it is dated: its type, whether it holds, why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Verdict {
    kind: &'static str,
    holds: bool,
    reason: &'static str,
    message: String,
}

/// The route's whole new `status` when Trellis's entries in it are not those it should
/// have now (given the `services` that exist, and `now`, RFC 3339, for conditions whose
/// status changes); `None` when they are, so there is nothing to write. Other
/// controllers' entries are kept in place; ours are replaced, and removed for parents no
/// longer in the spec (all of them for a route that has no Service parent any more).
pub(crate) fn status_update(
    route: &RawRoute,
    services: &BTreeSet<ObjectKey>,
    now: &str,
) -> Option<Value> {
    let existing = route.status["parents"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let (ours, others): (Vec<Value>, Vec<Value>) = existing.into_iter().partition(is_ours);
    let mut desired = desired(route, services, &ours, now);
    // Room left by the others: the API server refuses more entries than that.
    desired.truncate(MAX_PARENTS.saturating_sub(others.len()));
    if desired == ours {
        return None;
    }
    let mut status = route.status.as_object().cloned().unwrap_or_else(Map::new);
    let parents = others.into_iter().chain(desired).collect();
    status.insert("parents".to_owned(), Value::Array(parents));
    Some(Value::Object(status))
}

/// Whether a `status.parents` entry is Trellis's.
fn is_ours(entry: &Value) -> bool {
    entry["controllerName"] == CONTROLLER_NAME
}

/// Our entries as they should be, `before` being our entries now.
fn desired(
    route: &RawRoute,
    services: &BTreeSet<ObjectKey>,
    before: &[Value],
    now: &str,
) -> Vec<Value> {
    // Not the mesh's (no Service parent), or not even named: no entry of ours.
    let Ok(parsed) = convert::route(route) else {
        return Vec::new();
    };
    let namespace = parsed.metadata.namespace.as_str();
    let generation = route.metadata.generation;
    let problems = parsed.problems();
    let resolved = resolved_refs(&route.spec, namespace, services);
    let written = route.spec["parentRefs"].as_array();
    let mut entries: Vec<Value> = Vec::new();
    for (i, parent) in parsed.spec.parent_refs.iter().enumerate() {
        if !parent.is_service() {
            continue;
        }
        let parent_ref = echo(written.and_then(|w| w.get(i)), parent);
        if entries.iter().any(|e| e["parentRef"] == parent_ref) {
            continue;
        }
        let parent_namespace = parent.namespace.as_deref().unwrap_or(namespace);
        let accepted = if !services.contains(&ObjectKey::new(parent_namespace, &parent.name)) {
            Verdict::fails(
                "Accepted",
                "NoMatchingParent",
                format!("Service {parent_namespace}/{} not found", parent.name),
            )
        } else if !problems.is_empty() {
            Verdict::fails(
                "Accepted",
                "UnsupportedValue",
                format!(
                    "not applied, Trellis does not support: {}",
                    problems.join("; ")
                ),
            )
        } else {
            Verdict::holds("Accepted", "Accepted", "applied by the mesh's proxies")
        };
        let previous = before.iter().find(|e| e["parentRef"] == parent_ref);
        let conditions = [&accepted, &resolved]
            .map(|verdict| verdict.condition(previous, generation, now))
            .to_vec();
        entries.push(json!({
            "parentRef": parent_ref,
            "controllerName": CONTROLLER_NAME,
            "conditions": conditions,
        }));
    }
    entries
}

/// The parentRef as written (the fields that are set), or as parsed when it was not an
/// object (which no API server stores).
fn echo(written: Option<&Value>, parent: &ParentReference) -> Value {
    if let Some(fields) = written.and_then(Value::as_object) {
        let kept = PARENT_REF_FIELDS
            .iter()
            .filter_map(|f| Some(((*f).to_owned(), fields.get(*f)?.clone())));
        return Value::Object(kept.collect());
    }
    let mut parent_ref = json!({"group": parent.group, "kind": parent.kind, "name": parent.name});
    if let Some(namespace) = &parent.namespace {
        parent_ref["namespace"] = json!(namespace);
    }
    if let Some(section) = &parent.section_name {
        parent_ref["sectionName"] = json!(section);
    }
    if let Some(port) = parent.port {
        parent_ref["port"] = json!(port);
    }
    parent_ref
}

/// `ResolvedRefs`: every backendRef of every rule, read from the spec as written (so that
/// a spec that does not parse is still judged on its backends), is a core Service of the
/// route's namespace that exists.
fn resolved_refs(spec: &Value, namespace: &str, services: &BTreeSet<ObjectKey>) -> Verdict {
    let mut bad: Vec<(&'static str, String)> = Vec::new();
    let rules = spec["rules"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (r, rule) in rules.iter().enumerate() {
        let backends = rule["backendRefs"].as_array().map(Vec::as_slice);
        for (b, backend) in backends.unwrap_or_default().iter().enumerate() {
            let at = format!("spec.rules[{r}].backendRefs[{b}]");
            let text = |field: &str, absent: &'static str| -> String {
                backend[field].as_str().unwrap_or(absent).to_owned()
            };
            let (group, kind, name) =
                (text("group", ""), text("kind", "Service"), text("name", ""));
            if !group.is_empty() {
                bad.push((
                    "InvalidKind",
                    format!("{at}: {group}/{kind} {name:?} is not a core Service (group \"\")"),
                ));
            } else if kind != "Service" {
                bad.push((
                    "InvalidKind",
                    format!("{at}: kind {kind} ({name:?}) is not supported: only Service"),
                ));
            } else if let Some(other) = backend["namespace"].as_str().filter(|ns| *ns != namespace)
            {
                bad.push((
                    "RefNotPermitted",
                    format!(
                        "{at}: Service {other}/{name} is in another namespace; that needs a \
                         ReferenceGrant, which Trellis does not support"
                    ),
                ));
            } else if !services.contains(&ObjectKey::new(namespace, &name)) {
                bad.push((
                    "BackendNotFound",
                    format!("{at}: Service {namespace}/{name} not found"),
                ));
            }
        }
    }
    match bad.first() {
        None => Verdict::holds(
            "ResolvedRefs",
            "ResolvedRefs",
            "every backend is an existing Service of the route's namespace",
        ),
        Some((reason, _)) => {
            let reason = *reason;
            let lines: Vec<String> = bad.into_iter().map(|(_, line)| line).collect();
            Verdict::fails("ResolvedRefs", reason, lines.join("; "))
        }
    }
}

/// `message` cut to [`MAX_MESSAGE`] characters, the cut marked with `...`.
fn capped(message: &str) -> String {
    if message.chars().count() <= MAX_MESSAGE {
        return message.to_owned();
    }
    let mut cut: String = message.chars().take(MAX_MESSAGE - 3).collect();
    cut.push_str("...");
    cut
}

// === impl Verdict ===

impl Verdict {
    fn holds(kind: &'static str, reason: &'static str, message: &str) -> Self {
        Self {
            kind,
            holds: true,
            reason,
            message: message.to_owned(),
        }
    }

    fn fails(kind: &'static str, reason: &'static str, message: String) -> Self {
        Self {
            kind,
            holds: false,
            reason,
            message,
        }
    }

    /// The condition as written in the entry; its `lastTransitionTime` is the one of the
    /// `previous` entry's condition of the same type when that had the same status, else
    /// `now`.
    fn condition(&self, previous: Option<&Value>, generation: Option<i64>, now: &str) -> Value {
        let status = if self.holds { "True" } else { "False" };
        let conditions = previous.and_then(|p| p["conditions"].as_array());
        let since = (conditions.into_iter().flatten())
            .find(|c| c["type"] == self.kind)
            .filter(|c| c["status"] == status)
            .and_then(|c| c["lastTransitionTime"].as_str())
            .unwrap_or(now);
        let mut condition = json!({
            "type": self.kind,
            "status": status,
            "reason": self.reason,
            "message": capped(&self.message),
            "lastTransitionTime": since,
        });
        if let Some(generation) = generation {
            condition["observedGeneration"] = json!(generation);
        }
        condition
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
