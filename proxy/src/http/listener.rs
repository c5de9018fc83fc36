//! Accepting connections: HTTP/1.1 and HTTP/2 prior knowledge on one port, each connection
//! behind the framing guard, at most `max_connections` at once, drained on shutdown.
//!
//! At the connection cap a new connection is answered `503` with `outrigger-error: overloaded`
//! and closed at once, as Envoy's overload manager closes them: a flood is refused, never parked
//! in the kernel's backlog with its clients hanging, and the connections already open keep
//! being served. At most [`SHEDDING`] refusals are written at a time; past that, a connection is
//! closed unanswered. Memory stays bounded either way.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use outrigger_config as config;
use prometheus::IntCounter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::http::guard::{GuardLimits, GuardedIo};
use crate::http::idle::{Activity, Tracked};
use crate::http::{Body, h1};

/// Refusals at the connection cap being written at once, at most.
const SHEDDING: usize = 256;
/// How long a refusal may take: writing it, then reading what the client sent until it closes
/// (closing on unread bytes would reset the connection, and the reset can destroy the answer
/// before the client reads it).
const SHED_LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// How connections on a listener are served.
#[derive(Debug, Clone)]
pub struct Serving {
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: GuardLimits,
    connections: Arc<Semaphore>,
    shedding: Arc<Semaphore>,
    /// The whole answer at the cap, made once.
    refusal: bytes::Bytes,
    shed: IntCounter,
}

impl Serving {
    /// `shed` counts the connections refused at `limits.max_connections`.
    pub fn new(limits: &config::Limits, shed: IntCounter) -> Self {
        let limits = GuardLimits {
            max_header_bytes: usize::try_from(limits.max_header_bytes.bytes())
                .unwrap_or(usize::MAX),
            max_headers: limits.max_headers,
            header_read_timeout: limits.header_read_timeout.get(),
            idle_timeout: limits.idle_timeout.get(),
            max_connections: limits.max_connections,
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // the guard owns the header and idle deadlines (hyper's runs on idle keep-alive
            // connections too, which would cut them at the header deadline)
            .header_read_timeout(None)
            .max_headers(limits.max_headers)
            // the guard hands over whole heads of at most max_header_bytes
            .max_buf_size((limits.max_header_bytes + 16 * 1024).max(8 * 1024));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        Self {
            builder: Arc::new(builder),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            shedding: Arc::new(Semaphore::new(SHEDDING)),
            refusal: refusal(limits.max_connections),
            limits,
            shed,
        }
    }

    /// Resolves once every connection accepted through this `Serving` has closed: the
    /// shutdown's wait for connections our own HTTP/1 server serves (hyper's are watched by
    /// `GracefulShutdown` too).
    pub async fn drained(&self) {
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        let _ = self.connections.acquire_many(all).await;
    }

    /// Refuses `stream`, accepted past the connection cap.
    fn shed(&self, mut stream: TcpStream, peer: SocketAddr) {
        self.shed.inc();
        tracing::debug!(%peer, limit = self.limits.max_connections, "connection refused: at max_connections");
        let Ok(permit) = self.shedding.clone().try_acquire_owned() else {
            return; // dropped: closed unanswered
        };
        let refusal = self.refusal.clone();
        tokio::spawn(async move {
            let answer = async {
                stream.write_all(&refusal).await?;
                stream.shutdown().await?;
                let mut sink = [0u8; 1024];
                while stream.read(&mut sink).await? > 0 {}
                std::io::Result::Ok(())
            };
            let _ = tokio::time::timeout(SHED_LINGER, answer).await;
            drop(permit);
        });
    }
}

/// The HTTP/1.1 answer to a connection past `max_connections`.
fn refusal(max_connections: usize) -> bytes::Bytes {
    let body = format!(
        "the sidecar already has {max_connections} client connections open \
         (outbound.limits.max_connections); try again shortly\n"
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\n{}: overloaded\r\ncontent-type: text/plain; \
         charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        crate::http::respond::ERROR_HEADER,
        body.len()
    );
    bytes::Bytes::from(head + &body)
}

/// Serves `listener` with hyper until `stop` turns true (the admin port); connections are
/// watched by `graceful`, so the app's shutdown can wait for them to drain.
pub async fn serve<S>(
    listener: TcpListener,
    serving: Serving,
    make_service: impl Fn(SocketAddr) -> S,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    while let Some((stream, peer, permit)) = accept(&listener, &serving, &mut stop).await {
        let service = make_service(peer);
        let conn = hyper_connection(&serving, stream, &[], false, service, graceful.watcher());
        tokio::spawn(async move {
            conn.await;
            tracing::trace!(%peer, "connection closed");
            drop(permit);
        });
    }
}

/// Serves the app's outbound `listener` until `stop` turns true: HTTP/1 requests through our
/// own server (`h1/server.rs`), which leaves HTTP/2, upgrades and whatever else it declines to
/// hyper behind the framing guard, for the rest of that connection.
pub async fn serve_outbound<S>(
    listener: TcpListener,
    serving: Serving,
    make_service: impl Fn(SocketAddr) -> S,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = std::convert::Infallible,
        > + hyper::service::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = std::convert::Infallible,
            Future: Send,
        > + Send
        + Sync
        + 'static,
    <S as hyper::service::Service<Request<Incoming>>>::Future: Send + 'static,
{
    while let Some((stream, peer, permit)) = accept(&listener, &serving, &mut stop).await {
        let service = make_service(peer);
        // the connection watches the shutdown with a watcher of its own, never the shutdown
        // itself, which the app takes back once the listeners have stopped
        let (serving, watcher, stop) = (serving.clone(), graceful.watcher(), stop.clone());
        tokio::spawn(async move {
            let ended = h1::server::serve(stream, serving.limits, &service, stop).await;
            if let h1::server::Ended::Handover(stream, read, served) = ended {
                // boxed: the rare path's state is not carried by every idle connection
                let conn = hyper_connection(&serving, stream, &read, served, service, watcher);
                Box::pin(conn).await;
            }
            tracing::trace!(%peer, "connection closed");
            drop(permit);
        });
    }
}

/// The next connection within the connection cap (those past it are shed); `None` once `stop`
/// is true.
async fn accept(
    listener: &TcpListener,
    serving: &Serving,
    stop: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(stop) => return None,
        };
        let Ok(permit) = serving.connections.clone().try_acquire_owned() else {
            serving.shed(stream, peer);
            continue;
        };
        let _ = stream.set_nodelay(true);
        return Some((stream, peer, permit));
    }
}

/// hyper serving `stream` behind the framing guard (which first checks `read`, bytes already
/// read from it; `served`: requests came before them), watched by `watcher` (the graceful
/// shutdown) and the idle watcher.
fn hyper_connection<S>(
    serving: &Serving,
    stream: TcpStream,
    read: &[u8],
    served: bool,
    service: S,
    watcher: Watcher,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let activity = Activity::new();
    let io = GuardedIo::with_read(stream, serving.limits, activity.clone(), read, served);
    let service = Tracked::new(service, activity.clone());
    let conn =
        serving.builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
    let conn = watcher.watch(conn);
    let idle_timeout = serving.limits.idle_timeout;
    async move {
        tokio::select! {
            ended = conn => if let Err(error) = ended {
                tracing::debug!(%error, "connection ended with an error");
            },
            // hyper waiting on a stalled response body never polls the socket
            () = activity.idle_for(idle_timeout) => {
                tracing::debug!("connection idle past idle_timeout: closed");
            }
        }
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}
