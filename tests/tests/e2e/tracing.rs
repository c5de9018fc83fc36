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
    traced_call(&sidecar, "/charge").await;

    // HTTP client spans are named by their method: the call, then each attempt under it
    let spans = span_named(&receiver, "GET", 3).await;
    let call =
        spans.iter().find(|s| s.parent_span_id == APP_SPAN).expect("the call's span").clone();
    assert_eq!(call.trace_id, APP_TRACE);
    assert_eq!(call.service, "checkout");
    assert_eq!(call.kind, 3, "a client span");
    assert_eq!(call.attribute("http.request.method"), Some("GET"));
    assert_eq!(call.attribute("url.full"), Some("http://payments/charge"));
    assert_eq!(call.attribute("server.address"), Some("payments"));
    assert_eq!(call.attribute("server.port"), Some("80"));
    assert_eq!(call.attribute("http.response.status_code"), Some("200"));
    assert_eq!(call.attribute("error.type"), None, "it ended well");
    assert_eq!(call.attribute("outrigger.route"), Some("charge"));
    let mut attempts: Vec<ReceivedSpan> =
        spans.into_iter().filter(|s| s.parent_span_id == call.span_id).collect();
    attempts.sort_by_key(|a| a.attribute("outrigger.attempt").map(str::to_owned));
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|a| a.trace_id == APP_TRACE && a.kind == 3));
    let statuses: Vec<Option<&str>> =
        attempts.iter().map(|a| a.attribute("http.response.status_code")).collect();
    assert_eq!(statuses, [Some("503"), Some("200")]);
    let ip = upstream.addr().ip().to_string();
    let port = upstream.addr().port().to_string();
    for attempt in &attempts {
        assert_eq!(attempt.attribute("server.address"), Some(ip.as_str()));
        assert_eq!(attempt.attribute("server.port"), Some(port.as_str()));
        assert_eq!(attempt.attribute("network.peer.address"), Some(ip.as_str()));
    }
    assert_eq!(attempts[0].attribute("http.request.resend_count"), None, "the first is no resend");
    assert_eq!(attempts[1].attribute("http.request.resend_count"), Some("1"));
    assert_eq!(attempts[0].attribute("error.type"), Some("503"), "few values: the status");
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
    let tracestate = [("traceparent", traceparent()), ("tracestate", "vendor=opaque-7".into())];
    let headers: Vec<(&str, &str)> = tracestate.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let id = publish(&sidecar, "orders", r#"{"n":1}"#, &headers).await;

    let delivered = deliveries(&app, 1).await.remove(0);
    let (trace, parent) = ids(header(&delivered, "traceparent"));
    assert_eq!(trace, APP_TRACE, "the handler continues the publisher's trace");
    assert_eq!(header(&delivered, "tracestate"), "vendor=opaque-7", "tracestate crosses the queue");
    let publish_span = span_named(&receiver, "send", 1).await.remove(0);
    let deliver_span = span_named(&receiver, "process", 1).await.remove(0);
    assert_eq!((publish_span.kind, deliver_span.kind), (4, 5), "a producer, then a consumer");
    for (span, operation) in [(&publish_span, "send"), (&deliver_span, "process")] {
        assert_eq!(span.attribute("messaging.system"), Some("outrigger"));
        assert_eq!(span.attribute("messaging.operation.type"), Some(operation));
        assert_eq!(span.attribute("messaging.destination.name"), Some("orders"));
        assert_eq!(span.attribute("messaging.message.id"), Some(id.as_str()));
    }
    assert_eq!(deliver_span.attribute("messaging.consumer.group.name"), Some("shop"));
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

/// The sidecar's log as JSON objects, one per line; panics on a line that is not one.
fn json_lines(sidecar: &Sidecar) -> Vec<serde_json::Value> {
    let log = sidecar.log();
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn json_logs_are_flat_and_a_traced_calls_lines_carry_its_trace_and_the_access_log_one_line() {
    use outrigger_tests::Reply;
    let up = Upstream::scripted([Reply::Status(503), Reply::Status(200)]).await;
    // nothing listens at `nowhere`: the answer is Outrigger's own, logged inside the call
    let yaml = format!(
        "{}    retry: {{ max_attempts: 2, backoff: {{ initial: 10ms, max: 10ms, jitter: none }} }}\n  \
         nowhere:\n    discovery: {{ static: [\"127.0.0.1:{}\"] }}\n\
         telemetry:\n  log: {{ format: json, level: debug }}\n  access_log: true\n",
        up.yaml("payments"),
        outrigger_tests::free_port()
    );
    let sidecar = Sidecar::start(&yaml).await;
    let traced = |host: &str, path: &str| {
        Request::get(path)
            .header("host", host)
            .header("traceparent", traceparent())
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(sidecar.send(traced("payments", "/orders/7")).await.status(), 200);
    assert_eq!(sidecar.send(traced("nowhere", "/refused")).await.status(), 502);
    // a call nobody traced: its lines carry no span of a traced call
    let _ = sidecar.get("payments", "/untraced").await;

    let lines = wait_until(DEADLINE, "three access lines", || async {
        let lines = json_lines(&sidecar);
        (lines.iter().filter(|l| l["target"] == "outrigger::access").count() >= 3).then_some(lines)
    })
    .await;
    for line in &lines {
        assert!(line["timestamp"].is_string() && line["level"].is_string(), "{line}");
        assert!(line.get("fields").is_none() && line.get("span").is_none(), "flat: {line}");
    }
    let access = |path: &str| {
        let found = lines.iter().find(|l| l["target"] == "outrigger::access" && l["path"] == path);
        found.unwrap_or_else(|| panic!("the access line of {path}: {lines:#?}")).clone()
    };
    let ok = access("/orders/7");
    assert_eq!(ok["upstream"], "payments");
    assert_eq!(ok["route"], "(default)");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["attempts"], 2, "the 503, then the 200");
    assert_eq!(ok["kind"], "", "the upstream answered");
    assert_eq!(ok["trace_id"], APP_TRACE, "the app's trace");
    assert_eq!(ok["span_id"].as_str().map(str::len), Some(16), "inside the traced call: {ok}");
    assert!(ok["duration_ms"].as_f64().is_some_and(|ms| ms > 0.0 && ms < 5_000.0));
    let refused = access("/refused");
    assert_eq!(
        (refused["status"].as_u64(), refused["kind"].as_str()),
        (Some(502), Some("connect-failed"))
    );
    let untraced = access("/untraced");
    assert_eq!(untraced["trace_id"].as_str().map(str::len), Some(32), "a trace of its own");
    assert!(untraced.get("span_id").is_none(), "not a traced call: {untraced}");

    // inside the traced call, Outrigger's own lines carry its ids
    let inside = lines.iter().find(|l| {
        l["target"] != "outrigger::access" && l["message"] == "answering for the upstream"
    });
    let inside = inside.unwrap_or_else(|| panic!("the refusal's debug line: {lines:#?}"));
    assert_eq!(inside["trace_id"], APP_TRACE, "{inside}");
    assert_eq!(inside["kind"], "connect-failed");
}

#[tokio::test]
async fn without_access_log_no_access_line_is_written() {
    let up = Upstream::status(200).await;
    let yaml = format!("{}telemetry:\n  log: {{ format: json }}\n", up.yaml("payments"));
    let sidecar = Sidecar::start(&yaml).await;
    assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    let lines = json_lines(&sidecar);
    assert!(!lines.is_empty(), "the startup lines");
    assert!(lines.iter().all(|l| l["target"] != "outrigger::access"), "{lines:#?}");
}

#[tokio::test]
async fn a_traced_messages_delivery_log_lines_carry_its_trace() {
    use outrigger_tests::Reply;
    let app = Upstream::scripted([Reply::Status(500), Reply::Status(200)]).await;
    let yaml = format!(
        "service:\n  name: shop\n  app: {{ url: \"http://{}\" }}\nmessaging:\n  data_dir: \"$SCRATCH/data\"\n  \
         subscriptions: [ {{ queue: orders, path: /events, backoff: {{ initial: 10ms, jitter: none }} }} ]\n\
         telemetry:\n  log: {{ format: json }}\n",
        app.addr()
    );
    let sidecar = Sidecar::start(&yaml).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[("traceparent", &traceparent())]).await;
    deliveries(&app, 2).await;

    let retry = wait_until(DEADLINE, "the retry's log line", || async {
        let lines = json_lines(&sidecar);
        lines.into_iter().find(|l| l["message"] == "delivery failed; retrying after the backoff")
    })
    .await;
    assert_eq!(retry["trace_id"], APP_TRACE, "{retry}");
    assert_eq!(retry["queue"], "orders");
}

/// One call to `payments` at `path` with the app's trace, answered 200.
async fn traced_call(sidecar: &Sidecar, path: &str) {
    let req = Request::get(path)
        .header("host", "payments")
        .header("traceparent", traceparent())
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sidecar.send(req).await.status(), 200);
}

#[tokio::test]
async fn spans_reach_an_https_collector_trusting_ca_file_with_the_yaml_headers_over_the_variables()
{
    let pki = outrigger_tests::Pki::new();
    let receiver = OtlpReceiver::start_tls(&pki).await;
    let up = Upstream::status(200).await;
    let yaml = format!(
        "service: {{ name: checkout }}\n{}telemetry:\n  tracing:\n    otlp_endpoint: \"{}\"\n    \
         ca_file: \"{}\"\n    headers: {{ authorization: \"Bearer from-yaml\" }}\n",
        up.yaml("payments"),
        receiver.endpoint(),
        pki.ca_file.display()
    );
    let env = [("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20from-env,x-tenant=shop")];
    let sidecar = Sidecar::start_with_env(&yaml, &env).await;
    traced_call(&sidecar, "/").await;

    let spans = span_named(&receiver, "GET", 1).await;
    assert_eq!(spans[0].trace_id, APP_TRACE);
    let headers = &receiver.requests()[0];
    assert_eq!(headers["authorization"], "Bearer from-yaml", "the YAML wins");
    assert_eq!(headers["x-tenant"], "shop", "the variable's other headers are sent");
    assert_eq!(headers["content-type"], "application/x-protobuf");
    exported_as_received(&sidecar, &receiver).await;
}

/// A `checkout` sidecar exporting every span to `receiver`; its `payments` upstream (kept
/// alive by the caller) answers 200.
async fn exporting_to(receiver: &OtlpReceiver) -> (Sidecar, Upstream) {
    let up = Upstream::status(200).await;
    let yaml =
        format!("service: {{ name: checkout }}\n{}{}", up.yaml("payments"), tracing_yaml(receiver));
    (Sidecar::start(&yaml).await, up)
}

/// `outrigger_spans_exported_total` comes to what the receiver got (the call and its attempt).
async fn exported_as_received(sidecar: &Sidecar, receiver: &OtlpReceiver) {
    let received = receiver.spans().len() as f64;
    assert!(received >= 2.0, "the call's span and its attempt's: {:?}", receiver.spans());
    crate::delivery::wait_metric(sidecar, "outrigger_spans_exported_total", received).await;
}

#[tokio::test]
async fn a_collector_trusted_by_nothing_configured_gets_no_spans_and_they_are_counted() {
    let pki = outrigger_tests::Pki::new();
    let receiver = OtlpReceiver::start_tls(&pki).await;
    let up = Upstream::status(200).await;
    // the system's roots do not include the test CA
    let yaml = format!(
        "service: {{ name: checkout }}\n{}telemetry:\n  tracing: {{ otlp_endpoint: \"{}\" }}\n",
        up.yaml("payments"),
        receiver.endpoint()
    );
    let sidecar = Sidecar::start(&yaml).await;
    traced_call(&sidecar, "/").await;
    let dropped = r#"outrigger_spans_dropped_total{reason="export_failed"}"#;
    wait_until(std::time::Duration::from_secs(20), "the failed export to be counted", || async {
        (crate::messaging::metric(&sidecar, dropped).await >= Some(1.0)).then_some(())
    })
    .await;
    assert!(receiver.spans().is_empty());
    let log = sidecar.log();
    let warning = log.lines().find(|l| l.contains("exporting spans failed")).expect("a warning");
    assert!(warning.contains("certificate"), "it names the certificate problem: {warning}");
}

#[tokio::test]
async fn the_otel_variables_alone_turn_export_on_and_name_the_service_and_resource() {
    let receiver = OtlpReceiver::start().await;
    let up = Upstream::status(200).await;
    let yaml = format!("service: {{ name: checkout }}\n{}", up.yaml("payments"));
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        ("OTEL_SERVICE_NAME", "checkout-sidecar".to_owned()),
        // OTEL_SERVICE_NAME wins over a service.name among the attributes
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.name=other,deployment.environment=staging,k8s.pod.name=checkout-0".to_owned(),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sidecar = Sidecar::start_with_env(&yaml, &env).await;
    traced_call(&sidecar, "/").await;

    let span = span_named(&receiver, "GET", 1).await.remove(0);
    assert_eq!(span.service, "checkout-sidecar");
    assert_eq!(span.resource_attribute("deployment.environment"), Some("staging"));
    assert_eq!(span.resource_attribute("k8s.pod.name"), Some("checkout-0"));
    assert_eq!(span.resource_attribute("telemetry.sdk.name"), Some("opentelemetry"));
}

#[tokio::test]
async fn an_export_answered_503_or_429_is_sent_again_and_the_spans_arrive() {
    let receiver = OtlpReceiver::start().await;
    receiver.refuse(1, 503, None);
    receiver.refuse(1, 429, Some("1"));
    let (sidecar, _up) = exporting_to(&receiver).await;
    traced_call(&sidecar, "/").await;

    span_named(&receiver, "GET", 2).await;
    let ids: std::collections::HashSet<String> =
        receiver.spans().into_iter().map(|s| s.span_id).collect();
    assert_eq!(ids.len(), receiver.spans().len(), "each span once: {:?}", receiver.spans());
    assert_eq!(receiver.requests().len(), 3, "503, 429, then 200");
    exported_as_received(&sidecar, &receiver).await;
    let dropped = r#"outrigger_spans_dropped_total{reason="export_failed"}"#;
    assert_eq!(crate::messaging::metric(&sidecar, dropped).await, Some(0.0));
}

#[tokio::test]
async fn a_call_the_app_gives_up_on_is_counted_logged_and_traced_as_cancelled() {
    use outrigger_tests::Reply;
    use tokio::io::AsyncWriteExt;
    let receiver = OtlpReceiver::start().await;
    let up = Upstream::scripted([Reply::Delayed(std::time::Duration::from_secs(30), 200)]).await;
    let yaml = format!(
        "service: {{ name: checkout }}\n{}{}  log: {{ format: json }}\n  access_log: true\n",
        up.yaml("payments"),
        tracing_yaml(&receiver)
    );
    let sidecar = Sidecar::start(&yaml).await;
    // the app sends its call, and goes away while the upstream is still answering
    let mut app = tokio::net::TcpStream::connect(sidecar.outbound).await.unwrap();
    let request =
        format!("GET /slow HTTP/1.1\r\nhost: payments\r\ntraceparent: {}\r\n\r\n", traceparent());
    app.write_all(request.as_bytes()).await.unwrap();
    wait_until(DEADLINE, "the upstream to hold the call", || async {
        (up.requests() == 1).then_some(())
    })
    .await;
    drop(app);
    wait_until(DEADLINE, "the upstream's request to be cancelled", || async {
        (up.cancelled() == 1).then_some(())
    })
    .await;

    // counted as 499, the status of a request its client closed
    crate::delivery::wait_metric(
        &sidecar,
        r#"outrigger_requests_total{code="499",route="(default)",upstream="payments"}"#,
        1.0,
    )
    .await;
    // one access line, cancelled
    let line = wait_until(DEADLINE, "the cancelled call's access line", || async {
        json_lines(&sidecar).into_iter().find(|l| l["target"] == "outrigger::access")
    })
    .await;
    assert_eq!((line["status"].as_u64(), line["kind"].as_str()), (Some(499), Some("cancelled")));
    assert_eq!(
        (line["path"].as_str(), line["trace_id"].as_str()),
        (Some("/slow"), Some(APP_TRACE))
    );
    // the call's span and its attempt's both end, marked cancelled, in the app's trace
    let spans = span_named(&receiver, "GET", 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for span in &spans {
        assert_eq!(span.trace_id, APP_TRACE);
        assert!(span.attributes.contains(&("error.type".into(), "cancelled".into())), "{span:#?}");
        assert!(span.attributes.iter().all(|(k, _)| k != "http.response.status_code"), "{span:#?}");
    }
    let call = spans.iter().find(|s| s.parent_span_id == APP_SPAN).expect("the call's span");
    assert!(spans.iter().any(|s| s.parent_span_id == call.span_id), "the attempt under it");
}

#[tokio::test]
async fn spans_still_queued_at_shutdown_are_exported_before_the_sidecar_exits() {
    let receiver = OtlpReceiver::start().await;
    // the first export is put off for 2 s: past the moment the drain would have ended
    receiver.refuse(1, 503, Some("2"));
    let (sidecar, _up) = exporting_to(&receiver).await;
    traced_call(&sidecar, "/last").await;
    let status = sidecar.terminate().await;
    assert!(status.success(), "{status:?}");
    // exited: whatever the receiver has now, it got before the exit
    let names: Vec<String> = receiver.spans().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["GET", "GET"], "the call's span and its attempt's");
    assert_eq!(receiver.requests().len(), 2, "the 503, then the retry that took them");
}

#[tokio::test]
async fn an_attempt_cut_by_its_per_try_timeout_is_traced_as_a_timeout_not_a_cancel() {
    use outrigger_tests::Reply;
    let receiver = OtlpReceiver::start().await;
    let slow = Reply::Delayed(std::time::Duration::from_secs(5), 200);
    let up = Upstream::scripted([slow, Reply::Status(200)]).await;
    let yaml = format!(
        "service: {{ name: checkout }}\n{}    timeouts: {{ per_try: 200ms }}\n    \
         retry: {{ max_attempts: 2, on: [timeout], backoff: {{ initial: 10ms, max: 10ms }} }}\n{}",
        up.yaml("payments"),
        tracing_yaml(&receiver)
    );
    let sidecar = Sidecar::start(&yaml).await;
    traced_call(&sidecar, "/").await;

    let spans = span_named(&receiver, "GET", 3).await;
    let attempt = |n: &str| {
        let found = spans.iter().find(|s| s.attribute("outrigger.attempt") == Some(n));
        found.unwrap_or_else(|| panic!("attempt {n}: {spans:#?}")).clone()
    };
    let cut = attempt("1");
    assert_eq!(cut.attribute("error.type"), Some("timeout"), "{cut:#?}");
    assert_eq!(cut.status, 2, "an error: {cut:#?}");
    assert_eq!(attempt("2").attribute("http.response.status_code"), Some("200"));
}
