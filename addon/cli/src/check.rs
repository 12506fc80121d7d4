//! `trellis check`: is the running mesh healthy? Reads the control plane's admin
//! endpoints (loopback) and prints one line per check, `ok`, `warn` or `FAIL`; exits 1 when
//! any check fails. Today: the control plane answers, the CA (source, generation, expiry of
//! the signing chain and of every root, a change in progress), whether every connected
//! proxy is synced to the latest configuration (`/debug/proxies`; a proxy that refused its
//! config fails), and whether every service is applied by every proxy that receives it
//! (`/debug/acks`). Pre-install checks come with the Kubernetes profile.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use crate::http::HttpClient;

/// `trellis check` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The control plane's admin address.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Warn when the signing chain or a root expires within this; fail when within a
    /// tenth of it (or already expired).
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    warn_within: Duration,
}

/// One check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// Runs the checks and prints them.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let http = HttpClient::new();
    let mut worst = Verdict::Ok;
    let mut say = |v: Verdict, line: String| {
        let tag = match v {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        println!("{tag} {line}");
        worst = worst.max(v);
    };
    let ca = match http.get(args.admin, "localhost", "/debug/ca").await {
        Ok(r) if r.status.is_success() => serde_json::from_str::<serde_json::Value>(&r.body)?,
        Ok(r) => {
            say(
                Verdict::Fail,
                format!(
                    "control plane {}: /debug/ca answered {}",
                    args.admin, r.status
                ),
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            say(
                Verdict::Fail,
                format!("control plane {} unreachable: {e:#}", args.admin),
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    say(Verdict::Ok, format!("control plane {} answers", args.admin));

    let now = unix(SystemTime::now());
    let expiry = |not_after: u64| -> (Verdict, String) {
        let left = not_after.saturating_sub(now);
        let verdict = if left < args.warn_within.as_secs() / 10 {
            Verdict::Fail
        } else if left < args.warn_within.as_secs() {
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
    };
    let (v, left) = expiry(ca["signing_not_after_unix"].as_u64().unwrap_or(0));
    say(
        v,
        format!(
            "CA: {}, generation {}, trust domain {}; signing chain {left}",
            ca["source"].as_str().unwrap_or("?"),
            ca["generation"],
            ca["trust_domain"].as_str().unwrap_or("?"),
        ),
    );
    if let Some(p) = ca["pending"].as_str() {
        say(
            Verdict::Warn,
            format!("CA change in progress: {p} is staged, its roots are being pushed"),
        );
    }
    for root in ca["roots"].as_array().into_iter().flatten() {
        let (v, left) = expiry(root["not_after_unix"].as_u64().unwrap_or(0));
        let retiring = root["retiring_at_unix"]
            .as_u64()
            .map(|t| format!("; retiring in {}s (an earlier CA)", t.saturating_sub(now)))
            .unwrap_or_default();
        say(
            v,
            format!(
                "trust root {} {}: {left}{retiring}",
                root["fingerprint"].as_str().unwrap_or("?"),
                root["subject"].as_str().unwrap_or("?"),
            ),
        );
    }

    match http.get(args.admin, "localhost", "/debug/proxies").await {
        Ok(r) if r.status.is_success() => {
            let proxies: Vec<ProxyStatus> = serde_json::from_str(&r.body)?;
            for (v, line) in proxy_lines(&proxies) {
                say(v, line);
            }
        }
        Ok(r) => say(
            Verdict::Fail,
            format!("/debug/proxies answered {}", r.status),
        ),
        Err(e) => say(Verdict::Fail, format!("/debug/proxies: {e:#}")),
    }

    match http.get(args.admin, "localhost", "/debug/acks").await {
        Ok(r) if r.status.is_success() => {
            let acks: Vec<ServiceAcks> = serde_json::from_str(&r.body)?;
            let (v, line) = config_line(&acks);
            say(v, line);
        }
        // A control plane from before acks were tracked per service.
        Ok(r) if r.status == http::StatusCode::NOT_FOUND => say(
            Verdict::Warn,
            "config: this control plane has no /debug/acks (older version); per-service application unknown".to_owned(),
        ),
        Ok(r) => say(Verdict::Fail, format!("/debug/acks answered {}", r.status)),
        Err(e) => say(Verdict::Fail, format!("/debug/acks: {e:#}")),
    }
    Ok(if worst == Verdict::Fail {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
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

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
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
}
