//! Requests in flight on the app-facing listeners: capped for the whole sidecar
//! (`outbound.limits.max_requests`; one more is answered 503 `overloaded` at once, never queued),
//! and watched by a drain, which must tell when the app has gone quiet: after SIGTERM the
//! outbound listeners keep serving the app (it may be shutting down too and still need its
//! calls) until no request has been in flight for a moment.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use prometheus::IntCounter;
use tokio::sync::Notify;

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::respond::error_response;

/// The count, shared by every app-facing listener.
#[derive(Debug)]
pub struct InFlight {
    count: AtomicUsize,
    changed: Notify,
    /// Requests admitted at once at most.
    limit: usize,
    /// Counts the requests refused at `limit`.
    shed: IntCounter,
    /// Counts them again as answers of Outrigger's own (`outrigger_local_responses_total`).
    answered: IntCounter,
}

impl InFlight {
    /// Admits `limit` requests at once; each refused one counts in `shed` and `answered`.
    pub fn new(limit: usize, shed: IntCounter, answered: IntCounter) -> Self {
        Self { count: AtomicUsize::new(0), changed: Notify::new(), limit, shed, answered }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no request has been in flight for `quiet` in a row.
    pub async fn quiet_for(&self, quiet: Duration) {
        loop {
            // registered before the count is read, so no change in between is missed
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.count() == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(quiet) => {
                        if self.count() == 0 {
                            return;
                        }
                    }
                    _ = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }

    /// Counts one more request, or `None` at the limit (and counts it as shed).
    fn enter(self: &Arc<Self>) -> Option<Guard> {
        // only the edges between idle and busy matter to a drain: no lock on a busy path
        match self.count.fetch_add(1, Ordering::AcqRel) {
            0 => self.changed.notify_waiters(),
            before if before >= self.limit => {
                // back to at least `limit` >= 1: never an edge to idle
                self.count.fetch_sub(1, Ordering::AcqRel);
                self.shed.inc();
                self.answered.inc();
                return None;
            }
            _ => {}
        }
        Some(Guard(self.clone()))
    }
}

/// Counts one request until its response head is out (its body streams on, watched by the
/// connection drain).
#[derive(Debug)]
struct Guard(Arc<InFlight>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_waiters();
        }
    }
}

/// A service whose calls are counted in an [`InFlight`], and refused past its limit.
#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    in_flight: Arc<InFlight>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, in_flight: Arc<InFlight>) -> Self {
        Self { inner, in_flight }
    }
}

impl<S, Req> hyper::service::Service<Req> for Counted<S>
where
    S: hyper::service::Service<Req, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CountedFuture<S::Future>;

    fn call(&self, req: Req) -> Self::Future {
        match self.in_flight.enter() {
            Some(guard) => CountedFuture::Admitted { inner: self.inner.call(req), _guard: guard },
            None => {
                let err = ProxyError::SidecarOverloaded { limit: self.in_flight.limit };
                CountedFuture::Shed { response: Some(error_response(&err)) }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response future, holding the count until it resolves or is dropped; or the
    /// answer to a request refused at the limit.
    #[project = CountedProj]
    #[derive(Debug)]
    pub enum CountedFuture<F> {
        Admitted {
            #[pin]
            inner: F,
            _guard: Guard,
        },
        Shed { response: Option<Response<Body>> },
    }
}

impl<F> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            CountedProj::Admitted { inner, .. } => inner.poll(cx),
            CountedProj::Shed { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn in_flight(limit: usize) -> Arc<InFlight> {
        let counter = |name: &str| IntCounter::new(name, name).unwrap();
        Arc::new(InFlight::new(limit, counter("shed"), counter("answered")))
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_waits_for_the_last_request_and_then_the_quiet_period() {
        let in_flight = in_flight(usize::MAX);
        let guard = in_flight.enter();
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move {
                let started = tokio::time::Instant::now();
                in_flight.quiet_for(Duration::from_millis(500)).await;
                started.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!waiting.is_finished(), "a request is in flight");
        drop(guard);
        // a new request within the quiet period starts the wait over
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = in_flight.enter();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(again);
        let waited = waiting.await.unwrap();
        assert_eq!(waited, Duration::from_millis(2000 + 300 + 100 + 500));
    }

    #[tokio::test]
    async fn past_the_limit_a_request_is_answered_503_overloaded_without_reaching_the_service() {
        /// Answers 200 to anything, counting its calls.
        struct Answers(Arc<AtomicUsize>);
        impl hyper::service::Service<()> for Answers {
            type Response = Response<Body>;
            type Error = Infallible;
            type Future = std::future::Ready<Result<Response<Body>, Infallible>>;
            fn call(&self, (): ()) -> Self::Future {
                self.0.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Ok(Response::new(Body::empty())))
            }
        }
        let calls = Arc::new(AtomicUsize::new(0));
        let service = Answers(calls.clone());
        let in_flight = in_flight(2);
        let counted = Counted::new(service, in_flight.clone());
        let (first, second) = (in_flight.enter(), in_flight.enter());
        assert!(first.is_some() && second.is_some());

        let refused = hyper::service::Service::call(&counted, ()).await.unwrap();
        assert_eq!(refused.status(), 503);
        assert_eq!(refused.headers()["outrigger-error"], "overloaded");
        assert_eq!(calls.load(Ordering::Relaxed), 0);
        assert_eq!((in_flight.count(), in_flight.shed.get()), (2, 1));

        drop(first);
        let admitted = hyper::service::Service::call(&counted, ()).await.unwrap();
        assert_eq!(admitted.status(), 200);
        assert_eq!((calls.load(Ordering::Relaxed), in_flight.count()), (1, 1));
    }
}
