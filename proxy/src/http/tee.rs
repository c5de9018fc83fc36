//! A request body sent as it arrives and copied on the way, for a gRPC call a retry may repeat.
//!
//! Holding a gRPC request back until its body ends, as the retry layer does for HTTP, would
//! hang a client- or bidi-streaming call whose client waits for an answer before it ends its
//! stream. So the first attempt streams (through `Body::Teed`), and the copy serves a retry only
//! if the client's body had ended, within `replay_buffer`, by the time the retry is decided;
//! otherwise the call is not retried (as Envoy does with its request buffer). A body the
//! attempt never read (its connection could not be opened) is handed back whole for the next
//! attempt, so `connect-failure` retries still work. Only gRPC calls take this path: one `Arc`
//! and a copy of each chunk.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::http::Body;
use crate::http::body::BodyError;

/// The copy of one request body, shared by the body being sent and the retry layer.
#[derive(Debug, Clone)]
pub struct Tee(Arc<Mutex<Copy>>);

#[derive(Debug)]
struct Copy {
    /// The client's stream, before an attempt takes it or after one handed it back unread.
    unread: Option<Incoming>,
    data: BytesMut,
    trailers: Option<HeaderMap>,
    cap: usize,
    state: CopyState,
    /// An attempt has read from the client's stream.
    touched: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyState {
    /// The client is still sending.
    Open,
    /// The whole body is copied.
    Complete,
    /// Past the cap, or broken off: there is nothing to replay.
    Lost,
}

impl Tee {
    /// The client's body `inner`, to be copied up to `cap` bytes as it is sent.
    pub fn new(inner: Incoming, cap: usize) -> Self {
        Self::with(Some(inner), cap)
    }

    fn with(unread: Option<Incoming>, cap: usize) -> Self {
        let copy = Copy {
            unread,
            data: BytesMut::new(),
            trailers: None,
            cap,
            state: CopyState::Open,
            touched: false,
        };
        Self(Arc::new(Mutex::new(copy)))
    }

    /// Whether another attempt can be sent the whole body.
    pub fn can_replay(&self) -> bool {
        let copy = self.lock();
        copy.unread.is_some() || copy.state == CopyState::Complete
    }

    /// The body of the next attempt: the client's stream if no attempt read any of it, else
    /// the copy, once complete. `None` when neither is to be had.
    pub fn next_body(&self) -> Option<Body> {
        let mut copy = self.lock();
        if let Some(inner) = copy.unread.take() {
            return Some(Body::Teed { inner: Teed { inner: Some(inner), tee: self.clone() } });
        }
        (copy.state == CopyState::Complete)
            .then(|| Body::replay(Bytes::copy_from_slice(&copy.data), copy.trailers.clone()))
    }

    /// Looks at one frame as it passes to the upstream (`None`: the body ended).
    pub(crate) fn observe<E>(&self, frame: Option<&Result<Frame<Bytes>, E>>) {
        let mut copy = self.lock();
        // read from: the stream is this attempt's now, never handed back
        copy.touched = true;
        if copy.state != CopyState::Open {
            return;
        }
        match frame {
            None => copy.state = CopyState::Complete,
            Some(Err(_)) => copy.lose(),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if copy.data.len() + data.len() > copy.cap {
                        copy.lose();
                    } else {
                        copy.data.extend_from_slice(data);
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    copy.trailers = Some(trailers.clone());
                    copy.state = CopyState::Complete;
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Copy> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The client's body on its way to one attempt, copied as it goes.
#[derive(Debug)]
pub struct Teed {
    /// `None` once handed back (on drop) or never taken.
    inner: Option<Incoming>,
    tee: Tee,
}

impl http_body::Body for Teed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        if let Poll::Ready(frame) = &polled {
            this.tee.observe(frame.as_ref());
            // hyper stops polling once the body says it has ended: that is its end
            if frame.is_some() && inner.is_end_stream() {
                this.tee.observe::<hyper::Error>(None);
            }
        }
        polled.map_err(|e| BodyError::Client(e.into()))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}

impl Drop for Teed {
    fn drop(&mut self) {
        let mut copy = self.tee.lock();
        // an attempt that never read its body (no connection): the next one sends it
        if !copy.touched && copy.unread.is_none() {
            copy.unread = self.inner.take();
        }
    }
}

impl Copy {
    fn lose(&mut self) {
        self.state = CopyState::Lost;
        self.data = BytesMut::new(); // nothing to replay: free it now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Tee {
        fn empty(cap: usize) -> Self {
            Self::with(None, cap)
        }

        fn replay(&self) -> Option<(Bytes, Option<HeaderMap>)> {
            let copy = self.lock();
            (copy.state == CopyState::Complete)
                .then(|| (Bytes::copy_from_slice(&copy.data), copy.trailers.clone()))
        }
    }

    fn data(bytes: &'static [u8]) -> Option<Result<Frame<Bytes>, ()>> {
        Some(Ok(Frame::data(Bytes::from_static(bytes))))
    }

    #[test]
    fn the_copy_replays_only_once_the_body_has_ended_within_the_cap() {
        let tee = Tee::empty(8);
        tee.observe(data(b"abc").as_ref());
        assert_eq!(tee.replay(), None, "the client is still sending: a streaming call");
        tee.observe(data(b"de").as_ref());
        tee.observe::<()>(None);
        assert_eq!(tee.replay(), Some((Bytes::from_static(b"abcde"), None)));
    }

    #[test]
    fn a_body_past_the_cap_or_broken_off_is_not_replayed() {
        let tee = Tee::empty(4);
        tee.observe(data(b"abc").as_ref());
        tee.observe(data(b"de").as_ref());
        tee.observe::<()>(None);
        assert_eq!(tee.replay(), None);
        let broken = Tee::empty(4);
        broken.observe(data(b"ab").as_ref());
        broken.observe::<()>(Some(&Err(())));
        broken.observe::<()>(None);
        assert_eq!(broken.replay(), None);
    }

    #[test]
    fn trailers_end_the_body_and_are_replayed() {
        let tee = Tee::empty(8);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        tee.observe(data(b"ab").as_ref());
        tee.observe::<()>(Some(&Ok(Frame::trailers(trailers.clone()))));
        assert_eq!(tee.replay(), Some((Bytes::from_static(b"ab"), Some(trailers))));
    }
}
