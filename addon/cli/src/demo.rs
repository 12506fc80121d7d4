//! `trellis demo`: the local profile end to end, explained as it happens.
//!
//! Starts `trellis-addon` (control plane: file source, CA, discovery), then for each
//! workload a demo app and a `trellis-proxy` with a token from the local issuer, waits
//! until every proxy is ready, and sends requests from `client-1` to the `web` service
//! through the proxies. Every process writes its log under the state directory.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::check::{self, ProxyStatus, ServiceAcks};
use crate::http::HttpClient;
use crate::stat;
use crate::tap;

const MESH_YAML: &str = include_str!("demo/mesh.yaml");
/// The authorization policies the demo applies to the running mesh.
const POLICY_YAML: &str = include_str!("demo/policy.yaml");
/// The canary HTTPRoute the demo applies to the running mesh.
const ROUTE_YAML: &str = include_str!("demo/route.yaml");
/// The demo app that answers slower, to show latency-aware (peak-EWMA) balancing.
const SLOW_WORKLOAD: &str = "web-2";
/// How much slower it answers.
const SLOW_DELAY: Duration = Duration::from_millis(25);

/// Flags of `trellis demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Stop after this long (e.g. `30s`); default: run until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Time between demo requests.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// First of the workload ports: each workload uses base+10*i+1..=+4.
    #[arg(long, default_value_t = 16000)]
    port_base: u16,
    /// Control-plane gRPC port (identity + discovery).
    #[arg(long, default_value_t = 15010)]
    grpc_port: u16,
    /// Control-plane admin port (/metrics, /debug/proxies).
    #[arg(long, default_value_t = 9090)]
    admin_port: u16,
    /// Where to keep config, CA material, tokens and logs (default: a new temp dir,
    /// removed at exit).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Directory holding `trellis-addon` and `trellis-proxy` (default: next to `trellis`).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// One demo workload and its ports.
struct Workload {
    name: &'static str,
    service_account: &'static str,
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
    app: SocketAddr,
}

/// Children are killed when this is dropped, whatever way the demo ends.
struct Processes {
    children: Vec<(String, Child)>,
}

/// Runs the demo.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .context("no parent dir of trellis")?,
    };
    let addon = find_bin(&bin_dir, "trellis-addon")?;
    let proxy = find_bin(&bin_dir, "trellis-proxy")?;
    let me = std::env::current_exe()?;

    let workloads = plan(args.port_base)?;
    let grpc = SocketAddr::from(([127, 0, 0, 1], args.grpc_port));
    let cp_admin = SocketAddr::from(([127, 0, 0, 1], args.admin_port));
    preflight(grpc, cp_admin, &workloads)?;

    let (state, temp) = match &args.state_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id())),
            true,
        ),
    };
    let result = run_in(
        &args, &state, &addon, &proxy, &me, grpc, cp_admin, &workloads,
    )
    .await;
    if temp {
        let _ = std::fs::remove_dir_all(&state);
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_in(
    args: &Args,
    state: &Path,
    addon: &Path,
    proxy: &Path,
    me: &Path,
    grpc: SocketAddr,
    cp_admin: SocketAddr,
    workloads: &[Workload],
) -> anyhow::Result<()> {
    let config = state.join("config");
    let logs = state.join("logs");
    let tokens = state.join("tokens");
    for d in [&config, &logs, &tokens] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(config.join("mesh.yaml"), render_mesh(args.port_base))?;
    // The trellis-config ConfigMap, outside the object directory: the demo edits its `ca`
    // key halfway to switch the running mesh to a plug-in CA.
    let mesh_config = state.join("trellis-config.yaml");
    std::fs::write(&mesh_config, render_mesh_config("source: self-signed"))?;
    let http = HttpClient::new();
    let mut procs = Processes {
        children: Vec::new(),
    };

    say("Trellis demo: a service mesh on this machine, no Kubernetes needed.");
    say(&format!(
        "state directory: {} (config, CA, tokens, logs)",
        state.display()
    ));

    // 1. Control plane.
    let mut cmd = Command::new(addon);
    cmd.args(["run", "--config-dir"])
        .arg(&config)
        .arg("--state-dir")
        .arg(state)
        .arg("--mesh-config")
        .arg(&mesh_config);
    cmd.args([
        "--grpc-addr",
        &grpc.to_string(),
        "--admin-addr",
        &cp_admin.to_string(),
    ]);
    procs.spawn("control-plane", cmd, &logs)?;
    procs
        .wait_ready("control-plane", &http, cp_admin, &logs)
        .await?;
    say(&format!(
        "control plane up: CA trust bundle {} (self-signed root, local profile), discovery + CA on {grpc} (TLS), admin http://{cp_admin}/metrics",
        state.join("trust-bundle.pem").display()
    ));

    // 2. Workloads: app + proxy each, with a token from the local issuer. Every proxy
    // serves `/tap` to holders of one demo tap token.
    let tap_token_file = state.join("tap-token");
    let tap_token = random_hex(16)?;
    write_private(&tap_token_file, &tap_token)?;
    for w in workloads {
        let token = issue_token(addon, state, w).await?;
        let token_file = tokens.join(format!("{}.jwt", w.name));
        write_private(&token_file, &token)?;
        let mut app = Command::new(me);
        app.args(["demo-app", "--name", w.name, "--listen", &w.app.to_string()]);
        if w.name == SLOW_WORKLOAD {
            app.args(["--delay", &format!("{}ms", SLOW_DELAY.as_millis())]);
        }
        procs.spawn(&format!("{}-app", w.name), app, &logs)?;
        let mut p = Command::new(proxy);
        p.arg("--control-plane").arg(grpc.to_string());
        p.arg("--ca-roots").arg(state.join("trust-bundle.pem"));
        p.arg("--token-file").arg(&token_file);
        p.args([
            "--namespace",
            "demo",
            "--service-account",
            w.service_account,
            "--workload",
            w.name,
        ]);
        p.args([
            "--outbound",
            &w.outbound.to_string(),
            "--inbound",
            &w.inbound.to_string(),
        ]);
        p.args(["--admin", &w.admin.to_string(), "--app", &w.app.to_string()]);
        p.arg("--tap-token-file").arg(&tap_token_file);
        procs.spawn(&format!("{}-proxy", w.name), p, &logs)?;
    }
    for w in workloads {
        procs
            .wait_ready(&format!("{}-proxy", w.name), &http, w.admin, &logs)
            .await?;
        let cfg = http.get(w.admin, "localhost", "/config").await?;
        let doc: serde_json::Value = serde_json::from_str(&cfg.body).unwrap_or_default();
        let id = doc["certificate"]["identity"].as_str().unwrap_or("?");
        let exp = doc["certificate"]["not_after_unix"].as_u64().unwrap_or(0);
        let ttl = exp.saturating_sub(unix_now());
        let services = doc["discovery"]["services"].as_array().map_or(0, Vec::len);
        let generation = doc["certificate"]["ca_generation"].as_u64().unwrap_or(0);
        let roots = doc["certificate"]["trust_root_fingerprints"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        say(&format!(
            "{:<8} proxy ready: identity {id} (certificate valid {}h{:02}m, CA generation {generation}, trust root {roots}), view v{} with {services} service(s); admin http://{}/config",
            w.name,
            ttl / 3600,
            (ttl % 3600) / 60,
            doc["discovery"]["version"],
            w.admin
        ));
    }

    // 3. Traffic: client-1 -> web.demo through both proxies.
    let client = &workloads[0];
    say(&format!(
        "sending requests from client-1 to http://web.demo/ through its proxy ({}); each hop is mTLS with SPIFFE identities checked on both sides",
        client.outbound
    ));
    say(&format!(
        "an app with no mesh certificate calls web-1's proxy directly ({}): {}",
        workloads[1].inbound,
        probe_without_certificate(&state.join("trust-bundle.pem"), workloads[1].inbound).await
    ));
    // The flag the other commands need to find this control plane, if not the default.
    let admin_flag = if cp_admin.port() == 9090 {
        String::new()
    } else {
        format!(" --admin {cp_admin}")
    };
    say(&format!(
        "live golden metrics: run `trellis stat{admin_flag}` in another terminal (add --by edge or --by service)"
    ));
    say(&format!(
        "live requests: `trellis tap{admin_flag} --token-file {0}` or `trellis top{admin_flag} --token-file {0}`",
        tap_token_file.display()
    ));
    say(&format!(
        "service graph, golden metrics and traces in a browser: run `trellis dashboard{admin_flag}` in another terminal and open http://127.0.0.1:9091/"
    ));
    let started = Instant::now();
    let admins: Vec<SocketAddr> = workloads.iter().map(|w| w.admin).collect();
    // The demo taps its own proxies too: the first requests as tap shows them, and the
    // busiest paths at the end, as `trellis top` counts them (inbound: once per request).
    let top = std::sync::Arc::new(std::sync::Mutex::new(tap::Top::default()));
    let mut taps = tap::sessions(&http, &admins, &tap_token);
    let collector = {
        let top = top.clone();
        tokio::spawn(async move {
            let mut shown = 0;
            while let Some(msg) = taps.recv().await {
                if let tap::Msg::Event(e) = msg
                    && e.inbound()
                {
                    if shown < TAP_SHOWN {
                        shown += 1;
                        say(&format!("     tap: {}", e.line()));
                    }
                    top.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .add(&e);
                }
            }
        })
    };
    // The last scrape the live line was computed from, and when.
    let mut last = (stat::scrape_all(&http, &admins).await, Instant::now());
    let mut served: BTreeMap<String, u64> = BTreeMap::new();
    let (mut ok, mut failed) = (0u64, 0u64);
    // The CA switch: (requests ok, failed) when it started, until every proxy re-issued.
    let mut switch: Option<(u64, u64)> = None;
    let mut switched = false;
    let mut ticker = tokio::time::interval(args.interval);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    for n in 1u64.. {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut ctrl_c => break,
        }
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        procs.check_alive(&logs)?;
        if n == POLICY_AT {
            apply_policies(&http, &config, workloads).await?;
        }
        if n == ROUTE_AT {
            apply_route(&http, &config, workloads).await?;
        }
        if n == CA_SWITCH_AT {
            start_ca_switch(state, &mesh_config)?;
            switch = Some((ok, failed));
        }
        if let (Some((ok0, failed0)), false) = (switch, switched)
            && let Some(roots) = all_reissued(&http, workloads).await
        {
            switched = true;
            say(&format!(
                "CA switched: every proxy now holds a certificate from the plug-in CA (generation 2, trust root {roots}); {} requests during the switch, {} failed",
                ok - ok0 + failed - failed0,
                failed - failed0
            ));
        }
        match http
            .get(client.outbound, "web.demo", &format!("/hello?n={n}"))
            .await
        {
            Ok(r) if r.status.is_success() => {
                ok += 1;
                let doc: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
                let by = doc["workload"].as_str().unwrap_or("?").to_owned();
                say(&format!(
                    "#{n:<3} client-1 -> web.demo -> {by}: {} | {by} saw caller {}",
                    r.status,
                    doc["caller"].as_str().unwrap_or("?")
                ));
                *served.entry(by).or_default() += 1;
            }
            Ok(r) => {
                failed += 1;
                let side = r
                    .headers
                    .get("x-trellis-error")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("app");
                say(&format!(
                    "#{n:<3} client-1 -> web.demo: {} ({side}) {}",
                    r.status,
                    r.body.trim()
                ));
            }
            Err(e) => {
                failed += 1;
                say(&format!("#{n:<3} client-1 -> web.demo: failed: {e:#}"));
            }
        }
        if n % LIVE_EVERY == 0 {
            let now = stat::scrape_all(&http, &admins).await;
            let rows = stat::rows(
                &last.0,
                &now,
                stat::By::Workload,
                last.1.elapsed().as_secs_f64(),
            );
            for r in rows {
                say(&format!("     stat: {}", stat::line(&r)));
            }
            last = (now, Instant::now());
        }
    }

    if switch.is_some() && !switched {
        say("CA switch still in progress when the demo stopped (run longer to see it finish)");
    }

    // 4. Summary.
    let spread: Vec<String> = served.iter().map(|(k, v)| format!("{k}={v}")).collect();
    say(&format!(
        "done: {ok} ok, {failed} failed; served by {}",
        spread.join(", ")
    ));
    // The newest whole trace the telemetry gateway holds (every request is sampled here;
    // the newest ones may still sit in a proxy's batch, up to 2 s).
    if let Ok(traces) = get_json::<serde_json::Value>(&http, cp_admin, "/debug/traces").await
        && let Some(t) = traces.as_array().and_then(|t| {
            t.iter()
                .find(|t| t["spans"].as_array().is_some_and(|s| s.len() >= 2))
        })
    {
        say(&format!(
            "latest trace {} (tracing.otlp: mesh, 100% sampled; all: http://{cp_admin}/debug/traces):",
            t["trace_id"].as_str().unwrap_or("?")
        ));
        for span in t["spans"].as_array().into_iter().flatten() {
            say(&format!(
                "  {:<6} span {} of {:<12} {} {} -> {} in {:.2}ms",
                span["kind"].as_str().unwrap_or("?"),
                span["span_id"].as_str().unwrap_or("?"),
                span["role"].as_str().unwrap_or("?"),
                span["name"].as_str().unwrap_or("?"),
                span["target"].as_str().unwrap_or("?"),
                span["status_code"],
                span["duration_ms"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    collector.abort();
    say("busiest paths (trellis top):");
    let table = top
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .table(5);
    for line in table.lines() {
        say(&format!("  {line}"));
    }
    // Golden metrics, as `trellis stat` computes them, over the whole run.
    let samples = stat::scrape_all(&http, &admins).await;
    let secs = started.elapsed().as_secs_f64();
    for (by, what) in [
        (stat::By::Workload, "workload"),
        (stat::By::Edge, "edge"),
        (stat::By::Route, "route"),
    ] {
        say(&format!(
            "golden metrics by {what} (trellis stat --by {what}):"
        ));
        for line in stat::table(&stat::rows(&[], &samples, by, secs), by).lines() {
            say(&format!("  {line}"));
        }
    }
    match settled_application(&http, cp_admin, workloads.len()).await {
        Ok((proxies, acks)) => {
            say(&check::application_line(&proxies, &acks));
            for px in &proxies {
                say(&format!(
                    "control plane: {} ({}) acked v{}",
                    px.workload,
                    px.identity,
                    px.acked_version
                        .map_or_else(|| "-".to_owned(), |v| v.to_string())
                ));
            }
        }
        Err(e) => say(&format!("config application unknown: {e:#}")),
    }
    // What the sidecar injector does to a pod on a cluster (`/inject`, `trellis inject`).
    say(&injector_line());
    // The health report `trellis check` prints (on a cluster: `trellis check --kubernetes`).
    let checks = check::local(cp_admin, check::DEFAULT_WARN_WITHIN).await;
    say(&format!("trellis check: {}", check::summary(&checks)));
    for c in &checks {
        say(&format!("  {} {}", c.verdict.mark(), c.line));
    }
    say(&format!("logs: {}", logs.display()));
    if failed > 0 && ok == 0 {
        bail!("no request succeeded; see the logs above");
    }
    Ok(())
}

/// Tap lines the demo prints as they happen.
const TAP_SHOWN: usize = 3;

/// Every this many requests the demo prints the workloads' golden metrics since the last.
const LIVE_EVERY: u64 = 10;

/// The request before which the demo applies its canary route.
const ROUTE_AT: u64 = 6;

/// The request before which the demo switches the mesh to a plug-in CA.
const CA_SWITCH_AT: u64 = 4;

/// `(policy, count)` of every `trellis_proxy_authorization_decisions_total` sample with
/// `decision="deny"` in a Prometheus text exposition.
fn denials(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("trellis_proxy_authorization_decisions_total{")?;
            let (labels, value) = rest.split_once("} ")?;
            if !labels.split(',').any(|l| l == "decision=\"deny\"") {
                return None;
            }
            let policy = labels
                .split(',')
                .find_map(|l| l.strip_prefix("policy=\""))?
                .trim_end_matches('"');
            Some((policy.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The request before which the demo applies its authorization policies.
const POLICY_AT: u64 = 2;

/// How long the demo waits for the web proxies to enforce the policies it applied.
const POLICY_WAIT: Duration = Duration::from_secs(10);

/// Adds the demo's AuthorizationPolicies to the running mesh (a file in its config
/// directory, as `kubectl apply` would on a cluster), waits until the web proxies enforce
/// them, then shows one request each of them refuses and what the proxies counted.
async fn apply_policies(
    http: &HttpClient,
    config: &Path,
    workloads: &[Workload],
) -> anyhow::Result<()> {
    std::fs::write(config.join("policy.yaml"), POLICY_YAML)?;
    let web: Vec<&Workload> = workloads
        .iter()
        .filter(|w| w.service_account == "web")
        .collect();
    let deadline = Instant::now() + POLICY_WAIT;
    let version = loop {
        let mut versions = Vec::new();
        for w in &web {
            let doc: serde_json::Value = get_json(http, w.admin, "/config").await?;
            let authz = &doc["discovery"]["authorization"]["applied"];
            if authz.as_array().is_some_and(|a| a.len() == 2) {
                versions.push(doc["discovery"]["version"].as_u64().unwrap_or(0));
            }
        }
        if versions.len() == web.len() {
            break versions.into_iter().max().unwrap_or(0);
        }
        if Instant::now() > deadline {
            bail!("the web proxies did not enforce the demo's policies within {POLICY_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    say(&format!(
        "authorization policies applied ({}): demo/web-readers ALLOWs only GET and HEAD from sa/client to Service web; demo/web-no-admin DENYs /admin and /admin/*; web-1 and web-2 enforce them from view v{version}",
        config.join("policy.yaml").display()
    ));
    let client = &workloads[0];
    for (method, path, why) in [
        (http::Method::DELETE, "/hello", "not a read"),
        (http::Method::GET, "/admin/users", "a denied path"),
        (
            http::Method::GET,
            "/public/../admin",
            "the same path, disguised",
        ),
    ] {
        let r = http
            .request(method.clone(), client.outbound, "web.demo", path)
            .await?;
        say(&format!(
            "policy: client-1 {method} web.demo{path} ({why}) -> {} {}",
            r.status,
            r.body.trim()
        ));
    }
    let mut denied: BTreeMap<String, f64> = BTreeMap::new();
    for w in &web {
        let text = http.get(w.admin, "localhost", "/metrics").await?.body;
        for (policy, n) in denials(&text) {
            *denied.entry(policy).or_default() += n;
        }
    }
    let counted: Vec<String> = denied
        .iter()
        .map(|(policy, n)| match policy.as_str() {
            "-" => format!("no ALLOW policy matched={n}"),
            p => format!("{p}={n}"),
        })
        .collect();
    say(&format!(
        "policy: the web proxies refused them before the app saw anything (trellis_proxy_authorization_decisions_total{{decision=\"deny\"}}: {})",
        counted.join(", ")
    ));
    Ok(())
}

/// Adds the demo's canary HTTPRoute to the running mesh (a file in the config directory,
/// as `kubectl apply` would on a cluster), waits until the client's proxy has it, then
/// shows a request that opts into the canary.
async fn apply_route(
    http: &HttpClient,
    config: &Path,
    workloads: &[Workload],
) -> anyhow::Result<()> {
    let file = config.join("route.yaml");
    std::fs::write(&file, ROUTE_YAML)?;
    let client = &workloads[0];
    let deadline = Instant::now() + POLICY_WAIT;
    let version = loop {
        let doc: serde_json::Value = get_json(http, client.admin, "/config").await?;
        if doc["discovery"]["routes"]
            .as_array()
            .is_some_and(|r| r.len() == 1)
        {
            break doc["discovery"]["version"].as_u64().unwrap_or(0);
        }
        if Instant::now() > deadline {
            bail!("client-1's proxy did not get the demo's route within {POLICY_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    say(&format!(
        "HTTPRoute applied ({}): demo/web-canary sends 20% of web.demo's requests to Service web-canary (web-2) and 80% to web-stable (web-1), and every request with x-canary: true to the canary; client-1's proxy routes by it from view v{version}",
        file.display()
    ));
    let r = http
        .request_with(
            http::Method::GET,
            client.outbound,
            "web.demo",
            "/hello?opt-in",
            &[("x-canary", "true")],
        )
        .await?;
    let doc: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    say(&format!(
        "route: client-1 GET web.demo/hello with x-canary: true -> {} from {}",
        r.status,
        doc["workload"].as_str().unwrap_or("?")
    ));
    Ok(())
}

fn render_mesh_config(ca: &str) -> String {
    let indented: String = ca.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: trellis-config, namespace: trellis-system}}\ndata:\n  tracing: |\n    sampling: 100\n    otlp: mesh\n  ca: |\n{indented}"
    )
}

/// What `trellis ca create-plugin --dir` does, then the config edit an operator makes.
fn start_ca_switch(state: &Path, mesh_config: &Path) -> anyhow::Result<()> {
    let dir = state.join("cacerts");
    let day = Duration::from_secs(24 * 3600);
    let pems = trellis_ca::generate_pems("cluster.local", "Trellis demo", 3650 * day, 365 * day)?;
    trellis_ca::source::write_dir(&dir, &pems)?;
    std::fs::write(
        mesh_config,
        render_mesh_config(&format!(
            "source: secret\nsecret: {{path: {}}}\nreloadInterval: 1s\npropagation: 1s",
            dir.display()
        )),
    )?;
    say(&format!(
        "switching the CA of the running mesh to a plug-in CA in {} (Istio cacerts layout; `trellis ca create-plugin --dir` makes one): new root pushed to every proxy first, then the new CA signs and proxies re-issue, then the old root retires",
        dir.display()
    ));
    Ok(())
}

/// The new root's fingerprint once every proxy holds a generation-2 certificate.
async fn all_reissued(http: &HttpClient, workloads: &[Workload]) -> Option<String> {
    let mut roots = None;
    for w in workloads {
        let cfg = http.get(w.admin, "localhost", "/config").await.ok()?;
        let doc: serde_json::Value = serde_json::from_str(&cfg.body).ok()?;
        if doc["certificate"]["ca_generation"].as_u64() != Some(2) {
            return None;
        }
        // After the switch the signing CA's root comes first in the bundle.
        roots = doc["certificate"]["trust_root_fingerprints"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|f| f.as_str())
            .map(str::to_owned);
    }
    roots
}

/// How long the summary waits for the last push (the CA switch's root retiring, say) to be
/// acked before it shows where application stands.
const APPLIED_WAIT: Duration = Duration::from_secs(5);

/// `/debug/proxies` and `/debug/acks` once all `expected` proxies are connected and have
/// applied everything, or as they are after [`APPLIED_WAIT`]: the summary line shows the
/// real state either way.
async fn settled_application(
    http: &HttpClient,
    cp_admin: SocketAddr,
    expected: usize,
) -> anyhow::Result<(Vec<ProxyStatus>, Vec<ServiceAcks>)> {
    let deadline = Instant::now() + APPLIED_WAIT;
    loop {
        let (proxies, acks) = application(http, cp_admin).await?;
        if (proxies.len() == expected && check::fully_applied(&proxies, &acks))
            || Instant::now() > deadline
        {
            return Ok((proxies, acks));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The control plane's view of which proxies and services applied the latest config.
async fn application(
    http: &HttpClient,
    cp_admin: SocketAddr,
) -> anyhow::Result<(Vec<ProxyStatus>, Vec<ServiceAcks>)> {
    Ok((
        get_json(http, cp_admin, "/debug/proxies").await?,
        get_json(http, cp_admin, "/debug/acks").await?,
    ))
}

/// GET `path` from the admin endpoint `addr` and parse its JSON.
async fn get_json<T: serde::de::DeserializeOwned>(
    http: &HttpClient,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<T> {
    let r = http.get(addr, "localhost", path).await?;
    if !r.status.is_success() {
        bail!("{path} answered {}", r.status);
    }
    serde_json::from_str(&r.body).with_context(|| format!("parsing {path}"))
}

// === impl Processes ===

impl Processes {
    fn spawn(&mut self, name: &str, mut cmd: Command, logs: &Path) -> anyhow::Result<()> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        cmd.stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .stdin(Stdio::null());
        cmd.kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Fails, with the end of its log, if a child has exited.
    fn check_alive(&mut self, logs: &Path) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited ({status}); last log lines:\n{}",
                    tail(&logs.join(format!("{name}.log")), 15)
                );
            }
        }
        Ok(())
    }

    async fn wait_ready(
        &mut self,
        name: &str,
        http: &HttpClient,
        admin: SocketAddr,
        logs: &Path,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_alive(logs)?;
            if let Ok(r) = http.get(admin, "localhost", "/ready").await
                && r.status.is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} not ready after 30s; last log lines:\n{}",
                    tail(&logs.join(format!("{name}.log")), 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Connects to a proxy's mTLS port with TLS but no client certificate and sends a
/// request, to show the refusal. Returns what happened, in words.
async fn probe_without_certificate(root_pem: &Path, addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let bundle = trellis_identity::TrustBundle::from_pem(&std::fs::read_to_string(root_pem)?)?;
        let web = trellis_identity::SpiffeId::new("cluster.local", "demo", "web")?;
        let tls = trellis_identity::client_config(None, &bundle, &web, &[b"h2"])?;
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("web-1")?;
        let mut stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: web.demo\r\n\r\n")
            .await?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await?;
        anyhow::Ok(n)
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(0)) => "refused: the proxy closed the connection".to_owned(),
        Ok(Ok(_)) => "UNEXPECTED: the proxy answered a client without a certificate".to_owned(),
        Ok(Err(e)) => format!("refused by the proxy ({e})"),
        Err(_) => "refused: no answer".to_owned(),
    }
}

fn plan(base: u16) -> anyhow::Result<Vec<Workload>> {
    let at = |off: u16| -> anyhow::Result<SocketAddr> {
        let port = base.checked_add(off).context("--port-base too high")?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    };
    [
        ("client-1", "client", 0),
        ("web-1", "web", 10),
        ("web-2", "web", 20),
    ]
    .into_iter()
    .map(|(name, sa, off)| {
        Ok(Workload {
            name,
            service_account: sa,
            outbound: at(off + 1)?,
            inbound: at(off + 2)?,
            admin: at(off + 3)?,
            app: at(off + 4)?,
        })
    })
    .collect()
}

fn render_mesh(base: u16) -> String {
    let mut s = MESH_YAML.to_owned();
    for off in [2u16, 12, 22] {
        s = s.replace(
            &format!("${{BASE+{off}}}"),
            &(u32::from(base) + u32::from(off)).to_string(),
        );
    }
    s
}

/// Every port free, or a message naming the busy one.
fn preflight(grpc: SocketAddr, admin: SocketAddr, workloads: &[Workload]) -> anyhow::Result<()> {
    let mut ports = vec![
        ("control plane gRPC (--grpc-port)", grpc),
        ("control plane admin (--admin-port)", admin),
    ];
    for w in workloads {
        ports.push(("workload port (--port-base)", w.outbound));
        ports.push(("workload port (--port-base)", w.inbound));
        ports.push(("workload port (--port-base)", w.admin));
        ports.push(("workload port (--port-base)", w.app));
    }
    for (what, addr) in ports {
        if let Err(e) = TcpListener::bind(addr) {
            bail!(
                "port {} ({what}) is not available: {e}. Is another `trellis demo` running? Stop it, or move this one with --port-base/--grpc-port/--admin-port.",
                addr.port()
            );
        }
    }
    Ok(())
}

async fn issue_token(addon: &Path, state: &Path, w: &Workload) -> anyhow::Result<String> {
    let out = Command::new(addon)
        .args(["issue-token", "--state-dir"])
        .arg(state)
        .args([
            "--namespace",
            "demo",
            "--service-account",
            w.service_account,
        ])
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "issuing a token for {}: {}",
            w.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// `n` random bytes from the kernel, as hex (the demo's tap token).
fn random_hex(n: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

fn find_bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        return Ok(p);
    }
    bail!(
        "{name} not found in {}: build all binaries first (cargo build --release --locked) or pass --bin-dir",
        dir.display()
    )
}

fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn say(line: &str) {
    println!("[trellis demo] {line}");
}

/// The sidecar injector's decision for the demo's `web` pod as it would run on a cluster
/// (namespace labelled `trellis.dev/inject: enabled`, Kubernetes 1.33): the function the
/// control plane serves at `/inject` and `trellis inject` runs offline.
fn injector_line() -> String {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-1", "namespace": "demo", "labels": {"app": "web"}},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "web", "image": "demo/web:1",
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
            }],
        },
    });
    let labels = BTreeMap::from([("trellis.dev/inject".to_owned(), "enabled".to_owned())]);
    let mut config = trellis_webhook::InjectConfig::new(
        "ghcr.io/trellis-mesh/proxy:0.1.0",
        trellis_webhook::DEFAULT_CONTROL_PLANE,
    );
    config.kubernetes_version = trellis_webhook::KubeVersion {
        major: 1,
        minor: 33,
    };
    let decision = serde_json::from_value(pod)
        .map_err(|e| e.to_string())
        .and_then(|pod| trellis_webhook::inject(&pod, &labels, &config).map_err(|e| e.to_string()));
    match decision {
        Ok(trellis_webhook::Decision::Patch(ops, summary)) => format!(
            "sidecar injector (on a cluster: /inject; offline: trellis inject): pod demo/web-1 -> \
             {summary} ({} patch operations)",
            ops.len()
        ),
        Ok(trellis_webhook::Decision::Skip(why)) => format!("sidecar injector: skipped: {why:?}"),
        Err(e) => format!("sidecar injector: refused: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_yaml_gets_the_port_base() {
        let y = render_mesh(20000);
        assert!(y.contains("meshAddress: 127.0.0.1:20012"), "{y}");
        assert!(!y.contains("${"), "{y}");
    }

    #[test]
    fn denials_are_read_by_policy_from_the_exposition() {
        let text = "# TYPE trellis_proxy_authorization_decisions_total counter\n\
            trellis_proxy_authorization_decisions_total{decision=\"allow\",policy=\"demo/web-readers\"} 7\n\
            trellis_proxy_authorization_decisions_total{decision=\"deny\",policy=\"demo/web-no-admin\"} 2\n\
            trellis_proxy_authorization_decisions_total{decision=\"dry_run_deny\",policy=\"-\"} 5\n\
            trellis_proxy_authorization_decisions_total{decision=\"deny\",policy=\"-\"} 1\n";
        assert_eq!(
            denials(text),
            vec![("demo/web-no-admin".to_owned(), 2.0), ("-".to_owned(), 1.0)]
        );
    }

    #[test]
    fn busy_port_is_named() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = busy.local_addr().unwrap();
        let w = plan(30000).unwrap();
        let e = preflight(addr, SocketAddr::from(([127, 0, 0, 1], 0)), &w)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&addr.port().to_string()) && e.contains("--grpc-port"),
            "{e}"
        );
    }
}
