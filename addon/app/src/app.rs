//! Wiring only: config -> load sources (exit 64 when bad) -> CA and issuer -> bind
//! (naming a busy port) -> the admission webhooks (certificate from the mesh CA or
//! files) -> serve discovery + identity on one TLS gRPC port, admin on loopback -> stop
//! on a signal.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use trellis_ca::{
    CaConfig, CertificateAuthority, DEFAULT_AUDIENCE, IdentityService, JwksVerifier, LocalIssuer,
    OidcConfig, OidcVerifier, RateLimit, TokenVerifier,
};
use trellis_controller::{FileSource, SourceStatus};
use trellis_discovery::DiscoveryService;
use trellis_identity::{ClientAuth, SpiffeId, Svid, TrustBundle};

use crate::admin::{Admin, Endpoints};
use crate::cli::{EXIT_CONFIG, RunArgs, TokenIssuer};
use crate::config_watch::{Applier, watch_config_map, watch_file};
use crate::mesh_config::{MeshConfig, RunningTrustDomain};

/// Namespace and service account of the control plane's own identity.
pub(crate) const CONTROL_PLANE_NAMESPACE: &str = "trellis-system";
/// Service account of the control plane.
pub(crate) const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "trellis-control-plane";

/// Validates the config, then runs until SIGTERM/Ctrl-C.
pub(crate) fn main(mut args: RunArgs) -> ExitCode {
    if !args.admin_addr.ip().is_loopback() {
        eprintln!(
            "trellis-addon: --admin-addr must be a loopback address, got {}",
            args.admin_addr
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let callers = match CallerPolicy::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellis-addon: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut registry = Registry::default();
    crate::admin::register_build_info(&mut registry);
    let webhook = match crate::webhook::Webhook::from_args(&args, &mut registry) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("trellis-addon: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // On a cluster the webhook listener also serves the sidecar injector, which cannot
    // work without knowing which proxy image to add.
    let injector = match crate::injector::InjectorSettings::for_run(&args, webhook.is_some()) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("trellis-addon: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The local profile's inputs are files, checked before anything starts; on a cluster
    // they are read once the runtime (and the API client) exist.
    let files = match args.config_dir.clone() {
        Some(dir) if !args.kubernetes => match prepare_files(&mut args, &dir, &mut registry) {
            Ok(files) => Some(files),
            Err(e) => {
                eprintln!("trellis-addon: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        _ => None,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-addon: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            signal.cancel();
        });
        #[cfg(unix)]
        {
            let signal = shutdown.clone();
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                tokio::spawn(async move {
                    term.recv().await;
                    signal.cancel();
                });
            }
        }
        let (config, mesh) = match files {
            Some((config, mesh)) => (config, mesh),
            None => match prepare_cluster(&mut args, &mut registry, shutdown.clone()).await {
                Ok(prepared) => prepared,
                Err((code, e)) => {
                    eprintln!("trellis-addon: {e:#}");
                    return code;
                }
            },
        };
        let webhook = webhook.map(|w| (w, injector));
        match run(args, config, callers, mesh, webhook, registry, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis-addon: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The webhook listener as configured, and the injector's settings when it serves one.
type WebhookSetup = (
    crate::webhook::Webhook,
    Option<crate::injector::InjectorSettings>,
);

/// Where the mesh comes from.
enum Mesh {
    /// A directory of YAML (the local profile), loaded once already.
    Files {
        source: FileSource,
        initial: trellis_api::MeshSnapshot,
    },
    /// The Kubernetes API, watched and listed once already.
    Cluster(crate::cluster::Cluster),
}

/// The mesh config in force at startup, and the trust domain fixed from it and the flag.
type StartupConfig = (MeshConfig, RunningTrustDomain);

/// Fixes the trust domain for the whole run from `--trust-domain` and the mesh config's
/// `trustDomain`, and checks that it makes valid identities.
fn resolve_trust_domain(
    args: &mut RunArgs,
    config: &MeshConfig,
) -> Result<RunningTrustDomain, String> {
    let trust_domain = RunningTrustDomain::resolve(args.trust_domain_flag.as_deref(), config)?;
    SpiffeId::new(
        trust_domain.as_str(),
        CONTROL_PLANE_NAMESPACE,
        CONTROL_PLANE_SERVICE_ACCOUNT,
    )
    .map_err(|e| format!("invalid --trust-domain: {e}"))?;
    args.trust_domain = trust_domain.as_str().to_owned();
    Ok(trust_domain)
}

/// The local profile: the mesh config file and the config directory, validated.
fn prepare_files(
    args: &mut RunArgs,
    dir: &std::path::Path,
    registry: &mut Registry,
) -> Result<(StartupConfig, Mesh), String> {
    let config = crate::ca::read_config(args.mesh_config.as_deref())
        .map_err(|e| format!("invalid mesh config {e}"))?;
    let trust_domain = resolve_trust_domain(args, &config)?;
    let source = FileSource::new(dir, &args.trust_domain, args.poll_interval)
        .with_metrics(trellis_controller::Metrics::new(registry));
    let initial = source
        .load_initial()
        .map_err(|e| format!("invalid configuration in {}:\n{e}", dir.display()))?;
    Ok(((config, trust_domain), Mesh::Files { source, initial }))
}

/// On a cluster: the ConfigMap as it is now, then the watchers, listed once. A ConfigMap
/// that does not parse stops the start (exit 64): starting on defaults instead could switch
/// the CA under a running mesh; replicas already running keep their last good config.
async fn prepare_cluster(
    args: &mut RunArgs,
    registry: &mut Registry,
    shutdown: CancellationToken,
) -> Result<(StartupConfig, Mesh), (ExitCode, anyhow::Error)> {
    let failure = |e: anyhow::Error| (ExitCode::FAILURE, e);
    let client = crate::cluster::connect().await.map_err(failure)?;
    let config = crate::cluster::startup_config(&client)
        .await
        .map_err(|e| (ExitCode::from(EXIT_CONFIG), e))?;
    let trust_domain = resolve_trust_domain(args, &config)
        .map_err(|e| (ExitCode::from(EXIT_CONFIG), anyhow::anyhow!(e)))?;
    let cluster = crate::cluster::start(client, &args.trust_domain, registry, shutdown)
        .await
        .map_err(failure)?;
    Ok(((config, trust_domain), Mesh::Cluster(cluster)))
}

/// How the CA treats callers: who verifies their tokens, and how often each may ask.
struct CallerPolicy {
    /// `Some` for `--token-issuer oidc`; the local issuer otherwise.
    oidc: Option<OidcVerifier>,
    rate_limit: RateLimit,
}

impl CallerPolicy {
    /// Checks the token and rate-limit flags (exit 64 when bad, naming the flag).
    fn from_args(args: &RunArgs) -> Result<Self, String> {
        let rate_limit = RateLimit::new(args.ca_rate_limit_burst, args.ca_rate_limit_per_second)
            .map_err(|e| format!("--ca-rate-limit-burst / --ca-rate-limit-per-second: {e}"))?;
        let oidc = match (args.token_issuer, &args.oidc_issuer_url) {
            (TokenIssuer::Local, None) => {
                if args.oidc_extra_roots.is_some() {
                    return Err("--oidc-extra-roots needs --token-issuer oidc".to_owned());
                }
                None
            }
            (TokenIssuer::Local, Some(_)) => {
                return Err("--oidc-issuer-url needs --token-issuer oidc".to_owned());
            }
            (TokenIssuer::Oidc, None) => {
                return Err("--token-issuer oidc needs --oidc-issuer-url".to_owned());
            }
            (TokenIssuer::Oidc, Some(url)) => {
                let mut config = OidcConfig::new(url, DEFAULT_AUDIENCE);
                if let Some(path) = &args.oidc_extra_roots {
                    let pem = std::fs::read_to_string(path).map_err(|e| {
                        format!("--oidc-extra-roots: reading {}: {e}", path.display())
                    })?;
                    config = config.with_extra_roots_pem(&pem);
                }
                Some(OidcVerifier::new(config).map_err(|e| format!("--oidc-issuer-url: {e}"))?)
            }
        };
        Ok(Self { oidc, rate_limit })
    }
}

async fn run(
    args: RunArgs,
    (mesh_config, trust_domain): StartupConfig,
    callers: CallerPolicy,
    mut mesh: Mesh,
    webhook: Option<WebhookSetup>,
    mut registry: Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let elector = match &mut mesh {
        Mesh::Cluster(cluster) => cluster.elector.take(),
        Mesh::Files { .. } => None,
    };
    create_private_dir(&args.state_dir)?;
    let ca_source = crate::ca::build_source(&mesh_config.ca, &args.state_dir, &args.trust_domain)
        .map_err(|e| anyhow::anyhow!("CA source: {e}"))?;
    let material = crate::ca::initial_material(ca_source.as_ref(), &args.trust_domain)
        .await
        .map_err(|e| anyhow::anyhow!("loading the CA from {}: {e}", ca_source.label()))?;
    let ca_config = CaConfig::default()
        .with_max_ttl(args.cert_max_ttl)
        .with_default_ttl(args.cert_max_ttl);
    let ca = CertificateAuthority::new(&args.trust_domain, material)
        .and_then(|ca| ca.with_config(ca_config))
        .context("configuring the CA")?;
    let ca = Arc::new(ca);
    let bundle_file = args.state_dir.join(crate::ca::TRUST_BUNDLE_FILE);
    let trust_changes = ca.subscribe();
    ca.write_trust_bundle(&bundle_file)
        .with_context(|| format!("writing {}", bundle_file.display()))?;
    tokio::spawn(crate::ca::write_bundle_file(
        ca.clone(),
        trust_changes,
        bundle_file,
    ));
    let config_metrics = crate::ca::ConfigMetrics::new(&mut registry);
    let (applier, applied) =
        Applier::new(mesh_config.clone(), trust_domain, config_metrics.clone());
    match (&mesh, args.mesh_config.clone()) {
        (Mesh::Cluster(cluster), _) => {
            let data = cluster.handle.config();
            let applier = applier.with_events(cluster.config_events());
            tokio::spawn(watch_config_map(data, applier, shutdown.clone()));
            crate::cluster::publish_trust(cluster, &ca, &mut registry, shutdown.clone());
        }
        (Mesh::Files { .. }, Some(path)) => {
            tokio::spawn(watch_file(
                path,
                args.poll_interval,
                applier,
                shutdown.clone(),
            ));
        }
        (Mesh::Files { .. }, None) => {}
    }
    tokio::spawn(crate::ca::supervise(
        ca.clone(),
        ca_source.clone(),
        applied.ca,
        args.state_dir.clone(),
        (
            trellis_ca::source::SourceMetrics::new(&mut registry),
            config_metrics,
        ),
        shutdown.clone(),
    ));
    let verifier: Arc<dyn TokenVerifier> = match callers.oidc {
        Some(oidc) => {
            let oidc = Arc::new(oidc);
            // Fetched in the background: an issuer that is down must not stop discovery
            // from serving. Until its keys load, Certify answers UNAVAILABLE.
            let first = oidc.clone();
            tokio::spawn(async move {
                if let Err(e) = first.refresh().await {
                    warn!(issuer = %first.issuer(), error = %e, "OIDC issuer not reachable at startup; retrying when tokens arrive");
                }
            });
            oidc
        }
        None => {
            let issuer = LocalIssuer::load_or_generate(&args.state_dir.join("issuer"))
                .context("loading the local token issuer")?;
            Arc::new(
                JwksVerifier::new(&issuer.jwks_json(), issuer.issuer(), DEFAULT_AUDIENCE)
                    .context("loading the issuer JWKS")?,
            )
        }
    };

    // The webhooks come up before the gRPC port, whose readiness the pod's probes read:
    // a replica marked ready already serves /validate and /inject.
    if let Some((webhook, settings)) = webhook {
        let injector = match (&mesh, settings) {
            (Mesh::Cluster(cluster), Some(settings)) => {
                let version = crate::injector::cluster_version(&cluster.client).await?;
                info!(
                    kubernetes_version = %version,
                    native_sidecars = version.has_native_sidecars(),
                    proxy_image = %settings.proxy_image,
                    control_plane = %settings.control_plane,
                    "sidecar injector configured"
                );
                Some(crate::injector::Injector::new(
                    settings,
                    args.trust_domain.clone(),
                    crate::injector::follow_version(
                        cluster.client.clone(),
                        version,
                        crate::injector::VERSION_REFRESH,
                    ),
                    applied.proxy.clone(),
                    crate::injector::NamespaceLookup::new(
                        cluster.handle.clone(),
                        cluster.client.clone(),
                    ),
                ))
            }
            _ => None,
        };
        webhook
            .start(crate::webhook::Serving {
                ca: ca.clone(),
                injector,
                poll: args.poll_interval,
                shutdown: shutdown.clone(),
            })
            .await?;
    }
    let grpc = bind(args.grpc_addr, "--grpc-addr").await?;
    let admin_l = bind(args.admin_addr, "--admin-addr").await?;
    let metrics_l = match args.metrics_addr {
        Some(addr) => Some(bind(addr, "--metrics-addr").await?),
        None => None,
    };

    // The control plane's own serving certificate comes from its own CA, renewed at 70%.
    let me = SpiffeId::new(
        &args.trust_domain,
        CONTROL_PLANE_NAMESPACE,
        CONTROL_PLANE_SERVICE_ACCOUNT,
    )?;
    let (own, not_before, not_after) = own_server_config(&ca, &me)?;
    let (tls_tx, tls_rx) = watch::channel(own);
    tokio::spawn(rotate_own(
        ca.clone(),
        ca.subscribe(),
        me.clone(),
        tls_tx,
        not_before,
        not_after,
    ));

    let (source_rx, status_rx) = match mesh {
        Mesh::Files { source, initial } => {
            let (source_tx, source_rx) = watch::channel(Arc::new(initial));
            let (status_tx, status_rx) = watch::channel(SourceStatus::default());
            let stop = shutdown.clone();
            tokio::spawn(source.run(source_tx, status_tx, async move { stop.cancelled().await }));
            (source_rx, status_rx)
        }
        Mesh::Cluster(cluster) => (cluster.snapshots, cluster.status),
    };
    // The first snapshot already carries the bundle and the policy, so join's first send
    // is not a change at the same version.
    let mut joined = (**source_rx.borrow()).clone();
    joined.trust = ca.trust();
    let proxy_wide = applied.proxies.borrow().clone();
    joined.outbound = proxy_wide.outbound;
    joined.access_log = proxy_wide.access_log;
    joined.tracing = proxy_wide.tracing;
    let (snap_tx, snap_rx) = watch::channel(Arc::new(joined));
    // Discovery pushes the sources' view joined with the CA's trust bundle.
    tokio::spawn(crate::ca::join(
        source_rx,
        ca.subscribe(),
        applied.proxies.clone(),
        snap_tx,
    ));

    let discovery = DiscoveryService::new(
        snap_rx.clone(),
        trellis_discovery::Metrics::new(&mut registry),
    )
    .with_scope_updates(applied.scope);
    let identity = IdentityService::new(
        ca.clone(),
        verifier,
        trellis_ca::Metrics::new(&mut registry),
    )
    .with_rate_limit(callers.rate_limit);
    // The gateway weighs spans by the mesh's sampling rate (Application Insights'
    // sampleRate), which the config may change live.
    let sampling = {
        let mut proxies = applied.proxies.clone();
        let (tx, rx) = watch::channel(proxies.borrow().tracing.sampling_per_million);
        tokio::spawn(async move {
            while proxies.changed().await.is_ok() {
                let rate = proxies.borrow_and_update().tracing.sampling_per_million;
                tx.send_if_modified(|r| std::mem::replace(r, rate) != rate);
            }
        });
        rx
    };
    let (gateway, (golden, golden_worker), recent) =
        telemetry_gateway(&args, &mut registry, sampling)?;
    let admin = Arc::new(Admin {
        snapshots: snap_rx,
        source: status_rx,
        discovery: discovery.clone(),
        registry,
        ca: ca.clone(),
        traces: recent,
    });

    let scope = if mesh_config.discovery.scope.is_all() {
        "every namespace"
    } else {
        "restricted"
    };
    info!(
        grpc = %grpc.local_addr()?,
        admin = %admin_l.local_addr()?,
        identity = %me,
        ca_source = %ca_source.label(),
        token_issuer = ?args.token_issuer,
        source = if args.kubernetes { "kubernetes" } else { "files" },
        trust_domain = %args.trust_domain,
        discovery_scope = scope,
        proxy_log = %mesh_config.proxy.log_filter(),
        "trellis-addon serving"
    );
    if let Some(l) = metrics_l {
        tokio::spawn(
            admin
                .clone()
                .serve(l, Endpoints::MetricsOnly, shutdown.clone()),
        );
    }
    tokio::spawn(admin.serve(admin_l, Endpoints::All, shutdown.clone()));
    let stop = shutdown.clone();
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(identity.into_server())
        .add_service(discovery.into_server())
        .add_service(gateway.into_server())
        .add_service(golden.into_server())
        .serve_with_incoming_shutdown(crate::tls::incoming(grpc, tls_rx), async move {
            stop.cancelled().await
        })
        .await
        .context("serving gRPC")?;
    // The golden metrics recorded since the last export go out before the exit.
    let _ = tokio::time::timeout(Duration::from_secs(10), golden_worker.shutdown()).await;
    if let Some(elector) = elector {
        // Releasing the Lease lets another replica take over at once instead of after
        // the lease expires; a hung API must not hold the exit up for long.
        let _ = tokio::time::timeout(Duration::from_secs(3), elector).await;
    }
    info!("trellis-addon stopped");
    Ok(())
}

/// Issues the control plane's serving certificate and builds its TLS config: client
/// certificates optional (a proxy's first CSR comes without one), HTTP/2.
fn own_server_config(
    ca: &CertificateAuthority,
    me: &SpiffeId,
) -> anyhow::Result<(Arc<rustls::ServerConfig>, SystemTime, SystemTime)> {
    let csr = trellis_identity::generate_csr(me)?;
    let issued = ca.sign(&csr.csr_der, me, None)?;
    let chain = issued
        .chain_der
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    let svid = Svid::new(chain, csr.key)?;
    let bundle = TrustBundle::from_der(ca.trust_bundle_der())?;
    let cfg = trellis_identity::server_config(&svid, &bundle, ClientAuth::Optional, &[b"h2"])?;
    Ok((cfg, svid.not_before(), svid.not_after()))
}

/// Renews the control plane's own certificate at 70% of its life, and at once when the
/// trust bundle or the signing CA changes: proxies holding leaves of a new root must be
/// able to connect, and after a switch the control plane's chain must lead to the new root.
async fn rotate_own(
    ca: Arc<CertificateAuthority>,
    mut trust: watch::Receiver<trellis_api::Trust>,
    me: SpiffeId,
    tx: watch::Sender<Arc<rustls::ServerConfig>>,
    mut not_before: SystemTime,
    mut not_after: SystemTime,
) {
    loop {
        let life = not_after.duration_since(not_before).unwrap_or_default();
        let at = not_before + life.mul_f64(0.7);
        let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
            changed = trust.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        match own_server_config(&ca, &me) {
            Ok((cfg, nb, na)) => {
                (not_before, not_after) = (nb, na);
                info!(identity = %me, "control-plane certificate renewed");
                if tx.send(cfg).is_err() {
                    return;
                }
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "renewing the control-plane certificate failed; retrying in 10s");
                (not_before, not_after) = (
                    SystemTime::now(),
                    SystemTime::now() + Duration::from_secs(14),
                );
            }
        }
    }
}

/// Binds `addr`, naming `flag` and the likely cause when the port is taken.
pub(crate) async fn bind(addr: std::net::SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} ({flag}): port {} is in use — is another control plane or demo running?", addr.port())
    })
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating --state-dir {}", dir.display()))?;
    } else if !dir.is_dir() {
        anyhow::bail!("--state-dir {} is not a directory", dir.display());
    }
    Ok(())
}

/// Environment variable Application Insights SDKs read their connection string from.
const APPINSIGHTS_ENV: &str = "APPLICATIONINSIGHTS_CONNECTION_STRING";

/// The telemetry gateway proxies export spans and golden metrics to (`tracing.otlp: mesh`),
/// on the gRPC listener: spans go to the local sink of recent traces (`/debug/traces`) and,
/// with a connection string, to Application Insights too, as do metrics (else dropped).
fn telemetry_gateway(
    args: &RunArgs,
    registry: &mut Registry,
    sampling: watch::Receiver<u32>,
) -> anyhow::Result<(
    trellis_telemetry::Gateway,
    (
        trellis_telemetry::MetricsGateway,
        trellis_telemetry::MetricsWorker,
    ),
    trellis_telemetry::Recent,
)> {
    let recent = trellis_telemetry::Recent::new(trellis_telemetry::DEFAULT_RECENT_SPANS);
    let connection_string = match &args.appinsights_connection_string_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| {
                    format!("--appinsights-connection-string-file {}", path.display())
                })?
                .trim()
                .to_owned(),
        ),
        None => std::env::var(APPINSIGHTS_ENV)
            .ok()
            .filter(|s| !s.trim().is_empty()),
    };
    let config = trellis_telemetry::GatewayConfig::default();
    let metrics = trellis_telemetry::Metrics::new(registry);
    let metrics_config = trellis_telemetry::MetricsConfig {
        export_interval: args.telemetry_metrics_interval,
        ..Default::default()
    };
    let golden = match &connection_string {
        Some(cs) => trellis_telemetry::MetricsGateway::spawn(
            Some(trellis_telemetry::app_insights_exporter(
                cs,
                extra_roots()?.as_deref(),
            )?),
            metrics_config,
            metrics.clone(),
        )?,
        None => trellis_telemetry::MetricsGateway::spawn_without_exporter(
            metrics_config,
            metrics.clone(),
        )?,
    };
    let (gateway, _worker) = match connection_string {
        Some(cs) => {
            let exporter =
                trellis_telemetry::Sampled::new(&cs, extra_roots()?.as_deref(), sampling)
                    .context("Application Insights connection string")?;
            info!(
                "telemetry gateway: spans to Application Insights and /debug/traces, golden metrics to Application Insights"
            );
            trellis_telemetry::Gateway::spawn(
                trellis_telemetry::Tee(recent.clone(), exporter),
                config,
                metrics,
            )?
        }
        None => {
            info!(
                "telemetry gateway: spans to /debug/traces only, golden metrics dropped (no Application Insights connection string)"
            );
            trellis_telemetry::Gateway::spawn(recent.clone(), config, metrics)?
        }
    };
    Ok((gateway, golden, recent))
}

/// Private roots for the ingestion endpoint (the stand-in in tests), as for the other
/// Azure endpoints.
fn extra_roots() -> anyhow::Result<Option<String>> {
    match std::env::var_os(trellis_azure::EXTRA_ROOTS_ENV) {
        Some(p) => Ok(Some(std::fs::read_to_string(&p).with_context(|| {
            format!("{}={}", trellis_azure::EXTRA_ROOTS_ENV, p.to_string_lossy())
        })?)),
        None => Ok(None),
    }
}
