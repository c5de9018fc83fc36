//! Delivery: a subscription's messages POSTed to a scripted app, its answers judged, failures
//! retried with their error history, dead letters, ordering, throttling, the subscription
//! breaker, the app's health gate, an app not up yet (a refused connection is no attempt), and
//! what survives a `kill -9`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use outrigger_tests::{DEADLINE, RefusingPort, Reply, Seen, Sidecar, Upstream, wait_until};
use serde_json::Value;

use crate::messaging::{id_of, metric, post, queues};

/// A sidecar delivering queue `orders` to `app` at `/events/orders`, with `extra` subscription
/// fields (YAML flow-mapping entries, e.g. `max_attempts: 3`).
pub(crate) fn config(app: &Upstream, extra: &str) -> String {
    config_at(app.addr(), extra)
}

/// The same with the app at `app`, listening or not.
pub(crate) fn config_at(app: SocketAddr, extra: &str) -> String {
    format!(
        "service:\n  name: shop\n  app: {{ url: \"http://{app}\" }}\n\
         messaging:\n  data_dir: \"$SCRATCH/data\"\n  subscriptions:\n    - {{ queue: orders, \
         path: /events/orders, backoff: {{ initial: 50ms, max: 200ms, jitter: none }}{extra} }}\n",
    )
}

/// Publishes `body` to `queue` with extra headers; returns the message id.
pub(crate) async fn publish(
    sidecar: &Sidecar,
    queue: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut req = Request::post(format!("/v1/publish/{queue}")).header("host", "localhost");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = sidecar.send(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await;
    let text = String::from_utf8_lossy(res.body()).into_owned();
    assert_eq!(res.status(), 202, "{text}");
    id_of(&text)
}

/// Waits until the app has seen `n` deliveries; returns them.
pub(crate) async fn deliveries(app: &Upstream, n: usize) -> Vec<Seen> {
    wait_until(DEADLINE, &format!("{n} deliveries to the app"), || async {
        let seen = app.seen();
        (seen.len() >= n).then_some(seen)
    })
    .await
}

pub(crate) fn envelope(seen: &Seen) -> Value {
    serde_json::from_slice(&seen.body).expect("the delivery body is the JSON envelope")
}

pub(crate) fn header<'a>(seen: &'a Seen, name: &str) -> &'a str {
    seen.headers.get(name).map_or("", |v| v.to_str().unwrap())
}

/// A sidecar whose app fails its health check until the test calls `app.set_health(200)`:
/// what is published meanwhile waits, and then goes out all at once.
async fn gated(app: &Upstream, extra: &str) -> Sidecar {
    start_gated(&config(app, extra), app).await
}

/// Starts `yaml` (whose `service.app` is `app`) with the app's `/healthz` as its health path,
/// without waiting for readiness: while the app fails it, deliveries wait.
pub(crate) async fn start_gated(yaml: &str, app: &Upstream) -> Sidecar {
    let yaml = yaml.replace(
        &format!("app: {{ url: \"http://{}\" }}", app.addr()),
        &format!("app: {{ url: \"http://{}\", health_path: /healthz }}", app.addr()),
    );
    Sidecar::start_unready(&yaml).await
}

/// Deliveries of `{"key": K, "n": N}` payloads came, per key, in the order 0..n.
pub(crate) fn assert_per_key_order(seen: &[Seen], keys: &[&str], n: u64) {
    let mut order: HashMap<String, Vec<u64>> = HashMap::new();
    for delivery in seen {
        let payload = &envelope(delivery)["payload"];
        let key = payload["key"].as_str().unwrap().to_owned();
        order.entry(key).or_default().push(payload["n"].as_u64().unwrap());
    }
    for key in keys {
        assert_eq!(order[*key], (0..n).collect::<Vec<_>>(), "key {key} in publish order");
    }
}

pub(crate) async fn wait_metric(sidecar: &Sidecar, series: &str, value: f64) {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let seen = metric(sidecar, series).await;
        if seen == Some(value) {
            return;
        }
        if tokio::time::Instant::now() >= until {
            panic!("waited {DEADLINE:?} for {series} = {value}; it was {seen:?} at the end");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn dead_letters(sidecar: &Sidecar) -> u64 {
    let queues = queues(sidecar).await;
    let queues = queues["queues"].as_array().unwrap();
    let found = queues.iter().find(|q| q["queue"] == "orders_deadletter");
    found.map_or(0, |q| q["dead_letters"].as_u64().unwrap())
}

pub(crate) const ACKED: &str =
    r#"outrigger_messages_delivered_total{outcome="acked",queue="orders"}"#;
pub(crate) const DUPLICATE: &str =
    r#"outrigger_messages_delivered_total{outcome="duplicate",queue="orders"}"#;
pub(crate) const RETRIED: &str =
    r#"outrigger_messages_delivered_total{outcome="retried",queue="orders"}"#;
pub(crate) const DEAD: &str =
    r#"outrigger_messages_delivered_total{outcome="dead_lettered",queue="orders"}"#;
pub(crate) const PAUSED: &str = r#"outrigger_subscription_paused{queue="orders"}"#;

/// `/readyz`'s status, and its `app` check's status and detail.
async fn app_check(sidecar: &Sidecar) -> (u16, String, String) {
    let (status, body) = sidecar.admin("/readyz").await;
    let ready: Value = serde_json::from_str(&body).expect("/readyz answers JSON");
    let text = |field: &str| ready["checks"]["app"][field].as_str().unwrap_or("absent").to_owned();
    (status, text("status"), text("detail"))
}

/// How many tries of the app's port the paused subscription has had refused, from `/readyz`.
async fn refused_tries(sidecar: &Sidecar) -> Option<u64> {
    let (_, _, detail) = app_check(sidecar).await;
    let (before, _) = detail.split_once(" tries of its port refused")?;
    before.rsplit('(').next()?.parse().ok()
}

/// Waits until the subscription is paused and five tries of the app's port (several backoff
/// periods) were refused; meanwhile the app check is degraded and the sidecar stays ready.
async fn wait_paused_through_several_tries(sidecar: &Sidecar) {
    wait_metric(sidecar, PAUSED, 1.0).await;
    wait_until(DEADLINE, "five refused tries of the app's port", || async {
        (refused_tries(sidecar).await >= Some(5)).then_some(())
    })
    .await;
    let (ready, check, detail) = app_check(sidecar).await;
    assert_eq!((ready, check.as_str()), (200, "degraded"), "{detail}");
}

/// Twenty messages published while nothing listens on the app's port (with `kill9`, the
/// sidecar is killed and restarted meanwhile) all wait, through several refused tries; once the
/// app listens, each is delivered once, as a first attempt, with an empty error history.
pub(crate) async fn published_before_the_app_listens(
    yaml_at: impl Fn(SocketAddr) -> String,
    kill9: bool,
) {
    let port = RefusingPort::new();
    let mut sidecar = Sidecar::start(&yaml_at(port.addr())).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    wait_paused_through_several_tries(&sidecar).await;
    if kill9 {
        sidecar.kill9();
        sidecar.restart().await; // ready: a paused subscription does not fail readiness
        wait_paused_through_several_tries(&sidecar).await;
    }
    assert_eq!(metric(&sidecar, RETRIED).await, Some(0.0), "a refusal is not an attempt");
    assert_eq!(metric(&sidecar, DEAD).await, Some(0.0), "nothing dead-lettered");

    let app = port.listen([Reply::Status(200)]);
    let seen = deliveries(&app, 20).await;
    wait_metric(&sidecar, ACKED, 20.0).await;
    wait_metric(&sidecar, PAUSED, 0.0).await;
    assert_eq!(app.requests(), 20, "each message once");
    let mut delivered: Vec<&str> = seen.iter().map(|s| header(s, "outrigger-message-id")).collect();
    delivered.sort_unstable();
    ids.sort_unstable();
    assert_eq!(delivered, ids, "every message answered 202");
    for delivery in &seen {
        assert_eq!(header(delivery, "outrigger-attempt"), "1", "no attempt was spent");
        assert_eq!(envelope(delivery)["error"], Value::Array(vec![]), "an empty error history");
    }
    assert_eq!(app_check(&sidecar).await.1, "ok");
}

#[tokio::test]
async fn a_published_message_is_delivered_with_its_envelope_and_headers() {
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config(&app, "")).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let id = publish(
        &sidecar,
        "orders",
        r#"{"order": 42, "total": 1.50}"#,
        &[
            ("idempotency-key", "order-42"),
            ("outrigger-ordering-key", "customer-7"),
            ("traceparent", traceparent),
        ],
    )
    .await;

    let seen = deliveries(&app, 1).await.remove(0);
    assert_eq!((seen.method.as_str(), seen.uri.path()), ("POST", "/events/orders"));
    assert_eq!(header(&seen, "content-type"), "application/json");
    assert_eq!(header(&seen, "outrigger-message-id"), id);
    assert_eq!(header(&seen, "outrigger-queue"), "orders");
    assert_eq!(header(&seen, "outrigger-attempt"), "1");
    assert_eq!(header(&seen, "outrigger-max-attempts"), "5", "the default");
    assert_eq!(header(&seen, "idempotency-key"), "order-42");
    // the same trace, under the sidecar's delivery span (tracing.rs checks the parents)
    let trace = &traceparent[..35];
    assert!(header(&seen, "traceparent").starts_with(trace), "{}", header(&seen, "traceparent"));
    let body = String::from_utf8(seen.body.to_vec()).unwrap();
    assert!(body.contains(r#""payload":{"order": 42, "total": 1.50}"#), "verbatim: {body}");
    let at = |key: &str| body.find(&format!("\"{key}\":")).expect(key);
    let keys = ["id", "queue", "dispatch_date", "payload", "error", "metadata"];
    assert!(keys.windows(2).all(|w| at(w[0]) < at(w[1])), "DESIGN.md's key order: {body}");
    let envelope = envelope(&seen);
    assert_eq!(envelope["id"], id.as_str());
    assert_eq!(envelope["queue"], "orders");
    assert_eq!(envelope["error"], serde_json::json!([]));
    assert_eq!(envelope["metadata"]["idempotency_key"], "order-42");
    assert_eq!(envelope["metadata"]["ordering_key"], "customer-7");
    assert!(envelope["metadata"]["traceparent"].as_str().unwrap().starts_with(trace));

    wait_metric(&sidecar, ACKED, 1.0).await;
    wait_metric(&sidecar, "outrigger_outbox_pending", 0.0).await;
    assert_eq!(app.requests(), 1);
}

#[tokio::test]
async fn a_500_and_a_503_then_a_200_make_three_attempts_with_two_error_records() {
    let app =
        Upstream::scripted([Reply::Status(500), Reply::Status(503), Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&config(&app, "")).await;
    let id = publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;

    let seen = deliveries(&app, 3).await;
    wait_metric(&sidecar, ACKED, 1.0).await;
    let attempts: Vec<&str> = seen.iter().map(|s| header(s, "outrigger-attempt")).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert!(seen.iter().all(|s| header(s, "outrigger-message-id") == id));
    let third = envelope(&seen[2]);
    let errors = third["error"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{third}");
    assert_eq!(
        (errors[0]["status_code"].as_u64(), errors[1]["status_code"].as_u64()),
        (Some(500), Some(503))
    );
    assert_eq!(errors[0]["message"], "500 from upstream");
    assert_eq!(errors[0]["stack_trace"], "");
    assert!(errors[1]["date"].as_str().unwrap().ends_with('Z'));
    assert_eq!(envelope(&seen[1])["error"].as_array().unwrap().len(), 1, "history grows");

    assert_eq!(metric(&sidecar, RETRIED).await, Some(2.0));
    assert_eq!(dead_letters(&sidecar).await, 0);
    wait_metric(&sidecar, "outrigger_outbox_pending", 0.0).await;
    assert_eq!(app.requests(), 3);
}

#[tokio::test]
async fn always_500_makes_exactly_max_attempts_then_one_dead_letter() {
    let app = Upstream::status(500).await;
    let sidecar = Sidecar::start(&config(&app, ", max_attempts: 3")).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;

    wait_metric(&sidecar, DEAD, 1.0).await;
    assert_eq!(app.requests(), 3, "max_attempts deliveries, no more");
    assert_eq!(dead_letters(&sidecar).await, 1);
    let seen = app.seen();
    assert_eq!(header(&seen[2], "outrigger-attempt"), "3");
    assert_eq!(header(&seen[2], "outrigger-max-attempts"), "3");
    assert_eq!(
        metric(&sidecar, r#"outrigger_deadletter_messages_total{queue="orders"}"#).await,
        Some(1.0)
    );
    assert_eq!(metric(&sidecar, "outrigger_outbox_pending").await, Some(0.0));
}

#[tokio::test]
async fn a_400_is_dead_lettered_after_one_attempt() {
    let app = Upstream::status(400).await;
    let sidecar = Sidecar::start(&config(&app, "")).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;

    wait_metric(&sidecar, DEAD, 1.0).await;
    assert_eq!(app.requests(), 1, "a permanent failure is not retried");
    assert_eq!(dead_letters(&sidecar).await, 1);
    assert_eq!(metric(&sidecar, RETRIED).await, Some(0.0));
}

#[tokio::test]
async fn the_same_idempotency_key_twice_is_stored_and_delivered_once() {
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config(&app, "")).await;
    let (first, second) = (
        post(&sidecar, "orders", r#"{"n":1}"#, Some("k-1")).await,
        post(&sidecar, "orders", r#"{"n":1}"#, Some("k-1")).await,
    );
    assert_eq!(id_of(&first.1), id_of(&second.1));
    let other = publish(&sidecar, "orders", r#"{"n":2}"#, &[]).await;

    let seen = deliveries(&app, 2).await;
    wait_metric(&sidecar, ACKED, 2.0).await;
    let mut ids: Vec<&str> = seen.iter().map(|s| header(s, "outrigger-message-id")).collect();
    ids.sort_unstable();
    let key_id = id_of(&first.1);
    let mut expected = [key_id.as_str(), other.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected, "the key's message once");
    assert_eq!(app.requests(), 2);
}

#[tokio::test]
async fn per_key_order_holds_under_concurrency_with_a_randomly_slow_app() {
    // replies take 0 to 40 ms, in an order unrelated to the messages
    let script = (0..60).map(|i| Reply::Delayed(Duration::from_millis((i * 37 % 5) * 10), 200));
    let app = Upstream::scripted(script).await;
    let sidecar = Sidecar::start(&config(&app, ", ordered: true, concurrency: 8")).await;
    let keys = ["a", "b", "c"];
    for n in 0..10 {
        for key in keys {
            let body = format!(r#"{{"key":"{key}","n":{n}}}"#);
            publish(&sidecar, "orders", &body, &[("outrigger-ordering-key", key)]).await;
        }
    }

    let seen = deliveries(&app, 30).await;
    wait_metric(&sidecar, ACKED, 30.0).await;
    assert_per_key_order(&seen, &keys, 10);
    assert_eq!(app.requests(), 30, "each once");
}

#[tokio::test]
async fn an_ordering_key_waits_while_its_head_is_retried() {
    let app = Upstream::health_checked(200, 503).await;
    app.set_script([Reply::Status(503), Reply::Status(200)]);
    let sidecar = gated(&app, ", ordered: true").await;
    // both are stored before anything is delivered: the second could go at once, but waits
    let first = publish(&sidecar, "orders", r#"{"n":0}"#, &[("outrigger-ordering-key", "k")]).await;
    let second =
        publish(&sidecar, "orders", r#"{"n":1}"#, &[("outrigger-ordering-key", "k")]).await;
    app.set_health(200);

    let seen = deliveries(&app, 3).await;
    wait_metric(&sidecar, ACKED, 2.0).await;
    let ids: Vec<&str> = seen.iter().map(|s| header(s, "outrigger-message-id")).collect();
    assert_eq!(ids, [first.as_str(), first.as_str(), second.as_str()]);
}

#[tokio::test]
async fn the_throttle_caps_the_delivery_rate() {
    let app = Upstream::health_checked(200, 503).await;
    let sidecar = gated(&app, ", throttle: { messages: 20, per: 1s }, concurrency: 16").await;
    for n in 0..21 {
        publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await;
    }
    // all 21 wait; unthrottled, 16 would go at once
    app.set_health(200);

    let seen = deliveries(&app, 21).await;
    let spread = seen[20].at - seen[0].at;
    assert!(spread >= Duration::from_millis(950), "21 deliveries at 20/s took {spread:?}");
    let in_first_half_second =
        seen.iter().filter(|s| s.at - seen[0].at < Duration::from_millis(500)).count();
    assert!(
        in_first_half_second <= 11,
        "at most ~10 start in half a second: {in_first_half_second}"
    );
}

#[tokio::test]
async fn a_tripped_subscription_breaker_pauses_delivery_then_probes() {
    let app =
        Upstream::scripted([Reply::Status(500), Reply::Status(500), Reply::Status(200)]).await;
    let breaker = ", max_attempts: 10, circuit_breaker: { consecutive_failures: 2, open_for: 1s }";
    let sidecar = Sidecar::start(&config(&app, breaker)).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;

    wait_metric(&sidecar, r#"outrigger_subscription_circuit_state{queue="orders"}"#, 2.0).await;
    let seen = deliveries(&app, 3).await;
    let paused = seen[2].at - seen[1].at;
    assert!(paused >= Duration::from_millis(950), "open for 1s, yet retried after {paused:?}");
    wait_metric(&sidecar, ACKED, 1.0).await;
    wait_metric(&sidecar, r#"outrigger_subscription_circuit_state{queue="orders"}"#, 0.0).await;
    assert_eq!(dead_letters(&sidecar).await, 0, "a tripped breaker dead-letters nothing");
}

#[tokio::test]
async fn delivery_waits_while_the_apps_health_check_fails() {
    let app = Upstream::health_checked(200, 503).await;
    let sidecar = start_gated(&config(&app, ""), &app).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;

    let checks = app.health_checks();
    wait_until(DEADLINE, "three more health checks of the app", || async {
        (app.health_checks() >= checks + 3).then_some(())
    })
    .await;
    assert_eq!(app.requests(), 0, "nothing is delivered to an app that fails its health check");
    app.set_health(200);
    deliveries(&app, 1).await;
    wait_metric(&sidecar, ACKED, 1.0).await;
}

#[tokio::test]
async fn at_most_once_acknowledges_first_and_drops_a_failure() {
    let app = Upstream::status(500).await;
    let sidecar = Sidecar::start(&config(&app, ", delivery: at_most_once")).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;

    let dropped = r#"outrigger_messages_delivered_total{outcome="dropped",queue="orders"}"#;
    wait_metric(&sidecar, dropped, 1.0).await;
    assert_eq!(app.requests(), 1);
    assert_eq!(dead_letters(&sidecar).await, 0);
    assert_eq!(metric(&sidecar, "outrigger_outbox_pending").await, Some(0.0));
}

#[tokio::test]
async fn duplicate_deliveries_sends_every_message_twice() {
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config(&app, ", duplicate_deliveries: true")).await;
    let id = publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;

    let seen = deliveries(&app, 2).await;
    wait_metric(&sidecar, ACKED, 1.0).await;
    assert!(seen.iter().all(|s| header(s, "outrigger-message-id") == id));
    assert_eq!(seen[0].body, seen[1].body, "the same delivery twice");
    assert_eq!(app.requests(), 2);
}

#[tokio::test]
async fn twenty_202s_survive_kill9_and_are_all_delivered_after_restart() {
    // the app's health fails at first, so nothing is delivered before the kill
    let app = Upstream::health_checked(200, 503).await;
    let mut sidecar = start_gated(&config(&app, ""), &app).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    sidecar.kill9();
    assert_eq!(app.requests(), 0);

    app.set_health(200);
    sidecar.restart().await;
    let seen = deliveries(&app, 20).await;
    wait_metric(&sidecar, ACKED, 20.0).await;
    let mut delivered: Vec<&str> = seen.iter().map(|s| header(s, "outrigger-message-id")).collect();
    delivered.sort_unstable();
    assert_eq!(delivered, ids, "every message answered 202, each once");
}

#[tokio::test]
async fn kill9_during_retries_keeps_the_attempt_count_and_history() {
    let app = Upstream::status(500).await;
    let fixed = ", max_attempts: 5, backoff: { strategy: fixed, initial: 3s, jitter: none }";
    let mut sidecar = Sidecar::start(
        &config(&app, "").replace(", backoff: { initial: 50ms, max: 200ms, jitter: none }", fixed),
    )
    .await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    // two failures parked durably, the third attempt a second away
    wait_metric(&sidecar, RETRIED, 2.0).await;
    sidecar.kill9();
    let before = app.requests();
    assert_eq!(before, 2);

    sidecar.restart().await;
    let seen = deliveries(&app, 3).await;
    assert_eq!(header(&seen[2], "outrigger-attempt"), "3", "the count survived");
    let errors = envelope(&seen[2])["error"].as_array().unwrap().len();
    assert_eq!(errors, 2, "the history survived");
}

#[tokio::test]
async fn a_concurrency_range_grows_with_the_backlog_and_shrinks_when_idle() {
    let app = Upstream::scripted([Reply::Delayed(Duration::from_millis(100), 200)]).await;
    let sidecar = Sidecar::start(&config(&app, ", concurrency: { min: 1, max: 4 }")).await;
    let gauge = r#"outrigger_subscription_concurrency{queue="orders"}"#;
    assert_eq!(metric(&sidecar, gauge).await, Some(1.0), "starts at min");
    for n in 0..60 {
        publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await;
    }

    wait_metric(&sidecar, gauge, 4.0).await;
    let seen = deliveries(&app, 60).await;
    // with 100 ms answers, arrivals closer than that overlapped
    let overlapping = seen.windows(4).any(|w| w[3].at - w[0].at < Duration::from_millis(100));
    assert!(overlapping, "four deliveries in flight at once at the top");
    wait_metric(&sidecar, ACKED, 60.0).await;
    wait_metric(&sidecar, gauge, 1.0).await;
}

/// Publishes `ambulance` messages to `orders.ambulance` and `orders` ones to `orders` while the
/// app's health check fails (so they wait), opens the gate, and returns the queues in the order
/// the app received them.
pub(crate) async fn lanes_in_delivery_order(yaml_of: impl Fn(&Upstream) -> String) -> Vec<String> {
    let app = Upstream::health_checked(200, 503).await;
    let sidecar = start_gated(&yaml_of(&app), &app).await;
    for n in 0..3 {
        publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await;
    }
    for n in 0..30 {
        publish(&sidecar, "orders.ambulance", &format!(r#"{{"n":{n}}}"#), &[]).await;
    }
    // every message is waiting where the dispatcher reads (relayed, with a remote broker)
    wait_until(DEADLINE, "the outbox to be empty or the store to hold all 33", || async {
        let pending = metric(&sidecar, "outrigger_outbox_pending").await;
        matches!(pending, Some(0.0) | Some(33.0)).then_some(())
    })
    .await;
    app.set_health(200);
    let seen = deliveries(&app, 33).await;
    seen.iter().map(|s| header(s, "outrigger-queue").to_owned()).collect()
}

#[tokio::test]
async fn a_timeout_is_retried_with_a_null_status() {
    let app =
        Upstream::scripted([Reply::Delayed(Duration::from_secs(5), 200), Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&config(&app, ", timeout: 200ms")).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    let seen = deliveries(&app, 2).await;
    wait_metric(&sidecar, ACKED, 1.0).await;
    assert_eq!(header(&seen[1], "outrigger-attempt"), "2", "the timeout was an attempt");
    let record = &envelope(&seen[1])["error"][0];
    assert_eq!(record["status_code"], Value::Null);
    assert_eq!(record["message"], "timeout: no answer within 200ms");
}

#[tokio::test]
async fn a_reset_after_the_connection_opened_is_still_an_attempt() {
    let app = Upstream::scripted([Reply::Reset, Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&config(&app, ", max_attempts: 3")).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    let seen = deliveries(&app, 2).await;
    wait_metric(&sidecar, ACKED, 1.0).await;
    assert_eq!(header(&seen[1], "outrigger-attempt"), "2");
    let errors = envelope(&seen[1])["error"].as_array().unwrap().clone();
    assert_eq!(errors.len(), 1, "the reset left its record");
    assert_eq!(errors[0]["status_code"], Value::Null);
    assert_eq!(metric(&sidecar, PAUSED).await, Some(0.0), "an open connection pauses nothing");
}
