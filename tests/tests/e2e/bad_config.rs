//! Bad input: clear errors naming the file, field or port, and exit code 64 for bad
//! configuration.

use std::process::Output;

use trellis_e2e::{ControlPlane, free_port};

async fn addon(args: &[&str]) -> Output {
    tokio::process::Command::new(trellis_e2e::mesh::bin("trellis-addon"))
        .args(args)
        .output()
        .await
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn control_plane_refuses_bad_config_with_64_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config");
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::write(
        cfg.join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: { name: web, namespace: demo }\nspec:\n  portz: []\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let (c, s) = (cfg.to_str().unwrap(), state.to_str().unwrap());
    let grpc = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let out = addon(&[
        "run",
        "--config-dir",
        c,
        "--state-dir",
        s,
        "--grpc-addr",
        &grpc,
        "--admin-addr",
        &admin,
    ])
    .await;
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("web.yaml") && e.contains("spec.portz") && e.contains("unknown field"),
        "{e}"
    );

    let out = addon(&["check-config", "--config-dir", c]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("spec.portz"));

    // A duplicate workload across two files names both.
    let w = "apiVersion: local.trellis.dev/v1alpha1\nkind: Workload\nmetadata: { name: w, namespace: demo }\nspec: { meshAddress: \"127.0.0.1:1\" }\n";
    std::fs::remove_file(cfg.join("web.yaml")).unwrap();
    std::fs::write(cfg.join("a.yaml"), w).unwrap();
    std::fs::write(cfg.join("b.yaml"), w.replace(":1\"", ":2\"")).unwrap();
    let out = addon(&["check-config", "--config-dir", c]).await;
    assert_eq!(out.status.code(), Some(64));
    let e = stderr(&out);
    assert!(
        e.contains("a.yaml") && e.contains("b.yaml") && e.contains("twice"),
        "{e}"
    );
}

#[tokio::test]
async fn busy_port_fails_with_its_number() {
    let cp = ControlPlane::start("").await;
    // A second control plane on the same gRPC port.
    let dir = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let out = addon(&[
        "run",
        "--config-dir",
        cp.config_dir().to_str().unwrap(),
        "--state-dir",
        dir.path().to_str().unwrap(),
        "--grpc-addr",
        &cp.grpc.to_string(),
        "--admin-addr",
        &admin,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains(&cp.grpc.port().to_string())
            && e.contains("--grpc-addr")
            && e.contains("in use"),
        "{e}"
    );
}

#[tokio::test]
async fn proxy_refuses_bad_flags_with_64() {
    let proxy = trellis_e2e::mesh::bin("trellis-proxy");
    let base = [
        "--ca-roots",
        "/nonexistent",
        "--token-file",
        "/nonexistent",
        "--namespace",
        "demo",
        "--workload",
        "w",
    ];
    let run = |extra: &'static [&'static str]| {
        let proxy = proxy.clone();
        async move {
            tokio::process::Command::new(proxy)
                .args(base)
                .args(extra)
                .output()
                .await
                .unwrap()
        }
    };
    let out = run(&["--admin", "0.0.0.0:15020"]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("loopback"), "{}", stderr(&out));
    let out = run(&["--inbound", "not-an-address"]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("--inbound"), "{}", stderr(&out));
    let out = run(&["--service-account", "Bad_SA"]).await;
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("service account"), "{}", stderr(&out));
}
