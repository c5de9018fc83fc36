//! `outrigger explain`: an upstream's (or a route's) real policy layers, built by
//! `stack::policies` as the data plane builds them, run in virtual time against a scripted
//! endpoint, so a user sees what the policies do to a sequence of answers before deploying
//! them: each attempt with its time and answer, what the client got, and the breaker's state
//! after each request. Minutes of backoff take no time: tokio's clock is paused and jumps to
//! the next timer.
//!
//! Answers: `STATUS`, `STATUS@DELAY` (`200@3s`), `reset` (the connection cut), `refused` (no
//! connection), or a gRPC status by name (`unavailable`: then each request is a unary gRPC
//! call); after the last one the last repeats.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use outrigger_config as config;
use tower::{Service, ServiceExt};

use crate::error::ProxyError;
use crate::http::Body;
use crate::policy::retry::RetryBudget;
use crate::stack;
use crate::telemetry::metrics::Metrics;

/// One scripted answer of the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Status(StatusCode, Duration),
    /// A gRPC status, trailers-only (`unavailable`, `ok`, …): the requests are gRPC calls then.
    Grpc(config::GrpcStatus),
    Reset,
    Refused,
}

/// Parses `503,503,200@2s,reset,refused`.
pub fn parse_answers(text: &str) -> Result<Vec<Answer>, String> {
    let answers: Result<Vec<Answer>, String> = text
        .split(',')
        .map(str::trim)
        .map(|word| match word {
            "reset" => Ok(Answer::Reset),
            "refused" => Ok(Answer::Refused),
            _ if config::GrpcStatus::from_name(word).is_some() => {
                Ok(Answer::Grpc(config::GrpcStatus::from_name(word).expect("checked")))
            }
            _ => {
                let (status, delay) = word.split_once('@').unwrap_or((word, "0s"));
                let status = status
                    .parse::<u16>()
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .filter(|s| (100..=599).contains(&s.as_u16()))
                    .ok_or_else(|| format!("{word:?} is not an answer: STATUS, STATUS@DELAY (200@3s), reset, refused or a gRPC status (unavailable)"))?;
                let delay: config::Duration = delay
                    .parse()
                    .map_err(|_| format!("{word:?}: {delay:?} is not a duration (e.g. 250ms, 3s)"))?;
                Ok(Answer::Status(status, delay.get()))
            }
        })
        .collect();
    let answers = answers?;
    if answers.is_empty() {
        return Err("--answers needs at least one answer".into());
    }
    Ok(answers)
}

/// One line of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Event {
    /// Since the first request, in milliseconds of virtual time.
    pub at_ms: u128,
    /// Which request (1-based).
    pub request: usize,
    /// `attempt` (one reached the endpoint), `answer` (what the client got), `breaker`.
    pub kind: &'static str,
    pub detail: String,
    /// The retries the retry budget would still grant: on an attempt, as it reaches the
    /// endpoint (a retry's own withdrawal made); on an answer, as the client gets it. Only
    /// when the policies retry, and never on a `breaker` line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_left: Option<u32>,
}

/// What to run: `repeat` requests, one every `every`.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub repeat: usize,
    pub every: Duration,
    /// The jitter's seed: the same seed, the same draws.
    pub seed: Option<u64>,
}

/// Runs `upstream` (its `route`'s policies when named) against `answers`; the timeline.
pub fn explain(
    config: &config::Config,
    upstream: &str,
    route: Option<&str>,
    answers: Vec<Answer>,
    run: Run,
) -> Result<Vec<Event>, String> {
    let cfg = config
        .upstreams
        .iter()
        .find(|u| u.name.as_str() == upstream)
        .ok_or_else(|| format!("no upstream named {upstream:?} in the config"))?;
    let route = match route {
        Some(name) => Some(
            cfg.routes
                .iter()
                .find(|r| r.name.as_str() == name)
                .ok_or_else(|| format!("upstream {upstream} has no route named {name:?}"))?,
        ),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("cannot start the virtual clock: {e}"))?;
    runtime.block_on(timeline(cfg, route, answers, run))
}

/// Which request of the run an attempt belongs to: in the request's extensions, which every
/// attempt's copy keeps.
#[derive(Debug, Clone, Copy)]
struct RequestNo(usize);

async fn timeline(
    cfg: &config::Upstream,
    route: Option<&config::Route>,
    answers: Vec<Answer>,
    run: Run,
) -> Result<Vec<Event>, String> {
    let start = tokio::time::Instant::now();
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let policy = route.map_or_else(|| cfg.clone(), |r| r.over(cfg));
    let backoff = policy.retry.as_ref().map(|r| r.backoff);
    let grpc = answers.iter().any(|a| matches!(a, Answer::Grpc(_)));
    let budget: Arc<OnceLock<RetryBudget>> = Arc::default();
    let endpoint = scripted(answers, start, events.clone(), backoff, budget.clone());
    // the data plane's own layers: metrics, faults, limits, the breaker, deadlines, retries
    let metrics = Metrics::new();
    let shared = stack::Shared::new(cfg, &metrics).seeded(run.seed);
    let (service, retry_budget) = stack::policies(cfg, route, &shared, &metrics, endpoint);
    if let Some(retry_budget) = retry_budget {
        budget.set(retry_budget).expect("set once, before the first request");
    }
    let breaker = Arc::new(Mutex::new(shared.circuit().map(|c| (c.status().state, c))));
    // each request goes at its time, whether the ones before it have their answers or not,
    // as an app's calls do
    let mut calls = tokio::task::JoinSet::new();
    for n in 1..=run.repeat {
        tokio::time::sleep_until(start + run.every * (n as u32 - 1)).await;
        let req = match grpc {
            // a unary gRPC call, as an app's client sends it
            true => Request::post(format!("http://{}/explain.Service/Call", cfg.name.as_str()))
                .version(http::Version::HTTP_2)
                .header("content-type", "application/grpc")
                .header("te", "trailers"),
            false => Request::get(format!("http://{}/", cfg.name.as_str())),
        };
        let req = req.extension(RequestNo(n)).body(Body::empty()).expect("a valid request");
        let (service, events, breaker, budget) =
            (service.clone(), events.clone(), breaker.clone(), budget.clone());
        calls.spawn(async move {
            let answer = service.oneshot(req).await;
            let at_ms = start.elapsed().as_millis();
            let detail = match &answer {
                Ok(res) => answered(res),
                Err(err) => format!("{} outrigger-error: {}", err.status().as_u16(), err.kind()),
            };
            let budget_left = budget.get().map(RetryBudget::left);
            let mut events = events.lock().unwrap_or_else(|e| e.into_inner());
            events.push(Event { at_ms, request: n, kind: "answer", detail, budget_left });
            let mut breaker = breaker.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((last, circuit)) = breaker.as_mut() {
                let state = circuit.status().state;
                if *last != state {
                    let detail = state.to_owned();
                    events.push(Event {
                        at_ms,
                        request: n,
                        kind: "breaker",
                        detail,
                        budget_left: None,
                    });
                    *last = state;
                }
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.map_err(|e| format!("a request of the run failed: {e}"))?;
    }
    let events = events.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(events)
}

/// The client's answer: its status, and `outrigger-attempts` when there were retries.
fn answered(res: &Response<Body>) -> String {
    let mut line = res.status().as_u16().to_string();
    for name in ["grpc-status", "outrigger-error", "outrigger-attempts"] {
        if let Some(value) = res.headers().get(name).and_then(|v| v.to_str().ok()) {
            line += &format!(" {name}: {value}");
        }
    }
    line
}

/// One request's attempts so far: how many (retries and hedges), how many are in flight, when
/// the last one ended, and the backoff waited before it (the retry layer starts it at
/// `initial`, which decorrelated jitter draws from).
#[derive(Debug, Default)]
struct Progress {
    attempts: u32,
    retries: u32,
    in_flight: u32,
    ended: Option<tokio::time::Instant>,
    previous_delay: Duration,
}

type Progresses = Arc<Mutex<std::collections::HashMap<usize, Progress>>>;

/// An attempt at the endpoint: when it ends (answered, or dropped as a hedge that lost its
/// race), its request's progress says so.
struct AttemptEnds {
    progress: Progresses,
    request: usize,
}

impl Drop for AttemptEnds {
    fn drop(&mut self) {
        let mut all = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = all.get_mut(&self.request) {
            p.in_flight -= 1;
            p.ended = Some(tokio::time::Instant::now());
        }
    }
}

/// The endpoint: each call takes the next answer (the last repeats), noted as an attempt, with
/// the backoff a retry waited and the range it was drawn from, or that it is a hedge.
fn scripted(
    answers: Vec<Answer>,
    start: tokio::time::Instant,
    events: Arc<Mutex<Vec<Event>>>,
    backoff: Option<config::Backoff>,
    budget: Arc<OnceLock<RetryBudget>>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = ProxyError, Future: Send + 'static>
+ Clone
+ Send
+ Sync
+ 'static {
    let next = Arc::new(Mutex::new(0usize));
    let answers = Arc::new(answers);
    let progress: Progresses = Arc::default();
    tower::service_fn(move |req: Request<Body>| {
        let i = {
            let mut next = next.lock().unwrap_or_else(|e| e.into_inner());
            *next += 1;
            *next - 1
        };
        let answer = answers[i.min(answers.len() - 1)];
        let request = req.extensions().get::<RequestNo>().map_or(0, |n| n.0);
        let now = tokio::time::Instant::now();
        let mut detail = match answer {
            Answer::Status(status, delay) if delay.is_zero() => format!("{}", status.as_u16()),
            Answer::Status(status, delay) => format!("{} after {delay:?}", status.as_u16()),
            Answer::Grpc(status) => format!("grpc {status}"),
            Answer::Reset => "reset".to_owned(),
            Answer::Refused => "refused".to_owned(),
        };
        {
            let mut all = progress.lock().unwrap_or_else(|e| e.into_inner());
            let initial = backoff.map_or(Duration::ZERO, |b| b.initial.get());
            let p = all
                .entry(request)
                .or_insert_with(|| Progress { previous_delay: initial, ..Progress::default() });
            p.attempts += 1;
            if p.in_flight > 0 {
                // sent while another attempt of the request is still out: a hedge
                detail += &format!(" (hedge, attempt {})", p.attempts);
            } else if let (Some(ended), Some(backoff)) = (p.ended, backoff) {
                // a retry: the backoff it waited, and the range it was drawn from (the retry
                // layer counts hedges among the attempts its backoff grows with)
                p.retries += 1;
                let waited = now.saturating_duration_since(ended);
                let grown = p.attempts - 2;
                let low = backoff.delay_with(grown, p.previous_delay, 0.0);
                let high = backoff.delay_with(grown, p.previous_delay, 0.999_999);
                let which = match p.attempts == p.retries + 1 {
                    true => format!("retry {}", p.retries),
                    false => {
                        format!("retry {}, attempt {} (hedges before it)", p.retries, p.attempts)
                    }
                };
                detail += &format!(
                    " ({which}, after a backoff of {} ms drawn from {}..{} ms)",
                    waited.as_millis(),
                    low.as_millis(),
                    high.as_millis()
                );
                p.previous_delay = waited;
            }
            p.in_flight += 1;
        }
        events.lock().unwrap_or_else(|e| e.into_inner()).push(Event {
            at_ms: now.saturating_duration_since(start).as_millis(),
            request,
            kind: "attempt",
            detail,
            budget_left: budget.get().map(RetryBudget::left),
        });
        let ends = AttemptEnds { progress: progress.clone(), request };
        async move {
            let upstream: Arc<str> = "scripted".into();
            let answered = match answer {
                Answer::Status(status, delay) => {
                    tokio::time::sleep(delay).await;
                    let mut res = Response::new(Body::empty());
                    *res.status_mut() = status;
                    Ok(res)
                }
                Answer::Grpc(status) => {
                    let mut res = Response::new(Body::empty());
                    let headers = res.headers_mut();
                    headers
                        .insert("content-type", http::HeaderValue::from_static("application/grpc"));
                    headers.insert("grpc-status", http::HeaderValue::from(status.code()));
                    // read off the head where it enters, as the forwarder does
                    crate::http::grpc::read_head(&mut res);
                    Ok(res)
                }
                Answer::Reset => Err(ProxyError::UpstreamReset {
                    upstream,
                    source: "the scripted endpoint reset the connection".into(),
                }),
                Answer::Refused => Err(ProxyError::ConnectFailed {
                    upstream,
                    source: "the scripted endpoint refused the connection".into(),
                }),
            };
            drop(ends);
            answered
        }
    })
}

/// The timeline as text, one line per event.
pub fn render(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| {
            let budget = e.budget_left.map_or(String::new(), |n| format!("  [budget left: {n}]"));
            format!(
                "{:>9.3}s  request {:<3} {:<8} {}{budget}\n",
                e.at_ms as f64 / 1e3,
                e.request,
                e.kind,
                e.detail
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `payments` with its `retry`, and other sections (`name: value`) beside it.
    fn config(retry: &str, others: &[&str]) -> config::Config {
        let others: String = others.iter().map(|section| format!("    {section}\n")).collect();
        let yaml = format!(
            "service: {{ name: explained }}\n\
             upstreams:\n  \
               payments:\n    \
                 listen: 127.0.0.1:18080\n    \
                 discovery: {{ static: [\"127.0.0.1:9\"] }}\n    \
                 timeouts: {{ request: 10m }}\n    \
                 retry: {retry}\n{others}"
        );
        config::load_str("explain.yaml", &yaml).expect("a valid config")
    }

    fn run(repeat: usize, every: Duration) -> Run {
        Run { repeat, every, seed: Some(7) }
    }

    #[test]
    fn the_budget_left_falls_with_each_retry_and_once_spent_no_request_is_retried() {
        // 0 × requests + 1/s over the 10 s window: ten retries in all
        let cfg = config(
            "{ max_attempts: 3, backoff: { initial: 10ms, max: 10ms }, \
               budget: { ratio: 0, min_per_second: 1 } }",
            &[],
        );
        let answers = parse_answers("503").unwrap();
        let events =
            explain(&cfg, "payments", None, answers, run(8, Duration::from_millis(100))).unwrap();
        let attempts = |n| events.iter().filter(|e| e.request == n && e.kind == "attempt").count();
        let answer =
            |n: usize| events.iter().find(|e| e.request == n && e.kind == "answer").unwrap();
        assert_eq!((1..=5).map(attempts).collect::<Vec<_>>(), [3; 5], "{events:#?}");
        assert_eq!((6..=8).map(attempts).collect::<Vec<_>>(), [1; 3], "budget spent: {events:#?}");
        let budget: Vec<_> = events
            .iter()
            .filter(|e| e.request == 1 && e.kind == "attempt")
            .map(|e| e.budget_left)
            .collect();
        assert_eq!(budget, [Some(10), Some(9), Some(8)]);
        assert_eq!(answer(5).budget_left, Some(0));
        assert_eq!(answer(5).detail, "503 outrigger-attempts: 3");
        assert_eq!(answer(6).detail, "503", "no retry once the budget is spent");
    }

    #[test]
    fn requests_go_at_their_time_so_a_concurrency_limit_and_a_hedge_show() {
        let retry = "{ max_attempts: 2, backoff: { initial: 10ms, max: 10ms } }";
        let cfg = config(retry, &["concurrency_limit: 1"]);
        // the first request is still out when the second comes: refused, not queued behind it
        let answers = parse_answers("200@3s").unwrap();
        let events =
            explain(&cfg, "payments", None, answers, run(2, Duration::from_secs(1))).unwrap();
        let answers: Vec<_> = events
            .iter()
            .filter(|e| e.kind == "answer")
            .map(|e| (e.at_ms, e.request, e.detail.as_str()))
            .collect();
        assert_eq!(
            answers,
            [(1000, 2, "503 outrigger-error: overloaded"), (3000, 1, "200")],
            "{events:#?}"
        );

        // a hedge goes out while the first attempt is slow, and its answer wins
        let cfg = config(retry, &["hedge: { after: 100ms }"]);
        let answers = parse_answers("200@5s,200").unwrap();
        let events = explain(&cfg, "payments", None, answers, run(1, Duration::ZERO)).unwrap();
        let lines: Vec<_> = events.iter().map(|e| (e.at_ms, e.kind, e.detail.as_str())).collect();
        assert_eq!(
            lines,
            [
                (0, "attempt", "200 after 5s"),
                (100, "attempt", "200 (hedge, attempt 2)"),
                (100, "answer", "200 outrigger-attempts: 2"),
            ],
            "{events:#?}"
        );
    }

    #[test]
    fn a_retrys_range_is_the_one_its_backoff_draws_from() {
        // decorrelated jitter draws the first retry from initial..3 × initial, as the layer does
        let retry =
            "{ max_attempts: 2, backoff: { jitter: decorrelated, initial: 100ms, max: 5s } }";
        let cfg = config(retry, &[]);
        let answers = parse_answers("503").unwrap();
        let events = explain(&cfg, "payments", None, answers, run(1, Duration::ZERO)).unwrap();
        let retry = &events[1].detail;
        assert!(retry.starts_with("503 (retry 1, after a backoff of "), "{retry}");
        assert!(retry.ends_with(" ms drawn from 100..299 ms)"), "{retry}");
    }

    #[test]
    fn minutes_of_backoff_take_well_under_a_second() {
        let cfg = config(
            "{ max_attempts: 6, backoff: { initial: 10s, max: 2m, jitter: none }, \
               budget: { ratio: 1, min_per_second: 10 } }",
            &[],
        );
        let answers = parse_answers("503").unwrap();
        // real time, not the explained run's paused clock
        let wall = tokio::time::Instant::now();
        let events =
            explain(&cfg, "payments", None, answers, run(20, Duration::from_secs(30))).unwrap();
        let wall = wall.elapsed();
        let span = Duration::from_millis(events.last().unwrap().at_ms as u64);
        // a request every 30 s, whether the one before has its answer or not; each waits
        // 10 + 20 + 40 + 80 + 120 s between its attempts: the last starts at 9.5 min
        assert_eq!(span, Duration::from_secs(19 * 30 + 270), "the timeline spans {span:?}");
        assert_eq!(events.iter().filter(|e| e.kind == "attempt").count(), 20 * 6);
        assert!(wall < Duration::from_secs(1), "{span:?} of policy time took {wall:?}");
    }

    #[test]
    fn answers_parse_and_a_bad_one_is_named() {
        assert_eq!(
            parse_answers("503, 200@3s,reset,refused").unwrap(),
            [
                Answer::Status(StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO),
                Answer::Status(StatusCode::OK, Duration::from_secs(3)),
                Answer::Reset,
                Answer::Refused,
            ]
        );
        assert!(parse_answers("503,teapot").unwrap_err().contains("\"teapot\" is not an answer"));
        assert!(parse_answers("200@soon").unwrap_err().contains("is not a duration"));
        assert_eq!(
            parse_answers("unavailable,ok").unwrap(),
            [Answer::Grpc(config::GrpcStatus::Unavailable), Answer::Grpc(config::GrpcStatus::Ok)]
        );
    }
}
