//! An OTLP/HTTP receiver on loopback: it accepts `POST /v1/traces` (protobuf
//! `ExportTraceServiceRequest`) and decodes the spans with a small protobuf reader, so a test
//! can assert trace ids, parents and names. (The OpenTelemetry Collector is not packaged.)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// One span as received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// The OTLP span kind: 3 client, 4 producer, 5 consumer.
    pub kind: u64,
    /// String and integer attributes, as text.
    pub attributes: Vec<(String, String)>,
    /// The resource's `service.name`.
    pub service: String,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// A running receiver; it stops with the test's runtime.
#[derive(Debug, Clone)]
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let shared = spans.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let spans = shared.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let spans = spans.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if path == "/v1/traces" {
                            spans.lock().unwrap().extend(decode_request(&body));
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                tokio::spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, spans }
    }

    /// `http://127.0.0.1:PORT`, for `telemetry.tracing.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

/// A protobuf field: its number and its value (varint, fixed64, or bytes).
enum Value<'a> {
    Varint(u64),
    /// A fixed64 (span times): skipped over, not read.
    Fixed,
    Bytes(&'a [u8]),
}

/// The fields of one message, in order (malformed input ends the walk).
fn fields(mut buf: &[u8]) -> Vec<(u32, Value<'_>)> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first()?;
            *buf = rest;
            n |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Some(key) = varint(&mut buf) else { break };
        let (field, wire) = ((key >> 3) as u32, key & 7);
        let value = match wire {
            0 => match varint(&mut buf) {
                Some(n) => Value::Varint(n),
                None => break,
            },
            1 if buf.len() >= 8 => {
                buf = &buf[8..];
                Value::Fixed
            }
            2 => {
                let Some(len) = varint(&mut buf) else { break };
                if buf.len() < len as usize {
                    break;
                }
                let (head, rest) = buf.split_at(len as usize);
                buf = rest;
                Value::Bytes(head)
            }
            5 if buf.len() >= 4 => {
                buf = &buf[4..];
                continue;
            }
            _ => break,
        };
        out.push((field, value));
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A `KeyValue`: key, and the value as text (string or int).
fn key_value(bytes: &[u8]) -> Option<(String, String)> {
    let mut key = None;
    let mut value = None;
    for (field, v) in fields(bytes) {
        match (field, v) {
            (1, Value::Bytes(k)) => key = Some(text(k)),
            (2, Value::Bytes(any)) => {
                for (f, v) in fields(any) {
                    value = match (f, v) {
                        (1, Value::Bytes(s)) => Some(text(s)),
                        (3, Value::Varint(n)) => Some((n as i64).to_string()),
                        _ => value,
                    };
                }
            }
            _ => {}
        }
    }
    Some((key?, value.unwrap_or_default()))
}

/// ExportTraceServiceRequest { resource_spans = 1 { resource = 1, scope_spans = 2 { spans = 2 } } }
fn decode_request(body: &[u8]) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    for (field, value) in fields(body) {
        let (1, Value::Bytes(resource_spans)) = (field, value) else { continue };
        let mut service = String::new();
        let mut found = Vec::new();
        for (field, value) in fields(resource_spans) {
            match (field, value) {
                (1, Value::Bytes(resource)) => {
                    for (f, v) in fields(resource) {
                        if let (1, Value::Bytes(kv)) = (f, v)
                            && let Some((k, v)) = key_value(kv)
                            && k == "service.name"
                        {
                            service = v;
                        }
                    }
                }
                (2, Value::Bytes(scope_spans)) => {
                    for (f, v) in fields(scope_spans) {
                        if let (2, Value::Bytes(span)) = (f, v) {
                            found.push(decode_span(span));
                        }
                    }
                }
                _ => {}
            }
        }
        for mut span in found {
            span.service = service.clone();
            spans.push(span);
        }
    }
    spans
}

fn decode_span(bytes: &[u8]) -> ReceivedSpan {
    let mut span = ReceivedSpan::default();
    for (field, value) in fields(bytes) {
        match (field, value) {
            (1, Value::Bytes(b)) => span.trace_id = hex(b),
            (2, Value::Bytes(b)) => span.span_id = hex(b),
            (4, Value::Bytes(b)) => span.parent_span_id = hex(b),
            (5, Value::Bytes(b)) => span.name = text(b),
            (6, Value::Varint(kind)) => span.kind = kind,
            (9, Value::Bytes(b)) => span.attributes.extend(key_value(b)),
            (_, Value::Varint(_) | Value::Fixed | Value::Bytes(_)) => {}
        }
    }
    span
}
