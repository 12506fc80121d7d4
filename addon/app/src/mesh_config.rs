//! The `trellis-config` ConfigMap, read from a file (`--mesh-config`), and its `ca` key.
//!
//! The file is the ConfigMap exactly as it would be applied to a cluster:
//!
//! ```yaml
//! apiVersion: v1
//! kind: ConfigMap
//! metadata: {name: trellis-config, namespace: trellis-system}
//! data:
//!   ca: |
//!     source: secret              # self-signed | secret | keyvault-secret | keyvault-key
//!     secret: {path: /etc/trellis/cacerts}
//!     reloadInterval: 60s
//!     propagation: 15s
//! ```
//!
//! Parsing is pure and names the failing field (`data.ca: keyvault.url: …`); the caller
//! keeps the running configuration when a new version is bad.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Name of the mesh ConfigMap.
pub(crate) const CONFIG_MAP_NAME: &str = "trellis-config";
/// Namespace of the mesh ConfigMap.
pub(crate) const CONFIG_MAP_NAMESPACE: &str = "trellis-system";

/// The settings read from the mesh ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct MeshConfig {
    /// Where the CA's material comes from.
    pub(crate) ca: CaSettings,
}

/// The `ca` key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct CaSettings {
    /// Which source (default `self-signed`).
    #[serde(default)]
    pub(crate) source: CaSourceKind,
    /// For `source: secret`.
    #[serde(default)]
    pub(crate) secret: Option<SecretSettings>,
    /// For `source: keyvault-secret` and `keyvault-key`.
    #[serde(default)]
    pub(crate) keyvault: Option<KeyVaultSettings>,
    /// How often the source is re-read (default 60s).
    #[serde(default = "default_reload", with = "humantime_serde_like")]
    pub(crate) reload_interval: Duration,
    /// How long new roots are pushed before the new CA signs (default 15s).
    #[serde(default = "default_propagation", with = "humantime_serde_like")]
    pub(crate) propagation: Duration,
}

/// The CA sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum CaSourceKind {
    /// A root generated at first start and kept in the state directory (local profile).
    #[default]
    SelfSigned,
    /// A directory in the Istio `cacerts` layout (a mounted Kubernetes Secret).
    Secret,
    /// Key Vault secrets with the AKS Istio add-on's names.
    KeyvaultSecret,
    /// A non-exportable root key in Key Vault that signs an in-memory intermediate.
    KeyvaultKey,
}

/// `ca.secret`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SecretSettings {
    /// The mounted directory.
    pub(crate) path: PathBuf,
}

/// `ca.keyvault`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct KeyVaultSettings {
    /// Vault URL, `https://<name>.vault.azure.net/`.
    pub(crate) url: String,
    /// `workload-identity` (default on AKS), `managed-identity` or `developer`.
    #[serde(default)]
    pub(crate) credential: Option<String>,
    /// Secret names for `keyvault-secret` (defaults: the AKS Istio add-on's).
    #[serde(default)]
    pub(crate) secret_names: Option<BTreeMap<String, String>>,
    /// The root key for `keyvault-key`.
    #[serde(default)]
    pub(crate) key_name: Option<String>,
    /// The secret holding the root certificate for `keyvault-key`.
    #[serde(default)]
    pub(crate) root_cert_secret: Option<String>,
    /// Lifetime of the in-memory intermediate for `keyvault-key` (default 30 days).
    #[serde(default, with = "humantime_serde_like_opt")]
    pub(crate) intermediate_ttl: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigMapDoc {
    api_version: String,
    kind: String,
    metadata: Meta,
    #[serde(default)]
    data: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

// === impl CaSettings ===

impl Default for CaSettings {
    fn default() -> Self {
        Self {
            source: CaSourceKind::SelfSigned,
            secret: None,
            keyvault: None,
            reload_interval: default_reload(),
            propagation: default_propagation(),
        }
    }
}

fn default_reload() -> Duration {
    Duration::from_secs(60)
}

fn default_propagation() -> Duration {
    Duration::from_secs(15)
}

/// Parses the ConfigMap text. Errors name the field: `data.ca: secret.path: missing field`.
pub(crate) fn parse(text: &str) -> Result<MeshConfig, String> {
    let de = serde_yaml::Deserializer::from_str(text);
    let doc: ConfigMapDoc =
        serde_path_to_error::deserialize(de).map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    if doc.api_version != "v1" || doc.kind != "ConfigMap" {
        return Err(format!(
            "expected apiVersion v1, kind ConfigMap; found {} {}",
            doc.api_version, doc.kind
        ));
    }
    let namespace = doc.metadata.namespace.as_deref().unwrap_or("default");
    if doc.metadata.name != CONFIG_MAP_NAME || namespace != CONFIG_MAP_NAMESPACE {
        return Err(format!(
            "metadata: expected {CONFIG_MAP_NAMESPACE}/{CONFIG_MAP_NAME}, found {namespace}/{}",
            doc.metadata.name
        ));
    }
    let mut config = MeshConfig::default();
    for (key, value) in &doc.data {
        match key.as_str() {
            "ca" => {
                let de = serde_yaml::Deserializer::from_str(value);
                config.ca = serde_path_to_error::deserialize(de)
                    .map_err(|e| format!("data.ca: {}", field_error(&e)))?;
                validate_ca(&config.ca).map_err(|e| format!("data.ca: {e}"))?;
            }
            other => return Err(format!("data.{other}: unknown key (known: ca)")),
        }
    }
    Ok(config)
}

/// `<path>: <message>`; serde_yaml already puts the path in some messages.
fn field_error(e: &serde_path_to_error::Error<serde_yaml::Error>) -> String {
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    let inner = match inner.split_once(": ") {
        Some((head, rest)) if path.starts_with(head) => rest,
        _ => &inner,
    };
    format!("{path}: {inner}")
}

/// Cross-field rules serde cannot express.
fn validate_ca(ca: &CaSettings) -> Result<(), String> {
    if ca.reload_interval < Duration::from_secs(1) {
        return Err("reloadInterval: must be at least 1s".to_owned());
    }
    match ca.source {
        CaSourceKind::SelfSigned => {}
        CaSourceKind::Secret => {
            if ca.secret.is_none() {
                return Err("secret.path: required when source is secret".to_owned());
            }
        }
        CaSourceKind::KeyvaultSecret | CaSourceKind::KeyvaultKey => {
            let Some(kv) = &ca.keyvault else {
                return Err("keyvault.url: required when source is a Key Vault".to_owned());
            };
            if !kv.url.starts_with("https://") {
                return Err(format!("keyvault.url: must be https, got {:?}", kv.url));
            }
            if ca.source == CaSourceKind::KeyvaultKey && kv.key_name.is_none() {
                return Err("keyvault.keyName: required when source is keyvault-key".to_owned());
            }
            if let Some(names) = &kv.secret_names {
                for key in names.keys() {
                    if !["rootCert", "caCert", "caKey", "certChain"].contains(&key.as_str()) {
                        return Err(format!(
                            "keyvault.secretNames.{key}: unknown (known: rootCert, caCert, caKey, certChain)"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Durations written as `30s`, `15m`, `720h`.
mod humantime_serde_like {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

mod humantime_serde_like_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(ca: &str) -> String {
        let indented: String = ca.lines().map(|l| format!("    {l}\n")).collect();
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: trellis-config, namespace: trellis-system}}\ndata:\n  ca: |\n{indented}"
        )
    }

    #[test]
    fn defaults_to_self_signed() {
        let c = parse(&cm("source: self-signed")).unwrap();
        assert_eq!(c.ca, CaSettings::default());
        let empty = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: trellis-config, namespace: trellis-system}\n";
        assert_eq!(parse(empty).unwrap(), MeshConfig::default());
    }

    #[test]
    fn secret_source_with_durations() {
        let c = parse(&cm(
            "source: secret\nsecret: {path: /etc/cacerts}\nreloadInterval: 5s\npropagation: 2s",
        ))
        .unwrap();
        assert_eq!(c.ca.source, CaSourceKind::Secret);
        assert_eq!(c.ca.secret.unwrap().path, PathBuf::from("/etc/cacerts"));
        assert_eq!(c.ca.reload_interval, Duration::from_secs(5));
        assert_eq!(c.ca.propagation, Duration::from_secs(2));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (cm("source: vault"), "data.ca: source: unknown variant `vault`"),
            (cm("source: secret"), "data.ca: secret.path: required"),
            (cm("source: secret\nsecret: {pth: /x}"), "data.ca: secret.pth: unknown field `pth`"),
            (cm("reloadInterval: soon"), "data.ca: reloadInterval: "),
            (
                cm("source: keyvault-secret\nkeyvault: {url: http://v}"),
                "data.ca: keyvault.url: must be https",
            ),
            (
                cm("source: keyvault-key\nkeyvault: {url: https://v}"),
                "data.ca: keyvault.keyName: required",
            ),
            (
                cm("source: keyvault-secret\nkeyvault: {url: https://v, secretNames: {root: r}}"),
                "data.ca: keyvault.secretNames.root: unknown",
            ),
            (
                cm("colour: blue"),
                "data.ca: colour: unknown field `colour`",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: trellis-config, namespace: trellis-system}\ndata: {cas: x}\n".to_owned(),
                "data.cas: unknown key",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other, namespace: trellis-system}\n".to_owned(),
                "metadata: expected trellis-system/trellis-config",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.starts_with(expected), "{expected:?} vs {err:?}");
        }
    }
}
