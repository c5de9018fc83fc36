//! Hedging through the real binary: two endpoints in round robin, one slow (1 s) and one fast.
//! A request that may be retried and whose first attempt went to the slow one gets a hedge to
//! the fast one after `after`, answers at the fast one's pace, and the slow attempt is
//! cancelled; a POST without a key waits; the retry budget caps hedges under load.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use outrigger_tests::{
    GrpcReply, GrpcUpstream, Reply, Sidecar, Upstream, frame, grpc_call, send, wait_until,
};
use tokio::time::Instant;

use crate::messaging::metric;

const SLOW: Duration = Duration::from_secs(1);

/// An upstream `payments` over `slow` and `fast` in round robin, with `extra` lines at the
/// upstream's indentation.
fn payments(slow: &Upstream, fast: &Upstream, extra: &str) -> String {
    format!(
        concat!(
            "upstreams:\n  payments:\n",
            "    discovery: {{ static: [\"{}\", \"{}\"] }}\n",
            "    load_balancer: round_robin\n",
            "    retry: {{ max_attempts: 3, backoff: {{ initial: 10ms, max: 50ms, jitter: none }} }}\n",
            "{}",
        ),
        slow.addr(),
        fast.addr(),
        extra,
    )
}

const HEDGE: &str = "    hedge: { after: 50ms }\n";

async fn slow_and_fast() -> (Upstream, Upstream) {
    (Upstream::scripted([Reply::Delayed(SLOW, 200)]).await, Upstream::status(200).await)
}

async fn hedges(sidecar: &Sidecar, route: &str) -> f64 {
    let series = format!(r#"outrigger_hedges_total{{route="{route}",upstream="payments"}}"#);
    metric(sidecar, &series).await.unwrap_or(0.0)
}

fn post(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::post("/charge").header("host", "payments");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.body(Full::new(Bytes::from_static(b"amount=10"))).unwrap()
}

#[tokio::test]
async fn hedged_gets_complete_near_the_fast_endpoints_latency_and_are_counted() {
    let (slow, fast) = slow_and_fast().await;
    let sidecar = Sidecar::start(&payments(&slow, &fast, HEDGE)).await;

    for i in 0..6 {
        let started = Instant::now();
        let res = sidecar.get("payments", "/").await;
        let took = started.elapsed();
        assert_eq!(res.status(), 200);
        assert!(took < SLOW / 2, "request {i} took {took:?}: not hedged to the fast endpoint");
    }
    let hedged = slow.requests();
    assert!(hedged >= 2, "round robin sent {hedged} first attempts to the slow endpoint");
    assert_eq!(hedges(&sidecar, "(default)").await, hedged as f64, "one hedge per slow first try");
    let numbered: Vec<_> = fast
        .seen()
        .into_iter()
        .filter_map(|s| s.headers.get("outrigger-attempt").cloned())
        .collect();
    assert_eq!(numbered.len(), hedged, "each hedge says it is attempt 2");
    assert!(numbered.iter().all(|v| v == "2"), "{numbered:?}");
}

#[tokio::test]
async fn the_slow_endpoints_request_is_cancelled_when_the_hedge_answers() {
    let (slow, fast) = slow_and_fast().await;
    let sidecar = Sidecar::start(&payments(&slow, &fast, HEDGE)).await;

    for _ in 0..4 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }
    assert!(slow.requests() >= 1);
    // well before the slow answers would have been made: each was given up, not answered
    wait_until(
        Duration::from_millis(500),
        "the slow endpoint's requests to be cancelled",
        || async { (slow.cancelled() == slow.requests()).then_some(()) },
    )
    .await;
    assert_eq!(fast.cancelled(), 0);
}

#[tokio::test]
async fn a_post_without_idempotency_key_is_not_hedged_with_one_it_is() {
    let (slow, fast) = slow_and_fast().await;
    let sidecar = Sidecar::start(&payments(&slow, &fast, HEDGE)).await;

    let mut slowest = Duration::ZERO;
    for _ in 0..2 {
        let started = Instant::now();
        assert_eq!(sidecar.send(post(None)).await.status(), 200);
        slowest = slowest.max(started.elapsed());
    }
    assert!(slowest >= SLOW, "the POST sent to the slow endpoint waited for it: {slowest:?}");
    assert_eq!((slow.requests(), fast.requests()), (1, 1), "one attempt each, no hedge");
    assert_eq!(hedges(&sidecar, "(default)").await, 0.0);

    for i in 0..2 {
        let started = Instant::now();
        assert_eq!(sidecar.send(post(Some(&format!("k-{i}")))).await.status(), 200);
        assert!(started.elapsed() < SLOW / 2, "a keyed POST is hedged");
    }
    let keyed_to_slow = slow.requests() - 1;
    assert!(keyed_to_slow >= 1, "round robin sent a keyed POST to the slow endpoint first");
    assert_eq!(hedges(&sidecar, "(default)").await, keyed_to_slow as f64);
}

#[tokio::test]
async fn a_routes_hedge_applies_to_its_requests_only_and_is_counted_under_its_label() {
    let (slow, fast) = slow_and_fast().await;
    let routes = "    routes:\n      - { name: reads, match: { path_prefix: /reads }, hedge: { after: 50ms } }\n";
    let sidecar = Sidecar::start(&payments(&slow, &fast, routes)).await;

    for _ in 0..2 {
        let started = Instant::now();
        assert_eq!(sidecar.get("payments", "/reads/1").await.status(), 200);
        assert!(started.elapsed() < SLOW / 2);
    }
    let reads_to_slow = slow.requests();
    assert!(reads_to_slow >= 1);
    assert_eq!(hedges(&sidecar, "reads").await, reads_to_slow as f64);
    let mut slowest = Duration::ZERO;
    for _ in 0..2 {
        let started = Instant::now();
        assert_eq!(sidecar.get("payments", "/other").await.status(), 200);
        slowest = slowest.max(started.elapsed());
    }
    assert!(slowest >= SLOW, "the upstream itself does not hedge: {slowest:?}");
    assert_eq!(hedges(&sidecar, "(default)").await, 0.0);
}

#[tokio::test]
async fn the_retry_budget_caps_hedges_under_load() {
    let (slow, fast) = slow_and_fast().await;
    let yaml = payments(&slow, &fast, HEDGE)
        .replace("jitter: none }", "jitter: none }, budget: { ratio: 0.0, min_per_second: 1 }");
    let sidecar = Sidecar::start(&yaml).await;

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let req = Request::get("/").header("host", "payments").body(Full::new(Bytes::new()));
        calls.spawn(send(sidecar.outbound, req.unwrap()));
    }
    while let Some(res) = calls.join_next().await {
        assert_eq!(res.unwrap().expect("the sidecar answers").status(), 200);
    }
    let hedged = hedges(&sidecar, "(default)").await;
    // min_per_second 1 over the budget's 10 s window: at most 10, whatever the load
    assert!((1.0..=10.0).contains(&hedged), "{hedged} hedges");
    assert!(
        slow.requests() > 10,
        "more slow first tries ({}) than the budget allows",
        slow.requests()
    );
}

/// Upstream `payments` over two gRPC endpoints in round robin, calls on a route marked
/// idempotent (a gRPC call is a POST) with `route_extra`.
fn grpc_payments(slow: &GrpcUpstream, fast: &GrpcUpstream, route_extra: &str) -> String {
    format!(
        concat!(
            "upstreams:\n  payments:\n",
            "    discovery: {{ static: [\"{}\", \"{}\"] }}\n",
            "    load_balancer: round_robin\n    protocol: auto\n",
            "    retry: {{ max_attempts: 3, backoff: {{ initial: 10ms, max: 50ms, jitter: none }} }}\n",
            "    routes:\n      - {{ name: charge, idempotent: true{} }}\n",
        ),
        slow.addr(),
        fast.addr(),
        route_extra,
    )
}

#[tokio::test]
async fn a_unary_grpc_call_on_an_idempotent_route_is_hedged_with_its_copied_body() {
    let slow = GrpcUpstream::scripted([GrpcReply::Delayed(SLOW, 0)]).await;
    let fast = GrpcUpstream::scripted([GrpcReply::Status(0)]).await;
    let sidecar = Sidecar::start(&grpc_payments(&slow, &fast, ", hedge: { after: 50ms }")).await;

    for i in 0..4 {
        let started = Instant::now();
        let answer = grpc_call(sidecar.outbound, "payments", "/pay.Payments/Charge", b"42").await;
        assert_eq!(answer.status(), 0);
        assert!(started.elapsed() < SLOW / 2, "call {i} took {:?}", started.elapsed());
    }
    assert!(slow.calls() >= 1);
    assert_eq!(hedges(&sidecar, "charge").await, slow.calls() as f64);
    let bodies: Vec<Bytes> = fast.seen().into_iter().map(|c| c.body).collect();
    assert!(bodies.iter().all(|b| b == &frame(b"42")), "each hedge sent the whole message");
}

#[tokio::test]
async fn a_grpc_call_on_a_route_not_marked_idempotent_is_not_hedged() {
    let slow = GrpcUpstream::scripted([GrpcReply::Delayed(SLOW, 0)]).await;
    let fast = GrpcUpstream::scripted([GrpcReply::Status(0)]).await;
    let yaml =
        grpc_payments(&slow, &fast, "").replace("idempotent: true", "hedge: { after: 50ms }");
    let sidecar = Sidecar::start(&yaml).await;

    let mut slowest = Duration::ZERO;
    for _ in 0..2 {
        let started = Instant::now();
        let answer = grpc_call(sidecar.outbound, "payments", "/pay.Payments/Charge", b"42").await;
        assert_eq!(answer.status(), 0);
        slowest = slowest.max(started.elapsed());
    }
    assert!(slowest >= SLOW, "a POST without a key waits for its endpoint: {slowest:?}");
    assert_eq!(hedges(&sidecar, "charge").await, 0.0);
}
