//! A scripted upstream: a real HTTP/1.1 + HTTP/2 server on loopback that answers from a
//! script and records what it saw, so a test can assert the count and shape of what arrived.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status, with a short body.
    Status(u16),
    /// This status after a delay.
    Delayed(Duration, u16),
    /// Drop the connection without answering.
    Reset,
    /// 200 with the number of request body bytes received, counted as they stream in.
    CountBody,
    /// 101 and then echo every byte back (a WebSocket-like upgrade).
    UpgradeEcho,
    /// 200 with a body that never ends: 1 KiB every 10 ms until the peer goes away (see
    /// `open_drips`).
    Drip,
    /// 200 and 1 KiB of body, then nothing, until the peer goes away (counted in `open_drips`).
    Stall,
}

/// What one request looked like on arrival.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: http::Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The request body (empty for `CountBody`, which counts without keeping).
    pub body: Bytes,
    /// When its headers arrived.
    pub at: tokio::time::Instant,
}

#[derive(Debug, Default)]
struct State {
    script: Vec<Reply>,
    seen: Vec<Seen>,
    /// When set, `GET /healthz` answers this status and is counted apart from `seen`.
    health: Option<u16>,
    health_checks: usize,
    /// `Drip` bodies still being written.
    open_drips: usize,
    /// The script starts over after its last reply (else the last reply repeats).
    cycle: bool,
    /// Requests whose handler was dropped before it answered (the peer went away).
    cancelled: usize,
}

/// A loopback port that is bound and not listening: every connection to it is refused (an app
/// still booting) until [`RefusingPort::listen`] starts a scripted upstream on it. The port is
/// held all along, so no other test's server can take it meanwhile.
#[derive(Debug)]
pub struct RefusingPort {
    socket: TcpSocket,
    addr: SocketAddr,
}

impl RefusingPort {
    pub fn new() -> Self {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket.bind(([127, 0, 0, 1], 0).into()).expect("a free loopback port");
        let addr = socket.local_addr().expect("bound");
        Self { socket, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts listening: from now on the port answers with `replies` (the last repeats).
    pub fn listen(self, replies: impl IntoIterator<Item = Reply>) -> Upstream {
        let script: Vec<Reply> = replies.into_iter().collect();
        assert!(!script.is_empty(), "a script needs at least one reply");
        let listener = self.socket.listen(1024).expect("listen on the held port");
        Upstream::serve_on(listener, script, None)
    }
}

impl Default for RefusingPort {
    fn default() -> Self {
        Self::new()
    }
}

/// The path a health-checked upstream answers on its own.
const HEALTH_PATH: &str = "/healthz";

/// A running scripted upstream; it stops with the test's runtime.
#[derive(Debug, Clone)]
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    listening: Arc<Mutex<Listening>>,
}

/// The accept loop, while the upstream listens (see `stop_accepting`).
struct Listening {
    accept: Option<JoinHandle<()>>,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Listening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listening").field("accepting", &self.accept.is_some()).finish()
    }
}

impl Upstream {
    /// Answers with `replies` in order, then repeats the last one.
    pub async fn scripted(replies: impl IntoIterator<Item = Reply>) -> Self {
        let script: Vec<Reply> = replies.into_iter().collect();
        assert!(!script.is_empty(), "a script needs at least one reply");
        Self::scripted_on(0, script).await
    }

    /// Answers with `replies` in order, over and over.
    pub async fn cycling(replies: impl IntoIterator<Item = Reply>) -> Self {
        let up = Self::scripted(replies).await;
        up.state.lock().unwrap().cycle = true;
        up
    }

    /// The reply request number `n` (from 0) gets.
    pub fn reply(&self, n: usize) -> Reply {
        self.state.lock().unwrap().reply(n)
    }

    /// Answers every request with `status`, on a given loopback port.
    pub async fn status_on(port: u16, status: u16) -> Self {
        Self::scripted_on(port, vec![Reply::Status(status)]).await
    }

    /// Like `scripted`, on a given address: all of 127.0.0.0/8 is loopback, so upstreams on
    /// 127.0.0.2 and 127.0.0.3 can share a port, as DNS A records with one port need.
    pub async fn scripted_at(addr: SocketAddr, replies: impl IntoIterator<Item = Reply>) -> Self {
        let script: Vec<Reply> = replies.into_iter().collect();
        assert!(!script.is_empty(), "a script needs at least one reply");
        Self::serve(addr, script, None).await
    }

    async fn scripted_on(port: u16, script: Vec<Reply>) -> Self {
        Self::serve(([127, 0, 0, 1], port).into(), script, None).await
    }

    /// Serves `script` on `addr`; over TLS when `tls` is given (a failed handshake never
    /// reaches the script).
    pub(crate) async fn serve(
        addr: SocketAddr,
        script: Vec<Reply>,
        tls: Option<TlsAcceptor>,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.expect("a free loopback address");
        Self::serve_on(listener, script, tls)
    }

    fn serve_on(listener: TcpListener, script: Vec<Reply>, tls: Option<TlsAcceptor>) -> Self {
        let addr = listener.local_addr().expect("bound");
        let state = Arc::new(Mutex::new(State { script, ..State::default() }));
        let accept = Some(accept(listener, state.clone(), tls.clone()));
        Self { addr, state, listening: Arc::new(Mutex::new(Listening { accept, tls })) }
    }

    /// Closes the listening socket, as a process that stopped listening: a new connection is
    /// refused, while those already open go on being served.
    pub async fn stop_accepting(&self) {
        let accept = self.listening.lock().unwrap().accept.take();
        if let Some(accept) = accept {
            accept.abort();
            // the listener is dropped, so the port closed, once the task has ended
            let _ = accept.await;
        }
    }

    /// Listens again on the same address after `stop_accepting`.
    pub async fn accept_again(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("the upstream's port is free");
        let mut listening = self.listening.lock().unwrap();
        assert!(listening.accept.is_none(), "accept_again after stop_accepting");
        let tls = listening.tls.clone();
        listening.accept = Some(accept(listener, self.state.clone(), tls));
    }

    /// Answers every request with `status`.
    pub async fn status(status: u16) -> Self {
        Self::scripted([Reply::Status(status)]).await
    }

    /// Answers `GET /healthz` with `health` (see `set_health`), everything else with `status`.
    pub async fn health_checked(status: u16, health: u16) -> Self {
        let up = Self::status(status).await;
        up.set_health(health);
        up
    }

    /// Answers with `replies` from now on (counting from the next request), then repeats the
    /// last one.
    pub fn set_script(&self, replies: impl IntoIterator<Item = Reply>) {
        let mut state = self.state.lock().unwrap();
        let done = state.seen.len();
        let script: Vec<Reply> = replies.into_iter().collect();
        assert!(!script.is_empty(), "a script needs at least one reply");
        // the script is indexed by request number: what came before keeps its place
        state.script = std::iter::repeat_n(script[0].clone(), done).chain(script).collect();
    }

    /// What `GET /healthz` answers from now on.
    pub fn set_health(&self, status: u16) {
        self.state.lock().unwrap().health = Some(status);
    }

    /// How many health checks arrived (they are not in `requests`).
    pub fn health_checks(&self) -> usize {
        self.state.lock().unwrap().health_checks
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The YAML of an `upstreams:` section with one upstream, `name`, on this server.
    pub fn yaml(&self, name: &str) -> String {
        format!("upstreams:\n  {name}:\n    discovery: {{ static: [\"{}\"] }}\n", self.addr)
    }

    /// How many requests arrived.
    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().seen.len()
    }

    /// How many `Drip` bodies are still being written: one ends when its connection is gone.
    pub fn open_drips(&self) -> usize {
        self.state.lock().unwrap().open_drips
    }

    /// How many requests were given up before they were answered: the connection was closed
    /// (HTTP/1) or the stream reset (h2) while the reply was still being made.
    pub fn cancelled(&self) -> usize {
        self.state.lock().unwrap().cancelled
    }

    /// Every request that arrived, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

/// Accepts connections on `listener`, each served from `shared`'s script, until aborted.
fn accept(
    listener: TcpListener,
    shared: Arc<Mutex<State>>,
    tls: Option<TlsAcceptor>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = shared.clone();
            let service = hyper::service::service_fn(move |req| answer(state.clone(), req));
            let tls = tls.clone();
            tokio::spawn(async move {
                let builder = auto::Builder::new(TokioExecutor::new());
                let _ = match tls {
                    None => {
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await
                    }
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => {
                            let io = TokioIo::new(stream);
                            builder.serve_connection_with_upgrades(io, service).await
                        }
                        Err(_) => return,
                    },
                };
            });
        }
    })
}

impl State {
    fn reply(&self, n: usize) -> Reply {
        let last = self.script.len() - 1;
        self.script[if self.cycle { n % self.script.len() } else { n.min(last) }].clone()
    }
}

type Answer = Result<Response<BoxBody<Bytes, std::io::Error>>, std::io::Error>;

/// Counts a request in `cancelled` when dropped before [`Unanswered::answered`].
struct Unanswered(Option<Arc<Mutex<State>>>);

impl Unanswered {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            state.lock().unwrap().cancelled += 1;
        }
    }
}

async fn answer(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Answer {
    // hyper drops this future when the peer goes away before the answer is made
    let unanswered = Unanswered(Some(state.clone()));
    let answer = reply(state, req).await;
    unanswered.answered();
    answer
}

async fn reply(state: Arc<Mutex<State>>, mut req: Request<Incoming>) -> Answer {
    // claim this request's place in the script on arrival, so `requests()` counts requests
    // still in progress and concurrent requests get consecutive replies
    let (n, reply) = {
        let mut state = state.lock().unwrap();
        if let (Some(status), HEALTH_PATH) = (state.health, req.uri().path()) {
            state.health_checks += 1;
            return Ok(respond(status, format!("health {status}\n")));
        }
        let n = state.seen.len();
        let (method, uri, version, headers) =
            (req.method().clone(), req.uri().clone(), req.version(), req.headers().clone());
        let at = tokio::time::Instant::now();
        state.seen.push(Seen { method, uri, version, headers, body: Bytes::new(), at });
        (n, state.reply(n))
    };
    let upgrade = matches!(reply, Reply::UpgradeEcho).then(|| hyper::upgrade::on(&mut req));
    let body = req.into_body();
    // CountBody counts as the bytes stream in; UpgradeEcho has no body to keep
    let mut streaming = match reply {
        Reply::CountBody | Reply::UpgradeEcho => Some(body),
        _ => {
            let kept = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            state.lock().unwrap().seen[n].body = kept;
            None
        }
    };
    match reply {
        Reply::Status(status) => Ok(respond(status, format!("{status} from upstream\n"))),
        Reply::Delayed(delay, status) => {
            tokio::time::sleep(delay).await;
            Ok(respond(status, format!("{status} from upstream\n")))
        }
        Reply::Reset => {
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "scripted reset"))
        }
        Reply::CountBody => {
            let body = streaming.as_mut().expect("kept streaming above");
            let mut count = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.map_err(std::io::Error::other)?.into_data() {
                    count += data.len() as u64;
                }
            }
            Ok(respond(200, count.to_string()))
        }
        Reply::Drip | Reply::Stall => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
            state.lock().unwrap().open_drips += 1;
            let stall = matches!(reply, Reply::Stall);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'.'; 1024]);
                while tx.send(chunk.clone()).await.is_ok() {
                    if stall {
                        tx.closed().await;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                state.lock().unwrap().open_drips -= 1;
            });
            Ok(Response::new(DripBody(rx).boxed()))
        }
        Reply::UpgradeEcho => {
            let upgrade = upgrade.expect("taken above for this reply");
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                }
            });
            let mut res = respond(101, String::new());
            res.headers_mut().insert("connection", "upgrade".parse().unwrap());
            res.headers_mut().insert("upgrade", "echo".parse().unwrap());
            Ok(res)
        }
    }
}

/// A body of whatever chunks arrive on its channel, ending when the sender is dropped.
struct DripBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for DripBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
    }
}

fn respond(status: u16, body: String) -> Response<BoxBody<Bytes, std::io::Error>> {
    let full = Full::new(Bytes::from(body)).map_err(|never| match never {});
    let mut res = Response::new(full.boxed());
    *res.status_mut() = StatusCode::from_u16(status).expect("a scripted status is valid");
    res
}
