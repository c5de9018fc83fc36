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
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde_json::json;

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
    pub fn set(&self, next: Vec<(Arc<str>, Option<CircuitControl>)>) {
        let mut upstreams = self.upstreams.write().unwrap_or_else(|e| e.into_inner());
        for (name, control) in &next {
            let was = upstreams.iter().find(|(n, _)| n == name).and_then(|(_, c)| c.as_ref());
            let forced = was.and_then(|c| c.status().forced);
            if let (Some(forced), Some(control)) = (forced, control)
                && control.status().forced != Some(forced)
            {
                control.force(Some(forced));
            }
        }
        *upstreams = next;
    }

    /// `None`: no such upstream; `Some(None)`: it has no breaker.
    fn find(&self, name: &str) -> Option<Option<CircuitControl>> {
        let upstreams = self.upstreams.read().unwrap_or_else(|e| e.into_inner());
        upstreams.iter().find(|(n, _)| &**n == name).map(|(_, c)| c.clone())
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
    let control = match circuits.find(name) {
        Some(Some(control)) => control,
        Some(None) => {
            let why = format!("upstream {name} has no circuit_breaker section to force");
            return error(StatusCode::CONFLICT, &why);
        }
        None => return error(StatusCode::NOT_FOUND, &format!("no upstream named {name:?}")),
    };
    match *req.method() {
        Method::GET | Method::HEAD => answer(name, control.status()),
        Method::POST => match requested(req.into_body()).await {
            Ok(forced) => answer(name, control.force(forced)),
            Err(why) => error(StatusCode::BAD_REQUEST, &why),
        },
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST"),
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
    let view = json!({
        "upstream": upstream,
        "state": status.state,
        "forced": status.forced.map(Forced::as_str),
    });
    respond(StatusCode::OK, &view)
}

fn error(status: StatusCode, why: &str) -> Response<Body> {
    respond(status, &json!({ "error": why }))
}

fn respond(status: StatusCode, view: &serde_json::Value) -> Response<Body> {
    let mut res = Response::new(Body::full(view.to_string() + "\n"));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}
