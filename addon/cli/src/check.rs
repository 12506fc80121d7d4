//! `trellis check`: is the running mesh healthy? Reads the control plane's admin
//! endpoints (loopback) and prints one line per check, `ok`, `warn` or `FAIL`; exits 1 when
//! any check fails. Today: the control plane answers, the CA (source, generation, expiry of
//! the signing chain and of every root, a change in progress), and whether every connected
//! proxy applied the latest configuration. Pre-install checks come with the Kubernetes
//! profile.

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
            let proxies: serde_json::Value = serde_json::from_str(&r.body)?;
            let all = proxies.as_array().cloned().unwrap_or_default();
            let behind: Vec<String> = all
                .iter()
                .filter(|p| p["acked_version"].as_u64() != p["sent_version"].as_u64())
                .map(|p| {
                    format!(
                        "{} ({}) acked {} of {}",
                        p["workload"].as_str().unwrap_or("?"),
                        p["identity"].as_str().unwrap_or("?"),
                        p["acked_version"],
                        p["sent_version"]
                    )
                })
                .collect();
            if behind.is_empty() {
                say(
                    Verdict::Ok,
                    format!(
                        "{} proxies connected, all on the latest configuration",
                        all.len()
                    ),
                );
            } else {
                say(
                    Verdict::Warn,
                    format!(
                        "proxies behind the latest configuration: {}",
                        behind.join("; ")
                    ),
                );
            }
        }
        Ok(r) => say(
            Verdict::Fail,
            format!("/debug/proxies answered {}", r.status),
        ),
        Err(e) => say(Verdict::Fail, format!("/debug/proxies: {e:#}")),
    }
    Ok(if worst == Verdict::Fail {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}
