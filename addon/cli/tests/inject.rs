//! `trellis inject` as a user runs it: the real binary, YAML on stdin, YAML on stdout,
//! compared byte for byte with tests/fixtures/inject-expected.yaml. `TRELLIS_BLESS=1`
//! rewrites that file instead (review the diff).

#![allow(clippy::unwrap_used)]

// The crate's one integration test binary; `trellis check` against the Kubernetes API
// stand-in is a module of it.
mod check;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn inject(input: &[u8], extra: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "inject",
            "--proxy-image",
            "trellis.azurecr.io/trellis/proxy:0.1.0",
            "--control-plane",
            "10.0.12.7:15010",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn injects_pods_and_templates_and_passes_the_rest_through() {
    let input = std::fs::read(fixture("inject-input.yaml")).unwrap();
    let out = inject(&input, &[]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{stderr}");
    let expected_path = fixture("inject-expected.yaml");
    if std::env::var_os("TRELLIS_BLESS").is_some() {
        std::fs::write(&expected_path, &out.stdout).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout, expected,
        "run with TRELLIS_BLESS=1 to accept the new output"
    );

    // The Service and the opted-out Pod come back byte for byte, comments included.
    let input = String::from_utf8(input).unwrap();
    let docs: Vec<&str> = input.split("---\n").collect();
    assert!(stdout.starts_with(docs[0]), "the Service changed");
    assert!(stdout.ends_with(docs[3]), "the opted-out Pod changed");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "trellis inject: document 2 (Deployment shop/web): trellis-proxy injected as a \
             native sidecar, service name web; inbound ports not captured: 8080,15090 (probe \
             ports 8080); outbound CIDRs not captured: 169.254.169.254/32",
            "trellis inject: document 3 (CronJob report): trellis-proxy injected as a native \
             sidecar; inbound ports not captured: 15090; outbound ports not captured: 5432; \
             outbound CIDRs not captured: 169.254.169.254/32",
            "trellis inject: document 4 (Pod shop/debug): not injected: the pod has \
             trellis.dev/inject: disabled",
        ]
    );
}

#[test]
fn injecting_twice_changes_nothing() {
    let once = std::fs::read(fixture("inject-expected.yaml")).unwrap();
    let twice = inject(&once, &[]);
    assert!(twice.status.success());
    assert_eq!(
        String::from_utf8(twice.stdout).unwrap(),
        String::from_utf8(once).unwrap()
    );
    let stderr = String::from_utf8(twice.stderr).unwrap();
    assert!(
        stderr.contains("document 2 (Deployment shop/web): not injected: already injected"),
        "{stderr}"
    );
}

#[test]
fn kubernetes_1_28_gets_a_classic_sidecar_and_jobs_the_shutdown_token() {
    let input = std::fs::read(fixture("inject-input.yaml")).unwrap();
    let out = inject(&input, &["--kubernetes-version", "1.28"]);
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("(Deployment shop/web): trellis-proxy injected as a classic sidecar"));
    assert!(stderr.contains(
        "(CronJob report): trellis-proxy injected as a classic sidecar; inbound ports not \
         captured: 15090; outbound ports not captured: 5432; outbound CIDRs not captured: \
         169.254.169.254/32; the app must end with POST http://127.0.0.1:15020/shutdown"
    ));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("TRELLIS_PROXY_SHUTDOWN_TOKEN_FILE"));
    assert!(!stdout.contains("restartPolicy: Always"));
}

#[test]
fn errors_name_the_document_and_the_field_and_write_nothing() {
    let input = std::fs::read(fixture("inject-bad.yaml")).unwrap();
    let out = inject(&input, &[]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "trellis: document 2 (StatefulSet shop/db): \
         spec.template.metadata.annotations[\"trellis.dev/exclude-inbound-ports\"]: \
         \"99999\" is not a port (1-65535)\n"
    );
    let out = inject(b"kind: Pod\nspec: [\n", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("trellis: document 1: not YAML: "),
        "{stderr}"
    );
    let out = inject(b"", &["--exclude-outbound-cidrs", "10.0.0.1/8"]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "trellis inject: excluded outbound CIDR: \"10.0.0.1/8\" has host bits set after /8\n"
    );
    let out = inject(b"", &["--kubernetes-version", "one"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("--kubernetes-version"), "{stderr}");
}

#[test]
fn the_control_plane_defaults_to_its_service_name_and_the_init_image_is_its_own() {
    let input = std::fs::read(fixture("inject-input.yaml")).unwrap();
    // Without --control-plane: the chart's Service, as `host:port`, passed as given.
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "inject",
            "--proxy-image",
            "trellis.azurecr.io/trellis/proxy:0.1.0",
            "--proxy-init-image",
            "trellis.azurecr.io/trellis/proxy-init:0.1.0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("value: trellis-control-plane.trellis-system.svc:15010"),
        "{stdout}"
    );
    assert!(stdout.contains("image: trellis.azurecr.io/trellis/proxy-init:0.1.0"));
    assert!(stdout.contains("image: trellis.azurecr.io/trellis/proxy:0.1.0"));
    // A control plane that is not host:port is refused before anything is read.
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args([
            "inject",
            "--proxy-image",
            "p:1",
            "--control-plane",
            "http://cp:15010",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("control plane \"http://cp:15010\""),
        "{stderr}"
    );
}
