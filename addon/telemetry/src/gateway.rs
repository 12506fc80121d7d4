//! The OTLP trace service the proxies export to.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};
use trellis_identity::ConnectInfo;

use crate::convert::{convert_request, span_count};
use crate::worker::{self, Batching, gauge_value};
use crate::{Error, Metrics};

/// Default [`GatewayConfig::queue_capacity`]: spans waiting for the exporter.
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;
/// Default [`GatewayConfig::max_batch_spans`]: spans per export call.
pub const DEFAULT_MAX_BATCH_SPANS: usize = 512;
/// Default [`GatewayConfig::batch_interval`]: the longest a span waits for its batch to fill.
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Default [`GatewayConfig::export_timeout`]: above the Application Insights exporter's 35 s
/// of retry backoff, plus room for the requests themselves.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`GatewayConfig::max_spans_per_request`].
pub const DEFAULT_MAX_SPANS_PER_REQUEST: usize = 10_000;
/// Default [`GatewayConfig::max_message_bytes`]: 4 MiB, gRPC's usual limit.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;

/// The gateway's limits and batching. [`Default`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Refuse requests without a verified caller identity (`Status::unauthenticated`).
    /// When false, anonymous requests are accepted and their resource taken as reported;
    /// requests WITH an identity get the identity rule either way.
    pub require_identity: bool,
    /// Spans the queue between the RPCs and the exporter holds (the batch being exported
    /// is not counted). When full, further spans are dropped and reported as rejected.
    pub queue_capacity: usize,
    /// Spans per export call at most.
    pub max_batch_spans: usize,
    /// A batch is exported when full or when its first span has waited this long.
    pub batch_interval: Duration,
    /// An export call that takes longer is abandoned and its spans counted as failed.
    pub export_timeout: Duration,
    /// A request with more spans is refused whole with `Status::resource_exhausted`.
    pub max_spans_per_request: usize,
    /// Largest request the server decodes, compressed and after decompression
    /// (`out_of_range` / `resource_exhausted` from tonic above it).
    pub max_message_bytes: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            require_identity: true,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_batch_spans: DEFAULT_MAX_BATCH_SPANS,
            batch_interval: DEFAULT_BATCH_INTERVAL,
            export_timeout: DEFAULT_EXPORT_TIMEOUT,
            max_spans_per_request: DEFAULT_MAX_SPANS_PER_REQUEST,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl GatewayConfig {
    fn validate(&self) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Config(what.to_owned()));
        if self.queue_capacity == 0 || self.queue_capacity > tokio::sync::Semaphore::MAX_PERMITS {
            return bad("queue_capacity must be at least 1 span");
        }
        if self.max_batch_spans == 0 {
            return bad("max_batch_spans must be at least 1");
        }
        if self.max_spans_per_request == 0 {
            return bad("max_spans_per_request must be at least 1");
        }
        if self.max_message_bytes == 0 {
            return bad("max_message_bytes must be at least 1");
        }
        if self.batch_interval.is_zero() || self.export_timeout.is_zero() {
            return bad("batch_interval and export_timeout must be more than 0");
        }
        Ok(())
    }
}

/// The telemetry gateway: an OTLP `TraceService` feeding one span exporter.
///
/// Cheap to clone; clones share the queue. The export worker runs until every clone
/// (including the one inside [`into_server`](Self::into_server)) is dropped, then exports
/// what is left and ends.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    queue: mpsc::Sender<SpanData>,
    config: GatewayConfig,
    metrics: Metrics,
}

impl Gateway {
    /// Starts the export worker on the current Tokio runtime and returns the gateway and the
    /// worker's handle (it finishes once every `Gateway` clone is gone and the queue is
    /// exported: await it, with a timeout, on shutdown).
    ///
    /// Fails on an out-of-range `config` or outside a Tokio runtime.
    pub fn spawn<E>(
        exporter: E,
        config: GatewayConfig,
        metrics: Metrics,
    ) -> Result<(Self, JoinHandle<()>), Error>
    where
        E: SpanExporter + 'static,
    {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| Error::Config(format!("needs a Tokio runtime: {e}")))?;
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let batching = Batching {
            max_spans: config.max_batch_spans,
            interval: config.batch_interval,
            export_timeout: config.export_timeout,
        };
        let worker = runtime.spawn(worker::run(exporter, rx, batching, metrics.clone()));
        let gateway = Self {
            inner: Arc::new(Inner {
                queue: tx,
                config,
                metrics,
            }),
        };
        Ok((gateway, worker))
    }

    /// The tonic service to mount with `Server::builder().add_service(..)`, with the
    /// decoding limit set and gzip-compressed requests accepted.
    pub fn into_server(self) -> TraceServiceServer<Self> {
        let limit = self.inner.config.max_message_bytes;
        TraceServiceServer::new(self)
            .max_decoding_message_size(limit)
            .accept_compressed(CompressionEncoding::Gzip)
    }

    /// The configuration the gateway runs with.
    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    /// Spans waiting in the queue right now.
    pub fn queued(&self) -> usize {
        let queue = &self.inner.queue;
        queue.max_capacity() - queue.capacity()
    }
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.inner.config)
            .field("queued", &self.queued())
            .finish_non_exhaustive()
    }
}

#[tonic::async_trait]
impl TraceService for Gateway {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let inner = &self.inner;
        let metrics = &inner.metrics;
        let peer = caller(&request, inner.config.require_identity, metrics)?;
        let request = request.into_inner();
        let total = span_count(&request);
        if total > inner.config.max_spans_per_request {
            // Refused whole rather than truncated: the sender's batch size is wrong, and an
            // error says so where a partial success would quietly lose the tail every time.
            metrics.refused_too_many_spans.inc();
            return Err(Status::resource_exhausted(format!(
                "{total} spans in one request; the telemetry gateway accepts at most {}: \
                 export smaller batches",
                inner.config.max_spans_per_request
            )));
        }
        metrics.received.inc_by(as_u64(total));

        let converted = convert_request(request, peer.as_ref());
        metrics.dropped_invalid.inc_by(converted.invalid);

        let offered = converted.spans.len();
        let mut queued = 0;
        let mut stopped = false;
        // Never waits: a full queue drops the rest of this request's spans at once.
        for span in converted.spans {
            match inner.queue.try_send(span) {
                Ok(()) => queued += 1,
                Err(TrySendError::Full(_)) => break,
                Err(TrySendError::Closed(_)) => {
                    stopped = true;
                    break;
                }
            }
        }
        let queue_full = as_u64(offered - queued);
        metrics.dropped_queue_full.inc_by(queue_full);
        metrics.queue.set(gauge_value(self.queued()));

        let rejected = converted.invalid + queue_full;
        if rejected > 0 {
            tracing::debug!(
                peer = peer.as_ref().map(|p| p.as_str()),
                invalid = converted.invalid,
                queue_full,
                "telemetry spans rejected"
            );
        }
        let partial_success = (rejected > 0).then(|| {
            let mut reasons = Vec::new();
            if converted.invalid > 0 {
                reasons.push(format!(
                    "{} malformed (first: {})",
                    converted.invalid,
                    converted.first_error.as_deref().unwrap_or("unknown")
                ));
            }
            if queue_full > 0 {
                reasons.push(if stopped {
                    format!("{queue_full} dropped: the gateway's export worker has stopped")
                } else {
                    format!(
                        "{queue_full} dropped: the gateway's queue is full \
                         (Application Insights is slow or unreachable)"
                    )
                });
            }
            ExportTracePartialSuccess {
                rejected_spans: i64::try_from(rejected).unwrap_or(i64::MAX),
                error_message: format!(
                    "{rejected} of {total} spans rejected: {}",
                    reasons.join("; ")
                ),
            }
        });
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success,
        }))
    }
}

/// The caller's verified identity, for traces and metrics alike. Only the TLS acceptor
/// puts `ConnectInfo` into the request's extensions, so a caller cannot forge it; without
/// one, the request is refused when `require_identity` (counted), else anonymous.
pub(crate) fn caller<T>(
    request: &Request<T>,
    require_identity: bool,
    metrics: &Metrics,
) -> Result<Option<trellis_identity::SpiffeId>, Status> {
    let peer = request
        .extensions()
        .get::<ConnectInfo>()
        .and_then(|info| info.peer.clone());
    if peer.is_none() && require_identity {
        metrics.refused_unauthenticated.inc();
        return Err(Status::unauthenticated(
            "telemetry export needs a verified workload identity (mTLS client certificate)",
        ));
    }
    Ok(peer)
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    #[derive(Debug)]
    struct Discard;

    impl SpanExporter for Discard {
        async fn export(&self, _batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
            Ok(())
        }
    }

    #[tokio::test]
    async fn out_of_range_config_is_refused_by_name() {
        type Edit = fn(&mut GatewayConfig);
        let cases: [(Edit, &str); 6] = [
            (|c| c.queue_capacity = 0, "queue_capacity"),
            (|c| c.max_batch_spans = 0, "max_batch_spans"),
            (|c| c.max_spans_per_request = 0, "max_spans_per_request"),
            (|c| c.max_message_bytes = 0, "max_message_bytes"),
            (|c| c.batch_interval = Duration::ZERO, "batch_interval"),
            (|c| c.export_timeout = Duration::ZERO, "export_timeout"),
        ];
        for (edit, name) in cases {
            let mut config = GatewayConfig::default();
            edit(&mut config);
            let err = Gateway::spawn(Discard, config, Metrics::new(&mut Registry::default()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{err}");
        }
        let (gateway, _worker) = Gateway::spawn(
            Discard,
            GatewayConfig::default(),
            Metrics::new(&mut Registry::default()),
        )
        .unwrap();
        assert!(format!("{gateway:?}").contains("queue_capacity: 8192"));
    }

    #[test]
    fn spawning_outside_a_runtime_is_an_error_not_a_panic() {
        let err = Gateway::spawn(
            Discard,
            GatewayConfig::default(),
            Metrics::new(&mut Registry::default()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("Tokio runtime"), "{err}");
    }
}
