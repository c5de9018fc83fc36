//! The request path's hot spots, each alone: routing an authority to its upstream, choosing a
//! route among 20, the policy layers' per-request work (every layer on, and none), the
//! balancer's pick, backoff, the `Retry-After` parser, a trace context, and the message
//! envelope's encoding.

use std::collections::HashMap;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response};
use outrigger_discovery::{Endpoints, Pool, PoolConfig, SourceConfig};
use outrigger_proxy::config;
use outrigger_proxy::error::ProxyError;
use outrigger_proxy::http::Body;
use outrigger_proxy::http::route::Routes;
use outrigger_proxy::http::route_match::{Matcher, Routed};
use outrigger_proxy::messaging::envelope::{Envelope, ErrorRecord, MessageId};
use outrigger_proxy::policy::backoff::{Backoff, parse_retry_after};
use outrigger_proxy::stack::{self, UpstreamService};
use outrigger_proxy::telemetry::metrics::Metrics;
use outrigger_proxy::telemetry::trace::{Kind, Tracer};
use tower::Service;
use tower::util::BoxCloneSyncService;

/// Every HTTP policy on, set so that none trips (as `bench/http.sh`'s full stack).
const FULL: &str = "
upstreams:
  bench:
    discovery: { static: [\"127.0.0.1:9001\"] }
    timeouts: { connect: 1s, request: 10s, per_try: 5s }
    retry: { max_attempts: 3, budget: { ratio: 0.2, min_per_second: 10 } }
    circuit_breaker: { failure_rate: 0.5, window: 10s, min_requests: 20, consecutive_failures: 5 }
    rate_limit: { requests_per_second: 1000000000, burst: 100000000 }
    concurrency_limit: 100000
";

const BARE: &str = "
upstreams:
  bench:
    discovery: { static: [\"127.0.0.1:9001\"] }
";

fn upstream_of(yaml: &str) -> config::Upstream {
    config::load_str("bench.yaml", yaml).unwrap().upstreams.0.remove(0)
}

/// An upstream that answers at once.
fn answer(_: Request<Body>) -> std::future::Ready<Result<Response<Body>, ProxyError>> {
    std::future::ready(Ok(Response::new(Body::empty())))
}

fn request() -> Request<Body> {
    Request::get("/orders?page=2")
        .header("host", "bench")
        .header("user-agent", "wrk")
        .body(Body::empty())
        .unwrap()
}

/// Polls a future that completes without waiting (the upstream answers at once).
fn now<F: Future>(fut: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the benchmark's upstream answers at once"),
    }
}

fn policies(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _entered = runtime.enter();
    let metrics = Metrics::new();
    let mut group = c.benchmark_group("policies");
    for (name, yaml) in [("bare", BARE), ("full", FULL)] {
        let upstream = upstream_of(yaml);
        let shared = stack::Shared::new(&upstream, &metrics);
        let mut svc =
            stack::policies(&upstream, None, &shared, &metrics, tower::service_fn(answer)).0;
        group.bench_function(name, |b| {
            b.iter_batched(
                request,
                |req| now(svc.call(req)).unwrap(),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn route(c: &mut Criterion) {
    let metrics = Metrics::new();
    let names = ["billing", "catalog", "inventory", "orders", "payments", "shipping", "users"];
    let by_name: HashMap<Box<str>, Routed<UpstreamService>> = names
        .iter()
        .map(|n| {
            (Box::from(*n), Routed::single(BoxCloneSyncService::new(tower::service_fn(answer))))
        })
        .collect();
    let routes = Routes::new(by_name, metrics.upstream("none"));
    c.bench_function("route/find", |b| b.iter(|| routes.find(black_box("payments")).is_some()));
    c.bench_function("route/find_mixed_case", |b| {
        b.iter(|| routes.find(black_box("Payments")).is_some())
    });
}

/// 20 routes of mixed rules (path prefix, exact path, method, header), the request matching only
/// the last: the worst case of "first match wins", every route tried.
fn route_match(c: &mut Criterion) {
    let mut yaml = String::from(
        "upstreams:\n  bench:\n    discovery: { static: [\"127.0.0.1:9001\"] }\n    routes:\n",
    );
    for i in 0..19 {
        let rule = match i % 4 {
            0 => format!("{{ path_prefix: /v1/service{i} }}"),
            1 => format!("{{ path: /v1/orders/{i}, methods: [GET] }}"),
            2 => format!("{{ path_prefix: /v1/orders, methods: [DELETE, PATCH] }}"),
            _ => format!("{{ path_prefix: /v1, headers: {{ x-tenant: tenant{i} }} }}"),
        };
        yaml.push_str(&format!("      - {{ name: r{i}, match: {rule} }}\n"));
    }
    yaml.push_str(concat!(
        "      - { name: last, match: { path_prefix: /v1/orders, methods: [POST],",
        " headers: { x-tenant: gold } } }\n",
    ));
    let upstream = upstream_of(&yaml);
    let routes =
        upstream.routes.iter().map(|r| (Matcher::new(&r.matches), Arc::from(&*r.name), ()));
    let routed = Routed::new(routes.collect(), ());
    let req = Request::post("http://bench/v1/orders/42?x=1")
        .header("host", "bench")
        .header("user-agent", "wrk")
        .header("accept", "application/json")
        .header("x-tenant", "gold")
        .body(Body::empty())
        .unwrap();
    assert_eq!(routed.choose(&req).0, "last");
    c.bench_function("route/match_last_of_20", |b| {
        b.iter(|| routed.choose(black_box(&req)).0.len())
    });
}

fn balancer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addrs: Vec<String> = (0..10).map(|i| format!("\"127.0.0.1:{}\"", 9000 + i)).collect();
    for (name, lb) in [("round_robin", "round_robin"), ("p2c_ewma", "p2c_ewma")] {
        let yaml = format!(
            "upstreams:\n  bench:\n    discovery: {{ static: [{}] }}\n    load_balancer: {lb}\n",
            addrs.join(", ")
        );
        let upstream = upstream_of(&yaml);
        let pool = runtime.block_on(async {
            let endpoints =
                Endpoints::start("bench", &upstream.discovery, &SourceConfig::default());
            let cfg = PoolConfig { load_balancer: upstream.load_balancer, ..Default::default() };
            let pool = Pool::start("bench", endpoints, cfg);
            while pool.pick(&[]).is_none() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            pool
        });
        let _entered = runtime.enter();
        c.bench_function(&format!("balancer/{name}_of_10"), |b| {
            b.iter(|| pool.pick(&[]).expect("an endpoint").finish(false))
        });
    }
}

fn backoff(c: &mut Criterion) {
    let backoff = Backoff::new(config::Backoff::default());
    c.bench_function("backoff/delay", |b| {
        b.iter(|| backoff.delay(black_box(3), black_box(Duration::from_millis(400))))
    });
    let value = HeaderValue::from_static("Wed, 25 Nov 2026 10:00:05 GMT");
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_600_800);
    c.bench_function("backoff/retry_after_date", |b| {
        b.iter(|| parse_retry_after(black_box(&value), now))
    });
}

fn trace(c: &mut Criterion) {
    let tracer = Tracer::disabled();
    let parent =
        HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    c.bench_function("trace/continue_and_propagate", |b| {
        b.iter(|| tracer.start(Some(black_box(&parent)), "outbound", Kind::Client).context.header())
    });
    c.bench_function("trace/start_and_propagate", |b| {
        b.iter(|| tracer.start(None, "outbound", Kind::Client).context.header())
    });
}

fn envelope(c: &mut Criterion) {
    let payload = serde_json::value::RawValue::from_string(
        r#"{"order_id":"A-1042","amount":{"value":1999,"currency":"EUR"},"items":[1,2,3]}"#
            .to_owned(),
    )
    .unwrap();
    let now = SystemTime::now();
    let mut envelope = Envelope::new(MessageId::generate(now), "orders", now, payload);
    envelope.metadata.insert("idempotency_key".into(), "k-1042".into());
    for status in [500, 503, 500] {
        envelope.error.push(ErrorRecord {
            status_code: Some(status),
            message: "upstream database unavailable".into(),
            stack_trace: "at Orders.charge (orders.js:42)\n  at main (index.js:7)".into(),
            date: "2026-11-25T10:00:00.000Z".into(),
        });
    }
    let json = envelope.to_json();
    c.bench_function("envelope/encode_with_3_errors", |b| {
        b.iter(|| black_box(&envelope).to_json())
    });
    c.bench_function("envelope/decode_with_3_errors", |b| {
        b.iter(|| Envelope::from_json(black_box(&json)).unwrap())
    });
}

criterion_group!(benches, policies, route, route_match, balancer, backoff, trace, envelope);
criterion_main!(benches);
