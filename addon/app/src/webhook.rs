//! The control plane's admission webhooks, on one HTTPS listener (`--webhook-listen`,
//! 9443 on a cluster): `POST /validate`, the validating webhook for the `trellis-config`
//! ConfigMap and for `policy.trellis.dev` AuthorizationPolicies, and `POST /inject`, the
//! sidecar injector's mutating webhook (`crate::injector`, with `--kubernetes` only: it
//! needs the cluster's Namespaces; in the local profile `/inject` answers 404 saying so).
//!
//! A bad trellis-config edit is refused by the API server with a message naming the
//! field, instead of being applied and then rejected by the control plane. [`review`] is
//! pure: an `admission.k8s.io/v1` AdmissionReview in, the AdmissionReview response out. It
//! runs [`crate::mesh_config::parse_config_map_data`], the same function as the file
//! poller, so the webhook and the control plane cannot disagree about what is valid. An
//! AuthorizationPolicy is reviewed the same way, by the control plane's own checks
//! (`policy`): a policy the control plane would enforce fail-closed is refused at
//! `kubectl apply` instead.
//!
//! The serving certificate comes in one of two modes:
//!
//! - **Mesh CA** (the default, and the chart's): without `--webhook-cert`/`--webhook-key`
//!   the control plane issues its own certificate for `--webhook-dns-names` from the mesh
//!   CA (`CertificateAuthority::issue_serving`: DNS SANs, serverAuth only, and no URI SAN,
//!   so no proxy can take it for a mesh identity; the CSR API still refuses DNS names).
//!   The API server trusts it through the webhooks' `caBundle`, which is kept equal to the
//!   mesh trust bundle. It lives `--webhook-cert-ttl` (24 h) and is renewed at half its
//!   lifetime and at once when the CA's generation changes (a new signing CA: its roots
//!   joined the bundle, and so `caBundle`, during the change's propagation step), by
//!   swapping the TLS config under the running listener; a failed renewal keeps the
//!   running certificate and retries after 10 s.
//! - **Files** (an override): `--webhook-cert` and `--webhook-key` name PEM files
//!   (cert-manager, or a Secret made at install), re-read when they change; the
//!   certificate must be valid for every `--webhook-dns-names` entry.
//!
//! Either way `trellis_webhook_certificate_expiration_timestamp_seconds` shows the served
//! certificate's `notAfter`.

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube::core::response::{StatusCause, StatusDetails, StatusSummary};
use kube::core::{DynamicObject, GroupVersionKind};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use trellis_ca::CertificateAuthority;
use trellis_webhook::Outcome;

use crate::cli::RunArgs;
use crate::injector::Injector;
use crate::mesh_config::{self, CONFIG_MAP_NAME, CONFIG_MAP_NAMESPACE, ConfigError};

mod policy;

/// The validating webhook's path (trellis-config and AuthorizationPolicies).
pub(crate) const VALIDATE_PATH: &str = "/validate";
/// The sidecar injector's path.
pub(crate) const INJECT_PATH: &str = "/inject";
/// How long to wait before retrying a failed renewal from the mesh CA.
const RENEW_RETRY: Duration = Duration::from_secs(10);
/// Shortest `--webhook-cert-ttl`: renewal at half the lifetime must leave the API server
/// time to connect with the certificate it has.
const MIN_CERT_TTL: Duration = Duration::from_secs(60);
/// Largest request body read: the API server's own limit for a request (3 MiB), so any
/// object it accepted fits.
pub(crate) const MAX_BODY: usize = 3 * 1024 * 1024;
/// The name the API server reaches the webhook by (its Service), the default of
/// `--webhook-dns-names`.
pub(crate) const DEFAULT_DNS_NAME: &str = "trellis-webhook.trellis-system.svc";
/// How long a client may take to send the request head, and then the body. The API
/// server gives the whole call `timeoutSeconds` (5 s), so this only cuts slow clients.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`review`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Verdict {
    /// Not our object, a DELETE, a valid config or a valid AuthorizationPolicy.
    Allowed,
    /// A trellis-config or an AuthorizationPolicy with a bad field: refused with the field
    /// named (code 422).
    Denied,
    /// Not a well-formed AdmissionReview: refused (code 400).
    Invalid,
}

/// The answer to one AdmissionReview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reviewed {
    /// The decision, for logs and metrics.
    pub(crate) verdict: Verdict,
    /// 200 whenever the request's uid was found (the API server reads the body only on
    /// 200); 400 when the body was not an AdmissionReview at all.
    pub(crate) http_status: StatusCode,
    /// The AdmissionReview JSON carrying `response`.
    pub(crate) body: Vec<u8>,
    /// The request's uid, empty when it could not be read.
    pub(crate) uid: String,
    /// Why it was refused; empty when allowed.
    pub(crate) message: String,
    /// What was reviewed, for logs (`ConfigMap trellis-system/trellis-config`,
    /// `AuthorizationPolicy shop/orders`); empty for an object the webhook does not check.
    pub(crate) subject: String,
}

/// The webhook's serving certificate in file mode: PEM files, and the names the API
/// server uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WebhookTls {
    cert: PathBuf,
    key: PathBuf,
    dns_names: Vec<String>,
}

/// Where the serving certificate comes from (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CertSource {
    /// Issued by the mesh CA for `dns_names`, living `ttl`.
    MeshCa {
        dns_names: Vec<String>,
        ttl: Duration,
    },
    /// Read from PEM files.
    Files(WebhookTls),
}

/// The webhook as configured at startup: where it listens, where its certificate comes
/// from (in file mode, the first certificate already loaded and checked), its metrics.
pub(crate) struct Webhook {
    addr: SocketAddr,
    source: CertSource,
    /// The certificate read at startup, in file mode.
    files: Option<Served>,
    metrics: WebhookMetrics,
}

/// What [`Webhook::start`] needs from the running control plane.
pub(crate) struct Serving {
    /// The mesh CA (mesh CA mode).
    pub(crate) ca: Arc<CertificateAuthority>,
    /// The sidecar injector; `None` in the local profile (`/inject` answers 404).
    pub(crate) injector: Option<Injector>,
    /// How often certificate files are re-read (file mode).
    pub(crate) poll: Duration,
    pub(crate) shutdown: CancellationToken,
}

/// A TLS config and the `notAfter` of the certificate it serves.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    config: Arc<rustls::ServerConfig>,
    not_after_unix: i64,
}

/// `trellis_webhook_reviews_total{result}` (`/validate`, both kinds), result one of
/// `allowed`, `denied`, `invalid`; `trellis_webhook_injections_total{outcome}` (`/inject`);
/// `trellis_webhook_certificate_expiration_timestamp_seconds`.
#[derive(Debug, Clone, Default)]
pub(crate) struct WebhookMetrics {
    reviews: Family<ReviewLabels, Counter>,
    injections: Family<InjectionLabels, Counter>,
    expiry: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReviewLabels {
    result: Verdict,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InjectionLabels {
    outcome: InjectOutcome,
}

/// `/inject` decisions as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum InjectOutcome {
    /// Allowed with the proxy added.
    Injected,
    /// Allowed unchanged.
    Skipped,
    /// Refused: a bad pod field, the injector's config, or an unknown namespace.
    Refused,
    /// Not a usable AdmissionReview.
    Invalid,
}

/// Reviews one AdmissionReview body (`admission.k8s.io/v1`). Never panics: anything
/// unreadable becomes a refusal that says what was wrong.
///
/// Allowed: DELETE and CONNECT, any object other than the ConfigMap
/// `trellis-system/trellis-config` and a `policy.trellis.dev/v1alpha1`
/// AuthorizationPolicy (the webhook configuration should send only those, but a broader
/// selector must not block the cluster), a valid config and a valid policy. Denied with
/// code 422, `reason: Invalid`, one `details.causes` entry per bad field, and a message
/// listing every problem (`invalid trellis-config: data.proxy: logLevel: unknown variant
/// ...`, `invalid AuthorizationPolicy shop/orders: spec.rules[0].from[0].principals[0]:
/// ...`). An UPDATE that changes `trustDomain` is allowed with a warning: the running
/// control plane keeps its trust domain until it restarts. An UPDATE that leaves an
/// invalid policy's `spec` unchanged is allowed with a warning (see `policy`).
pub(crate) fn review(body: &[u8]) -> Reviewed {
    let (raw, request) = match trellis_webhook::admission_request(body) {
        Ok(parsed) => parsed,
        Err(trellis_webhook::MalformedReview { uid, message }) => return malformed(uid, message),
    };
    let (verdict, response, subject) = decide(&request, &raw);
    let message = match verdict {
        Verdict::Allowed => String::new(),
        _ => response.result.message.clone(),
    };
    Reviewed {
        verdict,
        http_status: StatusCode::OK,
        body: to_json(response),
        uid: request.uid,
        message,
        subject,
    }
}

/// The decision for a well-formed request, and what was reviewed ([`Reviewed::subject`]).
fn decide(
    req: &AdmissionRequest<DynamicObject>,
    raw: &Value,
) -> (Verdict, AdmissionResponse, String) {
    let allow = AdmissionResponse::from(req);
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return (Verdict::Allowed, allow, String::new());
    }
    if policy::is_policy(&req.kind) {
        return policy::decide(req, raw, allow);
    }
    if !is_config_map(&req.kind) {
        return (Verdict::Allowed, allow, String::new());
    }
    let subject = || format!("ConfigMap {CONFIG_MAP_NAMESPACE}/{CONFIG_MAP_NAME}");
    let invalid = |message: &str| {
        let mut r = invalid_response(Some(req.uid.clone()), message);
        r.types = allow.types.clone();
        (Verdict::Invalid, r, subject())
    };
    let Some(object) = &req.object else {
        return invalid("request.object: missing for CREATE/UPDATE");
    };
    // The object's own name wins: on CREATE with generateName, request.name is empty.
    let name = object.metadata.name.as_deref().unwrap_or(&req.name);
    let namespace = object
        .metadata
        .namespace
        .as_deref()
        .or(req.namespace.as_deref());
    if name != CONFIG_MAP_NAME || namespace != Some(CONFIG_MAP_NAMESPACE) {
        return (Verdict::Allowed, allow, String::new());
    }
    // Typed from the raw JSON (kube's DynamicObject keeps `data` untyped).
    let config_map = |pointer: &str| -> Result<Option<ConfigMap>, String> {
        match raw.pointer(pointer) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => ConfigMap::deserialize(v).map(Some).map_err(|e| {
                let field = pointer.trim_start_matches('/').replace('/', ".");
                format!("{field}: not a ConfigMap: {e}")
            }),
        }
    };
    let new = match config_map("/request/object") {
        Ok(Some(cm)) => cm,
        Ok(None) => return invalid("request.object: missing for CREATE/UPDATE"),
        Err(e) => return invalid(&e),
    };
    let config = match parse(&new) {
        Ok(c) => c,
        Err(e) => return (Verdict::Denied, deny(allow, &e), subject()),
    };
    let old_trust_domain = match config_map("/request/oldObject") {
        Ok(Some(old)) => parse(&old).ok().map(|c| c.trust_domain),
        _ => None,
    };
    let mut allow = allow;
    if let Some(old) = old_trust_domain
        && old != config.trust_domain
    {
        allow.warnings = Some(vec![format!(
            "trustDomain changes from {} to {}: a running control plane keeps {} until it \
             restarts (with a matching --trust-domain, if set)",
            shown(old.as_deref()),
            shown(config.trust_domain.as_deref()),
            shown(old.as_deref()),
        )]);
    }
    (Verdict::Allowed, allow, subject())
}

fn shown(trust_domain: Option<&str>) -> String {
    match trust_domain {
        Some(td) => format!("{td:?}"),
        None => format!("the default ({:?})", trellis_identity::DEFAULT_TRUST_DOMAIN),
    }
}

fn parse(cm: &ConfigMap) -> Result<mesh_config::MeshConfig, ConfigError> {
    let binary: Vec<&str> = cm
        .binary_data
        .iter()
        .flatten()
        .map(|(k, _)| k.as_str())
        .collect();
    mesh_config::parse_config_map_data(&cm.data.clone().unwrap_or_default(), &binary)
}

fn is_config_map(kind: &GroupVersionKind) -> bool {
    kind.group.is_empty() && kind.version == "v1" && kind.kind == "ConfigMap"
}

/// A 422 refusal naming every bad field, as the API server's own validation does.
fn deny(allow: AdmissionResponse, e: &ConfigError) -> AdmissionResponse {
    let mut r = allow.deny(format!("invalid {CONFIG_MAP_NAME}: {e}"));
    r.result.status = Some(StatusSummary::Failure);
    r.result.code = 422;
    r.result.reason = "Invalid".to_owned();
    r.result.details = Some(StatusDetails {
        name: CONFIG_MAP_NAME.to_owned(),
        group: String::new(),
        // As the API server's own validation errors name it; kubectl then prints
        // `The ConfigMap "trellis-config" is invalid: <field>: <message>` per cause.
        kind: "ConfigMap".to_owned(),
        uid: String::new(),
        causes: e
            .problems()
            .iter()
            .map(|p| StatusCause {
                reason: "FieldValueInvalid".to_owned(),
                message: if p.path.is_empty() {
                    p.reason.clone()
                } else {
                    format!("{}: {}", p.path, p.reason)
                },
                field: p.field.clone(),
            })
            .collect(),
        retry_after_seconds: 0,
    });
    r
}

fn invalid_response(uid: Option<String>, message: &str) -> AdmissionResponse {
    let mut r = AdmissionResponse::invalid(format!("invalid AdmissionReview: {message}"));
    r.uid = uid.unwrap_or_default();
    r.result.code = 400;
    r
}

fn malformed(uid: Option<String>, message: String) -> Reviewed {
    let http_status = if uid.is_some() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let response = invalid_response(uid.clone(), &message);
    Reviewed {
        verdict: Verdict::Invalid,
        http_status,
        message: response.result.message.clone(),
        body: to_json(response),
        uid: uid.unwrap_or_default(),
        subject: String::new(),
    }
}

fn to_json(response: AdmissionResponse) -> Vec<u8> {
    match serde_json::to_vec(&response.into_review()) {
        Ok(body) => body,
        // Serializing plain structs does not fail; if it ever did, the API server must
        // still get a refusal it can read (failurePolicy Fail would refuse anyway).
        Err(_) => concat!(
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":"#,
            r#"{"uid":"","allowed":false,"status":{"code":500,"message":"internal error"}}}"#
        )
        .as_bytes()
        .to_vec(),
    }
}

// === impl Verdict ===

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Invalid => "invalid",
        }
    }
}

impl EncodeLabelValue for Verdict {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

// === impl InjectOutcome ===

impl InjectOutcome {
    fn of(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Injected => Self::Injected,
            Outcome::Skipped => Self::Skipped,
            Outcome::Denied => Self::Refused,
            Outcome::Invalid => Self::Invalid,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::Skipped => "skipped",
            Self::Refused => "refused",
            Self::Invalid => "invalid",
        }
    }
}

impl EncodeLabelValue for InjectOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

// === impl WebhookMetrics ===

impl WebhookMetrics {
    /// Creates and registers `trellis_webhook_reviews_total{result}`,
    /// `trellis_webhook_injections_total{outcome}` and
    /// `trellis_webhook_certificate_expiration_timestamp_seconds`.
    pub(crate) fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "trellis_webhook_reviews",
            "Admission reviews of trellis-config and AuthorizationPolicies (POST /validate), \
             by result (allowed, denied, invalid)",
            m.reviews.clone(),
        );
        registry.register(
            "trellis_webhook_injections",
            "Sidecar injection reviews (POST /inject), by outcome \
             (injected, skipped, refused, invalid)",
            m.injections.clone(),
        );
        registry.register(
            "trellis_webhook_certificate_expiration_timestamp_seconds",
            "notAfter of the certificate the webhook listener serves, Unix seconds",
            m.expiry.clone(),
        );
        // Every result from the start, at 0, so rates and alerts work before the first.
        for result in [Verdict::Allowed, Verdict::Denied, Verdict::Invalid] {
            let _ = m.reviews.get_or_create(&ReviewLabels { result });
        }
        for outcome in [
            InjectOutcome::Injected,
            InjectOutcome::Skipped,
            InjectOutcome::Refused,
            InjectOutcome::Invalid,
        ] {
            let _ = m.injections.get_or_create(&InjectionLabels { outcome });
        }
        m
    }

    fn count(&self, verdict: Verdict) {
        self.reviews
            .get_or_create(&ReviewLabels { result: verdict })
            .inc();
    }

    fn count_injection(&self, outcome: InjectOutcome) {
        self.injections
            .get_or_create(&InjectionLabels { outcome })
            .inc();
    }
}

// === impl Webhook ===

impl Webhook {
    /// From the flags, with the certificate files (file mode) loaded and checked and the
    /// metrics registered; `None` without `--webhook-listen`. Errors name the flag
    /// (exit 64).
    pub(crate) fn from_args(
        args: &RunArgs,
        registry: &mut Registry,
    ) -> Result<Option<Self>, String> {
        let Some((addr, source)) = CertSource::from_args(args)? else {
            return Ok(None);
        };
        let files = match &source {
            CertSource::Files(tls) => Some(tls.load()?),
            CertSource::MeshCa { .. } => None,
        };
        Ok(Some(Self {
            addr,
            source,
            files,
            metrics: WebhookMetrics::new(registry),
        }))
    }

    /// Binds (naming the flag when the port is taken), gets the first certificate (from
    /// the mesh CA in that mode), then serves and keeps the certificate current in the
    /// background until `shutdown`. Returns the bound address.
    pub(crate) async fn start(self, serving: Serving) -> anyhow::Result<SocketAddr> {
        let Serving {
            ca,
            injector,
            poll,
            shutdown,
        } = serving;
        let listener = crate::app::bind(self.addr, "--webhook-listen").await?;
        let addr = listener.local_addr()?;
        let paths: &[&str] = if injector.is_some() {
            &[VALIDATE_PATH, INJECT_PATH]
        } else {
            &[VALIDATE_PATH]
        };
        let metrics = self.metrics;
        let config = match (self.source, self.files) {
            (CertSource::Files(tls), first) => {
                // from_args loads the files at startup; a caller that did not, loads here.
                let first = match first {
                    Some(first) => first,
                    None => tls.load().map_err(anyhow::Error::msg)?,
                };
                info!(
                    %addr,
                    ?paths,
                    names = ?tls.dns_names,
                    cert = %tls.cert.display(),
                    "admission webhook serving (certificate from files)"
                );
                metrics.expiry.set(first.not_after_unix);
                let (tx, rx) = watch::channel(first.config);
                tokio::spawn(tls.reload(tx, poll, metrics.clone(), shutdown.clone()));
                rx
            }
            (CertSource::MeshCa { dns_names, ttl }, _) => {
                let (first, cert) = from_mesh_ca(&ca, &dns_names, ttl)
                    .map_err(|e| anyhow::anyhow!("webhook certificate from the mesh CA: {e}"))?;
                info!(
                    %addr,
                    ?paths,
                    names = ?dns_names,
                    serial = %cert.serial,
                    generation = cert.generation,
                    "admission webhook serving (certificate from the mesh CA)"
                );
                metrics.expiry.set(first.not_after_unix);
                let (tx, rx) = watch::channel(first.config);
                tokio::spawn(renew_from_ca(
                    ca.clone(),
                    dns_names,
                    ttl,
                    cert,
                    tx,
                    metrics.clone(),
                    shutdown.clone(),
                ));
                rx
            }
        };
        tokio::spawn(serve(listener, config, metrics, injector, shutdown));
        Ok(addr)
    }
}

// === impl CertSource ===

impl CertSource {
    /// The listener address and certificate source from the flags; `None` when
    /// `--webhook-listen` is not set. Errors name the flag.
    pub(crate) fn from_args(args: &RunArgs) -> Result<Option<(SocketAddr, Self)>, String> {
        let Some(addr) = args.webhook_listen else {
            if args.webhook_cert.is_some() || args.webhook_key.is_some() {
                return Err("--webhook-cert / --webhook-key need --webhook-listen".to_owned());
            }
            return Ok(None);
        };
        if args.webhook_dns_names.is_empty() {
            return Err("--webhook-dns-names: at least one name".to_owned());
        }
        let dns_names = args.webhook_dns_names.clone();
        match (&args.webhook_cert, &args.webhook_key) {
            (Some(cert), Some(key)) => {
                for name in &dns_names {
                    if ServerName::try_from(name.as_str()).is_err() {
                        return Err(format!("--webhook-dns-names: {name:?} is not a DNS name"));
                    }
                }
                Ok(Some((
                    addr,
                    Self::Files(WebhookTls {
                        cert: cert.clone(),
                        key: key.clone(),
                        dns_names,
                    }),
                )))
            }
            (None, None) => {
                // The mesh CA issues DNS names only: no IP address, no wildcard.
                for name in &dns_names {
                    let dns = !name.contains('*')
                        && matches!(
                            ServerName::try_from(name.as_str()),
                            Ok(ServerName::DnsName(_))
                        );
                    if !dns {
                        return Err(format!("--webhook-dns-names: {name:?} is not a DNS name"));
                    }
                }
                if args.webhook_cert_ttl < MIN_CERT_TTL {
                    return Err(format!(
                        "--webhook-cert-ttl: {} is shorter than {}",
                        humantime::format_duration(args.webhook_cert_ttl),
                        humantime::format_duration(MIN_CERT_TTL)
                    ));
                }
                Ok(Some((
                    addr,
                    Self::MeshCa {
                        dns_names,
                        ttl: args.webhook_cert_ttl,
                    },
                )))
            }
            _ => Err(
                "--webhook-cert and --webhook-key go together (or neither: the \
                      certificate then comes from the mesh CA)"
                    .to_owned(),
            ),
        }
    }
}

// === impl WebhookTls ===

impl WebhookTls {
    /// Reads the files and builds the server config (TLS 1.3, HTTP/1.1). The certificate
    /// must be valid for every `--webhook-dns-names` entry: a certificate the API server
    /// would refuse fails here, with the name, rather than as a failed webhook call.
    pub(crate) fn load(&self) -> Result<Served, String> {
        let cert_pem = std::fs::read(&self.cert)
            .map_err(|e| format!("--webhook-cert: reading {}: {e}", self.cert.display()))?;
        let key_pem = std::fs::read(&self.key)
            .map_err(|e| format!("--webhook-key: reading {}: {e}", self.key.display()))?;
        self.server_config(&cert_pem, &key_pem)
    }

    fn server_config(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<Served, String> {
        let cert_flag = format!("--webhook-cert {}", self.cert.display());
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{cert_flag}: {e}"))?;
        let Some(leaf) = chain.first() else {
            return Err(format!("{cert_flag}: no CERTIFICATE block"));
        };
        let parsed = rustls::server::ParsedCertificate::try_from(leaf)
            .map_err(|e| format!("{cert_flag}: {e}"))?;
        for name in &self.dns_names {
            let server_name =
                ServerName::try_from(name.as_str()).map_err(|e| format!("{name:?}: {e}"))?;
            rustls::client::verify_server_name(&parsed, &server_name)
                .map_err(|e| format!("{cert_flag}: not valid for {name} ({e})"))?;
        }
        let not_after_unix = not_after(leaf).map_err(|e| format!("{cert_flag}: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| format!("--webhook-key {}: {e}", self.key.display()))?;
        let config =
            tls_config(chain, key).map_err(|e| format!("{cert_flag} with --webhook-key: {e}"))?;
        Ok(Served {
            config,
            not_after_unix,
        })
    }

    /// Re-reads the files every `poll` and publishes a new config when they changed and
    /// are good (cert-manager renews in place); bad files are logged and the running
    /// certificate stays.
    pub(crate) async fn reload(
        self,
        tx: watch::Sender<Arc<rustls::ServerConfig>>,
        poll: Duration,
        metrics: WebhookMetrics,
        shutdown: CancellationToken,
    ) {
        let read = || {
            (
                std::fs::read(&self.cert).ok(),
                std::fs::read(&self.key).ok(),
            )
        };
        let mut last = read();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(poll) => {}
            }
            let now = read();
            if now == last {
                continue;
            }
            last = now.clone();
            let (Some(cert), Some(key)) = now else {
                error!(
                    cert = %self.cert.display(),
                    key = %self.key.display(),
                    "webhook certificate files unreadable; keeping the running certificate"
                );
                continue;
            };
            match self.server_config(&cert, &key) {
                Ok(served) => {
                    info!(cert = %self.cert.display(), "webhook certificate reloaded");
                    metrics.expiry.set(served.not_after_unix);
                    if tx.send(served.config).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    error!(
                        error = %e,
                        "webhook certificate rejected; keeping the running certificate"
                    );
                }
            }
        }
    }
}

/// The listener's TLS config for `chain` and `key`: TLS 1.3, HTTP/1.1, no client
/// certificate (the API server sends none).
fn tls_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("webhook TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The leaf's `notAfter`, Unix seconds.
fn not_after(leaf: &CertificateDer<'_>) -> Result<i64, String> {
    use x509_parser::prelude::FromDer;
    let (_, x) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(x.validity().not_after.timestamp())
}

/// Issues a serving certificate from the mesh CA and builds the listener's config.
fn from_mesh_ca(
    ca: &CertificateAuthority,
    dns_names: &[String],
    ttl: Duration,
) -> Result<(Served, trellis_ca::ServingCert), String> {
    let cert = ca
        .issue_serving(dns_names, ttl)
        .map_err(|e| e.to_string())?;
    let config = tls_config(cert.certificates(), cert.private_key())?;
    let not_after_unix = cert
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Ok((
        Served {
            config,
            not_after_unix,
        },
        cert,
    ))
}

/// Keeps the mesh CA's certificate current: a new one at half the running one's
/// lifetime (counted from when it was issued), and at once when the CA's generation
/// moves past the one that signed it (after a CA change the chain must lead to the new
/// CA; a bundle-only change needs nothing). Each is swapped into the listener's config;
/// open connections keep theirs. A failure keeps the running certificate and is retried
/// after [`RENEW_RETRY`].
async fn renew_from_ca(
    ca: Arc<CertificateAuthority>,
    dns_names: Vec<String>,
    ttl: Duration,
    mut current: trellis_ca::ServingCert,
    tx: watch::Sender<Arc<rustls::ServerConfig>>,
    metrics: WebhookMetrics,
    shutdown: CancellationToken,
) {
    let mut trust = ca.subscribe();
    let mut issued_at = std::time::SystemTime::now();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        // The generation is also checked here, not only on a change: one that moved
        // between the first issuance and the subscription is seen at once.
        let stale = trust.borrow_and_update().generation != current.generation;
        let reason = if stale && retry_at.is_none() {
            "CA generation changed"
        } else {
            let due = retry_at.unwrap_or_else(|| {
                let life = current
                    .not_after
                    .duration_since(issued_at)
                    .unwrap_or_default();
                let wait = (issued_at + life / 2)
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                tokio::time::Instant::now() + wait.max(Duration::from_secs(1))
            });
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(due) => {
                    if retry_at.is_some() { "retry" } else { "half of its lifetime" }
                }
                changed = trust.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if trust.borrow_and_update().generation == current.generation {
                        // Roots added or retired: the running chain is still good.
                        continue;
                    }
                    "CA generation changed"
                }
            }
        };
        match from_mesh_ca(&ca, &dns_names, ttl) {
            Ok((served, cert)) => {
                info!(
                    reason,
                    serial = %cert.serial,
                    generation = cert.generation,
                    names = ?dns_names,
                    "webhook certificate renewed from the mesh CA"
                );
                metrics.expiry.set(served.not_after_unix);
                current = cert;
                issued_at = std::time::SystemTime::now();
                retry_at = None;
                if tx.send(served.config).is_err() {
                    return;
                }
            }
            Err(e) => {
                error!(
                    reason,
                    error = %e,
                    "renewing the webhook certificate failed; keeping the running one, \
                     retrying in 10s"
                );
                retry_at = Some(tokio::time::Instant::now() + RENEW_RETRY);
            }
        }
    }
}

/// Serves HTTPS `POST /validate` and `POST /inject` on `listener` until `shutdown`,
/// TLS-terminating with the latest `config` (the handshake runs in
/// `crate::tls::incoming`, as for gRPC).
pub(crate) async fn serve(
    listener: TcpListener,
    config: watch::Receiver<Arc<rustls::ServerConfig>>,
    metrics: WebhookMetrics,
    injector: Option<Injector>,
    shutdown: CancellationToken,
) {
    let mut incoming = crate::tls::incoming(listener, config);
    loop {
        let conn = tokio::select! {
            c = incoming.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    debug!(error = %e, "webhook accept failed");
                    continue;
                }
                None => return,
            },
            () = shutdown.cancelled() => return,
        };
        let metrics = metrics.clone();
        let injector = injector.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let metrics = metrics.clone();
                let injector = injector.clone();
                async move { Ok::<_, Infallible>(handle(req, &metrics, injector.as_ref()).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(conn), svc)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    metrics: &WebhookMetrics,
    injector: Option<&Injector>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if path == INJECT_PATH && injector.is_none() {
        return text(
            StatusCode::NOT_FOUND,
            "not found: /inject (the sidecar injector) is served only with --kubernetes: it \
             needs the cluster's namespaces\n",
        );
    }
    if path != VALIDATE_PATH && path != INJECT_PATH {
        let paths = if injector.is_some() {
            "POST /validate and POST /inject"
        } else {
            "POST /validate"
        };
        return text(
            StatusCode::NOT_FOUND,
            &format!("not found: this webhook serves {paths}\n"),
        );
    }
    let bytes = match read_review(req).await {
        Ok(bytes) => bytes,
        Err(refused) => return refused,
    };
    let (status, body) = match injector {
        Some(injector) if path == INJECT_PATH => {
            let reviewed = injector.review(&bytes).await;
            let outcome = InjectOutcome::of(reviewed.outcome);
            metrics.count_injection(outcome);
            match outcome {
                InjectOutcome::Injected => {
                    let summary = &reviewed.message;
                    info!(uid = %reviewed.uid, %summary, "sidecar injection: injected");
                }
                InjectOutcome::Skipped => {
                    let reason = &reviewed.message;
                    debug!(uid = %reviewed.uid, %reason, "sidecar injection: skipped");
                }
                InjectOutcome::Refused => {
                    let reason = &reviewed.message;
                    warn!(uid = %reviewed.uid, %reason, "sidecar injection: pod refused");
                }
                InjectOutcome::Invalid => {
                    let reason = &reviewed.message;
                    warn!(uid = %reviewed.uid, %reason, "sidecar injection: malformed review");
                }
            }
            (
                StatusCode::from_u16(reviewed.http_status).unwrap_or(StatusCode::BAD_REQUEST),
                reviewed.body,
            )
        }
        _ => {
            let reviewed = review(&bytes);
            metrics.count(reviewed.verdict);
            let object = &reviewed.subject;
            match reviewed.verdict {
                Verdict::Allowed => {
                    debug!(uid = %reviewed.uid, %object, "validating admission: allowed");
                }
                Verdict::Denied => {
                    info!(
                        uid = %reviewed.uid,
                        %object,
                        reason = %reviewed.message,
                        "validating admission: denied"
                    );
                }
                Verdict::Invalid => {
                    warn!(
                        uid = %reviewed.uid,
                        %object,
                        reason = %reviewed.message,
                        "validating admission: malformed review"
                    );
                }
            }
            (reviewed.http_status, reviewed.body)
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The checks both webhooks share before a review: POST, a JSON content type, at most
/// [`MAX_BODY`] bytes, read within [`READ_TIMEOUT`]. `Err` is the refusal to send.
async fn read_review(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    if req.method() != Method::POST {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return Err(r);
    }
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(text(
            StatusCode::BAD_REQUEST,
            "Content-Type must be application/json (an admission.k8s.io/v1 AdmissionReview)\n",
        ));
    }
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body larger than 3 MiB\n",
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_BODY);
    match tokio::time::timeout(READ_TIMEOUT, body.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(text(
            StatusCode::BAD_REQUEST,
            &format!("reading the body: {e}\n"),
        )),
        Err(_) => Err(text(StatusCode::REQUEST_TIMEOUT, "request body too slow\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod inject_tests;

/// An AdmissionReview (uid `uid`) for a `kind` of `group/version` (resource `resource`),
/// as the API server sends it: the body the webhook tests post.
#[cfg(test)]
fn review_json(
    uid: &str,
    operation: &str,
    (group, version, kind, resource): (&str, &str, &str, &str),
    name: &str,
    namespace: &str,
    object: Value,
    old: Value,
) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "requestResource": {"group": group, "version": version, "resource": resource},
            "name": name,
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": object,
            "oldObject": old,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        }
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const UID: &str = "705ab4f5-6393-11e8-b7cc-42010a800002";

    fn good_data() -> Value {
        json!({
            "trustDomain": "cluster.local",
            "ca": "source: self-signed\nreloadInterval: 60s\n",
            "discovery": "scope:\n  default: [\"*\"]\n  namespaces: {shop: [payments]}\n",
            "proxy": "logLevel: debug\naccessLog: false\n",
        })
    }

    fn config_map(name: &str, namespace: &str, data: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "uid": "c0ffee"},
            "data": data,
        })
    }

    /// An AdmissionReview as the API server sends it.
    fn review_of(
        operation: &str,
        kind: &str,
        name: &str,
        namespace: &str,
        object: Value,
        old: Value,
    ) -> Vec<u8> {
        let resource = if kind == "ConfigMap" {
            "configmaps"
        } else {
            "secrets"
        };
        review_json(
            UID,
            operation,
            ("", "v1", kind, resource),
            name,
            namespace,
            object,
            old,
        )
    }

    fn update(data: Value) -> Vec<u8> {
        review_of(
            "UPDATE",
            "ConfigMap",
            CONFIG_MAP_NAME,
            CONFIG_MAP_NAMESPACE,
            config_map(CONFIG_MAP_NAME, CONFIG_MAP_NAMESPACE, data),
            config_map(CONFIG_MAP_NAME, CONFIG_MAP_NAMESPACE, good_data()),
        )
    }

    fn response(reviewed: &Reviewed) -> Value {
        let v: Value = serde_json::from_slice(&reviewed.body).unwrap();
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(v["kind"], "AdmissionReview");
        v["response"].clone()
    }

    fn with(key: &str, value: &str) -> Value {
        let mut data = good_data();
        data[key] = json!(value);
        data
    }

    #[test]
    fn reviews() {
        struct Case {
            name: &'static str,
            body: Vec<u8>,
            verdict: Verdict,
            /// (code, start of message, cause field) when refused.
            refused: Option<(u16, &'static str, Option<&'static str>)>,
        }
        let allowed = |name, body| Case {
            name,
            body,
            verdict: Verdict::Allowed,
            refused: None,
        };
        let denied = |name, body, message, field| Case {
            name,
            body,
            verdict: Verdict::Denied,
            refused: Some((422, message, Some(field))),
        };
        let bad_data = with("proxy", "logLevel: loud");
        let cases = [
            allowed("good config", update(good_data())),
            allowed(
                "good config, CREATE with generateName",
                review_of(
                    "CREATE",
                    "ConfigMap",
                    "",
                    CONFIG_MAP_NAMESPACE,
                    config_map(CONFIG_MAP_NAME, CONFIG_MAP_NAMESPACE, good_data()),
                    Value::Null,
                ),
            ),
            allowed("empty data", update(json!({}))),
            denied(
                "ca",
                update(with(
                    "ca",
                    "source: keyvault-key\nkeyvault: {url: http://v}",
                )),
                "invalid trellis-config: data.ca: keyvault.url: must be https, got \"http://v\"",
                "data.ca",
            ),
            denied(
                "trustDomain",
                update(with("trustDomain", "Cluster.Local")),
                "invalid trellis-config: data.trustDomain: invalid trust domain \"Cluster.Local\"",
                "data.trustDomain",
            ),
            denied(
                "discovery namespace",
                update(with("discovery", "scope: {namespaces: {shop: [Payments]}}")),
                "invalid trellis-config: data.discovery: scope.namespaces.shop[0]: \"Payments\" is not a namespace name",
                "data.discovery",
            ),
            denied(
                "discovery star",
                update(with("discovery", "scope: {default: [\"*\", shop]}")),
                "invalid trellis-config: data.discovery: scope.default: \"*\" (every namespace) must be alone",
                "data.discovery",
            ),
            denied(
                "proxy logLevel",
                update(bad_data.clone()),
                "invalid trellis-config: data.proxy: logLevel: unknown variant `loud`, expected one of `error`",
                "data.proxy",
            ),
            denied(
                "proxy unknown field",
                update(with("proxy", "accessLogs: true")),
                "invalid trellis-config: data.proxy: accessLogs: unknown field `accessLogs`",
                "data.proxy",
            ),
            denied(
                "unknown key",
                update(with("telemetry", "sampling: 100")),
                "invalid trellis-config: data.telemetry: unknown key (known: ca, discovery, outboundTrafficPolicy, proxy, tracing, trustDomain)",
                "data.telemetry",
            ),
            denied(
                "binaryData",
                with_binary_data(update(good_data())),
                "invalid trellis-config: binaryData.ca: trellis reads only data",
                "binaryData.ca",
            ),
            allowed(
                "another ConfigMap in trellis-system",
                review_of(
                    "UPDATE",
                    "ConfigMap",
                    "other",
                    CONFIG_MAP_NAMESPACE,
                    config_map("other", CONFIG_MAP_NAMESPACE, bad_data.clone()),
                    Value::Null,
                ),
            ),
            allowed(
                "trellis-config in another namespace",
                review_of(
                    "CREATE",
                    "ConfigMap",
                    CONFIG_MAP_NAME,
                    "default",
                    config_map(CONFIG_MAP_NAME, "default", bad_data.clone()),
                    Value::Null,
                ),
            ),
            allowed(
                "a Secret named trellis-config",
                review_of(
                    "CREATE",
                    "Secret",
                    CONFIG_MAP_NAME,
                    CONFIG_MAP_NAMESPACE,
                    json!({"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": CONFIG_MAP_NAME, "namespace": CONFIG_MAP_NAMESPACE},
                           "data": {"proxy": "eA=="}}),
                    Value::Null,
                ),
            ),
            allowed(
                "DELETE of a bad trellis-config",
                review_of(
                    "DELETE",
                    "ConfigMap",
                    CONFIG_MAP_NAME,
                    CONFIG_MAP_NAMESPACE,
                    Value::Null,
                    config_map(CONFIG_MAP_NAME, CONFIG_MAP_NAMESPACE, bad_data),
                ),
            ),
            Case {
                name: "data value not a string",
                body: update(json!({"proxy": {"logLevel": "info"}})),
                verdict: Verdict::Invalid,
                refused: Some((
                    400,
                    "invalid AdmissionReview: request.object: not a ConfigMap: invalid type: map, expected a string",
                    None,
                )),
            },
            Case {
                name: "CREATE without an object",
                body: review_of(
                    "CREATE",
                    "ConfigMap",
                    CONFIG_MAP_NAME,
                    CONFIG_MAP_NAMESPACE,
                    Value::Null,
                    Value::Null,
                ),
                verdict: Verdict::Invalid,
                refused: Some((
                    400,
                    "invalid AdmissionReview: request.object: missing for CREATE/UPDATE",
                    None,
                )),
            },
        ];
        for case in cases {
            let reviewed = review(&case.body);
            let name = case.name;
            assert_eq!(reviewed.verdict, case.verdict, "{name}: {reviewed:?}");
            assert_eq!(reviewed.http_status, StatusCode::OK, "{name}");
            assert_eq!(reviewed.uid, UID, "{name}");
            let r = response(&reviewed);
            assert_eq!(r["uid"], UID, "{name}");
            match case.refused {
                None => {
                    assert_eq!(r["allowed"], true, "{name}: {r}");
                    assert_eq!(reviewed.message, "", "{name}");
                }
                Some((code, message, field)) => {
                    assert_eq!(r["allowed"], false, "{name}: {r}");
                    assert_eq!(r["status"]["code"], code, "{name}: {r}");
                    assert_eq!(r["status"]["status"], "Failure", "{name}: {r}");
                    let got = r["status"]["message"].as_str().unwrap();
                    assert!(got.starts_with(message), "{name}: {got:?}");
                    assert_eq!(reviewed.message, got, "{name}");
                    if let Some(field) = field {
                        assert_eq!(r["status"]["reason"], "Invalid", "{name}");
                        assert_eq!(
                            r["status"]["details"]["causes"][0]["field"], field,
                            "{name}: {r}"
                        );
                        assert_eq!(
                            r["status"]["details"]["causes"][0]["reason"],
                            "FieldValueInvalid"
                        );
                    }
                }
            }
        }
    }

    /// Adds `binaryData: {ca: ...}` to the object of a review body.
    fn with_binary_data(body: Vec<u8>) -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(&body).unwrap();
        v["request"]["object"]["binaryData"] = json!({"ca": "eA=="});
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_denial_is_exactly_this_json() {
        let reviewed = review(&update(with("proxy", "logLevel: loud")));
        let expected = concat!(
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"#,
            r#""uid":"705ab4f5-6393-11e8-b7cc-42010a800002","allowed":false,"status":{"#,
            r#""status":"Failure","code":422,"message":"invalid trellis-config: data.proxy: "#,
            r#"logLevel: unknown variant `loud`, expected one of `error`, `warn`, `info`, "#,
            r#"`debug`, `trace` at line 1 column 11","reason":"Invalid","details":{"#,
            r#""name":"trellis-config","kind":"ConfigMap","causes":[{"reason":"FieldValueInvalid","#,
            r#""message":"logLevel: unknown variant `loud`, expected one of `error`, `warn`, "#,
            r#"`info`, `debug`, `trace` at line 1 column 11","field":"data.proxy"}]}}}}"#,
        );
        assert_eq!(String::from_utf8(reviewed.body).unwrap(), expected);
    }

    #[test]
    fn every_bad_key_is_a_cause() {
        let mut data = with("proxy", "logLevel: loud");
        data["trustDomain"] = json!("A_B");
        data["colour"] = json!("blue");
        let r = response(&review(&update(data)));
        let fields: Vec<_> = r["status"]["details"]["causes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["field"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(fields, ["data.colour", "data.proxy", "data.trustDomain"]);
        let message = r["status"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("invalid trellis-config: data.colour: unknown key (known: "),
            "{message}"
        );
        assert!(message.contains("; data.proxy: logLevel: "), "{message}");
    }

    #[test]
    fn changing_the_trust_domain_is_allowed_with_a_warning() {
        let r = response(&review(&update(with("trustDomain", "prod.example.com"))));
        assert_eq!(r["allowed"], true);
        assert_eq!(
            r["warnings"][0],
            "trustDomain changes from \"cluster.local\" to \"prod.example.com\": a running \
             control plane keeps \"cluster.local\" until it restarts (with a matching \
             --trust-domain, if set)"
        );
        let r = response(&review(&update(good_data())));
        assert_eq!(r.get("warnings"), None, "{r}");
    }

    #[test]
    fn malformed_reviews_get_a_clear_refusal() {
        // (body, http status, uid recovered, start of message)
        let no_request = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#;
        let beta = review_of(
            "CREATE",
            "ConfigMap",
            CONFIG_MAP_NAME,
            CONFIG_MAP_NAMESPACE,
            Value::Null,
            Value::Null,
        );
        let beta = String::from_utf8(beta)
            .unwrap()
            .replace("admission.k8s.io/v1\"", "admission.k8s.io/v1beta1\"");
        let mut no_kind: Value = serde_json::from_slice(&update(good_data())).unwrap();
        no_kind["request"].as_object_mut().unwrap().remove("kind");
        let mut bad_op: Value = serde_json::from_slice(&update(good_data())).unwrap();
        bad_op["request"]["operation"] = json!("PATCH");
        let cases: [(Vec<u8>, StatusCode, &str, &str); 6] = [
            (
                b"{not json".to_vec(),
                StatusCode::BAD_REQUEST,
                "",
                "invalid AdmissionReview: request body is not JSON: key must be a string",
            ),
            (
                Vec::new(),
                StatusCode::BAD_REQUEST,
                "",
                "invalid AdmissionReview: request body is not JSON: EOF",
            ),
            (
                no_request.to_vec(),
                StatusCode::BAD_REQUEST,
                "",
                "invalid AdmissionReview: AdmissionReview has no request",
            ),
            (
                beta.into_bytes(),
                StatusCode::OK,
                UID,
                "invalid AdmissionReview: expected apiVersion admission.k8s.io/v1, kind \
                 AdmissionReview; found \"admission.k8s.io/v1beta1\" \"AdmissionReview\"",
            ),
            (
                serde_json::to_vec(&no_kind).unwrap(),
                StatusCode::OK,
                UID,
                "invalid AdmissionReview: malformed AdmissionReview: missing field `kind`",
            ),
            (
                serde_json::to_vec(&bad_op).unwrap(),
                StatusCode::OK,
                UID,
                "invalid AdmissionReview: malformed AdmissionReview: unknown variant `PATCH`",
            ),
        ];
        for (body, status, uid, message) in cases {
            let reviewed = review(&body);
            assert_eq!(reviewed.verdict, Verdict::Invalid, "{message}");
            assert_eq!(reviewed.http_status, status, "{message}");
            assert_eq!(reviewed.uid, uid);
            let r = response(&reviewed);
            assert_eq!(r["uid"], uid, "{r}");
            assert_eq!(r["allowed"], false);
            assert_eq!(r["status"]["code"], 400);
            assert_eq!(r["status"]["reason"], "InvalidRequest");
            let got = r["status"]["message"].as_str().unwrap();
            assert!(got.starts_with(message), "{message:?} vs {got:?}");
        }
    }

    /// A CA and a serving certificate for `names` it signed, as PEM files in `dir`.
    fn write_cert(dir: &Path, names: &[&str]) -> (CertificateDer<'static>, PathBuf, PathBuf) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let leaf = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert_path, leaf.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (ca.der().clone(), cert_path, key_path)
    }

    /// One HTTP/1.1 exchange over TLS, verifying the server as `DEFAULT_DNS_NAME` against
    /// `ca`; the raw response bytes.
    async fn exchange(
        addr: SocketAddr,
        ca: &CertificateDer<'static>,
        request: &[u8],
    ) -> std::io::Result<Vec<u8>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::try_from(DEFAULT_DNS_NAME).unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(request).await?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn post(path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!(
            "POST {path} HTTP/1.1\r\nHost: {DEFAULT_DNS_NAME}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn split(response: &[u8]) -> (String, Vec<u8>) {
        let at = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete response head");
        (
            String::from_utf8_lossy(&response[..at]).into_owned(),
            response[at + 4..].to_vec(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_reviews_over_https() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = write_cert(dir.path(), &[DEFAULT_DNS_NAME]);
        let tls = WebhookTls {
            cert,
            key,
            dns_names: vec![DEFAULT_DNS_NAME.to_owned()],
        };
        let mut registry = Registry::default();
        let webhook = Webhook {
            addr: "127.0.0.1:0".parse().unwrap(),
            files: Some(tls.load().unwrap()),
            source: CertSource::Files(tls),
            metrics: WebhookMetrics::new(&mut registry),
        };
        let shutdown = CancellationToken::new();
        let addr = webhook
            .start(Serving {
                ca: Arc::new(CertificateAuthority::generate("cluster.local").unwrap()),
                injector: None,
                poll: Duration::from_millis(50),
                shutdown: shutdown.clone(),
            })
            .await
            .unwrap();

        // A real AdmissionReview, denied: the bytes are exactly what `review` produces.
        let body = update(with("discovery", "scope: {default: [\"*\", web]}"));
        let raw = exchange(addr, &ca, &post("/validate", "application/json", &body))
            .await
            .unwrap();
        let (head, got) = split(&raw);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert_eq!(got, review(&body).body);
        let r: Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(r["response"]["uid"], UID);
        assert_eq!(r["response"]["allowed"], false);
        assert_eq!(
            r["response"]["status"]["message"],
            "invalid trellis-config: data.discovery: scope.default: \"*\" (every namespace) \
             must be alone in its list"
        );

        // A good one, allowed.
        let body = update(good_data());
        let raw = exchange(
            addr,
            &ca,
            &post("/validate", "application/json; charset=utf-8", &body),
        )
        .await
        .unwrap();
        let (head, got) = split(&raw);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(
            String::from_utf8(got).unwrap(),
            format!(
                r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{{"uid":"{UID}","allowed":true,"status":{{}}}}}}"#
            )
        );

        // An AuthorizationPolicy on the same path, denied and counted with the config's.
        let policy = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": UID,
                "kind": {"group": "policy.trellis.dev", "version": "v1alpha1",
                         "kind": "AuthorizationPolicy"},
                "resource": {"group": "policy.trellis.dev", "version": "v1alpha1",
                             "resource": "authorizationpolicies"},
                "name": "orders",
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {"username": "alice"},
                "object": {
                    "apiVersion": "policy.trellis.dev/v1alpha1",
                    "kind": "AuthorizationPolicy",
                    "metadata": {"name": "orders", "namespace": "shop"},
                    "spec": {"rules": [{"to": [{"paths": ["/orders?id=1"]}]}]},
                },
            }
        }))
        .unwrap();
        let raw = exchange(addr, &ca, &post("/validate", "application/json", &policy))
            .await
            .unwrap();
        let (head, got) = split(&raw);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(got, review(&policy).body);
        let r: Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(r["response"]["allowed"], false);
        assert_eq!(
            r["response"]["status"]["details"]["causes"][0]["field"],
            "spec.rules[0].to[0].paths[0]"
        );

        // Not JSON at all: 400 with the refusal as the body.
        let raw = exchange(addr, &ca, &post("/validate", "application/json", b"{"))
            .await
            .unwrap();
        assert!(raw.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));

        // Wrong path, method, content type, size.
        let raw = exchange(addr, &ca, &post("/mutate", "application/json", &body))
            .await
            .unwrap();
        assert!(raw.starts_with(b"HTTP/1.1 404 Not Found\r\n"), "{raw:?}");
        // The injector needs the cluster: the local profile says so, counting nothing.
        let raw = exchange(addr, &ca, &post("/inject", "application/json", &body))
            .await
            .unwrap();
        let (head, got) = split(&raw);
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "not found: /inject (the sidecar injector) is served only with --kubernetes: it \
             needs the cluster's namespaces\n"
        );
        let get = format!(
            "GET /validate HTTP/1.1\r\nHost: {DEFAULT_DNS_NAME}\r\nConnection: close\r\n\r\n"
        );
        let raw = exchange(addr, &ca, get.as_bytes()).await.unwrap();
        let (head, got) = split(&raw);
        assert!(
            head.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{head}"
        );
        assert!(head.contains("allow: POST"), "{head}");
        assert_eq!(got, b"only POST\n");
        let raw = exchange(addr, &ca, &post("/validate", "text/plain", &body))
            .await
            .unwrap();
        let (head, got) = split(&raw);
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(got.starts_with(b"Content-Type must be application/json"));
        let huge = format!(
            "POST /validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            MAX_BODY + 1
        );
        let raw = exchange(addr, &ca, huge.as_bytes()).await.unwrap();
        assert!(
            raw.starts_with(b"HTTP/1.1 413 Payload Too Large\r\n"),
            "{raw:?}"
        );

        let mut metrics = String::new();
        prometheus_client::encoding::text::encode(&mut metrics, &registry).unwrap();
        let leaf = CertificateDer::pem_file_iter(dir.path().join("tls.crt"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let expiry = format!(
            "trellis_webhook_certificate_expiration_timestamp_seconds {}",
            not_after(&leaf).unwrap()
        );
        for line in [
            "trellis_webhook_reviews_total{result=\"denied\"} 2",
            "trellis_webhook_reviews_total{result=\"allowed\"} 1",
            "trellis_webhook_reviews_total{result=\"invalid\"} 1",
            "trellis_webhook_injections_total{outcome=\"injected\"} 0",
            "trellis_webhook_injections_total{outcome=\"invalid\"} 0",
            &expiry,
        ] {
            assert!(metrics.contains(line), "{line} in\n{metrics}");
        }

        // A renewed certificate (another CA) in the same files is served without a restart;
        // a certificate for other names is refused and the running one stays.
        let other = tempfile::tempdir().unwrap();
        let (wrong_ca, wrong_cert, wrong_key) = write_cert(other.path(), &["other.example"]);
        std::fs::copy(&wrong_cert, dir.path().join("tls.crt")).unwrap();
        std::fs::copy(&wrong_key, dir.path().join("tls.key")).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            exchange(addr, &ca, &post("/validate", "application/json", &body))
                .await
                .is_ok()
        );
        assert!(exchange(addr, &wrong_ca, b"").await.is_err());
        let (new_ca, new_cert, new_key) = write_cert(other.path(), &[DEFAULT_DNS_NAME]);
        std::fs::copy(&new_cert, dir.path().join("tls.crt")).unwrap();
        std::fs::copy(&new_key, dir.path().join("tls.key")).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ok = exchange(addr, &new_ca, &post("/validate", "application/json", &body)).await;
            if let Ok(raw) = ok {
                assert!(raw.starts_with(b"HTTP/1.1 200 OK\r\n"));
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "new certificate never served"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            exchange(addr, &ca, b"").await.is_err(),
            "old CA still verifies"
        );
        shutdown.cancel();
    }

    #[test]
    fn the_certificate_must_cover_the_dns_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("other")).unwrap();
        let (_, cert, key) = write_cert(dir.path(), &["trellis-webhook.trellis-system.svc"]);
        let tls = WebhookTls {
            cert: cert.clone(),
            key: key.clone(),
            dns_names: vec![
                DEFAULT_DNS_NAME.to_owned(),
                "trellis-webhook.trellis-system.svc.cluster.local".to_owned(),
            ],
        };
        let err = tls.load().unwrap_err();
        assert!(
            err.starts_with(&format!(
                "--webhook-cert {}: not valid for trellis-webhook.trellis-system.svc.cluster.local",
                cert.display()
            )),
            "{err}"
        );
        let missing = WebhookTls {
            cert: dir.path().join("nope.crt"),
            key,
            dns_names: vec![DEFAULT_DNS_NAME.to_owned()],
        };
        assert!(
            missing
                .load()
                .unwrap_err()
                .starts_with("--webhook-cert: reading ")
        );
        // A key that is not the certificate's.
        let (_, _, other_key) = write_cert(&dir.path().join("other"), &[DEFAULT_DNS_NAME]);
        let mismatched = WebhookTls {
            cert: cert.clone(),
            key: other_key,
            dns_names: vec![DEFAULT_DNS_NAME.to_owned()],
        };
        let err = mismatched.load().unwrap_err();
        assert!(err.contains("with --webhook-key"), "{err}");
        std::fs::write(&cert, "not a certificate").unwrap();
        let err = tls.load().unwrap_err();
        assert!(err.contains("no CERTIFICATE block"), "{err}");
    }

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        run: RunArgs,
    }

    fn flags(extra: &[&str]) -> RunArgs {
        let base = ["trellis-addon", "--config-dir", "c", "--state-dir", "s"];
        Flags::try_parse_from(base.iter().chain(extra).copied())
            .unwrap()
            .run
    }

    #[test]
    fn webhook_flags_are_checked() {
        assert_eq!(CertSource::from_args(&flags(&[])), Ok(None));
        let files = flags(&[
            "--webhook-listen",
            "0.0.0.0:9443",
            "--webhook-cert",
            "/c",
            "--webhook-key",
            "/k",
        ]);
        let (addr, source) = CertSource::from_args(&files).unwrap().unwrap();
        assert_eq!(addr.port(), 9443);
        let CertSource::Files(tls) = source else {
            panic!("{source:?}");
        };
        assert_eq!(tls.dns_names, [DEFAULT_DNS_NAME]);
        let names = flags(&[
            "--webhook-listen",
            "0.0.0.0:9443",
            "--webhook-cert",
            "/c",
            "--webhook-key",
            "/k",
            "--webhook-dns-names",
            "a.svc,b.svc.cluster.local",
        ]);
        let (_, source) = CertSource::from_args(&names).unwrap().unwrap();
        let CertSource::Files(tls) = source else {
            panic!("{source:?}");
        };
        assert_eq!(tls.dns_names, ["a.svc", "b.svc.cluster.local"]);
        // No files: the mesh CA issues it, for the names, for 24 h by default.
        let (_, source) = CertSource::from_args(&flags(&["--webhook-listen", "0.0.0.0:9443"]))
            .unwrap()
            .unwrap();
        assert_eq!(
            source,
            CertSource::MeshCa {
                dns_names: vec![DEFAULT_DNS_NAME.to_owned()],
                ttl: Duration::from_secs(24 * 3600),
            }
        );
        let (_, source) = CertSource::from_args(&flags(&[
            "--webhook-listen",
            "0.0.0.0:9443",
            "--webhook-cert-ttl",
            "2h",
        ]))
        .unwrap()
        .unwrap();
        assert!(
            matches!(source, CertSource::MeshCa { ttl, .. } if ttl == Duration::from_secs(7200))
        );
        let cases: [(&[&str], &str); 6] = [
            (
                &["--webhook-listen", "0.0.0.0:9443", "--webhook-cert", "/c"],
                "--webhook-cert and --webhook-key go together (or neither: the certificate \
                 then comes from the mesh CA)",
            ),
            (
                &["--webhook-cert", "/c", "--webhook-key", "/k"],
                "--webhook-cert / --webhook-key need --webhook-listen",
            ),
            (
                &[
                    "--webhook-listen",
                    "0.0.0.0:9443",
                    "--webhook-cert",
                    "/c",
                    "--webhook-key",
                    "/k",
                    "--webhook-dns-names",
                    "bad name",
                ],
                "--webhook-dns-names: \"bad name\" is not a DNS name",
            ),
            // The mesh CA issues DNS names only.
            (
                &[
                    "--webhook-listen",
                    "0.0.0.0:9443",
                    "--webhook-dns-names",
                    "10.0.0.1",
                ],
                "--webhook-dns-names: \"10.0.0.1\" is not a DNS name",
            ),
            (
                &[
                    "--webhook-listen",
                    "0.0.0.0:9443",
                    "--webhook-dns-names",
                    "*.svc",
                ],
                "--webhook-dns-names: \"*.svc\" is not a DNS name",
            ),
            (
                &[
                    "--webhook-listen",
                    "0.0.0.0:9443",
                    "--webhook-cert-ttl",
                    "30s",
                ],
                "--webhook-cert-ttl: 30s is shorter than 1m",
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(
                CertSource::from_args(&flags(extra)),
                Err(expected.to_owned())
            );
        }
        // --trust-domain is optional now: unset, the mesh config or the default decides.
        assert_eq!(flags(&[]).trust_domain_flag, None);
        assert_eq!(
            flags(&["--trust-domain", "x.example"])
                .trust_domain_flag
                .as_deref(),
            Some("x.example")
        );
    }
}
