//! Tap: a live stream of the requests this proxy finishes, for `trellis tap` and
//! `trellis top`, served as NDJSON by `GET /tap` on the loopback admin listener to a
//! caller holding the tap token (`--tap-token-file`).
//!
//! Costs nothing while nobody listens: a request captures what a tap event needs (its
//! authority and path) only when a session is open at its start. Sessions are few
//! ([`MAX_SESSIONS`]) and each has a bounded buffer ([`BUFFER_EVENTS`]); a session that
//! reads too slowly skips events and is told how many, it never slows requests.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

/// Tap sessions open at once, per proxy.
pub const MAX_SESSIONS: usize = 4;
/// Events a session may fall behind by before it skips.
pub const BUFFER_EVENTS: usize = 1024;

/// One finished request, as a tap session sees it.
#[derive(Debug, Clone, Serialize)]
pub struct TapEvent {
    /// RFC 3339 time the response ended (as access lines write it).
    pub time: String,
    /// `inbound` (a peer called this workload) or `outbound` (this workload called out).
    pub direction: &'static str,
    /// Method.
    pub method: String,
    /// The authority the client used.
    pub authority: String,
    /// Path, without the query string.
    pub path: String,
    /// Status returned to the client.
    pub status: u16,
    /// `grpc-status`, for gRPC.
    pub grpc_status: Option<u8>,
    /// Request arrival to response end.
    pub duration_ms: f64,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
    /// Calling workload.
    pub source_workload: String,
    /// Calling workload's SPIFFE id.
    pub source_principal: String,
    /// Serving workload (`unknown` when no peer answered).
    pub destination_workload: String,
    /// Serving workload's SPIFFE id.
    pub destination_principal: String,
    /// The addressed service, `<name>.<namespace>`.
    pub destination_service: String,
    /// W3C trace id.
    pub trace_id: String,
}

/// What a request captures at its start for its tap event.
#[derive(Debug)]
pub struct TapStart {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The authority the client used.
    pub authority: String,
    /// The path.
    pub path: String,
    /// The method as sent.
    pub method: String,
}

/// The tap hub of one proxy.
#[derive(Debug)]
pub struct Tap {
    tx: broadcast::Sender<Arc<TapEvent>>,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            tx: broadcast::Sender::new(BUFFER_EVENTS),
        }
    }
}

impl Tap {
    /// Whether any session listens: requests starting now capture tap details.
    pub fn active(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// A new session, or `None` when [`MAX_SESSIONS`] are open.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Arc<TapEvent>>> {
        (self.tx.receiver_count() < MAX_SESSIONS).then(|| self.tx.subscribe())
    }

    /// Hands an event to every session (none listening: dropped).
    pub fn publish(&self, event: TapEvent) {
        let _ = self.tx.send(Arc::new(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_capped_and_events_reach_each() {
        let tap = Tap::default();
        assert!(!tap.active());
        let mut sessions: Vec<_> = (0..MAX_SESSIONS)
            .map(|_| tap.subscribe().unwrap())
            .collect();
        assert!(tap.active());
        assert!(tap.subscribe().is_none(), "one session too many");
        tap.publish(TapEvent {
            time: crate::logging::access_time().to_string(),
            direction: "inbound",
            method: "GET".into(),
            authority: "web.demo".into(),
            path: "/".into(),
            status: 200,
            grpc_status: None,
            duration_ms: 1.0,
            request_bytes: 0,
            response_bytes: 5,
            source_workload: "client".into(),
            source_principal: "spiffe://cluster.local/ns/demo/sa/client".into(),
            destination_workload: "web".into(),
            destination_principal: "spiffe://cluster.local/ns/demo/sa/web".into(),
            destination_service: "web.demo".into(),
            trace_id: "0".repeat(32),
        });
        for s in &mut sessions {
            assert_eq!(s.try_recv().unwrap().path, "/");
        }
        drop(sessions.pop());
        assert!(tap.subscribe().is_some(), "a closed session frees its slot");
    }
}
