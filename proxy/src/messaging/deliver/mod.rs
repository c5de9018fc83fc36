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
pub mod supervisor;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::Uri;
use outrigger_config as config;
use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::{Notify, OwnedSemaphorePermit, watch};
use tokio::time::Instant;

use crate::error::chain;
use crate::http::forward::UpstreamClient;
use crate::messaging::broker::{BrokerError, Leased, Queue, Read, UnixMillis};
use crate::messaging::envelope::{Envelope, dead_letter_keys, rfc3339, unix_millis};
use crate::policy::circuit_breaker::{Admission, Breaker};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::{Kind, Tracer};
use attempt::{Answer, Delivery, Verdict};
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

    /// Delivers one leased message and settles it: acknowledged, parked or dead-lettered.
    async fn deliver(
        self: Arc<Self>,
        leased: Leased,
        admission: Option<Admission>,
        _slot: OwnedSemaphorePermit,
    ) {
        let Leased { envelope, attempts } = leased;
        let id = envelope.id;
        if envelope.metadata.contains_key(dead_letter_keys::DEAD_LETTERED_AT) {
            // its dead-lettering failed earlier: finish that, do not deliver again
            self.cancel(vec![admission]);
            self.store_dead_letter(envelope, attempts).await;
        } else if self.acknowledged_before(id) {
            self.cancel(vec![admission]);
            self.lane(&envelope.queue).duplicate.inc();
            tracing::debug!(queue = %envelope.queue, %id, "already acknowledged; not delivered again");
            self.ack(&envelope.queue, id).await;
        } else {
            match self.cfg.delivery {
                config::Delivery::AtLeastOnce => {
                    self.at_least_once(envelope, attempts, admission).await;
                }
                config::Delivery::AtMostOnce => self.at_most_once(envelope, admission).await,
            }
        }
        self.wake.notify_one();
    }

    async fn at_least_once(
        &self,
        mut envelope: Envelope,
        attempts: u32,
        admission: Option<Admission>,
    ) {
        let attempt = attempts + 1;
        let max_attempts = self.cfg.max_attempts.get();
        let lane = self.lane(&envelope.queue);
        let started = Instant::now();
        let answer = self.post(&envelope, attempt).await;
        let verdict = attempt::judge(&answer, SystemTime::now());
        if verdict == Verdict::Refused {
            // the app never saw it: no attempt, no record, no failure for the breaker
            self.cancel(vec![admission]);
            self.refused(&answer);
            self.park(envelope, attempts, Duration::ZERO).await;
            return;
        }
        let failed = matches!(verdict, Verdict::Retry { .. });
        self.record(admission, failed);
        self.observed.delivery(failed, started.elapsed());
        match verdict {
            Verdict::Acknowledge => {
                if self.cfg.duplicate_deliveries {
                    // the same delivery again, to prove the handler idempotent
                    let again = self.post(&envelope, attempt).await;
                    tracing::debug!(queue = %envelope.queue, id = %envelope.id, second = ?status_of(&again), "delivered twice (duplicate_deliveries)");
                }
                lane.acked.inc();
                self.ack(&envelope.queue, envelope.id).await;
            }
            Verdict::Retry { record, retry_after } => {
                let reason = record.message.clone();
                envelope.error.push(record);
                if attempt >= max_attempts {
                    let reason = format!("max attempts reached ({max_attempts})");
                    self.dead_letter(envelope, attempt, reason).await;
                    return;
                }
                let delay = self.retry_delay(attempt, retry_after);
                tracing::info!(queue = %envelope.queue, id = %envelope.id, attempt, max_attempts, ?delay, error = %reason, "delivery failed; retrying after the backoff");
                if self.park(envelope, attempt, delay).await {
                    lane.retried.inc();
                }
            }
            Verdict::Refused => unreachable!("handled above"),
            Verdict::Permanent { record } => {
                let reason = match record.status_code {
                    Some(code) => format!("permanent failure: the app answered {code}"),
                    None => "permanent failure".to_owned(),
                };
                envelope.error.push(record);
                self.dead_letter(envelope, attempt, reason).await;
            }
        }
    }

    /// Acknowledged first, then delivered once: a failure is dropped and counted.
    async fn at_most_once(&self, envelope: Envelope, admission: Option<Admission>) {
        let lane = self.lane(&envelope.queue);
        if let Err(error) = self.broker.ack(&envelope.queue, envelope.id).await {
            // not acknowledged, so not delivered: it is read again and acknowledged then
            tracing::error!(queue = %envelope.queue, id = %envelope.id, error = %chain(&error), "acknowledging before delivery failed; not delivered");
            self.cancel(vec![admission]);
            return;
        }
        let answer = self.post(&envelope, 1).await;
        match attempt::judge(&answer, SystemTime::now()) {
            Verdict::Acknowledge => {
                self.record(admission, false);
                lane.acked.inc();
            }
            Verdict::Refused => {
                // acknowledged already, so dropped as any failure is; the next ones wait
                self.cancel(vec![admission]);
                self.refused(&answer);
                lane.dropped.inc();
                tracing::warn!(queue = %envelope.queue, id = %envelope.id, "the app refused the connection; dropped (delivery: at_most_once)");
            }
            Verdict::Retry { record, .. } | Verdict::Permanent { record } => {
                self.record(admission, record.status_code.is_none_or(|c| c >= 500));
                lane.dropped.inc();
                tracing::warn!(queue = %envelope.queue, id = %envelope.id, error = %record.message, "delivery failed; dropped (delivery: at_most_once)");
            }
        }
    }

    async fn post(&self, envelope: &Envelope, attempt: u32) -> Answer {
        // each attempt is a span under the publish's: the app continues the trace from it
        let parent = envelope.metadata.get("traceparent").and_then(|v| v.as_str());
        let parent = parent.and_then(|p| http::HeaderValue::from_str(p).ok());
        let mut span = self.tracer.start(parent.as_ref(), "deliver", Kind::Client);
        if span.recording() {
            span.text("messaging.destination.name", envelope.queue.as_str());
            span.text("messaging.message.id", envelope.id.to_string());
            span.int("messaging.delivery.attempt", i64::from(attempt));
        }
        let delivery = Delivery {
            envelope,
            attempt,
            max_attempts: self.cfg.max_attempts.get(),
            traceparent: Some(span.context.header()),
        };
        let started = Instant::now();
        let answer = attempt::post(&self.client, &self.uri, delivery, self.cfg.timeout.get()).await;
        if !matches!(answer, Answer::Refused(_)) {
            // a refused connection is no attempt: it would only drag the figures down
            self.lane(&envelope.queue).duration.observe(started.elapsed().as_secs_f64());
        }
        match &answer {
            Answer::Status { status, .. } => {
                span.int("http.response.status_code", i64::from(status.as_u16()));
                if !status.is_success() {
                    span.failed();
                }
            }
            Answer::TimedOut(_) | Answer::Failed(_) | Answer::Refused(_) => span.failed(),
        }
        self.tracer.end(span);
        answer
    }

    /// The app refused a delivery's connection: the subscription pauses.
    fn refused(&self, answer: &Answer) {
        if self.pause.pause() {
            tracing::warn!(queue = %self.queue, error = %status_of(answer), "the app refuses connections: delivery paused until it accepts them");
        }
    }

    /// The wait before attempt `attempt + 1`: the app's `Retry-After` when it gave one (capped
    /// at `backoff.max`), else the backoff's.
    fn retry_delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.cfg.backoff;
        if let Some(wait) = retry_after {
            return wait.min(backoff.max.get());
        }
        // decorrelated jitter grows from the previous delay; it is not stored, so the
        // un-jittered delay of the previous retry stands in for it
        let retry = attempt - 1;
        let previous = match retry {
            0 => Duration::ZERO,
            n => config::Backoff { jitter: config::Jitter::None, ..backoff }.delay_with(
                n - 1,
                Duration::ZERO,
                0.0,
            ),
        };
        crate::policy::backoff::Backoff::new(backoff).delay(retry, previous)
    }

    async fn ack(&self, queue: &str, id: crate::messaging::envelope::MessageId) {
        match self.broker.ack(queue, id).await {
            Ok(()) => {
                let mut acknowledged = self.acknowledged.lock().unwrap_or_else(|e| e.into_inner());
                acknowledged.remember(id, Instant::now());
            }
            Err(error) => {
                // delivered, not forgotten: read again, it is acknowledged without a delivery
                let mut acknowledged = self.acknowledged.lock().unwrap_or_else(|e| e.into_inner());
                acknowledged.remember(id, Instant::now());
                tracing::error!(queue, %id, error = %chain(&error), "acknowledging failed; will acknowledge again");
            }
        }
    }

    fn acknowledged_before(&self, id: crate::messaging::envelope::MessageId) -> bool {
        let mut acknowledged = self.acknowledged.lock().unwrap_or_else(|e| e.into_inner());
        acknowledged.contains(id, Instant::now())
    }

    /// Parks a failed message until `delay` from now; false when that could not be stored.
    async fn park(&self, envelope: Envelope, attempts: u32, delay: Duration) -> bool {
        let (id, until, queue) = (envelope.id, later(delay), envelope.queue.clone());
        match self.broker.park(envelope, attempts, until).await {
            Ok(()) => true,
            Err(error) => {
                // the stored copy stays, with its previous history: delivered again, not lost
                tracing::error!(%queue, %id, error = %chain(&error), "parking a failed message failed; it will be delivered again");
                false
            }
        }
    }

    /// Marks the envelope as a dead letter and stores it in the dead-letter queue.
    async fn dead_letter(&self, mut envelope: Envelope, attempts: u32, reason: String) {
        use dead_letter_keys::*;
        let metadata = &mut envelope.metadata;
        metadata.insert(ORIGINAL_QUEUE.into(), envelope.queue.clone().into());
        metadata.insert(SUBSCRIBER.into(), self.subscriber.clone().into());
        metadata.insert(REASON.into(), reason.into());
        metadata.insert(ATTEMPTS.into(), attempts.into());
        metadata.insert(DEAD_LETTERED_AT.into(), rfc3339(SystemTime::now()).into());
        self.store_dead_letter(envelope, attempts).await;
    }

    /// Moves a marked envelope to the dead-letter queue; if that fails it is parked, marked,
    /// and the move is tried again after the backoff. Never dropped.
    async fn store_dead_letter(&self, envelope: Envelope, attempts: u32) {
        let id = envelope.id;
        let reason = envelope.metadata.get(dead_letter_keys::REASON).cloned();
        let lane = self.lane(&envelope.queue);
        match self.broker.dead_letter(envelope.clone(), &lane.dead_letter_queue).await {
            Ok(()) => {
                lane.dead_lettered.inc();
                lane.dead_letters.inc();
                tracing::warn!(queue = %lane.queue, %id, attempts, dead_letter_queue = %lane.dead_letter_queue, reason = %reason.unwrap_or_default(), "message dead-lettered");
            }
            Err(error) => {
                tracing::error!(queue = %lane.queue, %id, error = %chain(&error), "storing the dead letter failed; the message stays and the move is retried");
                let delay = self.retry_delay(attempts.max(1), None);
                self.park(envelope, attempts, delay).await;
                // parked or not, it is read again and the move retried
            }
        }
    }
}

/// Unix milliseconds `delay` from now.
fn later(delay: Duration) -> UnixMillis {
    unix_millis(SystemTime::now() + delay)
}

fn status_of(answer: &Answer) -> String {
    match answer {
        Answer::Status { status, .. } => status.as_u16().to_string(),
        Answer::TimedOut(after) => format!("timeout after {after:?}"),
        Answer::Failed(error) | Answer::Refused(error) => error.clone(),
    }
}
