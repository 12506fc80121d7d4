//! The idle timer of one served connection: it counts requests in flight (from the
//! service call until the response body is done) and fires once none has been in flight
//! for the timeout. The connection is then shut down gracefully, so firing can never cut
//! a request; it only stops an idle client from holding a slot forever.
//!
//! It sits at the request level, not on socket bytes, because HTTP/2 keepalive PINGs
//! keep an otherwise idle connection's socket busy.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Tracks requests in flight on one connection; clones share the count.
#[derive(Debug, Clone)]
pub struct IdleTimer {
    state: Arc<State>,
}

/// A hyper service wrapped so its requests count as activity for an [`IdleTimer`].
#[derive(Debug, Clone)]
pub struct TrackIdle<S> {
    inner: S,
    idle: IdleTimer,
}

/// A response body that keeps its connection busy until it ends or is dropped.
#[derive(Debug)]
pub struct IdleBody<B> {
    inner: B,
    busy: Option<Busy>,
}

#[derive(Debug)]
struct State {
    timeout: Duration,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    now_idle: Notify,
}

/// One request in flight: the connection counts as busy until it is dropped.
#[derive(Debug)]
pub struct Busy(Arc<State>);

// === impl IdleTimer ===

impl IdleTimer {
    /// A timer that fires after `timeout` without a request in flight.
    pub fn new(timeout: Duration) -> Self {
        Self {
            state: Arc::new(State {
                timeout,
                active: AtomicUsize::new(0),
                idle_since: Mutex::new(Instant::now()),
                now_idle: Notify::new(),
            }),
        }
    }

    /// Wraps `svc` so each of its requests keeps this timer from firing.
    pub fn track<S>(&self, svc: S) -> TrackIdle<S> {
        TrackIdle {
            inner: svc,
            idle: self.clone(),
        }
    }

    /// Completes once no request has been in flight for the timeout.
    pub async fn expired(&self) {
        let s = &self.state;
        loop {
            // Register for the "went idle" wake-up before looking, so none is missed.
            let went_idle = s.now_idle.notified();
            tokio::pin!(went_idle);
            went_idle.as_mut().enable();
            if s.active.load(Ordering::Acquire) > 0 {
                went_idle.await;
                continue;
            }
            let deadline = s.idle_since() + s.timeout;
            tokio::time::sleep_until(deadline).await;
            // A request may have come and gone meanwhile: only a full quiet period counts.
            if s.active.load(Ordering::Acquire) == 0 && s.idle_since() + s.timeout <= Instant::now()
            {
                return;
            }
        }
    }

    /// Marks one request in flight until the returned guard is dropped.
    pub fn busy(&self) -> Busy {
        self.state.active.fetch_add(1, Ordering::AcqRel);
        Busy(self.state.clone())
    }
}

impl State {
    fn idle_since(&self) -> Instant {
        *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let s = &self.0;
        // Stamp before releasing the count, so a waiter that sees 0 sees the new stamp.
        *s.idle_since.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        if s.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            s.now_idle.notify_waiters();
        }
    }
}

// === impl TrackIdle ===

impl<S, ReqBody, ResBody> hyper::service::Service<Request<ReqBody>> for TrackIdle<S>
where
    S: hyper::service::Service<Request<ReqBody>, Response = Response<ResBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<IdleBody<ResBody>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<ReqBody>) -> Self::Future {
        let busy = self.idle.busy();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| IdleBody {
                inner,
                busy: Some(busy),
            }))
        })
    }
}

// === impl IdleBody ===

impl<B: Body + Unpin> Body for IdleBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_after_a_quiet_period() {
        let idle = IdleTimer::new(Duration::from_secs(5));
        let start = Instant::now();
        idle.expired().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn never_fires_while_a_request_is_in_flight() {
        let idle = IdleTimer::new(Duration::from_secs(5));
        let busy = idle.busy();
        let waited = tokio::time::timeout(Duration::from_secs(60), idle.expired()).await;
        assert!(waited.is_err(), "fired with a request in flight");
        drop(busy);
        let start = Instant::now();
        idle.expired().await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(5),
            "counts from the end"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_restarts_the_quiet_period() {
        let idle = IdleTimer::new(Duration::from_secs(5));
        let start = Instant::now();
        let waiter = tokio::spawn({
            let idle = idle.clone();
            async move { idle.expired().await }
        });
        tokio::time::sleep(Duration::from_secs(4)).await;
        drop(idle.busy());
        waiter.await.expect("waiter");
        assert_eq!(start.elapsed(), Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn the_response_body_keeps_the_connection_busy_until_it_ends() {
        use http_body_util::BodyExt;

        let idle = IdleTimer::new(Duration::from_secs(1));
        let svc = idle.track(hyper::service::service_fn(
            |_req: Request<http_body_util::Empty<bytes::Bytes>>| async {
                Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"hi"),
                )))
            },
        ));
        let resp = hyper::service::Service::call(
            &svc,
            Request::new(http_body_util::Empty::<bytes::Bytes>::new()),
        )
        .await
        .expect("infallible");
        let held = tokio::time::timeout(Duration::from_secs(30), idle.expired()).await;
        assert!(held.is_err(), "fired while the body was unread");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"hi");
        let start = Instant::now();
        idle.expired().await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
