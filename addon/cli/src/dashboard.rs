//! `trellis dashboard`: a local web page with the service graph and each workload's golden
//! metrics, updating live, Linkerd-viz style, with no Prometheus in between.
//!
//! Owns three things: the background scraper (every `--interval`, the proxies' `/metrics`
//! through [`stat::scrape_each`], the proxies found like `trellis stat` finds them), the
//! pure graph building ([`graph`]: nodes, edges and a layered layout from two scrapes)
//! and a small HTTP/1.1 server on loopback that serves the page (`dashboard/*`, embedded,
//! no external resource so it works offline), `/api/graph` and `/api/traces` (the control
//! plane's `/debug/traces`, passed through).
//!
//! The page shows the mesh's workloads and traces and has no authentication, so the
//! server listens on loopback only and answers only requests addressed to a loopback name
//! (a web page elsewhere cannot reach it through DNS rebinding).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http::{Method, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::HttpClient;
use crate::stat::{self, By, Sample};

const PAGE: &str = include_str!("dashboard/index.html");
const STYLE: &str = include_str!("dashboard/dashboard.css");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");

/// The shortest `--interval`: scraping every proxy faster than this only loads them.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Windows of history in a view's `trend`: a minute at the default interval.
const TREND_POINTS: usize = 30;

/// Exit code for a flag the dashboard refuses (as for bad configuration elsewhere).
const EXIT_USAGE: u8 = 64;

/// `trellis dashboard` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Where to serve the page; loopback only (the page has no authentication).
    #[arg(long, default_value = "127.0.0.1:9091")]
    listen: SocketAddr,
    /// The control plane's admin address, to list the proxies (and read recent traces).
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// Scrape these proxies (`ip:port` of their admin or --metrics listener) instead of
    /// asking the control plane; the page then shows no traces. Repeatable.
    #[arg(long = "proxy")]
    proxies: Vec<SocketAddr>,
    /// Time between scrapes: the page's figures are rates over this window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
}

/// The service graph of one window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Graph {
    /// Every workload seen serving (inbound metrics) or at either end of an edge, by id.
    pub(crate) nodes: Vec<Node>,
    /// Caller -> serving workload, by source then target.
    pub(crate) edges: Vec<GraphEdge>,
}

/// One workload of the graph. Golden metrics are those of the requests it served in the
/// window; all are `None` for a workload seen only as a caller or as a target no scraped
/// proxy serves (no inbound metrics to read).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Node {
    /// `<namespace>/<workload>`.
    pub(crate) id: String,
    /// Namespace.
    pub(crate) namespace: String,
    /// Workload (`--service-name`).
    pub(crate) name: String,
    /// Requests served in the window.
    pub(crate) requests: Option<f64>,
    /// Fraction of them that succeeded (`None` too when it served none).
    pub(crate) success: Option<f64>,
    /// Requests per second.
    pub(crate) rps: Option<f64>,
    /// Latency percentiles, seconds.
    pub(crate) p50: Option<f64>,
    /// 95th percentile.
    pub(crate) p95: Option<f64>,
    /// 99th percentile.
    pub(crate) p99: Option<f64>,
    /// Column in the layered layout: 0 for workloads nobody calls, else one more than its
    /// furthest caller (edges that close a cycle left out).
    pub(crate) layer: usize,
}

/// One edge of the graph, as its caller saw it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct GraphEdge {
    /// The caller's node id.
    pub(crate) source: String,
    /// The serving workload's node id (`unknown/unknown` when the caller's proxy answered
    /// itself, e.g. no endpoint).
    pub(crate) target: String,
    /// Requests in the window.
    pub(crate) requests: f64,
    /// Fraction that succeeded (`None`: no requests).
    pub(crate) success: Option<f64>,
    /// Requests per second.
    pub(crate) rps: f64,
    /// 99th percentile latency, seconds.
    pub(crate) p99: Option<f64>,
}

/// What `/api/graph` answers: the latest graph and how it was made.
#[derive(Debug, Clone, Serialize)]
struct View {
    /// When the scrape behind it finished (`None`: no scrape yet).
    generated_at_unix: Option<f64>,
    /// Seconds between the two scrapes the rates come from (0: only one scrape so far).
    window_seconds: f64,
    /// `--interval`, seconds: how often the page should poll.
    interval_seconds: f64,
    /// Where the proxies come from, in words.
    source: String,
    /// The control plane `/api/traces` reads, in words (`None` with `--proxy`).
    traces_source: Option<String>,
    /// Proxies read in the latest scrape.
    proxies: usize,
    /// What went wrong in the latest scrape (a proxy or the control plane unreachable);
    /// empty when everything was read.
    errors: Vec<String>,
    /// Each node's requests per second over the last windows, oldest first (up to
    /// [`TREND_POINTS`]), kept here so a page opened now draws its trend at once.
    trend: BTreeMap<String, Vec<f64>>,
    #[serde(flatten)]
    graph: Graph,
}

/// The graph for the change from `before` to `after` over `secs` seconds (see
/// [`stat::rows`]; `before` empty: since the proxies started). Pure.
pub(crate) fn graph(before: &[Sample], after: &[Sample], secs: f64) -> Graph {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    // Every serving workload with a series, so one idle in this window stays on the graph.
    for r in stat::rows(&[], after, By::Workload, 0.0) {
        let n = node(&mut nodes, &r.namespace, &r.name);
        n.requests = Some(0.0);
        n.rps = Some(0.0);
    }
    for r in stat::rows(before, after, By::Workload, secs) {
        let n = node(&mut nodes, &r.namespace, &r.name);
        n.requests = Some(r.requests);
        n.success = r.success;
        n.rps = Some(r.rps);
        (n.p50, n.p95, n.p99) = (r.p50, r.p95, r.p99);
    }
    let edges: Vec<GraphEdge> = stat::edges(before, after, secs)
        .into_iter()
        .map(|e| GraphEdge {
            source: node(&mut nodes, &e.source_namespace, &e.source_workload)
                .id
                .clone(),
            target: node(
                &mut nodes,
                &e.destination_namespace,
                &e.destination_workload,
            )
            .id
            .clone(),
            requests: e.requests,
            success: e.success,
            rps: e.rps,
            p99: e.p99,
        })
        .collect();
    let ids: Vec<&String> = nodes.keys().collect();
    let index = |id: &str| ids.binary_search_by(|k| k.as_str().cmp(id)).ok();
    let links: Vec<(usize, usize)> = edges
        .iter()
        .filter_map(|e| Some((index(&e.source)?, index(&e.target)?)))
        .collect();
    let layer = layers(ids.len(), &links);
    let mut nodes: Vec<Node> = nodes.into_values().collect();
    for (n, l) in nodes.iter_mut().zip(layer) {
        n.layer = l;
    }
    Graph { nodes, edges }
}

/// Adds one window to each node's requests-per-second history (0 for a node that serves
/// nothing), keeping the last [`TREND_POINTS`]; nodes gone from the graph are dropped.
/// Pure.
fn push_trend(trend: &mut BTreeMap<String, Vec<f64>>, g: &Graph) {
    trend.retain(|id, _| g.nodes.iter().any(|n| &n.id == id));
    for n in &g.nodes {
        let points = trend.entry(n.id.clone()).or_default();
        points.push(n.rps.unwrap_or(0.0));
        if points.len() > TREND_POINTS {
            points.remove(0);
        }
    }
}

/// The node `<namespace>/<name>`, added with no metrics if new.
fn node<'a>(nodes: &'a mut BTreeMap<String, Node>, namespace: &str, name: &str) -> &'a mut Node {
    let id = format!("{namespace}/{name}");
    nodes.entry(id.clone()).or_insert_with(|| Node {
        id,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        requests: None,
        success: None,
        rps: None,
        p50: None,
        p95: None,
        p99: None,
        layer: 0,
    })
}

/// The layer of each of `n` nodes given `links` (source, target): the longest path to it
/// from a node nobody calls. Cycles are broken by leaving out the edges a depth-first walk
/// finds closing them, the walk starting from uncalled nodes in index order, so the same
/// graph always gets the same layout. Pure.
fn layers(n: usize, links: &[(usize, usize)]) -> Vec<usize> {
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut called = vec![false; n];
    for &(s, t) in links {
        if s != t && s < n && t < n {
            out[s].push(t);
            called[t] = true;
        }
    }
    for o in &mut out {
        o.sort_unstable();
        o.dedup();
    }
    let mut walk = Walk {
        out: &out,
        state: vec![Mark::New; n],
        dag: vec![Vec::new(); n],
        finished: Vec::with_capacity(n),
    };
    let starts = (0..n).filter(|&v| !called[v]).chain(0..n);
    for v in starts {
        if walk.state[v] == Mark::New {
            walk.visit(v);
        }
    }
    // Reverse finishing order is a topological order of the edges kept.
    let mut layer = vec![0; n];
    for &v in walk.finished.iter().rev() {
        for &t in &walk.dag[v] {
            layer[t] = layer[t].max(layer[v] + 1);
        }
    }
    layer
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    New,
    OnPath,
    Done,
}

/// A depth-first walk that keeps every edge but those back to a node on the current path.
struct Walk<'a> {
    out: &'a [Vec<usize>],
    state: Vec<Mark>,
    dag: Vec<Vec<usize>>,
    finished: Vec<usize>,
}

impl Walk<'_> {
    fn visit(&mut self, v: usize) {
        self.state[v] = Mark::OnPath;
        for &t in &self.out[v] {
            match self.state[t] {
                Mark::New => {
                    self.dag[v].push(t);
                    self.visit(t);
                }
                Mark::Done => self.dag[v].push(t),
                // Closes a cycle: left out of the layering.
                Mark::OnPath => {}
            }
        }
        self.state[v] = Mark::Done;
        self.finished.push(v);
    }
}

/// A `--listen` the dashboard accepts: loopback only, the page has no authentication.
fn check_listen(listen: SocketAddr) -> anyhow::Result<()> {
    anyhow::ensure!(
        listen.ip().is_loopback(),
        "--listen must be a loopback address (127.0.0.1 or [::1]): the page shows the mesh's workloads and traces to anyone who can reach it and has no authentication; got {listen}"
    );
    Ok(())
}

/// Whether a request's `Host` names this machine's loopback: a browser sends the name it
/// resolved, so a page from elsewhere that rebinds its own name to 127.0.0.1 is refused.
fn host_allowed(host: Option<&str>) -> bool {
    let Some(host) = host else {
        // No browser omits Host: a plain HTTP/1.0 client on this machine.
        return true;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Page,
    Style,
    Script,
    Graph,
    Traces,
    NotFound,
    MethodNotAllowed,
}

/// The route for `method` and `path`: unknown paths are 404 whatever the method, known
/// ones answer GET only. Pure.
fn route(method: &Method, path: &str) -> Route {
    let r = match path {
        "/" | "/index.html" => Route::Page,
        "/dashboard.css" => Route::Style,
        "/dashboard.js" => Route::Script,
        "/api/graph" => Route::Graph,
        "/api/traces" => Route::Traces,
        _ => return Route::NotFound,
    };
    if method == Method::GET {
        r
    } else {
        Route::MethodNotAllowed
    }
}

/// What the request handlers share.
struct Shared {
    view: watch::Receiver<Arc<View>>,
    /// The control plane, for `/api/traces` (`None` with `--proxy`).
    admin: Option<SocketAddr>,
    http: HttpClient,
}

/// Runs `trellis dashboard` until Ctrl-C.
pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Err(e) = check_listen(args.listen) {
        eprintln!("trellis dashboard: {e}");
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    if args.interval < MIN_INTERVAL {
        eprintln!(
            "trellis dashboard: --interval must be at least {}, got {}",
            humantime::format_duration(MIN_INTERVAL),
            humantime::format_duration(args.interval)
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", args.listen))?;
    let local = listener.local_addr()?;
    let source = if args.proxies.is_empty() {
        Source::ControlPlane(args.admin)
    } else {
        Source::Proxies(args.proxies.clone())
    };
    let http = HttpClient::new();
    let (tx, rx) = watch::channel(Arc::new(View {
        generated_at_unix: None,
        window_seconds: 0.0,
        interval_seconds: args.interval.as_secs_f64(),
        source: source.describe(),
        traces_source: source.traces(),
        proxies: 0,
        errors: Vec::new(),
        trend: BTreeMap::new(),
        graph: Graph {
            nodes: Vec::new(),
            edges: Vec::new(),
        },
    }));
    println!(
        "trellis dashboard: open http://{local}/ (the service graph and golden metrics of {}, every {}; Ctrl-C to stop)",
        source.describe(),
        humantime::format_duration(args.interval)
    );
    tokio::spawn(scrape_loop(http.clone(), source.clone(), args.interval, tx));
    let shared = Arc::new(Shared {
        view: rx,
        admin: match source {
            Source::ControlPlane(a) => Some(a),
            Source::Proxies(_) => None,
        },
        http,
    });
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors, say: keep serving the connections we have.
                eprintln!("trellis dashboard: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, &req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Where the proxies to scrape come from.
#[derive(Debug, Clone)]
enum Source {
    /// The control plane's `/debug/proxies`, asked every scrape (proxies come and go).
    ControlPlane(SocketAddr),
    /// `--proxy`.
    Proxies(Vec<SocketAddr>),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Self::ControlPlane(a) => format!("the proxies of the control plane at {a}"),
            Self::Proxies(p) => {
                let list: Vec<String> = p.iter().map(ToString::to_string).collect();
                format!("proxies {}", list.join(", "))
            }
        }
    }

    /// Where traces come from, in words: the control plane, or nowhere with `--proxy`.
    fn traces(&self) -> Option<String> {
        match self {
            Self::ControlPlane(a) => Some(format!("the control plane at {a}")),
            Self::Proxies(_) => None,
        }
    }
}

/// Scrapes every `interval` and publishes the graph of the last two scrapes. Never ends
/// on an error: what failed goes into the view's `errors` (and once to stderr).
async fn scrape_loop(
    http: HttpClient,
    source: Source,
    interval: Duration,
    tx: watch::Sender<Arc<View>>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The control plane's last good list, used while it does not answer.
    let mut known: Vec<SocketAddr> = Vec::new();
    // The previous scrape: every sample, when, and which proxies answered.
    let mut last: Option<(Vec<Sample>, Instant, BTreeSet<SocketAddr>)> = None;
    let mut reported: BTreeSet<String> = BTreeSet::new();
    let mut trend: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    loop {
        ticker.tick().await;
        let mut errors = Vec::new();
        let proxies = match &source {
            Source::Proxies(p) => p.clone(),
            Source::ControlPlane(admin) => {
                match stat::proxies_of(&http, *admin).await {
                    Ok(p) => known = p,
                    Err(e) => errors.push(format!("{e:#}")),
                }
                if known.is_empty() && errors.is_empty() {
                    errors.push(format!(
                        "the control plane at {admin} lists no proxy with a loopback metrics address yet"
                    ));
                }
                known.clone()
            }
        };
        let mut all = Vec::new();
        // Only proxies read last time too: a proxy's first scrape holds everything since
        // it started, not one window's worth.
        let mut windowed = Vec::new();
        let mut ok = BTreeSet::new();
        for (p, got) in stat::scrape_each(&http, &proxies).await {
            match got {
                Ok(samples) => {
                    if last.as_ref().is_some_and(|(_, _, was)| was.contains(&p)) {
                        windowed.extend(samples.iter().cloned());
                    }
                    all.extend(samples);
                    ok.insert(p);
                }
                Err(e) => errors.push(format!("proxy {p}: {e:#}")),
            }
        }
        let now = Instant::now();
        let (g, secs) = match &last {
            Some((before, at, _)) => {
                let secs = now.duration_since(*at).as_secs_f64();
                (graph(before, &windowed, secs), secs)
            }
            // One scrape: every workload and edge, no rates yet.
            None => (graph(&all, &all, 0.0), 0.0),
        };
        for e in &errors {
            if !reported.contains(e) {
                eprintln!("trellis dashboard: {e}");
            }
        }
        reported = errors.iter().cloned().collect();
        if secs > 0.0 {
            push_trend(&mut trend, &g);
        }
        tx.send_replace(Arc::new(View {
            generated_at_unix: Some(unix_now()),
            window_seconds: secs,
            interval_seconds: interval.as_secs_f64(),
            source: source.describe(),
            traces_source: source.traces(),
            proxies: ok.len(),
            errors,
            trend: trend.clone(),
            graph: g,
        }));
        last = Some((all, now, ok));
    }
}

/// Answers one request.
async fn handle(
    shared: &Shared,
    req: &http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if !host_allowed(host) {
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            "the dashboard answers only requests addressed to localhost, 127.0.0.1 or [::1]\n"
                .into(),
        );
    }
    match route(req.method(), req.uri().path()) {
        Route::Page => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into()),
        Route::Style => reply(StatusCode::OK, "text/css; charset=utf-8", STYLE.into()),
        Route::Script => reply(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            SCRIPT.into(),
        ),
        Route::Graph => {
            let view = shared.view.borrow().clone();
            json(StatusCode::OK, &*view)
        }
        Route::Traces => traces(shared).await,
        Route::NotFound => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the dashboard serves / , /api/graph and /api/traces\n".into(),
        ),
        Route::MethodNotAllowed => {
            let mut r = reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "only GET\n".into(),
            );
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
            r
        }
    }
}

/// The control plane's recent traces, as it gives them (`[]` with `--proxy`: no control
/// plane to ask); 502 with `{"error"}` when it cannot be read.
async fn traces(shared: &Shared) -> http::Response<Full<Bytes>> {
    let Some(admin) = shared.admin else {
        return reply(StatusCode::OK, "application/json", "[]".into());
    };
    let got = shared
        .http
        .get(admin, "localhost", "/debug/traces")
        .await
        .with_context(|| format!("control plane admin {admin}"))
        .and_then(|r| {
            anyhow::ensure!(
                r.status.is_success(),
                "control plane {admin}: /debug/traces answered {}",
                r.status
            );
            // Only JSON goes to the page, whatever answered on that port.
            serde_json::from_str::<serde_json::Value>(&r.body)
                .with_context(|| format!("control plane {admin}: /debug/traces is not JSON"))?;
            Ok(r.body)
        });
    match got {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => json(
            StatusCode::BAD_GATEWAY,
            &serde_json::json!({ "error": format!("{e:#}") }),
        ),
    }
}

fn json(status: StatusCode, v: &impl Serialize) -> http::Response<Full<Bytes>> {
    match serde_json::to_string(v) {
        Ok(s) => reply(status, "application/json", s),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            format!("{e}\n"),
        ),
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> http::Response<Full<Bytes>> {
    let mut r = http::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    // Everything the page uses comes from here: no CDN, no font service, works offline.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    r
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three series of one request-duration histogram: every request in one bucket.
    fn series(kind: &str, src: &str, dst: &str, status: u16, count: f64, le: &str) -> String {
        let labels = format!(
            "http_request_method=\"GET\",http_response_status_code=\"{status}\",rpc_grpc_status_code=\"\",source_workload=\"{src}\",source_namespace=\"demo\",destination_workload=\"{dst}\",destination_namespace=\"demo\",proxy=\"x\""
        );
        let family = format!("http_{kind}_request_duration_seconds");
        format!(
            "{family}_bucket{{{labels},le=\"{le}\"}} {count}\n{family}_bucket{{{labels},le=\"+Inf\"}} {count}\n{family}_count{{{labels}}} {count}\n"
        )
    }

    fn samples(text: &str) -> Vec<Sample> {
        stat::parse(text).unwrap()
    }

    #[test]
    fn servers_and_callers_become_nodes_and_edges() {
        let before = samples(
            &(series("server", "client", "web", 200, 10.0, "0.001")
                + &series("client", "client", "web", 200, 10.0, "0.002")),
        );
        let after = samples(
            &(series("server", "client", "web", 200, 28.0, "0.001")
                + &series("server", "client", "web", 500, 2.0, "0.001")
                + &series("client", "client", "web", 200, 28.0, "0.002")
                + &series("client", "client", "web", 500, 2.0, "0.002")),
        );
        let g = graph(&before, &after, 2.0);
        let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["demo/client", "demo/web"]);
        let (client, web) = (&g.nodes[0], &g.nodes[1]);
        // A caller only: nothing served, so no golden metrics at all.
        assert_eq!(
            (
                client.requests,
                client.success,
                client.rps,
                client.p99,
                client.layer
            ),
            (None, None, None, None, 0)
        );
        assert_eq!(web.requests, Some(20.0));
        assert_eq!(web.success, Some(0.9));
        assert_eq!(web.rps, Some(10.0));
        assert!((web.p50.unwrap() - 0.0005).abs() < 1e-12, "{web:?}");
        assert!((web.p99.unwrap() - 0.00099).abs() < 1e-12, "{web:?}");
        assert_eq!(web.layer, 1);
        assert_eq!(g.edges.len(), 1, "{:?}", g.edges);
        let e = &g.edges[0];
        assert_eq!(
            (e.source.as_str(), e.target.as_str()),
            ("demo/client", "demo/web")
        );
        assert_eq!((e.requests, e.success, e.rps), (20.0, Some(0.9), 10.0));
        assert!((e.p99.unwrap() - 0.00198).abs() < 1e-12, "{e:?}");

        // The JSON the page reads: a caller-only node's metrics are null, not 0.
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v["nodes"][0]["id"], "demo/client");
        assert!(v["nodes"][0]["requests"].is_null(), "{v}");
        assert!(v["nodes"][0]["success"].is_null(), "{v}");
        assert_eq!(v["nodes"][1]["success"], 0.9);
        assert_eq!(v["edges"][0]["target"], "demo/web");
    }

    #[test]
    fn idle_workloads_and_unscraped_targets_stay_on_the_graph() {
        // web served nothing in this window; the client also called `api`, whose proxy
        // is not scraped.
        let text = series("server", "client", "web", 200, 5.0, "0.001")
            + &series("client", "client", "api", 200, 3.0, "0.001");
        let g = graph(&samples(&text), &samples(&text), 1.0);
        let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["demo/api", "demo/client", "demo/web"]);
        let web = &g.nodes[2];
        assert_eq!(
            (web.requests, web.rps, web.success, web.p50),
            (Some(0.0), Some(0.0), None, None)
        );
        // Not scraped as a server: no metrics, but a node for the edge to end at.
        assert_eq!(g.nodes[0].requests, None);
        assert_eq!(g.nodes[0].layer, 1);
        assert_eq!(g.edges.len(), 1);
        assert_eq!(
            (g.edges[0].requests, g.edges[0].success, g.edges[0].rps),
            (0.0, None, 0.0)
        );
        // The first scrape alone: the same workloads, no rates.
        let first = graph(&samples(&text), &samples(&text), 0.0);
        assert_eq!(first.nodes.len(), 3);
        assert!(graph(&[], &[], 0.0).nodes.is_empty());
    }

    #[test]
    fn trends_keep_the_last_windows_of_present_nodes() {
        let text = series("server", "client", "web", 200, 5.0, "0.001")
            + &series("client", "client", "web", 200, 5.0, "0.001");
        let (one, two) = (samples(&text), samples(&text.replace(" 5\n", " 9\n")));
        let busy = graph(&one, &two, 2.0);
        let idle = graph(&two, &two, 2.0);
        let mut trend = BTreeMap::new();
        trend.insert("demo/gone".to_owned(), vec![1.0]);
        push_trend(&mut trend, &busy);
        push_trend(&mut trend, &idle);
        assert_eq!(
            trend.keys().collect::<Vec<_>>(),
            ["demo/client", "demo/web"]
        );
        assert_eq!(trend["demo/web"], [2.0, 0.0]);
        assert_eq!(
            trend["demo/client"],
            [0.0, 0.0],
            "a caller only serves nothing"
        );
        for _ in 0..TREND_POINTS {
            push_trend(&mut trend, &busy);
        }
        assert_eq!(trend["demo/web"], vec![2.0; TREND_POINTS]);
    }

    #[test]
    fn layers_follow_the_longest_call_chain_and_survive_cycles() {
        // 0 -> 1 -> 2, 0 -> 2: 2 is two hops deep, not one.
        assert_eq!(layers(3, &[(0, 1), (1, 2), (0, 2)]), [0, 1, 2]);
        // A cycle 1 <-> 2 behind an entry 0; 3 stands alone; a self-call changes nothing.
        assert_eq!(layers(4, &[(0, 1), (1, 2), (2, 1), (2, 2)]), [0, 1, 2, 0]);
        // A cycle with no entry: broken at the lowest index, deterministically.
        assert_eq!(layers(3, &[(2, 0), (0, 1), (1, 2)]), [0, 1, 2]);
        assert_eq!(layers(3, &[(1, 2), (2, 0), (0, 1)]), [0, 1, 2]);
        assert!(layers(0, &[]).is_empty());
    }

    #[test]
    fn routes_and_methods() {
        assert_eq!(route(&Method::GET, "/"), Route::Page);
        assert_eq!(route(&Method::GET, "/api/graph"), Route::Graph);
        assert_eq!(route(&Method::GET, "/api/traces"), Route::Traces);
        assert_eq!(route(&Method::GET, "/dashboard.js"), Route::Script);
        assert_eq!(route(&Method::POST, "/api/graph"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::HEAD, "/"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::GET, "/api/nope"), Route::NotFound);
        assert_eq!(route(&Method::DELETE, "/metrics"), Route::NotFound);
    }

    #[test]
    fn only_loopback_listens_and_loopback_hosts_are_answered() {
        assert!(check_listen("127.0.0.1:9091".parse().unwrap()).is_ok());
        assert!(check_listen("[::1]:9091".parse().unwrap()).is_ok());
        let e = check_listen("0.0.0.0:9091".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("got 0.0.0.0:9091"), "{e}");
        assert!(check_listen("10.0.0.1:80".parse().unwrap()).is_err());
        for ok in [
            "localhost:9091",
            "127.0.0.1:9091",
            "[::1]:9091",
            "LOCALHOST",
            "127.0.0.2",
        ] {
            assert!(host_allowed(Some(ok)), "{ok}");
        }
        assert!(host_allowed(None));
        for bad in [
            "evil.example:9091",
            "evil.example",
            "10.0.0.1:9091",
            "[::2]:1",
            "",
        ] {
            assert!(!host_allowed(Some(bad)), "{bad}");
        }
    }

    #[test]
    fn the_page_needs_nothing_from_elsewhere() {
        for asset in [PAGE, STYLE, SCRIPT] {
            // The SVG namespace is a name, not something fetched.
            let asset = asset.replace("\"http://www.w3.org/2000/svg\"", "");
            for remote in ["http://", "https://", "//fonts.", "@import"] {
                assert!(!asset.contains(remote), "asset refers to {remote}");
            }
        }
        assert!(PAGE.contains("src=\"/dashboard.js\""));
        assert!(PAGE.contains("href=\"/dashboard.css\""));
    }
}
