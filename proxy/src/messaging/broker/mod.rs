//! The two roles a place that keeps messages can play, and the types they share.
//!
//! - [`Outbox`]: takes a publish durably, hands batches to the relay, forgets what was relayed.
//!   The embedded store in `messaging.data_dir` is the outbox on every broker.
//! - [`Queue`]: read for a consumer group, acknowledged, parked until a due time,
//!   dead-lettered with metadata, with the dead-letter operations, depth and age. The embedded
//!   store is the queue when `broker: embedded`; Redis Streams when `broker: redis://…`.
//!
//! - [`Remote`]: a broker of its own beside the sidecar, which the relay hands what the outbox
//!   holds (Redis Streams when `broker: redis://…`); it is the queue then.
//!
//! [`AnyQueue`] and [`AnyRemote`] are the one place that knows which broker runs: everything
//! above the seam holds them and never matches on the broker. Static dispatch: no boxed future
//! per message.
//!
//! Every write is durable when its future resolves: a publish is answered 202 only then, an ack
//! forgets a message only then, and a dead letter exists before its original is acknowledged.
//! Time is wall-clock Unix milliseconds, because park times must survive a restart.

mod any;
pub mod embedded;
pub mod nats;
pub mod redis;

use std::future::Future;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::messaging::envelope::{Envelope, MessageId};

pub use any::{AnyQueue, AnyRemote};
pub use embedded::Embedded;

/// Unix time in milliseconds: what a parked message waits for, and what outlives the process.
pub type UnixMillis = u64;

/// One message to publish.
#[derive(Debug)]
pub struct Publish {
    pub queue: String,
    pub payload: Box<RawValue>,
    /// With a key, a second publish within the dedup window returns the first one's id.
    pub idempotency_key: Option<String>,
    pub ordering_key: Option<String>,
    pub traceparent: Option<String>,
    /// The W3C `tracestate` sent with the publish: vendors' trace data, kept across the queue.
    pub tracestate: Option<String>,
}

impl Publish {
    /// The envelope this publish is stored as, under `id`, accepted at `at`: its keys and
    /// traceparent go in `metadata`.
    pub fn into_envelope(self, id: MessageId, at: std::time::SystemTime) -> Envelope {
        let mut envelope = Envelope::new(id, &self.queue, at, self.payload);
        for (name, value) in [
            ("idempotency_key", self.idempotency_key),
            ("ordering_key", self.ordering_key),
            ("traceparent", self.traceparent),
            ("tracestate", self.tracestate),
        ] {
            if let Some(value) = value {
                envelope.metadata.insert(name.into(), value.into());
            }
        }
        envelope
    }
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored now, under this id.
    Stored(MessageId),
    /// Its Idempotency-Key was seen within the dedup window: nothing stored, the first id.
    Duplicate(MessageId),
}

impl Published {
    pub fn id(self) -> MessageId {
        match self {
            Published::Stored(id) | Published::Duplicate(id) => id,
        }
    }
}

/// What a consumer asks of [`Queue::read`].
#[derive(Debug, Clone, Copy)]
pub struct Read {
    pub max: usize,
    /// Messages parked until later than this are not due.
    pub now: UnixMillis,
    /// One message per ordering key at a time (see [`Queue::read`]).
    pub ordered: bool,
    /// A queue that can wait for messages (see [`Queue::blocks_on_read`]) may wait a moment
    /// when none is there; false: answer at once.
    pub wait: bool,
}

/// A message handed to a consumer, leased to it until it is acknowledged, parked or
/// dead-lettered (or, for the embedded broker, until a restart: at-least-once).
#[derive(Debug, Clone)]
pub struct Leased {
    pub envelope: Envelope,
    /// Deliveries already attempted (0 for a fresh message): survives restarts.
    pub attempts: u32,
}

/// Why a broker operation failed. The message concerned stays where it was. Each keeps its
/// cause as its `source`: show one with `crate::error::chain`, which says `a: b: c`.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The embedded store's file failed. Shared: one failed commit answers all its callers.
    #[error("the message store failed")]
    Store(#[source] Arc<embedded::StoreError>),
    /// The embedded store refuses writes until its file opens again (after a write error).
    #[error("the message store cannot be written yet")]
    Unwritable(#[source] Arc<embedded::StoreError>),
    /// A blocking task of the embedded store ended without an answer.
    #[error("a message store task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("redis failed")]
    Redis(#[source] ::redis::RedisError),
    #[error("nats failed")]
    Nats(#[source] Arc<nats::NatsError>),
    #[error("the message store has stopped")]
    Stopped,
    #[error("no message {id} in queue {queue}")]
    NotFound { queue: String, id: MessageId },
    /// A Redis Cluster primary took a relayed batch, and its replicas did not all copy it in
    /// time: the batch stays in the outbox and is relayed again (appended once).
    #[error(
        "redis: the primary of queue {queue} has {replicas} replica(s) connected, and {copies} copied the batch in time"
    )]
    Unreplicated { queue: String, replicas: usize, copies: usize },
}

/// Why some of a relayed batch was not taken: these queues' messages stay in the outbox.
#[derive(Debug)]
pub struct Unrelayed {
    pub queues: std::collections::HashSet<String>,
    /// The first queue's error.
    pub error: BrokerError,
}

impl Unrelayed {
    /// The whole batch refused for `error`.
    pub fn all(batch: &[Envelope], error: BrokerError) -> Self {
        Unrelayed { queues: batch.iter().map(|e| e.queue.clone()).collect(), error }
    }
}

/// A page of dead letters, newest first.
#[derive(Debug)]
pub struct DeadLetterPage {
    pub messages: Vec<Envelope>,
    /// Pass as `before` to read the next (older) page.
    pub next: Option<MessageId>,
}

/// One queue's depth, for the admin view and the depth and age gauges.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueDepth {
    pub queue: String,
    /// Stored, not acknowledged.
    pub messages: u64,
    pub dead_letters: u64,
    /// When the oldest stored message was published (Unix ms).
    pub oldest_published_ms: Option<u64>,
    /// When the oldest dead letter was dead-lettered (Unix ms).
    pub oldest_dead_letter_ms: Option<u64>,
}

impl QueueDepth {
    /// Adds `other`'s counts (the same queue, seen from another lane) to these.
    pub fn add(&mut self, other: &QueueDepth) {
        let earliest = |a: Option<u64>, b: Option<u64>| a.into_iter().chain(b).min();
        self.messages += other.messages;
        self.dead_letters += other.dead_letters;
        self.oldest_published_ms = earliest(self.oldest_published_ms, other.oldest_published_ms);
        self.oldest_dead_letter_ms =
            earliest(self.oldest_dead_letter_ms, other.oldest_dead_letter_ms);
    }
}

/// A subscribed lane and its dead-letter queue: what [`Queue::depths`] reports on a broker
/// that cannot list its queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    pub queue: String,
    pub dead_letter_queue: String,
}

impl Lane {
    /// Every lane of `subscriptions`, with its dead-letter queue.
    pub fn all(subscriptions: &[outrigger_config::Subscription]) -> Vec<Lane> {
        subscriptions
            .iter()
            .flat_map(|sub| {
                sub.lanes().into_iter().map(|lane| Lane {
                    dead_letter_queue: sub.dead_letter_queue_of(&lane).as_str().to_owned(),
                    queue: lane.as_str().to_owned(),
                })
            })
            .collect()
    }
}

/// Where a publish is made durable before its 202, and whence the relay takes it to a remote
/// broker. Implemented by [`Embedded`].
pub trait Outbox: Send + Sync + 'static {
    /// Stores every message durably (one commit for the whole batch where the store allows),
    /// answering each in order.
    fn publish(
        &self,
        batch: Vec<Publish>,
    ) -> impl Future<Output = Result<Vec<Published>, BrokerError>> + Send;

    /// Up to `max` stored messages of any queue, oldest first per queue, leased to the relay
    /// until [`Outbox::forget`] or [`Outbox::release_all`].
    fn relay_batch(
        &self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Envelope>, BrokerError>> + Send;

    /// Forgets relayed messages, in one commit.
    fn forget(&self, relayed: &[Envelope]) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Ends the leases of messages that could not be relayed: they are taken again later.
    fn release_all(&self, envelopes: &[Envelope]);
}

/// A broker of its own beside the sidecar (`broker: redis://…`): the relay hands it what the
/// outbox holds, and it is the [`Queue`] deliveries read from. Implemented by [`redis::Redis`];
/// the sidecar holds an [`AnyRemote`].
pub trait Remote: Send + Sync + 'static {
    /// Appends relayed messages to their queues, each once however often it is relayed (the
    /// outbox may relay again what it could not forget). A queue the broker refuses does not
    /// hold back the others: the error names the queues whose messages were not taken.
    fn relay(&self, batch: &[Envelope]) -> impl Future<Output = Result<(), Unrelayed>> + Send;

    /// What the readiness check calls it: `redis`.
    fn system(&self) -> &'static str;

    /// Why this broker cannot hold queue `queue`, if it cannot: a publish to it is refused
    /// (400) rather than stored and never relayed.
    fn refuses(&self, queue: &outrigger_config::QueueName) -> Option<&'static str> {
        let _ = queue;
        None
    }
}

/// Where messages are read, settled and dead-lettered. Implemented by [`Embedded`] and
/// [`redis::Redis`]; the sidecar holds an [`AnyQueue`].
pub trait Queue: Send + Sync + 'static {
    /// Up to `max` messages of `queue` that are due at `now` (not parked past it) and not leased,
    /// in id order, leased to `consumer`. With `ordered`, a message whose ordering key belongs
    /// to an earlier message that is leased or parked is not due: one message per key at a
    /// time, in publish order (messages without a key are not held back).
    fn read(
        &self,
        queue: &str,
        consumer: &str,
        read: Read,
    ) -> impl Future<Output = Result<Vec<Leased>, BrokerError>> + Send;

    /// `messaging.system` in the delivery spans: `outrigger` for the embedded store.
    fn messaging_system(&self) -> &'static str {
        "outrigger"
    }

    /// Whether `read` itself waits a moment for messages when none is there (a remote broker
    /// with blocking reads): then the dispatcher reads again at once instead of idling.
    fn blocks_on_read(&self) -> bool {
        false
    }

    /// Periodic upkeep of `queue` (a Redis stream trimmed below what every group has
    /// settled); how many entries it removed. Nothing to do by default.
    fn tidy(&self, queue: &str) -> impl Future<Output = Result<u64, BrokerError>> + Send {
        let _ = queue;
        async { Ok(0) }
    }

    /// When the soonest message of `queue` parked past `now` falls due, if one is.
    fn next_due(
        &self,
        queue: &str,
        now: UnixMillis,
    ) -> impl Future<Output = Result<Option<UnixMillis>, BrokerError>> + Send;

    /// Forgets a delivered message. Whether or not it succeeds, the lease ends: a message whose
    /// ack failed is read again, and its consumer acknowledges it again without redelivering.
    fn ack(
        &self,
        queue: &str,
        id: MessageId,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Keeps a failed message until `until`, replacing its envelope (with the new error record)
    /// and counting the attempt, durably; it is not read again before then.
    fn park(
        &self,
        envelope: Envelope,
        attempts: u32,
        until: UnixMillis,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Stores `envelope` in `dead_letter_queue` and removes the original from its queue, in one
    /// atomic step: if it fails, the original stays.
    fn dead_letter(
        &self,
        envelope: Envelope,
        dead_letter_queue: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Dead letters of `dead_letter_queue`, newest first, older than `before` when given.
    fn dead_letters(
        &self,
        dead_letter_queue: &str,
        before: Option<MessageId>,
        limit: usize,
    ) -> impl Future<Output = Result<DeadLetterPage, BrokerError>> + Send;

    fn dead_letter_get(
        &self,
        dead_letter_queue: &str,
        id: MessageId,
    ) -> impl Future<Output = Result<Option<Envelope>, BrokerError>> + Send;

    /// Removes a dead letter; `Ok(false)` when there was none.
    fn dead_letter_delete(
        &self,
        dead_letter_queue: &str,
        id: MessageId,
    ) -> impl Future<Output = Result<bool, BrokerError>> + Send;

    /// Removes every dead letter of `dead_letter_queue`; how many there were.
    fn dead_letter_purge(
        &self,
        dead_letter_queue: &str,
    ) -> impl Future<Output = Result<u64, BrokerError>> + Send;

    /// Moves dead letters back to the queue they came from (see [`mark_replayed`]), due now
    /// with a fresh attempt count, each atomically; the ids that were moved.
    fn dead_letter_replay(
        &self,
        dead_letter_queue: &str,
        ids: Vec<MessageId>,
    ) -> impl Future<Output = Result<Vec<MessageId>, BrokerError>> + Send;

    /// Each queue's depth and age: every queue the store holds where it can list them, else
    /// each of `lanes` as this service's consumer group sees it, and its dead-letter queue.
    fn depths(
        &self,
        lanes: &[Lane],
    ) -> impl Future<Output = Result<Vec<QueueDepth>, BrokerError>> + Send;
}

/// Turns a dead letter back into a message of the queue it came from: its error history stays,
/// the dead-letter metadata goes, and `replayed_at`, `replays` (a count) and
/// `last_dead_letter_reason` say what happened.
pub fn mark_replayed(envelope: &mut Envelope, dead_letter_queue: &str, now: std::time::SystemTime) {
    use crate::messaging::envelope::dead_letter_keys::*;
    let metadata = &mut envelope.metadata;
    let original = metadata.remove(ORIGINAL_QUEUE).and_then(|q| q.as_str().map(str::to_owned));
    envelope.queue = original.unwrap_or_else(|| {
        dead_letter_queue.strip_suffix("_deadletter").unwrap_or(dead_letter_queue).to_owned()
    });
    if let Some(reason) = metadata.remove(REASON) {
        metadata.insert("last_dead_letter_reason".into(), reason);
    }
    for key in [ATTEMPTS, DEAD_LETTERED_AT, SUBSCRIBER] {
        metadata.remove(key);
    }
    let replays = metadata.get("replays").and_then(|n| n.as_u64()).unwrap_or(0) + 1;
    metadata.insert("replays".into(), replays.into());
    metadata.insert("replayed_at".into(), crate::messaging::envelope::rfc3339(now).into());
}
