//! Faults under the sidecar: the disk under the store fills up and gets room again.

use bytes::Bytes;
use http_body_util::Full;
use outrigger_tests::{DEADLINE, Sidecar, Tmpfs, wait_until};

use crate::messaging::{publish, queues};

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
