//! One delivery attempt: POST the envelope to the app, and what its answer means.
//!
//! A 2xx acknowledges. A 5xx, 408, 429, a timeout or a connection failure is worth another
//! try; any other status is permanent. A connection the app refuses (ECONNREFUSED: nothing
//! listens on its port yet) is no attempt at all: the app never saw the message, so the message
//! goes back as it was and the subscription pauses ([`super::pause`]). A reset or a timeout
//! after the connection opened may have reached the app, so it is an attempt.
//! Every failure that is an attempt becomes an error record for the envelope:
//! `message` is the start of the app's body (or the transport error), `stack_trace` the JSON
//! field `stack_trace` of a JSON answer, else the `outrigger-stack-trace` header, else empty.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderName, RETRY_AFTER};
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::BodyExt;

use crate::error::chain;
use crate::http::Body;
use crate::http::forward::UpstreamClient;
use crate::messaging::envelope::{Envelope, ErrorRecord, rfc3339};
use crate::policy::backoff::parse_retry_after;

/// The most of the app's answer read for an error record; the rest is not waited for.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The longest `message` kept in an error record.
const MAX_MESSAGE_BYTES: usize = 1024;
/// The longest `stack_trace` kept in an error record.
const MAX_STACK_TRACE_BYTES: usize = 16 * 1024;
/// Where an app that does not answer JSON may put its stack trace.
pub const STACK_TRACE_HEADER: &str = "outrigger-stack-trace";

/// How an attempt ended, before it is judged.
#[derive(Debug)]
pub enum Answer {
    /// The app answered: its status, headers and the start of its body.
    Status { status: StatusCode, headers: HeaderMap, body: Bytes },
    /// No answer within the subscription's `timeout`.
    TimedOut(Duration),
    /// The app refused the connection: nothing listens on its port (yet, or while it restarts).
    Refused(String),
    /// No connection for another reason, or it broke before the answer was complete.
    Failed(String),
}

/// What an attempt means for the message.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Acknowledge,
    /// Deliver again after the backoff, or after the app's `Retry-After` when it gave one.
    Retry {
        record: ErrorRecord,
        retry_after: Option<Duration>,
    },
    /// Never worth another try: dead-letter now.
    Permanent {
        record: ErrorRecord,
    },
    /// Not an attempt: the app refused the connection. The message keeps its count and history.
    Refused,
}

/// The headers of one delivery (DESIGN.md "Messaging").
#[derive(Debug, Clone)]
pub struct Delivery<'a> {
    pub envelope: &'a Envelope,
    /// 1 for the first delivery.
    pub attempt: u32,
    pub max_attempts: u32,
    /// The delivery span's context; `None`: the publish's, from the metadata.
    pub traceparent: Option<http::HeaderValue>,
}

/// POSTs the envelope to `uri` and reads the answer, all within `timeout`.
pub(crate) async fn post(
    client: &UpstreamClient,
    uri: &Uri,
    delivery: Delivery<'_>,
    timeout: Duration,
) -> Answer {
    let req = request(uri, delivery);
    let attempt = async {
        let res = match client.request(req).await {
            Ok(res) => res,
            Err(error) if refused(&error) => return Ok(Answer::Refused(chain(&error))),
            Err(error) => return Err(chain(&error)),
        };
        let (parts, mut body) = res.into_parts();
        // the start is kept for an error record; a 2xx's body is read and dropped, so the
        // connection goes back to the pool (past the limit, it is closed instead)
        let keep = !parts.status.is_success();
        let mut start = BytesMut::new();
        let mut read = 0;
        while read < MAX_ANSWER_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        read += data.len();
                        if keep {
                            start.extend_from_slice(data);
                        }
                    }
                }
                Some(Err(e)) if keep => return Err(chain(&e)),
                Some(Err(_)) | None => break,
            }
        }
        Ok(Answer::Status { status: parts.status, headers: parts.headers, body: start.freeze() })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => Answer::Failed(error),
        Err(_) => Answer::TimedOut(timeout),
    }
}

/// Whether the connection was refused (ECONNREFUSED) before any byte of the request left: the
/// only connection failure that says for certain the app did not get the message.
fn refused(error: &hyper_util::client::legacy::Error) -> bool {
    if !error.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(error);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// The request of one delivery: the envelope as JSON, with its headers.
fn request(uri: &Uri, d: Delivery<'_>) -> Request<Body> {
    let envelope = d.envelope;
    let id = envelope.id.to_string();
    let mut req = Request::post(uri.clone())
        .header(CONTENT_TYPE, "application/json")
        .header("user-agent", "outrigger-delivery")
        .header("outrigger-message-id", &id)
        .header("outrigger-queue", &envelope.queue)
        .header("outrigger-attempt", d.attempt)
        .header("outrigger-max-attempts", d.max_attempts)
        .body(Body::full(envelope.to_json()))
        .expect("a POST with a valid URI, an id and a validated queue name");
    let text = |key: &str| envelope.metadata.get(key).and_then(|v| v.as_str());
    // a key given at publish, else the id: a handler can always deduplicate on this header
    let optional = [
        ("idempotency-key", Some(text("idempotency_key").unwrap_or(&id))),
        ("traceparent", text("traceparent")),
        ("tracestate", text("tracestate")),
    ];
    for (name, value) in optional {
        // publish checked these as visible ASCII; one that is not anyway is left out
        if let Some(value) = value.and_then(|v| http::HeaderValue::from_str(v).ok()) {
            req.headers_mut().insert(name, value);
        }
    }
    if let Some(traceparent) = d.traceparent {
        req.headers_mut().insert("traceparent", traceparent);
    }
    req
}

/// Judges an attempt, at `now` (the error record's date and an HTTP-date `Retry-After`).
pub fn judge(answer: &Answer, now: SystemTime) -> Verdict {
    let record = |status_code, message: String, stack_trace: String| ErrorRecord {
        status_code,
        message,
        stack_trace,
        date: rfc3339(now),
    };
    match answer {
        Answer::Status { status, .. } if status.is_success() => Verdict::Acknowledge,
        Answer::Status { status, headers, body } => {
            let code = status.as_u16();
            let message = match truncate(&String::from_utf8_lossy(body), MAX_MESSAGE_BYTES) {
                "" => format!("the app answered {code} with an empty body"),
                text => text.to_owned(),
            };
            let record = record(Some(code), message, stack_trace(headers, body));
            let retryable = status.is_server_error()
                || *status == StatusCode::REQUEST_TIMEOUT
                || *status == StatusCode::TOO_MANY_REQUESTS;
            if retryable {
                let retry_after = headers.get(RETRY_AFTER).and_then(|v| parse_retry_after(v, now));
                Verdict::Retry { record, retry_after }
            } else {
                Verdict::Permanent { record }
            }
        }
        Answer::TimedOut(after) => Verdict::Retry {
            record: record(None, format!("timeout: no answer within {after:?}"), String::new()),
            retry_after: None,
        },
        Answer::Failed(error) => Verdict::Retry {
            record: record(None, truncate(error, MAX_MESSAGE_BYTES).to_owned(), String::new()),
            retry_after: None,
        },
        Answer::Refused(_) => Verdict::Refused,
    }
}

/// The app's stack trace: `stack_trace` of a JSON object body, else the header, else empty.
fn stack_trace(headers: &HeaderMap, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct WithTrace {
        stack_trace: Option<String>,
    }
    let from_json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|t| t.contains("json"))
        .and_then(|_| serde_json::from_slice::<WithTrace>(body).ok())
        .and_then(|b| b.stack_trace);
    let from_header = || {
        let value = headers.get(HeaderName::from_static(STACK_TRACE_HEADER))?;
        Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    let trace = from_json.or_else(from_header).unwrap_or_default();
    truncate(&trace, MAX_STACK_TRACE_BYTES).to_owned()
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim_end()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    const NOW: SystemTime = SystemTime::UNIX_EPOCH;

    fn answered(code: u16, headers: &[(&'static str, &str)], body: &str) -> Answer {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        Answer::Status {
            status: StatusCode::from_u16(code).unwrap(),
            headers: map,
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    fn record_of(verdict: Verdict) -> ErrorRecord {
        match verdict {
            Verdict::Retry { record, .. } | Verdict::Permanent { record } => record,
            Verdict::Acknowledge => panic!("acknowledged"),
            Verdict::Refused => panic!("refused"),
        }
    }

    #[test]
    fn a_2xx_acknowledges() {
        for code in [200, 201, 202, 204] {
            assert_eq!(judge(&answered(code, &[], ""), NOW), Verdict::Acknowledge);
        }
    }

    #[test]
    fn server_errors_408_429_timeouts_and_connection_failures_are_retried() {
        for code in [500, 502, 503, 504, 408, 429] {
            let verdict = judge(&answered(code, &[], "busy"), NOW);
            assert!(matches!(verdict, Verdict::Retry { .. }), "{code}: {verdict:?}");
        }
        let timeout = record_of(judge(&Answer::TimedOut(Duration::from_secs(2)), NOW));
        assert_eq!(timeout.status_code, None);
        assert_eq!(timeout.message, "timeout: no answer within 2s");
        let reset = judge(&Answer::Failed("connection reset by peer".into()), NOW);
        assert!(matches!(reset, Verdict::Retry { .. }));
        assert_eq!(record_of(reset).message, "connection reset by peer");
    }

    #[test]
    fn a_refused_connection_is_not_an_attempt() {
        let verdict = judge(&Answer::Refused("Connection refused (os error 111)".into()), NOW);
        assert_eq!(verdict, Verdict::Refused);
    }

    /// A loopback port that is bound and not listening: every connection to it is refused.
    fn refusing_port() -> (tokio::net::TcpSocket, Uri) {
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let uri = format!("http://{}/events", held.local_addr().unwrap()).parse().unwrap();
        (held, uri)
    }

    fn envelope() -> Envelope {
        let payload = serde_json::value::RawValue::from_string("{}".into()).unwrap();
        let id = crate::messaging::envelope::MessageId::generate(SystemTime::now());
        Envelope::new(id, "orders", SystemTime::now(), payload)
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_answers_refused() {
        let (_held, uri) = refusing_port();
        let client = crate::http::forward::client(&Default::default(), None, false);
        let envelope = envelope();
        let delivery =
            Delivery { envelope: &envelope, attempt: 1, max_attempts: 3, traceparent: None };
        let answer = post(&client, &uri, delivery, Duration::from_secs(5)).await;
        assert!(matches!(answer, Answer::Refused(_)), "{answer:?}");
    }

    #[tokio::test]
    async fn a_connection_closed_after_it_opened_is_an_attempt() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/events", listener.local_addr().unwrap()).parse().unwrap();
        tokio::spawn(async move {
            // accepts, then drops the connection without an answer
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let client = crate::http::forward::client(&Default::default(), None, false);
        let envelope = envelope();
        let delivery =
            Delivery { envelope: &envelope, attempt: 1, max_attempts: 3, traceparent: None };
        let answer = post(&client, &uri, delivery, Duration::from_secs(5)).await;
        assert!(matches!(answer, Answer::Failed(_)), "{answer:?}");
        assert!(matches!(judge(&answer, NOW), Verdict::Retry { .. }));
    }

    #[test]
    fn other_client_errors_are_permanent() {
        for code in [400, 401, 403, 404, 409, 410, 422] {
            let verdict = judge(&answered(code, &[], "no"), NOW);
            assert!(matches!(verdict, Verdict::Permanent { .. }), "{code}: {verdict:?}");
        }
    }

    #[test]
    fn the_record_holds_the_status_the_start_of_the_body_and_the_date() {
        let long = "x".repeat(5000);
        let record = record_of(judge(&answered(500, &[], &long), NOW));
        assert_eq!(record.status_code, Some(500));
        assert_eq!(record.message.len(), MAX_MESSAGE_BYTES);
        assert_eq!(record.date, "1970-01-01T00:00:00.000Z");
        assert_eq!(record.stack_trace, "");
        let empty = record_of(judge(&answered(503, &[], ""), NOW));
        assert_eq!(empty.message, "the app answered 503 with an empty body");
    }

    #[test]
    fn the_stack_trace_comes_from_json_else_from_the_header() {
        let json = r#"{"error":"boom","stack_trace":"at handler (app.js:10)"}"#;
        let record =
            record_of(judge(&answered(500, &[("content-type", "application/json")], json), NOW));
        assert_eq!(record.stack_trace, "at handler (app.js:10)");
        assert_eq!(record.message, json, "the message is the body's start, JSON or not");
        let headed = answered(500, &[(STACK_TRACE_HEADER, "main.go:42")], "boom");
        assert_eq!(record_of(judge(&headed, NOW)).stack_trace, "main.go:42");
        let both = answered(
            500,
            &[("content-type", "application/json"), (STACK_TRACE_HEADER, "header")],
            r#"{"stack_trace":"json"}"#,
        );
        assert_eq!(record_of(judge(&both, NOW)).stack_trace, "json", "JSON first");
    }

    #[test]
    fn retry_after_is_read_from_a_retryable_answer() {
        let verdict = judge(&answered(429, &[("retry-after", "7")], ""), NOW);
        let Verdict::Retry { retry_after, .. } = verdict else { panic!("{verdict:?}") };
        assert_eq!(retry_after, Some(Duration::from_secs(7)));
    }

    #[test]
    fn a_delivery_carries_its_headers() {
        let payload = serde_json::value::RawValue::from_string("{}".into()).unwrap();
        let id = crate::messaging::envelope::MessageId::generate(SystemTime::now());
        let mut envelope = Envelope::new(id, "orders", SystemTime::now(), payload);
        let uri: Uri = "http://127.0.0.1:1/events".parse().unwrap();
        let delivery =
            Delivery { envelope: &envelope, attempt: 2, max_attempts: 5, traceparent: None };
        let req = request(&uri, delivery);
        let header = |name: &str| req.headers()[name].to_str().unwrap().to_owned();
        assert_eq!(header("outrigger-message-id"), id.to_string());
        assert_eq!(header("outrigger-queue"), "orders");
        assert_eq!(header("outrigger-attempt"), "2");
        assert_eq!(header("outrigger-max-attempts"), "5");
        assert_eq!(header("idempotency-key"), id.to_string(), "the id when no key was given");
        assert!(req.headers().get("traceparent").is_none());

        envelope.metadata.insert("idempotency_key".into(), "k-1".into());
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        envelope.metadata.insert("traceparent".into(), tp.into());
        let req = request(
            &uri,
            Delivery { envelope: &envelope, attempt: 2, max_attempts: 5, traceparent: None },
        );
        assert_eq!(req.headers()["idempotency-key"], "k-1");
        assert_eq!(req.headers()["traceparent"], tp);
    }
}
