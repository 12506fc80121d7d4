//! Authorization policies as proxies enforce them, their wire form, and the decision.
//!
//! The control plane validates a `policy.trellis.dev` `AuthorizationPolicy`, resolves
//! service-account shorthands to SPIFFE IDs and sends the result; proxies evaluate it on
//! their inbound side. This file is plain data plus parsing; the decision is
//! [`Authorizer`]'s (`authz/decide.rs`), a pure function over these types, and request
//! paths are normalized for it by [`normalize_path`] (`authz/path.rs`).
//!
//! Semantics are Istio's, so a user moving over keeps their mental model: a matching DENY
//! policy refuses a request; else, when ALLOW policies apply to the workload, one of them
//! must match; else the request is allowed. Dry-run policies are evaluated, logged and
//! counted, never enforced.

use std::fmt;

use crate::discovery::v1 as pb;

mod decide;
mod path;

pub use decide::{
    Authorizer, Decision, Denial, DryRun, EndpointPorts, HttpRequest, PolicyKey, Request, Verdict,
    Workload,
};
pub use path::{PathError, normalize_path};

/// The root namespace: its untargeted policies apply to every workload of the mesh.
pub const ROOT_NAMESPACE: &str = "trellis-system";

/// One authorization policy, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct AuthorizationPolicy {
    /// Namespace of the policy (and of the workloads it applies to, except in
    /// [`ROOT_NAMESPACE`]).
    pub namespace: String,
    /// Name of the policy.
    pub name: String,
    /// Services of `namespace` whose workloads it applies to, on those Services' target
    /// ports; empty: every workload of `namespace` (of the mesh in [`ROOT_NAMESPACE`]).
    pub target_services: Vec<String>,
    /// Allow or deny what matches.
    pub action: Action,
    /// Evaluate and report, never enforce.
    pub dry_run: bool,
    /// Matches when any rule matches; none: matches nothing.
    pub rules: Vec<Rule>,
}

/// What a policy does with the requests it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Let them through; with ALLOW policies present, what none matches is refused.
    Allow,
    /// Refuse them, whatever ALLOW policies say.
    Deny,
}

/// Matches when the caller matches any of `from` (or it is empty) and the request any of
/// `to` (or it is empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Rule {
    /// Who calls.
    pub from: Vec<Source>,
    /// What is called.
    pub to: Vec<Operation>,
}

/// Who calls: every non-empty list must match, any entry of a list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Source {
    /// SPIFFE IDs of the caller.
    pub principals: Vec<Pattern>,
    /// Namespaces of the caller's identity.
    pub namespaces: Vec<Pattern>,
}

/// What is called: every non-empty list must match, any entry of a list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Operation {
    /// The workload's (target) ports.
    pub ports: Vec<u16>,
    /// HTTP methods (HTTP only).
    pub methods: Vec<Pattern>,
    /// Normalized request paths (HTTP only).
    pub paths: Vec<Pattern>,
}

/// A string pattern: exact, `*` (anything), `prefix*` or `*suffix`. Case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    /// Any value (`*`).
    Any,
    /// Exactly this.
    Exact(String),
    /// Starts with this (`prefix*`).
    Prefix(String),
    /// Ends with this (`*suffix`).
    Suffix(String),
}

/// Why a pattern or a policy from the wire was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A `*` somewhere other than alone, first or last, or an empty pattern.
    #[error("{field} = {value:?} is not a pattern (exact, \"*\", \"prefix*\" or \"*suffix\")")]
    BadPattern {
        /// Path of the field, e.g. `rules[0].from[1].principals[2]`.
        field: String,
        /// The value received.
        value: String,
    },
    /// A port of 0 or above 65535.
    #[error("{field} = {port} is not a port (1..=65535)")]
    BadPort {
        /// Path of the field.
        field: String,
        /// The value received.
        port: u32,
    },
    /// No action, or one this proxy does not know.
    #[error("action = {0} is neither ALLOW nor DENY")]
    UnknownAction(i32),
    /// An empty namespace, name or target service name.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// Two policies with the same namespace and name.
    #[error("sent twice")]
    Duplicate,
}

// === impl Pattern ===

impl Pattern {
    /// Parses a pattern; `field` names it in the error.
    pub fn parse(value: &str, field: impl FnOnce() -> String) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadPattern {
            field: field(),
            value: value.to_owned(),
        };
        if value == "*" {
            return Ok(Self::Any);
        }
        let pattern = if let Some(rest) = value.strip_prefix('*') {
            Self::Suffix(rest.to_owned())
        } else if let Some(rest) = value.strip_suffix('*') {
            Self::Prefix(rest.to_owned())
        } else {
            Self::Exact(value.to_owned())
        };
        match &pattern {
            Self::Exact(s) | Self::Prefix(s) | Self::Suffix(s)
                if s.is_empty() || s.contains('*') =>
            {
                Err(bad())
            }
            _ => Ok(pattern),
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(s) => value == s,
            Self::Prefix(s) => value.starts_with(s.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(s) => f.write_str(s),
            Self::Prefix(s) => write!(f, "{s}*"),
            Self::Suffix(s) => write!(f, "*{s}"),
        }
    }
}

impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

// === impl AuthorizationPolicy ===

impl AuthorizationPolicy {
    /// `<namespace>/<name>`, as logs and metrics name the policy.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether a proxy in `namespace` enforces this policy at all (before targeting):
    /// policies of its own namespace and of [`ROOT_NAMESPACE`].
    pub fn concerns_namespace(&self, namespace: &str) -> bool {
        self.namespace == namespace || self.namespace == ROOT_NAMESPACE
    }
}

// === wire ===

fn patterns_to_wire(patterns: &[Pattern]) -> Vec<String> {
    patterns.iter().map(ToString::to_string).collect()
}

impl From<&AuthorizationPolicy> for pb::AuthorizationPolicy {
    fn from(p: &AuthorizationPolicy) -> Self {
        Self {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            target_services: p.target_services.clone(),
            action: match p.action {
                Action::Allow => pb::AuthorizationAction::Allow,
                Action::Deny => pb::AuthorizationAction::Deny,
            }
            .into(),
            dry_run: p.dry_run,
            rules: p
                .rules
                .iter()
                .map(|r| pb::AuthorizationRule {
                    from: r
                        .from
                        .iter()
                        .map(|s| pb::AuthorizationSource {
                            principals: patterns_to_wire(&s.principals),
                            namespaces: patterns_to_wire(&s.namespaces),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|o| pb::AuthorizationOperation {
                            ports: o.ports.iter().map(|p| u32::from(*p)).collect(),
                            methods: patterns_to_wire(&o.methods),
                            paths: patterns_to_wire(&o.paths),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

fn patterns_from_wire(values: &[String], field: &str) -> Result<Vec<Pattern>, PolicyError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Pattern::parse(v, || format!("{field}[{i}]")))
        .collect()
}

impl TryFrom<&pb::AuthorizationPolicy> for AuthorizationPolicy {
    type Error = PolicyError;

    fn try_from(p: &pb::AuthorizationPolicy) -> Result<Self, PolicyError> {
        if p.namespace.is_empty() {
            return Err(PolicyError::Empty("namespace"));
        }
        if p.name.is_empty() {
            return Err(PolicyError::Empty("name"));
        }
        if p.target_services.iter().any(String::is_empty) {
            return Err(PolicyError::Empty("target_services[]"));
        }
        let action = match pb::AuthorizationAction::try_from(p.action) {
            Ok(pb::AuthorizationAction::Allow) => Action::Allow,
            Ok(pb::AuthorizationAction::Deny) => Action::Deny,
            Ok(pb::AuthorizationAction::Unspecified) | Err(_) => {
                return Err(PolicyError::UnknownAction(p.action));
            }
        };
        let rules = p
            .rules
            .iter()
            .enumerate()
            .map(|(r, rule)| {
                let from = rule
                    .from
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        Ok(Source {
                            principals: patterns_from_wire(
                                &s.principals,
                                &format!("rules[{r}].from[{i}].principals"),
                            )?,
                            namespaces: patterns_from_wire(
                                &s.namespaces,
                                &format!("rules[{r}].from[{i}].namespaces"),
                            )?,
                        })
                    })
                    .collect::<Result<_, PolicyError>>()?;
                let to =
                    rule.to
                        .iter()
                        .enumerate()
                        .map(|(i, o)| {
                            let ports =
                                o.ports
                                    .iter()
                                    .enumerate()
                                    .map(|(j, port)| {
                                        u16::try_from(*port).ok().filter(|p| *p != 0).ok_or_else(
                                            || PolicyError::BadPort {
                                                field: format!("rules[{r}].to[{i}].ports[{j}]"),
                                                port: *port,
                                            },
                                        )
                                    })
                                    .collect::<Result<_, _>>()?;
                            Ok(Operation {
                                ports,
                                methods: patterns_from_wire(
                                    &o.methods,
                                    &format!("rules[{r}].to[{i}].methods"),
                                )?,
                                paths: patterns_from_wire(
                                    &o.paths,
                                    &format!("rules[{r}].to[{i}].paths"),
                                )?,
                            })
                        })
                        .collect::<Result<_, PolicyError>>()?;
                Ok(Rule { from, to })
            })
            .collect::<Result<_, PolicyError>>()?;
        Ok(Self {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            target_services: p.target_services.clone(),
            action,
            dry_run: p.dry_run,
            rules,
        })
    }
}

/// The wire form of a set of policies.
pub fn policies_to_wire(policies: &[AuthorizationPolicy]) -> pb::AuthorizationPolicies {
    pb::AuthorizationPolicies {
        policies: policies.iter().map(pb::AuthorizationPolicy::from).collect(),
    }
}

/// A set of policies from the wire, sorted by namespace and name; the first bad policy
/// refuses the set, naming it (`Err((key, error))`).
pub fn policies_from_wire(
    wire: &pb::AuthorizationPolicies,
) -> Result<Vec<AuthorizationPolicy>, (String, PolicyError)> {
    let mut policies = wire
        .policies
        .iter()
        .map(|p| {
            AuthorizationPolicy::try_from(p).map_err(|e| (format!("{}/{}", p.namespace, p.name), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    policies.sort();
    if let Some(pair) = policies
        .windows(2)
        .find(|w| (&w[0].namespace, &w[0].name) == (&w[1].namespace, &w[1].name))
    {
        return Err((pair[0].key(), PolicyError::Duplicate));
    }
    Ok(policies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> Result<Pattern, PolicyError> {
        Pattern::parse(s, || "f".into())
    }

    #[test]
    fn patterns_parse_and_match() -> Result<(), PolicyError> {
        assert!(pat("*")?.matches(""));
        assert!(pat("/api/*")?.matches("/api/x"));
        assert!(!pat("/api/*")?.matches("/ap"));
        assert!(pat("*.js")?.matches("/a/b.js"));
        assert!(pat("GET")?.matches("GET"));
        assert!(!pat("GET")?.matches("get"));
        for bad in ["", "**", "a*b", "*a*", "a**"] {
            assert!(pat(bad).is_err(), "{bad:?} must be refused");
        }
        for s in ["*", "/api/*", "*.js", "exact"] {
            assert_eq!(pat(s)?.to_string(), s);
        }
        Ok(())
    }

    fn policy(name: &str) -> AuthorizationPolicy {
        AuthorizationPolicy {
            namespace: "demo".into(),
            name: name.into(),
            target_services: vec!["web".into()],
            action: Action::Deny,
            dry_run: true,
            rules: vec![Rule {
                from: vec![Source {
                    principals: vec![Pattern::Exact("spiffe://cluster.local/ns/demo/sa/a".into())],
                    namespaces: vec![Pattern::Any],
                }],
                to: vec![Operation {
                    ports: vec![8080],
                    methods: vec![Pattern::Exact("GET".into())],
                    paths: vec![Pattern::Prefix("/admin/".into())],
                }],
            }],
        }
    }

    #[test]
    fn policies_round_trip_and_refuse_bad_fields() {
        let set = vec![policy("a"), policy("b")];
        assert_eq!(policies_from_wire(&policies_to_wire(&set)), Ok(set.clone()));

        let mut wire = policies_to_wire(&set);
        wire.policies[1].rules[0].to[0].ports[0] = 70_000;
        assert_eq!(
            policies_from_wire(&wire),
            Err((
                "demo/b".into(),
                PolicyError::BadPort {
                    field: "rules[0].to[0].ports[0]".into(),
                    port: 70_000
                }
            ))
        );
        let mut wire = policies_to_wire(&set);
        wire.policies[0].action = 0;
        assert_eq!(
            policies_from_wire(&wire),
            Err(("demo/a".into(), PolicyError::UnknownAction(0)))
        );
        let mut wire = policies_to_wire(&set);
        wire.policies[0].rules[0].from[0].namespaces[0] = "a*b".into();
        assert!(matches!(
            policies_from_wire(&wire),
            Err((_, PolicyError::BadPattern { field, .. })) if field == "rules[0].from[0].namespaces[0]"
        ));
        let mut wire = policies_to_wire(&set);
        wire.policies[1].name = "a".into();
        assert_eq!(
            policies_from_wire(&wire),
            Err(("demo/a".into(), PolicyError::Duplicate))
        );
    }
}
