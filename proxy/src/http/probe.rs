//! The active health check's probe of one endpoint: `GET path` with the upstream's name as
//! `Host`, healthy on a 2xx; or, with `tcp: true`, a TCP connect. Each probe is bounded by the
//! check's `timeout` (in `outrigger_discovery::health`).

use std::sync::Arc;

use http::Request;
use http::header::HOST;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use outrigger_config as config;
use outrigger_discovery::{Probe, tcp_probe};

use crate::http::Body;

/// The probe `check` asks for, on the endpoints of `upstream`.
pub fn for_check(upstream: &str, check: &config::HealthCheck) -> Probe {
    let Some(path) = check.path.clone() else { return tcp_probe() };
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(check.timeout.get()));
    connector.set_nodelay(true);
    // one connection per endpoint, kept between probes: a probe measures the endpoint, not
    // our connection setup
    let client: Client<HttpConnector, Body> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1).build(connector);
    let host = http::HeaderValue::from_str(upstream).expect("an upstream name is a valid Host");
    Arc::new(move |addr| {
        let req = Request::get(format!("http://{addr}{path}"))
            .header(HOST, host.clone())
            .header("user-agent", "outrigger-health-check")
            .body(Body::empty())
            .expect("a valid health check request");
        let client = client.clone();
        Box::pin(async move {
            let res = client.request(req).await.map_err(|e| format!("GET {addr}: {e}"))?;
            match res.status() {
                status if status.is_success() => Ok(()),
                status => Err(format!("GET {addr} answered {}", status.as_u16())),
            }
        })
    })
}
