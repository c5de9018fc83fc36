//! Breaker control (DESIGN "Shadow mode and breaker control"): `outrigger circuit` and
//! `POST /v1/upstreams/{name}/circuit` force an upstream's breaker open or closed, or give it
//! back to its policy; the state shows in the API and the metrics, is logged at warn, and
//! outlives a reload.

use std::process::Command;

use outrigger_tests::{DEADLINE, Sidecar, Upstream, wait_until};

use crate::messaging::metric;

const BREAKER: &str = "    circuit_breaker: { consecutive_failures: 2, open_for: 60s }\n";
const FORCED: &str = r#"outrigger_circuit_forced{upstream="payments"}"#;
const STATE: &str = r#"outrigger_circuit_state{upstream="payments"}"#;

/// `outrigger circuit ACTION UPSTREAM --admin …`: exit code and what it printed.
fn circuit(sidecar: &Sidecar, action: &str, upstream: &str) -> (i32, String) {
    let out = Command::new(outrigger_tests::binary())
        .args(["circuit", action, upstream, "--admin", &format!("http://{}", sidecar.admin)])
        .output()
        .expect("run outrigger circuit");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// `GET /v1/upstreams/payments/circuit` as JSON.
async fn shown(sidecar: &Sidecar) -> serde_json::Value {
    let (status, body) = sidecar.admin("/v1/upstreams/payments/circuit").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn a_breaker_forced_open_refuses_every_call_until_auto_gives_it_back() {
    let up = Upstream::status(200).await;
    let sidecar = Sidecar::start(&format!("{}{BREAKER}", up.yaml("payments"))).await;
    assert_eq!(sidecar.get("payments", "/").await.status(), 200);

    let (code, said) = circuit(&sidecar, "open", "payments");
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("forced open"), "{said}");
    let refused = sidecar.get("payments", "/").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["outrigger-error"], "circuit-open");
    assert_eq!(up.requests(), 1, "nothing forwarded while forced open");
    let view = shown(&sidecar).await;
    assert_eq!((view["state"].as_str(), view["forced"].as_str()), (Some("open"), Some("open")));
    assert_eq!(metric(&sidecar, FORCED).await, Some(1.0));
    assert_eq!(metric(&sidecar, STATE).await, Some(2.0));
    assert!(sidecar.log().contains("circuit breaker forced open"), "a warning says so");

    let (code, said) = circuit(&sidecar, "auto", "payments");
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("follows its policy again: closed"), "{said}");
    assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    assert_eq!(up.requests(), 2);
    assert_eq!(shown(&sidecar).await["forced"], serde_json::Value::Null);
    assert_eq!(metric(&sidecar, FORCED).await, Some(0.0));
    assert_eq!(metric(&sidecar, STATE).await, Some(0.0));
    assert!(sidecar.log().contains("circuit breaker given back to its policy"));
}

#[tokio::test]
async fn a_breaker_forced_closed_lets_every_failure_through_and_never_opens() {
    let up = Upstream::status(503).await;
    let sidecar = Sidecar::start(&format!("{}{BREAKER}", up.yaml("payments"))).await;
    let (code, said) = circuit(&sidecar, "close", "payments");
    assert_eq!(code, 0, "{said}");
    for _ in 0..5 {
        let res = sidecar.get("payments", "/").await;
        assert_eq!(res.status(), 503);
        assert!(res.headers().get("outrigger-error").is_none(), "the upstream's own 503");
    }
    assert_eq!(up.requests(), 5, "two failures in a row would have opened it");
    assert_eq!(metric(&sidecar, STATE).await, Some(0.0));

    // given back, the policy starts afresh: two more failures open it
    circuit(&sidecar, "auto", "payments");
    sidecar.get("payments", "/").await;
    sidecar.get("payments", "/").await;
    let open = sidecar.get("payments", "/").await;
    assert_eq!(open.headers()["outrigger-error"], "circuit-open");
    assert_eq!(up.requests(), 7);
}

#[tokio::test]
async fn the_forced_state_outlives_a_reload_of_the_upstream_changed_or_not() {
    let up = Upstream::status(200).await;
    let beta = Upstream::status(200).await;
    let sidecar = Sidecar::start(&format!("{}{BREAKER}", up.yaml("payments"))).await;
    circuit(&sidecar, "open", "payments");

    // unchanged: the same breaker; its policy changed (open_for): a new breaker, forced the same
    let with_beta = format!(
        "{}{BREAKER}{}",
        up.yaml("payments"),
        beta.yaml("beta").replace("upstreams:\n", "")
    );
    let changed = with_beta.replace("open_for: 60s", "open_for: 90s");
    for (yaml, applied) in [(with_beta, 1.0), (changed, 2.0)] {
        sidecar.rewrite(&yaml);
        wait_until(DEADLINE, "the reload", || async {
            (metric(&sidecar, r#"outrigger_config_reloads_total{result="applied"}"#).await
                == Some(applied))
            .then_some(())
        })
        .await;
        let refused = sidecar.get("payments", "/").await;
        assert_eq!(refused.headers()["outrigger-error"], "circuit-open", "still forced open");
        assert_eq!(shown(&sidecar).await["forced"], "open");
        assert_eq!(metric(&sidecar, FORCED).await, Some(1.0));
    }
    assert_eq!(up.requests(), 0);
    assert_eq!(sidecar.get("beta", "/").await.status(), 200);
}

#[tokio::test]
async fn unknown_states_and_upstreams_and_upstreams_without_a_breaker_are_refused_with_why() {
    let up = Upstream::status(200).await;
    let bare = Upstream::status(200).await;
    let yaml = format!(
        "{}{BREAKER}{}",
        up.yaml("payments"),
        bare.yaml("bare").replace("upstreams:\n", "")
    );
    let sidecar = Sidecar::start(&yaml).await;
    let post = |path: &str, body: &'static str| {
        http::Request::post(format!("http://{}{path}", sidecar.admin))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let send = |req| outrigger_tests::send(sidecar.admin, req);
    let bad =
        send(post("/v1/upstreams/payments/circuit", r#"{"state":"half-open"}"#)).await.unwrap();
    assert_eq!(bad.status(), 400);
    let why: serde_json::Value = serde_json::from_slice(bad.body()).unwrap();
    assert!(why["error"].as_str().unwrap().starts_with("\"half-open\" is not a state"), "{why}");
    let unknown = send(post("/v1/upstreams/nope/circuit", r#"{"state":"open"}"#)).await.unwrap();
    assert_eq!(unknown.status(), 404);
    let no_breaker = send(post("/v1/upstreams/bare/circuit", r#"{"state":"open"}"#)).await.unwrap();
    assert_eq!(no_breaker.status(), 409);
    assert!(String::from_utf8_lossy(no_breaker.body()).contains("no circuit_breaker"));

    let (code, said) = circuit(&sidecar, "open", "nope");
    assert_eq!(code, 1);
    assert!(said.contains("404: no upstream named \"nope\""), "{said}");
    assert_eq!(sidecar.get("payments", "/").await.status(), 200, "nothing was forced");
}
