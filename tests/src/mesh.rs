//! The control plane and proxies as real processes, each with its log in a temp dir.
//! Processes are killed when their handle is dropped; a failing test prints the logs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};

/// Trust domain of every test mesh.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Where `cargo build --bins` put the binaries: the test executable lives in
/// `target/<profile>/deps/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries before the e2e tests (`cargo build --bins`, which the README's test command runs)",
        path.display()
    );
    path
}

/// A loopback port nobody listens on right now, never one this process handed out
/// before, and outside the kernel's ephemeral range (32768-60999 by default).
///
/// Why not port 0: the port is released before the binary binds it, and in that gap the
/// kernel may hand the same ephemeral port to any outgoing connection of the many test
/// processes nextest runs side by side (a CI run failed on exactly that). Ports below the
/// ephemeral range are never handed out implicitly, so only another test picking the same
/// port at the same moment could collide; each process starts at its own offset (from
/// its pid) and walks the range with a stride coprime to its size.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000; // 20000..32000, below the ephemeral range
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(
            n < SPAN,
            "free_port: no free loopback port left in {LOW}..{}",
            LOW + SPAN
        );
        let port = u16::try_from(LOW + (start + n.wrapping_mul(4_999)) % SPAN).unwrap_or(u16::MAX);
        if given.contains(&port) || std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        given.push(port);
        return port;
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running `trellis-addon`.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    extra: Launch,
    child: Option<Child>,
    /// Started with `--kubernetes` (mesh and mesh config from the API in `KUBECONFIG`)
    /// rather than `--config-dir`.
    kubernetes: bool,
}

/// Extra flags and environment for `trellis-addon run`.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl ControlPlane {
    /// Writes `mesh_yaml` as the config and starts the control plane; waits until ready.
    pub async fn start(mesh_yaml: &str) -> Self {
        Self::start_with(mesh_yaml, |_| Launch::default()).await
    }

    /// [`ControlPlane::start`] with extra flags for `trellis-addon run`, computed from
    /// the control plane's directory (to point at files written there first).
    pub async fn start_with(
        mesh_yaml: &str,
        extra: impl FnOnce(&std::path::Path) -> Launch,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        std::fs::write(dir.path().join("config/mesh.yaml"), mesh_yaml).unwrap();
        let mut cp = Self {
            dir,
            grpc: loopback(free_port()),
            admin: loopback(free_port()),
            extra: Launch::default(),
            child: None,
            kubernetes: false,
        };
        cp.extra = extra(cp.dir.path());
        cp.restart().await;
        cp
    }

    /// Starts `trellis-addon run --kubernetes` (no `--config-dir`, no mesh file): the mesh
    /// and its config come from the Kubernetes API that `extra`'s environment points at
    /// (`KUBECONFIG`, and `POD_NAME` for the Lease), computed from the control plane's
    /// directory (where the kubeconfig may be written); waits until ready, i.e. until
    /// every watched kind has been listed.
    pub async fn start_kubernetes(extra: impl FnOnce(&std::path::Path) -> Launch) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let mut cp = Self {
            dir,
            grpc: loopback(free_port()),
            admin: loopback(free_port()),
            extra: Launch::default(),
            child: None,
            kubernetes: true,
        };
        cp.extra = extra(cp.dir.path());
        cp.restart().await;
        cp
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The PEM file proxies bootstrap their trust from.
    pub fn root_pem(&self) -> PathBuf {
        self.state_dir().join("trust-bundle.pem")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs/control-plane.log")).unwrap_or_default()
    }

    /// The source status (`/debug/source`) once it mentions `needle` (up to 10 s): after a
    /// refused edit, its `last_error` names the file and the field.
    pub async fn source_status_with(&self, needle: &str) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        for _ in 0..200 {
            if let Ok((_, _, body)) = http_get(self.admin, "localhost", "/debug/source").await {
                if String::from_utf8_lossy(&body).contains(needle) {
                    return serde_json::from_slice(&body).unwrap_or_default();
                }
                last = serde_json::from_slice(&body).unwrap_or_default();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("/debug/source never mentioned {needle:?}: {last}");
    }

    /// (Re)starts the process on the same ports and state.
    pub async fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("logs/control-plane.log"))
            .unwrap();
        let mut command = Command::new(bin("trellis-addon"));
        command.arg("run");
        if self.kubernetes {
            command.arg("--kubernetes");
        } else {
            command.arg("--config-dir").arg(self.config_dir());
        }
        let child = command
            .arg("--state-dir")
            .arg(self.state_dir())
            .args([
                "--grpc-addr",
                &self.grpc.to_string(),
                "--admin-addr",
                &self.admin.to_string(),
            ])
            .args(["--poll-interval", "200ms"])
            .args(&self.extra.args)
            .envs(self.extra.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_until(Duration::from_secs(20), || async {
            http_get(self.admin, "localhost", "/ready")
                .await
                .is_ok_and(|r| r.0 == 200)
        })
        .await
        .unwrap_or_else(|()| panic!("control plane not ready; log:\n{}", self.log()));
    }

    /// SIGKILLs the process and waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.unwrap();
        }
    }

    /// Sends SIGTERM, as Kubernetes does to stop a pod.
    pub fn terminate(&self) {
        let pid = self.child.as_ref().and_then(Child::id).unwrap_or(0);
        assert!(pid != 0, "the control plane is not running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running (or was
    /// never started).
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        tokio::time::timeout(limit, child.wait())
            .await
            .ok()
            .map(|r| r.unwrap())
    }

    /// Mints a token for a workload with the control plane's local issuer.
    pub async fn token(&self, namespace: &str, service_account: &str) -> String {
        let out = Command::new(bin("trellis-addon"))
            .arg("issue-token")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args([
                "--namespace",
                namespace,
                "--service-account",
                service_account,
            ])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "issue-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

/// A running `trellis-proxy`.
pub struct Proxy {
    pub name: String,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    log: PathBuf,
    child: Child,
}

impl Proxy {
    /// Starts a proxy for workload `name` (namespace `ns`, service account `sa`) whose
    /// inbound listens on `inbound` and forwards to `app`; waits until ready.
    pub async fn start(
        cp: &ControlPlane,
        name: &str,
        ns: &str,
        sa: &str,
        inbound: SocketAddr,
        app: SocketAddr,
    ) -> Self {
        Self::start_with(cp, name, ns, sa, inbound, app, &[]).await
    }

    /// [`Proxy::start`] with extra command-line flags.
    pub async fn start_with(
        cp: &ControlPlane,
        name: &str,
        ns: &str,
        sa: &str,
        inbound: SocketAddr,
        app: SocketAddr,
        extra: &[&str],
    ) -> Self {
        let token_file = cp.dir.path().join(format!("{name}.jwt"));
        std::fs::write(&token_file, cp.token(ns, sa).await).unwrap();
        let log = cp.dir.path().join(format!("logs/{name}.log"));
        let (outbound, admin) = (loopback(free_port()), loopback(free_port()));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(bin("trellis-proxy"));
        // `extra` may name the control plane another way (a DNS name).
        if !extra.iter().any(|a| a.starts_with("--control-plane=")) {
            command.args(["--control-plane", &cp.grpc.to_string()]);
        }
        let child = command
            .arg("--ca-roots")
            .arg(cp.root_pem())
            .arg("--token-file")
            .arg(&token_file)
            .args([
                "--namespace",
                ns,
                "--service-account",
                sa,
                "--workload",
                name,
            ])
            .args([
                "--outbound",
                &outbound.to_string(),
                "--inbound",
                &inbound.to_string(),
            ])
            .args(["--admin", &admin.to_string(), "--app", &app.to_string()])
            .args(extra)
            .env("TRELLIS_LOG", "info")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let p = Self {
            name: name.to_owned(),
            outbound,
            inbound,
            admin,
            log,
            child,
        };
        wait_until(Duration::from_secs(20), || async {
            http_get(p.admin, "localhost", "/ready")
                .await
                .is_ok_and(|r| r.0 == 200)
        })
        .await
        .unwrap_or_else(|()| {
            panic!(
                "proxy {name} not ready; log:\n{}\ncontrol plane log:\n{}",
                p.log(),
                cp.log()
            )
        });
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id (0 once it has been reaped).
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends SIGTERM, as Kubernetes does to stop a pod.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(|r| r.unwrap())
    }

    /// Waits (up to 5 s) until the log holds `needle`: the proxy writes its log from a
    /// background thread, so a line can land just after the response that caused it.
    pub async fn wait_log(&self, needle: &str) -> bool {
        wait_until(Duration::from_secs(5), || async {
            self.log().contains(needle)
        })
        .await
        .is_ok()
    }

    /// The proxy's access-log lines.
    pub fn access_log(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" access:"))
            .map(str::to_owned)
            .collect()
    }

    /// One metric sample value from /metrics, e.g.
    /// `trellis_proxy_discovery_version` or a [`request_series`].
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, _, body) = http_get(self.admin, "localhost", "/metrics").await.ok()?;
        let body = String::from_utf8_lossy(&body).into_owned();
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// GET /config as JSON.
    pub async fn config(&self) -> serde_json::Value {
        let (_, _, body) = http_get(self.admin, "localhost", "/config").await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }
}

/// A local-profile mesh (the YAML of `--config-dir`), all in namespace `ns`: a Service per
/// name in `services` (port 80 to 8080, selecting `app: <name>`) and a Workload per
/// `(name, service account, app label, mesh address)` in `workloads`.
pub fn mesh_yaml(
    ns: &str,
    services: &[&str],
    workloads: &[(&str, &str, &str, SocketAddr)],
) -> String {
    let mut docs: Vec<String> = services
        .iter()
        .map(|s| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{ name: {s}, namespace: {ns} }}\nspec:\n  selector: {{ app: {s} }}\n  ports: [{{ name: http, port: 80, targetPort: 8080 }}]\n"
            )
        })
        .collect();
    docs.extend(workloads.iter().map(|(name, sa, app, addr)| {
        format!(
            "apiVersion: local.trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{ name: {name}, namespace: {ns}, labels: {{ app: {app} }} }}\nspec: {{ serviceAccount: {sa}, meshAddress: \"{addr}\" }}\n"
        )
    }));
    docs.join("---\n")
}

/// The `_count` series of one request family (`kind`: `server` for a proxy's inbound
/// requests, `client` for its outbound ones) for a call from service account `src` to
/// service account `dst` (each proxy's `--service-name` defaults to its service
/// account) behind the service `dst.<ns>`, all in namespace `ns` and trust domain
/// `cluster.local`, with no HTTPRoute applied.
pub fn request_series(kind: &str, src: &str, dst: &str, ns: &str, status: u16) -> String {
    let id = |sa: &str| format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
    format!(
        "http_{kind}_request_duration_seconds_count{{http_request_method=\"GET\",\
         http_response_status_code=\"{status}\",rpc_grpc_status_code=\"\",\
         source_workload=\"{src}\",source_namespace=\"{ns}\",source_principal=\"{}\",\
         destination_workload=\"{dst}\",destination_namespace=\"{ns}\",\
         destination_principal=\"{}\",destination_service_name=\"{dst}\",\
         destination_service_namespace=\"{ns}\",route_namespace=\"\",route_name=\"\",\
         connection_security_policy=\"mutual_tls\"}}",
        id(src),
        id(dst)
    )
}

/// A plain HTTP/1.1 GET; returns (status, headers, body).
pub async fn http_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> anyhow::Result<(u16, http::HeaderMap, Bytes)> {
    http_request(addr, http::Method::GET, host, path, Bytes::new()).await
}

/// A plain HTTP/1.1 request with a body; returns (status, headers, body).
pub async fn http_request(
    addr: SocketAddr,
    method: http::Method,
    host: &str,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(u16, http::HeaderMap, Bytes)> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .set_host(false)
        .build_http();
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(http::header::HOST, host)
        .body(Full::new(body))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await??;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status.as_u16(), parts.headers, body))
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(())
}

/// Requests sent back to back from `concurrency` loops until [`Load::finish`], counting
/// every answer that is not a 200 as a failure: the "under load" of the scenarios.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ok: Arc<std::sync::atomic::AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Starts `concurrency` loops of GET `/load/<loop>/<n>` to `addr` with `Host: host`.
    pub fn start(addr: SocketAddr, host: &str, concurrency: usize) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..concurrency)
            .map(|c| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                let host = host.to_owned();
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        match http_get(addr, &host, &format!("/load/{c}/{i}")).await {
                            Ok((200, _, _)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((s, _, b)) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{s} {}", String::from_utf8_lossy(&b))),
                            Err(e) => failures.lock().unwrap().push(e.to_string()),
                        }
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    /// Stops the loops; returns the successes and the failures (one line each).
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(std::sync::atomic::Ordering::Relaxed), failures)
    }
}
