//! `ProxyError`: every answer Outrigger gives instead of an upstream's.
//!
//! Status and kind live in one `match` each, with no `_ =>` arm, so a new variant does not
//! compile until someone decides what the user sees (DESIGN.md, "What Outrigger answers itself").

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use outrigger_config::GrpcStatus;

/// Why Outrigger answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no upstream is configured for {authority:?}")]
    UnknownUpstream { authority: Box<str> },
    #[error("upstream {upstream} has no healthy endpoint")]
    NoHealthyEndpoints { upstream: Arc<str> },
    /// No connection: TCP connect, the TLS handshake, or a CONNECT tunnel's dial failed.
    #[error("could not connect to upstream {upstream}: {}", Chain(source.as_ref()))]
    ConnectFailed {
        upstream: Arc<str>,
        #[source]
        source: BoxError,
    },
    #[error("upstream {upstream} closed or reset the connection: {}", Chain(source.as_ref()))]
    UpstreamReset {
        upstream: Arc<str>,
        #[source]
        source: BoxError,
    },
    #[error("request did not complete within {after:?}")]
    Timeout { after: Duration },
    #[error("circuit open for upstream {upstream}")]
    CircuitOpen { upstream: Arc<str>, retry_after: Duration },
    #[error("rate limit reached for upstream {upstream}")]
    RateLimited { upstream: Arc<str>, retry_after: Duration },
    /// `fault.abort` chose this request: answered with its status, nothing forwarded.
    #[error(
        "fault injected for upstream {upstream} (fault.abort): answered {status} without forwarding"
    )]
    FaultInjected { upstream: Arc<str>, status: StatusCode },
    #[error("upstream {upstream} already has {limit} requests in flight")]
    Overloaded { upstream: Arc<str>, limit: usize },
    /// The whole sidecar's cap, `outbound.limits.max_requests`, over every upstream.
    #[error(
        "the sidecar already has {limit} requests in flight (outbound.limits.max_requests); try again shortly"
    )]
    SidecarOverloaded { limit: usize },
    #[error("bad request: {reason}")]
    BadRequest { reason: Box<str> },
    /// The client's request body broke off while it was forwarded: malformed chunked framing,
    /// or the client went away mid-body. The client's fault, never counted against the upstream.
    #[error("bad request: the request body broke off: {}", Chain(source.as_ref()))]
    BadRequestBody {
        #[source]
        source: BoxError,
    },
    #[error("request headers too large: {reason}")]
    HeadersTooLarge { reason: Box<str> },
    #[error("publish refused: {reason}")]
    BadPublish { reason: Box<str> },
    #[error("publish refused: the payload is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("no messaging endpoint {path:?} (expected POST /v1/publish/QUEUE)")]
    UnknownEndpoint { path: Box<str> },
    #[error("method not allowed here (expected {allowed})")]
    MethodNotAllowed { allowed: &'static str },
    #[error("the message was not stored: {reason}")]
    Outbox { reason: Box<str> },
    /// The whole sidecar's cap on publish bodies held at once, `outbound.limits.max_publish_buffer`.
    #[error(
        "no room for this publish: the sidecar holds at most {limit} bytes of publish bodies at once (outbound.limits.max_publish_buffer); try again shortly"
    )]
    PublishBufferFull { limit: usize },
    /// A publish body still incomplete `after` its head (`outbound.limits.header_read_timeout`).
    #[error(
        "the publish body did not arrive within {after:?} of its head (outbound.limits.header_read_timeout)"
    )]
    BodyTimeout { after: Duration },
}

/// Any error, boxed: what a connect failure carries, whichever layer it came from.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and its sources, `a: b: c`: hyper's own message ("client error (Connect)") says
/// little, the reason (a refused port, an unknown certificate issuer) is further down.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

/// An error and its sources as one line, `a: b: c`.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    Chain(error).to_string()
}

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

/// The status an access line and `outrigger_requests_total` give a call its client cancelled
/// before the answer (nginx's "client closed request", which gRPC's `cancelled` maps to). Never
/// sent: there is no one left to send it to.
pub const CLIENT_CLOSED: u16 = 499;

/// The `kind` of such a call's access line, and the `error.type` of a span dropped before its
/// answer without a deadline cutting it.
pub const CANCELLED: &str = "cancelled";

/// In a response's extensions: Outrigger answered this itself, for this `outrigger-error`
/// kind. Extensions never cross the wire, so an upstream's answer (even another Outrigger's, with
/// its own `outrigger-error` header) never carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalKind(pub &'static str);

impl ProxyError {
    /// The stable name sent as `outrigger-error`, used as a metrics label and in tests.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownUpstream { .. } => "unknown-upstream",
            Self::NoHealthyEndpoints { .. } => "no-healthy-endpoints",
            Self::ConnectFailed { .. } => "connect-failed",
            Self::UpstreamReset { .. } => "upstream-reset",
            Self::Timeout { .. } => "timeout",
            Self::CircuitOpen { .. } => "circuit-open",
            Self::RateLimited { .. } => "rate-limited",
            Self::FaultInjected { .. } => "fault-injected",
            Self::Overloaded { .. }
            | Self::SidecarOverloaded { .. }
            | Self::PublishBufferFull { .. } => "overloaded",
            Self::BadRequest { .. }
            | Self::BadRequestBody { .. }
            | Self::HeadersTooLarge { .. } => "bad-request",
            Self::BadPublish { .. }
            | Self::PayloadTooLarge { .. }
            | Self::MethodNotAllowed { .. }
            | Self::BodyTimeout { .. } => "bad-request",
            Self::UnknownEndpoint { .. } => "unknown-endpoint",
            Self::Outbox { .. } => "outbox-unavailable",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownUpstream { .. } => StatusCode::NOT_FOUND,
            Self::NoHealthyEndpoints { .. }
            | Self::CircuitOpen { .. }
            | Self::Overloaded { .. }
            | Self::SidecarOverloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::FaultInjected { status, .. } => *status,
            Self::ConnectFailed { .. } | Self::UpstreamReset { .. } => StatusCode::BAD_GATEWAY,
            Self::BadRequest { .. } | Self::BadRequestBody { .. } => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BadPublish { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnknownEndpoint { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Outbox { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::PublishBufferFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            // 408, not 400: nothing the client sent was malformed, it was too slow; RFC 9110
            // §15.5.9 lets it repeat the request on a new connection. The kind stays
            // `bad-request`: the client's doing, never an upstream's, never a `timeout` (504)
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The gRPC status a gRPC call gets for this answer (DESIGN.md, "gRPC"). Beyond DESIGN's
    /// table: `bad-request` is `internal`, as gRPC maps an HTTP 400; the messaging API's own
    /// answers (never a gRPC call's) follow their HTTP meaning.
    pub fn grpc_status(&self) -> GrpcStatus {
        match self {
            Self::UnknownUpstream { .. } | Self::UnknownEndpoint { .. } => {
                GrpcStatus::Unimplemented
            }
            Self::Timeout { .. } => GrpcStatus::DeadlineExceeded,
            Self::RateLimited { .. } => GrpcStatus::ResourceExhausted,
            Self::FaultInjected { status, .. } => grpc_status_of_http(*status),
            Self::CircuitOpen { .. }
            | Self::Overloaded { .. }
            | Self::SidecarOverloaded { .. }
            | Self::NoHealthyEndpoints { .. }
            | Self::ConnectFailed { .. }
            | Self::UpstreamReset { .. }
            | Self::PublishBufferFull { .. }
            | Self::Outbox { .. } => GrpcStatus::Unavailable,
            Self::BadRequest { .. }
            | Self::BadRequestBody { .. }
            | Self::HeadersTooLarge { .. }
            | Self::BodyTimeout { .. }
            | Self::BadPublish { .. }
            | Self::PayloadTooLarge { .. }
            | Self::MethodNotAllowed { .. } => GrpcStatus::Internal,
        }
    }

    /// How long the client should wait before trying again, sent as `Retry-After`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::CircuitOpen { retry_after, .. } | Self::RateLimited { retry_after, .. } => {
                Some(*retry_after)
            }
            _ => None,
        }
    }

    /// Whether the client connection must be closed after this answer: its framing can no
    /// longer be trusted, so reading another request from it could desynchronise.
    pub fn closes_connection(&self) -> bool {
        // a payload over the limit was not read to its end: the rest must not be parsed as a
        // request; the same for a publish refused at the buffer cap or cut at its deadline
        matches!(
            self,
            Self::BadRequest { .. }
                | Self::BadRequestBody { .. }
                | Self::HeadersTooLarge { .. }
                | Self::PayloadTooLarge { .. }
                | Self::PublishBufferFull { .. }
                | Self::BodyTimeout { .. }
        )
    }
}

/// The gRPC status of an HTTP status, as gRPC maps a non-gRPC answer
/// (grpc/doc/http-grpc-status-mapping.md): what a gRPC call gets for an injected abort.
fn grpc_status_of_http(status: StatusCode) -> GrpcStatus {
    match status.as_u16() {
        200 => GrpcStatus::Ok,
        400 => GrpcStatus::Internal,
        401 => GrpcStatus::Unauthenticated,
        403 => GrpcStatus::PermissionDenied,
        404 => GrpcStatus::Unimplemented,
        429 | 502 | 503 | 504 => GrpcStatus::Unavailable,
        _ => GrpcStatus::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_statuses_match_the_design_table() {
        let unknown = ProxyError::UnknownUpstream { authority: "x".into() };
        assert_eq!((unknown.status(), unknown.kind()), (StatusCode::NOT_FOUND, "unknown-upstream"));
        let empty = ProxyError::NoHealthyEndpoints { upstream: "p".into() };
        assert_eq!((empty.status().as_u16(), empty.kind()), (503, "no-healthy-endpoints"));
        let bad = ProxyError::BadRequest { reason: "r".into() };
        assert_eq!((bad.status().as_u16(), bad.kind()), (400, "bad-request"));
        let large = ProxyError::HeadersTooLarge { reason: "r".into() };
        assert_eq!((large.status().as_u16(), large.kind()), (431, "bad-request"));
        assert!(large.closes_connection());
        let timeout = ProxyError::Timeout { after: Duration::from_secs(1) };
        assert_eq!((timeout.status().as_u16(), timeout.kind()), (504, "timeout"));
        let open =
            ProxyError::CircuitOpen { upstream: "p".into(), retry_after: Duration::from_secs(3) };
        assert_eq!((open.status().as_u16(), open.kind()), (503, "circuit-open"));
        assert_eq!(open.retry_after(), Some(Duration::from_secs(3)));
        let limited = ProxyError::RateLimited { upstream: "p".into(), retry_after: Duration::ZERO };
        assert_eq!((limited.status().as_u16(), limited.kind()), (429, "rate-limited"));
        let overloaded = ProxyError::Overloaded { upstream: "p".into(), limit: 1 };
        assert_eq!((overloaded.status().as_u16(), overloaded.kind()), (503, "overloaded"));
        let whole = ProxyError::SidecarOverloaded { limit: 1 };
        assert_eq!((whole.status().as_u16(), whole.kind()), (503, "overloaded"));
        let full = ProxyError::PublishBufferFull { limit: 1 };
        assert_eq!((full.status().as_u16(), full.kind()), (503, "overloaded"));
        assert!(full.closes_connection(), "the refused body was not read");
        let slow = ProxyError::BodyTimeout { after: Duration::from_secs(1) };
        assert_eq!((slow.status().as_u16(), slow.kind()), (408, "bad-request"));
        assert!(slow.closes_connection(), "the cut body was not read to its end");
    }

    #[test]
    fn grpc_statuses_match_the_design_mapping() {
        let upstream: Arc<str> = "p".into();
        let wait = Duration::from_secs(1);
        let cases = [
            (ProxyError::UnknownUpstream { authority: "x".into() }, GrpcStatus::Unimplemented),
            (ProxyError::Timeout { after: wait }, GrpcStatus::DeadlineExceeded),
            (
                ProxyError::RateLimited { upstream: upstream.clone(), retry_after: wait },
                GrpcStatus::ResourceExhausted,
            ),
            (
                ProxyError::CircuitOpen { upstream: upstream.clone(), retry_after: wait },
                GrpcStatus::Unavailable,
            ),
            (
                ProxyError::Overloaded { upstream: upstream.clone(), limit: 1 },
                GrpcStatus::Unavailable,
            ),
            (
                ProxyError::NoHealthyEndpoints { upstream: upstream.clone() },
                GrpcStatus::Unavailable,
            ),
            (
                ProxyError::ConnectFailed { upstream: upstream.clone(), source: "refused".into() },
                GrpcStatus::Unavailable,
            ),
            (ProxyError::BadRequest { reason: "r".into() }, GrpcStatus::Internal),
        ];
        for (err, status) in cases {
            assert_eq!(err.grpc_status(), status, "{}", err.kind());
        }
    }

    #[test]
    fn an_injected_abort_answers_its_status_and_a_grpc_call_the_matching_grpc_status() {
        let abort = |status: u16| ProxyError::FaultInjected {
            upstream: "p".into(),
            status: StatusCode::from_u16(status).unwrap(),
        };
        assert_eq!((abort(418).status().as_u16(), abort(418).kind()), (418, "fault-injected"));
        let grpc: Vec<GrpcStatus> =
            [503, 429, 404, 403, 401, 400, 500].map(|s| abort(s).grpc_status()).to_vec();
        assert_eq!(
            grpc,
            [
                GrpcStatus::Unavailable,
                GrpcStatus::Unavailable,
                GrpcStatus::Unimplemented,
                GrpcStatus::PermissionDenied,
                GrpcStatus::Unauthenticated,
                GrpcStatus::Internal,
                GrpcStatus::Unknown,
            ]
        );
    }
}
