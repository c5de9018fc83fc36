//! The connection guard: strict HTTP/1 framing and client deadlines, in front of hyper.
//!
//! hyper accepts a request with both `Content-Length` and `Transfer-Encoding` (it drops the
//! length) and answers its own parse errors without our `outrigger-error` header. DESIGN.md wants
//! such requests refused with 400 and nothing forwarded, so this reader scans each request head
//! before hyper sees a byte of it (RFC 9112 sections 2.2, 5.2, 6.1 and 6.3), follows the body
//! framing to find the next head, and on a violation hands hyper a synthetic head that routes to a
//! 400/431 answer with `connection: close`. It also cuts a client off that trickles its headers
//! past `header_read_timeout` or sends nothing for `idle_timeout`. HTTP/2 (prior knowledge) and
//! upgraded connections pass through: their framing is length-prefixed or no longer HTTP/1.
//!
//! The guard and hyper must never disagree on where a message ends, or the bytes the guard
//! took for a body are a request to hyper (smuggling). So the guard reads no more leniently than
//! hyper does: a bare LF in a head is refused (RFC 9112 2.2 lets a recipient refuse it; httparse
//! would end a head at `\n\n`), chunk lines and the CRLF after chunk data are read exactly as
//! hyper's decoder reads them, and a connection becomes a tunnel only once the answer to its
//! upgrade request is a real `101` (or a 2xx to CONNECT): until then the next head waits, and is
//! checked like any other.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use outrigger_discovery::time::saturating_add;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::http::idle::{Activity, Upgrade};

mod head;
use head::check_head;
pub(crate) use head::refusal;
pub(crate) use head::{Framing, Head, parse_length, with_checked_head};

use crate::http::h1::chunked::{self, Chunk, Step};

/// The header a synthetic head carries to the router: `"<status> <reason>"`.
pub(crate) const REJECTED_HEADER: &str = "outrigger-rejected";

pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const READ_CHUNK: usize = 8 * 1024;
/// Below this much room in hyper's buffer (the first bytes, which hyper's protocol sniffing reads
/// 24 at a time), reads go through `storage`.
const MIN_DIRECT_READ: usize = 1024;

/// What the guard enforces, from `outbound.limits`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GuardLimits {
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Connection start: an HTTP/1 head or the HTTP/2 preface?
    Sniff,
    /// Waiting for the next request head; its bytes are held back until it is complete and valid.
    Head,
    /// `Content-Length` body bytes still to come.
    Body(u64),
    Chunked(Chunk),
    /// An upgrade request (or CONNECT) is through: until its answer says whether the connection
    /// became a tunnel, nothing more is handed over.
    AwaitUpgrade,
    /// HTTP/2, or an upgraded connection: bytes are not HTTP/1 framing any more.
    Passthrough,
    /// A synthetic head was queued; nothing more is read from the client.
    Rejected,
    /// The chunked framing of a body already forwarded is malformed: end the connection.
    Broken,
}

/// Wraps a client connection; hyper reads and writes through it.
#[derive(Debug)]
pub(crate) struct GuardedIo<T> {
    inner: T,
    limits: GuardLimits,
    /// `storage[start..end]` holds bytes read from the client that hyper has not taken yet;
    /// the first `released` of them are approved.
    storage: Vec<u8>,
    start: usize,
    end: usize,
    released: usize,
    /// How far the current head has been searched for its end, so a trickled head is not
    /// rescanned from its start on every byte.
    head_searched: usize,
    /// Whether `storage` was given back once the first head was through (see `poll_read`).
    storage_returned: bool,
    state: State,
    /// Heads handed over so far: the index of the next one among the connection's requests.
    heads: u64,
    /// The head being read asked for an upgrade; once its body is through, wait for the answer.
    upgrade_pending: bool,
    synthetic: Bytes,
    head_started: Option<Instant>,
    /// When a byte last moved either way; shared with the connection's idle watcher.
    activity: Arc<Activity>,
    timer: Pin<Box<Sleep>>,
}

impl<T> GuardedIo<T> {
    pub(crate) fn new(inner: T, limits: GuardLimits, activity: Arc<Activity>) -> Self {
        let now = Instant::now();
        Self {
            inner,
            limits,
            storage: Vec::new(),
            start: 0,
            end: 0,
            released: 0,
            head_searched: 0,
            storage_returned: false,
            state: State::Sniff,
            heads: 0,
            upgrade_pending: false,
            synthetic: Bytes::new(),
            // a connection that sends nothing is held to the header deadline: a slowloris
            // client opens connections and never finishes a head
            head_started: Some(now),
            activity,
            timer: Box::pin(tokio::time::sleep_until(saturating_add(
                now,
                limits.header_read_timeout,
            ))),
        }
    }

    /// A connection whose first bytes were already read by our own HTTP/1 server, which leaves
    /// it to hyper from here (`h1/server.rs`): `read` is checked and handed over first. After
    /// requests were `served`, the bytes are a head, never the HTTP/2 preface.
    pub(crate) fn with_read(
        inner: T,
        limits: GuardLimits,
        activity: Arc<Activity>,
        read: &[u8],
        served: bool,
    ) -> Self {
        let mut io = Self::new(inner, limits, activity);
        if served {
            io.state = State::Head;
        }
        if !read.is_empty() {
            io.storage = read.to_vec();
            io.end = read.len();
            io.scan_storage();
        }
        io
    }

    fn deadline(&self) -> Instant {
        match (self.state, self.head_started) {
            (State::Sniff | State::Head, Some(started)) => {
                saturating_add(started, self.limits.header_read_timeout)
            }
            _ => saturating_add(self.activity.last(), self.limits.idle_timeout),
        }
    }

    /// Pending, unless the connection's deadline has passed: then a `TimedOut` error, which makes
    /// hyper close the connection. The timer is only moved when it fires early (activity pushed
    /// the deadline back) or a head starts, not on every read.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            let deadline = self.deadline();
            if Instant::now() >= deadline {
                let what = match self.state {
                    State::Sniff | State::Head => "request headers not received in time",
                    _ => "connection idle",
                };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
            }
            self.timer.as_mut().reset(deadline);
        }
    }

    fn head_begins(&mut self, now: Instant) {
        if self.head_started.is_none() {
            self.head_started = Some(now);
            let deadline = saturating_add(now, self.limits.header_read_timeout);
            if self.timer.deadline() > deadline {
                self.timer.as_mut().reset(deadline);
            }
        }
    }

    /// Approves what can be approved of `held[self.released..]`, following the framing;
    /// `held` is what was read from the client and not yet handed to hyper.
    fn scan(&mut self, held: &[u8]) {
        loop {
            let from = self.released;
            let unscanned = held.len() - from;
            if unscanned == 0 {
                return;
            }
            let seen = &held[from..];
            match self.state {
                State::Sniff => {
                    let n = seen.len().min(H2_PREFACE.len());
                    if seen[..n] != H2_PREFACE[..n] {
                        self.state = State::Head;
                    } else if n == H2_PREFACE.len() {
                        self.state = State::Passthrough;
                    } else {
                        return; // a prefix of the preface: wait for more
                    }
                }
                State::Head => {
                    // RFC 9112 2.2: empty lines before a request line are ignored, as httparse
                    // ignores them (CRLF or LF); a lone CR at the end may be the start of one
                    if self.head_searched == 0 {
                        match seen {
                            [b'\n', ..] => {
                                self.released += 1;
                                continue;
                            }
                            [b'\r', b'\n', ..] => {
                                self.released += 2;
                                continue;
                            }
                            [b'\r'] => return,
                            _ => {}
                        }
                    }
                    self.head_begins(Instant::now());
                    if !self.scan_head(seen) {
                        return;
                    }
                }
                State::Body(left) => {
                    let n = (unscanned as u64).min(left);
                    self.released += n as usize;
                    self.state = if n == left { self.next_head() } else { State::Body(left - n) };
                }
                State::Chunked(chunk) => {
                    if !self.scan_chunked(seen, chunk) {
                        return;
                    }
                }
                State::AwaitUpgrade => {
                    if !self.settle_upgrade(None) {
                        return;
                    }
                }
                State::Passthrough => {
                    self.released += unscanned;
                }
                State::Rejected | State::Broken => return,
            }
        }
    }

    /// [`scan`](Self::scan) over `storage`; a rejection drops what follows the refused head.
    fn scan_storage(&mut self) {
        let storage = std::mem::take(&mut self.storage);
        self.scan(&storage[self.start..self.end]);
        self.storage = storage;
        if self.state == State::Rejected {
            self.end = self.start + self.released;
        }
    }

    /// The state after a message: the next head, or the answer to an upgrade request.
    fn next_head(&mut self) -> State {
        self.head_started = None;
        self.head_searched = 0;
        if std::mem::take(&mut self.upgrade_pending) { State::AwaitUpgrade } else { State::Head }
    }

    /// Leaves `AwaitUpgrade` once the upgrade request's answer is known: a tunnel from here on,
    /// or HTTP/1 with the next head checked as usual. Returns whether it left; while the answer
    /// is still to come, `waker` (if given) is woken when it arrives.
    fn settle_upgrade(&mut self, waker: Option<&std::task::Waker>) -> bool {
        match self.activity.upgrade_verdict(waker) {
            Upgrade::Pending => false,
            Upgrade::Tunnel => {
                self.state = State::Passthrough;
                true
            }
            Upgrade::Http => {
                self.state = State::Head;
                true
            }
        }
    }

    /// Looks for the end of the head that `seen` starts with; returns whether progress was made.
    /// A head ends at its first empty line, and every line ends in CRLF: a bare LF is refused at
    /// once, since httparse (and so hyper) would end lines, and the head, where the guard would not.
    fn scan_head(&mut self, seen: &[u8]) -> bool {
        let mut from = self.head_searched;
        let mut end = None;
        // only the bytes a head may span are searched: a bare LF past the size limit is never
        // reached, so the answer (431) does not depend on how the bytes were cut into reads
        let seen = &seen[..seen.len().min(self.limits.max_header_bytes + 1)];
        while let Some(at) = memchr::memchr(b'\n', &seen[from..]).map(|i| from + i) {
            if at == 0 || seen[at - 1] != b'\r' {
                self.reject(400, "a request head line ends in a bare LF (expected CRLF)");
                return true;
            }
            if at >= 3 && seen[at - 3..at - 1] == *b"\r\n" {
                end = Some(at + 1);
                break;
            }
            from = at + 1;
        }
        let too_large = end.unwrap_or(seen.len()) > self.limits.max_header_bytes;
        if too_large {
            let reason = format!("request headers exceed {} bytes", self.limits.max_header_bytes);
            self.reject(431, &reason);
            return true;
        }
        let Some(end) = end else {
            self.head_searched = seen.len();
            return false;
        };
        match check_head(&seen[..end], self.limits.max_headers) {
            Ok(head) => {
                self.released += end;
                self.heads += 1;
                if head.upgrade {
                    // hyper turns the connection into a tunnel if the answer is a 101 (or a 2xx
                    // to CONNECT): the guard waits for that answer before reading on
                    self.activity.expect_upgrade(self.heads - 1);
                    self.upgrade_pending = true;
                }
                self.state = match head.framing {
                    Framing::None => self.next_head(),
                    Framing::Length(n) => {
                        self.head_searched = 0;
                        State::Body(n)
                    }
                    Framing::Chunked => {
                        self.head_searched = 0;
                        State::Chunked(Chunk::Size)
                    }
                };
            }
            Err((status, reason)) => self.reject(status, &reason),
        }
        true
    }

    /// Follows a chunked body exactly as hyper's decoder reads it (`h1/chunked.rs`). Broken
    /// framing breaks the connection (`Broken`): the request is the client's, malformed, and
    /// must not be read on from a point hyper might read differently.
    fn scan_chunked(&mut self, seen: &[u8], chunk: Chunk) -> bool {
        match chunked::step(chunk, seen) {
            Step::Need => false,
            Step::Malformed => {
                self.state = State::Broken;
                false
            }
            Step::Took { n, next } => {
                self.released += n;
                self.state = match next {
                    Some(next) => State::Chunked(next),
                    None => self.next_head(),
                };
                true
            }
        }
    }

    /// Replace the offending head with a synthetic one; the router answers it with `status`.
    /// Nothing after the approved bytes reaches hyper.
    fn reject(&mut self, status: u16, reason: &str) {
        tracing::debug!(status, reason, "request refused by the framing guard");
        self.synthetic = Bytes::from(format!(
            "GET / HTTP/1.1\r\nhost: outrigger.invalid\r\n{REJECTED_HEADER}: {status} {reason}\r\n\r\n"
        ));
        self.state = State::Rejected;
    }
}

// === impl GuardedIo: AsyncRead ===

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.released > 0 {
                let n = this.released.min(out.remaining());
                out.put_slice(&this.storage[this.start..this.start + n]);
                this.start += n;
                this.released -= n;
                if this.start == this.end {
                    (this.start, this.end) = (0, 0);
                    // a connection's first head comes through `storage` (hyper's protocol
                    // sniffing reads 24 bytes at a time); later reads go straight into hyper's
                    // buffer, so the 8 KiB go back, once, rather than stay for the connection's
                    // life (a head cut by a read still comes through `storage`)
                    if !this.storage_returned && this.state != State::Sniff {
                        this.storage = Vec::new();
                        this.storage_returned = true;
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if this.state == State::Broken {
                // the request is already forwarded: all that is left is to end it
                let e = io::Error::new(io::ErrorKind::InvalidData, "malformed chunked body");
                return Poll::Ready(Err(e));
            }
            if this.state == State::AwaitUpgrade {
                if !this.settle_upgrade(Some(cx.waker())) {
                    // nothing more is read meanwhile: the answer decides what the bytes are
                    ready!(this.poll_deadline(cx))?;
                    return Poll::Pending;
                }
                this.scan_storage();
                continue;
            }
            if this.state == State::Rejected {
                if this.synthetic.is_empty() {
                    // never EOF: hyper writes the refusal, sees `connection: close` and closes
                    ready!(this.poll_deadline(cx))?;
                    return Poll::Pending;
                }
                let n = this.synthetic.len().min(out.remaining());
                out.put_slice(&this.synthetic.split_to(n));
                return Poll::Ready(Ok(()));
            }
            // zero-copy: nothing held back, so read straight into hyper's buffer and scan there
            if this.start == this.end && out.remaining() >= MIN_DIRECT_READ {
                if ready!(this.read_direct(cx, out))? {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match this.fill(cx) {
                Poll::Ready(Ok(0)) => {
                    // EOF: hand over what is held back; hyper reports the incomplete message
                    this.released = this.end - this.start;
                    if this.released == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(_)) => this.scan_storage(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    ready!(this.poll_deadline(cx))?;
                    return Poll::Pending;
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> GuardedIo<T> {
    /// Reads straight into hyper's buffer and scans the bytes there. What is approved stays;
    /// an unfinished tail (a head, chunk line or preface cut by the read) is moved to `storage`
    /// and taken back from `out`. Ready(true): `out` has bytes for hyper, or the client is
    /// done (EOF); Ready(false): nothing approved yet, read on.
    fn read_direct(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<bool>> {
        let before = out.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, out) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                ready!(self.poll_deadline(cx))?;
                return Poll::Pending;
            }
        }
        let fresh = &out.filled()[before..];
        if fresh.is_empty() {
            return Poll::Ready(Ok(true));
        }
        self.activity.touch();
        self.scan(fresh);
        let approved = std::mem::take(&mut self.released);
        let tail = &fresh[approved..];
        if !tail.is_empty() && !matches!(self.state, State::Rejected | State::Broken) {
            if self.storage.len() < tail.len() {
                self.storage.resize(tail.len(), 0);
            }
            self.storage[..tail.len()].copy_from_slice(tail);
            (self.start, self.end) = (0, tail.len());
        }
        out.set_filled(before + approved);
        Poll::Ready(Ok(approved > 0))
    }

    /// Reads more client bytes into `storage`; the number read, 0 at EOF.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.start > 0 && self.storage.len() - self.end < READ_CHUNK {
            self.storage.copy_within(self.start..self.end, 0);
            (self.end, self.start) = (self.end - self.start, 0);
        }
        let want = self.end + READ_CHUNK;
        if self.storage.len() < want {
            // grows only as far as a head needs: max_header_bytes plus one read
            self.storage.resize(want, 0);
        }
        let mut buf = ReadBuf::new(&mut self.storage[self.end..]);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        if n > 0 {
            self.end += n;
            self.activity.touch();
        }
        Poll::Ready(Ok(n))
    }
}

// === impl GuardedIo: AsyncWrite ===

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> GuardedIo<T> {
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                self.activity.touch();
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                // a client that stops reading our response is idle too
                ready!(self.poll_deadline(cx))?;
                Poll::Pending
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
