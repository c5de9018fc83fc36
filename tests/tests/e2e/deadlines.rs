//! Deadlines (DESIGN.md, "Deadlines") through the real binary: `outrigger-timeout` and a gRPC
//! call's `grpc-timeout` shorten the call, never lengthen it, are refused when malformed, and
//! every attempt reaches the upstream with the time left.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrigger_tests::{Reply, Seen, Sidecar, Upstream};
use tokio::time::Instant;

/// `up` as upstream `payments`, with `request_timeout` and `policies` (YAML lines at the
/// upstream's indentation).
fn payments(up: &Upstream, request_timeout: &str, policies: &str) -> String {
    let mut yaml = up.yaml("payments");
    yaml.push_str(&format!("    timeouts: {{ request: {request_timeout} }}\n"));
    for line in policies.lines() {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml
}

fn get(timeout: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::get("/charge").header("host", "payments");
    if let Some(timeout) = timeout {
        req = req.header("outrigger-timeout", timeout);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

/// The `outrigger-timeout` an upstream request arrived with, in milliseconds.
fn time_left_ms(seen: &Seen) -> u64 {
    let value = seen.headers["outrigger-timeout"].to_str().unwrap();
    value.strip_suffix("ms").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{value:?}"))
}

/// A `grpc-timeout` value (gRPC's wire format), in nanoseconds.
fn grpc_timeout_nanos(value: &str) -> u128 {
    let (digits, unit) = value.split_at(value.len() - 1);
    assert!((1..=8).contains(&digits.len()), "{value:?}: 1 to 8 digits");
    let n: u128 = digits.parse().unwrap_or_else(|_| panic!("{value:?}"));
    let unit: u128 = match unit {
        "H" => 3_600_000_000_000,
        "M" => 60_000_000_000,
        "S" => 1_000_000_000,
        "m" => 1_000_000,
        "u" => 1_000,
        "n" => 1,
        _ => panic!("{value:?}: unknown unit"),
    };
    n * unit
}

fn assert_timeout(res: &Response<Bytes>) {
    assert_eq!(res.status(), 504, "{:?}", res.body());
    assert_eq!(res.headers()["outrigger-error"], "timeout");
}

#[tokio::test]
async fn outrigger_timeout_300ms_shortens_a_10s_request_timeout() {
    let up = Upstream::scripted([Reply::Delayed(Duration::from_secs(5), 200)]).await;
    let sidecar = Sidecar::start(&payments(&up, "10s", "")).await;

    let started = Instant::now();
    let res = sidecar.send(get(Some("300ms"))).await;
    let took = started.elapsed();

    assert_timeout(&res);
    assert!(took >= Duration::from_millis(300), "answered before the deadline: {took:?}");
    assert!(took < Duration::from_secs(2), "not at the 300 ms deadline: {took:?}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert!(time_left_ms(&seen[0]) <= 300, "the upstream is told at most what the client gave");
}

#[tokio::test]
async fn each_attempt_reaches_the_upstream_with_the_time_left_and_a_retry_with_less() {
    let up = Upstream::scripted([
        Reply::Delayed(Duration::from_millis(200), 503),
        Reply::Status(200),
        Reply::Status(200),
    ])
    .await;
    let retry = "retry: { max_attempts: 3, backoff: { initial: 10ms, max: 50ms, jitter: none } }";
    let sidecar = Sidecar::start(&payments(&up, "10s", retry)).await;

    let res = sidecar.send(get(Some("2s"))).await;

    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["outrigger-attempts"], "2");
    let seen = up.seen();
    let (first, second) = (time_left_ms(&seen[0]), time_left_ms(&seen[1]));
    assert!(first <= 2000, "at most what the client gave: {first} ms");
    assert!(second + 200 <= first, "the retry comes 200 ms later with less: {first} then {second}");

    // no header: the upstream's own timeout is handed on
    let res = sidecar.send(get(None)).await;
    assert_eq!(res.status(), 200);
    assert_eq!(up.seen()[2].headers["outrigger-timeout"], "10000ms");
}

#[tokio::test]
async fn a_header_never_lengthens_the_request_timeout() {
    let up = Upstream::scripted([Reply::Delayed(Duration::from_secs(5), 200)]).await;
    let sidecar = Sidecar::start(&payments(&up, "300ms", "")).await;

    let started = Instant::now();
    let res = sidecar.send(get(Some("1m"))).await;
    let took = started.elapsed();

    assert_timeout(&res);
    assert!(took < Duration::from_secs(2), "the 300 ms timeout held: {took:?}");
    assert_eq!(up.seen()[0].headers["outrigger-timeout"], "300ms", "the client's 1m replaced");
}

#[tokio::test]
async fn an_expired_or_zero_deadline_is_answered_at_once_and_nothing_is_forwarded() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "10s", "")).await;

    for zero in ["0ms", "0s", "0.0s"] {
        let started = Instant::now();
        let res = sidecar.send(get(Some(zero))).await;
        assert_timeout(&res);
        assert!(started.elapsed() < Duration::from_secs(1), "{zero}: not at once");
    }
    assert_eq!(up.requests(), 0, "nothing forwarded");
}

#[tokio::test]
async fn a_malformed_outrigger_timeout_gets_400_and_nothing_is_forwarded() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "10s", "")).await;

    for bad in ["300", "soon", "-1s", "300 ms", "1e3ms"] {
        let res = sidecar.send(get(Some(bad))).await;
        assert_eq!(res.status(), 400, "{bad:?}");
        assert_eq!(res.headers()["outrigger-error"], "bad-request", "{bad:?}");
        let body = String::from_utf8_lossy(res.body()).into_owned();
        assert!(body.contains("outrigger-timeout"), "{bad:?}: {body}");
    }
    assert_eq!(up.requests(), 0, "nothing forwarded");
}

/// A gRPC call over h2c to the sidecar, `grpc-timeout` as given; the answer's head and body.
async fn grpc_call(sidecar: &Sidecar, grpc_timeout: Option<&str>) -> Response<Bytes> {
    let stream = tokio::net::TcpStream::connect(sidecar.outbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an h2c handshake with the sidecar");
    tokio::spawn(conn);
    let mut req = Request::post("http://payments/pkg.Payments/Charge")
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = grpc_timeout {
        req = req.header("grpc-timeout", timeout);
    }
    let req = req.body(Full::new(Bytes::from_static(b"\0\0\0\0\0"))).unwrap();
    let res = sender.send_request(req).await.expect("an answer over h2");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Response::from_parts(parts, body)
}

/// Our own answer of `kind` to a gRPC call: the gRPC answer (HTTP 200, trailers-only,
/// `grpc-status` in the head), so a gRPC client sees the real reason.
fn assert_answered(res: &Response<Bytes>, kind: &str, grpc_status: &str) {
    assert_eq!(res.headers()["outrigger-error"], kind);
    assert_eq!(res.status(), 200, "{kind}: a gRPC answer");
    assert_eq!(res.headers()["content-type"], "application/grpc");
    assert_eq!(res.headers()["grpc-status"], grpc_status, "{kind}");
}

#[tokio::test]
async fn a_grpc_timeout_over_h2_is_rewritten_to_the_time_left_and_ends_the_call_at_the_deadline() {
    let up = Upstream::scripted([
        Reply::Delayed(Duration::from_secs(5), 200),
        Reply::Status(200),
        Reply::Status(200),
    ])
    .await;
    let sidecar = Sidecar::start(&payments(&up, "10s", "")).await;

    let started = Instant::now();
    let res = grpc_call(&sidecar, Some("400m")).await;
    let took = started.elapsed();

    assert_answered(&res, "timeout", "4"); // deadline-exceeded
    assert!(took >= Duration::from_millis(400), "before the deadline: {took:?}");
    assert!(took < Duration::from_secs(2), "not at the 400 ms deadline: {took:?}");
    let seen = &up.seen()[0];
    assert_eq!(seen.version, http::Version::HTTP_2);
    let told = grpc_timeout_nanos(seen.headers["grpc-timeout"].to_str().unwrap());
    assert!(told <= 400_000_000, "at most what was given: {told} ns");
    assert!(time_left_ms(seen) <= 400);

    // a longer grpc-timeout is cut to the upstream's 10 s; none at all gets the 10 s
    assert_eq!(grpc_call(&sidecar, Some("1H")).await.status(), 200);
    assert_eq!(grpc_call(&sidecar, None).await.status(), 200);
    let seen = up.seen();
    assert_eq!(seen[1].headers["grpc-timeout"], "10S");
    assert_eq!(seen[2].headers["grpc-timeout"], "10S");
}

#[tokio::test]
async fn a_malformed_grpc_timeout_is_refused_and_nothing_is_forwarded() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "10s", "")).await;

    for bad in ["400", "400ms", "123456789m", "1x"] {
        let res = grpc_call(&sidecar, Some(bad)).await;
        assert_answered(&res, "bad-request", "13"); // internal
    }
    assert_eq!(up.requests(), 0, "nothing forwarded");
}
