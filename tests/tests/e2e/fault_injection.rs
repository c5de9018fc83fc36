//! Fault injection (DESIGN "Faults"): `fault` on an upstream or a route holds a share of
//! requests or answers them itself with `outrigger-error: fault-injected`, forwarding nothing;
//! counted in `outrigger_faults_injected_total`; `outrigger-fault: off` exempts a request. (The
//! share's fairness over 10,000 requests is `policy::fault::tests`.)

use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use outrigger_tests::{GrpcReply, GrpcUpstream, Sidecar, Upstream, grpc_call};

use crate::messaging::metric;

fn counted(kind: &str, route: &str) -> String {
    format!(
        r#"outrigger_faults_injected_total{{kind="{kind}",route="{route}",upstream="payments"}}"#
    )
}

#[tokio::test]
async fn an_abort_answers_its_status_itself_forwards_nothing_and_an_exempt_request_passes() {
    let up = Upstream::status(200).await;
    let fault = "    fault: { abort: { percent: 100, status: 418 } }\n";
    let sidecar = Sidecar::start(&format!("{}{fault}", up.yaml("payments"))).await;

    let res = sidecar.get("payments", "/charge").await;
    assert_eq!(res.status(), 418);
    assert_eq!(res.headers()["outrigger-error"], "fault-injected");
    assert_eq!(up.requests(), 0, "an abort forwards nothing");
    assert_eq!(metric(&sidecar, &counted("abort", "(default)")).await, Some(1.0));
    let local = r#"outrigger_local_responses_total{kind="fault-injected",route="(default)",upstream="payments"}"#;
    assert_eq!(metric(&sidecar, local).await, Some(1.0), "an answer of Outrigger's own");

    let exempt = Request::get("/charge")
        .header("host", "payments")
        .header("outrigger-fault", "off")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sidecar.send(exempt).await.status(), 200);
    assert_eq!(up.requests(), 1);
    assert_eq!(metric(&sidecar, &counted("abort", "(default)")).await, Some(1.0));
}

#[tokio::test]
async fn a_delay_holds_the_request_and_a_routes_fault_replaces_the_upstreams() {
    let up = Upstream::status(200).await;
    let yaml = format!(
        "{}    fault: {{ delay: {{ percent: 100, duration: 1500ms }} }}\n    routes:\n      \
         - {{ name: fast, match: {{ path_prefix: /fast }}, fault: {{ abort: {{ percent: 0, status: 503 }} }} }}\n",
        up.yaml("payments")
    );
    let sidecar = Sidecar::start(&yaml).await;

    let started = Instant::now();
    assert_eq!(sidecar.get("payments", "/slow").await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(1500), "held for the delay");
    let started = Instant::now();
    assert_eq!(sidecar.get("payments", "/fast").await.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(1500), "the route's fault has no delay");
    assert_eq!(up.requests(), 2, "both forwarded");
    assert_eq!(metric(&sidecar, &counted("delay", "(default)")).await, Some(1.0));
    assert_eq!(metric(&sidecar, &counted("abort", "fast")).await, Some(0.0));
}

#[tokio::test]
async fn a_grpc_call_aborted_gets_the_matching_grpc_status() {
    let up = GrpcUpstream::scripted([GrpcReply::Status(0)]).await;
    let yaml = format!(
        "upstreams:\n  payments:\n    discovery: {{ static: [\"{}\"] }}\n    protocol: auto\n    \
         fault: {{ abort: {{ percent: 100, status: 503 }} }}\n",
        up.addr()
    );
    let sidecar = Sidecar::start(&yaml).await;
    let res = grpc_call(sidecar.outbound, "payments", "/shop.Payments/Charge", b"charge").await;
    assert_eq!((res.http_status, res.status()), (200, 14), "unavailable, in a gRPC answer");
    assert_eq!(res.header("outrigger-error"), Some("fault-injected"));
    assert_eq!(up.calls(), 0);
}
