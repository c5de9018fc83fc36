//! W3C Trace Context, and the spans Outrigger records by hand: a proxied call, a publish and
//! its relay, a delivery. When spans are exported (`telemetry.tracing`, or the `OTEL_*`
//! variables) the sampled ones go to the export task (`otlp`), which sends them with the
//! OpenTelemetry crates.
//!
//! A `traceparent` from the app is continued (our span is its child, and what we send on
//! carries our span as the parent), or a trace is started. Without export nothing is
//! recorded: the hot path only reads and writes one header, with no OpenTelemetry context,
//! no clock and no allocation beyond the header.

use std::fmt::Write as _;
use std::time::SystemTime;

use http::{HeaderValue, Request};
use outrigger_config as config;
use prometheus::IntCounter;
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
    pub(super) parent: Option<[u8; 8]>,
    pub(super) name: &'static str,
    pub(super) kind: Kind,
    pub(super) start: SystemTime,
    pub(super) attributes: Vec<(&'static str, Attr)>,
    pub(super) error: bool,
    recording: bool,
}

#[derive(Debug, Clone)]
pub(super) enum Attr {
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

/// A recorded span of a call or an attempt still open, with the tracer that ends it. One
/// dropped before it was ended still ends its span: with `error.type: timeout` (and failed)
/// when a deadline cut it, else `cancelled` (the app went away, a hedge lost its race), so
/// the trace shows what was tried.
#[derive(Debug)]
pub struct OpenSpan {
    tracer: Tracer,
    span: Option<Span>,
    /// When a deadline cuts it: dropped at or past this, it timed out.
    cut_at: Option<tokio::time::Instant>,
}

impl OpenSpan {
    pub fn new(tracer: Tracer, span: Span) -> Self {
        OpenSpan { tracer, span: Some(span), cut_at: None }
    }

    /// The deadline that cuts it, if any (`policy::timeout::CutAt`).
    pub fn cut_at(mut self, at: Option<tokio::time::Instant>) -> Self {
        self.cut_at = at;
        self
    }

    /// The span, to record the outcome on before `end`.
    pub fn span(&mut self) -> &mut Span {
        self.span.as_mut().expect("a span is open until it ends")
    }

    /// Ends the span (once: the drop then has nothing left to end).
    pub fn end(&mut self) {
        if let Some(span) = self.span.take() {
            self.tracer.end(span);
        }
    }
}

impl Drop for OpenSpan {
    fn drop(&mut self) {
        let Some(mut span) = self.span.take() else { return };
        if self.cut_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
            span.text("error.type", "timeout");
            span.failed();
        } else {
            span.text("error.type", crate::error::CANCELLED);
        }
        self.tracer.end(span);
    }
}

/// Starts spans and sends the finished, sampled ones to the exporter (when there is one).
#[derive(Debug, Clone)]
pub struct Tracer {
    export: Option<Export>,
    sample_ratio: f64,
}

/// The way to the export task.
#[derive(Debug, Clone)]
struct Export {
    task: super::otlp::ExportTask,
    queue_full: IntCounter,
}

/// A finished span, ready to export.
#[derive(Debug)]
pub(super) struct Finished {
    pub(super) span: Span,
    pub(super) end: SystemTime,
}

/// What happens to exported spans, for `outrigger_spans_*`.
#[derive(Debug, Clone)]
pub struct SpanCounts {
    pub exported: IntCounter,
    pub queue_full: IntCounter,
    pub export_failed: IntCounter,
}

/// Spans waiting for the exporter at most: past it, new ones are dropped (never the request).
const QUEUE: usize = 4096;

impl Tracer {
    /// A tracer that records nothing, and only propagates context.
    pub fn disabled() -> Self {
        Tracer { export: None, sample_ratio: 0.0 }
    }

    /// Exporting as `export` says (`None`: only propagating), for service `service`.
    pub fn from_config(
        export: Option<&config::Export>,
        service: &str,
        counts: SpanCounts,
    ) -> Result<Self, super::otlp::OtlpError> {
        let Some(export) = export else { return Ok(Self::disabled()) };
        let queue_full = counts.queue_full.clone();
        let task = super::otlp::start(export, service, QUEUE, counts)?;
        Ok(Tracer { export: Some(Export { task, queue_full }), sample_ratio: export.sample_ratio })
    }

    /// A recording tracer whose finished spans wait in a queue of `capacity`.
    #[cfg(test)]
    pub(super) fn queued_for_tests(
        capacity: usize,
    ) -> (Self, mpsc::Receiver<Finished>, IntCounter) {
        let (spans, rx) = mpsc::channel(capacity);
        let (flushes, _) = mpsc::channel(1);
        let queue_full = IntCounter::new("test", "test").expect("valid metric");
        let task = super::otlp::ExportTask { spans, flushes };
        let export = Export { task, queue_full: queue_full.clone() };
        (Tracer { export: Some(export), sample_ratio: 1.0 }, rx, queue_full)
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
            if let Err(mpsc::error::TrySendError::Full(_)) =
                export.task.spans.try_send(Finished { span, end: SystemTime::now() })
            {
                export.queue_full.inc();
            }
        }
    }

    /// Exports every span queued now (at shutdown: spans still waiting would be lost with the
    /// process); returns once each has been tried. Nothing to do without an exporter.
    pub async fn flush(&self) {
        let Some(export) = &self.export else { return };
        let (done, tried) = tokio::sync::oneshot::channel();
        if export.task.flushes.send(done).await.is_ok() {
            let _ = tried.await;
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
    fn a_span_finished_while_the_queue_is_full_is_dropped_and_counted() {
        let (tracer, mut rx, queue_full) = Tracer::queued_for_tests(1);
        for _ in 0..3 {
            tracer.end(tracer.start(None, "GET", Kind::Client));
        }
        assert_eq!(queue_full.get(), 2, "one waits, two are dropped");
        assert!(rx.try_recv().is_ok());
        tracer.end(tracer.start(None, "GET", Kind::Client));
        assert_eq!(queue_full.get(), 2, "room again: queued");
    }

    #[test]
    fn an_open_span_ends_as_told_or_dropped_as_timed_out_or_cancelled() {
        let (tracer, mut rx, _) = Tracer::queued_for_tests(4);
        let mut answered = OpenSpan::new(tracer.clone(), tracer.start(None, "GET", Kind::Client));
        answered.span().int("http.response.status_code", 200);
        answered.end();
        drop(OpenSpan::new(tracer.clone(), tracer.start(None, "POST", Kind::Client)));
        let past = tokio::time::Instant::now();
        let cut = OpenSpan::new(tracer.clone(), tracer.start(None, "PUT", Kind::Client));
        drop(cut.cut_at(Some(past)));
        let error_type = |f: &Finished| {
            f.span.attributes.iter().find(|(k, _)| *k == "error.type").map(|(_, v)| match v {
                Attr::Text(t) => t.clone(),
                Attr::Int(i) => i.to_string(),
            })
        };
        let first = rx.try_recv().expect("the answered span");
        assert_eq!((first.span.name, error_type(&first)), ("GET", None));
        let second = rx.try_recv().expect("the dropped span");
        let cancelled = Some(crate::error::CANCELLED.to_owned());
        assert_eq!((second.span.name, error_type(&second)), ("POST", cancelled));
        assert!(!second.span.error, "the app's leaving is not the upstream's failure");
        let third = rx.try_recv().expect("the span its deadline cut");
        assert_eq!((third.span.name, error_type(&third)), ("PUT", Some("timeout".to_owned())));
        assert!(third.span.error);
        assert!(rx.try_recv().is_err(), "each ends once");
    }
}
