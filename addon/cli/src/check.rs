//! `trellis check`: is the mesh healthy, or can it be installed? Prints one line per check
//! under grouped headings, like `linkerd check`: `✔` passed, `‼` a warning, `✖` failed
//! with a `hint:` line under it saying what to do, then a summary; exits 1 when any check
//! failed (warnings exit 0).
//!
//! Three ways to run it:
//! - `trellis check` (the local profile): reads the control plane's loopback admin
//!   endpoints (`--admin`): it answers (`control-plane`); the CA's source, generation, the
//!   expiry of the signing chain and of every root, a change in progress (`trust`); every
//!   connected proxy synced to the latest configuration (`/debug/proxies`; a proxy that
//!   refused its config fails) and every service applied by every proxy that receives it
//!   (`/debug/acks`) (`data-plane`).
//! - `trellis check --kubernetes`: an installed mesh, through the Kubernetes API
//!   (kubeconfig, `--context`, or the pod's ServiceAccount): see [`cluster`].
//! - `trellis check --pre`: before installing: the cluster's version, the permissions the
//!   chart needs, other meshes that would conflict ([`cluster`]).
//!
//! The decisions are pure functions over what was read (table-tested); reading is separate.

mod cluster;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use crate::http::HttpClient;

/// `trellis check` flags.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("kube_mode").args(["kubernetes", "pre"]).multiple(true)))]
pub(crate) struct Args {
    /// The control plane's admin address (local profile).
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Warn when the signing chain or a root expires within this; fail when within a
    /// tenth of it (or already expired).
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    warn_within: Duration,
    /// Check the mesh installed in a cluster through the Kubernetes API (kubeconfig or the
    /// pod's ServiceAccount) instead of a local control plane's admin port.
    #[arg(long)]
    kubernetes: bool,
    /// Only the pre-install checks (cluster version, permissions, other meshes); implies
    /// --kubernetes.
    #[arg(long)]
    pre: bool,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, requires = "kube_mode")]
    context: Option<String>,
    /// The namespace Trellis is (or will be) installed in.
    #[arg(long, default_value = cluster::NAMESPACE, requires = "kube_mode")]
    namespace: String,
    /// The namespace of the dry-run pod that tests injection; it must be labelled
    /// `trellis.dev/inject=enabled`, as the injector's namespaceSelector requires (default:
    /// the first namespace so labelled).
    #[arg(long, requires = "kube_mode")]
    injection_namespace: Option<String>,
}

/// One check's verdict; ordered from fine to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Verdict {
    /// `✔`: passed.
    Ok,
    /// `‼`: worth a look; does not fail the run.
    Warn,
    /// `✖`: failed; the run exits 1.
    Fail,
}

impl Verdict {
    /// The mark printed before the check's line.
    pub(crate) fn mark(self) -> char {
        match self {
            Verdict::Ok => '✔',
            Verdict::Warn => '‼',
            Verdict::Fail => '✖',
        }
    }
}

/// One check's result: the heading it is printed under, its verdict, its line and, for a
/// warning or failure, what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    /// The group heading, e.g. `control-plane`.
    pub(crate) group: &'static str,
    /// Passed, warning or failed.
    pub(crate) verdict: Verdict,
    /// What was found, one line.
    pub(crate) line: String,
    /// What to do, printed under a warning or failure.
    pub(crate) hint: Option<String>,
}

impl Check {
    /// A check that passed.
    pub(crate) fn ok(group: &'static str, line: impl Into<String>) -> Self {
        Self {
            group,
            verdict: Verdict::Ok,
            line: line.into(),
            hint: None,
        }
    }

    /// A check with `verdict` and `hint` (the hint is only printed when it is not `Ok`).
    pub(crate) fn new(
        group: &'static str,
        verdict: Verdict,
        line: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self {
            group,
            verdict,
            line: line.into(),
            hint: Some(hint.into()),
        }
    }
}

/// The checks as printed: each group's heading (underlined) before its first check, one
/// line per check, the hint under a warning or failure, then the summary
/// ([`summary`]).
pub(crate) fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    let mut group = None;
    for check in checks {
        if group != Some(check.group) {
            if group.is_some() {
                out.push('\n');
            }
            let _ = writeln!(out, "{}", check.group);
            let _ = writeln!(out, "{}", "-".repeat(check.group.chars().count()));
            group = Some(check.group);
        }
        let _ = writeln!(out, "{} {}", check.verdict.mark(), check.line);
        if let (Some(hint), Verdict::Warn | Verdict::Fail) = (&check.hint, check.verdict) {
            let _ = writeln!(out, "    hint: {hint}");
        }
    }
    if !checks.is_empty() {
        out.push('\n');
    }
    let _ = writeln!(out, "{}", summary(checks));
    out
}

/// `Status check results are ✔` (with the number of warnings, if any), or
/// `✖ <n> checks failed` (and the warnings).
pub(crate) fn summary(checks: &[Check]) -> String {
    let count = |v: Verdict| checks.iter().filter(|c| c.verdict == v).count();
    let (failed, warnings) = (count(Verdict::Fail), count(Verdict::Warn));
    let warnings = match warnings {
        0 => String::new(),
        1 => "1 warning".to_owned(),
        n => format!("{n} warnings"),
    };
    match failed {
        0 if warnings.is_empty() => "Status check results are ✔".to_owned(),
        0 => format!("Status check results are ✔ ({warnings})"),
        n => {
            let checks = if n == 1 { "check" } else { "checks" };
            let and = if warnings.is_empty() {
                String::new()
            } else {
                format!(", {warnings}")
            };
            format!("✖ {n} {checks} failed{and}")
        }
    }
}

/// Exit 1 when any check failed; warnings exit 0.
pub(crate) fn exit_code(checks: &[Check]) -> ExitCode {
    if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// How close `not_after` (unix seconds) is at `now`: `✖` when expired or within a tenth
/// of `warn_within`, `‼` within it; the text is `<n> days left` or `EXPIRED`.
pub(crate) fn expiry(not_after: u64, now: u64, warn_within: Duration) -> (Verdict, String) {
    let left = not_after.saturating_sub(now);
    let verdict = if left < warn_within.as_secs() / 10 {
        Verdict::Fail
    } else if left < warn_within.as_secs() {
        Verdict::Warn
    } else {
        Verdict::Ok
    };
    let text = if not_after <= now {
        "EXPIRED".to_owned()
    } else {
        format!("{} days left", left / 86_400)
    };
    (verdict, text)
}

/// Runs the checks `args` ask for, prints them and says how to exit.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let checks = if args.kubernetes || args.pre {
        let options = cluster::Options {
            namespace: args.namespace,
            injection_namespace: args.injection_namespace,
            warn_within: args.warn_within,
            now: SystemTime::now(),
        };
        cluster::run(args.context.as_deref(), args.pre, &options).await
    } else {
        local(args.admin, args.warn_within).await
    };
    print!("{}", render(&checks));
    Ok(exit_code(&checks))
}

/// `--warn-within`'s default: 30 days.
pub(crate) const DEFAULT_WARN_WITHIN: Duration = Duration::from_secs(30 * 24 * 3600);

const CONTROL_PLANE: &str = "control-plane";
const TRUST: &str = "trust";
const DATA_PLANE: &str = "data-plane";

/// The local profile's checks, from the control plane's admin endpoints at `admin`.
pub(crate) async fn local(admin: SocketAddr, warn_within: Duration) -> Vec<Check> {
    let http = HttpClient::new();
    let mut checks = Vec::new();
    let unreachable_hint = "is the control plane running? (`trellis demo` starts one; for a \
        cluster use `trellis check --kubernetes`)";
    let ca = match http.get(admin, "localhost", "/debug/ca").await {
        Ok(r) if r.status.is_success() => serde_json::from_str::<serde_json::Value>(&r.body),
        Ok(r) => {
            checks.push(Check::new(
                CONTROL_PLANE,
                Verdict::Fail,
                format!("control plane {admin}: /debug/ca answered {}", r.status),
                "is --admin the control plane's admin address?",
            ));
            return checks;
        }
        Err(e) => {
            checks.push(Check::new(
                CONTROL_PLANE,
                Verdict::Fail,
                format!("control plane {admin} unreachable: {e:#}"),
                unreachable_hint,
            ));
            return checks;
        }
    };
    let ca = match ca {
        Ok(ca) => ca,
        Err(e) => {
            checks.push(Check::new(
                CONTROL_PLANE,
                Verdict::Fail,
                format!("control plane {admin}: /debug/ca is not JSON: {e}"),
                "is --admin the control plane's admin address?",
            ));
            return checks;
        }
    };
    checks.push(Check::ok(
        CONTROL_PLANE,
        format!("control plane {admin} answers"),
    ));

    let now = unix(SystemTime::now());
    let rotate = "rotate the CA before it expires (a new root or CA source in trellis-config; \
                  `trellis ca show` lists the chain)";
    let (v, left) = expiry(
        ca["signing_not_after_unix"].as_u64().unwrap_or(0),
        now,
        warn_within,
    );
    checks.push(Check::new(
        TRUST,
        v,
        format!(
            "CA: {}, generation {}, trust domain {}; signing chain {left}",
            ca["source"].as_str().unwrap_or("?"),
            ca["generation"],
            ca["trust_domain"].as_str().unwrap_or("?"),
        ),
        rotate,
    ));
    if let Some(p) = ca["pending"].as_str() {
        checks.push(Check::new(
            TRUST,
            Verdict::Warn,
            format!("CA change in progress: {p} is staged, its roots are being pushed"),
            "wait for the switch to finish (the propagation delay of trellis-config's ca)",
        ));
    }
    for root in ca["roots"].as_array().into_iter().flatten() {
        let (v, left) = expiry(
            root["not_after_unix"].as_u64().unwrap_or(0),
            now,
            warn_within,
        );
        let retiring = root["retiring_at_unix"]
            .as_u64()
            .map(|t| format!("; retiring in {}s (an earlier CA)", t.saturating_sub(now)))
            .unwrap_or_default();
        checks.push(Check::new(
            TRUST,
            v,
            format!(
                "trust root {} {}: {left}{retiring}",
                root["fingerprint"].as_str().unwrap_or("?"),
                root["subject"].as_str().unwrap_or("?"),
            ),
            rotate,
        ));
    }

    let endpoint_failed = |path: &str, what: String| {
        Check::new(
            DATA_PLANE,
            Verdict::Fail,
            format!("{path} {what}"),
            "is the control plane healthy? Its log says more",
        )
    };
    match http.get(admin, "localhost", "/debug/proxies").await {
        Ok(r) if r.status.is_success() => match serde_json::from_str::<Vec<ProxyStatus>>(&r.body) {
            Ok(proxies) => {
                checks.extend(proxy_lines(&proxies).into_iter().map(|(verdict, line)| {
                    let hint = match verdict {
                        Verdict::Fail => {
                            "fix what the proxy refused (its reason is above); \
                                              the proxy keeps its last good config"
                        }
                        _ => {
                            "proxies behind are applying a newer config; if it lasts, \
                                  read their logs"
                        }
                    };
                    Check::new(DATA_PLANE, verdict, line, hint)
                }))
            }
            Err(e) => checks.push(endpoint_failed(
                "/debug/proxies",
                format!("is not what was expected: {e}"),
            )),
        },
        Ok(r) => checks.push(endpoint_failed(
            "/debug/proxies",
            format!("answered {}", r.status),
        )),
        Err(e) => checks.push(endpoint_failed("/debug/proxies:", format!("{e:#}"))),
    }

    match http.get(admin, "localhost", "/debug/acks").await {
        Ok(r) if r.status.is_success() => match serde_json::from_str::<Vec<ServiceAcks>>(&r.body) {
            Ok(acks) => {
                let (verdict, line) = config_line(&acks);
                checks.push(Check::new(
                    DATA_PLANE,
                    verdict,
                    line,
                    "the pending proxies are applying the change; if it lasts, read their logs",
                ));
            }
            Err(e) => checks.push(endpoint_failed(
                "/debug/acks",
                format!("is not what was expected: {e}"),
            )),
        },
        // A control plane from before acks were tracked per service.
        Ok(r) if r.status == http::StatusCode::NOT_FOUND => checks.push(Check::new(
            DATA_PLANE,
            Verdict::Warn,
            "config: this control plane has no /debug/acks (older version); per-service \
             application unknown",
            "upgrade the control plane",
        )),
        Ok(r) => checks.push(endpoint_failed(
            "/debug/acks",
            format!("answered {}", r.status),
        )),
        Err(e) => checks.push(endpoint_failed("/debug/acks:", format!("{e:#}"))),
    }
    checks
}

/// One connected proxy, as `/debug/proxies` shows it (the fields read here).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct ProxyStatus {
    pub(crate) identity: String,
    pub(crate) workload: String,
    pub(crate) sent_version: u64,
    /// Missing from control planes older than per-service acks.
    #[serde(default)]
    pub(crate) view_version: u64,
    pub(crate) acked_version: Option<u64>,
    /// The last version the proxy refused, and why.
    pub(crate) last_nack: Option<(u64, String)>,
    /// Missing from older control planes: then acked == sent stands in for it.
    #[serde(default)]
    pub(crate) synced: Option<bool>,
}

/// One service, as `/debug/acks` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub(crate) struct ServiceAcks {
    /// `<namespace>/<name>`.
    pub(crate) service: String,
    /// The mesh version at which the service last changed.
    pub(crate) version: u64,
    /// Connected proxies that receive the service.
    pub(crate) proxies: usize,
    /// Of those, the ones that acked `version` or later.
    pub(crate) applied: usize,
    /// Some of the others, as `workload (identity)`.
    #[serde(default)]
    pub(crate) pending: Vec<String>,
}

/// Items named in one line before the rest are only counted.
const LISTED: usize = 3;

impl ProxyStatus {
    fn synced(&self) -> bool {
        self.synced
            .unwrap_or_else(|| self.acked_version == Some(self.sent_version))
    }

    /// The refusal of the last version sent, if the proxy refused it: a refusal followed
    /// by a newer push is being retried and only makes the proxy behind.
    fn current_nack(&self) -> Option<(u64, &str)> {
        self.last_nack
            .as_ref()
            .filter(|(version, _)| *version >= self.sent_version)
            .map(|(version, error)| (*version, error.as_str()))
    }

    fn name(&self) -> String {
        format!("{} ({})", self.workload, self.identity)
    }
}

/// `/debug/proxies` as check lines: one `ok` when every proxy is synced; otherwise a
/// `warn` naming the proxies behind and a `FAIL` per proxy that refused its config.
fn proxy_lines(proxies: &[ProxyStatus]) -> Vec<(Verdict, String)> {
    if proxies.iter().all(ProxyStatus::synced) {
        return vec![(
            Verdict::Ok,
            format!(
                "{} proxies connected, all on the latest configuration",
                proxies.len()
            ),
        )];
    }
    let mut lines = Vec::new();
    let behind: Vec<String> = proxies
        .iter()
        .filter(|p| !p.synced() && p.current_nack().is_none())
        .map(|p| match p.acked_version {
            None => format!("{} acked nothing of v{}", p.name(), p.sent_version),
            Some(acked) if acked < p.sent_version => {
                format!("{} acked v{acked} of v{}", p.name(), p.sent_version)
            }
            Some(acked) => format!(
                "{} acked v{acked} (view v{}), newer config on its way",
                p.name(),
                p.view_version
            ),
        })
        .collect();
    if !behind.is_empty() {
        lines.push((
            Verdict::Warn,
            format!(
                "proxies behind the latest configuration: {}",
                listed(&behind, "proxies")
            ),
        ));
    }
    for p in proxies {
        if let Some((version, error)) = p.current_nack() {
            lines.push((
                Verdict::Fail,
                format!("config: {} refused v{version}: {error}", p.name()),
            ));
        }
    }
    lines
}

/// `/debug/acks` as one check line: `ok` when every service is applied by every proxy
/// that receives it, else a `warn` naming the first few services that are not.
fn config_line(acks: &[ServiceAcks]) -> (Verdict, String) {
    let behind: Vec<String> = acks
        .iter()
        .filter(|s| s.applied < s.proxies)
        .map(|s| {
            // `pending` names at most ten; the counts cover the rest.
            let shown: Vec<&str> = s.pending.iter().take(LISTED).map(String::as_str).collect();
            let more = (s.proxies - s.applied).saturating_sub(shown.len());
            let mut pending = shown.join(", ");
            if more > 0 {
                pending = format!("{pending}, {more} more");
            }
            format!(
                "{} v{} applied by {} of {} proxies (pending: {pending})",
                s.service, s.version, s.applied, s.proxies
            )
        })
        .collect();
    if behind.is_empty() {
        let n = acks.len();
        let services = if n == 1 { "service" } else { "services" };
        return (
            Verdict::Ok,
            format!("config: {n} {services} applied by every proxy that receives them"),
        );
    }
    (
        Verdict::Warn,
        format!("config: {}", listed(&behind, "services")),
    )
}

/// The demo's one-line summary of how far the latest configuration got, from
/// `/debug/proxies` and `/debug/acks`:
/// `config v<V> applied by <S> of <P> proxies (every service: /debug/acks)`, or
/// `(<K> of <N> services pending: /debug/acks)` when some service is not applied by every
/// proxy that receives it. `V` is the newest version a proxy was given or a service
/// changed at, `S` the proxies synced to it.
pub(crate) fn application_line(proxies: &[ProxyStatus], acks: &[ServiceAcks]) -> String {
    let version = proxies
        .iter()
        .map(|p| p.view_version.max(p.sent_version))
        .chain(acks.iter().map(|s| s.version))
        .max()
        .unwrap_or(0);
    let synced = proxies.iter().filter(|p| p.synced()).count();
    let pending = acks.iter().filter(|s| s.applied < s.proxies).count();
    let services = if pending == 0 {
        "every service".to_owned()
    } else {
        format!("{pending} of {} services pending", acks.len())
    };
    format!(
        "config v{version} applied by {synced} of {} proxies ({services}: /debug/acks)",
        proxies.len()
    )
}

/// True when every proxy is synced and every service applied wherever it is sent.
pub(crate) fn fully_applied(proxies: &[ProxyStatus], acks: &[ServiceAcks]) -> bool {
    proxies.iter().all(ProxyStatus::synced) && acks.iter().all(|s| s.applied >= s.proxies)
}

/// The first [`LISTED`] of `items` joined with `; `, and how many more `what` there are.
fn listed(items: &[String], what: &str) -> String {
    let out = items[..items.len().min(LISTED)].join("; ");
    match items.len().checked_sub(LISTED) {
        Some(more) if more > 0 => format!("{out}; and {more} more {what}"),
        _ => out,
    }
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_default_warn_within_is_the_flags() {
        assert_eq!(
            humantime::parse_duration("30d").unwrap(),
            DEFAULT_WARN_WITHIN
        );
    }

    use super::*;

    fn proxy(workload: &str, sent: u64, acked: Option<u64>, synced: bool) -> ProxyStatus {
        ProxyStatus {
            identity: format!("spiffe://cluster.local/ns/demo/sa/{workload}"),
            workload: workload.into(),
            sent_version: sent,
            view_version: sent,
            acked_version: acked,
            last_nack: None,
            synced: Some(synced),
        }
    }

    fn acks(service: &str, version: u64, proxies: usize, pending: &[&str]) -> ServiceAcks {
        ServiceAcks {
            service: service.into(),
            version,
            proxies,
            applied: proxies - pending.len(),
            pending: pending.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    #[test]
    fn synced_proxies_are_one_ok_line() {
        let all = [proxy("a", 5, Some(5), true), proxy("b", 5, Some(5), true)];
        assert_eq!(
            proxy_lines(&all),
            [(
                Verdict::Ok,
                "2 proxies connected, all on the latest configuration".to_owned()
            )]
        );
    }

    #[test]
    fn proxies_behind_warn_and_a_nack_fails_with_its_error() {
        let mut nacked = proxy("c", 6, Some(5), false);
        nacked.last_nack = Some((6, "port 0 is not a port".into()));
        // An old refusal followed by a newer push being retried: only behind.
        let mut retried = proxy("d", 7, Some(5), false);
        retried.last_nack = Some((6, "old".into()));
        let mut view_behind = proxy("e", 6, Some(6), false);
        view_behind.view_version = 6;
        let all = [
            proxy("a", 6, Some(6), true),
            proxy("b", 6, None, false),
            nacked,
            retried,
            view_behind,
        ];
        let lines = proxy_lines(&all);
        assert_eq!(
            lines,
            [
                (
                    Verdict::Warn,
                    "proxies behind the latest configuration: \
                     b (spiffe://cluster.local/ns/demo/sa/b) acked nothing of v6; \
                     d (spiffe://cluster.local/ns/demo/sa/d) acked v5 of v7; \
                     e (spiffe://cluster.local/ns/demo/sa/e) acked v6 (view v6), newer config on its way"
                        .to_owned()
                ),
                (
                    Verdict::Fail,
                    "config: c (spiffe://cluster.local/ns/demo/sa/c) refused v6: port 0 is not a port"
                        .to_owned()
                ),
            ]
        );
    }

    #[test]
    fn older_control_plane_without_synced_compares_acked_and_sent() -> anyhow::Result<()> {
        let old: Vec<ProxyStatus> = serde_json::from_str(
            r#"[{"identity": "spiffe://cluster.local/ns/demo/sa/web", "workload": "web-1",
                 "proxy_version": "0.1.0", "sent_version": 4, "acked_version": 4,
                 "last_nack": null}]"#,
        )?;
        assert_eq!(proxy_lines(&old)[0].0, Verdict::Ok);
        Ok(())
    }

    #[test]
    fn config_line_counts_services_and_names_the_pending_proxies() {
        let applied = [acks("demo/web", 14, 4, &[]), acks("demo/api", 3, 0, &[])];
        assert_eq!(
            config_line(&applied),
            (
                Verdict::Ok,
                "config: 2 services applied by every proxy that receives them".to_owned()
            )
        );
        assert_eq!(
            config_line(&applied[..1]).1,
            "config: 1 service applied by every proxy that receives them"
        );

        let pending = [
            acks(
                "demo/web",
                14,
                4,
                &["web-2 (spiffe://cluster.local/ns/demo/sa/web)"],
            ),
            acks("demo/api", 3, 2, &[]),
        ];
        assert_eq!(
            config_line(&pending),
            (
                Verdict::Warn,
                "config: demo/web v14 applied by 3 of 4 proxies \
                 (pending: web-2 (spiffe://cluster.local/ns/demo/sa/web))"
                    .to_owned()
            )
        );
    }

    #[test]
    fn config_line_lists_a_few_and_counts_the_rest() {
        // 15 proxies pending, 10 named by the control plane: three shown, twelve counted.
        let names: Vec<String> = (0..10).map(|i| format!("p-{i}")).collect();
        let mut web = acks("demo/web", 9, 20, &[]);
        web.applied = 5;
        web.pending = names;
        let mut all = vec![web];
        all.extend((0..4).map(|i| acks(&format!("demo/s{i}"), 8, 2, &["x", "y"])));
        let (verdict, line) = config_line(&all);
        assert_eq!(verdict, Verdict::Warn);
        assert_eq!(
            line,
            "config: demo/web v9 applied by 5 of 20 proxies (pending: p-0, p-1, p-2, 12 more); \
             demo/s0 v8 applied by 0 of 2 proxies (pending: x, y); \
             demo/s1 v8 applied by 0 of 2 proxies (pending: x, y); and 2 more services"
        );
    }

    #[test]
    fn application_line_is_computed_from_both_endpoints() {
        let mut proxies = vec![proxy("a", 7, Some(7), true), proxy("b", 7, Some(7), true)];
        proxies[1].view_version = 9;
        let applied = [acks("demo/web", 9, 2, &[]), acks("demo/api", 2, 2, &[])];
        assert_eq!(
            application_line(&proxies, &applied),
            "config v9 applied by 2 of 2 proxies (every service: /debug/acks)"
        );
        assert!(fully_applied(&proxies, &applied));

        proxies.push(proxy("c", 9, Some(7), false));
        let pending = [acks("demo/web", 9, 3, &["c"]), acks("demo/api", 2, 3, &[])];
        assert_eq!(
            application_line(&proxies, &pending),
            "config v9 applied by 2 of 3 proxies (1 of 2 services pending: /debug/acks)"
        );
        assert!(!fully_applied(&proxies, &pending));
        assert_eq!(
            application_line(&[], &[]),
            "config v0 applied by 0 of 0 proxies (every service: /debug/acks)"
        );
    }

    fn check(group: &'static str, verdict: Verdict, line: &str, hint: Option<&str>) -> Check {
        Check {
            group,
            verdict,
            line: line.to_owned(),
            hint: hint.map(str::to_owned),
        }
    }

    #[test]
    fn render_groups_lines_prints_hints_under_problems_and_sums_up() {
        let checks = [
            check("control-plane", Verdict::Ok, "answers", Some("not shown")),
            check("trust", Verdict::Warn, "root: 20 days left", Some("rotate")),
            check(
                "trust",
                Verdict::Fail,
                "signing: EXPIRED",
                Some("rotate now"),
            ),
            check("data-plane", Verdict::Fail, "proxy refused v3", None),
        ];
        assert_eq!(
            render(&checks),
            "control-plane\n\
             -------------\n\
             ✔ answers\n\
             \n\
             trust\n\
             -----\n\
             ‼ root: 20 days left\n    hint: rotate\n\
             ✖ signing: EXPIRED\n    hint: rotate now\n\
             \n\
             data-plane\n\
             ----------\n\
             ✖ proxy refused v3\n\
             \n\
             ✖ 2 checks failed, 1 warning\n"
        );
        assert_eq!(exit_code(&checks), ExitCode::FAILURE);
        assert_eq!(exit_code(&checks[..2]), ExitCode::SUCCESS);
    }

    #[test]
    fn summaries() {
        let ok = check("g", Verdict::Ok, "a", None);
        let warn = check("g", Verdict::Warn, "b", None);
        let fail = check("g", Verdict::Fail, "c", None);
        let cases: [(&[Check], &str); 6] = [
            (&[], "Status check results are ✔"),
            (std::slice::from_ref(&ok), "Status check results are ✔"),
            (
                &[ok.clone(), warn.clone()],
                "Status check results are ✔ (1 warning)",
            ),
            (
                &[warn.clone(), warn.clone()],
                "Status check results are ✔ (2 warnings)",
            ),
            (&[fail.clone(), ok.clone()], "✖ 1 check failed"),
            (&[fail.clone(), fail, warn], "✖ 2 checks failed, 1 warning"),
        ];
        for (checks, line) in cases {
            assert_eq!(summary(checks), line);
        }
    }

    #[test]
    fn expiry_warns_within_the_window_and_fails_within_a_tenth() {
        let window = Duration::from_secs(30 * 86_400);
        let now = 1_000_000_000;
        let day = 86_400;
        let cases = [
            (now + 31 * day, Verdict::Ok, "31 days left"),
            (now + 30 * day, Verdict::Ok, "30 days left"),
            (now + 30 * day - 1, Verdict::Warn, "29 days left"),
            (now + 3 * day, Verdict::Warn, "3 days left"),
            (now + 3 * day - 1, Verdict::Fail, "2 days left"),
            (now + 1, Verdict::Fail, "0 days left"),
            (now, Verdict::Fail, "EXPIRED"),
            (0, Verdict::Fail, "EXPIRED"),
        ];
        for (not_after, verdict, text) in cases {
            assert_eq!(
                expiry(not_after, now, window),
                (verdict, text.to_owned()),
                "{not_after}"
            );
        }
    }
}
