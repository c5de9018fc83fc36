//! The guard driven byte by byte over an in-memory pipe: what hyper would read.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use std::sync::Arc;

use super::*;
use crate::http::idle::Activity;

const LIMITS: GuardLimits = GuardLimits {
    max_header_bytes: 1024,
    max_headers: 8,
    header_read_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(60),
    max_connections: 16,
};

fn guard() -> (DuplexStream, GuardedIo<DuplexStream>) {
    let (client, io, _) = guard_with_activity();
    (client, io)
}

/// A guard, and the record it shares with the connection's service (which reports answers).
fn guard_with_activity() -> (DuplexStream, GuardedIo<DuplexStream>, Arc<Activity>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let activity = Activity::new();
    (client, GuardedIo::new(server, LIMITS, activity.clone()), activity)
}

/// Everything the guard hands over until it would wait, and the error that ended it, if any.
async fn drain_to_error(io: &mut GuardedIo<DuplexStream>) -> (Vec<u8>, Option<io::Error>) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(1), io.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return (seen, None),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (seen, Some(e)),
        }
    }
}

/// Everything the guard hands over, until it would wait.
async fn drain(io: &mut GuardedIo<DuplexStream>) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), io.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

fn rejected(status: u16) -> String {
    format!("{REJECTED_HEADER}: {status} ")
}

#[tokio::test(start_paused = true)]
async fn passes_a_well_formed_request_unchanged() {
    let (mut client, mut io) = guard();
    let req = b"GET /a?b=c HTTP/1.1\r\nhost: payments\r\n\r\n";
    client.write_all(req).await.unwrap();
    assert_eq!(drain(&mut io).await, req);
}

#[tokio::test(start_paused = true)]
async fn passes_pipelined_requests_with_length_and_chunked_bodies() {
    let (mut client, mut io) = guard();
    let stream = b"POST /1 HTTP/1.1\r\nhost: p\r\ncontent-length: 5\r\n\r\nhelloPOST /2 HTTP/1.1\r\nhost: p\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\ntrailer: t\r\n\r\nGET /3 HTTP/1.1\r\nhost: p\r\n\r\n";
    client.write_all(stream).await.unwrap();
    assert_eq!(drain(&mut io).await, stream);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_looks_like_a_smuggled_head_is_only_body() {
    let (mut client, mut io) = guard();
    // the body holds bytes that would be a forbidden head; they are body, not a request
    let body = b"GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
    let head = format!("POST / HTTP/1.1\r\nhost: p\r\ncontent-length: {}\r\n\r\n", body.len());
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(body).await.unwrap();
    let seen = drain(&mut io).await;
    assert_eq!(seen.len(), head.len() + body.len());
    assert!(!String::from_utf8_lossy(&seen).contains(REJECTED_HEADER));
}

#[tokio::test(start_paused = true)]
async fn refuses_framing_that_could_smuggle_a_request() {
    let cases: [(&[u8], u16); 6] = [
        (b"POST / HTTP/1.1\r\nhost: p\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nhost: p\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nhost: p\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nhost: p\r\ntransfer-encoding: chunked, gzip\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nhost: p\r\nx-folded: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nhost: p\r\noutrigger-rejected: 200 ok\r\n\r\n", 400),
    ];
    for (req, status) in cases {
        let (mut client, mut io) = guard();
        client.write_all(req).await.unwrap();
        let seen = String::from_utf8(drain(&mut io).await).unwrap();
        assert!(seen.starts_with("GET / HTTP/1.1\r\nhost: outrigger.invalid\r\n"), "{seen}");
        assert!(seen.contains(&rejected(status)), "{} -> {seen}", String::from_utf8_lossy(req));
    }
}

#[tokio::test(start_paused = true)]
async fn a_forbidden_second_request_is_refused_after_the_first_passes() {
    let (mut client, mut io) = guard();
    let first = b"GET /ok HTTP/1.1\r\nhost: p\r\n\r\n";
    client.write_all(first).await.unwrap();
    client
        .write_all(b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nx")
        .await
        .unwrap();
    let seen = String::from_utf8(drain(&mut io).await).unwrap();
    assert!(seen.starts_with(
        "GET /ok HTTP/1.1\r\nhost: p\r\n\r\nGET / HTTP/1.1\r\nhost: outrigger.invalid"
    ));
    assert!(seen.contains(&rejected(400)));
}

#[tokio::test(start_paused = true)]
async fn too_many_or_too_large_headers_get_431() {
    let many = format!("GET / HTTP/1.1\r\n{}\r\n", "x: y\r\n".repeat(9));
    let large = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(1100));
    let unterminated = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(1100));
    for req in [many, large, unterminated] {
        let (mut client, mut io) = guard();
        client.write_all(req.as_bytes()).await.unwrap();
        let seen = String::from_utf8(drain(&mut io).await).unwrap();
        assert!(seen.contains(&rejected(431)), "{seen}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_head_arriving_byte_by_byte_is_held_back_until_complete() {
    let (mut client, mut io) = guard();
    let req = b"GET / HTTP/1.1\r\nhost: p\r\n\r\n";
    for b in &req[..req.len() - 1] {
        client.write_all(&[*b]).await.unwrap();
        assert!(drain(&mut io).await.is_empty());
    }
    client.write_all(&req[req.len() - 1..]).await.unwrap();
    assert_eq!(drain(&mut io).await, req);
}

/// Hands over what the client sent in two writes cut at `cut`, reading `read` bytes at a time.
async fn through_the_guard(stream: &[u8], cut: usize, read: usize) -> Vec<u8> {
    let (mut client, mut io) = guard();
    let mut seen = Vec::new();
    let mut buf = vec![0u8; read];
    for part in [&stream[..cut], &stream[cut..]] {
        client.write_all(part).await.unwrap();
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), io.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    }
    seen
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_anywhere_passes_unchanged_whether_read_in_place_or_held_back() {
    // reads of 4096 bytes scan in hyper's buffer; reads of 100 go through the guard's own
    let stream: &[u8] = b"POST /1 HTTP/1.1\r\nhost: p\r\ncontent-length: 5\r\n\r\nhello\
        POST /2 HTTP/1.1\r\nhost: p\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
        GET /3 HTTP/1.1\r\nhost: p\r\n\r\n";
    for read in [4096, 100] {
        for cut in 0..=stream.len() {
            let seen = through_the_guard(stream, cut, read).await;
            assert_eq!(seen, stream, "cut at {cut}, reads of {read}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_forbidden_head_cut_anywhere_is_refused_and_nothing_of_it_passes() {
    let first = b"GET /ok HTTP/1.1\r\nhost: p\r\n\r\n";
    let bad = b"POST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\nx";
    let stream = [&first[..], &bad[..]].concat();
    for cut in 0..=stream.len() {
        let seen = String::from_utf8(through_the_guard(&stream, cut, 4096).await).unwrap();
        assert!(
            seen.starts_with("GET /ok HTTP/1.1\r\nhost: p\r\n\r\nGET / HTTP/1.1\r\n"),
            "cut {cut}: {seen}"
        );
        assert!(seen.contains(&rejected(400)), "cut {cut}: {seen}");
        assert!(!seen.contains("POST"), "cut {cut}: {seen}");
    }
}

#[tokio::test(start_paused = true)]
async fn http2_prior_knowledge_passes_through() {
    let (mut client, mut io) = guard();
    let bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    client.write_all(bytes).await.unwrap();
    assert_eq!(drain(&mut io).await, bytes);
}

#[tokio::test(start_paused = true)]
async fn a_client_trickling_its_headers_is_cut_off_at_the_header_deadline() {
    let (mut client, mut io) = guard();
    client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let read = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        io.read(&mut buf).await
    });
    tokio::time::sleep(Duration::from_secs(9)).await;
    client.write_all(b"x: y\r\n").await.unwrap(); // activity does not extend the header deadline
    tokio::time::sleep(Duration::from_secs(2)).await;
    let err = read.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let (mut client, mut io) = guard();
    client.write_all(b"GET / HTTP/1.1\r\nhost: p\r\n\r\n").await.unwrap();
    drain(&mut io).await;
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let err = io.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    // the idle deadline, not the (shorter) header deadline, applies between requests
    assert!(started.elapsed() >= Duration::from_secs(59), "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_bare_lf_in_a_head_is_refused_at_once_and_nothing_of_it_passes() {
    let cases: [&[u8]; 4] = [
        b"GET /x HTTP/1.1\nHost: svc\n\n",
        b"GET /x HTTP/1.1\r\nHost: svc\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: svc\r\n\n",
        b"GET /x HTTP/1.1\r\nHost: svc\r\nx: a\nb: c\r\n\r\n",
    ];
    for req in cases {
        let (mut client, mut io) = guard();
        client.write_all(req).await.unwrap();
        let seen = String::from_utf8(drain(&mut io).await).unwrap();
        assert!(seen.starts_with("GET / HTTP/1.1\r\nhost: outrigger.invalid\r\n"), "{seen}");
        assert!(seen.contains(&rejected(400)), "{} -> {seen}", String::from_utf8_lossy(req));
        assert!(!seen.contains("svc"), "nothing of the client's head passed: {seen}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_bare_lf_head_cannot_hide_a_second_request_in_its_body() {
    // httparse ends the first head at `\r\n\n`; a guard that looked only for `\r\n\r\n` would
    // take the first 400 bytes after it for a body and let the CL + TE request through
    let mut stream = b"POST /first HTTP/1.1\r\nHost: svc\r\nContent-Length: 400\r\n\n".to_vec();
    stream.extend_from_slice(&[b'a'; 396]);
    stream.extend_from_slice(
        b"POST /second HTTP/1.1\r\nHost: svc\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    for cut in [0, 30, 60, 200, stream.len()] {
        let seen = String::from_utf8(through_the_guard(&stream, cut, 4096).await).unwrap();
        assert!(seen.starts_with("GET / HTTP/1.1\r\nhost: outrigger.invalid"), "cut {cut}: {seen}");
        assert!(!seen.contains("POST"), "cut {cut}: {seen}");
    }
}

#[tokio::test(start_paused = true)]
async fn empty_lines_before_a_request_line_are_skipped_as_hyper_skips_them() {
    let (mut client, mut io) = guard();
    let req = b"\r\n\nGET / HTTP/1.1\r\nhost: p\r\n\r\n";
    client.write_all(req).await.unwrap();
    assert_eq!(drain(&mut io).await, req);
}

#[tokio::test(start_paused = true)]
async fn a_content_length_list_is_refused_as_hyper_would_refuse_it() {
    let (mut client, mut io) = guard();
    client
        .write_all(b"POST / HTTP/1.1\r\nhost: p\r\ncontent-length: 5, 5\r\n\r\nhello")
        .await
        .unwrap();
    let seen = String::from_utf8(drain(&mut io).await).unwrap();
    assert!(seen.contains(&rejected(400)), "{seen}");
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_request_holds_what_follows_until_its_answer_is_known() {
    let upgrade = b"GET /ws HTTP/1.1\r\nhost: p\r\nupgrade: websocket\r\n\r\n";
    let smuggled = b"POST / HTTP/1.1\r\nhost: p\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";

    // answered 200: still HTTP/1, so the next head is checked, and refused
    let (mut client, mut io, activity) = guard_with_activity();
    client.write_all(&[&upgrade[..], &smuggled[..]].concat()).await.unwrap();
    assert_eq!(drain(&mut io).await, upgrade, "nothing after the upgrade head before its answer");
    activity.answered(0, false);
    let seen = String::from_utf8(drain(&mut io).await).unwrap();
    assert!(seen.starts_with("GET / HTTP/1.1\r\nhost: outrigger.invalid"), "{seen}");
    assert!(seen.contains(&rejected(400)), "{seen}");

    // answered 101: the bytes after the head are the new protocol's, passed as they are
    let (mut client, mut io, activity) = guard_with_activity();
    client.write_all(&[&upgrade[..], &smuggled[..]].concat()).await.unwrap();
    assert_eq!(drain(&mut io).await, upgrade);
    activity.answered(0, true);
    assert_eq!(drain(&mut io).await, smuggled);
}

#[tokio::test(start_paused = true)]
async fn only_the_answer_to_the_upgrade_request_itself_settles_it() {
    let first = b"GET /a HTTP/1.1\r\nhost: p\r\n\r\n";
    let upgrade =
        b"GET /ws HTTP/1.1\r\nhost: p\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
    let frames = b"\x81\x05hello";
    let (mut client, mut io, activity) = guard_with_activity();
    client.write_all(&[&first[..], &upgrade[..], &frames[..]].concat()).await.unwrap();
    assert_eq!(drain(&mut io).await, [&first[..], &upgrade[..]].concat());
    activity.answered(0, false); // the answer to /a, pipelined before the upgrade
    assert!(drain(&mut io).await.is_empty(), "the upgrade's own answer is still to come");
    activity.answered(1, true);
    assert_eq!(drain(&mut io).await, frames);
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_header_on_http_1_0_is_not_an_upgrade() {
    let (mut client, mut io) = guard();
    let stream =
        b"GET /ws HTTP/1.0\r\nupgrade: websocket\r\n\r\nGET /next HTTP/1.1\r\nhost: p\r\n\r\n";
    client.write_all(stream).await.unwrap();
    assert_eq!(drain(&mut io).await, stream);
}

#[tokio::test(start_paused = true)]
async fn malformed_chunked_bodies_break_the_connection_where_hyper_would_read_differently() {
    let head = "POST / HTTP/1.1\r\nhost: p\r\ntransfer-encoding: chunked\r\n\r\n";
    let bodies: [&str; 8] = [
        "ffffffffffffffffff\r\n",     // a size past u64
        "ffffffffffffffff\r\n",       // 16 hex digits
        "3\nabc\r\n0\r\n\r\n",        // a bare-LF chunk line
        "3\r\nabcXX\r\n0\r\n\r\n",    // junk where the CRLF after the data belongs
        "3\r\nabc\n0\r\n\r\n",        // a bare LF after the data
        "3;x\ry\r\nabc\r\n0\r\n\r\n", // a CR inside a chunk line
        "0\r\nx: y\n\r\n",            // a bare-LF trailer line
        "0\r\n\n",                    // a bare-LF end of trailers
    ];
    for body in bodies {
        let (mut client, mut io) = guard();
        client
            .write_all(format!("{head}{body}GET /next HTTP/1.1\r\nhost: p\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (seen, error) = drain_to_error(&mut io).await;
        let seen = String::from_utf8_lossy(&seen);
        let error = error.unwrap_or_else(|| panic!("{body:?}: not refused, passed {seen:?}"));
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{body:?}");
        assert!(!seen.contains("/next"), "{body:?}: read on past the broken body: {seen:?}");
    }
}
