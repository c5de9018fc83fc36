//! The active health check's probe of one endpoint: `GET path` with the upstream's name as
//! `Host`, healthy on a 2xx, over TLS when the upstream has `tls` (the same trust, name and
//! client certificate as its requests); or, with `tcp: true`, a TCP connect. Each probe is
//! bounded by the check's `timeout` (in `outrigger_discovery::health`).

use std::sync::Arc;

use http::Request;
use http::header::HOST;
use outrigger_config as config;
use outrigger_discovery::{Probe, tcp_probe};

use crate::http::Body;
use crate::http::forward::client;
use crate::http::tls::Origination;

/// The probe `check` asks for, on the endpoints of `upstream` (whose `tls`, if any, applies).
pub fn for_check(upstream: &str, check: &config::HealthCheck, tls: Option<&config::Tls>) -> Probe {
    let Some(path) = check.path.clone() else { return tcp_probe() };
    // connections are kept between probes: a probe measures the endpoint, not our setup
    let timeouts = config::Timeouts { connect: check.timeout, ..config::Timeouts::default() };
    let tls = tls.map(|tls| Origination::new(upstream, tls));
    let client = Arc::new(client(&timeouts, tls.as_ref(), false));
    let scheme = client.scheme();
    let host = http::HeaderValue::from_str(upstream).expect("an upstream name is a valid Host");
    Arc::new(move |addr| {
        let req = Request::get(format!("{scheme}://{addr}{path}"))
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
