//! Which upstream does a request name? Its authority (absolute-form or HTTP/2 `:authority`,
//! else the `Host` header) must be a configured upstream's name, or the request gets 404
//! `unknown-upstream` and nothing is forwarded: Outrigger is never an open proxy.
//! `/v1/…` with a local authority (`localhost`, `127.0.0.1`, `[::1]`) goes to the local API
//! service it is handed (the messaging API, assembled in `stack.rs`); this file does not know
//! what serves it.
//! Every answer passes here on its way out: Outrigger's own answers to a gRPC call become gRPC
//! trailers-only answers here (`grpc::answer_as_grpc`), so no layer needs to know.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use http::header::{HOST, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use tower::ServiceExt;
use tower::util::{BoxCloneSyncService, Oneshot};

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::connect::close_if_refused;
use crate::http::forward::RequestTrace;
use crate::http::grpc;
use crate::http::guard::refusal;
use crate::http::respond::error_response;
use crate::http::route_match::Routed;
use crate::stack::UpstreamService;
use crate::telemetry::log::call_span;
use crate::telemetry::metrics::UpstreamMetrics;
use crate::telemetry::trace::{Kind, OpenSpan, Span, Tracer};

/// What serves `/v1/…` for a local authority: the sidecar's own API to the app.
pub type LocalApi = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Every upstream by name, plus the metrics of requests that matched none.
#[derive(Debug)]
pub struct Routes {
    by_name: HashMap<Box<str>, Routed<UpstreamService>>,
    unmatched: UpstreamMetrics,
    local_api: Option<LocalApi>,
    tracer: Tracer,
    access_log: bool,
}

impl Routes {
    pub fn new(
        by_name: HashMap<Box<str>, Routed<UpstreamService>>,
        unmatched: UpstreamMetrics,
    ) -> Self {
        let tracer = Tracer::disabled();
        Self { by_name, unmatched, local_api: None, tracer, access_log: false }
    }

    /// Logs one line per proxied call (`telemetry.access_log`).
    pub fn with_access_log(mut self, on: bool) -> Self {
        self.access_log = on;
        self
    }

    /// Continues (or starts) a trace for every request forwarded, and records its span.
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    /// Serves `/v1/…` for a local authority with `api`.
    pub fn with_local_api(mut self, api: LocalApi) -> Self {
        self.local_api = Some(api);
        self
    }

    /// The local API, when `req` is for it: a `/v1/` path and a local authority.
    fn local_api_for<B>(&self, req: &Request<B>) -> Option<&LocalApi> {
        let api = self.local_api.as_ref()?;
        // the path first: most requests are not for the API, and their authority is read
        // (and checked) once, when they are routed
        let local = || matches!(request_host(req), Ok(Some("localhost" | "127.0.0.1" | "[::1]")));
        (req.uri().path().starts_with("/v1/") && local()).then_some(api)
    }

    /// The upstream named `host`, any letter case: its name as configured, and its routes.
    pub fn find(&self, host: &str) -> Option<(&str, &Routed<UpstreamService>)> {
        // names are lowercase (config validates them); most clients send lowercase hosts
        let found = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_name.get_key_value(host.to_ascii_lowercase().as_str())
        } else {
            self.by_name.get_key_value(host)
        };
        found.map(|(name, routed)| (&**name, routed))
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
    /// The upstream the request names, then its route: (upstream, route, the route's stack).
    fn select<'a>(
        &self,
        routes: &'a Routes,
        req: &Request<Body>,
    ) -> Result<(&'a str, &'a str, UpstreamService), ProxyError> {
        let host = match self {
            Self::Dedicated { name, .. } => name,
            Self::ByAuthority(_) => match request_host(req) {
                Ok(host) => host.unwrap_or_default(),
                Err(authority) => {
                    let reason = format!("the authority {authority:?} is not host[:port]");
                    return Err(ProxyError::BadRequest { reason: reason.into() });
                }
            },
        };
        let Some((name, upstream)) = routes.find(host) else {
            return Err(ProxyError::UnknownUpstream { authority: host.into() });
        };
        let (route, stack) = upstream.choose(req);
        Ok((name, route, stack.clone()))
    }

    fn table(&self) -> &RouteTable {
        match self {
            Self::ByAuthority(table) | Self::Dedicated { table, .. } => table,
        }
    }
}

/// The host a request names, without its port: `Ok(None)` when it names none, `Err` with the
/// authority as sent when that is not `host[:port]` (a port past 65535, a space or an `@`).
fn request_host<B>(req: &Request<B>) -> Result<Option<&str>, &str> {
    let authority = match req.uri().authority() {
        Some(authority) => authority.as_str(),
        None => match req.headers().get(http::header::HOST) {
            Some(host) => host.to_str().map_err(|_| "(not text)")?,
            None => return Ok(None),
        },
    };
    host_without_port(authority).map(Some).ok_or(authority)
}

/// `name`, `name:port`, `[v6]` or `[v6]:port` without the port, when every part is well formed.
pub(crate) fn host_without_port(authority: &str) -> Option<&str> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let end = rest.find(']')? + 2;
            let literal = &authority[1..end - 1];
            let ok = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
            if literal.is_empty() || !literal.bytes().all(ok) {
                return None;
            }
            (&authority[..end], &authority[end..])
        }
        None => {
            let (host, port) = match authority.rfind(':') {
                Some(i) => (&authority[..i], &authority[i..]),
                None => (authority, ""),
            };
            let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
            if host.is_empty() || !host.bytes().all(ok) {
                return None;
            }
            (host, port)
        }
    };
    // the port may be empty (`name:`, RFC 3986) but never past 65535
    let fits = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => {
            digits.len() <= 5
                && digits.bytes().all(|b| b.is_ascii_digit())
                && digits.parse::<u32>().map_or(digits.is_empty(), |n| n <= 65535)
        }
    };
    fits.then_some(host)
}

/// One `Host`, and the one the target names: two `Host` headers are refused (RFC 9112 3.2), and
/// when the target carries an authority (absolute-form, or HTTP/2's `:authority`) it wins over
/// `Host`, which is rewritten to it (RFC 9112 3.2.2, RFC 9113 8.3.1), so the upstream is told the
/// name the request was routed by.
fn settle_host<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let sent = hosts.next();
    if hosts.next().is_some() {
        let reason = "more than one Host header".into();
        return Err(ProxyError::BadRequest { reason });
    }
    let Some(authority) = req.uri().authority() else { return Ok(()) };
    if sent.is_some_and(|host| host.as_bytes() != authority.as_str().as_bytes()) {
        let target = HeaderValue::from_str(authority.as_str())
            .expect("a parsed authority is a valid header value");
        req.headers_mut().insert(HOST, target);
    }
    Ok(())
}

impl hyper::service::Service<Request<Incoming>> for Route {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RouteFuture;

    /// A request hyper's server read (HTTP/2, and HTTP/1 past what our own server takes).
    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.route(req.map(Body::client))
    }
}

impl hyper::service::Service<Request<Body>> for Route {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RouteFuture;

    /// A request our own HTTP/1 server read (`h1/server.rs`).
    fn call(&self, req: Request<Body>) -> Self::Future {
        self.route(req)
    }
}

impl Route {
    fn route(&self, mut req: Request<Body>) -> RouteFuture {
        let connect = req.method() == Method::CONNECT;
        // every answer of ours to a gRPC call becomes a gRPC answer, here and only here
        let grpc = grpc::is_grpc(req.headers());
        let routes = self.table().current();
        let answer = match refusal(&req).map_or_else(|| settle_host(&mut req), Err) {
            Err(err) => Err(err),
            Ok(()) => {
                if let Self::ByAuthority(_) = self
                    && let Some(api) = routes.local_api_for(&req)
                {
                    return RouteFuture::Local { inner: api.clone().oneshot(req) };
                }
                self.select(&routes, &req)
            }
        };
        match answer {
            Ok((host, route, upstream)) => {
                tracing::debug!(upstream = host, route, "request routed");
                let from_app = req.headers().get("traceparent");
                let traced_by_app = from_app.is_some();
                let name = crate::telemetry::trace::method_name(req.method());
                let mut span = routes.tracer.start(from_app, name, Kind::Client);
                // the upstream continues the trace under this span
                Tracer::inject(&span, &mut req);
                if span.recording() {
                    client_attributes(&mut span, &req);
                    span.text("outrigger.route", route);
                    // each attempt records its own span under this one
                    let parent = span.context.header();
                    req.extensions_mut()
                        .insert(RequestTrace { tracer: routes.tracer.clone(), parent });
                }
                // a traced call (the app sent a trace, or it is sampled): its log lines carry it
                let traced = span.recording() || traced_by_app;
                let log = traced.then(|| call_span(&span.context.trace_id, &span.context.span_id));
                let access = routes.access_log.then(|| {
                    Box::new(Access {
                        upstream: host.into(),
                        route: route.into(),
                        method: req.method().clone(),
                        path: req.uri().path().into(),
                        trace_id: span.context.trace_id,
                        started: tokio::time::Instant::now(),
                        logged: false,
                        call: log.clone(),
                    })
                });
                let trace =
                    span.recording().then(|| Box::new(OpenSpan::new(routes.tracer.clone(), span)));
                let inner = upstream.oneshot(req);
                RouteFuture::Upstream { inner, connect, trace, rpc: grpc, log, access }
            }
            Err(err) => {
                routes.unmatched.record(err.status().as_u16(), std::time::Duration::ZERO);
                routes.unmatched.local(err.kind());
                let mut response = error_response(&err);
                if grpc {
                    grpc::answer_as_grpc(&mut response);
                }
                if connect {
                    close_if_refused(&mut response);
                }
                RouteFuture::Ready { response: Some(response) }
            }
        }
    }
}

/// The OpenTelemetry HTTP client attributes of a call, from its request: the method, the full
/// URL (without credentials), the server's host and port.
fn client_attributes(span: &mut Span, req: &Request<Body>) {
    use crate::telemetry::trace::method_attribute;
    let method = method_attribute(req.method());
    span.text("http.request.method", method);
    if method == "_OTHER" {
        span.text("http.request.method_original", req.method().as_str());
    }
    // the authority as the app wrote it (with its port), from the URI or the Host header
    let authority = match req.uri().authority() {
        Some(authority) => authority.as_str().to_owned(),
        None => req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_owned(),
    };
    let host = host_without_port(&authority).unwrap_or(&authority);
    let port = authority[host.len()..].strip_prefix(':').and_then(|p| p.parse::<u16>().ok());
    let scheme = req.uri().scheme_str().unwrap_or("http");
    // no query string: it may carry tokens, and the conventions say to redact them
    span.text("url.full", format!("{scheme}://{authority}{}", req.uri().path()));
    span.text("server.address", host.trim_start_matches('[').trim_end_matches(']'));
    let port = port.unwrap_or(if scheme == "https" { 443 } else { 80 });
    span.int("server.port", i64::from(port));
}

/// `error.type`, few values: the `outrigger-error` kind when Outrigger answered, else the
/// status code of an upstream's 4xx or 5xx (a client span's error, by the conventions).
pub(crate) fn error_type(span: &mut Span, response: &Response<Body>) {
    if let Some(kind) = response.extensions().get::<crate::error::LocalKind>() {
        span.text("error.type", kind.0);
    } else if response.status().as_u16() >= 400 {
        span.text("error.type", response.status().as_str().to_owned());
    }
}

/// A proxied call, for its access log line. Dropped before its answer (the app went away), it
/// writes the line of a cancelled call: status 499, kind `cancelled`, attempts 0 (unknown).
#[derive(Debug)]
pub struct Access {
    upstream: Box<str>,
    route: Box<str>,
    method: Method,
    path: Box<str>,
    trace_id: [u8; 16],
    started: tokio::time::Instant,
    logged: bool,
    /// The traced call's log span: a line written from the drop is inside it too.
    call: Option<tracing::Span>,
}

impl Access {
    /// The call's line: who, what, the answer (and whose: `kind` when Outrigger answered),
    /// attempts, time to the response head, trace.
    fn log(&mut self, response: &Response<Body>) {
        let kind = response.extensions().get::<crate::error::LocalKind>().map(|k| k.0);
        let attempts = response
            .headers()
            .get(crate::policy::retry::ATTEMPTS_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(1);
        self.line(response.status().as_u16(), kind.unwrap_or(""), attempts);
    }

    fn line(&mut self, status: u16, kind: &str, attempts: u64) {
        self.logged = true;
        tracing::info!(
            target: "outrigger::access",
            upstream = &*self.upstream,
            route = &*self.route,
            method = self.method.as_str(),
            path = &*self.path,
            status,
            kind,
            attempts,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            trace_id = %crate::telemetry::log::Hex(&self.trace_id),
            "access"
        );
    }
}

impl Drop for Access {
    fn drop(&mut self) {
        if !self.logged {
            let call = self.call.take();
            let _inside = call.as_ref().map(tracing::Span::enter);
            self.line(crate::error::CLIENT_CLOSED, crate::error::CANCELLED, 0);
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
            trace: Option<Box<OpenSpan>>,
            // a gRPC call: our own answers to it become gRPC answers
            rpc: bool,
            // a traced call: entered while polled, so its log lines carry its ids
            log: Option<tracing::Span>,
            // `telemetry.access_log`: what its line says besides the answer
            access: Option<Box<Access>>,
        },
        Local { #[pin] inner: Oneshot<LocalApi, Request<Body>> },
    }
}

impl Future for RouteFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            RouteFutureProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            RouteFutureProj::Upstream { inner, connect, trace, rpc, log, access } => {
                let _entered = log.as_ref().map(tracing::Span::enter);
                inner.poll(cx).map(|res| {
                    let mut response = res.unwrap_or_else(|err| error_response(&err));
                    if *rpc {
                        // ours carry a `LocalAnswer`, from any layer; an upstream's answer passes
                        grpc::answer_as_grpc(&mut response);
                    }
                    if *connect {
                        close_if_refused(&mut response);
                    }
                    if let Some(mut recorded) = trace.take() {
                        let span = recorded.span();
                        span.int(
                            "http.response.status_code",
                            i64::from(response.status().as_u16()),
                        );
                        error_type(span, &response);
                        let grpc_failed = *rpc && grpc_status(span, &response);
                        if response.status().is_server_error() || grpc_failed {
                            span.failed();
                        }
                        recorded.end();
                    }
                    if let Some(mut access) = access.take() {
                        access.log(&response);
                    }
                    Ok(response)
                })
            }
            RouteFutureProj::Local { inner } => inner.poll(cx),
        }
    }
}

/// Records a gRPC call's status on its span, when it is in the head; whether it is a failure.
fn grpc_status(span: &mut Span, response: &Response<Body>) -> bool {
    let Some(status) = response.headers().get(grpc::STATUS_HEADER).map(grpc::parse_status) else {
        return false;
    };
    span.int("rpc.grpc.status_code", i64::from(status.code()));
    grpc::is_failure(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(uri: &str, host: Option<&str>) -> Option<String> {
        let mut req = Request::builder().uri(uri);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        request_host(&req.body(()).unwrap()).ok().flatten().map(str::to_owned)
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
    fn a_malformed_authority_is_an_error_not_a_host() {
        for good in
            ["payments", "payments:", "payments:65535", "a-b.c_d:1", "[::1]", "[fe80::1]:80"]
        {
            assert!(host_without_port(good).is_some(), "{good}");
        }
        for bad in [
            "payments:65536",
            "payments:99999",
            "payments:8o",
            "pay ments",
            "user@payments",
            "",
            ":80",
            "[::1",
            "[]:80",
            "[::1]x",
            "[::1]:123456",
        ] {
            assert_eq!(host_without_port(bad), None, "{bad}");
        }
        let mut req = Request::get("/charge").header("host", "payments:99999").body(()).unwrap();
        assert_eq!(request_host(&req), Err("payments:99999"));
        req.headers_mut().remove("host");
        assert_eq!(request_host(&req), Ok(None));
    }

    #[test]
    fn a_rejection_keeps_its_status_and_reason() {
        let req = Request::get("/")
            .header(crate::http::guard::REJECTED_HEADER, "431 more than 100 request headers")
            .body(())
            .unwrap();
        let err = refusal(&req).expect("a refusal");
        assert_eq!(err.status().as_u16(), 431);
        assert_eq!(err.to_string(), "request headers too large: more than 100 request headers");
    }

    #[test]
    fn the_targets_authority_wins_over_host_and_two_hosts_are_refused() {
        let mut req =
            Request::get("http://payments/abs").header("host", "evil.example").body(()).unwrap();
        settle_host(&mut req).unwrap();
        assert_eq!(req.headers()["host"], "payments");

        let mut origin = Request::get("/x").header("host", "payments:8080").body(()).unwrap();
        settle_host(&mut origin).unwrap();
        assert_eq!(origin.headers()["host"], "payments:8080");

        let mut two =
            Request::get("/x").header("host", "payments").header("host", "evil").body(()).unwrap();
        let err = settle_host(&mut two).unwrap_err();
        assert_eq!((err.status().as_u16(), err.kind()), (400, "bad-request"));
    }
}
