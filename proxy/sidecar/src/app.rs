//! Wiring only: config -> bind listeners (fail fast, naming the port) -> spawn identity,
//! discovery, outbound, inbound, admin -> wait for a signal -> drain.
//!
//! The drain (SIGTERM, Ctrl-C or an authorized `POST /shutdown`, all cancelling one
//! token): the outbound and inbound listeners close at once (new connections are
//! refused), open connections are told to finish (HTTP/1 `Connection: close`, HTTP/2
//! GOAWAY) and get `--drain-timeout` for their requests in flight; `/ready` answers 503
//! meanwhile. Then the admin listener closes and `run` returns (exit 0).

use std::sync::Arc;

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;
use trellis_identity::TrustBundle;

use crate::admin::{Admin, ShutdownToken};
use crate::config::Config;
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::outbound::{Outbound, route::View};
use crate::transport::Limits;

/// How long admin connections get to finish (a `/shutdown` answer, a last scrape) once
/// the drain is over.
const ADMIN_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// How long the last metrics push (the drain's requests) may hold up the exit.
const FINAL_PUSH_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the proxy until `shutdown` fires, then drains for up to `drain_timeout`.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let roots = std::fs::read_to_string(&cfg.ca_roots)
        .with_context(|| format!("reading --ca-roots {}", cfg.ca_roots.display()))?;
    let bootstrap = TrustBundle::from_pem(&roots)
        .with_context(|| format!("parsing --ca-roots {}", cfg.ca_roots.display()))?;
    let shutdown_token = match &cfg.shutdown_token_file {
        Some(path) => Some(
            ShutdownToken::from_file(path)
                .with_context(|| format!("reading --shutdown-token-file {}", path.display()))?,
        ),
        None => None,
    };
    let tap_token = match &cfg.tap_token_file {
        Some(path) => Some(
            ShutdownToken::from_file(path)
                .with_context(|| format!("reading --tap-token-file {}", path.display()))?,
        ),
        None => None,
    };
    let limits = Limits::from(&*cfg);

    // Bind everything before starting work, so a busy port fails at once with its name.
    let outbound_l = bind(cfg.outbound, "--outbound").await?;
    let inbound_l = bind(cfg.inbound, "--inbound").await?;
    let admin_l = bind(cfg.admin, "--admin").await?;
    let metrics_l = match cfg.metrics {
        Some(addr) => Some(bind(addr, "--metrics").await?),
        None => None,
    };
    // A metrics listener on every IPv4 address (`0.0.0.0`, what the injector sets) also
    // listens on every IPv6 address where the host has IPv6, so a scraper reaches it on
    // dual-stack and IPv6-only clusters too.
    let metrics6 = match cfg.metrics {
        Some(addr) if addr.ip() == std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) => {
            bind_v6(std::net::Ipv6Addr::UNSPECIFIED, addr.port(), "--metrics")?
        }
        _ => None,
    };
    // Transparent mode: iptables sends IPv6 to ::1 (outbound) and the pod's IPv6 address
    // (inbound), so the same ports are also bound v6-only where the host has IPv6.
    let (outbound6, inbound6) = match cfg.mode {
        crate::config::Mode::Transparent => (
            bind_v6(
                std::net::Ipv6Addr::LOCALHOST,
                cfg.outbound.port(),
                "--outbound",
            )?,
            bind_v6(
                std::net::Ipv6Addr::UNSPECIFIED,
                cfg.inbound.port(),
                "--inbound",
            )?,
        ),
        crate::config::Mode::Explicit => (None, None),
    };

    let mut registry = Registry::default();
    let (tracer, spans) = crate::trace::Tracer::new(&mut registry);
    let metrics = Metrics::new(
        &mut registry,
        crate::telemetry::Local::new(&cfg.service_name, &cfg.identity),
        tracer.clone(),
    );
    let pusher = crate::otlp_metrics::Pusher::new(&metrics, &mut registry);
    let (certs_tx, certs_rx) = watch::channel(None);
    let (view_tx, view_rx) = watch::channel(Arc::new(View::default()));

    info!(
        identity = %cfg.identity,
        workload = %cfg.workload,
        outbound = %outbound_l.local_addr()?,
        inbound = %inbound_l.local_addr()?,
        admin = %admin_l.local_addr()?,
        app = %cfg.app,
        control_plane = %cfg.control_plane,
        max_connections = limits.max_connections,
        idle_timeout_s = limits.idle_timeout.as_secs(),
        shutdown_endpoint = shutdown_token.is_some(),
        "trellis-proxy starting"
    );

    let tasks = TaskTracker::new();
    // Identity follows the trust bundle and CA generation that discovery pushes.
    tokio::spawn(crate::identity::run(
        cfg.clone(),
        bootstrap,
        certs_tx,
        view_rx.clone(),
        metrics.clone(),
    ));
    tokio::spawn(crate::discovery::run(
        cfg.clone(),
        certs_rx.clone(),
        view_tx,
        metrics.clone(),
    ));

    // Spans go to the sink the mesh config names; `mesh` is the control plane, reached
    // like discovery, over mTLS with the current certificate.
    let mesh: crate::trace::Connect = {
        let (certs, cfg) = (certs_rx.clone(), cfg.clone());
        Arc::new(move || {
            let (certs, cfg) = (certs.clone(), cfg.clone());
            Box::pin(async move {
                let certified = certs.borrow().clone().ok_or("no certificate yet")?;
                let tls = certified.client_config(&cfg.control_plane_identity)?;
                Ok(crate::control::connect(cfg.control_plane.clone(), tls).await?)
            })
        })
    };
    // Spans and golden metrics share the sink, its channel and the resource.
    let sinks = crate::trace::SinkChannel::new(mesh);
    let resource =
        crate::trace::resource(&cfg.service_name, cfg.identity.namespace(), &cfg.workload);
    let settings = tracer.settings();
    tokio::spawn(crate::trace::export(
        tracer,
        spans,
        resource.clone(),
        sinks.clone(),
    ));
    let push_stop = CancellationToken::new();
    let pushing = tokio::spawn(pusher.run(
        settings,
        resource,
        sinks,
        cfg.metrics_push_interval,
        push_stop.clone(),
    ));

    let mut own_ports = vec![cfg.outbound.port(), cfg.inbound.port(), cfg.admin.port()];
    own_ports.extend(cfg.metrics.map(|m| m.port()));
    let outbound = Arc::new(Outbound::new(
        cfg.identity.clone(),
        certs_rx.clone(),
        view_rx.clone(),
        metrics.clone(),
        crate::outbound::Settings {
            mode: cfg.mode,
            request_timeout: cfg.request_timeout,
            detect_timeout: cfg.detect_timeout,
            opaque_ports: cfg.opaque_ports.clone(),
            own_ports,
            limits: limits.clone(),
        },
    ));
    let inbound = Arc::new(Inbound::new(
        cfg.identity.clone(),
        cfg.app,
        cfg.mode,
        certs_rx.clone(),
        view_rx.clone(),
        metrics.clone(),
        cfg.request_timeout,
        limits.clone(),
    ));
    let admin = Arc::new(Admin {
        workload: cfg.workload.clone(),
        certs: certs_rx,
        view: view_rx,
        registry,
        shutdown: shutdown.clone(),
        shutdown_token,
        tap: metrics.tap.clone(),
        tap_token,
    });

    let accept = TaskTracker::new();
    accept.spawn(
        outbound
            .clone()
            .serve(outbound_l, shutdown.clone(), tasks.clone()),
    );
    accept.spawn(
        inbound
            .clone()
            .serve(inbound_l, shutdown.clone(), tasks.clone()),
    );
    if let Some(l) = outbound6 {
        accept.spawn(outbound.serve(l, shutdown.clone(), tasks.clone()));
    }
    if let Some(l) = inbound6 {
        accept.spawn(inbound.serve(l, shutdown.clone(), tasks.clone()));
    }
    accept.close();
    // The admin port outlives the drain: probes see 503 and scrapes still work.
    let (admin_stop, admin_tasks) = (CancellationToken::new(), TaskTracker::new());
    let metrics_accept: Vec<_> = (metrics_l.into_iter().chain(metrics6))
        .map(|l| {
            tokio::spawn(
                admin
                    .clone()
                    .serve_metrics(l, admin_stop.clone(), admin_tasks.clone()),
            )
        })
        .collect();
    let admin_accept = tokio::spawn(admin.serve(admin_l, admin_stop.clone(), admin_tasks.clone()));

    shutdown.cancelled().await;
    info!(
        timeout_ms = cfg.drain_timeout.as_millis() as u64,
        "draining"
    );
    accept.wait().await;
    tasks.close();
    if tokio::time::timeout(cfg.drain_timeout, tasks.wait())
        .await
        .is_err()
    {
        info!("drain timeout reached; closing remaining connections");
    }
    // One last push carries the requests of the drain.
    push_stop.cancel();
    let _ = tokio::time::timeout(FINAL_PUSH_GRACE, pushing).await;
    admin_stop.cancel();
    let _ = admin_accept.await;
    for metrics_accept in metrics_accept {
        let _ = metrics_accept.await;
    }
    admin_tasks.close();
    let _ = tokio::time::timeout(ADMIN_CLOSE_GRACE, admin_tasks.wait()).await;
    info!("trellis-proxy stopped");
    Ok(())
}

async fn bind(addr: std::net::SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "cannot listen on {addr} ({flag}): is another proxy or demo already using port {}?",
            addr.port()
        )
    })
}

/// Binds `[ip]:port` v6-only (so it never collides with the IPv4 listener on the same
/// port). `None`, with a warning, where the host has no IPv6.
fn bind_v6(ip: std::net::Ipv6Addr, port: u16, flag: &str) -> anyhow::Result<Option<TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let addr = std::net::SocketAddr::from((ip, port));
    let socket = match Socket::new(Domain::IPV6, Type::STREAM, None) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%addr, error = %e, flag, "no IPv6: this listener is IPv4 only");
            return Ok(None);
        }
    };
    let setup = || -> std::io::Result<()> {
        socket.set_only_v6(true)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)
    };
    match setup() {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            tracing::warn!(%addr, error = %e, flag, "no IPv6 address: this listener is IPv4 only");
            return Ok(None);
        }
        Err(e) => {
            return Err(anyhow::anyhow!(e)).with_context(|| {
                format!("cannot listen on {addr} ({flag}, IPv6): is another proxy already using port {port}?")
            });
        }
    }
    Ok(Some(TcpListener::from_std(socket.into())?))
}
