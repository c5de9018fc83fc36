//! The dispatcher against the real embedded store and a real HTTP app on loopback: what it
//! delivers, acknowledges, parks and dead-letters, and how it stops.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use tokio::net::TcpListener;

use super::*;
use crate::messaging::broker::{Embedded, Outbox, Publish, Queue};
use crate::messaging::envelope::{Envelope, MessageId};
use crate::messaging::scratch::Scratch;

const DEADLINE: Duration = Duration::from_secs(10);

/// An app on loopback answering each delivery with `answer(n)` for the n-th (from 0), and
/// keeping every body it got.
struct App {
    addr: std::net::SocketAddr,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl App {
    async fn start(answer: fn(usize) -> u16) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bodies: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let kept = bodies.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let kept = kept.clone();
                let serve = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let kept = kept.clone();
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let n = {
                            let mut kept = kept.lock().unwrap();
                            kept.push(serde_json::from_slice(&body).unwrap());
                            kept.len() - 1
                        };
                        let res = http::Response::builder()
                            .status(answer(n))
                            .body(Full::new(Bytes::from_static(b"{\"error\":\"scripted\"}")))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), serve),
                );
            }
        });
        App { addr, bodies }
    }

    fn deliveries(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// A running dispatcher and its store.
struct Harness {
    store: Embedded,
    /// What a publish to the queue notifies, as `Messaging` does.
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    running: tokio::task::JoinHandle<()>,
}

impl Harness {
    async fn publish(&self, queue: &str, payload: &str) -> MessageId {
        let message = Publish {
            queue: queue.into(),
            payload: RawValue::from_string(payload.into()).unwrap(),
            idempotency_key: None,
            ordering_key: None,
            traceparent: None,
            tracestate: None,
        };
        let id = self.store.publish(vec![message]).await.unwrap()[0].id();
        self.wake.notify_one();
        id
    }
}

/// A dispatcher for `subscription` (YAML of one `subscriptions` entry) delivering to `app`
/// from a store in `dir`.
async fn dispatcher(dir: &Scratch, app: &App, subscription: &str) -> Harness {
    let yaml = format!(
        "service: {{ name: shop, app: {{ url: \"http://{}\" }} }}\nmessaging:\n  subscriptions:\n    - {subscription}\n",
        app.addr
    );
    let cfg = outrigger_config::load_str("test.yaml", &yaml).unwrap();
    let metrics = Metrics::new();
    let retention =
        crate::messaging::broker::embedded::Retention { max_messages: 1000, max_age_ms: 3_600_000 };
    let store =
        Embedded::open(&dir.0, Duration::from_secs(60), retention, metrics.outbox_pending())
            .unwrap();
    let ctx = Context {
        broker: store.clone(),
        service: "shop".into(),
        app_base: format!("http://{}", app.addr),
        dedup_window: Duration::from_secs(60),
        memory: Some(store.clone()),
        metrics,
        tracer: Tracer::disabled(),
        pauses: Arc::default(),
    };
    let wake = Arc::new(Notify::new());
    let subscriber = Subscriber::new(&cfg.messaging.subscriptions[0], &ctx, wake.clone());
    let (stop, stopped) = watch::channel(false);
    let (_app_up, app_up) = watch::channel(true);
    let running = tokio::spawn(subscriber.run(app_up, stopped));
    Harness { store, wake, stop, running }
}

/// The first dead letter of `orders`, once there is one.
async fn dead_letter(store: &Embedded) -> Envelope {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let page = store.dead_letters("orders_deadletter", None, 10).await.unwrap();
        if let Some(dead) = page.messages.into_iter().next() {
            return dead;
        }
        assert!(Instant::now() < deadline, "timed out waiting for the dead letter");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `check` holds, failing with `what` at the deadline.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_message_is_delivered_once_as_its_envelope_then_forgotten() {
    let (dir, app) = (Scratch::new("dispatch"), App::start(|_| 200).await);
    let h = dispatcher(&dir, &app, "{ queue: orders, path: /orders }").await;

    let id = h.publish("orders", r#"{"n":1}"#).await;
    until("the delivery", || app.deliveries().len() == 1).await;
    until("the ack", || h.store.pending() == 0).await;

    let envelope = &app.deliveries()[0];
    assert_eq!(envelope["id"], id.to_string());
    assert_eq!(envelope["queue"], "orders");
    assert_eq!(envelope["payload"], serde_json::json!({ "n": 1 }));
    h.stop.send(true).unwrap();
    tokio::time::timeout(DEADLINE, h.running).await.expect("the dispatcher stops").unwrap();
    assert_eq!(app.deliveries().len(), 1, "delivered once");
}

#[tokio::test]
async fn a_failing_message_is_retried_after_its_backoff_then_dead_lettered_with_its_history() {
    let (dir, app) = (Scratch::new("dispatch"), App::start(|_| 503).await);
    let subscription = "{ queue: orders, path: /orders, max_attempts: 3, \
                        backoff: { initial: 20ms, max: 20ms, jitter: none } }";
    let h = dispatcher(&dir, &app, subscription).await;

    let id = h.publish("orders", r#"{"n":1}"#).await;
    until("three attempts", || app.deliveries().len() == 3).await;
    let dead = dead_letter(&h.store).await;

    assert_eq!(dead.id, id);
    assert_eq!(dead.error.len(), 3, "each attempt's error is in the history");
    assert!(dead.error.iter().all(|e| e.status_code == Some(503)));
    assert_eq!(dead.metadata["original_queue"], "orders");
    assert_eq!(dead.metadata["attempts"], 3);
    assert_eq!(h.store.pending(), 0, "moved, not copied");
    // each retry carried the history so far
    let seen: Vec<usize> =
        app.deliveries().iter().map(|e| e["error"].as_array().unwrap().len()).collect();
    assert_eq!(seen, [0, 1, 2]);
    h.stop.send(true).unwrap();
}

#[tokio::test]
async fn a_refused_message_answered_4xx_is_dead_lettered_at_once() {
    let (dir, app) = (Scratch::new("dispatch"), App::start(|_| 400).await);
    let h = dispatcher(&dir, &app, "{ queue: orders, path: /orders, max_attempts: 5 }").await;

    h.publish("orders", r#"{"n":1}"#).await;
    until("the delivery", || app.deliveries().len() == 1).await;
    let dead = dead_letter(&h.store).await;

    assert_eq!(dead.metadata["attempts"], 1, "a permanent failure is not retried");
    assert_eq!(app.deliveries().len(), 1);
    h.stop.send(true).unwrap();
}
