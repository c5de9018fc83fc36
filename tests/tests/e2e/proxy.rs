//! Forwarding: how an application reaches its upstreams through the sidecar.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrigger_tests::{Reply, Sidecar, Upstream, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_host_header_naming_an_upstream_reaches_it_with_path_query_and_host_kept() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&up.yaml("payments")).await;

    let res = sidecar.get("payments", "/charge?id=7&x=%20y").await;

    assert_eq!(res.status(), 200);
    assert_eq!(res.body(), "200 from upstream\n");
    assert!(res.headers().get("outrigger-error").is_none());
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/charge?id=7&x=%20y");
    assert_eq!(seen[0].headers["host"], "payments");
}

#[tokio::test]
async fn an_absolute_form_request_works_as_a_forward_proxy() {
    let up = Upstream::status(201).await;
    let sidecar = Sidecar::start(&up.yaml("payments")).await;

    let req = Request::get("http://payments/charge")
        .header("host", "payments")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = sidecar.send(req).await;

    assert_eq!(res.status(), 201);
    assert_eq!(up.requests(), 1);
    assert_eq!(up.seen()[0].uri, "/charge", "the upstream gets origin-form");
}

#[tokio::test]
async fn a_dedicated_listen_port_sends_every_request_to_its_upstream() {
    let up = Upstream::status(200).await;
    let port = free_port();
    let yaml = format!(
        "upstreams:\n  payments:\n    listen: 127.0.0.1:{port}\n    discovery: {{ static: [\"{}\"] }}\n",
        up.addr()
    );
    let _sidecar = Sidecar::start(&yaml).await;

    let req = Request::get("/any")
        .header("host", "whatever.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = outrigger_tests::send(([127, 0, 0, 1], port).into(), req).await.unwrap();

    assert_eq!(res.status(), 200);
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn an_unknown_authority_gets_404_and_nothing_is_forwarded() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&up.yaml("payments")).await;

    let by_host = sidecar.get("evil.example.com", "/").await;
    let req = Request::get("http://evil.example.com/").body(Full::new(Bytes::new())).unwrap();
    let absolute = sidecar.send(req).await;

    for res in [by_host, absolute] {
        assert_eq!(res.status(), 404);
        assert_eq!(res.headers()["outrigger-error"], "unknown-upstream");
    }
    assert_eq!(up.requests(), 0, "an open proxy would have forwarded");
}

#[tokio::test]
async fn a_dead_endpoint_gives_502_connect_failed() {
    let dead = free_port();
    let yaml = format!(
        "upstreams:\n  payments:\n    discovery: {{ static: [\"127.0.0.1:{dead}\"] }}\n    timeouts: {{ connect: 500ms }}\n"
    );
    let sidecar = Sidecar::start(&yaml).await;

    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["outrigger-error"], "connect-failed");
}

#[tokio::test]
async fn an_upstream_that_drops_the_connection_gives_502_upstream_reset() {
    let up = Upstream::scripted([Reply::Reset]).await;
    let sidecar = Sidecar::start(&up.yaml("payments")).await;

    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["outrigger-error"], "upstream-reset");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_at_the_idle_timeout_on_both_sides() {
    let up = Upstream::scripted([Reply::Stall]).await;
    let limits = "outbound:\n  listen: \"$OUTBOUND\"\n  limits: { idle_timeout: 500ms }\n";
    let sidecar = Sidecar::start(&format!("{limits}{}", up.yaml("payments"))).await;

    let started = tokio::time::Instant::now();
    let request = b"GET / HTTP/1.1\r\nhost: payments\r\n\r\n";
    let answer = sidecar.raw(request, Duration::from_secs(5)).await;
    let took = started.elapsed();

    assert!(answer.starts_with("HTTP/1.1 200 OK"), "the head and the first bytes came: {answer}");
    assert!(took >= Duration::from_millis(400), "closed after {took:?}: before the idle timeout");
    assert!(took < Duration::from_secs(3), "still open after {took:?}");
    outrigger_tests::wait_until(
        outrigger_tests::DEADLINE,
        "the stalled upstream stream closed",
        || async { (up.open_drips() == 0).then_some(()) },
    )
    .await;
    up.set_script([Reply::Status(200)]);
    sidecar.assert_still_serving("payments").await;
}

#[tokio::test]
async fn an_upstream_error_status_passes_through_unchanged() {
    let up = Upstream::status(503).await;
    let sidecar = Sidecar::start(&up.yaml("payments")).await;

    let res = sidecar.get("payments", "/").await;

    assert_eq!(res.status(), 503);
    assert_eq!(res.body(), "503 from upstream\n");
    assert!(res.headers().get("outrigger-error").is_none(), "the upstream's answer, not ours");
}

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&up.yaml("payments")).await;

    let req = Request::get("/")
        .header("host", "payments")
        .header("connection", "x-secret-hop")
        .header("x-secret-hop", "1")
        .header("connection", "keep-alive, x-second-hop")
        .header("x-second-hop", "1")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("keep-alive", "timeout=5")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sidecar.send(req).await.status(), 200);

    let headers = &up.seen()[0].headers;
    for hop in ["x-secret-hop", "x-second-hop", "proxy-authorization", "keep-alive", "connection"] {
        assert!(headers.get(hop).is_none(), "{hop} was forwarded");
    }
    assert_eq!(headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn http2_prior_knowledge_reaches_the_upstream_as_http2() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&up.yaml("grpc")).await;

    let stream = tokio::net::TcpStream::connect(sidecar.outbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an h2c handshake with the sidecar");
    tokio::spawn(conn);
    let req = Request::post("http://grpc/pkg.Service/Method")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();

    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), Version::HTTP_2);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, Version::HTTP_2, "auto protocol: h2 in, h2 out");
    assert_eq!(seen[0].uri.path(), "/pkg.Service/Method");
    assert_eq!(seen[0].headers["te"], "trailers");
}

/// A body generated on the fly: never held whole anywhere.
struct Generated {
    left: u64,
    chunk: Bytes,
}

impl hyper::body::Body for Generated {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        let data = self.chunk.slice(..n as usize);
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
    }
}

#[tokio::test]
async fn a_large_body_streams_through_without_being_buffered() {
    const SIZE: u64 = 512 * 1024 * 1024;
    let up = Upstream::scripted([Reply::CountBody]).await;
    let sidecar = Sidecar::start(&up.yaml("uploads")).await;
    let before = sidecar.peak_rss_kib();

    let body = Generated { left: SIZE, chunk: Bytes::from(vec![b'x'; 64 * 1024]) };
    let req = Request::post("/upload").header("host", "uploads").body(body).unwrap();
    let res = sidecar.send(req).await;

    assert_eq!(res.status(), 200);
    assert_eq!(res.body(), &SIZE.to_string(), "every byte arrived");
    let grew = sidecar.peak_rss_kib().saturating_sub(before);
    assert!(
        grew < 64 * 1024,
        "peak memory grew by {grew} KiB for a {SIZE}-byte body: it was buffered"
    );
}

#[tokio::test]
async fn a_websocket_style_upgrade_is_tunnelled_to_the_endpoint() {
    let up = Upstream::scripted([Reply::UpgradeEcho]).await;
    let sidecar = Sidecar::start(&up.yaml("ws")).await;

    let mut stream = tokio::net::TcpStream::connect(sidecar.outbound).await.unwrap();
    stream
        .write_all(
            b"GET /socket HTTP/1.1\r\nhost: ws\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed before the 101; got {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));

    stream.write_all(b"ping through the tunnel").await.unwrap();
    let mut echoed = [0u8; 23];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"ping through the tunnel");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn requests_are_balanced_round_robin_over_static_endpoints() {
    let (a, b) = (Upstream::status(200).await, Upstream::status(200).await);
    let yaml = format!(
        "upstreams:\n  payments:\n    load_balancer: round_robin\n    discovery: {{ static: [\"{}\", \"{}\"] }}\n",
        a.addr(),
        b.addr()
    );
    let sidecar = Sidecar::start(&yaml).await;

    for _ in 0..10 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }

    assert_eq!((a.requests(), b.requests()), (5, 5));
}

/// The threads named like tokio's workers in the sidecar's process.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .filter(|name| name.trim() == "tokio-rt-worker")
        .count()
}

#[tokio::test]
async fn runtime_workers_sets_the_serving_threads_and_one_worker_serves_on_the_main_thread() {
    let up = Upstream::status(200).await;
    for (workers, expected_threads) in [(1, 0), (3, 3)] {
        let yaml = format!("{}runtime: {{ workers: {workers} }}\n", up.yaml("payments"));
        let sidecar = Sidecar::start(&yaml).await;

        let res = sidecar.get("payments", "/").await;

        assert_eq!(res.status(), 200, "workers: {workers}");
        assert_eq!(worker_threads(sidecar.pid()), expected_threads, "workers: {workers}");
    }
    assert_eq!(up.requests(), 2);
}
