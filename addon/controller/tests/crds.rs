//! The chart's CRDs and the documented example policies against the Rust types.
//!
//! - Drift: every file of `charts/trellis/crds/` that Trellis owns (`*.trellis.dev.yaml`)
//!   is exactly `crd::to_yaml` of the CRD it is named after, and there is one per CRD. Run
//!   with `TRELLIS_BLESS=1` to rewrite them instead, then review the diff.
//! - Examples: every file of `docs/examples/policy/` parses as an [`AuthorizationPolicy`]
//!   (`scripts/validate-chart` also checks them against the CRD's schema).

use std::fs;
use std::path::{Path, PathBuf};

use trellis_controller::crd::{self, CHART_CRD_DIR};
use trellis_controller::policy::{AuthorizationPolicy, POLICY_API_VERSION, PolicyAction};

/// Set to `1` to rewrite the checked-in files instead of comparing.
const ENV_BLESS: &str = "TRELLIS_BLESS";
/// The suffix of the CRD files generated here (other CRDs, e.g. vendored Gateway API
/// ones, may share the directory one day).
const OWNED_SUFFIX: &str = ".trellis.dev.yaml";
/// Where the examples `docs/policy.md` points at live.
const EXAMPLES_DIR: &str = "docs/examples/policy";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Sorted names of the `.yaml` files of `dir` whose name ends with `suffix`.
fn yaml_files(dir: &Path, suffix: &str) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(suffix) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[test]
fn chart_crds_are_generated_from_the_rust_types() {
    let dir = repo_root().join(CHART_CRD_DIR);
    let fresh: Vec<(String, String)> = crd::crds()
        .iter()
        .map(|c| {
            (
                crd::file_name(c),
                crd::to_yaml(std::slice::from_ref(c)).unwrap(),
            )
        })
        .collect();
    assert!(!fresh.is_empty());
    let regenerate = format!(
        "run `{ENV_BLESS}=1 cargo test -p trellis-controller --test crds` and review the diff"
    );

    if std::env::var(ENV_BLESS).is_ok_and(|v| v == "1") {
        fs::create_dir_all(&dir).unwrap();
        for name in yaml_files(&dir, OWNED_SUFFIX).unwrap() {
            fs::remove_file(dir.join(name)).unwrap();
        }
        for (name, text) in &fresh {
            fs::write(dir.join(name), text).unwrap();
        }
        return;
    }

    let names: Vec<String> = fresh.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        yaml_files(&dir, OWNED_SUFFIX).unwrap(),
        names,
        "{CHART_CRD_DIR}: the set of CRD files drifted from the Rust types; {regenerate}"
    );
    for (name, text) in &fresh {
        let checked_in = fs::read_to_string(dir.join(name)).unwrap();
        assert!(
            &checked_in == text,
            "{CHART_CRD_DIR}/{name} drifted from the Rust types; {regenerate}"
        );
    }
}

#[test]
fn every_documented_example_parses_as_an_authorization_policy() {
    let dir = repo_root().join(EXAMPLES_DIR);
    let files = yaml_files(&dir, ".yaml").unwrap();
    // An empty directory would pass everything below: the examples docs/policy.md shows.
    assert!(files.len() >= 5, "{EXAMPLES_DIR}: only {files:?}");
    let mut actions = Vec::new();
    for name in &files {
        let text = fs::read_to_string(dir.join(name)).unwrap();
        let de = serde_yaml::Deserializer::from_str(&text);
        let policy: AuthorizationPolicy = serde_path_to_error::deserialize(de)
            .unwrap_or_else(|e| panic!("{EXAMPLES_DIR}/{name}: {}: {e}", e.path()));
        // The derived type does not keep `apiVersion` and `kind`: read them on their own.
        let object: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(
            object["apiVersion"].as_str(),
            Some(POLICY_API_VERSION),
            "{name}"
        );
        assert_eq!(
            object["kind"].as_str(),
            Some("AuthorizationPolicy"),
            "{name}"
        );
        assert!(policy.metadata.name.is_some(), "{name}: no metadata.name");
        assert!(
            policy.metadata.namespace.is_some(),
            "{name}: no metadata.namespace"
        );
        // One policy per file: the file is what an operator copies and applies.
        assert_eq!(
            serde_yaml::Deserializer::from_str(&text).count(),
            1,
            "{name}"
        );
        actions.push((policy.spec.action, policy.spec.dry_run));
    }
    // The examples show both actions and a dry run.
    for wanted in [(PolicyAction::Allow, false), (PolicyAction::Deny, false)] {
        assert!(
            actions.contains(&wanted),
            "no {wanted:?} example: {actions:?}"
        );
    }
    assert!(
        actions.iter().any(|(_, dry_run)| *dry_run),
        "no dry-run example"
    );
}
