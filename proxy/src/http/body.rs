//! `Body`: the one body type on both sides of the proxy, without a box per request.
//!
//! A body is hyper's streaming `Incoming` (passed through frame by frame, never buffered), a
//! complete buffer (Outrigger's own answers, or a request body kept to be replayed by a retry),
//! or a buffered prefix followed by the rest of a stream (a body that outgrew the replay buffer
//! while it was being read: it is sent once, whole, and not retried).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

pin_project_lite::pin_project! {
    #[project = BodyProj]
    #[derive(Debug)]
    pub enum Body {
        Incoming { #[pin] inner: Incoming },
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Prefixed { head: Option<Bytes>, #[pin] rest: Incoming },
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
        Self::Full { data: (!data.is_empty()).then_some(data), trailers }
    }
}

impl From<Incoming> for Body {
    fn from(inner: Incoming) -> Self {
        Self::Incoming { inner }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            BodyProj::Incoming { inner } => inner.poll_frame(cx),
            BodyProj::Full { data, trailers } => Poll::Ready(match data.take() {
                Some(data) => Some(Ok(Frame::data(data))),
                None => trailers.take().map(|t| Ok(Frame::trailers(t))),
            }),
            BodyProj::Prefixed { head, rest } => match head.take() {
                Some(head) => Poll::Ready(Some(Ok(Frame::data(head)))),
                None => rest.poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Incoming { inner } => inner.is_end_stream(),
            Self::Full { data, trailers } => data.is_none() && trailers.is_none(),
            Self::Prefixed { head, rest } => head.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Incoming { inner } => inner.size_hint(),
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
