//! The one task between the gateway's queue and the exporter.
//!
//! A single task on purpose: `SpanExporter::export` must not be called concurrently, and
//! one batch in flight is what bounds the gateway's memory (queue + one batch). While an
//! export is slow the queue fills and the RPCs start dropping spans, rather than the
//! proxies waiting on Application Insights.

use std::time::Duration;

use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Metrics;

/// How the worker batches and bounds its exports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batching {
    pub(crate) max_spans: usize,
    pub(crate) interval: Duration,
    pub(crate) export_timeout: Duration,
}

/// Exports everything the queue yields until every sender is gone and the queue is empty,
/// then shuts the exporter down.
pub(crate) async fn run<E: SpanExporter>(
    exporter: E,
    mut queue: mpsc::Receiver<SpanData>,
    batching: Batching,
    metrics: Metrics,
) {
    let mut batch = Vec::with_capacity(batching.max_spans);
    loop {
        // Wait for a first span, however long that takes.
        if queue.recv_many(&mut batch, batching.max_spans).await == 0 {
            break;
        }
        // Then fill the batch for at most `interval`: a lone span waits that long, never
        // more, and a busy queue is sent as soon as a batch is full.
        let deadline = Instant::now() + batching.interval;
        while batch.len() < batching.max_spans {
            let room = batching.max_spans - batch.len();
            match tokio::time::timeout_at(deadline, queue.recv_many(&mut batch, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        metrics.queue.set(gauge_value(queue.len()));
        let spans = std::mem::replace(&mut batch, Vec::with_capacity(batching.max_spans));
        export(&exporter, spans, batching.export_timeout, &metrics).await;
    }
    if let Err(e) = exporter.shutdown() {
        tracing::warn!(error = %e, "telemetry exporter shutdown failed");
    }
}

async fn export<E: SpanExporter>(
    exporter: &E,
    spans: Vec<SpanData>,
    timeout: Duration,
    metrics: &Metrics,
) {
    let count = u64::try_from(spans.len()).unwrap_or(u64::MAX);
    // The Application Insights exporter retries for up to 35 s of backoff, but nothing
    // bounds a single hung request but the HTTP client; this bounds any exporter.
    let outcome = match tokio::time::timeout(timeout, exporter.export(spans)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {timeout:?}")),
    };
    match outcome {
        Ok(()) => {
            metrics.exported.inc_by(count);
            metrics.batches_ok.inc();
        }
        Err(error) => {
            metrics.dropped_export_failed.inc_by(count);
            metrics.batches_error.inc();
            // The error names the endpoint and the status, never the instrumentation key
            // (that travels in the request body only).
            tracing::warn!(spans = count, %error, "telemetry export failed; spans dropped");
        }
    }
}

pub(crate) fn gauge_value(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}
