//! Requests in flight on the app-facing listeners, so a drain can tell when the app has gone
//! quiet: after SIGTERM the outbound listeners keep serving the app (it may be shutting down
//! too and still need its calls) until no request has been in flight for a moment.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;

/// The count, shared by every app-facing listener.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    changed: Notify,
}

impl InFlight {
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

    fn enter(self: &Arc<Self>) -> Guard {
        // only the edges between idle and busy matter to a drain: no lock on a busy path
        if self.count.fetch_add(1, Ordering::AcqRel) == 0 {
            self.changed.notify_waiters();
        }
        Guard(self.clone())
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

/// A service whose calls are counted in an [`InFlight`].
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
    S: hyper::service::Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn call(&self, req: Req) -> Self::Future {
        let guard = self.in_flight.enter();
        CountedFuture { inner: self.inner.call(req), _guard: guard }
    }
}

pin_project_lite::pin_project! {
    /// The inner response future, holding the count until it resolves or is dropped.
    #[derive(Debug)]
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        _guard: Guard,
    }
}

impl<F: Future> Future for CountedFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn quiet_waits_for_the_last_request_and_then_the_quiet_period() {
        let in_flight = Arc::new(InFlight::default());
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
}
