//! The request path, outermost first. Change the order here and in DESIGN.md together.
//!
//! Listener -> framing guard -> `Route` (authority -> upstream, else 404; then path, method and
//! headers -> the upstream's route, else `(default)`) -> that route's stack below, in DESIGN.md's
//! order ("Policies, in the order a request meets them") -> `Forward` (balancer, pooled client).
//! Each route's stack is built here once; its routes share the upstream's breaker and endpoints.

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
use crate::http::route_match::{Matcher, Routed};
use crate::messaging::{Messaging, publish};
use crate::policy::Shadow;
use crate::policy::circuit_breaker::{CircuitBreakerLayer, CircuitControl};
use crate::policy::concurrency_limit::ConcurrencyLimitLayer;
use crate::policy::fault::FaultLayer;
use crate::policy::rate_limit::RateLimitLayer;
use crate::policy::retry::{RetryBudget, RetryLayer};
use crate::policy::timeout::DeadlineLayer;
use crate::telemetry::grpc::GrpcResponsesLayer;
use crate::telemetry::metrics::{Metrics, MetricsLayer, NO_UPSTREAM};

/// One route's whole stack (or an upstream's, for requests no route matched), boxed once so
/// every stack has the same type.
pub type UpstreamService = BoxCloneSyncService<Request<Body>, Response<Body>, ProxyError>;

/// An upstream, built: its stacks by route, and its endpoint pool, which readiness, metrics
/// and the admin view read.
#[derive(Debug, Clone)]
pub struct BuiltUpstream {
    pub name: Arc<str>,
    pub service: Routed<UpstreamService>,
    pub pool: Pool,
    /// Its breaker's control, when it has a breaker (the admin API forces it).
    pub circuit: Option<CircuitControl>,
}

/// What the routes of one upstream share: its name and its circuit breaker (the breaker is
/// about the endpoints, which every route reaches).
#[derive(Debug, Clone)]
pub struct Shared {
    pub name: Arc<str>,
    breaker: Option<CircuitBreakerLayer>,
    /// Retries draw their jitter from this seed (`outrigger explain --seed`); `None` in the
    /// data plane.
    seed: Option<u64>,
}

impl Shared {
    pub fn new(cfg: &config::Upstream, metrics: &Metrics) -> Self {
        Self::keeping(cfg, metrics, None)
    }

    /// With the breaker of `kept` (the upstream's before a reload) when its policy is the same
    /// but for the mode: its state goes on.
    pub fn keeping(
        cfg: &config::Upstream,
        metrics: &Metrics,
        kept: Option<&CircuitControl>,
    ) -> Self {
        let name: Arc<str> = cfg.name.as_str().into();
        let breaker = cfg.circuit_breaker.map(|c| {
            CircuitBreakerLayer::new_or_kept(&name, c, metrics.circuit_gauges(&name), kept)
        });
        Shared { name, breaker, seed: None }
    }

    /// Retries draw their jitter from `seed`, so a run repeats (`outrigger explain --seed`).
    pub fn seeded(mut self, seed: Option<u64>) -> Self {
        self.seed = seed;
        self
    }

    /// The handle that forces the upstream's breaker, when it has one.
    pub fn circuit(&self) -> Option<CircuitControl> {
        self.breaker.as_ref().map(CircuitBreakerLayer::control)
    }
}

/// Each upstream's name and breaker control, for the admin API.
pub fn circuits(upstreams: &[BuiltUpstream]) -> Vec<(Arc<str>, Option<CircuitControl>)> {
    upstreams.iter().map(|u| (u.name.clone(), u.circuit.clone())).collect()
}

/// One upstream: its endpoint pool and its policies around the forwarder.
///
/// `kept`: the upstream's breaker before a reload rebuilt it, whose state goes on when its
/// policy did not change but for the mode.
pub fn upstream(
    cfg: &config::Upstream,
    sources: &SourceConfig,
    metrics: &Metrics,
    kept: Option<&CircuitControl>,
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
            events: Some(metrics.pool_events(&name)),
        },
    );
    let forward = Forward::new(pool.clone(), cfg); // balancer over healthy endpoints, connection pool; 502/503
    let shared = Shared::keeping(cfg, metrics, kept);
    let stack =
        |route| BoxCloneSyncService::new(policies(cfg, route, &shared, metrics, forward.clone()).0);
    let routes = cfg
        .routes
        .iter()
        .map(|r| (Matcher::new(&r.matches), r.name.as_str().into(), stack(Some(r))));
    let service = Routed::new(routes.collect(), stack(None));
    BuiltUpstream { name, service, pool, circuit: shared.circuit() }
}

/// One route's policy layers around `inner`, outermost first: the upstream's sections, each
/// replaced whole by the route's when it gives one (`route: None` for requests no route
/// matched). An absent YAML section means no layer, not a disabled one. Beside the service, a
/// handle on its retry budget, when it retries (for `outrigger explain`).
pub fn policies<S>(
    cfg: &config::Upstream,
    route: Option<&config::Route>,
    shared: &Shared,
    metrics: &Metrics,
    inner: S,
) -> (
    impl tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = ProxyError,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static,
    Option<RetryBudget>,
)
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (name, label) = (&shared.name, route.map_or(config::DEFAULT_ROUTE, |r| &r.name));
    let cfg = &route.map_or_else(|| cfg.clone(), |r| r.over(cfg));
    let idempotent = route.is_some_and(|r| r.idempotent);
    // a policy in shadow mode counts what it would refuse, and refuses nothing
    let shadow = |mode, policy, decision| {
        (mode == config::Mode::Shadow).then(|| {
            let would = metrics.shadow_decisions(name, label, policy, decision);
            Shadow::new(would, (name, label), policy, decision)
        })
    };
    let retry = cfg
        .retry
        .as_ref()
        .map(|r| RetryLayer::new(r, cfg.timeouts.request.get(), metrics.retries(name)))
        .map(|r| r.idempotent(idempotent).seeded(shared.seed))
        .map(|r| r.hedge(cfg.hedge.as_ref().map(|h| (h, metrics.hedges(name, label)))));
    let budget = retry.as_ref().map(RetryLayer::budget);
    let service = ServiceBuilder::new()
        .layer(MetricsLayer::new(metrics.route(name, label))) // counts what the client got
        .layer(GrpcResponsesLayer::new(metrics.grpc_responses(name, label))) // gRPC statuses
        .option_layer(cfg.fault.map(|f| FaultLayer::new(name, f, metrics.faults(name, label)))) // injected delays, aborts
        .option_layer(cfg.rate_limit.map(|r| {
            let shadow = shadow(r.mode, "rate_limit", "rate-limited");
            RateLimitLayer::new(name, &r, metrics.rate_limited(name)).shadow(shadow)
        })) // 429 rate-limited
        .option_layer(cfg.concurrency_limit.map(|c| {
            let shadow = shadow(c.mode, "concurrency_limit", "overloaded");
            ConcurrencyLimitLayer::new(name, c.max).shadow(shadow)
        })) // 503 overloaded
        .option_layer(shared.breaker.as_ref().map(|b| {
            let mode = cfg.circuit_breaker.map_or(config::Mode::Enforce, |c| c.mode);
            b.shadow(shadow(mode, "circuit_breaker", "circuit-open"))
        })) // 503 circuit-open, one per upstream
        .layer(DeadlineLayer::whole_request(cfg.timeouts.request.get())) // 504 timeout, the call's deadline
        .option_layer(retry) // backoff within the request timeout, budget, replay cap; hedges
        .option_layer(cfg.timeouts.per_try.map(|t| DeadlineLayer::new(t.get()))) // one attempt
        .service(inner);
    (service, budget)
}

/// The outbound listener's routing table: the upstreams by name, the messaging API for a local
/// authority, and the tracer that continues each request's trace.
pub fn routes(
    upstreams: &[BuiltUpstream],
    metrics: &Metrics,
    messaging: &Arc<Messaging>,
    access_log: bool,
) -> Routes {
    let by_name: HashMap<Box<str>, Routed<UpstreamService>> =
        upstreams.iter().map(|u| (Box::from(&*u.name), u.service.clone())).collect();
    Routes::new(by_name, metrics.upstream(NO_UPSTREAM))
        .with_local_api(publish::api(messaging.clone()))
        .with_tracer(messaging.tracer().clone())
        .with_access_log(access_log)
}
