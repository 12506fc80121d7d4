//! `trellis stat`: golden metrics (success rate, requests per second, latency
//! percentiles) per workload, per service or per edge, read straight from the proxies'
//! Prometheus endpoints, Linkerd-viz style but with no Prometheus in between.
//!
//! The proxies are found through the control plane (`/debug/proxies`, each proxy's
//! `metrics_address`) or named with `--proxy`. Each is scraped twice, `--window` apart;
//! the figures are the difference. Only the request families are read
//! (`http_{server,client}_request_duration_seconds`, see docs/metrics.md): `--by workload`
//! reads the serving side (what each workload answered), `--by service`, `--by edge` and
//! `--by route` the calling side (what callers got, including the proxy's own error
//! answers). Routes are applied by the caller's proxy, so only that side knows them;
//! requests no HTTPRoute applied to show as `[default] <service>`, like Linkerd's
//! `[DEFAULT]` route.
//!
//! A request succeeded when its status is below 500 and, for gRPC, its `grpc-status` is
//! 0 (OK), as Linkerd counts it. Percentiles are interpolated within histogram buckets,
//! like PromQL's `histogram_quantile`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::http::HttpClient;

/// `trellis stat` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// What to group by.
    #[arg(long, value_enum, default_value_t = By::Workload)]
    by: By,
    /// Time between the two scrapes the figures are computed from.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Totals since each proxy started, from one scrape (no rates).
    #[arg(long, conflicts_with = "window")]
    since_start: bool,
    /// The control plane's admin address, to list the proxies.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Scrape these proxies (`ip:port` of their admin or --metrics listener) instead of
    /// asking the control plane. Repeatable.
    #[arg(long = "proxy")]
    proxies: Vec<SocketAddr>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The grouping of `trellis stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum By {
    /// Per serving workload (its inbound requests).
    Workload,
    /// Per destination service (its callers' requests).
    Service,
    /// Per caller -> serving workload pair.
    Edge,
    /// Per HTTPRoute (its callers' requests), and `[default] <service>` for requests
    /// no route applied to.
    Route,
}

/// One sample line of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    /// The metric name (for a histogram, with its `_bucket`/`_sum`/`_count` suffix).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The sample's value.
    pub(crate) fn value(&self) -> f64 {
        self.value
    }

    /// The value of label `name`, `""` when the sample has none.
    pub(crate) fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    /// Name and labels, the identity of the series across scrapes.
    fn key(&self) -> String {
        let mut k = self.name.clone();
        for (n, v) in &self.labels {
            k.push_str(&format!(",{n}={v:?}"));
        }
        k
    }
}

/// The samples of the request-duration families in `text`; other lines are skipped, a
/// malformed sample line is an error naming it.
pub(crate) fn parse(text: &str) -> anyhow::Result<Vec<Sample>> {
    parse_where(text, |name| {
        name.starts_with("http_server_request_duration_seconds_")
            || name.starts_with("http_client_request_duration_seconds_")
    })
}

/// The samples in `text` whose metric name `keep` accepts (comments and other lines are
/// skipped); a malformed sample line that is kept is an error naming it. `trellis check`
/// reads the control plane's families with it.
pub(crate) fn parse_where(text: &str, keep: impl Fn(&str) -> bool) -> anyhow::Result<Vec<Sample>> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        if name.is_empty() || !keep(name) {
            continue;
        }
        out.push(parse_line(line).with_context(|| format!("bad sample line: {line}"))?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> anyhow::Result<Sample> {
    let end = line.find(['{', ' ']).context("no value")?;
    let name = line[..end].to_owned();
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(mut inner) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = inner.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = inner.split_once("=\"").context("label without =\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let close = loop {
                match chars.next().context("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(c) => value.push(c),
                        None => anyhow::bail!("unterminated escape"),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((label.to_owned(), value));
            inner = after[close + 1..].trim_start_matches(',');
        }
    }
    let value = rest
        .split_whitespace()
        .next()
        .context("no value")?
        .parse::<f64>()?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// One row of `trellis stat`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Row {
    /// Namespace of the workload or service (of the caller, for an edge).
    pub(crate) namespace: String,
    /// Workload or service name; for an edge `caller -> server`, each `<ns>/<name>`.
    pub(crate) name: String,
    /// Requests in the window.
    pub(crate) requests: f64,
    /// Fraction of them that succeeded (`None`: no requests).
    pub(crate) success: Option<f64>,
    /// Requests per second.
    pub(crate) rps: f64,
    /// Latency percentiles, seconds (`None`: no requests).
    pub(crate) p50: Option<f64>,
    /// 95th percentile.
    pub(crate) p95: Option<f64>,
    /// 99th percentile.
    pub(crate) p99: Option<f64>,
}

#[derive(Default)]
struct Acc {
    requests: f64,
    failures: f64,
    /// Upper bound (as written) -> cumulative count.
    buckets: BTreeMap<String, f64>,
}

/// The change from `before` to `after` in `family` (a request-duration family), summed
/// per `key` of each series: requests, failures and cumulative buckets. Pure.
fn accumulate<K: Ord>(
    before: &[Sample],
    after: &[Sample],
    family: &str,
    key: impl Fn(&Sample) -> K,
) -> BTreeMap<K, Acc> {
    let earlier: BTreeMap<String, f64> = before.iter().map(|s| (s.key(), s.value)).collect();
    let mut groups: BTreeMap<K, Acc> = BTreeMap::new();
    for s in after {
        let Some(suffix) = s.name.strip_prefix(family) else {
            continue;
        };
        let was = earlier.get(&s.key()).copied().unwrap_or(0.0);
        // A counter that went down belongs to a restarted proxy: count from zero.
        let delta = if s.value >= was {
            s.value - was
        } else {
            s.value
        };
        let acc = groups.entry(key(s)).or_default();
        match suffix {
            "_count" => {
                acc.requests += delta;
                if !succeeded(s) {
                    acc.failures += delta;
                }
            }
            "_bucket" => *acc.buckets.entry(s.label("le").to_owned()).or_default() += delta,
            _ => {}
        }
    }
    groups
}

/// The rows for the change from `before` to `after` over `secs` seconds (`before` empty:
/// everything since the proxies started). Pure.
pub(crate) fn rows(before: &[Sample], after: &[Sample], by: By, secs: f64) -> Vec<Row> {
    let family = match by {
        By::Workload => "http_server_request_duration_seconds",
        By::Service | By::Edge | By::Route => "http_client_request_duration_seconds",
    };
    let groups = accumulate(before, after, family, |s| match by {
        By::Workload => (
            s.label("destination_namespace").to_owned(),
            s.label("destination_workload").to_owned(),
        ),
        By::Service => (
            s.label("destination_service_namespace").to_owned(),
            s.label("destination_service_name").to_owned(),
        ),
        By::Route if s.label("route_name").is_empty() => (
            s.label("destination_service_namespace").to_owned(),
            format!("[default] {}", s.label("destination_service_name")),
        ),
        By::Route => (
            s.label("route_namespace").to_owned(),
            s.label("route_name").to_owned(),
        ),
        By::Edge => (
            s.label("source_namespace").to_owned(),
            format!(
                "{}/{} -> {}/{}",
                s.label("source_namespace"),
                s.label("source_workload"),
                s.label("destination_namespace"),
                s.label("destination_workload")
            ),
        ),
    });
    groups
        .into_iter()
        .filter(|(_, a)| a.requests > 0.0 || before.is_empty())
        .map(|((namespace, name), a)| {
            let buckets = sorted_buckets(&a.buckets);
            let has = a.requests > 0.0;
            Row {
                namespace,
                name,
                requests: a.requests,
                success: has.then(|| (a.requests - a.failures) / a.requests),
                rps: if secs > 0.0 { a.requests / secs } else { 0.0 },
                p50: has.then(|| quantile(0.50, &buckets)).flatten(),
                p95: has.then(|| quantile(0.95, &buckets)).flatten(),
                p99: has.then(|| quantile(0.99, &buckets)).flatten(),
            }
        })
        .collect()
}

fn succeeded(s: &Sample) -> bool {
    let status_ok = s
        .label("http_response_status_code")
        .parse::<u16>()
        .is_ok_and(|c| c < 500);
    let grpc = s.label("rpc_grpc_status_code");
    status_ok && (grpc.is_empty() || grpc == "0")
}

/// `(upper bound, cumulative count)` ascending, `+Inf` last.
fn sorted_buckets(b: &BTreeMap<String, f64>) -> Vec<(f64, f64)> {
    let mut v: Vec<(f64, f64)> = b
        .iter()
        .filter_map(|(le, c)| {
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, *c))
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// The `q` quantile of cumulative buckets, interpolated linearly within the bucket it
/// falls in (PromQL `histogram_quantile`); in the `+Inf` bucket, the largest finite bound.
pub(crate) fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (bound - lower) * frac);
        }
        (lower, below) = (bound, count);
    }
    Some(lower)
}

/// One row in a sentence, for the demo's live lines.
pub(crate) fn line(r: &Row) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |s| format!("{:.2}ms", s * 1e3));
    format!(
        "{}/{}: {} success, {:.2} rps, p50 {} p95 {} p99 {} ({} requests)",
        r.namespace,
        r.name,
        r.success
            .map_or_else(|| "-".to_owned(), |s| format!("{:.2}%", s * 100.0)),
        r.rps,
        ms(r.p50),
        ms(r.p95),
        ms(r.p99),
        r.requests.round()
    )
}

/// The rows as a table, one line each, with a header.
pub(crate) fn table(rows: &[Row], by: By) -> String {
    let what = match by {
        By::Workload => "WORKLOAD",
        By::Service => "SERVICE",
        By::Edge => "EDGE",
        By::Route => "ROUTE",
    };
    let mut lines = vec![vec![
        "NAMESPACE".to_owned(),
        what.to_owned(),
        "SUCCESS".to_owned(),
        "RPS".to_owned(),
        "LATENCY_P50".to_owned(),
        "LATENCY_P95".to_owned(),
        "LATENCY_P99".to_owned(),
        "REQUESTS".to_owned(),
    ]];
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |s| format!("{:.2}ms", s * 1e3));
    for r in rows {
        lines.push(vec![
            r.namespace.clone(),
            r.name.clone(),
            r.success
                .map_or_else(|| "-".to_owned(), |s| format!("{:.2}%", s * 100.0)),
            format!("{:.2}", r.rps),
            ms(r.p50),
            ms(r.p95),
            ms(r.p99),
            format!("{}", r.requests.round()),
        ]);
    }
    columns(&lines)
}

/// Rows of cells as aligned columns, two spaces apart, one line each.
pub(crate) fn columns(lines: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..lines.first().map_or(0, Vec::len))
        .map(|i| {
            lines
                .iter()
                .map(|l| l.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for l in lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The metrics addresses of the proxies the control plane at `admin` knows. Only
/// loopback addresses are taken: the list comes from what proxies say about themselves,
/// and the CLI should not be sent elsewhere by it.
pub(crate) async fn proxies_of(
    http: &HttpClient,
    admin: SocketAddr,
) -> anyhow::Result<Vec<SocketAddr>> {
    listed(http, admin, |e| &e.metrics_address).await
}

/// The admin addresses (for `/tap`) of the proxies the control plane at `admin` knows,
/// loopback only like [`proxies_of`].
pub(crate) async fn admins_of(
    http: &HttpClient,
    admin: SocketAddr,
) -> anyhow::Result<Vec<SocketAddr>> {
    listed(http, admin, |e| &e.admin_address).await
}

/// One proxy of `/debug/proxies`: the addresses it reported (empty from older proxies).
#[derive(serde::Deserialize)]
struct Listed {
    #[serde(default)]
    metrics_address: String,
    #[serde(default)]
    admin_address: String,
}

/// The loopback addresses `pick` reads from each proxy the control plane lists.
async fn listed(
    http: &HttpClient,
    admin: SocketAddr,
    pick: impl Fn(&Listed) -> &String,
) -> anyhow::Result<Vec<SocketAddr>> {
    let r = http
        .get(admin, "localhost", "/debug/proxies")
        .await
        .with_context(|| format!("control plane admin {admin}"))?;
    anyhow::ensure!(
        r.status.is_success(),
        "control plane {admin}: /debug/proxies answered {}",
        r.status
    );
    let entries: Vec<Listed> = serde_json::from_str(&r.body).context("/debug/proxies")?;
    Ok(entries
        .iter()
        .filter_map(|e| pick(e).parse::<SocketAddr>().ok())
        .filter(|a| a.ip().is_loopback())
        .collect())
}

/// Scrapes every proxy; one that does not answer is reported on stderr and left out.
pub(crate) async fn scrape_all(http: &HttpClient, proxies: &[SocketAddr]) -> Vec<Sample> {
    let mut all = Vec::new();
    for (p, got) in scrape_each(http, proxies).await {
        match got {
            Ok(samples) => all.extend(samples),
            Err(e) => eprintln!("trellis stat: proxy {p}: {e:#}"),
        }
    }
    all
}

/// Runs `trellis stat`.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let http = HttpClient::new();
    let proxies = if args.proxies.is_empty() {
        proxies_of(&http, args.admin).await?
    } else {
        args.proxies.clone()
    };
    anyhow::ensure!(
        !proxies.is_empty(),
        "no proxies to read: the control plane at {} lists none with a loopback metrics address (name them with --proxy)",
        args.admin
    );
    let (before, secs) = if args.since_start {
        (Vec::new(), 0.0)
    } else {
        let before = scrape_all(&http, &proxies).await;
        let started = Instant::now();
        tokio::time::sleep(args.window).await;
        (before, started.elapsed().as_secs_f64())
    };
    let after = scrape_all(&http, &proxies).await;
    let rows = rows(&before, &after, args.by, secs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!("no requests seen by the {} proxies read", proxies.len());
    } else {
        print!("{}", table(&rows, args.by));
    }
    Ok(ExitCode::SUCCESS)
}

/// One caller -> serving workload edge and its golden metrics over a window, for the
/// dashboard's service graph: [`rows`] `By::Edge` with the two ends kept apart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Edge {
    /// The caller's namespace (from its certificate).
    pub(crate) source_namespace: String,
    /// The caller's workload (`--service-name`).
    pub(crate) source_workload: String,
    /// The serving workload's namespace, or `unknown` (the caller's proxy answered itself).
    pub(crate) destination_namespace: String,
    /// The serving workload, or `unknown`.
    pub(crate) destination_workload: String,
    /// Requests in the window (what the caller got, the proxy's own error answers
    /// included).
    pub(crate) requests: f64,
    /// Fraction of them that succeeded (`None`: no requests).
    pub(crate) success: Option<f64>,
    /// Requests per second.
    pub(crate) rps: f64,
    /// 99th percentile latency, seconds (`None`: no requests).
    pub(crate) p99: Option<f64>,
}

/// Every edge with a calling-side series in `after`, with the change from `before` over
/// `secs` seconds. Unlike [`rows`], an edge with no requests in the window is kept (with
/// zero requests), so a graph does not lose an idle edge. Pure.
pub(crate) fn edges(before: &[Sample], after: &[Sample], secs: f64) -> Vec<Edge> {
    let groups = accumulate(before, after, "http_client_request_duration_seconds", |s| {
        [
            "source_namespace",
            "source_workload",
            "destination_namespace",
            "destination_workload",
        ]
        .map(|l| s.label(l).to_owned())
    });
    groups
        .into_iter()
        .map(|([sn, sw, dn, dw], a)| {
            let has = a.requests > 0.0;
            Edge {
                source_namespace: sn,
                source_workload: sw,
                destination_namespace: dn,
                destination_workload: dw,
                requests: a.requests,
                success: has.then(|| (a.requests - a.failures) / a.requests),
                rps: if secs > 0.0 { a.requests / secs } else { 0.0 },
                p99: has
                    .then(|| quantile(0.99, &sorted_buckets(&a.buckets)))
                    .flatten(),
            }
        })
        .collect()
}

/// Scrapes every proxy, each outcome kept apart (its samples, or why it could not
/// be read), for a caller that reports failures itself rather than on stderr.
pub(crate) async fn scrape_each(
    http: &HttpClient,
    proxies: &[SocketAddr],
) -> Vec<(SocketAddr, anyhow::Result<Vec<Sample>>)> {
    let mut out = Vec::with_capacity(proxies.len());
    for p in proxies {
        let got = http.get(*p, "localhost", "/metrics").await;
        let samples = got.and_then(|r| {
            anyhow::ensure!(r.status.is_success(), "answered {}", r.status);
            parse(&r.body)
        });
        out.push((
            *p,
            samples.map(|samples| {
                samples
                    .into_iter()
                    .map(|mut s| {
                        // Series of different proxies must not meet in the delta.
                        s.labels.push(("proxy".to_owned(), p.to_string()));
                        s
                    })
                    .collect()
            }),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(
        kind: &str,
        dst: &str,
        status: u16,
        grpc: &str,
        count: f64,
        buckets: &[(&str, f64)],
    ) -> String {
        let labels = format!(
            "http_request_method=\"GET\",http_response_status_code=\"{status}\",rpc_grpc_status_code=\"{grpc}\",source_workload=\"client\",source_namespace=\"demo\",source_principal=\"spiffe://cluster.local/ns/demo/sa/client\",destination_workload=\"{dst}\",destination_namespace=\"demo\",destination_principal=\"spiffe://cluster.local/ns/demo/sa/{dst}\",destination_service_name=\"{dst}\",destination_service_namespace=\"demo\",route_namespace=\"\",route_name=\"\",connection_security_policy=\"mutual_tls\""
        );
        let mut out = String::new();
        for (le, c) in buckets {
            out.push_str(&format!(
                "http_{kind}_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {c}\n"
            ));
        }
        out.push_str(&format!(
            "http_{kind}_request_duration_seconds_sum{{{labels}}} 0.5\n"
        ));
        out.push_str(&format!(
            "http_{kind}_request_duration_seconds_count{{{labels}}} {count}\n"
        ));
        out
    }

    #[test]
    fn parses_labels_with_escapes_and_skips_other_families() {
        let text = "# TYPE x counter\ntrellis_proxy_discovery_version 3\nhttp_server_request_duration_seconds_count{a=\"q\\\"uote\",b=\"\"} 7\n# EOF\n";
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].label("a"), "q\"uote");
        assert_eq!(s[0].label("b"), "");
        assert_eq!(s[0].value, 7.0);
        assert!(parse("http_server_request_duration_seconds_count{a=\"x} 1\n").is_err());
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = [
            (0.001, 50.0),
            (0.002, 90.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert!((quantile(0.5, &b).unwrap() - 0.001).abs() < 1e-12);
        // rank 70 is half way through the second bucket.
        assert!((quantile(0.7, &b).unwrap() - 0.0015).abs() < 1e-12);
        assert!((quantile(0.95, &b).unwrap() - 0.003).abs() < 1e-12);
        // In +Inf: the largest finite bound.
        let tail = [(0.001, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.99, &tail), Some(0.001));
        assert_eq!(quantile(0.5, &[(f64::INFINITY, 0.0)]), None);
    }

    #[test]
    fn rates_success_and_percentiles_from_two_scrapes() {
        let before = parse(
            &(series(
                "server",
                "web",
                200,
                "",
                10.0,
                &[("0.001", 10.0), ("0.002", 10.0), ("+Inf", 10.0)],
            ) + &series(
                "server",
                "web",
                503,
                "",
                0.0,
                &[("0.001", 0.0), ("0.002", 0.0), ("+Inf", 0.0)],
            )),
        )
        .unwrap();
        let after = parse(
            &(series(
                "server",
                "web",
                200,
                "",
                40.0,
                &[("0.001", 30.0), ("0.002", 40.0), ("+Inf", 40.0)],
            ) + &series(
                "server",
                "web",
                503,
                "",
                10.0,
                &[("0.001", 0.0), ("0.002", 10.0), ("+Inf", 10.0)],
            ) + &series(
                "server",
                "api",
                200,
                "14",
                5.0,
                &[("0.001", 5.0), ("+Inf", 5.0)],
            ) + &series("client", "web", 200, "", 99.0, &[("+Inf", 99.0)])),
        )
        .unwrap();
        let rows = rows(&before, &after, By::Workload, 10.0);
        assert_eq!(rows.len(), 2, "{rows:?}");
        let api = &rows[0];
        assert_eq!((api.name.as_str(), api.requests), ("api", 5.0));
        assert_eq!(api.success, Some(0.0), "grpc-status 14 is a failure");
        let web = &rows[1];
        assert_eq!(web.requests, 40.0);
        assert_eq!(web.success, Some(0.75));
        assert_eq!(web.rps, 4.0);
        // 20 of 40 new requests <= 1 ms, the other 20 in (1 ms, 2 ms].
        assert!((web.p50.unwrap() - 0.001).abs() < 1e-12, "{web:?}");
        assert!((web.p99.unwrap() - 0.00198).abs() < 1e-9, "{web:?}");
        let edges = super::rows(&[], &after, By::Edge, 1.0);
        assert_eq!(edges.len(), 1);
        assert_eq!(edges[0].name, "demo/client -> demo/web");
        let text = table(&rows, By::Workload);
        assert!(text.starts_with("NAMESPACE  WORKLOAD  SUCCESS"), "{text}");
        assert!(text.contains("web       75.00%   4.00"), "{text}");
    }

    #[test]
    fn routes_group_what_callers_sent_through_each_route() {
        let routed = |dst: &str, count: f64| {
            series("client", dst, 200, "", count, &[("+Inf", count)]).replace(
                "route_namespace=\"\",route_name=\"\"",
                "route_namespace=\"demo\",route_name=\"web-canary\"",
            )
        };
        let after = parse(
            &(routed("web", 90.0)
                + &routed("web-v2", 10.0)
                + &series("client", "api", 500, "", 4.0, &[("+Inf", 4.0)])
                + &series("server", "web", 200, "", 77.0, &[("+Inf", 77.0)])),
        )
        .unwrap();
        let rows = rows(&[], &after, By::Route, 0.0);
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.namespace.as_str(), r.name.as_str(), r.requests, r.success))
            .collect();
        assert_eq!(
            got,
            [
                ("demo", "[default] api", 4.0, Some(0.0)),
                ("demo", "web-canary", 100.0, Some(1.0)),
            ]
        );
        assert!(table(&rows, By::Route).starts_with("NAMESPACE  ROUTE"));
    }

    #[test]
    fn edges_keep_both_ends_and_idle_edges() {
        let before = parse(&series(
            "client",
            "web",
            200,
            "",
            10.0,
            &[("0.001", 10.0), ("+Inf", 10.0)],
        ))
        .unwrap();
        let after = parse(
            &(series(
                "client",
                "web",
                200,
                "",
                30.0,
                &[("0.001", 30.0), ("+Inf", 30.0)],
            ) + &series(
                "client",
                "web",
                503,
                "",
                5.0,
                &[("0.001", 5.0), ("+Inf", 5.0)],
            ) + &series(
                "client",
                "api",
                200,
                "",
                4.0,
                &[("0.001", 4.0), ("+Inf", 4.0)],
            ) + &series("server", "web", 200, "", 99.0, &[("+Inf", 99.0)])),
        )
        .unwrap();
        let before = [
            before,
            parse(&series("client", "api", 200, "", 4.0, &[("+Inf", 4.0)])).unwrap(),
        ]
        .concat();
        let e = edges(&before, &after, 5.0);
        assert_eq!(e.len(), 2, "{e:?}");
        // Idle in the window, still an edge.
        assert_eq!(
            (
                e[0].destination_workload.as_str(),
                e[0].requests,
                e[0].success,
                e[0].p99
            ),
            ("api", 0.0, None, None)
        );
        let web = &e[1];
        assert_eq!(
            (
                web.source_namespace.as_str(),
                web.source_workload.as_str(),
                web.destination_namespace.as_str(),
                web.destination_workload.as_str()
            ),
            ("demo", "client", "demo", "web")
        );
        assert_eq!((web.requests, web.rps), (25.0, 5.0));
        assert_eq!(web.success, Some(0.8));
        assert!((web.p99.unwrap() - 0.00099).abs() < 1e-12, "{web:?}");
    }

    #[test]
    fn a_restarted_proxy_counts_from_zero() {
        let before = parse(&series("server", "web", 200, "", 100.0, &[("+Inf", 100.0)])).unwrap();
        let after = parse(&series("server", "web", 200, "", 3.0, &[("+Inf", 3.0)])).unwrap();
        assert_eq!(rows(&before, &after, By::Workload, 1.0)[0].requests, 3.0);
    }
}
