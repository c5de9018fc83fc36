//! The front door, attacked (issue 17): request smuggling past the framing guard, a client's
//! broken body blamed on the upstream, Host confusion, framing edges on every port, and an
//! upstream that lies about its framing. Raw sockets, the real binary, real upstreams.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrigger_tests::{RawUpstream, Sidecar, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

fn status_of(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

/// The status lines of every answer in a raw exchange, in order.
fn statuses(answer: &str) -> Vec<&str> {
    answer.lines().filter(|l| l.starts_with("HTTP/1.1 ")).collect()
}

fn payments(up: &Upstream, extra: &str) -> String {
    format!("upstreams:\n  payments:\n    discovery: {{ static: [\"{}\"] }}\n{extra}", up.addr())
}

#[tokio::test]
async fn a_bare_lf_head_gets_400_at_once_not_at_the_header_deadline() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "")).await;

    let started = tokio::time::Instant::now();
    let answer = sidecar.raw(b"GET /x HTTP/1.1\nHost: payments\n\n", WAIT).await;

    assert_eq!(status_of(&answer), "HTTP/1.1 400 Bad Request", "{answer}");
    assert!(answer.contains("outrigger-error: bad-request"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "answered after {:?}", started.elapsed());
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_bare_lf_head_cannot_smuggle_a_second_request_in_its_body() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "")).await;

    let mut attack =
        b"POST /first HTTP/1.1\r\nHost: payments\r\nContent-Length: 400\r\n\n".to_vec();
    attack.extend_from_slice(&[b'a'; 396]);
    attack.extend_from_slice(b"POST /second HTTP/1.1\r\nHost: payments\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    let answer = sidecar.raw(&attack, WAIT).await;

    assert_eq!(statuses(&answer), ["HTTP/1.1 400 Bad Request"], "{answer}");
    assert_eq!(up.requests(), 0, "nothing of the attack reached the upstream");
    sidecar.assert_still_serving("payments").await;
}

#[tokio::test]
async fn an_upgrade_answered_200_leaves_every_following_head_checked() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "")).await;
    let smuggled: &[u8] = b"POST /smuggled HTTP/1.1\r\nHost: payments\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    for upgrade in [
        &b"GET /ws HTTP/1.1\r\nHost: payments\r\nUpgrade: websocket\r\n\r\n"[..],
        b"GET /ws HTTP/1.1\r\nHost: payments\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let before = up.requests();
        let answer = sidecar.raw(&[upgrade, smuggled].concat(), WAIT).await;
        assert_eq!(
            statuses(&answer),
            ["HTTP/1.1 200 OK", "HTTP/1.1 400 Bad Request"],
            "{}: {answer}",
            String::from_utf8_lossy(upgrade)
        );
        assert_eq!(up.requests() - before, 1, "only the upgrade request reached the upstream");
    }
    assert!(up.seen().iter().all(|seen| seen.uri.path() == "/ws"));
}

/// A POST whose chunked body is malformed, the request line and head well formed.
fn broken_chunked(body: &str) -> Vec<u8> {
    format!("POST /charge HTTP/1.1\r\nHost: payments\r\nTransfer-Encoding: chunked\r\n\r\n{body}")
        .into_bytes()
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_400_and_never_opens_the_breaker() {
    let breaker = "    circuit_breaker: { consecutive_failures: 3, open_for: 30s }\n";
    // streamed straight to the upstream, and read whole first to be replayable by a retry
    let retry = "    retry: { max_attempts: 3, on: [reset, connect-failure, 502, 503] }\n";
    for extra in [breaker.to_owned(), format!("{breaker}{retry}")] {
        let up = Upstream::status(200).await;
        let sidecar = Sidecar::start(&payments(&up, &extra)).await;
        let bodies = [
            "ffffffffffffffffff\r\n",
            "ffffffffffffffff\r\nabc",
            "3\nabc\r\n0\r\n\r\n",
            "3\r\nabcXX\r\n0\r\n\r\n",
        ];
        for body in bodies {
            let answer = sidecar.raw(&broken_chunked(body), WAIT).await;
            assert_eq!(status_of(&answer), "HTTP/1.1 400 Bad Request", "{body:?}: {answer}");
            assert!(answer.contains("outrigger-error: bad-request"), "{body:?}: {answer}");
        }
        // four client faults in a row, a breaker that opens after three failures: still closed
        let res = sidecar.get("payments", "/after").await;
        assert_eq!(res.status(), 200, "{extra}: {:?}", res.headers());
        assert!(up.requests() <= bodies.len() + 1, "a broken body was retried: {}", up.requests());
        let (_, metrics) = sidecar.admin("/metrics").await;
        assert!(
            metrics.contains("outrigger_circuit_state{upstream=\"payments\"} 0"),
            "the breaker moved: {metrics}"
        );
    }
}

#[tokio::test]
async fn a_client_that_leaves_mid_body_never_opens_the_breaker() {
    let up = Upstream::status(200).await;
    let extra = "    circuit_breaker: { consecutive_failures: 3, open_for: 30s }\n";
    let sidecar = Sidecar::start(&payments(&up, extra)).await;

    for _ in 0..4 {
        let mut client = TcpStream::connect(sidecar.outbound).await.unwrap();
        client
            .write_all(
                b"POST /charge HTTP/1.1\r\nHost: payments\r\nContent-Length: 100\r\n\r\nten bytes!",
            )
            .await
            .unwrap();
        client.shutdown().await.unwrap(); // gone before the other 90 bytes
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, client.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(!answer.contains("upstream-reset"), "blamed on the upstream: {answer}");
    }
    assert_eq!(sidecar.get("payments", "/after").await.status(), 200, "the breaker opened");
}

#[tokio::test]
async fn a_body_longer_than_its_content_length_is_the_next_request_and_is_checked() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "")).await;

    let answer = sidecar
        .raw(b"POST /charge HTTP/1.1\r\nHost: payments\r\nContent-Length: 5\r\n\r\nhelloEXTRA BYTES\r\n\r\n", WAIT)
        .await;

    assert_eq!(statuses(&answer), ["HTTP/1.1 200 OK", "HTTP/1.1 400 Bad Request"], "{answer}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, "hello", "the upstream got the body its Content-Length framed");
}

#[tokio::test]
async fn the_targets_authority_wins_over_the_host_header() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "")).await;

    let answer = sidecar
        .raw(
            b"GET http://payments/abs HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
            WAIT,
        )
        .await;
    assert_eq!(status_of(&answer), "HTTP/1.1 200 OK", "{answer}");

    // HTTP/2: :authority names the upstream, a host header beside it says otherwise
    let stream = TcpStream::connect(sidecar.outbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an h2c handshake with the sidecar");
    tokio::spawn(conn);
    let req = Request::get("http://payments/h2")
        .header("host", "evil.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.into_body().collect().await;

    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        let host = request.headers.get("host").map(|h| h.to_str().unwrap().to_owned());
        assert_ne!(
            host.as_deref(),
            Some("evil.example"),
            "{} went on with the client's Host",
            request.uri
        );
    }
    assert_eq!(seen[0].headers["host"], "payments");
}

#[tokio::test]
async fn two_host_headers_get_400_and_nothing_is_forwarded() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "")).await;

    let answer =
        sidecar.raw(b"GET / HTTP/1.1\r\nHost: payments\r\nHost: evil.example\r\n\r\n", WAIT).await;

    assert_eq!(status_of(&answer), "HTTP/1.1 400 Bad Request", "{answer}");
    assert!(answer.contains("outrigger-error: bad-request"), "{answer}");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_get_or_head_with_a_chunked_body_reaches_the_upstream_with_its_body() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "")).await;

    for method in ["GET", "HEAD"] {
        let req = format!(
            "{method} /search HTTP/1.1\r\nHost: payments\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let answer = sidecar.raw(req.as_bytes(), WAIT).await;
        assert_eq!(status_of(&answer), "HTTP/1.1 200 OK", "{method}: {answer}");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    for request in seen {
        assert_eq!(request.body, "hello", "{} lost its body", request.method);
    }
}

#[tokio::test]
async fn a_get_with_a_chunked_body_buffered_for_a_retry_goes_on_with_one_framing() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "    retry: { max_attempts: 2 }\n")).await;

    let req = "GET /search HTTP/1.1\r\nHost: payments\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let answer = sidecar.raw(req.as_bytes(), WAIT).await;

    assert_eq!(status_of(&answer), "HTTP/1.1 200 OK", "{answer}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, "hello");
    // the buffered body went on with its length alone: never beside `Transfer-Encoding`, which
    // would let an upstream read the body as chunks (smuggling)
    assert!(seen[0].headers.get("transfer-encoding").is_none(), "{:?}", seen[0].headers);
    assert_eq!(seen[0].headers["content-length"], "5");
}

#[tokio::test]
async fn a_content_length_list_gets_400_with_the_outrigger_error() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "")).await;

    let answer = sidecar
        .raw(b"POST / HTTP/1.1\r\nHost: payments\r\nContent-Length: 5, 5\r\n\r\nhello", WAIT)
        .await;

    assert_eq!(status_of(&answer), "HTTP/1.1 400 Bad Request", "{answer}");
    assert!(answer.contains("outrigger-error: bad-request"), "{answer}");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn the_admin_port_refuses_bad_framing_as_the_outbound_port_does() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&payments(&up, "")).await;
    let large =
        format!("GET /healthz HTTP/1.1\r\nHost: admin\r\nx-big: {}\r\n\r\n", "a".repeat(70_000));
    let cases: [(&[u8], &str); 3] = [
        (b"POST /healthz HTTP/1.1\r\nHost: admin\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /healthz HTTP/1.1\r\nHost: admin\r\nx-nul: a\0b\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (large.as_bytes(), "HTTP/1.1 431 Request Header Fields Too Large"),
    ];
    for (req, status) in cases {
        let started = tokio::time::Instant::now();
        let answer = sidecar.raw_admin(req, WAIT).await;
        assert_eq!(status_of(&answer), status, "{answer}");
        assert!(answer.contains("outrigger-error: bad-request"), "{answer}");
        assert!(started.elapsed() < WAIT, "the admin connection stayed open after a refusal");
    }
}

#[tokio::test]
async fn a_response_with_content_length_and_chunked_is_read_as_chunked() {
    let longer = RawUpstream::answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
    )
    .await;
    let shorter = RawUpstream::answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let yaml = format!(
        "upstreams:\n  longer:\n    discovery: {{ static: [\"{}\"] }}\n  shorter:\n    discovery: {{ static: [\"{}\"] }}\n",
        longer.addr(),
        shorter.addr()
    );
    let sidecar = Sidecar::start(&yaml).await;

    for (host, body) in [("longer", "hello world"), ("shorter", "hello")] {
        let res = sidecar.get(host, "/").await;
        assert_eq!(res.status(), 200, "{host}");
        assert_eq!(res.body(), body, "{host}: the body as its chunks framed it");
        assert!(res.headers().get("content-length").is_none_or(|l| l == &body.len().to_string()));
    }
}
