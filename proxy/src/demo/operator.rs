//! The demo's operator scenes: a policy tried in shadow mode before it enforces (`trial`), and
//! a breaker forced open for a while as during an incident, then given back (`maintenance`).
//! Both go through the admin API a user has: `/metrics` and `/v1/upstreams/{name}/circuit`.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// The upstream whose rate limit runs in shadow mode.
pub(crate) const TRIAL: &str = "trial";
/// The upstream whose breaker the operator forces open.
pub(crate) const MAINTENANCE: &str = "maintenance";

/// When the breaker is forced open, and when it is given back, as shares of the demo's length.
pub(crate) fn forced_window(length: Duration) -> (Duration, Duration) {
    (length.mul_f64(0.4), length.mul_f64(0.7))
}

/// Forces `maintenance`'s breaker open at the window's start and back to `auto` at its end,
/// as `outrigger circuit open maintenance` and `outrigger circuit auto maintenance` do (the
/// same call); a refusal is kept in `failed` for the table to show.
pub(crate) async fn force_breaker(
    admin: SocketAddr,
    started: Instant,
    length: Duration,
    failed: Arc<Mutex<Option<String>>>,
) {
    let (open, auto) = forced_window(length);
    for (at, state) in [(open, "open"), (auto, "auto")] {
        tokio::time::sleep_until(started + at).await;
        if let Err(why) = crate::cli::circuit(&format!("http://{admin}"), MAINTENANCE, state).await
        {
            *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
    }
}

/// How many of `trial`'s requests its shadow rate limit would have refused, from the sidecar's
/// `/metrics` text (`outrigger_shadow_decisions_total`).
pub(crate) fn would_have_refused(metrics: &str) -> u64 {
    super::metric(metrics, "outrigger_shadow_decisions_total", &[("upstream", TRIAL)])
}
