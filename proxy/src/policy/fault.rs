//! Fault injection (`fault` on an upstream or a route, DESIGN "Faults"): a share of requests
//! is held for `delay.duration`, and a share is answered at once with `abort.status` and
//! `outrigger-error: fault-injected`, forwarding nothing (a gRPC call gets the matching gRPC
//! status). The layer sits before every other policy, as Envoy's fault filter sits before its
//! router: an injected abort is what the client gets, never retried, never counted by the
//! breaker; an injected delay counts against nothing but the client's patience.
//!
//! Each request draws anew, delay and abort independently, from the thread's random generator:
//! `percent` of requests, decimals allowed, 0 never and 100 always. A request with
//! `outrigger-fault: off` is exempt (health checks, probes, the test's own control calls).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, StatusCode};
use outrigger_config as config;
use prometheus::IntCounter;

use crate::error::ProxyError;

/// The request header that exempts a request: `outrigger-fault: off`.
pub const EXEMPT_HEADER: &str = "outrigger-fault";

/// `outrigger_faults_injected_total` of one upstream and route, by kind.
#[derive(Debug, Clone)]
pub struct FaultCounts {
    pub delay: IntCounter,
    pub abort: IntCounter,
}

#[derive(Debug, Clone)]
pub struct FaultLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    upstream: Arc<str>,
    fault: config::Fault,
    counts: FaultCounts,
}

impl FaultLayer {
    pub fn new(upstream: &Arc<str>, fault: config::Fault, counts: FaultCounts) -> Self {
        Self { shared: Arc::new(Shared { upstream: upstream.clone(), fault, counts }) }
    }
}

impl<S> tower::Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Fault<S> {
        Fault { inner, shared: self.shared.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Fault<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Whether this request is among `percent` of them: one fresh draw, unbiased.
fn chosen(percent: config::Percent) -> bool {
    rand::random::<f64>() * 100.0 < percent.get()
}

/// Whether the request opted out with `outrigger-fault: off`.
fn exempt<B>(req: &Request<B>) -> bool {
    req.headers().get(EXEMPT_HEADER).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"off"))
}

impl<S, B> tower::Service<Request<B>> for Fault<S>
where
    S: tower::Service<Request<B>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = FaultFuture<S::Future, S::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fault = &self.shared.fault;
        let (delay, abort) = match exempt(&req) {
            true => (None, None),
            false => (
                fault.delay.filter(|d| chosen(d.percent)),
                fault.abort.filter(|a| chosen(a.percent)),
            ),
        };
        let abort = abort.map(|a| {
            self.shared.counts.abort.inc();
            ProxyError::FaultInjected {
                upstream: self.shared.upstream.clone(),
                status: StatusCode::from_u16(a.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            }
        });
        let Some(delay) = delay else {
            return match abort {
                Some(err) => FaultFuture::Refused { err: Some(err) },
                None => FaultFuture::Now { fut: self.inner.call(req) },
            };
        };
        self.shared.counts.delay.inc();
        // the service that was made ready answers after the delay; a clone stays here
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let duration = delay.duration.get();
        FaultFuture::Delayed {
            fut: Box::pin(async move {
                tokio::time::sleep(duration).await;
                match abort {
                    Some(err) => Err(err),
                    None => ready.call(req).await,
                }
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner call at once, an abort at once, or either after a delay.
    #[project = FaultFutureProj]
    #[allow(missing_debug_implementations)]
    pub enum FaultFuture<F, T> {
        Now { #[pin] fut: F },
        Refused { err: Option<ProxyError> },
        Delayed { fut: Pin<Box<dyn Future<Output = Result<T, ProxyError>> + Send>> },
    }
}

impl<F, T> Future for FaultFuture<F, T>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    type Output = Result<T, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            FaultFutureProj::Now { fut } => fut.poll(cx),
            FaultFutureProj::Refused { err } => {
                Poll::Ready(Err(err.take().expect("polled after completion")))
            }
            FaultFutureProj::Delayed { fut } => fut.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    fn counts() -> FaultCounts {
        FaultCounts {
            delay: IntCounter::new("d", "d").unwrap(),
            abort: IntCounter::new("a", "a").unwrap(),
        }
    }

    fn percent(p: f64) -> config::Percent {
        config::Percent::try_from(p).unwrap()
    }

    fn abort(p: f64, status: u16) -> config::Fault {
        config::Fault {
            delay: None,
            abort: Some(config::FaultAbort { percent: percent(p), status }),
        }
    }

    /// The layer around a service that counts what reached it.
    fn service(
        fault: config::Fault,
        counts: FaultCounts,
    ) -> (impl Service<Request<()>, Response = (), Error = ProxyError>, Arc<AtomicUsize>) {
        let reached = Arc::new(AtomicUsize::new(0));
        let seen = reached.clone();
        let inner = tower::service_fn(move |_req: Request<()>| {
            seen.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, ProxyError>(()) }
        });
        (FaultLayer::new(&Arc::from("payments"), fault, counts).layer(inner), reached)
    }

    #[tokio::test]
    async fn the_share_aborted_over_ten_thousand_requests_is_the_percent_asked() {
        // 25% of 10,000: 2,500 expected, one standard deviation is 43; 10 of them either
        // side, so the test fails only when the draw is biased, not by chance (p < 1e-20)
        let counts = counts();
        let (mut svc, reached) = service(abort(25.0, 503), counts.clone());
        let mut aborted = 0;
        for _ in 0..10_000 {
            match svc.ready().await.unwrap().call(Request::new(())).await {
                Ok(()) => {}
                Err(ProxyError::FaultInjected { status, .. }) => {
                    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
                    aborted += 1;
                }
                Err(other) => panic!("{other}"),
            }
        }
        assert!((2_070..=2_930).contains(&aborted), "{aborted} of 10,000 aborted at 25%");
        assert_eq!(reached.load(Ordering::Relaxed), 10_000 - aborted, "an abort forwards nothing");
        assert_eq!(counts.abort.get(), aborted as u64);
    }

    #[tokio::test]
    async fn zero_percent_never_and_a_hundred_always_and_an_exempt_request_never() {
        let (mut never, _) = service(abort(0.0, 500), counts());
        let (mut always, reached) = service(abort(100.0, 500), counts());
        for _ in 0..1000 {
            assert!(never.ready().await.unwrap().call(Request::new(())).await.is_ok());
            assert!(always.ready().await.unwrap().call(Request::new(())).await.is_err());
        }
        let exempt = Request::builder().header(EXEMPT_HEADER, "OFF").body(()).unwrap();
        assert!(always.ready().await.unwrap().call(exempt).await.is_ok());
        assert_eq!(reached.load(Ordering::Relaxed), 1, "only the exempt request went through");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_request_is_held_for_the_duration_then_forwarded() {
        let delay = config::FaultDelay {
            percent: percent(100.0),
            duration: outrigger_config::Duration::from_millis(300),
        };
        let counts = counts();
        let fault = config::Fault { delay: Some(delay), abort: None };
        let (mut svc, reached) = service(fault, counts.clone());
        let started = tokio::time::Instant::now();
        svc.ready().await.unwrap().call(Request::new(())).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!((reached.load(Ordering::Relaxed), counts.delay.get()), (1, 1));
    }
}
