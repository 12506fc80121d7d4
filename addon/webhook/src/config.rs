//! What the control plane knows and the injector needs: [`InjectConfig`].

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// The cloud instance metadata service: excluded from outbound capture by default (node
/// agents and SDKs fetch tokens there before the proxy is up; mTLS to it is impossible).
pub const DEFAULT_IMDS_CIDR: &str = "169.254.169.254/32";

/// The first Kubernetes version with native sidecars on by default (init containers with
/// `restartPolicy: Always`; beta and enabled in 1.29, GA in 1.33).
pub const NATIVE_SIDECAR_MIN: KubeVersion = KubeVersion {
    major: 1,
    minor: 29,
};

/// A cluster's Kubernetes version, `major.minor` (the patch level does not matter here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubeVersion {
    /// Major version (1).
    pub major: u32,
    /// Minor version (29 for 1.29).
    pub minor: u32,
}

/// Requests and limits of the injected proxy container, as Kubernetes quantities
/// (`"50m"`, `"64Mi"`). `None` leaves that entry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyResources {
    /// `resources.requests.cpu`.
    pub cpu_request: Option<String>,
    /// `resources.requests.memory`.
    pub memory_request: Option<String>,
    /// `resources.limits.cpu` (default none: a CPU limit throttles the data path).
    pub cpu_limit: Option<String>,
    /// `resources.limits.memory`.
    pub memory_limit: Option<String>,
}

/// Everything the injector needs that is not in the pod: set by the control plane from
/// its flags and the `trellis-config` ConfigMap, or by `trellis inject` from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The proxy image, a full reference: `registry/repository:tag` or
    /// `registry/repository@sha256:...`. The same image runs the capture step
    /// (`trellis-proxy init`) and the proxy (`trellis-proxy run`).
    pub proxy_image: String,
    /// `imagePullPolicy` of both injected containers (default `IfNotPresent`).
    pub image_pull_policy: String,
    /// The control plane's gRPC address (`TRELLIS_PROXY_CONTROL_PLANE`). The proxy takes
    /// a socket address, not a DNS name: on a cluster, the ClusterIP of the control
    /// plane's Service and port 15010.
    pub control_plane: SocketAddr,
    /// The SPIFFE ID the control plane must present (`TRELLIS_PROXY_CONTROL_PLANE_IDENTITY`),
    /// `spiffe://<trust domain>/ns/trellis-system/sa/trellis-control-plane`.
    pub control_plane_identity: String,
    /// The mesh's trust domain (`TRELLIS_PROXY_TRUST_DOMAIN`), default `cluster.local`.
    pub trust_domain: String,
    /// The cluster's Kubernetes version: native sidecar from [`NATIVE_SIDECAR_MIN`] on,
    /// classic sidecar before.
    pub kubernetes_version: KubeVersion,
    /// The proxy container's resources (the ConfigMap's proxy settings).
    pub proxy_resources: ProxyResources,
    /// The proxy's log filter (`TRELLIS_LOG`): the ConfigMap's proxy settings as the
    /// control plane renders them (`ProxySettings::log_filter`, e.g. `info,access=info`),
    /// or a plain level (`info`). The access log format is switched live by discovery.
    pub log_level: String,
    /// Port of the proxy's metrics-only listener (`TRELLIS_PROXY_METRICS=0.0.0.0:<port>`),
    /// named `trellis-metrics` on the container and announced by the `prometheus.io/*`
    /// annotations; excluded from inbound capture so the scraper reaches it. 15090.
    pub metrics_port: u16,
    /// Outbound CIDRs that bypass the proxy in every pod (`TRELLIS_INIT_EXCLUDE_OUTBOUND_CIDRS`):
    /// IMDS ([`DEFAULT_IMDS_CIDR`]) and, when known, the API server's address. A pod's
    /// `trellis.dev/exclude-outbound-cidrs` adds to these.
    pub exclude_outbound_cidrs: Vec<String>,
    /// The ConfigMap, in each pod's namespace, holding the mesh's trust bundle (PEM): what
    /// the proxy trusts the control plane with before it has a certificate
    /// (`TRELLIS_PROXY_CA_ROOTS`).
    pub trust_bundle_config_map: String,
    /// The key of the PEM bundle in that ConfigMap.
    pub trust_bundle_key: String,
    /// Audience of the projected ServiceAccount token the proxy proves itself with
    /// (`trellis`, what the CA's OIDC verifier expects).
    pub token_audience: String,
    /// Lifetime asked for that token, in seconds (3600; the kubelet refreshes it at 80%).
    pub token_expiration_seconds: i64,
    /// The UID and GID the proxy runs as; capture never redirects its traffic. 1337.
    pub proxy_uid: i64,
}

// === impl KubeVersion ===

impl KubeVersion {
    /// Whether this version runs native sidecars.
    pub fn has_native_sidecars(self) -> bool {
        self >= NATIVE_SIDECAR_MIN
    }
}

impl FromStr for KubeVersion {
    type Err = String;

    /// `1.29`, `v1.29.3`, `1.29+` (the `+` some providers put on the minor) or the
    /// API server's `gitVersion` (`v1.30.4-eks-...`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a Kubernetes version (major.minor, e.g. 1.29)");
        let t = s.trim().trim_start_matches('v');
        let mut parts = t.split('.');
        let major = parts.next().ok_or_else(bad)?;
        let minor = parts.next().ok_or_else(bad)?;
        let digits = |p: &str| -> Option<u32> {
            let end = p.find(|c: char| !c.is_ascii_digit()).unwrap_or(p.len());
            p[..end].parse().ok()
        };
        if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match (digits(major), digits(minor)) {
            (Some(major), Some(minor)) => Ok(Self { major, minor }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for KubeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

// === impl ProxyResources ===

impl Default for ProxyResources {
    /// 50m CPU and 64Mi requested, 256Mi memory limit, no CPU limit.
    fn default() -> Self {
        Self {
            cpu_request: Some("50m".to_owned()),
            memory_request: Some("64Mi".to_owned()),
            cpu_limit: None,
            memory_limit: Some("256Mi".to_owned()),
        }
    }
}

// === impl InjectConfig ===

impl InjectConfig {
    /// The defaults for `image`, with the control plane at `control_plane`: trust domain
    /// `cluster.local`, Kubernetes 1.29 (native sidecars), log level `info`, metrics on
    /// 15090, IMDS excluded, trust bundle from ConfigMap `trellis-trust-bundle` key
    /// `trust-bundle.pem`, token audience `trellis` for 3600 s, proxy UID 1337.
    pub fn new(proxy_image: impl Into<String>, control_plane: SocketAddr) -> Self {
        let trust_domain = "cluster.local".to_owned();
        Self {
            proxy_image: proxy_image.into(),
            image_pull_policy: "IfNotPresent".to_owned(),
            control_plane,
            control_plane_identity: format!(
                "spiffe://{trust_domain}/ns/trellis-system/sa/trellis-control-plane"
            ),
            trust_domain,
            kubernetes_version: NATIVE_SIDECAR_MIN,
            proxy_resources: ProxyResources::default(),
            log_level: "info".to_owned(),
            metrics_port: 15090,
            exclude_outbound_cidrs: vec![DEFAULT_IMDS_CIDR.to_owned()],
            trust_bundle_config_map: "trellis-trust-bundle".to_owned(),
            trust_bundle_key: "trust-bundle.pem".to_owned(),
            token_audience: "trellis".to_owned(),
            token_expiration_seconds: 3600,
            proxy_uid: 1337,
        }
    }

    /// Checks the fields a bad flag could break; the error names the field. [`inject`]
    /// runs it on every call; callers with flags run it once at startup.
    ///
    /// [`inject`]: crate::inject
    pub fn check(&self) -> Result<(), String> {
        if self.proxy_image.trim().is_empty() || self.proxy_image.contains(char::is_whitespace) {
            return Err(format!(
                "proxy image {:?} is not an image reference",
                self.proxy_image
            ));
        }
        if self.metrics_port == 0 || [15001, 15006, 15020].contains(&self.metrics_port) {
            return Err(format!(
                "metrics port {} must be a free port other than 15001, 15006 and 15020",
                self.metrics_port
            ));
        }
        if self.token_expiration_seconds < 600 {
            return Err(format!(
                "token expiration {}s is below the Kubernetes minimum of 600s",
                self.token_expiration_seconds
            ));
        }
        for c in &self.exclude_outbound_cidrs {
            crate::net::check_cidr(c).map_err(|e| format!("excluded outbound CIDR: {e}"))?;
        }
        if self.trust_bundle_config_map.is_empty() || self.trust_bundle_key.is_empty() {
            return Err("the trust bundle ConfigMap and key must be set".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_in_the_shapes_clusters_report() {
        for (s, minor) in [
            ("1.29", 29),
            ("v1.28.5", 28),
            ("1.30+", 30),
            ("v1.31.2-aks-1", 31),
        ] {
            assert_eq!(
                s.parse::<KubeVersion>(),
                Ok(KubeVersion { major: 1, minor }),
                "{s}"
            );
        }
        for s in ["", "1", "one.two", "1.x", "+1.29"] {
            assert!(s.parse::<KubeVersion>().is_err(), "{s}");
        }
        assert!(
            "1.29"
                .parse::<KubeVersion>()
                .is_ok_and(KubeVersion::has_native_sidecars)
        );
        assert!(
            !"1.28.9"
                .parse::<KubeVersion>()
                .is_ok_and(KubeVersion::has_native_sidecars)
        );
        assert!(
            "2.0"
                .parse::<KubeVersion>()
                .is_ok_and(KubeVersion::has_native_sidecars)
        );
    }

    #[test]
    fn the_config_is_checked_naming_the_field() {
        let ok = InjectConfig::new("r.io/trellis/proxy:1", "10.0.0.10:15010".parse().unwrap());
        assert_eq!(ok.check(), Ok(()));
        let e = InjectConfig {
            proxy_image: " ".into(),
            ..ok.clone()
        }
        .check()
        .unwrap_err();
        assert!(e.contains("proxy image"), "{e}");
        let e = InjectConfig {
            metrics_port: 15020,
            ..ok.clone()
        }
        .check()
        .unwrap_err();
        assert!(e.contains("metrics port"), "{e}");
        let bad = InjectConfig {
            exclude_outbound_cidrs: vec!["10.1.2.3/8".into()],
            ..ok
        };
        let e = bad.check().unwrap_err();
        assert!(
            e.contains("excluded outbound CIDR") && e.contains("host bits"),
            "{e}"
        );
    }
}
