//! The admin listener's routes. Probes and metrics answer anyone (the listener may be public
//! for the kubelet and Prometheus); control endpoints answer loopback clients only, others 403,
//! and nothing here changes state without being on loopback.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::admin::{Circuits, Health};
use crate::http::Body;
use crate::http::guard::refusal;
use crate::http::respond::error_response;
use crate::messaging::Messaging;
use crate::telemetry::metrics::Metrics;

/// The state the admin routes read.
#[derive(Debug, Clone)]
pub struct Admin {
    health: Arc<Health>,
    metrics: Metrics,
    /// The running config as JSON, secrets redacted, rendered once per (re)load.
    config: Arc<std::sync::RwLock<Bytes>>,
    messaging: Option<Arc<Messaging>>,
    /// The upstreams' breakers, for `/v1/upstreams/{name}/circuit`.
    circuits: Arc<Circuits>,
}

impl Admin {
    pub fn new(health: Arc<Health>, metrics: Metrics, config: Bytes) -> Self {
        let config = Arc::new(std::sync::RwLock::new(config));
        Self { health, metrics, config, messaging: None, circuits: Arc::default() }
    }

    /// Where the running upstreams' breakers are put (at start and by each reload).
    pub fn circuits(&self) -> Arc<Circuits> {
        self.circuits.clone()
    }

    /// Where a reload puts the new running config's JSON.
    pub fn config_slot(&self) -> Arc<std::sync::RwLock<Bytes>> {
        self.config.clone()
    }

    /// Adds `GET /v1/queues`: each queue's stored and dead-lettered messages.
    pub fn with_messaging(mut self, messaging: Arc<Messaging>) -> Self {
        self.messaging = Some(messaging);
        self
    }

    /// The service for one connection from `peer`.
    pub fn service(&self, peer: SocketAddr) -> AdminService {
        AdminService { admin: self.clone(), peer }
    }

    async fn answer(self, peer: SocketAddr, method: Method, path: &str) -> Response<Body> {
        let control = path.starts_with("/v1/");
        if control && !peer.ip().is_loopback() {
            return text(StatusCode::FORBIDDEN, "control endpoints answer loopback clients only\n");
        }
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "admin endpoints are read-only here\n");
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                let readiness = self.health.readiness().await;
                let status = if readiness.status == "ready" {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let body = serde_json::to_vec(&readiness).expect("readiness serializes");
                json(status, body.into())
            }
            "/metrics" => {
                self.metrics.observe_endpoints(&self.health.upstreams());
                if let Some(messaging) = &self.messaging {
                    match messaging.depths().await {
                        Ok(depths) => {
                            let now = crate::messaging::envelope::unix_millis(
                                std::time::SystemTime::now(),
                            );
                            self.metrics.observe_queues(&depths, now);
                        }
                        Err(error) => {
                            tracing::warn!(error = %crate::error::chain(&error), "reading queue depths for /metrics failed")
                        }
                    }
                }
                let mut res = Response::new(Body::full(self.metrics.encode()));
                res.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                res
            }
            "/v1/config" => {
                let config = self.config.read().unwrap_or_else(|e| e.into_inner()).clone();
                json(StatusCode::OK, config)
            }
            "/v1/endpoints" => {
                let view = endpoints_view(&self.health.upstreams());
                json(StatusCode::OK, serde_json::to_vec_pretty(&view).expect("serializes").into())
            }
            "/v1/queues" if self.messaging.is_some() => {
                let messaging = self.messaging.as_ref().expect("checked");
                match messaging.depths().await {
                    Ok(queues) => {
                        let view = serde_json::json!({ "queues": queues });
                        json(
                            StatusCode::OK,
                            serde_json::to_vec_pretty(&view).expect("serializes").into(),
                        )
                    }
                    Err(err) => {
                        tracing::warn!(error = %crate::error::chain(&err), "reading queue depths failed");
                        text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the message store could not be read\n",
                        )
                    }
                }
            }
            _ => text(StatusCode::NOT_FOUND, "no such admin endpoint\n"),
        }
    }
}

/// The endpoints that change state and read bodies: the dead-letter API, breaker control.
fn changes_state(path: &str) -> bool {
    path == "/v1/dlq" || path.starts_with("/v1/dlq/") || path.starts_with("/v1/upstreams/")
}

impl Admin {
    /// Answers a request to one of the endpoints that change state, for loopback clients only.
    async fn control<B>(&self, peer: SocketAddr, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if !peer.ip().is_loopback() {
            return text(StatusCode::FORBIDDEN, "control endpoints answer loopback clients only\n");
        }
        match req.uri().path().starts_with("/v1/upstreams/") {
            true => crate::admin::circuit::handle(&self.circuits, req).await,
            false => crate::admin::dlq::handle(self.messaging.as_deref(), req).await,
        }
    }
}

/// `/v1/endpoints`: every upstream's endpoints with their state, weight, latency estimate and
/// requests in flight, and where they came from.
fn endpoints_view(pools: &[outrigger_discovery::Pool]) -> serde_json::Value {
    use outrigger_discovery::Status;
    let upstreams: serde_json::Map<String, serde_json::Value> = pools
        .iter()
        .map(|pool| {
            let snapshot = pool.endpoints().snapshot();
            let (status, detail) = match &snapshot.status {
                Status::Pending => ("pending", String::new()),
                Status::Ready => ("ready", String::new()),
                Status::Failing(detail) => ("failing", detail.clone()),
            };
            let endpoints: Vec<serde_json::Value> = pool
                .report()
                .into_iter()
                .map(|e| {
                    serde_json::json!({
                        "address": e.addr.to_string(),
                        "state": e.state.as_str(),
                        "weight": e.weight,
                        "latency_ms": e.latency.map(|l| (l.as_secs_f64() * 1e6).round() / 1e3),
                        "in_flight": e.in_flight,
                        "ejections_in_a_row": e.ejections_in_a_row,
                    })
                })
                .collect();
            let view = serde_json::json!({
                "source": pool.endpoints().source(),
                "discovery": {
                    "status": status,
                    "detail": detail,
                    "confirmed_seconds_ago": snapshot.confirmed.map(|at| at.elapsed().as_secs()),
                },
                "endpoints": endpoints,
            });
            (pool.upstream().to_string(), view)
        })
        .collect();
    serde_json::json!({ "upstreams": upstreams })
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut res = Response::new(Body::full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}

fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut res = Response::new(Body::full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// The admin routes for one connection.
#[derive(Debug, Clone)]
pub struct AdminService {
    admin: Admin,
    peer: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for AdminService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        if let Some(err) = refusal(&req) {
            // the guard refused the client's head: the same 400/431 as the outbound port, and
            // the connection closes
            return Box::pin(std::future::ready(Ok(error_response(&err))));
        }
        let (admin, peer) = (self.admin.clone(), self.peer);
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        Box::pin(async move {
            if changes_state(&path) {
                return Ok(admin.control(peer, req).await);
            }
            Ok(admin.answer(peer, method, &path).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> Admin {
        let health = Arc::new(Health::new(Vec::new(), None));
        Admin::new(health, Metrics::new(), Bytes::from_static(b"{}"))
    }

    #[tokio::test]
    async fn control_endpoints_refuse_clients_that_are_not_on_loopback() {
        let remote: SocketAddr = ([10, 1, 2, 3], 40000).into();
        let local: SocketAddr = ([127, 0, 0, 1], 40000).into();
        assert_eq!(admin().answer(remote, Method::GET, "/v1/config").await.status(), 403);
        assert_eq!(admin().answer(local, Method::GET, "/v1/config").await.status(), 200);
    }

    #[tokio::test]
    async fn probes_and_metrics_answer_anyone_but_change_nothing() {
        let remote: SocketAddr = ([10, 1, 2, 3], 40000).into();
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(admin().answer(remote, Method::GET, path).await.status(), 200, "{path}");
        }
        assert_eq!(admin().answer(remote, Method::POST, "/readyz").await.status(), 405);
        assert_eq!(admin().answer(remote, Method::GET, "/nope").await.status(), 404);
    }

    #[tokio::test]
    async fn breaker_control_answers_loopback_clients_only_and_names_what_is_missing() {
        let post = |path: &str| {
            Request::post(path)
                .body(http_body_util::Full::new(Bytes::from_static(br#"{"state":"open"}"#)))
                .unwrap()
        };
        let remote: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let admin = admin();
        let path = "/v1/upstreams/payments/circuit";
        assert_eq!(admin.control(remote, post(path)).await.status(), 403);
        assert_eq!(admin.control(local, post(path)).await.status(), 404, "no such upstream");
        admin.circuits().set(vec![("payments".into(), None)]);
        assert_eq!(admin.control(local, post(path)).await.status(), 409, "it has no breaker");
        assert!(changes_state(path) && changes_state("/v1/dlq/q") && !changes_state("/v1/config"));
    }
}
