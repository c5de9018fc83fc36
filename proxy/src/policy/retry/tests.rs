//! The retry layer against a scripted inner service, with paused time: attempts, what is
//! retried, backoff and `Retry-After`, the deadline and the budget.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};

use super::*;

/// One scripted attempt: a status (with an optional `Retry-After`) or an error.
#[derive(Clone)]
enum Step {
    Status(u16),
    RetryAfter(u16, &'static str),
    Connect,
    Timeout,
    /// A trailers-only gRPC answer, as `forward.rs` marks it.
    Grpc(grpc::GrpcStatus),
}

/// The `outrigger-timeout` and `grpc-timeout` an attempt was sent with.
type SentTimeouts = (Option<String>, Option<String>);

#[derive(Clone, Default)]
struct Script {
    steps: Arc<Mutex<VecDeque<Step>>>,
    /// (elapsed since start, body) of each attempt
    seen: Arc<Mutex<Vec<(Duration, Bytes)>>>,
    /// the `outrigger-timeout` and `grpc-timeout` each attempt was sent with
    timeouts: Arc<Mutex<Vec<SentTimeouts>>>,
}

impl Script {
    fn new(steps: impl IntoIterator<Item = Step>) -> Self {
        Self {
            steps: Arc::new(Mutex::new(steps.into_iter().collect())),
            seen: Arc::default(),
            timeouts: Arc::default(),
        }
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
            let script = script.clone();
            let header = |name| {
                req.headers().get(name).map(|v: &HeaderValue| v.to_str().unwrap().to_owned())
            };
            script
                .timeouts
                .lock()
                .unwrap()
                .push((header("outrigger-timeout"), header("grpc-timeout")));
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                script.seen.lock().unwrap().push((started.elapsed(), body));
                let step = script.steps.lock().unwrap().pop_front().expect("a scripted step");
                let respond = |status: u16| {
                    let mut res = Response::new(Body::empty());
                    *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    res
                };
                match step {
                    Step::Status(status) => Ok(respond(status)),
                    Step::RetryAfter(status, after) => {
                        let mut res = respond(status);
                        res.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static(after));
                        Ok(res)
                    }
                    Step::Connect => Err(connect_failed().await),
                    Step::Timeout => Err(ProxyError::Timeout { after: Duration::from_millis(100) }),
                    Step::Grpc(status) => {
                        let mut res = respond(200);
                        res.extensions_mut().insert(grpc::Answered(status));
                        Ok(res)
                    }
                }
            }
        })
    }

    fn attempts(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A real connect error from hyper's client: nothing listens on port 1 of loopback.
async fn connect_failed() -> ProxyError {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let req = Request::get("http://127.0.0.1:1/").body(Body::empty()).unwrap();
    let source = client.request(req).await.unwrap_err();
    assert!(source.is_connect());
    ProxyError::ConnectFailed { upstream: "p".into(), source: source.into() }
}

fn retry(max_attempts: u32) -> config::Retry {
    let mut cfg = config::Retry {
        max_attempts: NonZeroU32::new(max_attempts).unwrap(),
        ..config::Retry::default()
    };
    cfg.backoff.jitter = config::Jitter::None;
    cfg.backoff.initial = config::Duration::from_millis(100);
    cfg.backoff.max = config::Duration::from_secs(1);
    cfg.on.push(config::RetryOn::Timeout);
    cfg
}

async fn send(cfg: &config::Retry, script: &Script, req: Request<Body>) -> Response<Body> {
    let counter = IntCounter::new("r", "r").unwrap();
    let mut svc = RetryLayer::new(cfg, Duration::from_secs(10), counter)
        .layer(script.service(Instant::now()));
    svc.ready().await.unwrap().call(req).await.expect("an answer")
}

fn get() -> Request<Body> {
    Request::get("/").body(Body::empty()).unwrap()
}

fn attempts_header(res: &Response<Body>) -> Option<&str> {
    res.headers().get(ATTEMPTS_HEADER).map(|v| v.to_str().unwrap())
}

#[tokio::test(start_paused = true)]
async fn two_503s_then_200_ends_200_after_three_attempts_with_exponential_backoff() {
    let script = Script::new([Step::Status(503), Step::Status(503), Step::Status(200)]);
    let res = send(&retry(3), &script, get()).await;
    assert_eq!(res.status(), 200);
    assert_eq!(attempts_header(&res), Some("3"));
    let times: Vec<Duration> = script.seen.lock().unwrap().iter().map(|s| s.0).collect();
    assert_eq!(times, [Duration::ZERO, Duration::from_millis(100), Duration::from_millis(300)]);
}

#[tokio::test(start_paused = true)]
async fn when_attempts_run_out_the_last_answer_is_returned_unchanged() {
    let script = Script::new([Step::Status(503), Step::Status(502)]);
    let res = send(&retry(2), &script, get()).await;
    assert_eq!(res.status(), 502, "the upstream's own last answer, not a made-up one");
    assert_eq!(attempts_header(&res), Some("2"));
}

#[tokio::test(start_paused = true)]
async fn a_single_attempt_carries_no_attempts_header_and_4xx_is_not_retried() {
    let script = Script::new([Step::Status(404)]);
    let res = send(&retry(3), &script, get()).await;
    assert_eq!((res.status().as_u16(), attempts_header(&res)), (404, None));
    assert_eq!(script.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_post_without_idempotency_key_is_sent_once_with_one_it_is_replayed_byte_for_byte() {
    let post = |key: bool| {
        let mut req = Request::post("/charge");
        if key {
            req = req.header("idempotency-key", "k-1");
        }
        req.body(Body::full("amount=10")).unwrap()
    };
    let once = Script::new([Step::Status(503), Step::Status(200)]);
    assert_eq!(send(&retry(3), &once, post(false)).await.status(), 503);
    assert_eq!(once.attempts(), 1);

    let keyed = Script::new([Step::Status(503), Step::Status(200)]);
    assert_eq!(send(&retry(3), &keyed, post(true)).await.status(), 200);
    let bodies: Vec<Bytes> = keyed.seen.lock().unwrap().iter().map(|s| s.1.clone()).collect();
    assert_eq!(bodies, [Bytes::from("amount=10"), Bytes::from("amount=10")]);
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_could_not_open_is_retried_for_any_method() {
    let script = Script::new([Step::Connect, Step::Status(201)]);
    let res = send(&retry(3), &script, Request::post("/").body(Body::full("x")).unwrap()).await;
    assert_eq!((res.status().as_u16(), attempts_header(&res)), (201, Some("2")));
}

#[tokio::test(start_paused = true)]
async fn spent_retries_after_an_error_answer_with_the_error_and_the_attempt_count() {
    let script = Script::new([Step::Timeout, Step::Timeout]);
    let res = send(&retry(2), &script, get()).await;
    assert_eq!(res.status(), 504);
    assert_eq!(res.headers()["outrigger-error"], "timeout");
    assert_eq!(attempts_header(&res), Some("2"));
}

#[tokio::test(start_paused = true)]
async fn retry_after_replaces_the_backoff_within_max_and_ends_retries_beyond_it() {
    let short = Script::new([Step::RetryAfter(503, "1"), Step::Status(200)]);
    assert_eq!(send(&retry(3), &short, get()).await.status(), 200);
    assert_eq!(short.seen.lock().unwrap()[1].0, Duration::from_secs(1));

    let long = Script::new([Step::RetryAfter(503, "5"), Step::Status(200)]);
    let res = send(&retry(3), &long, get()).await;
    assert_eq!(
        (res.status().as_u16(), long.attempts()),
        (503, 1),
        "5 s > backoff.max: answered at once"
    );
    assert_eq!(res.headers()[RETRY_AFTER], "5", "the upstream's answer, Retry-After included");
}

#[tokio::test(start_paused = true)]
async fn no_backoff_sleep_runs_past_the_request_deadline() {
    let script = Script::new([Step::Status(503), Step::Status(200)]);
    let counter = IntCounter::new("r", "r").unwrap();
    let started = Instant::now();
    let mut svc = RetryLayer::new(&retry(3), Duration::from_millis(50), counter)
        .layer(script.service(started));
    let res = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.status(), 503, "a 100 ms backoff would end after the 50 ms deadline");
    assert_eq!(started.elapsed(), Duration::ZERO, "answered at once, not at the deadline");
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_a_retry_storm() {
    let mut cfg = retry(5);
    cfg.budget.ratio = config::Ratio::try_from(0.0).unwrap();
    cfg.budget.min_per_second = 1; // 10 retries in the 10 s window
    let script = Script::new(std::iter::repeat_n(Step::Status(503), 100));
    let counter = IntCounter::new("r", "r").unwrap();
    let svc = RetryLayer::new(&cfg, Duration::from_secs(10), counter.clone())
        .layer(script.service(Instant::now()));
    for _ in 0..20 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    assert_eq!(counter.get(), 10);
    assert_eq!(script.attempts(), 30, "20 requests + 10 retries, not 20 x 5");
}

#[tokio::test(start_paused = true)]
async fn a_per_try_cut_is_retried_when_on_lists_504_or_timeout_and_only_then() {
    let listing = |on: &[config::RetryOn]| {
        let mut cfg = retry(2);
        cfg.on = on.to_vec();
        cfg
    };
    for on in [&[config::RetryOn::Status(504)][..], &[config::RetryOn::Timeout]] {
        let script = Script::new([Step::Timeout, Step::Status(200)]);
        let res = send(&listing(on), &script, get()).await;
        assert_eq!((res.status().as_u16(), attempts_header(&res)), (200, Some("2")), "{on:?}");
    }
    let script = Script::new([Step::Timeout, Step::Status(200)]);
    let counter = IntCounter::new("r", "r").unwrap();
    let cfg = listing(&[config::RetryOn::Status(503)]);
    let mut svc = RetryLayer::new(&cfg, Duration::from_secs(10), counter)
        .layer(script.service(Instant::now()));
    let answer = svc.ready().await.unwrap().call(get()).await;
    assert!(
        matches!(answer, Err(ProxyError::Timeout { .. })),
        "503 alone does not ask for a per-try cut to be retried"
    );
    assert_eq!(script.seen.lock().unwrap().len(), 1);
}

/// The retry layer inside the whole-request deadline, as `stack.rs` builds them.
async fn send_within(
    request_timeout: Duration,
    cfg: &config::Retry,
    script: &Script,
    req: Request<Body>,
) -> Response<Body> {
    let counter = IntCounter::new("r", "r").unwrap();
    let mut svc = crate::policy::timeout::DeadlineLayer::whole_request(request_timeout).layer(
        RetryLayer::new(cfg, request_timeout, counter).layer(script.service(Instant::now())),
    );
    svc.ready().await.unwrap().call(req).await.expect("an answer")
}

#[tokio::test(start_paused = true)]
async fn no_backoff_sleep_runs_past_the_calls_deadline_from_outrigger_timeout() {
    let script = Script::new([Step::Status(503), Step::Status(503), Step::Status(200)]);
    let started = Instant::now();
    let req = Request::get("/").header("outrigger-timeout", "250ms").body(Body::empty()).unwrap();
    let res = send_within(Duration::from_secs(10), &retry(3), &script, req).await;
    assert_eq!(
        (res.status().as_u16(), attempts_header(&res)),
        (503, Some("2")),
        "the 200 ms backoff after the second attempt would end at 300 ms, past the 250 ms deadline"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(100), "answered at once after attempt 2");
    let sent: Vec<_> = script.timeouts.lock().unwrap().iter().map(|t| t.0.clone()).collect();
    assert_eq!(sent, [Some("250ms".into()), Some("150ms".into())], "each attempt: the time left");

    // the same script without the header: the 10 s timeout leaves room for all three
    let script = Script::new([Step::Status(503), Step::Status(503), Step::Status(200)]);
    let res = send_within(Duration::from_secs(10), &retry(3), &script, get()).await;
    assert_eq!((res.status().as_u16(), attempts_header(&res)), (200, Some("3")));
}

#[tokio::test(start_paused = true)]
async fn a_grpc_calls_attempts_are_sent_with_grpc_timeout_rewritten_to_the_time_left() {
    let script = Script::new([Step::Status(503), Step::Status(200)]);
    let req = Request::post("/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "400m")
        .header("idempotency-key", "k")
        .body(Body::full("msg"))
        .unwrap();
    let res = send_within(Duration::from_secs(10), &retry(3), &script, req).await;
    assert_eq!(res.status(), 200);
    let sent = script.timeouts.lock().unwrap().clone();
    assert_eq!(
        sent,
        [(Some("400ms".into()), Some("400m".into())), (Some("300ms".into()), Some("300m".into()))]
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_past_the_calls_deadline_ends_the_retries_at_once() {
    let script = Script::new([Step::RetryAfter(503, "1"), Step::Status(200)]);
    let started = Instant::now();
    let req = Request::get("/").header("outrigger-timeout", "500ms").body(Body::empty()).unwrap();
    let res = send_within(Duration::from_secs(10), &retry(3), &script, req).await;
    assert_eq!((res.status().as_u16(), script.attempts()), (503, 1));
    assert_eq!(started.elapsed(), Duration::ZERO);
}

fn grpc_call() -> Request<Body> {
    Request::post("/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .body(Body::full(&b"\0\0\0\0\x02hi"[..]))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_listed_grpc_status_in_the_head_is_retried_whatever_the_method_with_the_body_replayed() {
    use grpc::GrpcStatus::{Ok as GrpcOk, Unavailable};
    let mut cfg = retry(3);
    cfg.on.push(config::RetryOn::Grpc(Unavailable));
    let script =
        Script::new([Step::Grpc(Unavailable), Step::Grpc(Unavailable), Step::Grpc(GrpcOk)]);
    let res = send(&cfg, &script, grpc_call()).await;
    assert_eq!(res.extensions().get::<grpc::Answered>(), Some(&grpc::Answered(GrpcOk)));
    assert_eq!(attempts_header(&res), Some("3"));
    let bodies: Vec<Bytes> = script.seen.lock().unwrap().iter().map(|s| s.1.clone()).collect();
    assert_eq!(bodies, vec![Bytes::from_static(b"\0\0\0\0\x02hi"); 3]);
}

#[tokio::test(start_paused = true)]
async fn an_unlisted_grpc_status_or_a_grpc_call_without_grpc_names_in_on_is_sent_once() {
    use grpc::GrpcStatus::{InvalidArgument, Ok as GrpcOk, Unavailable};
    let mut cfg = retry(3);
    cfg.on.push(config::RetryOn::Grpc(Unavailable));
    let script = Script::new([Step::Grpc(InvalidArgument), Step::Grpc(GrpcOk)]);
    let res = send(&cfg, &script, grpc_call()).await;
    assert_eq!(res.extensions().get::<grpc::Answered>(), Some(&grpc::Answered(InvalidArgument)));
    assert_eq!(script.attempts(), 1);

    // the default `on` names no gRPC status: a gRPC POST is not replayable
    let script = Script::new([Step::Grpc(Unavailable), Step::Grpc(GrpcOk)]);
    let res = send(&retry(3), &script, grpc_call()).await;
    assert_eq!(res.extensions().get::<grpc::Answered>(), Some(&grpc::Answered(Unavailable)));
    assert_eq!(script.attempts(), 1);
}
