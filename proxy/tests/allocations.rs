//! Heap allocations per request in the policy layers, counted by a global allocator (issue 9:
//! none beyond what a policy needs). One test in its own binary, so that nothing else allocates
//! while it counts.
//!
//! The layers are `stack::policies`, exactly as an upstream (or a route, chosen per request by
//! `route_match::Routed`) gets them, around an inner service
//! that answers on its second poll (so every timer is armed, as with a real upstream) without
//! allocating. Requests carry the headers a typical client sends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use outrigger_proxy::config;
use outrigger_proxy::error::ProxyError;
use outrigger_proxy::http::Body;
use outrigger_proxy::http::route_match::{Matcher, Routed};
use outrigger_proxy::stack;
use outrigger_proxy::telemetry::metrics::Metrics;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::{Service, ServiceExt};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const REQUESTS: usize = 1000;

/// Every HTTP policy on, as in `bench/http.sh`'s full stack.
const FULL: &str = "
upstreams:
  bench:
    discovery: { static: [\"127.0.0.1:9\"] }
    timeouts: { connect: 1s, request: 10s, per_try: 5s }
    retry: { max_attempts: 3, budget: { ratio: 0.2, min_per_second: 10 } }
    circuit_breaker: { failure_rate: 0.5, window: 10s, min_requests: 20, consecutive_failures: 5 }
    rate_limit: { requests_per_second: 1000000, burst: 100000 }
    concurrency_limit: 100000
";

/// The same without retries.
const NO_RETRY: &str = "
upstreams:
  bench:
    discovery: { static: [\"127.0.0.1:9\"] }
    timeouts: { connect: 1s, request: 10s, per_try: 5s }
    circuit_breaker: { failure_rate: 0.5, window: 10s, min_requests: 20, consecutive_failures: 5 }
    rate_limit: { requests_per_second: 1000000, burst: 100000 }
    concurrency_limit: 100000
";

/// The full stack behind routes, the request matching the last (path prefix, method and
/// header), whose sections replace the upstream's; `retry: off` there, so no head is copied.
const ROUTED: &str = "
upstreams:
  bench:
    discovery: { static: [\"127.0.0.1:9\"] }
    timeouts: { connect: 1s, request: 10s, per_try: 5s }
    retry: { max_attempts: 3, budget: { ratio: 0.2, min_per_second: 10 } }
    circuit_breaker: { failure_rate: 0.5, window: 10s, min_requests: 20, consecutive_failures: 5 }
    rate_limit: { requests_per_second: 1000000, burst: 100000 }
    concurrency_limit: 100000
    routes:
      - { name: admin, match: { path_prefix: /admin } }
      - { name: order, match: { path: /orders, methods: [POST] } }
      - name: orders
        match: { path_prefix: /orders, methods: [GET], headers: { Accept: application/json } }
        timeouts: { request: 5s, per_try: 2s }
        retry: off
        rate_limit: { requests_per_second: 1000000, burst: 100000 }
        concurrency_limit: 1000
";

/// Answers 200 on its second poll, allocating nothing.
#[derive(Clone)]
struct Upstream;

impl Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = SecondPoll;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> SecondPoll {
        SecondPoll { polled: false }
    }
}

struct SecondPoll {
    polled: bool,
}

impl Future for SecondPoll {
    type Output = Result<Response<Body>, ProxyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if std::mem::replace(&mut self.polled, true) {
            Poll::Ready(Ok(Response::new(Body::empty())))
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// A request as hyper hands it over: its header values and target share one buffer (a clone
/// of them counts a reference, it does not allocate; one clone here makes them shared).
fn request() -> Request<Body> {
    request_with(None)
}

/// The same, and an `outrigger-timeout` shorter than the configured timeout.
fn request_with_timeout() -> Request<Body> {
    request_with(Some("300ms"))
}

fn request_with(timeout: Option<&'static str>) -> Request<Body> {
    let mut req = Request::get("http://bench/orders?page=2");
    if let Some(timeout) = timeout {
        req = req.header("outrigger-timeout", timeout);
    }
    let req = req
        .header("host", "bench")
        .header("user-agent", "curl/8.5.0")
        .header("accept", "application/json")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .body(Body::empty())
        .unwrap();
    let (parts, body) = req.into_parts();
    drop(parts.clone());
    Request::from_parts(parts, body)
}

/// Allocations made while `REQUESTS` requests, built beforehand, go through the layers of `yaml`.
async fn allocations_for(yaml: &str, request: fn() -> Request<Body>) -> usize {
    let config = config::load_str("alloc.yaml", yaml).unwrap();
    let upstream = &config.upstreams.0[0];
    let metrics = Metrics::new();
    let shared = stack::Shared::new(upstream, &metrics);
    let stack_of = |route| stack::policies(upstream, route, &shared, &metrics, Upstream).0;
    let routes = upstream
        .routes
        .iter()
        .map(|r| (Matcher::new(&r.matches), Arc::from(&*r.name), stack_of(Some(r))));
    let routed = Routed::new(routes.collect(), stack_of(None));
    let route = |req: &Request<Body>| {
        let (name, svc) = routed.choose(req);
        assert_eq!(name, upstream.routes.last().map_or("(default)", |r| r.name.as_str()));
        svc.clone()
    };
    let mut svc = route(&request());
    // warm up: metric handles, the rate limiter, the breaker's window and the timer wheel
    for _ in 0..100 {
        svc.ready().await.unwrap().call(request()).await.unwrap();
    }
    let requests: Vec<_> = (0..REQUESTS).map(|_| request()).collect();
    let mut responses = Vec::with_capacity(REQUESTS);
    let region = Region::new(GLOBAL);
    for req in requests {
        // the route is chosen per request, as `http::route` does, before the policies
        let mut svc = route(&req);
        responses.push(svc.ready().await.unwrap().call(req).await.unwrap());
    }
    let made = region.change().allocations;
    assert!(responses.iter().all(|r| r.status() == 200));
    made
}

/// Allocations of the copy of a request head that the retry layer keeps for each attempt.
fn head_copies() -> usize {
    let (parts, _) = request().into_parts();
    let mut copies = Vec::with_capacity(REQUESTS);
    let region = Region::new(GLOBAL);
    for _ in 0..REQUESTS {
        copies.push(parts.clone());
    }
    region.change().allocations
}

#[test]
fn the_route_choice_and_policy_layers_allocate_nothing_per_request_but_the_retry_head_copy() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let without_retry = runtime.block_on(allocations_for(NO_RETRY, request));
    let full = runtime.block_on(allocations_for(FULL, request));
    let routed = runtime.block_on(allocations_for(ROUTED, request));
    let copies = head_copies();
    let shortened = runtime.block_on(allocations_for(NO_RETRY, request_with_timeout));

    assert_eq!(without_retry, 0, "metrics, rate limit, concurrency limit, breaker, deadlines");
    assert_eq!(routed, 0, "a route chosen among three, then its own stack without retries");
    assert_eq!(
        full,
        copies,
        "every layer on: only the head copy a replay needs ({} per request)",
        copies / REQUESTS
    );
    // the configured timeout's `outrigger-timeout` value is made once per upstream; a shorter
    // one the client asks for is a new value, which owns its bytes (DESIGN "Deadlines")
    assert_eq!(shortened, REQUESTS, "one header value for the time left, per request");
}
