//! Faults under the sidecar: the disk under the store fills up and gets room again; the
//! sidecar is killed at random moments while messages flow.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use outrigger_tests::{DEADLINE, Dice, Reply, Sidecar, Tmpfs, Upstream, wait_until};
use tokio::task::JoinHandle;

use crate::messaging::{id_of, publish, queues};

/// A publish of about 4 KiB: `(status, outrigger-error, body)`.
async fn publish_4k(sidecar: &Sidecar) -> (u16, String, String) {
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(4000));
    let req = publish("disk.filler")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(payload)))
        .unwrap();
    let res = sidecar.send(req).await;
    let kind = res.headers().get("outrigger-error").map(|v| v.to_str().unwrap().to_owned());
    (res.status().as_u16(), kind.unwrap_or_default(), String::from_utf8_lossy(res.body()).into())
}

/// Messages stored in the one queue, as `/v1/queues` counts them.
async fn stored(sidecar: &Sidecar) -> u64 {
    let depths = queues(sidecar).await;
    depths["queues"][0]["messages"].as_u64().expect("a count of messages")
}

#[tokio::test]
async fn a_full_disk_refuses_publishes_with_503_loses_nothing_accepted_and_recovers_without_a_restart()
 {
    let disk = Tmpfs::mount("2m");
    let yaml = format!("messaging: {{ data_dir: {}/data }}\n", disk.path().display());
    let mut sidecar = Sidecar::start(&yaml).await;

    // fill the disk: every publish answered 202 is one the store must keep
    let mut accepted = 0u64;
    let refusal = loop {
        let (status, kind, body) = publish_4k(&sidecar).await;
        match status {
            202 => accepted += 1,
            _ => break (status, kind, body),
        }
        assert!(accepted < 2000, "a 2 MiB disk took {accepted} messages of 4 KiB");
    };
    assert!(accepted > 10, "the store took only {accepted} messages before the disk was full");
    let (status, kind, body) = refusal;
    assert_eq!((status, kind.as_str()), (503, "outbox-unavailable"), "{body}");
    assert!(body.contains("No space left on device"), "the answer says why: {body}");
    // the process keeps serving; what is stored is readable
    assert_eq!(sidecar.admin("/healthz").await.0, 200);
    assert_eq!(stored(&sidecar).await, accepted);

    // room again: the store opens its file again by itself
    disk.resize("64m");
    wait_until(DEADLINE, "a publish accepted once the disk has room", || async {
        let (status, ..) = publish_4k(&sidecar).await;
        (status == 202).then_some(())
    })
    .await;
    accepted += 1;
    for _ in 0..20 {
        assert_eq!(publish_4k(&sidecar).await.0, 202);
        accepted += 1;
    }
    // every message answered 202 is stored, and none that was refused
    assert_eq!(stored(&sidecar).await, accepted);

    // and the file is whole: after kill -9, every message is still there
    sidecar.kill9();
    sidecar.restart().await;
    assert_eq!(stored(&sidecar).await, accepted);
}

/// Every id in dead-letter queue `orders_deadletter`, page by page.
pub(crate) async fn dead_letter_ids(sidecar: &Sidecar) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut path = "/v1/dlq/orders_deadletter?limit=1000".to_owned();
    loop {
        let (status, body) = sidecar.admin(&path).await;
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).expect("a page of JSON");
        for message in page["messages"].as_array().expect("messages") {
            ids.insert(message["id"].as_str().expect("an id").to_owned());
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/dlq/orders_deadletter?limit=1000&before={next}"),
            None => return ids,
        }
    }
}

/// Waits until the store holds nothing pending and every id of `accepted` is delivered or
/// dead-lettered. Returns how many times the app answered 200 to each message id (judged by
/// the script it answered from), and the ids in `orders_deadletter`.
pub(crate) async fn settled(
    sidecar: &Sidecar,
    app: &Upstream,
    accepted: &HashSet<String>,
    deadline: Duration,
) -> (HashMap<String, usize>, HashSet<String>) {
    let acknowledged = || {
        let mut count: HashMap<String, usize> = HashMap::new();
        for (n, delivery) in app.seen().iter().enumerate() {
            if let Reply::Status(200) = app.reply(n) {
                let id = crate::delivery::header(delivery, "outrigger-message-id");
                *count.entry(id.to_owned()).or_default() += 1;
            }
        }
        count
    };
    wait_until(deadline, "every 202 settled", || async {
        let pending = crate::messaging::metric(sidecar, "outrigger_outbox_pending").await;
        let depth = r#"outrigger_queue_depth{queue="orders"}"#;
        let waiting = crate::messaging::metric(sidecar, depth).await.unwrap_or(0.0);
        if pending != Some(0.0) || waiting > 0.0 {
            return None;
        }
        let delivered = acknowledged();
        let dead = dead_letter_ids(sidecar).await;
        accepted
            .iter()
            .all(|id| delivered.contains_key(id) || dead.contains(id))
            .then_some((delivered, dead))
    })
    .await
}

/// Publishers that keep publishing `{"n": N}` to `orders` until stopped; every id answered 202
/// is kept. A refused or cut connection (the sidecar is being killed) is tried again.
fn publishers(outbound: SocketAddr, stop: Arc<AtomicBool>) -> Vec<JoinHandle<Vec<String>>> {
    (0..4)
        .map(|p| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                let mut n = p;
                while !stop.load(Ordering::Relaxed) {
                    let req = publish("orders")
                        .body(Full::new(Bytes::from(format!(r#"{{"n":{n}}}"#))))
                        .unwrap();
                    match outrigger_tests::send(outbound, req).await {
                        Ok(res) if res.status() == 202 => {
                            accepted.push(id_of(&String::from_utf8_lossy(res.body())));
                            n += 4;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                accepted
            })
        })
        .collect()
}

/// `kill -9` at pseudo-random moments while messages are published, relayed (on Redis),
/// delivered to an app that fails one answer in three, retried and dead-lettered. After the
/// last restart every message answered 202 is delivered or dead-lettered; a message is
/// delivered again only when a kill cut its acknowledgement, so the redeliveries are at most
/// the kills times the deliveries in flight.
pub(crate) async fn kill9_loop(broker: Option<String>) {
    const KILLS: u64 = 8;
    const CONCURRENCY: usize = 8;
    let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
    let script: Vec<Reply> =
        (0..20_000).map(|_| Reply::Status(if dice.roll(3) == 0 { 500 } else { 200 })).collect();
    let app = Upstream::scripted(script).await;
    let extra = format!(", max_attempts: 3, concurrency: {CONCURRENCY}");
    let mut yaml = crate::delivery::config(&app, &extra);
    if let Some(url) = broker {
        let broker = format!("messaging:\n  broker: \"{url}\"\n  claim_idle: 1s\n");
        yaml = yaml.replace("messaging:\n", &broker);
    }
    let mut sidecar = Sidecar::start(&yaml).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = publishers(sidecar.outbound, stop.clone());

    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(100 + dice.roll(400))).await;
        sidecar.kill9();
        sidecar.restart().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut accepted = HashSet::new();
    for publisher in publishing {
        accepted.extend(publisher.await.unwrap());
    }
    assert!(accepted.len() > 100, "only {} publishes were accepted", accepted.len());

    let (delivered, dead) = settled(&sidecar, &app, &accepted, Duration::from_secs(60)).await;
    let lost: Vec<_> =
        accepted.iter().filter(|id| !delivered.contains_key(*id) && !dead.contains(*id)).collect();
    assert!(lost.is_empty(), "messages answered 202 and never settled: {lost:?}");
    let again: usize = delivered.values().map(|n| n - 1).sum();
    eprintln!(
        "{} accepted, {} acknowledged, {} dead-lettered, {again} delivered again, over {KILLS} kills",
        accepted.len(),
        delivered.len(),
        dead.len()
    );
    let bound = KILLS as usize * CONCURRENCY;
    assert!(again <= bound, "{again} redeliveries after {KILLS} kills (at most {bound})");
    assert!(!dead.is_empty(), "one answer in three failed: some message ran out of attempts");
}

// kill -9 at random moments on every broker: `brokers::*::kill9_at_random_moments_loses_no_accepted_message`
