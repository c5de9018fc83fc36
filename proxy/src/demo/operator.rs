//! The demo's operator scenes: a policy tried in shadow mode before it enforces (`trial`), and
//! a breaker forced open for a while as during an incident, then given back (`maintenance`).
//! Both go through the admin API a user has: `/metrics` and `/v1/upstreams/{name}/circuit`.

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use http::header::CONTENT_TYPE;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;

use crate::http::Body;

/// The upstream whose rate limit runs in shadow mode.
pub(crate) const TRIAL: &str = "trial";
/// The upstream whose breaker the operator forces open.
pub(crate) const MAINTENANCE: &str = "maintenance";

/// When the breaker is forced open, and when it is given back, as shares of the demo's length.
pub(crate) fn forced_window(length: Duration) -> (Duration, Duration) {
    (length.mul_f64(0.4), length.mul_f64(0.7))
}

/// Forces `maintenance`'s breaker open at the window's start and back to `auto` at its end, as
/// `outrigger circuit open maintenance` and `outrigger circuit auto maintenance` would.
pub(crate) async fn force_breaker(
    client: Client<HttpConnector, Body>,
    admin: SocketAddr,
    started: Instant,
    length: Duration,
) {
    let (open, auto) = forced_window(length);
    for (at, state) in [(open, "open"), (auto, "auto")] {
        tokio::time::sleep_until(started + at).await;
        let req = Request::post(format!("http://{admin}/v1/upstreams/{MAINTENANCE}/circuit"))
            .header(CONTENT_TYPE, "application/json")
            .body(Body::full(format!(r#"{{"state":"{state}"}}"#)))
            .expect("a valid request");
        if let Ok(res) = client.request(req).await {
            let _ = res.into_body().collect().await;
        }
    }
}

/// How many of `trial`'s requests its shadow rate limit would have refused, from the sidecar's
/// `/metrics` text (`outrigger_shadow_decisions_total`).
pub(crate) fn would_have_refused(metrics: &str) -> u64 {
    let upstream = format!(r#"upstream="{TRIAL}""#);
    metrics
        .lines()
        .filter(|l| l.starts_with("outrigger_shadow_decisions_total{") && l.contains(&upstream))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}
