//! Messaging: `POST /v1/publish/{queue}` on the outbound listener, the durable store behind it,
//! and what survives a `kill -9`.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use outrigger_tests::{Sidecar, Upstream, send};

/// Every test stores its messages in its own scratch directory.
const YAML: &str = "messaging: { data_dir: \"$SCRATCH/data\", dedup_window: 1h }\n";

pub(crate) fn publish(queue: &str) -> http::request::Builder {
    Request::post(format!("/v1/publish/{queue}")).header("host", "localhost")
}

pub(crate) async fn post(
    sidecar: &Sidecar,
    queue: &str,
    body: &str,
    key: Option<&str>,
) -> (u16, String) {
    let mut req = publish(queue).header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let res = sidecar.send(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await;
    (res.status().as_u16(), String::from_utf8_lossy(res.body()).into_owned())
}

pub(crate) fn id_of(body: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(body).expect("a JSON answer");
    json["id"].as_str().expect("an id").to_owned()
}

/// The value of an unlabelled or fully spelled-out metric line.
pub(crate) async fn metric(sidecar: &Sidecar, series: &str) -> Option<f64> {
    let (_, text) = sidecar.admin("/metrics").await;
    value(&text, series)
}

/// The same, in a scrape already read.
pub(crate) fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

pub(crate) async fn queues(sidecar: &Sidecar) -> serde_json::Value {
    let (status, body) = sidecar.admin("/v1/queues").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/v1/queues answers JSON")
}

#[tokio::test]
async fn publish_answers_202_with_an_id_once_stored() {
    let sidecar = Sidecar::start(YAML).await;

    let (status, body) = post(&sidecar, "orders.created", r#"{"order": 42}"#, None).await;
    assert_eq!(status, 202, "{body}");
    let id = id_of(&body);
    assert_eq!(id.len(), 26, "{id}");

    let (status, second) = post(&sidecar, "orders.created", "[1, 2]", None).await;
    assert_eq!(status, 202);
    assert!(id_of(&second) > id, "ids sort by publish order");
    assert_eq!(
        metric(&sidecar, r#"outrigger_messages_published_total{queue="orders.created"}"#).await,
        Some(2.0)
    );
    assert_eq!(metric(&sidecar, "outrigger_outbox_pending").await, Some(2.0));
    let depth = r#"outrigger_queue_depth{queue="orders.created"}"#;
    assert_eq!(metric(&sidecar, depth).await, Some(2.0));
    let age = r#"outrigger_queue_oldest_age_seconds{queue="orders.created"}"#;
    assert!(metric(&sidecar, age).await.is_some_and(|s| (0.0..60.0).contains(&s)));
    assert_eq!(queues(&sidecar).await["queues"][0]["messages"], 2);
    assert_eq!(queues(&sidecar).await["queues"][0]["queue"], "orders.created");
}

#[tokio::test]
async fn bad_input_gets_a_4xx_with_a_reason_and_nothing_is_stored() {
    let sidecar = Sidecar::start(YAML).await;

    let (status, body) = post(&sidecar, "orders", "{not json", None).await;
    assert_eq!(status, 400);
    assert!(body.contains("not JSON"), "{body}");
    let (status, body) = post(&sidecar, "orders!", "{}", None).await;
    assert_eq!(status, 400);
    assert!(body.contains("queue name"), "{body}");
    let big = format!("[{}0]", "0,".repeat(600_000));
    let (status, body) = post(&sidecar, "orders", &big, None).await;
    assert_eq!(status, 413);
    assert!(body.contains("larger than 1048576 bytes"), "{body}");

    let res =
        sidecar.send(publish("orders").body(Full::new(Bytes::from_static(b"x"))).unwrap()).await;
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["outrigger-error"], "bad-request");
    let res = sidecar.get("localhost", "/v1/publish/orders").await;
    assert_eq!(res.status(), 405, "publishing is a POST");

    assert_eq!(metric(&sidecar, "outrigger_outbox_pending").await, Some(0.0));
    assert_eq!(queues(&sidecar).await["queues"], serde_json::json!([]));
}

#[tokio::test]
async fn the_same_idempotency_key_twice_gives_the_same_id_and_stores_once() {
    let sidecar = Sidecar::start(YAML).await;

    let (status, first) = post(&sidecar, "payments", r#"{"charge": 1}"#, Some("order-7")).await;
    assert_eq!(status, 202);
    let (status, again) = post(&sidecar, "payments", r#"{"charge": 1}"#, Some("order-7")).await;
    assert_eq!(status, 202);
    assert_eq!(id_of(&first), id_of(&again));
    let (_, other) = post(&sidecar, "payments", r#"{"charge": 1}"#, Some("order-8")).await;
    assert_ne!(id_of(&first), id_of(&other));

    assert_eq!(metric(&sidecar, "outrigger_outbox_pending").await, Some(2.0));
    assert_eq!(
        metric(&sidecar, r#"outrigger_messages_published_total{queue="payments"}"#).await,
        Some(2.0)
    );
}

#[tokio::test]
async fn a_v1_path_for_another_authority_is_proxied_as_before() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&format!("{YAML}{}", up.yaml("payments"))).await;

    let req = Request::post("/v1/publish/orders")
        .header("host", "payments")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(sidecar.send(req).await.status(), 200, "the upstream answered");
    assert_eq!(up.requests(), 1);
    assert_eq!(metric(&sidecar, "outrigger_outbox_pending").await, Some(0.0));
}

#[tokio::test]
async fn twenty_accepted_messages_survive_a_kill_9() {
    let mut sidecar = Sidecar::start(YAML).await;

    let publishes: Vec<_> = (0..20)
        .map(|i| {
            let req =
                publish("orders").body(Full::new(Bytes::from(format!(r#"{{"n": {i}}}"#)))).unwrap();
            tokio::spawn(send(sidecar.outbound, req))
        })
        .collect();
    for publish in publishes {
        let res = publish.await.unwrap().expect("the sidecar answers");
        assert_eq!(res.status(), 202, "{:?}", res.body());
    }
    sidecar.kill9();
    sidecar.restart().await;

    assert_eq!(metric(&sidecar, "outrigger_outbox_pending").await, Some(20.0));
    assert_eq!(queues(&sidecar).await["queues"][0]["messages"], 20);
    let (status, _) = post(&sidecar, "orders", "{}", None).await;
    assert_eq!(status, 202, "the reopened store takes new messages");
    assert_eq!(metric(&sidecar, "outrigger_outbox_pending").await, Some(21.0));
}

#[tokio::test]
async fn neither_a_graceful_stop_nor_a_kill_9_makes_the_next_start_repair_the_store() {
    let mut sidecar = Sidecar::start(YAML).await;
    assert_eq!(post(&sidecar, "orders", "{}", None).await.0, 202);

    // SIGTERM: the drain ends by closing the store file
    sidecar.signal("TERM");
    wait_until_exited(&mut sidecar).await;
    sidecar.restart().await;
    assert!(!sidecar.log().contains("repairing the message store"), "{}", sidecar.log());
    assert_eq!(queues(&sidecar).await["queues"][0]["messages"], 1, "the message is still there");

    // kill -9 right after a publish: the log holds it, and the file needs no walk of its
    // trees either (each checkpoint saves what a repair would rebuild)
    assert_eq!(post(&sidecar, "orders", "{}", None).await.0, 202);
    sidecar.kill9();
    sidecar.restart().await;
    assert!(!sidecar.log().contains("repairing the message store"), "{}", sidecar.log());
    assert_eq!(queues(&sidecar).await["queues"][0]["messages"], 2);
}

async fn wait_until_exited(sidecar: &mut Sidecar) {
    outrigger_tests::wait_until(outrigger_tests::DEADLINE, "the sidecar to exit", || {
        let exited = sidecar.exited();
        async move { exited.then_some(()) }
    })
    .await;
}

/// The messages a queue holds, as `/v1/queues` counts them.
async fn depth(sidecar: &Sidecar, queue: &str) -> u64 {
    let all = queues(sidecar).await;
    let found = all["queues"].as_array().unwrap().iter().find(|q| q["queue"] == queue);
    found.map_or(0, |q| q["messages"].as_u64().expect("a count"))
}

/// A data directory written by the release before the write-ahead log (a copy of a file it
/// made, `tests/fixtures/store-before-wal`) opens with every message, and takes
/// writes through the log from then on.
#[tokio::test]
async fn a_store_written_before_the_log_opens_with_every_message_it_held() {
    let dir = std::env::temp_dir().join(format!("outrigger-e2e-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/store-before-wal/messages.redb");
    std::fs::copy(&fixture, dir.join("data/messages.redb")).expect("the fixture store");
    let app = Upstream::status(200).await;
    let yaml = format!(
        "service: {{ name: shop, app: {{ url: \"http://{}\" }} }}\nmessaging:\n  data_dir: \
         \"{}/data\"\n  subscriptions:\n    - {{ queue: orders, path: /events/orders }}\n",
        app.addr(),
        dir.display()
    );
    let mut sidecar = Sidecar::start(&yaml).await;

    let seen = crate::delivery::deliveries(&app, 3).await;
    let mut delivered: Vec<(String, serde_json::Value)> = seen
        .iter()
        .map(|s| {
            let envelope = crate::delivery::envelope(s);
            (envelope["id"].as_str().unwrap().to_owned(), envelope["payload"]["n"].clone())
        })
        .collect();
    delivered.sort_by(|a, b| a.0.cmp(&b.0));
    let expected = [
        ("01M95GK8YKV4B1RGCWX9K4GRTB", 1),
        ("01M95GK8YYE68FMJVBEZG926V5", 2),
        ("01M95GK8ZAQH36B3CVCFPP93TV", 3),
    ];
    let expected: Vec<(String, serde_json::Value)> =
        expected.iter().map(|(id, n)| ((*id).to_owned(), (*n).into())).collect();
    assert_eq!(delivered, expected, "every message of the old file, whole");
    assert_eq!(depth(&sidecar, "audit").await, 1);

    // written through the log from now on: a publish survives a kill -9
    assert_eq!(post(&sidecar, "audit", "{}", None).await.0, 202);
    sidecar.kill9();
    sidecar.restart().await;
    assert_eq!(depth(&sidecar, "audit").await, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn past_a_thousand_queues_the_publish_counter_gives_the_rest_one_series() {
    let sidecar = Sidecar::start(YAML).await;
    for n in 0..1003 {
        let (status, body) = post(&sidecar, &format!("q{n}"), "{}", None).await;
        assert_eq!(status, 202, "{body}");
    }
    let (_, text) = sidecar.admin("/metrics").await;
    let own = text.lines().filter(|l| l.starts_with("outrigger_messages_published_total{")).count();
    assert_eq!(own, 1001, "a thousand queues, and one series for the rest");
    assert_eq!(value(&text, r#"outrigger_messages_published_total{queue="(other)"}"#), Some(3.0));
    assert_eq!(value(&text, r#"outrigger_messages_published_total{queue="q0"}"#), Some(1.0));
    assert!(sidecar.log().contains("the rest are counted as queue=\"(other)\""));
}
