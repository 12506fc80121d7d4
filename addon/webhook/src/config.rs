//! What the control plane knows and the injector needs: [`InjectConfig`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The cloud instance metadata service: excluded from outbound capture by default (node
/// agents and SDKs fetch tokens there before the proxy is up; mTLS to it is impossible).
pub const DEFAULT_IMDS_CIDR: &str = "169.254.169.254/32";

/// Where proxies reach the control plane by default: its Service in `trellis-system`
/// (`charts/trellis/templates/services.yaml`) and the gRPC port.
pub const DEFAULT_CONTROL_PLANE: &str = "trellis-control-plane.trellis-system.svc:15010";

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
    /// `registry/repository@sha256:...`, for the proxy (`trellis-proxy run`), and for the
    /// capture step too unless [`InjectConfig::init_image`] is set.
    pub proxy_image: String,
    /// The image of the capture step (`trellis-init`: `trellis-proxy init`, which needs
    /// `iptables` in the image; the chart's `proxy.initImage`, a Debian-based target).
    /// `None`: the proxy image.
    pub init_image: Option<String>,
    /// `imagePullPolicy` of both injected containers (default `IfNotPresent`).
    pub image_pull_policy: String,
    /// The control plane's gRPC address as `host:port` (`TRELLIS_PROXY_CONTROL_PLANE`):
    /// on a cluster its Service's DNS name, [`DEFAULT_CONTROL_PLANE`]; an IP address
    /// (`10.0.12.7:15010`, `[fd00::7]:15010`) works too.
    pub control_plane: String,
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
    /// The defaults for `image`, with the control plane at `control_plane` (`host:port`,
    /// e.g. [`DEFAULT_CONTROL_PLANE`]): the same image for the capture step, trust domain
    /// `cluster.local`, Kubernetes 1.29 (native sidecars), log level `info`, metrics on
    /// 15090, IMDS excluded, trust bundle from ConfigMap `trellis-trust-bundle` key
    /// `trust-bundle.pem`, token audience `trellis` for 3600 s, proxy UID 1337.
    pub fn new(proxy_image: impl Into<String>, control_plane: impl Into<String>) -> Self {
        let trust_domain = "cluster.local".to_owned();
        Self {
            proxy_image: proxy_image.into(),
            init_image: None,
            image_pull_policy: "IfNotPresent".to_owned(),
            control_plane: control_plane.into(),
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
        let image = |what: &str, image: &str| {
            if image.trim().is_empty() || image.contains(char::is_whitespace) {
                Err(format!("{what} image {image:?} is not an image reference"))
            } else {
                Ok(())
            }
        };
        image("proxy", &self.proxy_image)?;
        if let Some(init) = &self.init_image {
            image("init", init)?;
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.image_pull_policy.as_str()) {
            return Err(format!(
                "image pull policy {:?} is not Always, IfNotPresent or Never",
                self.image_pull_policy
            ));
        }
        check_host_port(&self.control_plane)
            .map_err(|e| format!("control plane {:?}: {e}", self.control_plane))?;
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

/// `host:port`: a DNS name, an IPv4 address or a bracketed IPv6 address, and a port
/// 1-65535; what the proxy's `--control-plane` takes.
fn check_host_port(s: &str) -> Result<(), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or("expected host:port (e.g. trellis-control-plane.trellis-system.svc:15010)")?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
        _ => return Err(format!("{port:?} is not a port (1-65535)")),
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match v6.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => Ok(()),
            _ => Err(format!("{host} is not an IPv6 address")),
        };
    }
    if host.contains(':') {
        return Err(format!("{host} must be in brackets ([{host}]:{port})"));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    // RFC 1123 names: labels of 1-63 letters, digits and hyphens, not starting or ending
    // with a hyphen; 253 characters at most.
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!("{host:?} is not a DNS name or IP address"));
    }
    Ok(())
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
        let ok = InjectConfig::new("r.io/trellis/proxy:1", "10.0.0.10:15010");
        assert_eq!(ok.check(), Ok(()));
        for good in [
            DEFAULT_CONTROL_PLANE,
            "[fd00::7]:15010",
            "localhost:1",
            "cp-0.cp.trellis-system.svc.cluster.local:15010",
        ] {
            let c = InjectConfig {
                control_plane: good.into(),
                ..ok.clone()
            };
            assert_eq!(c.check(), Ok(()), "{good}");
        }
        for bad in [
            "",
            "trellis-control-plane",
            "trellis-control-plane:0",
            "trellis-control-plane:99999",
            "trellis-control-plane:+1",
            ":15010",
            "bad_name.svc:15010",
            "-x.svc:15010",
            "fd00::7:15010",
            "[10.0.0.1]:15010",
            "http://cp:15010",
        ] {
            let c = InjectConfig {
                control_plane: bad.into(),
                ..ok.clone()
            };
            let e = c.check().unwrap_err();
            assert!(e.starts_with("control plane "), "{bad}: {e}");
        }
        let e = InjectConfig {
            init_image: Some("a b".into()),
            ..ok.clone()
        }
        .check()
        .unwrap_err();
        assert!(e.starts_with("init image"), "{e}");
        let e = InjectConfig {
            image_pull_policy: "Sometimes".into(),
            ..ok.clone()
        }
        .check()
        .unwrap_err();
        assert!(e.contains("pull policy"), "{e}");
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
