//! Forwarding one request to one endpoint of its upstream, over a pooled connection.
//!
//! The pool picks an endpoint of the current healthy set (none: 503 `no-healthy-endpoints`),
//! avoiding those a retry already tried when it can; the request keeps its method, path, query and `Host`, loses its
//! hop-by-hop headers (RFC 9110 section 7.6.1) and streams to the endpoint. hyper's errors are
//! classified here, where they enter: could not connect -> 502 `connect-failed`, anything after
//! -> 502 `upstream-reset`. A `101 Switching Protocols` answer (WebSocket) becomes a byte tunnel.
//! A gRPC call's answer is classified by its `grpc-status` here too (`grpc/`): in the head it is
//! the endpoint's outcome at once, in trailers when they pass.
//! A TLS upstream gets its own pools over `tls::TlsConnector`; a CONNECT becomes a tunnel to the
//! picked endpoint (`connect.rs`).

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{self, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use outrigger_config as config;
use outrigger_discovery::{Endpoint, Picked, Pool};

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::body::BodyError;
use crate::http::connect::{Opening, Tunnels};
use crate::http::grpc::{self, Head, watch::Watch};
use crate::http::h1;
use crate::http::tls::{Origination, TlsConnector};
use crate::policy::timeout::CutAt;
use crate::telemetry::trace::{Kind, OpenSpan, Tracer};

/// The innermost service of an upstream: pick an endpoint, send, classify the outcome.
#[derive(Debug, Clone)]
pub struct Forward {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    upstream: Arc<str>,
    pool: Pool,
    protocol: config::Protocol,
    /// Our own HTTP/1 client, for a plain (not TLS) upstream: every HTTP/1 request but
    /// upgrades and gRPC calls, which `http1` (hyper) carries.
    own: Option<h1::Client>,
    http1: UpstreamClient,
    http2: UpstreamClient,
    tunnels: Tunnels,
}

impl Forward {
    pub fn new(pool: Pool, cfg: &config::Upstream) -> Self {
        let tls = cfg.tls.as_ref().map(|tls| Origination::new(pool.upstream(), tls));
        Self {
            inner: Arc::new(Inner {
                upstream: pool.upstream().clone(),
                pool,
                protocol: cfg.protocol,
                own: tls.is_none().then_some(h1::Client {
                    connect_timeout: cfg.timeouts.connect.get(),
                    idle_timeout: cfg.timeouts.idle.get(),
                }),
                http1: client(&cfg.timeouts, tls.as_ref(), false),
                http2: client(&cfg.timeouts, tls.as_ref(), true),
                tunnels: Tunnels::new(&cfg.timeouts),
            }),
        }
    }
}

/// How many endpoints a request remembers having tried; later attempts may repeat one.
const TRIED_MAX: usize = 8;

/// The endpoints the attempts of one request went to, so that a retry goes elsewhere when
/// another endpoint is available. The retry layer owns it and lends it to the forwarder for the
/// moment an attempt is made ([`Tried::lend`]): no allocation, nothing in the request.
#[derive(Debug, Clone, Copy)]
pub struct Tried {
    addrs: [SocketAddr; TRIED_MAX],
    len: usize,
}

impl Default for Tried {
    fn default() -> Self {
        Self { addrs: [SocketAddr::from(([0, 0, 0, 0], 0)); TRIED_MAX], len: 0 }
    }
}

tokio::task_local! {
    static TRIED: RefCell<Tried>;
}

impl Tried {
    /// Runs `call` (which reaches [`Forward::call`] synchronously) with these endpoints to
    /// avoid, and keeps the one it picks.
    pub fn lend<R>(&mut self, call: impl FnOnce() -> R) -> R {
        TRIED.sync_scope(RefCell::new(*self), || {
            let out = call();
            *self = TRIED.with(|tried| *tried.borrow());
            out
        })
    }

    fn as_slice(&self) -> &[SocketAddr] {
        &self.addrs[..self.len]
    }

    fn push(&mut self, addr: SocketAddr) {
        if self.len < TRIED_MAX {
            self.addrs[self.len] = addr;
            self.len += 1;
        }
    }

    /// Picks an endpoint, avoiding those tried when the retry layer lent its list.
    fn pick(pool: &Pool) -> Option<Picked> {
        TRIED
            .try_with(|tried| {
                let mut tried = tried.borrow_mut();
                let picked = pool.pick(tried.as_slice())?;
                tried.push(picked.endpoint().addr);
                Some(picked)
            })
            .unwrap_or_else(|_| pool.pick(&[]))
    }
}

/// One pool of an upstream: plain HTTP, or HTTPS through the TLS connector. Two types, so the
/// plain path keeps hyper's connector as it is, with no TLS machinery on it.
#[derive(Debug)]
pub(crate) enum UpstreamClient {
    Plain(Client<HttpConnector, Body>),
    Tls(Client<TlsConnector, Body>),
}

impl UpstreamClient {
    pub(crate) fn request(&self, req: Request<Body>) -> legacy::ResponseFuture {
        match self {
            Self::Plain(client) => client.request(req),
            Self::Tls(client) => client.request(req),
        }
    }

    pub(crate) fn scheme(&self) -> Scheme {
        match self {
            Self::Plain(_) => Scheme::HTTP,
            Self::Tls(_) => Scheme::HTTPS,
        }
    }
}

/// A pooled client: connections are kept per endpoint (the pool is keyed by the URI's
/// scheme and authority, which is the endpoint's address) and closed after `timeouts.idle`
/// unused.
pub(crate) fn client(
    timeouts: &config::Timeouts,
    tls: Option<&Origination>,
    http2: bool,
) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeouts.connect.get()));
    connector.set_nodelay(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.idle.get())
        .http2_only(http2);
    match tls {
        None => UpstreamClient::Plain(builder.build(connector)),
        Some(tls) => UpstreamClient::Tls(builder.build(tls.connector(
            connector,
            timeouts.connect.get(),
            http2,
        ))),
    }
}

impl tower::Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let inner = &self.inner;
        let picked = Tried::pick(&inner.pool);
        let Some(picked) = picked else {
            let err = ProxyError::NoHealthyEndpoints { upstream: inner.upstream.clone() };
            return ResponseFuture::failed(err);
        };
        if req.method() == Method::CONNECT {
            let opening = inner.tunnels.open(inner.upstream.clone(), req, picked.endpoint());
            return ResponseFuture { state: State::Tunnel { opening, picked: Some(picked) } };
        }
        let http2 = match inner.protocol {
            config::Protocol::Auto => req.version() == Version::HTTP_2,
            config::Protocol::Http1 => false,
            config::Protocol::Http2 => true,
        };
        let client = if http2 { &inner.http2 } else { &inner.http1 };
        let grpc = grpc::is_grpc(req.headers());
        let mut req = req;
        let trace = attempt_span(&mut req, picked.endpoint());
        let (req, upgrade) = prepare(req, picked.endpoint(), client.scheme(), http2);
        let fut = match &inner.own {
            Some(own) if !http2 && !grpc && upgrade.is_none() => {
                let idle = picked.attached::<h1::pool::Idle>();
                Sending::Own(Some(own.send(req, picked.endpoint(), idle)))
            }
            _ => Sending::Hyper(client.request(req)),
        };
        ResponseFuture {
            state: State::Sent {
                fut,
                upstream: inner.upstream.clone(),
                upgrade,
                picked: Some(picked),
                trace,
                grpc,
            },
        }
    }
}

/// The request's trace, as the route recorded it: each attempt is a span under the call's,
/// and the upstream continues the trace under the attempt.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    pub tracer: Tracer,
    pub parent: HeaderValue,
}

/// When the request's trace is recorded: a span for this attempt at `endpoint`, whose context
/// the upstream receives.
fn attempt_span(req: &mut Request<Body>, endpoint: &Endpoint) -> Option<Box<OpenSpan>> {
    let trace = req.extensions().get::<RequestTrace>()?;
    let tracer = trace.tracer.clone();
    let name = crate::telemetry::trace::method_name(req.method());
    let mut span = tracer.start(Some(&trace.parent), name, Kind::Client);
    span.text("http.request.method", crate::telemetry::trace::method_attribute(req.method()));
    let ip = endpoint.addr.ip().to_string();
    span.text("server.address", ip.clone());
    span.int("server.port", i64::from(endpoint.addr.port()));
    span.text("network.peer.address", ip);
    span.int("network.peer.port", i64::from(endpoint.addr.port()));
    if let Some(info) = req.extensions().get::<crate::policy::retry::AttemptInfo>() {
        if info.number > 1 {
            span.int("http.request.resend_count", i64::from(info.number - 1));
        }
        span.int("outrigger.attempt", i64::from(info.number));
        span.int("outrigger.backoff_ms", info.backoff.as_millis() as i64);
    }
    Tracer::inject(&span, req);
    let cut_at = req.extensions().get::<CutAt>().map(|cut| cut.0);
    Some(Box::new(OpenSpan::new(tracer, span).cut_at(cut_at)))
}

/// Rewrites the request for `endpoint`; returns the client's side of an upgrade, if asked.
fn prepare(
    mut req: Request<Body>,
    endpoint: &Endpoint,
    scheme: Scheme,
    http2: bool,
) -> (Request<Body>, Option<OnUpgrade>) {
    let upgrade = (!http2 && is_upgrade(&req)).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if !http2 && !parts.headers.contains_key(header::HOST) {
        // an HTTP/2 client's :authority becomes the HTTP/1 Host: the upstream's logical name
        if let Some(authority) = parts.uri.authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, host);
        }
    } else if http2 {
        // HTTP/2 carries the authority as :authority (the endpoint's address); a Host header
        // beside it is redundant and some servers refuse the pair
        parts.headers.remove(header::HOST);
    }
    strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    if !http2
        && matches!(parts.method, Method::GET | Method::HEAD)
        && !http_body::Body::is_end_stream(&body)
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        // hyper's client sends a GET or HEAD body of unknown length as no body at all; a body
        // the client sent is forwarded, never silently dropped
        parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    let path =
        parts.uri.into_parts().path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(scheme);
    uri.authority = Some(endpoint.authority.clone());
    uri.path_and_query = Some(path);
    parts.uri = Uri::from_parts(uri).expect("scheme, authority and path make a URI");
    parts.version = if http2 { Version::HTTP_2 } else { Version::HTTP_11 };
    (Request::from_parts(parts, body), upgrade)
}

/// An HTTP/1.1 protocol upgrade (WebSocket and the like), but not `h2c`: HTTP/2 is spoken
/// with prior knowledge on our ports, and an `Upgrade: h2c` is dropped like any hop header.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"h2c"))
        && has_token(req.headers(), header::CONNECTION, "upgrade")
}

/// Whether a comma-separated field `name` lists `token` (in any case).
pub(crate) fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The headers that describe one connection, not the message (RFC 9110 7.6.1).
pub(crate) const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// What a `Connection` field's value asks for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionOptions {
    pub(crate) close: bool,
    pub(crate) keep_alive: bool,
    /// It names other fields, which are hop-by-hop too (`Connection: x-hop`).
    pub(crate) names_fields: bool,
}

impl ConnectionOptions {
    /// Adds what one `Connection` field value says.
    pub(crate) fn read(&mut self, value: &[u8]) {
        for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            let close = token.eq_ignore_ascii_case(b"close");
            let keep_alive = token.eq_ignore_ascii_case(b"keep-alive");
            self.close |= close;
            self.keep_alive |= keep_alive;
            self.names_fields |= !(close || keep_alive || token.is_empty());
        }
    }
}

/// Whether a head parsed by our HTTP/1 codec keeps `name` in its map. The hop-by-hop fields are
/// read for the framing and left out where they are in hand, rather than looked up and removed
/// by [`strip_hop_by_hop`] later; `TE` stays (its `trailers` is re-said), and so does every
/// `Connection` field when one names other fields, for the strip to act on.
pub(crate) fn keeps(name: &HeaderName, connection: ConnectionOptions) -> bool {
    !is_hop_by_hop(name)
        || name == header::TE
        || (connection.names_fields && name == header::CONNECTION)
}

/// Removes the headers that describe one connection, not the message (RFC 9110 7.6.1):
/// those named in `Connection`, and the fixed list. `TE: trailers` stays (gRPC needs it), and
/// an upgrade keeps `Connection: upgrade` and `Upgrade`. Most messages carry none of them:
/// one pass over the names finds that, and nothing is looked up or removed. A message framed by
/// `Transfer-Encoding` loses a `Content-Length` beside it as well.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // RFC 9112 6.3: Transfer-Encoding frames the body, and hyper read it so; a
        // Content-Length beside it (a hostile or broken upstream) would truncate or overstate
        // the body sent on, which hyper now frames itself
        headers.remove(header::CONTENT_LENGTH);
    }
    // every Connection field counts, not only the first
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|connection| connection.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.eq_ignore_ascii_case(b"upgrade"))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    let trailers = has_token(headers, header::TE, "trailers");
    for name in HOP_BY_HOP {
        if upgrade && (name == header::CONNECTION || name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

pin_project_lite::pin_project! {
    /// The upstream's answer, classified; no box beyond the one hyper's client makes.
    #[allow(missing_debug_implementations)]
    pub struct ResponseFuture {
        #[pin]
        state: State,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State {
        Failed { err: Option<ProxyError> },
        Sent {
            fut: Sending,
            upstream: Arc<str>,
            upgrade: Option<OnUpgrade>,
            // the endpoint's in-flight count; its latency and outcome when the answer comes
            picked: Option<Picked>,
            // the attempt's span, only while the request's trace is recorded
            trace: Option<Box<OpenSpan>>,
            // a gRPC call: its outcome is its grpc-status
            grpc: bool,
        },
        // the endpoint is held until the tunnel is open or failed to open
        Tunnel { opening: Opening, picked: Option<Picked> },
    }
}

/// A request on its way, through hyper's client or our own.
enum Sending {
    Hyper(legacy::ResponseFuture),
    /// `None` once the head arrived and the exchange went on as the response body.
    Own(Option<Box<h1::Exchange>>),
}

impl Sending {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<Body>, SendError>> {
        match self {
            Sending::Hyper(fut) => match ready!(Pin::new(fut).poll(cx)) {
                Ok(res) => Poll::Ready(Ok(res.map(Body::upstream))),
                Err(e) => Poll::Ready(Err(SendError::Hyper(e))),
            },
            Sending::Own(exchange) => {
                let live = exchange.as_mut().expect("polled after completion");
                let head = ready!(live.poll_head(cx)).map_err(SendError::Own)?;
                let exchange = exchange.take().expect("checked above");
                Poll::Ready(Ok(head.map(|()| Body::H1 { inner: h1::ResponseBody(exchange) })))
            }
        }
    }
}

/// How an attempt failed, by the client that made it.
#[derive(Debug)]
enum SendError {
    Hyper(legacy::Error),
    Own(h1::ExchangeError),
}

impl ResponseFuture {
    fn failed(err: ProxyError) -> Self {
        Self { state: State::Failed { err: Some(err) } }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Failed { err } => {
                Poll::Ready(Err(err.take().expect("polled after completion")))
            }
            StateProj::Sent { fut, upstream, upgrade, picked, trace, grpc } => {
                let mut result = ready!(fut.poll(cx)).map_err(|source| classify(upstream, source));
                let head = match &mut result {
                    Ok(res) if *grpc => grpc::read_head(res),
                    _ => Head::Http,
                };
                // the endpoint's outcome; a gRPC status in trailers tells it when they pass
                let mut watched = None;
                if let Some(picked) = picked.take() {
                    match (&result, head) {
                        (Ok(_), Head::Trailers) => watched = Some(picked),
                        (Ok(_), Head::Status(status)) => picked.finish(grpc::is_failure(status)),
                        (Ok(res), Head::Http) => picked.finish(res.status().is_server_error()),
                        // the endpoint is not to blame for a request body the client broke
                        (Err(err), _) => picked.finish(err.status().is_server_error()),
                    }
                }
                if let Some(mut recorded) = trace.take() {
                    let span = recorded.span();
                    match &result {
                        Ok(res) => {
                            let status = res.status().as_u16();
                            span.int("http.response.status_code", i64::from(status));
                            crate::http::route::error_type(span, res);
                            if status >= 500 {
                                span.failed();
                            }
                        }
                        Err(error) => {
                            // few values: the kind, never the message
                            span.text("error.type", error.kind());
                            span.failed();
                        }
                    }
                    recorded.end();
                }
                let mut res = result?;
                let upgraded = res.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade.is_some();
                if upgraded {
                    let client_side = upgrade.take().expect("checked above");
                    tokio::spawn(tunnel(
                        upstream.clone(),
                        client_side,
                        hyper::upgrade::on(&mut res),
                    ));
                }
                strip_hop_by_hop(res.headers_mut(), upgraded);
                if head == Head::Trailers {
                    let mut watch = Watch::default();
                    if let Some(picked) = watched {
                        watch.on_status(move |status| picked.finish(grpc::is_failure(status)));
                    }
                    return Poll::Ready(Ok(res.map(|body| body.watch_grpc(watch))));
                }
                Poll::Ready(Ok(res))
            }
            StateProj::Tunnel { opening, picked } => {
                let result = ready!(opening.as_mut().poll(cx));
                if let Some(picked) = picked.take() {
                    picked.finish(result.is_err());
                }
                Poll::Ready(result)
            }
        }
    }
}

/// An attempt's error, classified where it enters: no connection, a connection that failed
/// after the request left, or a request body the client broke (malformed chunks, the client
/// gone mid-body), which is a bad request and not the upstream's failure.
fn classify(upstream: &Arc<str>, error: SendError) -> ProxyError {
    let upstream = upstream.clone();
    match error {
        SendError::Hyper(source) if BodyError::from_client(&source) => {
            ProxyError::BadRequestBody { source: source.into() }
        }
        SendError::Hyper(source) if source.is_connect() => {
            ProxyError::ConnectFailed { upstream, source: source.into() }
        }
        SendError::Hyper(source) => ProxyError::UpstreamReset { upstream, source: source.into() },
        SendError::Own(source) if source.is_client() => {
            ProxyError::BadRequestBody { source: source.into() }
        }
        SendError::Own(h1::ExchangeError::Connect(source)) => {
            ProxyError::ConnectFailed { upstream, source: source.into() }
        }
        SendError::Own(source) => ProxyError::UpstreamReset { upstream, source: source.into() },
    }
}

/// Copies bytes both ways between an upgraded client and endpoint until either side closes.
async fn tunnel(upstream: Arc<str>, client: OnUpgrade, endpoint: OnUpgrade) {
    let (client, endpoint) = match tokio::try_join!(client, endpoint) {
        Ok(both) => both,
        Err(error) => {
            tracing::debug!(%upstream, %error, "upgrade did not complete");
            return;
        }
    };
    let (mut client, mut endpoint) = (TokioIo::new(client), TokioIo::new(endpoint));
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut endpoint).await {
        tracing::debug!(%upstream, %error, "upgraded connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-end-to-end"]);
    }

    #[test]
    fn each_fixed_hop_by_hop_header_alone_is_removed() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            let mut h = headers(&[(name, "x"), ("x-end-to-end", "kept")]);
            strip_hop_by_hop(&mut h, false);
            let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            assert_eq!(left, ["x-end-to-end"], "{name}");
        }
    }

    #[test]
    fn te_trailers_survives_for_grpc() {
        let mut h = headers(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn an_upgrade_keeps_connection_and_upgrade() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            (h["connection"].to_str().unwrap(), h["upgrade"].to_str().unwrap()),
            ("upgrade", "websocket")
        );
    }

    #[test]
    fn the_request_goes_to_the_endpoint_with_path_query_and_host_kept() {
        let req = Request::builder()
            .uri("http://payments/charge?id=7")
            .header("host", "payments")
            .body(Body::empty())
            .unwrap();
        let endpoint = Endpoint::new(([127, 0, 0, 1], 9001).into());
        let (req, upgrade) = prepare(req, &endpoint, Scheme::HTTP, false);
        assert_eq!(req.uri(), "http://127.0.0.1:9001/charge?id=7");
        assert_eq!(req.headers()["host"], "payments");
        assert!(upgrade.is_none());
    }

    #[test]
    fn an_http2_request_without_host_gets_its_authority_as_host_on_http1() {
        let req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://payments:80/x")
            .body(Body::empty())
            .unwrap();
        let endpoint = Endpoint::new(([127, 0, 0, 1], 9001).into());
        let (req, _) = prepare(req, &endpoint, Scheme::HTTP, false);
        assert_eq!(req.headers()["host"], "payments:80");
        assert_eq!(req.version(), Version::HTTP_11);
    }
}
