//! gRPC through the real binary (DESIGN.md, "gRPC"): h2c in, h2c out, against a scripted gRPC
//! upstream; the outcome of a call is its grpc-status, and every answer of ours is a gRPC one.
//! The last tests go through grpcio, a gRPC client nobody here wrote.

use std::path::PathBuf;
use std::process::Command;

use outrigger_tests::{
    GrpcReply, GrpcUpstream, RefusingPort, Sidecar, frame, grpc_bidi, grpc_call,
};

const OK: u32 = 0;
const INVALID_ARGUMENT: u32 = 3;
const NOT_FOUND: u32 = 5;
const RESOURCE_EXHAUSTED: u32 = 8;
const UNIMPLEMENTED: u32 = 12;
const UNAVAILABLE: u32 = 14;

const METHOD: &str = "/pkg.Svc/Method";

/// `up` as upstream `payments` (h2 in, h2 out), with `policies` at the upstream's indentation.
fn payments(up: &GrpcUpstream, policies: &str) -> String {
    endpoints(&[up], policies)
}

/// `ups` as the endpoints of upstream `payments`.
fn endpoints(ups: &[&GrpcUpstream], policies: &str) -> String {
    let list: Vec<String> = ups.iter().map(|up| format!("\"{}\"", up.addr())).collect();
    let mut yaml = format!(
        "upstreams:\n  payments:\n    discovery: {{ static: [{}] }}\n    protocol: auto\n",
        list.join(", ")
    );
    for line in policies.lines() {
        yaml.push_str("    ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml
}

const RETRY_UNAVAILABLE: &str = "retry: { max_attempts: 3, on: [unavailable], backoff: { initial: 10ms, max: 50ms, jitter: none } }";

async fn metrics(sidecar: &Sidecar) -> String {
    sidecar.admin("/metrics").await.1
}

#[tokio::test]
async fn unavailable_twice_then_ok_is_ok_after_three_calls_with_the_same_message() {
    use GrpcReply::Status;
    let up = GrpcUpstream::scripted([Status(UNAVAILABLE), Status(UNAVAILABLE), Status(OK)]).await;
    let sidecar = Sidecar::start(&payments(&up, RETRY_UNAVAILABLE)).await;

    let res = grpc_call(sidecar.outbound, "payments", METHOD, b"charge 10").await;

    assert_eq!((res.http_status, res.status()), (200, OK));
    assert_eq!(res.header("outrigger-attempts"), Some("3"));
    assert_eq!(res.header("outrigger-error"), None, "the upstream's answer");
    let calls = up.seen();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c.body == frame(b"charge 10") && c.path == METHOD), "{calls:?}");
    let text = metrics(&sidecar).await;
    assert!(
        text.contains(r#"outrigger_grpc_responses_total{grpc_status="ok",route="(default)",upstream="payments"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_bidirectional_stream_is_not_held_back_by_the_retry_buffer() {
    let up = GrpcUpstream::scripted([GrpcReply::Bidi]).await;
    let sidecar = Sidecar::start(&payments(&up, RETRY_UNAVAILABLE)).await;

    let call = grpc_bidi(sidecar.outbound, "payments", METHOD, b"first", b"second");
    let res = tokio::time::timeout(std::time::Duration::from_secs(5), call)
        .await
        .expect("the call streams: its first message was not held back until its end");

    assert_eq!((res.http_status, res.status()), (200, OK));
    assert_eq!(res.body, frame(b"ready"));
    assert_eq!(up.seen()[0].body, frame(b"first"));
    let text = metrics(&sidecar).await;
    assert!(
        text.contains(r#"outrigger_grpc_responses_total{grpc_status="ok",route="(default)",upstream="payments"} 1"#),
        "the status in the stream's trailers is counted as they pass: {text}"
    );
}

#[tokio::test]
async fn a_call_whose_connection_was_refused_is_retried_with_its_whole_message() {
    let refusing = RefusingPort::new();
    let up = GrpcUpstream::scripted([GrpcReply::Message(OK)]).await;
    let yaml = payments(&up, "load_balancer: round_robin\nretry: { max_attempts: 2, on: [connect-failure, unavailable], backoff: { initial: 10ms, max: 50ms, jitter: none } }")
        .replace(&format!("[\"{}\"]", up.addr()), &format!("[\"{}\", \"{}\"]", refusing.addr(), up.addr()));
    let sidecar = Sidecar::start(&yaml).await;

    for n in 0..4 {
        let message = format!("call {n}");
        let res = grpc_call(sidecar.outbound, "payments", METHOD, message.as_bytes()).await;
        assert_eq!((res.status(), res.body.clone()), (OK, frame(message.as_bytes())), "{n}");
    }

    assert_eq!(up.calls(), 4);
    let text = metrics(&sidecar).await;
    assert!(!text.contains(r#"outrigger_retries_total{upstream="payments"} 0"#), "{text}");
    assert!(text.contains(r#"outrigger_retries_total{upstream="payments"}"#), "{text}");
}

#[tokio::test]
async fn invalid_argument_is_not_retried() {
    let up =
        GrpcUpstream::scripted([GrpcReply::Status(INVALID_ARGUMENT), GrpcReply::Status(OK)]).await;
    let sidecar = Sidecar::start(&payments(
        &up,
        &RETRY_UNAVAILABLE.replace("[unavailable]", "[unavailable, internal]"),
    ))
    .await;

    let res = grpc_call(sidecar.outbound, "payments", METHOD, b"x").await;

    assert_eq!(res.status(), INVALID_ARGUMENT);
    assert_eq!(res.header("outrigger-attempts"), None);
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn a_status_in_trailers_after_a_message_is_not_retried_but_counted() {
    let up = GrpcUpstream::scripted([GrpcReply::Message(UNAVAILABLE), GrpcReply::Status(OK)]).await;
    let sidecar = Sidecar::start(&payments(&up, RETRY_UNAVAILABLE)).await;

    let res = grpc_call(sidecar.outbound, "payments", METHOD, b"streamed").await;

    assert_eq!(res.body, frame(b"streamed"), "the message reached the client");
    let trailers = res.trailers.as_ref().expect("trailers");
    assert_eq!(trailers["grpc-status"], "14");
    assert_eq!(res.status(), UNAVAILABLE);
    assert_eq!(up.calls(), 1, "messages reached the client: never retried");
    let text = metrics(&sidecar).await;
    assert!(
        text.contains(r#"outrigger_grpc_responses_total{grpc_status="unavailable",route="(default)",upstream="payments"} 1"#),
        "{text}"
    );
}

const BREAKER: &str =
    "circuit_breaker: { consecutive_failures: 2, min_requests: 100, open_for: 30s }";

#[tokio::test]
async fn the_breaker_opens_on_unavailable_and_answers_grpc_unavailable_circuit_open() {
    let up = GrpcUpstream::scripted([GrpcReply::Status(UNAVAILABLE)]).await;
    let sidecar = Sidecar::start(&payments(&up, BREAKER)).await;

    for _ in 0..2 {
        let res = grpc_call(sidecar.outbound, "payments", METHOD, b"x").await;
        assert_eq!((res.status(), res.header("outrigger-error")), (UNAVAILABLE, None));
    }
    let res = grpc_call(sidecar.outbound, "payments", METHOD, b"x").await;

    assert_eq!(res.http_status, 200, "a gRPC answer, not HTTP 503");
    assert_eq!(res.header("content-type"), Some("application/grpc"));
    assert_eq!(res.status(), UNAVAILABLE);
    assert_eq!(res.header("outrigger-error"), Some("circuit-open"));
    assert_eq!(res.header("grpc-message"), Some("circuit open for upstream payments"));
    assert!(res.trailers.is_none() && res.body.is_empty(), "trailers-only");
    assert_eq!(up.calls(), 2, "the open breaker forwarded nothing");
}

#[tokio::test]
async fn the_breaker_counts_a_failure_status_that_comes_in_trailers() {
    let up = GrpcUpstream::scripted([GrpcReply::Message(UNAVAILABLE)]).await;
    let sidecar = Sidecar::start(&payments(&up, BREAKER)).await;

    for _ in 0..2 {
        let res = grpc_call(sidecar.outbound, "payments", METHOD, b"x").await;
        assert_eq!(res.status(), UNAVAILABLE);
    }
    let res = grpc_call(sidecar.outbound, "payments", METHOD, b"x").await;

    assert_eq!(res.header("outrigger-error"), Some("circuit-open"));
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn a_stream_that_ends_without_any_status_is_a_failure() {
    let up = GrpcUpstream::scripted([GrpcReply::NoStatus]).await;
    let sidecar = Sidecar::start(&payments(&up, BREAKER)).await;

    for _ in 0..2 {
        let res = grpc_call(sidecar.outbound, "payments", METHOD, b"x").await;
        assert_eq!((res.body.clone(), res.trailers.is_none()), (frame(b"x"), true));
    }
    let res = grpc_call(sidecar.outbound, "payments", METHOD, b"x").await;

    assert_eq!(res.header("outrigger-error"), Some("circuit-open"));
    assert_eq!(up.calls(), 2);
    let text = metrics(&sidecar).await;
    assert!(
        text.contains(r#"grpc_status="unknown",route="(default)",upstream="payments"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn not_found_does_not_trip_the_breaker() {
    let up = GrpcUpstream::scripted([GrpcReply::Status(NOT_FOUND)]).await;
    let sidecar = Sidecar::start(&payments(&up, BREAKER)).await;

    for _ in 0..5 {
        let res = grpc_call(sidecar.outbound, "payments", METHOD, b"x").await;
        assert_eq!((res.status(), res.header("outrigger-error")), (NOT_FOUND, None));
    }
    assert_eq!(up.calls(), 5);
    let text = metrics(&sidecar).await;
    assert!(text.contains(r#"outrigger_circuit_state{upstream="payments"} 0"#), "{text}");
}

#[tokio::test]
async fn outlier_detection_ejects_an_endpoint_answering_unavailable_in_the_head_or_in_trailers() {
    for failing in [GrpcReply::Status(UNAVAILABLE), GrpcReply::Message(UNAVAILABLE)] {
        let good = GrpcUpstream::scripted([GrpcReply::Message(OK)]).await;
        let bad = GrpcUpstream::scripted([failing]).await;
        let policies = "load_balancer: round_robin\noutlier_detection: { consecutive_failures: 2, base_ejection: 30s, max_ejected_percent: 50 }";
        let sidecar = Sidecar::start(&endpoints(&[&good, &bad], policies)).await;

        for _ in 0..20 {
            grpc_call(sidecar.outbound, "payments", METHOD, b"x").await;
        }

        assert_eq!(bad.calls(), 2, "{failing:?}: ejected after its second failure in a row");
        assert_eq!(good.calls(), 18, "{failing:?}");
    }
}

#[tokio::test]
async fn an_unknown_authority_is_unimplemented() {
    let up = GrpcUpstream::scripted([GrpcReply::Status(OK)]).await;
    let sidecar = Sidecar::start(&payments(&up, "")).await;

    let res = grpc_call(sidecar.outbound, "nowhere", METHOD, b"x").await;

    assert_eq!((res.http_status, res.status()), (200, UNIMPLEMENTED));
    assert_eq!(res.header("outrigger-error"), Some("unknown-upstream"));
    assert_eq!(res.header("grpc-message"), Some(r#"no upstream is configured for "nowhere""#));
    assert_eq!(up.calls(), 0);
}

#[tokio::test]
async fn the_rate_limit_is_resource_exhausted() {
    let up = GrpcUpstream::scripted([GrpcReply::Status(OK)]).await;
    let sidecar =
        Sidecar::start(&payments(&up, "rate_limit: { requests_per_second: 1, burst: 1 }")).await;

    assert_eq!(grpc_call(sidecar.outbound, "payments", METHOD, b"x").await.status(), OK);
    let res = grpc_call(sidecar.outbound, "payments", METHOD, b"x").await;

    assert_eq!((res.http_status, res.status()), (200, RESOURCE_EXHAUSTED));
    assert_eq!(res.header("outrigger-error"), Some("rate-limited"));
    assert!(res.header("retry-after").is_some());
    assert_eq!(up.calls(), 1);
}

/// What grpcio saw of one call.
#[derive(Debug)]
struct Grpcio(serde_json::Value);

/// The venv's Python, with grpcio (installed by `scripts/test`); `$OUTRIGGER_PYTHON` names another.
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("OUTRIGGER_PYTHON") {
        return path.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let path = PathBuf::from(home).join(".cache/outrigger-tools/venv/bin/python");
    assert!(path.exists(), "{} is missing: run scripts/test, which installs it", path.display());
    path
}

/// One unary call through grpcio to `authority` via the sidecar.
async fn grpcio_call(sidecar: &Sidecar, authority: &str, message: &str) -> Grpcio {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/grpc_client.py");
    let mut cmd = Command::new(python());
    cmd.arg(script).arg(sidecar.outbound.to_string()).args([authority, METHOD, message]);
    // a blocking wait off the runtime: the sidecar and the upstream live on it
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().expect("run python");
    assert!(out.status.success(), "grpcio client: {}", String::from_utf8_lossy(&out.stderr));
    Grpcio(serde_json::from_slice(&out.stdout).expect("one JSON line"))
}

#[tokio::test]
async fn grpcio_gets_the_reply_after_retries_and_our_answers_as_real_statuses() {
    use GrpcReply::{Message, Status};
    let up = GrpcUpstream::scripted([Status(UNAVAILABLE), Message(OK), Status(UNAVAILABLE)]).await;
    let sidecar = Sidecar::start(&payments(&up, &format!("{RETRY_UNAVAILABLE}\n{BREAKER}"))).await;

    let ok = grpcio_call(&sidecar, "payments", "hello").await.0;
    assert_eq!(ok["code"], "OK", "{ok}");
    assert_eq!(ok["reply"], "hello", "the upstream echoes the message");
    assert_eq!(ok["initial"]["outrigger-attempts"], "2", "{ok}");

    let unknown = grpcio_call(&sidecar, "nowhere", "x").await.0;
    assert_eq!(unknown["code"], "UNIMPLEMENTED", "{unknown}");
    assert_eq!(unknown["details"], r#"no upstream is configured for "nowhere""#);
    // grpcio reports a trailers-only head's headers as trailing metadata
    assert_eq!(unknown["trailing"]["outrigger-error"], "unknown-upstream", "{unknown}");

    // every attempt UNAVAILABLE from now: the retries end with the upstream's own answer,
    // and the breaker, having seen that failure and another, answers for itself
    let spent = grpcio_call(&sidecar, "payments", "x").await.0;
    assert_eq!(spent["code"], "UNAVAILABLE", "{spent}");
    let _ = grpcio_call(&sidecar, "payments", "x").await;
    let open = grpcio_call(&sidecar, "payments", "x").await.0;
    assert_eq!(open["code"], "UNAVAILABLE", "{open}");
    assert_eq!(open["details"], "circuit open for upstream payments");
    assert_eq!(open["trailing"]["outrigger-error"], "circuit-open", "{open}");
}
