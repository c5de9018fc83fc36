//! Hedging: when an attempt has not answered `after` since the last one began, send another to
//! an endpoint not tried yet, up to `max_extra` extras; the first response head wins and the
//! others are dropped (hyper closes a loser's HTTP/1 connection, resets its h2 stream). An
//! attempt that fails while others are in flight is forgotten; when all fail, the last failure
//! goes back to the retry logic. The retry future decides whether a request may be hedged and
//! sends each hedge (budget, replayed body, `Tried`); this file only races the attempts.
//! Nothing is allocated until a hedge is sent: the extras live in a `Vec` of boxed futures,
//! since a service's future type cannot be held in place a variable number of times.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::Response;
use outrigger_config as config;
use prometheus::IntCounter;
use tokio::time::{Instant, Sleep};

use crate::error::ProxyError;
use crate::http::Body;

/// An upstream's or a route's `hedge`, with its `outrigger_hedges_total` handle.
#[derive(Debug)]
pub(crate) struct Hedge {
    after: Duration,
    max_extra: u32,
    hedges: IntCounter,
}

impl Hedge {
    pub(crate) fn new(cfg: &config::Hedge, hedges: IntCounter) -> Self {
        Self { after: cfg.after.get(), max_extra: cfg.max_extra, hedges }
    }
}

pin_project_lite::pin_project! {
    /// The attempts of one try in flight: the first, and the hedges sent while it was slow.
    pub(super) struct Race<F> {
        #[pin]
        first: Option<F>,
        // armed while another hedge may go; `None` on the plain path
        #[pin]
        timer: Option<Sleep>,
        extras: Vec<Pin<Box<F>>>,
        sent: u32,
        failed: Option<ProxyError>,
    }
}

impl<F> Race<F>
where
    F: Future<Output = Result<Response<Body>, ProxyError>>,
{
    /// `hedge`: the request may be hedged; the first hedge goes `after` from now.
    pub(super) fn new(first: F, hedge: Option<&Hedge>) -> Self {
        Self {
            first: Some(first),
            timer: hedge.map(|h| tokio::time::sleep(h.after)),
            extras: Vec::new(),
            sent: 0,
            failed: None,
        }
    }

    /// The first response head of any attempt, or the last failure once every attempt failed.
    /// `send` makes a hedge when the timer fires (`None`: no budget or no service ready, and
    /// no more hedges for this try); `hedge` is the one given to [`Race::new`].
    pub(super) fn poll_race(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        hedge: Option<&Hedge>,
        mut send: impl FnMut(&mut Context<'_>) -> Option<F>,
    ) -> Poll<Result<Response<Body>, ProxyError>> {
        let mut this = self.project();
        loop {
            if let Some(first) = this.first.as_mut().as_pin_mut()
                && let Poll::Ready(result) = first.poll(cx)
            {
                match result {
                    Ok(res) => return Poll::Ready(Ok(res)),
                    Err(err) => {
                        this.first.set(None);
                        *this.failed = Some(err);
                    }
                }
            }
            let mut i = 0;
            while i < this.extras.len() {
                match this.extras[i].as_mut().poll(cx) {
                    // the losers are dropped with the race: cancelled
                    Poll::Ready(Ok(res)) => return Poll::Ready(Ok(res)),
                    Poll::Ready(Err(err)) => {
                        drop(this.extras.swap_remove(i));
                        *this.failed = Some(err);
                    }
                    Poll::Pending => i += 1,
                }
            }
            if this.first.is_none() && this.extras.is_empty() {
                return Poll::Ready(Err(this.failed.take().expect("every attempt failed")));
            }
            let (Some(timer), Some(hedge)) = (this.timer.as_mut().as_pin_mut(), hedge) else {
                return Poll::Pending;
            };
            ready!(timer.poll(cx));
            match send(cx) {
                Some(fut) => {
                    this.extras.push(Box::pin(fut));
                    *this.sent += 1;
                    hedge.hedges.inc();
                    match this.timer.as_mut().as_pin_mut() {
                        Some(timer) if *this.sent < hedge.max_extra => {
                            timer.reset(Instant::now() + hedge.after);
                        }
                        _ => this.timer.set(None),
                    }
                }
                None => this.timer.set(None),
            }
            // poll the hedge just sent, so it registers its waker
        }
    }
}

#[cfg(test)]
mod tests;
