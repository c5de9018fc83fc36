//! How long to wait before talking to etcd again after a failure: exponential steps, capped,
//! with equal jitter (half the step fixed, half random), so a fleet of sidecars that lost etcd
//! at the same moment does not reconnect in lockstep, and none waits less than half a step.

use std::time::Duration;

use outrigger_config as config;
use rand::RngExt;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    /// The formula HTTP retries use: exponential ×2, equal jitter, capped.
    policy: config::Backoff,
    /// Failures since the last success.
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let policy = config::Backoff {
            strategy: config::BackoffStrategy::Exponential,
            initial: initial.into(),
            max: max.into(),
            multiplier: 2.0,
            step: None,
            jitter: config::Jitter::Equal,
        };
        Self { policy, failures: 0 }
    }

    /// The delay before the next attempt; each call doubles the step, up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.next_with(rand::rng().random_range(0.0..=1.0))
    }

    /// `next_delay` with the random share given: `unit` in `0.0..=1.0`.
    fn next_with(&mut self, unit: f64) -> Duration {
        let delay = self.policy.delay_with(self.failures, Duration::ZERO, unit.clamp(0.0, 1.0));
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// After a success: the next failure starts again from `initial`.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_initial_up_to_the_cap() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        let longest: Vec<Duration> = (0..6).map(|_| backoff.next_with(1.0)).collect();
        assert_eq!(longest, [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]);
    }

    #[test]
    fn jitter_keeps_each_delay_between_half_the_step_and_the_step() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        assert_eq!(backoff.next_with(0.0), 50 * MS);
        assert_eq!(backoff.next_with(0.5), 150 * MS);
        let mut backoff = Backoff::new(1000 * MS, 1000 * MS);
        for _ in 0..100 {
            let delay = backoff.next_delay();
            assert!((500 * MS..=1000 * MS).contains(&delay), "{delay:?}");
        }
    }

    #[test]
    fn a_success_starts_the_next_outage_from_initial() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.next_with(1.0), 100 * MS);
    }
}
