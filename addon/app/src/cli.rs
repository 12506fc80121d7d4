//! Subcommands and flags of `trellis-addon`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use trellis_ca::{DEFAULT_AUDIENCE, LocalIssuer};
use trellis_controller::crd;

/// EX_CONFIG from sysexits.h.
pub(crate) const EXIT_CONFIG: u8 = 64;

/// The Trellis control plane (local profile: config from a directory of YAML, a
/// self-signed CA persisted in the state directory).
#[derive(Debug, clap::Parser)]
#[command(name = "trellis-addon", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Runs the control plane: file source, discovery and CA on one gRPC port, admin.
    // Boxed: the flags outweigh the other subcommands many times over.
    Run(Box<RunArgs>),
    /// Validates a config directory and exits (64 with every problem listed if bad).
    CheckConfig {
        /// Directory of Service / Workload YAML.
        #[arg(long, env = "TRELLIS_CONFIG_DIR")]
        config_dir: PathBuf,
    },
    /// Mints a workload token from the local issuer (the local stand-in for a projected
    /// ServiceAccount token) and prints it.
    IssueToken {
        /// State directory of the control plane (holds the issuer key).
        #[arg(long, env = "TRELLIS_STATE_DIR")]
        state_dir: PathBuf,
        /// Namespace of the workload.
        #[arg(long)]
        namespace: String,
        /// Service account of the workload.
        #[arg(long)]
        service_account: String,
        /// Token lifetime.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Prints every Trellis CustomResourceDefinition (generated from the Rust types) as
    /// multi-document YAML: what charts/trellis/crds/ holds, for `kubectl apply -f -`.
    PrintCrds,
}

/// Flags of `trellis-addon run`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RunArgs {
    /// Directory of Service / Workload YAML, watched for changes (the local profile).
    #[arg(
        long,
        env = "TRELLIS_CONFIG_DIR",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub(crate) config_dir: Option<PathBuf>,
    /// Take the mesh from the Kubernetes API (Namespaces, Services, EndpointSlices, Pods)
    /// and the mesh config from ConfigMap trellis-system/trellis-config, instead of
    /// --config-dir and --mesh-config. Connects with the pod's service account, or
    /// KUBECONFIG outside a cluster.
    #[arg(long, env = "TRELLIS_KUBERNETES", conflicts_with = "mesh_config")]
    pub(crate) kubernetes: bool,
    /// Where the CA root, issuer key and JWKS live (created 0700 if missing).
    #[arg(long, env = "TRELLIS_STATE_DIR")]
    pub(crate) state_dir: PathBuf,
    /// gRPC listener for discovery and identity (TLS).
    #[arg(long, env = "TRELLIS_GRPC_ADDR", default_value = "127.0.0.1:15010")]
    pub(crate) grpc_addr: SocketAddr,
    /// Admin listener (/live /ready /metrics /debug/*); must be loopback.
    #[arg(long, env = "TRELLIS_ADMIN_ADDR", default_value = "127.0.0.1:9090")]
    pub(crate) admin_addr: SocketAddr,
    /// A listener that serves only `GET /metrics`, for scrapers outside the pod and
    /// `trellis check` (through the API server's pod proxy): on a cluster `0.0.0.0:9090`,
    /// with the admin port moved to `127.0.0.1:9091`. Off unless set: the admin port,
    /// which also has `/debug/*`, stays on loopback.
    #[arg(long, env = "TRELLIS_METRICS_ADDR")]
    pub(crate) metrics_addr: Option<SocketAddr>,
    /// Trust domain of the mesh. Unset: the mesh config's `trustDomain`, else
    /// cluster.local. Set in both places, the two must be equal (else exit 64).
    #[arg(
        long = "trust-domain",
        env = "TRELLIS_TRUST_DOMAIN",
        value_name = "TRUST_DOMAIN"
    )]
    pub(crate) trust_domain_flag: Option<String>,
    /// The trust domain in force: not a flag, filled in at startup from --trust-domain and
    /// the mesh config (`crate::mesh_config::RunningTrustDomain`) before anything reads it.
    #[arg(skip)]
    pub(crate) trust_domain: String,
    /// How often the config directory is checked for changes.
    #[arg(long, env = "TRELLIS_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) poll_interval: Duration,
    /// The `trellis-config` ConfigMap as a YAML file (its `ca` key chooses the CA
    /// source); re-read every --poll-interval, a bad edit keeps the running config.
    #[arg(long, env = "TRELLIS_MESH_CONFIG")]
    pub(crate) mesh_config: Option<PathBuf>,
    /// Longest certificate lifetime the CA issues.
    #[arg(long, env = "TRELLIS_CERT_MAX_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub(crate) cert_max_ttl: Duration,
    /// How the CA verifies caller tokens: `local` (tokens from `trellis-addon
    /// issue-token`, signed by the key in `<state-dir>/issuer`) or `oidc` (projected
    /// ServiceAccount tokens, checked against the keys the cluster's OIDC issuer
    /// publishes; needs --oidc-issuer-url).
    #[arg(
        long,
        env = "TRELLIS_TOKEN_ISSUER",
        value_enum,
        default_value = "local"
    )]
    pub(crate) token_issuer: TokenIssuer,
    /// The cluster's ServiceAccount token issuer, exactly as tokens carry it in `iss`
    /// (https only; on AKS `az aks show --query oidcIssuerProfile.issuerUrl`). Its keys
    /// are found through `<url>/.well-known/openid-configuration`.
    #[arg(long, env = "TRELLIS_OIDC_ISSUER_URL")]
    pub(crate) oidc_issuer_url: Option<String>,
    /// PEM file of CA certificates to trust for the OIDC issuer's HTTPS besides the
    /// system's roots (a private issuer, or the API server's CA on kind).
    #[arg(long, env = "TRELLIS_OIDC_EXTRA_ROOTS")]
    pub(crate) oidc_extra_roots: Option<PathBuf>,
    /// Certificate requests one identity (service account) may make at once. Generous by
    /// default: at a CA change every replica of a Deployment re-issues within ~2 s.
    #[arg(long, env = "TRELLIS_CA_RATE_LIMIT_BURST", default_value_t = trellis_ca::DEFAULT_RATE_LIMIT_BURST)]
    pub(crate) ca_rate_limit_burst: u32,
    /// Certificate requests per second one identity regains once its burst is spent;
    /// requests past the limit get RESOURCE_EXHAUSTED (proxies retry with backoff).
    #[arg(long, env = "TRELLIS_CA_RATE_LIMIT_PER_SECOND", default_value_t = trellis_ca::DEFAULT_RATE_LIMIT_PER_SECOND)]
    pub(crate) ca_rate_limit_per_second: f64,
    /// File holding the Application Insights connection string the telemetry gateway
    /// exports spans to (a Secret's key, mounted; never put it in the ConfigMap). Without
    /// it (and without APPLICATIONINSIGHTS_CONNECTION_STRING) the gateway keeps the last
    /// spans in memory only, for /debug/traces.
    #[arg(long, env = "TRELLIS_APPINSIGHTS_CONNECTION_STRING_FILE")]
    pub(crate) appinsights_connection_string_file: Option<PathBuf>,
    /// How often the telemetry gateway sends the golden metrics the proxies push to
    /// Application Insights (customMetrics), as deltas since the last time.
    #[arg(long, env = "TRELLIS_TELEMETRY_METRICS_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) telemetry_metrics_interval: Duration,
    /// HTTPS listener of the admission webhooks (on a cluster: 0.0.0.0:9443): `POST
    /// /validate` (the trellis-config ConfigMap) and, with --kubernetes, `POST /inject`
    /// (the sidecar injector). Off unless set. Its certificate comes from the mesh CA
    /// (for --webhook-dns-names, renewed by itself), or from --webhook-cert/--webhook-key.
    #[arg(long, env = "TRELLIS_WEBHOOK_LISTEN")]
    pub(crate) webhook_listen: Option<SocketAddr>,
    /// PEM certificate chain (leaf first) the webhook serves instead of one from the mesh
    /// CA, e.g. the `tls.crt` of a cert-manager Secret; re-read every --poll-interval, a
    /// bad file keeps the running one. Needs --webhook-key.
    #[arg(long, env = "TRELLIS_WEBHOOK_CERT")]
    pub(crate) webhook_cert: Option<PathBuf>,
    /// PEM private key of --webhook-cert (PKCS#8, SEC1 or PKCS#1).
    #[arg(long, env = "TRELLIS_WEBHOOK_KEY")]
    pub(crate) webhook_key: Option<PathBuf>,
    /// Names the API server reaches the webhook by (comma-separated): the names of the
    /// certificate the mesh CA issues, or names --webhook-cert must be valid for (checked
    /// at startup and on every reload).
    #[arg(
        long,
        env = "TRELLIS_WEBHOOK_DNS_NAMES",
        value_delimiter = ',',
        default_value = crate::webhook::DEFAULT_DNS_NAME
    )]
    pub(crate) webhook_dns_names: Vec<String>,
    /// Lifetime of the webhook certificate the mesh CA issues (at most --cert-max-ttl);
    /// renewed at half of it, and at once when the CA's generation changes.
    #[arg(long, env = "TRELLIS_WEBHOOK_CERT_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub(crate) webhook_cert_ttl: Duration,
    /// The proxy image the sidecar injector adds to pods (`registry/repository:tag` or
    /// `@sha256:...`). Required for `/inject`, i.e. with --kubernetes and --webhook-listen.
    #[arg(long, env = "TRELLIS_PROXY_IMAGE")]
    pub(crate) proxy_image: Option<String>,
    /// `imagePullPolicy` of the injected containers: Always, IfNotPresent or Never.
    #[arg(
        long,
        env = "TRELLIS_PROXY_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub(crate) proxy_image_pull_policy: String,
    /// The image of the injected `trellis-init` container (`trellis-proxy init`, which
    /// needs iptables). Default: --proxy-image.
    #[arg(long, env = "TRELLIS_PROXY_INIT_IMAGE")]
    pub(crate) proxy_init_image: Option<String>,
    /// Where injected proxies reach the control plane, `host:port` (its Service).
    #[arg(
        long,
        env = "TRELLIS_INJECT_CONTROL_PLANE",
        default_value = trellis_webhook::DEFAULT_CONTROL_PLANE
    )]
    pub(crate) injector_control_plane: String,
}

/// Where caller tokens come from (`--token-issuer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TokenIssuer {
    /// The local profile's issuer in the state directory.
    Local,
    /// The cluster's OIDC issuer (`--oidc-issuer-url`).
    Oidc,
}

// === impl Cli ===

impl Cli {
    /// Runs the chosen subcommand.
    pub(crate) fn run(self) -> ExitCode {
        match self.command {
            Command::Run(args) => crate::app::main(*args),
            Command::CheckConfig { config_dir } => {
                match trellis_controller::load_dir(&config_dir) {
                    Ok(objects) => {
                        println!(
                            "{}: ok ({} services, {} workloads, {} authorization policies, {} HTTP routes)",
                            config_dir.display(),
                            objects.services.len(),
                            objects.workloads.len(),
                            objects.policies.len(),
                            objects.routes.len()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        ExitCode::from(EXIT_CONFIG)
                    }
                }
            }
            Command::IssueToken {
                state_dir,
                namespace,
                service_account,
                ttl,
            } => {
                let issued = LocalIssuer::load_or_generate(&state_dir.join("issuer"))
                    .map_err(|e| e.to_string())
                    .and_then(|i| {
                        i.mint(&namespace, &service_account, DEFAULT_AUDIENCE, ttl)
                            .map_err(|e| e.to_string())
                    });
                match issued {
                    Ok(token) => {
                        println!("{token}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("trellis-addon issue-token: {e}");
                        ExitCode::from(EXIT_CONFIG)
                    }
                }
            }
            Command::PrintCrds => {
                // Written, not `print!`ed: a closed pipe (`| head`) is an error, not a panic.
                let printed =
                    (crd::to_yaml(&crd::crds()).map_err(|e| e.to_string())).and_then(|yaml| {
                        let mut out = std::io::stdout().lock();
                        (out.write_all(yaml.as_bytes()).and_then(|()| out.flush()))
                            .map_err(|e| format!("writing to stdout: {e}"))
                    });
                match printed {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("trellis-addon print-crds: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    }
}
