//! Golden metrics after known traffic: exact request counts and status splits on both
//! sides, histogram buckets and body sizes, the mesh labels peers exchange (and that apps
//! can neither forge nor see), and `trellis stat` reading the same numbers.

use std::time::Duration;

use bytes::Bytes;
use trellis_e2e::{http_get, http_request, request_series, wait_until};

use crate::request_path::start_mesh;

/// Every sample line of `/metrics` on `admin`.
async fn scrape(admin: std::net::SocketAddr) -> String {
    let (_, _, body) = http_get(admin, "localhost", "/metrics").await.unwrap();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of the sample `series` in `text` (exact name and labels).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_metrics_count_known_traffic_exactly() {
    let m = start_mesh().await;
    // 7 GETs and 3 POSTs of 1000 bytes that succeed, 2 GETs the app answers 503.
    for _ in 0..7 {
        let (status, headers, _) = http_get(m.client.outbound, "web.demo", "/ok")
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert!(
            headers.get("trellis-dst-workload").is_none(),
            "the peer's workload header reached the app: {headers:?}"
        );
    }
    for _ in 0..3 {
        let body = Bytes::from(vec![b'x'; 1000]);
        let (status, _, _) = http_request(
            m.client.outbound,
            http::Method::POST,
            "web.demo",
            "/up",
            body,
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    }
    for _ in 0..2 {
        let (status, _, _) = http_get(m.client.outbound, "web.demo", "/fail?status=503")
            .await
            .unwrap();
        assert_eq!(status, 503);
    }
    // Headers the proxies exchange never reach the app.
    for r in m.web_app.received() {
        for h in ["trellis-src-workload", "trellis-dst-service"] {
            assert!(
                r.headers.get(h).is_none(),
                "{h} reached the app: {:?}",
                r.headers
            );
        }
    }

    let get_ok = request_series("server", "client", "web", "demo", 200);
    let post_ok = get_ok.replace(
        "http_request_method=\"GET\"",
        "http_request_method=\"POST\"",
    );
    let get_503 = request_series("server", "client", "web", "demo", 503);
    // Recorded as each response ends: wait for the last one.
    let settled = wait_until(Duration::from_secs(5), || async {
        let text = scrape(m.web.admin).await;
        value(&text, &get_503) == Some(2.0)
    })
    .await;
    let server = scrape(m.web.admin).await;
    assert!(settled.is_ok(), "{server}");
    assert_eq!(value(&server, &get_ok), Some(7.0), "{server}");
    assert_eq!(value(&server, &post_ok), Some(3.0), "{server}");
    assert_eq!(value(&server, &get_503), Some(2.0), "{server}");
    // The calling side counts the same requests under the same labels.
    let client = scrape(m.client.admin).await;
    let as_client = |s: &str| s.replacen("http_server_", "http_client_", 1);
    assert_eq!(value(&client, &as_client(&get_ok)), Some(7.0), "{client}");
    assert_eq!(value(&client, &as_client(&post_ok)), Some(3.0), "{client}");
    assert_eq!(value(&client, &as_client(&get_503)), Some(2.0), "{client}");

    // Buckets are populated and add up: `+Inf` holds every request; a loopback hop is
    // well under 16 s, so the last finite bucket does too.
    let labels = get_ok
        .strip_prefix("http_server_request_duration_seconds_count{")
        .and_then(|l| l.strip_suffix('}'))
        .unwrap();
    let bucket = |le: &str| {
        value(
            &server,
            &format!("http_server_request_duration_seconds_bucket{{le=\"{le}\",{labels}}}"),
        )
    };
    assert_eq!(bucket("+Inf"), Some(7.0), "{server}");
    assert_eq!(bucket("16.384"), Some(7.0), "{server}");
    // Body sizes: the POSTs carried 3 x 1000 bytes; each GET's answer is
    // `hello from web-1 /ok`.
    let post_labels = labels.replace("\"GET\"", "\"POST\"");
    let size = |family: &str, l: &str| {
        value(
            &server,
            &format!("http_server_{family}_body_size_bytes_sum{{{l}}}"),
        )
    };
    assert_eq!(size("request", &post_labels), Some(3000.0), "{server}");
    assert_eq!(
        size("response", labels),
        Some(7.0 * "hello from web-1 /ok".len() as f64),
        "{server}"
    );
    assert_eq!(size("request", labels), Some(0.0), "{server}");

    // The access lines, written as each response ended (flushed every 50 ms), carry
    // the body sizes.
    let posts = || -> Vec<String> {
        m.web
            .access_log()
            .into_iter()
            .filter(|l| l.contains("method=POST"))
            .collect()
    };
    let _ = wait_until(Duration::from_secs(5), || async { posts().len() >= 3 }).await;
    let posts = posts();
    assert_eq!(posts.len(), 3, "{posts:?}");
    let sent = format!("bytes_sent={} ", "hello from web-1 /up".len());
    for l in &posts {
        assert!(
            l.contains(&sent) && l.contains("bytes_received=1000 "),
            "{l}"
        );
    }

    // `trellis stat` reads the same numbers.
    let out = tokio::process::Command::new(trellis_e2e::mesh::bin("trellis"))
        .args(["stat", "--since-start", "--json"])
        .args(["--proxy", &m.web.admin.to_string()])
        .args(["--proxy", &m.client.admin.to_string()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["namespace"], "demo");
    assert_eq!(rows[0]["name"], "web");
    assert_eq!(rows[0]["requests"], 12.0);
    assert_eq!(rows[0]["success"], 10.0 / 12.0);
    let out = tokio::process::Command::new(trellis_e2e::mesh::bin("trellis"))
        .args(["stat", "--since-start", "--by", "edge"])
        .args(["--proxy", &m.client.admin.to_string()])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("demo       demo/client -> demo/web  83.33%"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_cannot_forge_the_workload_labels() {
    let m = start_mesh().await;
    // The client app claims to be someone else; the web app claims to be someone else.
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::get(format!("http://{}/x?forge=1", m.client.outbound))
        .header("host", "web.demo")
        .header("trellis-src-workload", "forged")
        .header("trellis-dst-service", "forged.forged")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("trellis-dst-workload").is_none());
    let server = request_series("server", "client", "web", "demo", 200);
    let client_side = request_series("client", "client", "web", "demo", 200);
    let counted = wait_until(Duration::from_secs(5), || async {
        m.web.metric(&server).await == Some(1.0) && m.client.metric(&client_side).await == Some(1.0)
    })
    .await;
    assert!(
        counted.is_ok(),
        "server side:\n{}\nclient side:\n{}",
        scrape(m.web.admin).await,
        scrape(m.client.admin).await
    );
    for text in [scrape(m.web.admin).await, scrape(m.client.admin).await] {
        assert!(!text.contains("forged"), "{text}");
    }
}
