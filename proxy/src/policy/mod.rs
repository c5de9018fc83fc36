//! The resilience policies, one tower layer each, in the order a request meets them
//! (DESIGN.md, "Policies, in the order a request meets them"); `stack.rs` assembles them.
//!
//! Every policy rejects rather than waits: a request over a limit is answered at once, never
//! queued behind `poll_ready`, because in a proxy a waiting request is a hung client.

pub mod backoff;
pub mod budget;
pub mod circuit_breaker;
pub mod concurrency_limit;
pub mod deadline;
pub mod fault;
pub mod rate_limit;
pub mod retry;
pub mod timeout;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus::IntCounter;

use crate::error::ProxyError;

/// A policy in shadow mode (`mode: shadow`): it decides as when enforcing and keeps its state,
/// but a request it would have refused goes on; the decision is counted in
/// `outrigger_shadow_decisions_total{upstream,route,policy,decision}` and logged at debug.
#[derive(Debug, Clone)]
pub struct Shadow {
    would: IntCounter,
    upstream: Arc<str>,
    route: Arc<str>,
    policy: &'static str,
    decision: &'static str,
}

impl Shadow {
    /// `policy` is the YAML section, `decision` the `outrigger-error` kind it would answer.
    pub fn new(
        would: IntCounter,
        (upstream, route): (&Arc<str>, &str),
        policy: &'static str,
        decision: &'static str,
    ) -> Self {
        Self { would, upstream: upstream.clone(), route: route.into(), policy, decision }
    }

    /// The policy would have refused this request.
    pub fn note(&self) {
        self.would.inc();
        tracing::debug!(
            upstream = %self.upstream,
            route = %self.route,
            policy = self.policy,
            decision = self.decision,
            "shadow policy would have refused this request; forwarded"
        );
    }
}

pin_project_lite::pin_project! {
    /// A policy's answer: refused at once, or the inner service's future with a guard (a
    /// semaphore permit, say) that is released when the inner future completes.
    #[project = AdmittedProj]
    #[allow(missing_debug_implementations)]
    pub enum Admitted<F, G> {
        Inner { #[pin] fut: F, guard: Option<G> },
        Refused { err: Option<ProxyError> },
    }
}

impl<F, G> Admitted<F, G> {
    pub(crate) fn inner(fut: F, guard: G) -> Self {
        Self::Inner { fut, guard: Some(guard) }
    }

    pub(crate) fn refused(err: ProxyError) -> Self {
        Self::Refused { err: Some(err) }
    }
}

impl<F, G, T> Future for Admitted<F, G>
where
    F: Future<Output = Result<T, ProxyError>>,
{
    type Output = Result<T, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AdmittedProj::Inner { fut, guard } => {
                let out = std::task::ready!(fut.poll(cx));
                drop(guard.take());
                Poll::Ready(out)
            }
            AdmittedProj::Refused { err } => {
                Poll::Ready(Err(err.take().expect("polled after completion")))
            }
        }
    }
}
