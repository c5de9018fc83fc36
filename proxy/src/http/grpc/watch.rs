//! Watching a streamed gRPC response for its status as it passes: when the trailers frame goes
//! by (or the stream ends or breaks first), each observer is told the call's status once. Nothing
//! is buffered or delayed, and a response whose client goes away before the end tells no one:
//! its observers are dropped, which the breaker counts as a cancelled request (no outcome).
//! Only gRPC answers that carry their status in trailers get a `Watch` (`Body::Grpc`); the plain
//! HTTP path has none, and no box.

use std::fmt;
use std::task::Poll;

use bytes::Bytes;
use http_body::Frame;

use super::{GrpcStatus, trailers_status};

type Observer = Box<dyn FnOnce(GrpcStatus) + Send + Sync>;

/// The observers of one streamed gRPC answer.
#[derive(Default)]
pub struct Watch {
    observers: Vec<Observer>,
}

impl Watch {
    /// `observer` is called once with the call's status, when it is known.
    pub fn on_status(&mut self, observer: impl FnOnce(GrpcStatus) + Send + Sync + 'static) {
        self.observers.push(Box::new(observer));
    }

    /// Looks at a frame as it passes to the client.
    pub(crate) fn observe<E>(&mut self, polled: &Poll<Option<Result<Frame<Bytes>, E>>>) {
        if self.observers.is_empty() {
            return;
        }
        let status = match polled {
            Poll::Ready(Some(Ok(frame))) => match frame.trailers_ref() {
                Some(trailers) => trailers_status(trailers),
                None => return, // a message: the status is still to come
            },
            // ended without trailers: gRPC clients report a missing status as an error
            Poll::Ready(None) => GrpcStatus::Unknown,
            // the stream broke (reset, connection lost): what a client then sees
            Poll::Ready(Some(Err(_))) => GrpcStatus::Unavailable,
            Poll::Pending => return,
        };
        for observer in self.observers.drain(..) {
            observer(status);
        }
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch").field("observers", &self.observers.len()).finish()
    }
}
