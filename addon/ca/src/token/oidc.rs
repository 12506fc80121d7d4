//! Verifying projected ServiceAccount tokens against the cluster's OIDC issuer: the
//! AKS / kind way, with no TokenReview call and no Kubernetes client.
//!
//! The API server publishes its token-signing keys at
//! `<issuer>/.well-known/openid-configuration` → `jwks_uri`. [`OidcVerifier`] fetches them
//! over HTTPS, caches them, and checks tokens with the same rules as [`JwksVerifier`]
//! (issuer, audience, expiry, the `kubernetes.io` claims), accepting RS256 as well as
//! ES256 since that is what clusters sign with.
//!
//! Keys are refetched when they are older than the refresh interval (10 min by default)
//! and when a token names an unknown `kid` (the issuer rotated its key), at most once per
//! 30 s so that a stream of made-up key ids cannot turn the CA into a load generator
//! against the API server. Fetches are serialised: a burst of requests after a rotation
//! causes one fetch. If a refresh fails, the cached keys keep working; a token whose key
//! cannot be known without the issuer gets [`TokenError::Unavailable`] (retryable), not a
//! refusal.
//!
//! [`JwksVerifier`]: super::JwksVerifier

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;
use tracing::{info, warn};

use super::https::{HttpsClient, parse_https_url};
use super::jwks::{Algorithms, KeySet, Rules};
use super::{Caller, TokenError, TokenVerifier, VerifyFuture};

/// How long fetched keys are used before they are fetched again.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(10 * 60);
/// The least time between two fetches prompted by unknown key ids or failed refreshes.
pub const DEFAULT_MIN_REFETCH: Duration = Duration::from_secs(30);
/// How long one HTTPS request may take.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// While no key was ever fetched every token waits on the issuer, so retry sooner than
/// [`DEFAULT_MIN_REFETCH`] (but not per request).
const NO_KEYS_RETRY: Duration = Duration::from_secs(1);

/// Where and how [`OidcVerifier`] gets its keys.
#[derive(Clone)]
pub struct OidcConfig {
    issuer: String,
    audience: String,
    extra_roots_pem: Option<String>,
    refresh_interval: Duration,
    min_refetch_interval: Duration,
    fetch_timeout: Duration,
}

/// Verifies ServiceAccount tokens against the keys the cluster's OIDC issuer publishes.
/// See the module docs for when keys are fetched.
pub struct OidcVerifier {
    rules: Rules,
    discovery_url: String,
    client: HttpsClient,
    refresh_interval: Duration,
    min_refetch_interval: Duration,
    cache: Mutex<Cache>,
    /// Held while fetching, so concurrent misses cause one fetch.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Cache {
    keys: Option<Arc<KeySet>>,
    /// When `keys` were fetched.
    fetched_at: Option<Instant>,
    /// When the last fetch, successful or not, ended.
    attempted_at: Option<Instant>,
    /// Why the last fetch failed; `None` after a success.
    last_error: Option<String>,
    /// Fetches so far: tells a waiter whether someone fetched while it waited.
    attempts: u64,
}

/// The part of an OpenID Provider configuration document we read.
#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

// === impl OidcConfig ===

impl OidcConfig {
    /// Tokens must carry `iss` equal to `issuer` (an `https://` URL, also where discovery
    /// starts) and `audience` in `aud`.
    pub fn new(issuer: &str, audience: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            extra_roots_pem: None,
            refresh_interval: DEFAULT_JWKS_REFRESH,
            min_refetch_interval: DEFAULT_MIN_REFETCH,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }

    /// Also trusts the certificates in `pem` for the issuer's HTTPS (a private issuer, or
    /// the API server's own CA on kind). The system's roots stay trusted.
    pub fn with_extra_roots_pem(mut self, pem: &str) -> Self {
        self.extra_roots_pem = Some(pem.to_owned());
        self
    }

    /// How long fetched keys are used before they are fetched again (default
    /// [`DEFAULT_JWKS_REFRESH`]).
    pub fn with_refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    /// The least time between fetches prompted by an unknown key id or a failed
    /// refresh (default [`DEFAULT_MIN_REFETCH`]).
    pub fn with_min_refetch_interval(mut self, interval: Duration) -> Self {
        self.min_refetch_interval = interval;
        self
    }

    /// How long one HTTPS request may take (default [`DEFAULT_FETCH_TIMEOUT`]).
    pub fn with_fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }
}

impl fmt::Debug for OidcConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("extra_roots", &self.extra_roots_pem.is_some())
            .field("refresh_interval", &self.refresh_interval)
            .field("min_refetch_interval", &self.min_refetch_interval)
            .field("fetch_timeout", &self.fetch_timeout)
            .finish()
    }
}

// === impl OidcVerifier ===

impl OidcVerifier {
    /// Checks the configuration and builds the HTTPS client. Does no I/O: keys are
    /// fetched by [`OidcVerifier::refresh`] or by the first token that needs them.
    pub fn new(config: OidcConfig) -> Result<Self, TokenError> {
        parse_https_url(&config.issuer)
            .map_err(|e| TokenError::Config(format!("OIDC issuer {:?}: {e}", config.issuer)))?;
        if config.issuer.contains('?') {
            return Err(TokenError::Config(format!(
                "OIDC issuer {:?}: must not carry a query",
                config.issuer
            )));
        }
        let rules = Rules::new(&config.issuer, &config.audience, Algorithms::Kubernetes)?;
        let client = HttpsClient::new(config.extra_roots_pem.as_deref(), config.fetch_timeout)?;
        // OpenID Connect Discovery §4: the issuer without its trailing slash, then the
        // well-known path.
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            config.issuer.trim_end_matches('/')
        );
        Ok(Self {
            rules,
            discovery_url,
            client,
            refresh_interval: config.refresh_interval,
            min_refetch_interval: config.min_refetch_interval,
            cache: Mutex::new(Cache::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The trusted issuer.
    pub fn issuer(&self) -> &str {
        self.rules.issuer()
    }

    /// Fetches the issuer's keys now (at startup, to report a misconfiguration early),
    /// returning their key ids. On failure the keys cached before, if any, stay in use.
    pub async fn refresh(&self) -> Result<Vec<String>, TokenError> {
        let seen = self.cache().attempts;
        let keys = self.fetch(seen).await?;
        Ok(keys.key_ids().into_iter().map(str::to_owned).collect())
    }

    /// The key ids in use now, sorted (empty before the first successful fetch).
    pub fn key_ids(&self) -> Vec<String> {
        self.cache().keys.as_ref().map_or_else(Vec::new, |k| {
            k.key_ids().into_iter().map(str::to_owned).collect()
        })
    }

    async fn verify_async(&self, token: &str) -> Result<Caller, TokenError> {
        // Garbage never causes a fetch.
        self.rules.precheck(token)?;
        let keys = self.usable_keys().await?;
        match self.rules.verify(&keys, token) {
            Err(TokenError::UnknownKey) => {}
            other => return other,
        }
        // A key id we do not know: the issuer may have rotated its key since we fetched.
        match self.keys_after_unknown_kid(&keys).await? {
            Some(fresh) => self.rules.verify(&fresh, token),
            None => Err(TokenError::UnknownKey),
        }
    }

    /// The keys to verify with: the cached ones while fresh, else freshly fetched ones
    /// (or the cached ones still, when the fetch fails or was tried too recently).
    async fn usable_keys(&self) -> Result<Arc<KeySet>, TokenError> {
        let now = Instant::now();
        let (cached, seen, due) = {
            let cache = self.cache();
            if let (Some(keys), Some(at)) = (&cache.keys, cache.fetched_at)
                && now.saturating_duration_since(at) < self.refresh_interval
            {
                return Ok(keys.clone());
            }
            // Stale keys after a successful fetch: refresh now. After a failure, wait
            // before trying again (less long while there are no keys at all).
            let pause = match (&cache.keys, &cache.last_error) {
                (_, None) => Duration::ZERO,
                (Some(_), Some(_)) => self.min_refetch_interval,
                (None, Some(_)) => NO_KEYS_RETRY.min(self.min_refetch_interval),
            };
            (
                cache.keys.clone(),
                cache.attempts,
                cache.may_attempt(now, pause),
            )
        };
        if due {
            match (self.fetch(seen).await, cached) {
                (Ok(keys), _) => return Ok(keys),
                // `fetch` logged the failure; the cached keys stay in use until a
                // refresh succeeds (an issuer outage does not stop certificate issuance).
                (Err(_), Some(keys)) => return Ok(keys),
                (Err(e), None) => return Err(e),
            }
        }
        cached.ok_or_else(|| self.cache().unavailable())
    }

    /// After `keys` did not hold a token's key id: newer keys, if someone fetched them
    /// meanwhile or a fetch is allowed now; `None` when fetching again is not allowed yet
    /// and the last fetch succeeded (the key id is then simply unknown).
    async fn keys_after_unknown_kid(
        &self,
        keys: &Arc<KeySet>,
    ) -> Result<Option<Arc<KeySet>>, TokenError> {
        let now = Instant::now();
        let seen = {
            let cache = self.cache();
            if let Some(current) = &cache.keys
                && !Arc::ptr_eq(current, keys)
            {
                return Ok(Some(current.clone()));
            }
            if !cache.may_attempt(now, self.min_refetch_interval) {
                // Unknown to an issuer we cannot reach is not "unknown".
                return match cache.last_error {
                    Some(_) => Err(cache.unavailable()),
                    None => Ok(None),
                };
            }
            cache.attempts
        };
        self.fetch(seen).await.map(Some)
    }

    /// Fetches the keys, unless another fetch ended since `seen` attempts: then its
    /// outcome is used.
    async fn fetch(&self, seen: u64) -> Result<Arc<KeySet>, TokenError> {
        let _one_at_a_time = self.fetching.lock().await;
        {
            let cache = self.cache();
            if cache.attempts != seen {
                return match (&cache.keys, &cache.last_error) {
                    (Some(keys), None) => Ok(keys.clone()),
                    _ => Err(cache.unavailable()),
                };
            }
        }
        let result = self.download().await;
        let mut cache = self.cache();
        let now = Instant::now();
        cache.attempts += 1;
        cache.attempted_at = Some(now);
        match result {
            Ok(keys) => {
                let keys = Arc::new(keys);
                let changed = cache
                    .keys
                    .as_ref()
                    .is_none_or(|old| old.key_ids() != keys.key_ids());
                if changed {
                    info!(issuer = %self.issuer(), kids = ?keys.key_ids(), "OIDC issuer keys loaded");
                }
                cache.keys = Some(keys.clone());
                cache.fetched_at = Some(now);
                cache.last_error = None;
                Ok(keys)
            }
            Err(e) => {
                warn!(issuer = %self.issuer(), error = %e, "fetching the OIDC issuer keys failed");
                cache.last_error = Some(e.clone());
                Err(TokenError::Unavailable(format!("OIDC issuer keys: {e}")))
            }
        }
    }

    /// Discovery document, then the JWKS it points at.
    async fn download(&self) -> Result<KeySet, String> {
        let body = self.client.get(&self.discovery_url).await?;
        let doc: Discovery = serde_json::from_slice(&body)
            .map_err(|e| format!("{} is not an OpenID configuration: {e}", self.discovery_url))?;
        // OpenID Connect Discovery §4.3: the document must name the issuer it was
        // fetched for, exactly; anything else is a misconfiguration or an impostor.
        if doc.issuer != self.issuer() {
            return Err(format!(
                "{} names issuer {:?}, expected {:?}",
                self.discovery_url,
                doc.issuer,
                self.issuer()
            ));
        }
        parse_https_url(&doc.jwks_uri).map_err(|e| format!("jwks_uri {:?}: {e}", doc.jwks_uri))?;
        let body = self.client.get(&doc.jwks_uri).await?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| format!("JWKS at {} is not UTF-8", doc.jwks_uri))?;
        KeySet::parse(text, Algorithms::Kubernetes)
            .map_err(|e| format!("JWKS at {}: {e}", doc.jwks_uri))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl TokenVerifier for OidcVerifier {
    fn verify<'a>(&'a self, token: &'a str) -> VerifyFuture<'a> {
        Box::pin(self.verify_async(token))
    }
}

impl fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuer", &self.issuer())
            .field("kids", &self.key_ids())
            .finish_non_exhaustive()
    }
}

// === impl Cache ===

impl Cache {
    /// The error for "no usable keys": why the last fetch failed. A method on the locked
    /// cache, never one that locks it: the mutex is not reentrant.
    fn unavailable(&self) -> TokenError {
        TokenError::Unavailable(format!(
            "OIDC issuer keys: {}",
            self.last_error.as_deref().unwrap_or("not fetched yet")
        ))
    }

    /// Whether a fetch may start at `now`, `pause` after the last one ended.
    fn may_attempt(&self, now: Instant, pause: Duration) -> bool {
        self.attempted_at
            .is_none_or(|at| now.saturating_duration_since(at) >= pause)
    }
}
