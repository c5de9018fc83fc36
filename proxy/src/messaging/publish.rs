//! `POST /v1/publish/{queue}`: the app's publish, answered `202 {"id": "…"}` only after the
//! message is committed (fsynced) in the store. Bad input gets a 4xx with a one-line reason and
//! `outrigger-error: bad-request`, and nothing is stored; a store that cannot be written gets 503
//! `outbox-unavailable`, so the app knows the message was not accepted and may retry.
//!
//! Bodies are bounded in memory and in time: every publish's bytes count against the sidecar's
//! one [`PublishBuffer`] (503 `overloaded` past it), and the whole body must arrive within
//! `outbound.limits.header_read_timeout` of its head (408, connection closed), so clients that
//! stall mid-body can pin neither memory nor a request slot for long.

mod buffer;

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use outrigger_config::{self as config, QueueName, ValueError};
use serde_json::value::RawValue;

use self::buffer::Held;
pub use self::buffer::{PublishBuffer, QUIET, TRIM_AFTER};
use crate::error::ProxyError;
use crate::http::Body;
use crate::http::respond::error_response;
use crate::messaging::Messaging;
use crate::messaging::broker::{Outbox, Publish, Published};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::Kind;

/// The largest payload accepted: bigger bodies get 413 before they are read to the end.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Longest `Idempotency-Key`, `outrigger-ordering-key` or `traceparent` kept.
pub(crate) const MAX_KEY_BYTES: usize = 1024;
/// Sent with the first publish's id when an Idempotency-Key was seen within the dedup window.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// What `outbound.limits` asks of publishes: the buffer they share, and how long a body may take.
#[derive(Debug, Clone)]
pub struct PublishLimits {
    pub buffer: PublishBuffer,
    /// From the head to the body's last byte.
    pub body_timeout: Duration,
}

impl PublishLimits {
    pub fn new(limits: &config::Limits, metrics: &Metrics) -> Self {
        let limit = limits.max_publish_buffer.bytes();
        let shed = metrics.shed("max_publish_buffer");
        Self {
            buffer: PublishBuffer::new(limit, metrics.publish_buffer(), shed),
            // the head's own deadline, for the body too: the app is on loopback, where a 1 MiB
            // body takes milliseconds, so a body still arriving after it is a stalled client,
            // and one knob for "how long may a client take to send its request" is enough
            body_timeout: limits.header_read_timeout.get(),
        }
    }
}

/// The messaging API as the service the router hands `/v1/…` to.
pub fn api(messaging: Arc<Messaging>) -> crate::http::route::LocalApi {
    let serve = move |req: Request<Body>| {
        let messaging = messaging.clone();
        async move { Ok(handle(messaging, req).await) }
    };
    tower::util::BoxCloneSyncService::new(tower::service_fn(serve))
}

/// Answers a request for `/v1/…` with a local authority.
pub async fn handle(messaging: Arc<Messaging>, req: Request<Body>) -> Response<Body> {
    match answer(&messaging, req).await {
        Ok(res) => res,
        Err(err) => error_response(&err),
    }
}

async fn answer(messaging: &Messaging, req: Request<Body>) -> Result<Response<Body>, ProxyError> {
    // hyper calls us once the head is in: the body's time starts now
    let started = tokio::time::Instant::now();
    let limits = messaging.publish_limits();
    let asked = asked(&req)?;
    let queue = asked.queue;
    if let Some(reason) = messaging.refuses(&queue) {
        return Err(bad(format!("queue name: {reason}")));
    }
    // the message carries the publish span's context: its deliveries continue the trace
    let mut span =
        messaging.tracer().start(req.headers().get("traceparent"), "send", Kind::Producer);
    send_attributes(&mut span, queue.as_str());
    span.text("messaging.operation.name", "publish");
    let traceparent = span.context.header().to_str().map(str::to_owned).ok();
    // held until the message is stored (or refused): the payload is in memory until then
    let mut held = limits.buffer.hold();
    // tokio's `timeout` saturates: a huge configured timeout is no deadline, never a panic
    let left = limits.body_timeout.saturating_sub(started.elapsed());
    let payload = match tokio::time::timeout(left, read_json(req, &mut held)).await {
        Ok(read) => read?,
        Err(_) => return Err(ProxyError::BodyTimeout { after: limits.body_timeout }),
    };
    let message = Publish {
        queue: queue.to_string(),
        payload,
        idempotency_key: asked.idempotency_key,
        ordering_key: asked.ordering_key,
        traceparent,
        tracestate: asked.tracestate,
    };
    let store =
        messaging.store().await.map_err(|e| ProxyError::Outbox { reason: e.to_string().into() })?;
    let published = store
        .publish(vec![message])
        .await
        .map_err(|e| ProxyError::Outbox { reason: crate::error::chain(&e).into() })?;
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

/// A message sent to Outrigger (the publish API, the app's outbox table), as the OpenTelemetry
/// messaging conventions name it: Outrigger is the system the app sends to.
pub(crate) fn send_attributes(span: &mut crate::telemetry::trace::Span, queue: &str) {
    span.text("messaging.system", "outrigger");
    span.text("messaging.operation.type", "send");
    span.text("messaging.destination.name", queue);
}

/// What a publish request asks for, checked; its body is read after.
pub(crate) struct Asked {
    pub(crate) queue: QueueName,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) ordering_key: Option<String>,
    pub(crate) tracestate: Option<String>,
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
        tracestate: header(req.headers(), "tracestate")?,
    })
}

fn bad(reason: String) -> ProxyError {
    ProxyError::BadPublish { reason: reason.into() }
}

/// A header as text, if present; too long or not visible ASCII is a 400.
fn header(headers: &HeaderMap, name: &'static str) -> Result<Option<String>, ProxyError> {
    let Some(value) = headers.get(name) else { return Ok(None) };
    match value.to_str() {
        Ok(text) if valid_key(text) => Ok(Some(text.to_owned())),
        _ => Err(bad(format!("{name} must be {KEY_RULE}"))),
    }
}

/// What an Idempotency-Key, an ordering key or a `traceparent` must be.
pub(crate) const KEY_RULE: &str = "1 to 1024 characters of visible ASCII";

/// Whether `text` is a key a publish may carry: [`KEY_RULE`], as an HTTP header value may be.
pub(crate) fn valid_key(text: &str) -> bool {
    (1..=MAX_KEY_BYTES).contains(&text.len())
        && text.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// The body, checked to be one JSON value no larger than [`MAX_PAYLOAD_BYTES`], the memory it
/// is read into taken from the publish buffer into `held`: a declared length up front, before
/// any byte is read; else as it arrives, each time the copy grows (to the next power of two,
/// so up to twice what has arrived: the buffer counts what is allocated).
async fn read_json<B>(req: Request<B>, held: &mut Held) -> Result<Box<RawValue>, ProxyError>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let too_large = || ProxyError::PayloadTooLarge { limit: MAX_PAYLOAD_BYTES };
    let declared =
        req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_PAYLOAD_BYTES) {
        return Err(too_large());
    }
    if let Some(length) = declared {
        held.take(length)?;
    }
    // one contiguous copy, each chunk dropped once copied: hyper's read buffer is freed as the
    // body goes, and what is allocated is what the buffer counts
    let mut body = Vec::with_capacity(declared.unwrap_or(0));
    let mut incoming = req.into_body();
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| bad(format!("the request body could not be read: {e}")))?;
        let Ok(chunk) = frame.into_data() else { continue }; // trailers: nothing to keep
        if body.len() + chunk.len() > MAX_PAYLOAD_BYTES {
            return Err(too_large());
        }
        let needed = body.len() + chunk.len();
        if needed > body.capacity() {
            // without a length: grow as a Vec would, but take the bytes before allocating them
            let grown = needed.next_power_of_two().min(MAX_PAYLOAD_BYTES);
            held.take(grown.saturating_sub(held.bytes()))?;
            body.reserve_exact(grown - body.len());
        }
        body.extend_from_slice(&chunk);
    }
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

    fn buffer(limit: u64) -> PublishBuffer {
        let metrics = Metrics::new();
        PublishBuffer::new(limit, metrics.publish_buffer(), metrics.shed("max_publish_buffer"))
    }

    async fn read_json(req: Request<Body>) -> Result<Box<RawValue>, ProxyError> {
        super::read_json(req, &mut buffer(64 << 20).hold()).await
    }

    /// A body that sends `chunks` and then stalls: never another byte, never the end.
    struct Stalling(Vec<&'static str>);

    impl http_body::Body for Stalling {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            match self.0.pop() {
                Some(chunk) => {
                    std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk.into()))))
                }
                None => std::task::Poll::Pending,
            }
        }
    }

    /// Reads `req` until it stalls: what the publish buffer holds for it then.
    async fn held_while_stalled(req: Request<Stalling>, buffer: &PublishBuffer) -> usize {
        let mut held = buffer.hold();
        let read = super::read_json(req, &mut held);
        let stalled = tokio::time::timeout(std::time::Duration::from_millis(10), read).await;
        assert!(stalled.is_err(), "the body never ends");
        held.bytes()
    }

    #[tokio::test(start_paused = true)]
    async fn a_declared_length_is_taken_from_the_buffer_before_any_byte_is_read() {
        let buffer = buffer(2 << 20);
        let req = Request::post("/").header("content-length", "1000000").body(Stalling(vec![]));
        assert_eq!(held_while_stalled(req.unwrap(), &buffer).await, 1_000_000);
        assert_eq!(buffer.in_use(), 0, "given back when the publish ends");

        let mut first = buffer.hold();
        first.take((2 << 20) - 999_999).unwrap();
        let req = Request::post("/").header("content-length", "1000000").body(Body::empty());
        let err = super::read_json(req.unwrap(), &mut buffer.hold()).await.unwrap_err();
        assert_eq!((err.status().as_u16(), err.kind()), (503, "overloaded"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_without_a_length_is_counted_as_it_arrives() {
        let buffer = buffer(2 << 20);
        let req = Request::post("/").body(Stalling(vec!["67890", "[1234"])).unwrap();
        assert_eq!(held_while_stalled(req, &buffer).await, 16, "10 bytes in a copy of 16");

        let mut most = buffer.hold();
        most.take((2 << 20) - 7).unwrap();
        let req = Request::post("/").body(Body::full("[1, 2, 3]")).unwrap();
        let err = super::read_json(req, &mut buffer.hold()).await.unwrap_err();
        assert_eq!((err.status().as_u16(), err.kind()), (503, "overloaded"), "16 bytes, 7 free");
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
