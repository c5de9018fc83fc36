//! `POST /v1/publish/{queue}`: the app's publish, answered `202 {"id": "…"}` only after the
//! message is committed (fsynced) in the store. Bad input gets a 4xx with a one-line reason and
//! `outrigger-error: bad-request`, and nothing is stored; a store that cannot be written gets 503
//! `outbox-unavailable`, so the app knows the message was not accepted and may retry.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use outrigger_config::{QueueName, ValueError};
use serde_json::value::RawValue;

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::respond::error_response;
use crate::messaging::Messaging;
use crate::messaging::broker::{Broker, Publish, Published};
use crate::telemetry::trace::Kind;

/// The largest payload accepted: bigger bodies get 413 before they are read to the end.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Longest `Idempotency-Key`, `outrigger-ordering-key` or `traceparent` kept.
const MAX_KEY_BYTES: usize = 1024;
/// Sent with the first publish's id when an Idempotency-Key was seen within the dedup window.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Answers a request for `/v1/…` with a local authority.
pub async fn handle(messaging: Arc<Messaging>, req: Request<Body>) -> Response<Body> {
    match answer(&messaging, req).await {
        Ok(res) => res,
        Err(err) => error_response(&err),
    }
}

async fn answer(messaging: &Messaging, req: Request<Body>) -> Result<Response<Body>, ProxyError> {
    let asked = asked(&req)?;
    let queue = asked.queue;
    // the message carries the publish span's context: its deliveries continue the trace
    let mut span =
        messaging.tracer().start(req.headers().get("traceparent"), "publish", Kind::Producer);
    span.text("messaging.destination.name", queue.as_str());
    let traceparent = span.context.header().to_str().map(str::to_owned).ok();
    let payload = read_json(req).await?;
    let message = Publish {
        queue: queue.to_string(),
        payload,
        idempotency_key: asked.idempotency_key,
        ordering_key: asked.ordering_key,
        traceparent,
    };
    let store =
        messaging.store().await.map_err(|e| ProxyError::Outbox { reason: e.to_string().into() })?;
    let published = store
        .publish(vec![message])
        .await
        .map_err(|e| ProxyError::Outbox { reason: e.to_string().into() })?;
    let published = published[0];
    if span.recording() {
        span.text("messaging.message.id", published.id().to_string());
    }
    messaging.tracer().end(span);
    let mut res = Response::new(Body::full(format!("{{\"id\":\"{}\"}}\n", published.id())));
    *res.status_mut() = StatusCode::ACCEPTED;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    match published {
        Published::Stored(id) => {
            messaging.stored(queue.as_str());
            tracing::debug!(queue = %queue, %id, "message stored");
        }
        Published::Duplicate(_) => {
            res.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
        }
    }
    Ok(res)
}

/// What a publish request asks for, checked; its body is read after.
pub(crate) struct Asked {
    pub(crate) queue: QueueName,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) ordering_key: Option<String>,
}

/// Checks everything of a publish but its body: the path names a valid queue, the method is
/// POST, and the keys and `traceparent` are short visible ASCII.
pub(crate) fn asked<B>(req: &Request<B>) -> Result<Asked, ProxyError> {
    let Some(queue) = req.uri().path().strip_prefix("/v1/publish/") else {
        let path = req.uri().path().into();
        return Err(ProxyError::UnknownEndpoint { path });
    };
    if req.method() != Method::POST {
        return Err(ProxyError::MethodNotAllowed { allowed: "POST" });
    }
    let queue = queue.parse().map_err(|e: ValueError| bad(format!("queue name: {e}")))?;
    header(req.headers(), "traceparent")?; // checked like the others
    Ok(Asked {
        queue,
        idempotency_key: header(req.headers(), "idempotency-key")?,
        ordering_key: header(req.headers(), "outrigger-ordering-key")?,
    })
}

fn bad(reason: String) -> ProxyError {
    ProxyError::BadPublish { reason: reason.into() }
}

/// A header as text, if present; too long or not visible ASCII is a 400.
fn header(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, ProxyError> {
    let Some(value) = headers.get(name) else { return Ok(None) };
    match value.to_str() {
        Ok(text) if text.len() <= MAX_KEY_BYTES && !text.is_empty() => Ok(Some(text.to_owned())),
        _ => Err(bad(format!("{name} must be 1 to {MAX_KEY_BYTES} characters of visible ASCII"))),
    }
}

/// The body, checked to be one JSON value no larger than [`MAX_PAYLOAD_BYTES`].
async fn read_json(req: Request<Body>) -> Result<Box<RawValue>, ProxyError> {
    let too_large = ProxyError::PayloadTooLarge { limit: MAX_PAYLOAD_BYTES };
    let declared =
        req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_PAYLOAD_BYTES as u64) {
        return Err(too_large);
    }
    let body: Bytes = match Limited::new(req.into_body(), MAX_PAYLOAD_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => return Err(too_large),
        Err(err) => return Err(bad(format!("the request body could not be read: {err}"))),
    };
    json(&body)
}

/// A payload: one JSON value, kept as sent.
pub(crate) fn json(body: &[u8]) -> Result<Box<RawValue>, ProxyError> {
    serde_json::from_slice::<Box<RawValue>>(body)
        .map_err(|e| bad(format!("the body is not JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, body: &'static str) -> Request<Body> {
        Request::post(path).body(Body::full(body)).unwrap()
    }

    #[tokio::test]
    async fn bad_input_is_refused_with_a_reason() {
        let refused = |req| async move {
            let err = read_json(req).await.unwrap_err();
            (err.status().as_u16(), err.kind(), err.to_string())
        };
        let (status, kind, reason) = refused(request("/", "{not json")).await;
        assert_eq!((status, kind), (400, "bad-request"));
        assert!(reason.contains("not JSON"), "{reason}");
        assert_eq!(refused(request("/", "")).await.0, 400, "an empty body is not JSON");
        let big =
            Request::post("/").header("content-length", "2000000").body(Body::empty()).unwrap();
        assert_eq!(refused(big).await.0, 413);
        let big = Request::post("/").body(Body::full(vec![b' '; MAX_PAYLOAD_BYTES + 1])).unwrap();
        assert_eq!(refused(big).await.0, 413, "without a length, counted while read");
    }

    #[tokio::test]
    async fn the_payload_is_kept_verbatim() {
        let raw = read_json(request("/", r#"{"a": 1.50,  "b":[ ]}"#)).await.unwrap();
        assert_eq!(raw.get(), r#"{"a": 1.50,  "b":[ ]}"#);
    }
}
