//! Dead letters, visible and actionable: `outrigger dlq list|show|replay|delete|purge` against
//! a running sidecar's admin port, and the `/v1/dlq` API under it.

use std::process::Command;

use outrigger_tests::{Reply, Sidecar, Upstream};
use serde_json::Value;

use crate::delivery::{ACKED, DEAD, deliveries, envelope, header, publish, wait_metric};
use crate::messaging::metric;

fn config(app: &Upstream) -> String {
    format!(
        "service:\n  name: shop\n  app: {{ url: \"http://{}\" }}\n\
         messaging:\n  data_dir: \"$SCRATCH/data\"\n  subscriptions:\n    - {{ queue: orders, \
         path: /events/orders, concurrency: 1 }}\n",
        app.addr()
    )
}

/// Runs `outrigger dlq ARGS --admin …`; exit code, stdout, stderr.
fn dlq(sidecar: &Sidecar, args: &[&str]) -> (i32, String, String) {
    let admin = format!("http://{}", sidecar.admin);
    let out = Command::new(outrigger_tests::binary())
        .arg("dlq")
        .args(args)
        .args(["--admin", &admin])
        .output()
        .expect("run outrigger dlq");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn listed(sidecar: &Sidecar) -> Vec<String> {
    let (code, stdout, stderr) = dlq(sidecar, &["list", "orders_deadletter", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let page: Value = serde_json::from_str(&stdout).expect("--json prints JSON");
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn dead_letters_are_listed_shown_replayed_deleted_and_purged_through_the_cli() {
    // five permanent failures, each a different status, then a healthy handler
    let script =
        [400, 404, 422, 410, 410].map(Reply::Status).into_iter().chain([Reply::Status(200)]);
    let app = Upstream::scripted(script).await;
    let sidecar = Sidecar::start(&config(&app)).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    wait_metric(&sidecar, DEAD, 5.0).await;
    let depth = r#"outrigger_deadletter_depth{queue="orders_deadletter"}"#;
    assert_eq!(metric(&sidecar, depth).await, Some(5.0), "dead-letter depth, to alert on");
    let age = r#"outrigger_deadletter_oldest_age_seconds{queue="orders_deadletter"}"#;
    assert!(metric(&sidecar, age).await.is_some_and(|s| (0.0..60.0).contains(&s)));

    let (code, table, _) = dlq(&sidecar, &["list", "orders_deadletter"]);
    assert_eq!(code, 0);
    assert!(table.starts_with("ID "), "{table}");
    for id in &ids {
        assert!(table.contains(id.as_str()), "{id} listed:\n{table}");
    }
    assert!(table.contains("permanent failure: the app answered 400"), "{table}");
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(listed(&sidecar), newest_first);

    let (code, shown, _) = dlq(&sidecar, &["show", "orders_deadletter", &ids[0]]);
    assert_eq!(code, 0);
    assert!(shown.contains("original queue  orders"), "{shown}");
    assert!(shown.contains("subscriber      shop/events/orders"), "{shown}");
    assert!(shown.contains(r#"payload         {"n":0}"#), "{shown}");
    assert!(shown.contains("errors (1):") && shown.contains("400 400 from upstream"), "{shown}");

    // replay one by id: delivered again (the handler is healthy by then), history kept
    let (code, out, _) = dlq(&sidecar, &["replay", "orders_deadletter", "--id", &ids[0]]);
    assert_eq!(
        (code, out.trim()),
        (0, "replayed 1 dead letter(s) from orders_deadletter to their queue")
    );
    let replayed = deliveries(&app, 6).await.remove(5);
    assert_eq!(header(&replayed, "outrigger-message-id"), ids[0]);
    assert_eq!(header(&replayed, "outrigger-attempt"), "1", "a replay starts a fresh count");
    let envelope = envelope(&replayed);
    assert_eq!(envelope["error"].as_array().unwrap().len(), 1, "the history stays");
    assert_eq!(envelope["metadata"]["replays"], 1);
    assert_eq!(
        envelope["metadata"]["last_dead_letter_reason"],
        "permanent failure: the app answered 400"
    );
    wait_metric(&sidecar, ACKED, 1.0).await;

    let (code, _, _) = dlq(&sidecar, &["delete", "orders_deadletter", &ids[1]]);
    assert_eq!(code, 0);
    let (code, _, err) = dlq(&sidecar, &["delete", "orders_deadletter", &ids[1]]);
    assert_eq!(code, 1);
    assert!(err.contains("404: no dead letter"), "{err}");

    // by the last error's status: only the 422
    let (code, out, _) = dlq(&sidecar, &["replay", "orders_deadletter", "--status", "422"]);
    assert_eq!(
        (code, out.trim()),
        (0, "replayed 1 dead letter(s) from orders_deadletter to their queue")
    );
    wait_metric(&sidecar, ACKED, 2.0).await;
    assert_eq!(listed(&sidecar), [ids[4].clone(), ids[3].clone()]);

    let (code, _, err) = dlq(&sidecar, &["purge", "orders_deadletter"]);
    assert_eq!(code, 1, "purge asks which: ids or --all");
    assert!(err.contains("--all"), "{err}");
    let (code, out, _) = dlq(&sidecar, &["purge", "orders_deadletter", "--yes"]);
    assert_eq!((code, out.trim()), (0, "purged 2 dead letter(s) from orders_deadletter"));
    let (_, empty, _) = dlq(&sidecar, &["list", "orders_deadletter"]);
    assert_eq!(empty.trim(), "orders_deadletter: no dead letters");
    assert_eq!(metric(&sidecar, depth).await, None, "an empty dead-letter queue has no series");
    assert_eq!(app.requests(), 7, "five failures and two replays, nothing else");
}

/// Dead letters `n` messages on `orders` (each refused 400 by `app`); their ids, as published.
async fn dead_letters(sidecar: &Sidecar, n: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..n {
        ids.push(publish(sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
    }
    wait_metric(sidecar, DEAD, f64::from(n)).await;
    ids
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test]
async fn replay_takes_the_ids_after_the_queue_or_all_as_the_contract_writes_them() {
    // three permanent failures, then a healthy handler
    let app = Upstream::scripted([400, 400, 400, 200].map(Reply::Status)).await;
    let sidecar = Sidecar::start(&config(&app)).await;
    let ids = dead_letters(&sidecar, 3).await;

    let (code, out, err) = dlq(&sidecar, &["replay", "orders_deadletter", &ids[0], &ids[2]]);
    assert_eq!(
        (code, out.trim(), err.as_str()),
        (0, "replayed 2 dead letter(s) from orders_deadletter to their queue", "")
    );
    wait_metric(&sidecar, ACKED, 2.0).await;
    assert_eq!(listed(&sidecar), [ids[1].clone()], "just the two named");
    let delivered: Vec<String> = deliveries(&app, 5).await[3..]
        .iter()
        .map(|d| header(d, "outrigger-message-id").to_owned())
        .collect();
    assert_eq!(sorted(delivered), sorted(vec![ids[0].clone(), ids[2].clone()]));

    let (code, out, _) = dlq(&sidecar, &["replay", "orders_deadletter", "--all"]);
    assert_eq!(
        (code, out.trim()),
        (0, "replayed 1 dead letter(s) from orders_deadletter to their queue")
    );
    wait_metric(&sidecar, ACKED, 3.0).await;
    assert_eq!(listed(&sidecar), Vec::<String>::new());
    assert_eq!(app.requests(), 6, "three failures and three replays, nothing else");
}

#[tokio::test]
async fn purge_with_ids_removes_just_those_and_with_all_every_one() {
    let app = Upstream::status(400).await;
    let sidecar = Sidecar::start(&config(&app)).await;
    let ids = dead_letters(&sidecar, 4).await;
    let absent = "01M88XE1Y7PY2QESVD2M843AEH";

    let (code, out, err) = dlq(&sidecar, &["purge", "orders_deadletter", &ids[0], &ids[2], absent]);
    assert_eq!(
        (code, out.trim(), err.as_str()),
        (
            0,
            "purged 2 dead letter(s) from orders_deadletter\n\
             not in orders_deadletter (deleted, expired or replayed): 01M88XE1Y7PY2QESVD2M843AEH",
            ""
        )
    );
    assert_eq!(sorted(listed(&sidecar)), sorted(vec![ids[1].clone(), ids[3].clone()]));

    // refusals remove nothing: ids with --all, a malformed id among good ones, no selection
    let (code, _, err) = dlq(&sidecar, &["purge", "orders_deadletter", &ids[1], "--all"]);
    assert_eq!(code, 1, "ids with --all are refused, not taken as --all");
    assert!(err.contains("ids do not mix with --all"), "{err}");
    let (code, _, err) = dlq(&sidecar, &["purge", "orders_deadletter", &ids[1], "not-an-id"]);
    assert_eq!(code, 1);
    assert!(err.contains(r#""not-an-id": not a message id"#), "{err}");
    let (code, _, err) = dlq(&sidecar, &["purge", "orders_deadletter"]);
    assert_eq!(code, 1);
    assert!(err.contains("say which"), "{err}");
    assert_eq!(sorted(listed(&sidecar)), sorted(vec![ids[1].clone(), ids[3].clone()]));

    let (code, out, _) = dlq(&sidecar, &["purge", "orders_deadletter", &ids[1], "--json"]);
    assert_eq!(code, 0);
    let answer: Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(answer, serde_json::json!({ "purged": 1, "missing": [] }));

    let (code, out, _) = dlq(&sidecar, &["purge", "orders_deadletter", "--all"]);
    assert_eq!((code, out.trim()), (0, "purged 1 dead letter(s) from orders_deadletter"));
    assert_eq!(listed(&sidecar), Vec::<String>::new());
    let depth = r#"outrigger_deadletter_depth{queue="orders_deadletter"}"#;
    assert_eq!(metric(&sidecar, depth).await, None, "an empty dead-letter queue has no series");
}

#[tokio::test]
async fn the_cli_says_when_the_admin_port_cannot_be_reached_and_the_api_refuses_bad_input() {
    let app = Upstream::status(200).await;
    let sidecar = Sidecar::start(&config(&app)).await;
    let out = Command::new(outrigger_tests::binary())
        .args(["dlq", "list", "orders_deadletter", "--admin", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("outrigger dlq: cannot reach the admin endpoint http://127.0.0.1:1"),
        "{err}"
    );

    let (code, _, err) = dlq(&sidecar, &["show", "orders_deadletter", "not-an-id"]);
    assert_eq!(code, 1);
    assert!(err.contains("400"), "{err}");
    let (code, _, err) = dlq(&sidecar, &["replay", "orders_deadletter"]);
    assert_eq!(code, 1);
    assert!(err.contains("say which"), "{err}");
    let (code, out, _) =
        dlq(&sidecar, &["replay", "orders_deadletter", "--id", "01M88XE1Y7PY2QESVD2M843AEH"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        "replayed 0 dead letter(s) from orders_deadletter to their queue\n\
         not in orders_deadletter (deleted, expired or replayed): 01M88XE1Y7PY2QESVD2M843AEH"
    );
    let (code, _, err) = dlq(
        &sidecar,
        &["replay", "orders_deadletter", "--all", "--id", "01M88XE1Y7PY2QESVD2M843AEH"],
    );
    assert_eq!(code, 1, "--id with --all is refused, not taken as --all");
    assert!(err.contains("ids do not mix"), "{err}");
    let (_, out, _) = dlq(&sidecar, &["list", "orders"]);
    assert_eq!(
        out.trim(),
        "orders: no dead letters (the default dead-letter queue of orders is orders_deadletter)"
    );
    let (status, _) = sidecar.admin("/v1/dlq/orders_deadletter?limit=0").await;
    assert_eq!(status, 400);
    let (status, body) = sidecar.admin("/v1/dlq/orders_deadletter").await;
    assert_eq!((status, body.contains(r#""messages": []"#)), (200, true), "{body}");
}

#[tokio::test]
async fn retention_keeps_at_most_max_messages_dead_letters_the_longest_dead_lettered_go() {
    let app = Upstream::status(400).await;
    let yaml = config(&app).replace(
        "messaging:\n",
        "messaging:\n  dead_letter_retention: { max_messages: 2, max_age: 1d }\n",
    );
    let sidecar = Sidecar::start(&yaml).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(publish(&sidecar, "orders", &format!(r#"{{"n":{n}}}"#), &[]).await);
        // one at a time, so each is dead-lettered after the one before
        wait_metric(&sidecar, DEAD, f64::from(n + 1)).await;
    }

    assert_eq!(listed(&sidecar), [ids[2].clone(), ids[1].clone()], "the first one went");
    let depth = r#"outrigger_deadletter_depth{queue="orders_deadletter"}"#;
    assert_eq!(metric(&sidecar, depth).await, Some(2.0));
    assert!(sidecar.log().contains("dead-letter retention"), "each drop is logged");
}
