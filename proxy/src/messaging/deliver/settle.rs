//! Settling a delivered message: acknowledged, parked for a retry after its backoff, or
//! dead-lettered with its history, by the subscription's delivery mode.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use outrigger_config as config;

use super::attempt::{self, Answer, Delivery, Verdict};
use super::{Queue, Subscriber};
use crate::error::chain;
use crate::messaging::broker::{Leased, UnixMillis};
use crate::messaging::envelope::{Envelope, dead_letter_keys, rfc3339, unix_millis};
use crate::policy::circuit_breaker::Admission;
use crate::telemetry::trace::Kind;

impl<B: Queue + Clone> Subscriber<B> {
    /// Delivers one leased message and settles it: acknowledged, parked or dead-lettered.
    pub(super) async fn deliver(
        self: Arc<Self>,
        leased: Leased,
        admission: Option<Admission>,
        _slot: OwnedSemaphorePermit,
    ) {
        let Leased { envelope, attempts } = leased;
        // a traced message's log lines carry its trace, as a traced call's do
        let traced = envelope.metadata.get("traceparent").and_then(|v| v.as_str());
        match traced.and_then(crate::telemetry::trace::Context::parse) {
            Some(trace) => {
                let span = crate::telemetry::log::call_span(&trace.trace_id, &trace.span_id);
                let settled = self.clone().settle(envelope, attempts, admission);
                tracing::Instrument::instrument(settled, span).await;
            }
            None => self.clone().settle(envelope, attempts, admission).await,
        }
        self.wake.notify_one();
    }

    async fn settle(
        self: Arc<Self>,
        envelope: Envelope,
        attempts: u32,
        admission: Option<Admission>,
    ) {
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
        let mut span = self.tracer.start(parent.as_ref(), "process", Kind::Consumer);
        if span.recording() {
            span.text("messaging.system", self.broker.messaging_system());
            span.text("messaging.operation.type", "process");
            span.text("messaging.operation.name", "process");
            span.text("messaging.destination.name", envelope.queue.as_str());
            span.text("messaging.consumer.group.name", self.consumer.as_str());
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
                    span.text("error.type", status.as_str().to_owned());
                    span.failed();
                }
            }
            Answer::TimedOut(_) => {
                span.text("error.type", "timeout");
                span.failed();
            }
            Answer::Failed(_) | Answer::Refused(_) => {
                span.text("error.type", "connection");
                span.failed();
            }
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
                // delivered, not forgotten: read again, it is acknowledged without a delivery,
                // after a restart too (the local store remembers it for the dedup window)
                {
                    let mut acknowledged =
                        self.acknowledged.lock().unwrap_or_else(|e| e.into_inner());
                    acknowledged.remember(id, Instant::now());
                }
                tracing::error!(queue, %id, error = %chain(&error), "acknowledging failed; will acknowledge again");
                if let Some(memory) = &self.memory {
                    let expires = later(self.dedup_window);
                    match memory.remember_acknowledged(queue, id, expires).await {
                        Ok(()) => {
                            tracing::info!(queue, %id, "the delivered id is remembered for the dedup window")
                        }
                        Err(error) => {
                            tracing::warn!(queue, %id, error = %chain(&error), "remembering the acknowledged id failed; a restart may deliver it again")
                        }
                    }
                }
            }
        }
    }

    /// Loads the ids remembered as acknowledged by an earlier run, so that they are not
    /// delivered again when read.
    pub(super) async fn recall_acknowledged(&self) {
        let Some(memory) = &self.memory else { return };
        let (now, now_ms) = (Instant::now(), unix_millis(SystemTime::now()));
        let mut ids = Vec::new();
        for lane in &self.lanes {
            match memory.acknowledged(&lane.queue, now_ms).await {
                Ok(found) => ids.extend(found),
                Err(error) => {
                    tracing::warn!(queue = %lane.queue, error = %chain(&error), "recalling acknowledged ids failed");
                }
            }
        }
        // oldest first, as the memory keeps them
        ids.sort_by_key(|&(_, expires)| expires);
        let recalled = ids.len();
        let mut acknowledged = self.acknowledged.lock().unwrap_or_else(|e| e.into_inner());
        for (id, expires) in ids {
            // acknowledged at `expires` less the window: forgotten when it expires
            let left = Duration::from_millis(expires.saturating_sub(now_ms));
            let at = now.checked_sub(self.dedup_window.saturating_sub(left)).unwrap_or(now);
            acknowledged.remember(id, at);
        }
        drop(acknowledged);
        if recalled > 0 {
            tracing::info!(queue = %self.queue, recalled, "recalled ids acknowledged before the restart");
        }
    }

    fn acknowledged_before(&self, id: crate::messaging::envelope::MessageId) -> bool {
        let mut acknowledged = self.acknowledged.lock().unwrap_or_else(|e| e.into_inner());
        acknowledged.contains(id, Instant::now())
    }

    /// Parks a failed message until `delay` from now; false when that could not be stored.
    pub(super) async fn park(&self, envelope: Envelope, attempts: u32, delay: Duration) -> bool {
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
