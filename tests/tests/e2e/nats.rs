//! What only the `nats://` broker does, against a real `nats-server -js`: its streams, subjects
//! and durable consumer as JetStream reports them; streams and consumers made beforehand with
//! settings that would break a promise, refused and never changed; queue names NATS cannot
//! take, refused at the publish. What every broker does is in `brokers.rs`.

use outrigger_tests::{DEADLINE, Nats, Sidecar, Upstream, wait_until};

use crate::brokers::config;
use crate::delivery::{deliveries, envelope, header, publish, wait_metric};

#[tokio::test]
async fn a_message_goes_through_nats_jetstream_to_the_app_and_is_acknowledged() {
    let nats = Nats::start().await;
    let app = Upstream::status(200).await;
    let yaml = format!(
        "service:\n  name: shop\n  app: {{ url: \"http://{}\" }}\n\
         messaging:\n  broker: \"{}\"\n  data_dir: \"$SCRATCH/data\"\n  \
         subscriptions:\n    - {{ queue: orders.created, path: /events/orders }}\n",
        app.addr(),
        nats.url()
    );
    let sidecar = Sidecar::start(&yaml).await;
    let id = publish(&sidecar, "orders.created", r#"{"order": 42}"#, &[]).await;
    let keyed = [("outrigger-ordering-key", "customer-7")];
    publish(&sidecar, "orders.created", r#"{"order": 43}"#, &keyed).await;

    let seen = deliveries(&app, 2).await;
    let first = seen.iter().find(|s| header(s, "outrigger-message-id") == id).expect("delivered");
    assert_eq!(header(first, "outrigger-attempt"), "1");
    assert_eq!(envelope(first)["payload"]["order"], 42);
    let acked = r#"outrigger_messages_delivered_total{outcome="acked",queue="orders.created"}"#;
    wait_metric(&sidecar, acked, 2.0).await;
    wait_metric(&sidecar, "outrigger_outbox_pending", 0.0).await;

    // the stream and the durable consumer, as JetStream reports them
    let stream = nats.stream("OUTRIGGER-Q-orders_dcreated");
    assert_eq!(stream["config"]["subjects"][0], "outrigger.orders.created");
    assert_eq!(stream["config"]["subjects"][1], "outrigger-k.orders_dcreated.*", "keyed messages");
    assert_eq!(stream["config"]["storage"], "file");
    assert_eq!(stream["state"]["messages"], 2);
    assert_eq!(stream["state"]["num_subjects"], 2, "one subject each: unkeyed, and the key's");
    let consumer = nats.consumer("OUTRIGGER-Q-orders_dcreated", "shop");
    assert_eq!(consumer["config"]["ack_policy"], "explicit", "{consumer}");
    assert_eq!(consumer["num_ack_pending"], 0, "acknowledged: {consumer}");
}

/// What `/readyz` says of the broker once it says `degraded`.
async fn degraded_detail(sidecar: &Sidecar) -> String {
    wait_until(DEADLINE, "the broker to show degraded", || async {
        let (_, body) = sidecar.admin("/readyz").await;
        let ready: serde_json::Value = serde_json::from_str(&body).ok()?;
        let broker = &ready["checks"]["broker"];
        (broker["status"] == "degraded").then(|| broker["detail"].as_str().unwrap_or("").to_owned())
    })
    .await
}

#[tokio::test]
async fn a_stream_made_beforehand_with_other_settings_is_refused_and_never_changed() {
    let nats = Nats::start().await;
    // a queue's stream in memory: a restart of the server would lose every message
    let made = nats.request(
        "$JS.API.STREAM.CREATE.OUTRIGGER-Q-orders",
        &serde_json::json!({
            "name": "OUTRIGGER-Q-orders", "subjects": ["outrigger.orders"], "storage": "memory",
            "retention": "limits", "discard": "old", "num_replicas": 1,
        }),
    );
    assert!(made["error"].is_null(), "{made}");
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &nats, &app, "")).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;

    let detail = degraded_detail(&sidecar).await;
    assert!(
        detail.contains("stream OUTRIGGER-Q-orders exists with storage Memory, and Outrigger needs File: change or remove the stream"),
        "{detail}"
    );
    assert_eq!(app.requests(), 0, "nothing delivered through a stream that could lose it");
    assert_eq!(nats.stream("OUTRIGGER-Q-orders")["config"]["storage"], "memory", "unchanged");
    assert_eq!(nats.stream_messages("OUTRIGGER-Q-orders"), 0, "nothing relayed into it");
}

#[tokio::test]
async fn a_durable_consumer_made_beforehand_with_a_delivery_cap_is_refused_and_never_changed() {
    let nats = Nats::start().await;
    let made = nats.request(
        "$JS.API.STREAM.CREATE.OUTRIGGER-Q-orders",
        &serde_json::json!({
            "name": "OUTRIGGER-Q-orders",
            "subjects": ["outrigger.orders", "outrigger-k.orders.*"],
            "storage": "file", "retention": "limits", "discard": "old", "num_replicas": 1,
            "duplicate_window": 3_600_000_000_000u64, "allow_direct": true,
        }),
    );
    assert!(made["error"].is_null(), "{made}");
    // the server would stop redelivering after two deliveries, whatever max_attempts says
    let consumer = nats.request(
        "$JS.API.CONSUMER.DURABLE.CREATE.OUTRIGGER-Q-orders.shop",
        &serde_json::json!({
            "stream_name": "OUTRIGGER-Q-orders",
            "config": { "durable_name": "shop", "ack_policy": "explicit", "max_deliver": 2 },
        }),
    );
    assert!(consumer["error"].is_null(), "{consumer}");
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &nats, &app, "")).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;

    wait_until(DEADLINE, "the refusal to be logged", || async {
        let log = sidecar.log();
        log.contains("consumer shop of stream OUTRIGGER-Q-orders exists with max_deliver 2, and Outrigger needs -1 (unlimited)").then_some(())
    })
    .await;
    assert_eq!(app.requests(), 0, "nothing delivered through a consumer that would drop it");
    let kept = nats.consumer("OUTRIGGER-Q-orders", "shop");
    assert_eq!(kept["config"]["max_deliver"], 2, "unchanged: {kept}");
}

#[tokio::test]
async fn a_queue_name_nats_cannot_take_is_refused_at_the_publish() {
    let nats = Nats::start().await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &nats, &app, "")).await;
    for queue in ["orders..created", ".orders", "orders."] {
        let req = http::Request::post(format!("/v1/publish/{queue}"))
            .header("host", "localhost")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        let res = outrigger_tests::send(sidecar.outbound, req).await.expect("publish");
        assert_eq!(res.status(), 400, "{queue}");
        let body = String::from_utf8_lossy(res.body()).into_owned();
        assert!(body.contains("NATS refuses an empty one"), "{queue}: {body}");
    }
    wait_metric(&sidecar, "outrigger_outbox_pending", 0.0).await;
}

#[tokio::test]
async fn nats_tls_carries_messages_with_the_configured_ca_and_refuses_an_untrusted_server() {
    let pki = outrigger_tests::Pki::new();
    let nats = Nats::start_tls(&pki).await;
    let app = Upstream::status(200).await;
    let with_ca = |ca: &std::path::Path| {
        let tls = format!("  tls: {{ ca_file: \"{}\" }}\n", ca.display());
        config("shop", &nats, &app, "").replace("messaging:\n", &format!("messaging:\n{tls}"))
    };
    let sidecar = Sidecar::start(&with_ca(&pki.ca_file)).await;
    let id = publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    assert_eq!(header(&deliveries(&app, 1).await[0], "outrigger-message-id"), id);
    let acked = r#"outrigger_messages_delivered_total{outcome="acked",queue="orders"}"#;
    wait_metric(&sidecar, acked, 1.0).await;
    assert_eq!(nats.stream_messages("OUTRIGGER-Q-orders"), 1);

    // trusting another CA: the handshake fails, the publish waits in the outbox, degraded
    let untrusting = Sidecar::start(&with_ca(&pki.other_ca_file)).await;
    publish(&untrusting, "orders", r#"{"n":2}"#, &[]).await;
    let detail = degraded_detail(&untrusting).await;
    assert!(detail.contains("nats failed"), "{detail}");
    wait_metric(&untrusting, "outrigger_outbox_pending", 1.0).await;
    assert_eq!(nats.stream_messages("OUTRIGGER-Q-orders"), 1, "nothing more came through");
}
