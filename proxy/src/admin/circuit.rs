//! Breaker control on the admin listener (loopback clients only, checked by the caller):
//!
//! - `GET /v1/upstreams/{name}/circuit`: `{"upstream", "state", "forced"}`, where `state` is
//!   what the breaker does now (`closed`, `half-open`, `open`) and `forced` is `open`, `closed`
//!   or null;
//! - `POST /v1/upstreams/{name}/circuit` with `{"state": "open" | "closed" | "auto"}`: forces
//!   the breaker open (every request answered `circuit-open`) or closed (it never opens), or
//!   gives it back to its policy; answers as `GET` does.
//!
//! An unknown upstream is 404, one without a `circuit_breaker` 409, an unknown state 400.

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::json;

use super::dlq::{error, ok};
use crate::http::Body;
use crate::policy::circuit_breaker::{CircuitControl, CircuitStatus, Forced};

/// The largest body a `POST` may have.
const MAX_BODY: usize = 4 * 1024;

/// Every upstream's breaker control, by name; replaced whole by a reload.
#[derive(Debug, Default)]
pub struct Circuits {
    upstreams: RwLock<Vec<(Arc<str>, Option<CircuitControl>)>>,
}

impl Circuits {
    /// The running upstreams and their breakers. A breaker built anew (its upstream's config
    /// changed) takes the forced state its predecessor had: an operator's decision outlives an
    /// edit of the upstream; an unchanged upstream keeps its breaker, and so its state.
    /// (The stack already forced a rebuilt breaker as its predecessor was, before serving;
    /// this catches a force that landed on the old one in between.) A breaker that has no
    /// successor is retired: its forced gauge goes back to 0.
    pub fn set(&self, next: Vec<(Arc<str>, Option<CircuitControl>)>) {
        let mut upstreams = self.upstreams.write().unwrap_or_else(|e| e.into_inner());
        for (name, was) in upstreams.iter() {
            let Some(was) = was else { continue };
            let now = next.iter().find(|(n, _)| n == name).and_then(|(_, c)| c.as_ref());
            match now {
                Some(now) if now.same_as(was) => {}
                Some(now) => {
                    let forced = was.status().forced;
                    if forced.is_some() && now.status().forced != forced {
                        now.force(forced);
                    }
                }
                None => was.retire(),
            }
        }
        *upstreams = next;
    }

    /// Runs `f` on `name`'s breaker under the registry's lock, so that a reload's `set` comes
    /// wholly before or after it. `None`: no such upstream; `Some(None)`: it has no breaker.
    fn with<T>(&self, name: &str, f: impl FnOnce(&CircuitControl) -> T) -> Option<Option<T>> {
        let upstreams = self.upstreams.read().unwrap_or_else(|e| e.into_inner());
        upstreams.iter().find(|(n, _)| &**n == name).map(|(_, c)| c.as_ref().map(f))
    }
}

/// Answers one `/v1/upstreams/…` request.
pub async fn handle<B>(circuits: &Circuits, req: Request<B>) -> Response<Body>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_owned();
    let Some(name) =
        path.strip_prefix("/v1/upstreams/").and_then(|rest| rest.strip_suffix("/circuit"))
    else {
        return error(StatusCode::NOT_FOUND, "no such admin endpoint: /v1/upstreams/NAME/circuit");
    };
    let done = match *req.method() {
        Method::GET | Method::HEAD => circuits.with(name, CircuitControl::status),
        Method::POST => match requested(req.into_body()).await {
            Ok(forced) => circuits.with(name, |control| control.force(forced)),
            Err(why) => return error(StatusCode::BAD_REQUEST, &why),
        },
        _ => return error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST"),
    };
    match done {
        Some(Some(status)) => answer(name, status),
        Some(None) => {
            let why = format!("upstream {name} has no circuit_breaker section to force");
            error(StatusCode::CONFLICT, &why)
        }
        None => error(StatusCode::NOT_FOUND, &format!("no upstream named {name:?}")),
    }
}

/// The state a `POST` body asks for: `Some` forced state, or `None` for `auto`.
async fn requested<B>(body: B) -> Result<Option<Forced>, String>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    const EXPECTED: &str = r#"a body {"state": "open"}, {"state": "closed"} or {"state": "auto"}"#;
    let bytes: Bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("the body could not be read: {e}"))?
        .to_bytes();
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{EXPECTED}: {e}"))?;
    match value["state"].as_str() {
        Some("open") => Ok(Some(Forced::Open)),
        Some("closed") => Ok(Some(Forced::Closed)),
        Some("auto") => Ok(None),
        Some(other) => Err(format!("{other:?} is not a state: {EXPECTED}")),
        None => Err(EXPECTED.to_owned()),
    }
}

fn answer(upstream: &str, status: CircuitStatus) -> Response<Body> {
    ok(json!({
        "upstream": upstream,
        "state": status.state,
        "forced": status.forced.map(Forced::as_str),
    }))
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use outrigger_config as config;
    use prometheus::IntGauge;

    use super::*;
    use crate::policy::circuit_breaker::CircuitBreakerLayer;

    fn breaker(forced_gauge: &IntGauge) -> CircuitControl {
        let cfg = config::CircuitBreaker {
            consecutive_failures: NonZeroU32::new(2),
            ..config::CircuitBreaker::default()
        };
        let gauges = (IntGauge::new("s", "s").unwrap(), forced_gauge.clone());
        CircuitBreakerLayer::new(&Arc::from("payments"), cfg, gauges).control()
    }

    #[test]
    fn a_rebuilt_breaker_is_forced_as_the_old_one_and_a_removed_one_clears_its_gauge() {
        let gauge = IntGauge::new("forced", "forced").unwrap();
        let circuits = Circuits::default();
        let old = breaker(&gauge);
        circuits.set(vec![("payments".into(), Some(old.clone()))]);
        old.force(Some(Forced::Open));

        let new = breaker(&gauge);
        circuits.set(vec![("payments".into(), Some(new.clone()))]);
        assert_eq!(new.status().forced, Some(Forced::Open), "the decision outlives the rebuild");
        assert_eq!(gauge.get(), 1);

        circuits.set(vec![("payments".into(), None)]);
        assert_eq!(gauge.get(), 0, "no breaker left to be forced");
    }
}
