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

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use outrigger_discovery::time::saturating_add;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::http::idle::Activity;

/// The header a synthetic head carries to the router: `"<status> <reason>"`.
pub(crate) const REJECTED_HEADER: &str = "outrigger-rejected";

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const READ_CHUNK: usize = 8 * 1024;
/// Below this much room in hyper's buffer (the first bytes, which hyper's protocol sniffing reads
/// 24 at a time), reads go through `storage`.
const MIN_DIRECT_READ: usize = 1024;
const MAX_CHUNK_LINE: usize = 4 * 1024;
const STACK_HEADERS: usize = 128;

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
    /// HTTP/2, or an upgraded connection: bytes are not HTTP/1 framing any more.
    Passthrough,
    /// A synthetic head was queued; nothing more is read from the client.
    Rejected,
    /// The chunked framing of a body already forwarded is malformed: end the connection.
    Broken,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
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
                    // RFC 9112 2.2: empty lines before a request line are ignored (hyper too)
                    let skip = seen.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
                    if skip > 0 && self.head_searched == 0 {
                        self.released += skip;
                        continue;
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

    fn next_head(&mut self) -> State {
        self.head_started = None;
        self.head_searched = 0;
        State::Head
    }

    /// Looks for the end of the head that `seen` starts with; returns whether progress was made.
    fn scan_head(&mut self, seen: &[u8]) -> bool {
        let search_from = self.head_searched.saturating_sub(3);
        let Some(end) = find(&seen[search_from..], b"\r\n\r\n").map(|i| search_from + i + 4) else {
            self.head_searched = seen.len();
            if seen.len() > self.limits.max_header_bytes {
                let reason =
                    format!("request headers exceed {} bytes", self.limits.max_header_bytes);
                self.reject(431, &reason);
                return true;
            }
            return false;
        };
        if end > self.limits.max_header_bytes {
            let reason = format!("request headers exceed {} bytes", self.limits.max_header_bytes);
            self.reject(431, &reason);
            return true;
        }
        match check_head(&seen[..end], self.limits.max_headers) {
            Ok(next) => {
                self.released += end;
                self.head_searched = 0;
                self.state = match next {
                    Framing::None => self.next_head(),
                    Framing::Length(n) => State::Body(n),
                    Framing::Chunked => State::Chunked(Chunk::Size),
                    Framing::Upgrade => State::Passthrough,
                };
            }
            Err((status, reason)) => self.reject(status, &reason),
        }
        true
    }

    fn scan_chunked(&mut self, seen: &[u8], chunk: Chunk) -> bool {
        let line_end = |seen: &[u8]| seen.iter().position(|b| *b == b'\n').map(|i| i + 1);
        let (used, next) = match chunk {
            Chunk::Data(left) => {
                let n = (seen.len() as u64).min(left);
                let next = if n == left { Chunk::DataEnd } else { Chunk::Data(left - n) };
                (n as usize, State::Chunked(next))
            }
            Chunk::Size | Chunk::DataEnd | Chunk::Trailers => {
                let Some(used) = line_end(seen) else {
                    if seen.len() > MAX_CHUNK_LINE {
                        self.state = State::Broken;
                    }
                    return false;
                };
                let line = &seen[..used];
                let next = match chunk {
                    Chunk::Size => match chunk_size(line) {
                        Some(0) => State::Chunked(Chunk::Trailers),
                        Some(n) => State::Chunked(Chunk::Data(n)),
                        None => {
                            self.state = State::Broken;
                            return false;
                        }
                    },
                    Chunk::DataEnd => State::Chunked(Chunk::Size),
                    _ if line == b"\r\n" || line == b"\n" => self.next_head(),
                    _ => State::Chunked(Chunk::Trailers),
                };
                (used, next)
            }
        };
        self.released += used;
        self.state = next;
        true
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

enum Framing {
    None,
    Length(u64),
    Chunked,
    Upgrade,
}

/// Checks one complete request head against RFC 9112's framing rules and our limits.
fn check_head(head: &[u8], max_headers: usize) -> Result<Framing, (u16, String)> {
    if max_headers <= STACK_HEADERS {
        let mut headers = [const { MaybeUninit::uninit() }; STACK_HEADERS];
        check_head_with(head, &mut headers[..max_headers])
    } else {
        let mut headers = vec![MaybeUninit::uninit(); max_headers];
        check_head_with(head, &mut headers)
    }
}

fn check_head_with<'h>(
    head: &'h [u8],
    headers: &mut [MaybeUninit<httparse::Header<'h>>],
) -> Result<Framing, (u16, String)> {
    let max = headers.len();
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, headers) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err((400, "incomplete request head".into())),
        Err(httparse::Error::TooManyHeaders) => {
            return Err((431, format!("more than {max} request headers")));
        }
        Err(e) => return Err((400, format!("malformed request head: {e}"))),
    }
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut upgrade = req.method == Some("CONNECT");
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            for part in h.value.split(|b| *b == b',') {
                let n = parse_length(part.trim_ascii())
                    .ok_or((400, "invalid Content-Length".to_string()))?;
                if length.is_some_and(|l| l != n) {
                    return Err((400, "conflicting Content-Length values".into()));
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case(REJECTED_HEADER) {
            return Err((400, format!("the {REJECTED_HEADER} header is reserved")));
        }
    }
    match (chunked, length) {
        (Some(_), Some(_)) => Err((400, "both Content-Length and Transfer-Encoding".into())),
        (Some(_), None) if req.version == Some(0) => {
            Err((400, "Transfer-Encoding in an HTTP/1.0 request".into()))
        }
        (Some(false), None) => Err((400, "Transfer-Encoding must end in chunked".into())),
        (Some(true), None) => Ok(Framing::Chunked),
        // an upgrade's bytes after the head are the new protocol's
        (None, _) if upgrade => Ok(Framing::Upgrade),
        (None, Some(n)) if n > 0 => Ok(Framing::Length(n)),
        (None, _) => Ok(Framing::None),
    }
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// The size of a chunk-size line (`1a;ext=v\r\n`); `None` when malformed.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let rest = &line[digits..];
    if !(rest.starts_with(b";")
        || rest.starts_with(b" ")
        || rest.starts_with(b"\t")
        || rest.starts_with(b"\r\n")
        || rest == b"\n")
    {
        return None;
    }
    let hex = std::str::from_utf8(&line[..digits]).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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
