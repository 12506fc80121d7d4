//! Switching the CA of a running mesh under load: from the local self-signed root to a
//! plug-in CA (the Istio `cacerts` layout in a directory, as a mounted Secret), with
//! 20-second leaves renewing all along. No request may fail; proxies started before,
//! during and after the switch all talk to each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use trellis_e2e::{ControlPlane, EchoServer, Proxy, free_port, http_get, wait_until};

use crate::request_path::{loopback, two_workloads};

const LEAF_TTL: &str = "20s";

fn mesh_config(ca: &str) -> String {
    let indented: String = ca.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: trellis-config, namespace: trellis-system}}\ndata:\n  ca: |\n{indented}"
    )
}

async fn metric(admin: std::net::SocketAddr, series: &str) -> Option<f64> {
    let (_, _, body) = http_get(admin, "localhost", "/metrics").await.ok()?;
    String::from_utf8_lossy(&body).lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Sends requests back to back from `client` to `web.demo` until `stop`, counting
/// successes and failures.
fn load(
    client: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            match http_get(client, "web.demo", &format!("/load/{i}")).await {
                Ok((200, _, _)) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    let what = match other {
                        Ok((s, _, b)) => format!("{s} {}", String::from_utf8_lossy(&b)),
                        Err(e) => e.to_string(),
                    };
                    failures.lock().unwrap().push(what);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_a_plugin_ca_under_load_fails_nothing() {
    let (client_in, web_in) = (loopback(free_port()), loopback(free_port()));
    let cp = ControlPlane::start_with(&two_workloads(client_in, web_in), |dir| {
        let path = dir.join("trellis-config.yaml");
        std::fs::write(&path, mesh_config("source: self-signed")).unwrap();
        vec![
            "--mesh-config".into(),
            path.display().to_string(),
            "--cert-max-ttl".into(),
            LEAF_TTL.into(),
        ]
    })
    .await;
    let ttl = ["--cert-ttl", LEAF_TTL];
    let web_app = EchoServer::start("web-1").await;
    let client_app = EchoServer::start("client-1").await;
    let web = Proxy::start_with(&cp, "web-1", "demo", "web", web_in, web_app.addr, &ttl).await;
    let client = Proxy::start_with(
        &cp,
        "client-1",
        "demo",
        "client",
        client_in,
        client_app.addr,
        &ttl,
    )
    .await;
    assert_eq!(metric(cp.admin, "trellis_ca_generation").await, Some(1.0));
    assert_eq!(metric(cp.admin, "trellis_ca_trust_roots").await, Some(1.0));

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let loader = load(
        client.outbound,
        stop.clone(),
        ok.clone(),
        failed.clone(),
        failures.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The operator creates a plug-in CA with `trellis ca` (the files of a `cacerts`
    // Secret), mounts it, and points the mesh config at it.
    let plugin_dir = cp.dir.path().join("cacerts");
    let out = std::process::Command::new(trellis_e2e::mesh::bin("trellis"))
        .args(["ca", "create-plugin", "--dir"])
        .arg(&plugin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let show = std::process::Command::new(trellis_e2e::mesh::bin("trellis"))
        .args(["ca", "show", "--dir"])
        .arg(&plugin_dir)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success(), "{shown}");
    assert!(
        shown.contains("CN=Trellis intermediate cluster.local"),
        "{shown}"
    );
    std::fs::write(
        cp.dir.path().join("trellis-config.yaml"),
        mesh_config(&format!(
            "source: secret\nsecret: {{path: {}}}\nreloadInterval: 1s\npropagation: 3s",
            plugin_dir.display()
        )),
    )
    .unwrap();

    // Step 1: both roots are pushed to the proxies before the new CA signs anything.
    wait_until(Duration::from_secs(10), || async {
        metric(cp.admin, "trellis_ca_trust_roots").await == Some(2.0)
    })
    .await
    .unwrap_or_else(|()| panic!("new roots never staged; log:\n{}", cp.log()));
    for p in [&web, &client] {
        wait_until(Duration::from_secs(10), || async {
            p.metric("trellis_proxy_trust_roots").await == Some(2.0)
        })
        .await
        .unwrap_or_else(|()| panic!("{} never got both roots; log:\n{}", p.name, p.log()));
    }

    // Step 2: the plug-in CA signs; every proxy re-issues from it.
    wait_until(Duration::from_secs(15), || async {
        metric(cp.admin, "trellis_ca_generation").await == Some(2.0)
    })
    .await
    .unwrap_or_else(|()| panic!("new CA never activated; log:\n{}", cp.log()));
    for p in [&web, &client] {
        wait_until(Duration::from_secs(10), || async {
            p.metric("trellis_proxy_ca_generation").await == Some(2.0)
        })
        .await
        .unwrap_or_else(|()| panic!("{} did not re-issue; log:\n{}", p.name, p.log()));
    }
    // A proxy started now bootstraps from the bundle file and talks to the others.
    let late_app = EchoServer::start("client-2").await;
    let late = Proxy::start_with(
        &cp,
        "client-2",
        "demo",
        "client",
        loopback(free_port()),
        late_app.addr,
        &ttl,
    )
    .await;
    assert_eq!(
        http_get(late.outbound, "web.demo", "/late")
            .await
            .unwrap()
            .0,
        200
    );

    // Step 3: once every old leaf has expired (20 s + 5 s margin), the old root leaves.
    wait_until(Duration::from_secs(40), || async {
        metric(cp.admin, "trellis_ca_trust_roots").await == Some(1.0)
    })
    .await
    .unwrap_or_else(|()| panic!("old root never retired; log:\n{}", cp.log()));
    for p in [&web, &client, &late] {
        wait_until(Duration::from_secs(10), || async {
            p.metric("trellis_proxy_trust_roots").await == Some(1.0)
        })
        .await
        .unwrap_or_else(|()| panic!("{} kept the old root; log:\n{}", p.name, p.log()));
    }
    let last_app = EchoServer::start("client-3").await;
    let last = Proxy::start_with(
        &cp,
        "client-3",
        "demo",
        "client",
        loopback(free_port()),
        last_app.addr,
        &ttl,
    )
    .await;
    assert_eq!(
        http_get(last.outbound, "web.demo", "/last")
            .await
            .unwrap()
            .0,
        200
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    loader.await.unwrap();

    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {:?}",
        ok + failed,
        failures.lock().unwrap()
    );
    assert!(ok > 500, "only {ok} requests ran");
    // Leaves renewed several times under load (20 s leaves over ~45 s).
    let issued = metric(cp.admin, "trellis_ca_certificates_issued_total")
        .await
        .unwrap();
    assert!(issued >= 10.0, "only {issued} certificates issued");
}
