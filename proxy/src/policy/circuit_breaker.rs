//! Circuit breaker: stop sending to an upstream that keeps failing, so it can recover and our
//! callers get a fast 503 `circuit-open` (with `Retry-After`) instead of a slow timeout.
//!
//! closed --(failure rate over `window` once `min_requests` were seen, or `consecutive_failures`
//! in a row)--> open --(`open_for`)--> half-open; half-open admits `half_open_requests` probes:
//! all succeed -> closed, any fails -> open again. Failures are 5xx answers, timeouts, connection
//! failures and resets; 4xx are the client's problem, not the upstream's. A gRPC call fails by
//! its `grpc-status` (`unknown`, `deadline-exceeded`, `internal`, `unavailable`, `data-loss`):
//! read from a trailers-only head at once, else recorded when its trailers pass (`http/grpc/`).
//!
//! An operator can force a breaker ([`CircuitControl`], `POST /v1/upstreams/{name}/circuit`):
//! forced open, every request is refused `circuit-open`; forced closed, every request goes
//! through and nothing opens it. Outcomes are not counted while forced, and `auto` gives the
//! breaker back to its policy closed, with a fresh window.

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
use crate::policy::Shadow;

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

/// A state an operator imposed, whatever the outcomes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forced {
    Open,
    Closed,
}

impl Forced {
    pub fn as_str(self) -> &'static str {
        match self {
            Forced::Open => "open",
            Forced::Closed => "closed",
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
    forced: Option<Forced>,
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
            forced: None,
            consecutive: 0,
            epoch: now,
            current: 0,
            buckets: Default::default(),
        }
    }

    /// The state of the policy (what it would be without a forced state).
    pub fn state(&self) -> State {
        self.state
    }

    pub fn forced(&self) -> Option<Forced> {
        self.forced
    }

    /// What the breaker does now, for `outrigger_circuit_state`: the forced state when forced.
    pub fn gauge(&self) -> i64 {
        match self.forced {
            Some(Forced::Open) => 2,
            Some(Forced::Closed) => 0,
            None => self.state.gauge(),
        }
    }

    /// What it does now and whether that is forced, for the admin API.
    pub fn status(&self) -> CircuitStatus {
        CircuitStatus { state: state_name(self.gauge()), forced: self.forced }
    }

    /// Imposes `forced`, or with `None` gives the breaker back to its policy, closed and with
    /// a fresh window (what it saw before or while forced says nothing of the upstream now).
    pub fn force(&mut self, forced: Option<Forced>, now: Instant) {
        if forced.is_none() && self.forced.is_some() {
            self.close(now);
        }
        self.forced = forced;
    }

    /// May this request go through? `Err` says how long until the next probe.
    pub fn admit(&mut self, now: Instant) -> Result<Admission, Duration> {
        match self.forced {
            // no probe comes until someone says so: the policy's own wait is the best guess
            Some(Forced::Open) => return Err(self.cfg.open_for.get()),
            Some(Forced::Closed) => return Ok(Admission::Normal),
            None => {}
        }
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
        if self.forced.is_some() {
            return;
        }
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
    /// `mode: shadow`, for one route's stack: count, never refuse.
    shadow: Option<Shadow>,
}

#[derive(Debug)]
struct Shared {
    upstream: Arc<str>,
    breaker: Mutex<Breaker>,
    gauge: IntGauge,
    /// `outrigger_circuit_forced`: 1 while an operator forces the state.
    forced_gauge: IntGauge,
}

impl Shared {
    /// Runs `f` on the breaker and publishes a state change; the lock is never held across
    /// an `.await` (the whole critical section is a few comparisons).
    fn with<T>(&self, f: impl FnOnce(&mut Breaker) -> T) -> T {
        let mut breaker = self.breaker.lock().expect("no panics while the breaker is locked");
        let before = breaker.gauge();
        let out = f(&mut breaker);
        let after = breaker.gauge();
        if before != after {
            self.gauge.set(after);
            let state = state_name(after);
            tracing::info!(upstream = %self.upstream, state, "circuit breaker changed state");
        }
        out
    }
}

/// `closed`, `half-open` or `open`, from the gauge's value.
fn state_name(gauge: i64) -> &'static str {
    match gauge {
        0 => "closed",
        1 => "half-open",
        _ => "open",
    }
}

impl CircuitBreakerLayer {
    /// `gauges`: `outrigger_circuit_state` and `outrigger_circuit_forced` of `upstream`.
    pub fn new(
        upstream: &Arc<str>,
        cfg: config::CircuitBreaker,
        (gauge, forced_gauge): (IntGauge, IntGauge),
    ) -> Self {
        gauge.set(State::Closed.gauge());
        forced_gauge.set(0);
        let breaker = Mutex::new(Breaker::new(cfg, Instant::now()));
        let shared = Shared { upstream: upstream.clone(), breaker, gauge, forced_gauge };
        Self { shared: Arc::new(shared), shadow: None }
    }

    /// The breaker of `kept` (a reload's previous one for this upstream) when its policy is
    /// `cfg` but for the mode: its state goes on (switching between shadow and enforce, or an
    /// edit of another section, does not close an open breaker); else a new one.
    pub fn new_or_kept(
        upstream: &Arc<str>,
        cfg: config::CircuitBreaker,
        gauges: (IntGauge, IntGauge),
        kept: Option<&CircuitControl>,
    ) -> Self {
        let same = |k: &&CircuitControl| {
            let mut was = k.shared.with(|b| b.cfg);
            was.mode = cfg.mode;
            was == cfg
        };
        match kept {
            Some(kept) if same(&kept) => {
                kept.shared.with(|b| b.cfg.mode = cfg.mode);
                Self { shared: kept.shared.clone(), shadow: None }
            }
            // a new breaker, forced as its predecessor was (an operator's decision outlives
            // an edit), before any request can reach it
            Some(kept) => {
                let fresh = Self::new(upstream, cfg, gauges);
                if let Some(forced) = kept.status().forced {
                    fresh.control().force(Some(forced));
                }
                fresh
            }
            None => Self::new(upstream, cfg, gauges),
        }
    }

    /// This layer for one route's stack, noting with `shadow` what it would refuse when the
    /// breaker is in shadow mode.
    pub fn shadow(&self, shadow: Option<Shadow>) -> Self {
        Self { shared: self.shared.clone(), shadow }
    }

    /// The handle that forces this breaker's state (the admin API).
    pub fn control(&self) -> CircuitControl {
        CircuitControl { shared: self.shared.clone() }
    }
}

/// Forces a breaker open or closed, or gives it back to its policy; cheap to clone.
#[derive(Debug, Clone)]
pub struct CircuitControl {
    shared: Arc<Shared>,
}

/// What `GET /v1/upstreams/{name}/circuit` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitStatus {
    /// What the breaker does now: `closed`, `half-open` or `open`.
    pub state: &'static str,
    pub forced: Option<Forced>,
}

impl CircuitControl {
    pub fn status(&self) -> CircuitStatus {
        self.shared.with(|b| b.status())
    }

    /// Forces the state (`None`: back to the policy); logged at warn when it changes.
    pub fn force(&self, forced: Option<Forced>) -> CircuitStatus {
        // the gauge and the status under the breaker's lock: two overlapping calls cannot
        // leave the gauge saying the opposite of the breaker
        let (before, status) = self.shared.with(|b| {
            let before = b.forced();
            b.force(forced, Instant::now());
            self.shared.forced_gauge.set(i64::from(forced.is_some()));
            (before, b.status())
        });
        let upstream = &*self.shared.upstream;
        match (before, forced) {
            (before, Some(now)) if before != Some(now) => tracing::warn!(
                upstream,
                forced = now.as_str(),
                "circuit breaker forced {}: it stays so until `outrigger circuit auto {upstream}`",
                now.as_str()
            ),
            (Some(was), None) => tracing::warn!(
                upstream,
                was = was.as_str(),
                "circuit breaker given back to its policy (closed, fresh window)"
            ),
            _ => {}
        }
        status
    }

    /// This breaker is gone (its upstream, or its section, removed by a reload): a forced
    /// state no longer holds, so `outrigger_circuit_forced` goes back to 0.
    pub fn retire(&self) {
        self.shared.with(|b| {
            if b.forced().is_some() {
                self.shared.forced_gauge.set(0);
            }
        });
    }

    /// Whether `other` is this very breaker.
    pub fn same_as(&self, other: &CircuitControl) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl<S> tower::Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker { inner, shared: self.shared.clone(), shadow: self.shadow.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Arc<Shared>,
    shadow: Option<Shadow>,
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
        let (admitted, forced) = self.shared.with(|b| (b.admit(Instant::now()), b.forced()));
        // an operator's `open` is obeyed even in shadow mode
        let shadow = self.shadow.as_ref().filter(|_| forced != Some(Forced::Open));
        match (admitted, shadow) {
            (Ok(admission), _) => ResponseFuture {
                state: FutureState::Admitted { fut: self.inner.call(req) },
                outcome: Some(Outcome { shared: self.shared.clone(), admission, recorded: false }),
            },
            // in shadow mode a request it would refuse goes on, and its outcome is not
            // recorded: the breaker's state is what it would be if it had been refused
            (Err(_), Some(shadow)) => {
                shadow.note();
                ResponseFuture {
                    state: FutureState::Admitted { fut: self.inner.call(req) },
                    outcome: None,
                }
            }
            (Err(retry_after), None) => ResponseFuture {
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
