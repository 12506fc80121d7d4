//! This workload's certificate and trust bundle.
//!
//! The identity task asks the control plane's CA for a certificate (CSR with our token),
//! renews it at a random point between 65% and 75% of its lifetime, and publishes the
//! current [`Certified`] on a watch channel. Listeners read it per connection, so a new
//! certificate or bundle applies to new connections at once while open connections keep
//! the configuration they were handshaken with.
//!
//! The task also follows the trust pushed over discovery (`MeshSnapshot::trust`):
//!
//! - new roots are swapped in at once, with the same certificate ([`Certified::with_bundle`]);
//!   a bundle that does not parse is logged and ignored (the last good one stays);
//! - a CA generation greater than the one that signed our leaf means the control plane
//!   now signs with another CA: we re-issue at once, after a random delay of up to
//!   [`REISSUE_JITTER_MAX`] so that every proxy does not reach the CA in the same
//!   millisecond.
//!
//! Once discovery has delivered a bundle, it is the one every new certificate is published
//! with (the CertifyResponse's bundle is used until then, and with control planes that do
//! not push one): discovery delivers bundle changes in order, a CertifyResponse is a copy
//! taken at some point. The old certificate keeps serving until a new one is in hand;
//! failed requests are retried with [`Backoff`].
//!
//! The private key is generated here and never leaves the process.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};
use trellis_api::Trust;
use trellis_api::identity::v1::{CertifyRequest, identity_client::IdentityClient};
use trellis_identity::{ClientAuth, SpiffeId, Svid, TrustBundle};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbound::route::View;

/// ALPN for proxy-to-proxy and proxy-to-control-plane connections: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// Earliest point of a certificate's lifetime at which it is renewed.
pub const RENEW_MIN_FRACTION: f64 = 0.65;

/// Latest point of a certificate's lifetime at which it is renewed. Renewals are spread
/// uniformly between [`RENEW_MIN_FRACTION`] and this, so that proxies started together
/// (a rollout, a node reboot) do not renew together forever after.
pub const RENEW_MAX_FRACTION: f64 = 0.75;

/// Longest random delay before re-issuing for a new CA generation.
pub const REISSUE_JITTER_MAX: Duration = Duration::from_secs(2);

/// How long one certificate request may take, connection included. Bounded so that a CA
/// that accepts the connection and never answers cannot stall renewals.
pub const CERTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// Shortest wait before a scheduled renewal, so that a certificate already past its
/// renewal point (or a clock jump) cannot make the task spin.
const MIN_RENEW_WAIT: Duration = Duration::from_secs(1);

/// A certified key with the TLS configurations built from it.
pub struct Certified {
    /// Our certificate chain and key.
    pub svid: Svid,
    /// Roots peers are verified against.
    pub bundle: TrustBundle,
    /// Generation of the CA that signed `svid` (`CertifyResponse.ca_generation`; 0 when
    /// the control plane does not number them).
    pub ca_generation: u64,
    /// Inbound mTLS server configuration (client certificate required).
    pub server: Arc<rustls::ServerConfig>,
    clients: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the token or roots file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// File path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Building TLS material failed.
    #[error(transparent)]
    Tls(#[from] trellis_identity::Error),
    /// Talking to the CA failed.
    #[error("connecting to the CA: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The CA refused.
    #[error("the CA refused: {0}")]
    Refused(#[from] tonic::Status),
    /// The CA did not answer within [`CERTIFY_TIMEOUT`].
    #[error("the CA did not answer within {} s", CERTIFY_TIMEOUT.as_secs())]
    Timeout,
    /// The CA issued an identity other than the one we expect.
    #[error("the CA issued {got}, expected {expected}")]
    WrongIdentity {
        /// What we got.
        got: SpiffeId,
        /// What the config says we are.
        expected: SpiffeId,
    },
}

// === impl Certified ===

impl Certified {
    /// Builds the TLS configurations for a certificate signed by the CA of generation
    /// `ca_generation`, verifying peers against `bundle`.
    pub fn new(
        svid: Svid,
        bundle: TrustBundle,
        ca_generation: u64,
    ) -> Result<Self, trellis_identity::Error> {
        let server =
            trellis_identity::server_config(&svid, &bundle, ClientAuth::Required, &[ALPN_H2])?;
        Ok(Self {
            svid,
            bundle,
            ca_generation,
            server,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The same certificate verifying peers against another bundle: the TLS
    /// configurations are rebuilt (and the client cache starts empty). Connections made
    /// with `self` are unaffected: rustls reads a configuration only during a handshake.
    pub fn with_bundle(&self, bundle: TrustBundle) -> Result<Self, trellis_identity::Error> {
        Self::new(self.svid.clone(), bundle, self.ca_generation)
    }

    /// A client configuration that presents our certificate and requires the server to
    /// be exactly `peer`. Cached per peer identity.
    pub fn client_config(
        &self,
        peer: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, trellis_identity::Error> {
        let mut cache = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(peer) {
            return Ok(c.clone());
        }
        let c = trellis_identity::client_config(Some(&self.svid), &self.bundle, peer, &[ALPN_H2])?;
        cache.insert(peer.clone(), c.clone());
        Ok(c)
    }
}

impl std::fmt::Debug for Certified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certified")
            .field("id", self.svid.id())
            .field("roots", &self.bundle.len())
            .field("ca_generation", &self.ca_generation)
            .finish_non_exhaustive()
    }
}

/// Requests one certificate from the CA, within [`CERTIFY_TIMEOUT`].
///
/// The control plane is verified against the bootstrap roots (`--ca-roots`) and `latest`,
/// the last bundle discovery delivered: after a root rotation the control plane's own
/// certificate chains to the new root, which the bootstrap file may not hold. The result
/// verifies peers against the CA's `trust_bundle_der`.
pub async fn certify(
    cfg: &Config,
    bootstrap: &TrustBundle,
    latest: Option<&TrustBundle>,
) -> Result<Certified, Error> {
    tokio::time::timeout(CERTIFY_TIMEOUT, certify_once(cfg, bootstrap, latest))
        .await
        .map_err(|_| Error::Timeout)?
}

async fn certify_once(
    cfg: &Config,
    bootstrap: &TrustBundle,
    latest: Option<&TrustBundle>,
) -> Result<Certified, Error> {
    let token = tokio::fs::read_to_string(&cfg.token_file)
        .await
        .map_err(|source| Error::Read {
            path: cfg.token_file.display().to_string(),
            source,
        })?;
    let csr = trellis_identity::generate_csr(&cfg.identity)?;
    let roots = control_plane_roots(bootstrap, latest)?;
    let tls =
        trellis_identity::client_config(None, &roots, &cfg.control_plane_identity, &[ALPN_H2])?;
    let channel = crate::control::connect(cfg.control_plane.clone(), tls).await?;
    let resp = IdentityClient::new(channel)
        .certify(CertifyRequest {
            csr_der: csr.csr_der,
            token: token.trim().to_owned(),
            requested_ttl_seconds: u32::try_from(cfg.cert_ttl.as_secs()).unwrap_or(u32::MAX),
        })
        .await?
        .into_inner();
    let chain = resp
        .chain_der
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    let svid = Svid::new(chain, csr.key)?;
    if svid.id() != &cfg.identity {
        return Err(Error::WrongIdentity {
            got: svid.id().clone(),
            expected: cfg.identity.clone(),
        });
    }
    let bundle = TrustBundle::from_der(resp.trust_bundle_der)?;
    Ok(Certified::new(svid, bundle, resp.ca_generation)?)
}

/// The roots the control plane is verified against when we ask for a certificate:
/// `bootstrap` and then the roots of `latest` it does not already hold.
pub fn control_plane_roots(
    bootstrap: &TrustBundle,
    latest: Option<&TrustBundle>,
) -> Result<TrustBundle, trellis_identity::Error> {
    let Some(latest) = latest else {
        return Ok(bootstrap.clone());
    };
    let mut ders: Vec<Vec<u8>> = bootstrap.certs().iter().map(|c| c.to_vec()).collect();
    for cert in latest.certs() {
        if !bootstrap.certs().contains(cert) {
            ders.push(cert.to_vec());
        }
    }
    TrustBundle::from_der(ders)
}

/// The fraction of the lifetime at which to renew, for `unit` uniform in `[0, 1)`:
/// uniform in [[`RENEW_MIN_FRACTION`], [`RENEW_MAX_FRACTION`]]. Out-of-range input is
/// clamped.
pub fn renew_fraction(unit: f64) -> f64 {
    let unit = if unit.is_nan() {
        0.0
    } else {
        unit.clamp(0.0, 1.0)
    };
    RENEW_MIN_FRACTION + (RENEW_MAX_FRACTION - RENEW_MIN_FRACTION) * unit
}

/// When to renew a certificate valid from `not_before` to `not_after`: at `fraction` of
/// its lifetime (see [`renew_fraction`]). One that ends before it starts renews at once.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, fraction: f64) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + life.mul_f64(fraction.clamp(0.0, 1.0))
}

/// The delay before re-issuing for a new CA generation, for `unit` uniform in `[0, 1)`:
/// uniform in `[0, REISSUE_JITTER_MAX]`. Out-of-range input is clamped.
pub fn reissue_jitter(unit: f64) -> Duration {
    let unit = if unit.is_nan() {
        0.0
    } else {
        unit.clamp(0.0, 1.0)
    };
    REISSUE_JITTER_MAX.mul_f64(unit)
}

/// Whether to re-issue now that discovery `announced` a CA generation: only when it is
/// greater than the generation of our leaf and is not the generation already announced
/// when that leaf was requested. The second condition stops a loop when the CA answers
/// with an older generation than discovery announces (a control plane mid-switch, or a
/// buggy one): each announced generation triggers at most one re-issue.
pub fn should_reissue(announced: u64, leaf: u64, announced_at_request: u64) -> bool {
    announced > leaf && announced != announced_at_request
}

/// What a pushed trust means for the bundle we verify peers with.
#[derive(Debug)]
pub enum BundleUpdate {
    /// No roots pushed, or the same roots in the same order as `current`.
    Unchanged,
    /// Other roots, parsed.
    New(TrustBundle),
    /// Other roots that do not parse: keep `current`.
    Invalid(trellis_identity::Error),
}

/// Compares pushed roots with the bundle in use and parses them when they differ.
pub fn bundle_update(current: Option<&TrustBundle>, pushed: &Trust) -> BundleUpdate {
    if pushed.roots_der.is_empty() {
        return BundleUpdate::Unchanged;
    }
    if let Some(current) = current {
        let same = current.len() == pushed.roots_der.len()
            && current
                .certs()
                .iter()
                .zip(&pushed.roots_der)
                .all(|(have, got)| have.as_ref() == got.as_slice());
        if same {
            return BundleUpdate::Unchanged;
        }
    }
    match TrustBundle::from_der(pushed.roots_der.clone()) {
        Ok(bundle) => BundleUpdate::New(bundle),
        Err(error) => BundleUpdate::Invalid(error),
    }
}

/// Keeps a valid certificate and the latest trust bundle published on `tx`, until every
/// receiver is gone: renews at [`renew_fraction`] of each certificate's lifetime, follows
/// the trust pushed in `views` (see the module docs) and retries failures with
/// [`Backoff`]. `bootstrap` is the `--ca-roots` bundle.
pub async fn run(
    cfg: Arc<Config>,
    bootstrap: TrustBundle,
    tx: watch::Sender<Option<Arc<Certified>>>,
    views: watch::Receiver<Arc<View>>,
    metrics: Metrics,
) {
    let request = move |latest: Option<TrustBundle>| {
        let (cfg, bootstrap) = (cfg.clone(), bootstrap.clone());
        async move { certify(&cfg, &bootstrap, latest.as_ref()).await }
    };
    keep_certified(request, tx, views, metrics).await;
}

/// What the identity task knows besides the published certificate.
#[derive(Debug, Default)]
struct State {
    /// The trust of the last view looked at, to act on changes only.
    seen: Trust,
    /// The last good bundle discovery delivered.
    pushed: Option<TrustBundle>,
    /// The CA generation discovery announced with it.
    announced: u64,
    /// `announced` when the current certificate was requested.
    announced_at_request: u64,
}

/// [`run`] with the CA request as a parameter, so the schedule is tested without a CA:
/// `request(latest pushed bundle)` obtains one certificate.
async fn keep_certified<F, Fut>(
    mut request: F,
    tx: watch::Sender<Option<Arc<Certified>>>,
    mut views: watch::Receiver<Arc<View>>,
    metrics: Metrics,
) where
    F: FnMut(Option<TrustBundle>) -> Fut,
    Fut: Future<Output = Result<Certified, Error>>,
{
    let mut state = State::default();
    let mut backoff = Backoff::new();
    let mut next = Instant::now();
    // The request under way (so views are followed while the CA answers) and the
    // generation announced when it was sent.
    let mut in_flight: Option<(Pin<Box<Fut>>, u64)> = None;
    // A re-issue for the announced generation is scheduled or being retried: the jitter
    // is drawn once per generation, and failures then follow the backoff.
    let mut reissue_pending = false;
    let mut views_open = true;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next), if in_flight.is_none() => {
                in_flight = Some((Box::pin(request(state.pushed.clone())), state.announced));
            }
            (result, announced) = wait_in_flight(&mut in_flight) => {
                in_flight = None;
                match result {
                    Ok(issued) => {
                        backoff.reset();
                        reissue_pending = false;
                        state.announced_at_request = announced;
                        next = Instant::now() + renew_wait(&issued);
                        let issued = with_pushed_bundle(issued, state.pushed.as_ref());
                        if issued.ca_generation < announced {
                            warn!(
                                ca_generation = issued.ca_generation,
                                announced,
                                "the CA issued a certificate of an older generation than discovery announced; not re-issuing until the next generation"
                            );
                        }
                        publish(&tx, &metrics, issued, "certificate issued");
                    }
                    Err(error) => {
                        let wait = backoff.next_wait();
                        warn!(%error, retry_in_ms = wait.as_millis() as u64, "certificate request failed; keeping the current certificate");
                        next = Instant::now() + wait;
                    }
                }
            }
            changed = views.changed(), if views_open => {
                if changed.is_err() {
                    // Discovery stopped: keep renewing with what we have.
                    views_open = false;
                    continue;
                }
                let trust = views.borrow_and_update().snapshot.trust.clone();
                if trust != state.seen {
                    follow_trust(&mut state, trust, &tx, &metrics);
                }
            }
            () = tx.closed() => return,
        }
        if in_flight.is_some() || reissue_pending {
            continue;
        }
        let current = tx.borrow().clone();
        if let Some(current) = current
            && should_reissue(
                state.announced,
                current.ca_generation,
                state.announced_at_request,
            )
        {
            reissue_pending = true;
            let jitter = reissue_jitter(rand::random());
            info!(
                announced = state.announced,
                ca_generation = current.ca_generation,
                jitter_ms = jitter.as_millis() as u64,
                "CA generation changed; re-issuing"
            );
            next = next.min(Instant::now() + jitter);
        }
    }
}

/// The result of the request under way; never ready when there is none.
async fn wait_in_flight<Fut: Future>(
    in_flight: &mut Option<(Pin<Box<Fut>>, u64)>,
) -> (Fut::Output, u64) {
    match in_flight {
        Some((fut, announced)) => (fut.await, *announced),
        None => std::future::pending().await,
    }
}

/// Acts on a pushed trust that differs from the last one seen: swaps in new roots at once
/// (same certificate) and records the announced generation.
fn follow_trust(
    state: &mut State,
    trust: Trust,
    tx: &watch::Sender<Option<Arc<Certified>>>,
    metrics: &Metrics,
) {
    if trust.roots_der.is_empty() {
        // No bundle in the view (a control plane that does not push one): certificates
        // from now on carry their CertifyResponse's bundle again.
        state.pushed = None;
        state.seen = trust;
        return;
    }
    let current = tx.borrow().clone();
    match bundle_update(current.as_ref().map(|c| &c.bundle), &trust) {
        BundleUpdate::Unchanged => {
            state.pushed = current.map(|c| c.bundle.clone());
        }
        BundleUpdate::New(bundle) => match current.map(|c| c.with_bundle(bundle.clone())) {
            Some(Ok(updated)) => {
                state.pushed = Some(bundle);
                publish(tx, metrics, updated, "trust bundle updated");
            }
            Some(Err(error)) => {
                warn!(%error, "cannot build TLS configurations with the pushed trust bundle; keeping the last good one");
            }
            // No certificate yet: the first one is published with this bundle.
            None => state.pushed = Some(bundle),
        },
        BundleUpdate::Invalid(error) => {
            warn!(
                %error,
                roots = trust.roots_der.len(),
                fingerprints = %trust.fingerprints().join(","),
                "pushed trust bundle does not parse; keeping the last good one"
            );
        }
    }
    state.announced = trust.generation;
    state.seen = trust;
}

/// `issued` verifying peers against the pushed bundle when there is one and it differs
/// from the CertifyResponse's (see the module docs).
fn with_pushed_bundle(issued: Certified, pushed: Option<&TrustBundle>) -> Certified {
    match pushed {
        Some(bundle) if *bundle != issued.bundle => match issued.with_bundle(bundle.clone()) {
            Ok(swapped) => swapped,
            Err(error) => {
                warn!(%error, "cannot use the pushed trust bundle; using the CA's");
                issued
            }
        },
        _ => issued,
    }
}

/// Publishes `c`, updates the certificate metrics and logs `what`.
fn publish(
    tx: &watch::Sender<Option<Arc<Certified>>>,
    metrics: &Metrics,
    c: Certified,
    what: &'static str,
) {
    let not_after = c
        .svid
        .not_after()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    metrics
        .cert_expiry
        .set(i64::try_from(not_after).unwrap_or(i64::MAX));
    metrics
        .trust_roots
        .set(i64::try_from(c.bundle.len()).unwrap_or(i64::MAX));
    metrics
        .ca_generation
        .set(i64::try_from(c.ca_generation).unwrap_or(i64::MAX));
    let fingerprints: Vec<String> = c
        .bundle
        .certs()
        .iter()
        .map(|r| trellis_api::fingerprint(r))
        .collect();
    info!(
        identity = %c.svid.id(),
        not_after,
        ca_generation = c.ca_generation,
        roots = c.bundle.len(),
        fingerprints = %fingerprints.join(","),
        "{what}"
    );
    tx.send_replace(Some(Arc::new(c)));
}

/// How long until `c` is renewed: a random point in [`renew_fraction`]'s range of its
/// lifetime, at least [`MIN_RENEW_WAIT`] from now.
fn renew_wait(c: &Certified) -> Duration {
    let at = renew_at(
        c.svid.not_before(),
        c.svid.not_after(),
        renew_fraction(rand::random()),
    );
    at.duration_since(SystemTime::now())
        .unwrap_or_default()
        .max(MIN_RENEW_WAIT)
}

/// Exponential backoff with jitter, 100 ms doubling up to 10 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

// === impl Backoff ===

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    /// Starts at the minimum.
    pub fn new() -> Self {
        Self { next: Self::MIN }
    }

    /// Back to the minimum after a success.
    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    /// The next wait: the current step plus up to 50% jitter, then the step doubles.
    pub fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base + base.mul_f64(rand::random::<f64>() * 0.5)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use prometheus_client::registry::Registry;
    use trellis_api::MeshSnapshot;
    use trellis_identity::test_util::{LeafOptions, TestCa};

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const MINUTE: Duration = Duration::from_secs(60);

    type Answer = Pin<Box<dyn Future<Output = Result<Certified, Error>> + Send>>;

    fn me() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/demo/sa/web").unwrap()
    }

    /// A certificate from `ca` valid from now for an hour: renewal 39 to 45 minutes away.
    fn certified(ca: &TestCa, ca_generation: u64) -> Certified {
        let now = SystemTime::now();
        let (chain, key) = ca.issue_with(LeafOptions {
            not_before: now,
            not_after: now + HOUR,
            ..LeafOptions::new(&me())
        });
        Certified::new(Svid::new(chain, key).unwrap(), ca.bundle(), ca_generation).unwrap()
    }

    fn bundle(cas: &[&TestCa]) -> TrustBundle {
        TrustBundle::from_der(cas.iter().map(|ca| ca.root_der().to_vec()).collect()).unwrap()
    }

    fn trust(cas: &[&TestCa], generation: u64) -> Trust {
        Trust {
            roots_der: cas.iter().map(|ca| ca.root_der().to_vec()).collect(),
            generation,
        }
    }

    fn refused() -> Error {
        Error::Refused(tonic::Status::unavailable("CA down"))
    }

    /// A CA that answers from a script (and never, once it runs out) and records the
    /// `latest` bundle each request was sent with.
    #[derive(Clone, Default)]
    struct FakeCa {
        script: Arc<Mutex<VecDeque<Result<Certified, Error>>>>,
        requests: Arc<Mutex<Vec<Option<TrustBundle>>>>,
    }

    impl FakeCa {
        fn answer(&self, answer: Result<Certified, Error>) {
            self.script.lock().unwrap().push_back(answer);
        }

        fn requests(&self) -> Vec<Option<TrustBundle>> {
            self.requests.lock().unwrap().clone()
        }

        fn request_fn(&self) -> impl FnMut(Option<TrustBundle>) -> Answer + Send + 'static {
            let this = self.clone();
            move |latest| {
                this.requests.lock().unwrap().push(latest);
                match this.script.lock().unwrap().pop_front() {
                    Some(answer) => Box::pin(std::future::ready(answer)),
                    None => Box::pin(std::future::pending()),
                }
            }
        }
    }

    /// The identity task with a fake CA, a view channel standing in for discovery and
    /// the published certificates.
    struct Harness {
        ca: FakeCa,
        certs: watch::Receiver<Option<Arc<Certified>>>,
        views: watch::Sender<Arc<View>>,
        registry: Registry,
    }

    impl Harness {
        fn start(ca: FakeCa) -> Self {
            let (tx, certs) = watch::channel(None);
            let (views, views_rx) = watch::channel(Arc::new(View::default()));
            let mut registry = Registry::default();
            let metrics = Metrics::new(
                &mut registry,
                crate::telemetry::Local::peer(
                    &trellis_identity::SpiffeId::parse("spiffe://t/ns/t/sa/t").unwrap(),
                ),
                crate::trace::Tracer::new(&mut Registry::default()).0,
            );
            tokio::spawn(keep_certified(ca.request_fn(), tx, views_rx, metrics));
            Self {
                ca,
                certs,
                views,
                registry,
            }
        }

        /// Publishes a view (services would differ; the trust is what matters here).
        fn push(&self, trust: Trust) {
            let version = self.views.borrow().snapshot.version + 1;
            let snapshot = MeshSnapshot {
                version,
                trust,
                ..Default::default()
            };
            self.views.send_replace(Arc::new(View::new(
                snapshot,
                &me(),
                "web-0",
                crate::config::Mode::Explicit,
            )));
        }

        /// The next certificate published, within `within` of (paused) time.
        async fn next(&mut self, within: Duration) -> Arc<Certified> {
            tokio::time::timeout(within, self.certs.changed())
                .await
                .expect("a certificate in time")
                .unwrap();
            self.certs.borrow_and_update().clone().unwrap()
        }

        /// True when nothing is published for `d`.
        async fn quiet_for(&mut self, d: Duration) -> bool {
            tokio::time::timeout(d, self.certs.changed()).await.is_err()
        }

        fn metric(&self, name: &str) -> String {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or("missing")
                .to_owned()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pushed_roots_are_swapped_in_with_the_same_certificate() {
        let (a, b) = (TestCa::new("a.test"), TestCa::new("b.test"));
        let fake = FakeCa::default();
        fake.answer(Ok(certified(&a, 1)));
        let mut h = Harness::start(fake);
        let first = h.next(Duration::from_secs(1)).await;
        assert_eq!(first.bundle, bundle(&[&a]));
        assert_eq!(first.ca_generation, 1);
        assert_eq!(h.metric("trellis_proxy_trust_roots"), "1");

        // Old and new roots side by side: published at once, same leaf and generation.
        let t0 = Instant::now();
        h.push(trust(&[&a, &b], 1));
        let swapped = h.next(Duration::from_secs(1)).await;
        assert_eq!(t0.elapsed(), Duration::ZERO, "no delay for a bundle");
        assert_eq!(swapped.svid.chain(), first.svid.chain());
        assert_eq!(swapped.bundle, bundle(&[&a, &b]));
        assert_eq!(swapped.ca_generation, 1);
        assert_eq!(h.metric("trellis_proxy_trust_roots"), "2");
        assert_eq!(h.metric("trellis_proxy_ca_generation"), "1");
        // The server config was rebuilt for the new bundle, not shared.
        assert!(!Arc::ptr_eq(&swapped.server, &first.server));

        // The same trust in a later view, and a bundle that does not parse: nothing.
        h.push(trust(&[&a, &b], 1));
        assert!(h.quiet_for(Duration::from_secs(10)).await);
        h.push(Trust {
            roots_der: vec![a.root_der().to_vec(), b"not a certificate".to_vec()],
            generation: 1,
        });
        assert!(h.quiet_for(Duration::from_secs(10)).await);
        assert_eq!(h.certs.borrow().as_ref().unwrap().bundle, bundle(&[&a, &b]));

        // The old root dropped.
        h.push(trust(&[&b], 1));
        let dropped = h.next(Duration::from_secs(1)).await;
        assert_eq!(dropped.bundle, bundle(&[&b]));
        assert_eq!(dropped.svid.chain(), first.svid.chain());
        assert_eq!(h.ca.requests().len(), 1, "a bundle change never re-issues");
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_is_jittered_and_keeps_the_pushed_bundle() {
        let (a, b) = (TestCa::new("a.test"), TestCa::new("b.test"));
        let fake = FakeCa::default();
        fake.answer(Ok(certified(&a, 1)));
        fake.answer(Ok(certified(&a, 1)));
        let mut h = Harness::start(fake);
        let first = h.next(Duration::from_secs(1)).await;
        let issued_at = Instant::now();
        h.push(trust(&[&a, &b], 1));
        h.next(Duration::from_secs(1)).await;

        let renewed = h.next(HOUR).await;
        let after = issued_at.elapsed();
        assert!(
            after >= 39 * MINUTE - Duration::from_secs(1) && after <= 45 * MINUTE,
            "renewed after {after:?}, outside 65%..75% of an hour"
        );
        assert_ne!(renewed.svid.chain(), first.svid.chain());
        // The CA answered with [a]; the bundle discovery pushed wins.
        assert_eq!(renewed.bundle, bundle(&[&a, &b]));
        // The CA was reached trusting the pushed bundle (besides the bootstrap roots).
        assert_eq!(h.ca.requests(), vec![None, Some(bundle(&[&a, &b]))]);
    }

    #[tokio::test(start_paused = true)]
    async fn new_generation_reissues_once_within_the_jitter() {
        let (a, b) = (TestCa::new("a.test"), TestCa::new("b.test"));
        let fake = FakeCa::default();
        fake.answer(Ok(certified(&a, 1)));
        fake.answer(Ok(certified(&b, 2)));
        // Discovery announces 3 but the CA still signs as 2 (mid-switch): one try only.
        fake.answer(Ok(certified(&b, 2)));
        let mut h = Harness::start(fake);
        let first = h.next(Duration::from_secs(1)).await;

        // Bundle first (at once, same leaf), then the new generation's leaf.
        let t0 = Instant::now();
        h.push(trust(&[&a, &b], 2));
        let swapped = h.next(Duration::from_secs(1)).await;
        assert_eq!(
            (swapped.svid.chain(), swapped.ca_generation),
            (first.svid.chain(), 1)
        );
        let reissued = h.next(REISSUE_JITTER_MAX + Duration::from_secs(1)).await;
        assert!(t0.elapsed() <= REISSUE_JITTER_MAX, "{:?}", t0.elapsed());
        assert_eq!(reissued.ca_generation, 2);
        assert_ne!(reissued.svid.chain(), first.svid.chain());
        assert_eq!(reissued.bundle, bundle(&[&a, &b]));
        assert_eq!(h.metric("trellis_proxy_ca_generation"), "2");
        assert_eq!(h.ca.requests().len(), 2);

        // A view with the same generation does not re-issue again.
        h.push(trust(&[&a, &b], 2));
        assert!(h.quiet_for(30 * MINUTE).await);
        assert_eq!(h.ca.requests().len(), 2);

        h.push(trust(&[&a, &b], 3));
        let lagging = h.next(REISSUE_JITTER_MAX + Duration::from_secs(1)).await;
        assert_eq!(lagging.ca_generation, 2);
        assert!(h.quiet_for(30 * MINUTE).await, "re-issued in a loop");
        assert_eq!(h.ca.requests().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_reissue_keeps_the_old_certificate_and_backs_off() {
        let a = TestCa::new("a.test");
        let fake = FakeCa::default();
        fake.answer(Ok(certified(&a, 1)));
        fake.answer(Err(refused()));
        fake.answer(Err(refused()));
        fake.answer(Ok(certified(&a, 2)));
        let mut h = Harness::start(fake);
        let first = h.next(Duration::from_secs(1)).await;

        let t0 = Instant::now();
        // Same roots, new generation: nothing to swap, a leaf to re-issue.
        h.push(trust(&[&a], 2));
        let reissued = h.next(10 * Duration::from_secs(1)).await;
        let took = t0.elapsed();
        // Jitter, then two failures backing off 100..150 ms and 200..300 ms. The first
        // change published is the new leaf: the old one served until then.
        assert!(
            took >= Duration::from_millis(300)
                && took <= REISSUE_JITTER_MAX + Duration::from_millis(450),
            "{took:?}"
        );
        assert_eq!(reissued.ca_generation, 2);
        assert_ne!(reissued.svid.chain(), first.svid.chain());
        assert_eq!(h.ca.requests().len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn first_certificate_is_retried_until_the_ca_answers() {
        let a = TestCa::new("a.test");
        let fake = FakeCa::default();
        fake.answer(Err(refused()));
        fake.answer(Ok(certified(&a, 0)));
        let mut h = Harness::start(fake);
        let c = h.next(Duration::from_secs(1)).await;
        assert_eq!(c.ca_generation, 0);
        // A control plane that neither numbers generations nor pushes a bundle.
        h.push(Trust::default());
        assert!(h.quiet_for(30 * MINUTE).await);
        assert_eq!(h.ca.requests().len(), 2);
    }

    #[test]
    fn renewal_fraction_is_between_65_and_75_percent() {
        assert_eq!(renew_fraction(0.0), RENEW_MIN_FRACTION);
        assert_eq!(renew_fraction(1.0), RENEW_MAX_FRACTION);
        assert!((renew_fraction(0.5) - 0.70).abs() < 1e-12);
        for out_of_range in [-1.0, f64::NAN, f64::NEG_INFINITY] {
            assert_eq!(renew_fraction(out_of_range), RENEW_MIN_FRACTION);
        }
        assert_eq!(renew_fraction(7.0), RENEW_MAX_FRACTION);
        for _ in 0..1000 {
            let f = renew_fraction(rand::random());
            assert!(
                (RENEW_MIN_FRACTION..=RENEW_MAX_FRACTION).contains(&f),
                "{f}"
            );
        }
    }

    #[test]
    fn renews_at_the_fraction_of_the_lifetime() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let na = nb + Duration::from_secs(100);
        assert_eq!(
            renew_at(nb, na, renew_fraction(0.0)),
            nb + Duration::from_secs(65)
        );
        assert_eq!(
            renew_at(nb, na, renew_fraction(1.0)),
            nb + Duration::from_secs(75)
        );
        assert_eq!(renew_at(nb, na, 0.7), nb + Duration::from_secs(70));
        // A certificate that ends before it starts renews immediately.
        assert_eq!(renew_at(na, nb, 0.7), na);
    }

    #[test]
    fn reissue_jitter_is_at_most_two_seconds() {
        assert_eq!(reissue_jitter(0.0), Duration::ZERO);
        assert_eq!(reissue_jitter(1.0), Duration::from_secs(2));
        assert_eq!(reissue_jitter(0.25), Duration::from_millis(500));
        assert_eq!(reissue_jitter(f64::NAN), Duration::ZERO);
        assert_eq!(reissue_jitter(3.0), Duration::from_secs(2));
        for _ in 0..1000 {
            assert!(reissue_jitter(rand::random()) <= REISSUE_JITTER_MAX);
        }
    }

    #[test]
    fn reissue_only_for_a_new_greater_generation() {
        // (announced, leaf, announced when the leaf was requested, re-issue?)
        let cases = [
            (0, 0, 0, false),
            (1, 1, 0, false),
            (2, 1, 0, true),
            (2, 1, 1, true),
            // Already asked while 2 was announced and got 1: no loop.
            (2, 1, 2, false),
            // A later generation asks again.
            (3, 1, 2, true),
            (1, 2, 0, false),
            (5, 0, 0, true),
        ];
        for (announced, leaf, at_request, want) in cases {
            assert_eq!(
                should_reissue(announced, leaf, at_request),
                want,
                "announced {announced}, leaf {leaf}, at request {at_request}"
            );
        }
    }

    #[test]
    fn bundle_changes_are_detected_and_parsed() {
        let (a, b) = (TestCa::new("a.test"), TestCa::new("b.test"));
        let current = bundle(&[&a, &b]);
        let new = |got: BundleUpdate| match got {
            BundleUpdate::New(bundle) => Some(bundle),
            other => panic!("expected a new bundle, got {other:?}"),
        };
        assert!(matches!(
            bundle_update(Some(&current), &trust(&[&a, &b], 1)),
            BundleUpdate::Unchanged
        ));
        // The generation is not part of the roots.
        assert!(matches!(
            bundle_update(Some(&current), &trust(&[&a, &b], 9)),
            BundleUpdate::Unchanged
        ));
        assert!(matches!(
            bundle_update(Some(&current), &Trust::default()),
            BundleUpdate::Unchanged
        ));
        assert!(matches!(
            bundle_update(None, &Trust::default()),
            BundleUpdate::Unchanged
        ));
        assert_eq!(
            new(bundle_update(Some(&current), &trust(&[&b], 1))),
            Some(bundle(&[&b]))
        );
        assert_eq!(
            new(bundle_update(Some(&current), &trust(&[&b, &a], 1))),
            Some(bundle(&[&b, &a]))
        );
        assert_eq!(
            new(bundle_update(None, &trust(&[&a], 1))),
            Some(bundle(&[&a]))
        );
        let garbage = Trust {
            roots_der: vec![b"\x30\x00".to_vec()],
            generation: 1,
        };
        assert!(matches!(
            bundle_update(Some(&current), &garbage),
            BundleUpdate::Invalid(trellis_identity::Error::BadRoot { index: 0, .. })
        ));
    }

    #[test]
    fn control_plane_is_verified_against_bootstrap_and_latest_roots() {
        let (a, b) = (TestCa::new("a.test"), TestCa::new("b.test"));
        let boot = bundle(&[&a]);
        assert_eq!(control_plane_roots(&boot, None).unwrap(), boot);
        assert_eq!(
            control_plane_roots(&boot, Some(&bundle(&[&b]))).unwrap(),
            bundle(&[&a, &b])
        );
        assert_eq!(
            control_plane_roots(&boot, Some(&bundle(&[&b, &a]))).unwrap(),
            bundle(&[&a, &b])
        );
    }

    #[test]
    fn with_bundle_keeps_the_leaf_and_generation() {
        let (a, b) = (TestCa::new("a.test"), TestCa::new("b.test"));
        let c = certified(&a, 4);
        let swapped = c.with_bundle(bundle(&[&a, &b])).unwrap();
        assert_eq!(swapped.svid.chain(), c.svid.chain());
        assert_eq!(swapped.ca_generation, 4);
        assert_eq!(swapped.bundle, bundle(&[&a, &b]));
        let debug = format!("{swapped:?}");
        assert!(
            debug.ends_with("roots: 2, ca_generation: 4, .. }"),
            "{debug}"
        );
    }

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_wait();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(150));
        for _ in 0..20 {
            assert!(b.next_wait() <= Duration::from_secs(15));
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(150));
    }
}
