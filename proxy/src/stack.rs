//! The request path, outermost first. Change the order here and in DESIGN.md together.
//!
//! Listener -> framing guard -> `Route` (authority -> upstream, else 404) -> the upstream's
//! stack below, in DESIGN.md's order ("Policies, in the order a request meets them") ->
//! `Forward` (balancer, pooled client).

use std::collections::HashMap;
use std::sync::Arc;

use http::{Request, Response};
use outrigger_config as config;
use outrigger_discovery::{Endpoints, Pool, PoolConfig, SourceConfig};
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::forward::Forward;
use crate::http::probe;
use crate::http::route::Routes;
use crate::messaging::Messaging;
use crate::policy::circuit_breaker::CircuitBreakerLayer;
use crate::policy::concurrency_limit::ConcurrencyLimitLayer;
use crate::policy::rate_limit::RateLimitLayer;
use crate::policy::retry::RetryLayer;
use crate::policy::timeout::DeadlineLayer;
use crate::telemetry::grpc::GrpcResponsesLayer;
use crate::telemetry::metrics::{Metrics, MetricsLayer, NO_UPSTREAM};

/// The `route` label of a request no route matched.
// TODO(routes, #19): the routes work names each route; until then every call is "(default)"
const DEFAULT_ROUTE: &str = "(default)";

/// One upstream's whole stack, boxed once so every upstream has the same type.
pub type UpstreamService = BoxCloneSyncService<Request<Body>, Response<Body>, ProxyError>;

/// An upstream, built: its service, and its endpoint pool, which readiness, metrics and the
/// admin view read.
#[derive(Debug, Clone)]
pub struct BuiltUpstream {
    pub name: Arc<str>,
    pub service: UpstreamService,
    pub pool: Pool,
}

/// One upstream: its endpoint pool and its policies around the forwarder.
pub fn upstream(
    cfg: &config::Upstream,
    sources: &SourceConfig,
    metrics: &Metrics,
) -> BuiltUpstream {
    let name: Arc<str> = cfg.name.as_str().into();
    let endpoints = Endpoints::start(&name, &cfg.discovery, sources);
    let pool = Pool::start(
        &name,
        endpoints,
        PoolConfig {
            load_balancer: cfg.load_balancer,
            health_check: cfg
                .health_check
                .as_ref()
                .map(|c| (c.clone(), probe::for_check(&name, c, cfg.tls.as_ref()))),
            outlier_detection: cfg.outlier_detection,
        },
    );
    let service = policies(cfg, &name, metrics, Forward::new(pool.clone(), cfg)); // balancer over healthy endpoints, connection pool; 502/503
    BuiltUpstream { name, service: BoxCloneSyncService::new(service), pool }
}

/// One upstream's policy layers around `inner`, outermost first. An absent YAML section means
/// no layer, not a disabled one.
pub fn policies<S>(
    cfg: &config::Upstream,
    name: &Arc<str>,
    metrics: &Metrics,
    inner: S,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = ProxyError,
    Future: Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    ServiceBuilder::new()
        .layer(MetricsLayer::new(metrics.upstream(name))) // counts what the client got
        .layer(GrpcResponsesLayer::new(metrics.grpc_responses(name, DEFAULT_ROUTE))) // gRPC statuses
        .option_layer(
            cfg.rate_limit.map(|r| RateLimitLayer::new(name, &r, metrics.rate_limited(name))),
        ) // 429 rate-limited
        .option_layer(cfg.concurrency_limit.map(|n| ConcurrencyLimitLayer::new(name, n))) // 503 overloaded
        .option_layer(
            cfg.circuit_breaker
                .map(|c| CircuitBreakerLayer::new(name, c, metrics.circuit_state(name))),
        ) // 503 circuit-open
        .layer(DeadlineLayer::whole_request(cfg.timeouts.request.get())) // 504 timeout, the call's deadline
        .option_layer(
            cfg.retry
                .as_ref()
                .map(|r| RetryLayer::new(r, cfg.timeouts.request.get(), metrics.retries(name))),
        ) // backoff within the request timeout, budget, replay cap
        .option_layer(cfg.timeouts.per_try.map(|t| DeadlineLayer::new(t.get()))) // one attempt
        .service(inner)
}

/// The outbound listener's routing table: the upstreams by name, the messaging API for a local
/// authority, and the tracer that continues each request's trace.
pub fn routes(
    upstreams: &[BuiltUpstream],
    metrics: &Metrics,
    messaging: &Arc<Messaging>,
) -> Routes {
    let by_name: HashMap<Box<str>, UpstreamService> =
        upstreams.iter().map(|u| (Box::from(&*u.name), u.service.clone())).collect();
    Routes::new(by_name, metrics.upstream(NO_UPSTREAM))
        .with_messaging(messaging.clone())
        .with_tracer(messaging.tracer().clone())
}
