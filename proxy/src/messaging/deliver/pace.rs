//! Small pure parts of a subscription's dispatcher: the throttle's pacing and the memory of
//! acknowledged ids.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use outrigger_discovery::time::saturating_add;
use tokio::time::Instant;

use crate::messaging::envelope::MessageId;

/// `throttle: { messages, per }`: deliveries start at most every `per / messages`, evenly
/// spaced, so no window of `per` ever sees more than `messages` (+1 at its edge) start.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    next: Instant,
}

impl Pacer {
    pub fn new(messages: u32, per: Duration, now: Instant) -> Self {
        Self { interval: per / messages.max(1), next: now }
    }

    /// When the next delivery may start.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// A delivery started at `now` (not before [`Pacer::next`]). The cadence is kept from
    /// the slot it was due in, so the time spent reading does not slow the pace; after an idle
    /// spell longer than one interval, the pace starts again from `now` (no burst is banked).
    pub fn take(&mut self, now: Instant) {
        let from = if now < saturating_add(self.next, self.interval) { self.next } else { now };
        self.next = saturating_add(from, self.interval);
    }
}

/// Ids acknowledged within the dedup window, so a message read again (its ack failed to
/// commit, or a broker handed it out twice) is acknowledged without a second delivery.
/// Bounded: past `capacity`, the oldest are forgotten first.
#[derive(Debug)]
pub struct Acknowledged {
    window: Duration,
    capacity: usize,
    ids: HashSet<MessageId>,
    order: VecDeque<(Instant, MessageId)>,
}

impl Acknowledged {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Self { window, capacity, ids: HashSet::new(), order: VecDeque::new() }
    }

    pub fn remember(&mut self, id: MessageId, now: Instant) {
        self.forget_expired(now);
        if self.ids.insert(id) {
            self.order.push_back((now, id));
        }
        while self.order.len() > self.capacity {
            if let Some((_, old)) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }

    pub fn contains(&mut self, id: MessageId, now: Instant) -> bool {
        self.forget_expired(now);
        self.ids.contains(&id)
    }

    fn forget_expired(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.order.front() {
            if now.duration_since(at) < self.window {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_pacer_spaces_deliveries_evenly() {
        let start = Instant::now();
        let mut pacer = Pacer::new(4, Duration::from_secs(1), start);
        let mut starts = Vec::new();
        for _ in 0..6 {
            tokio::time::sleep_until(pacer.next()).await;
            let now = Instant::now();
            pacer.take(now);
            starts.push(now - start);
        }
        let ms = |n| Duration::from_millis(n);
        assert_eq!(starts, [ms(0), ms(250), ms(500), ms(750), ms(1000), ms(1250)]);
    }

    #[tokio::test(start_paused = true)]
    async fn time_spent_reading_does_not_slow_the_pace() {
        let start = Instant::now();
        let mut pacer = Pacer::new(10, Duration::from_secs(1), start);
        for n in 1..=5u32 {
            tokio::time::sleep_until(pacer.next()).await;
            tokio::time::advance(Duration::from_millis(30)).await; // a read takes 30 ms
            pacer.take(Instant::now());
            assert_eq!(pacer.next() - start, Duration::from_millis(100) * n);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pacer_does_not_bank_a_burst() {
        let start = Instant::now();
        let mut pacer = Pacer::new(2, Duration::from_secs(1), start);
        pacer.take(start);
        tokio::time::advance(Duration::from_secs(10)).await;
        let now = Instant::now();
        assert!(pacer.next() <= now, "due after a long idle");
        pacer.take(now);
        assert_eq!(pacer.next() - now, Duration::from_millis(500), "but only one at once");
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledged_ids_are_remembered_for_the_window_and_bounded() {
        let id = |n: u64| MessageId::generate(SystemTime::UNIX_EPOCH + Duration::from_secs(n));
        let (a, b, c) = (id(1), id(2), id(3));
        let mut acked = Acknowledged::new(Duration::from_secs(60), 2);
        let now = Instant::now();
        acked.remember(a, now);
        assert!(acked.contains(a, now));
        assert!(!acked.contains(b, now));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!acked.contains(a, Instant::now()), "forgotten after the window");
        let now = Instant::now();
        acked.remember(a, now);
        acked.remember(b, now);
        acked.remember(c, now);
        assert!(!acked.contains(a, now), "the oldest goes past the capacity");
        assert!(acked.contains(b, now) && acked.contains(c, now));
    }
}
