//! `trellis tap` and `trellis top`: the live request stream of the proxies, Linkerd-viz
//! style. Both read each proxy's `GET /tap` (loopback admin, bearer token from the
//! proxies' `--tap-token-file`): `tap` prints every finished request as it happens,
//! `top` aggregates them into the busiest paths, refreshed every `--interval`.
//!
//! The proxies are found like `trellis stat` finds them (the control plane's
//! `/debug/proxies`, loopback addresses only) or named with `--proxy`.

use std::collections::HashMap;
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::http::HttpClient;

/// Where to tap and with what token; shared by `tap` and `top`.
#[derive(Debug, clap::Args)]
pub(crate) struct Source {
    /// The control plane's admin address, to list the proxies.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Tap these proxies (their admin address) instead of every proxy the control plane
    /// lists. Repeatable.
    #[arg(long = "proxy")]
    proxies: Vec<SocketAddr>,
    /// File holding the tap token (the proxies' --tap-token-file).
    #[arg(long, env = "TRELLIS_TAP_TOKEN_FILE")]
    token_file: PathBuf,
    /// Only requests in this direction (`inbound`: as the serving proxy saw them;
    /// `outbound`: as the calling proxy did).
    #[arg(long, value_parser = ["inbound", "outbound"])]
    direction: Option<String>,
    /// Only requests whose path starts with this.
    #[arg(long)]
    path_prefix: Option<String>,
}

/// `trellis tap` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct TapArgs {
    #[command(flatten)]
    source: Source,
    /// Stop after this many requests.
    #[arg(long)]
    max: Option<usize>,
    /// Print each request as the proxy's JSON line instead of text.
    #[arg(long)]
    json: bool,
}

/// `trellis top` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct TopArgs {
    #[command(flatten)]
    source: Source,
    /// How often the table is printed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Rows shown.
    #[arg(long, default_value_t = 10)]
    rows: usize,
}

/// One finished request, as `/tap` sends it (the fields read here).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Event {
    time: String,
    direction: String,
    method: String,
    authority: String,
    path: String,
    status: u16,
    grpc_status: Option<u8>,
    duration_ms: f64,
    request_bytes: u64,
    response_bytes: u64,
    source_workload: String,
    source_principal: String,
    destination_workload: String,
    destination_principal: String,
    trace_id: String,
}

impl Event {
    /// Seen by the serving proxy (each request once, however many proxies are tapped).
    pub(crate) fn inbound(&self) -> bool {
        self.direction == "inbound"
    }

    /// As `trellis stat` counts success: below 500 and, for gRPC, OK.
    fn ok(&self) -> bool {
        self.status < 500 && self.grpc_status.is_none_or(|g| g == 0)
    }

    /// `<ns>/<workload>` of the caller (the namespace from its SPIFFE id).
    fn source(&self) -> String {
        format!(
            "{}/{}",
            namespace(&self.source_principal),
            self.source_workload
        )
    }

    fn destination(&self) -> String {
        format!(
            "{}/{}",
            namespace(&self.destination_principal),
            self.destination_workload
        )
    }

    /// One line of `trellis tap`.
    pub(crate) fn line(&self) -> String {
        let grpc = self
            .grpc_status
            .map(|g| format!(" grpc-status={g}"))
            .unwrap_or_default();
        format!(
            "{} {:<8} {} -> {} {} {}{} {}{grpc} {:.2}ms {}B/{}B trace={}",
            self.time,
            self.direction,
            self.source(),
            self.destination(),
            self.method,
            self.authority,
            self.path,
            self.status,
            self.duration_ms,
            self.request_bytes,
            self.response_bytes,
            self.trace_id
        )
    }
}

/// The namespace of a SPIFFE id `spiffe://<td>/ns/<ns>/sa/<sa>`, or `?`.
fn namespace(principal: &str) -> &str {
    principal
        .split("/ns/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("?")
}

/// What a tap stream delivers: events, and word of proxies that refused or ended.
pub(crate) enum Msg {
    Event(Box<Event>),
    /// This session fell behind and the proxy skipped this many events.
    Dropped(SocketAddr, u64),
    Failed(SocketAddr, String),
}

/// Opens a tap session on every proxy; events arrive on the returned channel.
async fn open(source: &Source) -> anyhow::Result<(mpsc::Receiver<Msg>, usize)> {
    let token = std::fs::read_to_string(&source.token_file)
        .with_context(|| format!("--token-file {}", source.token_file.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(
        !token.is_empty(),
        "--token-file {} is empty",
        source.token_file.display()
    );
    let http = HttpClient::new();
    let proxies = if source.proxies.is_empty() {
        crate::stat::admins_of(&http, source.admin).await?
    } else {
        source.proxies.clone()
    };
    anyhow::ensure!(
        !proxies.is_empty(),
        "no proxies to tap: the control plane at {} lists none with a loopback admin address (name them with --proxy)",
        source.admin
    );
    Ok((sessions(&http, &proxies, &token), proxies.len()))
}

/// A tap session on each of `proxies` with `token`; their messages, merged.
pub(crate) fn sessions(
    http: &HttpClient,
    proxies: &[SocketAddr],
    token: &str,
) -> mpsc::Receiver<Msg> {
    let (tx, rx) = mpsc::channel(1024);
    for proxy in proxies.iter().copied() {
        let (http, token, tx) = (http.clone(), token.to_owned(), tx.clone());
        tokio::spawn(async move {
            if let Err(e) = stream(&http, proxy, &token, &tx).await {
                let _ = tx.send(Msg::Failed(proxy, format!("{e:#}"))).await;
            }
        });
    }
    rx
}

/// Reads one proxy's `/tap` until it ends.
async fn stream(
    http: &HttpClient,
    proxy: SocketAddr,
    token: &str,
    tx: &mpsc::Sender<Msg>,
) -> anyhow::Result<()> {
    let resp = http.get_stream(proxy, "/tap", token).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        anyhow::bail!(
            "/tap answered {status}: {}",
            String::from_utf8_lossy(&text).trim()
        );
    }
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let msg = match serde_json::from_slice::<Event>(&line) {
                Ok(e) => Msg::Event(Box::new(e)),
                Err(_) => match serde_json::from_slice::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["dropped"].as_u64())
                {
                    Some(n) => Msg::Dropped(proxy, n),
                    None => continue,
                },
            };
            if tx.send(msg).await.is_err() {
                return Ok(());
            }
        }
    }
    anyhow::bail!("the proxy ended the tap stream")
}

impl Source {
    fn wants(&self, e: &Event) -> bool {
        self.direction.as_ref().is_none_or(|d| *d == e.direction)
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| e.path.starts_with(p.as_str()))
    }
}

/// Runs `trellis tap`.
pub(crate) async fn tap(args: TapArgs) -> anyhow::Result<ExitCode> {
    let (mut rx, proxies) = open(&args.source).await?;
    eprintln!("tapping {proxies} proxies (Ctrl-C to stop)");
    let mut seen = 0usize;
    let mut live = proxies;
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Event(e) if args.source.wants(&e) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "time": e.time, "direction": e.direction, "method": e.method,
                            "authority": e.authority, "path": e.path, "status": e.status,
                            "grpc_status": e.grpc_status, "duration_ms": e.duration_ms,
                            "source": e.source(), "destination": e.destination(),
                            "trace_id": e.trace_id,
                        })
                    );
                } else {
                    println!("{}", e.line());
                }
                seen += 1;
                if args.max.is_some_and(|m| seen >= m) {
                    break;
                }
            }
            Msg::Event(_) => {}
            Msg::Dropped(p, n) => {
                eprintln!("trellis tap: {p}: {n} requests skipped (reading too slowly)")
            }
            Msg::Failed(p, why) => {
                eprintln!("trellis tap: {p}: {why}");
                live -= 1;
                if live == 0 {
                    anyhow::bail!("no proxy left to tap");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One row of `trellis top`: a (source, destination, method, path).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Path {
    count: u64,
    ok: u64,
    best_ms: f64,
    worst_ms: f64,
    last_ms: f64,
}

/// Busiest paths, bounded: past [`MAX_PATHS`] distinct keys, new ones are counted under
/// one `(other paths)` row.
#[derive(Debug, Default)]
pub(crate) struct Top {
    paths: HashMap<(String, String, String, String), Path>,
}

/// Distinct rows `trellis top` keeps.
const MAX_PATHS: usize = 10_000;

impl Top {
    /// Counts one finished request.
    pub(crate) fn add(&mut self, e: &Event) {
        let mut key = (
            e.source(),
            e.destination(),
            e.method.clone(),
            e.path.clone(),
        );
        if self.paths.len() >= MAX_PATHS && !self.paths.contains_key(&key) {
            key = (
                String::new(),
                String::new(),
                String::new(),
                "(other paths)".into(),
            );
        }
        let p = self.paths.entry(key).or_default();
        if p.count == 0 || e.duration_ms < p.best_ms {
            p.best_ms = e.duration_ms;
        }
        p.worst_ms = p.worst_ms.max(e.duration_ms);
        p.last_ms = e.duration_ms;
        p.count += 1;
        p.ok += u64::from(e.ok());
    }

    /// The `rows` busiest paths as a table.
    pub(crate) fn table(&self, rows: usize) -> String {
        let mut sorted: Vec<_> = self.paths.iter().collect();
        sorted.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
        let mut lines = vec![
            [
                "SOURCE",
                "DESTINATION",
                "METHOD",
                "PATH",
                "COUNT",
                "BEST",
                "WORST",
                "LAST",
                "SUCCESS",
            ]
            .map(str::to_owned)
            .to_vec(),
        ];
        for ((src, dst, method, path), p) in sorted.into_iter().take(rows) {
            #[allow(clippy::cast_precision_loss)] // a rate for display
            let success = p.ok as f64 / p.count as f64 * 100.0;
            lines.push(vec![
                src.clone(),
                dst.clone(),
                method.clone(),
                path.clone(),
                p.count.to_string(),
                format!("{:.2}ms", p.best_ms),
                format!("{:.2}ms", p.worst_ms),
                format!("{:.2}ms", p.last_ms),
                format!("{success:.2}%"),
            ]);
        }
        crate::stat::columns(&lines)
    }
}

/// Runs `trellis top`.
pub(crate) async fn top(args: TopArgs) -> anyhow::Result<ExitCode> {
    let (mut rx, proxies) = open(&args.source).await?;
    let started = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let mut top = Top::default();
    let mut tick = tokio::time::interval(args.interval);
    tick.tick().await;
    let mut live = proxies;
    loop {
        let done = args.duration.is_some_and(|d| started.elapsed() >= d);
        tokio::select! {
            msg = rx.recv(), if !done => match msg {
                Some(Msg::Event(e)) if args.source.wants(&e) => top.add(&e),
                Some(Msg::Event(_) | Msg::Dropped(..)) => {}
                Some(Msg::Failed(p, why)) => {
                    eprintln!("trellis top: {p}: {why}");
                    live -= 1;
                    if live == 0 {
                        anyhow::bail!("no proxy left to tap");
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                let mut out = std::io::stdout().lock();
                if tty {
                    // Clear and home: the table redraws in place.
                    let _ = write!(out, "\x1b[2J\x1b[H");
                }
                let _ = write!(
                    out,
                    "busiest paths from {proxies} proxies, {:.0}s:\n{}\n",
                    started.elapsed().as_secs_f64(),
                    top.table(args.rows)
                );
                let _ = out.flush();
                if done {
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(path: &str, status: u16, ms: f64) -> Event {
        Event {
            time: "2026-12-07T00:00:00.000000Z".into(),
            direction: "inbound".into(),
            method: "GET".into(),
            authority: "web.demo".into(),
            path: path.into(),
            status,
            grpc_status: None,
            duration_ms: ms,
            request_bytes: 0,
            response_bytes: 11,
            source_workload: "client".into(),
            source_principal: "spiffe://cluster.local/ns/demo/sa/client".into(),
            destination_workload: "web".into(),
            destination_principal: "spiffe://cluster.local/ns/shop/sa/web".into(),
            trace_id: "ab".repeat(16),
        }
    }

    #[test]
    fn top_ranks_paths_by_count_with_latency_and_success() {
        let mut top = Top::default();
        for (path, status, ms) in [
            ("/a", 200, 2.0),
            ("/b", 200, 1.0),
            ("/a", 503, 4.0),
            ("/a", 200, 3.0),
        ] {
            top.add(&event(path, status, ms));
        }
        let t = top.table(10);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SOURCE"), "{t}");
        assert!(
            lines[1].starts_with(
                "demo/client  shop/web     GET     /a    3      2.00ms  4.00ms  3.00ms  66.67%"
            ),
            "{t}"
        );
        assert!(
            lines[2].contains("/b") && lines[2].ends_with("100.00%"),
            "{t}"
        );
        assert_eq!(top.table(1).lines().count(), 2);
    }

    #[test]
    fn top_is_bounded() {
        let mut top = Top::default();
        for i in 0..MAX_PATHS + 50 {
            top.add(&event(&format!("/p{i}"), 200, 1.0));
        }
        assert_eq!(top.paths.len(), MAX_PATHS + 1);
        assert!(top.table(MAX_PATHS + 1).contains("(other paths)"));
    }

    #[test]
    fn tap_lines_name_both_sides_and_grpc_failures_count() {
        let mut e = event("/hello", 200, 1.234);
        assert_eq!(
            e.line(),
            "2026-12-07T00:00:00.000000Z inbound  demo/client -> shop/web GET web.demo/hello 200 1.23ms 0B/11B trace=abababababababababababababababab"
        );
        assert!(e.ok());
        e.grpc_status = Some(14);
        assert!(!e.ok());
        assert!(e.line().contains(" 200 grpc-status=14 "));
        assert_eq!(namespace("garbage"), "?");
    }
}
