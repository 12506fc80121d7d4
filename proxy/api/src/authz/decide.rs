//! The authorization decision: which policies apply to this proxy, and what they say about
//! one request. Pure over the view, so Istio's semantics are table-tested without sockets.
//!
//! The proxy builds an [`Authorizer`] once per view (policies and services change only
//! with the view) and asks it about every inbound request and tunnel. Most proxies have no
//! policy at all: then [`Authorizer::is_empty`] is true and a request costs one branch.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::path::{PathError, normalize_path};
use super::{Action, AuthorizationPolicy, Operation, Pattern, Rule, Source};
use crate::snapshot::{Service, ServiceKey};

/// A policy's `<namespace>/<name>`, shared between the authorizer and its decisions.
pub type PolicyKey = Arc<str>;

/// The workload a proxy serves, as targeting needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload<'a> {
    /// Its namespace (from its identity).
    pub namespace: &'a str,
    /// Its name: the `workload` of its endpoints in discovery (the pod name).
    pub name: &'a str,
    /// What the port of its endpoints means.
    pub endpoints: EndpointPorts,
}

/// What the address of a workload's endpoint in discovery says about its ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointPorts {
    /// `<pod ip>:<target port>` (transparent capture): a Service targets the workload on
    /// the ports its endpoints name, and a request is on the port it was sent to.
    TargetPort,
    /// The proxy's own inbound address (explicit mode): a Service that has the workload as
    /// an endpoint targets it on every port.
    ProxyAddress,
}

/// One request (or tunnel) to authorize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The caller's SPIFFE ID, verified by mTLS.
    pub principal: &'a str,
    /// The caller's namespace, from that identity.
    pub namespace: &'a str,
    /// The workload port the request is for (the app port it is forwarded to).
    pub port: u16,
    /// Method and path; `None` for an opaque TCP connection.
    pub http: Option<HttpRequest<'a>>,
}

/// The HTTP side of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpRequest<'a> {
    /// The method, as sent (methods are case-sensitive).
    pub method: &'a str,
    /// The request target's path as received, optionally with its query; normalized here
    /// ([`normalize_path`]) when a policy matches on paths.
    pub path: &'a str,
}

/// What the policies say about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Enforced: let it through or refuse it.
    pub verdict: Verdict,
    /// What dry-run policies would have refused: the dry-run DENY policies that matched,
    /// in policy order, then the dry-run ALLOW policies' refusal if any. Reported, never
    /// enforced.
    pub dry_run: Vec<DryRun>,
    /// The normalized path the app must be sent instead of the request's (query not
    /// included), when the request is allowed, an enforced policy that applies matches on
    /// paths, and normalizing changed the path: the app then sees the path that was
    /// authorized.
    pub path: Option<String>,
}

/// The enforced outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through: the first ALLOW policy that matched, or `None` when none applied.
    Allow(Option<PolicyKey>),
    /// Refuse it.
    Deny(Denial),
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// This DENY policy matched (the first one, in namespace and name order).
    Policy(PolicyKey),
    /// ALLOW policies applied (these) and none matched.
    NoAllowMatched(Vec<PolicyKey>),
    /// A policy matches on paths and the request's path cannot be normalized (HTTP 400).
    BadPath(PathError),
}

/// A refusal a dry-run policy would have made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DryRun {
    /// This dry-run DENY policy matched.
    Policy(PolicyKey),
    /// Dry-run ALLOW policies applied (these), and neither they nor an enforced ALLOW
    /// policy matched: enforced, they would refuse the request.
    NoAllowMatched(Vec<PolicyKey>),
}

/// The policies that apply to one proxy, ready to decide.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    policies: Vec<Applied>,
}

/// One policy that applies to this proxy, on some ports.
#[derive(Debug, Clone)]
struct Applied {
    key: PolicyKey,
    ports: Ports,
    action: Action,
    dry_run: bool,
    names_paths: bool,
    rules: Vec<Rule>,
}

/// The workload ports a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ports {
    /// Every port (untargeted, or explicit mode).
    All,
    /// These (sorted, no duplicates, never empty).
    Only(Vec<u16>),
}

/// A request's path, normalized once and only if a policy needs it.
enum Path<'a> {
    /// TCP: no path.
    None,
    /// Not needed: no applicable policy names paths.
    Unused,
    /// Normalized.
    Normal(Cow<'a, str>),
    /// Cannot be normalized.
    Bad(PathError),
}

// === impl Authorizer ===

impl Authorizer {
    /// The policies of `policies` that apply to `me`: those of its namespace and of the
    /// root namespace that target nothing (every workload), and those of its namespace
    /// that target a Service of `services` having `me` as an endpoint (on those
    /// endpoints' ports, see [`EndpointPorts`]). A Service that is not in `services`
    /// targets nothing.
    pub fn new(
        policies: &[AuthorizationPolicy],
        services: &BTreeMap<ServiceKey, Service>,
        me: &Workload<'_>,
    ) -> Self {
        let policies = policies
            .iter()
            .filter(|p| p.concerns_namespace(me.namespace))
            .filter_map(|p| {
                let ports = if p.target_services.is_empty() {
                    Ports::All
                } else if p.namespace == me.namespace {
                    targeted_ports(p, services, me)?
                } else {
                    // A targeted policy of the root namespace targets that namespace's
                    // Services, whose workloads are not ours.
                    return None;
                };
                Some(Applied {
                    key: p.key().into(),
                    ports,
                    action: p.action,
                    dry_run: p.dry_run,
                    names_paths: p
                        .rules
                        .iter()
                        .flat_map(|r| &r.to)
                        .any(|o| !o.paths.is_empty()),
                    rules: p.rules.clone(),
                })
            })
            .collect();
        Self { policies }
    }

    /// True when no policy applies to this proxy: every request is allowed (the caller
    /// need not even build a [`Request`]).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The applicable policies' keys, with the ports each applies to (`None`: all), for
    /// debug output.
    pub fn applied(&self) -> Vec<(PolicyKey, Option<Vec<u16>>)> {
        self.policies
            .iter()
            .map(|p| {
                let ports = match &p.ports {
                    Ports::All => None,
                    Ports::Only(ports) => Some(ports.clone()),
                };
                (p.key.clone(), ports)
            })
            .collect()
    }

    /// Decides on `req`: a matching enforced DENY policy refuses it; else, when enforced
    /// ALLOW policies apply, one must match; else it is allowed. An HTTP path that cannot
    /// be normalized is refused when an enforced policy matches on paths. Dry-run
    /// policies are evaluated the same way and reported in [`Decision::dry_run`].
    ///
    /// `None` when no policy applies to the request's port: it is allowed, with nothing
    /// evaluated and nothing to report.
    pub fn authorize(&self, req: &Request<'_>) -> Option<Decision> {
        let applicable = || self.policies.iter().filter(|p| p.ports.contains(req.port));
        applicable().next()?;
        let mut decision = Decision {
            verdict: Verdict::Allow(None),
            dry_run: Vec::new(),
            path: None,
        };
        let path = match req.http {
            None => Path::None,
            Some(http) if applicable().any(|p| p.names_paths) => match normalize_path(http.path) {
                Ok(normal) => Path::Normal(normal),
                Err(error) => Path::Bad(error),
            },
            Some(_) => Path::Unused,
        };

        // Enforced.
        let (mut deny, mut allow_applies, mut allowed_by) = (None, Vec::new(), None);
        // Dry run: ALLOW policies applying, and whether any ALLOW (enforced or not) matched.
        let (mut dry_allow_applies, mut any_allow_matched) = (Vec::new(), false);
        for p in applicable() {
            let matched = p.matches(req, &path);
            match (p.action, p.dry_run) {
                (Action::Deny, false) => {
                    if matched && deny.is_none() {
                        deny = Some(p.key.clone());
                    }
                }
                (Action::Deny, true) => {
                    if matched {
                        decision.dry_run.push(DryRun::Policy(p.key.clone()));
                    }
                }
                (Action::Allow, false) => {
                    allow_applies.push(p.key.clone());
                    if matched && allowed_by.is_none() {
                        allowed_by = Some(p.key.clone());
                    }
                }
                (Action::Allow, true) => dry_allow_applies.push(p.key.clone()),
            }
            any_allow_matched |= matched && p.action == Action::Allow;
        }
        if !dry_allow_applies.is_empty() && !any_allow_matched {
            decision
                .dry_run
                .push(DryRun::NoAllowMatched(dry_allow_applies));
        }

        let enforced_names_paths = applicable().any(|p| p.names_paths && !p.dry_run);
        decision.verdict = match (&path, deny) {
            (Path::Bad(error), _) if enforced_names_paths => {
                Verdict::Deny(Denial::BadPath(error.clone()))
            }
            (_, Some(policy)) => Verdict::Deny(Denial::Policy(policy)),
            (_, None) if !allow_applies.is_empty() && allowed_by.is_none() => {
                Verdict::Deny(Denial::NoAllowMatched(allow_applies))
            }
            (_, None) => Verdict::Allow(allowed_by),
        };
        // The app must be sent what enforced policies looked at.
        if enforced_names_paths
            && let Verdict::Allow(_) = decision.verdict
            && let (Path::Normal(Cow::Owned(normal)), Some(http)) = (path, req.http)
            && Some(normal.as_str()) != http.path.split('?').next()
        {
            decision.path = Some(normal);
        }
        Some(decision)
    }
}

/// The ports on which `p`'s target Services have `me` as an endpoint; `None` when they
/// have it on none.
fn targeted_ports(
    p: &AuthorizationPolicy,
    services: &BTreeMap<ServiceKey, Service>,
    me: &Workload<'_>,
) -> Option<Ports> {
    let mut ports: Vec<u16> = Vec::new();
    for name in &p.target_services {
        let Some(svc) = services.get(&ServiceKey::new(&p.namespace, name)) else {
            continue;
        };
        for endpoint in svc.ports.iter().flat_map(|sp| &sp.endpoints) {
            if endpoint.workload != me.name {
                continue;
            }
            match me.endpoints {
                EndpointPorts::ProxyAddress => return Some(Ports::All),
                EndpointPorts::TargetPort => ports.push(endpoint.address.port()),
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    (!ports.is_empty()).then_some(Ports::Only(ports))
}

// === impl Ports ===

impl Ports {
    fn contains(&self, port: u16) -> bool {
        match self {
            Ports::All => true,
            Ports::Only(ports) => ports.binary_search(&port).is_ok(),
        }
    }
}

// === impl Applied ===

impl Applied {
    /// Whether any rule matches; no rules match nothing.
    fn matches(&self, req: &Request<'_>, path: &Path<'_>) -> bool {
        self.rules.iter().any(|rule| {
            (rule.from.is_empty() || rule.from.iter().any(|s| s.matches(req)))
                && (rule.to.is_empty() || rule.to.iter().any(|o| o.matches(req, path, self.action)))
        })
    }
}

// === impl Source ===

impl Source {
    fn matches(&self, req: &Request<'_>) -> bool {
        any(&self.principals, req.principal) && any(&self.namespaces, req.namespace)
    }
}

// === impl Operation ===

impl Operation {
    /// Ports, methods and paths must each match when given. Where the request cannot say
    /// (no method or path on TCP, a path that does not normalize), a field that names
    /// something matches for DENY and not for ALLOW: both refuse, failing closed.
    fn matches(&self, req: &Request<'_>, path: &Path<'_>, action: Action) -> bool {
        if !self.ports.is_empty() && !self.ports.contains(&req.port) {
            return false;
        }
        let unknown = action == Action::Deny;
        let methods = self.methods.is_empty()
            || req
                .http
                .map_or(unknown, |http| any(&self.methods, http.method));
        let paths = self.paths.is_empty()
            || match path {
                Path::Normal(p) => any(&self.paths, p),
                Path::None | Path::Bad(_) => unknown,
                // Unreachable: a policy naming paths makes the path needed.
                Path::Unused => unknown,
            };
        methods && paths
    }
}

/// Whether `value` matches any of `patterns`; an empty list matches everything.
fn any(patterns: &[Pattern], value: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| p.matches(value))
}

// === impl Denial ===

impl Denial {
    /// The refusing policy's key, when one policy refused.
    pub fn policy(&self) -> Option<&PolicyKey> {
        match self {
            Denial::Policy(key) => Some(key),
            Denial::NoAllowMatched(_) | Denial::BadPath(_) => None,
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Policy(key) => write!(f, "denied by policy {key}"),
            Denial::NoAllowMatched(_) => f.write_str("no ALLOW policy matched"),
            Denial::BadPath(error) => {
                write!(f, "{error}; refused because a policy matches on paths")
            }
        }
    }
}

impl fmt::Display for DryRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DryRun::Policy(key) => write!(f, "dry-run policy {key} would deny"),
            DryRun::NoAllowMatched(keys) => {
                write!(f, "no ALLOW policy would match (dry-run ALLOW policies: ")?;
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(key)?;
                }
                f.write_str(")")
            }
        }
    }
}

#[cfg(test)]
mod tests;
