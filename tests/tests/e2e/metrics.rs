//! `docs/metrics.md` against what the binaries really expose: the control plane and both
//! proxies of a local mesh (with the admission webhook on, one request through the mesh, one
//! plaintext client on a proxy's mTLS port, one admission review and one certificate request
//! with a bad token, so the families that only appear once counted appear), then a control
//! plane on the Kubernetes API stand-in. Every family in a `# TYPE` line must have a row in
//! its process's section with the same type; every row must be exposed in the runs its
//! `present` column names (unless it is marked `after the first event`) and in no other;
//! every label seen must be documented, and its value listed where the row lists values.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_e2e::{ControlPlane, EchoServer, Launch, Proxy, free_port, http_get, wait_until};
use trellis_kube::stand_in::ApiStandIn;

use crate::request_path::{loopback, two_workloads};

/// The document under test, as compiled in (a change to it rebuilds this test).
const DOC: &str = include_str!("../../../docs/metrics.md");

/// The name `--webhook-dns-names` defaults to; the test certificate is made for it.
const WEBHOOK_DNS_NAME: &str = "trellis-webhook.trellis-system.svc";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Process {
    Proxy,
    ControlPlane,
}

/// When a family is registered (the doc's `present` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Presence {
    /// `always`.
    Always,
    /// `local profile`: `--config-dir` without `--kubernetes`.
    Files,
    /// `--kubernetes`.
    Kubernetes,
    /// `--webhook-listen`.
    Webhook,
    /// `transparent mode` (`trellis-proxy --mode transparent`): never in these runs.
    Transparent,
}

impl Presence {
    /// As the doc's `present` column writes it.
    fn doc(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Files => "local profile",
            Self::Kubernetes => "`--kubernetes`",
            Self::Webhook => "`--webhook-listen`",
            Self::Transparent => "transparent mode",
        }
    }
}

/// One row of a metrics table.
#[derive(Debug)]
struct Row {
    process: Process,
    /// As the samples name it: counters with `_total`, histograms without a suffix.
    name: String,
    kind: String,
    /// Label name -> its values, when the row lists them all (`None`: described in words).
    labels: BTreeMap<String, Option<BTreeSet<String>>>,
    presence: Presence,
    /// `after the first event`: no series, hence no family, until something is counted.
    lazy: bool,
}

/// One family of a scrape: its type and every label value seen in its samples.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeMap<String, BTreeSet<String>>,
}

/// One `/metrics` body: exposed name (as in [`Row::name`]) -> family.
type Scrape = BTreeMap<String, Family>;

/// Parses every table row whose first cell is a backticked metric name, under `## Proxy`
/// or `## Control plane`. Columns: metric, type, labels, unit, present, meaning.
fn parse_doc(doc: &str) -> anyhow::Result<Vec<Row>> {
    let mut process = None;
    let mut rows: Vec<Row> = Vec::new();
    for (i, line) in doc.lines().enumerate() {
        let at = i + 1;
        if let Some(heading) = line.strip_prefix("## ") {
            process = if heading.starts_with("Proxy") {
                Some(Process::Proxy)
            } else if heading.starts_with("Control plane") {
                Some(Process::ControlPlane)
            } else {
                None
            };
            continue;
        }
        let Some(inner) = line.strip_prefix('|') else {
            continue;
        };
        let cells: Vec<&str> = inner.split('|').map(str::trim).collect();
        let Some(name) = cells
            .first()
            .and_then(|c| c.strip_prefix('`'))
            .and_then(|c| c.strip_suffix('`'))
            .filter(|n| n.starts_with("trellis_") || n.starts_with("http_"))
        else {
            continue;
        };
        let process = process.with_context(|| {
            format!("line {at}: a metric row outside the Proxy and Control plane sections")
        })?;
        ensure!(
            cells.len() == 7 && cells[6].is_empty(),
            "line {at}: expected 6 cells (metric, type, labels, unit, present, meaning): {line}"
        );
        let kind = cells[1].to_owned();
        ensure!(
            ["counter", "gauge", "histogram"].contains(&kind.as_str()),
            "line {at}: type {kind:?} is not counter, gauge or histogram"
        );
        let (mode, lazy) = match cells[4].strip_suffix(", after the first event") {
            Some(mode) => (mode, true),
            None => (cells[4], false),
        };
        let presence = [
            Presence::Always,
            Presence::Files,
            Presence::Kubernetes,
            Presence::Webhook,
            Presence::Transparent,
        ]
        .into_iter()
        .find(|p| p.doc() == mode)
        .with_context(|| format!("line {at}: unknown present value {mode:?}"))?;
        let name = name.to_owned();
        ensure!(
            !rows.iter().any(|r| r.name == name),
            "line {at}: {name} documented twice"
        );
        rows.push(Row {
            process,
            labels: parse_labels(cells[2]).with_context(|| format!("line {at}: labels"))?,
            name,
            kind,
            presence,
            lazy,
        });
    }
    Ok(rows)
}

/// `none`, or `` `a`: `x`, `y`; `b`: words `` (backticked values only: the full set).
fn parse_labels(cell: &str) -> anyhow::Result<BTreeMap<String, Option<BTreeSet<String>>>> {
    let mut labels = BTreeMap::new();
    if cell == "none" {
        return Ok(labels);
    }
    for entry in cell.split(';') {
        let (name, values) = entry
            .trim()
            .split_once(':')
            .with_context(|| format!("{entry:?} is not `name`: values"))?;
        let name = backticked(name.trim()).with_context(|| format!("label name in {entry:?}"))?;
        let listed: Option<BTreeSet<String>> = values
            .split(',')
            .map(|v| backticked(v.trim()).map(str::to_owned))
            .collect();
        labels.insert(name.to_owned(), listed);
    }
    Ok(labels)
}

fn backticked(s: &str) -> Option<&str> {
    s.strip_prefix('`')?
        .strip_suffix('`')
        .filter(|v| !v.is_empty() && !v.contains('`'))
}

/// Parses the text exposition: families from `# TYPE`, labels from the samples.
fn parse_scrape(body: &str) -> anyhow::Result<Scrape> {
    let mut families = Scrape::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context(line.to_owned())?;
            let exposed = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            let family = Family {
                kind: kind.to_owned(),
                ..Family::default()
            };
            ensure!(
                families.insert(exposed, family).is_none(),
                "{name} typed twice"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).context(line.to_owned())?;
        let sample = &line[..end];
        let family = if families.contains_key(sample) {
            sample.to_owned()
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| sample.strip_suffix(s))
                .filter(|f| families.get(*f).is_some_and(|f| f.kind == "histogram"))
                .with_context(|| format!("sample of no typed family: {line}"))?
                .to_owned()
        };
        let labels = match line[end..].strip_prefix('{') {
            Some(rest) => parse_sample_labels(rest).with_context(|| line.to_owned())?,
            None => Vec::new(),
        };
        let family = families.get_mut(&family).context("family")?;
        for (k, v) in labels {
            if !(family.kind == "histogram" && k == "le") {
                family.labels.entry(k).or_default().insert(v);
            }
        }
    }
    Ok(families)
}

/// `a="x",b="y"} 1` -> `[(a, x), (b, y)]`.
fn parse_sample_labels(mut rest: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut labels = Vec::new();
    loop {
        if rest.starts_with('}') {
            return Ok(labels);
        }
        let (name, after) = rest.split_once("=\"").context("label without =\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let close = loop {
            match chars.next().context("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => value.extend(chars.next().map(|(_, c)| c)),
                (_, c) => value.push(c),
            }
        };
        labels.push((name.to_owned(), value));
        rest = after[close + 1..].trim_start_matches(',');
    }
}

/// Checks the scrapes of one run against the doc. `modes` holds [`Presence::Always`] and
/// the run's other modes; only the processes in `scrapes` are checked.
fn check(rows: &[Row], modes: &[Presence], scrapes: &[(Process, &str, &Scrape)]) -> Vec<String> {
    let mut errors = Vec::new();
    for (process, what, scrape) in scrapes {
        for (name, family) in scrape.iter() {
            let Some(row) = rows
                .iter()
                .find(|r| r.process == *process && r.name == *name)
            else {
                errors.push(format!(
                    "{what}: {name} ({}) is not documented under {process:?}",
                    family.kind
                ));
                continue;
            };
            if row.kind != family.kind {
                errors.push(format!(
                    "{what}: {name} is a {}, documented as a {}",
                    family.kind, row.kind
                ));
            }
            for (label, values) in &family.labels {
                match row.labels.get(label) {
                    None => errors.push(format!("{what}: {name}: label {label} not documented")),
                    Some(Some(listed)) => {
                        for v in values.difference(listed) {
                            errors.push(format!("{what}: {name}: {label}={v:?} not documented"));
                        }
                    }
                    Some(None) => {}
                }
            }
        }
    }
    let processes: BTreeSet<Process> = scrapes.iter().map(|(p, _, _)| *p).collect();
    for row in rows.iter().filter(|r| processes.contains(&r.process)) {
        let expected = modes.contains(&row.presence);
        for (_, what, scrape) in scrapes.iter().filter(|(p, _, _)| *p == row.process) {
            match (expected, scrape.contains_key(&row.name)) {
                (true, false) if !row.lazy => errors.push(format!(
                    "{what}: {} is documented as present ({}) but was not exposed",
                    row.name,
                    row.presence.doc()
                )),
                (false, true) => errors.push(format!(
                    "{what}: {} is documented as present only with {} but was exposed",
                    row.name,
                    row.presence.doc()
                )),
                _ => {}
            }
        }
    }
    errors
}

async fn scrape(admin: SocketAddr) -> anyhow::Result<Scrape> {
    let (status, _, body) = http_get(admin, "localhost", "/metrics").await?;
    let body = String::from_utf8_lossy(&body);
    ensure!(
        status == 200,
        "/metrics on {admin} answered {status}: {body}"
    );
    parse_scrape(&body).with_context(|| format!("/metrics on {admin}:\n{body}"))
}

/// Waits (up to 5 s) until `series` (a sample name with its labels) is exposed on `admin`.
async fn wait_for_series(
    admin: SocketAddr,
    series: &str,
    log: impl Fn() -> String,
) -> anyhow::Result<()> {
    let exposed = wait_until(Duration::from_secs(5), || async {
        let Ok((_, _, body)) = http_get(admin, "localhost", "/metrics").await else {
            return false;
        };
        String::from_utf8_lossy(&body)
            .lines()
            .any(|l| l.rsplit_once(' ').is_some_and(|(name, _)| name == series))
    })
    .await;
    ensure!(
        exposed.is_ok(),
        "{series} never exposed on {admin}; log:\n{}",
        log()
    );
    Ok(())
}

/// A CA, and a webhook serving certificate for [`WEBHOOK_DNS_NAME`] it signed, written as
/// PEM to `dir`: (CA certificate, `--webhook-cert`, `--webhook-key`).
fn webhook_cert(
    dir: &std::path::Path,
) -> anyhow::Result<(rustls_pki_types::CertificateDer<'static>, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec![WEBHOOK_DNS_NAME.to_owned()])?.signed_by(&key, &ca)?;
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, leaf.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((
        ca.der().clone(),
        cert_path.display().to_string(),
        key_path.display().to_string(),
    ))
}

/// POSTs `{}` (not an AdmissionReview: counted as `invalid`) to the webhook over TLS.
async fn invalid_review(
    addr: SocketAddr,
    ca: rustls_pki_types::CertificateDer<'static>,
) -> anyhow::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(WEBHOOK_DNS_NAME)?;
    let mut tls = connector
        .connect(name, tokio::net::TcpStream::connect(addr).await?)
        .await?;
    tls.write_all(
        format!(
            "POST /validate HTTP/1.1\r\nHost: {WEBHOOK_DNS_NAME}\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        )
        .as_bytes(),
    )
    .await?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// Writes a few plaintext bytes to a proxy's mTLS port and waits for it to hang up.
async fn plaintext_client(inbound: SocketAddr) -> anyhow::Result<()> {
    let mut tcp = tokio::net::TcpStream::connect(inbound).await?;
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await?;
    let mut rest = Vec::new();
    // Closed (or reset) by the proxy; the bytes never reach the app.
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await?;
    Ok(())
}

/// A `trellis-proxy` whose token is not a JWT: its certificate request is refused. Never
/// ready; killed when dropped.
fn proxy_with_bad_token(cp: &ControlPlane) -> anyhow::Result<tokio::process::Child> {
    let token = cp.dir.path().join("bad.jwt");
    std::fs::write(&token, "not-a-token")?;
    let log = std::fs::File::create(cp.dir.path().join("logs/bad-token.log"))?;
    let addr = || loopback(free_port()).to_string();
    Ok(
        tokio::process::Command::new(trellis_e2e::mesh::bin("trellis-proxy"))
            .args(["--control-plane", &cp.grpc.to_string()])
            .arg("--ca-roots")
            .arg(cp.root_pem())
            .arg("--token-file")
            .arg(&token)
            .args([
                "--namespace",
                "demo",
                "--service-account",
                "bad",
                "--workload",
                "bad-1",
            ])
            .args([
                "--outbound",
                &addr(),
                "--inbound",
                &addr(),
                "--admin",
                &addr(),
            ])
            .args(["--app", &addr()])
            .stdout(std::process::Stdio::from(log.try_clone()?))
            .stderr(std::process::Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?,
    )
}

/// The local profile with the admission webhook: control plane, `client-1` -> `web-1`, and
/// the events that make the late families appear; every family of all three documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_a_local_mesh_is_documented() -> anyhow::Result<()> {
    let rows = parse_doc(DOC)?;
    let certs = tempfile::tempdir()?;
    let (webhook_ca, cert_path, key_path) = webhook_cert(certs.path())?;
    let webhook = loopback(free_port());
    let (client_in, web_in) = (loopback(free_port()), loopback(free_port()));
    let cp = ControlPlane::start_with(&two_workloads(client_in, web_in), |_| Launch {
        args: vec![
            "--webhook-listen".into(),
            webhook.to_string(),
            "--webhook-cert".into(),
            cert_path,
            "--webhook-key".into(),
            key_path,
        ],
        env: Vec::new(),
    })
    .await;
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

    // The families that appear only once something is counted.
    let _bad = proxy_with_bad_token(&cp)?;
    let (status, _, _) = http_get(client.outbound, "web.demo", "/metrics-doc").await?;
    ensure!(status == 200, "request through the mesh answered {status}");
    plaintext_client(web.inbound).await?;
    let response = invalid_review(webhook, webhook_ca).await?;
    ensure!(
        response.starts_with("HTTP/1.1 400"),
        "webhook answered {response}"
    );
    let requests = |kind: &str| trellis_e2e::request_series(kind, "client", "web", "demo", 200);
    wait_for_series(client.admin, &requests("client"), || client.log()).await?;
    wait_for_series(web.admin, &requests("server"), || web.log()).await?;
    let refused = r#"trellis_proxy_tls_handshake_failures_total{direction="inbound"}"#;
    wait_for_series(web.admin, refused, || web.log()).await?;
    let reviews = r#"trellis_webhook_reviews_total{result="invalid"}"#;
    wait_for_series(cp.admin, reviews, || cp.log()).await?;
    let failed = r#"trellis_ca_requests_failed_total{reason="unauthenticated"}"#;
    wait_for_series(cp.admin, failed, || cp.log()).await?;

    let (cp_scrape, client_scrape, web_scrape) = (
        scrape(cp.admin).await?,
        scrape(client.admin).await?,
        scrape(web.admin).await?,
    );
    let errors = check(
        &rows,
        &[Presence::Always, Presence::Files, Presence::Webhook],
        &[
            (Process::ControlPlane, "control plane", &cp_scrape),
            (Process::Proxy, "client-1 proxy", &client_scrape),
            (Process::Proxy, "web-1 proxy", &web_scrape),
        ],
    );
    ensure!(
        errors.is_empty(),
        "docs/metrics.md disagrees with the local mesh:\n{}",
        errors.join("\n")
    );
    Ok(())
}

/// `--kubernetes` on the API stand-in (no webhook): the control plane's families.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_a_kubernetes_control_plane_is_documented() -> anyhow::Result<()> {
    let rows = parse_doc(DOC)?;
    let api = ApiStandIn::default();
    api.apply_json(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "trellis-system"},
    }))?;
    let https = api.serve_https().await?;
    let kubeconfig = https.kubeconfig();
    let kubeconfig_dir = tempfile::tempdir()?;
    let kubeconfig_path = kubeconfig_dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig)?;
    let cp = ControlPlane::start_kubernetes(|_| Launch {
        args: Vec::new(),
        env: vec![
            (
                "KUBECONFIG".to_owned(),
                kubeconfig_path.display().to_string(),
            ),
            ("POD_NAME".to_owned(), "trellis-controller-0".to_owned()),
        ],
    })
    .await;
    let cp_scrape = scrape(cp.admin).await?;
    let errors = check(
        &rows,
        &[Presence::Always, Presence::Kubernetes],
        &[(Process::ControlPlane, "control plane", &cp_scrape)],
    );
    ensure!(
        errors.is_empty(),
        "docs/metrics.md disagrees with a --kubernetes control plane:\n{}",
        errors.join("\n")
    );
    Ok(())
}

/// The check itself fails on drift: an undocumented family, a wrong type, an undocumented
/// label value, and a documented family that is missing.
#[test]
fn the_check_reports_drift() -> anyhow::Result<()> {
    let rows = parse_doc(
        "## Proxy\n\n| metric | type | labels | unit | present | meaning |\n| --- | --- | --- | --- | --- | --- |\n\
         | `trellis_proxy_a_total` | counter | `direction`: `inbound`, `outbound` | requests | always | a |\n\
         | `trellis_proxy_b` | gauge | none | 1 | always | b |\n\
         | `trellis_proxy_k` | gauge | none | 1 | `--kubernetes` | k |\n\
         | `trellis_proxy_h` | histogram | none | seconds | `--kubernetes` | h |\n",
    )?;
    let scrape = parse_scrape(
        "# HELP trellis_proxy_a A.\n# TYPE trellis_proxy_a counter\n\
         trellis_proxy_a_total{direction=\"sideways\"} 1\n\
         # TYPE trellis_proxy_new histogram\ntrellis_proxy_new_bucket{le=\"+Inf\"} 0\n\
         # TYPE trellis_proxy_k counter\ntrellis_proxy_k_total 0\n# EOF\n",
    )?;
    let errors = check(
        &rows,
        &[Presence::Always],
        &[(Process::Proxy, "proxy", &scrape)],
    );
    let expected = [
        "proxy: trellis_proxy_a_total: direction=\"sideways\" not documented",
        "proxy: trellis_proxy_k_total (counter) is not documented under Proxy",
        "proxy: trellis_proxy_new (histogram) is not documented under Proxy",
        "proxy: trellis_proxy_b is documented as present (always) but was not exposed",
    ];
    ensure!(errors.len() == expected.len(), "{errors:#?}");
    for e in expected {
        ensure!(
            errors.iter().any(|x| x == e),
            "missing {e:?} in {errors:#?}"
        );
    }
    // Wrong types, and a mode-only row that shows up.
    let scrape = parse_scrape(
        "# TYPE trellis_proxy_b counter\n# TYPE trellis_proxy_k gauge\n\
         # TYPE trellis_proxy_h gauge\n",
    )?;
    let errors = check(
        &rows,
        &[Presence::Always],
        &[(Process::Proxy, "p", &scrape)],
    );
    for e in [
        "p: trellis_proxy_b_total (counter) is not documented under Proxy",
        "p: trellis_proxy_h is a gauge, documented as a histogram",
        "p: trellis_proxy_k is documented as present only with `--kubernetes` but was exposed",
    ] {
        ensure!(
            errors.iter().any(|x| x == e),
            "missing {e:?} in {errors:#?}"
        );
    }
    Ok(())
}

/// `--metrics-addr`: the registry of the admin port, and nothing else, on a listener that
/// may face out of the pod (how `trellis check` and managed Prometheus read a replica on a
/// cluster); with the build and the connected proxies' versions for version skew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_metrics_listener_serves_metrics_only() -> anyhow::Result<()> {
    let metrics = loopback(free_port());
    let (client_in, web_in) = (loopback(free_port()), loopback(free_port()));
    let cp = ControlPlane::start_with(&two_workloads(client_in, web_in), |_| Launch {
        args: vec!["--metrics-addr".into(), metrics.to_string()],
        env: Vec::new(),
    })
    .await;
    let web_app = EchoServer::start("web-1").await;
    let _web = Proxy::start(&cp, "web-1", "demo", "web", web_in, web_app.addr).await;
    let version = env!("CARGO_PKG_VERSION");
    let scraped = scrape(metrics).await?;
    assert!(scraped.contains_key("trellis_discovery_connected_proxies"));
    let (_, _, body) = http_get(metrics, "localhost", "/metrics").await?;
    let body = String::from_utf8_lossy(&body);
    for line in [
        format!("trellis_build_info{{version=\"{version}\"}} 1"),
        format!("trellis_discovery_proxies_by_version{{proxy_version=\"{version}\"}} 1"),
        "trellis_discovery_connected_proxies 1".to_owned(),
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
    }
    for path in ["/debug/proxies", "/debug/ca", "/ready"] {
        let (status, _, _) = http_get(metrics, "localhost", path).await?;
        assert_eq!(status, 404, "{path} on the metrics listener");
        let (status, _, _) = http_get(cp.admin, "localhost", path).await?;
        assert_eq!(status, 200, "{path} on the admin port");
    }
    Ok(())
}
