//! One request and its response over one upstream connection, driven by whoever polls it: the
//! forwarder until the response head arrives, then the response body as the client reads it.
//! No task and no channel per connection (hyper's client spawns one and talks to it): the
//! connection is a plain `TcpStream` in this struct, written with vectored writes and read into
//! one buffer, and goes back to its endpoint's idle list once both messages are complete.
//!
//! The request body is sent while the response is read, so an upstream that answers before it
//! read the whole body (an early 413) is heard, and one that streams its answer as it reads is
//! not stalled. A response that completes before its request was sent in full closes the
//! connection rather than finish a body nobody waits for.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Method, Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use outrigger_discovery::Endpoint;
use tokio::net::TcpStream;

use crate::http::Body;
use crate::http::body::BodyError;
use crate::http::connect::dial;
use crate::http::h1::buf;
use crate::http::h1::chunked::{self, Chunk, Step};
use crate::http::h1::pool::Idle;
use crate::http::h1::request::{self, Framing as RequestFraming};
use crate::http::h1::response::{self, Framing, HeadError};

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error("{0}")]
    Connect(#[source] io::Error),
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("the connection closed before a complete response head")]
    ClosedBeforeHead,
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("the response body ended before its Content-Length")]
    Truncated,
    #[error("malformed chunked response body")]
    Chunked,
    #[error("malformed trailer field in the response")]
    Trailer,
    /// The client's request body broke, or did not match its `Content-Length`.
    #[error("{0}")]
    RequestBody(#[source] BodyError),
}

impl ExchangeError {
    /// Whether the client, not the upstream, is to blame.
    pub(crate) fn is_client(&self) -> bool {
        matches!(self, Self::RequestBody(BodyError::Client(_)))
    }
}

/// How an upstream's connections are opened and kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Client {
    pub(crate) connect_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

impl Client {
    /// Starts sending `req` (origin-form target, hop-by-hop fields removed) to `endpoint`, over
    /// an idle connection of `idle` or a new one.
    pub(crate) fn send(
        &self,
        req: Request<Body>,
        endpoint: &Endpoint,
        idle: Arc<Idle>,
    ) -> Box<Exchange> {
        let conn = match idle.take(self.idle_timeout) {
            Some(stream) => Conn::Open(stream),
            None => Conn::Connecting(Box::pin(dial(endpoint.addr, self.connect_timeout))),
        };
        let (parts, body) = req.into_parts();
        let framing =
            RequestFraming::of(&parts.headers, body.is_end_stream(), body.size_hint().exact());
        let mut head = Vec::with_capacity(512);
        request::write_head(&mut head, &parts, &endpoint.authority, framing);
        let body = (framing != RequestFraming::Empty).then_some(body);
        Box::new(Exchange {
            conn,
            idle,
            idle_timeout: self.idle_timeout,
            head_request: parts.method == Method::HEAD,
            out: Out { head, head_at: 0, line: ([0; 20], 20), data: Bytes::new(), tail: b"" },
            body,
            framing,
            sent: 0,
            buf: BytesMut::new(),
            read: Read::Head,
            trailers: None,
            keep_alive: false,
        })
    }
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

enum Conn {
    Connecting(Connecting),
    Open(TcpStream),
    Closed,
}

/// One request on its way and its response coming back.
pub(crate) struct Exchange {
    conn: Conn,
    idle: Arc<Idle>,
    idle_timeout: Duration,
    head_request: bool,
    /// Bytes ready to write.
    out: Out,
    /// The request body still to send; `None` once it is all in `out`.
    body: Option<Body>,
    framing: RequestFraming,
    /// Body bytes taken from `body` so far.
    sent: u64,
    /// Bytes read from the upstream and not yet handed on.
    buf: BytesMut,
    read: Read,
    /// Trailer fields of a chunked response, as they are read.
    trailers: Option<(HeaderMap, usize)>,
    keep_alive: bool,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange").field("read", &self.read).field("sent", &self.sent).finish()
    }
}

/// Where the response stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Head,
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// What is ready to write, in order: the rest of the head, a chunk-size line, chunk data, and
/// what follows it (the CRLF after chunk data, the last chunk).
struct Out {
    head: Vec<u8>,
    head_at: usize,
    /// A chunk-size line: `line.0[line.1..]`.
    line: ([u8; 20], usize),
    data: Bytes,
    tail: &'static [u8],
}

impl Out {
    fn is_empty(&self) -> bool {
        self.head_at == self.head.len()
            && self.line.1 == self.line.0.len()
            && self.data.is_empty()
            && self.tail.is_empty()
    }

    fn slices(&self) -> [IoSlice<'_>; 4] {
        [
            IoSlice::new(&self.head[self.head_at..]),
            IoSlice::new(&self.line.0[self.line.1..]),
            IoSlice::new(&self.data),
            IoSlice::new(self.tail),
        ]
    }

    fn advance(&mut self, mut n: usize) {
        let take = |left: usize, n: &mut usize| {
            let k = left.min(*n);
            *n -= k;
            k
        };
        self.head_at += take(self.head.len() - self.head_at, &mut n);
        self.line.1 += take(self.line.0.len() - self.line.1, &mut n);
        let k = take(self.data.len(), &mut n);
        self.data.advance(k);
        let k = take(self.tail.len(), &mut n);
        self.tail = &self.tail[k..];
    }

    /// Queues one chunk of `data` in chunked coding; `last`: the body ends with it.
    fn chunk(&mut self, data: Bytes, last: bool) {
        let mut hex = [0; 20];
        let at = hex.len() - chunked::size_line(data.len(), &mut hex).len();
        self.line = (hex, at);
        self.data = data;
        self.tail = if last { b"\r\n0\r\n\r\n" } else { b"\r\n" };
    }
}

impl Exchange {
    /// Drives the exchange until the response head arrives (1xx heads are skipped).
    pub(crate) fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<()>, ExchangeError>> {
        loop {
            if let Conn::Connecting(connecting) = &mut self.conn {
                let stream =
                    ready!(connecting.as_mut().poll(cx)).map_err(ExchangeError::Connect)?;
                self.conn = Conn::Open(stream);
            }
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if !self.buf.is_empty()
                && let Some(head) = response::parse(&mut self.buf, self.head_request)?
            {
                if head.status.is_informational() {
                    continue;
                }
                self.keep_alive = head.keep_alive;
                self.read = match head.framing {
                    Framing::Empty | Framing::Length(0) => Read::Done,
                    Framing::Length(n) => Read::Length(n),
                    Framing::Chunked => Read::Chunked(Chunk::Size),
                    Framing::UntilClose => Read::UntilClose,
                };
                if self.read == Read::Done {
                    // hyper reads no body that says it has ended: give the connection back now
                    self.finish();
                }
                let mut res = Response::new(());
                *res.status_mut() = head.status;
                *res.version_mut() = head.version;
                *res.headers_mut() = head.headers;
                return Poll::Ready(Ok(res));
            }
            if ready!(self.poll_fill(cx)).map_err(ExchangeError::Io)? == 0 {
                return Poll::Ready(Err(ExchangeError::ClosedBeforeHead));
            }
        }
    }

    /// Sends what can be sent without waiting: `Ready(Ok)` once the whole request is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        if !matches!(self.conn, Conn::Open(_)) {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.out.data.is_empty() && self.out.tail.is_empty() && self.body.is_some() {
                self.poll_body(cx)?;
            }
            let Conn::Open(stream) = &mut self.conn else { return Poll::Ready(Ok(())) };
            if self.out.is_empty() {
                return if self.body.is_none() { Poll::Ready(Ok(())) } else { Poll::Pending };
            }
            let wrote = loop {
                ready!(stream.poll_write_ready(cx)).map_err(ExchangeError::Io)?;
                match stream.try_write_vectored(&self.out.slices()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => break other.map_err(ExchangeError::Io)?,
                }
            };
            if wrote == 0 {
                return Poll::Ready(Err(ExchangeError::Io(io::ErrorKind::WriteZero.into())));
            }
            self.out.advance(wrote);
        }
    }

    /// Takes the request body's next frame into `out`, if one is ready.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        let Some(body) = &mut self.body else { return Ok(()) };
        let length_error = |what| {
            let err = io::Error::new(io::ErrorKind::InvalidData, what);
            ExchangeError::RequestBody(BodyError::Client(err.into()))
        };
        loop {
            let frame = match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Some(Err(e))) => return Err(ExchangeError::RequestBody(e)),
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) => {
                    if let RequestFraming::Length(n) = self.framing
                        && self.sent != n
                    {
                        return Err(length_error(
                            "the request body is shorter than its Content-Length",
                        ));
                    }
                    if self.framing == RequestFraming::Chunked {
                        self.out.tail = b"0\r\n\r\n";
                    }
                    self.body = None;
                    return Ok(());
                }
            };
            let data = match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => data,
                Err(frame) => {
                    // trailers: sent in the last chunk when chunked, dropped otherwise
                    if let (Ok(trailers), RequestFraming::Chunked) =
                        (frame.into_trailers(), self.framing)
                    {
                        if self.out.head_at == self.out.head.len() {
                            self.out.head.clear();
                            self.out.head_at = 0;
                        }
                        self.out.head.extend_from_slice(b"0\r\n");
                        for (name, value) in &trailers {
                            for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"]
                            {
                                self.out.head.extend_from_slice(part);
                            }
                        }
                        self.out.head.extend_from_slice(b"\r\n");
                        self.framing = RequestFraming::Empty;
                    }
                    continue;
                }
            };
            self.sent += data.len() as u64;
            let last = body.is_end_stream();
            match self.framing {
                RequestFraming::Chunked => self.out.chunk(data, last),
                RequestFraming::Length(n) if self.sent > n => {
                    return Err(length_error("the request body is longer than its Content-Length"));
                }
                _ => self.out.data = data,
            }
            if last {
                if let RequestFraming::Length(n) = self.framing
                    && self.sent != n
                {
                    return Err(length_error(
                        "the request body is shorter than its Content-Length",
                    ));
                }
                self.body = None;
            }
            return Ok(());
        }
    }

    /// Reads more of the response into `buf`; `Ready(Ok(0))` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Conn::Open(stream) = &mut self.conn else { return Poll::Ready(Ok(0)) };
        if self.buf.capacity() == 0 {
            self.buf = buf::take();
        } else if self.buf.capacity() - self.buf.len() < buf::READ_SIZE / 2 {
            self.buf.reserve(buf::READ_SIZE);
        }
        loop {
            ready!(stream.poll_read_ready(cx))?;
            match buf::read_drained(stream, &mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    /// The response body's next frame.
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        if (self.body.is_some() || !self.out.is_empty())
            && let Poll::Ready(Err(e)) = self.poll_send(cx)
        {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match self.read {
                Read::Head => unreachable!("a response body is read after its head"),
                Read::Done => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Read::Length(left) if !self.buf.is_empty() => {
                    let n = (self.buf.len() as u64).min(left);
                    let data = self.buf.split_to(n as usize).freeze();
                    self.read = Read::Length(left - n);
                    if n == left {
                        // the last bytes: hyper polls no further once the body says it ended
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Read::UntilClose if !self.buf.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(self.buf.split().freeze()))));
                }
                Read::Chunked(at) if !self.buf.is_empty() => match chunked::step(at, &self.buf) {
                    Step::Need => {}
                    Step::Malformed => return Poll::Ready(Some(Err(ExchangeError::Chunked))),
                    Step::Took { n, next } => {
                        self.read = next.map_or(Read::Done, Read::Chunked);
                        if let Chunk::Data(_) = at {
                            return Poll::Ready(Some(Ok(Frame::data(
                                self.buf.split_to(n).freeze(),
                            ))));
                        }
                        let line = self.buf.split_to(n);
                        if at == Chunk::Trailers && next.is_some() {
                            self.trailer(&line)?;
                        } else if next.is_none()
                            && let Some((trailers, _)) = self.trailers.take()
                        {
                            self.finish();
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        continue;
                    }
                },
                _ => {}
            }
            match ready!(self.poll_fill(cx)) {
                Err(e) => return Poll::Ready(Some(Err(ExchangeError::Io(e)))),
                Ok(0) if self.read == Read::UntilClose => self.read = Read::Done,
                Ok(0) => return Poll::Ready(Some(Err(ExchangeError::Truncated))),
                Ok(_) => {}
            }
        }
    }

    /// Keeps one trailer field line (CRLF included).
    fn trailer(&mut self, line: &[u8]) -> Result<(), ExchangeError> {
        let (trailers, size) = self.trailers.get_or_insert_with(|| (HeaderMap::new(), 0));
        *size += line.len();
        let (name, value) =
            chunked::trailer_field(&line[..line.len() - 2]).ok_or(ExchangeError::Trailer)?;
        if *size > chunked::MAX_TRAILERS {
            return Err(ExchangeError::Trailer);
        }
        trailers.append(name, value);
        Ok(())
    }

    /// The response is read: the connection goes back to its endpoint if both messages are
    /// complete, nothing more was sent, and the upstream keeps it alive; else it closes.
    fn finish(&mut self) {
        self.read = Read::Done;
        let conn = std::mem::replace(&mut self.conn, Conn::Closed);
        let sent = self.body.is_none() && self.out.is_empty();
        if let Conn::Open(stream) = conn
            && self.keep_alive
            && sent
            && self.buf.is_empty()
        {
            self.idle.put(stream, self.idle_timeout);
        }
        buf::give(std::mem::take(&mut self.buf));
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.read == Read::Done
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.read {
            Read::Length(n) => SizeHint::with_exact(n),
            Read::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// An upstream's response body read by its exchange.
#[derive(Debug)]
pub struct ResponseBody(pub(crate) Box<Exchange>);

impl ResponseBody {
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.0.poll_frame(cx).map_err(|e| match e {
            ExchangeError::RequestBody(e) => e,
            e => BodyError::Upstream(e.into()),
        })
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}
