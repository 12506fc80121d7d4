//! The `trellis-config` ConfigMap: mesh-wide settings, typed, each with a documented default
//! (`docs/config.md` is the reference).
//!
//! The file given with `--mesh-config` is the ConfigMap exactly as it would be applied to a
//! cluster. Every value under `data` is a string holding one YAML document (a ConfigMap's
//! data is `map[string]string`):
//!
//! ```yaml
//! apiVersion: v1
//! kind: ConfigMap
//! metadata: {name: trellis-config, namespace: trellis-system}
//! data:
//!   trustDomain: cluster.local
//!   ca: |
//!     source: secret              # self-signed | secret | keyvault-secret | keyvault-key
//!     secret: {path: /etc/trellis/cacerts}
//!   discovery: |
//!     scope: {default: ["*"], namespaces: {shop: [payments]}}
//!   proxy: |
//!     logLevel: info
//!     accessLog: true
//! ```
//!
//! [`parse_config_map_data`] is pure and is what both the file poller and the admission
//! webhook (`crate::webhook`) run, so the two cannot disagree. Errors name the field
//! (`data.ca: keyvault.url: must be https, got "http://v"`); an unknown key, or an unknown
//! field inside a key, is an error, never ignored. The caller keeps the running
//! configuration when a new version is bad.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use trellis_identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};

/// Name of the mesh ConfigMap.
pub(crate) const CONFIG_MAP_NAME: &str = "trellis-config";
/// Namespace of the mesh ConfigMap, and of the control plane: every proxy sees its services.
pub(crate) const CONFIG_MAP_NAMESPACE: &str = "trellis-system";
/// The keys of `data` this version reads, sorted as error messages list them.
pub(crate) const KNOWN_KEYS: [&str; 6] = [
    "ca",
    "discovery",
    "outboundTrafficPolicy",
    "proxy",
    "tracing",
    "trustDomain",
];

/// The settings read from the mesh ConfigMap. `Default` is what an empty ConfigMap (or no
/// `--mesh-config`) means.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct MeshConfig {
    /// `ca`: where the CA's material comes from.
    pub(crate) ca: CaSettings,
    /// `trustDomain`, validated; `None` when the ConfigMap does not set it, so that
    /// `--trust-domain` alone may choose ([`RunningTrustDomain::resolve`]; both unset:
    /// `cluster.local`).
    pub(crate) trust_domain: Option<String>,
    /// `discovery`: what each proxy is sent.
    pub(crate) discovery: DiscoverySettings,
    /// `proxy`: what the injector and `trellis demo` pass to proxies.
    pub(crate) proxy: ProxySettings,
    /// `outboundTrafficPolicy`: what proxies do with destinations outside the mesh.
    pub(crate) outbound_traffic_policy: OutboundTrafficPolicy,
    /// `tracing`: how often proxies sample new traces and where spans go.
    pub(crate) tracing: trellis_api::Tracing,
}

/// The `tracing` key as written. Converted to [`trellis_api::Tracing`] by
/// [`parse_tracing`], which checks the values.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TracingDoc {
    /// Percent of new traces sampled, 0 to 100 (Istio's `sampling`). Default 1.
    #[serde(default = "default_sampling")]
    sampling: f64,
    /// Where spans go: `mesh` (the control plane's telemetry gateway) or an OTLP/gRPC URL
    /// (`http://collector:4317`). Absent: tracing is off.
    #[serde(default)]
    otlp: Option<String>,
}

fn default_sampling() -> f64 {
    1.0
}

/// The `outboundTrafficPolicy` key, as in Istio's `meshConfig.outboundTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct OutboundTrafficPolicy {
    /// `ALLOW_ANY` (default): connections to destinations outside the mesh pass through;
    /// `REGISTRY_ONLY`: they are refused.
    #[serde(default)]
    pub(crate) mode: OutboundMode,
}

/// `outboundTrafficPolicy.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub(crate) enum OutboundMode {
    /// Pass through (the default).
    #[default]
    #[serde(rename = "ALLOW_ANY")]
    AllowAny,
    /// Refuse.
    #[serde(rename = "REGISTRY_ONLY")]
    RegistryOnly,
}

impl OutboundMode {
    /// The value discovery sends to proxies.
    pub(crate) fn policy(self) -> trellis_api::OutboundPolicy {
        match self {
            Self::AllowAny => trellis_api::OutboundPolicy::AllowAny,
            Self::RegistryOnly => trellis_api::OutboundPolicy::RegistryOnly,
        }
    }
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

/// The `discovery` key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct DiscoverySettings {
    /// `discovery.scope`: which namespaces' services each proxy is sent.
    pub(crate) scope: DiscoveryScope,
}

/// Which namespaces' services a proxy receives, by the proxy's namespace (like an Istio
/// `Sidecar`'s egress hosts, mesh-wide): the discovery server's own type, so what is
/// validated here is exactly what it applies. A proxy always receives its own namespace and
/// `trellis-system`. Default: every namespace for every proxy.
pub(crate) use trellis_discovery::{NamespaceSet, Scope as DiscoveryScope};

/// The `proxy` key: settings handed to every proxy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ProxySettings {
    /// `resources`: requests and limits of the injected proxy container, taken as
    /// written (an entry left out is left out of the pod). Absent: 50m CPU and 64Mi
    /// requested, 256Mi memory limit, no CPU limit (which would throttle the data path).
    /// Applies to pods created after the change; running pods keep theirs.
    #[serde(default)]
    pub(crate) resources: Option<ProxyResources>,
    /// `logLevel`: the proxy's log level (default `info`).
    #[serde(default)]
    pub(crate) log_level: LogLevel,
    /// `accessLog`: one `access` line per request (default `true`), whatever `logLevel`.
    #[serde(default = "default_access_log")]
    pub(crate) access_log: bool,
    /// `accessLogFormat`: `text` (default, `key=value`) or `json` (one object per line).
    #[serde(default)]
    pub(crate) access_log_format: AccessLogFormat,
}

/// `proxy.accessLogFormat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AccessLogFormat {
    /// `key=value` text lines.
    #[default]
    Text,
    /// One JSON object per line, fixed field names.
    Json,
}

/// `proxy.logLevel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default.
    #[default]
    Info,
    /// Verbose.
    Debug,
    /// Everything.
    Trace,
}

/// One thing wrong with a ConfigMap, naming the field.
///
/// Displays as `<field>: <path>: <reason>` (`data.ca: keyvault.url: must be https, ...`),
/// or `<field>: <reason>` when the value as a whole is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigProblem {
    /// The ConfigMap field at fault: `data.<key>`, `binaryData.<key>`, `metadata`, ...
    pub(crate) field: String,
    /// Where inside that key's YAML document (`keyvault.url`, `scope.default[1]`); empty
    /// when the value as a whole is at fault.
    pub(crate) path: String,
    /// Why, for a person.
    pub(crate) reason: String,
}

/// Everything wrong with a ConfigMap: one [`ConfigProblem`] per bad key (at least one),
/// in key order. Displays as the problems joined by `; `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError {
    problems: Vec<ConfigProblem>,
}

/// The trust domain the control plane runs with: chosen once at startup from
/// `--trust-domain` and the ConfigMap's `trustDomain`, and never changed by a reload
/// (every certificate and identity in the mesh carries it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunningTrustDomain {
    value: String,
    flag: Option<String>,
}

/// A problem inside one key's value, before it is tied to the key.
#[derive(Debug)]
struct Bad {
    path: String,
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigMapDoc {
    api_version: String,
    kind: String,
    metadata: Meta,
    #[serde(default)]
    data: Option<BTreeMap<String, String>>,
    #[serde(default)]
    binary_data: Option<BTreeMap<String, serde_yaml::Value>>,
    // A valid ConfigMap field with nothing for trellis to act on.
    #[serde(default, rename = "immutable")]
    _immutable: Option<bool>,
}

// Not deny_unknown_fields: `kubectl get -o yaml` output carries uid, resourceVersion,
// labels, annotations and more, all legitimate.
#[derive(Debug, Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscoveryDoc {
    #[serde(default)]
    scope: ScopeDoc,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeDoc {
    #[serde(default)]
    default: Option<Vec<String>>,
    #[serde(default)]
    namespaces: BTreeMap<String, Vec<String>>,
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

// === impl ProxySettings ===

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            resources: None,
            log_level: LogLevel::Info,
            access_log: default_access_log(),
            access_log_format: AccessLogFormat::Text,
        }
    }
}

/// `proxy.resources`, as in a container spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProxyResources {
    /// `requests`.
    #[serde(default)]
    pub(crate) requests: ResourceList,
    /// `limits`.
    #[serde(default)]
    pub(crate) limits: ResourceList,
}

/// `cpu` and `memory` quantities (`50m`, `64Mi`, `0.5`, `1G`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResourceList {
    /// `cpu`.
    pub(crate) cpu: Option<String>,
    /// `memory`.
    pub(crate) memory: Option<String>,
}

/// The value of a Kubernetes quantity (`resource.Quantity`): a decimal number, then a
/// binary (`Ki` .. `Ei`), decimal (`m`, `k`, `M` .. `E`) or exponent (`e3`) suffix.
/// The API server would refuse a pod with a bad one, so the injector must never write it.
fn quantity(text: &str) -> Result<f64, String> {
    let bad = || format!("{text:?} is not a Kubernetes quantity (e.g. 50m, 0.5, 64Mi, 1G)");
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => match suffix.strip_prefix(['e', 'E']).map(str::parse::<i32>) {
            Some(Ok(exp)) if (-18..=18).contains(&exp) => 10f64.powi(exp),
            _ => return Err(bad()),
        },
    };
    Ok(value * scale)
}

impl ProxyResources {
    /// Every quantity parses, and no request is above its limit (the API server would
    /// refuse every injected pod).
    fn validate(&self) -> Result<(), Bad> {
        let mut parsed = [[None; 2]; 2];
        for (i, (section, list)) in [("requests", &self.requests), ("limits", &self.limits)]
            .into_iter()
            .enumerate()
        {
            for (j, (name, value)) in [("cpu", &list.cpu), ("memory", &list.memory)]
                .into_iter()
                .enumerate()
            {
                if let Some(v) = value {
                    let q = quantity(v)
                        .map_err(|e| Bad::inside(format!("resources.{section}.{name}"), e))?;
                    parsed[i][j] = Some(q);
                }
            }
        }
        for (j, name) in ["cpu", "memory"].into_iter().enumerate() {
            if let (Some(request), Some(limit)) = (parsed[0][j], parsed[1][j])
                && request > limit
            {
                return Err(Bad::inside(
                    format!("resources.requests.{name}"),
                    format!(
                        "{} is above limits.{name} {}: Kubernetes would refuse every injected pod",
                        self.requests.get(name),
                        self.limits.get(name)
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl ResourceList {
    fn get(&self, name: &str) -> &str {
        let v = if name == "cpu" {
            &self.cpu
        } else {
            &self.memory
        };
        v.as_deref().unwrap_or_default()
    }
}

fn parse_proxy(value: &str) -> Result<ProxySettings, Bad> {
    let proxy: ProxySettings = parse_value(value)?;
    if let Some(resources) = &proxy.resources {
        resources.validate()?;
    }
    Ok(proxy)
}

fn default_access_log() -> bool {
    true
}

impl ProxySettings {
    /// The proxy's `TRELLIS_LOG` filter for these settings, e.g. `info,access=info` or
    /// `debug,access=off`. Access lines are `info` events of target `access`, so the
    /// second directive makes `accessLog` independent of `logLevel`.
    pub(crate) fn log_filter(&self) -> String {
        let access = if self.access_log { "info" } else { "off" };
        format!("{},access={access}", self.log_level.as_str())
    }

    /// The access log discovery sends every proxy (`accessLog` and `accessLogFormat`).
    pub(crate) fn access_log(&self) -> trellis_api::AccessLog {
        match (self.access_log, self.access_log_format) {
            (false, _) => trellis_api::AccessLog::Off,
            (true, AccessLogFormat::Text) => trellis_api::AccessLog::Text,
            (true, AccessLogFormat::Json) => trellis_api::AccessLog::Json,
        }
    }
}

// === impl LogLevel ===

impl LogLevel {
    /// As written in the ConfigMap and understood by `TRELLIS_LOG`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

// === impl ConfigProblem ===

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.field, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.field, self.path, self.reason)
        }
    }
}

// === impl ConfigError ===

impl ConfigError {
    fn one(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            problems: vec![ConfigProblem {
                field: field.into(),
                path: String::new(),
                reason: reason.into(),
            }],
        }
    }

    /// Every problem found, in key order.
    pub(crate) fn problems(&self) -> &[ConfigProblem] {
        &self.problems
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// === impl RunningTrustDomain ===

impl RunningTrustDomain {
    /// Chooses the trust domain at startup: the flag, else the ConfigMap's `trustDomain`,
    /// else `cluster.local`. When both are set and differ, that is an error naming both:
    /// silently preferring one would mint identities the other side does not expect.
    pub(crate) fn resolve(flag: Option<&str>, config: &MeshConfig) -> Result<Self, String> {
        if let Some(flag) = flag {
            check_trust_domain(flag).map_err(|e| format!("--trust-domain: {e}"))?;
        }
        let value = match (flag, config.trust_domain.as_deref()) {
            (Some(flag), Some(file)) if flag != file => {
                return Err(format!(
                    "--trust-domain {flag:?} and the mesh config's data.trustDomain {file:?} \
                     differ: set one of them, or the same value in both"
                ));
            }
            (Some(td), _) | (None, Some(td)) => td,
            (None, None) => DEFAULT_TRUST_DOMAIN,
        };
        Ok(Self {
            value: value.to_owned(),
            flag: flag.map(str::to_owned),
        })
    }

    /// The trust domain.
    pub(crate) fn as_str(&self) -> &str {
        &self.value
    }

    /// Checks a reloaded config against the running trust domain: a different one (set,
    /// changed, or removed so the default would apply) is refused, since certificates,
    /// identities and the CA all carry it; the caller keeps the running config.
    pub(crate) fn check_reload(&self, next: &MeshConfig) -> Result<(), ConfigError> {
        let next_value = next
            .trust_domain
            .as_deref()
            .or(self.flag.as_deref())
            .unwrap_or(DEFAULT_TRUST_DOMAIN);
        if next_value == self.value {
            return Ok(());
        }
        Err(ConfigError::one(
            "data.trustDomain",
            format!(
                "changing trustDomain needs a restart (running {:?}, new {next_value:?}); \
                 keeping the running config",
                self.value
            ),
        ))
    }
}

/// Parses the ConfigMap file (`--mesh-config`): checks it is `v1/ConfigMap`
/// `trellis-system/trellis-config`, then [`parse_config_map_data`].
pub(crate) fn parse(text: &str) -> Result<MeshConfig, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    let doc: ConfigMapDoc = serde_path_to_error::deserialize(de).map_err(|e| {
        let bad = serde_bad(&e);
        if bad.path.is_empty() {
            return ConfigError::one("document", bad.reason);
        }
        // `proxy: {logLevel: debug}` instead of `proxy: |` and YAML below it.
        let hint = if bad.path.starts_with("data.") && bad.reason.contains("expected a string") {
            " (every data value is a string holding YAML: write `key: |` with the YAML \
             indented below it)"
        } else {
            ""
        };
        ConfigError::one(bad.path, format!("{}{hint}", bad.reason))
    })?;
    if doc.api_version != "v1" {
        return Err(ConfigError::one(
            "apiVersion",
            format!("expected v1, found {:?}", doc.api_version),
        ));
    }
    if doc.kind != "ConfigMap" {
        return Err(ConfigError::one(
            "kind",
            format!("expected ConfigMap, found {:?}", doc.kind),
        ));
    }
    let namespace = doc.metadata.namespace.as_deref().unwrap_or("default");
    if doc.metadata.name != CONFIG_MAP_NAME || namespace != CONFIG_MAP_NAMESPACE {
        return Err(ConfigError::one(
            "metadata",
            format!(
                "expected {CONFIG_MAP_NAMESPACE}/{CONFIG_MAP_NAME}, found {namespace}/{}",
                doc.metadata.name
            ),
        ));
    }
    let binary: Vec<&str> = doc
        .binary_data
        .iter()
        .flatten()
        .map(|(k, _)| k.as_str())
        .collect();
    parse_config_map_data(&doc.data.unwrap_or_default(), &binary)
}

/// Parses and validates the `data` of the `trellis-config` ConfigMap; the one function
/// behind both the file poller and the admission webhook.
///
/// Each value is a YAML document. Every key is checked, so one error lists every bad key;
/// an unknown key (or any `binaryData` key, which trellis never reads) is an error that
/// lists the known keys.
pub(crate) fn parse_config_map_data(
    data: &BTreeMap<String, String>,
    binary_data_keys: &[&str],
) -> Result<MeshConfig, ConfigError> {
    let mut config = MeshConfig::default();
    let mut problems = Vec::new();
    for (key, value) in data {
        let result = match key.as_str() {
            "ca" => parse_ca(value).map(|ca| config.ca = ca),
            "trustDomain" => parse_trust_domain(value).map(|td| config.trust_domain = Some(td)),
            "discovery" => parse_discovery(value).map(|d| config.discovery = d),
            "proxy" => parse_proxy(value).map(|p| config.proxy = p),
            "outboundTrafficPolicy" => parse_value::<OutboundTrafficPolicy>(value)
                .map(|p| config.outbound_traffic_policy = p),
            "tracing" => parse_tracing(value).map(|t| config.tracing = t),
            _ => Err(Bad::whole(format!(
                "unknown key (known: {})",
                KNOWN_KEYS.join(", ")
            ))),
        };
        if let Err(bad) = result {
            problems.push(bad.at(format!("data.{key}")));
        }
    }
    for key in binary_data_keys {
        problems.push(ConfigProblem {
            field: format!("binaryData.{key}"),
            path: String::new(),
            reason: format!(
                "trellis reads only data (known keys: {})",
                KNOWN_KEYS.join(", ")
            ),
        });
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError { problems })
    }
}

// === impl Bad ===

impl Bad {
    fn whole(reason: impl Into<String>) -> Self {
        Self {
            path: String::new(),
            reason: reason.into(),
        }
    }

    fn inside(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }

    fn at(self, field: String) -> ConfigProblem {
        ConfigProblem {
            field,
            path: self.path,
            reason: self.reason,
        }
    }
}

/// One key's YAML document. An empty value means an empty mapping: every default.
fn parse_value<T: DeserializeOwned>(text: &str) -> Result<T, Bad> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| serde_bad(&e))
}

/// Splits a serde error into its path and message; serde_yaml already puts the path in
/// some messages, which would then say it twice.
fn serde_bad(e: &serde_path_to_error::Error<serde_yaml::Error>) -> Bad {
    let path = e.path().to_string();
    let path = if path == "." { String::new() } else { path };
    let inner = e.inner().to_string();
    let reason = match inner.split_once(": ") {
        Some((head, rest)) if !path.is_empty() && path.starts_with(head) => rest,
        _ => &inner,
    };
    Bad::inside(path, reason)
}

fn parse_ca(value: &str) -> Result<CaSettings, Bad> {
    let ca: CaSettings = parse_value(value)?;
    validate_ca(&ca)?;
    Ok(ca)
}

fn parse_trust_domain(value: &str) -> Result<String, Bad> {
    if value.trim().is_empty() {
        return Err(Bad::whole(format!(
            "must not be empty (leave the key out for {DEFAULT_TRUST_DOMAIN})"
        )));
    }
    let td: String = parse_value(value)?;
    check_trust_domain(&td).map_err(Bad::whole)?;
    Ok(td)
}

/// A SPIFFE trust domain as `trellis_identity` accepts it (the only check it exposes is
/// through a whole id).
fn check_trust_domain(td: &str) -> Result<(), String> {
    SpiffeId::new(td, CONFIG_MAP_NAMESPACE, "trellis-control-plane")
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The `tracing` key: sampling in percent becomes millionths; the OTLP endpoint must be
/// `mesh` or a plain `http://host:port` (proxies speak OTLP/gRPC without TLS to a
/// collector; `mesh` is the mTLS path).
fn parse_tracing(value: &str) -> Result<trellis_api::Tracing, Bad> {
    let doc: TracingDoc = parse_value(value)?;
    if !(0.0..=100.0).contains(&doc.sampling) {
        return Err(Bad::inside(
            "sampling",
            format!("a percentage from 0 to 100, got {}", doc.sampling),
        ));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0..=1e6, checked
    let sampling_per_million = (doc.sampling * 10_000.0).round() as u32;
    let otlp = match doc.otlp.as_deref().map(str::trim) {
        None | Some("") => String::new(),
        Some("mesh") => "mesh".to_owned(),
        Some(url) => {
            let uri: http::Uri = url.parse().map_err(|e| {
                Bad::inside(
                    "otlp",
                    format!("`mesh` or an http:// URL, got {url:?}: {e}"),
                )
            })?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err(Bad::inside(
                    "otlp",
                    format!(
                        "`mesh` or an http://host:port URL of an OTLP/gRPC collector, got {url:?} (https collectors are not supported: use `mesh` for mTLS)"
                    ),
                ));
            }
            url.to_owned()
        }
    };
    Ok(trellis_api::Tracing {
        sampling_per_million,
        otlp,
    })
}

fn parse_discovery(value: &str) -> Result<DiscoverySettings, Bad> {
    let doc: DiscoveryDoc = parse_value(value)?;
    let default = match &doc.scope.default {
        Some(names) => namespace_set("scope.default", names)?,
        None => NamespaceSet::All,
    };
    let mut namespaces = BTreeMap::new();
    for (ns, names) in &doc.scope.namespaces {
        let path = format!("scope.namespaces.{ns}");
        if ns == "*" {
            return Err(Bad::inside(
                path,
                "not a namespace; scope.default is the list for every namespace without its own",
            ));
        }
        check_namespace(ns).map_err(|why| Bad::inside(path.clone(), why))?;
        namespaces.insert(ns.clone(), namespace_set(&path, names)?);
    }
    Ok(DiscoverySettings {
        scope: DiscoveryScope::new(default, namespaces),
    })
}

fn namespace_set(path: &str, names: &[String]) -> Result<NamespaceSet, Bad> {
    if names.iter().any(|n| n == "*") {
        if names.len() > 1 {
            return Err(Bad::inside(
                path,
                r#""*" (every namespace) must be alone in its list"#,
            ));
        }
        return Ok(NamespaceSet::All);
    }
    let mut set = BTreeSet::new();
    for (i, name) in names.iter().enumerate() {
        check_namespace(name).map_err(|why| Bad::inside(format!("{path}[{i}]"), why))?;
        set.insert(name.clone());
    }
    Ok(NamespaceSet::Only(set))
}

/// A Kubernetes namespace name: a DNS-1123 label.
fn check_namespace(name: &str) -> Result<(), String> {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| alnum(b) || b == b'-')
        && name.bytes().next().is_some_and(alnum)
        && name.bytes().last().is_some_and(alnum);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a namespace name (DNS-1123 label: at most 63 lowercase letters, \
             digits and '-', starting and ending with a letter or digit)"
        ))
    }
}

/// Cross-field rules serde cannot express.
fn validate_ca(ca: &CaSettings) -> Result<(), Bad> {
    if ca.reload_interval < Duration::from_secs(1) {
        return Err(Bad::inside("reloadInterval", "must be at least 1s"));
    }
    match ca.source {
        CaSourceKind::SelfSigned => {}
        CaSourceKind::Secret => {
            if ca.secret.is_none() {
                return Err(Bad::inside("secret.path", "required when source is secret"));
            }
        }
        CaSourceKind::KeyvaultSecret | CaSourceKind::KeyvaultKey => {
            let Some(kv) = &ca.keyvault else {
                return Err(Bad::inside(
                    "keyvault.url",
                    "required when source is a Key Vault",
                ));
            };
            if !kv.url.starts_with("https://") {
                return Err(Bad::inside(
                    "keyvault.url",
                    format!("must be https, got {:?}", kv.url),
                ));
            }
            if ca.source == CaSourceKind::KeyvaultKey && kv.key_name.is_none() {
                return Err(Bad::inside(
                    "keyvault.keyName",
                    "required when source is keyvault-key",
                ));
            }
            if let Some(names) = &kv.secret_names {
                for key in names.keys() {
                    if !["rootCert", "caCert", "caKey", "certChain"].contains(&key.as_str()) {
                        return Err(Bad::inside(
                            format!("keyvault.secretNames.{key}"),
                            "unknown (known: rootCert, caCert, caKey, certChain)",
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

fn bad_duration(text: &str, e: &humantime::DurationError) -> String {
    format!("invalid duration {text:?} ({e}); write e.g. 30s, 15m, 720h")
}

/// Durations written as `30s`, `15m`, `720h`.
mod humantime_serde_like {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(super::bad_duration(&s, &e)))
    }
}

mod humantime_serde_like_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| {
            humantime::parse_duration(&s)
                .map_err(|e| serde::de::Error::custom(super::bad_duration(&s, &e)))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: trellis-config, namespace: trellis-system}\n";

    /// A ConfigMap whose `data` holds `key: |` + `value` for each pair.
    fn cm_with(pairs: &[(&str, &str)]) -> String {
        let mut out = format!("{HEADER}data:\n");
        for (key, value) in pairs {
            out.push_str(&format!("  {key}: |\n"));
            for line in value.lines() {
                out.push_str(&format!("    {line}\n"));
            }
        }
        out
    }

    fn cm(ca: &str) -> String {
        cm_with(&[("ca", ca)])
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn only(names: &[&str]) -> NamespaceSet {
        NamespaceSet::Only(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn defaults_to_self_signed() {
        let c = parse(&cm("source: self-signed")).unwrap();
        assert_eq!(c.ca, CaSettings::default());
        assert_eq!(parse(HEADER).unwrap(), MeshConfig::default());
    }

    #[test]
    fn empty_config_means_the_documented_defaults() {
        let c = parse(&format!("{HEADER}data: {{}}\n")).unwrap();
        assert_eq!(c.ca.source, CaSourceKind::SelfSigned);
        assert_eq!(c.ca.reload_interval, Duration::from_secs(60));
        assert_eq!(c.ca.propagation, Duration::from_secs(15));
        assert_eq!(c.trust_domain, None);
        assert!(c.discovery.scope.is_all());
        assert_eq!(c.discovery.scope.set_for("any"), &NamespaceSet::All);
        assert_eq!(c.proxy.log_level, LogLevel::Info);
        assert!(c.proxy.access_log);
        assert_eq!(c.proxy.log_filter(), "info,access=info");
        // An empty value is an empty mapping: all defaults for that key.
        let c = parse(&format!("{HEADER}data: {{proxy: '', discovery: ''}}\n")).unwrap();
        assert_eq!(c, MeshConfig::default());
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
    fn every_key_parses() {
        let text = cm_with(&[
            ("trustDomain", "prod.example.com"),
            ("ca", "source: secret\nsecret: {path: /etc/cacerts}"),
            (
                "discovery",
                "scope:\n  default: [shared]\n  namespaces:\n    shop: [payments, shared]\n    ops: [\"*\"]\n    sandbox: []",
            ),
            ("proxy", "logLevel: debug\naccessLog: false"),
        ]);
        let c = parse(&text).unwrap();
        assert_eq!(c.trust_domain.as_deref(), Some("prod.example.com"));
        assert_eq!(c.ca.source, CaSourceKind::Secret);
        let scope = &c.discovery.scope;
        assert_eq!(scope.set_for("web"), &only(&["shared"]));
        assert_eq!(scope.set_for("shop"), &only(&["payments", "shared"]));
        assert_eq!(scope.set_for("ops"), &NamespaceSet::All);
        assert_eq!(scope.set_for("sandbox"), &only(&[]));
        assert!(!scope.is_all());
        assert_eq!(c.proxy.log_level, LogLevel::Debug);
        assert!(!c.proxy.access_log);
        assert_eq!(c.proxy.log_filter(), "debug,access=off");
    }

    #[test]
    fn discovery_scope_allows() {
        let text = cm_with(&[(
            "discovery",
            "scope: {default: [shared], namespaces: {shop: [payments], ops: [\"*\"], sandbox: []}}",
        )]);
        let scope = parse(&text).unwrap().discovery.scope;
        // (proxy namespace, service namespace, allowed)
        let cases = [
            ("web", "web", true),            // own namespace, always
            ("web", "trellis-system", true), // control plane, always
            ("web", "shared", true),         // default list
            ("web", "payments", false),      // not in the default list
            ("shop", "payments", true),      // its own entry
            ("shop", "shared", false),       // an entry replaces the default
            ("shop", "shop", true),          // own namespace
            ("ops", "anything", true),       // "*"
            ("sandbox", "shared", false),    // empty list: own + trellis-system only
            ("sandbox", "sandbox", true),
            ("sandbox", "trellis-system", true),
        ];
        for (proxy, service, allowed) in cases {
            assert_eq!(
                scope.allows(proxy, service),
                allowed,
                "proxy in {proxy} sees {service}?"
            );
        }
        let all = DiscoveryScope::default();
        assert!(all.allows("a", "b"));
        assert!(all.is_all());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (cm("source: vault"), "data.ca: source: unknown variant `vault`"),
            (cm("source: secret"), "data.ca: secret.path: required"),
            (cm("source: secret\nsecret: {pth: /x}"), "data.ca: secret.pth: unknown field `pth`"),
            (
                cm("reloadInterval: soon"),
                "data.ca: reloadInterval: invalid duration \"soon\" (expected number at 0); \
                 write e.g. 30s, 15m, 720h",
            ),
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
            (cm("colour: blue"), "data.ca: colour: unknown field `colour`"),
            (
                format!("{HEADER}data: {{cas: x}}\n"),
                "data.cas: unknown key (known: ca, discovery, outboundTrafficPolicy, proxy, tracing, trustDomain)",
            ),
            (
                format!("{HEADER}data: {{telemetry: 'sampling: 1'}}\n"),
                "data.telemetry: unknown key (known: ca, discovery, outboundTrafficPolicy, proxy, tracing, trustDomain)",
            ),
            (
                format!("{HEADER}data: {{outboundTrafficPolicy: 'mode: DENY'}}\n"),
                "data.outboundTrafficPolicy: mode: unknown variant `DENY`, expected `ALLOW_ANY` or `REGISTRY_ONLY`",
            ),
            (
                format!("{HEADER}data: {{outboundTrafficPolicy: 'egress: all'}}\n"),
                "data.outboundTrafficPolicy: egress: unknown field `egress`",
            ),
            (
                format!("{HEADER}binaryData: {{ca: eA==}}\n"),
                "binaryData.ca: trellis reads only data",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other, namespace: trellis-system}\n".to_owned(),
                "metadata: expected trellis-system/trellis-config",
            ),
            (
                format!("{HEADER}spec: {{}}\n"),
                "spec: unknown field `spec`",
            ),
            (
                format!("{HEADER}data:\n  proxy: {{logLevel: info}}\n"),
                "data.proxy: invalid type: map, expected a string at line 5 column 10 (every \
                 data value is a string holding YAML: write `key: |` with the YAML indented \
                 below it)",
            ),
            (
                cm_with(&[("trustDomain", "Example.COM")]),
                "data.trustDomain: invalid trust domain \"Example.COM\"",
            ),
            (
                cm_with(&[("trustDomain", "example.com:8443")]),
                "data.trustDomain: invalid trust domain",
            ),
            (
                format!("{HEADER}data: {{trustDomain: ''}}\n"),
                "data.trustDomain: must not be empty",
            ),
            (
                cm_with(&[("trustDomain", "[a, b]")]),
                "data.trustDomain: invalid type: sequence, expected a string",
            ),
            (
                cm_with(&[("discovery", "scope: {default: [\"*\", web]}")]),
                "data.discovery: scope.default: \"*\" (every namespace) must be alone",
            ),
            (
                cm_with(&[("discovery", "scope: {namespaces: {shop: [payments, Bad_NS]}}")]),
                "data.discovery: scope.namespaces.shop[1]: \"Bad_NS\" is not a namespace name",
            ),
            (
                cm_with(&[("discovery", "scope: {namespaces: {Shop: [payments]}}")]),
                "data.discovery: scope.namespaces.Shop: \"Shop\" is not a namespace name",
            ),
            (
                cm_with(&[("discovery", "scope: {namespaces: {\"*\": [payments]}}")]),
                "data.discovery: scope.namespaces.*: not a namespace; scope.default",
            ),
            (
                cm_with(&[("discovery", "scope: {default: [-web]}")]),
                "data.discovery: scope.default[0]: \"-web\" is not a namespace name",
            ),
            (
                cm_with(&[("discovery", &format!("scope: {{default: [{}]}}", "a".repeat(64)))]),
                "data.discovery: scope.default[0]: ",
            ),
            (
                cm_with(&[("discovery", "scope: {defaults: [web]}")]),
                "data.discovery: scope.defaults: unknown field `defaults`",
            ),
            (
                cm_with(&[("discovery", "egress: [web]")]),
                "data.discovery: egress: unknown field `egress`",
            ),
            (
                cm_with(&[("discovery", "scope: {default: web}")]),
                "data.discovery: scope.default: invalid type: string \"web\", expected a sequence",
            ),
            (
                cm_with(&[("proxy", "logLevel: verbose")]),
                "data.proxy: logLevel: unknown variant `verbose`, expected one of `error`, `warn`, `info`, `debug`, `trace`",
            ),
            (
                cm_with(&[("proxy", "accessLog: sometimes")]),
                "data.proxy: accessLog: invalid type: string \"sometimes\", expected a boolean",
            ),
            (
                cm_with(&[("proxy", "logLevel: info\nlogFormat: json")]),
                "data.proxy: logFormat: unknown field `logFormat`",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{expected:?} vs {err:?}");
        }
    }

    #[test]
    fn every_bad_key_is_reported_at_once() {
        let err = parse_config_map_data(
            &data(&[
                ("proxy", "logLevel: loud"),
                ("trustDomain", "UPPER"),
                ("ca", "source: secret"),
                ("colour", "blue"),
            ]),
            &["blob"],
        )
        .unwrap_err();
        let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "data.ca",
                "data.colour",
                "data.proxy",
                "data.trustDomain",
                "binaryData.blob"
            ]
        );
        assert_eq!(err.problems()[0].path, "secret.path");
        assert_eq!(err.problems()[2].path, "logLevel");
        assert_eq!(err.problems()[1].path, "");
        let text = err.to_string();
        assert!(
            text.starts_with(
                "data.ca: secret.path: required when source is secret; data.colour: unknown key"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_data_parser_is_what_the_file_parser_runs() {
        let pairs = [
            ("trustDomain", "example.org"),
            ("discovery", "scope: {default: [a]}"),
        ];
        let from_file = parse(&cm_with(&pairs)).unwrap();
        // The file's block scalars end in a newline; the ConfigMap API would hold the same.
        let with_newlines: Vec<(&str, String)> =
            pairs.iter().map(|(k, v)| (*k, format!("{v}\n"))).collect();
        let map = with_newlines
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        assert_eq!(parse_config_map_data(&map, &[]).unwrap(), from_file);
        assert_eq!(from_file.trust_domain.as_deref(), Some("example.org"));
    }

    #[test]
    fn trust_domain_from_flag_or_config() {
        let with = |td: Option<&str>| MeshConfig {
            trust_domain: td.map(str::to_owned),
            ..MeshConfig::default()
        };
        let ok = |flag: Option<&str>, file: Option<&str>| {
            RunningTrustDomain::resolve(flag, &with(file))
                .unwrap()
                .as_str()
                .to_owned()
        };
        assert_eq!(ok(None, None), "cluster.local");
        assert_eq!(ok(Some("a.example"), None), "a.example");
        assert_eq!(ok(None, Some("b.example")), "b.example");
        assert_eq!(
            ok(Some("same.example"), Some("same.example")),
            "same.example"
        );
        let err =
            RunningTrustDomain::resolve(Some("a.example"), &with(Some("b.example"))).unwrap_err();
        assert_eq!(
            err,
            "--trust-domain \"a.example\" and the mesh config's data.trustDomain \"b.example\" \
             differ: set one of them, or the same value in both"
        );
        let err = RunningTrustDomain::resolve(Some("Bad"), &with(None)).unwrap_err();
        assert!(
            err.starts_with("--trust-domain: invalid trust domain \"Bad\""),
            "{err}"
        );
    }

    #[test]
    fn changing_the_trust_domain_at_runtime_is_refused() {
        let with = |td: Option<&str>| MeshConfig {
            trust_domain: td.map(str::to_owned),
            ..MeshConfig::default()
        };
        // Running from the config file alone.
        let running = RunningTrustDomain::resolve(None, &with(Some("a.example"))).unwrap();
        assert_eq!(running.check_reload(&with(Some("a.example"))), Ok(()));
        let err = running.check_reload(&with(Some("b.example"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "data.trustDomain: changing trustDomain needs a restart (running \"a.example\", \
             new \"b.example\"); keeping the running config"
        );
        // Removing the key would fall back to the default: also a change.
        let err = running.check_reload(&with(None)).unwrap_err();
        assert!(err.to_string().contains("new \"cluster.local\""), "{err}");
        // Running from the flag: the file may leave it out, or repeat it, not change it.
        let running = RunningTrustDomain::resolve(Some("f.example"), &with(None)).unwrap();
        assert_eq!(running.check_reload(&with(None)), Ok(()));
        assert_eq!(running.check_reload(&with(Some("f.example"))), Ok(()));
        assert!(running.check_reload(&with(Some("g.example"))).is_err());
        // Nothing set anywhere: the default stays the default.
        let running = RunningTrustDomain::resolve(None, &with(None)).unwrap();
        assert_eq!(running.check_reload(&with(None)), Ok(()));
        assert_eq!(running.check_reload(&with(Some("cluster.local"))), Ok(()));
    }

    #[test]
    fn proxy_resources_are_taken_as_written_and_checked() {
        let p = parse(&cm_with(&[])).unwrap().proxy;
        assert_eq!(p.resources, None, "absent: the injector's defaults");
        let yaml = "resources:\n  requests: {cpu: 100m, memory: 128Mi}\n  limits: {memory: 1Gi}";
        let r = parse(&cm_with(&[("proxy", yaml)]))
            .unwrap()
            .proxy
            .resources
            .unwrap();
        assert_eq!(r.requests.cpu.as_deref(), Some("100m"));
        assert_eq!(r.requests.memory.as_deref(), Some("128Mi"));
        assert_eq!(
            (r.limits.cpu, r.limits.memory.as_deref()),
            (None, Some("1Gi"))
        );
        for (yaml, error) in [
            (
                "resources: {requests: {cpu: 100 m}}",
                "data.proxy: resources.requests.cpu: \"100 m\" is not a Kubernetes quantity (e.g. 50m, 0.5, 64Mi, 1G)",
            ),
            (
                "resources: {limits: {memory: 64MB}}",
                "data.proxy: resources.limits.memory: \"64MB\" is not a Kubernetes quantity (e.g. 50m, 0.5, 64Mi, 1G)",
            ),
            (
                "resources: {requests: {memory: 512Mi}, limits: {memory: 0.25Gi}}",
                "data.proxy: resources.requests.memory: 512Mi is above limits.memory 0.25Gi: Kubernetes would refuse every injected pod",
            ),
            (
                "resources: {requests: {gpu: 1}}",
                "data.proxy: resources.requests.gpu: unknown field `gpu`, expected `cpu` or `memory`",
            ),
        ] {
            let err = parse(&cm_with(&[("proxy", yaml)])).unwrap_err().to_string();
            assert!(err.contains(error), "{yaml}: {err}");
        }
    }

    #[test]
    fn quantities() {
        for (text, value) in [
            ("50m", 0.05),
            ("1", 1.0),
            ("0.5", 0.5),
            ("64Mi", 64.0 * 1024.0 * 1024.0),
            ("1G", 1e9),
            ("2e3", 2000.0),
            ("1.5Ki", 1536.0),
        ] {
            assert_eq!(quantity(text), Ok(value), "{text}");
        }
        for bad in [
            "", "m", ".", "1..5", "-1", "1 Mi", "1mi", "1e99", "Mi1", "1KiB",
        ] {
            assert!(quantity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn proxy_log_filter() {
        let cases = [
            (LogLevel::Error, true, "error,access=info"),
            (LogLevel::Warn, false, "warn,access=off"),
            (LogLevel::Trace, true, "trace,access=info"),
        ];
        for (log_level, access_log, filter) in cases {
            let p = ProxySettings {
                log_level,
                access_log,
                ..ProxySettings::default()
            };
            assert_eq!(p.log_filter(), filter);
        }
    }

    #[test]
    fn tracing_sampling_and_sink_are_checked() {
        let off = parse(&cm_with(&[])).unwrap().tracing;
        assert_eq!(off, trellis_api::Tracing::default());
        let cases = [
            ("otlp: mesh", 10_000, "mesh"),
            ("sampling: 100\notlp: mesh", 1_000_000, "mesh"),
            (
                "sampling: 0.5\notlp: http://otel.monitoring:4317",
                5_000,
                "http://otel.monitoring:4317",
            ),
            ("sampling: 20", 200_000, ""),
        ];
        for (yaml, per_million, otlp) in cases {
            let t = parse(&cm_with(&[("tracing", yaml)])).unwrap().tracing;
            assert_eq!(
                (t.sampling_per_million, t.otlp.as_str()),
                (per_million, otlp),
                "{yaml:?}"
            );
        }
        for (yaml, want) in [
            (
                "sampling: 101",
                "data.tracing: sampling: a percentage from 0 to 100, got 101",
            ),
            (
                "sampling: -1",
                "data.tracing: sampling: a percentage from 0 to 100, got -1",
            ),
            (
                "otlp: https://c:4317",
                "data.tracing: otlp: `mesh` or an http://host:port URL",
            ),
            (
                "otlp: collector:4317",
                "data.tracing: otlp: `mesh` or an http://host:port URL",
            ),
            ("sample: 1", "data.tracing: sample: unknown field `sample`"),
        ] {
            let err = parse(&cm_with(&[("tracing", yaml)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{yaml:?}: {err}");
        }
    }

    #[test]
    fn access_log_setting_sent_to_proxies() {
        use trellis_api::AccessLog;
        let cases = [
            ("", AccessLog::Text),
            ("accessLogFormat: json", AccessLog::Json),
            ("accessLog: false\naccessLogFormat: json", AccessLog::Off),
            ("accessLog: false", AccessLog::Off),
        ];
        for (yaml, want) in cases {
            let c = parse(&cm_with(&[("proxy", yaml)])).unwrap();
            assert_eq!(c.proxy.access_log(), want, "{yaml:?}");
        }
        let err = parse(&cm_with(&[("proxy", "accessLogFormat: xml")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("data.proxy: accessLogFormat: unknown variant `xml`"),
            "{err}"
        );
    }

    /// The example ConfigMap in docs/config.md is a valid config, so the docs stay true.
    #[test]
    fn docs_example_parses() {
        let doc = include_str!("../../../docs/config.md");
        let start = doc
            .find("```yaml\napiVersion: v1\nkind: ConfigMap\n")
            .expect("docs/config.md has an example ConfigMap");
        let rest = &doc[start + "```yaml\n".len()..];
        let example = &rest[..rest.find("```").expect("closed code block")];
        let c = parse(example).unwrap();
        assert_eq!(c.trust_domain.as_deref(), Some("cluster.local"));
        assert_eq!(c.proxy, ProxySettings::default());
        assert!(c.discovery.scope.allows("shop", "payments"));
        assert!(!c.discovery.scope.allows("shop", "web"));
    }
}
