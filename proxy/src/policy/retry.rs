//! Retries: send a failed request again, after a backoff, when it is safe and worth it.
//!
//! Safe: only idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE), requests carrying
//! an `Idempotency-Key` or any request of a route marked `idempotent` are sent twice; any request is retried when its connection could not be
//! opened (nothing was sent). A body is replayed only if it fits `replay_buffer`; a larger one
//! streams through once; a gRPC call's body is not held back (a streaming call would hang) but
//! sent at once and copied on the way (`http/tee.rs`). Worth it: the failure is in `on`,
//! attempts remain, the retry budget has room, and the backoff (or the upstream's
//! `Retry-After`, capped at `backoff.max`) ends before the call's deadline (`deadline.rs`: the
//! time left that the layer outside wrote into the request's `outrigger-timeout`; each later
//! attempt is sent with what is left then). A gRPC call is retried on a status `on` lists when
//! it comes in a trailers-only head, whatever the method; never on one in trailers. Otherwise
//! the client gets the last answer as it came, with `outrigger-attempts: N` when N > 1.
//! Every attempt after the first carries `outrigger-attempt: N`. With `hedge`, a slow attempt
//! of a request safe to send twice, with its body kept whole (a gRPC call's copy once its
//! stream ended), gets company (`retry/hedge.rs`): hedges spend the budget and count as attempts.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use outrigger_config as config;
use outrigger_discovery::time::saturating_add;
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::forward::Tried;
use crate::http::grpc;
use crate::http::respond::error_response;
use crate::http::tee::Tee;
use crate::policy::backoff::{Backoff, parse_retry_after};
use crate::policy::budget::Budget;
use crate::policy::deadline;

mod hedge;

use hedge::{Hedge, Race};

pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("outrigger-attempts");
/// Sent upstream on every attempt after the first (retry or hedge): its number.
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("outrigger-attempt");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

#[derive(Debug, Clone)]
pub struct RetryLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    max_attempts: u32,
    backoff: Backoff,
    on: Vec<config::RetryOn>,
    /// `on` lists a gRPC status.
    on_grpc: bool,
    /// Shared with the `RetryBudget` handles that read it.
    budget: Arc<Mutex<Budget>>,
    replay_cap: usize,
    /// `timeouts.request`: no backoff sleep may end past it, nor past a sooner call deadline.
    request_timeout: Duration,
    retries: IntCounter,
    /// A route marked `idempotent: true`: every request of it is safe to send twice.
    all_idempotent: bool,
    /// `hedge` on the upstream or route: extra attempts while one is slow (`retry/hedge.rs`).
    hedge: Option<Hedge>,
    /// Where the backoff's jitter is drawn from when it must repeat (`outrigger explain
    /// --seed`); `None`: the thread's generator.
    draws: Option<Mutex<rand::rngs::StdRng>>,
}

impl RetryLayer {
    /// `request_timeout` is the upstream's whole-request timeout, which the layer outside this
    /// one enforces; a retry that could not finish within it is not started.
    pub fn new(cfg: &config::Retry, request_timeout: Duration, retries: IntCounter) -> Self {
        Self {
            shared: Arc::new(Shared {
                max_attempts: cfg.max_attempts.get(),
                backoff: Backoff::new(cfg.backoff),
                on: cfg.on.clone(),
                on_grpc: cfg.on.iter().any(|on| matches!(on, config::RetryOn::Grpc(_))),
                budget: Arc::new(Mutex::new(Budget::new(
                    cfg.budget.ratio.get(),
                    cfg.budget.min_per_second,
                ))),
                replay_cap: usize::try_from(cfg.replay_buffer.bytes()).unwrap_or(usize::MAX),
                request_timeout,
                retries,
                all_idempotent: false,
                hedge: None,
                draws: None,
            }),
        }
    }

    /// For a route marked `idempotent: true`: its requests are retried whatever their method.
    pub fn idempotent(mut self, all: bool) -> Self {
        Arc::get_mut(&mut self.shared).expect("set before the layer is cloned").all_idempotent =
            all;
        self
    }

    /// Draws the jitter from a generator seeded with `seed`, so a run repeats exactly.
    pub fn seeded(mut self, seed: Option<u64>) -> Self {
        use rand::SeedableRng;
        Arc::get_mut(&mut self.shared).expect("set before the layer is cloned").draws =
            seed.map(|seed| Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)));
        self
    }

    /// `hedge` on the upstream or route, with its `outrigger_hedges_total{upstream,route}`.
    pub fn hedge(mut self, hedge: Option<(&config::Hedge, IntCounter)>) -> Self {
        Arc::get_mut(&mut self.shared).expect("set before the layer is cloned").hedge =
            hedge.map(|(cfg, hedges)| Hedge::new(cfg, hedges));
        self
    }

    /// A handle that reads this layer's retry budget (`outrigger explain`'s "budget left").
    pub fn budget(&self) -> RetryBudget {
        RetryBudget(self.shared.budget.clone())
    }
}

/// Reads a retry layer's budget.
#[derive(Debug, Clone)]
pub struct RetryBudget(Arc<Mutex<Budget>>);

impl RetryBudget {
    /// How many retries (and hedges) the budget would grant now.
    pub fn left(&self) -> u32 {
        self.0.lock().expect("no panics under the budget lock").left(Instant::now())
    }
}

impl<S> tower::Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry { inner, shared: self.shared.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> tower::Service<Request<Body>> for Retry<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError> + Clone,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = RetryFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> RetryFuture<S> {
        RetryFuture::new(self.shared.clone(), self.inner.clone(), req)
    }
}

/// Why an attempt may be retried.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    Connect,
    /// A gRPC status listed in `on`, in a trailers-only head: listing it asserts the call is
    /// safe to repeat on that answer, whatever its method (DESIGN.md, "gRPC").
    GrpcHead,
    Other,
}

impl Shared {
    fn retryable(&self, result: &Result<Response<Body>, ProxyError>) -> Option<Failure> {
        let wanted = |on: config::RetryOn| self.on.contains(&on);
        match result {
            // a status in trailers never gets here as `Answered`: messages reached the client
            Ok(res) => match res.extensions().get::<grpc::Answered>() {
                Some(grpc::Answered(status)) => {
                    wanted(config::RetryOn::Grpc(*status)).then_some(Failure::GrpcHead)
                }
                None => {
                    wanted(config::RetryOn::Status(res.status().as_u16())).then_some(Failure::Other)
                }
            },
            Err(ProxyError::ConnectFailed { .. }) => {
                wanted(config::RetryOn::ConnectFailure).then_some(Failure::Connect)
            }
            Err(ProxyError::UpstreamReset { .. }) => {
                wanted(config::RetryOn::Reset).then_some(Failure::Other)
            }
            // inside this layer a timeout is always a per-try cut (the whole-request deadline
            // is outside it): the gateway timeout of that attempt, so `504` asks for it too, as
            // Envoy counts it (DESIGN "Policies")
            Err(ProxyError::Timeout { .. }) => (wanted(config::RetryOn::Timeout)
                || wanted(config::RetryOn::Status(504)))
            .then_some(Failure::Other),
            Err(_) => None,
        }
    }
}

fn idempotent<B>(req: &Request<B>) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    ) || req.headers().contains_key(IDEMPOTENCY_KEY)
}

type Buffering = Pin<Box<dyn Future<Output = Result<Replay, ProxyError>> + Send>>;

pin_project_lite::pin_project! {
    /// The attempts of one request. No allocation of its own: a body still to be read is
    /// buffered behind a box (only then), and each attempt gets a copy of the request head,
    /// which replaying needs.
    #[allow(missing_debug_implementations)]
    pub struct RetryFuture<S: tower::Service<Request<Body>>> {
        shared: Arc<Shared>,
        inner: S,
        request: Attempts,
        // the endpoints tried so far, lent to the forwarder while an attempt is made
        tried: Tried,
        #[pin]
        state: State<S::Future>,
    }
}

/// What the attempts of a request share.
struct Attempts {
    /// The request head, copied for each attempt; `None` once a streamed request was sent.
    parts: Option<http::request::Parts>,
    /// A body kept whole for replay, or one that streams through in a single attempt.
    body: Replay,
    idempotent: bool,
    /// The call's deadline: no backoff ends past it; each later attempt is sent with the rest.
    deadline: Instant,
    /// The head's time-left headers are no longer true (time passed while the body was read).
    stale: bool,
    attempt: u32,
    previous_delay: Duration,
    waited: Duration,
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        /// Reading a request body that may need replaying.
        Buffering { fut: Buffering },
        /// Waiting for the inner service to take the next attempt.
        Ready,
        /// An attempt in flight, and the hedges sent while it was slow.
        Calling { #[pin] race: Race<F> },
        Backoff { #[pin] sleep: tokio::time::Sleep },
        Done,
    }
}

impl<S: tower::Service<Request<Body>>> RetryFuture<S> {
    fn new(shared: Arc<Shared>, inner: S, req: Request<Body>) -> Self {
        let now = Instant::now();
        shared.budget.lock().expect("no panics under the budget lock").deposit(now);
        let idempotent = shared.all_idempotent || idempotent(&req);
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        // a gRPC call with gRPC statuses in `on` may be sent again whatever its method
        let grpc = grpc::is_grpc(req.headers());
        // a request that can never be sent twice streams through: holding its body back would
        // only delay it (an upgrade's connection becomes a tunnel: there is no second attempt)
        let replayable = !upgrade
            && (idempotent
                || (grpc && shared.on_grpc)
                || shared.on.contains(&config::RetryOn::ConnectFailure));
        let (parts, body) = req.into_parts();
        let (body, state) = match (replayable, body) {
            (false, body) => (Replay::Streaming(body), State::Ready),
            (true, Body::Full { data, trailers }) => {
                (Replay::Complete(data.unwrap_or_default(), trailers.map(|t| *t)), State::Ready)
            }
            (true, body) if http_body::Body::is_end_stream(&body) => {
                (Replay::Complete(Bytes::new(), None), State::Ready)
            }
            // a gRPC call may stream both ways: it is sent at once and copied on the way
            (true, Body::Client { inner }) if grpc => {
                (Replay::Teeing(Tee::new(inner, shared.replay_cap)), State::Ready)
            }
            (true, body) => {
                let fut: Buffering = Box::pin(buffer(body, shared.replay_cap));
                (Replay::Unavailable, State::Buffering { fut })
            }
        };
        // the layer outside says how much of the call is left (DESIGN "Deadlines")
        let left = deadline::time_left(&parts.headers)
            .map_or(shared.request_timeout, |left| left.min(shared.request_timeout));
        let request = Attempts {
            parts: Some(parts),
            body,
            idempotent,
            deadline: saturating_add(now, left),
            stale: matches!(state, State::Buffering { .. }),
            attempt: 1,
            previous_delay: shared.backoff.initial(),
            waited: Duration::ZERO,
        };
        Self { shared, inner, request, tried: Tried::default(), state }
    }
}

impl<S> Future for RetryFuture<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
{
    type Output = Result<Response<Body>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Buffering { fut } => {
                    this.request.body = match ready!(fut.as_mut().poll(cx)) {
                        Ok(replay) => replay,
                        Err(err) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(err));
                        }
                    };
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    if let Err(err) = ready!(this.inner.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(err));
                    }
                    let req = this.request.next_attempt();
                    let inner = &mut *this.inner;
                    let fut = this.tried.lend(|| inner.call(req));
                    let hedge = this.shared.hedge.as_ref().filter(|_| this.request.hedgeable());
                    this.state.set(State::Calling { race: Race::new(fut, hedge) });
                }
                StateProj::Calling { race } => {
                    let (shared, inner, request, tried) =
                        (&**this.shared, &mut *this.inner, &mut *this.request, &mut *this.tried);
                    let hedge = shared.hedge.as_ref();
                    let result = ready!(race.poll_race(cx, hedge, |cx| {
                        send_hedge(shared, inner, request, tried, cx)
                    }));
                    match this.request.after(this.shared, result) {
                        Ok(answer) => {
                            this.state.set(State::Done);
                            return Poll::Ready(answer);
                        }
                        Err(delay) => {
                            this.state.set(State::Backoff { sleep: tokio::time::sleep(delay) });
                        }
                    }
                }
                StateProj::Backoff { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Ready);
                }
                StateProj::Done => panic!("RetryFuture polled after completion"),
            }
        }
    }
}

/// Another attempt of this try, while the earlier ones are still out; `None` when the retry
/// budget has no room or the service is not ready (then this try sends no more hedges).
fn send_hedge<S>(
    shared: &Shared,
    inner: &mut S,
    request: &mut Attempts,
    tried: &mut Tried,
    cx: &mut Context<'_>,
) -> Option<S::Future>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
{
    if !request.replayable_now() || !matches!(inner.poll_ready(cx), Poll::Ready(Ok(()))) {
        return None;
    }
    // a hedge is a retry sent early: it spends the same budget
    if !shared.budget.lock().expect("no panics under the budget lock").try_withdraw(Instant::now())
    {
        tracing::debug!(attempt = request.attempt, "retry budget spent: no hedge");
        return None;
    }
    request.attempt += 1;
    request.waited = Duration::ZERO;
    let req = request.next_attempt();
    Some(tried.lend(|| inner.call(req)))
}

impl Attempts {
    /// May this request have hedges: safe to send twice, and its body kept whole or teed.
    fn hedgeable(&self) -> bool {
        self.idempotent && matches!(self.body, Replay::Complete(..) | Replay::Teeing(_))
    }

    /// Can a hedge be sent the whole body now: a teed gRPC body only once the client's stream
    /// has ended within the replay cap (a unary call's soon has; a stream's may never).
    fn replayable_now(&self) -> bool {
        match &self.body {
            Replay::Complete(..) => true,
            Replay::Teeing(tee) => tee.can_replay(),
            Replay::Streaming(_) | Replay::Unavailable => false,
        }
    }

    /// The request of the next attempt: a copy of the head and the kept body, or the streamed
    /// request itself.
    fn next_attempt(&mut self) -> Request<Body> {
        match &self.body {
            Replay::Complete(..) | Replay::Teeing(_) => {
                let mut parts = self.parts.clone().expect("a replayable request keeps its head");
                if self.attempt > 1 || self.stale {
                    // sent on with what is left now, not what was left when the call came
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    deadline::write(&mut parts.headers, left);
                }
                if self.attempt > 1 {
                    parts.headers.insert(ATTEMPT_HEADER, HeaderValue::from(self.attempt));
                }
                if parts.extensions.get::<crate::http::forward::RequestTrace>().is_some() {
                    // the attempt's span says which attempt it was and what it waited for
                    parts
                        .extensions
                        .insert(AttemptInfo { number: self.attempt, backoff: self.waited });
                }
                Request::from_parts(parts, self.body.replayed())
            }
            Replay::Streaming(_) | Replay::Unavailable => {
                let mut parts = self.parts.take().expect("a streamed request is sent once");
                if self.stale {
                    // read up to the replay cap before it turned out to be too long to keep
                    let left = self.deadline.saturating_duration_since(Instant::now());
                    deadline::write(&mut parts.headers, left);
                }
                let body = match std::mem::replace(&mut self.body, Replay::Unavailable) {
                    Replay::Streaming(body) => body,
                    _ => unreachable!("matched above"),
                };
                Request::from_parts(parts, body)
            }
        }
    }

    /// The client's answer (`Ok`), or the backoff before the next attempt (`Err`).
    fn after(
        &mut self,
        shared: &Shared,
        result: Result<Response<Body>, ProxyError>,
    ) -> Result<Result<Response<Body>, ProxyError>, Duration> {
        let attempt = self.attempt;
        if !self.replayable_now() {
            return Ok(finish(result, attempt)); // streamed: there is nothing to send again
        }
        let Some(failure) = shared.retryable(&result) else { return Ok(finish(result, attempt)) };
        let safe = self.idempotent || matches!(failure, Failure::Connect | Failure::GrpcHead);
        if attempt >= shared.max_attempts || !safe {
            return Ok(finish(result, attempt));
        }
        let delay = match result.as_ref().ok().and_then(|res| res.headers().get(RETRY_AFTER)) {
            Some(value) => match parse_retry_after(value, SystemTime::now()) {
                // the upstream asked for longer than we would wait: its answer stands
                Some(wait) if wait <= shared.backoff.max() => wait,
                _ => return Ok(finish(result, attempt)),
            },
            None => match &shared.draws {
                Some(draws) => {
                    use rand::RngExt;
                    let unit = draws.lock().expect("no panics while drawing").random::<f64>();
                    shared.backoff.delay_with(attempt - 1, self.previous_delay, unit)
                }
                None => shared.backoff.delay(attempt - 1, self.previous_delay),
            },
        };
        let now = Instant::now();
        if saturating_add(now, delay) >= self.deadline {
            // the next attempt could not finish in time: answer now rather than at the deadline
            return Ok(finish(result, attempt));
        }
        if !shared.budget.lock().expect("no panics under the budget lock").try_withdraw(now) {
            tracing::debug!(attempt, "retry budget spent");
            return Ok(finish(result, attempt));
        }
        shared.retries.inc();
        self.previous_delay = delay;
        self.waited = delay;
        self.attempt += 1;
        Err(delay)
    }
}

/// Which attempt a request is, and the backoff before it: read by the attempt's trace span.
#[derive(Debug, Clone, Copy)]
pub struct AttemptInfo {
    pub number: u32,
    pub backoff: Duration,
}

/// The client's answer: the last attempt's, with `outrigger-attempts` when there were several.
fn finish(
    result: Result<Response<Body>, ProxyError>,
    attempts: u32,
) -> Result<Response<Body>, ProxyError> {
    if attempts == 1 {
        return result;
    }
    let mut res = result.unwrap_or_else(|err| error_response(&err));
    res.headers_mut().insert(ATTEMPTS_HEADER, HeaderValue::from(attempts));
    Ok(res)
}

/// A request body, kept whole for replay or streaming through once.
enum Replay {
    Complete(Bytes, Option<http::HeaderMap>),
    Streaming(Body),
    /// A gRPC call's body, sent as it arrives and copied for a retry (`http/tee.rs`).
    Teeing(Tee),
    /// Not held: still being read into a buffer, or already sent (streamed).
    Unavailable,
}

impl Replay {
    /// The body of another attempt of a replayable request.
    fn replayed(&self) -> Body {
        match self {
            Self::Complete(data, trailers) => Body::replay(data.clone(), trailers.clone()),
            Self::Teeing(tee) => tee.next_body().expect("an attempt is made only when it can be"),
            Self::Streaming(_) | Self::Unavailable => unreachable!("not replayable"),
        }
    }
}

/// Reads the body into memory if it fits `cap`; a larger one goes on as the buffered prefix
/// followed by the rest of the stream, so nothing is lost and nothing more is held.
async fn buffer(body: Body, cap: usize) -> Result<Replay, ProxyError> {
    let mut incoming = match body {
        Body::Full { data, trailers } => {
            return Ok(Replay::Complete(data.unwrap_or_default(), trailers.map(|t| *t)));
        }
        client @ (Body::Client { .. } | Body::H1Request { .. }) => client,
        streaming @ (Body::Prefixed { .. }
        | Body::Upstream { .. }
        | Body::H1 { .. }
        | Body::Grpc { .. }
        | Body::Teed { .. }) => {
            return Ok(Replay::Streaming(streaming));
        }
    };
    if incoming.is_end_stream() {
        return Ok(Replay::Complete(Bytes::new(), None));
    }
    if incoming.size_hint().lower() > cap as u64 {
        return Ok(Replay::Streaming(incoming));
    }
    let mut data = BytesMut::new();
    while let Some(frame) = incoming.frame().await {
        let frame = frame
            .map_err(|e| ProxyError::BadRequest { reason: format!("request body: {e}").into() })?;
        match frame.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if data.len() > cap {
                    return Ok(Replay::Streaming(Body::Prefixed {
                        head: Some(data.freeze()),
                        rest: Box::new(incoming),
                    }));
                }
            }
            Err(frame) => return Ok(Replay::Complete(data.freeze(), frame.into_trailers().ok())),
        }
    }
    Ok(Replay::Complete(data.freeze(), None))
}

#[cfg(test)]
mod tests;
