//! `messaging.app_outbox` against a real PostgreSQL: rows the app commits in its own
//! transactions are delivered, each once; rolled-back rows never; two replicas share the table;
//! a row relayed again after a lost delete is stored once; a `kill -9` mid-relay loses and
//! doubles nothing; a database outage degrades readiness and is recovered from; a row that
//! cannot be published stays in the table, named in `/readyz`.

use std::collections::{HashMap, HashSet};

use outrigger_tests::{DEADLINE, Dice, Postgres, Sidecar, Upstream, wait_until};
use serde_json::Value;

use crate::delivery::{ACKED, deliveries, envelope, header, wait_metric};
use crate::messaging::{metric, queues};

/// Messages stored in queue `orders` by this run of the sidecar.
const PUBLISHED: &str = r#"outrigger_messages_published_total{queue="orders"}"#;

/// The table's DDL, as docs/messaging.md gives it to users (so the docs are what is tested).
fn ddl() -> String {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/messaging.md"))
            .expect("docs/messaging.md");
    let start = docs.find("```sql\nCREATE TABLE").expect("the DDL block in docs/messaging.md") + 7;
    let end = start + docs[start..].find("```").expect("the DDL block's end");
    docs[start..end].to_owned()
}

async fn database() -> Postgres {
    let pg = Postgres::start().await;
    pg.psql(&ddl());
    pg
}

/// A sidecar of `service` relaying `pg`'s table, delivering queue `orders` to `app` if given.
fn config(pg: &Postgres, app: Option<&Upstream>, poll: &str) -> String {
    let outbox = format!(
        "messaging:\n  data_dir: \"$SCRATCH/data\"\n  \
         app_outbox: {{ postgres: \"{}\", poll: {poll} }}\n",
        pg.url()
    );
    match app {
        None => format!("service: {{ name: shop }}\n{outbox}"),
        Some(app) => format!(
            "service: {{ name: shop, app: {{ url: \"http://{}\" }} }}\n{outbox}  \
             subscriptions:\n    - {{ queue: orders, path: /events/orders, ordered: true }}\n",
            app.addr()
        ),
    }
}

/// Inserts rows `ids` of queue `orders` in one committed transaction, payload `{"row": ID}`,
/// each with ordering key `key` if given.
fn insert(pg: &Postgres, ids: &[String], key: Option<&str>) {
    let headers =
        key.map_or("NULL".to_owned(), |k| format!("'{{\"outrigger-ordering-key\": \"{k}\"}}'"));
    let values: Vec<String> = ids
        .iter()
        .map(|id| {
            format!("('{id}', 'orders', '{{\"row\": \"{id}\"}}', {headers}, clock_timestamp())")
        })
        .collect();
    pg.psql(&format!(
        "INSERT INTO outrigger_outbox (id, queue, payload, headers, created_at) VALUES {}",
        values.join(", ")
    ));
}

fn rows_left(pg: &Postgres) -> usize {
    pg.psql("SELECT count(*) FROM outrigger_outbox").parse().expect("a count")
}

/// `/readyz`'s status and its `app_outbox` check's status and detail.
async fn outbox_check(sidecar: &Sidecar) -> (u16, String, String) {
    let (status, body) = sidecar.admin("/readyz").await;
    let ready: Value = serde_json::from_str(&body).expect("/readyz answers JSON");
    let text = |f: &str| ready["checks"]["app_outbox"][f].as_str().unwrap_or("absent").to_owned();
    (status, text("status"), text("detail"))
}

fn row_of(seen: &outrigger_tests::Seen) -> String {
    envelope(seen)["payload"]["row"].as_str().expect("the row's id in the payload").to_owned()
}

#[tokio::test]
async fn a_committed_row_is_delivered_once_woken_by_notify_and_a_rolled_back_one_never() {
    let pg = database().await;
    // the grants docs/operations.md names, and no more
    pg.psql("CREATE ROLE relay LOGIN; GRANT SELECT, UPDATE, DELETE ON outrigger_outbox TO relay");
    let app = Upstream::status(200).await;
    // polled once an hour: only the trigger's NOTIFY can wake the relay in time
    let yaml = config(&pg, Some(&app), "1h").replace("//outrigger@", "//relay@");
    let sidecar = Sidecar::start(&yaml).await;
    wait_until(DEADLINE, "the relay to connect", || async {
        (outbox_check(&sidecar).await.1 == "ok").then_some(())
    })
    .await;

    pg.psql(
        "BEGIN; INSERT INTO outrigger_outbox (id, queue, payload) VALUES ('gone', 'orders', '{\"row\": \"gone\"}'); ROLLBACK;",
    );
    pg.psql(
        "BEGIN; INSERT INTO outrigger_outbox (id, queue, payload, headers) VALUES \
         ('r-1', 'orders', '{\"row\": \"r-1\"}', '{\"idempotency-key\": \"order-1\", \"traceparent\": \"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\"}'); COMMIT;",
    );
    insert(&pg, &["r-2".to_owned()], None);

    let seen = deliveries(&app, 2).await;
    let rows: Vec<String> = seen.iter().map(row_of).collect();
    assert_eq!(
        rows,
        ["r-1", "r-2"],
        "committed rows, in created_at order; never the rolled-back one"
    );
    assert_eq!(header(&seen[0], "idempotency-key"), "order-1", "the row's own key");
    assert_eq!(header(&seen[1], "idempotency-key"), "r-2", "else its id");
    let traceparent = header(&seen[0], "traceparent");
    assert!(
        traceparent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "the app's trace goes on: {traceparent}"
    );
    wait_until(DEADLINE, "the relayed rows to be deleted", || async {
        (rows_left(&pg) == 0).then_some(())
    })
    .await;
    wait_metric(&sidecar, "outrigger_app_outbox_relayed_total", 2.0).await;
    wait_metric(&sidecar, ACKED, 2.0).await;
    assert_eq!(metric(&sidecar, PUBLISHED).await, Some(2.0), "each stored once");
    assert_eq!(app.seen().len(), 2, "each delivered once");
}

#[tokio::test]
async fn a_row_relayed_again_after_its_delete_was_lost_is_stored_once() {
    let pg = database().await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config(&pg, Some(&app), "100ms")).await;
    insert(&pg, &["once".to_owned()], None);
    deliveries(&app, 1).await;
    wait_until(DEADLINE, "the row to be deleted", || async { (rows_left(&pg) == 0).then_some(()) })
        .await;

    // what a crash between the outbox's commit and the delete leaves: the same row again
    insert(&pg, &["once".to_owned(), "next".to_owned()], None);
    let seen = deliveries(&app, 2).await;
    wait_until(DEADLINE, "both rows to be deleted", || async {
        (rows_left(&pg) == 0).then_some(())
    })
    .await;
    wait_metric(&sidecar, "outrigger_app_outbox_relayed_total", 3.0).await;
    let rows: Vec<String> = seen.iter().map(row_of).collect();
    assert_eq!(rows, ["once", "next"]);
    assert_eq!(
        metric(&sidecar, PUBLISHED).await,
        Some(2.0),
        "the repeated row found its key and stored nothing"
    );
    wait_metric(&sidecar, ACKED, 2.0).await;
    assert_eq!(app.seen().len(), 2);
}

#[tokio::test]
async fn two_replicas_relay_each_row_once_and_each_key_in_order() {
    let pg = database().await;
    let (app_a, app_b) = (Upstream::status(200).await, Upstream::status(200).await);
    let _a = Sidecar::start(&config(&pg, Some(&app_a), "50ms")).await;
    let _b = Sidecar::start(&config(&pg, Some(&app_b), "50ms")).await;
    let mut all = Vec::new();
    for batch in 0..30 {
        for key in 0..3 {
            let ids: Vec<String> = (0..3).map(|n| format!("k{key}-{:03}", batch * 3 + n)).collect();
            insert(&pg, &ids, Some(&format!("k{key}")));
            all.extend(ids);
        }
    }

    let seen = wait_until(DEADLINE, "every row delivered by one of the replicas", || async {
        let (a, b) = (app_a.seen(), app_b.seen());
        (a.len() + b.len() >= all.len()).then_some((a, b))
    })
    .await;
    let (a, b): (Vec<String>, Vec<String>) =
        (seen.0.iter().map(row_of).collect(), seen.1.iter().map(row_of).collect());
    let delivered: HashSet<&String> = a.iter().chain(&b).collect();
    assert_eq!(a.len() + b.len(), all.len(), "no row twice: {a:?} {b:?}");
    assert_eq!(delivered, all.iter().collect(), "every row");
    for replica in [&a, &b] {
        let mut last: HashMap<&str, &str> = HashMap::new();
        for row in replica.iter() {
            let key = &row[..2];
            if let Some(before) = last.insert(key, row) {
                assert!(before < row.as_str(), "key {key}: {before} before {row} in {replica:?}");
            }
        }
    }
    assert_eq!(rows_left(&pg), 0);
}

#[tokio::test]
async fn a_row_waits_while_an_older_row_of_its_key_is_held_by_another_replica() {
    let pg = database().await;
    insert(&pg, &["k-1".to_owned(), "k-2".to_owned()], Some("k"));
    insert(&pg, &["x-1".to_owned()], Some("x"));
    // another replica's round, holding the head of key k
    let mut other = pg.session();
    other.send("BEGIN; SELECT id FROM outrigger_outbox WHERE id = 'k-1' FOR UPDATE;");
    wait_until(DEADLINE, "the other replica to hold k-1", || async {
        let free =
            pg.psql("SELECT id FROM outrigger_outbox WHERE id = 'k-1' FOR UPDATE SKIP LOCKED");
        free.is_empty().then_some(())
    })
    .await;
    let app = Upstream::status(200).await;
    let _sidecar = Sidecar::start(&config(&pg, Some(&app), "1h")).await;

    let first = deliveries(&app, 1).await;
    assert_eq!(row_of(&first[0]), "x-1", "another key goes on");
    wait_until(DEADLINE, "x-1's round to commit", || async { (rows_left(&pg) == 2).then_some(()) })
        .await;
    assert_eq!(app.seen().len(), 1, "k-2 waits for k-1, which waits for the other replica");
    other.send("ROLLBACK;");
    let seen = deliveries(&app, 3).await;
    let rows: Vec<String> = seen.iter().map(row_of).collect();
    assert_eq!(rows, ["x-1", "k-1", "k-2"]);
}

#[tokio::test]
async fn a_kill_9_of_the_sidecar_mid_relay_stores_every_row_once() {
    let pg = database().await;
    let mut sidecar = Sidecar::start(&config(&pg, None, "50ms")).await;
    let mut dice = Dice(0x5eed_0a7b);
    let mut inserted = 0;
    for _ in 0..3 {
        // rows pile up while the sidecar is down, then it drains them in rounds of 500
        sidecar.kill9();
        for _ in 0..4 {
            let ids: Vec<String> = (0..500).map(|n| format!("r-{:05}", inserted + n)).collect();
            insert(&pg, &ids, None);
            inserted += ids.len();
        }
        sidecar.restart().await;
        // killed somewhere in the drain: often between a round's store and its delete
        let left = dice.roll(2000) as usize;
        wait_until(DEADLINE, "the drain to pass the kill point", || async {
            (rows_left(&pg) <= left).then_some(())
        })
        .await;
        sidecar.kill9();
    }
    sidecar.restart().await;
    wait_until(DEADLINE, "the table to empty", || async { (rows_left(&pg) == 0).then_some(()) })
        .await;
    assert_eq!(queues(&sidecar).await["queues"][0]["messages"], inserted, "each row stored once");
}

#[tokio::test]
async fn a_database_outage_degrades_readiness_and_the_relay_resumes_after_it() {
    let mut pg = database().await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config(&pg, Some(&app), "100ms")).await;
    insert(&pg, &["before".to_owned()], None);
    deliveries(&app, 1).await;

    pg.stop();
    let (status, detail) = wait_until(DEADLINE, "the app_outbox check to degrade", || async {
        let (status, check, detail) = outbox_check(&sidecar).await;
        (check == "degraded").then_some((status, detail))
    })
    .await;
    assert_eq!(status, 200, "a database outage does not fail readiness");
    assert!(detail.contains("postgres"), "{detail}");
    assert!(detail.ends_with("the app's rows wait in table outrigger_outbox"), "{detail}");

    pg.restart().await;
    insert(&pg, &["after".to_owned()], None);
    let seen = deliveries(&app, 2).await;
    assert_eq!(row_of(&seen[1]), "after");
    wait_until(DEADLINE, "the app_outbox check to be ok again", || async {
        (outbox_check(&sidecar).await.1 == "ok").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_row_that_cannot_be_published_stays_holds_its_key_and_is_named_in_readyz() {
    let pg = database().await;
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config(&pg, Some(&app), "100ms")).await;
    pg.psql(
        "INSERT INTO outrigger_outbox (id, queue, payload, headers, created_at) VALUES \
         ('bad', 'no spaces allowed', '{}', '{\"outrigger-ordering-key\": \"k\"}', clock_timestamp())",
    );
    insert(&pg, &["k-after".to_owned()], Some("k"));
    insert(&pg, &["good".to_owned()], None);

    let seen = deliveries(&app, 1).await;
    assert_eq!(row_of(&seen[0]), "good", "the bad row holds up no other key");
    let detail = wait_until(DEADLINE, "the bad row to be named", || async {
        let (_, check, detail) = outbox_check(&sidecar).await;
        (check == "degraded").then_some(detail)
    })
    .await;
    assert!(
        detail.starts_with(r#"1 row(s) of table outrigger_outbox cannot be published"#),
        "{detail}"
    );
    assert!(detail.contains(r#"row "bad": queue"#), "{detail}");
    wait_until(DEADLINE, "the good row's round to commit", || async {
        (rows_left(&pg) == 2).then_some(())
    })
    .await;
    assert_eq!(app.seen().len(), 1, "k-after waits behind the bad row of its key");

    // more rows of its key than a round takes do not starve the rows behind them
    let held: Vec<String> = (0..600).map(|n| format!("k-more-{n:03}")).collect();
    insert(&pg, &held, Some("k"));
    insert(&pg, &["behind".to_owned()], None);
    let seen = deliveries(&app, 2).await;
    assert_eq!(row_of(&seen[1]), "behind");
    assert_eq!(rows_left(&pg), 602, "the bad row and its key's rows wait");

    pg.psql("DELETE FROM outrigger_outbox WHERE id = 'bad'");
    let seen = deliveries(&app, 3).await;
    assert_eq!(row_of(&seen[2]), "k-after", "the key goes on once the bad row is gone");
    wait_until(DEADLINE, "the app_outbox check to be ok again", || async {
        (outbox_check(&sidecar).await.1 == "ok").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_missing_table_is_named_with_where_its_ddl_is() {
    let pg = Postgres::start().await;
    let sidecar = Sidecar::start(&config(&pg, None, "100ms")).await;
    // "connecting" first, then what the relay found
    let detail = wait_until(DEADLINE, "the app_outbox check to name the table", || async {
        let (_, check, detail) = outbox_check(&sidecar).await;
        (check == "degraded" && !detail.contains("connecting")).then_some(detail)
    })
    .await;
    assert!(detail.contains("table outrigger_outbox does not exist"), "{detail}");
    assert!(detail.contains("docs/messaging.md"), "{detail}");

    pg.psql(&ddl());
    wait_until(DEADLINE, "the relay to find the table", || async {
        (outbox_check(&sidecar).await.1 == "ok").then_some(())
    })
    .await;
}
