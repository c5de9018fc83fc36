//! Shadow mode (DESIGN "Shadow mode and breaker control"): a rate limit, concurrency limit or
//! breaker with `mode: shadow` decides as usual and keeps its state, but forwards every
//! request, counting what it would have refused; switching to `enforce` by reload keeps the
//! state.

use std::time::Duration;

use outrigger_tests::{DEADLINE, Reply, Sidecar, Upstream, wait_until};

use crate::messaging::metric;

fn would(policy: &str, decision: &str) -> String {
    format!(
        r#"outrigger_shadow_decisions_total{{decision="{decision}",policy="{policy}",route="(default)",upstream="payments"}}"#
    )
}

#[tokio::test]
async fn a_shadow_rate_limit_forwards_everything_and_counts_what_it_would_refuse() {
    let up = Upstream::status(200).await;
    let limit = "    rate_limit: { requests_per_second: 1, burst: 2, mode: shadow }\n";
    let sidecar = Sidecar::start(&format!("{}{limit}", up.yaml("payments"))).await;
    for _ in 0..5 {
        assert_eq!(sidecar.get("payments", "/").await.status(), 200);
    }
    assert_eq!(up.requests(), 5, "nothing refused");
    let counted = metric(&sidecar, &would("rate_limit", "rate-limited")).await.unwrap();
    assert!(
        (2.0..=3.0).contains(&counted),
        "3 over the burst (2 if a token came back meanwhile): {counted}"
    );
    let refused = r#"outrigger_rate_limited_total{upstream="payments"}"#;
    assert_eq!(metric(&sidecar, refused).await, Some(0.0), "nothing was rate-limited");
}

#[tokio::test]
async fn a_shadow_concurrency_limit_lets_the_extra_call_through_and_counts_it() {
    let up = Upstream::scripted([Reply::Delayed(Duration::from_millis(500), 200)]).await;
    let limit = "    concurrency_limit: { max: 1, mode: shadow }\n";
    let sidecar = Sidecar::start(&format!("{}{limit}", up.yaml("payments"))).await;
    let (a, b) = tokio::join!(sidecar.get("payments", "/"), sidecar.get("payments", "/"));
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    assert_eq!(metric(&sidecar, &would("concurrency_limit", "overloaded")).await, Some(1.0));
}

#[tokio::test]
async fn a_shadow_breaker_opens_but_forwards_and_turned_to_enforce_by_reload_it_is_still_open() {
    let up = Upstream::status(500).await;
    let breaker = |mode: &str| {
        format!("    circuit_breaker: {{ consecutive_failures: 2, open_for: 60s, mode: {mode} }}\n")
    };
    let sidecar = Sidecar::start(&format!("{}{}", up.yaml("payments"), breaker("shadow"))).await;
    for _ in 0..4 {
        let res = sidecar.get("payments", "/").await;
        assert_eq!(res.status(), 500, "the upstream's own answer");
        assert!(res.headers().get("outrigger-error").is_none());
    }
    assert_eq!(up.requests(), 4, "forwarded while it would be open");
    let state = r#"outrigger_circuit_state{upstream="payments"}"#;
    assert_eq!(metric(&sidecar, state).await, Some(2.0), "a shadow breaker shows its state");
    assert_eq!(metric(&sidecar, &would("circuit_breaker", "circuit-open")).await, Some(2.0));

    sidecar.rewrite(&format!("{}{}", up.yaml("payments"), breaker("enforce")));
    wait_until(DEADLINE, "the reload", || async {
        (metric(&sidecar, r#"outrigger_config_reloads_total{result="applied"}"#).await == Some(1.0))
            .then_some(())
    })
    .await;
    let res = sidecar.get("payments", "/").await;
    assert_eq!(res.headers()["outrigger-error"], "circuit-open", "the open state went on");
    assert_eq!(up.requests(), 4);
}
