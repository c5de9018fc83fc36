//! How long to wait before the next attempt: `exponential` (initial × multiplier^n), `linear`
//! (initial + step × n) or `fixed` (initial), capped at `max`, then jittered so that many
//! clients failing together do not retry together (AWS's "Exponential Backoff and Jitter").
//! Also: the upstream's own `Retry-After` (RFC 9110 10.2.3), which replaces the computed delay.
//!
//! Shared by HTTP retries and message redelivery; pure functions, so tests pin the randomness.

use std::time::{Duration, SystemTime};

use outrigger_config as config;
use rand::RngExt;

/// A validated backoff policy.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    cfg: config::Backoff,
}

impl Backoff {
    pub fn new(cfg: config::Backoff) -> Self {
        Self { cfg }
    }

    pub fn initial(&self) -> Duration {
        self.cfg.initial.get()
    }

    pub fn max(&self) -> Duration {
        self.cfg.max.get()
    }

    /// The delay before retry number `retry` (0 for the first retry), given the previous delay
    /// (used by decorrelated jitter), with a fresh random draw.
    pub fn delay(&self, retry: u32, previous: Duration) -> Duration {
        self.delay_with(retry, previous, rand::rng().random::<f64>())
    }

    /// The same with the random draw `unit` in `[0, 1)` given, for tests.
    pub fn delay_with(&self, retry: u32, previous: Duration, unit: f64) -> Duration {
        self.cfg.delay_with(retry, previous, unit)
    }
}

/// An upstream's `Retry-After`: delta-seconds or an HTTP-date, as a wait from `now`.
pub fn parse_retry_after(value: &http::HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().ok().map(Duration::from_secs);
    }
    let when = httpdate::parse_http_date(text).ok()?;
    // a date in the past means "now"
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn backoff(strategy: config::BackoffStrategy, jitter: config::Jitter) -> Backoff {
        let mut cfg = config::Backoff::HTTP;
        cfg.strategy = strategy;
        cfg.jitter = jitter;
        cfg.initial = config::Duration::from_millis(100);
        cfg.max = config::Duration::from_secs(1);
        cfg.multiplier = 2.0;
        Backoff::new(cfg)
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn exponential_doubles_up_to_max() {
        let b = backoff(config::BackoffStrategy::Exponential, config::Jitter::None);
        let delays: Vec<Duration> = (0..6).map(|n| b.delay_with(n, Duration::ZERO, 0.5)).collect();
        assert_eq!(delays, [MS(100), MS(200), MS(400), MS(800), MS(1000), MS(1000)]);
        assert_eq!(b.delay_with(10_000, Duration::ZERO, 0.5), MS(1000), "no overflow far out");
    }

    #[test]
    fn linear_adds_a_step_and_fixed_stays() {
        let linear = backoff(config::BackoffStrategy::Linear, config::Jitter::None);
        let delays: Vec<Duration> =
            (0..4).map(|n| linear.delay_with(n, Duration::ZERO, 0.5)).collect();
        assert_eq!(delays, [MS(100), MS(200), MS(300), MS(400)], "step defaults to initial");
        let fixed = backoff(config::BackoffStrategy::Fixed, config::Jitter::None);
        assert!((0..4).all(|n| fixed.delay_with(n, Duration::ZERO, 0.9) == MS(100)));
    }

    #[test]
    fn each_jitter_mode_stays_within_its_bounds() {
        use config::BackoffStrategy::Exponential as E;
        let full = backoff(E, config::Jitter::Full);
        assert_eq!(full.delay_with(2, Duration::ZERO, 0.0), MS(0));
        assert_eq!(full.delay_with(2, Duration::ZERO, 0.5), MS(200));
        assert!(full.delay_with(2, Duration::ZERO, 0.999_999) < MS(400));

        let equal = backoff(E, config::Jitter::Equal);
        assert_eq!(equal.delay_with(2, Duration::ZERO, 0.0), MS(200));
        assert!(equal.delay_with(2, Duration::ZERO, 0.999_999) < MS(400));

        let decorrelated = backoff(E, config::Jitter::Decorrelated);
        assert_eq!(decorrelated.delay_with(0, MS(100), 0.0), MS(100), "never below initial");
        assert_eq!(
            decorrelated.delay_with(0, MS(200), 0.5),
            MS(350),
            "between initial and 3x previous"
        );
        assert_eq!(decorrelated.delay_with(0, MS(900), 0.999), MS(1000), "capped at max");

        for unit in [0.0, 0.25, 0.5, 0.75, 0.999_999] {
            for n in 0..8 {
                for b in [&full, &equal, &decorrelated] {
                    assert!(b.delay_with(n, MS(700), unit) <= MS(1000));
                }
            }
        }
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let parse = |v: &'static str| parse_retry_after(&HeaderValue::from_static(v), now);
        assert_eq!(parse("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        let in_90s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_str(&in_90s).unwrap(), now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse("Tue, 01 Jan 2019 00:00:00 GMT"),
            Some(Duration::ZERO),
            "past dates mean now"
        );
        assert_eq!(parse("soon"), None);
        assert_eq!(parse("-5"), None);
        assert_eq!(parse("1.5"), None);
    }
}
