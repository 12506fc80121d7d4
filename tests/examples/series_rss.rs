//! Proxy memory with 1,000 distinct request series (BENCHMARKS.md, "Telemetry cost").
//!
//! A control plane and two proxies on loopback (client-1 -> web.demo -> web-1); the
//! client sends 5 methods x 200 status codes (the app answers `?status=N`), which makes
//! 1,000 distinct label sets in each proxy's request families (`http_client_*` on the
//! client, `http_server_*` on web). Then 10 HTTPRoutes on web (`/r0` .. `/r9`) and 5
//! methods x 20 status codes through each: 1,000 more client series, each with its route
//! (the (source, destination, route) series of issue 6). Prints the RSS before and after
//! each phase.
//!
//! ```sh
//! cargo build --release --locked --bins
//! cargo run --release --locked -p trellis-e2e --example series_rss
//! ```

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use trellis_e2e::{ControlPlane, EchoServer, Proxy, free_port, http_get, http_request};

/// VmRSS of `pid`, KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

/// Distinct label sets of a request family on `admin`.
async fn series(admin: SocketAddr, family: &str) -> anyhow::Result<usize> {
    let (_, _, body) = http_get(admin, "localhost", "/metrics").await?;
    let prefix = format!("{family}_count{{");
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .count())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let lo = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let (client_in, web_in) = (lo(free_port()), lo(free_port()));
    let workloads = [
        ("web-1", "web", "web", web_in),
        ("client-1", "client", "client", client_in),
    ];
    let cp = ControlPlane::start(&trellis_e2e::mesh_yaml("demo", &["web"], &workloads)).await;
    let web_app = EchoServer::start("web-1").await;
    let client_app = EchoServer::start("client-1").await;
    let web = Proxy::start(&cp, "web-1", "demo", "web", web_in, web_app.addr).await;
    let client = Proxy::start(
        &cp,
        "client-1",
        "demo",
        "client",
        client_in,
        client_app.addr,
    )
    .await;

    // Warm: pools open, one series each, allocator settled.
    for _ in 0..200 {
        http_get(client.outbound, "web.demo", "/").await?;
    }
    let before = (rss_kib(client.pid())?, rss_kib(web.pid())?);
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
    for method in methods {
        for status in 200u16..400 {
            let m = http::Method::from_bytes(method.as_bytes())?;
            let (got, _, _) = http_request(
                client.outbound,
                m,
                "web.demo",
                &format!("/?status={status}"),
                Bytes::new(),
            )
            .await?;
            anyhow::ensure!(got == status, "{method} ?status={status} answered {got}");
        }
    }
    // Let the last responses be recorded, and the allocator settle.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let after = (rss_kib(client.pid())?, rss_kib(web.pid())?);
    let client_series = series(client.admin, "http_client_request_duration_seconds").await?;
    let web_series = series(web.admin, "http_server_request_duration_seconds").await?;

    // Phase 2: the same client through 10 routes.
    let routes: Vec<String> = (0..10)
        .map(|i| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                 metadata: {{ name: r{i}, namespace: demo }}\n\
                 spec:\n  parentRefs: [{{ group: \"\", kind: Service, name: web }}]\n  \
                 rules: [{{ matches: [{{ path: {{ type: PathPrefix, value: /r{i} }} }}], \
                 backendRefs: [{{ name: web, port: 80 }}] }}]\n"
            )
        })
        .collect();
    std::fs::write(cp.config_dir().join("routes.yaml"), routes.join("---\n"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while client.config().await["discovery"]["routes"]
        .as_array()
        .map_or(0, Vec::len)
        != 10
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the routes never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for i in 0..10 {
        for method in methods {
            for status in 200u16..220 {
                let m = http::Method::from_bytes(method.as_bytes())?;
                let (got, _, _) = http_request(
                    client.outbound,
                    m,
                    "web.demo",
                    &format!("/r{i}?status={status}"),
                    Bytes::new(),
                )
                .await?;
                anyhow::ensure!(
                    got == status,
                    "{method} /r{i}?status={status} answered {got}"
                );
            }
        }
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let routed = rss_kib(client.pid())?;
    let routed_series = series(client.admin, "http_client_request_duration_seconds").await?;
    println!("| proxy | request series | RSS before | RSS after | per series |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, n, b, a) in [
        ("client-1 (http_client_*)", client_series, before.0, after.0),
        ("web-1 (http_server_*)", web_series, before.1, after.1),
        (
            "client-1, through 10 routes (route x method x status)",
            routed_series - client_series,
            after.0,
            routed,
        ),
    ] {
        #[allow(clippy::cast_precision_loss)] // a display figure
        let per = (a.saturating_sub(b) as f64 * 1024.0) / n.max(1) as f64;
        println!(
            "| {name} | {n} | {:.1} MiB | {:.1} MiB | {per:.0} B |",
            b as f64 / 1024.0,
            a as f64 / 1024.0
        );
    }
    drop((client, web, cp));
    Ok(())
}
