//! `trellis check --kubernetes` (an installed mesh) and `trellis check --pre` (before
//! installing), through the Kubernetes API: the kubeconfig's current context (or
//! `--context`), else the pod's ServiceAccount.
//!
//! Both start with `kubernetes-api` (a client, and the API answers) and
//! `kubernetes-version` (✖ below 1.28; ‼ below 1.29, where proxies run as classic
//! sidecars; ✔ from 1.29, native sidecars).
//!
//! `--pre` (`pre-install`):
//! - permission to create what the chart renders with its default values and the
//!   CustomResourceDefinitions of its `crds/` (one `SelfSubjectAccessReview` per kind,
//!   [`CHART_CREATES`]; the namespace too when it does not exist yet);
//! - Trellis installed already (‼: upgrade rather than install);
//! - other meshes: Istio (`istio-system`, webhooks `istio-sidecar-injector*` and
//!   `istio-revision-tag-*`), Linkerd (`linkerd`, `linkerd-proxy-injector-webhook-config`),
//!   Open Service Mesh (`osm-system`, webhooks `osm-webhook-*`): ✖ when their control plane
//!   or injector is there (two injectors fight over a pod's traffic capture); ‼ when only
//!   namespaces still opt into their injection (`istio-injection=enabled`, `istio.io/rev`,
//!   `linkerd.io/inject`, `openservicemesh.io/monitored-by`), which is harmless without the
//!   injector but a sign of an unfinished uninstall.
//!
//! `--kubernetes`:
//! - `control-plane`: Deployment `trellis-control-plane` exists, ✖ with no available
//!   replica, ‼ with fewer than wanted; its pods all run one image version (‼ otherwise).
//! - `crds`: every Trellis CustomResourceDefinition (`trellis_controller::crd::crds`, e.g.
//!   `authorizationpolicies.policy.trellis.dev`) is installed, `Established`, and serves
//!   every version this build knows (✖ otherwise, with `kubectl apply -f
//!   charts/trellis/crds/`); ‼ when its schema differs from this build's: Helm installs
//!   `crds/` on the first install only and never upgrades them.
//! - `routes`: the Gateway API's HTTPRoute CRD (`httproutes.gateway.networking.k8s.io`,
//!   which Trellis reads but does not ship) is installed and serves `v1`; ‼ otherwise,
//!   with the install command: the mesh runs without it, but no route applies.
//! - `webhook`: `MutatingWebhookConfiguration trellis-sidecar-injector` and
//!   `ValidatingWebhookConfiguration trellis-config` exist, and each webhook's `caBundle`
//!   holds PEM certificates, none expired, equal to the trust bundle (the control plane keeps
//!   it so at runtime; not compared when cert-manager's CA injector owns it); Service
//!   `trellis-webhook` has a ready endpoint; and injection works: a server-side dry run
//!   (`dryRun=All`: admission webhooks run, nothing is stored; ours declare
//!   `sideEffects: None`) of a throwaway pod comes back with `trellis.dev/injected`. The pod
//!   goes to `--injection-namespace`, default the first namespace labelled
//!   `trellis.dev/inject=enabled`: the injector's namespaceSelector only sends it pods of
//!   such namespaces, so a dry run elsewhere would prove nothing (‼ injection not tested);
//!   no namespace labelled for injection enforces Pod Security `baseline` or `restricted`,
//!   which refuse the capture step's NET_ADMIN and NET_RAW (✖ naming them).
//! - `trust`: ConfigMap `trellis-trust-bundle` (key `trust-bundle.pem`): every root parses,
//!   is a CA, and is not about to expire (the local check's rule: ‼ within `--warn-within`,
//!   ✖ within a tenth of it or expired); the same rule for the issuing CA's `notAfter`, from
//!   the control plane's metrics; every namespace labelled for injection holds the same
//!   bundle (✖ naming those missing or different: their new pods' proxies cannot start);
//!   the webhook serving certificate's `notAfter` (✖ expired, ‼ under an hour left).
//! - `data-plane`: from each running control plane replica's Prometheus metrics on port
//!   9090, read through the API server's pod proxy
//!   (`/api/v1/namespaces/<ns>/pods/<pod>:9090/proxy/metrics`), summed over replicas:
//!   connected proxies against running injected pods (label `trellis.dev/proxy`; ‼ when
//!   fewer are connected), proxies that have not acked the latest configuration (‼: they
//!   may be applying it; one read cannot tell stuck from slow), and proxy versions against
//!   the control plane's (`trellis_build_info`): ‼ for any other version, ✖ for a different
//!   major or more than one minor apart — one minor is the skew an upgrade goes through
//!   (control plane first, then workloads restarted), as Istio and Linkerd support.
//!
//! Reading is in the `async` functions; every verdict is a pure function of what was read
//! (tested with tables, and end to end against the Kubernetes API stand-in).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, Container, Namespace, Pod, PodSecurityContext, PodSpec,
    SeccompProfile, SecurityContext, Service,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, PostParams};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use trellis_azure::CertSummary;
use trellis_controller::httproute::{GATEWAY_API_INSTALL, HTTP_ROUTE_CRD, HTTP_ROUTE_VERSION};
use trellis_webhook::{ANNOTATION_INJECT, ANNOTATION_INJECTED, KubeVersion, LABEL_PROXY};

use super::{CONTROL_PLANE, Check, DATA_PLANE, TRUST, Verdict, expiry, unix};
use crate::stat;

/// The namespace the chart installs into (fixed: the control plane's identity names it).
pub(crate) const NAMESPACE: &str = "trellis-system";
/// The control plane's Deployment (charts/trellis/templates/deployment.yaml).
const DEPLOYMENT: &str = "trellis-control-plane";
/// The labels every control plane pod carries whatever the release name (the chart's
/// selector adds `app.kubernetes.io/instance`, which depends on it).
const CONTROL_PLANE_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "trellis"),
    ("app.kubernetes.io/component", "control-plane"),
];
/// The sidecar injector's MutatingWebhookConfiguration (templates/webhooks.yaml).
const INJECTOR: &str = "trellis-sidecar-injector";
/// The config validator's ValidatingWebhookConfiguration.
const VALIDATOR: &str = "trellis-config";
/// The Service in front of both webhooks (templates/services.yaml).
const WEBHOOK_SERVICE: &str = "trellis-webhook";
/// The ConfigMap the control plane publishes its trust bundle in, and its key (what the
/// injector mounts into every pod: `trellis_webhook::InjectConfig`).
const TRUST_BUNDLE: &str = "trellis-trust-bundle";
const TRUST_BUNDLE_KEY: &str = "trust-bundle.pem";
/// cert-manager's CA injector fills `caBundle` of configurations annotated so.
const CERT_MANAGER_INJECT: &str = "cert-manager.io/inject-ca-from";
/// The control plane's metrics-only listener.
const METRICS_PORT: u16 = 9090;
/// Below this the mesh is not supported at all: the chart's ValidatingWebhookConfiguration
/// uses `matchConditions` (on by default from 1.28); without them the validator would see
/// every ConfigMap of trellis-system.
const MIN_VERSION: KubeVersion = KubeVersion {
    major: 1,
    minor: 28,
};
/// Namespaces the injector never injects, so never a target of the dry run.
const NEVER_INJECTED: [&str; 2] = ["kube-system", NAMESPACE];

// The control plane's metric families `trellis check` reads (its contract with
// addon/app and addon/discovery).
const BUILD_INFO: &str = "trellis_build_info";
const CONNECTED: &str = "trellis_discovery_connected_proxies";
const BEHIND: &str = "trellis_discovery_proxies_behind";
const BY_VERSION: &str = "trellis_discovery_proxies_by_version";
/// The issuing CA's expiry (addon/ca/src/source.rs).
const SIGNING_EXPIRY: &str = "trellis_ca_signing_expiry_timestamp_seconds";
/// The webhook listener's serving certificate expiry (addon/app/src/webhook.rs).
const WEBHOOK_CERT_EXPIRY: &str = "trellis_webhook_certificate_expiration_timestamp_seconds";
/// Below this much left, the webhook certificate's renewal (at half its lifetime, 24 h by
/// default) has been failing for hours.
const WEBHOOK_CERT_MIN_LEFT: u64 = 3600;

const API: &str = "kubernetes-api";
const VERSION: &str = "kubernetes-version";
const PRE_INSTALL: &str = "pre-install";
const CRDS: &str = "crds";
const ROUTES: &str = "routes";
const WEBHOOK: &str = "webhook";
/// How to install (or upgrade) the CRDs: Helm installs the chart's `crds/` on the first
/// install only, never on `helm upgrade`.
const APPLY_CRDS: &str = "kubectl apply -f charts/trellis/crds/";

/// What the Kubernetes checks need besides the client.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Where Trellis is (or will be) installed.
    pub(crate) namespace: String,
    /// Where the dry-run pod goes; `None`: the first namespace labelled for injection.
    pub(crate) injection_namespace: Option<String>,
    /// Expiry warning window (`--warn-within`).
    pub(crate) warn_within: Duration,
    /// The time expiry is judged at.
    pub(crate) now: SystemTime,
}

/// Connects (`context`: a kubeconfig context, else the default) and runs the pre-install
/// (`pre`) or the post-install checks.
pub(crate) async fn run(context: Option<&str>, pre: bool, options: &Options) -> Vec<Check> {
    let client = match connect(context).await {
        Ok(client) => client,
        Err(e) => {
            return vec![Check::new(
                API,
                Verdict::Fail,
                format!("can initialize the client: {e:#}"),
                "point KUBECONFIG (and --context) at the cluster, or run in a pod with a \
                 ServiceAccount token",
            )];
        }
    };
    let mut checks = vec![Check::ok(API, "can initialize the client")];
    if pre {
        checks.extend(pre_install(&client, options).await);
    } else {
        checks.extend(post_install(&client, options).await);
    }
    checks
}

/// A client for `context` of the kubeconfig, or as `kube::Client::try_default` finds one
/// (`KUBECONFIG`, `~/.kube/config`, in-cluster).
async fn connect(context: Option<&str>) -> anyhow::Result<kube::Client> {
    let config = match context {
        None => kube::Config::infer().await?,
        Some(context) => {
            let options = kube::config::KubeConfigOptions {
                context: Some(context.to_owned()),
                ..Default::default()
            };
            kube::Config::from_kubeconfig(&options).await?
        }
    };
    Ok(kube::Client::try_from(config)?)
}

// === pre-install ===

/// The `--pre` checks: the API and its version, then `pre-install`.
pub(crate) async fn pre_install(client: &kube::Client, options: &Options) -> Vec<Check> {
    let mut checks = match version_checks(client).await {
        Ok(checks) => checks,
        Err(checks) => return checks,
    };
    let ns = &options.namespace;
    let namespace_exists = Api::<Namespace>::all(client.clone()).get_opt(ns).await;
    let mut wanted: Vec<Access> = Vec::new();
    // `helm install --create-namespace` creates it; an existing one needs nothing.
    if !matches!(namespace_exists, Ok(Some(_))) {
        wanted.push(CREATE_NAMESPACE);
    }
    wanted.extend(CHART_CREATES);
    let mut answers = Vec::new();
    for access in wanted {
        answers.push((access, may_create(client, access, ns).await));
    }
    checks.push(permissions_check(ns, &answers));
    match inventory(client, ns).await {
        Ok(inventory) => checks.extend(install_checks(ns, &inventory)),
        Err(e) => checks.push(Check::new(
            PRE_INSTALL,
            Verdict::Warn,
            format!("cannot look for other meshes: {e}"),
            "listing namespaces and webhook configurations needs list permission on them",
        )),
    }
    checks
}

/// `kubernetes-api` and `kubernetes-version`, or (as the error) the one failed check when
/// the API does not answer: nothing else can be checked then.
async fn version_checks(client: &kube::Client) -> Result<Vec<Check>, Vec<Check>> {
    match client.apiserver_version().await {
        Ok(info) => Ok(vec![
            Check::ok(API, "can query the Kubernetes API"),
            version_check(&info.git_version),
        ]),
        Err(e) => Err(vec![Check::new(
            API,
            Verdict::Fail,
            format!("can query the Kubernetes API: {}", error_text(&e)),
            "check the kubeconfig's server and credentials (`kubectl version` should answer)",
        )]),
    }
}

/// The cluster's version (`gitVersion`, e.g. `v1.29.4`) against what Trellis needs.
pub(crate) fn version_check(git_version: &str) -> Check {
    let Ok(version) = git_version.parse::<KubeVersion>() else {
        return Check::new(
            VERSION,
            Verdict::Warn,
            format!("cannot read the Kubernetes version {git_version:?}"),
            "Trellis needs 1.28 or later, 1.29 or later for native sidecars",
        );
    };
    if version < MIN_VERSION {
        Check::new(
            VERSION,
            Verdict::Fail,
            format!(
                "Kubernetes {git_version} is older than {MIN_VERSION}, the oldest Trellis supports"
            ),
            "upgrade the cluster to 1.29 or later (native sidecars)",
        )
    } else if !version.has_native_sidecars() {
        Check::new(
            VERSION,
            Verdict::Warn,
            format!("Kubernetes {git_version}: classic sidecar: native sidecars need 1.29"),
            "proxies run as the pod's first container and each app waits for its proxy in a \
             postStart hook; upgrade to 1.29 or later for native sidecars",
        )
    } else {
        Check::ok(
            VERSION,
            format!("Kubernetes {git_version} runs native sidecars (1.29 or later)"),
        )
    }
}

/// A `create` that installing the chart needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Access {
    /// The API group (`""`: core).
    pub(crate) group: &'static str,
    /// The resource (URL plural).
    pub(crate) resource: &'static str,
    /// In the install namespace (else cluster-scoped).
    pub(crate) namespaced: bool,
}

impl Access {
    const fn new(group: &'static str, resource: &'static str, namespaced: bool) -> Self {
        Self {
            group,
            resource,
            namespaced,
        }
    }

    /// `deployments.apps in trellis-system`, `clusterroles.rbac.authorization.k8s.io`.
    fn describe(&self, namespace: &str) -> String {
        let mut out = self.resource.to_owned();
        if !self.group.is_empty() {
            out = format!("{out}.{}", self.group);
        }
        if self.namespaced {
            out = format!("{out} in {namespace}");
        }
        out
    }
}

/// The install namespace, when it does not exist yet.
const CREATE_NAMESPACE: Access = Access::new("", "namespaces", false);

/// What `helm install` of charts/trellis creates with its default values
/// (charts/trellis/templates): the ServiceAccount, the `trellis-config` ConfigMap, two
/// Services, the Deployment, a PodDisruptionBudget (2 replicas), two NetworkPolicies, the
/// RBAC objects and both webhook configurations; and, first of all, the
/// CustomResourceDefinitions of charts/trellis/crds/. Not the PodMonitor (off by default)
/// nor the `helm test` pod (created by `helm test`, not by the install).
pub(crate) const CHART_CREATES: [Access; 15] = [
    Access::new("apiextensions.k8s.io", "customresourcedefinitions", false),
    Access::new("", "serviceaccounts", true),
    Access::new("", "configmaps", true),
    Access::new("", "services", true),
    Access::new("apps", "deployments", true),
    Access::new("policy", "poddisruptionbudgets", true),
    Access::new("networking.k8s.io", "networkpolicies", true),
    Access::new("rbac.authorization.k8s.io", "clusterroles", false),
    Access::new("rbac.authorization.k8s.io", "clusterrolebindings", false),
    Access::new("rbac.authorization.k8s.io", "roles", true),
    Access::new("rbac.authorization.k8s.io", "rolebindings", true),
    Access::new(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        false,
    ),
    Access::new(
        "admissionregistration.k8s.io",
        "validatingwebhookconfigurations",
        false,
    ),
    // Rendered for Kubernetes 1.30+ only; asking on older clusters is harmless.
    Access::new(
        "admissionregistration.k8s.io",
        "validatingadmissionpolicies",
        false,
    ),
    Access::new(
        "admissionregistration.k8s.io",
        "validatingadmissionpolicybindings",
        false,
    ),
];

/// Whether the caller may create `access` (one SelfSubjectAccessReview).
async fn may_create(
    client: &kube::Client,
    access: Access,
    namespace: &str,
) -> Result<bool, String> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some("create".to_owned()),
                group: Some(access.group.to_owned()),
                resource: Some(access.resource.to_owned()),
                namespace: access.namespaced.then(|| namespace.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| error_text(&e))?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// One line: every create allowed, or the ones that are not.
pub(crate) fn permissions_check(
    namespace: &str,
    answers: &[(Access, Result<bool, String>)],
) -> Check {
    if let Some((access, Err(e))) = answers.iter().find(|(_, a)| a.is_err()) {
        return Check::new(
            PRE_INSTALL,
            Verdict::Fail,
            format!(
                "cannot check permissions (create {}): {e}",
                access.describe(namespace)
            ),
            "the API server must answer authorization.k8s.io/v1 SelfSubjectAccessReviews",
        );
    }
    let missing: Vec<String> = answers
        .iter()
        .filter(|(_, allowed)| matches!(allowed, Ok(false)))
        .map(|(access, _)| access.describe(namespace))
        .collect();
    if missing.is_empty() {
        return Check::ok(
            PRE_INSTALL,
            format!(
                "can create the {} kinds of objects the chart installs",
                answers.len()
            ),
        );
    }
    Check::new(
        PRE_INSTALL,
        Verdict::Fail,
        format!("missing permission to create: {}", missing.join(", ")),
        "install as a user who may (the chart creates RBAC and webhook configurations, \
         usually cluster-admin), or ask a cluster admin to grant these",
    )
}

/// What other meshes, or an earlier Trellis, leave in a cluster.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inventory {
    /// Every namespace.
    pub(crate) namespaces: Vec<Namespace>,
    /// Names of the MutatingWebhookConfigurations.
    pub(crate) mutating: Vec<String>,
    /// Names of the ValidatingWebhookConfigurations.
    pub(crate) validating: Vec<String>,
    /// Whether Deployment `trellis-control-plane` exists in the install namespace.
    pub(crate) control_plane: bool,
}

async fn inventory(client: &kube::Client, namespace: &str) -> Result<Inventory, String> {
    let all = ListParams::default();
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&all)
        .await
        .map_err(|e| error_text(&e))?;
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .list(&all)
        .await
        .map_err(|e| error_text(&e))?;
    let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .list(&all)
        .await
        .map_err(|e| error_text(&e))?;
    let control_plane = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get_opt(DEPLOYMENT)
        .await
        .map_err(|e| error_text(&e))?
        .is_some();
    let names = |items: Vec<ObjectMeta>| -> Vec<String> {
        items.into_iter().filter_map(|m| m.name).collect()
    };
    Ok(Inventory {
        namespaces: namespaces.items,
        mutating: names(mutating.items.into_iter().map(|w| w.metadata).collect()),
        validating: names(validating.items.into_iter().map(|w| w.metadata).collect()),
        control_plane,
    })
}

/// A mesh that conflicts with Trellis, and how to recognize it.
struct Mesh {
    name: &'static str,
    /// Its control plane's namespace.
    namespace: &'static str,
    /// Webhook configuration names (exact, or a prefix when ending in `*`).
    webhooks: &'static [&'static str],
    /// Namespace labels that opt into its injection (`(key, Some(value))`: only that
    /// value).
    labels: &'static [(&'static str, Option<&'static str>)],
    /// Namespace annotations that opt into its injection (any value but `disabled`).
    annotations: &'static [&'static str],
    /// How to remove it.
    uninstall: &'static str,
}

const MESHES: [Mesh; 3] = [
    Mesh {
        name: "Istio",
        namespace: "istio-system",
        webhooks: &["istio-sidecar-injector*", "istio-revision-tag-*"],
        labels: &[("istio-injection", Some("enabled")), ("istio.io/rev", None)],
        annotations: &[],
        uninstall: "istioctl uninstall --purge",
    },
    Mesh {
        name: "Linkerd",
        namespace: "linkerd",
        webhooks: &["linkerd-proxy-injector-webhook-config"],
        labels: &[],
        annotations: &["linkerd.io/inject"],
        uninstall: "linkerd uninstall | kubectl delete -f -",
    },
    Mesh {
        name: "Open Service Mesh",
        namespace: "osm-system",
        webhooks: &["osm-webhook-*"],
        labels: &[("openservicemesh.io/monitored-by", None)],
        annotations: &[],
        uninstall: "osm uninstall mesh",
    },
];

/// Trellis installed already, then one line per other mesh found (or one ✔ for none).
pub(crate) fn install_checks(namespace: &str, inventory: &Inventory) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut trellis = Vec::new();
    if inventory.control_plane {
        trellis.push(format!("deployment {namespace}/{DEPLOYMENT}"));
    }
    if inventory.mutating.iter().any(|n| n == INJECTOR) {
        trellis.push(format!("mutatingwebhookconfiguration {INJECTOR}"));
    }
    if inventory.validating.iter().any(|n| n == VALIDATOR) {
        trellis.push(format!("validatingwebhookconfiguration {VALIDATOR}"));
    }
    checks.push(if trellis.is_empty() {
        Check::ok(PRE_INSTALL, "Trellis is not installed yet")
    } else {
        Check::new(
            PRE_INSTALL,
            Verdict::Warn,
            format!("Trellis is already installed: {}", trellis.join(", ")),
            "upgrade it (helm upgrade) rather than install it again; `trellis check \
             --kubernetes` checks its health",
        )
    });

    let before = checks.len();
    for mesh in &MESHES {
        let mut found = Vec::new();
        if namespace_named(&inventory.namespaces, mesh.namespace) {
            found.push(format!("namespace {}", mesh.namespace));
        }
        for (kind, names) in [
            ("mutatingwebhookconfiguration", &inventory.mutating),
            ("validatingwebhookconfiguration", &inventory.validating),
        ] {
            for name in names {
                if mesh
                    .webhooks
                    .iter()
                    .any(|pattern| matches_name(pattern, name))
                {
                    found.push(format!("{kind} {name}"));
                }
            }
        }
        let opted_in = opted_in(mesh, &inventory.namespaces);
        if found.is_empty() && opted_in.is_empty() {
            continue;
        }
        let opted_in_text = format!(
            "namespaces set up for its injection: {}",
            opted_in.join(", ")
        );
        checks.push(if found.is_empty() {
            Check::new(
                PRE_INSTALL,
                Verdict::Warn,
                format!("{} is not installed, but {opted_in_text}", mesh.name),
                "leftovers of an uninstall: remove these labels or annotations \
                 (kubectl label namespace NAME KEY-, kubectl annotate namespace NAME KEY-)",
            )
        } else {
            let mut line = format!("{} is installed: {}", mesh.name, found.join(", "));
            if !opted_in.is_empty() {
                line = format!("{line}; {opted_in_text}");
            }
            Check::new(
                PRE_INSTALL,
                Verdict::Fail,
                line,
                format!(
                    "two meshes' sidecars in one pod fight over its traffic: uninstall {} \
                     first ({})",
                    mesh.name, mesh.uninstall
                ),
            )
        });
    }
    if checks.len() == before {
        checks.push(Check::ok(
            PRE_INSTALL,
            "no other service mesh found (Istio, Linkerd, Open Service Mesh)",
        ));
    }
    checks
}

fn namespace_named(namespaces: &[Namespace], name: &str) -> bool {
    namespaces
        .iter()
        .any(|n| n.metadata.name.as_deref() == Some(name))
}

/// `pattern` is a name, or a prefix followed by `*`.
fn matches_name(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

/// The namespaces that opt into `mesh`'s injection, as `name (key=value)`.
fn opted_in(mesh: &Mesh, namespaces: &[Namespace]) -> Vec<String> {
    let mut out = Vec::new();
    for ns in namespaces {
        let name = ns.metadata.name.as_deref().unwrap_or("?");
        let labels = ns.metadata.labels.as_ref();
        for (key, value) in mesh.labels {
            if let Some(v) = labels.and_then(|l| l.get(*key))
                && value.is_none_or(|want| want == v)
            {
                out.push(format!("{name} ({key}={v})"));
            }
        }
        let annotations = ns.metadata.annotations.as_ref();
        for key in mesh.annotations {
            if let Some(v) = annotations.and_then(|a| a.get(*key))
                && v != "disabled"
            {
                out.push(format!("{name} ({key}={v})"));
            }
        }
    }
    out
}

// === post-install ===

/// The `--kubernetes` checks: the API and its version, then the control plane, its
/// webhooks, the trust bundle and the data plane.
pub(crate) async fn post_install(client: &kube::Client, options: &Options) -> Vec<Check> {
    let mut checks = match version_checks(client).await {
        Ok(checks) => checks,
        Err(checks) => return checks,
    };
    let ns = options.namespace.as_str();
    let now = unix(options.now);

    // control-plane
    let deployment = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(DEPLOYMENT)
        .await;
    let pods = control_plane_pods(client, ns).await;
    match (&deployment, &pods) {
        (Ok(deployment), Ok(pods)) => {
            checks.extend(control_plane_checks(ns, deployment.as_ref(), pods));
        }
        (Err(e), _) => checks.push(read_failed(
            CONTROL_PLANE,
            &format!("deployment {ns}/{DEPLOYMENT}"),
            &error_text(e),
        )),
        (_, Err(e)) => checks.push(read_failed(CONTROL_PLANE, &format!("pods in {ns}"), e)),
    }
    let pods = pods.unwrap_or_default();

    // crds
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for expected in trellis_controller::crd::crds() {
        let name = expected.metadata.name.clone().unwrap_or_default();
        checks.push(match crds.get_opt(&name).await {
            Ok(found) => crd_check(&expected, found.as_ref()),
            Err(e) => read_failed(
                CRDS,
                &format!("customresourcedefinition {name}"),
                &error_text(&e),
            ),
        });
    }

    // routes
    checks.push(match crds.get_opt(HTTP_ROUTE_CRD).await {
        Ok(found) => routes_check(found.as_ref()),
        Err(e) => read_failed(
            ROUTES,
            &format!("customresourcedefinition {HTTP_ROUTE_CRD}"),
            &error_text(&e),
        ),
    });

    // webhook (the trust bundle is read first: the caBundles must equal it)
    let bundle = match Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(TRUST_BUNDLE)
        .await
    {
        Ok(config_map) => trust_bundle(config_map.as_ref()),
        Err(e) => Err(format!("cannot be read: {}", error_text(&e))),
    };
    let trust: Option<Vec<Vec<u8>>> = bundle
        .as_ref()
        .ok()
        .map(|certs| certs.iter().map(|(_, der)| der.clone()).collect());
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(INJECTOR)
        .await
        .map(|found| {
            found.map(|c| {
                let hooks = c.webhooks.unwrap_or_default().into_iter();
                WebhookConfig::of(&c.metadata, hooks.map(|w| (w.name, w.client_config)))
            })
        });
    let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get_opt(VALIDATOR)
        .await
        .map(|found| {
            found.map(|c| {
                let hooks = c.webhooks.unwrap_or_default().into_iter();
                WebhookConfig::of(&c.metadata, hooks.map(|w| (w.name, w.client_config)))
            })
        });
    for (kind, name, read) in [
        ("MutatingWebhookConfiguration", INJECTOR, mutating),
        ("ValidatingWebhookConfiguration", VALIDATOR, validating),
    ] {
        checks.push(match read {
            Ok(found) => ca_bundle_check(kind, name, found.as_ref(), trust.as_deref(), now),
            Err(e) => read_failed(WEBHOOK, &format!("{kind} {name}"), &error_text(&e)),
        });
    }
    checks.push(webhook_endpoints(client, ns).await);
    // Listed once: the dry run's default namespace, Pod Security, the published bundles.
    let selector = format!("{ANNOTATION_INJECT}=enabled");
    let labelled = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await
        .map(|list| list.items)
        .map_err(|e| error_text(&e));
    checks.push(injection_check(&dry_run(client, options, &labelled).await));
    checks.extend(pod_security_check(&labelled));

    // trust
    checks.extend(trust_checks(ns, &bundle, now, options.warn_within));
    checks.extend(published_check(
        &bundle,
        &published_bundles(client, &labelled).await,
    ));
    let scrapes = scrape(client, ns, &pods).await;
    let read: Vec<&ReplicaMetrics> = scrapes
        .iter()
        .filter_map(|(_, m)| m.as_ref().ok())
        .collect();
    if !read.is_empty() {
        checks.push(signing_check(&read, now, options.warn_within));
        checks.push(webhook_cert_check(&read, now));
    }

    // data-plane
    let injected = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().labels(LABEL_PROXY))
        .await;
    match injected {
        Ok(list) => checks.extend(data_plane_checks(
            ns,
            &scrapes,
            running_injected(&list.items),
        )),
        Err(e) => checks.push(read_failed(
            DATA_PLANE,
            "injected pods (all namespaces)",
            &error_text(&e),
        )),
    }
    checks
}

/// The cluster's CRD (`found`) against this build's (`expected`): ✖ when it is missing,
/// not `Established` or does not serve a version this build knows; ‼ when a version's
/// schema differs (Helm never upgrades a chart's CRDs, so an upgraded mesh can run with the
/// previous release's, refusing new fields or accepting removed ones).
pub(crate) fn crd_check(
    expected: &CustomResourceDefinition,
    found: Option<&CustomResourceDefinition>,
) -> Check {
    let name = expected.metadata.name.as_deref().unwrap_or_default();
    let Some(found) = found else {
        return Check::new(
            CRDS,
            Verdict::Fail,
            format!("CustomResourceDefinition {name} not found"),
            format!(
                "{APPLY_CRDS} (Helm installs them on the first install only); until then no \
                 {} can be created",
                expected.spec.names.kind
            ),
        );
    };
    let conditions = (found.status.as_ref())
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let condition = |kind: &str| conditions.iter().find(|c| c.type_ == kind);
    if condition("Established").is_none_or(|c| c.status != "True") {
        // NamesAccepted=False (a name taken by another CRD) says why; else whatever the
        // Established condition says.
        let why = [condition("NamesAccepted"), condition("Established")]
            .into_iter()
            .flatten()
            .find(|c| c.status != "True")
            .map(|c| {
                let text = c.message.as_deref().or(c.reason.as_deref()).unwrap_or("");
                format!(": {} {}: {text}", c.type_, c.status)
            })
            .unwrap_or_else(|| ": no Established condition".to_owned());
        return Check::new(
            CRDS,
            Verdict::Fail,
            format!("CustomResourceDefinition {name} is not established{why}"),
            format!(
                "the API server does not serve it (kubectl describe crd {name}); fix what it \
                 says, then {APPLY_CRDS}"
            ),
        );
    }
    let served = |crd: &CustomResourceDefinition| -> Vec<String> {
        (crd.spec.versions.iter())
            .filter(|v| v.served)
            .map(|v| v.name.clone())
            .collect()
    };
    let (wanted, serves) = (served(expected), served(found));
    let missing: Vec<&str> = (wanted.iter())
        .filter(|v| !serves.contains(v))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Check::new(
            CRDS,
            Verdict::Fail,
            format!(
                "CustomResourceDefinition {name} does not serve {} (serves: {})",
                missing.join(", "),
                if serves.is_empty() {
                    "none".to_owned()
                } else {
                    serves.join(", ")
                }
            ),
            format!("{APPLY_CRDS} of the release you run"),
        );
    }
    let schema = |crd: &CustomResourceDefinition, version: &str| {
        (crd.spec.versions.iter())
            .find(|v| v.name == version)
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.clone())
    };
    let differ: Vec<&str> = (wanted.iter())
        .filter(|v| schema(expected, v) != schema(found, v))
        .map(String::as_str)
        .collect();
    if !differ.is_empty() {
        return Check::new(
            CRDS,
            Verdict::Warn,
            format!(
                "CustomResourceDefinition {name} {}: schema differs from this trellis \
                 version's",
                differ.join(", ")
            ),
            format!(
                "Helm never upgrades a chart's CRDs: {APPLY_CRDS} of the release you run (or \
                 use the trellis CLI of that release)"
            ),
        );
    }
    Check::ok(
        CRDS,
        format!(
            "CustomResourceDefinition {name} is established and serves {}",
            wanted.join(", ")
        ),
    )
}

/// The Gateway API's HTTPRoute CRD (`found`): ‼ when it is missing or does not serve
/// `v1` (Trellis reads `gateway.networking.k8s.io/v1`): the mesh works without it, but no
/// HTTPRoute can be created, so nothing is routed.
pub(crate) fn routes_check(found: Option<&CustomResourceDefinition>) -> Check {
    let Some(found) = found else {
        return Check::new(
            ROUTES,
            Verdict::Warn,
            format!("Gateway API CRDs not installed ({HTTP_ROUTE_CRD} not found)"),
            format!(
                "{GATEWAY_API_INSTALL} to route, split and time out requests with HTTPRoutes \
                 (until then Services are served unrouted)"
            ),
        );
    };
    let serves: Vec<&str> = (found.spec.versions.iter())
        .filter(|v| v.served)
        .map(|v| v.name.as_str())
        .collect();
    if !serves.contains(&HTTP_ROUTE_VERSION) {
        return Check::new(
            ROUTES,
            Verdict::Warn,
            format!(
                "CustomResourceDefinition {HTTP_ROUTE_CRD} does not serve {HTTP_ROUTE_VERSION} \
                 (serves: {})",
                if serves.is_empty() {
                    "none".to_owned()
                } else {
                    serves.join(", ")
                }
            ),
            format!("upgrade the Gateway API CRDs: {GATEWAY_API_INSTALL}"),
        );
    }
    Check::ok(
        ROUTES,
        format!(
            "Gateway API CustomResourceDefinition {HTTP_ROUTE_CRD} serves {HTTP_ROUTE_VERSION}"
        ),
    )
}

/// A ✖ for something that could not be read.
fn read_failed(group: &'static str, what: &str, error: &str) -> Check {
    Check::new(
        group,
        Verdict::Fail,
        format!("cannot read {what}: {error}"),
        "reading the mesh needs get/list on it (e.g. the cluster-admin or view role)",
    )
}

fn has_annotation(meta: &ObjectMeta, key: &str) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(key))
}

fn has_labels(meta: &ObjectMeta, wanted: &[(&str, &str)]) -> bool {
    let labels = meta.labels.as_ref();
    wanted
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(*k)).is_some_and(|l| l == v))
}

async fn control_plane_pods(client: &kube::Client, namespace: &str) -> Result<Vec<Pod>, String> {
    let selector = CONTROL_PLANE_LABELS
        .map(|(k, v)| format!("{k}={v}"))
        .join(",");
    let list = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| error_text(&e))?;
    // Filtered here too: the selector is the server's to apply, this is what we mean.
    let mut pods: Vec<Pod> = (list.items.into_iter())
        .filter(|p| has_labels(&p.metadata, &CONTROL_PLANE_LABELS))
        .collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(pods)
}

/// The Deployment's available replicas, and whether its pods run one version.
pub(crate) fn control_plane_checks(
    namespace: &str,
    deployment: Option<&Deployment>,
    pods: &[Pod],
) -> Vec<Check> {
    let Some(deployment) = deployment else {
        return vec![Check::new(
            CONTROL_PLANE,
            Verdict::Fail,
            format!("deployment {namespace}/{DEPLOYMENT} not found"),
            format!("install the chart: helm install trellis charts/trellis -n {namespace}"),
        )];
    };
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let available = (deployment.status.as_ref())
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    let line = format!(
        "control plane: {available} of {} available",
        plural(wanted, "replica", "replicas")
    );
    let why = format!(
        "kubectl -n {namespace} describe deployment/{DEPLOYMENT} and kubectl -n {namespace} \
         logs deployment/{DEPLOYMENT} say why"
    );
    let mut checks = vec![if available <= 0 {
        Check::new(CONTROL_PLANE, Verdict::Fail, line, why)
    } else if available < wanted {
        Check::new(CONTROL_PLANE, Verdict::Warn, line, why)
    } else {
        Check::ok(CONTROL_PLANE, line)
    }];

    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    for pod in pods {
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
        let main = containers
            .iter()
            .find(|c| c.name == "control-plane")
            .or(containers.first());
        if let Some(image) = main.and_then(|c| c.image.as_deref()) {
            *versions.entry(image_version(image)).or_default() += 1;
        }
    }
    match versions.len() {
        0 => {}
        1 => {
            let version = versions.keys().next().map_or("", String::as_str);
            checks.push(Check::ok(
                CONTROL_PLANE,
                format!("control plane pods run one version: {version}"),
            ));
        }
        _ => checks.push(Check::new(
            CONTROL_PLANE,
            Verdict::Warn,
            format!(
                "control plane pods run different versions: {}",
                counted(&versions, "pod", "pods")
            ),
            format!(
                "a rollout in progress? kubectl -n {namespace} rollout status \
                 deployment/{DEPLOYMENT}"
            ),
        )),
    }
    checks
}

/// The version part of an image reference: its tag, `@sha256:<first 12>` for a digest,
/// `latest` for neither.
pub(crate) fn image_version(image: &str) -> String {
    if let Some((_, digest)) = image.split_once('@') {
        let short: String = digest.chars().take("sha256:".len() + 12).collect();
        return format!("@{short}");
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, tag)) => tag.to_owned(),
        None => "latest".to_owned(),
    }
}

/// A webhook configuration as the check reads it.
#[derive(Debug, Clone, Default)]
pub(crate) struct WebhookConfig {
    /// Each webhook's name and `clientConfig.caBundle` (PEM bytes).
    pub(crate) webhooks: Vec<(String, Option<Vec<u8>>)>,
    /// Whether cert-manager's CA injector owns the `caBundle`s.
    pub(crate) cert_manager: bool,
}

impl WebhookConfig {
    /// From a configuration's metadata and its webhooks' names and client configs.
    fn of(meta: &ObjectMeta, hooks: impl Iterator<Item = (String, WebhookClientConfig)>) -> Self {
        Self {
            cert_manager: has_annotation(meta, CERT_MANAGER_INJECT),
            webhooks: hooks
                .map(|(name, c)| (name, c.ca_bundle.map(|b| b.0)))
                .collect(),
        }
    }
}

/// One webhook configuration: found, and every webhook's `caBundle` is PEM certificates,
/// none expired at `now`, the same set as `trust` (the trust bundle's DER certificates,
/// when it could be read; not compared when cert-manager owns the bundle).
pub(crate) fn ca_bundle_check(
    kind: &str,
    name: &str,
    config: Option<&WebhookConfig>,
    trust: Option<&[Vec<u8>]>,
    now: u64,
) -> Check {
    let Some(config) = config else {
        return Check::new(
            WEBHOOK,
            Verdict::Fail,
            format!("{kind} {name} not found"),
            "install or upgrade the chart: it creates both webhook configurations",
        );
    };
    if config.webhooks.is_empty() {
        return Check::new(
            WEBHOOK,
            Verdict::Fail,
            format!("{kind} {name} has no webhooks"),
            "upgrade the chart to restore it",
        );
    }
    let mut problems = Vec::new();
    let mut count = 0;
    for (webhook, bundle) in &config.webhooks {
        let bundle = bundle.as_deref().unwrap_or_default();
        if bundle.is_empty() {
            problems.push(format!("{webhook} has no caBundle"));
            continue;
        }
        let certs = match parse_bundle(&String::from_utf8_lossy(bundle)) {
            Ok(certs) => certs,
            Err(e) => {
                problems.push(format!("{webhook}: caBundle is not PEM certificates: {e}"));
                continue;
            }
        };
        count = certs.len();
        for (cert, _) in &certs {
            if unix(cert.not_after) <= now {
                problems.push(format!(
                    "{webhook}: caBundle certificate {} has expired",
                    cert.subject
                ));
            }
        }
        if let Some(trust) = trust.filter(|_| !config.cert_manager) {
            let mut ours: Vec<&[u8]> = certs.iter().map(|(_, der)| der.as_slice()).collect();
            let mut theirs: Vec<&[u8]> = trust.iter().map(Vec::as_slice).collect();
            ours.sort_unstable();
            ours.dedup();
            theirs.sort_unstable();
            theirs.dedup();
            if ours != theirs {
                problems.push(format!(
                    "{webhook}: caBundle differs from the trust bundle in {TRUST_BUNDLE}"
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Check::new(
            WEBHOOK,
            Verdict::Fail,
            format!("{kind} {name}: {}", problems.join("; ")),
            "the control plane keeps caBundle equal to the trust bundle: is it running? \
             (kubectl -n trellis-system logs deployment/trellis-control-plane). Until then the \
             API server cannot call the webhook and refuses what it covers (failurePolicy Fail)",
        );
    }
    let certificates = plural(count, "certificate", "certificates");
    let how = if config.cert_manager {
        format!("caBundle from cert-manager ({certificates})")
    } else if trust.is_some() {
        format!("caBundle is the trust bundle ({certificates})")
    } else {
        format!("caBundle holds {certificates}, none expired")
    };
    Check::ok(WEBHOOK, format!("{kind} {name}: {how}"))
}

/// The certificates of a PEM bundle: each one's summary and DER.
fn parse_bundle(pem: &str) -> Result<Vec<(CertSummary, Vec<u8>)>, String> {
    let report =
        trellis_azure::report_from_pems("bundle", &[("bundle", pem)]).map_err(|e| match e {
            trellis_azure::Error::Invalid { reason, .. } => reason,
            other => other.to_string(),
        })?;
    let ders = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if ders.len() != report.certs.len() {
        return Err("PEM blocks other than certificates".to_owned());
    }
    Ok(report.certs.into_iter().zip(ders).collect())
}

async fn webhook_endpoints(client: &kube::Client, namespace: &str) -> Check {
    let service = Api::<Service>::namespaced(client.clone(), namespace)
        .get_opt(WEBHOOK_SERVICE)
        .await;
    let what = format!("service {namespace}/{WEBHOOK_SERVICE}");
    let found = match service {
        Ok(found) => found.is_some(),
        Err(e) => return read_failed(WEBHOOK, &what, &error_text(&e)),
    };
    let selector = format!("kubernetes.io/service-name={WEBHOOK_SERVICE}");
    match Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(slices) => endpoints_check(namespace, found, &slices.items),
        Err(e) => read_failed(
            WEBHOOK,
            &format!("endpointslices of {what}"),
            &error_text(&e),
        ),
    }
}

/// The webhook Service exists and its EndpointSlices hold a ready endpoint (`ready` unset
/// counts as ready, as for kube-proxy).
pub(crate) fn endpoints_check(namespace: &str, service: bool, slices: &[EndpointSlice]) -> Check {
    if !service {
        return Check::new(
            WEBHOOK,
            Verdict::Fail,
            format!("service {namespace}/{WEBHOOK_SERVICE} not found"),
            "install or upgrade the chart: the API server calls both webhooks through it",
        );
    }
    let ready = slices
        .iter()
        .filter(|s| {
            has_labels(
                &s.metadata,
                &[("kubernetes.io/service-name", WEBHOOK_SERVICE)],
            )
        })
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .count();
    if ready == 0 {
        return Check::new(
            WEBHOOK,
            Verdict::Fail,
            format!("service {namespace}/{WEBHOOK_SERVICE} has no ready endpoints"),
            "no control plane pod is ready to serve the webhooks, so pods in injected \
             namespaces and edits of trellis-config are refused; see the control-plane checks",
        );
    }
    Check::ok(
        WEBHOOK,
        format!(
            "service {namespace}/{WEBHOOK_SERVICE} has {}",
            plural(ready, "ready endpoint", "ready endpoints")
        ),
    )
}

/// What became of the injection dry run.
#[derive(Debug, Clone)]
pub(crate) enum DryRun {
    /// No `--injection-namespace` and no namespace labelled for injection.
    NoNamespace,
    /// `--injection-namespace` does not exist.
    Missing(String),
    /// `--injection-namespace` is not labelled for injection.
    NotLabelled(String),
    /// The namespaces could not be read.
    Unreadable(String),
    /// The pod as the API server answered the dry run, or its refusal.
    Done {
        /// Where the pod was sent.
        namespace: String,
        /// The pod after admission, or the error.
        result: Result<Box<Pod>, String>,
    },
}

/// Finds the namespace and sends the throwaway pod with `dryRun=All`.
/// The namespaces that opt into injection (the label), sorted; never the excluded ones.
fn injected_namespaces(namespaces: &[Namespace]) -> Vec<String> {
    let mut names: Vec<String> = (namespaces.iter())
        .filter(|ns| injection_enabled(ns))
        .filter_map(|ns| ns.metadata.name.clone())
        .filter(|name| !NEVER_INJECTED.contains(&name.as_str()))
        .collect();
    names.sort();
    names
}

/// Each injected namespace and its copy of the trust bundle as read: the PEM, `None` when
/// the ConfigMap (or its key) is missing, or why it could not be read.
pub(crate) type Published = Vec<(String, Result<Option<String>, String>)>;

/// [`Published`] for every namespace labelled for injection (`labelled`, as listed).
async fn published_bundles(
    client: &kube::Client,
    labelled: &Result<Vec<Namespace>, String>,
) -> Result<Published, String> {
    let mut out = Vec::new();
    for name in injected_namespaces(labelled.as_ref().map_err(Clone::clone)?) {
        let read = Api::<ConfigMap>::namespaced(client.clone(), &name)
            .get_opt(TRUST_BUNDLE)
            .await
            .map(|cm| {
                cm.and_then(|cm| cm.data)
                    .and_then(|mut d| d.remove(TRUST_BUNDLE_KEY))
            })
            .map_err(|e| error_text(&e));
        out.push((name, read));
    }
    Ok(out)
}

/// The Pod Security label that refuses injected pods: `baseline` and `restricted` forbid
/// the capture step's NET_ADMIN and NET_RAW.
const POD_SECURITY_ENFORCE: &str = "pod-security.kubernetes.io/enforce";

/// No namespace labelled for injection enforces a Pod Security level that refuses the
/// capture step (`trellis-init`, NET_ADMIN and NET_RAW): the API server would refuse
/// every injected pod there. `None` without such namespaces, or when they could not be
/// listed (the trust check reports that).
pub(crate) fn pod_security_check(labelled: &Result<Vec<Namespace>, String>) -> Option<Check> {
    let namespaces = labelled.as_ref().ok()?;
    let injected = injected_namespaces(namespaces);
    if injected.is_empty() {
        return None;
    }
    let mut refusing: Vec<String> = (namespaces.iter())
        .filter_map(|ns| {
            let name = ns.metadata.name.as_ref()?;
            let level = ns.metadata.labels.as_ref()?.get(POD_SECURITY_ENFORCE)?;
            (injected.contains(name) && matches!(level.as_str(), "baseline" | "restricted"))
                .then(|| format!("{name} ({level})"))
        })
        .collect();
    refusing.sort();
    Some(if refusing.is_empty() {
        Check::ok(
            WEBHOOK,
            format!(
                "no injected namespace enforces a Pod Security level that refuses the capture step ({} checked)",
                injected.len()
            ),
        )
    } else {
        Check::new(
            WEBHOOK,
            Verdict::Fail,
            format!(
                "Pod Security refuses injected pods (the capture step needs NET_ADMIN and NET_RAW) in: {}",
                refusing.join(", ")
            ),
            "label those namespaces pod-security.kubernetes.io/enforce=privileged, or stop injecting there",
        )
    })
}

/// Every injected namespace holds the trust bundle (the injector mounts it into each
/// proxy; without it a pod's proxy cannot start), equal to the reference one as a set of
/// certificates. The control plane's leader publishes it.
pub(crate) fn published_check(
    reference: &Result<Vec<(CertSummary, Vec<u8>)>, String>,
    published: &Result<Published, String>,
) -> Option<Check> {
    let want: BTreeSet<&[u8]> = match reference {
        Ok(certs) => certs.iter().map(|(_, der)| der.as_slice()).collect(),
        // The reference bundle's own failure is reported by the trust checks.
        Err(_) => return None,
    };
    let published = match published {
        Ok(p) => p,
        Err(e) => {
            return Some(read_failed(TRUST, "namespaces labelled for injection", e));
        }
    };
    if published.is_empty() {
        return None;
    }
    let mut bad = Vec::new();
    for (ns, read) in published {
        let problem = match read {
            Err(e) => Some(format!("{ns} (unreadable: {e})")),
            Ok(None) => Some(format!("{ns} (missing)")),
            Ok(Some(pem)) => match parse_bundle(pem) {
                Ok(certs) => {
                    let got: BTreeSet<&[u8]> =
                        certs.iter().map(|(_, der)| der.as_slice()).collect();
                    (got != want).then(|| format!("{ns} (differs)"))
                }
                Err(_) => Some(format!("{ns} (not PEM)")),
            },
        };
        bad.extend(problem);
    }
    Some(if bad.is_empty() {
        Check::ok(
            TRUST,
            format!(
                "trust bundle published in every injected namespace ({})",
                published.len()
            ),
        )
    } else {
        Check::new(
            TRUST,
            Verdict::Fail,
            format!(
                "trust bundle configmap {TRUST_BUNDLE} not current in {} of {} injected namespaces: {}",
                bad.len(),
                published.len(),
                bad.join(", ")
            ),
            "new pods there cannot start their proxy: the control plane's leader publishes \
             it; check its log (kubectl -n trellis-system logs deployment/trellis-control-plane)",
        )
    })
}

async fn dry_run(
    client: &kube::Client,
    options: &Options,
    labelled: &Result<Vec<Namespace>, String>,
) -> DryRun {
    let namespaces = Api::<Namespace>::all(client.clone());
    let target = match &options.injection_namespace {
        Some(name) => match namespaces.get_opt(name).await {
            Ok(Some(ns)) if injection_enabled(&ns) => name.clone(),
            Ok(Some(_)) => return DryRun::NotLabelled(name.clone()),
            Ok(None) => return DryRun::Missing(name.clone()),
            Err(e) => return DryRun::Unreadable(error_text(&e)),
        },
        None => match labelled {
            Ok(list) => match injected_namespaces(list).into_iter().next() {
                Some(name) => name,
                None => return DryRun::NoNamespace,
            },
            Err(e) => return DryRun::Unreadable(e.clone()),
        },
    };
    let params = PostParams {
        dry_run: true,
        field_manager: Some("trellis-check".to_owned()),
    };
    let result = Api::<Pod>::namespaced(client.clone(), &target)
        .create(&params, &probe_pod())
        .await
        .map(Box::new)
        .map_err(|e| error_text(&e));
    DryRun::Done {
        namespace: target,
        result,
    }
}

fn injection_enabled(ns: &Namespace) -> bool {
    has_labels(&ns.metadata, &[(ANNOTATION_INJECT, "enabled")])
}

/// The dry run's pod: opted in, and as locked down as Pod Security's `restricted` level
/// asks, so that only the injector's own additions can be refused.
fn probe_pod() -> Pod {
    let labels = [
        (ANNOTATION_INJECT, "enabled"),
        ("app.kubernetes.io/name", "trellis-check"),
    ];
    Pod {
        metadata: ObjectMeta {
            generate_name: Some("trellis-check-".to_owned()),
            labels: Some(labels.map(|(k, v)| (k.to_owned(), v.to_owned())).into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            // runAsNonRoot on the container, not the pod: the injected capture step runs
            // as root.
            security_context: Some(PodSecurityContext {
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![Container {
                name: "check".to_owned(),
                image: Some("registry.k8s.io/pause:3.10".to_owned()),
                security_context: Some(SecurityContext {
                    run_as_non_root: Some(true),
                    allow_privilege_escalation: Some(false),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".to_owned()]),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Injection works when the dry-run pod came back with `trellis.dev/injected`.
pub(crate) fn injection_check(dry_run: &DryRun) -> Check {
    let untested = |line: String, hint: &str| Check::new(WEBHOOK, Verdict::Warn, line, hint);
    let label_one = "label a namespace for injection (kubectl label namespace NAME \
                     trellis.dev/inject=enabled) or pass --injection-namespace with one";
    match dry_run {
        DryRun::NoNamespace => untested(
            "injection not tested: no namespace is labelled trellis.dev/inject=enabled".to_owned(),
            label_one,
        ),
        DryRun::Missing(ns) => untested(
            format!("injection not tested: namespace {ns} does not exist"),
            label_one,
        ),
        DryRun::NotLabelled(ns) => untested(
            format!(
                "injection not tested: namespace {ns} is not labelled trellis.dev/inject=enabled \
                 (the injector's namespaceSelector skips it)"
            ),
            label_one,
        ),
        DryRun::Unreadable(e) => untested(
            format!("injection not tested: cannot read namespaces: {e}"),
            "finding a namespace to test in needs list on namespaces",
        ),
        DryRun::Done {
            namespace,
            result: Err(e),
        } => Check::new(
            WEBHOOK,
            Verdict::Fail,
            format!("a dry-run pod in {namespace} was refused: {e}"),
            "new pods in injected namespaces are refused the same way: check the webhook lines \
             above and the control plane's log (kubectl -n trellis-system logs \
             deployment/trellis-control-plane)",
        ),
        DryRun::Done {
            namespace,
            result: Ok(pod),
        } => {
            let annotation =
                (pod.metadata.annotations.as_ref()).and_then(|a| a.get(ANNOTATION_INJECTED));
            match annotation {
                Some(version) => {
                    let mode = (pod.metadata.labels.as_ref())
                        .and_then(|l| l.get(LABEL_PROXY))
                        .map(|m| format!(", {m} sidecar"))
                        .unwrap_or_default();
                    Check::ok(
                        WEBHOOK,
                        format!(
                            "a dry-run pod in {namespace} is injected \
                             ({ANNOTATION_INJECTED}={version}{mode})"
                        ),
                    )
                }
                None => Check::new(
                    WEBHOOK,
                    Verdict::Fail,
                    format!(
                        "a dry-run pod in {namespace} came back without the proxy (no \
                         {ANNOTATION_INJECTED} annotation)"
                    ),
                    format!(
                        "the API server did not send the pod to the injector, or it skipped \
                         it: check the namespaceSelector and objectSelector of \
                         MutatingWebhookConfiguration {INJECTOR} and the control plane's log"
                    ),
                ),
            }
        }
    }
}

/// The trust bundle's certificates from its ConfigMap, or why there are none.
pub(crate) fn trust_bundle(
    config_map: Option<&ConfigMap>,
) -> Result<Vec<(CertSummary, Vec<u8>)>, String> {
    let config_map = config_map.ok_or("not found")?;
    let pem = (config_map.data.as_ref())
        .and_then(|d| d.get(TRUST_BUNDLE_KEY))
        .ok_or_else(|| format!("has no key {TRUST_BUNDLE_KEY}"))?;
    parse_bundle(pem).map_err(|e| format!("{TRUST_BUNDLE_KEY} is not PEM certificates: {e}"))
}

/// The trust bundle: readable, and every root a CA and not about to expire.
pub(crate) fn trust_checks(
    namespace: &str,
    bundle: &Result<Vec<(CertSummary, Vec<u8>)>, String>,
    now: u64,
    warn_within: Duration,
) -> Vec<Check> {
    let certs = match bundle {
        Ok(certs) => certs,
        Err(e) => {
            return vec![Check::new(
                TRUST,
                Verdict::Fail,
                format!("trust bundle configmap {namespace}/{TRUST_BUNDLE}: {e}"),
                "the control plane publishes it once its CA is loaded: check its log \
                 (kubectl -n trellis-system logs deployment/trellis-control-plane)",
            )];
        }
    };
    certs
        .iter()
        .map(|(cert, _)| {
            if !cert.is_ca {
                return Check::new(
                    TRUST,
                    Verdict::Fail,
                    format!("trust root {} is not a CA certificate", cert.subject),
                    "the bundle must hold CA roots only: check the ca source in trellis-config",
                );
            }
            let (verdict, left) = expiry(unix(cert.not_after), now, warn_within);
            Check::new(
                TRUST,
                verdict,
                format!("trust root {}: {left}", cert.subject),
                ROTATE,
            )
        })
        .collect()
}

const ROTATE: &str = "rotate the CA before it expires: add a new root to the CA source in \
                      trellis-config (both are trusted while proxies move), then retire the old";

/// One control plane replica's metrics, as `trellis check` reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ReplicaMetrics {
    /// `trellis_build_info{version}`.
    pub(crate) version: Option<String>,
    /// `trellis_discovery_connected_proxies`.
    pub(crate) connected: u64,
    /// `trellis_discovery_proxies_behind`.
    pub(crate) behind: u64,
    /// `trellis_discovery_proxies_by_version{proxy_version}`, zeros left out.
    pub(crate) by_version: BTreeMap<String, u64>,
    /// The issuing CA's `notAfter`, unix seconds.
    pub(crate) signing_not_after: Option<u64>,
    /// The webhook serving certificate's `notAfter`, unix seconds.
    pub(crate) webhook_not_after: Option<u64>,
}

/// The families [`ReplicaMetrics`] holds, from a Prometheus text exposition.
pub(crate) fn replica_metrics(text: &str) -> Result<ReplicaMetrics, String> {
    let families = [
        BUILD_INFO,
        CONNECTED,
        BEHIND,
        BY_VERSION,
        SIGNING_EXPIRY,
        WEBHOOK_CERT_EXPIRY,
    ];
    let samples =
        stat::parse_where(text, |name| families.contains(&name)).map_err(|e| format!("{e:#}"))?;
    // Gauges are whole numbers here; `as` saturates (negative and NaN become 0).
    let whole = |v: f64| v.round() as u64;
    let mut metrics = ReplicaMetrics::default();
    for s in &samples {
        match s.name() {
            BUILD_INFO if s.value() > 0.0 => metrics.version = Some(s.label("version").to_owned()),
            CONNECTED => metrics.connected += whole(s.value()),
            BEHIND => metrics.behind += whole(s.value()),
            BY_VERSION if whole(s.value()) > 0 => {
                *metrics
                    .by_version
                    .entry(s.label("proxy_version").to_owned())
                    .or_default() += whole(s.value());
            }
            SIGNING_EXPIRY => metrics.signing_not_after = Some(whole(s.value())),
            WEBHOOK_CERT_EXPIRY => metrics.webhook_not_after = Some(whole(s.value())),
            _ => {}
        }
    }
    Ok(metrics)
}

/// Each running control plane pod's metrics through the API server's pod proxy.
async fn scrape(
    client: &kube::Client,
    namespace: &str,
    pods: &[Pod],
) -> Vec<(String, Result<ReplicaMetrics, String>)> {
    let mut out = Vec::new();
    let running = pods
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
    for pod in running {
        let Some(name) = pod.metadata.name.clone() else {
            continue;
        };
        let path =
            format!("/api/v1/namespaces/{namespace}/pods/{name}:{METRICS_PORT}/proxy/metrics");
        let metrics = match http::Request::get(path).body(Vec::new()) {
            Ok(request) => match client.request_text(request).await {
                Ok(text) => replica_metrics(&text),
                Err(e) => Err(error_text(&e)),
            },
            Err(e) => Err(e.to_string()),
        };
        out.push((name, metrics));
    }
    out
}

/// The issuing CA's expiry: the soonest any replica reports.
pub(crate) fn signing_check(
    replicas: &[&ReplicaMetrics],
    now: u64,
    warn_within: Duration,
) -> Check {
    match replicas.iter().filter_map(|m| m.signing_not_after).min() {
        None => Check::new(
            TRUST,
            Verdict::Warn,
            format!("the control plane reports no CA signing expiry ({SIGNING_EXPIRY})"),
            "an older control plane? Upgrade it",
        ),
        Some(not_after) => {
            let (verdict, left) = expiry(not_after, now, warn_within);
            Check::new(
                TRUST,
                verdict,
                format!("CA signing certificate: {left}"),
                ROTATE,
            )
        }
    }
}

/// The webhook serving certificate each replica reports: the API server verifies it with
/// `caBundle` on every admission call, so an expired one stops injection. The control
/// plane renews it at half its lifetime: ✖ expired, ‼ under an hour left (renewal failing).
pub(crate) fn webhook_cert_check(replicas: &[&ReplicaMetrics], now: u64) -> Check {
    match replicas.iter().filter_map(|m| m.webhook_not_after).min() {
        None => Check::new(
            TRUST,
            Verdict::Warn,
            format!("the control plane reports no webhook certificate ({WEBHOOK_CERT_EXPIRY})"),
            "is --webhook-listen set? The chart sets it; an older control plane does not report it",
        ),
        Some(not_after) if not_after <= now => Check::new(
            TRUST,
            Verdict::Fail,
            "webhook serving certificate: EXPIRED: the API server refuses the webhooks",
            "read the control plane's log for the renewal error (kubectl -n trellis-system logs deploy/trellis-control-plane)",
        ),
        Some(not_after) => {
            let left = not_after - now;
            let verdict = if left < WEBHOOK_CERT_MIN_LEFT {
                Verdict::Warn
            } else {
                Verdict::Ok
            };
            Check::new(
                TRUST,
                verdict,
                format!(
                    "webhook serving certificate (from the mesh CA): {}h {}m left",
                    left / 3600,
                    left % 3600 / 60
                ),
                "renewal is late: read the control plane's log (kubectl -n trellis-system logs deploy/trellis-control-plane)",
            )
        }
    }
}

/// Pods labelled `trellis.dev/proxy` (injected) that are running.
pub(crate) fn running_injected(pods: &[Pod]) -> usize {
    pods.iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(LABEL_PROXY))
        })
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count()
}

/// Reading the replicas, connected proxies against running injected pods, proxies behind,
/// and version skew; every count summed over the replicas read.
pub(crate) fn data_plane_checks(
    namespace: &str,
    scrapes: &[(String, Result<ReplicaMetrics, String>)],
    running_injected: usize,
) -> Vec<Check> {
    let mut checks = Vec::new();
    if scrapes.is_empty() {
        return vec![Check::new(
            DATA_PLANE,
            Verdict::Fail,
            "no running control plane pod to read metrics from",
            "see the control-plane checks above",
        )];
    }
    let read: Vec<&ReplicaMetrics> = scrapes
        .iter()
        .filter_map(|(_, m)| m.as_ref().ok())
        .collect();
    let unread = if read.is_empty() {
        Verdict::Fail
    } else {
        Verdict::Warn
    };
    for (pod, result) in scrapes {
        if let Err(e) = result {
            checks.push(Check::new(
                DATA_PLANE,
                unread,
                format!("cannot read the metrics of {pod}: {e}"),
                format!(
                    "the control plane serves them on port {METRICS_PORT}; try kubectl get --raw \
                     /api/v1/namespaces/{namespace}/pods/{pod}:{METRICS_PORT}/proxy/metrics"
                ),
            ));
        }
    }
    if read.is_empty() {
        return checks;
    }

    let connected: u64 = read.iter().map(|m| m.connected).sum();
    let replicas = plural(
        read.len(),
        "control plane replica",
        "control plane replicas",
    );
    let proxies = plural(connected, "proxy", "proxies");
    let running = plural(running_injected, "injected pod", "injected pods");
    let missing = u64::try_from(running_injected)
        .unwrap_or(u64::MAX)
        .saturating_sub(connected);
    checks.push(if missing > 0 {
        let are = if missing == 1 { "is" } else { "are" };
        Check::new(
            DATA_PLANE,
            Verdict::Warn,
            format!(
                "{} {are} not connected: {running} running, {proxies} connected to {replicas}",
                plural(missing, "injected pod", "injected pods")
            ),
            "their proxies are starting or cannot reach the control plane: kubectl get pods -A \
             -l trellis.dev/proxy lists them, kubectl logs POD -c trellis-proxy says why",
        )
    } else {
        Check::ok(
            DATA_PLANE,
            format!("{proxies} connected to {replicas} ({running} running)"),
        )
    });

    let behind: u64 = read.iter().map(|m| m.behind).sum();
    checks.push(if behind > 0 {
        let have = if behind == 1 { "has" } else { "have" };
        Check::new(
            DATA_PLANE,
            Verdict::Warn,
            format!(
                "{} {have} not acked the latest configuration",
                plural(behind, "proxy", "proxies")
            ),
            "they may still be applying it; if it lasts, their logs say why (a refused \
             config is logged and counted in trellis_discovery_nacks_total)",
        )
    } else {
        Check::ok(
            DATA_PLANE,
            "every connected proxy acked the latest configuration",
        )
    });

    let mut control_plane: BTreeMap<&str, usize> = BTreeMap::new();
    for version in read.iter().filter_map(|m| m.version.as_deref()) {
        *control_plane.entry(version).or_default() += 1;
    }
    let mut by_version: BTreeMap<String, u64> = BTreeMap::new();
    for m in &read {
        for (version, n) in &m.by_version {
            *by_version.entry(version.clone()).or_default() += n;
        }
    }
    // Several control plane versions (a rollout): compare with the most common, the
    // newest among equals.
    let ours = (control_plane.iter())
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| a.0.cmp(b.0)))
        .map(|(v, _)| *v);
    checks.push(match ours {
        Some(ours) => skew_check(ours, &by_version),
        None => Check::new(
            DATA_PLANE,
            Verdict::Warn,
            format!("the control plane reports no version ({BUILD_INFO}): version skew unknown"),
            "an older control plane? Upgrade it",
        ),
    });
    checks
}

/// Proxy versions (proxies per version) against the control plane's `ours`: ‼ for any
/// other version, ✖ when one is a different major or more than one minor away.
pub(crate) fn skew_check(ours: &str, by_version: &BTreeMap<String, u64>) -> Check {
    let others: BTreeMap<String, u64> = (by_version.iter())
        .filter(|(v, n)| v.as_str() != ours && **n > 0)
        .map(|(v, n)| (v.clone(), *n))
        .collect();
    if others.is_empty() {
        let line = if by_version.values().any(|n| *n > 0) {
            format!("every proxy runs the control plane's version {ours}")
        } else {
            format!("no proxy to compare with the control plane's version {ours}")
        };
        return Check::ok(DATA_PLANE, line);
    }
    let too_far = |theirs: &str| match (major_minor(ours), major_minor(theirs)) {
        (Some((a, b)), Some((c, d))) => a != c || b.abs_diff(d) > 1,
        _ => false,
    };
    let listed = counted(&others, "proxy", "proxies");
    let restart = "restart the workloads to give them the current proxy (kubectl rollout \
                   restart deployment -n NAMESPACE)";
    if others.keys().any(|v| too_far(v)) {
        Check::new(
            DATA_PLANE,
            Verdict::Fail,
            format!(
                "proxies more than one minor version from the control plane's {ours}: {listed}"
            ),
            format!("{restart}: a skew of more than one minor version is not supported"),
        )
    } else {
        Check::new(
            DATA_PLANE,
            Verdict::Warn,
            format!("proxies on other versions than the control plane's {ours}: {listed}"),
            restart,
        )
    }
}

/// `(major, minor)` of `0.1.0`, `v1.2.3-rc.1`.
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim_start_matches('v').split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// `0.1.0 (2 pods), 0.2.0 (1 pod)`.
fn counted(items: &BTreeMap<String, u64>, one: &str, many: &str) -> String {
    items
        .iter()
        .map(|(k, n)| format!("{k} ({})", plural(*n, one, many)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `1 proxy`, `3 proxies`.
fn plural<N: Display + PartialEq + From<u8>>(n: N, one: &str, many: &str) -> String {
    if n == N::from(1) {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

/// An API error as one line: the server's message and status code.
fn error_text(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if !status.message.is_empty() => {
            format!("{} ({})", status.message, status.code)
        }
        kube::Error::Api(status) => format!("{} ({})", status.reason, status.code),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;
