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

#[tokio::test]
async fn the_dead_letter_api_lists_shows_replays_and_purges_on_nats() {
    use outrigger_tests::Reply;
    let nats = Nats::start().await;
    let app =
        Upstream::scripted([Reply::Status(422), Reply::Status(422), Reply::Status(200)]).await;
    let sidecar =
        Sidecar::start(&crate::redis::config("shop", &nats, &app, ", concurrency: 1")).await;
    let first = publish(&sidecar, "orders", r#"{"n":0}"#, &[]).await;
    let second = publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    let dead = r#"outrigger_messages_delivered_total{outcome="dead_lettered",queue="orders"}"#;
    wait_metric(&sidecar, dead, 2.0).await;
    let (status, page) = sidecar.admin("/v1/dlq/orders_deadletter").await;
    assert_eq!(status, 200, "{page}");
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    let listed: Vec<&str> =
        page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [second.as_str(), first.as_str()], "newest first");
    let (status, _) = sidecar.admin(&format!("/v1/dlq/orders_deadletter/{first}")).await;
    assert_eq!(status, 200);

    let admin = format!("http://{}", sidecar.admin);
    let out = std::process::Command::new(outrigger_tests::binary())
        .args(["dlq", "replay", "orders_deadletter", "--id", &first, "--admin", &admin])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen = deliveries(&app, 3).await;
    assert_eq!(header(&seen[2], "outrigger-message-id"), first);
    assert_eq!(envelope(&seen[2])["metadata"]["replays"], 1);
    let acked = r#"outrigger_messages_delivered_total{outcome="acked",queue="orders"}"#;
    wait_metric(&sidecar, acked, 1.0).await;

    let out = std::process::Command::new(outrigger_tests::binary())
        .args(["dlq", "purge", "orders_deadletter", "--yes", "--admin", &admin])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), "purged 1 dead letter(s) from orders_deadletter");
    let (_, page) = sidecar.admin("/v1/dlq/orders_deadletter").await;
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["messages"], serde_json::json!([]), "nothing left");
}

#[tokio::test]
async fn priority_lanes_hold_on_nats_too() {
    let nats = Nats::start().await;
    let lanes = ", concurrency: 1, priority_lanes: [orders.ambulance]";
    let order = crate::delivery::lanes_in_delivery_order(|app| {
        crate::redis::config("shop", &nats, app, lanes)
    })
    .await;
    let first_ten: Vec<&str> = order[..10].iter().map(String::as_str).collect();
    let mut expected = vec!["orders.ambulance"; 9];
    expected.push("orders");
    assert_eq!(first_ten, expected);
    assert_eq!(order.len(), 33);
}

#[tokio::test]
async fn on_nats_messages_published_before_the_app_listens_survive_a_kill9_of_the_sidecar() {
    let nats = Nats::start().await;
    let yaml = |app| crate::redis::config_at("shop", &nats, app, ", max_attempts: 3");
    crate::delivery::published_before_the_app_listens(yaml, true).await;
}

#[tokio::test]
async fn publishes_are_accepted_while_nats_is_down_and_delivered_once_it_is_back() {
    let mut nats = Nats::start().await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&crate::redis::config("shop", &nats, &app, "")).await;
    let published = crate::redis::publish_through_an_outage(&sidecar, &app, || nats.stop()).await;
    nats.restart().await;
    crate::redis::assert_each_delivered_once(&sidecar, &app, published).await;
}
