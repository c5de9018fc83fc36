//! OTLP export: finished spans are batched here and sent by the OpenTelemetry project's
//! exporter (`opentelemetry-otlp`, HTTP/protobuf), which encodes them, honours
//! `OTEL_EXPORTER_OTLP_HEADERS`, and retries 429, 502, 503 and 504 (and no answer within
//! [`ATTEMPT_TIMEOUT`]) with backoff, waiting as long as a `Retry-After` asks, starting no
//! retry after [`EXPORT_TIMEOUT`].
//!
//! The requests go through [`Collector`], our hyper client: `http://`, or `https://` verified
//! against `telemetry.tracing.ca_file` (else the system's roots); it lays the YAML's
//! `headers` over the variable's. Spans wait in a bounded queue: when the collector is slower
//! than the traffic the newest are dropped and counted (`outrigger_spans_dropped_total`),
//! and a request never waits for telemetry.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{DefaultServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_http::HttpError;
use opentelemetry_otlp::{Protocol, RetryPolicy, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use outrigger_config as config;
use tokio::sync::{mpsc, oneshot};

use super::trace::{Attr, Finished, Kind, SpanCounts};
use crate::error::chain;
use crate::http::tls::{TlsError, client_config, plain_only};

/// Spans per export request at most.
const BATCH: usize = 512;
/// How long finished spans wait to fill a batch before it is sent anyway.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// One export: no retry starts after it (a retry started just before may take
/// [`ATTEMPT_TIMEOUT`] more).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// One request to the collector, connecting included: one that gets no answer in it is
/// retried as a failure without an answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of a collector's answer that is read (it is a small protobuf message).
const MAX_ANSWER: usize = 64 * 1024;

/// Why spans cannot be exported as configured: the sidecar does not start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("telemetry.tracing: the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The way to the export task: the spans to send, and requests to send every span queued
/// now (at shutdown), each answered once they have been tried.
#[derive(Debug, Clone)]
pub(super) struct ExportTask {
    pub(super) spans: mpsc::Sender<Finished>,
    pub(super) flushes: mpsc::Sender<oneshot::Sender<()>>,
}

/// Starts the export task for `export`, its queue holding `capacity` spans.
pub(super) fn start(
    export: &config::Export,
    service: &str,
    capacity: usize,
    counts: SpanCounts,
) -> Result<ExportTask, OtlpError> {
    let collector = Collector::new(export)?;
    let why = collector.last_error.clone();
    let mut exporter = exporter(export, collector, EXPORT_TIMEOUT, RetryPolicy::recommended())?;
    exporter.set_resource(&resource(export, service));
    let (spans, queued) = mpsc::channel(capacity);
    let (flushes, asked) = mpsc::channel(1);
    let failures = Failures { why, counts, url: export.url.clone() };
    tokio::spawn(run(queued, asked, Exporting::new(exporter, failures)));
    Ok(ExportTask { spans, flushes })
}

/// Sends the collector an export with no spans, as the sidecar sends its spans (the same
/// client, headers and TLS; one try), within `wait`: for `outrigger check`.
pub(crate) async fn probe(export: &config::Export, wait: Duration) -> Result<(), String> {
    let collector = Collector::new(export).map_err(|e| e.to_string())?;
    let why = collector.last_error.clone();
    // one try: `check` reports the collector's first answer
    let exporter =
        exporter(export, collector, wait, RetryPolicy::disabled()).map_err(|e| e.to_string())?;
    match tokio::time::timeout(wait, exporter.export(Vec::new())).await {
        Ok(done) => done.map_err(|e| explained(&e, &why)),
        Err(_) => Err(format!("no answer within {wait:?}")),
    }
}

/// The OpenTelemetry exporter, HTTP/protobuf to `export.url` through `collector`; one export
/// and its retries take `timeout` at most.
fn exporter(
    export: &config::Export,
    collector: Collector,
    timeout: Duration,
    retries: RetryPolicy,
) -> Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError> {
    opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(collector)
        .with_retry_policy(retries)
        .with_endpoint(export.url.clone())
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(timeout)
        .build()
}

/// The process the spans come from: the variables' resource (`OTEL_RESOURCE_ATTRIBUTES` and
/// the SDK's own attributes), named `telemetry.tracing.service_name`, else `OTEL_SERVICE_NAME`,
/// else the `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, else `service.name`. (The SDK's
/// builder would let `OTEL_RESOURCE_ATTRIBUTES` win over `OTEL_SERVICE_NAME`, against the
/// specification: the variable is read here.)
fn resource(export: &config::Export, service: &str) -> Resource {
    let from_env = Resource::builder().build();
    let in_attributes = from_env
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .map(|name| name.as_str().into_owned())
        .filter(|name| !name.starts_with("unknown_service"));
    let variable = std::env::var("OTEL_SERVICE_NAME").ok().filter(|n| !n.trim().is_empty());
    let name = (export.service_name.clone().or(variable).or(in_attributes))
        .unwrap_or_else(|| service.to_owned());
    Resource::builder().with_service_name(name).build()
}

/// What the export task reports failures with.
struct Failures {
    /// Why the last request failed, as the HTTP client saw it.
    why: Arc<Mutex<Option<String>>>,
    counts: SpanCounts,
    url: String,
}

/// The exporter's error, with what our client saw when it was a network error (the exporter
/// only says "network error").
fn explained(error: &OTelSdkError, why: &Mutex<Option<String>>) -> String {
    match why.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(why) => format!("{error} ({why})"),
        None => error.to_string(),
    }
}

/// Batches finished spans and exports each batch; on a flush request, exports everything
/// queued, then answers. A flush goes first, and cuts a batch's gathering short.
async fn run(
    mut queued: mpsc::Receiver<Finished>,
    mut asked: mpsc::Receiver<oneshot::Sender<()>>,
    mut exporting: Exporting,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let mut flush = None;
        tokio::select! {
            biased;
            Some(done) = asked.recv() => flush = Some(done),
            finished = queued.recv() => match finished {
                Some(finished) => batch.push(finished),
                None => return,
            },
        }
        if flush.is_none() {
            let deadline = tokio::time::sleep(FLUSH_EVERY);
            tokio::pin!(deadline);
            while batch.len() < BATCH {
                tokio::select! {
                    biased;
                    Some(done) = asked.recv() => {
                        flush = Some(done);
                        break;
                    }
                    more = queued.recv() => match more {
                        Some(finished) => batch.push(finished),
                        None => break,
                    },
                    _ = &mut deadline => break,
                }
            }
        }
        if let Some(done) = flush {
            while let Ok(finished) = queued.try_recv() {
                batch.push(finished);
                if batch.len() == BATCH {
                    exporting.export(&mut batch).await;
                }
            }
            exporting.export(&mut batch).await;
            let _ = done.send(());
        } else {
            exporting.export(&mut batch).await;
        }
    }
}

/// The exporter, and what it reports with.
struct Exporting {
    exporter: opentelemetry_otlp::SpanExporter,
    scope: InstrumentationScope,
    failures: Failures,
    /// The last export failed: the next success says the collector is back.
    failing: bool,
}

impl Exporting {
    fn new(exporter: opentelemetry_otlp::SpanExporter, failures: Failures) -> Self {
        let scope = InstrumentationScope::builder("outrigger")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        Exporting { exporter, scope, failures, failing: false }
    }

    /// Exports (and empties) `batch`; counts what went and what was lost.
    async fn export(&mut self, batch: &mut Vec<Finished>) {
        if batch.is_empty() {
            return;
        }
        let Failures { why, counts, url } = &self.failures;
        let n = batch.len() as u64;
        let spans = batch.drain(..).map(|finished| span_data(finished, &self.scope)).collect();
        match self.exporter.export(spans).await {
            Ok(()) => {
                counts.exported.inc_by(n);
                if std::mem::take(&mut self.failing) {
                    tracing::info!(collector = %url, "the collector takes spans again");
                }
            }
            Err(error) => {
                counts.export_failed.inc_by(n);
                // once per outage, not per batch: the count is in the metric
                let error = explained(&error, why);
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(collector = %url, %error, spans = n, "exporting spans failed; they are dropped (outrigger_spans_dropped_total) until the collector takes them");
                }
            }
        }
    }
}

/// One finished span as the OpenTelemetry SDK's exporters take it.
fn span_data(Finished { span, end }: Finished, scope: &InstrumentationScope) -> SpanData {
    let context = span.context;
    let flags = if context.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let attributes = span
        .attributes
        .into_iter()
        .map(|(key, value)| match value {
            Attr::Text(text) => KeyValue::new(key, text),
            Attr::Int(n) => KeyValue::new(key, n),
        })
        .collect();
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(context.trace_id),
            SpanId::from_bytes(context.span_id),
            flags,
            false,
            TraceState::default(),
        ),
        // a parent always comes from a `traceparent`: another process's span
        parent_span_id: span.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: span.parent.is_some(),
        span_kind: match span.kind {
            Kind::Client => SpanKind::Client,
            Kind::Producer => SpanKind::Producer,
            Kind::Consumer => SpanKind::Consumer,
        },
        name: Cow::Borrowed(span.name),
        start_time: span.start,
        end_time: end,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if span.error { Status::error("") } else { Status::Unset },
        instrumentation_scope: scope.clone(),
    }
}

/// The exporter's HTTP client: hyper over plain TCP or rustls, with the YAML's headers.
#[derive(Debug)]
struct Collector {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Why the last request got no answer (a refused connection, a certificate).
    last_error: Arc<Mutex<Option<String>>>,
}

impl Collector {
    fn new(export: &config::Export) -> Result<Self, TlsError> {
        // an `http://` collector never needs a CA, so an image without one may still use it
        let mut tls = match export.url.starts_with("https://") {
            true => client_config("telemetry.tracing", export.ca_file.as_deref())?,
            false => plain_only(),
        };
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(ATTEMPT_TIMEOUT));
        // `https://` gets TLS with the URL's host as the verified name; `http://` stays plain
        let connector =
            HttpsConnector::new(http, tls, false, Arc::new(DefaultServerNameResolver::default()));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        // validation refused names and values that are not HTTP's
        let headers = export
            .headers
            .iter()
            .filter_map(|(name, value)| {
                Some((HeaderName::try_from(name).ok()?, HeaderValue::try_from(value).ok()?))
            })
            .collect();
        Ok(Collector { client, headers, last_error: Arc::default() })
    }

    async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (mut head, body) = request.into_parts();
        for (name, value) in &self.headers {
            head.headers.insert(name.clone(), value.clone());
        }
        let exchange = async {
            let response = self.client.request(Request::from_parts(head, Full::new(body))).await?;
            let (head, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(head, body))
        };
        let answer = match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {ATTEMPT_TIMEOUT:?}").into()),
        };
        let why = answer.as_ref().err().map(|error| chain(error.as_ref()));
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = why;
        answer
    }
}

impl opentelemetry_http::HttpClient for Collector {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(self.send(request))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::telemetry::trace::Tracer;

    /// How long ago `at` was.
    fn age(at: SystemTime) -> Duration {
        SystemTime::now().duration_since(at).unwrap_or_default()
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_finished_span_keeps_its_ids_kind_attributes_and_status() {
        let (tracer, _queue, _) = Tracer::queued_for_tests(1);
        let parent = HeaderValue::from_static(PARENT);
        let mut span = tracer.start(Some(&parent), "send", Kind::Producer);
        span.text("messaging.destination.name", "orders");
        span.int("http.response.status_code", 503);
        span.failed();
        let scope = InstrumentationScope::builder("outrigger").build();
        let data = span_data(Finished { span, end: SystemTime::now() }, &scope);
        assert_eq!(data.span_context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(data.parent_span_id.to_string(), "00f067aa0ba902b7");
        assert!(data.parent_span_is_remote);
        assert_eq!(data.span_kind, SpanKind::Producer);
        assert_eq!(data.name, "send");
        assert!(matches!(data.status, Status::Error { .. }));
        assert!(age(data.start_time) < Duration::from_secs(60));
        let attributes: Vec<String> =
            data.attributes.iter().map(|kv| format!("{}={}", kv.key, kv.value)).collect();
        assert_eq!(
            attributes,
            ["messaging.destination.name=orders", "http.response.status_code=503"]
        );
    }

    #[test]
    fn the_service_is_named_by_the_yaml_first_then_by_service_name() {
        let export = |service_name: Option<&str>| config::Export {
            url: "http://127.0.0.1:4318/v1/traces".into(),
            url_from: "telemetry.tracing.otlp_endpoint",
            sample_ratio: 1.0,
            service_name: service_name.map(str::to_owned),
            ca_file: None,
            headers: Default::default(),
        };
        let name = |resource: Resource| {
            resource
                .get(&opentelemetry::Key::from_static_str("service.name"))
                .map(|v| v.as_str().into_owned())
        };
        // the test process sets neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES
        assert_eq!(
            name(resource(&export(Some("shop-traces")), "shop")).as_deref(),
            Some("shop-traces")
        );
        assert_eq!(name(resource(&export(None), "shop")).as_deref(), Some("shop"));
    }
}
