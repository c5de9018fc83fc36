//! `/healthz` and `/readyz` (DESIGN.md "Health").
//!
//! Liveness never depends on upstreams. Readiness is green once every upstream's discovery has
//! produced its first endpoint set (a source that failed is reported, not waited on), every
//! endpoint has had its first active health check (when checks are configured), and the local
//! app answers its health path, when one is configured; it fails at once on SIGTERM. An
//! upstream with no healthy endpoint, or whose source is failing, shows as `degraded` without
//! failing readiness: failing every caller's readiness because one upstream is down would
//! turn its outage into theirs. So does the `app` while a subscription is paused because the
//! app refuses connections: only its health path, when it has one, holds readiness back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use outrigger_discovery::{Pool, State, Status};
use serde::Serialize;

use crate::http::Body;
use crate::messaging::Messaging;

const APP_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// What readiness looks at.
#[derive(Debug)]
pub struct Health {
    draining: AtomicBool,
    /// Replaced whole by a config reload.
    upstreams: std::sync::RwLock<Vec<Pool>>,
    app: Option<(Uri, Client<HttpConnector, Body>)>,
    messaging: Option<Arc<Messaging>>,
}

#[derive(Debug, Serialize)]
pub struct Readiness {
    pub status: &'static str,
    pub checks: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct Check {
    status: &'static str,
    detail: String,
}

impl Health {
    pub fn new(upstreams: Vec<Pool>, app_health: Option<Uri>) -> Self {
        let app = app_health.map(|uri| (uri, Client::builder(TokioExecutor::new()).build_http()));
        Self {
            draining: AtomicBool::new(false),
            upstreams: std::sync::RwLock::new(upstreams),
            app,
            messaging: None,
        }
    }

    /// Adds the `broker` check: `degraded` while a remote broker takes nothing (the outbox
    /// keeps accepting, so readiness does not fail).
    pub fn with_messaging(mut self, messaging: Arc<Messaging>) -> Self {
        self.messaging = Some(messaging);
        self
    }

    /// From now on, readiness fails: the sidecar is shutting down.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub async fn readiness(&self) -> Readiness {
        let mut checks = serde_json::Map::new();
        let mut ready = true;
        let mut put = |name: String, check: Check, blocks: bool| {
            ready &= check.status == "ok" || !blocks;
            checks.insert(name, serde_json::to_value(check).expect("a check serializes"));
        };
        put("config".into(), Check::ok("loaded"), true);
        put("listeners".into(), Check::ok("bound"), true);
        if self.draining.load(Ordering::SeqCst) {
            put("lifecycle".into(), Check::failing("shutting down"), true);
        }
        for pool in &self.upstreams() {
            let (check, blocks) = upstream_check(pool);
            put(format!("upstream.{}", pool.upstream()), check, blocks);
        }
        // a broker or the app's database down degrades, never fails: the outbox holds on
        if let Some(check) = self.messaging.as_ref().and_then(|m| m.broker_check()) {
            put("broker".into(), ok_or_degraded(check), false);
        }
        if let Some(check) = self.messaging.as_ref().and_then(|m| m.app_outbox_check()) {
            put("app_outbox".into(), ok_or_degraded(check), false);
        }
        let deliveries = self.messaging.as_ref().and_then(|m| m.app_check());
        let health_path = match &self.app {
            Some((uri, client)) => Some(check_app(client, uri).await),
            None => None,
        };
        if let Some(check) = app_check(health_path, deliveries) {
            let blocks = check.status == "failing";
            put("app".into(), check, blocks);
        }
        Readiness { status: if ready { "ready" } else { "not_ready" }, checks }
    }

    /// Whether the app has a health path to check.
    pub fn checks_app(&self) -> bool {
        self.app.is_some()
    }

    /// The app's health check now: what it answered, or why it failed. `Ok` without a path.
    pub async fn app_answers(&self) -> Result<String, String> {
        match &self.app {
            Some((uri, client)) => check_app(client, uri).await,
            None => Ok("no health path".to_owned()),
        }
    }

    /// Every upstream's endpoint pool.
    pub fn upstreams(&self) -> Vec<Pool> {
        self.upstreams.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// After a reload: the upstreams now in force.
    pub fn set_upstreams(&self, pools: Vec<Pool>) {
        *self.upstreams.write().unwrap_or_else(|e| e.into_inner()) = pools;
    }
}

/// One upstream's readiness check, and whether it holds readiness back.
fn upstream_check(pool: &Pool) -> (Check, bool) {
    let snapshot = pool.endpoints().snapshot();
    let n = snapshot.endpoints.len();
    let age = snapshot.confirmed.map(|at| at.elapsed().as_secs());
    match snapshot.status {
        Status::Pending => (Check::failing("waiting for the first endpoint set"), true),
        // a source that failed is reported, not waited on: its last set (if any) serves
        Status::Failing(detail) if n > 0 => {
            let age = age.map(|s| format!(", confirmed {s}s ago")).unwrap_or_default();
            let detail = format!("{detail}; serving the last {n} endpoint(s){age}");
            (Check { status: "degraded", detail }, false)
        }
        Status::Failing(detail) => (Check::failing(detail), false),
        Status::Ready if !pool.checked() => {
            (Check::failing("waiting for the first health check of every endpoint"), true)
        }
        Status::Ready => {
            let report = pool.report();
            let count = |state| report.iter().filter(|e| e.state == state).count();
            let healthy = count(State::Healthy);
            let mut detail = format!("{n} endpoint(s), {healthy} healthy");
            for state in [State::Unhealthy, State::Ejected] {
                if count(state) > 0 {
                    detail += &format!(", {} {}", count(state), state.as_str());
                }
            }
            match healthy {
                0 => (Check { status: "degraded", detail }, false),
                _ => (Check::ok(detail), false),
            }
        }
    }
}

/// The `app` check from its health path (when configured) and from deliveries (when any):
/// `ok` with its detail, or `degraded`.
fn ok_or_degraded(check: Result<String, String>) -> Check {
    match check {
        Ok(detail) => Check::ok(detail),
        Err(detail) => Check { status: "degraded", detail },
    }
}

/// `failing` while the health path fails, else `degraded` while a subscription is paused.
fn app_check(
    health_path: Option<Result<String, String>>,
    deliveries: Option<Result<String, String>>,
) -> Option<Check> {
    match (health_path, deliveries) {
        (None, None) => None,
        (Some(Err(detail)), _) => Some(Check::failing(detail)),
        (_, Some(Err(paused))) => Some(Check { status: "degraded", detail: paused }),
        (Some(Ok(detail)), _) | (None, Some(Ok(detail))) => Some(Check::ok(detail)),
    }
}

impl Check {
    fn ok(detail: impl Into<String>) -> Self {
        Self { status: "ok", detail: detail.into() }
    }

    fn failing(detail: impl Into<String>) -> Self {
        Self { status: "failing", detail: detail.into() }
    }
}

async fn check_app(client: &Client<HttpConnector, Body>, uri: &Uri) -> Result<String, String> {
    let req = Request::get(uri.clone()).body(Body::empty()).expect("a GET with a valid URI");
    match tokio::time::timeout(APP_CHECK_TIMEOUT, client.request(req)).await {
        Ok(Ok(res)) if res.status().is_success() => {
            Ok(format!("{uri} answered {}", res.status().as_u16()))
        }
        Ok(Ok(res)) => Err(format!("{uri} answered {}", res.status().as_u16())),
        Ok(Err(error)) => Err(format!("{uri}: {error}")),
        Err(_) => Err(format!("{uri}: no answer within {APP_CHECK_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(
        health: Option<Result<&str, &str>>,
        deliveries: Option<Result<&str, &str>>,
    ) -> &'static str {
        let own = |r: Result<&str, &str>| r.map(str::to_owned).map_err(str::to_owned);
        app_check(health.map(own), deliveries.map(own)).map_or("absent", |c| c.status)
    }

    #[test]
    fn a_paused_subscription_degrades_the_app_check_and_a_failing_health_path_fails_it() {
        assert_eq!(status(None, None), "absent", "nothing to say about the app");
        assert_eq!(status(None, Some(Ok("accepts"))), "ok");
        assert_eq!(status(None, Some(Err("paused"))), "degraded");
        assert_eq!(status(Some(Ok("200")), Some(Err("paused"))), "degraded");
        assert_eq!(status(Some(Err("503")), Some(Err("paused"))), "failing");
        assert_eq!(status(Some(Err("503")), None), "failing");
        assert_eq!(status(Some(Ok("200")), None), "ok");
    }
}
