//! `outrigger explain` runs the data plane's own policy layers in virtual time: the same script
//! through a real sidecar and through `explain` gives the same attempts and the same answers.

use std::process::Command;

use outrigger_tests::{Reply, Sidecar, Upstream};

/// `outrigger explain --json` on `yaml`: (kind, detail) per event.
fn explain(yaml: &str, args: &[&str]) -> Vec<(String, String)> {
    let (_dir, file) = crate::check::write(yaml);
    let out = Command::new(outrigger_tests::binary())
        .args(["explain", "--config"])
        .arg(&file)
        .args(args)
        .arg("--json")
        .output()
        .expect("run outrigger explain");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().to_owned(), e["detail"].as_str().unwrap().to_owned()))
        .collect()
}

/// What a client got, as `explain` writes it.
fn answered(res: &http::Response<bytes::Bytes>) -> String {
    let mut line = res.status().as_u16().to_string();
    for name in ["outrigger-error", "outrigger-attempts"] {
        if let Some(value) = res.headers().get(name) {
            line += &format!(" {name}: {}", value.to_str().unwrap());
        }
    }
    line
}

fn answers_of(events: &[(String, String)]) -> Vec<String> {
    events.iter().filter(|(k, _)| k == "answer").map(|(_, d)| d.clone()).collect()
}

#[tokio::test]
async fn retries_through_explain_and_through_a_sidecar_make_the_same_attempts_and_answer() {
    let up = Upstream::scripted([Reply::Status(503), Reply::Status(503), Reply::Status(200)]).await;
    let policies = "    retry: { max_attempts: 4, backoff: { initial: 20ms, max: 50ms } }\n";
    let yaml = format!("{}{policies}", up.yaml("payments"));
    let sidecar = Sidecar::start(&yaml).await;
    let res = sidecar.get("payments", "/").await;

    let events = explain(&yaml, &["payments", "--answers", "503,503,200"]);
    let attempts = events.iter().filter(|(k, _)| k == "attempt").count();
    assert_eq!(attempts, up.requests(), "the same attempts: {events:?}");
    assert_eq!(answers_of(&events), [answered(&res)], "the same answer");
    assert_eq!(answered(&res), "200 outrigger-attempts: 3");
}

#[tokio::test]
async fn a_breaker_opens_after_the_same_request_through_explain_and_through_a_sidecar() {
    let up = Upstream::status(500).await;
    let policies = "    circuit_breaker: { consecutive_failures: 3, open_for: 60s }\n";
    let yaml = format!("{}{policies}", up.yaml("payments"));
    let sidecar = Sidecar::start(&yaml).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(answered(&sidecar.get("payments", "/").await));
    }

    let events =
        explain(&yaml, &["payments", "--answers", "500", "--repeat", "5", "--every", "1s"]);
    assert_eq!(answers_of(&events), got, "{events:?}");
    assert_eq!(got[3], "503 outrigger-error: circuit-open");
    assert!(events.contains(&("breaker".to_owned(), "open".to_owned())), "{events:?}");
    assert_eq!(up.requests(), 3);
}

#[tokio::test]
async fn a_grpc_script_through_explain_and_through_a_sidecar_retries_the_same() {
    use outrigger_tests::{GrpcReply, GrpcUpstream, grpc_call};
    let up = GrpcUpstream::scripted([
        GrpcReply::Status(14),
        GrpcReply::Status(14),
        GrpcReply::Status(0),
    ])
    .await;
    let yaml = format!(
        "upstreams:\n  payments:\n    discovery: {{ static: [\"{}\"] }}\n    protocol: auto\n    \
         retry: {{ max_attempts: 3, on: [unavailable], backoff: {{ initial: 10ms, max: 50ms }} }}\n",
        up.addr()
    );
    let sidecar = Sidecar::start(&yaml).await;
    let res = grpc_call(sidecar.outbound, "payments", "/shop.Payments/Charge", b"charge").await;
    let got = format!(
        "{} grpc-status: {} outrigger-attempts: {}",
        res.http_status,
        res.status(),
        res.header("outrigger-attempts").unwrap_or("1")
    );

    let events = explain(&yaml, &["payments", "--answers", "unavailable,unavailable,ok"]);
    assert_eq!(answers_of(&events), [got], "{events:?}");
    let attempts = events.iter().filter(|(k, _)| k == "attempt").count();
    assert_eq!(attempts, up.calls());
}

#[tokio::test]
async fn the_same_seed_draws_the_same_backoffs_and_another_seed_others() {
    let yaml = "upstreams:\n  payments:\n    discovery: { static: [\"127.0.0.1:9\"] }\n    \
                timeouts: { request: 10m }\n    \
                retry: { max_attempts: 4, backoff: { initial: 30s, max: 2m } }\n";
    let run =
        |seed: &str| explain(yaml, &["payments", "--answers", "503,503,503,200", "--seed", seed]);
    let seven = run("7");
    assert_eq!(run("7"), seven, "the same seed, the same timeline");
    assert_ne!(run("8"), seven, "full jitter over 30 s to 2 min: another seed draws otherwise");
    assert!(seven[1].1.contains("drawn from 0..29999 ms"), "{seven:?}");
}
