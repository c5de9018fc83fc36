//! Logs through `tracing`, as text or JSON per `telemetry.log`.
//!
//! JSON lines are flat: one object per line, the event's fields at the top level beside
//! `timestamp`, `level`, `target` and `message`, so a log pipeline reads them without unnesting.
//! Inside a traced call (a span made by [`call_span`]) each line also carries the call's
//! `trace_id` and `span_id`, joining it to its trace.
//!
//! `OUTRIGGER_LOG` (an env-filter directive such as `debug` or `info,outrigger_proxy=trace`)
//! overrides the configured level, for debugging a running deployment without editing its YAML.

use std::fmt;

use outrigger_config as config;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

/// Lets the access log's lines through at every level: they are asked for by
/// `telemetry.access_log`, not by the level.
const ACCESS_DIRECTIVE: &str = "outrigger::access=info";

/// The name of the span a traced call's log lines are made under.
const CALL_SPAN: &str = "traced";

/// Installs the global subscriber; later calls (tests, the demo) keep the first one.
pub fn init(cfg: &config::Log) {
    let filter = std::env::var("OUTRIGGER_LOG")
        .ok()
        .and_then(|directive| EnvFilter::try_new(directive).ok())
        .unwrap_or_else(|| {
            EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"))
        })
        // the access log (`telemetry.access_log`) is written whatever the level
        .add_directive(ACCESS_DIRECTIVE.parse().expect("a valid directive"));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // a second call keeps the first subscriber: either error says only that
    let _installed = match cfg.format {
        config::LogFormat::Json => {
            builder.event_format(FlatJson).finish().with(CallIdsLayer).try_init().is_ok()
        }
        config::LogFormat::Text => builder.try_init().is_ok(),
    };
}

/// The span that gives the log lines made inside a call its trace: enter it (or instrument the
/// call's future with it). At `error` level, so every filter keeps it: a span the filter drops
/// could not give its ids to the warnings inside it.
pub fn call_span(trace_id: &[u8; 16], span_id: &[u8; 8]) -> tracing::Span {
    tracing::error_span!(
        CALL_SPAN,
        trace_id = %Hex(trace_id),
        span_id = %Hex(span_id),
    )
}

/// Bytes as lowercase hex, as W3C trace context writes ids.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// One flat JSON object per event.
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let mut now = String::new();
        tracing_subscriber::fmt::time::FormatTime::format_time(
            &tracing_subscriber::fmt::time::SystemTime,
            &mut Writer::new(&mut now),
        )?;
        line.insert("timestamp".into(), now.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        // the innermost traced call's ids, kept by `CallIdsLayer` when its span was made
        let scope = ctx.event_scope().into_iter().flat_map(|scope| scope.from_root());
        let innermost = scope.filter_map(|span| span.extensions().get::<CallIds>().cloned()).last();
        if let Some(CallIds { trace_id, span_id }) = innermost {
            line.insert("trace_id".into(), trace_id.into());
            line.insert("span_id".into(), span_id.into());
        }
        event.record(&mut Fields(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// A traced call's ids, in its span's extensions.
#[derive(Debug, Clone)]
struct CallIds {
    trace_id: String,
    span_id: String,
}

/// Keeps each traced call's ids in its span, for [`FlatJson`] to write on every line inside.
struct CallIdsLayer;

impl<S> tracing_subscriber::Layer<S> for CallIdsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != CALL_SPAN {
            return;
        }
        let mut fields = Map::new();
        attrs.record(&mut Fields(&mut fields));
        let text = |key: &str| fields.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
        let ids = CallIds { trace_id: text("trace_id"), span_id: text("span_id") };
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(ids);
        }
    }
}

/// An event's fields into the line's map, `message` among them.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_is_one_flat_object_with_the_calls_ids_inside_a_traced_call() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(FlatJson)
            .with_writer(move || writer.clone())
            .finish()
            .with(CallIdsLayer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(queue = "orders", n = 3, "outside");
            let span = call_span(&[0x4b; 16], &[0x0f; 8]);
            let _entered = span.enter();
            tracing::warn!(endpoint = "10.0.0.7:80", "inside");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "outside");
        assert_eq!(lines[0]["queue"], "orders");
        assert_eq!(lines[0]["n"], 3);
        assert_eq!(lines[0]["level"], "INFO");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        assert_eq!(lines[1]["endpoint"], "10.0.0.7:80");
        assert_eq!(lines[1]["trace_id"], "4b".repeat(16));
        assert_eq!(lines[1]["span_id"], "0f".repeat(8));
    }

    #[test]
    fn ids_are_lowercase_hex() {
        assert_eq!(Hex(&[0x0a, 0xff]).to_string(), "0aff");
    }
}
