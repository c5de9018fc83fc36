//! The demo's messaging scene: the app publishes a welcome email every quarter second to the
//! sidecar, which delivers each to a scripted handler. One message in five is flaky (the
//! handler answers 503 twice, then 200: two error records, then acknowledged); one in ten is
//! poison (500 with a stack trace, every time: dead-lettered after three attempts).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{CONTENT_TYPE, HOST};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;

use crate::http::Body;

pub(crate) const QUEUE: &str = "welcome_email";
const EVERY: Duration = Duration::from_millis(250);

/// What the handler saw.
#[derive(Debug, Default)]
pub(crate) struct Handled {
    pub published: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// The envelope of the last poison message's last attempt: its error history.
    pub last_poison: Mutex<Option<String>>,
    /// From now on every message succeeds (the fix is deployed).
    pub fixed: std::sync::atomic::AtomicBool,
}

/// Starts the scripted handler on a free loopback port.
pub(crate) async fn handler(handled: Arc<Handled>) -> std::io::Result<SocketAddr> {
    super::upstreams::serve(move |req| handle(handled.clone(), req)).await
}

async fn handle(
    handled: Arc<Handled>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let attempt: u32 = req
        .headers()
        .get("outrigger-attempt")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(1);
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let user = envelope["payload"]["user"].as_u64().unwrap_or(0);
    let fixed = handled.fixed.load(Ordering::Relaxed);
    let (status, answer) = if user % 10 == 7 && !fixed {
        if attempt == 3 {
            *handled.last_poison.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(String::from_utf8_lossy(&body).into_owned());
        }
        let answer =
            r#"{"error":"no such mailbox","stack_trace":"at send_welcome (mailer.rs:42)"}"#;
        (StatusCode::INTERNAL_SERVER_ERROR, answer)
    } else if user % 5 == 3 && attempt < 3 {
        (StatusCode::SERVICE_UNAVAILABLE, "mail server busy")
    } else {
        (StatusCode::OK, "sent")
    };
    let counter = if status.is_success() { &handled.ok } else { &handled.failed };
    counter.fetch_add(1, Ordering::Relaxed);
    let mut res = Response::new(Body::full(answer));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, "application/json".parse().expect("valid"));
    Ok(res)
}

/// Publishes a welcome email every [`EVERY`] until `until`, as the app would.
pub(crate) async fn publish(
    client: Client<HttpConnector, Body>,
    outbound: SocketAddr,
    handled: Arc<Handled>,
    until: Instant,
) {
    let mut user = 0u64;
    while Instant::now() < until {
        let req = Request::post(format!("http://{outbound}/v1/publish/{QUEUE}"))
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, "application/json")
            .body(Body::full(format!(r#"{{"user":{user},"email":"user{user}@example.com"}}"#)))
            .expect("a valid publish");
        if let Ok(res) = client.request(req).await
            && res.status() == StatusCode::ACCEPTED
        {
            handled.published.fetch_add(1, Ordering::Relaxed);
        }
        user += 1;
        tokio::time::sleep(EVERY).await;
    }
}

/// The sidecar's own delivery counters for the scene's queue, from its `/metrics` text.
pub(crate) fn counts(metrics: &str) -> [u64; 3] {
    ["acked", "retried", "dead_lettered"].map(|outcome| {
        let labels = [("outcome", outcome), ("queue", QUEUE)];
        super::metric(metrics, "outrigger_messages_delivered_total", &labels)
    })
}

/// `POST /v1/dlq/QUEUE_deadletter/replay {"all": true}` on the admin port: how many moved.
pub(crate) async fn replay_all(
    client: &Client<HttpConnector, Body>,
    admin: SocketAddr,
) -> Result<u64, String> {
    let req = Request::post(format!("http://{admin}/v1/dlq/{QUEUE}_deadletter/replay"))
        .header(CONTENT_TYPE, "application/json")
        .body(Body::full(r#"{"all":true}"#))
        .expect("a valid request");
    let res = client.request(req).await.map_err(|e| e.to_string())?;
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    answer["replayed"].as_u64().ok_or_else(|| String::from_utf8_lossy(&body).into_owned())
}
