//! Hedging through the retry layer, against an inner service whose attempts take scripted
//! times, with paused time: when a hedge goes, which answer wins, what is cancelled, the caps.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use outrigger_config as config;
use prometheus::IntCounter;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::error::ProxyError;
use crate::http::Body;
use crate::policy::retry::RetryLayer;

/// One attempt: how long it takes, then its status (or `None`: a per-try timeout).
type Step = (u64, Option<u16>);

/// When an attempt was sent, its `outrigger-attempt` and its `outrigger-timeout`.
type Sent = (Duration, Option<String>, Option<String>);

#[derive(Clone, Default)]
struct Script {
    steps: Arc<Mutex<VecDeque<Step>>>,
    /// (sent at, `outrigger-attempt`) of each attempt
    sent: Arc<Mutex<Vec<Sent>>>,
    /// attempts dropped before they answered
    cancelled: Arc<AtomicUsize>,
}

/// Counts an attempt dropped before it answered.
struct Guard(Option<Arc<AtomicUsize>>);

impl Guard {
    fn answered(&mut self) {
        self.0 = None;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(cancelled) = self.0.take() {
            cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Script {
    fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        Self { steps: Arc::new(Mutex::new(steps.into_iter().collect())), ..Self::default() }
    }

    fn service(
        &self,
        started: Instant,
    ) -> impl tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = ProxyError,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        let script = self.clone();
        tower::service_fn(move |req: Request<Body>| {
            let header = |name| req.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
            let (attempt, left) = (header("outrigger-attempt"), header("outrigger-timeout"));
            script.sent.lock().unwrap().push((started.elapsed(), attempt, left));
            let (after, status) = script.steps.lock().unwrap().pop_front().expect("a step");
            let mut guard = Guard(Some(script.cancelled.clone()));
            async move {
                tokio::time::sleep(Duration::from_millis(after)).await;
                guard.answered();
                match status {
                    Some(status) => {
                        let mut res = Response::new(Body::empty());
                        *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok(res)
                    }
                    None => Err(ProxyError::Timeout { after: Duration::from_millis(after) }),
                }
            }
        })
    }

    fn sent_at(&self) -> Vec<Duration> {
        self.sent.lock().unwrap().iter().map(|s| s.0).collect()
    }

    fn cancelled(&self) -> usize {
        self.cancelled.load(Ordering::SeqCst)
    }
}

fn retry() -> config::Retry {
    let mut cfg =
        config::Retry { max_attempts: NonZeroU32::new(3).unwrap(), ..config::Retry::default() };
    cfg.backoff.jitter = config::Jitter::None;
    cfg.on.push(config::RetryOn::Timeout);
    cfg
}

fn hedge(after_ms: u64, max_extra: u32) -> config::Hedge {
    config::Hedge { after: config::Duration::from_millis(after_ms), max_extra }
}

fn layer(cfg: &config::Retry, hedge: &config::Hedge, hedges: &IntCounter) -> RetryLayer {
    let retries = IntCounter::new("r", "r").unwrap();
    RetryLayer::new(cfg, Duration::from_secs(10), retries).hedge(Some((hedge, hedges.clone())))
}

async fn send(hedge: &config::Hedge, script: &Script, req: Request<Body>) -> (u16, Duration, u64) {
    let hedges = IntCounter::new("h", "h").unwrap();
    let started = Instant::now();
    let mut svc = layer(&retry(), hedge, &hedges).layer(script.service(started));
    let res = svc.ready().await.unwrap().call(req).await.expect("an answer");
    (res.status().as_u16(), started.elapsed(), hedges.get())
}

fn get() -> Request<Body> {
    Request::get("/").body(Body::empty()).unwrap()
}

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn a_hedge_goes_after_after_and_the_first_head_wins_the_slow_attempt_is_dropped() {
    let script = Script::new([(1000, Some(200)), (10, Some(201))]);
    let (status, took, hedges) = send(&hedge(100, 1), &script, get()).await;
    assert_eq!((status, took, hedges), (201, 110 * MS, 1), "the hedge's answer, at 100 + 10 ms");
    assert_eq!(script.sent_at(), [Duration::ZERO, 100 * MS]);
    let attempts: Vec<_> = script.sent.lock().unwrap().iter().map(|s| s.1.clone()).collect();
    assert_eq!(attempts, [None, Some("2".to_owned())], "the hedge says which attempt it is");
    let left = script.sent.lock().unwrap()[1].2.clone();
    assert_eq!(left.as_deref(), Some("9900ms"), "sent with the time left of the 10 s deadline");
    assert_eq!(script.cancelled(), 1, "the slow attempt's future was dropped");
}

#[tokio::test(start_paused = true)]
async fn no_hedge_goes_before_after() {
    let script = Script::new([(99, Some(200)), (10, Some(201))]);
    let (status, took, hedges) = send(&hedge(100, 1), &script, get()).await;
    assert_eq!((status, took, hedges), (200, 99 * MS, 0));
    assert_eq!(script.sent_at(), [Duration::ZERO]);
}

#[tokio::test(start_paused = true)]
async fn max_extra_caps_the_hedges_in_flight() {
    let script = Script::new([(1000, Some(200)), (1000, Some(201)), (1000, Some(202)), (1, None)]);
    let (status, took, hedges) = send(&hedge(100, 2), &script, get()).await;
    assert_eq!((status, took, hedges), (200, 1000 * MS, 2));
    assert_eq!(script.sent_at(), [Duration::ZERO, 100 * MS, 200 * MS]);
    assert_eq!(script.cancelled(), 2, "both hedges dropped when the first answered");
}

#[tokio::test(start_paused = true)]
async fn an_attempt_that_fails_while_a_hedge_is_out_does_not_end_the_call() {
    // the first attempt's per-try timeout comes while the hedge is still on its way
    let script = Script::new([(150, None), (100, Some(200))]);
    let (status, took, hedges) = send(&hedge(100, 1), &script, get()).await;
    assert_eq!((status, took, hedges), (200, 200 * MS, 1));
    assert_eq!(script.cancelled(), 0);
}

#[tokio::test(start_paused = true)]
async fn when_every_attempt_fails_the_retry_logic_takes_over() {
    let script = Script::new([(150, None), (100, None), (10, Some(200))]);
    let (status, took, hedges) = send(&hedge(100, 1), &script, get()).await;
    // both failed by 200 ms; the hedge was attempt 2, so the backoff before attempt 3 is the
    // second step (2 x 25 ms), and that attempt answers 10 ms later
    assert_eq!((status, hedges), (200, 1));
    assert_eq!(script.sent_at(), [Duration::ZERO, 100 * MS, 250 * MS]);
    assert_eq!(took, 260 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_post_without_idempotency_key_is_not_hedged_with_one_it_is() {
    let post = |key: bool| {
        let mut req = Request::post("/charge");
        if key {
            req = req.header("idempotency-key", HeaderValue::from_static("k-1"));
        }
        req.body(Body::full("amount=10")).unwrap()
    };
    let once = Script::new([(1000, Some(200)), (10, Some(201))]);
    assert_eq!(send(&hedge(100, 1), &once, post(false)).await, (200, 1000 * MS, 0));
    assert_eq!(once.sent_at().len(), 1);

    let keyed = Script::new([(1000, Some(200)), (10, Some(201))]);
    assert_eq!(send(&hedge(100, 1), &keyed, post(true)).await, (201, 110 * MS, 1));
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_caps_hedges() {
    let mut cfg = retry();
    cfg.budget.ratio = config::Ratio::try_from(0.0).unwrap();
    cfg.budget.min_per_second = 1; // 10 retries or hedges in the 10 s window
    let script = Script::new(std::iter::repeat_n((1000, Some(200)), 40));
    let hedges = IntCounter::new("h", "h").unwrap();
    let svc = layer(&cfg, &hedge(100, 1), &hedges).layer(script.service(Instant::now()));
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        calls.spawn(svc.clone().oneshot(get()));
    }
    while let Some(res) = calls.join_next().await {
        assert_eq!(res.unwrap().unwrap().status(), 200);
    }
    assert_eq!(hedges.get(), 10);
    assert_eq!(script.sent_at().len(), 30, "20 requests + 10 hedges, not 20 x 2");
}
