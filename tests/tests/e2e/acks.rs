//! Acks: the control plane knows, per service and per proxy, whether the latest config is
//! applied (`/debug/acks`, `/debug/proxies`), and `trellis check` reports it. A proxy that
//! cannot ack (stopped with SIGSTOP) shows up as pending until it catches up. Then the
//! discovery scope (`discovery.scope` in the mesh config): a proxy is sent only the
//! namespaces its scope allows, and a live edit of the scope widens its view.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use trellis_e2e::{ControlPlane, EchoServer, Launch, Proxy, free_port, http_get, wait_until};

use crate::request_path::loopback;

/// Services `web` and `client` in `demo`, with `client-1` and `web-1` as their workloads.
fn demo_mesh(client_in: SocketAddr, web1_in: SocketAddr) -> String {
    trellis_e2e::mesh_yaml(
        "demo",
        &["web", "client"],
        &[
            ("client-1", "client", "client", client_in),
            ("web-1", "web", "web", web1_in),
        ],
    )
}

/// GET `path` from an admin endpoint as JSON.
async fn get_json(admin: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let (status, _, body) = http_get(admin, "localhost", path).await?;
    ensure!(
        status == 200,
        "{path} answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).with_context(|| format!("parsing {path}"))
}

/// One service's entry in `/debug/acks`.
async fn service_acks(cp: &ControlPlane, service: &str) -> anyhow::Result<serde_json::Value> {
    let acks = get_json(cp.admin, "/debug/acks").await?;
    acks.as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == service)
        .cloned()
        .with_context(|| format!("{service} not in /debug/acks: {acks:#}"))
}

/// Polls (every 50 ms, up to `limit`) until `cond` holds on `/debug/acks` and
/// `/debug/proxies`; on timeout, fails with both as last seen.
async fn wait_for_acks(
    cp: &ControlPlane,
    limit: Duration,
    what: &str,
    cond: impl Fn(&serde_json::Value, &serde_json::Value) -> bool,
) -> anyhow::Result<(serde_json::Value, serde_json::Value)> {
    let end = tokio::time::Instant::now() + limit;
    loop {
        let acks = get_json(cp.admin, "/debug/acks").await?;
        let proxies = get_json(cp.admin, "/debug/proxies").await?;
        if cond(&acks, &proxies) {
            return Ok((acks, proxies));
        }
        if tokio::time::Instant::now() > end {
            bail!(
                "{what}: not within {limit:?}\n/debug/acks: {acks:#}\n/debug/proxies: {proxies:#}\ncontrol plane log:\n{}",
                cp.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn entry<'a>(acks: &'a serde_json::Value, service: &str) -> Option<&'a serde_json::Value> {
    acks.as_array()?.iter().find(|s| s["service"] == service)
}

fn all_synced(proxies: &serde_json::Value, count: usize) -> bool {
    proxies
        .as_array()
        .is_some_and(|a| a.len() == count && a.iter().all(|p| p["synced"] == true))
}

/// `trellis check --admin <cp>`: (succeeded, stdout).
async fn trellis_check(cp: &ControlPlane) -> anyhow::Result<(bool, String)> {
    let out = tokio::process::Command::new(trellis_e2e::mesh::bin("trellis"))
        .args(["check", "--admin", &cp.admin.to_string()])
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// Sends `signal` (`STOP`, `CONT`) to a proxy process.
async fn signal(proxy: &Proxy, signal: &str) -> anyhow::Result<()> {
    let status = tokio::process::Command::new("kill")
        .args([format!("-{signal}"), proxy.pid().to_string()])
        .status()
        .await?;
    ensure!(status.success(), "kill -{signal} {} failed", proxy.pid());
    Ok(())
}

/// The services a proxy holds, as `<namespace>/<name>`, from its admin `/config`.
async fn held_services(proxy: &Proxy) -> anyhow::Result<BTreeSet<String>> {
    let config = get_json(proxy.admin, "/config").await?;
    let services = config["discovery"]["services"]
        .as_array()
        .with_context(|| format!("{}: no discovery.services in {config:#}", proxy.name))?;
    Ok(services
        .iter()
        .map(|s| {
            format!(
                "{}/{}",
                s["key"]["namespace"].as_str().unwrap_or("?"),
                s["key"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// An endpoint added through the file source: the changed service's version moves on,
/// the other's does not; a proxy that cannot ack is named as pending (and `trellis check`
/// warns) until it resumes, then every proxy has applied it and check is all ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxy_acks_a_change_and_check_reports_it() -> anyhow::Result<()> {
    let (client_in, web1_in, web2_in) = (
        loopback(free_port()),
        loopback(free_port()),
        loopback(free_port()),
    );
    let cp = ControlPlane::start(&demo_mesh(client_in, web1_in)).await;
    let apps = [
        EchoServer::start("client-1").await,
        EchoServer::start("web-1").await,
        EchoServer::start("web-2").await,
    ];
    let client = Proxy::start(&cp, "client-1", "demo", "client", client_in, apps[0].addr).await;
    let web1 = Proxy::start(&cp, "web-1", "demo", "web", web1_in, apps[1].addr).await;
    let web2 = Proxy::start(&cp, "web-2", "demo", "web", web2_in, apps[2].addr).await;

    // All three connected and synced; both services applied by all three.
    let (before, proxies) = wait_for_acks(&cp, Duration::from_secs(10), "initial sync", |a, p| {
        all_synced(p, 3)
            && ["demo/web", "demo/client"]
                .iter()
                .all(|s| entry(a, s).is_some_and(|e| e["proxies"] == 3 && e["applied"] == 3))
    })
    .await?;
    assert_eq!(before.as_array().map(Vec::len), Some(2), "{before:#}");
    let version =
        |acks: &serde_json::Value, s: &str| entry(acks, s).and_then(|e| e["version"].as_u64());
    let web_v0 = version(&before, "demo/web").context("web version")?;
    let client_v0 = version(&before, "demo/client").context("client version")?;
    let view_v0 = proxies[0]["view_version"]
        .as_u64()
        .context("view_version")?;
    let (ok, text) = trellis_check(&cp).await?;
    assert!(ok, "{text}");
    assert!(
        text.contains("✔ config: 2 services applied by every proxy that receives them"),
        "{text}"
    );

    // client-1's proxy cannot read or ack while stopped; web-2 becomes an endpoint of web.
    signal(&client, "STOP").await?;
    std::fs::write(
        cp.config_dir().join("web-2.yaml"),
        format!(
            "apiVersion: local.trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: web-2, namespace: demo, labels: {{ app: web }} }}\nspec: {{ serviceAccount: web, meshAddress: \"{web2_in}\" }}\n"
        ),
    )?;
    let client_id = "client-1 (spiffe://cluster.local/ns/demo/sa/client)";
    let (pending, _) = wait_for_acks(
        &cp,
        Duration::from_secs(10),
        "web-1 and web-2 ack",
        |a, _| {
            entry(a, "demo/web").is_some_and(|e| {
                e["version"].as_u64() > Some(web_v0) && e["proxies"] == 3 && e["applied"] == 2
            })
        },
    )
    .await?;
    let web = entry(&pending, "demo/web").context("demo/web")?;
    let web_v1 = web["version"].as_u64().context("web version")?;
    assert_eq!(
        web["pending"],
        serde_json::json!([client_id]),
        "{pending:#}"
    );
    // Only the changed service moved: client-1 still holds every version of the other.
    let other = entry(&pending, "demo/client").context("demo/client")?;
    assert_eq!(other["version"].as_u64(), Some(client_v0), "{pending:#}");
    assert_eq!(other["applied"], 3, "{pending:#}");
    let (ok, text) = trellis_check(&cp).await?;
    assert!(ok, "pending is a warning, not a failure: {text}");
    assert!(
        text.contains(&format!(
            "‼ config: demo/web v{web_v1} applied by 2 of 3 proxies (pending: {client_id})"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "‼ proxies behind the latest configuration: {client_id} acked v"
        )),
        "{text}"
    );

    // Resumed, it applies the change and acks it: every proxy synced at the new version.
    signal(&client, "CONT").await?;
    let (after, proxies) =
        wait_for_acks(&cp, Duration::from_secs(10), "every proxy acks", |a, p| {
            all_synced(p, 3)
                && entry(a, "demo/web").is_some_and(|e| {
                    e["proxies"] == 3 && e["applied"] == 3 && e["pending"] == serde_json::json!([])
                })
        })
        .await?;
    assert_eq!(version(&after, "demo/web"), Some(web_v1), "{after:#}");
    assert_eq!(version(&after, "demo/client"), Some(client_v0), "{after:#}");
    let connected = proxies.as_array().map_or(0, Vec::len);
    for s in after.as_array().into_iter().flatten() {
        assert_eq!(s["proxies"], connected, "every proxy receives {s}");
    }
    for p in proxies.as_array().into_iter().flatten() {
        let view = p["view_version"].as_u64().context("view_version")?;
        assert!(view >= web_v1 && view > view_v0, "{p:#}");
        assert!(p["acked_version"].as_u64() >= Some(web_v1), "{p:#}");
    }
    // What the acks claim is what the proxies hold: web has both endpoints everywhere.
    for proxy in [&client, &web1, &web2] {
        let config = get_json(proxy.admin, "/config").await?;
        let services = config["discovery"]["services"]
            .as_array()
            .context("services")?;
        let web = services
            .iter()
            .find(|s| s["key"]["namespace"] == "demo" && s["key"]["name"] == "web")
            .with_context(|| format!("{}: no demo/web in {config:#}", proxy.name))?;
        let endpoints: BTreeSet<&str> = web["ports"][0]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["workload"].as_str())
            .collect();
        assert_eq!(
            endpoints,
            BTreeSet::from(["web-1", "web-2"]),
            "{}",
            proxy.name
        );
    }
    let (ok, text) = trellis_check(&cp).await?;
    assert!(ok, "{text}");
    assert!(
        text.contains("✔ 3 proxies connected, all on the latest configuration"),
        "{text}"
    );
    assert!(
        text.contains("✔ config: 2 services applied by every proxy that receives them"),
        "{text}"
    );
    assert!(!text.contains('‼') && !text.contains('✖'), "{text}");
    assert!(text.ends_with("\nStatus check results are ✔\n"), "{text}");
    Ok(())
}

/// A `trellis-config` ConfigMap whose `discovery` key is `discovery` (YAML, one line per
/// element of the slice).
fn scope_config(discovery: &[&str]) -> String {
    let indented: String = discovery.iter().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: trellis-config, namespace: trellis-system}}\ndata:\n  discovery: |\n{indented}"
    )
}

/// `api` in namespace `a` and `db` in namespace `b`, one workload each.
fn two_namespaces(api_in: SocketAddr, db_in: SocketAddr) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{ name: api, namespace: a }}
spec:
  selector: {{ app: api }}
  ports: [{{ name: http, port: 80, targetPort: 8080 }}]
---
apiVersion: v1
kind: Service
metadata: {{ name: db, namespace: b }}
spec:
  selector: {{ app: db }}
  ports: [{{ name: http, port: 80, targetPort: 8080 }}]
---
apiVersion: local.trellis.dev/v1alpha1
kind: Workload
metadata: {{ name: api-1, namespace: a, labels: {{ app: api }} }}
spec: {{ serviceAccount: api, meshAddress: "{api_in}" }}
---
apiVersion: local.trellis.dev/v1alpha1
kind: Workload
metadata: {{ name: db-1, namespace: b, labels: {{ app: db }} }}
spec: {{ serviceAccount: db, meshAddress: "{db_in}" }}
"#
    )
}

/// With `scope.default: []` each proxy holds only its own namespace; allowing `b` for `a`
/// in the running mesh config sends `a`'s proxy `b`'s service, and nothing new to `b`'s.
/// `/debug/acks` counts, per service, only the proxies whose scope includes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_scope_limits_what_a_proxy_is_sent() -> anyhow::Result<()> {
    let (api_in, db_in) = (loopback(free_port()), loopback(free_port()));
    let cp = ControlPlane::start_with(&two_namespaces(api_in, db_in), |dir| {
        let path = dir.join("trellis-config.yaml");
        std::fs::write(&path, scope_config(&["scope:", "  default: []"])).unwrap();
        Launch {
            args: vec!["--mesh-config".into(), path.display().to_string()],
            env: Vec::new(),
        }
    })
    .await;
    let api_app = EchoServer::start("api-1").await;
    let db_app = EchoServer::start("db-1").await;
    let api = Proxy::start(&cp, "api-1", "a", "api", api_in, api_app.addr).await;
    let db = Proxy::start(&cp, "db-1", "b", "db", db_in, db_app.addr).await;

    // Own namespace only. Ready means the first (full) view is applied, so this is what
    // each was sent, not a view still filling in.
    assert_eq!(held_services(&api).await?, set(&["a/api"]), "{}", cp.log());
    assert_eq!(held_services(&db).await?, set(&["b/db"]), "{}", cp.log());
    wait_for_acks(
        &cp,
        Duration::from_secs(10),
        "one proxy per service",
        |a, p| {
            all_synced(p, 2)
                && ["a/api", "b/db"]
                    .iter()
                    .all(|s| entry(a, s).is_some_and(|e| e["proxies"] == 1 && e["applied"] == 1))
        },
    )
    .await?;

    // The operator lets `a` see `b`: the running control plane re-reads the file.
    std::fs::write(
        cp.dir.path().join("trellis-config.yaml"),
        scope_config(&["scope:", "  default: []", "  namespaces:", "    a: [b]"]),
    )?;
    let widened = wait_until(Duration::from_secs(15), || async {
        held_services(&api)
            .await
            .is_ok_and(|s| s == set(&["a/api", "b/db"]))
    })
    .await;
    assert!(
        widened.is_ok(),
        "api-1 never received b/db: holds {:?}\ncontrol plane log:\n{}",
        held_services(&api).await?,
        cp.log()
    );
    let (acks, _) = wait_for_acks(
        &cp,
        Duration::from_secs(10),
        "b/db applied by both",
        |a, p| {
            all_synced(p, 2)
                && entry(a, "b/db").is_some_and(|e| e["proxies"] == 2 && e["applied"] == 2)
        },
    )
    .await?;
    assert_eq!(service_acks(&cp, "a/api").await?["proxies"], 1, "{acks:#}");
    // `b` has no entry, so its default (own namespace) still applies.
    assert_eq!(held_services(&db).await?, set(&["b/db"]));
    let (ok, text) = trellis_check(&cp).await?;
    assert!(ok, "{text}");
    assert!(
        text.contains("✔ config: 2 services applied by every proxy that receives them"),
        "{text}"
    );
    Ok(())
}
