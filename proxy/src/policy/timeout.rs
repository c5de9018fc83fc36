//! Deadlines: the call's deadline bounds the whole request (every attempt and every backoff
//! sleep; past it the client gets 504 `timeout`), `timeouts.per_try` bounds one attempt (a cut
//! attempt may be retried). The call's deadline is the earliest of `timeouts.request` and what
//! the client's `outrigger-timeout` or (gRPC) `grpc-timeout` asks for (`deadline.rs`); a header
//! never lengthens it. The request is handed on with the time left in those headers, which the
//! retry layer reads, so it never starts a backoff sleep that would run past the deadline.
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
use crate::http::forward::RequestTrace;
use crate::policy::Admitted;
use crate::policy::deadline::{self, Stamp};

/// Answers 504 `timeout` when the response headers have not come `after` the call.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    after: Duration,
    /// The whole request's deadline: the headers' say, and the stamp of `after` itself (made
    /// once here, so a call that asks for nothing shorter costs no allocation).
    whole_request: Option<Stamp>,
}

impl DeadlineLayer {
    /// One attempt's deadline (`timeouts.per_try`).
    pub fn new(after: Duration) -> Self {
        Self { after, whole_request: None }
    }

    /// The call's deadline: `timeouts.request`, or sooner when the client's headers ask. A
    /// malformed header is answered 400 `bad-request`, a deadline already passed (zero) 504
    /// `timeout`, both at once and nothing forwarded.
    pub fn whole_request(request: Duration) -> Self {
        Self { after: request, whole_request: Some(Stamp::new(request)) }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner, layer: self.clone() }
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
    type Future = Admitted<DeadlineFuture<S::Future>, ()>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut after = self.layer.after;
        if let Some(stamp) = &self.layer.whole_request {
            match deadline::requested(req.headers()) {
                Err(err) => return Admitted::refused(err),
                Ok(Some(asked)) if asked < after => {
                    after = asked;
                    if after.is_zero() {
                        return Admitted::refused(ProxyError::Timeout { after });
                    }
                    deadline::write(req.headers_mut(), after);
                }
                Ok(_) => stamp.write(req.headers_mut()),
            }
        }
        let deadline = saturating_add(Instant::now(), after);
        if req.extensions().get::<RequestTrace>().is_some() {
            // a recorded attempt's span says `timeout`, not `cancelled`, when this cuts it
            let cut = req.extensions().get::<CutAt>().map_or(deadline, |c| c.0.min(deadline));
            req.extensions_mut().insert(CutAt(cut));
        }
        let inner = tokio::time::timeout_at(deadline, self.inner.call(req));
        Admitted::inner(DeadlineFuture { inner, after }, ())
    }
}

/// In a recorded request's extensions: the soonest deadline that cuts it (the call's, or the
/// attempt's `per_try`), for its attempt span ([`crate::telemetry::trace::OpenSpan`]).
#[derive(Debug, Clone, Copy)]
pub struct CutAt(pub Instant);

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

    /// Records the `outrigger-timeout` each call arrived with, then answers after `delay`.
    fn recording(
        delay: Duration,
        seen: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
    ) -> impl tower::Service<Request<()>, Response = (), Error = ProxyError, Future: Send> + Clone
    {
        tower::service_fn(move |req: Request<()>| {
            let header = req.headers().get("outrigger-timeout").map(|v| v.to_str().unwrap().into());
            seen.lock().unwrap().push(header);
            async move {
                tokio::time::sleep(delay).await;
                Ok(())
            }
        })
    }

    fn with_header(name: &'static str, value: &'static str) -> Request<()> {
        Request::get("/").header(name, value).body(()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn outrigger_timeout_shortens_the_call_and_is_handed_on_as_the_time_left() {
        let seen = std::sync::Arc::default();
        let mut svc = DeadlineLayer::whole_request(Duration::from_secs(10))
            .layer(recording(Duration::from_secs(5), std::sync::Arc::clone(&seen)));
        let started = Instant::now();
        let req = with_header("outrigger-timeout", "300ms");
        let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
        assert!(
            matches!(err, ProxyError::Timeout { after } if after == Duration::from_millis(300))
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!(*seen.lock().unwrap(), [Some("300ms".to_owned())]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_never_lengthens_the_request_timeout_and_is_replaced() {
        let seen = std::sync::Arc::default();
        let mut svc = DeadlineLayer::whole_request(Duration::from_secs(2))
            .layer(recording(Duration::from_secs(5), std::sync::Arc::clone(&seen)));
        let started = Instant::now();
        let req = with_header("outrigger-timeout", "1m");
        let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
        assert!(matches!(err, ProxyError::Timeout { after } if after == Duration::from_secs(2)));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // with no header at all, the configured timeout is handed on
        svc.ready().await.unwrap().call(Request::new(())).await.unwrap_err();
        assert_eq!(*seen.lock().unwrap(), [Some("2000ms".to_owned()), Some("2000ms".to_owned())]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_deadline_is_a_timeout_at_once_and_nothing_is_forwarded() {
        let seen = std::sync::Arc::default();
        let mut svc = DeadlineLayer::whole_request(Duration::from_secs(10))
            .layer(recording(Duration::ZERO, std::sync::Arc::clone(&seen)));
        let started = Instant::now();
        for req in [
            with_header("outrigger-timeout", "0ms"),
            Request::get("/")
                .header("content-type", "application/grpc")
                .header("grpc-timeout", "0n")
                .body(())
                .unwrap(),
        ] {
            let err = svc.ready().await.unwrap().call(req).await.unwrap_err();
            assert_eq!((err.status().as_u16(), err.kind()), (504, "timeout"));
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(seen.lock().unwrap().is_empty(), "nothing forwarded");
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_timeout_header_is_refused_and_nothing_is_forwarded() {
        let seen = std::sync::Arc::default();
        let mut svc = DeadlineLayer::whole_request(Duration::from_secs(10))
            .layer(recording(Duration::ZERO, std::sync::Arc::clone(&seen)));
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(with_header("outrigger-timeout", "300"))
            .await
            .unwrap_err();
        assert_eq!((err.status().as_u16(), err.kind()), (400, "bad-request"));
        assert!(seen.lock().unwrap().is_empty(), "nothing forwarded");
    }

    #[tokio::test(start_paused = true)]
    async fn the_per_try_layer_leaves_the_headers_alone() {
        let seen = std::sync::Arc::default();
        let mut svc = DeadlineLayer::new(Duration::from_secs(1))
            .layer(recording(Duration::ZERO, std::sync::Arc::clone(&seen)));
        svc.ready().await.unwrap().call(Request::new(())).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), [None]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_past_the_clock_waits_for_the_answer_instead_of_panicking() {
        // `Instant::now() + Duration::MAX` panicked in `call`, and the request got no answer
        let mut svc = DeadlineLayer::new(Duration::MAX).layer(slow(Duration::from_secs(3600)));
        svc.ready().await.unwrap().call(Request::new(())).await.expect("no deadline in sight");
    }
}
