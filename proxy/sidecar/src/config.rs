//! The proxy's configuration: command-line flags, each with a `TRELLIS_PROXY_*`
//! environment variable (what the injector sets on Kubernetes) and a default.
//!
//! Parsed once into [`Config`]; invalid values are reported naming the flag, the
//! variable and the value, and the binary exits with 64 (EX_CONFIG).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use trellis_identity::SpiffeId;

/// Default control-plane gRPC address (DESIGN.md: 15010).
pub const DEFAULT_CONTROL_PLANE: &str = "127.0.0.1:15010";
/// Identity the control plane must present.
pub const DEFAULT_CONTROL_PLANE_IDENTITY: &str =
    "spiffe://cluster.local/ns/trellis-system/sa/trellis-control-plane";
/// Default outbound listener (the app sends its requests here).
pub const DEFAULT_OUTBOUND: &str = "127.0.0.1:15001";
/// Default inbound (mTLS) listener.
pub const DEFAULT_INBOUND: &str = "0.0.0.0:15006";
/// Default admin listener; always loopback.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:15020";
/// Default address of the local application.
pub const DEFAULT_APP: &str = "127.0.0.1:8080";
/// Shortest `--metrics-push-interval`: shorter would be a typo, and a busy loop.
pub const MIN_METRICS_PUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `--metrics-push-interval`. The telemetry gateway forgets a series after 30
/// minutes without a report (`trellis_telemetry::DEFAULT_SERIES_TTL`); a proxy must report
/// well within that, or its next report would start the series over.
pub const MAX_METRICS_PUSH_INTERVAL: Duration = Duration::from_secs(600);

/// Where the control plane listens: a socket address, or a DNS name and a port. A name is
/// resolved on every connect, not once at start, so a reconnect follows a Service whose
/// address changed (on a cluster the injector passes the Service's DNS name, never an IP
/// that a reinstall could change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlPlaneAddr {
    /// `ip:port` (`[v6]:port` for IPv6).
    Socket(SocketAddr),
    /// `name:port`; the name is a DNS name (letters, digits, `-` and `.`).
    Name {
        /// The DNS name.
        host: String,
        /// The port.
        port: u16,
    },
}

impl ControlPlaneAddr {
    /// Opens a TCP connection: to the address, or to the first of the name's addresses
    /// that accepts (each resolution is fresh).
    pub async fn connect(&self) -> std::io::Result<tokio::net::TcpStream> {
        match self {
            Self::Socket(addr) => tokio::net::TcpStream::connect(addr).await,
            Self::Name { host, port } => {
                tokio::net::TcpStream::connect((host.as_str(), *port)).await
            }
        }
    }
}

impl FromStr for ControlPlaneAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Self::Socket(addr));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| {
            format!("{s:?} is not host:port (e.g. trellis-control-plane.trellis-system.svc:15010)")
        })?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: port {port:?} is not a number from 1 to 65535"))?;
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let name = host.strip_suffix('.').unwrap_or(host);
        if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
            return Err(format!(
                "{s:?}: {host:?} is neither an IP address nor a DNS name"
            ));
        }
        Ok(Self::Name {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for ControlPlaneAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(addr) => addr.fmt(f),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// How traffic reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The app addresses the proxy (local runs, no capture).
    Explicit,
    /// iptables capture; routing by original destination.
    Transparent,
}

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The admin listener would be reachable from other hosts.
    #[error("--admin (TRELLIS_PROXY_ADMIN) must be a loopback address, got {0}")]
    AdminNotLoopback(SocketAddr),
    /// Namespace / service account do not form a valid identity.
    #[error("--namespace/--service-account do not form a valid identity: {0}")]
    Identity(#[from] trellis_identity::SpiffeError),
    /// Two listeners share an address.
    #[error("{0} and {1} listen on the same address {2}")]
    SameAddress(&'static str, &'static str, SocketAddr),
    /// The service name is not a valid label value.
    #[error(
        "--service-name (TRELLIS_PROXY_SERVICE_NAME) {0:?} must be 1 to 63 lower-case letters, digits, '-' or '.'"
    )]
    ServiceName(String),
    /// The metrics push interval is out of range.
    #[error(
        "--metrics-push-interval (TRELLIS_PROXY_METRICS_PUSH_INTERVAL) must be from 100ms to 10m, got {}",
        humantime::format_duration(*.0)
    )]
    MetricsPushInterval(Duration),
}

/// Flags of `trellis-proxy run`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Control-plane gRPC address (identity + discovery).
    /// `ip:port` or `dns-name:port` (e.g. `trellis-control-plane.trellis-system.svc:15010`);
    /// a name is resolved again on every connect.
    #[arg(long, env = "TRELLIS_PROXY_CONTROL_PLANE", default_value = DEFAULT_CONTROL_PLANE)]
    pub control_plane: ControlPlaneAddr,
    /// SPIFFE ID the control plane must present.
    #[arg(long, env = "TRELLIS_PROXY_CONTROL_PLANE_IDENTITY", default_value = DEFAULT_CONTROL_PLANE_IDENTITY)]
    pub control_plane_identity: SpiffeId,
    /// PEM file with the root(s) that sign the control plane's certificate (bootstrap trust).
    #[arg(long, env = "TRELLIS_PROXY_CA_ROOTS")]
    pub ca_roots: PathBuf,
    /// File holding this workload's token (ServiceAccount token, or the local issuer's).
    #[arg(long, env = "TRELLIS_PROXY_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// This workload's namespace.
    #[arg(long, env = "TRELLIS_PROXY_NAMESPACE")]
    pub namespace: String,
    /// This workload's service account.
    #[arg(long, env = "TRELLIS_PROXY_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// This workload's name (pod name), for logs and discovery.
    #[arg(long, env = "TRELLIS_PROXY_WORKLOAD")]
    pub workload: String,
    /// The workload's stable name across its pods and rollouts (the Deployment, or the
    /// `app.kubernetes.io/name` label): `source_workload`/`destination_workload` in
    /// metrics, `service.name` in traces. Default: the service account.
    #[arg(long, env = "TRELLIS_PROXY_SERVICE_NAME")]
    pub service_name: Option<String>,
    /// Trust domain of the mesh.
    #[arg(long, env = "TRELLIS_PROXY_TRUST_DOMAIN", default_value = trellis_identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Where the local app sends outbound requests (explicit mode: an HTTP proxy).
    #[arg(long, env = "TRELLIS_PROXY_OUTBOUND", default_value = DEFAULT_OUTBOUND)]
    pub outbound: SocketAddr,
    /// Where peers connect with mTLS.
    #[arg(long, env = "TRELLIS_PROXY_INBOUND", default_value = DEFAULT_INBOUND)]
    pub inbound: SocketAddr,
    /// Admin endpoints (/ready /live /metrics /config); must be loopback.
    #[arg(long, env = "TRELLIS_PROXY_ADMIN", default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// The local application inbound requests are forwarded to.
    #[arg(long, env = "TRELLIS_PROXY_APP", default_value = DEFAULT_APP)]
    pub app: SocketAddr,
    /// A listener that serves only `GET /metrics`, for a scraper outside the pod (Azure
    /// Monitor managed Prometheus; `0.0.0.0:15090` on a cluster). Off unless set: the
    /// admin port, which also has `/config`, stays on loopback.
    #[arg(long, env = "TRELLIS_PROXY_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// `explicit`: the app sends HTTP to the outbound listener as to an HTTP proxy, and
    /// inbound traffic goes to `--app`. `transparent`: traffic is captured by
    /// `trellis-proxy init` (iptables) and routed by its original destination.
    #[arg(long, env = "TRELLIS_PROXY_MODE", value_enum, default_value_t = Mode::Explicit)]
    pub mode: Mode,
    /// How long to wait for a client's first bytes before treating the connection as a
    /// server-first protocol (forwarded as opaque TCP).
    #[arg(long, env = "TRELLIS_PROXY_DETECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,
    /// Destination ports that skip protocol detection and are forwarded as opaque TCP
    /// (server-first protocols: MySQL, SMTP, ...). Comma-separated.
    #[arg(
        long,
        env = "TRELLIS_PROXY_OPAQUE_PORTS",
        value_delimiter = ',',
        default_value = "25,3306,5432,6379,11211"
    )]
    pub opaque_ports: Vec<u16>,
    /// Worker threads. A sidecar serves one workload: one thread avoids cross-thread
    /// wake-ups and is what the benchmarks use; raise it for busy workloads.
    #[arg(long, env = "TRELLIS_PROXY_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Requested certificate lifetime (the CA may shorten it), e.g. `24h`, `10m`, `90s`.
    #[arg(long, env = "TRELLIS_PROXY_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// How long in-flight requests may finish after SIGTERM/Ctrl-C.
    #[arg(long, env = "TRELLIS_PROXY_DRAIN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// How long an app may take to send a request's headers (slow-header defence).
    #[arg(long, env = "TRELLIS_PROXY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Per-request timeout towards the peer or the app.
    #[arg(long, env = "TRELLIS_PROXY_REQUEST_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Connections each listener (outbound, inbound) holds at most; more are accepted
    /// and closed at once, and counted in `trellis_proxy_connections_refused_total`.
    #[arg(long, env = "TRELLIS_PROXY_MAX_CONNECTIONS", default_value_t = crate::transport::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// How long a connection with no request in flight stays open (outbound HTTP/1 and
    /// HTTP/2, inbound HTTP/2); `0s` turns the idle timer off.
    #[arg(long, env = "TRELLIS_PROXY_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// File holding the bearer token that enables `POST /shutdown` on the admin port
    /// (for Jobs without native sidecars). Without it, /shutdown does not exist (404).
    #[arg(long, env = "TRELLIS_PROXY_SHUTDOWN_TOKEN_FILE")]
    pub shutdown_token_file: Option<PathBuf>,
    /// File holding the bearer token that enables `GET /tap` on the admin port (the live
    /// request stream of `trellis tap` / `trellis top`). Without it, /tap does not exist.
    #[arg(long, env = "TRELLIS_PROXY_TAP_TOKEN_FILE")]
    pub tap_token_file: Option<PathBuf>,
    /// How often the golden request metrics are pushed over OTLP to the trace sink
    /// (trellis-config `tracing.otlp`; nothing is pushed while it is unset), 100ms to 10m.
    #[arg(long, env = "TRELLIS_PROXY_METRICS_PUSH_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub metrics_push_interval: Duration,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Control-plane address.
    pub control_plane: ControlPlaneAddr,
    /// Identity the control plane must present.
    pub control_plane_identity: SpiffeId,
    /// Bootstrap trust roots file.
    pub ca_roots: PathBuf,
    /// Token file.
    pub token_file: PathBuf,
    /// The identity this proxy expects to be issued.
    pub identity: SpiffeId,
    /// Workload name.
    pub workload: String,
    /// Stable workload name for metrics and traces.
    pub service_name: String,
    /// Listeners.
    pub outbound: SocketAddr,
    /// Inbound mTLS listener.
    pub inbound: SocketAddr,
    /// Admin listener (loopback).
    pub admin: SocketAddr,
    /// Metrics-only listener, if any.
    pub metrics: Option<SocketAddr>,
    /// Local application (explicit mode).
    pub app: SocketAddr,
    /// Explicit or transparent.
    pub mode: Mode,
    /// Runtime worker threads; 1 (the default) runs a current-thread runtime.
    pub workers: usize,
    /// Protocol detection timeout.
    pub detect_timeout: Duration,
    /// Ports forwarded as opaque TCP without detection.
    pub opaque_ports: Vec<u16>,
    /// Requested certificate lifetime.
    pub cert_ttl: Duration,
    /// Drain timeout.
    pub drain_timeout: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Time allowed for a request head on the outbound listener.
    pub header_read_timeout: Duration,
    /// Connections per listener.
    pub max_connections: u32,
    /// Idle connection timeout (`ZERO`: off).
    pub idle_timeout: Duration,
    /// Token file enabling `POST /shutdown` on the admin port.
    pub shutdown_token_file: Option<PathBuf>,
    /// Token file enabling `GET /tap` on the admin port.
    pub tap_token_file: Option<PathBuf>,
    /// How often golden metrics are pushed to the OTLP sink.
    pub metrics_push_interval: Duration,
}

// === impl Config ===

impl TryFrom<Args> for Config {
    type Error = Error;

    fn try_from(a: Args) -> Result<Self, Error> {
        if !a.admin.ip().is_loopback() {
            return Err(Error::AdminNotLoopback(a.admin));
        }
        let identity = SpiffeId::new(&a.trust_domain, &a.namespace, &a.service_account)?;
        let service_name = a.service_name.unwrap_or_else(|| a.service_account.clone());
        if !crate::telemetry::valid_name(&service_name) {
            return Err(Error::ServiceName(service_name));
        }
        let mut listeners = vec![
            ("--outbound", a.outbound),
            ("--inbound", a.inbound),
            ("--admin", a.admin),
        ];
        listeners.extend(a.metrics.map(|m| ("--metrics", m)));
        if !(MIN_METRICS_PUSH_INTERVAL..=MAX_METRICS_PUSH_INTERVAL)
            .contains(&a.metrics_push_interval)
        {
            return Err(Error::MetricsPushInterval(a.metrics_push_interval));
        }
        for (i, (na, aa)) in listeners.iter().enumerate() {
            for (nb, ab) in &listeners[i + 1..] {
                if aa == ab && aa.port() != 0 {
                    return Err(Error::SameAddress(na, nb, *aa));
                }
            }
        }
        Ok(Self {
            control_plane: a.control_plane,
            control_plane_identity: a.control_plane_identity,
            ca_roots: a.ca_roots,
            token_file: a.token_file,
            identity,
            workload: a.workload,
            service_name,
            outbound: a.outbound,
            inbound: a.inbound,
            admin: a.admin,
            metrics: a.metrics,
            app: a.app,
            mode: a.mode,
            workers: usize::from(a.workers),
            detect_timeout: a.detect_timeout,
            opaque_ports: a.opaque_ports,
            cert_ttl: a.cert_ttl,
            drain_timeout: a.drain_timeout,
            request_timeout: a.request_timeout,
            header_read_timeout: a.header_read_timeout,
            max_connections: a.max_connections,
            idle_timeout: a.idle_timeout,
            shutdown_token_file: a.shutdown_token_file,
            tap_token_file: a.tap_token_file,
            metrics_push_interval: a.metrics_push_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec![
            "p",
            "--ca-roots",
            "/r.pem",
            "--token-file",
            "/t",
            "--namespace",
            "demo",
            "--service-account",
            "web",
            "--workload",
            "web-1",
        ];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        Config::try_from(cli.args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_follow_the_design_ports() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.outbound.port(), 15001);
        assert_eq!(c.inbound.port(), 15006);
        assert_eq!(c.admin.port(), 15020);
        assert_eq!(c.identity.as_str(), "spiffe://cluster.local/ns/demo/sa/web");
        assert_eq!(c.cert_ttl, Duration::from_secs(86400));
    }

    #[test]
    fn the_metrics_listener_may_face_out_but_not_share_an_address() {
        let c = parse(&["--metrics", "0.0.0.0:15090"]).unwrap();
        assert_eq!(c.metrics, Some("0.0.0.0:15090".parse().unwrap()));
        let e = parse(&["--metrics", "127.0.0.1:15020"]).unwrap_err();
        assert!(e.contains("--admin") && e.contains("--metrics"), "{e}");
    }

    #[test]
    fn admin_must_be_loopback() {
        let e = parse(&["--admin", "0.0.0.0:15020"]).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = parse(&["--inbound", "nope"]).unwrap_err();
        assert!(e.contains("--inbound"), "{e}");
        let e = parse(&["--cert-ttl", "5parsecs"]).unwrap_err();
        assert!(e.contains("--cert-ttl") && e.contains("unit"), "{e}");
        let e = parse(&["--namespace", "Bad_NS"]).unwrap_err();
        assert!(e.contains("namespace"), "{e}");
    }

    #[test]
    fn the_service_name_defaults_to_the_service_account_and_is_checked() {
        assert_eq!(parse(&[]).unwrap().service_name, "web");
        let c = parse(&["--service-name", "web-frontend"]).unwrap();
        assert_eq!(c.service_name, "web-frontend");
        let e = parse(&["--service-name", "Web Frontend"]).unwrap_err();
        assert!(e.contains("--service-name"), "{e}");
    }

    #[test]
    fn the_metrics_push_interval_defaults_to_30s_and_is_bounded() {
        assert_eq!(
            parse(&[]).unwrap().metrics_push_interval,
            Duration::from_secs(30)
        );
        let c = parse(&["--metrics-push-interval", "200ms"]).unwrap();
        assert_eq!(c.metrics_push_interval, Duration::from_millis(200));
        for bad in ["0s", "10ms", "11m"] {
            let e = parse(&["--metrics-push-interval", bad]).unwrap_err();
            assert!(
                e.contains("--metrics-push-interval")
                    && e.contains("TRELLIS_PROXY_METRICS_PUSH_INTERVAL"),
                "{bad}: {e}"
            );
        }
        let e = parse(&["--metrics-push-interval", "soon"]).unwrap_err();
        assert!(e.contains("--metrics-push-interval"), "{e}");
    }

    #[test]
    fn listeners_must_differ() {
        let e = parse(&["--outbound", "127.0.0.1:15020"]).unwrap_err();
        assert!(e.contains("same address"), "{e}");
    }

    #[test]
    fn the_control_plane_is_an_address_or_a_dns_name() {
        let flag = |v: &str| format!("--control-plane={v}");
        let at = |v: &str| parse(&[&flag(v)]).map(|c| c.control_plane);
        assert_eq!(
            at("10.96.0.15:15010").unwrap(),
            ControlPlaneAddr::Socket("10.96.0.15:15010".parse().unwrap())
        );
        assert_eq!(
            at("[fd00::15]:15010").unwrap(),
            ControlPlaneAddr::Socket("[fd00::15]:15010".parse().unwrap())
        );
        let named = at("trellis-control-plane.trellis-system.svc:15010").unwrap();
        assert_eq!(
            named,
            ControlPlaneAddr::Name {
                host: "trellis-control-plane.trellis-system.svc".into(),
                port: 15010
            }
        );
        assert_eq!(
            named.to_string(),
            "trellis-control-plane.trellis-system.svc:15010"
        );
        for (bad, says) in [
            ("trellis-control-plane", "not host:port"),
            ("cp.svc:0", "port \"0\""),
            ("cp.svc:http", "port \"http\""),
            ("cp..svc:15010", "neither an IP address nor a DNS name"),
            ("-cp.svc:15010", "neither an IP address nor a DNS name"),
            ("cp_1.svc:15010", "neither an IP address nor a DNS name"),
            (":15010", "neither an IP address nor a DNS name"),
            ("fd00::15:15010", "neither an IP address nor a DNS name"),
        ] {
            let e = at(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(
                e.contains("--control-plane"),
                "{bad}: the flag is named: {e}"
            );
        }
    }

    #[tokio::test]
    async fn a_named_control_plane_is_resolved_at_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let addr: ControlPlaneAddr = format!("localhost:{port}").parse().unwrap();
        let (connected, accepted) = tokio::join!(addr.connect(), listener.accept());
        assert_eq!(
            connected.unwrap().peer_addr().unwrap(),
            accepted.unwrap().0.local_addr().unwrap()
        );
    }
}
