//! Passive outlier detection: an endpoint whose requests fail `consecutive_failures` times in a
//! row (5xx answers, connection failures, resets, timeouts) is ejected from balancing for
//! `base_ejection` × the number of times it was ejected in a row (capped at five minutes, or at
//! `base_ejection` if that is longer), then returns by itself. An ejection that would leave more
//! than `max_ejected_percent` of the endpoints ejected does not happen, so detection alone never
//! empties an upstream unless the operator allows it with 100.

use std::time::Duration;

use outrigger_config as config;
use tokio::time::Instant;

/// The longest ejection, however often an endpoint is ejected (Envoy's default maximum).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// An endpoint's ejection history.
#[derive(Debug, Default)]
pub(crate) struct Ejections {
    /// Ejections in a row: each one that follows soon after the last return counts up.
    in_a_row: u32,
    returns_at: Option<Instant>,
}

impl Ejections {
    /// Ejects now; returns when the endpoint comes back.
    pub(crate) fn eject(&mut self, base: Duration, now: Instant) -> Instant {
        // back for at least one base period without failing again: it starts over
        let forgiven = self.returns_at.is_none_or(|at| now.saturating_duration_since(at) >= base);
        self.in_a_row = if forgiven { 1 } else { self.in_a_row + 1 };
        let length = base.saturating_mul(self.in_a_row).min(MAX_EJECTION.max(base));
        let returns_at = crate::time::saturating_add(now, length);
        self.returns_at = Some(returns_at);
        returns_at
    }

    pub(crate) fn in_a_row(&self) -> u32 {
        self.in_a_row
    }
}

/// How many of `endpoints` may be ejected at once.
pub(crate) fn max_ejected(cfg: &config::OutlierDetection, endpoints: usize) -> usize {
    endpoints * usize::from(cfg.max_ejected_percent.min(100)) / 100
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[tokio::test(start_paused = true)]
    async fn repeated_ejections_grow_and_a_quiet_period_forgives_them() {
        let mut e = Ejections::default();
        let t0 = Instant::now();
        let back = e.eject(S(30), t0);
        assert_eq!(back, t0 + S(30));
        let back = e.eject(S(30), t0 + S(31));
        assert_eq!(back, t0 + S(31) + S(60), "the second in a row lasts twice as long");
        assert_eq!(e.in_a_row(), 2);
        let later = back + S(30);
        assert_eq!(e.eject(S(30), later), later + S(30), "back for a whole base period: forgiven");
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejection_never_exceeds_the_cap() {
        let mut e = Ejections::default();
        let mut now = Instant::now();
        for _ in 0..20 {
            now = e.eject(S(60), now);
        }
        let next = e.eject(S(60), now);
        assert_eq!(next - now, MAX_EJECTION);
        assert_eq!(Ejections::default().eject(S(900), now) - now, S(900), "a longer base wins");
    }

    #[test]
    fn the_share_that_may_be_ejected_rounds_down() {
        let cfg = |percent| config::OutlierDetection {
            consecutive_failures: NonZeroU32::new(5).unwrap(),
            base_ejection: config::Duration::from_secs(30),
            max_ejected_percent: percent,
        };
        assert_eq!(max_ejected(&cfg(50), 2), 1);
        assert_eq!(max_ejected(&cfg(50), 3), 1);
        assert_eq!(max_ejected(&cfg(10), 5), 0);
        assert_eq!(max_ejected(&cfg(100), 3), 3);
    }
}
