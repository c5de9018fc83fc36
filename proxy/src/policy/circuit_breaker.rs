//! Circuit breaker: stop sending to an upstream that keeps failing, so it can recover and our
//! callers get a fast 503 `circuit-open` (with `Retry-After`) instead of a slow timeout.
//!
//! closed --(failure rate over `window` once `min_requests` were seen, or `consecutive_failures`
//! in a row)--> open --(`open_for`)--> half-open; half-open admits `half_open_requests` probes:
//! all succeed -> closed, any fails -> open again. Failures are 5xx answers, timeouts, connection
//! failures and resets; 4xx are the client's problem, not the upstream's. A gRPC call fails by
//! its `grpc-status` (`unknown`, `deadline-exceeded`, `internal`, `unavailable`, `data-loss`):
//! read from a trailers-only head at once, else recorded when its trailers pass (`http/grpc/`).

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use outrigger_config as config;
use outrigger_discovery::time::saturating_add;
use prometheus::IntGauge;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::grpc::{self, Verdict};

const BUCKETS: u32 = 10;
/// `Retry-After` for a request refused while the probes are out: their verdict is near.
const PROBING_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, succeeded: u32 },
}

impl State {
    /// The `outrigger_circuit_state` value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen { .. } => 1,
            Self::Open { .. } => 2,
        }
    }
}

/// How a request was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

/// The state machine: no I/O and no clock of its own, so a test can drive it step by step.
#[derive(Debug)]
pub struct Breaker {
    cfg: config::CircuitBreaker,
    state: State,
    consecutive: u32,
    epoch: Instant,
    current: u64,
    /// (requests, failures) per bucket of `window / BUCKETS`.
    buckets: [(u32, u32); BUCKETS as usize],
}

impl Breaker {
    pub fn new(cfg: config::CircuitBreaker, now: Instant) -> Self {
        Self {
            cfg,
            state: State::Closed,
            consecutive: 0,
            epoch: now,
            current: 0,
            buckets: Default::default(),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// May this request go through? `Err` says how long until the next probe.
    pub fn admit(&mut self, now: Instant) -> Result<Admission, Duration> {
        if let State::Open { until } = self.state {
            if now < until {
                return Err(until - now);
            }
            self.state = State::HalfOpen { in_flight: 0, succeeded: 0 };
        }
        match &mut self.state {
            State::Closed => Ok(Admission::Normal),
            State::HalfOpen { in_flight, succeeded } => {
                if *in_flight + *succeeded < self.cfg.half_open_requests.get() {
                    *in_flight += 1;
                    Ok(Admission::Probe)
                } else {
                    Err(PROBING_RETRY_AFTER)
                }
            }
            State::Open { .. } => unreachable!("an open breaker half-opened above or returned"),
        }
    }

    /// The outcome of an admitted request.
    pub fn record(&mut self, now: Instant, admission: Admission, failed: bool) {
        match (admission, &mut self.state) {
            (Admission::Probe, State::HalfOpen { in_flight, succeeded }) => {
                *in_flight -= 1;
                if failed {
                    self.open(now);
                } else {
                    *succeeded += 1;
                    if *succeeded >= self.cfg.half_open_requests.get() {
                        self.close(now);
                    }
                }
            }
            (Admission::Normal, State::Closed) => {
                self.consecutive = if failed { self.consecutive + 1 } else { 0 };
                let (requests, failures) = {
                    let bucket = self.bucket(now);
                    bucket.0 += 1;
                    bucket.1 += u32::from(failed);
                    self.totals()
                };
                let by_rate = requests >= self.cfg.min_requests.max(1)
                    && f64::from(failures) >= self.cfg.failure_rate.get() * f64::from(requests);
                let in_a_row =
                    self.cfg.consecutive_failures.is_some_and(|n| self.consecutive >= n.get());
                if failed && (by_rate || in_a_row) {
                    self.open(now);
                }
            }
            // a request admitted before a transition finished after it: it says nothing
            // about the current state
            _ => {}
        }
    }

    /// An admitted request ended without an outcome (its client went away).
    pub fn cancel(&mut self, admission: Admission) {
        if let (Admission::Probe, State::HalfOpen { in_flight, .. }) = (admission, &mut self.state)
        {
            *in_flight -= 1;
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open { until: saturating_add(now, self.cfg.open_for.get()) };
    }

    fn close(&mut self, now: Instant) {
        self.state = State::Closed;
        self.consecutive = 0;
        self.buckets = Default::default();
        self.epoch = now;
        self.current = 0;
    }

    fn totals(&self) -> (u32, u32) {
        self.buckets.iter().fold((0, 0), |(r, f), b| (r + b.0, f + b.1))
    }

    fn bucket(&mut self, now: Instant) -> &mut (u32, u32) {
        let bucket_len = (self.cfg.window.get() / BUCKETS).max(Duration::from_millis(1));
        let index =
            (now.saturating_duration_since(self.epoch).as_nanos() / bucket_len.as_nanos()) as u64;
        if index > self.current {
            for i in (self.current + 1)..=index.min(self.current + u64::from(BUCKETS)) {
                self.buckets[(i % u64::from(BUCKETS)) as usize] = (0, 0);
            }
            self.current = index;
        }
        &mut self.buckets[(self.current % u64::from(BUCKETS)) as usize]
    }
}

// === impl CircuitBreakerLayer ===

#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    upstream: Arc<str>,
    breaker: Mutex<Breaker>,
    gauge: IntGauge,
}

impl Shared {
    /// Runs `f` on the breaker and publishes a state change; the lock is never held across
    /// an `.await` (the whole critical section is a few comparisons).
    fn with<T>(&self, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut breaker = self.breaker.lock().expect("no panics while the breaker is locked");
        let before = breaker.state();
        let out = f(&mut breaker);
        let after = breaker.state();
        if before.gauge() != after.gauge() {
            self.gauge.set(after.gauge());
            let state = match after {
                State::Closed => "closed",
                State::HalfOpen { .. } => "half-open",
                State::Open { .. } => "open",
            };
            tracing::info!(upstream = %self.upstream, state, "circuit breaker changed state");
        }
        out
    }
}

impl CircuitBreakerLayer {
    pub fn new(upstream: &Arc<str>, cfg: config::CircuitBreaker, gauge: IntGauge) -> Self {
        gauge.set(State::Closed.gauge());
        let breaker = Mutex::new(Breaker::new(cfg, Instant::now()));
        Self { shared: Arc::new(Shared { upstream: upstream.clone(), breaker, gauge }) }
    }
}

impl<S> tower::Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker { inner, shared: self.shared.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, Req> tower::Service<Req> for CircuitBreaker<S>
where
    S: tower::Service<Req, Response = Response<Body>, Error = ProxyError>,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match self.shared.with(|b| b.admit(Instant::now())) {
            Ok(admission) => ResponseFuture {
                state: FutureState::Admitted { fut: self.inner.call(req) },
                outcome: Some(Outcome { shared: self.shared.clone(), admission, recorded: false }),
            },
            Err(retry_after) => ResponseFuture {
                state: FutureState::Refused {
                    err: Some(ProxyError::CircuitOpen {
                        upstream: self.shared.upstream.clone(),
                        retry_after,
                    }),
                },
                outcome: None,
            },
        }
    }
}

/// Records the outcome of an admitted request exactly once, or cancels it when dropped first.
#[derive(Debug)]
struct Outcome {
    shared: Arc<Shared>,
    admission: Admission,
    recorded: bool,
}

impl Outcome {
    fn record(mut self, failed: bool) {
        let admission = self.admission;
        self.shared.with(|b| b.record(Instant::now(), admission, failed));
        self.recorded = true;
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.recorded {
            let admission = self.admission;
            self.shared.with(|b| b.cancel(admission));
        }
    }
}

pin_project_lite::pin_project! {
    #[allow(missing_debug_implementations)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: FutureState<F>,
        outcome: Option<Outcome>,
    }
}

pin_project_lite::pin_project! {
    #[project = FutureStateProj]
    enum FutureState<F> {
        Admitted { #[pin] fut: F },
        Refused { err: Option<ProxyError> },
    }
}

impl<F> std::future::Future for ResponseFuture<F>
where
    F: std::future::Future<Output = Result<Response<Body>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        match this.state.project() {
            FutureStateProj::Refused { err } => {
                Poll::Ready(Err(err.take().expect("polled after completion")))
            }
            FutureStateProj::Admitted { fut } => {
                let mut result = std::task::ready!(fut.poll(cx));
                if let Some(outcome) = this.outcome.take() {
                    match &mut result {
                        Ok(res) => match grpc::verdict(res) {
                            Verdict::Head { failed } => outcome.record(failed),
                            // a gRPC status in trailers: recorded when they pass to the client
                            Verdict::Trailers(watch) => watch.on_status(move |status| {
                                outcome.record(grpc::is_failure(status));
                            }),
                        },
                        Err(err) => outcome.record(err.status().is_server_error()),
                    }
                }
                Poll::Ready(result)
            }
        }
    }
}

#[cfg(test)]
mod tests;
