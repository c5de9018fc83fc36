//! Retry budget: retries may add at most `ratio` of the recent requests, plus
//! `min_per_second` so a quiet upstream can still be retried. A retry is counted when it is
//! decided, before its backoff sleep, so a burst of failures cannot schedule a storm of retries
//! that the budget only notices later (Finagle's and Linkerd's retry budgets).

use std::time::Duration;

use tokio::time::Instant;

/// The window the budget looks back over.
const WINDOW: Duration = Duration::from_secs(10);
const BUCKETS: usize = 10;

/// Requests and retries over the last `WINDOW`, in one-second buckets.
#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    min_per_second: u32,
    epoch: Instant,
    current: u64,
    buckets: [(u32, u32); BUCKETS],
}

impl Budget {
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        Self {
            ratio,
            min_per_second,
            epoch: Instant::now(),
            current: 0,
            buckets: [(0, 0); BUCKETS],
        }
    }

    /// A first attempt was made.
    pub fn deposit(&mut self, now: Instant) {
        self.advance(now).0 += 1;
    }

    /// May one more retry be made? If so it is counted now.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.advance(now);
        let (requests, retries) = self.totals();
        if (retries as f64) < self.allowed(requests) {
            self.advance(now).1 += 1;
            true
        } else {
            false
        }
    }

    /// How many retries would be granted at `now`, were no more requests to come.
    pub fn left(&mut self, now: Instant) -> u32 {
        self.advance(now);
        let (requests, retries) = self.totals();
        let room = self.allowed(requests) - retries as f64;
        room.max(0.0).ceil() as u32
    }

    /// The first attempts and the retries in the window.
    fn totals(&self) -> (u64, u64) {
        self.buckets.iter().fold((0, 0), |(q, r), b| (q + u64::from(b.0), r + u64::from(b.1)))
    }

    /// How many retries the window's `requests` allow.
    fn allowed(&self, requests: u64) -> f64 {
        self.ratio * requests as f64 + f64::from(self.min_per_second) * WINDOW.as_secs_f64()
    }

    /// The bucket for `now`, clearing the ones that fell out of the window.
    fn advance(&mut self, now: Instant) -> &mut (u32, u32) {
        let bucket_len = WINDOW / BUCKETS as u32;
        let index =
            (now.saturating_duration_since(self.epoch).as_nanos() / bucket_len.as_nanos()) as u64;
        if index > self.current {
            for i in (self.current + 1)..=index.min(self.current + BUCKETS as u64) {
                self.buckets[(i % BUCKETS as u64) as usize] = (0, 0);
            }
            self.current = index;
        }
        &mut self.buckets[(self.current % BUCKETS as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_at_the_ratio_plus_the_floor() {
        let mut budget = Budget::new(0.2, 1);
        let now = Instant::now();
        for _ in 0..100 {
            budget.deposit(now);
        }
        // 20% of 100 requests + 1/s over a 10 s window = 30 retries
        assert_eq!(budget.left(now), 30);
        let granted = (0..100).filter(|_| budget.try_withdraw(now)).count();
        assert_eq!(granted, 30);
        assert_eq!(budget.left(now), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_as_old_requests_leave_the_window() {
        let mut budget = Budget::new(0.5, 0);
        let start = Instant::now();
        for _ in 0..10 {
            budget.deposit(start);
        }
        assert_eq!((0..10).filter(|_| budget.try_withdraw(start)).count(), 5);
        let later = start + WINDOW + Duration::from_secs(1);
        assert!(!budget.try_withdraw(later), "no requests in the window, no floor: no retries");
        for _ in 0..4 {
            budget.deposit(later);
        }
        assert_eq!((0..10).filter(|_| budget.try_withdraw(later)).count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_upstream_still_gets_its_floor() {
        let mut budget = Budget::new(0.0, 2);
        assert_eq!((0..50).filter(|_| budget.try_withdraw(Instant::now())).count(), 20);
    }
}
