//! The request path, outermost first. Change the order here and in DESIGN.md together.
//!
//! Listener -> framing guard -> `Route` (authority -> upstream, else 404) -> the upstream's
//! stack below -> `Forward` (balancer, pooled client). The resilience policies of DESIGN.md
//! ("Policies, in the order a request meets them") slot in between `MetricsLayer` and `Forward`.

use std::collections::HashMap;
use std::sync::Arc;

use http::{Request, Response};
use outrigger_config as config;
use outrigger_discovery::Endpoints;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::forward::Forward;
use crate::http::route::Routes;
use crate::telemetry::metrics::{Metrics, MetricsLayer, NO_UPSTREAM};

/// One upstream's whole stack, boxed once so every upstream has the same type.
pub type UpstreamService = BoxCloneSyncService<Request<Body>, Response<Body>, ProxyError>;

/// An upstream, built: its service and its discovery, which readiness watches.
#[derive(Debug, Clone)]
pub struct BuiltUpstream {
    pub name: Arc<str>,
    pub service: UpstreamService,
    pub endpoints: Endpoints,
}

/// One upstream's policies. An absent YAML section means no layer, not a disabled one.
pub fn upstream(cfg: &config::Upstream, metrics: &Metrics) -> BuiltUpstream {
    let name = cfg.name.as_str();
    let endpoints = Endpoints::start(name, &cfg.discovery);
    let service = ServiceBuilder::new()
        .layer(MetricsLayer::new(metrics.upstream(name))) // counts the final status, ours or theirs
        .service(Forward::new(name, endpoints.clone(), cfg)); // balancer, pool; 502/503 classified
    BuiltUpstream { name: name.into(), service: BoxCloneSyncService::new(service), endpoints }
}

/// The outbound listener's routing table.
pub fn routes(upstreams: &[BuiltUpstream], metrics: &Metrics) -> Routes {
    let by_name: HashMap<Box<str>, UpstreamService> =
        upstreams.iter().map(|u| (Box::from(&*u.name), u.service.clone())).collect();
    Routes::new(by_name, metrics.upstream(NO_UPSTREAM))
}
