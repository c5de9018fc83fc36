//! `concurrency: { min, max }`: the supervisor consumer (seed "Supervisor Consumer Pattern").
//! Every second it looks at what the dispatcher saw and moves the subscription's delivery
//! slots between the bounds:
//!
//! - **grow** (doubling, up to `max`) when every slot was busy and the queue still had
//!   messages waiting (a read got all it asked for), and the app is not failing;
//! - **halve** (down to `min`) when more than half of the deliveries failed: more concurrency
//!   would only push a struggling app harder;
//! - **back off by a quarter** when the app's mean latency over the second is more than twice
//!   the best it has shown (the baseline, which forgets slowly): it is saturated, and more
//!   deliveries in flight would only queue inside it;
//! - **shrink by one** (down to `min`) after a second in which the queue ran dry.
//!
//! The current value is `outrigger_subscription_concurrency{queue}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::{Semaphore, watch};

/// How often the supervisor decides.
pub const TICK: Duration = Duration::from_secs(1);

/// What the dispatcher and its deliveries report between two ticks.
#[derive(Debug, Default)]
pub struct Observed {
    /// Reads that got every message they asked for while all slots were taken.
    saturated: AtomicU64,
    /// Reads that found fewer messages than asked.
    dry: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    /// Summed delivery latency, microseconds.
    latency_us: AtomicU64,
}

impl Observed {
    /// A read asked for `asked` messages (all the free slots) and got `got`; `busy` slots were
    /// in flight before it.
    pub fn read(&self, asked: usize, got: usize, free_after: usize) {
        if got < asked {
            self.dry.fetch_add(1, Ordering::Relaxed);
        } else if free_after == 0 {
            self.saturated.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn delivery(&self, failed: bool, took: Duration) {
        let counter = if failed { &self.failed } else { &self.delivered };
        counter.fetch_add(1, Ordering::Relaxed);
        self.latency_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    fn take(&self) -> Window {
        Window {
            saturated: self.saturated.swap(0, Ordering::Relaxed),
            dry: self.dry.swap(0, Ordering::Relaxed),
            delivered: self.delivered.swap(0, Ordering::Relaxed),
            failed: self.failed.swap(0, Ordering::Relaxed),
            latency_us: self.latency_us.swap(0, Ordering::Relaxed),
        }
    }
}

/// One tick's observations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub saturated: u64,
    pub dry: u64,
    pub delivered: u64,
    pub failed: u64,
    pub latency_us: u64,
}

impl Window {
    /// The mean delivery latency of the tick, if anything was delivered.
    fn mean_latency_us(&self) -> Option<f64> {
        let n = self.delivered + self.failed;
        (n > 0).then(|| self.latency_us as f64 / n as f64)
    }
}

/// The best mean latency the app has shown, forgetting slowly (5% a tick upward), so a lasting
/// change in the app's speed becomes the new normal within a minute or so.
#[derive(Debug, Clone, Copy, Default)]
pub struct Baseline(Option<f64>);

impl Baseline {
    /// Takes the tick's mean into account; whether the app is now more than twice as slow.
    pub fn slowed(&mut self, window: &Window) -> bool {
        let Some(mean) = window.mean_latency_us() else { return false };
        let best = self.0.map_or(mean, |b| (b * 1.05).min(mean));
        self.0 = Some(best);
        mean > 2.0 * best.max(1.0)
    }
}

/// The next concurrency, from the current one, what the last tick saw, and whether the app's
/// latency has more than doubled against its baseline.
pub fn next(current: usize, min: usize, max: usize, w: Window, slowed: bool) -> usize {
    let attempts = w.delivered + w.failed;
    let next = if attempts > 0 && w.failed * 2 > attempts {
        current / 2
    } else if slowed {
        current - (current / 4).max(1)
    } else if w.saturated > 0 && w.dry == 0 {
        current.saturating_mul(2)
    } else if w.dry > 0 && w.saturated == 0 {
        current.saturating_sub(1)
    } else {
        current
    };
    next.clamp(min.max(1), max.max(1))
}

/// The slots of one subscription, resized by [`run`].
#[derive(Debug)]
pub struct Slots {
    pub semaphore: Arc<Semaphore>,
    /// Permits the semaphore holds in all (free + in flight), after pending shrinks.
    total: AtomicUsize,
}

impl Slots {
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Slots { semaphore: Arc::new(Semaphore::new(n)), total: AtomicUsize::new(n) })
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn resize(&self, to: usize) {
        let from = self.total.swap(to, Ordering::Relaxed);
        if to > from {
            self.semaphore.add_permits(to - from);
        } else if to < from {
            // taken back as deliveries finish: what is in flight is never cut short
            let semaphore = self.semaphore.clone();
            tokio::spawn(async move {
                if let Ok(permits) = semaphore.acquire_many_owned((from - to) as u32).await {
                    permits.forget();
                }
            });
        }
    }
}

/// Resizes `slots` every [`TICK`] until `stop`.
pub async fn run(
    slots: Arc<Slots>,
    observed: Arc<Observed>,
    (min, max): (usize, usize),
    gauge: IntGauge,
    mut stop: watch::Receiver<bool>,
) {
    gauge.set(slots.total() as i64);
    let mut baseline = Baseline::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let current = slots.total();
        let window = observed.take();
        let slowed = baseline.slowed(&window);
        let next = next(current, min, max, window, slowed);
        if next != current {
            tracing::debug!(from = current, to = next, ?window, "delivery concurrency");
            slots.resize(next);
            gauge.set(next as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(saturated: u64, dry: u64, delivered: u64, failed: u64) -> Window {
        Window { saturated, dry, delivered, failed, latency_us: 1000 * (delivered + failed) }
    }

    #[test]
    fn a_saturated_backlog_doubles_up_to_max() {
        let busy = window(3, 0, 10, 0);
        assert_eq!(next(1, 1, 32, busy, false), 2);
        assert_eq!(next(8, 1, 32, busy, false), 16);
        assert_eq!(next(20, 1, 32, busy, false), 32);
        assert_eq!(next(32, 1, 32, busy, false), 32);
    }

    #[test]
    fn a_dry_queue_shrinks_one_at_a_time_down_to_min() {
        let dry = window(0, 5, 3, 0);
        assert_eq!(next(8, 2, 32, dry, false), 7);
        assert_eq!(next(2, 2, 32, dry, false), 2);
    }

    #[test]
    fn a_failing_app_halves_the_concurrency() {
        assert_eq!(next(16, 1, 32, window(4, 0, 3, 7), false), 8, "even with a backlog");
        assert_eq!(next(1, 1, 32, window(0, 0, 0, 5), false), 1);
    }

    #[test]
    fn a_mixed_or_empty_tick_changes_nothing() {
        assert_eq!(next(4, 1, 32, window(2, 2, 10, 0), false), 4);
        assert_eq!(next(4, 1, 32, Window::default(), false), 4);
    }

    #[test]
    fn an_app_twice_as_slow_as_its_best_backs_off_even_with_a_backlog() {
        let mut baseline = Baseline::default();
        let fast = Window { latency_us: 10 * 1000, ..window(3, 0, 10, 0) };
        assert!(!baseline.slowed(&fast), "the first tick sets the baseline");
        assert_eq!(next(8, 1, 32, fast, false), 16, "a saturated backlog grows");
        let slow = Window { latency_us: 10 * 2500, ..window(3, 0, 10, 0) };
        assert!(baseline.slowed(&slow), "2.5x the best mean");
        assert_eq!(next(16, 1, 32, slow, true), 12, "a quarter back");
        assert_eq!(next(2, 1, 32, slow, true), 1, "at least one step");
        let idle = Window::default();
        assert!(!baseline.slowed(&idle), "nothing delivered says nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn slots_grow_at_once_and_shrink_as_deliveries_finish() {
        let slots = Slots::new(2);
        let held = slots.semaphore.clone().acquire_many_owned(2).await.unwrap();
        slots.resize(4);
        assert_eq!(slots.semaphore.available_permits(), 2);
        slots.resize(1);
        assert_eq!(slots.total(), 1);
        tokio::task::yield_now().await;
        drop(held); // the deliveries in flight finish
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(slots.semaphore.available_permits(), 1);
    }
}
