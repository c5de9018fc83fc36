//! The admin listener: probes, metrics, and the running config.

use outrigger_tests::{DEADLINE, Sidecar, Upstream, free_port, wait_until};

#[tokio::test]
async fn probes_answer_and_readyz_names_each_check_in_json() {
    let up = Upstream::status(200).await;
    let yaml = up.yaml("payments");
    let sidecar = Sidecar::start(&yaml).await;

    assert_eq!(sidecar.admin("/healthz").await.0, 200);
    let (status, body) = sidecar.admin("/readyz").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("readyz answers JSON");
    assert_eq!(json["status"], "ready");
    assert_eq!(json["checks"]["upstream.payments"]["status"], "ok");
    assert_eq!(json["checks"]["listeners"]["status"], "ok");
}

#[tokio::test]
async fn readiness_follows_the_local_apps_health_path() {
    let app_port = free_port();
    let yaml = format!(
        "service:\n  name: checkout\n  app: {{ url: \"http://127.0.0.1:{app_port}\", health_path: /healthz }}\n"
    );
    let sidecar = Sidecar::start_unready(&yaml).await;

    let (status, body) = sidecar.admin("/readyz").await;
    assert_eq!(status, 503, "the app is not up yet: {body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["status"], "not_ready");
    assert_eq!(json["checks"]["app"]["status"], "failing");
    assert_eq!(sidecar.admin("/healthz").await.0, 200, "liveness does not depend on the app");

    let _app = Upstream::status_on(app_port, 200).await;
    wait_until(DEADLINE, "readiness once the app answers", || async {
        (sidecar.admin("/readyz").await.0 == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn metrics_count_requests_by_upstream_and_status() {
    let up = Upstream::status(200).await;
    let yaml = up.yaml("payments");
    let sidecar = Sidecar::start(&yaml).await;

    sidecar.get("payments", "/").await;
    sidecar.get("payments", "/").await;
    sidecar.get("unknown-host", "/").await;

    let (status, text) = sidecar.admin("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        text.contains(
            r#"outrigger_requests_total{code="200",route="(default)",upstream="payments"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"outrigger_requests_total{code="404",route="(default)",upstream="(none)"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"outrigger_request_duration_seconds_count{route="(default)",upstream="payments"} 2"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn the_running_config_is_served_to_loopback_clients_as_json() {
    let up = Upstream::status(200).await;
    let yaml = format!("service: {{ name: checkout }}\n{}", up.yaml("payments"));
    let sidecar = Sidecar::start(&yaml).await;

    let (status, body) = sidecar.admin("/v1/config").await;

    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["service"]["name"], "checkout");
    assert!(json["upstreams"]["payments"].is_object(), "{body}");
}
