//! Which upstream does a request name? Its authority (absolute-form or HTTP/2 `:authority`,
//! else the `Host` header) must be a configured upstream's name, or the request gets 404
//! `unknown-upstream` and nothing is forwarded: Outrigger is never an open proxy.
//! `/v1/…` with a local authority (`localhost`, `127.0.0.1`, `[::1]`) is the messaging API.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use hyper::body::Incoming;
use tower::ServiceExt;
use tower::util::Oneshot;

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::connect::close_if_refused;
use crate::http::forward::RequestTrace;
use crate::http::guard::REJECTED_HEADER;
use crate::http::respond::error_response;
use crate::messaging::{Messaging, publish};
use crate::stack::UpstreamService;
use crate::telemetry::metrics::UpstreamMetrics;
use crate::telemetry::trace::{Kind, Span, Tracer};

/// Every upstream by name, plus the metrics of requests that matched none.
#[derive(Debug)]
pub struct Routes {
    by_name: HashMap<Box<str>, UpstreamService>,
    unmatched: UpstreamMetrics,
    messaging: Option<Arc<Messaging>>,
    tracer: Tracer,
}

impl Routes {
    pub fn new(by_name: HashMap<Box<str>, UpstreamService>, unmatched: UpstreamMetrics) -> Self {
        Self { by_name, unmatched, messaging: None, tracer: Tracer::disabled() }
    }

    /// Continues (or starts) a trace for every request forwarded, and records its span.
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    /// Serves `/v1/…` for a local authority from `messaging`.
    pub fn with_messaging(mut self, messaging: Arc<Messaging>) -> Self {
        self.messaging = Some(messaging);
        self
    }

    /// The messaging API, when `req` is for it: a `/v1/` path and a local authority.
    fn messaging_for<B>(&self, req: &Request<B>) -> Option<&Arc<Messaging>> {
        let messaging = self.messaging.as_ref()?;
        let local = matches!(request_host(req), Some("localhost" | "127.0.0.1" | "[::1]"));
        (local && req.uri().path().starts_with("/v1/")).then_some(messaging)
    }

    /// The upstream named `host`, any letter case.
    pub fn find(&self, host: &str) -> Option<&UpstreamService> {
        // names are lowercase (config validates them); most clients send lowercase hosts
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_name.get(host.to_ascii_lowercase().as_str())
        } else {
            self.by_name.get(host)
        }
    }
}

/// The routing table in force: a reload replaces it whole, and each request reads the one
/// current when it arrives (requests in flight finish on the table they started with).
#[derive(Debug)]
pub struct RouteTable {
    current: RwLock<Arc<Routes>>,
}

impl RouteTable {
    pub fn new(routes: Routes) -> Arc<Self> {
        Arc::new(Self { current: RwLock::new(Arc::new(routes)) })
    }

    pub fn current(&self) -> Arc<Routes> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, routes: Routes) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routes);
    }
}

/// The hyper service of one listener: the outbound port routes by authority, a dedicated
/// `upstreams.NAME.listen` port sends everything to its upstream.
#[derive(Debug, Clone)]
pub enum Route {
    ByAuthority(Arc<RouteTable>),
    Dedicated { name: Arc<str>, table: Arc<RouteTable> },
}

impl Route {
    fn select(&self, routes: &Routes, req: &Request<Body>) -> Result<UpstreamService, ProxyError> {
        let host = match self {
            Self::Dedicated { name, .. } => name,
            Self::ByAuthority(_) => request_host(req).unwrap_or_default(),
        };
        routes
            .find(host)
            .cloned()
            .ok_or_else(|| ProxyError::UnknownUpstream { authority: host.into() })
    }

    fn table(&self) -> &RouteTable {
        match self {
            Self::ByAuthority(table) | Self::Dedicated { table, .. } => table,
        }
    }
}

/// The host a request names, without its port.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.host());
    }
    let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
    Some(match host.rfind(':') {
        // `[::1]:80` and `name:80` lose the port; a bare `[::1]` keeps its brackets
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    })
}

/// A request the framing guard refused: the reason travels in the synthetic head.
fn rejected(value: &http::HeaderValue) -> ProxyError {
    let text = value.to_str().unwrap_or("400 malformed request");
    let (status, reason) = text.split_once(' ').unwrap_or(("400", text));
    let reason = reason.into();
    if status == "431" {
        ProxyError::HeadersTooLarge { reason }
    } else {
        ProxyError::BadRequest { reason }
    }
}

impl hyper::service::Service<Request<Incoming>> for Route {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RouteFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let req = req.map(Body::from);
        let connect = req.method() == Method::CONNECT;
        let routes = self.table().current();
        let answer = match req.headers().get(REJECTED_HEADER) {
            Some(value) => Err(rejected(value)),
            None => {
                if let Self::ByAuthority(_) = self
                    && let Some(messaging) = routes.messaging_for(&req)
                {
                    let inner = Box::pin(publish::handle(messaging.clone(), req));
                    return RouteFuture::Local { inner };
                }
                self.select(&routes, &req)
            }
        };
        match answer {
            Ok(upstream) => {
                let mut req = req;
                let mut span =
                    routes.tracer.start(req.headers().get("traceparent"), "outbound", Kind::Client);
                // the upstream continues the trace under this span
                Tracer::inject(&span, &mut req);
                if span.recording() {
                    span.text("http.request.method", req.method().as_str());
                    span.text("server.address", request_host(&req).unwrap_or_default());
                    span.text("url.path", req.uri().path());
                    // each attempt records its own span under this one
                    let parent = span.context.header();
                    req.extensions_mut()
                        .insert(RequestTrace { tracer: routes.tracer.clone(), parent });
                }
                let trace = span.recording().then(|| Box::new((routes.tracer.clone(), span)));
                RouteFuture::Upstream { inner: upstream.oneshot(req), connect, trace }
            }
            Err(err) => {
                routes.unmatched.record(err.status().as_u16(), std::time::Duration::ZERO);
                let mut response = error_response(&err);
                if connect {
                    close_if_refused(&mut response);
                }
                RouteFuture::Ready { response: Some(response) }
            }
        }
    }
}

pin_project_lite::pin_project! {
    #[project = RouteFutureProj]
    #[allow(missing_debug_implementations)]
    pub enum RouteFuture {
        Ready { response: Option<Response<Body>> },
        Upstream {
            #[pin] inner: Oneshot<UpstreamService, Request<Body>>,
            connect: bool,
            // only while a span is recorded: no allocation otherwise
            trace: Option<Box<(Tracer, Span)>>,
        },
        Local { inner: Pin<Box<dyn Future<Output = Response<Body>> + Send>> },
    }
}

impl Future for RouteFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RouteFutureProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            RouteFutureProj::Upstream { inner, connect, trace } => inner.poll(cx).map(|result| {
                let mut response = result.unwrap_or_else(|err| error_response(&err));
                if *connect {
                    close_if_refused(&mut response);
                }
                if let Some(recorded) = trace.take() {
                    let (tracer, mut span) = *recorded;
                    span.int("http.response.status_code", i64::from(response.status().as_u16()));
                    if let Some(kind) = response.headers().get(crate::http::respond::ERROR_HEADER) {
                        span.text("outrigger.error", kind.to_str().unwrap_or_default());
                    }
                    if response.status().is_server_error() {
                        span.failed();
                    }
                    tracer.end(span);
                }
                Ok(response)
            }),
            RouteFutureProj::Local { inner } => inner.as_mut().poll(cx).map(Ok),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(uri: &str, host: Option<&str>) -> Option<String> {
        let mut req = Request::builder().uri(uri);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        request_host(&req.body(()).unwrap()).map(str::to_owned)
    }

    #[test]
    fn the_authority_comes_from_the_target_then_the_host_header() {
        assert_eq!(host_of("http://payments/charge", Some("other")).as_deref(), Some("payments"));
        assert_eq!(host_of("/charge", Some("payments:8080")).as_deref(), Some("payments"));
        assert_eq!(host_of("/charge", Some("payments")).as_deref(), Some("payments"));
        assert_eq!(host_of("/charge", Some("[::1]:4140")).as_deref(), Some("[::1]"));
        assert_eq!(host_of("/charge", None), None);
    }

    #[test]
    fn a_rejection_keeps_its_status_and_reason() {
        let err = rejected(&http::HeaderValue::from_static("431 more than 100 request headers"));
        assert_eq!(err.status().as_u16(), 431);
        assert_eq!(err.to_string(), "request headers too large: more than 100 request headers");
    }
}
