//! Drift test for the checked-in gRPC code of the test apps under `src/gen/`.
//!
//! The echo service's code is checked in so that building the harness needs neither
//! `protoc` nor a build script. This test regenerates it from `proto/echo.proto` with the
//! pure-Rust `protox` compiler and `tonic-prost-build`, and fails when the checked-in files
//! differ. Run with `TRELLIS_BLESS=1` to rewrite them instead.

use std::fs;
use std::path::{Path, PathBuf};

/// The .proto files of the test apps, relative to `proto/`.
const PROTOS: &[&str] = &["echo.proto"];

/// Set to `1` to rewrite the checked-in files instead of comparing.
const ENV_BLESS: &str = "TRELLIS_BLESS";

/// How to regenerate, for the failure messages.
const BLESS_CMD: &str = "TRELLIS_BLESS=1 cargo test -p trellis-e2e --test e2e generated";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Generates the client and server code for every proto into `out_dir`.
///
/// `build_transport(false)`: the apps build their own `Channel` (to `http://<addr>`), so the
/// generated `connect` helper is not needed.
fn generate(out_dir: &Path) -> anyhow::Result<()> {
    let proto_dir = crate_dir().join("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| proto_dir.join(p)).collect();
    let fds = protox::compile(&files, [&proto_dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_fds(fds)?;
    Ok(())
}

/// Sorted `(file name, contents)` of every `.rs` file in `dir`.
fn rust_files(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((name, fs::read_to_string(&path)?));
        }
    }
    files.sort();
    Ok(files)
}

#[test]
fn generated_code_matches_protos() -> anyhow::Result<()> {
    let fresh_dir = tempfile::tempdir()?;
    generate(fresh_dir.path())?;
    let fresh = rust_files(fresh_dir.path())?;
    let checked_in_dir = crate_dir().join("src").join("gen");

    if std::env::var(ENV_BLESS).is_ok_and(|v| v == "1") {
        fs::create_dir_all(&checked_in_dir)?;
        for (name, _) in rust_files(&checked_in_dir)? {
            fs::remove_file(checked_in_dir.join(name))?;
        }
        for (name, text) in &fresh {
            fs::write(checked_in_dir.join(name), text)?;
        }
        return Ok(());
    }

    let checked_in = rust_files(&checked_in_dir)?;
    let names =
        |files: &[(String, String)]| files.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&checked_in),
        names(&fresh),
        "generated file set drifted from proto/; run `{BLESS_CMD}` and review the diff"
    );
    for ((name, old), (_, new)) in checked_in.iter().zip(&fresh) {
        assert!(
            old == new,
            "src/gen/{name} drifted from proto/; run `{BLESS_CMD}` and review the diff"
        );
    }
    Ok(())
}
