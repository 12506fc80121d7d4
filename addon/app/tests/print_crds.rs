//! `trellis-addon print-crds` as an operator runs it: the real binary, its stdout and exit
//! code. It must print exactly the CRDs the chart ships (charts/trellis/crds/, itself
//! checked against the Rust types by trellis-controller's `tests/crds.rs`).

use std::fs;
use std::path::Path;
use std::process::Command;

use serde::Deserialize as _;
use serde_yaml::Value;

/// The YAML documents of `text`, sorted by `metadata.name`.
fn documents(text: &str) -> Result<Vec<Value>, serde_yaml::Error> {
    let mut docs = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let doc = Value::deserialize(document)?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    docs.sort_by_key(|d| {
        d["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    });
    Ok(docs)
}

#[test]
fn print_crds_prints_the_charts_crds() {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis-addon"))
        .arg("print-crds")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed.starts_with("# Generated from the Rust types in addon/controller/src/policy.rs"),
        "{printed}"
    );
    assert!(printed.contains("TRELLIS_BLESS=1 cargo test -p trellis-controller --test crds"));

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/trellis/crds");
    let mut chart = String::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".trellis.dev.yaml") {
            chart.push_str("---\n");
            chart.push_str(&fs::read_to_string(path).unwrap());
        }
    }
    let (printed, chart) = (documents(&printed).unwrap(), documents(&chart).unwrap());
    assert!(!printed.is_empty());
    let names = |docs: &[Value]| -> Vec<String> {
        docs.iter()
            .map(|d| {
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    assert_eq!(names(&printed), names(&chart));
    assert!(names(&printed).contains(&"authorizationpolicies.policy.trellis.dev".to_owned()));
    assert_eq!(printed, chart);
    for doc in &printed {
        assert_eq!(doc["kind"].as_str(), Some("CustomResourceDefinition"));
    }
}
