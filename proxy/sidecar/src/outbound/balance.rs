//! Endpoint choice: peak-EWMA power of two choices, as in Finagle, Linkerd and
//! `tower::load::PeakEwma`. Pure apart from the clock, so it is tested without sockets.
//!
//! Each endpoint has a cost `rtt_estimate * (pending + 1)`. The RTT estimate jumps to
//! any observation above it (peak-sensitive: one slow answer makes an endpoint expensive
//! at once) and otherwise moves towards observations, and towards zero while idle, with
//! an exponential decay of time constant [`DEFAULT_DECAY`] (so an endpoint that was slow
//! gets probed again). An endpoint never seen starts at [`DEFAULT_RTT`]. A pick samples
//! two distinct candidates at random and takes the cheaper: nearly as good as scanning
//! every endpoint, O(1), and it avoids the herd that "always the cheapest" causes when
//! many proxies share stale costs.
//!
//! ```text
//! pick(candidates) -> endpoint;  start(addr) -> InFlight (pending += 1)
//! InFlight::finish() records the RTT;  dropping an InFlight only releases pending
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use trellis_api::Endpoint;

/// Time constant of the RTT decay (Linkerd and Finagle use 10 s).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// RTT assumed for an endpoint with no observation yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// An endpoint nobody sampled, started or finished for this long, with nothing in
/// flight, is forgotten: after six time constants its estimate is noise anyway.
const STALE_AFTER: Duration = Duration::from_secs(60);
/// How often a pick looks for stale entries (bounds the sweep's cost per pick).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Peak-EWMA power-of-two-choices balancer over endpoints keyed by address. Shared by
/// every request (`Send + Sync`); one instance can serve all services, since load
/// belongs to the peer proxy at an address, whatever service it was picked for.
#[derive(Debug)]
pub struct Balancer {
    decay_ns: f64,
    default_rtt_ns: f64,
    state: Mutex<State>,
    rng: AtomicU64,
}

/// A request in flight to an endpoint, from [`Balancer::start`]. Counts as pending
/// until dropped; [`InFlight::finish`] also records its RTT.
#[derive(Debug)]
#[must_use = "dropping an InFlight ends the request without recording its RTT"]
pub struct InFlight {
    load: Arc<Load>,
    decay_ns: f64,
    started: Instant,
}

#[derive(Debug)]
struct State {
    loads: HashMap<SocketAddr, Arc<Load>>,
    swept: Instant,
}

/// One endpoint's load; in-flight requests hold it too, so an endpoint removed from the
/// map while requests are in flight is still released correctly.
#[derive(Debug)]
struct Load {
    pending: AtomicUsize,
    rtt: Mutex<Rtt>,
}

#[derive(Debug, Clone, Copy)]
struct Rtt {
    /// Estimate in nanoseconds.
    ns: f64,
    /// When `ns` was last updated.
    at: Instant,
    /// Last time this endpoint was sampled, started or finished (for staleness).
    used: Instant,
}

// === impl Balancer ===

impl Balancer {
    /// A balancer with the default decay and a randomly seeded RNG.
    pub fn new() -> Self {
        Self::with_seed(rand::random())
    }

    /// A balancer whose random choices follow `seed`, for reproducible tests.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            decay_ns: nanos(DEFAULT_DECAY),
            default_rtt_ns: nanos(DEFAULT_RTT),
            state: Mutex::new(State {
                loads: HashMap::new(),
                swept: Instant::now(),
            }),
            rng: AtomicU64::new(seed),
        }
    }

    /// Sets the time constant of the RTT decay (default [`DEFAULT_DECAY`]); a zero
    /// duration is raised to 1 ns (no memory at all) rather than dividing by zero.
    pub fn with_decay(mut self, decay: Duration) -> Self {
        self.decay_ns = nanos(decay).max(1.0);
        self
    }

    /// Picks one of `candidates`: the cheaper of two distinct ones sampled at random;
    /// the only one when there is one; `None` when there are none.
    pub fn pick<'a>(&self, candidates: &'a [Endpoint]) -> Option<&'a Endpoint> {
        self.pick_at(candidates, Instant::now())
    }

    /// Marks a request to `addr` as started: it counts as pending until the returned
    /// guard is dropped, and [`InFlight::finish`] records its round-trip time.
    pub fn start(&self, addr: SocketAddr) -> InFlight {
        self.start_at(addr, Instant::now())
    }

    /// Forgets every endpoint not in `live` (call it when discovery changes). Requests
    /// in flight to a forgotten endpoint still finish normally.
    pub fn retain(&self, live: &[SocketAddr]) {
        self.lock().loads.retain(|addr, _| live.contains(addr));
    }

    fn pick_at<'a>(&self, candidates: &'a [Endpoint], now: Instant) -> Option<&'a Endpoint> {
        let (i, j) = match candidates.len() {
            0 => return None,
            1 => return candidates.first(),
            n => {
                let r = self.next_random();
                // Two distinct indexes: the second skips over the first.
                let i = (r % n as u64) as usize;
                let j = ((r >> 32) % (n as u64 - 1)) as usize;
                (i, if j >= i { j + 1 } else { j })
            }
        };
        let (a, b) = (&candidates[i], &candidates[j]);
        let (la, lb) = {
            let mut state = self.lock();
            self.sweep(&mut state, now);
            (
                self.load(&mut state, a.address, now),
                self.load(&mut state, b.address, now),
            )
        };
        let (ca, cb) = (self.cost(&la, now), self.cost(&lb, now));
        Some(if cb < ca { b } else { a })
    }

    fn start_at(&self, addr: SocketAddr, now: Instant) -> InFlight {
        let load = self.load(&mut self.lock(), addr, now);
        load.pending.fetch_add(1, Ordering::AcqRel);
        lock(&load.rtt).used = now;
        InFlight {
            load,
            decay_ns: self.decay_ns,
            started: now,
        }
    }

    /// `rtt * (pending + 1)`, decaying the estimate to `now` first (tower does the same,
    /// so an idle endpoint's estimate drifts down and it is tried again).
    fn cost(&self, load: &Load, now: Instant) -> f64 {
        let pending = load.pending.load(Ordering::Acquire);
        let mut rtt = lock(&load.rtt);
        rtt.observe(0.0, now, self.decay_ns);
        rtt.used = now;
        rtt.ns * (pending as f64 + 1.0)
    }

    fn load(&self, state: &mut State, addr: SocketAddr, now: Instant) -> Arc<Load> {
        state
            .loads
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(Load {
                    pending: AtomicUsize::new(0),
                    rtt: Mutex::new(Rtt {
                        ns: self.default_rtt_ns,
                        at: now,
                        used: now,
                    }),
                })
            })
            .clone()
    }

    /// Drops entries that are idle and unused for [`STALE_AFTER`]: endpoints that left
    /// every candidate list without a [`Balancer::retain`] call.
    fn sweep(&self, state: &mut State, now: Instant) {
        if now.saturating_duration_since(state.swept) < SWEEP_EVERY {
            return;
        }
        state.swept = now;
        state.loads.retain(|_, load| {
            load.pending.load(Ordering::Acquire) > 0
                || now.saturating_duration_since(lock(&load.rtt).used) < STALE_AFTER
        });
    }

    /// splitmix64 over an atomic counter: lock-free, fast, and good enough to spread
    /// choices (not for anything secret).
    fn next_random(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new()
    }
}

// === impl InFlight ===

impl InFlight {
    /// The request got its answer: records the time since [`Balancer::start`] as an
    /// RTT observation, then releases the pending count.
    pub fn finish(self) {
        self.finish_at(Instant::now());
    }

    fn finish_at(self, now: Instant) {
        let rtt = nanos(now.saturating_duration_since(self.started));
        let mut est = lock(&self.load.rtt);
        est.observe(rtt, now, self.decay_ns);
        est.used = now;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl Rtt ===

impl Rtt {
    /// Peak-EWMA update: an observation above the estimate replaces it; one below moves
    /// the estimate towards it by `1 - e^(-elapsed/decay)`.
    fn observe(&mut self, rtt_ns: f64, now: Instant, decay_ns: f64) {
        if rtt_ns > self.ns {
            self.ns = rtt_ns;
        } else {
            let elapsed = nanos(now.saturating_duration_since(self.at));
            let w = (-elapsed / decay_ns).exp();
            self.ns = self.ns * w + rtt_ns * (1.0 - w);
        }
        self.at = self.at.max(now);
    }
}

fn nanos(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

/// A poisoned lock only means another request panicked mid-update of plain numbers;
/// the numbers are still usable, so balancing carries on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            identity: "spiffe://cluster.local/ns/demo/sa/web".into(),
            workload: format!("web-{port}"),
            labels: BTreeMap::new(),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn estimate(b: &Balancer, e: &Endpoint) -> Duration {
        let loads = &b.lock().loads;
        Duration::from_nanos(lock(&loads[&e.address].rtt).ns as u64)
    }

    #[test]
    fn balancer_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Balancer>();
        assert_send_sync::<InFlight>();
    }

    #[test]
    fn no_candidates_is_none_and_one_is_that_one() {
        let b = Balancer::with_seed(1);
        assert!(b.pick(&[]).is_none());
        let one = [ep(1)];
        for _ in 0..10 {
            assert_eq!(b.pick(&one).map(|e| e.address), Some(one[0].address));
        }
    }

    #[test]
    fn never_picks_outside_the_candidates() {
        let b = Balancer::with_seed(7);
        let all: Vec<Endpoint> = (1..=9).map(ep).collect();
        for n in 2..=all.len() {
            let candidates = &all[..n];
            for _ in 0..500 {
                let got = b.pick(candidates).expect("a candidate");
                assert!(
                    candidates.iter().any(|c| std::ptr::eq(c, got)),
                    "picked {} outside {n} candidates",
                    got.address
                );
            }
        }
    }

    #[test]
    fn samples_every_candidate_when_costs_are_equal() {
        let b = Balancer::with_seed(3);
        let eps: Vec<Endpoint> = (1..=4).map(ep).collect();
        let mut seen = HashMap::new();
        for _ in 0..400 {
            *seen.entry(b.pick(&eps).expect("pick").address).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
    }

    #[test]
    fn prefers_the_faster_endpoint_under_a_simulated_workload() {
        // fast answers in 5 ms, slow in 80 ms; requests arrive every 10 ms and overlap.
        let b = Balancer::with_seed(42);
        let (fast, slow) = (ep(1), ep(2));
        let eps = [fast.clone(), slow.clone()];
        let t0 = Instant::now();
        let mut in_flight: Vec<(Instant, InFlight)> = Vec::new();
        let mut picked_fast = 0;
        for i in 0..2_000u64 {
            let now = t0 + ms(10 * i);
            // Finish whatever is due by now, in completion order.
            in_flight.sort_by_key(|(due, _)| *due);
            while in_flight.first().is_some_and(|(due, _)| *due <= now) {
                let (due, f) = in_flight.remove(0);
                f.finish_at(due);
            }
            let e = b.pick_at(&eps, now).expect("pick");
            let latency = if e.address == fast.address {
                picked_fast += 1;
                ms(5)
            } else {
                ms(80)
            };
            in_flight.push((now + latency, b.start_at(e.address, now)));
        }
        let share = f64::from(picked_fast) / 2_000.0;
        assert!(share > 0.85, "fast endpoint got {share:.2} of requests");
        assert!(share < 1.0, "the slow endpoint must still be probed");
        assert!(estimate(&b, &slow) > estimate(&b, &fast));
    }

    #[test]
    fn pending_requests_make_an_endpoint_expensive() {
        let b = Balancer::with_seed(9);
        let (a, c) = (ep(1), ep(2));
        let eps = [a.clone(), c.clone()];
        let now = Instant::now();
        let busy: Vec<InFlight> = (0..3).map(|_| b.start_at(a.address, now)).collect();
        assert_eq!(
            b.lock().loads[&a.address].pending.load(Ordering::Acquire),
            3
        );
        for _ in 0..50 {
            assert_eq!(b.pick_at(&eps, now).map(|e| e.address), Some(c.address));
        }
        drop(busy);
        assert_eq!(
            b.lock().loads[&a.address].pending.load(Ordering::Acquire),
            0
        );
        let picks: Vec<_> = (0..200)
            .filter_map(|_| b.pick_at(&eps, now))
            .filter(|e| e.address == a.address)
            .collect();
        assert!(!picks.is_empty(), "released endpoint is picked again");
    }

    #[test]
    fn finish_and_drop_both_release_pending_once() {
        let b = Balancer::with_seed(2);
        let a = ep(1);
        let now = Instant::now();
        let f1 = b.start_at(a.address, now);
        let f2 = b.start_at(a.address, now);
        f1.finish_at(now + ms(50));
        assert_eq!(
            b.lock().loads[&a.address].pending.load(Ordering::Acquire),
            1
        );
        drop(f2);
        assert_eq!(
            b.lock().loads[&a.address].pending.load(Ordering::Acquire),
            0
        );
        // Dropped without finish: no RTT recorded beyond the 50 ms peak.
        assert_eq!(estimate(&b, &a), ms(50));
    }

    #[test]
    fn estimate_jumps_to_peaks_and_decays_towards_fast_answers() {
        let b = Balancer::with_seed(5).with_decay(Duration::from_secs(10));
        let a = ep(1);
        let t0 = Instant::now();
        b.start_at(a.address, t0).finish_at(t0 + ms(500));
        assert_eq!(estimate(&b, &a), ms(500), "one slow answer counts at once");
        // A fast answer one time constant later keeps ~e^-1 of the peak.
        let t1 = t0 + Duration::from_secs(10) + ms(500);
        b.start_at(a.address, t1 - ms(1)).finish_at(t1);
        let e = estimate(&b, &a).as_secs_f64();
        let want = 0.5 * (-1f64).exp() + 0.001 * (1.0 - (-1f64).exp());
        assert!((e - want).abs() < 0.002, "estimate {e} want {want}");
    }

    #[test]
    fn a_slow_endpoint_is_tried_again_once_its_peak_decays() {
        let b = Balancer::with_seed(11);
        let (slow, fresh) = (ep(1), ep(2));
        let t0 = Instant::now();
        b.start_at(slow.address, t0)
            .finish_at(t0 + Duration::from_secs(1));
        let eps = [slow.clone(), fresh.clone()];
        // Right after the peak the fresh endpoint (default 30 ms) wins.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.pick_at(&eps, t1).map(|e| e.address), Some(fresh.address));
        // Forget `fresh` so it comes back at the default RTT, then let `slow` idle for
        // five time constants: 1 s * e^-5 ~ 7 ms < 30 ms.
        b.retain(&[slow.address]);
        let t2 = t1 + Duration::from_secs(50);
        assert_eq!(b.pick_at(&eps, t2).map(|e| e.address), Some(slow.address));
    }

    #[test]
    fn retain_forgets_removed_endpoints() {
        let b = Balancer::with_seed(4);
        let (a, c) = (ep(1), ep(2));
        b.pick(&[a.clone(), c.clone()]);
        assert_eq!(b.lock().loads.len(), 2);
        let in_flight = b.start(c.address);
        b.retain(&[a.address]);
        assert!(!b.lock().loads.contains_key(&c.address));
        // A request that was in flight to the removed endpoint still ends cleanly.
        in_flight.finish();
        assert_eq!(b.lock().loads.len(), 1);
    }

    #[test]
    fn endpoints_absent_from_candidate_lists_are_dropped_after_a_while() {
        let b = Balancer::with_seed(8);
        let (a, c, d) = (ep(1), ep(2), ep(3));
        let t0 = Instant::now();
        b.pick_at(&[a.clone(), c.clone()], t0);
        let busy = b.start_at(d.address, t0);
        // Only `a` is a candidate from now on; `c` goes stale, `d` is kept while busy.
        let later = t0 + STALE_AFTER + SWEEP_EVERY;
        b.pick_at(&[a.clone(), ep(4)], later);
        let loads = b.lock().loads.keys().copied().collect::<Vec<_>>();
        assert!(!loads.contains(&c.address), "{loads:?}");
        assert!(loads.contains(&d.address), "{loads:?}");
        drop(busy);
        b.pick_at(&[a, ep(4)], later + STALE_AFTER + SWEEP_EVERY);
        assert!(!b.lock().loads.contains_key(&d.address));
    }

    #[test]
    fn same_seed_same_choices() {
        let eps: Vec<Endpoint> = (1..=5).map(ep).collect();
        let run = |seed| {
            let b = Balancer::with_seed(seed);
            let now = Instant::now();
            (0..50)
                .map(|_| b.pick_at(&eps, now).map(|e| e.address))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(17), run(17));
    }
}
