//! `outrigger_grpc_responses_total{upstream,route,grpc_status}`: the gRPC status of each call an
//! upstream answered, as the client got it (after retries): from a trailers-only head at once,
//! else when the trailers pass. Outrigger's own answers are not counted here (they carry
//! `outrigger-error`). Plain HTTP answers carry no gRPC status and cost one empty-extensions
//! lookup.

use std::task::{Context, Poll, ready};

use http::{Request, Response};

use crate::error::ProxyError;
use crate::http::Body;
use crate::http::grpc::{Answered, Verdict, verdict};
use crate::telemetry::metrics::GrpcResponses;

#[derive(Debug, Clone)]
pub struct GrpcResponsesLayer {
    counters: GrpcResponses,
}

impl GrpcResponsesLayer {
    pub fn new(counters: GrpcResponses) -> Self {
        Self { counters }
    }
}

impl<S> tower::Layer<S> for GrpcResponsesLayer {
    type Service = GrpcCounted<S>;

    fn layer(&self, inner: S) -> GrpcCounted<S> {
        GrpcCounted { inner, counters: self.counters.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcCounted<S> {
    inner: S,
    counters: GrpcResponses,
}

impl<S> tower::Service<Request<Body>> for GrpcCounted<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = ProxyError>,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        ResponseFuture { inner: self.inner.call(req), counters: Some(self.counters.clone()) }
    }
}

pin_project_lite::pin_project! {
    #[allow(missing_debug_implementations)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        counters: Option<GrpcResponses>,
    }
}

impl<F> std::future::Future for ResponseFuture<F>
where
    F: std::future::Future<Output = Result<Response<Body>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx));
        if let (Ok(res), Some(counters)) = (&mut result, this.counters.take()) {
            if let Some(Answered(status)) = res.extensions().get::<Answered>() {
                counters.record(*status);
            } else if let Verdict::Trailers(watch) = verdict(res) {
                watch.on_status(move |status| counters.record(status));
            }
        }
        Poll::Ready(result)
    }
}
