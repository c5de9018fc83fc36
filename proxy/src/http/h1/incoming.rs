//! A client's request body, read by our HTTP/1 server straight from the connection while the
//! request is forwarded: `Content-Length` bytes, or chunks by the shared chunked reader (the
//! framing guard's rules). When it has been read to its end, the bytes after it (a pipelined
//! request) go back to the connection; a body dropped unread leaves the connection unusable,
//! and the server closes it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::http::body::BodyError;
use crate::http::h1::buf::{self, READ_SIZE};
use crate::http::h1::chunked::{self, Chunk, Step};

/// The client connection, shared by the server (which writes answers) and the body of the
/// request being read (which reads): tokio's socket reads and writes through `&TcpStream`.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    /// `outbound.limits.idle_timeout`: a client whose body stalls this long has broken it.
    idle: Duration,
    /// Where a finished body leaves the bytes read past its end.
    returned: Mutex<Returned>,
}

#[derive(Debug, Default)]
pub(crate) enum Returned {
    /// No body is out, or it is still being read.
    #[default]
    Nothing,
    /// The body was read to its end; these bytes follow it.
    Rest(BytesMut),
    /// The body was dropped before its end: the connection's framing is lost.
    Lost,
}

impl Conn {
    pub(crate) fn new(stream: TcpStream, idle: Duration) -> Arc<Self> {
        Arc::new(Self { stream, idle, returned: Mutex::default() })
    }

    /// What the last body left, taken.
    pub(crate) fn take_returned(&self) -> Returned {
        std::mem::take(&mut *self.returned.lock().expect("no panics under the lock"))
    }

    /// Whether the last body was dropped unread (the connection cannot go on).
    pub(crate) fn lost(&self) -> bool {
        matches!(*self.returned.lock().expect("no panics under the lock"), Returned::Lost)
    }

    fn give_back(&self, returned: Returned) {
        *self.returned.lock().expect("no panics under the lock") = returned;
    }
}

/// How the request body is delimited, and how far it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Left {
    Length(u64),
    Chunked(Chunk),
    Done,
}

/// The body of one request.
#[derive(Debug)]
pub struct RequestBody {
    conn: Arc<Conn>,
    buf: BytesMut,
    left: Left,
    trailers: Option<Box<HeaderMap>>,
    trailer_bytes: usize,
    /// Set while waiting for the client's next bytes.
    stall: Option<Pin<Box<Sleep>>>,
}

impl RequestBody {
    /// The body framed by `left`, whose first bytes (read with the head) are in `buf`.
    pub(crate) fn new(conn: Arc<Conn>, buf: BytesMut, left: Left) -> Self {
        Self { conn, buf, left, trailers: None, trailer_bytes: 0, stall: None }
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            match self.left {
                Left::Done => return Poll::Ready(None),
                Left::Length(left) if !self.buf.is_empty() => {
                    let n = (self.buf.len() as u64).min(left) as usize;
                    let data = self.buf.split_to(n).freeze();
                    self.left = Left::Length(left - n as u64);
                    if left == n as u64 {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Left::Chunked(at) if !self.buf.is_empty() => match chunked::step(at, &self.buf) {
                    Step::Need => {}
                    Step::Malformed => {
                        return Poll::Ready(Some(Err(broken("malformed chunked body"))));
                    }
                    Step::Took { n, next } => {
                        if let Chunk::Data(_) = at {
                            self.left = Left::Chunked(next.expect("data is followed by more"));
                            return Poll::Ready(Some(Ok(Frame::data(
                                self.buf.split_to(n).freeze(),
                            ))));
                        }
                        let line = self.buf.split_to(n);
                        match next {
                            Some(next) => {
                                if at == Chunk::Trailers {
                                    self.trailer_bytes += n;
                                    if self.trailer_bytes > chunked::MAX_TRAILERS {
                                        let what = "request trailers larger than 16 KiB";
                                        return Poll::Ready(Some(Err(broken(what))));
                                    }
                                    self.trailer(&line[..n - 2]);
                                }
                                self.left = Left::Chunked(next);
                            }
                            None => {
                                self.finish();
                                if let Some(trailers) = self.trailers.take() {
                                    return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
                                }
                                return Poll::Ready(None);
                            }
                        }
                        continue;
                    }
                },
                _ => {}
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Some(Err(broken("the client closed mid-body")))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(BodyError::Client(e.into())))),
            }
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 2 {
            self.buf.reserve(READ_SIZE);
        }
        loop {
            if self.conn.stream.poll_read_ready(cx)?.is_pending() {
                let idle = self.conn.idle;
                let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(stall.as_mut().poll(cx));
                let what = "the request body stalled past outbound.limits.idle_timeout";
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
            }
            match buf::read_drained(&self.conn.stream, &mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => {
                    self.stall = None;
                    return Poll::Ready(other);
                }
            }
        }
    }

    /// Keeps a trailer field; one that is not a valid field is dropped, as hyper drops it.
    fn trailer(&mut self, line: &[u8]) {
        if let Some((name, value)) = chunked::trailer_field(line) {
            self.trailers.get_or_insert_with(Box::default).append(name, value);
        }
    }

    /// The body is read: the bytes after it go back to the connection.
    fn finish(&mut self) {
        self.left = Left::Done;
        let rest = std::mem::take(&mut self.buf);
        self.conn.give_back(Returned::Rest(rest));
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.left == Left::Done
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.left {
            Left::Length(n) => SizeHint::with_exact(n),
            Left::Done => SizeHint::with_exact(0),
            Left::Chunked(_) => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if self.left != Left::Done {
            self.conn.give_back(Returned::Lost);
        }
    }
}

fn broken(what: &'static str) -> BodyError {
    BodyError::Client(io::Error::new(io::ErrorKind::InvalidData, what).into())
}
