//! The resilience policies through the real binary: each asserts statuses, headers and the
//! exact count of upstream hits.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use outrigger_tests::{DEADLINE, Reply, Sidecar, Upstream, wait_until};

/// `up` as upstream `payments`, with `policies` (YAML lines at the upstream's indentation).
fn payments(up: &Upstream, policies: &str) -> String {
    let mut yaml = up.yaml("payments");
    for line in policies.lines() {
        yaml.push_str("    ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml
}

const FAST_RETRY: &str =
    "retry: { max_attempts: 3, backoff: { initial: 10ms, max: 50ms, jitter: none } }";

#[tokio::test]
async fn retries_503_503_then_returns_the_200_after_three_attempts() {
    let up = Upstream::scripted([Reply::Status(503), Reply::Status(503), Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&payments(&up, FAST_RETRY)).await;

    let res = sidecar.get("payments", "/charge").await;

    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["outrigger-attempts"], "3");
    assert_eq!(up.requests(), 3);
    let (_, metrics) = sidecar.admin("/metrics").await;
    assert!(metrics.contains(r#"outrigger_retries_total{upstream="payments"} 2"#), "{metrics}");
    assert!(
        metrics.contains(
            r#"outrigger_requests_total{code="200",route="(default)",upstream="payments"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn when_retries_are_spent_the_client_gets_the_upstreams_last_answer() {
    let up = Upstream::status(503).await;
    let sidecar = Sidecar::start(&payments(&up, FAST_RETRY)).await;

    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 503);
    assert_eq!(res.body(), "503 from upstream\n");
    assert!(res.headers().get("outrigger-error").is_none(), "the upstream's answer, not ours");
    assert_eq!(res.headers()["outrigger-attempts"], "3");
    assert_eq!(up.requests(), 3);
}

fn post(key: Option<&str>, body: Bytes) -> Request<Full<Bytes>> {
    let mut req = Request::post("/charge").header("host", "payments");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.body(Full::new(body)).unwrap()
}

#[tokio::test]
async fn a_post_without_an_idempotency_key_is_sent_once() {
    let up = Upstream::scripted([Reply::Status(503), Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&payments(&up, FAST_RETRY)).await;

    let res = sidecar.send(post(None, Bytes::from_static(b"amount=10"))).await;

    assert_eq!(res.status(), 503);
    assert_eq!(up.requests(), 1, "a POST without a key is never sent twice");
}

#[tokio::test]
async fn a_post_with_an_idempotency_key_is_retried_with_the_identical_body() {
    let up = Upstream::scripted([Reply::Status(503), Reply::Status(201)]).await;
    let sidecar = Sidecar::start(&payments(&up, FAST_RETRY)).await;
    let body: Bytes = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>().into();

    let res = sidecar.send(post(Some("charge-42"), body.clone())).await;

    assert_eq!(res.status(), 201);
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, body);
    assert_eq!(seen[1].body, body, "the replayed body is byte-identical");
    assert_eq!(seen[1].headers["idempotency-key"], "charge-42");
}

#[tokio::test]
async fn a_body_larger_than_the_replay_buffer_streams_through_once() {
    let up = Upstream::scripted([Reply::Status(503), Reply::Status(200)]).await;
    let policies = "retry: { replay_buffer: 16KiB, backoff: { initial: 10ms, jitter: none } }";
    let sidecar = Sidecar::start(&payments(&up, policies)).await;
    let body = Bytes::from(vec![b'z'; 100 * 1024]);

    let res = sidecar.send(post(Some("big"), body.clone())).await;

    assert_eq!(res.status(), 503, "not retried: the body did not fit the replay buffer");
    assert_eq!(up.requests(), 1);
    assert_eq!(up.seen()[0].body, body, "and it arrived whole");
}

#[tokio::test]
async fn an_attempt_cut_by_per_try_is_retried() {
    let up =
        Upstream::scripted([Reply::Delayed(Duration::from_secs(5), 200), Reply::Status(200)]).await;
    let policies = "timeouts: { per_try: 200ms, request: 5s }\nretry: { on: [timeout], backoff: { initial: 10ms, jitter: none } }";
    let sidecar = Sidecar::start(&payments(&up, policies)).await;

    let started = tokio::time::Instant::now();
    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["outrigger-attempts"], "2");
    assert_eq!(up.requests(), 2);
    assert!(started.elapsed() < Duration::from_secs(2), "the slow attempt was cut at 200 ms");
}

#[tokio::test]
async fn an_attempt_cut_by_per_try_is_retried_when_on_lists_504() {
    // DESIGN's own example list: no `timeout` in it, but a per-try cut is the attempt's 504
    let up =
        Upstream::scripted([Reply::Delayed(Duration::from_secs(5), 200), Reply::Status(200)]).await;
    let policies = "timeouts: { per_try: 300ms, request: 5s }\nretry: { on: [connect-failure, reset, 502, 503, 504], backoff: { initial: 10ms, jitter: none } }";
    let sidecar = Sidecar::start(&payments(&up, policies)).await;

    let started = tokio::time::Instant::now();
    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 200, "{:?}", res.headers());
    assert_eq!(res.headers()["outrigger-attempts"], "2");
    assert_eq!(up.requests(), 2);
    assert!(started.elapsed() < Duration::from_secs(2), "the slow attempt was cut at 300 ms");
}

#[tokio::test]
async fn an_attempt_cut_by_per_try_is_not_retried_when_on_lists_neither_timeout_nor_504() {
    let up =
        Upstream::scripted([Reply::Delayed(Duration::from_secs(5), 200), Reply::Status(200)]).await;
    let policies =
        "timeouts: { per_try: 300ms, request: 5s }\nretry: { on: [connect-failure, reset, 503] }";
    let sidecar = Sidecar::start(&payments(&up, policies)).await;

    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 504);
    assert_eq!(res.headers()["outrigger-error"], "timeout");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn a_request_past_its_whole_deadline_gets_504_timeout() {
    let up = Upstream::scripted([Reply::Delayed(Duration::from_secs(5), 200)]).await;
    let sidecar = Sidecar::start(&payments(&up, "timeouts: { request: 300ms }")).await;

    let started = tokio::time::Instant::now();
    let res = sidecar.get("payments", "/").await;
    let took = started.elapsed();

    assert_eq!(res.status(), 504);
    assert_eq!(res.headers()["outrigger-error"], "timeout");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn retries_and_backoff_never_run_past_the_request_deadline() {
    let up = Upstream::status(503).await;
    let policies = "timeouts: { request: 400ms }\nretry: { max_attempts: 10, backoff: { strategy: fixed, initial: 300ms, jitter: none } }";
    let sidecar = Sidecar::start(&payments(&up, policies)).await;

    let started = tokio::time::Instant::now();
    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 503, "the last upstream answer, at once, not a 504 at the deadline");
    assert_eq!(res.headers()["outrigger-attempts"], "2");
    assert_eq!(up.requests(), 2, "a third attempt would start after the deadline");
    assert!(started.elapsed() < Duration::from_millis(400));
}

#[tokio::test]
async fn the_breaker_opens_forwards_nothing_then_half_opens_and_closes() {
    let up = Upstream::scripted([
        Reply::Status(500),
        Reply::Status(500),
        Reply::Status(500),
        Reply::Status(200),
    ])
    .await;
    let policies =
        "circuit_breaker: { consecutive_failures: 3, open_for: 500ms, half_open_requests: 1 }";
    let sidecar = Sidecar::start(&payments(&up, policies)).await;

    for _ in 0..3 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 500);
    }
    let open = sidecar.get("payments", "/").await;
    assert_eq!(open.status(), 503);
    assert_eq!(open.headers()["outrigger-error"], "circuit-open");
    assert_eq!(open.headers()["retry-after"], "1");
    assert_eq!(up.requests(), 3, "nothing forwarded while open");
    let (_, metrics) = sidecar.admin("/metrics").await;
    assert!(metrics.contains(r#"outrigger_circuit_state{upstream="payments"} 2"#), "{metrics}");

    // after open_for, one probe goes through; its success closes the breaker
    wait_until(DEADLINE, "the breaker to let a probe through", || async {
        (sidecar.get("payments", "/").await.status() == 200).then_some(())
    })
    .await;
    assert_eq!(up.requests(), 4);
    assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    let (_, metrics) = sidecar.admin("/metrics").await;
    assert!(metrics.contains(r#"outrigger_circuit_state{upstream="payments"} 0"#), "{metrics}");
}

#[tokio::test]
async fn the_rate_limit_answers_429_at_once_and_forwards_nothing() {
    let up = Upstream::status(200).await;
    let sidecar =
        Sidecar::start(&payments(&up, "rate_limit: { requests_per_second: 1, burst: 2 }")).await;

    let statuses = [
        sidecar.get("payments", "/").await,
        sidecar.get("payments", "/").await,
        sidecar.get("payments", "/").await,
    ];

    assert_eq!(statuses.iter().map(|r| r.status().as_u16()).collect::<Vec<_>>(), [200, 200, 429]);
    assert_eq!(statuses[2].headers()["outrigger-error"], "rate-limited");
    assert_eq!(statuses[2].headers()["retry-after"], "1");
    assert_eq!(up.requests(), 2);
    let (_, metrics) = sidecar.admin("/metrics").await;
    assert!(
        metrics.contains(r#"outrigger_rate_limited_total{upstream="payments"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_concurrency_limit_answers_503_overloaded_at_once() {
    let up =
        Upstream::scripted([Reply::Delayed(Duration::from_secs(3), 200), Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&payments(&up, "concurrency_limit: 1")).await;
    let outbound = sidecar.outbound;
    let first = tokio::spawn(async move {
        let req =
            Request::get("/slow").header("host", "payments").body(Full::new(Bytes::new())).unwrap();
        outrigger_tests::send(outbound, req).await.unwrap().status()
    });
    wait_until(DEADLINE, "the first request to reach the upstream", || async {
        (up.requests() == 1).then_some(())
    })
    .await;

    let started = tokio::time::Instant::now();
    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["outrigger-error"], "overloaded");
    assert!(started.elapsed() < Duration::from_secs(1), "answered at once, not queued");
    assert_eq!(up.requests(), 1);
    assert_eq!(first.await.unwrap(), 200);
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() {
    let up = Upstream::status(503).await;
    let policies = "retry: { max_attempts: 5, backoff: { initial: 1ms, max: 2ms, jitter: none }, budget: { ratio: 0.0, min_per_second: 1 } }";
    let sidecar = Sidecar::start(&payments(&up, policies)).await;

    for _ in 0..20 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 503);
    }

    // 1 retry per second over the 10 s window: 10 retries, not 20 x 4
    assert_eq!(up.requests(), 30);
}

#[tokio::test]
async fn a_request_that_can_never_be_retried_streams_through_unbuffered() {
    use tokio::io::AsyncWriteExt;

    let up = Upstream::status(200).await;
    // no connect-failure in `on`: a POST without a key can never be sent twice
    let sidecar = Sidecar::start(&payments(&up, "retry: { on: [503] }")).await;
    let mut client = tokio::net::TcpStream::connect(sidecar.outbound).await.unwrap();
    client
        .write_all(b"POST /charge HTTP/1.1\r\nhost: payments\r\ncontent-length: 10\r\n\r\nhalf-")
        .await
        .unwrap();

    // the upstream sees the request while the client has sent only half of its body
    wait_until(DEADLINE, "the request to reach the upstream before its body ended", || async {
        (up.requests() == 1).then_some(())
    })
    .await;
    client.write_all(b"done!").await.unwrap();
    wait_until(DEADLINE, "the whole body to arrive", || async {
        (up.seen()[0].body.as_ref() == b"half-done!").then_some(())
    })
    .await;
}
