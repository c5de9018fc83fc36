use std::time::Duration;

use serde_json::value::RawValue;

use super::*;
use crate::messaging::scratch::Scratch;

const HOUR: Duration = Duration::from_secs(3600);
const RETAIN: Retention = Retention { max_messages: 10_000, max_age_ms: 14 * 86_400_000 };

fn open(dir: &Scratch) -> Embedded {
    Embedded::open(&dir.0, HOUR, RETAIN, IntGauge::new("pending", "test").unwrap()).unwrap()
}

fn unordered(max: usize, now: UnixMillis) -> Read {
    Read { max, now, ordered: false, wait: false }
}

fn message(queue: &str, payload: &str, key: Option<&str>) -> Publish {
    Publish {
        queue: queue.into(),
        payload: RawValue::from_string(payload.into()).unwrap(),
        idempotency_key: key.map(Into::into),
        ordering_key: None,
        traceparent: None,
        tracestate: None,
    }
}

async fn publish_one(store: &Embedded, queue: &str, payload: &str) -> MessageId {
    store.publish(vec![message(queue, payload, None)]).await.unwrap()[0].id()
}

fn now() -> UnixMillis {
    unix_millis(SystemTime::now())
}

#[tokio::test]
async fn a_published_message_is_read_in_id_order_with_its_payload_and_metadata() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let mut first = message("orders", r#"{"n": 1}"#, Some("k-1"));
    first.ordering_key = Some("customer-7".into());
    first.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let ids = store.publish(vec![first, message("orders", r#"{"n": 2}"#, None)]).await.unwrap();
    publish_one(&store, "other", "[]").await;

    let read = store.read("orders", "test", unordered(10, now())).await.unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].envelope.id, ids[0].id());
    assert_eq!(read[1].envelope.id, ids[1].id());
    assert!(ids[0].id() < ids[1].id());
    assert_eq!(read[0].envelope.payload.get(), r#"{"n": 1}"#);
    assert_eq!(read[0].envelope.queue, "orders");
    assert_eq!(read[0].envelope.metadata["idempotency_key"], "k-1");
    assert_eq!(read[0].envelope.metadata["ordering_key"], "customer-7");
    assert!(read[0].envelope.metadata["traceparent"].as_str().unwrap().starts_with("00-0af7"));
    assert!(!read[1].envelope.metadata.contains_key("idempotency_key"));
    assert_eq!(read[0].attempts, 0);
    assert_eq!(store.pending(), 3);
}

#[tokio::test]
async fn a_leased_message_is_not_read_again_until_released_and_an_ack_forgets_it() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let id = publish_one(&store, "q", "1").await;
    let second = publish_one(&store, "q", "2").await;

    assert_eq!(store.read("q", "a", unordered(1, now())).await.unwrap()[0].envelope.id, id);
    let next = store.read("q", "b", unordered(10, now())).await.unwrap();
    assert_eq!(next.len(), 1, "the first is leased to a");
    assert_eq!(next[0].envelope.id, second);

    store.ack("q", id).await.unwrap();
    store.ack("q", second).await.unwrap();
    assert!(store.read("q", "a", unordered(10, now())).await.unwrap().is_empty());
    assert_eq!(store.pending(), 0);
}

#[tokio::test]
async fn a_parked_message_keeps_its_error_history_and_waits_until_its_time() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let id = publish_one(&store, "q", "{}").await;
    let mut leased = store.read("q", "c", unordered(1, now())).await.unwrap().remove(0);
    leased.envelope.error.push(crate::messaging::envelope::ErrorRecord {
        status_code: Some(503),
        message: "busy".into(),
        stack_trace: String::new(),
        date: "2026-01-01T00:00:00.000Z".into(),
    });
    let until = now() + 60_000;
    store.park(leased.envelope, 1, until).await.unwrap();

    assert!(
        store.read("q", "c", unordered(10, now())).await.unwrap().is_empty(),
        "parked for a minute"
    );
    assert_eq!(store.next_due("q", now()).await.unwrap(), Some(until));
    assert_eq!(store.next_due("q", until).await.unwrap(), None, "only what falls due later");
    let due = store.read("q", "c", unordered(10, until)).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].envelope.id, id);
    assert_eq!(due[0].attempts, 1);
    assert_eq!(due[0].envelope.error[0].status_code, Some(503));

    store.ack("q", id).await.unwrap();
    assert_eq!(store.next_due("q", 0).await.unwrap(), None, "the ack clears the park index");
}

#[tokio::test]
async fn a_dead_letter_moves_atomically_and_can_be_listed_read_and_deleted() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let first = publish_one(&store, "q", "1").await;
    let second = publish_one(&store, "q", "2").await;
    for leased in store.read("q", "c", unordered(10, now())).await.unwrap() {
        store.dead_letter(leased.envelope, "q_deadletter").await.unwrap();
    }
    assert_eq!(store.pending(), 0);
    assert!(store.read("q", "c", unordered(10, now())).await.unwrap().is_empty());

    let page = store.dead_letters("q_deadletter", None, 1).await.unwrap();
    assert_eq!(page.messages[0].id, second, "newest first");
    assert_eq!(page.next, Some(second));
    let older = store.dead_letters("q_deadletter", page.next, 1).await.unwrap();
    assert_eq!(older.messages[0].id, first);
    assert_eq!(older.next, None);
    assert!(store.dead_letter_get("q_deadletter", first).await.unwrap().is_some());
    assert!(store.dead_letter_delete("q_deadletter", first).await.unwrap());
    assert!(!store.dead_letter_delete("q_deadletter", first).await.unwrap());
    let depths = store.depths(&[]).await.unwrap();
    assert_eq!(depths.len(), 1);
    assert_eq!(
        (depths[0].queue.as_str(), depths[0].messages, depths[0].dead_letters),
        ("q_deadletter", 0, 1)
    );
    assert!(depths[0].oldest_dead_letter_ms.is_some_and(|at| at <= now()));
}

#[tokio::test]
async fn the_same_idempotency_key_within_the_window_returns_the_first_id_and_stores_nothing() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let first = store.publish(vec![message("q", "1", Some("k"))]).await.unwrap()[0];
    // in one batch too: the second sees the first's key inside the same transaction
    let again = store
        .publish(vec![message("q", "2", Some("k")), message("q", "3", Some("k"))])
        .await
        .unwrap();
    assert!(matches!(first, Published::Stored(_)));
    assert_eq!(again, vec![Published::Duplicate(first.id()), Published::Duplicate(first.id())]);
    let other_queue = store.publish(vec![message("r", "1", Some("k"))]).await.unwrap()[0];
    assert!(matches!(other_queue, Published::Stored(_)), "keys are per queue");
    assert_eq!(store.pending(), 2);
}

#[tokio::test]
async fn an_idempotency_key_is_forgotten_after_the_dedup_window() {
    let dir = Scratch::new("store");
    let store =
        Embedded::open(&dir.0, Duration::from_millis(1), RETAIN, IntGauge::new("p", "t").unwrap())
            .unwrap();
    let first = store.publish(vec![message("q", "1", Some("k"))]).await.unwrap()[0];
    // the window is 1 ms of wall clock (stored times must be wall clock): wait it out
    let until = now() + 5;
    while now() <= until {
        tokio::task::yield_now().await;
    }
    let second = store.publish(vec![message("q", "1", Some("k"))]).await.unwrap()[0];
    assert!(matches!(second, Published::Stored(id) if id != first.id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_share_commits() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let before = store.commits();
    let publishers: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { publish_one(&store, "q", &i.to_string()).await })
        })
        .collect();
    let mut ids = Vec::new();
    for publisher in publishers {
        ids.push(publisher.await.unwrap());
    }
    let commits = store.commits() - before;
    assert_eq!(store.pending(), 200);
    assert!(commits < 200, "200 publishes took {commits} commits: no grouping");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200);
}

#[tokio::test]
async fn a_reopened_store_has_everything_committed_and_its_state() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(publish_one(&store, "q", &i.to_string()).await);
    }
    let leased = store.read("q", "c", unordered(1, now())).await.unwrap().remove(0);
    store.park(leased.envelope, 3, now() + 3_600_000).await.unwrap();
    store.ack("q", ids[1]).await.unwrap();
    let dup = store.publish(vec![message("q", r#""x""#, Some("key"))]).await.unwrap()[0];
    store.close().await;

    let gauge = IntGauge::new("pending", "test").unwrap();
    let store = Embedded::open(&dir.0, HOUR, RETAIN, gauge.clone()).unwrap();
    assert_eq!(gauge.get(), 20, "19 of the 20 and the keyed one");
    let due = store.read("q", "c", unordered(100, now())).await.unwrap();
    assert_eq!(due.len(), 19, "18 of the 20 (one acknowledged, one parked) and the keyed one");
    assert_eq!(due[0].envelope.id, ids[2]);
    let later = store.read("q", "c", unordered(100, now() + 3_600_000)).await.unwrap();
    assert_eq!(later[0].envelope.id, ids[0]);
    assert_eq!(later[0].attempts, 3, "the attempt count survives");
    let again = store.publish(vec![message("q", r#""x""#, Some("key"))]).await.unwrap()[0];
    assert_eq!(again, Published::Duplicate(dup.id()), "the dedup index survives");
}

fn keyed(queue: &str, key: Option<&str>) -> Publish {
    Publish { ordering_key: key.map(Into::into), ..message(queue, "{}", None) }
}

#[tokio::test]
async fn an_ordered_read_takes_one_message_per_key_in_publish_order() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let batch = vec![
        keyed("q", Some("a")),
        keyed("q", Some("a")),
        keyed("q", Some("b")),
        keyed("q", None),
        keyed("q", None),
    ];
    let ids: Vec<MessageId> = store.publish(batch).await.unwrap().iter().map(|p| p.id()).collect();
    let ordered = |max| Read { max, now: now(), ordered: true, wait: false };
    let mut first = store.read("q", "c", ordered(10)).await.unwrap();
    let got: Vec<MessageId> = first.iter().map(|l| l.envelope.id).collect();
    assert_eq!(got, [ids[0], ids[2], ids[3], ids[4]], "a's second waits for its first");
    assert!(store.read("q", "c", ordered(10)).await.unwrap().is_empty(), "a is held by its lease");

    // a parked head holds its key too, and still does after a restart forgot every lease
    let head = first.remove(0);
    store.park(head.envelope, 1, now() + 60_000).await.unwrap();
    for leased in first {
        store.ack("q", leased.envelope.id).await.unwrap();
    }
    store.close().await;
    let store = open(&dir);
    assert!(store.read("q", "c", ordered(10)).await.unwrap().is_empty(), "a waits for its head");
    let unordered_read = store.read("q", "c", unordered(10, now())).await.unwrap();
    assert_eq!(unordered_read[0].envelope.id, ids[1], "without ordering it would go now");
}

/// Publishes `n` messages to `q` and dead-letters them all into `q_deadletter`, the way
/// delivery does (with its metadata); their ids, oldest first.
async fn dead_lettered(store: &Embedded, n: usize) -> Vec<MessageId> {
    let batch = (0..n).map(|i| message("q", &i.to_string(), None)).collect();
    let ids: Vec<MessageId> = store.publish(batch).await.unwrap().iter().map(|p| p.id()).collect();
    for mut leased in store.read("q", "c", unordered(n, now())).await.unwrap() {
        let metadata = &mut leased.envelope.metadata;
        metadata.insert("original_queue".into(), "q".into());
        metadata.insert("reason".into(), "max attempts reached (5)".into());
        metadata.insert("attempts".into(), 5.into());
        metadata.insert("dead_lettered_at".into(), "2026-11-25T00:00:00.000Z".into());
        store.dead_letter(leased.envelope, "q_deadletter").await.unwrap();
    }
    ids
}

#[tokio::test]
async fn a_replayed_dead_letter_is_due_again_in_its_queue_with_its_history_and_a_mark() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let ids = dead_lettered(&store, 2).await;
    assert_eq!(store.pending(), 0);

    let replayed = store.dead_letter_replay("q_deadletter", vec![ids[0]]).await.unwrap();
    assert_eq!(replayed, [ids[0]]);
    assert_eq!(store.pending(), 1);
    let again = store.read("q", "c", unordered(10, now())).await.unwrap();
    assert_eq!(again.len(), 1);
    let (envelope, attempts) = (&again[0].envelope, again[0].attempts);
    assert_eq!((envelope.id, envelope.queue.as_str(), attempts), (ids[0], "q", 0));
    let metadata = &envelope.metadata;
    assert_eq!(metadata["replays"], 1);
    assert_eq!(metadata["last_dead_letter_reason"], "max attempts reached (5)");
    assert!(metadata.contains_key("replayed_at"));
    for gone in ["reason", "attempts", "dead_lettered_at", "original_queue"] {
        assert!(!metadata.contains_key(gone), "{gone} removed");
    }
    assert!(store.dead_letter_get("q_deadletter", ids[0]).await.unwrap().is_none());
    assert!(store.dead_letter_replay("q_deadletter", vec![ids[0]]).await.unwrap().is_empty());
    assert_eq!(store.dead_letter_purge("q_deadletter").await.unwrap(), 1);
    assert!(store.dead_letters("q_deadletter", None, 10).await.unwrap().messages.is_empty());
}

#[tokio::test]
async fn dead_letters_past_max_messages_drop_the_oldest() {
    let dir = Scratch::new("store");
    let retain = Retention { max_messages: 3, max_age_ms: RETAIN.max_age_ms };
    let store = Embedded::open(&dir.0, HOUR, retain, IntGauge::new("p", "t").unwrap()).unwrap();
    let ids = dead_lettered(&store, 5).await;
    let kept: Vec<MessageId> = store
        .dead_letters("q_deadletter", None, 10)
        .await
        .unwrap()
        .messages
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(kept, [ids[4], ids[3], ids[2]], "the newest three, newest first");
}

#[tokio::test]
async fn dead_letters_older_than_max_age_are_swept() {
    let dir = Scratch::new("store");
    let retain = Retention { max_messages: 100, max_age_ms: 50 };
    let store = Embedded::open(&dir.0, HOUR, retain, IntGauge::new("p", "t").unwrap()).unwrap();
    dead_lettered(&store, 2).await;
    let swept = outrigger_wait(|| async {
        // every commit sweeps; a publish makes one
        publish_one(&store, "other", "{}").await;
        store.dead_letters("q_deadletter", None, 10).await.unwrap().messages.is_empty()
    })
    .await;
    assert!(swept, "dead letters older than 50 ms are gone");
}

/// Polls `check` for up to 5 s (real time: the store's clock is the wall clock).
async fn outrigger_wait<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..250 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Waits (yielding, on the wall clock the store uses) until the clock has passed `at`.
async fn wall_clock_past(at: UnixMillis) {
    while now() <= at {
        tokio::task::yield_now().await;
    }
}

/// Publishes one message to `q` and dead-letters it into `q_deadletter`; its id.
async fn dead_letter_one(store: &Embedded, payload: &str) -> MessageId {
    let id = publish_one(store, "q", payload).await;
    let leased = store.read("q", "c", unordered(100, now())).await.unwrap();
    let leased = leased.into_iter().find(|l| l.envelope.id == id).unwrap();
    store.dead_letter(leased.envelope, "q_deadletter").await.unwrap();
    id
}

async fn kept(store: &Embedded) -> Vec<MessageId> {
    let page = store.dead_letters("q_deadletter", None, 100).await.unwrap();
    page.messages.iter().map(|e| e.id).collect()
}

#[tokio::test]
async fn the_count_cap_drops_the_longest_dead_lettered_not_the_oldest_published() {
    let dir = Scratch::new("store");
    let retain = Retention { max_messages: 3, max_age_ms: RETAIN.max_age_ms };
    let store = Embedded::open(&dir.0, HOUR, retain, IntGauge::new("p", "t").unwrap()).unwrap();
    let ids = dead_lettered(&store, 3).await;
    wall_clock_past(now()).await;
    // the oldest published is replayed and fails again: dead-lettered last of all
    store.dead_letter_replay("q_deadletter", vec![ids[0]]).await.unwrap();
    let again = store.read("q", "c", unordered(10, now())).await.unwrap().remove(0);
    assert_eq!(again.envelope.id, ids[0]);
    store.dead_letter(again.envelope, "q_deadletter").await.unwrap();
    wall_clock_past(now()).await;

    let newest = dead_letter_one(&store, "4").await;

    assert_eq!(
        kept(&store).await,
        [newest, ids[2], ids[0]],
        "ids[1] had been dead letter longest; ids[0], published first, was dead-lettered again"
    );
    let depths = store.depths(&[]).await.unwrap();
    assert_eq!(depths.iter().find(|d| d.queue == "q_deadletter").unwrap().dead_letters, 3);
}

#[tokio::test]
async fn replaying_an_id_still_in_its_queue_replaces_it_without_counting_it_twice() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let id = publish_one(&store, "q", "{}").await;
    let mut leased = store.read("q", "c", unordered(1, now())).await.unwrap().remove(0);
    store.park(leased.envelope.clone(), 2, now() + 3_600_000).await.unwrap();
    // a copy dead-lettered from another queue name, naming q as its origin
    leased.envelope.queue = "elsewhere".into();
    leased.envelope.metadata.insert("original_queue".into(), "q".into());
    store.dead_letter(leased.envelope, "q_deadletter").await.unwrap();
    assert_eq!(store.pending(), 1);

    assert_eq!(store.dead_letter_replay("q_deadletter", vec![id]).await.unwrap(), [id]);

    assert_eq!(store.pending(), 1, "one message, counted once");
    let due = store.read("q", "c", unordered(10, now())).await.unwrap();
    assert_eq!(due.len(), 1, "due now: the parked copy's due row is gone with it");
    assert_eq!((due[0].envelope.id, due[0].attempts), (id, 0));
    store.ack("q", id).await.unwrap();
    assert_eq!(store.pending(), 0);
    assert!(store.read("q", "c", unordered(10, u64::MAX)).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_idle_store_drops_dead_letters_past_max_age_when_swept() {
    let dir = Scratch::new("store");
    let retain = Retention { max_messages: 100, max_age_ms: 200 };
    let store = Embedded::open(&dir.0, HOUR, retain, IntGauge::new("p", "t").unwrap()).unwrap();
    let first = dead_letter_one(&store, "1").await;
    let commits = store.commits();
    assert!(!store.sweep_dead_letters().await.unwrap(), "nothing expired yet");
    assert_eq!(store.commits(), commits, "no commit when there is nothing to drop");

    let dead_lettered_at = store.depths(&[]).await.unwrap()[0].oldest_dead_letter_ms.unwrap();
    wall_clock_past(dead_lettered_at + 200).await;
    assert!(store.sweep_dead_letters().await.unwrap());

    assert!(store.dead_letter_get("q_deadletter", first).await.unwrap().is_none());
    assert!(kept(&store).await.is_empty());
    assert!(store.depths(&[]).await.unwrap().is_empty(), "no queue, no dead-letter depth");
    assert!(!store.sweep_dead_letters().await.unwrap());
}

#[tokio::test]
async fn depths_give_each_dead_letter_queue_its_count_and_oldest_dead_letter_time() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let before = now();
    dead_lettered(&store, 2).await;
    let after = now();
    publish_one(&store, "p", "{}").await;
    let leased = store.read("p", "c", unordered(1, now())).await.unwrap().remove(0);
    store.dead_letter(leased.envelope, "p_deadletter").await.unwrap();
    store.dead_letter_purge("p_deadletter").await.unwrap();

    let depths = store.depths(&[]).await.unwrap();

    assert_eq!(depths.len(), 1, "a purged dead-letter queue is not listed: {depths:?}");
    let d = &depths[0];
    assert_eq!((d.queue.as_str(), d.messages, d.dead_letters), ("q_deadletter", 0, 2));
    assert!((before..=after).contains(&d.oldest_dead_letter_ms.unwrap()));
}

#[tokio::test]
async fn a_store_without_the_per_queue_dead_letter_index_rebuilds_it_at_open() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let ids = dead_lettered(&store, 3).await;
    store.close().await;
    {
        // as a file written before the index existed
        let db = Database::create(dir.0.join(FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        txn.delete_table(dead::DEAD_BY_QUEUE).unwrap();
        txn.commit().unwrap();
    }

    let retain = Retention { max_messages: 3, max_age_ms: RETAIN.max_age_ms };
    let store = Embedded::open(&dir.0, HOUR, retain, IntGauge::new("p", "t").unwrap()).unwrap();
    assert!(store.depths(&[]).await.unwrap()[0].oldest_dead_letter_ms.is_some());
    let newest = dead_letter_one(&store, "4").await;
    assert_eq!(kept(&store).await, [newest, ids[2], ids[1]], "the cap works on the rebuilt index");
}

#[tokio::test]
async fn acknowledged_ids_are_remembered_until_they_expire_and_survive_a_reopen() {
    let dir = Scratch::new("store");
    let now = unix_millis(SystemTime::now());
    let (a, b) = (MessageId::generate(SystemTime::now()), MessageId::generate(SystemTime::now()));
    {
        let store = open(&dir);
        store.remember_acknowledged("q", a, now + 120_000).await.unwrap();
        store.remember_acknowledged("q", b, now + 60_000).await.unwrap();
        store.remember_acknowledged("other", b, now + 120_000).await.unwrap();
        store.close().await;
    }
    let store = open(&dir);
    let soonest_first = [(b, now + 60_000), (a, now + 120_000)];
    assert_eq!(store.acknowledged("q", now).await.unwrap(), soonest_first);
    assert_eq!(store.acknowledged("q", now + 60_000).await.unwrap(), [(a, now + 120_000)]);

    // remembered again: one entry, the later expiry
    store.remember_acknowledged("q", b, now + 180_000).await.unwrap();
    assert_eq!(
        store.acknowledged("q", now).await.unwrap(),
        [(a, now + 120_000), (b, now + 180_000)]
    );
    // an entry already expired at its commit is swept by that commit: gone even for a reader
    // that asks for everything
    let c = MessageId::generate(SystemTime::now());
    store.remember_acknowledged("q", c, now.saturating_sub(1)).await.unwrap();
    assert!(store.acknowledged("q", 0).await.unwrap().iter().all(|&(id, _)| id != c));
}

/// Appends `records` to the store's log as a crashed sidecar would have left them: on disk,
/// never applied to redb.
fn crash_after_logging(dir: &Scratch, records: &[Vec<u8>]) -> Vec<u64> {
    let mut log = Log::open(&dir.0.join(LOG_DIR)).unwrap();
    records.iter().map(|record| log.append(record).unwrap()).collect()
}

fn new_message(queue: &str, payload: &str) -> New {
    let at = SystemTime::now();
    let id = MessageId::generate(at);
    let entry = Entry::of(&message(queue, payload, None).into_envelope(id, at));
    New { entry, at: unix_millis(at), idempotency_key: None }
}

#[tokio::test]
async fn writes_logged_but_never_applied_are_applied_at_open() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let first = publish_one(&store, "q", "1").await;
    store.close().await;

    let second = new_message("q", "2");
    let second_id = second.entry.id;
    let forget_first = writer::Forget(vec![("q".into(), first)]);
    crash_after_logging(
        &dir,
        &[
            writer::record_of(now(), writer::Store(vec![second])),
            writer::record_of(now(), forget_first),
        ],
    );

    let gauge = IntGauge::new("pending", "test").unwrap();
    let store = Embedded::open(&dir.0, HOUR, RETAIN, gauge.clone()).unwrap();
    let due = store.read("q", "c", unordered(10, now())).await.unwrap();
    let ids: Vec<MessageId> = due.iter().map(|l| l.envelope.id).collect();
    assert_eq!(ids, vec![second_id], "the logged publish is there, the logged ack took the first");
    assert_eq!(gauge.get(), 1);
    // and the next write continues the log after them
    publish_one(&store, "q", "3").await;
    store.close().await;
    let store = open(&dir);
    assert_eq!(store.pending(), 2);
}

#[tokio::test]
async fn a_record_torn_by_a_crash_is_dropped_and_what_came_before_kept() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    publish_one(&store, "q", r#""kept""#).await;
    store.close().await;
    let [lsn] = crash_after_logging(
        &dir,
        &[writer::record_of(now(), writer::Store(vec![new_message("q", r#""torn""#)]))],
    )[..] else {
        unreachable!("one record")
    };
    // the crash cut the record's last bytes
    let segment = std::fs::read_dir(dir.0.join(LOG_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".wal"))
        .unwrap();
    let bytes = std::fs::read(&segment).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).unwrap();
    std::fs::write(&segment, &bytes[..end - 3]).unwrap();

    let store = open(&dir);
    assert_eq!(store.pending(), 1, "record {lsn} was torn: only what came before it is there");
    let due = store.read("q", "c", unordered(10, now())).await.unwrap();
    assert_eq!(due[0].envelope.payload.get(), r#""kept""#);
}

#[tokio::test]
async fn a_record_of_an_unknown_layout_refuses_the_open_with_its_number() {
    let dir = Scratch::new("store");
    open(&dir).close().await;
    let mut record = writer::record_of(now(), writer::Sweep);
    record[0] = 99; // a FORMAT this build does not know
    let [lsn] = crash_after_logging(&dir, &[record])[..] else { unreachable!("one record") };
    let err = Embedded::open(&dir.0, HOUR, RETAIN, IntGauge::new("p", "t").unwrap()).unwrap_err();
    let chain = crate::error::chain(&err);
    assert!(chain.contains(&format!("record {lsn} of the log cannot be applied")), "{chain}");
    assert!(chain.contains("another layout"), "{chain}");
}

#[tokio::test]
async fn a_large_store_emptied_gives_its_disk_back_and_keeps_what_is_left() {
    let dir = Scratch::new("store");
    let store = open(&dir);
    let file = dir.0.join(FILE_NAME);
    let payload = format!("\"{}\"", "x".repeat(1000));
    let mut ids = Vec::new();
    for _ in 0..40 {
        let batch = (0..100).map(|_| message("q", &payload, None)).collect();
        ids.extend(store.publish(batch).await.unwrap().into_iter().map(|p| p.id()));
    }
    let kept = publish_one(&store, "kept", r#""still here""#).await;
    let peak = std::fs::metadata(&file).unwrap().len();
    assert!(peak > 4 << 20, "4000 messages of 1 KB take {peak} bytes");
    for id in ids {
        store.ack("q", id).await.unwrap();
    }
    // the writer, idle, finds the file mostly free and compacts it; reads are refused while
    // it does, and find what is left once it is done
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let left = loop {
        let size = std::fs::metadata(&file).unwrap().len();
        assert!(tokio::time::Instant::now() < deadline, "still {size} of {peak} bytes");
        if size * 4 <= peak
            && let Ok(left) = store.read("kept", "c", unordered(10, now())).await
        {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(left[0].envelope.id, kept);
    store.close().await;
    assert_eq!(open(&dir).pending(), 1);
}
