//! Accepting connections: HTTP/1.1 and HTTP/2 prior knowledge on one port, each connection
//! behind the framing guard, at most `max_connections` at once, drained on shutdown.
//!
//! At the connection cap the listener stops accepting until a connection closes, so the kernel's
//! backlog, not our memory, absorbs a flood.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use outrigger_config as config;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::http::Body;
use crate::http::guard::{GuardLimits, GuardedIo};

/// How connections on a listener are served.
#[derive(Debug, Clone)]
pub struct Serving {
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: GuardLimits,
    connections: Arc<Semaphore>,
}

impl Serving {
    pub fn new(limits: &config::Limits) -> Self {
        let limits = GuardLimits {
            max_header_bytes: usize::try_from(limits.max_header_bytes.bytes())
                .unwrap_or(usize::MAX),
            max_headers: limits.max_headers,
            header_read_timeout: limits.header_read_timeout.get(),
            idle_timeout: limits.idle_timeout.get(),
            max_connections: limits.max_connections,
        };
        Self::with_limits(limits)
    }

    pub(crate) fn with_limits(limits: GuardLimits) -> Self {
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
            limits,
        }
    }
}

/// Serves `listener` until `stop` turns true; connections are watched by `graceful`, so the
/// app's shutdown can wait for them to drain.
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
    loop {
        let permit = tokio::select! {
            permit = serving.connections.clone().acquire_owned() => permit.expect("never closed"),
            _ = stopped(&mut stop) => return,
        };
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
            _ = stopped(&mut stop) => return,
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(GuardedIo::new(stream, serving.limits));
        let conn =
            serving.builder.serve_connection_with_upgrades(io, make_service(peer)).into_owned();
        let conn = graceful.watcher().watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            drop(permit);
        });
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
