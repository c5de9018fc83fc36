//! W3C Trace Context and OTLP: a `traceparent` from the app is continued through a proxied
//! call and through a queue, a trace is started when there is none, and the spans arrive at an
//! OTLP receiver with the right trace and parent ids.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use outrigger_tests::{DEADLINE, OtlpReceiver, ReceivedSpan, Sidecar, Upstream, wait_until};

use crate::delivery::{deliveries, header, publish};

const APP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{APP_TRACE}-{APP_SPAN}-01")
}

fn tracing_yaml(receiver: &OtlpReceiver) -> String {
    format!(
        "telemetry:\n  tracing: {{ otlp_endpoint: \"{}\", sample_ratio: 1.0 }}\n",
        receiver.endpoint()
    )
}

/// `00-TRACE-SPAN-FLAGS` -> (trace, span).
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_owned(), parts[2].to_owned())
}

async fn span_named(receiver: &OtlpReceiver, name: &str, n: usize) -> Vec<ReceivedSpan> {
    wait_until(DEADLINE, &format!("{n} {name} span(s) at the OTLP receiver"), || async {
        let spans: Vec<ReceivedSpan> =
            receiver.spans().into_iter().filter(|s| s.name == name).collect();
        (spans.len() >= n).then_some(spans)
    })
    .await
}

#[tokio::test]
async fn a_proxied_call_with_a_retry_continues_the_apps_trace_and_its_spans_reach_the_collector() {
    let receiver = OtlpReceiver::start().await;
    let upstream = Upstream::scripted([
        outrigger_tests::Reply::Status(503),
        outrigger_tests::Reply::Status(200),
    ])
    .await;
    let retry = "    retry: { max_attempts: 2, backoff: { initial: 10ms, max: 20ms } }\n";
    let route = "    routes:\n      - { name: charge, match: { path: /charge } }\n";
    let yaml = format!(
        "service: {{ name: checkout }}\n{}{retry}{route}{}",
        upstream.yaml("payments"),
        tracing_yaml(&receiver)
    );
    let sidecar = Sidecar::start(&yaml).await;
    let req = Request::get("/charge")
        .header("host", "payments")
        .header("traceparent", traceparent())
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sidecar.send(req).await.status(), 200);

    let call = span_named(&receiver, "outbound", 1).await.remove(0);
    assert_eq!((call.trace_id.as_str(), call.parent_span_id.as_str()), (APP_TRACE, APP_SPAN));
    assert_eq!(call.service, "checkout");
    assert_eq!(call.attribute("server.address"), Some("payments"));
    assert_eq!(call.attribute("http.response.status_code"), Some("200"));
    assert_eq!(call.attribute("outrigger.route"), Some("charge"));
    let attempts = span_named(&receiver, "attempt", 2).await;
    assert!(attempts.iter().all(|a| a.trace_id == APP_TRACE && a.parent_span_id == call.span_id));
    let statuses: Vec<Option<&str>> =
        attempts.iter().map(|a| a.attribute("http.response.status_code")).collect();
    assert_eq!(statuses, [Some("503"), Some("200")]);
    assert_eq!(attempts[0].attribute("server.address"), Some(upstream.addr().to_string().as_str()));
    assert_eq!(
        (attempts[0].attribute("outrigger.attempt"), attempts[1].attribute("outrigger.attempt")),
        (Some("1"), Some("2"))
    );
    assert_eq!(attempts[0].attribute("outrigger.backoff_ms"), Some("0"));
    let waited: u64 = attempts[1].attribute("outrigger.backoff_ms").unwrap().parse().unwrap();
    assert!(waited <= 20, "the second attempt waited its backoff: {waited} ms");
    // each request the upstream saw continues the trace under its own attempt's span
    for (seen, attempt) in upstream.seen().iter().zip(&attempts) {
        let (trace, parent) = ids(seen.headers["traceparent"].to_str().unwrap());
        assert_eq!((trace.as_str(), parent.as_str()), (APP_TRACE, attempt.span_id.as_str()));
    }
}

#[tokio::test]
async fn a_trace_is_started_when_the_app_sends_none() {
    let upstream = Upstream::status(200).await;
    let sidecar = Sidecar::start(&upstream.yaml("payments")).await; // no exporter at all
    assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    let traceparent = upstream.seen()[0].headers["traceparent"].to_str().unwrap().to_owned();
    let (trace, span) = ids(&traceparent);
    assert_eq!((trace.len(), span.len()), (32, 16), "{traceparent}");
    assert!(traceparent.ends_with("-00"), "not sampled without an exporter: {traceparent}");
}

#[tokio::test]
async fn a_trace_crosses_the_queue_from_publish_to_delivery() {
    let receiver = OtlpReceiver::start().await;
    let app = Upstream::status(200).await;
    let yaml = format!(
        "service:\n  name: shop\n  app: {{ url: \"http://{}\" }}\nmessaging:\n  data_dir: \"$SCRATCH/data\"\n  subscriptions: [ {{ queue: orders, path: /events }} ]\n{}",
        app.addr(),
        tracing_yaml(&receiver)
    );
    let sidecar = Sidecar::start(&yaml).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[("traceparent", &traceparent())]).await;

    let delivered = deliveries(&app, 1).await.remove(0);
    let (trace, parent) = ids(header(&delivered, "traceparent"));
    assert_eq!(trace, APP_TRACE, "the handler continues the publisher's trace");
    let publish_span = span_named(&receiver, "publish", 1).await.remove(0);
    let deliver_span = span_named(&receiver, "deliver", 1).await.remove(0);
    assert_eq!(
        (publish_span.trace_id.as_str(), publish_span.parent_span_id.as_str()),
        (APP_TRACE, APP_SPAN)
    );
    assert_eq!(deliver_span.trace_id, APP_TRACE);
    assert_eq!(deliver_span.parent_span_id, publish_span.span_id, "delivery under the publish");
    assert_eq!(deliver_span.span_id, parent, "the handler's parent is the delivery span");
    assert_eq!(deliver_span.attribute("messaging.delivery.attempt"), Some("1"));
    assert_eq!(publish_span.attribute("messaging.destination.name"), Some("orders"));
}
