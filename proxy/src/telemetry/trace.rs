//! W3C Trace Context and OTLP export, without a tracing framework: the few spans Outrigger
//! makes (a proxied request, a publish, a delivery attempt) are recorded by hand and, when
//! `telemetry.tracing.otlp_endpoint` is set, sent in batches as OTLP/HTTP protobuf.
//!
//! A `traceparent` from the app is continued (our span is its child, and what we send on
//! carries our span as the parent), or a trace is started. Without an endpoint nothing is
//! recorded: the hot path only reads and writes one header.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request};
use outrigger_config as config;
use tokio::sync::mpsc;

use crate::http::Body;

/// A span's place in a trace, as `traceparent` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl Context {
    /// `00-TRACEID-SPANID-FLAGS`; `None` for anything else (then a trace is started).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2
            || version == "ff"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex_into(trace, &mut trace_id)?;
        hex_into(span, &mut span_id)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Context { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    /// The `traceparent` value; built on the stack (it is on every proxied request).
    pub fn header(&self) -> HeaderValue {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
        for (i, b) in self.trace_id.iter().enumerate() {
            text[3 + 2 * i] = DIGITS[usize::from(b >> 4)];
            text[4 + 2 * i] = DIGITS[usize::from(b & 15)];
        }
        for (i, b) in self.span_id.iter().enumerate() {
            text[36 + 2 * i] = DIGITS[usize::from(b >> 4)];
            text[37 + 2 * i] = DIGITS[usize::from(b & 15)];
        }
        if self.sampled {
            text[54] = b'1';
        }
        HeaderValue::from_bytes(&text).expect("hex is a valid header")
    }

    pub fn trace_hex(&self) -> String {
        let mut text = String::with_capacity(32);
        hex(&mut text, &self.trace_id);
        text
    }
}

fn hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

fn hex_into(text: &str, out: &mut [u8]) -> Option<()> {
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(())
}

/// What a span was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A call to an upstream or to the app.
    Client,
    /// A message published.
    Producer,
    /// A message delivered to the app.
    Consumer,
}

/// An HTTP client span's name, as the OpenTelemetry conventions write it: the method, or `HTTP`
/// for one they do not know (span names must stay few).
pub fn method_name(method: &http::Method) -> &'static str {
    known_method(method).unwrap_or("HTTP")
}

/// `http.request.method`: a method of RFC 9110 (or PATCH), else `_OTHER`.
pub fn method_attribute(method: &http::Method) -> &'static str {
    known_method(method).unwrap_or("_OTHER")
}

fn known_method(method: &http::Method) -> Option<&'static str> {
    use http::Method;
    Some(match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return None,
    })
}

/// A span in progress.
#[derive(Debug)]
pub struct Span {
    pub context: Context,
    parent: Option<[u8; 8]>,
    name: &'static str,
    kind: Kind,
    start: SystemTime,
    attributes: Vec<(&'static str, Attr)>,
    error: bool,
    recording: bool,
}

#[derive(Debug, Clone)]
enum Attr {
    Text(String),
    Int(i64),
}

impl Span {
    /// Whether this span will be exported: attributes are only worth recording then.
    pub fn recording(&self) -> bool {
        self.recording
    }

    pub fn text(&mut self, key: &'static str, value: impl Into<String>) {
        if self.recording {
            self.attributes.push((key, Attr::Text(value.into())));
        }
    }

    pub fn int(&mut self, key: &'static str, value: i64) {
        if self.recording {
            self.attributes.push((key, Attr::Int(value)));
        }
    }

    pub fn failed(&mut self) {
        self.error = true;
    }
}

/// Starts spans and sends the finished, sampled ones to the exporter (when there is one).
#[derive(Debug, Clone)]
pub struct Tracer {
    export: Option<mpsc::Sender<Finished>>,
    sample_ratio: f64,
}

/// A finished span, ready to encode.
#[derive(Debug)]
struct Finished {
    span: Span,
    end: SystemTime,
}

/// Spans buffered for export at most: past it, new ones are dropped (never the request).
const QUEUE: usize = 4096;
/// Spans per export request at most.
const BATCH: usize = 512;
/// How long finished spans wait before being sent.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

impl Tracer {
    /// A tracer that records nothing, and only propagates context.
    pub fn disabled() -> Self {
        Tracer { export: None, sample_ratio: 0.0 }
    }

    /// From `telemetry.tracing` for service `service`: with it, spans are exported.
    pub fn from_config(cfg: Option<&config::Tracing>, service: &str) -> Self {
        let Some(cfg) = cfg else { return Self::disabled() };
        let (tx, rx) = mpsc::channel(QUEUE);
        let name = cfg.service_name.clone().unwrap_or_else(|| service.to_owned());
        let endpoint = format!("{}/v1/traces", cfg.otlp_endpoint.trim_end_matches('/'));
        tokio::spawn(export(rx, endpoint, name));
        Tracer { export: Some(tx), sample_ratio: cfg.sample_ratio.get() }
    }

    /// A span continuing `parent` (a `traceparent` value), or starting a trace.
    pub fn start(&self, parent: Option<&HeaderValue>, name: &'static str, kind: Kind) -> Span {
        let parent = parent.and_then(|v| v.to_str().ok()).and_then(Context::parse);
        let (trace_id, sampled, parent_id) = match parent {
            Some(p) => (p.trace_id, p.sampled, Some(p.span_id)),
            None => {
                let sampled = self.export.is_some() && rand::random::<f64>() < self.sample_ratio;
                (rand::random::<u128>().max(1).to_be_bytes(), sampled, None)
            }
        };
        let span_id = rand::random::<u64>().max(1).to_be_bytes();
        let recording = sampled && self.export.is_some();
        Span {
            context: Context { trace_id, span_id, sampled },
            parent: parent_id,
            name,
            kind,
            // a span that is only propagated needs no clock
            start: if recording { SystemTime::now() } else { SystemTime::UNIX_EPOCH },
            attributes: Vec::new(),
            error: false,
            recording,
        }
    }

    /// Ends `span`: exported when sampled and an exporter runs.
    pub fn end(&self, span: Span) {
        if let Some(export) = &self.export
            && span.recording
        {
            // a full queue drops the span, never blocks the request
            let _ = export.try_send(Finished { span, end: SystemTime::now() });
        }
    }

    /// Whether spans are exported at all (an endpoint is set).
    pub fn exporting(&self) -> bool {
        self.export.is_some()
    }

    /// Sets `traceparent` on an outgoing request to `span`.
    pub fn inject(span: &Span, req: &mut Request<Body>) {
        req.headers_mut().insert("traceparent", span.context.header());
    }
}

/// Batches finished spans and POSTs them as OTLP/HTTP protobuf to `endpoint`.
async fn export(mut rx: mpsc::Receiver<Finished>, endpoint: String, service: String) {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let mut batch = Vec::new();
    loop {
        let first = match rx.recv().await {
            Some(finished) => finished,
            None => return,
        };
        batch.push(first);
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        while batch.len() < BATCH {
            tokio::select! {
                more = rx.recv() => match more {
                    Some(finished) => batch.push(finished),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        let body = encode(&service, &batch);
        let n = batch.len();
        batch.clear();
        let req = Request::post(&endpoint)
            .header("content-type", "application/x-protobuf")
            .body(Body::full(body))
            .expect("a valid OTLP request");
        match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
            Ok(Ok(res)) if res.status().is_success() => {
                tracing::trace!(spans = n, "spans exported")
            }
            Ok(Ok(res)) => tracing::debug!(
                status = res.status().as_u16(),
                spans = n,
                "the OTLP endpoint refused spans"
            ),
            Ok(Err(error)) => tracing::debug!(%error, spans = n, "spans not exported"),
            Err(_) => tracing::debug!(spans = n, "the OTLP endpoint did not answer in 10 s"),
        }
    }
}

// === OTLP protobuf (opentelemetry/proto/collector/trace/v1 ExportTraceServiceRequest) ===

fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field) << 3 | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    tag(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn fixed64(out: &mut Vec<u8>, field: u32, n: u64) {
    tag(out, field, 1);
    out.extend_from_slice(&n.to_le_bytes());
}

fn key_value(key: &str, value: &Attr) -> Vec<u8> {
    let mut any = Vec::new();
    match value {
        Attr::Text(text) => bytes_field(&mut any, 1, text.as_bytes()),
        Attr::Int(n) => {
            tag(&mut any, 3, 0);
            varint(&mut any, *n as u64);
        }
    }
    let mut kv = Vec::new();
    bytes_field(&mut kv, 1, key.as_bytes());
    bytes_field(&mut kv, 2, &any);
    kv
}

fn nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn encode(service: &str, batch: &[Finished]) -> Bytes {
    let mut scope_spans = Vec::new();
    let mut scope = Vec::new();
    bytes_field(&mut scope, 1, b"outrigger");
    bytes_field(&mut scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
    bytes_field(&mut scope_spans, 1, &scope);
    for Finished { span, end } in batch {
        let mut s = Vec::new();
        bytes_field(&mut s, 1, &span.context.trace_id);
        bytes_field(&mut s, 2, &span.context.span_id);
        if let Some(parent) = &span.parent {
            bytes_field(&mut s, 4, parent);
        }
        bytes_field(&mut s, 5, span.name.as_bytes());
        tag(&mut s, 6, 0);
        varint(
            &mut s,
            match span.kind {
                Kind::Client => 3,
                Kind::Producer => 4,
                Kind::Consumer => 5,
            },
        );
        fixed64(&mut s, 7, nanos(span.start));
        fixed64(&mut s, 8, nanos(*end));
        for (key, value) in &span.attributes {
            bytes_field(&mut s, 9, &key_value(key, value));
        }
        let mut status = Vec::new();
        tag(&mut status, 3, 0);
        varint(&mut status, if span.error { 2 } else { 0 });
        bytes_field(&mut s, 15, &status);
        bytes_field(&mut scope_spans, 2, &s);
    }
    let mut resource = Vec::new();
    bytes_field(&mut resource, 1, &key_value("service.name", &Attr::Text(service.to_owned())));
    let mut resource_spans = Vec::new();
    bytes_field(&mut resource_spans, 1, &resource);
    bytes_field(&mut resource_spans, 2, &scope_spans);
    let mut request = Vec::new();
    bytes_field(&mut request, 1, &resource_spans);
    Bytes::from(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_parses_and_prints_back() {
        let ctx = Context::parse(PARENT).unwrap();
        assert!(ctx.sampled);
        assert_eq!(ctx.header(), PARENT);
        assert_eq!(ctx.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-zzf067aa0ba902b7-01",
        ] {
            assert_eq!(Context::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_span_continues_the_callers_trace_or_starts_one() {
        let tracer = Tracer::disabled();
        let parent = HeaderValue::from_static(PARENT);
        let child = tracer.start(Some(&parent), "outbound", Kind::Client);
        let p = Context::parse(PARENT).unwrap();
        assert_eq!(child.context.trace_id, p.trace_id);
        assert_ne!(child.context.span_id, p.span_id);
        assert_eq!(child.parent, Some(p.span_id));
        assert!(child.context.sampled, "the caller's decision is kept");
        let root = tracer.start(None, "outbound", Kind::Client);
        assert_eq!(root.parent, None);
        assert!(!root.context.sampled, "without an exporter nothing is sampled");
    }

    #[test]
    fn spans_encode_as_otlp_protobuf() {
        let tracer = Tracer::disabled();
        let mut span =
            tracer.start(Some(&HeaderValue::from_static(PARENT)), "publish orders", Kind::Producer);
        span.int("http.response.status_code", 202);
        let body = encode("checkout", &[Finished { span, end: SystemTime::now() }]);
        // field 1 (resource_spans), length-delimited; the ids and names appear verbatim
        assert_eq!(body[0], 0x0a);
        let find = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"publish") && find(b"orders") && find(b"checkout") && find(b"service.name"));
        assert!(find(&Context::parse(PARENT).unwrap().trace_id));
    }
}
