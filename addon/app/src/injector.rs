//! The sidecar injector as the control plane serves it (`POST /inject` on the webhook
//! listener, with `--kubernetes`): the AdmissionReview goes to `trellis_webhook`'s pure
//! decision, with the two things the review does not carry filled in here.
//!
//! - **The namespace's labels** (the opt-in label): from the Kubernetes source's Namespace
//!   cache ([`trellis_kube::KubeHandle::namespace_labels`]). A namespace created a moment
//!   ago may not be in the cache yet; then it is read once from the API server (`GET`,
//!   3 s at most). If that fails too, the pod is refused (503, naming the namespace):
//!   the webhook fails closed, like its `failurePolicy: Fail`, so no pod of an opted-in
//!   namespace starts without its proxy. The lookup is async and the review function
//!   takes a plain closure, so the namespace is read from the body first
//!   ([`trellis_webhook::pod_namespace`]) and looked up before the review runs.
//! - **The [`InjectConfig`]**: built from the control plane's own settings
//!   ([`InjectorSettings`]: images, pull policy, the control plane's address as proxies
//!   dial it), its trust domain, the cluster's Kubernetes version (read at startup and
//!   every 10 minutes, [`follow_version`]: native or classic sidecar) and the mesh config's `proxy` key, followed live so a
//!   `logLevel` change applies to the next pod created.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::Namespace;
use tokio::sync::watch;
use trellis_kube::KubeHandle;
use trellis_webhook::{InjectConfig, KubeVersion, NamespaceLabels, Reviewed};

use crate::app::{CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT};
use crate::cli::RunArgs;
use crate::mesh_config::ProxySettings;

/// How long the direct read of a Namespace may take: the API server gives the whole
/// webhook call 10 s (`timeoutSeconds` in the chart), and the answer must come before.
const NAMESPACE_GET_TIMEOUT: Duration = Duration::from_secs(3);

/// The injector's settings from flags and environment (the chart sets the environment):
/// what does not come from the cluster or the mesh config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InjectorSettings {
    /// `--proxy-image` / `TRELLIS_PROXY_IMAGE`.
    pub(crate) proxy_image: String,
    /// `--proxy-init-image` / `TRELLIS_PROXY_INIT_IMAGE`; `None`: the proxy image.
    pub(crate) init_image: Option<String>,
    /// `--proxy-image-pull-policy` / `TRELLIS_PROXY_IMAGE_PULL_POLICY`.
    pub(crate) pull_policy: String,
    /// `--injector-control-plane` / `TRELLIS_INJECT_CONTROL_PLANE`, `host:port`.
    pub(crate) control_plane: String,
}

/// Serves `/inject`: the namespace lookup and the config in force.
#[derive(Clone)]
pub(crate) struct Injector {
    config: watch::Receiver<Arc<InjectConfig>>,
    namespaces: NamespaceLookup,
}

/// Namespace labels: the watch cache first, then one direct read.
#[derive(Clone)]
pub(crate) struct NamespaceLookup {
    cache: KubeHandle,
    client: kube::Client,
}

// === impl InjectorSettings ===

impl InjectorSettings {
    /// The settings when the injector will be served (`--kubernetes` with
    /// `--webhook-listen`, `webhook`), checked; `None` when it will not be. Errors name
    /// the flag (exit 64): the injector cannot work without a proxy image.
    pub(crate) fn for_run(args: &RunArgs, webhook: bool) -> Result<Option<Self>, String> {
        if !(args.kubernetes && webhook) {
            return Ok(None);
        }
        let settings = Self::from_args(args).ok_or(
            "--webhook-listen with --kubernetes serves the sidecar injector (POST /inject), \
             which needs --proxy-image (TRELLIS_PROXY_IMAGE)",
        )?;
        settings.check()?;
        Ok(Some(settings))
    }

    /// From the flags; `None` without `--proxy-image` (then `/inject` cannot be served).
    /// Empty values count as unset: the chart may render an empty variable.
    pub(crate) fn from_args(args: &RunArgs) -> Option<Self> {
        fn set(v: Option<&String>) -> Option<String> {
            v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
        }
        Some(Self {
            proxy_image: set(args.proxy_image.as_ref())?,
            init_image: set(args.proxy_init_image.as_ref()),
            pull_policy: args.proxy_image_pull_policy.trim().to_owned(),
            control_plane: args.injector_control_plane.trim().to_owned(),
        })
    }

    /// The injector's config for these settings, the trust domain, the cluster's
    /// version and the mesh config's `proxy` key.
    pub(crate) fn config(
        &self,
        trust_domain: &str,
        kubernetes_version: KubeVersion,
        proxy: &ProxySettings,
    ) -> InjectConfig {
        let mut c = InjectConfig::new(self.proxy_image.clone(), self.control_plane.clone());
        c.init_image.clone_from(&self.init_image);
        c.image_pull_policy.clone_from(&self.pull_policy);
        c.trust_domain = trust_domain.to_owned();
        let (ns, sa) = (CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_SERVICE_ACCOUNT);
        c.control_plane_identity = format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}");
        c.kubernetes_version = kubernetes_version;
        c.log_level = proxy.log_filter();
        if let Some(r) = &proxy.resources {
            c.proxy_resources = trellis_webhook::ProxyResources {
                cpu_request: r.requests.cpu.clone(),
                memory_request: r.requests.memory.clone(),
                cpu_limit: r.limits.cpu.clone(),
                memory_limit: r.limits.memory.clone(),
            };
        }
        c
    }

    /// Checks the settings as the injector will use them (exit 64 at startup, naming
    /// the flag), with any version and the default proxy settings.
    pub(crate) fn check(&self) -> Result<(), String> {
        let config = self.config(
            trellis_identity::DEFAULT_TRUST_DOMAIN,
            trellis_webhook::NATIVE_SIDECAR_MIN,
            &ProxySettings::default(),
        );
        config.check().map_err(|e| {
            let flag = if e.starts_with("control plane") {
                "--injector-control-plane (TRELLIS_INJECT_CONTROL_PLANE)"
            } else if e.starts_with("init image") {
                "--proxy-init-image (TRELLIS_PROXY_INIT_IMAGE)"
            } else if e.starts_with("image pull policy") {
                "--proxy-image-pull-policy (TRELLIS_PROXY_IMAGE_PULL_POLICY)"
            } else {
                "--proxy-image (TRELLIS_PROXY_IMAGE)"
            };
            format!("{flag}: {e}")
        })
    }
}

/// How often [`follow_version`] asks the API server its version again.
pub(crate) const VERSION_REFRESH: Duration = Duration::from_secs(600);

/// The cluster's version, starting at `first` and read again every `every`, so an
/// upgraded cluster (to 1.29+, native sidecars) is seen without restarting the control
/// plane; a failed read keeps the last version. The task ends with the receiver.
pub(crate) fn follow_version(
    client: kube::Client,
    first: KubeVersion,
    every: Duration,
) -> watch::Receiver<KubeVersion> {
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(every) => {}
            }
            match cluster_version(&client).await {
                Ok(v) => {
                    tx.send_if_modified(|old| {
                        let changed = *old != v;
                        if changed {
                            tracing::info!(from = %old, to = %v, native_sidecars = v.has_native_sidecars(), "the cluster's Kubernetes version changed");
                            *old = v;
                        }
                        changed
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "re-reading the Kubernetes version failed; keeping the last one")
                }
            }
        }
    });
    rx
}

/// The cluster's Kubernetes version from `GET /version`: native sidecars from 1.29.
pub(crate) async fn cluster_version(client: &kube::Client) -> anyhow::Result<KubeVersion> {
    let info = client
        .apiserver_version()
        .await
        .context("reading the Kubernetes version (GET /version) for the sidecar injector")?;
    info.git_version
        .parse::<KubeVersion>()
        .or_else(|_| format!("{}.{}", info.major, info.minor).parse())
        .map_err(|e| anyhow::anyhow!("the API server's version: {e}"))
}

// === impl Injector ===

impl Injector {
    /// The injector with `settings`, rebuilding its config whenever the mesh config's
    /// `proxy` key changes (`proxy`, from `config_watch::Applier`) or the cluster's
    /// version does (`kubernetes_version`, from [`follow_version`]).
    pub(crate) fn new(
        settings: InjectorSettings,
        trust_domain: String,
        mut kubernetes_version: watch::Receiver<KubeVersion>,
        mut proxy: watch::Receiver<ProxySettings>,
        namespaces: NamespaceLookup,
    ) -> Self {
        let build =
            move |v: KubeVersion, p: &ProxySettings| Arc::new(settings.config(&trust_domain, v, p));
        let first = build(
            *kubernetes_version.borrow_and_update(),
            &proxy.borrow_and_update(),
        );
        let (tx, rx) = watch::channel(first);
        tokio::spawn(async move {
            // A closed channel just stops changing; both closed: nothing changes any more.
            let (mut version_open, mut proxy_open) = (true, true);
            while version_open || proxy_open {
                tokio::select! {
                    r = kubernetes_version.changed(), if version_open => version_open = r.is_ok(),
                    r = proxy.changed(), if proxy_open => proxy_open = r.is_ok(),
                }
                let next = build(
                    *kubernetes_version.borrow_and_update(),
                    &proxy.borrow_and_update(),
                );
                if tx.send(next).is_err() {
                    return;
                }
            }
        });
        Self {
            config: rx,
            namespaces,
        }
    }

    /// The config the next review uses.
    pub(crate) fn config(&self) -> Arc<InjectConfig> {
        self.config.borrow().clone()
    }

    /// Reviews one AdmissionReview body: the namespace looked up first (cache, then the
    /// API server), then `trellis_webhook::review_with`.
    pub(crate) async fn review(&self, body: &[u8]) -> Reviewed {
        let looked_up = match trellis_webhook::pod_namespace(body) {
            Some(ns) => {
                let labels = self.namespaces.labels(&ns).await;
                Some((ns, labels))
            }
            None => None,
        };
        let lookup = |ns: &str| -> NamespaceLabels {
            match &looked_up {
                Some((name, labels)) if name == ns => labels.clone(),
                // pod_namespace and the review read the same fields; a mismatch would be
                // a bug, and must refuse rather than inject blindly.
                _ => Err("the namespace was not looked up".to_owned()),
            }
        };
        let config = self.config();
        trellis_webhook::review_with(body, &lookup, &config)
    }
}

// === impl NamespaceLookup ===

impl NamespaceLookup {
    /// Looks namespaces up in `cache` (the Kubernetes source's), else with `client`.
    pub(crate) fn new(cache: KubeHandle, client: kube::Client) -> Self {
        Self { cache, client }
    }

    /// The labels of namespace `name`, or why they are unknown.
    pub(crate) async fn labels(&self, name: &str) -> NamespaceLabels {
        if name.is_empty() {
            return Err("the request names no namespace".to_owned());
        }
        if let Some(labels) = self.cache.namespace_labels(name) {
            return Ok(labels);
        }
        // Not watched yet (created a moment ago): ask the API server once.
        let api = kube::Api::<Namespace>::all(self.client.clone());
        match tokio::time::timeout(NAMESPACE_GET_TIMEOUT, api.get_opt(name)).await {
            Ok(Ok(Some(ns))) => Ok(ns.metadata.labels.unwrap_or_default()),
            Ok(Ok(None)) => Err("no such namespace".to_owned()),
            Ok(Err(e)) => Err(format!("reading it from the API server failed: {e}")),
            Err(_) => Err(format!(
                "the API server did not answer within {}s",
                NAMESPACE_GET_TIMEOUT.as_secs()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::mesh_config::LogLevel;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        run: RunArgs,
    }

    fn flags(extra: &[&str]) -> RunArgs {
        let base = ["trellis-addon", "--kubernetes", "--state-dir", "s"];
        Flags::try_parse_from(base.iter().chain(extra).copied())
            .unwrap()
            .run
    }

    #[test]
    fn settings_come_from_the_flags_with_the_chart_defaults() {
        let args = flags(&["--proxy-image", "r.io/proxy:1"]);
        let s = InjectorSettings::for_run(&args, true).unwrap().unwrap();
        assert_eq!(
            s,
            InjectorSettings {
                proxy_image: "r.io/proxy:1".into(),
                init_image: None,
                pull_policy: "IfNotPresent".into(),
                control_plane: "trellis-control-plane.trellis-system.svc:15010".into(),
            }
        );
        let args = flags(&[
            "--proxy-image",
            "r.io/proxy:1",
            "--proxy-init-image",
            "r.io/init:1",
            "--proxy-image-pull-policy",
            "Always",
            "--injector-control-plane",
            "cp.example:15010",
        ]);
        let s = InjectorSettings::for_run(&args, true).unwrap().unwrap();
        assert_eq!(s.init_image.as_deref(), Some("r.io/init:1"));
        assert_eq!(s.pull_policy, "Always");
        assert_eq!(s.control_plane, "cp.example:15010");
        // Not served: nothing needed.
        assert_eq!(InjectorSettings::for_run(&flags(&[]), false), Ok(None));
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let cases: [(&[&str], &str); 4] = [
            (
                &[],
                "--webhook-listen with --kubernetes serves the sidecar injector (POST /inject), \
                 which needs --proxy-image (TRELLIS_PROXY_IMAGE)",
            ),
            (
                &[
                    "--proxy-image",
                    "r.io/proxy:1",
                    "--injector-control-plane",
                    "cp",
                ],
                "--injector-control-plane (TRELLIS_INJECT_CONTROL_PLANE): control plane \"cp\": \
                 expected host:port (e.g. trellis-control-plane.trellis-system.svc:15010)",
            ),
            (
                &[
                    "--proxy-image",
                    "r.io/proxy:1",
                    "--proxy-image-pull-policy",
                    "Sometimes",
                ],
                "--proxy-image-pull-policy (TRELLIS_PROXY_IMAGE_PULL_POLICY): image pull policy \
                 \"Sometimes\" is not Always, IfNotPresent or Never",
            ),
            (
                &["--proxy-image", "r.io/proxy:1", "--proxy-init-image", "a b"],
                "--proxy-init-image (TRELLIS_PROXY_INIT_IMAGE): init image \"a b\" is not an \
                 image reference",
            ),
        ];
        for (extra, expected) in cases {
            assert_eq!(
                InjectorSettings::for_run(&flags(extra), true),
                Err(expected.to_owned()),
                "{extra:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_cluster_version_decides_native_or_classic() {
        let api = trellis_kube::stand_in::ApiStandIn::default();
        let v = cluster_version(&api.client()).await.unwrap();
        assert_eq!(v.to_string(), "1.33");
        api.set_version("v1.28.3");
        let v = cluster_version(&api.client()).await.unwrap();
        assert!(!v.has_native_sidecars(), "{v}");
    }

    #[tokio::test]
    async fn an_upgraded_cluster_is_seen_without_a_restart() {
        let api = trellis_kube::stand_in::ApiStandIn::default();
        api.set_version("v1.28.9");
        let mut v = follow_version(
            api.client(),
            "1.28".parse().unwrap(),
            Duration::from_millis(20),
        );
        assert!(!v.borrow_and_update().has_native_sidecars());
        api.set_version("v1.30.2");
        tokio::time::timeout(Duration::from_secs(5), v.changed())
            .await
            .expect("the new version within a few refreshes")
            .unwrap();
        assert_eq!(v.borrow().to_string(), "1.30");
        assert!(v.borrow().has_native_sidecars());
    }

    #[test]
    fn the_config_carries_the_cluster_and_the_mesh_config() {
        let s = InjectorSettings::for_run(&flags(&["--proxy-image", "r.io/proxy:1"]), true)
            .unwrap()
            .unwrap();
        let proxy = ProxySettings {
            log_level: LogLevel::Warn,
            ..ProxySettings::default()
        };
        let c = s.config("mesh.example", "1.28".parse().unwrap(), &proxy);
        assert_eq!(c.trust_domain, "mesh.example");
        assert_eq!(
            c.control_plane_identity,
            "spiffe://mesh.example/ns/trellis-system/sa/trellis-control-plane"
        );
        assert!(!c.kubernetes_version.has_native_sidecars());
        assert_eq!(c.log_level, "warn,access=info");
        assert_eq!(c.init_image, None);
        assert_eq!(c.check(), Ok(()));
        assert_eq!(
            c.proxy_resources,
            trellis_webhook::ProxyResources::default()
        );

        // proxy.resources replaces the defaults entry for entry, absent ones left out.
        let proxy = ProxySettings {
            resources: Some(crate::mesh_config::ProxyResources {
                requests: crate::mesh_config::ResourceList {
                    cpu: Some("200m".into()),
                    memory: None,
                },
                limits: crate::mesh_config::ResourceList {
                    cpu: None,
                    memory: Some("512Mi".into()),
                },
            }),
            ..ProxySettings::default()
        };
        let c = s.config("mesh.example", "1.30".parse().unwrap(), &proxy);
        assert_eq!(
            c.proxy_resources,
            trellis_webhook::ProxyResources {
                cpu_request: Some("200m".into()),
                memory_request: None,
                cpu_limit: None,
                memory_limit: Some("512Mi".into()),
            }
        );
    }
}
