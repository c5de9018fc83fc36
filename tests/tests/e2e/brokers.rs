//! Every broker from one list (`on_every_broker!` at the end): the embedded store, one
//! `redis-server` (`redis://`), a three-node Redis Cluster (`redis+cluster://`) and
//! `nats-server -js` (`nats://`), each real and started by the test. A test runs as
//! `brokers::embedded::NAME`, `brokers::redis::NAME`, `brokers::redis_cluster::NAME` and
//! `brokers::nats::NAME`; those that need a broker of their own (two sidecars sharing it, an
//! outage) run on the remote three only. Their assertions read the engine through [`Broker`]'s
//! broker-neutral questions (how many messages a queue keeps, how many wait for an ack, how many
//! dead letters); the embedded store, inside the sidecar, is read through the API the tests
//! read anyway. What only one engine does is tested in `redis.rs`, `nats.rs` and `delivery.rs`.

use std::collections::HashSet;
use std::net::SocketAddr;

use outrigger_tests::{DEADLINE, Nats, Redis, RedisCluster, Reply, Sidecar, Upstream, wait_until};

use crate::delivery::{
    ACKED, DEAD, DUPLICATE, deliveries, envelope, header, publish,
    published_before_the_app_listens, wait_metric,
};
use crate::messaging::metric;

/// The engine a test runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Embedded,
    Redis,
    RedisCluster,
    Nats,
}

#[derive(Debug)]
pub(crate) enum Broker {
    /// `broker: embedded`: the store in the sidecar's `data_dir`.
    Embedded,
    Redis(Redis),
    RedisCluster(RedisCluster),
    Nats(Nats),
}

impl Broker {
    pub(crate) async fn start(kind: Kind) -> Self {
        match kind {
            Kind::Embedded => Broker::Embedded,
            Kind::Redis => Broker::Redis(Redis::start().await),
            Kind::RedisCluster => Broker::RedisCluster(RedisCluster::start().await),
            Kind::Nats => Broker::Nats(Nats::start().await),
        }
    }

    /// What the sidecar's errors call it: `redis failed: …`, `nats failed: …`.
    fn system(&self) -> &'static str {
        match self {
            Broker::Embedded => "embedded",
            Broker::Redis(_) | Broker::RedisCluster(_) => "redis",
            Broker::Nats(_) => "nats",
        }
    }

    /// `redis-cli` on the server, or on the cluster following `MOVED`; `None` on NATS. For the
    /// assertions on Redis's own layout.
    fn redis_cli(&self, args: &[&str]) -> Option<String> {
        match self {
            Broker::Redis(redis) => Some(redis.cli(args)),
            Broker::RedisCluster(cluster) => Some(cluster.cli(args)),
            Broker::Nats(_) | Broker::Embedded => None,
        }
    }

    /// How many messages the engine keeps for queue `queue`, settled or not, until upkeep
    /// trims the settled ones: the stream's length on Redis, its message count on NATS (`None`
    /// for the embedded store, which forgets a message at its ack).
    fn kept(&self, queue: &str) -> Option<u64> {
        match self {
            Broker::Embedded => None,
            Broker::Nats(nats) => Some(nats.stream_messages(&nats_stream("Q", queue))),
            _ => Some(self.redis_count(&["XLEN", &format!("outrigger:{{{queue}}}")])),
        }
    }

    /// How many of queue `queue`'s messages consumer group `group` was handed and has not
    /// acknowledged (`None` for the embedded store, which has no groups).
    fn unacknowledged(&self, queue: &str, group: &str) -> Option<u64> {
        match self {
            Broker::Embedded => None,
            Broker::Nats(nats) => {
                let consumer = nats.consumer(&nats_stream("Q", queue), group);
                Some(consumer["num_ack_pending"].as_u64().unwrap_or(0))
            }
            _ => {
                let stream = format!("outrigger:{{{queue}}}");
                let pending = self.redis_cli(&["XPENDING", &stream, group]).unwrap_or_default();
                let first = pending.lines().next().and_then(|n| n.trim().parse().ok());
                Some(first.unwrap_or(0))
            }
        }
    }

    /// How many dead letters dead-letter queue `dlq` holds from the lanes `lanes`, read from
    /// the engine (`None` for the embedded store: the tests read it through `/v1/dlq`).
    fn dead_letters(&self, lanes: &[&str], dlq: &str) -> Option<u64> {
        let redis =
            |lane: &&str| self.redis_count(&["XLEN", &format!("outrigger:{{{lane}}}:dead:{dlq}")]);
        match self {
            Broker::Embedded => None,
            // one stream per dead-letter queue, whichever lane its letters came from
            Broker::Nats(nats) => Some(nats.stream_messages(&nats_stream("DLQ", dlq))),
            _ => Some(lanes.iter().map(redis).sum()),
        }
    }

    fn redis_count(&self, args: &[&str]) -> u64 {
        let answer = self.redis_cli(args).unwrap_or_default();
        answer.trim().parse().unwrap_or_else(|_| panic!("{args:?} answered {answer:?}"))
    }

    /// Kills it (every node of a cluster): an outage.
    fn stop(&mut self) {
        match self {
            Broker::Redis(redis) => redis.stop(),
            Broker::RedisCluster(cluster) => cluster.stop(),
            Broker::Nats(nats) => nats.stop(),
            Broker::Embedded => unreachable!("the embedded store has no outage of its own"),
        }
    }

    async fn restart(&mut self) {
        match self {
            Broker::Redis(redis) => redis.restart().await,
            Broker::RedisCluster(cluster) => cluster.restart().await,
            Broker::Nats(nats) => nats.restart().await,
            Broker::Embedded => unreachable!("the embedded store has no outage of its own"),
        }
    }
}

/// The name of a queue's (`Q`) or a dead-letter queue's (`DLQ`) stream on NATS: its dots and
/// underscores escaped as Outrigger does (`_` → `__`, `.` → `_d`).
fn nats_stream(role: &str, queue: &str) -> String {
    format!("OUTRIGGER-{role}-{}", queue.replace('_', "__").replace('.', "_d"))
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

impl BrokerUrl for Nats {
    fn url(&self) -> String {
        Nats::url(self)
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
            Broker::Redis(redis) => redis.url(),
            Broker::RedisCluster(cluster) => cluster.url(),
            Broker::Nats(nats) => nats.url(),
            Broker::Embedded => "embedded".to_owned(),
        }
    }
}

/// A sidecar of service `service` on `broker`, delivering queue `orders` to `app`.
pub(crate) fn config(
    service: &str,
    broker: &impl BrokerUrl,
    app: &Upstream,
    extra: &str,
) -> String {
    config_at(service, broker, app.addr(), extra)
}

/// The same with the app at `app`, listening or not.
pub(crate) fn config_at(
    service: &str,
    broker: &impl BrokerUrl,
    app: SocketAddr,
    extra: &str,
) -> String {
    format!(
        "service:\n  name: {service}\n  app: {{ url: \"http://{app}\" }}\n\
         messaging:\n  broker: \"{url}\"\n  data_dir: \"$SCRATCH/data\"\n  claim_idle: 1s\n  \
         subscriptions:\n    - {{ queue: orders, path: /events/orders, \
         backoff: {{ initial: 50ms, max: 200ms, jitter: none }}{extra} }}\n",
        url = broker.url(),
    )
}

/// The status of `/readyz`'s broker check.
pub(crate) async fn broker_check(sidecar: &Sidecar) -> String {
    let (_, body) = sidecar.admin("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&body).expect("/readyz answers JSON");
    ready["checks"]["broker"]["status"].as_str().unwrap_or("absent").to_owned()
}

pub(crate) fn ids(seen: &[outrigger_tests::Seen]) -> Vec<String> {
    seen.iter().map(|s| header(s, "outrigger-message-id").to_owned()).collect()
}

async fn a_message_goes_through_the_broker_to_the_app_with_its_envelope(kind: Kind) {
    let broker = Broker::start(kind).await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &broker, &app, "")).await;
    let id = publish(&sidecar, "orders", r#"{"order": 42}"#, &[("idempotency-key", "k-42")]).await;

    let seen = deliveries(&app, 1).await.remove(0);
    assert_eq!(header(&seen, "outrigger-message-id"), id);
    assert_eq!(header(&seen, "outrigger-attempt"), "1");
    assert_eq!(header(&seen, "idempotency-key"), "k-42");
    assert_eq!(envelope(&seen)["payload"]["order"], 42);
    wait_metric(&sidecar, ACKED, 1.0).await;
    wait_metric(&sidecar, "outrigger_outbox_pending", 0.0).await;
    if let (Some(kept), Some(unacknowledged)) =
        (broker.kept("orders"), broker.unacknowledged("orders", "shop"))
    {
        assert_eq!(kept, 1, "the queue keeps it until upkeep trims it");
        assert_eq!(unacknowledged, 0, "acknowledged by the group");
        assert_eq!(broker_check(&sidecar).await, "ok", "a remote broker is checked");
    }
}

async fn retries_keep_their_history_and_exhausted_messages_are_dead_lettered(kind: Kind) {
    let broker = Broker::start(kind).await;
    let app =
        Upstream::scripted([Reply::Status(500), Reply::Status(503), Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&config("shop", &broker, &app, ", max_attempts: 3")).await;
    publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    let seen = deliveries(&app, 3).await;
    wait_metric(&sidecar, ACKED, 1.0).await;
    let attempts: Vec<&str> = seen.iter().map(|s| header(s, "outrigger-attempt")).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert_eq!(envelope(&seen[2])["error"].as_array().unwrap().len(), 2);

    // the script now answers 200 forever; a second app fails forever
    let failing = Upstream::status(500).await;
    let other = Sidecar::start(&config("billing", &broker, &failing, ", max_attempts: 2")).await;
    wait_metric(&other, DEAD, 1.0).await;
    assert_eq!(failing.requests(), 2, "max_attempts deliveries, then the dead letter");
    assert_eq!(broker.dead_letters(&["orders"], "orders_deadletter"), Some(1));
    let (_, page) = other.admin("/v1/dlq/orders_deadletter").await;
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    let id = page["messages"][0]["id"].as_str().expect("the dead letter listed");
    let (_, dead) = other.admin(&format!("/v1/dlq/orders_deadletter/{id}")).await;
    assert!(dead.contains(r#""reason":"max attempts reached (2)""#), "{dead}");
    assert!(dead.contains(r#""subscriber":"billing/events/orders""#), "{dead}");
}

async fn two_replicas_of_one_service_share_a_queue_each_message_once(kind: Kind) {
    let broker = Broker::start(kind).await;
    let (app_a, app_b) = (Upstream::status(200).await, Upstream::status(200).await);
    let a = Sidecar::start(&config("shop", &broker, &app_a, "")).await;
    let b = Sidecar::start(&config("shop", &broker, &app_b, "")).await;
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
    let broker = Broker::start(kind).await;
    let (shop_app, mail_app) = (Upstream::status(200).await, Upstream::status(200).await);
    let shop = Sidecar::start(&config("shop", &broker, &shop_app, "")).await;
    let _mail = Sidecar::start(&config("mail", &broker, &mail_app, "")).await;
    let id = publish(&shop, "orders", r#"{"n":1}"#, &[]).await;

    assert_eq!(ids(&deliveries(&shop_app, 1).await), std::slice::from_ref(&id));
    assert_eq!(ids(&deliveries(&mail_app, 1).await), [id]);
}

async fn publishes_are_accepted_while_the_broker_is_down_and_delivered_once_it_is_back(kind: Kind) {
    let mut broker = Broker::start(kind).await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &broker, &app, "")).await;
    let published = publish_through_an_outage(&sidecar, &app, || broker.stop()).await;
    // the detail says what failed and why, down to the engine's own error
    let (_, body) = sidecar.admin("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    let detail = ready["checks"]["broker"]["detail"].as_str().unwrap_or_default();
    let failed = format!("the broker did not take the batch: {} failed: ", broker.system());
    assert!(detail.starts_with(&failed), "{detail}");
    assert!(detail.ends_with("10 message(s) wait in the outbox"), "{detail}");

    broker.restart().await;
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

async fn a_replica_killed_mid_delivery_has_its_message_delivered_by_the_other(kind: Kind) {
    let broker = Broker::start(kind).await;
    // replica a's app never answers in time; replica b's answers at once
    let slow = Upstream::scripted([Reply::Delayed(std::time::Duration::from_secs(30), 200)]).await;
    let fast = Upstream::status(200).await;
    let mut a = Sidecar::start(&config("shop", &broker, &slow, ", timeout: 60s")).await;
    let id = publish(&a, "orders", r#"{"n":1}"#, &[]).await;
    deliveries(&slow, 1).await;
    a.kill9();

    let _b = Sidecar::start(&config("shop", &broker, &fast, "")).await;
    let seen = deliveries(&fast, 1).await;
    assert_eq!(header(&seen[0], "outrigger-message-id"), id);
    assert_eq!(header(&seen[0], "outrigger-attempt"), "2", "the interrupted attempt counts");
    assert_eq!(metric(&_b, ACKED).await, Some(1.0));
}

async fn an_id_delivered_whose_ack_failed_is_not_delivered_again_after_a_restart(kind: Kind) {
    let mut broker = Broker::start(kind).await;
    // the app holds its answer a moment: long enough to take the broker away under it
    let app = Upstream::scripted([Reply::Delayed(std::time::Duration::from_secs(1), 200)]).await;
    let mut sidecar = Sidecar::start(&config("shop", &broker, &app, "")).await;
    let id = publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    let seen = deliveries(&app, 1).await;
    assert_eq!(header(&seen[0], "outrigger-message-id"), id);
    broker.stop();
    // the app answers 200, the acknowledgement cannot reach the broker, the id is kept on disk
    wait_until(DEADLINE, "the failed ack's id to be remembered", || async {
        sidecar.log().contains("the delivered id is remembered for the dedup window").then_some(())
    })
    .await;

    sidecar.kill9();
    broker.restart().await;
    sidecar.restart().await;

    // the message is still unacknowledged in the group: redelivered after claim_idle, and
    // acknowledged without a second delivery
    wait_metric(&sidecar, DUPLICATE, 1.0).await;
    assert_eq!(app.requests(), 1, "delivered once, across the restart");
    assert!(sidecar.log().contains("recalled ids acknowledged before the restart"));
    wait_until(DEADLINE, "the message to be acknowledged", || async {
        (broker.unacknowledged("orders", "shop") == Some(0)).then_some(())
    })
    .await;
}

async fn priority_lanes_hold(kind: Kind) {
    let broker = Broker::start(kind).await;
    let lanes = ", concurrency: 1, priority_lanes: [orders.ambulance]";
    let order =
        crate::delivery::lanes_in_delivery_order(|app| config("shop", &broker, app, lanes)).await;
    let first_ten: Vec<&str> = order[..10].iter().map(String::as_str).collect();
    let mut expected = vec!["orders.ambulance"; 9];
    expected.push("orders");
    assert_eq!(first_ten, expected);
    assert_eq!(order.len(), 33);
}

async fn a_concurrency_range_scales(kind: Kind) {
    let broker = Broker::start(kind).await;
    let app =
        Upstream::scripted([Reply::Delayed(std::time::Duration::from_millis(100), 200)]).await;
    let sidecar =
        Sidecar::start(&config("shop", &broker, &app, ", concurrency: { min: 1, max: 4 }")).await;
    for n in 0..60 {
        publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await;
    }
    let gauge = r#"outrigger_subscription_concurrency{queue="orders"}"#;
    wait_metric(&sidecar, gauge, 4.0).await;
    deliveries(&app, 60).await;
    wait_metric(&sidecar, ACKED, 60.0).await;
    wait_metric(&sidecar, gauge, 1.0).await;
}

async fn settled_entries_are_trimmed_from_the_stream_and_pending_ones_kept(kind: Kind) {
    let broker = Broker::start(kind).await;
    let mut script: Vec<Reply> = (0..10).map(|_| Reply::Status(200)).collect();
    script.push(Reply::Delayed(std::time::Duration::from_secs(60), 200));
    let app = Upstream::scripted(script).await;
    let sidecar =
        Sidecar::start(&config("shop", &broker, &app, ", timeout: 90s, concurrency: 1")).await;
    for n in 0..10 {
        publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await;
    }
    wait_metric(&sidecar, ACKED, 10.0).await;
    publish(&sidecar, "orders", r#"{"n":10}"#, &[]).await;
    deliveries(&app, 11).await; // the eleventh is in flight, unacknowledged

    // upkeep runs every 10 s: everything below the unacknowledged message goes, it stays
    wait_until(
        std::time::Duration::from_secs(25),
        "the queue trimmed to its unacknowledged message",
        || async { (broker.kept("orders") == Some(1)).then_some(()) },
    )
    .await;
    let unacknowledged = broker.unacknowledged("orders", "shop");
    assert_eq!(unacknowledged, Some(1), "the one kept is the one in flight");
}

/// Thousands of messages through a handler that fails at random: every message is either
/// acknowledged once or dead-lettered after `max_attempts`, and the counts reconcile exactly.
async fn a_soak_with_random_failures_reconciles_exactly(kind: Kind) {
    let broker = Broker::start(kind).await;
    const MESSAGES: usize = 2000;
    // a fixed pseudo-random script: about one answer in four is a 500
    let mut dice = outrigger_tests::Dice(0x2545_f491_4f6c_dd1d);
    let script: Vec<Reply> = (0..MESSAGES * 3)
        .map(|_| Reply::Status(if dice.roll(4) == 0 { 500 } else { 200 }))
        .collect();
    let app = Upstream::scripted(script.clone()).await;
    let extra = ", max_attempts: 3, concurrency: 32";
    let sidecar = Sidecar::start(&config("shop", &broker, &app, extra)).await;
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
    if let Some(stored) = broker.dead_letters(&["orders"], "orders_deadletter") {
        assert_eq!(stored, dead.len() as u64);
    }
}

async fn dead_letter_retention_keeps_the_newest(kind: Kind) {
    let broker = Broker::start(kind).await;
    let app = Upstream::status(400).await;
    // one at a time: dead-lettered in publish order, so the newest are the last published
    let yaml = config("shop", &broker, &app, ", concurrency: 1")
        .replace("messaging:\n", "messaging:\n  dead_letter_retention: { max_messages: 3 }\n");
    let sidecar = Sidecar::start(&yaml).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    wait_metric(&sidecar, DEAD, 5.0).await;
    if let Some(stored) = broker.dead_letters(&["orders"], "orders_deadletter") {
        assert_eq!(stored, 3);
    }
    if let Some(index) =
        broker.redis_cli(&["HLEN", "outrigger:{orders}:dead:orders_deadletter:ids"])
    {
        assert_eq!(index, "3", "Redis's id index follows");
    }
    let (status, body) = sidecar.admin(&format!("/v1/dlq/orders_deadletter/{}", ids[0])).await;
    assert_eq!(status, 404, "the oldest went: {body}");
    let (status, _) = sidecar.admin(&format!("/v1/dlq/orders_deadletter/{}", ids[4])).await;
    assert_eq!(status, 200, "the newest stays");
}

async fn queue_and_dead_letter_gauges_read_the_broker(kind: Kind) {
    let broker = Broker::start(kind).await;
    let app = Upstream::health_checked(400, 503).await;
    let sidecar = crate::delivery::start_gated(&config("shop", &broker, &app, ""), &app).await;
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

/// Waits until group `group` consumes `orders` in order: on Redis its first read registers it
/// (NATS needs nothing: a keyed message has its key's subject from its publish on).
async fn ordered_group(broker: &Broker, group: &str) {
    wait_until(DEADLINE, "the ordered group to be registered", || async {
        let members = broker.redis_cli(&["SMEMBERS", "outrigger:{orders}:ordered"]);
        members.is_none_or(|members| members.lines().any(|m| m == group)).then_some(())
    })
    .await;
}

async fn per_key_order_holds_across_two_replicas_with_a_randomly_slow_app(kind: Kind) {
    let broker = Broker::start(kind).await;
    let script = |seed: u64| {
        (0..60).map(move |i| {
            Reply::Delayed(std::time::Duration::from_millis(((i * 37 + seed) % 5) * 10), 200)
        })
    };
    let (app_a, app_b) = (Upstream::scripted(script(0)).await, Upstream::scripted(script(3)).await);
    let ordered = ", ordered: true, concurrency: 8";
    let a = Sidecar::start(&config("shop", &broker, &app_a, ordered)).await;
    let _b = Sidecar::start(&config("shop", &broker, &app_b, ordered)).await;
    ordered_group(&broker, "shop").await;
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

async fn an_ordering_key_waits_while_its_head_is_retried(kind: Kind) {
    let broker = Broker::start(kind).await;
    let app = Upstream::scripted([Reply::Status(503), Reply::Status(200)]).await;
    // one delivery at a time: the head's first answer is the 503, whichever broker
    let extra = ", ordered: true, concurrency: 1";
    let sidecar = Sidecar::start(&config("shop", &broker, &app, extra)).await;
    ordered_group(&broker, "shop").await;
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
    wait_until(DEADLINE, "Redis's order lists to empty", || async {
        let exists = broker.redis_cli(&["EXISTS", "outrigger:{orders}:order:shop:k"]);
        exists.is_none_or(|n| n == "0").then_some(())
    })
    .await;
}

async fn the_dead_letter_api_lists_replays_and_purges(kind: Kind) {
    let broker = Broker::start(kind).await;
    let app =
        Upstream::scripted([Reply::Status(422), Reply::Status(422), Reply::Status(200)]).await;
    let sidecar = Sidecar::start(&config("shop", &broker, &app, ", concurrency: 1")).await;
    let first = publish(&sidecar, "orders", r#"{"n":0}"#, &[]).await;
    let second = publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    wait_metric(&sidecar, DEAD, 2.0).await;
    let (status, page) = sidecar.admin("/v1/dlq/orders_deadletter").await;
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    let listed: Vec<&str> =
        page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(listed, [second.as_str(), first.as_str()], "newest first");

    // replay one through the CLI's API: delivered again from the broker, its history kept
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
    if let Some(stored) = broker.dead_letters(&["orders"], "orders_deadletter") {
        assert_eq!(stored, 1, "the replayed one left");
    }

    let out = std::process::Command::new(outrigger_tests::binary())
        .args(["dlq", "purge", "orders_deadletter", "--yes"])
        .args(["--admin", &format!("http://{}", sidecar.admin)])
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), "purged 1 dead letter(s) from orders_deadletter", "{stderr}");
    if let Some(stored) = broker.dead_letters(&["orders"], "orders_deadletter") {
        assert_eq!(stored, 0);
    }
}

async fn messages_published_before_the_app_listens_are_delivered_once(kind: Kind) {
    let broker = Broker::start(kind).await;
    let yaml = |app| config_at("shop", &broker, app, ", max_attempts: 3");
    published_before_the_app_listens(yaml, false).await;
}

async fn messages_published_before_the_app_listens_survive_a_kill9_of_the_sidecar(kind: Kind) {
    let broker = Broker::start(kind).await;
    let yaml = |app| config_at("shop", &broker, app, ", max_attempts: 3");
    published_before_the_app_listens(yaml, true).await;
}

async fn a_dead_letter_queue_shared_by_priority_lanes_is_listed_shown_and_purged_across_them(
    kind: Kind,
) {
    let broker = Broker::start(kind).await;
    let app = Upstream::status(422).await;
    let extra = ", priority_lanes: [orders.high], dead_letter_queue: orders.dlq";
    let sidecar = Sidecar::start(&config("shop", &broker, &app, extra)).await;
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
    if let Some(stored) = broker.dead_letters(&["orders", "orders.high"], "orders.dlq") {
        assert_eq!(stored, 2);
    }
    if let Some(low_lane) = broker.redis_cli(&["XLEN", "outrigger:{orders}:dead:orders.dlq"]) {
        assert_eq!(low_lane, "1", "on Redis each lane's are in its own slot");
    }
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
    if let Some(stored) = broker.dead_letters(&["orders", "orders.high"], "orders.dlq") {
        assert_eq!(stored, 0);
    }
}

async fn kill9_at_random_moments_loses_no_accepted_message(kind: Kind) {
    let broker = Broker::start(kind).await;
    let remote = (!matches!(broker, Broker::Embedded)).then(|| broker.url());
    crate::faults::kill9_loop(remote).await;
}

/// Every test above, run on each broker: those of `everywhere` on the embedded store, Redis,
/// a Redis Cluster and NATS (`brokers::embedded::NAME`, `brokers::redis::NAME`,
/// `brokers::redis_cluster::NAME`, `brokers::nats::NAME`); those of `remote`, which need a broker
/// beside the sidecar (shared by two sidecars, or taken away), on the three remote ones.
macro_rules! on_every_broker {
    (everywhere: [$($all:ident),* $(,)?], remote: [$($remote:ident),* $(,)?] $(,)?) => {
        mod embedded {
            $(#[tokio::test]
            async fn $all() {
                super::$all(super::Kind::Embedded).await
            })*
        }
        on_every_broker!(@remote redis, Redis, [$($all,)* $($remote,)*]);
        on_every_broker!(@remote redis_cluster, RedisCluster, [$($all,)* $($remote,)*]);
        on_every_broker!(@remote nats, Nats, [$($all,)* $($remote,)*]);
    };
    (@remote $module:ident, $kind:ident, [$($name:ident,)*]) => {
        mod $module {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::$kind).await
            })*
        }
    };
}

on_every_broker!(
    everywhere: [
        a_message_goes_through_the_broker_to_the_app_with_its_envelope,
        priority_lanes_hold,
        a_concurrency_range_scales,
        a_soak_with_random_failures_reconciles_exactly,
        dead_letter_retention_keeps_the_newest,
        queue_and_dead_letter_gauges_read_the_broker,
        an_ordering_key_waits_while_its_head_is_retried,
        the_dead_letter_api_lists_replays_and_purges,
        messages_published_before_the_app_listens_are_delivered_once,
        messages_published_before_the_app_listens_survive_a_kill9_of_the_sidecar,
        a_dead_letter_queue_shared_by_priority_lanes_is_listed_shown_and_purged_across_them,
        kill9_at_random_moments_loses_no_accepted_message,
    ],
    remote: [
        retries_keep_their_history_and_exhausted_messages_are_dead_lettered,
        two_replicas_of_one_service_share_a_queue_each_message_once,
        two_services_each_receive_every_message,
        publishes_are_accepted_while_the_broker_is_down_and_delivered_once_it_is_back,
        a_replica_killed_mid_delivery_has_its_message_delivered_by_the_other,
        an_id_delivered_whose_ack_failed_is_not_delivered_again_after_a_restart,
        settled_entries_are_trimmed_from_the_stream_and_pending_ones_kept,
        per_key_order_holds_across_two_replicas_with_a_randomly_slow_app,
    ],
);
