//! A response written to an HTTP/1.1 client: the status line and fields into one buffer, the
//! body's framing chosen as hyper's server chooses it (the `Content-Length` the response
//! carries, the body's known size, else chunks, or the connection's close for an HTTP/1.0
//! client), a `date` field, and the body streamed with vectored writes.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Response, StatusCode};
use http_body::Body as _;
use tokio::net::TcpStream;

use crate::http::Body;
use crate::http::forward::has_token;
use crate::http::h1::chunked;
use crate::http::h1::request::itoa;

/// What the request asked of its answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked {
    pub(crate) head: bool,
    /// An HTTP/1.1 client (chunked answers allowed).
    pub(crate) http11: bool,
    /// The client sent `TE: trailers`.
    pub(crate) trailers: bool,
    /// The connection stays open after this answer, as far as the request goes.
    pub(crate) keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// Writes `res` for a request that asked `asked`; returns whether the connection may carry
/// another request. `idle` bounds each wait for the body's next bytes, as the idle watcher
/// bounds hyper's.
pub(crate) async fn write_response(
    stream: &TcpStream,
    res: Response<Body>,
    asked: Asked,
    idle: Duration,
) -> io::Result<bool> {
    let (parts, mut body) = res.into_parts();
    let status = parts.status;
    let bodiless = asked.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let said_close = has_token(&parts.headers, header::CONNECTION, "close");
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let framing = match (bodiless, length) {
        (true, _) => Framing::None,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => match body.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None if asked.http11 => Framing::Chunked,
            None => Framing::Close,
        },
    };
    let keep_alive = asked.keep_alive && !said_close && framing != Framing::Close;

    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    write_fields(&mut head, &parts.headers, framing, length.is_some());
    if !parts.headers.contains_key(header::DATE) {
        head.extend_from_slice(b"date: ");
        DATE.with(|date| head.extend_from_slice(&date.borrow_mut().now()));
        head.extend_from_slice(b"\r\n");
    }
    if !keep_alive && !said_close {
        head.extend_from_slice(b"connection: close\r\n");
    } else if keep_alive && !asked.http11 {
        // an HTTP/1.0 client keeps the connection only when told so
        head.extend_from_slice(b"connection: keep-alive\r\n");
    }
    head.extend_from_slice(b"\r\n");

    let mut out = Out { head, at: 0 };
    if framing == Framing::None {
        out.write(stream, &[], idle).await?;
        // an answer to HEAD carries the fields of its body, never the body
        return Ok(keep_alive && (asked.head || body.is_end_stream()));
    }
    let mut sent = 0u64;
    loop {
        let frame = match next_frame(&mut body, idle).await? {
            Some(frame) => frame,
            None => break,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let (Framing::Chunked, true, Ok(trailers)) =
                    (framing, asked.trailers, frame.into_trailers())
                {
                    let mut last = b"0\r\n".to_vec();
                    write_fields(&mut last, &trailers, Framing::None, true);
                    last.extend_from_slice(b"\r\n");
                    out.write(stream, &[IoSlice::new(&last)], idle).await?;
                    return Ok(keep_alive);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        match framing {
            Framing::Chunked => {
                let mut size = [0; 20];
                let line = chunked::size_line(data.len(), &mut size);
                out.write(
                    stream,
                    &[IoSlice::new(line), IoSlice::new(&data), IoSlice::new(b"\r\n")],
                    idle,
                )
                .await?;
            }
            Framing::Length(n) if sent > n => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "body longer than its length",
                ));
            }
            _ => out.write(stream, &[IoSlice::new(&data)], idle).await?,
        }
    }
    match framing {
        Framing::Chunked => out.write(stream, &[IoSlice::new(b"0\r\n\r\n")], idle).await?,
        Framing::Length(n) if sent != n => {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "body shorter than its length"));
        }
        _ => out.write(stream, &[], idle).await?,
    }
    Ok(keep_alive)
}

/// The body's next frame; a body that stalls for `idle` ends the connection.
async fn next_frame(
    body: &mut Body,
    idle: Duration,
) -> io::Result<Option<http_body::Frame<Bytes>>> {
    let mut body = std::pin::Pin::new(body);
    // most bodies have their bytes ready: no timer for those
    let ready =
        std::future::poll_fn(|cx| std::task::Poll::Ready(body.as_mut().poll_frame(cx))).await;
    let polled = match ready {
        std::task::Poll::Ready(polled) => polled,
        std::task::Poll::Pending => {
            let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx));
            tokio::time::timeout(idle, frame)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the response body stalled"))?
        }
    };
    polled.transpose().map_err(io::Error::other)
}

fn write_fields(out: &mut Vec<u8>, headers: &HeaderMap, framing: Framing, has_length: bool) {
    for (name, value) in headers {
        if *name == header::TRANSFER_ENCODING
            || (*name == header::CONTENT_LENGTH && framing == Framing::Chunked)
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) if !has_length => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
}

/// The head not yet written, sent before (and with) the next body bytes.
struct Out {
    head: Vec<u8>,
    at: usize,
}

impl Out {
    /// Writes what is left of the head, then `bufs`, whole; a client that reads none of it for
    /// `idle` has stalled, and the connection ends.
    async fn write(
        &mut self,
        stream: &TcpStream,
        bufs: &[IoSlice<'_>],
        idle: Duration,
    ) -> io::Result<()> {
        let total: usize = self.head.len() - self.at + bufs.iter().map(|b| b.len()).sum::<usize>();
        let mut written = 0;
        while written < total {
            let mut slices: [IoSlice<'_>; 4] = [IoSlice::new(&[]); 4];
            let mut k = 0;
            let mut offset = written;
            for part in std::iter::once(&self.head[self.at..]).chain(bufs.iter().map(|b| &**b)) {
                if offset >= part.len() {
                    offset -= part.len();
                    continue;
                }
                slices[k] = IoSlice::new(&part[offset..]);
                offset = 0;
                k += 1;
            }
            match stream.try_write_vectored(&slices[..k]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::timeout(idle, stream.writable()).await.map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")
                    })??;
                }
                Err(e) => return Err(e),
            }
        }
        self.at = self.head.len();
        Ok(())
    }
}

thread_local! {
    static DATE: RefCell<CachedDate> = const { RefCell::new(CachedDate { second: u64::MAX, text: [0; 29] }) };
}

/// The `date` field's value, formatted once a second per thread.
struct CachedDate {
    second: u64,
    text: [u8; 29],
}

impl CachedDate {
    fn now(&mut self) -> [u8; 29] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second {
            let text = httpdate::fmt_http_date(now);
            self.text.copy_from_slice(&text.as_bytes()[..29]);
            self.second = second;
        }
        self.text
    }
}
