//! CONNECT tunnels, for apps that reach HTTPS APIs through `HTTPS_PROXY=http://127.0.0.1:4140`.
//!
//! A `CONNECT host:port` is routed by its host like any request: an unknown host gets 404
//! `unknown-upstream` and nothing is dialled (never an open proxy). It then passes the
//! upstream's whole stack, so rate limit, concurrency limit, breaker, request deadline and
//! connect-failure retries apply to each tunnel as they do to a request. `Forward` picks the
//! endpoint; here it is dialled within `timeouts.connect` (failure: 502 `connect-failed`), the
//! client gets 200, and bytes are copied both ways, untouched, until either side closes. The
//! target's port is not used (the endpoint has its own), nor `tls` (the app runs its own TLS
//! through the tunnel). HTTP/1 CONNECT only: over HTTP/2 it is refused with 400.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONNECTION, HeaderValue};
use http::{Request, Response, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use outrigger_config as config;
use outrigger_discovery::Endpoint;
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::http::Body;

/// How `Forward` opens tunnels to its upstream's endpoints.
#[derive(Debug, Clone)]
pub(crate) struct Tunnels {
    connect_timeout: Duration,
}

/// The answer to a CONNECT: 200 once the endpoint is connected, and the tunnel runs on.
pub(crate) type Opening = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

impl Tunnels {
    pub(crate) fn new(timeouts: &config::Timeouts) -> Self {
        Self { connect_timeout: timeouts.connect.get() }
    }

    /// Dials `endpoint` for the CONNECT `req`; on success the tunnel runs in its own task.
    pub(crate) fn open(
        &self,
        upstream: Arc<str>,
        mut req: Request<Body>,
        endpoint: &Endpoint,
    ) -> Opening {
        if !matches!(req.version(), Version::HTTP_11 | Version::HTTP_10) {
            let reason = format!("CONNECT over {:?} is not supported: use HTTP/1.1", req.version());
            return Box::pin(std::future::ready(Err(ProxyError::BadRequest {
                reason: reason.into(),
            })));
        }
        let client = hyper::upgrade::on(&mut req);
        let (addr, timeout) = (endpoint.addr, self.connect_timeout);
        Box::pin(async move {
            let stream = match dial(addr, timeout).await {
                Ok(stream) => stream,
                Err(err) => {
                    return Err(ProxyError::ConnectFailed { upstream, source: err.into() });
                }
            };
            tokio::spawn(tunnel(upstream, client, stream));
            Ok(Response::new(Body::empty()))
        })
    }
}

/// A CONNECT not answered 2xx closes its connection: the framing guard let the bytes after the
/// CONNECT head through unchecked, as a tunnel's, so nothing more may be read from it as HTTP.
pub(crate) fn close_if_refused(res: &mut Response<Body>) {
    if !res.status().is_success() {
        res.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
}

/// A new connection to `addr` within `timeout`, Nagle off: for tunnels and the HTTP/1 pool.
pub(crate) async fn dial(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            return Err(io::Error::new(err.kind(), format!("tcp connect to {addr}: {err}")));
        }
        Err(_) => {
            let message = format!("tcp connect to {addr} took longer than {timeout:?}");
            return Err(io::Error::new(io::ErrorKind::TimedOut, message));
        }
    };
    // a tunnel carries interactive protocols (TLS handshakes): no Nagle delay, as on the pool
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Copies bytes both ways between the client's upgraded connection and the endpoint.
async fn tunnel(upstream: Arc<str>, client: OnUpgrade, mut endpoint: TcpStream) {
    let client = match client.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(%upstream, %error, "connect tunnel did not start");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    match tokio::io::copy_bidirectional(&mut client, &mut endpoint).await {
        Ok((sent, received)) => tracing::debug!(%upstream, sent, received, "connect tunnel closed"),
        Err(error) => tracing::debug!(%upstream, %error, "connect tunnel ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn connect_to(version: Version) -> Request<Body> {
        Request::connect("payments:443").version(version).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn a_connect_over_http2_is_refused_without_dialling() {
        // port 9 of loopback: nothing listens, and nothing must be tried
        let endpoint = Endpoint::new(([127, 0, 0, 1], 9).into());
        let tunnels = Tunnels { connect_timeout: Duration::from_secs(1) };
        let err =
            tunnels.open("p".into(), connect_to(Version::HTTP_2), &endpoint).await.unwrap_err();
        assert_eq!((err.status(), err.kind()), (StatusCode::BAD_REQUEST, "bad-request"));
        assert!(err.to_string().contains("use HTTP/1.1"), "{err}");
    }

    #[tokio::test]
    async fn a_dead_endpoint_is_a_connect_failure_naming_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let tunnels = Tunnels { connect_timeout: Duration::from_secs(1) };
        let err = tunnels
            .open("p".into(), connect_to(Version::HTTP_11), &Endpoint::new(addr))
            .await
            .unwrap_err();
        assert_eq!((err.status(), err.kind()), (StatusCode::BAD_GATEWAY, "connect-failed"));
        assert!(err.to_string().contains(&format!("tcp connect to {addr}")), "{err}");
    }

    #[test]
    fn a_refused_connect_closes_its_connection_and_an_accepted_one_does_not() {
        let mut refused = Response::new(Body::empty());
        *refused.status_mut() = StatusCode::NOT_FOUND;
        close_if_refused(&mut refused);
        assert_eq!(refused.headers()[CONNECTION], "close");
        let mut accepted = Response::new(Body::empty());
        close_if_refused(&mut accepted);
        assert!(accepted.headers().get(CONNECTION).is_none());
    }
}
