//! `Body`: the one body type on both sides of the proxy, without a box per request.
//!
//! A body is hyper's streaming `Incoming` from the client or from an upstream (passed through
//! frame by frame, never buffered), a complete buffer (Outrigger's own answers, or a request body
//! kept to be replayed by a retry), or a buffered prefix followed by the rest of the client's
//! stream (a body that outgrew the replay buffer while it was being read: it is sent once, whole,
//! and not retried). A stream that breaks says whose it was ([`BodyError`]): a malformed or
//! abandoned request body is the client's fault, never the upstream's (issue 17).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::error::BoxError;
use crate::http::grpc::watch::Watch;
use crate::http::h1::{RequestBody, ResponseBody};
use crate::http::tee::Teed;

pin_project_lite::pin_project! {
    #[project = BodyProj]
    #[derive(Debug)]
    pub enum Body {
        /// The client's request body, as it arrives.
        Client { #[pin] inner: Incoming },
        /// The client's request body, read by our own HTTP/1 server (`h1/`).
        H1Request { inner: RequestBody },
        /// An upstream's response body, as it arrives.
        Upstream { #[pin] inner: Incoming },
        /// An HTTP/1 upstream's response body, read by our own client (`h1/`).
        H1 { inner: ResponseBody },
        /// An upstream's answer to a gRPC call, as it arrives, watched for the status in its
        /// trailers (`grpc/watch.rs`).
        Grpc { #[pin] inner: Incoming, watch: Watch },
        /// The client's request body of a gRPC call a retry may repeat, as it arrives, copied
        /// on the way (`tee.rs`).
        Teed { #[pin] inner: Teed },
        /// Trailers boxed: they are rare, and every request moves a `Body` through each layer.
        Full { data: Option<Bytes>, trailers: Option<Box<HeaderMap>> },
        /// The start of the client's request body, read, then the rest of it as it arrives.
        Prefixed { head: Option<Bytes>, rest: Box<Body> },
    }
}

/// A streamed body that broke off, and whose it was.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Malformed framing, or the client went away mid-body: a bad request, not an upstream
    /// failure, so no breaker, outlier detector or retry counts it.
    #[error("the client's request body broke off: {0}")]
    Client(#[source] BoxError),
    #[error("the upstream's response body broke off: {0}")]
    Upstream(#[source] BoxError),
}

impl BodyError {
    /// Whether `error`, or an error it was caused by, is a broken request body of the client.
    pub fn from_client(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut cause = Some(error);
        while let Some(error) = cause {
            if let Some(Self::Client(_)) = error.downcast_ref::<Self>() {
                return true;
            }
            cause = error.source();
        }
        false
    }
}

impl Body {
    pub fn empty() -> Self {
        Self::Full { data: None, trailers: None }
    }

    pub fn full(data: impl Into<Bytes>) -> Self {
        Self::replay(data.into(), None)
    }

    /// A complete body; cloning its parts is cheap (`Bytes` is reference-counted).
    pub fn replay(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self::Full { data: (!data.is_empty()).then_some(data), trailers: trailers.map(Box::new) }
    }
}

impl Body {
    /// The client's request body.
    pub fn client(inner: Incoming) -> Self {
        Self::Client { inner }
    }

    /// An upstream's response body.
    pub fn upstream(inner: Incoming) -> Self {
        Self::Upstream { inner }
    }

    /// The answer to a gRPC call, watched for the status in its trailers. gRPC calls travel
    /// through hyper's client, so the body is hyper's; any other is passed on unwatched.
    pub(crate) fn watch_grpc(self, watch: Watch) -> Self {
        match self {
            Self::Upstream { inner } => Self::Grpc { inner, watch },
            other => other,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            BodyProj::Client { inner } => {
                inner.poll_frame(cx).map_err(|e| BodyError::Client(e.into()))
            }
            BodyProj::Upstream { inner } => {
                inner.poll_frame(cx).map_err(|e| BodyError::Upstream(e.into()))
            }
            BodyProj::H1 { inner } => inner.poll_frame(cx),
            BodyProj::H1Request { inner } => inner.poll_frame(cx),
            BodyProj::Teed { inner } => inner.poll_frame(cx),
            BodyProj::Grpc { mut inner, watch } => {
                let polled = inner.as_mut().poll_frame(cx);
                watch.observe(&polled);
                if matches!(polled, Poll::Ready(Some(Ok(_)))) && inner.is_end_stream() {
                    // hyper polls no further once a body says it has ended: it ended here,
                    // without trailers (an observer told of the trailers already is not again)
                    watch.observe::<hyper::Error>(&Poll::Ready(None));
                }
                polled.map_err(|e| BodyError::Upstream(e.into()))
            }
            BodyProj::Full { data, trailers } => Poll::Ready(match data.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(*t))),
            }),
            BodyProj::Prefixed { head, rest } => match head.take() {
                Some(head) => Poll::Ready(Some(Ok(Frame::data(head)))),
                None => Pin::new(&mut **rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Client { inner } | Self::Upstream { inner } | Self::Grpc { inner, .. } => {
                inner.is_end_stream()
            }
            Self::Teed { inner } => inner.is_end_stream(),
            Self::H1 { inner } => inner.is_end_stream(),
            Self::H1Request { inner } => inner.is_end_stream(),
            Self::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Self::Prefixed { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Client { inner } | Self::Upstream { inner } | Self::Grpc { inner, .. } => {
                inner.size_hint()
            }
            Self::Teed { inner } => inner.size_hint(),
            Self::H1 { inner } => inner.size_hint(),
            Self::H1Request { inner } => inner.size_hint(),
            Self::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Self::Prefixed { head, rest } => {
                let head = head.as_ref().map_or(0, |h| h.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + head);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + head);
                }
                hint
            }
        }
    }
}
