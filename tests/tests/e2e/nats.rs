//! The `nats://` broker against a real `nats-server -js` (work in progress, issue 22: publish,
//! relay, read and acknowledge; park, dead letters and ordering are not built yet).

use outrigger_tests::{Nats, Sidecar, Upstream};

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

    let seen = deliveries(&app, 1).await;
    assert_eq!(header(&seen[0], "outrigger-message-id"), id);
    assert_eq!(header(&seen[0], "outrigger-attempt"), "1");
    assert_eq!(envelope(&seen[0])["payload"]["order"], 42);
    let acked = r#"outrigger_messages_delivered_total{outcome="acked",queue="orders.created"}"#;
    wait_metric(&sidecar, acked, 1.0).await;
    wait_metric(&sidecar, "outrigger_outbox_pending", 0.0).await;

    // the stream and the durable consumer, as JetStream reports them
    let jsz = nats.monitor("/jsz?streams=true&consumers=true&config=true");
    let streams =
        jsz["account_details"][0]["stream_detail"].as_array().cloned().unwrap_or_default();
    let stream = streams.iter().find(|s| s["name"] == "OUTRIGGER-Q-orders_dcreated");
    let stream = stream.unwrap_or_else(|| panic!("the queue's stream: {jsz}"));
    assert_eq!(stream["config"]["subjects"][0], "outrigger.orders.created");
    assert_eq!(stream["state"]["messages"], 1);
    let consumer = &stream["consumer_detail"][0];
    assert_eq!(consumer["name"], "shop", "the durable consumer is service.name");
    assert_eq!(consumer["num_ack_pending"], 0, "acknowledged: {consumer}");
}

#[tokio::test]
async fn retries_keep_their_history_on_nats_and_an_exhausted_message_is_dead_lettered() {
    use outrigger_tests::Reply;
    let nats = Nats::start().await;
    let app =
        Upstream::scripted([Reply::Status(503), Reply::Status(500), Reply::Status(200)]).await;
    let yaml = format!(
        "service:\n  name: shop\n  app: {{ url: \"http://{}\" }}\n\
         messaging:\n  broker: \"{}\"\n  data_dir: \"$SCRATCH/data\"\n  \
         subscriptions:\n    - {{ queue: orders, path: /events/orders, max_attempts: 2, \
         backoff: {{ initial: 50ms, max: 200ms, jitter: none }} }}\n",
        app.addr(),
        nats.url()
    );
    let sidecar = Sidecar::start(&yaml).await;
    let id = publish(&sidecar, "orders", r#"{"n": 1}"#, &[]).await;

    // 503 then 500: two attempts, then the dead letter with both error records
    let seen = deliveries(&app, 2).await;
    assert_eq!(header(&seen[1], "outrigger-message-id"), id);
    assert_eq!(header(&seen[1], "outrigger-attempt"), "2", "the attempt count came back");
    assert_eq!(envelope(&seen[1])["error"].as_array().map(Vec::len), Some(1), "with its history");
    let dead = r#"outrigger_messages_delivered_total{outcome="dead_lettered",queue="orders"}"#;
    wait_metric(&sidecar, dead, 1.0).await;
    let jsz = nats.monitor("/jsz?streams=true&consumers=true&config=true");
    let streams =
        jsz["account_details"][0]["stream_detail"].as_array().cloned().unwrap_or_default();
    let dlq = streams.iter().find(|s| s["name"] == "OUTRIGGER-DLQ-orders__deadletter");
    let dlq = dlq.unwrap_or_else(|| panic!("the dead-letter stream: {jsz}"));
    assert_eq!(dlq["state"]["messages"], 1);
}
