//! Load balancing over healthy endpoints through the real binary: active health checks (HTTP,
//! and TCP against an endpoint that stops listening), outlier ejection, the all-ejected answer,
//! retries moving to another endpoint, p2c_ewma following latency, the watched endpoint file,
//! and the endpoint metrics and admin view.

use std::time::Duration;

use outrigger_tests::{DEADLINE, Reply, Sidecar, Upstream, wait_until};

/// An upstream `payments` over `ups`, with `extra` YAML lines at the upstream's indentation.
fn payments(ups: &[&Upstream], extra: &str) -> String {
    let list: Vec<String> = ups.iter().map(|u| format!("\"{}\"", u.addr())).collect();
    let mut yaml =
        format!("upstreams:\n  payments:\n    discovery: {{ static: [{}] }}\n", list.join(", "));
    for line in extra.lines() {
        yaml.push_str("    ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml
}

const CHECK: &str = "health_check: { path: /healthz, interval: 100ms, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2 }";

#[tokio::test]
async fn an_endpoint_failing_its_health_check_gets_no_traffic_until_it_recovers() {
    let good = Upstream::health_checked(200, 200).await;
    let sick = Upstream::health_checked(200, 503).await;
    let sidecar =
        Sidecar::start(&payments(&[&good, &sick], &format!("load_balancer: round_robin\n{CHECK}")))
            .await;

    for _ in 0..10 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }
    assert_eq!(sick.requests(), 0, "an unhealthy endpoint gets nothing");
    assert_eq!(good.requests(), 10);
    assert!(sick.health_checks() > 0);
    let (_, metrics) = sidecar.admin("/metrics").await;
    assert!(
        metrics.contains(r#"outrigger_endpoints{state="unhealthy",upstream="payments"} 1"#),
        "{metrics}"
    );
    // every probe is counted by its result: the sick one's failed, the good one's passed
    let checks = |result: &str| {
        let series =
            format!(r#"outrigger_health_checks_total{{result="{result}",upstream="payments"}} "#);
        let line = metrics.lines().find(|l| l.starts_with(&series));
        line.and_then(|l| l[series.len()..].parse::<u64>().ok()).unwrap_or(0)
    };
    assert!(checks("failed") >= 1 && checks("passed") >= 1, "{metrics}");

    sick.set_health(200);
    wait_until(DEADLINE, "the recovered endpoint to get traffic again", || async {
        sidecar.get("payments", "/").await;
        (sick.requests() > 0).then_some(())
    })
    .await;
    let (_, metrics) = sidecar.admin("/metrics").await;
    assert!(
        metrics.contains(r#"outrigger_endpoints{state="healthy",upstream="payments"} 2"#),
        "{metrics}"
    );
}

const TCP_CHECK: &str = "health_check: { tcp: true, interval: 100ms, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2 }";

/// The state `/v1/endpoints` gives the endpoint at `addr` of `payments`.
async fn endpoint_state(sidecar: &Sidecar, addr: std::net::SocketAddr) -> String {
    let (status, view) = sidecar.admin("/v1/endpoints").await;
    assert_eq!(status, 200, "{view}");
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    let endpoints = view["upstreams"]["payments"]["endpoints"].as_array().unwrap();
    let found = endpoints.iter().find(|e| e["address"] == addr.to_string());
    found.map_or_else(|| format!("absent from {view}"), |e| e["state"].as_str().unwrap().to_owned())
}

/// Waits until `payments` has `n` endpoints in `state` by `outrigger_endpoints`.
async fn wait_endpoints(sidecar: &Sidecar, state: &str, n: usize) {
    let series = format!(r#"outrigger_endpoints{{state="{state}",upstream="payments"}} {n}"#);
    wait_until(DEADLINE, &series, || async {
        let (_, metrics) = sidecar.admin("/metrics").await;
        metrics.lines().any(|l| l == series).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_tcp_health_check_takes_out_an_endpoint_that_refuses_connections_and_brings_it_back() {
    let steady = Upstream::status(200).await;
    let flaky = Upstream::status(200).await;
    let policies = format!("load_balancer: round_robin\n{TCP_CHECK}");
    let sidecar = Sidecar::start(&payments(&[&steady, &flaky], &policies)).await;
    wait_endpoints(&sidecar, "healthy", 2).await;
    for _ in 0..10 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }
    assert_eq!((steady.requests(), flaky.requests()), (5, 5), "both in rotation");

    // the sidecar still holds pooled connections to it: only the check can take it out
    flaky.stop_accepting().await;
    wait_endpoints(&sidecar, "unhealthy", 1).await;
    assert_eq!(endpoint_state(&sidecar, flaky.addr()).await, "unhealthy");
    for _ in 0..10 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }
    assert_eq!((steady.requests(), flaky.requests()), (15, 5), "out of rotation: nothing more");

    flaky.accept_again().await;
    wait_endpoints(&sidecar, "healthy", 2).await;
    assert_eq!(endpoint_state(&sidecar, flaky.addr()).await, "healthy");
    for _ in 0..10 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }
    assert_eq!(flaky.requests(), 10, "back in rotation: half of the next ten");
    assert_eq!(steady.requests(), 20);
}

#[tokio::test]
async fn a_tcp_health_check_answers_503_no_healthy_endpoints_when_the_only_endpoint_refuses() {
    let only = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&[&only], TCP_CHECK)).await;
    wait_endpoints(&sidecar, "healthy", 1).await;
    assert_eq!(sidecar.get("payments", "/").await.status(), 200);

    only.stop_accepting().await;
    wait_endpoints(&sidecar, "unhealthy", 1).await;
    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["outrigger-error"], "no-healthy-endpoints");
    assert_eq!(only.requests(), 1, "nothing reached it over the connection still pooled");
}

#[tokio::test]
async fn when_every_endpoint_is_unhealthy_the_answer_is_503_no_healthy_endpoints() {
    let sick = Upstream::health_checked(200, 500).await;
    let sidecar = Sidecar::start(&payments(&[&sick], CHECK)).await;

    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["outrigger-error"], "no-healthy-endpoints");
    assert_eq!(sick.requests(), 0);
    let (status, ready) = sidecar.admin("/readyz").await;
    assert_eq!(status, 200, "one upstream down does not fail the caller's readiness: {ready}");
    assert!(ready.contains(r#""upstream.payments":{"detail":"1 endpoint(s), 0 healthy, 1 unhealthy","status":"degraded"}"#), "{ready}");
}

#[tokio::test]
async fn outlier_detection_ejects_a_failing_endpoint_and_traffic_moves_away() {
    let good = Upstream::status(200).await;
    let bad = Upstream::status(500).await;
    let policies = "load_balancer: round_robin\noutlier_detection: { consecutive_failures: 2, base_ejection: 30s, max_ejected_percent: 50 }";
    let sidecar = Sidecar::start(&payments(&[&good, &bad], policies)).await;

    for _ in 0..20 {
        sidecar.get("payments", "/").await;
    }

    assert_eq!(bad.requests(), 2, "ejected after its second failure in a row");
    assert_eq!(good.requests(), 18);
    let (_, metrics) = sidecar.admin("/metrics").await;
    assert!(
        metrics.contains(r#"outrigger_endpoints{state="ejected",upstream="payments"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"outrigger_ejections_total{upstream="payments"} 1"#), "{metrics}");
    let (status, view) = sidecar.admin("/v1/endpoints").await;
    assert_eq!(status, 200);
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    let endpoints = view["upstreams"]["payments"]["endpoints"].as_array().unwrap();
    let ejected: Vec<_> = endpoints.iter().filter(|e| e["state"] == "ejected").collect();
    assert_eq!(ejected.len(), 1, "{view}");
    assert_eq!(ejected[0]["address"], bad.addr().to_string());
    assert_eq!(view["upstreams"]["payments"]["source"], "static");
}

#[tokio::test]
async fn outlier_detection_never_ejects_past_max_ejected_percent() {
    let a = Upstream::status(500).await;
    let b = Upstream::status(500).await;
    let policies = "load_balancer: round_robin\noutlier_detection: { consecutive_failures: 1, base_ejection: 30s, max_ejected_percent: 50 }";
    let sidecar = Sidecar::start(&payments(&[&a, &b], policies)).await;

    for _ in 0..10 {
        assert_eq!(
            sidecar.get("payments", "/").await.status(),
            500,
            "always the upstream's answer"
        );
    }

    assert_eq!(a.requests() + b.requests(), 10, "one of the two stays in and takes the rest");
    assert!(a.requests().min(b.requests()) == 1, "only one was ejected, after one failure");
}

#[tokio::test]
async fn with_max_ejected_percent_100_an_all_ejected_upstream_answers_503_no_healthy_endpoints() {
    let bad = Upstream::status(502).await;
    let policies = "outlier_detection: { consecutive_failures: 2, base_ejection: 30s, max_ejected_percent: 100 }";
    let sidecar = Sidecar::start(&payments(&[&bad], policies)).await;

    assert_eq!(sidecar.get("payments", "/").await.status(), 502);
    assert_eq!(sidecar.get("payments", "/").await.status(), 502);
    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["outrigger-error"], "no-healthy-endpoints");
    assert_eq!(bad.requests(), 2, "nothing is forwarded while every endpoint is ejected");
}

#[tokio::test]
async fn a_retry_goes_to_another_endpoint() {
    let failing = Upstream::status(503).await;
    let working = Upstream::status(200).await;
    // p2c with no health information: without the rule, half the retries would return to the
    // endpoint that just failed
    let retry = "retry: { max_attempts: 2, backoff: { initial: 1ms, jitter: none } }";
    let sidecar = Sidecar::start(&payments(&[&failing, &working], retry)).await;

    for _ in 0..20 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }
    assert_eq!(working.requests(), 20);
}

#[tokio::test]
async fn p2c_ewma_sends_most_requests_to_the_faster_endpoint() {
    let slow = Upstream::scripted([Reply::Delayed(Duration::from_millis(150), 200)]).await;
    let fast = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&[&slow, &fast], "load_balancer: p2c_ewma")).await;

    for _ in 0..40 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }

    // round robin or random would send 20 to each; p2c sends the slow one a few while it learns
    // its latency, a few more when the loaded test machine makes the fast one look slow for a
    // moment (6 of 40 seen once under the full suite on 2 cores)
    assert!(slow.requests() <= 8, "slow {} fast {}", slow.requests(), fast.requests());
}

#[tokio::test]
async fn endpoints_come_from_a_watched_file_and_a_bad_version_keeps_the_last_good_set() {
    let first = Upstream::status(200).await;
    let second = Upstream::status(200).await;
    let dir = tempdir();
    let file = dir.join("payments.yaml");
    std::fs::write(&file, format!("- \"{}\"\n", first.addr())).unwrap();
    let yaml = format!("upstreams:\n  payments:\n    discovery: {{ file: {} }}\n", file.display());
    let sidecar = Sidecar::start(&yaml).await;

    assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    assert_eq!(first.requests(), 1);

    std::fs::write(&file, format!("- \"{}\"\n", second.addr())).unwrap();
    wait_until(DEADLINE, "the new file to be applied", || async {
        sidecar.get("payments", "/").await;
        (second.requests() > 0).then_some(())
    })
    .await;

    std::fs::write(&file, "- not an endpoint\n").unwrap();
    wait_until(DEADLINE, "readiness to report the rejected file", || async {
        let (status, ready) = sidecar.admin("/readyz").await;
        (status == 200 && ready.contains("degraded") && ready.contains("payments.yaml:1:3"))
            .then_some(())
    })
    .await;
    let before = (first.requests(), second.requests());
    assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    assert_eq!(
        (first.requests(), second.requests()),
        (before.0, before.1 + 1),
        "the last good set serves"
    );
    std::fs::remove_dir_all(dir).ok();
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "outrigger-e2e-{}-{}",
        std::process::id(),
        outrigger_tests::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
