//! AuthorizationPolicies: the checks both sources apply, their translation into the form
//! proxies enforce (`trellis_api::authz`), and the reporting of invalid ones.
//!
//! Checks ([`problems`]): every problem is reported with the path of its field, never just
//! the first. `metadata.name` is a DNS-1123 subdomain (as Kubernetes names custom
//! resources) and `metadata.namespace` a DNS-1123 label. `spec.targetRefs` entries name a
//! core (`group: ""`) `Service` by a DNS-1123 label, each Service once. Every pattern
//! (principals, namespaces, paths) must parse as exact, `*`, `prefix*` or `*suffix`;
//! principals are `spiffe://<trust-domain>/<path>` or Istio's
//! `<trust-domain>/ns/<namespace>/sa/<service-account>` (a prefix must name a whole trust
//! domain, so that it is clear which of the two it is); namespaces are namespace names or
//! patterns over their characters; serviceAccounts are `name` or `namespace/name` of
//! DNS-1123 labels, never patterns; methods are `*` or an upper-case HTTP token; paths are
//! `*`, `*suffix`, or start with `/` and hold no query; ports are 1..=65535. At most
//! [`MAX_POLICY_ENTRIES`] entries in every list (rules, targetRefs, from, to, and each list
//! of values), strings of at most [`MAX_POLICY_STRING`] characters, principals and paths of
//! at most [`MAX_POLICY_LONG_STRING`].
//!
//! Translation ([`translate_policies`]): policies sorted by namespace and name; a
//! `serviceAccounts` entry becomes the principal
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<name>` (a bare name is in the policy's
//! namespace), an Istio-form principal gets `spiffe://` (a `*suffix` pattern matches the
//! same either way), targetRefs become the sorted, deduplicated `target_services`, and
//! action, dryRun and rules map one to one.
//!
//! A policy with problems can still arrive from Kubernetes (the CRD schema cannot express
//! every check, and the validating webhook can be bypassed). Leaving it out would open
//! access (an ALLOW policy that restricted its targets, a DENY policy that refused), so it
//! is translated **fail-closed** instead. So is one whose `spec` does not even parse
//! (applied with `--validate=false` against an older CRD, written for a newer Trellis):
//! [`Policy::from_json_spec`] keeps what it can read safely (targetRefs, an `ALLOW`
//! action, `dryRun: true`), makes an unreadable or unknown action DENY, and records the
//! serde error (with its field path) as the policy's first problem, so one such object is
//! failed closed on its own. Fail-closed means: an ALLOW policy keeps its targets and gets
//! no rules (it allows nothing), a DENY policy keeps its targets and gets one empty rule
//! (it refuses every request to them); when the targetRefs themselves are invalid (or,
//! for a spec that did not parse, unreadable), the policy targets its whole namespace (in
//! the root namespace, `trellis-system`, the whole mesh).
//! `dryRun` is kept: a dry-run policy is never enforced, invalid or not.
//! [`InvalidPolicies`] logs each such policy once per change and counts them.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use trellis_api::authz::{self, Action, Operation, Pattern, ROOT_NAMESPACE, Rule, Source};
use trellis_identity::SpiffeId;

use crate::invalid::Ledger;
use crate::metrics::InvalidCount;
use crate::objects::{ObjectMeta, Objects, Policy, SpecParseError};
use crate::policy::{
    AuthorizationPolicySpec, PolicyAction, PolicyOperation, PolicyRule, PolicySource,
    PolicyTargetRef,
};
use crate::validate::{FieldError, dns_label, dns_subdomain};

/// Most entries accepted in any list of a policy: rules, targetRefs, each rule's `from`
/// and `to`, and each list of values (principals, namespaces, serviceAccounts, ports,
/// methods, paths). The CRD's schema says the same (`maxItems`): one constant for both.
pub const MAX_POLICY_ENTRIES: usize = crate::policy::SCHEMA_MAX_ITEMS;
/// Longest string accepted in a policy, but for principals and paths (the schema's
/// `maxLength`).
pub const MAX_POLICY_STRING: usize = crate::policy::SCHEMA_MAX_STRING;
/// Longest principal or path accepted (the schema's `maxLength` for them).
pub const MAX_POLICY_LONG_STRING: usize = crate::policy::SCHEMA_MAX_LONG_STRING;

const SPIFFE_SCHEME: &str = "spiffe://";
/// How much of a bad value a message quotes: enough to recognise it, never a whole
/// kilobyte.
const SHOWN_CHARS: usize = 80;
/// Longest parse error field path or message kept: serde quotes the offending key or
/// value whole, and an object may be over a megabyte, so that is cut before it is logged
/// with every change.
const PARSE_ERROR_CHARS: usize = 300;

/// See [`Policy::from_json_spec`].
pub(crate) fn from_json_spec(metadata: ObjectMeta, spec: &Value) -> Policy {
    let error = match serde_path_to_error::deserialize::<_, AuthorizationPolicySpec>(spec) {
        Ok(parsed) => return Policy::new(metadata, parsed),
        Err(e) => parse_error("spec", e),
    };
    let mut parse_errors = vec![error];
    // Absent: the whole namespace, as written. Anything else must read whole: a target
    // left out (or one with a field this version does not know, which could be a narrower
    // or another namespace's Service) would aim the fail-closed policy at the wrong
    // workloads, so then the policy covers its whole namespace instead.
    let target_refs = match spec.get("targetRefs") {
        None => Vec::new(),
        Some(refs) => match serde_path_to_error::deserialize::<_, Vec<PolicyTargetRef>>(refs) {
            Ok(refs) => refs,
            Err(e) => {
                let error = parse_error("spec.targetRefs", e);
                // Already the first error when the spec failed there.
                if !parse_errors.contains(&error) {
                    parse_errors.push(error);
                }
                Vec::new()
            }
        },
    };
    // Only an ALLOW read as such stays ALLOW: a policy that allows nothing on its targets
    // lets other ALLOW policies through, whereas an unknown action (a newer one, a typo)
    // could have been meant to refuse.
    let action = match spec.get("action").and_then(Value::as_str) {
        Some("ALLOW") => PolicyAction::Allow,
        _ => PolicyAction::Deny,
    };
    Policy {
        metadata,
        spec: AuthorizationPolicySpec {
            target_refs,
            action,
            // A dry-run policy is never enforced, invalid or not (as for any invalid
            // policy); anything but a plain `true` is enforced.
            dry_run: spec.get("dryRun") == Some(&Value::Bool(true)),
            rules: Vec::new(),
        },
        parse_errors,
    }
}

/// A serde error at `field` (plus the path below it), both cut to [`PARSE_ERROR_CHARS`].
pub(crate) fn parse_error(
    field: &str,
    e: serde_path_to_error::Error<serde_json::Error>,
) -> SpecParseError {
    let path = e.path().to_string();
    let field = if path == "." {
        field.to_owned()
    } else if path.starts_with('[') {
        format!("{field}{path}")
    } else {
        format!("{field}.{path}")
    };
    SpecParseError {
        field: cut(&field, PARSE_ERROR_CHARS),
        message: cut(&e.into_inner().to_string(), PARSE_ERROR_CHARS),
    }
}

/// `text`, cut to `max` characters with `...` when longer.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max).collect();
    cut.push_str("...");
    cut
}

/// Every problem of `p`, in field order.
pub(crate) fn problems(p: &Policy) -> Vec<FieldError> {
    let mut c = Checker::default();
    if let Err(why) = dns_subdomain(&p.metadata.name) {
        c.push(
            "metadata.name",
            format!("invalid name {}: {why}", shown(&p.metadata.name)),
        );
    }
    if let Err(why) = dns_label(&p.metadata.namespace) {
        c.push(
            "metadata.namespace",
            format!("invalid namespace {}: {why}", shown(&p.metadata.namespace)),
        );
    }
    // The spec as written did not parse: say why; what follows checks the stand-in.
    for e in &p.parse_errors {
        c.push(e.field.clone(), e.message.clone());
    }
    let spec = &p.spec;
    c.count("spec.targetRefs", spec.target_refs.len());
    // Where each Service was first named, to name both sides of a duplicate.
    let mut targets: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, target) in spec.target_refs.iter().enumerate().take(MAX_POLICY_ENTRIES) {
        let at = |field: &str| format!("spec.targetRefs[{i}].{field}");
        if !target.group.is_empty() {
            c.push(
                at("group"),
                format!(
                    "{} is not the core group: a Service's group is \"\" (or leave it out)",
                    shown(&target.group)
                ),
            );
        }
        if target.kind != "Service" {
            c.push(
                at("kind"),
                format!("{} is not supported: only Service", shown(&target.kind)),
            );
        }
        if let Err(why) = dns_label(&target.name) {
            c.push(
                at("name"),
                format!("invalid Service name {}: {why}", shown(&target.name)),
            );
        } else if let Some(first) = targets.insert(&target.name, i) {
            targets.insert(&target.name, first);
            c.push(
                at("name"),
                format!(
                    "duplicate target Service {:?} (also spec.targetRefs[{first}])",
                    target.name
                ),
            );
        }
    }
    c.count("spec.rules", spec.rules.len());
    for (r, rule) in spec.rules.iter().enumerate().take(MAX_POLICY_ENTRIES) {
        c.rule(r, rule);
    }
    c.errors
}

/// Accumulates problems.
#[derive(Default)]
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// A list of `len` entries at `field` may hold at most [`MAX_POLICY_ENTRIES`]; only
    /// that many are checked further, so a huge list gives one problem, not thousands.
    fn count(&mut self, field: &str, len: usize) {
        if len > MAX_POLICY_ENTRIES {
            self.push(
                field,
                format!("has {len} entries; at most {MAX_POLICY_ENTRIES} are accepted"),
            );
        }
    }

    fn rule(&mut self, r: usize, rule: &PolicyRule) {
        let at = format!("spec.rules[{r}]");
        self.count(&format!("{at}.from"), rule.from.len());
        for (i, source) in rule.from.iter().enumerate().take(MAX_POLICY_ENTRIES) {
            self.source(&format!("{at}.from[{i}]"), source);
        }
        self.count(&format!("{at}.to"), rule.to.len());
        for (i, operation) in rule.to.iter().enumerate().take(MAX_POLICY_ENTRIES) {
            self.operation(&format!("{at}.to[{i}]"), operation);
        }
    }

    fn source(&mut self, at: &str, source: &PolicySource) {
        self.values(
            &format!("{at}.principals"),
            &source.principals,
            MAX_POLICY_LONG_STRING,
            principal,
        );
        self.values(
            &format!("{at}.namespaces"),
            &source.namespaces,
            MAX_POLICY_STRING,
            namespace_pattern,
        );
        self.values(
            &format!("{at}.serviceAccounts"),
            &source.service_accounts,
            MAX_POLICY_STRING,
            service_account,
        );
    }

    fn operation(&mut self, at: &str, operation: &PolicyOperation) {
        let ports = format!("{at}.ports");
        self.count(&ports, operation.ports.len());
        for (j, port) in operation.ports.iter().enumerate().take(MAX_POLICY_ENTRIES) {
            if *port == 0 {
                self.push(
                    format!("{ports}[{j}]"),
                    "must be between 1 and 65535, got 0",
                );
            }
        }
        self.values(
            &format!("{at}.methods"),
            &operation.methods,
            MAX_POLICY_STRING,
            method,
        );
        self.values(
            &format!("{at}.paths"),
            &operation.paths,
            MAX_POLICY_LONG_STRING,
            path,
        );
    }

    /// Checks a list of strings: its length, each value's length, then `check`.
    fn values(
        &mut self,
        field: &str,
        values: &[String],
        max_len: usize,
        check: fn(&str) -> Result<(), String>,
    ) {
        self.count(field, values.len());
        for (j, value) in values.iter().enumerate().take(MAX_POLICY_ENTRIES) {
            let chars = value.chars().count();
            let result = if chars > max_len {
                Err(format!(
                    "{} is {chars} characters long; at most {max_len} are accepted",
                    shown(value)
                ))
            } else {
                check(value)
            };
            if let Err(message) = result {
                self.push(format!("{field}[{j}]"), message);
            }
        }
    }
}

/// `value` quoted, cut to [`SHOWN_CHARS`] characters.
pub(crate) fn shown(value: &str) -> String {
    if value.chars().count() <= SHOWN_CHARS {
        return format!("{value:?}");
    }
    let cut: String = value.chars().take(SHOWN_CHARS).collect();
    format!("{cut:?}...")
}

fn pattern(value: &str) -> Result<Pattern, String> {
    Pattern::parse(value, String::new).map_err(|_| {
        format!(
            "{} is not a pattern: exact, \"*\", \"prefix*\" or \"*suffix\"",
            shown(value)
        )
    })
}

/// Whether `td` is a trust domain a Trellis identity can have.
fn trust_domain(td: &str) -> bool {
    SpiffeId::new(td, "default", "default").is_ok()
}

/// A SPIFFE ID pattern, or Istio's form without the scheme.
fn principal(value: &str) -> Result<(), String> {
    let ok = match pattern(value)? {
        Pattern::Any | Pattern::Suffix(_) => true,
        Pattern::Exact(s) => match s.strip_prefix(SPIFFE_SCHEME) {
            Some(rest) => rest
                .split_once('/')
                .is_some_and(|(td, path)| trust_domain(td) && !path.is_empty()),
            None => SpiffeId::parse(&format!("{SPIFFE_SCHEME}{s}")).is_ok(),
        },
        Pattern::Prefix(s) => match s.strip_prefix(SPIFFE_SCHEME) {
            Some(_) => true,
            // Istio's form: the trust domain must be whole, else `spif*` or `cluster*`
            // could be read either way.
            None => s.split_once('/').is_some_and(|(td, _)| trust_domain(td)),
        },
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is neither spiffe://<trust-domain>/<path> nor \
             <trust-domain>/ns/<namespace>/sa/<service-account> (patterns: exact, \"*\", \
             \"prefix*\" or \"*suffix\")",
            shown(value)
        ))
    }
}

/// A namespace name, or a pattern over the characters of one.
fn namespace_pattern(value: &str) -> Result<(), String> {
    let name_chars = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    let ok = match pattern(value)? {
        Pattern::Any => true,
        Pattern::Exact(s) => dns_label(&s).is_ok(),
        Pattern::Prefix(s) | Pattern::Suffix(s) => name_chars(&s),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a namespace name (a DNS-1123 label) or a pattern of one (\"*\", \
             \"prefix*\" or \"*suffix\")",
            shown(value)
        ))
    }
}

/// `name` or `namespace/name`, exact.
fn service_account(value: &str) -> Result<(), String> {
    if value.contains('*') {
        return Err(format!(
            "{}: serviceAccounts are exact names; use principals for patterns",
            shown(value)
        ));
    }
    let (namespace, name) = match value.split('/').collect::<Vec<_>>().as_slice() {
        [name] => (None, *name),
        [namespace, name] => (Some(*namespace), *name),
        _ => {
            return Err(format!(
                "{} is not <name> or <namespace>/<name>",
                shown(value)
            ));
        }
    };
    if namespace.is_some_and(str::is_empty) || name.is_empty() {
        return Err(format!(
            "{} is not <name> or <namespace>/<name>",
            shown(value)
        ));
    }
    if let Some(namespace) = namespace
        && let Err(why) = dns_label(namespace)
    {
        return Err(format!(
            "{}: invalid namespace {namespace:?}: {why}",
            shown(value)
        ));
    }
    dns_label(name).map_err(|why| format!("{}: invalid name {name:?}: {why}", shown(value)))
}

/// `*` or an upper-case HTTP token (RFC 9110 `tchar`s without lower-case letters).
fn method(value: &str) -> Result<(), String> {
    let tchar =
        |c: char| c.is_ascii_uppercase() || c.is_ascii_digit() || "!#$%&'+-.^_`|~".contains(c);
    if value == "*" || (!value.is_empty() && value.chars().all(tchar)) {
        Ok(())
    } else {
        Err(format!(
            "{} is not an HTTP method: \"*\" or an upper-case name such as GET",
            shown(value)
        ))
    }
}

/// `*`, `*suffix`, or exact or `prefix*` starting with `/`; never a query.
fn path(value: &str) -> Result<(), String> {
    let ok = match pattern(value)? {
        Pattern::Any | Pattern::Suffix(_) => true,
        Pattern::Exact(s) | Pattern::Prefix(s) => s.starts_with('/'),
    };
    if !ok {
        return Err(format!(
            "{} is not a path pattern: \"*\", \"*suffix\", or starting with \"/\"",
            shown(value)
        ));
    }
    if value.contains(['?', '#']) {
        return Err(format!(
            "{} holds a query or fragment: paths are matched without them",
            shown(value)
        ));
    }
    Ok(())
}

/// Every policy of `objects`, as proxies enforce them, sorted by namespace and name; one
/// with problems fail-closed (see the module docs).
pub(crate) fn translate_policies(
    objects: &Objects,
    trust_domain: &str,
) -> Vec<authz::AuthorizationPolicy> {
    // The map is keyed by (namespace, name): its order is the order proxies expect.
    objects
        .policies
        .values()
        .map(|p| translate_policy(p, &problems(p), trust_domain))
        .collect()
}

/// `p` translated; fail-closed when `problems` is not empty.
fn translate_policy(
    p: &Policy,
    problems: &[FieldError],
    trust_domain: &str,
) -> authz::AuthorizationPolicy {
    let action = match p.spec.action {
        PolicyAction::Allow => Action::Allow,
        PolicyAction::Deny => Action::Deny,
    };
    let target_services = if targets_invalid(problems) {
        Vec::new()
    } else {
        let names: BTreeSet<&String> = p.spec.target_refs.iter().map(|t| &t.name).collect();
        names.into_iter().cloned().collect()
    };
    let rules = problems
        .is_empty()
        .then(|| rules(p, trust_domain))
        .flatten()
        .unwrap_or_else(|| fail_closed_rules(action));
    authz::AuthorizationPolicy {
        namespace: p.metadata.namespace.clone(),
        name: p.metadata.name.clone(),
        target_services,
        action,
        dry_run: p.spec.dry_run,
        rules,
    }
}

/// Whether the targetRefs cannot be trusted, so the policy must cover its namespace.
fn targets_invalid(problems: &[FieldError]) -> bool {
    problems
        .iter()
        .any(|e| e.field.starts_with("spec.targetRefs"))
}

/// What an invalid policy enforces: nothing allowed (ALLOW), everything refused (DENY).
fn fail_closed_rules(action: Action) -> Vec<Rule> {
    match action {
        Action::Allow => Vec::new(),
        Action::Deny => vec![Rule::default()],
    }
}

/// The rules of a valid policy; `None` if a value does not translate after all (then the
/// caller fails closed rather than drop the value).
fn rules(p: &Policy, trust_domain: &str) -> Option<Vec<Rule>> {
    let patterns = |values: &[String]| -> Option<Vec<Pattern>> {
        values.iter().map(|v| pattern(v).ok()).collect()
    };
    p.spec
        .rules
        .iter()
        .map(|rule| {
            let from = rule
                .from
                .iter()
                .map(|s| {
                    let mut principals: Vec<Pattern> = s
                        .principals
                        .iter()
                        .map(|v| pattern(v).ok().map(spiffe_principal))
                        .collect::<Option<_>>()?;
                    principals.extend(s.service_accounts.iter().map(|sa| {
                        let (namespace, name) = sa
                            .split_once('/')
                            .unwrap_or((p.metadata.namespace.as_str(), sa));
                        Pattern::Exact(format!(
                            "{SPIFFE_SCHEME}{trust_domain}/ns/{namespace}/sa/{name}"
                        ))
                    }));
                    Some(Source {
                        principals,
                        namespaces: patterns(&s.namespaces)?,
                    })
                })
                .collect::<Option<_>>()?;
            let to = rule
                .to
                .iter()
                .map(|o| {
                    Some(Operation {
                        ports: o.ports.clone(),
                        methods: patterns(&o.methods)?,
                        paths: patterns(&o.paths)?,
                    })
                })
                .collect::<Option<_>>()?;
            Some(Rule { from, to })
        })
        .collect()
}

/// A principal pattern against SPIFFE IDs: Istio's form gets the scheme; a suffix matches
/// the end of either form alike.
fn spiffe_principal(pattern: Pattern) -> Pattern {
    let scheme = |s: String| {
        if s.starts_with(SPIFFE_SCHEME) {
            s
        } else {
            format!("{SPIFFE_SCHEME}{s}")
        }
    };
    match pattern {
        Pattern::Exact(s) => Pattern::Exact(scheme(s)),
        Pattern::Prefix(s) => Pattern::Prefix(scheme(s)),
        other @ (Pattern::Any | Pattern::Suffix(_)) => other,
    }
}

/// Reports the policies with problems that reach translation (from Kubernetes): a warning
/// for each, once per distinct set of problems, naming what it enforces instead; an
/// info line when one is fixed or deleted; and their number in
/// `trellis_controller_invalid_policies`.
#[derive(Debug, Default)]
pub struct InvalidPolicies {
    ledger: Ledger,
}

impl InvalidPolicies {
    /// A reporter that logs only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also keeps the count in `metrics` ([`InvalidCount::policies`]).
    #[must_use]
    pub fn with_metrics(self, metrics: InvalidCount) -> Self {
        Self {
            ledger: self.ledger.with_metrics(metrics),
        }
    }

    /// Checks every policy of `objects` (call it with the objects given to
    /// [`translate`](crate::translate)) and returns how many have problems.
    pub fn report(&mut self, objects: &Objects) -> usize {
        self.ledger.update(
            &objects.policies,
            problems,
            |key, p, found, lines| {
                tracing::warn!(
                    policy = %key,
                    enforced = %fail_closed_effect(p, found),
                    problems = %lines,
                    "invalid AuthorizationPolicy: enforced fail-closed until it is fixed"
                );
            },
            |key| tracing::info!(policy = %key, "AuthorizationPolicy no longer invalid (fixed or deleted)"),
        )
    }
}

/// In words, what an invalid policy enforces instead of its rules.
fn fail_closed_effect(p: &Policy, problems: &[FieldError]) -> String {
    let on = if targets_invalid(problems) || p.spec.target_refs.is_empty() {
        if p.metadata.namespace == ROOT_NAMESPACE {
            "every workload of the mesh".to_owned()
        } else {
            format!("every workload of namespace {}", p.metadata.namespace)
        }
    } else {
        let names: BTreeSet<&str> = p.spec.target_refs.iter().map(|t| t.name.as_str()).collect();
        let names: Vec<&str> = names.into_iter().collect();
        format!("Services {}", names.join(", "))
    };
    let what = match p.spec.action {
        PolicyAction::Allow => "allows nothing on",
        PolicyAction::Deny => "refuses every request to",
    };
    let dry_run = if p.spec.dry_run {
        " (dry run: reported, not enforced)"
    } else {
        ""
    };
    format!("{what} {on}{dry_run}")
}

#[cfg(test)]
mod tests;
