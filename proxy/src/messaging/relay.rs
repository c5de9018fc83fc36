//! The relay (`messaging.broker: redis://…`): the app's publishes are answered 202 once they are
//! durable in the local outbox (the embedded store), and this task moves them to Redis, oldest
//! first per queue, forgetting each only after Redis has it. When Redis is down or slow the
//! outbox simply grows (`outrigger_outbox_pending`), publishes keep being accepted, and
//! `/readyz` shows the broker as `degraded`; once Redis answers again everything is relayed in
//! order. A message relayed twice (the sidecar died between Redis's answer and the outbox's
//! commit) is appended once: Redis remembers relayed ids for the dedup window.
//!
//! Failures back off (the shared backoff, 100 ms doubling to 5 s) behind a breaker: after five
//! failures in a row it waits five seconds between probes instead of hammering a broker that is
//! down.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use outrigger_config as config;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::error::chain;
use crate::messaging::Messaging;
use crate::messaging::broker::{BrokerError, Outbox, Remote};
use crate::messaging::envelope::Envelope;
use crate::policy::backoff::Backoff;
use crate::policy::circuit_breaker::{Admission, Breaker};
use crate::telemetry::trace::Kind;

/// Messages moved per round trip at most.
const BATCH: usize = 512;
/// The longest the relay sleeps when nothing woke it.
const POLL: Duration = Duration::from_secs(1);

/// What the relay last saw of the broker, for readiness.
#[derive(Debug, Default)]
pub struct Status {
    failing: Mutex<Option<Arc<RelayError>>>,
}

impl Status {
    /// `None` while the broker takes what is relayed; else the last error, with its causes.
    pub fn failing(&self) -> Option<String> {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        failing.as_deref().map(|error| chain(error))
    }

    fn set(&self, failing: Option<Arc<RelayError>>) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = failing;
    }
}

/// Why a batch was not relayed; the messages stay in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("reading the outbox failed")]
    Outbox(#[source] BrokerError),
    #[error("the broker did not take the batch")]
    Broker(#[source] BrokerError),
}

/// Relays until `stop` turns true (finishing the batch in hand; the rest stays durable).
pub async fn run(
    messaging: Arc<Messaging>,
    remote: impl Remote,
    wake: Arc<Notify>,
    status: Arc<Status>,
    mut stop: watch::Receiver<bool>,
) {
    let backoff = Backoff::new(config::Backoff {
        initial: config::Duration::from_millis(100),
        max: config::Duration::from_secs(5),
        ..config::Backoff::HTTP
    });
    let mut breaker = Breaker::new(
        config::CircuitBreaker {
            consecutive_failures: std::num::NonZeroU32::new(5),
            open_for: config::Duration::from_secs(5),
            min_requests: u32::MAX,
            ..config::CircuitBreaker::default()
        },
        Instant::now(),
    );
    let mut failures = 0u32;
    let mut previous = Duration::ZERO;
    loop {
        let wait = match relay_once(&messaging, &remote, &mut breaker).await {
            Ok(0) => POLL,
            Ok(_) => {
                failures = 0;
                status.set(None);
                continue;
            }
            Err(Failed::Open(wait)) => wait,
            Err(Failed::Relay(error)) => {
                if failures == 0 {
                    tracing::warn!(error = %chain(&error), "relaying to the broker failed; publishes wait in the outbox");
                }
                status.set(Some(Arc::new(error)));
                previous = backoff.delay(failures, previous);
                failures += 1;
                previous
            }
        };
        tokio::select! {
            _ = wake.notified() , if failures == 0 => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

enum Failed {
    /// The breaker is open: try again after this.
    Open(Duration),
    Relay(RelayError),
}

/// Moves one batch; how many messages it moved.
async fn relay_once(
    messaging: &Messaging,
    remote: &impl Remote,
    breaker: &mut Breaker,
) -> Result<usize, Failed> {
    let Some(store) = messaging.opened() else { return Ok(0) };
    let admission = breaker.admit(Instant::now()).map_err(Failed::Open)?;
    let batch = match store.relay_batch(BATCH).await {
        Ok(batch) if batch.is_empty() => {
            // nothing to say about the broker: a probe that did not happen
            breaker.cancel(admission);
            return Ok(0);
        }
        Ok(batch) => batch,
        Err(error) => {
            breaker.cancel(admission);
            return Err(Failed::Relay(RelayError::Outbox(error)));
        }
    };
    // a span per message under its publish, when its trace is recorded
    let tracer = messaging.tracer();
    let mut spans: Vec<_> = batch
        .iter()
        .filter(|_| tracer.exporting())
        .filter_map(|envelope| {
            let parent = envelope.metadata.get("traceparent")?.as_str()?;
            let parent = http::HeaderValue::from_str(parent).ok()?;
            // the relay sends the message on to the broker: a `send` of that system's
            let mut span = tracer.start(Some(&parent), "send", Kind::Producer);
            span.recording().then(|| {
                span.text("messaging.system", remote.system());
                span.text("messaging.operation.type", "send");
                span.text("messaging.operation.name", "relay");
                span.text("messaging.destination.name", envelope.queue.as_str());
                span.text("messaging.message.id", envelope.id.to_string());
                (envelope.queue.as_str(), span)
            })
        })
        .collect();
    let result = remote.relay(&batch).await;
    record(breaker, admission, result.is_err());
    let refused = |queue: &str| result.as_ref().is_err_and(|u| u.queues.contains(queue));
    for (queue, mut span) in spans.drain(..) {
        if refused(queue) {
            span.failed();
        }
        tracer.end(span);
    }
    // what the broker took is forgotten; the refused queues' messages wait for the next try
    let (kept, taken): (Vec<Envelope>, Vec<Envelope>) =
        batch.into_iter().partition(|envelope| refused(&envelope.queue));
    if !taken.is_empty() {
        if let Err(error) = store.forget(&taken).await {
            // the broker has them; relayed again later, they are appended once (the marker)
            tracing::error!(error = %chain(&error), "forgetting relayed messages failed; they will be relayed again");
        }
        tracing::debug!(messages = taken.len(), "relayed to the broker");
    }
    if let Err(unrelayed) = result {
        store.release_all(&kept);
        return Err(Failed::Relay(RelayError::Broker(unrelayed.error)));
    }
    Ok(taken.len())
}

fn record(breaker: &mut Breaker, admission: Admission, failed: bool) {
    breaker.record(Instant::now(), admission, failed);
}
