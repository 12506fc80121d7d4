//! `trellis dashboard` against a live mesh: its JSON API while known traffic flows
//! (client -> web.demo, every answer a 200), its HTTP surface (404, 405, loopback only),
//! and the page as headless Chromium renders it: the DOM after the page's scripts ran, and
//! a screenshot that must be a real 1280x800 picture with the healthy graph in it.
//!
//! Chromium (Debian package `chromium`, installed by `.ci/run`) is required: the test
//! fails, never skips, without it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;
use trellis_e2e::mesh::bin;
use trellis_e2e::{free_port, http_get, http_request};

use crate::request_path::{loopback, start_mesh};

/// The page's "healthy" green (`--good` in dashboard.css): edges, node accents and
/// success figures at >= 99% are drawn in it.
const GOOD_GREEN: [u8; 3] = [0x1f, 0x9d, 0x55];
/// The header bar (`--bar` in dashboard.css).
const BAR_NAVY: [u8; 3] = [0x13, 0x20, 0x30];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_serves_the_live_graph_and_chromium_renders_it() {
    let chromium = chromium();
    let m = start_mesh().await;
    let traffic = Traffic::start(m.client.outbound);
    let work = tempfile::tempdir().unwrap();

    let listen = loopback(free_port());
    let stderr_log = work.path().join("dashboard.stderr");
    let mut dash = Command::new(bin("trellis"))
        .arg("dashboard")
        .args(["--proxy", &m.client.admin.to_string()])
        .args(["--proxy", &m.web.admin.to_string()])
        .args(["--listen", &listen.to_string(), "--interval", "500ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&stderr_log).unwrap()))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = || std::fs::read_to_string(&stderr_log).unwrap_or_default();
    // It tells the user where to look.
    let mut stdout = tokio::io::BufReader::new(dash.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
        .await
        .unwrap_or_else(|_| panic!("no URL printed within 10 s; stderr:\n{}", stderr()))
        .unwrap()
        .unwrap_or_default();
    let url = format!("http://{listen}/");
    assert!(first.contains(&url), "first line: {first}");

    // (a) The API: the edge and the server's golden metrics, computed over 0.5 s windows.
    let deadline = Instant::now() + Duration::from_secs(30);
    let graph = loop {
        let g = api_graph(listen).await;
        if shows_traffic(&g) {
            break g;
        }
        assert!(
            Instant::now() < deadline,
            "/api/graph never showed demo/client -> demo/web with traffic: {g:#}\nstderr:\n{}",
            stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(graph["errors"], serde_json::json!([]), "{graph:#}");
    assert_eq!(graph["proxies"], 2, "{graph:#}");
    let window = graph["window_seconds"].as_f64().unwrap();
    assert!((0.4..3.0).contains(&window), "window {window}: {graph:#}");
    let web = node(&graph, "demo/web");
    assert_eq!(web["namespace"], "demo");
    assert_eq!(web["name"], "web");
    assert_eq!(
        web["success"], 1.0,
        "every request was answered 200: {web:#}"
    );
    assert!(web["rps"].as_f64().unwrap() > 0.0, "{web:#}");
    let (p50, p95, p99) = (
        web["p50"].as_f64().unwrap(),
        web["p95"].as_f64().unwrap(),
        web["p99"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p95 && p95 <= p99, "{web:#}");
    assert_eq!(web["layer"], 1, "{graph:#}");
    // The client only calls: a node, with no golden metrics of its own.
    let client = node(&graph, "demo/client");
    for k in ["requests", "success", "rps", "p50", "p95", "p99"] {
        assert!(client[k].is_null(), "{k}: {client:#}");
    }
    assert_eq!(client["layer"], 0, "{graph:#}");
    let edges = graph["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 1, "{graph:#}");
    assert_eq!(edges[0]["success"], 1.0, "{graph:#}");
    assert!(edges[0]["p99"].as_f64().unwrap() > 0.0, "{graph:#}");
    assert_eq!(graph["nodes"].as_array().unwrap().len(), 2, "{graph:#}");

    // With --proxy there is no control plane to ask for traces.
    let (status, _, body) = http_get(listen, "localhost", "/api/traces").await.unwrap();
    assert_eq!((status, body), (200, Bytes::from_static(b"[]")));
    let (status, _, _) = http_get(listen, "localhost", "/api/nope").await.unwrap();
    assert_eq!(status, 404);
    let (status, headers, _) = http_request(
        listen,
        http::Method::POST,
        "localhost",
        "/api/graph",
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!((status, headers["allow"].to_str().unwrap()), (405, "GET"));
    // A page elsewhere that rebinds its name to 127.0.0.1 gets nothing.
    let (status, _, _) = http_get(listen, "evil.example", "/api/graph")
        .await
        .unwrap();
    assert_eq!(status, 403);
    let (status, headers, page) = http_get(listen, &listen.to_string(), "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        String::from_utf8_lossy(&page).contains("src=\"/dashboard.js\""),
        "{page:?}"
    );

    // (b) The page after its scripts ran, as Chromium built it.
    let dom = run_chromium(&chromium, work.path(), "dom", &["--dump-dom", &url]).await;
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        dom.contains(r#"<g class="node good" data-id="demo/web""#),
        "no healthy node for demo/web in the DOM:\n{dom}"
    );
    assert!(
        dom.contains(r#"<g class="node good" data-id="demo/client""#),
        "no node for demo/client in the DOM:\n{dom}"
    );
    let edge = element(
        &dom,
        r#"<g class="edge good active" data-source="demo/client" data-target="demo/web">"#,
        "</g></g>",
    )
    .unwrap_or_else(|| panic!("no active healthy edge demo/client -> demo/web:\n{dom}"));
    let label = text_of(
        element(edge, r#"<text class="edge-label""#, "</text>")
            .unwrap_or_else(|| panic!("the edge has no label: {edge}")),
    );
    assert!(
        label.starts_with("100% · ") && label.contains(" rps · p99 ") && label.ends_with(" ms"),
        "edge label: {label:?}"
    );
    let row = element(&dom, r#"<tr class="workload" data-id="demo/web">"#, "</tr>")
        .unwrap_or_else(|| panic!("no table row for demo/web:\n{dom}"));
    assert!(
        row.contains(r#"<td class="success good" data-value="1">100.00%</td>"#),
        "{row}"
    );
    let requests: f64 = element(row, r#"<td class="requests">"#, "</td>")
        .map(text_of)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no request count in {row}"));
    assert!(requests > 0.0, "{row}");
    let caller = element(
        &dom,
        r#"<tr class="workload" data-id="demo/client">"#,
        "</tr>",
    )
    .unwrap_or_else(|| panic!("no table row for demo/client:\n{dom}"));
    assert!(
        caller.contains(r#"<span class="tag">caller</span>"#),
        "{caller}"
    );
    assert!(
        dom.contains(r#"<section id="errors" class="errors" hidden="">"#),
        "the page shows errors:\n{dom}"
    );
    assert!(dom.contains(r#"<span id="updated">updated "#), "{dom}");

    // (c) A screenshot: a 1280x800 PNG with the page drawn in it.
    let png_path = work.path().join("dashboard.png");
    let shot = format!("--screenshot={}", png_path.display());
    run_chromium(&chromium, work.path(), "shot", &[&shot, &url]).await;
    let png = std::fs::read(&png_path).unwrap_or_else(|e| panic!("no screenshot: {e}"));
    let image = Png::decode(&png);
    assert_eq!((image.width, image.height), (1280, 800));
    let colours = image.colours();
    // A blank page is one colour; text, cards and the graph make hundreds.
    assert!(
        colours.len() > 200,
        "only {} colours: the page looks blank",
        colours.len()
    );
    assert!(
        colours.contains(&BAR_NAVY),
        "no header bar in the screenshot"
    );
    assert!(
        colours.contains(&GOOD_GREEN),
        "nothing drawn in the healthy green: no graph in the screenshot"
    );

    let (ok, failures) = traffic.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok > 0);
    // The dashboard ran the whole time.
    assert!(dash.try_wait().unwrap().is_none(), "stderr:\n{}", stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_refuses_to_listen_beyond_loopback() {
    let out = Command::new(bin("trellis"))
        .args(["dashboard", "--listen", &format!("0.0.0.0:{}", free_port())])
        .args(["--proxy", "127.0.0.1:1"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("trellis dashboard did not exit")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--listen must be a loopback address") && stderr.contains("0.0.0.0"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "printed a URL anyway");
}

/// GET /api/graph as JSON.
async fn api_graph(listen: SocketAddr) -> serde_json::Value {
    let (status, _, body) = http_get(listen, "localhost", "/api/graph").await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// The node `id` of a graph (panics, showing the graph, when absent).
fn node<'a>(graph: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    graph["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["id"] == id))
        .unwrap_or_else(|| panic!("no node {id}: {graph:#}"))
}

/// demo/web served requests in the window, all successfully, and the edge is there.
fn shows_traffic(g: &serde_json::Value) -> bool {
    let served = g["nodes"].as_array().is_some_and(|n| {
        n.iter().any(|n| {
            n["id"] == "demo/web"
                && n["requests"].as_f64().is_some_and(|r| r > 0.0)
                && n["success"] == 1.0
        })
    });
    let edge = g["edges"].as_array().is_some_and(|e| {
        e.iter().any(|e| {
            e["source"] == "demo/client"
                && e["target"] == "demo/web"
                && e["requests"].as_f64().is_some_and(|r| r > 0.0)
        })
    });
    served && edge
}

/// The text from `start` (which must occur in `text`) to the first `end` after it,
/// both included.
fn element<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)?;
    let len = text[from..].find(end)? + end.len();
    Some(&text[from..from + len])
}

/// Markup without its tags.
fn text_of(markup: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in markup.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// The `chromium` binary on PATH; the test fails, naming the fix, without it.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "chromium is missing: this test renders the dashboard in headless Chromium. Install it (`apt-get install -y chromium`; .ci/run does)"
            )
        })
}

/// Runs headless Chromium at 1280x800 with its own profile under `dir`, letting the
/// page's scripts run for a few seconds of virtual time; fails on a non-zero exit.
async fn run_chromium(
    chromium: &Path,
    dir: &Path,
    name: &str,
    args: &[&str],
) -> std::process::Output {
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--disable-gpu",
            // As root (CI containers) Chromium refuses to start with its sandbox.
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,800",
            "--virtual-time-budget=4000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join(format!("chromium-{name}")).display()
        ))
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .unwrap_or_else(|_| panic!("chromium {args:?} did not finish within 120 s"))
        .unwrap();
    assert!(
        out.status.success(),
        "chromium {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Requests from the client's app to web.demo every 20 ms until [`Traffic::finish`].
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(outbound: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            async move {
                let mut ticker = tokio::time::interval(Duration::from_millis(20));
                for i in 0u64.. {
                    ticker.tick().await;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match http_get(outbound, "web.demo", &format!("/dash/{i}")).await {
                        Ok((200, _, _)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((s, _, b)) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{s} {}", String::from_utf8_lossy(&b))),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                }
            }
        });
        Self {
            stop,
            ok,
            failures,
            task,
        }
    }

    /// Stops; returns the 200s and the other answers.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// An 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes), decoded.
struct Png {
    width: u32,
    height: u32,
    /// RGB per pixel, row by row.
    rgb: Vec<[u8; 3]>,
}

impl Png {
    fn decode(bytes: &[u8]) -> Self {
        use std::io::Read;
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "not a PNG: {:?}",
            &bytes[..bytes.len().min(8)]
        );
        let (mut ihdr, mut idat) = (None, Vec::new());
        let mut at = 8;
        while at + 8 <= bytes.len() {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let kind = &bytes[at + 4..at + 8];
            let data = &bytes[at + 8..at + 8 + len];
            match kind {
                b"IHDR" => ihdr = Some(data.to_vec()),
                b"IDAT" => idat.extend_from_slice(data),
                b"IEND" => break,
                _ => {}
            }
            at += 12 + len;
        }
        let ihdr = ihdr.expect("PNG without IHDR");
        let width = u32::from_be_bytes(ihdr[0..4].try_into().unwrap());
        let height = u32::from_be_bytes(ihdr[4..8].try_into().unwrap());
        let (depth, colour, interlace) = (ihdr[8], ihdr[9], ihdr[12]);
        let bpp = match (depth, colour, interlace) {
            (8, 2, 0) => 3,
            (8, 6, 0) => 4,
            other => panic!("PNG (depth, colour type, interlace) {other:?} not decoded here"),
        };
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&idat[..])
            .read_to_end(&mut raw)
            .unwrap();
        let stride = width as usize * bpp;
        assert_eq!(raw.len(), (stride + 1) * height as usize, "IDAT size");
        let mut prev = vec![0u8; stride];
        let mut rgb = Vec::with_capacity(width as usize * height as usize);
        for row in raw.chunks(stride + 1) {
            let (filter, line) = (row[0], &row[1..]);
            let mut cur = vec![0u8; stride];
            for i in 0..stride {
                let a = if i >= bpp { cur[i - bpp] } else { 0 };
                let b = prev[i];
                let c = if i >= bpp { prev[i - bpp] } else { 0 };
                let predicted = match filter {
                    0 => 0,
                    1 => a,
                    2 => b,
                    3 => ((u16::from(a) + u16::from(b)) / 2) as u8,
                    4 => paeth(a, b, c),
                    f => panic!("PNG filter {f}"),
                };
                cur[i] = line[i].wrapping_add(predicted);
            }
            rgb.extend(cur.chunks(bpp).map(|p| [p[0], p[1], p[2]]));
            prev = cur;
        }
        Self { width, height, rgb }
    }

    /// Every distinct colour in the picture.
    fn colours(&self) -> std::collections::HashSet<[u8; 3]> {
        self.rgb.iter().copied().collect()
    }
}

fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = i16::from(a) + i16::from(b) - i16::from(c);
    let (pa, pb, pc) = (
        (p - i16::from(a)).abs(),
        (p - i16::from(b)).abs(),
        (p - i16::from(c)).abs(),
    );
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}
