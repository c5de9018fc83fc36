//! Peak-EWMA latency, the load estimate `p2c_ewma` compares (Linkerd's and Finagle's balancer).
//!
//! The estimate follows each observed time-to-headers with an exponentially weighted moving
//! average whose weight depends on the time since the last observation (decay period 10 s), but
//! jumps straight to any observation above it: an endpoint that turns slow is avoided at once,
//! and forgiven gradually. While an endpoint is not used its estimate decays towards zero, so
//! one that was slow once is tried again later instead of being shunned forever. An endpoint
//! never measured has no estimate: the balancer then compares on requests in flight alone, so
//! a new endpoint is neither flooded (as a zero estimate would) nor starved (as a pessimistic
//! default would).

use std::time::Duration;

use tokio::time::Instant;

/// How fast old observations lose weight.
const DECAY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PeakEwma {
    /// Nanoseconds, as of `updated`; `None` until the first observation.
    estimate: Option<f64>,
    updated: Option<Instant>,
}

impl PeakEwma {
    /// The estimate decayed to `now`, in nanoseconds; `None` if never measured.
    pub(crate) fn estimate(&self, now: Instant) -> Option<f64> {
        Some(self.estimate? * self.weight_of_the_past(now))
    }

    /// Folds in one observed latency.
    pub(crate) fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let Some(estimate) = self.estimate else {
            (self.estimate, self.updated) = (Some(rtt), Some(now));
            return;
        };
        let past = self.weight_of_the_past(now);
        self.estimate = Some(if rtt > estimate * past {
            rtt
        } else {
            // the longer since the last observation, the more this one counts
            estimate * past + rtt * (1.0 - past)
        });
        self.updated = Some(now);
    }

    fn weight_of_the_past(&self, now: Instant) -> f64 {
        let since = self.updated.map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        let elapsed = since.as_nanos() as f64;
        (-elapsed / DECAY.as_nanos() as f64).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn ms(nanos: Option<f64>) -> f64 {
        nanos.expect("measured") / 1e6
    }

    fn measured(rtt: Duration, now: Instant) -> PeakEwma {
        let mut ewma = PeakEwma::default();
        ewma.observe(rtt, now);
        ewma
    }

    #[tokio::test(start_paused = true)]
    async fn an_unmeasured_endpoint_has_no_estimate_and_the_first_observation_sets_it() {
        let now = Instant::now();
        assert_eq!(PeakEwma::default().estimate(now), None);
        assert_eq!(ms(measured(MS(7), now).estimate(now)), 7.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_observation_replaces_the_estimate_at_once() {
        let now = Instant::now();
        let mut ewma = measured(MS(5), now);
        ewma.observe(MS(80), now);
        assert_eq!(ms(ewma.estimate(now)), 80.0);
    }

    #[tokio::test(start_paused = true)]
    async fn faster_observations_pull_the_estimate_down_gradually() {
        let start = Instant::now();
        let mut ewma = measured(MS(100), start);
        let mut now = start;
        for _ in 0..10 {
            now += MS(100);
            ewma.observe(MS(10), now);
        }
        let after = ms(ewma.estimate(now));
        assert!(after < 100.0 && after > 10.0, "between the old and the new: {after}");
        for _ in 0..1000 {
            now += MS(100);
            ewma.observe(MS(10), now);
        }
        assert!((ms(ewma.estimate(now)) - 10.0).abs() < 0.5, "converges on what it sees");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_estimate_decays_towards_zero() {
        let start = Instant::now();
        let ewma = measured(MS(100), start);
        let later = ms(ewma.estimate(start + DECAY));
        assert!((later - 100.0 / std::f64::consts::E).abs() < 0.01, "{later}");
        assert!(ms(ewma.estimate(start + DECAY * 10)) < 0.01);
    }
}
