//! The admin listener: probes, metrics, and the running config.

use outrigger_tests::{DEADLINE, Reply, Sidecar, Upstream, free_port, wait_until};

use crate::messaging::value;

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
async fn answers_of_outriggers_own_are_counted_by_kind_apart_from_the_upstreams() {
    let up = Upstream::status(503).await;
    // nothing listens there: every connection is refused
    let nowhere = format!("127.0.0.1:{}", free_port());
    let yaml = format!(
        "{}  nowhere:\n    discovery: {{ static: [\"{nowhere}\"] }}\n",
        up.yaml("payments")
    );
    let sidecar = Sidecar::start(&yaml).await;
    assert_eq!(sidecar.get("payments", "/").await.status(), 503, "the upstream's own 503");
    assert_eq!(sidecar.get("nowhere", "/").await.status(), 502, "refused: ours");
    assert_eq!(sidecar.get("unknown-host", "/").await.status(), 404, "no such upstream: ours");

    let (_, text) = sidecar.admin("/metrics").await;
    let local =
        |labels: &str| value(&text, &format!("outrigger_local_responses_total{{{labels}}}"));
    assert_eq!(
        local(r#"kind="connect-failed",route="(default)",upstream="nowhere""#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(local(r#"kind="unknown-upstream",route="(default)",upstream="(none)""#), Some(1.0));
    assert!(
        !text.lines().any(|l| l.starts_with("outrigger_local_responses_total")
            && l.contains(r#"upstream="payments""#)),
        "the upstream's 503 is its own, not ours: {text}"
    );
    assert_eq!(
        value(
            &text,
            r#"outrigger_requests_total{code="503",route="(default)",upstream="payments"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn the_process_its_build_and_its_requests_in_flight_are_exported() {
    // the upstream holds its answer: one request stays in flight while /metrics is read
    let up = Upstream::scripted([Reply::Delayed(std::time::Duration::from_secs(3), 200)]).await;
    let sidecar = Sidecar::start(&up.yaml("payments")).await;
    let (_, idle) = sidecar.admin("/metrics").await;
    assert_eq!(value(&idle, "outrigger_requests_in_flight"), Some(0.0), "{idle}");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(value(&idle, &format!(r#"outrigger_build_info{{version="{version}"}}"#)), Some(1.0));
    let resident = value(&idle, "process_resident_memory_bytes").expect("resident memory");
    assert!((1e6..1e9).contains(&resident), "{resident} bytes resident");
    assert!(value(&idle, "process_open_fds").is_some_and(|n| n >= 5.0), "{idle}");
    assert!(value(&idle, "process_max_fds").is_some_and(|n| n >= 1024.0), "{idle}");
    let started = value(&idle, "process_start_time_seconds").expect("a start time");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    assert!((now.as_secs_f64() - started).abs() < 120.0, "started just now: {started}");
    // CPU is counted in clock ticks (10 ms): a sidecar just started may not have spent one
    let cpu = value(&idle, "process_cpu_seconds_total").expect("CPU time");
    assert!((0.0..60.0).contains(&cpu), "{cpu} s of CPU");
    assert!(idle.contains("# TYPE process_cpu_seconds_total counter"), "{idle}");

    let call = tokio::spawn({
        let outbound = sidecar.outbound;
        async move {
            let req = http::Request::get("/").header("host", "payments").body(String::new());
            outrigger_tests::send(outbound, req.unwrap()).await
        }
    });
    wait_until(DEADLINE, "one request in flight", || async {
        let (_, text) = sidecar.admin("/metrics").await;
        (value(&text, "outrigger_requests_in_flight") == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

#[tokio::test]
async fn each_durable_commit_of_the_store_is_timed() {
    let sidecar = Sidecar::start("messaging:\n  data_dir: \"$SCRATCH/data\"\n").await;
    for n in 0..3 {
        let req = http::Request::post("/v1/publish/orders")
            .header("host", "localhost")
            .body(format!(r#"{{"n":{n}}}"#))
            .unwrap();
        assert_eq!(outrigger_tests::send(sidecar.outbound, req).await.unwrap().status(), 202);
    }
    // each publish was committed before its 202; the commit is timed once its callers have
    // been answered, so the third may be counted a moment after the third 202
    let (text, commits) = wait_until(DEADLINE, "three commits timed", || async {
        let (_, text) = sidecar.admin("/metrics").await;
        let commits = value(&text, "outrigger_store_commit_duration_seconds_count")?;
        (commits >= 3.0).then_some((text, commits))
    })
    .await;
    let seconds = value(&text, "outrigger_store_commit_duration_seconds_sum").unwrap();
    assert!(seconds > 0.0 && seconds < commits, "{seconds} s for {commits} commits");
}

#[tokio::test]
async fn the_running_config_is_served_to_loopback_clients_as_json_without_its_secrets() {
    let up = Upstream::status(200).await;
    // the collector's token, from the environment as a Kubernetes Secret would give it
    let yaml = format!(
        "service: {{ name: checkout }}\n{}telemetry:\n  tracing:\n    \
         otlp_endpoint: http://127.0.0.1:{}\n    \
         headers: {{ authorization: \"Bearer ${{OTLP_TOKEN}}\" }}\n",
        up.yaml("payments"),
        outrigger_tests::free_port()
    );
    let sidecar = Sidecar::start_with_env(&yaml, &[("OTLP_TOKEN", "s3cret-t0ken")]).await;

    let (status, body) = sidecar.admin("/v1/config").await;

    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["service"]["name"], "checkout");
    assert!(json["upstreams"]["payments"].is_object(), "{body}");
    assert_eq!(json["telemetry"]["tracing"]["headers"]["authorization"], "***", "{body}");
    assert!(!body.contains("s3cret-t0ken"), "{body}");
}
