//! The app's HTTP/1 connections as Outrigger's own server serves them (issue 20): an idle
//! keep-alive connection holds no buffer, pipelined requests are answered in order, and what
//! the server leaves to hyper (an upgrade, `Expect: 100-continue`) still works on a connection
//! it served before.

use std::time::Duration;

use outrigger_tests::{Reply, Sidecar, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// Reads one response (head and `Content-Length` body) from `stream`; its head.
async fn response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.trim().parse::<usize>().unwrap());
            if got.len() >= end + 4 + length {
                return String::from_utf8_lossy(&got[..end + 4 + length]).into_owned();
            }
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed mid-response: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn idle_keep_alive_connections_hold_no_buffers() {
    const CONNECTIONS: usize = 800;
    let up = Upstream::cycling([Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&up.yaml("up")).await;
    // the runtime's threads and first allocations, before the connections
    let mut warm = TcpStream::connect(sidecar.outbound).await.unwrap();
    warm.write_all(b"GET / HTTP/1.1\r\nhost: up\r\n\r\n").await.unwrap();
    response(&mut warm).await;
    let before = sidecar.rss_kib();

    let mut open = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(sidecar.outbound).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nhost: up\r\n\r\n").await.unwrap();
        assert!(response(&mut stream).await.starts_with("HTTP/1.1 200"));
        open.push(stream);
    }
    let per_connection = sidecar.rss_kib().saturating_sub(before) / CONNECTIONS as u64;

    eprintln!("{per_connection} KiB per idle kept-alive connection");
    // hyper kept an 8 KiB read and a 16 KiB write buffer on each for its life (22.8 KiB measured)
    assert!(per_connection < 6, "{per_connection} KiB per idle kept-alive connection");
    assert_eq!(up.requests(), CONNECTIONS + 1);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let up = Upstream::cycling([Reply::Status(201), Reply::Status(202), Reply::Status(203)]).await;
    let sidecar = Sidecar::start(&up.yaml("up")).await;
    let mut stream = TcpStream::connect(sidecar.outbound).await.unwrap();

    stream
        .write_all(
            b"GET /1 HTTP/1.1\r\nhost: up\r\n\r\nPOST /2 HTTP/1.1\r\nhost: up\r\ncontent-length: 5\r\n\r\nhello\
GET /3 HTTP/1.1\r\nhost: up\r\n\r\n",
        )
        .await
        .unwrap();

    for status in ["201", "202", "203"] {
        let head = response(&mut stream).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
    }
    let seen = up.seen();
    let paths: Vec<_> = seen.iter().map(|s| s.uri.path().to_owned()).collect();
    assert_eq!(paths, ["/1", "/2", "/3"]);
    assert_eq!(seen[1].body, "hello");
}

#[tokio::test]
async fn an_upgrade_after_a_plain_request_on_the_same_connection_is_tunnelled() {
    let up = Upstream::scripted([Reply::Status(200), Reply::UpgradeEcho]).await;
    let sidecar = Sidecar::start(&up.yaml("ws")).await;
    let mut stream = TcpStream::connect(sidecar.outbound).await.unwrap();

    stream.write_all(b"GET /first HTTP/1.1\r\nhost: ws\r\n\r\n").await.unwrap();
    assert!(response(&mut stream).await.starts_with("HTTP/1.1 200"));
    stream
        .write_all(
            b"GET /socket HTTP/1.1\r\nhost: ws\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let head = response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"ping");
}

#[tokio::test]
async fn expect_100_continue_gets_its_interim_answer_then_the_response() {
    let up = Upstream::scripted([Reply::CountBody]).await;
    let sidecar = Sidecar::start(&up.yaml("up")).await;
    let mut stream = TcpStream::connect(sidecar.outbound).await.unwrap();

    stream.write_all(b"GET /warm HTTP/1.1\r\nhost: up\r\n\r\n").await.unwrap();
    response(&mut stream).await;
    stream
        .write_all(
            b"PUT /up HTTP/1.1\r\nhost: up\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let interim = response(&mut stream).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    stream.write_all(b"hello").await.unwrap();
    let head = response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200") && head.ends_with("5"), "{head}");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_read_timeout() {
    let up = Upstream::status(200).await;
    let yaml = format!(
        "{}outbound: {{ listen: \"$OUTBOUND\", limits: {{ header_read_timeout: 1s, idle_timeout: 60s }} }}\n",
        up.yaml("up")
    );
    let sidecar = Sidecar::start(&yaml).await;
    let mut stream = TcpStream::connect(sidecar.outbound).await.unwrap();
    let started = tokio::time::Instant::now();

    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte)).await;

    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed, not answered: {read:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn endless_request_trailers_break_the_body_off() {
    let up = Upstream::scripted([Reply::CountBody]).await;
    let sidecar = Sidecar::start(&up.yaml("up")).await;
    let mut stream = TcpStream::connect(sidecar.outbound).await.unwrap();
    stream
        .write_all(
            b"POST / HTTP/1.1\r\nhost: up\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n",
        )
        .await
        .unwrap();

    // 20 KiB of trailer lines: past the 16 KiB a request's trailers may take
    let line =
        b"x-trailer: vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv\r\n";
    let mut rest = Vec::new();
    for _ in 0..(20 * 1024 / line.len()) {
        rest.extend_from_slice(line);
    }
    // then the empty line that ends them: taken whole, the body would be complete and answered
    rest.extend_from_slice(b"\r\n");
    let _ = stream.write_all(&rest).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "the trailers were taken whole: {answer:?}");
    assert!(answer.contains("outrigger-error: bad-request"), "{answer}");
}
