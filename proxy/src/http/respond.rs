//! `ProxyError` -> the response the client gets: status, `outrigger-error: KIND`, a one-line
//! body from `Display`, and `connection: close` when the connection's framing is not trusted.
//! Each answer also carries, in its extensions, the gRPC status and message it becomes when the
//! call was gRPC: `route.rs` makes that conversion, once, for every answer of ours.

use bytes::Bytes;
use http::Response;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::grpc::LocalAnswer;

pub const ERROR_HEADER: &str = "outrigger-error";

pub fn error_response(err: &ProxyError) -> Response<Body> {
    tracing::debug!(kind = err.kind(), error = %err, "answering for the upstream");
    let text = Bytes::from(format!("{err}\n"));
    let mut res = Response::new(Body::full(text.clone()));
    res.extensions_mut().insert(LocalAnswer { status: err.grpc_status(), message: text });
    res.extensions_mut().insert(crate::error::LocalKind(err.kind()));
    *res.status_mut() = err.status();
    let headers = res.headers_mut();
    headers.insert(ERROR_HEADER, HeaderValue::from_static(err.kind()));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Some(wait) = err.retry_after() {
        // whole seconds, rounded up: "0" would invite an immediate retry that fails again
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    if err.closes_connection() {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    res
}
