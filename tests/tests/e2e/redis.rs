//! What only the Redis brokers do, against a real `redis-server` or a three-node Redis
//! Cluster: Redis answering errors, frozen and emptied, `rediss://`, the dead-letter layout of
//! the release before moved into its queue's slot, and a cluster's node killed, failed over and
//! lagging. What every broker does is in `brokers.rs`.

use std::collections::HashSet;

use outrigger_tests::{DEADLINE, Redis, RedisCluster, Sidecar, Upstream, wait_until};

use crate::brokers::{assert_each_delivered_once, broker_check, config, ids};
use crate::delivery::{ACKED, deliveries, header, publish, wait_metric};
use crate::messaging::metric;

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
    let ids: HashSet<String> = ids(&seen).into_iter().collect();
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

#[tokio::test]
async fn a_relay_script_flushed_from_redis_is_loaded_again_and_the_relay_goes_on() {
    let redis = Redis::start().await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config("shop", &redis, &app, "")).await;
    publish(&sidecar, "orders", r#"{"n":0}"#, &[]).await;
    deliveries(&app, 1).await;

    // what a restart without persistence or a promoted replica leaves: no scripts
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
    let id = publish(&sidecar, "orders", r#"{"n":1}"#, &[]).await;
    let seen = deliveries(&app, 2).await;
    assert_eq!(header(&seen[1], "outrigger-message-id"), id);
    wait_metric(&sidecar, "outrigger_outbox_pending", 0.0).await;
    assert_eq!(redis.cli(&["XLEN", "outrigger:{orders}"]), "2", "each relayed once");
}
