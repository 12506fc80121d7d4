//! The CustomResourceDefinitions of Trellis's own kinds, generated from their Rust types
//! (today `policy.trellis.dev/v1alpha1` [`AuthorizationPolicy`]) and rendered as YAML.
//!
//! The types are the one source: `trellis-addon print-crds` prints [`crds`], the chart
//! ships them under [`CHART_CRD_DIR`] (one file per CRD, [`file_name`]; a drift test,
//! `tests/crds.rs`, fails when a checked-in file differs from [`to_yaml`] of its CRD), and
//! `trellis check --kubernetes` compares what a cluster serves against them.
//!
//! Owns: the list of Trellis CRDs and their YAML form (header, key order, number form).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt as _;
use serde_yaml::Value as Yaml;

use crate::policy::AuthorizationPolicy;

/// Where the chart keeps the CRDs, relative to the repository root. Helm installs `crds/`
/// before the templates, on the first install only (never on upgrade).
pub const CHART_CRD_DIR: &str = "charts/trellis/crds";

/// The comment every rendered file starts with: generated, and how to regenerate.
pub const HEADER: &str = "\
# Generated from the Rust types in addon/controller/src/policy.rs: do not edit.
# Regenerate the files of charts/trellis/crds/ with
#   TRELLIS_BLESS=1 cargo test -p trellis-controller --test crds
# `trellis-addon print-crds` prints the same CustomResourceDefinitions.
";

/// A CRD that could not be rendered as YAML.
#[derive(Debug, thiserror::Error)]
#[error("cannot render CustomResourceDefinition {name} as YAML: {reason}")]
pub struct RenderError {
    /// `metadata.name` of the CRD.
    pub name: String,
    /// What the serializer said.
    pub reason: String,
}

/// Every Trellis CRD, sorted by name.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut all = vec![AuthorizationPolicy::crd()];
    all.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    all
}

/// The chart's file for `crd`: `<metadata.name>.yaml`, e.g.
/// `authorizationpolicies.policy.trellis.dev.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default())
}

/// `crds` as one YAML stream: [`HEADER`], then the documents separated by `---`. Keys are
/// sorted, so the bytes depend on the CRDs alone (not on serde_json's `preserve_order`,
/// which another crate of a build may switch on), and whole numbers are written as
/// integers (`minimum: 1`, not `1.0`).
pub fn to_yaml(crds: &[CustomResourceDefinition]) -> Result<String, RenderError> {
    let mut out = HEADER.to_owned();
    for (i, crd) in crds.iter().enumerate() {
        let error = |reason: String| RenderError {
            name: crd.metadata.name.clone().unwrap_or_default(),
            reason,
        };
        let json = serde_json::to_value(crd).map_err(|e| error(e.to_string()))?;
        let text = serde_yaml::to_string(&yaml(&json)).map_err(|e| error(e.to_string()))?;
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&text);
    }
    Ok(out)
}

/// `value` as YAML with every mapping's keys sorted.
fn yaml(value: &serde_json::Value) -> Yaml {
    use serde_json::Value as Json;
    match value {
        Json::Null => Yaml::Null,
        Json::Bool(b) => Yaml::Bool(*b),
        Json::Number(n) => number(n),
        Json::String(s) => Yaml::String(s.clone()),
        Json::Array(items) => Yaml::Sequence(items.iter().map(yaml).collect()),
        Json::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Yaml::Mapping(
                entries
                    .into_iter()
                    .map(|(k, v)| (Yaml::String(k.clone()), yaml(v)))
                    .collect(),
            )
        }
    }
}

/// Largest magnitude below which every whole `f64` is exactly an integer (2^53).
const EXACT_F64: f64 = 9_007_199_254_740_992.0;

/// A number as YAML. `JSONSchemaProps` keeps `minimum` and `maximum` as floats (Go's
/// float64, k8s-openapi's `f64`), which would print `maximum: 65535.0`: a whole float is
/// written as the integer it is (the API server reads either as the same number).
fn number(n: &serde_json::Number) -> Yaml {
    if let Some(u) = n.as_u64() {
        return Yaml::Number(u.into());
    }
    if let Some(i) = n.as_i64() {
        return Yaml::Number(i.into());
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    if f.fract() == 0.0 && f.abs() < EXACT_F64 {
        // Exact: whole and within ±2^53, so the cast neither rounds nor saturates.
        #[allow(clippy::cast_possible_truncation)]
        return Yaml::Number((f as i64).into());
    }
    Yaml::Number(f.into())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// The `openAPIV3Schema` of the AuthorizationPolicy CRD, as rendered (YAML read back).
    fn schema() -> Value {
        let text = to_yaml(&[AuthorizationPolicy::crd()]).unwrap();
        let crd: Value = serde_yaml::from_str(&text).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    /// The Kubernetes structural-schema rules (apiextensions v1) a generated schema could
    /// break, as `path: problem` lines.
    fn structural_problems(node: &Value, path: &str, out: &mut Vec<String>) {
        let Some(obj) = node.as_object() else {
            out.push(format!("{path}: not an object"));
            return;
        };
        for key in [
            "$ref", "$schema", "oneOf", "anyOf", "allOf", "not", "nullable",
        ] {
            if obj.contains_key(key) {
                out.push(format!("{path}: {key}"));
            }
        }
        match obj.get("type").and_then(Value::as_str) {
            Some("object") => {
                if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
                    out.push(format!("{path}: properties with additionalProperties"));
                }
                for (name, prop) in obj
                    .get("properties")
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    structural_problems(prop, &format!("{path}.{name}"), out);
                }
            }
            Some("array") => match obj.get("items") {
                Some(items) => structural_problems(items, &format!("{path}[]"), out),
                None => out.push(format!("{path}: array without items")),
            },
            Some("string" | "integer" | "number" | "boolean") => {}
            other => out.push(format!("{path}: type {other:?}")),
        }
        // Kubernetes knows a fixed set of formats; none of schemars' (uint16, int32...)
        // is needed here.
        if let Some(format) = obj.get("format") {
            out.push(format!("{path}: format {format}"));
        }
    }

    #[test]
    fn the_schema_is_structural() {
        let mut problems = Vec::new();
        structural_problems(&schema(), "", &mut problems);
        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn ports_are_integers_from_1_to_65535() {
        let schema = schema();
        let ports = schema
            .pointer("/properties/spec/properties/rules/items/properties/to/items/properties/ports")
            .unwrap();
        assert_eq!(
            ports["items"],
            json!({"type": "integer", "minimum": 1, "maximum": 65535})
        );
        assert_eq!(ports["maxItems"], json!(64));
        let text = to_yaml(&crds()).unwrap();
        assert!(text.contains("maximum: 65535\n"), "{text}");
        assert!(text.contains("minimum: 1\n"), "{text}");
        assert!(!text.contains(".0\n"), "a float bound: {text}");
    }

    #[test]
    fn every_list_and_string_carries_the_agreed_limit() {
        let spec = &schema()["properties"]["spec"]["properties"];
        let rule = &spec["rules"]["items"]["properties"];
        let from = &rule["from"]["items"]["properties"];
        let to = &rule["to"]["items"]["properties"];
        for (what, list) in [
            ("targetRefs", &spec["targetRefs"]),
            ("rules", &spec["rules"]),
            ("from", &rule["from"]),
            ("to", &rule["to"]),
            ("principals", &from["principals"]),
            ("namespaces", &from["namespaces"]),
            ("serviceAccounts", &from["serviceAccounts"]),
            ("ports", &to["ports"]),
            ("methods", &to["methods"]),
            ("paths", &to["paths"]),
        ] {
            assert_eq!(list["maxItems"], json!(64), "{what}");
        }
        for (what, string, max) in [
            ("principals", &from["principals"]["items"], 1024),
            ("namespaces", &from["namespaces"]["items"], 253),
            ("serviceAccounts", &from["serviceAccounts"]["items"], 253),
            ("methods", &to["methods"]["items"], 253),
            ("paths", &to["paths"]["items"], 1024),
            (
                "targetRefs.name",
                &spec["targetRefs"]["items"]["properties"]["name"],
                253,
            ),
        ] {
            assert_eq!(
                (&string["minLength"], &string["maxLength"]),
                (&json!(1), &json!(max)),
                "{what}"
            );
        }
        let target = &spec["targetRefs"]["items"]["properties"];
        assert_eq!(target["kind"]["enum"], json!(["Service"]));
        assert_eq!(target["group"]["enum"], json!([""]));
        assert_eq!(spec["action"]["enum"], json!(["ALLOW", "DENY"]));
        // serde's defaults, which the API server applies too.
        assert_eq!(spec["action"]["default"], json!("ALLOW"));
        assert_eq!(spec["dryRun"]["default"], json!(false));
        assert_eq!(target["group"]["default"], json!(""));
    }

    #[test]
    fn the_schema_patterns_admit_what_the_control_plane_parses() {
        // The `regex` crate is RE2, the syntax the API server's Go `regexp` checks
        // `pattern` with: the CRD admits exactly the values `Pattern::parse` accepts.
        use crate::policy::{SCHEMA_PATTERN_REGEX, SCHEMA_SERVICE_ACCOUNT_REGEX};
        use trellis_api::authz::Pattern;
        let pattern = regex::Regex::new(SCHEMA_PATTERN_REGEX).unwrap();
        for value in [
            "*", "GET", "/a*", "*.svc", "", "**", "a*b", "*a*", "/a/*/b", "*/", "x", "-*-",
        ] {
            assert_eq!(
                pattern.is_match(value),
                Pattern::parse(value, String::new).is_ok(),
                "{value:?}"
            );
        }
        let service_account = regex::Regex::new(SCHEMA_SERVICE_ACCOUNT_REGEX).unwrap();
        for (value, ok) in [
            ("client", true),
            ("shop/client", true),
            ("shop/client.v2", true),
            ("a", true),
            ("cli*", false),
            ("Client", false),
            ("shop/", false),
            ("/client", false),
            ("a/b/c", false),
            ("shop.eu/client", false),
            ("-client", false),
            ("", false),
        ] {
            assert_eq!(service_account.is_match(value), ok, "{value:?}");
        }
    }

    #[test]
    fn printer_columns_short_name_and_category() {
        let text = to_yaml(&crds()).unwrap();
        let crd: Value = serde_yaml::from_str(&text).unwrap();
        let names = &crd["spec"]["names"];
        assert_eq!(names["shortNames"], json!(["authz"]));
        assert_eq!(names["categories"], json!(["trellis"]));
        assert_eq!(
            crd["spec"]["versions"][0]["additionalPrinterColumns"],
            json!([
                {"name": "Action", "type": "string", "jsonPath": ".spec.action"},
                {"name": "Dry-run", "type": "boolean", "jsonPath": ".spec.dryRun"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ])
        );
    }

    #[test]
    fn yaml_starts_with_the_header_and_separates_documents() {
        let one = AuthorizationPolicy::crd();
        let text = to_yaml(&[one.clone(), one]).unwrap();
        assert!(text.starts_with(HEADER));
        assert!(!text.starts_with(&format!("{HEADER}---")));
        assert_eq!(text.matches("\n---\n").count(), 1);
        assert_eq!(
            text.matches("apiVersion: apiextensions.k8s.io/v1\n")
                .count(),
            2
        );
        assert_eq!(
            file_name(&crds()[0]),
            "authorizationpolicies.policy.trellis.dev.yaml"
        );
    }

    #[test]
    fn whole_floats_become_integers_and_keys_are_sorted() {
        let value = json!({"b": 65535.0, "a": [1.5, -3.0, 7]});
        assert_eq!(
            serde_yaml::to_string(&yaml(&value)).unwrap(),
            "a:\n- 1.5\n- -3\n- 7\nb: 65535\n"
        );
    }
}
