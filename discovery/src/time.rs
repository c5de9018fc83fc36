//! Deadlines a configured wait from now, without panicking: `Instant + Duration` panics when
//! the sum is past what an `Instant` holds. Config caps every duration at 365 days, so this is
//! a second line: code that turns a value into a deadline cannot abort the process, drop a
//! listener or a request, whatever the value. Here, the lowest crate with tokio, so that the
//! proxy and discovery share it.

use std::time::Duration;

use tokio::time::Instant;

/// About 30 years: "never" for a sidecar, and what tokio's own `sleep` uses for a wait too long
/// to represent. tokio's timer clamps anything this far out to the longest it can arm.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);

/// `at + wait`, or a far future when the sum does not fit in an `Instant`.
pub fn saturating_add(at: Instant, wait: Duration) -> Instant {
    // the last fallback cannot be reached: the monotonic clock counts from boot, and an
    // `Instant` holds hundreds of billions of years past it
    at.checked_add(wait).or_else(|| at.checked_add(FAR_FUTURE)).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_fits_is_added_exactly() {
        let now = Instant::now();
        assert_eq!(saturating_add(now, Duration::from_secs(30)), now + Duration::from_secs(30));
        assert_eq!(saturating_add(now, Duration::ZERO), now);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_clock_is_the_far_future_not_a_panic() {
        let now = Instant::now();
        let never = saturating_add(now, Duration::MAX);
        assert!(never >= now + FAR_FUTURE, "{:?} from now", never - now);
        // `200000000000000d`, the value: past an Instant, within a Duration
        let huge = Duration::from_secs(200_000_000_000_000 * 86_400);
        assert!(saturating_add(now, huge) >= now + FAR_FUTURE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_far_future_deadline_can_be_slept_on_and_does_not_fire() {
        let deadline = saturating_add(Instant::now(), Duration::MAX);
        let sleep = tokio::time::sleep_until(deadline);
        let timeout = tokio::time::timeout(Duration::from_secs(365 * 86_400), sleep).await;
        assert!(timeout.is_err(), "a year later, the far-future deadline has not passed");
    }
}
