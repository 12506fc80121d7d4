//! Switching the CA of a running mesh under load: from the local self-signed root to a
//! plug-in CA (the Istio `cacerts` layout in a directory, as a mounted Secret), with
//! 20-second leaves renewing all along. No request may fail; proxies started before,
//! during and after the switch all talk to each other.

use std::time::Duration;

use trellis_e2e::{ControlPlane, EchoServer, Launch, Load, Proxy, free_port, http_get, wait_until};

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

/// Runs the switch: a mesh on the self-signed CA under load; `prepare` (given the control
/// plane's directory and the environment of every process) creates the new CA material
/// with `trellis ca` and returns the mesh config's new `ca` value; then stage, activate and
/// retire must pass with no failed request. Returns the control plane for more checks.
async fn switch_under_load(
    env: Vec<(String, String)>,
    prepare: impl FnOnce(&std::path::Path, &[(String, String)]) -> String,
) -> ControlPlane {
    let (client_in, web_in) = (loopback(free_port()), loopback(free_port()));
    let cp_env = env.clone();
    let cp = ControlPlane::start_with(&two_workloads(client_in, web_in), |dir| {
        let path = dir.join("trellis-config.yaml");
        std::fs::write(&path, mesh_config("source: self-signed")).unwrap();
        Launch {
            args: vec![
                "--mesh-config".into(),
                path.display().to_string(),
                "--cert-max-ttl".into(),
                LEAF_TTL.into(),
            ],
            env: cp_env,
        }
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

    let load = Load::start(client.outbound, "web.demo", 1);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let ca_yaml = prepare(cp.dir.path(), &env);
    std::fs::write(
        cp.dir.path().join("trellis-config.yaml"),
        mesh_config(&ca_yaml),
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
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        ok + failures.len() as u64
    );
    assert!(ok > 500, "only {ok} requests ran");
    // Leaves renewed several times under load (20 s leaves over ~45 s).
    let issued = metric(cp.admin, "trellis_ca_certificates_issued_total")
        .await
        .unwrap();
    assert!(issued >= 10.0, "only {issued} certificates issued");

    // `trellis check` sees the new CA, one root, and every proxy in sync; with a warning
    // window longer than the chain's life it fails.
    let check = |window: &str| {
        std::process::Command::new(trellis_e2e::mesh::bin("trellis"))
            .args([
                "check",
                "--admin",
                &cp.admin.to_string(),
                "--warn-within",
                window,
            ])
            .output()
            .unwrap()
    };
    let out = check("1d");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("✔ CA: ") && text.contains("generation 2"),
        "{text}"
    );
    assert_eq!(text.matches("trust root ").count(), 1, "{text}");
    assert!(
        text.contains("proxies connected, all on the latest configuration"),
        "{text}"
    );
    let out = check("36500d");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("✖ CA: "), "{text}");
    cp
}

/// Runs `trellis ca <args>` with `env`, asserting success; returns stdout.
fn trellis_ca(args: &[&str], env: &[(String, String)]) -> String {
    let out = std::process::Command::new(trellis_e2e::mesh::bin("trellis"))
        .arg("ca")
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "trellis ca {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The operator creates a plug-in CA with `trellis ca` (the files of a `cacerts` Secret),
/// mounts it, and points the mesh config at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_a_plugin_ca_under_load_fails_nothing() {
    switch_under_load(Vec::new(), |dir, env| {
        let plugin_dir = dir.join("cacerts");
        let plugin = plugin_dir.display().to_string();
        trellis_ca(&["create-plugin", "--dir", &plugin], env);
        let shown = trellis_ca(&["show", "--dir", &plugin], env);
        assert!(
            shown.contains("CN=Trellis intermediate cluster.local"),
            "{shown}"
        );
        format!("source: secret\nsecret: {{path: {plugin}}}\nreloadInterval: 1s\npropagation: 3s")
    })
    .await;
}

/// The operator creates a non-exportable root key in Key Vault with `trellis ca
/// create-root` and switches the mesh to `keyvault-key`: the control plane authenticates
/// with workload identity (federated token exchange) and has Key Vault sign one
/// intermediate. Entra ID and Key Vault are the HTTPS stand-ins of `trellis-azure`; the
/// control plane and the CLI reach them through the real SDK clients.
/// The Entra ID and Key Vault stand-ins, and the environment that points the real SDK
/// clients in the binaries at them: what the AKS workload identity webhook injects, plus
/// the stand-ins' CA and address.
struct Azure {
    stand_in: trellis_azure::stand_in::AzureStandIn,
    env: Vec<(String, String)>,
    _files: tempfile::TempDir,
}

async fn azure() -> Azure {
    use trellis_azure::stand_in::{AzureStandIn, CLIENT_ID, TENANT_ID, VAULT_HOST};
    let stand_in = AzureStandIn::start().await.unwrap();
    let files = tempfile::tempdir().unwrap();
    let token = files.path().join("azure-identity-token");
    std::fs::write(&token, stand_in.federated_token()).unwrap();
    let roots = files.path().join("stand-in-ca.pem");
    std::fs::write(&roots, stand_in.ca_pem()).unwrap();
    let url = stand_in.vault_url();
    let vault_port = url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    let env = [
        ("AZURE_TENANT_ID", TENANT_ID.to_owned()),
        ("AZURE_CLIENT_ID", CLIENT_ID.to_owned()),
        ("AZURE_FEDERATED_TOKEN_FILE", token.display().to_string()),
        ("AZURE_AUTHORITY_HOST", stand_in.authority_host()),
        (trellis_azure::EXTRA_ROOTS_ENV, roots.display().to_string()),
        (
            trellis_azure::RESOLVE_ENV,
            format!("{VAULT_HOST}=127.0.0.1:{vault_port}"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Azure {
        stand_in,
        env,
        _files: files,
    }
}

/// The operator creates a non-exportable root key in Key Vault with `trellis ca
/// create-root` and switches the mesh to `keyvault-key`: the control plane authenticates
/// with workload identity (federated token exchange) and has Key Vault sign one
/// intermediate. Entra ID and Key Vault are the HTTPS stand-ins of `trellis-azure`; the
/// control plane and the CLI reach them through the real SDK clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_a_key_vault_root_key_under_load_fails_nothing() {
    let az = azure().await;
    let vault = az.stand_in.vault_url();
    let cp = switch_under_load(az.env.clone(), |_, env| {
        let root = trellis_ca(
            &["create-root", "--vault", &vault, "--credential", "workload-identity"],
            env,
        );
        assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
        format!(
            "source: keyvault-key\nkeyvault: {{url: \"{vault}\", credential: workload-identity, keyName: trellis-root}}\nreloadInterval: 1s\npropagation: 3s"
        )
    })
    .await;
    // The bundle proxies trust is now exactly the Key Vault root.
    let bundle = std::fs::read_to_string(cp.state_dir().join("trust-bundle.pem")).unwrap();
    let kv_root = az.stand_in.secret("trellis-root-cert").unwrap();
    assert_eq!(pem_ders(&bundle), pem_ders(&kv_root));
    // Two signs in all: the root certificate and one intermediate, whatever the number of
    // leaves issued and source reads (every second) in between.
    assert_eq!(
        az.stand_in.calls_to("keys.sign"),
        2,
        "{:?}",
        az.stand_in.calls()
    );
}

/// The AKS Istio add-on's layout: `trellis ca create-plugin --vault` uploads the four
/// secrets and the mesh switches to `keyvault-secret`, re-reading them every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_key_vault_plugin_secrets_under_load_fails_nothing() {
    let az = azure().await;
    let vault = az.stand_in.vault_url();
    let cp = switch_under_load(az.env.clone(), |_, env| {
        trellis_ca(
            &["create-plugin", "--vault", &vault, "--credential", "workload-identity"],
            env,
        );
        let shown = trellis_ca(
            &["show", "--vault", &vault, "--credential", "workload-identity"],
            env,
        );
        assert!(shown.contains("ca-cert"), "{shown}");
        format!(
            "source: keyvault-secret\nkeyvault: {{url: \"{vault}\", credential: workload-identity}}\nreloadInterval: 1s\npropagation: 3s"
        )
    })
    .await;
    let bundle = std::fs::read_to_string(cp.state_dir().join("trust-bundle.pem")).unwrap();
    let root = az.stand_in.secret("root-cert").unwrap();
    assert_eq!(pem_ders(&bundle), pem_ders(&root));
    // Re-read every second: the reads scale with time, not with pods or leaves.
    assert!(az.stand_in.calls_to("secrets.get") >= 4 * 10);
    assert_eq!(az.stand_in.calls_to("keys.sign"), 0);
}

fn pem_ders(text: &str) -> Vec<Vec<u8>> {
    rustls_pki_types::pem::PemObject::pem_slice_iter(text.as_bytes())
        .map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.unwrap().to_vec())
        .collect()
}
