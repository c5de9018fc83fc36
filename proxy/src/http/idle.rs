//! Idle connections: `outbound.limits.idle_timeout` with no byte moved either way ends a client
//! connection, even while nothing polls its socket.
//!
//! The connection guard sees every read and write and checks the deadline whenever hyper waits
//! on the socket. But while hyper streams a response whose upstream has stalled mid-body, it
//! waits on the body and never touches the socket: a stalled upstream would hold the client
//! connection, and the upstream's, for ever. So the guard records each byte's time in an
//! [`Activity`] shared with a watcher on the connection's task, which ends the connection once
//! it has been idle for the timeout. A request waiting for its response head is not idle: that
//! wait is bounded by the upstream's `timeouts.request`, and may rightly be longer.
//!
//! The same shared record carries the one fact the guard needs from the service: whether the
//! answer to an upgrade request (or CONNECT) turned the connection into a tunnel. Requests are
//! numbered in arrival order on both sides (an HTTP/1 connection serves them one at a time), so
//! the answer is matched to the request the guard saw, not to one pipelined before it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use outrigger_discovery::time::saturating_add;
use tokio::time::Instant;

/// When a connection last moved a byte, how many of its requests await a response head, and
/// what the answer to its pending upgrade request was.
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    /// Nanoseconds from `opened` to the last byte moved.
    last: AtomicU64,
    awaiting: AtomicUsize,
    /// Requests handed to the service so far.
    calls: AtomicU64,
    /// The index of the upgrade request whose answer the guard waits for, or `NO_UPGRADE`.
    upgrade_at: AtomicU64,
    verdict: AtomicU8,
    /// The guard's reader, parked until the verdict.
    reader: Mutex<Option<Waker>>,
}

const NO_UPGRADE: u64 = u64::MAX;
const UNDECIDED: u8 = 0;
const TUNNEL: u8 = 1;
const HTTP: u8 = 2;

/// What the answer to an upgrade request made of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upgrade {
    /// Not answered yet.
    Pending,
    /// A 101, or a 2xx to CONNECT: the bytes that follow are the new protocol's.
    Tunnel,
    /// Any other answer: the connection goes on as HTTP/1.
    Http,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        let opened = Instant::now();
        Arc::new(Self {
            opened,
            last: AtomicU64::new(0),
            awaiting: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            upgrade_at: AtomicU64::new(NO_UPGRADE),
            verdict: AtomicU8::new(UNDECIDED),
            reader: Mutex::new(None),
        })
    }

    /// The guard let through request `index` (counted from 0 on this connection), which asks
    /// for an upgrade: its answer decides what the connection is after it.
    pub(crate) fn expect_upgrade(&self, index: u64) {
        self.verdict.store(UNDECIDED, Ordering::Release);
        self.upgrade_at.store(index, Ordering::Release);
    }

    /// The answer to the expected upgrade; while it is `Pending`, `waker` is woken when it comes.
    pub(crate) fn upgrade_verdict(&self, waker: Option<&Waker>) -> Upgrade {
        let read = || match self.verdict.load(Ordering::Acquire) {
            TUNNEL => Upgrade::Tunnel,
            HTTP => Upgrade::Http,
            _ => Upgrade::Pending,
        };
        let Some(waker) = waker else { return read() };
        if read() == Upgrade::Pending {
            *self.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
        }
        // again, once parked: the answer may have come in between
        read()
    }

    /// The service answered request `index`; `tunnel` when the answer switches protocols.
    pub(crate) fn answered(&self, index: u64, tunnel: bool) {
        if self.upgrade_at.load(Ordering::Acquire) != index {
            return; // the common case: not the request an upgrade waits on
        }
        self.upgrade_at.store(NO_UPGRADE, Ordering::Release);
        self.verdict.store(if tunnel { TUNNEL } else { HTTP }, Ordering::Release);
        if let Some(reader) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            reader.wake();
        }
    }

    /// A byte moved now.
    pub(crate) fn touch(&self) {
        let since = Instant::now().saturating_duration_since(self.opened);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Relaxed);
    }

    pub(crate) fn last(&self) -> Instant {
        self.opened + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    /// Resolves once the connection has been idle for `timeout`: no byte moved, and no request
    /// waiting for its response head.
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        loop {
            let deadline = saturating_add(self.last(), timeout);
            if Instant::now() < deadline {
                tokio::time::sleep_until(deadline).await;
            } else if self.awaiting.load(Ordering::Relaxed) > 0 {
                // a request still waits on its upstream: not idle. Counted as activity, so
                // the guard's own check (when hyper reads) agrees; look again a timeout later
                self.touch();
            } else {
                return;
            }
        }
    }
}

/// A connection's service, counting its requests until their response heads.
#[derive(Debug, Clone)]
pub(crate) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S, B, RB> hyper::service::Service<Request<B>> for Tracked<S>
where
    S: hyper::service::Service<Request<B>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<B>) -> Self::Future {
        let index = self.activity.calls.fetch_add(1, Ordering::Relaxed);
        let connect = req.method() == Method::CONNECT;
        self.activity.awaiting.fetch_add(1, Ordering::Relaxed);
        TrackedFuture {
            inner: self.inner.call(req),
            activity: Some(self.activity.clone()),
            index,
            connect,
        }
    }
}

pin_project_lite::pin_project! {
    /// Counts its request as awaiting until the response head is ready (or the request is
    /// dropped); the head's arrival counts as activity, and settles a pending upgrade.
    #[derive(Debug)]
    pub(crate) struct TrackedFuture<F> {
        #[pin]
        inner: F,
        activity: Option<Arc<Activity>>,
        index: u64,
        connect: bool,
    }

    impl<F> PinnedDrop for TrackedFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(activity) = this.project().activity.take() {
                activity.awaiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl<F, RB, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        if let Some(activity) = this.activity.take() {
            activity.touch();
            activity.awaiting.fetch_sub(1, Ordering::Relaxed);
            // hyper ends HTTP/1 on the connection after a 101, or a 2xx to CONNECT
            let tunnel = output.as_ref().is_ok_and(|res| {
                res.status() == StatusCode::SWITCHING_PROTOCOLS
                    || (*this.connect && res.status().is_success())
            });
            activity.answered(*this.index, tunnel);
        }
        Poll::Ready(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_a_timeout_after_its_last_byte() {
        let activity = Activity::new();
        tokio::time::sleep(Duration::from_secs(30)).await;
        activity.touch();
        let started = Instant::now();
        activity.idle_for(TIMEOUT).await;
        assert_eq!(started.elapsed(), TIMEOUT, "60 s after the byte at 30 s");
    }

    /// A service whose answer takes its duration.
    struct Slow(Duration);

    impl hyper::service::Service<Request<()>> for Slow {
        type Response = Response<()>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<()>, Self::Error>> + Send>>;

        fn call(&self, _: Request<()>) -> Self::Future {
            let answer = tokio::time::sleep(self.0);
            Box::pin(async move {
                answer.await;
                Ok(Response::new(()))
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waiting_for_its_response_head_is_not_idle() {
        let activity = Activity::new();
        let service = Tracked::new(Slow(Duration::from_secs(150)), activity.clone());
        let started = Instant::now();
        let request = tokio::spawn(hyper::service::Service::call(&service, Request::new(())));
        activity.idle_for(TIMEOUT).await;
        // the head came at 150 s; idle a timeout after that
        assert!(request.is_finished());
        assert_eq!(started.elapsed(), Duration::from_secs(210));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_request_no_longer_counts() {
        let activity = Activity::new();
        let service = Tracked::new(Slow(Duration::from_secs(1 << 30)), activity.clone());
        drop(hyper::service::Service::call(&service, Request::new(())));
        let started = Instant::now();
        activity.idle_for(TIMEOUT).await;
        assert_eq!(started.elapsed(), TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_past_the_clock_never_fires_and_does_not_panic() {
        let activity = Activity::new();
        let year = Duration::from_secs(365 * 86_400);
        let idle = tokio::time::timeout(year, activity.idle_for(Duration::MAX)).await;
        assert!(idle.is_err(), "still not idle a year later");
    }
}
