//! `trellis tap` and `trellis top` against real proxies: the live request stream needs
//! the tap token, shows each request with both sides' workloads, and `top` ranks paths.

use std::time::Duration;

use trellis_e2e::{ControlPlane, EchoServer, Proxy, free_port, http_get};

use crate::request_path::{loopback, two_workloads};

struct Tapped {
    _cp: ControlPlane,
    client: Proxy,
    web: Proxy,
    _apps: (EchoServer, EchoServer),
    token_file: std::path::PathBuf,
}

async fn tapped_mesh() -> Tapped {
    let (client_in, web_in) = (loopback(free_port()), loopback(free_port()));
    let cp = ControlPlane::start(&two_workloads(client_in, web_in)).await;
    let token_file = cp.dir.path().join("tap-token");
    std::fs::write(&token_file, "tap-s3cret\n").unwrap();
    let flags = ["--tap-token-file", token_file.to_str().unwrap()];
    let web_app = EchoServer::start("web-1").await;
    let client_app = EchoServer::start("client-1").await;
    let web = Proxy::start_with(&cp, "web-1", "demo", "web", web_in, web_app.addr, &flags).await;
    let client = Proxy::start_with(
        &cp,
        "client-1",
        "demo",
        "client",
        client_in,
        client_app.addr,
        &flags,
    )
    .await;
    Tapped {
        _cp: cp,
        client,
        web,
        _apps: (web_app, client_app),
        token_file,
    }
}

fn trellis() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(trellis_e2e::mesh::bin("trellis"));
    c.kill_on_drop(true);
    c
}

/// Sends requests to `path` through the client proxy until `child` exits (at most 10 s).
async fn drive_until_exit(
    m: &Tapped,
    path: &str,
    child: tokio::process::Child,
) -> std::process::Output {
    let out = child.wait_with_output();
    tokio::pin!(out);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::select! {
            out = &mut out => return out.unwrap(),
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                assert!(tokio::time::Instant::now() < deadline, "the tap never finished");
                let (status, _, _) = http_get(m.client.outbound, "web.demo", path).await.unwrap();
                assert_eq!(status, 200);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_requests_to_token_holders_only() {
    let m = tapped_mesh().await;
    let child = trellis()
        .args(["tap", "--json", "--max", "3", "--direction", "inbound"])
        .args(["--proxy", &m.web.admin.to_string()])
        .args(["--proxy", &m.client.admin.to_string()])
        .arg("--token-file")
        .arg(&m.token_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = drive_until_exit(&m, "/tapped", child).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert_eq!(l["direction"], "inbound", "{l}");
        assert_eq!(l["source"], "demo/client", "{l}");
        assert_eq!(l["destination"], "demo/web", "{l}");
        assert_eq!(l["method"], "GET", "{l}");
        assert_eq!(l["path"], "/tapped", "{l}");
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["trace_id"].as_str().unwrap().len(), 32, "{l}");
    }

    // The wrong token: refused, and the CLI says so.
    let wrong = m.token_file.with_file_name("wrong-token");
    std::fs::write(&wrong, "nope").unwrap();
    let out = trellis()
        .args(["tap", "--proxy", &m.web.admin.to_string(), "--token-file"])
        .arg(&wrong)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_ranks_the_busiest_paths() {
    let m = tapped_mesh().await;
    let mut child = trellis()
        .args(["top", "--interval", "300ms", "--duration", "4s"])
        .args(["--proxy", &m.web.admin.to_string()])
        .arg("--token-file")
        .arg(&m.token_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read the tables as they come; warm up until the session shows a request, so the
    // known mix that follows is counted whole: /busy 3x as often as /rare.
    let mut stdout_pipe = child.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let warm = trellis_e2e::wait_until(Duration::from_secs(5), || async {
        http_get(m.client.outbound, "web.demo", "/warmup")
            .await
            .unwrap();
        seen.lock().unwrap().contains("/warmup")
    })
    .await;
    assert!(warm.is_ok(), "{}", seen.lock().unwrap());
    for i in 0..20 {
        let path = if i % 4 == 3 { "/rare" } else { "/busy" };
        let (status, _, _) = http_get(m.client.outbound, "web.demo", path).await.unwrap();
        assert_eq!(status, 200);
    }
    let out = child.wait_with_output().await.unwrap();
    reader.await.unwrap();
    let stdout = seen.lock().unwrap().clone();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The last table printed has every request.
    let last = stdout.rsplit("busiest paths").next().unwrap();
    let rows: Vec<&str> = last
        .lines()
        .filter(|l| l.starts_with("demo/") && !l.contains("/warmup"))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    let cells = |row: &str| {
        row.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (busy, rare) = (cells(rows[0]), cells(rows[1]));
    assert_eq!(
        busy[..5],
        ["demo/client", "demo/web", "GET", "/busy", "15"],
        "{stdout}"
    );
    assert_eq!(busy[8], "100.00%", "{stdout}");
    assert_eq!(
        rare[..5],
        ["demo/client", "demo/web", "GET", "/rare", "5"],
        "{stdout}"
    );
}
