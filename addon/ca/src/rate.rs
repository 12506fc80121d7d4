//! Per-identity rate limiting of certificate requests: one token bucket per SPIFFE id.
//!
//! The limit exists so that one workload (a crash-looping pod, a compromised service
//! account hammering `Certify`) cannot take the CA's CPU from every other workload. It is
//! keyed by the identity a verified token proved, so a caller cannot spread its requests
//! over made-up identities, and the number of buckets is bounded by the number of service
//! accounts that actually hold tokens (and by [`RateLimit::with_max_identities`]).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::Error;

/// Requests one identity may make at once before the refill rate applies.
///
/// Generous on purpose: when the CA generation changes every pod of a service account
/// re-issues within ~2 s (the proxies' 0-2 s jitter), and one Deployment may have hundreds
/// of replicas sharing one service account; all of them must get through at once.
pub const DEFAULT_RATE_LIMIT_BURST: u32 = 1000;
/// Requests per second one identity regains once its burst is spent. 50/s refills a full
/// burst in 20 s, and sustains a renewal every ~70% of a 24 h lifetime for millions of
/// pods per service account: only a misbehaving caller ever meets it.
pub const DEFAULT_RATE_LIMIT_PER_SECOND: f64 = 50.0;
/// Identities tracked at most. A bucket costs ~100 bytes, so the cap holds memory near
/// 1 MiB; full (idle) buckets are dropped first, as a fresh bucket is identical to them.
pub const DEFAULT_MAX_TRACKED_IDENTITIES: usize = 10_000;

/// Rate-limit settings for certificate requests, per identity: a token bucket holding
/// `burst` requests, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    burst: u32,
    per_second: f64,
    max_identities: usize,
}

/// The buckets behind a [`RateLimit`].
#[derive(Debug)]
pub(crate) struct Limiter {
    limit: RateLimit,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    /// Whether the last request was refused.
    limited: bool,
}

/// A refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limited {
    /// How long until the next request would be allowed.
    pub(crate) retry_after: Duration,
    /// The first refusal since this identity was last allowed a request: worth a log
    /// line; the ones after it are only counted, so a hammering caller cannot flood the
    /// log.
    pub(crate) first: bool,
}

// === impl RateLimit ===

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            burst: DEFAULT_RATE_LIMIT_BURST,
            per_second: DEFAULT_RATE_LIMIT_PER_SECOND,
            max_identities: DEFAULT_MAX_TRACKED_IDENTITIES,
        }
    }
}

impl RateLimit {
    /// A limit of `burst` requests at once per identity, refilled at `per_second`
    /// (fractions allowed). Both must be positive.
    pub fn new(burst: u32, per_second: f64) -> Result<Self, Error> {
        if burst == 0 {
            return Err(Error::Config(
                "rate-limit burst must be at least 1".to_owned(),
            ));
        }
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(Error::Config(format!(
                "rate-limit refill must be a positive number of requests per second, got {per_second}"
            )));
        }
        Ok(Self {
            burst,
            per_second,
            ..Self::default()
        })
    }

    /// Caps the number of identities tracked at once (at least 1; default
    /// [`DEFAULT_MAX_TRACKED_IDENTITIES`]). Past it, idle buckets are dropped, then the
    /// least recently used: that identity starts again from a full bucket.
    pub fn with_max_identities(mut self, max: usize) -> Self {
        self.max_identities = max.max(1);
        self
    }

    /// Requests one identity may make at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Requests per second regained.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// The most identities tracked at once.
    pub fn max_identities(&self) -> usize {
        self.max_identities
    }
}

// === impl Limiter ===

impl Limiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one request from `identity`'s bucket at `now`, or refuses it when the bucket
    /// is empty.
    pub(crate) fn check(&self, identity: &str, now: Instant) -> Result<(), Limited> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = buckets.get_mut(identity) {
            return bucket.take(&self.limit, now);
        }
        if buckets.len() >= self.limit.max_identities {
            self.evict(&mut buckets, now);
        }
        let mut bucket = Bucket {
            tokens: f64::from(self.limit.burst),
            updated: now,
            limited: false,
        };
        let taken = bucket.take(&self.limit, now);
        buckets.insert(identity.to_owned(), bucket);
        taken
    }

    /// Identities tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Makes room for one more bucket: drops every bucket that has refilled completely
    /// (forgetting it changes nothing), and if none has, the least recently used one.
    fn evict(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        let limit = self.limit;
        buckets.retain(|_, b| b.level(&limit, now) < f64::from(limit.burst));
        if buckets.len() < limit.max_identities {
            return;
        }
        let oldest = buckets
            .iter()
            .min_by_key(|(_, b)| b.updated)
            .map(|(k, _)| k.clone());
        if let Some(key) = oldest {
            buckets.remove(&key);
        }
    }
}

// === impl Bucket ===

impl Bucket {
    /// The tokens in the bucket at `now`.
    fn level(&self, limit: &RateLimit, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed * limit.per_second).min(f64::from(limit.burst))
    }

    fn take(&mut self, limit: &RateLimit, now: Instant) -> Result<(), Limited> {
        self.tokens = self.level(limit, now);
        self.updated = now;
        let was_limited = std::mem::replace(&mut self.limited, self.tokens < 1.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Limited {
                retry_after: Duration::from_secs_f64((1.0 - self.tokens) / limit.per_second),
                first: !was_limited,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn burst_then_refill() {
        let limiter = Limiter::new(RateLimit::new(3, 2.0).unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check("a", t0).unwrap();
        }
        let refused = limiter.check("a", t0).unwrap_err();
        assert_eq!(
            refused,
            Limited {
                retry_after: SEC / 2,
                first: true
            },
            "one request regained every 500 ms"
        );
        assert!(!limiter.check("a", t0 + SEC / 4).unwrap_err().first);
        // Other identities have their own bucket.
        limiter.check("b", t0).unwrap();
        // Half a second later exactly one more request is allowed.
        limiter.check("a", t0 + SEC / 2).unwrap();
        let refused = limiter.check("a", t0 + SEC / 2).unwrap_err();
        assert!(refused.first, "allowed in between, so logged again");
        // The bucket never holds more than the burst.
        let later = t0 + 3600 * SEC;
        for _ in 0..3 {
            limiter.check("a", later).unwrap();
        }
        assert!(limiter.check("a", later).is_err());
    }

    #[test]
    fn refused_requests_do_not_go_into_debt() {
        let limiter = Limiter::new(RateLimit::new(1, 1.0).unwrap());
        let t0 = Instant::now();
        limiter.check("a", t0).unwrap();
        for _ in 0..100 {
            assert!(limiter.check("a", t0).is_err());
        }
        limiter.check("a", t0 + SEC).unwrap();
    }

    #[test]
    fn tracked_identities_are_bounded_idle_ones_first() {
        let limit = RateLimit::new(2, 1.0).unwrap().with_max_identities(2);
        let limiter = Limiter::new(limit);
        let t0 = Instant::now();
        limiter.check("idle", t0).unwrap();
        limiter.check("busy", t0 + 2 * SEC).unwrap();
        limiter.check("busy", t0 + 2 * SEC).unwrap();
        // At t0+2s "idle" has refilled and is dropped; "busy" keeps its empty bucket.
        limiter.check("new", t0 + 2 * SEC).unwrap();
        assert_eq!(limiter.tracked(), 2);
        assert!(limiter.check("busy", t0 + 2 * SEC).is_err());
        // No idle bucket: the least recently used one goes.
        limiter.check("new", t0 + 2 * SEC).unwrap();
        limiter.check("third", t0 + 2 * SEC).unwrap();
        assert_eq!(limiter.tracked(), 2);
    }

    #[test]
    fn settings_are_validated() {
        assert!(RateLimit::new(0, 1.0).is_err());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(RateLimit::new(1, bad).is_err(), "{bad}");
        }
        let d = RateLimit::default();
        assert_eq!((d.burst(), d.per_second()), (1000, 50.0));
        assert_eq!(
            RateLimit::default().with_max_identities(0).max_identities(),
            1
        );
    }
}
