//! Authorization policy enforcement on the inbound side: what a refused request or tunnel
//! is answered, and how decisions are counted and logged. The decision itself is
//! [`trellis_api::authz::Authorizer`]'s, built with each view ([`crate::outbound::route::View`]).
//!
//! Answers are Istio's, so clients and dashboards written for it keep working: `403` with
//! the body `RBAC: access denied`; for gRPC a trailers-only response with `grpc-status: 7`
//! (PERMISSION_DENIED); `400` for a path a policy cannot be matched against; `403` to a
//! refused `CONNECT`, which makes the calling proxy close its app's connection.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tracing::debug;
use trellis_api::authz::{Decision, Denial, DryRun, PolicyKey, Verdict};

use crate::error::Error;
use crate::http::{Body, error_response, full};

/// Body of a refusal, as Envoy's RBAC filter writes it.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// gRPC status PERMISSION_DENIED.
pub const GRPC_PERMISSION_DENIED: &str = "7";

/// Distinct policies named in the decision counter's `policy` label; later ones count as
/// [`OTHER`] (policies come and go over a proxy's life, the series stay).
pub const MAX_POLICY_LABELS: usize = 64;

/// `policy` label value when no single policy decided (no ALLOW policy matched, or none
/// applied, or the path could not be matched).
pub const NO_POLICY: &str = "-";

/// `policy` label value past [`MAX_POLICY_LABELS`].
pub const OTHER: &str = "other";

/// Labels of an authorization decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    /// `allow`, `deny` or `dry_run_deny`.
    pub decision: &'static str,
    /// `<namespace>/<name>`, [`NO_POLICY`] or [`OTHER`].
    pub policy: Arc<str>,
}

/// The decision counter and the cap on its `policy` values.
#[derive(Debug, Clone, Default)]
pub struct AuthzMetrics {
    /// `trellis_proxy_authorization_decisions_total`.
    pub decisions: Family<DecisionLabels, Counter>,
    policies: Arc<RwLock<HashSet<Arc<str>>>>,
}

// === impl AuthzMetrics ===

impl AuthzMetrics {
    /// Counts `decision` (requests no policy applies to have none, and are not counted)
    /// and logs its dry-run refusals at debug level; `what` names the request in that log
    /// (`GET /admin`, `tunnel to port 5432`).
    pub fn record(&self, decision: &Decision, peer: &str, what: &dyn std::fmt::Display) {
        let (kind, policy) = match &decision.verdict {
            Verdict::Allow(policy) => ("allow", policy.as_ref()),
            Verdict::Deny(denial) => ("deny", denial.policy()),
        };
        self.count(kind, policy);
        for dry in &decision.dry_run {
            debug!(%peer, request = %what, dry_run = %dry, "dry-run authorization policy would refuse");
            let policy = match dry {
                DryRun::Policy(key) => Some(key),
                DryRun::NoAllowMatched(_) => None,
            };
            self.count("dry_run_deny", policy);
        }
    }

    fn count(&self, decision: &'static str, policy: Option<&PolicyKey>) {
        let policy = match policy {
            None => Arc::from(NO_POLICY),
            Some(key) => self.label(key),
        };
        self.decisions
            .get_or_create(&DecisionLabels { decision, policy })
            .inc();
    }

    /// `key` itself while fewer than [`MAX_POLICY_LABELS`] policies have been named, else
    /// [`OTHER`] for the ones not named yet.
    fn label(&self, key: &PolicyKey) -> Arc<str> {
        {
            let seen = self.policies.read().unwrap_or_else(|p| p.into_inner());
            if seen.contains(key) {
                return key.clone();
            }
        }
        let mut seen = self.policies.write().unwrap_or_else(|p| p.into_inner());
        if seen.contains(key) || seen.len() < MAX_POLICY_LABELS {
            seen.insert(key.clone());
            key.clone()
        } else {
            Arc::from(OTHER)
        }
    }
}

/// The answer to a refused HTTP request whose headers are `request`: a trailers-only
/// PERMISSION_DENIED for gRPC, else `403` `RBAC: access denied`; a bad path is `400`.
pub fn denied(denial: &Denial, request: &HeaderMap) -> Response<Body> {
    if let Denial::BadPath(_) = denial {
        return error_response(&Error::Denied(denial.clone()));
    }
    if crate::telemetry::is_grpc(request) {
        // Trailers-only (gRPC over HTTP/2): status in the headers, empty body, end of
        // stream. gRPC clients read it as the call's status.
        let mut resp = Response::new(full(""));
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(
            "grpc-status",
            HeaderValue::from_static(GRPC_PERMISSION_DENIED),
        );
        h.insert("grpc-message", HeaderValue::from_static(DENIED_BODY));
        return resp;
    }
    forbidden()
}

/// `403` with [`DENIED_BODY`]: a refused request that is not gRPC, or a refused tunnel.
pub fn forbidden() -> Response<Body> {
    let mut resp = Response::new(full(DENIED_BODY));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use trellis_api::authz::PathError;

    use super::*;

    async fn body(resp: Response<Body>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn refusals_are_answered_as_istio_does() {
        let denial = Denial::Policy("demo/deny".into());
        let resp = denied(&denial, &HeaderMap::new());
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain");
        assert_eq!(body(resp).await, "RBAC: access denied");

        let mut grpc = HeaderMap::new();
        grpc.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let resp = denied(&denial, &grpc);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "7");
        assert_eq!(resp.headers()["grpc-message"], "RBAC: access denied");
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/grpc");
        assert!(
            hyper::body::Body::is_end_stream(resp.body()),
            "trailers-only"
        );

        let bad = Denial::BadPath(PathError::EscapedSlash("/a%2Fb".into()));
        let resp = denied(&bad, &grpc);
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(body(resp).await.contains("%2F"));
    }

    #[test]
    fn policy_labels_are_capped() {
        let m = AuthzMetrics::default();
        let allow = |i: usize| Decision {
            verdict: Verdict::Allow(Some(format!("demo/p{i}").into())),
            dry_run: vec![DryRun::NoAllowMatched(vec!["demo/dry".into()])],
            path: None,
        };
        for i in 0..MAX_POLICY_LABELS + 10 {
            m.record(&allow(i), "peer", &"GET /");
        }
        // A policy named before the cap keeps its own label.
        m.record(&allow(0), "peer", &"GET /");
        let get = |decision, policy: &str| {
            m.decisions
                .get_or_create(&DecisionLabels {
                    decision,
                    policy: policy.into(),
                })
                .get()
        };
        assert_eq!(get("allow", "demo/p0"), 2);
        assert_eq!(get("allow", &format!("demo/p{}", MAX_POLICY_LABELS - 1)), 1);
        assert_eq!(get("allow", &format!("demo/p{MAX_POLICY_LABELS}")), 0);
        assert_eq!(get("allow", OTHER), 10);
        assert_eq!(
            get("dry_run_deny", NO_POLICY),
            MAX_POLICY_LABELS as u64 + 11
        );

        let deny = Decision {
            verdict: Verdict::Deny(Denial::NoAllowMatched(vec!["demo/p1".into()])),
            dry_run: vec![DryRun::Policy("demo/p1".into())],
            path: None,
        };
        m.record(&deny, "peer", &"GET /");
        assert_eq!(get("deny", NO_POLICY), 1);
        assert_eq!(get("dry_run_deny", "demo/p1"), 1);
    }
}
