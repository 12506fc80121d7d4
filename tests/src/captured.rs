//! A captured mesh in network namespaces: a control-plane pod, a client pod and a
//! server pod whose proxies run as UID 1337 in transparent mode behind the real
//! `trellis-proxy init` rules, plus an `outside` pod that is not in the mesh.
//!
//! The Service `web.demo` has a virtual IP that only the proxies resolve; its ports
//! cover every protocol the protocol tests exercise (see [`ports`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::Child;

use crate::mesh::{bin, wait_until};
use crate::netns::{Network, Pod};

/// Service ports of `web.demo` (each = its target port on the server pod).
pub mod ports {
    /// HTTP/1.1 app.
    pub const HTTP: u16 = 8080;
    /// gRPC (h2c) app.
    pub const GRPC: u16 = 9000;
    /// WebSocket app.
    pub const WS: u16 = 8081;
    /// TCP echo, declared opaque (`tcp-` port name).
    pub const TCP: u16 = 7000;
    /// TLS the app originates (detected, not declared).
    pub const TLS: u16 = 8443;
    /// A server-first protocol on an undeclared port: found by the detection timeout.
    pub const BANNER: u16 = 2525;
    /// A server-first protocol on a default opaque port (MySQL's).
    pub const MYSQL: u16 = 3306;
    /// A TCP echo on the `outside` pod, not in the mesh (passthrough).
    pub const OUTSIDE: u16 = 7777;
}

/// Identities of the two workloads.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
/// The server workload's identity.
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/web";

/// The running captured mesh. Dropping it stops every process and deletes the pods.
pub struct CapturedMesh {
    /// Client pod (app A + proxy A).
    pub client: Pod,
    /// Server pod (app B + proxy B).
    pub server: Pod,
    /// A pod outside the mesh.
    pub outside: Pod,
    /// Control-plane pod.
    pub cp: Pod,
    /// The Service's virtual IP.
    pub vip: Ipv4Addr,
    /// Logs, config, tokens.
    pub dir: tempfile::TempDir,
    children: Vec<Child>,
    // Last: pods are deleted after the processes in them are gone.
    _net: Network,
}

impl CapturedMesh {
    /// Builds the pods, starts the control plane and both proxies (detection timeout
    /// 300 ms), and waits until both proxies are ready.
    pub async fn start() -> anyhow::Result<Self> {
        let mut net = Network::new()?;
        let cp = net.pod("cp")?;
        let client = net.pod("client")?;
        let server = net.pod("server")?;
        let outside = net.pod("outside")?;
        let vip = net.service_ip();
        let dir = tempfile::tempdir()?;
        // The proxies run as UID 1337 and must read their token and the root.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        for d in ["config", "logs"] {
            std::fs::create_dir_all(dir.path().join(d))?;
        }
        std::fs::write(
            dir.path().join("config/mesh.yaml"),
            mesh_yaml(vip, client.ip, server.ip),
        )?;
        write_mesh_config(dir.path(), "{}")?;
        let mut children = Vec::new();

        let state = dir.path().join("state");
        let log = log_file(dir.path(), "control-plane")?;
        children.push(
            cp.command(bin("trellis-addon"))
                .arg("run")
                .arg("--config-dir")
                .arg(dir.path().join("config"))
                .arg("--mesh-config")
                .arg(dir.path().join(MESH_CONFIG_FILE))
                .arg("--state-dir")
                .arg(&state)
                .args([
                    "--grpc-addr",
                    "0.0.0.0:15010",
                    "--admin-addr",
                    "127.0.0.1:9090",
                    "--poll-interval",
                    "200ms",
                ])
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log))
                .spawn()
                .context("starting trellis-addon in the cp pod")?,
        );
        let ready = cp
            .run(|| async {
                wait_until(Duration::from_secs(20), || async {
                    crate::mesh::http_get(
                        SocketAddr::from(([127, 0, 0, 1], 9090)),
                        "localhost",
                        "/ready",
                    )
                    .await
                    .is_ok_and(|r| r.0 == 200)
                })
                .await
            })
            .await;
        anyhow::ensure!(
            ready.is_ok(),
            "control plane not ready:\n{}",
            read(&dir.path().join("logs/control-plane.log"))
        );
        let root = dir.path().join("root-cert.pem");
        std::fs::copy(state.join("ca/root-cert.pem"), &root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o644))?;

        let mut mesh = Self {
            client,
            server,
            outside,
            cp,
            vip,
            dir,
            children,
            _net: net,
        };
        let (client_pod, server_pod) = (mesh.client.clone(), mesh.server.clone());
        mesh.start_proxy(&client_pod, "client-1", "client").await?;
        mesh.start_proxy(&server_pod, "server-1", "web").await?;
        Ok(mesh)
    }

    async fn start_proxy(&mut self, pod: &Pod, workload: &str, sa: &str) -> anyhow::Result<()> {
        let token = self.token(sa).await?;
        let token_file = self.dir.path().join(format!("{workload}.jwt"));
        std::fs::write(&token_file, token)?;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644))?;
        pod.capture(&[]).await?;
        let log = log_file(self.dir.path(), workload)?;
        let child = pod
            .command_as(1337, bin("trellis-proxy"))
            .args([
                "--mode",
                "transparent",
                "--control-plane",
                &format!("{}:15010", self.cp.ip),
            ])
            .arg("--ca-roots")
            .arg(self.dir.path().join("root-cert.pem"))
            .arg("--token-file")
            .arg(&token_file)
            .args([
                "--namespace",
                "demo",
                "--service-account",
                sa,
                "--workload",
                workload,
            ])
            .args([
                "--outbound",
                "127.0.0.1:15001",
                "--inbound",
                "0.0.0.0:15006",
                "--admin",
                "127.0.0.1:15020",
            ])
            .args(["--detect-timeout", "300ms"])
            .env("TRELLIS_LOG", "info")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting trellis-proxy")?;
        self.children.push(child);
        let ready = pod
            .run(|| async {
                wait_until(Duration::from_secs(20), || async {
                    crate::mesh::http_get(
                        SocketAddr::from(([127, 0, 0, 1], 15020)),
                        "localhost",
                        "/ready",
                    )
                    .await
                    .is_ok_and(|r| r.0 == 200)
                })
                .await
            })
            .await;
        anyhow::ensure!(
            ready.is_ok(),
            "proxy {workload} not ready:\n{}\ncontrol plane:\n{}",
            self.log(workload),
            self.log("control-plane")
        );
        Ok(())
    }

    async fn token(&self, sa: &str) -> anyhow::Result<String> {
        let out = tokio::process::Command::new(bin("trellis-addon"))
            .arg("issue-token")
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args(["--namespace", "demo", "--service-account", sa])
            .output()
            .await?;
        anyhow::ensure!(
            out.status.success(),
            "issue-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// Replaces the `data` of the control plane's trellis-config (a YAML mapping, e.g.
    /// `{outboundTrafficPolicy: 'mode: REGISTRY_ONLY'}`); it is re-read every 200 ms.
    pub fn set_mesh_config_data(&self, data: &str) -> anyhow::Result<()> {
        write_mesh_config(self.dir.path(), data)
    }

    /// A process's log (`control-plane`, `client-1`, `server-1`).
    pub fn log(&self, name: &str) -> String {
        read(&self.dir.path().join(format!("logs/{name}.log")))
    }

    /// The access-log events of a proxy.
    pub fn access_log(&self, name: &str) -> Vec<String> {
        self.log(name)
            .lines()
            .filter(|l| l.contains(" access:"))
            .map(str::to_owned)
            .collect()
    }

    /// `<vip>:<port>` of the Service.
    pub fn service(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.vip), port)
    }
}

fn mesh_yaml(vip: Ipv4Addr, client: Ipv4Addr, server: Ipv4Addr) -> String {
    use ports::*;
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{ name: web, namespace: demo }}
spec:
  clusterIP: {vip}
  selector: {{ app: web }}
  ports:
    - {{ name: http, port: {HTTP} }}
    - {{ name: grpc, port: {GRPC} }}
    - {{ name: http-ws, port: {WS} }}
    - {{ name: tcp-echo, port: {TCP} }}
    - {{ name: app-tls, port: {TLS} }}
    - {{ name: banner, port: {BANNER} }}
    - {{ name: mysql, port: {MYSQL} }}
---
apiVersion: local.trellis.dev/v1alpha1
kind: Workload
metadata: {{ name: server-1, namespace: demo, labels: {{ app: web }} }}
spec: {{ serviceAccount: web, address: "{server}" }}
---
apiVersion: local.trellis.dev/v1alpha1
kind: Workload
metadata: {{ name: client-1, namespace: demo, labels: {{ app: client }} }}
spec: {{ serviceAccount: client, address: "{client}" }}
"#
    )
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::File::create(dir.join(format!("logs/{name}.log")))?)
}

fn read(p: &PathBuf) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The control plane's `--mesh-config` file, in the mesh's directory.
const MESH_CONFIG_FILE: &str = "mesh-config.yaml";

/// Writes the trellis-config ConfigMap with `data`, whole (rename), so the control plane
/// never reads half a file.
fn write_mesh_config(dir: &std::path::Path, data: &str) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: trellis-config, namespace: trellis-system}}\ndata: {data}\n"
    );
    let tmp = dir.join(format!("{MESH_CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(MESH_CONFIG_FILE))?;
    Ok(())
}
