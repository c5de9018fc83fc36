//! Rate limit: at most `requests_per_second` to an upstream, with bursts of `burst`, by GCRA
//! (governor). Over the limit: 429 `rate-limited` with `Retry-After`, at once, and nothing is
//! forwarded: a client told to come back later costs the upstream nothing.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use outrigger_config as config;
use prometheus::IntCounter;

use crate::error::ProxyError;
use crate::policy::{Admitted, Shadow};

type Limiter = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    DefaultClock,
    governor::middleware::NoOpMiddleware<<DefaultClock as Clock>::Instant>,
>;

#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<Limiter>,
    upstream: Arc<str>,
    rejected: IntCounter,
    /// `mode: shadow`: count, never refuse.
    shadow: Option<Shadow>,
}

impl RateLimitLayer {
    pub fn new(upstream: &Arc<str>, cfg: &config::RateLimit, rejected: IntCounter) -> Self {
        let quota = quota(cfg.requests_per_second, cfg.effective_burst());
        let limiter = Arc::new(RateLimiter::direct(quota));
        Self { limiter, upstream: upstream.clone(), rejected, shadow: None }
    }

    /// In shadow mode: what it would refuse goes on, noted by `shadow`.
    pub fn shadow(mut self, shadow: Option<Shadow>) -> Self {
        self.shadow = shadow;
        self
    }
}

fn quota(per_second: NonZeroU32, burst: NonZeroU32) -> Quota {
    Quota::per_second(per_second).allow_burst(burst)
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit { inner, layer: self.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

impl<S, Req> tower::Service<Req> for RateLimit<S>
where
    S: tower::Service<Req, Error = ProxyError>,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = Admitted<S::Future, ()>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let limiter = &self.layer.limiter;
        match (limiter.check(), &self.layer.shadow) {
            (Ok(()), _) => Admitted::inner(self.inner.call(req), ()),
            (Err(_), Some(shadow)) => {
                shadow.note();
                Admitted::inner(self.inner.call(req), ())
            }
            (Err(not_until), None) => {
                self.layer.rejected.inc();
                let retry_after = not_until.wait_time_from(limiter.clock().now());
                let upstream = self.layer.upstream.clone();
                Admitted::refused(ProxyError::RateLimited { upstream, retry_after })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    #[tokio::test]
    async fn a_burst_passes_then_the_next_request_gets_429_with_the_wait() {
        let cfg = config::RateLimit {
            requests_per_second: NonZeroU32::new(2).unwrap(),
            burst: NonZeroU32::new(3),
            mode: config::Mode::Enforce,
        };
        let rejected = IntCounter::new("t", "t").unwrap();
        let layer = RateLimitLayer::new(&Arc::from("p"), &cfg, rejected.clone());
        let mut svc = layer.layer(tower::service_fn(|()| async { Ok::<_, ProxyError>(()) }));
        for _ in 0..3 {
            svc.ready().await.unwrap().call(()).await.expect("within the burst");
        }
        let err = svc.ready().await.unwrap().call(()).await.expect_err("over the burst");
        let ProxyError::RateLimited { retry_after, .. } = err else { panic!("{err:?}") };
        // at 2 per second the next slot is at most half a second away
        assert!(retry_after <= Duration::from_millis(500), "{retry_after:?}");
        assert_eq!(rejected.get(), 1);
    }
}
