//! The discovery client: one stream to the control plane, a full view first and
//! incremental updates after, each acked or nacked. The last good view stays published
//! while the control plane is away; the stream reconnects with backoff. The view carries
//! the pushed trust bundle and CA generation, which the identity task follows.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};
use trellis_api::MeshSnapshot;
use trellis_api::discovery::v1::{
    Ack, DiscoveryRequest, Hello, Nack, discovery_client::DiscoveryClient, discovery_request::Kind,
};

use crate::config::Config;
use crate::identity::{Backoff, Certified};
use crate::metrics::Metrics;
use crate::outbound::route::View;

/// Keeps `view_tx` up to date from the control plane, forever.
pub async fn run(
    cfg: Arc<Config>,
    mut certs: watch::Receiver<Option<Arc<Certified>>>,
    view_tx: watch::Sender<Arc<View>>,
    metrics: Metrics,
) {
    let mut backoff = Backoff::new();
    loop {
        let certified = match certs.wait_for(Option::is_some).await {
            Ok(c) => c.clone(),
            Err(_) => return,
        };
        let Some(certified) = certified else { continue };
        match stream_once(&cfg, &certified, &view_tx, &metrics, &mut backoff).await {
            Ok(()) => info!("discovery stream closed by the control plane; reconnecting"),
            Err(error) => warn!(%error, "discovery stream failed; keeping the last good view"),
        }
        metrics.discovery_connected.set(0);
        if view_tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

async fn stream_once(
    cfg: &Config,
    certified: &Certified,
    view_tx: &watch::Sender<Arc<View>>,
    metrics: &Metrics,
    backoff: &mut Backoff,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let tls = certified.client_config(&cfg.control_plane_identity)?;
    let channel = crate::control::connect(cfg.control_plane.clone(), tls).await?;
    let (tx, rx) = mpsc::channel(16);
    let last_version = view_tx.borrow().snapshot.version;
    tx.send(DiscoveryRequest {
        kind: Some(Kind::Hello(Hello {
            workload: cfg.workload.clone(),
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            last_version,
            metrics_address: cfg.metrics.unwrap_or(cfg.admin).to_string(),
            admin_address: cfg.admin.to_string(),
        })),
    })
    .await?;
    let mut responses = DiscoveryClient::new(channel)
        .max_decoding_message_size(16 * 1024 * 1024)
        .stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    metrics.discovery_connected.set(1);
    // After a Nack the server resends a full view; increments built on the refused
    // version may still be in flight and must not be applied on top of ours.
    let mut needs_full = true;
    // Large versions arrive in parts (see `more` in discovery.proto); nothing is applied
    // or acked until the last part.
    let mut parts = trellis_api::Parts::default();
    while let Some(part) = responses.message().await? {
        let version = part.version;
        let resp = match parts.push(part) {
            Ok(Some(whole)) => whole,
            Ok(None) => continue,
            Err(error) => {
                warn!(%error, version, "discovery update refused; keeping the previous view");
                metrics.discovery_nacks.inc();
                needs_full = true;
                let nack = Kind::Nack(Nack {
                    version,
                    error: error.to_string(),
                });
                tx.send(DiscoveryRequest { kind: Some(nack) }).await?;
                continue;
            }
        };
        let current = view_tx.borrow().snapshot.clone();
        // A full view replaces everything, whatever its version: a restarted control
        // plane counts again from 1. Increments only move forward from our version.
        let base = if resp.full {
            MeshSnapshot::default()
        } else {
            current
        };
        let applied = if needs_full && !resp.full {
            Err(format!(
                "expected a full view after a refused version, got an increment to v{}",
                resp.version
            ))
        } else {
            trellis_api::apply(&base, &resp).map_err(|e| e.to_string())
        };
        let reply = match applied {
            Ok(next) => {
                info!(
                    version = next.version,
                    full = resp.full,
                    services = next.services.len(),
                    trust_roots = next.trust.roots_der.len(),
                    ca_generation = next.trust.generation,
                    outbound = ?next.outbound,
                    access_log = ?next.access_log,
                    tracing = ?next.tracing,
                    authorization_policies = next.authorization.len(),
                    http_routes = next.routes.len(),
                    "discovery view applied"
                );
                crate::logging::set_access_log(next.access_log);
                metrics
                    .tracer
                    .apply(&crate::trace::Settings::from(&next.tracing));
                metrics
                    .discovery_version
                    .set(i64::try_from(next.version).unwrap_or(i64::MAX));
                let view = View::new(next, &cfg.identity, &cfg.workload, cfg.mode);
                debug!(
                    version = view.snapshot.version,
                    applied = ?view.authz.applied(),
                    "authorization policies that apply to this workload (None: every port)"
                );
                view_tx.send_replace(Arc::new(view));
                needs_full = false;
                backoff.reset();
                Kind::Ack(Ack {
                    version: resp.version,
                })
            }
            Err(error) => {
                warn!(%error, version = resp.version, "discovery update refused; keeping the previous view");
                metrics.discovery_nacks.inc();
                needs_full = true;
                Kind::Nack(Nack {
                    version: resp.version,
                    error,
                })
            }
        };
        tx.send(DiscoveryRequest { kind: Some(reply) }).await?;
    }
    Ok(())
}
