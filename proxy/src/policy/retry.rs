//! Retries: send a failed request again, after a backoff, when it is safe and worth it.
//!
//! Safe: only idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) or requests carrying
//! an `Idempotency-Key` are sent twice; any request is retried when its connection could not be
//! opened (nothing was sent). A body is replayed only if it fits `replay_buffer`; a larger one
//! streams through once. Worth it: the failure is in `on`, attempts remain, the retry budget has
//! room, and the backoff (or the upstream's `Retry-After`, capped at `backoff.max`) ends before
//! the whole-request deadline. Otherwise the client gets the last answer as it came, with
//! `outrigger-attempts: N` when N > 1.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use outrigger_config as config;
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::forward::TriedEndpoints;
use crate::http::respond::error_response;
use crate::policy::backoff::{Backoff, parse_retry_after};
use crate::policy::budget::Budget;
use crate::policy::timeout::RequestDeadline;

pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("outrigger-attempts");
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
    budget: Mutex<Budget>,
    replay_cap: usize,
    retries: IntCounter,
}

impl RetryLayer {
    pub fn new(cfg: &config::Retry, retries: IntCounter) -> Self {
        Self {
            shared: Arc::new(Shared {
                max_attempts: cfg.max_attempts.get(),
                backoff: Backoff::new(cfg.backoff),
                on: cfg.on.clone(),
                budget: Mutex::new(Budget::new(cfg.budget.ratio.get(), cfg.budget.min_per_second)),
                replay_cap: usize::try_from(cfg.replay_buffer.bytes()).unwrap_or(usize::MAX),
                retries,
            }),
        }
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

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

impl<S> tower::Service<Request<Body>> for Retry<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        Box::pin(attempts(self.shared.clone(), self.inner.clone(), req))
    }
}

/// Why an attempt may be retried.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    Connect,
    Other,
}

impl Shared {
    fn retryable(&self, result: &Result<Response<Body>, ProxyError>) -> Option<Failure> {
        let wanted = |on: config::RetryOn| self.on.contains(&on);
        match result {
            Ok(res) => {
                wanted(config::RetryOn::Status(res.status().as_u16())).then_some(Failure::Other)
            }
            Err(ProxyError::ConnectFailed { .. }) => {
                wanted(config::RetryOn::ConnectFailure).then_some(Failure::Connect)
            }
            Err(ProxyError::UpstreamReset { .. }) => {
                wanted(config::RetryOn::Reset).then_some(Failure::Other)
            }
            Err(ProxyError::Timeout { .. }) => {
                wanted(config::RetryOn::Timeout).then_some(Failure::Other)
            }
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

async fn attempts<S>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<Body>,
) -> Result<Response<Body>, ProxyError>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
{
    use tower::ServiceExt;

    shared.budget.lock().expect("no panics under the budget lock").deposit(Instant::now());
    let idempotent = idempotent(&req);
    let deadline = req.extensions().get::<RequestDeadline>().map(|d| d.0);
    let upgrade = req.headers().contains_key(http::header::UPGRADE);
    // a request that can never be sent twice streams through: holding its body back would
    // only delay it (an upgrade's connection becomes a tunnel: there is no second attempt)
    let replayable =
        !upgrade && (idempotent || shared.on.contains(&config::RetryOn::ConnectFailure));
    let (mut parts, body) = req.into_parts();
    let replay = match replayable {
        true => buffer(body, shared.replay_cap).await?,
        false => Replay::Streaming(body),
    };
    let Replay::Complete(data, trailers) = replay else {
        let Replay::Streaming(body) = replay else { unreachable!() };
        return inner.ready().await?.call(Request::from_parts(parts, body)).await;
    };
    // every attempt's copy of the parts shares this: a retry goes to another endpoint
    parts.extensions.insert(TriedEndpoints::default());

    let mut attempt = 1;
    let mut previous_delay = shared.backoff.initial();
    let traced = parts.extensions.get::<crate::http::forward::RequestTrace>().is_some();
    let mut waited = Duration::ZERO;
    loop {
        if traced {
            // the attempt's span says which attempt it was and what it waited for
            parts.extensions.insert(AttemptInfo { number: attempt, backoff: waited });
        }
        let req = Request::from_parts(parts.clone(), Body::replay(data.clone(), trailers.clone()));
        let result = inner.ready().await?.call(req).await;
        let Some(failure) = shared.retryable(&result) else { return finish(result, attempt) };
        if attempt >= shared.max_attempts || !(idempotent || failure == Failure::Connect) {
            return finish(result, attempt);
        }
        let delay = match result.as_ref().ok().and_then(|res| res.headers().get(RETRY_AFTER)) {
            Some(value) => match parse_retry_after(value, SystemTime::now()) {
                // the upstream asked for longer than we would wait: its answer stands
                Some(wait) if wait <= shared.backoff.max() => wait,
                _ => return finish(result, attempt),
            },
            None => shared.backoff.delay(attempt - 1, previous_delay),
        };
        if deadline.is_some_and(|d| Instant::now() + delay >= d) {
            // the next attempt could not finish in time: answer now rather than at the deadline
            return finish(result, attempt);
        }
        if !shared
            .budget
            .lock()
            .expect("no panics under the budget lock")
            .try_withdraw(Instant::now())
        {
            tracing::debug!(attempt, "retry budget spent");
            return finish(result, attempt);
        }
        shared.retries.inc();
        drop(result);
        tokio::time::sleep(delay).await;
        previous_delay = delay;
        waited = delay;
        attempt += 1;
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
}

/// Reads the body into memory if it fits `cap`; a larger one goes on as the buffered prefix
/// followed by the rest of the stream, so nothing is lost and nothing more is held.
async fn buffer(body: Body, cap: usize) -> Result<Replay, ProxyError> {
    let mut incoming = match body {
        Body::Full { data, trailers } => {
            return Ok(Replay::Complete(data.unwrap_or_default(), trailers));
        }
        Body::Incoming { inner } => inner,
        prefixed @ Body::Prefixed { .. } => return Ok(Replay::Streaming(prefixed)),
    };
    if incoming.is_end_stream() {
        return Ok(Replay::Complete(Bytes::new(), None));
    }
    if incoming.size_hint().lower() > cap as u64 {
        return Ok(Replay::Streaming(Body::from(incoming)));
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
                        rest: incoming,
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
