//! Leader election against the API stand-in: replicas contending for one Lease, what
//! they write to it, and who leads when one leaves, loses a race, or loses the API.
//!
//! Short timings (1 s lease, 500 ms renew deadline, 100 ms retry) keep these fast.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use k8s_openapi::api::coordination::v1::Lease;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use trellis_kube::leader::{LeaderElector, LeaseSettings, is_leader};

use crate::support::{PATIENCE, eventually, has_line, metrics_text};
use trellis_kube::stand_in::{ApiStandIn, Write};

const NS: &str = "trellis-system";
const LEASE: &str = "trellis-controller";

/// 1 s lease, 500 ms renew deadline, 100 ms retry.
pub fn fast(identity: &str) -> LeaseSettings {
    LeaseSettings {
        lease_duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(500),
        retry_period: Duration::from_millis(100),
        ..LeaseSettings::new(identity)
    }
}

/// An elector running in a task.
pub struct Elector {
    pub identity: String,
    pub leader: watch::Receiver<bool>,
    registry: Registry,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Elector {
    pub fn start(api: &ApiStandIn, settings: LeaseSettings) -> Elector {
        let identity = settings.identity.clone();
        let elector = LeaderElector::new(api.client(), settings).expect("valid settings");
        let mut registry = Registry::default();
        elector.register_metrics(&mut registry);
        let leader = elector.subscribe();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(elector.run(async move {
            let _ = stopped.await;
        }));
        Elector {
            identity,
            leader,
            registry,
            stop: Some(stop),
            task,
        }
    }

    pub fn leads(&self) -> bool {
        is_leader(&self.leader)
    }

    /// Waits until this replica's leadership is `want`; returns how long that took.
    pub async fn until(&self, want: bool) -> Duration {
        let start = Instant::now();
        let mut leader = self.leader.clone();
        let waited = tokio::time::timeout(PATIENCE, leader.wait_for(|l| *l == want)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "{} never became {}",
            self.identity,
            if want { "leader" } else { "follower" }
        );
        start.elapsed()
    }

    pub fn metrics(&self) -> String {
        metrics_text(&self.registry)
    }

    /// Shuts down (releasing the Lease) and waits for the task.
    pub async fn stop(mut self) -> Elector {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("elector did not stop")
            .expect("elector panicked");
        self
    }

    /// Vanishes without a word, as a killed pod does.
    pub async fn kill(mut self) -> Elector {
        self.task.abort();
        let _ = (&mut self.task).await;
        self
    }
}

/// Records whether two replicas ever led at the same time.
fn never_both(a: &Elector, b: &Elector) -> Arc<Mutex<bool>> {
    let both = Arc::new(Mutex::new(false));
    let (mut a, mut b) = (a.leader.clone(), b.leader.clone());
    let seen = Arc::clone(&both);
    tokio::spawn(async move {
        loop {
            let open = tokio::select! {
                r = a.changed() => r.is_ok(),
                r = b.changed() => r.is_ok(),
            };
            if *a.borrow() && *b.borrow() {
                *seen.lock().unwrap() = true;
            }
            if !open {
                break;
            }
        }
    });
    both
}

fn lease(api: &ApiStandIn) -> Value {
    api.object::<Lease>(NS, LEASE).expect("the lease exists")
}

fn holder(lease: &Value) -> Option<&str> {
    lease["spec"]["holderIdentity"].as_str()
}

/// A Lease held by `identity`, as another replica would have written it.
fn held_by(identity: &str, seconds: i32) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": LEASE, "namespace": NS},
        "spec": {
            "holderIdentity": identity, "leaseDurationSeconds": seconds,
            "acquireTime": "2025-01-01T00:00:00.000000Z",
            "renewTime": "2025-01-01T00:00:00.000000Z", "leaseTransitions": 3,
        },
    }))
    .unwrap()
}

/// `(method, answer, holder in the body)` of each write.
fn summary(writes: &[Write]) -> Vec<(Method, u16, Option<String>)> {
    writes
        .iter()
        .map(|w| {
            let holder = w.body["spec"]["holderIdentity"].as_str().map(str::to_owned);
            (w.method.clone(), w.code, holder)
        })
        .collect()
}

#[tokio::test]
async fn two_replicas_elect_exactly_one_leader() {
    let api = ApiStandIn::default();
    let a = Elector::start(&api, fast("pod-a"));
    let b = Elector::start(&api, fast("pod-b"));
    let both = never_both(&a, &b);

    let (leader, follower) = eventually("a leader", || match (a.leads(), b.leads()) {
        (true, false) => Some((&a, &b)),
        (false, true) => Some((&b, &a)),
        (true, true) => panic!("two leaders"),
        (false, false) => None,
    })
    .await;
    let first = lease(&api);
    assert_eq!(holder(&first), Some(leader.identity.as_str()));
    assert_eq!(first["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(first["spec"]["leaseTransitions"], 0);
    assert!(first["spec"]["acquireTime"].is_string());

    // Several renewals later: the same single leader, the Lease renewed.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(leader.leads() && !follower.leads());
    assert!(!*both.lock().unwrap(), "both replicas led at once");
    let later = lease(&api);
    assert_eq!(holder(&later), Some(leader.identity.as_str()));
    assert_ne!(later["spec"]["renewTime"], first["spec"]["renewTime"]);
    assert_eq!(later["spec"]["acquireTime"], first["spec"]["acquireTime"]);

    // The follower never wrote successfully; the leader created once, then renewed.
    let writes = api.writes("leases");
    let ok: Vec<_> = summary(&writes)
        .into_iter()
        .filter(|(_, code, _)| *code < 300)
        .collect();
    assert_eq!(ok[0], (Method::POST, 201, Some(leader.identity.clone())));
    assert!(ok.len() >= 4, "{ok:?}");
    assert!(
        ok[1..]
            .iter()
            .all(|w| *w == (Method::PUT, 200, Some(leader.identity.clone()))),
        "{ok:?}"
    );
    assert!(writes.iter().all(|w| w.namespace.as_deref() == Some(NS)));

    assert!(has_line(&leader.metrics(), "trellis_kube_leader 1"));
    assert!(has_line(
        &leader.metrics(),
        "trellis_kube_leader_transitions_total 1"
    ));
    assert!(has_line(&follower.metrics(), "trellis_kube_leader 0"));
    assert!(has_line(
        &follower.metrics(),
        "trellis_kube_leader_transitions_total 0"
    ));
}

#[tokio::test]
async fn a_leader_that_shuts_down_releases_and_the_follower_takes_over_at_once() {
    let api = ApiStandIn::default();
    // A 10 s lease: a takeover within a second can only come from the release.
    let slow = |identity| LeaseSettings {
        lease_duration: Duration::from_secs(10),
        renew_deadline: Duration::from_secs(5),
        ..fast(identity)
    };
    let a = Elector::start(&api, slow("pod-a"));
    a.until(true).await;
    let b = Elector::start(&api, slow("pod-b"));
    let both = never_both(&a, &b);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.leads());

    let a = a.stop().await;
    assert!(!a.leads(), "still leading after shutdown");
    let took = b.until(true).await;
    assert!(took < Duration::from_secs(2), "took over after {took:?}");
    assert!(!*both.lock().unwrap(), "both replicas led at once");

    // a's last write cleared the holder; only b wrote after it.
    let writes = summary(&api.writes("leases"));
    let released: Vec<usize> = (0..writes.len())
        .filter(|i| writes[*i].2.is_none())
        .collect();
    assert_eq!(released.len(), 1, "{writes:?}");
    let (before, after) = writes.split_at(released[0]);
    assert_eq!(after[0], (Method::PUT, 200, None));
    assert!(
        before.iter().all(|w| w.2.as_deref() == Some("pod-a")),
        "{writes:?}"
    );
    assert!(
        after[1..].iter().all(|w| w.2.as_deref() == Some("pod-b")),
        "{writes:?}"
    );
    assert_eq!(after[1], (Method::PUT, 200, Some("pod-b".to_owned())));

    let now = lease(&api);
    assert_eq!(holder(&now), Some("pod-b"));
    assert_eq!(now["spec"]["leaseTransitions"], 1);
    assert_eq!(now["spec"]["leaseDurationSeconds"], 10);
    assert!(has_line(&a.metrics(), "trellis_kube_leader 0"));
    assert!(has_line(
        &a.metrics(),
        "trellis_kube_leader_transitions_total 2"
    ));
}

#[tokio::test]
async fn a_vanished_leader_is_replaced_once_its_lease_expires() {
    let api = ApiStandIn::default();
    let a = Elector::start(&api, fast("pod-a"));
    a.until(true).await;
    let b = Elector::start(&api, fast("pod-b"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.leads());

    let killed = Instant::now();
    let a = a.kill().await;
    assert!(!a.leads(), "a dropped elector still claims to lead");
    b.until(true).await;
    let took = killed.elapsed();
    // Not released: b must wait out the 1 s lease from the last renewal it saw (at most
    // one retry period before the kill).
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "took over after {took:?}"
    );
    let writes = summary(&api.writes("leases"));
    assert!(
        writes.iter().all(|(_, _, holder)| holder.is_some()),
        "a released: {writes:?}"
    );
    let now = lease(&api);
    assert_eq!(holder(&now), Some("pod-b"));
    assert_eq!(now["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn a_replica_that_loses_a_write_race_stays_follower() {
    let api = ApiStandIn::default();
    // Another replica's create lands between our GET (404) and our POST; it releases the
    // Lease at once, and takes it again between our next GET and our PUT.
    let mut released = held_by("pod-x", 1);
    released.spec.as_mut().unwrap().holder_identity = None;
    api.interpose_next_write(&released);
    api.interpose_next_write(&held_by("pod-x", 1));
    let a = Elector::start(&api, fast("pod-a"));
    let led = {
        let mut leader = a.leader.clone();
        tokio::spawn(async move {
            let _ = leader.wait_for(|l| *l).await;
            Instant::now()
        })
    };
    eventually("the lost update", || {
        (api.writes("leases").len() == 2).then_some(())
    })
    .await;
    let conflict = Instant::now();
    assert!(!a.leads(), "led after losing a race");
    assert_eq!(holder(&lease(&api)), Some("pod-x"));

    // pod-x is gone now: a takes over once the Lease it saw last expires, not before.
    a.until(true).await;
    let led = led.await.unwrap();
    assert!(
        led > conflict + Duration::from_millis(800),
        "led {:?} after the lost update",
        led - conflict
    );
    assert_eq!(
        summary(&api.writes("leases")),
        [
            (Method::POST, 409, Some("pod-a".to_owned())),
            (Method::PUT, 409, Some("pod-a".to_owned())),
            (Method::PUT, 200, Some("pod-a".to_owned())),
        ]
    );
    assert_eq!(lease(&api)["spec"]["leaseTransitions"], 4);
}

#[tokio::test]
async fn a_leader_that_cannot_reach_the_api_steps_down_by_its_deadline_and_comes_back() {
    let api = ApiStandIn::default();
    let a = Elector::start(&api, fast("pod-a"));
    a.until(true).await;

    // The API answers 500.
    api.outage("leases", Some(500));
    let took = a.until(false).await;
    // The 500 ms deadline runs from the last renewal, at most one retry (100 ms) earlier;
    // stepping down must happen before a follower could see the 1 s lease expire.
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(1),
        "stepped down after {took:?}"
    );
    assert!(has_line(&a.metrics(), "trellis_kube_leader 0"));
    api.outage("leases", None);
    a.until(true).await;
    let now = lease(&api);
    assert_eq!(holder(&now), Some("pod-a"));
    assert_eq!(
        now["spec"]["leaseTransitions"], 0,
        "same holder: no transition"
    );

    // The API hangs.
    api.hold_lists("leases");
    let took = a.until(false).await;
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(1),
        "stepped down after {took:?}"
    );
    api.release_lists("leases");
    a.until(true).await;
    assert!(has_line(&a.metrics(), "trellis_kube_leader 1"));
    assert!(has_line(
        &a.metrics(),
        "trellis_kube_leader_transitions_total 5"
    ));
}
