//! Deadlines: `timeouts.request` bounds the whole request (every attempt and every backoff
//! sleep; past it the client gets 504 `timeout`), `timeouts.per_try` bounds one attempt (a cut
//! attempt may be retried). The retry layer knows `timeouts.request` too, so it never starts a
//! backoff sleep that would run past it.
//!
//! Both end when the response headers arrive; a streaming body is not cut.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use outrigger_discovery::time::saturating_add;
use tokio::time::Instant;

use crate::error::ProxyError;

/// Answers 504 `timeout` when the response headers have not come `after` the call.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    after: Duration,
}

impl DeadlineLayer {
    pub fn new(after: Duration) -> Self {
        Self { after }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner, layer: *self }
    }
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    layer: DeadlineLayer,
}

impl<S, B> tower::Service<Request<B>> for Deadline<S>
where
    S: tower::Service<Request<B>, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let after = self.layer.after;
        let deadline = saturating_add(Instant::now(), after);
        DeadlineFuture { inner: tokio::time::timeout_at(deadline, self.inner.call(req)), after }
    }
}

pin_project_lite::pin_project! {
    #[allow(missing_debug_implementations)]
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: tokio::time::Timeout<F>,
        after: Duration,
    }
}

impl<F, T> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    type Output = Result<T, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let after = *this.after;
        this.inner.poll(cx).map(|out| out.unwrap_or(Err(ProxyError::Timeout { after })))
    }
}

#[cfg(test)]
mod tests {
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    fn slow(
        delay: Duration,
    ) -> impl tower::Service<Request<()>, Response = (), Error = ProxyError, Future: Send> + Clone
    {
        tower::service_fn(move |_: Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok(())
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_deadline_gets_timeout_at_the_deadline() {
        let mut svc =
            DeadlineLayer::new(Duration::from_secs(2)).layer(slow(Duration::from_secs(5)));
        let started = Instant::now();
        let err = svc.ready().await.unwrap().call(Request::new(())).await.unwrap_err();
        assert!(matches!(err, ProxyError::Timeout { after } if after == Duration::from_secs(2)));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_before_the_deadline_passes() {
        let mut svc =
            DeadlineLayer::new(Duration::from_secs(2)).layer(slow(Duration::from_secs(1)));
        svc.ready().await.unwrap().call(Request::new(())).await.expect("in time");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_past_the_clock_waits_for_the_answer_instead_of_panicking() {
        // `Instant::now() + Duration::MAX` panicked in `call`, and the request got no answer
        let mut svc = DeadlineLayer::new(Duration::MAX).layer(slow(Duration::from_secs(3600)));
        svc.ready().await.unwrap().call(Request::new(())).await.expect("no deadline in sight");
    }
}
