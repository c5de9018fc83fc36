//! `Body`: the one body type on both sides of the proxy, without a box per request.
//!
//! A request or response body is either hyper's streaming `Incoming` (passed through frame by
//! frame, never buffered), a small complete buffer (Outrigger's own answers), or empty.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

pin_project_lite::pin_project! {
    #[project = BodyProj]
    #[derive(Debug)]
    pub enum Body {
        Incoming { #[pin] inner: Incoming },
        Full { data: Option<Bytes> },
    }
}

impl Body {
    pub fn empty() -> Self {
        Self::Full { data: None }
    }

    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        Self::Full { data: (!data.is_empty()).then_some(data) }
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
            BodyProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Incoming { inner } => inner.is_end_stream(),
            Self::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Incoming { inner } => inner.size_hint(),
            Self::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
