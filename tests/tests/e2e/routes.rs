//! Routes: the first route whose match fits a request gives it that route's sections in place
//! of the upstream's, and labels its metrics. Each test tells routes apart by what reached the
//! upstream (attempts, bodies) or by the `route` label.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use outrigger_tests::{DEADLINE, Reply, Sidecar, Upstream, wait_until};

use crate::messaging::metric;

const FAST_RETRY: &str =
    "    retry: { max_attempts: 3, backoff: { initial: 10ms, max: 50ms, jitter: none } }\n";

/// `up` as upstream `payments`, with `rest` (YAML lines at the upstream's indentation).
fn payments(up: &Upstream, rest: &str) -> String {
    format!("{}{rest}", up.yaml("payments"))
}

fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Request<Full<Bytes>> {
    let mut req = Request::builder().method(method).uri(path).header("host", "payments");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Full::new(Bytes::copy_from_slice(body))).unwrap()
}

/// `outrigger_requests_total` of `route` of upstream payments, answered `code`.
async fn answered(sidecar: &Sidecar, route: &str, code: u16) -> f64 {
    let series =
        format!(r#"outrigger_requests_total{{code="{code}",route="{route}",upstream="payments"}}"#);
    metric(sidecar, &series).await.unwrap_or(0.0)
}

#[tokio::test]
async fn each_match_rule_chooses_its_route_and_anything_else_is_the_default() {
    let up = Upstream::status(200).await;
    let routes = concat!(
        "    routes:\n",
        "      - { name: exact, match: { path: /v1/exact } }\n",
        "      - { name: prefix, match: { path_prefix: /v1/charge } }\n",
        "      - { name: method, match: { methods: [DELETE] } }\n",
        "      - { name: header, match: { headers: { X-Tenant: gold } } }\n",
    );
    let sidecar = Sidecar::start(&payments(&up, routes)).await;

    for (method, path, headers, route) in [
        ("GET", "/v1/exact", &[][..], "exact"),
        ("GET", "/v1/exact?page=2", &[], "exact"),
        ("GET", "/v1/exact/more", &[], "(default)"),
        ("GET", "/v1/charge", &[], "prefix"),
        ("POST", "/v1/charge/7", &[], "prefix"),
        ("GET", "/v1/charges", &[], "(default)"),
        ("DELETE", "/v1/orders/1", &[], "method"),
        ("GET", "/v1/orders", &[("x-tenant", "gold")][..], "header"),
        ("GET", "/v1/orders", &[("X-TENANT", "gold")][..], "header"),
        ("GET", "/v1/orders", &[("x-tenant", "silver")][..], "(default)"),
    ] {
        let before = answered(&sidecar, route, 200).await;
        let res = sidecar.send(request(method, path, headers, b"")).await;
        assert_eq!(res.status(), 200);
        let after = answered(&sidecar, route, 200).await;
        assert_eq!(after, before + 1.0, "{method} {path} {headers:?} takes route {route}");
    }
}

#[tokio::test]
async fn the_first_route_that_matches_wins() {
    let up = Upstream::status(503).await;
    let routes = concat!(
        "    routes:\n",
        "      - { name: broad, match: { path_prefix: /v1 }, retry: off }\n",
        "      - { name: narrow, match: { path: /v1/charge } }\n",
    );
    let sidecar = Sidecar::start(&payments(&up, &format!("{FAST_RETRY}{routes}"))).await;

    let res = sidecar.get("payments", "/v1/charge").await;

    assert_eq!(res.status(), 503);
    assert_eq!(up.requests(), 1, "the first route (retry: off) took it, not the second");
    assert_eq!(answered(&sidecar, "broad", 503).await, 1.0);
    assert_eq!(answered(&sidecar, "narrow", 503).await, 0.0);
}

#[tokio::test]
async fn a_routes_timeouts_replace_the_upstreams_and_the_sections_it_omits_are_the_upstreams() {
    let up = Upstream::scripted([
        Reply::Delayed(Duration::from_millis(500), 200),
        Reply::Delayed(Duration::from_millis(500), 200),
        Reply::Status(503),
        Reply::Status(503),
        Reply::Status(200),
    ])
    .await;
    let rest = format!(
        "    timeouts: {{ request: 200ms }}\n{FAST_RETRY}    routes:\n      - {{ name: reports, match: {{ path_prefix: /reports }}, timeouts: {{ request: 5s }} }}\n"
    );
    let sidecar = Sidecar::start(&payments(&up, &rest)).await;

    let slow = sidecar.get("payments", "/reports/2026").await;
    assert_eq!(slow.status(), 200, "the route's 5s request timeout, not the upstream's 200ms");

    let cut = sidecar.get("payments", "/orders").await;
    assert_eq!(cut.status(), 504, "the default route keeps the upstream's 200ms");
    assert_eq!(cut.headers()["outrigger-error"], "timeout");

    let retried = sidecar.get("payments", "/reports/2027").await;
    assert_eq!(retried.status(), 200);
    assert_eq!(retried.headers()["outrigger-attempts"], "3", "retry is the upstream's");
    assert_eq!(up.requests(), 5);
}

#[tokio::test]
async fn a_routes_retry_replaces_the_upstreams_whole_section() {
    let up = Upstream::status(503).await;
    let rest = format!(
        "{FAST_RETRY}    routes:\n      - {{ name: once-more, match: {{ path: /a }}, retry: {{ max_attempts: 2, backoff: {{ initial: 5ms, max: 5ms, jitter: none }} }} }}\n"
    );
    let sidecar = Sidecar::start(&payments(&up, &rest)).await;

    let res = sidecar.get("payments", "/a").await;
    assert_eq!(res.headers()["outrigger-attempts"], "2");
    assert_eq!(up.requests(), 2);

    let res = sidecar.get("payments", "/b").await;
    assert_eq!(res.headers()["outrigger-attempts"], "3", "the default route keeps 3 attempts");
    assert_eq!(up.requests(), 5);
}

#[tokio::test]
async fn retry_off_on_a_route_sends_its_requests_once() {
    let up = Upstream::status(503).await;
    let routes = "    routes:\n      - { name: pay, match: { path_prefix: /pay }, retry: off }\n";
    let sidecar = Sidecar::start(&payments(&up, &format!("{FAST_RETRY}{routes}"))).await;

    let res = sidecar.get("payments", "/pay/1").await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().get("outrigger-attempts").is_none());
    assert_eq!(up.requests(), 1);

    sidecar.get("payments", "/orders").await;
    assert_eq!(up.requests(), 4, "other requests keep the upstream's three attempts");
}

#[tokio::test]
async fn an_idempotent_route_retries_a_post_with_the_same_body() {
    let up = Upstream::scripted([Reply::Status(503), Reply::Status(503), Reply::Status(200)]).await;
    let routes = concat!(
        "    routes:\n",
        "      - { name: charge, match: { path: /charge, methods: [POST] }, idempotent: true }\n",
    );
    let sidecar = Sidecar::start(&payments(&up, &format!("{FAST_RETRY}{routes}"))).await;
    let body: Bytes = (0..5_000u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>().into();

    let refund = sidecar.send(request("POST", "/refund", &[], &body)).await;
    assert_eq!(refund.status(), 503, "a POST elsewhere is not retried");
    assert_eq!(up.requests(), 1);

    let charge = sidecar.send(request("POST", "/charge", &[], &body)).await;
    assert_eq!(charge.status(), 200);
    assert_eq!(charge.headers()["outrigger-attempts"], "2");
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].body, body);
    assert_eq!(seen[2].body, body, "the replayed body is byte-identical");
}

#[tokio::test]
async fn a_routes_rate_limit_is_its_own_and_leaves_the_default_route_alone() {
    let up = Upstream::status(200).await;
    let routes = concat!(
        "    routes:\n",
        "      - name: search\n",
        "        match: { path_prefix: /search }\n",
        "        rate_limit: { requests_per_second: 1, burst: 1 }\n",
    );
    let sidecar = Sidecar::start(&payments(&up, routes)).await;

    assert_eq!(sidecar.get("payments", "/search").await.status(), 200);
    let limited = sidecar.get("payments", "/search?q=2").await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["outrigger-error"], "rate-limited");
    for _ in 0..5 {
        assert_eq!(sidecar.get("payments", "/orders").await.status(), 200);
    }
    assert_eq!(up.requests(), 6);
}

#[tokio::test]
async fn metrics_carry_the_route_label() {
    let up = Upstream::status(200).await;
    let routes = "    routes:\n      - { name: charge, match: { path_prefix: /charge } }\n";
    let sidecar = Sidecar::start(&payments(&up, routes)).await;

    sidecar.get("payments", "/charge/1").await;
    sidecar.get("payments", "/charge/2").await;
    sidecar.get("payments", "/orders").await;

    let (_, text) = sidecar.admin("/metrics").await;
    for series in [
        r#"outrigger_requests_total{code="200",route="charge",upstream="payments"} 2"#,
        r#"outrigger_requests_total{code="200",route="(default)",upstream="payments"} 1"#,
        r#"outrigger_request_duration_seconds_count{route="charge",upstream="payments"} 2"#,
        r#"outrigger_request_duration_seconds_count{route="(default)",upstream="payments"} 1"#,
    ] {
        assert!(text.contains(series), "{series} in:\n{text}");
    }
}

#[tokio::test]
async fn a_reload_adds_a_route_live_and_v1_config_shows_it() {
    let up = Upstream::status(503).await;
    let sidecar = Sidecar::start(&payments(&up, FAST_RETRY)).await;
    sidecar.get("payments", "/pay").await;
    assert_eq!(up.requests(), 3, "no route yet: the upstream's retries");

    let routes = "    routes:\n      - { name: pay, match: { path: /pay }, retry: off }\n";
    sidecar.rewrite(&payments(&up, &format!("{FAST_RETRY}{routes}")));
    wait_until(DEADLINE, "the reload to apply", || async {
        let applied = r#"outrigger_config_reloads_total{result="applied"}"#;
        (metric(&sidecar, applied).await == Some(1.0)).then_some(())
    })
    .await;

    sidecar.get("payments", "/pay").await;
    assert_eq!(up.requests(), 4, "the new route's retry: off");
    assert_eq!(answered(&sidecar, "pay", 503).await, 1.0);
    let (_, running) = sidecar.admin("/v1/config").await;
    let json: serde_json::Value = serde_json::from_str(&running).unwrap();
    let route = &json["upstreams"]["payments"]["routes"][0];
    assert_eq!(route["name"], "pay", "{running}");
    assert_eq!(route["match"]["path"], "/pay");
    assert_eq!(route["retry"], "off");
}

#[tokio::test]
async fn the_routes_of_an_upstream_share_its_circuit_breaker() {
    let up = Upstream::status(500).await;
    let rest = concat!(
        "    circuit_breaker: { consecutive_failures: 2, open_for: 60s }\n",
        "    routes:\n      - { name: charge, match: { path_prefix: /charge } }\n",
    );
    let sidecar = Sidecar::start(&payments(&up, rest)).await;

    for _ in 0..2 {
        assert_eq!(sidecar.get("payments", "/charge").await.status(), 500);
    }
    let other = sidecar.get("payments", "/orders").await;

    assert_eq!(other.status(), 503, "the failures on one route opened the upstream's breaker");
    assert_eq!(other.headers()["outrigger-error"], "circuit-open");
    assert_eq!(up.requests(), 2);
}
