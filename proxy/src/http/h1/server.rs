//! Our own HTTP/1.1 server for the app's outbound connections (issue 20): each request head is
//! checked and parsed once, by the framing guard's rules (`guard/head.rs`), the request goes to
//! the service with its body read straight from the connection (`incoming.rs`), and the answer
//! is written with vectored writes (`encode.rs`). The connection holds no buffer while idle.
//!
//! What this server does not do itself it leaves to hyper behind the framing guard, for the
//! rest of the connection, from the head it declined with every byte already read: HTTP/2's
//! preface, an upgrade or CONNECT, `Expect: 100-continue`, a head that did not arrive whole in
//! one read (the guard's `header_read_timeout` then holds a slow client to its deadline), and
//! any head the guard refuses (it answers 400/431 as it always has). One behaviour, two paths:
//! the common request takes the short one.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http::Body;
use crate::http::forward::{ConnectionOptions, keeps};
use crate::http::guard::{Framing, GuardLimits, H2_PREFACE, Head, with_checked_head};
use crate::http::h1::buf::{self, READ_SIZE};
use crate::http::h1::chunked::Chunk;
use crate::http::h1::encode::{Asked, write_response};
use crate::http::h1::incoming::{Conn, Left, RequestBody, Returned};

/// How a connection left this server.
#[derive(Debug)]
pub(crate) enum Ended {
    Closed,
    /// A head this server leaves to hyper: the connection, the bytes already read from it and
    /// not yet answered, and whether it served requests before (an HTTP/2 preface is then no
    /// longer a connection's start, and is a malformed head).
    Handover(TcpStream, Bytes, bool),
}

/// A request ready for the service, with what its answer must honour.
struct Parsed {
    req: Request<()>,
    asked: Asked,
    framing: Framing,
}

/// Serves `stream` until it closes, idles past `idle_timeout`, `stop` turns true between
/// requests, or a head is left to hyper.
pub(crate) async fn serve<S>(
    stream: TcpStream,
    limits: GuardLimits,
    service: S,
    mut stop: watch::Receiver<bool>,
) -> Ended
where
    S: hyper::service::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let conn = Conn::new(stream, limits.idle_timeout);
    let mut buf = BytesMut::new();
    let mut first = true;
    let mut served = false;
    loop {
        if buf.is_empty() {
            // idle: no buffer held until the client's next bytes arrive
            buf::give(std::mem::take(&mut buf));
            let readable = tokio::select! {
                // a new connection must start its first head within header_read_timeout, as the
                // guard holds it to; between requests, idle_timeout
                readable = tokio::time::timeout(
                    if first { limits.header_read_timeout } else { limits.idle_timeout },
                    readable(&conn.stream),
                ) => readable,
                _ = stop.wait_for(|stop| *stop) => return Ended::Closed,
            };
            if !matches!(readable, Ok(Ok(()))) {
                return Ended::Closed;
            }
            buf = buf::take();
            match buf::read_drained(&conn.stream, &mut buf) {
                Ok(0) => return Ended::Closed,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return Ended::Closed,
            }
        }
        if std::mem::take(&mut first) && H2_PREFACE.starts_with(&buf[..buf.len().min(3)]) {
            return handover(conn, buf, served);
        }
        let Some(len) = head_len(&buf, limits.max_header_bytes) else {
            return handover(conn, buf, served);
        };
        // the head's bytes are shared by the request's fields: no copy of each
        let head = buf.split_to(len).freeze();
        let Some(Parsed { req, mut asked, framing }) = parse(&head, limits.max_headers) else {
            let mut unread = BytesMut::from(&head[..]);
            unread.extend_from_slice(&buf);
            return handover(conn, unread, served);
        };
        let body = match framing {
            Framing::None => Body::empty(),
            Framing::Length(n) => Body::H1Request {
                inner: RequestBody::new(conn.clone(), buf.split(), Left::Length(n)),
            },
            Framing::Chunked => Body::H1Request {
                inner: RequestBody::new(conn.clone(), buf.split(), Left::Chunked(Chunk::Size)),
            },
        };
        let body_out = framing != Framing::None;
        let res = {
            let answer = service.call(req.map(|()| body));
            tokio::pin!(answer);
            loop {
                // while the answer is awaited, a client that goes away cancels the request (as
                // hyper does); bytes of a pipelined request wait in `buf`
                let watch_client = !body_out && buf.len() < limits.max_header_bytes + READ_SIZE;
                tokio::select! {
                    biased;
                    res = &mut answer => break res,
                    readable = readable(&conn.stream), if watch_client => {
                        if readable.is_err() {
                            return Ended::Closed;
                        }
                        buf.reserve(READ_SIZE / 2);
                        match buf::read_drained(&conn.stream, &mut buf) {
                            Ok(0) => return Ended::Closed,
                            Ok(_) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => return Ended::Closed,
                        }
                    }
                }
            }
        };
        let Ok(res) = res;
        // a body dropped unread leaves the connection unusable: say so in the answer
        if *stop.borrow() || (body_out && conn.lost()) {
            asked.keep_alive = false;
        }
        let kept = write_response(&conn.stream, res, asked, limits.idle_timeout).await;
        served = true;
        if body_out {
            match conn.take_returned() {
                Returned::Rest(rest) => buf = rest,
                // the rest of the body is unread: closing on it could reset the connection
                // before the client read the answer
                Returned::Lost | Returned::Nothing => return Box::pin(linger(conn)).await,
            }
        }
        match kept {
            Ok(true) => {}
            Ok(false) if !buf.is_empty() => return Box::pin(linger(conn)).await,
            Ok(false) | Err(_) => return Ended::Closed,
        }
    }
}

/// How long a closing connection reads what the client still sends, so that closing on unread
/// bytes does not reset the connection before the client read its answer.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Closes the connection gently: our side first, then what the client sends is read and
/// dropped until it closes too, for at most [`LINGER`].
async fn linger(conn: Arc<Conn>) -> Ended {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let Ok(conn) = Arc::try_unwrap(conn) else { return Ended::Closed };
    let mut stream = conn.stream;
    let drain = async {
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
    Ended::Closed
}

/// Resolves when the client's socket has bytes (or its end) to read. Polled, not `readable()`:
/// tokio keeps one waker for a poll, where `readable()` queues one per call.
fn readable(stream: &TcpStream) -> impl std::future::Future<Output = std::io::Result<()>> + '_ {
    std::future::poll_fn(|cx| stream.poll_read_ready(cx))
}

fn handover(conn: Arc<Conn>, buf: BytesMut, served: bool) -> Ended {
    match Arc::try_unwrap(conn) {
        Ok(conn) => Ended::Handover(conn.stream, buf.freeze(), served),
        Err(_) => Ended::Closed,
    }
}

/// The length of the complete head `buf` starts with, if this server takes it: within
/// `max_header_bytes`, every line ending in CRLF (a bare LF is the guard's to refuse).
fn head_len(buf: &[u8], max_header_bytes: usize) -> Option<usize> {
    let end = memchr::memmem::find(&buf[..buf.len().min(max_header_bytes + 1)], b"\r\n\r\n")?;
    let len = end + 4;
    let head = &buf[..len];
    if len > max_header_bytes
        || memchr::memchr_iter(b'\n', head).any(|at| at == 0 || head[at - 1] != b'\r')
    {
        return None;
    }
    Some(len)
}

/// The request `head` carries, if this server takes it: the guard's checks pass and it asks
/// for nothing this server leaves to hyper.
fn parse(head: &Bytes, max_headers: usize) -> Option<Parsed> {
    with_checked_head(head, max_headers, |req, checked| build(head, req, checked)).ok()?
}

fn build(head: &Bytes, req: &httparse::Request<'_, '_>, checked: Head) -> Option<Parsed> {
    if checked.upgrade {
        return None;
    }
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let uri = Uri::from_maybe_shared(head.slice_ref(req.path?.as_bytes())).ok()?;
    let version = if req.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // room for the fields the layers add (attempt, deadline, trace): no growth on the way
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 6);
    let mut connection = ConnectionOptions::default();
    for field in req.headers.iter().filter(|f| f.name.eq_ignore_ascii_case("connection")) {
        connection.read(field.value);
    }
    let mut trailers = false;
    for field in req.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        if name == header::EXPECT {
            return None;
        }
        if name == header::TE {
            trailers |= field
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
        }
        if keeps(&name, connection) {
            let value = HeaderValue::from_maybe_shared(head.slice_ref(field.value)).ok()?;
            headers.append(name, value);
        }
    }
    let mut built = Request::new(());
    *built.method_mut() = method;
    *built.uri_mut() = uri;
    *built.version_mut() = version;
    *built.headers_mut() = headers;
    let asked = Asked {
        head: built.method() == Method::HEAD,
        http11: version == Version::HTTP_11,
        trailers,
        keep_alive: !connection.close && (version == Version::HTTP_11 || connection.keep_alive),
    };
    Some(Parsed { req: built, asked, framing: checked.framing })
}
