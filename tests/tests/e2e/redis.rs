//! The `redis://` broker against a real `redis-server`: publishes relayed from the durable
//! outbox, delivery through consumer groups, retries and dead letters kept in Redis, replicas
//! sharing a queue, services each getting every message, a Redis outage survived, and a
//! replica's message claimed by another after a `kill -9`.

use std::collections::HashSet;
use std::net::SocketAddr;

use outrigger_tests::{DEADLINE, Redis, RedisCluster, Reply, Sidecar, Upstream, wait_until};

use crate::delivery::{
    ACKED, DEAD, DUPLICATE, deliveries, envelope, header, publish,
    published_before_the_app_listens, wait_metric,
};
use crate::messaging::metric;

/// The Redis a test runs on: one server (`redis://`), or a three-node cluster
/// (`redis+cluster://`). The tests that hold alike on both are run on both (`on_both!` below).
#[derive(Debug, Clone, Copy)]
enum Kind {
    Single,
    Cluster,
}

#[derive(Debug)]
enum Broker {
    Single(Redis),
    Cluster(RedisCluster),
}

impl Broker {
    async fn start(kind: Kind) -> Self {
        match kind {
            Kind::Single => Broker::Single(Redis::start().await),
            Kind::Cluster => Broker::Cluster(RedisCluster::start().await),
        }
    }

    /// `redis-cli` on the server, or on the cluster following `MOVED`.
    fn cli(&self, args: &[&str]) -> String {
        match self {
            Broker::Single(redis) => redis.cli(args),
            Broker::Cluster(cluster) => cluster.cli(args),
        }
    }

    /// Kills it (every node of a cluster): an outage.
    fn stop(&mut self) {
        match self {
            Broker::Single(redis) => redis.stop(),
            Broker::Cluster(cluster) => cluster.stop(),
        }
    }

    async fn restart(&mut self) {
        match self {
            Broker::Single(redis) => redis.restart().await,
            Broker::Cluster(cluster) => cluster.restart().await,
        }
    }
}

/// What `messaging.broker` names.
pub(crate) trait BrokerUrl {
    fn url(&self) -> String;
}

impl BrokerUrl for Redis {
    fn url(&self) -> String {
        Redis::url(self)
    }
}

impl BrokerUrl for outrigger_tests::Nats {
    fn url(&self) -> String {
        outrigger_tests::Nats::url(self)
    }
}

impl BrokerUrl for RedisCluster {
    fn url(&self) -> String {
        RedisCluster::url(self)
    }
}

impl BrokerUrl for Broker {
    fn url(&self) -> String {
        match self {
            Broker::Single(redis) => redis.url(),
            Broker::Cluster(cluster) => cluster.url(),
        }
    }
}

/// A sidecar of service `service` on `redis`, delivering queue `orders` to `app`.
pub(crate) fn config(service: &str, redis: &impl BrokerUrl, app: &Upstream, extra: &str) -> String {
    config_at(service, redis, app.addr(), extra)
}

/// The same with the app at `app`, listening or not.
pub(crate) fn config_at(
    service: &str,
    redis: &impl BrokerUrl,
    app: SocketAddr,
    extra: &str,
) -> String {
    format!(
        "service:\n  name: {service}\n  app: {{ url: \"http://{app}\" }}\n\
         messaging:\n  broker: \"{url}\"\n  data_dir: \"$SCRATCH/data\"\n  claim_idle: 1s\n  \
         subscriptions:\n    - {{ queue: orders, path: /events/orders, \
         backoff: {{ initial: 50ms, max: 200ms, jitter: none }}{extra} }}\n",
        url = redis.url(),
    )
}

/// The status of `/readyz`'s broker check.
async fn broker_check(sidecar: &Sidecar) -> String {
    let (_, body) = sidecar.admin("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&body).expect("/readyz answers JSON");
    ready["checks"]["broker"]["status"].as_str().unwrap_or("absent").to_owned()
}

fn ids(seen: &[outrigger_tests::Seen]) -> Vec<String> {
    seen.iter().map(|s| header(s, "outrigger-message-id").to_owned()).collect()
}

async fn a_message_goes_through_redis_to_the_app_with_its_envelope(kind: Kind) {
    let redis = Broker::start(kind).await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &redis, &app, "")).await;
    let id = publish(&sidecar, "orders", r#"{"order": 42}"#, &[("idempotency-key", "k-42")]).await;

    let seen = deliveries(&app, 1).await.remove(0);
    assert_eq!(header(&seen, "outrigger-message-id"), id);
    assert_eq!(header(&seen, "outrigger-attempt"), "1");
    assert_eq!(header(&seen, "idempotency-key"), "k-42");
    assert_eq!(envelope(&seen)["payload"]["order"], 42);
    wait_metric(&sidecar, ACKED, 1.0).await;
    wait_metric(&sidecar, "outrigger_outbox_pending", 0.0).await;
    assert_eq!(redis.cli(&["XLEN", "outrigger:{orders}"]), "1", "the queue is a stream");
    let pending = redis.cli(&["XPENDING", "outrigger:{orders}", "shop"]);
    assert!(pending.starts_with('0'), "acknowledged in the group: {pending}");
    assert_eq!(broker_check(&sidecar).await, "ok");
}

async fn retries_keep_their_history_and_exhausted_messages_are_dead_lettered_in_redis(kind: Kind) {
    let redis = Broker::start(kind).await;
    let app =
        Upstream::scripted([Reply::Status(500), Reply::Status(503), Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&config("shop", &redis, &app, ", max_attempts: 3")).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    let seen = deliveries(&app, 3).await;
    wait_metric(&sidecar, ACKED, 1.0).await;
    let attempts: Vec<&str> = seen.iter().map(|s| header(s, "outrigger-attempt")).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert_eq!(envelope(&seen[2])["error"].as_array().unwrap().len(), 2);

    // the script now answers 200 forever; a second app fails forever
    let failing = Upstream::status(500).await;
    let other = Sidecar::start(&config("billing", &redis, &failing, ", max_attempts: 2")).await;
    for _ in 0..100 {
        if metric(&other, DEAD).await == Some(1.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!("{}", other.log());
    wait_metric(&other, DEAD, 1.0).await;
    assert_eq!(failing.requests(), 2, "max_attempts deliveries, then the dead letter");
    assert_eq!(redis.cli(&["XLEN", "outrigger:{orders}:dead:orders_deadletter"]), "1");
    let dead = redis.cli(&["XRANGE", "outrigger:{orders}:dead:orders_deadletter", "-", "+"]);
    assert!(dead.contains(r#""reason":"max attempts reached (2)""#), "{dead}");
    assert!(dead.contains(r#""subscriber":"billing/events/orders""#), "{dead}");
}

async fn two_replicas_of_one_service_share_a_queue_each_message_once(kind: Kind) {
    let redis = Broker::start(kind).await;
    let (app_a, app_b) = (Upstream::status(200).await, Upstream::status(200).await);
    let a = Sidecar::start(&config("shop", &redis, &app_a, "")).await;
    let b = Sidecar::start(&config("shop", &redis, &app_b, "")).await;
    let mut published = HashSet::new();
    for n in 0..20 {
        let sidecar = if n % 2 == 0 { &a } else { &b };
        published.insert(publish(sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }

    let all = wait_until(DEADLINE, "20 deliveries across both replicas", || async {
        let mut seen = ids(&app_a.seen());
        seen.extend(ids(&app_b.seen()));
        (seen.len() >= 20).then_some(seen)
    })
    .await;
    wait_metric(&a, "outrigger_outbox_pending", 0.0).await;
    assert_eq!(all.len(), 20, "no message twice: {all:?}");
    assert_eq!(all.into_iter().collect::<HashSet<_>>(), published);
}

async fn two_services_each_receive_every_message(kind: Kind) {
    let redis = Broker::start(kind).await;
    let (shop_app, mail_app) = (Upstream::status(200).await, Upstream::status(200).await);
    let shop = Sidecar::start(&config("shop", &redis, &shop_app, "")).await;
    let _mail = Sidecar::start(&config("mail", &redis, &mail_app, "")).await;
    let id = publish(&shop, "orders", r#"{"n":1}"#, &[]).await;

    assert_eq!(ids(&deliveries(&shop_app, 1).await), std::slice::from_ref(&id));
    assert_eq!(ids(&deliveries(&mail_app, 1).await), [id]);
}

async fn publishes_are_accepted_while_redis_is_down_and_delivered_once_it_is_back(kind: Kind) {
    let mut redis = Broker::start(kind).await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &redis, &app, "")).await;
    let published = publish_through_an_outage(&sidecar, &app, || redis.stop()).await;
    // the detail says what failed and why, down to Redis's own error
    let (_, body) = sidecar.admin("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    let detail = ready["checks"]["broker"]["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("the broker did not take the batch: redis failed: "), "{detail}");
    assert!(detail.ends_with("10 message(s) wait in the outbox"), "{detail}");

    redis.restart().await;
    assert_each_delivered_once(&sidecar, &app, published).await;
}

/// One message delivered, then the broker taken away by `stop` and ten more published: each
/// answered 202 and waiting in the outbox, readiness still 200 with the broker degraded. The
/// ids published.
pub(crate) async fn publish_through_an_outage(
    sidecar: &Sidecar,
    app: &Upstream,
    stop: impl FnOnce(),
) -> Vec<String> {
    let first = publish(sidecar, "orders", r#"{"n":0}"#, &[]).await;
    deliveries(app, 1).await;

    stop();
    let mut published = vec![first];
    for n in 1..=10 {
        published.push(publish(sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    wait_metric(sidecar, "outrigger_outbox_pending", 10.0).await;
    wait_until(DEADLINE, "readiness to show the broker degraded", || async {
        let (status, _) = sidecar.admin("/readyz").await;
        (status == 200 && broker_check(sidecar).await == "degraded").then_some(())
    })
    .await;
    published
}

/// Every message of `published` reaches `app`, each once, and the outbox empties.
pub(crate) async fn assert_each_delivered_once(
    sidecar: &Sidecar,
    app: &Upstream,
    mut published: Vec<String>,
) {
    let seen = deliveries(app, published.len()).await;
    wait_metric(sidecar, "outrigger_outbox_pending", 0.0).await;
    let mut delivered = ids(&seen);
    delivered.sort_unstable();
    published.sort_unstable();
    assert_eq!(delivered, published, "every 202 delivered, each once");
}

#[tokio::test]
async fn publishes_are_accepted_while_redis_answers_errors_and_delivered_once_it_stops() {
    let redis = Redis::start().await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &redis, &app, "")).await;
    let mut published = vec![publish(&sidecar, "orders", r#"{"n":0}"#, &[]).await];
    deliveries(&app, 1).await;

    // out of memory with nothing to evict: every write is answered `-OOM …`
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    for n in 1..=10 {
        published.push(publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    wait_metric(&sidecar, "outrigger_outbox_pending", 10.0).await;
    wait_until(DEADLINE, "readiness to show the broker degraded", || async {
        (broker_check(&sidecar).await == "degraded").then_some(())
    })
    .await;
    assert_eq!(app.requests(), 1, "nothing was delivered while Redis refused writes");

    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    assert_each_delivered_once(&sidecar, &app, published).await;
}

async fn a_replica_killed_mid_delivery_has_its_message_delivered_by_the_other(kind: Kind) {
    let redis = Broker::start(kind).await;
    // replica a's app never answers in time; replica b's answers at once
    let slow = Upstream::scripted([Reply::Delayed(std::time::Duration::from_secs(30), 200)]).await;
    let fast = Upstream::status(200).await;
    let mut a = Sidecar::start(&config("shop", &redis, &slow, ", timeout: 60s")).await;
    let id = publish(&a, "orders", r#"{"n":1}"#, &[]).await;
    deliveries(&slow, 1).await;
    a.kill9();

    let _b = Sidecar::start(&config("shop", &redis, &fast, "")).await;
    let seen = deliveries(&fast, 1).await;
    assert_eq!(header(&seen[0], "outrigger-message-id"), id);
    assert_eq!(header(&seen[0], "outrigger-attempt"), "2", "the interrupted attempt counts");
    assert_eq!(metric(&_b, ACKED).await, Some(1.0));
}

async fn an_id_delivered_whose_ack_failed_is_not_delivered_again_after_a_restart(kind: Kind) {
    let mut redis = Broker::start(kind).await;
    // the app holds its answer a moment: long enough to take Redis away under it
    let app = Upstream::scripted([Reply::Delayed(std::time::Duration::from_secs(1), 200)]).await;
    let mut sidecar = Sidecar::start(&config("shop", &redis, &app, "")).await;
    let id = publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    let seen = deliveries(&app, 1).await;
    assert_eq!(header(&seen[0], "outrigger-message-id"), id);
    redis.stop();
    // the app answers 200, the acknowledgement cannot reach Redis, the id is kept on disk
    wait_until(DEADLINE, "the failed ack's id to be remembered", || async {
        sidecar.log().contains("the delivered id is remembered for the dedup window").then_some(())
    })
    .await;

    sidecar.kill9();
    redis.restart().await;
    sidecar.restart().await;

    // the entry is still pending in the group: claimed after claim_idle, and acknowledged
    // without a second delivery
    wait_metric(&sidecar, DUPLICATE, 1.0).await;
    assert_eq!(app.requests(), 1, "delivered once, across the restart");
    assert!(sidecar.log().contains("recalled ids acknowledged before the restart"));
    let pending = redis.cli(&["XPENDING", "outrigger:{orders}", "shop"]);
    assert!(pending.starts_with('0'), "the entry is acknowledged now: {pending}");
}

async fn priority_lanes_hold_on_redis_too(kind: Kind) {
    let redis = Broker::start(kind).await;
    let lanes = ", concurrency: 1, priority_lanes: [orders.ambulance]";
    let order =
        crate::delivery::lanes_in_delivery_order(|app| config("shop", &redis, app, lanes)).await;
    let first_ten: Vec<&str> = order[..10].iter().map(String::as_str).collect();
    let mut expected = vec!["orders.ambulance"; 9];
    expected.push("orders");
    assert_eq!(first_ten, expected);
    assert_eq!(order.len(), 33);
}

async fn a_concurrency_range_scales_on_redis_too(kind: Kind) {
    let redis = Broker::start(kind).await;
    let app =
        Upstream::scripted([Reply::Delayed(std::time::Duration::from_millis(100), 200)]).await;
    let sidecar =
        Sidecar::start(&config("shop", &redis, &app, ", concurrency: { min: 1, max: 4 }")).await;
    for n in 0..60 {
        publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await;
    }
    let gauge = r#"outrigger_subscription_concurrency{queue="orders"}"#;
    wait_metric(&sidecar, gauge, 4.0).await;
    deliveries(&app, 60).await;
    wait_metric(&sidecar, ACKED, 60.0).await;
    wait_metric(&sidecar, gauge, 1.0).await;
}

#[tokio::test]
async fn a_frozen_redis_only_grows_the_outbox_and_an_emptied_one_gets_its_groups_back() {
    let redis = Redis::start().await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &redis, &app, "")).await;
    publish(&sidecar, "orders", r#"{"n":0}"#, &[]).await;
    deliveries(&app, 1).await;

    // SIGSTOP: connections stay open, nothing answers; every command times out
    redis.pause();
    for n in 1..=5 {
        publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await;
    }
    wait_until(DEADLINE, "readiness to show the frozen broker degraded", || async {
        (broker_check(&sidecar).await == "degraded").then_some(())
    })
    .await;
    redis.resume();
    deliveries(&app, 6).await;
    wait_metric(&sidecar, "outrigger_outbox_pending", 0.0).await;

    // a Redis that comes back empty (no persistence, a failover): the group is made again
    redis.cli(&["FLUSHALL"]);
    let id = publish(&sidecar, "orders", r#"{"n":6}"#, &[]).await;
    let seen = deliveries(&app, 7).await;
    assert_eq!(header(&seen[6], "outrigger-message-id"), id);
}

async fn settled_entries_are_trimmed_from_the_stream_and_pending_ones_kept(kind: Kind) {
    let redis = Broker::start(kind).await;
    let mut script: Vec<Reply> = (0..10).map(|_| Reply::Status(200)).collect();
    script.push(Reply::Delayed(std::time::Duration::from_secs(60), 200));
    let app = Upstream::scripted(script).await;
    let sidecar =
        Sidecar::start(&config("shop", &redis, &app, ", timeout: 90s, concurrency: 1")).await;
    for n in 0..10 {
        publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await;
    }
    wait_metric(&sidecar, ACKED, 10.0).await;
    publish(&sidecar, "orders", r#"{"n":10}"#, &[]).await;
    deliveries(&app, 11).await; // the eleventh is in flight, unacknowledged

    // upkeep runs every 10 s: everything below the pending entry goes, the pending one stays
    wait_until(
        std::time::Duration::from_secs(25),
        "the stream trimmed to its pending entry",
        || async { (redis.cli(&["XLEN", "outrigger:{orders}"]) == "1").then_some(()) },
    )
    .await;
    let left = redis.cli(&["XRANGE", "outrigger:{orders}", "-", "+"]);
    assert!(left.contains(r#""n":10"#), "the unacknowledged message stays: {left}");
}

/// Thousands of messages through a handler that fails at random: every message is either
/// acknowledged once or dead-lettered after `max_attempts`, and the counts reconcile exactly.
async fn soak(broker: Option<&Broker>) {
    const MESSAGES: usize = 2000;
    // a fixed pseudo-random script: about one answer in four is a 500
    let mut dice = outrigger_tests::Dice(0x2545_f491_4f6c_dd1d);
    let script: Vec<Reply> = (0..MESSAGES * 3)
        .map(|_| Reply::Status(if dice.roll(4) == 0 { 500 } else { 200 }))
        .collect();
    let app = Upstream::scripted(script.clone()).await;
    let extra = ", max_attempts: 3, concurrency: 32";
    let yaml = match broker {
        Some(redis) => config("shop", redis, &app, extra),
        None => crate::delivery::config(&app, extra),
    };
    let sidecar = Sidecar::start(&yaml).await;
    let publishers: Vec<_> = (0..8)
        .map(|p| {
            let outbound = sidecar.outbound;
            tokio::spawn(async move {
                for n in (p..MESSAGES).step_by(8) {
                    let req = http::Request::post("/v1/publish/orders")
                        .header("host", "localhost")
                        .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                            r#"{{"n":{n}}}"#
                        ))))
                        .unwrap();
                    let res = outrigger_tests::send(outbound, req).await.expect("publish");
                    assert_eq!(res.status(), 202);
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let settled =
        wait_until(std::time::Duration::from_secs(60), "every message settled", || async {
            let acked = metric(&sidecar, ACKED).await.unwrap_or(0.0);
            let dead = metric(&sidecar, DEAD).await.unwrap_or(0.0);
            (acked + dead >= MESSAGES as f64).then_some((acked as usize, dead as usize))
        })
        .await;

    // what the app saw, judged by the script it answered from
    let seen = app.seen();
    let mut ok: std::collections::HashMap<String, usize> = Default::default();
    let mut failed: std::collections::HashMap<String, usize> = Default::default();
    for (n, request) in seen.iter().enumerate() {
        let id = header(request, "outrigger-message-id").to_owned();
        match script[n.min(script.len() - 1)] {
            Reply::Status(200) => *ok.entry(id).or_default() += 1,
            _ => *failed.entry(id).or_default() += 1,
        }
    }
    let dead: Vec<&String> = failed.iter().filter(|(_, n)| **n == 3).map(|(id, _)| id).collect();
    assert_eq!(settled, (ok.len(), dead.len()), "metrics match what the app saw");
    assert_eq!(ok.len() + dead.len(), MESSAGES, "published = delivered + dead-lettered");
    assert!(ok.values().all(|n| *n == 1), "no acknowledged message delivered twice");
    assert!(dead.iter().all(|id| !ok.contains_key(*id)), "a dead letter was never acknowledged");
    assert!(failed.values().all(|n| *n <= 3), "never more than max_attempts");
    if let Some(redis) = broker {
        assert_eq!(
            redis.cli(&["XLEN", "outrigger:{orders}:dead:orders_deadletter"]),
            dead.len().to_string()
        );
    }
}

async fn a_soak_with_random_failures_reconciles_exactly_on_redis(kind: Kind) {
    let redis = Broker::start(kind).await;
    soak(Some(&redis)).await;
}

#[tokio::test]
async fn a_soak_with_random_failures_reconciles_exactly_on_the_embedded_broker() {
    soak(None).await;
}

#[tokio::test]
async fn rediss_carries_messages_over_tls_with_the_configured_ca() {
    let pki = outrigger_tests::Pki::new();
    let redis = Redis::start_tls(&pki).await;
    let app = Upstream::status(200).await;
    let tls = format!("  tls: {{ ca_file: \"{}\" }}\n", pki.ca_file.display());
    let yaml =
        config("shop", &redis, &app, "").replace("messaging:\n", &format!("messaging:\n{tls}"));
    let sidecar = Sidecar::start(&yaml).await;
    let id = publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    assert_eq!(header(&deliveries(&app, 1).await[0], "outrigger-message-id"), id);
    wait_metric(&sidecar, ACKED, 1.0).await;
    assert_eq!(redis.cli(&["XLEN", "outrigger:{orders}"]), "1");

    // trusting another CA: the handshake fails, publishes wait in the outbox, degraded
    let wrong = format!("  tls: {{ ca_file: \"{}\" }}\n", pki.other_ca_file.display());
    let yaml =
        config("shop", &redis, &app, "").replace("messaging:\n", &format!("messaging:\n{wrong}"));
    let untrusting = Sidecar::start(&yaml).await;
    publish(&untrusting, "orders", r#"{"n":2}"#, &[]).await;
    wait_until(DEADLINE, "the broker degraded for an untrusted certificate", || async {
        (broker_check(&untrusting).await == "degraded").then_some(())
    })
    .await;
    assert_eq!(metric(&untrusting, "outrigger_outbox_pending").await, Some(1.0));
}

async fn dead_letter_retention_keeps_the_newest_on_redis(kind: Kind) {
    let redis = Broker::start(kind).await;
    let app = Upstream::status(400).await;
    let yaml = config("shop", &redis, &app, "")
        .replace("messaging:\n", "messaging:\n  dead_letter_retention: { max_messages: 3 }\n");
    let sidecar = Sidecar::start(&yaml).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    wait_metric(&sidecar, DEAD, 5.0).await;
    assert_eq!(redis.cli(&["XLEN", "outrigger:{orders}:dead:orders_deadletter"]), "3");
    assert_eq!(
        redis.cli(&["HLEN", "outrigger:{orders}:dead:orders_deadletter:ids"]),
        "3",
        "the index follows"
    );
    let (status, body) = sidecar.admin(&format!("/v1/dlq/orders_deadletter/{}", ids[0])).await;
    assert_eq!(status, 404, "the oldest went: {body}");
    let (status, _) = sidecar.admin(&format!("/v1/dlq/orders_deadletter/{}", ids[4])).await;
    assert_eq!(status, 200, "the newest stays");
}

async fn queue_and_dead_letter_gauges_read_redis(kind: Kind) {
    let redis = Broker::start(kind).await;
    let app = Upstream::health_checked(400, 503).await;
    let sidecar = crate::delivery::start_gated(&config("shop", &redis, &app, ""), &app).await;
    for n in 0..4 {
        publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await;
    }
    let depth = r#"outrigger_queue_depth{queue="orders"}"#;
    wait_metric(&sidecar, depth, 4.0).await;
    let age = r#"outrigger_queue_oldest_age_seconds{queue="orders"}"#;
    assert!(metric(&sidecar, age).await.is_some_and(|s| (0.0..60.0).contains(&s)));

    app.set_health(200); // the handler answers 400: every message is dead-lettered
    wait_metric(&sidecar, DEAD, 4.0).await;
    wait_metric(&sidecar, r#"outrigger_deadletter_depth{queue="orders_deadletter"}"#, 4.0).await;
    assert_eq!(metric(&sidecar, depth).await, None, "nothing waits any more");
}

/// Waits until group `group` consumes `orders` in order (its first read registered it).
async fn ordered_group(redis: &Broker, group: &str) {
    wait_until(DEADLINE, "the ordered group to be registered", || async {
        let members = redis.cli(&["SMEMBERS", "outrigger:{orders}:ordered"]);
        members.lines().any(|m| m == group).then_some(())
    })
    .await;
}

async fn per_key_order_holds_across_two_replicas_with_a_randomly_slow_app(kind: Kind) {
    let redis = Broker::start(kind).await;
    let script = |seed: u64| {
        (0..60).map(move |i| {
            Reply::Delayed(std::time::Duration::from_millis(((i * 37 + seed) % 5) * 10), 200)
        })
    };
    let (app_a, app_b) = (Upstream::scripted(script(0)).await, Upstream::scripted(script(3)).await);
    let ordered = ", ordered: true, concurrency: 8";
    let a = Sidecar::start(&config("shop", &redis, &app_a, ordered)).await;
    let _b = Sidecar::start(&config("shop", &redis, &app_b, ordered)).await;
    ordered_group(&redis, "shop").await;
    let keys = ["a", "b", "c"];
    for n in 0..10 {
        for key in keys {
            let body = format!(r#"{{"key":"{key}","n":{n}}}"#);
            publish(&a, "orders", &body, &[("outrigger-ordering-key", key)]).await;
        }
    }

    let mut seen = wait_until(DEADLINE, "30 deliveries across both replicas", || async {
        let mut seen = app_a.seen();
        seen.extend(app_b.seen());
        (seen.len() >= 30).then_some(seen)
    })
    .await;
    seen.sort_by_key(|s| s.at);
    crate::delivery::assert_per_key_order(&seen, &keys, 10);
    assert_eq!(seen.len(), 30, "each once");
    assert!(!app_a.seen().is_empty() && !app_b.seen().is_empty(), "both replicas worked");
}

async fn on_redis_an_ordering_key_waits_while_its_head_is_retried(kind: Kind) {
    let redis = Broker::start(kind).await;
    let app = Upstream::scripted([Reply::Status(503), Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&config("shop", &redis, &app, ", ordered: true")).await;
    ordered_group(&redis, "shop").await;
    let first = publish(&sidecar, "orders", r#"{"n":0}"#, &[("outrigger-ordering-key", "k")]).await;
    let second =
        publish(&sidecar, "orders", r#"{"n":1}"#, &[("outrigger-ordering-key", "k")]).await;
    let other = publish(&sidecar, "orders", r#"{"n":2}"#, &[("outrigger-ordering-key", "z")]).await;

    let seen = deliveries(&app, 4).await;
    wait_metric(&sidecar, ACKED, 3.0).await;
    let ids: Vec<&str> = seen.iter().map(|s| header(s, "outrigger-message-id")).collect();
    let position = |id: &str| ids.iter().position(|i| *i == id).unwrap();
    assert_eq!(ids.iter().filter(|i| **i == first).count(), 2, "the head was retried: {ids:?}");
    assert!(
        ids.iter().rposition(|i| *i == first).unwrap() < position(&second),
        "k waited: {ids:?}"
    );
    assert!(position(&other) < position(&second), "another key did not wait: {ids:?}");
    wait_until(DEADLINE, "the order lists to empty", || async {
        (redis.cli(&["EXISTS", "outrigger:{orders}:order:shop:k"]) == "0").then_some(())
    })
    .await;
}

async fn the_dead_letter_api_replays_and_purges_on_redis(kind: Kind) {
    let redis = Broker::start(kind).await;
    let app =
        Upstream::scripted([Reply::Status(422), Reply::Status(422), Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&config("shop", &redis, &app, ", concurrency: 1")).await;
    let first = publish(&sidecar, "orders", r#"{"n":0}"#, &[]).await;
    let second = publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    wait_metric(&sidecar, DEAD, 2.0).await;
    let (status, page) = sidecar.admin("/v1/dlq/orders_deadletter").await;
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    let listed: Vec<&str> =
        page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [second.as_str(), first.as_str()], "newest first");

    // replay one through the CLI's API: delivered again from Redis, its history kept
    let out = std::process::Command::new(outrigger_tests::binary())
        .args(["dlq", "replay", "orders_deadletter", "--id", &first])
        .args(["--admin", &format!("http://{}", sidecar.admin)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen = deliveries(&app, 3).await;
    assert_eq!(header(&seen[2], "outrigger-message-id"), first);
    assert_eq!(envelope(&seen[2])["metadata"]["replays"], 1);
    wait_metric(&sidecar, ACKED, 1.0).await;
    assert_eq!(redis.cli(&["XLEN", "outrigger:{orders}:dead:orders_deadletter"]), "1");

    let out = std::process::Command::new(outrigger_tests::binary())
        .args(["dlq", "purge", "orders_deadletter", "--yes"])
        .args(["--admin", &format!("http://{}", sidecar.admin)])
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "purged 1 dead letter(s) from orders_deadletter", "{stderr}");
    assert_eq!(redis.cli(&["EXISTS", "outrigger:{orders}:dead:orders_deadletter"]), "0");
}

async fn on_redis_messages_published_before_the_app_listens_are_delivered_once(kind: Kind) {
    let redis = Broker::start(kind).await;
    let yaml = |app| config_at("shop", &redis, app, ", max_attempts: 3");
    published_before_the_app_listens(yaml, false).await;
}

async fn on_redis_messages_published_before_the_app_listens_survive_a_kill9_of_the_sidecar(
    kind: Kind,
) {
    let redis = Broker::start(kind).await;
    let yaml = |app| config_at("shop", &redis, app, ", max_attempts: 3");
    published_before_the_app_listens(yaml, true).await;
}

#[tokio::test]
async fn dead_letters_kept_under_their_own_tag_by_the_release_before_move_to_their_queues_slot() {
    let redis = Redis::start().await;
    // what the release before this layout left in Redis: `outrigger:{D}` and its index
    let (old_id, other_id) = ("01KAW4ZR3C7T1V9Q8M2X5N6B0D", "01KAW4ZR3C7T1V9Q8M2X5N6B0E");
    let mut entries = Vec::new();
    for (id, from) in [(old_id, "orders"), (other_id, "billing")] {
        let envelope = format!(
            r#"{{"id":"{id}","queue":"{from}","dispatch_date":"2026-12-01T10:00:00.000Z","payload":{{"n":1}},"error":[],"metadata":{{"original_queue":"{from}","reason":"max attempts reached (5)"}}}}"#
        );
        let entry = redis.cli(&[
            "XADD",
            "outrigger:{orders_deadletter}",
            "*",
            "envelope",
            &envelope,
            "id",
            id,
        ]);
        redis.cli(&["HSET", "outrigger:{orders_deadletter}:ids", id, &entry]);
        entries.push(entry);
    }
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &redis, &app, "")).await;

    let listed = wait_until(DEADLINE, "the old dead letter to be listed", || async {
        let (_, page) = sidecar.admin("/v1/dlq/orders_deadletter").await;
        let page: serde_json::Value = serde_json::from_str(&page).ok()?;
        let ids: Vec<String> = page["messages"]
            .as_array()?
            .iter()
            .filter_map(|m| Some(m["id"].as_str()?.to_owned()))
            .collect();
        (!ids.is_empty()).then_some(ids)
    })
    .await;
    assert_eq!(listed, [old_id], "this queue's dead letter, moved");
    assert_eq!(redis.cli(&["XLEN", "outrigger:{orders}:dead:orders_deadletter"]), "1");
    let kept = redis.cli(&["HGET", "outrigger:{orders}:dead:orders_deadletter:ids", old_id]);
    assert_eq!(kept, entries[0], "its entry id, so its age, kept");
    let (status, shown) = sidecar.admin(&format!("/v1/dlq/orders_deadletter/{old_id}")).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(redis.cli(&["XLEN", "outrigger:{orders_deadletter}"]), "1", "another queue's stays");
}

async fn a_dead_letter_queue_shared_by_priority_lanes_is_listed_shown_and_purged_across_them(
    kind: Kind,
) {
    let redis = Broker::start(kind).await;
    let app = Upstream::status(422).await;
    let extra = ", priority_lanes: [orders.high], dead_letter_queue: orders.dlq";
    let sidecar = Sidecar::start(&config("shop", &redis, &app, extra)).await;
    let low = publish(&sidecar, "orders", r#"{"n":0}"#, &[]).await;
    wait_until(DEADLINE, "the first dead letter", || async {
        let (_, body) = sidecar.admin("/v1/dlq/orders.dlq").await;
        body.contains(&low).then_some(())
    })
    .await;
    let high = publish(&sidecar, "orders.high", r#"{"n":1}"#, &[]).await;
    wait_until(DEADLINE, "both dead letters", || async {
        let (_, body) = sidecar.admin("/v1/dlq/orders.dlq").await;
        body.contains(&high).then_some(())
    })
    .await;
    // each lane's in its own slot
    assert_eq!(redis.cli(&["XLEN", "outrigger:{orders}:dead:orders.dlq"]), "1");
    assert_eq!(redis.cli(&["XLEN", "outrigger:{orders.high}:dead:orders.dlq"]), "1");
    let (_, page) = sidecar.admin("/v1/dlq/orders.dlq?limit=1").await;
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["messages"][0]["id"], high.as_str(), "newest first across the lanes");
    let next = page["next"].as_str().expect("a next page").to_owned();
    let (_, page) = sidecar.admin(&format!("/v1/dlq/orders.dlq?limit=1&before={next}")).await;
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["messages"][0]["id"], low.as_str());
    let (status, shown) = sidecar.admin(&format!("/v1/dlq/orders.dlq/{high}")).await;
    assert_eq!(status, 200, "{shown}");

    let out = std::process::Command::new(outrigger_tests::binary())
        .args(["dlq", "purge", "orders.dlq", "--yes"])
        .args(["--admin", &format!("http://{}", sidecar.admin)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains('2'),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(redis.cli(&["EXISTS", "outrigger:{orders}:dead:orders.dlq"]), "0");
    assert_eq!(redis.cli(&["EXISTS", "outrigger:{orders.high}:dead:orders.dlq"]), "0");
}

#[tokio::test]
async fn a_killed_cluster_node_loses_nothing_answered_202_and_its_queue_resumes_when_it_is_back() {
    let mut cluster = RedisCluster::start().await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &cluster, &app, "")).await;
    let mut published = vec![publish(&sidecar, "orders", r#"{"n":0}"#, &[]).await];
    deliveries(&app, 1).await;

    let node = cluster.node_of("outrigger:{orders}");
    cluster.stop_node(node);
    for n in 1..=10 {
        published.push(publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    wait_until(DEADLINE, "readiness to show the broker degraded", || async {
        (broker_check(&sidecar).await == "degraded").then_some(())
    })
    .await;
    cluster.restart_node(node).await;
    assert_each_delivered_once(&sidecar, &app, published).await;
}

#[tokio::test]
async fn a_failover_to_a_replica_is_followed_and_delivery_goes_on() {
    let mut cluster = RedisCluster::start().await;
    let node = cluster.node_of("outrigger:{orders}");
    let replica = cluster.add_replica(node).await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &cluster, &app, "")).await;
    let mut published = Vec::new();
    for n in 0..5 {
        published.push(publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    deliveries(&app, 5).await;
    wait_metric(&sidecar, ACKED, 5.0).await;
    // Redis replicates after it answers: what the primary took (the acknowledgements too) must
    // be on the replica first
    cluster.wait_replicated(node).await;

    cluster.stop_node(node);
    for n in 5..10 {
        published.push(publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    // the node timeout (2 s), then the election, on a busy machine
    wait_until(
        std::time::Duration::from_secs(30),
        "the replica to take over the queue's slot",
        || async { (cluster.node_of("outrigger:{orders}") == replica).then_some(()) },
    )
    .await;
    assert_each_delivered_once(&sidecar, &app, published).await;
}

/// The mechanism, not the loss itself: while the primary's replica has not confirmed a batch,
/// the outbox keeps it (and relays it again to whoever holds the slot next). A paused replica
/// still has the bytes in its socket when it resumes, so without the `WAIT` this scenario would
/// not lose them; what fails then is the relay reporting success it cannot know.
#[tokio::test]
async fn the_relay_forgets_nothing_its_primarys_replica_has_not_copied() {
    let mut cluster = RedisCluster::start().await;
    let node = cluster.node_of("outrigger:{orders}");
    let replica = cluster.add_replica(node).await;
    // a publisher alone: nothing reads (or acknowledges) while the primary is lost
    let publisher = Sidecar::start(
        "service: { name: shop }\nmessaging:\n  broker: \"URL\"\n  data_dir: \"$SCRATCH/data\"\n"
            .replace("URL", &cluster.url())
            .as_str(),
    )
    .await;

    // the replica stops copying; the primary takes the batch and is lost before it is copied
    cluster.pause_node(replica);
    let mut published = Vec::new();
    for n in 0..5 {
        published.push(publish(&publisher, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    wait_until(DEADLINE, "the relay to refuse an uncopied batch", || async {
        (broker_check(&publisher).await == "degraded").then_some(())
    })
    .await;
    assert_eq!(metric(&publisher, "outrigger_outbox_pending").await, Some(5.0), "kept");
    cluster.stop_node(node);
    cluster.resume_node(replica);
    wait_until(std::time::Duration::from_secs(30), "the replica to take over", || async {
        (cluster.node_of("outrigger:{orders}") == replica).then_some(())
    })
    .await;
    wait_metric(&publisher, "outrigger_outbox_pending", 0.0).await;

    let app = Upstream::status(200).await;
    let consumer = Sidecar::start(&config("shop", &cluster, &app, "")).await;
    assert_each_delivered_once(&consumer, &app, published).await;
}

#[tokio::test]
async fn a_queue_whose_replica_lags_holds_back_only_its_own_messages() {
    let mut cluster = RedisCluster::start().await;
    let node = cluster.node_of("outrigger:{orders}");
    let replica = cluster.add_replica(node).await;
    // a queue in another primary's slots
    let other = ["billing", "mail", "audit", "alpha", "beta", "gamma", "delta"]
        .into_iter()
        .find(|q| cluster.node_of(&format!("outrigger:{{{q}}}")) != node)
        .expect("a queue on another node");
    let app = Upstream::status(200).await;
    let lanes = format!(", priority_lanes: [{other}]");
    let sidecar = Sidecar::start(&config("shop", &cluster, &app, &lanes)).await;

    // the primary takes the batch and its replica does not copy it: the outbox keeps it (it
    // may be delivered from the primary meanwhile: what matters is what the outbox forgets)
    cluster.pause_node(replica);
    let held = publish(&sidecar, "orders", r#"{"n":0}"#, &[]).await;
    let going = publish(&sidecar, other, r#"{"n":1}"#, &[]).await;
    wait_until(DEADLINE, "the lagging queue to show in readiness", || async {
        (broker_check(&sidecar).await == "degraded").then_some(())
    })
    .await;
    wait_metric(&sidecar, "outrigger_outbox_pending", 1.0).await;
    let seen = deliveries(&app, 2).await;
    let ids: HashSet<String> = self::ids(&seen).into_iter().collect();
    assert!(ids.contains(&going), "the other queue's message went: {ids:?}");
    assert_eq!(
        metric(&sidecar, "outrigger_outbox_pending").await,
        Some(1.0),
        "only the lagging queue's message waits in the outbox"
    );

    cluster.resume_node(replica);
    wait_metric(&sidecar, "outrigger_outbox_pending", 0.0).await;
    assert!(ids.contains(&held), "delivered from the primary, once: {ids:?}");
    wait_metric(&sidecar, ACKED, 1.0).await;
    let acked_other =
        format!(r#"outrigger_messages_delivered_total{{outcome="acked",queue="{other}"}}"#);
    wait_metric(&sidecar, &acked_other, 1.0).await;
    assert_eq!(app.seen().len(), 2, "nothing delivered twice");
}

/// Every test above that must hold alike on one Redis and on a Redis Cluster, run on both:
/// `redis::single::NAME` and `redis::cluster::NAME`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod single {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Single).await
            })*
        }
        mod cluster {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Cluster).await
            })*
        }
    };
}

on_both!(
    a_message_goes_through_redis_to_the_app_with_its_envelope,
    retries_keep_their_history_and_exhausted_messages_are_dead_lettered_in_redis,
    two_replicas_of_one_service_share_a_queue_each_message_once,
    two_services_each_receive_every_message,
    publishes_are_accepted_while_redis_is_down_and_delivered_once_it_is_back,
    a_replica_killed_mid_delivery_has_its_message_delivered_by_the_other,
    an_id_delivered_whose_ack_failed_is_not_delivered_again_after_a_restart,
    priority_lanes_hold_on_redis_too,
    a_concurrency_range_scales_on_redis_too,
    settled_entries_are_trimmed_from_the_stream_and_pending_ones_kept,
    a_soak_with_random_failures_reconciles_exactly_on_redis,
    dead_letter_retention_keeps_the_newest_on_redis,
    queue_and_dead_letter_gauges_read_redis,
    per_key_order_holds_across_two_replicas_with_a_randomly_slow_app,
    on_redis_an_ordering_key_waits_while_its_head_is_retried,
    the_dead_letter_api_replays_and_purges_on_redis,
    on_redis_messages_published_before_the_app_listens_are_delivered_once,
    on_redis_messages_published_before_the_app_listens_survive_a_kill9_of_the_sidecar,
    a_dead_letter_queue_shared_by_priority_lanes_is_listed_shown_and_purged_across_them,
);
