//! The local sink: the last spans the gateway received, kept in memory and grouped by
//! trace for the control plane's `/debug/traces` (what `trellis demo` and the dashboard
//! show in the local profile, where there is no Application Insights). [`Tee`] sends the
//! same spans to two exporters, so the local view stays on beside Application Insights.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use serde::Serialize;

/// Spans [`Recent`] keeps by default.
pub const DEFAULT_RECENT_SPANS: usize = 2048;

/// The last spans received, oldest dropped first.
#[derive(Debug, Clone)]
pub struct Recent {
    spans: Arc<Mutex<VecDeque<SpanData>>>,
    cap: usize,
}

/// One trace as `/debug/traces` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceView {
    /// W3C trace id, 32 hex digits.
    pub trace_id: String,
    /// When its first span started (Unix seconds).
    pub start_unix: f64,
    /// Its spans, in start order.
    pub spans: Vec<SpanView>,
}

/// One span of a [`TraceView`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpanView {
    /// 16 hex digits.
    pub span_id: String,
    /// The caller's span, if any.
    pub parent_span_id: Option<String>,
    /// `server` (a proxy received the request) or `client` (a proxy sent it).
    pub kind: &'static str,
    /// The span's name (the HTTP method).
    pub name: String,
    /// `<service.namespace>.<service.name>` of the proxy that recorded it, as Application
    /// Insights names the cloud role.
    pub role: String,
    /// The pod (`service.instance.id`).
    pub instance: String,
    /// Milliseconds from start to end.
    pub duration_ms: f64,
    /// `http.response.status_code`, when recorded.
    pub status_code: Option<i64>,
    /// The span's status is ERROR.
    pub error: bool,
    /// `url.path` (server) or `url.full` (client).
    pub target: String,
}

impl Recent {
    /// A sink keeping the last `cap` spans.
    pub fn new(cap: usize) -> Self {
        Self {
            spans: Arc::default(),
            cap: cap.max(1),
        }
    }

    /// The kept spans grouped by trace, newest trace first, at most `limit` traces.
    pub fn traces(&self, limit: usize) -> Vec<TraceView> {
        let spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        let mut by_trace: BTreeMap<String, Vec<&SpanData>> = BTreeMap::new();
        for s in spans.iter() {
            by_trace
                .entry(s.span_context.trace_id().to_string())
                .or_default()
                .push(s);
        }
        let mut traces: Vec<TraceView> = by_trace
            .into_iter()
            .map(|(trace_id, mut spans)| {
                spans.sort_by_key(|s| s.start_time);
                TraceView {
                    trace_id,
                    start_unix: spans.first().map_or(0.0, |s| unix(s.start_time)),
                    spans: spans.into_iter().map(view).collect(),
                }
            })
            .collect();
        traces.sort_by(|a, b| b.start_unix.total_cmp(&a.start_unix));
        traces.truncate(limit);
        traces
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn view(s: &SpanData) -> SpanView {
    let scope = |key: &str| {
        s.instrumentation_scope
            .attributes()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str().into_owned())
            .unwrap_or_default()
    };
    let attr = |key: &str| {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.clone())
    };
    let status_code = attr("http.response.status_code").and_then(|v| match v {
        opentelemetry::Value::I64(i) => Some(i),
        other => other.as_str().parse().ok(),
    });
    let target = attr("url.path")
        .or_else(|| attr("url.full"))
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default();
    let (ns, name) = (scope("service.namespace"), scope("service.name"));
    SpanView {
        span_id: s.span_context.span_id().to_string(),
        parent_span_id: (s.parent_span_id != opentelemetry::trace::SpanId::INVALID)
            .then(|| s.parent_span_id.to_string()),
        kind: match s.span_kind {
            SpanKind::Server | SpanKind::Consumer => "server",
            _ => "client",
        },
        name: s.name.to_string(),
        role: if ns.is_empty() {
            name
        } else {
            format!("{ns}.{name}")
        },
        instance: scope("service.instance.id"),
        duration_ms: s
            .end_time
            .duration_since(s.start_time)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
            * 1e3,
        status_code,
        error: matches!(s.status, Status::Error { .. }),
        target,
    }
}

impl SpanExporter for Recent {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        for s in batch {
            if spans.len() == self.cap {
                spans.pop_front();
            }
            spans.push_back(s);
        }
        Ok(())
    }
}

/// Two exporters fed the same spans, in turn; the first error is returned after both ran.
#[derive(Debug)]
pub struct Tee<A, B>(pub A, pub B);

impl<A: SpanExporter, B: SpanExporter> SpanExporter for Tee<A, B> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let first = self.0.export(batch.clone()).await;
        let second = self.1.export(batch).await;
        first.and(second)
    }
}
