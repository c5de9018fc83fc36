//! HTTPS through the sidecar: TLS origination to upstreams (`upstreams.NAME.tls`), against a
//! local TLS server with a test CA, and CONNECT tunnels for apps that use `HTTPS_PROXY`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrigger_tests::{DEADLINE, Pki, Reply, SERVER_NAME, Sidecar, TlsServer, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One upstream `name` on `up`, with `tls` (the inside of `tls: { … }`) and more YAML lines.
fn tls_yaml(name: &str, up: &Upstream, tls: &str, more: &str) -> String {
    format!(
        "upstreams:\n  {name}:\n    discovery: {{ static: [\"{}\"] }}\n    tls: {{ {tls} }}\n{more}",
        up.addr()
    )
}

fn trusting(pki: &Pki) -> String {
    format!("server_name: {SERVER_NAME}, ca_file: \"{}\"", pki.ca_file.display())
}

fn body(res: &http::Response<Bytes>) -> String {
    String::from_utf8_lossy(res.body()).into_owned()
}

// --- TLS origination ---

#[tokio::test]
async fn plain_http_from_the_app_reaches_a_tls_upstream_and_its_answer_comes_back() {
    let pki = Pki::new();
    let up = Upstream::scripted_tls([Reply::Status(201)], &pki, TlsServer::new()).await;
    let sidecar = Sidecar::start(&tls_yaml("payments", &up, &trusting(&pki), "")).await;

    let res = sidecar.get("payments", "/charge?id=7").await;

    assert_eq!(res.status(), 201, "{}", body(&res));
    assert_eq!(body(&res), "201 from upstream\n");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/charge?id=7");
    assert_eq!(seen[0].headers["host"], "payments", "the Host header is passed unchanged");
    assert_eq!(seen[0].version, Version::HTTP_11);
}

#[tokio::test]
async fn an_http_health_check_of_a_tls_upstream_speaks_tls() {
    let pki = Pki::new();
    let up = Upstream::scripted_tls([Reply::Status(200)], &pki, TlsServer::new()).await;
    up.set_health(200);
    let check = "    health_check: { path: /healthz, interval: 100ms, timeout: 1s }\n";
    // readiness waits for the first probe: a probe in plain HTTP would leave it unhealthy
    let sidecar = Sidecar::start(&tls_yaml("payments", &up, &trusting(&pki), check)).await;

    assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    assert!(up.health_checks() > 0);
    let (_, ready) = sidecar.admin("/readyz").await;
    assert!(ready.contains("1 endpoint(s), 1 healthy"), "{ready}");
}

#[tokio::test]
async fn a_503_over_tls_is_retried_like_any_other() {
    let pki = Pki::new();
    let script = [Reply::Status(503), Reply::Status(200)];
    let up = Upstream::scripted_tls(script, &pki, TlsServer::new()).await;
    let retry =
        "    retry: { max_attempts: 3, backoff: { initial: 10ms, max: 50ms, jitter: none } }\n";
    let sidecar = Sidecar::start(&tls_yaml("payments", &up, &trusting(&pki), retry)).await;

    let res = sidecar.get("payments", "/charge").await;

    assert_eq!(res.status(), 200, "{}", body(&res));
    assert_eq!(res.headers()["outrigger-attempts"], "2");
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn an_http1_request_works_against_an_http1_only_tls_server() {
    let pki = Pki::new();
    let server = TlsServer::new().http1_only();
    let up = Upstream::scripted_tls([Reply::Status(200)], &pki, server).await;
    let sidecar = Sidecar::start(&tls_yaml("payments", &up, &trusting(&pki), "")).await;

    let res = sidecar.get("payments", "/x").await;

    assert_eq!(res.status(), 200, "{}", body(&res));
    assert_eq!(up.seen()[0].version, Version::HTTP_11);
}

#[tokio::test]
async fn an_http2_client_reaches_a_tls_upstream_over_h2_negotiated_by_alpn() {
    let pki = Pki::new();
    let up = Upstream::scripted_tls([Reply::Status(200)], &pki, TlsServer::new()).await;
    let sidecar = Sidecar::start(&tls_yaml("payments", &up, &trusting(&pki), "")).await;

    let mut sender = h2c(&sidecar).await;
    let req = Request::get("http://payments/h2").body(Full::new(Bytes::new())).unwrap();
    let res = sender.send_request(req).await.expect("an answer");

    assert_eq!(res.status(), 200);
    assert_eq!(up.seen()[0].version, Version::HTTP_2, "auto protocol: h2 in, h2 out, over TLS");
}

#[tokio::test]
async fn without_server_name_the_upstreams_name_is_verified() {
    let pki = Pki::new();
    let up = Upstream::scripted_tls([Reply::Status(200)], &pki, TlsServer::new()).await;
    let tls = format!("ca_file: \"{}\"", pki.ca_file.display());
    // the upstream is named after the certificate's name, as for an external API
    let sidecar = Sidecar::start(&tls_yaml(SERVER_NAME, &up, &tls, "")).await;

    let res = sidecar.get(SERVER_NAME, "/x").await;

    assert_eq!(res.status(), 200, "{}", body(&res));
}

#[tokio::test]
async fn an_untrusted_ca_fails_with_502_connect_failed_and_reaches_no_handler() {
    let pki = Pki::new();
    let up = Upstream::scripted_tls([Reply::Status(200)], &pki, TlsServer::new()).await;
    let tls = format!("server_name: {SERVER_NAME}, ca_file: \"{}\"", pki.other_ca_file.display());
    // a handshake failure is a connect failure: retried for any method, as nothing was sent
    let retry = "    retry: { max_attempts: 2, on: [connect-failure], backoff: { initial: 10ms, max: 20ms, jitter: none } }\n";
    let sidecar = Sidecar::start(&tls_yaml("payments", &up, &tls, retry)).await;

    let req = Request::post("/charge")
        .header("host", "payments")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = sidecar.send(req).await;

    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["outrigger-error"], "connect-failed");
    assert_eq!(res.headers()["outrigger-attempts"], "2");
    assert!(body(&res).contains("invalid peer certificate: UnknownIssuer"), "{}", body(&res));
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_wrong_server_name_fails_with_502_connect_failed_and_reaches_no_handler() {
    let pki = Pki::new();
    let up = Upstream::scripted_tls([Reply::Status(200)], &pki, TlsServer::new()).await;
    let tls = format!("server_name: other.test, ca_file: \"{}\"", pki.ca_file.display());
    let sidecar = Sidecar::start(&tls_yaml("payments", &up, &tls, "")).await;

    let res = sidecar.get("payments", "/charge").await;

    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["outrigger-error"], "connect-failed");
    assert!(body(&res).contains("invalid peer certificate"), "{}", body(&res));
    assert!(body(&res).contains("other.test"), "{}", body(&res));
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_server_that_never_completes_the_handshake_fails_within_the_connect_timeout() {
    // accepts TCP, then says nothing: the handshake hangs until timeouts.connect
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let pki = Pki::new();
    let yaml = format!(
        "upstreams:\n  payments:\n    discovery: {{ static: [\"{addr}\"] }}\n    timeouts: {{ connect: 200ms, request: 5s }}\n    tls: {{ {} }}\n",
        trusting(&pki)
    );
    let sidecar = Sidecar::start(&yaml).await;

    let started = tokio::time::Instant::now();
    let res = sidecar.get("payments", "/charge").await;

    assert_eq!(res.status(), 502, "{}", body(&res));
    assert_eq!(res.headers()["outrigger-error"], "connect-failed");
    assert!(body(&res).contains("no TLS connection within 200ms"), "{}", body(&res));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "bounded by the connect timeout, not the request's"
    );
    held.abort();
}

#[tokio::test]
async fn mutual_tls_succeeds_with_the_client_certificate_and_fails_without() {
    let pki = Pki::new();
    let server = TlsServer::new().requiring_client_cert();
    let up = Upstream::scripted_tls([Reply::Status(200)], &pki, server).await;
    let with_cert = format!(
        "{}, cert_file: \"{}\", key_file: \"{}\"",
        trusting(&pki),
        pki.client_cert_file.display(),
        pki.client_key_file.display()
    );
    let yaml = format!(
        "{}  anonymous:\n    discovery: {{ static: [\"{}\"] }}\n    tls: {{ {} }}\n",
        tls_yaml("payments", &up, &with_cert, ""),
        up.addr(),
        trusting(&pki)
    );
    let sidecar = Sidecar::start(&yaml).await;

    let res = sidecar.get("payments", "/with-cert").await;
    assert_eq!(res.status(), 200, "{}", body(&res));

    let res = sidecar.get("anonymous", "/without-cert").await;
    // TLS 1.3: the server refuses the missing certificate just after the handshake, so this
    // shows as the connection failing under the request rather than at connect
    assert_eq!(res.status(), 502, "{}", body(&res));
    assert_eq!(res.headers()["outrigger-error"], "upstream-reset");
    assert!(body(&res).contains("CertificateRequired"), "{}", body(&res));
    assert_eq!(up.requests(), 1, "only the request with a certificate reached the handler");
    assert_eq!(up.seen()[0].uri, "/with-cert");
}

/// Runs `outrigger run` on one TLS upstream with `tls`; it must exit 1. Returns its stderr.
fn refused_start(pki: &Pki, tls: &str) -> String {
    let config = pki.ca_file.with_file_name("outrigger.yaml");
    let yaml = format!(
        "upstreams:\n  payments:\n    discovery: {{ static: [\"127.0.0.1:9\"] }}\n    tls: {{ {tls} }}\n"
    );
    std::fs::write(&config, yaml).unwrap();
    let out = Command::new(outrigger_tests::binary())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run outrigger");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

#[test]
fn a_missing_ca_file_stops_the_start_naming_the_field_and_the_file() {
    let pki = Pki::new();
    let missing = pki.ca_file.with_file_name("missing-ca.pem");

    let stderr = refused_start(&pki, &format!("ca_file: \"{}\"", missing.display()));

    let expected =
        format!("upstreams.payments.tls.ca_file: cannot read {}: No such file", missing.display());
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn a_key_that_does_not_fit_the_client_certificate_stops_the_start() {
    let pki = Pki::new();
    let tls = format!(
        "{}, cert_file: \"{}\", key_file: \"{}\"",
        trusting(&pki),
        pki.client_cert_file.display(),
        pki.stray_key_file.display()
    );

    let stderr = refused_start(&pki, &tls);

    assert!(
        stderr.contains("upstreams.payments.tls.key_file: cannot be used with cert_file"),
        "{stderr}"
    );
}

// --- CONNECT tunnels ---

/// Opens a connection to the sidecar, sends `CONNECT target`, and returns the stream and the
/// answer's head (read byte by byte, so nothing of the tunnel is consumed).
async fn connect(sidecar: &Sidecar, target: &str) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(sidecar.outbound).await.expect("connect to the sidecar");
    let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = async {
        while !answer.ends_with(b"\r\n\r\n") {
            let byte = stream.read_u8().await.expect("the answer's head");
            answer.push(byte);
        }
    };
    tokio::time::timeout(DEADLINE, read).await.expect("an answer to CONNECT");
    (stream, String::from_utf8_lossy(&answer).into_owned())
}

/// What comes after the head until the sidecar closes the connection.
async fn rest(mut stream: TcpStream) -> String {
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("the sidecar closes the connection")
        .unwrap();
    String::from_utf8_lossy(&rest).into_owned()
}

#[tokio::test]
async fn connect_to_a_configured_upstream_tunnels_bytes_untouched() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&up.yaml("payments")).await;

    let (stream, head) = connect(&sidecar, "payments:443").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // HTTP/1.1 through the tunnel, with headers the sidecar would strip from a request it
    // forwards itself: the upstream sees them, so the tunnel is byte-transparent
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 through the tunnel");
    tokio::spawn(conn);
    let req = Request::get("/through-the-tunnel")
        .header("host", "payments")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("proxy-authorization", "Basic eDp5")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = sender.send_request(req).await.expect("the upstream answers through the tunnel");
    assert_eq!(res.status(), 200);
    let got = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, "200 from upstream\n");

    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/through-the-tunnel");
    assert_eq!(seen[0].headers["x-hop"], "1");
    assert_eq!(seen[0].headers["proxy-authorization"], "Basic eDp5");
    assert!(seen[0].headers.get("outrigger-attempts").is_none());
}

#[tokio::test]
async fn connect_to_an_unknown_host_gets_404_and_nothing_is_opened() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&up.yaml("payments")).await;
    // a listener the CONNECT names directly: an open proxy would dial it
    let bait = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bait_addr: SocketAddr = bait.local_addr().unwrap();

    let (stream, head) = connect(&sidecar, &bait_addr.to_string()).await;

    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(head.contains("outrigger-error: unknown-upstream"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    rest(stream).await;
    // a tunnel is dialled before its answer, so a dial would be in the accept queue by now
    let accepted = tokio::time::timeout(Duration::ZERO, bait.accept()).await;
    assert!(accepted.is_err(), "the sidecar connected to an address that names no upstream");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn connect_to_a_dead_endpoint_gets_502_connect_failed_after_its_retries() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let yaml = format!(
        "upstreams:\n  payments:\n    discovery: {{ static: [\"{dead}\"] }}\n    retry: {{ max_attempts: 2, backoff: {{ initial: 10ms, max: 20ms, jitter: none }} }}\n"
    );
    let sidecar = Sidecar::start(&yaml).await;

    let (stream, head) = connect(&sidecar, "payments:443").await;

    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(head.contains("outrigger-error: connect-failed"), "{head}");
    assert!(head.contains("outrigger-attempts: 2"), "a tunnel's connect is retried: {head}");
    assert!(head.contains("connection: close"), "{head}");
    let body = rest(stream).await;
    assert!(body.contains(&format!("tcp connect to {dead}")), "{body}");
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_at_the_outbound_idle_timeout() {
    let up = Upstream::status(200).await;
    // (the guard re-arms its timer for idleness when its header deadline fires: keep that earlier)
    let outbound = "outbound: { listen: \"$OUTBOUND\", limits: { header_read_timeout: 200ms, idle_timeout: 300ms } }\n";
    let sidecar = Sidecar::start(&format!("{outbound}{}", up.yaml("payments"))).await;

    let (stream, head) = connect(&sidecar, "payments:443").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    let started = tokio::time::Instant::now();
    assert_eq!(rest(stream).await, "", "nothing crosses an idle tunnel");
    let idle = started.elapsed();
    assert!(idle >= Duration::from_millis(250), "closed after {idle:?}, before it was idle");
    assert!(idle < Duration::from_secs(3), "closed after {idle:?}, not at the idle timeout");
}

#[tokio::test]
async fn connect_over_http2_is_refused_with_400() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&up.yaml("payments")).await;

    let mut sender = h2c(&sidecar).await;
    let req = Request::connect("payments:443").body(Full::new(Bytes::new())).unwrap();
    let res = sender.send_request(req).await.expect("an answer");

    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["outrigger-error"], "bad-request");
    let text = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("use HTTP/1.1"), "{text:?}");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn connect_tunnels_meet_the_upstreams_rate_limit() {
    let up = Upstream::status(200).await;
    let limit = "    rate_limit: { requests_per_second: 1, burst: 1 }\n";
    let sidecar = Sidecar::start(&format!("{}{limit}", up.yaml("payments"))).await;

    let (_open, first) = connect(&sidecar, "payments:443").await;
    let (_, second) = connect(&sidecar, "payments:443").await;

    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(second.starts_with("HTTP/1.1 429"), "{second}");
    assert!(second.contains("outrigger-error: rate-limited"), "{second}");
}

/// An HTTP/2 (prior knowledge) connection to the sidecar's outbound port.
async fn h2c(sidecar: &Sidecar) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(sidecar.outbound).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an h2c handshake with the sidecar");
    tokio::spawn(conn);
    sender
}
