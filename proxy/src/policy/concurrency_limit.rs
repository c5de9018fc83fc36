//! Concurrency limit: at most `concurrency_limit` requests in flight to an upstream. One more
//! gets 503 `overloaded` at once, never a queue that hangs the client: shedding load early is
//! what keeps a slow upstream from taking its callers down with it.
//!
//! A request counts from admission until its response headers arrive (as tower's own limit).

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;
use crate::policy::{Admitted, Shadow};

#[derive(Debug, Clone)]
pub struct ConcurrencyLimitLayer {
    permits: Arc<Semaphore>,
    limit: usize,
    upstream: Arc<str>,
    /// `mode: shadow`: count, never refuse.
    shadow: Option<Shadow>,
}

impl ConcurrencyLimitLayer {
    pub fn new(upstream: &Arc<str>, limit: std::num::NonZeroUsize) -> Self {
        let limit = limit.get();
        let permits = Arc::new(Semaphore::new(limit));
        Self { permits, limit, upstream: upstream.clone(), shadow: None }
    }

    /// In shadow mode: a request over the limit goes on (holding no slot), noted by `shadow`.
    pub fn shadow(mut self, shadow: Option<Shadow>) -> Self {
        self.shadow = shadow;
        self
    }
}

impl<S> tower::Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit { inner, layer: self.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    layer: ConcurrencyLimitLayer,
}

impl<S, Req> tower::Service<Req> for ConcurrencyLimit<S>
where
    S: tower::Service<Req, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = Admitted<S::Future, Option<OwnedSemaphorePermit>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match (self.layer.permits.clone().try_acquire_owned(), &self.layer.shadow) {
            (Ok(permit), _) => Admitted::inner(self.inner.call(req), Some(permit)),
            (Err(_), Some(shadow)) => {
                shadow.note();
                Admitted::inner(self.inner.call(req), None)
            }
            (Err(_), None) => Admitted::refused(ProxyError::Overloaded {
                upstream: self.layer.upstream.clone(),
                limit: self.layer.limit,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use tokio::sync::oneshot;
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    #[tokio::test]
    async fn over_the_limit_is_refused_at_once_and_a_finished_request_frees_its_slot() {
        let layer = ConcurrencyLimitLayer::new(&Arc::from("p"), NonZeroUsize::new(1).unwrap());
        let mut svc = layer.layer(tower::service_fn(|rx: oneshot::Receiver<()>| async move {
            rx.await.ok();
            Ok::<_, ProxyError>(())
        }));
        let (release, rx) = oneshot::channel();
        let first = tokio::spawn(svc.ready().await.unwrap().call(rx));
        tokio::task::yield_now().await;

        let (_keep, rx2) = oneshot::channel::<()>();
        let err = svc.ready().await.unwrap().call(rx2).await.expect_err("over the limit");
        assert!(matches!(err, ProxyError::Overloaded { limit: 1, .. }), "{err:?}");

        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        let (done, rx3) = oneshot::channel();
        done.send(()).unwrap();
        svc.ready().await.unwrap().call(rx3).await.expect("the slot is free again");
    }
}
