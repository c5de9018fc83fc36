//! A subscription paused because the app refuses connections (DESIGN.md "Messaging",
//! Delivery): nothing listens yet (the sidecar started first) or the app is restarting. A
//! refusal says nothing about the message, so it is not an attempt: the message goes back
//! unchanged, and the subscription stops reading and re-tries the app's port with its
//! `backoff`, never more than [`MAX_PROBE_INTERVAL`] apart, until a connection is accepted.
//!
//! While paused, `outrigger_subscription_paused{queue}` is 1 and `/readyz` shows the `app`
//! check `degraded` (not failing: readiness follows the app's health path, when it has one).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use outrigger_config as config;
use prometheus::IntGauge;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::messaging::envelope::rfc3339;
use crate::policy::backoff::Backoff;

/// The longest wait between two tries of a refusing app's port: an app that comes up is
/// served within a second.
pub const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// When to try the app's port next: the subscription's backoff, capped at
/// [`MAX_PROBE_INTERVAL`]. Pure and driven by `now`, so a test can step it.
#[derive(Debug)]
pub struct Probes {
    backoff: Backoff,
    tries: u32,
    previous: Duration,
    next: Instant,
}

impl Probes {
    /// Paused at `now`: the first try is one backoff step later.
    pub fn new(backoff: config::Backoff, now: Instant) -> Self {
        let max = config::Duration::from(backoff.max.get().min(MAX_PROBE_INTERVAL));
        let initial = config::Duration::from(backoff.initial.get().min(max.get()));
        let mut probes = Self {
            backoff: Backoff::new(config::Backoff { initial, max, ..backoff }),
            tries: 0,
            previous: Duration::ZERO,
            next: now,
        };
        probes.refused(now);
        probes
    }

    /// When the next try is due.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// The try at `now` was refused too: the one after it is a backoff step later.
    pub fn refused(&mut self, now: Instant) {
        let delay = self.backoff.delay(self.tries, self.previous).min(MAX_PROBE_INTERVAL);
        self.tries = self.tries.saturating_add(1);
        self.previous = delay;
        self.next = now + delay;
    }
}

/// Tries `accepts` at the pace of `probes` until it answers true (the app accepts
/// connections: true) or `stop` turns true (false). Each refused try is told to `refused`.
pub async fn until_accepting<F, Fut>(
    mut probes: Probes,
    mut accepts: F,
    mut refused: impl FnMut(),
    stop: &mut watch::Receiver<bool>,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(probes.next()) => {}
            _ = stop.wait_for(|stop| *stop) => return false,
        }
        if accepts().await {
            return true;
        }
        refused();
        probes.refused(Instant::now());
    }
}

/// Which subscriptions are paused, for `/readyz`: one entry per subscription that delivers.
#[derive(Debug, Default)]
pub struct Pauses {
    subscriptions: Mutex<BTreeMap<String, State>>,
}

/// One subscription's pause: since when, and how many tries of the app's port were refused.
#[derive(Debug, Default, Clone, Copy)]
struct State {
    since: Option<SystemTime>,
    refused: u64,
}

impl Pauses {
    /// The handle of `queue`'s subscription, which sets `gauge` (0 now: not paused).
    pub fn register(self: &Arc<Self>, queue: &str, gauge: IntGauge) -> Pause {
        gauge.set(0);
        self.lock().insert(queue.to_owned(), State::default());
        Pause { queue: queue.to_owned(), pauses: self.clone(), gauge }
    }

    /// The `app` check of `/readyz` as deliveries see it: `None` when nothing delivers, else
    /// `Ok(detail)` or, while a subscription is paused, `Err(detail)` saying which and since when.
    pub fn check(&self) -> Option<Result<String, String>> {
        let subscriptions = self.lock();
        if subscriptions.is_empty() {
            return None;
        }
        let paused: Vec<String> = subscriptions
            .iter()
            .filter_map(|(queue, state)| {
                let since = rfc3339(state.since?);
                let refused = state.refused;
                Some(format!(
                    "subscription {queue} paused since {since}: the app refuses connections \
                     ({refused} tries of its port refused so far)"
                ))
            })
            .collect();
        Some(match paused.is_empty() {
            true => Ok("the app accepts deliveries".to_owned()),
            false => Err(paused.join("; ")),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, State>> {
        self.subscriptions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One subscription's side of [`Pauses`], with its `outrigger_subscription_paused` gauge.
#[derive(Debug)]
pub struct Pause {
    queue: String,
    pauses: Arc<Pauses>,
    gauge: IntGauge,
}

impl Pause {
    /// The app refused a delivery's connection: paused from now. True when it was not already.
    pub fn pause(&self) -> bool {
        let paused = self.update(|state| match state.since {
            Some(_) => false,
            None => {
                *state = State { since: Some(SystemTime::now()), refused: 0 };
                true
            }
        });
        self.gauge.set(1);
        paused
    }

    /// A try of the app's port was refused again.
    pub fn refused(&self) {
        self.update(|state| state.refused += 1);
    }

    /// The app accepts connections again.
    pub fn resume(&self) {
        self.update(|state| *state = State::default());
        self.gauge.set(0);
    }

    pub fn is_paused(&self) -> bool {
        self.pauses.lock().get(&self.queue).is_some_and(|state| state.since.is_some())
    }

    fn update<T>(&self, change: impl FnOnce(&mut State) -> T) -> T {
        change(self.pauses.lock().entry(self.queue.clone()).or_default())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn backoff(initial: u64, max: u64, jitter: config::Jitter) -> config::Backoff {
        config::Backoff {
            initial: config::Duration::from_millis(initial),
            max: config::Duration::from_millis(max),
            jitter,
            ..config::Backoff::MESSAGING
        }
    }

    /// The offsets from `start` of the first `n` tries.
    fn schedule(cfg: config::Backoff, n: usize) -> Vec<Duration> {
        let start = Instant::now();
        let mut probes = Probes::new(cfg, start);
        let mut tries = Vec::new();
        for _ in 0..n {
            let at = probes.next();
            tries.push(at - start);
            probes.refused(at);
        }
        tries
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_subscription_tries_the_port_with_the_subscriptions_backoff() {
        let ms = Duration::from_millis;
        let tries = schedule(backoff(50, 200, config::Jitter::None), 5);
        assert_eq!(tries, [ms(50), ms(150), ms(350), ms(550), ms(750)]);
    }

    #[tokio::test(start_paused = true)]
    async fn tries_are_never_more_than_a_second_apart() {
        // the default delivery backoff (1 s growing to 60 s, full jitter), and a slow fixed one
        let fixed = config::Backoff {
            strategy: config::BackoffStrategy::Fixed,
            ..backoff(30_000, 60_000, config::Jitter::None)
        };
        for cfg in [config::Backoff::MESSAGING, fixed] {
            let tries = schedule(cfg, 50);
            for pair in tries.windows(2) {
                assert!(pair[1] - pair[0] <= MAX_PROBE_INTERVAL, "{cfg:?}: {tries:?}");
            }
            assert!(tries[0] <= MAX_PROBE_INTERVAL, "the first try too");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn probing_ends_when_the_app_accepts_and_counts_each_refusal() {
        let start = Instant::now();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let refusals = AtomicU32::new(0);
        let (_stop_tx, mut stop) = watch::channel(false);
        let probes = Probes::new(backoff(100, 1_000, config::Jitter::None), start);
        let accepted = until_accepting(
            probes,
            || {
                let calls = calls.clone();
                async move {
                    let mut calls = calls.lock().unwrap();
                    calls.push(Instant::now() - start);
                    calls.len() == 4 // refused three times, then it listens
                }
            },
            || {
                refusals.fetch_add(1, Ordering::Relaxed);
            },
            &mut stop,
        )
        .await;
        assert!(accepted);
        let ms = Duration::from_millis;
        assert_eq!(*calls.lock().unwrap(), [ms(100), ms(300), ms(700), ms(1500)]);
        assert_eq!(refusals.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn probing_stops_with_the_sidecar() {
        let (stop_tx, mut stop) = watch::channel(false);
        let probes = Probes::new(backoff(100, 1_000, config::Jitter::None), Instant::now());
        let probing = tokio::spawn(async move {
            until_accepting(probes, || async { false }, || {}, &mut stop).await
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop_tx.send(true).unwrap();
        assert!(!probing.await.unwrap(), "stopped, not accepted");
    }

    #[test]
    fn the_gauge_and_the_app_check_follow_the_pause() {
        let pauses = Arc::new(Pauses::default());
        assert_eq!(pauses.check(), None, "no subscription: no check");
        let gauge = IntGauge::new("paused", "test").unwrap();
        gauge.set(7);
        let pause = pauses.register("orders", gauge.clone());
        assert_eq!(gauge.get(), 0);
        assert_eq!(pauses.check(), Some(Ok("the app accepts deliveries".to_owned())));

        assert!(pause.pause(), "newly paused");
        assert!(!pause.pause(), "already paused");
        pause.refused();
        pause.refused();
        assert!(pause.is_paused());
        assert_eq!(gauge.get(), 1);
        let detail = pauses.check().unwrap().unwrap_err();
        assert!(detail.starts_with("subscription orders paused since "), "{detail}");
        assert!(detail.contains("(2 tries of its port refused so far)"), "{detail}");

        pause.resume();
        assert!(!pause.is_paused());
        assert_eq!(gauge.get(), 0);
        assert!(matches!(pauses.check(), Some(Ok(_))));
    }
}
