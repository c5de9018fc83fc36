//! An OTLP/HTTP receiver on loopback, plain or over TLS: it accepts `POST /v1/traces` and
//! decodes each `ExportTraceServiceRequest` with the OpenTelemetry project's own message types
//! (`opentelemetry-proto`), so a test asserts on what a collector would read. It can refuse the
//! first exports (429, 503) to test retries, and keeps each request's headers. (The
//! OpenTelemetry Collector is packaged neither by Debian nor on PyPI.)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use prost::Message;
use tokio::net::TcpListener;

use crate::tls::{Pki, TlsServer};

/// One span as received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// The OTLP span kind: 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    /// The status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
    /// String and integer attributes, as text.
    pub attributes: Vec<(String, String)>,
    /// The resource's `service.name`.
    pub service: String,
    /// Every attribute of the resource, as text.
    pub resource: Vec<(String, String)>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        find(&self.attributes, key)
    }

    pub fn resource_attribute(&self, key: &str) -> Option<&str> {
        find(&self.resource, key)
    }
}

fn find<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// What the receiver saw and what it answers.
#[derive(Debug, Default)]
struct State {
    spans: Vec<ReceivedSpan>,
    /// The headers of every export request, in order.
    requests: Vec<HeaderMap>,
    /// Answers given before any 200, in order (then 200 to everything).
    refusals: Vec<(StatusCode, Option<&'static str>)>,
}

/// A running receiver; it stops with the test's runtime.
#[derive(Debug, Clone)]
pub struct OtlpReceiver {
    addr: SocketAddr,
    tls: bool,
    state: Arc<Mutex<State>>,
}

impl OtlpReceiver {
    /// Plain HTTP, taking every export.
    pub async fn start() -> Self {
        Self::serve(None).await
    }

    /// HTTPS with `pki`'s server certificate (for `localhost`).
    pub async fn start_tls(pki: &Pki) -> Self {
        Self::serve(Some(TlsServer::new().http1_only().acceptor(pki))).await
    }

    /// Answers the next exports `status` (with `Retry-After: retry_after` when given), `times`
    /// times, before taking them again.
    pub fn refuse(&self, times: usize, status: u16, retry_after: Option<&'static str>) {
        let status = StatusCode::from_u16(status).expect("a status");
        self.state
            .lock()
            .unwrap()
            .refusals
            .extend(std::iter::repeat_n((status, retry_after), times));
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let state: Arc<Mutex<State>> = Arc::default();
        let shared = state.clone();
        let secure = tls.is_some();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(receive(&state, req).await) }
                });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ =
                                    builder.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Self { addr, tls: secure, state }
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` (the certificate's name), for
    /// `telemetry.tracing.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        match self.tls {
            true => format!("https://localhost:{}", self.addr.port()),
            false => format!("http://{}", self.addr),
        }
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state.lock().unwrap().spans.clone()
    }

    /// The headers of every export request so far (refused ones included).
    pub fn requests(&self) -> Vec<HeaderMap> {
        self.state.lock().unwrap().requests.clone()
    }
}

async fn receive(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (head, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    if head.uri.path() != "/v1/traces" {
        return answer(StatusCode::NOT_FOUND, None);
    }
    let mut state = state.lock().unwrap();
    state.requests.push(head.headers);
    if !state.refusals.is_empty() {
        let (status, retry_after) = state.refusals.remove(0);
        return answer(status, retry_after);
    }
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            state.spans.extend(spans_of(request));
            answer(StatusCode::OK, None)
        }
        Err(_) => answer(StatusCode::BAD_REQUEST, None),
    }
}

fn answer(status: StatusCode, retry_after: Option<&str>) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::new()));
    *res.status_mut() = status;
    if let Some(after) = retry_after {
        res.headers_mut().insert("retry-after", after.parse().expect("a header value"));
    }
    res
}

fn spans_of(request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = resource_spans.resource.map(|r| pairs(&r.attributes)).unwrap_or_default();
        let service = find(&resource, "service.name").unwrap_or_default().to_owned();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            out.push(ReceivedSpan {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                name: span.name,
                kind: span.kind,
                status: span.status.map_or(0, |s| s.code),
                attributes: pairs(&span.attributes),
                service: service.clone(),
                resource: resource.clone(),
            });
        }
    }
    out
}

/// Attributes as `(key, value as text)`: strings, integers, booleans and doubles.
fn pairs(attributes: &[KeyValue]) -> Vec<(String, String)> {
    attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(n)) => n.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                _ => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
