//! gRPC calls (DESIGN.md, "gRPC"): a request whose `content-type` is `application/grpc` or
//! `application/grpc+…`. Its outcome is its `grpc-status`, read where the answer enters
//! (`forward.rs`): from the response head of a trailers-only answer ([`Answered`]), else from
//! the trailers as they pass ([`watch::Watch`], nothing buffered). Outrigger's own answers to a
//! gRPC call become trailers-only gRPC answers in one place, `route.rs`, through [`LocalAnswer`].
//! Hand-written rather than tonic: we read two headers and write four, and a proxy must pass
//! every message through untouched, so there is nothing for a gRPC library to decode.

pub mod watch;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
pub use outrigger_config::GrpcStatus;

use crate::http::Body;

pub const STATUS_HEADER: HeaderName = HeaderName::from_static("grpc-status");
pub const MESSAGE_HEADER: HeaderName = HeaderName::from_static("grpc-message");

/// Whether a request (by its headers) is a gRPC call: one header lookup, no allocation.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        let prefix = b"application/grpc";
        v.len() >= prefix.len()
            && v[..prefix.len()].eq_ignore_ascii_case(prefix)
            && matches!(v.get(prefix.len()), None | Some(b'+' | b';'))
    })
}

/// A `grpc-status` value. A value that is not a known code reads as `unknown`, as gRPC's own
/// clients read it (the spec: "any other value … is treated as UNKNOWN").
pub fn parse_status(value: &HeaderValue) -> GrpcStatus {
    std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .and_then(GrpcStatus::from_code)
        .unwrap_or(GrpcStatus::Unknown)
}

/// The status a block of trailers carries; trailers without one are a broken answer, which
/// gRPC clients report as an error: `unknown`.
pub fn trailers_status(trailers: &HeaderMap) -> GrpcStatus {
    trailers.get(STATUS_HEADER).map_or(GrpcStatus::Unknown, parse_status)
}

/// Whether `status` means the upstream failed the call, for the circuit breaker and outlier
/// detection (as a 5xx does): the server's trouble, not the caller's request.
pub fn is_failure(status: GrpcStatus) -> bool {
    matches!(
        status,
        GrpcStatus::Unknown
            | GrpcStatus::DeadlineExceeded
            | GrpcStatus::Internal
            | GrpcStatus::Unavailable
            | GrpcStatus::DataLoss
    )
}

/// In a response's extensions: the upstream answered this gRPC call trailers-only, with this
/// status in its head. Set by `forward.rs`, read by the breaker, retries and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered(pub GrpcStatus);

/// Where the outcome of an upstream's answer to a gRPC call is, read off its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Not a gRPC answer (not HTTP 200: a proxy or load balancer on the way answered): its HTTP
    /// status says, as for any call.
    Http,
    /// Trailers-only: the status is in the head; [`Answered`] now marks the response.
    Status(GrpcStatus),
    /// The status comes in the trailers, after the messages.
    Trailers,
}

/// Reads a gRPC call's answer head, where it enters (`forward.rs`).
pub fn read_head<B>(res: &mut Response<B>) -> Head {
    if res.status() != StatusCode::OK {
        return Head::Http;
    }
    match res.headers().get(STATUS_HEADER).map(parse_status) {
        Some(status) => {
            res.extensions_mut().insert(Answered(status));
            Head::Status(status)
        }
        None => Head::Trailers,
    }
}

/// What an upstream's answer to a call says of its outcome, to a layer above the forwarder.
#[derive(Debug)]
pub enum Verdict<'a> {
    /// Known now: the head says (an HTTP status, or a trailers-only gRPC status).
    Head { failed: bool },
    /// A gRPC call whose status comes in trailers: watch for it.
    Trailers(&'a mut watch::Watch),
}

/// The verdict on an upstream answer. `failed` for HTTP: a 5xx.
pub fn verdict(res: &mut Response<Body>) -> Verdict<'_> {
    if let Some(Answered(status)) = res.extensions().get::<Answered>() {
        return Verdict::Head { failed: is_failure(*status) };
    }
    let failed = res.status().is_server_error();
    match res.body_mut() {
        Body::Grpc { watch, .. } => Verdict::Trailers(watch),
        _ => Verdict::Head { failed },
    }
}

/// In the extensions of every answer Outrigger makes itself (`respond.rs`): the gRPC status and
/// message it becomes when the call was gRPC.
#[derive(Debug, Clone)]
pub struct LocalAnswer {
    pub status: GrpcStatus,
    pub message: Bytes,
}

/// Makes our own answer to a gRPC call a trailers-only gRPC answer: HTTP 200,
/// `content-type: application/grpc`, `grpc-status`, `grpc-message`, no body. The headers it had
/// (`outrigger-error`, `outrigger-attempts`, `retry-after`) stay. An upstream's answer, which
/// carries no [`LocalAnswer`], is left as it is.
pub fn answer_as_grpc(res: &mut Response<Body>) {
    let Some(local) = res.extensions_mut().remove::<LocalAnswer>() else { return };
    *res.status_mut() = StatusCode::OK;
    *res.body_mut() = Body::empty();
    let headers = res.headers_mut();
    headers.remove(CONTENT_LENGTH);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(STATUS_HEADER, HeaderValue::from(local.status.code()));
    headers.insert(MESSAGE_HEADER, percent_encode(local.message.trim_ascii()));
}

/// `grpc-message` encoding (gRPC's PROTOCOL-HTTP2.md): every byte outside `0x20..=0x7E`, and
/// `%` itself, becomes `%XX`; the rest is sent as it is.
pub fn percent_encode(message: &[u8]) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(message.len());
    for &b in message {
        if (0x20..=0x7E).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
    HeaderValue::from_bytes(&out).expect("printable ASCII is a valid header value")
}

#[cfg(test)]
mod tests;
