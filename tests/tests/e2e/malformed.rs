//! Bad input: a clear status or a closed connection, nothing malformed forwarded, and the
//! process keeps serving.

use std::time::Duration;

use outrigger_tests::{Reply, Sidecar, Upstream, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

async fn sidecar_with(up: &Upstream, limits: &str) -> Sidecar {
    let yaml = format!(
        "outbound:\n  listen: \"$OUTBOUND\"\n  limits: {{ {limits} }}\nupstreams:\n  payments:\n    discovery: {{ static: [\"{}\"] }}\n",
        up.addr()
    );
    Sidecar::start(&yaml).await
}

/// The status line and headers of a raw answer, and whether the sidecar closed afterwards
/// (`raw` reads to EOF: an answer followed by a close returns before the wait runs out).
fn status_of(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

#[tokio::test]
async fn request_smuggling_shapes_get_400_and_are_never_forwarded() {
    let up = Upstream::status(200).await;
    let sidecar = sidecar_with(&up, "max_headers: 100").await;
    let cases: [&[u8]; 4] = [
        b"POST / HTTP/1.1\r\nhost: payments\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: payments\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcde",
        b"GET / HTTP/1.1\r\nhost: payments\r\nx-folded: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost payments\r\n\r\n",
    ];
    for case in cases {
        let started = tokio::time::Instant::now();
        let answer = sidecar.raw(case, WAIT).await;
        assert_eq!(
            status_of(&answer),
            "HTTP/1.1 400 Bad Request",
            "{}",
            String::from_utf8_lossy(case)
        );
        assert!(answer.contains("outrigger-error: bad-request"), "{answer}");
        assert!(started.elapsed() < WAIT, "the connection stayed open after a 400");
    }
    assert_eq!(up.requests(), 0);
    sidecar.assert_still_serving("payments").await;
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let up = Upstream::status(200).await;
    let sidecar = sidecar_with(&up, "max_headers: 20, max_header_bytes: 4KiB").await;
    let many = format!("GET / HTTP/1.1\r\nhost: payments\r\n{}\r\n", "x-n: 1\r\n".repeat(21));
    let large = format!("GET / HTTP/1.1\r\nhost: payments\r\nx-big: {}\r\n\r\n", "a".repeat(5000));

    for case in [many, large] {
        let answer = sidecar.raw(case.as_bytes(), WAIT).await;
        assert_eq!(status_of(&answer), "HTTP/1.1 431 Request Header Fields Too Large");
        assert!(answer.contains("outrigger-error: bad-request"), "{answer}");
    }
    assert_eq!(up.requests(), 0);
    sidecar.assert_still_serving("payments").await;
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_disconnected_at_the_header_read_timeout() {
    let up = Upstream::status(200).await;
    let sidecar = sidecar_with(&up, "header_read_timeout: 300ms").await;

    let started = tokio::time::Instant::now();
    let answer = sidecar.raw(b"GET / HTTP/1.1\r\nhost: payments\r\n", WAIT).await;
    let took = started.elapsed();

    assert_eq!(answer, "", "nothing is answered to an unfinished head");
    assert!(took >= Duration::from_millis(250), "closed after {took:?}: before the timeout");
    assert!(took < WAIT, "still open after {took:?}");
    assert_eq!(up.requests(), 0);
    sidecar.assert_still_serving("payments").await;
}

#[tokio::test]
async fn garbage_and_half_requests_never_crash_the_sidecar() {
    let up = Upstream::status(200).await;
    let sidecar = sidecar_with(&up, "header_read_timeout: 200ms").await;
    let junk: [&[u8]; 5] = [
        b"\x00\x01\x02\xff\xfe\r\n\r\n",
        b"GET\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: payments\r\ncontent-length: 100\r\n\r\nshort",
        b"POST / HTTP/1.1\r\nhost: payments\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\ngarbage-not-frames",
    ];
    for bytes in junk {
        let _ = sidecar.raw(bytes, Duration::from_secs(2)).await;
    }
    sidecar.assert_still_serving("payments").await;
}

#[tokio::test]
async fn invalid_methods_and_targets_get_400_and_are_never_forwarded() {
    let up = Upstream::status(200).await;
    let sidecar = sidecar_with(&up, "max_headers: 100").await;
    let cases: [&[u8]; 6] = [
        b"G(T / HTTP/1.1\r\nhost: payments\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nhost: payments\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\nhost: payments\r\n\r\n",
        b"GET http://payments:99999/ HTTP/1.1\r\nhost: payments\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: pay ments\r\n\r\n",
        b"GET / HTTP/9.9\r\nhost: payments\r\n\r\n",
    ];
    let mut statuses = Vec::new();
    for case in cases {
        let answer = sidecar.raw(case, WAIT).await;
        statuses.push(status_of(&answer).to_owned());
    }
    assert_eq!(statuses, ["HTTP/1.1 400 Bad Request"; 6]);
    assert_eq!(up.requests(), 0, "nothing malformed was forwarded");
    sidecar.assert_still_serving("payments").await;
}

#[tokio::test]
async fn a_client_that_never_sends_its_body_gets_504_at_the_request_deadline() {
    let up = Upstream::status(200).await;
    let yaml = format!(
        "outbound: {{ listen: \"$OUTBOUND\" }}\nupstreams:\n  payments:\n    discovery: {{ static: [\"{}\"] }}\n    timeouts: {{ request: 500ms }}\n",
        up.addr()
    );
    let sidecar = Sidecar::start(&yaml).await;

    let started = tokio::time::Instant::now();
    let promised = b"POST / HTTP/1.1\r\nhost: payments\r\ncontent-length: 100\r\n\r\nten bytes!";
    let answer = sidecar.raw(promised, WAIT).await;
    let took = started.elapsed();

    assert_eq!(status_of(&answer), "HTTP/1.1 504 Gateway Timeout", "{answer}");
    assert!(answer.contains("outrigger-error: timeout"), "{answer}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    sidecar.assert_still_serving("payments").await;
}

#[tokio::test]
async fn a_client_that_goes_away_mid_response_ends_the_upstream_stream_too() {
    let up = Upstream::scripted([Reply::Drip]).await;
    let sidecar = sidecar_with(&up, "max_headers: 100").await;

    let mut client = TcpStream::connect(sidecar.outbound).await.unwrap();
    client.write_all(b"GET /stream HTTP/1.1\r\nhost: payments\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while got.len() < 4096 {
        let n = tokio::time::timeout(WAIT, client.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&got));
    assert_eq!(up.open_drips(), 1);
    drop(client);

    wait_until(WAIT, "the upstream's stream closed after the client left", || async {
        (up.open_drips() == 0).then_some(())
    })
    .await;
    up.set_script([Reply::Status(200)]);
    sidecar.assert_still_serving("payments").await;
}
