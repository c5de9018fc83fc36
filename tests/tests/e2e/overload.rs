//! Whole-sidecar caps (`outbound.limits.max_connections`, `max_requests`): past them, 503
//! `overloaded` at once, nothing forwarded, and what was admitted goes on being served.

use std::time::Duration;

use outrigger_tests::{DEADLINE, Reply, Sidecar, Upstream, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: payments\r\n\r\n";
const GET_AND_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nhost: payments\r\nconnection: close\r\n\r\n";

async fn sidecar_with(up: &Upstream, limits: &str) -> Sidecar {
    let yaml = format!(
        "outbound:\n  listen: \"$OUTBOUND\"\n  limits: {{ {limits} }}\nupstreams:\n  payments:\n    discovery: {{ static: [\"{}\"] }}\n",
        up.addr()
    );
    Sidecar::start(&yaml).await
}

/// `outrigger_shed_total{limit="LIMIT"}` as the admin port reports it.
async fn shed(sidecar: &Sidecar, limit: &str) -> Option<f64> {
    crate::messaging::metric(sidecar, &format!("outrigger_shed_total{{limit=\"{limit}\"}}")).await
}

/// Reads one response head (and a body of `content-length`) from a kept-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before a whole response: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |n| n.trim().parse::<usize>().expect("a length"));
                if got.len() >= end + 4 + length {
                    return text.into_owned();
                }
            }
        }
    })
    .await
    .expect("a response in time")
}

#[tokio::test]
async fn past_max_connections_a_new_connection_gets_503_overloaded_and_the_open_ones_keep_working()
{
    let up = Upstream::status(200).await;
    let sidecar = sidecar_with(&up, "max_connections: 2").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(sidecar.outbound).await.expect("connect");
        // a served exchange proves the connection holds a slot before the next one opens
        stream.write_all(GET).await.expect("write");
        assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200 OK"));
        held.push(stream);
    }

    let started = tokio::time::Instant::now();
    let answer = sidecar.raw(GET, DEADLINE).await;
    assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable"), "{answer}");
    assert!(answer.contains("outrigger-error: overloaded"), "{answer}");
    assert!(answer.contains("max_connections"), "the body names the limit: {answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "refused after {:?}", started.elapsed());
    assert_eq!(up.requests(), 2, "nothing of the refused connection was forwarded");
    assert_eq!(shed(&sidecar, "max_connections").await, Some(1.0));
    // the probes have their own connections
    assert_eq!(sidecar.admin("/healthz").await.0, 200);

    // the connections already open are served as before
    held[0].write_all(GET).await.expect("write");
    assert!(read_response(&mut held[0]).await.starts_with("HTTP/1.1 200 OK"));

    // a closed connection frees its slot
    held.clear();
    wait_until(DEADLINE, "a slot freed by closed connections", || async {
        let answer = sidecar.raw(GET_AND_CLOSE, Duration::from_secs(2)).await;
        answer.starts_with("HTTP/1.1 200 OK").then_some(())
    })
    .await;
}

#[tokio::test]
async fn past_max_requests_a_request_gets_503_overloaded_at_once_and_never_reaches_the_upstream() {
    let up = Upstream::scripted([Reply::Delayed(Duration::from_millis(1500), 200)]).await;
    let sidecar = sidecar_with(&up, "max_requests: 2").await;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let outbound = sidecar.outbound;
            tokio::spawn(async move {
                let req = http::Request::get("/")
                    .header("host", "payments")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                outrigger_tests::send(outbound, req).await.expect("answered").status()
            })
        })
        .collect();
    wait_until(DEADLINE, "two requests in flight at the upstream", || async {
        (up.requests() == 2).then_some(())
    })
    .await;

    let started = tokio::time::Instant::now();
    let refused = sidecar.get("payments", "/third").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["outrigger-error"], "overloaded");
    assert!(
        String::from_utf8_lossy(refused.body()).contains("max_requests"),
        "the body names the limit: {:?}",
        refused.body()
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "not at once: {:?}",
        started.elapsed()
    );
    assert_eq!(up.requests(), 2, "the refused request was not forwarded");
    assert_eq!(shed(&sidecar, "max_requests").await, Some(1.0));

    for request in slow {
        assert_eq!(request.await.unwrap(), 200, "the admitted requests complete");
    }
    // their slots are free again
    assert_eq!(sidecar.get("payments", "/fourth").await.status(), 200);
    assert_eq!(up.requests(), 3);
}
