//! Delivery (DESIGN.md "Messaging"): each `messaging.subscriptions[]` entry consumes its queue
//! and POSTs every message's envelope to `service.app.url + path`.
//!
//! One dispatcher task per subscription reads due messages from the broker (leasing them) as
//! slots free up, and spawns one task per delivery; the slots bound what is in flight
//! (`concurrency`). Before reading it waits for the app's health path to pass (when there is
//! one), for the subscription's breaker to admit, and for the throttle's pace. A failed message
//! is never slept on: it is parked in the broker with its new error record and attempt count
//! until its backoff has passed, durably, and the dispatcher goes on with others. Exhausted and
//! permanently failed messages move to the dead-letter queue, atomically with their removal;
//! when that write fails the message stays (parked, marked) and the dead-lettering is retried.
//! A connection the app refuses is not an attempt: the message goes back as it was, and the
//! dispatcher reads nothing until the app's port accepts a connection again ([`pause`]).
//!
//! The dispatcher wakes when a message is published to its queue, when a delivery ends, when
//! the soonest parked message falls due, and at the latest every [`POLL`].

pub mod attempt;
pub mod pace;
pub mod pause;
mod settle;
pub mod supervisor;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::Uri;
use outrigger_config as config;
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::error::chain;
use crate::http::forward::UpstreamClient;
use crate::messaging::broker::{BrokerError, Embedded, Leased, Queue, Read, UnixMillis};
use crate::messaging::envelope::unix_millis;
use crate::policy::circuit_breaker::{Admission, Breaker};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::Tracer;
use pace::{Acknowledged, Pacer};
use pause::{Pause, Pauses, Probes};

/// The longest a dispatcher waits before looking at its queue again when nothing woke it
/// (a dead letter replayed by an operator, a message another process stored).
const POLL: Duration = Duration::from_secs(1);
/// After a broker error, the dispatcher waits this long before reading again.
const BROKER_ERROR_PAUSE: Duration = Duration::from_secs(1);
/// How often each lane's queue gets its upkeep ([`Queue::tidy`]).
const TIDY_EVERY: Duration = Duration::from_secs(10);
/// Acknowledged ids remembered per subscription at most.
const ACKNOWLEDGED_CAPACITY: usize = 100_000;

/// Whether deliveries may go to the app now: follows its health path when one is configured.
pub type AppUp = watch::Receiver<bool>;

/// One subscription's delivery, shared by its dispatcher and its in-flight deliveries.
#[derive(Debug)]
pub struct Subscriber<B> {
    /// The base queue: names the subscription in logs and its own gauges.
    queue: String,
    /// Every queue consumed, highest priority first (the base queue last).
    lanes: Vec<Lane>,
    /// The consumer name given to the broker: `service.name`.
    consumer: String,
    /// `service.name` + path, as dead letters name it.
    subscriber: String,
    uri: Uri,
    client: UpstreamClient,
    cfg: config::Subscription,
    broker: B,
    wake: Arc<Notify>,
    breaker: Option<Mutex<Breaker>>,
    acknowledged: Mutex<Acknowledged>,
    /// Where an id delivered but not acknowledged is remembered across restarts (the local
    /// store); `None` when there is none.
    memory: Option<Embedded>,
    dedup_window: Duration,
    metrics: DeliveryMetrics,
    observed: Arc<supervisor::Observed>,
    tracer: Tracer,
    /// Set while the app refuses connections: nothing is read then.
    pause: Pause,
}

/// One queue a subscription consumes, with where its dead letters go and its counters.
#[derive(Debug)]
struct Lane {
    queue: String,
    dead_letter_queue: String,
    acked: IntCounter,
    retried: IntCounter,
    dead_lettered: IntCounter,
    dropped: IntCounter,
    duplicate: IntCounter,
    dead_letters: IntCounter,
    duration: Histogram,
}

/// The subscription's own gauges, made once.
#[derive(Debug)]
struct DeliveryMetrics {
    circuit: IntGauge,
    concurrency: IntGauge,
}

/// Of every this many reads, one takes the lowest lane first: a busy higher lane slows a lower
/// one, it never stops it.
const LOWEST_FIRST_EVERY: u64 = 10;

/// What a dispatcher needs from the sidecar, besides its subscription.
#[derive(Debug, Clone)]
pub struct Context<B> {
    pub broker: B,
    pub service: String,
    /// `service.app.url` with its base path, without a trailing `/`.
    pub app_base: String,
    pub dedup_window: Duration,
    /// The local store, which remembers ids whose acknowledgement failed (see
    /// [`Embedded::remember_acknowledged`]).
    pub memory: Option<Embedded>,
    pub metrics: Metrics,
    pub tracer: Tracer,
    /// Which subscriptions are paused, for `/readyz`.
    pub pauses: Arc<Pauses>,
}

impl<B: Queue + Clone> Subscriber<B> {
    pub fn new(cfg: &config::Subscription, ctx: &Context<B>, wake: Arc<Notify>) -> Arc<Self> {
        let queue = cfg.queue.to_string();
        let uri = format!("{}{}", ctx.app_base, cfg.path)
            .parse()
            .expect("service.app.url and the subscription path were validated");
        let timeouts = config::Timeouts { connect: cfg.timeout, ..config::Timeouts::default() };
        let now = Instant::now();
        let breaker = cfg.circuit_breaker.map(|b| {
            let cb = config::CircuitBreaker {
                consecutive_failures: Some(b.consecutive_failures),
                open_for: b.open_for,
                half_open_requests: b.half_open_requests,
                // only failures in a row open it: a subscription has no request mix to rate
                min_requests: u32::MAX,
                ..config::CircuitBreaker::default()
            };
            Mutex::new(Breaker::new(cb, now))
        });
        let m = &ctx.metrics;
        let lanes = cfg
            .lanes()
            .iter()
            .map(|lane| {
                let name = lane.to_string();
                let outcome = |outcome| m.messages_delivered(&name, outcome);
                Lane {
                    dead_letter_queue: cfg.dead_letter_queue_of(lane).to_string(),
                    acked: outcome("acked"),
                    retried: outcome("retried"),
                    dead_lettered: outcome("dead_lettered"),
                    dropped: outcome("dropped"),
                    duplicate: outcome("duplicate"),
                    dead_letters: m.deadletter_messages(&name),
                    duration: m.delivery_duration(&name),
                    queue: name,
                }
            })
            .collect();
        let metrics = DeliveryMetrics {
            circuit: m.subscription_circuit_state(&queue),
            concurrency: m.subscription_concurrency(&queue),
        };
        let pause = ctx.pauses.register(&queue, m.subscription_paused(&queue));
        Arc::new(Subscriber {
            lanes,
            pause,
            consumer: ctx.service.clone(),
            subscriber: format!("{}{}", ctx.service, cfg.path),
            uri,
            client: crate::http::forward::client(&timeouts, None, false),
            cfg: cfg.clone(),
            broker: ctx.broker.clone(),
            wake,
            breaker,
            acknowledged: Mutex::new(Acknowledged::new(ctx.dedup_window, ACKNOWLEDGED_CAPACITY)),
            memory: ctx.memory.clone(),
            dedup_window: ctx.dedup_window,
            metrics,
            observed: Arc::default(),
            tracer: ctx.tracer.clone(),
            queue,
        })
    }

    /// The deliveries in flight at most, at first; with `{ min, max }`, a supervisor task
    /// moves it between the bounds from then on.
    fn slots(&self, stop: &watch::Receiver<bool>) -> Arc<supervisor::Slots> {
        match self.cfg.concurrency {
            config::Concurrency::Fixed(n) => {
                self.metrics.concurrency.set(n.get() as i64);
                supervisor::Slots::new(n.get())
            }
            config::Concurrency::Scaled(range) => {
                let slots = supervisor::Slots::new(range.min.max(1));
                tokio::spawn(supervisor::run(
                    slots.clone(),
                    self.observed.clone(),
                    (range.min, range.max),
                    self.metrics.concurrency.clone(),
                    stop.clone(),
                ));
                slots
            }
        }
    }

    /// Dispatches until `stop` turns true, then waits for the deliveries in flight.
    pub async fn run(self: Arc<Self>, mut app_up: AppUp, mut stop: watch::Receiver<bool>) {
        let scaled = self.slots(&stop);
        let (limit, slots) = (scaled.total(), scaled.semaphore.clone());
        let mut pacer =
            self.cfg.throttle.map(|t| Pacer::new(t.messages.get(), t.per.get(), Instant::now()));
        tracing::info!(queue = %self.queue, uri = %self.uri, concurrency = limit, "delivering");
        self.recall_acknowledged().await;
        tokio::spawn(self.clone().tidy(stop.clone()));
        let mut reads = 0u64;
        loop {
            let ready = async {
                // the app's health path must pass: messages wait, they are not tried
                app_up.wait_for(|up| *up).await.ok()?;
                let first = slots.clone().acquire_owned().await.ok()?;
                let mut permits = vec![first];
                // a throttled subscription starts one delivery per pace step
                if let Some(pacer) = &pacer {
                    tokio::time::sleep_until(pacer.next()).await;
                } else {
                    while let Ok(permit) = slots.clone().try_acquire_owned() {
                        permits.push(permit);
                    }
                }
                Some(permits)
            };
            let permits = tokio::select! {
                permits = ready => match permits { Some(p) => p, None => break },
                _ = stop.wait_for(|stop| *stop) => break,
            };
            if self.pause.is_paused() {
                // a delivery found the app's port refusing: read nothing until it accepts
                drop(permits);
                if !self.until_accepting(&mut stop).await {
                    break;
                }
                continue;
            }
            let (admissions, wait) = self.admit(permits.len());
            if admissions.is_empty() {
                let wait = wait.unwrap_or(POLL);
                tracing::debug!(queue = %self.queue, ?wait, "breaker open: deliveries wait");
                self.idle(wait, &mut stop).await;
                continue;
            }
            let max = admissions.len();
            let leased = match self.read_lanes(max, reads).await {
                Ok(leased) => leased,
                Err(error) => {
                    tracing::error!(queue = %self.queue, error = %chain(&error), "reading the queue failed; trying again shortly");
                    self.cancel(admissions);
                    self.idle(BROKER_ERROR_PAUSE, &mut stop).await;
                    continue;
                }
            };
            reads += 1;
            self.observed.read(admissions.len(), leased.len(), slots.available_permits());
            let idle = leased.len() < admissions.len();
            let mut admissions = admissions.into_iter();
            let mut leased = leased.into_iter();
            // permits first: zip stops at the first exhausted side without taking from the other
            for (permit, leased) in permits.into_iter().zip(leased.by_ref()) {
                if let Some(pacer) = &mut pacer {
                    pacer.take(Instant::now());
                }
                let admission = admissions.next().flatten();
                tokio::spawn(self.clone().deliver(leased, admission, permit));
            }
            // a broker that handed out more than was asked: those go back, due now
            for extra in leased {
                let Leased { envelope, attempts } = extra;
                self.park(envelope, attempts, Duration::ZERO).await;
            }
            self.cancel(admissions.collect());
            // a broker whose read waits for messages has already waited
            if idle && !self.broker.blocks_on_read() {
                // a parked message due already is in flight (or its key is held): its
                // delivery's end wakes the dispatcher, so only a future due time matters
                let wait = self.next_due().await.unwrap_or(POLL).min(POLL);
                self.idle(wait, &mut stop).await;
            }
        }
        // stopped: nothing new starts; what is in flight may finish
        let _ = slots.acquire_many(scaled.total() as u32).await;
        tracing::info!(queue = %self.queue, "delivery stopped");
    }

    /// Up to `max` due messages, from the lanes in priority order (on one read in
    /// [`LOWEST_FIRST_EVERY`], lowest first); a broker that waits for messages waits only on
    /// the last lane, and only when the others had none.
    async fn read_lanes(&self, max: usize, reads: u64) -> Result<Vec<Leased>, BrokerError> {
        let lowest_first = reads % LOWEST_FIRST_EVERY == LOWEST_FIRST_EVERY - 1;
        let order: Vec<&Lane> = if lowest_first {
            self.lanes.iter().rev().collect()
        } else {
            self.lanes.iter().collect()
        };
        let mut leased = Vec::new();
        for (n, lane) in order.iter().enumerate() {
            if leased.len() >= max {
                break;
            }
            let read = Read {
                max: max - leased.len(),
                now: unix_millis(SystemTime::now()),
                ordered: self.cfg.ordered,
                wait: n + 1 == order.len() && leased.is_empty(),
            };
            match self.broker.read(&lane.queue, &self.consumer, read).await {
                Ok(more) => leased.extend(more),
                Err(error) if leased.is_empty() => return Err(error),
                // what earlier lanes handed out is delivered; this lane is read next time
                Err(error) => {
                    tracing::warn!(queue = %lane.queue, error = %chain(&error), "reading a lane failed");
                    break;
                }
            }
        }
        Ok(leased)
    }

    /// How long until the soonest message parked in any lane falls due, if one is.
    async fn next_due(&self) -> Option<Duration> {
        let now = unix_millis(SystemTime::now());
        let mut soonest: Option<UnixMillis> = None;
        for lane in &self.lanes {
            // a parked message due already is in flight (or its key is held): its delivery's
            // end wakes the dispatcher, so only a future due time matters
            if let Ok(Some(due)) = self.broker.next_due(&lane.queue, now).await {
                soonest = Some(soonest.map_or(due, |s| s.min(due)));
            }
        }
        soonest.map(|due| Duration::from_millis(due.saturating_sub(now)))
    }

    /// The lane a message of `queue` came from (the base lane for an unknown name).
    fn lane(&self, queue: &str) -> &Lane {
        self.lanes.iter().find(|l| l.queue == queue).unwrap_or_else(|| {
            self.lanes.last().expect("a subscription has at least its own queue")
        })
    }

    /// Every [`TIDY_EVERY`], each lane's upkeep, until `stop`.
    async fn tidy(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TIDY_EVERY) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            for lane in &self.lanes {
                match self.broker.tidy(&lane.queue).await {
                    Ok(0) => {}
                    Ok(removed) => {
                        tracing::debug!(queue = %lane.queue, removed, "settled entries trimmed")
                    }
                    Err(error) => {
                        tracing::debug!(queue = %lane.queue, error = %chain(&error), "upkeep failed; next time")
                    }
                }
            }
        }
    }

    /// While paused: tries the app's port with backoff until it accepts a connection (true),
    /// or until `stop` (false).
    async fn until_accepting(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let probes = Probes::new(self.cfg.backoff, Instant::now());
        let authority = self.uri.authority().map_or("", |a| a.as_str()).to_owned();
        let connect_timeout = self.cfg.timeout.get().min(pause::MAX_PROBE_INTERVAL);
        let accepts = || {
            let authority = authority.clone();
            async move {
                let connect = tokio::net::TcpStream::connect(authority.as_str());
                matches!(tokio::time::timeout(connect_timeout, connect).await, Ok(Ok(_)))
            }
        };
        let accepted = pause::until_accepting(probes, accepts, || self.pause.refused(), stop).await;
        if accepted {
            self.pause.resume();
            tracing::info!(queue = %self.queue, app = %authority, "the app accepts connections: delivery resumes");
        }
        accepted
    }

    /// Waits for a wake-up (a publish, a finished delivery), `wait`, or the stop.
    async fn idle(&self, wait: Duration, stop: &mut watch::Receiver<bool>) {
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
    }

    /// Up to `n` admissions from the breaker (`None` each when there is no breaker), and how
    /// long until it admits again when it admitted fewer.
    fn admit(&self, n: usize) -> (Vec<Option<Admission>>, Option<Duration>) {
        let Some(breaker) = &self.breaker else { return (vec![None; n], None) };
        let mut breaker = breaker.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut admitted = Vec::with_capacity(n);
        let mut wait = None;
        while admitted.len() < n {
            match breaker.admit(now) {
                Ok(admission) => admitted.push(Some(admission)),
                Err(until) => {
                    wait = Some(until);
                    break;
                }
            }
        }
        self.metrics.circuit.set(breaker.state().gauge());
        (admitted, wait)
    }

    /// Hands back admissions that found no message.
    fn cancel(&self, admissions: Vec<Option<Admission>>) {
        let Some(breaker) = &self.breaker else { return };
        let mut breaker = breaker.lock().unwrap_or_else(|e| e.into_inner());
        for admission in admissions.into_iter().flatten() {
            breaker.cancel(admission);
        }
    }

    fn record(&self, admission: Option<Admission>, failed: bool) {
        let (Some(breaker), Some(admission)) = (&self.breaker, admission) else { return };
        let mut breaker = breaker.lock().unwrap_or_else(|e| e.into_inner());
        breaker.record(Instant::now(), admission, failed);
        self.metrics.circuit.set(breaker.state().gauge());
    }
}
