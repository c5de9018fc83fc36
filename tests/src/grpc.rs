//! A scripted gRPC upstream and a bare gRPC client, over h2c on loopback: gRPC's framing is a
//! 5-byte prefix per message (compressed flag, big-endian length) and a status in trailers, or
//! in the head alone for a trailers-only answer, so a few dozen lines of hyper's HTTP/2 are the
//! whole protocol. No protobuf: messages are opaque bytes, which is all a proxy sees.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// One scripted answer to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcReply {
    /// Trailers-only: the status in the response head, no message.
    Status(u32),
    /// `Status` after this delay.
    Delayed(std::time::Duration, u32),
    /// One message (the request's own bytes echoed), then this status in the trailers.
    Message(u32),
    /// One message and the end of the stream, with no status at all (a broken server).
    NoStatus,
    /// A bidirectional stream: a message `ready` as soon as the request's first message
    /// arrives, then, once the client has ended its stream, `ok` in the trailers.
    Bidi,
}

/// What one call looked like on arrival.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub headers: HeaderMap,
    /// The request body as it arrived: length-prefixed messages.
    pub body: Bytes,
}

#[derive(Debug, Default)]
struct State {
    script: VecDeque<GrpcReply>,
    /// The last reply, repeated once the script is spent.
    last: Option<GrpcReply>,
    calls: Vec<Call>,
}

/// A gRPC server answering from a script; once spent, it repeats its last reply.
#[derive(Debug)]
pub struct GrpcUpstream {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl GrpcUpstream {
    pub async fn scripted(replies: impl IntoIterator<Item = GrpcReply>) -> Self {
        let script: VecDeque<GrpcReply> = replies.into_iter().collect();
        assert!(!script.is_empty(), "a script needs at least one reply");
        let state = Arc::new(Mutex::new(State { script, ..State::default() }));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free loopback port");
        let addr = listener.local_addr().expect("bound");
        let accept = tokio::spawn(accept(listener, state.clone()));
        Self { addr, state, accept }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many calls arrived.
    pub fn calls(&self) -> usize {
        self.state.lock().unwrap().calls.len()
    }

    pub fn seen(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept(listener: TcpListener, state: Arc<Mutex<State>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(state.clone(), req));
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Frames>, hyper::Error> {
    let (parts, mut body) = req.into_parts();
    let next = {
        let state = state.lock().unwrap();
        state.script.front().copied().or(state.last).expect("a scripted reply")
    };
    let body = match next {
        GrpcReply::Bidi => {
            // answer on the first message, then read the rest while the answer streams
            let first = loop {
                match body.frame().await {
                    Some(frame) => match frame?.into_data() {
                        Ok(data) if !data.is_empty() => break data,
                        _ => continue,
                    },
                    None => break Bytes::new(),
                }
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(Frame::data(frame(b"ready"))).await.expect("the body waits");
            tokio::spawn(async move {
                while let Some(Ok(_)) = body.frame().await {}
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let _ = tx.send(Frame::trailers(trailers)).await;
            });
            record(&state, &parts, first);
            let mut res = Response::new(Frames::Channel(rx));
            res.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
            return Ok(res);
        }
        _ => body.collect().await?.to_bytes(),
    };
    let reply = record(&state, &parts, body.clone());
    let mut res = Response::new(Frames::default());
    res.headers_mut().insert("content-type", HeaderValue::from_static("application/grpc"));
    match reply {
        GrpcReply::Status(status) => {
            res.headers_mut().insert("grpc-status", status.into());
        }
        GrpcReply::Delayed(delay, status) => {
            tokio::time::sleep(delay).await;
            res.headers_mut().insert("grpc-status", status.into());
        }
        GrpcReply::Message(status) => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", status.into());
            let echoed = if body.is_empty() { frame(b"") } else { body };
            *res.body_mut() =
                Frames::Fixed(VecDeque::from([Frame::data(echoed), Frame::trailers(trailers)]));
        }
        GrpcReply::NoStatus => *res.body_mut() = Frames::Fixed(VecDeque::from([Frame::data(body)])),
        GrpcReply::Bidi => unreachable!("answered above"),
    }
    Ok(res)
}

/// Takes the script's next reply and records the call.
fn record(state: &Mutex<State>, parts: &http::request::Parts, body: Bytes) -> GrpcReply {
    let mut state = state.lock().unwrap();
    let reply = state.script.pop_front().or(state.last).expect("a scripted reply");
    state.last = Some(reply);
    let path = parts.uri.path().to_owned();
    state.calls.push(Call { path, headers: parts.headers.clone(), body });
    reply
}

/// A body of a few frames, trailers included, or of frames sent as they come.
#[derive(Debug)]
enum Frames {
    Fixed(VecDeque<Frame<Bytes>>),
    Channel(tokio::sync::mpsc::Receiver<Frame<Bytes>>),
}

impl Default for Frames {
    fn default() -> Self {
        Self::Fixed(VecDeque::new())
    }
}

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut *self {
            Self::Fixed(frames) => Poll::Ready(frames.pop_front().map(Ok)),
            Self::Channel(rx) => rx.poll_recv(cx).map(|frame| frame.map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Fixed(frames) if frames.is_empty())
    }
}

/// One gRPC message: uncompressed, its length, its bytes.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).expect("a small message"));
    out.put_slice(message);
    out.freeze()
}

/// What a gRPC client got: the HTTP status and head, the body, and the trailers.
#[derive(Debug)]
pub struct GrpcAnswer {
    pub http_status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl GrpcAnswer {
    /// The call's `grpc-status`: from the trailers, else from the head (trailers-only).
    pub fn status(&self) -> u32 {
        let value = self.trailers.as_ref().and_then(|t| t.get("grpc-status"));
        let value = value.or_else(|| self.headers.get("grpc-status")).expect("a grpc-status");
        value.to_str().unwrap().parse().expect("a numeric grpc-status")
    }

    /// A header of the response head, as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().expect("text"))
    }
}

/// A unary call `path` with `message`, to `authority` through the sidecar at `addr`, over a
/// fresh h2c connection.
pub async fn grpc_call(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    message: &[u8],
) -> GrpcAnswer {
    let stream = TcpStream::connect(addr).await.expect("the sidecar accepts");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an h2c handshake");
    tokio::spawn(conn);
    let req = Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(frame(message)))
        .unwrap();
    let res = sender.send_request(req).await.expect("an answer");
    let (parts, body) = res.into_parts();
    let collected = body.collect().await.expect("the whole body");
    let trailers = collected.trailers().cloned();
    GrpcAnswer {
        http_status: parts.status.as_u16(),
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// A bidirectional call: sends `first`, waits for the server's first message, then sends
/// `second` and ends its stream; returns what it got. A proxy that held the request back until
/// it ended would leave this call hanging.
pub async fn grpc_bidi(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    first: &[u8],
    second: &[u8],
) -> GrpcAnswer {
    let stream = TcpStream::connect(addr).await.expect("the sidecar accepts");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("an h2c handshake");
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Frame::data(frame(first))).await.expect("the body waits");
    let req = Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Frames::Channel(rx))
        .unwrap();
    let res = sender.send_request(req).await.expect("an answer head");
    let (parts, mut body) = res.into_parts();
    let mut received = BytesMut::new();
    let mut trailers = None;
    let mut tx = Some(tx);
    while let Some(next) = body.frame().await {
        let next = next.expect("the answer streams");
        match next.into_data() {
            Ok(data) => {
                received.extend_from_slice(&data);
                // the server's first message: now send the second and end the stream
                if let Some(tx) = tx.take() {
                    tx.send(Frame::data(frame(second))).await.expect("the body waits");
                }
            }
            Err(next) => trailers = next.into_trailers().ok(),
        }
    }
    GrpcAnswer {
        http_status: parts.status.as_u16(),
        headers: parts.headers,
        body: received.freeze(),
        trailers,
    }
}
