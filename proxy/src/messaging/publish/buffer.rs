//! The publish buffer (`outbound.limits.max_publish_buffer`, 64 MiB by default): a cap on the
//! bytes of publish bodies the whole sidecar holds at once, from the first byte read until the
//! message is stored. Without it, clients that send most of a 1 MiB body and stall pin 1 MiB
//! each, up to `max_requests` of them (10 GiB by default; issue 17).
//!
//! A tokio `Semaphore` whose permits are bytes. A publish takes its `Content-Length` up front,
//! or each chunk of a chunked body as it arrives, and never waits for room (STYLE "reject, don't
//! wait"): past the cap it gets 503 `overloaded`. Its bytes come back when it ends, stored or not.
//! glibc keeps what a burst freed resident, so after a burst that held [`TRIM_AFTER`] or more at
//! once, the free pages are handed back to the kernel once the buffer has been quiet for
//! [`QUIET`] ([`outrigger_sys::trim_allocator`], on a blocking thread, never per request).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;

/// Bytes held at once by a burst that make a trim worth it once it is over: a trim walks (and
/// locks, in turn) every arena, and below this there is little to give back.
pub const TRIM_AFTER: usize = 8 << 20;
/// How long the buffer must hold less than [`TRIM_AFTER`] before the trim: time for the burst's
/// connections to close and free their read buffers too.
pub const QUIET: Duration = Duration::from_secs(1);

/// The sidecar's one publish buffer; clones share it.
#[derive(Debug, Clone)]
pub struct PublishBuffer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    bytes: Arc<Semaphore>,
    limit: usize,
    /// `outrigger_publish_buffer_bytes`
    held: IntGauge,
    /// `outrigger_shed_total{limit="max_publish_buffer"}`
    shed: IntCounter,
    /// The most held at once since the last trim.
    peak: AtomicUsize,
    /// A trim waits for the buffer to be quiet.
    trim_pending: AtomicBool,
    /// [`outrigger_sys::trim_allocator`]; a test's counter in tests.
    trim: fn() -> bool,
}

/// One publish's share of the buffer, given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

// === impl PublishBuffer ===

impl PublishBuffer {
    /// A buffer of `limit` bytes (at most tokio's `Semaphore::MAX_PERMITS`, about 2^61).
    pub fn new(limit: u64, held: IntGauge, shed: IntCounter) -> Self {
        Self::with_trim(limit, held, shed, outrigger_sys::trim_allocator)
    }

    fn with_trim(limit: u64, held: IntGauge, shed: IntCounter, trim: fn() -> bool) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        let shared = Shared {
            bytes: Arc::new(Semaphore::new(limit)),
            limit,
            held,
            shed,
            peak: AtomicUsize::new(0),
            trim_pending: AtomicBool::new(false),
            trim,
        };
        Self { shared: Arc::new(shared) }
    }

    /// An empty share for one publish.
    pub(crate) fn hold(&self) -> Held {
        Held { permit: None, shared: self.shared.clone() }
    }

    /// Bytes held now, by every publish.
    pub fn in_use(&self) -> usize {
        self.shared.in_use()
    }
}

// === impl Held ===

impl Held {
    /// Takes `bytes` more, or answers 503 `overloaded` when they do not fit under the cap.
    pub(crate) fn take(&mut self, bytes: usize) -> Result<(), ProxyError> {
        if bytes == 0 {
            return Ok(());
        }
        let shared = &self.shared;
        let acquired = u32::try_from(bytes)
            .ok()
            .and_then(|n| shared.bytes.clone().try_acquire_many_owned(n).ok());
        let Some(permit) = acquired else {
            shared.shed.inc();
            return Err(ProxyError::PublishBufferFull { limit: shared.limit });
        };
        shared.held.add(bytes as i64);
        shared.peak.fetch_max(shared.in_use(), Ordering::Relaxed);
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        Ok(())
    }

    /// Bytes this publish holds.
    pub(crate) fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else { return };
        self.shared.held.sub(permit.num_permits() as i64);
        drop(permit);
        Shared::trim_after_a_burst(&self.shared);
    }
}

// === impl Shared ===

impl Shared {
    fn in_use(&self) -> usize {
        self.limit - self.bytes.available_permits()
    }

    /// After a burst that held [`TRIM_AFTER`] at once: one trim, once the buffer is quiet.
    fn trim_after_a_burst(this: &Arc<Self>) {
        if this.peak.load(Ordering::Relaxed) < TRIM_AFTER
            || this.trim_pending.swap(true, Ordering::AcqRel)
        {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(this.clone().trim_when_quiet())),
            Err(_) => this.trim_pending.store(false, Ordering::Release),
        }
    }

    async fn trim_when_quiet(self: Arc<Self>) {
        loop {
            tokio::time::sleep(QUIET).await;
            if self.in_use() < TRIM_AFTER {
                break;
            }
        }
        self.peak.store(self.in_use(), Ordering::Relaxed);
        let gave_back = tokio::task::spawn_blocking(self.trim).await.unwrap_or(false);
        tracing::debug!(gave_back, "publish burst over: free memory handed back to the kernel");
        self.trim_pending.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer(limit: u64, trim: fn() -> bool) -> (PublishBuffer, IntGauge, IntCounter) {
        let held = IntGauge::new("held", "held").unwrap();
        let shed = IntCounter::new("shed", "shed").unwrap();
        (PublishBuffer::with_trim(limit, held.clone(), shed.clone(), trim), held, shed)
    }

    fn never() -> bool {
        panic!("no trim expected")
    }

    #[test]
    fn a_publish_past_the_cap_is_refused_at_once_and_counted() {
        let (buffer, held, shed) = buffer(100, never);
        let mut first = buffer.hold();
        first.take(60).unwrap();
        let mut second = buffer.hold();
        let refused = second.take(50).unwrap_err();
        assert_eq!((refused.status().as_u16(), refused.kind()), (503, "overloaded"));
        assert!(refused.to_string().contains("max_publish_buffer"), "{refused}");
        assert_eq!((shed.get(), held.get(), second.bytes()), (1, 60, 0));
        second.take(40).unwrap();
        assert_eq!((buffer.in_use(), held.get()), (100, 100), "up to the cap exactly");
    }

    #[test]
    fn bytes_come_back_when_the_publish_ends_whatever_its_outcome() {
        let (buffer, held, _) = buffer(100, never);
        let mut first = buffer.hold();
        first.take(100).unwrap();
        assert!(buffer.hold().take(1).is_err());
        drop(first);
        assert_eq!((buffer.in_use(), held.get()), (0, 0));
        let mut next = buffer.hold();
        next.take(100).unwrap();
        assert_eq!(next.bytes(), 100);
    }

    #[test]
    fn a_chunked_body_takes_each_piece_and_is_refused_at_the_piece_past_the_cap() {
        let (buffer, held, shed) = buffer(100, never);
        let mut chunked = buffer.hold();
        chunked.take(40).unwrap();
        chunked.take(0).unwrap();
        chunked.take(40).unwrap();
        assert_eq!(chunked.bytes(), 80, "the pieces add up");
        assert!(chunked.take(30).is_err());
        assert_eq!((chunked.bytes(), held.get(), shed.get()), (80, 80, 1), "a refusal takes none");
        drop(chunked);
        assert_eq!(buffer.in_use(), 0);
    }

    #[test]
    fn a_cap_past_what_a_semaphore_counts_is_clamped_not_a_panic() {
        let (buffer, _, _) = buffer(u64::MAX, never);
        let mut held = buffer.hold();
        held.take(1 << 20).unwrap();
        assert_eq!(buffer.in_use(), 1 << 20);
    }

    static TRIMS: AtomicUsize = AtomicUsize::new(0);

    fn count_trim() -> bool {
        TRIMS.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Lets the paused clock run until no trim is pending (the trim itself is a real thread).
    async fn settle(buffer: &PublishBuffer) {
        tokio::time::sleep(QUIET * 3).await;
        while buffer.shared.trim_pending.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_burst_memory_is_handed_back_once_when_the_buffer_is_quiet() {
        let (buffer, _, _) = buffer(64 << 20, count_trim);
        // small publishes, one after another: nothing worth a trim
        for _ in 0..100 {
            buffer.hold().take(1 << 20).unwrap();
        }
        settle(&buffer).await;
        assert_eq!(TRIMS.load(Ordering::SeqCst), 0, "no burst, no trim");

        // a burst of 10 MiB at once, then a publish still in flight while it ends
        let burst: Vec<Held> = (0..10)
            .map(|_| {
                let mut held = buffer.hold();
                held.take(1 << 20).unwrap();
                held
            })
            .collect();
        let mut busy = buffer.hold();
        busy.take(TRIM_AFTER).unwrap();
        drop(burst);
        tokio::time::sleep(QUIET * 3).await;
        assert_eq!(TRIMS.load(Ordering::SeqCst), 0, "not while the buffer is busy");
        drop(busy);
        settle(&buffer).await;
        assert_eq!(TRIMS.load(Ordering::SeqCst), 1, "one trim once it is quiet");

        // the next small publishes do not trim again
        buffer.hold().take(1 << 20).unwrap();
        settle(&buffer).await;
        assert_eq!(TRIMS.load(Ordering::SeqCst), 1);
    }
}
