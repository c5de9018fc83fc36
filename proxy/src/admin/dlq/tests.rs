//! The dead-letter API against a real store, filled the way delivery fills it.

use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use serde_json::Value;
use serde_json::value::RawValue;

use super::*;
use crate::messaging::broker::{Outbox, Publish, Queue, Read};
use crate::messaging::envelope::{ErrorRecord, unix_millis};
use crate::messaging::publish::PublishLimits;
use crate::messaging::scratch::Scratch;
use crate::telemetry::metrics::Metrics;

async fn messaging(dir: &Scratch) -> Arc<Messaging> {
    let cfg = outrigger_config::Messaging { data_dir: dir.0.clone(), ..Default::default() };
    let metrics = Metrics::new();
    let publish = PublishLimits::new(&outrigger_config::Limits::default(), &metrics);
    Messaging::start(&cfg, "shop", &metrics, crate::telemetry::trace::Tracer::disabled(), publish)
        .await
        .unwrap()
}

/// Publishes to `orders` and dead-letters it into `orders_deadletter` as delivery does, its
/// last error answered with `status` and `message`; the id.
async fn dead_letter(messaging: &Messaging, status: Option<u16>, message: &str) -> MessageId {
    let store = messaging.store().await.unwrap();
    let publish = Publish {
        queue: "orders".into(),
        payload: RawValue::from_string(r#"{"n":1}"#.into()).unwrap(),
        idempotency_key: None,
        ordering_key: None,
        traceparent: None,
        tracestate: None,
    };
    let id = store.publish(vec![publish]).await.unwrap()[0].id();
    let now = unix_millis(std::time::SystemTime::now());
    let read = Read { max: 100, now, ordered: false, wait: false };
    let leased = store.read("orders", "test", read).await.unwrap();
    let mut envelope = leased.into_iter().find(|l| l.envelope.id == id).unwrap().envelope;
    envelope.error.push(ErrorRecord {
        status_code: status,
        message: message.into(),
        stack_trace: String::new(),
        date: "2026-11-25T06:21:31.000Z".into(),
    });
    let metadata = &mut envelope.metadata;
    metadata.insert("original_queue".into(), "orders".into());
    metadata.insert("subscriber".into(), "shop/events/orders".into());
    metadata.insert("reason".into(), format!("permanent failure: {message}").into());
    metadata.insert("attempts".into(), 1.into());
    metadata.insert("dead_lettered_at".into(), "2026-11-25T06:21:31.000Z".into());
    store.dead_letter(envelope, "orders_deadletter").await.unwrap();
    id
}

/// Sends one request to the API: the status and the JSON answer.
async fn call(
    messaging: Option<&Messaging>,
    method: Method,
    uri: &str,
    body: &str,
) -> (u16, Value) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let res = handle(messaging, req).await;
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).expect("every answer is JSON"))
}

async fn get(messaging: &Messaging, uri: &str) -> (u16, Value) {
    call(Some(messaging), Method::GET, uri, "").await
}

async fn replay(messaging: &Messaging, body: &str) -> (u16, Value) {
    call(Some(messaging), Method::POST, "/v1/dlq/orders_deadletter/replay", body).await
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

fn listed(page: &Value) -> Vec<String> {
    page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().into()).collect()
}

#[tokio::test]
async fn a_list_pages_newest_first_with_each_last_error_and_a_cursor() {
    let dir = Scratch::new("dlq-api");
    let messaging = messaging(&dir).await;
    let first = dead_letter(&messaging, Some(400), "bad address").await;
    let second = dead_letter(&messaging, None, "connection refused").await;
    let third = dead_letter(&messaging, Some(422), "no such mailbox").await;

    let (status, page) = get(&messaging, "/v1/dlq/orders_deadletter?limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(listed(&page), [third.to_string(), second.to_string()]);
    let newest = &page["messages"][0];
    assert_eq!(newest["reason"], "permanent failure: no such mailbox");
    assert_eq!(newest["attempts"], 1);
    assert_eq!(newest["original_queue"], "orders");
    assert_eq!(newest["dead_lettered_at"], "2026-11-25T06:21:31.000Z");
    assert_eq!(newest["last_error"]["status_code"], 422);
    assert!(newest["dispatch_date"].as_str().unwrap().ends_with('Z'));
    assert_eq!(page["messages"][1]["last_error"]["status_code"], Value::Null);
    assert_eq!(page["next"], second.to_string());

    let uri = format!("/v1/dlq/orders_deadletter?limit=2&before={second}");
    let (_, older) = get(&messaging, &uri).await;
    assert_eq!(listed(&older), [first.to_string()]);
    assert_eq!(older["next"], Value::Null, "the last page");
}

#[tokio::test]
async fn show_answers_the_whole_envelope_404_for_an_unknown_id_and_400_for_a_bad_one() {
    let dir = Scratch::new("dlq-api");
    let messaging = messaging(&dir).await;
    let id = dead_letter(&messaging, Some(400), "bad address").await;

    let (status, envelope) = get(&messaging, &format!("/v1/dlq/orders_deadletter/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(envelope["id"], id.to_string());
    assert_eq!(envelope["payload"], serde_json::json!({"n": 1}));
    assert_eq!(envelope["error"][0]["message"], "bad address");
    assert_eq!(envelope["metadata"]["subscriber"], "shop/events/orders");

    let unknown = MessageId::from_u128(id.as_u128() + 1);
    let (status, answer) = get(&messaging, &format!("/v1/dlq/orders_deadletter/{unknown}")).await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"], format!("no dead letter {unknown} in orders_deadletter"));
    let (status, answer) = get(&messaging, "/v1/dlq/orders_deadletter/not-an-id").await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("not a message id"), "{answer}");
    let (status, _) = get(&messaging, &format!("/v1/dlq/orders/{id}")).await;
    assert_eq!(status, 404, "{{queue}} is the dead-letter queue's own name");
    let (status, answer) = get(&messaging, "/v1/dlq/orders%20x").await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("not a queue name"), "{answer}");
    let (status, _) = get(&messaging, "/v1/dlq/orders_deadletter?limit=0").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn replay_by_status_or_text_takes_those_whose_last_error_matches_oldest_first() {
    let dir = Scratch::new("dlq-api");
    let messaging = messaging(&dir).await;
    let a = dead_letter(&messaging, Some(503), "mail server busy").await;
    let b = dead_letter(&messaging, Some(422), "no such mailbox").await;
    let c = dead_letter(&messaging, Some(503), "mailbox full").await;
    let d = dead_letter(&messaging, None, "connection refused").await;

    let (status, answer) = replay(&messaging, r#"{"status": 503, "contains": "busy"}"#).await;
    assert_eq!((status, answer["replayed"].clone()), (200, 1.into()), "{answer}");
    assert_eq!(ids(&answer["ids"]), [a.to_string()], "both must match");

    let (_, answer) = replay(&messaging, r#"{"contains": "mailbox"}"#).await;
    assert_eq!(ids(&answer["ids"]), [b.to_string(), c.to_string()], "oldest first");
    let (_, page) = get(&messaging, "/v1/dlq/orders_deadletter").await;
    assert_eq!(listed(&page), [d.to_string()]);

    let store = messaging.opened().unwrap();
    assert_eq!(store.pending(), 3, "three messages back in orders, counted pending");
    let now = unix_millis(std::time::SystemTime::now());
    let back = store.read("orders", "t", Read { max: 10, now, ordered: false, wait: false });
    let back = back.await.unwrap();
    assert_eq!(back.len(), 3, "due at once");
    assert!(back.iter().all(|l| l.attempts == 0 && l.envelope.queue == "orders"));
    assert!(back.iter().all(|l| l.envelope.metadata["replays"] == 1));

    let (_, answer) = replay(&messaging, r#"{"all": true}"#).await;
    assert_eq!(ids(&answer["ids"]), [d.to_string()]);
}

#[tokio::test]
async fn replay_by_id_reports_the_ids_that_are_not_there_and_refuses_unclear_selections() {
    let dir = Scratch::new("dlq-api");
    let messaging = messaging(&dir).await;
    let a = dead_letter(&messaging, Some(400), "bad").await;
    let b = dead_letter(&messaging, Some(400), "bad").await;
    let unknown = MessageId::from_u128(b.as_u128() + 1);

    let body = format!(r#"{{"ids": ["{a}", "{unknown}", "{a}"]}}"#);
    let (status, answer) = replay(&messaging, &body).await;
    assert_eq!(status, 200);
    assert_eq!(answer["replayed"], 1);
    assert_eq!(ids(&answer["ids"]), [a.to_string()]);
    assert_eq!(ids(&answer["missing"]), [unknown.to_string()], "asked twice, replayed once");

    for (body, expected) in [
        (format!(r#"{{"ids": ["{b}"], "all": true}}"#), "ids do not mix"),
        ("{}".to_owned(), "say which"),
        (r#"{"everything": true}"#.to_owned(), "unknown field"),
        ("not json".to_owned(), "expected"),
        (r#"{"ids": ["nope"]}"#.to_owned(), "not a message id"),
    ] {
        let (status, answer) = replay(&messaging, &body).await;
        assert_eq!(status, 400, "{body}");
        assert!(answer["error"].as_str().unwrap().contains(expected), "{body}: {answer}");
    }
    let (_, page) = get(&messaging, "/v1/dlq/orders_deadletter").await;
    assert_eq!(listed(&page), [b.to_string()], "nothing moved by a refused replay");
}

#[tokio::test]
async fn delete_removes_one_or_answers_404_and_purge_removes_them_all() {
    let dir = Scratch::new("dlq-api");
    let messaging = messaging(&dir).await;
    let a = dead_letter(&messaging, Some(400), "bad").await;
    dead_letter(&messaging, Some(400), "bad").await;
    dead_letter(&messaging, Some(400), "bad").await;
    let one = format!("/v1/dlq/orders_deadletter/{a}");

    let (status, answer) = call(Some(&messaging), Method::DELETE, &one, "").await;
    assert_eq!((status, answer["deleted"].clone()), (200, a.to_string().into()));
    let (status, answer) = call(Some(&messaging), Method::DELETE, &one, "").await;
    assert_eq!(status, 404);
    assert!(answer["error"].as_str().unwrap().starts_with("no dead letter"));

    let all = "/v1/dlq/orders_deadletter";
    let (status, answer) = call(Some(&messaging), Method::DELETE, all, "").await;
    assert_eq!((status, answer["purged"].clone()), (200, 2.into()));
    let (_, page) = get(&messaging, all).await;
    assert!(listed(&page).is_empty());
    assert_eq!(messaging.opened().unwrap().pending(), 0, "dead letters are not pending");
}

#[tokio::test]
async fn a_store_never_opened_has_no_dead_letters_and_no_messaging_is_a_404() {
    let dir = Scratch::new("dlq-api");
    let messaging = messaging(&dir).await;

    let (status, page) = get(&messaging, "/v1/dlq/orders_deadletter").await;
    assert_eq!((status, listed(&page).len()), (200, 0));
    let (status, answer) = replay(&messaging, r#"{"all": true}"#).await;
    assert_eq!((status, answer["replayed"].clone()), (200, 0.into()));
    assert!(messaging.opened().is_none(), "looking does not create the store");
    assert!(!dir.0.exists());

    let (status, answer) = call(None, Method::GET, "/v1/dlq/orders_deadletter", "").await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"], "messaging is not configured");
}
