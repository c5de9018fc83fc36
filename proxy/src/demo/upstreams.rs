//! The demo's scripted upstreams: real HTTP servers on loopback that behave as a healthy, a
//! flaky, a slow and a failing-then-recovering service would, so the sidecar's answers can be
//! watched without installing anything.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::http::Body;

/// How a scripted upstream answers.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Behaviour {
    /// 200 at once.
    Healthy,
    /// 503 for one request in `every`, 200 otherwise.
    Flaky { every: u64 },
    /// 200 after a delay that varies between `min` and twice `min`.
    Slow { min: Duration },
    /// 503 from `from` to `until` (since `started`), 200 before and after: an outage that heals.
    Outage { started: tokio::time::Instant, from: Duration, until: Duration },
}

/// Starts a scripted upstream on a free loopback port; it runs until the runtime stops.
pub(crate) async fn start(behaviour: Behaviour) -> std::io::Result<SocketAddr> {
    let seen = Arc::new(AtomicU64::new(0));
    serve(move |req| answer(behaviour, seen.fetch_add(1, Ordering::Relaxed), req)).await
}

/// Serves HTTP/1 and HTTP/2 on a free loopback port with `answer`, until the runtime stops.
pub(crate) async fn serve<F, Fut>(answer: F) -> std::io::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(answer.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn answer(
    behaviour: Behaviour,
    n: u64,
    _req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let status = match behaviour {
        Behaviour::Healthy => StatusCode::OK,
        Behaviour::Flaky { every } if n % every == every - 1 => StatusCode::SERVICE_UNAVAILABLE,
        Behaviour::Flaky { .. } => StatusCode::OK,
        Behaviour::Outage { started, from, until } => {
            let now = started.elapsed();
            if now >= from && now < until {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            }
        }
        Behaviour::Slow { min } => {
            // a spread of latencies, deterministic per request number
            let extra = min.mul_f64((n % 10) as f64 / 10.0);
            tokio::time::sleep(min + extra).await;
            StatusCode::OK
        }
    };
    let mut res = Response::new(Body::full(format!("{}\n", status.as_u16())));
    *res.status_mut() = status;
    Ok(res)
}
